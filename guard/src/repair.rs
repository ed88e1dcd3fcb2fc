//! `nodekeeper-guard repair`: the one thing the provisioner may ask of a suspect host over SSH
//! before it power-cycles it (the seed's "the resiliency agent on the node is approached to
//! perform recover/rejuvenation (e.g., via SSH)"): restart libvirtd and the guard, and say
//! what happened. The provisioner's key is limited to this command by the node's
//! `authorized_keys` (`command="nodekeeper-guard repair",restrict`), so the key can do
//! nothing else. Whether the repair worked is not this report's to say: only a heartbeat
//! from the restarted guard calls the fence off.

use std::time::Duration;

use serde::Serialize;

use crate::config::Config;

pub use crate::watch::services::Ran;

/// What `repair` did (one JSON line on stdout).
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// This host.
    pub host: String,
    /// libvirtd's restart (none configured: `null`).
    pub libvirtd: Option<Ran>,
    /// Whether libvirt answered after it, within `libvirt_timeout`.
    pub libvirt_answers: bool,
    /// The guard's restart.
    pub guard: Option<Ran>,
}

impl RepairReport {
    /// Everything it ran succeeded.
    pub fn ok(&self) -> bool {
        [&self.libvirtd, &self.guard].into_iter().flatten().all(|r| r.ok) && self.libvirt_answers
    }
}

/// Restarts libvirtd (`watch.libvirt_restart`), checks that libvirt answers, then restarts
/// the guard (`watch.guard_restart`): the guard last, so that it comes back onto a libvirtd
/// that works.
pub async fn repair(config: &Config) -> RepairReport {
    let w = &config.watch;
    let limit = w.libvirt_timeout.max(Duration::from_secs(30));
    let libvirtd = crate::watch::services::run_command_within(&w.libvirt_restart, limit).await;
    let uri = config.libvirt.uri.clone();
    let mut libvirt_answers = false;
    // A restarted libvirtd takes a moment to listen: ask until it answers, within its timeout.
    let deadline = tokio::time::Instant::now() + w.libvirt_timeout;
    while tokio::time::Instant::now() < deadline {
        let u = uri.clone();
        let listed = tokio::time::timeout(
            w.libvirt_timeout,
            tokio::task::spawn_blocking(move || crate::watch::converge::list(&u)),
        )
        .await;
        if matches!(listed, Ok(Ok(Ok(_)))) {
            libvirt_answers = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let guard = crate::watch::services::run_command_within(&w.guard_restart, limit).await;
    RepairReport { host: config.host.to_string(), libvirtd, libvirt_answers, guard }
}
