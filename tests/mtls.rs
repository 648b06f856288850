//! Client certificates: chain verification against the configured anchors, the CN allow-list,
//! and the three `client_auth` modes with per-route `client_cert`.

mod common;

use std::sync::Arc;

use common::*;
use rcgen::ExtendedKeyUsagePurpose;

/// A signed POST with `identity` must reach the upstream unchanged and answer 200.
async fn assert_admitted(pki: &Pki, gate: &Gate, up: &Upstream, identity: Option<&ClientCert>) {
    let body = sample_body();
    let resp = post_signed(&client(pki, identity), &gate.url("/webhook"), &body)
        .await
        .expect("request must succeed");
    assert_eq!(resp.status(), 200);
    assert_eq!(up.only().body, body);
}

/// A signed POST with `identity` must fail in the TLS handshake with the fatal `alert` the
/// gate sends (as the client reports it), and nothing reaches the upstream.
async fn assert_refused(
    pki: &Pki,
    gate: &Gate,
    up: &Upstream,
    identity: Option<&ClientCert>,
    alert: &str,
) {
    let result = post_signed(
        &client(pki, identity),
        &gate.url("/webhook"),
        &sample_body(),
    )
    .await;
    assert_tls_alert(result, alert);
    up.assert_nothing_received();
}

/// The request failed because the server sent the fatal TLS alert `alert`.
fn assert_tls_alert(result: reqwest::Result<reqwest::Response>, alert: &str) {
    let err = match result {
        Ok(resp) => panic!("the TLS handshake must fail, got HTTP {}", resp.status()),
        Err(e) => e,
    };
    let chain = error_chain(&err);
    assert!(
        chain.contains(&format!("received fatal alert: {alert}")),
        "expected alert {alert}, got: {chain}"
    );
}

async fn require_gate(pki: &Pki, up: &Upstream) -> Gate {
    pki.start(&GateConfig::new(&up.url("/hook"))).await
}

#[tokio::test]
async fn good_chain_with_intermediate_is_admitted() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    assert_admitted(&pki, &gate, &up, Some(&pki.meta_client())).await;
}

#[tokio::test]
async fn good_chain_over_tls12_is_admitted() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let body = sample_body();
    let resp = post_signed(
        &client_tls12(&pki, Some(&pki.meta_client())),
        &gate.url("/webhook"),
        &body,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.only().body, body);
}

#[tokio::test]
async fn intermediate_as_anchor_admits_full_chain() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.roots = Some(q("intermediate.pem"));
    let gate = pki.start(&cfg).await;
    assert_admitted(&pki, &gate, &up, Some(&pki.meta_client())).await;
}

#[tokio::test]
async fn intermediate_as_anchor_admits_leaf_sent_alone() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.roots = Some(q("intermediate.pem"));
    let gate = pki.start(&cfg).await;
    assert_admitted(&pki, &gate, &up, Some(&pki.meta_client().leaf_only())).await;
}

#[tokio::test]
async fn roots_given_as_a_list_are_all_anchors() {
    let pki = Pki::new();
    let other = Pki::new(); // an unrelated CA, listed first
    pki.write(
        "other.pem",
        &std::fs::read_to_string(other.path("root.pem")).unwrap(),
    );
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.roots = Some(format!("[{}, {}]", q("other.pem"), q("root.pem")));
    let gate = pki.start(&cfg).await;
    assert_admitted(&pki, &gate, &up, Some(&pki.meta_client())).await;
}

#[tokio::test]
async fn wrong_cn_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let cert = pki.client(&LeafSpec::cn("graph.facebook.com"));
    assert_refused(&pki, &gate, &up, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn cn_differing_only_in_case_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let cert = pki.client(&LeafSpec::cn("Client.Webhooks.FBClientCerts.com"));
    assert_refused(&pki, &gate, &up, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn leaf_with_a_second_cn_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.extra_cn = Some("attacker.example".into());
    assert_refused(&pki, &gate, &up, Some(&pki.client(&spec)), "BadCertificate").await;
}

#[tokio::test]
async fn leaf_with_meta_name_only_in_its_san_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.omit_cn = true;
    assert_refused(&pki, &gate, &up, Some(&pki.client(&spec)), "BadCertificate").await;
}

#[tokio::test]
async fn expired_leaf_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.not_before = (2000, 1, 1);
    spec.not_after = (2001, 1, 1);
    assert_refused(
        &pki,
        &gate,
        &up,
        Some(&pki.client(&spec)),
        "CertificateExpired",
    )
    .await;
}

#[tokio::test]
async fn not_yet_valid_leaf_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.not_before = (2080, 1, 1);
    spec.not_after = (2090, 1, 1);
    // rustls reports "not valid yet" with the certificate_expired alert, as RFC 8446 allows.
    assert_refused(
        &pki,
        &gate,
        &up,
        Some(&pki.client(&spec)),
        "CertificateExpired",
    )
    .await;
}

#[tokio::test]
async fn self_signed_leaf_with_meta_cn_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let cert = pki.self_signed_client(&LeafSpec::cn(META_CN));
    assert_refused(&pki, &gate, &up, Some(&cert), "UnknownCA").await;
}

#[tokio::test]
async fn meta_cn_under_untrusted_root_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    // Same root and intermediate names as the trusted ones; different keys.
    let cert = pki.untrusted_client(&LeafSpec::cn(META_CN));
    // The names match an anchor, so the failure is the intermediate's signature.
    assert_refused(&pki, &gate, &up, Some(&cert), "DecryptError").await;
}

#[tokio::test]
async fn server_auth_only_eku_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.eku = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert_refused(
        &pki,
        &gate,
        &up,
        Some(&pki.client(&spec)),
        "UnsupportedCertificate",
    )
    .await;
}

#[tokio::test]
async fn leaf_without_intermediate_is_refused_when_root_is_the_anchor() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    assert_refused(
        &pki,
        &gate,
        &up,
        Some(&pki.meta_client().leaf_only()),
        "UnknownCA",
    )
    .await;
}

#[tokio::test]
async fn wrong_cn_over_tls12_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let cert = pki.client(&LeafSpec::cn("graph.facebook.com"));
    let result = post_signed(
        &client_tls12(&pki, Some(&cert)),
        &gate.url("/webhook"),
        &sample_body(),
    )
    .await;
    assert_tls_alert(result, "CertificateUnknown");
    up.assert_nothing_received();
}

#[tokio::test]
async fn require_mode_without_cert_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    assert_refused(&pki, &gate, &up, None, "CertificateRequired").await;
}

#[tokio::test]
async fn require_mode_without_cert_gets_no_challenge_answer() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let result =
        client(&pki, None)
            .get(gate.url(
                "/webhook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=mytoken",
            ))
            .send()
            .await;
    assert_tls_alert(result, "CertificateRequired");
    up.assert_nothing_received();
}

#[tokio::test]
async fn empty_allowed_cn_admits_nobody() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.allowed_cn = Some("[]".into());
    let gate = pki.start(&cfg).await;
    assert_refused(
        &pki,
        &gate,
        &up,
        Some(&pki.meta_client()),
        "CertificateUnknown",
    )
    .await;
}

#[tokio::test]
async fn configured_allowed_cn_replaces_the_default() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.allowed_cn = Some(format!("[{}]", q("partner.example.com")));
    let gate = pki.start(&cfg).await;
    let partner = pki.client(&LeafSpec::cn("partner.example.com"));
    assert_admitted(&pki, &gate, &up, Some(&partner)).await;
    // Meta's CN is no longer on the list.
    let result = post_signed(
        &client(&pki, Some(&pki.meta_client())),
        &gate.url("/webhook"),
        &sample_body(),
    )
    .await;
    assert_tls_alert(result, "CertificateUnknown");
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn optional_mode_without_cert_on_required_route_is_403() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    let gate = pki.start(&cfg).await;
    let resp = post_signed(&client(&pki, None), &gate.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    up.assert_nothing_received();
}

#[tokio::test]
async fn optional_mode_without_cert_challenge_on_required_route_is_403() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    let gate = pki.start(&cfg).await;
    let resp = client(&pki, None)
        .get(gate.url("/webhook?hub.mode=subscribe&hub.challenge=42&hub.verify_token=mytoken"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_ne!(resp.text().await.unwrap(), "42");
    up.assert_nothing_received();
}

#[tokio::test]
async fn optional_mode_without_cert_on_open_route_is_forwarded() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    cfg.route().client_cert = Some("none");
    let gate = pki.start(&cfg).await;
    assert_admitted(&pki, &gate, &up, None).await;
    assert_eq!(up.only().header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn optional_mode_with_good_cert_on_required_route_is_forwarded() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    let gate = pki.start(&cfg).await;
    let cert = pki.meta_client();
    assert_admitted(&pki, &gate, &up, Some(&cert)).await;
    let xfcc = up.only().header("x-forwarded-client-cert").unwrap();
    assert!(
        xfcc.starts_with(&format!("Hash={};", cert.leaf_sha256())),
        "{xfcc}"
    );
}

#[tokio::test]
async fn optional_mode_with_wrong_cn_is_refused_even_on_open_route() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    cfg.route().client_cert = Some("none");
    let gate = pki.start(&cfg).await;
    let cert = pki.client(&LeafSpec::cn("graph.facebook.com"));
    assert_refused(&pki, &gate, &up, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn optional_mode_with_untrusted_cert_is_refused_even_on_open_route() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    cfg.route().client_cert = Some("none");
    let gate = pki.start(&cfg).await;
    let cert = pki.self_signed_client(&LeafSpec::cn(META_CN));
    assert_refused(&pki, &gate, &up, Some(&cert), "UnknownCA").await;
}

#[tokio::test]
async fn off_mode_without_cert_is_forwarded() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook")).mode("off");
    cfg.roots = None;
    let gate = pki.start(&cfg).await;
    assert_admitted(&pki, &gate, &up, None).await;
    assert_eq!(up.only().header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn off_mode_does_not_request_a_cert() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook")).mode("off");
    cfg.roots = None;
    let gate = pki.start(&cfg).await;
    // The client would present one if asked; no identity may reach the upstream.
    assert_admitted(&pki, &gate, &up, Some(&pki.meta_client())).await;
    assert_eq!(up.only().header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn resumed_session_does_not_outlive_its_certificate() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.not_after_exact = Some(std::time::SystemTime::now() + std::time::Duration::from_secs(2));
    let cert = pki.client(&spec);
    let cfg = Arc::new(tls_client_config(&pki, Some(&cert), Proto::H1, false));
    let get = format!(
        "GET /webhook?hub.mode=subscribe&hub.challenge=77&hub.verify_token={TOKEN} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        gate.authority()
    )
    .into_bytes();
    let (first, kind) = raw_exchange_with(cfg.clone(), gate.addr, &get)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    // Resuming works while the certificate is valid...
    let (second, kind) = raw_exchange_with(cfg.clone(), gate.addr, &get)
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    // ...and stops once it has expired, although the client still holds a fresh ticket.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let third = raw_exchange_with(cfg, gate.addr, &get).await;
    assert!(
        third.is_err(),
        "a session resumed after the certificate expired must be refused, got {:?}",
        third.map(|(r, k)| (r.status, k))
    );
    let metrics = gate
        .running
        .as_ref()
        .unwrap()
        .metrics()
        .encode(hubgate::unix_now());
    assert!(
        metrics.contains("hubgate_tls_handshake_failures_total{reason=\"cert_expired\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn tls12_resumes_by_ticket_with_the_verified_identity_until_a_reload() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook"));
    let gate = pki.start(&cfg).await;
    let cert = pki.meta_client();
    let tls = Arc::new(tls_client_config(&pki, Some(&cert), Proto::H1, true));
    let request = |body: &[u8]| {
        let mut r = format!(
            "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
            gate.authority(),
            body.len(),
            sign(SECRET, body)
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let body = sample_body();
    let (first, kind) = raw_exchange_with(tls.clone(), gate.addr, &request(&body))
        .await
        .unwrap();
    assert_eq!(
        (first.status, kind),
        (200, Some(rustls::HandshakeKind::Full))
    );
    let second_body = [body.as_slice(), b" "].concat();
    let (second, kind) = raw_exchange_with(tls.clone(), gate.addr, &request(&second_body))
        .await
        .unwrap();
    assert_eq!(
        (second.status, kind),
        (200, Some(rustls::HandshakeKind::Resumed)),
        "TLS 1.2 resumes with a ticket (the server keeps no session IDs)"
    );
    let got = up.requests();
    assert_eq!(got.len(), 2);
    let xfcc = got[1].header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.contains(&format!("Hash={}", cert.leaf_sha256())),
        "the resumed session forwards the verified identity: {xfcc}"
    );
    // After a reload that no longer allows Meta's CN, the old ticket must not bring it back.
    let mut stricter = cfg.clone();
    stricter.allowed_cn = Some(format!("[{}]", q("partner.example.com")));
    let config = pki.config(&stricter.to_toml()).unwrap();
    gate.running.as_ref().unwrap().reload(config).unwrap();
    let third_body = [body.as_slice(), b"  "].concat();
    let third = raw_exchange_with(tls, gate.addr, &request(&third_body)).await;
    assert!(
        third.is_err(),
        "refused after the reload, got {:?}",
        third.map(|(r, k)| (r.status, k))
    );
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn resumed_session_keeps_the_verified_identity() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = require_gate(&pki, &up).await;
    let cert = pki.meta_client();
    let cfg = Arc::new(tls_client_config(&pki, Some(&cert), Proto::H1, false));
    let body = sample_body();
    let request = |body: &[u8]| {
        let mut r = format!(
            "POST /webhook HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{SIG}: {}\r\nConnection: close\r\n\r\n",
            gate.authority(),
            body.len(),
            sign(SECRET, body)
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let (first, first_kind) = raw_exchange_with(cfg.clone(), gate.addr, &request(&body))
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first_kind, Some(rustls::HandshakeKind::Full));
    // A different body: the same one again would be answered as a duplicate, not forwarded.
    let second_body = [body.as_slice(), b" "].concat();
    let (second, second_kind) = raw_exchange_with(cfg, gate.addr, &request(&second_body))
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(
        second_kind,
        Some(rustls::HandshakeKind::Resumed),
        "the second connection should resume the session"
    );
    let got = up.requests();
    assert_eq!(got.len(), 2);
    let expected = Some(format!(
        "Hash={};Subject=\"CN={META_CN},O=Meta Platforms\\\\, Inc.,L=Menlo Park,ST=California,C=US\"",
        cert.leaf_sha256()
    ));
    assert_eq!(got[0].header("x-forwarded-client-cert"), expected);
    assert_eq!(got[1].header("x-forwarded-client-cert"), expected);
}
