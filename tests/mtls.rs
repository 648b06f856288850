//! Client certificates: chain verification against the configured anchors, the CN allow-list,
//! and the three `client_auth` modes with per-route `client_cert`.

mod common;

use common::*;
use rcgen::ExtendedKeyUsagePurpose;

/// A signed POST with `identity` must reach the upstream unchanged and answer 200.
async fn assert_admitted(s: &Started, identity: Option<&ClientCert>) {
    let body = sample_body();
    let resp = post_signed(&s.client(identity), &s.url("/webhook"), &body)
        .await
        .expect("request must succeed");
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().body, body);
}

/// A signed POST with `identity` must fail in the TLS handshake with the fatal `alert` the
/// gate sends (as the client reports it), and nothing reaches the upstream.
async fn assert_refused(s: &Started, identity: Option<&ClientCert>, alert: &str) {
    let result = post_signed(&s.client(identity), &s.url("/webhook"), &sample_body()).await;
    assert_tls_alert(result, alert);
    s.upstream.assert_nothing_received();
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

/// The default gate: `require` mode, the test root anchored, Meta's CN allowed.
async fn require_gate() -> Started {
    Scenario::new().start().await
}

/// `client_auth` as given.
async fn gate_with(auth: ClientAuth) -> Started {
    Scenario::new().client_auth(auth).start().await
}

/// Optional client auth, the route not needing a certificate.
async fn optional_open_route() -> Started {
    Scenario::new()
        .client_auth(ClientAuth::optional())
        .route(|r| r.client_cert = Some(RouteCert::None))
        .start()
        .await
}

#[tokio::test]
async fn good_chain_with_intermediate_is_admitted() {
    let s = require_gate().await;
    assert_admitted(&s, Some(&s.pki.meta_client())).await;
}

#[tokio::test]
async fn good_chain_over_tls12_is_admitted() {
    let s = require_gate().await;
    let body = sample_body();
    let resp = post_signed(
        &client_tls12(&s.pki, Some(&s.pki.meta_client())),
        &s.url("/webhook"),
        &body,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().body, body);
}

#[tokio::test]
async fn intermediate_as_anchor_admits_full_chain() {
    let s = gate_with(ClientAuth {
        roots: Some(Paths::One("intermediate.pem".into())),
        ..ClientAuth::require()
    })
    .await;
    assert_admitted(&s, Some(&s.pki.meta_client())).await;
}

#[tokio::test]
async fn intermediate_as_anchor_admits_leaf_sent_alone() {
    let s = gate_with(ClientAuth {
        roots: Some(Paths::One("intermediate.pem".into())),
        ..ClientAuth::require()
    })
    .await;
    assert_admitted(&s, Some(&s.pki.meta_client().leaf_only())).await;
}

#[tokio::test]
async fn roots_given_as_a_list_are_all_anchors() {
    let other = Pki::new(); // an unrelated CA, listed first
    let s = Scenario::new()
        .file("other.pem", &other.root_pem())
        .client_auth(ClientAuth {
            roots: Some(Paths::Many(vec!["other.pem".into(), "root.pem".into()])),
            ..ClientAuth::require()
        })
        .start()
        .await;
    assert_admitted(&s, Some(&s.pki.meta_client())).await;
}

#[tokio::test]
async fn wrong_cn_is_refused() {
    let s = require_gate().await;
    let cert = s.pki.client(&LeafSpec::cn("graph.facebook.com"));
    assert_refused(&s, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn cn_differing_only_in_case_is_refused() {
    let s = require_gate().await;
    let cert = s
        .pki
        .client(&LeafSpec::cn("Client.Webhooks.FBClientCerts.com"));
    assert_refused(&s, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn leaf_with_a_second_cn_is_refused() {
    let s = require_gate().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.extra_cn = Some("attacker.example".into());
    assert_refused(&s, Some(&s.pki.client(&spec)), "BadCertificate").await;
}

#[tokio::test]
async fn leaf_with_meta_name_only_in_its_san_is_refused() {
    let s = require_gate().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.omit_cn = true;
    assert_refused(&s, Some(&s.pki.client(&spec)), "BadCertificate").await;
}

#[tokio::test]
async fn expired_leaf_is_refused() {
    let s = require_gate().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.not_before = (2000, 1, 1);
    spec.not_after = (2001, 1, 1);
    assert_refused(&s, Some(&s.pki.client(&spec)), "CertificateExpired").await;
}

#[tokio::test]
async fn not_yet_valid_leaf_is_refused() {
    let s = require_gate().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.not_before = (2080, 1, 1);
    spec.not_after = (2090, 1, 1);
    // rustls reports "not valid yet" with the certificate_expired alert, as RFC 8446 allows.
    assert_refused(&s, Some(&s.pki.client(&spec)), "CertificateExpired").await;
}

#[tokio::test]
async fn self_signed_leaf_with_meta_cn_is_refused() {
    let s = require_gate().await;
    let cert = s.pki.self_signed_client(&LeafSpec::cn(META_CN));
    assert_refused(&s, Some(&cert), "UnknownCA").await;
}

#[tokio::test]
async fn meta_cn_under_untrusted_root_is_refused() {
    let s = require_gate().await;
    // Same root and intermediate names as the trusted ones; different keys.
    let cert = s.pki.untrusted_client(&LeafSpec::cn(META_CN));
    // The names match an anchor, so the failure is the intermediate's signature.
    assert_refused(&s, Some(&cert), "DecryptError").await;
}

#[tokio::test]
async fn server_auth_only_eku_is_refused() {
    let s = require_gate().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.eku = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert_refused(&s, Some(&s.pki.client(&spec)), "UnsupportedCertificate").await;
}

#[tokio::test]
async fn leaf_without_intermediate_is_refused_when_root_is_the_anchor() {
    let s = require_gate().await;
    assert_refused(&s, Some(&s.pki.meta_client().leaf_only()), "UnknownCA").await;
}

#[tokio::test]
async fn wrong_cn_over_tls12_is_refused() {
    let s = require_gate().await;
    let cert = s.pki.client(&LeafSpec::cn("graph.facebook.com"));
    let result = post_signed(
        &client_tls12(&s.pki, Some(&cert)),
        &s.url("/webhook"),
        &sample_body(),
    )
    .await;
    assert_tls_alert(result, "CertificateUnknown");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn require_mode_without_cert_is_refused() {
    let s = require_gate().await;
    assert_refused(&s, None, "CertificateRequired").await;
}

#[tokio::test]
async fn require_mode_without_cert_gets_no_challenge_answer() {
    let s = require_gate().await;
    let result = s
        .client(None)
        .get(s.url("/webhook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=mytoken"))
        .send()
        .await;
    assert_tls_alert(result, "CertificateRequired");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn empty_allowed_cn_admits_nobody() {
    let s = gate_with(ClientAuth::require().allowed_cn(&[])).await;
    assert_refused(&s, Some(&s.pki.meta_client()), "CertificateUnknown").await;
}

#[tokio::test]
async fn configured_allowed_cn_replaces_the_default() {
    let s = gate_with(ClientAuth::require().allowed_cn(&["partner.example.com"])).await;
    let partner = s.pki.client(&LeafSpec::cn("partner.example.com"));
    assert_admitted(&s, Some(&partner)).await;
    // Meta's CN is no longer on the list.
    let result = post_signed(
        &s.client(Some(&s.pki.meta_client())),
        &s.url("/webhook"),
        &sample_body(),
    )
    .await;
    assert_tls_alert(result, "CertificateUnknown");
    assert_eq!(s.upstream.requests().len(), 1);
}

#[tokio::test]
async fn optional_mode_without_cert_on_required_route_is_403() {
    let s = gate_with(ClientAuth::optional()).await;
    let resp = post_signed(&s.client(None), &s.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn optional_mode_without_cert_challenge_on_required_route_is_403() {
    let s = gate_with(ClientAuth::optional()).await;
    let resp = s
        .client(None)
        .get(s.url("/webhook?hub.mode=subscribe&hub.challenge=42&hub.verify_token=mytoken"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_ne!(resp.text().await.unwrap(), "42");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn optional_mode_without_cert_on_open_route_is_forwarded() {
    let s = optional_open_route().await;
    assert_admitted(&s, None).await;
    assert_eq!(s.upstream.only().header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn optional_mode_with_good_cert_on_required_route_is_forwarded() {
    let s = gate_with(ClientAuth::optional()).await;
    let cert = s.pki.meta_client();
    assert_admitted(&s, Some(&cert)).await;
    let xfcc = s.upstream.only().header("x-forwarded-client-cert").unwrap();
    assert!(
        xfcc.starts_with(&format!("Hash={};", cert.leaf_sha256())),
        "{xfcc}"
    );
}

#[tokio::test]
async fn optional_mode_with_wrong_cn_is_refused_even_on_open_route() {
    let s = optional_open_route().await;
    let cert = s.pki.client(&LeafSpec::cn("graph.facebook.com"));
    assert_refused(&s, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn optional_mode_with_untrusted_cert_is_refused_even_on_open_route() {
    let s = optional_open_route().await;
    let cert = s.pki.self_signed_client(&LeafSpec::cn(META_CN));
    assert_refused(&s, Some(&cert), "UnknownCA").await;
}

#[tokio::test]
async fn off_mode_without_cert_is_forwarded() {
    let s = gate_with(ClientAuth::off()).await;
    assert_admitted(&s, None).await;
    assert_eq!(s.upstream.only().header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn off_mode_does_not_request_a_cert() {
    let s = gate_with(ClientAuth::off()).await;
    // The client would present one if asked; no identity may reach the upstream.
    assert_admitted(&s, Some(&s.pki.meta_client())).await;
    assert_eq!(s.upstream.only().header("x-forwarded-client-cert"), None);
}

#[tokio::test]
async fn resumed_session_does_not_outlive_its_certificate() {
    let s = require_gate().await;
    let mut spec = LeafSpec::cn(META_CN);
    spec.not_after_exact = Some(std::time::SystemTime::now() + std::time::Duration::from_secs(2));
    let cert = s.pki.client(&spec);
    let cfg = s.tls_config(Some(&cert), false);
    let get = format!(
        "GET /webhook?hub.mode=subscribe&hub.challenge=77&hub.verify_token={TOKEN} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.gate.authority()
    )
    .into_bytes();
    let (first, kind) = raw_exchange_with(cfg.clone(), s.gate.addr, &get)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    // Resuming works while the certificate is valid...
    let (second, kind) = raw_exchange_with(cfg.clone(), s.gate.addr, &get)
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    // ...and stops once it has expired, although the client still holds a fresh ticket.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let third = raw_exchange_with(cfg, s.gate.addr, &get).await;
    assert!(
        third.is_err(),
        "a session resumed after the certificate expired must be refused, got {:?}",
        third.map(|(r, k)| (r.status, k))
    );
    let metrics = s.metrics();
    assert!(
        metrics.contains("hubgate_tls_handshake_failures_total{reason=\"cert_expired\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn tls12_resumes_by_ticket_with_the_verified_identity_until_a_reload() {
    let s = require_gate().await;
    let cert = s.pki.meta_client();
    let tls = s.tls_config(Some(&cert), true);
    let request = |body: &[u8]| s.signed_request("/webhook", body, "");
    let body = sample_body();
    let (first, kind) = raw_exchange_with(tls.clone(), s.gate.addr, &request(&body))
        .await
        .unwrap();
    assert_eq!(
        (first.status, kind),
        (200, Some(rustls::HandshakeKind::Full))
    );
    let second_body = [body.as_slice(), b" "].concat();
    let (second, kind) = raw_exchange_with(tls.clone(), s.gate.addr, &request(&second_body))
        .await
        .unwrap();
    assert_eq!(
        (second.status, kind),
        (200, Some(rustls::HandshakeKind::Resumed)),
        "TLS 1.2 resumes with a ticket (the server keeps no session IDs)"
    );
    let got = s.upstream.requests();
    assert_eq!(got.len(), 2);
    let xfcc = got[1].header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.contains(&format!("Hash={}", cert.leaf_sha256())),
        "the resumed session forwards the verified identity: {xfcc}"
    );
    // After a reload that no longer allows Meta's CN, the old ticket must not bring it back.
    s.reload(|c| c.client_auth = ClientAuth::require().allowed_cn(&["partner.example.com"]));
    let third_body = [body.as_slice(), b"  "].concat();
    let third = raw_exchange_with(tls, s.gate.addr, &request(&third_body)).await;
    assert!(
        third.is_err(),
        "refused after the reload, got {:?}",
        third.map(|(r, k)| (r.status, k))
    );
    assert_eq!(s.upstream.requests().len(), 2);
}

#[tokio::test]
async fn resumed_session_keeps_the_verified_identity() {
    let s = require_gate().await;
    let cert = s.pki.meta_client();
    let cfg = s.tls_config(Some(&cert), false);
    let body = sample_body();
    let request = |body: &[u8]| s.signed_request("/webhook", body, "");
    let (first, first_kind) = raw_exchange_with(cfg.clone(), s.gate.addr, &request(&body))
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first_kind, Some(rustls::HandshakeKind::Full));
    // A different body: the same one again would be answered as a duplicate, not forwarded.
    let second_body = [body.as_slice(), b" "].concat();
    let (second, second_kind) = raw_exchange_with(cfg, s.gate.addr, &request(&second_body))
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(
        second_kind,
        Some(rustls::HandshakeKind::Resumed),
        "the second connection should resume the session"
    );
    let got = s.upstream.requests();
    assert_eq!(got.len(), 2);
    let expected = Some(format!(
        "Hash={};Subject=\"CN={META_CN},O=Meta Platforms\\\\, Inc.,L=Menlo Park,ST=California,C=US\"",
        cert.leaf_sha256()
    ));
    assert_eq!(got[0].header("x-forwarded-client-cert"), expected);
    assert_eq!(got[1].header("x-forwarded-client-cert"), expected);
}

// ---------------------------------------------------------------------------------------------
// Name constraints apply to the CN (WebPKI applies them to SANs only)

#[tokio::test]
async fn a_cn_outside_an_intermediates_permitted_names_is_refused() {
    let s = Scenario::new().admin().start().await;
    // The CA may issue for example.com only; the leaf claims Meta's CN with no SAN.
    let cert =
        s.pki
            .constrained_client(&LeafSpec::meta(|l| l.no_san = true), &["example.com"], &[]);
    assert_refused(&s, Some(&cert), "CertificateUnknown").await;
    assert!(s
        .metrics()
        .contains("hubgate_tls_handshake_failures_total{reason=\"cn_name_constraint\"} 1"));
    // With the SAN too, WebPKI itself refuses it (its own name-constraint check).
    let with_san = s
        .pki
        .constrained_client(&LeafSpec::meta(|_| {}), &["example.com"], &[]);
    let result = post_signed(
        &s.client(Some(&with_san)),
        &s.url("/webhook"),
        &sample_body(),
    )
    .await;
    assert!(result.is_err(), "refused in the handshake");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn a_cn_in_an_excluded_subtree_is_refused() {
    let s = require_gate().await;
    let cert = s.pki.constrained_client(
        &LeafSpec::meta(|l| l.no_san = true),
        &[],
        &["fbclientcerts.com"],
    );
    assert_refused(&s, Some(&cert), "CertificateUnknown").await;
}

#[tokio::test]
async fn a_cn_within_the_permitted_names_is_admitted() {
    let s = require_gate().await;
    let cert = s.pki.constrained_client(
        &LeafSpec::meta(|l| l.no_san = true),
        &[".fbclientcerts.com"],
        &["example.com"],
    );
    assert_admitted(&s, Some(&cert)).await;
}
