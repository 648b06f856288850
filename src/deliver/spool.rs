//! Delivery through the durable spool: an authenticated event is stored with the headers it
//! will be delivered with (the 200 to Meta goes out only after the commit that holds it), and
//! [`SpoolDelivery`] later sends stored events through the current configuration's upstream
//! client, for the spool's scheduler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::Uri;

use super::upstream::{error_chain, upstream_headers, Upstream};
use crate::identity::ClientContext;
use crate::metrics::{Metrics, RouteLabel};
use crate::spool::{
    outcome_for_status, Accepted, Deliver, DeliveryOutcome, NewEvent, Spool, SpoolError,
    StoredEvent,
};

/// Stores an authenticated event for `route`; returns once it is committed (or proven a
/// duplicate).
pub async fn store(
    spool: &Spool,
    route: &str,
    parts: &Parts,
    body: Bytes,
    client: &ClientContext,
) -> Result<Accepted, SpoolError> {
    let headers = upstream_headers(parts, client);
    spool
        .accept(new_event(route, parts, client, headers, body, None))
        .await
}

/// One part of a split batch, ready to store.
pub struct StoredPart {
    /// The headers it is delivered with (its own signature among them).
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// De-duplicate by this update key instead of by the body.
    pub update_key: Option<[u8; 32]>,
}

/// Stores the parts of one batch in one commit: all or none.
pub async fn store_parts(
    spool: &Spool,
    route: &str,
    parts: &Parts,
    client: &ClientContext,
    pieces: Vec<StoredPart>,
) -> Result<Vec<Accepted>, SpoolError> {
    let events = pieces
        .into_iter()
        .map(|p| new_event(route, parts, client, p.headers, p.body, p.update_key))
        .collect();
    spool.accept_all(events).await
}

fn new_event(
    route: &str,
    parts: &Parts,
    client: &ClientContext,
    headers: http::HeaderMap,
    body: Bytes,
    update_key: Option<[u8; 32]>,
) -> NewEvent {
    NewEvent {
        route: route.to_owned(),
        body,
        headers,
        query: parts.uri.query().map(str::to_owned),
        client_identity: client.cn().map(str::to_owned),
        received_at: std::time::SystemTime::now(),
        update_key,
    }
}

/// Where a route's stored events go now: resolved at each attempt, so that a reload's new
/// upstream takes effect for events already stored.
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub uri: Uri,
    pub label: RouteLabel,
}

/// Delivers stored events for the spool's scheduler.
pub struct SpoolDelivery<F> {
    targets: F,
    metrics: Arc<Metrics>,
    dead_letter_4xx: bool,
}

impl<F> SpoolDelivery<F>
where
    F: Fn(&str) -> Result<Target, String> + Send + Sync + 'static,
{
    /// `targets` resolves a route to its current target, or says why it cannot.
    pub fn new(targets: F, metrics: Arc<Metrics>, dead_letter_4xx: bool) -> Self {
        SpoolDelivery {
            targets,
            metrics,
            dead_letter_4xx,
        }
    }
}

impl<F> Deliver for SpoolDelivery<F>
where
    F: Fn(&str) -> Result<Target, String> + Send + Sync + 'static,
{
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> Pin<Box<dyn Future<Output = DeliveryOutcome> + Send + 'a>> {
        Box::pin(async move {
            let target = match (self.targets)(&event.route) {
                Ok(t) => t,
                Err(why) => return DeliveryOutcome::Retry(why),
            };
            let started = Instant::now();
            let result = target.upstream.deliver_stored(&target.uri, event).await;
            self.metrics
                .upstream_latency(&target.label, started.elapsed());
            let outcome = match result {
                Ok(status) => outcome_for_status(status, self.dead_letter_4xx),
                Err(e) => DeliveryOutcome::Retry(error_chain(&e)),
            };
            self.metrics.spool_delivery(&target.label, &outcome);
            outcome
        })
    }
}
