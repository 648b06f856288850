//! The `hubgate` binary as a process: SIGHUP reloads the configuration file (a rewritten
//! certificate is served, a broken file keeps the old configuration), SIGTERM drains in-flight
//! requests and exits 0, and the environment-only sidecar (`HUBGATE_*` variables, with or
//! without the `run` subcommand) serves the challenge and signed events.

mod common;

use std::time::Duration;

use common::*;

/// The scenario's configuration written as `hubgate.toml` and run by the binary; the process
/// and the gate it serves.
async fn run_binary(pki: &Pki, cfg: &GateConfig) -> (Hubgate, Gate) {
    let path = cfg.write(pki, "hubgate.toml");
    let (child, addr) = Hubgate::run_config(&path).await;
    (child, Gate::at(addr))
}

/// A verification request for `challenge` is answered with the challenge.
async fn assert_challenge_echoed(http: &reqwest::Client, gate: &Gate, challenge: &str) {
    let resp = http
        .get(gate.url(&challenge_path(challenge)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), challenge);
}

/// A signed POST of a fresh body on a fresh client presenting `identity`.
async fn post_fresh(pki: &Pki, identity: &ClientCert, gate: &Gate) -> reqwest::Result<u16> {
    post_signed(
        &client(pki, Some(identity)),
        &gate.url("/webhook"),
        &unique_body(),
    )
    .await
    .map(|r| r.status().as_u16())
}

#[tokio::test]
async fn sighup_reloads_a_rewritten_certificate_and_keeps_running() {
    let (pki, _up, cfg) = Scenario::new().prepare().await;
    let (child, gate) = run_binary(&pki, &cfg).await;
    let cert = pki.meta_client();
    let before = server_serial(&pki, Some(&cert), gate.addr).await.unwrap();
    assert_ne!(before, REISSUED_SERIAL);

    // Renewed in place, as cert-manager or certbot would, and the config rewritten.
    pki.reissue_server_cert(&REISSUED_SERIAL, "server-chain.pem", "server.key");
    cfg.write(&pki, "hubgate.toml");
    child.sighup("configuration reloaded").await;

    assert_eq!(
        server_serial(&pki, Some(&cert), gate.addr).await.unwrap(),
        REISSUED_SERIAL
    );
    assert_eq!(post_fresh(&pki, &cert, &gate).await.unwrap(), 200);
    assert!(child.running(), "SIGHUP must not stop the process");
}

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_serving() {
    let (pki, _up, cfg) = Scenario::new().admin().prepare().await;
    let (child, gate) = run_binary(&pki, &cfg).await;
    let admin = child.logged_addr("admin listening", "listen").await;
    let cert = pki.meta_client();
    let serial = server_serial(&pki, Some(&cert), gate.addr).await.unwrap();

    // Not TOML at all.
    pki.write("hubgate.toml", "[server\nlisten = ");
    child.sighup("reload failed").await;
    assert!(child.running());
    assert_eq!(post_fresh(&pki, &cert, &gate).await.unwrap(), 200);

    // Valid TOML, but the key file no longer matches the certificate.
    cfg.write(&pki, "hubgate.toml");
    pki.reissue_server_cert(&REISSUED_SERIAL, "unused-chain.pem", "server.key");
    child.sighup("reload failed").await;
    assert!(child.running());
    assert_eq!(
        server_serial(&pki, Some(&cert), gate.addr).await.unwrap(),
        serial
    );
    assert_eq!(post_fresh(&pki, &cert, &gate).await.unwrap(), 200);

    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("hubgate_config_reloads_total{result=\"failure\"} 2\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let (pki, up, cfg) = Scenario::new()
        .reply(Reply::delayed(Duration::from_millis(1500)))
        .upstream_client(|u| u.timeout = Some("4s".into()))
        .server(|s| s.drain_timeout = Some("5s".into()))
        .prepare()
        .await;
    let (child, gate) = run_binary(&pki, &cfg).await;
    let http = client(&pki, Some(&pki.meta_client()));
    let url = gate.url("/webhook");
    let in_flight = tokio::spawn(async move {
        let resp = post_signed(&http, &url, &sample_body()).await?;
        let status = resp.status().as_u16();
        resp.text().await.map(|t| (status, t))
    });
    up.wait_for_requests(1).await;

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

/// The variables every environment-only gate needs: listener, certificate, anchor, upstream.
fn sidecar_env(upstream: &str) -> Vec<(&'static str, String)> {
    vec![
        ("HUBGATE_LISTEN", "127.0.0.1:0".into()),
        ("HUBGATE_CERT", "server-chain.pem".into()),
        ("HUBGATE_KEY", "server.key".into()),
        ("HUBGATE_CLIENT_ROOTS", "root.pem".into()),
        ("HUBGATE_UPSTREAM", upstream.into()),
    ]
}

/// Spawns the binary with `args` and the environment `env` in the PKI's folder; the process
/// and the gate it serves.
async fn spawn_sidecar(
    pki: &Pki,
    args: &[&str],
    env: &[(&'static str, String)],
) -> (Hubgate, Gate) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let child = Hubgate::spawn(args, &env, pki.dir.path());
    let addr = child.logged_addr("hubgate listening", "listen").await;
    (child, Gate::at(addr))
}

#[tokio::test]
async fn env_only_sidecar_serves_challenge_and_signed_event() {
    // As Kubernetes or `echo` write them: with a trailing newline.
    let (pki, up, _) = Scenario::new()
        .file("token.txt", &format!("{TOKEN}\n"))
        .file("secret.txt", &format!("{SECRET}\n"))
        .prepare()
        .await;
    let mut env = sidecar_env(&up.url("/hook"));
    env.extend([
        ("HUBGATE_VERIFY_TOKEN_FILE", "token.txt".into()),
        ("HUBGATE_APP_SECRET_FILE", "secret.txt".into()),
        ("HUBGATE_ADMIN_LISTEN", "127.0.0.1:0".into()),
    ]);
    let (child, gate) = spawn_sidecar(&pki, &["run"], &env).await;
    let admin = child.logged_addr("admin listening", "listen").await;
    assert_eq!(http_get(admin, "/readyz").await.unwrap().0, 200);

    let cert = pki.meta_client();
    let http = client(&pki, Some(&cert));
    assert_challenge_echoed(&http, &gate, "1158201444").await;

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
    let (pki, up, _) = Scenario::new().prepare().await;
    let mut env = sidecar_env(&up.url("/hook"));
    env.extend([
        ("HUBGATE_VERIFY_TOKEN", TOKEN.into()),
        ("HUBGATE_APP_SECRET", SECRET.into()),
    ]);
    let (_child, gate) = spawn_sidecar(&pki, &[], &env).await;
    let http = client(&pki, Some(&pki.meta_client()));
    assert_challenge_echoed(&http, &gate, "77").await;
}
