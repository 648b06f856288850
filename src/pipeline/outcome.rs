//! How a request ended: one [`Outcome`] per request, which gives the HTTP status, the stable
//! verdict and reason for the access log and metrics, the response of a refusal, and the
//! counters it moves. The only place that maps outcomes to statuses.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::gate::{ChallengeError, SignatureError};
use crate::identity::{HeaderIdentityError, Refusal};
use crate::metrics::{Metrics, RouteLabel};

/// How a request ended. Each has a status, a stable verdict label for logs and metrics, and a
/// reason that never contains a token, secret, signature or body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Authenticated and relayed; carries the upstream's status.
    Forwarded(StatusCode),
    /// Authenticated and durably stored for delivery (200).
    Spooled,
    /// Authenticated, split into parts, and every part delivered (2xx) or known delivered
    /// already (200).
    Split,
    /// Authenticated, and the same body was already accepted within the dedupe window (200).
    Duplicate,
    /// The spool could not store the event: disk or size cap full (503, Meta retries).
    SpoolFull,
    /// The spool could not store the event for another reason (503, Meta retries).
    SpoolError,
    /// The spool's store is out of reach or slower than `accept_timeout` (503, Meta retries).
    SpoolUnavailable,
    /// The verification GET was answered with the challenge.
    ChallengeAnswered,
    NotFound,
    MethodNotAllowed,
    /// The route needs a verified client certificate and the connection has none.
    ClientCertRequired,
    Challenge(ChallengeError),
    Signature(SignatureError),
    BodyTooLarge,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    MissingHost,
    /// The request's head is over `server.max_header_bytes` or `server.max_headers` (431).
    HeadTooLarge(HeadLimit),
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
    IdentityHeader(HeaderIdentityError),
}

/// Which head limit a request crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLimit {
    /// `server.max_header_bytes`.
    Bytes,
    /// `server.max_headers`.
    Count,
}

impl HeadLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bytes => "header_bytes",
            Self::Count => "header_count",
        }
    }
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Outcome {
        match r {
            Refusal::SourceNotAllowed => Outcome::SourceNotAllowed,
            Refusal::IdentityHeader(e) => Outcome::IdentityHeader(e),
            Refusal::CertificateRequired => Outcome::ClientCertRequired,
        }
    }
}

impl Outcome {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Forwarded(s) => *s,
            Self::Spooled | Self::Split | Self::Duplicate => StatusCode::OK,
            Self::SpoolFull | Self::SpoolError | Self::SpoolUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ChallengeAnswered => StatusCode::OK,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ClientCertRequired => StatusCode::FORBIDDEN,
            Self::Challenge(ChallengeError::WrongToken) => StatusCode::FORBIDDEN,
            Self::Challenge(_) => StatusCode::BAD_REQUEST,
            Self::Signature(_) => StatusCode::FORBIDDEN,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MissingHost => StatusCode::BAD_REQUEST,
            Self::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyError => StatusCode::BAD_REQUEST,
            Self::UpstreamUnreachable | Self::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::SourceNotAllowed | Self::IdentityHeader(_) => StatusCode::FORBIDDEN,
        }
    }

    /// A short stable label: `forwarded`, `bad_signature`, …
    pub fn verdict(&self) -> &'static str {
        match self {
            Self::Forwarded(_) => "forwarded",
            Self::Spooled => "spooled",
            Self::Split => "split",
            Self::Duplicate => "duplicate",
            Self::SpoolFull => "spool_full",
            Self::SpoolError => "spool_error",
            Self::SpoolUnavailable => "spool_unavailable",
            Self::ChallengeAnswered => "challenge_ok",
            Self::NotFound => "no_route",
            Self::MethodNotAllowed => "bad_method",
            Self::ClientCertRequired => "client_cert_required",
            Self::Challenge(_) => "bad_challenge",
            Self::Signature(_) => "bad_signature",
            Self::BodyTooLarge => "body_too_large",
            Self::MissingHost => "bad_request",
            Self::HeadTooLarge(_) => "head_too_large",
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
            Self::MissingHost => "missing_host",
            Self::HeadTooLarge(l) => l.as_str(),
            _ => "-",
        }
    }

    /// Counts the finished request: by verdict and status, and in the family its kind has.
    pub fn record(&self, metrics: &Metrics, route: &RouteLabel, status: StatusCode) {
        metrics.request(route, self.verdict(), status.as_u16());
        match self {
            Self::Signature(e) => metrics.signature_failure(route, e.as_str()),
            Self::Challenge(e) => metrics.challenge(route, e.as_str()),
            Self::ChallengeAnswered => metrics.challenge(route, "ok"),
            Self::UpstreamUnreachable | Self::UpstreamTimeout | Self::UpstreamBadResponse => {
                metrics.upstream_error(route, self.verdict())
            }
            _ => {}
        }
    }

    /// A refusal's response: the status, and its reason phrase as plain text. The detail goes
    /// to the log, not to the client.
    pub fn refusal(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        let text = format!("{}\n", status.canonical_reason().unwrap_or("error"));
        let mut r = text_response(Bytes::from(text));
        *r.status_mut() = status;
        if *self == Self::MethodNotAllowed {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
        }
        r
    }
}

/// A 200 that hubgate answers itself (the event is stored, or was delivered before).
pub fn event_received() -> Response<Full<Bytes>> {
    text_response(Bytes::from_static(b"EVENT_RECEIVED\n"))
}

/// A plain-text 200.
pub fn text_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
