//! The live event inspector: the last requests the gate finished, kept in memory only, for the
//! page and the JSON API the admin listener serves under `/inspector/` and `/api/events`
//! ([`api`]). Off unless `[admin] inspector = true`; when off, a request pays one branch.
//!
//! What a record holds and what it never holds:
//! - kept: time, route, method, verdict and reason (with a sentence that explains them),
//!   status, latency, client address and certificate CN, the request headers (the signature
//!   header among them), the body up to [`BODY_CAP`] bytes, which secret matched (its index and
//!   the route's count — never a secret), the backend's status, the spool ids;
//! - never: the query string (the verification request carries the verify token and the
//!   challenge there), and the values of `Authorization`, `Cookie` and `Proxy-Authorization`.
//!
//! Memory is bounded: at most `capacity` records, each at most [`BODY_CAP`] bytes of body and
//! [`HEADERS_CAP`] bytes of headers plus a few hundred bytes of fields: about 81 KiB × 500 =
//! 40 MiB with the default capacity, in the worst case of bodies over 64 KiB.

pub mod api;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use http::HeaderMap;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::gate::signature::SignatureMatch;
use crate::logging::AccessLine;

/// Body bytes kept per request.
pub const BODY_CAP: usize = 64 * 1024;
/// Header bytes (names and values) kept per request.
pub const HEADERS_CAP: usize = 16 * 1024;
/// Header values never kept.
const REDACTED: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// What the pipeline learns about a request while serving it, for its record.
#[derive(Default)]
pub struct Capture {
    /// The authority the client addressed: HTTP/2's `:authority`, else the `Host` header.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub headers_truncated: bool,
    pub body: Option<Bytes>,
    /// The verified signature, when one matched.
    pub signature: Option<SignatureMatch>,
    /// How many secrets the route has.
    pub secrets: usize,
    /// The backend's status (sync delivery; the last part's, for a split batch).
    pub backend_status: Option<u16>,
    /// Events stored in the spool for this request.
    pub spool_ids: Vec<i64>,
}

impl Capture {
    /// The request's authority, and its headers redacted and capped.
    pub fn new(uri: &http::Uri, headers: &HeaderMap) -> Capture {
        let authority = uri.authority().map(|a| a.as_str().to_owned()).or_else(|| {
            let host = headers.get(http::header::HOST)?;
            Some(String::from_utf8_lossy(host.as_bytes()).into_owned())
        });
        let mut kept = Vec::with_capacity(headers.len());
        let mut bytes = 0;
        let mut truncated = false;
        for (name, value) in headers {
            let value = if REDACTED.contains(&name.as_str()) {
                "(redacted)".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            bytes += name.as_str().len() + value.len();
            if bytes > HEADERS_CAP {
                truncated = true;
                break;
            }
            kept.push((name.as_str().to_owned(), value));
        }
        Capture {
            authority,
            headers: kept,
            headers_truncated: truncated,
            ..Capture::default()
        }
    }
}

/// The signature check, as the inspector shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SignatureView {
    pub algorithm: &'static str,
    /// Index into the route's `app_secrets`.
    pub secret_index: usize,
}

/// One finished request.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub id: u64,
    /// Unix milliseconds, when the request was received.
    pub time_ms: i64,
    /// The route's path, or `-` for an unknown path.
    pub route: String,
    /// The request's path, without its query string.
    pub path: String,
    /// The authority the client addressed (HTTP/2's `:authority`, else `Host`), for the
    /// page's "Copy as curl".
    pub authority: Option<String>,
    pub method: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    /// The verdict in plain words.
    pub explanation: String,
    pub status: u16,
    pub latency_us: u64,
    pub client: String,
    /// The verified client certificate's CN; `None`: no certificate.
    pub cn: Option<String>,
    pub body_size: usize,
    pub body_truncated: bool,
    pub signature: Option<SignatureView>,
    pub secrets: usize,
    pub backend_status: Option<u16>,
    pub spool_ids: Vec<i64>,
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub headers_truncated: bool,
    #[serde(skip)]
    pub body: Bytes,
}

/// What [`Inspector::record`] is given besides the capture: the request's access line, and
/// what the line leaves out.
pub struct Finished<'a> {
    pub line: &'a AccessLine<'a>,
    pub received: std::time::SystemTime,
    /// The request's path (the line has the route's, `-` for none).
    pub path: &'a str,
    /// The verified client CN (the line writes `-` for none).
    pub cn: Option<&'a str>,
}

/// The ring of recent requests and the live feed.
pub struct Inspector {
    capacity: usize,
    next_id: AtomicU64,
    ring: Mutex<VecDeque<std::sync::Arc<Record>>>,
    live: broadcast::Sender<std::sync::Arc<Record>>,
}

impl Inspector {
    pub fn new(capacity: usize) -> Inspector {
        let (live, _) = broadcast::channel(256);
        Inspector {
            capacity: capacity.max(1),
            next_id: AtomicU64::new(1),
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            live,
        }
    }

    /// Keeps a finished request (forgetting the oldest past the capacity) and sends it live.
    pub fn record(&self, done: Finished<'_>, capture: Capture) {
        let line = done.line;
        let (body, body_size, body_truncated) = match &capture.body {
            Some(b) => (
                b.slice(..b.len().min(BODY_CAP)),
                b.len(),
                b.len() > BODY_CAP,
            ),
            None => (Bytes::new(), 0, false),
        };
        let record = std::sync::Arc::new(Record {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            time_ms: done
                .received
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            route: line.route.to_owned(),
            path: done.path.to_owned(),
            authority: capture.authority,
            method: line.method.to_owned(),
            verdict: line.verdict,
            reason: line.reason,
            explanation: explain(line.verdict, line.reason, capture.secrets, done.cn),
            status: line.status,
            latency_us: u64::try_from(line.latency.as_micros()).unwrap_or(u64::MAX),
            client: line.client.to_string(),
            cn: done.cn.map(str::to_owned),
            body_size,
            body_truncated,
            signature: capture.signature.map(|s| SignatureView {
                algorithm: s.algorithm.as_str(),
                secret_index: s.secret_index,
            }),
            secrets: capture.secrets,
            backend_status: capture.backend_status,
            spool_ids: capture.spool_ids,
            headers: capture.headers,
            headers_truncated: capture.headers_truncated,
            // A copy: the body's own buffer is the request's, and may be far larger.
            body: Bytes::copy_from_slice(&body),
        });
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            while ring.len() >= self.capacity {
                ring.pop_front();
            }
            ring.push_back(record.clone());
        }
        // Nobody listening is fine.
        let _ = self.live.send(record);
    }

    /// The records matching `filter`, newest first, at most `limit`.
    pub fn list(&self, filter: &Filter, limit: usize) -> Vec<std::sync::Arc<Record>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter()
            .rev()
            .filter(|r| filter.matches(r))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn get(&self, id: u64) -> Option<std::sync::Arc<Record>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        // Ids grow with the ring's order: a binary search finds it.
        let i = ring.partition_point(|r| r.id < id);
        ring.get(i).filter(|r| r.id == id).cloned()
    }

    /// Records as they are kept, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<std::sync::Arc<Record>> {
        self.live.subscribe()
    }

    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the list is narrowed to (the API's query parameters).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub route: Option<String>,
    pub verdict: Option<String>,
    pub status: Option<u16>,
    /// Found in the path, the client, the CN, the verdict, the reason or the body.
    pub q: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        self.route.as_ref().is_none_or(|x| *x == r.route)
            && self.verdict.as_ref().is_none_or(|x| x == r.verdict)
            && self.status.is_none_or(|x| x == r.status)
            && self.q.as_ref().is_none_or(|q| {
                let q = q.to_lowercase();
                [
                    r.path.as_str(),
                    r.client.as_str(),
                    r.cn.as_deref().unwrap_or(""),
                    r.verdict,
                    r.reason,
                ]
                .iter()
                .any(|f| f.to_lowercase().contains(&q))
                    || String::from_utf8_lossy(&r.body).to_lowercase().contains(&q)
            })
    }
}

/// The verdict in plain words, for the detail view.
pub fn explain(verdict: &str, reason: &str, secrets: usize, cn: Option<&str>) -> String {
    let n = |k: usize| {
        if k == 1 {
            "the route's only secret".to_owned()
        } else {
            format!("none of the route's {k} secrets")
        }
    };
    match (verdict, reason) {
        ("forwarded", _) => "Authenticated and forwarded; the backend's answer was relayed.".into(),
        ("split", _) => "Authenticated, cut into parts, and every part delivered.".into(),
        ("spooled", _) => "Authenticated and stored durably in the spool; delivered from there.".into(),
        ("duplicate", _) => "Authenticated, and delivered before: answered 200 without delivering it again.".into(),
        ("challenge_ok", _) => "Verification request: the token matched and the challenge was echoed.".into(),
        ("bad_signature", "mismatch") => {
            if secrets == 1 {
                "The signature was not computed with the route's secret (a wrong app secret, or a changed body).".into()
            } else {
                format!("The signature was computed with {} (a wrong app secret, or a changed body).", n(secrets))
            }
        }
        ("bad_signature", "missing") => "No X-Hub-Signature-256 header: Meta signs every event.".into(),
        ("bad_signature", r) => format!("The signature header is malformed ({}).", r.replace('_', " ")),
        ("bad_challenge", "wrong_token") => "Verification request with a verify token other than the route's.".into(),
        ("bad_challenge", r) => format!("Malformed verification request ({}).", r.replace('_', " ")),
        ("client_cert_required", _) => match cn {
            None => "The route requires a client certificate, and the connection presented none.".into(),
            Some(_) => "The route requires a verified client certificate.".into(),
        },
        ("no_route", _) => "No route is configured for this path.".into(),
        ("bad_method", _) => "Only GET (verification) and POST (events) are served.".into(),
        ("body_too_large", _) => "The body is larger than server.max_body_bytes.".into(),
        ("body_timeout", _) => "The body did not arrive within server.body_timeout.".into(),
        ("body_error", _) => "The body could not be read (the client broke off or sent bad framing).".into(),
        ("overloaded", _) => "Too many request bytes in memory at once (server.max_buffered_bytes): 503, Meta retries.".into(),
        ("upstream_unreachable", _) => "The backend could not be reached: 502, Meta retries.".into(),
        ("upstream_timeout", _) => "The backend did not answer within upstream.timeout: 504, Meta retries.".into(),
        ("upstream_bad_response", _) => "The backend's answer was unusable: 502, Meta retries.".into(),
        ("spool_full", _) => "The spool is full: 503, Meta retries.".into(),
        ("spool_error", _) | ("spool_unavailable", _) => "The spool could not store the event: 503, Meta retries.".into(),
        ("source_not_allowed", _) => "The client address is not in server.allow_sources.".into(),
        ("bad_identity_header", _) => "A trusted proxy's identity header did not pass verification.".into(),
        (v, r) => format!("{v} ({r})"),
    }
}

/// The body as text: valid UTF-8 kept as is (newlines and tabs included); every other control
/// character and every byte that is not UTF-8 written `\xNN`.
pub fn body_text(body: &[u8]) -> String {
    let mut out = String::with_capacity(body.len());
    for chunk in body.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn line(verdict: &'static str) -> AccessLine<'static> {
        AccessLine {
            peer: ([127, 0, 0, 1], 40000).into(),
            client: [127, 0, 0, 1].into(),
            route: "/webhook",
            method: "POST",
            verdict,
            reason: "-",
            status: 200,
            latency: Duration::from_micros(250),
            client_cn: "-",
        }
    }

    fn finished<'a>(line: &'a AccessLine<'a>) -> Finished<'a> {
        Finished {
            line,
            received: std::time::SystemTime::now(),
            path: "/webhook",
            cn: None,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_up_to_its_capacity() {
        let inspector = Inspector::new(3);
        for i in 0..5u8 {
            let c = Capture {
                body: Some(Bytes::from(vec![i])),
                ..Capture::default()
            };
            inspector.record(finished(&line("forwarded")), c);
        }
        let all = inspector.list(&Filter::default(), 100);
        assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [5, 4, 3]);
        assert!(inspector.get(2).is_none(), "evicted");
        assert_eq!(&inspector.get(4).unwrap().body[..], [3]);
        assert_eq!(inspector.list(&Filter::default(), 2).len(), 2);
    }

    #[test]
    fn bodies_and_headers_are_capped_and_secrets_redacted() {
        let inspector = Inspector::new(2);
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer hunter2".parse().unwrap());
        headers.insert("cookie", "session=hunter2".parse().unwrap());
        headers.insert("x-hub-signature-256", "sha256=00".parse().unwrap());
        for i in 0..200 {
            headers.append("x-filler", format!("{i:0100}").parse().unwrap());
        }
        let mut c = Capture::new(&http::Uri::from_static("/webhook"), &headers);
        c.body = Some(Bytes::from(vec![b'a'; BODY_CAP + 10]));
        inspector.record(finished(&line("forwarded")), c);
        let r = inspector.get(1).unwrap();
        assert_eq!(r.body.len(), BODY_CAP);
        assert_eq!(r.body_size, BODY_CAP + 10);
        assert!(r.body_truncated);
        assert!(r.headers_truncated);
        let size: usize = r.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert!(size <= HEADERS_CAP);
        let value = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(value("authorization").as_deref(), Some("(redacted)"));
        assert_eq!(value("cookie").as_deref(), Some("(redacted)"));
        assert_eq!(value("x-hub-signature-256").as_deref(), Some("sha256=00"));
        let json = serde_json::to_string(&*r).unwrap();
        assert!(!json.contains("hunter2"));
    }

    #[test]
    fn filters_narrow_by_route_verdict_status_and_text() {
        let inspector = Inspector::new(10);
        let c = Capture {
            body: Some(Bytes::from_static(b"{\"needle\":1}")),
            ..Capture::default()
        };
        inspector.record(finished(&line("forwarded")), c);
        let refused = AccessLine {
            status: 403,
            reason: "mismatch",
            ..line("bad_signature")
        };
        inspector.record(finished(&refused), Capture::default());
        let f = |verdict: Option<&str>, status: Option<u16>, q: Option<&str>| Filter {
            route: Some("/webhook".into()),
            verdict: verdict.map(str::to_owned),
            status,
            q: q.map(str::to_owned),
        };
        assert_eq!(inspector.list(&f(None, None, None), 10).len(), 2);
        assert_eq!(
            inspector.list(&f(Some("bad_signature"), None, None), 10)[0].id,
            2
        );
        assert_eq!(inspector.list(&f(None, Some(200), None), 10)[0].id, 1);
        assert_eq!(inspector.list(&f(None, None, Some("NEEDLE")), 10)[0].id, 1);
        assert_eq!(
            inspector.list(&f(None, None, Some("MISMATCH")), 10)[0].id,
            2
        );
        let other = Filter {
            route: Some("/other".into()),
            ..Filter::default()
        };
        assert!(inspector.list(&other, 10).is_empty());
    }

    #[test]
    fn explanations_name_the_secret_count_never_a_secret() {
        assert_eq!(
            explain("bad_signature", "mismatch", 2, None),
            "The signature was computed with none of the route's 2 secrets (a wrong app secret, or a changed body)."
        );
        assert!(explain("client_cert_required", "-", 1, None).contains("presented none"));
    }

    #[test]
    fn body_text_escapes_what_is_not_printable_and_keeps_the_rest_byte_for_byte() {
        assert_eq!(
            body_text(b"{\"a\":\"\\u00e4\"}\n\tok \xff\x00\x1b[31m \xc3\xa4"),
            "{\"a\":\"\\u00e4\"}\n\tok \\xff\\x00\\x1b[31m \u{e4}"
        );
    }
}
