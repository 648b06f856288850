//! The identity of a client whose certificate was verified: on this connection's TLS
//! handshake, or by a trusted proxy that passed it on.

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::{rfc4514, unix_now};

/// The identity of a client whose certificate was verified on this connection.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// Subject CN of the leaf.
    pub cn: String,
    /// Subject in RFC 4514 form (`CN=…,O=…,C=…`).
    pub subject: String,
    /// SHA-256 of the leaf DER, lower-case hex; unknown when only a subject was passed on by a
    /// trusted proxy.
    pub sha256: Option<String>,
    /// The leaf's notAfter (Unix seconds); unknown when a trusted proxy passed on a subject.
    pub not_after: Option<i64>,
    /// The `X-Forwarded-Client-Cert` value, built once rather than per forwarded request.
    xfcc: Option<http::HeaderValue>,
}

impl PeerIdentity {
    pub fn new(cn: String, subject: String, sha256: Option<String>) -> PeerIdentity {
        let escaped = subject.replace('\\', "\\\\").replace('"', "\\\"");
        let value = match &sha256 {
            Some(hash) => format!("Hash={hash};Subject=\"{escaped}\""),
            None => format!("Subject=\"{escaped}\""),
        };
        PeerIdentity {
            cn,
            subject,
            sha256,
            not_after: None,
            xfcc: http::HeaderValue::from_str(&value).ok(),
        }
    }

    /// Whether the certificate has expired by now. A resumed TLS session carries the identity
    /// verified when the session was made, and each resumption hands out a new ticket, so
    /// without this check a session could outlive its certificate.
    pub fn expired(&self) -> bool {
        self.not_after.is_some_and(|t| t < unix_now())
    }

    /// Builds the identity from the verified leaf.
    pub fn from_leaf(der: &[u8]) -> Option<PeerIdentity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut id = PeerIdentity::new(
            single_common_name(der)?,
            rfc4514(cert.subject()),
            Some(hex::encode(Sha256::digest(der))),
        );
        id.not_after = Some(cert.validity().not_after.timestamp());
        Some(id)
    }

    /// The value of an Envoy-style `X-Forwarded-Client-Cert` header (`None` if the subject
    /// cannot be a header value).
    pub fn xfcc(&self) -> Option<&http::HeaderValue> {
        self.xfcc.as_ref()
    }
}

/// The leaf's subject CN when there is exactly one; `None` when it has none, several, or is
/// not parseable.
pub(crate) fn single_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_owned();
    cns.next().is_none().then_some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_quotes_subject() {
        let id = PeerIdentity::new(
            "c".into(),
            "CN=c,O=Say \\\"hi\\\"".into(),
            Some("ab".into()),
        );
        assert_eq!(
            id.xfcc().unwrap(),
            "Hash=ab;Subject=\"CN=c,O=Say \\\\\\\"hi\\\\\\\"\""
        );
    }
}
