//! The inspector's page and JSON API on the admin listener.
//!
//! | path | what |
//! |---|---|
//! | `GET /inspector/` | the page (static files embedded in the binary: `page/`) |
//! | `GET /api/events` | newest first; filters `route`, `verdict`, `status`, `q`; `limit` (default 200) |
//! | `GET /api/events/{id}` | one request: headers, body (text and base64), spool state |
//! | `GET /api/events/stream` | Server-Sent Events: one `request` event per finished request |
//! | `POST /api/events/{id}/replay` | puts the request's dead spool events back in the queue |
//!
//! Access: with `[admin] token`, every path asks for it — `Authorization: Bearer <token>`, or
//! the session cookie the page's login form sets (an HMAC of the token, `HttpOnly`,
//! `SameSite=Strict`) — compared in constant time. Without a token the admin listener is on
//! loopback (configuration refuses otherwise). A `POST` from a browser must come from the
//! page's own origin (`Origin`, `Sec-Fetch-Site`): another site cannot make the browser replay.
//!
//! The page renders every string from a request as text (`textContent`, never HTML), and the
//! Content-Security-Policy allows only the page's own script and style.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc};

use super::{body_text, Filter, Inspector, Record};
use crate::secret::Secret;
use crate::spool::{ReplayTarget, Spool, SpoolError};

/// The admin listener's response body: whole, or a stream of events.
pub type AdminBody = Either<Full<Bytes>, EventStream>;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";
const COOKIE: &str = "hubgate_inspector";
/// How often the stream sends a comment, so that proxies and the page see it alive.
const HEARTBEAT: Duration = Duration::from_secs(15);

const INDEX_HTML: &str = include_str!("page/index.html");
const LOGIN_HTML: &str = include_str!("page/login.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// What the inspector's handlers need.
pub struct Api<'a> {
    pub inspector: &'a Arc<Inspector>,
    pub token: Option<&'a Secret>,
    pub spool: Option<&'a Spool>,
}

/// Whether `path` is the inspector's (else the admin listener's own paths).
pub fn owns(path: &str) -> bool {
    path == "/inspector" || path.starts_with("/inspector/") || path.starts_with("/api/")
}

impl Api<'_> {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<AdminBody> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if method == Method::POST && !same_origin(&req) {
            return text(StatusCode::FORBIDDEN, "cross-origin request refused\n");
        }
        // The login form and the files it needs are the only things served without the token.
        match (&method, path.as_str()) {
            (&Method::GET, "/inspector") => return redirect("/inspector/"),
            (&Method::GET, "/inspector/app.css") => {
                return asset(APP_CSS, "text/css; charset=utf-8")
            }
            (&Method::POST, "/inspector/login") => return self.login(req).await,
            _ => {}
        }
        if !self.authorized(&req) {
            if method == Method::GET && path == "/inspector/" {
                return page(LOGIN_HTML);
            }
            return text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        }
        match (&method, path.as_str()) {
            (&Method::GET, "/inspector/") => page(INDEX_HTML),
            (&Method::GET, "/inspector/app.js") => asset(APP_JS, "text/javascript; charset=utf-8"),
            (&Method::GET, "/api/events") => self.list(req.uri().query()),
            (&Method::GET, "/api/events/stream") => self.stream(),
            _ => match event_path(&path) {
                Some((id, None)) if method == Method::GET => self.detail(id).await,
                Some((id, Some("replay"))) if method == Method::POST => self.replay(id).await,
                Some(_) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }

    /// The session cookie's value: an HMAC of the token, so the token itself never sits in a
    /// cookie jar.
    fn session(token: &Secret) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(token.expose()).expect("any key length");
        mac.update(b"hubgate inspector session v1");
        hex::encode(mac.finalize().into_bytes())
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = self.token else {
            return true;
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.expose())));
        if bearer {
            return true;
        }
        let session = Self::session(token);
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .any(|given| bool::from(given.as_bytes().ct_eq(session.as_bytes())))
    }

    async fn login(&self, req: Request<Incoming>) -> Response<AdminBody> {
        let Some(token) = self.token else {
            return redirect("/inspector/");
        };
        let Ok(body) = Limited::new(req.into_body(), 4096).collect().await else {
            return text(StatusCode::BAD_REQUEST, "bad form\n");
        };
        let given = form_urlencoded::parse(&body.to_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if !bool::from(given.as_bytes().ct_eq(token.expose())) {
            tracing::warn!("inspector: login with a wrong token");
            let mut r = page(LOGIN_HTML);
            *r.status_mut() = StatusCode::FORBIDDEN;
            return r;
        }
        let mut r = redirect("/inspector/");
        let cookie = format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
            Self::session(token)
        );
        r.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("hex is a valid header value"),
        );
        r
    }

    fn list(&self, query: Option<&str>) -> Response<AdminBody> {
        let mut filter = Filter::default();
        let mut limit = 200usize;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let v = v.into_owned();
            if v.is_empty() {
                continue;
            }
            match &*k {
                "route" => filter.route = Some(v),
                "verdict" => filter.verdict = Some(v),
                "status" => match v.parse() {
                    Ok(s) => filter.status = Some(s),
                    Err(_) => return text(StatusCode::BAD_REQUEST, "status: not a number\n"),
                },
                "q" => filter.q = Some(v),
                "limit" => match v.parse::<usize>() {
                    Ok(n) => limit = n.clamp(1, 10_000),
                    Err(_) => return text(StatusCode::BAD_REQUEST, "limit: not a number\n"),
                },
                _ => {}
            }
        }
        #[derive(Serialize)]
        struct List<'a> {
            events: Vec<&'a Record>,
            capacity: usize,
        }
        let records = self.inspector.list(&filter, limit);
        json(&List {
            events: records.iter().map(|r| &**r).collect(),
            capacity: self.inspector.capacity,
        })
    }

    async fn detail(&self, id: u64) -> Response<AdminBody> {
        let Some(record) = self.inspector.get(id) else {
            return text(
                StatusCode::NOT_FOUND,
                "no such request (or no longer kept)\n",
            );
        };
        #[derive(Serialize)]
        struct SpoolState {
            id: i64,
            state: String,
            attempts: Option<u32>,
            last_error: Option<String>,
        }
        #[derive(Serialize)]
        struct Detail<'a> {
            #[serde(flatten)]
            record: &'a Record,
            headers: &'a [(String, String)],
            headers_truncated: bool,
            body_text: String,
            body_base64: String,
            spool: Vec<SpoolState>,
        }
        let mut spool = Vec::new();
        if let Some(s) = self.spool {
            for &sid in &record.spool_ids {
                spool.push(match s.show(sid).await {
                    Ok(d) => SpoolState {
                        id: sid,
                        state: d.info.state.as_str().to_owned(),
                        attempts: Some(d.info.attempts),
                        last_error: d.info.last_error,
                    },
                    Err(SpoolError::NotFound(_)) => SpoolState {
                        id: sid,
                        state: "delivered".to_owned(),
                        attempts: None,
                        last_error: None,
                    },
                    Err(e) => SpoolState {
                        id: sid,
                        state: "unknown".to_owned(),
                        attempts: None,
                        last_error: Some(e.to_string()),
                    },
                });
            }
        }
        json(&Detail {
            record: &record,
            headers: &record.headers,
            headers_truncated: record.headers_truncated,
            body_text: body_text(&record.body),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&record.body),
            spool,
        })
    }

    async fn replay(&self, id: u64) -> Response<AdminBody> {
        let Some(record) = self.inspector.get(id) else {
            return text(
                StatusCode::NOT_FOUND,
                "no such request (or no longer kept)\n",
            );
        };
        let (Some(spool), false) = (self.spool, record.spool_ids.is_empty()) else {
            return text(StatusCode::CONFLICT, "not a spooled event\n");
        };
        let mut replayed = 0u64;
        for &sid in &record.spool_ids {
            match spool.replay(ReplayTarget::One(sid)).await {
                Ok(n) => replayed += n,
                Err(e @ (SpoolError::NotDead { .. } | SpoolError::NotFound(_))) => {
                    return text(StatusCode::CONFLICT, &format!("{e}\n"));
                }
                Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")),
            }
        }
        tracing::info!(
            request = id,
            events = replayed,
            "inspector: dead events replayed"
        );
        json(&serde_json::json!({ "replayed": replayed }))
    }

    fn stream(&self) -> Response<AdminBody> {
        let mut live = self.inspector.subscribe();
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            if tx
                .send(Bytes::from_static(b": connected\n\n"))
                .await
                .is_err()
            {
                return;
            }
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.tick().await;
            loop {
                let frame = tokio::select! {
                    r = live.recv() => match r {
                        Ok(record) => {
                            let data = serde_json::to_string(&*record).unwrap_or_default();
                            Bytes::from(format!("event: request\nid: {}\ndata: {data}\n\n", record.id))
                        }
                        // A slow page missed some: it is told, and reloads the list.
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            Bytes::from(format!("event: lagged\ndata: {n}\n\n"))
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = beat.tick() => Bytes::from_static(b": heartbeat\n\n"),
                };
                // The page went away: the body was dropped with the receiver.
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(Either::Right(EventStream(rx)));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

/// Server-Sent Events as they come: the body of `/api/events/stream`.
pub struct EventStream(mpsc::Receiver<Bytes>);

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// `/api/events/{id}` or `/api/events/{id}/{action}`.
fn event_path(path: &str) -> Option<(u64, Option<&str>)> {
    let rest = path.strip_prefix("/api/events/")?;
    let (id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    Some((id.parse().ok()?, action))
}

/// A browser's POST must come from this listener's own page. Browsers say where a request
/// comes from in `Sec-Fetch-Site`; older ones only in `Origin`. A request with neither is not a
/// browser's (curl, scripts) and is judged by its token alone.
fn same_origin(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin";
    }
    match h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
            host.is_some_and(|host| origin == format!("http://{host}"))
        }
    }
}

fn with_security_headers(mut r: Response<AdminBody>) -> Response<AdminBody> {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<AdminBody> {
    let mut r = Response::new(Either::Left(Full::new(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    with_security_headers(r)
}

fn text(status: StatusCode, body: &str) -> Response<AdminBody> {
    full(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.to_owned()),
    )
}

fn page(html: &'static str) -> Response<AdminBody> {
    full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(html.as_bytes()),
    )
}

fn asset(body: &'static str, content_type: &'static str) -> Response<AdminBody> {
    full(
        StatusCode::OK,
        content_type,
        Bytes::from_static(body.as_bytes()),
    )
}

fn json<T: Serialize>(value: &T) -> Response<AdminBody> {
    match serde_json::to_vec(value) {
        Ok(v) => full(StatusCode::OK, "application/json", Bytes::from(v)),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn redirect(to: &'static str) -> Response<AdminBody> {
    let mut r = full(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        Bytes::new(),
    );
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}
