//! Configuration, in layers: the raw TOML shape (`raw`: serde, unknown keys rejected), the
//! `HUBGATE_*` environment variables on top (`env`: one table drives both the overlay and
//! [`ENV_VARS`]), and validation into a [`Config`] (`validate`: one function per section)
//! that holds everything `run` needs, already loaded: certificates, keys, trust anchors and
//! secrets. `hubgate check` and `hubgate run` both go through here, so a config that checks is
//! a config that runs; [`Config::warnings`] is what both print about a config that is valid
//! but suspicious.
//!
//! Every error names the file and the key (`route[0].app_secrets[1]`), and for referenced files
//! the path that failed. Every environment read goes through an injected reader
//! (`&dyn Fn(&str) -> Option<String>`); [`process_env`] is the process environment's.

mod env;
mod raw;
mod validate;
mod warnings;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

pub use crate::gate::batch::SplitMode;

use crate::pki::{Anchor, Crl};
pub use crate::secret::Secret;
use crate::spool::SpoolSettings;

pub use env::{env_configured, env_docs, ENV_VARS};
pub use raw::SecretSource;

use validate::{validate, Ctx};

/// The CN Meta's webhook client certificate carries.
pub const META_CLIENT_CN: &str = "client.webhooks.fbclientcerts.com";

/// Default body limit: WhatsApp documents payloads up to 3 MB; 4 MiB leaves headroom.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A configuration error, naming the file and the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The configuration file (or `environment`/`<demo>` when there is none).
    pub file: String,
    /// The key, dotted, with array indexes: `route[1].upstream`.
    pub key: String,
    /// What is wrong, including any referenced path.
    pub message: String,
}

impl ConfigError {
    /// An error about the configuration file itself (it cannot be read).
    fn unreadable(file: &str, e: std::io::Error) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }
    }
}

/// How the TLS listener treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// A valid client certificate with an allowed CN is required for the handshake.
    Require,
    /// A certificate is verified if presented; each route says whether it needs one.
    Optional,
    /// No client certificates are requested.
    Off,
}

impl fmt::Display for ClientAuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Require => "require",
            Self::Optional => "optional",
            Self::Off => "off",
        })
    }
}

/// Whether a route needs a verified client certificate on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteClientCert {
    Required,
    None,
}

/// How a route hands authenticated events to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Forward now and relay the upstream's answer.
    Sync,
    /// Store durably, answer 200, deliver from the spool.
    Spool,
}

/// The validated configuration, with every referenced file loaded.
#[derive(Clone)]
pub struct Config {
    /// Where it came from, for messages.
    pub source: String,
    pub server: ServerSettings,
    pub client_auth: ClientAuth,
    pub upstream: UpstreamSettings,
    /// The admin listener (health, readiness, metrics); off unless `[admin]` is configured.
    pub admin: Option<SocketAddr>,
    /// The live event inspector on the admin listener; off unless `[admin] inspector = true`.
    pub inspector: Option<InspectorSettings>,
    /// Whose forwarding and identity headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// The durable spool, when any route has `delivery = "spool"` (or `[spool]` is given).
    pub spool: Option<SpoolSettings>,
    /// In-memory de-duplication for `delivery = "sync"` routes.
    pub sync_dedupe: SyncDedupe,
    pub routes: Vec<Route>,
}

/// Listener settings.
#[derive(Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub max_body_bytes: usize,
    /// A request's head (header names and values) larger than this is answered 431.
    pub max_header_bytes: usize,
    /// A request with more header fields than this is answered 431.
    pub max_headers: usize,
    /// Request body bytes held in memory at once across all connections.
    pub max_buffered_bytes: u64,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// Every connection starts with a PROXY protocol v1/v2 header (from a trusted proxy).
    pub proxy_protocol: bool,
    /// When set, only clients from these networks are served.
    pub allow_sources: Option<Vec<ipnet::IpNet>>,
}

/// Client certificate policy.
#[derive(Clone)]
pub struct ClientAuth {
    pub mode: ClientAuthMode,
    pub anchors: Vec<Anchor>,
    pub allowed_cn: Vec<String>,
    /// Revocation lists checked for every chain (`crls`), and what a missing or stale one means.
    pub crls: Vec<Crl>,
    pub crl_policy: CrlPolicy,
    /// Lists fetched over HTTP(S) every `crl_refresh` (`crl_urls`), within `crl_fetch_timeout`;
    /// once fetched they join `crls` (marked [`Crl::url`]).
    pub crl_urls: Vec<http::Uri>,
    pub crl_refresh: Duration,
    pub crl_fetch_timeout: Duration,
}

/// `[client_auth] crl_policy`: what happens when a CA of a chain has no CRL loaded, or its CRL
/// is past `nextUpdate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CrlPolicy {
    /// Refuse the client (fail closed; the default once `crls` is set).
    #[default]
    Hard,
    /// Admit it, with a warning and a metric (a revoked certificate is still refused).
    Soft,
}

impl CrlPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
        }
    }
}

/// The in-memory de-duplication of sync routes: how long and how many keys are remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncDedupe {
    pub window: Duration,
    pub max_entries: usize,
    /// `[dedupe] store = "postgres"`: in the spool's shared database, so that a retry reaching
    /// another gate is recognised; else in this process's memory.
    pub shared: bool,
}

/// Upstream (backend) client settings.
#[derive(Clone)]
pub struct UpstreamSettings {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra CA for `https://` upstreams; the system store is used when absent.
    pub ca: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
    pub max_response_bytes: usize,
}

/// `[admin] inspector`: recent requests kept in memory for the inspector page and its API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectorSettings {
    /// Requests kept (the oldest forgotten first).
    pub capacity: usize,
    /// Asked of every inspector and API request when set (`[admin] token`).
    pub token: Option<Secret>,
}

/// A webhook route: one exact path.
#[derive(Clone)]
pub struct Route {
    pub path: String,
    pub verify_token: Secret,
    pub app_secrets: Vec<Secret>,
    pub upstream: http::Uri,
    pub client_cert: RouteClientCert,
    pub legacy_sha1: bool,
    pub delivery: Delivery,
    /// What counts as "delivered already": a repeat is answered 200 and not delivered again.
    pub dedupe: DedupeMode,
    /// Deliver a Meta batch whole, entry by entry or update by update.
    pub split: SplitMode,
    /// The key that signs split parts for the backend: `backend_secret`, or the first of
    /// `app_secrets`. Set when `split` is not `none`.
    pub backend_secret: Option<Secret>,
}

/// A route's `dedupe`: `false`/`"off"`, `true`/`"body"` (the default), or `"item"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupeMode {
    Off,
    /// The same body again (the signature's MAC on sync routes; its SHA-256 in the spool).
    Body,
    /// The same update again, in whatever batch it comes back (needs `split = "item"`).
    Item,
}

impl DedupeMode {
    pub fn is_on(self) -> bool {
        self != DedupeMode::Off
    }
}

/// AWS ALB, mTLS verify mode: the verified leaf's subject.
pub const ALB_SUBJECT: http::HeaderName =
    http::HeaderName::from_static("x-amzn-mtls-clientcert-subject");
/// AWS ALB, mTLS passthrough mode: the client's chain, URL-encoded PEM.
pub const ALB_CERT: http::HeaderName = http::HeaderName::from_static("x-amzn-mtls-clientcert");

/// How a trusted proxy passes on the client's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityHeader {
    /// The proxy passes no identity.
    None,
    /// A subject DN (`CN=…,O=…`) the proxy verified; hubgate checks the CN.
    Subject(http::HeaderName),
    /// The client's certificate chain, URL-encoded PEM; hubgate verifies it itself.
    Certificate(http::HeaderName),
}

/// The `[trusted_proxies]` policy: whose forwarding and identity headers are believed.
#[derive(Clone, Debug)]
pub struct TrustedProxies {
    pub cidrs: Vec<ipnet::IpNet>,
    /// Take the client address from `X-Forwarded-For` sent by a trusted proxy.
    pub forwarded_for: bool,
    pub identity: IdentityHeader,
}

impl TrustedProxies {
    /// No proxy is trusted.
    pub fn none() -> TrustedProxies {
        TrustedProxies {
            cidrs: vec![],
            forwarded_for: false,
            identity: IdentityHeader::None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file, loading everything it references.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, &file, base)
    }

    /// Parses and validates TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(text, file, base, &process_env)
    }

    /// [`Config::from_toml`] with `{ env = "NAME" }` secrets read through `env`.
    pub fn from_toml_with_env(
        text: &str,
        file: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw = raw::parse(text, file)?;
        let cx = Ctx {
            file,
            base,
            from_env: Default::default(),
            env,
        };
        validate(raw, &cx)
    }

    /// The configuration from an optional file with `HUBGATE_*` environment variables on top
    /// (the environment wins; see [`ENV_VARS`]). Paths from the environment resolve against
    /// the working directory, paths from the file against the file's folder. Every variable,
    /// `{ env = "NAME" }` secrets included, is read through `env`.
    pub fn from_sources(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let (raw, file, base) = match path {
            Some(p) => {
                let file = p.display().to_string();
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError::unreadable(&file, e))?;
                let base = p
                    .parent()
                    .map(Path::to_owned)
                    .unwrap_or_else(|| PathBuf::from("."));
                (
                    raw::parse(&text, &file)?,
                    format!("{file} + environment"),
                    base,
                )
            }
            None => (Default::default(), "environment".to_owned(), cwd.clone()),
        };
        let (raw, from_env) = env::overlay(raw, env, &cwd, &file)?;
        let cx = Ctx {
            file: &file,
            base: &base,
            from_env,
            env,
        };
        validate(raw, &cx)
    }
}

/// The process environment, as the configuration reads it: the one place that calls
/// `std::env::var` (everything else takes a reader, so tests pass a map instead).
#[allow(clippy::disallowed_methods)]
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
