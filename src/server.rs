//! The listener: accept loop, TLS handshake with a deadline, HTTP/1.1 and HTTP/2 through
//! hyper-util's auto builder, graceful drain — and [`handle`], where one request reads top to
//! bottom: TLS identity → route → challenge or signature → forward → response → one log line.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Config, Route, RouteClientCert, ServerSettings};
use crate::forward::{ForwardError, Upstream};
use crate::gate::signature::Signer;
use crate::gate::{challenge, Verdict};
use crate::tls::{HandshakeFailure, PeerIdentity};

/// A route with its secrets keyed and ready.
struct RouteState {
    route: Route,
    signer: Signer,
}

/// What every connection shares; read-only.
struct State {
    routes: HashMap<String, RouteState>,
    upstream: Upstream,
    max_body_bytes: usize,
    body_timeout: Duration,
}

/// What one connection knows about its peer.
struct ConnInfo {
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
    opened: Instant,
    activity: Activity,
}

/// Everything `run` needs, built and validated before the listener binds. `hubgate check`
/// builds one too, so it fails on everything `run` would fail on.
pub struct Prepared {
    config: Config,
    acceptor: TlsAcceptor,
    state: Arc<State>,
}

impl Prepared {
    pub fn new(config: Config) -> Result<Prepared, crate::Error> {
        let provider = crate::tls::crypto_provider();
        let tls = crate::tls::server_config(&config.server, &config.client_auth, provider.clone())?;
        let upstream = Upstream::new(&config.upstream, provider)?;
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let state = RouteState {
                    signer: Signer::new(&r.app_secrets, r.legacy_sha1),
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
        });
        Ok(Prepared {
            acceptor: TlsAcceptor::from(tls),
            state,
            config,
        })
    }
}

/// A running gate.
pub struct Running {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The address the TLS listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish within the drain deadline, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops (it only stops through `shutdown`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the listener and starts serving.
pub async fn start(prepared: Prepared) -> Result<Running, crate::Error> {
    let addr = prepared.config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| crate::Error::Bind { addr, source })?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, prepared, stopped));
    info!(listen = %local_addr, "hubgate listening");
    Ok(Running {
        local_addr,
        stop,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    prepared: Prepared,
    mut stopped: watch::Receiver<bool>,
) {
    let settings = &prepared.config.server;
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    // One permit per open connection: caps connections, and tells when the drain is complete.
    let limit = Arc::new(Semaphore::new(settings.max_connections));

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
        let conn = serve_connection(
            stream,
            peer,
            prepared.acceptor.clone(),
            prepared.state.clone(),
            http.clone(),
            settings.clone(),
            stopped.clone(),
        );
        tokio::spawn(
            async move {
                conn.await;
                drop(permit);
            }
            .instrument(tracing::info_span!("conn", %peer)),
        );
    }

    drop(listener);
    let open = settings.max_connections - limit.available_permits();
    let deadline = settings.drain_timeout;
    info!(open_connections = open, ?deadline, "draining");
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(deadline, limit.acquire_many(all))
        .await
        .is_err()
    {
        let left = settings.max_connections - limit.available_permits();
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
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    http: auto::Builder<TokioExecutor>,
    settings: ServerSettings,
    mut stopped: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = HandshakeFailure::classify(&e);
            warn!(reason = %reason, error = %e, "TLS handshake rejected");
            return;
        }
        Err(_) => {
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
    debug!(
        client_cn = identity.as_ref().map(|i| i.cn.as_str()),
        "TLS established"
    );
    let opened = Instant::now();
    let conn = Arc::new(ConnInfo {
        peer,
        identity,
        opened,
        activity: Activity::default(),
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| handle(state.clone(), conn.clone(), req))
    };
    let connection = http.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);

    // Close the connection once it has been idle (no request in flight) for idle_timeout, and
    // on shutdown let in-flight requests finish: hyper's graceful_shutdown does both.
    let idle = settings.idle_timeout;
    let mut tick = tokio::time::interval(idle.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = connection.as_mut() => break r,
            _ = stopped.changed(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tick.tick(), if !closing => {
                let a = &conn.activity;
                let since_last = opened.elapsed().saturating_sub(Duration::from_millis(a.last_done_ms.load(Ordering::Relaxed)));
                if a.in_flight.load(Ordering::Relaxed) == 0 && since_last >= idle {
                    debug!("closing idle connection");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
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
    let route = state.routes.get(req.uri().path());
    let (verdict, response) = match route {
        None => reject(Verdict::NotFound),
        Some(route) => process(&state, route, &conn, req).await,
    };
    info!(
        target: "hubgate::access",
        peer = %conn.peer,
        route = route.map(|r| r.route.path.as_str()).unwrap_or("-"),
        method = %method,
        verdict = verdict.label(),
        reason = verdict.reason(),
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        client_cn = conn.identity.as_ref().map(|i| i.cn.as_str()).unwrap_or("-"),
        "request"
    );
    Ok(response)
}

async fn process(
    state: &State,
    route: &RouteState,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> (Verdict, Response<Full<Bytes>>) {
    if route.route.client_cert == RouteClientCert::Required && conn.identity.is_none() {
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
            let body = match read_body(state, &parts.headers, body).await {
                Ok(b) => b,
                Err(v) => return reject(v),
            };
            if let Err(e) = route.signer.verify(&parts.headers, &body) {
                return reject(Verdict::Signature(e));
            }
            let forwarded = state
                .upstream
                .forward(
                    &route.route.upstream,
                    &parts,
                    body,
                    conn.peer,
                    conn.identity.as_ref(),
                )
                .await;
            match forwarded {
                Ok(resp) => (Verdict::Forwarded(resp.status()), resp),
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
        _ => {
            let (v, mut r) = reject(Verdict::MethodNotAllowed);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            (v, r)
        }
    }
}

/// Reads the whole body within the size limit and deadline. A declared `Content-Length` over
/// the limit is refused before a byte of the body is read.
async fn read_body(
    state: &State,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Bytes, Verdict> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(Verdict::BodyTooLarge);
    }
    let limited = Limited::new(body, state.max_body_bytes);
    match tokio::time::timeout(state.body_timeout, limited.collect()).await {
        Err(_) => Err(Verdict::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
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
