//! The Meta rules, as pure functions over bytes and headers: the `hub.challenge` answer
//! ([`challenge`]), the `X-Hub-Signature-256` check ([`signature`]) and the cutting of a batch
//! into its updates ([`batch`]). Nothing here knows
//! about sockets, TLS or configuration files; what a refusal becomes (status, log, metric) is
//! decided by [`crate::pipeline::Outcome`].

pub mod batch;
pub mod challenge;
pub mod signature;

pub use challenge::ChallengeError;
pub use signature::SignatureError;
