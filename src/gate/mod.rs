//! The Meta rules, as pure functions over bytes and headers: the `hub.challenge` answer, the
//! `X-Hub-Signature-256` check, and the [`Verdict`] every request ends in. One place
//! ([`Verdict::status`]) maps outcomes to HTTP statuses.

pub mod challenge;
pub mod signature;

use http::StatusCode;

pub use challenge::ChallengeError;
pub use signature::SignatureError;

/// How a request ended. Each has a status, a stable label for logs and metrics, and a detail
/// that never contains a token, secret, signature or body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Authenticated and relayed; carries the upstream's status.
    Forwarded(StatusCode),
    /// Authenticated and durably stored for delivery (200).
    Spooled,
    /// Authenticated, and the same body was already accepted within the dedupe window (200).
    Duplicate,
    /// The spool could not store the event: disk or size cap full (503, Meta retries).
    SpoolFull,
    /// The spool could not store the event for another reason (503, Meta retries).
    SpoolError,
    /// The verification GET was answered with the challenge.
    ChallengeAnswered,
    NotFound,
    MethodNotAllowed,
    /// The route needs a verified client certificate and the connection has none.
    ClientCertRequired,
    Challenge(ChallengeError),
    Signature(SignatureError),
    BodyTooLarge,
    /// Too many request bytes are held in memory at once (`server.max_buffered_bytes`): 503.
    Overloaded,
    BodyTimeout,
    BodyError,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamBadResponse,
    /// The client address a trusted proxy reported is not in `server.allow_sources`.
    SourceNotAllowed,
    /// A trusted proxy's identity header was malformed or did not pass verification.
    IdentityHeader(crate::edge::HeaderIdentityError),
}

impl Verdict {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Forwarded(s) => *s,
            Self::Spooled | Self::Duplicate => StatusCode::OK,
            Self::SpoolFull | Self::SpoolError => StatusCode::SERVICE_UNAVAILABLE,
            Self::ChallengeAnswered => StatusCode::OK,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ClientCertRequired => StatusCode::FORBIDDEN,
            Self::Challenge(ChallengeError::WrongToken) => StatusCode::FORBIDDEN,
            Self::Challenge(_) => StatusCode::BAD_REQUEST,
            Self::Signature(_) => StatusCode::FORBIDDEN,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyError => StatusCode::BAD_REQUEST,
            Self::UpstreamUnreachable | Self::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::SourceNotAllowed | Self::IdentityHeader(_) => StatusCode::FORBIDDEN,
        }
    }

    /// A short stable label: `forwarded`, `bad_signature`, …
    pub fn label(&self) -> &'static str {
        match self {
            Self::Forwarded(_) => "forwarded",
            Self::Spooled => "spooled",
            Self::Duplicate => "duplicate",
            Self::SpoolFull => "spool_full",
            Self::SpoolError => "spool_error",
            Self::ChallengeAnswered => "challenge_ok",
            Self::NotFound => "no_route",
            Self::MethodNotAllowed => "bad_method",
            Self::ClientCertRequired => "client_cert_required",
            Self::Challenge(_) => "bad_challenge",
            Self::Signature(_) => "bad_signature",
            Self::BodyTooLarge => "body_too_large",
            Self::Overloaded => "overloaded",
            Self::BodyTimeout => "body_timeout",
            Self::BodyError => "body_error",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamBadResponse => "upstream_bad_response",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::IdentityHeader(_) => "bad_identity_header",
        }
    }

    /// The finer reason, where there is one (`mismatch`, `wrong_token`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Challenge(e) => e.as_str(),
            Self::Signature(e) => e.as_str(),
            Self::IdentityHeader(e) => e.as_str(),
            _ => "-",
        }
    }
}
