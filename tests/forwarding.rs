//! What the upstream receives for an admitted request (exact bytes, headers, identity), and what
//! the client gets back; HTTP/1.1 and HTTP/2 on the client side.

mod common;

use bytes::Bytes;
use common::*;

/// A complete signed HTTP/1.1 POST to `/webhook` with `extra` header lines and
/// `Connection: close{connection_tokens}`.
fn raw_post(s: &Started, body: &[u8], extra: &str, connection_tokens: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{SIG}: {}\r\nConnection: close{connection_tokens}\r\n{extra}\r\n",
        s.gate.authority(),
        body.len(),
        sign(SECRET, body),
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends [`raw_post`] of `body` on a fresh TLS connection with Meta's certificate: it must be
/// answered 200, and the one request the upstream received is returned.
async fn forward_raw(s: &Started, body: &[u8], extra: &str, connection_tokens: &str) -> Recorded {
    let resp = s
        .raw(&raw_post(s, body, extra, connection_tokens))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    s.upstream.only()
}

/// The upstream's one request is the signed POST of `body` with Meta's identity, to `/hook`.
fn assert_forwarded_as_sent(s: &Started, body: &[u8]) -> Recorded {
    let got = s.upstream.only();
    assert_eq!(got.method, "POST");
    assert_eq!(got.uri, "/hook");
    assert_eq!(got.body, body);
    assert_eq!(got.header(SIG), Some(sign(SECRET, body)));
    assert_eq!(
        got.header("x-forwarded-client-cert"),
        Some(s.expected_xfcc())
    );
    got
}

/// Whatever the client claimed, the upstream is told Meta's verified identity and the real
/// peer address.
fn assert_identity_replaced(s: &Started, got: &Recorded) {
    assert_eq!(
        got.header("x-forwarded-client-cert"),
        Some(s.expected_xfcc())
    );
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1".into()));
}

/// The default scenario, its upstream answering `reply`.
async fn replying(reply: Reply) -> Started {
    Scenario::new().reply(reply).start().await
}

#[tokio::test]
async fn http1_request_is_forwarded_end_to_end() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), "ok");
    assert_forwarded_as_sent(&s, &body);
}

#[tokio::test]
async fn http2_request_is_forwarded_end_to_end() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let resp = post_signed(&s.http_proto(Proto::H2), &s.url("/webhook"), &body)
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), "ok");
    let got = assert_forwarded_as_sent(&s, &body);
    // :authority stands in for Host.
    assert_eq!(got.header("x-forwarded-host"), Some(s.gate.authority()));
}

#[tokio::test]
async fn http2_streams_on_one_connection_are_each_forwarded() {
    let s = Scenario::new().start().await;
    let http = s.http_proto(Proto::H2);
    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect();
    let tasks: Vec<_> = bodies
        .iter()
        .map(|b| {
            let (http, url, b) = (http.clone(), s.url("/webhook"), b.clone());
            tokio::spawn(async move { post_signed(&http, &url, &b).await })
        })
        .collect();
    for task in tasks {
        let resp = task.await.unwrap().unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
    }
    let mut got: Vec<Bytes> = s.upstream.requests().into_iter().map(|r| r.body).collect();
    got.sort();
    let mut want: Vec<Bytes> = bodies.into_iter().map(Bytes::from).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn upstream_receives_exact_body_and_headers() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let got = forward_raw(&s, &body, "User-Agent: facebookexternalua\r\n", "").await;
    assert_eq!(got.method, "POST");
    assert_eq!(got.uri, "/hook");
    assert_eq!(got.version, http::Version::HTTP_11);
    assert_eq!(got.body, body);
    let expected = [
        ("host", s.upstream.addr.to_string()),
        ("content-type", "application/json".to_owned()),
        ("content-length", body.len().to_string()),
        (SIG, sign(SECRET, &body)),
        ("user-agent", "facebookexternalua".to_owned()),
        ("x-forwarded-for", "127.0.0.1".to_owned()),
        ("x-forwarded-proto", "https".to_owned()),
        ("x-forwarded-host", s.gate.authority()),
        ("x-forwarded-client-cert", s.expected_xfcc()),
    ];
    for (name, value) in &expected {
        assert_eq!(got.header(name).as_deref(), Some(value.as_str()), "{name}");
    }
    // Nothing else, except what `no_header_is_added_that_the_client_did_not_send` is about.
    let extra: Vec<_> = got
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| *k != "accept" && !expected.iter().any(|(n, _)| n == k))
        .collect();
    assert!(extra.is_empty(), "unexpected headers upstream: {extra:?}");
}

#[tokio::test]
async fn no_header_is_added_that_the_client_did_not_send() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    // No Accept header on the way in.
    let got = forward_raw(&s, &body, "", "").await;
    assert_eq!(
        got.header("accept"),
        None,
        "hubgate's upstream client added an Accept header"
    );
}

#[tokio::test]
async fn inbound_query_is_appended_to_the_upstream_url() {
    let s = Scenario::new()
        .route(|r| r.upstream.push_str("?src=meta"))
        .start()
        .await;
    let body = sample_body();
    let resp = s.post_signed_to("/webhook?attempt=2", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().uri, "/hook?src=meta&attempt=2");
}

#[tokio::test]
async fn spoofed_xfcc_and_xff_are_replaced() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let resp = s
        .http()
        .post(s.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .header("x-forwarded-client-cert", "Hash=evil")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6;proto=http")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    // `header` also asserts that each appears exactly once.
    assert_eq!(
        got.header("x-forwarded-client-cert"),
        Some(s.expected_xfcc())
    );
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1".into()));
    assert_eq!(got.header("x-forwarded-proto"), Some("https".into()));
    assert_eq!(got.header("x-forwarded-host"), Some(s.gate.authority()));
    assert_eq!(got.header("forwarded"), None);
    assert_eq!(got.body, body);
}

#[tokio::test]
async fn spoofed_xfcc_is_replaced_over_http2() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let resp = s
        .http_proto(Proto::H2)
        .post(s.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .header("x-forwarded-client-cert", "Hash=evil")
        .header("x-forwarded-for", "6.6.6.6")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert_identity_replaced(&s, &got);
}

#[tokio::test]
async fn spoofed_xfcc_is_removed_without_a_client_cert() {
    let s = Scenario::new().client_auth(ClientAuth::off()).start().await;
    let body = sample_body();
    let resp = s
        .client(None)
        .post(s.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .header(
            "x-forwarded-client-cert",
            "Hash=evil;Subject=\"CN=client.webhooks.fbclientcerts.com\"",
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert_eq!(got.header("x-forwarded-client-cert"), None);
    assert_eq!(got.body, body);
}

#[tokio::test]
async fn several_spoofed_xfcc_headers_are_all_removed() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let got = forward_raw(
        &s,
        &body,
        "X-Forwarded-Client-Cert: Hash=evil1\r\nx-forwarded-client-cert: Hash=evil2\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n",
        "",
    )
    .await;
    assert_identity_replaced(&s, &got);
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_dropped() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let got = forward_raw(
        &s,
        &body,
        "X-Hop-Custom: per-connection\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\nTrailer: X-Checksum\r\nX-End-To-End: kept\r\n",
        ", X-Hop-Custom",
    )
    .await;
    for name in [
        "connection",
        "x-hop-custom",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert_eq!(got.header(name), None, "{name} must not be forwarded");
    }
    assert_eq!(got.header("x-end-to-end"), Some("kept".into()));
    assert_eq!(got.body, body);
}

#[tokio::test]
async fn upstream_status_body_and_headers_are_relayed() {
    let reply = Reply {
        status: 202,
        body: Bytes::from_static(b"{\"queued\":true}"),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-request-id".into(), "abc-123".into()),
        ],
        ..Reply::default()
    };
    let s = replying(reply).await;
    let resp = s.post_signed(&sample_body()).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.bytes().await.unwrap(), "{\"queued\":true}");
}

#[tokio::test]
async fn upstream_error_status_is_relayed() {
    let reply = Reply {
        status: 500,
        body: Bytes::from_static(b"backend broke"),
        ..Reply::default()
    };
    let s = replying(reply).await;
    let resp = post_signed(&s.http_proto(Proto::H2), &s.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.bytes().await.unwrap(), "backend broke");
    assert_eq!(
        s.upstream.requests().len(),
        1,
        "forwarded exactly once, no retry"
    );
}

#[tokio::test]
async fn upstream_hop_by_hop_response_headers_are_dropped() {
    let reply = Reply {
        headers: vec![
            ("connection".into(), "x-up-hop".into()),
            ("x-up-hop".into(), "1".into()),
            ("keep-alive".into(), "timeout=5".into()),
            ("x-kept".into(), "yes".into()),
        ],
        ..Reply::default()
    };
    let s = replying(reply).await;
    let resp = s.post_signed(&sample_body()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-up-hop").is_none());
    assert!(resp.headers().get("keep-alive").is_none());
    assert_eq!(resp.headers()["x-kept"], "yes");
}

#[tokio::test]
async fn routes_forward_to_their_own_upstreams_with_their_own_secrets() {
    let up_b = Upstream::start().await;
    let s = Scenario::new()
        .add_route(Route {
            app_secrets: vec![Secret::inline("secret-b")],
            ..Route::new("/webhook-b", &up_b.url("/b"))
        })
        .start()
        .await;
    let http = s.http();
    let body = sample_body();

    let resp = http
        .post(s.url("/webhook-b"))
        .header(SIG, sign("secret-b", &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Route A's secret does not open route B.
    let resp = http
        .post(s.url("/webhook-b"))
        .header(SIG, sign(SECRET, &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    assert_eq!(up_b.only().uri, "/b");
    assert_eq!(up_b.only().body, body);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn keep_alive_connection_carries_several_requests() {
    let s = Scenario::new().start().await;
    let http = s.http();
    for i in 0..3 {
        let body = format!("{{\"n\":{i}}}").into_bytes();
        let resp = post_signed(&http, &s.url("/webhook"), &body).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap(), "ok");
    }
    let got: Vec<_> = s.upstream.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(got, vec!["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"]);
}

/// The identity header for a certificate whose subject has characters that cannot appear
/// verbatim in an HTTP header: the client was verified, so the upstream must still be told.
#[tokio::test]
async fn xfcc_is_set_for_a_subject_with_control_characters() {
    let s = Scenario::new().start().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.subject_extra = vec![(rcgen::DnType::OrganizationName, "Line\r\nBreak".to_owned())];
    let cert = s.pki.client(&spec);
    let body = sample_body();
    let resp = post_signed(&s.client(Some(&cert)), &s.url("/webhook"), &body)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    let xfcc = got
        .header("x-forwarded-client-cert")
        .expect("a verified client must be identified to the upstream");
    assert!(
        xfcc.starts_with(&format!("Hash={};", cert.leaf_sha256())),
        "{xfcc}"
    );
    assert!(!xfcc.contains('\r') && !xfcc.contains('\n'), "{xfcc:?}");
}

#[tokio::test]
async fn xfcc_carries_a_non_ascii_subject() {
    let s = Scenario::new().start().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.subject_extra = vec![(rcgen::DnType::OrganizationName, "Bäckerei".to_owned())];
    let cert = s.pki.client(&spec);
    let resp = post_signed(&s.client(Some(&cert)), &s.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let xfcc = s
        .upstream
        .only()
        .header("x-forwarded-client-cert")
        .expect("a verified client must be identified to the upstream");
    assert!(
        xfcc.starts_with(&format!("Hash={};", cert.leaf_sha256())),
        "{xfcc}"
    );
}

#[tokio::test]
async fn https_upstream_is_verified_against_the_configured_ca() {
    let s = Scenario::new()
        .tls_upstream()
        .upstream_client(|u| u.ca = Some("root.pem".into()))
        .start()
        .await;
    let body = sample_body();
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().body, body);
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_is_502() {
    // The configured CA is some other root.
    let other = Pki::new();
    let s = Scenario::new()
        .tls_upstream()
        .file("other-root.pem", &other.root_pem())
        .upstream_client(|u| u.ca = Some("other-root.pem".into()))
        .start()
        .await;
    let resp = s.post_signed(&sample_body()).await;
    assert_eq!(resp.status(), 502);
    s.upstream.assert_nothing_received();
}

/// A raw HTTP/1.1 backend on 127.0.0.1 that answers each request `200 ok` (keep-alive) and
/// closes every connection `close_after` its first answer, the way a backend's keep-alive
/// timeout does; counts the connections it accepted and the requests it answered.
struct RawBackend {
    url: String,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawBackend {
    async fn start(close_after: Option<std::time::Duration>) -> RawBackend {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (c, a) = (connections.clone(), answered.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let a = a.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: the head, then Content-Length bytes of body.
                        let (head_end, length) = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                                let length = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                                break (end + 4, length);
                            }
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        while buf.len() < head_end + length {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + length);
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if sock.write_all(reply).await.is_err() {
                            return;
                        }
                        a.fetch_add(1, Ordering::SeqCst);
                        if let Some(after) = close_after {
                            tokio::time::sleep(after).await;
                            return; // dropped: closed without a word, as idle timeouts do
                        }
                    }
                });
            }
        });
        RawBackend {
            url,
            connections,
            answered,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn answered(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = RawBackend::start(None).await;
    let s = Scenario::new().upstream_url(&backend.url).start().await;
    let http = s.http();
    for i in 0..5 {
        let body = format!("{{\"n\":{i}}}").into_bytes();
        let resp = post_signed(&http, &s.url("/webhook"), &body).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.bytes().await.unwrap(), "ok");
    }
    assert_eq!(backend.answered(), 5);
    assert_eq!(
        backend.connections(),
        1,
        "five requests one after another share one upstream connection"
    );
}

#[tokio::test]
async fn an_upstream_connection_closed_while_idle_is_replaced() {
    // The backend closes each connection 50 ms after answering on it: every request after a
    // pause finds its pooled connection closed and must go out on a new one, not fail.
    let backend = RawBackend::start(Some(std::time::Duration::from_millis(50))).await;
    let s = Scenario::new().upstream_url(&backend.url).start().await;
    let http = s.http();
    for i in 0..4 {
        let body = format!("{{\"n\":{i}}}").into_bytes();
        let resp = post_signed(&http, &s.url("/webhook"), &body).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.bytes().await.unwrap(), "ok");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(backend.answered(), 4);
    assert_eq!(backend.connections(), 4, "one new connection per request");
}

/// This process's TCP connections to 127.0.0.1:`port` in state CLOSE_WAIT (the peer closed,
/// this side did not yet), from /proc/net/tcp.
fn close_wait_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == format!("0100007F:{port:04X}") && f[3] == "08"
        })
        .count()
}

#[tokio::test]
async fn idle_upstream_connections_the_backend_closed_are_closed_too() {
    // The backend closes each connection 50 ms after answering; the gate gets no further
    // request, so only the pool's reaper can notice and close its side.
    let backend = RawBackend::start(Some(std::time::Duration::from_millis(50))).await;
    let port: u16 = backend.url.rsplit(':').next().unwrap()[..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let s = Scenario::new().upstream_url(&backend.url).start().await;
    let resp = post_signed(&s.http(), &s.url("/webhook"), b"{\"n\":1}")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while close_wait_to(port) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gate still holds a half-closed connection to the backend"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(backend.connections(), 1);
}
