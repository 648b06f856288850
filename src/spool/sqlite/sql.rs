//! The on-disk format and every SQL statement: the schema, how connections are opened and
//! configured (WAL, `synchronous=FULL`, the single-gate lock), the header codec, the
//! de-duplication key, and [`SpoolOps`], the operations API behind `hubgate spool …`.
//!
//! # Schema (`PRAGMA user_version = 4`; older files are migrated on open)
//!
//! ```sql
//! CREATE TABLE events (
//!     id              INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, also after purges
//!     route           TEXT    NOT NULL,                  -- the route's path
//!     state           TEXT    NOT NULL,                  -- 'pending' | 'in_flight' | 'dead'
//!     received_ms     INTEGER NOT NULL,                  -- when the gate received it (Unix ms)
//!     stored_ms       INTEGER NOT NULL,                  -- when it was committed
//!     retry_since_ms  INTEGER NOT NULL,                  -- the retry horizon counts from here
//!     next_attempt_ms INTEGER NOT NULL,                  -- due time while pending
//!     attempts        INTEGER NOT NULL,                  -- delivery attempts finished
//!     updated_ms      INTEGER NOT NULL,                  -- last state change
//!     last_error      TEXT,                              -- why the last attempt failed
//!     client_identity TEXT,                              -- the verified client, if any
//!     query           TEXT,                              -- the request's query string, if any
//!     headers         BLOB    NOT NULL,                  -- "name: value\n" lines, to forward
//!     body            BLOB    NOT NULL                   -- the raw, verified body
//! );
//! CREATE INDEX events_due ON events (route, next_attempt_ms, id) WHERE state = 'pending';
//! CREATE INDEX events_dead ON events (updated_ms) WHERE state = 'dead';
//! CREATE TABLE key_runs (                                 -- de-duplication keys (`keys`)
//!     id        INTEGER PRIMARY KEY AUTOINCREMENT,         -- never reused: merges name theirs
//!     level     INTEGER NOT NULL,                        -- merges it took to make
//!     keys      INTEGER NOT NULL,
//!     oldest_ms INTEGER NOT NULL,                        -- when its keys were accepted
//!     newest_ms INTEGER NOT NULL,
//!     records   BLOB    NOT NULL                         -- (SHA-256 of (route, body), accepted
//! );                                                     --  ms, event id) sorted by key
//! CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
//! CREATE TABLE in_flight (id INTEGER PRIMARY KEY);          -- claimed pending events
//! ```
//!
//! An event is in flight in one of two ways, and readers see both as `in_flight` (`effective
//! state`, below):
//! - **claimed at birth**: an event accepted while its route had delivery room and nothing
//!   older waiting is inserted with `state = 'in_flight'` and handed to delivery from memory
//!   (no claim, no read back). Such a row is never in the `events_due` index: while it is
//!   delivered normally, its whole life is one insert and one delete.
//! - **claimed from the queue** (retries, events that waited for room, events of a previous
//!   process): the row keeps `state = 'pending'` and its id goes into `in_flight`, a few bytes
//!   instead of rewriting the row (body included).
//!
//! Either way the attempt is added to `attempts` when its outcome is recorded, or, after a
//! crash, when the next gate opens the file and makes every in-flight event pending again.
//! Version 1 (before the `in_flight` table) counted the attempt at the claim; version 2 had
//! one index over every row's state; version 3 kept the keys in a B-tree (`dedupe`); all are
//! migrated on open.
//!
//! A delivered event's row is deleted (its key stays for the window). Everything is
//! readable with the `sqlite3` command-line tool, also while the gate runs, e.g.
//! `sqlite3 spool.db "SELECT route, state, count(*) FROM events GROUP BY 1, 2"`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::spool::store::{
    decode_headers, duration_ms, encode_headers, from_unix_ms, now_ms, unix_ms, EventDetail,
    EventInfo, EventState, ListFilter, ReplayTarget, Summary,
};
use crate::spool::{SpoolError, SpoolSettings, StoredEvent};

use super::intake::Intake;
use super::keys::KeyRuns;

/// The schema version this code reads and writes (`PRAGMA user_version`).
pub(crate) const SCHEMA_VERSION: i64 = 4;

/// An event's state as readers see it: pending events being delivered are `in_flight`.
const EFFECTIVE_STATE: &str = "CASE WHEN state = 'pending' AND id IN (SELECT id FROM in_flight) \
     THEN 'in_flight' ELSE state END";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    route           TEXT    NOT NULL,
    state           TEXT    NOT NULL
                    CHECK (state = 'pending' OR state = 'in_flight' OR state = 'dead'),
    received_ms     INTEGER NOT NULL,
    stored_ms       INTEGER NOT NULL,
    retry_since_ms  INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    updated_ms      INTEGER NOT NULL,
    last_error      TEXT,
    client_identity TEXT,
    query           TEXT,
    headers         BLOB    NOT NULL,
    body            BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_due ON events (route, next_attempt_ms, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS events_dead ON events (updated_ms) WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS key_runs (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    level     INTEGER NOT NULL,
    keys      INTEGER NOT NULL,
    oldest_ms INTEGER NOT NULL,
    newest_ms INTEGER NOT NULL,
    records   BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS in_flight (id INTEGER PRIMARY KEY);
";

/// Versions 1 and 2 checked `state` with an `IN` list of three: SQLite evaluates that with a
/// temporary B-tree built and dropped for every insert (a tenth of an accept's instructions).
const OLD_STATE_CHECK: &str = "CHECK (state IN ('pending', 'in_flight', 'dead'))";
/// The same constraint, as comparisons.
const STATE_CHECK: &str = "CHECK (state = 'pending' OR state = 'in_flight' OR state = 'dead')";

/// Turns an older file's schema into this version's, inside the caller's write transaction
/// ([`SCHEMA`] then adds what is missing): version 2's index over every row's state gives way
/// to the partial ones, and the state check is rewritten as comparisons. The check changes no
/// stored byte, so it is rewritten in place the way SQLite documents for constraint changes
/// (`writable_schema`, then a new `schema_version`), not by copying the table.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DROP INDEX IF EXISTS events_queue;")?;
    let table: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if table.is_some_and(|sql| sql.contains(OLD_STATE_CHECK)) {
        let version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA writable_schema = ON")?;
        conn.execute(
            "UPDATE sqlite_schema SET sql = replace(sql, ?1, ?2)
             WHERE type = 'table' AND name = 'events'",
            params![OLD_STATE_CHECK, STATE_CHECK],
        )?;
        conn.execute_batch(&format!(
            "PRAGMA schema_version = {}; PRAGMA writable_schema = OFF;",
            version + 1
        ))?;
    }
    Ok(())
}

/// Version 3's keys (a B-tree, `dedupe`) become runs, in key order a chunk at a time, and the
/// table goes; inside the caller's write transaction, after [`SCHEMA`].
fn migrate_dedupe(conn: &Connection) -> rusqlite::Result<()> {
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'dedupe'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(());
    }
    const CHUNK: usize = 1 << 20;
    let mut stmt = conn.prepare("SELECT key, accepted_ms, event_id FROM dedupe ORDER BY key")?;
    let mut rows = stmt.query([])?;
    let mut entries = Vec::new();
    loop {
        let row = rows.next()?;
        let end = row.is_none();
        if let Some(r) = row {
            if let Ok(key) = <[u8; 32]>::try_from(r.get_ref(0)?.as_blob()?) {
                entries.push((key, r.get(1)?, r.get(2)?));
            }
        }
        if entries.len() >= CHUNK || end {
            KeyRuns::write(conn, &mut entries)?;
            entries.clear();
        }
        if end {
            break;
        }
    }
    drop(rows);
    drop(stmt);
    conn.execute_batch("DROP TABLE dedupe;")
}

/// How long a connection waits for another one's write lock (the CLI's, or the gate's).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows deleted per transaction by purges, so a writer never waits long.
pub(crate) const DELETE_CHUNK: i64 = 2000;

// ---------------------------------------------------------------------------------------------
// Errors

/// SQLITE_FULL: the disk (or `max_size_bytes`) is full. SQLite reports ENOSPC on a write as
/// SQLITE_FULL.
pub(crate) fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// A storage error, with SQLITE_FULL as its own variant.
pub(crate) fn storage_error(path: &Path, e: &rusqlite::Error) -> SpoolError {
    if is_full(e) {
        SpoolError::Full {
            path: path.to_owned(),
        }
    } else {
        SpoolError::Storage {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

fn open_error(path: &Path, e: &rusqlite::Error) -> SpoolError {
    if is_full(e) {
        return SpoolError::Full {
            path: path.to_owned(),
        };
    }
    SpoolError::Open {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Opening

/// A file beside the database: `<path><suffix>` (the lock, SQLite's WAL, journal segments).
pub(crate) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The lock file next to the database: `<path>.lock`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    beside(path, ".lock")
}

/// The folder the database is in (`.` for a bare file name).
pub(crate) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The folder must exist and be a folder; the path must not be one.
pub(crate) fn check_folder(path: &Path) -> Result<(), SpoolError> {
    let folder = folder_of(path);
    let err = |message: String| SpoolError::Folder {
        path: path.to_owned(),
        message,
    };
    match std::fs::metadata(folder) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(err(format!("{} is not a folder", folder.display()))),
        Err(e) => return Err(err(format!("folder {}: {e}", folder.display()))),
    }
    if path.is_dir() {
        return Err(err("is a folder, not a file".to_owned()));
    }
    Ok(())
}

/// Creates `path` empty (a valid empty SQLite database) readable by its owner only, unless it
/// exists: bodies are people's messages. SQLite gives the `-wal` and `-shm` files the database
/// file's permissions.
fn create_private(path: &Path) -> Result<(), SpoolError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(SpoolError::Open {
            path: path.to_owned(),
            message: format!("cannot create the file: {e}"),
        }),
    }
}

/// Runs a statement that may return rows (most PRAGMAs do) and discards them.
fn pragma(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// Takes the single-gate lock: a tiny SQLite database in `locking_mode=EXCLUSIVE` whose first
/// write takes an exclusive lock held until the connection closes (or the process dies: the
/// kernel drops POSIX locks). A second gate on the same spool would deliver everything twice.
fn take_lock(path: &Path) -> Result<Connection, SpoolError> {
    let lock = lock_path(path);
    create_private(&lock)?;
    let conn = Connection::open(&lock).map_err(|e| open_error(&lock, &e))?;
    let in_use = |e: &rusqlite::Error| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => SpoolError::InUse {
            path: path.to_owned(),
        },
        _ => open_error(&lock, e),
    };
    conn.busy_timeout(Duration::ZERO).map_err(|e| in_use(&e))?;
    pragma(&conn, "PRAGMA locking_mode = EXCLUSIVE").map_err(|e| in_use(&e))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS holder (pid INTEGER NOT NULL, since_ms INTEGER NOT NULL);
         BEGIN EXCLUSIVE;
         DELETE FROM holder;",
    )
    .map_err(|e| in_use(&e))?;
    conn.execute(
        "INSERT INTO holder (pid, since_ms) VALUES (?1, ?2)",
        params![i64::from(std::process::id()), now_ms()],
    )
    .and_then(|_| conn.execute_batch("COMMIT"))
    .map_err(|e| in_use(&e))?;
    Ok(conn)
}

/// Sets up a connection to the spool database: WAL, `synchronous=FULL` (every commit fsyncs the
/// WAL before it returns), a busy timeout.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    pragma(conn, "PRAGMA synchronous = FULL")?;
    pragma(conn, "PRAGMA foreign_keys = OFF")?;
    // Plans never depend on bound values: without this, binding a `LIMIT ?` (claims, pruning)
    // marks the cached statement expired, and SQLite compiles it again on every use.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// What [`open_gate`] hands the writer thread.
pub(crate) struct Opened {
    pub conn: Connection,
    pub lock: Connection,
    /// Every route that has events, for the delivery scheduler.
    pub routes: Vec<String>,
    /// Events that were in flight when the last process stopped, now pending again.
    pub resumed: usize,
    pub pending: i64,
    /// The intake journal, emptied into the database.
    pub intake: Intake,
    /// The id the next event gets.
    pub next_id: i64,
    /// Events the journal held (now among `resumed`).
    pub recovered: usize,
    /// The de-duplication keys' runs.
    pub runs: KeyRuns,
}

/// Opens (creating if need be) the gate's spool: checks the folder, takes the lock, switches to
/// WAL, creates or checks the schema, proves the file writable with a committed write, and
/// turns `in_flight` rows left by a previous process back into `pending`.
pub(crate) fn open_gate(settings: &SpoolSettings) -> Result<Opened, SpoolError> {
    let path = settings.path.as_path();
    check_folder(path)?;
    let lock = take_lock(path)?;
    create_private(path)?;
    let oe = |e: rusqlite::Error| open_error(path, &e);
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(oe)?;
    configure(&conn).map_err(oe)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(oe)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SpoolError::Open {
            path: path.to_owned(),
            message: format!("could not switch to WAL journal mode (got {mode})"),
        });
    }
    // Keep the WAL file from staying huge after a burst of large bodies.
    pragma(&conn, "PRAGMA journal_size_limit = 67108864").map_err(oe)?;
    // No checkpoint by the writer: SQLite's automatic one runs inside the commit that crosses
    // the threshold, and every accept in that batch waited for the copy and the database's
    // fsync (the spool's p99). A thread of its own checkpoints instead (writer::checkpointer);
    // the WAL lives outside `max_size_bytes`.
    pragma(&conn, "PRAGMA wal_autocheckpoint = 0").map_err(oe)?;
    // `max_size_bytes` is enforced by the accept job alone (see `used_bytes`), not with
    // `max_page_count`: a cap on every write would also stop the delivery bookkeeping that
    // frees space, and a full spool could never drain.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(oe)?;
    if !(0..=SCHEMA_VERSION).contains(&version) {
        return Err(SpoolError::Schema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let now = now_ms();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(oe)?;
    migrate(&tx).map_err(oe)?;
    tx.execute_batch(SCHEMA).map_err(oe)?;
    migrate_dedupe(&tx).map_err(oe)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(oe)?;
    // The write that proves the file, its folder (for the WAL) and the disk writable.
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('opened_ms', ?1)",
        params![now],
    )
    .map_err(oe)?;
    // What the last process held in the intake journal: rows now (claimed at birth by a
    // process that died, so resumed just below), with every key.
    let journal = super::intake::segment_path(path, 0);
    let recovered = Intake::recover(path).map_err(|e| SpoolError::Open {
        path: journal.clone(),
        message: format!("cannot read the intake journal: {e}"),
    })?;
    for (id, stored_ms, event, claimed) in &recovered.events {
        let how = Insert::Recovered { claimed: *claimed };
        insert_event(&tx, event, *id, *stored_ms, how).map_err(oe)?;
    }
    let mut keys = recovered.keys.clone();
    KeyRuns::write(&tx, &mut keys).map_err(oe)?;
    let next_id = next_id(&tx, recovered.max_id + 1).map_err(oe)?;
    save_next_id(&tx, next_id).map_err(oe)?;
    // Deliveries the last process did not finish: their attempt counts, and they are due.
    let resumed = tx
        .execute(
            "UPDATE events SET attempts = attempts + 1, updated_ms = ?1
             WHERE id IN (SELECT id FROM in_flight)",
            params![now],
        )
        .map_err(oe)?;
    tx.execute("DELETE FROM in_flight", []).map_err(oe)?;
    // Events claimed at birth carry the mark in the row; so did version 1's claims, with the
    // attempt already counted.
    let uncounted = i64::from(version >= 3);
    let resumed = resumed
        + tx.execute(
            "UPDATE events SET state = 'pending', attempts = attempts + ?2, updated_ms = ?1
             WHERE state = 'in_flight'",
            params![now, uncounted],
        )
        .map_err(oe)?;
    let routes = {
        let mut stmt = tx
            .prepare("SELECT DISTINCT route FROM events ORDER BY route")
            .map_err(oe)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(oe)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(oe)?
    };
    let pending: i64 = tx
        .query_row(
            "SELECT count(*) FROM events WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )
        .map_err(oe)?;
    tx.commit().map_err(oe)?;
    let runs = KeyRuns::load(&conn).map_err(oe)?;
    // Only now that its events are rows is the journal emptied.
    let mut intake = Intake::open(path).map_err(|e| SpoolError::Open {
        path: journal.clone(),
        message: format!("cannot open the intake journal: {e}"),
    })?;
    intake.held_budget = settings.held_budget;
    if recovered.torn_bytes > 0 {
        tracing::warn!(
            bytes = recovered.torn_bytes,
            "spool: the intake journal ended in a record cut short by a crash (never acknowledged); dropped"
        );
    }
    Ok(Opened {
        conn,
        lock,
        routes,
        resumed,
        pending,
        intake,
        next_id,
        recovered: recovered.events.len(),
        runs,
    })
}

/// Another connection to an existing spool file, configured like the gate's.
fn open_existing(path: &Path) -> Result<Connection, SpoolError> {
    let oe = |e: rusqlite::Error| open_error(path, &e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(oe)?;
    configure(&conn).map_err(oe)?;
    Ok(conn)
}

/// A read-only connection to the gate's spool (the key merger's).
pub(crate) fn open_reader(path: &Path) -> Result<Connection, SpoolError> {
    let conn = open_existing(path)?;
    pragma(&conn, "PRAGMA query_only = ON").map_err(|e| open_error(path, &e))?;
    Ok(conn)
}

/// The checkpointer's own connection to the gate's spool (opened after [`open_gate`]).
pub(crate) fn open_checkpointer(path: &Path) -> Result<Connection, SpoolError> {
    let conn = open_existing(path)?;
    pragma(&conn, "PRAGMA wal_autocheckpoint = 0").map_err(|e| open_error(path, &e))?;
    Ok(conn)
}

/// Copies what the WAL holds into the database without waiting for (or blocking) the writer;
/// returns the WAL's frames and how many of them are now in the database.
pub(crate) fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

// ---------------------------------------------------------------------------------------------
// The writer's statements

/// An event ready to be written: validated, headers encoded, key computed.
pub(crate) struct Prepared {
    pub route: String,
    pub body: Bytes,
    /// The headers as given, for a delivery claimed at birth.
    pub headers: http::HeaderMap,
    /// The headers as stored.
    pub encoded_headers: Vec<u8>,
    pub query: Option<String>,
    pub client_identity: Option<String>,
    pub received_ms: i64,
    pub key: [u8; 32],
}

impl Prepared {
    /// Validates and encodes an event for the writer.
    pub(crate) fn new(event: crate::spool::NewEvent) -> Result<Prepared, SpoolError> {
        if event.route.is_empty() {
            return Err(SpoolError::InvalidEvent("empty route".to_owned()));
        }
        let encoded_headers = encode_headers(&event.headers);
        let key = crate::spool::store::event_key(&event);
        Ok(Prepared {
            route: event.route,
            body: event.body,
            headers: event.headers,
            encoded_headers,
            query: event.query,
            client_identity: event.client_identity,
            received_ms: unix_ms(event.received_at),
            key,
        })
    }

    /// The event as its first delivery attempt sees it, as `id`, leaving this one without its
    /// headers (their encoded form stays).
    pub(crate) fn take_stored(&mut self, id: i64) -> StoredEvent {
        StoredEvent {
            id,
            route: self.route.clone(),
            body: self.body.clone(),
            headers: std::mem::take(&mut self.headers),
            query: self.query.clone(),
            client_identity: self.client_identity.clone(),
            received_at: from_unix_ms(self.received_ms),
            attempt: 1,
        }
    }
}

/// Bytes the database holds in live pages (its size less the free list).
pub(crate) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
    let live = pragma("page_count")? - pragma("freelist_count")?;
    Ok(u64::try_from(live.max(0) * pragma("page_size")?).unwrap_or(0))
}

const INSERT_EVENT: &str = "INSERT INTO events (id, route, state, received_ms, stored_ms,
         retry_since_ms, next_attempt_ms, attempts, updated_ms, client_identity, query, headers,
         body)
     VALUES (?9, ?1, ?8, ?2, ?3, ?3, ?3, 0, ?3, ?4, ?5, ?6, ?7)";

/// [`INSERT_EVENT`] for recovery from the intake journal: a row already there stays as it is.
const INSERT_EVENT_IF_NEW: &str = "INSERT OR IGNORE INTO events (id, route, state, received_ms,
         stored_ms, retry_since_ms, next_attempt_ms, attempts, updated_ms, client_identity, query,
         headers, body)
     VALUES (?9, ?1, ?8, ?2, ?3, ?3, ?3, 0, ?3, ?4, ?5, ?6, ?7)";

/// How an event enters the database.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    /// Due now, in the queue.
    Pending,
    /// Claimed at birth.
    InFlight,
    /// Recovered from the intake journal, unless the row exists already: in flight (`claimed`:
    /// the open makes it pending with the rest, its attempt counted) or pending.
    Recovered { claimed: bool },
}

/// Inserts event `id` with `now` as its stored time (and due time).
pub(crate) fn insert_event(
    conn: &Connection,
    e: &Prepared,
    id: i64,
    now: i64,
    how: Insert,
) -> rusqlite::Result<()> {
    let sql = if matches!(how, Insert::Recovered { .. }) {
        INSERT_EVENT_IF_NEW
    } else {
        INSERT_EVENT
    };
    let pending = matches!(how, Insert::Pending | Insert::Recovered { claimed: false });
    conn.prepare_cached(sql)?.execute(params![
        e.route,
        e.received_ms,
        now,
        e.client_identity,
        e.query,
        e.encoded_headers,
        &e.body[..],
        if pending { "pending" } else { "in_flight" },
        id,
    ])?;
    Ok(())
}

/// Remembers the next event id (delivered events from the intake journal never become rows, so
/// the table's own sequence does not know them).
pub(crate) fn save_next_id(conn: &Connection, next: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_id', ?1)")?
        .execute(params![next])?;
    Ok(())
}

/// The id the next event gets: past every row, every id the sequence or `meta` remembers, and
/// `at_least`.
fn next_id(conn: &Connection, at_least: i64) -> rusqlite::Result<i64> {
    let max = |sql: &str| -> rusqlite::Result<i64> {
        Ok(conn
            .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten()
            .unwrap_or(0))
    };
    let rows = max("SELECT max(id) FROM events")?;
    let seq = max("SELECT seq FROM sqlite_sequence WHERE name = 'events'")?;
    let saved = max("SELECT value FROM meta WHERE key = 'next_id'")?;
    Ok((rows.max(seq) + 1).max(saved).max(at_least))
}

fn stored_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let headers: Vec<u8> = r.get(6)?;
    let body: Vec<u8> = r.get(7)?;
    Ok(StoredEvent {
        id: r.get(0)?,
        route: r.get(1)?,
        received_at: from_unix_ms(r.get(2)?),
        attempt: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
        client_identity: r.get(4)?,
        query: r.get(5)?,
        headers: decode_headers(&headers),
        body: Bytes::from(body),
    })
}

/// Marks up to `limit` due pending events of `route` in flight, oldest due first (then by id),
/// and returns them in that order with `attempt` already counting this attempt.
pub(crate) fn claim(
    conn: &Connection,
    route: &str,
    limit: usize,
    now: i64,
) -> rusqlite::Result<Vec<StoredEvent>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let claimed: Vec<StoredEvent> = conn
        .prepare_cached(
            "SELECT id, route, received_ms, attempts + 1, client_identity, query, headers, body
             FROM events
             WHERE state = 'pending' AND route = ?1 AND next_attempt_ms <= ?2
               AND id NOT IN (SELECT id FROM in_flight)
             ORDER BY next_attempt_ms, id LIMIT ?3",
        )?
        .query_map(params![route, now, limit], stored_event)?
        .collect::<Result<_, _>>()?;
    let mut mark = conn.prepare_cached("INSERT INTO in_flight (id) VALUES (?1)")?;
    for e in &claimed {
        mark.execute(params![e.id])?;
    }
    Ok(claimed)
}

/// The earliest due time of `route`'s pending events.
pub(crate) fn next_due(conn: &Connection, route: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT min(next_attempt_ms) FROM events
         WHERE state = 'pending' AND route = ?1 AND id NOT IN (SELECT id FROM in_flight)",
    )?
    .query_row(params![route], |r| r.get(0))
}

/// An in-flight event's attempts (this one included) and retry start; `None` if it is not in
/// flight any more.
pub(crate) fn in_flight(conn: &Connection, id: i64) -> rusqlite::Result<Option<(u32, i64)>> {
    conn.prepare_cached(
        "SELECT attempts + 1, retry_since_ms FROM events
         WHERE id = ?1 AND (state = 'in_flight' OR id IN (SELECT id FROM in_flight))",
    )?
    .query_row(params![id], |r| {
        Ok((
            u32::try_from(r.get::<_, i64>(0)?).unwrap_or(u32::MAX),
            r.get(1)?,
        ))
    })
    .optional()
}

/// Ends `id`'s delivery; `false` if it was not in flight.
fn end_flight(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached("DELETE FROM in_flight WHERE id = ?1")?
        .execute(params![id])?;
    Ok(n > 0)
}

/// Delivered: the row goes (its dedupe key stays). `false` if it was not in flight any more.
pub(crate) fn delete_in_flight(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    let born = conn
        .prepare_cached("DELETE FROM events WHERE id = ?1 AND state = 'in_flight'")?
        .execute(params![id])?;
    if born > 0 {
        return Ok(true);
    }
    if !end_flight(conn, id)? {
        return Ok(false);
    }
    conn.prepare_cached("DELETE FROM events WHERE id = ?1")?
        .execute(params![id])?;
    Ok(true)
}

/// Back to pending, due at `next`, with the failed attempt counted and recorded.
pub(crate) fn reschedule(
    conn: &Connection,
    id: i64,
    next: i64,
    error: &str,
    now: i64,
) -> rusqlite::Result<()> {
    end_flight(conn, id)?;
    conn.prepare_cached(
        "UPDATE events SET state = 'pending', attempts = attempts + 1, next_attempt_ms = ?2,
             last_error = ?3, updated_ms = ?4
         WHERE id = ?1",
    )?
    .execute(params![id, next, error, now])?;
    Ok(())
}

/// Dead-lettered, with the last attempt counted and the reason.
pub(crate) fn mark_dead(conn: &Connection, id: i64, error: &str, now: i64) -> rusqlite::Result<()> {
    end_flight(conn, id)?;
    conn.prepare_cached(
        "UPDATE events SET state = 'dead', attempts = attempts + 1, last_error = ?2,
             updated_ms = ?3
         WHERE id = ?1",
    )?
    .execute(params![id, error, now])?;
    Ok(())
}

/// An interrupted attempt (counted): back to pending, due now. Only touches events still in
/// flight, so an outcome recorded in the meantime wins.
pub(crate) fn release(conn: &Connection, id: i64, now: i64) -> rusqlite::Result<bool> {
    let queued = end_flight(conn, id)?;
    let n = conn
        .prepare_cached(
            "UPDATE events SET state = 'pending', attempts = attempts + 1, next_attempt_ms = ?2,
                 updated_ms = ?2
             WHERE id = ?1 AND (?3 OR state = 'in_flight')",
        )?
        .execute(params![id, now, queued])?;
    Ok(n > 0)
}

/// An event claimed at birth that no delivery took (the gate is closing): pending again, due
/// now, no attempt counted. `false` if it was not in flight that way.
pub(crate) fn unclaim_born(conn: &Connection, id: i64, now: i64) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE events SET state = 'pending', next_attempt_ms = ?2, updated_ms = ?2
             WHERE id = ?1 AND state = 'in_flight'",
        )?
        .execute(params![id, now])?;
    Ok(n > 0)
}

// ---------------------------------------------------------------------------------------------
// Operations API

fn state_of(s: &str) -> rusqlite::Result<EventState> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            Box::<dyn std::error::Error + Send + Sync>::from(e),
        )
    })
}

/// The operations API: a separate connection to an existing spool, safe to use while a gate
/// runs on it (WAL lets readers and one writer at a time work side by side; writes wait up to
/// 5 s for the gate's current commit). It never resets in-flight events and takes no lock, so
/// it does not disturb the running gate. Blocking: from async code, use it in
/// `spawn_blocking` (the [`Spool`](super::Spool) methods of the same names do).
#[derive(Debug)]
pub struct SpoolOps {
    conn: Connection,
    path: PathBuf,
}

/// The columns of [`event_info`]: the effective state, and the attempts with the one under way.
fn info_columns() -> String {
    format!(
        "id, route, {EFFECTIVE_STATE} AS state, \
         attempts + (id IN (SELECT id FROM in_flight)) AS attempts, received_ms, \
         next_attempt_ms, updated_ms, last_error, client_identity, length(body)"
    )
}

fn event_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventInfo> {
    Ok(EventInfo {
        id: r.get(0)?,
        route: r.get(1)?,
        state: state_of(&r.get::<_, String>(2)?)?,
        attempts: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
        received_at: from_unix_ms(r.get(4)?),
        next_attempt_at: from_unix_ms(r.get(5)?),
        updated_at: from_unix_ms(r.get(6)?),
        last_error: r.get(7)?,
        client_identity: r.get(8)?,
        body_len: u64::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
    })
}

impl SpoolOps {
    /// Opens an existing spool. A missing file is an error (naming the path): the gate creates
    /// the spool, the operations API never does.
    pub fn open(path: &Path) -> Result<SpoolOps, SpoolError> {
        if !path.is_file() {
            return Err(SpoolError::Open {
                path: path.to_owned(),
                message: "no spool there (the gate creates it on start)".to_owned(),
            });
        }
        let oe = |e: rusqlite::Error| open_error(path, &e);
        let conn = open_existing(path)?;
        let mut version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(oe)?;
        if (1..SCHEMA_VERSION).contains(&version) {
            // The same migration as a gate's on open.
            let tx = rusqlite::Transaction::new_unchecked(
                &conn,
                rusqlite::TransactionBehavior::Immediate,
            )
            .map_err(oe)?;
            migrate(&tx).map_err(oe)?;
            tx.execute_batch(SCHEMA).map_err(oe)?;
            migrate_dedupe(&tx).map_err(oe)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(oe)?;
            tx.commit().map_err(oe)?;
            version = SCHEMA_VERSION;
        }
        if version != SCHEMA_VERSION {
            return Err(SpoolError::Schema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(SpoolOps {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> SpoolError {
        storage_error(&self.path, &e)
    }

    /// Counts per route and state, and the age of the oldest events.
    pub fn summary(&self) -> Result<Summary, SpoolError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT route, {EFFECTIVE_STATE} AS st, count(*), min(received_ms) FROM events
                     GROUP BY route, st ORDER BY route"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    state_of(&r.get::<_, String>(1)?)?,
                    u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let counts = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let dedupe_keys: i64 = self
            .conn
            .query_row("SELECT coalesce(sum(keys), 0) FROM key_runs", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        Ok(Summary::from_counts(
            counts,
            u64::try_from(dedupe_keys).unwrap_or(0),
        ))
    }

    /// Events matching the filter, by ascending id, without headers and bodies.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<EventInfo>, SpoolError> {
        let sql = format!(
            "SELECT {} FROM events
             WHERE (?1 IS NULL OR route = ?1) AND (?2 IS NULL OR {EFFECTIVE_STATE} = ?2)
               AND id > ?3
             ORDER BY id LIMIT ?4",
            info_columns()
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![
                    filter.route,
                    filter.state.map(EventState::as_str),
                    filter.after_id.unwrap_or(0),
                    i64::try_from(filter.limit).unwrap_or(i64::MAX)
                ],
                event_info,
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// One event with its headers and body.
    pub fn show(&self, id: i64) -> Result<EventDetail, SpoolError> {
        let sql = format!(
            "SELECT {}, query, headers, body FROM events WHERE id = ?1",
            info_columns()
        );
        self.conn
            .query_row(&sql, params![id], |r| {
                let headers: Vec<u8> = r.get(11)?;
                let body: Vec<u8> = r.get(12)?;
                Ok(EventDetail {
                    info: event_info(r)?,
                    query: r.get(10)?,
                    headers: decode_headers(&headers),
                    body: Bytes::from(body),
                })
            })
            .optional()
            .map_err(|e| self.err(e))?
            .ok_or(SpoolError::NotFound(id))
    }

    /// Puts dead events back in the queue, due now, with a fresh retry horizon and attempt
    /// count. Returns how many. A running gate picks them up within its poll interval.
    pub fn replay(&self, target: &ReplayTarget) -> Result<u64, SpoolError> {
        let now = now_ms();
        // IMMEDIATE: take the write lock first (waiting for the gate's commit if need be), so
        // the read below cannot go stale before the write.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| self.err(e))?;
        let n = match target {
            ReplayTarget::One(id) => {
                let state: Option<String> = tx
                    .query_row("SELECT state FROM events WHERE id = ?1", params![id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(|e| self.err(e))?;
                match state.as_deref().map(state_of) {
                    None => return Err(SpoolError::NotFound(*id)),
                    Some(Ok(EventState::Dead)) => {}
                    Some(Ok(state)) => return Err(SpoolError::NotDead { id: *id, state }),
                    Some(Err(e)) => return Err(self.err(e)),
                }
                tx.execute(
                    "UPDATE events SET state = 'pending', attempts = 0, next_attempt_ms = ?2,
                         retry_since_ms = ?2, updated_ms = ?2
                     WHERE id = ?1 AND state = 'dead'",
                    params![id, now],
                )
                .map_err(|e| self.err(e))?
            }
            ReplayTarget::AllDead { route } => tx
                .execute(
                    "UPDATE events SET state = 'pending', attempts = 0, next_attempt_ms = ?2,
                         retry_since_ms = ?2, updated_ms = ?2
                     WHERE state = 'dead' AND (?1 IS NULL OR route = ?1)",
                    params![route, now],
                )
                .map_err(|e| self.err(e))?,
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// Deletes dead events that died more than `older_than` ago (of one route, or all), in
    /// short transactions. Returns how many.
    pub fn purge_dead(&self, older_than: Duration, route: Option<&str>) -> Result<u64, SpoolError> {
        let cutoff = now_ms().saturating_sub(duration_ms(older_than));
        let mut total = 0u64;
        loop {
            let n = self
                .conn
                .execute(
                    "DELETE FROM events WHERE id IN
                         (SELECT id FROM events
                          WHERE state = 'dead' AND updated_ms <= ?1 AND (?2 IS NULL OR route = ?2)
                          LIMIT ?3)",
                    params![cutoff, route, DELETE_CHUNK],
                )
                .map_err(|e| self.err(e))?;
            total += n as u64;
            if (n as i64) < DELETE_CHUNK {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::store::dedupe_key;

    /// Event `n`: body `[n]`, key `[n; 32]`, route `/w`.
    fn prepared(n: u8) -> Prepared {
        Prepared {
            route: "/w".to_owned(),
            body: Bytes::from(vec![n]),
            headers: http::HeaderMap::new(),
            encoded_headers: Vec::new(),
            query: None,
            client_identity: None,
            received_ms: 1,
            key: [n; 32],
        }
    }

    /// Inserts `prepared(n)` as event `n + 1`, claimed at birth or pending.
    fn insert(conn: &Connection, n: u8, born: bool) -> i64 {
        let id = i64::from(n) + 1;
        let how = if born {
            Insert::InFlight
        } else {
            Insert::Pending
        };
        insert_event(conn, &prepared(n), id, 100, how).unwrap();
        id
    }

    #[test]
    fn claim_takes_due_events_oldest_due_first_and_counts_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let opened = open_gate(&SpoolSettings::new(dir.path().join("spool.db"))).unwrap();
        let conn = &opened.conn;
        let mut ids = Vec::new();
        for n in 0..4u8 {
            ids.push(insert(conn, n, false));
        }
        // Due times: the last event first, then the first; the third is not due yet.
        for (id, due) in [(ids[0], 50), (ids[1], 60), (ids[2], 500), (ids[3], 10)] {
            conn.execute(
                "UPDATE events SET next_attempt_ms = ?2 WHERE id = ?1",
                params![id, due],
            )
            .unwrap();
        }
        let claimed = claim(conn, "/w", 10, 100).unwrap();
        let got: Vec<(i64, u32)> = claimed.iter().map(|e| (e.id, e.attempt)).collect();
        assert_eq!(got, vec![(ids[3], 1), (ids[0], 1), (ids[1], 1)]);
        assert_eq!(&claimed[0].body[..], &[3]);
        assert!(
            claim(conn, "/w", 10, 100).unwrap().is_empty(),
            "in flight now"
        );
        assert!(delete_in_flight(conn, ids[0]).unwrap());
        assert!(!delete_in_flight(conn, ids[0]).unwrap(), "already gone");
        assert!(
            !delete_in_flight(conn, ids[2]).unwrap(),
            "pending, not in flight"
        );
    }

    #[test]
    fn a_failed_attempt_is_counted_once_and_the_event_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let opened = open_gate(&SpoolSettings::new(dir.path().join("spool.db"))).unwrap();
        let conn = &opened.conn;
        let id = insert(conn, 7, false);
        assert_eq!(claim(conn, "/w", 10, 100).unwrap()[0].attempt, 1);
        assert_eq!(
            next_due(conn, "/w").unwrap(),
            None,
            "in flight: nothing due"
        );
        assert_eq!(in_flight(conn, id).unwrap().map(|(a, _)| a), Some(1));
        reschedule(conn, id, 150, "503", 100).unwrap();
        assert_eq!(in_flight(conn, id).unwrap(), None);
        assert_eq!(next_due(conn, "/w").unwrap(), Some(150));
        assert!(
            claim(conn, "/w", 10, 149).unwrap().is_empty(),
            "not due yet"
        );
        assert_eq!(claim(conn, "/w", 10, 150).unwrap()[0].attempt, 2);
        assert!(release(conn, id, 160).unwrap());
        assert!(!release(conn, id, 160).unwrap(), "released already");
        assert_eq!(claim(conn, "/w", 10, 160).unwrap()[0].attempt, 3);
    }

    #[test]
    fn an_event_claimed_at_birth_is_in_flight_until_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let opened = open_gate(&SpoolSettings::new(path.clone())).unwrap();
        let conn = &opened.conn;
        let delivered = insert(conn, 1, true);
        let released = insert(conn, 2, true);
        let untaken = insert(conn, 3, true);
        let crashed = insert(conn, 4, true);
        assert!(claim(conn, "/w", 10, 100).unwrap().is_empty(), "not queued");
        assert_eq!(next_due(conn, "/w").unwrap(), None);
        assert_eq!(in_flight(conn, delivered).unwrap().map(|(a, _)| a), Some(1));
        assert!(delete_in_flight(conn, delivered).unwrap());
        assert!(!delete_in_flight(conn, delivered).unwrap(), "gone");
        // Cut short by a shutdown: queued again, the attempt counted.
        assert!(release(conn, released, 110).unwrap());
        assert!(!release(conn, released, 110).unwrap(), "released already");
        // Never handed to a delivery: queued again, no attempt counted.
        assert!(unclaim_born(conn, untaken, 110).unwrap());
        assert!(!unclaim_born(conn, untaken, 110).unwrap());
        let queued: Vec<(i64, u32)> = claim(conn, "/w", 10, 110)
            .unwrap()
            .iter()
            .map(|e| (e.id, e.attempt))
            .collect();
        assert_eq!(queued, vec![(released, 2), (untaken, 1)]);
        // The process dies with `crashed` in flight: the next open counts its attempt.
        drop(opened);
        let opened = open_gate(&SpoolSettings::new(path)).unwrap();
        assert_eq!(opened.resumed, 3, "two queued claims and one birth");
        let attempts: i64 = opened
            .conn
            .query_row(
                "SELECT attempts FROM events WHERE id = ?1 AND state = 'pending'",
                params![crashed],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(attempts, 1);
    }

    #[test]
    fn opening_the_spool_turns_the_intake_journal_into_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let settings = SpoolSettings::new(path.clone());
        let opened = open_gate(&settings).unwrap();
        // Event 1 is already a row (an absorb committed, the journal was not emptied yet),
        // dead-lettered since: the journal's copy must not bring it back.
        insert(&opened.conn, 0, true);
        mark_dead(&opened.conn, 1, "410", 120).unwrap();
        drop(opened);
        let mut intake = Intake::open(&path).unwrap();
        let journal = super::super::intake::segment_path(&path, intake.segments().1);
        intake.begin();
        // 1: the absorbed one; 2: delivered (forgotten); 3: in flight; 4: waiting, then
        // claimed; 5: waiting.
        for (n, claimed) in [(0u8, true), (1, true), (2, true), (3, false), (4, false)] {
            intake.hold(i64::from(n) + 1, claimed, 200, prepared(n), true);
        }
        assert!(intake.forget(2).is_some());
        intake.claimed(4);
        intake.write(true).unwrap();
        drop(intake);
        // A crash tore the next record: half of it reached the disk.
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes.extend_from_slice(&[0x40, 0, 0, 0, 1, 2, 3]);
        std::fs::write(&journal, &bytes).unwrap();

        let opened = open_gate(&settings).unwrap();
        assert_eq!(opened.recovered, 4);
        assert_eq!(opened.resumed, 2, "the two that were in flight");
        let rows: Vec<(i64, String, i64)> = opened
            .conn
            .prepare("SELECT id, state, attempts FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let want = [
            (1, "dead", 1),
            (3, "pending", 1),
            (4, "pending", 1),
            (5, "pending", 0),
        ];
        let want: Vec<(i64, String, i64)> =
            want.iter().map(|&(i, s, a)| (i, s.to_owned(), a)).collect();
        assert_eq!(rows, want);
        let keys: i64 = opened
            .conn
            .query_row("SELECT sum(keys) FROM key_runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(keys, 5, "the delivered event's key too");
        assert_eq!(opened.next_id, 6);
        assert!(!journal.exists(), "deleted");
        // Ids are never reused, also those of events that never became rows.
        drop(opened);
        let opened = open_gate(&settings).unwrap();
        assert_eq!(opened.next_id, 6);
    }

    #[test]
    fn an_insert_builds_no_temporary_b_tree() {
        let dir = tempfile::tempdir().unwrap();
        let opened = open_gate(&SpoolSettings::new(dir.path().join("spool.db"))).unwrap();
        let ops: Vec<String> = opened
            .conn
            .prepare(&format!("EXPLAIN {INSERT_EVENT}"))
            .unwrap()
            .query_map([None::<i64>; 9], |r| r.get::<_, String>(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(ops.iter().any(|o| o == "Insert"), "{ops:?}");
        assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{ops:?}");
    }

    #[test]
    fn the_claim_walks_the_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        let opened = open_gate(&SpoolSettings::new(dir.path().join("spool.db"))).unwrap();
        let sql = "EXPLAIN QUERY PLAN SELECT id FROM events
             WHERE state = 'pending' AND route = ?1 AND next_attempt_ms <= ?2
               AND id NOT IN (SELECT id FROM in_flight)
             ORDER BY next_attempt_ms, id LIMIT ?3";
        let plan: Vec<String> = opened
            .conn
            .prepare(sql)
            .unwrap()
            .query_map(params!["/w", 1, 1], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("; ");
        assert!(plan.contains("INDEX events_due"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "sorted by the index: {plan}");
    }

    #[test]
    fn a_version_1_spool_is_migrated_and_its_deliveries_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        {
            // Version 1: no in_flight table, the mark in the row (attempt already counted).
            let conn = Connection::open(&path).unwrap();
            let v1 = SCHEMA
                .replace(
                    "CREATE TABLE IF NOT EXISTS in_flight (id INTEGER PRIMARY KEY);",
                    "CREATE INDEX events_queue ON events (state, route, next_attempt_ms, id);",
                )
                .replace(STATE_CHECK, OLD_STATE_CHECK);
            assert!(v1.contains(OLD_STATE_CHECK));
            conn.execute_batch(&v1).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO events (route, state, received_ms, stored_ms, retry_since_ms,
                     next_attempt_ms, attempts, updated_ms, headers, body)
                 VALUES ('/w', 'in_flight', 1, 1, 1, 1, 1, 1, x'', x'41');",
            )
            .unwrap();
        }
        let opened = open_gate(&SpoolSettings::new(path.clone())).unwrap();
        assert_eq!(opened.resumed, 1);
        let version: i64 = opened
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let old_index: i64 = opened
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'events_queue'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_index, 0, "version 2's index is gone");
        let table: String = opened
            .conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(table.contains(STATE_CHECK), "{table}");
        // Still a check.
        let bad = opened.conn.execute(
            "INSERT INTO events (route, state, received_ms, stored_ms, retry_since_ms,
                 next_attempt_ms, updated_ms, headers, body)
             VALUES ('/w', 'lost', 1, 1, 1, 1, 1, x'', x'')",
            [],
        );
        assert!(bad.is_err(), "{bad:?}");
        let claimed = claim(&opened.conn, "/w", 10, now_ms()).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempt, 2, "the interrupted attempt was counted");
        assert_eq!(&claimed[0].body[..], b"A");
    }

    #[test]
    fn headers_round_trip() {
        let mut h = http::HeaderMap::new();
        let mut add = |n: &'static str, v: &[u8]| {
            h.append(n, http::HeaderValue::from_bytes(v).unwrap());
        };
        add("content-type", b"application/json");
        add("x-hub-signature-256", b"sha256=abcd");
        add("x-empty", b"");
        add("x-spaced", b"  two leading: and a colon");
        add("x-latin1", &[0xe9, b'a', 0xff]);
        add("x-twice", b"1");
        add("x-twice", b"2");
        let enc = encode_headers(&h);
        let back = decode_headers(&enc);
        assert_eq!(back, h);
        let order = |m: &http::HeaderMap| {
            m.iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&back), order(&h), "order kept, repeats included");
    }

    #[test]
    fn headers_that_cannot_be_stored_cannot_be_made() {
        // The stored form relies on these: a value with CR, LF or NUL, or a name with a colon,
        // whitespace or nothing, would break its line. `http`'s types refuse them, so no
        // NewEvent can carry one.
        for v in [&b"x\r\ny: z"[..], b"x\ny", b"x\0"] {
            assert!(http::HeaderValue::from_bytes(v).is_err(), "{v:?}");
        }
        assert!(http::HeaderValue::from_bytes(b"x\ty").is_ok());
        for n in ["", "a:b", "a b", "a\n"] {
            assert!(http::HeaderName::from_bytes(n.as_bytes()).is_err(), "{n:?}");
        }
    }

    #[test]
    fn unreadable_header_lines_are_left_out() {
        let back = decode_headers(b"content-type: a\nnot a name: x\nx-ok: \x01\nx-b: b\n");
        let names: Vec<&str> = back.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-b"]);
    }

    #[test]
    fn dedupe_key_separates_route_and_body() {
        assert_ne!(dedupe_key("/a", b"bc"), dedupe_key("/ab", b"c"));
        assert_eq!(dedupe_key("/a", b"x"), dedupe_key("/a", b"x"));
        assert_ne!(dedupe_key("/a", b"x"), dedupe_key("/b", b"x"));
    }

    #[test]
    fn states_parse() {
        for s in [EventState::Pending, EventState::InFlight, EventState::Dead] {
            assert_eq!(s.as_str().parse::<EventState>().unwrap(), s);
        }
        assert!("done".parse::<EventState>().is_err());
    }
}
