//! Body size limit (declared and streamed), body deadline, and upstream failures: unreachable,
//! slow, broken and oversized answers.

mod common;

use std::pin::Pin;

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use hyper::body::Frame;

const LIMIT: usize = 1024;

/// A scenario whose body limit is [`LIMIT`].
fn limited<'a>() -> Scenario<'a> {
    Scenario::new().server(|s| s.max_body_bytes = Some(LIMIT as u64))
}

async fn setup() -> Started {
    limited().start().await
}

/// A request body of several chunks with no known length: HTTP/1.1 sends it chunked, HTTP/2
/// without `content-length`.
struct Chunked(Vec<Bytes>);

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Ok(Frame::data(self.0.remove(0)))))
        }
    }
}

fn chunks_of(body: &[u8], size: usize) -> reqwest::Body {
    reqwest::Body::wrap(Chunked(
        body.chunks(size).map(Bytes::copy_from_slice).collect(),
    ))
}

/// POSTs `body` signed, in 300-byte chunks of unknown total length.
async fn post_streamed(s: &Started, proto: Proto, body: &[u8]) -> reqwest::Response {
    s.http_proto(proto)
        .post(s.url("/webhook"))
        .header(SIG, sign(SECRET, body))
        .body(chunks_of(body, 300))
        .send()
        .await
        .expect("request")
}

fn json_of_len(n: usize) -> Vec<u8> {
    let mut b = b"{\"pad\":\"".to_vec();
    b.resize(n - 2, b'x');
    b.extend_from_slice(b"\"}");
    assert_eq!(b.len(), n);
    b
}

#[tokio::test]
async fn body_exactly_at_the_limit_is_forwarded() {
    let s = setup().await;
    let body = json_of_len(LIMIT);
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().body, body);
}

#[tokio::test]
async fn declared_length_one_over_the_limit_is_413() {
    let s = setup().await;
    let body = json_of_len(LIMIT + 1);
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.status(), 413);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn declared_length_over_the_limit_is_413_over_http2() {
    let s = setup().await;
    let body = json_of_len(LIMIT + 1);
    let resp = post_signed(&s.http_proto(Proto::H2), &s.url("/webhook"), &body)
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 413);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn declared_length_over_the_limit_is_refused_before_the_body_is_sent() {
    let s = setup().await;
    // Only the head: a gate that waited for 10 MB of body would never answer.
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
        s.gate.authority(),
        sign(SECRET, b"")
    );
    let resp = s.raw(head.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 413);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let s = setup().await;
    let body = json_of_len(2 * LIMIT);
    let resp = post_streamed(&s, Proto::H1, &body).await;
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 413);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn chunked_body_within_the_limit_is_forwarded_with_a_length() {
    let s = setup().await;
    let body = json_of_len(LIMIT);
    let resp = post_streamed(&s, Proto::H1, &body).await;
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert_eq!(got.body, body);
    assert_eq!(got.header("transfer-encoding"), None);
    assert_eq!(got.header("content-length"), Some(LIMIT.to_string()));
}

#[tokio::test]
async fn raw_chunked_body_over_the_limit_is_413() {
    let s = setup().await;
    let body = json_of_len(2 * LIMIT);
    // One chunk per 500 bytes, terminated; the whole request fits one TLS record.
    let mut encoded = Vec::new();
    for c in body.chunks(500) {
        encoded.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        encoded.extend_from_slice(c);
        encoded.extend_from_slice(b"\r\n");
    }
    encoded.extend_from_slice(b"0\r\n\r\n");
    let mut req = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
        s.gate.authority(),
        sign(SECRET, &body)
    )
    .into_bytes();
    req.extend_from_slice(&encoded);
    let resp = s.raw(&req).await.unwrap();
    assert_eq!(resp.status, 413);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn http2_body_without_length_over_the_limit_is_413() {
    let s = setup().await;
    let body = json_of_len(2 * LIMIT);
    let resp = post_streamed(&s, Proto::H2, &body).await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 413);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn http2_body_without_length_within_the_limit_is_forwarded() {
    let s = setup().await;
    let body = json_of_len(LIMIT);
    let resp = post_streamed(&s, Proto::H2, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().body, body);
}

#[tokio::test]
async fn body_that_stalls_is_408() {
    let s = limited()
        .server(|s| s.body_timeout = Some("300ms".into()))
        .start()
        .await;
    // Declares 100 bytes, sends 10, then waits.
    let req = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Length: 100\r\n{SIG}: {}\r\nConnection: close\r\n\r\n0123456789",
        s.gate.authority(),
        sign(SECRET, b"x")
    );
    let started = Instant::now();
    let resp = s.raw(req.as_bytes()).await.unwrap();
    assert_eq!(resp.status, 408);
    assert!(started.elapsed() < Duration::from_secs(5));
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let (_reserved, dead) = closed_port();
    let s = Scenario::new()
        .upstream_url(&format!("http://{dead}/hook"))
        .start()
        .await;
    let resp = s.post_signed(&sample_body()).await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn slow_upstream_is_504_within_the_timeout() {
    let s = limited()
        .reply(Reply::delayed(Duration::from_secs(10)))
        .upstream_client(|u| u.timeout = Some("500ms".into()))
        .start()
        .await;
    let started = Instant::now();
    let resp = s.post_signed(&sample_body()).await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    // It was sent; the answer just came too late.
    assert_eq!(s.upstream.requests().len(), 1);
}

#[tokio::test]
async fn upstream_closing_without_an_answer_is_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            drop(stream);
        }
    });
    let s = Scenario::new()
        .upstream_url(&format!("http://{addr}/hook"))
        .start()
        .await;
    let resp = s.post_signed(&sample_body()).await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn oversized_upstream_answer_is_502() {
    let reply = Reply {
        body: Bytes::from(vec![b'x'; 2000]),
        ..Reply::default()
    };
    let s = limited()
        .reply(reply)
        .upstream_client(|u| u.max_response_bytes = Some(1000))
        .start()
        .await;
    let resp = s.post_signed(&sample_body()).await;
    assert_eq!(resp.status(), 502);
    assert!(!resp.text().await.unwrap().contains("xxxx"));
}

/// Reads from `stream` until the peer closes it (EOF or error); how long that took.
async fn time_until_closed<S: tokio::io::AsyncRead + Unpin>(mut stream: S) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the gate must close the connection");
    started.elapsed()
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_handshake_timeout() {
    let s = limited()
        .server(|s| s.handshake_timeout = Some("300ms".into()))
        .start()
        .await;
    // TCP only: no ClientHello is ever sent.
    let tcp = tokio::net::TcpStream::connect(s.gate.addr).await.unwrap();
    let took = time_until_closed(tcp).await;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn incomplete_request_head_is_cut_off_after_the_header_timeout() {
    let s = limited()
        .server(|s| s.header_timeout = Some("300ms".into()))
        .start()
        .await;
    let mut tls = s.connect().await;
    use tokio::io::AsyncWriteExt;
    // A request line and one header, never the blank line.
    tls.write_all(b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let took = time_until_closed(tls).await;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn three_megabyte_body_is_forwarded_over_http2_with_the_default_limit() {
    let s = Scenario::new().start().await;
    let body = json_of_len(3 * 1024 * 1024);
    let resp = post_signed(&s.http_proto(Proto::H2), &s.url("/webhook"), &body)
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert!(got.body == body, "upstream body differs");
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let body = json_of_len(LIMIT);
    let mut tls = s.connect().await;
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
        s.gate.authority(),
        body.len(),
        sign(SECRET, &body)
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !interim.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).await.unwrap();
            interim.push(byte[0]);
        }
    })
    .await
    .expect("an interim answer before the body");
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    tls.write_all(&body).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(s.upstream.only().body, body);
}

/// A body still arriving holds its share of `server.max_buffered_bytes`: with the whole budget
/// reserved by one unfinished chunked body, the next POST gets 503 (Meta retries), and once that
/// connection is gone the budget is free again.
#[tokio::test]
async fn buffered_body_budget_answers_503_when_exhausted() {
    use tokio::io::AsyncWriteExt;
    let s = limited()
        .server(|s| s.max_buffered_bytes = Some(LIMIT as u64))
        .start()
        .await;
    let tcp = tokio::net::TcpStream::connect(s.gate.addr).await.unwrap();
    let mut tls = tls_connect_on(s.tls_config(Some(&s.cert), false), tcp, "localhost")
        .await
        .unwrap();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n{SIG}: sha256=00\r\n\r\n4\r\nabcd\r\n",
        s.gate.authority()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let client = s.http();
    let url = s.url("/webhook");
    let refused = post_signed(&client, &url, b"{\"n\":1}").await.unwrap();
    assert_eq!(refused.status(), 503);
    s.upstream.assert_nothing_received();

    drop(tls);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post_signed(&client, &url, b"{\"n\":2}").await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the budget was not released: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.upstream.only().body, Bytes::from_static(b"{\"n\":2}"));
}

// ---------------------------------------------------------------------------------------------
// The request head: Host, size and count (server.max_header_bytes, server.max_headers)

/// A signed POST to `/webhook` whose head carries `extra` (lines ending in `\r\n`).
fn post_with_head(s: &Started, extra: &str) -> Vec<u8> {
    signed_post(&s.gate.authority(), "/webhook", &sample_body(), extra)
}

async fn raw(s: &Started, request: &[u8]) -> RawResponse {
    raw_exchange(&s.pki, Some(&s.cert), s.gate.addr, request)
        .await
        .expect("an answer")
}

fn count(s: &Started, route: &str, verdict: &str, status: u16) -> u64 {
    s.counter(&format!(
        "hubgate_requests_total{{route=\"{route}\",verdict=\"{verdict}\",status=\"{status}\"}}"
    ))
}

#[tokio::test]
async fn an_http11_request_without_host_is_400_and_http10_needs_none() {
    let s = Scenario::new().admin().start().await;
    let body = sample_body();
    let no_host = format!(
        "POST /webhook HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
        body.len(),
        sign(SECRET, &body)
    );
    let mut req = no_host.into_bytes();
    req.extend_from_slice(&body);
    let r = raw(&s, &req).await;
    assert_eq!(r.status, 400);
    assert_eq!(count(&s, "/webhook", "bad_request", 400), 1);
    assert!(s.upstream.requests().is_empty());
    // HTTP/1.0 has no Host requirement.
    let old = format!(
        "POST /webhook HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{SIG}: {}\r\n\r\n",
        body.len(),
        sign(SECRET, &body)
    );
    let mut req = old.into_bytes();
    req.extend_from_slice(&body);
    assert_eq!(raw(&s, &req).await.status, 200);
}

#[tokio::test]
async fn a_head_over_max_header_bytes_is_431_on_both_protocols() {
    let s = Scenario::new()
        .admin()
        .server(|sv| sv.max_header_bytes = Some(8192))
        .start()
        .await;
    // Just under: served.
    let fits = format!("X-Pad: {}\r\n", "a".repeat(6000));
    assert_eq!(raw(&s, &post_with_head(&s, &fits)).await.status, 200);
    // Over the limit, within hyper's read buffer: the pipeline refuses it, on the route.
    let over = format!("X-Pad: {}\r\n", "a".repeat(9000));
    assert_eq!(raw(&s, &post_with_head(&s, &over)).await.status, 431);
    assert_eq!(count(&s, "/webhook", "head_too_large", 431), 1);
    // Far over (500 KB, what was once accepted and forwarded): refused while it is read.
    let huge = format!("X-Pad: {}\r\n", "a".repeat(500_000));
    assert_eq!(raw(&s, &post_with_head(&s, &huge)).await.status, 431);
    assert_eq!(count(&s, "-", "head_too_large", 431), 1);
    // HTTP/2 alike.
    let body = sample_body();
    let h2 = s
        .http_proto(Proto::H2)
        .post(s.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .header("x-pad", "a".repeat(9000))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(h2.status(), 431);
    assert_eq!(count(&s, "/webhook", "head_too_large", 431), 2);
    assert_eq!(s.upstream.requests().len(), 1, "only the request that fit");
}

#[tokio::test]
async fn more_header_fields_than_max_headers_is_431() {
    let s = Scenario::new()
        .admin()
        .server(|sv| sv.max_headers = Some(20))
        .start()
        .await;
    let fields = |n: usize| (0..n).map(|i| format!("X-F{i}: v\r\n")).collect::<String>();
    // signed_post writes 5 fields itself.
    assert_eq!(raw(&s, &post_with_head(&s, &fields(15))).await.status, 200);
    assert_eq!(raw(&s, &post_with_head(&s, &fields(16))).await.status, 431);
    assert_eq!(count(&s, "/webhook", "head_too_large", 431), 1);
    assert_eq!(raw(&s, &post_with_head(&s, &fields(200))).await.status, 431);
    assert_eq!(count(&s, "-", "head_too_large", 431), 1);
}
