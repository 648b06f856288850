//! Exact-path routing and methods: unknown paths 404, other methods 405, nothing forwarded.

mod common;

use common::*;

struct Setup {
    _pki: Pki,
    up: Upstream,
    gate: Gate,
    http: reqwest::Client,
}

async fn setup(proto: Proto) -> Setup {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki.start(&GateConfig::new(&up.url("/hook"))).await;
    let http = client_proto(&pki, Some(&pki.meta_client()), proto);
    Setup {
        _pki: pki,
        up,
        gate,
        http,
    }
}

impl Setup {
    /// A correctly signed POST to `path` answers `status` and forwards nothing.
    async fn assert_signed_post(&self, path: &str, status: u16) {
        let resp = post_signed(&self.http, &self.gate.url(path), &sample_body())
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "POST {path}");
        self.up.assert_nothing_received();
    }
}

#[tokio::test]
async fn unknown_path_is_404() {
    setup(Proto::H1)
        .await
        .assert_signed_post("/not-a-webhook", 404)
        .await;
}

#[tokio::test]
async fn unknown_path_is_404_over_http2() {
    setup(Proto::H2)
        .await
        .assert_signed_post("/not-a-webhook", 404)
        .await;
}

#[tokio::test]
async fn root_path_is_404() {
    setup(Proto::H1).await.assert_signed_post("/", 404).await;
}

#[tokio::test]
async fn trailing_slash_is_a_different_path() {
    setup(Proto::H1)
        .await
        .assert_signed_post("/webhook/", 404)
        .await;
}

#[tokio::test]
async fn path_match_is_case_sensitive() {
    setup(Proto::H1)
        .await
        .assert_signed_post("/Webhook", 404)
        .await;
}

#[tokio::test]
async fn sub_path_is_404() {
    setup(Proto::H1)
        .await
        .assert_signed_post("/webhook/extra", 404)
        .await;
}

#[tokio::test]
async fn challenge_on_unknown_path_is_404() {
    let s = setup(Proto::H1).await;
    let resp = s
        .http
        .get(
            s.gate
                .url("/other?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=mytoken"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_ne!(resp.text().await.unwrap(), "1158201444");
    s.up.assert_nothing_received();
}

#[tokio::test]
async fn put_is_405_with_allow_header() {
    let s = setup(Proto::H1).await;
    let body = sample_body();
    let resp = s
        .http
        .put(s.gate.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, POST");
    s.up.assert_nothing_received();
}

#[tokio::test]
async fn delete_is_405() {
    let s = setup(Proto::H2).await;
    let resp = s.http.delete(s.gate.url("/webhook")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    s.up.assert_nothing_received();
}

#[tokio::test]
async fn patch_is_405() {
    let s = setup(Proto::H1).await;
    let body = sample_body();
    let resp = s
        .http
        .patch(s.gate.url("/webhook"))
        .header(SIG, sign(SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    s.up.assert_nothing_received();
}

#[tokio::test]
async fn options_is_405() {
    let s = setup(Proto::H1).await;
    let resp = s
        .http
        .request(http::Method::OPTIONS, s.gate.url("/webhook"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    s.up.assert_nothing_received();
}

#[tokio::test]
async fn rejection_bodies_are_plain_text_reason_phrases() {
    let s = setup(Proto::H1).await;
    let resp = post_signed(&s.http, &s.gate.url("/nope"), b"{}")
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(resp.text().await.unwrap(), "Not Found\n");
    s.up.assert_nothing_received();
}
