//! nodekeeper's host agent.
//!
//! - [`boot`]: runs once before libvirtd and quarantines stale definitions.
//! - [`watch`]: the long-lived service that heartbeats, converges, watches libvirtd and
//!   self-fences when cut off.
//! - [`backend`]: the database itself, or the provisioner's guard API in front of it.
//! - [`peers`]: guards asking each other (the self-fence's quorum, heartbeat relay).
//! - [`repair`]: what the provisioner's SSH key may run on a suspect host before a power-cycle.
//!
//! Layout: **pure cores**, decisions on plain data, table-tested — `boot::decide`,
//! `isolation` (the quorum rule), `watch::converge::plan`, `watch::services`'
//! `RestartBudget`, `domain` (XML parsing); **adapters** that touch the world — `backend`
//! (database or guard API), `libvirt` (one connection per pass), `boot::{scan, execute, live}`
//! (files and libvirt), `peers` (the peer protocol), `watch::notify` (systemd, the hardware
//! watchdog), `fsutil`; **wiring** — `watch` (the loop), `main.rs` (the command line), and
//! `config`.

pub mod backend;
pub mod boot;
pub mod config;
pub mod domain;
pub mod fault;
pub mod fsutil;
pub mod isolation;
pub mod libvirt;
pub mod peers;
pub mod repair;
pub mod watch;
