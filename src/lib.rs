//! hubgate: an edge proxy that admits only genuine Meta webhook traffic.
//!
//! The way a request takes, module by module:
//! - [`listener`]: accept, PROXY protocol header, source allow-list, TLS handshake ([`tls`]),
//!   connection lifetime and drain;
//! - [`identity`]: who the client is — one [`identity::ClientContext`] per request, built by
//!   the generation's [`identity::ClientPolicy`];
//! - [`pipeline`]: route → client check → challenge | body + signature → deliver → respond and
//!   log, with one [`pipeline::Outcome`] per request;
//! - [`gate`]: the Meta rules as pure functions (challenge, signature);
//! - [`deliver`]: forward now through the upstream client, or store in the [`spool`] and
//!   deliver from there.
//!
//! Around it: [`config`] (file and environment into a validated [`Config`]), [`pki`]
//! (certificates and keys), [`state`] (what one configuration builds, what the process
//! shares), [`metrics`], and [`ops`] (lifecycle and the admin listener).

#![forbid(unsafe_code)]

pub mod config;
pub mod deliver;
pub mod gate;
pub mod identity;
pub mod inspect;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod pki;
pub mod secret;
pub mod spool;
pub mod state;
pub mod tls;

use std::net::SocketAddr;

pub use config::{Config, ConfigError};
pub use ops::lifecycle::{ConfigSource, ReloadError, Running};
pub use pki::unix_now;
pub use state::Generation;

/// Everything that can stop hubgate from starting or a reload from taking effect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Client(#[from] deliver::ClientError),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// An error and its causes, `: `-separated: for logs, `last_error` and messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Builds everything from a validated configuration, binds the listener and starts serving.
pub async fn run(config: Config) -> Result<Running, Error> {
    ops::lifecycle::start(Generation::new(config)?).await
}
