//! hubgate: an edge proxy that admits only genuine Meta webhook traffic.
//!
//! A request goes: TLS (rustls, client certificate verified against the configured anchors and
//! its CN checked, [`tls`]) → exact-path route → `hub.challenge` answer or `X-Hub-Signature-256`
//! check over the raw body ([`gate`]) → forward, byte for byte, to the route's upstream
//! ([`forward`]). [`server`] holds the accept loop and the request flow; [`config`] the
//! validated configuration that `check` and `run` share.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod dedupe;
pub mod edge;
pub mod forward;
pub mod gate;
pub mod metrics;
pub mod server;
pub mod spool;
pub mod tls;

use std::net::SocketAddr;

pub use config::{Config, ConfigError};
pub use server::{Prepared, Running};

/// Everything that can stop hubgate from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Client(#[from] forward::ClientError),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("{0}")]
    Reload(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Seconds since the Unix epoch (0 if the clock is before it): for certificate dates.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Builds everything from a validated configuration, binds the listener and starts serving.
pub async fn run(config: Config) -> Result<Running, Error> {
    server::start(Prepared::new(config)?).await
}
