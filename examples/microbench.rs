//! Micro-benchmark of hubgate's per-request gate work, with std::time only (no criterion):
//! `Signer::verify` over 1 KiB and 64 KiB bodies (a matching and a mismatching signature),
//! `challenge::answer`, cutting a Meta batch of 1,000 updates into parts (`batch::split`, and
//! with each part re-signed as a splitting route does), and, for comparison, raw SHA-256 (sha2, and aws-lc through rustls' hash
//! provider) and a bare keyed HMAC-SHA256 over the same bytes.
//!
//! cargo run --release --example microbench            # a table
//! cargo run --release --example microbench -- --json  # one JSON line per measurement

use std::hint::black_box;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use hubgate::config::Secret;
use hubgate::gate::batch::{self, SplitMode};
use hubgate::gate::challenge;
use hubgate::gate::signature::{Signer, SHA256_HEADER};
use sha2::{Digest, Sha256};

/// Runs `f` in growing batches until `budget` has passed; returns ns per call (best of 3 rounds).
fn time<F: FnMut()>(budget: Duration, mut f: F) -> f64 {
    // Warm-up and calibration: find a batch that takes ~10 ms.
    let mut batch = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        if t.elapsed() >= Duration::from_millis(10) || batch >= 1 << 30 {
            break;
        }
        batch *= 2;
    }
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < budget / 3 {
            for _ in 0..batch {
                f();
            }
            n += batch;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let budget = Duration::from_millis(
        hubgate::config::process_env("MICROBENCH_MS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(900),
    );
    let secret = Secret::new("bench-app-secret");
    let signer = Signer::new(std::slice::from_ref(&secret), false);
    let mut rows: Vec<(String, String, f64, Option<usize>)> = Vec::new();

    for size in [1024usize, 64 * 1024] {
        let body: Vec<u8> = (0..size)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz{}:,\""[i % 31])
            .collect();
        let label = if size == 1024 {
            "1 KiB body"
        } else {
            "64 KiB body"
        };
        let mut good = HeaderMap::new();
        good.insert(
            SHA256_HEADER,
            HeaderValue::from_str(&signer.sign(&body)).unwrap(),
        );
        let mut bad = HeaderMap::new();
        bad.insert(
            SHA256_HEADER,
            HeaderValue::from_str(&format!("sha256={}", "0".repeat(64))).unwrap(),
        );
        assert!(signer.verify(&good, &body).is_ok());
        assert!(signer.verify(&bad, &body).is_err());

        let ns = time(budget, || {
            black_box(signer.verify(black_box(&good), black_box(&body))).ok();
        });
        rows.push((
            "Signer::verify (valid)".into(),
            label.into(),
            ns,
            Some(size),
        ));
        let ns = time(budget, || {
            black_box(signer.verify(black_box(&bad), black_box(&body))).ok();
        });
        rows.push((
            "Signer::verify (mismatch)".into(),
            label.into(),
            ns,
            Some(size),
        ));
        let keyed = Hmac::<Sha256>::new_from_slice(secret.expose()).unwrap();
        let ns = time(budget, || {
            let mut m = keyed.clone();
            m.update(black_box(&body));
            black_box(m.finalize().into_bytes());
        });
        rows.push((
            "HMAC-SHA256, pre-keyed (hmac+sha2)".into(),
            label.into(),
            ns,
            Some(size),
        ));
        let ns = time(budget, || {
            black_box(Sha256::digest(black_box(&body)));
        });
        rows.push(("SHA-256 raw (sha2)".into(), label.into(), ns, Some(size)));
        // aws-lc's SHA-256 (what rustls and the TLS layer use), through rustls' hash provider.
        let awslc = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .expect("a TLS 1.3 suite")
            .common
            .hash_provider;
        assert_eq!(awslc.hash(&body).as_ref(), Sha256::digest(&body).as_slice());
        let ns = time(budget, || {
            black_box(awslc.hash(black_box(&body)));
        });
        rows.push((
            "SHA-256 raw (aws-lc, via rustls)".into(),
            label.into(),
            ns,
            Some(size),
        ));
    }

    let token = Secret::new("bench-verify-token");
    for (label, q) in [
        (
            "Meta's query",
            "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=bench-verify-token",
        ),
        (
            "wrong token",
            "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=nope",
        ),
        (
            "percent-encoded",
            "hub.mode=subscribe&hub.challenge=abc%2F%3Cx%3E%20y&hub.verify_token=bench%2Dverify%2Dtoken",
        ),
    ] {
        let expect_ok = label != "wrong token";
        assert_eq!(challenge::answer(Some(q), &token).is_ok(), expect_ok);
        let ns = time(budget, || {
            black_box(challenge::answer(black_box(Some(q)), black_box(&token))).ok();
        });
        rows.push(("challenge::answer".into(), label.into(), ns, None));
    }

    // A Messenger batch of 1,000 messages (~0.2 KiB each, escaped unicode in every text): the
    // largest batch Meta documents. Per-item figures are the batch's time over 1,000.
    let items: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"sender":{{"id":"6{i:015}"}},"recipient":{{"id":"1234"}},"timestamp":1458692752478,"message":{{"mid":"m_{i:020}","text":"caf\u00e9 \/ message number {i}"}}}}"#
            )
        })
        .collect();
    let body = format!(
        r#"{{"object":"page","entry":[{{"id":"1234","time":1458692752478,"messaging":[{}]}}]}}"#,
        items.join(",")
    )
    .into_bytes();
    let input = format!("1,000 Messenger items, {} KiB", body.len() / 1024);
    assert_eq!(batch::split(&body, SplitMode::Item).unwrap().len(), 1000);
    for (op, resign) in [
        ("batch::split (item), per item", false),
        ("batch::split (item) + re-sign each part, per item", true),
    ] {
        let ns = time(budget, || {
            let parts = batch::split(black_box(&body), SplitMode::Item).unwrap();
            if resign {
                for p in &parts {
                    black_box(signer.sign(&p.body));
                }
            }
            black_box(parts);
        });
        rows.push((
            op.into(),
            input.clone(),
            ns / 1000.0,
            Some(body.len() / 1000),
        ));
    }

    if json {
        for (op, input, ns, bytes) in &rows {
            let mbs = bytes.map(|b| b as f64 / ns * 1000.0);
            println!(
                "{{\"kind\":\"micro\",\"op\":\"{op}\",\"input\":\"{input}\",\"ns_per_op\":{:.1},\"mb_per_s\":{}}}",
                ns,
                mbs.map(|m| format!("{m:.1}")).unwrap_or_else(|| "null".into())
            );
        }
    } else {
        println!("| operation | input | ns/op | MB/s |\n|---|---|---|---|");
        for (op, input, ns, bytes) in &rows {
            let mbs = bytes
                .map(|b| format!("{:.0}", b as f64 / ns * 1000.0))
                .unwrap_or_else(|| "–".into());
            println!("| {op} | {input} | {ns:.0} | {mbs} |");
        }
    }
}
