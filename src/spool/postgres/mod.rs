//! The PostgreSQL store: one database shared by every gate — one queue, one de-duplication
//! table, fleet-wide delivery limits.
//!
//! - **Accepts** are written by one task per gate, every accept that arrived while the previous
//!   one ran in one statement (so one transaction, one WAL flush: group commit; `intake`): the
//!   de-duplication keys are inserted (`ON CONFLICT` refreshes one only when it is older than
//!   the window), the events only where the key was new. This gate's scheduler is woken
//!   in-process; the other gates through `NOTIFY`, sent outside the accept (a `NOTIFY` in the
//!   accept's transaction holds a database-wide lock through its commit, which serialised
//!   every accept: 1 commit per WAL flush, 0.1× sync in bench/results/spool-pg-2026-12-01.md),
//!   at most every 50 ms. An accept is answered after the COMMIT, which with
//!   `synchronous_commit = on` (checked at connect) is after the WAL flush — and, with
//!   synchronous standbys configured, after they have it too. Two gates accepting the same
//!   body at once: the second waits on the first's key and sees a duplicate.
//! - **Claims** take a lease (`lease_owner`, `lease_until_ms` on the database's clock) with
//!   `FOR UPDATE SKIP LOCKED`, under a per-route advisory lock that makes
//!   `max_concurrency` a fleet-wide limit. A lease that expires (its gate died or lost the
//!   database) makes the event claimable by any gate: at least once, never lost. Running
//!   deliveries renew their leases. A claim's commit does not wait for its WAL flush: a
//!   database crash that loses it makes the event due again (delivered again: at least once).
//! - **Outcomes** are recorded only by the lease's owner; a gate that lost its lease gets
//!   [`Disposition::Stale`] for a failed attempt and records nothing. A delivered event's row
//!   is deleted with the scheduler's next claim, in its transaction: one statement for every
//!   delivery finished meanwhile. A success is answered `Delivered` at once (as on SQLite);
//!   a gate that dies before the deletion, or lost the lease meanwhile, leaves the row to its
//!   lease: delivered again. With synchronous standbys, a failover can also lose claims and
//!   deletions the standby did not have yet: events delivered again, and for a moment more
//!   deliveries of a route at once than `max_concurrency` (accepts are never lost).
//! - **Trouble** (connection refused or lost, failover, read-only, no connection free within
//!   `accept_timeout`) is [`SpoolError::Unavailable`]: the gate answers 503 and Meta retries.
//!   The pool reconnects on the next use; the listener reconnects with back-off capped at 5 s.
mod connect;
mod intake;
mod ops;
mod schema;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tracing::{info, warn};

pub(crate) use connect::Target;

use super::store::{
    decode_headers, duration_ms, from_unix_ms, now_ms, plan, BoxFuture, Claimed, Disposition,
    EventDetail, EventInfo, EventState, ListFilter, Operations, Plan, ReplayTarget, Rng, RouteMap,
    Store, Summary,
};
use super::{
    Accepted, Backend, DeliveryOutcome, NewEvent, Shared, SpoolError, SpoolSettings, StoredEvent,
};

/// How long the store may fail before `/readyz` says so (accepts answer 503 at once).
const READY_GRACE: Duration = Duration::from_secs(10);
/// The least time the gate's statements get before their connection is given up (see
/// [`Db::within`]); `accept_timeout` (accepts) or `lease` (delivery) when longer.
const MIN_STATEMENT_LIMIT: Duration = Duration::from_secs(5);
/// How often expired de-duplication keys are pruned (any gate may; they do not collide).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Keys deleted per statement when pruning.
const PRUNE_CHUNK: i64 = 2000;
/// How often the routes with events are read again (new routes also arrive by notification).
const ROUTES_EVERY: Duration = Duration::from_secs(10);
/// The notification channel.
const CHANNEL: &str = "hubgate_spool";

/// Due pending events and expired leases of one route, as many as the route has room for,
/// oldest due first. Each kind is read in its own index's order with its own limit (one query
/// with `OR` over both sorted every pending event of the route: 24 ms per claim with a backlog
/// of 40,000, and deliveries fell behind accepts); a claim locks at most twice its room.
const CLAIM: &str = "
WITH now AS (SELECT hubgate.now_ms() AS n),
room AS (
    SELECT greatest($2 - count(*), 0) AS k FROM hubgate.events
    WHERE route = $1 AND state = 'in_flight' AND lease_until_ms > (SELECT n FROM now)
),
due AS (
    SELECT e.id, e.next_attempt_ms FROM hubgate.events e
    WHERE e.route = $1 AND e.state = 'pending' AND e.next_attempt_ms <= (SELECT n FROM now)
    ORDER BY e.next_attempt_ms, e.id
    LIMIT (SELECT k FROM room)
    FOR UPDATE OF e SKIP LOCKED
),
expired AS (
    SELECT e.id, e.next_attempt_ms FROM hubgate.events e
    WHERE e.route = $1 AND e.state = 'in_flight' AND e.lease_until_ms <= (SELECT n FROM now)
    ORDER BY e.lease_until_ms
    LIMIT (SELECT k FROM room)
    FOR UPDATE OF e SKIP LOCKED
),
picked AS (
    SELECT id FROM (SELECT * FROM due UNION ALL SELECT * FROM expired) both_kinds
    ORDER BY next_attempt_ms, id
    LIMIT (SELECT k FROM room)
)
UPDATE hubgate.events ev SET state = 'in_flight', attempts = ev.attempts + 1,
    lease_owner = $3, lease_until_ms = now.n + $4, updated_ms = now.n
FROM picked, now WHERE ev.id = picked.id
RETURNING ev.id, ev.route, ev.received_ms, ev.attempts, ev.client_identity, ev.query,
    ev.headers, ev.body, ev.next_attempt_ms";

/// Delivered events' rows go (their dedupe keys stay); only their leases' owner may say so.
const DELIVERED: &str =
    "DELETE FROM hubgate.events WHERE id = ANY($1) AND state = 'in_flight' AND lease_owner = $2";

/// One claimer per route at a time (see `claim_due`).
const CLAIM_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// Milliseconds from now (database clock) to the route's next due event or expiring lease.
const NEXT_DUE: &str = "
SELECT least(
    (SELECT min(next_attempt_ms) FROM hubgate.events WHERE route = $1 AND state = 'pending'),
    (SELECT min(lease_until_ms) FROM hubgate.events WHERE route = $1 AND state = 'in_flight')
) - hubgate.now_ms()";

const INFO_COLUMNS: &str = "id, route, state, attempts, received_ms, next_attempt_ms, \
     updated_ms, last_error, client_identity, length(body)::bigint";

/// The PostgreSQL store of one gate: the database ([`Db`]) and the tasks around it.
pub(crate) struct PgStore {
    db: Arc<Db>,
    tasks: Vec<JoinHandle<()>>,
    /// Accepts for the intake tasks (group commit).
    intake: Arc<intake::Queue>,
    /// Delivered events whose rows are deleted with the next claim (see `record`).
    delivered: Mutex<Vec<i64>>,
}

impl std::ops::Deref for PgStore {
    type Target = Db;

    fn deref(&self) -> &Db {
        &self.db
    }
}

/// What the store's methods and its tasks share.
pub(crate) struct Db {
    settings: Arc<SpoolSettings>,
    pool: Pool,
    shared: Arc<Shared>,
    /// This gate's name on its leases: host, process and a random part.
    owner: String,
    location: String,
    /// Routes with events, for the scheduler (refreshed, and fed by notifications).
    routes: Arc<Mutex<BTreeSet<String>>>,
    routes_read: Mutex<Instant>,
    /// Since when the database has failed us, if it has.
    failing_since: Mutex<Option<Instant>>,
    rng: Mutex<Rng>,
    /// Tells the notifier that this gate stored events of these routes.
    stored: tokio::sync::mpsc::UnboundedSender<String>,
}

impl PgStore {
    /// Connects. A gate (`serve`) migrates the schema and starts the listener and the pruner;
    /// the operations API (`hubgate spool …`) only checks the schema version.
    pub(crate) async fn connect(
        settings: Arc<SpoolSettings>,
        shared: Arc<Shared>,
        serve: bool,
    ) -> Result<PgStore, SpoolError> {
        let Backend::Postgres(pg) = &settings.backend else {
            unreachable!("PgStore::connect is called for the postgres backend");
        };
        let mut target = Target::parse(pg)?;
        let location = target.location.clone();
        let connector = target.connector()?;
        let open_err = |e: &dyn std::error::Error| SpoolError::Open {
            path: location.clone().into(),
            message: crate::error_chain(e),
        };
        // `off` would acknowledge events a crash can lose (and `local` ignores synchronous
        // standbys): then every session of this gate sets `on`.
        let sync = server_synchronous_commit(&target, &connector)
            .await
            .map_err(|e| open_err(&e))?;
        if sync == "off" || sync == "local" {
            warn!(
                synchronous_commit = %sync,
                "spool: the database's synchronous_commit is weaker than on; hubgate's sessions use on"
            );
            target.add_option("synchronous_commit", "on");
        }
        let manager = Manager::from_config(
            target.config.clone(),
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pg.pool_size.max(1))
            .wait_timeout(Some(settings.accept_timeout))
            .create_timeout(Some(Duration::from_secs(3)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| SpoolError::Open {
                path: location.clone().into(),
                message: e.to_string(),
            })?;
        let mut client = pool.get().await.map_err(|e| open_err(&e))?;
        if !serve {
            let found = schema::version(&client).await.map_err(|e| open_err(&e))?;
            if found != schema::VERSION {
                return Err(SpoolError::Schema {
                    path: location.clone().into(),
                    found,
                    supported: schema::VERSION,
                });
            }
            drop(client);
            let no_news = tokio::sync::mpsc::unbounded_channel().0;
            let db = Db::new(settings, pool, shared, location, Arc::default(), no_news);
            return Ok(PgStore::around(db, vec![], false));
        }
        match schema::migrate(&mut client).await {
            Ok(Ok(m)) if m.applied > 0 => {
                info!(
                    from = m.found,
                    to = schema::VERSION,
                    "spool: schema migrated"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(found)) => {
                return Err(SpoolError::Schema {
                    path: location.clone().into(),
                    found,
                    supported: schema::VERSION,
                })
            }
            Err(e) => {
                return Err(SpoolError::Open {
                    path: location.clone().into(),
                    message: format!(
                        "applying the schema migrations failed ({e}); a role that may not create \
                         tables needs them applied first: hubgate spool migrate"
                    ),
                })
            }
        }
        let routes: BTreeSet<String> = client
            .query("SELECT DISTINCT route FROM hubgate.events", &[])
            .await
            .map_err(|e| open_err(&e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(client);
        let routes = Arc::new(Mutex::new(routes));
        let pending: i64 = pool
            .get()
            .await
            .map_err(|e| open_err(&e))?
            .query_one(
                "SELECT count(*) FROM hubgate.events WHERE state = 'pending'",
                &[],
            )
            .await
            .map_err(|e| open_err(&e))?
            .get(0);
        info!(location = %location, pending, "spool opened");
        let listener = tokio::spawn(listen(
            target.config.clone(),
            connector,
            shared.clone(),
            routes.clone(),
        ));
        let pruner = tokio::spawn(prune(
            pool.clone(),
            settings.dedupe_window,
            work_limit(&settings),
        ));
        let (stored, news) = tokio::sync::mpsc::unbounded_channel();
        let notifier = tokio::spawn(announce(pool.clone(), news, work_limit(&settings)));
        let db = Db::new(settings, pool, shared, location, routes, stored);
        let mut store = PgStore::around(db, vec![listener, pruner, notifier], true);
        for _ in 0..intake::WRITERS {
            let task = intake::run(store.db.clone(), store.intake.clone());
            store.tasks.push(tokio::spawn(task));
        }
        Ok(store)
    }

    /// The store around `db`; `serve`: intake tasks will take its accepts (else it only
    /// reads, and refuses them).
    fn around(db: Db, tasks: Vec<JoinHandle<()>>, serve: bool) -> PgStore {
        PgStore {
            intake: intake::Queue::new(db.location.clone(), serve),
            db: Arc::new(db),
            tasks,
            delivered: Mutex::default(),
        }
    }
}

/// See [`Db::accept_limit`].
fn accept_limit(settings: &SpoolSettings) -> Duration {
    settings.accept_timeout.max(MIN_STATEMENT_LIMIT)
}

/// See [`Db::work_limit`].
fn work_limit(settings: &SpoolSettings) -> Duration {
    accept_limit(settings).max(settings.lease)
}

/// Runs `work` on a connection from `pool` within `limit` (`None`: it timed out); see
/// [`Db::within`].
async fn on_connection<T>(
    pool: &Pool,
    limit: Duration,
    work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> T,
) -> Result<Option<T>, PoolError> {
    let mut conn = InUse(Some(pool.get().await?));
    let Some(client) = conn.0.as_mut() else {
        unreachable!("set above");
    };
    let result = tokio::time::timeout(limit, work(client)).await.ok();
    if result.is_some() {
        drop(conn.0.take()); // finished: back to the pool
    }
    Ok(result)
}

/// A connection taken from the pool for [`on_connection`]: dropped while still held (the work
/// timed out or was abandoned), it is closed instead of going back to the pool.
struct InUse(Option<deadpool_postgres::Object>);

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl Db {
    fn new(
        settings: Arc<SpoolSettings>,
        pool: Pool,
        shared: Arc<Shared>,
        location: String,
        routes: Arc<Mutex<BTreeSet<String>>>,
        stored: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Db {
        Db {
            settings,
            pool,
            shared,
            owner: owner_name(),
            location,
            routes,
            routes_read: Mutex::new(Instant::now()),
            failing_since: Mutex::new(None),
            rng: Mutex::new(Rng::seeded()),
            stored,
        }
    }

    /// How long an accept's statements (and a sync route's key lookups) may take before they
    /// are given up and their connection closed (see [`within`](Db::within)).
    pub(super) fn accept_limit(&self) -> Duration {
        accept_limit(&self.settings)
    }

    /// The same for delivery's statements (claims, outcomes, leases), which may scan more;
    /// also how long the server lets one of the gate's transactions sit idle (a gate frozen
    /// or cut off mid-claim would otherwise hold its route's claim lock for every gate until
    /// the server's TCP noticed).
    fn work_limit(&self) -> Duration {
        work_limit(&self.settings)
    }

    /// Runs `work` on a pooled connection (with `synchronous_commit = on` where the server's
    /// default is weaker: see `connect`), giving it `limit`. The connection goes back to the
    /// pool only if the work finished: one that timed out or was abandoned (its caller gone)
    /// is closed instead. The way to the database can be lost without a word — a server
    /// frozen, a route gone, a firewall dropping packets — and a connection stuck in a
    /// statement would otherwise hold an intake task or the scheduler for as long as TCP takes
    /// to notice, or be handed to the next caller.
    pub(super) async fn within<T>(
        &self,
        limit: Duration,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        match on_connection(&self.pool, limit, work).await {
            Ok(Some(result)) => result,
            Ok(None) => {
                self.note_failure();
                Err(SpoolError::Unavailable {
                    location: self.location.clone(),
                    message: format!(
                        "no answer within {} ms; the connection is closed",
                        limit.as_millis()
                    ),
                })
            }
            Err(e) => Err(self.failed_pool(e)),
        }
    }

    fn failed_pool(&self, e: PoolError) -> SpoolError {
        let err = match e {
            PoolError::Backend(e) => return self.failed(&e),
            PoolError::Closed => SpoolError::Closed,
            other => SpoolError::Unavailable {
                location: self.location.clone(),
                message: other.to_string(),
            },
        };
        self.note_failure();
        err
    }

    /// Classifies a database error, and notes unavailability for `/readyz`.
    fn failed(&self, e: &tokio_postgres::Error) -> SpoolError {
        let err = classify(&self.location, e);
        if err.is_unavailable() {
            self.note_failure();
        }
        err
    }

    fn note_failure(&self) {
        let mut since = self.failing_since.lock().expect("lock");
        since.get_or_insert_with(Instant::now);
    }

    fn note_success(&self) {
        *self.failing_since.lock().expect("lock") = None;
    }

    fn random(&self) -> u64 {
        self.rng.lock().expect("lock").next()
    }

    /// The routes to claim for; read again from the database every `ROUTES_EVERY`.
    async fn routes(&self, client: &tokio_postgres::Client) -> Result<Vec<String>, SpoolError> {
        let stale = self.routes_read.lock().expect("lock").elapsed() >= ROUTES_EVERY;
        if stale {
            let rows = client
                .query(
                    "SELECT DISTINCT route FROM hubgate.events WHERE state <> 'dead'",
                    &[],
                )
                .await
                .map_err(|e| self.failed(&e))?;
            let mut routes = self.routes.lock().expect("lock");
            routes.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            *self.routes_read.lock().expect("lock") = Instant::now();
        }
        Ok(self.routes.lock().expect("lock").iter().cloned().collect())
    }
}

impl PgStore {
    /// Claims due events route by route, one transaction each. Delivered events' rows are
    /// deleted in the first of them (or on their own when no route has room).
    async fn claim_due(&self, busy: &RouteMap<String, usize>) -> Result<Claimed, SpoolError> {
        let mut delivered = self.take_delivered();
        let claimed = self.claim_routes(busy, &mut delivered).await;
        if !delivered.is_empty() && claimed.is_ok() {
            // No claim took them along.
            let deleted = self
                .within(self.work_limit(), async |client| {
                    self.delete_delivered(client, &delivered).await
                })
                .await;
            match deleted {
                Ok(()) => delivered.clear(),
                Err(e) => {
                    warn!(error = %e, "spool: deleting delivered events failed; tried again with the next claim")
                }
            }
        }
        if !delivered.is_empty() {
            // Deleted or not, they are deleted again with the next claim (at most once more).
            self.delivered.lock().expect("lock").append(&mut delivered);
        }
        claimed
    }

    /// The claims of [`claim_due`](PgStore::claim_due), route by route, each within the
    /// limit on a connection of its own; `delivered` is emptied once its rows are deleted.
    async fn claim_routes(
        &self,
        busy: &RouteMap<String, usize>,
        delivered: &mut Vec<i64>,
    ) -> Result<Claimed, SpoolError> {
        let limit = self.work_limit();
        let routes = self
            .within(limit, async |client| self.routes(client).await)
            .await?;
        let max = self.settings.max_concurrency_per_route.max(1);
        let mut events = Vec::new();
        let mut next_due: Option<i64> = None;
        for route in routes {
            let running = busy.get(&route).copied().unwrap_or(0);
            if running >= max {
                continue;
            }
            let claimed = self
                .within(limit, async |client| {
                    self.claim_route(client, &route, running, delivered).await
                })
                .await;
            match claimed {
                Ok((claimed, due)) => {
                    events.extend(claimed);
                    if let Some(at) = due {
                        next_due = Some(next_due.map_or(at, |d| d.min(at)));
                    }
                }
                // What earlier routes' committed claims took is this gate's to deliver.
                Err(e) if !events.is_empty() => {
                    warn!(route, error = %e, "spool: claiming due events failed");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.note_success();
        Ok(Claimed { events, next_due })
    }

    /// One route's claim, in one transaction (the first also deletes `delivered`'s rows, and
    /// empties it once committed): the events claimed, oldest due first, and when the route's
    /// next event falls due (when it had room left).
    async fn claim_route(
        &self,
        client: &mut deadpool_postgres::Object,
        route: &str,
        running: usize,
        delivered: &mut Vec<i64>,
    ) -> Result<(Vec<StoredEvent>, Option<i64>), SpoolError> {
        let max = self.settings.max_concurrency_per_route.max(1);
        let lease = duration_ms(self.settings.lease);
        let tx = client.transaction().await.map_err(|e| self.failed(&e))?;
        // Statements prepared once per connection: parsing and planning them on every
        // call was a visible share of the database's CPU (bench/results, spool-pg).
        let prepare = |sql| tx.prepare_cached(sql);
        let lock = prepare(CLAIM_LOCK).await.map_err(|e| self.failed(&e))?;
        let delete = prepare(DELIVERED).await.map_err(|e| self.failed(&e))?;
        let lock_key = format!("hubgate.claim:{route}");
        // Sent together (pipelined, one round trip). A claim's commit need not wait for
        // its WAL flush: lost in a database crash, the claim (or the delivered rows'
        // deletion) is undone and the event delivered again — at least once, as after a
        // lease that expired; an accept's commit still waits. One claimer per route at a
        // time (the advisory lock): the in-flight count it reads stays true until its
        // claims commit, so the limit holds across gates. The settings go before the lock:
        // the server lets go of a lock left idle (its gate frozen or cut off) only with them.
        let (relaxed, locked) =
            tokio::join!(self.relax_and_delete(&tx, &delete, delivered), async {
                tx.execute(&lock, &[&lock_key]).await
            });
        relaxed?;
        locked.map_err(|e| self.failed(&e))?;
        let claim = prepare(CLAIM).await.map_err(|e| self.failed(&e))?;
        let rows = tx
            .query(&claim, &[&route, &(max as i64), &self.owner, &lease])
            .await
            .map_err(|e| self.failed(&e))?;
        let mut next_due = None;
        if rows.len() < max - running {
            let next = prepare(NEXT_DUE).await.map_err(|e| self.failed(&e))?;
            let due: Option<i64> = tx
                .query_one(&next, &[&route])
                .await
                .map_err(|e| self.failed(&e))?
                .get(0);
            next_due = due.map(|delay| now_ms().saturating_add(delay.max(0)));
        }
        tx.commit().await.map_err(|e| self.failed(&e))?;
        delivered.clear();
        let mut claimed: Vec<(i64, StoredEvent)> =
            rows.iter().map(|r| (r.get(8), stored_event(r))).collect();
        claimed.sort_by_key(|(due, e)| (*due, e.id));
        Ok((claimed.into_iter().map(|(_, e)| e).collect(), next_due))
    }

    fn take_delivered(&self) -> Vec<i64> {
        std::mem::take(&mut *self.delivered.lock().expect("lock"))
    }

    /// Deletes delivered events' rows in a transaction of their own (whose commit, as a
    /// claim's, does not wait for its WAL flush).
    async fn delete_delivered(
        &self,
        client: &mut deadpool_postgres::Object,
        ids: &[i64],
    ) -> Result<(), SpoolError> {
        let tx = client.transaction().await.map_err(|e| self.failed(&e))?;
        let delete = tx
            .prepare_cached(DELIVERED)
            .await
            .map_err(|e| self.failed(&e))?;
        self.relax_and_delete(&tx, &delete, ids).await?;
        tx.commit().await.map_err(|e| self.failed(&e))
    }

    /// Makes `tx`'s commit not wait for its WAL flush, has the server end it if it sits idle
    /// past the work limit (its gate frozen or cut off), and deletes the rows of delivered
    /// events `ids` (if any), all sent at once (pipelined, one round trip).
    async fn relax_and_delete(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        delete: &tokio_postgres::Statement,
        ids: &[i64],
    ) -> Result<(), SpoolError> {
        let relax = format!(
            "SET LOCAL synchronous_commit = off; SET LOCAL idle_in_transaction_session_timeout = {}",
            self.work_limit().as_millis()
        );
        let (relaxed, deleted) = tokio::join!(tx.batch_execute(&relax), async {
            match ids.is_empty() {
                true => Ok(0),
                false => tx.execute(delete, &[&ids, &self.owner]).await,
            }
        },);
        relaxed.map_err(|e| self.failed(&e))?;
        deleted.map_err(|e| self.failed(&e))?;
        Ok(())
    }

    /// Deletes the rows of every delivery recorded so far.
    async fn settle_delivered(&self) -> Result<(), SpoolError> {
        let mut ids = self.take_delivered();
        if ids.is_empty() {
            return Ok(());
        }
        let deleted = self
            .within(self.work_limit(), async |client| {
                self.delete_delivered(client, &ids).await
            })
            .await;
        if deleted.is_err() {
            self.delivered.lock().expect("lock").append(&mut ids);
        }
        deleted
    }

    async fn record(&self, id: i64, outcome: DeliveryOutcome) -> Result<Disposition, SpoolError> {
        let stats = &self.shared.stats;
        if outcome == DeliveryOutcome::Done {
            // Deleted with the scheduler's next claim, which follows at once (a finished
            // delivery wakes it): one statement for every delivery finished meanwhile, in the
            // claim's transaction. Lost with the gate before that, the event is delivered
            // again once its lease ends (at least once).
            self.delivered.lock().expect("lock").push(id);
            stats.delivered.fetch_add(1, Ordering::Relaxed);
            return Ok(Disposition::Delivered);
        }
        self.within(self.work_limit(), async |client| {
            let tx = client.transaction().await.map_err(|e| self.failed(&e))?;
            // Its row lock is released by the server if this gate stops half-way.
            tx.batch_execute(&format!(
                "SET LOCAL idle_in_transaction_session_timeout = {}",
                self.work_limit().as_millis()
            ))
            .await
            .map_err(|e| self.failed(&e))?;
            let row = tx
                .query_opt(
                    "SELECT attempts, retry_since_ms, hubgate.now_ms() FROM hubgate.events
                     WHERE id = $1 AND state = 'in_flight' AND lease_owner = $2 FOR UPDATE",
                    &[&id, &self.owner],
                )
                .await
                .map_err(|e| self.failed(&e))?;
            let Some(row) = row else {
                return Ok(Disposition::Stale);
            };
            let attempts = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
            let (since, now): (i64, i64) = (row.get(1), row.get(2));
            let disposition = match plan(&self.settings, outcome, attempts, since, now, self.random()) {
                Plan::Dead(why) => {
                    tx.execute(
                        "UPDATE hubgate.events SET state = 'dead', last_error = $2, updated_ms = $3,
                             lease_owner = NULL, lease_until_ms = NULL
                         WHERE id = $1",
                        &[&id, &why, &now],
                    )
                    .await
                    .map_err(|e| self.failed(&e))?;
                    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    Disposition::Dead(why)
                }
                Plan::Retry { at, error } => {
                    tx.execute(
                        "UPDATE hubgate.events SET state = 'pending', next_attempt_ms = $2,
                             last_error = $3, updated_ms = $4, lease_owner = NULL, lease_until_ms = NULL
                         WHERE id = $1",
                        &[&id, &at, &error, &now],
                    )
                    .await
                    .map_err(|e| self.failed(&e))?;
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    // In this gate's clock, for its scheduler and logs.
                    Disposition::RetryAt(now_ms().saturating_add(at - now))
                }
            };
            tx.commit().await.map_err(|e| self.failed(&e))?;
            Ok(disposition)
        })
        .await
    }
}

/// The event columns of `CLAIM`'s `RETURNING`.
fn stored_event(r: &tokio_postgres::Row) -> StoredEvent {
    let headers: Vec<u8> = r.get(6);
    let body: Vec<u8> = r.get(7);
    StoredEvent {
        id: r.get(0),
        route: r.get(1),
        received_at: from_unix_ms(r.get(2)),
        attempt: u32::try_from(r.get::<_, i32>(3)).unwrap_or(u32::MAX),
        client_identity: r.get(4),
        query: r.get(5),
        headers: decode_headers(&headers),
        body: Bytes::from(body),
    }
}

fn event_info(r: &tokio_postgres::Row) -> Result<EventInfo, SpoolError> {
    let state: String = r.get(2);
    Ok(EventInfo {
        id: r.get(0),
        route: r.get(1),
        state: state
            .parse()
            .map_err(|e: String| SpoolError::InvalidEvent(e))?,
        attempts: u32::try_from(r.get::<_, i32>(3)).unwrap_or(u32::MAX),
        received_at: from_unix_ms(r.get(4)),
        next_attempt_at: from_unix_ms(r.get(5)),
        updated_at: from_unix_ms(r.get(6)),
        last_error: r.get(7),
        client_identity: r.get(8),
        body_len: u64::try_from(r.get::<_, i64>(9)).unwrap_or(0),
    })
}

/// Unavailable (503, retry later) versus a storage error or a full disk.
fn classify(location: &str, e: &tokio_postgres::Error) -> SpoolError {
    let unavailable = || SpoolError::Unavailable {
        location: location.to_owned(),
        message: crate::error_chain(e),
    };
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection itself failed (refused, reset, closed, timed out) — or
        // hubgate sent something the server's types refuse, which no retry fixes.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        let mut io = false;
        while let Some(c) = cause {
            io |= c.is::<std::io::Error>();
            cause = c.source();
        }
        return if e.is_closed() || io {
            unavailable()
        } else {
            SpoolError::Storage {
                path: location.into(),
                message: crate::error_chain(e),
            }
        };
    };
    if code.code().starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::QUERY_CANCELED,
        ]
        .contains(code)
    {
        return unavailable();
    }
    if *code == SqlState::DISK_FULL {
        return SpoolError::Full {
            path: location.into(),
        };
    }
    SpoolError::Storage {
        path: location.into(),
        message: crate::error_chain(e),
    }
}

/// The server's default `synchronous_commit`, on a connection of its own.
async fn server_synchronous_commit(
    target: &Target,
    connector: &tokio_postgres_rustls::MakeRustlsConnect,
) -> Result<String, tokio_postgres::Error> {
    let (client, connection) = target.config.connect(connector.clone()).await?;
    let driver = tokio::spawn(connection);
    let value: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await?
        .get(0);
    drop(client);
    let _ = driver.await;
    Ok(value)
}

/// `host:pid:random`: unique per gate process, readable in `lease_owner`.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "gate".to_owned());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        Rng::seeded().next() as u32
    )
}

/// Listens for new events of every gate and wakes the scheduler; reconnects with back-off.
async fn listen(
    config: tokio_postgres::Config,
    connector: tokio_postgres_rustls::MakeRustlsConnect,
    shared: Arc<Shared>,
    routes: Arc<Mutex<BTreeSet<String>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match config.connect(connector.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(message) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match message {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                let _ = tx.send(n.payload().to_owned());
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    // Events may have arrived while not listening.
                    shared.notify.notify_one();
                    while let Some(route) = rx.recv().await {
                        if !route.is_empty() {
                            routes.lock().expect("lock").insert(route);
                        }
                        shared.notify.notify_one();
                    }
                }
                driver.abort();
                warn!("spool: lost the notification connection; reconnecting");
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "spool: cannot open the notification connection");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Tells the other gates about new events: one `NOTIFY` per route every 50 ms at most, in a
/// transaction of its own, so the notification lock never sits inside an accept's commit.
async fn announce(
    pool: Pool,
    mut news: tokio::sync::mpsc::UnboundedReceiver<String>,
    limit: Duration,
) {
    while let Some(first) = news.recv().await {
        let mut routes = BTreeSet::from([first]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(r) = news.try_recv() {
            routes.insert(r);
        }
        // A failure is not retried: the other gates poll every second anyway.
        let _ = on_connection(&pool, limit, async |client| {
            for route in routes {
                let _ = client
                    .execute("SELECT pg_notify('hubgate_spool', $1)", &[&route])
                    .await;
            }
        })
        .await;
    }
}

/// Deletes de-duplication keys older than the window, a chunk at a time.
async fn prune(pool: Pool, window: Duration, limit: Duration) {
    if window.is_zero() {
        return;
    }
    let window = duration_ms(window);
    loop {
        tokio::time::sleep(PRUNE_EVERY).await;
        // Chunk after chunk, each within the limit (a chunk cut short is taken next time).
        while let Ok(Some(Ok(n))) = on_connection(&pool, limit, async |client| {
            client
                .execute(
                    // SKIP LOCKED: never waits on a key an accept is refreshing (accepts
                    // lock keys in key order; a prune that waited, in its own, could deadlock
                    // with one and fail its whole statement).
                    "DELETE FROM hubgate.dedupe WHERE key IN (
                         SELECT key FROM hubgate.dedupe
                         WHERE accepted_ms < hubgate.now_ms() - $1 LIMIT $2
                         FOR UPDATE SKIP LOCKED)",
                    &[&window, &PRUNE_CHUNK],
                )
                .await
        })
        .await
        {
            if n > 0 && (n as i64) < PRUNE_CHUNK {
                info!(keys = n, "spool: pruned expired de-duplication keys");
            }
            if (n as i64) < PRUNE_CHUNK {
                break;
            }
        }
    }
}
impl Store for PgStore {
    fn accept_all(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<Accepted>, SpoolError>> {
        Box::pin(intake::accept(&self.intake, events))
    }

    fn claim<'a>(
        &'a self,
        busy: &'a RouteMap<String, usize>,
    ) -> BoxFuture<'a, Result<Claimed, SpoolError>> {
        Box::pin(self.claim_due(busy))
    }

    fn complete(
        &self,
        id: i64,
        outcome: DeliveryOutcome,
    ) -> BoxFuture<'_, Result<Disposition, SpoolError>> {
        Box::pin(self.record(id, outcome))
    }

    fn settle(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(self.settle_delivered())
    }

    fn release(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<usize, SpoolError>> {
        Box::pin(async move {
            self.within(self.work_limit(), async |client| {
                let n = client
                    .execute(
                        "UPDATE hubgate.events SET state = 'pending', next_attempt_ms = hubgate.now_ms(),
                             updated_ms = hubgate.now_ms(), lease_owner = NULL, lease_until_ms = NULL
                         WHERE id = ANY($1) AND state = 'in_flight' AND lease_owner = $2",
                        &[&ids, &self.owner],
                    )
                    .await
                    .map_err(|e| self.failed(&e))?;
                Ok(n as usize)
            })
            .await
        })
    }

    fn renew(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(async move {
            self.within(self.work_limit(), async |client| {
                client
                    .execute(
                        "UPDATE hubgate.events SET lease_until_ms = hubgate.now_ms() + $3
                         WHERE id = ANY($1) AND state = 'in_flight' AND lease_owner = $2",
                        &[&ids, &self.owner, &duration_ms(self.settings.lease)],
                    )
                    .await
                    .map_err(|e| self.failed(&e))?;
                Ok(())
            })
            .await
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for t in &self.tasks {
                t.abort();
            }
            self.intake.close().await;
            self.pool.close();
        })
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn recent(&self, key: [u8; 32], window: Duration) -> BoxFuture<'_, Result<bool, SpoolError>> {
        Box::pin(async move {
            self.within(self.accept_limit(), async |client| {
                let row = client
                    .query_opt(
                        "SELECT accepted_ms > hubgate.now_ms() - $2 FROM hubgate.dedupe WHERE key = $1",
                        &[&&key[..], &duration_ms(window)],
                    )
                    .await
                    .map_err(|e| self.failed(&e))?;
                Ok(row.is_some_and(|r| r.get(0)))
            })
            .await
        })
    }

    fn remember(&self, key: [u8; 32]) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(async move {
            self.within(self.accept_limit(), async |client| {
                client
                    .execute(
                        "INSERT INTO hubgate.dedupe (key, accepted_ms) VALUES ($1, hubgate.now_ms())
                         ON CONFLICT (key) DO UPDATE SET accepted_ms = EXCLUDED.accepted_ms",
                        &[&&key[..]],
                    )
                    .await
                    .map_err(|e| self.failed(&e))?;
                Ok(())
            })
            .await
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(async move {
            // The pool's wait is bounded too: a probe never waits longer than 2 s.
            let probe = self.within(Duration::from_secs(2), async |client| {
                client
                    .execute("SELECT 1", &[])
                    .await
                    .map_err(|e| self.failed(&e))
            });
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(_)) => {
                    self.note_success();
                    Ok(())
                }
                Ok(Err(e)) => self.grace(e),
                Err(_) => {
                    self.note_failure();
                    self.grace(SpoolError::Unavailable {
                        location: self.location.clone(),
                        message: "no answer within 2 s".to_owned(),
                    })
                }
            }
        })
    }
}

impl PgStore {
    /// A failure counts against readiness only once it has lasted [`READY_GRACE`].
    fn grace(&self, e: SpoolError) -> Result<(), SpoolError> {
        let since = *self.failing_since.lock().expect("lock");
        match since {
            Some(t) if t.elapsed() >= READY_GRACE => Err(e),
            _ => Ok(()),
        }
    }
}

impl Operations for PgStore {
    fn summary(&self) -> BoxFuture<'_, Result<Summary, SpoolError>> {
        Box::pin(ops::summary(self))
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<EventInfo>, SpoolError>> {
        Box::pin(ops::list(self, filter))
    }

    fn show(&self, id: i64) -> BoxFuture<'_, Result<EventDetail, SpoolError>> {
        Box::pin(ops::show(self, id))
    }

    fn replay(&self, target: ReplayTarget) -> BoxFuture<'_, Result<u64, SpoolError>> {
        Box::pin(ops::replay(self, target))
    }

    fn purge_dead(
        &self,
        older_than: Duration,
        route: Option<String>,
    ) -> BoxFuture<'_, Result<u64, SpoolError>> {
        Box::pin(ops::purge_dead(self, older_than, route))
    }
}

/// Applies the schema migrations this hubgate knows (for `hubgate spool migrate`): returns the
/// version found and the version now.
pub(crate) async fn migrate(settings: &SpoolSettings) -> Result<(i64, i64), SpoolError> {
    let Backend::Postgres(pg) = &settings.backend else {
        return Err(SpoolError::Settings {
            path: settings.path.clone(),
            message: "migrations are for the postgres backend; a SQLite spool migrates itself"
                .to_owned(),
        });
    };
    let target = Target::parse(pg)?;
    let err = |e: &dyn std::fmt::Display| SpoolError::Open {
        path: target.location.clone().into(),
        message: e.to_string(),
    };
    let (mut client, connection) = target
        .config
        .connect(target.connector()?)
        .await
        .map_err(|e| err(&crate::error_chain(&e)))?;
    let driver = tokio::spawn(connection);
    let result = schema::migrate(&mut client).await.map_err(|e| err(&e))?;
    drop(client);
    let _ = driver.await;
    match result {
        Ok(m) => Ok((m.found, schema::VERSION)),
        Err(found) => Err(SpoolError::Schema {
            path: target.location.clone().into(),
            found,
            supported: schema::VERSION,
        }),
    }
}
