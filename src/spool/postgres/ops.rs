//! The operations API on PostgreSQL (`hubgate spool …`, `/readyz`, `/metrics`): safe while
//! gates run, as every statement is a short transaction of its own.

use super::*;

/// How long an operation may take before it is given up and its connection closed (see
/// `Db::within`): counts over the whole table, a replay of every dead event.
const OPS_LIMIT: Duration = Duration::from_secs(300);

pub(super) async fn summary(s: &PgStore) -> Result<Summary, SpoolError> {
    s.within(OPS_LIMIT, async |client| {
        let rows = client
            .query(
                "SELECT route, state, count(*), min(received_ms) FROM hubgate.events
                 GROUP BY route, state ORDER BY route",
                &[],
            )
            .await
            .map_err(|e| s.failed(&e))?;
        let mut counts = Vec::with_capacity(rows.len());
        for r in &rows {
            let state: String = r.get(1);
            let state: EventState = state.parse().map_err(SpoolError::InvalidEvent)?;
            let count = u64::try_from(r.get::<_, i64>(2)).unwrap_or(0);
            counts.push((r.get::<_, String>(0), state, count, r.get::<_, i64>(3)));
        }
        let keys: i64 = client
            .query_one("SELECT count(*) FROM hubgate.dedupe", &[])
            .await
            .map_err(|e| s.failed(&e))?
            .get(0);
        Ok(Summary::from_counts(
            counts,
            u64::try_from(keys).unwrap_or(0),
        ))
    })
    .await
}

pub(super) async fn list(s: &PgStore, f: ListFilter) -> Result<Vec<EventInfo>, SpoolError> {
    s.within(OPS_LIMIT, async |client| {
        let sql = format!(
            "SELECT {INFO_COLUMNS} FROM hubgate.events
             WHERE ($1::text IS NULL OR route = $1) AND ($2::text IS NULL OR state = $2)
                 AND id > $3
             ORDER BY id LIMIT $4"
        );
        let rows = client
            .query(
                &sql,
                &[
                    &f.route,
                    &f.state.map(EventState::as_str),
                    &f.after_id.unwrap_or(0),
                    &i64::try_from(f.limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| s.failed(&e))?;
        rows.iter().map(event_info).collect()
    })
    .await
}

pub(super) async fn show(s: &PgStore, id: i64) -> Result<EventDetail, SpoolError> {
    s.within(OPS_LIMIT, async |client| {
        let sql = format!(
            "SELECT {INFO_COLUMNS}, query, headers, body FROM hubgate.events WHERE id = $1"
        );
        let row = client
            .query_opt(&sql, &[&id])
            .await
            .map_err(|e| s.failed(&e))?
            .ok_or(SpoolError::NotFound(id))?;
        let headers: Vec<u8> = row.get(11);
        let body: Vec<u8> = row.get(12);
        Ok(EventDetail {
            info: event_info(&row)?,
            query: row.get(10),
            headers: decode_headers(&headers),
            body: Bytes::from(body),
        })
    })
    .await
}

pub(super) async fn replay(s: &PgStore, target: ReplayTarget) -> Result<u64, SpoolError> {
    s.within(OPS_LIMIT, async |client| {
        let tx = client.transaction().await.map_err(|e| s.failed(&e))?;
        const BACK: &str = "state = 'pending', attempts = 0, next_attempt_ms = hubgate.now_ms(),
             retry_since_ms = hubgate.now_ms(), updated_ms = hubgate.now_ms()";
        let n = match target {
            ReplayTarget::One(id) => {
                let state: Option<String> = tx
                    .query_opt(
                        "SELECT state FROM hubgate.events WHERE id = $1 FOR UPDATE",
                        &[&id],
                    )
                    .await
                    .map_err(|e| s.failed(&e))?
                    .map(|r| r.get(0));
                match state.as_deref().map(str::parse::<EventState>) {
                    None => return Err(SpoolError::NotFound(id)),
                    Some(Ok(EventState::Dead)) => {}
                    Some(Ok(state)) => return Err(SpoolError::NotDead { id, state }),
                    Some(Err(e)) => return Err(SpoolError::InvalidEvent(e)),
                }
                tx.execute(
                    &format!("UPDATE hubgate.events SET {BACK} WHERE id = $1 AND state = 'dead'"),
                    &[&id],
                )
                .await
            }
            ReplayTarget::AllDead { route } => {
                tx.execute(
                    &format!(
                        "UPDATE hubgate.events SET {BACK}
                         WHERE state = 'dead' AND ($1::text IS NULL OR route = $1)"
                    ),
                    &[&route],
                )
                .await
            }
        }
        .map_err(|e| s.failed(&e))?;
        if n > 0 {
            tx.execute("SELECT pg_notify('hubgate_spool', '')", &[])
                .await
                .map_err(|e| s.failed(&e))?;
        }
        tx.commit().await.map_err(|e| s.failed(&e))?;
        Ok(n)
    })
    .await
}

pub(super) async fn purge_dead(
    s: &PgStore,
    older_than: Duration,
    route: Option<String>,
) -> Result<u64, SpoolError> {
    s.within(OPS_LIMIT, async |client| {
        let cutoff = now_ms().saturating_sub(duration_ms(older_than));
        let mut total = 0u64;
        loop {
            let n = client
                .execute(
                    "DELETE FROM hubgate.events WHERE id IN (
                         SELECT id FROM hubgate.events
                         WHERE state = 'dead' AND updated_ms <= $1
                             AND ($2::text IS NULL OR route = $2)
                         LIMIT $3)",
                    &[&cutoff, &route, &PRUNE_CHUNK],
                )
                .await
                .map_err(|e| s.failed(&e))?;
            total += n;
            if (n as i64) < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    })
    .await
}
