//! Validation: the raw shapes become a [`Config`], one function per section, every referenced
//! file loaded. Every error names the file and the key (with `(from HUBGATE_…)` when the
//! environment set it). Sections are checked in a fixed order (server, client_auth, upstream,
//! routes, admin, trusted_proxies, dedupe, spool, then the checks across sections) and the
//! first error found is the one reported. A section that depends on another one checked
//! before it (a route's client certificate on `client_auth.mode`, `admin.listen` on
//! `server.listen`…) takes what it needs as an argument.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{IdentityHeader, TrustedProxies, ALB_CERT, ALB_SUBJECT};
use crate::pki::{check_key_matches, load_anchors, load_certs, load_crls, load_key};
use crate::spool::{Backend as SpoolBackend, PostgresSettings, SpoolSettings};

use super::raw::{
    DedupeStoreName, OneOrMany, RawAdmin, RawClientAuth, RawConfig, RawDedupe, RawRoute, RawServer,
    RawSpool, RawTrustedProxies, RawUpstream, RouteDedupe, SecretSource, SpoolBackendName,
};
use super::{
    ClientAuth, ClientAuthMode, Config, ConfigError, CrlPolicy, DedupeMode, Delivery,
    InspectorSettings, Route, RouteClientCert, Secret, ServerSettings, SplitMode, SyncDedupe,
    UpstreamSettings, DEFAULT_MAX_BODY_BYTES, META_CLIENT_CN,
};

/// What validation needs besides the raw configuration: names for errors, the folder relative
/// paths resolve against, and the environment reader for `{ env = "NAME" }` secrets.
pub(super) struct Ctx<'a> {
    pub file: &'a str,
    pub base: &'a Path,
    /// Keys whose value came from an environment variable, and which.
    pub from_env: HashMap<String, &'static str>,
    /// Reads environment variables: the process environment in the binary, a map in tests.
    pub env: &'a dyn Fn(&str) -> Option<String>,
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

    /// A duration like `"5s"`, greater than zero; `default` when absent.
    fn duration(
        &self,
        key: &str,
        v: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = v else {
            return Ok(default);
        };
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

    /// A count greater than zero; `default` when absent.
    fn positive(&self, key: &str, v: Option<usize>, default: usize) -> Result<usize, ConfigError> {
        match v {
            Some(0) => Err(self.err(key, "must be greater than zero")),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    }

    /// An `http://` or `https://` URL with a host.
    fn http_url(&self, key: &str, text: &str) -> Result<http::Uri, ConfigError> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| self.err(key, format!("`{text}` is not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(self.err(key, format!("`{text}` must be an http:// or https:// URL")));
        }
        Ok(uri)
    }

    /// A byte size greater than zero that fits in memory; `default` when absent.
    fn bytes(&self, key: &str, v: Option<u64>, default: usize) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(0) => Err(self.err(key, "must be greater than zero")),
            Some(n) => usize::try_from(n).map_err(|_| self.err(key, "is too large")),
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

    /// Addresses or CIDRs, each error naming `key[i]`.
    fn cidrs(&self, key: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        self.err(
                            format!("{key}[{i}]"),
                            format!("`{text}` is not an address or CIDR like 10.0.0.0/8"),
                        )
                    })
            })
            .collect()
    }
}

/// The whole configuration, section by section.
pub(super) fn validate(raw: RawConfig, cx: &Ctx) -> Result<Config, ConfigError> {
    let server = server(raw.server, cx)?;
    let client_auth = client_auth(raw.client_auth, cx)?;
    let upstream = upstream(raw.upstream, cx)?;
    let routes = routes(raw.route, client_auth.mode, cx)?;
    let (admin, inspector) = admin(raw.admin, &server, cx)?;
    let trusted_proxies = trusted_proxies(raw.trusted_proxies, &client_auth, cx)?;
    let dedupe = raw.dedupe.unwrap_or_default();
    let spool = spool(raw.spool, dedupe.window.as_deref(), &routes, cx)?;
    let sync_dedupe = sync_dedupe(&dedupe, spool.as_ref(), cx)?;
    proxy_protocol(&server, &trusted_proxies, cx)?;
    Ok(Config {
        source: cx.file.to_owned(),
        server,
        client_auth,
        upstream,
        admin,
        inspector,
        trusted_proxies,
        spool,
        sync_dedupe,
        routes,
    })
}

/// `[server]`: the listener, its certificate and key (loaded and matched), limits, timeouts.
fn server(s: RawServer, cx: &Ctx) -> Result<ServerSettings, ConfigError> {
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
    let cert_chain = load_certs(&cert_path).map_err(|e| cx.err("server.cert", e.to_string()))?;
    let key = load_key(&key_path).map_err(|e| cx.err("server.key", e.to_string()))?;
    check_key_matches(&cert_chain, &key).map_err(|e| {
        cx.err(
            "server.key",
            format!("{} does not match server.cert: {e}", key_path.display()),
        )
    })?;
    let max_body_bytes = cx.bytes(
        "server.max_body_bytes",
        s.max_body_bytes,
        DEFAULT_MAX_BODY_BYTES,
    )?;
    let allow_sources = match s.allow_sources {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(cx.err(
                "server.allow_sources",
                "is empty and would admit nobody: remove the key to admit every address",
            ))
        }
        Some(list) => Some(cx.cidrs("server.allow_sources", &list)?),
    };
    let max_header_bytes = cx.bytes("server.max_header_bytes", s.max_header_bytes, 64 * 1024)?;
    if !(4096..=1 << 20).contains(&max_header_bytes) {
        return Err(cx.err(
            "server.max_header_bytes",
            format!("{max_header_bytes} is not between 4096 and 1048576"),
        ));
    }
    let max_headers = cx.positive("server.max_headers", s.max_headers, 100)?;
    if max_headers > 1000 {
        return Err(cx.err(
            "server.max_headers",
            format!("{max_headers} is more than 1000"),
        ));
    }
    let max_buffered_bytes = s.max_buffered_bytes.unwrap_or(256 * 1024 * 1024);
    if max_buffered_bytes < max_body_bytes as u64 {
        return Err(cx.err(
            "server.max_buffered_bytes",
            format!("must be at least server.max_body_bytes ({max_body_bytes})"),
        ));
    }
    let secs = Duration::from_secs;
    Ok(ServerSettings {
        listen,
        cert_path,
        key_path,
        cert_chain,
        key: Arc::new(key),
        max_body_bytes,
        max_header_bytes,
        max_headers,
        max_buffered_bytes,
        handshake_timeout: cx.duration(
            "server.handshake_timeout",
            s.handshake_timeout.as_deref(),
            secs(10),
        )?,
        header_timeout: cx.duration(
            "server.header_timeout",
            s.header_timeout.as_deref(),
            secs(10),
        )?,
        body_timeout: cx.duration("server.body_timeout", s.body_timeout.as_deref(), secs(15))?,
        max_connections: cx.positive("server.max_connections", s.max_connections, 10_000)?,
        idle_timeout: cx.duration("server.idle_timeout", s.idle_timeout.as_deref(), secs(60))?,
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
        allow_sources,
        drain_timeout: cx.duration("server.drain_timeout", s.drain_timeout.as_deref(), secs(10))?,
    })
}

/// A key that takes one path or a list, as a list.
fn paths(raw: Option<OneOrMany>) -> Vec<PathBuf> {
    match raw {
        None => vec![],
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    }
}

/// Everything `load` finds in each of `files`; an error names `key` (with the file's index
/// when there are several).
fn load_each<T>(
    cx: &Ctx,
    key: &str,
    files: &[PathBuf],
    load: impl Fn(&Path) -> Result<Vec<T>, String>,
) -> Result<Vec<T>, ConfigError> {
    let mut out = Vec::new();
    for (i, p) in files.iter().enumerate() {
        let key = if files.len() == 1 {
            key.to_owned()
        } else {
            format!("{key}[{i}]")
        };
        out.extend(load(&cx.path(p)).map_err(|e| cx.err(key, e))?);
    }
    Ok(out)
}

/// `[client_auth]`: the mode, the trust anchors (loaded) and the allowed CNs.
fn client_auth(raw: Option<RawClientAuth>, cx: &Ctx) -> Result<ClientAuth, ConfigError> {
    let raw = raw.unwrap_or_default();
    let mode = raw.mode.unwrap_or(ClientAuthMode::Require);
    let allowed_cn = raw
        .allowed_cn
        .unwrap_or_else(|| vec![META_CLIENT_CN.to_owned()]);
    let roots = paths(raw.roots);
    let crl_files = paths(raw.crls);
    if mode == ClientAuthMode::Off {
        if !crl_files.is_empty() {
            return Err(cx.err(
                "client_auth.crls",
                "is set but client_auth.mode = \"off\" checks no certificates",
            ));
        }
        return Ok(ClientAuth {
            mode,
            anchors: vec![],
            allowed_cn,
            crls: vec![],
            crl_policy: CrlPolicy::Hard,
            crl_urls: vec![],
            crl_refresh: Duration::from_secs(3600),
            crl_fetch_timeout: Duration::from_secs(10),
        });
    }
    let mut crl_urls = Vec::new();
    for (i, u) in raw.crl_urls.iter().flatten().enumerate() {
        crl_urls.push(cx.http_url(&format!("client_auth.crl_urls[{i}]"), u)?);
    }
    let crl_refresh = cx.duration(
        "client_auth.crl_refresh",
        raw.crl_refresh.as_deref(),
        Duration::from_secs(3600),
    )?;
    let crl_fetch_timeout = cx.duration(
        "client_auth.crl_fetch_timeout",
        raw.crl_fetch_timeout.as_deref(),
        Duration::from_secs(10),
    )?;
    if raw.crl_policy.is_some() && crl_files.is_empty() && crl_urls.is_empty() {
        return Err(cx.err(
            "client_auth.crl_policy",
            "is set but client_auth.crls names no revocation list",
        ));
    }
    let crls = load_each(cx, "client_auth.crls", &crl_files, load_crls)?;
    if roots.is_empty() {
        return Err(cx.err(
            "client_auth.roots",
            format!("mode = \"{mode}\" needs at least one trust anchor file (see certs/README.md)"),
        ));
    }
    let anchors = load_each(cx, "client_auth.roots", &roots, |p| {
        load_anchors(p).map_err(|e| e.to_string())
    })?;
    if let Some(i) = allowed_cn.iter().position(String::is_empty) {
        return Err(cx.err(format!("client_auth.allowed_cn[{i}]"), "is empty"));
    }
    Ok(ClientAuth {
        mode,
        anchors,
        allowed_cn,
        crls,
        crl_policy: raw.crl_policy.unwrap_or_default(),
        crl_urls,
        crl_refresh,
        crl_fetch_timeout,
    })
}

/// `[upstream]`: the client's timeouts, extra CA (loaded) and response limit.
fn upstream(u: Option<RawUpstream>, cx: &Ctx) -> Result<UpstreamSettings, ConfigError> {
    let u = u.unwrap_or_default();
    let timeout = cx.duration(
        "upstream.timeout",
        u.timeout.as_deref(),
        Duration::from_millis(4500),
    )?;
    let connect_timeout = cx.duration(
        "upstream.connect_timeout",
        u.connect_timeout.as_deref(),
        Duration::from_secs(1),
    )?;
    let ca = match u.ca {
        None => None,
        Some(p) => {
            let path = cx.path(&p);
            let certs = load_certs(&path).map_err(|e| cx.err("upstream.ca", e.to_string()))?;
            Some((path, certs))
        }
    };
    Ok(UpstreamSettings {
        timeout,
        connect_timeout,
        ca,
        max_response_bytes: cx.bytes(
            "upstream.max_response_bytes",
            u.max_response_bytes,
            1024 * 1024,
        )?,
    })
}

/// `[[route]]`: at least one, paths distinct, secrets loaded, upstream URLs, and each route's
/// client certificate against the listener's `mode`.
fn routes(raw: Vec<RawRoute>, mode: ClientAuthMode, cx: &Ctx) -> Result<Vec<Route>, ConfigError> {
    if raw.is_empty() {
        return Err(cx.err("route", "no [[route]] is configured: add at least one"));
    }
    let mut seen = HashSet::new();
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| route(i, r, mode, &mut seen, cx))
        .collect()
}

/// One `[[route]]`, `i` its index; `seen` holds the paths of the routes before it.
fn route(
    i: usize,
    r: RawRoute,
    mode: ClientAuthMode,
    seen: &mut HashSet<String>,
    cx: &Ctx,
) -> Result<Route, ConfigError> {
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
    let upstream = cx.http_url(&k("upstream"), &r.upstream)?;
    let client_cert = match (mode, r.client_cert) {
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
    let dedupe = match r.dedupe {
        None | Some(RouteDedupe::Body) => DedupeMode::Body,
        Some(RouteDedupe::Off) => DedupeMode::Off,
        Some(RouteDedupe::Item) => DedupeMode::Item,
    };
    if delivery == Delivery::Spool && dedupe == DedupeMode::Off {
        return Err(cx.err(
            k("dedupe"),
            "cannot be off on a spool route: the spool de-duplicates every route by [dedupe] window",
        ));
    }
    let split = r.split.unwrap_or_default();
    if dedupe == DedupeMode::Item && split != SplitMode::Item {
        return Err(cx.err(
            k("dedupe"),
            format!(
                "\"item\" needs split = \"item\" (this route has split = \"{}\"): only a route that delivers updates one by one can skip the ones it delivered already",
                split.as_str()
            ),
        ));
    }
    let backend_secret = match (&r.backend_secret, split) {
        (Some(_), SplitMode::None) => {
            return Err(cx.err(
                k("backend_secret"),
                "signs the parts of a split batch, but this route has split = \"none\" (its events reach the backend with Meta's own signature)",
            ))
        }
        (Some(src), _) => Some(cx.secret(&k("backend_secret"), src)?),
        (None, SplitMode::None) => None,
        (None, _) => Some(app_secrets[0].clone()),
    };
    Ok(Route {
        path: r.path,
        verify_token,
        app_secrets,
        upstream,
        client_cert,
        legacy_sha1: r.legacy_sha1,
        delivery,
        dedupe,
        split,
        backend_secret,
    })
}

/// `[admin]`: off unless the section is there; its address differs from the listener's. The
/// inspector shows request bodies (personal data): off unless asked for, and refused on an
/// address other than loopback without a token.
fn admin(
    raw: Option<RawAdmin>,
    server: &ServerSettings,
    cx: &Ctx,
) -> Result<(Option<SocketAddr>, Option<InspectorSettings>), ConfigError> {
    let Some(a) = raw else {
        return Ok((None, None));
    };
    let text = a.listen.as_deref().unwrap_or("127.0.0.1:9901");
    let addr: SocketAddr = text.parse().map_err(|_| {
        cx.err(
            "admin.listen",
            format!("`{text}` is not an address like 127.0.0.1:9901"),
        )
    })?;
    if addr == server.listen && addr.port() != 0 {
        return Err(cx.err("admin.listen", "must differ from server.listen"));
    }
    let token = match &a.token {
        Some(src) => {
            let t = cx.secret("admin.token", src)?;
            if t.expose().len() < 16 {
                return Err(cx.err(
                    "admin.token",
                    "must be at least 16 characters (it guards request bodies)",
                ));
            }
            Some(t)
        }
        None => None,
    };
    if a.inspector != Some(true) {
        if a.inspector_capacity.is_some() {
            return Err(cx.err(
                "admin.inspector_capacity",
                "is set but the inspector is off (admin.inspector = true turns it on)",
            ));
        }
        return Ok((Some(addr), None));
    }
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(cx.err(
            "admin.token",
            format!(
                "is required: the inspector shows request bodies, and admin.listen ({addr}) is not a loopback address"
            ),
        ));
    }
    let capacity = a.inspector_capacity.unwrap_or(500);
    if !(1..=100_000).contains(&capacity) {
        return Err(cx.err(
            "admin.inspector_capacity",
            format!("{capacity} is not between 1 and 100000"),
        ));
    }
    Ok((Some(addr), Some(InspectorSettings { capacity, token })))
}

/// `[trusted_proxies]`: the networks, and which identity header they vouch with.
fn trusted_proxies(
    raw: Option<RawTrustedProxies>,
    client_auth: &ClientAuth,
    cx: &Ctx,
) -> Result<TrustedProxies, ConfigError> {
    let Some(raw) = raw else {
        return Ok(TrustedProxies::none());
    };
    let nets = cx.cidrs("trusted_proxies.cidrs", &raw.cidrs)?;
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

/// `[dedupe]`, the part for sync routes: the in-memory window and its size.
fn sync_dedupe(
    raw: &RawDedupe,
    spool: Option<&SpoolSettings>,
    cx: &Ctx,
) -> Result<SyncDedupe, ConfigError> {
    let shared = raw.store == Some(DedupeStoreName::Postgres);
    let on_postgres = spool.is_some_and(|s| matches!(s.backend, SpoolBackend::Postgres(_)));
    if shared && !on_postgres {
        return Err(cx.err(
            "dedupe.store",
            "\"postgres\" keeps the keys in the spool's database: it needs [spool] backend = \"postgres\"",
        ));
    }
    Ok(SyncDedupe {
        shared,
        window: cx.duration(
            "dedupe.sync_window",
            raw.sync_window.as_deref(),
            Duration::from_secs(600),
        )?,
        max_entries: cx.positive("dedupe.sync_max_entries", raw.sync_max_entries, 100_000)?,
    })
}

/// `[spool]`: required when a route spools; `window` is `dedupe.window`.
fn spool(
    raw: Option<RawSpool>,
    window: Option<&str>,
    routes: &[Route],
    cx: &Ctx,
) -> Result<Option<SpoolSettings>, ConfigError> {
    let Some(raw) = raw else {
        return match routes.iter().position(|r| r.delivery == Delivery::Spool) {
            None => Ok(None),
            Some(i) => Err(cx.err(
                format!("route[{i}].delivery"),
                "is \"spool\" but there is no [spool] section with a path",
            )),
        };
    };
    let mut s = match raw.backend.unwrap_or(SpoolBackendName::Sqlite) {
        SpoolBackendName::Sqlite => sqlite_spool(&raw, cx)?,
        SpoolBackendName::Postgres => postgres_spool(&raw, cx)?,
    };
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
    s.max_concurrency_per_route = cx.positive(
        "spool.max_concurrency",
        raw.max_concurrency,
        s.max_concurrency_per_route,
    )?;
    if let Some(v) = raw.dead_letter_4xx {
        s.dead_letter_4xx = v;
    }
    s.lease = cx.duration("spool.lease", raw.lease.as_deref(), s.lease)?;
    s.accept_timeout = cx.duration(
        "spool.accept_timeout",
        raw.accept_timeout.as_deref(),
        s.accept_timeout,
    )?;
    let key = match s.backend {
        SpoolBackend::Sqlite => "spool.path",
        SpoolBackend::Postgres(_) => "spool.url",
    };
    s.check().map_err(|e| cx.err(key, e.to_string()))?;
    Ok(Some(s))
}

/// `backend = "sqlite"`: `path` is required; the PostgreSQL keys are refused.
fn sqlite_spool(raw: &RawSpool, cx: &Ctx) -> Result<SpoolSettings, ConfigError> {
    for (key, set) in [
        ("spool.url", raw.url.is_some()),
        ("spool.pool_size", raw.pool_size.is_some()),
        ("spool.ca", raw.ca.is_some()),
    ] {
        if set {
            return Err(cx.err(key, "is only for backend = \"postgres\""));
        }
    }
    let path = raw
        .path
        .as_ref()
        .map(|p| cx.path(p))
        .ok_or_else(|| cx.err("spool.path", "is required (the spool's database file)"))?;
    let mut s = SpoolSettings::new(path);
    s.max_size_bytes = raw.max_size_bytes;
    Ok(s)
}

/// `backend = "postgres"`: `url` is required (a secret: it may hold a password); `path` and
/// `max_size_bytes` are refused (the database's own limits apply).
fn postgres_spool(raw: &RawSpool, cx: &Ctx) -> Result<SpoolSettings, ConfigError> {
    for (key, set) in [
        ("spool.path", raw.path.is_some()),
        ("spool.max_size_bytes", raw.max_size_bytes.is_some()),
    ] {
        if set {
            return Err(cx.err(key, "is only for backend = \"sqlite\""));
        }
    }
    let url = raw.url.as_ref().ok_or_else(|| {
        cx.err(
            "spool.url",
            "is required with backend = \"postgres\" (or set HUBGATE_SPOOL_URL)",
        )
    })?;
    let url = cx.secret("spool.url", url)?;
    let ca = match &raw.ca {
        None => None,
        Some(p) => {
            let path = cx.path(p);
            Some(load_certs(&path).map_err(|e| cx.err("spool.ca", e.to_string()))?)
        }
    };
    Ok(SpoolSettings::postgres(PostgresSettings {
        url,
        pool_size: cx.positive("spool.pool_size", raw.pool_size, 16)?,
        ca,
    }))
}

/// Across sections: PROXY protocol headers are believed only from `[trusted_proxies]`.
fn proxy_protocol(
    server: &ServerSettings,
    trusted_proxies: &TrustedProxies,
    cx: &Ctx,
) -> Result<(), ConfigError> {
    if server.proxy_protocol && trusted_proxies.cidrs.is_empty() {
        return Err(cx.err(
            "server.proxy_protocol",
            "needs [trusted_proxies] cidrs: PROXY headers are accepted only from those addresses",
        ));
    }
    Ok(())
}
