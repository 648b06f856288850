//! Exact-path routing and methods: unknown paths 404, other methods 405, nothing forwarded.

mod common;

use common::*;

/// A correctly signed POST to `path` (offering only `proto`) answers `status` and forwards
/// nothing.
async fn assert_signed_post(proto: Proto, path: &str, status: u16) {
    let s = Scenario::new().start().await;
    let resp = post_signed(&s.http_proto(proto), &s.url(path), &sample_body())
        .await
        .unwrap();
    assert_eq!(resp.status(), status, "POST {path}");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn unknown_path_is_404() {
    assert_signed_post(Proto::H1, "/not-a-webhook", 404).await;
}

#[tokio::test]
async fn unknown_path_is_404_over_http2() {
    assert_signed_post(Proto::H2, "/not-a-webhook", 404).await;
}

#[tokio::test]
async fn root_path_is_404() {
    assert_signed_post(Proto::H1, "/", 404).await;
}

#[tokio::test]
async fn trailing_slash_is_a_different_path() {
    assert_signed_post(Proto::H1, "/webhook/", 404).await;
}

#[tokio::test]
async fn path_match_is_case_sensitive() {
    assert_signed_post(Proto::H1, "/Webhook", 404).await;
}

#[tokio::test]
async fn sub_path_is_404() {
    assert_signed_post(Proto::H1, "/webhook/extra", 404).await;
}

#[tokio::test]
async fn challenge_on_unknown_path_is_404() {
    let s = Scenario::new().start().await;
    let resp = s
        .http()
        .get(
            s.gate
                .url("/other?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=mytoken"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_ne!(resp.text().await.unwrap(), "1158201444");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn put_is_405_with_allow_header() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let resp = s
        .http()
        .put(s.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, POST");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn delete_is_405() {
    let s = Scenario::new().start().await;
    let http = s.http_proto(Proto::H2);
    let resp = http.delete(s.url("/webhook")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn patch_is_405() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let resp = s
        .http()
        .patch(s.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn options_is_405() {
    let s = Scenario::new().start().await;
    let resp = s
        .http()
        .request(http::Method::OPTIONS, s.url("/webhook"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn rejection_bodies_are_plain_text_reason_phrases() {
    let s = Scenario::new().start().await;
    let resp = post_signed(&s.http(), &s.url("/nope"), b"{}")
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(resp.text().await.unwrap(), "Not Found\n");
    s.upstream.assert_nothing_received();
}
