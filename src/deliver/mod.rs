//! Delivery: how an authenticated event reaches the backend. Sync routes forward it now
//! through the [`Upstream`] client and relay the answer (remembering delivered bodies in
//! [`RecentDeliveries`] to answer Meta's retries); spool routes [`spool::store`] it durably
//! and deliver it later through [`spool::SpoolDelivery`].

mod h1;
pub mod recent;
pub mod spool;
pub mod upstream;

pub use recent::{Recent, RecentDeliveries};
pub use upstream::{ClientError, ForwardError, Upstream};
