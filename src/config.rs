//! Configuration: the raw TOML shape (serde, unknown keys rejected) and its validation into a
//! [`Config`] that holds everything `run` needs, already loaded: certificates, keys, trust
//! anchors and secrets. `hubgate check` and `hubgate run` both go through [`Config::load`], so a
//! config that checks is a config that runs.
//!
//! Every error names the file and the key (`route[0].app_secrets[1]`), and for referenced files
//! the path that failed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::pki::{self, Anchor};
pub use crate::secret::Secret;

/// The CN Meta's webhook client certificate carries.
pub const META_CLIENT_CN: &str = "client.webhooks.fbclientcerts.com";

/// Default body limit: WhatsApp documents payloads up to 3 MB; 4 MiB leaves headroom.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A configuration error, naming the file and the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The configuration file (or `<environment>`/`<demo>` when there is none).
    pub file: String,
    /// The key, dotted, with array indexes: `route[1].upstream`.
    pub key: String,
    /// What is wrong, including any referenced path.
    pub message: String,
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

/// A secret given inline, from an environment variable, or from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(String),
    Env(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "PATH" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(v.to_owned()))
            }
            // Numbers and booleans are refused without echoing them: the error message must
            // never carry a secret.
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretSource, E> {
                Err(E::custom(
                    "must be a quoted string (a number here would be printed in errors)",
                ))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretSource, E> {
                Err(E::custom(
                    "must be a quoted string (a number here would be printed in errors)",
                ))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretSource, E> {
                Err(E::custom(
                    "must be a quoted string (a number here would be printed in errors)",
                ))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretSource, E> {
                Err(E::custom("must be a quoted string"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        r#"expected { env = "NAME" } or { file = "PATH" }"#,
                    ));
                };
                let value: String = map.next_value()?;
                let source = match key.as_str() {
                    "env" => SecretSource::Env(value),
                    "file" => SecretSource::File(PathBuf::from(value)),
                    other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "unexpected `{extra}`: give exactly one of `env` or `file`"
                    )));
                }
                Ok(source)
            }
        }
        d.deserialize_any(V)
    }
}

/// One path or a list of paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    client_auth: Option<RawClientAuth>,
    upstream: Option<RawUpstream>,
    admin: Option<RawAdmin>,
    trusted_proxies: Option<RawTrustedProxies>,
    spool: Option<RawSpool>,
    dedupe: Option<RawDedupe>,
    #[serde(default)]
    route: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    path: Option<PathBuf>,
    retry_horizon: Option<String>,
    max_concurrency: Option<usize>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
    dead_letter_4xx: Option<bool>,
    max_size_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedupe {
    window: Option<String>,
    sync_window: Option<String>,
    sync_max_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustedProxies {
    cidrs: Vec<String>,
    forwarded_for: Option<bool>,
    identity: Option<String>,
    identity_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    max_body_bytes: Option<u64>,
    max_buffered_bytes: Option<u64>,
    handshake_timeout: Option<String>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    max_connections: Option<usize>,
    idle_timeout: Option<String>,
    drain_timeout: Option<String>,
    proxy_protocol: Option<bool>,
    allow_sources: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientAuth {
    mode: Option<ClientAuthMode>,
    roots: Option<OneOrMany>,
    allowed_cn: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    timeout: Option<String>,
    connect_timeout: Option<String>,
    ca: Option<PathBuf>,
    max_response_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: String,
    verify_token: SecretSource,
    app_secrets: Vec<SecretSource>,
    upstream: String,
    client_cert: Option<RouteClientCert>,
    #[serde(default)]
    legacy_sha1: bool,
    delivery: Option<Delivery>,
    dedupe: Option<bool>,
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
    /// Whose forwarding and identity headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// The durable spool, when any route has `delivery = "spool"` (or `[spool]` is given).
    pub spool: Option<crate::spool::SpoolSettings>,
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
    pub key: std::sync::Arc<PrivateKeyDer<'static>>,
    pub max_body_bytes: usize,
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

/// Client certificate policy.
#[derive(Clone)]
pub struct ClientAuth {
    pub mode: ClientAuthMode,
    pub anchors: Vec<Anchor>,
    pub allowed_cn: Vec<String>,
}

/// The in-memory de-duplication of sync routes: how long and how many keys are remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncDedupe {
    pub window: Duration,
    pub max_entries: usize,
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
    /// Answer a repeat of an already accepted body 200 without delivering it again.
    pub dedupe: bool,
}

/// Collects errors with the file name attached.
struct Ctx<'a> {
    file: &'a str,
    base: &'a Path,
    /// Keys whose value came from an environment variable, and which.
    from_env: HashMap<String, &'static str>,
    /// Reads environment variables (`{ env = "NAME" }` secrets): the process environment in
    /// the binary, a map in tests.
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let key = key.into();
        // `route[0].app_secrets[1]` came from the variable that set `route[0].app_secrets`.
        let var = self
            .from_env
            .iter()
            .filter(|(k, _)| key.starts_with(k.as_str()))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, var)| *var);
        let key = match var {
            Some(var) => format!("{key} (from {var})"),
            None => key,
        };
        ConfigError {
            file: self.file.to_owned(),
            key,
            message: message.into(),
        }
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn duration(
        &self,
        key: &str,
        v: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                let d = humantime::parse_duration(s).map_err(|e| {
                    self.err(
                        key,
                        format!("`{s}` is not a duration like \"5s\" or \"250ms\": {e}"),
                    )
                })?;
                if d.is_zero() {
                    return Err(self.err(key, "must be greater than zero"));
                }
                Ok(d)
            }
        }
    }

    fn secret(&self, key: &str, src: &SecretSource) -> Result<Secret, ConfigError> {
        let bytes = match src {
            SecretSource::Inline(s) => s.as_bytes().to_vec(),
            SecretSource::Env(name) => (self.env)(name)
                .ok_or_else(|| {
                    self.err(
                        key,
                        format!("environment variable `{name}` is not set or not UTF-8"),
                    )
                })?
                .into_bytes(),
            SecretSource::File(p) => {
                let path = self.path(p);
                let mut bytes = std::fs::read(&path)
                    .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
                // Secret files written by editors, `echo` and Kubernetes often end in a newline.
                while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                    bytes.pop();
                }
                bytes
            }
        };
        if bytes.is_empty() {
            return Err(self.err(key, "is empty"));
        }
        Ok(Secret::new(bytes))
    }
}

impl Config {
    /// Reads, parses and validates a configuration file, loading everything it references.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
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
        let raw = parse(text, file)?;
        validate(
            raw,
            &Ctx {
                file,
                base,
                from_env: HashMap::new(),
                env,
            },
        )
    }

    /// The configuration from an optional file with `HUBGATE_*` environment variables on top
    /// (the environment wins; see [`ENV_VARS`]). Paths from the environment resolve against
    /// the working directory, paths from the file against the file's folder.
    pub fn from_sources(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let (mut raw, file, base) = match path {
            Some(p) => {
                let file = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    file: file.clone(),
                    key: "(file)".into(),
                    message: format!("cannot read: {e}"),
                })?;
                let base = p
                    .parent()
                    .map(Path::to_owned)
                    .unwrap_or_else(|| PathBuf::from("."));
                (parse(&text, &file)?, format!("{file} + environment"), base)
            }
            None => (RawConfig::default(), "environment".to_owned(), cwd.clone()),
        };
        let from_env = overlay_env(&mut raw, env, &cwd, &file)?;
        validate(
            raw,
            &Ctx {
                file: &file,
                base: &base,
                from_env,
                env,
            },
        )
    }
}

/// The environment variables hubgate reads, with the key each one sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("HUBGATE_LISTEN", "server.listen"),
    ("HUBGATE_CERT", "server.cert"),
    ("HUBGATE_KEY", "server.key"),
    ("HUBGATE_MAX_BODY_BYTES", "server.max_body_bytes"),
    ("HUBGATE_MAX_CONNECTIONS", "server.max_connections"),
    ("HUBGATE_IDLE_TIMEOUT", "server.idle_timeout"),
    ("HUBGATE_DRAIN_TIMEOUT", "server.drain_timeout"),
    ("HUBGATE_CLIENT_AUTH", "client_auth.mode"),
    (
        "HUBGATE_CLIENT_ROOTS",
        "client_auth.roots (comma-separated)",
    ),
    (
        "HUBGATE_ALLOWED_CN",
        "client_auth.allowed_cn (comma-separated)",
    ),
    ("HUBGATE_ADMIN_LISTEN", "admin.listen"),
    ("HUBGATE_UPSTREAM_TIMEOUT", "upstream.timeout"),
    ("HUBGATE_UPSTREAM_CA", "upstream.ca"),
    ("HUBGATE_PATH", "route[0].path (default /webhook)"),
    ("HUBGATE_UPSTREAM", "route[0].upstream"),
    ("HUBGATE_VERIFY_TOKEN", "route[0].verify_token"),
    (
        "HUBGATE_VERIFY_TOKEN_FILE",
        "route[0].verify_token = { file }",
    ),
    ("HUBGATE_APP_SECRET", "route[0].app_secrets = [value]"),
    (
        "HUBGATE_APP_SECRET_FILE",
        "route[0].app_secrets = [{ file }]",
    ),
    ("HUBGATE_CLIENT_CERT", "route[0].client_cert"),
];

/// The process environment, as the configuration reads it: the one place that calls
/// `std::env::var` (everything else takes a reader, so tests pass a map instead).
#[allow(clippy::disallowed_methods)]
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// True when any configuration variable of [`ENV_VARS`] is set.
pub fn env_configured(env: &dyn Fn(&str) -> Option<String>) -> bool {
    ENV_VARS.iter().any(|(var, _)| env(var).is_some())
}

fn parse(text: &str, file: &str) -> Result<RawConfig, ConfigError> {
    let syntax = |e: toml::de::Error| ConfigError {
        file: file.to_owned(),
        key: e
            .span()
            .map(|s| format!("(line {})", line_of(text, s.start)))
            .unwrap_or_else(|| "(syntax)".into()),
        message: e.message().trim().to_owned(),
    };
    let de = toml::Deserializer::parse(text).map_err(syntax)?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| format!(" (line {})", line_of(text, s.start)))
            .unwrap_or_default();
        ConfigError {
            file: file.to_owned(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: format!("{}{line}", inner.message().trim()),
        }
    })
}

/// Parses an environment value as the TOML key's enum would be (`"optional"`, `"spool"`…).
fn env_enum<T: serde::de::DeserializeOwned>(var: &str, value: &str) -> Result<T, ConfigError> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(value)).map_err(|e| ConfigError {
        file: "environment".into(),
        key: var.to_owned(),
        message: e.to_string(),
    })
}

/// Applies `HUBGATE_*` variables to the raw configuration; returns which keys they set.
fn overlay_env(
    raw: &mut RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
    file: &str,
) -> Result<HashMap<String, &'static str>, ConfigError> {
    let mut set = HashMap::new();
    let mut take = |var: &'static str, key: &str| {
        let v = env(var).filter(|v| !v.is_empty());
        if v.is_some() {
            set.insert(key.to_owned(), var);
        }
        v
    };
    let abs = |p: String| cwd.join(p);
    let list = |v: String| {
        v.split(',')
            .map(|x| x.trim().to_owned())
            .filter(|x| !x.is_empty())
            .collect::<Vec<_>>()
    };
    let env_err = |var: &str, message: String| ConfigError {
        file: file.to_owned(),
        key: var.to_owned(),
        message,
    };

    if let Some(v) = take("HUBGATE_LISTEN", "server.listen") {
        raw.server.listen = Some(v);
    }
    if let Some(v) = take("HUBGATE_CERT", "server.cert") {
        raw.server.cert = Some(abs(v));
    }
    if let Some(v) = take("HUBGATE_KEY", "server.key") {
        raw.server.key = Some(abs(v));
    }
    if let Some(v) = take("HUBGATE_MAX_CONNECTIONS", "server.max_connections") {
        let n = v
            .parse()
            .map_err(|_| env_err("HUBGATE_MAX_CONNECTIONS", format!("`{v}` is not a number")))?;
        raw.server.max_connections = Some(n);
    }
    if let Some(v) = take("HUBGATE_IDLE_TIMEOUT", "server.idle_timeout") {
        raw.server.idle_timeout = Some(v);
    }
    if let Some(v) = take("HUBGATE_DRAIN_TIMEOUT", "server.drain_timeout") {
        raw.server.drain_timeout = Some(v);
    }
    if let Some(v) = take("HUBGATE_MAX_BODY_BYTES", "server.max_body_bytes") {
        let n = v.parse().map_err(|_| {
            env_err(
                "HUBGATE_MAX_BODY_BYTES",
                format!("`{v}` is not a number of bytes"),
            )
        })?;
        raw.server.max_body_bytes = Some(n);
    }
    let ca = raw.client_auth.get_or_insert_with(Default::default);
    if let Some(v) = take("HUBGATE_CLIENT_AUTH", "client_auth.mode") {
        ca.mode = Some(env_enum("HUBGATE_CLIENT_AUTH", &v)?);
    }
    if let Some(v) = take("HUBGATE_CLIENT_ROOTS", "client_auth.roots") {
        ca.roots = Some(OneOrMany::Many(list(v).into_iter().map(abs).collect()));
    }
    if let Some(v) = take("HUBGATE_ALLOWED_CN", "client_auth.allowed_cn") {
        ca.allowed_cn = Some(list(v));
    }
    if let Some(v) = take("HUBGATE_ADMIN_LISTEN", "admin.listen") {
        raw.admin.get_or_insert_with(Default::default).listen = Some(v);
    }
    if let Some(v) = take("HUBGATE_UPSTREAM_TIMEOUT", "upstream.timeout") {
        raw.upstream.get_or_insert_with(Default::default).timeout = Some(v);
    }
    if let Some(v) = take("HUBGATE_SPOOL_PATH", "spool.path") {
        raw.spool.get_or_insert_with(Default::default).path = Some(abs(v));
    }
    if let Some(v) = take("HUBGATE_UPSTREAM_CA", "upstream.ca") {
        raw.upstream.get_or_insert_with(Default::default).ca = Some(abs(v));
    }

    let path = take("HUBGATE_PATH", "route[0].path");
    let upstream = take("HUBGATE_UPSTREAM", "route[0].upstream");
    // A value in the variable itself wins over a file named by `…_FILE`.
    let token = match take("HUBGATE_VERIFY_TOKEN", "route[0].verify_token") {
        Some(v) => Some(SecretSource::Inline(v)),
        None => take("HUBGATE_VERIFY_TOKEN_FILE", "route[0].verify_token")
            .map(|f| SecretSource::File(abs(f))),
    };
    // Several secrets (a rotation) are separated by commas; Meta's app secrets are hex.
    let secrets = match take("HUBGATE_APP_SECRET", "route[0].app_secrets") {
        Some(v) => Some(
            list(v)
                .into_iter()
                .map(SecretSource::Inline)
                .collect::<Vec<_>>(),
        ),
        None => take("HUBGATE_APP_SECRET_FILE", "route[0].app_secrets").map(|f| {
            list(f)
                .into_iter()
                .map(|f| SecretSource::File(abs(f)))
                .collect()
        }),
    };
    let legacy_sha1 =
        match take("HUBGATE_LEGACY_SHA1", "route[0].legacy_sha1") {
            None => None,
            Some(v) => Some(v.parse::<bool>().map_err(|_| {
                env_err("HUBGATE_LEGACY_SHA1", format!("`{v}` is not true or false"))
            })?),
        };
    let client_cert = take("HUBGATE_CLIENT_CERT", "route[0].client_cert")
        .map(|v| env_enum("HUBGATE_CLIENT_CERT", &v))
        .transpose()?;
    let delivery = take("HUBGATE_DELIVERY", "route[0].delivery")
        .map(|v| env_enum("HUBGATE_DELIVERY", &v))
        .transpose()?;
    let any_route_var = delivery.is_some()
        || path.is_some()
        || upstream.is_some()
        || token.is_some()
        || secrets.is_some()
        || client_cert.is_some()
        || legacy_sha1.is_some();
    if !any_route_var {
        return Ok(set);
    }
    match raw.route.len() {
        0 => {
            let missing = |var: &str| {
                env_err(
                    var,
                    "is required to configure a route from the environment".into(),
                )
            };
            raw.route.push(RawRoute {
                path: path.unwrap_or_else(|| "/webhook".into()),
                upstream: upstream.ok_or_else(|| missing("HUBGATE_UPSTREAM"))?,
                verify_token: token.ok_or_else(|| {
                    missing("HUBGATE_VERIFY_TOKEN (or HUBGATE_VERIFY_TOKEN_FILE)")
                })?,
                app_secrets: secrets
                    .ok_or_else(|| missing("HUBGATE_APP_SECRET (or HUBGATE_APP_SECRET_FILE)"))?,
                client_cert,
                legacy_sha1: legacy_sha1.unwrap_or(false),
                delivery,
                dedupe: None,
            });
        }
        1 => {
            let r = &mut raw.route[0];
            if let Some(v) = path {
                r.path = v;
            }
            if let Some(v) = upstream {
                r.upstream = v;
            }
            if let Some(v) = token {
                r.verify_token = v;
            }
            if let Some(v) = secrets {
                r.app_secrets = v;
            }
            if client_cert.is_some() {
                r.client_cert = client_cert;
            }
            if let Some(v) = legacy_sha1 {
                r.legacy_sha1 = v;
            }
            if delivery.is_some() {
                r.delivery = delivery;
            }
        }
        n => {
            return Err(env_err(
                "HUBGATE_UPSTREAM/PATH/VERIFY_TOKEN/APP_SECRET",
                format!("route variables apply to a single route, but the file has {n}"),
            ))
        }
    }
    Ok(set)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

fn validate(raw: RawConfig, cx: &Ctx) -> Result<Config, ConfigError> {
    let s = raw.server;
    let listen_str = s.listen.as_deref().unwrap_or("127.0.0.1:8443");
    let listen: SocketAddr = listen_str.parse().map_err(|_| {
        cx.err(
            "server.listen",
            format!("`{listen_str}` is not an address like 127.0.0.1:8443"),
        )
    })?;
    let required = |v: Option<PathBuf>, key: &str, var: &str| {
        v.map(|p| cx.path(&p))
            .ok_or_else(|| cx.err(key, format!("is required (or set {var})")))
    };
    let cert_path = required(s.cert, "server.cert", "HUBGATE_CERT")?;
    let key_path = required(s.key, "server.key", "HUBGATE_KEY")?;
    let cert_chain =
        pki::load_certs(&cert_path).map_err(|e| cx.err("server.cert", e.to_string()))?;
    let key = pki::load_key(&key_path).map_err(|e| cx.err("server.key", e.to_string()))?;
    pki::check_key_matches(&cert_chain, &key).map_err(|e| {
        cx.err(
            "server.key",
            format!("{} does not match server.cert: {e}", key_path.display()),
        )
    })?;
    let max_body_bytes = match s.max_body_bytes {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(0) => return Err(cx.err("server.max_body_bytes", "must be greater than zero")),
        Some(n) => {
            usize::try_from(n).map_err(|_| cx.err("server.max_body_bytes", "is too large"))?
        }
    };
    let proxy_protocol = s.proxy_protocol.unwrap_or(false);
    let allow_sources = match s.allow_sources {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(cx.err(
                "server.allow_sources",
                "is empty and would admit nobody: remove the key to admit every address",
            ))
        }
        Some(list) => Some(cidrs(cx, "server.allow_sources", &list)?),
    };
    let max_buffered_bytes = s.max_buffered_bytes.unwrap_or(256 * 1024 * 1024);
    if max_buffered_bytes < max_body_bytes as u64 {
        return Err(cx.err(
            "server.max_buffered_bytes",
            format!("must be at least server.max_body_bytes ({max_body_bytes})"),
        ));
    }
    let server = ServerSettings {
        listen,
        cert_path,
        key_path,
        cert_chain,
        key: std::sync::Arc::new(key),
        max_body_bytes,
        max_buffered_bytes,
        handshake_timeout: cx.duration(
            "server.handshake_timeout",
            s.handshake_timeout.as_deref(),
            Duration::from_secs(10),
        )?,
        header_timeout: cx.duration(
            "server.header_timeout",
            s.header_timeout.as_deref(),
            Duration::from_secs(10),
        )?,
        body_timeout: cx.duration(
            "server.body_timeout",
            s.body_timeout.as_deref(),
            Duration::from_secs(15),
        )?,
        max_connections: match s.max_connections {
            Some(0) => return Err(cx.err("server.max_connections", "must be greater than zero")),
            Some(n) => n,
            None => 10_000,
        },
        idle_timeout: cx.duration(
            "server.idle_timeout",
            s.idle_timeout.as_deref(),
            Duration::from_secs(60),
        )?,
        proxy_protocol,
        allow_sources,
        drain_timeout: cx.duration(
            "server.drain_timeout",
            s.drain_timeout.as_deref(),
            Duration::from_secs(10),
        )?,
    };

    let client_auth = validate_client_auth(raw.client_auth, cx)?;

    let u = raw.upstream;
    let upstream = UpstreamSettings {
        timeout: cx.duration(
            "upstream.timeout",
            u.as_ref().and_then(|u| u.timeout.as_deref()),
            Duration::from_millis(4500),
        )?,
        connect_timeout: cx.duration(
            "upstream.connect_timeout",
            u.as_ref().and_then(|u| u.connect_timeout.as_deref()),
            Duration::from_secs(1),
        )?,
        ca: match u.as_ref().and_then(|u| u.ca.as_ref()) {
            None => None,
            Some(p) => {
                let path = cx.path(p);
                let certs =
                    pki::load_certs(&path).map_err(|e| cx.err("upstream.ca", e.to_string()))?;
                Some((path, certs))
            }
        },
        max_response_bytes: match u.as_ref().and_then(|u| u.max_response_bytes) {
            None => 1024 * 1024,
            Some(0) => {
                return Err(cx.err("upstream.max_response_bytes", "must be greater than zero"))
            }
            Some(n) => usize::try_from(n)
                .map_err(|_| cx.err("upstream.max_response_bytes", "is too large"))?,
        },
    };

    if raw.route.is_empty() {
        return Err(cx.err("route", "no [[route]] is configured: add at least one"));
    }
    let mut seen = HashSet::new();
    let mut routes = Vec::with_capacity(raw.route.len());
    for (i, r) in raw.route.into_iter().enumerate() {
        let k = |field: &str| format!("route[{i}].{field}");
        if !r.path.starts_with('/') || r.path.contains(['?', '#']) {
            return Err(cx.err(
                k("path"),
                format!(
                    "`{}` must be an absolute path without query, like /webhook",
                    r.path
                ),
            ));
        }
        if !seen.insert(r.path.clone()) {
            return Err(cx.err(
                k("path"),
                format!("`{}` is already used by another route", r.path),
            ));
        }
        let verify_token = cx.secret(&k("verify_token"), &r.verify_token)?;
        if r.app_secrets.is_empty() {
            return Err(cx.err(k("app_secrets"), "needs at least one secret"));
        }
        let app_secrets = r
            .app_secrets
            .iter()
            .enumerate()
            .map(|(j, s)| cx.secret(&format!("route[{i}].app_secrets[{j}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let upstream: http::Uri = r
            .upstream
            .parse()
            .map_err(|e| cx.err(k("upstream"), format!("`{}` is not a URL: {e}", r.upstream)))?;
        if !matches!(upstream.scheme_str(), Some("http" | "https")) || upstream.host().is_none() {
            return Err(cx.err(
                k("upstream"),
                format!("`{}` must be an http:// or https:// URL", r.upstream),
            ));
        }
        let client_cert = match (client_auth.mode, r.client_cert) {
            (ClientAuthMode::Off, Some(RouteClientCert::Required)) => {
                return Err(cx.err(
                    k("client_cert"),
                    "is \"required\" but client_auth.mode = \"off\" requests no certificates",
                ))
            }
            (ClientAuthMode::Off, _) => RouteClientCert::None,
            (_, c) => c.unwrap_or(RouteClientCert::Required),
        };
        let delivery = r.delivery.unwrap_or(Delivery::Sync);
        if delivery == Delivery::Spool && r.dedupe == Some(false) {
            return Err(cx.err(
                k("dedupe"),
                "cannot be false on a spool route: the spool de-duplicates every route by [dedupe] window",
            ));
        }
        routes.push(Route {
            path: r.path,
            verify_token,
            app_secrets,
            upstream,
            client_cert,
            legacy_sha1: r.legacy_sha1,
            delivery,
            dedupe: r.dedupe.unwrap_or(true),
        });
    }

    let admin = match raw.admin {
        None => None,
        Some(a) => {
            let text = a.listen.as_deref().unwrap_or("127.0.0.1:9901");
            let addr: SocketAddr = text.parse().map_err(|_| {
                cx.err(
                    "admin.listen",
                    format!("`{text}` is not an address like 127.0.0.1:9901"),
                )
            })?;
            if addr == listen && addr.port() != 0 {
                return Err(cx.err("admin.listen", "must differ from server.listen"));
            }
            Some(addr)
        }
    };

    let trusted_proxies = validate_trusted_proxies(raw.trusted_proxies, &client_auth, cx)?;
    let dedupe = raw.dedupe.unwrap_or_default();
    let sync_dedupe = SyncDedupe {
        window: cx.duration(
            "dedupe.sync_window",
            dedupe.sync_window.as_deref(),
            Duration::from_secs(600),
        )?,
        max_entries: match dedupe.sync_max_entries {
            Some(0) => return Err(cx.err("dedupe.sync_max_entries", "must be greater than zero")),
            Some(n) => n,
            None => 100_000,
        },
    };
    let spooled = routes.iter().position(|r| r.delivery == Delivery::Spool);
    let spool = match (raw.spool, spooled) {
        (None, None) => None,
        (None, Some(i)) => {
            return Err(cx.err(
                format!("route[{i}].delivery"),
                "is \"spool\" but there is no [spool] section with a path",
            ))
        }
        (Some(raw_spool), _) => Some(validate_spool(raw_spool, dedupe.window.as_deref(), cx)?),
    };
    if server.proxy_protocol && trusted_proxies.cidrs.is_empty() {
        return Err(cx.err(
            "server.proxy_protocol",
            "needs [trusted_proxies] cidrs: PROXY headers are accepted only from those addresses",
        ));
    }

    Ok(Config {
        source: cx.file.to_owned(),
        server,
        client_auth,
        upstream,
        admin,
        trusted_proxies,
        spool,
        sync_dedupe,
        routes,
    })
}

fn validate_spool(
    raw: RawSpool,
    window: Option<&str>,
    cx: &Ctx,
) -> Result<crate::spool::SpoolSettings, ConfigError> {
    let path = raw
        .path
        .map(|p| cx.path(&p))
        .ok_or_else(|| cx.err("spool.path", "is required (the spool's database file)"))?;
    let mut s = crate::spool::SpoolSettings::new(path);
    s.dedupe_window = cx.duration("dedupe.window", window, s.dedupe_window)?;
    s.retry_horizon = cx.duration(
        "spool.retry_horizon",
        raw.retry_horizon.as_deref(),
        s.retry_horizon,
    )?;
    s.backoff_base = cx.duration(
        "spool.backoff_base",
        raw.backoff_base.as_deref(),
        s.backoff_base,
    )?;
    s.backoff_max = cx.duration(
        "spool.backoff_max",
        raw.backoff_max.as_deref(),
        s.backoff_max,
    )?;
    if let Some(n) = raw.max_concurrency {
        if n == 0 {
            return Err(cx.err("spool.max_concurrency", "must be greater than zero"));
        }
        s.max_concurrency_per_route = n;
    }
    if let Some(v) = raw.dead_letter_4xx {
        s.dead_letter_4xx = v;
    }
    s.max_size_bytes = raw.max_size_bytes;
    s.check().map_err(|e| cx.err("spool.path", e.to_string()))?;
    Ok(s)
}

fn cidrs(cx: &Ctx, key: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    cx.err(
                        format!("{key}[{i}]"),
                        format!("`{text}` is not an address or CIDR like 10.0.0.0/8"),
                    )
                })
        })
        .collect()
}

fn validate_trusted_proxies(
    raw: Option<RawTrustedProxies>,
    client_auth: &ClientAuth,
    cx: &Ctx,
) -> Result<TrustedProxies, ConfigError> {
    let Some(raw) = raw else {
        return Ok(TrustedProxies::none());
    };
    let nets = cidrs(cx, "trusted_proxies.cidrs", &raw.cidrs)?;
    let header = |kind: &str| -> Result<http::HeaderName, ConfigError> {
        let name = raw.identity_header.as_deref().ok_or_else(|| {
            cx.err(
                "trusted_proxies.identity_header",
                format!("is required with identity = \"{kind}\""),
            )
        })?;
        http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            cx.err(
                "trusted_proxies.identity_header",
                format!("`{name}` is not a header name"),
            )
        })
    };
    let identity = match raw.identity.as_deref().unwrap_or("none") {
        "none" => IdentityHeader::None,
        "alb" => IdentityHeader::Subject(ALB_SUBJECT),
        "alb-passthrough" => IdentityHeader::Certificate(ALB_CERT),
        "subject-header" => IdentityHeader::Subject(header("subject-header")?),
        "cert-header" => IdentityHeader::Certificate(header("cert-header")?),
        other => {
            return Err(cx.err(
                "trusted_proxies.identity",
                format!(
                "`{other}` is not one of none, alb, alb-passthrough, subject-header, cert-header"
            ),
            ))
        }
    };
    if matches!(identity, IdentityHeader::Certificate(_)) && client_auth.mode == ClientAuthMode::Off
    {
        return Err(cx.err(
            "trusted_proxies.identity",
            "verifying a certificate header needs client_auth.roots: set client_auth.mode = \"optional\"",
        ));
    }
    if identity != IdentityHeader::None && nets.is_empty() {
        return Err(cx.err(
            "trusted_proxies.cidrs",
            "is empty: no proxy's identity header would be believed",
        ));
    }
    Ok(TrustedProxies {
        cidrs: nets,
        forwarded_for: raw.forwarded_for.unwrap_or(true),
        identity,
    })
}

fn validate_client_auth(raw: Option<RawClientAuth>, cx: &Ctx) -> Result<ClientAuth, ConfigError> {
    let raw = raw.unwrap_or(RawClientAuth {
        mode: None,
        roots: None,
        allowed_cn: None,
    });
    let mode = raw.mode.unwrap_or(ClientAuthMode::Require);
    let allowed_cn = raw
        .allowed_cn
        .unwrap_or_else(|| vec![META_CLIENT_CN.to_owned()]);
    let roots = match raw.roots {
        None => vec![],
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    };
    if mode == ClientAuthMode::Off {
        return Ok(ClientAuth {
            mode,
            anchors: vec![],
            allowed_cn,
        });
    }
    if roots.is_empty() {
        return Err(cx.err(
            "client_auth.roots",
            format!("mode = \"{mode}\" needs at least one trust anchor file (see certs/README.md)"),
        ));
    }
    let mut anchors = Vec::new();
    for (i, p) in roots.iter().enumerate() {
        let path = cx.path(p);
        let key = if roots.len() == 1 {
            "client_auth.roots".to_owned()
        } else {
            format!("client_auth.roots[{i}]")
        };
        let loaded = pki::load_anchors(&path).map_err(|e| cx.err(key, e.to_string()))?;
        anchors.extend(loaded);
    }
    for (i, cn) in allowed_cn.iter().enumerate() {
        if cn.is_empty() {
            return Err(cx.err(format!("client_auth.allowed_cn[{i}]"), "is empty"));
        }
    }
    Ok(ClientAuth {
        mode,
        anchors,
        allowed_cn,
    })
}

impl Config {
    /// What an operator should be told about this configuration at `now` (Unix seconds):
    /// expired or self-signed server certificate, an empty CN allow-list, expired or retired
    /// trust anchors. `check`, `run` and every reload show the same list.
    pub fn warnings(&self, now: i64) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(info) = self
            .server
            .cert_chain
            .first()
            .and_then(pki::CertInfo::parse)
        {
            if info.not_after <= now {
                w.push(format!(
                    "server.cert {} expired on {}",
                    self.server.cert_path.display(),
                    info.not_after_text
                ));
            }
            if info.self_signed {
                w.push(format!(
                    "server.cert {} is self-signed: Meta refuses self-signed server certificates",
                    self.server.cert_path.display()
                ));
            }
        }
        if self.client_auth.mode != ClientAuthMode::Off {
            if self.client_auth.allowed_cn.is_empty() {
                w.push("client_auth.allowed_cn is empty: no client certificate is admitted".into());
            }
            w.extend(pki::anchor_warnings(&self.client_auth.anchors, now));
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_source_forms() {
        #[derive(Debug, Deserialize)]
        struct T {
            a: SecretSource,
            b: SecretSource,
            c: SecretSource,
        }
        let t: T = toml::from_str("a = \"x\"\nb = { env = \"E\" }\nc = { file = \"f\" }").unwrap();
        assert_eq!(t.a, SecretSource::Inline("x".into()));
        assert_eq!(t.b, SecretSource::Env("E".into()));
        assert_eq!(t.c, SecretSource::File("f".into()));
        let bad = toml::from_str::<T>("a = { envv = \"E\" }\nb = \"\"\nc = \"\"");
        assert!(bad.unwrap_err().to_string().contains("envv"));
    }
}
