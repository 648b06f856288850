//! The SQLite store: one file per gate (a lock refuses a second gate), written by one thread with
//! group commit, `synchronous=FULL` for every commit that holds an accept.
//!
//! - `sql`: the schema and every statement, and [`SpoolOps`], the blocking operations API;
//! - `writer`: the writer thread and its group commit.
//!
//! # Why SQLite (rusqlite, `bundled`)
//!
//! - **Crash consistency** is SQLite's, which is tested to the point of simulated power loss:
//!   in WAL mode with `synchronous=FULL` a commit returns only after the WAL is fsynced, and
//!   recovery after a crash replays exactly the committed transactions. A hand-rolled log would
//!   have to get torn writes, checksums and directory fsyncs right itself.
//! - **Tooling**: the spool is one file that the stock `sqlite3` CLI can read and query, also
//!   while the gate runs (WAL lets a second process in), and `hubgate spool …` is just another
//!   connection.
//! - **Build cost**: `bundled` compiles SQLite's C amalgamation once (about 30 s in a debug
//!   build here) and needs no system library; no server to run.
//!
//! Claims do not expire here: an event left `in_flight` by a process that died is made pending
//! again when the next gate opens the file.

pub(crate) mod sql;
mod writer;

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::info;

pub use sql::SpoolOps;
use writer::Msg;

use super::store::{
    plan, BoxFuture, Claimed, Disposition, EventDetail, EventInfo, ListFilter, Operations, Plan,
    ReplayTarget, Store, Summary,
};
use super::{Accepted, DeliveryOutcome, NewEvent, Shared, SpoolError, SpoolSettings};

/// The SQLite store of one gate.
pub(crate) struct SqliteStore {
    settings: Arc<SpoolSettings>,
    tx: Sender<Msg>,
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
            "spool opened"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        writer::spawn(opened, settings.clone(), shared, rx).map_err(|e| SpoolError::Open {
            path: settings.path.clone(),
            message: format!("cannot start the writer thread: {e}"),
        })?;
        let ops = SqliteOps(settings.path.clone());
        Ok(SqliteStore { settings, tx, ops })
    }
}

impl Store for SqliteStore {
    fn accept(&self, event: NewEvent) -> BoxFuture<'_, Result<Accepted, SpoolError>> {
        Box::pin(async move {
            let prepared = sql::Prepared::new(event)?;
            let weight = prepared.body.len();
            let size = (prepared.body.len() + prepared.headers.len()) as u64;
            writer::call(&self.tx, weight, true, move |ctx, conn| {
                let window = super::store::duration_ms(ctx.settings.dedupe_window);
                let dedupe = window > 0;
                if dedupe {
                    if let Some(at) = sql::dedupe_lookup(conn, &prepared.key)? {
                        if ctx.now.saturating_sub(at) < window {
                            ctx.delta.duplicates += 1;
                            return Ok(Ok(Accepted::Duplicate));
                        }
                    }
                }
                // The size cap refuses this event only; the rest of the batch commits.
                if let Some(max) = ctx.settings.max_size_bytes {
                    if sql::used_bytes(conn)? + size > max {
                        return Ok(Err(SpoolError::Full {
                            path: ctx.settings.path.clone(),
                        }));
                    }
                }
                let id = sql::insert_event(conn, &prepared, ctx.now, dedupe)?;
                if !ctx.routes.contains(&prepared.route) {
                    ctx.routes.insert(prepared.route.clone());
                }
                ctx.stored = true;
                ctx.delta.accepted += 1;
                Ok(Ok(Accepted::Stored(id)))
            })
            .await
            .and_then(|accepted| accepted)
        })
    }

    fn claim(&self, busy: HashMap<String, usize>) -> BoxFuture<'_, Result<Claimed, SpoolError>> {
        Box::pin(writer::call(&self.tx, 0, false, move |ctx, conn| {
            let max = ctx.settings.max_concurrency_per_route.max(1);
            let mut events = Vec::new();
            let mut next_due: Option<i64> = None;
            for route in &ctx.routes {
                let running = busy.get(route).copied().unwrap_or(0);
                if running >= max {
                    continue;
                }
                let room = max - running;
                let got = sql::claim(conn, route, room, ctx.now)?;
                if got.len() < room {
                    if let Some(due) = sql::next_due(conn, route)? {
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    }
                }
                events.extend(got);
            }
            Ok(Claimed { events, next_due })
        }))
    }

    fn complete(
        &self,
        id: i64,
        outcome: DeliveryOutcome,
    ) -> BoxFuture<'_, Result<Disposition, SpoolError>> {
        Box::pin(writer::call(&self.tx, 0, false, move |ctx, conn| {
            let now = ctx.now;
            if outcome == DeliveryOutcome::Done {
                // The common case, in one statement.
                if !sql::delete_in_flight(conn, id)? {
                    return Ok(Disposition::Stale);
                }
                ctx.delta.delivered += 1;
                return Ok(Disposition::Delivered);
            }
            let Some((attempts, since)) = sql::in_flight(conn, id)? else {
                return Ok(Disposition::Stale);
            };
            let random = ctx.random();
            match plan(&ctx.settings, outcome, attempts, since, now, random) {
                Plan::Dead(why) => {
                    sql::mark_dead(conn, id, &why, now)?;
                    ctx.delta.dead_lettered += 1;
                    Ok(Disposition::Dead(why))
                }
                Plan::Retry { at, error } => {
                    sql::reschedule(conn, id, at, &error, now)?;
                    ctx.delta.retried += 1;
                    Ok(Disposition::RetryAt(at))
                }
            }
        }))
    }

    fn release(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<usize, SpoolError>> {
        Box::pin(writer::call(&self.tx, 0, false, move |ctx, conn| {
            let mut n = 0;
            for id in ids {
                if sql::release(conn, id, ctx.now)? {
                    n += 1;
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
    fn summary(&self) -> BoxFuture<'_, Result<Summary, SpoolError>> {
        self.ops.summary()
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

/// `SpoolOps` as the async [`Operations`] of `hubgate spool …` on a SQLite spool.
pub(crate) struct SqliteOps(pub(crate) std::path::PathBuf);

impl SqliteOps {
    async fn with<T, F>(&self, f: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&SpoolOps) -> Result<T, SpoolError> + Send + 'static,
    {
        let path = self.0.clone();
        tokio::task::spawn_blocking(move || f(&SpoolOps::open(&path)?))
            .await
            .map_err(|_| SpoolError::Closed)?
    }
}

impl Operations for SqliteOps {
    fn summary(&self) -> BoxFuture<'_, Result<Summary, SpoolError>> {
        Box::pin(self.with(|o| o.summary()))
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
