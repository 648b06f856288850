//! `[trusted_proxies]`: identity headers (`alb` subject, `alb-passthrough` chain) stand in for a
//! client certificate only from a trusted peer, and become `X-Forwarded-Client-Cert`; an
//! untrusted peer's headers are replaced; `X-Forwarded-For` from a trusted proxy is extended, and
//! `allow_sources` applies to the client address it names.

mod common;

use common::*;

const ALB_SUBJECT: &str = "x-amzn-mtls-clientcert-subject";
const ALB_CERT: &str = "x-amzn-mtls-clientcert";
const META_SUBJECT: &str = "CN=client.webhooks.fbclientcerts.com,O=Meta";

/// Optional client auth, the route requiring an identity, and proxies at `cidr` whose
/// `identity` headers are believed.
fn proxied<'a>(cidr: &str, identity: &str) -> Scenario<'a> {
    Scenario::new()
        .client_auth(ClientAuth::optional())
        .route(|r| r.client_cert = Some(RouteCert::Required))
        .trusted_proxies(TrustedProxies::with_identity(cidr, identity))
}

/// Behind an ALB at 127.0.0.1 that only passes clients from 31.13.0.0/16.
async fn alb_with_allowed_sources() -> Started {
    proxied("127.0.0.1/32", "alb")
        .server(|s| s.allow_sources = Some(vec!["31.13.0.0/16".into()]))
        .start()
        .await
}

/// A signed POST of a fresh body with each `(name, value)` header.
async fn post_with_headers(
    http: &reqwest::Client,
    s: &Started,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let body = unique_body();
    let mut req = http
        .post(s.url("/webhook"))
        .header("content-type", "application/json")
        .header(SIG, sign(SECRET, &body))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// `resp` was refused 403, nothing was forwarded, and the metrics count `count` requests with
/// `verdict`.
fn assert_refused(s: &Started, resp: &reqwest::Response, verdict: &str, count: u64) {
    assert_eq!(resp.status(), 403);
    s.upstream.assert_nothing_received();
    let line = format!("verdict=\"{verdict}\",status=\"403\"}} {count}");
    assert!(s.metrics().contains(&line), "missing {line:?}");
}

/// The upstream was told the identity of Meta's certificate, verified by the gate.
fn assert_meta_identity(s: &Started, got: &Recorded) {
    let xfcc = got.header("x-forwarded-client-cert").unwrap();
    assert!(
        xfcc.starts_with(&format!(
            "Hash={};Subject=\"CN={META_CN},",
            s.cert.leaf_sha256()
        )),
        "{xfcc}"
    );
}

fn no_amzn_headers(r: &Recorded) {
    let amzn: Vec<_> = r
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-amzn-"))
        .collect();
    assert!(amzn.is_empty(), "forwarded identity headers: {amzn:?}");
}

/// A POST through the proxy at 127.0.0.1 with Meta's subject and these `X-Forwarded-For` lines
/// is forwarded with `X-Forwarded-For: {forwarded}`.
async fn assert_forwarded_for(lines: &[&str], forwarded: &str) {
    let s = proxied("127.0.0.1/32", "alb").start().await;
    let mut headers = vec![(ALB_SUBJECT, META_SUBJECT)];
    headers.extend(lines.iter().map(|l| ("x-forwarded-for", *l)));
    let resp = post_with_headers(&s.client(None), &s, &headers).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        s.upstream.only().header("x-forwarded-for").as_deref(),
        Some(forwarded)
    );
}

fn url_encoded_chain(cert: &ClientCert) -> String {
    percent_encoding::utf8_percent_encode(&cert.chain_pem(), percent_encoding::NON_ALPHANUMERIC)
        .to_string()
}

#[tokio::test]
async fn alb_subject_from_a_trusted_proxy_admits_and_becomes_xfcc() {
    let s = proxied("127.0.0.1/32", "alb").start().await;
    let http = s.client(None);
    let resp = post_with_headers(&http, &s, &[(ALB_SUBJECT, META_SUBJECT)]).await;
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert_eq!(
        got.header("x-forwarded-client-cert").as_deref(),
        Some(format!("Subject=\"{META_SUBJECT}\"").as_str())
    );
    no_amzn_headers(&got);
}

#[tokio::test]
async fn alb_subject_with_a_wrong_cn_is_refused() {
    let s = proxied("127.0.0.1/32", "alb").start().await;
    let http = s.client(None);
    let resp = post_with_headers(&http, &s, &[(ALB_SUBJECT, "CN=evil.example.com,O=Meta")]).await;
    assert_refused(&s, &resp, "bad_identity_header", 1);
}

#[tokio::test]
async fn identity_headers_from_an_untrusted_peer_do_not_stand_in_for_a_certificate() {
    let s = proxied("10.0.0.0/8", "alb").start().await;
    let http = s.client(None);
    let resp = post_with_headers(&http, &s, &[(ALB_SUBJECT, META_SUBJECT)]).await;
    assert_refused(&s, &resp, "client_cert_required", 1);
}

#[tokio::test]
async fn untrusted_peer_gets_its_own_xfcc_and_xff_whatever_it_sends() {
    let s = proxied("10.0.0.0/8", "alb").start().await;
    let resp = post_with_headers(
        &s.http(),
        &s,
        &[
            (ALB_SUBJECT, "CN=evil.example.com"),
            (ALB_CERT, "-----BEGIN%20CERTIFICATE-----"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-client-cert", "Hash=evil"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert_meta_identity(&s, &got);
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    no_amzn_headers(&got);
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_is_extended_with_the_proxy_address() {
    assert_forwarded_for(&["31.13.1.1"], "31.13.1.1, 127.0.0.1").await;
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_keeps_every_header_line() {
    // Two X-Forwarded-For lines are one comma-joined list (RFC 9110 5.3); the client address is
    // taken from all of them, so the list passed on must hold all of them too.
    assert_forwarded_for(&["6.6.6.6", "31.13.1.1"], "6.6.6.6, 31.13.1.1, 127.0.0.1").await;
}

#[tokio::test]
async fn alb_passthrough_chain_is_verified_and_hashed() {
    let s = proxied("127.0.0.1/32", "alb-passthrough").start().await;
    let encoded = url_encoded_chain(&s.cert);
    let resp = post_with_headers(&s.client(None), &s, &[(ALB_CERT, &encoded)]).await;
    assert_eq!(resp.status(), 200);
    let got = s.upstream.only();
    assert_meta_identity(&s, &got);
    no_amzn_headers(&got);
}

#[tokio::test]
async fn alb_passthrough_untrusted_or_wrong_cn_chain_is_refused() {
    let s = proxied("127.0.0.1/32", "alb-passthrough").start().await;
    let http = s.client(None);
    for bad in [
        s.pki.untrusted_client(&LeafSpec::cn(META_CN)),
        s.pki.client(&LeafSpec::cn("evil.example.com")),
    ] {
        let encoded = url_encoded_chain(&bad);
        let resp = post_with_headers(&http, &s, &[(ALB_CERT, &encoded)]).await;
        assert_eq!(resp.status(), 403);
    }
    s.upstream.assert_nothing_received();
    assert!(s
        .metrics()
        .contains("verdict=\"bad_identity_header\",status=\"403\"} 2"));
}

#[tokio::test]
async fn allow_sources_applies_to_the_client_address_a_trusted_proxy_forwards() {
    let s = alb_with_allowed_sources().await;
    let http = s.client(None);
    let allowed = post_with_headers(
        &http,
        &s,
        &[
            (ALB_SUBJECT, META_SUBJECT),
            ("x-forwarded-for", "31.13.1.1"),
        ],
    )
    .await;
    assert_eq!(allowed.status(), 200);
    let refused = post_with_headers(
        &http,
        &s,
        &[(ALB_SUBJECT, META_SUBJECT), ("x-forwarded-for", "8.8.8.8")],
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert_eq!(s.upstream.requests().len(), 1);
    assert!(s
        .metrics()
        .contains("verdict=\"source_not_allowed\",status=\"403\"} 1"));
}

#[tokio::test]
async fn allow_sources_refuses_a_proxied_request_whose_client_is_unknown() {
    let s = alb_with_allowed_sources().await;
    let http = s.client(None);
    for xff in [None, Some("not-an-address"), Some("8.8.8.8:443")] {
        let mut headers = vec![(ALB_SUBJECT, META_SUBJECT)];
        if let Some(v) = xff {
            headers.push(("x-forwarded-for", v));
        }
        let r = post_with_headers(&http, &s, &headers).await;
        assert_eq!(r.status(), 403, "X-Forwarded-For {xff:?}");
    }
    s.upstream.assert_nothing_received();
    for hop in ["31.13.1.1:443", "[::ffff:31.13.1.2]:443"] {
        let r = post_with_headers(
            &http,
            &s,
            &[(ALB_SUBJECT, META_SUBJECT), ("x-forwarded-for", hop)],
        )
        .await;
        assert_eq!(r.status(), 200, "X-Forwarded-For {hop}");
    }
    assert_eq!(s.upstream.requests().len(), 2);
}

#[tokio::test]
async fn repeated_identity_header_from_a_trusted_proxy_is_refused() {
    let s = proxied("127.0.0.1/32", "alb").start().await;
    let http = s.client(None);
    let r = post_with_headers(
        &http,
        &s,
        &[(ALB_SUBJECT, META_SUBJECT), (ALB_SUBJECT, "CN=evil")],
    )
    .await;
    assert_refused(&s, &r, "bad_identity_header", 1);
}
