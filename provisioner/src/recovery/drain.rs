//! Drain (kind `drain`): take a live host out for planned work without running anything
//! twice — Kubernetes' `drain`, with Nova's resiliency rule ("if it requires shutting down the
//! node, evacuate all the running VMs first").
//!
//! `hold → moving → maintenance → done`, or `failed` with the step and reason:
//! - **request** ([`request`]): refused, changing nothing, unless the host is active and the
//!   rest of the cell has room for every HA instance of it (placement's own rules: capacity,
//!   anti-affinity, priority). From then on the host is *cordoned*: placement leaves it out
//!   while its drain runs ([`draining`]).
//! - `hold`: each HA instance with shared storage goes live ([`super::migrate`]) to where
//!   placement puts it when both hosts' guards announce a migration URI; the others are marked
//!   held: its guard shuts each down cleanly (ACPI, then destroy after its `shutdown_timeout`)
//!   and starts none of them. A live migration that is given up is held then, and moves cold.
//! - `moving`: an instance its guard reported stopped *after* the hold gets a new owner
//!   (generation + 1, compare-and-set, clearing the hold in the same statement), by placement.
//!   Only an instance seen stopped moves, so none runs on two hosts; one whose guard never
//!   reports stays, and the drain fails at its deadline, letting the rest go (their guard starts
//!   them again). A host that stops heartbeating meanwhile is recovered as any other (the
//!   fence moves what is left): the drain fails and lets go.
//! - `maintenance`: the host turns `maintenance` — nothing of it is fenced or moved while there
//!   — until `host maintenance NAME off`.
//!
//! Non-HA instances stay with their host (they stop when it is shut down).

use std::collections::HashSet;
use std::time::Duration;

use nodekeeper_store::{Host, HostName, HostState, InstanceId, NewEvent, Operation, Store, StoreError, Timestamp};
use serde::{Deserialize, Serialize};

use nodekeeper_store::guard_api::Migration;

use super::place;
use crate::ops::Decision;

/// `operations.kind` of a drain.
pub const KIND: &str = "drain";
/// The actor of a drain's steps.
pub const ACTOR: &str = "controller";
/// How long the held instances may take to stop and move, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

crate::steps! {
    /// A step of the drain.
    pub enum Step ("drain") {
        /// Hold its HA instances.
        Hold = "hold",
        /// Move each once its guard reports it stopped.
        Moving = "moving",
        /// Put the host in maintenance.
        Maintenance = "maintenance",
    }
}
/// The drain's own state (the operation row's `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainData {
    /// The HA instances to move (at the request).
    pub instances: Vec<InstanceId>,
    /// When they were held, ms since the epoch (a guard report must be newer to count).
    pub held_at_ms: Option<i64>,
    /// How long `moving` may take, in milliseconds.
    pub timeout_ms: u64,
    /// Moved, when the drain ended.
    pub moved: usize,
    /// Of them, sent live (live migration) at the hold.
    #[serde(default)]
    pub live: usize,
}

/// The hosts whose drain runs now (cordoned: placement leaves them out).
pub async fn draining(store: &Store) -> Result<HashSet<HostName>, StoreError> {
    Ok(store.running_operations(KIND).await?.into_iter().map(|o| o.target).collect())
}

/// The hosts placement may use: all but the cordoned ones.
pub fn uncordoned(hosts: Vec<Host>, cordoned: &HashSet<HostName>) -> Vec<Host> {
    hosts.into_iter().filter(|h| !cordoned.contains(&h.name)).collect()
}

/// Where `moving` (instances of `host`) would go now, by placement's rules, among the hosts
/// not being drained; `all` is every instance.
async fn placement(
    store: &Store,
    host: &HostName,
    moving: &[InstanceId],
    all: &[nodekeeper_store::Instance],
    now: Timestamp,
    grace: Duration,
) -> Result<Vec<(InstanceId, Result<HostName, String>)>, StoreError> {
    let hosts = uncordoned(store.hosts().await?, &draining(store).await?);
    let (ip, hp) = (store.instance_policies().await?, store.host_inventories().await?);
    // A restart order does not bind a planned move: what it waits for already runs.
    let run: HashSet<InstanceId> = all.iter().map(|i| i.uuid).collect();
    let policies = place::Policies { instances: &ip, hosts: &hp, running: &run };
    Ok(place::place(host, moving, &hosts, all, policies, now, grace))
}

/// Why a drain of `host` cannot start now, or the HA instances it will move. Reads only.
pub async fn plan(store: &Store, host: &HostName, grace: Duration) -> anyhow::Result<Vec<InstanceId>> {
    let h = store.require_host(host).await?;
    if h.state != HostState::Active {
        crate::conflict!("host drain {host}: the host is {}, not active", h.state);
    }
    let all = store.instances(None).await?;
    let moving: Vec<InstanceId> =
        all.iter().filter(|i| &i.owner == host && i.ha && !i.deleted).map(|i| i.uuid).collect();
    let placed = placement(store, host, &moving, &all, store.now().await?, grace).await?;
    let name = |id: &InstanceId| all.iter().find(|i| i.uuid == *id).map_or_else(|| id.to_string(), |i| i.name.clone());
    let refused: Vec<String> =
        placed.iter().filter_map(|(id, to)| to.as_ref().err().map(|why| format!("{} ({why})", name(id)))).collect();
    if !refused.is_empty() {
        crate::conflict!(
            "host drain {host}: the rest of the cell has no room for {}; nothing changed",
            refused.join(", ")
        );
    }
    Ok(moving)
}

/// Starts a drain of `host` (or returns the one that runs: `false`), after [`plan`] found
/// room for all its HA instances.
pub async fn request(
    store: &Store,
    host: &HostName,
    grace: Duration,
    timeout: Duration,
    actor: &str,
) -> anyhow::Result<(Operation, bool)> {
    if let Some(op) = store.latest_operation(host).await? {
        if op.status == nodekeeper_store::OperationStatus::Running {
            if op.kind == KIND {
                return Ok((op, false));
            }
            crate::conflict!("host drain {host}: a {} of it runs (operation {}, step {})", op.kind, op.id, op.step);
        }
    }
    let instances = plan(store, host, grace).await?;
    let data = DrainData {
        instances,
        held_at_ms: None,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        moved: 0,
        live: 0,
    };
    let json = serde_json::to_string(&data).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (op, started) = store.start_operation(KIND, host, Step::Hold.as_str(), None, &json, actor).await?;
    if !started && op.kind != KIND {
        crate::conflict!("host drain {host}: a {} of it runs (operation {}, step {})", op.kind, op.id, op.step);
    }
    Ok((op, started))
}

/// The drain machine on the operation engine, at `now`.
pub struct Drain {
    /// The controller's grace (placement uses hosts heard within it).
    pub grace: Duration,
    /// The controller's clock.
    pub now: Timestamp,
}

impl Drain {
    /// What `moving` does: moves each held instance its guard reported stopped since the hold;
    /// returns (moved, still held here, why each unplaced one waits).
    async fn move_stopped(
        &self,
        store: &Store,
        host: &HostName,
        data: &DrainData,
    ) -> Result<(usize, usize, Vec<NewEvent>), StoreError> {
        let mut all = store.instances(None).await?;
        // An HA instance of the host neither held nor migrating is held: one that came to the
        // host after the request (an import, an evacuation), or whose live migration was
        // given up (it moves cold). The host must end with none unprotected.
        let loose: Vec<InstanceId> = all
            .iter()
            .filter(|i| &i.owner == host && i.ha && !i.deleted && !i.held && i.migrating_to.is_none())
            .map(|i| i.uuid)
            .collect();
        if !loose.is_empty() {
            let why = "its host is being drained and it does not migrate live";
            store.hold_instances(host, &loose, true, ACTOR, why).await?;
            all = store.instances(None).await?;
        }
        // Live migrations under way: the controller gives each its new owner once it is seen
        // done (super::migrate), or gives it up (then it is held and moved cold).
        let migrating = all.iter().filter(|i| &i.owner == host && !i.deleted && i.migrating_to.is_some()).count();
        // Every held instance of the host (only its drain holds them).
        let held: Vec<_> = all.iter().filter(|i| &i.owner == host && i.held && !i.deleted).collect();
        if held.is_empty() {
            return Ok((0, migrating, Vec::new()));
        }
        let report = store.guard_report(host).await?;
        let drain_held = data.held_at_ms.unwrap_or(i64::MAX);
        // Stopped, by a report newer than its hold (each instance's own: its `updated_at`).
        let stopped: Vec<InstanceId> = match &report {
            Some(r) => held
                .iter()
                .filter(|i| r.at.0 > drain_held.max(i.updated_at.0))
                .filter(|i| !r.domains.iter().any(|d| d.uuid == i.uuid && d.running))
                .map(|i| i.uuid)
                .collect(),
            None => Vec::new(),
        };
        if stopped.is_empty() {
            return Ok((0, held.len(), Vec::new()));
        }
        let placed = placement(store, host, &stopped, &all, self.now, self.grace).await?;
        let (mut moved, mut waiting) = (0, Vec::new());
        for (id, to) in placed {
            let Some(instance) = held.iter().find(|i| i.uuid == id) else { continue };
            match to {
                Ok(to) => {
                    let reason = format!("drained from {host} (stopped there, reported by its guard)");
                    match store.transfer_held(id, instance.generation, &to, ACTOR, &reason).await {
                        Ok(_) => moved += 1,
                        Err(StoreError::Conflict { .. } | StoreError::Invalid(_)) => {} // moved or let go meanwhile
                        Err(e) => return Err(e),
                    }
                }
                Err(why) => {
                    let m = format!("{} stays held on draining host {host}: {why}", instance.name);
                    let key = format!("drain-unplaced:{id}:{}:{why}", instance.generation.0);
                    waiting.push(NewEvent::instance(ACTOR, "instance.unplaced", host, id, m).with_key(key));
                }
            }
        }
        Ok((moved, held.len() - moved + migrating, waiting))
    }

    /// The `hold` step's live migrations: each HA instance of `host` with shared storage goes
    /// live to where placement puts it, when both hosts' guards announce a migration URI;
    /// returns those migrating (also ones an earlier attempt of this step began).
    async fn start_live(
        &self,
        store: &Store,
        host: &HostName,
        ids: &[InstanceId],
    ) -> Result<Vec<InstanceId>, StoreError> {
        let uri_of = |profile: Option<nodekeeper_store::FencingProfile>| profile.and_then(|p| p.migration_uri);
        if uri_of(store.guard_fencing_of(host).await?).is_none() {
            return Ok(Vec::new());
        }
        let all = store.instances(None).await?;
        let mine = |i: &&nodekeeper_store::Instance| &i.owner == host && ids.contains(&i.uuid) && !i.deleted;
        let mut live: Vec<InstanceId> =
            all.iter().filter(mine).filter(|i| i.migrating_to.is_some()).map(|i| i.uuid).collect();
        let candidates: Vec<InstanceId> = all
            .iter()
            .filter(mine)
            .filter(|i| i.storage == nodekeeper_store::Storage::Shared && !i.held && i.migrating_to.is_none())
            .map(|i| i.uuid)
            .collect();
        if candidates.is_empty() {
            return Ok(live);
        }
        let mut uris = std::collections::HashMap::new();
        for (id, to) in placement(store, host, &candidates, &all, self.now, self.grace).await? {
            let (Ok(to), Some(i)) = (to, all.iter().find(|i| i.uuid == id)) else { continue };
            if !uris.contains_key(&to) {
                uris.insert(to.clone(), uri_of(store.guard_fencing_of(&to).await?));
            }
            let Some(uri) = uris[&to].clone() else { continue }; // the target takes no migrations
            let why = format!("host {host} is drained; shared storage, and both guards take live migrations");
            match store.start_migration(id, i.generation, &Migration { from: host.clone(), to, uri }, ACTOR, &why).await
            {
                Ok(()) => live.push(id),
                Err(StoreError::Conflict { .. }) => {} // changed meanwhile: it is held and moved cold
                Err(e) => return Err(e),
            }
        }
        Ok(live)
    }
}

impl crate::ops::Machine for Drain {
    type Step = Step;
    type Data = DrainData;
    const KIND: &'static str = KIND;
    const ACTOR: &'static str = ACTOR;

    fn cancel(&self, step: Step, by: &str) -> Result<Decision<Step>, String> {
        crate::ops::cancel_rule(KIND, step.as_str())?;
        Ok(Decision::Abort { why: format!("cancelled by {by}: what it holds is let go (its guard starts it again)") })
    }

    async fn decide(
        &self,
        store: &Store,
        op: &Operation,
        step: Step,
        data: &mut DrainData,
    ) -> Result<Decision<Step>, StoreError> {
        let host = store.require_host(&op.target).await?;
        if host.state != HostState::Active {
            let reason = format!("the host is {} now: recovery, not the drain, moves what is left", host.state);
            return Ok(Decision::Failed { at: step, reason });
        }
        Ok(match step {
            Step::Hold => {
                data.held_at_ms = Some(self.now.0);
                let timeout = Duration::from_millis(data.timeout_ms);
                let why = format!(
                    "{} HA instance(s): held (its guard shuts them down) or migrating live",
                    data.instances.len()
                );
                Decision::Go { to: Step::Moving, after: Some(timeout), why }
            }
            Step::Moving => {
                let (moved, left, waiting) = self.move_stopped(store, &host.name, data).await?;
                if !waiting.is_empty() {
                    store.record_events(&waiting).await?;
                }
                if left == 0 {
                    // What it held and no longer owns has moved.
                    let stayed = store
                        .instances(Some(&host.name))
                        .await?
                        .iter()
                        .filter(|i| data.instances.contains(&i.uuid) && !i.deleted)
                        .count();
                    data.moved = data.instances.len().saturating_sub(stayed);
                    let why = format!("{} instance(s) moved", data.moved);
                    Decision::Go { to: Step::Maintenance, after: None, why }
                } else if op.deadline.is_some_and(|d| d <= self.now) {
                    let reason = format!(
                        "{left} held instance(s) did not stop and move within {}: let go (their guard starts them again)",
                        humantime::format_duration(Duration::from_millis(data.timeout_ms))
                    );
                    Decision::Failed { at: Step::Moving, reason }
                } else {
                    if moved > 0 {
                        tracing::info!(host = %host.name, moved, left, "drain: moved stopped instances");
                    }
                    Decision::Stay
                }
            }
            Step::Maintenance => Decision::Done {
                why: format!("{} moved ({} sent live); the host is in maintenance", data.moved, data.live),
            },
        })
    }

    async fn effects(
        &self,
        store: &Store,
        op: &Operation,
        _step: Step,
        data: &mut DrainData,
        decision: &Decision<Step>,
    ) -> Result<(), StoreError> {
        let host = &op.target;
        match decision {
            Decision::Go { to: Step::Moving, .. } => {
                let live = self.start_live(store, host, &data.instances).await?;
                data.live = live.len();
                let cold: Vec<InstanceId> = data.instances.iter().filter(|i| !live.contains(i)).copied().collect();
                let why = format!("host {host} is drained (operation {})", op.id);
                store.hold_instances(host, &cold, true, ACTOR, &why).await.map(drop)
            }
            Decision::Done { why } => {
                store.set_host_state_from(host, HostState::Active, HostState::Maintenance, ACTOR, why).await.map(drop)
            }
            Decision::Failed { reason, .. } | Decision::Abort { why: reason } => {
                let why = format!("the drain of {host} ended: {reason}");
                let held: Vec<InstanceId> =
                    store.instances(Some(host)).await?.iter().filter(|i| i.held).map(|i| i.uuid).collect();
                store.hold_instances(host, &held, false, ACTOR, &why).await.map(drop)
            }
            _ => Ok(()),
        }
    }
}
