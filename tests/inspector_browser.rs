//! The inspector's page in a real headless Chromium (Debian's), against a real gate: requests
//! appear live with their verdicts, filters narrow the list, the detail shows the exact body,
//! a hostile payload stays inert, and a dead spool event is replayed from the page.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The rows' verdict cells, top to bottom.
const VERDICTS: &str = "[...document.querySelectorAll('#events tr.event td.verdict')].map(td => td.firstChild.textContent)";

fn rows(n: usize) -> String {
    format!("document.querySelectorAll('#events tr.event').length === {n}")
}

/// The list shows exactly these verdicts, top to bottom.
fn showing(verdicts: &[&str]) -> String {
    format!(
        "JSON.stringify({VERDICTS}) === {}",
        json!(json!(verdicts).to_string())
    )
}

/// Clicks the row of the request whose verdict cell reads `verdict` (the newest such).
fn click_row(verdict: &str) -> String {
    format!(
        "(() => {{ const td = [...document.querySelectorAll('#events tr.event td.verdict')].find(td => td.firstChild.textContent === {v}); td.parentElement.click(); return true; }})()",
        v = json!(verdict)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_appear_live_filter_and_show_their_exact_bytes_inert() {
    let Some(chromium) = chromium() else { return };
    let s = Scenario::new()
        .client_auth(ClientAuth::optional())
        .config(|c| c.with_inspector(None))
        .start()
        .await;
    let mut b = Browser::launch(&chromium);
    b.goto(&format!("http://{}/inspector/", s.gate.admin_addr()));
    assert_eq!(
        b.wait_for("document.getElementById('conn').textContent === 'connected' && document.getElementById('conn').textContent"),
        "connected"
    );

    // Sent while the page is open: signed, forged, without a certificate.
    let body = br#"{"object":"page","entry":[{"id":"1","messaging":[{"message":{"text":"caf\u00e9 \/ needle"}}]}]}"#;
    assert_eq!(s.post_signed(body).await.status(), 200);
    let forged = br#"{"object":"page","entry":[]}"#;
    let resp = s
        .post_with_headers(forged, &[(SIG, &sign("wrong", forged))])
        .await;
    assert_eq!(resp.status(), 403);
    let no_cert = post_signed(&s.client(None), &s.url("/webhook"), body)
        .await
        .unwrap();
    assert_eq!(no_cert.status(), 403);
    b.wait_for(&rows(3));
    assert_eq!(
        b.eval(VERDICTS),
        json!(["client_cert_required", "bad_signature", "forwarded"]),
        "live, newest first, without a reload"
    );
    assert_eq!(
        b.eval("document.querySelector('#events tr.event td.cn').textContent"),
        "no certificate"
    );

    // Filters narrow the list.
    b.eval("(() => { const f = document.getElementById('f-verdict'); f.value = 'bad_signature'; f.dispatchEvent(new Event('change')); return true; })()");
    b.wait_for(&showing(&["bad_signature"]));
    b.eval("(() => { const f = document.getElementById('f-verdict'); f.value = ''; f.dispatchEvent(new Event('change')); const q = document.getElementById('f-q'); q.value = 'needle'; q.dispatchEvent(new Event('input')); return true; })()");
    // Only the forwarded request's body holds the needle (the certificate-less one was
    // refused before its body was read).
    b.wait_for(&showing(&["forwarded"]));
    b.eval("(() => { const q = document.getElementById('f-q'); q.value = ''; q.dispatchEvent(new Event('input')); return true; })()");
    b.wait_for(&showing(&[
        "client_cert_required",
        "bad_signature",
        "forwarded",
    ]));

    // The detail: the body byte for byte (escapes as Meta sent them), the decision in words.
    b.eval(&click_row("forwarded"));
    let raw = b.wait_for("document.getElementById('d-body-raw') && document.getElementById('d-body-raw').textContent");
    assert_eq!(raw, std::str::from_utf8(body).unwrap());
    let explanation = b.eval("document.getElementById('d-explanation').textContent");
    assert!(explanation
        .as_str()
        .unwrap()
        .starts_with("Authenticated and forwarded"));
    assert!(b
        .eval("document.getElementById('d-body-json').textContent")
        .as_str()
        .unwrap()
        .contains("\"text\": \"café / needle\""));
    let curl = b.eval("document.getElementById('d-curl-text').textContent");
    assert!(
        curl.as_str()
            .unwrap()
            .contains("x-hub-signature-256: sha256="),
        "{curl}"
    );
    b.eval(&click_row("bad_signature"));
    b.wait_for("document.getElementById('d-explanation') && document.getElementById('d-explanation').textContent.startsWith('The signature was not computed with the route') && document.getElementById('d-explanation').textContent");

    // A hostile payload, signed (a backend bug or a leaked secret could make one): shown as
    // text, nothing of it runs or loads.
    let hostile = br#"{"x":"<script>window.__pwned=1</script>","y":"\"><img src=x onerror=\"window.__pwned=2\">","z":"<svg onload=window.__pwned=3>"}"#;
    assert_eq!(s.post_signed(hostile).await.status(), 200);
    b.wait_for(&rows(4));
    b.eval(&click_row("forwarded"));
    let shown = b.wait_for("document.getElementById('d-body-raw') && document.getElementById('d-body-raw').textContent.includes('__pwned') && document.getElementById('d-body-raw').textContent");
    assert_eq!(shown, std::str::from_utf8(hostile).unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.eval("typeof window.__pwned"),
        "undefined",
        "no payload script ran"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('img, svg, #detail script, #events script').length"),
        0
    );

    // The README's picture: the page as a user sees it, with the hostile request selected.
    let png = b.screenshot();
    assert!(png.starts_with(b"\x89PNG"));
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("inspector.png");
    std::fs::write(&shot, png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_spool_event_is_replayed_from_the_page_and_reaches_the_backend() {
    let Some(chromium) = chromium() else { return };
    let s = Scenario::new()
        .config(|c| c.with_inspector(Some("a-long-inspector-token")))
        .spool(|sp| sp.dead_letter_4xx = Some(true))
        .start()
        .await;
    s.upstream.set_status(400);
    let mut b = Browser::launch(&chromium);
    // Signing in through the page's own form.
    b.goto(&format!("http://{}/inspector/", s.gate.admin_addr()));
    b.eval("document.getElementById('token').value = 'a-long-inspector-token'; document.querySelector('form').submit(); true");
    b.wait_for("document.getElementById('conn') && document.getElementById('conn').textContent === 'connected'");

    let body = unique_body();
    assert_eq!(s.post_signed(&body).await.status(), 200);
    b.wait_for(&rows(1));
    // The backend refuses it (4xx): it is dead-lettered; the detail offers the replay.
    for _ in 0..100 {
        b.eval(&click_row("spooled"));
        let dead = b.eval(
            "new Promise(r => setTimeout(() => r(!!document.getElementById('d-replay')), 200))",
        );
        if dead == json!(true) {
            break;
        }
    }
    assert_eq!(
        b.eval("document.querySelector('#d-spool td.state').textContent"),
        "dead"
    );
    s.upstream.set_status(200);
    b.eval("document.getElementById('d-replay').click(); true");
    b.wait_for("document.getElementById('d-replay-result') && document.getElementById('d-replay-result').textContent === 'replayed: 1'");
    for _ in 0..250 {
        if s.upstream.delivered(&body) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.upstream.delivered(&body),
        1,
        "the replayed event reached the backend"
    );
    b.wait_for("document.querySelector('#d-spool td.state') && document.querySelector('#d-spool td.state').textContent === 'delivered'");
}
