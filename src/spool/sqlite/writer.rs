//! The writer thread and group commit. One thread owns the intake journal and the one
//! connection that writes; every write (accepts, claims, outcomes) reaches it as a job over a
//! channel. The loop blocks for the first job, then takes everything else already queued (up to
//! a count and a byte budget), runs the delivery bookkeeping among it in one transaction and
//! the accepts in another — their journal records written with one `fdatasync` (and, for
//! events written to the database, one WAL fsync under `synchronous=FULL`) — and only then
//! answers each job's waiter. While one batch is syncing, the next queues up, so the batch
//! size follows the load with no added delay: an idle spool syncs a lone event at once, a busy
//! one amortises each sync over many events. Between batches, every [`ABSORB_EVERY`], it
//! absorbs the journal (see `intake`).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::intake::Intake;
use super::keys::{self, Entry, KeyRuns, MergeRequest, Merged};
use super::sql::{self as store, Insert, Opened};
use super::Handoff;
use crate::spool::store::{duration_ms, now_ms, IdMap, Rng, RouteMap};
use crate::spool::{Shared, SpoolError, SpoolSettings, StoredEvent};

/// A batch stops growing past this many body bytes (bodies are up to a few MiB each).
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Keys accepted reach the database this much later at most, as one run (the journal holds
/// them durably meanwhile), or as soon as [`FLUSH_KEYS`] wait.
const KEYS_EVERY: Duration = Duration::from_millis(100);
const FLUSH_KEYS: usize = 1 << 14;
/// How often the writer looks for a merge's result while one is under way.
const MERGE_POLL: Duration = Duration::from_millis(50);
/// How often the intake journal is absorbed (see `intake`).
const ABSORB_EVERY: Duration = Duration::from_millis(200);
/// The most held events one absorb makes rows of (each absorb holds up the accepts).
const MAX_EVICT: usize = 2000;
/// The most held events one absorb makes rows of when the gate closes (they are all read
/// into memory for it).
const CLOSE_CHUNK: usize = 10_000;
/// When the journal keeps this many segments (a slow delivery pins the oldest), the events in
/// the older half become rows, so that those segments can go.
const MAX_SEGMENTS_KEPT: u64 = 32;
/// How often expired de-duplication keys are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The checkpointer runs at most this often (while there are commits).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A WAL file larger than this (the checkpointer cannot keep up) is checkpointed by the writer
/// itself, between two batches.
const WAL_HARD_LIMIT: u64 = 256 << 20;
/// How often the writer looks at the WAL's size.
const WAL_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Counter increments made by a batch's jobs; applied only when the batch commits.
#[derive(Default)]
pub(crate) struct Delta {
    pub accepted: u64,
    pub duplicates: u64,
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

/// This process's deliveries as the writer sees them (the writer thread's alone). A batch
/// that fails takes back what it changed here ([`begin`](Flight::begin), [`undo`](Flight::undo)).
#[derive(Default)]
pub(crate) struct Flight {
    /// Events claimed (at birth or from the queue) and not yet recorded: their routes.
    claimed: IdMap<i64, String>,
    /// How many of `claimed` per route.
    per_route: RouteMap<String, usize>,
    /// Routes whose queue may hold due events that no claim has taken yet: a new event of
    /// such a route waits its turn there instead of being claimed at birth.
    backlog: BTreeSet<String>,
    /// What changed since [`begin`](Flight::begin), oldest first.
    changes: Vec<FlightChange>,
}

enum FlightChange {
    Claimed(i64),
    Ended(i64, String),
    Backlogged(String),
    LeftBacklog(String),
}

impl Flight {
    /// With these routes' queues to search first (what a previous process left).
    pub fn with_backlog(backlog: BTreeSet<String>) -> Flight {
        Flight {
            backlog,
            ..Flight::default()
        }
    }

    /// Deliveries `route` may start now.
    pub fn room(&self, route: &str, max: usize) -> usize {
        max.saturating_sub(self.per_route.get(route).copied().unwrap_or(0))
    }

    pub fn claim(&mut self, id: i64, route: &str) {
        if self.claimed.insert(id, route.to_owned()).is_none() {
            *self.count(route) += 1;
            self.changes.push(FlightChange::Claimed(id));
        }
    }

    pub fn is_claimed(&self, id: i64) -> bool {
        self.claimed.contains_key(&id)
    }

    /// Forgets a claim once its outcome is recorded; returns its route.
    pub fn end(&mut self, id: i64) -> Option<String> {
        let route = self.claimed.remove(&id)?;
        let n = self.count(&route);
        *n = n.saturating_sub(1);
        self.changes.push(FlightChange::Ended(id, route.clone()));
        Some(route)
    }

    pub fn in_backlog(&self, route: &str) -> bool {
        self.backlog.contains(route)
    }

    pub fn backlog_is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    pub fn enter_backlog(&mut self, route: &str) {
        if !self.backlog.contains(route) {
            self.backlog.insert(route.to_owned());
            self.changes
                .push(FlightChange::Backlogged(route.to_owned()));
        }
    }

    pub fn leave_backlog(&mut self, route: &str) {
        if let Some(route) = self.backlog.take(route) {
            self.changes.push(FlightChange::LeftBacklog(route));
        }
    }

    /// A batch starts: what changes from now on can be taken back.
    pub fn begin(&mut self) {
        self.changes.clear();
    }

    /// Takes back every change since [`begin`](Flight::begin), newest first.
    pub fn undo(&mut self) {
        while let Some(change) = self.changes.pop() {
            match change {
                FlightChange::Claimed(id) => {
                    if let Some(route) = self.claimed.remove(&id) {
                        let n = self.count(&route);
                        *n = n.saturating_sub(1);
                    }
                }
                FlightChange::Ended(id, route) => {
                    *self.count(&route) += 1;
                    self.claimed.insert(id, route);
                }
                FlightChange::Backlogged(route) => {
                    self.backlog.remove(&route);
                }
                FlightChange::LeftBacklog(route) => {
                    self.backlog.insert(route);
                }
            }
        }
    }

    fn count(&mut self, route: &str) -> &mut usize {
        if !self.per_route.contains_key(route) {
            self.per_route.insert(route.to_owned(), 0);
        }
        self.per_route.get_mut(route).expect("just inserted")
    }
}

/// What jobs see besides the transaction.
pub(crate) struct Ctx {
    pub settings: Arc<SpoolSettings>,
    /// Every route that has (or had, since the start) events: the ones the scheduler looks at.
    pub routes: BTreeSet<String>,
    /// The batch's clock (Unix ms), the same for every job in it.
    pub now: i64,
    /// A job stored a new event: wake the delivery scheduler after the commit.
    pub stored: bool,
    /// The connection's `synchronous` setting: FULL (true) or NORMAL.
    sync_full: bool,
    pub delta: Delta,
    pub flight: Flight,
    /// Events this batch claimed at birth: handed to delivery once it commits.
    pub born: Vec<StoredEvent>,
    pub handoff: Arc<Handoff>,
    /// The intake journal and the events it holds.
    pub intake: Intake,
    /// The id the next event gets.
    pub next_id: i64,
    /// The de-duplication keys in the database.
    pub runs: KeyRuns,
    /// Keys of events this batch made rows of directly (no journal record holds them): written
    /// as a run in the batch's transaction.
    pub row_keys: Vec<Entry>,
    /// How far the keys written with `synchronous=NORMAL` are durable (see [`KeySync`]).
    key_sync: Arc<KeySync>,
    /// Segments below `.1` may go once key chunk `.0` is durable, oldest first.
    collectable: std::collections::VecDeque<(u64, u64)>,
    /// Segments below this may go (their keys are durable).
    collect_below: u64,
    /// This batch made rows of held events.
    materialized: bool,
    /// No segment may go before this "chunk" is durable: a commit without a sync that made rows
    /// of held events (their segments are all that keeps them until the WAL is synced).
    rows_chunk: u64,
    rng: Rng,
}

impl Ctx {
    /// A new event's id.
    pub fn take_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Claims events waiting in memory for `route` while it has room and nothing waits before
    /// them in the file, for the scheduler to take after the commit.
    pub fn claim_waiting(&mut self, route: &str) {
        if self.flight.in_backlog(route) {
            return;
        }
        let max = self.settings.max_concurrency_per_route.max(1);
        while self.flight.room(route, max) > 0 {
            let id = match self.intake.next_waiting(route) {
                Ok(Some(id)) => id,
                Ok(None) => break,
                Err(e) => {
                    error!(route, error = %e, "spool: cannot read a waiting event back from the intake journal; it stays there, undelivered");
                    continue;
                }
            };
            let Some(held) = self.intake.held.get_mut(&id) else {
                break;
            };
            self.born.push(held.take_stored(id));
            self.intake.claimed(id);
            self.flight.claim(id, route);
            self.stored = true;
        }
    }

    /// Moves event `id` from the journal into the database (as the state the writer knows it
    /// in: in flight when claimed, else pending). Its key stays with the journal's keys, which
    /// keep their segments until they are written. `false` if the journal does not hold it.
    pub fn materialize(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<bool> {
        let how = if self.flight.is_claimed(id) {
            Insert::InFlight
        } else {
            Insert::Pending
        };
        if let Err(e) = self.intake.fill(id) {
            let code = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR);
            let message = format!("reading event {id} back from the intake journal: {e}");
            return Err(rusqlite::Error::SqliteFailure(code, Some(message)));
        }
        let Some(held) = self.intake.forget(id) else {
            return Ok(false);
        };
        store::insert_event(conn, &held.event, id, held.stored_ms, how)?;
        self.materialized = true;
        Ok(true)
    }

    /// Whether `key` was accepted within the de-duplication window: among the journal's keys,
    /// this batch's, or the runs.
    pub fn seen(&self, conn: &Connection, key: &[u8; 32]) -> rusqlite::Result<bool> {
        let window = duration_ms(self.settings.dedupe_window);
        if window == 0 {
            return Ok(false);
        }
        let since = self.now.saturating_sub(window);
        if let Some(&(at, _)) = self.intake.keys.get(key) {
            return Ok(at >= since);
        }
        if self
            .row_keys
            .iter()
            .any(|(k, at, _)| k == key && *at >= since)
        {
            return Ok(true);
        }
        self.runs.contains_since(conn, key, since)
    }

    /// A random number for jitter.
    pub fn random(&mut self) -> u64 {
        self.rng.next()
    }
}

/// A batch's transaction, begun only when one of its jobs writes to the database: a batch
/// of accepts and deliveries that the journal holds alone costs no `BEGIN`/`COMMIT` (and
/// their locks), nor a change of the `synchronous` mode.
pub(crate) struct Tx<'c> {
    conn: &'c Connection,
    begun: std::cell::Cell<bool>,
    /// Whether the batch answers an accept: its commit must be `synchronous=FULL`.
    durable: bool,
    /// The connection's mode: FULL (true) or NORMAL.
    sync_full: std::cell::Cell<bool>,
}

impl<'c> Tx<'c> {
    fn new(conn: &'c Connection, durable: bool, sync_full: bool) -> Tx<'c> {
        Tx {
            conn,
            begun: std::cell::Cell::new(false),
            durable,
            sync_full: std::cell::Cell::new(sync_full),
        }
    }

    /// The connection inside the batch's transaction (begun now if need be, in the batch's
    /// `synchronous` mode: SQLite refuses to change it inside a transaction).
    pub fn conn(&self) -> rusqlite::Result<&'c Connection> {
        if !self.begun.get() {
            if self.sync_full.get() != self.durable {
                match apply_synchronous(self.conn, self.durable) {
                    Ok(()) => self.sync_full.set(self.durable),
                    // Never commit an accept without FULL: the batch fails.
                    Err(e) if self.durable => return Err(e),
                    // Bookkeeping committed with FULL is only slower.
                    Err(e) => warn!(error = %e, "spool: cannot set synchronous mode"),
                }
            }
            cached(self.conn, "BEGIN IMMEDIATE")?;
            self.begun.set(true);
        }
        Ok(self.conn)
    }

    /// The connection for reads that need no transaction: only this writer changes what they
    /// read (the de-duplication keys' runs).
    pub fn reader(&self) -> &'c Connection {
        self.conn
    }
}

/// One unit of work for the writer.
pub(crate) trait Job: Send {
    /// Body bytes it writes, for the batch's byte budget.
    fn weight(&self) -> usize;
    /// Whether its commit must be on disk before it is answered (accepts). Bookkeeping of
    /// deliveries is not: see [`commit_batch`].
    fn durable(&self) -> bool;
    /// Runs in the batch (its writes inside the batch's transaction, [`Tx::conn`]). An error
    /// here fails the batch.
    fn run(&mut self, ctx: &mut Ctx, tx: &Tx<'_>) -> Result<(), rusqlite::Error>;
    /// Answers the waiter once the batch committed (`Ok`) or failed.
    fn finish(self: Box<Self>, batch: &Result<(), SpoolError>);
}

struct FnJob<T, F> {
    f: Option<F>,
    out: Option<Result<T, SpoolError>>,
    reply: oneshot::Sender<Result<T, SpoolError>>,
    weight: usize,
    durable: bool,
}

impl<T, F> Job for FnJob<T, F>
where
    T: Send,
    F: FnOnce(&mut Ctx, &Tx<'_>) -> rusqlite::Result<T> + Send,
{
    fn weight(&self) -> usize {
        self.weight
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, ctx: &mut Ctx, tx: &Tx<'_>) -> Result<(), rusqlite::Error> {
        let Some(f) = self.f.take() else {
            return Ok(());
        };
        // A storage error fails the whole batch: SQLite may have rolled the transaction back
        // (SQLITE_FULL, I/O errors), so everyone in the batch gets the error.
        self.out = Some(Ok(f(ctx, tx)?));
        Ok(())
    }

    fn finish(self: Box<Self>, batch: &Result<(), SpoolError>) {
        let result = match batch {
            Ok(()) => self.out.unwrap_or(Err(SpoolError::Closed)),
            Err(e) => Err(e.clone()),
        };
        // The waiter may be gone (a client hung up): the work is done all the same.
        let _ = self.reply.send(result);
    }
}

/// The successful deliveries queued since the last batch, as one job of bookkeeping (see
/// `SqliteStore::complete`); a batch that fails puts them back in the queue.
struct Delivered {
    ids: Vec<i64>,
    handoff: Arc<Handoff>,
    ok: bool,
}

impl Delivered {
    fn take(handoff: &Arc<Handoff>) -> Option<Box<dyn Job>> {
        let ids = handoff.take_delivered();
        (!ids.is_empty()).then(|| {
            Box::new(Delivered {
                ids,
                handoff: handoff.clone(),
                ok: false,
            }) as Box<dyn Job>
        })
    }
}

impl Job for Delivered {
    fn weight(&self) -> usize {
        0
    }

    fn durable(&self) -> bool {
        false
    }

    fn run(&mut self, ctx: &mut Ctx, tx: &Tx<'_>) -> Result<(), rusqlite::Error> {
        for &id in &self.ids {
            if super::record_delivered(ctx, tx, id)? == super::Disposition::Stale {
                debug!(
                    id,
                    "spool: outcome for an event no longer in flight ignored"
                );
            }
        }
        self.ok = true;
        Ok(())
    }

    fn finish(self: Box<Self>, batch: &Result<(), SpoolError>) {
        if batch.is_err() || !self.ok {
            self.handoff.return_delivered(self.ids);
        }
    }
}

/// What the writer's channel carries.
pub(crate) enum Msg {
    Job(Box<dyn Job>),
    /// Deliveries were queued in [`Handoff`]'s `delivered`: record them.
    Wake,
    /// Finish the current batch, close the database and the lock, then answer.
    Close(oneshot::Sender<()>),
}

/// Queues `f` for the writer and waits for the commit of the batch that ran it; with `durable`,
/// for that commit to be fsynced.
pub(crate) async fn call<T, F>(
    tx: &Sender<Msg>,
    weight: usize,
    durable: bool,
    f: F,
) -> Result<T, SpoolError>
where
    T: Send + 'static,
    F: FnOnce(&mut Ctx, &Tx<'_>) -> rusqlite::Result<T> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job = FnJob {
        f: Some(f),
        out: None,
        reply,
        weight,
        durable,
    };
    tx.send(Msg::Job(Box::new(job)))
        .map_err(|_| SpoolError::Closed)?;
    answer.await.map_err(|_| SpoolError::Closed)?
}

/// Starts the writer thread on an opened spool.
pub(crate) fn spawn(
    opened: Opened,
    settings: Arc<SpoolSettings>,
    shared: Arc<Shared>,
    handoff: Arc<Handoff>,
    rx: Receiver<Msg>,
) -> std::io::Result<()> {
    let routes: BTreeSet<String> = opened.routes.iter().cloned().collect();
    // What a previous process left is due before anything new.
    let flight = Flight::with_backlog(routes.clone());
    handoff.backlog.store(!routes.is_empty(), Ordering::Relaxed);
    let ctx = Ctx {
        intake: opened.intake,
        next_id: opened.next_id,
        runs: opened.runs,
        row_keys: Vec::new(),
        key_sync: Arc::new(KeySync::default()),
        collectable: std::collections::VecDeque::new(),
        collect_below: 0,
        materialized: false,
        rows_chunk: 0,
        routes,
        settings,
        now: 0,
        stored: false,
        sync_full: true,
        delta: Delta::default(),
        flight,
        born: Vec::new(),
        handoff,
        rng: Rng::seeded(),
    };
    let ckpt_conn = store::open_checkpointer(&ctx.settings.path)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (wrote, commits) = std::sync::mpsc::sync_channel(1);
    let wal = wal_path(&ctx.settings.path);
    let key_sync = ctx.key_sync.clone();
    let checkpointer = std::thread::Builder::new()
        .name("hubgate-spool-ckpt".to_owned())
        .spawn(move || checkpointer(ckpt_conn, commits, &wal, &key_sync))?;
    let ckpt = Checkpoints {
        wrote,
        thread: Some(checkpointer),
    };
    let (ask, requests) = std::sync::mpsc::channel();
    let (done, merged) = std::sync::mpsc::channel();
    let path = ctx.settings.path.clone();
    let merger = std::thread::Builder::new()
        .name("hubgate-spool-keys".to_owned())
        .spawn(move || keys::merger(&path, requests, done))?;
    let merges = Merges {
        ask: Some(ask),
        merged,
        thread: Some(merger),
    };
    std::thread::Builder::new()
        .name("hubgate-spool".to_owned())
        .spawn(move || run(opened.conn, opened.lock, ctx, shared, rx, ckpt, merges))?;
    Ok(())
}

/// The writer's side of the key merger.
struct Merges {
    ask: Option<Sender<MergeRequest>>,
    merged: Receiver<Result<Merged, String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Merges {
    /// Asks for the next merge the runs need, if any (and none is under way).
    fn plan(&self, ctx: &mut Ctx) {
        let cutoff = now_ms().saturating_sub(duration_ms(ctx.settings.dedupe_window));
        if let Some(req) = ctx.runs.plan(cutoff) {
            if self.ask.as_ref().is_none_or(|a| a.send(req).is_err()) {
                ctx.runs.merge_failed();
            }
        }
    }

    /// Swaps in a merge that has come back, if one has, and plans the next.
    fn poll(&self, conn: &Connection, ctx: &mut Ctx, ckpt: &Checkpoints) {
        let result = match self.merged.try_recv() {
            Ok(r) => r,
            Err(std::sync::mpsc::TryRecvError::Empty) => return,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                if ctx.runs.merging() {
                    ctx.runs.merge_failed();
                    error!("spool: the key merger stopped; de-duplication keys are not merged any more (lookups slow down as runs pile up)");
                }
                return;
            }
        };
        set_synchronous(conn, ctx, false);
        match result.map(|m| ctx.runs.apply(conn, m).map_err(|e| e.to_string())) {
            Ok(Ok(())) => {
                debug!(
                    runs = ctx.runs.len(),
                    keys = ctx.runs.keys(),
                    memory_bytes = ctx.runs.memory_bytes(),
                    "spool: merged de-duplication keys"
                );
                let _ = ckpt.wrote.try_send(());
                self.plan(ctx);
            }
            Ok(Err(e)) | Err(e) => {
                ctx.runs.merge_failed();
                warn!(error = %e, "spool: merging de-duplication keys failed; trying again later");
            }
        }
    }

    /// Stops the merger (after its current merge) and waits for it.
    fn stop(mut self) {
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer's side of the checkpointer.
struct Checkpoints {
    /// Told (without waiting) after each commit that wrote.
    wrote: std::sync::mpsc::SyncSender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpoints {
    /// Stops the checkpointer (after its current checkpoint) and waits for it.
    fn stop(mut self) {
        drop(self.wrote);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The commits made with `synchronous=NORMAL` whose durability a segment of the journal waits
/// for — runs of keys, and bookkeeping that made rows of held events — numbered from 1 as
/// "chunks", and how many of them are durable: the checkpointer syncs the WAL file, off the
/// writer's path, and a segment may be deleted only once what it kept is durable elsewhere.
#[derive(Default)]
struct KeySync {
    written: std::sync::atomic::AtomicU64,
    durable: std::sync::atomic::AtomicU64,
}

impl KeySync {
    /// After a commit with `synchronous=FULL` (its WAL sync covers every earlier frame) or a
    /// sync of the WAL file: every chunk written before `written` was read is durable.
    fn synced(&self, written: u64) {
        self.durable.fetch_max(written, Ordering::SeqCst);
    }
}

fn wal_path(db: &std::path::Path) -> std::path::PathBuf {
    store::beside(db, "-wal")
}

/// The checkpointer thread: after commits, at most every [`CHECKPOINT_EVERY`], makes the key
/// chunks written so far durable (an `fdatasync` of the WAL file: everything the writer's
/// commits wrote into it), then copies the WAL into the database on a connection of its own (a
/// passive checkpoint: the writer goes on appending meanwhile; the WAL starts over once
/// everything in it is copied). Ends when the writer drops its sender.
fn checkpointer(conn: Connection, commits: Receiver<()>, wal: &std::path::Path, keys: &KeySync) {
    while commits.recv().is_ok() {
        let written = keys.written.load(Ordering::SeqCst);
        if written > keys.durable.load(Ordering::SeqCst) {
            match std::fs::File::open(wal).and_then(|f| f.sync_data()) {
                Ok(()) => keys.synced(written),
                Err(e) => warn!(error = %e, "spool: cannot sync the WAL"),
            }
        }
        match store::checkpoint(&conn) {
            Ok((frames, copied)) => {
                debug!(frames, copied, "spool: checkpoint");
            }
            Err(e) => {
                warn!(error = %e, "spool: checkpoint failed (the WAL grows until one succeeds)")
            }
        }
        std::thread::sleep(CHECKPOINT_EVERY);
    }
    // The last checkpoint is the writer's, when it closes the database.
    drop(conn);
}

fn run(
    conn: Connection,
    lock: Connection,
    mut ctx: Ctx,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    ckpt: Checkpoints,
    merges: Merges,
) {
    let wal = wal_path(&ctx.settings.path);
    let max_events = ctx.settings.max_batch_events.max(1);
    // None: prune with the first batch.
    let mut last_prune: Option<Instant> = None;
    let mut last_absorb = Instant::now();
    let mut last_keys = Instant::now();
    let mut last_wal_check = Instant::now();
    let mut close = None;
    merges.plan(&mut ctx);
    while close.is_none() {
        let mut wait = PRUNE_EVERY;
        // A merge under way, or deliveries a failed batch put back: look again soon.
        if ctx.runs.merging() || ctx.handoff.has_delivered() {
            wait = MERGE_POLL;
        }
        if !ctx.intake.keys.is_empty() {
            wait = wait.min(KEYS_EVERY.saturating_sub(last_keys.elapsed()));
        }
        if !ctx.intake.is_empty() {
            wait = wait.min(ABSORB_EVERY.saturating_sub(last_absorb.elapsed()));
        }
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut jobs: Vec<Box<dyn Job>> = Vec::new();
        let mut bytes = 0usize;
        let mut next = first;
        loop {
            match next {
                Some(Msg::Job(j)) => {
                    bytes += j.weight();
                    jobs.push(j);
                }
                Some(Msg::Wake) => {}
                Some(Msg::Close(r)) => {
                    close = Some(r);
                    break;
                }
                None => break,
            }
            if jobs.len() >= max_events || bytes >= MAX_BATCH_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        let prune = !ctx.settings.dedupe_window.is_zero()
            && last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
        merges.poll(&conn, &mut ctx, &ckpt);
        if !ctx.intake.is_empty() && last_absorb.elapsed() >= ABSORB_EVERY {
            absorb(&conn, &mut ctx, &shared, false);
            last_absorb = Instant::now();
            last_keys = last_absorb;
            merges.plan(&mut ctx);
        } else if ctx.intake.keys.len() >= FLUSH_KEYS
            || (!ctx.intake.keys.is_empty() && last_keys.elapsed() >= KEYS_EVERY)
        {
            write_keys(&conn, &mut ctx);
            last_keys = Instant::now();
            let _ = ckpt.wrote.try_send(());
            merges.plan(&mut ctx);
        }
        let delivered = Delivered::take(&ctx.handoff);
        if jobs.is_empty() && !prune && delivered.is_none() {
            continue;
        }
        // Delivery bookkeeping first, in a batch of its own: it needs no fsync, and a delivery
        // that ended must not wait for the accepts' fsync before its route's next event can go.
        // Successful deliveries ride with the first batch: the accepts' when there is no other
        // bookkeeping (one transaction, if any, and one write for both).
        let (mut durable, mut bookkeeping): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|j| j.durable());
        // First in the first batch, so that every job after it (a summary, a claim, a settle)
        // sees them.
        if let Some(d) = delivered {
            if bookkeeping.is_empty() {
                durable.insert(0, d);
            } else {
                bookkeeping.insert(0, d);
            }
        }
        if !bookkeeping.is_empty() && !durable.is_empty() {
            commit_batch(&conn, &mut ctx, &shared, bookkeeping, false);
            jobs = durable;
        } else {
            jobs = if durable.is_empty() {
                bookkeeping
            } else {
                durable
            };
        }
        let runs_before = ctx.runs.len();
        let pruned = commit_batch(&conn, &mut ctx, &shared, jobs, prune);
        let _ = ckpt.wrote.try_send(());
        // Keys of events made rows directly (before deliveries start) are a run of the batch.
        if ctx.runs.len() > runs_before {
            merges.plan(&mut ctx);
        }
        // Looked at every WAL_CHECK_EVERY, not after every batch (a `statx` each: 2 % of the
        // writer's time under load).
        if last_wal_check.elapsed() >= WAL_CHECK_EVERY
            && std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_HARD_LIMIT)
        {
            warn!(
                wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
                "spool: the WAL outgrew the checkpointer; checkpointing between batches"
            );
            if let Err(e) = store::checkpoint(&conn) {
                warn!(error = %e, "spool: checkpoint failed");
            }
        }
        if last_wal_check.elapsed() >= WAL_CHECK_EVERY {
            last_wal_check = Instant::now();
        }
        if prune && pruned.is_some() {
            last_prune = Some(Instant::now());
        }
    }
    // Jobs still queued are dropped with the receiver: their waiters see `Closed`.
    drop(rx);
    // Deliveries that ended since the last batch are recorded before everything becomes rows.
    if let Some(d) = Delivered::take(&ctx.handoff) {
        commit_batch(&conn, &mut ctx, &shared, vec![d], false);
    }
    // Everything the journal holds becomes a row, so that what follows deals with rows only
    // (a chunk per absorb: spilled events are read back into memory for it).
    loop {
        let before = ctx.intake.held.len();
        absorb(&conn, &mut ctx, &shared, true);
        let after = ctx.intake.held.len();
        if after == 0 || after >= before {
            break;
        }
    }
    unclaim_untaken(&conn, &ctx);
    // The writer's connection is then the last one: closing it checkpoints everything.
    merges.stop();
    ckpt.stop();
    if let Err((_, e)) = conn.close() {
        warn!(error = %e, "spool: closing the database failed");
    }
    drop(lock);
    debug!("spool writer stopped");
    if let Some(r) = close {
        let _ = r.send(());
    }
}

/// Events claimed at birth that no delivery took before the gate closed: pending again, with
/// no attempt counted (a crash instead leaves them to the next open, which counts one).
fn unclaim_untaken(conn: &Connection, ctx: &Ctx) {
    let untaken = std::mem::take(&mut *ctx.handoff.lock_born());
    if untaken.is_empty() {
        return;
    }
    let now = now_ms();
    let result = in_transaction(conn, || -> rusqlite::Result<usize> {
        let mut n = 0;
        for e in &untaken {
            n += usize::from(store::unclaim_born(conn, e.id, now)?);
        }
        Ok(n)
    });
    match result {
        Ok(n) => debug!(
            events = n,
            "spool: undelivered events claimed at birth are pending again"
        ),
        Err(e) => {
            warn!(error = %e, "spool: could not put events claimed at birth back; the next start will");
        }
    }
}

/// Runs a statement without parameters or rows through the statement cache.
fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs `f` in a write transaction of its own, committed if it succeeds, rolled back (if
/// SQLite has not already) if anything fails.
pub(crate) fn in_transaction<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let result = cached(conn, "BEGIN IMMEDIATE")
        .map_err(E::from)
        .and_then(|()| f())
        .and_then(|t| cached(conn, "COMMIT").map(|()| t).map_err(E::from));
    if result.is_err() && !conn.is_autocommit() {
        let _ = cached(conn, "ROLLBACK");
    }
    result
}

/// Why a batch failed.
enum BatchError {
    Sql(rusqlite::Error),
    Intake(std::io::Error),
}

impl From<rusqlite::Error> for BatchError {
    fn from(e: rusqlite::Error) -> Self {
        BatchError::Sql(e)
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Sql(e) => e.fmt(f),
            BatchError::Intake(e) => write!(f, "intake journal: {e}"),
        }
    }
}

impl BatchError {
    fn to_spool_error(&self, path: &std::path::Path) -> SpoolError {
        match self {
            BatchError::Sql(e) => store::storage_error(path, e),
            BatchError::Intake(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                SpoolError::Full {
                    path: path.to_owned(),
                }
            }
            BatchError::Intake(e) => SpoolError::Storage {
                path: path.to_owned(),
                message: e.to_string(),
            },
        }
    }
}

/// Sets the connection's `synchronous` mode to FULL (`full`) or NORMAL, if it is not already.
fn set_synchronous(conn: &Connection, ctx: &mut Ctx, full: bool) {
    if full == ctx.sync_full {
        return;
    }
    match apply_synchronous(conn, full) {
        Ok(()) => ctx.sync_full = full,
        Err(e) => warn!(error = %e, "spool: cannot set synchronous mode"),
    }
}

fn apply_synchronous(conn: &Connection, full: bool) -> rusqlite::Result<()> {
    // Not through the statement cache: SQLite applies this PRAGMA when it compiles it, so a
    // cached one would do nothing the second time.
    conn.execute_batch(if full {
        "PRAGMA synchronous = FULL"
    } else {
        "PRAGMA synchronous = NORMAL"
    })
}

/// Writes the journal's keys into the database as one run, in a transaction of its own with
/// `synchronous=NORMAL`: the journal keeps them durable until the checkpointer has synced the
/// WAL (or a `FULL` commit has), and only then may their segments go ([`KeySync`]). Returns
/// whether it wrote.
fn write_keys(conn: &Connection, ctx: &mut Ctx) -> bool {
    set_synchronous(conn, ctx, false);
    let mut entries = journal_keys(ctx);
    // Counted before the keys can reach the file (see `Handoff::moves`).
    ctx.handoff.moves.fetch_add(1, Ordering::SeqCst);
    let result = in_transaction(conn, || -> rusqlite::Result<_> {
        let run = KeyRuns::write(conn, &mut entries)?;
        // Ids are never reused, also those of delivered events whose segments are gone.
        store::save_next_id(conn, ctx.next_id)?;
        Ok(run)
    });
    match result {
        Ok(run) => {
            ctx.intake.keys.clear();
            if let Some(run) = run {
                ctx.runs.add(run);
            }
            ctx.key_sync.written.fetch_add(1, Ordering::SeqCst);
            true
        }
        Err(e) => {
            warn!(error = %e, "spool: writing de-duplication keys failed; trying again shortly");
            false
        }
    }
}

/// The journal's keys, as a run's entries.
fn journal_keys(ctx: &Ctx) -> Vec<Entry> {
    ctx.intake
        .keys
        .iter()
        .map(|(k, &(at, id))| (*k, at, id))
        .collect()
}

/// Deletes the segments the journal no longer needs whose keys are durable (and none while
/// rows made of held events are not: see `Ctx::rows_chunk`).
fn collect(ctx: &mut Ctx) {
    let durable = ctx.key_sync.durable.load(Ordering::SeqCst);
    if durable < ctx.rows_chunk {
        return;
    }
    while let Some(&(chunk, below)) = ctx.collectable.front() {
        if chunk > durable {
            break;
        }
        ctx.collect_below = ctx.collect_below.max(below);
        ctx.collectable.pop_front();
    }
    ctx.intake.collect(ctx.collect_below);
}

/// Notes that every key of the segments before the current one is written (as chunk
/// `written`): those segments may go once it is durable.
fn keys_written_below_current(ctx: &mut Ctx) {
    let mark = (
        ctx.key_sync.written.load(Ordering::SeqCst),
        ctx.intake.segments().1,
    );
    if ctx.collectable.back() != Some(&mark) {
        ctx.collectable.push_back(mark);
    }
}

/// Absorbs the intake journal (see `intake`): writes the keys not written yet, makes rows —
/// in one `synchronous=FULL` transaction, with those keys, whose WAL sync also makes durable
/// the chunks [`write_keys`] wrote — of the events the journal should not keep (events
/// pinning segments past [`MAX_SEGMENTS_KEPT`], oldest first; the routes of waiting ones are
/// then served from the file's queue); then deletes the segments that
/// hold nothing live and whose keys are durable. Without rows to make, nothing is synced here.
/// On failure nothing changes and the next absorb tries again (the journal
/// keeps everything durable meanwhile).
///
/// With `everything` (the gate is closing), every held event becomes a row: a spool closed
/// cleanly is all in the database.
fn absorb(conn: &Connection, ctx: &mut Ctx, shared: &Shared, everything: bool) {
    if ctx.intake.is_empty() && (!everything || ctx.intake.held.is_empty()) {
        return;
    }
    let mut evict = if everything {
        let mut all: Vec<i64> = ctx.intake.held.keys().copied().collect();
        all.sort_unstable();
        all.truncate(CLOSE_CHUNK);
        all
    } else {
        to_evict(ctx)
    };
    // A spilled event whose record cannot be read back stays in the journal (the next start
    // recovers what can be read); the others go on.
    evict.retain(|&id| match ctx.intake.fill(id) {
        Ok(()) => true,
        Err(e) => {
            error!(id, error = %e, "spool: cannot read an event back from the intake journal; it stays there");
            false
        }
    });
    if evict.is_empty() && !everything {
        // No row to make: the keys not written yet go as a run, and the segments whose keys
        // the checkpointer has made durable go — no sync on the accepts' path.
        if ctx.intake.keys.is_empty() || write_keys(conn, ctx) {
            keys_written_below_current(ctx);
        }
        collect(ctx);
        return;
    }
    set_synchronous(conn, ctx, true);
    if !ctx.sync_full {
        return;
    }
    let written = ctx.key_sync.written.load(Ordering::SeqCst);
    if !evict.is_empty() {
        let (oldest, current) = ctx.intake.segments();
        debug!(
            events = evict.len(),
            held = ctx.intake.held.len(),
            oldest_segment = oldest,
            current_segment = current,
            "spool: absorb makes rows of held events"
        );
    }
    let mut queued = BTreeSet::new();
    ctx.intake.begin();
    let journal_before = ctx.intake.len();
    // Counted before anything can reach the file (see `Handoff::moves`).
    ctx.handoff.moves.fetch_add(1, Ordering::SeqCst);
    let mut entries = journal_keys(ctx);
    let result = in_transaction(conn, || -> Result<_, BatchError> {
        for &id in &evict {
            if !ctx.flight.is_claimed(id) {
                if let Some(h) = ctx.intake.held.get(&id) {
                    queued.insert(h.event.route.clone());
                }
            }
            ctx.materialize(conn, id)?;
        }
        let run = KeyRuns::write(conn, &mut entries)?;
        store::save_next_id(conn, ctx.next_id)?;
        // The forget records of what became rows, before the rows.
        ctx.intake.write(true).map_err(BatchError::Intake)?;
        Ok(run)
    });
    match result {
        Ok(run) => {
            ctx.intake.keys.clear();
            if let Some(run) = run {
                ctx.runs.add(run);
            }
            // The commit's WAL sync covered every chunk written before it, and it held the
            // rest of the keys.
            ctx.key_sync.synced(written);
            keys_written_below_current(ctx);
            if !queued.is_empty() {
                ctx.intake.prune_waiting();
                for route in &queued {
                    ctx.flight.enter_backlog(route);
                }
                ctx.handoff.backlog.store(true, Ordering::SeqCst);
                shared.notify.notify_one();
            }
            collect(ctx);
        }
        Err(e) => {
            ctx.intake.cut(journal_before);
            ctx.intake.rollback();
            warn!(error = %e, "spool: absorbing the intake journal failed; trying again shortly");
        }
    }
}

/// The held events an absorb makes rows of, by id: those in the older half of too many
/// segments (a slow delivery pins them), oldest first, at most [`MAX_EVICT`].
fn to_evict(ctx: &Ctx) -> Vec<i64> {
    let intake = &ctx.intake;
    let (oldest, current) = intake.segments();
    if current - oldest < MAX_SEGMENTS_KEPT {
        return Vec::new();
    }
    let before = current - MAX_SEGMENTS_KEPT / 2;
    let mut evict: Vec<i64> = intake
        .held
        .iter()
        .filter(|(_, h)| h.segment < before)
        .map(|(&id, _)| id)
        .collect();
    evict.sort_unstable();
    evict.truncate(MAX_EVICT);
    evict
}

/// Runs one batch in one transaction and answers its jobs. Returns how many expired
/// de-duplication keys were pruned, if it pruned.
///
/// A batch with an accept in it commits with `synchronous=FULL`: the WAL is fsynced before
/// anyone is answered. A batch of delivery bookkeeping only (claims, outcomes, releases)
/// commits with `synchronous=NORMAL`: written to the WAL (so it survives the process being
/// killed) but fsynced only with the next durable commit or checkpoint. The WAL is append-only,
/// so an fsync covers every earlier transaction, and WAL mode stays consistent either way; a
/// power loss can only undo recent bookkeeping — an in-flight mark (made pending again at
/// start anyway) or a recorded outcome (the event is delivered again: at least once). This
/// keeps draining a backlog from costing two fsyncs per event.
fn commit_batch(
    conn: &Connection,
    ctx: &mut Ctx,
    shared: &Shared,
    mut jobs: Vec<Box<dyn Job>>,
    prune: bool,
) -> Option<u64> {
    let durable = jobs.iter().any(|j| j.durable());
    ctx.now = now_ms();
    ctx.stored = false;
    ctx.delta = Delta::default();
    ctx.born.clear();
    ctx.row_keys.clear();
    ctx.materialized = false;
    ctx.flight.begin();
    ctx.intake.begin();
    let journal_before = ctx.intake.len();
    let mut synced_journal = false;
    let mut pruned = None;
    let mut new_run = None;
    let mut commit_time = Duration::ZERO;
    let changes_before = conn.total_changes();
    // BEGIN and COMMIT as cached statements: rusqlite's `Transaction` parses them anew for
    // every batch (bench/cost.sh showed it).
    let tx = Tx::new(conn, durable, ctx.sync_full);
    let result = (|| -> Result<(), BatchError> {
        if prune {
            let cutoff = ctx
                .now
                .saturating_sub(duration_ms(ctx.settings.dedupe_window));
            pruned = Some(ctx.runs.expire(tx.conn()?, cutoff)?);
        }
        for job in jobs.iter_mut() {
            job.run(ctx, &tx)?;
        }
        if !ctx.row_keys.is_empty() {
            new_run = KeyRuns::write(tx.conn()?, &mut ctx.row_keys)?;
        }
        let started = Instant::now();
        // The journal first: its records are durable before the rows that may refer to them.
        synced_journal = ctx.intake.write(durable).map_err(BatchError::Intake)?;
        if tx.begun.get() {
            cached(conn, "COMMIT")?;
        }
        commit_time = started.elapsed();
        Ok(())
    })();
    ctx.sync_full = tx.sync_full.get();
    if result.is_err() {
        if !conn.is_autocommit() {
            // Nothing of a failed batch stays (SQLite may have rolled back already).
            if let Err(e) = cached(conn, "ROLLBACK") {
                warn!(error = %e, "spool: rolling back a failed batch failed");
            }
        }
        ctx.intake.cut(journal_before);
        ctx.intake.rollback();
    }
    let result = match result {
        Ok(()) => {
            let s = &shared.stats;
            // Only durable commits that wrote something cost an fsync; count those.
            if durable && (synced_journal || conn.total_changes() != changes_before) {
                s.commits.fetch_add(1, Ordering::Relaxed);
                s.commit_nanos.fetch_add(
                    u64::try_from(commit_time.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            s.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            let d = &ctx.delta;
            s.accepted.fetch_add(d.accepted, Ordering::Relaxed);
            s.duplicates.fetch_add(d.duplicates, Ordering::Relaxed);
            s.delivered.fetch_add(d.delivered, Ordering::Relaxed);
            s.retried.fetch_add(d.retried, Ordering::Relaxed);
            s.dead_lettered
                .fetch_add(d.dead_lettered, Ordering::Relaxed);
            // Before the scheduler is woken: it decides from these whether to search the queue.
            ctx.handoff
                .backlog
                .store(!ctx.flight.backlog_is_empty(), Ordering::SeqCst);
            if !ctx.born.is_empty() {
                ctx.handoff.lock_born().append(&mut ctx.born);
            }
            if let Some(run) = new_run.take() {
                ctx.runs.add(run);
            }
            if ctx.materialized && !durable {
                // Counted like a chunk of keys: the checkpointer's next WAL sync makes it
                // durable, and only then may segments go.
                ctx.rows_chunk = ctx.key_sync.written.fetch_add(1, Ordering::SeqCst) + 1;
            }
            if ctx.stored {
                shared.notify.notify_one();
            }
            if let Some(keys @ 1..) = pruned {
                info!(keys, "spool: pruned expired de-duplication keys");
            }
            Ok(())
        }
        Err(e) => {
            // Nothing of it happened: claims made and outcomes recorded in it included.
            ctx.flight.undo();
            ctx.born.clear();
            shared.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
            let err = e.to_spool_error(&ctx.settings.path);
            match err {
                SpoolError::Full { .. } => error!(
                    path = %ctx.settings.path.display(),
                    jobs = jobs.len(),
                    "spool: disk full, nothing in this batch was stored"
                ),
                _ => error!(
                    error = %e,
                    jobs = jobs.len(),
                    "spool: commit failed, nothing in this batch was stored"
                ),
            }
            Err(err)
        }
    };
    if result.is_ok() {
        ctx.intake.maybe_roll();
    }
    for job in jobs {
        job.finish(&result);
    }
    pruned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_sets_its_synchronous_mode_only_when_it_writes_to_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; CREATE TABLE t (x)",
        )
        .unwrap();
        let mode = |c: &Connection| -> i64 {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
        };
        // A durable batch the journal holds alone: no transaction, the mode untouched.
        let tx = Tx::new(&conn, true, false);
        assert_eq!(mode(tx.reader()), 1);
        assert!(!tx.sync_full.get());
        // A durable batch that writes: FULL (2) before its transaction begins.
        let tx = Tx::new(&conn, true, false);
        tx.conn()
            .unwrap()
            .execute("INSERT INTO t VALUES (1)", [])
            .unwrap();
        assert_eq!(mode(&conn), 2);
        assert!(tx.sync_full.get());
        cached(&conn, "COMMIT").unwrap();
        // Bookkeeping that writes: back to NORMAL.
        let tx = Tx::new(&conn, false, true);
        tx.conn().unwrap();
        assert_eq!(mode(&conn), 1);
        assert!(!tx.sync_full.get());
        cached(&conn, "COMMIT").unwrap();
    }

    #[test]
    fn a_failed_batch_takes_back_its_flight_changes_and_only_those() {
        let mut f = Flight::with_backlog(["/old".to_owned()].into());
        f.claim(1, "/a");
        f.claim(2, "/a");
        f.begin();
        // The batch: a claim, an end, one route into the backlog and one out of it.
        f.claim(3, "/a");
        f.claim(3, "/a"); // claimed twice counts once
        assert_eq!(f.end(1).as_deref(), Some("/a"));
        assert_eq!(f.end(1), None);
        f.enter_backlog("/b");
        f.enter_backlog("/b");
        f.leave_backlog("/old");
        assert_eq!(f.room("/a", 16), 14);
        assert!(f.in_backlog("/b") && !f.in_backlog("/old"));
        f.undo();
        // As before the batch: 1 and 2 claimed, 3 not; /old in the backlog, /b not.
        assert!(f.is_claimed(1) && f.is_claimed(2) && !f.is_claimed(3));
        assert_eq!(f.room("/a", 16), 14);
        assert!(f.in_backlog("/old") && !f.in_backlog("/b"));
        // A batch that succeeds keeps its changes; the next begin starts afresh.
        f.begin();
        assert_eq!(f.end(2).as_deref(), Some("/a"));
        f.begin();
        f.undo();
        assert!(!f.is_claimed(2));
        assert_eq!(f.room("/a", 16), 15);
    }
}
