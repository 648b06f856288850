//! Group commit for the PostgreSQL store's accepts: one task per gate writes every accept that
//! arrived while the previous statement ran, as one statement (so one transaction and one WAL
//! flush) — what the SQLite writer does with its journal. One event alone still costs one
//! statement; fifty at once cost one instead of fifty.
//!
//! A statement's events are passed as arrays (`unnest`): the keys are inserted in key order
//! (two gates writing the same keys in one order cannot deadlock), the events whose key was new
//! are inserted, and the statement returns which of its rows were stored, with their ids. An
//! error fails every accept of the statement: none of them is acknowledged.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::Db;
use crate::spool::store::{duration_ms, encode_headers, event_key, unix_ms};
use crate::spool::{Accepted, NewEvent, SpoolError};

/// The most body and header bytes in one statement (besides `max_batch_events`): a statement's parameters
/// are held in memory on both ends until it completes.
const MAX_STATEMENT_BYTES: usize = 16 << 20;

/// Intake tasks per gate: statements in flight at once. On loopback, 1 to 4 made no
/// difference (15.5–16.2k events/s, the WAL flush is the bound); with a database across a
/// network, a second statement travels while the first one's commit waits.
pub(super) const WRITERS: usize = 2;

/// One `unnest` row per event whose key is new in the statement: the keys (only when
/// de-duplicating, `$8 > 0`; refreshed only when older than the window), then the events whose
/// key was new; the answer is the rows stored (1-based position) and their ids. The ids are
/// drawn in `input`, which is materialised once (it is read three times and `nextval` is
/// volatile).
const ACCEPT: &str = "
WITH now AS (SELECT hubgate.now_ms() AS n),
input AS MATERIALIZED (
    SELECT nextval('hubgate.events_id_seq') AS id, i.*
    FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::bytea[],
                $7::bytea[])
        WITH ORDINALITY AS i(key, route, received_ms, client_identity, query, headers, body, ord)
),
key AS (
    INSERT INTO hubgate.dedupe AS d (key, accepted_ms)
    SELECT i.key, now.n FROM input i, now WHERE $8::bigint > 0 ORDER BY i.key
    ON CONFLICT (key) DO UPDATE SET accepted_ms = EXCLUDED.accepted_ms
        WHERE d.accepted_ms <= EXCLUDED.accepted_ms - $8
    RETURNING d.key
),
ev AS (
    INSERT INTO hubgate.events (id, route, state, received_ms, stored_ms, retry_since_ms,
        next_attempt_ms, attempts, updated_ms, client_identity, query, headers, body)
    SELECT i.id, i.route, 'pending', i.received_ms, now.n, now.n, now.n, 0, now.n,
        i.client_identity, i.query, i.headers, i.body
    FROM input i, now
    WHERE $8::bigint = 0 OR i.key IN (SELECT key FROM key)
    RETURNING id
)
SELECT i.ord, i.id FROM input i JOIN ev ON ev.id = i.id";

/// Accepts waiting for the intake task: the events of one `accept_all` call and where its
/// answer goes.
pub(super) struct Pending {
    events: Vec<NewEvent>,
    /// Each event's de-duplication key and encoded headers, made by the caller's task.
    keys: Vec<[u8; 32]>,
    headers: Vec<Vec<u8>>,
    /// What it counts against [`MAX_QUEUED_BYTES`].
    size: usize,
    answer: oneshot::Sender<Result<Vec<Accepted>, SpoolError>>,
}

/// The most body and header bytes waiting for the intake tasks: past it (a database that
/// stopped answering), accepts are answered 503 at once instead of queued.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// The accepts' queue, shared by the callers and the intake tasks.
pub(super) struct Queue {
    calls: mpsc::UnboundedSender<Pending>,
    taken: Mutex<mpsc::UnboundedReceiver<Pending>>,
    bytes: AtomicUsize,
    location: String,
}

impl Queue {
    /// A queue; `serve`: intake tasks will take from it (else accepts are refused).
    pub(super) fn new(location: String, serve: bool) -> Arc<Queue> {
        let (calls, taken) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue {
            calls,
            taken: Mutex::new(taken),
            bytes: AtomicUsize::new(0),
            location,
        });
        if !serve {
            queue.refuse();
        }
        queue
    }

    /// Refuses accepts from now on (a store that only reads, or one closing: no intake task
    /// serves it), and answers those still queued as not stored. Waits for the queue: call it
    /// once the intake tasks are aborted (one may be waiting on it).
    pub(super) async fn close(&self) {
        let mut taken = self.taken.lock().await;
        taken.close();
        while let Ok(call) = taken.try_recv() {
            self.bytes.fetch_sub(call.size, Ordering::Relaxed);
        }
    }

    /// [`close`](Queue::close) for a queue no task has seen.
    fn refuse(&self) {
        if let Ok(mut taken) = self.taken.try_lock() {
            taken.close();
        }
    }

    /// The next call that still has a caller waiting (one that gave up — `accept_timeout` —
    /// was answered 503 and is not stored), and what it counted is given back.
    fn admit(&self, call: Pending) -> Option<Pending> {
        self.bytes.fetch_sub(call.size, Ordering::Relaxed);
        (!call.answer.is_closed()).then_some(call)
    }
}

/// Checks and queues one call's events; its answer comes once their statement has committed.
pub(super) async fn accept(
    queue: &Queue,
    events: Vec<NewEvent>,
) -> Result<Vec<Accepted>, SpoolError> {
    if events.iter().any(|e| e.route.is_empty()) {
        return Err(SpoolError::InvalidEvent("empty route".to_owned()));
    }
    let headers: Vec<Vec<u8>> = events.iter().map(|e| encode_headers(&e.headers)).collect();
    let size = events.iter().map(|e| e.body.len()).sum::<usize>()
        + headers.iter().map(Vec::len).sum::<usize>();
    if queue.bytes.fetch_add(size, Ordering::Relaxed) + size > MAX_QUEUED_BYTES {
        queue.bytes.fetch_sub(size, Ordering::Relaxed);
        return Err(SpoolError::Unavailable {
            location: queue.location.clone(),
            message: "the database is behind: too many accepts wait for it".to_owned(),
        });
    }
    let keys = events.iter().map(event_key).collect();
    let (answer, answered) = oneshot::channel();
    let call = Pending {
        events,
        keys,
        headers,
        size,
        answer,
    };
    if queue.calls.send(call).is_err() {
        queue.bytes.fetch_sub(size, Ordering::Relaxed);
        return Err(SpoolError::Closed);
    }
    answered.await.map_err(|_| SpoolError::Closed)?
}

/// One intake task: takes what is queued (up to `max_batch_events` events and
/// [`MAX_STATEMENT_BYTES`]), writes it in one statement, answers each call, and goes again.
/// [`WRITERS`] of them share the queue, so one statement runs while another waits for its
/// WAL flush. A call held back because it did not fit goes first in this task's next
/// statement, without waiting for the queue (another task may be waiting on it).
pub(super) async fn run(db: Arc<Db>, queue: Arc<Queue>) {
    let max_events = db.settings.max_batch_events.max(1);
    let mut carried: Option<Pending> = None;
    loop {
        let mut calls = Vec::new();
        let mut taken = match carried.take() {
            Some(call) => {
                calls.push(call);
                queue.taken.try_lock().ok()
            }
            None => {
                let mut taken = queue.taken.lock().await;
                while calls.is_empty() {
                    let Some(call) = taken.recv().await else {
                        return;
                    };
                    calls.extend(queue.admit(call));
                }
                Some(taken)
            }
        };
        let mut events: usize = calls.iter().map(|c| c.events.len()).sum();
        let mut bytes: usize = calls.iter().map(|c| c.size).sum();
        while let Some(taken) = taken.as_mut() {
            if events >= max_events || bytes >= MAX_STATEMENT_BYTES {
                break;
            }
            let Ok(next) = taken.try_recv() else { break };
            let Some(next) = queue.admit(next) else {
                continue;
            };
            if events + next.events.len() > max_events || bytes + next.size > MAX_STATEMENT_BYTES {
                carried = Some(next);
                break;
            }
            events += next.events.len();
            bytes += next.size;
            calls.push(next);
        }
        drop(taken);
        let answers: Vec<_> = match db.write(&calls).await {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); calls.len()],
        };
        for (call, answer) in calls.into_iter().zip(answers) {
            let _ = call.answer.send(answer); // a caller that gave up (timeout) is gone
        }
    }
}

impl Db {
    /// Writes the calls' events in one statement; one answer per call, in order.
    async fn write(&self, calls: &[Pending]) -> Result<Vec<Vec<Accepted>>, SpoolError> {
        let window = duration_ms(self.settings.dedupe_window);
        // Each call's answers, `Duplicate` until the statement says a row was stored; `rows`
        // maps the statement's rows (1-based) to (call, event).
        let mut answers: Vec<Vec<Accepted>> = calls
            .iter()
            .map(|c| vec![Accepted::Duplicate; c.events.len()])
            .collect();
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut keys: Vec<[u8; 32]> = Vec::new();
        // A key twice in one statement: the second is a duplicate of the first (and one
        // `ON CONFLICT DO UPDATE` may not touch a row twice).
        let mut seen = HashSet::new();
        for (c, call) in calls.iter().enumerate() {
            for (i, &key) in call.keys.iter().enumerate() {
                if window > 0 && !seen.insert(key) {
                    continue;
                }
                rows.push((c, i));
                keys.push(key);
            }
        }
        let (mut routes, mut received, mut clients, mut queries, mut headers, mut bodies) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for &(c, i) in &rows {
            let event = &calls[c].events[i];
            routes.push(event.route.as_str());
            received.push(unix_ms(event.received_at));
            clients.push(event.client_identity.as_deref());
            queries.push(event.query.as_deref());
            headers.push(&calls[c].headers[i][..]);
            bodies.push(&event.body[..]);
        }
        let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        let started = Instant::now();
        let stored = self
            .within(self.accept_limit(), async |client| {
                let stmt = client
                    .prepare_cached(ACCEPT)
                    .await
                    .map_err(|e| self.failed(&e))?;
                client
                    .query(
                        &stmt,
                        &[
                            &keys, &routes, &received, &clients, &queries, &headers, &bodies,
                            &window,
                        ],
                    )
                    .await
                    .map_err(|e| self.failed(&e))
            })
            .await?;
        self.note_success();
        let stats = &self.shared.stats;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stats.commit_nanos.fetch_add(nanos, Ordering::Relaxed);
        stats.jobs.fetch_add(rows.len() as u64, Ordering::Relaxed);
        let mut new_routes = HashSet::new();
        for row in &stored {
            let (ord, id): (i64, i64) = (row.get(0), row.get(1));
            let Some(&(c, i)) = usize::try_from(ord - 1).ok().and_then(|r| rows.get(r)) else {
                return Err(SpoolError::Storage {
                    path: self.location.clone().into(),
                    message: format!("the accept statement answered row {ord} of {}", rows.len()),
                });
            };
            answers[c][i] = Accepted::Stored(id);
            new_routes.insert(calls[c].events[i].route.as_str());
        }
        let total: usize = answers.iter().map(Vec::len).sum();
        stats
            .accepted
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add((total - stored.len()) as u64, Ordering::Relaxed);
        if !new_routes.is_empty() {
            let mut known = self.routes.lock().expect("lock");
            for route in new_routes {
                let _ = self.stored.send(route.to_owned());
                known.insert(route.to_owned());
            }
            drop(known);
            self.shared.notify.notify_one();
        }
        Ok(answers)
    }
}
