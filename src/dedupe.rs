//! In-memory de-duplication for `delivery = "sync"` routes: Meta retries, and WhatsApp sends to
//! every subscribed app, so the same event arrives more than once. A body that a route already
//! delivered (upstream answered 2xx) within the window is answered 200 and not forwarded again.
//!
//! Key: the route and the verified signature MAC, which identifies the raw body under the app
//! secret without hashing it a second time. Bounded: at most `max_entries` keys, the oldest
//! forgotten first; keys older than the window are forgotten too. Lost on restart: spool routes
//! keep their keys on disk instead.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::RouteLabel;

type Key = (RouteLabel, [u8; 32]);

/// The keys delivered recently.
pub struct RecentDeliveries {
    window: Duration,
    max_entries: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// foldhash rather than SipHash: the keys are MACs under the app secret, which nobody
    /// without the secret can choose, and the lookup is on every forwarded request.
    seen: foldhash::HashMap<Key, Instant>,
    order: VecDeque<(Key, Instant)>,
}

impl RecentDeliveries {
    pub fn new(window: Duration, max_entries: usize) -> RecentDeliveries {
        RecentDeliveries {
            window,
            max_entries,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether this route delivered a body with this MAC within the window.
    pub fn contains(&self, route: &RouteLabel, mac: &[u8; 32]) -> bool {
        let inner = self.inner.lock().expect("dedupe lock");
        inner
            .seen
            .get(&(route.clone(), *mac))
            .is_some_and(|at| at.elapsed() < self.window)
    }

    /// Remembers a delivered body.
    pub fn insert(&self, route: &RouteLabel, mac: &[u8; 32]) {
        let now = Instant::now();
        let key = (route.clone(), *mac);
        let mut inner = self.inner.lock().expect("dedupe lock");
        // Forget what is too old or too many, oldest first.
        while let Some((_, at)) = inner.order.front() {
            if now.duration_since(*at) < self.window && inner.order.len() < self.max_entries {
                break;
            }
            let (old, at) = inner.order.pop_front().expect("front exists");
            if inner.seen.get(&old) == Some(&at) {
                inner.seen.remove(&old);
            }
        }
        inner.seen.insert(key.clone(), now);
        inner.order.push_back((key, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn remembers_within_window_and_bound() {
        let d = RecentDeliveries::new(Duration::from_secs(60), 2);
        let r: RouteLabel = Arc::new("/w".into());
        let other: RouteLabel = Arc::new("/x".into());
        d.insert(&r, &[1; 32]);
        assert!(d.contains(&r, &[1; 32]));
        assert!(!d.contains(&other, &[1; 32]), "keys are per route");
        d.insert(&r, &[2; 32]);
        d.insert(&r, &[3; 32]);
        assert!(
            !d.contains(&r, &[1; 32]),
            "oldest forgotten past max_entries"
        );
        assert!(d.contains(&r, &[3; 32]));
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
