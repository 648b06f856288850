//! `server.proxy_protocol`: every connection starts with a PROXY protocol v1 or v2 header from a
//! trusted proxy, which gives the client address (`X-Forwarded-For`, `allow_sources`); a
//! connection without one, or from an untrusted peer, is dropped and counted.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A PROXY protocol listener behind a trusted proxy at `cidr`.
fn behind_proxy<'a>(cidr: &str) -> Scenario<'a> {
    Scenario::new()
        .server(|s| s.proxy_protocol = Some(true))
        .trusted_proxies(TrustedProxies::at(cidr))
}

/// Connects, writes `header`, then runs a signed POST over TLS on the same socket.
async fn post_after_proxy_header(s: &Started, header: &[u8]) -> std::io::Result<RawResponse> {
    let mut tcp = TcpStream::connect(s.gate.addr).await?;
    tcp.write_all(header).await?;
    let request = s.signed_request("/webhook", &unique_body(), "");
    raw_exchange_on(s.tls_config(Some(&s.cert), false), tcp, &request).await
}

/// A signed POST after `header` is forwarded with `X-Forwarded-For: {client}`.
async fn assert_client_address(header: &[u8], client: &str) {
    let s = behind_proxy("127.0.0.1/32").start().await;
    let resp = post_after_proxy_header(&s, header).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        s.upstream.only().header("x-forwarded-for").as_deref(),
        Some(client)
    );
}

/// The connection behind `result` was dropped, nothing was forwarded, and the drop is counted
/// as `reason`.
async fn assert_dropped(s: &Started, result: std::io::Result<RawResponse>, reason: &str) {
    assert!(result.is_err(), "got {result:?}");
    s.upstream.assert_nothing_received();
    s.metrics_eventually_contain(&format!(
        "hubgate_refused_connections_total{{reason=\"{reason}\"}} 1\n"
    ))
    .await;
}

fn proxy_v2_header(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_v1_header_gives_the_client_address() {
    assert_client_address(
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\r\n",
        "203.0.113.7",
    )
    .await;
}

#[tokio::test]
async fn proxy_v2_header_gives_the_client_address() {
    let header = proxy_v2_header([203, 0, 113, 7], [127, 0, 0, 1], 5555, 443);
    assert_client_address(&header, "203.0.113.7").await;
}

#[tokio::test]
async fn proxy_protocol_listener_drops_a_connection_without_header() {
    let s = behind_proxy("127.0.0.1/32").start().await;
    let request = s.signed_request("/webhook", &sample_body(), "");
    let result = s.raw(&request).await;
    assert_dropped(&s, result, "proxy_protocol").await;
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_address_is_refused() {
    let s = behind_proxy("10.0.0.0/8").start().await;
    let result = post_after_proxy_header(&s, b"PROXY TCP4 31.13.1.1 127.0.0.1 5555 443\r\n").await;
    assert_dropped(&s, result, "proxy_protocol").await;
}

#[tokio::test]
async fn proxy_protocol_source_outside_allow_sources_is_dropped_before_tls() {
    let s = behind_proxy("127.0.0.1/32")
        .server(|s| s.allow_sources = Some(vec!["198.51.100.0/24".into()]))
        .start()
        .await;
    let result =
        post_after_proxy_header(&s, b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\r\n").await;
    assert_dropped(&s, result, "source_not_allowed").await;
    // Refused before TLS: no handshake was attempted, so none failed.
    assert!(!s
        .metrics()
        .contains("hubgate_tls_handshake_failures_total{"));
    // An allowed source on the same listener is served.
    let ok = post_after_proxy_header(&s, b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 443\r\n")
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}
