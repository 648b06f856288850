//! The PostgreSQL schema, as versioned migrations in the schema `hubgate`. A gate applies the
//! ones it lacks at start (one gate at a time: an advisory lock), refuses a database whose
//! schema is newer than it knows, and `hubgate spool migrate` applies them ahead of time for
//! roles that may not create tables while serving.
//!
//! ```sql
//! hubgate.migrations (version, applied_at)          -- one row per applied migration
//! hubgate.events (id bigserial, route, state, received_ms, stored_ms, retry_since_ms,
//!                 next_attempt_ms, attempts, updated_ms, last_error, client_identity, query,
//!                 headers bytea, body bytea, lease_owner, lease_until_ms)
//! hubgate.dedupe (key bytea primary key, accepted_ms)  -- SHA-256 of (route, body)
//! hubgate.now_ms()                                      -- the database's clock, Unix ms
//! ```
//!
//! Times that gates compare (due times, leases) come from the database's clock, so gates with
//! skewed clocks agree.

use tokio_postgres::Client;

/// Serialises migrations across gates starting together.
const MIGRATION_LOCK: i64 = 0x6875_6267_6174_6501;

/// Every migration, in order; the version is the position (1-based). Never edit one that has
/// shipped: add the next.
const MIGRATIONS: &[&str] = &["
CREATE TABLE hubgate.events (
    id              bigserial PRIMARY KEY,
    route           text    NOT NULL,
    state           text    NOT NULL CHECK (state IN ('pending', 'in_flight', 'dead')),
    received_ms     bigint  NOT NULL,
    stored_ms       bigint  NOT NULL,
    retry_since_ms  bigint  NOT NULL,
    next_attempt_ms bigint  NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    updated_ms      bigint  NOT NULL,
    last_error      text,
    client_identity text,
    query           text,
    headers         bytea   NOT NULL,
    body            bytea   NOT NULL,
    lease_owner     text,
    lease_until_ms  bigint
);
CREATE INDEX events_due ON hubgate.events (route, next_attempt_ms, id) WHERE state = 'pending';
CREATE INDEX events_leased ON hubgate.events (route, lease_until_ms) WHERE state = 'in_flight';
CREATE INDEX events_dead ON hubgate.events (route, updated_ms) WHERE state = 'dead';
CREATE TABLE hubgate.dedupe (
    key         bytea  PRIMARY KEY,
    accepted_ms bigint NOT NULL
);
CREATE INDEX dedupe_age ON hubgate.dedupe (accepted_ms);
CREATE FUNCTION hubgate.now_ms() RETURNS bigint LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
"];

/// The schema version this hubgate reads and writes.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// What [`migrate`] found and did.
pub(crate) struct Migrated {
    pub found: i64,
    pub applied: i64,
}

/// The schema version in the database (0: none yet).
pub(crate) async fn version(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('hubgate.migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM hubgate.migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Applies the migrations the database lacks, in one transaction, under an advisory lock.
/// `Err(Ok(found))` when the database's schema is newer than [`VERSION`].
pub(crate) async fn migrate(
    client: &mut Client,
) -> Result<Result<Migrated, i64>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Migrations may rebuild large tables and wait for another gate's: not bounded by the
    // gate's statement limit.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS hubgate;
         CREATE TABLE IF NOT EXISTS hubgate.migrations (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await?;
    let found: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM hubgate.migrations",
            &[],
        )
        .await?
        .get(0);
    if found > VERSION {
        return Ok(Err(found));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql).await?;
        let version = i32::try_from(i + 1).expect("few migrations");
        tx.execute(
            "INSERT INTO hubgate.migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Ok(Migrated {
        found,
        applied: VERSION - found,
    }))
}
