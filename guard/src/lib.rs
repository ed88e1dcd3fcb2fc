//! nodekeeper's host agent.
//!
//! - [`boot`]: runs once before libvirtd and quarantines stale definitions.
//! - [`watch`]: the long-lived service that heartbeats, converges, watches libvirtd and
//!   self-fences when cut off.
//! - [`backend`]: the database itself, or the provisioner's guard API in front of it.
//! - [`peers`]: guards asking each other (the self-fence's quorum, heartbeat relay).

pub mod backend;
pub mod boot;
pub mod config;
pub mod domain;
pub mod fault;
pub mod fsutil;
pub mod peers;
pub mod watch;
