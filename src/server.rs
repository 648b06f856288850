//! The listener: accept loop, TLS handshake with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util's auto builder, graceful drain — and [`handle`], where one request reads top to
//! bottom: TLS identity → route → challenge or signature → forward → response → one log line.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Config, Delivery, Route, RouteClientCert};
use crate::dedupe::RecentDeliveries;
use crate::edge::{self, HeaderIdentityError, TrustedProxies};
use crate::forward::{self, ForwardError, Upstream};
use crate::gate::signature::Signer;
use crate::gate::{challenge, Verdict};
use crate::metrics::{Metrics, RouteLabel};
use crate::spool::{
    outcome_for_status, Accepted, Deliver, DeliveryOutcome, NewEvent, Spool, StoredEvent,
};
use crate::tls::{HandshakeFailure, PeerIdentity};

/// A route with its secrets keyed and ready.
struct RouteState {
    route: Route,
    signer: Signer,
    label: RouteLabel,
}

/// What every connection of one configuration generation shares; read-only.
struct State {
    routes: HashMap<String, RouteState>,
    upstream: Upstream,
    max_body_bytes: usize,
    body_timeout: Duration,
    /// The route label of requests to unknown paths.
    no_route_label: RouteLabel,
    trusted: TrustedProxies,
    /// For certificates passed on by a trusted proxy: the listener's own verifier.
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    allowed_cn: Vec<String>,
    allow_sources: Option<Vec<ipnet::IpNet>>,
}

impl State {
    fn source_allowed(&self, ip: std::net::IpAddr) -> bool {
        self.allow_sources
            .as_ref()
            .is_none_or(|nets| edge::contains(nets, ip))
    }
}

/// What one connection knows about its peer.
struct ConnInfo {
    peer: SocketAddr,
    /// The peer's address as an `X-Forwarded-For` value.
    peer_ip_header: HeaderValue,
    identity: Option<PeerIdentity>,
    opened: Instant,
    activity: Activity,
    shared: Arc<Shared>,
}

/// Everything built from one configuration, validated before use: the TLS acceptor, keyed
/// routes and the upstream client. `hubgate check` builds one too, so it fails on everything
/// `run` would fail on; a reload builds a new one and swaps it in only if that succeeded.
pub struct Prepared {
    config: Config,
    acceptor: TlsAcceptor,
    http: auto::Builder<TokioExecutor>,
    state: Arc<State>,
}

impl Prepared {
    pub fn new(config: Config) -> Result<Prepared, crate::Error> {
        let provider = crate::tls::crypto_provider();
        let tls = crate::tls::server_config(&config.server, &config.client_auth, provider.clone())?;
        let verifier = crate::tls::client_verifier(&config.client_auth, provider.clone())?;
        let upstream = Upstream::new(&config.upstream, provider)?;
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let state = RouteState {
                    signer: Signer::new(&r.app_secrets, r.legacy_sha1),
                    label: Arc::new(r.path.clone()),
                    route: r.clone(),
                };
                (r.path.clone(), state)
            })
            .collect();
        let state = Arc::new(State {
            routes,
            upstream,
            max_body_bytes: config.server.max_body_bytes,
            body_timeout: config.server.body_timeout,
            no_route_label: Arc::new("-".to_owned()),
            trusted: config.trusted_proxies.clone(),
            verifier,
            allowed_cn: config.client_auth.allowed_cn.clone(),
            allow_sources: config.server.allow_sources.clone(),
        });
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.server.header_timeout)
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            .keep_alive_interval(Duration::from_secs(30));
        Ok(Prepared {
            acceptor: TlsAcceptor::from(tls),
            http,
            state,
            config,
        })
    }

    /// The configuration this was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// What the listener, the admin endpoints and reloads share.
pub(crate) struct Shared {
    /// The configuration generation new connections get.
    current: ArcSwap<Prepared>,
    pub(crate) metrics: Arc<Metrics>,
    /// Settings fixed at start: a reload that changes them is told to restart.
    started_with: Config,
    /// The durable spool, open for the process's life when any route spools.
    pub(crate) spool: Option<Spool>,
    /// Bodies sync routes delivered recently (kept across reloads).
    recent: RecentDeliveries,
    /// Request body bytes held in memory at once, in KiB permits (`server.max_buffered_bytes`).
    body_budget: Arc<Semaphore>,
}

impl Shared {
    pub(crate) fn current(&self) -> Arc<Prepared> {
        self.current.load_full()
    }
}

/// A running gate.
pub struct Running {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    delivery: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The address the TLS listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The process's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Swaps in a new configuration: new connections get it, open ones finish on the old one.
    /// On error nothing changes. Settings that need a new socket (`server.listen`,
    /// `admin.listen`, `server.max_connections`) keep their old values, with a warning.
    pub fn reload(&self, config: Config) -> Result<(), crate::Error> {
        let started = &self.shared.started_with;
        let result = Prepared::new(config).and_then(|p| {
            let open = self.shared.spool.as_ref().map(|s| s.path());
            let wanted = p.config.spool.as_ref().map(|s| s.path.as_path());
            if open != wanted {
                return Err(crate::Error::Reload(
                    "[spool] can only change on restart (the spool stays open while serving)".into(),
                ));
            }
            if p.config.server.max_body_bytes as u64 > started.server.max_buffered_bytes {
                return Err(crate::Error::Reload(format!(
                    "server.max_body_bytes exceeds the running server.max_buffered_bytes ({}), which changes only on restart",
                    started.server.max_buffered_bytes
                )));
            }
            Ok(p)
        });
        self.shared.metrics.reload(result.is_ok());
        let prepared = result?;
        let old = &self.shared.started_with;
        let new = &prepared.config;
        let fixed = [
            ("server.listen", new.server.listen != old.server.listen),
            ("admin.listen", new.admin != old.admin),
            (
                "server.max_connections",
                new.server.max_connections != old.server.max_connections,
            ),
            (
                "server.max_buffered_bytes",
                new.server.max_buffered_bytes != old.server.max_buffered_bytes,
            ),
            ("[spool] settings", new.spool != old.spool),
            ("[dedupe] sync settings", new.sync_dedupe != old.sync_dedupe),
        ];
        for (key, _) in fixed.iter().filter(|(_, changed)| *changed) {
            warn!("{key} changed: it takes effect only on restart; the running value stays");
        }
        self.shared.metrics.set_certificates(new);
        let routes = new.routes.len();
        self.shared.current.store(Arc::new(prepared));
        info!(routes, "configuration reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish within the drain deadline, lets spool
    /// deliveries finish (or leaves them pending), closes the spool, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(delivery) = self.delivery {
            let _ = delivery.await;
        }
        if let Some(spool) = &self.shared.spool {
            spool.close().await;
        }
    }

    /// Waits until the server stops (it only stops through `shutdown`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the listeners and starts serving.
pub async fn start(prepared: Prepared) -> Result<Running, crate::Error> {
    let addr = prepared.config.server.listen;
    let bind_err = |addr| move |source| crate::Error::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err(addr))?;
    let local_addr = listener.local_addr().map_err(bind_err(addr))?;
    let admin = match prepared.config.admin {
        None => None,
        Some(a) => Some(TcpListener::bind(a).await.map_err(bind_err(a))?),
    };
    let metrics = Arc::new(Metrics::new());
    metrics.set_certificates(&prepared.config);
    let spool = match prepared.config.spool.clone() {
        None => None,
        Some(settings) => Some(
            tokio::task::spawn_blocking(move || Spool::open(settings))
                .await
                .map_err(|e| crate::Error::Reload(format!("opening the spool: {e}")))??,
        ),
    };
    let dedupe = prepared.config.sync_dedupe;
    let budget_kib = usize::try_from(prepared.config.server.max_buffered_bytes.div_ceil(1024))
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS);
    let shared = Arc::new(Shared {
        started_with: prepared.config.clone(),
        current: ArcSwap::from_pointee(prepared),
        metrics,
        spool,
        recent: RecentDeliveries::new(dedupe.window, dedupe.max_entries),
        body_budget: Arc::new(Semaphore::new(budget_kib)),
    });
    let (stop, stopped) = watch::channel(false);
    let delivery = shared.spool.as_ref().map(|spool| {
        let deliver = SpoolDelivery {
            shared: Arc::downgrade(&shared),
            dead_letter_4xx: spool.settings().dead_letter_4xx,
        };
        spool.start_delivery(Arc::new(deliver), stopped.clone())
    });
    let admin_addr = match admin {
        None => None,
        Some(l) => {
            let a = l.local_addr().map_err(bind_err(addr))?;
            tokio::spawn(crate::admin::serve(l, shared.clone(), stopped.clone()));
            info!(listen = %a, "admin listening");
            Some(a)
        }
    };
    let task = tokio::spawn(accept_loop(listener, shared.clone(), stopped));
    info!(listen = %local_addr, "hubgate listening");
    Ok(Running {
        local_addr,
        admin_addr,
        shared,
        stop,
        task,
        delivery,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let max_connections = shared.started_with.server.max_connections;
    // One permit per open connection: caps connections, and tells when the drain is complete.
    let limit = Arc::new(Semaphore::new(max_connections));

    loop {
        let permit = tokio::select! {
            _ = stopped.changed() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, never stop serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // The permit moves into the connection's own future: wrapping that future in another
        // async block would store it twice in the task (the captured value and the awaited one).
        let conn = serve_connection(
            stream,
            peer,
            shared.current(),
            shared.clone(),
            stopped.clone(),
            permit,
        );
        tokio::spawn(conn.instrument(tracing::info_span!("conn", %peer)));
    }

    drop(listener);
    let open = max_connections - limit.available_permits();
    let deadline = shared.current().config.server.drain_timeout;
    info!(open_connections = open, ?deadline, "draining");
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(deadline, limit.acquire_many(all))
        .await
        .is_err()
    {
        let left = max_connections - limit.available_permits();
        warn!(
            open_connections = left,
            "drain deadline passed; closing what is left"
        );
    }
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the connection started.
    last_done_ms: AtomicU64,
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Counts a request as in flight until dropped, also when hyper drops the request's future
/// (client gone, HTTP/2 stream reset).
struct InFlight<'a>(&'a ConnInfo);

impl<'a> InFlight<'a> {
    fn enter(conn: &'a ConnInfo) -> Self {
        conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(conn)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let a = &self.0.activity;
        let done_ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_done_ms.store(done_ms, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    generation: Arc<Prepared>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = &shared.metrics;
    let settings = &generation.config.server;
    let state = &generation.state;
    if settings.proxy_protocol {
        match edge::read_proxy_header(
            &mut stream,
            peer,
            &state.trusted,
            settings.handshake_timeout,
        )
        .await
        {
            Ok(Some(client)) => {
                debug!(%client, "PROXY protocol header");
                peer = client;
            }
            Ok(None) => {}
            Err(e) => {
                metrics.connection_refused("proxy_protocol");
                warn!(reason = "proxy_protocol", error = %e, "connection refused");
                return;
            }
        }
    }
    // A direct client (not a trusted proxy) is checked against the allow-list before TLS.
    if !state.trusted.trusts(peer.ip()) && !state.source_allowed(peer.ip()) {
        metrics.connection_refused("source_not_allowed");
        warn!(reason = "source_not_allowed", client = %peer, "connection refused");
        return;
    }
    let handshake = generation.acceptor.accept(stream);
    let tls = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = HandshakeFailure::classify(&e);
            metrics.handshake_failed(reason.as_str());
            warn!(reason = %reason, error = %e, "TLS handshake rejected");
            return;
        }
        Err(_) => {
            metrics.handshake_failed(HandshakeFailure::Timeout.as_str());
            warn!(reason = %HandshakeFailure::Timeout, "TLS handshake rejected");
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| PeerIdentity::from_leaf(leaf));
    // A full handshake checked the dates; a resumed session did not, and must not outlive the
    // certificate it was made with.
    if identity.as_ref().is_some_and(PeerIdentity::expired) {
        metrics.handshake_failed(HandshakeFailure::Expired.as_str());
        warn!(
            reason = %HandshakeFailure::Expired,
            "TLS session refused: the client certificate it was made with has expired"
        );
        return;
    }
    debug!(
        client_cn = identity.as_ref().map(|i| i.cn.as_str()),
        "TLS established"
    );
    let opened = Instant::now();
    let conn = Arc::new(ConnInfo {
        peer,
        peer_ip_header: HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value"),
        identity,
        opened,
        activity: Activity::default(),
        shared: shared.clone(),
    });
    let service = {
        let conn = conn.clone();
        let state = generation.state.clone();
        service_fn(move |req| handle(state.clone(), conn.clone(), req))
    };
    conn.shared.metrics.connection_opened();
    let _open = scopeguard(|| conn.shared.metrics.connection_closed());
    let connection = generation.http.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);

    // Close the connection once it has been idle (no request in flight) for idle_timeout, and
    // on shutdown let in-flight requests finish: hyper's graceful_shutdown does both.
    let idle = settings.idle_timeout;
    let mut tick = tokio::time::interval(idle.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Once closing, a peer gets `drain_timeout` to take what is still being written: one
    // that stops reading must not hold its connection (and its max_connections slot) forever.
    let mut closing = false;
    let hard_stop = tokio::time::sleep(Duration::MAX);
    tokio::pin!(hard_stop);
    let result = loop {
        tokio::select! {
            r = connection.as_mut() => break r,
            _ = &mut hard_stop, if closing => {
                debug!("closing deadline passed; dropping the connection");
                return;
            }
            _ = stopped.changed(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
                hard_stop.as_mut().reset(tokio::time::Instant::now() + settings.drain_timeout);
            }
            _ = tick.tick(), if !closing => {
                let a = &conn.activity;
                let since_last = opened.elapsed().saturating_sub(Duration::from_millis(a.last_done_ms.load(Ordering::Relaxed)));
                if a.in_flight.load(Ordering::Relaxed) == 0 && since_last >= idle {
                    debug!("closing idle connection");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                    hard_stop.as_mut().reset(tokio::time::Instant::now() + settings.drain_timeout);
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "connection ended with an error");
    }
}

/// One request, start to finish.
async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&conn);
    let method = req.method().clone();
    // The client: the TCP (or PROXY protocol) peer, or what a trusted proxy reports.
    let client_ip = state.trusted.client_address(conn.peer.ip(), req.headers());
    let route = state.routes.get(req.uri().path());
    let mut header_cn = None;
    let (verdict, response) = match route {
        None => reject(Verdict::NotFound),
        Some(route) => process(&state, route, &conn, client_ip, &mut header_cn, req).await,
    };
    let client_cn = header_cn
        .as_deref()
        .or(conn.identity.as_ref().map(|i| i.cn.as_str()));
    info!(
        target: "hubgate::access",
        peer = %conn.peer,
        client = %client_ip,
        route = route.map(|r| r.route.path.as_str()).unwrap_or("-"),
        method = %method,
        verdict = verdict.label(),
        reason = verdict.reason(),
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        client_cn = client_cn.unwrap_or("-"),
        "request"
    );
    let label = route.map_or(&state.no_route_label, |r| &r.label);
    conn.shared
        .metrics
        .request(label, &verdict, response.status().as_u16());
    Ok(response)
}

/// The request flow for a known route. `header_cn` receives the CN a trusted proxy reported,
/// for the log line.
async fn process(
    state: &State,
    route: &RouteState,
    conn: &ConnInfo,
    client_ip: std::net::IpAddr,
    header_cn: &mut Option<String>,
    req: Request<Incoming>,
) -> (Verdict, Response<Full<Bytes>>) {
    // Who the client is: the TLS peer, or what a trusted proxy says about it.
    let peer_ip = conn.peer.ip();
    let from_proxy = state.trusted.trusts(peer_ip);
    // Behind a trusted proxy with an allow-list, the client must be known and allowed: no
    // usable X-Forwarded-For hop (missing, unparseable, forwarded_for off) is a refusal.
    if from_proxy
        && state.allow_sources.is_some()
        && (client_ip == peer_ip || !state.source_allowed(client_ip))
    {
        return reject(Verdict::SourceNotAllowed);
    }
    let header_identity = if from_proxy {
        match edge::identity_from_headers(
            &state.trusted.identity,
            req.headers(),
            state.verifier.as_ref(),
            &state.allowed_cn,
        ) {
            Ok(id) => id,
            Err(HeaderIdentityError::Missing) => None,
            Err(e) => return reject(Verdict::IdentityHeader(e)),
        }
    } else {
        None
    };
    *header_cn = header_identity.as_ref().map(|i| i.cn.clone());
    let identity = header_identity.as_ref().or(conn.identity.as_ref());
    if route.route.client_cert == RouteClientCert::Required && identity.is_none() {
        return reject(Verdict::ClientCertRequired);
    }
    match *req.method() {
        Method::GET => match challenge::answer(req.uri().query(), &route.route.verify_token) {
            Ok(echo) => {
                let mut r = Response::new(Full::new(Bytes::from(echo)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                r.headers_mut().insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                );
                (Verdict::ChallengeAnswered, r)
            }
            Err(e) => reject(Verdict::Challenge(e)),
        },
        Method::POST => {
            let (parts, body) = req.into_parts();
            let budget = &conn.shared.body_budget;
            let (body, _reserved) = match read_body(state, budget, &parts.headers, body).await {
                Ok(b) => b,
                Err(v) => return reject(v),
            };
            let signed = match route.signer.verify(&parts.headers, &body) {
                Ok(m) => m,
                Err(e) => return reject(Verdict::Signature(e)),
            };
            // Several X-Forwarded-For lines are one list (RFC 9110 §5.3): keep every hop.
            let inbound_xff: Vec<&str> = if from_proxy && state.trusted.forwarded_for {
                parts
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect()
            } else {
                Vec::new()
            };
            let forwarded_for = if inbound_xff.is_empty() {
                conn.peer_ip_header.clone()
            } else {
                HeaderValue::from_str(&format!("{}, {peer_ip}", inbound_xff.join(", ")))
                    .unwrap_or_else(|_| conn.peer_ip_header.clone())
            };
            let client = forward::Client {
                forwarded_for,
                identity,
                trusted: &state.trusted,
            };
            match route.route.delivery {
                Delivery::Spool => spool(&conn.shared, route, &parts, body, &client).await,
                Delivery::Sync => {
                    let recent = &conn.shared.recent;
                    if route.route.dedupe && recent.contains(&route.label, &signed.mac) {
                        return ok_text(Verdict::Duplicate);
                    }
                    let forward_started = Instant::now();
                    let forwarded = state
                        .upstream
                        .forward(&route.route.upstream, &parts, body, &client)
                        .await;
                    let elapsed = forward_started.elapsed();
                    conn.shared.metrics.upstream_latency(&route.label, elapsed);
                    match forwarded {
                        Ok(resp) => {
                            if route.route.dedupe && resp.status().is_success() {
                                recent.insert(&route.label, &signed.mac);
                            }
                            (Verdict::Forwarded(resp.status()), resp)
                        }
                        Err(e) => {
                            warn!(route = %route.route.path, error = %e, "forwarding failed");
                            reject(match e {
                                ForwardError::Unreachable(_) => Verdict::UpstreamUnreachable,
                                ForwardError::Timeout(_) => Verdict::UpstreamTimeout,
                                ForwardError::BadResponse(_) => Verdict::UpstreamBadResponse,
                            })
                        }
                    }
                }
            }
        }
        _ => {
            let (v, mut r) = reject(Verdict::MethodNotAllowed);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            (v, r)
        }
    }
}

/// Stores an authenticated event durably (the 200 goes out only after the commit that holds
/// it), or answers 503 so that Meta retries when it cannot be stored.
async fn spool(
    shared: &Shared,
    route: &RouteState,
    parts: &http::request::Parts,
    body: Bytes,
    client: &forward::Client<'_>,
) -> (Verdict, Response<Full<Bytes>>) {
    let Some(spool) = &shared.spool else {
        // Validation makes this unreachable: a spool route needs [spool].
        return reject(Verdict::SpoolError);
    };
    let headers = forward::upstream_headers(parts, client)
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let event = NewEvent {
        route: route.route.path.clone(),
        body,
        headers,
        query: parts.uri.query().map(str::to_owned),
        client_identity: client.identity.map(|i| i.cn.clone()),
        received_at: std::time::SystemTime::now(),
    };
    match spool.accept(event).await {
        Ok(Accepted::Stored(_)) => ok_text(Verdict::Spooled),
        Ok(Accepted::Duplicate) => ok_text(Verdict::Duplicate),
        Err(e) => {
            warn!(route = %route.route.path, error = %e, "event not stored; answering 503 so that Meta retries");
            reject(if e.is_full() {
                Verdict::SpoolFull
            } else {
                Verdict::SpoolError
            })
        }
    }
}

/// A 200 that hubgate answers itself (the event is stored, or was delivered before).
fn ok_text(verdict: Verdict) -> (Verdict, Response<Full<Bytes>>) {
    let mut r = Response::new(Full::new(Bytes::from_static(b"EVENT_RECEIVED\n")));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    (verdict, r)
}

/// Delivers spooled events through the current configuration's upstream client.
struct SpoolDelivery {
    /// Weak: the spool (inside `Shared`) owns the delivery task that owns this.
    shared: std::sync::Weak<Shared>,
    dead_letter_4xx: bool,
}

impl Deliver for SpoolDelivery {
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = DeliveryOutcome> + Send + 'a>> {
        Box::pin(async move {
            let Some(shared) = self.shared.upgrade() else {
                return DeliveryOutcome::Retry("shutting down".into());
            };
            let generation = shared.current();
            let Some(route) = generation.state.routes.get(&event.route) else {
                return DeliveryOutcome::Retry(format!("route {} is not configured", event.route));
            };
            let started = Instant::now();
            let result = generation
                .state
                .upstream
                .deliver_stored(&route.route.upstream, event)
                .await;
            shared
                .metrics
                .upstream_latency(&route.label, started.elapsed());
            let outcome = match result {
                Ok(status) => outcome_for_status(status, self.dead_letter_4xx),
                Err(e) => DeliveryOutcome::Retry(e.to_string()),
            };
            shared.metrics.spool_delivery(&route.label, &outcome);
            outcome
        })
    }
}

/// Reads the whole body within the size limit and deadline. A declared `Content-Length` over
/// the limit is refused before a byte of the body is read.
///
/// The body's bytes count against a process-wide budget (`server.max_buffered_bytes`) until
/// the returned permit is dropped: many connections (or HTTP/2 streams) sending large bodies at
/// once get 503 (Meta retries) instead of exhausting memory.
async fn read_body(
    state: &State,
    budget: &Arc<Semaphore>,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<(Bytes, OwnedSemaphorePermit), Verdict> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(Verdict::BodyTooLarge);
    }
    // Reserve what the body may take: its declared length, or the limit when it has none.
    let reserve = declared.unwrap_or(state.max_body_bytes as u64);
    let kib = u32::try_from(reserve.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let permit = budget
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| Verdict::Overloaded)?;
    let limited = Limited::new(body, state.max_body_bytes);
    match tokio::time::timeout(state.body_timeout, limited.collect()).await {
        Err(_) => Err(Verdict::BodyTimeout),
        Ok(Ok(collected)) => Ok((collected.to_bytes(), permit)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Verdict::BodyTooLarge),
        Ok(Err(_)) => Err(Verdict::BodyError),
    }
}

/// A rejection's response: the status, and its reason phrase as plain text. The detail goes to
/// the log, not to the client.
fn reject(verdict: Verdict) -> (Verdict, Response<Full<Bytes>>) {
    let status = verdict.status();
    let text = format!("{}\n", status.canonical_reason().unwrap_or("error"));
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    (verdict, r)
}
