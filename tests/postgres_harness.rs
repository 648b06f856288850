//! The PostgreSQL harness itself (`common::postgres`): a shared server with isolated databases,
//! the settings the spool relies on, a dedicated server stopped, crashed and started again, a
//! TLS server verified by name, and no server or temp folder left behind when a test process
//! ends, however it ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_fresh_database_accepts_queries_through_psql() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    db.psql("CREATE TABLE t (id bigint PRIMARY KEY, body text NOT NULL)");
    db.psql("INSERT INTO t VALUES (1, 'één'), (2, 'two')");
    assert_eq!(
        db.psql("SELECT id, body FROM t ORDER BY id"),
        "1|één\n2|two"
    );
    assert_eq!(db.psql("SELECT current_database()"), db.name());
    assert!(
        db.url().starts_with(&format!(
            "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
            pg.port(),
            db.name()
        )),
        "{}",
        db.url()
    );
}

#[test]
fn two_fresh_databases_are_distinct() {
    let Some(pg) = postgres() else { return };
    let (a, b) = (pg.fresh_database(), pg.fresh_database());
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());
    a.psql("CREATE TABLE only_in_a (x int); INSERT INTO only_in_a VALUES (7)");
    assert_eq!(a.psql("SELECT x FROM only_in_a"), "7");
    let err = b.try_psql("SELECT x FROM only_in_a").unwrap_err();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn tests_may_create_databases_at_the_same_time() {
    let Some(pg) = postgres() else { return };
    let names: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                s.spawn(move || {
                    let db = pg.fresh_database();
                    db.psql(&format!("CREATE TABLE t AS SELECT {i} AS i"));
                    assert_eq!(db.psql("SELECT i FROM t"), i.to_string());
                    db.name().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "{names:?}");
}

#[test]
fn the_shared_server_is_durable_utf8_and_loopback_only() {
    let Some(pg) = postgres() else { return };
    let show = |name: &str| pg.psql(&format!("SHOW {name}"));
    assert_eq!(show("fsync"), "on");
    assert_eq!(show("synchronous_commit"), "on");
    assert_eq!(show("max_connections"), "200");
    assert_eq!(show("listen_addresses"), "127.0.0.1");
    assert_eq!(show("server_encoding"), "UTF8");
    assert_eq!(show("ssl"), "off");
    assert_eq!(show("port"), pg.port().to_string());
    // The shared server is the same for every test of this binary.
    assert!(std::ptr::eq(pg, postgres().unwrap()));
}

#[test]
fn a_dedicated_server_stops_and_starts_again_with_its_data() {
    let Some(mut pg) = dedicated() else { return };
    let db = pg.fresh_database();
    db.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    let port = pg.port();

    pg.stop();
    let err = db.try_psql("SELECT 1").unwrap_err();
    assert!(
        err.contains("Connection refused") || err.contains("connection to server"),
        "{err}"
    );
    pg.start();
    assert_eq!(pg.port(), port);
    assert_eq!(db.psql("SELECT x FROM t"), "1");

    // A crash (no shutdown checkpoint) keeps what was committed.
    db.psql("INSERT INTO t VALUES (2)");
    pg.kill();
    assert!(db.try_psql("SELECT 1").is_err());
    pg.start();
    assert_eq!(db.psql("SELECT x FROM t ORDER BY x"), "1\n2");

    pg.restart();
    assert_eq!(db.psql("SELECT count(*) FROM t"), "2");
}

#[test]
fn dropping_a_dedicated_server_stops_it_and_removes_its_folder() {
    let Some(pg) = dedicated() else { return };
    let data = pg.data_dir();
    let pid = postmaster_pid(&data);
    assert!(alive(pid));
    drop(pg);
    assert!(!data.exists(), "{} still exists", data.display());
    assert!(
        wait_until(Duration::from_secs(5), || !alive(pid)),
        "postmaster {pid} still runs"
    );
}

#[test]
#[should_panic(expected = "the test failed")]
fn a_panicking_test_still_stops_its_dedicated_server() {
    let Some(pg) = dedicated() else {
        panic!("the test failed (no PostgreSQL here)")
    };
    let db = pg.fresh_database();
    db.psql("SELECT 1");
    // Unwinding drops `pg`, which stops the server; `…_leaves_nothing_behind` checks the
    // process-exit path that the shared server relies on.
    panic!("the test failed");
}

#[test]
fn a_tls_server_is_verified_by_name_and_rejects_plain_tcp() {
    let pki = Pki::new();
    let Some(pg) = dedicated_tls(&pki) else {
        return;
    };
    assert!(pg.is_tls());
    assert_eq!(pg.psql("SHOW ssl"), "on");
    let db = pg.fresh_database();
    let root = pki.path("root.pem");
    let in_tls = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // The default URL of a TLS server uses TLS.
    assert!(db.url().ends_with("?sslmode=require"), "{}", db.url());
    assert_eq!(db.psql(in_tls), "t");

    // verify-full as a URL and as key=value conninfo (the certificate names 127.0.0.1).
    assert_eq!(
        db.psql_with(&db.url_verify_full(&root), in_tls).unwrap(),
        "t"
    );
    let conninfo = format!(
        "sslmode=verify-full sslrootcert={} host=127.0.0.1 port={} user=postgres dbname={}",
        root.display(),
        pg.port(),
        db.name()
    );
    assert_eq!(db.psql_with(&conninfo, in_tls).unwrap(), "t");

    // Without TLS: rejected by pg_hba.conf.
    let plain = db
        .psql_with(&format!("{}?sslmode=disable", db.base_url()), "SELECT 1")
        .unwrap_err();
    assert!(plain.contains("no encryption"), "{plain}");

    // Another CA's root does not verify the server.
    let other = Pki::new();
    let wrong = db
        .psql_with(&db.url_verify_full(&other.path("root.pem")), "SELECT 1")
        .unwrap_err();
    assert!(wrong.contains("certificate verify failed"), "{wrong}");

    // The key was written for the server's user only.
    use std::os::unix::fs::MetadataExt;
    let key = std::fs::metadata(pg.data_dir().join("server.key")).unwrap();
    assert_eq!(key.mode() & 0o777, 0o600);
    assert_eq!(
        key.uid(),
        std::fs::metadata(pg.data_dir()).unwrap().uid(),
        "server.key is owned by the data directory's owner"
    );
}

// ---------------------------------------------------------------------------------------------
// Cleanup when the test process ends
// ---------------------------------------------------------------------------------------------

/// Set on the child process of [`a_test_process_that_dies_leaves_nothing_behind`].
const CHILD_VAR: &str = "HUBGATE_PG_HARNESS_CHILD";

/// Not a test on its own: run by the test below in a child process, where it starts the shared
/// server (a static, never dropped), prints its data directory and dies as `CHILD_VAR` says.
#[test]
fn child_that_dies_holding_the_shared_server() {
    let Some(how) = hubgate::config::process_env(CHILD_VAR) else {
        return;
    };
    let shared = postgres().expect("PostgreSQL is installed in the parent");
    shared.fresh_database().psql("SELECT 1");
    println!("\nDATA {}", shared.data_dir().display());
    match how.as_str() {
        "abort" => std::process::abort(),
        _ => panic!("the child test panics"),
    }
}

#[test]
fn a_test_process_that_dies_leaves_nothing_behind() {
    if postgres().is_none() {
        return;
    }
    for how in ["panic", "abort"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_that_dies_holding_the_shared_server",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD_VAR, how)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dirs: Vec<PathBuf> = stdout
            .lines()
            .filter_map(|l| l.find("DATA ").map(|at| PathBuf::from(&l[at + 5..])))
            .collect();
        assert_eq!(
            dirs.len(),
            1,
            "child ({how}) output:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for data in dirs {
            let folder = data.parent().unwrap().to_path_buf();
            assert!(
                wait_until(Duration::from_secs(15), || !folder.exists()),
                "{} left behind after the child's {how}",
                folder.display()
            );
            let running = postmasters_of(&data);
            assert!(
                running.is_empty(),
                "postgres {running:?} on {} still runs after the child's {how}",
                data.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn postmaster_pid(data: &Path) -> u32 {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// Whether `pid` runs (exists and is not a zombie waiting for init to reap it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// The processes whose command line names `data` (a postmaster started with `-D`).
fn postmasters_of(data: &Path) -> Vec<String> {
    // (A zombie's command line is empty: `[postgres] <defunct>` does not match.)
    let out = Command::new("ps")
        .args(["-eo", "pid=,args="])
        .output()
        .unwrap();
    let needle = data.to_string_lossy().into_owned();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("postgres"))
        .map(|l| l.trim().to_owned())
        .collect()
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ok()
}
