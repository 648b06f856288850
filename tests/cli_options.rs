//! The `hubgate` binary's options: global options are accepted after the subcommand as well as
//! before it (`hubgate spool summary --config F` = `hubgate spool --config F summary`), and logs
//! written to a pipe carry no ANSI colour codes.
//!
//! Keys and certificates are generated per test by the shared harness (`common::Pki`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::SystemTime;

use common::*;
use hubgate::spool::{NewEvent, Spool, SpoolSettings};

/// Runs the binary with `args`, stdout and stderr piped, without any `HUBGATE_*` or `NO_COLOR`
/// variable from outside.
fn hubgate(args: &[&str]) -> Output {
    let mut cmd = hubgate_command(args, "info", &[]);
    cmd.env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.output().expect("the hubgate binary runs")
}

/// Runs `hubgate args…` and requires exit 0; returns stdout.
fn hubgate_ok(args: &[&str]) -> String {
    let out = hubgate(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hubgate {args:?}: exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The test PKI and a configuration with one spooled route and `[spool] path = "spool.db"`,
/// written next to the PKI's files.
fn write_config(pki: &Pki) -> PathBuf {
    let mut config = GateConfig::new("http://127.0.0.1:9/hook");
    config.with_spool();
    config.write(pki, "hubgate.toml")
}

/// Stores `bodies` as pending events of `/webhook` in the spool at `db` (nothing delivers them).
async fn fill_spool(db: &Path, bodies: &[&str]) {
    let spool = tokio::task::block_in_place(|| Spool::open(SpoolSettings::new(db)))
        .expect("open the spool");
    for body in bodies {
        spool
            .accept(NewEvent {
                route: "/webhook".to_owned(),
                body: bytes::Bytes::copy_from_slice(body.as_bytes()),
                headers: http::HeaderMap::from_iter([(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                )]),
                query: None,
                client_identity: None,
                received_at: SystemTime::now(),
                update_key: None,
            })
            .await
            .expect("the spool stores the event");
    }
    spool.close().await;
}

/// The first `n` whitespace-separated fields of every line: the output without its ages, which
/// may tick over between two runs.
fn fields(stdout: &str, n: usize) -> Vec<Vec<String>> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().take(n).map(str::to_owned).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn spool_options_are_accepted_before_and_after_the_subcommand() {
    let pki = Pki::new();
    let config = write_config(&pki);
    let config = config.to_str().unwrap();
    let db = pki.path(SPOOL_DB);
    fill_spool(&db, &[r#"{"n":1}"#, r#"{"n":2}"#]).await;
    let db = db.to_str().unwrap();

    let before = hubgate_ok(&["spool", "--config", config, "summary"]);
    let after = hubgate_ok(&["spool", "summary", "--config", config]);
    assert_eq!(fields(&before, 4), fields(&after, 4), "{before}\n{after}");
    assert!(
        fields(&after, 4).contains(&vec![
            "/webhook".to_owned(),
            "2".to_owned(),
            "0".to_owned(),
            "0".to_owned()
        ]),
        "the summary counts the 2 pending events: {after}"
    );

    // Every subcommand, every spool option (--path, --config, --json), in either place.
    let before = hubgate_ok(&["spool", "--path", db, "list", "--state", "pending"]);
    let after = hubgate_ok(&["spool", "list", "--state", "pending", "--path", db]);
    assert_eq!(fields(&before, 5), fields(&after, 5), "{before}\n{after}");
    assert_eq!(after.lines().count(), 3, "a header and 2 events: {after}");

    let before = hubgate_ok(&["spool", "--config", config, "--json", "show", "1"]);
    let after = hubgate_ok(&["spool", "show", "1", "--json", "--config", config]);
    let id_and_body = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).expect("JSON");
        (v["id"].clone(), v["body"].clone())
    };
    assert_eq!(id_and_body(&before), id_and_body(&after));
    assert_eq!(id_and_body(&after).1, r#"{"n":1}"#);

    // Nothing is dead: replay and purge find nothing, wherever --path is.
    assert_eq!(
        hubgate_ok(&["spool", "--path", db, "replay", "--all-dead"]),
        hubgate_ok(&["spool", "replay", "--all-dead", "--path", db])
    );
    assert_eq!(
        hubgate_ok(&["spool", "--path", db, "purge", "--older-than", "1d"]),
        hubgate_ok(&["spool", "purge", "--older-than", "1d", "--path", db])
    );
}

#[test]
fn check_takes_the_log_format_before_or_after_the_subcommand() {
    let pki = Pki::new();
    let config = write_config(&pki);
    let config = config.to_str().unwrap();
    let before = hubgate_ok(&["--log-format", "json", "check", "--config", config]);
    let after = hubgate_ok(&["check", "--config", config, "--log-format", "json"]);
    assert_eq!(before, after);
    assert!(
        after.contains("/webhook"),
        "the summary names the route: {after}"
    );
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    // Neither terminal nor NO_COLOR: stderr is a pipe, and NO_COLOR is removed from the child.
    let out = hubgate(&["demo", "--listen", "127.0.0.1:0", "--exit-after-selftest"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo's self-test passes: exit {:?}\nstdout: {}\nstderr: {stderr}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("hubgate::access") && stderr.contains("verdict=\"forwarded\""),
        "the demo logs its requests: {stderr}"
    );
    assert!(
        !stderr.contains("\x1b["),
        "no ANSI escape in piped logs: {stderr:?}"
    );
}
