//! The admin listener (`[admin]`): plain HTTP on its own port with `/healthz`, `/readyz` and
//! `/metrics`; what the metrics count (verdicts, signature and challenge outcomes, refused
//! handshakes) and report (certificate expiry); and the separation of admin and webhook paths.

mod common;

use common::*;

/// The default gate with the admin listener on 127.0.0.1:0.
async fn with_admin() -> Started {
    Scenario::new().admin().start().await
}

#[tokio::test]
async fn metrics_count_forwarded_forged_challenge_and_refused_handshake() {
    let s = with_admin().await;
    let admin = s.gate.admin_addr();
    let http = s.http();

    let ok = post_signed(&http, &s.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let forged = http
        .post(s.url("/webhook"))
        .header(SIG, sign(SECRET, b"another body"))
        .body(sample_body())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let challenge = http
        .get(s.url(&challenge_path("1158201444")))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 200);
    let wrong_cn = s.client(Some(&s.pki.client(&LeafSpec::cn("evil.example.com"))));
    assert!(post_signed(&wrong_cn, &s.url("/webhook"), &sample_body())
        .await
        .is_err());

    // The handshake failure is counted once the server side has seen it.
    let scrape = || async { http_get(admin, "/metrics").await.unwrap().1 };
    eventually_contains(
        scrape,
        "hubgate_tls_handshake_failures_total{reason=\"cn_not_allowed\"} 1\n",
    )
    .await;
    let (status, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "hubgate_requests_total{route=\"/webhook\",verdict=\"forwarded\",status=\"200\"} 1\n",
        "hubgate_requests_total{route=\"/webhook\",verdict=\"bad_signature\",status=\"403\"} 1\n",
        "hubgate_requests_total{route=\"/webhook\",verdict=\"challenge_ok\",status=\"200\"} 1\n",
        "hubgate_signature_failures_total{route=\"/webhook\",reason=\"mismatch\"} 1\n",
        "hubgate_challenges_total{route=\"/webhook\",reason=\"ok\"} 1\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    assert_eq!(s.upstream.requests().len(), 1);
}

#[tokio::test]
async fn metrics_report_certificate_expiry_of_server_cert_and_anchor() {
    let s = with_admin().await;
    let (status, metrics) = http_get(s.gate.admin_addr(), "/metrics").await.unwrap();
    assert_eq!(status, 200);

    let expiry = |kind: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "hubgate_certificate_expiry_seconds{{kind=\"{kind}\""
                ))
            })
            .unwrap_or_else(|| panic!("no {kind} expiry in:\n{metrics}"))
            .to_owned()
    };
    let server = expiry("server");
    assert!(server.contains("server-chain.pem"), "{server}");
    assert!(
        server.contains("subject=\"CN=hubgate test server\""),
        "{server}"
    );
    let anchor = expiry("trust_anchor");
    assert!(anchor.contains("root.pem"), "{anchor}");
    assert!(anchor.contains("hubgate test root"), "{anchor}");
    // Both expire in 2090/2095: decades away, and positive.
    for line in [&server, &anchor] {
        let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(secs > 20.0 * 365.0 * 86400.0, "{line}");
    }
}

#[tokio::test]
async fn admin_answers_health_and_readiness_and_404_elsewhere() {
    let s = with_admin().await;
    let admin = s.gate.admin_addr();
    assert_ne!(admin, s.gate.addr);
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(admin, "/readyz").await.unwrap().0, 200);
    assert_eq!(http_get(admin, "/nope").await.unwrap().0, 404);
    assert_eq!(http_get(admin, "/").await.unwrap().0, 404);
}

#[tokio::test]
async fn webhook_port_and_admin_port_serve_only_their_own_paths() {
    let s = with_admin().await;
    let admin = s.gate.admin_addr();
    let http = s.http();
    for path in ["/metrics", "/healthz", "/readyz"] {
        let resp = http.get(s.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "webhook port must not serve {path}");
    }
    // The admin port is plain HTTP and knows nothing of webhook routes.
    let (status, body) = http_get(admin, &challenge_path("42")).await.unwrap();
    assert_eq!(status, 404);
    assert!(!body.contains("42"), "{body}");
    assert_eq!(http_get(admin, "/webhook").await.unwrap().0, 404);
    s.upstream.assert_nothing_received();
}
