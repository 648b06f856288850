//! `X-Hub-Signature-256` (and, where a route opts in, the legacy `X-Hub-Signature`) over the raw
//! body bytes. Signing and verifying share [`Signer`], so `hubgate sign` produces exactly what
//! the gate accepts.
//!
//! Decisions: hex digits are accepted in either case (they decode to the same MAC; Meta sends
//! lower case); a request with several copies of the header is rejected; when the SHA-256 header
//! is present it alone decides, so a wrong SHA-256 signature never falls back to SHA-1.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha1::Sha1;
use sha2::Sha256;

use crate::secret::Secret;

pub const SHA256_HEADER: &str = "x-hub-signature-256";
pub const SHA1_HEADER: &str = "x-hub-signature";

/// Why a signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No signature header (or only the legacy one on a route that does not accept it).
    Missing,
    /// The header appears more than once.
    Duplicate,
    /// The value is empty.
    Empty,
    /// The value lacks the `sha256=` (or `sha1=`) prefix.
    NoPrefix,
    /// The digest is not hexadecimal.
    NotHex,
    /// The digest has the wrong number of bytes.
    WrongLength,
    /// Well-formed, but no configured secret produces it.
    Mismatch,
}

impl SignatureError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Duplicate => "duplicate_header",
            Self::Empty => "empty",
            Self::NoPrefix => "no_prefix",
            Self::NotHex => "not_hex",
            Self::WrongLength => "wrong_length",
            Self::Mismatch => "mismatch",
        }
    }
}

/// Which header and which secret matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureMatch {
    pub algorithm: Algorithm,
    /// Index into the route's `app_secrets`: tells which secret of a rotation is in use.
    pub secret_index: usize,
    /// The verified MAC (a SHA-1 MAC is zero-padded): identifies the body under that secret
    /// without hashing it again, which is what in-memory de-duplication keys on.
    pub mac: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha1,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha1 => "sha1",
        }
    }
}

/// The keyed HMAC states of one route's secrets, computed once and cloned per request.
#[derive(Clone)]
pub struct Signer {
    sha256: Vec<Hmac<Sha256>>,
    sha1: Option<Vec<Hmac<Sha1>>>,
}

impl Signer {
    /// `legacy_sha1` enables the `X-Hub-Signature: sha1=…` header.
    pub fn new(secrets: &[Secret], legacy_sha1: bool) -> Signer {
        let key256 = |s: &Secret| {
            Hmac::<Sha256>::new_from_slice(s.expose()).expect("HMAC takes any key length")
        };
        let key1 = |s: &Secret| {
            Hmac::<Sha1>::new_from_slice(s.expose()).expect("HMAC takes any key length")
        };
        Signer {
            sha256: secrets.iter().map(key256).collect(),
            sha1: legacy_sha1.then(|| secrets.iter().map(key1).collect()),
        }
    }

    /// The `X-Hub-Signature-256` value for `body` under the first secret.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.sha256[0].clone();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Checks the request's signature header against every secret, in constant time per secret.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<SignatureMatch, SignatureError> {
        if let Some(value) = single(headers, SHA256_HEADER)? {
            let digest = parse(value, "sha256=", 32)?;
            return check(&self.sha256, &digest[..32], body, Algorithm::Sha256);
        }
        if let Some(macs) = &self.sha1 {
            if let Some(value) = single(headers, SHA1_HEADER)? {
                let digest = parse(value, "sha1=", 20)?;
                return check(macs, &digest[..20], body, Algorithm::Sha1);
            }
        }
        Err(SignatureError::Missing)
    }
}

fn check<M: Mac + Clone>(
    macs: &[M],
    digest: &[u8],
    body: &[u8],
    algorithm: Algorithm,
) -> Result<SignatureMatch, SignatureError> {
    for (secret_index, keyed) in macs.iter().enumerate() {
        let mut mac = keyed.clone();
        mac.update(body);
        // `verify_slice` compares in constant time.
        if mac.verify_slice(digest).is_ok() {
            let mut verified = [0u8; 32];
            verified[..digest.len()].copy_from_slice(digest);
            return Ok(SignatureMatch {
                algorithm,
                secret_index,
                mac: verified,
            });
        }
    }
    Err(SignatureError::Mismatch)
}

fn single<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h [u8]>, SignatureError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(SignatureError::Duplicate);
    }
    Ok(Some(first.as_bytes()))
}

/// Decodes `<prefix><hex>` into the first `len` bytes of a fixed buffer (no allocation).
fn parse(value: &[u8], prefix: &str, len: usize) -> Result<[u8; 32], SignatureError> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(SignatureError::Empty);
    }
    let Some(hex_part) = value.strip_prefix(prefix.as_bytes()) else {
        return Err(SignatureError::NoPrefix);
    };
    if hex_part.len() != len * 2 {
        return Err(if hex_part.iter().all(u8::is_ascii_hexdigit) {
            SignatureError::WrongLength
        } else {
            SignatureError::NotHex
        });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out[..len]).map_err(|_| SignatureError::NotHex)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
        h
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256("It's a Secret to Everybody", "Hello, World!") from GitHub's webhook docs.
        let s = Signer::new(&[Secret::new("It's a Secret to Everybody")], false);
        assert_eq!(
            s.sign(b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn rotated_secret_reports_index() {
        let new = Signer::new(&[Secret::new("new")], false);
        let both = Signer::new(&[Secret::new("old"), Secret::new("new")], false);
        let h = headers(SHA256_HEADER, &new.sign(b"x"));
        assert_eq!(both.verify(&h, b"x").unwrap().secret_index, 1);
    }

    #[test]
    fn malformed_values() {
        let s = Signer::new(&[Secret::new("k")], false);
        let cases = [
            ("", SignatureError::Empty),
            ("abc", SignatureError::NoPrefix),
            ("sha256=abc", SignatureError::WrongLength),
            (
                &format!("sha256={}", "zz".repeat(32)),
                SignatureError::NotHex,
            ),
            (
                &format!("sha256={}", "00".repeat(32)),
                SignatureError::Mismatch,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(
                s.verify(&headers(SHA256_HEADER, v), b"x"),
                Err(want),
                "{v:?}"
            );
        }
    }

    #[test]
    fn sha1_only_when_enabled() {
        let secret = [Secret::new("k")];
        let mut mac = Hmac::<Sha1>::new_from_slice(b"k").unwrap();
        mac.update(b"body");
        let h = headers(
            SHA1_HEADER,
            &format!("sha1={}", hex::encode(mac.finalize().into_bytes())),
        );
        assert_eq!(
            Signer::new(&secret, false).verify(&h, b"body"),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            Signer::new(&secret, true)
                .verify(&h, b"body")
                .unwrap()
                .algorithm,
            Algorithm::Sha1
        );
    }

    /// The accepted spellings (the README's table), the same for SHA-256 and the legacy SHA-1.
    #[test]
    fn spellings_are_judged_alike_for_sha256_and_sha1() {
        let body = b"{}";
        let secret = Secret::new("k");
        let s = Signer::new(std::slice::from_ref(&secret), true);
        let mac256 = {
            let mut m = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
            m.update(body);
            hex::encode(m.finalize().into_bytes())
        };
        let mac1 = {
            let mut m = Hmac::<Sha1>::new_from_slice(b"k").unwrap();
            m.update(body);
            hex::encode(m.finalize().into_bytes())
        };
        for (name, prefix, mac) in [
            (SHA256_HEADER, "sha256=", &mac256),
            (SHA1_HEADER, "sha1=", &mac1),
        ] {
            let upper_prefix = prefix.to_uppercase();
            let cases: [(String, Result<(), SignatureError>); 7] = [
                (format!("{prefix}{mac}"), Ok(())),
                (format!("  {prefix}{mac}\t"), Ok(())),
                (format!("{prefix}{}", mac.to_uppercase()), Ok(())),
                (
                    format!("{upper_prefix}{mac}"),
                    Err(SignatureError::NoPrefix),
                ),
                (format!("{prefix} {mac}"), Err(SignatureError::NotHex)),
                (format!("{prefix}{mac}00"), Err(SignatureError::WrongLength)),
                (mac.clone(), Err(SignatureError::NoPrefix)),
            ];
            for (value, want) in cases {
                let got = s.verify(&headers(name, &value), body).map(|_| ());
                assert_eq!(got, want, "{name}: {value:?}");
            }
        }
    }
}
