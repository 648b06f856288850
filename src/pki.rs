//! Certificates and keys as files and facts: PEM loading (rustls-pki-types' `PemObject`),
//! X.509 details an operator needs (subject, expiry; x509-parser), the trust anchors of
//! `client_auth.roots` with warnings about them, and the one crypto provider. Nothing here
//! decides who may connect: that is [`crate::identity`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Seconds since the Unix epoch (0 if the clock is before it): for certificate dates.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Errors loading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
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
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| PkiError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_owned(),
        });
    }
    for (index, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c).map_err(|e| PkiError::BadCertificate {
            path: path.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 RSA or SEC1 EC) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| PkiError::Read {
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

/// A certificate revocation list, with what an operator needs to know about it.
#[derive(Clone, Debug)]
pub struct Crl {
    pub path: PathBuf,
    pub der: CertificateRevocationListDer<'static>,
    /// The issuing CA, RFC 4514 form.
    pub issuer: String,
    /// How many certificates it revokes.
    pub revoked: usize,
    /// `nextUpdate` (Unix seconds): past it, the list is stale. `None`: the CRL has none.
    pub next_update: Option<i64>,
    /// Where it was fetched from (`crl_urls`); `None` for a file.
    pub url: Option<String>,
}

/// Loads every CRL in a file: PEM (`-----BEGIN X509 CRL-----`, one or more) or one DER list.
pub fn load_crls(path: &Path) -> Result<Vec<Crl>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_crls(&bytes, path)
}

/// CRLs from bytes (PEM or DER); `path` names them in messages and metrics.
pub fn parse_crls(bytes: &[u8], path: &Path) -> Result<Vec<Crl>, String> {
    let ders: Vec<CertificateRevocationListDer<'static>> = if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    };
    if ders.is_empty() {
        return Err(format!("{} holds no CRL", path.display()));
    }
    ders.into_iter()
        .enumerate()
        .map(|(i, der)| {
            let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
                .map_err(|e| {
                    format!("{}: CRL #{i} is not a valid X.509 CRL: {e}", path.display())
                })?;
            let issuer = crl.issuer().to_string();
            let revoked = crl.iter_revoked_certificates().count();
            let next_update = crl.next_update().map(|t| t.timestamp());
            Ok(Crl {
                path: path.to_owned(),
                issuer,
                revoked,
                next_update,
                der: der.clone(),
                url: None,
            })
        })
        .collect()
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
pub fn load_anchors(path: &Path) -> Result<Vec<Anchor>, PkiError> {
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

/// Formats a distinguished name as RFC 4514 does: last RDN first, `,` between RDNs, `+` inside one.
pub(crate) fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
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
}
