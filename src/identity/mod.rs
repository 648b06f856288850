//! Who the client is, decided in one place.
//!
//! A [`ClientPolicy`] is built once per configuration generation. It owns every rule about the
//! client: the source allow-list, which peers are trusted proxies, the resumed-session expiry
//! rule, the identity a trusted proxy passes on (checked against the same CN allow-list and
//! the same [`verifier`] as a TLS client certificate), whether a route's certificate
//! requirement is met, and which identity headers are stripped from and set on what goes to
//! the backend. The rest of hubgate asks it questions and carries its answer, a
//! [`ClientContext`], through the request.
//!
//! Rules: identity and address headers from anyone not in `trusted_proxies.cidrs` are ignored
//! (and never forwarded); behind a trusted proxy with an allow-list the client must be known
//! and allowed; an identity header carrying a certificate is verified like a TLS client
//! certificate; an empty CN allow-list admits nobody.

pub mod constraints;
mod peer;
pub mod proxy;
pub mod verifier;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::CertificateDer;

pub use peer::PeerIdentity;
use proxy::ForwardedFor;
pub use proxy::HeaderIdentityError;

use crate::config::{Config, IdentityHeader, TrustedProxies, ALB_CERT, ALB_SUBJECT};

/// Envoy's client-identity header: set from the verified identity, never passed on as received.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The client-address chain: set by hubgate, never passed on as received.
pub const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client rules of one configuration generation.
pub struct ClientPolicy {
    trusted: TrustedProxies,
    allow_sources: Option<Vec<ipnet::IpNet>>,
    allowed_cn: Vec<String>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address (direct, or reported by a trusted proxy) is not in
    /// `server.allow_sources`, or a trusted proxy reported none.
    SourceNotAllowed,
    /// A trusted proxy's identity header was malformed or did not pass verification.
    IdentityHeader(HeaderIdentityError),
    /// The route needs a verified client certificate and the request has none.
    CertificateRequired,
}

/// A TLS session resumed after the client certificate it was made with expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionExpired;

/// Where a request's verified identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// No verified identity.
    None,
    /// The TLS client certificate of this connection.
    Tls,
    /// A trusted proxy's identity header.
    Proxy,
}

/// What one connection knows about its peer, fixed at the handshake.
pub struct Peer {
    /// The TCP peer, or the client a PROXY protocol header named.
    pub addr: SocketAddr,
    /// The peer's address as an `X-Forwarded-For` value.
    addr_header: HeaderValue,
    /// From the peer's verified client certificate.
    pub tls: Option<Arc<PeerIdentity>>,
    /// The peer is in `trusted_proxies.cidrs`.
    trusted_proxy: bool,
}

/// Who one request's client is.
pub struct ClientContext {
    /// The TCP (or PROXY protocol) peer.
    pub peer: SocketAddr,
    /// The client's address, after trusted proxies.
    pub address: IpAddr,
    /// The verified identity, from TLS or a trusted proxy (see `source`).
    pub identity: Option<Arc<PeerIdentity>>,
    pub source: IdentitySource,
    /// The `X-Forwarded-For` value for the backend.
    forwarded_for: HeaderValue,
    /// The peer is a trusted proxy.
    via_proxy: bool,
    /// The trusted proxies' configured identity header, stripped like the well-known ones.
    configured_header: Option<HeaderName>,
}

impl ClientPolicy {
    /// The policy of `config`, with the generation's one client-certificate verifier.
    pub fn new(config: &Config, verifier: Option<Arc<dyn ClientCertVerifier>>) -> ClientPolicy {
        ClientPolicy {
            trusted: config.trusted_proxies.clone(),
            allow_sources: config.server.allow_sources.clone(),
            allowed_cn: config.client_auth.allowed_cn.clone(),
            verifier,
        }
    }

    /// The verifier the TLS listener uses (`None` when client auth is off).
    pub fn verifier(&self) -> Option<&Arc<dyn ClientCertVerifier>> {
        self.verifier.as_ref()
    }

    /// Whether `ip` is a trusted proxy (PROXY protocol headers are accepted only from those).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        proxy::contains(&self.trusted.cidrs, ip)
    }

    fn source_allowed(&self, ip: IpAddr) -> bool {
        self.allow_sources
            .as_ref()
            .is_none_or(|nets| proxy::contains(nets, ip))
    }

    /// Before TLS: a direct client must be in the source allow-list. A trusted proxy is let
    /// through; the allow-list applies to the client it reports, request by request.
    pub fn admit_connection(&self, peer: IpAddr) -> Result<(), Refusal> {
        if self.trusts(peer) || self.source_allowed(peer) {
            Ok(())
        } else {
            Err(Refusal::SourceNotAllowed)
        }
    }

    /// After the handshake: the connection's peer and its verified certificate. A full
    /// handshake checked the certificate's dates; a resumed session did not, and must not
    /// outlive the certificate it was made with.
    pub fn connection(
        &self,
        addr: SocketAddr,
        leaf: Option<&CertificateDer<'_>>,
    ) -> Result<Peer, SessionExpired> {
        let tls = leaf.and_then(|der| PeerIdentity::from_leaf(der));
        if tls.as_ref().is_some_and(PeerIdentity::expired) {
            return Err(SessionExpired);
        }
        Ok(Peer {
            addr,
            addr_header: HeaderValue::from_str(&addr.ip().to_string())
                .expect("an IP address is a valid header value"),
            tls: tls.map(Arc::new),
            trusted_proxy: self.trusts(addr.ip()),
        })
    }

    /// The request's client as far as addresses go: the peer, or, behind a trusted proxy with
    /// `forwarded_for`, the client its `X-Forwarded-For` names. The identity is the TLS one
    /// until [`ClientPolicy::authenticate`] says otherwise.
    pub fn client(&self, peer: &Peer, headers: &HeaderMap) -> ClientContext {
        let mut ctx = ClientContext {
            peer: peer.addr,
            address: peer.addr.ip(),
            identity: peer.tls.clone(),
            source: match peer.tls {
                Some(_) => IdentitySource::Tls,
                None => IdentitySource::None,
            },
            forwarded_for: peer.addr_header.clone(),
            via_proxy: peer.trusted_proxy,
            configured_header: match &self.trusted.identity {
                IdentityHeader::None => None,
                IdentityHeader::Subject(h) | IdentityHeader::Certificate(h) => Some(h.clone()),
            },
        };
        if peer.trusted_proxy && self.trusted.forwarded_for {
            let xff = ForwardedFor::read(headers);
            ctx.address = xff.client(peer.addr.ip(), &self.trusted.cidrs);
            if let Some(v) = xff.extended(peer.addr.ip()) {
                ctx.forwarded_for = v;
            }
        }
        ctx
    }

    /// Admits the request's client for a route: behind a trusted proxy, the reported client
    /// must pass the allow-list and the proxy's identity header (if the policy reads one)
    /// must verify; then the route's certificate requirement must be met.
    pub fn authenticate(
        &self,
        ctx: &mut ClientContext,
        headers: &HeaderMap,
        certificate_required: bool,
    ) -> Result<(), Refusal> {
        if ctx.via_proxy {
            // No usable X-Forwarded-For hop (missing, unparseable, forwarded_for off) leaves
            // the client unknown: with an allow-list, that is a refusal.
            if self.allow_sources.is_some()
                && (ctx.address == ctx.peer.ip() || !self.source_allowed(ctx.address))
            {
                return Err(Refusal::SourceNotAllowed);
            }
            let verifier = self.verifier.as_ref();
            match proxy::identity_from_headers(
                &self.trusted.identity,
                headers,
                verifier,
                &self.allowed_cn,
            ) {
                Ok(Some(id)) => {
                    ctx.identity = Some(Arc::new(id));
                    ctx.source = IdentitySource::Proxy;
                }
                Ok(None) | Err(HeaderIdentityError::Missing) => {}
                Err(e) => return Err(Refusal::IdentityHeader(e)),
            }
        }
        if certificate_required && ctx.identity.is_none() {
            return Err(Refusal::CertificateRequired);
        }
        Ok(())
    }
}

impl ClientContext {
    /// The verified identity's CN, for logs.
    pub fn cn(&self) -> Option<&str> {
        self.identity.as_deref().map(|i| i.cn.as_str())
    }

    /// Headers that carry identity or client addresses: never passed on as received (the
    /// backend gets hubgate's `X-Forwarded-For` and `X-Forwarded-Client-Cert` instead).
    pub fn is_identity_header(&self, name: &HeaderName) -> bool {
        let n = name.as_str();
        name == XFCC
            || name == XFF
            || name == ALB_SUBJECT
            || name == ALB_CERT
            || n.starts_with("x-amzn-mtls-")
            || n.starts_with("x-ssl-client-")
            || matches!(
                n,
                "x-real-ip"
                    | "true-client-ip"
                    | "cf-connecting-ip"
                    | "x-client-ip"
                    | "x-cluster-client-ip"
            )
            || self.configured_header.as_ref() == Some(name)
    }

    /// Sets the identity headers the backend gets: `X-Forwarded-For` (the chain, ending in
    /// the peer) and, with a verified identity, `X-Forwarded-Client-Cert`.
    pub fn set_identity_headers(&self, out: &mut HeaderMap) {
        out.insert(XFF, self.forwarded_for.clone());
        if let Some(v) = self.identity.as_deref().and_then(PeerIdentity::xfcc) {
            out.insert(XFCC, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(forwarded_for: bool) -> ClientPolicy {
        ClientPolicy {
            trusted: TrustedProxies {
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                forwarded_for,
                identity: IdentityHeader::None,
            },
            allow_sources: None,
            allowed_cn: vec![],
            verifier: None,
        }
    }

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", value.parse().unwrap());
        h
    }

    #[test]
    fn only_a_trusted_peer_reports_the_client_address() {
        let p = policy(true);
        let h = xff("6.6.6.6, 31.13.1.1, 10.1.1.1");
        let proxy = p.connection("10.0.0.2:1".parse().unwrap(), None).unwrap();
        assert_eq!(p.client(&proxy, &h).address.to_string(), "31.13.1.1");
        let direct = p.connection("8.8.8.8:1".parse().unwrap(), None).unwrap();
        let ctx = p.client(&direct, &h);
        assert_eq!(ctx.address.to_string(), "8.8.8.8");
        let mut out = HeaderMap::new();
        ctx.set_identity_headers(&mut out);
        assert_eq!(out.get(XFF).unwrap(), "8.8.8.8");
    }

    #[test]
    fn forwarded_for_off_keeps_the_peer_address() {
        let p = policy(false);
        let proxy = p.connection("10.0.0.2:1".parse().unwrap(), None).unwrap();
        let ctx = p.client(&proxy, &xff("31.13.1.1"));
        assert_eq!(ctx.address.to_string(), "10.0.0.2");
    }
}
