//! The `hubgate` binary: `check --config FILE` (exit 0 with a summary; exit 2 naming the file
//! and the key on a configuration error) and `sign --secret S` (body on stdin).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn check(config: &Path, env: &[(&str, &str)]) -> Output {
    hubgate_output(&["check", "--config", config.to_str().unwrap()], b"", env)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A configuration that is valid apart from what `f` changes, written as `hubgate.toml`.
fn write_config(pki: &Pki, f: impl FnOnce(&mut GateConfig)) -> PathBuf {
    let mut cfg = GateConfig::new("http://127.0.0.1:9/hook");
    f(&mut cfg);
    cfg.write(pki, "hubgate.toml")
}

/// A valid configuration with `f` applied to its TOML text (for text that is malformed on
/// purpose), written as `hubgate.toml`.
fn write_config_text(pki: &Pki, f: impl FnOnce(String) -> String) -> PathBuf {
    let toml = GateConfig::new("http://127.0.0.1:9/hook").to_toml();
    let edited = f(toml.clone());
    assert_ne!(edited, toml, "the text was edited");
    pki.write("hubgate.toml", &edited)
}

/// Exit status 2 and a stderr that contains every one of `needles`.
fn assert_config_error(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status; stdout: {}; stderr: {stderr}",
        text(&out.stdout)
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr must name {n:?}: {stderr}");
    }
}

#[test]
fn check_accepts_a_valid_config_and_prints_a_summary() {
    let pki = Pki::new();
    let path = write_config(&pki, |_| {});
    let out = check(&path, &[]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        text(&out.stderr)
    );
    assert!(
        stdout.contains("/webhook"),
        "summary names the route: {stdout}"
    );
}

#[test]
fn check_rejects_an_unknown_key() {
    let pki = Pki::new();
    let path = write_config_text(&pki, |t| {
        t.replace("[upstream]\n", "[upstream]\ntimeuot = \"1s\"\n")
    });
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap(), "timeuot"]);
}

#[test]
fn check_rejects_an_unknown_section() {
    let pki = Pki::new();
    let path = write_config_text(&pki, |t| format!("{t}\n[routes]\npath = \"/x\"\n"));
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap(), "routes"]);
}

#[test]
fn check_names_a_missing_cert_file() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| c.server.cert = "missing-chain.pem".into());
    let out = check(&path, &[]);
    let missing = pki.path("missing-chain.pem");
    assert_config_error(
        &out,
        &[
            path.to_str().unwrap(),
            "server.cert",
            missing.to_str().unwrap(),
        ],
    );
}

#[test]
fn check_names_a_missing_roots_file() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| {
        c.client_auth.roots = Some(Paths::One("meta-ca.pem".into()))
    });
    let out = check(&path, &[]);
    let missing = pki.path("meta-ca.pem");
    assert_config_error(
        &out,
        &[
            path.to_str().unwrap(),
            "client_auth.roots",
            missing.to_str().unwrap(),
        ],
    );
}

#[test]
fn check_names_a_bad_upstream_url() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| c.route().upstream = "not a url".into());
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap(), "route[0].upstream"]);
}

#[test]
fn check_names_a_non_http_upstream() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| c.route().upstream = "ftp://127.0.0.1/hook".into());
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap(), "route[0].upstream"]);
}

#[test]
fn check_names_an_unset_env_secret() {
    let pki = Pki::new();
    let var = "HG_TEST_UNSET_APP_SECRET";
    let path = write_config(&pki, |c| c.route().app_secrets.push(Secret::env(var)));
    // `hubgate` passes no HUBGATE_* variable from this process to the child.
    let out = check(&path, &[]);
    assert_config_error(
        &out,
        &[path.to_str().unwrap(), "route[0].app_secrets[1]", var],
    );
}

#[test]
fn check_accepts_an_env_secret_that_is_set() {
    let pki = Pki::new();
    let var = "HG_TEST_SET_APP_SECRET";
    let path = write_config(&pki, |c| c.route().app_secrets.push(Secret::env(var)));
    let out = check(&path, &[(var, "from-the-environment")]);
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        text(&out.stderr)
    );
    // The summary never prints a secret.
    assert!(!text(&out.stdout).contains("from-the-environment"));
    assert!(!text(&out.stdout).contains("s3cret"));
}

#[test]
fn check_names_a_key_that_does_not_match_the_cert() {
    let pki = Pki::new();
    let other = Pki::new();
    pki.write(
        "other.key",
        &std::fs::read_to_string(other.path("server.key")).unwrap(),
    );
    let path = write_config(&pki, |c| c.server.key = "other.key".into());
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap(), "server.key"]);
}

#[test]
fn check_rejects_required_route_cert_with_client_auth_off() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| {
        c.client_auth = ClientAuth::off();
        c.route().client_cert = Some(RouteCert::Required);
    });
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap(), "route[0].client_cert"]);
}

#[test]
fn check_reports_a_missing_config_file() {
    let pki = Pki::new();
    let path = pki.path("nope.toml");
    let out = check(&path, &[]);
    assert_config_error(&out, &[path.to_str().unwrap()]);
}

#[test]
fn sign_prints_the_github_test_vector() {
    // HMAC-SHA256("It's a Secret to Everybody", "Hello, World!") from GitHub's webhook docs.
    let out = hubgate_output(
        &["sign", "--secret", "It's a Secret to Everybody"],
        b"Hello, World!",
        &[],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim_end(),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[test]
fn sign_uses_the_exact_stdin_bytes() {
    let body = "{\"text\":\"äöå \\u00e4\\/\"}\n".as_bytes();
    let out = hubgate_output(&["sign", "--secret", SECRET], body, &[]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    // Including the trailing newline: nothing trimmed or re-encoded.
    assert_eq!(text(&out.stdout).trim_end(), sign(SECRET, body));
    assert_ne!(
        text(&out.stdout).trim_end(),
        sign(SECRET, &body[..body.len() - 1])
    );
}

#[tokio::test]
async fn sign_output_is_accepted_by_the_gate() {
    let s = Scenario::new().start().await;
    let body = sample_body();
    let out = hubgate_output_async(&["sign", "--secret", SECRET], &body).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let signature = text(&out.stdout).trim_end().to_owned();
    let resp = s.post_with_headers(&body, &[(SIG, &signature)]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.only().body, body);
}

#[test]
fn demo_plays_meta_against_itself_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().to_str().unwrap();
    let out = hubgate_output(
        &["demo", "--listen", "127.0.0.1:0", "--exit-after-selftest"],
        b"",
        &[("TMPDIR", tmpdir)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("  PASS ").count(), 6, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("NOT FOR PRODUCTION"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the demo left files behind: {left:?}");
}

#[test]
fn demo_refuses_a_non_loopback_address() {
    let out = hubgate_output(
        &["demo", "--listen", "0.0.0.0:0", "--exit-after-selftest"],
        b"",
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn check_names_a_postgres_spool_without_its_password() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| {
        c.with_spool()
            .on_postgres("postgres://hubgate:hunter2@db.example:6432/events?sslmode=verify-full");
    });
    let out = check(&path, &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        stdout.contains("postgres db.example:6432/events"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2") && !text(&out.stderr).contains("hunter2"));
}

#[test]
fn check_refuses_the_keys_of_the_other_spool_backend() {
    let pki = Pki::new();
    let path = write_config(&pki, |c| {
        let spool = c.with_spool();
        spool.on_postgres("postgres://u:hunter2@db.example/events");
        spool.max_size_bytes = Some(1024);
    });
    assert_config_error(
        &check(&path, &[]),
        &["spool.max_size_bytes", "backend = \"sqlite\""],
    );
    let path = write_config(&pki, |c| {
        c.with_spool().url = Some(Secret::Inline("postgres://u:hunter2@h/d".into()));
    });
    let out = check(&path, &[]);
    assert_config_error(&out, &["spool.url", "backend = \"postgres\""]);
    assert!(!text(&out.stderr).contains("hunter2"));
}
