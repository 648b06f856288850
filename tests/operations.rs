//! Operating hubgate: the admin listener and its metrics, configuration reloads (library and
//! SIGHUP), graceful shutdown of the binary, the environment-only sidecar, trusted proxies and
//! their identity headers, the PROXY protocol, and the idle timeout.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file
// ---------------------------------------------------------------------------------------------

fn running(gate: &Gate) -> &hubgate::Running {
    gate.running.as_ref().expect("gate is running")
}

/// The gate's metrics as the admin endpoint would encode them.
fn metrics_text(gate: &Gate) -> String {
    running(gate).metrics().encode(hubgate::unix_now())
}

/// Waits (bounded) until `text()` contains `needle`; panics with the last text otherwise.
async fn eventually_contains<F, Fut>(mut text: F, needle: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let t = text().await;
        if t.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {needle:?} in:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (bounded) until the upstream has received `n` requests.
async fn wait_for_requests(up: &Upstream, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while up.requests().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream received {} of {n} requests",
            up.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A challenge URL with the right token.
fn challenge_path(challenge: &str) -> String {
    format!("/webhook?hub.mode=subscribe&hub.challenge={challenge}&hub.verify_token={TOKEN}")
}

/// A sample event made unique by a per-process counter, so that no two posts in a test carry
/// the same bytes (a gate may recognise a repeated delivery).
fn unique_body() -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(r#"{{"object":"page","entry":[{{"id":"{n}","time":1,"messaging":[]}}]}}"#).into_bytes()
}

/// A fresh client per call: connections from before a reload must not be reused.
async fn post_fresh(pki: &Pki, id: Option<&ClientCert>, gate: &Gate) -> reqwest::Result<u16> {
    let http = client(pki, id);
    post_signed(&http, &gate.url("/webhook"), &unique_body())
        .await
        .map(|r| r.status().as_u16())
}

const NEW_SERIAL: [u8; 8] = [0x4a, 0x75, 0x62, 0x67, 0x61, 0x74, 0x65, 0x02];

// ---------------------------------------------------------------------------------------------
// Admin listener and metrics
// ---------------------------------------------------------------------------------------------

fn with_admin(cfg: &GateConfig) -> String {
    format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n", cfg.to_toml())
}

#[tokio::test]
async fn metrics_count_forwarded_forged_challenge_and_refused_handshake() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&with_admin(&GateConfig::new(&up.url("/hook"))))
        .await;
    let admin = running(&gate).admin_addr().expect("admin address");
    let http = client(&pki, Some(&pki.meta_client()));

    let ok = post_signed(&http, &gate.url("/webhook"), &sample_body())
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let forged = http
        .post(gate.url("/webhook"))
        .header(SIG, sign(SECRET, b"another body"))
        .body(sample_body())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let challenge = http
        .get(gate.url(&challenge_path("1158201444")))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 200);
    let wrong_cn = client(&pki, Some(&pki.client(&LeafSpec::cn("evil.example.com"))));
    assert!(
        post_signed(&wrong_cn, &gate.url("/webhook"), &sample_body())
            .await
            .is_err()
    );

    // The handshake failure is counted once the server side has seen it.
    let scrape = || async { http_get(admin, "/metrics").await.unwrap().1 };
    eventually_contains(
        scrape,
        "hubgate_tls_handshake_failures_total{reason=\"cn_not_allowed\"} 1\n",
    )
    .await;
    let (status, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "hubgate_requests_total{route=\"/webhook\",verdict=\"forwarded\",status=\"200\"} 1\n",
        "hubgate_requests_total{route=\"/webhook\",verdict=\"bad_signature\",status=\"403\"} 1\n",
        "hubgate_requests_total{route=\"/webhook\",verdict=\"challenge_ok\",status=\"200\"} 1\n",
        "hubgate_signature_failures_total{route=\"/webhook\",reason=\"mismatch\"} 1\n",
        "hubgate_challenges_total{route=\"/webhook\",reason=\"ok\"} 1\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn metrics_report_certificate_expiry_of_server_cert_and_anchor() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&with_admin(&GateConfig::new(&up.url("/hook"))))
        .await;
    let admin = running(&gate).admin_addr().unwrap();
    let (status, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);

    let expiry = |kind: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "hubgate_certificate_expiry_seconds{{kind=\"{kind}\""
                ))
            })
            .unwrap_or_else(|| panic!("no {kind} expiry in:\n{metrics}"))
            .to_owned()
    };
    let server = expiry("server");
    assert!(server.contains("server-chain.pem"), "{server}");
    assert!(
        server.contains("subject=\"CN=hubgate test server\""),
        "{server}"
    );
    let anchor = expiry("trust_anchor");
    assert!(anchor.contains("root.pem"), "{anchor}");
    assert!(anchor.contains("hubgate test root"), "{anchor}");
    // Both expire in 2090/2095: decades away, and positive.
    for line in [&server, &anchor] {
        let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(secs > 20.0 * 365.0 * 86400.0, "{line}");
    }
}

#[tokio::test]
async fn admin_answers_health_and_readiness_and_404_elsewhere() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&with_admin(&GateConfig::new(&up.url("/hook"))))
        .await;
    let admin = running(&gate).admin_addr().unwrap();
    assert_ne!(admin, gate.addr);
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(admin, "/readyz").await.unwrap().0, 200);
    assert_eq!(http_get(admin, "/nope").await.unwrap().0, 404);
    assert_eq!(http_get(admin, "/").await.unwrap().0, 404);
}

#[tokio::test]
async fn webhook_port_and_admin_port_serve_only_their_own_paths() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&with_admin(&GateConfig::new(&up.url("/hook"))))
        .await;
    let admin = running(&gate).admin_addr().unwrap();
    let http = client(&pki, Some(&pki.meta_client()));
    for path in ["/metrics", "/healthz", "/readyz"] {
        let resp = http.get(gate.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "webhook port must not serve {path}");
    }
    // The admin port is plain HTTP and knows nothing of webhook routes.
    let (status, body) = http_get(admin, &challenge_path("42")).await.unwrap();
    assert_eq!(status, 404);
    assert!(!body.contains("42"), "{body}");
    assert_eq!(http_get(admin, "/webhook").await.unwrap().0, 404);
    up.assert_nothing_received();
}

// ---------------------------------------------------------------------------------------------
// Reload through the library
// ---------------------------------------------------------------------------------------------

/// The TOML with the server certificate and key replaced by `server2-*` files.
fn with_server2(cfg: &GateConfig) -> String {
    cfg.to_toml()
        .replace("\"server-chain.pem\"", "\"server2-chain.pem\"")
        .replace("\"server.key\"", "\"server2.key\"")
}

#[tokio::test]
async fn reload_swaps_the_server_certificate_for_new_connections() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook"));
    let gate = pki.start(&cfg).await;
    let cert = pki.meta_client();
    let before = server_serial(&pki, Some(&cert), gate.addr).await.unwrap();
    assert_ne!(before, NEW_SERIAL);

    pki.server_cert_with_serial(&NEW_SERIAL, "server2-chain.pem", "server2.key");
    let config = pki.config(&with_server2(&cfg)).unwrap();
    running(&gate).reload(config).expect("reload succeeds");

    let after = server_serial(&pki, Some(&cert), gate.addr).await.unwrap();
    assert_eq!(after, NEW_SERIAL);
    assert_eq!(post_fresh(&pki, Some(&cert), &gate).await.unwrap(), 200);
    let metrics = metrics_text(&gate);
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"success\"} 1\n"),
        "{metrics}"
    );
    // The expiry gauge follows the certificate now in force.
    let server = metrics
        .lines()
        .find(|l| l.starts_with("hubgate_certificate_expiry_seconds{kind=\"server\""))
        .unwrap();
    assert!(server.contains("server2-chain.pem"), "{server}");
}

#[tokio::test]
async fn reload_lets_a_request_in_flight_on_an_old_connection_finish() {
    let pki = Pki::new();
    let up = Upstream::with_reply(Reply {
        delay: Duration::from_secs(1),
        ..Reply::default()
    })
    .await;
    let cfg = GateConfig::new(&up.url("/hook"));
    let gate = pki.start(&cfg).await;
    let cert = pki.meta_client();
    let http = client(&pki, Some(&cert));
    let url = gate.url("/webhook");
    let in_flight = {
        let http = http.clone();
        tokio::spawn(async move { post_signed(&http, &url, &sample_body()).await })
    };
    wait_for_requests(&up, 1).await;

    pki.server_cert_with_serial(&NEW_SERIAL, "server2-chain.pem", "server2.key");
    let config = pki.config(&with_server2(&cfg)).unwrap();
    running(&gate).reload(config).unwrap();
    assert_eq!(
        server_serial(&pki, Some(&cert), gate.addr).await.unwrap(),
        NEW_SERIAL
    );

    let resp = in_flight
        .await
        .unwrap()
        .expect("the old connection's request is answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn reload_swaps_trust_anchors() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook"));
    let gate = pki.start(&cfg).await;
    let other = OtherCa::new("second");
    pki.write("other-root.pem", &other.root_pem());
    let old_client = pki.meta_client();
    let new_client = other.client(&LeafSpec::cn(META_CN));

    assert_eq!(
        post_fresh(&pki, Some(&old_client), &gate).await.unwrap(),
        200
    );
    assert!(
        post_fresh(&pki, Some(&new_client), &gate).await.is_err(),
        "a client under the new root is refused before the reload"
    );

    let mut next = cfg.clone();
    next.roots = Some(q("other-root.pem"));
    running(&gate)
        .reload(pki.config(&next.to_toml()).unwrap())
        .unwrap();

    assert_eq!(
        post_fresh(&pki, Some(&new_client), &gate).await.unwrap(),
        200
    );
    assert!(
        post_fresh(&pki, Some(&old_client), &gate).await.is_err(),
        "a client under the old root is refused after the reload"
    );
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn failed_reload_keeps_the_old_configuration_and_is_counted() {
    use rustls_pki_types::pem::PemObject;
    let pki = Pki::new();
    let up = Upstream::start().await;
    let cfg = GateConfig::new(&up.url("/hook"));
    let gate = pki.start(&cfg).await;
    let cert = pki.meta_client();
    let serial = server_serial(&pki, Some(&cert), gate.addr).await.unwrap();

    // A configuration whose key does not belong to its certificate: loaded, then tampered with.
    pki.server_cert_with_serial(&NEW_SERIAL, "server2-chain.pem", "server2.key");
    let mut broken = pki.config(&with_server2(&cfg)).unwrap();
    let stray_key = rustls_pki_types::PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    broken.server.key = Arc::new(stray_key);
    assert!(
        running(&gate).reload(broken).is_err(),
        "a key that does not match the certificate must fail the reload"
    );

    // A missing anchor file already fails to load.
    let mut missing = cfg.clone();
    missing.roots = Some(q("no-such-root.pem"));
    let err = pki.config(&missing.to_toml()).err().expect("load fails");
    assert!(err.to_string().contains("no-such-root.pem"), "{err}");

    // Still the old certificate, still serving.
    assert_eq!(
        server_serial(&pki, Some(&cert), gate.addr).await.unwrap(),
        serial
    );
    assert_eq!(post_fresh(&pki, Some(&cert), &gate).await.unwrap(), 200);
    let metrics = metrics_text(&gate);
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"failure\"} 1\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("result=\"success\"} 1"), "{metrics}");
}

// ---------------------------------------------------------------------------------------------
// The binary: SIGHUP, SIGTERM, environment-only configuration
// ---------------------------------------------------------------------------------------------

/// Writes `toml` as `hubgate.toml` in the PKI folder and starts `hubgate run --config` on it;
/// returns the process and the webhook address from its log.
async fn spawn_with_config(pki: &Pki, toml: &str) -> (Hubgate, std::net::SocketAddr) {
    let path = pki.write("hubgate.toml", toml);
    let child = Hubgate::spawn(
        &["run", "--config", path.to_str().unwrap()],
        &[],
        pki.dir.path(),
    );
    let addr = child.logged_addr("hubgate listening", "listen").await;
    (child, addr)
}

fn gate_at(addr: std::net::SocketAddr) -> Gate {
    Gate {
        addr,
        running: None,
    }
}

#[tokio::test]
async fn sighup_reloads_a_rewritten_certificate_and_keeps_running() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let toml = GateConfig::new(&up.url("/hook")).to_toml();
    let (mut child, addr) = spawn_with_config(&pki, &toml).await;
    let cert = pki.meta_client();
    let before = server_serial(&pki, Some(&cert), addr).await.unwrap();
    assert_ne!(before, NEW_SERIAL);

    // Renewed in place, as cert-manager or certbot would, and the config rewritten.
    pki.server_cert_with_serial(&NEW_SERIAL, "server-chain.pem", "server.key");
    pki.write("hubgate.toml", &toml);
    let mark = child.log_count();
    child.signal("HUP");
    child
        .wait_log(mark, "configuration reloaded", Duration::from_secs(10))
        .await;

    assert_eq!(
        server_serial(&pki, Some(&cert), addr).await.unwrap(),
        NEW_SERIAL
    );
    assert_eq!(
        post_fresh(&pki, Some(&cert), &gate_at(addr)).await.unwrap(),
        200
    );
    assert!(child.running(), "SIGHUP must not stop the process");
}

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_serving() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let toml = with_admin(&GateConfig::new(&up.url("/hook")));
    let (mut child, addr) = spawn_with_config(&pki, &toml).await;
    let admin = child.logged_addr("admin listening", "listen").await;
    let cert = pki.meta_client();
    let serial = server_serial(&pki, Some(&cert), addr).await.unwrap();

    // Not TOML at all.
    pki.write("hubgate.toml", "[server\nlisten = ");
    let mark = child.log_count();
    child.signal("HUP");
    child
        .wait_log(mark, "reload failed", Duration::from_secs(10))
        .await;
    assert!(child.running());
    assert_eq!(
        post_fresh(&pki, Some(&cert), &gate_at(addr)).await.unwrap(),
        200
    );

    // Valid TOML, but the key file no longer matches the certificate.
    pki.write("hubgate.toml", &toml);
    pki.server_cert_with_serial(&NEW_SERIAL, "unused-chain.pem", "server.key");
    let mark = child.log_count();
    child.signal("HUP");
    child
        .wait_log(mark, "reload failed", Duration::from_secs(10))
        .await;
    assert!(child.running());
    assert_eq!(
        server_serial(&pki, Some(&cert), addr).await.unwrap(),
        serial
    );
    assert_eq!(
        post_fresh(&pki, Some(&cert), &gate_at(addr)).await.unwrap(),
        200
    );

    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"failure\"} 2\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let pki = Pki::new();
    let up = Upstream::with_reply(Reply {
        delay: Duration::from_millis(1500),
        ..Reply::default()
    })
    .await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.upstream_timeout = "4s";
    cfg.server_extra = "drain_timeout = \"5s\"\n".into();
    let (mut child, addr) = spawn_with_config(&pki, &cfg.to_toml()).await;
    let gate = gate_at(addr);
    let http = client(&pki, Some(&pki.meta_client()));
    let url = gate.url("/webhook");
    let in_flight = tokio::spawn(async move {
        let resp = post_signed(&http, &url, &sample_body()).await?;
        let status = resp.status().as_u16();
        resp.text().await.map(|t| (status, t))
    });
    wait_for_requests(&up, 1).await;

    child.signal("TERM");
    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((status, body.as_str()), (200, "ok"));
    let exit = child
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no exit within the drain deadline:\n{}",
                child.logs().join("\n")
            )
        });
    assert_eq!(exit.code(), Some(0), "{}", child.logs().join("\n"));
}

#[tokio::test]
async fn env_only_sidecar_serves_challenge_and_signed_event() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    // As Kubernetes or `echo` write them: with a trailing newline.
    pki.write("token.txt", &format!("{TOKEN}\n"));
    pki.write("secret.txt", &format!("{SECRET}\n"));
    let upstream = up.url("/hook");
    let child = Hubgate::spawn(
        &["run"],
        &[
            ("HUBGATE_LISTEN", "127.0.0.1:0"),
            ("HUBGATE_CERT", "server-chain.pem"),
            ("HUBGATE_KEY", "server.key"),
            ("HUBGATE_CLIENT_ROOTS", "root.pem"),
            ("HUBGATE_UPSTREAM", &upstream),
            ("HUBGATE_VERIFY_TOKEN_FILE", "token.txt"),
            ("HUBGATE_APP_SECRET_FILE", "secret.txt"),
            ("HUBGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ],
        pki.dir.path(),
    );
    let gate = gate_at(child.logged_addr("hubgate listening", "listen").await);
    let admin = child.logged_addr("admin listening", "listen").await;
    assert_eq!(http_get(admin, "/readyz").await.unwrap().0, 200);

    let cert = pki.meta_client();
    let http = client(&pki, Some(&cert));
    let resp = http
        .get(gate.url(&challenge_path("1158201444")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "1158201444");

    let body = sample_body();
    let resp = post_signed(&http, &gate.url("/webhook"), &body)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = up.only();
    assert_eq!(got.uri, "/hook");
    assert_eq!(got.body, body);
    assert!(got
        .header("x-forwarded-client-cert")
        .unwrap()
        .starts_with(&format!("Hash={};", cert.leaf_sha256())));
}

#[tokio::test]
async fn plain_hubgate_with_only_environment_runs_the_gate() {
    // No subcommand: the container's ENTRYPOINT without CMD. HUBGATE_* variables mean `run`.
    let pki = Pki::new();
    let up = Upstream::start().await;
    let upstream = up.url("/hook");
    let child = Hubgate::spawn(
        &[],
        &[
            ("HUBGATE_LISTEN", "127.0.0.1:0"),
            ("HUBGATE_CERT", "server-chain.pem"),
            ("HUBGATE_KEY", "server.key"),
            ("HUBGATE_CLIENT_ROOTS", "root.pem"),
            ("HUBGATE_UPSTREAM", &upstream),
            ("HUBGATE_VERIFY_TOKEN", TOKEN),
            ("HUBGATE_APP_SECRET", SECRET),
        ],
        pki.dir.path(),
    );
    let gate = gate_at(child.logged_addr("hubgate listening", "listen").await);
    let http = client(&pki, Some(&pki.meta_client()));
    let resp = http
        .get(gate.url(&challenge_path("77")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "77");
}

// ---------------------------------------------------------------------------------------------
// Trusted proxies
// ---------------------------------------------------------------------------------------------

/// Optional client auth, the route requiring an identity, and `[trusted_proxies]`.
fn proxied(up: &Upstream, cidrs: &str, identity: &str, server_extra: &str) -> String {
    let mut cfg = GateConfig::new(&up.url("/hook")).mode("optional");
    cfg.route().client_cert = Some("required");
    cfg.server_extra = server_extra.to_owned();
    format!(
        "{}\n[trusted_proxies]\ncidrs = [{}]\nidentity = {}\n",
        cfg.to_toml(),
        q(cidrs),
        q(identity)
    )
}

const ALB_SUBJECT: &str = "x-amzn-mtls-clientcert-subject";
const ALB_CERT: &str = "x-amzn-mtls-clientcert";
const META_SUBJECT: &str = "CN=client.webhooks.fbclientcerts.com,O=Meta";

async fn post_with_headers(
    http: &reqwest::Client,
    gate: &Gate,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let body = unique_body();
    let mut req = http
        .post(gate.url("/webhook"))
        .header("content-type", "application/json")
        .header(SIG, sign(SECRET, &body))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn no_amzn_headers(r: &Recorded) {
    let amzn: Vec<_> = r
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-amzn-"))
        .collect();
    assert!(amzn.is_empty(), "forwarded identity headers: {amzn:?}");
}

#[tokio::test]
async fn alb_subject_from_a_trusted_proxy_admits_and_becomes_xfcc() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb", ""))
        .await;
    let http = client(&pki, None);
    let resp = post_with_headers(&http, &gate, &[(ALB_SUBJECT, META_SUBJECT)]).await;
    assert_eq!(resp.status(), 200);
    let got = up.only();
    assert_eq!(
        got.header("x-forwarded-client-cert").as_deref(),
        Some(format!("Subject=\"{META_SUBJECT}\"").as_str())
    );
    no_amzn_headers(&got);
}

#[tokio::test]
async fn alb_subject_with_a_wrong_cn_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb", ""))
        .await;
    let http = client(&pki, None);
    let resp =
        post_with_headers(&http, &gate, &[(ALB_SUBJECT, "CN=evil.example.com,O=Meta")]).await;
    assert_eq!(resp.status(), 403);
    up.assert_nothing_received();
    assert!(metrics_text(&gate).contains("verdict=\"bad_identity_header\",status=\"403\"} 1"));
}

#[tokio::test]
async fn identity_headers_from_an_untrusted_peer_do_not_stand_in_for_a_certificate() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki.start_toml(&proxied(&up, "10.0.0.0/8", "alb", "")).await;
    let http = client(&pki, None);
    let resp = post_with_headers(&http, &gate, &[(ALB_SUBJECT, META_SUBJECT)]).await;
    assert_eq!(resp.status(), 403);
    up.assert_nothing_received();
    assert!(metrics_text(&gate).contains("verdict=\"client_cert_required\",status=\"403\"} 1"));
}

#[tokio::test]
async fn untrusted_peer_gets_its_own_xfcc_and_xff_whatever_it_sends() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki.start_toml(&proxied(&up, "10.0.0.0/8", "alb", "")).await;
    let cert = pki.meta_client();
    let http = client(&pki, Some(&cert));
    let resp = post_with_headers(
        &http,
        &gate,
        &[
            (ALB_SUBJECT, "CN=evil.example.com"),
            (ALB_CERT, "-----BEGIN%20CERTIFICATE-----"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-client-cert", "Hash=evil"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let got = up.only();
    let xfcc = got.header("x-forwarded-client-cert").unwrap();
    assert!(
        xfcc.starts_with(&format!(
            "Hash={};Subject=\"CN={META_CN},",
            cert.leaf_sha256()
        )),
        "{xfcc}"
    );
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    no_amzn_headers(&got);
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_is_extended_with_the_proxy_address() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb", ""))
        .await;
    let http = client(&pki, None);
    let resp = post_with_headers(
        &http,
        &gate,
        &[
            (ALB_SUBJECT, META_SUBJECT),
            ("x-forwarded-for", "31.13.1.1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.only().header("x-forwarded-for").as_deref(),
        Some("31.13.1.1, 127.0.0.1")
    );
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_keeps_every_header_line() {
    // Two X-Forwarded-For lines are one comma-joined list (RFC 9110 5.3); the client address is
    // taken from all of them, so the list passed on must hold all of them too.
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb", ""))
        .await;
    let http = client(&pki, None);
    let resp = post_with_headers(
        &http,
        &gate,
        &[
            (ALB_SUBJECT, META_SUBJECT),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "31.13.1.1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.only().header("x-forwarded-for").as_deref(),
        Some("6.6.6.6, 31.13.1.1, 127.0.0.1")
    );
}

fn url_encoded_chain(cert: &ClientCert) -> String {
    percent_encoding::utf8_percent_encode(&cert.chain_pem(), percent_encoding::NON_ALPHANUMERIC)
        .to_string()
}

#[tokio::test]
async fn alb_passthrough_chain_is_verified_and_hashed() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb-passthrough", ""))
        .await;
    let cert = pki.meta_client();
    let encoded = url_encoded_chain(&cert);
    let resp = post_with_headers(&client(&pki, None), &gate, &[(ALB_CERT, &encoded)]).await;
    assert_eq!(resp.status(), 200);
    let got = up.only();
    let xfcc = got.header("x-forwarded-client-cert").unwrap();
    assert!(
        xfcc.starts_with(&format!(
            "Hash={};Subject=\"CN={META_CN},",
            cert.leaf_sha256()
        )),
        "{xfcc}"
    );
    no_amzn_headers(&got);
}

#[tokio::test]
async fn alb_passthrough_untrusted_or_wrong_cn_chain_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb-passthrough", ""))
        .await;
    let http = client(&pki, None);
    for bad in [
        pki.untrusted_client(&LeafSpec::cn(META_CN)),
        pki.client(&LeafSpec::cn("evil.example.com")),
    ] {
        let encoded = url_encoded_chain(&bad);
        let resp = post_with_headers(&http, &gate, &[(ALB_CERT, &encoded)]).await;
        assert_eq!(resp.status(), 403);
    }
    up.assert_nothing_received();
    assert!(metrics_text(&gate).contains("verdict=\"bad_identity_header\",status=\"403\"} 2"));
}

#[tokio::test]
async fn allow_sources_applies_to_the_client_address_a_trusted_proxy_forwards() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let toml = proxied(
        &up,
        "127.0.0.1/32",
        "alb",
        "allow_sources = [\"31.13.0.0/16\"]\n",
    );
    let gate = pki.start_toml(&toml).await;
    let http = client(&pki, None);
    let allowed = post_with_headers(
        &http,
        &gate,
        &[
            (ALB_SUBJECT, META_SUBJECT),
            ("x-forwarded-for", "31.13.1.1"),
        ],
    )
    .await;
    assert_eq!(allowed.status(), 200);
    let refused = post_with_headers(
        &http,
        &gate,
        &[(ALB_SUBJECT, META_SUBJECT), ("x-forwarded-for", "8.8.8.8")],
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert_eq!(up.requests().len(), 1);
    assert!(metrics_text(&gate).contains("verdict=\"source_not_allowed\",status=\"403\"} 1"));
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------------------------

async fn proxy_protocol_gate(pki: &Pki, up: &Upstream, server_extra: &str) -> Gate {
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.server_extra = format!("proxy_protocol = true\n{server_extra}");
    let toml = format!(
        "{}\n[trusted_proxies]\ncidrs = [\"127.0.0.1/32\"]\n",
        cfg.to_toml()
    );
    pki.start_toml(&toml).await
}

/// Connects, writes `header`, then runs a signed POST over TLS on the same socket.
async fn post_after_proxy_header(
    pki: &Pki,
    gate: &Gate,
    header: &[u8],
) -> std::io::Result<RawResponse> {
    let mut tcp = TcpStream::connect(gate.addr).await?;
    tcp.write_all(header).await?;
    let cfg = Arc::new(tls_client_config(
        pki,
        Some(&pki.meta_client()),
        Proto::H1,
        false,
    ));
    let request = signed_post_request(&gate.authority(), &unique_body(), "");
    raw_exchange_on(cfg, tcp, &request).await
}

fn proxy_v2_header(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_v1_header_gives_the_client_address() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = proxy_protocol_gate(&pki, &up, "").await;
    let resp = post_after_proxy_header(
        &pki,
        &gate,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\r\n",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        up.only().header("x-forwarded-for").as_deref(),
        Some("203.0.113.7")
    );
}

#[tokio::test]
async fn proxy_v2_header_gives_the_client_address() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = proxy_protocol_gate(&pki, &up, "").await;
    let header = proxy_v2_header([203, 0, 113, 7], [127, 0, 0, 1], 5555, 443);
    let resp = post_after_proxy_header(&pki, &gate, &header).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        up.only().header("x-forwarded-for").as_deref(),
        Some("203.0.113.7")
    );
}

#[tokio::test]
async fn proxy_protocol_listener_drops_a_connection_without_header() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = proxy_protocol_gate(&pki, &up, "").await;
    let request = signed_post_request(&gate.authority(), &sample_body(), "");
    let result = raw_exchange(&pki, Some(&pki.meta_client()), gate.addr, &request).await;
    assert!(result.is_err(), "got {result:?}");
    up.assert_nothing_received();
    eventually_contains(
        || async { metrics_text(&gate) },
        "hubgate_refused_connections_total{reason=\"proxy_protocol\"} 1\n",
    )
    .await;
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_address_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.server_extra = "proxy_protocol = true\n".into();
    let toml = format!(
        "{}\n[trusted_proxies]\ncidrs = [\"10.0.0.0/8\"]\n",
        cfg.to_toml()
    );
    let gate = pki.start_toml(&toml).await;
    let result =
        post_after_proxy_header(&pki, &gate, b"PROXY TCP4 31.13.1.1 127.0.0.1 5555 443\r\n").await;
    assert!(result.is_err(), "got {result:?}");
    up.assert_nothing_received();
    eventually_contains(
        || async { metrics_text(&gate) },
        "hubgate_refused_connections_total{reason=\"proxy_protocol\"} 1\n",
    )
    .await;
}

#[tokio::test]
async fn proxy_protocol_source_outside_allow_sources_is_dropped_before_tls() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = proxy_protocol_gate(&pki, &up, "allow_sources = [\"198.51.100.0/24\"]\n").await;
    let result = post_after_proxy_header(
        &pki,
        &gate,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\r\n",
    )
    .await;
    assert!(result.is_err(), "got {result:?}");
    up.assert_nothing_received();
    eventually_contains(
        || async { metrics_text(&gate) },
        "hubgate_refused_connections_total{reason=\"source_not_allowed\"} 1\n",
    )
    .await;
    // Refused before TLS: no handshake was attempted, so none failed.
    assert!(!metrics_text(&gate).contains("hubgate_tls_handshake_failures_total{"));
    // An allowed source on the same listener is served.
    let ok = post_after_proxy_header(
        &pki,
        &gate,
        b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 443\r\n",
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Idle timeout
// ---------------------------------------------------------------------------------------------

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect_tls(pki: &Pki, gate: &Gate) -> Tls {
    let cfg = Arc::new(tls_client_config(
        pki,
        Some(&pki.meta_client()),
        Proto::H1,
        false,
    ));
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tcp = TcpStream::connect(gate.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")
        .unwrap()
        .to_owned();
    connector.connect(name, tcp).await.unwrap()
}

/// Sends a keep-alive signed POST and reads exactly one response (by its Content-Length).
async fn keep_alive_post(tls: &mut Tls, host: &str) -> u16 {
    let body = sample_body();
    let mut request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{SIG}: {}\r\n\r\n",
        body.len(),
        sign(SECRET, &body)
    )
    .into_bytes();
    request.extend_from_slice(&body);
    tls.write_all(&request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = tls.read(&mut chunk).await.expect("response");
            assert!(n > 0, "connection closed before the response was complete");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("content-length")
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return head
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u16>()
                    .unwrap();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response within 10 s")
}

/// Whether the server closes the connection (EOF or error on read) within `within`.
async fn closed_within(tls: &mut Tls, within: Duration) -> bool {
    let mut chunk = [0u8; 256];
    match tokio::time::timeout(within, tls.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("unexpected {n} bytes on an idle connection"),
        Err(_) => false,
    }
}

fn idle_config(up: &Upstream) -> GateConfig {
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.upstream_timeout = "4s";
    cfg.server_extra = "idle_timeout = \"1s\"\n".into();
    cfg
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki.start(&idle_config(&up)).await;
    let mut tls = connect_tls(&pki, &gate).await;
    assert_eq!(keep_alive_post(&mut tls, &gate.authority()).await, 200);
    assert!(
        closed_within(&mut tls, Duration::from_secs(5)).await,
        "an idle keep-alive connection must be closed after idle_timeout"
    );
}

#[tokio::test]
async fn connection_is_not_closed_while_a_request_is_in_flight() {
    let pki = Pki::new();
    // The backend takes twice the idle timeout.
    let up = Upstream::with_reply(Reply {
        delay: Duration::from_secs(2),
        ..Reply::default()
    })
    .await;
    let gate = pki.start(&idle_config(&up)).await;
    let mut tls = connect_tls(&pki, &gate).await;
    assert_eq!(keep_alive_post(&mut tls, &gate.authority()).await, 200);
    assert!(closed_within(&mut tls, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn allow_sources_refuses_a_proxied_request_whose_client_is_unknown() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let toml = proxied(
        &up,
        "127.0.0.1/32",
        "alb",
        "allow_sources = [\"31.13.0.0/16\"]\n",
    );
    let gate = pki.start_toml(&toml).await;
    let http = client(&pki, None);
    for xff in [None, Some("not-an-address"), Some("8.8.8.8:443")] {
        let mut headers = vec![(ALB_SUBJECT, META_SUBJECT)];
        if let Some(v) = xff {
            headers.push(("x-forwarded-for", v));
        }
        let r = post_with_headers(&http, &gate, &headers).await;
        assert_eq!(r.status(), 403, "X-Forwarded-For {xff:?}");
    }
    up.assert_nothing_received();
    for hop in ["31.13.1.1:443", "[::ffff:31.13.1.2]:443"] {
        let r = post_with_headers(
            &http,
            &gate,
            &[(ALB_SUBJECT, META_SUBJECT), ("x-forwarded-for", hop)],
        )
        .await;
        assert_eq!(r.status(), 200, "X-Forwarded-For {hop}");
    }
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn repeated_identity_header_from_a_trusted_proxy_is_refused() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let gate = pki
        .start_toml(&proxied(&up, "127.0.0.1/32", "alb", ""))
        .await;
    let http = client(&pki, None);
    let r = post_with_headers(
        &http,
        &gate,
        &[(ALB_SUBJECT, META_SUBJECT), (ALB_SUBJECT, "CN=evil")],
    )
    .await;
    assert_eq!(r.status(), 403);
    up.assert_nothing_received();
    assert!(metrics_text(&gate).contains("verdict=\"bad_identity_header\",status=\"403\"} 1"));
}

/// A client that pipelines requests and never reads the answers must not keep its connection
/// (and its `max_connections` slot) once the gate closes it: `drain_timeout` bounds the wait.
#[tokio::test]
async fn connection_of_a_client_that_never_reads_is_dropped() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let mut cfg = GateConfig::new(&up.url("/hook"));
    cfg.server_extra = "idle_timeout = \"1s\"\ndrain_timeout = \"1s\"\n".into();
    let gate = pki.start(&cfg).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let tcp = socket.connect(gate.addr).await.unwrap();
    let tls_cfg = Arc::new(tls_client_config(
        &pki,
        Some(&pki.meta_client()),
        Proto::H1,
        false,
    ));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(tls_cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    // Each answer echoes a 1,000-byte challenge: 20,000 of them are far more than the socket
    // buffers on both sides hold.
    let one = format!(
        "GET /webhook?hub.mode=subscribe&hub.challenge={}&hub.verify_token={TOKEN} HTTP/1.1\r\nHost: {}\r\n\r\n",
        "7".repeat(1000),
        gate.authority()
    );
    let many = one.repeat(20_000);
    // The writes stall once the gate stops reading; they are never read back.
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.write_all(many.as_bytes())).await;
        tls
    });
    let open = |text: &str| text.lines().any(|l| l == "hubgate_open_connections 1");
    let seen_open = std::time::Instant::now() + Duration::from_secs(3);
    while !open(&metrics_text(&gate)) {
        assert!(
            std::time::Instant::now() < seen_open,
            "the connection never showed as open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while open(&metrics_text(&gate)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.abort();
}
