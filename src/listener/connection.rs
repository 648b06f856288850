//! One connection's life: the PROXY protocol header (when enabled), the source allow-list,
//! the TLS handshake with its deadline, the client's identity, then hyper — HTTP/2 when ALPN
//! chose it, else HTTP/1.1, parked while idle — until the peer leaves, the connection idles
//! out, or a drain closes it gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, warn};

use super::proxy_protocol;
use super::tls_io::{self, TlsIo};
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
    stopped: watch::Receiver<bool>,
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
    // Boxed, as is the stream it gives: what a task holds for its whole life is the size of
    // its largest state, and a connection spends nearly all of it after the handshake.
    let handshake = Box::pin(tls_io::accept(generation.tls.clone(), stream));
    // Boxed: moved between the HTTP phases of a connection, the TLS session would
    // otherwise take a slot of its own in the task for each place it passes through.
    let tls = match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => Box::new(tls),
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
    let leaf = tls.session().peer_certificates().and_then(|c| c.first());
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
    let mut life = Life {
        conn: &conn,
        no_route_label: &generation.no_route_label,
        settings,
        stopped,
        closing: false,
    };
    if tls.session().alpn_protocol() == Some(b"h2".as_slice()) {
        // Boxed like HTTP/1.1's: inline, this state would size every connection's task.
        let mut connection = Box::pin(
            generation
                .http2
                .serve_connection(TokioIo::new(tls), service),
        );
        life.drive(connection.as_mut(), |c| c.graceful_shutdown(), None)
            .await;
        return;
    }
    // HTTP/1.1 (RFC 9113 §3.3: over TLS, HTTP/2 is only ever chosen by ALPN).
    let mut io = tls;
    let mut prefix = Bytes::new();
    loop {
        let connection = generation
            .http1
            .serve_connection(TokioIo::new(Prefixed::new(prefix, io)), service.clone());
        // Boxed: hyper's state (and its buffers) is freed while the connection is parked.
        let mut connection = Box::pin(connection);
        let park = Some(PARK_AFTER);
        if life
            .drive(connection.as_mut(), |c| c.graceful_shutdown(), park)
            .await
            == Ended::Closed
        {
            return;
        }
        // Idle with keep-alive switched off: hyper finishes at once and hands the socket back.
        // Boxed too: awaited inline, the connection it holds would size the task.
        let parts = match Box::pin(Pin::into_inner(connection).without_shutdown()).await {
            Ok(parts) => parts,
            Err(e) => {
                debug!(error = %e, "connection ended with an error");
                return;
            }
        };
        // Taken apart here, so that nothing of hyper's outlives this statement: what is left of
        // `parts` would otherwise be dropped at the end of the loop body, after the park.
        (io, prefix) = {
            let (rest, inner) = parts.io.into_inner().into_parts();
            let read_buf = parts.read_buf;
            // Even empty, a `Bytes` view holds the whole buffer it came from (hyper's read
            // buffer, 8 KiB): what a parked connection keeps must be a fresh empty one.
            let prefix = match (rest.is_empty(), read_buf.is_empty()) {
                (true, true) => Bytes::new(),
                (false, true) => rest,
                (true, false) => read_buf,
                (false, false) => [rest, read_buf].concat().into(),
            };
            (inner, prefix)
        };
        // A request already received (a writer's step let rustls decrypt it) is served at
        // once: the socket's readiness would not announce it again.
        if prefix.is_empty() && !io.has_buffered_input() && !life.park(&mut io).await {
            return;
        }
    }
}

/// An idle HTTP/1.1 connection gives its HTTP state back after this long (hyper's read and
/// write buffers, ~24 KiB): a parked connection holds only its socket and TLS session until
/// the client sends again.
const PARK_AFTER: Duration = Duration::from_secs(1);

#[derive(PartialEq, Eq)]
enum Ended {
    /// The connection is over.
    Closed,
    /// Idle past the park delay: keep-alive is switched off, the caller takes the socket back.
    Park,
}

/// What a connection's successive HTTP phases share: the idle timeout, the drain on shutdown.
struct Life<'a> {
    conn: &'a Connection,
    /// The route label of requests that never reached a route (`-`).
    no_route_label: &'a crate::metrics::RouteLabel,
    settings: &'a crate::config::ServerSettings,
    stopped: watch::Receiver<bool>,
    /// A drain or the idle timeout is closing the connection.
    closing: bool,
}

impl Life<'_> {
    /// Drives an HTTP connection until it ends; with `park_after`, until it has been idle that
    /// long (then it is told to finish, and `Park` returned).
    ///
    /// Closes the connection once it has been idle (no request in flight) for idle_timeout, and
    /// on shutdown lets in-flight requests finish: hyper's graceful_shutdown does both.
    /// (hyper-util's `GracefulShutdown` watcher would take the connection out of our hands, and
    /// the idle timeout and the per-connection closing deadline need it; the listener's
    /// semaphore counts what is still open.)
    async fn drive<C>(
        &mut self,
        mut connection: Pin<&mut C>,
        graceful: impl Fn(Pin<&mut C>),
        park_after: Option<Duration>,
    ) -> Ended
    where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        let settings = self.settings;
        let idle = settings.idle_timeout;
        // The nearer of the two deadlines, the park and the idle timeout. The check sleeps until
        // this connection would reach it if it stayed idle from its last request, so that it
        // parks (or closes) on time, with one timer wake per deadline while it is busy.
        let target = park_after.map_or(idle, |p| p.min(idle));
        let check = tokio::time::sleep(target);
        tokio::pin!(check);
        // Once closing, a peer gets `drain_timeout` to take what is still being written: one
        // that stops reading must not hold its connection (and its max_connections slot)
        // forever.
        let hard_stop = tokio::time::sleep(Duration::MAX);
        tokio::pin!(hard_stop);
        if self.closing {
            graceful(connection.as_mut());
            hard_stop
                .as_mut()
                .reset(tokio::time::Instant::now() + settings.drain_timeout);
        }
        let result = loop {
            tokio::select! {
                r = connection.as_mut() => break r,
                _ = &mut hard_stop, if self.closing => {
                    debug!("closing deadline passed; dropping the connection");
                    return Ended::Closed;
                }
                _ = self.stopped.changed(), if !self.closing => {
                    self.closing = true;
                    graceful(connection.as_mut());
                    hard_stop.as_mut().reset(tokio::time::Instant::now() + settings.drain_timeout);
                }
                _ = &mut check, if !self.closing => {
                    let idle_for = self.conn.activity.idle_for(self.conn.opened);
                    if idle_for >= idle {
                        debug!("closing idle connection");
                        self.closing = true;
                        graceful(connection.as_mut());
                        hard_stop.as_mut().reset(tokio::time::Instant::now() + settings.drain_timeout);
                    } else if park_after.is_some_and(|p| idle_for >= p) {
                        graceful(connection.as_mut());
                        return Ended::Park;
                    } else {
                        // Not idle long enough (or a request in flight: idle_for is zero).
                        // The floor keeps millisecond rounding from spinning.
                        let wait = target.saturating_sub(idle_for).max(Duration::from_millis(10));
                        check.as_mut().reset(tokio::time::Instant::now() + wait);
                    }
                }
            }
        };
        match result {
            // hyper refused a head far over the limits while reading it (431, connection
            // closed): it never reached the pipeline, so it is logged and counted here.
            Err(e) if e.is_parse_too_large() => {
                warn!(
                    client = %self.conn.peer.addr,
                    reason = "head_too_large",
                    "request head over server.max_header_bytes or server.max_headers: answered 431"
                );
                self.conn
                    .shared
                    .metrics
                    .request(self.no_route_label, "head_too_large", 431);
            }
            Err(e) => debug!(error = %e, "connection ended with an error"),
            Ok(()) => {}
        }
        Ended::Closed
    }

    /// Holds a parked connection until the client sends again (`true`: serve it), the idle
    /// timeout passes or a drain starts (`false`: closed with a TLS close_notify).
    async fn park(&mut self, io: &mut Box<TlsIo>) -> bool {
        let metrics = &self.conn.shared.metrics;
        metrics.connection_parked();
        let _parked = scopeguard(|| metrics.connection_unparked());
        let idle_for = self.conn.activity.idle_for(self.conn.opened);
        let rest = self.settings.idle_timeout.saturating_sub(idle_for);
        // hyper read until the socket had nothing more (it was idle, and the TLS layer holds
        // no plaintext then), so readiness is what wakes a parked connection: a request, a
        // close_notify or a FIN alike. Until then it holds no buffer.
        io.release_buffers();
        let wake = tokio::select! {
            r = io.tcp().readable() => r.is_ok(),
            _ = self.stopped.changed() => false,
            _ = tokio::time::sleep(rest) => {
                debug!("closing idle connection");
                false
            }
        };
        if !wake {
            let _ = tokio::time::timeout(self.settings.drain_timeout, io.shutdown()).await;
        }
        wake
    }
}

/// An IO object that first yields bytes already read from it (what hyper had buffered when it
/// handed a parked connection back).
struct Prefixed<T> {
    prefix: Bytes,
    io: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: Bytes, io: T) -> Self {
        Prefixed { prefix, io }
    }

    fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
