//! The client-certificate verifier: rustls' WebPKI verification plus Meta's identity rule (the
//! CN allow-list). One is built per configuration generation and shared by the TLS listener and
//! by the check of certificates a trusted proxy passes on.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::constraints::check_cn;
use super::peer::single_common_name;
use crate::config::{ClientAuth, ClientAuthMode, CrlPolicy};
use crate::pki::PkiError;

/// The client-certificate verifier for `client_auth` (`None` when mode is off). The listener
/// uses it in the handshake; certificates passed on by a trusted proxy go through the same one.
pub fn client_verifier(
    client_auth: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, PkiError> {
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
    // Revocation, for every certificate of the chain. `hard`: a CA of the chain without a
    // loaded CRL, or a CRL past its nextUpdate, refuses the client; `soft`: admits it (the
    // stale list still refuses what it revokes).
    if !client_auth.crls.is_empty() {
        b = b.with_crls(client_auth.crls.iter().map(|c| c.der.clone()));
        b = match client_auth.crl_policy {
            CrlPolicy::Hard => b.enforce_revocation_expiration(),
            CrlPolicy::Soft => b.allow_unknown_revocation_status(),
        };
    }
    Ok(Some(Arc::new(MetaClientVerifier {
        inner: b.build()?,
        allowed_cn: client_auth.allowed_cn.clone(),
        anchors: client_auth.anchors.iter().map(|a| a.der.clone()).collect(),
    })))
}

/// rustls' WebPKI client verifier plus Meta's identity rule.
///
/// The chain, signatures, validity dates and the clientAuth EKU are checked by the wrapped
/// `WebPkiClientVerifier`, unchanged. What this adds: the verified leaf must carry exactly one
/// subject CN and it must be in the allow-list (an empty list admits nobody), and that CN must
/// satisfy the name constraints of every CA above it ([`super::constraints`]: WebPKI applies
/// them to SANs only). The chain alone proves nothing about Meta: the same DigiCert
/// intermediate signed graph.facebook.com.
#[derive(Debug)]
struct MetaClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed_cn: Vec<String>,
    /// The trust anchors, for their name constraints.
    anchors: Vec<CertificateDer<'static>>,
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
        if !self.allowed_cn.contains(&cn) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(CnNotAllowed { cn })),
            )));
        }
        check_cn(&cn, end_entity, intermediates, &self.anchors).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(verified)
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
