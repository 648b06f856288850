//! Delivery: the [`Deliver`] trait the gate implements, the rules that turn a backend's answer
//! into a [`DeliveryOutcome`], and the scheduler that claims due events per route (at most
//! `max_concurrency_per_route` at a time), runs them, and records each outcome — done, retry
//! with back-off, or dead-letter.
//!
//! # Ordering
//!
//! Each route's due events are claimed oldest due time first, then by id (acceptance order). A
//! new event is due when stored, so first attempts go out in acceptance order; with
//! `max_concurrency_per_route = 1` and a healthy backend, the backend sees a route's events in
//! the order they were acknowledged. A failed event is rescheduled after its back-off and does
//! not hold up the events behind it (no head-of-line blocking), so after a retry, order is not
//! kept; with more than one delivery per route at a time, attempts overlap and can finish in
//! any order. Meta itself does not promise order either; a backend that needs it must sort by
//! the payload's timestamps.
//!
//! # Shutdown
//!
//! When the shutdown signal fires the scheduler claims nothing more, lets running deliveries
//! finish for up to `shutdown_grace`, records their outcomes, then aborts what is left and puts
//! those events back to pending (an aborted attempt may have reached the backend: the event is
//! delivered again — at least once). A process that dies instead leaves them `in_flight`; the
//! next start makes them pending again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::store::{self, Disposition, RouteMap};
use super::{Spool, SpoolError, StoredEvent};

/// The result of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The backend took it (a 2xx): the event is complete and leaves the spool.
    Done,
    /// A transient failure (connection error, timeout, 408, 429, 5xx): try again after a
    /// back-off, until the retry horizon passes; then dead-letter. The text is logged and kept
    /// as the event's `last_error`: never put a body or a secret in it.
    Retry(String),
    /// A failure that will not get better by retrying (other 4xx): dead-letter now. Same rule
    /// for the text.
    Permanent(String),
}

/// The rules for a backend's status: 2xx → [`Done`](DeliveryOutcome::Done); 408, 429
/// and 5xx → [`Retry`](DeliveryOutcome::Retry); other 4xx → [`Permanent`](DeliveryOutcome::Permanent)
/// when `dead_letter_4xx` (the default), else retry. Anything else (1xx, 3xx: hubgate does not
/// follow redirects) is retried, so a misconfigured backend does not lose events before the
/// horizon.
pub fn outcome_for_status(status: StatusCode, dead_letter_4xx: bool) -> DeliveryOutcome {
    let code = status.as_u16();
    if status.is_success() {
        DeliveryOutcome::Done
    } else if code == 408 || code == 429 || status.is_server_error() {
        DeliveryOutcome::Retry(format!("backend answered {code}"))
    } else if status.is_client_error() && dead_letter_4xx {
        DeliveryOutcome::Permanent(format!("backend answered {code}"))
    } else {
        DeliveryOutcome::Retry(format!("backend answered {code}"))
    }
}

/// Sends one stored event to its backend. The gate implements this with its upstream client:
/// the route's upstream URL (plus the event's query string), the stored headers, the body,
/// then [`outcome_for_status`] on the answer and `Retry` for connection errors and timeouts.
/// It should bound its own time (the upstream timeout); the scheduler does not.
pub trait Deliver: Send + Sync + 'static {
    /// One attempt. `event.attempt` is 1 for the first.
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> Pin<Box<dyn Future<Output = DeliveryOutcome> + Send + 'a>>;
}

/// Runs one attempt and records its outcome. Recording is retried a few times (a busy or full
/// disk); if it still fails, the event stays `in_flight` until the next start, which makes it
/// pending again (delivered again: at least once).
async fn attempt(spool: Spool, deliver: Arc<dyn Deliver>, event: StoredEvent) {
    let outcome = deliver.deliver(&event).await;
    let (id, route, attempt) = (event.id, event.route.as_str(), event.attempt);
    let mut wait = Duration::from_millis(200);
    for _ in 0..6 {
        match spool.inner.store.complete(id, outcome.clone()).await {
            Ok(Disposition::Delivered) => {
                debug!(id, route, attempt, "spool: delivered");
                return;
            }
            Ok(Disposition::RetryAt(at)) => {
                let retry_in_ms = at.saturating_sub(store::now_ms()).max(0);
                let error = match &outcome {
                    DeliveryOutcome::Retry(m) => m.as_str(),
                    _ => "",
                };
                info!(
                    id,
                    route, attempt, error, retry_in_ms, "spool: delivery failed, will retry"
                );
                return;
            }
            Ok(Disposition::Dead(reason)) => {
                warn!(id, route, attempt, reason = %reason, "spool: event dead-lettered");
                return;
            }
            Ok(Disposition::Stale) => {
                debug!(
                    id,
                    route, "spool: outcome for an event no longer in flight ignored"
                );
                return;
            }
            Err(SpoolError::Closed) => return,
            Err(e) => {
                warn!(id, route, error = %e, "spool: recording a delivery outcome failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
    error!(
        id,
        route,
        "spool: could not record a delivery outcome; the event is delivered again after a restart"
    );
}

/// Extends the leases of the deliveries still running.
async fn renew(spool: &Spool, running: &RouteMap<tokio::task::Id, (i64, String)>) {
    let ids: Vec<i64> = running.values().map(|(id, _)| *id).collect();
    if ids.is_empty() {
        return;
    }
    if let Err(e) = spool.inner.store.renew(ids).await {
        warn!(error = %e, "spool: renewing the leases of running deliveries failed");
    }
}

/// The scheduler; see the module docs.
pub(crate) async fn run(
    spool: Spool,
    deliver: Arc<dyn Deliver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = spool.inner.settings.clone();
    let notify = spool.inner.shared.notify.clone();
    let mut busy: RouteMap<String, usize> = RouteMap::default();
    let mut running: RouteMap<tokio::task::Id, (i64, String)> = RouteMap::default();
    let mut tasks: JoinSet<()> = JoinSet::new();
    // Claims on a shared store carry a lease: renew those still running well before it ends.
    let renew_every = (settings.lease / 3).max(Duration::from_millis(100));
    let mut next_renew = Instant::now() + renew_every;

    let finished = |id: tokio::task::Id,
                    busy: &mut RouteMap<String, usize>,
                    running: &mut RouteMap<tokio::task::Id, (i64, String)>|
     -> Option<i64> {
        let (event, route) = running.remove(&id)?;
        if let Some(n) = busy.get_mut(&route) {
            *n = n.saturating_sub(1);
        }
        Some(event)
    };

    info!(
        max_concurrency_per_route = settings.max_concurrency_per_route,
        "spool: delivery started"
    );
    loop {
        if *shutdown.borrow() {
            break;
        }
        // Renew here, not only in the select below: with steady traffic its other branches are
        // always ready first, and a lease left to expire hands a running delivery to another
        // claim (the same event sent twice).
        if Instant::now() >= next_renew {
            next_renew = Instant::now() + renew_every;
            renew(&spool, &running).await;
        }
        let mut wake_at = Instant::now() + settings.poll_interval;
        match spool.inner.store.claim(&busy).await {
            Ok(claimed) => {
                for event in claimed.events {
                    let (id, route) = (event.id, event.route.clone());
                    *busy.entry(route.clone()).or_default() += 1;
                    let handle = tasks.spawn(attempt(spool.clone(), deliver.clone(), event));
                    running.insert(handle.id(), (id, route));
                }
                if let Some(due) = claimed.next_due {
                    let wait = due.saturating_sub(store::now_ms()).max(5);
                    let at = Instant::now() + Duration::from_millis(wait.unsigned_abs());
                    wake_at = wake_at.min(at);
                }
            }
            Err(SpoolError::Closed) => break,
            Err(e) => warn!(error = %e, "spool: claiming due events failed"),
        }
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break; // the sender is gone: nobody can ask us to stop any more.
                }
            }
            Some(first) = tasks.join_next_with_id() => {
                // Collect every delivery that has finished, so the next claim fills all the
                // room at once rather than one slot per round trip.
                let mut next = Some(first);
                while let Some(done) = next {
                    let (task, panicked) = match done {
                        Ok((task, ())) => (task, false),
                        Err(e) => (e.id(), e.is_panic()),
                    };
                    if let Some(event) = finished(task, &mut busy, &mut running) {
                        if panicked {
                            error!(id = event, "spool: delivery panicked");
                            let outcome = DeliveryOutcome::Retry("delivery panicked".to_owned());
                            let _ = spool.inner.store.complete(event, outcome).await;
                        }
                    }
                    next = tasks.try_join_next_with_id();
                }
            }
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = tokio::time::sleep_until(next_renew) => {}
        }
    }

    // Shutdown: no new claims; running attempts get the grace period.
    if !running.is_empty() {
        info!(
            in_flight = running.len(),
            grace = ?settings.shutdown_grace,
            "spool: waiting for deliveries in flight"
        );
        let grace = tokio::time::sleep(settings.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = tasks.join_next_with_id() => match done {
                    None => break,
                    Some(Ok((task, ()))) => { finished(task, &mut busy, &mut running); }
                    Some(Err(e)) => { finished(e.id(), &mut busy, &mut running); }
                },
                _ = &mut grace => break,
            }
        }
    }
    if !running.is_empty() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let ids: Vec<i64> = running.values().map(|(id, _)| *id).collect();
        match spool.inner.store.release(ids).await {
            Ok(n) => warn!(
                released = n,
                "spool: deliveries cut short by shutdown are pending again"
            ),
            Err(e) => warn!(
                error = %e,
                "spool: could not release in-flight events; the next start will"
            ),
        }
    }
    if let Err(e) = spool.inner.store.settle().await {
        debug!(error = %e, "spool: outcomes not settled at shutdown; the next start delivers those again");
    }
    info!("spool: delivery stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_rules() {
        let o = |s: u16, dl: bool| outcome_for_status(StatusCode::from_u16(s).unwrap(), dl);
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(o(s, true), DeliveryOutcome::Done);
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(matches!(o(s, true), DeliveryOutcome::Retry(_)), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 413, 422] {
            assert!(matches!(o(s, true), DeliveryOutcome::Permanent(_)), "{s}");
            assert!(matches!(o(s, false), DeliveryOutcome::Retry(_)), "{s}");
        }
        for s in [100, 301, 302, 304, 307] {
            assert!(matches!(o(s, true), DeliveryOutcome::Retry(_)), "{s}");
        }
    }
}
