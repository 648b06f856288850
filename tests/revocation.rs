//! Certificate revocation: CRLs made in the test (`[client_auth] crls`), checked for every
//! certificate of the chain, with the `hard` and `soft` policies for a CA without a list or a
//! list past its nextUpdate, and a reload that swaps the list.

mod common;

use std::time::{Duration, SystemTime};

use common::*;

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn fresh() -> SystemTime {
    SystemTime::now() + YEAR
}

fn stale() -> SystemTime {
    SystemTime::now() - YEAR
}

/// A gate (admin listener on) whose `root.crl` and `intermediate.crl` are made by `f` from its
/// own PKI, then loaded by a reload — the way an operator adds lists to a running gate.
async fn gate_with(
    f: impl FnOnce(&Pki) -> (Option<String>, Option<String>),
    policy: Option<&str>,
) -> Started {
    let s = Scenario::new().admin().start().await;
    let (root, intermediate) = f(&s.pki);
    let mut names = Vec::new();
    for (name, text) in [("root.crl", root), ("intermediate.crl", intermediate)] {
        if let Some(t) = text {
            s.pki.write(name, &t);
            names.push(name.to_owned());
        }
    }
    let policy = policy.map(str::to_owned);
    s.reload(move |c| {
        c.client_auth.crls = Some(names);
        c.client_auth.crl_policy = policy;
    });
    s
}

async fn admitted(s: &Started, cert: &ClientCert) -> bool {
    let before = s.upstream.requests().len();
    // A distinct body each time: a repeated one would be answered as a duplicate.
    match post_signed(&s.client(Some(cert)), &s.url("/webhook"), &unique_body()).await {
        Ok(r) => {
            assert_eq!(r.status(), 200);
            assert_eq!(s.upstream.requests().len(), before + 1);
            true
        }
        Err(_) => {
            assert_eq!(
                s.upstream.requests().len(),
                before,
                "nothing reached the backend"
            );
            false
        }
    }
}

fn failures(s: &Started, reason: &str) -> u64 {
    s.counter(&format!(
        "hubgate_tls_handshake_failures_total{{reason=\"{reason}\"}}"
    ))
}

async fn ready(s: &Started) -> (u16, String) {
    http_get(s.gate.admin_addr(), "/readyz").await.unwrap()
}

#[tokio::test]
async fn a_revoked_leaf_is_refused_and_the_others_admitted() {
    let victim = std::sync::Arc::new(std::sync::Mutex::new(None));
    let v = victim.clone();
    let s = gate_with(
        move |pki| {
            let cert = pki.meta_client();
            let serial = serial_of(cert.leaf());
            *v.lock().unwrap() = Some(cert);
            (
                Some(pki.crl(true, &[], fresh())),
                Some(pki.crl(false, &[serial], fresh())),
            )
        },
        None,
    )
    .await;
    let revoked = victim.lock().unwrap().clone().unwrap();
    assert!(!admitted(&s, &revoked).await);
    assert_eq!(failures(&s, "cert_revoked"), 1);
    assert!(
        admitted(&s, &s.pki.meta_client()).await,
        "another leaf of the same CA"
    );
    assert_eq!(ready(&s).await.0, 200);
}

#[tokio::test]
async fn a_revoked_intermediate_refuses_every_leaf_under_it() {
    let s = gate_with(
        |pki| {
            (
                Some(pki.crl(true, &[pki.intermediate_serial()], fresh())),
                Some(pki.crl(false, &[], fresh())),
            )
        },
        None,
    )
    .await;
    assert!(!admitted(&s, &s.cert).await);
    assert_eq!(failures(&s, "cert_revoked"), 1);
}

#[tokio::test]
async fn a_stale_list_refuses_under_hard_and_admits_under_soft() {
    let hard = gate_with(
        |pki| {
            (
                Some(pki.crl(true, &[], fresh())),
                Some(pki.crl(false, &[], stale())),
            )
        },
        Some("hard"),
    )
    .await;
    assert!(!admitted(&hard, &hard.cert).await);
    assert_eq!(failures(&hard, "crl_expired"), 1);
    let (status, text) = ready(&hard).await;
    assert_eq!(status, 503);
    assert!(text.contains("nextUpdate"), "{text}");
    assert!(
        hard.metrics().contains("kind=\"crl\""),
        "CRL expiry in /metrics"
    );
    let config = hard
        .changed_config(|c| {
            c.client_auth.crls = Some(vec!["root.crl".into(), "intermediate.crl".into()]);
        })
        .unwrap();
    let warnings = config.warnings(hubgate::unix_now());
    assert!(
        warnings.iter().any(|w| w.contains("past its nextUpdate")),
        "{warnings:?}"
    );

    let soft = gate_with(
        |pki| {
            (
                Some(pki.crl(true, &[], fresh())),
                Some(pki.crl(false, &[], stale())),
            )
        },
        Some("soft"),
    )
    .await;
    assert!(admitted(&soft, &soft.cert).await);
    assert_eq!(ready(&soft).await.0, 200);
}

#[tokio::test]
async fn a_ca_without_a_list_refuses_under_hard_and_admits_under_soft() {
    // Only the intermediate's list: the root's (which covers the intermediate) is missing.
    let hard = gate_with(|pki| (None, Some(pki.crl(false, &[], fresh()))), None).await;
    assert!(!admitted(&hard, &hard.cert).await);
    assert_eq!(failures(&hard, "revocation_unknown"), 1);
    let soft = gate_with(
        |pki| (None, Some(pki.crl(false, &[], fresh()))),
        Some("soft"),
    )
    .await;
    assert!(admitted(&soft, &soft.cert).await);
    // Soft still refuses what a list revokes.
    let victim = soft.pki.meta_client();
    let serial = serial_of(victim.leaf());
    soft.pki
        .write("intermediate.crl", &soft.pki.crl(false, &[serial], fresh()));
    // (The harness reloads from the configuration the gate started with: the lists again.)
    soft.reload(|c| {
        c.client_auth.crls = Some(vec!["intermediate.crl".into()]);
        c.client_auth.crl_policy = Some("soft".into());
    });
    assert!(!admitted(&soft, &victim).await);
}

#[tokio::test]
async fn a_reload_swaps_the_list() {
    let s = gate_with(
        |pki| {
            (
                Some(pki.crl(true, &[], fresh())),
                Some(pki.crl(false, &[], fresh())),
            )
        },
        None,
    )
    .await;
    let cert = s.pki.meta_client();
    assert!(admitted(&s, &cert).await);
    s.pki.write(
        "intermediate.crl",
        &s.pki.crl(false, &[serial_of(cert.leaf())], fresh()),
    );
    s.reload(|c| {
        c.client_auth.crls = Some(vec!["root.crl".into(), "intermediate.crl".into()]);
    });
    assert!(
        !admitted(&s, &cert).await,
        "the new list applies to new handshakes"
    );
}

#[test]
fn a_crl_that_is_not_one_is_a_config_error_naming_the_key() {
    let pki = Pki::new();
    pki.write(
        "bad.crl",
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    );
    let mut c = GateConfig::new("http://127.0.0.1:9/hook");
    c.client_auth.crls = Some(vec!["bad.crl".into()]);
    let e = c.load(&pki).err().expect("refused");
    assert_eq!(e.key, "client_auth.crls");
    let mut c = GateConfig::new("http://127.0.0.1:9/hook");
    c.client_auth.crl_policy = Some("soft".into());
    assert_eq!(
        c.load(&pki).err().expect("refused").key,
        "client_auth.crl_policy"
    );
}

#[tokio::test]
async fn lists_fetched_from_a_url_are_refreshed_and_kept_when_a_fetch_fails() {
    // The intermediate's list comes from an HTTP server; the root's from a file.
    let server = Upstream::start().await;
    let s = Scenario::new().admin().start().await;
    let victim = s.pki.meta_client();
    let revoking = s.pki.crl(false, &[serial_of(victim.leaf())], fresh());
    server.set_body(revoking.as_bytes());
    s.pki.write("root.crl", &s.pki.crl(true, &[], fresh()));
    let url = server.url("/intermediate.crl");
    s.reload(move |c| {
        c.client_auth.crls = Some(vec!["root.crl".into()]);
        c.client_auth.crl_urls = Some(vec![url]);
        c.client_auth.crl_refresh = Some("300ms".into());
    });
    // Fetched: the victim is refused, another leaf admitted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while admitted(&s, &victim).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetched list never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted(&s, &s.pki.meta_client()).await);
    // The server's list changes: the next refresh lifts the revocation.
    server.set_body(s.pki.crl(false, &[], fresh()).as_bytes());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !admitted(&s, &victim).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the refreshed list never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The server fails: counted, and the last list stays in force.
    server.set_status(500);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.counter("hubgate_crl_fetch_failures_total") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed fetch counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted(&s, &victim).await, "the last good list stays");
    assert_eq!(ready(&s).await.0, 200);
}

#[tokio::test]
async fn a_list_never_fetched_keeps_the_gate_unready_under_hard() {
    let (_socket, closed) = closed_port();
    let s = Scenario::new().admin().start().await;
    s.pki.write("root.crl", &s.pki.crl(true, &[], fresh()));
    let url = format!("http://{closed}/intermediate.crl");
    s.reload(move |c| {
        c.client_auth.crls = Some(vec!["root.crl".into()]);
        c.client_auth.crl_urls = Some(vec![url]);
        c.client_auth.crl_refresh = Some("200ms".into());
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.counter("hubgate_crl_fetch_failures_total") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "fetch failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, text) = ready(&s).await;
    assert_eq!(status, 503);
    assert!(text.contains("has not been fetched yet"), "{text}");
    assert!(
        !admitted(&s, &s.cert).await,
        "no list for the intermediate: refused"
    );
}
