//! The gate's configuration as typed serde structs, rendered with `toml::to_string` (key names
//! as in `src/config.rs`; `None` leaves a key out), and a gate started from it through the
//! library (`hubgate::run`).
//!
//! `{ env = "NAME" }` secrets are read from [`GateConfig::env`], a map the test fills: the
//! library gate never reads the test process's environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::{Pki, SECRET, TOKEN};

/// A whole configuration file.
#[derive(Clone, Debug, Serialize)]
pub struct GateConfig {
    pub server: Server,
    pub upstream: UpstreamClient,
    pub client_auth: ClientAuth,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<TrustedProxies>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<Spool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<Dedupe>,
    #[serde(rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// The environment `{ env = "NAME" }` secrets are read from (not part of the file).
    #[serde(skip)]
    pub env: BTreeMap<String, String>,
}

/// `[server]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Server {
    pub listen: String,
    pub cert: String,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_buffered_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_sources: Option<Vec<String>>,
}

/// `[upstream]`: how the gate talks to upstreams.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpstreamClient {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Require,
    Optional,
    Off,
}

/// One path or a list of paths.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Paths {
    One(String),
    Many(Vec<String>),
}

/// `[client_auth]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientAuth {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roots: Option<Paths>,
    /// `None` leaves the key out: Meta's CN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_cn: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crls: Option<Vec<String>>,
    /// `"hard"` or `"soft"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_urls: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl_refresh: Option<String>,
}

impl ClientAuth {
    /// `mode` with the test root (`root.pem`) as the anchor.
    pub fn with_root(mode: Mode) -> ClientAuth {
        ClientAuth {
            mode: Some(mode),
            roots: Some(Paths::One("root.pem".into())),
            allowed_cn: None,
            crls: None,
            crl_policy: None,
            crl_urls: None,
            crl_refresh: None,
        }
    }

    /// The default of every scenario: a verified client certificate is required.
    pub fn require() -> ClientAuth {
        Self::with_root(Mode::Require)
    }

    /// Certificates verified when presented; each route says whether it needs one.
    pub fn optional() -> ClientAuth {
        Self::with_root(Mode::Optional)
    }

    /// No client certificates requested, and no anchors configured.
    pub fn off() -> ClientAuth {
        ClientAuth {
            mode: Some(Mode::Off),
            roots: None,
            allowed_cn: None,
            crls: None,
            crl_policy: None,
            crl_urls: None,
            crl_refresh: None,
        }
    }

    /// Replaces the CN allow-list.
    pub fn allowed_cn(mut self, cns: &[&str]) -> ClientAuth {
        self.allowed_cn = Some(cns.iter().map(|c| c.to_string()).collect());
        self
    }
}

/// `[admin]`.
#[derive(Clone, Debug, Serialize)]
pub struct Admin {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspector: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspector_capacity: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

/// `[trusted_proxies]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrustedProxies {
    pub cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_header: Option<String>,
}

impl TrustedProxies {
    /// Proxies at `cidr`, no identity header believed.
    pub fn at(cidr: &str) -> TrustedProxies {
        TrustedProxies {
            cidrs: vec![cidr.to_owned()],
            ..TrustedProxies::default()
        }
    }

    /// Proxies at `cidr` whose `identity` headers (`alb`, `alb-passthrough`, ...) are believed.
    pub fn with_identity(cidr: &str, identity: &str) -> TrustedProxies {
        TrustedProxies {
            identity: Some(identity.to_owned()),
            ..Self::at(cidr)
        }
    }
}

/// `[spool]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spool {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_horizon: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_base: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_4xx: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    /// `"sqlite"` or `"postgres"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_timeout: Option<String>,
}

impl Spool {
    /// This spool on PostgreSQL at `url` instead of the SQLite file.
    pub fn on_postgres(&mut self, url: &str) {
        self.path = None;
        self.backend = Some("postgres".into());
        self.url = Some(Secret::Inline(url.to_owned()));
        self.pool_size = Some(4);
    }
}

/// `[dedupe]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dedupe {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_max_entries: Option<usize>,
    /// `"memory"` or `"postgres"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// A secret: inline, `{ env = "NAME" }` or `{ file = "PATH" }`.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Secret {
    Inline(String),
    Env {
        env: String,
    },
    File {
        file: String,
    },
    /// An unquoted number: what a careless file says, and the gate must refuse.
    Number(u64),
}

impl Secret {
    pub fn inline(s: &str) -> Secret {
        Secret::Inline(s.to_owned())
    }
    pub fn env(name: &str) -> Secret {
        Secret::Env {
            env: name.to_owned(),
        }
    }
    pub fn file(path: &str) -> Secret {
        Secret::File {
            file: path.to_owned(),
        }
    }
}

/// A route's `client_cert`.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteCert {
    Required,
    None,
}

/// A route's `delivery`.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Sync,
    Spool,
}

/// `[[route]]`.
#[derive(Clone, Debug, Serialize)]
pub struct Route {
    pub path: String,
    pub verify_token: Secret,
    pub app_secrets: Vec<Secret>,
    pub upstream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<RouteCert>,
    pub legacy_sha1: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// `true`/`false` or `"off"`/`"body"`/`"item"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<toml::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_secret: Option<Secret>,
}

impl Route {
    /// `path` forwarding to `upstream`, with `TOKEN` and `SECRET`.
    pub fn new(path: &str, upstream: &str) -> Route {
        Route {
            path: path.to_owned(),
            verify_token: Secret::inline(TOKEN),
            app_secrets: vec![Secret::inline(SECRET)],
            upstream: upstream.to_owned(),
            client_cert: None,
            legacy_sha1: false,
            delivery: None,
            dedupe: None,
            split: None,
            backend_secret: None,
        }
    }

    /// Splits batches by `mode` (`"entry"` or `"item"`), with `dedupe` (`"body"` or `"item"`).
    pub fn split(&mut self, mode: &str, dedupe: &str) -> &mut Route {
        self.split = Some(mode.to_owned());
        self.dedupe = Some(toml::Value::String(dedupe.to_owned()));
        self
    }
}

impl GateConfig {
    /// A working gate on 127.0.0.1:0 with the PKI's server certificate, mode `require` with the
    /// test root anchored (Meta's CN allowed by default), a 2 s upstream timeout, and one route,
    /// `/webhook`, forwarding to `upstream`.
    pub fn new(upstream: &str) -> GateConfig {
        GateConfig {
            server: Server {
                listen: "127.0.0.1:0".into(),
                cert: "server-chain.pem".into(),
                key: "server.key".into(),
                ..Server::default()
            },
            upstream: UpstreamClient {
                timeout: Some("2s".into()),
                connect_timeout: Some("1s".into()),
                ..UpstreamClient::default()
            },
            client_auth: ClientAuth::require(),
            admin: None,
            trusted_proxies: None,
            spool: None,
            dedupe: None,
            routes: vec![Route::new("/webhook", upstream)],
            env: BTreeMap::new(),
        }
    }

    /// The first route.
    pub fn route(&mut self) -> &mut Route {
        &mut self.routes[0]
    }

    /// The admin listener on 127.0.0.1:0.
    pub fn with_admin(&mut self) {
        self.admin = Some(Admin {
            listen: "127.0.0.1:0".into(),
            inspector: None,
            inspector_capacity: None,
            token: None,
        });
    }

    /// The admin listener on 127.0.0.1:0 with the inspector on (and `token`, if given).
    pub fn with_inspector(&mut self, token: Option<&str>) {
        self.with_admin();
        let admin = self.admin.as_mut().expect("just set");
        admin.inspector = Some(true);
        admin.token = token.map(Secret::inline);
    }

    /// Every route delivers through the spool at `spool.db` (short back-off, 4 deliveries at a
    /// time, 4xx dead-letters at once), with a 36 h de-duplication window.
    pub fn with_spool(&mut self) -> &mut Spool {
        for r in &mut self.routes {
            r.delivery = Some(Delivery::Spool);
        }
        self.dedupe = Some(Dedupe {
            window: Some("36h".into()),
            ..Dedupe::default()
        });
        self.spool.insert(Spool {
            path: Some(SPOOL_DB.into()),
            backoff_base: Some("50ms".into()),
            backoff_max: Some("200ms".into()),
            max_concurrency: Some(4),
            dead_letter_4xx: Some(true),
            ..Spool::default()
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the configuration serialises as TOML")
    }

    /// Writes the TOML as `name` next to the PKI's files.
    pub fn write(&self, pki: &Pki, name: &str) -> PathBuf {
        pki.write(name, &self.to_toml())
    }

    /// Writes the TOML next to the PKI's files (a fresh name each time) and loads it, so
    /// relative paths resolve against the temp dir; `{ env }` secrets come from [`Self::env`].
    pub fn load(&self, pki: &Pki) -> Result<hubgate::Config, hubgate::ConfigError> {
        let text = self.to_toml();
        let path = pki.write(&pki.next_config_name(), &text);
        let env = |name: &str| self.env.get(name).cloned();
        hubgate::Config::from_toml_with_env(
            &text,
            &path.display().to_string(),
            pki.dir.path(),
            &env,
        )
    }

    /// Loads the configuration (panicking with the TOML if it is refused) and starts a gate.
    pub async fn start(&self, pki: &Pki) -> Gate {
        let config = self
            .load(pki)
            .unwrap_or_else(|e| panic!("config rejected: {e}\n{}", self.to_toml()));
        Gate::run(config).await
    }
}

/// Where [`GateConfig::with_spool`] keeps the spool, relative to the PKI's folder.
pub const SPOOL_DB: &str = "spool.db";

/// A running gate (or, from [`Gate::at`], one the binary runs). Dropping a library gate leaves
/// its server task to die with the test's runtime.
pub struct Gate {
    pub addr: SocketAddr,
    running: Option<hubgate::Running>,
}

impl Gate {
    /// Starts a gate from a loaded configuration (`hubgate::run`).
    pub async fn run(config: hubgate::Config) -> Gate {
        let running = hubgate::run(config)
            .await
            .unwrap_or_else(|e| panic!("gate did not start: {e}"));
        Gate {
            addr: running.local_addr(),
            running: Some(running),
        }
    }

    /// The gate a `hubgate` process serves at `addr`.
    pub fn at(addr: SocketAddr) -> Gate {
        Gate {
            addr,
            running: None,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{}", self.addr, path_and_query)
    }

    /// `127.0.0.1:PORT`: what `Host`/`:authority` carries and `X-Forwarded-Host` must echo.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub fn running(&self) -> &hubgate::Running {
        self.running
            .as_ref()
            .expect("a gate started through the library")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr().expect("admin address")
    }

    /// The gate's metrics as the admin endpoint would encode them.
    pub fn metrics(&self) -> String {
        self.running().metrics().encode(hubgate::unix_now())
    }

    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}
