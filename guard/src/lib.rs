//! nodekeeper's host agent.
//!
//! - [`boot`]: runs once before libvirtd and quarantines stale definitions.
//! - `watch` (to come): the long-lived service that heartbeats and converges.

pub mod boot;
pub mod config;
pub mod domain;
pub mod fault;
pub mod fsutil;
pub mod watch;
