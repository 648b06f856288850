//! Reaching the database: the URL in libpq's form, its `sslmode` as libpq reads it, and TLS with
//! rustls (aws-lc-rs, the process's one crypto provider).
//!
//! | sslmode | encryption | certificate check |
//! |---|---|---|
//! | `disable` | none | — |
//! | `prefer` (libpq's default) | if the server offers it | none (as libpq) |
//! | `require` | required | none; the chain against `[spool] ca` when one is given (as libpq with a root certificate) |
//! | `verify-ca` | required | the chain, against `[spool] ca` or the system store |
//! | `verify-full` | required | the chain and the host name |
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`: hubgate takes `sslmode` (and
//! libpq's file options, which it does not use) out of the URL, and gives tokio-postgres the rest.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::spool::{PostgresSettings, SpoolError};

/// How long one connection attempt may take (accepts are bounded by `accept_timeout` anyway).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP keepalive, unless the URL sets it: a database host that disappears without closing its
/// connections (powered off, a route lost) is noticed in 10 + 3 × 5 s, not the kernel's two
/// hours and more.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// Data sent and not acknowledged for this long closes the connection (`TCP_USER_TIMEOUT`),
/// unless the URL sets it.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// libpq's sslmode values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tls {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed, ready-to-use database address.
pub(crate) struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    /// `host:port/database`, never the password: for messages.
    pub location: String,
    ca: Option<Vec<CertificateDer<'static>>>,
}

impl Target {
    /// Parses `settings.url`. Errors never repeat the URL (it may hold a password).
    pub(crate) fn parse(settings: &PostgresSettings) -> Result<Target, SpoolError> {
        let bad = |message: String| SpoolError::Settings {
            path: "[spool] url".into(),
            message,
        };
        let url = std::str::from_utf8(settings.url.expose())
            .map_err(|_| bad("is not UTF-8".to_owned()))?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad(
                "must be a URL like postgres://user@host:5432/database?sslmode=verify-full"
                    .to_owned(),
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut tls = Tls::Prefer;
        let mut kept = form_urlencoded::Serializer::new(String::new());
        let mut given = std::collections::HashSet::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "sslmode" => {
                    tls = match &*v {
                        "disable" => Tls::Disable,
                        "allow" | "prefer" => Tls::Prefer,
                        "require" => Tls::Require,
                        "verify-ca" => Tls::VerifyCa,
                        "verify-full" => Tls::VerifyFull,
                        other => {
                            return Err(bad(format!(
                                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                            )))
                        }
                    }
                }
                // libpq's certificate files: hubgate takes the CA from `[spool] ca`.
                "sslrootcert" | "sslcert" | "sslkey" | "sslcrl" => {
                    return Err(bad(format!(
                        "{k} is not read by hubgate: give the database's CA as [spool] ca"
                    )))
                }
                _ => {
                    kept.append_pair(&k, &v);
                    given.insert(k.into_owned());
                }
            }
        }
        // tokio-postgres decodes `%20` but not `+` as a space (`options=-c%20name%3Dvalue`):
        // every `+` the serializer writes is a space (a `+` in a value becomes `%2B`).
        let rest = kept.finish().replace('+', "%20");
        let url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{rest}")
        };
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| bad(format!("is not a PostgreSQL URL: {e}")))?;
        config.ssl_mode(match tls {
            Tls::Disable => SslMode::Disable,
            Tls::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("hubgate");
        // Each unless the URL gives it (`0` included: the system's default, as in libpq).
        if !given.contains("keepalives_idle") {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if !given.contains("keepalives_interval") {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if !given.contains("keepalives_retries") {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        if !given.contains("tcp_user_timeout") {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config.get_dbname().unwrap_or("").to_owned();
        Ok(Target {
            location: format!("postgres {host}:{port}/{db}"),
            config,
            tls,
            ca: settings.ca.clone(),
        })
    }

    /// Sets a server setting for every session (`-c name=value` in the startup options),
    /// after the URL's own `options`: where both set it, this one holds.
    pub(crate) fn add_option(&mut self, name: &str, value: &str) {
        let options = self.config.get_options().unwrap_or("");
        let joined = format!("{options} -c {name}={value}");
        self.config.options(joined.trim_start());
    }

    /// The TLS connector for this sslmode.
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, SpoolError> {
        let provider = crate::pki::crypto_provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.tls_error(e))?;
        let roots = || -> Result<Arc<dyn ServerCertVerifier>, SpoolError> {
            match &self.ca {
                Some(certs) => {
                    let mut store = RootCertStore::empty();
                    for c in certs {
                        store.add(c.clone()).map_err(|e| self.tls_error(e))?;
                    }
                    let v = WebPkiServerVerifier::builder_with_provider(
                        Arc::new(store),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| SpoolError::Settings {
                        path: "[spool] ca".into(),
                        message: e.to_string(),
                    })?;
                    Ok(v)
                }
                None => Ok(Arc::new(
                    rustls_platform_verifier::Verifier::new(provider.clone())
                        .map_err(|e| self.tls_error(e))?,
                )),
            }
        };
        let verifier: Arc<dyn ServerCertVerifier> = match self.tls {
            Tls::VerifyFull => roots()?,
            Tls::VerifyCa => Arc::new(ChainOnly(roots()?)),
            Tls::Require if self.ca.is_some() => Arc::new(ChainOnly(roots()?)),
            Tls::Disable | Tls::Prefer | Tls::Require => Arc::new(Unverified(provider.clone())),
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    fn tls_error(&self, e: impl std::fmt::Display) -> SpoolError {
        SpoolError::Settings {
            path: "[spool] url".into(),
            message: format!("TLS setup: {e}"),
        }
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not checked (libpq's rule).
#[derive(Debug)]
struct ChainOnly(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a CA: encryption without authentication of the server, exactly
/// what libpq does in those modes. The handshake signatures are still checked (the server
/// holds the key of the certificate it showed); which certificate it is, is not.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn target(url: &str) -> Result<Target, SpoolError> {
        Target::parse(&PostgresSettings {
            url: Secret::new(url),
            pool_size: 4,
            ca: None,
        })
    }

    #[test]
    fn sslmode_is_taken_out_of_the_url() {
        let t =
            target("postgres://u:pw@db.example:6432/events?sslmode=verify-full&connect_timeout=5")
                .unwrap();
        assert_eq!(t.tls, Tls::VerifyFull);
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.location, "postgres db.example:6432/events");
        assert_eq!(target("postgresql://u@h/d").unwrap().tls, Tls::Prefer);
        assert_eq!(
            target("postgres://u@h/d?sslmode=disable").unwrap().tls,
            Tls::Disable
        );
    }

    #[test]
    fn a_lost_database_host_is_noticed_by_tcp_unless_the_url_says_otherwise() {
        let t = target("postgres://u@h/d").unwrap();
        assert!(t.config.get_keepalives());
        assert_eq!(t.config.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(t.config.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert_eq!(t.config.get_keepalives_retries(), Some(KEEPALIVE_RETRIES));
        assert_eq!(t.config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        let t = target(
            "postgres://u@h/d?keepalives_idle=60&keepalives_interval=7&keepalives_retries=9\
             &tcp_user_timeout=30",
        )
        .unwrap();
        assert_eq!(t.config.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(
            t.config.get_keepalives_interval(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(t.config.get_keepalives_retries(), Some(9));
        assert_eq!(
            t.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );
        // `0`: the system's default, as libpq reads it (none set on the socket).
        let t = target("postgres://u@h/d?tcp_user_timeout=0").unwrap();
        assert_eq!(t.config.get_tcp_user_timeout(), None);
    }

    #[test]
    fn a_server_setting_goes_after_the_urls_options() {
        for (url, options) in [
            (
                "postgres://u@h/d?options=-c%20synchronous_commit%3Doff",
                "-c synchronous_commit=off -c synchronous_commit=on",
            ),
            (
                // `+` for a space in the URL; `%2B` a real plus.
                "postgres://u@h/d?options=--work_mem%3D2MB+-c+a.b%3Dc%2Bd",
                "--work_mem=2MB -c a.b=c+d -c synchronous_commit=on",
            ),
            ("postgres://u@h/d", "-c synchronous_commit=on"),
        ] {
            let mut t = target(url).unwrap();
            t.add_option("synchronous_commit", "on");
            assert_eq!(t.config.get_options(), Some(options), "{url}");
        }
    }

    #[test]
    fn errors_never_repeat_the_url() {
        for url in [
            "mysql://u:hunter2@h/d",
            "postgres://u:hunter2@h/d?sslmode=sometimes",
            "postgres://u:hunter2@h/d?sslrootcert=/x",
        ] {
            let e = target(url).err().unwrap().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
