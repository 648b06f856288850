//! The process's log output, built for a log line per request: every line (access lines and
//! tracing's events alike) is appended to one in-memory buffer, and a thread of its own writes
//! the buffer out in batches, the way nginx's `access_log … buffer= flush=` does.
//!
//! - A request never waits for the output: appending is a short lock and a copy. When the
//!   output stalls (a pipe nobody reads, a slow disk) the buffer fills up to [`CAPACITY`], then
//!   lines are dropped and counted ([`dropped_lines`], `hubgate_log_lines_dropped_total`).
//! - A request does not wake the writer either: lines gather for [`FLUSH_EVERY`] (or until
//!   [`FLUSH_AT`] bytes are waiting) and go out in one `write`. Warnings and errors are written
//!   at once, and everything buffered is written before the process exits ([`LogGuard`]).
//! - Access lines are formatted here, field by field, straight into a reused buffer: at one
//!   line per request, tracing-subscriber's generic formatter cost as much as answering a
//!   hub.challenge (bench/cost.sh). The format is the same as tracing's text or JSON line.
//!
//! A library user that does not call [`install`] gets the access line as an ordinary tracing
//! event (target `hubgate::access`).

use std::cell::RefCell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// How long lines gather before they are written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that make the writer write without waiting for [`FLUSH_EVERY`].
pub const FLUSH_AT: usize = 64 * 1024;
/// Bytes the buffer holds at most while the output is stalled (~64k access lines); further
/// lines are dropped and counted. (The writer may hold as much again: the batch it is stuck
/// writing.)
pub const CAPACITY: usize = 16 * 1024 * 1024;
/// How long [`LogGuard`]'s drop waits for the last lines to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Lines dropped because the buffer was full, since the process started.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because the output could not keep up (for `/metrics`).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `2026-12-01T13:48:33.410986Z  INFO hubgate::access: request peer=… status=200 …`
    Text,
    /// One JSON object per line, fields flattened (tracing-subscriber's `json().flatten_event`).
    Json,
}

/// The shared buffer and its writer thread. Cloning shares it.
#[derive(Clone)]
pub struct LogBuffer {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    flush_every: Duration,
    /// Lines this buffer dropped (the process-wide count is [`dropped_lines`]).
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// A warning or error is waiting: write without gathering.
    urgent: bool,
    closing: bool,
}

/// Writes what is buffered when dropped (waiting [`CLOSE_WAIT`] at most: a stalled output
/// must not keep the process from exiting).
pub struct LogGuard {
    buffer: LogBuffer,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.buffer.inner.state.lock().unwrap().closing = true;
        self.buffer.inner.wake.notify_one();
        let _ = self.done.recv_timeout(CLOSE_WAIT);
    }
}

impl LogBuffer {
    /// Starts the writer thread over `out`.
    pub fn start(out: impl Write + Send + 'static) -> (LogBuffer, LogGuard) {
        LogBuffer::start_with(out, FLUSH_EVERY)
    }

    /// [`LogBuffer::start`] with lines gathering for `flush_every` instead of [`FLUSH_EVERY`].
    pub fn start_with(
        mut out: impl Write + Send + 'static,
        flush_every: Duration,
    ) -> (LogBuffer, LogGuard) {
        let buffer = LogBuffer {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                flush_every,
                dropped: AtomicU64::new(0),
            }),
        };
        let (done_tx, done) = std::sync::mpsc::channel();
        let inner = buffer.inner.clone();
        std::thread::Builder::new()
            .name("hubgate-log".into())
            .spawn(move || {
                inner.write_out(&mut out);
                let _ = done_tx.send(());
            })
            .expect("cannot start the log writer thread");
        (buffer.clone(), LogGuard { buffer, done })
    }

    /// Appends one whole line (its newline included). `urgent`: write it without gathering.
    pub fn push(&self, line: &[u8], urgent: bool) {
        let mut st = self.inner.state.lock().unwrap();
        let before = st.buf.len();
        if before + line.len() > CAPACITY {
            drop(st);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.buf.extend_from_slice(line);
        // Wake the writer when it may be waiting for a first line, on reaching FLUSH_AT, or for
        // a warning; otherwise it is gathering and wakes by itself.
        let wake = before == 0
            || (before < FLUSH_AT && st.buf.len() >= FLUSH_AT)
            || (urgent && !st.urgent);
        st.urgent |= urgent;
        drop(st);
        if wake {
            self.inner.wake.notify_one();
        }
    }

    /// Lines this buffer dropped because it was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// The writer thread: waits for lines, gathers them, writes them in one go; ends once
    /// closing with nothing left.
    fn write_out(&self, out: &mut dyn Write) {
        let mut batch = Vec::with_capacity(FLUSH_AT);
        loop {
            let mut st = self.state.lock().unwrap();
            while st.buf.is_empty() && !st.closing {
                st = self.wake.wait(st).unwrap();
            }
            if st.buf.is_empty() {
                return; // closing, and everything is written
            }
            if !st.urgent && !st.closing && st.buf.len() < FLUSH_AT {
                st = self
                    .wake
                    .wait_timeout_while(st, self.flush_every, |s| {
                        !s.urgent && !s.closing && s.buf.len() < FLUSH_AT
                    })
                    .unwrap()
                    .0;
            }
            std::mem::swap(&mut st.buf, &mut batch);
            st.urgent = false;
            drop(st);
            // A failed write (a closed pipe) loses these lines; the process goes on.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // After a stall the batch may have grown to CAPACITY: do not keep that much.
            batch.shrink_to(FLUSH_AT);
        }
    }
}

/// tracing-subscriber's writer: one `write_all` per formatted event.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            buffer: self,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter {
            buffer: self,
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// One event's bytes into the [`LogBuffer`].
pub struct LineWriter<'a> {
    buffer: &'a LogBuffer,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.push(bytes, self.urgent);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where access lines go once [`install`] ran.
struct AccessSink {
    buffer: LogBuffer,
    format: Format,
    /// `RUST_LOG` lets `hubgate::access` at INFO through.
    enabled: bool,
}

static ACCESS: OnceLock<AccessSink> = OnceLock::new();

/// Sends access lines to `buffer` in `format` from now on (once per process; later calls are
/// ignored). `enabled` is whether the log filter admits target `hubgate::access` at INFO.
pub fn install(buffer: LogBuffer, format: Format, enabled: bool) {
    let _ = ACCESS.set(AccessSink {
        buffer,
        format,
        enabled,
    });
}

/// One request's access line.
pub struct AccessLine<'a> {
    pub peer: SocketAddr,
    pub client: IpAddr,
    pub route: &'a str,
    pub method: &'a str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub status: u16,
    pub latency: Duration,
    pub client_cn: &'a str,
}

impl AccessLine<'_> {
    /// Logs the line (unless the log filter excludes access lines).
    pub fn log(&self) {
        match ACCESS.get() {
            Some(sink) if sink.enabled => {
                thread_local! {
                    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
                }
                LINE.with_borrow_mut(|line| {
                    line.clear();
                    self.format(sink.format, SystemTime::now(), line);
                    sink.buffer.push(line, false);
                });
            }
            Some(_) => {}
            None => tracing::info!(
                target: "hubgate::access",
                peer = %self.peer,
                client = %self.client,
                route = self.route,
                method = self.method,
                verdict = self.verdict,
                reason = self.reason,
                status = self.status,
                latency_ms = self.latency.as_secs_f64() * 1000.0,
                client_cn = self.client_cn,
                "request"
            ),
        }
    }

    /// The line in `format`, newline included, appended to `out`. Written piece by piece
    /// (no `format!` machinery: at a line per request it is most of the line's cost).
    pub fn format(&self, format: Format, now: SystemTime, out: &mut Vec<u8>) {
        let text = format == Format::Text;
        if !text {
            out.extend_from_slice(b"{\"timestamp\":\"");
        }
        timestamp(out, now);
        out.extend_from_slice(if text {
            b"  INFO hubgate::access: request peer="
        } else {
            b"\",\"level\":\"INFO\",\"message\":\"request\",\"peer\":\""
        });
        socket_addr(out, self.peer);
        out.extend_from_slice(if text {
            b" client="
        } else {
            b"\",\"client\":\""
        });
        ip_addr(out, self.client);
        out.extend_from_slice(if text { b" route=" } else { b"\",\"route\":" });
        quoted(out, self.route);
        if text {
            out.extend_from_slice(b" method=");
            out.extend_from_slice(self.method.as_bytes());
        } else {
            out.extend_from_slice(b",\"method\":");
            quoted(out, self.method);
        }
        out.extend_from_slice(if text { b" verdict=" } else { b",\"verdict\":" });
        quoted(out, self.verdict);
        out.extend_from_slice(if text { b" reason=" } else { b",\"reason\":" });
        quoted(out, self.reason);
        out.extend_from_slice(if text { b" status=" } else { b",\"status\":" });
        number(out, self.status.into());
        out.extend_from_slice(if text {
            b" latency_ms="
        } else {
            b",\"latency_ms\":"
        });
        // Milliseconds with three decimals (microseconds).
        let micros = u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX);
        number(out, micros / 1000);
        let frac = micros % 1000;
        out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        out.extend_from_slice(if text {
            b" client_cn="
        } else {
            b",\"client_cn\":"
        });
        quoted(out, self.client_cn);
        out.extend_from_slice(if text {
            b"\n"
        } else {
            b",\"target\":\"hubgate::access\"}\n"
        });
    }
}

/// `now` as RFC 3339 in UTC with microseconds (`2026-12-01T13:48:33.410986Z`), as humantime
/// writes it. The part down to the second changes once a second: it is formatted then and kept
/// (per thread), and only the microseconds are written for each line.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    thread_local! {
        /// The second last formatted and its text up to the decimal point.
        static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    // A clock set before 1970 (humantime would panic) is written as the epoch.
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != since.as_secs() {
            *second = since.as_secs();
            text.clear();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            text.pop(); // the 'Z'
        }
        out.extend_from_slice(text);
    });
    let micros = since.subsec_micros();
    let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
    let mut rest = micros;
    for d in digits[1..7].iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits);
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// As `Display` writes it; IPv4 (nearly every line) without the formatting machinery.
fn ip_addr(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, octet.into());
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => ip_addr(out, IpAddr::V4(*a.ip())),
        SocketAddr::V6(a) => {
            out.push(b'[');
            ip_addr(out, IpAddr::V6(*a.ip()));
            if a.scope_id() != 0 {
                out.push(b'%');
                number(out, a.scope_id().into());
            }
            out.push(b']');
        }
    }
    out.push(b':');
    number(out, addr.port().into());
}

/// `s` as a JSON string: quoted, with quotes, backslashes and control characters escaped (so a
/// value can never end the field or the line early, in either format).
fn quoted(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine<'static> {
        AccessLine {
            peer: "127.0.0.1:43146".parse().unwrap(),
            client: "10.0.0.7".parse().unwrap(),
            route: "/webhook",
            method: "POST",
            verdict: "forwarded",
            reason: "-",
            status: 200,
            latency: Duration::from_micros(1_234),
            client_cn: "client.webhooks.fbclientcerts.com",
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_132_913_410_986)
    }

    #[test]
    fn timestamps_are_written_as_humantime_writes_them() {
        // Within one second (the cached part reused), across seconds, days and years, with
        // leading zeros in the microseconds; a clock before 1970 reads as the epoch.
        let base = at();
        let times = [
            base,
            base + Duration::from_micros(1),
            base + Duration::from_micros(589_013),
            base + Duration::from_micros(589_014),
            base + Duration::from_secs(86_400 * 30) + Duration::from_micros(7),
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_798_761_599)
                + Duration::from_micros(999_999),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_761_600),
            SystemTime::UNIX_EPOCH,
        ];
        for t in times {
            let mut out = Vec::new();
            timestamp(&mut out, t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_micros(t).to_string(),
                "{t:?}"
            );
        }
        let mut out = Vec::new();
        timestamp(
            &mut out,
            SystemTime::UNIX_EPOCH - Duration::from_micros(1_500_000),
        );
        assert_eq!(out, b"1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn text_line_has_tracings_shape() {
        let mut out = Vec::new();
        line().format(Format::Text, at(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-01T13:48:33.410986Z  INFO hubgate::access: request peer=127.0.0.1:43146 \
             client=10.0.0.7 route=\"/webhook\" method=POST verdict=\"forwarded\" reason=\"-\" \
             status=200 latency_ms=1.234 client_cn=\"client.webhooks.fbclientcerts.com\"\n"
        );
    }

    #[test]
    fn json_line_parses_with_every_field() {
        let mut out = Vec::new();
        let mut l = line();
        l.client_cn = "evil\"\n\\cn\u{7f}";
        l.latency = Duration::from_micros(17);
        l.format(Format::Json, at(), &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2026-12-01T13:48:33.410986Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "hubgate::access");
        assert_eq!(v["peer"], "127.0.0.1:43146");
        assert_eq!(v["client"], "10.0.0.7");
        assert_eq!(v["status"], 200);
        assert_eq!(v["latency_ms"], 0.017);
        assert_eq!(v["client_cn"], "evil\"\n\\cn\u{7f}");
    }

    #[test]
    fn a_value_cannot_break_the_text_line() {
        let mut out = Vec::new();
        let mut l = line();
        l.route = "/a\" verdict=\"forwarded";
        l.client_cn = "x\ny";
        l.format(Format::Text, at(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(r#"route="/a\" verdict=\"forwarded""#),
            "{text}"
        );
        assert!(text.contains(r#"client_cn="x\ny""#), "{text}");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for addr in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.30.40:443",
            "[::1]:8443",
            "[fe80::1%7]:80",
            "[2001:db8::ff00:42:8329]:1",
        ] {
            let a: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            socket_addr(&mut out, a);
            assert_eq!(String::from_utf8(out).unwrap(), a.to_string());
            let mut out = Vec::new();
            ip_addr(&mut out, a.ip());
            assert_eq!(String::from_utf8(out).unwrap(), a.ip().to_string());
        }
    }

    /// An output that records each write and can be made to block.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _held = self.gate.lock().unwrap();
            self.writes.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_batches_and_flushed_at_close() {
        let out = Recorder::default();
        let (buffer, guard) = LogBuffer::start(out.clone());
        for i in 0..1000 {
            buffer.push(format!("line {i}\n").as_bytes(), false);
        }
        drop(guard);
        let writes = out.writes.lock().unwrap();
        let all: Vec<u8> = writes.concat();
        let text = String::from_utf8(all).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert!(text
            .lines()
            .enumerate()
            .all(|(i, l)| l == format!("line {i}")));
        assert!(
            writes.len() < 50,
            "1,000 lines pushed at once are written in a few batches, not {} writes",
            writes.len()
        );
    }

    #[test]
    fn a_stalled_output_drops_lines_instead_of_blocking() {
        let out = Recorder::default();
        let stall = out.gate.lock().unwrap();
        let (buffer, guard) = LogBuffer::start(out.clone());
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        // The writer may hold one full buffer (blocked writing it) while the next one fills.
        let pushes = 2 * CAPACITY / line.len() + 1000;
        // With the output blocked, this loop ends only if pushing never waits for it.
        for _ in 0..pushes {
            buffer.push(&line, false);
        }
        let dropped = buffer.dropped() as usize;
        assert!(
            dropped >= 500,
            "lines over the capacity are dropped: {dropped}"
        );
        assert!(
            dropped_lines() >= dropped as u64,
            "and counted process-wide"
        );
        drop(stall);
        drop(guard);
        let written: usize = out.writes.lock().unwrap().iter().map(Vec::len).sum();
        assert_eq!(
            written,
            (pushes - dropped) * line.len(),
            "every line written or counted"
        );
    }

    #[test]
    fn a_warning_is_written_without_waiting_for_the_batch() {
        let out = Recorder::default();
        // Lines gather for an hour: only a warning (or closing) gets them written.
        let (buffer, guard) = LogBuffer::start_with(out.clone(), Duration::from_secs(3600));
        buffer.push(b"access\n", false);
        buffer.push(b"warning\n", true);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.writes.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the warning is written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.writes.lock().unwrap().concat(), b"access\nwarning\n");
        buffer.push(b"later\n", false);
        drop(guard);
        assert_eq!(
            out.writes.lock().unwrap().concat(),
            b"access\nwarning\nlater\n",
            "closing writes what gathered"
        );
    }
}
