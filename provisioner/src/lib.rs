//! The provisioner: network boot (DHCP, TFTP, HTTP), BMC power, reimaging, the recovery
//! controllers, and the admin commands operators use on the database.

pub mod admin;
pub mod bmc;
pub mod cli;
pub mod dhcp;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod recovery;
pub mod reimage;
pub mod serve;
pub mod tftp;
