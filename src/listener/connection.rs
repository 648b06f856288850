//! One connection's life: the PROXY protocol header (when enabled), the source allow-list,
//! the TLS handshake with its deadline, the client's identity, then HTTP/1.1 or HTTP/2 through
//! hyper-util's auto builder until the peer leaves, the connection idles out, or a drain
//! closes it gracefully.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, warn};

use super::proxy_protocol;
use crate::identity::{Peer, SessionExpired};
use crate::pipeline;
use crate::state::{Generation, Shared};
use crate::tls::HandshakeFailure;

/// What the requests of one connection share.
struct Connection {
    peer: Peer,
    opened: Instant,
    activity: Activity,
    shared: Arc<Shared>,
}

/// Serves one accepted connection with the generation current when it was accepted.
pub(super) async fn serve(
    mut stream: TcpStream,
    mut addr: SocketAddr,
    generation: Arc<Generation>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let metrics = &shared.metrics;
    let settings = &generation.config().server;
    let clients = &generation.clients;
    if settings.proxy_protocol {
        let trusted = clients.trusts(addr.ip());
        let deadline = settings.handshake_timeout;
        match proxy_protocol::read_proxy_header(&mut stream, addr, trusted, deadline).await {
            Ok(Some(client)) => {
                debug!(%client, "PROXY protocol header");
                addr = client;
            }
            Ok(None) => {}
            Err(e) => {
                metrics.connection_refused("proxy_protocol");
                warn!(reason = "proxy_protocol", error = %e, "connection refused");
                return;
            }
        }
    }
    if clients.admit_connection(addr.ip()).is_err() {
        metrics.connection_refused("source_not_allowed");
        warn!(reason = "source_not_allowed", client = %addr, "connection refused");
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
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let peer = match clients.connection(addr, leaf) {
        Ok(peer) => peer,
        Err(SessionExpired) => {
            metrics.handshake_failed(HandshakeFailure::Expired.as_str());
            warn!(
                reason = %HandshakeFailure::Expired,
                "TLS session refused: the client certificate it was made with has expired"
            );
            return;
        }
    };
    debug!(
        client_cn = peer.tls.as_ref().map(|i| i.cn.as_str()),
        "TLS established"
    );
    let opened = Instant::now();
    let conn = Arc::new(Connection {
        peer,
        opened,
        activity: Activity::default(),
        shared: shared.clone(),
    });
    let service = {
        let conn = conn.clone();
        let generation = generation.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            let generation = generation.clone();
            async move {
                let _in_flight = InFlight::enter(&conn);
                let response = pipeline::handle(&generation, &conn.shared, &conn.peer, req).await;
                Ok::<_, Infallible>(response)
            }
        })
    };
    metrics.connection_opened();
    let _open = scopeguard(|| conn.shared.metrics.connection_closed());
    let connection = generation.http.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);

    // Close the connection once it has been idle (no request in flight) for idle_timeout, and
    // on shutdown let in-flight requests finish: hyper's graceful_shutdown does both. (hyper-util's
    // `GracefulShutdown` watcher would take the connection out of our hands, and the idle
    // timeout and the per-connection closing deadline need it; the listener's semaphore counts
    // what is still open.)
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
                if conn.activity.idle_for(opened) >= idle {
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

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the connection started.
    last_done_ms: AtomicU64,
}

impl Activity {
    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self, opened: Instant) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed));
        opened.elapsed().saturating_sub(last)
    }
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
struct InFlight<'a>(&'a Connection);

impl<'a> InFlight<'a> {
    fn enter(conn: &'a Connection) -> Self {
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
