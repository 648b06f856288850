//! The PostgreSQL spool as a fleet: several real `hubgate run` processes on one real database
//! share one queue and one de-duplication table. Each test drives the binaries over TLS on
//! 127.0.0.1 and checks what a recording backend received on its socket and what is left in
//! the database (`psql`, `hubgate spool …`). No mocks; a test returns early where PostgreSQL is
//! not installed (the harness says so once, or fails under `HUBGATE_REQUIRE_POSTGRES=1`).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The fleet: one configuration, one database, gates on ports of the test's choosing
// ---------------------------------------------------------------------------------------------

/// The lease every fleet test runs with: short, so a dead gate's claims are taken over quickly.
const LEASE: &str = "2s";
/// The longest any bounded wait of these tests lasts.
const WITHIN: Duration = Duration::from_secs(30);

/// One configuration file shared by every gate of a test, on the database `db`.
struct Fleet {
    pki: Pki,
    config: PathBuf,
    db: Database,
    cert: ClientCert,
}

impl Fleet {
    /// `/webhook` spools to `{backend}/hook` through PostgreSQL (`lease = LEASE`, short
    /// back-off, 4 deliveries at a time fleet-wide, 4xx dead-letters), then `edit`.
    async fn new(db: Database, backend: &Upstream, edit: impl FnOnce(&mut GateConfig)) -> Fleet {
        let url = db.url();
        let (pki, _, cfg) = Scenario::new()
            .upstream(backend)
            .spool(|sp| {
                sp.on_postgres(&url);
                sp.lease = Some(LEASE.into());
                sp.retry_horizon = Some("10m".into());
            })
            .config(edit)
            .prepare()
            .await;
        let config = cfg.write(&pki, "fleet.toml");
        let cert = pki.meta_client();
        Fleet {
            pki,
            config,
            db,
            cert,
        }
    }

    /// `hubgate run --config fleet.toml` listening on `port` (`HUBGATE_LISTEN`), once it
    /// listens.
    async fn gate(&self, port: SocketAddr) -> Hubgate {
        let dir = self.config.parent().unwrap();
        let listen = port.to_string();
        let gate = Hubgate::spawn(
            &["run", "--config", self.config.to_str().unwrap()],
            &[("HUBGATE_LISTEN", listen.as_str())],
            dir,
        );
        let addr = gate.logged_addr("hubgate listening", "listen").await;
        assert_eq!(addr, port, "the gate listens where it was told");
        gate
    }

    /// An HTTP/1.1 client presenting Meta's certificate, `timeout` per request.
    fn http(&self, timeout: Duration) -> reqwest::Client {
        reqwest_client(
            tls_client_config(&self.pki, Some(&self.cert), Proto::H1, false),
            timeout,
        )
    }

    /// `hubgate spool --config fleet.toml ARGS…` (the binary).
    async fn spool_cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["spool", "--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        hubgate_output_async(&all, b"").await
    }

    /// `hubgate spool …`, required to succeed: its stdout.
    async fn spool_ok(&self, args: &[&str]) -> String {
        let out = self.spool_cli(args).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "hubgate spool {args:?}: exit {:?}\nstdout: {stdout}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `hubgate spool … --json`, parsed.
    async fn spool_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.spool_ok(&args).await;
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
    }

    /// Events in the database per state, straight from `hubgate.events`.
    fn states(&self) -> HashMap<String, u64> {
        self.db
            .psql("SELECT state, count(*) FROM hubgate.events GROUP BY state")
            .lines()
            .filter_map(|l| l.split_once('|'))
            .map(|(s, n)| (s.to_owned(), n.parse().unwrap()))
            .collect()
    }

    /// How many events the database still holds, in any state.
    fn events_left(&self) -> u64 {
        self.db
            .psql("SELECT count(*) FROM hubgate.events")
            .parse()
            .unwrap()
    }
}

/// A 127.0.0.1 address that was free a moment ago (the gates bind it themselves).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A signed POST of `body` to `/webhook` at `addr`: the status and the answer's text, or the
/// transport error.
async fn post(
    http: &reqwest::Client,
    addr: SocketAddr,
    body: &[u8],
) -> Result<(u16, String), String> {
    post_to(http, addr, "/webhook", body).await
}

/// [`post`] to `path`.
async fn post_to(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    let r = post_signed(http, &format!("https://{addr}{path}"), body)
        .await
        .map_err(|e| error_chain(&e))?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

/// [`post`], required to be acknowledged as stored.
async fn post_acked(http: &reqwest::Client, addr: SocketAddr, body: &[u8]) {
    assert_eq!(
        post(http, addr, body).await,
        Ok((200, "EVENT_RECEIVED\n".to_owned())),
        "the gate at {addr} acknowledges {:?}",
        String::from_utf8_lossy(body)
    );
}

/// A Meta-like event with a distinct id.
fn event_body(tag: &str, i: usize) -> Vec<u8> {
    format!(
        r#"{{"object":"page","entry":[{{"id":"{tag}-{i}","time":{i},"messaging":[{{"message":{{"text":"h\u00e9llo {tag} {i}"}}}}]}}]}}"#
    )
    .into_bytes()
}

/// The `"id"` of a body made by [`event_body`], for messages.
fn event_id(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or(&text)
        .to_owned()
}

/// Access-log lines of `log` with this verdict.
fn verdicts(log: &[String], verdict: &str) -> usize {
    let needle = format!("verdict=\"{verdict}\"");
    log.iter().filter(|l| l.contains(&needle)).count()
}

/// `gate`'s log from line `from` on, once it holds `want` access lines with `verdict` (or after
/// 10 s): the log is written in batches, a little after the responses.
async fn log_with_verdicts(gate: &Hubgate, from: usize, verdict: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = gate.logs()[from..].to_vec();
        if verdicts(&log, verdict) >= want || Instant::now() >= deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what()` after `within`.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("not within {within:?}: {}", what());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bodies of `wanted` that `backend` has not had answered 2xx yet.
fn undelivered<'a>(backend: &Upstream, wanted: &'a [Vec<u8>]) -> Vec<&'a Vec<u8>> {
    let got = backend.deliveries();
    wanted
        .iter()
        .filter(|b| !got.contains_key(b.as_slice()))
        .collect()
}

/// Waits (bounded) until every one of `bodies` was delivered and the database holds no event,
/// then a little longer, so that a late second delivery would show.
async fn drained(fleet: &Fleet, backend: &Upstream, bodies: &[Vec<u8>], what: &str) {
    eventually(
        WITHIN,
        || undelivered(backend, bodies).is_empty() && fleet.events_left() == 0,
        || {
            let missing = undelivered(backend, bodies);
            format!(
                "{what}: {} of {} bodies undelivered (e.g. {:?}); database: {:?}",
                missing.len(),
                bodies.len(),
                missing
                    .iter()
                    .take(3)
                    .map(|b| event_id(b))
                    .collect::<Vec<_>>(),
                fleet.states()
            )
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

// ---------------------------------------------------------------------------------------------
// One queue
// ---------------------------------------------------------------------------------------------

const SHARED_EVENTS: usize = 200;
const SHARED_CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gates_share_one_queue_and_deliver_each_event_once() {
    let Some(pg) = postgres() else { return };
    let backend = Upstream::start().await;
    let fleet = Fleet::new(pg.fresh_database(), &backend, |_| {}).await;
    let (a, b) = (free_addr(), free_addr());
    let gate_a = fleet.gate(a).await;
    let gate_b = fleet.gate(b).await;

    // A few clients, each sending its share alternately to the two gates.
    let bodies: Vec<Vec<u8>> = (0..SHARED_EVENTS)
        .map(|i| event_body("shared", i))
        .collect();
    let per_client = SHARED_EVENTS / SHARED_CLIENTS;
    let tasks: Vec<_> = bodies
        .chunks(per_client)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let http = fleet.http(Duration::from_secs(10));
            tokio::spawn(async move {
                for (i, body) in chunk.iter().enumerate() {
                    let to = if i % 2 == 0 { a } else { b };
                    post_acked(&http, to, body).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    drained(&fleet, &backend, &bodies, "two gates").await;
    let deliveries = backend.deliveries();
    let twice: Vec<String> = deliveries
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(b, n)| format!("{n}x {}", event_id(b)))
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(
        deliveries.len(),
        SHARED_EVENTS,
        "only what was sent is delivered"
    );
    // Each gate stored its half: both accepted into the one queue.
    for (name, gate) in [("A", &gate_a), ("B", &gate_b)] {
        let log = log_with_verdicts(gate, 0, "spooled", SHARED_EVENTS / 2).await;
        assert_eq!(
            verdicts(&log, "spooled"),
            SHARED_EVENTS / 2,
            "gate {name} stores every event sent to it"
        );
    }

    // The operator's view of the shared spool: nothing pending, in flight or dead.
    let summary = fleet.spool_json(&["summary"]).await;
    assert_eq!(summary["routes"], serde_json::json!([]), "{summary}");
    assert_eq!(summary["dedupe_keys"], SHARED_EVENTS as u64, "{summary}");
    let text = fleet.spool_ok(&["summary"]).await;
    assert!(text.contains("(no events)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_reaching_the_other_gate_is_a_duplicate() {
    let Some(pg) = postgres() else { return };
    let backend = Upstream::start().await;
    let fleet = Fleet::new(pg.fresh_database(), &backend, |_| {}).await;
    let (a, b) = (free_addr(), free_addr());
    let gate_a = fleet.gate(a).await;
    let gate_b = fleet.gate(b).await;
    let http = fleet.http(Duration::from_secs(10));

    let body = event_body("retry", 1);
    post_acked(&http, a, &body).await;
    // Meta did not see A's 200 and retries, through the load balancer, at B: same bytes, same
    // signature.
    post_acked(&http, b, &body).await;
    drained(&fleet, &backend, std::slice::from_ref(&body), "the event").await;

    assert_eq!(backend.delivered(&body), 1, "delivered once");
    assert_eq!(backend.received(&body), 1, "sent to the backend once");
    let log_a = log_with_verdicts(&gate_a, 0, "spooled", 1).await;
    let log_b = log_with_verdicts(&gate_b, 0, "duplicate", 1).await;
    assert_eq!(verdicts(&log_a, "spooled"), 1, "{}", log_a.join("\n"));
    assert_eq!(verdicts(&log_b, "duplicate"), 1, "{}", log_b.join("\n"));
    assert_eq!(verdicts(&log_b, "spooled"), 0, "{}", log_b.join("\n"));
    assert_eq!(fleet.db.psql("SELECT count(*) FROM hubgate.dedupe"), "1");
}

// ---------------------------------------------------------------------------------------------
// Leases: a delivery slower than the lease is renewed, not taken over
// ---------------------------------------------------------------------------------------------

/// How long the slow backend takes to answer: well past [`LEASE`].
const SLOW: Duration = Duration::from_millis(3500);

/// Two gates; two events on `/slow`, whose backend answers after [`SLOW`] (longer than the
/// lease), and — when `load` — a stream of other events through both gates meanwhile (every
/// accept notifies every gate). Each slow event must reach its backend once: the gate
/// delivering it renews its lease, so no gate (itself included) takes it over.
async fn slow_deliveries_are_sent_once(load: bool) {
    let Some(pg) = postgres() else { return };
    let backend = Upstream::start().await;
    let slow = Upstream::with_reply(Reply::delayed(SLOW)).await;
    let slow_url = slow.url("/hook");
    let fleet = Fleet::new(pg.fresh_database(), &backend, |c| {
        c.upstream.timeout = Some("10s".into());
        let mut r = Route::new("/slow", &slow_url);
        r.delivery = Some(Delivery::Spool);
        c.routes.push(r);
    })
    .await;
    let (a, b) = (free_addr(), free_addr());
    let _gate_a = fleet.gate(a).await;
    let _gate_b = fleet.gate(b).await;
    let http = fleet.http(Duration::from_secs(10));
    let slow_bodies: Vec<Vec<u8>> = (0..2).map(|i| event_body("slow", i)).collect();
    for (body, to) in slow_bodies.iter().zip([a, b]) {
        assert_eq!(
            post_to(&http, to, "/slow", body).await,
            Ok((200, "EVENT_RECEIVED\n".to_owned()))
        );
    }
    // The slow events' leases as the database sees them, every 250 ms, for the report.
    let probe_db = fleet.db.clone();
    let probe = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + SLOW + Duration::from_secs(2);
        let mut seen = Vec::new();
        while Instant::now() < until {
            seen.push(probe_db.psql(
                "SELECT string_agg(format('id %s attempt %s owner %s lease left %s ms', id, \
                 attempts, lease_owner, lease_until_ms - hubgate.now_ms()), '; ' ORDER BY id) \
                 FROM hubgate.events WHERE route = '/slow'",
            ));
            std::thread::sleep(Duration::from_millis(250));
        }
        seen
    });
    let mut load_bodies = Vec::new();
    if load {
        let load_until = Instant::now() + SLOW + Duration::from_secs(1);
        let tasks: Vec<_> = (0..4)
            .map(|c| {
                let http = fleet.http(Duration::from_secs(10));
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    while Instant::now() < load_until && sent.len() < 400 {
                        let body = event_body(&format!("load{c}"), sent.len());
                        let to = if sent.len() % 2 == 0 { a } else { b };
                        post_acked(&http, to, &body).await;
                        sent.push(body);
                    }
                    sent
                })
            })
            .collect();
        for t in tasks {
            load_bodies.extend(t.await.unwrap());
        }
    }
    let leases = probe.await.unwrap().join("\n");
    eventually(
        WITHIN,
        || slow_bodies.iter().all(|b| slow.delivered(b) >= 1),
        || format!("slow deliveries: {:?}", fleet.states()),
    )
    .await;
    drained(&fleet, &backend, &load_bodies, "the load").await;
    for body in &slow_bodies {
        assert_eq!(
            slow.received(body),
            1,
            "{} was sent to its backend more than once ({} other events meanwhile); \
             its lease over time:\n{leases}",
            event_id(body),
            load_bodies.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_longer_than_the_lease_is_renewed_not_taken_over() {
    slow_deliveries_are_sent_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_longer_than_the_lease_is_renewed_while_the_fleet_is_busy() {
    slow_deliveries_are_sent_once(true).await;
}

// ---------------------------------------------------------------------------------------------
// kill -9 of a gate: the fleet's proof
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Traffic {
    /// Every body POSTed.
    sent: Mutex<HashSet<Vec<u8>>>,
    acked: Mutex<Vec<Vec<u8>>>,
    posts: AtomicU64,
    /// POSTs that got no answer (the gate was killed or not yet back).
    failed: AtomicU64,
    /// POSTs answered with something other than 200.
    refused: AtomicU64,
    /// Bodies given up when the traffic stopped, never acknowledged.
    abandoned: AtomicU64,
}

/// One client: fresh bodies one after another, each to the next gate in turn, a body re-sent
/// (to the next gate: Meta's retry may land anywhere) until acknowledged; stops at `stop` or
/// when the fleet has been sent `max_events` bodies.
async fn fleet_client(
    c: usize,
    http: reqwest::Client,
    gates: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    max_events: usize,
    traffic: Arc<Traffic>,
) {
    let mut turn = c;
    let mut seq = 0;
    'next: while !stop.load(Ordering::SeqCst) {
        let body = event_body(&format!("kill{c}"), seq);
        seq += 1;
        {
            let mut sent = traffic.sent.lock().unwrap();
            if sent.len() >= max_events {
                break;
            }
            sent.insert(body.clone());
        }
        loop {
            if stop.load(Ordering::SeqCst) {
                traffic.abandoned.fetch_add(1, Ordering::SeqCst);
                break 'next;
            }
            let to = gates[turn % gates.len()];
            turn += 1;
            traffic.posts.fetch_add(1, Ordering::SeqCst);
            match post(&http, to, &body).await {
                Ok((200, _)) => {
                    traffic.acked.lock().unwrap().push(body);
                    // Paced, so that the kills fall while traffic still flows.
                    tokio::time::sleep(PACE).await;
                    continue 'next;
                }
                Ok(_) => {
                    traffic.refused.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    traffic.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const KILL_GATES: usize = 3;
const KILL_CLIENTS: usize = 4;
/// A client's pause after each acknowledgement.
const PACE: Duration = Duration::from_millis(10);
const KILLS: usize = 5;
const KILL_CONCURRENCY: usize = 4;
const KILL_MAX_EVENTS: usize = 600;
const KILL_SEED: u64 = 0x5EED_F1EE;

/// Three gates on one database, a client load spread over them, and a random gate SIGKILLed at
/// seeded random moments (and restarted on its port) while deliveries are in flight. Afterwards
/// every acknowledged event reached the backend; a second delivery is possible only for an
/// attempt a kill interrupted (its lease expires and another gate takes it over), so at most
/// `max_concurrency` (a fleet-wide limit) per kill. `HUBGATE_CRASH_SEED=N` replays another
/// schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_gate_loses_nothing_acknowledged() {
    let Some(pg) = postgres() else { return };
    let started = Instant::now();
    let seed = crash_seed(KILL_SEED);
    let mut rng = SplitMix(seed);

    // Deliveries take a moment, so kills catch some in flight.
    let backend = Upstream::with_reply(Reply::delayed(Duration::from_millis(30))).await;
    let fleet = Fleet::new(pg.fresh_database(), &backend, |c| {
        c.spool.as_mut().unwrap().max_concurrency = Some(KILL_CONCURRENCY);
    })
    .await;
    let ports: Vec<SocketAddr> = (0..KILL_GATES).map(|_| free_addr()).collect();
    let mut gates = Vec::new();
    for p in &ports {
        gates.push(fleet.gate(*p).await);
    }
    // Every gate process's log, the killed ones first.
    let mut logs: Vec<Vec<String>> = Vec::new();

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let clients: Vec<_> = (0..KILL_CLIENTS)
        .map(|c| {
            tokio::spawn(fleet_client(
                c,
                fleet.http(Duration::from_secs(5)),
                ports.clone(),
                stop.clone(),
                KILL_MAX_EVENTS,
                traffic.clone(),
            ))
        })
        .collect();

    let mut schedule = Vec::new();
    for _ in 0..KILLS {
        let up = rng.millis(150, 900);
        let down = rng.millis(0, 300);
        let victim = rng.below(KILL_GATES);
        tokio::time::sleep(up).await;
        let acked_before = traffic.acked.lock().unwrap().len();
        let in_flight_before: u64 = fleet
            .db
            .psql("SELECT count(*) FROM hubgate.events WHERE state = 'in_flight'")
            .parse()
            .unwrap();
        let gate = gates.remove(victim);
        logs.push(gate.kill9());
        schedule.push((victim, up, down, acked_before, in_flight_before));
        tokio::time::sleep(down).await;
        gates.insert(victim, fleet.gate(ports[victim]).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }

    let acked: Vec<Vec<u8>> = traffic.acked.lock().unwrap().clone();
    let unique: HashSet<&[u8]> = acked.iter().map(Vec::as_slice).collect();
    assert_eq!(unique.len(), acked.len(), "each body acknowledged once");
    assert!(
        acked.len() >= 100,
        "too little traffic to prove anything: {}",
        acked.len()
    );

    // Drain: everything acknowledged reaches the backend; the database empties (the killed
    // gates' leases expire and the survivors take their events over).
    let deadline = Instant::now() + WITHIN;
    loop {
        let missing = undelivered(&backend, &acked).len();
        let left = fleet.states();
        if missing == 0 && left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {missing} acknowledged event(s) never delivered; database: {left:?}\nlast gates' logs:\n{}",
            gates
                .iter()
                .map(|g| g.logs().join("\n"))
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late second deliveries would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let deliveries = backend.deliveries();
    let lost = undelivered(&backend, &acked).len();
    let duplicates: usize = deliveries.values().map(|n| n - 1).sum();
    let twice: Vec<String> = deliveries
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(b, n)| format!("{n}x {}", event_id(b)))
        .collect();
    logs.extend(gates.iter().map(Hubgate::logs));
    let duplicate_answers: usize = logs.iter().map(|l| verdicts(l, "duplicate")).sum();
    let unavailable: usize = logs.iter().map(|l| verdicts(l, "spool_unavailable")).sum();
    let unacked_delivered = deliveries
        .keys()
        .filter(|b| !unique.contains(b.as_ref()))
        .count();
    eprintln!(
        "fleet kill test: seed {seed:#x}, {KILLS} kills (gate, up, down, acked before, in flight in the database): {schedule:?}\n\
         fleet kill test: {} POSTs, {} acknowledged ({duplicate_answers} answered as duplicates), {} unanswered, {} refused ({unavailable} spool_unavailable), {} abandoned\n\
         fleet kill test: {} distinct bodies delivered ({unacked_delivered} never acknowledged), lost {lost}, duplicate deliveries {duplicates} {twice:?}\n\
         fleet kill test: {:.1} s",
        traffic.posts.load(Ordering::SeqCst),
        acked.len(),
        traffic.failed.load(Ordering::SeqCst),
        traffic.refused.load(Ordering::SeqCst),
        traffic.abandoned.load(Ordering::SeqCst),
        deliveries.len(),
        started.elapsed().as_secs_f64(),
    );
    assert_eq!(lost, 0, "seed {seed}: acknowledged events lost");
    assert!(
        duplicates <= KILLS * KILL_CONCURRENCY,
        "seed {seed}: {duplicates} duplicate deliveries for {KILLS} kills: {twice:?}"
    );
    // Everything delivered was sent by a client, byte for byte.
    let sent = traffic.sent.lock().unwrap().clone();
    for body in deliveries.keys() {
        assert!(
            sent.contains(body.as_ref()),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    assert!(
        fleet.states().is_empty(),
        "nothing pending, in flight or dead"
    );
    let summary = fleet.spool_json(&["summary"]).await;
    assert_eq!(summary["routes"], serde_json::json!([]), "{summary}");
}

// ---------------------------------------------------------------------------------------------
// The database goes away
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_answers_503_and_resumes() {
    let Some(mut pg) = dedicated() else { return };
    // The backend refuses for now: what is acknowledged before the outage waits in the
    // database through it.
    let backend = Upstream::start().await;
    backend.set_status(503);
    let fleet = Fleet::new(pg.fresh_database(), &backend, |c| {
        c.spool.as_mut().unwrap().accept_timeout = Some("1s".into());
        c.with_admin();
    })
    .await;
    let addr = free_addr();
    let gate = fleet.gate(addr).await;
    let admin = gate.logged_addr("admin listening", "listen").await;
    let http = fleet.http(Duration::from_secs(5));

    let before: Vec<Vec<u8>> = (0..5).map(|i| event_body("before", i)).collect();
    for b in &before {
        post_acked(&http, addr, b).await;
    }
    assert_eq!(http_get(admin, "/readyz").await.unwrap().0, 200);
    assert_eq!(fleet.events_left(), 5);

    pg.kill();
    let mark = gate.log_count();
    // Refused while the database is away: 503, never 200, each answered within the client's
    // deadline (accept_timeout plus slack).
    let during: Vec<Vec<u8>> = (0..5).map(|i| event_body("during", i)).collect();
    for b in &during {
        let (status, _) = post(&http, addr, b)
            .await
            .unwrap_or_else(|e| panic!("an answer while the database is down: {e}"));
        assert_eq!(status, 503, "{}", event_id(b));
    }
    let log = log_with_verdicts(&gate, mark, "spool_unavailable", during.len()).await;
    assert_eq!(
        verdicts(&log, "spool_unavailable"),
        during.len(),
        "{}",
        log.join("\n")
    );
    // Past the grace period the admin listener says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = http_get(admin, "/readyz").await.unwrap();
        if status == 503 {
            assert!(text.contains("unavailable"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {status} {text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    pg.start();
    backend.set_status(200);
    // Meta retries what was refused; accepts succeed again within a bounded wait.
    let deadline = Instant::now() + WITHIN;
    for b in &during {
        loop {
            match post(&http, addr, b).await {
                Ok((200, text)) => {
                    assert_eq!(text, "EVENT_RECEIVED\n");
                    break;
                }
                Ok((503, _)) | Err(_) => {}
                Ok(other) => panic!("after the restart: {other:?}"),
            }
            assert!(Instant::now() < deadline, "accepts never resumed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let after: Vec<Vec<u8>> = (0..5).map(|i| event_body("after", i)).collect();
    for b in &after {
        post_acked(&http, addr, b).await;
    }
    let all: Vec<Vec<u8>> = [before.clone(), during.clone(), after.clone()].concat();
    drained(&fleet, &backend, &all, "through the outage").await;
    for b in &all {
        assert_eq!(backend.delivered(b), 1, "{}", event_id(b));
    }
    // Refused bodies were not stored: their retry was a new event, not a duplicate.
    assert_eq!(verdicts(&gate.logs(), "duplicate"), 0);
    let deadline = Instant::now() + WITHIN;
    loop {
        let (status, text) = http_get(admin, "/readyz").await.unwrap();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {status} {text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// `hubgate spool …` on the shared spool
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_cli_works_on_the_postgres_spool_while_gates_run() {
    let Some(pg) = postgres() else { return };
    let backend = Upstream::start().await;
    // Poisoned bodies are refused for good (dead-lettered); the rest are taken.
    backend.respond(|_, r| {
        if r.body.windows(6).any(|w| w == b"poison") {
            400
        } else {
            200
        }
    });
    let fleet = Fleet::new(pg.fresh_database(), &backend, |_| {}).await;
    let addr = free_addr();
    let _gate = fleet.gate(addr).await;
    let http = fleet.http(Duration::from_secs(10));

    let good = event_body("good", 1);
    let (p1, p2) = (event_body("poison", 1), event_body("poison", 2));
    for b in [&good, &p1, &p2] {
        post_acked(&http, addr, b).await;
    }
    eventually(
        WITHIN,
        || fleet.states().get("dead") == Some(&2) && backend.delivered(&good) == 1,
        || format!("two dead, one delivered: {:?}", fleet.states()),
    )
    .await;

    let dead = fleet.spool_json(&["list", "--state", "dead"]).await;
    let dead = dead.as_array().expect("an array").clone();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for e in &dead {
        assert_eq!(e["state"], "dead");
        assert_eq!(e["route"], "/webhook");
        assert_eq!(e["attempts"], 1);
        assert_eq!(e["last_error"], "backend answered 400");
    }
    let ids: Vec<i64> = dead.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids[0] < ids[1], "oldest first: {ids:?}");
    let human = fleet.spool_ok(&["list", "--state", "dead"]).await;
    assert!(human.contains("backend answered 400"), "{human}");

    let (p1_id, p2_id) = (ids[0], ids[1]);
    let shown = fleet.spool_json(&["show", &p1_id.to_string()]).await;
    assert_eq!(shown["id"], p1_id);
    assert_eq!(
        shown["body"],
        String::from_utf8(p1.clone()).unwrap().as_str()
    );
    let sig: Vec<&str> = shown["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == SIG)
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(sig, [sign(SECRET, &p1).as_str()]);
    let text = fleet.spool_ok(&["show", &p2_id.to_string()]).await;
    assert!(text.contains(&format!("id:        {p2_id}")), "{text}");
    assert!(text.contains("state:     dead (1 attempts)"), "{text}");
    assert!(
        text.contains(&String::from_utf8(p2.clone()).unwrap()),
        "{text}"
    );
    let missing = fleet.spool_cli(&["show", "999999"]).await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no event 999999"),
        "{missing:?}"
    );

    // The backend is fixed; the running gate delivers the replayed event.
    backend.set_status(200);
    let replayed = fleet.spool_json(&["replay", &p1_id.to_string()]).await;
    assert_eq!(replayed, serde_json::json!({ "replayed": 1 }));
    eventually(
        WITHIN,
        || backend.delivered(&p1) == 1 && fleet.states().get("dead") == Some(&1),
        || format!("the replayed event delivered: {:?}", fleet.states()),
    )
    .await;
    let not_dead = fleet.spool_cli(&["replay", &p1_id.to_string()]).await;
    assert!(!not_dead.status.success(), "{not_dead:?}");

    let none = fleet.spool_json(&["purge", "--older-than", "1h"]).await;
    assert_eq!(none, serde_json::json!({ "purged": 0 }), "P2 died just now");
    let out = fleet.spool_ok(&["purge", "--older-than", "0s"]).await;
    assert!(out.contains("purged 1 event(s)"), "{out}");
    assert_eq!(fleet.events_left(), 0);
    assert_eq!(
        backend.delivered(&p2),
        0,
        "a purged event is never delivered"
    );
    assert_eq!(backend.received(&p2), 1);
    assert_eq!(backend.delivered(&p1), 1);
    assert_eq!(backend.delivered(&good), 1);

    let migrated = fleet.spool_ok(&["migrate"]).await;
    assert!(migrated.contains("up to date"), "{migrated}");
    let json = fleet.spool_json(&["migrate"]).await;
    assert_eq!(json["found"], json["version"], "{json}");
    assert_eq!(
        fleet.db.psql("SELECT max(version) FROM hubgate.migrations"),
        json["version"].to_string()
    );
    let summary = fleet.spool_json(&["summary"]).await;
    assert_eq!(summary["routes"], serde_json::json!([]), "{summary}");
}
