//! The spool's group commit and crash behaviour, measured on this machine's disk.
//!
//! ```sh
//! cargo run --example spool_bench                      # fsync cost, then 1..256 concurrent accepts
//! cargo run --example spool_bench -- 4000 1,16,256     # events, concurrency levels
//! cargo run --example spool_bench -- crash             # SIGKILL while accepting, then check
//! ```
//!
//! The spool is created in a temporary folder under `$TMPDIR` (default /tmp): point `TMPDIR` at
//! the disk the real spool will live on. Timings are printed, never asserted.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hubgate::spool::{
    Accepted, Deliver, DeliveryOutcome, NewEvent, Spool, SpoolOps, SpoolSettings, StoredEvent,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn event(body: String) -> NewEvent {
    NewEvent {
        route: "/webhook".to_owned(),
        body: Bytes::from(body),
        headers: http::HeaderMap::from_iter([
            (
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            ),
            (
                http::HeaderName::from_static("x-hub-signature-256"),
                http::HeaderValue::from_bytes(&[b"sha256=".as_slice(), &[b'a'; 64]].concat())
                    .expect("a valid value"),
            ),
            (
                http::HeaderName::from_static("x-forwarded-for"),
                http::HeaderValue::from_static("192.0.2.1"),
            ),
            (
                http::HeaderName::from_static("x-forwarded-proto"),
                http::HeaderValue::from_static("https"),
            ),
        ]),
        query: None,
        client_identity: Some("client.webhooks.fbclientcerts.com".to_owned()),
        received_at: SystemTime::now(),
        update_key: None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("crash") => crash(),
        Some("crash-child") => crash_child(&args[1]),
        _ => bench(&args),
    }
}

/// Raw `fdatasync` latency after a 4 KiB append: the floor under any durable commit.
fn fsync_cost(dir: &std::path::Path) -> Duration {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let n = 200;
    let block = [0u8; 4096];
    let started = Instant::now();
    for _ in 0..n {
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
    }
    let per = started.elapsed() / n;
    let _ = std::fs::remove_file(path);
    per
}

fn bench(args: &[String]) {
    let events: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let levels: Vec<usize> = args
        .get(1)
        .map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 64, 256]);
    let dir = tempfile::tempdir().expect("temp dir");
    println!("spool folder: {}", dir.path().display());
    println!(
        "raw fdatasync after a 4 KiB write: {:.2} ms",
        fsync_cost(dir.path()).as_secs_f64() * 1000.0
    );
    println!(
        "{:>6} {:>7} {:>8} {:>10} {:>8} {:>10} {:>13} {:>15}",
        "tasks",
        "events",
        "secs",
        "events/s",
        "commits",
        "commits/s",
        "events/commit",
        "ms/commit(avg)"
    );
    let rt = runtime();
    for (i, &tasks) in levels.iter().enumerate() {
        // One task alone is one fsync per event: keep that run short.
        let n = if tasks == 1 { events.min(300) } else { events };
        let path = dir.path().join(format!("bench-{i}.db"));
        let spool = Spool::open(SpoolSettings::new(&path)).expect("open spool");
        let body = "x".repeat(1024);
        let started = Instant::now();
        rt.block_on(async {
            let per_task = n.div_ceil(tasks);
            let mut handles = Vec::new();
            for t in 0..tasks {
                let spool = spool.clone();
                let body = body.clone();
                handles.push(tokio::spawn(async move {
                    for k in 0..per_task {
                        let e = event(format!("{{\"t\":{t},\"k\":{k},\"pad\":\"{body}\"}}"));
                        spool.accept(e).await.expect("accept");
                    }
                }));
            }
            for h in handles {
                h.await.expect("task");
            }
        });
        let secs = started.elapsed().as_secs_f64();
        let s = spool.stats();
        let n = s.accepted;
        println!(
            "{:>6} {:>7} {:>8.2} {:>10.0} {:>8} {:>10.0} {:>13.1} {:>15.2}",
            tasks,
            n,
            secs,
            n as f64 / secs,
            s.commits,
            s.commits as f64 / secs,
            n as f64 / s.commits.max(1) as f64,
            s.commit_nanos as f64 / s.commits.max(1) as f64 / 1e6,
        );
        rt.block_on(spool.close());
    }

    // Draining a backlog to an instant backend: the delivery path's cost per event. Claims and
    // outcomes are committed without fsync (synchronous=NORMAL), hence "fsyncs" 0.
    println!();
    println!(
        "{:>12} {:>7} {:>8} {:>12} {:>8} {:>13}",
        "concurrency", "events", "secs", "delivered/s", "fsyncs", "writer jobs"
    );
    for (i, &concurrency) in [1usize, 4, 16].iter().enumerate() {
        let n = events.min(2000);
        let path = dir.path().join(format!("drain-{i}.db"));
        let mut settings = SpoolSettings::new(&path);
        settings.max_concurrency_per_route = concurrency;
        let spool = Spool::open(settings).expect("open spool");
        rt.block_on(async {
            let mut handles = Vec::new();
            for t in 0..64 {
                let spool = spool.clone();
                handles.push(tokio::spawn(async move {
                    for k in (t..n).step_by(64) {
                        spool
                            .accept(event(format!("{{\"k\":{k}}}")))
                            .await
                            .expect("accept");
                    }
                }));
            }
            for h in handles {
                h.await.expect("task");
            }
        });
        let before = spool.stats();
        let started = Instant::now();
        rt.block_on(async {
            let counter = Arc::new(Count(AtomicU64::new(0)));
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = spool.start_delivery(counter, stopped);
            while spool.stats().delivered < n as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.send(true).expect("stop");
            task.await.expect("delivery");
        });
        let secs = started.elapsed().as_secs_f64();
        let s = spool.stats();
        let commits = s.commits - before.commits;
        let jobs = s.jobs - before.jobs;
        println!(
            "{:>12} {:>7} {:>8.2} {:>12.0} {:>8} {:>13}",
            concurrency,
            n,
            secs,
            n as f64 / secs,
            commits,
            jobs
        );
        rt.block_on(spool.close());
    }
}

/// The parent: runs a child that accepts (and delivers) events as fast as it can, printing
/// `ack <id> <body>` after each acknowledgement and `sent <id>` when its fake backend took one;
/// kills it with SIGKILL; reopens the spool and checks that every acknowledged event was
/// either handed to the backend before the kill or is delivered after the restart, and that
/// each acknowledged body is now a duplicate.
fn crash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("crash.db");
    let exe = std::env::current_exe().expect("current exe");
    let mut total_acked = 0;
    for round in 0..3 {
        let mut child = std::process::Command::new(&exe)
            .arg("crash-child")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Let it run a while, then kill it mid-stream.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child acks");
        std::thread::sleep(Duration::from_millis(300 + 200 * round));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        reader.join().expect("reader");
        let lines: Vec<String> = std::iter::once(first).chain(rx.try_iter()).collect();
        let mut acked = Vec::new();
        let mut sent = std::collections::HashSet::new();
        for l in &lines {
            let mut parts = l.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("ack"), Some(id), Some(body)) => {
                    acked.push((id.parse::<i64>().expect("id"), body.to_owned()))
                }
                (Some("sent"), Some(id), _) => {
                    sent.insert(id.parse::<i64>().expect("id"));
                }
                _ => {}
            }
        }
        total_acked += acked.len();

        // Restart: every acknowledged event not yet sent must still be there, and be delivered.
        let ops = SpoolOps::open(&path).expect("ops");
        let mut missing = 0;
        for (id, body) in &acked {
            match ops.show(*id) {
                Ok(d) => assert_eq!(d.body.as_ref(), body.as_bytes(), "event {id} body"),
                Err(_) if sent.contains(id) => {}
                Err(e) => {
                    eprintln!("LOST: event {id}: {e}");
                    missing += 1;
                }
            }
        }
        assert_eq!(missing, 0, "acknowledged events lost");
        let rt = runtime();
        let delivered = rt.block_on(async {
            let spool = Spool::open(SpoolSettings::new(&path)).expect("reopen after SIGKILL");
            for (_, body) in &acked {
                let e = event(body.clone());
                assert_eq!(spool.accept(e).await.expect("accept"), Accepted::Duplicate);
            }
            let counter = Arc::new(Count(AtomicU64::new(0)));
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = spool.start_delivery(counter.clone(), stopped);
            loop {
                let s = spool.summary().await.expect("summary");
                if s.routes.iter().all(|r| r.pending + r.in_flight == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.send(true).expect("stop");
            task.await.expect("delivery");
            spool.close().await;
            counter.0.load(Ordering::Relaxed)
        });
        println!(
            "round {round}: {} acknowledged before SIGKILL, {} handed to the backend before it, \
             {} delivered after restart, 0 lost, all acknowledged bodies now duplicates",
            acked.len(),
            sent.len(),
            delivered
        );
    }
    println!("crash check passed ({total_acked} acknowledged events over 3 kills)");
}

struct Count(AtomicU64);

impl Deliver for Count {
    fn deliver<'a>(
        &'a self,
        _event: &'a StoredEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = DeliveryOutcome> + Send + 'a>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { DeliveryOutcome::Done })
    }
}

/// The child's backend: takes a while, then succeeds, saying so first.
struct SlowPrint;

impl Deliver for SlowPrint {
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = DeliveryOutcome> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "sent {}", event.id);
            let _ = out.flush();
            DeliveryOutcome::Done
        })
    }
}

fn crash_child(path: &str) {
    let rt = runtime();
    rt.block_on(async {
        let spool = Spool::open(SpoolSettings::new(path)).expect("open spool");
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let _delivery = spool.start_delivery(Arc::new(SlowPrint), stopped);
        let pid = std::process::id();
        let mut handles = Vec::new();
        for t in 0..32 {
            let spool = spool.clone();
            handles.push(tokio::spawn(async move {
                for k in 0.. {
                    let body = format!("{{\"pid\":{pid},\"t\":{t},\"k\":{k}}}");
                    if let Ok(Accepted::Stored(id)) = spool.accept(event(body.clone())).await {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ack {id} {body}");
                        let _ = out.flush();
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    });
}
