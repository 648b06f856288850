//! A real headless Chromium (Debian's `chromium`), driven over the Chrome DevTools Protocol on
//! 127.0.0.1: navigate, evaluate JavaScript in the page, wait for a condition. The browser gets
//! a fresh profile and every flag that keeps it off the network; it is killed when dropped.
//!
//! Calls block (a WebSocket): they run under `block_in_place`, so tests using this need the
//! multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`) for the gate to go on
//! serving meanwhile.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Where Chromium is: `HUBGATE_CHROMIUM`, else `chromium` on the PATH. `None` (the test returns
/// early) unless `HUBGATE_REQUIRE_CHROMIUM=1`, which `.ci/run` sets after installing it.
pub fn chromium() -> Option<PathBuf> {
    let given = hubgate::config::process_env("HUBGATE_CHROMIUM").map(PathBuf::from);
    let found = given.or_else(|| {
        let path = hubgate::config::process_env("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            hubgate::config::process_env("HUBGATE_REQUIRE_CHROMIUM").as_deref() != Some("1"),
            "HUBGATE_REQUIRE_CHROMIUM=1 but no chromium (set HUBGATE_CHROMIUM or install it)"
        );
        eprintln!("skipped: no chromium (apt-get install chromium, or set HUBGATE_CHROMIUM)");
    }
    found
}

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

const WITHIN: Duration = Duration::from_secs(20);

impl Browser {
    /// Starts Chromium on `about:blank` and connects to its page.
    pub fn launch(path: &std::path::Path) -> Browser {
        tokio::task::block_in_place(|| Self::launch_blocking(path))
    }

    fn launch_blocking(path: &std::path::Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(path)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it took, and the browser's WebSocket path, to this file.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + WITHIN;
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break p;
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let page_ws = loop {
            let list = http_get_blocking(port, "/json/list");
            let pages: Value = serde_json::from_str(&list).unwrap_or(Value::Null);
            let found = pages.as_array().and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if let Some(u) = found {
                break u;
            }
            assert!(Instant::now() < deadline, "chromium has no page");
            std::thread::sleep(Duration::from_millis(50));
        };
        let (ws, _) = tungstenite::connect(page_ws.as_str()).expect("connect to the page");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(WITHIN)).unwrap();
        }
        let mut b = Browser {
            child,
            _profile: profile,
            ws,
            next_id: 1,
        };
        b.call_blocking("Page.enable", json!({}));
        b.call_blocking("Runtime.enable", json!({}));
        b
    }

    /// One DevTools command and its result (events arriving meanwhile are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        tokio::task::block_in_place(|| self.call_blocking(method, params))
    }

    fn call_blocking(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().expect("a DevTools message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value; a thrown error
    /// fails the test.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Loads `url` and waits for the document to be complete.
    pub fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'");
    }

    /// Polls `expr` until it is truthy; returns its value. Fails after 20 s with the last one.
    pub fn wait_for(&mut self, expr: &str) -> Value {
        let deadline = Instant::now() + WITHIN;
        loop {
            let v = self.eval(expr);
            let truthy =
                !matches!(v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "not within {WITHIN:?}: {expr} (last: {v})"
            );
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(50)));
        }
    }

    /// A PNG of the page as it is.
    pub fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        decode_base64(r["data"].as_str().expect("image data"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get_blocking(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    // Read the head, then as many body bytes as Content-Length says (the DevTools server may
    // keep the connection open).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(usize::MAX);
            if body.len() >= len {
                return body[..len].to_owned();
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                return text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default()
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Standard base64, as DevTools sends images.
pub fn decode_base64(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = alphabet.iter().position(|&a| a == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}
