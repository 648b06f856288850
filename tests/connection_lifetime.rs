//! How long a connection lives: an idle keep-alive connection is closed after
//! `server.idle_timeout` (but not while a request is in flight), and a client that never reads
//! its answers is dropped once `server.drain_timeout` runs out.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a keep-alive signed POST and reads exactly one response (by its Content-Length).
async fn keep_alive_post(tls: &mut Tls, host: &str) -> u16 {
    let body = sample_body();
    let mut request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{SIG}: {}\r\n\r\n",
        body.len(),
        sign(SECRET, &body)
    )
    .into_bytes();
    request.extend_from_slice(&body);
    tls.write_all(&request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = tls.read(&mut chunk).await.expect("response");
            assert!(n > 0, "connection closed before the response was complete");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("content-length")
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return head
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u16>()
                    .unwrap();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response within 10 s")
}

/// Whether the server closes the connection (EOF or error on read) within `within`.
async fn closed_within(tls: &mut Tls, within: Duration) -> bool {
    let mut chunk = [0u8; 256];
    match tokio::time::timeout(within, tls.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("unexpected {n} bytes on an idle connection"),
        Err(_) => false,
    }
}

/// A 1 s idle timeout, and a 4 s upstream timeout so a slow upstream is still answered.
fn idle<'a>() -> Scenario<'a> {
    Scenario::new()
        .upstream_client(|u| u.timeout = Some("4s".into()))
        .server(|s| s.idle_timeout = Some("1s".into()))
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let s = idle().start().await;
    let mut tls = s.connect().await;
    assert_eq!(keep_alive_post(&mut tls, &s.gate.authority()).await, 200);
    assert!(
        closed_within(&mut tls, Duration::from_secs(5)).await,
        "an idle keep-alive connection must be closed after idle_timeout"
    );
}

#[tokio::test]
async fn connection_is_not_closed_while_a_request_is_in_flight() {
    // The backend takes twice the idle timeout.
    let s = idle()
        .reply(Reply::delayed(Duration::from_secs(2)))
        .start()
        .await;
    let mut tls = s.connect().await;
    assert_eq!(keep_alive_post(&mut tls, &s.gate.authority()).await, 200);
    assert!(closed_within(&mut tls, Duration::from_secs(5)).await);
}

/// A client that pipelines requests and never reads the answers must not keep its connection
/// (and its `max_connections` slot) once the gate closes it: `drain_timeout` bounds the wait.
#[tokio::test]
async fn connection_of_a_client_that_never_reads_is_dropped() {
    let s = Scenario::new()
        .server(|s| {
            s.idle_timeout = Some("1s".into());
            s.drain_timeout = Some("1s".into());
        })
        .start()
        .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let tcp = socket.connect(s.gate.addr).await.unwrap();
    let mut tls = tls_connect_on(s.tls_config(Some(&s.cert), false), tcp, "localhost")
        .await
        .unwrap();
    // Each answer echoes a 1,000-byte challenge: 20,000 of them are far more than the socket
    // buffers on both sides hold.
    let one = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        challenge_path(&"7".repeat(1000)),
        s.gate.authority()
    );
    let many = one.repeat(20_000);
    // The writes stall once the gate stops reading; they are never read back.
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.write_all(many.as_bytes())).await;
        tls
    });
    let open = |text: &str| text.lines().any(|l| l == "hubgate_open_connections 1");
    let seen_open = std::time::Instant::now() + Duration::from_secs(3);
    while !open(&s.metrics()) {
        assert!(
            std::time::Instant::now() < seen_open,
            "the connection never showed as open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while open(&s.metrics()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.abort();
}

/// Waits until `/metrics` shows this many parked connections.
async fn parked(s: &Started, n: u32, within: Duration) {
    let line = format!("hubgate_parked_connections {n}");
    let deadline = std::time::Instant::now() + within;
    while !s.metrics().lines().any(|l| l == line) {
        assert!(
            std::time::Instant::now() < deadline,
            "never saw {line}:\n{}",
            s.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An idle HTTP/1.1 connection gives hyper's state back (parked) and serves the next request
/// when it comes, on the same TLS session.
#[tokio::test]
async fn idle_connection_is_parked_and_serves_the_next_request() {
    let s = Scenario::new()
        .server(|s| s.idle_timeout = Some("30s".into()))
        .start()
        .await;
    let mut tls = s.connect().await;
    let host = s.gate.authority();
    assert_eq!(keep_alive_post(&mut tls, &host).await, 200);
    parked(&s, 1, Duration::from_secs(5)).await;
    for _ in 0..3 {
        assert_eq!(keep_alive_post(&mut tls, &host).await, 200);
    }
    parked(&s, 0, Duration::from_secs(1)).await;
    parked(&s, 1, Duration::from_secs(5)).await;
    // Parked again: a request split across the wake-up is read whole.
    let body = br#"{"object":"page","entry":[{"id":"parked","time":1,"messaging":[]}]}"#.to_vec();
    let request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{SIG}: {}\r\n\r\n",
        body.len(),
        sign(SECRET, &body)
    );
    tls.write_all(&request.as_bytes()[..10]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tls.write_all(&request.as_bytes()[10..]).await.unwrap();
    tls.write_all(&body).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tls.read(&mut byte).await.unwrap(), 1, "closed: {head:?}");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // The same body four times is forwarded once (the sync route's de-duplication).
    let seen = s.upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, body);
}

/// The idle timeout still closes a parked connection.
#[tokio::test]
async fn parked_connection_is_closed_after_the_idle_timeout() {
    let s = Scenario::new()
        .server(|s| s.idle_timeout = Some("3s".into()))
        .start()
        .await;
    let mut tls = s.connect().await;
    assert_eq!(keep_alive_post(&mut tls, &s.gate.authority()).await, 200);
    parked(&s, 1, Duration::from_secs(3)).await;
    assert!(
        closed_within(&mut tls, Duration::from_secs(5)).await,
        "a parked connection must be closed after idle_timeout"
    );
    parked(&s, 0, Duration::from_secs(1)).await;
}
