//! The provisioner: network boot (DHCP, TFTP, HTTP), BMC power, reimaging, the recovery
//! controllers, and the admin commands operators use on the database.
//!
//! Layout, with the direction of every import (no cycles): `config` (a leaf) ← `bmc` (the
//! drivers and `BmcFactory`) ← `ops` (the one operation engine and runner) ← `reimage`,
//! `recovery` ← `http`, `dhcp`, `tftp` ← `serve` (wiring: supervised components) ← `admin` ←
//! `cli`. **Pure cores**, decisions on plain data, table-tested: `reimage::machine`,
//! `recovery::{detect, place, fence}`, `dhcp::logic`, `http::ipxe`, `tftp`'s packet codec.
//! **Adapters**: the BMC drivers, the HTTP/DHCP/TFTP servers, the operation engine's effects.
//! **Wiring**: `serve`, `cli`, `main.rs`.

pub mod admin;
pub mod bmc;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod dhcp;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod recovery;
pub mod reimage;
pub mod remote;
pub mod serve;
pub mod tftp;
