//! What `check`, `run` and a reload say about a configuration that is valid but suspicious:
//! an expired or self-signed server certificate, no allowed CN, unusable trust anchors.

// The certificate helpers (moving to `crate::pki`).
use crate::pki::{anchor_warnings, CertInfo};

use super::{ClientAuthMode, Config};

impl Config {
    /// The warnings about this configuration at `now_unix` (seconds since the Unix epoch,
    /// [`crate::unix_now`] outside tests), one sentence each.
    pub fn warnings(&self, now_unix: i64) -> Vec<String> {
        let mut w = Vec::new();
        let cert = self.server.cert_path.display();
        if let Some(info) = self.server.cert_chain.first().and_then(CertInfo::parse) {
            if info.not_after <= now_unix {
                w.push(format!(
                    "server.cert {cert} expired on {}",
                    info.not_after_text
                ));
            }
            if info.self_signed {
                w.push(format!(
                    "server.cert {cert} is self-signed: Meta refuses self-signed server certificates"
                ));
            }
        }
        if self.client_auth.mode != ClientAuthMode::Off {
            if self.client_auth.allowed_cn.is_empty() {
                w.push("client_auth.allowed_cn is empty: no client certificate is admitted".into());
            }
            w.extend(anchor_warnings(&self.client_auth.anchors, now_unix));
            let policy = self.client_auth.crl_policy;
            for c in &self.client_auth.crls {
                match c.next_update {
                    Some(next) if next <= now_unix => w.push(format!(
                        "client_auth.crls {} ({}) is past its nextUpdate: {}",
                        c.path.display(),
                        c.issuer,
                        match policy {
                            super::CrlPolicy::Hard => "crl_policy = \"hard\" refuses every chain of that CA until a fresh list is loaded (SIGHUP)",
                            super::CrlPolicy::Soft => "crl_policy = \"soft\" admits on a stale list",
                        }
                    )),
                    Some(next) if next - now_unix < 24 * 3600 => w.push(format!(
                        "client_auth.crls {} ({}) goes stale within a day: load a fresh list",
                        c.path.display(),
                        c.issuer
                    )),
                    _ => {}
                }
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    use super::*;

    /// 2025-06-15: inside every test certificate's validity.
    const NOW: i64 = 1_750_000_000;
    /// 2031-01-01: after the short-lived certificates' expiry.
    const LATER: i64 = 1_924_992_000;

    fn params(cn: &str, until: i32) -> CertificateParams {
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(until, 1, 1);
        p
    }

    /// Writes a CA (`root.pem`, valid until `root_until`) and a server certificate
    /// (`server.pem`/`server.key`, valid until `server_until`, self-signed when asked).
    fn pki(dir: &Path, root_until: i32, server_until: i32, self_signed: bool) {
        let mut ca = params("warnings test root", root_until);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let server = if self_signed {
            params("self", server_until).self_signed(&key).unwrap()
        } else {
            params("server", server_until)
                .signed_by(&key, &root)
                .unwrap()
        };
        std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    }

    fn config(dir: &Path, client_auth: &str) -> Config {
        let toml = format!(
            "[server]\ncert = \"server.pem\"\nkey = \"server.key\"\n\
             [client_auth]\n{client_auth}\n\
             [[route]]\npath = \"/webhook\"\nverify_token = \"t\"\napp_secrets = [\"s\"]\n\
             upstream = \"http://127.0.0.1:9/\"\n"
        );
        Config::from_toml_with_env(&toml, "test.toml", dir, &|_| None).expect("valid config")
    }

    #[test]
    fn a_sound_config_has_no_warnings() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), 2090, 2090, false);
        let c = config(dir.path(), "roots = \"root.pem\"");
        assert_eq!(c.warnings(NOW), Vec::<String>::new());
    }

    #[test]
    fn an_expired_server_certificate_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), 2090, 2030, false);
        let c = config(dir.path(), "roots = \"root.pem\"");
        assert_eq!(c.warnings(NOW), Vec::<String>::new());
        let w = c.warnings(LATER);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("server.cert "), "{w:?}");
        assert!(w[0].contains("server.pem expired on "), "{w:?}");
    }

    #[test]
    fn a_self_signed_server_certificate_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), 2090, 2090, true);
        let c = config(dir.path(), "roots = \"root.pem\"");
        let w = c.warnings(NOW);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].ends_with("is self-signed: Meta refuses self-signed server certificates"),
            "{w:?}"
        );
    }

    #[test]
    fn an_empty_allowed_cn_is_reported_unless_client_auth_is_off() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), 2090, 2090, false);
        let c = config(dir.path(), "roots = \"root.pem\"\nallowed_cn = []");
        assert_eq!(
            c.warnings(NOW),
            ["client_auth.allowed_cn is empty: no client certificate is admitted"]
        );
        let c = config(dir.path(), "mode = \"off\"\nallowed_cn = []");
        assert_eq!(c.warnings(NOW), Vec::<String>::new());
    }

    #[test]
    fn anchor_warnings_are_included_unless_client_auth_is_off() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), 2030, 2090, false);
        let c = config(dir.path(), "roots = \"root.pem\"");
        assert_eq!(c.warnings(NOW), Vec::<String>::new());
        let w = c.warnings(LATER);
        assert_eq!(w, anchor_warnings(&c.client_auth.anchors, LATER));
        assert!(w[0].starts_with("trust anchor "), "{w:?}");
        assert!(w[0].contains("expired on "), "{w:?}");
        assert!(w
            .iter()
            .any(|w| w.starts_with("NO CONFIGURED TRUST ANCHOR")));
        let c = config(dir.path(), "mode = \"off\"");
        assert_eq!(c.warnings(LATER), Vec::<String>::new());
    }
}
