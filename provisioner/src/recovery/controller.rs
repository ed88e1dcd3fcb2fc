//! The recovery controller inside `serve`: while this replica holds the `controller`
//! leadership lease, each tick it looks at every host ([`super::detect`]), marks suspects and
//! starts fence operations; each running fence is driven by a task of its own under the same
//! lease ([`Controller::run`]: a fence waiting on its BMC holds up neither detection nor the
//! other fences), step by step ([`super::fence`]) with a compare-and-set on the step, like the
//! reimage executor, their step changes in group commits; evacuations asked for at once done
//! together in one pass; requests to BMCs and PDUs at most `bmc_at_once` in flight.
//! Everything it knows is in the database: a replica that takes the lease over resumes every
//! fence where it stands, and two replicas acting on one fence at once (a stale leader
//! finishing its step) move no instance twice — each move is a compare-and-set on the
//! instance's generation.
//!
//! `tick` takes the time as an argument: tests drive it with a simulated clock, and then it
//! steps the fences itself (until each waits) and runs the GC pass when due.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_store::{
    Host, HostName, HostState, Instance, InstanceId, NewEvent, Operation, OperationStatus, Store, StoreError, Timestamp,
};
use tokio_util::sync::CancellationToken;

use super::detect::{self, Action};
use super::fence::{self, AfterFence, Decision, FenceData, Step, Work};
use super::place;
use super::watchdog::{self, Look, Quorum, Seen};
use crate::bmc::{self, PowerAction};
use crate::reimage::executor::{self as reimage, BmcFactory};
use crate::reimage::machine::{Deadlines, Limits};

/// The operation kind.
pub const KIND: &str = "fence";
/// The leadership role.
pub const ROLE: &str = "controller";
/// Who the controller's events say acted.
pub const ACTOR: &str = "provisioner:recovery";

pub use crate::config::RecoveryConfig;

/// What one tick did (for tests and logs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Service copies placed, moved or dropped.
    pub service_changes: usize,
    /// Whether this replica held the lease.
    pub leader: bool,
    /// Detection's actions taken.
    pub actions: Vec<Action>,
    /// Fence operations stepped.
    pub fences_stepped: usize,
    /// What the GC pass found, if it ran this tick.
    pub gc: Option<GcReport>,
}

/// What one GC pass found (each also an event, recorded once per occurrence).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// A domain runs on a host the database does not assign it to (or it is deleted).
    pub running_astray: Vec<(InstanceId, HostName)>,
    /// An HA instance is not running on the host the database assigns it to.
    pub not_running: Vec<(InstanceId, HostName)>,
    /// Fenced hosts whose HA instances found no room before: evacuation started again.
    pub retried: Vec<HostName>,
}

/// One controller replica.
pub struct Controller<F: BmcFactory> {
    store: Store,
    factory: Arc<F>,
    config: RecoveryConfig,
    holder: String,
    last_alert: std::sync::Mutex<Option<(usize, usize)>>,
    last_gc: std::sync::Mutex<Option<Timestamp>>,
    /// The lease term this replica leads in, and since when it watches: silence is counted
    /// from then at the earliest. A controller that was not running (an upgrade, a crash, the
    /// provisioner down — through which guards on the embedded SQLite heartbeat) did not see
    /// the heartbeats it missed; it must not take its own absence for the hosts' silence.
    watching: std::sync::Mutex<Option<(i64, Timestamp)>>,
    /// Per running fence (by operation id): the lease term, the unbroken run of looks that saw
    /// a majority of the host's guard's quorum cell heartbeat, and the latest look. Kept in
    /// memory on purpose: a new leader (or a restarted one) did not see what happened before
    /// it, and starts the count again.
    quorums: std::sync::Mutex<HashMap<i64, QuorumLook>>,
    /// Where each tick is counted and timed, if anywhere.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The fleet as this tick's evacuations see it ([`Fleet`]).
    fleet: std::sync::Mutex<Option<Fleet>>,
    /// Whether the mass-failure brake held at the last look.
    braked: std::sync::Mutex<bool>,
    /// Live migrations whose source reported a failure, and since when ([`super::migrate`]).
    migration_failures: std::sync::Mutex<HashMap<InstanceId, Timestamp>>,
    /// Whether fences are driven by tasks of their own beside the tick ([`Controller::run`]),
    /// not stepped inside it ([`Controller::tick`], as tests drive it).
    background: bool,
    /// One evacuation at a time: placement counts the room each one leaves.
    evacuating: tokio::sync::Mutex<()>,
    /// Requests to BMCs and PDUs in flight, at most this many at once (a rack that lost power
    /// is not a wave of thousands of requests at once, nor fenced one host after another):
    /// power commands and the polls that confirm them ([`bmc::Slotted`]), and the probes.
    bmc_slots: tokio::sync::Semaphore,
    /// Fences (operation ids) started for hosts their BMC said were off: their `confirm` need
    /// not give the host one more interval (see [`detect::to_probe`]). Forgotten when the
    /// fence's driver ends.
    known_off: std::sync::Mutex<HashSet<i64>>,
    /// Poked when a tick started a fence: its driver starts at once.
    started: tokio::sync::Notify,
    /// Evacuations asked for, waiting for the next pass ([`Controller::evacuate`]).
    evac_queue: std::sync::Mutex<Vec<EvacuationRequest>>,
}

/// How long the evacuation passes of fences driven in the background keep one read of the
/// fleet's instances (at 10,000 hosts, a read of 100,000 instances takes about a second).
const FLEET_KEPT: Duration = Duration::from_secs(10);

/// A host to evacuate, and where its outcome goes.
type EvacuationRequest = (Host, tokio::sync::oneshot::Sender<Result<(usize, usize, usize), StoreError>>);

/// A fence's quorum looks: (lease term, the unbroken run, the latest look).
type QuorumLook = (i64, Option<Seen>, Quorum);

impl<F: BmcFactory> Controller<F> {
    /// A replica named `holder` (unique among replicas: host name and process id).
    pub fn new(store: Store, factory: Arc<F>, config: RecoveryConfig, holder: String) -> Controller<F> {
        let bmc_at_once = config.bmc_at_once.max(1);
        Controller {
            store,
            factory,
            config,
            holder,
            last_alert: std::sync::Mutex::new(None),
            last_gc: std::sync::Mutex::new(None),
            watching: std::sync::Mutex::new(None),
            braked: std::sync::Mutex::new(false),
            quorums: std::sync::Mutex::new(HashMap::new()),
            metrics: None,
            fleet: std::sync::Mutex::new(None),
            migration_failures: std::sync::Mutex::new(HashMap::new()),
            background: false,
            evacuating: tokio::sync::Mutex::new(()),
            bmc_slots: tokio::sync::Semaphore::new(bmc_at_once),
            known_off: std::sync::Mutex::new(HashSet::new()),
            started: tokio::sync::Notify::new(),
            evac_queue: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Counts each tick and its time in `metrics` (`/metrics`).
    pub fn with_metrics(self, metrics: Arc<crate::metrics::Metrics>) -> Controller<F> {
        Controller { metrics: Some(metrics), ..self }
    }

    /// Runs the controller until `shutdown`, then gives the lease up: a tick every `interval`
    /// (detection, live migrations, drains, services), the GC pass every `gc_interval`, and
    /// each running fence driven by a task of its own ([`Controller::drive`]) — so a fence
    /// waiting on a BMC holds up neither detection nor the other fences, and a fence's steps
    /// follow each other as soon as each is done, not a tick apart.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(Controller { background: true, ..self });
        let fences = tokio::spawn(me.clone().drive_fences(shutdown.clone()));
        let gc = tokio::spawn(me.clone().gc_loop(shutdown.clone()));
        // A tick every interval from the start of the last (not an interval after its end).
        let mut every = tokio::time::interval(me.config.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            // The database's time: heartbeats and leases were stamped with it.
            let began = std::time::Instant::now();
            let ticked = match me.store.now().await {
                Ok(now) => me.tick(now).await.map(drop),
                Err(e) => Err(e),
            };
            let took = began.elapsed();
            if let Some(m) = &me.metrics {
                m.recovery_tick(took);
            }
            if took > me.config.interval {
                tracing::warn!(took_ms = took.as_millis() as u64, "recovery: a tick took longer than the interval");
            }
            if let Err(e) = ticked {
                tracing::warn!("recovery: {e}");
            }
        }
        let _ = tokio::join!(fences, gc);
        let _ = me.store.release_leadership(ROLE, &me.holder).await;
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.config.lease_ttl.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// The lease — taken or renewed (`renew`, the tick), or only read (the fence drivers and
    /// the GC pass: the tick renews it) — and the store that writes under it, if this replica
    /// leads.
    async fn leading(&self, renew: bool) -> Result<Option<(Store, nodekeeper_store::Leadership)>, StoreError> {
        let lease = if renew {
            self.store.acquire_leadership(ROLE, &self.holder, self.ttl_ms()).await?
        } else {
            match self.store.leadership(ROLE).await? {
                Some(lease) => lease,
                None => return Ok(None),
            }
        };
        if !lease.held_by(&self.holder, self.store.now().await?) {
            return Ok(None);
        }
        Ok(Some((self.store.under_lease(lease.token()), lease)))
    }

    /// One look at the cell at `now`. Everything it writes, it writes under the lease's term
    /// (a fencing token: [`Store::under_lease`]), and every BMC command it sends is gated on
    /// that term ([`bmc::Leased`]); while it works it renews the lease, and when the lease is
    /// lost (another replica took over while this one was paused) it stops where it is.
    /// Driven by a test (not by [`Controller::run`]), it also steps the running fences until
    /// each waits, and runs the GC pass when it is due.
    pub async fn tick(&self, now: Timestamp) -> Result<TickReport, StoreError> {
        let Some((store, lease)) = self.leading(true).await? else { return Ok(TickReport::default()) };
        crate::ops::while_leading(&self.store, &lease, self.ttl_ms(), self.lead(&store, &lease, now)).await?
    }

    /// Gives each running fence a driver ([`Controller::drive`]) while this replica leads,
    /// looking when a tick started one and every interval; a new term starts them again.
    async fn drive_fences(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        // Operation by driver task, and the term they drive in.
        let mut driving: HashMap<tokio::task::Id, i64> = HashMap::new();
        let mut term = None;
        // The group commit of the drivers' step changes, under this term's lease.
        let mut writes: Option<crate::ops::writes::StepWrites> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.started.notified() => {}
                _ = tokio::time::sleep(self.config.interval) => {}
            }
            while let Some(done) = tasks.try_join_next_with_id() {
                driving.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
            }
            let leading = match self.leading(false).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("recovery: fence drivers: {e}");
                    None
                }
            };
            // Not leading, or in another term: the drivers of the last stop (their writes and
            // BMC commands carry its term and would be refused anyway).
            if leading.as_ref().map(|(_, l)| l.term) != term {
                if let (Some(t), false) = (term, tasks.is_empty()) {
                    tracing::warn!(term = t, drivers = tasks.len(), "recovery: the controller lease of term {t} is no longer held: its fence drivers stop where they stand");
                }
                tasks.abort_all();
                driving.clear();
                term = leading.as_ref().map(|(_, l)| l.term);
                writes = leading.as_ref().map(|(store, _)| crate::ops::writes::StepWrites::start(store.clone()));
            }
            let (Some((store, lease)), Some(writes)) = (leading, &writes) else { continue };
            let running = match store.running_operations(KIND).await {
                Ok(ops) => ops,
                Err(e) => {
                    tracing::warn!("recovery: fence drivers: {e}");
                    continue;
                }
            };
            for op in running {
                if !driving.values().any(|id| *id == op.id) {
                    let id = op.id;
                    let task = tasks.spawn(self.clone().drive(store.clone(), lease.clone(), writes.clone(), op));
                    driving.insert(task.id(), id);
                }
            }
        }
        // A clean stop lets the steps under way finish (a BMC step is bounded by its
        // deadline) rather than dropping one in the middle; then stops the rest.
        let finishing = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), finishing).await.is_err() {
            tasks.shutdown().await;
        }
    }

    /// Drives one fence until it ends or the lease is lost: each step as soon as the one
    /// before it is done (`step_through`), a step that waits or failed an attempt again an
    /// interval later; `confirm` one interval after the fence began (the host's one more
    /// interval to show up), at once for a host its BMC said is off.
    async fn drive(
        self: Arc<Self>,
        store: Store,
        lease: nodekeeper_store::Leadership,
        writes: crate::ops::writes::StepWrites,
        mut op: Operation,
    ) {
        let interval = self.config.interval;
        let id = op.id;
        loop {
            if op.step == Step::Confirm.as_str()
                && !self.known_off.lock().unwrap_or_else(|p| p.into_inner()).contains(&id)
            {
                if let Ok(now) = store.now().await {
                    tokio::time::sleep((op.created_at + interval).since(now)).await;
                }
            }
            let before = op.step.clone();
            let step = async {
                let now = store.now().await?;
                let fence = Fence { writes: Some(&writes), ..self.fence(now) };
                crate::ops::engine::step(&fence, &store, op.clone()).await
            };
            match crate::ops::while_leading(&self.store, &lease, self.ttl_ms(), step).await {
                Ok(Ok(())) => {}
                Err(e @ StoreError::LeaseLost { .. }) | Ok(Err(e @ StoreError::LeaseLost { .. })) => {
                    tracing::warn!(kind = KIND, operation = id, "{e}; its driver stops where it stands");
                    break;
                }
                Err(e) | Ok(Err(e)) => {
                    tracing::warn!(kind = KIND, operation = id, "step: {e}");
                    tokio::time::sleep(interval).await;
                }
            }
            match store.operation(id).await {
                Ok(Some(next)) if next.status == OperationStatus::Running => {
                    if next.step == before || !self.config.step_through {
                        tokio::time::sleep(interval).await;
                    }
                    op = next;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(kind = KIND, operation = id, "reading the operation: {e}");
                    tokio::time::sleep(interval).await;
                }
            }
        }
        self.known_off.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// The GC pass every `gc_interval`, under the lease ([`Controller::run`]).
    async fn gc_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.config.gc_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            let pass = async {
                let Some((store, lease)) = self.leading(false).await? else { return Ok(None) };
                let now = self.store.now().await?;
                crate::ops::while_leading(&self.store, &lease, self.ttl_ms(), self.gc_in(&store, now)).await?.map(Some)
            };
            match pass.await {
                Ok(Some(gc)) if !gc.retried.is_empty() => self.started.notify_one(),
                Ok(_) => {}
                Err(e) => tracing::warn!("recovery: GC pass: {e}"),
            }
        }
    }

    async fn lead(
        &self,
        store: &Store,
        lease: &nodekeeper_store::Leadership,
        now: Timestamp,
    ) -> Result<TickReport, StoreError> {
        let mut report = TickReport { leader: true, ..TickReport::default() };
        let since = {
            let mut w = self.watching.lock().unwrap_or_else(|p| p.into_inner());
            match *w {
                Some((term, since)) if term == lease.term => since,
                _ => {
                    tracing::info!(term = lease.term, "recovery: leading; silence counts from now");
                    *w = Some((lease.term, now));
                    now
                }
            }
        };
        let policy = self.policy();
        // The hosts that fell silent, and how many were heard lately (the fleet is read whole
        // only when a fence's watchdog level needs its quorum cell's heartbeats).
        let (hosts, quiet) = store.hosts_to_watch(detect::quiet_since(now, &policy)).await?;
        // Fences started by this tick are first stepped an interval later (by the next tick,
        // or by their driver): their `confirm` gives a host one more interval to show up
        // before the point of return.
        let running = store.running_operations(KIND).await?;
        let fencing: Vec<HostName> = running.iter().map(|o| o.target.clone()).collect();
        let mut held = Vec::new();
        // A suspect whose last fence failed recently waits (its BMC is down or lying; an
        // operator may mark it fenced): as if its fence still ran.
        let waiting: Vec<&Host> =
            hosts.iter().filter(|h| h.state == HostState::Suspect && !fencing.contains(&h.name)).collect();
        for h in waiting {
            if let Some(op) = store.latest_operation(&h.name).await? {
                let recent = now.since(op.updated_at) < self.config.fence_retry_after;
                if op.kind == KIND && op.status == OperationStatus::Failed && recent {
                    held.push(h.name.clone());
                }
            }
        }
        self.look_at_quorums(store, &running, now, lease.term).await?;
        let off = self.probe(&hosts, &detect::to_probe(&hosts, now, since, &policy)).await;
        report.actions = detect::plan_among(&hosts, quiet, &fencing, &held, &off, now, since, &policy);
        let holds = report.actions.iter().any(|a| matches!(a, Action::MassFailure { .. }));
        let released = std::mem::replace(&mut *self.braked.lock().unwrap_or_else(|p| p.into_inner()), holds) && !holds;
        if released {
            // A partition heals over a heartbeat interval: the share falls below the brake
            // before the last of its hosts is heard, and those would be fenced now. Silence
            // counts again from here, as for a new leader: the stragglers get a grace to come
            // back; one really dead among them is fenced a grace later.
            tracing::warn!("recovery: the mass-failure brake let go; silence counts again from now");
            *self.watching.lock().unwrap_or_else(|p| p.into_inner()) = Some((lease.term, now));
            report.actions = detect::plan_among(&hosts, quiet, &fencing, &held, &off, now, now, &policy);
        }
        self.act_all(store, &report.actions, &off).await?;
        if self.background {
            // Their drivers step them ([`Controller::drive`]); a fence started now gets one.
            if report.actions.iter().any(|a| matches!(a, Action::Fence { .. })) {
                self.started.notify_one();
            }
        } else if self.config.step_through {
            // Up to the evacuation, `bmc_at_once` fences at a time: each waits on its own BMC, and a rack
            // that lost power is not fenced one host after another. The evacuations one by
            // one, as placement counts the room each one leaves; the restores (the BMCs
            // again) `bmc_at_once` at a time.
            let at_once = self.config.bmc_at_once;
            let (n, at_evacuate) = self.step_fences(store, running, now, Some(Step::Evacuate), at_once).await?;
            report.fences_stepped += n;
            let (n, at_restore) = self.step_fences(store, at_evacuate, now, Some(Step::Restore), 1).await?;
            report.fences_stepped += n;
            report.fences_stepped += self.step_fences(store, at_restore, now, None, at_once).await?.0;
        } else {
            report.fences_stepped += crate::ops::runner::step_each(&self.fence(now), store, running).await;
        }
        // Live migrations (a drain's) first: a drain's step then sees them done or given up.
        // (A failure here is logged: it must not stop the drains and services below.)
        match super::migrate::resolve(store, now, &self.migration_failures).await {
            Ok(m) if m.done + m.abandoned > 0 => {
                tracing::info!(
                    done = m.done,
                    abandoned = m.abandoned,
                    pending = m.pending,
                    "recovery: live migrations"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("recovery: live migrations: {e}"),
        }
        let drains = store.running_operations(super::drain::KIND).await?;
        let drain = super::drain::Drain { grace: self.config.grace, now };
        crate::ops::runner::step_each(&drain, store, drains).await;
        // Services' copies, after the fences of this tick (an exclusive copy leaves a host
        // only once it is fenced).
        report.service_changes = super::services::reconcile(store, now, self.config.grace).await?;
        // A host its BMC says is off cannot come back in the next interval: its fence runs
        // now, step after step, not one step a tick.
        for action in &report.actions {
            if let Action::Fence { host } = action {
                if off.contains(host) && !self.background {
                    report.fences_stepped += self.run_through(store, host, now).await?;
                }
            }
        }
        let gc_due = !self.background && {
            let mut last = self.last_gc.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| now.since(t) >= self.config.gc_interval);
            if due {
                *last = Some(now);
            }
            due
        };
        if gc_due {
            report.gc = Some(self.gc_in(store, now).await?);
        }
        Ok(report)
    }

    fn policy(&self) -> detect::Policy {
        detect::Policy {
            grace: self.config.grace,
            mass_failure_share: self.config.mass_failure_share,
            probe_after: self.config.probe_after(),
        }
    }

    /// For each running fence of a host whose guard may be fenced by its watchdog: whether a
    /// majority of its guard's quorum cell heartbeats now, carried into the unbroken run of
    /// such looks (in memory, for this term; looks further apart than 1.5 of the cell's
    /// shortest heartbeat interval break the run).
    async fn look_at_quorums(
        &self,
        store: &Store,
        running: &[Operation],
        now: Timestamp,
        term: i64,
    ) -> Result<(), StoreError> {
        let fences: Vec<&Operation> = running.iter().filter(|o| o.kind == KIND).collect();
        if fences.is_empty() || !self.config.watchdog_fencing {
            self.quorums.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return Ok(());
        }
        let profiles = store.guard_fencing().await?;
        let cells = fences.iter().any(|op| profiles.iter().any(|(h, _, p)| *h == op.target && p.quorum_cell.is_some()));
        // Every host's heartbeat, only when some fence has a quorum cell to look at.
        let hosts = if cells { store.hosts().await? } else { Vec::new() };
        let hosts = &hosts;
        let intervals: HashMap<HostName, Duration> = profiles
            .iter()
            .map(|(h, _, p)| (h.clone(), Duration::from_millis(p.heartbeat_interval_ms.max(1))))
            .collect();
        let mut quorums = self.quorums.lock().unwrap_or_else(|p| p.into_inner());
        quorums.retain(|id, (t, _, _)| *t == term && fences.iter().any(|o| o.id == *id));
        for op in fences {
            let Some((_, _, p)) = profiles.iter().find(|(h, _, _)| *h == op.target) else { continue };
            let Some(cell) = p.quorum_cell.as_deref().filter(|_| watchdog::refusal(Some(p)).is_none()) else {
                continue;
            };
            let q = watchdog::quorum(cell, hosts, &intervals, now);
            let max_gap = cell
                .iter()
                .chain(std::iter::once(&op.target))
                .filter_map(|h| intervals.get(h))
                .min()
                .map_or(Duration::ZERO, |h| *h * 3 / 2);
            let prev = quorums.get(&op.id).and_then(|(_, seen, _)| *seen);
            quorums.insert(op.id, (term, watchdog::track(prev, now, q.held(), max_gap), q));
        }
        Ok(())
    }

    /// Whether `host` may be fenced by its watchdog, as far as its guard's profile and this
    /// controller's config go (the quorum and the clock are judged at the `watchdog` step).
    async fn watchdog_allowed(&self, store: &Store, host: &HostName) -> Result<Result<(), String>, StoreError> {
        Ok(self.watchdog_refusal(store.guard_fencing_of(host).await?.as_ref()).map_or(Ok(()), Err))
    }

    /// Why the mass-failure brake holds at `now`, if it does (silence counted from when this
    /// replica began to lead, as detection counts it): the fencing levels after the BMC ask.
    async fn brake(&self, store: &Store, now: Timestamp) -> Result<Option<String>, StoreError> {
        let since = self.watching.lock().unwrap_or_else(|p| p.into_inner()).map_or(now, |(_, since)| since);
        Ok(detect::brake(&store.hosts().await?, now, since, &self.policy()))
    }

    /// Why this controller will not fence a host with `profile` by its watchdog, if it will not.
    fn watchdog_refusal(&self, profile: Option<&nodekeeper_store::FencingProfile>) -> Option<String> {
        if !self.config.watchdog_fencing {
            return Some("off in this controller's config (recovery.watchdog_fencing = false)".into());
        }
        watchdog::refusal(profile)
    }

    /// The `watchdog` step's look at `host` (fence `op`) at `now`.
    async fn watchdog_verdict(
        &self,
        store: &Store,
        op: &Operation,
        host: &Host,
        now: Timestamp,
    ) -> Result<watchdog::Verdict, StoreError> {
        let profile = store.guard_fencing_of(&host.name).await?;
        if let Some(why) = self.watchdog_refusal(profile.as_ref()) {
            return Ok(watchdog::Verdict::Refused(why));
        }
        let brake = self.brake(store, now).await?;
        let (seen, quorum) = self
            .quorums
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&op.id)
            .map_or((None, None), |(_, seen, q)| (*seen, Some(*q)));
        let look = Look { seen, quorum, brake };
        Ok(watchdog::judge(now, &host.name, profile.as_ref(), host.last_heartbeat, self.config.grace, &look))
    }

    /// Asks the BMCs of `candidates` (concurrently, each bounded by the tick's interval, at
    /// most 3 s) for their power state, now — after `hosts` (and their last heartbeats) were
    /// read; returns those that answered `Off`. A BMC that errs or hangs says nothing: that
    /// host waits the grace, as before. Nothing is kept between ticks: each tick asks again.
    async fn probe(&self, hosts: &[Host], candidates: &[HostName]) -> Vec<HostName> {
        let limit = self.config.interval.min(Duration::from_secs(3));
        let drivers: Vec<(HostName, F::B)> = hosts
            .iter()
            .filter(|h| candidates.contains(&h.name))
            .filter_map(|h| Some((h.name.clone(), self.factory.for_host(h).ok()?)))
            .collect();
        // Each request takes a turn of the BMC slots: a wave of silent hosts is not a wave of
        // requests at once, and one that hangs holds up no other.
        // The wait for a turn counts towards the bound: the tick waits no longer than it.
        let answers = futures_util::future::join_all(drivers.iter().map(|(name, driver)| async move {
            let ask = async {
                let _turn = self.bmc_slots.acquire().await;
                bmc::Bmc::power_state(driver).await
            };
            let state = tokio::time::timeout(limit, ask).await.ok()?.ok()?;
            (state == bmc::PowerState::Off).then(|| name.clone())
        }))
        .await;
        answers.into_iter().flatten().collect()
    }

    /// Steps `ops` with [`Controller::step_until_waiting`], `at_once` at a time; a step that
    /// fails is logged and the others go on (a lost lease ends the tick). Returns how many
    /// steps were taken and the operations that reached `stop_before`.
    async fn step_fences(
        &self,
        store: &Store,
        ops: Vec<Operation>,
        now: Timestamp,
        stop_before: Option<Step>,
        at_once: usize,
    ) -> Result<(usize, Vec<Operation>), StoreError> {
        let (mut stepped, mut reached) = (0, Vec::new());
        for batch in ops.chunks(at_once.max(1)) {
            let results = futures_util::future::join_all(
                batch.iter().map(|op| self.step_until_waiting(store, op.clone(), now, stop_before)),
            )
            .await;
            for (op, r) in batch.iter().zip(results) {
                match r {
                    Ok((n, next)) => {
                        stepped += n;
                        reached.extend(next);
                    }
                    Err(e @ StoreError::LeaseLost { .. }) => return Err(e),
                    Err(e) => tracing::warn!(kind = KIND, operation = op.id, "step: {e}"),
                }
            }
        }
        Ok((stepped, reached))
    }

    /// Steps `op` while each step moves it to another step (`[recovery] step_through`); stops
    /// when one leaves it at the same step (it waits, or failed an attempt: the next tick
    /// retries, as the BMC attempts are spread over ticks), when it ends, or when it reaches
    /// `stop_before` (returned then, to be stepped on by the caller).
    async fn step_until_waiting(
        &self,
        store: &Store,
        mut op: Operation,
        now: Timestamp,
        stop_before: Option<Step>,
    ) -> Result<(usize, Option<Operation>), StoreError> {
        let mut stepped = 0;
        for _ in 0..fence::Step::ALL.len() {
            if stop_before.is_some_and(|s| op.step == s.as_str()) {
                return Ok((stepped, Some(op)));
            }
            let (id, before) = (op.id, op.step.clone());
            crate::ops::engine::step(&self.fence(now), store, op).await?;
            stepped += 1;
            match store.operation(id).await? {
                Some(next) if next.status == OperationStatus::Running && next.step != before => op = next,
                _ => break,
            }
        }
        Ok((stepped, None))
    }

    /// Steps `host`'s running fence until it waits or ends (at most one pass of its steps).
    async fn run_through(&self, store: &Store, host: &HostName, now: Timestamp) -> Result<usize, StoreError> {
        let Some(op) = store.running_operations(KIND).await?.into_iter().find(|o| &o.target == host) else {
            return Ok(0);
        };
        Ok(self.step_until_waiting(store, op, now, None).await?.0)
    }

    /// Compares what the guards last reported with what the database assigns, raises what
    /// drifted (once each), and starts the evacuation again for fenced hosts whose HA
    /// instances found no room before. It moves nothing by itself: the guards converge, and a
    /// running domain is never stopped from here.
    pub async fn gc(&self, now: Timestamp) -> Result<GcReport, StoreError> {
        self.gc_in(&self.store, now).await
    }

    async fn gc_in(&self, store: &Store, now: Timestamp) -> Result<GcReport, StoreError> {
        let mut out = GcReport::default();
        let hosts = store.hosts().await?;
        let instances = store.instances(None).await?;
        let mut events = Vec::new();
        let reports = store.guard_reports().await?;
        for d in super::drift::drift(&reports, &hosts, &instances, now, self.config.grace) {
            match d.kind {
                "gc.running_astray" => out.running_astray.push((d.instance, d.host.clone())),
                _ => out.not_running.push((d.instance, d.host.clone())),
            }
            events.push(NewEvent::instance(ACTOR, d.kind, &d.host, d.instance, d.message).with_key(d.key));
        }
        let fencing: Vec<HostName> = store.running_operations(KIND).await?.into_iter().map(|o| o.target).collect();
        let fenced: Vec<&Host> =
            hosts.iter().filter(|h| h.state == HostState::Fenced && !fencing.contains(&h.name)).collect();
        // What placement weighs, read once for the pass (and only when a fenced host is left).
        let (ip, hp, run, open) = if fenced.is_empty() {
            Default::default()
        } else {
            let open = super::drain::uncordoned(hosts.clone(), &super::drain::draining(store).await?);
            (
                store.instance_policies().await?,
                store.host_inventories().await?,
                place::running(&instances, &reports),
                open,
            )
        };
        let on: HashMap<HostName, Timestamp> =
            if fenced.is_empty() { HashMap::new() } else { super::powered_on_again(store, &fenced).await? };
        for h in fenced {
            // A host its last fence powered on again (nothing could take its instances then)
            // boots and runs them: heard within `boot_within` it is active again, and they stay
            // there. Meanwhile it is retried as any fenced host, when some host could take one
            // now (off first, confirmed). Still silent after `boot_within` (real servers take
            // minutes to POST), it is fenced again and left off — also with no room anywhere.
            let again = match on.get(&h.name) {
                Some(ended) => {
                    now.since(*ended) >= self.config.boot_within && h.last_heartbeat.is_none_or(|t| t < *ended)
                }
                None => false,
            };
            let left: Vec<InstanceId> =
                instances.iter().filter(|i| i.owner == h.name && i.ha && !i.deleted).map(|i| i.uuid).collect();
            // Nothing of its own left to run: its boot (however slow) is harmless — its guard
            // quarantines what moved away.
            let again = again && !left.is_empty();
            // Only when some host could take one now: no new operation every pass for nothing.
            let policies = place::Policies { instances: &ip, hosts: &hp, running: &run };
            let room = place::place(&h.name, &left, &open, &instances, policies, now, self.config.grace);
            if !again && !room.iter().any(|(_, to)| to.is_ok()) {
                continue;
            }
            // Anything that could have powered it on since it was confirmed off — a fence's
            // way back, an operator's `power on` — means it may run them: off again, confirmed,
            // before anything moves. Only a host nodekeeper has no power control over is taken
            // at its word (its `mark-fenced`).
            let start = if h.bmc_url.is_some() {
                Step::PowerOff
            } else if !store.host_outlets(&h.name).await?.is_empty() {
                Step::OutletOff
            } else {
                Step::Evacuate
            };
            let data = FenceData::new(AfterFence::Nothing, self.config.bmc_attempts);
            let json = serde_json::to_string(&data).unwrap_or_else(|_| "{}".into());
            let (_, started) = store.start_operation(KIND, &h.name, start.as_str(), None, &json, ACTOR).await?;
            if started {
                out.retried.push(h.name.clone());
            }
        }
        if !events.is_empty() {
            store.record_events(&events).await?;
        }
        Ok(out)
    }

    /// Detection's actions: the new suspects marked in one transaction, then their fences
    /// started in one (a rack's hosts at once would be a commit each otherwise), the rest one
    /// by one.
    async fn act_all(&self, store: &Store, actions: &[Action], off: &[HostName]) -> Result<(), StoreError> {
        let grace = humantime::format_duration(self.config.grace);
        let suspects: Vec<(HostName, String)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Suspect { host, silent_for, off } => {
                    let silent = humantime::format_duration(Duration::from_secs(silent_for.as_secs()));
                    Some((
                        host.clone(),
                        if *off {
                            format!(
                                "silent for {silent}, and its BMC says it is off: fenced without waiting the grace \
                                 ({grace})"
                            )
                        } else {
                            format!("silent for {silent} (grace {grace})")
                        },
                    ))
                }
                _ => None,
            })
            .collect();
        // Compare-and-set: an operator's `maintenance` set in between stands.
        store.set_hosts_state_from(&suspects, HostState::Active, HostState::Suspect, ACTOR).await?;
        let data = FenceData::new(self.config.after_fence, self.config.bmc_attempts);
        let json = serde_json::to_string(&data).unwrap_or_else(|_| "{}".into());
        let fences: Vec<(HostName, String, String)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Fence { host } => Some((host.clone(), Step::Confirm.as_str().to_owned(), json.clone())),
                _ => None,
            })
            .collect();
        let started: Vec<(HostName, i64)> = match store.start_operations(KIND, &fences, ACTOR).await {
            Ok(ids) => fences.iter().zip(ids).filter_map(|((h, _, _), id)| Some((h.clone(), id?))).collect(),
            Err(e @ StoreError::LeaseLost { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("recovery: starting {} fences together: {e}; one by one", fences.len());
                let mut started = Vec::new();
                for (host, step, data) in &fences {
                    let (op, new) = store.start_operation(KIND, host, step, None, data, ACTOR).await?;
                    if new {
                        started.push((host.clone(), op.id));
                    }
                }
                started
            }
        };
        if self.background {
            // Only fences started now, by this look at their BMCs (not one already running).
            let mut known_off = self.known_off.lock().unwrap_or_else(|p| p.into_inner());
            known_off.extend(started.iter().filter(|(h, _)| off.contains(h)).map(|(_, id)| *id));
        }
        for action in actions {
            self.act(store, action).await?;
        }
        Ok(())
    }

    #[tracing::instrument(name = "act", skip_all, fields(action = ?action))]
    async fn act(&self, store: &Store, action: &Action) -> Result<(), StoreError> {
        match action {
            // Marked and started together ([`Controller::act_all`]).
            Action::Suspect { .. } | Action::Fence { .. } => Ok(()),
            Action::Recovered { host } => self
                .store
                .set_host_state_from(host, HostState::Suspect, HostState::Active, ACTOR, "heartbeats again")
                .await
                .map(drop),
            Action::Returned { host } => self
                .store
                .set_host_state_from(
                    host,
                    HostState::Fenced,
                    HostState::Active,
                    ACTOR,
                    "heartbeats again after its fence",
                )
                .await
                .map(drop),
            Action::MassFailure { suspects, watched } => {
                let key = (*suspects, *watched);
                let repeated = {
                    let mut last = self.last_alert.lock().unwrap_or_else(|p| p.into_inner());
                    last.replace(key) == Some(key)
                };
                if repeated {
                    return Ok(());
                }
                let message = format!(
                    "{suspects} of {watched} watched hosts are silent at once (more than {:.0}%): automatic \
                     recovery is stopped; this looks like a partition — check the network, then fence by hand \
                     (`host mark-fenced`) what is really down",
                    self.config.mass_failure_share * 100.0
                );
                tracing::error!("{message}");
                let event = NewEvent {
                    actor: ACTOR.into(),
                    kind: "recovery.mass_failure".into(),
                    host: None,
                    instance: None,
                    message,
                    key: None,
                };
                store.record_event(&event).await
            }
        }
    }

    /// One step of one fence operation, under no lease (tests, and tools that run alone).
    pub async fn step(&self, op: Operation, now: Timestamp) -> Result<(), StoreError> {
        crate::ops::engine::step(&self.fence(now), &self.store, op).await
    }

    /// This controller's fence machine, at `now`.
    pub(crate) fn fence(&self, now: Timestamp) -> Fence<'_, F> {
        Fence { controller: self, now, writes: None }
    }

    /// Repair before power-cycle: `ssh` to the host as `repair_user` with `repair_key`; the
    /// host's `authorized_keys` runs `nodekeeper-guard repair` whatever is asked. Host keys are
    /// not checked (a reimage makes new ones): the command is fixed on the host, the key
    /// proves nothing to anyone else, and what the answer says decides nothing — only a
    /// heartbeat calls the fence off. Gated on the lease, as a BMC command is. Returns the
    /// report in short, or why it failed.
    async fn repair(&self, store: &Store, host: &Host) -> Result<String, String> {
        let (Some(key), Some(ip)) = (&self.config.repair_key, host.ip) else {
            return Err("no repair key, or no address".into());
        };
        store.check_lease().await.map_err(|e| format!("not sent: {e}"))?;
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.arg("-i")
            .arg(key)
            .args(["-p", &self.config.network_check_port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5", "-o", "LogLevel=ERROR"])
            .arg(format!("{}@{ip}", self.config.repair_user))
            .args(["nodekeeper-guard", "repair"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .map_err(|_| "ssh did not finish within 90 s".to_owned())?
            .map_err(|e| format!("running ssh: {e}"))?;
        let said = |b: &[u8]| String::from_utf8_lossy(b).trim().chars().take(400).collect::<String>();
        let report = said(&out.stdout);
        match out.status.code() {
            Some(0) => Ok(repair_summary(&report)),
            Some(1) if !report.is_empty() => Ok(format!("partly: {}", repair_summary(&report))),
            _ => Err(format!("{}: {}", out.status, said(&out.stderr))),
        }
    }

    /// A TCP connect to the host's address on `network_check_port` (1 s).
    async fn network_check(&self, host: &Host) -> fence::NetworkCheck {
        let (Some(ip), port) = (host.ip, self.config.network_check_port) else {
            return fence::NetworkCheck::NotChecked;
        };
        if port == 0 {
            return fence::NetworkCheck::NotChecked;
        }
        let addr = std::net::SocketAddr::new(ip, port);
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => fence::NetworkCheck::Answers(addr.to_string()),
            _ => fence::NetworkCheck::Silent(addr.to_string()),
        }
    }

    async fn power(&self, store: &Store, host: &Host, action: PowerAction) -> Result<(), String> {
        let driver = bmc::Leased::new(self.factory.for_host(host).map_err(|e| e.to_string())?, store.clone());
        self.switch(driver, action, "the BMC").await
    }

    /// Drives one switch (a BMC, an outlet) to `action`, confirmed, within the policy's bound.
    /// Each of its requests takes a turn of `bmc_slots`.
    async fn switch<S: bmc::Switch>(&self, switch: S, action: PowerAction, what: &str) -> Result<(), String> {
        let policy = self.factory.policy();
        let limit = policy.confirm_within * (policy.attempts.max(1) + 1);
        let switch = bmc::Slotted::new(switch, &self.bmc_slots);
        match tokio::time::timeout(limit, bmc::power(&switch, action, &policy)).await {
            Ok(r) => r.map(drop).map_err(|e| e.to_string()),
            Err(_) => Err(format!("{what} did not answer within {}", humantime::format_duration(limit))),
        }
    }

    /// Switches every PDU outlet of `host` on or off, confirmed, all at once; returns how many.
    /// Off succeeds only when every outlet confirms (a host with two power supplies runs on
    /// either).
    async fn outlets(&self, store: &Store, host: &HostName, on: bool) -> Result<usize, String> {
        let outlets = store.host_outlets(host).await.map_err(|e| e.to_string())?;
        if outlets.is_empty() {
            return Err(format!("{host} has no PDU outlets"));
        }
        let action = if on { PowerAction::On } else { PowerAction::Off };
        let results = futures_util::future::join_all(outlets.iter().map(|o| async move {
            let outlet = self.factory.outlet(o).map_err(|e| format!("{}: {e}", o.url))?;
            let leased = bmc::Leased::new(outlet, store.clone());
            self.switch(leased, action, &format!("PDU outlet {}", o.url)).await
        }))
        .await;
        let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if failed.is_empty() {
            Ok(outlets.len())
        } else {
            Err(failed.join("; "))
        }
    }

    /// Gives every live HA instance of `host` a new owner by policy ([`place`]), the highest
    /// priority first; returns (moved, unplaced, of those waiting for their restart order).
    /// One `instance.unplaced` event says why each that waits waits. Idempotent: what already
    /// moved is no longer `host`'s; a move that loses its compare-and-set (someone else moved
    /// it) is skipped.
    ///
    /// Evacuations asked for at once (a rack's fences) are done together: each request queues
    /// and waits for the evacuation lock; whoever takes it does every request queued by then in
    /// one pass — one read of the fleet, each placed in turn (each counting the room the ones
    /// before took), and all their moves in one transaction.
    async fn evacuate(&self, store: &Store, host: &Host, now: Timestamp) -> Result<(usize, usize, usize), StoreError> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.evac_queue.lock().unwrap_or_else(|p| p.into_inner()).push((host.clone(), tx));
        let _one = self.evacuating.lock().await;
        // Done by the pass before this one (it took this request with its own)?
        if let Ok(done) = rx.try_recv() {
            return done;
        }
        let batch = std::mem::take(&mut *self.evac_queue.lock().unwrap_or_else(|p| p.into_inner()));
        let hosts: Vec<Host> = batch.iter().map(|(h, _)| h.clone()).collect();
        match self.evacuate_all(store, &hosts, now).await {
            Ok(results) => {
                for ((_, tx), r) in batch.into_iter().zip(results) {
                    let _ = tx.send(Ok(r));
                }
            }
            Err(e) => {
                // The others try again at their next step; only this caller's lease is lost,
                // if that is what failed (theirs may be another term's).
                let why = format!("the evacuation pass failed: {e}");
                for (_, tx) in batch {
                    let _ = tx.send(Err(StoreError::Invalid(why.clone())));
                }
                return Err(e);
            }
        }
        rx.try_recv().unwrap_or_else(|_| Err(StoreError::Invalid("the evacuation pass lost this request".into())))
    }

    /// One evacuation pass over `hosts` (see [`Controller::evacuate`]), under the evacuation lock.
    async fn evacuate_all(
        &self,
        store: &Store,
        hosts: &[Host],
        now: Timestamp,
    ) -> Result<Vec<(usize, usize, usize)>, StoreError> {
        // The fleet as the pass before read it, kept in step with its moves (a rack's fences
        // would each read every instance otherwise): in a tick, at the tick's `now`; driven
        // in the background, for `FLEET_KEPT`, its hosts read again each pass (their states
        // and heartbeats move faster than the instances). What others changed meanwhile — an
        // instance added, a drain's move — may make placement count a host's room wrong for
        // that long; never more: every move is a compare-and-set.
        let began = std::time::Instant::now();
        let cached = self.fleet.lock().unwrap_or_else(|p| p.into_inner()).take().filter(|f| {
            if self.background {
                f.at <= now && now.since(f.at) < FLEET_KEPT
            } else {
                f.at == now
            }
        });
        let mut fleet = match cached {
            Some(mut f) if self.background => {
                f.refresh_hosts(store).await?;
                f
            }
            Some(f) => f,
            None => Fleet::read(store, now).await?,
        };
        // Each host once (a request repeated by a restarted driver gets the same answer).
        let mut unique: Vec<&Host> = Vec::new();
        for h in hosts {
            if !unique.iter().any(|u| u.name == h.name) {
                unique.push(h);
            }
        }
        let names: HashSet<&HostName> = unique.iter().map(|h| &h.name).collect();
        let mut theirs: HashMap<HostName, Vec<Instance>> = HashMap::new();
        for i in fleet.all.iter().filter(|i| i.ha && !i.deleted && names.contains(&i.owner)) {
            theirs.entry(i.owner.clone()).or_default().push(i.clone());
        }
        // The guards' reports only matter to instances with a restart order (each pass of a
        // waiting evacuation would read every host's report otherwise).
        let ordered = theirs.values().flatten().any(|i| fleet.ip.get(&i.uuid).is_some_and(|p| !p.after.is_empty()));
        let run = if ordered { place::running(&fleet.all, &store.guard_reports().await?) } else { HashSet::new() };
        let policies = place::Policies { instances: &fleet.ip, hosts: &fleet.hp, running: &run };
        let read = began.elapsed();
        // The room of every candidate, counted once for the pass.
        let mut rooms =
            place::Rooms::new(|h| names.contains(h), &fleet.hosts, &fleet.all, policies, now, self.config.grace);
        let plans: Vec<EvacuationPlan> = unique
            .iter()
            .map(|h| self.plan_evacuation(h, theirs.remove(&h.name).unwrap_or_default(), &fleet, &mut rooms, policies))
            .collect();
        let moves: Vec<nodekeeper_store::OwnerMove> = plans.iter().flat_map(|p| p.moves.iter().cloned()).collect();
        let planned = began.elapsed();
        let results = store.transfer_owners(&moves, ACTOR).await?;
        if unique.len() > 1 {
            tracing::info!(
                hosts = unique.len(),
                moves = moves.len(),
                read_ms = read.as_millis() as u64,
                plan_ms = (planned - read).as_millis() as u64,
                write_ms = (began.elapsed() - planned).as_millis() as u64,
                "recovery: evacuations done together"
            );
        }
        let mut results = results.into_iter();
        let mut outcome: HashMap<&HostName, (usize, usize, usize)> = HashMap::new();
        let mut events = Vec::new();
        let mut made: HashMap<InstanceId, (HostName, nodekeeper_store::Generation)> = HashMap::new();
        let mut lost_race = false;
        for (host, plan) in unique.iter().zip(plans) {
            let mut moved = 0;
            for (m, r) in plan.moves.iter().zip(results.by_ref()) {
                match r {
                    Ok(generation) => {
                        moved += 1;
                        made.insert(m.id, (m.to.clone(), generation));
                    }
                    // Moved or deleted meanwhile, by someone else: skipped.
                    Err(_) => lost_race = true,
                }
            }
            outcome.insert(&host.name, (moved, plan.unplaced, plan.ordered));
            events.extend(plan.waiting);
        }
        // The snapshot follows the moves made (the next pass counts the room they took, as
        // it would reading the database again); one that lost its race makes it wrong.
        if !lost_race {
            for i in fleet.all.iter_mut().filter(|i| made.contains_key(&i.uuid)) {
                let (to, generation) = &made[&i.uuid];
                (i.owner, i.generation, i.updated_at) = (to.clone(), *generation, now);
                (i.migrating_to, i.migration_uri, i.migration_started_at) = (None, None, None);
            }
            for id in made.keys() {
                if let Some(p) = fleet.ip.get_mut(id) {
                    p.relocations += 1;
                }
            }
            *self.fleet.lock().unwrap_or_else(|p| p.into_inner()) = Some(fleet);
        }
        if !events.is_empty() {
            store.record_events(&events).await?;
        }
        Ok(hosts.iter().map(|h| outcome.get(&h.name).copied().unwrap_or_default()).collect())
    }

    /// Where each live HA instance of `host` (`theirs`) goes, by policy, each placed taking
    /// its room in `rooms`.
    fn plan_evacuation(
        &self,
        host: &Host,
        theirs: Vec<Instance>,
        fleet: &Fleet,
        rooms: &mut place::Rooms,
        policies: place::Policies<'_>,
    ) -> EvacuationPlan {
        let priority = |id: &InstanceId| fleet.ip.get(id).map_or(0, |p| p.priority);
        // One being live-migrated may run on its target already: it goes there, the only
        // place it may run, while the target is active (its room there is counted already);
        // waits while the target's fate is open; is placed as any other once the target is
        // fenced (it runs nowhere).
        let mut plan = EvacuationPlan::default();
        let mut moving = Vec::new();
        for i in theirs {
            let Some(target) = i.migrating_to.clone() else {
                moving.push(i);
                continue;
            };
            match fleet.states.get(&target).copied() {
                Some(HostState::Active) => plan.moves.push(nodekeeper_store::OwnerMove {
                    id: i.uuid,
                    expected: i.generation,
                    from: host.name.clone(),
                    to: target,
                    reason: format!("recovered from fenced host {} to where it was live-migrating", host.name),
                }),
                Some(HostState::Fenced) | None => moving.push(i),
                Some(state) => {
                    plan.unplaced += 1;
                    let why = format!("its live migration to {target} ({state}) is not resolved");
                    let m = format!("{} stays on fenced host {}: {why}", i.name, host.name);
                    let key = format!("unplaced:{}:{}:migrating", i.uuid, i.generation.0);
                    plan.waiting
                        .push(NewEvent::instance(ACTOR, "instance.unplaced", &host.name, i.uuid, m).with_key(key));
                }
            }
        }
        moving.sort_by_key(|i| (std::cmp::Reverse(priority(&i.uuid)), i.uuid.uuid()));
        let ids: Vec<_> = moving.iter().map(|i| i.uuid).collect();
        for ((id, to), instance) in rooms.place(&ids, policies).into_iter().zip(moving) {
            match to {
                Ok(to) => plan.moves.push(nodekeeper_store::OwnerMove {
                    id,
                    expected: instance.generation,
                    from: host.name.clone(),
                    to,
                    reason: format!("recovered from fenced host {} ({} storage)", host.name, instance.storage),
                }),
                Err(why) => {
                    plan.unplaced += 1;
                    if fleet.ip.get(&id).and_then(|p| place::waits_for_order(p, policies.running)).is_some() {
                        plan.ordered += 1;
                    }
                    let m = format!("{} stays on fenced host {}: {why}", instance.name, host.name);
                    let key = format!("unplaced:{id}:{}:{why}", instance.generation.0);
                    plan.waiting.push(NewEvent::instance(ACTOR, "instance.unplaced", &host.name, id, m).with_key(key));
                }
            }
        }
        plan
    }
}

/// What one host's evacuation will do.
#[derive(Default)]
struct EvacuationPlan {
    /// Its instances that move, and where.
    moves: Vec<nodekeeper_store::OwnerMove>,
    /// Those that stay (no room, their restart order, an open migration).
    unplaced: usize,
    /// Of those, waiting for their restart order.
    ordered: usize,
    /// Why each that stays stays (events).
    waiting: Vec<NewEvent>,
}

/// The fleet as the evacuations of one tick read it (at its `now`): every instance, the
/// placement policies and inventories, the hosts that may take instances (not being drained).
/// Read by the tick's first evacuation and kept in step with the moves of the next ones; a
/// move someone else made meanwhile is caught by the compare-and-set of `transfer_owner`.
struct Fleet {
    at: Timestamp,
    all: Vec<Instance>,
    ip: HashMap<InstanceId, nodekeeper_store::InstancePolicy>,
    hp: HashMap<HostName, nodekeeper_store::HostInventory>,
    hosts: Vec<Host>,
    /// Every host's state (cordoned ones too).
    states: HashMap<HostName, HostState>,
    /// Every host as last read whole.
    every: Vec<Host>,
}

impl Fleet {
    async fn read(store: &Store, at: Timestamp) -> Result<Fleet, StoreError> {
        let mut fleet = Fleet {
            at,
            all: store.instances(None).await?,
            ip: store.instance_policies().await?,
            hp: store.host_inventories().await?,
            states: HashMap::new(),
            hosts: Vec::new(),
            every: store.hosts().await?,
        };
        fleet.set_hosts(store).await?;
        Ok(fleet)
    }

    /// The hosts' states and heartbeats read again (only those: they move faster than the
    /// rest of a host's row, and a whole read of 10,000 took a pass 200 ms); a host added
    /// since the fleet was read whole is not a candidate until it is read whole again.
    async fn refresh_hosts(&mut self, store: &Store) -> Result<(), StoreError> {
        let live: HashMap<HostName, (HostState, Option<Timestamp>)> =
            store.host_liveness().await?.into_iter().map(|(name, state, beat)| (name, (state, beat))).collect();
        self.every.retain_mut(|h| match live.get(&h.name) {
            Some((state, beat)) => {
                (h.state, h.last_heartbeat) = (*state, *beat);
                true
            }
            None => false, // removed
        });
        self.set_hosts(store).await?;
        // Every host's state, one added since the whole read too (a live migration's target).
        self.states = live.into_iter().map(|(name, (state, _))| (name, state)).collect();
        Ok(())
    }

    /// The states and the candidates (hosts being drained take nothing new) from `every`.
    async fn set_hosts(&mut self, store: &Store) -> Result<(), StoreError> {
        self.states = self.every.iter().map(|h| (h.name.clone(), h.state)).collect();
        self.hosts = super::drain::uncordoned(self.every.clone(), &super::drain::draining(store).await?);
        Ok(())
    }
}

/// The fence machine on the operation engine: its decisions ([`super::fence`]) and effects
/// (BMC commands, the evacuation, the host's state at the point of return or when called off).
pub(crate) struct Fence<'a, F: BmcFactory> {
    controller: &'a Controller<F>,
    now: Timestamp,
    /// Where its step changes go when fences are driven at once (a group commit).
    writes: Option<&'a crate::ops::writes::StepWrites>,
}

impl<F: BmcFactory> crate::ops::Machine for Fence<'_, F> {
    type Step = Step;
    type Data = FenceData;
    const KIND: &'static str = "fence";
    const ACTOR: &'static str = ACTOR;

    async fn advance(
        &self,
        store: &Store,
        id: i64,
        change: nodekeeper_store::StepChange,
    ) -> Result<Option<Operation>, StoreError> {
        match self.writes {
            Some(writes) => writes.advance(id, change, ACTOR).await,
            None => store.advance_operation(id, &change, ACTOR).await,
        }
    }

    fn cancel(&self, step: Step, by: &str) -> Result<Decision, String> {
        crate::ops::cancel_rule(Self::KIND, step.as_str())?;
        Ok(Decision::Abort {
            why: format!("cancelled by {by}: the host goes to maintenance (it would be fenced again at the next look)"),
        })
    }

    async fn decide(
        &self,
        store: &Store,
        op: &Operation,
        step: Step,
        data: &mut FenceData,
    ) -> Result<Decision, StoreError> {
        let c = self.controller;
        let host = store.require_host(&op.target).await?;
        let attempts = op.attempts + 1;
        let decision = match fence::work(step, data) {
            // An operator who took the host over (maintenance, a reimage) stops a fence that
            // has not passed the point of return.
            Work::Confirm if host.state != HostState::Suspect => {
                Decision::Abort { why: format!("the host is {} now, no longer suspect; fence called off", host.state) }
            }
            Work::Confirm => {
                let network = c.network_check(&host).await;
                let repair = c.config.repair_key.is_some();
                fence::confirm(host.last_heartbeat.is_some_and(|h| h > op.created_at), &network, repair)
            }
            Work::Repair => fence::after_repair(c.repair(store, &host).await, c.config.repair_wait),
            Work::RepairWait => fence::after_repair_wait(
                host.last_heartbeat.is_some_and(|h| h > op.created_at),
                op.deadline.is_some_and(|d| d <= self.now),
            ),
            // Back and heard (its fence called off, or a retry's host returned): left alone.
            Work::PowerOff | Work::OutletOff if host.state == HostState::Active => {
                Decision::Abort { why: "the host is active again; fence called off".into() }
            }
            Work::PowerOff => {
                let result = c.power(store, &host, PowerAction::Off).await;
                let levels = if result.is_err() && attempts >= data.bmc_attempts {
                    fence::Levels {
                        outlets: !store.host_outlets(&host.name).await?.is_empty(),
                        watchdog: c.watchdog_allowed(store, &host.name).await?,
                    }
                } else {
                    fence::Levels { outlets: false, watchdog: Err(String::new()) }
                };
                fence::after_power_off(attempts, result, data, levels)
            }
            Work::OutletOff => {
                let brake = c.brake(store, self.now).await?;
                let result = match &brake {
                    Some(why) => {
                        tracing::debug!(host = %host.name, "PDU outlets: the mass-failure brake holds: {why}");
                        Ok(0)
                    }
                    None => c.outlets(store, &host.name, false).await,
                };
                if result.is_ok() && brake.is_none() {
                    data.outlets_off = true;
                }
                let watchdog = if result.is_err() && attempts >= data.bmc_attempts {
                    c.watchdog_allowed(store, &host.name).await?
                } else {
                    Err(String::new())
                };
                fence::after_outlet_off(attempts, result, data, brake.as_deref(), watchdog)
            }
            Work::Watchdog => {
                let verdict = c.watchdog_verdict(store, op, &host, self.now).await?;
                if let watchdog::Verdict::Wait(why) = &verdict {
                    tracing::debug!(host = %host.name, "watchdog fencing: {why}");
                }
                fence::after_watchdog(verdict, host.last_heartbeat.is_some_and(|h| h > op.created_at))
            }
            Work::Evacuate => {
                let result = c.evacuate(store, &host, self.now).await;
                let mut ordering = false;
                if let Ok((moved, unplaced, ordered)) = result {
                    data.moved += moved;
                    data.unplaced = unplaced;
                    // Instances waiting for their restart order are tried again each tick, for
                    // at most restart_order_wait since the step began; then the GC pass goes on.
                    ordering = ordered > 0 && self.now.since(op.updated_at) < c.config.restart_order_wait;
                }
                if ordering {
                    Decision::Stay
                } else {
                    fence::after_evacuate(result.map(|(m, u, _)| (m, u)).map_err(|e| e.to_string()), attempts)
                }
            }
            Work::Restore(after) => {
                let result = match after {
                    AfterFence::PowerOn if data.outlets_off => match c.outlets(store, &host.name, true).await {
                        Ok(_) => c.power(store, &host, PowerAction::On).await,
                        Err(e) => Err(e),
                    },
                    AfterFence::PowerOn => c.power(store, &host, PowerAction::On).await,
                    AfterFence::Reimage => {
                        reimage::request(store, &host.name, None, Deadlines::default(), Limits::default(), ACTOR)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                    AfterFence::Nothing => Ok(()),
                };
                fence::after_restore(attempts, result, data)
            }
        };
        Ok(match decision {
            Decision::Done { why } => {
                Decision::Done { why: format!("{} moved, {} unplaced; {why}", data.moved, data.unplaced) }
            }
            other => other,
        })
    }

    async fn effects(
        &self,
        store: &Store,
        op: &Operation,
        step: Step,
        _data: &mut FenceData,
        decision: &Decision,
    ) -> Result<(), StoreError> {
        match decision {
            // The point of return is passed: the host is off, confirmed (or, by the watchdog
            // level's proof, off or without its HA domains).
            Decision::Go { to: Step::Evacuate, why, .. }
                if matches!(step, Step::PowerOff | Step::OutletOff | Step::Watchdog) =>
            {
                store.set_host_state(&op.target, HostState::Fenced, ACTOR, why).await.map(drop)
            }
            // Cancelled by an operator: out of recovery until they return it.
            Decision::Abort { why } if op.cancel_requested.is_some() => {
                let to = HostState::Maintenance;
                store.set_host_state_from(&op.target, HostState::Suspect, to, ACTOR, why).await.map(drop)
            }
            Decision::Abort { why } => {
                store.set_host_state_from(&op.target, HostState::Suspect, HostState::Active, ACTOR, why).await.map(drop)
            }
            _ => Ok(()),
        }
    }
}

/// `nodekeeper-guard repair`'s JSON line in words (as it came when it is not that).
fn repair_summary(report: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(report) else { return report.to_owned() };
    let ran = |k: &str| match &v[k] {
        serde_json::Value::Null => format!("{k} not restarted"),
        r if r["ok"] == true => format!("{k} restarted"),
        r => format!("{k} restart failed ({})", r["detail"].as_str().unwrap_or("?")),
    };
    let answers = if v["libvirt_answers"] == true { "libvirt answers" } else { "libvirt does not answer" };
    format!("{}, {answers}, {}", ran("libvirtd"), ran("guard"))
}

/// Why `host mark-fenced` was refused.
#[derive(Debug, thiserror::Error)]
pub enum MarkFencedError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The host's guard reported in within the grace period: it is not off.
    #[error(
        "{host} heartbeated {ago} ago, within the grace period ({grace}): it is running, and marking it \
         fenced would let its instances run twice. Power it off first."
    )]
    Alive {
        /// The host.
        host: HostName,
        /// Since its last heartbeat.
        ago: String,
        /// The grace period.
        grace: String,
    },
}

/// An operator's confirmation that `host` is off (its BMC cannot say so): the host turns
/// `fenced` and a fence operation starts at `evacuate`, skipping the power-off. Refused for a
/// host that heartbeated within `grace` (it is evidently running). A fence of the host that
/// already runs is returned instead (`false`) — taken on to `evacuate` when it still waits
/// for a level to confirm (the operator's word is the last level).
pub async fn mark_fenced(
    store: &Store,
    host: &HostName,
    config: &RecoveryConfig,
    actor: &str,
) -> Result<(Operation, bool), MarkFencedError> {
    let h = store.require_host(host).await?;
    if let Some(t) = h.last_heartbeat {
        let ago = store.now().await?.since(t);
        if ago <= config.grace {
            return Err(MarkFencedError::Alive {
                host: host.clone(),
                ago: humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string(),
                grace: humantime::format_duration(config.grace).to_string(),
            });
        }
    }
    let data = FenceData::new(AfterFence::Nothing, config.bmc_attempts);
    let json = serde_json::to_string(&data).unwrap_or_else(|_| "{}".into());
    let (op, started) = store.start_operation(KIND, host, Step::Evacuate.as_str(), None, &json, actor).await?;
    let why = "marked fenced by an operator (powered off out of band)";
    if started {
        store.set_host_state(host, HostState::Fenced, actor, why).await?;
        return Ok((op, true));
    }
    // A fence of the host runs and has not passed its point of return — its BMC, outlets or
    // watchdog wait cannot confirm — : the operator's word is the last level, and takes it on to
    // `evacuate` (a compare-and-set on its step; the host fenced first, as at any level).
    let before: Option<Step> = op.step.parse().ok();
    let waiting = [Step::Confirm, Step::Repair, Step::RepairWait, Step::PowerOff, Step::OutletOff, Step::Watchdog];
    if op.kind == KIND && op.status == OperationStatus::Running && before.is_some_and(|s| waiting.contains(&s)) {
        store.set_host_state(host, HostState::Fenced, actor, why).await?;
        let change = nodekeeper_store::StepChange {
            from: op.step.clone(),
            to: Step::Evacuate.as_str().into(),
            status: OperationStatus::Running,
            attempts: 0,
            deadline: None,
            last_error: None,
            data: Some(json),
            event: format!("fence of {host}: {why}, at its {} step; next evacuate", op.step),
        };
        let id = op.id;
        let op = match store.advance_operation(id, &change, actor).await? {
            Some(op) => op,
            // The controller moved it meanwhile: as it stands now.
            None => store.operation(id).await?.unwrap_or(op),
        };
        return Ok((op, false));
    }
    Ok((op, false))
}
