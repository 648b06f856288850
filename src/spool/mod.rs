//! The durable spool (`delivery = "spool"`): an authenticated event is written to disk and
//! synced **before** Meta gets its 200, then delivered to the backend on hubgate's own schedule,
//! at least once, and never twice within the de-duplication window.
//!
//! This module owns the public API ([`Spool`], [`SpoolSettings`], [`NewEvent`], …); the parts:
//!
//! - [`store`]: the [`store::Store`] contract both engines fulfil, the retry plan, the shared
//!   types;
//! - `sqlite`: the embedded default, one file per gate ([`SpoolOps`] is its blocking
//!   operations API);
//! - [`deliver`]: the [`Deliver`] trait, the status rules, and the delivery scheduler.
//!
//! # Durability and crash consistency
//!
//! [`Spool::accept`] returns only after the event is on disk and synced: in the SQLite
//! spool's intake journal (`fdatasync`) once deliveries run, else in the database committed with
//! `synchronous=FULL` — an acknowledged event survives `kill -9` and power loss. Concurrent
//! accepts share syncs (see `sqlite::writer`). An event being delivered is `in_flight`; a crash
//! leaves it so, and [`Spool::open`] makes every such event pending again (the journal's events
//! become rows first), so nothing acknowledged is lost, at the price of a possible second
//! delivery (at least once). A delivered event is forgotten (a record in the journal, or its
//! row deleted); its de-duplication key stays for the window. One gate per spool file: a lock
//! (`<path>.lock`) refuses a second one.
//!
//! # De-duplication
//!
//! Key = SHA-256 of (route path, raw body) (see `store::dedupe_key`). An event whose key was
//! accepted less than `dedupe_window` ago is answered [`Accepted::Duplicate`] (the gate answers
//! 200) and neither stored nor delivered again — whatever became of the first copy (pending,
//! delivered or dead). The check sees the keys of the journal's events too (they reach the
//! database in bulk, 100 ms later at most), so two copies arriving together are caught, and the
//! duplicate's answer waits for the original's sync. Keys older than the window are pruned
//! every minute.
//!
//! # Retries
//!
//! See [`deliver`] for ordering and shutdown. After attempt *n* fails with
//! [`DeliveryOutcome::Retry`] the event is due again after `backoff_base · 2^(n−1)`, capped at
//! `backoff_max`, with equal jitter (between half and all of it). Retries stop at the retry
//! horizon, counted from acceptance (or from a replay): the last attempt is made at the horizon,
//! and if it fails too the event is dead (`last_error` says why). Dead events stay until
//! replayed or purged.

pub mod deliver;
pub(crate) mod postgres;
pub(crate) mod sqlite;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use deliver::{outcome_for_status, Deliver, DeliveryOutcome};
pub use sqlite::SpoolOps;
pub use store::{
    EventDetail, EventInfo, EventState, ListFilter, Operations, ReplayTarget, RouteSummary, Summary,
};

use store::Store;

/// Which engine keeps the events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file per gate, at [`SpoolSettings::path`] (the default).
    Sqlite,
    /// One PostgreSQL database shared by every gate.
    Postgres(PostgresSettings),
}

/// Where and how to reach the shared PostgreSQL spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database?sslmode=…`, libpq's URL form and sslmode
    /// values (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`). A secret: it may
    /// hold a password, and is never logged.
    pub url: crate::secret::Secret,
    /// Connections per gate. Default 16.
    pub pool_size: usize,
    /// Trust anchors for `verify-ca`/`verify-full` (and `require`, which then verifies the
    /// chain as libpq does with a root certificate); the system store when absent.
    pub ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

/// Everything the spool can be told. [`SpoolSettings::new`] gives the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolSettings {
    /// The engine. [`SpoolSettings::new`] makes a SQLite spool, [`SpoolSettings::postgres`] a
    /// PostgreSQL one.
    pub backend: Backend,
    /// SQLite: the database file. Its folder must exist and be writable; the file is created
    /// if need be. SQLite adds `<path>-wal` and `<path>-shm`, and the spool `<path>.lock`.
    /// Empty for PostgreSQL.
    pub path: PathBuf,
    /// An event whose (route, body) was accepted this recently is a duplicate. Default 36 h;
    /// zero turns de-duplication off.
    pub dedupe_window: Duration,
    /// How long after acceptance (or a replay) failed deliveries are retried. Default 36 h.
    pub retry_horizon: Duration,
    /// Deliveries running at once per route. Default 16; 1 keeps strict acceptance order while
    /// the backend succeeds.
    pub max_concurrency_per_route: usize,
    /// The first retry's nominal delay. Default 1 s.
    pub backoff_base: Duration,
    /// The longest nominal delay between retries. Default 5 min.
    pub backoff_max: Duration,
    /// A 4xx other than 408 and 429 dead-letters the event at once (default true); false
    /// retries it until the horizon. Used by the caller through [`outcome_for_status`].
    pub dead_letter_4xx: bool,
    /// A cap on the database file's size: past it, accepts fail with [`SpoolError::Full`] just as
    /// on a full disk. Default none.
    pub max_size_bytes: Option<u64>,
    /// How often the scheduler looks for due events when nothing woke it (it is woken by new
    /// events and finished deliveries; this catches replays made by `hubgate spool`). Default 1 s.
    pub poll_interval: Duration,
    /// On shutdown, how long running deliveries may take to finish before they are cut short
    /// and left pending. Default 10 s.
    pub shutdown_grace: Duration,
    /// The most jobs (events, outcomes) in one commit. Default 1024.
    pub max_batch_events: usize,
    /// How long an accept may take before it is answered as failed (503, Meta retries): a
    /// stuck disk or database must not hold Meta's request past its own deadline. Default 3 s.
    pub accept_timeout: Duration,
    /// How long a claim holds on a shared store before another gate may take the event over;
    /// renewed while the delivery runs. Default 30 s (unused by SQLite: one gate per file).
    pub lease: Duration,
    /// SQLite: the memory events waiting for delivery room may take before new ones are kept
    /// only in the journal (64 MiB; smaller in tests).
    pub(crate) held_budget: u64,
}

impl SpoolSettings {
    /// The defaults, for the spool at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SpoolSettings {
        SpoolSettings {
            backend: Backend::Sqlite,
            path: path.into(),
            dedupe_window: Duration::from_secs(36 * 3600),
            retry_horizon: Duration::from_secs(36 * 3600),
            max_concurrency_per_route: 16,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            dead_letter_4xx: true,
            max_size_bytes: None,
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            max_batch_events: 1024,
            accept_timeout: Duration::from_secs(3),
            lease: Duration::from_secs(30),
            held_budget: sqlite::HELD_BUDGET,
        }
    }

    /// The defaults, for a PostgreSQL spool.
    pub fn postgres(settings: PostgresSettings) -> SpoolSettings {
        SpoolSettings {
            backend: Backend::Postgres(settings),
            ..SpoolSettings::new(PathBuf::new())
        }
    }

    /// What `hubgate check` can verify without opening the spool (a running gate holds its
    /// lock, a database may be out of reach): the settings and, for SQLite, that the folder
    /// exists and the path is not a folder.
    pub fn check(&self) -> Result<(), SpoolError> {
        self.validate()?;
        match &self.backend {
            Backend::Sqlite => sqlite::sql::check_folder(&self.path),
            Backend::Postgres(pg) => postgres::Target::parse(pg).map(drop),
        }
    }

    /// Where the events are kept, for messages: the SQLite file, or `postgres host:port/db`
    /// (never the password).
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Sqlite => self.path.display().to_string(),
            Backend::Postgres(pg) => postgres::Target::parse(pg)
                .map(|t| t.location)
                .unwrap_or_else(|_| "postgres (invalid url)".to_owned()),
        }
    }

    /// Whether `other` names the same store (what a reload may not change).
    pub fn same_store(&self, other: &SpoolSettings) -> bool {
        match (&self.backend, &other.backend) {
            (Backend::Sqlite, Backend::Sqlite) => self.path == other.path,
            (Backend::Postgres(a), Backend::Postgres(b)) => a.url == b.url,
            _ => false,
        }
    }

    fn validate(&self) -> Result<(), SpoolError> {
        let bad = |message: &str| {
            Err(SpoolError::Settings {
                path: self.path.clone(),
                message: message.to_owned(),
            })
        };
        if self.max_concurrency_per_route == 0 {
            return bad("max_concurrency_per_route must be at least 1");
        }
        if self.backoff_max < self.backoff_base {
            return bad("backoff_max must not be below backoff_base");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval must not be zero");
        }
        if self.accept_timeout.is_zero() {
            return bad("accept_timeout must not be zero");
        }
        Ok(())
    }
}

/// An authenticated event to store.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The route's path (the exact path the request came in on).
    pub route: String,
    /// The raw, verified body.
    pub body: Bytes,
    /// The headers to send to the backend, in order (as `forward::upstream_headers` makes
    /// them).
    pub headers: http::HeaderMap,
    /// The request's query string, if any: appended to the upstream URL on delivery.
    pub query: Option<String>,
    /// The verified client (e.g. the certificate's CN), for the record.
    pub client_identity: Option<String>,
    /// When the gate received it.
    pub received_at: SystemTime,
    /// The update's own identity (a part of a split batch with `dedupe = "item"`): the
    /// spool de-duplicates by it instead of by the body.
    pub update_key: Option<[u8; 32]>,
}

/// What [`Spool::accept`] did. Either way the gate may answer 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Stored, durably, with this id.
    Stored(i64),
    /// Already accepted within the de-duplication window: not stored again.
    Duplicate,
}

/// An event handed to [`Deliver::deliver`].
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// The event's id in the spool (what `hubgate spool show` takes).
    pub id: i64,
    /// The route's path: look up its upstream in the current configuration.
    pub route: String,
    /// The raw body, byte for byte as verified.
    pub body: Bytes,
    /// The headers to send, as stored by [`Spool::accept`].
    pub headers: http::HeaderMap,
    /// The query string to append to the upstream URL.
    pub query: Option<String>,
    /// The verified client at reception.
    pub client_identity: Option<String>,
    /// When the gate received it.
    pub received_at: SystemTime,
    /// This attempt's number: 1 for the first.
    pub attempt: u32,
}

/// Spool errors. Every error of [`Spool::accept`] means "not stored": the gate answers 503 so
/// that Meta retries.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SpoolError {
    /// The folder is missing or not a folder, or the path is a folder (at start-up).
    #[error("spool {}: {message}", path.display())]
    Folder { path: PathBuf, message: String },
    /// The database could not be opened, created or written at start-up (permissions, a
    /// read-only file system, not a database, …).
    #[error("spool {}: cannot open: {message}", path.display())]
    Open { path: PathBuf, message: String },
    /// Another hubgate process runs on this spool.
    #[error("spool {} is in use by another hubgate process", path.display())]
    InUse { path: PathBuf },
    /// A database from an unknown version of hubgate.
    #[error("spool {}: schema version {found} is not supported (this hubgate reads version {supported})", path.display())]
    Schema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The accept did not finish within `accept_timeout`: not acknowledged (it may still be
    /// stored; Meta's retry is then a duplicate).
    #[error("spool: the accept took longer than {0:?}")]
    Timeout(Duration),
    /// The database cannot be reached or written now (down, failing over, read-only, out of
    /// connections): nothing was stored; the gate answers 503 and Meta retries.
    #[error("spool {location}: unavailable: {message}")]
    Unavailable { location: String, message: String },
    /// Invalid settings.
    #[error("spool {}: {message}", path.display())]
    Settings { path: PathBuf, message: String },
    /// The disk is full (SQLITE_FULL / ENOSPC), or `max_size_bytes` is reached: nothing was
    /// stored. The gate answers 503.
    #[error("spool {}: disk full (or spool size limit reached)", path.display())]
    Full { path: PathBuf },
    /// Any other storage failure: nothing was stored.
    #[error("spool {}: {message}", path.display())]
    Storage { path: PathBuf, message: String },
    /// The event cannot be stored as given (a header that cannot be encoded).
    #[error("event cannot be stored: {0}")]
    InvalidEvent(String),
    /// The spool was closed (or its writer thread is gone).
    #[error("spool is closed")]
    Closed,
    /// No event with this id.
    #[error("no event {0} in the spool")]
    NotFound(i64),
    /// Replay of an event that is not dead.
    #[error("event {id} is {state}, not dead")]
    NotDead { id: i64, state: EventState },
}

impl SpoolError {
    /// A full disk or spool: distinct, so the gate can say so (503, reason `spool_full`).
    pub fn is_full(&self) -> bool {
        matches!(self, SpoolError::Full { .. })
    }

    /// The store is out of reach or too slow now (503, reason `spool_unavailable`).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            SpoolError::Unavailable { .. } | SpoolError::Timeout(_)
        )
    }
}

/// Counters since the spool was opened (this process). Events per commit = `accepted /
/// commits` under load; `commit_nanos / commits` is the average commit (≈ fsync) time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Events stored.
    pub accepted: u64,
    /// Events answered as duplicates.
    pub duplicates: u64,
    /// Accepts refused because the disk or spool was full.
    pub refused_full: u64,
    /// Accepts refused for another storage error.
    pub refused_error: u64,
    /// Events delivered (2xx).
    pub delivered: u64,
    /// Failed attempts rescheduled.
    pub retried: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
    /// Durable commits (batches with an accept) that wrote something: one WAL fsync each.
    pub commits: u64,
    /// Time spent in those commits, in nanoseconds.
    pub commit_nanos: u64,
    /// Jobs (accepts, claims, outcomes) run by the writer.
    pub jobs: u64,
    /// Batches that failed (nothing in them was stored).
    pub failed_commits: u64,
}

#[derive(Default)]
pub(crate) struct Stats {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    refused_full: AtomicU64,
    refused_error: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    commits: AtomicU64,
    commit_nanos: AtomicU64,
    jobs: AtomicU64,
    failed_commits: AtomicU64,
}

/// What the store and the handles share.
#[derive(Default)]
pub(crate) struct Shared {
    stats: Stats,
    /// Wakes the delivery scheduler (new events, replays).
    notify: Arc<Notify>,
}

struct Inner {
    settings: Arc<SpoolSettings>,
    store: Box<dyn Store>,
    shared: Arc<Shared>,
}

/// The spool: cheap to clone (an `Arc` inside); all clones share one store. Dropping the last
/// clone (or [`close`](Spool::close)) closes the store.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("location", &self.inner.store.location())
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens the spool at `settings.path`, creating it if need be, and starts its writer
    /// thread. Fails, naming the path, when the folder is missing, the file cannot be written,
    /// or another process runs a gate on it. Events left `in_flight` by a previous process are
    /// pending again. Blocking (file I/O): call it at start-up.
    /// SQLite only (see [`Spool::connect`] for both engines).
    pub fn open(settings: SpoolSettings) -> Result<Spool, SpoolError> {
        settings.validate()?;
        if settings.backend != Backend::Sqlite {
            return Err(SpoolError::Settings {
                path: settings.path.clone(),
                message: "Spool::open opens SQLite spools; use Spool::connect".to_owned(),
            });
        }
        let settings = Arc::new(settings);
        let shared = Arc::new(Shared::default());
        let store = sqlite::SqliteStore::open(settings.clone(), shared.clone())?;
        Ok(Spool::with_store(settings, Box::new(store), shared))
    }

    /// Opens the spool on either engine: SQLite as [`Spool::open`] does (on a blocking
    /// thread); PostgreSQL by connecting, applying the schema migrations this hubgate knows
    /// (refusing a newer schema), and listening for new events of other gates.
    pub async fn connect(settings: SpoolSettings) -> Result<Spool, SpoolError> {
        settings.validate()?;
        match &settings.backend {
            Backend::Sqlite => tokio::task::spawn_blocking(move || Spool::open(settings))
                .await
                .map_err(|_| SpoolError::Closed)?,
            Backend::Postgres(_) => {
                let settings = Arc::new(settings);
                let shared = Arc::new(Shared::default());
                let store =
                    postgres::PgStore::connect(settings.clone(), shared.clone(), true).await?;
                Ok(Spool::with_store(settings, Box::new(store), shared))
            }
        }
    }

    fn with_store(
        settings: Arc<SpoolSettings>,
        store: Box<dyn Store>,
        shared: Arc<Shared>,
    ) -> Spool {
        Spool {
            inner: Arc::new(Inner {
                settings,
                store,
                shared,
            }),
        }
    }

    /// Whether a sync route's delivery with this key was remembered within `window` (the
    /// shared sync de-duplication, `[dedupe] store = "postgres"`).
    pub async fn recently_delivered(
        &self,
        key: [u8; 32],
        window: Duration,
    ) -> Result<bool, SpoolError> {
        self.inner.store.recent(key, window).await
    }

    /// Remembers a sync route's delivery (see [`Spool::recently_delivered`]).
    pub async fn remember_delivery(&self, key: [u8; 32]) -> Result<(), SpoolError> {
        self.inner.store.remember(key).await
    }

    /// Whether the store answers: `/readyz` fails only after it has not for a grace period.
    pub async fn ready(&self) -> Result<(), SpoolError> {
        self.inner.store.ready().await
    }

    /// The settings it was opened with.
    pub fn settings(&self) -> &SpoolSettings {
        &self.inner.settings
    }

    /// Where the events are kept, for messages.
    pub fn location(&self) -> String {
        self.inner.store.location()
    }

    /// Stores an authenticated event — or recognises it as a duplicate — and returns once the
    /// commit holding it is durable. Only then may the gate answer 200. Any error means it was
    /// not acknowledged: answer 503 ([`SpoolError::is_full`] tells a full disk apart). Bounded
    /// by `accept_timeout`. Dropping the future does not cancel a write already queued.
    pub async fn accept(&self, event: NewEvent) -> Result<Accepted, SpoolError> {
        let mut answers = self.accept_all(vec![event]).await?;
        Ok(answers.pop().expect("one answer per event"))
    }

    /// Stores several events at once — the parts of one batch — all or none, in one commit;
    /// each is stored or recognised as a duplicate, in order.
    pub async fn accept_all(&self, events: Vec<NewEvent>) -> Result<Vec<Accepted>, SpoolError> {
        let limit = self.inner.settings.accept_timeout;
        let result = match tokio::time::timeout(limit, self.inner.store.accept_all(events)).await {
            Ok(r) => r,
            Err(_) => Err(SpoolError::Timeout(limit)),
        };
        let stats = &self.inner.shared.stats;
        match &result {
            Err(SpoolError::Full { .. }) => {
                stats.refused_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.refused_error.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
        }
        result
    }

    /// Starts delivering: one scheduler task for all routes (call once). It stops when
    /// `shutdown` turns true (or its sender is dropped): running deliveries get
    /// `shutdown_grace` to finish, the rest are left pending. Await the handle, then
    /// [`close`](Spool::close).
    pub fn start_delivery(
        &self,
        deliver: Arc<dyn Deliver>,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(deliver::run(self.clone(), deliver, shutdown))
    }

    /// Finishes the current commit and closes the store (and the SQLite lock). Later calls on
    /// any clone fail with [`SpoolError::Closed`]. Idempotent.
    pub async fn close(&self) {
        self.inner.store.close().await;
    }

    /// The counters.
    pub fn stats(&self) -> SpoolStats {
        let s = &self.inner.shared.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpoolStats {
            accepted: l(&s.accepted),
            duplicates: l(&s.duplicates),
            refused_full: l(&s.refused_full),
            refused_error: l(&s.refused_error),
            delivered: l(&s.delivered),
            retried: l(&s.retried),
            dead_lettered: l(&s.dead_lettered),
            commits: l(&s.commits),
            commit_nanos: l(&s.commit_nanos),
            jobs: l(&s.jobs),
            failed_commits: l(&s.failed_commits),
        }
    }

    /// [`Operations::summary`] on this spool.
    pub async fn summary(&self) -> Result<Summary, SpoolError> {
        self.inner.store.summary().await
    }

    /// [`Operations::list`] on this spool.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<EventInfo>, SpoolError> {
        self.inner.store.list(filter).await
    }

    /// [`Operations::show`] on this spool.
    pub async fn show(&self, id: i64) -> Result<EventDetail, SpoolError> {
        self.inner.store.show(id).await
    }

    /// [`Operations::replay`] on this spool; wakes the scheduler.
    pub async fn replay(&self, target: ReplayTarget) -> Result<u64, SpoolError> {
        let n = self.inner.store.replay(target).await?;
        if n > 0 {
            self.inner.shared.notify.notify_one();
        }
        Ok(n)
    }

    /// [`Operations::purge_dead`] on this spool.
    pub async fn purge_dead(
        &self,
        older_than: Duration,
        route: Option<String>,
    ) -> Result<u64, SpoolError> {
        self.inner.store.purge_dead(older_than, route).await
    }
}

/// The operations API on either engine, without serving: what `hubgate spool …` uses. Safe
/// while gates run on the same spool.
pub async fn operations(settings: SpoolSettings) -> Result<Box<dyn Operations>, SpoolError> {
    match settings.backend {
        Backend::Sqlite => {
            let ops = sqlite::SqliteOps::new(settings.path.clone());
            // Fail here, naming the path, when there is no spool.
            ops.summary().await?;
            Ok(Box::new(ops))
        }
        Backend::Postgres(_) => {
            let store =
                postgres::PgStore::connect(Arc::new(settings), Arc::default(), false).await?;
            Ok(Box::new(store))
        }
    }
}

/// Applies the PostgreSQL schema migrations this hubgate knows, for roles that may not create
/// tables while serving (`hubgate spool migrate`). Returns the versions before and after.
pub async fn migrate(settings: &SpoolSettings) -> Result<(i64, i64), SpoolError> {
    postgres::migrate(settings).await
}

#[cfg(test)]
mod tests;
