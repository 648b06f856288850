//! In-memory de-duplication for `delivery = "sync"` routes: Meta retries, and WhatsApp sends to
//! every subscribed app, so the same event arrives more than once. A body that a route already
//! delivered (upstream answered 2xx) within the window is answered 200 and not forwarded again.
//!
//! Key: the route and the verified signature MAC, which identifies the raw body under the app
//! secret without hashing it a second time. Bounded: at most `max_entries` keys, the oldest
//! forgotten first; keys older than the window are forgotten too. Lost on restart: spool routes
//! keep their keys on disk instead.
//!
//! The table is split into up to 16 shards, each with its own lock and its share of
//! `max_entries`, so that worker threads forwarding at once do not queue on one lock. "Oldest
//! first" holds within a shard; keys spread evenly (they are MACs), so the shards fill alike.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::metrics::RouteLabel;
use crate::spool::Spool;

/// Where sync routes remember what they delivered: this process's memory, or the shared
/// PostgreSQL spool (`[dedupe] store = "postgres"`), where a retry that reaches another gate
/// is recognised too. A shared store that cannot be asked counts as "not seen": the event is
/// forwarded (at least once), never dropped.
pub enum Recent {
    Memory(RecentDeliveries),
    Shared { spool: Spool, window: Duration },
}

impl Recent {
    /// Whether this route delivered a body with this MAC within the window.
    pub async fn contains(&self, route: &RouteLabel, mac: &[u8; 32]) -> bool {
        match self {
            Recent::Memory(m) => m.contains(route, mac),
            Recent::Shared { spool, window } => {
                match spool
                    .recently_delivered(shared_key(route, mac), *window)
                    .await
                {
                    Ok(seen) => seen,
                    Err(e) => {
                        warn!(error = %e, "sync de-duplication: cannot ask the shared store; forwarding");
                        false
                    }
                }
            }
        }
    }

    /// Remembers a delivered body.
    pub async fn insert(&self, route: &RouteLabel, mac: &[u8; 32]) {
        match self {
            Recent::Memory(m) => m.insert(route, mac),
            Recent::Shared { spool, .. } => {
                if let Err(e) = spool.remember_delivery(shared_key(route, mac)).await {
                    warn!(error = %e, "sync de-duplication: cannot remember a delivery in the shared store");
                }
            }
        }
    }
}

/// A sync delivery's key in the shared table: domain-separated from the spool's own keys
/// (SHA-256 of route and body), so the two never collide.
fn shared_key(route: &RouteLabel, mac: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hubgate sync dedupe\0");
    h.update((route.len() as u64).to_be_bytes());
    h.update(route.as_bytes());
    h.update(mac);
    h.finalize().into()
}

/// 128 bits of the MAC, with the route folded in. Two different bodies (or routes) share a key
/// with probability 2^-128; half the MAC keeps the table small enough to stay in cache.
type Key = u128;

/// The keys delivered recently.
pub struct RecentDeliveries {
    window: Duration,
    /// Entries per shard.
    max_entries: usize,
    /// Times are milliseconds since this.
    epoch: Instant,
    shards: Box<[Mutex<Inner>]>,
}

const MAX_SHARDS: usize = 16;

#[derive(Default)]
struct Inner {
    /// Key → (when, insertion number). foldhash rather than SipHash: the keys are MACs under
    /// the app secret, which nobody without the secret can choose, and the lookup is on every
    /// forwarded request.
    seen: foldhash::HashMap<Key, (u64, u64)>,
    /// (key, when, insertion number), oldest first. The number tells a key's current entry
    /// from an older one for the same key, also within one millisecond.
    order: VecDeque<(Key, u64, u64)>,
    inserted: u64,
}

/// The route's path (FNV-1a: stable across restarts and reloads) mixed into the MAC's first
/// 16 bytes: the same body signed with the same secret on two routes gives two keys.
fn key(route: &RouteLabel, mac: &[u8; 32]) -> Key {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in route.as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut half = [0u8; 16];
    half.copy_from_slice(&mac[..16]);
    u128::from_le_bytes(half) ^ u128::from(h)
}

impl RecentDeliveries {
    pub fn new(window: Duration, max_entries: usize) -> RecentDeliveries {
        let shards = max_entries.clamp(1, MAX_SHARDS);
        RecentDeliveries {
            window,
            max_entries: (max_entries / shards).max(1),
            epoch: Instant::now(),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: Key) -> &Mutex<Inner> {
        // The high bits: pure MAC, untouched by the route.
        let i = (key >> 96) as usize % self.shards.len();
        &self.shards[i]
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this route delivered a body with this MAC within the window.
    pub fn contains(&self, route: &RouteLabel, mac: &[u8; 32]) -> bool {
        let key = key(route, mac);
        let now = self.now_ms();
        let inner = self.shard(key).lock().expect("dedupe lock");
        inner
            .seen
            .get(&key)
            .is_some_and(|(at, _)| now.saturating_sub(*at) < self.window_ms())
    }

    /// Remembers a delivered body.
    pub fn insert(&self, route: &RouteLabel, mac: &[u8; 32]) {
        let key = key(route, mac);
        let now = self.now_ms();
        let window = self.window_ms();
        let mut inner = self.shard(key).lock().expect("dedupe lock");
        // Forget what is too old or too many, oldest first.
        while let Some((_, at, _)) = inner.order.front() {
            if now.saturating_sub(*at) < window && inner.order.len() < self.max_entries {
                break;
            }
            let (old, _, n) = inner.order.pop_front().expect("front exists");
            if inner
                .seen
                .get(&old)
                .is_some_and(|(_, current)| *current == n)
            {
                inner.seen.remove(&old);
            }
        }
        inner.inserted += 1;
        let n = inner.inserted;
        inner.seen.insert(key, (now, n));
        inner.order.push_back((key, now, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn remembers_within_window_and_bound() {
        // Two entries: two shards of one each. [1; 32] and [3; 32] share a shard (high bits
        // 0x01010101 and 0x03030303 are both odd), [2; 32] is in the other.
        let d = RecentDeliveries::new(Duration::from_secs(60), 2);
        let r: RouteLabel = Arc::new("/w".into());
        let other: RouteLabel = Arc::new("/x".into());
        d.insert(&r, &[1; 32]);
        assert!(d.contains(&r, &[1; 32]));
        assert!(!d.contains(&other, &[1; 32]), "keys are per route");
        d.insert(&r, &[2; 32]);
        assert!(
            d.contains(&r, &[1; 32]),
            "another shard's key takes no room"
        );
        d.insert(&r, &[3; 32]);
        assert!(
            !d.contains(&r, &[1; 32]),
            "oldest forgotten past max_entries"
        );
        assert!(d.contains(&r, &[3; 32]));
        assert!(d.contains(&r, &[2; 32]));
    }

    #[test]
    fn never_holds_more_than_max_entries() {
        let d = RecentDeliveries::new(Duration::from_secs(60), 100);
        let r: RouteLabel = Arc::new("/w".into());
        for n in 0..1000u32 {
            let mut mac = [0u8; 32];
            mac[..4].copy_from_slice(&n.to_le_bytes());
            mac[12..16].copy_from_slice(&n.wrapping_mul(2_654_435_761).to_le_bytes());
            d.insert(&r, &mac);
        }
        let held: usize = d.shards.iter().map(|s| s.lock().unwrap().seen.len()).sum();
        assert!((90..=100).contains(&held), "{held} entries held");
    }

    #[test]
    fn a_key_inserted_again_lives_on_when_its_older_entry_goes() {
        // One shard of two entries: [1; 32] twice (same millisecond, most likely), then
        // another key pushes the older entry of [1; 32] out; the newer one must stay.
        let d = RecentDeliveries::new(Duration::from_secs(60), 1);
        let r: RouteLabel = Arc::new("/w".into());
        let d = RecentDeliveries {
            max_entries: 2,
            ..d
        };
        d.insert(&r, &[1; 32]);
        d.insert(&r, &[1; 32]);
        d.insert(&r, &[2; 32]);
        assert!(d.contains(&r, &[1; 32]));
        assert!(d.contains(&r, &[2; 32]));
    }

    #[test]
    fn forgets_after_window() {
        let d = RecentDeliveries::new(Duration::from_millis(1), 10);
        let r: RouteLabel = Arc::new("/w".into());
        d.insert(&r, &[1; 32]);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!d.contains(&r, &[1; 32]));
    }
}
