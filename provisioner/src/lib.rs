//! The provisioner: network boot (DHCP, TFTP, HTTP), BMC power, reimaging, the recovery
//! controllers, and the admin commands operators use on the database.

pub mod admin;
pub mod cli;
pub mod logging;
