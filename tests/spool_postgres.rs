//! The PostgreSQL spool through the library, on a real throwaway PostgreSQL: accept and
//! de-duplicate in one commit, also across two gates' spools; a claim whose lease expired is
//! taken over; `max_concurrency` holds across gates; an outcome from a gate that lost its
//! lease is not recorded; the schema is versioned; TLS follows libpq's sslmode.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use hubgate::config::Secret;
use hubgate::spool::{
    Accepted, Deliver, DeliveryOutcome, NewEvent, PostgresSettings, Spool, SpoolError,
    SpoolSettings, StoredEvent,
};
use tokio::sync::watch;

fn settings(url: &str) -> SpoolSettings {
    let mut s = SpoolSettings::postgres(PostgresSettings {
        url: Secret::new(url),
        pool_size: 4,
        ca: None,
    });
    s.backoff_base = Duration::from_millis(20);
    s.backoff_max = Duration::from_millis(50);
    s.poll_interval = Duration::from_millis(50);
    s.lease = Duration::from_secs(2);
    s.shutdown_grace = Duration::from_secs(1);
    s
}

fn event(body: &str) -> NewEvent {
    NewEvent {
        route: "/webhook".to_owned(),
        body: Bytes::from(body.to_owned()),
        headers: http::HeaderMap::from_iter([(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )]),
        query: None,
        client_identity: Some("client.webhooks.fbclientcerts.com".to_owned()),
        received_at: SystemTime::now(),
        update_key: None,
    }
}

/// A backend that records bodies and the most deliveries it saw at once, optionally slow.
#[derive(Default)]
struct Backend {
    bodies: Mutex<Vec<Bytes>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    delay: Duration,
}

impl Backend {
    fn slow(delay: Duration) -> Arc<Backend> {
        Arc::new(Backend {
            delay,
            ..Backend::default()
        })
    }

    fn count(&self, body: &str) -> usize {
        let bodies = self.bodies.lock().unwrap();
        bodies.iter().filter(|b| &b[..] == body.as_bytes()).count()
    }
}

impl Deliver for Backend {
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> Pin<Box<dyn Future<Output = DeliveryOutcome> + Send + 'a>> {
        Box::pin(async move {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.bodies.lock().unwrap().push(event.body.clone());
            self.running.fetch_sub(1, Ordering::SeqCst);
            DeliveryOutcome::Done
        })
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_stores_once_and_a_second_gate_sees_the_duplicate() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let a = Spool::connect(settings(&db.url())).await.unwrap();
    let b = Spool::connect(settings(&db.url())).await.unwrap();
    let first = a.accept(event("{\"n\":1}")).await.unwrap();
    assert!(matches!(first, Accepted::Stored(_)), "{first:?}");
    assert_eq!(
        a.accept(event("{\"n\":1}")).await.unwrap(),
        Accepted::Duplicate
    );
    assert_eq!(
        b.accept(event("{\"n\":1}")).await.unwrap(),
        Accepted::Duplicate
    );
    assert!(matches!(
        b.accept(event("{\"n\":2}")).await.unwrap(),
        Accepted::Stored(_)
    ));
    let summary = a.summary().await.unwrap();
    assert_eq!(summary.routes[0].pending, 2, "{summary:?}");
    assert_eq!(summary.dedupe_keys, 2);
    assert_eq!(
        db.psql("SELECT count(*) FROM hubgate.events").trim(),
        "2",
        "the rows are in the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parts_of_a_batch_are_stored_in_one_transaction_and_known_by_update_at_every_gate() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let a = Spool::connect(settings(&db.url())).await.unwrap();
    let b = Spool::connect(settings(&db.url())).await.unwrap();
    let keyed = |body: &str, key: u8| NewEvent {
        update_key: Some([key; 32]),
        ..event(body)
    };
    let answers = a
        .accept_all(vec![
            keyed("b1 p1", 1),
            keyed("b1 p2", 2),
            keyed("b1 p3", 2),
        ])
        .await
        .unwrap();
    assert!(matches!(answers[0], Accepted::Stored(_)), "{answers:?}");
    assert!(matches!(answers[1], Accepted::Stored(_)), "{answers:?}");
    assert_eq!(
        answers[2],
        Accepted::Duplicate,
        "the same update twice in one batch"
    );
    // Re-batched, at the other gate: only the new update is stored.
    let answers = b
        .accept_all(vec![keyed("b2 p1", 2), keyed("b2 p2", 3)])
        .await
        .unwrap();
    assert_eq!(answers[0], Accepted::Duplicate);
    assert!(matches!(answers[1], Accepted::Stored(_)), "{answers:?}");
    assert_eq!(
        db.psql("SELECT count(*) FROM hubgate.events").trim(),
        "3",
        "b1 p1, b1 p2, b2 p2"
    );
    // A batch with one invalid part is refused whole, before anything is written.
    let mut broken = vec![keyed("b3 p1", 4), keyed("b3 p2", 5)];
    broken[1].route.clear();
    assert!(a.accept_all(broken).await.is_err());
    assert_eq!(db.psql("SELECT count(*) FROM hubgate.events").trim(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_body_accepted_by_two_gates_at_once_is_stored_once() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let a = Spool::connect(settings(&db.url())).await.unwrap();
    let b = Spool::connect(settings(&db.url())).await.unwrap();
    for i in 0..20 {
        let body = format!("{{\"race\":{i}}}");
        let (x, y) = tokio::join!(a.accept(event(&body)), b.accept(event(&body)));
        let stored = [x.unwrap(), y.unwrap()]
            .iter()
            .filter(|r| matches!(r, Accepted::Stored(_)))
            .count();
        assert_eq!(stored, 1, "exactly one gate stores body {i}");
    }
    assert_eq!(db.psql("SELECT count(*) FROM hubgate.events").trim(), "20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_at_once_share_statements_and_each_gets_its_own_row() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let spool = Spool::connect(settings(&db.url())).await.unwrap();
    // 64 accepts at once: 48 bodies, 16 of them sent twice.
    let bodies: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "{{\"at_once\":{},\"pad\":\"{}\"}}",
                i % 48,
                "x".repeat(i % 48)
            )
        })
        .collect();
    let calls: Vec<_> = bodies
        .iter()
        .map(|body| {
            let (spool, body) = (spool.clone(), body.clone());
            tokio::spawn(async move { spool.accept(event(&body)).await })
        })
        .collect();
    let mut stored = std::collections::HashMap::new();
    for (body, call) in bodies.iter().zip(calls) {
        match call.await.unwrap().unwrap() {
            Accepted::Stored(id) => {
                assert!(stored.insert(id, body.clone()).is_none(), "id {id} twice");
            }
            Accepted::Duplicate => {}
        }
    }
    assert_eq!(stored.len(), 48, "each body stored once");
    assert_eq!(
        stored
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        48
    );
    // Each answer's id is its own event's row.
    for (id, body) in &stored {
        let detail = spool.show(*id).await.unwrap();
        assert_eq!(&detail.body[..], body.as_bytes(), "event {id}");
    }
    let stats = spool.stats();
    assert!(
        stats.commits < 32,
        "64 accepts at once took {} statements",
        stats.commits
    );
    assert_eq!(db.psql("SELECT count(*) FROM hubgate.events").trim(), "48");
}

/// One thread: both calls are queued before an intake task runs, so the first task takes the
/// one-event call and holds back the two-event one (it does not fit with it), while the second
/// task waits for the queue. The held-back call must still be written at once.
#[tokio::test]
async fn an_accept_that_did_not_fit_in_a_statement_goes_in_the_next_at_once() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let mut s = settings(&db.url());
    s.max_batch_events = 2;
    s.accept_timeout = Duration::from_secs(2);
    let spool = Spool::connect(s).await.unwrap();
    let (one, two) = tokio::join!(
        spool.accept_all(vec![event("alone")]),
        spool.accept_all(vec![event("pair 1"), event("pair 2")]),
    );
    assert!(matches!(one.unwrap()[..], [Accepted::Stored(_)]));
    let two = two.expect("the held-back call is answered within accept_timeout");
    assert!(matches!(
        two[..],
        [Accepted::Stored(_), Accepted::Stored(_)]
    ));
    assert_eq!(db.psql("SELECT count(*) FROM hubgate.events").trim(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gates_deliver_every_event_once_within_the_fleet_wide_limit() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let mut s = settings(&db.url());
    s.max_concurrency_per_route = 2;
    let a = Spool::connect(s.clone()).await.unwrap();
    let b = Spool::connect(s).await.unwrap();
    let backend = Backend::slow(Duration::from_millis(30));
    let (stop, stopped) = watch::channel(false);
    let da = a.start_delivery(backend.clone(), stopped.clone());
    let db_ = b.start_delivery(backend.clone(), stopped);
    for i in 0..40 {
        let spool = if i % 2 == 0 { &a } else { &b };
        spool
            .accept(event(&format!("{{\"e\":{i}}}")))
            .await
            .unwrap();
    }
    eventually("40 deliveries", || {
        backend.bodies.lock().unwrap().len() >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..40 {
        assert_eq!(backend.count(&format!("{{\"e\":{i}}}")), 1, "event {i}");
    }
    let most = backend.max_running.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} deliveries at once across two gates");
    stop.send(true).unwrap();
    da.await.unwrap();
    db_.await.unwrap();
    assert_eq!(db.psql("SELECT count(*) FROM hubgate.events").trim(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_the_old_owner_records_nothing() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let a = Spool::connect(settings(&db.url())).await.unwrap();
    let Accepted::Stored(id) = a.accept(event("{\"orphan\":1}")).await.unwrap() else {
        panic!("stored")
    };
    // As if a gate had claimed it and died: in flight, leased to someone gone, lease over.
    db.psql(&format!(
        "UPDATE hubgate.events SET state = 'in_flight', attempts = 1, lease_owner = 'dead-gate',
             lease_until_ms = hubgate.now_ms() - 1 WHERE id = {id}"
    ));
    let backend = Arc::new(Backend::default());
    let (stop, stopped) = watch::channel(false);
    let delivery = a.start_delivery(backend.clone(), stopped);
    eventually("the orphan is delivered", || {
        backend.count("{\"orphan\":1}") == 1
    })
    .await;
    stop.send(true).unwrap();
    delivery.await.unwrap();
    assert_eq!(db.psql("SELECT count(*) FROM hubgate.events").trim(), "0");

    // A lease still running is left alone.
    let Accepted::Stored(id) = a.accept(event("{\"busy\":1}")).await.unwrap() else {
        panic!("stored")
    };
    db.psql(&format!(
        "UPDATE hubgate.events SET state = 'in_flight', attempts = 1, lease_owner = 'other-gate',
             lease_until_ms = hubgate.now_ms() + 60000 WHERE id = {id}"
    ));
    let (stop, stopped) = watch::channel(false);
    let delivery = a.start_delivery(backend.clone(), stopped);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    delivery.await.unwrap();
    assert_eq!(
        backend.count("{\"busy\":1}"),
        0,
        "another gate's lease holds"
    );
    assert_eq!(
        db.psql(&format!(
            "SELECT state, lease_owner FROM hubgate.events WHERE id = {id}"
        ))
        .trim(),
        "in_flight|other-gate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_and_an_older_one_is_migrated() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let s = settings(&db.url());
    assert_eq!(hubgate::spool::migrate(&s).await.unwrap(), (0, 1));
    assert_eq!(hubgate::spool::migrate(&s).await.unwrap(), (1, 1));
    db.psql("INSERT INTO hubgate.migrations (version) VALUES (99)");
    let err = Spool::connect(s.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::Schema {
                found: 99,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = hubgate::spool::operations(s).await.err().unwrap();
    assert!(matches!(err, SpoolError::Schema { found: 99, .. }), "{err}");
}

/// Accepts `body` once the database can be reached again: retried while the spool answers
/// "unavailable", for 20 s at most. (A `Duplicate` counts: an attempt given up on may have
/// been stored after all.)
async fn accept_once_back(spool: &Spool, body: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match spool.accept(event(body)).await {
            Ok(_) => return,
            Err(e) => assert!(
                e.is_unavailable() && tokio::time::Instant::now() < deadline,
                "accepts resume once the database can be reached: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_unavailable_not_stored() {
    let Some(pg) = dedicated() else { return };
    let mut pg = pg;
    let db = pg.fresh_database();
    let mut s = settings(&db.url());
    s.accept_timeout = Duration::from_secs(2);
    let spool = Spool::connect(s).await.unwrap();
    assert!(matches!(
        spool.accept(event("{\"before\":1}")).await.unwrap(),
        Accepted::Stored(_)
    ));
    pg.stop();
    let err = spool.accept(event("{\"during\":1}")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    pg.start();
    accept_once_back(&spool, "{\"after\":1}").await;
    assert_eq!(
        db.psql("SELECT count(*) FROM hubgate.events").trim(),
        "2",
        "before and after are stored, during is not"
    );
}

/// A TCP relay to the database that can go silent: once frozen it relays nothing more on any
/// connection, open or new, and closes none — what a frozen server, a lost route or a
/// firewall dropping packets looks like from the gate, whose kernel still has the connection.
/// It freezes on [`freeze_mid_claim`](Relay::freeze_mid_claim)'s trigger: right after
/// relaying a route's claim lock inside a transaction, so the server holds the lock for a
/// session that will never speak again. [`thaw`](Relay::thaw) relays new connections again
/// (the frozen ones stay frozen: their way is gone for good).
struct Relay {
    port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        use std::sync::atomic::AtomicBool;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let armed = Arc::new(AtomicBool::new(false));
        let alive: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let (f, a, trigger) = (frozen.clone(), alive.clone(), armed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let on = Arc::new(AtomicBool::new(!f.load(Ordering::SeqCst)));
                a.lock().unwrap().push(on.clone());
                let (f, a, trigger) = (f.clone(), a.clone(), trigger.clone());
                tokio::spawn(async move {
                    if !on.load(Ordering::SeqCst) {
                        // Accepted, never answered (the socket stays open while this waits).
                        std::future::pending::<()>().await;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                                mut into: tokio::net::tcp::OwnedWriteHalf,
                                on: Arc<AtomicBool>,
                                watch: bool| {
                        let (f, a, trigger) = (f.clone(), a.clone(), trigger.clone());
                        async move {
                            let mut buf = vec![0u8; 16 * 1024];
                            let mut in_transaction = false;
                            loop {
                                let read = from.read(&mut buf).await;
                                if !on.load(Ordering::SeqCst) {
                                    // Silent from now on, a close included: both sockets
                                    // stay open.
                                    std::future::pending::<()>().await;
                                }
                                let n = match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if into.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                                if !watch {
                                    continue;
                                }
                                let has =
                                    |what: &[u8]| buf[..n].windows(what.len()).any(|w| w == what);
                                if has(b"START TRANSACTION") || has(b"BEGIN") {
                                    in_transaction = true;
                                }
                                if has(b"COMMIT") || has(b"ROLLBACK") {
                                    in_transaction = false;
                                }
                                if in_transaction
                                    && has(b"hubgate.claim:")
                                    && trigger.swap(false, Ordering::SeqCst)
                                {
                                    f.store(true, Ordering::SeqCst);
                                    for on in a.lock().unwrap().iter() {
                                        on.store(false, Ordering::SeqCst);
                                    }
                                }
                            }
                        }
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, on.clone(), true), pipe(sr, cw, on, false));
                });
            }
        });
        Relay {
            port,
            frozen,
            armed,
        }
    }

    /// Freezes right after the next claim lock relayed inside a transaction.
    fn freeze_mid_claim(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_gone_silent_holds_no_task_once_a_way_back_opens() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_test_writer()
        .try_init();
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let relay = Relay::start(pg.port()).await;
    let url = db
        .url()
        .replacen(&format!(":{}/", pg.port()), &format!(":{}/", relay.port), 1);
    assert_ne!(url, db.url());
    let mut s = settings(&url);
    s.accept_timeout = Duration::from_secs(1);
    let spool = Spool::connect(s).await.unwrap();
    let backend = Arc::new(Backend::default());
    let (stop, stopped) = watch::channel(false);
    let delivery = spool.start_delivery(backend.clone(), stopped);
    assert!(matches!(
        spool.accept(event("{\"before\":1}")).await.unwrap(),
        Accepted::Stored(_)
    ));
    eventually("the event before is delivered", || {
        backend.count("{\"before\":1}") == 1
    })
    .await;

    // Silence, in the middle of a claim (its route's lock taken, the transaction open):
    // every connection the gate holds stops answering, none is closed.
    relay.freeze_mid_claim();
    eventually("a claim is cut off", || relay.is_frozen()).await;
    let started = tokio::time::Instant::now();
    let err = spool.accept(event("{\"during\":1}")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the accept timeout"
    );
    // The scheduler sits in a claim that will never answer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // ... holding its route's claim lock on the server, in a transaction nobody will end.
    assert_eq!(
        db.psql(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
             WHERE l.locktype = 'advisory' AND a.state = 'idle in transaction'"
        ),
        "1"
    );

    // A way back (new connections work; the silent ones stay silent): accepts resume at
    // once, deliveries once the cut-off claim is given up by the gate and its transaction
    // (and the route's claim lock) ended by the server.
    relay.thaw();
    accept_once_back(&spool, "{\"after\":1}").await;
    eventually("the event after is delivered", || {
        backend.count("{\"after\":1}") == 1
    })
    .await;
    assert_eq!(backend.count("{\"during\":1}"), 0);
    stop.send(true).unwrap();
    delivery.await.unwrap();
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_sslmode_as_libpq_does() {
    let pki = Pki::new();
    let Some(pg) = dedicated_tls(&pki) else {
        return;
    };
    let db = pg.fresh_database();
    let base = db.base_url();
    let with = |mode: &str, ca: bool| {
        let mut s = settings(&format!("{base}?sslmode={mode}"));
        if ca {
            if let hubgate::spool::Backend::Postgres(p) = &mut s.backend {
                p.ca = Some(vec![pki.root_der()]);
            }
        }
        s
    };
    // The test CA signed the server's certificate for 127.0.0.1.
    Spool::connect(with("verify-full", true)).await.unwrap();
    Spool::connect(with("verify-ca", true)).await.unwrap();
    Spool::connect(with("require", false)).await.unwrap();
    // Not trusted by the system store: refused.
    let err = Spool::connect(with("verify-full", false))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // The server takes TCP connections over TLS only.
    assert!(Spool::connect(with("disable", false)).await.is_err());
}

/// Sync routes remember their deliveries in the PostgreSQL spool at `url` (`[dedupe] store`).
fn sync_dedupe_in(c: &mut GateConfig, url: &str) {
    let mut spool = common::Spool::default();
    spool.on_postgres(url);
    c.spool = Some(spool);
    c.dedupe = Some(Dedupe {
        store: Some("postgres".into()),
        ..Dedupe::default()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_routes_recognise_a_retry_at_another_gate_with_the_shared_store() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let url = db.url();
    let s = Scenario::new()
        .config(|c| sync_dedupe_in(c, &url))
        .start()
        .await;
    // A second gate, same configuration, same database.
    let other = Gate::run(s.config.load(&s.pki).unwrap()).await;
    let body = sample_body();
    assert_eq!(s.post_signed(&body).await.status(), 200);
    let retry = post_signed(&s.http(), &other.url("/webhook"), &body)
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.text().await.unwrap(), "EVENT_RECEIVED\n");
    assert_eq!(s.upstream.requests().len(), 1, "delivered once");
    // A different body goes through the other gate.
    let fresh = post_signed(&s.http(), &other.url("/webhook"), b"{\"other\":1}")
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
    assert_eq!(s.upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sync_routes_recognise_an_update_rebatched_at_another_gate() {
    let Some(pg) = postgres() else { return };
    let db = pg.fresh_database();
    let url = db.url();
    let s = Scenario::new()
        .route(|r| {
            r.split("item", "item");
        })
        .config(|c| sync_dedupe_in(c, &url))
        .start()
        .await;
    let other = Gate::run(s.config.load(&s.pki).unwrap()).await;
    let item = |mid: &str| {
        format!(
            r#"{{"sender":{{"id":"1"}},"recipient":{{"id":"2"}},"message":{{"mid":"{mid}","text":"x"}}}}"#
        )
    };
    let batch = |time: u32, mids: &[&str]| {
        let items: Vec<String> = mids.iter().map(|m| item(m)).collect();
        format!(
            r#"{{"object":"page","entry":[{{"id":"2","time":{time},"messaging":[{}]}}]}}"#,
            items.join(",")
        )
        .into_bytes()
    };
    assert_eq!(
        s.post_signed(&batch(1, &["m_a", "m_b"])).await.status(),
        200
    );
    // m_b again, re-batched with m_c, through the other gate.
    let resp = post_signed(
        &s.http(),
        &other.url("/webhook"),
        &batch(2, &["m_c", "m_b"]),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let delivered: Vec<String> = s
        .upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(delivered.len(), 3, "{delivered:#?}");
    assert!(delivered[2].contains("m_c"));
    assert_eq!(delivered.iter().filter(|b| b.contains("m_b")).count(), 1);
}
