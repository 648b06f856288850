//! The black-box suite's harness. Every test runs real sockets with real TLS on 127.0.0.1:
//!
//! - [`pki`]: a fresh PKI per test (rcgen) in a `TempDir`; nothing is checked in;
//! - [`upstream`]: a recording (and scriptable) HTTP/1.1 backend;
//! - [`client`]: reqwest and raw HTTP/1.1-over-TLS clients;
//! - [`gate`]: the configuration as typed serde structs, and a gate started from it;
//! - [`scenario`]: one builder that puts the above together for a test;
//! - [`bin`]: the `hubgate` binary as a command or a signalled child process;
//! - [`browser`]: a headless Chromium driven over the DevTools protocol.
//!
//! This file holds what requests are made of: the constants, signing, and sample bodies.

#![allow(dead_code, unused_imports)] // every test binary uses a different subset

pub mod bin;
pub mod browser;
pub mod client;
pub mod gate;
pub mod pki;
pub mod postgres;
pub mod scenario;
pub mod upstream;

pub use bin::*;
pub use browser::*;
pub use client::*;
pub use gate::*;
pub use pki::*;
pub use postgres::*;
pub use scenario::*;
pub use upstream::*;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The CN Meta's webhook client certificate carries (hubgate's default allow-list).
pub const META_CN: &str = "client.webhooks.fbclientcerts.com";
pub const TOKEN: &str = "mytoken";
pub const SECRET: &str = "s3cret";
/// The signature header, lower-case as HTTP/2 sends it.
pub const SIG: &str = "x-hub-signature-256";

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`, computed independently of hubgate.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `sha1=<hex HMAC-SHA1(secret, body)>` for the legacy `X-Hub-Signature` header.
pub fn sign_sha1(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A typical WhatsApp Business webhook payload.
pub fn sample_body() -> Vec<u8> {
    br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","messages":[{"from":"16315551181","id":"wamid.ABGGFlA5Fpa","timestamp":"1504902988","text":{"body":"this is a text message"},"type":"text"}]},"field":"messages"}]}]}"#.to_vec()
}

/// A sample event made unique by a per-process counter, so that no two posts in a test carry
/// the same bytes (a gate may recognise a repeated delivery).
pub fn unique_body() -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(r#"{{"object":"page","entry":[{{"id":"{n}","time":1,"messaging":[]}}]}}"#).into_bytes()
}

/// A verification request's path and query with the right token.
pub fn challenge_path(challenge: &str) -> String {
    format!("/webhook?hub.mode=subscribe&hub.challenge={challenge}&hub.verify_token={TOKEN}")
}

/// SplitMix64: a seeded, reproducible source of kill moments.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The crash tests' seed: `HUBGATE_CRASH_SEED=N` replays another schedule than `default`.
pub fn crash_seed(default: u64) -> u64 {
    hubgate::config::process_env("HUBGATE_CRASH_SEED")
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
