//! Starting and stopping through the library API: `run`, `local_addr`, `shutdown`, `reload`.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let mut s = Scenario::new().start().await;
    let http = s.http();
    let resp = post_signed(&http, &s.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(http);

    tokio::time::timeout(Duration::from_secs(5), s.gate.shutdown())
        .await
        .expect("shutdown returns once idle connections are gone");
    let connect = tokio::net::TcpStream::connect(s.gate.addr).await;
    assert!(connect.is_err(), "the listener must be closed");
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let mut s = Scenario::new()
        .reply(Reply::delayed(Duration::from_millis(400)))
        .start()
        .await;
    let http = s.http();
    let url = s.url("/webhook");
    let body = sample_body();
    let in_flight = tokio::spawn(async move { post_signed(&http, &url, &body).await });

    // Wait until the upstream holds the request, then stop the gate.
    s.upstream.wait_for_requests(1).await;
    tokio::time::timeout(Duration::from_secs(5), s.gate.shutdown())
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
    let (pki, up, _) = Scenario::new().prepare().await;
    let a = GateConfig::new(&up.url("/a")).start(&pki).await;
    let b = GateConfig::new(&up.url("/b")).start(&pki).await;
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
    let s = Scenario::new().start().await;
    // One client configuration, so its session cache offers resumption on the second connection.
    let tls = s.tls_config(Some(&s.cert), false);
    let request = s.signed_request("/webhook", &sample_body(), "");

    let (first, kind) = raw_exchange_with(tls.clone(), s.gate.addr, &request)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));

    // Meta's CN is no longer allowed.
    s.reload(|c| c.client_auth = ClientAuth::require().allowed_cn(&["partner.example.com"]));

    // A session from before the reload must not carry the old identity past the new rules.
    let second = raw_exchange_with(tls, s.gate.addr, &request).await;
    assert!(
        second.is_err(),
        "the reloaded gate must refuse Meta's CN, got {:?}",
        second.map(|(r, k)| (r.status, k))
    );
    assert_eq!(s.upstream.requests().len(), 1);
}

#[tokio::test]
async fn readyz_answers_draining_while_an_in_flight_request_finishes() {
    let mut s = Scenario::new()
        .reply(Reply::delayed(Duration::from_millis(1500)))
        .admin()
        .start()
        .await;
    let admin = s.gate.admin_addr();
    assert_eq!(
        http_get(admin, "/readyz").await.unwrap(),
        (200, "ready\n".into())
    );
    let in_flight = {
        let (http, url) = (s.http(), s.url("/webhook"));
        tokio::spawn(async move { post_signed(&http, &url, &sample_body()).await })
    };
    s.upstream.wait_for_requests(1).await;

    // The drain runs in its own task; the admin listener answers while it lasts.
    let addr = s.gate.addr;
    let mut gate = std::mem::replace(&mut s.gate, Gate::at(addr));
    let drain = tokio::spawn(async move { gate.shutdown().await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let readyz = loop {
        let answer = http_get(admin, "/readyz").await.unwrap();
        if answer.0 != 200 || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(readyz, (503, "not ready: draining\n".into()));
    assert!(
        !drain.is_finished(),
        "the drain waits for the request in flight"
    );

    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("the drain ends once the request is done")
        .unwrap();
    assert!(
        http_get(admin, "/readyz").await.is_err(),
        "the admin listener stops after the drain"
    );
}
