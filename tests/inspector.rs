//! The live event inspector's JSON API and page on the admin listener: a real gate over real
//! TLS, requests signed, forged and without a certificate, read back through the API.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn inspecting<'a>(token: Option<&'a str>) -> Scenario<'a> {
    Scenario::new()
        .client_auth(ClientAuth::optional())
        .config(move |c| c.with_inspector(token))
        .route(|r| r.app_secrets = vec![Secret::inline(SECRET), Secret::inline("older-secret")])
}

fn admin_url(s: &Started, path: &str) -> String {
    format!("http://{}{path}", s.gate.admin_addr())
}

async fn api(s: &Started, path: &str) -> Value {
    let resp = s.http().get(admin_url(s, path)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    serde_json::from_str(&resp.text().await.unwrap()).unwrap()
}

async fn events(s: &Started, query: &str) -> Vec<Value> {
    api(s, &format!("/api/events?{query}")).await["events"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits (bounded) until the inspector holds `n` requests: a request is recorded once its
/// answer is on its way, which the client may see first.
async fn wait_for(s: &Started, n: usize) -> Vec<Value> {
    for _ in 0..250 {
        let list = events(s, "").await;
        if list.len() >= n {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the inspector did not get {n} requests");
}

#[tokio::test]
async fn signed_forged_certificateless_and_challenge_requests_are_recorded_with_their_verdicts() {
    let s = inspecting(None).start().await;
    let body = br#"{"object":"page","entry":[{"id":"1","messaging":[{"message":{"text":"caf\u00e9 \/"}}]}]}"#;
    assert_eq!(s.post_signed(body).await.status(), 200);
    let forged = s
        .post_with_headers(body, &[(SIG, &sign("wrong", body))])
        .await;
    assert_eq!(forged.status(), 403);
    let anonymous = s.client(None);
    let no_cert = post_signed(&anonymous, &s.url("/webhook"), body)
        .await
        .unwrap();
    assert_eq!(no_cert.status(), 403);
    let challenge = s
        .http()
        .get(s.url(&challenge_path("ch4llenge")))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 200);

    let list = wait_for(&s, 4).await;
    let verdicts: Vec<&str> = list
        .iter()
        .map(|e| e["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        verdicts,
        [
            "challenge_ok",
            "client_cert_required",
            "bad_signature",
            "forwarded"
        ],
        "newest first"
    );
    let forwarded = &list[3];
    assert_eq!(forwarded["status"], 200);
    assert_eq!(forwarded["backend_status"], 200);
    assert_eq!(forwarded["cn"], META_CN);
    assert_eq!(forwarded["signature"]["secret_index"], 0);
    assert_eq!(forwarded["body_size"], body.len());
    assert_eq!(list[1]["cn"], Value::Null, "no certificate");

    // The detail: headers, the exact body, the decision in words.
    let detail = api(&s, &format!("/api/events/{}", forwarded["id"])).await;
    assert_eq!(detail["body_text"], std::str::from_utf8(body).unwrap());
    let raw = decode_base64(detail["body_base64"].as_str().unwrap());
    assert_eq!(raw, body);
    let sig = detail["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == SIG)
        .expect("the signature header is shown");
    assert_eq!(sig[1], sign(SECRET, body));
    let bad = api(&s, &format!("/api/events/{}", list[2]["id"])).await;
    assert_eq!(bad["reason"], "mismatch");
    assert_eq!(
        bad["explanation"],
        "The signature was computed with none of the route's 2 secrets (a wrong app secret, or a changed body)."
    );
    assert_eq!(bad["signature"], Value::Null);
    let anon = api(&s, &format!("/api/events/{}", list[1]["id"])).await;
    assert!(anon["explanation"]
        .as_str()
        .unwrap()
        .contains("presented none"));

    // The verification request: neither its verify token nor its challenge is kept.
    let ch = api(&s, &format!("/api/events/{}", list[0]["id"])).await;
    assert_eq!(ch["path"], "/webhook");
    let everything = serde_json::to_string(&ch).unwrap() + &serde_json::to_string(&list).unwrap();
    assert!(
        !everything.contains(TOKEN),
        "the verify token is never stored"
    );
    assert!(!everything.contains("ch4llenge"));
}

#[tokio::test]
async fn the_record_keeps_the_authority_the_client_addressed_over_http1_and_http2() {
    let s = inspecting(None).start().await;
    for proto in [Proto::H1, Proto::H2] {
        let resp = s
            .http_proto(proto)
            .get(s.url(&challenge_path("auth")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let list = wait_for(&s, 2).await;
    for e in &list {
        // HTTP/1.1 carries it in Host, HTTP/2 in :authority (no Host header at all): "Copy as
        // curl" needs it either way.
        assert_eq!(e["authority"], s.gate.authority(), "{e}");
    }
    let h2 = api(&s, &format!("/api/events/{}", list[0]["id"])).await;
    let has_host = h2["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "host");
    assert!(!has_host, "the HTTP/2 request had no Host header: {h2}");
}

#[tokio::test]
async fn filters_narrow_the_list() {
    let s = inspecting(None).start().await;
    assert_eq!(
        s.post_signed(br#"{"needle":"haystack"}"#).await.status(),
        200
    );
    let forged = br#"{"other":1}"#;
    s.post_with_headers(forged, &[(SIG, &sign("wrong", forged))])
        .await;
    wait_for(&s, 2).await;
    assert_eq!(events(&s, "verdict=bad_signature").await.len(), 1);
    assert_eq!(events(&s, "status=200").await[0]["verdict"], "forwarded");
    assert_eq!(
        events(&s, "q=HAYSTACK").await.len(),
        1,
        "search looks into bodies"
    );
    assert_eq!(events(&s, "q=mismatch").await.len(), 1);
    assert_eq!(events(&s, "route=/webhook").await.len(), 2);
    assert!(events(&s, "route=/nope").await.is_empty());
    assert_eq!(events(&s, "limit=1").await.len(), 1);
    let resp = s
        .http()
        .get(admin_url(&s, "/api/events?status=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn the_ring_keeps_only_the_newest_requests() {
    let s = Scenario::new()
        .config(|c| {
            c.with_inspector(None);
            c.admin.as_mut().unwrap().inspector_capacity = Some(3);
        })
        .start()
        .await;
    for _ in 0..5 {
        assert_eq!(s.post_signed(&unique_body()).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let list = events(&s, "").await;
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["id"], 5);
    let gone = s
        .http()
        .get(admin_url(&s, "/api/events/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn the_stream_sends_each_request_as_it_completes() {
    let s = inspecting(None).start().await;
    let mut stream = s
        .http()
        .get(admin_url(&s, "/api/events/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b": connected"));
    let forged = br#"{"x":1}"#;
    s.post_with_headers(forged, &[(SIG, &sign("wrong", forged))])
        .await;
    let mut got = String::new();
    while !got.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        got.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(got.starts_with("event: request\n"), "{got}");
    let data = got.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["verdict"], "bad_signature");
    assert_eq!(e["status"], 403);
}

#[tokio::test]
async fn a_token_guards_the_page_and_the_api() {
    let token = "a-long-inspector-token";
    let s = inspecting(Some(token)).start().await;
    let http = s.http();
    let get = |path: &str| http.get(admin_url(&s, path));
    assert_eq!(get("/api/events").send().await.unwrap().status(), 401);
    assert_eq!(
        get("/api/events")
            .header("authorization", "Bearer a-long-inspector-tokeN")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("/api/events")
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The page asks for the token; the form sets a session cookie that is not the token.
    let page = get("/inspector/")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("action=\"/inspector/login\""), "{page}");
    let wrong = http
        .post(admin_url(&s, "/inspector/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let no_redirects = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_client_config(&s.pki, None, Proto::H1, false))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let ok = no_redirects
        .post(admin_url(&s, "/inspector/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 303);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(!cookie.contains(token));
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = get("/inspector/")
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"));
    assert!(page.text().await.unwrap().contains("/inspector/app.js"));
    // A POST another site makes the browser send is refused, even with the session.
    let cross = http
        .post(admin_url(&s, "/api/events/1/replay"))
        .header("cookie", &session)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    // The rest of the admin listener stays open for probes.
    assert_eq!(get("/healthz").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn without_the_inspector_its_paths_do_not_exist() {
    let s = Scenario::new().admin().start().await;
    let resp = s
        .http()
        .get(admin_url(&s, "/api/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = s
        .http()
        .get(admin_url(&s, "/inspector/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_dead_spool_event_is_replayed_through_the_api() {
    let s = Scenario::new()
        .config(|c| c.with_inspector(None))
        .spool(|sp| sp.dead_letter_4xx = Some(true))
        .start()
        .await;
    s.upstream.set_status(400);
    let body = unique_body();
    assert_eq!(s.post_signed(&body).await.status(), 200);
    let list = wait_for(&s, 1).await;
    let id = list[0]["id"].as_u64().unwrap();
    assert_eq!(list[0]["verdict"], "spooled");
    let mut state = String::new();
    for _ in 0..250 {
        let d = api(&s, &format!("/api/events/{id}")).await;
        state = d["spool"][0]["state"].as_str().unwrap().to_owned();
        if state == "dead" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "dead");
    s.upstream.set_status(200);
    let replay = s
        .http()
        .post(admin_url(&s, &format!("/api/events/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    let replayed: Value = serde_json::from_str(&replay.text().await.unwrap()).unwrap();
    assert_eq!(replayed["replayed"], 1);
    for _ in 0..250 {
        if s.upstream.delivered(&body) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.upstream.delivered(&body), 1);
    let d = api(&s, &format!("/api/events/{id}")).await;
    assert_eq!(d["spool"][0]["state"], "delivered");
    // Replaying what is not dead is refused.
    let again = s
        .http()
        .post(admin_url(&s, &format!("/api/events/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
}
