//! A real, throwaway PostgreSQL for integration tests: `initdb` into a fresh temp folder, a
//! server on a free 127.0.0.1 port (plus a Unix socket inside that folder), trust
//! authentication for the superuser `postgres`, `fsync=on` and `synchronous_commit=on`.
//!
//! - [`postgres`]: one server per test binary, started on first use and shared by its tests;
//!   each test takes its own database with [`Postgres::fresh_database`];
//! - [`dedicated`]: a private server for one test, which may stop and start it (stopped and
//!   removed when dropped);
//! - [`dedicated_tls`] / [`dedicated_tls_with`]: a private server that only accepts TLS on TCP
//!   (`hostssl`), with a certificate made in the test (rcgen, see [`super::Pki`]).
//!
//! Where no PostgreSQL binaries are found the functions print one line naming the package to
//! install and return `None` (tests then return early), unless `HUBGATE_REQUIRE_POSTGRES=1`,
//! which turns that into a panic (CI sets it).
//!
//! Run as root (CI), `initdb`/`pg_ctl` run as the `postgres` system user through `runuser`, in
//! a temp folder that user owns; otherwise as the current user.
//!
//! Cleanup: statics are never dropped and test binaries have no teardown, so every server gets
//! a watchdog (`sh`) whose stdin is a pipe held by the test process. When the test process
//! ends, however it ends (success, panic, `SIGKILL`), the kernel closes the pipe; the watchdog
//! reads EOF, stops the server (`pg_ctl stop -m immediate`) and removes the temp folder.
//! Dropping a [`Postgres`] closes the pipe and waits for the watchdog, so the same cleanup runs
//! synchronously.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use super::Pki;

/// The superuser `initdb` creates (`-U`), the user in every URL.
pub const PG_SUPERUSER: &str = "postgres";
/// The variable that turns "no PostgreSQL installed" from a skip into a failure.
pub const PG_REQUIRE_VAR: &str = "HUBGATE_REQUIRE_POSTGRES";
/// What to do when the binaries are missing.
pub const PG_INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, pg_ctl, postgres) not \
     found: `apt-get install postgresql` (Debian), or set HUBGATE_PG_BINDIR";

/// Seconds `pg_ctl` waits for the server to accept connections (or to stop).
const START_TIMEOUT_SECS: u32 = 60;

/// Libpq variables of the test process's environment that would change what the harness's
/// `psql`/`pg_ctl` connect to; removed from every command it runs.
const PG_VARS: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLCRL",
    "PGREQUIRESSL",
    "PGTARGETSESSIONATTRS",
    "PGDATA",
    "PGCONNECT_TIMEOUT",
];

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// The test binary's shared server, started on first use; `None` (after one line on stderr)
/// when PostgreSQL is not installed and `HUBGATE_REQUIRE_POSTGRES` is not `1`.
/// It cannot be stopped (`stop`/`start` take `&mut self`): use [`dedicated`] for that.
pub fn postgres() -> Option<&'static Postgres> {
    static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
    SHARED
        .get_or_init(|| installation().map(|_| Postgres::launch(Tls::Off, "shared")))
        .as_ref()
}

/// A private server for one test (it may [`Postgres::stop`] and [`Postgres::start`] it);
/// stopped and removed when dropped. `None` as for [`postgres`].
pub fn dedicated() -> Option<Postgres> {
    installation()?;
    Some(Postgres::launch(Tls::Off, "dedicated"))
}

/// A private server with `ssl=on` and the [`Pki`]'s server certificate (127.0.0.1 and
/// localhost, chain `server-chain.pem`, key `server.key`): clients verify it against
/// `pki.path("root.pem")` (see [`Database::url_verify_full`]). TCP connections without TLS are
/// rejected (`hostnossl … reject`). `None` as for [`postgres`].
pub fn dedicated_tls(pki: &Pki) -> Option<Postgres> {
    let read = |name: &str| {
        std::fs::read_to_string(pki.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    };
    dedicated_tls_with(&read("server-chain.pem"), &read("server.key"))
}

/// [`dedicated_tls`] with any certificate chain (PEM, leaf first) and private key (PEM), e.g.
/// one with the wrong name or expired, made with rcgen in the test.
pub fn dedicated_tls_with(cert_chain_pem: &str, key_pem: &str) -> Option<Postgres> {
    installation()?;
    Some(Postgres::launch(
        Tls::On {
            cert_chain_pem: cert_chain_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        },
        "dedicated-tls",
    ))
}

// ---------------------------------------------------------------------------------------------
// Finding the installation
// ---------------------------------------------------------------------------------------------

/// Where the binaries are and whom they run as.
struct Installation {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`.
    bindir: PathBuf,
    psql: PathBuf,
    /// `Some("postgres")` when the test runs as root (`runuser -u postgres --`).
    run_as: Option<RunAs>,
}

struct RunAs {
    user: String,
    uid: u32,
    gid: u32,
}

/// The installation, looked up once; `None` after printing [`PG_INSTALL_HINT`] once, or a panic
/// when `HUBGATE_REQUIRE_POSTGRES=1`.
fn installation() -> Option<&'static Installation> {
    static FOUND: OnceLock<Result<Installation, String>> = OnceLock::new();
    static WARNED: Once = Once::new();
    match FOUND.get_or_init(find_installation) {
        Ok(found) => Some(found),
        Err(why) => {
            if hubgate::config::process_env(PG_REQUIRE_VAR).as_deref() == Some("1") {
                panic!("{PG_REQUIRE_VAR}=1 but {why}");
            }
            // Straight to the stderr stream: libtest captures `eprintln!` of passing tests.
            WARNED.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "!!!!! {why}; the PostgreSQL tests are SKIPPED \
                     ({PG_REQUIRE_VAR}=1 makes them fail instead) !!!!!"
                );
            });
            None
        }
    }
}

fn find_installation() -> Result<Installation, String> {
    let bindir = find_bindir().ok_or_else(|| PG_INSTALL_HINT.to_owned())?;
    let psql = [bindir.join("psql")]
        .into_iter()
        .chain(on_path("psql"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "psql not found (in {} or PATH): {PG_INSTALL_HINT}",
                bindir.display()
            )
        })?;
    let run_as = if id(&["-u"])? == 0 {
        let user = "postgres";
        let uid = id(&["-u", user]).map_err(|e| {
            format!("running as root, but there is no `{user}` system user to run the server as ({e}): {PG_INSTALL_HINT}")
        })?;
        let gid = id(&["-g", user])?;
        Some(RunAs {
            user: user.to_owned(),
            uid,
            gid,
        })
    } else {
        None
    };
    Ok(Installation {
        bindir,
        psql,
        run_as,
    })
}

/// `HUBGATE_PG_BINDIR`, else the newest `/usr/lib/postgresql/N/bin` (Debian, Ubuntu), else
/// the directory of `initdb` on PATH.
fn find_bindir() -> Option<PathBuf> {
    let complete = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(dir) = hubgate::config::process_env("HUBGATE_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return complete(&dir).then_some(dir);
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| complete(bin))
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    on_path("initdb")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| complete(d))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = hubgate::config::process_env("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `id ARGS…` as a number.
fn id(args: &[&str]) -> Result<u32, String> {
    let out = Command::new("id")
        .args(args)
        .output()
        .map_err(|e| format!("run `id`: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            format!(
                "`id {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

enum Tls {
    Off,
    On {
        cert_chain_pem: String,
        key_pem: String,
    },
}

/// A running (or, for a dedicated server, stopped) PostgreSQL cluster in a temp folder.
pub struct Postgres {
    install: &'static Installation,
    /// The temp folder: `data/`, `sock/`, `server.log`.
    dir: PathBuf,
    port: u16,
    tls: bool,
    running: bool,
    /// The write end of the watchdog's stdin; closing it makes the watchdog clean up.
    watchdog_stdin: Mutex<Option<ChildStdin>>,
    watchdog: Mutex<Option<Child>>,
}

impl Postgres {
    /// initdb + configure + start, with the watchdog in place before anything else so that a
    /// failure half-way (a panic here drops `self`) still removes everything.
    fn launch(tls: Tls, what: &str) -> Postgres {
        let install = installation().expect("checked by the caller");
        let dir = tempfile::Builder::new()
            .prefix("hubgate-pg-")
            .tempdir()
            .expect("create a temp folder for PostgreSQL")
            .keep();
        let mut pg = Postgres {
            install,
            dir,
            port: 0,
            tls: matches!(tls, Tls::On { .. }),
            running: false,
            watchdog_stdin: Mutex::new(None),
            watchdog: Mutex::new(None),
        };
        pg.spawn_watchdog();
        let started = std::time::Instant::now();
        pg.chown(&pg.dir);
        std::fs::set_permissions(&pg.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        pg.initdb();
        pg.configure(&tls);
        pg.start_on_a_free_port();
        if hubgate::config::process_env("HUBGATE_PG_VERBOSE").is_some() {
            eprintln!(
                "postgres ({what}) ready on 127.0.0.1:{} in {:?} ({})",
                pg.port,
                started.elapsed(),
                pg.dir.display()
            );
        }
        pg
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the server's Unix socket (`host=` for a local connection).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The 127.0.0.1 port the server listens on (the same across stop/start).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser in the URLs.
    pub fn user(&self) -> &'static str {
        PG_SUPERUSER
    }

    /// Whether TCP connections must use TLS (a [`dedicated_tls`] server).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The server's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME` without any parameters.
    pub fn base_url(&self, database: &str) -> String {
        format!(
            "postgres://{PG_SUPERUSER}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// A new, empty database with a unique name (`t_N`), so tests sharing a server are isolated.
    pub fn fresh_database(&self) -> Database {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("t_{}", N.fetch_add(1, Ordering::Relaxed));
        self.psql_in("postgres", &format!("CREATE DATABASE {name}"));
        Database {
            name,
            base_url: self.base_url(""),
            tls: self.tls,
            psql: self.install.psql.clone(),
        }
    }

    /// Runs SQL through psql as the superuser in the `postgres` database; its output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    fn psql_in(&self, database: &str, sql: &str) -> String {
        let url = url_with_mode(&self.base_url(database), self.tls);
        run_psql(&self.install.psql, &url, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`); data and port are kept for
    /// [`Postgres::start`]. Only for a server the test owns ([`dedicated`]).
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint, recovery
    /// on the next start).
    pub fn kill(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts a stopped server again, on the same port with the same data.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// [`Postgres::stop`] then [`Postgres::start`].
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        assert!(self.running, "the server is not running");
        let data = self.data_dir();
        let out = self
            .as_server_user(&self.install.bindir.join("pg_ctl"))
            .args(["stop", "-w", "-m", mode, "-t"])
            .arg(START_TIMEOUT_SECS.to_string())
            .arg("-D")
            .arg(&data)
            .output()
            .expect("run pg_ctl stop");
        check(&out, "pg_ctl stop", &self.log());
        self.running = false;
    }

    fn try_start(&mut self) -> Result<(), String> {
        assert!(!self.running, "the server is already running");
        let out = self
            .as_server_user(&self.install.bindir.join("pg_ctl"))
            .args(["start", "-w", "-t"])
            .arg(START_TIMEOUT_SECS.to_string())
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run pg_ctl start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start on 127.0.0.1:{} failed ({}):\n{}{}\n--- server log ---\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ));
        }
        self.running = true;
        Ok(())
    }

    /// Picks a free port and starts; another process may take the port between our probe and
    /// the server's bind, so a few attempts.
    fn start_on_a_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            self.port = free_port();
            self.write_server_file(
                "data/conf.d/port.conf",
                &format!("port = {}\n", self.port),
                0o600,
            );
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start: {last}");
    }

    fn initdb(&self) {
        let out = self
            .as_server_user(&self.install.bindir.join("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "--username",
                PG_SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                // The throwaway cluster's files need not reach the disk; the server runs with
                // fsync=on all the same.
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        check(&out, "initdb", "");
    }

    /// `conf.d/*.conf` (included from postgresql.conf), pg_hba.conf, and for TLS the
    /// certificate and key (0600, owned by the server's user).
    fn configure(&self, tls: &Tls) {
        let sock = self.socket_dir();
        std::fs::create_dir(&sock).unwrap();
        self.chown(&sock);
        std::fs::create_dir(self.dir.join("data/conf.d")).unwrap();
        self.chown(&self.dir.join("data/conf.d"));
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             max_connections = 200\n\
             shared_buffers = 32MB\n\
             log_min_messages = warning\n\
             log_connections = off\n\
             datestyle = 'iso, ymd'\n\
             timezone = 'UTC'\n",
            sock.display()
        );
        let hba = match tls {
            Tls::Off => {
                conf.push_str("ssl = off\n");
                "local all all trust\n\
                 host all all 127.0.0.1/32 trust\n"
            }
            Tls::On {
                cert_chain_pem,
                key_pem,
            } => {
                self.write_server_file("data/server.crt", cert_chain_pem, 0o600);
                self.write_server_file("data/server.key", key_pem, 0o600);
                conf.push_str(
                    "ssl = on\n\
                     ssl_cert_file = 'server.crt'\n\
                     ssl_key_file = 'server.key'\n\
                     ssl_min_protocol_version = 'TLSv1.2'\n",
                );
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all all reject\n"
            }
        };
        self.write_server_file("data/conf.d/hubgate.conf", &conf, 0o600);
        self.write_server_file("data/pg_hba.conf", hba, 0o600);
        let main = self.dir.join("data/postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&main)
            .unwrap();
        writeln!(f, "\ninclude_dir = 'conf.d'").unwrap();
    }

    /// Writes a file under the temp folder, owned by the server's user, with `mode`.
    fn write_server_file(&self, relative: &str, text: &str, mode: u32) {
        let path = self.dir.join(relative);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        self.chown(&path);
    }

    fn chown(&self, path: &Path) {
        if let Some(r) = &self.install.run_as {
            std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))
                .unwrap_or_else(|e| panic!("chown {} to {}: {e}", path.display(), r.user));
        }
    }

    /// `program` run as the server's user (through runuser when we are root), in the temp
    /// folder (the server's user may not enter the test's working directory).
    fn as_server_user(&self, program: &Path) -> Command {
        let mut cmd = match &self.install.run_as {
            Some(r) => {
                let mut c = Command::new("runuser");
                c.args(["-u", &r.user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.current_dir(&self.dir);
        for v in PG_VARS {
            cmd.env_remove(v);
        }
        cmd
    }

    /// The watchdog: `sh` reading its stdin (a pipe only this process holds, close-on-exec)
    /// until EOF, then stopping the server and removing the temp folder. It runs in its own
    /// process group and ignores SIGINT, SIGHUP and SIGTERM besides: whatever ends the test
    /// process ends the watchdog's wait, and must not end the watchdog first.
    fn spawn_watchdog(&self) {
        const SCRIPT: &str = r#"
trap '' INT HUP TERM
cleanup() {
    if [ -f "$2/postmaster.pid" ]; then
        $4 "$1" stop -D "$2" -m immediate -w -t 30 >/dev/null 2>&1
    fi
    rm -rf "$3"
    exit 0
}
cat >/dev/null
cleanup "$@"
"#;
        let run_as = match &self.install.run_as {
            Some(r) => format!("runuser -u {} --", r.user),
            None => String::new(),
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("hubgate-pg-watchdog")
            .arg(self.install.bindir.join("pg_ctl"))
            .arg(self.data_dir())
            .arg(&self.dir)
            .arg(run_as)
            .current_dir("/")
            // Its own process group: a signal to the test's group (Ctrl-C, a CI job's SIGKILL)
            // ends the test process but not the watchdog, which then cleans up.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the PostgreSQL watchdog");
        *self.watchdog_stdin.lock().unwrap() = child.stdin.take();
        *self.watchdog.lock().unwrap() = Some(child);
    }
}

impl Drop for Postgres {
    /// Closes the watchdog's pipe and waits for it: the server is stopped (immediate) and the
    /// temp folder removed before the drop returns. (The shared server is never dropped; its
    /// watchdog does the same when the test process exits.)
    fn drop(&mut self) {
        drop(self.watchdog_stdin.lock().unwrap().take());
        if let Some(mut child) = self.watchdog.lock().unwrap().take() {
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("tls", &self.tls)
            .field("running", &self.running)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// A database
// ---------------------------------------------------------------------------------------------

/// One database on a server, made by [`Postgres::fresh_database`]. It holds only connection
/// details (it can be cloned and moved into tasks); it is removed with its server.
#[derive(Clone, Debug)]
pub struct Database {
    name: String,
    /// `postgres://postgres@127.0.0.1:PORT/`
    base_url: String,
    tls: bool,
    psql: PathBuf,
}

impl Database {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME?sslmode=disable` (on a TLS server:
    /// `sslmode=require`, since it rejects TCP without TLS).
    pub fn url(&self) -> String {
        url_with_mode(&self.base_url(), self.tls)
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME` with no parameters, for tests that add their own.
    pub fn base_url(&self) -> String {
        format!("{}{}", self.base_url, self.name)
    }

    /// `…/NAME?sslmode=verify-full&sslrootcert=ROOT` (ROOT: the CA's PEM file, e.g.
    /// `pki.path("root.pem")`).
    pub fn url_verify_full(&self, root_pem: &Path) -> String {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            self.base_url(),
            percent_encoding::utf8_percent_encode(
                &root_pem.to_string_lossy(),
                percent_encoding::NON_ALPHANUMERIC
            )
        )
    }

    /// Runs SQL (one or more statements) through `psql` in this database: the rows, unaligned,
    /// `|`-separated, one per line, trailing newline trimmed. Panics with psql's output on error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Database::psql`] returning psql's failure (e.g. with the server stopped) as `Err`.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        run_psql(&self.psql, &self.url(), sql)
    }

    /// [`Database::try_psql`] with a connection string of the test's choosing (URL or
    /// `key=value` conninfo), e.g. to check TLS settings.
    pub fn psql_with(&self, conninfo: &str, sql: &str) -> Result<String, String> {
        run_psql(&self.psql, conninfo, sql)
    }
}

fn url_with_mode(base: &str, tls: bool) -> String {
    format!("{base}?sslmode={}", if tls { "require" } else { "disable" })
}

/// `psql -X -q -A -t -v ON_ERROR_STOP=1 -d CONNINFO -f -` with `sql` on stdin.
fn run_psql(psql: &Path, conninfo: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(psql);
    for v in PG_VARS {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .env("PGCONNECT_TIMEOUT", "10")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(conninfo)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {}: {e}", psql.display()))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .map_err(|e| format!("write to psql: {e}"))?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_owned())
    } else {
        Err(format!(
            "psql {conninfo} failed ({}) on:\n{sql}\n--- stdout ---\n{}--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn check(out: &Output, what: &str, log: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        if log.is_empty() {
            String::new()
        } else {
            format!("\n--- server log ---\n{log}")
        }
    );
}
