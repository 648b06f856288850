//! The SQLite store: one file per gate (a lock refuses a second gate), written by one thread with
//! group commit, beside an intake journal that holds the events being delivered.
//!
//! - `intake`: the journal (its format, recovery, segments);
//! - `sql`: the schema and every statement, and [`SpoolOps`], the blocking operations API;
//! - `keys`: the de-duplication keys, in sorted runs with filters in memory, and their merger;
//! - `writer`: the writer thread, its group commit, and the absorbs of the journal.
//!
//! # Why SQLite (rusqlite, `bundled`)
//!
//! - **Crash consistency** is SQLite's, which is tested to the point of simulated power loss:
//!   in WAL mode with `synchronous=FULL` a commit returns only after the WAL is fsynced, and
//!   recovery after a crash replays exactly the committed transactions. The intake journal is
//!   the one log of our own, and deliberately the simplest kind: appends of checksummed
//!   records, synced, read back up to the first torn one; everything that is not an append
//!   (retries, dead letters, replays, purges, keys) is SQLite's.
//! - **Tooling**: the spool is one file that the stock `sqlite3` CLI can read and query, also
//!   while the gate runs (WAL lets a second process in), and `hubgate spool …` is just another
//!   connection.
//! - **Build cost**: `bundled` compiles SQLite's C amalgamation once (about 30 s in a debug
//!   build here) and needs no system library; no server to run.
//!
//! Claims do not expire here: an event left `in_flight` by a process that died is made pending
//! again when the next gate opens the file.
//!
//! # The fast path
//!
//! Once the delivery scheduler runs, an event is appended to the intake journal and handed to
//! the scheduler from memory ([`Handoff`]): claimed in the batch that stores it if its route has
//! delivery room and nothing older waits, else when a delivery of its route ends. A delivered
//! event never becomes a row. The queue in the file is searched only when something may be
//! waiting there: retries once due, events a full journal made rows of, what a previous process
//! left, and — every poll interval — replays made by `hubgate spool replay`; a route's events
//! in the journal wait behind its queue in the file, so acceptance order holds.

mod intake;
mod keys;
pub(crate) mod sql;
mod writer;

pub(crate) use intake::HELD_BUDGET;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::info;

pub use sql::SpoolOps;
use writer::Msg;

use super::store::{
    now_ms, plan, BoxFuture, Claimed, Disposition, EventDetail, EventInfo, EventState, ListFilter,
    Operations, Plan, ReplayTarget, RouteMap, Store, Summary,
};
use super::{Accepted, DeliveryOutcome, NewEvent, Shared, SpoolError, SpoolSettings, StoredEvent};

/// What the writer hands the delivery side without a round trip.
#[derive(Default)]
pub(crate) struct Handoff {
    /// A delivery scheduler takes events (it has claimed once): only then are events claimed
    /// at birth.
    pub(crate) taking: AtomicBool,
    /// Events claimed at birth, committed, not yet taken by the scheduler.
    born: Mutex<Vec<StoredEvent>>,
    /// Some route's queue may hold due events that no claim has taken.
    backlog: AtomicBool,
    /// The earliest due time (Unix ms) known of queued events that were not due yet
    /// (`i64::MAX`: none known).
    next_due: AtomicI64,
    /// When the queue was last searched (so that replays made by another process are seen).
    last_search: Mutex<Option<Instant>>,
    /// Events whose delivery succeeded, for the writer to record with its next batch (see
    /// [`SqliteStore::complete`]).
    delivered: Mutex<Vec<i64>>,
    /// Moves of what the writer holds in memory into the file (absorbs and runs of keys),
    /// counted as each begins, before its commit: a summary that counted memory and then read
    /// the file across one would count the moved events or keys twice, and is taken again.
    moves: AtomicU64,
}

impl Handoff {
    fn new() -> Handoff {
        Handoff {
            next_due: AtomicI64::new(i64::MAX),
            ..Handoff::default()
        }
    }

    pub(crate) fn lock_born(&self) -> MutexGuard<'_, Vec<StoredEvent>> {
        self.born.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_delivered(&self) -> MutexGuard<'_, Vec<i64>> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a delivered event; whether the queue was empty (the writer must be woken).
    fn push_delivered(&self, id: i64) -> bool {
        let mut q = self.lock_delivered();
        q.push(id);
        q.len() == 1
    }

    /// Takes every queued delivered event.
    pub(crate) fn take_delivered(&self) -> Vec<i64> {
        std::mem::take(&mut *self.lock_delivered())
    }

    /// Whether delivered events wait to be recorded.
    pub(crate) fn has_delivered(&self) -> bool {
        !self.lock_delivered().is_empty()
    }

    /// Puts back delivered events whose batch failed.
    pub(crate) fn return_delivered(&self, ids: Vec<i64>) {
        self.lock_delivered().extend(ids);
    }

    /// Whether a claim must search the queue in the file.
    fn search_due(&self, now: i64, poll: Duration) -> bool {
        let mut last = self.last_search.lock().unwrap_or_else(|e| e.into_inner());
        let due = self.backlog.load(Ordering::SeqCst)
            || now >= self.next_due.load(Ordering::Relaxed)
            || last.is_none_or(|t| t.elapsed() >= poll);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

/// The SQLite store of one gate.
pub(crate) struct SqliteStore {
    settings: Arc<SpoolSettings>,
    tx: Sender<Msg>,
    handoff: Arc<Handoff>,
    /// The operations API, on its own connections.
    ops: SqliteOps,
}

impl SqliteStore {
    /// Opens (creating if need be) the spool file and starts its writer thread. Blocking.
    pub(crate) fn open(
        settings: Arc<SpoolSettings>,
        shared: Arc<Shared>,
    ) -> Result<SqliteStore, SpoolError> {
        let opened = sql::open_gate(&settings)?;
        info!(
            path = %settings.path.display(),
            pending = opened.pending,
            resumed_in_flight = opened.resumed,
            from_intake_journal = opened.recovered,
            "spool opened"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let handoff = Arc::new(Handoff::new());
        writer::spawn(opened, settings.clone(), shared, handoff.clone(), rx).map_err(|e| {
            SpoolError::Open {
                path: settings.path.clone(),
                message: format!("cannot start the writer thread: {e}"),
            }
        })?;
        let ops = SqliteOps::of_gate(settings.path.clone());
        Ok(SqliteStore {
            settings,
            tx,
            handoff,
            ops,
        })
    }
}

/// Records that event `id` was delivered: a forget record if the journal holds it (it never
/// becomes a row), else its row deleted; its route's room goes to the next waiting event.
pub(crate) fn record_delivered(
    ctx: &mut writer::Ctx,
    tx: &writer::Tx<'_>,
    id: i64,
) -> rusqlite::Result<Disposition> {
    if ctx.intake.held.contains_key(&id) {
        if !ctx.flight.is_claimed(id) {
            return Ok(Disposition::Stale);
        }
        ctx.intake.forget(id);
    } else if !sql::delete_in_flight(tx.conn()?, id)? {
        return Ok(Disposition::Stale);
    }
    if let Some(route) = ctx.flight.end(id) {
        ctx.claim_waiting(&route);
    }
    ctx.delta.delivered += 1;
    Ok(Disposition::Delivered)
}

/// Stores one event in the writer's batch.
///
/// Once the delivery scheduler takes events, a new event goes to the intake journal: claimed
/// at birth if its route can start a delivery now and nothing older waits (in the file or in
/// memory), else waiting in memory for room. Before that (a gate whose deliveries have not
/// started), it is a pending row in the file's queue.
fn insert_one(
    ctx: &mut writer::Ctx,
    tx: &writer::Tx<'_>,
    mut prepared: sql::Prepared,
) -> rusqlite::Result<Accepted> {
    let dedupe = !ctx.settings.dedupe_window.is_zero();
    let max = ctx.settings.max_concurrency_per_route.max(1);
    let id = ctx.take_id();
    if !ctx.routes.contains(&prepared.route) {
        ctx.routes.insert(prepared.route.clone());
    }
    if ctx.handoff.taking.load(Ordering::Relaxed) {
        let route = &prepared.route;
        let born = !ctx.flight.in_backlog(route)
            && !ctx.intake.has_waiting(route)
            && ctx.flight.room(route, max) > 0;
        if born {
            ctx.flight.claim(id, route);
            ctx.born.push(prepared.take_stored(id));
        } else {
            ctx.intake.wait(route, id);
        }
        ctx.intake.hold(id, born, ctx.now, prepared, dedupe);
    } else {
        sql::insert_event(tx.conn()?, &prepared, id, ctx.now, sql::Insert::Pending)?;
        if dedupe {
            ctx.row_keys.push((prepared.key, ctx.now, id));
        }
        ctx.flight.enter_backlog(&prepared.route);
    }
    ctx.stored = true;
    ctx.delta.accepted += 1;
    Ok(Accepted::Stored(id))
}

impl Store for SqliteStore {
    fn accept_all(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Accepted>, SpoolError>> {
        Box::pin(async move {
            let prepared = events
                .into_iter()
                .map(sql::Prepared::new)
                .collect::<Result<Vec<_>, _>>()?;
            let weight = prepared.iter().map(|p| p.body.len()).sum();
            // What the events from each one on would add: the size cap is checked once,
            // before the first event that is not a duplicate.
            let mut from: Vec<u64> = prepared
                .iter()
                .rev()
                .scan(0u64, |sum, p| {
                    *sum += (p.body.len() + p.encoded_headers.len()) as u64;
                    Some(*sum)
                })
                .collect();
            from.reverse();
            writer::call(&self.tx, weight, true, move |ctx, tx| {
                let mut answers = Vec::with_capacity(prepared.len());
                let mut checked = false;
                for (p, size) in prepared.into_iter().zip(from) {
                    if ctx.seen(tx.reader(), &p.key)? {
                        answers.push(Accepted::Duplicate);
                        continue;
                    }
                    if !checked {
                        checked = true;
                        // The size cap refuses these events only (all of them: nothing of
                        // theirs is written yet); the rest of the batch commits.
                        if let Some(max) = ctx.settings.max_size_bytes {
                            if sql::used_bytes(tx.reader())? + ctx.intake.bytes() + size > max {
                                return Ok(Err(SpoolError::Full {
                                    path: ctx.settings.path.clone(),
                                }));
                            }
                        }
                    }
                    answers.push(insert_one(ctx, tx, p)?);
                }
                let duplicates = answers
                    .iter()
                    .filter(|a| **a == Accepted::Duplicate)
                    .count();
                ctx.delta.duplicates += duplicates as u64;
                Ok(Ok(answers))
            })
            .await
            .and_then(|accepted| accepted)
        })
    }

    fn claim<'a>(
        &'a self,
        _busy: &'a RouteMap<String, usize>,
    ) -> BoxFuture<'a, Result<Claimed, SpoolError>> {
        // The writer counts this process's deliveries itself (births included): `busy` is
        // what the scheduler knows of them, never more.
        Box::pin(async move {
            let handoff = &self.handoff;
            handoff.taking.store(true, Ordering::Relaxed);
            let (mut events, next_due) =
                if handoff.search_due(now_ms(), self.settings.poll_interval) {
                    let claimed = writer::call(&self.tx, 0, false, search_queue).await?;
                    (claimed.events, claimed.next_due)
                } else {
                    let due = handoff.next_due.load(Ordering::Relaxed);
                    (Vec::new(), (due != i64::MAX).then_some(due))
                };
            // After the search: were it to fail, these must not be dropped on the way.
            events.append(&mut handoff.lock_born());
            Ok(Claimed { events, next_due })
        })
    }

    /// A success is not waited for: its id is queued for the writer's next batch (woken if it
    /// sleeps), which records it with whatever else it writes — the delivery's task ends at
    /// once, and no batch, job or round trip is spent on it alone. It is bookkeeping without a
    /// sync either way: lost to a crash, the event is delivered again (at least once). The
    /// answer is `Delivered` (an outcome for an event no longer in flight is ignored when
    /// recorded, as before). Failures are recorded at once, as jobs of their own.
    fn complete(
        &self,
        id: i64,
        outcome: DeliveryOutcome,
    ) -> BoxFuture<'_, Result<Disposition, SpoolError>> {
        if outcome == DeliveryOutcome::Done {
            if self.handoff.push_delivered(id) && self.tx.send(Msg::Wake).is_err() {
                return Box::pin(async { Err(SpoolError::Closed) });
            }
            return Box::pin(async { Ok(Disposition::Delivered) });
        }
        Box::pin(writer::call(&self.tx, 0, false, move |ctx, tx| {
            let conn = tx.conn()?;
            let now = ctx.now;
            if ctx.intake.held.contains_key(&id) {
                if !ctx.flight.is_claimed(id) {
                    return Ok(Disposition::Stale);
                }
                // Retries and dead letters are rows' business.
                ctx.materialize(conn, id)?;
            }
            let Some((attempts, since)) = sql::in_flight(conn, id)? else {
                return Ok(Disposition::Stale);
            };
            if let Some(route) = ctx.flight.end(id) {
                ctx.claim_waiting(&route);
            }
            let random = ctx.random();
            match plan(&ctx.settings, outcome, attempts, since, now, random) {
                Plan::Dead(why) => {
                    sql::mark_dead(conn, id, &why, now)?;
                    ctx.delta.dead_lettered += 1;
                    Ok(Disposition::Dead(why))
                }
                Plan::Retry { at, error } => {
                    sql::reschedule(conn, id, at, &error, now)?;
                    ctx.handoff.next_due.fetch_min(at, Ordering::Relaxed);
                    ctx.delta.retried += 1;
                    Ok(Disposition::RetryAt(at))
                }
            }
        }))
    }

    /// Any job will do: queued successes are recorded first in the batch that runs it.
    fn settle(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(writer::call(&self.tx, 0, false, |_, _| Ok(())))
    }

    fn release(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<usize, SpoolError>> {
        Box::pin(writer::call(&self.tx, 0, false, move |ctx, tx| {
            let conn = tx.conn()?;
            let mut n = 0;
            for id in ids {
                ctx.materialize(conn, id)?;
                if sql::release(conn, id, ctx.now)? {
                    n += 1;
                    if let Some(route) = ctx.flight.end(id) {
                        ctx.flight.enter_backlog(&route);
                    }
                }
            }
            Ok(n)
        }))
    }

    fn renew(&self, _ids: Vec<i64>) -> BoxFuture<'_, Result<(), SpoolError>> {
        // One gate per file: its claims hold until it records them or restarts.
        Box::pin(async { Ok(()) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Msg::Close(tx)).is_ok() {
                let _ = rx.await;
            }
        })
    }

    fn location(&self) -> String {
        self.settings.path.display().to_string()
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(async move { self.ops.summary().await.map(drop) })
    }

    fn recent(&self, _key: [u8; 32], _window: Duration) -> BoxFuture<'_, Result<bool, SpoolError>> {
        // Sync routes keep their keys in memory unless the spool is shared (configuration).
        Box::pin(async { Ok(false) })
    }

    fn remember(&self, _key: [u8; 32]) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Operations for SqliteStore {
    /// The file's counts and the events and keys the writer holds in memory (a summary that a
    /// move into the file overlapped is taken again).
    fn summary(&self) -> BoxFuture<'_, Result<Summary, SpoolError>> {
        Box::pin(async move {
            let mut tries = 0;
            loop {
                let moves = self.handoff.moves.load(Ordering::SeqCst);
                let (held, keys) = writer::call(&self.tx, 0, false, |ctx, _| {
                    Ok((held_counts(ctx), ctx.intake.keys.len() as u64))
                })
                .await?;
                let mut summary = self.ops.summary().await?;
                tries += 1;
                if self.handoff.moves.load(Ordering::SeqCst) != moves && tries < 3 {
                    continue;
                }
                for (route, state, count, oldest) in held {
                    summary.add(&route, state, count, oldest);
                }
                summary.dedupe_keys += keys;
                return Ok(summary);
            }
        })
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<EventInfo>, SpoolError>> {
        self.ops.list(filter)
    }

    fn show(&self, id: i64) -> BoxFuture<'_, Result<EventDetail, SpoolError>> {
        self.ops.show(id)
    }

    fn replay(&self, target: ReplayTarget) -> BoxFuture<'_, Result<u64, SpoolError>> {
        self.ops.replay(target)
    }

    fn purge_dead(
        &self,
        older_than: Duration,
        route: Option<String>,
    ) -> BoxFuture<'_, Result<u64, SpoolError>> {
        self.ops.purge_dead(older_than, route)
    }
}

/// What the intake journal holds, as `(route, state, count, oldest received)`.
fn held_counts(ctx: &writer::Ctx) -> Vec<(String, EventState, u64, i64)> {
    let mut counts: HashMap<(&str, EventState), (u64, i64)> = HashMap::new();
    for (&id, held) in &ctx.intake.held {
        let state = if ctx.flight.is_claimed(id) {
            EventState::InFlight
        } else {
            EventState::Pending
        };
        let c = counts
            .entry((held.event.route.as_str(), state))
            .or_insert((0, i64::MAX));
        c.0 += 1;
        c.1 = c.1.min(held.event.received_ms);
    }
    counts
        .into_iter()
        .map(|((route, state), (n, oldest))| (route.to_owned(), state, n, oldest))
        .collect()
}

/// The writer's side of a claim: due events from every route's queue, as many as the route
/// has room for; a route whose due events all fit leaves the backlog.
fn search_queue(ctx: &mut writer::Ctx, tx: &writer::Tx<'_>) -> rusqlite::Result<Claimed> {
    let conn = tx.conn()?;
    let max = ctx.settings.max_concurrency_per_route.max(1);
    let mut events = Vec::new();
    let mut next_due: Option<i64> = None;
    let mut skipped = false;
    // Routes whose queue in the file is drained: events waiting in memory may go next.
    let mut waiting = Vec::new();
    for route in &ctx.routes {
        let room = ctx.flight.room(route, max);
        if room == 0 {
            skipped = true;
            continue;
        }
        let got = sql::claim(conn, route, room, ctx.now)?;
        if got.len() < room {
            ctx.flight.leave_backlog(route);
            waiting.push(route.clone());
            if let Some(due) = sql::next_due(conn, route)? {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
        }
        for e in &got {
            ctx.flight.claim(e.id, route);
        }
        events.extend(got);
    }
    for route in waiting {
        ctx.claim_waiting(&route);
    }
    // A route without room was not looked at: what was known of it still holds.
    let known = ctx.handoff.next_due.load(Ordering::Relaxed);
    let next = match next_due {
        Some(due) if skipped => due.min(known),
        Some(due) => due,
        None if skipped => known,
        None => i64::MAX,
    };
    ctx.handoff.next_due.store(next, Ordering::Relaxed);
    Ok(Claimed { events, next_due })
}

/// `SpoolOps` as the async [`Operations`] of `hubgate spool …` on a SQLite spool.
pub(crate) struct SqliteOps {
    path: std::path::PathBuf,
    /// Whether `summary` adds what the intake journal holds (another process than the gate:
    /// the gate counts its journal from memory).
    with_journal: bool,
}

impl SqliteOps {
    async fn with<T, F>(&self, f: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&SpoolOps) -> Result<T, SpoolError> + Send + 'static,
    {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&SpoolOps::open(&path)?))
            .await
            .map_err(|_| SpoolError::Closed)?
    }
}

impl SqliteOps {
    /// The operations API of `hubgate spool …` (another process than the gate).
    pub(crate) fn new(path: std::path::PathBuf) -> SqliteOps {
        SqliteOps {
            path,
            with_journal: true,
        }
    }

    /// The gate's own connection to its operations API.
    fn of_gate(path: std::path::PathBuf) -> SqliteOps {
        SqliteOps {
            path,
            with_journal: false,
        }
    }
}

impl Operations for SqliteOps {
    fn summary(&self) -> BoxFuture<'_, Result<Summary, SpoolError>> {
        let (path, with_journal) = (self.path.clone(), self.with_journal);
        Box::pin(self.with(move |o| {
            let mut summary = o.summary()?;
            if with_journal {
                intake::add_to_summary(&path, &mut summary).map_err(|e| SpoolError::Storage {
                    path: path.clone(),
                    message: format!("cannot read the intake journal: {e}"),
                })?;
            }
            Ok(summary)
        }))
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<EventInfo>, SpoolError>> {
        Box::pin(self.with(move |o| o.list(&filter)))
    }

    fn show(&self, id: i64) -> BoxFuture<'_, Result<EventDetail, SpoolError>> {
        Box::pin(self.with(move |o| o.show(id)))
    }

    fn replay(&self, target: ReplayTarget) -> BoxFuture<'_, Result<u64, SpoolError>> {
        Box::pin(self.with(move |o| o.replay(&target)))
    }

    fn purge_dead(
        &self,
        older_than: Duration,
        route: Option<String>,
    ) -> BoxFuture<'_, Result<u64, SpoolError>> {
        Box::pin(self.with(move |o| o.purge_dead(older_than, route.as_deref())))
    }
}
