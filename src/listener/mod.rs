//! The listener: accepts TCP connections up to `server.max_connections`, hands each to
//! `connection` (PROXY header, source allow-list, TLS handshake, HTTP/1.1 and HTTP/2, idle
//! timeout) and, on shutdown, stops accepting and drains: open connections finish their
//! in-flight requests within `server.drain_timeout`.

mod connection;
pub mod proxy_protocol;
mod tls_io;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn, Instrument};

use crate::state::Shared;

/// Accepts until `stopped` turns true, then drains and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let max_connections = shared.started_with.server.max_connections;
    // One permit per open connection: caps connections, and tells when the drain is complete.
    let limit = Arc::new(Semaphore::new(max_connections));

    loop {
        let permit = tokio::select! {
            _ = stopped.changed() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, never stop serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // The permit moves into the connection's own future: wrapping that future in another
        // async block would store it twice in the task (the captured value and the awaited one).
        let conn = connection::serve(
            stream,
            peer,
            shared.current(),
            shared.clone(),
            stopped.clone(),
            permit,
        );
        tokio::spawn(conn.instrument(tracing::info_span!("conn", %peer)));
    }

    drop(listener);
    let open = max_connections - limit.available_permits();
    let deadline = shared.current().config().server.drain_timeout;
    info!(open_connections = open, ?deadline, "draining");
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(deadline, limit.acquire_many(all))
        .await
        .is_err()
    {
        let left = max_connections - limit.available_permits();
        warn!(
            open_connections = left,
            "drain deadline passed; closing what is left"
        );
    }
}
