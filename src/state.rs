//! What a running gate holds: the [`Generation`] that one configuration builds (new
//! connections get the current one; open connections keep theirs), and the process-wide
//! `Shared` parts that outlive reloads (metrics, the spool, recent sync deliveries, the body
//! budget, the drain flag).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use crate::config::{Config, Route};
use crate::deliver::{Recent, RecentDeliveries, Upstream};
use crate::gate::signature::Signer;
use crate::identity::{verifier, ClientPolicy};
use crate::metrics::{Metrics, RouteLabel};
use crate::spool::Spool;
use crate::tls;

/// A route with its secrets keyed and ready.
pub struct RouteState {
    pub route: Route,
    pub signer: Signer,
    /// Signs the parts of a split batch for the backend (routes with `split`).
    pub resigner: Option<Signer>,
    pub label: RouteLabel,
}

/// Everything built from one configuration, validated before use: the TLS server's
/// configuration, the client policy with its one certificate verifier, keyed routes and the
/// upstream client.
/// `hubgate check` builds one too, so it fails on everything `run` would fail on; a reload
/// builds a new one and swaps it in only if that succeeded.
pub struct Generation {
    config: Config,
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<TokioExecutor>,
    pub(crate) clients: ClientPolicy,
    pub(crate) routes: HashMap<String, RouteState>,
    /// The route label of requests to unknown paths.
    pub(crate) no_route_label: RouteLabel,
    pub(crate) upstream: Arc<Upstream>,
}

impl Generation {
    pub fn new(config: Config) -> Result<Generation, crate::Error> {
        let provider = crate::pki::crypto_provider();
        let verifier = verifier::client_verifier(&config.client_auth, provider.clone())?;
        let tls = tls::server_config(&config.server, verifier.clone(), provider.clone())?;
        let upstream = Arc::new(Upstream::new(&config.upstream, provider)?);
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let state = RouteState {
                    signer: Signer::new(&r.app_secrets, r.legacy_sha1),
                    resigner: r
                        .backend_secret
                        .as_ref()
                        .map(|s| Signer::new(std::slice::from_ref(s), false)),
                    label: Arc::new(r.path.clone()),
                    route: r.clone(),
                };
                (r.path.clone(), state)
            })
            .collect();
        // ALPN picks the protocol (see `listener::connection`): `h2` is served by the HTTP/2
        // builder, anything else by the HTTP/1.1 one, whose idle connections can be parked.
        // The head limits: `pipeline::check_head` enforces them exactly, with its 431, log line
        // and metric; hyper's own limits sit just above them, so that a head far larger is
        // refused while it is read (hyper answers 431; `listener::connection` logs and counts).
        let server = &config.server;
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(server.header_timeout)
            .max_headers(server.max_headers + 1)
            .max_buf_size((server.max_header_bytes + 16 * 1024).max(8192))
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        // HPACK counts 32 bytes more per field than the names and values.
        let h2_list = server.max_header_bytes + 32 * (server.max_headers + 1) + 4096;
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .max_header_list_size(u32::try_from(h2_list).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(30));
        Ok(Generation {
            tls,
            http1,
            http2,
            clients: ClientPolicy::new(&config, verifier),
            routes,
            no_route_label: Arc::new("-".to_owned()),
            upstream,
            config,
        })
    }

    /// The configuration this was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// What the listener, the admin endpoints, spool delivery and reloads share.
pub(crate) struct Shared {
    /// The configuration generation new connections get.
    pub(crate) current: ArcSwap<Generation>,
    pub(crate) metrics: Arc<Metrics>,
    /// Settings fixed at start: a reload that changes them is told to restart.
    pub(crate) started_with: Config,
    /// The durable spool, open for the process's life when any route spools.
    pub(crate) spool: Option<Spool>,
    /// Bodies sync routes delivered recently (kept across reloads).
    pub(crate) recent: Recent,
    /// Request body bytes held in memory at once, in KiB permits (`server.max_buffered_bytes`).
    pub(crate) body_budget: Arc<Semaphore>,
    /// Recent requests for the inspector (`[admin] inspector = true`).
    pub(crate) inspector: Option<Arc<crate::inspect::Inspector>>,
    /// Told after each reload (the CRL fetcher looks at the new `crl_urls` then).
    pub(crate) reloaded: tokio::sync::Notify,
    /// Revocation lists fetched from `crl_urls` (see `ops::crls`).
    fetched_crls: std::sync::Mutex<Vec<crate::pki::Crl>>,
    /// Set when the drain starts: `/readyz` answers 503 from then on.
    draining: AtomicBool,
}

impl Shared {
    /// The lists fetched from `crl_urls` so far.
    pub(crate) fn fetched_crls(&self) -> Vec<crate::pki::Crl> {
        self.fetched_crls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_fetched_crls(&self, crls: Vec<crate::pki::Crl>) {
        *self.fetched_crls.lock().unwrap_or_else(|e| e.into_inner()) = crls;
    }

    pub(crate) fn new(
        generation: Generation,
        metrics: Arc<Metrics>,
        spool: Option<Spool>,
    ) -> Shared {
        let config = generation.config();
        let inspector = config
            .inspector
            .as_ref()
            .map(|i| Arc::new(crate::inspect::Inspector::new(i.capacity)));
        let dedupe = config.sync_dedupe;
        let budget_kib = usize::try_from(config.server.max_buffered_bytes.div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Shared {
            started_with: config.clone(),
            recent: match (&spool, dedupe.shared) {
                (Some(spool), true) => Recent::Shared {
                    spool: spool.clone(),
                    window: dedupe.window,
                },
                _ => Recent::Memory(RecentDeliveries::new(dedupe.window, dedupe.max_entries)),
            },
            body_budget: Arc::new(Semaphore::new(budget_kib)),
            current: ArcSwap::from_pointee(generation),
            metrics,
            spool,
            inspector,
            reloaded: tokio::sync::Notify::new(),
            fetched_crls: std::sync::Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
        }
    }

    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
