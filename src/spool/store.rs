//! What a spool keeps its events in, whatever the engine: the [`Store`] contract that the SQLite
//! store (`sqlite`) and the PostgreSQL store (`postgres`) fulfil, the retry plan both apply
//! ([`plan`]), and the types and encodings they share (event states, summaries, the header
//! codec, the de-duplication key, Unix-millisecond times).
//!
//! # The contract
//! - [`Store::accept`] returns only after the transaction that holds the event — or proves it
//!   a duplicate within the window — has committed durably. Any error means "not stored".
//! - [`Store::claim`] marks due events in flight (attempt counted) and returns them, at most
//!   `max_concurrency_per_route` in flight per route (fleet-wide on a shared store); an event
//!   claimed by a process that died becomes due again (SQLite: at the next start; PostgreSQL:
//!   when its lease expires).
//! - [`Store::complete`] records an attempt's outcome only while the event is still this
//!   process's to record (else [`Disposition::Stale`]; a success may be answered
//!   [`Disposition::Delivered`] before it is recorded — see [`Store::settle`] — and is then
//!   not recorded if the event is no longer this process's); [`Store::release`] puts interrupted
//!   attempts back; [`Store::renew`] extends the claims of attempts still running.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{Accepted, DeliveryOutcome, NewEvent, SpoolError, SpoolSettings, StoredEvent};

/// A boxed future: the stores are used behind `dyn Store`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A spool's storage engine; see the module docs for the contract.
pub(crate) trait Store: Operations {
    /// Stores events durably in one transaction, each or its duplicate recognised: all of
    /// them, or none (one event is the common case).
    fn accept_all(&self, events: Vec<NewEvent>)
        -> BoxFuture<'_, Result<Vec<Accepted>, SpoolError>>;
    /// Claims due events of every route with room, given what this process already runs.
    fn claim<'a>(
        &'a self,
        busy: &'a RouteMap<String, usize>,
    ) -> BoxFuture<'a, Result<Claimed, SpoolError>>;
    /// Records an attempt's outcome.
    fn complete(
        &self,
        id: i64,
        outcome: DeliveryOutcome,
    ) -> BoxFuture<'_, Result<Disposition, SpoolError>>;
    /// Puts interrupted attempts back to pending, due now.
    fn release(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<usize, SpoolError>>;
    /// Returns once every outcome [`complete`](Store::complete) answered is recorded (a store
    /// may record successes after answering).
    fn settle(&self) -> BoxFuture<'_, Result<(), SpoolError>> {
        Box::pin(async { Ok(()) })
    }
    /// Extends the claims of attempts still running (a no-op where claims do not expire).
    fn renew(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Finishes what is under way and closes the store.
    fn close(&self) -> BoxFuture<'_, ()>;
    /// Where the store is, for messages (a path, or a database without its password).
    fn location(&self) -> String;
    /// Whether the store answers now (what `/readyz` asks).
    fn ready(&self) -> BoxFuture<'_, Result<(), SpoolError>>;
    /// Whether `key` (a sync route's delivered body) was remembered within `window`.
    fn recent(&self, key: [u8; 32], window: Duration) -> BoxFuture<'_, Result<bool, SpoolError>>;
    /// Remembers `key` now.
    fn remember(&self, key: [u8; 32]) -> BoxFuture<'_, Result<(), SpoolError>>;
}

/// The operations API behind `hubgate spool …`, `/readyz` and `/metrics`: safe while gates run.
pub trait Operations: Send + Sync + 'static {
    /// Counts per route and state, and the age of the oldest events.
    fn summary(&self) -> BoxFuture<'_, Result<Summary, SpoolError>>;
    /// Events matching the filter, by ascending id, without headers and bodies.
    fn list(&self, filter: ListFilter) -> BoxFuture<'_, Result<Vec<EventInfo>, SpoolError>>;
    /// One event with its headers and body.
    fn show(&self, id: i64) -> BoxFuture<'_, Result<EventDetail, SpoolError>>;
    /// Puts dead events back in the queue, due now, with a fresh retry horizon.
    fn replay(&self, target: ReplayTarget) -> BoxFuture<'_, Result<u64, SpoolError>>;
    /// Deletes dead events that died more than `older_than` ago.
    fn purge_dead(
        &self,
        older_than: Duration,
        route: Option<String>,
    ) -> BoxFuture<'_, Result<u64, SpoolError>>;
}

/// Due events claimed, and when to look again.
pub(crate) struct Claimed {
    pub events: Vec<StoredEvent>,
    /// The earliest due time (Unix ms) of pending events on routes that had room.
    pub next_due: Option<i64>,
}

/// What recording an outcome did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Disposition {
    Delivered,
    RetryAt(i64),
    Dead(String),
    /// The event was not this process's to record any more (nothing recorded).
    Stale,
}

/// What becomes of an in-flight event after an attempt that did not deliver it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Dead-letter it with this reason.
    Dead(String),
    /// Pending again, due at this time (Unix ms), with this error recorded.
    Retry { at: i64, error: String },
}

/// The retry rules, the same on every store: a permanent failure dead-letters at once; a
/// transient one is retried after `backoff_base · 2^(attempts−1)` (capped at `backoff_max`, with
/// equal jitter from `random`) until the retry horizon, counted from `retry_since`; the last
/// attempt is made at the horizon, and if it fails the event is dead.
pub(crate) fn plan(
    settings: &SpoolSettings,
    outcome: DeliveryOutcome,
    attempts: u32,
    retry_since: i64,
    now: i64,
    random: u64,
) -> Plan {
    match outcome {
        DeliveryOutcome::Done => unreachable!("a delivered event is deleted, not planned"),
        DeliveryOutcome::Permanent(msg) => Plan::Dead(msg),
        DeliveryOutcome::Retry(msg) => {
            let horizon = settings.retry_horizon;
            let deadline = retry_since.saturating_add(duration_ms(horizon));
            if now >= deadline {
                Plan::Dead(format!(
                    "retry horizon ({}) passed; last error: {msg}",
                    humantime::format_duration(horizon)
                ))
            } else {
                let (base, max) = (settings.backoff_base, settings.backoff_max);
                let delay = backoff(attempts, base, max, random);
                let at = now.saturating_add(duration_ms(delay)).min(deadline);
                Plan::Retry { at, error: msg }
            }
        }
    }
}

/// The wait before retry number `attempts` (1 = after the first failure): `base · 2^(attempts−1)`
/// capped at `max`, then "equal jitter": half of it fixed, the other half uniformly random, so
/// retries of many events spread out but never come sooner than half the nominal delay.
pub(crate) fn backoff(attempts: u32, base: Duration, max: Duration, random: u64) -> Duration {
    let exp = attempts.saturating_sub(1);
    let nominal = if exp >= 32 {
        max
    } else {
        base.checked_mul(1u32 << exp).map_or(max, |d| d.min(max))
    };
    let ms = u64::try_from(nominal.as_millis()).unwrap_or(u64::MAX);
    let half = ms / 2;
    let jitter = if ms - half == 0 {
        0
    } else {
        random % (ms - half + 1)
    };
    Duration::from_millis(half + jitter)
}

/// A hasher for the spool's own keys: event ids (sequential) and de-duplication keys (SHA-256
/// outputs). Each 8 bytes are mixed in with a multiply (hashbrown takes its tags from the top
/// bits, so sequential ids must not map to one tag). std's SipHash defends maps keyed by what
/// a client chooses; an id is the spool's and a key is a hash, so it bought nothing here
/// (this hasher saved ~1.4k instructions per event, bench/cost.sh).
#[derive(Clone, Copy, Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by event ids or de-duplication keys (see [`IdHasher`]).
pub(crate) type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// A map keyed by routes (or the scheduler's task ids): keys the configuration and the spool
/// choose, never a client, so foldhash's speed instead of SipHash's resistance to chosen keys.
pub(crate) type RouteMap<K, V> = foldhash::HashMap<K, V>;

/// splitmix64, seeded from std's per-process random hasher keys: jitter needs no crypto and no
/// extra dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn seeded() -> Rng {
        use std::hash::BuildHasher;
        let seed =
            std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------------
// Time

/// Milliseconds since the Unix epoch; times before it count as 0.
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Codec and key

/// Encodes headers as `name: value\n` lines (readable in the `sqlite3` CLI). `http`'s types
/// guarantee what the form needs: names free of `:`, whitespace and controls, values free of
/// CR, LF and NUL.
pub(crate) fn encode_headers(headers: &http::HeaderMap) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 3)
        .sum();
    let mut out = Vec::with_capacity(size);
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The inverse of [`encode_headers`]. A line that is not a valid header (only a database
/// edited by hand holds one) is left out.
pub(crate) fn decode_headers(bytes: &[u8]) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
        let rest = line.get(colon + 1..).unwrap_or_default();
        let value = rest.strip_prefix(b" ").unwrap_or(rest);
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    headers
}

/// The de-duplication key: SHA-256 over the route's length (8 bytes, big-endian), the route,
/// and the raw body — unambiguous, so no (route, body) pair can collide with another.
pub(crate) fn dedupe_key(route: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((route.len() as u64).to_be_bytes());
    h.update(route.as_bytes());
    h.update(body);
    h.finalize().into()
}

/// An event's key: by its update's identity when it has one, else by its body. The update
/// form starts with a tag no route length can spell (a route is never 2^63 bytes long).
pub(crate) fn event_key(event: &NewEvent) -> [u8; 32] {
    match &event.update_key {
        None => dedupe_key(&event.route, &event.body),
        Some(update) => {
            let mut h = Sha256::new();
            h.update(u64::MAX.to_be_bytes());
            h.update(b"update\0");
            h.update((event.route.len() as u64).to_be_bytes());
            h.update(event.route.as_bytes());
            h.update(update);
            h.finalize().into()
        }
    }
}

/// An event's state in the spool. A delivered event is no longer in the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventState {
    /// Waiting for its (next) attempt.
    Pending,
    /// Being delivered now (or was, when a process died: it is pending again on the next start).
    InFlight,
    /// Given up on: a permanent failure, or the retry horizon passed. Kept until purged.
    Dead,
}

impl EventState {
    /// The name stored in the `state` column: `pending`, `in_flight` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Pending => "pending",
            EventState::InFlight => "in_flight",
            EventState::Dead => "dead",
        }
    }
}

impl std::fmt::Display for EventState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventState {
    type Err = String;
    /// Accepts `pending`, `in_flight` (or `in-flight`) and `dead`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(EventState::Pending),
            "in_flight" | "in-flight" => Ok(EventState::InFlight),
            "dead" => Ok(EventState::Dead),
            _ => Err(format!(
                "unknown state {s:?} (expected pending, in_flight or dead)"
            )),
        }
    }
}

/// One route's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSummary {
    /// The route's path.
    pub route: String,
    pub pending: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// When the oldest undelivered (pending or in-flight) event was received.
    pub oldest_undelivered: Option<SystemTime>,
    /// When the oldest dead event was received.
    pub oldest_dead: Option<SystemTime>,
}

/// What `hubgate spool summary` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// One entry per route that has events, by route.
    pub routes: Vec<RouteSummary>,
    /// Keys in the de-duplication table (accepted within the window, or not yet pruned).
    pub dedupe_keys: u64,
}

impl Summary {
    /// Assembles the summary from `(route, state, count, oldest received_ms)` rows ordered by
    /// route, as both engines' `GROUP BY route, state` return them.
    pub(crate) fn from_counts(
        rows: impl IntoIterator<Item = (String, EventState, u64, i64)>,
        dedupe_keys: u64,
    ) -> Summary {
        let mut summary = Summary {
            routes: Vec::new(),
            dedupe_keys,
        };
        for (route, state, count, oldest) in rows {
            summary.add(&route, state, count, oldest);
        }
        summary
    }

    /// Adds `count` events of `route` in `state`, the oldest received at `oldest` (Unix ms).
    pub(crate) fn add(&mut self, route: &str, state: EventState, count: u64, oldest: i64) {
        let at = match self
            .routes
            .binary_search_by(|r| r.route.as_str().cmp(route))
        {
            Ok(at) => at,
            Err(at) => {
                self.routes.insert(
                    at,
                    RouteSummary {
                        route: route.to_owned(),
                        pending: 0,
                        in_flight: 0,
                        dead: 0,
                        oldest_undelivered: None,
                        oldest_dead: None,
                    },
                );
                at
            }
        };
        let entry = &mut self.routes[at];
        let oldest = from_unix_ms(oldest);
        let earliest = |cur: Option<SystemTime>| Some(cur.map_or(oldest, |c| c.min(oldest)));
        match state {
            EventState::Pending => {
                entry.pending += count;
                entry.oldest_undelivered = earliest(entry.oldest_undelivered);
            }
            EventState::InFlight => {
                entry.in_flight += count;
                entry.oldest_undelivered = earliest(entry.oldest_undelivered);
            }
            EventState::Dead => {
                entry.dead += count;
                entry.oldest_dead = earliest(entry.oldest_dead);
            }
        }
    }
}

/// One event, without its headers and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventInfo {
    pub id: i64,
    pub route: String,
    pub state: EventState,
    /// Delivery attempts started so far.
    pub attempts: u32,
    pub received_at: SystemTime,
    /// When the next attempt is due (meaningful while pending).
    pub next_attempt_at: SystemTime,
    /// The last state change.
    pub updated_at: SystemTime,
    /// Why the last attempt failed, or why the event is dead.
    pub last_error: Option<String>,
    pub client_identity: Option<String>,
    pub body_len: u64,
}

/// One event in full, for `hubgate spool show`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventDetail {
    pub info: EventInfo,
    /// The request's query string, appended to the upstream URL on delivery.
    pub query: Option<String>,
    /// The headers that are forwarded, in order.
    pub headers: http::HeaderMap,
    /// The raw body, byte for byte.
    pub body: Bytes,
}

/// Which events `list` returns, by ascending id.
#[derive(Clone, Debug)]
pub struct ListFilter {
    pub route: Option<String>,
    pub state: Option<EventState>,
    /// Only ids greater than this (for paging).
    pub after_id: Option<i64>,
    /// At most this many (default 100).
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            route: None,
            state: None,
            after_id: None,
            limit: 100,
        }
    }
}

/// What `replay` puts back in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayTarget {
    /// One dead event; an error if it does not exist or is not dead.
    One(i64),
    /// Every dead event, of one route or of all.
    AllDead { route: Option<String> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_and_keys_spread_over_the_hash_s_top_and_low_bits() {
        use std::hash::BuildHasher;
        let build = std::hash::BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (0..4096i64).map(|id| build.hash_one(id)).collect();
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
        assert_eq!(tags.len(), 128, "hashbrown's 7-bit tags");
        assert!(buckets.len() > 2500, "{} of 4096 buckets", buckets.len());
        // Keys differing only in their last byte hash apart.
        let key = |last: u8| {
            let mut k = [7u8; 32];
            k[31] = last;
            build.hash_one(k)
        };
        assert_ne!(key(1), key(2));
    }

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let mut rng = Rng::seeded();
        for attempts in 1..80u32 {
            let nominal = if attempts > 12 {
                max
            } else {
                (base * 2u32.pow(attempts - 1)).min(max)
            };
            for _ in 0..50 {
                let d = backoff(attempts, base, max, rng.next());
                assert!(
                    d >= nominal / 2,
                    "attempt {attempts}: {d:?} < {nominal:?}/2"
                );
                assert!(d <= nominal, "attempt {attempts}: {d:?} > {nominal:?}");
            }
        }
        assert_eq!(backoff(1, Duration::ZERO, max, 7), Duration::ZERO);
    }

    #[test]
    fn rng_varies() {
        let mut r = Rng::seeded();
        let a = r.next();
        let b = r.next();
        assert_ne!(a, b);
    }
}
