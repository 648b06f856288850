//! One request, top to bottom, in named stages:
//!
//! 1. `handle`: who the client is (address after trusted proxies) and which route;
//! 2. `admit`: the client policy for that route (allow-list behind a proxy, identity header,
//!    the route's certificate requirement);
//! 3. `challenge` for a `GET`, or for a `POST` `read_body` (limits, budget, deadline) then
//!    `verify` (the signature over the raw bytes);
//! 4. `deliver`: forward now (`forward`) or store in the spool (`spool`);
//! 5. back in `handle`: the response, one access-log line and the metrics of its `Outcome`.
//!
//! A stage that refuses returns `Err(Outcome)`; the refusal's response comes from the outcome.

pub mod outcome;
mod split;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

pub use outcome::Outcome;

use crate::config::{Delivery, RouteClientCert, SplitMode};
use crate::deliver::spool as spooling;
use crate::deliver::upstream::error_chain;
use crate::deliver::ForwardError;
use crate::gate::challenge;
use crate::gate::signature::SignatureMatch;
use crate::identity::{ClientContext, Peer};
use crate::inspect::{Capture, Finished};
use crate::logging::AccessLine;
use crate::spool::Accepted;
use crate::state::{Generation, RouteState, Shared};

type Reply = (Outcome, Response<Full<Bytes>>);

/// One request, start to finish.
pub(crate) async fn handle(
    generation: &Generation,
    shared: &Shared,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = req.method().clone();
    let mut client = generation.clients.client(peer, req.headers());
    let route = generation.routes.get(req.uri().path());
    let head = check_head(generation, &req);
    // Only with the inspector on: the request's headers and path, and what serving it learns.
    let mut inspected = shared.inspector.as_ref().map(|_| {
        (
            Capture::new(req.uri(), req.headers()),
            req.uri().path().to_owned(),
            std::time::SystemTime::now(),
        )
    });
    let capture = inspected.as_mut().map(|(c, _, _)| c);
    let result = match (head, route) {
        (Err(refused), _) => Err(refused),
        (Ok(()), None) => Err(Outcome::NotFound),
        (Ok(()), Some(route)) => {
            serve_route(generation, shared, route, &mut client, req, capture).await
        }
    };
    let (outcome, response) = result.unwrap_or_else(|o| {
        let r = o.refusal();
        (o, r)
    });
    let status = response.status();
    let line = AccessLine {
        peer: client.peer,
        client: client.address,
        route: route.map_or("-", |r| r.route.path.as_str()),
        method: method.as_str(),
        verdict: outcome.verdict(),
        reason: outcome.reason(),
        status: status.as_u16(),
        latency: started.elapsed(),
        client_cn: client.cn().unwrap_or("-"),
    };
    line.log();
    let label = route.map_or(&generation.no_route_label, |r| &r.label);
    outcome.record(&shared.metrics, label, status);
    if let (Some(inspector), Some((mut capture, path, received))) = (&shared.inspector, inspected) {
        if let Outcome::Forwarded(s) = outcome {
            capture.backend_status = Some(s.as_u16());
        }
        capture.secrets = route.map_or(0, |r| r.route.app_secrets.len());
        let done = Finished {
            line: &line,
            received,
            path: &path,
            cn: client.cn(),
        };
        inspector.record(done, capture);
    }
    response
}

/// The request's head within the limits: `Host` on HTTP/1.1 (RFC 9112 §3.2), at most
/// `server.max_headers` fields and `server.max_header_bytes` of names and values, whatever the
/// protocol.
fn check_head(generation: &Generation, req: &Request<Incoming>) -> Result<(), Outcome> {
    let headers = req.headers();
    if req.version() == http::Version::HTTP_11 && !headers.contains_key(header::HOST) {
        return Err(Outcome::MissingHost);
    }
    let server = &generation.config().server;
    if headers.len() > server.max_headers {
        return Err(Outcome::HeadTooLarge(outcome::HeadLimit::Count));
    }
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    if bytes > server.max_header_bytes {
        return Err(Outcome::HeadTooLarge(outcome::HeadLimit::Bytes));
    }
    Ok(())
}

/// A request to a known route: admit the client, then the challenge or the event.
async fn serve_route(
    generation: &Generation,
    shared: &Shared,
    route: &RouteState,
    client: &mut ClientContext,
    req: Request<Incoming>,
    mut capture: Option<&mut Capture>,
) -> Result<Reply, Outcome> {
    admit(generation, route, client, req.headers())?;
    match *req.method() {
        Method::GET => challenge(route, req.uri().query()),
        Method::POST => {
            let (parts, body) = req.into_parts();
            let (body, _reserved) = read_body(generation, shared, &parts.headers, body).await?;
            if let Some(c) = capture.as_deref_mut() {
                c.body = Some(body.clone());
            }
            let signed = verify(route, &parts.headers, &body)?;
            if let Some(c) = capture.as_deref_mut() {
                c.signature = Some(signed);
            }
            let event = Event {
                route,
                client,
                parts: &parts,
                body,
                signed,
                capture,
            };
            deliver(generation, shared, event).await
        }
        _ => Err(Outcome::MethodNotAllowed),
    }
}

/// The client policy for this route.
fn admit(
    generation: &Generation,
    route: &RouteState,
    client: &mut ClientContext,
    headers: &HeaderMap,
) -> Result<(), Outcome> {
    let required = route.route.client_cert == RouteClientCert::Required;
    generation
        .clients
        .authenticate(client, headers, required)
        .map_err(Outcome::from)
}

/// The verification GET: echo the challenge when the token matches.
fn challenge(route: &RouteState, query: Option<&str>) -> Result<Reply, Outcome> {
    let echo = challenge::answer(query, &route.route.verify_token).map_err(Outcome::Challenge)?;
    let mut r = outcome::text_response(Bytes::from(echo));
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok((Outcome::ChallengeAnswered, r))
}

/// Reads the whole body within the size limit and deadline. A declared `Content-Length` over
/// the limit is refused before a byte of the body is read.
///
/// The body's bytes count against a process-wide budget (`server.max_buffered_bytes`) until
/// the returned permit is dropped: many connections (or HTTP/2 streams) sending large bodies at
/// once get 503 (Meta retries) instead of exhausting memory.
async fn read_body(
    generation: &Generation,
    shared: &Shared,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<(Bytes, OwnedSemaphorePermit), Outcome> {
    let limits = &generation.config().server;
    let max = limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Outcome::BodyTooLarge);
    }
    // Reserve what the body may take: its declared length, or the limit when it has none.
    let permit = reserve(shared, declared.unwrap_or(max as u64))?;
    let limited = Limited::new(body, max);
    match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
        Err(_) => Err(Outcome::BodyTimeout),
        Ok(Ok(collected)) => Ok((collected.to_bytes(), permit)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Outcome::BodyTooLarge),
        Ok(Err(_)) => Err(Outcome::BodyError),
    }
}

/// Counts `bytes` against the process-wide budget of request bytes in memory
/// (`server.max_buffered_bytes`) until the permit is dropped; `Overloaded` (503) when full.
fn reserve(shared: &Shared, bytes: u64) -> Result<OwnedSemaphorePermit, Outcome> {
    let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let budget: &Arc<Semaphore> = &shared.body_budget;
    budget
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| Outcome::Overloaded)
}

/// The signature over the raw body, under any of the route's secrets.
fn verify(route: &RouteState, headers: &HeaderMap, body: &[u8]) -> Result<SignatureMatch, Outcome> {
    route
        .signer
        .verify(headers, body)
        .map_err(Outcome::Signature)
}

/// An event that passed every check, ready to deliver.
struct Event<'a> {
    route: &'a RouteState,
    client: &'a ClientContext,
    parts: &'a Parts,
    body: Bytes,
    signed: SignatureMatch,
    /// The inspector's record of the request, when the inspector is on.
    capture: Option<&'a mut Capture>,
}

/// Hands the authenticated event to the route's delivery.
async fn deliver(
    generation: &Generation,
    shared: &Shared,
    event: Event<'_>,
) -> Result<Reply, Outcome> {
    let splits = event.route.route.split != SplitMode::None;
    match event.route.route.delivery {
        Delivery::Spool if splits => split::spool(shared, event).await,
        Delivery::Sync if splits => split::forward(generation, shared, event).await,
        Delivery::Spool => spool(shared, event).await,
        Delivery::Sync => forward(generation, shared, event).await,
    }
}

/// Sync delivery: forward now and relay the backend's answer; a body delivered recently (a
/// retry) is answered 200 without forwarding it again.
async fn forward(
    generation: &Generation,
    shared: &Shared,
    event: Event<'_>,
) -> Result<Reply, Outcome> {
    let Event {
        route,
        client,
        parts,
        body,
        signed,
        capture: _,
    } = event;
    let recent = &shared.recent;
    let dedupe = route.route.dedupe.is_on();
    if dedupe && recent.contains(&route.label, &signed.mac).await {
        return Ok((Outcome::Duplicate, outcome::event_received()));
    }
    let started = Instant::now();
    let upstream = &generation.upstream;
    let forwarded = upstream
        .forward(&route.route.upstream, parts, body, client)
        .await;
    shared
        .metrics
        .upstream_latency(&route.label, started.elapsed());
    match forwarded {
        Ok(resp) => {
            if dedupe && resp.status().is_success() {
                recent.insert(&route.label, &signed.mac).await;
            }
            Ok((Outcome::Forwarded(resp.status()), resp))
        }
        Err(e) => {
            warn!(route = %route.route.path, error = %error_chain(&e), "forwarding failed");
            Err(forward_failure(&e))
        }
    }
}

/// What a failed forward is answered with.
fn forward_failure(e: &ForwardError) -> Outcome {
    match e {
        ForwardError::Unreachable(_) => Outcome::UpstreamUnreachable,
        ForwardError::Timeout(_) => Outcome::UpstreamTimeout,
        ForwardError::BadResponse(_) | ForwardError::Query(_) => Outcome::UpstreamBadResponse,
    }
}

/// Spool delivery: the 200 goes out only after the commit that holds the event; when it
/// cannot be stored, 503 so that Meta retries.
async fn spool(shared: &Shared, event: Event<'_>) -> Result<Reply, Outcome> {
    let route = event.route;
    // Validation makes a spool route without [spool] impossible.
    let spool = shared.spool.as_ref().ok_or(Outcome::SpoolError)?;
    let stored = spooling::store(
        spool,
        &route.route.path,
        event.parts,
        event.body,
        event.client,
    );
    match stored.await {
        Ok(Accepted::Stored(id)) => {
            if let Some(c) = event.capture {
                c.spool_ids.push(id);
            }
            Ok((Outcome::Spooled, outcome::event_received()))
        }
        Ok(Accepted::Duplicate) => Ok((Outcome::Duplicate, outcome::event_received())),
        Err(e) => {
            warn!(route = %route.route.path, error = %e, "event not stored; answering 503 so that Meta retries");
            Err(spool_failure(&e))
        }
    }
}

/// What an event the spool could not store is answered with (503 all, for Meta to retry).
fn spool_failure(e: &crate::spool::SpoolError) -> Outcome {
    if e.is_full() {
        Outcome::SpoolFull
    } else if e.is_unavailable() {
        Outcome::SpoolUnavailable
    } else {
        Outcome::SpoolError
    }
}
