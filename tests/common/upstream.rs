//! The backend behind the gate: a real HTTP/1.1 server on 127.0.0.1 (plain or TLS) that records
//! every request with the status it was answered, and whose answers a test can script.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::Pki;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The single value of a header; panics when it appears more than once.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut all = self.headers.get_all(name).iter();
        let first = all.next()?;
        assert!(all.next().is_none(), "header {name} appears more than once");
        Some(String::from_utf8_lossy(first.as_bytes()).into_owned())
    }
}

/// What the upstream answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Default for Reply {
    fn default() -> Self {
        Reply {
            status: 200,
            body: Bytes::from_static(b"ok"),
            headers: vec![("content-type".into(), "text/plain".into())],
            delay: Duration::ZERO,
        }
    }
}

impl Reply {
    /// The default answer (200 `ok`), given after `delay`.
    pub fn delayed(delay: Duration) -> Reply {
        Reply {
            delay,
            ..Reply::default()
        }
    }
}

/// Decides the status for the `n`-th request (0-based, over all requests) the upstream receives;
/// the body is then `ok` for 2xx and `no` otherwise.
type Responder = Arc<dyn Fn(usize, &Recorded) -> u16 + Send + Sync>;

struct UpstreamState {
    /// Every request, with the status it was (or is being) answered with.
    log: Mutex<Vec<(Recorded, u16)>>,
    reply: Mutex<Reply>,
    respond: Mutex<Option<Responder>>,
}

/// A plain-HTTP/1.1 (or HTTPS) backend on 127.0.0.1 that records every request. A request
/// counts as *delivered* when it arrived and was given a 2xx status (recorded on arrival,
/// before the answer is written: a request the gate sent is one the application got).
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

/// A 127.0.0.1 port that refuses connections: bound but never listening, so no other test
/// can take it while the returned socket lives.
pub fn closed_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

impl Upstream {
    /// On a fresh port, answering 200 `ok`.
    pub async fn start() -> Upstream {
        Self::with_reply(Reply::default()).await
    }

    pub async fn with_reply(reply: Reply) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, reply, None)
    }

    /// Starts listening on a socket reserved earlier with [`closed_port`]: until now the port
    /// refused connections (the backend was "down").
    pub fn listen_on(socket: tokio::net::TcpSocket) -> Upstream {
        let listener = socket.listen(1024).expect("listen on the reserved port");
        Self::serve(listener, Reply::default(), None)
    }

    /// An HTTPS backend presenting the PKI's server certificate (chain to the test root).
    pub async fn start_tls(pki: &Pki) -> Upstream {
        use rustls_pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(pki.path("server-chain.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Reply::default(), Some(acceptor))
    }

    fn serve(
        listener: TcpListener,
        reply: Reply,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            log: Mutex::new(Vec::new()),
            reply: Mutex::new(reply),
            respond: Mutex::new(None),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(shared.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Upstream { addr, state }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// From now on, answer with the status `f` decides (body `ok` for 2xx, `no` otherwise).
    pub fn respond(&self, f: impl Fn(usize, &Recorded) -> u16 + Send + Sync + 'static) {
        *self.state.respond.lock().unwrap() = Some(Arc::new(f));
    }

    /// From now on, answer every request with `status`.
    pub fn set_status(&self, status: u16) {
        self.respond(move |_, _| status);
    }

    /// The body of every answer from now on.
    pub fn set_body(&self, body: &[u8]) {
        self.state.reply.lock().unwrap().body = bytes::Bytes::copy_from_slice(body);
    }

    /// Time between receiving a request (it is recorded then) and answering it.
    pub fn set_delay(&self, delay: Duration) {
        self.state.reply.lock().unwrap().delay = delay;
    }

    /// Every request, with the status it was answered.
    pub fn log(&self) -> Vec<(Recorded, u16)> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log().into_iter().map(|(r, _)| r).collect()
    }

    /// The one request received; panics unless exactly one arrived.
    pub fn only(&self) -> Recorded {
        let r = self.requests();
        assert_eq!(r.len(), 1, "upstream received {} requests", r.len());
        r.into_iter().next().unwrap()
    }

    pub fn assert_nothing_received(&self) {
        let r = self.requests();
        assert!(
            r.is_empty(),
            "upstream must receive nothing, got {} request(s): {:?}",
            r.len(),
            r.iter().map(|r| (&r.method, &r.uri)).collect::<Vec<_>>()
        );
    }

    /// Waits (bounded) until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.requests().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream received {} of {n} requests",
                self.requests().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many requests carried `body` (whatever they were answered).
    pub fn received(&self, body: &[u8]) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|(r, _)| r.body == body).count()
    }

    /// How many requests carrying `body` were answered 2xx.
    pub fn delivered(&self, body: &[u8]) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter()
            .filter(|(r, s)| r.body == body && (200..300).contains(s))
            .count()
    }

    /// The requests answered 2xx, per body.
    pub fn deliveries(&self) -> HashMap<Bytes, usize> {
        let mut m = HashMap::new();
        for (r, s) in self.state.log.lock().unwrap().iter() {
            if (200..300).contains(s) {
                *m.entry(r.body.clone()).or_default() += 1;
            }
        }
        m
    }

    /// The one 2xx-answered request carrying `body`; panics unless there is exactly one.
    pub fn the_delivery(&self, body: &[u8]) -> Recorded {
        let log = self.log();
        let got: Vec<&Recorded> = log
            .iter()
            .filter(|(r, s)| r.body == body && (200..300).contains(s))
            .map(|(r, _)| r)
            .collect();
        assert_eq!(
            got.len(),
            1,
            "deliveries of {:?}",
            String::from_utf8_lossy(body)
        );
        got[0].clone()
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    req: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers,
        body,
    };
    let reply = state.reply.lock().unwrap().clone();
    let (status, scripted) = {
        let mut log = state.log.lock().unwrap();
        let respond = state.respond.lock().unwrap().clone();
        let status = match &respond {
            Some(f) => f(log.len(), &recorded),
            None => reply.status,
        };
        log.push((recorded, status));
        (status, respond.is_some())
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = if scripted {
        let text: &'static [u8] = if (200..300).contains(&status) {
            b"ok"
        } else {
            b"no"
        };
        http::Response::new(Full::new(Bytes::from_static(text)))
    } else {
        let mut resp = http::Response::new(Full::new(reply.body.clone()));
        for (k, v) in &reply.headers {
            resp.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        resp
    };
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    Ok(resp)
}
