//! The `hubgate` binary Cargo built for this test run: one-shot commands (`check`, `sign`,
//! `spool`, `demo`) with their output, and `hubgate run` as a child process whose log is
//! collected line by line and which can be signalled. Every child starts without the
//! `HUBGATE_*` variables of the test process; what a test passes is set on the child only.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The path of the hubgate binary built by Cargo for this test run.
pub fn hubgate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hubgate"))
}

/// `hubgate ARGS…` with every inherited `HUBGATE_*` variable removed, `RUST_LOG` set to
/// `rust_log`, and `env` added (on the child only).
pub fn hubgate_command(args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(hubgate_bin());
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HUBGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", rust_log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `hubgate ARGS…` to completion with `stdin`, logging at `warn`; its output.
pub fn hubgate_output(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = hubgate_command(args, "warn", env);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the hubgate binary runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// [`hubgate_output`] off the async runtime's threads.
pub async fn hubgate_output_async(args: &[&str], stdin: &[u8]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hubgate_output(&args, &stdin, &[])
    })
    .await
    .unwrap()
}

/// Removes ANSI colour sequences (`ESC [ … letter`) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `hubgate` binary as a child process, its stderr collected line by line (ANSI stripped).
/// Dropping it kills the process.
pub struct Hubgate {
    child: Mutex<std::process::Child>,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Hubgate {
    /// Spawns the binary with `args` (see [`hubgate_command`]), `RUST_LOG=info`, no colours,
    /// and `env`; the working directory is `cwd`.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Hubgate {
        let mut cmd = hubgate_command(args, "info", env);
        cmd.env("NO_COLOR", "1")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn hubgate");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        Hubgate {
            child: Mutex::new(child),
            logs,
            reader: Some(reader),
        }
    }

    /// `hubgate run --config CONFIG` in the config's folder, waited for until it listens;
    /// with the webhook address from its log.
    pub async fn run_config(config: &Path) -> (Hubgate, SocketAddr) {
        let dir = config.parent().expect("the config's folder");
        let child = Hubgate::spawn(&["run", "--config", config.to_str().unwrap()], &[], dir);
        let addr = child.logged_addr("hubgate listening", "listen").await;
        (child, addr)
    }

    pub fn pid(&self) -> String {
        self.child.lock().unwrap().id().to_string()
    }

    /// Sends a signal with `kill -SIG PID`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Sends SIGHUP and waits (bounded) for a log line after it containing `needle`
    /// (`configuration reloaded`, `reload failed`).
    pub async fn sighup(&self, needle: &str) {
        let mark = self.log_count();
        self.signal("HUP");
        self.wait_log(mark, needle, Duration::from_secs(10)).await;
    }

    /// SIGKILL, reap, and the whole log (read to its end).
    pub fn kill9(mut self) -> Vec<String> {
        {
            let mut child = self.child.lock().unwrap();
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.logs()
    }

    /// Everything logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn log_count(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    /// Waits (bounded) for a log line at index `from` or later containing `needle`; returns
    /// the line's index and text. Panics with the log on timeout or when the process exits.
    pub async fn wait_log(&self, from: usize, needle: &str, within: Duration) -> (usize, String) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let logs = self.logs.lock().unwrap();
                if let Some((i, l)) = logs
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| l.contains(needle))
                {
                    return (i, l.clone());
                }
            }
            let exited = self.child.lock().unwrap().try_wait().expect("try_wait");
            if let Some(status) = exited {
                // Let the reader drain what the process wrote last.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "hubgate exited ({status}) without logging {needle:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "no log line containing {needle:?} within {within:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address logged as `KEY=ADDR` in the first line containing `needle`.
    pub async fn logged_addr(&self, needle: &str, key: &str) -> SocketAddr {
        let (_, line) = self.wait_log(0, needle, Duration::from_secs(15)).await;
        let token = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
        token
            .trim_matches('"')
            .parse()
            .unwrap_or_else(|_| panic!("bad address in {line:?}"))
    }

    /// Whether the process is still running.
    pub fn running(&self) -> bool {
        self.child
            .lock()
            .unwrap()
            .try_wait()
            .expect("try_wait")
            .is_none()
    }

    /// Waits (bounded) for the process to exit; `None` on timeout.
    pub async fn wait_exit(&self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.lock().unwrap().try_wait().expect("try_wait") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Hubgate {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
