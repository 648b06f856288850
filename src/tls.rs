//! TLS for the listener: the rustls `ServerConfig` (TLS 1.3 and 1.2, h2 and http/1.1, the
//! generation's client-certificate verifier) and plain-language reasons for failed handshakes.
//!
//! # Session resumption and client auth
//! A resumed session skips the client-certificate verifier: rustls restores the client chain
//! that was verified when the session was made. hubgate resumes with stateless TLS tickets
//! (rustls' RFC 5077 construction, AES-256 + HMAC-SHA256, keys rotated every 6 hours, TLS 1.3
//! resumption always with a fresh (EC)DHE exchange), so:
//! - a resumed session carries exactly the identity that passed the CN check when it was made
//!   (the chain is inside the encrypted ticket and cannot be altered without the key), and
//!   never past that certificate's notAfter: each resumption hands out a new ticket, so the
//!   server checks the date on every connection ([`crate::identity::ClientPolicy::connection`]);
//! - the ticket keys live and die with one `ServerConfig`: a new configuration (new trust anchors
//!   or allowed CNs) has new keys, so no session made under old rules resumes under new ones;
//! - the server keeps nothing per session: memory does not grow with the number of clients
//!   (a stateful cache held each client's certificate chain, about 2 KiB per session). TLS 1.2
//!   session IDs are not cached; TLS 1.2 clients resume with tickets too.

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::NoServerSessionStorage;
use rustls::{CertificateError, OtherError, ServerConfig};

use crate::config::ServerSettings;
use crate::identity::constraints::CnOutsideNameConstraints;
use crate::identity::verifier::CnNotAllowed;
use crate::pki::PkiError;

/// Builds the listener's rustls configuration around the generation's client verifier.
pub fn server_config(
    server: &ServerSettings,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut config = builder.with_single_cert(server.cert_chain.clone(), server.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption by ticket only (see the module docs); the keys belong to this configuration.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    // One ticket per connection is all a client needs to resume (rustls' default sends two).
    config.send_tls13_tickets = 1;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Why a TLS handshake failed, as a short stable label for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    NoClientCert,
    Expired,
    NotYetValid,
    UntrustedChain,
    WrongKeyUsage,
    CnNotAllowed,
    /// The CN is outside a CA's name constraints.
    CnNameConstraint,
    /// A CRL revokes a certificate of the chain.
    Revoked,
    /// No CRL covers a CA of the chain (`crl_policy = "hard"`).
    RevocationUnknown,
    /// A CRL is past its nextUpdate (`crl_policy = "hard"`).
    CrlExpired,
    BadCertificate,
    Protocol,
    Io,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NoClientCert => "no_client_cert",
            Self::Expired => "cert_expired",
            Self::NotYetValid => "cert_not_yet_valid",
            Self::UntrustedChain => "untrusted_chain",
            Self::WrongKeyUsage => "wrong_key_usage",
            Self::CnNotAllowed => "cn_not_allowed",
            Self::CnNameConstraint => "cn_name_constraint",
            Self::Revoked => "cert_revoked",
            Self::RevocationUnknown => "revocation_unknown",
            Self::CrlExpired => "crl_expired",
            Self::BadCertificate => "bad_certificate",
            Self::Protocol => "protocol",
            Self::Io => "io",
        }
    }

    /// Classifies the error tokio-rustls returned from `accept`.
    pub fn classify(err: &io::Error) -> HandshakeFailure {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return if err.kind() == io::ErrorKind::TimedOut {
                Self::Timeout
            } else {
                Self::Io
            };
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Self::NoClientCert,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                CertificateError::UnknownIssuer => Self::UntrustedChain,
                CertificateError::Revoked => Self::Revoked,
                CertificateError::UnknownRevocationStatus => Self::RevocationUnknown,
                CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. } => Self::CrlExpired,
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => Self::WrongKeyUsage,
                CertificateError::Other(OtherError(e)) if e.is::<CnNotAllowed>() => {
                    Self::CnNotAllowed
                }
                CertificateError::Other(OtherError(e)) if e.is::<CnOutsideNameConstraints>() => {
                    Self::CnNameConstraint
                }
                _ => Self::BadCertificate,
            },
            _ => Self::Protocol,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
