//! Who the client really is when hubgate sits behind a load balancer or CDN: the PROXY protocol
//! (v1/v2) on the listener, `X-Forwarded-For` and client-identity headers believed only from
//! `[trusted_proxies]`, and the optional source-address allow-list.
//!
//! Rules: identity and address headers from anyone not in `trusted_proxies.cidrs` are ignored
//! (and never forwarded); a PROXY header is required on every connection when enabled and is
//! accepted only from a trusted address; an identity header carrying a certificate is verified
//! against the same trust anchors and CN allow-list as a TLS client certificate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;

use crate::tls::PeerIdentity;

/// AWS ALB, mTLS verify mode: the verified leaf's subject.
pub const ALB_SUBJECT: HeaderName = HeaderName::from_static("x-amzn-mtls-clientcert-subject");
/// AWS ALB, mTLS passthrough mode: the client's chain, URL-encoded PEM.
pub const ALB_CERT: HeaderName = HeaderName::from_static("x-amzn-mtls-clientcert");

/// How a trusted proxy passes on the client's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityHeader {
    /// The proxy passes no identity.
    None,
    /// A subject DN (`CN=…,O=…`) the proxy verified; hubgate checks the CN.
    Subject(HeaderName),
    /// The client's certificate chain, URL-encoded PEM; hubgate verifies it itself.
    Certificate(HeaderName),
}

/// The `[trusted_proxies]` policy.
#[derive(Clone, Debug)]
pub struct TrustedProxies {
    pub cidrs: Vec<IpNet>,
    /// Take the client address from `X-Forwarded-For` sent by a trusted proxy.
    pub forwarded_for: bool,
    pub identity: IdentityHeader,
}

impl TrustedProxies {
    pub fn none() -> TrustedProxies {
        TrustedProxies {
            cidrs: vec![],
            forwarded_for: false,
            identity: IdentityHeader::None,
        }
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        contains(&self.cidrs, ip)
    }

    /// Headers that carry identity or client addresses; never forwarded as received (the
    /// backend gets hubgate's `X-Forwarded-For` and `X-Forwarded-Client-Cert` instead).
    pub fn is_identity_header(&self, name: &HeaderName) -> bool {
        let n = name.as_str();
        name == ALB_SUBJECT
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
            || match &self.identity {
                IdentityHeader::None => false,
                IdentityHeader::Subject(h) | IdentityHeader::Certificate(h) => h == name,
            }
    }

    /// The client's address: the peer itself unless the peer is a trusted proxy that sent
    /// `X-Forwarded-For`, in which case the right-most address not itself trusted.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.forwarded_for || !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.trusts(ip) {
                        break;
                    }
                }
                // An unparseable hop ends what can be believed.
                None => break,
            }
        }
        client
    }
}

/// An `X-Forwarded-For` hop: `1.2.3.4`, `1.2.3.4:443`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// Whether `ip` is inside any of `cidrs` (IPv4-mapped IPv6 addresses count as IPv4).
pub fn contains(cidrs: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    cidrs.iter().any(|net| net.contains(&ip))
}

/// Why an identity header was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderIdentityError {
    Missing,
    Malformed,
    Rejected,
    CnNotAllowed,
}

impl HeaderIdentityError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "identity_header_missing",
            Self::Malformed => "identity_header_malformed",
            Self::Rejected => "identity_header_cert_rejected",
            Self::CnNotAllowed => "identity_header_cn_not_allowed",
        }
    }
}

/// Reads the client identity a trusted proxy passed on.
pub fn identity_from_headers(
    source: &IdentityHeader,
    headers: &HeaderMap,
    verifier: Option<&Arc<dyn ClientCertVerifier>>,
    allowed_cn: &[String],
) -> Result<Option<PeerIdentity>, HeaderIdentityError> {
    match source {
        IdentityHeader::None => Ok(None),
        IdentityHeader::Subject(name) => {
            let value = single(headers, name)?;
            let subject = value.to_str().map_err(|_| HeaderIdentityError::Malformed)?;
            let cn = single_cn(subject).ok_or(HeaderIdentityError::Malformed)?;
            if !allowed_cn.contains(&cn) {
                return Err(HeaderIdentityError::CnNotAllowed);
            }
            Ok(Some(PeerIdentity::new(cn, subject.to_owned(), None)))
        }
        IdentityHeader::Certificate(name) => {
            let value = single(headers, name)?;
            let pem: Vec<u8> = percent_encoding::percent_decode(value.as_bytes()).collect();
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| HeaderIdentityError::Malformed)?;
            let Some((leaf, intermediates)) = chain.split_first() else {
                return Err(HeaderIdentityError::Malformed);
            };
            // The same verifier as the TLS listener's: chain, dates, EKU, and the CN allow-list.
            let verifier = verifier.ok_or(HeaderIdentityError::Rejected)?;
            verifier
                .verify_client_cert(leaf, intermediates, UnixTime::now())
                .map_err(|e| match e {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
                        if o.0.is::<crate::tls::CnNotAllowed>() =>
                    {
                        HeaderIdentityError::CnNotAllowed
                    }
                    _ => HeaderIdentityError::Rejected,
                })?;
            PeerIdentity::from_leaf(leaf)
                .map(Some)
                .ok_or(HeaderIdentityError::Malformed)
        }
    }
}

/// The header's one value: several copies mean a client's copy got past the proxy.
fn single<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<&'h http::HeaderValue, HeaderIdentityError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(HeaderIdentityError::Missing)?;
    if values.next().is_some() {
        return Err(HeaderIdentityError::Malformed);
    }
    Ok(first)
}

/// The single `CN=` of an RFC 2253/4514 subject string (`CN=a,O=b`); `None` if none or several.
fn single_cn(subject: &str) -> Option<String> {
    let mut cns = Vec::new();
    let mut part = String::new();
    let mut escaped = false;
    let mut parts = Vec::new();
    for c in subject.chars() {
        match (escaped, c) {
            (true, _) => {
                part.push(c);
                escaped = false;
            }
            (false, '\\') => escaped = true,
            (false, ',' | '+') => parts.push(std::mem::take(&mut part)),
            (false, _) => part.push(c),
        }
    }
    parts.push(part);
    for p in parts {
        if let Some((k, v)) = p.split_once('=') {
            if k.trim().eq_ignore_ascii_case("CN") {
                cns.push(v.trim().to_owned());
            }
        }
    }
    (cns.len() == 1).then(|| cns.remove(0))
}

/// Why a PROXY protocol header was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection from an untrusted address {0} on a PROXY protocol listener")]
    Untrusted(IpAddr),
    #[error("no complete PROXY header within the deadline")]
    Timeout,
    #[error("invalid PROXY header")]
    Invalid,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Longest PROXY header accepted: v1 is at most 107 bytes; v2 with modest TLVs fits easily.
const MAX_PROXY_HEADER: usize = 1024;

/// Reads a PROXY protocol v1 or v2 header from the start of `stream`, consuming exactly its
/// bytes, and returns the client address it names (`None` for LOCAL/UNKNOWN: use the peer's).
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
    deadline: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if !trusted.trusts(peer.ip()) {
        return Err(ProxyHeaderError::Untrusted(peer.ip()));
    }
    let read = async {
        let mut buf = vec![0u8; MAX_PROXY_HEADER];
        loop {
            // Peek so that no byte of the TLS handshake that follows is consumed.
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(ProxyHeaderError::Invalid);
            }
            let parsed = HeaderResult::parse(&buf[..n]);
            if parsed.is_incomplete() {
                if n == MAX_PROXY_HEADER {
                    return Err(ProxyHeaderError::Invalid);
                }
                stream.readable().await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let (len, addr) = match parsed {
                HeaderResult::V1(Ok(h)) => {
                    let addr = match h.addresses {
                        ppp::v1::Addresses::Tcp4(a) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        ppp::v1::Addresses::Tcp6(a) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        ppp::v1::Addresses::Unknown => None,
                    };
                    (h.header.len(), addr)
                }
                HeaderResult::V2(Ok(h)) => {
                    let addr = match h.addresses {
                        ppp::v2::Addresses::IPv4(a) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        ppp::v2::Addresses::IPv6(a) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        _ => None,
                    };
                    (h.len(), addr)
                }
                _ => return Err(ProxyHeaderError::Invalid),
            };
            let mut consumed = vec![0u8; len];
            tokio::io::AsyncReadExt::read_exact(stream, &mut consumed).await?;
            return Ok(addr);
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_cn_parses_rfc2253() {
        assert_eq!(
            single_cn("CN=client.webhooks.fbclientcerts.com,O=Meta,C=US").as_deref(),
            Some("client.webhooks.fbclientcerts.com")
        );
        assert_eq!(
            single_cn("C=US, O=Meta\\, Inc., CN=x").as_deref(),
            Some("x")
        );
        assert_eq!(single_cn("O=Meta"), None);
        assert_eq!(single_cn("CN=a,CN=b"), None);
    }

    #[test]
    fn client_address_skips_trusted_hops() {
        let t = TrustedProxies {
            cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            forwarded_for: true,
            identity: IdentityHeader::None,
        };
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 31.13.1.1, 10.1.1.1".parse().unwrap(),
        );
        assert_eq!(
            t.client_address("10.0.0.2".parse().unwrap(), &h),
            "31.13.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            t.client_address("8.8.8.8".parse().unwrap(), &h),
            "8.8.8.8".parse::<IpAddr>().unwrap()
        );
    }
}
