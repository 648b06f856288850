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

/// Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`): each takes bytes an attacker
/// chooses, runs hubgate's parser over them and checks what must hold of the result. Not an
/// API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use http::{HeaderMap, HeaderName, HeaderValue};

    use crate::gate::batch::{self, SplitMode};
    use crate::gate::{challenge, signature};
    use crate::listener::proxy_protocol;
    use crate::secret::Secret;

    /// The verification request's query string.
    pub fn challenge_query(data: &[u8]) {
        let Ok(query) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(echo) = challenge::answer(Some(query), &Secret::new("fuzz-token")) {
            // An echo only for the right token.
            assert!(
                query.contains("fuzz-token")
                    || query.contains("fuzz%2Dtoken")
                    || query.contains('%')
            );
            assert!(echo.len() <= query.len());
        }
    }

    /// The signature headers, over a body: `data` is `value \0 body`.
    pub fn signature_header(data: &[u8]) {
        let (value, body) = match data.iter().position(|&b| b == 0) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (data, &[][..]),
        };
        let signer = signature::Signer::new(&[Secret::new("k1"), Secret::new("k2")], true);
        for name in [signature::SHA256_HEADER, signature::SHA1_HEADER] {
            let Ok(v) = HeaderValue::from_bytes(value) else {
                return;
            };
            let mut headers = HeaderMap::new();
            headers.insert(HeaderName::from_static(name), v);
            if let Ok(m) = signer.verify(&headers, body) {
                // Only a real MAC verifies: the value must be what signing gives.
                if name == signature::SHA256_HEADER {
                    let want = signature::Signer::new(
                        &[Secret::new(if m.secret_index == 0 { "k1" } else { "k2" })],
                        false,
                    )
                    .sign(body);
                    assert!(std::str::from_utf8(value)
                        .is_ok_and(|v| v.trim().eq_ignore_ascii_case(&want)));
                }
            }
        }
    }

    /// The PROXY protocol header at the start of a connection.
    pub fn proxy_header(data: &[u8]) {
        let data = &data[..data.len().min(proxy_protocol::MAX_PROXY_HEADER)];
        if let proxy_protocol::Parsed::Header { len, .. } = proxy_protocol::parse(data) {
            assert!(len > 0 && len <= data.len());
        }
    }

    /// A trusted proxy's forwarding and identity headers: `data` is lines `name: value`.
    pub fn identity_headers(data: &[u8]) {
        let mut headers = HeaderMap::new();
        for line in data.split(|&b| b == b'\n') {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
            ) else {
                continue;
            };
            headers.append(n, v);
        }
        crate::identity::proxy::fuzz_headers(&headers);
    }

    /// The configuration loader (TOML, then validation; files it names do not exist).
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let _ = crate::Config::from_toml_with_env(
            text,
            "fuzz.toml",
            Path::new("/nonexistent"),
            &|_| None,
        );
    }

    /// The Meta batch splitter: every part is JSON, its item a slice of the input, in order.
    pub fn batch_split(data: &[u8]) {
        for mode in [SplitMode::Entry, SplitMode::Item] {
            let Ok(parts) = batch::split(data, mode) else {
                continue;
            };
            assert!(!parts.is_empty());
            let mut end = 0;
            for p in &parts {
                assert!(
                    p.item.start >= end && p.item.end <= data.len(),
                    "items in order, inside the body"
                );
                end = p.item.end;
                let item = &data[p.item.clone()];
                assert!(
                    p.body.windows(item.len()).any(|w| w == item),
                    "the item's bytes, whole"
                );
                serde_json::from_slice::<serde::de::IgnoredAny>(&p.body)
                    .expect("every part is JSON");
            }
        }
    }
}
