//! TLS: PEM loading, the rustls `ServerConfig`, the client-certificate verifier that adds
//! Meta's identity rule (CN allow-list) on top of rustls' WebPKI chain verification, the identity
//! of a verified peer, and plain-language reasons for failed handshakes.
//!
//! # Session resumption and client auth
//! A resumed session skips the client-certificate verifier: rustls restores the client chain
//! that was verified when the session was made. hubgate resumes with stateless TLS tickets
//! (rustls' RFC 5077 construction, AES-256 + HMAC-SHA256, keys rotated every 6 hours, TLS 1.3
//! resumption always with a fresh (EC)DHE exchange), so:
//! - a resumed session carries exactly the identity that passed the CN check when it was made
//!   (the chain is inside the encrypted ticket and cannot be altered without the key), and
//!   never past that certificate's notAfter: each resumption hands out a new ticket, so the
//!   server checks the date on every connection ([`PeerIdentity::expired`]);
//! - the ticket keys live and die with one `ServerConfig`: a new configuration (new trust anchors
//!   or allowed CNs) has new keys, so no session made under old rules resumes under new ones;
//! - the server keeps nothing per session: memory does not grow with the number of clients
//!   (a stateful cache held each client's certificate chain, about 2 KiB per session). TLS 1.2
//!   session IDs are not cached; TLS 1.2 clients resume with tickets too.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{ClientAuth, ClientAuthMode, ServerSettings};

/// Errors loading or assembling TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate #{index} is not valid X.509: {reason}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The one crypto provider hubgate uses (aws-lc-rs), passed explicitly everywhere.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loads every certificate in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    for (index, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 RSA or SEC1 EC) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Fails when the key cannot be used or does not belong to the chain's first certificate.
pub fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), rustls::Error> {
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), key.clone_key(), &crypto_provider())
        .map(drop)
}

/// A trust anchor for client certificates, with what an operator needs to know about it.
#[derive(Clone, Debug)]
pub struct Anchor {
    pub path: PathBuf,
    pub der: CertificateDer<'static>,
    /// Subject in RFC 4514 form.
    pub subject: String,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    pub not_after_text: String,
}

/// What a certificate says about itself, for summaries and warnings.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Subject in RFC 4514 form.
    pub subject: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    pub not_after_text: String,
    /// Issuer and subject are the same name.
    pub self_signed: bool,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Option<CertInfo> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let not_after = cert.validity().not_after;
        Some(CertInfo {
            subject: rfc4514(cert.subject()),
            not_after: not_after.timestamp(),
            not_after_text: not_after.to_string(),
            self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        })
    }
}

/// Loads every certificate of a PEM file as a trust anchor. Roots and intermediates both work:
/// WebPKI uses only an anchor's subject and public key.
pub fn load_anchors(path: &Path) -> Result<Vec<Anchor>, TlsError> {
    Ok(load_certs(path)?
        .into_iter()
        .filter_map(|der| {
            // load_certs has parsed every certificate already.
            let info = CertInfo::parse(&der)?;
            Some(Anchor {
                path: path.to_owned(),
                subject: info.subject,
                sha256: hex::encode(Sha256::digest(&der)),
                not_after: info.not_after,
                not_after_text: info.not_after_text,
                der,
            })
        })
        .collect())
}

/// 2026-04-15T00:00:00Z: Meta's DigiCert-signed webhook client certificate expired that day.
pub const DIGICERT_CHAIN_RETIRED_AT: i64 = 1_776_211_200;

/// Subjects of the CAs that signed Meta's retired client certificate.
const RETIRED_META_CHAIN: [&str; 2] = [
    "DigiCert High Assurance EV Root CA",
    "DigiCert SHA2 High Assurance Server CA",
];

/// What an operator should be told about the configured anchors at `now` (Unix seconds):
/// expired anchors, and a loud warning when no anchor could verify Meta's current chain.
pub fn anchor_warnings(anchors: &[Anchor], now: i64) -> Vec<String> {
    let mut out = Vec::new();
    let mut usable = 0;
    for a in anchors {
        let retired = RETIRED_META_CHAIN
            .iter()
            .any(|cn| a.subject.contains(&format!("CN={cn}")));
        if a.not_after <= now {
            out.push(format!(
                "trust anchor {} ({}) expired on {}",
                a.path.display(),
                a.subject,
                a.not_after_text
            ));
        } else if retired && now >= DIGICERT_CHAIN_RETIRED_AT {
            out.push(format!(
                "trust anchor {} ({}) only verified Meta's DigiCert-signed client certificate, which expired on 2026-04-15",
                a.path.display(),
                a.subject
            ));
        } else {
            usable += 1;
        }
    }
    if usable == 0 && !anchors.is_empty() {
        out.push(
            "NO CONFIGURED TRUST ANCHOR CAN VERIFY META'S CURRENT WEBHOOK CLIENT CERTIFICATE: every \
             mTLS request from Meta will be rejected. Download meta-outbound-api-ca-2025-12.pem \
             (\"Meta outbound API CA\") from Meta's Graph API webhooks getting-started page and add \
             it to client_auth.roots (see certs/README.md)."
                .to_owned(),
        );
    }
    out
}

/// Builds the listener's rustls configuration.
pub fn server_config(
    server: &ServerSettings,
    client_auth: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_verifier(client_auth, provider)? {
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

/// The client-certificate verifier for `client_auth` (`None` when mode is off). The listener
/// uses it in the handshake; certificates passed on by a trusted proxy go through the same one.
pub fn client_verifier(
    client_auth: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError> {
    if client_auth.mode == ClientAuthMode::Off {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    for a in &client_auth.anchors {
        roots.add(a.der.clone())?;
    }
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if client_auth.mode == ClientAuthMode::Optional {
        b = b.allow_unauthenticated();
    }
    Ok(Some(Arc::new(MetaClientVerifier {
        inner: b.build()?,
        allowed_cn: client_auth.allowed_cn.clone(),
    })))
}

/// rustls' WebPKI client verifier plus Meta's identity rule.
///
/// The chain, signatures, validity dates and the clientAuth EKU are checked by the wrapped
/// `WebPkiClientVerifier`, unchanged. What this adds: the verified leaf must carry exactly one
/// subject CN and it must be in the allow-list (an empty list admits nobody). The chain alone
/// proves nothing about Meta: the same DigiCert intermediate signed graph.facebook.com.
#[derive(Debug)]
struct MetaClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed_cn: Vec<String>,
}

/// The verified leaf's CN is not in `client_auth.allowed_cn`.
#[derive(Debug, thiserror::Error)]
#[error("client certificate CN {cn:?} is not in client_auth.allowed_cn")]
pub struct CnNotAllowed {
    pub cn: String,
}

impl ClientCertVerifier for MetaClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cn = single_common_name(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if self.allowed_cn.contains(&cn) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(CnNotAllowed { cn })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The leaf's subject CN when there is exactly one; `None` when it has none, several, or is
/// not parseable.
fn single_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_owned();
    cns.next().is_none().then_some(cn)
}

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
        self.not_after.is_some_and(|t| t < crate::unix_now())
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

/// Formats a distinguished name as RFC 4514 does: last RDN first, `,` between RDNs, `+` inside one.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> =
        name.iter_rdn()
            .map(|rdn| {
                rdn.iter()
                    .map(|attr| {
                        let oid = attr.attr_type();
                        let key = x509_parser::objects::oid2abbrev(oid, registry)
                            .map(str::to_owned)
                            .unwrap_or_else(|_| oid.to_id_string());
                        let value = attr.as_str().map(escape_rdn_value).unwrap_or_else(|_| {
                            format!("#{}", hex::encode(attr.attr_value().data))
                        });
                        format!("{key}={value}")
                    })
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// Escapes an attribute value as RFC 4514 does; control characters become `\XX` hex pairs, so
/// the result is always a valid HTTP header value.
fn escape_rdn_value(v: &str) -> String {
    let count = v.chars().count();
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        if c.is_control() {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("\\{b:02X}"));
            }
            continue;
        }
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i + 1 == count && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
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
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => Self::WrongKeyUsage,
                CertificateError::Other(OtherError(e)) if e.is::<CnNotAllowed>() => {
                    Self::CnNotAllowed
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdn_values_are_escaped() {
        assert_eq!(escape_rdn_value("a,b"), "a\\,b");
        assert_eq!(escape_rdn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_rdn_value("#1"), "\\#1");
        assert_eq!(escape_rdn_value("plain.example"), "plain.example");
        assert_eq!(escape_rdn_value("a\r\nb"), "a\\0D\\0Ab");
    }

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
