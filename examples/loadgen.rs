//! The benchmark's load generator (bench/run.sh drives it). It speaks HTTP/1.1 over rustls with
//! a client certificate, sends Meta-shaped bodies signed with `X-Hub-Signature-256`, and prints
//! one JSON line per run. Single-threaded on purpose: the benchmark pins it to one core.
//!
//! Subcommands:
//! - `load`: keep-alive or new-connection-per-request POSTs, or GET challenges, for a fixed time
//!   after a warm-up: requests/s, p50/p90/p99 latency, errors, CPU of the system under test.
//! - `check`: proves a system does the whole job before it is timed (signed POST forwarded intact,
//!   forged/unsigned/tampered POST refused, wrong-CN/rogue/no certificate refused, challenge).
//! - `idle`: opens N mTLS connections (one GET each), holds them, reports the RSS of given pids.
//! - `ready`: spawns a command and reports the time until it answers the challenge over mTLS.
//! - `report`: turns the collected JSON lines into the markdown report.
//!
//! Every loop is bounded in time; nothing here talks to anything but the given loopback address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use hmac::{Hmac, Mac};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Per-request deadline: a request slower than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CHALLENGE: &str = "1158201444";

#[derive(Parser)]
#[command(about = "Load generator for the hubgate benchmark (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Load(LoadArgs),
    Count(CountArgs),
    Check(CheckArgs),
    Idle(IdleArgs),
    Ready(ReadyArgs),
    Report(ReportArgs),
}

#[derive(Args, Clone)]
struct Target {
    /// The system's TLS listener (must be a loopback address).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    #[arg(long, default_value = "/webhook")]
    path: String,
    /// Folder made by bench/pki.sh (root.pem, client-chain.pem, client.key, …).
    #[arg(long)]
    pki: PathBuf,
    #[arg(long)]
    secret: String,
    #[arg(long)]
    verify_token: String,
    /// Extra `key=value` fields copied into the output line (system, scenario, rep, …).
    #[arg(long = "label")]
    labels: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Post,
    Get,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value = "post")]
    mode: Mode,
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// A new TCP + TLS connection (full handshake, no resumption) for every request.
    #[arg(long)]
    new_conn: bool,
    /// Concurrent connections (each sends one request at a time).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Pids of the system under test whose CPU time is measured over the timed window.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Pid of the upstream (its CPU is reported too: it shares the load generator's core).
    #[arg(long)]
    upstream_pid: Option<u32>,
    /// The benchmark upstream's address: its POST count before and after the run is compared
    /// with the 200s received, to prove every accepted event was forwarded.
    #[arg(long)]
    upstream_addr: Option<SocketAddr>,
    /// Seconds to wait after the run for the upstream to receive every accepted event (for a
    /// system that delivers later, like hubgate's spool).
    #[arg(long, default_value_t = 0.0)]
    drain_wait: f64,
}

/// A fixed number of requests with hooks around them, for cost measurements (instructions per
/// request under callgrind): connect, warm up, run `--before`, send exactly `--requests`
/// requests, wait for the upstream to have them all (deferred delivery), run `--after`.
#[derive(Args)]
struct CountArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value = "post")]
    mode: Mode,
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Concurrent keep-alive connections (each sends one request at a time).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests per connection before `--before` runs (not counted).
    #[arg(long, default_value_t = 20)]
    warmup_requests: u64,
    /// Requests counted, over all connections.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Shell command run once the warm-up is done (e.g. `callgrind_control --zero PID`).
    #[arg(long)]
    before: Option<String>,
    /// Shell command run once the counted requests are answered (and delivered, with
    /// --upstream-addr).
    #[arg(long)]
    after: Option<String>,
    /// The benchmark upstream: wait (60 s at most) until it has received every accepted POST.
    #[arg(long)]
    upstream_addr: Option<SocketAddr>,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    target: Target,
    /// The system answers 200 once an event is stored and delivers it later (hubgate's spool):
    /// check that the exact body reaches the upstream within 10 s instead of in the response.
    #[arg(long, requires = "upstream_addr")]
    deferred: bool,
    /// The benchmark upstream (for --deferred).
    #[arg(long)]
    upstream_addr: Option<SocketAddr>,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Seconds to hold the connections idle before sampling memory.
    #[arg(long, default_value_t = 3.0)]
    hold: f64,
    /// Pids whose VmRSS is summed.
    #[arg(long, value_delimiter = ',', required = true)]
    pids: Vec<u32>,
}

#[derive(Args)]
struct ReadyArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 15.0)]
    timeout: f64,
    /// The command that starts the system, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct ReportArgs {
    /// JSON lines collected by bench/run.sh.
    #[arg(long)]
    results: PathBuf,
    /// Markdown output (also printed).
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let code = match cli.command {
        Cmd::Load(a) => rt.block_on(load(a)),
        Cmd::Count(a) => rt.block_on(count(a)),
        Cmd::Check(a) => rt.block_on(check(a)),
        Cmd::Idle(a) => rt.block_on(idle(a)),
        Cmd::Ready(a) => rt.block_on(ready(a)),
        Cmd::Report(a) => report(a),
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// TLS and a minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// Which client certificate to present.
#[derive(Clone, Copy, Debug)]
enum Identity {
    Meta,
    WrongCn,
    Rogue,
    NoCert,
}

fn tls_config(pki: &Path, identity: Identity) -> Arc<ClientConfig> {
    // X25519 only: every system then does the same key exchange (rustls would otherwise offer
    // X25519MLKEM768 first, which only the rustls-based system would pick).
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("root.pem")).expect("root.pem") {
        roots.add(c.expect("root.pem")).expect("root certificate");
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let pair = match identity {
        Identity::Meta => Some(("client-chain.pem", "client.key")),
        Identity::WrongCn => Some(("wrongcn-chain.pem", "wrongcn.key")),
        Identity::Rogue => Some(("rogue-chain.pem", "rogue.key")),
        Identity::NoCert => None,
    };
    let mut config = match pair {
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(pki.join(chain))
                    .expect("client chain")
                    .collect::<Result<_, _>>()
                    .expect("client chain");
            let key = PrivateKeyDer::from_pem_file(pki.join(key)).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every new connection is a full handshake with client-certificate verification.
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

struct Conn {
    io: TlsStream<TcpStream>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

struct Resp {
    status: u16,
    body: Vec<u8>,
    close: bool,
}

fn loopback_only(addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        eprintln!("loadgen: {addr} is not a loopback address; refusing");
        std::process::exit(2);
    }
}

impl Conn {
    async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::IpAddress(addr.ip().into());
        let io = TlsConnector::from(config).connect(name, tcp).await?;
        Ok(Conn {
            io,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        })
    }

    fn tls_summary(&self) -> String {
        let c = self.io.get_ref().1;
        format!(
            "{:?} {:?} {:?}",
            c.protocol_version(),
            c.negotiated_cipher_suite().map(|s| s.suite()),
            c.negotiated_key_exchange_group().map(|g| g.name())
        )
        .replace("Some(", "")
        .replace(')', "")
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n") {
                let line = self.buf[self.start..self.start + i].to_vec();
                self.start += i + 2;
                return Ok(line);
            }
            if self.end - self.start > 64 * 1024 {
                return Err(io::Error::other("line too long"));
            }
            self.fill().await?;
        }
    }

    async fn read_body(&mut self, mut n: usize, keep: bool, out: &mut Vec<u8>) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end {
                self.fill().await?;
            }
            let take = n.min(self.end - self.start);
            if keep {
                out.extend_from_slice(&self.buf[self.start..self.start + take]);
            }
            self.start += take;
            n -= take;
        }
        Ok(())
    }

    /// Sends one request and reads the whole response.
    async fn roundtrip(&mut self, req: &[u8], keep_body: bool) -> io::Result<Resp> {
        self.io.write_all(req).await?;
        self.io.flush().await?;
        let head = loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n\r\n") {
                let head = self.buf[self.start..self.start + i].to_vec();
                self.start += i + 4;
                break head;
            }
            if self.end - self.start > 64 * 1024 {
                return Err(io::Error::other("response head too long"));
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&head);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked, mut close) =
            (None, false, status_line.starts_with("HTTP/1.0"));
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let line = self.read_line().await?;
                let size = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                    .ok_or_else(|| io::Error::other("bad chunk size"))?;
                if size == 0 {
                    while !self.read_line().await?.is_empty() {}
                    break;
                }
                self.read_body(size, keep_body, &mut body).await?;
                self.read_line().await?;
            }
        } else if let Some(n) = length {
            self.read_body(n, keep_body, &mut body).await?;
        } else if status != 204 && status != 304 && !(100..200).contains(&status) {
            // Delimited by the end of the connection.
            loop {
                match self.fill().await {
                    Ok(()) => {
                        if keep_body {
                            body.extend_from_slice(&self.buf[self.start..self.end]);
                        }
                        self.start = self.end;
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            close = true;
        }
        Ok(Resp {
            status,
            body,
            close,
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the tag that makes each body distinct.
const TAG_LEN: usize = 32;
const BODY_END: &str = r#""},"field":"messages"}]}]}"#;

/// A Meta-shaped event body of exactly `n` bytes (for n ≥ ~300); `tag` (TAG_LEN bytes) sits
/// just before the last `BODY_END.len()` bytes.
fn event_body(n: usize, tag: &str) -> Vec<u8> {
    assert_eq!(tag.len(), TAG_LEN);
    let head = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"messages":[{"from":"16505551234","id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=","timestamp":"1764300000","type":"text","text":{"body":""#;
    let mid = r#""}}],"bench_event":""#;
    let mut body = Vec::with_capacity(n);
    body.extend_from_slice(head.as_bytes());
    let fill = n.saturating_sub(head.len() + mid.len() + TAG_LEN + BODY_END.len());
    body.extend((0..fill).map(|i| b"abcdefghijklmnopqrstuvwxyz "[i % 27]));
    body.extend_from_slice(mid.as_bytes());
    body.extend_from_slice(tag.as_bytes());
    body.extend_from_slice(BODY_END.as_bytes());
    body
}

/// A process- and task-unique nonce, so that no two runs send the same event.
fn nonce(task: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 40))
        .wrapping_add(task.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Signed POST requests whose bodies are all distinct: every request is a new event, so a gate
/// that de-duplicates (hubgate does, by default) must verify and forward each one. Only the tag
/// changes, so signing costs the tail alone: the HMAC state after the common prefix is kept.
#[derive(Clone)]
struct UniquePosts {
    req: Vec<u8>,
    sig_at: usize,
    tag_at: usize,
    mac_after_prefix: Hmac<Sha256>,
    nonce: u64,
    counter: u64,
}

impl UniquePosts {
    fn new(
        t: &Target,
        secret: &[u8],
        body_bytes: usize,
        close: bool,
        check: bool,
        task: u64,
    ) -> Self {
        let body = event_body(body_bytes, &"0".repeat(TAG_LEN));
        let placeholder = format!("sha256={}", "0".repeat(64));
        let req = post_request(t, &body, Some(&placeholder), close, check);
        let head_len = req.len() - body.len();
        let marker = b"X-Hub-Signature-256: sha256=";
        let sig_at = find(&req, marker).expect("signature header") + marker.len();
        let tag_in_body = body.len() - BODY_END.len() - TAG_LEN;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(&body[..tag_in_body]);
        UniquePosts {
            req,
            sig_at,
            tag_at: head_len + tag_in_body,
            mac_after_prefix: mac,
            nonce: nonce(task),
            counter: 0,
        }
    }

    /// The next request: a fresh tag, signed.
    fn next(&mut self) -> &[u8] {
        self.counter += 1;
        let tag = format!("{:016x}{:016x}", self.nonce, self.counter);
        self.req[self.tag_at..self.tag_at + TAG_LEN].copy_from_slice(tag.as_bytes());
        let mut mac = self.mac_after_prefix.clone();
        mac.update(&self.req[self.tag_at..]);
        let sig = hex::encode(mac.finalize().into_bytes());
        self.req[self.sig_at..self.sig_at + 64].copy_from_slice(sig.as_bytes());
        &self.req
    }
}

/// Whether the benchmark's upstream has received a checked body with this SHA-256.
async fn upstream_seen(addr: SocketAddr, sha: &str) -> bool {
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "GET /__bench/seen/{sha} HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        io::Result::Ok(out)
    })
    .await;
    matches!(r, Ok(Ok(out)) if out.starts_with(b"HTTP/1.1 200"))
}

/// How many POSTs the benchmark's upstream has received (its `/__bench/count`).
async fn upstream_count(addr: SocketAddr) -> Option<u64> {
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /__bench/count HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        io::Result::Ok(out)
    })
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&r);
    text.rsplit("\r\n\r\n").next()?.trim().parse().ok()
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn post_request(
    t: &Target,
    body: &[u8],
    signature: Option<&str>,
    close: bool,
    check: bool,
) -> Vec<u8> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: facebookexternalua\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        t.path,
        body.len()
    );
    if let Some(s) = signature {
        let _ = write!(head, "X-Hub-Signature-256: {s}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    if check {
        head.push_str("X-Bench-Check: 1\r\n");
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    req
}

fn get_request(t: &Target, token: &str, close: bool) -> Vec<u8> {
    format!(
        "GET {}?hub.mode=subscribe&hub.challenge={CHALLENGE}&hub.verify_token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: facebookplatform/1.0\r\n{}\r\n",
        t.path,
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// JSON output (flat objects only)
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct JsonLine(String);

impl JsonLine {
    fn key(&mut self, k: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        self.0.push_str(&json_str(k));
        self.0.push(':');
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.0.push_str(&json_str(v));
        self
    }
    fn num(&mut self, k: &str, v: f64) -> &mut Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.0, "{}", (v * 1000.0).round() / 1000.0);
        } else {
            self.0.push_str("null");
        }
        self
    }
    fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.0.push_str(if v { "true" } else { "false" });
        self
    }
    fn labels(&mut self, labels: &[String]) -> &mut Self {
        for l in labels {
            if let Some((k, v)) = l.split_once('=') {
                self.str(k, v);
            }
        }
        self
    }
    fn finish(&mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        std::mem::take(&mut self.0)
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------------------

/// utime + stime of a process (all its threads), in clock ticks (USER_HZ = 100 on Linux).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// load
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct TaskResult {
    latencies_us: Vec<u32>,
    /// Every 200, warm-up included (compared with what the upstream received).
    ok_total: u64,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
    tls: Option<String>,
}

fn error_kind(e: &io::Error) -> String {
    format!("io_{:?}", e.kind()).to_ascii_lowercase()
}

async fn count(a: CountArgs) -> i32 {
    let t = a.target.clone();
    loopback_only(t.addr);
    let config = tls_config(&t.pki, Identity::Meta);
    let get = Arc::new(get_request(&t, &t.verify_token, false));
    let mut conns = Vec::new();
    for i in 0..a.connections {
        match Conn::connect(t.addr, config.clone()).await {
            Ok(c) => {
                let post = (a.mode == Mode::Post).then(|| {
                    UniquePosts::new(
                        &t,
                        t.secret.as_bytes(),
                        a.body_bytes,
                        false,
                        false,
                        i as u64,
                    )
                });
                conns.push((c, post));
            }
            Err(e) => {
                eprintln!("loadgen count: cannot connect to {}: {e}", t.addr);
                return 1;
            }
        }
    }
    // Each connection sends `n` requests one after another; all connections at once.
    type Client = (Conn, Option<UniquePosts>);
    async fn send(conns: Vec<Client>, get: &Arc<Vec<u8>>, n: &[u64]) -> (Vec<Client>, u64, u64) {
        let tasks: Vec<_> = conns
            .into_iter()
            .zip(n)
            .map(|((mut conn, mut post), &n)| {
                let get = get.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    for _ in 0..n {
                        let req: &[u8] = match post.as_mut() {
                            Some(p) => p.next(),
                            None => &get,
                        };
                        match conn.roundtrip(req, false).await {
                            Ok(r) if r.status == 200 && !r.close => ok += 1,
                            _ => failed += 1,
                        }
                    }
                    ((conn, post), ok, failed)
                })
            })
            .collect();
        let (mut back, mut ok, mut failed) = (Vec::new(), 0, 0);
        for t in tasks {
            let (c, o, f) = t.await.expect("a connection's task");
            back.push(c);
            ok += o;
            failed += f;
        }
        (back, ok, failed)
    }
    let hook = |cmd: &Option<String>| {
        if let Some(cmd) = cmd {
            let status = std::process::Command::new("sh").arg("-c").arg(cmd).status();
            if !status.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("loadgen count: `{cmd}` failed: {status:?}");
                return false;
            }
        }
        true
    };
    let per = vec![a.warmup_requests; conns.len()];
    let (conns, _, warm_failed) = send(conns, &get, &per).await;
    let before_up = match a.upstream_addr {
        Some(u) => upstream_count(u).await,
        None => None,
    };
    if warm_failed > 0 || !hook(&a.before) {
        eprintln!("loadgen count: {warm_failed} warm-up request(s) failed");
        return 1;
    }
    let k = conns.len() as u64;
    let per: Vec<u64> = (0..k)
        .map(|i| a.requests / k + u64::from(i < a.requests % k))
        .collect();
    let started = Instant::now();
    let (_conns, ok, failed) = send(conns, &get, &per).await;
    let mut delivered = None;
    if let (Some(u), Some(before)) = (a.upstream_addr, before_up) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = upstream_count(u).await.map(|n| n.saturating_sub(before));
            delivered = now;
            if now.is_some_and(|n| n >= ok) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let hooked = hook(&a.after);
    let mut j = JsonLine::default();
    j.str("kind", "count")
        .labels(&t.labels)
        .str("mode", if a.mode == Mode::Post { "post" } else { "get" })
        .num("body_bytes", a.body_bytes as f64)
        .num("connections", k as f64)
        .num("requests", ok as f64)
        .num("failed", failed as f64)
        .num("delivered", delivered.map_or(f64::NAN, |d| d as f64))
        .num("elapsed_s", elapsed);
    println!("{}", j.finish());
    if failed > 0 || !hooked || delivered.is_some_and(|d| d < ok) {
        return 1;
    }
    0
}

async fn load(a: LoadArgs) -> i32 {
    let t = a.target.clone();
    loopback_only(t.addr);
    let config = tls_config(&t.pki, Identity::Meta);
    // GET: one fixed request. POST: every request a distinct, freshly signed event.
    let get = Arc::new(get_request(&t, &t.verify_token, a.new_conn));
    let post = (a.mode == Mode::Post)
        .then(|| UniquePosts::new(&t, t.secret.as_bytes(), a.body_bytes, a.new_conn, false, 0));
    let upstream_before = match a.upstream_addr {
        Some(u) if a.mode == Mode::Post => upstream_count(u).await,
        _ => None,
    };
    let started = Instant::now();
    let from = started + Duration::from_secs_f64(a.warmup);
    let until = from + Duration::from_secs_f64(a.duration);

    // CPU of the system under test, the upstream and this process over the timed window.
    let pids: Vec<String> = a.pids.iter().map(|p| p.to_string()).collect();
    let up = a.upstream_pid.map(|p| p.to_string());
    let cpu = tokio::spawn(async move {
        let sample = |pids: &[String]| pids.iter().filter_map(|p| cpu_ticks(p)).sum::<u64>();
        tokio::time::sleep_until(from.into()).await;
        let c0 = core_ticks();
        let s0 = (
            sample(&pids),
            up.as_deref().and_then(cpu_ticks),
            cpu_ticks("self"),
        );
        tokio::time::sleep_until(until.into()).await;
        let c1 = core_ticks();
        let s1 = (
            sample(&pids),
            up.as_deref().and_then(cpu_ticks),
            cpu_ticks("self"),
        );
        (
            s1.0.saturating_sub(s0.0),
            s1.1.zip(s0.1).map(|(b, a)| b.saturating_sub(a)),
            s1.2.zip(s0.2).map(|(b, a)| b.saturating_sub(a)),
            core_usage(&c0, &c1),
        )
    });

    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let (config, get) = (config.clone(), get.clone());
        let mut post = post.clone().map(|mut p| {
            p.nonce = nonce(tasks.len() as u64 + 1);
            p
        });
        let (addr, new_conn) = (t.addr, a.new_conn);
        tasks.push(tokio::spawn(async move {
            let mut r = TaskResult::default();
            let mut conn: Option<Conn> = None;
            while Instant::now() < until {
                let req: &[u8] = match post.as_mut() {
                    Some(p) => p.next(),
                    None => &get,
                };
                let t0 = Instant::now();
                let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    if conn.is_none() {
                        let c = Conn::connect(addr, config.clone()).await?;
                        if r.tls.is_none() {
                            r.tls = Some(c.tls_summary());
                        }
                        conn = Some(c);
                    }
                    conn.as_mut()
                        .expect("connected")
                        .roundtrip(req, false)
                        .await
                })
                .await;
                let t1 = Instant::now();
                let counted = t1 >= from && t1 <= until;
                let mut error: Option<String> = None;
                match outcome {
                    Ok(Ok(resp)) => {
                        if resp.status == 200 {
                            r.ok_total += 1;
                            if counted {
                                let us = (t1 - t0).as_micros().min(u32::MAX as u128) as u32;
                                r.latencies_us.push(us);
                            }
                        } else {
                            error = Some(format!("status_{}", resp.status));
                        }
                        if resp.close || new_conn {
                            if !new_conn {
                                r.reconnects += 1;
                            }
                            conn = None;
                        }
                    }
                    Ok(Err(e)) => {
                        error = Some(error_kind(&e));
                        if conn.is_none() {
                            // Could not connect: do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        conn = None;
                        r.reconnects += 1;
                    }
                    Err(_) => {
                        error = Some("timeout".into());
                        conn = None;
                        r.reconnects += 1;
                    }
                }
                if let (Some(kind), true) = (error, counted) {
                    *r.errors.entry(kind).or_default() += 1;
                }
            }
            r
        }));
    }
    let mut lat: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut reconnects, mut tls, mut ok_total) = (0, None, 0u64);
    for task in tasks {
        // Tasks end on their own at `until` (plus at most one request timeout).
        if let Ok(r) = task.await {
            lat.extend(r.latencies_us);
            for (k, v) in r.errors {
                *errors.entry(k).or_default() += v;
            }
            reconnects += r.reconnects;
            ok_total += r.ok_total;
            tls = tls.or(r.tls);
        }
    }
    // With --drain-wait (deferred delivery), give the system time to deliver what it accepted.
    let drain_started = Instant::now();
    let mut upstream_after = None;
    if let (Some(u), Some(before)) = (a.upstream_addr, upstream_before) {
        loop {
            upstream_after = upstream_count(u).await;
            let done = upstream_after.is_some_and(|n| n.saturating_sub(before) >= ok_total);
            if done || drain_started.elapsed().as_secs_f64() >= a.drain_wait {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    let forwarded = upstream_before
        .zip(upstream_after)
        .map(|(b, a)| a.saturating_sub(b) as f64);
    let (sut_ticks, up_ticks, self_ticks, cores) = cpu.await.unwrap_or((0, None, None, Vec::new()));
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    let n = lat.len() as f64;
    let err_total: u64 = errors.values().sum();
    let err_kinds = errors
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",");
    // Ticks are 10 ms; as % of one core over the window.
    let to_pct = |ticks: u64| ticks as f64 / a.duration;
    let mut j = JsonLine::default();
    j.str("kind", "load")
        .labels(&t.labels)
        .str("mode", if a.mode == Mode::Post { "post" } else { "get" })
        .num(
            "body_bytes",
            if a.mode == Mode::Post {
                a.body_bytes as f64
            } else {
                0.0
            },
        )
        .bool("new_conn", a.new_conn)
        .num("connections", a.connections as f64)
        .num("warmup_s", a.warmup)
        .num("duration_s", a.duration)
        .num("requests", n)
        .num("rps", n / a.duration)
        .num("p50_ms", pct(50.0))
        .num("p90_ms", pct(90.0))
        .num("p99_ms", pct(99.0))
        .num(
            "max_ms",
            lat.last().map(|v| *v as f64 / 1000.0).unwrap_or(f64::NAN),
        )
        .num("errors", err_total as f64)
        .str("error_kinds", &err_kinds)
        .num("reconnects", reconnects as f64)
        .num(
            "sut_cpu_pct",
            if pids_given(&a.pids) {
                to_pct(sut_ticks)
            } else {
                f64::NAN
            },
        )
        .num(
            "sut_cpu_us_per_req",
            if n > 0.0 && pids_given(&a.pids) {
                sut_ticks as f64 * 10_000.0 / n
            } else {
                f64::NAN
            },
        )
        .num("upstream_cpu_pct", up_ticks.map(to_pct).unwrap_or(f64::NAN))
        .num(
            "loadgen_cpu_pct",
            self_ticks.map(to_pct).unwrap_or(f64::NAN),
        )
        .str("tls", tls.as_deref().unwrap_or("-"))
        .num("ok_total", ok_total as f64)
        .num("upstream_received", forwarded.unwrap_or(f64::NAN))
        .num(
            "forwarded_ratio",
            forwarded
                .map(|f| f / ok_total.max(1) as f64)
                .unwrap_or(f64::NAN),
        )
        .num(
            "drain_s",
            if a.drain_wait > 0.0 {
                drain_s
            } else {
                f64::NAN
            },
        );
    // Whole-core usage (everything on the machine, not just us): shows other work's share.
    for (i, (busy, steal)) in cores.iter().enumerate().take(2) {
        j.num(&format!("core{i}_busy_pct"), *busy)
            .num(&format!("core{i}_steal_pct"), *steal);
    }
    println!("{}", j.finish());
    0
}

/// Per-core (busy, steal) tick counters and totals from /proc/stat, in core order.
fn core_ticks() -> Vec<(u64, u64, u64)> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let get = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal (guest is inside user)
            let busy = get(0) + get(1) + get(2) + get(5) + get(6);
            let steal = get(7);
            let total = busy + get(3) + get(4) + steal;
            (busy, steal, total)
        })
        .collect()
}

/// Busy and steal percentages of each core between two samples.
fn core_usage(a: &[(u64, u64, u64)], b: &[(u64, u64, u64)]) -> Vec<(f64, f64)> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let total = y.2.saturating_sub(x.2).max(1) as f64;
            (
                y.0.saturating_sub(x.0) as f64 * 100.0 / total,
                y.1.saturating_sub(x.1) as f64 * 100.0 / total,
            )
        })
        .collect()
}

fn pids_given(p: &[u32]) -> bool {
    !p.is_empty()
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

/// What happened to one request: a response, or a TLS/IO failure (a refused handshake).
async fn attempt(addr: SocketAddr, config: Arc<ClientConfig>, req: &[u8]) -> Result<Resp, String> {
    let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut c = Conn::connect(addr, config).await?;
        c.roundtrip(req, true).await
    })
    .await;
    match r {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

fn refused(r: &Result<Resp, String>, what: &str) -> Result<String, String> {
    match r {
        // Only the server's doing counts: an alert it sent, or it closing/resetting the
        // connection. Our own verification of its certificate failing, a refused TCP connect
        // or a timeout prove nothing about the system's checks.
        Err(e)
            if [
                "received fatal alert",
                "reset by peer",
                "eof",
                "end of file",
                "broken pipe",
            ]
            .iter()
            .any(|m| e.to_ascii_lowercase().contains(m)) =>
        {
            Ok(format!("refused at TLS/connection: {e}"))
        }
        Err(e) => Err(format!("{what}: {e} (not a refusal by the system)")),
        Ok(resp) if (400..500).contains(&resp.status) => {
            Ok(format!("refused with {}", resp.status))
        }
        Ok(resp) => Err(format!("{what}: got {} (must be refused)", resp.status)),
    }
}

async fn check(a: CheckArgs) -> i32 {
    let t = a.target;
    loopback_only(t.addr);
    let meta = tls_config(&t.pki, Identity::Meta);
    let secret = t.secret.as_bytes();
    let mut results: Vec<(&str, Result<String, String>)> = Vec::new();

    // 1. The challenge is answered, and only with the right token.
    let r = attempt(
        t.addr,
        meta.clone(),
        &get_request(&t, &t.verify_token, true),
    )
    .await;
    results.push((
        "challenge",
        match r {
            Ok(resp) if resp.status == 200 && resp.body == CHALLENGE.as_bytes() => {
                Ok("200 with the challenge echoed".into())
            }
            Ok(resp) => Err(format!(
                "got {} {:?}",
                resp.status,
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(80)])
            )),
            Err(e) => Err(e),
        },
    ));
    let r = attempt(
        t.addr,
        meta.clone(),
        &get_request(&t, "not-the-token", true),
    )
    .await;
    results.push(("challenge_wrong_token", refused(&r, "wrong verify token")));

    // 2. Signed bodies reach the upstream byte for byte.
    let tag = |k: u64| format!("{:016x}{:016x}", nonce(k), k);
    for size in [1024usize, 64 * 1024] {
        let body = event_body(size, &tag(size as u64));
        let req = post_request(&t, &body, Some(&sign(secret, &body)), true, true);
        let want = format!(
            "len={} sha256={}",
            body.len(),
            hex::encode(Sha256::digest(&body))
        );
        let r = attempt(t.addr, meta.clone(), &req).await;
        results.push((
            if size == 1024 {
                "signed_post_1k"
            } else {
                "signed_post_64k"
            },
            match r {
                Ok(resp) if resp.status == 200 && resp.body == want.as_bytes() => {
                    Ok("200, upstream got the exact body".into())
                }
                Ok(resp) if resp.status == 200 && a.deferred => {
                    let sha = hex::encode(Sha256::digest(&body));
                    let upstream = a.upstream_addr.expect("required with --deferred");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut seen = false;
                    while !seen && Instant::now() < deadline {
                        seen = upstream_seen(upstream, &sha).await;
                        if !seen {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    if seen {
                        Ok("200, then the upstream got the exact body".into())
                    } else {
                        Err("200, but the body did not reach the upstream within 10 s".into())
                    }
                }
                Ok(resp) => Err(format!(
                    "got {} {:?}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body[..resp.body.len().min(120)])
                )),
                Err(e) => Err(e),
            },
        ));
    }

    // 3. Forged, unsigned, tampered and malformed signatures are refused.
    let body = event_body(1024, &tag(7));
    let forged = sign(b"not-the-app-secret", &body);
    let mut tampered_body = body.clone();
    tampered_body[100] ^= 1;
    let good = sign(secret, &body);
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "forged_signature",
            post_request(&t, &body, Some(&forged), true, true),
        ),
        ("unsigned", post_request(&t, &body, None, true, true)),
        (
            "tampered_body",
            post_request(&t, &tampered_body, Some(&good), true, true),
        ),
        (
            "signature_without_prefix",
            post_request(&t, &body, Some(&good["sha256=".len()..]), true, true),
        ),
    ];
    for (name, req) in cases {
        let r = attempt(t.addr, meta.clone(), &req).await;
        results.push((name, refused(&r, name)));
    }

    // 4. Only Meta's certificate gets in: wrong CN, a right CN from another CA, no certificate.
    let signed = post_request(&t, &body, Some(&good), true, true);
    for (name, id) in [
        ("wrong_cn_cert", Identity::WrongCn),
        ("untrusted_ca_cert", Identity::Rogue),
        ("no_client_cert", Identity::NoCert),
    ] {
        let r = attempt(t.addr, tls_config(&t.pki, id), &signed).await;
        results.push((name, refused(&r, name)));
    }

    let ok = results.iter().all(|(_, r)| r.is_ok());
    let mut j = JsonLine::default();
    j.str("kind", "check").labels(&t.labels).bool("ok", ok);
    let mut failed = Vec::new();
    for (name, r) in &results {
        match r {
            Ok(detail) => {
                eprintln!("  ok    {name}: {detail}");
                j.str(name, "pass");
            }
            Err(e) => {
                eprintln!("  FAIL  {name}: {e}");
                j.str(name, &format!("FAIL: {e}"));
                failed.push(*name);
            }
        }
    }
    j.str("failed", &failed.join(","));
    println!("{}", j.finish());
    if ok {
        0
    } else {
        1
    }
}

// ---------------------------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------------------------

async fn idle(a: IdleArgs) -> i32 {
    let t = a.target;
    loopback_only(t.addr);
    let config = tls_config(&t.pki, Identity::Meta);
    let req = get_request(&t, &t.verify_token, false);
    let rss = |pids: &[u32]| pids.iter().filter_map(|p| rss_kb(*p)).sum::<u64>();
    let before = rss(&a.pids);
    let deadline = Instant::now() + Duration::from_secs(60);

    // Open them 25 at a time; each connection serves one challenge GET, then stays idle.
    let mut conns: Vec<Conn> = Vec::with_capacity(a.connections);
    let mut failures = 0usize;
    while conns.len() + failures < a.connections && Instant::now() < deadline {
        let batch = (a.connections - conns.len() - failures).min(25);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (config, req) = (config.clone(), req.clone());
            set.spawn(async move {
                tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let mut c = Conn::connect(t.addr, config).await?;
                    let r = c.roundtrip(&req, false).await?;
                    if r.status != 200 || r.close {
                        return Err(io::Error::other(format!("status {}", r.status)));
                    }
                    Ok(c)
                })
                .await
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(Ok(c))) => conns.push(c),
                _ => failures += 1,
            }
        }
    }
    let opened = conns.len();
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let with_idle = rss(&a.pids);

    // Still there? One more GET on each.
    let mut alive = 0usize;
    let mut set = tokio::task::JoinSet::new();
    for mut c in conns {
        let req = req.clone();
        set.spawn(async move {
            matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, c.roundtrip(&req, false)).await,
                Ok(Ok(r)) if r.status == 200
            )
        });
    }
    while let Some(r) = set.join_next().await {
        alive += usize::from(matches!(r, Ok(true)));
    }
    let mut j = JsonLine::default();
    j.str("kind", "idle")
        .labels(&t.labels)
        .num("connections", a.connections as f64)
        .num("opened", opened as f64)
        .num("alive_after_hold", alive as f64)
        .num("hold_s", a.hold)
        .num("rss_before_kb", before as f64)
        .num("rss_idle_kb", with_idle as f64)
        .num(
            "per_conn_kb",
            if opened > 0 {
                (with_idle as f64 - before as f64) / opened as f64
            } else {
                f64::NAN
            },
        );
    println!("{}", j.finish());
    0
}

// ---------------------------------------------------------------------------------------------
// ready
// ---------------------------------------------------------------------------------------------

async fn ready(a: ReadyArgs) -> i32 {
    let t = a.target;
    loopback_only(t.addr);
    let config = tls_config(&t.pki, Identity::Meta);
    let req = get_request(&t, &t.verify_token, true);
    // The client's first handshake pays one-time set-up costs (tens of ms here); pay them
    // against a throwaway in-process server so that they are not counted against the system.
    for i in 0..2 {
        let w = Instant::now();
        if let Err(e) = warm_up_client(&t.pki, config.clone(), &req).await {
            eprintln!("loadgen ready: client warm-up failed: {e}");
        }
        if hubgate::config::process_env("LOADGEN_DEBUG").is_some() {
            eprintln!(
                "ready: warm-up {i} took {:.1} ms",
                w.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
    let started = Instant::now();
    let mut child = match std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen ready: cannot start {:?}: {e}", a.command);
            return 1;
        }
    };
    let deadline = started + Duration::from_secs_f64(a.timeout);
    let mut ready_ms = f64::NAN;
    let mut attempts = 0u32;
    while Instant::now() < deadline {
        attempts += 1;
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = Conn::connect(t.addr, config.clone()).await?;
            c.roundtrip(&req, true).await
        })
        .await;
        if hubgate::config::process_env("LOADGEN_DEBUG").is_some() {
            eprintln!(
                "ready: attempt {attempts} at {:.1} ms: {}",
                started.elapsed().as_secs_f64() * 1000.0,
                match &r {
                    Ok(Ok(resp)) => format!("status {}", resp.status),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timeout".into(),
                }
            );
        }
        if let Ok(Ok(resp)) = r {
            if resp.status == 200 && resp.body == CHALLENGE.as_bytes() {
                ready_ms = started.elapsed().as_secs_f64() * 1000.0;
                break;
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            break; // exited: it will never be ready
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Stop it: SIGTERM (nginx's master takes its workers down), then SIGKILL after 5 s.
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let stop_by = Instant::now() + Duration::from_secs(5);
    while Instant::now() < stop_by {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut j = JsonLine::default();
    j.str("kind", "ready")
        .labels(&t.labels)
        .num("ready_ms", ready_ms)
        .num("attempts", attempts as f64)
        .bool("ok", ready_ms.is_finite());
    println!("{}", j.finish());
    i32::from(!ready_ms.is_finite())
}

/// One full mTLS handshake and request against an in-process rustls server on 127.0.0.1:0 that
/// uses the benchmark's server certificate and verifies the client certificate.
async fn warm_up_client(pki: &Path, config: Arc<ClientConfig>, req: &[u8]) -> io::Result<()> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("root.pem")).map_err(io::Error::other)? {
        roots
            .add(c.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(io::Error::other)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.join("server.pem"))
        .map_err(io::Error::other)?
        .collect::<Result<_, _>>()
        .map_err(io::Error::other)?;
    let key = PrivateKeyDer::from_pem_file(pki.join("server.key")).map_err(io::Error::other)?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(io::Error::other)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let serve = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while find(&got, b"\r\n\r\n").is_none() {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        tls.shutdown().await
    });
    let result = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = Conn::connect(addr, config).await?;
        c.roundtrip(req, false).await.map(drop)
    })
    .await
    .map_err(|_| io::Error::other("warm-up timed out"))?;
    let _ = tokio::time::timeout(Duration::from_secs(1), serve).await;
    result
}

// ---------------------------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Val {
    S(String),
    N(f64),
    B(bool),
    Null,
}

type Obj = BTreeMap<String, Val>;

/// Parses one flat JSON object (string, number, bool and null values).
fn parse_flat(line: &str) -> Option<Obj> {
    let b = line.trim().as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1
        }
    };
    let string = |i: &mut usize| -> Option<String> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        *i += 1;
        let mut out = Vec::new();
        while *i < b.len() {
            match b[*i] {
                b'"' => {
                    *i += 1;
                    return String::from_utf8(out).ok();
                }
                b'\\' => {
                    *i += 1;
                    match *b.get(*i)? {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hexs = std::str::from_utf8(b.get(*i + 1..*i + 5)?).ok()?;
                            let c = char::from_u32(u32::from_str_radix(hexs, 16).ok()?)?;
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                            *i += 4;
                        }
                        c => out.push(c),
                    }
                    *i += 1;
                }
                c => {
                    out.push(c);
                    *i += 1;
                }
            }
        }
        None
    };
    let mut obj = Obj::new();
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        ws(&mut i);
        match b.get(i)? {
            b'}' => return Some(obj),
            b',' => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let k = string(&mut i)?;
        ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        let v = match b.get(i)? {
            b'"' => Val::S(string(&mut i)?),
            b't' if b[i..].starts_with(b"true") => {
                i += 4;
                Val::B(true)
            }
            b'f' if b[i..].starts_with(b"false") => {
                i += 5;
                Val::B(false)
            }
            b'n' if b[i..].starts_with(b"null") => {
                i += 4;
                Val::Null
            }
            _ => {
                let s = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                Val::N(std::str::from_utf8(&b[s..i]).ok()?.parse().ok()?)
            }
        };
        obj.insert(k, v);
    }
}

fn s<'a>(o: &'a Obj, k: &str) -> &'a str {
    match o.get(k) {
        Some(Val::S(v)) => v,
        _ => "",
    }
}

fn n(o: &Obj, k: &str) -> f64 {
    match o.get(k) {
        Some(Val::N(v)) => *v,
        _ => f64::NAN,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold((f64::NAN, f64::NAN), |(lo, hi), x| {
            (lo.min(x).min(x), hi.max(x).max(x))
        })
}

fn fmt_num(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    if decimals == 0 && x.abs() >= 1000.0 {
        // 12 345
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push('\u{202f}');
            }
            out.push(c);
        }
        return out;
    }
    format!("{:.*}", decimals, x)
}

fn med_range(v: &[f64], decimals: usize) -> String {
    let (lo, hi) = min_max(v);
    if !lo.is_finite() {
        return "–".into();
    }
    format!(
        "{} ({}–{})",
        fmt_num(median(v), decimals),
        fmt_num(lo, decimals),
        fmt_num(hi, decimals)
    )
}

const SCENARIOS: [(&str, &str); 5] = [
    ("ka1k", "keep-alive POST 1 KiB"),
    ("ka64k", "keep-alive POST 64 KiB"),
    ("newconn", "new TLS connection per POST (1 KiB)"),
    ("get", "GET challenge (keep-alive)"),
    (
        "spool1k",
        "keep-alive POST 1 KiB, spool delivery (vs HAProxy forwarding)",
    ),
];

/// Scenario label suffixes bench/run.sh adds for its other topology and log setting.
const VARIANTS: [(&str, &str); 4] = [
    ("", ""),
    ("+log", ", access logs on"),
    ("@sidecar", ", sidecar (upstream on the system's core)"),
    (
        "@sidecar+log",
        ", sidecar (upstream on the system's core), access logs on",
    ),
];

/// The system that runs hubgate with spool delivery: timed in the spool scenario only.
const SPOOL_SYSTEM: &str = "hubgate-spool";
/// hubgate with its access log on, timed beside hubgate in some scenarios only.
const LOG_SYSTEM: &str = "hubgate-log";

fn report(a: ReportArgs) -> i32 {
    let text = match std::fs::read_to_string(&a.results) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadgen report: cannot read {}: {e}", a.results.display());
            return 1;
        }
    };
    let rows: Vec<Obj> = text.lines().filter_map(parse_flat).collect();
    let of = |kind: &'static str| rows.iter().filter(move |r| s(r, "kind") == kind);
    let meta = of("meta").next().cloned().unwrap_or_default();
    let mut systems: Vec<String> = Vec::new();
    for sys in s(&meta, "systems").split(',').filter(|x| !x.is_empty()) {
        systems.push(sys.to_owned());
    }
    let mut md = String::new();
    let _ = writeln!(md, "# hubgate benchmark\n");
    let _ = writeln!(
        md,
        "- when: {} — mode `{}`: {} repetitions; each load run is {} s timed after {} s warm-up; {} connections (keep-alive), {} concurrent (new connection per request)",
        s(&meta, "date"),
        s(&meta, "mode"),
        s(&meta, "reps"),
        s(&meta, "duration"),
        s(&meta, "warmup"),
        s(&meta, "connections"),
        s(&meta, "newconn_connections"),
    );
    let _ = writeln!(md, "- machine: {} — **shared with other work**: numbers are noisy; every figure is the median of the repetitions, with min–max beside it", s(&meta, "machine"));
    let _ = writeln!(md, "- pinning: each system on core 0 with one worker (HAProxy `nbthread 1`, nginx `worker_processes 1`, hubgate `TOKIO_WORKER_THREADS=1`: {}); load generator and upstream on core 1", s(&meta, "hubgate_threads"));
    let mut tls: Vec<String> = Vec::new();
    for r in of("load") {
        let t = format!("{}: {}", s(r, "system"), s(r, "tls"));
        if !tls.contains(&t) {
            tls.push(t);
        }
    }
    let _ = writeln!(
        md,
        "- TLS negotiated: {} (the client offers X25519 only and never resumes: every new connection is a full handshake with client-certificate verification); HTTP/1.1",
        tls.join("; ")
    );
    let _ = writeln!(md, "- versions: {}", s(&meta, "versions"));
    let _ = writeln!(md, "- ratios to HAProxy are computed pair by pair (repetition i of a system against repetition i of HAProxy, run back to back), then the median and min–max of those ratios\n");

    // Admission checks.
    let _ = writeln!(md, "## Admission checks (before any timing)\n");
    let _ = writeln!(md, "| system | result | failed checks |\n|---|---|---|");
    let mut passed: BTreeMap<String, bool> = BTreeMap::new();
    for sys in &systems {
        let checks: Vec<&Obj> = of("check").filter(|r| s(r, "system") == sys).collect();
        let ok = !checks.is_empty()
            && checks
                .iter()
                .all(|r| matches!(r.get("ok"), Some(Val::B(true))));
        passed.insert(sys.clone(), ok);
        let failed: Vec<&str> = checks
            .iter()
            .map(|r| s(r, "failed"))
            .filter(|f| !f.is_empty())
            .collect();
        let _ = writeln!(
            md,
            "| {sys} | {} | {} |",
            if checks.is_empty() {
                "not run"
            } else if ok {
                "pass (challenge, signed 1 KiB/64 KiB forwarded intact, forged/unsigned/tampered/unprefixed signature refused, wrong-CN/untrusted-CA/no certificate refused)"
            } else {
                "**FAIL — not timed**"
            },
            if failed.is_empty() {
                "–".to_string()
            } else {
                failed.join("; ")
            }
        );
    }

    // Load scenarios.
    let _ = writeln!(md, "\n## Throughput and latency\n");
    let _ = writeln!(md, "| scenario | system | req/s median (min–max) | × HAProxy req/s (pairwise) | p50 ms | p99 ms median (min–max) | × HAProxy p99 (pairwise) | errors (all reps) | reached the upstream, % of 200s (min) | server CPU µs/req | × HAProxy CPU/req (pairwise) | core 0 busy %: server / other work | core 1 busy %: loadgen / upstream / other work |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let load = |sys: &str, sc: &str| -> Vec<&Obj> {
        let mut v: Vec<&Obj> = of("load")
            .filter(|r| s(r, "system") == sys && s(r, "scenario") == sc)
            .collect();
        v.sort_by(|a, b| n(a, "rep").total_cmp(&n(b, "rep")));
        v
    };
    let pairwise = |sys: &str, sc: &str, key: &str| -> Vec<f64> {
        // The spool row is compared with HAProxy forwarding the same load synchronously.
        let ka = sc.replacen("spool1k", "ka1k", 1);
        let base = load("haproxy", &ka);
        load(sys, sc)
            .iter()
            .filter_map(|r| {
                let b = base
                    .iter()
                    .find(|b| s(b, "rep") == s(r, "rep") || n(b, "rep") == n(r, "rep"))?;
                let (x, y) = (n(r, key), n(b, key));
                (x.is_finite() && y.is_finite() && y > 0.0).then_some(x / y)
            })
            .collect()
    };
    let mut summary: BTreeMap<(String, String, String), (f64, f64, f64)> = BTreeMap::new();
    // Each scenario in each topology and log setting that was run (bench/run.sh labels them
    // `ka1k`, `ka1k+log`, `ka1k@sidecar`, `ka1k@sidecar+log`).
    let mut variants: Vec<(String, String)> = Vec::new();
    for (base, title) in SCENARIOS {
        for (suffix, what) in VARIANTS {
            let sc = format!("{base}{suffix}");
            if suffix.is_empty() || of("load").any(|r| s(r, "scenario") == sc) {
                variants.push((sc, format!("{title}{what}")));
            }
        }
    }
    for (sc, title) in &variants {
        let (sc, title) = (sc.as_str(), title.as_str());
        for sys in &systems {
            if (sys == SPOOL_SYSTEM) != sc.starts_with("spool1k") {
                continue;
            }
            let runs = load(sys, sc);
            if runs.is_empty() && sys == LOG_SYSTEM {
                continue;
            }
            if runs.is_empty() {
                let why = if passed.get(sys) == Some(&false) {
                    "not timed (failed the checks)"
                } else {
                    "no data"
                };
                let _ = writeln!(md, "| {title} | {sys} | {why} | | | | | | | | | | |");
                continue;
            }
            let col = |k: &str| runs.iter().map(|r| n(r, k)).collect::<Vec<f64>>();
            let rps = col("rps");
            let p99 = col("p99_ms");
            let errors: f64 = col("errors").iter().filter(|x| x.is_finite()).sum();
            let kinds: Vec<&str> = runs
                .iter()
                .map(|r| s(r, "error_kinds"))
                .filter(|k| !k.is_empty())
                .collect();
            let ratio = pairwise(sys, sc, "rps");
            let ratio99 = pairwise(sys, sc, "p99_ms");
            for (k, v) in [("rps", &ratio), ("p99", &ratio99)] {
                let (lo, hi) = min_max(v);
                summary.insert(
                    (sys.clone(), sc.to_owned(), k.to_owned()),
                    (median(v), lo, hi),
                );
            }
            let ratio_cpu = pairwise(sys, sc, "sut_cpu_us_per_req");
            let sut = median(&col("sut_cpu_pct"));
            let (lg, up) = (
                median(&col("loadgen_cpu_pct")),
                median(&col("upstream_cpu_pct")),
            );
            let other0 = (median(&col("core0_busy_pct")) - sut).max(0.0);
            let other1 = (median(&col("core1_busy_pct")) - lg - up).max(0.0);
            let steal = median(&col("core0_steal_pct")).max(median(&col("core1_steal_pct")));
            let fr: Vec<f64> = col("forwarded_ratio").iter().map(|x| x * 100.0).collect();
            let forwarded = if sc.starts_with("get") {
                "– (answered by the gate)".to_string()
            } else if fr.iter().all(|x| !x.is_finite()) {
                "not measured".to_string()
            } else {
                let (lo, _) = min_max(&fr);
                let drain = median(&col("drain_s"));
                format!(
                    "{}{} ({}){}",
                    if lo < 99.5 { "**" } else { "" },
                    fmt_num(median(&fr), 1),
                    fmt_num(lo, 1),
                    if drain.is_finite() {
                        format!(
                            ", delivery finished ≤ {} s after the run",
                            fmt_num(drain, 1)
                        )
                    } else {
                        String::new()
                    }
                ) + if lo < 99.5 { "**" } else { "" }
            };
            let one = |v: &[f64]| {
                if sys == "haproxy" {
                    "1".to_string()
                } else {
                    med_range(v, 2)
                }
            };
            let _ = writeln!(
                md,
                "| {title} | {sys} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} / {} | {} / {} / {}{} |",
                med_range(&rps, 0),
                one(&ratio),
                fmt_num(median(&col("p50_ms")), 2),
                med_range(&p99, 2),
                one(&ratio99),
                fmt_num(errors, 0),
                if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join("; ")) },
                forwarded,
                fmt_num(median(&col("sut_cpu_us_per_req")), 1),
                one(&ratio_cpu),
                fmt_num(sut, 0),
                fmt_num(other0, 0),
                fmt_num(lg, 0),
                fmt_num(up, 0),
                fmt_num(other1, 0),
                if steal >= 1.0 { format!(" (steal {})", fmt_num(steal, 0)) } else { String::new() },
            );
        }
    }
    if load(SPOOL_SYSTEM, "spool1k").is_empty() && !systems.iter().any(|x| x == SPOOL_SYSTEM) {
        let _ = writeln!(
            md,
            "| spool mode | hubgate | placeholder: this hubgate has no spool mode | | | | | | | | | | |"
        );
    }

    // Idle connections.
    let _ = writeln!(md, "\n## Memory with 1,000 idle mTLS connections\n");
    let _ = writeln!(md, "Each connection did a full mTLS handshake and one challenge GET, then sat idle; RSS is summed over the system's processes (nginx: master + worker), sampled after the hold.\n");
    let _ = writeln!(md, "| system | RSS before (MiB) | RSS with idle conns (MiB) median (min–max) | KiB per connection | connections opened / alive after hold |\n|---|---|---|---|---|");
    let mut idle_rss: BTreeMap<String, f64> = BTreeMap::new();
    for sys in systems
        .iter()
        .filter(|x| *x != SPOOL_SYSTEM && *x != LOG_SYSTEM)
    {
        let runs: Vec<&Obj> = of("idle").filter(|r| s(r, "system") == sys).collect();
        if runs.is_empty() {
            let _ = writeln!(md, "| {sys} | – | not measured | | |");
            continue;
        }
        let col = |k: &str| runs.iter().map(|r| n(r, k)).collect::<Vec<f64>>();
        let mib = |v: Vec<f64>| v.iter().map(|x| x / 1024.0).collect::<Vec<f64>>();
        idle_rss.insert(sys.clone(), median(&col("rss_idle_kb")));
        let _ = writeln!(
            md,
            "| {sys} | {} | {} | {} | {} / {} |",
            fmt_num(median(&mib(col("rss_before_kb"))), 1),
            med_range(&mib(col("rss_idle_kb")), 1),
            fmt_num(median(&col("per_conn_kb")), 1),
            fmt_num(median(&col("opened")), 0),
            fmt_num(median(&col("alive_after_hold")), 0),
        );
    }

    // Start to ready.
    let _ = writeln!(md, "\n## Time from start to ready\n");
    let _ = writeln!(md, "From spawning the process to the first correct challenge answer over mTLS (polled every ~1 ms).\n");
    let _ = writeln!(md, "| system | ms median (min–max) |\n|---|---|");
    for sys in systems
        .iter()
        .filter(|x| *x != SPOOL_SYSTEM && *x != LOG_SYSTEM)
    {
        let v: Vec<f64> = of("ready")
            .filter(|r| s(r, "system") == sys)
            .map(|r| n(r, "ready_ms"))
            .collect();
        let _ = writeln!(
            md,
            "| {sys} | {} |",
            if v.is_empty() {
                "not measured".into()
            } else {
                med_range(&v, 1)
            }
        );
    }

    // Sizes.
    let _ = writeln!(md, "\n## Size on disk\n");
    let _ = writeln!(md, "| system | files | executable (MiB) | + modules and non-libc shared libraries it loads (MiB) |\n|---|---|---|---|");
    for r in of("size") {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            s(r, "system"),
            s(r, "files"),
            fmt_num(n(r, "binary_bytes") / 1048576.0, 2),
            fmt_num(n(r, "total_bytes") / 1048576.0, 2)
        );
    }

    // Targets.
    let _ = writeln!(md, "\n## Targets (hubgate)\n");
    let _ = writeln!(
        md,
        "| target | measured (median, min–max over repetitions) | verdict |\n|---|---|---|"
    );
    let verdict = |m: f64, lo: f64, hi: f64, want: f64, higher: bool| -> String {
        if !m.is_finite() {
            return "not measured".into();
        }
        let met = if higher { m >= want } else { m <= want };
        let noisy = if higher {
            (lo < want) && (hi >= want)
        } else {
            (lo <= want) && (hi > want)
        };
        format!(
            "{}{}",
            if met { "met" } else { "**missed**" },
            if noisy {
                " (noise range straddles the target)"
            } else {
                ""
            }
        )
    };
    // Issue 11's targets, in each topology that was run.
    for (topology, where_) in [("", ""), ("@sidecar", " (sidecar)")] {
        for (sc, want, label) in [
            ("ka1k", 1.3, "keep-alive 1 KiB: req/s ≥ 1.3× HAProxy"),
            ("ka64k", 1.2, "keep-alive 64 KiB: req/s ≥ 1.2× HAProxy"),
            (
                "newconn",
                1.2,
                "new connection per POST: req/s ≥ 1.2× HAProxy",
            ),
            ("get", 1.0, "GET challenge: req/s ≥ 1× HAProxy"),
        ] {
            let sc = format!("{sc}{topology}");
            let Some(&(m, lo, hi)) = summary.get(&("hubgate".into(), sc.clone(), "rps".into()))
            else {
                continue;
            };
            let _ = writeln!(
                md,
                "| {label}{where_} | {}× ({}–{}) | {} |",
                fmt_num(m, 2),
                fmt_num(lo, 2),
                fmt_num(hi, 2),
                verdict(m, lo, hi, want, true)
            );
            if sc.starts_with("ka1k") {
                let (m, lo, hi) = summary
                    .get(&("hubgate".into(), sc.clone(), "p99".into()))
                    .copied()
                    .unwrap_or((f64::NAN, f64::NAN, f64::NAN));
                let _ = writeln!(
                    md,
                    "| keep-alive 1 KiB: p99 ≤ HAProxy's{where_} | {}× HAProxy's p99 ({}–{}) | {} |",
                    fmt_num(m, 2),
                    fmt_num(lo, 2),
                    fmt_num(hi, 2),
                    verdict(m, lo, hi, 1.0, false)
                );
            }
        }
        // The access log's cost: hubgate with its log on (the `hubgate-log` instance, timed
        // back to back with hubgate in the same phase) against hubgate with it off, pair by
        // pair (repetition i of each).
        for (sc, label) in [("ka1k", "POST 1 KiB"), ("get", "GET challenge")] {
            let off = load("hubgate", &format!("{sc}{topology}"));
            let on = load("hubgate-log", &format!("{sc}{topology}"));
            let ratios: Vec<f64> = on
                .iter()
                .filter_map(|r| {
                    let b = off.iter().find(|b| s(b, "rep") == s(r, "rep"))?;
                    let (x, y) = (n(r, "rps"), n(b, "rps"));
                    (x.is_finite() && y > 0.0).then_some(x / y)
                })
                .collect();
            if ratios.is_empty() {
                continue;
            }
            let (lo, hi) = min_max(&ratios);
            let _ = writeln!(
                md,
                "| access log on costs ≤ 10 % ({label}{where_}) | {}× of log-off req/s ({}–{}) | {} |",
                fmt_num(median(&ratios), 2),
                fmt_num(lo, 2),
                fmt_num(hi, 2),
                verdict(median(&ratios), lo, hi, 0.9, true)
            );
        }
    }
    {
        let h = idle_rss.get("hubgate").copied().unwrap_or(f64::NAN);
        let x = idle_rss.get("nginx").copied().unwrap_or(f64::NAN);
        let v = if h.is_finite() && x.is_finite() {
            if h <= x / 2.0 { "met" } else { "**missed**" }.to_string()
        } else {
            "not measured".into()
        };
        let _ = writeln!(
            md,
            "| 1,000 idle connections: RSS ≤ ½ nginx's | hubgate {} MiB vs nginx {} MiB ({}×) | {v} |",
            fmt_num(h / 1024.0, 1),
            fmt_num(x / 1024.0, 1),
            fmt_num(h / x, 2)
        );
    }

    // Micro-benchmark.
    let micro: Vec<&Obj> = of("micro").collect();
    if !micro.is_empty() {
        let _ = writeln!(
            md,
            "\n## Micro-benchmark (examples/microbench.rs, one core)\n"
        );
        let _ = writeln!(
            md,
            "| operation | input | ns/op | MB/s |\n|---|---|---|---|"
        );
        for r in micro {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                s(r, "op"),
                s(r, "input"),
                fmt_num(n(r, "ns_per_op"), 0),
                fmt_num(n(r, "mb_per_s"), 0)
            );
        }
    }
    print!("{md}");
    if let Err(e) = std::fs::write(&a.out, &md) {
        eprintln!("loadgen report: cannot write {}: {e}", a.out.display());
        return 1;
    }
    0
}
