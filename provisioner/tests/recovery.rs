//! The recovery controller on a simulated clock (`tick(now)`, heartbeats stamped by the
//! test), with in-memory BMCs (`bmc::fake`, the documented test double: it lets a test make a
//! BMC fail or time out on cue), on both database engines. Every test ends by checking the
//! invariant: each instance has exactly one owner, and HA instances of a fenced host moved
//! exactly once (generation + 1).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_provisioner::bmc::fake::{Fake, Fakes};
use nodekeeper_provisioner::recovery::controller::{self, Controller, RecoveryConfig, KIND};
use nodekeeper_provisioner::recovery::fence::AfterFence;
use nodekeeper_provisioner::recovery::watchdog;
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{
    on_both_engines, EventFilter, FencingProfile, Generation, HostName, HostState, InstanceId, NewHost, NewInstance,
    OperationStatus, Storage, Store, Timestamp,
};

on_both_engines!(
    a_host_powered_on_again_gets_a_grace_then_is_powered_off_before_its_instances_move,
    a_host_powered_on_again_and_silent_past_boot_within_is_powered_off_and_left_off_without_room,
    cancelled_drains_and_fences_end_at_their_next_step,
    a_fenced_hosts_instance_being_live_migrated_goes_to_its_target,
    a_silent_host_is_fenced_and_its_ha_instances_move_once,
    no_confirmed_fence_no_recovery_until_an_operator_marks_it_fenced,
    bmc_errors_are_retried_within_the_limit,
    a_host_back_before_its_power_off_is_left_alone,
    many_silent_hosts_at_once_brake_instead_of_fencing,
    only_the_leader_acts_and_a_successor_resumes_mid_fence,
    two_controllers_racing_on_one_evacuation_move_each_instance_once,
    gc_raises_drift_once_and_retries_what_found_no_room,
    after_fence_reimage_requests_a_reimage_of_the_host,
    an_operator_taking_a_suspect_into_maintenance_calls_its_fence_off,
    a_hung_bmc_times_out_and_nothing_moves,
    a_controller_back_from_downtime_gives_every_host_a_grace,
    a_host_its_bmc_says_is_off_is_fenced_and_evacuated_before_the_grace,
    a_silent_host_that_is_on_waits_the_grace,
    a_host_with_a_dead_bmc_is_fenced_by_its_watchdog_after_the_bound_never_before,
    no_watchdog_fencing_without_an_armed_watchdog_reported,
    a_host_back_during_the_watchdog_wait_keeps_its_instances,
    a_lost_majority_and_the_brake_hold_the_watchdog_level,
    a_host_with_a_dead_bmc_is_fenced_through_its_pdu_outlets_and_they_come_back_on,
    bmc_and_pdu_dead_the_watchdog_fences_after_the_bound,
    the_brake_holds_the_pdu_level,
    with_too_little_room_priorities_and_anti_affinity_decide_and_the_rest_waits,
    two_fences_of_one_tick_share_the_room_left_and_never_overfill_a_host,
    fences_driven_at_once_share_the_room_left_and_never_overfill_a_host,
    a_web_server_moves_only_once_its_database_runs_again,
    an_operator_takes_over_a_fence_that_waits_for_its_watchdog,
    stepping_through_a_fence_whose_bmc_answers_ends_it_in_the_tick_after_it_began,
    a_healing_partition_does_not_fence_its_stragglers_when_the_brake_lets_go,
);

struct Cell {
    store: Store,
    fakes: Fakes,
    t0: Timestamp,
    ha: Vec<InstanceId>,
    others: Vec<InstanceId>,
}

impl Cell {
    fn at(&self, secs: u64) -> Timestamp {
        Timestamp(self.t0.0 + secs as i64 * 1000)
    }

    /// A replica, started at t0: a leader counts silence from when it began to lead.
    async fn controller(&self, holder: &str, config: RecoveryConfig) -> Controller<Fakes> {
        let ctl = Controller::new(self.store.clone(), Arc::new(self.fakes.clone()), config, holder.into());
        ctl.tick(self.t0).await.expect("first tick");
        ctl
    }

    async fn beat(&self, hosts: &[&str], at: Timestamp) {
        for h in hosts {
            self.store.record_heartbeat_at(&n(h), at).await.expect("heartbeat");
        }
    }

    /// Ticks `ctl` once a (simulated) second from `from`, b and c heartbeating, until a's
    /// fence reaches `step` (at most `max` ticks).
    async fn tick_until(&self, ctl: &Controller<Fakes>, step: &str, from: u64, max: u64) {
        for s in 0..max {
            if self.fence_op("a").await.is_some_and(|o| o.step == step) {
                return;
            }
            self.beat(&["b", "c"], self.at(from + s)).await;
            ctl.tick(self.at(from + s)).await.expect("tick");
        }
        assert_eq!(self.fence_op("a").await.expect("fence").step, step);
    }

    async fn fence_op(&self, host: &str) -> Option<nodekeeper_store::Operation> {
        self.store.latest_operation(&n(host)).await.expect("op").filter(|o| o.kind == KIND)
    }

    /// The invariant: every instance has one owner (the column), and `moved` instances went
    /// from `from` to another host in exactly one step (generation 2); the rest did not move.
    async fn check(&self, from: &str, moved: bool) -> Vec<HostName> {
        let mut owners = Vec::new();
        for id in &self.ha {
            let i = self.store.instance(*id).await.expect("get").expect("instance");
            if moved {
                assert!(i.owner != n(from) && i.generation == Generation(2), "{i:?}");
            } else {
                assert!(i.owner == n(from) && i.generation == Generation(1), "{i:?}");
            }
            owners.push(i.owner);
        }
        for id in &self.others {
            let i = self.store.instance(*id).await.expect("get").expect("instance");
            assert_eq!(i.generation, Generation(1), "non-HA and deleted instances never move: {i:?}");
        }
        owners
    }
}

/// One fence step a tick (`step_through = false`): these tests look at a fence between its
/// steps; stepping through is tested on its own.
fn config() -> RecoveryConfig {
    RecoveryConfig { lease_ttl: Duration::from_secs(60), step_through: false, ..RecoveryConfig::default() }
}

/// Hosts a..`count` (BMCs on, heartbeats at t0); on `a`: 4 HA instances, one non-HA, one
/// deleted HA; on `b`: 2.
async fn cell(db: &TestDb, count: usize) -> Cell {
    let store = db.store().await;
    let names: Vec<String> = (0..count).map(|i| ((b'a' + i as u8) as char).to_string()).collect();
    let mut fakes = HashMap::new();
    for name in &names {
        let h = NewHost { name: n(name), mac: None, ip: None, bmc_url: Some("fake://".into()), bmc_credentials: None };
        store.add_host(&h, "test").await.expect("host");
        let f = Fake::default();
        f.set(|s| s.on = true);
        fakes.insert(name.clone(), f);
    }
    let new = |owner: &str, ha: bool| NewInstance {
        uuid: InstanceId::random(),
        name: format!("vm-{}", &InstanceId::random().to_string()[..8]),
        owner: n(owner),
        ha,
        storage: Storage::Shared,
        generation: Generation(1),
        domain_xml: None,
    };
    let ha: Vec<NewInstance> = (0..4).map(|_| new("a", true)).collect();
    let others = vec![new("a", false), new("a", true), new("b", true), new("b", false)];
    store.import_instances(&ha.iter().chain(&others).cloned().collect::<Vec<_>>(), "test").await.expect("import");
    store.delete_instances(&[others[1].uuid], "test").await.expect("delete");
    let t0 = Timestamp::now();
    let c = Cell {
        store,
        fakes: Fakes(Arc::new(fakes)),
        t0,
        ha: ha.iter().map(|i| i.uuid).collect(),
        others: others.iter().map(|i| i.uuid).collect(),
    };
    c.beat(&names.iter().map(String::as_str).collect::<Vec<_>>(), t0).await;
    c
}

async fn a_silent_host_is_fenced_and_its_ha_instances_move_once(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    let r = ctl.tick(c.at(10)).await.expect("tick");
    assert!(r.leader && r.actions.is_empty(), "{r:?}");
    // a goes silent; b and c keep heartbeating.
    c.beat(&["b", "c"], c.at(31)).await;
    ctl.tick(c.at(31)).await.expect("tick");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Suspect);
    for s in 0..8 {
        if c.fence_op("a").await.is_some_and(|o| o.status != OperationStatus::Running) {
            break;
        }
        c.beat(&["b", "c"], c.at(32 + s)).await;
        ctl.tick(c.at(32 + s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    let owners = c.check("a", true).await;
    assert_eq!(owners.iter().filter(|o| **o == n("c")).count(), 3, "spread by load (b had 1 live): {owners:?}");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Fenced);
    let fake = &c.fakes.0["a"];
    assert!(fake.get(|s| s.on && s.power_ons == 1), "powered off, then on again (after_fence = power-on)");
    // It boots, its guard quarantines, it heartbeats: active again.
    c.beat(&["a", "b", "c"], c.at(45)).await;
    let r = ctl.tick(c.at(45)).await.expect("tick");
    assert!(r.actions.contains(&nodekeeper_provisioner::recovery::detect::Action::Returned { host: n("a") }));
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Active);
    let events = c.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    let moved = events.iter().filter(|e| e.message.contains("recovered from fenced host a")).count();
    assert_eq!(moved, 4, "one event per move");
}

/// `operation cancel`: a drain ends at its next step (`aborted`), letting go of what it held;
/// a fence before its point of return ends there too, its host in maintenance (not fenced
/// again at the next look); past that point it cannot be cancelled.
async fn cancelled_drains_and_fences_end_at_their_next_step(db: TestDb) {
    use nodekeeper_provisioner::admin::operation_cancel;
    let c = cell(&db, 4).await;
    let ctl = c.controller("replica-1", config()).await;
    let grace = config().grace;
    let (drain, _) =
        nodekeeper_provisioner::recovery::drain::request(&c.store, &n("b"), grace, Duration::from_secs(600), "op")
            .await
            .expect("drain of b");
    c.beat(&["a", "b", "c", "d"], c.at(1)).await;
    ctl.tick(c.at(1)).await.expect("tick");
    let held = |h: &str| {
        let store = c.store.clone();
        let h = n(h);
        async move { store.instances(Some(&h)).await.expect("instances").iter().filter(|i| i.held).count() }
    };
    assert_eq!(held("b").await, 1, "b's HA instance held");
    operation_cancel(&c.store, "token:ops", drain.id).await.expect("cancel the drain");
    c.beat(&["a", "b", "c", "d"], c.at(2)).await;
    ctl.tick(c.at(2)).await.expect("tick");
    let ended = c.store.operation(drain.id).await.expect("read").expect("drain");
    assert_eq!((ended.status, ended.step.as_str()), (OperationStatus::Done, "aborted"), "{ended:?}");
    assert_eq!(held("b").await, 0, "let go");
    assert_eq!(c.store.require_host(&n("b")).await.expect("b").state, HostState::Active);

    // a falls silent: suspect, its fence at `confirm`; cancelled there.
    c.beat(&["b", "c", "d"], c.at(33)).await;
    ctl.tick(c.at(33)).await.expect("tick");
    let fence = c.fence_op("a").await.expect("a fence of a");
    assert_eq!(fence.step, "confirm");
    operation_cancel(&c.store, "token:ops", fence.id).await.expect("cancel before the point of return");
    for s in 34..42 {
        c.beat(&["b", "c", "d"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let ended = c.store.operation(fence.id).await.expect("read").expect("fence");
    assert_eq!((ended.status, ended.step.as_str()), (OperationStatus::Done, "aborted"), "{ended:?}");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Maintenance);
    assert_eq!(c.fence_op("a").await.expect("the last").id, fence.id, "no new fence of a host in maintenance");
    c.check("a", false).await;
    assert!(c.fakes.0["a"].get(|s| s.on), "never powered off");

    // c falls silent; once its fence has powered it off, it cannot be cancelled. (Its last
    // heartbeat goes back to t0: a fence takes a heartbeat newer than its own start — the
    // database's clock, behind this test's — for the host coming back.)
    c.beat(&["c"], c.t0).await;
    c.beat(&["b", "d"], c.at(75)).await;
    ctl.tick(c.at(75)).await.expect("tick");
    for s in 76..86 {
        if c.fence_op("c").await.is_some_and(|o| o.step == "evacuate" || o.status != OperationStatus::Running) {
            break;
        }
        c.beat(&["b", "d"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let fence = c.fence_op("c").await.expect("a fence of c");
    let refused = operation_cancel(&c.store, "token:ops", fence.id).await;
    assert!(refused.is_err_and(|e| e.to_string().contains("point of return")), "step {}", fence.step);
    assert!(c.store.operation(fence.id).await.expect("read").expect("fence").cancel_requested.is_none());
}

/// An instance its drain was live-migrating when its host fell silent may run on the target
/// already: the evacuation gives it to the target, whatever placement would have chosen.
async fn a_fenced_hosts_instance_being_live_migrated_goes_to_its_target(db: TestDb) {
    let c = cell(&db, 3).await;
    let m = nodekeeper_store::guard_api::Migration { from: n("a"), to: n("b"), uri: "qemu+tcp://b/system".into() };
    c.store.start_migration(c.ha[0], Generation(1), &m, "controller", "drain").await.expect("migrating");
    let ctl = c.controller("replica-1", config()).await;
    c.beat(&["b", "c"], c.at(31)).await;
    ctl.tick(c.at(31)).await.expect("tick");
    for s in 0..8 {
        if c.fence_op("a").await.is_some_and(|o| o.status != OperationStatus::Running) {
            break;
        }
        c.beat(&["b", "c"], c.at(32 + s)).await;
        ctl.tick(c.at(32 + s)).await.expect("tick");
    }
    let owners = c.check("a", true).await;
    assert_eq!(owners[0], n("b"), "to its target: {owners:?}");
    assert_eq!(owners.iter().filter(|o| **o == n("c")).count(), 3, "the rest by load (b took one more): {owners:?}");
    let i = c.store.instance(c.ha[0]).await.expect("read").expect("instance");
    assert_eq!(i.migrating_to, None, "the move ended the migration");
    assert!(c.store.migrations().await.expect("migrations").is_empty());
}

async fn no_confirmed_fence_no_recovery_until_an_operator_marks_it_fenced(db: TestDb) {
    let c = cell(&db, 3).await;
    c.fakes.0["a"].set(|s| s.always_fail = true);
    let ctl = c.controller("replica-1", config()).await;
    for s in 0..10 {
        c.beat(&["b", "c"], c.at(31 + s)).await;
        ctl.tick(c.at(31 + s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Failed, "power_off"), "{op:?}");
    assert!(op.last_error.as_deref().is_some_and(|e| e.contains("no instance moves")), "{op:?}");
    c.check("a", false).await;
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Suspect);
    // A failed fence is not retried by itself: the controller does not start another.
    ctl.tick(c.at(45)).await.expect("tick");
    assert_eq!(c.fence_op("a").await.expect("fence").id, op.id);

    // Marking a host fenced that just heartbeated is refused: it runs.
    c.store.record_heartbeat(&n("a")).await.expect("heartbeat");
    let err = controller::mark_fenced(&c.store, &n("a"), &config(), "cli:op").await.expect_err("alive");
    assert!(err.to_string().contains("within the grace period"), "{err}");
    // The operator pulled the plug (the host's last word is a minute old) and says so.
    c.store.record_heartbeat_at(&n("a"), Timestamp(c.t0.0 - 60_000)).await.expect("old heartbeat");
    let (marked, started) = controller::mark_fenced(&c.store, &n("a"), &config(), "cli:op").await.expect("mark");
    assert!(started && marked.step == "evacuate");
    for s in 0..4 {
        c.beat(&["b", "c"], c.at(46 + s)).await;
        ctl.tick(c.at(46 + s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    c.check("a", true).await;
    assert_eq!(c.fakes.0["a"].get(|s| s.power_ons), 0, "marked fenced: left off for the operator");
}

async fn bmc_errors_are_retried_within_the_limit(db: TestDb) {
    let c = cell(&db, 3).await;
    c.fakes.0["a"].set(|s| s.fail_next = 2);
    let ctl = c.controller("replica-1", config()).await;
    for s in 0..10 {
        c.beat(&["b", "c"], c.at(31 + s)).await;
        ctl.tick(c.at(31 + s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!(op.status, OperationStatus::Done, "two failures, then the third attempt: {op:?}");
    c.check("a", true).await;
}

async fn a_host_back_before_its_power_off_is_left_alone(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    c.beat(&["b", "c"], c.at(31)).await;
    ctl.tick(c.at(31)).await.expect("tick"); // suspect; fence started at confirm
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!(op.step, "confirm");
    // Its guard was only slow: it heartbeats before the next tick. (Stamped after the
    // operation began: the simulated clock runs ahead of the real one.)
    c.beat(&["a", "b", "c"], c.at(32)).await;
    ctl.tick(c.at(32)).await.expect("tick");
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "aborted"), "{op:?}");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Active);
    assert!(c.fakes.0["a"].get(|s| s.on), "never powered off");
    c.check("a", false).await;
}

async fn many_silent_hosts_at_once_brake_instead_of_fencing(db: TestDb) {
    let c = cell(&db, 4).await;
    let ctl = c.controller("replica-1", config()).await;
    for s in 0..3 {
        c.beat(&["d"], c.at(31 + s)).await;
        ctl.tick(c.at(31 + s)).await.expect("tick");
    }
    for h in ["a", "b", "c"] {
        assert_eq!(c.store.require_host(&n(h)).await.expect("host").state, HostState::Suspect, "{h}");
        assert!(c.fence_op(h).await.is_none(), "{h} not fenced");
    }
    c.check("a", false).await;
    let events = c.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    let alerts: Vec<_> = events.iter().filter(|e| e.kind == "recovery.mass_failure").collect();
    assert_eq!(alerts.len(), 1, "one alert, not one per tick: {alerts:?}");
    assert!(alerts[0].message.contains("3 of 4"), "{}", alerts[0].message);
    // The partition heals: all back.
    c.beat(&["a", "b", "c", "d"], c.at(40)).await;
    ctl.tick(c.at(40)).await.expect("tick");
    for h in ["a", "b", "c"] {
        assert_eq!(c.store.require_host(&n(h)).await.expect("host").state, HostState::Active, "{h}");
    }
}

async fn only_the_leader_acts_and_a_successor_resumes_mid_fence(db: TestDb) {
    let c = cell(&db, 3).await;
    let short = RecoveryConfig { lease_ttl: Duration::from_millis(400), ..config() };
    let (x, y) = (c.controller("replica-x", short.clone()).await, c.controller("replica-y", short).await);
    c.beat(&["b", "c"], c.at(31)).await;
    assert!(x.tick(c.at(31)).await.expect("x").leader);
    let r = y.tick(c.at(31)).await.expect("y");
    assert!(!r.leader && r.actions.is_empty() && r.fences_stepped == 0, "{r:?}");
    // x drives the fence to evacuate, then dies (no release: its lease must run out).
    c.tick_until(&x, "evacuate", 32, 5).await;
    assert_eq!(c.fence_op("a").await.expect("fence").step, "evacuate");
    c.beat(&["b", "c"], c.at(40)).await;
    assert!(!y.tick(c.at(40)).await.expect("y").leader, "x's lease has not run out yet");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in 0..4 {
        c.beat(&["b", "c"], c.at(41 + s)).await;
        assert!(y.tick(c.at(41 + s)).await.expect("y").leader);
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    c.check("a", true).await;
    assert_eq!(c.fakes.0["a"].get(|s| s.power_ons), 1, "one power-on, by y's restore");
}

async fn two_controllers_racing_on_one_evacuation_move_each_instance_once(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    c.tick_until(&ctl, "evacuate", 31, 5).await;
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!(op.step, "evacuate");
    // A stale leader finishing its tick and the new one: both run the same step at once.
    let other = c.controller("replica-2", config()).await;
    let (r1, r2) = tokio::join!(ctl.step(op.clone(), c.at(36)), other.step(op, c.at(36)));
    r1.expect("step 1");
    r2.expect("step 2");
    let owners = c.check("a", true).await;
    assert_eq!(owners.len(), 4);
    let events = c.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    let advanced = events.iter().filter(|e| e.message.ends_with("next restore")).count();
    assert_eq!(advanced, 1, "the step advanced once");
}

/// PostgreSQL goes away in the middle of an evacuation and comes back: ticks fail while it is
/// away (and change nothing), then the fence goes on where the database says it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_mid_fence_loses_nothing() {
    let Some(db) = TestDb::postgres().await else { return };
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    c.tick_until(&ctl, "evacuate", 31, 5).await;
    assert_eq!(c.fence_op("a").await.expect("fence").step, "evacuate");
    assert!(db.set_reachable(false).await);
    for s in 0..3 {
        assert!(ctl.tick(c.at(40 + s)).await.is_err(), "no database, no tick");
    }
    assert!(db.set_reachable(true).await);
    let mut done = false;
    for s in 0..20 {
        // The first ticks may meet connections the outage killed; the pool replaces them.
        c.beat(&["b", "c"], c.at(45 + s)).await;
        if ctl.tick(c.at(45 + s)).await.is_ok()
            && c.fence_op("a").await.is_some_and(|o| o.status == OperationStatus::Done)
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(done, "{:?}", c.fence_op("a").await);
    c.check("a", true).await;
}

async fn gc_raises_drift_once_and_retries_what_found_no_room(db: TestDb) {
    use nodekeeper_store::ReportedDomain;
    let c = cell(&db, 3).await;
    let quick = RecoveryConfig { grace: Duration::from_millis(300), ..config() };
    let ctl = c.controller("replica-1", quick).await;
    tokio::time::sleep(Duration::from_millis(400)).await; // the assignments are older than the grace
                                                          // node-b's guard reports one of node-a's HA instances running there, and not its own HA one.
    let astray = c.ha[0];
    let b_own_ha = c.others[2];
    let report =
        [ReportedDomain { uuid: astray, running: true, generation: Some(Generation(1)), migration_failed: None }];
    c.store.save_guard_report(&n("b"), &report).await.expect("report");
    c.store.save_guard_report(&n("c"), &[]).await.expect("report");
    for host in ["a", "b", "c"] {
        c.store.record_heartbeat(&n(host)).await.expect("heartbeat");
    }
    let gc = ctl.gc(Timestamp::now()).await.expect("gc");
    assert_eq!(gc.running_astray, vec![(astray, n("b"))]);
    assert_eq!(gc.not_running, vec![(b_own_ha, n("b"))]);
    ctl.gc(Timestamp::now()).await.expect("gc again");
    let events = c.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "gc.running_astray").count(), 1, "raised once");
    assert_eq!(events.iter().filter(|e| e.kind == "gc.not_running").count(), 1, "raised once");
    c.check("a", false).await; // GC moves nothing by itself

    // node-a is fenced with its HA instances still on it (no room then): GC starts the
    // evacuation again, and the next ticks carry it out.
    c.store.set_host_state(&n("a"), HostState::Fenced, "test", "fenced, nothing placed").await.expect("fenced");
    let gc = ctl.gc(Timestamp::now()).await.expect("gc");
    assert_eq!(gc.retried, vec![n("a")]);
    for _ in 0..3 {
        c.beat(&["b", "c"], Timestamp::now()).await;
        ctl.tick(Timestamp::now()).await.expect("tick");
    }
    c.check("a", true).await;
}

/// A fenced host whose fence's way back powered it on again (no room then), as that fence
/// ended: `a`, owning its 4 HA instances and an exclusive service's copy.
async fn powered_on_again(c: &Cell) {
    use nodekeeper_provisioner::config::AfterFence;
    use nodekeeper_provisioner::recovery::fence::FenceData;
    c.store.set_host_state(&n("a"), HostState::Fenced, "test", "powered off, confirmed").await.expect("fenced");
    let data =
        serde_json::to_string(&FenceData { unplaced: 4, ..FenceData::new(AfterFence::PowerOn, 3) }).expect("json");
    let (op, _) = c.store.start_operation(KIND, &n("a"), "restore", None, &data, "test").await.expect("fence");
    let change = nodekeeper_store::StepChange {
        from: "restore".into(),
        to: "done".into(),
        status: OperationStatus::Done,
        attempts: 0,
        deadline: None,
        last_error: None,
        data: None,
        event: "fence of a done: 0 moved, 4 unplaced; powered on again".into(),
    };
    c.store.advance_operation(op.id, &change, "test").await.expect("done");
}

/// Found by the chaos campaign (seed 7007): a fence found no room (the database had been
/// down: no host had heartbeated within the grace), so its way back powered the host on
/// again, still `fenced`; it booted and its guard started its instances (still its own). The
/// GC pass, finding room a moment later, evacuated them from that running host: twice. Now a
/// host powered on again is retried only by powering it off again, confirmed, before anything
/// moves — while it boots (`boot_within`) only when some host could take its instances.
async fn a_host_powered_on_again_gets_a_grace_then_is_powered_off_before_its_instances_move(db: TestDb) {
    let c = cell(&db, 3).await;
    let quick = RecoveryConfig { grace: Duration::from_millis(800), boot_within: Duration::from_secs(60), ..config() };
    let ctl = c.controller("replica-1", quick).await;
    powered_on_again(&c).await;
    // An exclusive service's copy on a (the same run also started one elsewhere meanwhile).
    let svc = nodekeeper_store::Service {
        name: "api".into(),
        copies: 1,
        labels: vec![],
        start: vec!["true".into()],
        stop: vec!["true".into()],
        check: None,
        exclusive: true,
    };
    c.store.put_service(&svc, "test").await.expect("service");
    let place = nodekeeper_store::CopyChange::Place { service: "api".into(), slot: 0, host: n("a") };
    assert!(c.store.change_service_copy(&place, "test").await.expect("placed on a"));
    let copy_on = async || c.store.service_copies(None).await.expect("copies")[0].host.clone();
    c.beat(&["b", "c"], Timestamp::now()).await;
    ctl.tick(Timestamp::now()).await.expect("tick");
    assert_eq!(copy_on().await, n("a"), "powered on again: it may run there, so it stays");
    // Booting, and no host could take its instances (b and c silent past the grace): nothing.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(ctl.gc(Timestamp::now()).await.expect("gc").retried.is_empty(), "no room: it may come back");
    // Room (b and c heard): retried while it boots, at the power-off.
    c.beat(&["b", "c"], Timestamp::now()).await;
    assert_eq!(ctl.gc(Timestamp::now()).await.expect("gc").retried, vec![n("a")]);
    let retry = c.fence_op("a").await.expect("the retry");
    assert_eq!(retry.step, "power_off", "off again, confirmed, before anything moves");
    assert!(c.fakes.0["a"].get(|s| s.on), "it was on (powered on again)");
    c.check("a", false).await;
    ctl.tick(Timestamp::now()).await.expect("tick");
    assert!(!c.fakes.0["a"].get(|s| s.on), "powered off");
    c.check("a", false).await; // nothing moved in the step that powered it off
    for _ in 0..3 {
        c.beat(&["b", "c"], Timestamp::now()).await;
        ctl.tick(Timestamp::now()).await.expect("tick");
    }
    c.check("a", true).await;
    assert_ne!(copy_on().await, n("a"), "off again, confirmed: the copy moves");
}

/// Real servers take minutes to POST: a host powered on again has `boot_within`, not the
/// grace, to come back. Silent past it while it still owns HA instances — and with no room
/// anywhere — it is powered off again and left off (it might boot later and run them while
/// room appears and they move).
async fn a_host_powered_on_again_and_silent_past_boot_within_is_powered_off_and_left_off_without_room(db: TestDb) {
    let c = cell(&db, 3).await;
    let quick =
        RecoveryConfig { grace: Duration::from_millis(300), boot_within: Duration::from_millis(1500), ..config() };
    let ctl = c.controller("replica-1", quick).await;
    powered_on_again(&c).await;
    // b and c stay silent: no room.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(ctl.gc(Timestamp::now()).await.expect("gc").retried.is_empty(), "past the grace, still booting");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(ctl.gc(Timestamp::now()).await.expect("gc").retried, vec![n("a")], "past boot_within");
    let retry = c.fence_op("a").await.expect("the retry");
    assert_eq!(retry.step, "power_off");
    assert!(retry.data.contains("\"after\":\"nothing\""), "left off: {}", retry.data);
    c.check("a", false).await;
}

async fn after_fence_reimage_requests_a_reimage_of_the_host(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", RecoveryConfig { after_fence: AfterFence::Reimage, ..config() }).await;
    for s in 0..8 {
        c.beat(&["b", "c"], c.at(31 + s)).await;
        ctl.tick(c.at(31 + s)).await.expect("tick");
    }
    c.check("a", true).await;
    // The fence is done and a reimage of node-a runs (the host is `reimaging`: its iPXE
    // script serves the installer).
    let latest = c.store.latest_operation(&n("a")).await.expect("op").expect("op");
    assert_eq!((latest.kind.as_str(), latest.status), ("reimage", OperationStatus::Running), "{latest:?}");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Reimaging);
}

async fn an_operator_taking_a_suspect_into_maintenance_calls_its_fence_off(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    c.beat(&["b", "c"], c.at(31)).await;
    ctl.tick(c.at(31)).await.expect("tick"); // suspect; its fence starts at confirm
    assert_eq!(c.fence_op("a").await.expect("fence").step, "confirm");
    c.store.set_host_state(&n("a"), HostState::Maintenance, "cli:op", "on the bench").await.expect("maintenance");
    c.beat(&["b", "c"], c.at(32)).await;
    ctl.tick(c.at(32)).await.expect("tick");
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "aborted"), "{op:?}");
    assert_eq!(
        c.store.require_host(&n("a")).await.expect("a").state,
        HostState::Maintenance,
        "the operator's word stands"
    );
    assert!(c.fakes.0["a"].get(|s| s.on), "never powered off");
    c.check("a", false).await;
}

async fn a_hung_bmc_times_out_and_nothing_moves(db: TestDb) {
    let c = cell(&db, 3).await;
    c.fakes.0["a"].set(|s| s.hang = true);
    let ctl = c.controller("replica-1", config()).await;
    let started = std::time::Instant::now();
    for s in 0..6 {
        c.beat(&["b", "c"], c.at(31 + s)).await;
        ctl.tick(c.at(31 + s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Failed, "power_off"), "{op:?}");
    assert!(op.last_error.as_deref().is_some_and(|e| e.contains("did not answer")), "{op:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "each attempt bounded by the timeout");
    c.check("a", false).await;
}

async fn a_controller_back_from_downtime_gives_every_host_a_grace(db: TestDb) {
    // The provisioner was down for 5 minutes (guards on the embedded SQLite heartbeat through
    // it): the hosts' last heartbeats are 5 minutes old when its controller comes back.
    let c = cell(&db, 3).await;
    let ctl = Controller::new(c.store.clone(), Arc::new(c.fakes.clone()), config(), "replica-1".into());
    let r = ctl.tick(c.at(300)).await.expect("tick");
    assert!(r.leader && r.actions.is_empty(), "nobody is judged on the controller's own absence: {r:?}");
    c.beat(&["b", "c"], c.at(320)).await;
    assert!(ctl.tick(c.at(330)).await.expect("tick").actions.is_empty(), "a grace from the return, not before");
    c.beat(&["b", "c"], c.at(331)).await;
    ctl.tick(c.at(331)).await.expect("tick");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Suspect, "a stayed silent");
    for h in ["b", "c"] {
        assert_eq!(c.store.require_host(&n(h)).await.expect("host").state, HostState::Active);
    }
}

/// Power lost at t=1: the BMC says Off. After two missed heartbeats (probe_after 10 s) the
/// controller asks, and the host is fenced and evacuated in that same tick — 19 s before the
/// grace would have run out.
async fn a_host_its_bmc_says_is_off_is_fenced_and_evacuated_before_the_grace(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    c.fakes.0["a"].set(|s| s.on = false);
    let mut fenced_at = None;
    for s in 1..=14 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        if fenced_at.is_none() && c.fence_op("a").await.is_some() {
            fenced_at = Some(s);
            // Evacuated within the tick that saw the BMC's Off.
            let op = c.fence_op("a").await.expect("fence");
            assert!(matches!(op.step.as_str(), "restore" | "done"), "{op:?}");
            c.check("a", true).await;
        }
    }
    assert_eq!(fenced_at, Some(11), "silent 11 s > probe_after 10 s, well before the 30 s grace");
    let events = c.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    assert!(
        events.iter().any(|e| e.message.contains("its BMC says it is off")),
        "the suspect event says why: {:?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    assert_eq!(c.fakes.0["a"].get(|s| (s.on, s.power_ons)), (true, 1), "then powered on again (after_fence)");
}

/// On but silent (a hung kernel, a cut cable): the BMC says On, and the host waits the whole
/// grace, as before.
async fn a_silent_host_that_is_on_waits_the_grace(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", config()).await;
    for s in 1..=30 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Active, "30 s: not yet");
    assert!(c.fence_op("a").await.is_none());
    c.beat(&["b", "c"], c.at(31)).await;
    ctl.tick(c.at(31)).await.expect("tick");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Suspect);
    // Probing is off: the same at the grace, and an Off BMC waits it too.
    let cfg = RecoveryConfig { probe_after: Some(Duration::ZERO), ..config() };
    let other_db = TestDb::sqlite();
    let d = cell(&other_db, 3).await;
    d.fakes.0["a"].set(|s| s.on = false);
    let ctl = d.controller("replica-1", cfg).await;
    for s in 1..=30 {
        d.beat(&["b", "c"], d.at(s)).await;
        ctl.tick(d.at(s)).await.expect("tick");
    }
    assert!(d.fence_op("a").await.is_none(), "probe_after = 0: no early fence");
}

/// A guard's profile: 1 s heartbeats, isolation 4 s, libvirt 2 s, a 10 s watchdog (`None`:
/// none armed), its quorum cell `cell`.
fn profile(watchdog_s: Option<u64>, cell: &[&str]) -> FencingProfile {
    FencingProfile {
        self_fence: true,
        boot_blocks_ha: true,
        heartbeat_interval_ms: 1_000,
        isolation_timeout_ms: 4_000,
        libvirt_timeout_ms: 2_000,
        watchdog_timeout_ms: watchdog_s.map(|s| s * 1000),
        quorum_cell: Some(cell.iter().map(|h| n(h)).collect()),
        migration_uri: None,
    }
}

/// Every host of `names` reports a profile whose cell is the others; `a`'s watchdog is
/// `a_watchdog`; `a`'s BMC is dead.
async fn watchdog_cell(db: &TestDb, names: &[&str], a_watchdog: Option<u64>) -> Cell {
    let c = cell(db, names.len()).await;
    for h in names {
        let others: Vec<&str> = names.iter().copied().filter(|o| o != h).collect();
        let p = profile(if *h == "a" { a_watchdog } else { Some(10) }, &others);
        c.store.save_guard_fencing(&n(h), &p).await.expect("profile");
    }
    c.fakes.0["a"].set(|s| s.always_fail = true);
    c
}

/// a hangs with its BMC dead: it is fenced by its watchdog — exactly at the bound (the
/// quorum seen from the fence's first look), never a tick before — and its HA instances move
/// once; the fence's event carries the proof.
async fn a_host_with_a_dead_bmc_is_fenced_by_its_watchdog_after_the_bound_never_before(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c"], Some(10)).await;
    let ctl = c.controller("replica-1", config()).await;
    let (mut fenced_at, mut first_look) = (None, None);
    for s in 31..120 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        if first_look.is_none() && c.fence_op("a").await.is_some() {
            first_look = Some(s + 1); // started in this tick, first looked at in the next
        }
        if c.store.require_host(&n("a")).await.expect("a").state == HostState::Fenced {
            fenced_at = Some(s);
            break;
        }
        c.check("a", false).await;
    }
    let p = profile(Some(10), &["b", "c"]);
    let bound = watchdog::bound(&p, c.t0, config().grace, c.at(first_look.expect("a fence")));
    let fenced_at = fenced_at.expect("fenced");
    assert!(
        c.at(fenced_at).0 >= bound.at.0 && c.at(fenced_at - 1).0 < bound.at.0,
        "fenced at {fenced_at} s: at the first tick past the bound, not before: {}",
        bound.terms
    );
    for s in 0..3 {
        c.beat(&["b", "c"], c.at(fenced_at + 1 + s)).await;
        ctl.tick(c.at(fenced_at + 1 + s)).await.expect("tick");
    }
    c.check("a", true).await;
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Fenced);
    let events = c
        .store
        .events(&EventFilter { host: Some(n("a")), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    let proof = events.iter().find(|e| e.message.contains("fenced by its watchdog")).expect("the proof's event");
    assert!(
        proof.message.contains("2 of the 3 hosts") && proof.message.contains("resets the host within 10s"),
        "{}",
        proof.message
    );
}

/// Without an armed watchdog (or without any report), a dead BMC fails the fence, as before.
async fn no_watchdog_fencing_without_an_armed_watchdog_reported(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c"], None).await;
    let ctl = c.controller("replica-1", config()).await;
    for s in 31..200 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Failed, "power_off"), "{op:?}");
    assert!(op.last_error.as_deref().is_some_and(|e| e.contains("no armed hardware watchdog")), "{op:?}");
    c.check("a", false).await;
    // Off in the controller's config: the same, whatever the guard says.
    let other = TestDb::sqlite();
    let d = watchdog_cell(&other, &["a", "b", "c"], Some(10)).await;
    let ctl = d.controller("replica-1", RecoveryConfig { watchdog_fencing: false, ..config() }).await;
    for s in 31..200 {
        d.beat(&["b", "c"], d.at(s)).await;
        ctl.tick(d.at(s)).await.expect("tick");
    }
    let op = d.fence_op("a").await.expect("fence");
    assert_eq!(op.status, OperationStatus::Failed, "{op:?}");
    assert!(op.last_error.as_deref().is_some_and(|e| e.contains("watchdog_fencing = false")), "{op:?}");
    d.check("a", false).await;
}

/// a was only cut off: it heartbeats during the wait — the fence is called off, nothing moves.
async fn a_host_back_during_the_watchdog_wait_keeps_its_instances(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c"], Some(10)).await;
    let ctl = c.controller("replica-1", config()).await;
    c.tick_until(&ctl, "watchdog", 31, 20).await;
    for s in 40..45 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    c.beat(&["a", "b", "c"], c.at(45)).await;
    ctl.tick(c.at(45)).await.expect("tick");
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "aborted"), "{op:?}");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Active);
    for s in 46..150 {
        c.beat(&["a", "b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    c.check("a", false).await;
}

/// Five hosts; a's BMC is dead. While c and d are silent too, no majority of a's cell is heard
/// and the brake holds: a waits however long. When they are back, the count starts again from
/// then: a is fenced at the bound reckoned from the first look that saw the majority again.
async fn a_lost_majority_and_the_brake_hold_the_watchdog_level(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c", "d", "e"], Some(10)).await;
    let ctl = c.controller("replica-1", config()).await;
    for s in 31..40 {
        c.beat(&["b", "c", "d", "e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    assert_eq!(c.fence_op("a").await.expect("fence").step, "watchdog");
    // c and d fall silent (a partition): 3 of 5 silent — the brake; 2 of a's cell of 5 heard.
    for s in 40..200 {
        c.beat(&["b", "e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    assert_eq!(c.fence_op("a").await.expect("fence").step, "watchdog");
    c.check("a", false).await;
    // The partition heals for c and d.
    let mut moved_at = None;
    for s in 200..400 {
        c.beat(&["b", "c", "d", "e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        if c.store.require_host(&n("a")).await.expect("a").state == HostState::Fenced {
            moved_at = Some(s);
            break;
        }
    }
    let p = profile(Some(10), &["b", "c", "d", "e"]);
    let bound = watchdog::bound(&p, c.t0, config().grace, c.at(200));
    let at = moved_at.expect("fenced once the majority is heard again");
    assert!(c.at(at).0 >= bound.at.0 && c.at(at - 1).0 < bound.at.0, "{at}: {}", bound.terms);
    for s in 0..3 {
        c.beat(&["b", "c", "d", "e"], c.at(at + 1 + s)).await;
        ctl.tick(c.at(at + 1 + s)).await.expect("tick");
    }
    c.check("a", true).await;
}

/// A switched PDU speaking Redfish (`PowerEquipment/RackPDUs/1/Outlets/ID`, DMTF's `Outlet`
/// with `#Outlet.PowerControl`) — the test double of a PDU: no emulator of one exists to run
/// here (the SNMP driver is tested against snmpsim, `tests/bmc.rs`). `dead`: every request a 500.
#[derive(Clone, Default)]
struct Pdu {
    on: Arc<std::sync::Mutex<HashMap<String, bool>>>,
    dead: Arc<std::sync::atomic::AtomicBool>,
    switched: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pdu {
    async fn start(&self) -> String {
        use axum::extract::{Path, State};
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        use std::sync::atomic::Ordering;
        async fn get(State(p): State<Pdu>, Path(id): Path<String>) -> axum::response::Response {
            if p.dead.load(Ordering::SeqCst) {
                return (StatusCode::INTERNAL_SERVER_ERROR, "the PDU is gone").into_response();
            }
            let on = p.on.lock().expect("lock").get(&id).copied().unwrap_or(true);
            axum::Json(serde_json::json!({
                "@odata.id": format!("/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/{id}"),
                "Id": id,
                "PowerState": if on { "On" } else { "Off" },
                "Actions": {"#Outlet.PowerControl": {
                    "target": format!("/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/{id}/Actions/Outlet.PowerControl")
                }}
            }))
            .into_response()
        }
        async fn control(
            State(p): State<Pdu>,
            Path(id): Path<String>,
            axum::Json(body): axum::Json<serde_json::Value>,
        ) -> StatusCode {
            if p.dead.load(Ordering::SeqCst) {
                return StatusCode::INTERNAL_SERVER_ERROR;
            }
            let on = match body["PowerState"].as_str() {
                Some("On") => true,
                Some("Off") => false,
                _ => return StatusCode::BAD_REQUEST,
            };
            p.on.lock().expect("lock").insert(id, on);
            p.switched.fetch_add(1, Ordering::SeqCst);
            StatusCode::NO_CONTENT
        }
        let app = axum::Router::new()
            .route("/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/{id}", axum::routing::get(get))
            .route(
                "/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/{id}/Actions/Outlet.PowerControl",
                axum::routing::post(control),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("redfish+http://127.0.0.1:{port}/redfish/v1/PowerEquipment/RackPDUs/1/Outlets")
    }

    fn is_on(&self, id: &str) -> bool {
        self.on.lock().expect("lock").get(id).copied().unwrap_or(true)
    }
}

/// a hangs off outlets A1 and B1 (two power supplies) of a PDU.
async fn with_outlets(c: &Cell, pdu: &Pdu) {
    let base = pdu.start().await;
    let outlets: Vec<nodekeeper_store::HostOutlet> = ["A1", "B1"]
        .iter()
        .map(|id| nodekeeper_store::HostOutlet { url: format!("{base}/{id}"), credentials: None })
        .collect();
    c.store.set_host_outlets(&n("a"), &outlets, "test").await.expect("outlets");
}

/// a's BMC is dead: the fence goes on to its PDU outlets — both off, confirmed — moves its HA
/// instances at once (no watchdog wait), and the way back switches both on before the BMC.
async fn a_host_with_a_dead_bmc_is_fenced_through_its_pdu_outlets_and_they_come_back_on(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c"], None).await;
    let pdu = Pdu::default();
    with_outlets(&c, &pdu).await;
    let ctl = c.controller("replica-1", config()).await;
    let mut fenced_at = None;
    for s in 31..60 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        if fenced_at.is_none() && c.store.require_host(&n("a")).await.expect("a").state == HostState::Fenced {
            fenced_at = Some(s);
            assert!(!pdu.is_on("A1") && !pdu.is_on("B1"), "both outlets off before the point of return");
            // The host lost power with its outlets; its BMC answers again by the time the host
            // is to be powered back on.
            c.fakes.0["a"].set(|s| (s.always_fail, s.on) = (false, false));
        }
        if c.fence_op("a").await.is_some_and(|o| o.status != OperationStatus::Running) {
            break;
        }
    }
    // confirm at 32, three BMC attempts 33–35, the outlets at 36.
    assert_eq!(fenced_at, Some(36), "fenced through the PDU in the tick after the BMC gave up");
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    c.check("a", true).await;
    assert!(pdu.is_on("A1") && pdu.is_on("B1"), "switched on again (after_fence = power-on)");
    assert_eq!(c.fakes.0["a"].get(|s| s.power_ons), 1, "then powered on through the BMC");
    let events = c
        .store
        .events(&EventFilter { host: Some(n("a")), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    assert!(events.iter().any(|e| e.message.contains("its 2 PDU outlet(s) switched off")), "the level is named");
}

/// BMC and PDU dead: the watchdog level, after its bound.
async fn bmc_and_pdu_dead_the_watchdog_fences_after_the_bound(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c"], Some(10)).await;
    let pdu = Pdu::default();
    with_outlets(&c, &pdu).await;
    pdu.dead.store(true, std::sync::atomic::Ordering::SeqCst);
    let ctl = c.controller("replica-1", config()).await;
    let mut steps = Vec::new();
    let mut fenced_at = None;
    for s in 31..150 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        let step = c.fence_op("a").await.map(|o| o.step).unwrap_or_default();
        if steps.last() != Some(&step) {
            steps.push(step.clone());
        }
        if c.store.require_host(&n("a")).await.expect("a").state == HostState::Fenced {
            fenced_at = Some(s);
            break;
        }
    }
    assert_eq!(steps, ["confirm", "power_off", "outlet_off", "watchdog", "evacuate"], "the levels in order");
    let p = profile(Some(10), &["b", "c"]);
    // The quorum was seen from the fence's first look (32).
    let bound = watchdog::bound(&p, c.t0, config().grace, c.at(32));
    let at = fenced_at.expect("fenced by the watchdog");
    assert!(c.at(at).0 >= bound.at.0 && c.at(at - 1).0 < bound.at.0, "{at}: {}", bound.terms);
    assert_eq!(pdu.switched.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Four hosts; a's BMC is dead. b and c fall silent while a's fence tries its BMC: 3 of 4
/// silent by the time it reaches its outlets — the brake holds them (nothing switched) until
/// b and c are back.
async fn the_brake_holds_the_pdu_level(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c", "d"], None).await;
    let pdu = Pdu::default();
    with_outlets(&c, &pdu).await;
    let ctl = c.controller("replica-1", config()).await;
    // Ticks 31–35: confirm, three BMC attempts. b and c are heard until 18: when a is past
    // the grace (31) they are 13 s silent, not yet half the grace — a fails alone and its
    // fence starts; from 34 on they count for the brake (more than 15 s silent).
    for s in 1..=18 {
        c.beat(&["b", "c", "d"], c.at(s)).await;
    }
    for s in 31..100 {
        c.beat(&["d"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    // a was suspect (and fenced... up to its outlets) before b and c turned silent past grace.
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!(op.step, "outlet_off", "{op:?}");
    assert_eq!(pdu.switched.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing switched under the brake");
    c.check("a", false).await;
    for s in 100..110 {
        c.beat(&["b", "c", "d"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    // Off once the brake let go (then on again: after_fence = power-on).
    assert!(pdu.switched.load(std::sync::atomic::Ordering::SeqCst) >= 2, "{:?}", c.fence_op("a").await);
    c.check("a", true).await;
}

/// b and c can give 8 vCPU each; b runs db-b (4 vCPU, group db). a's four HA instances, 4
/// vCPU each, priorities 4 to 1, the first two in group db: the highest goes to c (b has a db
/// member), the second waits — c now has one, b too — rather than break the group, the third
/// fills c, the fourth takes b's last room. One event says why the second waits.
async fn with_too_little_room_priorities_and_anti_affinity_decide_and_the_rest_waits(db: TestDb) {
    use nodekeeper_store::{HostInventory, InstancePolicy};
    let c = cell(&db, 3).await;
    let size = |priority: i64, group: Option<&str>| InstancePolicy {
        priority,
        anti_affinity: group.map(str::to_owned),
        vcpus: 4,
        memory_mib: 4096,
        ..InstancePolicy::default()
    };
    let mut policies: Vec<(InstanceId, InstancePolicy)> = vec![
        (c.ha[0], size(4, Some("db"))),
        (c.ha[1], size(3, Some("db"))),
        (c.ha[2], size(2, None)),
        (c.ha[3], size(1, None)),
    ];
    policies.push((c.others[2], size(0, Some("db")))); // b's HA instance
    c.store.set_instance_policies(&policies, "test").await.expect("policies");
    for h in ["b", "c"] {
        let inv = HostInventory { vcpus: Some(8), memory_mib: Some(65_536), reserved: false };
        c.store.set_host_inventory(&n(h), &inv, "test").await.expect("inventory");
    }
    let ctl = c.controller("replica-1", config()).await;
    for s in 31..45 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let owner =
        |store: Store, id: InstanceId| async move { store.instance(id).await.expect("get").expect("instance").owner };
    assert_eq!(owner(c.store.clone(), c.ha[0]).await, n("c"), "priority 4, db: not where db-b runs");
    assert_eq!(owner(c.store.clone(), c.ha[1]).await, n("a"), "priority 3, db: waits rather than share a host");
    assert_eq!(owner(c.store.clone(), c.ha[2]).await, n("c"));
    assert_eq!(owner(c.store.clone(), c.ha[3]).await, n("b"), "the last room");
    let events = c
        .store
        .events(&EventFilter { instance: Some(c.ha[1]), limit: Some(100), ..Default::default() })
        .await
        .expect("events");
    let unplaced: Vec<_> = events.iter().filter(|e| e.kind == "instance.unplaced").collect();
    assert_eq!(unplaced.len(), 1, "said once: {unplaced:?}");
    assert!(unplaced[0].message.contains("anti-affinity group \"db\""), "{}", unplaced[0].message);
    // No host runs two db members.
    let mut db_hosts = vec![owner(c.store.clone(), c.others[2]).await, owner(c.store.clone(), c.ha[0]).await];
    db_hosts.dedup();
    assert_eq!(db_hosts.len(), 2);
    let relocated = c.store.instance_policies().await.expect("policies");
    assert_eq!((relocated[&c.ha[0]].relocations, relocated[&c.ha[1]].relocations), (1, 0), "counted per recovery");
    let op = c.fence_op("a").await.expect("fence");
    assert!(op.data.contains("\"unplaced\":1"), "{op:?}");
}

/// a (4 HA) and b (1 HA) fall silent together; c, d and e have room for exactly five (4 vCPUs
/// each, 8 + 8 + 4). Both fences evacuate in the same ticks with one read of the fleet per
/// tick, kept in step with their own moves: every instance finds a place and no host takes
/// more than its room (read once and not kept in step, b's would be placed on a full host).
async fn two_fences_of_one_tick_share_the_room_left_and_never_overfill_a_host(db: TestDb) {
    use nodekeeper_store::{HostInventory, InstancePolicy};
    let c = cell(&db, 5).await;
    let four = InstancePolicy { vcpus: 4, memory_mib: 1024, ..InstancePolicy::default() };
    let moving: Vec<InstanceId> = c.ha.iter().copied().chain([c.others[2]]).collect();
    let policies: Vec<_> = moving.iter().map(|id| (*id, four.clone())).collect();
    c.store.set_instance_policies(&policies, "test").await.expect("policies");
    for (h, vcpus) in [("c", 8), ("d", 8), ("e", 4)] {
        let inv = HostInventory { vcpus: Some(vcpus), memory_mib: Some(65_536), reserved: false };
        c.store.set_host_inventory(&n(h), &inv, "test").await.expect("inventory");
    }
    let ctl = c.controller("replica-1", RecoveryConfig { step_through: true, ..config() }).await;
    for s in 31..45 {
        c.beat(&["c", "d", "e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let mut per_host: HashMap<HostName, u32> = HashMap::new();
    for id in &moving {
        let i = c.store.instance(*id).await.expect("get").expect("instance");
        assert!(["c", "d", "e"].contains(&i.owner.as_str()), "{} not moved: {i:?}", i.name);
        *per_host.entry(i.owner).or_default() += 4;
    }
    assert!(per_host[&n("c")] <= 8 && per_host[&n("d")] <= 8 && per_host[&n("e")] <= 4, "{per_host:?}");
    for h in ["a", "b"] {
        let op = c.fence_op(h).await.expect("fence");
        assert_eq!(op.status, OperationStatus::Done, "{op:?}");
    }
}

/// As `serve` runs it (`Controller::run`, the database's clock): six hosts fall silent at
/// once; their fences are driven each by a task of its own, so their evacuations ask at once
/// and are done in passes that place them together. Two hosts with 8 vCPUs each take 4 of the
/// twelve 4-vCPU instances, never more; the rest stay, reported; each moved once.
async fn fences_driven_at_once_share_the_room_left_and_never_overfill_a_host(db: TestDb) {
    use nodekeeper_store::{HostInventory, InstancePolicy};
    let store = db.store().await;
    let failing: Vec<String> = (0..6).map(|i| format!("f{i}")).collect();
    let mut fakes = HashMap::new();
    for name in failing.iter().map(String::as_str).chain(["t0", "t1"]) {
        let h = NewHost { name: n(name), mac: None, ip: None, bmc_url: Some("fake://".into()), bmc_credentials: None };
        store.add_host(&h, "test").await.expect("host");
        let f = Fake::default();
        f.set(|s| s.on = true);
        fakes.insert(name.to_owned(), f);
        store.record_heartbeat(&n(name)).await.expect("heartbeat");
    }
    let vms: Vec<NewInstance> = failing
        .iter()
        .flat_map(|h| [0, 1].map(|k| (h.clone(), k)))
        .map(|(h, k)| NewInstance {
            uuid: InstanceId::random(),
            name: format!("{h}-vm{k}"),
            owner: n(&h),
            ha: true,
            storage: Storage::Shared,
            generation: Generation(1),
            domain_xml: None,
        })
        .collect();
    store.import_instances(&vms, "test").await.expect("import");
    let four = InstancePolicy { vcpus: 4, memory_mib: 1024, ..InstancePolicy::default() };
    let policies: Vec<_> = vms.iter().map(|v| (v.uuid, four.clone())).collect();
    store.set_instance_policies(&policies, "test").await.expect("policies");
    for h in ["t0", "t1"] {
        let inv = HostInventory { vcpus: Some(8), memory_mib: Some(65_536), reserved: false };
        store.set_host_inventory(&n(h), &inv, "test").await.expect("inventory");
    }
    let beats = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                for h in ["t0", "t1"] {
                    let _ = store.record_heartbeat(&n(h)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let config = RecoveryConfig {
        grace: Duration::from_secs(1),
        interval: Duration::from_millis(100),
        lease_ttl: Duration::from_secs(10),
        mass_failure_share: 0.9,
        network_check_port: 0,
        after_fence: AfterFence::Nothing,
        ..RecoveryConfig::default()
    };
    let ctl = Controller::new(store.clone(), Arc::new(Fakes(Arc::new(fakes))), config, "replica-1".into());
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(ctl.run(stop.clone()));
    let started = std::time::Instant::now();
    loop {
        let mut done = 0;
        for h in &failing {
            let op = store.latest_operation(&n(h)).await.expect("op").filter(|o| o.kind == KIND);
            done += usize::from(op.is_some_and(|o| o.status == OperationStatus::Done));
        }
        if done == failing.len() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{done} of 6 fences done in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.expect("controller");
    beats.abort();
    let mut per_host: HashMap<HostName, u32> = HashMap::new();
    let mut moved = 0;
    for v in &vms {
        let i = store.instance(v.uuid).await.expect("get").expect("instance");
        if i.owner == v.owner {
            assert_eq!(i.generation, Generation(1), "{i:?}");
        } else {
            assert!(["t0", "t1"].contains(&i.owner.as_str()) && i.generation == Generation(2), "{i:?}");
            *per_host.entry(i.owner).or_default() += 4;
            moved += 1;
        }
    }
    assert_eq!(moved, 4, "{per_host:?}");
    assert!(per_host.values().all(|v| *v <= 8), "{per_host:?}");
    let events = store.events(&EventFilter::default()).await.expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "instance.moved").count(), 4, "each moved once");
    assert_eq!(events.iter().filter(|e| e.kind == "instance.unplaced").count(), 8, "the rest said why they stay");
}

/// Restart order: web (ha[1]) starts after db (ha[0]). The evacuation moves db and the others,
/// and holds web until db's new owner's guard reports it running; then web moves. Without that
/// report, the evacuation ends after restart_order_wait with web left for the GC pass.
async fn a_web_server_moves_only_once_its_database_runs_again(db: TestDb) {
    use nodekeeper_store::{InstancePolicy, ReportedDomain};
    let c = cell(&db, 3).await;
    let (dbi, web) = (c.ha[0], c.ha[1]);
    let after = InstancePolicy { after: vec![dbi], ..InstancePolicy::default() };
    c.store.set_instance_policies(&[(web, after)], "test").await.expect("policy");
    let ctl = c.controller("replica-1", config()).await;
    let owner = |id: InstanceId| {
        let store = c.store.clone();
        async move { store.instance(id).await.expect("get").expect("instance") }
    };
    for s in 31..40 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let moved_db = owner(dbi).await;
    assert!(moved_db.owner != n("a") && moved_db.generation == Generation(2), "{moved_db:?}");
    assert_eq!(owner(web).await.owner, n("a"), "web waits for db");
    assert_eq!(c.fence_op("a").await.expect("fence").step, "evacuate", "the evacuation goes on");
    // db's new owner reports it running (at its new generation): web moves at the next tick.
    let report = [ReportedDomain { uuid: dbi, running: true, generation: Some(Generation(2)), migration_failed: None }];
    c.store.save_guard_report(&moved_db.owner, &report).await.expect("report");
    c.beat(&["b", "c"], c.at(40)).await;
    ctl.tick(c.at(40)).await.expect("tick");
    let moved_web = owner(web).await;
    assert!(moved_web.owner != n("a") && moved_web.generation == Generation(2), "{moved_web:?}");
    for s in 41..45 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    c.check("a", true).await;

    // Never reported: the evacuation ends after the wait, web left (and said why).
    let other = TestDb::sqlite();
    let d = cell(&other, 3).await;
    let after = InstancePolicy { after: vec![d.ha[0]], ..InstancePolicy::default() };
    d.store.set_instance_policies(&[(d.ha[1], after)], "test").await.expect("policy");
    let short = RecoveryConfig { restart_order_wait: Duration::from_secs(20), ..config() };
    let ctl = d.controller("replica-1", short).await;
    for s in 31..90 {
        d.beat(&["b", "c"], d.at(s)).await;
        ctl.tick(d.at(s)).await.expect("tick");
    }
    let op = d.fence_op("a").await.expect("fence");
    assert_eq!(op.status, OperationStatus::Done, "{op:?}");
    assert_eq!(d.store.instance(d.ha[1]).await.expect("get").expect("i").owner, n("a"));
    let events = d
        .store
        .events(&EventFilter { instance: Some(d.ha[1]), limit: Some(100), ..Default::default() })
        .await
        .expect("events");
    assert!(events.iter().any(|e| e.kind == "instance.unplaced" && e.message.contains("restart order")), "{events:?}");
}

/// a's BMC is dead and its fence waits at the watchdog level (well before its bound; it could
/// as well wait for a majority it never hears): the operator, who pulled the plug, says so —
/// the waiting fence goes on to `evacuate` at once, the operator's word being the last level.
async fn an_operator_takes_over_a_fence_that_waits_for_its_watchdog(db: TestDb) {
    let c = watchdog_cell(&db, &["a", "b", "c"], Some(10)).await;
    let ctl = c.controller("replica-1", config()).await;
    for s in 31..40 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    assert_eq!(c.fence_op("a").await.expect("fence").step, "watchdog");
    // (The simulated clock runs ahead of the database's: a's last word, by its clock, is old.)
    c.store.record_heartbeat_at(&n("a"), Timestamp(c.t0.0 - 60_000)).await.expect("old heartbeat");
    let (op, started) = controller::mark_fenced(&c.store, &n("a"), &config(), "cli:op").await.expect("mark");
    assert!(!started && op.step == "evacuate", "{op:?}");
    assert_eq!(c.store.require_host(&n("a")).await.expect("a").state, HostState::Fenced);
    for s in 40..44 {
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    c.check("a", true).await;
}

/// `step_through` (the default): a's fence starts at the tick that finds it past the grace;
/// at the next tick `confirm` gives it its one more interval, and since its BMC answers, the
/// power-off, the evacuation and the restore follow in that same tick — not a tick apart.
async fn stepping_through_a_fence_whose_bmc_answers_ends_it_in_the_tick_after_it_began(db: TestDb) {
    let c = cell(&db, 3).await;
    let ctl = c.controller("replica-1", RecoveryConfig { step_through: true, ..config() }).await;
    let mut s = 1;
    while c.fence_op("a").await.is_none() {
        assert!(s < 100, "never fenced");
        c.beat(&["b", "c"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        s += 1;
    }
    assert_eq!(c.fence_op("a").await.expect("fence").step, "confirm", "first stepped by the next tick");
    c.check("a", false).await;
    c.beat(&["b", "c"], c.at(s)).await;
    ctl.tick(c.at(s)).await.expect("tick");
    let op = c.fence_op("a").await.expect("fence");
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    c.check("a", true).await;
}

/// Four of five hosts cut off: the brake holds. The partition heals over a few seconds: a and
/// b are heard first, which takes the silent share below the brake while c and d are not yet
/// back — they are not fenced for that; they are heard a moment later and all are active. A
/// host that does not come back (d, the second time) is fenced a grace after the brake let go.
async fn a_healing_partition_does_not_fence_its_stragglers_when_the_brake_lets_go(db: TestDb) {
    let c = cell(&db, 5).await;
    let ctl = c.controller("replica-1", config()).await;
    for s in 31..34 {
        c.beat(&["e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    for h in ["a", "b", "c", "d"] {
        assert_eq!(c.store.require_host(&n(h)).await.expect("host").state, HostState::Suspect, "{h}");
    }
    // a and b back: 2 of 5 silent, under the brake.
    c.beat(&["a", "b", "e"], c.at(34)).await;
    ctl.tick(c.at(34)).await.expect("tick");
    for h in ["c", "d"] {
        assert!(c.fence_op(h).await.is_none(), "{h} fenced while the partition healed");
    }
    // c back a moment later; d not: fenced only once a grace has passed since the brake let go.
    for s in 35..64 {
        c.beat(&["a", "b", "c", "e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
        assert!(c.fence_op("d").await.is_none(), "d fenced at {s}, within a grace of the brake letting go");
    }
    for h in ["a", "b", "c"] {
        assert_eq!(c.store.require_host(&n(h)).await.expect("host").state, HostState::Active, "{h}");
        assert!(c.fence_op(h).await.is_none(), "{h}");
    }
    for s in 64..70 {
        c.beat(&["a", "b", "c", "e"], c.at(s)).await;
        ctl.tick(c.at(s)).await.expect("tick");
    }
    assert!(c.fence_op("d").await.is_some(), "d, silent a grace after the brake let go, is fenced");
}
