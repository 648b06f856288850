//! `X-Hub-Signature-256` over the raw body: valid, rotated, malformed and wrong signatures, the
//! opt-in legacy SHA-1 header, and bodies whose exact bytes matter.

mod common;

use common::*;

/// POSTs `body` to `/webhook` with Meta's certificate and each `(name, value)` header; the
/// status.
async fn post(s: &Started, body: &[u8], headers: &[(&str, &str)]) -> u16 {
    s.post_with_headers(body, headers).await.status().as_u16()
}

/// The request was refused with 403 and the upstream got nothing.
async fn assert_forbidden(s: &Started, body: &[u8], headers: &[(&str, &str)]) {
    assert_eq!(post(s, body, headers).await, 403);
    s.upstream.assert_nothing_received();
}

/// The request was forwarded: 200, and the upstream got exactly `body`.
async fn assert_forwarded(s: &Started, body: &[u8], headers: &[(&str, &str)]) {
    assert_eq!(post(s, body, headers).await, 200);
    assert_eq!(s.upstream.only().body, body);
}

/// The default scenario: `require` mode, Meta's certificate, `SECRET`.
async fn gate() -> Started {
    Scenario::new().start().await
}

/// The route accepts the legacy `X-Hub-Signature` (SHA-1) header.
async fn legacy_gate() -> Started {
    Scenario::new()
        .route(|r| r.legacy_sha1 = true)
        .start()
        .await
}

#[tokio::test]
async fn valid_signature_is_forwarded() {
    let s = gate().await;
    let body = sample_body();
    assert_forwarded(&s, &body, &[(SIG, &sign(SECRET, &body))]).await;
}

#[tokio::test]
async fn each_rotated_inline_secret_is_accepted() {
    let s = Scenario::new()
        .route(|r| r.app_secrets = vec![Secret::inline("new-secret"), Secret::inline("old-secret")])
        .start()
        .await;
    let body = sample_body();
    assert_eq!(
        post(&s, &body, &[(SIG, &sign("new-secret", &body))]).await,
        200
    );
    assert_eq!(
        post(&s, &body, &[(SIG, &sign("old-secret", &body))]).await,
        200
    );
    assert_eq!(s.upstream.requests().len(), 2);
}

#[tokio::test]
async fn rotated_secret_from_env_is_accepted() {
    // The configuration reads the variable from the scenario's environment, not the process's.
    let s = Scenario::new()
        .env("HG_TEST_OLD_APP_SECRET", "env-held-secret")
        .route(|r| r.app_secrets.push(Secret::env("HG_TEST_OLD_APP_SECRET")))
        .start()
        .await;
    let body = sample_body();
    assert_forwarded(&s, &body, &[(SIG, &sign("env-held-secret", &body))]).await;
}

#[tokio::test]
async fn secret_from_file_is_accepted_without_its_trailing_newline() {
    let s = Scenario::new()
        .file("app-secret.txt", "file-held-secret\n")
        .route(|r| r.app_secrets = vec![Secret::file("app-secret.txt")])
        .start()
        .await;
    let body = sample_body();
    assert_forwarded(&s, &body, &[(SIG, &sign("file-held-secret", &body))]).await;
}

#[tokio::test]
async fn wrong_secret_is_403() {
    let s = gate().await;
    let body = sample_body();
    assert_forbidden(&s, &body, &[(SIG, &sign("not-the-secret", &body))]).await;
}

#[tokio::test]
async fn missing_signature_is_403() {
    let s = gate().await;
    assert_forbidden(&s, &sample_body(), &[]).await;
}

#[tokio::test]
async fn empty_signature_is_403() {
    let s = gate().await;
    assert_forbidden(&s, &sample_body(), &[(SIG, "")]).await;
}

#[tokio::test]
async fn bare_prefix_without_digest_is_403() {
    let s = gate().await;
    assert_forbidden(&s, &sample_body(), &[(SIG, "sha256=")]).await;
}

#[tokio::test]
async fn digest_without_sha256_prefix_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let bare = sig.strip_prefix("sha256=").unwrap();
    assert_forbidden(&s, &body, &[(SIG, bare)]).await;
}

#[tokio::test]
async fn sha1_prefix_in_sha256_header_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = sign(SECRET, &body).replace("sha256=", "sha1=");
    assert_forbidden(&s, &body, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn truncated_digest_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    assert_forbidden(&s, &body, &[(SIG, &sig[..sig.len() - 2])]).await;
}

#[tokio::test]
async fn overlong_digest_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = format!("{}00", sign(SECRET, &body));
    assert_forbidden(&s, &body, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn non_hex_digest_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = format!("sha256={}", "zz".repeat(32));
    assert_forbidden(&s, &body, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn upper_case_hex_digest_is_accepted() {
    let s = gate().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let upper = format!("sha256={}", sig["sha256=".len()..].to_ascii_uppercase());
    assert_ne!(upper, sig);
    assert_forwarded(&s, &body, &[(SIG, &upper)]).await;
    // Passed through as received.
    assert_eq!(s.upstream.only().header(SIG), Some(upper));
}

#[tokio::test]
async fn body_tampered_by_one_byte_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let mut tampered = body.clone();
    let i = tampered.len() / 2;
    tampered[i] ^= 0x01;
    assert_forbidden(&s, &tampered, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn body_with_one_extra_byte_is_403() {
    let s = gate().await;
    let body = sample_body();
    let sig = sign(SECRET, &body);
    let mut longer = body.clone();
    longer.push(b'\n');
    assert_forbidden(&s, &longer, &[(SIG, &sig)]).await;
}

#[tokio::test]
async fn duplicate_signature_headers_are_403() {
    let s = gate().await;
    let body = sample_body();
    let good = sign(SECRET, &body);
    let bad = sign("not-the-secret", &body);
    // Both orders: a valid copy must not rescue an invalid one.
    assert_eq!(post(&s, &body, &[(SIG, &bad), (SIG, &good)]).await, 403);
    assert_eq!(post(&s, &body, &[(SIG, &good), (SIG, &good)]).await, 403);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn signed_empty_body_is_forwarded() {
    let s = gate().await;
    assert_forwarded(&s, b"", &[(SIG, &sign(SECRET, b""))]).await;
}

#[tokio::test]
async fn legacy_sha1_is_refused_by_default() {
    let s = gate().await;
    let body = sample_body();
    assert_forbidden(&s, &body, &[("x-hub-signature", &sign_sha1(SECRET, &body))]).await;
}

#[tokio::test]
async fn legacy_sha1_is_accepted_when_enabled() {
    let s = legacy_gate().await;
    let body = sample_body();
    assert_forwarded(&s, &body, &[("x-hub-signature", &sign_sha1(SECRET, &body))]).await;
}

#[tokio::test]
async fn legacy_sha1_with_wrong_secret_is_403() {
    let s = legacy_gate().await;
    let body = sample_body();
    assert_forbidden(&s, &body, &[("x-hub-signature", &sign_sha1("nope", &body))]).await;
}

#[tokio::test]
async fn wrong_sha256_does_not_fall_back_to_valid_sha1() {
    let s = legacy_gate().await;
    let body = sample_body();
    assert_forbidden(
        &s,
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
    let s = gate().await;
    let body = RAW_UTF8.as_bytes();
    let sig = sign(SECRET, body);
    assert_forwarded(&s, body, &[(SIG, &sig)]).await;
    assert_eq!(s.upstream.only().header(SIG), Some(sig));
}

#[tokio::test]
async fn escaped_unicode_body_is_forwarded_byte_identical() {
    let s = gate().await;
    let body = ESCAPED.as_bytes();
    let sig = sign(SECRET, body);
    assert_forwarded(&s, body, &[(SIG, &sig)]).await;
    let got = s.upstream.only();
    assert_eq!(got.header(SIG), Some(sig));
    // Still the escapes, not decoded or re-encoded text.
    assert!(got.body.windows(6).any(|w| w == br"\u00e4"));
    assert!(got.body.windows(2).any(|w| w == br"\/"));
}

#[tokio::test]
async fn signature_of_the_decoded_form_does_not_verify_the_escaped_body() {
    let s = gate().await;
    // Signed over the same JSON value in another encoding: the gate must not normalize.
    assert_forbidden(
        &s,
        ESCAPED.as_bytes(),
        &[(SIG, &sign(SECRET, RAW_UTF8.as_bytes()))],
    )
    .await;
}

#[tokio::test]
async fn binary_body_is_forwarded_byte_identical() {
    let s = gate().await;
    let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert_forwarded(&s, &body, &[(SIG, &sign(SECRET, &body))]).await;
}
