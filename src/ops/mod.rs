//! Operating a gate: its [`lifecycle`] (start, reload, signals, drain) and the [`admin`]
//! listener (health, readiness, metrics).

pub mod admin;
pub mod crls;
pub mod lifecycle;
