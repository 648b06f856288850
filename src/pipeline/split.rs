//! Delivery of a Meta batch part by part, for routes with `split = "entry"` or `"item"`.
//!
//! The signature over the whole body was verified before anything here runs. The body is cut
//! by [`crate::gate::batch`]; each part reaches the backend as a request of its own, signed
//! again with the route's backend key (`X-Hub-Signature-256`, so that a backend that checks
//! Meta's signature keeps working) and labelled with [`PART`], [`PARTS`] and [`BATCH_SHA256`].
//! A body that is not a Meta batch is delivered whole, as it came, with its reason logged and
//! counted.
//!
//! - Sync routes send the parts in order, one after the other (an update's order matters to a
//!   chat backend), and answer Meta 200 only when every part got a 2xx. At the first part that
//!   did not, the backend's answer is relayed (or the failure's 502/504) and the parts after
//!   it are not sent: Meta retries the whole batch. With `dedupe = "item"` the parts that did
//!   get a 2xx are remembered, so the retry delivers only the rest.
//! - Spool routes store every part in one commit (all or none) and answer 200 after it; each
//!   part is then delivered, retried and dead-lettered on its own.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};

use super::{forward_failure, outcome, spool_failure, Event, Outcome, Reply};
use crate::config::DedupeMode;
use crate::deliver::spool::{self as spooling, StoredPart};
use crate::deliver::upstream::{error_chain, upstream_headers};
use crate::gate::batch::{self, Part};
use crate::gate::signature::{SHA1_HEADER, SHA256_HEADER};
use crate::spool::Accepted;
use crate::state::{Generation, RouteState, Shared};

/// The part's position in its batch, from 1.
pub const PART: HeaderName = HeaderName::from_static("x-hubgate-part");
/// How many parts the batch was cut into.
pub const PARTS: HeaderName = HeaderName::from_static("x-hubgate-parts");
/// The SHA-256 of the whole body Meta sent (lower-case hex): tells parts of one batch apart
/// from another's, and links them to Meta's signature in the gate's records.
pub const BATCH_SHA256: HeaderName = HeaderName::from_static("x-hubgate-batch-sha256");

/// The parts of a batch, or `None` when the body is delivered whole (logged and counted here).
/// The parts are about the body's size again: they count against `server.max_buffered_bytes`
/// like the body, until the permit returned with them is dropped.
fn cut(
    route: &RouteState,
    shared: &Shared,
    body: &[u8],
) -> Result<Option<(Vec<Part>, OwnedSemaphorePermit)>, Outcome> {
    match batch::split(body, route.route.split) {
        Ok(parts) => {
            let size: usize = parts.iter().map(|p| p.body.len()).sum();
            Ok(Some((parts, super::reserve(shared, size as u64)?)))
        }
        Err(why) => {
            info!(
                route = %route.route.path,
                reason = why.as_str(),
                "not a Meta batch: delivered whole, with Meta's signature"
            );
            shared.metrics.batch_unsplit(&route.label, why.as_str());
            Ok(None)
        }
    }
}

/// The headers of part `index` (from 0) of `count`: the request's, Meta's signatures replaced
/// by the part's own.
fn part_headers(
    route: &RouteState,
    base: &HeaderMap,
    part: &Part,
    index: usize,
    count: usize,
    batch_sha256: &HeaderValue,
) -> HeaderMap {
    let mut headers = base.clone();
    headers.remove(SHA1_HEADER);
    let signer = route
        .resigner
        .as_ref()
        .expect("validation gives every splitting route a backend key");
    let signature = signer.sign(&part.body);
    headers.insert(
        SHA256_HEADER,
        HeaderValue::from_str(&signature).expect("hex is a valid header value"),
    );
    headers.insert(PART, HeaderValue::from(index + 1));
    headers.insert(PARTS, HeaderValue::from(count));
    headers.insert(BATCH_SHA256, batch_sha256.clone());
    headers
}

fn sha256_hex(body: &[u8]) -> HeaderValue {
    let hex = hex::encode(Sha256::digest(body));
    HeaderValue::from_str(&hex).expect("hex is a valid header value")
}

/// Sync delivery of a batch, part by part (see the module's documentation).
pub(super) async fn forward(
    generation: &Generation,
    shared: &Shared,
    event: Event<'_>,
) -> Result<Reply, Outcome> {
    let route = event.route;
    let label = &route.label;
    let recent = &shared.recent;
    let dedupe = route.route.dedupe;
    // The very body again (a plain retry of a batch delivered in full).
    if dedupe.is_on() && recent.contains(label, &event.signed.mac).await {
        return Ok((Outcome::Duplicate, outcome::event_received()));
    }
    let Some((parts, _reserved)) = cut(route, shared, &event.body)? else {
        return super::forward(generation, shared, event).await;
    };
    let base = upstream_headers(event.parts, event.client);
    let batch_sha256 = sha256_hex(&event.body);
    let count = parts.len();
    let (mut delivered, mut skipped) = (0u64, 0u64);
    let upstream = &generation.upstream;
    for (index, part) in parts.into_iter().enumerate() {
        if dedupe == DedupeMode::Item && recent.contains(label, &part.key).await {
            skipped += 1;
            continue;
        }
        let headers = part_headers(route, &base, &part, index, count, &batch_sha256);
        let started = std::time::Instant::now();
        let result = upstream
            .forward_with(
                &route.route.upstream,
                event.parts.uri.query(),
                headers,
                Bytes::from(part.body),
            )
            .await;
        shared.metrics.upstream_latency(label, started.elapsed());
        let failed = match result {
            Ok(resp) if resp.status().is_success() => {
                delivered += 1;
                if dedupe == DedupeMode::Item {
                    recent.insert(label, &part.key).await;
                }
                continue;
            }
            Ok(resp) => {
                warn!(
                    route = %route.route.path,
                    part = index + 1,
                    parts = count,
                    status = resp.status().as_u16(),
                    "the backend refused a part of a batch; relaying its answer so that Meta retries"
                );
                Ok((Outcome::Forwarded(resp.status()), resp))
            }
            Err(e) => {
                warn!(
                    route = %route.route.path,
                    part = index + 1,
                    parts = count,
                    error = %error_chain(&e),
                    "forwarding a part of a batch failed"
                );
                Err(forward_failure(&e))
            }
        };
        count_parts(shared, route, delivered, skipped);
        shared.metrics.batch_parts(label, "failed", 1);
        return failed;
    }
    count_parts(shared, route, delivered, skipped);
    if dedupe.is_on() {
        recent.insert(label, &event.signed.mac).await;
    }
    if delivered == 0 {
        return Ok((Outcome::Duplicate, outcome::event_received()));
    }
    Ok((Outcome::Split, outcome::event_received()))
}

fn count_parts(shared: &Shared, route: &RouteState, delivered: u64, skipped: u64) {
    shared
        .metrics
        .batch_parts(&route.label, "delivered", delivered);
    shared
        .metrics
        .batch_parts(&route.label, "duplicate", skipped);
}

/// Spool delivery of a batch: every part stored in one commit, then delivered on its own.
pub(super) async fn spool(shared: &Shared, event: Event<'_>) -> Result<Reply, Outcome> {
    let route = event.route;
    let Some((parts, _reserved)) = cut(route, shared, &event.body)? else {
        return super::spool(shared, event).await;
    };
    // Validation makes a spool route without [spool] impossible.
    let spool = shared.spool.as_ref().ok_or(Outcome::SpoolError)?;
    let base = upstream_headers(event.parts, event.client);
    let batch_sha256 = sha256_hex(&event.body);
    let count = parts.len();
    let by_item = route.route.dedupe == DedupeMode::Item;
    let pieces = parts
        .into_iter()
        .enumerate()
        .map(|(index, part)| StoredPart {
            headers: part_headers(route, &base, &part, index, count, &batch_sha256),
            update_key: by_item.then_some(part.key),
            body: Bytes::from(part.body),
        })
        .collect();
    let stored =
        spooling::store_parts(spool, &route.route.path, event.parts, event.client, pieces).await;
    match stored {
        Ok(answers) => {
            if let Some(c) = event.capture {
                c.spool_ids.extend(answers.iter().filter_map(|a| match a {
                    Accepted::Stored(id) => Some(*id),
                    Accepted::Duplicate => None,
                }));
            }
            let new = answers
                .iter()
                .filter(|a| matches!(a, Accepted::Stored(_)))
                .count() as u64;
            let label = &route.label;
            shared.metrics.batch_parts(label, "stored", new);
            shared
                .metrics
                .batch_parts(label, "duplicate", answers.len() as u64 - new);
            let outcome = if new > 0 {
                Outcome::Spooled
            } else {
                Outcome::Duplicate
            };
            Ok((outcome, outcome::event_received()))
        }
        Err(e) => {
            warn!(
                route = %route.route.path,
                parts = count,
                error = %e,
                "batch not stored (none of its parts); answering 503 so that Meta retries"
            );
            Err(spool_failure(&e))
        }
    }
}
