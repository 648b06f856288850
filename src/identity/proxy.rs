//! What a trusted proxy says about the client: the `X-Forwarded-For` chain and the client's
//! identity in a subject header (a DN the proxy verified) or a certificate header (a chain
//! hubgate verifies itself). Only [`super::ClientPolicy`] calls these, and only for peers in
//! `trusted_proxies.cidrs`.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
use x509_cert::der::oid::db::rfc4519::CN;
use x509_cert::name::RdnSequence;

use super::verifier::CnNotAllowed;
use super::PeerIdentity;
use crate::config::IdentityHeader;

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

/// Whether `ip` is inside any of `cidrs` (IPv4-mapped IPv6 addresses count as IPv4).
pub fn contains(cidrs: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    cidrs.iter().any(|net| net.contains(&ip))
}

/// The `X-Forwarded-For` lines a trusted proxy sent (several lines are one list, RFC 9110
/// §5.3), and the client address they give: the right-most hop not itself trusted.
pub(super) struct ForwardedFor<'h> {
    lines: Vec<&'h str>,
}

impl<'h> ForwardedFor<'h> {
    pub(super) fn read(headers: &'h HeaderMap) -> ForwardedFor<'h> {
        ForwardedFor {
            lines: headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect(),
        }
    }

    /// The client's address: walking from the right, each hop is believed while the hop
    /// after it (starting with `peer`) is trusted. An unparseable hop ends what can be believed.
    pub(super) fn client(&self, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
        let mut client = peer;
        let hops = self.lines.iter().flat_map(|v| v.split(',')).map(str::trim);
        for hop in hops.collect::<Vec<_>>().into_iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !contains(trusted, ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }

    /// The value sent upstream: every hop received, then the peer that sent them.
    pub(super) fn extended(&self, peer: IpAddr) -> Option<HeaderValue> {
        if self.lines.is_empty() {
            return None;
        }
        HeaderValue::from_str(&format!("{}, {peer}", self.lines.join(", "))).ok()
    }
}

/// An `X-Forwarded-For` hop: `1.2.3.4`, `1.2.3.4:443`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// Reads the client identity a trusted proxy passed on (`Ok(None)`: the policy takes none).
pub(super) fn identity_from_headers(
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
                        if o.0.is::<CnNotAllowed>() =>
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
) -> Result<&'h HeaderValue, HeaderIdentityError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(HeaderIdentityError::Missing)?;
    if values.next().is_some() {
        return Err(HeaderIdentityError::Malformed);
    }
    Ok(first)
}

/// The single CN of a subject DN string (`CN=a,O=b`, RFC 4514/2253, parsed by x509-cert);
/// `None` if it has none or several, or does not parse.
///
/// RFC 2253 §4 lets implementations accept spaces around the `,` `+` and `=` separators, as
/// OpenSSL's one-line format writes them (`C = US, CN = x`); they are dropped before parsing.
fn single_cn(subject: &str) -> Option<String> {
    let dn = without_separator_spaces(subject);
    if !numeric_types_fit(&dn) {
        return None;
    }
    let dn = RdnSequence::from_str(&dn).ok()?;
    let mut cns =
        dn.0.iter()
            .flat_map(|rdn| rdn.0.iter())
            .filter(|atv| atv.oid == CN);
    let cn = cns.next()?;
    if cns.next().is_some() {
        return None;
    }
    let text = Utf8StringRef::try_from(&cn.value)
        .map(|s| s.as_str().to_owned())
        .or_else(|_| PrintableStringRef::try_from(&cn.value).map(|s| s.as_str().to_owned()));
    text.ok()
}

/// Drops unescaped spaces next to unescaped `,` `+` `=` (see [`single_cn`]).
/// Whether every attribute type written as an OID (`2.5.4.3=…`) has arcs of at most 9 digits.
/// The OID parser underneath (const-oid 0.9) adds digits to a `u32` unchecked: a longer arc
/// overflows, which panics where overflow checks are on. Found by the `identity_headers` fuzz
/// target; such a subject is malformed here.
fn numeric_types_fit(dn: &str) -> bool {
    let mut escaped = false;
    let mut start = 0;
    let mut in_value = false;
    let bytes = dn.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' => escaped = true,
            b'=' if !in_value => {
                let ty = &dn[start..i];
                if ty.starts_with(|c: char| c.is_ascii_digit())
                    && !ty.split('.').all(|arc| {
                        (1..=9).contains(&arc.len()) && arc.bytes().all(|d| d.is_ascii_digit())
                    })
                {
                    return false;
                }
                in_value = true;
            }
            b',' | b'+' => {
                start = i + 1;
                in_value = false;
            }
            _ => {}
        }
    }
    true
}

fn without_separator_spaces(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut escaped = false;
    let mut after_separator = true;
    for c in dn.chars() {
        if escaped {
            escaped = false;
            after_separator = false;
            out.push(c);
            continue;
        }
        match c {
            ' ' if after_separator => {}
            ',' | '+' | '=' => {
                while out.ends_with(' ') && !out.ends_with("\\ ") {
                    out.pop();
                }
                out.push(c);
                after_separator = true;
            }
            '\\' => {
                escaped = true;
                out.push(c);
            }
            _ => {
                after_separator = false;
                out.push(c);
            }
        }
    }
    out
}

/// The fuzz target's entry point (`fuzz/`): every parser here over headers a client chose —
/// `X-Forwarded-For` walked against a trusted network, a subject header and a certificate
/// header read without a verifier (parsing only). Results are checked for what must hold.
#[doc(hidden)]
pub fn fuzz_headers(headers: &HeaderMap) {
    let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("a network")];
    let peer = IpAddr::from([10, 0, 0, 1]);
    let xff = ForwardedFor::read(headers);
    let _ = xff.client(peer, &trusted);
    if let Some(v) = xff.extended(peer) {
        assert!(v.to_str().is_ok_and(|t| t.ends_with(&peer.to_string())));
    }
    let allowed = ["client.webhooks.fbclientcerts.com".to_owned()];
    let subject = IdentityHeader::Subject(http::HeaderName::from_static("x-client-subject"));
    if let Ok(Some(id)) = identity_from_headers(&subject, headers, None, &allowed) {
        assert!(
            allowed.contains(&id.cn),
            "only an allowed CN is an identity"
        );
    }
    let cert = IdentityHeader::Certificate(http::HeaderName::from_static("x-client-cert"));
    // Without a verifier a certificate header is never an identity.
    let r = identity_from_headers(&cert, headers, None, &allowed);
    assert!(
        !matches!(r, Ok(Some(_))),
        "a certificate header verified by nothing"
    );
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
    fn single_cn_reads_openssl_one_line_spacing_and_escapes() {
        assert_eq!(single_cn("C = US, O = Meta, CN = x").as_deref(), Some("x"));
        assert_eq!(single_cn("CN=a\\,b,O=M").as_deref(), Some("a,b"));
        assert_eq!(single_cn("CN=a+OU=b,O=M").as_deref(), Some("a"));
        assert_eq!(single_cn("not a dn"), None);
    }

    #[test]
    fn client_address_skips_trusted_hops() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 31.13.1.1, 10.1.1.1".parse().unwrap(),
        );
        let xff = ForwardedFor::read(&h);
        assert_eq!(
            xff.client("10.0.0.2".parse().unwrap(), &trusted),
            "31.13.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            xff.extended("10.0.0.2".parse().unwrap()).unwrap(),
            "6.6.6.6, 31.13.1.1, 10.1.1.1, 10.0.0.2"
        );
    }

    /// The `identity_headers` fuzz target's crash: an attribute type written as an OID with an
    /// arc too long for the OID parser. Malformed, not a panic.
    #[test]
    fn an_oid_attribute_type_with_a_huge_arc_is_malformed_not_a_panic() {
        let subject =
            "CN=clientms\\, cCINn=clientms\\, Inc.,44444444444444444444444444444L=Men Park,C=US";
        assert_eq!(single_cn(subject), None);
        assert_eq!(
            single_cn("2.5.4.3=client.webhooks.fbclientcerts.com").as_deref(),
            Some("client.webhooks.fbclientcerts.com")
        );
        assert_eq!(single_cn("1.2.3456789012=x,CN=a"), None);
        // An escaped `=` or `,` in a value is not a type.
        assert_eq!(single_cn("O=a\\,99999999999=b,CN=c").as_deref(), Some("c"));
    }
}
