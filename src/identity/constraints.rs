//! Name constraints applied to the identity hubgate actually uses: the leaf's CN.
//!
//! rustls-webpki applies a CA's name constraints to the leaf's subjectAltNames only. hubgate
//! takes the client's identity from the CN (Meta's certificate is known by it), so a CA under a
//! configured anchor whose constraints permit only `example.com` could otherwise issue a leaf
//! with `CN=client.webhooks.fbclientcerts.com` and no SAN and be admitted (OpenSSL refuses the
//! same chain: "permitted subtree violation"). Here the CN is treated as a DNS name for the
//! dNSName constraints of every CA above the leaf, after WebPKI verified the chain:
//!
//! - permitted subtrees: when a CA lists any dNSName, the CN must fall under one of them;
//! - excluded subtrees: the CN must fall under none;
//! - a CN that is not a DNS name fails any CA that constrains DNS names.
//!
//! Matching follows RFC 5280 §4.2.1.10: `example.com` covers itself and every name below it,
//! `.example.com` only the names below it, case-insensitively. The CAs are those whose subject
//! is the issuer of the leaf, then of each of them, among the presented intermediates and the
//! configured anchors; where two certificates share a name, both are held to (stricter, never
//! looser).

use std::collections::HashSet;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The CN falls outside what a CA above it may issue.
#[derive(Debug, thiserror::Error)]
#[error("client certificate CN {cn:?} violates the name constraints of {ca:?}")]
pub struct CnOutsideNameConstraints {
    pub cn: String,
    /// The constraining CA's subject.
    pub ca: String,
}

/// Checks `cn` against the dNSName constraints of every CA above `leaf`.
pub(crate) fn check_cn(
    cn: &str,
    leaf: &[u8],
    intermediates: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
) -> Result<(), CnOutsideNameConstraints> {
    let Ok((_, leaf)) = X509Certificate::from_der(leaf) else {
        // WebPKI parsed it already; unreachable in practice, refused all the same.
        return Err(violation(cn, "an unparseable certificate"));
    };
    let cas: Vec<X509Certificate<'_>> = intermediates
        .iter()
        .chain(anchors)
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect();
    let mut wanted = vec![leaf.issuer().as_raw().to_vec()];
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    while let Some(issuer) = wanted.pop() {
        if !seen.insert(issuer.clone()) {
            continue;
        }
        for ca in cas
            .iter()
            .filter(|c| c.subject().as_raw() == issuer.as_slice())
        {
            check_one(cn, ca)?;
            // A self-signed anchor is its own issuer: `seen` ends the walk there.
            wanted.push(ca.issuer().as_raw().to_vec());
        }
    }
    Ok(())
}

fn check_one(cn: &str, ca: &X509Certificate<'_>) -> Result<(), CnOutsideNameConstraints> {
    let Ok(Some(ext)) = ca.name_constraints() else {
        return Ok(());
    };
    let nc = ext.value;
    let dns = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| -> Vec<String> {
        subtrees
            .iter()
            .flatten()
            .filter_map(|s| match &s.base {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect()
    };
    let permitted = dns(&nc.permitted_subtrees);
    let excluded = dns(&nc.excluded_subtrees);
    if permitted.is_empty() && excluded.is_empty() {
        return Ok(());
    }
    let subject = || ca.subject().to_string();
    let Some(name) = dns_name(cn) else {
        return Err(violation(cn, &subject()));
    };
    if !permitted.is_empty() && !permitted.iter().any(|c| covers(c, &name)) {
        return Err(violation(cn, &subject()));
    }
    if excluded.iter().any(|c| covers(c, &name)) {
        return Err(violation(cn, &subject()));
    }
    Ok(())
}

fn violation(cn: &str, ca: &str) -> CnOutsideNameConstraints {
    CnOutsideNameConstraints {
        cn: cn.to_owned(),
        ca: ca.to_owned(),
    }
}

/// The CN as a DNS name (lower case, no trailing dot), if it is one: labels of letters, digits
/// and hyphens (a leading `*` label for wildcards), 1 to 63 bytes each, 253 in all.
fn dns_name(cn: &str) -> Option<String> {
    let name = cn.strip_suffix('.').unwrap_or(cn).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let ok = name.split('.').enumerate().all(|(i, label)| {
        (i == 0 && label == "*")
            || (!label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    });
    ok.then_some(name)
}

/// Whether the dNSName constraint `constraint` covers `name` (RFC 5280 §4.2.1.10).
fn covers(constraint: &str, name: &str) -> bool {
    let c = constraint
        .strip_suffix('.')
        .unwrap_or(constraint)
        .to_ascii_lowercase();
    if c.is_empty() {
        return true;
    }
    match c.strip_prefix('.') {
        Some(parent) => name.ends_with(&format!(".{parent}")),
        None => name == c || name.ends_with(&format!(".{c}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_constraints_cover_the_name_and_below_and_a_dot_only_below() {
        let meta = "client.webhooks.fbclientcerts.com";
        assert!(covers("fbclientcerts.com", meta));
        assert!(covers("FBClientCerts.com.", meta));
        assert!(covers(".fbclientcerts.com", meta));
        assert!(covers(meta, meta));
        assert!(!covers(".client.webhooks.fbclientcerts.com", meta));
        assert!(!covers("clientcerts.com", meta), "whole labels only");
        assert!(!covers("example.com", meta));
        assert!(covers("", meta));
    }

    #[test]
    fn only_dns_names_are_dns_names() {
        assert_eq!(
            dns_name("Client.Example.COM.").as_deref(),
            Some("client.example.com")
        );
        assert!(dns_name("Meta Platforms, Inc.").is_none());
        assert!(dns_name("a..b").is_none());
        assert!(dns_name("-a.b").is_none());
        assert!(dns_name(&"a".repeat(64)).is_none());
        assert_eq!(dns_name("*.example.com").as_deref(), Some("*.example.com"));
    }
}
