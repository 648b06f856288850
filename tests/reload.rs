//! Configuration reloads through the library (`Running::reload`): a new server certificate and
//! new trust anchors apply to new connections, a request in flight on an old connection still
//! finishes, and a reload that fails keeps the old configuration and is counted.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Serve the reissued `server2-*` certificate and key instead of the originals.
fn use_server2(c: &mut GateConfig) {
    c.server.cert = "server2-chain.pem".into();
    c.server.key = "server2.key".into();
}

#[tokio::test]
async fn reload_swaps_the_server_certificate_for_new_connections() {
    let s = Scenario::new().start().await;
    let before = server_serial(&s.pki, Some(&s.cert), s.gate.addr)
        .await
        .unwrap();
    assert_ne!(before, REISSUED_SERIAL);

    s.pki
        .reissue_server_cert(&REISSUED_SERIAL, "server2-chain.pem", "server2.key");
    s.reload(use_server2);

    let after = server_serial(&s.pki, Some(&s.cert), s.gate.addr)
        .await
        .unwrap();
    assert_eq!(after, REISSUED_SERIAL);
    assert_eq!(s.post_fresh(Some(&s.cert)).await.unwrap(), 200);
    let metrics = s.metrics();
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"success\"} 1\n"),
        "{metrics}"
    );
    // The expiry gauge follows the certificate now in force.
    let server = metrics
        .lines()
        .find(|l| l.starts_with("hubgate_certificate_expiry_seconds{kind=\"server\""))
        .unwrap();
    assert!(server.contains("server2-chain.pem"), "{server}");
}

#[tokio::test]
async fn reload_lets_a_request_in_flight_on_an_old_connection_finish() {
    let s = Scenario::new()
        .reply(Reply::delayed(Duration::from_secs(1)))
        .start()
        .await;
    let in_flight = {
        let (http, url) = (s.http(), s.url("/webhook"));
        tokio::spawn(async move { post_signed(&http, &url, &sample_body()).await })
    };
    s.upstream.wait_for_requests(1).await;

    s.pki
        .reissue_server_cert(&REISSUED_SERIAL, "server2-chain.pem", "server2.key");
    s.reload(use_server2);
    assert_eq!(
        server_serial(&s.pki, Some(&s.cert), s.gate.addr)
            .await
            .unwrap(),
        REISSUED_SERIAL
    );

    let resp = in_flight
        .await
        .unwrap()
        .expect("the old connection's request is answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn reload_swaps_trust_anchors() {
    let other = OtherCa::new("second");
    let s = Scenario::new()
        .file("other-root.pem", &other.root_pem())
        .start()
        .await;
    let old_client = s.pki.meta_client();
    let new_client = other.client(&LeafSpec::cn(META_CN));

    assert_eq!(s.post_fresh(Some(&old_client)).await.unwrap(), 200);
    assert!(
        s.post_fresh(Some(&new_client)).await.is_err(),
        "a client under the new root is refused before the reload"
    );

    s.reload(|c| c.client_auth.roots = Some(Paths::One("other-root.pem".into())));

    assert_eq!(s.post_fresh(Some(&new_client)).await.unwrap(), 200);
    assert!(
        s.post_fresh(Some(&old_client)).await.is_err(),
        "a client under the old root is refused after the reload"
    );
    assert_eq!(s.upstream.requests().len(), 2);
}

#[tokio::test]
async fn failed_reload_keeps_the_old_configuration_and_is_counted() {
    use rustls_pki_types::pem::PemObject;
    let s = Scenario::new().start().await;
    let serial = server_serial(&s.pki, Some(&s.cert), s.gate.addr)
        .await
        .unwrap();

    // A configuration whose key does not belong to its certificate: loaded, then tampered with.
    s.pki
        .reissue_server_cert(&REISSUED_SERIAL, "server2-chain.pem", "server2.key");
    let mut broken = s.changed_config(use_server2).unwrap();
    let stray_key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(s.pki.path("server.key")).unwrap();
    broken.server.key = Arc::new(stray_key);
    assert!(
        s.gate.running().reload(broken).is_err(),
        "a key that does not match the certificate must fail the reload"
    );

    // A missing anchor file already fails to load.
    let err = s
        .changed_config(|c| c.client_auth.roots = Some(Paths::One("no-such-root.pem".into())))
        .err()
        .expect("load fails");
    assert!(err.to_string().contains("no-such-root.pem"), "{err}");

    // Still the old certificate, still serving.
    assert_eq!(
        server_serial(&s.pki, Some(&s.cert), s.gate.addr)
            .await
            .unwrap(),
        serial
    );
    assert_eq!(s.post_fresh(Some(&s.cert)).await.unwrap(), 200);
    let metrics = s.metrics();
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"failure\"} 1\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("result=\"success\"} 1"), "{metrics}");
}

#[tokio::test]
async fn reload_from_source_rereads_the_file_and_keeps_the_last_good_one() {
    let s = Scenario::new().start().await;
    let path = s.config.write(&s.pki, "live.toml");
    let env = s.config.env.clone();
    let source = hubgate::ConfigSource::with_env(Some(&path), move |name| env.get(name).cloned());

    // The file now names a reissued certificate: reload_from reads it again.
    s.pki
        .reissue_server_cert(&REISSUED_SERIAL, "server2-chain.pem", "server2.key");
    let mut next = s.config.clone();
    use_server2(&mut next);
    next.write(&s.pki, "live.toml");
    s.gate
        .running()
        .reload_from(&source)
        .expect("reload succeeds");
    let serial = server_serial(&s.pki, Some(&s.cert), s.gate.addr).await;
    assert_eq!(serial.unwrap(), REISSUED_SERIAL);

    // A file that no longer parses: the reload fails, naming the file, and changes nothing.
    s.pki.write("live.toml", "[server\n");
    let err = s
        .gate
        .running()
        .reload_from(&source)
        .unwrap_err()
        .to_string();
    assert!(err.contains("live.toml"), "{err}");
    let serial = server_serial(&s.pki, Some(&s.cert), s.gate.addr).await;
    assert_eq!(serial.unwrap(), REISSUED_SERIAL);
    assert_eq!(s.post_fresh(Some(&s.cert)).await.unwrap(), 200);
    let metrics = s.metrics();
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"success\"} 1\n")
            && metrics.contains("hubgate_config_reloads_total{result=\"failure\"} 1\n"),
        "{metrics}"
    );
}
