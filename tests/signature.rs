//! `X-Hub-Signature-256` over the raw body: valid, rotated, malformed and wrong signatures, the
//! opt-in legacy SHA-1 header, and bodies whose exact bytes matter.

mod common;

use common::*;

struct Setup {
    _pki: Pki,
    up: Upstream,
    gate: Gate,
    http: reqwest::Client,
}

/// A gate in `require` mode with the route tweaked by `f`, and a client presenting Meta's
/// certificate.
async fn setup_with(f: impl FnOnce(&mut RouteConfig)) -> Setup {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    f(cfg.route());
    let gate = pki.start(&cfg).await;
    let http = client(&pki, Some(&pki.meta_client()));
    Setup {
        _pki: pki,
        up,
        gate,
        http,
    }
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

impl Setup {
    /// POSTs `body` with each `(name, value)` header, returns the status.
    async fn post(&self, body: &[u8], headers: &[(&str, &str)]) -> u16 {
        let mut req = self
            .http
            .post(self.gate.url("/webhook"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request").status().as_u16()
    }

    /// The request was refused with 403 and the upstream got nothing.
    async fn assert_forbidden(&self, body: &[u8], headers: &[(&str, &str)]) {
        assert_eq!(self.post(body, headers).await, 403);
        self.up.assert_nothing_received();
    }

    /// The request was forwarded: 200, and the upstream got exactly `body`.
    async fn assert_forwarded(&self, body: &[u8], headers: &[(&str, &str)]) {
        assert_eq!(self.post(body, headers).await, 200);
        assert_eq!(self.up.only().body, body);
    }
}

#[tokio::test]
async fn valid_signature_is_forwarded() {
    let s = setup().await;
    let body = sample_body();
    s.assert_forwarded(&body, &[(SIG, &sign(SECRET, &body))])
        .await;
}

#[tokio::test]
async fn each_rotated_inline_secret_is_accepted() {
    let s =
        setup_with(|r| r.app_secrets = format!("[{}, {}]", q("new-secret"), q("old-secret"))).await;
    let body = sample_body();
    assert_eq!(
        s.post(&body, &[(SIG, &sign("new-secret", &body))]).await,
        200
    );
    assert_eq!(
        s.post(&body, &[(SIG, &sign("old-secret", &body))]).await,
        200
    );
    assert_eq!(s.up.requests().len(), 2);
}

#[tokio::test]
async fn rotated_secret_from_env_is_accepted() {
    // A name no other test uses; set before the configuration is loaded.
    let var = format!("HG_TEST_OLD_APP_SECRET_{}", std::process::id());
    std::env::set_var(&var, "env-held-secret");
    let s = setup_with(|r| {
        r.app_secrets = format!("[{}, {{ env = {} }}]", q(SECRET), q(&var));
    })
    .await;
    let body = sample_body();
    s.assert_forwarded(&body, &[(SIG, &sign("env-held-secret", &body))])
        .await;
}

#[tokio::test]
async fn secret_from_file_is_accepted_without_its_trailing_newline() {
    let pki = Pki::new();
    pki.write("app-secret.txt", "file-held-secret\n");
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.route().app_secrets = format!("[{{ file = {} }}]", q("app-secret.txt"));
    let gate = pki.start(&cfg).await;
    let body = sample_body();
    let resp = client(&pki, Some(&pki.meta_client()))
        .post(gate.url("/webhook"))
        .header(SIG, sign("file-held-secret", &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.only().body, body);
}

#[tokio::test]
async fn wrong_secret_is_403() {
    let s = setup().await;
    let body = sample_body();
    s.assert_forbidden(&body, &[(SIG, &sign("not-the-secret", &body))])
        .await;
}

#[tokio::test]
async fn missing_signature_is_403() {
    let s = setup().await;
    s.assert_forbidden(&sample_body(), &[]).await;
}

#[tokio::test]
async fn empty_signature_is_403() {
    let s = setup().await;
    s.assert_forbidden(&sample_body(), &[(SIG, "")]).await;
}

#[tokio::test]
async fn bare_prefix_without_digest_is_403() {
    let s = setup().await;
    s.assert_forbidden(&sample_body(), &[(SIG, "sha256=")])
        .await;
}

#[tokio::test]
async fn digest_without_sha256_prefix_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let bare = sig.strip_prefix("sha256=").unwrap();
    s.assert_forbidden(&body, &[(SIG, bare)]).await;
}

#[tokio::test]
async fn sha1_prefix_in_sha256_header_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = sign(SECRET, &body).replace("sha256=", "sha1=");
    s.assert_forbidden(&body, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn truncated_digest_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    s.assert_forbidden(&body, &[(SIG, &sig[..sig.len() - 2])])
        .await;
}

#[tokio::test]
async fn overlong_digest_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = format!("{}00", sign(SECRET, &body));
    s.assert_forbidden(&body, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn non_hex_digest_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = format!("sha256={}", "zz".repeat(32));
    s.assert_forbidden(&body, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn upper_case_hex_digest_is_accepted() {
    let s = setup().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let upper = format!("sha256={}", sig["sha256=".len()..].to_ascii_uppercase());
    assert_ne!(upper, sig);
    s.assert_forwarded(&body, &[(SIG, &upper)]).await;
    // Passed through as received.
    assert_eq!(s.up.only().header(SIG), Some(upper));
}

#[tokio::test]
async fn body_tampered_by_one_byte_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let mut tampered = body.clone();
    let i = tampered.len() / 2;
    tampered[i] ^= 0x01;
    s.assert_forbidden(&tampered, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn body_with_one_extra_byte_is_403() {
    let s = setup().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let mut longer = body.clone();
    longer.push(b'\n');
    s.assert_forbidden(&longer, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn duplicate_signature_headers_are_403() {
    let s = setup().await;
    let body = sample_body();
    let good = sign(SECRET, &body);
    let bad = sign("not-the-secret", &body);
    // Both orders: a valid copy must not rescue an invalid one.
    assert_eq!(s.post(&body, &[(SIG, &bad), (SIG, &good)]).await, 403);
    assert_eq!(s.post(&body, &[(SIG, &good), (SIG, &good)]).await, 403);
    s.up.assert_nothing_received();
}

#[tokio::test]
async fn signed_empty_body_is_forwarded() {
    let s = setup().await;
    s.assert_forwarded(b"", &[(SIG, &sign(SECRET, b""))]).await;
}

#[tokio::test]
async fn legacy_sha1_is_refused_by_default() {
    let s = setup().await;
    let body = sample_body();
    s.assert_forbidden(&body, &[("x-hub-signature", &sign_sha1(SECRET, &body))])
        .await;
}

#[tokio::test]
async fn legacy_sha1_is_accepted_when_enabled() {
    let s = setup_with(|r| r.legacy_sha1 = true).await;
    let body = sample_body();
    s.assert_forwarded(&body, &[("x-hub-signature", &sign_sha1(SECRET, &body))])
        .await;
}

#[tokio::test]
async fn legacy_sha1_with_wrong_secret_is_403() {
    let s = setup_with(|r| r.legacy_sha1 = true).await;
    let body = sample_body();
    s.assert_forbidden(&body, &[("x-hub-signature", &sign_sha1("nope", &body))])
        .await;
}

#[tokio::test]
async fn wrong_sha256_does_not_fall_back_to_valid_sha1() {
    let s = setup_with(|r| r.legacy_sha1 = true).await;
    let body = sample_body();
    s.assert_forbidden(
        &body,
        &[
            (SIG, &sign("not-the-secret", &body)),
            ("x-hub-signature", &sign_sha1(SECRET, &body)),
        ],
    )
    .await;
}

/// Meta's payloads as they arrive: non-ASCII either raw or as `\uXXXX` escapes, with `\/`.
const RAW_UTF8: &str =
    r#"{"entry":[{"changes":[{"value":{"text":"äöå – 👍","url":"https://x.example/a"}}]}]}"#;
const ESCAPED: &str = r#"{"entry":[{"changes":[{"value":{"text":"\u00e4\u00f6\u00e5 \u2013 \ud83d\udc4d","url":"https:\/\/x.example\/a"}}]}]}"#;

#[tokio::test]
async fn raw_utf8_body_is_forwarded_byte_identical() {
    let s = setup().await;
    let body = RAW_UTF8.as_bytes();
    let sig = sign(SECRET, body);
    s.assert_forwarded(body, &[(SIG, &sig)]).await;
    assert_eq!(s.up.only().header(SIG), Some(sig));
}

#[tokio::test]
async fn escaped_unicode_body_is_forwarded_byte_identical() {
    let s = setup().await;
    let body = ESCAPED.as_bytes();
    let sig = sign(SECRET, body);
    s.assert_forwarded(body, &[(SIG, &sig)]).await;
    let got = s.up.only();
    assert_eq!(got.header(SIG), Some(sig));
    // Still the escapes, not decoded or re-encoded text.
    assert!(got.body.windows(6).any(|w| w == br"\u00e4"));
    assert!(got.body.windows(2).any(|w| w == br"\/"));
}

#[tokio::test]
async fn signature_of_the_decoded_form_does_not_verify_the_escaped_body() {
    let s = setup().await;
    // Signed over the same JSON value in another encoding: the gate must not normalize.
    s.assert_forbidden(
        ESCAPED.as_bytes(),
        &[(SIG, &sign(SECRET, RAW_UTF8.as_bytes()))],
    )
    .await;
}

#[tokio::test]
async fn binary_body_is_forwarded_byte_identical() {
    let s = setup().await;
    let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    s.assert_forwarded(&body, &[(SIG, &sign(SECRET, &body))])
        .await;
}
