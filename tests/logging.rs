//! The binary's log writer: a stalled log reader never blocks requests. Lines go through a
//! bounded queue written by a thread of their own (dropped and counted when it is full), so a
//! pipe nobody reads — a stuck log shipper — costs log lines, not webhooks.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_while_nobody_reads_the_log() {
    let (pki, upstream, mut config) = Scenario::new().prepare().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    config.server.listen = format!("127.0.0.1:{port}");
    let path = config.write(&pki, "hubgate.toml");
    // stderr is a pipe this test never reads: it fills after a few hundred lines (64 KiB).
    let mut child = hubgate_command(&["run", "--config", path.to_str().unwrap()], "info", &[])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hubgate runs");
    let gate = Gate::at(format!("127.0.0.1:{port}").parse().unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(gate.addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the gate starts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = client(&pki, Some(&pki.meta_client()));
    // Each request logs one access line of ~250 bytes: 2,000 of them are ~8 pipes full.
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..2000 {
            let body = format!("{{\"object\":\"page\",\"entry\":[{{\"id\":\"{i}\"}}]}}");
            let resp = post_signed(&http, &gate.url("/webhook"), body.as_bytes())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "request {i}");
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        answered.is_ok(),
        "requests stalled behind a log pipe nobody reads"
    );
    assert_eq!(upstream.requests().len(), 2000);
}
