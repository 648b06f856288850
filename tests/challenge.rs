//! Meta's verification request, `GET ?hub.mode=subscribe&hub.challenge=C&hub.verify_token=T`,
//! answered by the gate itself: nothing is ever forwarded.

mod common;

use common::*;

/// The default scenario.
async fn gate() -> Started {
    Scenario::new().start().await
}

async fn get(s: &Started, path_and_query: &str) -> reqwest::Response {
    s.http()
        .get(s.url(path_and_query))
        .send()
        .await
        .expect("request")
}

/// 200, `text/plain`, the body is exactly `echo`, nothing forwarded.
async fn assert_echo(s: &Started, path_and_query: &str, echo: &str) {
    let resp = get(s, path_and_query).await;
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .expect("content-type")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ct.starts_with("text/plain"), "content-type {ct}");
    assert_eq!(resp.bytes().await.unwrap(), echo.as_bytes());
    s.upstream.assert_nothing_received();
}

/// The status, the body does not carry the challenge, nothing forwarded.
async fn assert_refused(s: &Started, path_and_query: &str, status: u16, challenge: &str) {
    let resp = get(s, path_and_query).await;
    assert_eq!(resp.status(), status);
    let body = resp.text().await.unwrap();
    assert_ne!(body.trim(), challenge, "the challenge must not be echoed");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn numeric_challenge_is_echoed() {
    assert_echo(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=mytoken",
        "1158201444",
    )
    .await;
}

#[tokio::test]
async fn non_numeric_challenge_is_echoed() {
    assert_echo(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=abc&hub.verify_token=mytoken",
        "abc",
    )
    .await;
}

#[tokio::test]
async fn percent_encoded_challenge_is_decoded_and_echoed() {
    assert_echo(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=a%2Fb%3Dc%26d%20%C3%A4&hub.verify_token=mytoken",
        "a/b=c&d ä",
    )
    .await;
}

#[tokio::test]
async fn challenge_with_leading_zeros_is_echoed_verbatim() {
    assert_echo(
        &gate().await,
        "/webhook?hub.verify_token=mytoken&hub.challenge=000123&hub.mode=subscribe",
        "000123",
    )
    .await;
}

#[tokio::test]
async fn challenge_answer_is_text_plain_and_nosniff() {
    let s = gate().await;
    let resp = get(
        &s,
        "/webhook?hub.mode=subscribe&hub.challenge=42&hub.verify_token=mytoken",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/plain; charset=utf-8"
    );
    assert_eq!(
        resp.headers()["x-content-type-options"].to_str().unwrap(),
        "nosniff"
    );
    assert_eq!(resp.text().await.unwrap(), "42");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn challenge_is_answered_over_http2() {
    let s = gate().await;
    let resp = s
        .http_proto(Proto::H2)
        .get(s.url(&challenge_path("777")))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "777");
    s.upstream.assert_nothing_received();
}

#[tokio::test]
async fn wrong_token_is_403() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=wrong",
        403,
        "1158201444",
    )
    .await;
}

#[tokio::test]
async fn token_prefix_is_403() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=mytoke",
        403,
        "1158201444",
    )
    .await;
}

#[tokio::test]
async fn missing_mode_is_400() {
    assert_refused(
        &gate().await,
        "/webhook?hub.challenge=1158201444&hub.verify_token=mytoken",
        400,
        "1158201444",
    )
    .await;
}

#[tokio::test]
async fn mode_other_than_subscribe_is_400() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=unsubscribe&hub.challenge=1158201444&hub.verify_token=mytoken",
        400,
        "1158201444",
    )
    .await;
}

#[tokio::test]
async fn missing_challenge_is_400() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.verify_token=mytoken",
        400,
        "",
    )
    .await;
}

#[tokio::test]
async fn empty_challenge_is_400() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=&hub.verify_token=mytoken",
        400,
        "",
    )
    .await;
}

#[tokio::test]
async fn missing_token_is_400() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=1158201444",
        400,
        "1158201444",
    )
    .await;
}

#[tokio::test]
async fn no_query_is_400() {
    assert_refused(&gate().await, "/webhook", 400, "").await;
}

#[tokio::test]
async fn duplicated_parameter_is_400() {
    assert_refused(
        &gate().await,
        "/webhook?hub.mode=subscribe&hub.challenge=1&hub.challenge=2&hub.verify_token=mytoken",
        400,
        "1",
    )
    .await;
}

#[tokio::test]
async fn overlong_challenge_is_400() {
    let long = "1".repeat(2048);
    assert_refused(
        &gate().await,
        &format!("/webhook?hub.mode=subscribe&hub.challenge={long}&hub.verify_token=mytoken"),
        400,
        &long,
    )
    .await;
}

#[tokio::test]
async fn verify_token_from_file_is_used() {
    let s = Scenario::new()
        .file("verify-token.txt", "file token\n")
        .route(|r| r.verify_token = Secret::file("verify-token.txt"))
        .start()
        .await;
    assert_echo(
        &s,
        "/webhook?hub.mode=subscribe&hub.challenge=99&hub.verify_token=file+token",
        "99",
    )
    .await;
}
