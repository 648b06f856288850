//! Meta batches split per entry or per update (`split`), re-signed for the backend, and
//! de-duplicated per update (`dedupe = "item"`), on sync and spool routes: real gate, real TLS,
//! recording backend. The expected parts are written out here by hand, not computed with
//! hubgate's splitter.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const BACKEND_KEY: &str = "backend-key";

/// A Messenger item: a message with this mid (escaped unicode and a slash, so any re-encoding
/// shows).
fn message(mid: &str) -> String {
    format!(
        r#"{{"sender":{{"id":"5678"}},"recipient":{{"id":"1234"}},"timestamp":1458692752478,"message":{{"mid":"{mid}","text":"h\u00e9llo \/ {mid}"}}}}"#
    )
}

/// A Messenger batch of one entry (page 1234, this `time`) holding these items.
fn messenger_batch(time: u64, items: &[String]) -> Vec<u8> {
    format!(
        r#"{{"object":"page","entry":[{{"id":"1234","time":{time},"messaging":[{}]}}]}}"#,
        items.join(",")
    )
    .into_bytes()
}

/// The part the backend must get for `item` of a batch with this `time`: Meta's envelope, the
/// item's bytes as sent.
fn messenger_part(time: u64, item: &str) -> Vec<u8> {
    format!(r#"{{"object":"page","entry":[{{"id":"1234","time":{time},"messaging":[{item}]}}]}}"#)
        .into_bytes()
}

fn splitting<'a>(mode: &'a str, dedupe: &'a str) -> Scenario<'a> {
    Scenario::new().admin().route(move |r| {
        r.split(mode, dedupe);
        r.backend_secret = Some(Secret::inline(BACKEND_KEY));
    })
}

/// What the backend received, in order.
fn received(s: &Started) -> Vec<Recorded> {
    s.upstream.log().into_iter().map(|(r, _)| r).collect()
}

/// Every request is signed with the backend key over exactly its body, and labelled as part
/// `index` of `count` of the batch `original`.
fn assert_part(r: &Recorded, index: usize, count: usize, original: &[u8]) {
    assert_eq!(
        r.header(SIG).as_deref(),
        Some(sign(BACKEND_KEY, &r.body).as_str()),
        "re-signed with the backend key"
    );
    assert_eq!(r.header("x-hub-signature"), None);
    assert_eq!(r.header("x-hubgate-part"), Some(index.to_string()));
    assert_eq!(r.header("x-hubgate-parts"), Some(count.to_string()));
    assert_eq!(
        r.header("x-hubgate-batch-sha256"),
        Some(hex::encode(Sha256::digest(original)))
    );
}

#[tokio::test]
async fn sync_item_split_delivers_each_update_alone_resigned_and_byte_exact() {
    let s = splitting("item", "item").start().await;
    let items = [message("m_1"), message("m_2"), message("m_3")];
    let body = messenger_batch(100, &items);
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "EVENT_RECEIVED\n");
    let got = received(&s);
    assert_eq!(got.len(), 3);
    for (i, (r, item)) in got.iter().zip(&items).enumerate() {
        assert_eq!(r.body, messenger_part(100, item), "part {i}");
        assert_part(r, i + 1, 3, &body);
        assert_eq!(r.uri, "/hook");
    }
    assert_eq!(
        s.counter(r#"hubgate_batch_parts_total{route="/webhook",reason="delivered"}"#),
        3
    );
}

#[tokio::test]
async fn whatsapp_changes_and_statuses_are_parts_with_their_whole_value() {
    let s = splitting("item", "item").start().await;
    let change = |inner: &str| {
        format!(
            r#"{{"value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550783881","phone_number_id":"106540352242922"}},{inner}}},"field":"messages"}}"#
        )
    };
    let msg = change(
        r#""messages":[{"from":"16505551234","id":"wamid.AAA=","timestamp":"1749416383","text":{"body":"\u00e4\u00f6\u00e5"},"type":"text"}]"#,
    );
    let status = change(
        r#""statuses":[{"id":"wamid.BBB=","status":"read","timestamp":"1750263773","recipient_id":"16505551234"}]"#,
    );
    let body = format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102290129340398","changes":[{msg},{status}]}}]}}"#
    );
    assert_eq!(s.post_signed(body.as_bytes()).await.status(), 200);
    let got = received(&s);
    assert_eq!(got.len(), 2);
    for (i, item) in [&msg, &status].into_iter().enumerate() {
        let want = format!(
            r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102290129340398","changes":[{item}]}}]}}"#
        );
        assert_eq!(got[i].body, want.as_bytes());
        assert_part(&got[i], i + 1, 2, body.as_bytes());
    }
}

#[tokio::test]
async fn a_retry_batched_differently_delivers_only_its_new_updates() {
    let s = splitting("item", "item").start().await;
    let first = messenger_batch(100, &[message("m_1"), message("m_2")]);
    assert_eq!(s.post_signed(&first).await.status(), 200);
    // Meta retries m_2 in another batch: another time, another neighbour, another order.
    let retry = messenger_batch(200, &[message("m_3"), message("m_2")]);
    assert_eq!(s.post_signed(&retry).await.status(), 200);
    // The same body twice: nothing new at all.
    let again = s.post_signed(&retry).await;
    assert_eq!(again.status(), 200);
    let bodies: Vec<_> = received(&s).into_iter().map(|r| r.body).collect();
    assert_eq!(
        bodies,
        [
            messenger_part(100, &message("m_1")),
            messenger_part(100, &message("m_2")),
            messenger_part(200, &message("m_3")),
        ]
    );
    assert_eq!(
        s.counter(r#"hubgate_batch_parts_total{route="/webhook",reason="duplicate"}"#),
        1
    );
    assert_eq!(
        s.counter(r#"hubgate_requests_total{route="/webhook",verdict="duplicate",status="200"}"#),
        1
    );
}

#[tokio::test]
async fn a_refused_part_fails_the_batch_and_metas_retry_sends_only_the_rest() {
    let s = splitting("item", "item").start().await;
    // The backend refuses the second request it gets (m_2), once.
    s.upstream.respond(|n, _| if n == 1 { 500 } else { 200 });
    let body = messenger_batch(100, &[message("m_1"), message("m_2"), message("m_3")]);
    let resp = s.post_signed(&body).await;
    assert_eq!(
        resp.status(),
        500,
        "the backend's answer is relayed so that Meta retries"
    );
    assert_eq!(received(&s).len(), 2, "nothing after the refused part");
    assert_eq!(s.post_signed(&body).await.status(), 200);
    let bodies: Vec<_> = received(&s).into_iter().map(|r| r.body).collect();
    let part = |m: &str| messenger_part(100, &message(m));
    assert_eq!(bodies, [part("m_1"), part("m_2"), part("m_2"), part("m_3")]);
    assert_eq!(
        s.counter(r#"hubgate_batch_parts_total{route="/webhook",reason="failed"}"#),
        1
    );
}

#[tokio::test]
async fn body_dedupe_on_a_splitting_route_resends_every_part_of_a_failed_batch() {
    let s = splitting("item", "body").start().await;
    s.upstream.respond(|n, _| if n == 1 { 503 } else { 200 });
    let body = messenger_batch(100, &[message("m_1"), message("m_2")]);
    assert_eq!(s.post_signed(&body).await.status(), 503);
    assert_eq!(s.post_signed(&body).await.status(), 200);
    // Delivered in full: the same body again is a duplicate.
    assert_eq!(s.post_signed(&body).await.status(), 200);
    assert_eq!(
        received(&s).len(),
        4,
        "m_1, m_2 (refused), then m_1 and m_2 again"
    );
}

#[tokio::test]
async fn entry_split_delivers_each_entry_whole() {
    let s = splitting("entry", "body").start().await;
    let e1 = r#"{"id":"1","time":1,"changes":[{"field":"feed","value":{"item":"post","verb":"add"}},{"field":"feed","value":{"item":"like"}}]}"#;
    let e2 = r#"{"id":"2","time":1,"standby":[{"sender":{"id":"9"}}]}"#;
    let body = format!(r#"{{"object":"page","entry":[{e1}, {e2}]}}"#);
    assert_eq!(s.post_signed(body.as_bytes()).await.status(), 200);
    let got = received(&s);
    assert_eq!(got.len(), 2);
    for (i, e) in [e1, e2].into_iter().enumerate() {
        assert_eq!(
            got[i].body,
            format!(r#"{{"object":"page","entry":[{e}]}}"#).as_bytes()
        );
        assert_part(&got[i], i + 1, 2, body.as_bytes());
    }
}

#[tokio::test]
async fn a_body_that_is_not_a_batch_is_forwarded_whole_with_metas_signature() {
    let s = splitting("item", "item").start().await;
    for (body, reason) in [
        (&b"not json at all"[..], "not_json"),
        (br#"{"object":"page","entry":[]}"#, "empty_batch"),
        (br#"{"hello":"world"}"#, "no_entry_array"),
    ] {
        let before = received(&s).len();
        assert_eq!(s.post_signed(body).await.status(), 200);
        let got = received(&s);
        assert_eq!(got.len(), before + 1);
        let r = got.last().unwrap();
        assert_eq!(r.body, body);
        assert_eq!(
            r.header(SIG),
            Some(sign(SECRET, body)),
            "Meta's own signature"
        );
        assert_eq!(r.header("x-hubgate-part"), None);
        assert_eq!(
            s.counter(&format!(
                r#"hubgate_batches_unsplit_total{{route="/webhook",reason="{reason}"}}"#
            )),
            1
        );
    }
}

#[tokio::test]
async fn without_a_backend_secret_parts_are_signed_with_the_first_app_secret() {
    let s = Scenario::new()
        .route(|r| {
            r.split("item", "item");
            r.app_secrets = vec![Secret::inline("first"), Secret::inline(SECRET)];
        })
        .start()
        .await;
    let body = messenger_batch(7, &[message("m_1")]);
    // Meta signs with the second secret of a rotation; the backend still gets the first.
    assert_eq!(s.post_signed(&body).await.status(), 200);
    let got = received(&s);
    assert_eq!(got[0].header(SIG), Some(sign("first", &got[0].body)));
}

#[tokio::test]
async fn a_forged_batch_is_refused_before_anything_is_split() {
    let s = splitting("item", "item").start().await;
    let body = messenger_batch(1, &[message("m_1"), message("m_2")]);
    let resp = s
        .post_with_headers(&body, &[(SIG, &sign("wrong", &body))])
        .await;
    assert_eq!(resp.status(), 403);
    assert!(received(&s).is_empty());
}

#[tokio::test]
async fn a_thousand_update_batch_of_three_megabytes_is_delivered_part_by_part() {
    let s = splitting("item", "item")
        .server(|sv| sv.max_body_bytes = Some(4 << 20))
        .start()
        .await;
    let pad = "x".repeat(3000);
    let items: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"sender":{{"id":"5678"}},"recipient":{{"id":"1234"}},"message":{{"mid":"m_{i}","text":"{pad}"}}}}"#
            )
        })
        .collect();
    let body = messenger_batch(5, &items);
    assert!(body.len() > 3_000_000);
    let started = Instant::now();
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.status(), 200);
    let got = received(&s);
    assert_eq!(got.len(), 1000);
    for (i, r) in got.iter().enumerate().step_by(97) {
        assert_eq!(r.body, messenger_part(5, &items[i]));
        assert_part(r, i + 1, 1000, &body);
    }
    // Bounded, not timed: a generous ceiling that only a pathological slowdown would cross.
    assert!(started.elapsed() < Duration::from_secs(60));
}

// ---------------------------------------------------------------------------------------------
// Spool routes

fn spooled_splitting<'a>() -> Scenario<'a> {
    splitting("item", "item").spool(|_| {})
}

async fn wait_for(s: &Started, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.upstream.log().iter().filter(|(_, st)| *st == 200).count() < n {
        assert!(
            Instant::now() < deadline,
            "{} delivered, waiting for {n}",
            s.upstream.log().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn spool_parts_are_stored_together_and_delivered_on_their_own() {
    let s = spooled_splitting().start().await;
    // m_2's first attempt fails: only it is retried.
    s.upstream.respond(|_, r| {
        let first_m2 = String::from_utf8_lossy(&r.body).contains("m_2");
        if first_m2 {
            500
        } else {
            200
        }
    });
    let body = messenger_batch(100, &[message("m_1"), message("m_2"), message("m_3")]);
    assert_eq!(s.post_signed(&body).await.status(), 200);
    wait_for(&s, 2).await;
    s.upstream.respond(|_, _| 200);
    wait_for(&s, 3).await;
    let log = s.upstream.log();
    let delivered: BTreeSet<Vec<u8>> = log
        .iter()
        .filter(|(_, st)| *st == 200)
        .map(|(r, _)| r.body.to_vec())
        .collect();
    let want: BTreeSet<Vec<u8>> = ["m_1", "m_2", "m_3"]
        .iter()
        .map(|m| messenger_part(100, &message(m)))
        .collect();
    assert_eq!(delivered, want);
    let m1 = messenger_part(100, &message("m_1"));
    assert_eq!(
        log.iter().filter(|(r, _)| r.body == m1).count(),
        1,
        "m_1 once"
    );
    for (r, _) in &log {
        let index = ["m_1", "m_2", "m_3"]
            .iter()
            .position(|m| r.body == messenger_part(100, &message(m)))
            .unwrap();
        assert_part(r, index + 1, 3, &body);
    }
    assert_eq!(
        s.counter(r#"hubgate_batch_parts_total{route="/webhook",reason="stored"}"#),
        3
    );
}

#[tokio::test]
async fn spool_recognises_an_update_that_comes_back_in_another_batch() {
    let s = spooled_splitting().start().await;
    let first = messenger_batch(100, &[message("m_1"), message("m_2")]);
    assert_eq!(s.post_signed(&first).await.status(), 200);
    wait_for(&s, 2).await;
    let retry = messenger_batch(300, &[message("m_2"), message("m_4")]);
    assert_eq!(s.post_signed(&retry).await.status(), 200);
    wait_for(&s, 3).await;
    // Nothing more arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bodies: BTreeSet<Vec<u8>> = s
        .upstream
        .log()
        .into_iter()
        .map(|(r, _)| r.body.to_vec())
        .collect();
    assert_eq!(s.upstream.log().len(), 3);
    assert!(bodies.contains(&messenger_part(300, &message("m_4"))));
    assert!(!bodies.contains(&messenger_part(300, &message("m_2"))));
    assert_eq!(
        s.counter(r#"hubgate_batch_parts_total{route="/webhook",reason="duplicate"}"#),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// A real backend: pywa (PyPI), which checks Meta's signature itself and — like many
// frameworks — reads only the first update of a batch.

/// The Python with pywa installed (`.ci/run` makes one); `None` skips the test unless
/// `HUBGATE_REQUIRE_PYWA=1`.
fn pywa_python() -> Option<String> {
    match hubgate::config::process_env("HUBGATE_PYWA_PYTHON") {
        Some(p) if !p.is_empty() => Some(p),
        _ => {
            assert!(
                hubgate::config::process_env("HUBGATE_REQUIRE_PYWA").as_deref() != Some("1"),
                "HUBGATE_REQUIRE_PYWA=1 but HUBGATE_PYWA_PYTHON is not set"
            );
            eprintln!("skipped: set HUBGATE_PYWA_PYTHON to a Python with pywa (see .ci/run)");
            None
        }
    }
}

/// The backend process, killed when dropped.
struct Pywa {
    child: std::process::Child,
    port: u16,
}

impl Pywa {
    fn start(python: &str, app_secret: &str) -> Pywa {
        use std::io::BufRead;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/backends/pywa_backend.py"
        );
        let mut child = std::process::Command::new(python)
            .args([script, app_secret])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the pywa backend");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("pywa backend said {line:?}"))
            .parse()
            .unwrap();
        Pywa { child, port }
    }

    async fn seen(&self) -> serde_json::Value {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let (status, text) = http_get(addr, "/seen").await.unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Pywa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WhatsApp `changes[]` element as the Cloud API sends it to phone number 106540352242922.
fn wa_change(inner: &str) -> String {
    format!(
        r#"{{"value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550783881","phone_number_id":"106540352242922"}},"contacts":[{{"profile":{{"name":"Sheena Nelson"}},"wa_id":"16505551234","user_id":"US.13491208655302741918"}}],{inner}}},"field":"messages"}}"#
    )
}

fn wa_text(id: &str, text: &str) -> String {
    wa_change(&format!(
        r#""messages":[{{"from":"16505551234","id":"{id}","timestamp":"1749416383","text":{{"body":"{text}"}},"type":"text"}}]"#
    ))
}

fn wa_status(id: &str, status: &str) -> String {
    wa_change(&format!(
        r#""statuses":[{{"id":"{id}","status":"{status}","timestamp":"1750263773","recipient_id":"16505551234"}}]"#
    ))
}

fn wa_batch(changes: &[String]) -> Vec<u8> {
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102290129340398","changes":[{}]}}]}}"#,
        changes.join(",")
    )
    .into_bytes()
}

#[tokio::test]
async fn a_pywa_backend_checks_every_resigned_part_and_sees_each_update_exactly_once() {
    let Some(python) = pywa_python() else { return };
    let backend = Pywa::start(&python, BACKEND_KEY);
    let url = format!("http://127.0.0.1:{}/", backend.port);
    let s = splitting("item", "item").upstream_url(&url).start().await;
    let first = wa_batch(&[
        wa_text("wamid.A1=", r"h\u00e9llo"),
        wa_text("wamid.A2=", "second"),
        wa_status("wamid.S1=", "delivered"),
    ]);
    assert_eq!(s.post_signed(&first).await.status(), 200);
    // Meta's retry, batched differently: two updates it already sent, two new ones.
    let retry = wa_batch(&[
        wa_status("wamid.S1=", "read"),
        wa_text("wamid.A2=", "second"),
        wa_text("wamid.A3=", "third"),
        wa_status("wamid.S1=", "delivered"),
    ]);
    assert_eq!(s.post_signed(&retry).await.status(), 200);
    assert_eq!(s.post_signed(&retry).await.status(), 200);
    let seen = backend.seen().await;
    assert_eq!(seen["refused"], 0, "pywa accepted every signature: {seen}");
    assert_eq!(seen["requests"], 5, "{seen}");
    let ids = |kind: &str, field: &str| -> Vec<String> {
        seen[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids("messages", "id"),
        ["wamid.A1=", "wamid.A2=", "wamid.A3="]
    );
    // pywa decoded the escaped unicode of the bytes Meta signed.
    assert_eq!(ids("messages", "text")[0], "héllo");
    assert_eq!(ids("statuses", "status"), ["delivered", "read"]);
    // A part with a forged signature would be refused by pywa itself: the check is real.
    let forged = wa_batch(&[wa_text("wamid.F=", "forged")]);
    let resp = s
        .http()
        .post(&url)
        .header(SIG, sign("not-the-key", &forged))
        .body(forged)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
    assert_eq!(backend.seen().await["refused"], 1);
}

#[tokio::test]
async fn parts_count_against_the_memory_budget_like_the_body() {
    // 64 KiB of request bytes in memory at once: a 40 KiB body fits, it and its parts do not.
    let s = splitting("item", "item")
        .server(|sv| {
            sv.max_buffered_bytes = Some(64 * 1024);
            sv.max_body_bytes = Some(64 * 1024);
        })
        .start()
        .await;
    let pad = "y".repeat(400);
    let items: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"sender":{{"id":"1"}},"message":{{"mid":"m_{i}","text":"{pad}"}}}}"#))
        .collect();
    let body = messenger_batch(1, &items);
    assert!(body.len() > 40 * 1024 && body.len() < 48 * 1024);
    let resp = s.post_signed(&body).await;
    assert_eq!(resp.status(), 503, "Meta retries later");
    assert!(received(&s).is_empty());
    assert_eq!(
        s.counter(r#"hubgate_requests_total{route="/webhook",verdict="overloaded",status="503"}"#),
        1
    );
    // A smaller batch goes through.
    let small = messenger_batch(1, &items[..10]);
    assert_eq!(s.post_signed(&small).await.status(), 200);
    assert_eq!(received(&s).len(), 10);
}

#[tokio::test]
async fn a_malformed_update_is_delivered_as_its_own_part_and_the_others_as_theirs() {
    let s = splitting("item", "item").start().await;
    // The second update is not an object; the third entry holds Messenger's standby array.
    let good = message("m_1");
    let body = format!(
        r#"{{"object":"page","entry":[{{"id":"1234","time":9,"messaging":[{good},"oops",null]}},{{"id":"1234","time":9,"standby":[{{"sender":{{"id":"1"}}}}]}}]}}"#
    );
    assert_eq!(s.post_signed(body.as_bytes()).await.status(), 200);
    let bodies: Vec<String> = received(&s)
        .into_iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        [
            String::from_utf8(messenger_part(9, &good)).unwrap(),
            r#"{"object":"page","entry":[{"id":"1234","time":9,"messaging":["oops"]}]}"#.to_owned(),
            r#"{"object":"page","entry":[{"id":"1234","time":9,"messaging":[null]}]}"#.to_owned(),
            r#"{"object":"page","entry":[{"id":"1234","time":9,"standby":[{"sender":{"id":"1"}}]}]}"#.to_owned(),
        ]
    );
}
