//! The benchmark's trivial upstream: HTTP/1.1 on loopback, reads the whole body and answers
//! `200 ok`. With `X-Bench-Check: 1` it answers the body's length and SHA-256 instead, so the
//! admission checks can prove the body arrived byte for byte. `GET /__bench/count` answers how
//! many POSTs it has received, so the load generator can prove every accepted event was
//! forwarded. One thread; stops by itself after `--max-seconds`.
//!
//! cargo run --release --example upstream -- --listen 127.0.0.1:19000

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:19000")]
    listen: SocketAddr,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

static POSTS: AtomicU64 = AtomicU64::new(0);
/// SHA-256 of the bodies of checked (`X-Bench-Check`) requests: few, from the admission checks.
static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == http::Method::GET && req.uri().path() == "/__bench/count" {
        let n = POSTS.load(Ordering::Relaxed);
        return Ok(Response::new(Full::new(Bytes::from(n.to_string()))));
    }
    if let Some(sha) = req.uri().path().strip_prefix("/__bench/seen/") {
        let seen = SEEN
            .lock()
            .map(|v| v.iter().any(|s| s == sha))
            .unwrap_or(false);
        let mut r = Response::new(Full::new(Bytes::from_static(if seen {
            b"yes"
        } else {
            b"no"
        })));
        if !seen {
            *r.status_mut() = http::StatusCode::NOT_FOUND;
        }
        return Ok(r);
    }
    if req.method() == http::Method::POST {
        POSTS.fetch_add(1, Ordering::Relaxed);
    }
    let check = req.headers().contains_key("x-bench-check");
    let body = match req.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"bad body\n")));
            *r.status_mut() = http::StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    let text = if check {
        let sha = hex::encode(Sha256::digest(&body));
        if let Ok(mut seen) = SEEN.lock() {
            if seen.len() < 10_000 {
                seen.push(sha.clone());
            }
        }
        Bytes::from(format!("len={} sha256={sha}", body.len()))
    } else {
        Bytes::from_static(b"ok")
    };
    let mut r = Response::new(Full::new(text));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(r)
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = TcpListener::bind(cli.listen).await.expect("bind");
        eprintln!("upstream listening on {}", cli.listen);
        let serve = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service_fn(handle))
                        .await;
                });
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(cli.max_seconds), serve).await;
    });
}
