//! Starting and stopping through the library API: `run`, `local_addr`, `shutdown`.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut gate = pki.start(&GateConfig::new(&up.url("/hook"))).await;
    let http = client(&pki, Some(&pki.meta_client()));
    let resp = post_signed(&http, &gate.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(http);

    tokio::time::timeout(Duration::from_secs(5), gate.shutdown())
        .await
        .expect("shutdown returns once idle connections are gone");
    let connect = tokio::net::TcpStream::connect(gate.addr).await;
    assert!(connect.is_err(), "the listener must be closed");
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let pki = Pki::new();
    let reply = Reply {
        delay: Duration::from_millis(400),
        ..Reply::default()
    };
    let up = Upstream::with_reply(reply).await;
    let mut gate = pki.start(&GateConfig::new(&up.url("/hook"))).await;
    let http = client(&pki, Some(&pki.meta_client()));
    let url = gate.url("/webhook");
    let body = sample_body();
    let in_flight = tokio::spawn(async move { post_signed(&http, &url, &body).await });

    // Wait until the upstream holds the request, then stop the gate.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while up.requests().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), gate.shutdown())
        .await
        .expect("shutdown finishes within the drain deadline");

    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn two_gates_run_side_by_side_on_port_zero() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let a = pki.start(&GateConfig::new(&up.url("/a"))).await;
    let b = pki.start(&GateConfig::new(&up.url("/b"))).await;
    assert_ne!(a.addr.port(), 0);
    assert_ne!(a.addr, b.addr);
    let http = client(&pki, Some(&pki.meta_client()));
    for gate in [&a, &b] {
        let resp = post_signed(&http, &gate.url("/webhook"), &sample_body())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let uris: Vec<_> = up.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, vec!["/a", "/b"]);
}

#[tokio::test]
async fn reload_applies_to_new_connections_and_voids_old_sessions() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook"));
    let gate = pki.start(&cfg).await;
    let cert = pki.meta_client();
    // One client configuration, so its session cache offers resumption on the second connection.
    let tls = std::sync::Arc::new(tls_client_config(&pki, Some(&cert), Proto::H1, false));
    let body = sample_body();
    let mut request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
        gate.authority(),
        body.len(),
        sign(SECRET, &body)
    )
    .into_bytes();
    request.extend_from_slice(&body);

    let (first, kind) = raw_exchange_with(tls.clone(), gate.addr, &request)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));

    // Meta's CN is no longer allowed.
    let mut stricter = cfg.clone();
    stricter.allowed_cn = Some(format!("[{}]", q("partner.example.com")));
    let config = pki.config(&stricter.to_toml()).unwrap();
    gate.running.as_ref().unwrap().reload(config).unwrap();

    // A session from before the reload must not carry the old identity past the new rules.
    let second = raw_exchange_with(tls, gate.addr, &request).await;
    assert!(
        second.is_err(),
        "the reloaded gate must refuse Meta's CN, got {:?}",
        second.map(|(r, k)| (r.status, k))
    );
    assert_eq!(up.requests().len(), 1);
}
