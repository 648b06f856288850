//! Plain-HTTP upstreams (`http://`, the sidecar and legacy-backend case): HTTP/1.1 connections
//! kept in a pool and driven by the request's own task.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own: a request
//! goes to it over a channel and its answer comes back over another, two task wake-ups per
//! request on top of the socket's. Here the request's task takes an idle connection, polls the
//! connection's state machine itself while it waits for the answer and reads the body, then
//! puts the connection back. An idle connection is polled by no one; when it is taken again it
//! is first polled once, which notices a connection the backend closed meanwhile.
//!
//! `https://` upstreams keep hyper-util's client (TLS, ALPN, HTTP/2).
//!
//! A reaper task (started with the pool, when there is a runtime) looks at the idle connections
//! every [`REAP_EVERY`] and closes those the backend closed or that sat idle too long, so an
//! idle gate does not hold half-closed sockets.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Driver = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One upstream connection: the handle requests are sent through, and the connection's state
/// machine, which someone must poll for anything to happen.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Pin<Box<Driver>>,
    /// The state machine finished: the connection is closed.
    done: bool,
}

impl Conn {
    /// Polls the connection's state machine (unless it finished).
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && self.driver.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
    }

    /// Whether it can take another request now (checked without waiting).
    fn reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop()));
        !self.done && self.sender.is_ready()
    }
}

struct Idle {
    authority: String,
    conn: Conn,
    since: Instant,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made (connect refused, timed out, name not resolved).
    Connect(std::io::Error),
    /// The request or response failed on an established connection.
    Exchange(hyper::Error),
    /// The body was larger than the limit.
    TooLarge,
    /// Reading the body failed.
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// How often the reaper looks at the idle connections.
pub const REAP_EVERY: Duration = Duration::from_secs(5);

/// The pool of idle connections to plain-HTTP upstreams.
pub struct H1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl H1Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> H1Pool {
        let inner = Arc::new(Inner {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&inner)));
        }
        H1Pool { inner }
    }

    /// Sends `request` (absolute `http://` URI) and returns the answer with its whole body
    /// (at most `limit` bytes). The request is sent as origin-form with `Host` set from the
    /// URI. A request that could not be written on a reused connection (the backend had
    /// closed it) is sent again on a new one.
    pub async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<Response<Bytes>, Failure> {
        let uri = request.uri().clone();
        let authority = uri.authority().map_or("", |a| a.as_str()).to_owned();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
        if let Ok(host) = HeaderValue::from_str(&authority) {
            request.headers_mut().insert(http::header::HOST, host);
        }
        let mut idle = self.inner.checkout(&authority);
        loop {
            let reused = idle.is_some();
            let mut conn = match idle.take() {
                Some(c) => c,
                None => self.inner.connect(&authority).await?,
            };
            let sent = {
                let mut answer = std::pin::pin!(conn.sender.try_send_request(request));
                poll_fn(|cx| {
                    conn.drive(cx);
                    answer.as_mut().poll(cx)
                })
                .await
            };
            let response = match sent {
                Ok(r) => r,
                Err(mut e) => match e.take_message() {
                    // Not written: the backend closed the idle connection before it could be.
                    // Once more, on a new connection (a new one failing is an error).
                    Some(r) if reused => {
                        request = r;
                        continue;
                    }
                    _ => return Err(Failure::Exchange(e.into_error())),
                },
            };
            let (head, body) = response.into_parts();
            let body = read_body(&mut conn, body, limit).await?;
            self.inner.checkin(authority, conn);
            return Ok(Response::from_parts(head, body));
        }
    }
}

impl Inner {
    /// The most recently used idle connection to `authority` that is still usable; closes
    /// those found closed or idle too long on the way (the reaper closes the others).
    fn checkout(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap();
        while let Some(pos) = idle.iter().rposition(|i| i.authority == authority) {
            let found = idle.swap_remove(pos);
            let mut conn = found.conn;
            if found.since.elapsed() < self.idle_timeout && conn.reusable() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, authority: String, mut conn: Conn) {
        if !conn.reusable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() >= self.max_idle {
            idle.remove(0); // the least recently used
        }
        idle.push(Idle {
            authority,
            conn,
            since: Instant::now(),
        });
    }

    async fn connect(&self, authority: &str) -> Result<Conn, Failure> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| {
                Failure::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.connect_timeout),
                ))
            })?
            .map_err(Failure::Connect)?;
        tcp.set_nodelay(true).map_err(Failure::Connect)?;
        let (sender, driver) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(Failure::Exchange)?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver),
            done: false,
        })
    }
}

/// The reaper: every [`REAP_EVERY`], closes the idle connections that the backend closed or that
/// sat idle past the timeout; ends with the pool.
async fn reap(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap();
        let timeout = pool.idle_timeout;
        idle.retain_mut(|i| i.since.elapsed() < timeout && i.conn.reusable());
    }
}

/// The whole body, at most `limit` bytes, driving the connection meanwhile.
async fn read_body(conn: &mut Conn, body: Incoming, limit: usize) -> Result<Bytes, Failure> {
    let mut collect = std::pin::pin!(Limited::new(body, limit).collect());
    let collected = poll_fn(|cx| {
        conn.drive(cx);
        collect.as_mut().poll(cx)
    })
    .await;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Failure::TooLarge),
        Err(e) => Err(Failure::Body(e)),
    }
}
