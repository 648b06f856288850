//! One builder for every "PKI, upstream, gate, client" set-up:
//!
//! ```ignore
//! let s = Scenario::new()
//!     .server(|s| s.max_body_bytes = Some(1024))
//!     .route(|r| r.legacy_sha1 = true)
//!     .start()
//!     .await;
//! let resp = s.post_signed(&sample_body()).await;
//! ```
//!
//! `start` makes a fresh [`Pki`], starts the recording [`Upstream`] (unless the test brought its
//! own), renders the [`GateConfig`] with `/webhook` forwarding to `{upstream}/hook`, applies the
//! edits in order, and starts the gate through the library.

use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Where the route forwards to.
enum Backend {
    /// A fresh recording upstream with this answer.
    Recording(Reply),
    /// A fresh HTTPS upstream presenting the PKI's server certificate.
    Tls,
    /// An upstream the test started (and may script).
    Given(Upstream),
    /// A URL the test controls (a closed port, a hand-written server); `Started::upstream`
    /// is then a recording upstream the route does not use.
    Url(String),
}

type Edit<'a> = Box<dyn FnOnce(&mut GateConfig) + 'a>;

/// What a test sets up, before it starts.
pub struct Scenario<'a> {
    backend: Backend,
    files: Vec<(String, String)>,
    edits: Vec<Edit<'a>>,
}

impl Default for Scenario<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> Scenario<'a> {
    /// The default gate: `require` mode anchored at the test root, Meta's CN allowed, one route
    /// `/webhook` → `{upstream}/hook` with `TOKEN` and `SECRET`, upstream answering 200 `ok`.
    pub fn new() -> Self {
        Scenario {
            backend: Backend::Recording(Reply::default()),
            files: Vec::new(),
            edits: Vec::new(),
        }
    }

    /// The upstream answers `reply`.
    pub fn reply(mut self, reply: Reply) -> Self {
        self.backend = Backend::Recording(reply);
        self
    }

    /// The upstream is HTTPS with the PKI's server certificate; the route uses `https://`.
    pub fn tls_upstream(mut self) -> Self {
        self.backend = Backend::Tls;
        self
    }

    /// The route forwards to `{upstream}/hook` on an upstream the test started.
    pub fn upstream(mut self, upstream: &Upstream) -> Self {
        self.backend = Backend::Given(upstream.clone());
        self
    }

    /// The route forwards to `url`.
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.backend = Backend::Url(url.to_owned());
        self
    }

    /// Writes `text` as `name` into the PKI's folder before the gate starts.
    pub fn file(mut self, name: &str, text: &str) -> Self {
        self.files.push((name.to_owned(), text.to_owned()));
        self
    }

    /// Any change to the configuration.
    pub fn config(mut self, f: impl FnOnce(&mut GateConfig) + 'a) -> Self {
        self.edits.push(Box::new(f));
        self
    }

    /// A change to `[server]`.
    pub fn server(self, f: impl FnOnce(&mut Server) + 'a) -> Self {
        self.config(|c| f(&mut c.server))
    }

    /// A change to the `/webhook` route.
    pub fn route(self, f: impl FnOnce(&mut Route) + 'a) -> Self {
        self.config(|c| f(c.route()))
    }

    /// Another route.
    pub fn add_route(self, route: Route) -> Self {
        self.config(|c| c.routes.push(route))
    }

    /// `[client_auth]`.
    pub fn client_auth(self, auth: ClientAuth) -> Self {
        self.config(|c| c.client_auth = auth)
    }

    /// A change to `[upstream]` (how the gate talks to upstreams).
    pub fn upstream_client(self, f: impl FnOnce(&mut UpstreamClient) + 'a) -> Self {
        self.config(|c| f(&mut c.upstream))
    }

    /// The admin listener on 127.0.0.1:0.
    pub fn admin(self) -> Self {
        self.config(GateConfig::with_admin)
    }

    /// `[trusted_proxies]`.
    pub fn trusted_proxies(self, proxies: TrustedProxies) -> Self {
        self.config(|c| c.trusted_proxies = Some(proxies))
    }

    /// The route delivers through the spool ([`GateConfig::with_spool`]), changed by `f`.
    pub fn spool(self, f: impl FnOnce(&mut Spool) + 'a) -> Self {
        self.config(|c| f(c.with_spool()))
    }

    /// `NAME=value` in the environment the configuration reads `{ env = "NAME" }` from.
    pub fn env(self, name: &str, value: &str) -> Self {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.config(move |c| {
            c.env.insert(name, value);
        })
    }

    /// The configuration as it would start, with `pki`'s files written (for tests that start
    /// it later, elsewhere, or not at all).
    pub async fn prepare(self) -> (Pki, Upstream, GateConfig) {
        let pki = Pki::new();
        for (name, text) in &self.files {
            pki.write(name, text);
        }
        let (upstream, url) = match self.backend {
            Backend::Recording(reply) => {
                let up = Upstream::with_reply(reply).await;
                let url = up.url("/hook");
                (up, url)
            }
            Backend::Tls => {
                let up = Upstream::start_tls(&pki).await;
                let url = format!("https://127.0.0.1:{}/hook", up.addr.port());
                (up, url)
            }
            Backend::Given(up) => {
                let url = up.url("/hook");
                (up, url)
            }
            Backend::Url(url) => (Upstream::start().await, url),
        };
        let mut config = GateConfig::new(&url);
        for edit in self.edits {
            edit(&mut config);
        }
        (pki, upstream, config)
    }

    /// Starts everything.
    pub async fn start(self) -> Started {
        let (pki, upstream, config) = self.prepare().await;
        let gate = config.start(&pki).await;
        let cert = pki.meta_client();
        Started {
            pki,
            upstream,
            gate,
            config,
            cert,
        }
    }
}

/// A started scenario.
pub struct Started {
    pub pki: Pki,
    pub upstream: Upstream,
    pub gate: Gate,
    /// The configuration the gate runs (the base for reloads).
    pub config: GateConfig,
    /// Meta's client certificate ([`Pki::meta_client`]).
    pub cert: ClientCert,
}

impl Started {
    pub fn url(&self, path_and_query: &str) -> String {
        self.gate.url(path_and_query)
    }

    /// An HTTP/1.1 client presenting `identity`.
    pub fn client(&self, identity: Option<&ClientCert>) -> reqwest::Client {
        client(&self.pki, identity)
    }

    /// An HTTP/1.1 client presenting Meta's certificate.
    pub fn http(&self) -> reqwest::Client {
        self.http_proto(Proto::H1)
    }

    /// A client presenting Meta's certificate, offering only `proto`.
    pub fn http_proto(&self, proto: Proto) -> reqwest::Client {
        client_proto(&self.pki, Some(&self.cert), proto)
    }

    /// A rustls configuration trusting the test root and presenting `identity`.
    pub fn tls_config(
        &self,
        identity: Option<&ClientCert>,
        tls12_only: bool,
    ) -> Arc<rustls::ClientConfig> {
        Arc::new(tls_client_config(
            &self.pki,
            identity,
            Proto::H1,
            tls12_only,
        ))
    }

    /// A signed POST of `body` to `/webhook` with Meta's certificate over HTTP/1.1.
    pub async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.post_signed_to("/webhook", body).await
    }

    /// A signed POST of `body` to `path_and_query` with Meta's certificate over HTTP/1.1.
    pub async fn post_signed_to(&self, path_and_query: &str, body: &[u8]) -> reqwest::Response {
        post_signed(&self.http(), &self.url(path_and_query), body)
            .await
            .unwrap_or_else(|e| panic!("POST {path_and_query}: {}", error_chain(&e)))
    }

    /// A POST of `body` (JSON) to `/webhook` with Meta's certificate over HTTP/1.1 and each
    /// `(name, value)` header, e.g. a signature of the test's making.
    pub async fn post_with_headers(
        &self,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http()
            .post(self.url("/webhook"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request")
    }

    /// A signed POST of a [`unique_body`] on a fresh client presenting `identity` (connections
    /// from before a reload are not reused): the status, or the error.
    pub async fn post_fresh(&self, identity: Option<&ClientCert>) -> reqwest::Result<u16> {
        post_signed(
            &self.client(identity),
            &self.url("/webhook"),
            &unique_body(),
        )
        .await
        .map(|r| r.status().as_u16())
    }

    /// A signed raw HTTP/1.1 POST of `body` to `path` with `Host` set to the gate.
    pub fn signed_request(&self, path: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
        signed_post(&self.gate.authority(), path, body, extra_headers)
    }

    /// `request` verbatim over a fresh TLS connection presenting Meta's certificate.
    pub async fn raw(&self, request: &[u8]) -> std::io::Result<RawResponse> {
        raw_exchange(&self.pki, Some(&self.cert), self.gate.addr, request).await
    }

    /// A TLS connection presenting Meta's certificate.
    pub async fn connect(&self) -> Tls {
        tls_connect(&self.pki, Some(&self.cert), self.gate.addr).await
    }

    /// What hubgate sets as `X-Forwarded-Client-Cert` for Meta's certificate.
    pub fn expected_xfcc(&self) -> String {
        self.cert.meta_xfcc()
    }

    /// The gate's metrics.
    pub fn metrics(&self) -> String {
        self.gate.metrics()
    }

    /// The value of one counter or gauge series, `name{labels}` exactly as the metrics write
    /// it; 0 when the series does not exist (yet).
    pub fn counter(&self, series: &str) -> u64 {
        let prefix = format!("{series} ");
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(&prefix)
                    .map(|v| v.parse::<f64>().unwrap() as u64)
            })
            .unwrap_or(0)
    }

    /// Waits (bounded) until the metrics contain `needle`.
    pub async fn metrics_eventually_contain(&self, needle: &str) {
        eventually_contains(|| async { self.metrics() }, needle).await;
    }

    /// The running configuration changed by `f`, loaded (as the gate would load it).
    pub fn changed_config(
        &self,
        f: impl FnOnce(&mut GateConfig),
    ) -> Result<hubgate::Config, hubgate::ConfigError> {
        let mut next = self.config.clone();
        f(&mut next);
        next.load(&self.pki)
    }

    /// Reloads the gate with the running configuration changed by `f`; panics unless the new
    /// configuration loads and the reload succeeds.
    pub fn reload(&self, f: impl FnOnce(&mut GateConfig)) {
        let config = self.changed_config(f).expect("the new configuration loads");
        self.gate.running().reload(config).expect("reload succeeds");
    }
}

/// Waits (bounded, 5 s) until `text()` contains `needle`; panics with the last text otherwise.
pub async fn eventually_contains<F, Fut>(mut text: F, needle: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let t = text().await;
        if t.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {needle:?} in:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
