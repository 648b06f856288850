//! The spool's tests: real SQLite files in a temporary folder, a fake [`Deliver`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use super::*;

fn settings(dir: &tempfile::TempDir) -> SpoolSettings {
    let mut s = SpoolSettings::new(dir.path().join("spool.db"));
    s.backoff_base = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(40);
    s.poll_interval = Duration::from_millis(50);
    s.shutdown_grace = Duration::from_secs(2);
    s
}

fn event(route: &str, body: &str) -> NewEvent {
    NewEvent {
        route: route.to_owned(),
        body: Bytes::from(body.to_owned()),
        headers: http::HeaderMap::from_iter([
            (
                http::header::CONTENT_TYPE,
                "application/json".parse().unwrap(),
            ),
            (
                http::HeaderName::from_static("x-hub-signature-256"),
                "sha256=00ff".parse().unwrap(),
            ),
            (
                http::HeaderName::from_static("x-forwarded-for"),
                "192.0.2.7".parse().unwrap(),
            ),
        ]),
        query: Some("a=1".to_owned()),
        client_identity: Some("client.webhooks.fbclientcerts.com".to_owned()),
        received_at: SystemTime::now(),
        update_key: None,
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn eventually_summary(spool: &Spool, what: &str, cond: impl Fn(&Summary) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = spool.summary().await.unwrap();
        if cond(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}; last summary {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn route_summary<'a>(s: &'a Summary, route: &str) -> Option<&'a RouteSummary> {
    s.routes.iter().find(|r| r.route == route)
}

/// A backend whose answer is scripted per call; records every attempt.
struct Fake {
    script: Box<dyn Fn(&StoredEvent) -> DeliveryOutcome + Send + Sync>,
    calls: Mutex<Vec<(i64, u32, Bytes)>>,
    delay: Duration,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl Fake {
    fn new(script: impl Fn(&StoredEvent) -> DeliveryOutcome + Send + Sync + 'static) -> Arc<Fake> {
        Fake::slow(Duration::ZERO, script)
    }

    /// A backend that takes `delay` to answer each attempt.
    fn slow(
        delay: Duration,
        script: impl Fn(&StoredEvent) -> DeliveryOutcome + Send + Sync + 'static,
    ) -> Arc<Fake> {
        Arc::new(Fake {
            script: Box::new(script),
            calls: Mutex::new(Vec::new()),
            delay,
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> Vec<(i64, u32, Bytes)> {
        self.calls.lock().unwrap().clone()
    }

    fn ids(&self) -> Vec<i64> {
        self.calls().iter().map(|c| c.0).collect()
    }
}

impl Deliver for Fake {
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> Pin<Box<dyn Future<Output = DeliveryOutcome> + Send + 'a>> {
        Box::pin(async move {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.calls
                .lock()
                .unwrap()
                .push((event.id, event.attempt, event.body.clone()));
            self.running.fetch_sub(1, Ordering::SeqCst);
            (self.script)(event)
        })
    }
}

/// A backend that never answers.
struct Hang;

impl Deliver for Hang {
    fn deliver<'a>(
        &'a self,
        _event: &'a StoredEvent,
    ) -> Pin<Box<dyn Future<Output = DeliveryOutcome> + Send + 'a>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn accept_stores_and_dedupes_per_route() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let a = spool.accept(event("/a", "{\"x\":1}")).await.unwrap();
    let Accepted::Stored(id) = a else {
        panic!("{a:?}")
    };
    assert_eq!(
        spool.accept(event("/a", "{\"x\":1}")).await.unwrap(),
        Accepted::Duplicate
    );
    // Same body on another route, and another body on the same route: new events.
    assert!(matches!(
        spool.accept(event("/b", "{\"x\":1}")).await.unwrap(),
        Accepted::Stored(_)
    ));
    assert!(matches!(
        spool.accept(event("/a", "{\"x\":2}")).await.unwrap(),
        Accepted::Stored(_)
    ));
    let stats = spool.stats();
    assert_eq!((stats.accepted, stats.duplicates), (3, 1));

    // What is on disk, read by a second connection as `hubgate spool` would.
    let ops = SpoolOps::open(&spool.settings().path).unwrap();
    let shown = ops.show(id).unwrap();
    assert_eq!(shown.body, Bytes::from_static(b"{\"x\":1}"));
    assert_eq!(shown.headers, event("/a", "").headers);
    assert_eq!(shown.query.as_deref(), Some("a=1"));
    assert_eq!(shown.info.state, EventState::Pending);
    assert_eq!(shown.info.attempts, 0);
    assert_eq!(
        shown.info.client_identity.as_deref(),
        Some("client.webhooks.fbclientcerts.com")
    );
    let summary = ops.summary().unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().pending, 2);
    assert_eq!(route_summary(&summary, "/b").unwrap().pending, 1);
    assert!(route_summary(&summary, "/a")
        .unwrap()
        .oldest_undelivered
        .is_some());
    assert_eq!(summary.dedupe_keys, 3);

    // The key survives a restart.
    spool.close().await;
    let spool = Spool::open(settings(&dir)).unwrap();
    assert_eq!(
        spool.accept(event("/a", "{\"x\":1}")).await.unwrap(),
        Accepted::Duplicate
    );
}

#[tokio::test]
async fn keys_merged_into_fewer_runs_still_recognise_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    // Before deliveries start, each accept awaited alone is a batch of its own, and its key a
    // run of its own: 40 runs, merged eight at a time by the merger thread.
    for i in 0..40 {
        let e = event("/a", &format!("merged {i}"));
        assert!(matches!(spool.accept(e).await, Ok(Accepted::Stored(_))));
    }
    let db = rusqlite::Connection::open(&spool.settings().path).unwrap();
    let runs = || -> (i64, i64, i64) {
        db.query_row(
            "SELECT count(*), coalesce(max(level), 0), coalesce(sum(keys), 0) FROM key_runs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    eventually("the runs merged", || runs().0 <= 8).await;
    let (count, level, keys) = runs();
    assert_eq!((level, keys), (1, 40), "{count} runs");
    for i in 0..40 {
        let e = event("/a", &format!("merged {i}"));
        assert_eq!(spool.accept(e).await.unwrap(), Accepted::Duplicate, "{i}");
    }
    assert_eq!(spool.summary().await.unwrap().dedupe_keys, 40);
    // Loaded again from the runs by the next gate.
    spool.close().await;
    let spool = Spool::open(settings(&dir)).unwrap();
    for i in (0..40).step_by(7) {
        let e = event("/a", &format!("merged {i}"));
        assert_eq!(spool.accept(e).await.unwrap(), Accepted::Duplicate, "{i}");
    }
    let e = event("/a", "merged 40");
    assert!(matches!(spool.accept(e).await, Ok(Accepted::Stored(_))));
}

#[tokio::test]
async fn dedupe_window_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.dedupe_window = Duration::from_secs(1);
    let spool = Spool::open(s).unwrap();
    assert!(matches!(
        spool.accept(event("/a", "same")).await.unwrap(),
        Accepted::Stored(_)
    ));
    assert_eq!(
        spool.accept(event("/a", "same")).await.unwrap(),
        Accepted::Duplicate
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        spool.accept(event("/a", "same")).await.unwrap(),
        Accepted::Stored(_)
    ));
    assert_eq!(
        spool.accept(event("/a", "same")).await.unwrap(),
        Accepted::Duplicate
    );
}

#[tokio::test]
async fn zero_window_turns_dedupe_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.dedupe_window = Duration::ZERO;
    let spool = Spool::open(s).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            spool.accept(event("/a", "same")).await.unwrap(),
            Accepted::Stored(_)
        ));
    }
    assert_eq!(spool.summary().await.unwrap().dedupe_keys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_accepts_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let n = 300;
    let mut tasks = Vec::new();
    for i in 0..n {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            spool.accept(event("/a", &format!("event {i}"))).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Accepted::Stored(id) => ids.push(id),
            Accepted::Duplicate => panic!("distinct bodies are not duplicates"),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n);
    let stats = spool.stats();
    assert_eq!(stats.accepted, n as u64);
    assert!(
        stats.commits < n as u64,
        "group commit: {} commits for {n} events",
        stats.commits
    );
    let summary = spool.summary().await.unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().pending, n as u64);
}

#[tokio::test]
async fn events_delivered_as_they_come_skip_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    // No periodic search of the queue during the test.
    s.poll_interval = Duration::from_secs(3600);
    let spool = Spool::open(s).unwrap();
    let fake = Fake::new(|_| DeliveryOutcome::Done);
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    // The scheduler's first claim searches the queue (what a previous process left).
    eventually("the first claim", || spool.stats().jobs >= 1).await;
    let n = 40;
    for i in 0..n {
        spool.accept(event("/a", &format!("e{i}"))).await.unwrap();
        eventually("delivered", || spool.stats().delivered == i + 1).await;
    }
    // Each event: the accept and the outcome; no claim in between, no read back.
    let jobs = spool.stats().jobs;
    assert!(jobs <= 2 * n + 1, "{jobs} writer jobs for {n} events");
    let calls = fake.calls();
    assert_eq!(calls.len(), n as usize);
    for (i, (_, attempt, body)) in calls.iter().enumerate() {
        assert_eq!((*attempt, &body[..]), (1, format!("e{i}").as_bytes()));
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    let summary = spool.summary().await.unwrap();
    assert!(route_summary(&summary, "/a").is_none_or(|r| r.pending + r.in_flight == 0));
    assert_eq!(summary.dedupe_keys, n);
    // Delivered from the intake journal: none of them ever became a row; their keys reach the
    // file with the next absorb.
    let db = rusqlite::Connection::open(&spool.settings().path).unwrap();
    let count = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(
        count("SELECT count(*) FROM sqlite_sequence WHERE name = 'events'"),
        0,
        "no row was ever inserted"
    );
    eventually("the keys absorbed", || {
        count("SELECT coalesce(sum(keys), 0) FROM key_runs") == n as i64
    })
    .await;
    assert_eq!(count("SELECT count(*) FROM events"), 0);
}

#[tokio::test]
async fn duplicates_in_one_batch_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let results =
        futures_join_all((0..20).map(|_| spool.accept(event("/a", "the same body")))).await;
    let stored = results
        .iter()
        .filter(|r| matches!(r, Ok(Accepted::Stored(_))))
        .count();
    let dups = results
        .iter()
        .filter(|r| matches!(r, Ok(Accepted::Duplicate)))
        .count();
    assert_eq!((stored, dups), (1, 19));
}

/// A minimal join_all (no futures crate): polls all futures concurrently on this task.
async fn futures_join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

#[tokio::test]
async fn retries_with_backoff_then_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let fake = Fake::new(|e| {
        if e.attempt <= 2 {
            DeliveryOutcome::Retry("backend answered 503".to_owned())
        } else {
            DeliveryOutcome::Done
        }
    });
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    let Accepted::Stored(id) = spool.accept(event("/a", "retry me")).await.unwrap() else {
        panic!()
    };
    eventually("delivered", || spool.stats().delivered == 1).await;
    let calls = fake.calls();
    assert_eq!(
        calls.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
        vec![(id, 1), (id, 2), (id, 3)]
    );
    assert_eq!(calls[2].2, Bytes::from_static(b"retry me"));
    assert_eq!(spool.stats().retried, 2);
    // Delivered events leave the spool, but their key stays.
    let summary = spool.summary().await.unwrap();
    assert!(summary.routes.is_empty(), "{summary:?}");
    assert_eq!(
        spool.accept(event("/a", "retry me")).await.unwrap(),
        Accepted::Duplicate
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn permanent_failure_dead_letters_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let fake = Fake::new(|_| outcome_for_status(http::StatusCode::UNPROCESSABLE_ENTITY, true));
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    let Accepted::Stored(id) = spool.accept(event("/a", "bad")).await.unwrap() else {
        panic!()
    };
    eventually("dead-lettered", || spool.stats().dead_lettered == 1).await;
    let dead = spool
        .list(ListFilter {
            state: Some(EventState::Dead),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("backend answered 422"));
    assert_eq!(fake.calls().len(), 1);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn retries_stop_at_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.retry_horizon = Duration::from_millis(300);
    let spool = Spool::open(s).unwrap();
    let fake = Fake::new(|_| DeliveryOutcome::Retry("connection refused".to_owned()));
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    spool.accept(event("/a", "never lands")).await.unwrap();
    eventually("dead after the horizon", || {
        spool.stats().dead_lettered == 1
    })
    .await;
    let dead = spool
        .list(ListFilter {
            state: Some(EventState::Dead),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let error = dead[0].last_error.as_deref().unwrap();
    assert!(error.contains("retry horizon"), "{error}");
    assert!(error.contains("connection refused"), "{error}");
    let attempts = fake.calls().len();
    // The first, and the last at the horizon; more in between on a machine that keeps up.
    assert!(attempts >= 2, "only {attempts} attempts in the horizon");
    assert_eq!(dead[0].attempts as usize, attempts);
    // It is not retried any more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.calls().len(), attempts);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn in_flight_events_are_resumed_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        if let Accepted::Stored(id) = spool.accept(event("/a", &format!("e{i}"))).await.unwrap() {
            ids.push(id);
        }
    }
    // Claimed as if deliveries had started, then the process "dies" before any outcome.
    let claimed = spool.inner.store.claim(&Default::default()).await.unwrap();
    assert_eq!(claimed.events.len(), 3);
    let summary = spool.summary().await.unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().in_flight, 3);
    spool.close().await;

    let spool = Spool::open(settings(&dir)).unwrap();
    let summary = spool.summary().await.unwrap();
    let r = route_summary(&summary, "/a").unwrap();
    assert_eq!((r.pending, r.in_flight), (3, 0));
    let fake = Fake::new(|_| DeliveryOutcome::Done);
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    eventually("all delivered", || spool.stats().delivered == 3).await;
    let mut seen: Vec<(i64, u32)> = fake.calls().iter().map(|c| (c.0, c.1)).collect();
    seen.sort_unstable();
    // Attempt 2: the interrupted one counts.
    assert_eq!(seen, ids.iter().map(|&id| (id, 2)).collect::<Vec<_>>());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn replay_and_purge_dead_events() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let fake = {
        let fixed = fixed.clone();
        Fake::new(move |_| {
            if fixed.load(Ordering::SeqCst) {
                DeliveryOutcome::Done
            } else {
                DeliveryOutcome::Permanent("backend answered 400".to_owned())
            }
        })
    };
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    let mut ids = Vec::new();
    for (route, body) in [("/a", "1"), ("/a", "2"), ("/b", "3")] {
        if let Accepted::Stored(id) = spool.accept(event(route, body)).await.unwrap() {
            ids.push(id);
        }
    }
    eventually("all dead", || spool.stats().dead_lettered == 3).await;

    // Errors: unknown id; replaying a non-dead event is checked below.
    assert!(matches!(
        spool.replay(ReplayTarget::One(9999)).await,
        Err(SpoolError::NotFound(9999))
    ));
    fixed.store(true, Ordering::SeqCst);
    assert_eq!(spool.replay(ReplayTarget::One(ids[0])).await.unwrap(), 1);
    eventually("replayed one delivered", || spool.stats().delivered == 1).await;
    assert!(matches!(
        spool.replay(ReplayTarget::One(ids[0])).await,
        Err(SpoolError::NotFound(_))
    ));

    // Purge: nothing is older than an hour; everything dead on /b is older than zero.
    assert_eq!(
        spool
            .purge_dead(Duration::from_secs(3600), None)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        spool
            .purge_dead(Duration::ZERO, Some("/b".to_owned()))
            .await
            .unwrap(),
        1
    );
    let summary = spool.summary().await.unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().dead, 1);
    assert!(route_summary(&summary, "/b").is_none());

    // Replay all (through the standalone API, as the CLI does): the gate picks it up by polling.
    let ops = SpoolOps::open(&spool.settings().path).unwrap();
    assert_eq!(
        ops.replay(&ReplayTarget::AllDead { route: None }).unwrap(),
        1
    );
    eventually("replayed all delivered", || spool.stats().delivered == 2).await;
    assert!(spool.summary().await.unwrap().routes.is_empty());
    assert_eq!(fake.calls().last().map(|c| c.0), Some(ids[1]));
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn replaying_a_pending_event_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let Accepted::Stored(id) = spool.accept(event("/a", "x")).await.unwrap() else {
        panic!()
    };
    match spool.replay(ReplayTarget::One(id)).await {
        Err(SpoolError::NotDead { state, .. }) => assert_eq!(state, EventState::Pending),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn one_worker_delivers_in_acceptance_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.max_concurrency_per_route = 1;
    let spool = Spool::open(s).unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        if let Accepted::Stored(id) = spool.accept(event("/a", &format!("e{i}"))).await.unwrap() {
            ids.push(id);
        }
    }
    let fake = Fake::new(|_| DeliveryOutcome::Done);
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    eventually("all delivered", || spool.stats().delivered == 20).await;
    assert_eq!(fake.ids(), ids);
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 1);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded_per_route() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.max_concurrency_per_route = 3;
    let spool = Spool::open(s).unwrap();
    for i in 0..12 {
        spool.accept(event("/a", &format!("a{i}"))).await.unwrap();
    }
    let fake = Fake::slow(Duration::from_millis(30), |_| DeliveryOutcome::Done);
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    eventually("all delivered", || spool.stats().delivered == 12).await;
    let max = fake.max_running.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "max concurrent deliveries {max}");
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_leaves_unfinished_deliveries_pending() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.shutdown_grace = Duration::from_millis(100);
    let spool = Spool::open(s).unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(Arc::new(Hang), stopped);
    spool.accept(event("/a", "stuck")).await.unwrap();
    eventually_summary(&spool, "in flight", |s| {
        route_summary(s, "/a").is_some_and(|r| r.in_flight == 1)
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let summary = spool.summary().await.unwrap();
    let r = route_summary(&summary, "/a").unwrap();
    assert_eq!((r.pending, r.in_flight, r.dead), (1, 0, 0));
}

#[tokio::test]
async fn shutdown_lets_running_deliveries_finish() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let fake = Fake::slow(Duration::from_millis(300), |_| DeliveryOutcome::Done);
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    spool.accept(event("/a", "slow")).await.unwrap();
    eventually("started", || fake.max_running.load(Ordering::SeqCst) == 1).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(spool.stats().delivered, 1);
    assert!(spool.summary().await.unwrap().routes.is_empty());
}

#[tokio::test]
async fn start_up_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder").join("spool.db");
    let e = Spool::open(SpoolSettings::new(&missing)).unwrap_err();
    assert!(matches!(e, SpoolError::Folder { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("spool.db");
    let e = Spool::open(SpoolSettings::new(&under_file)).unwrap_err();
    assert!(e.to_string().contains("is not a folder"), "{e}");

    let not_db = dir.path().join("not-a-db");
    std::fs::write(&not_db, vec![b'x'; 4096]).unwrap();
    let e = Spool::open(SpoolSettings::new(&not_db)).unwrap_err();
    assert!(matches!(e, SpoolError::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("not-a-db"), "{e}");

    let e = SpoolOps::open(&dir.path().join("nothing.db")).unwrap_err();
    assert!(e.to_string().contains("nothing.db"), "{e}");

    let mut bad = SpoolSettings::new(dir.path().join("s.db"));
    bad.max_concurrency_per_route = 0;
    assert!(matches!(
        Spool::open(bad).unwrap_err(),
        SpoolError::Settings { .. }
    ));
}

#[tokio::test]
async fn a_second_gate_on_the_same_spool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let e = Spool::open(settings(&dir)).unwrap_err();
    assert!(matches!(e, SpoolError::InUse { .. }), "{e:?}");
    // The operations API is welcome while the gate runs.
    SpoolOps::open(&spool.settings().path)
        .unwrap()
        .summary()
        .unwrap();
    spool.close().await;
    assert!(matches!(
        spool.accept(event("/a", "late")).await,
        Err(SpoolError::Closed)
    ));
    Spool::open(settings(&dir)).unwrap();
}

#[tokio::test]
async fn a_full_spool_refuses_with_a_distinct_error_and_keeps_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.max_size_bytes = Some(256 * 1024);
    let spool = Spool::open(s.clone()).unwrap();
    let body = "x".repeat(16 * 1024);
    let mut acknowledged = 0u64;
    let mut full = None;
    for i in 0..100 {
        match spool.accept(event("/a", &format!("{i} {body}"))).await {
            Ok(Accepted::Stored(_)) => acknowledged += 1,
            Ok(Accepted::Duplicate) => panic!("distinct bodies"),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("the size limit is reached");
    assert!(e.is_full(), "{e:?}");
    assert!(e.to_string().contains("disk full"), "{e}");
    assert!(acknowledged > 0);
    assert_eq!(spool.stats().refused_full, 1);
    spool.close().await;
    let spool = Spool::open(s).unwrap();
    let summary = spool.summary().await.unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().pending, acknowledged);
}

#[tokio::test]
async fn an_event_without_a_route_is_refused_before_storing() {
    // (Headers that could not be stored cannot be made: see sql.rs's codec tests.)
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    assert!(matches!(
        spool.accept(event("", "x")).await,
        Err(SpoolError::InvalidEvent(_))
    ));
    assert!(spool.summary().await.unwrap().routes.is_empty());
}

#[tokio::test]
async fn expired_dedupe_keys_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.dedupe_window = Duration::from_millis(200);
    let spool = Spool::open(s.clone()).unwrap();
    spool.accept(event("/a", "old")).await.unwrap();
    assert_eq!(spool.summary().await.unwrap().dedupe_keys, 1);
    spool.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first batch after opening prunes (then once a minute).
    let spool = Spool::open(s).unwrap();
    spool.accept(event("/a", "new")).await.unwrap();
    assert_eq!(spool.summary().await.unwrap().dedupe_keys, 1);
    assert!(matches!(
        spool.accept(event("/a", "old")).await.unwrap(),
        Accepted::Stored(_)
    ));
}

/// A real ENOSPC, on a small file system you mount yourself, e.g.
/// `mount -t tmpfs -o size=512k tmpfs /tmp/spool-enospc`, then
/// `HUBGATE_SPOOL_ENOSPC_DIR=/tmp/spool-enospc cargo test --lib spool -- --ignored enospc`.
#[tokio::test]
#[ignore = "needs a small file system: set HUBGATE_SPOOL_ENOSPC_DIR"]
#[allow(clippy::disallowed_methods)] // the manual test's own switch, not configuration
async fn a_full_disk_is_reported_as_full() {
    let Some(dir) = std::env::var_os("HUBGATE_SPOOL_ENOSPC_DIR") else {
        return;
    };
    let dir = tempfile::tempdir_in(dir).unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let body = "y".repeat(32 * 1024);
    let mut acknowledged = 0u64;
    let e = loop {
        match spool
            .accept(event("/a", &format!("{acknowledged} {body}")))
            .await
        {
            Ok(_) => acknowledged += 1,
            Err(e) => break e,
        }
        assert!(acknowledged < 100_000, "the file system never filled up");
    };
    assert!(e.is_full(), "{e:?}");
    assert!(acknowledged > 0);
    spool.close().await;
    let ops = SpoolOps::open(&dir.path().join("spool.db")).unwrap();
    let summary = ops.summary().unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().pending, acknowledged);
}

#[cfg(unix)]
#[tokio::test]
async fn spool_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    spool.accept(event("/a", "personal data")).await.unwrap();
    for name in ["spool.db", "spool.db-wal", "spool.db-shm", "spool.db.lock"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name}: {mode:o}");
    }
}

#[tokio::test]
async fn the_parts_of_a_batch_are_stored_all_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.max_size_bytes = Some(256 * 1024);
    let spool = Spool::open(s).unwrap();
    let body = "x".repeat(40 * 1024);
    let parts = |tag: &str, n: usize| -> Vec<NewEvent> {
        (0..n)
            .map(|i| event("/a", &format!("{tag} {i} {body}")))
            .collect()
    };
    let first = spool.accept_all(parts("first", 3)).await.unwrap();
    assert!(first.iter().all(|a| matches!(a, Accepted::Stored(_))));
    // Three more fit on their own, but not with the rest of their batch: none is stored.
    let e = spool.accept_all(parts("second", 5)).await.unwrap_err();
    assert!(e.is_full(), "{e:?}");
    let summary = spool.summary().await.unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().pending, 3);
    // A batch whose new parts fit is stored; its known parts are duplicates, in order.
    let mut mixed = parts("first", 1);
    mixed.push(event("/a", "small"));
    let answers = spool.accept_all(mixed).await.unwrap();
    assert_eq!(answers[0], Accepted::Duplicate);
    assert!(matches!(answers[1], Accepted::Stored(_)));
    spool.close().await;
}

#[tokio::test]
async fn update_keys_recognise_an_update_whatever_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(&dir)).unwrap();
    let keyed = |body: &str, key: u8| NewEvent {
        update_key: Some([key; 32]),
        ..event("/a", body)
    };
    // Two parts of one batch with the same update: the second is a duplicate.
    let answers = spool
        .accept_all(vec![
            keyed("batch 1, part 1", 1),
            keyed("batch 1, part 2", 1),
        ])
        .await
        .unwrap();
    assert!(matches!(answers[0], Accepted::Stored(_)));
    assert_eq!(answers[1], Accepted::Duplicate);
    // The update again in another batch (another envelope): a duplicate; a new one is stored.
    let answers = spool
        .accept_all(vec![keyed("batch 2", 1), keyed("batch 2", 2)])
        .await
        .unwrap();
    assert_eq!(answers[0], Accepted::Duplicate);
    assert!(matches!(answers[1], Accepted::Stored(_)));
    // Keyed by update, not by body: the same body with another key is another update, and a
    // key never matches a body's own key.
    assert!(matches!(
        spool.accept(keyed("batch 2", 3)).await.unwrap(),
        Accepted::Stored(_)
    ));
    assert!(matches!(
        spool.accept(event("/a", "batch 2")).await.unwrap(),
        Accepted::Stored(_)
    ));
    // Keys are per route.
    assert!(matches!(
        spool
            .accept(NewEvent {
                update_key: Some([1; 32]),
                ..event("/b", "batch 1, part 1")
            })
            .await
            .unwrap(),
        Accepted::Stored(_)
    ));
    spool.close().await;
}

/// 20 clients, 10 events each (bodies from `body`), through 2 deliveries at a time: far more
/// than they keep up with, so a queue waits. Every event must go out with everything it came
/// with. Returns how many waited when the clients were done, the backend, and the spool (its
/// delivery stopped once all 200 went out).
async fn queue_through_two_deliveries(
    dir: &tempfile::TempDir,
    held_budget: u64,
    body: fn(usize, usize) -> String,
) -> (u64, Arc<Fake>, Spool) {
    let mut s = settings(dir);
    s.max_concurrency_per_route = 2;
    s.held_budget = held_budget;
    let spool = Spool::open(s).unwrap();
    let fake = Fake::slow(Duration::from_millis(5), |e| {
        let want = event("/a", "");
        if (&e.headers, &e.query, &e.client_identity)
            == (&want.headers, &want.query, &want.client_identity)
        {
            DeliveryOutcome::Done
        } else {
            DeliveryOutcome::Permanent(format!("sent without what it came with: {e:?}"))
        }
    });
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(fake.clone(), stopped);
    eventually("the first claim", || spool.stats().jobs >= 1).await;
    let clients = (0..20).map(|c| {
        let spool = spool.clone();
        tokio::spawn(async move {
            for i in 0..10 {
                let e = event("/a", &body(c, i));
                assert!(matches!(spool.accept(e).await, Ok(Accepted::Stored(_))));
            }
        })
    });
    for c in clients.collect::<Vec<_>>() {
        c.await.unwrap();
    }
    let waiting = route_summary(&spool.summary().await.unwrap(), "/a").map_or(0, |r| r.pending);
    eventually("all delivered", || spool.stats().delivered == 200).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(fake.max_running.load(Ordering::SeqCst) <= 2);
    (waiting, fake, spool)
}

/// Events that became rows in the spool's file (ever: `sqlite_sequence` keeps the highest id).
fn rows_made(spool: &Spool) -> i64 {
    let db = rusqlite::Connection::open(&spool.settings().path).unwrap();
    db.query_row(
        "SELECT count(*) FROM sqlite_sequence WHERE name = 'events'",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_waiting_for_delivery_room_stays_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (waiting, _, spool) =
        queue_through_two_deliveries(&dir, crate::spool::sqlite::HELD_BUDGET, |c, i| {
            format!("c{c}-{i}")
        })
        .await;
    assert_eq!(
        rows_made(&spool),
        0,
        "no event became a row ({waiting} were waiting at the end)"
    );
    assert!(waiting > 0, "the test made no queue");
}

#[tokio::test]
async fn waiting_events_past_the_memory_budget_are_read_back_from_the_journal_whole() {
    let dir = tempfile::tempdir().unwrap();
    let body = |c: usize, i: usize| format!("c{c}-{i} {}", "p".repeat(150));
    // Room in memory for about eight of these events; the rest wait in the journal only.
    let (waiting, fake, spool) = queue_through_two_deliveries(&dir, 2048, body).await;
    assert!(
        waiting > 20,
        "only {waiting} waited: nothing was past the budget"
    );
    let mut sent: Vec<Bytes> = fake.calls().into_iter().map(|c| c.2).collect();
    sent.sort();
    let mut want: Vec<Bytes> = (0..20)
        .flat_map(|c| (0..10).map(move |i| Bytes::from(body(c, i))))
        .collect();
    want.sort();
    assert_eq!(sent, want, "every body once, byte for byte");
    assert_eq!(rows_made(&spool), 0, "no event became a row");
}

#[tokio::test]
async fn a_spool_closed_cleanly_is_all_rows() {
    closed_cleanly_all_rows(crate::spool::sqlite::HELD_BUDGET).await;
}

#[tokio::test]
async fn a_spool_closed_cleanly_is_all_rows_also_with_waiting_events_only_in_the_journal() {
    closed_cleanly_all_rows(0).await;
}

/// `held_budget` 0: the waiting events are spilled, read back from the journal at the close.
async fn closed_cleanly_all_rows(held_budget: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir);
    s.held_budget = held_budget;
    s.shutdown_grace = Duration::from_millis(100);
    s.max_concurrency_per_route = 1;
    let spool = Spool::open(s).unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = spool.start_delivery(Arc::new(Hang), stopped);
    eventually("the first claim", || spool.stats().jobs >= 1).await;
    // One delivery that never ends, two events waiting for its room: all in the journal.
    for body in ["stuck", "second", "third"] {
        spool.accept(event("/a", body)).await.unwrap();
    }
    eventually_summary(&spool, "one in flight, two waiting", |s| {
        route_summary(s, "/a").is_some_and(|r| (r.in_flight, r.pending) == (1, 2))
    })
    .await;
    // `hubgate spool summary` (another process) reads the journal's segments for them.
    let cli = crate::spool::operations(settings(&dir)).await.unwrap();
    let seen = cli.summary().await.unwrap();
    let r = route_summary(&seen, "/a").unwrap();
    assert_eq!((r.in_flight, r.pending), (1, 2), "{seen:?}");
    stop.send(true).unwrap();
    task.await.unwrap();
    spool.close().await;
    let db = rusqlite::Connection::open(&spool.settings().path).unwrap();
    let rows: Vec<(String, String, i64)> = db
        .prepare("SELECT CAST(body AS TEXT), state, attempts FROM events ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let want = [("stuck", 1), ("second", 0), ("third", 0)];
    let want: Vec<(String, String, i64)> = want
        .iter()
        .map(|&(b, a)| (b.to_owned(), "pending".to_owned(), a))
        .collect();
    assert_eq!(
        rows, want,
        "the cut-short attempt counted, the waiting ones not"
    );
    // Reopened, nothing comes back from the journal twice.
    let spool = Spool::open(settings(&dir)).unwrap();
    let summary = spool.summary().await.unwrap();
    assert_eq!(route_summary(&summary, "/a").unwrap().pending, 3);
}
