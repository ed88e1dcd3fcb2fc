//! The fence operation (kind `fence`), as pure functions in the reimage's manner:
//!
//! `confirm [→ repair → repair_wait] → power_off [→ outlet_off] [→ watchdog] → evacuate →
//! restore → done`, or `failed`
//! with the step and reason. `power_off`, `outlet_off` and `watchdog` are the fencing levels,
//! tried in order until one confirms the host off (Pacemaker's fencing topology).
//!
//! - `confirm`: the last look before the point of return. A host that heartbeated since it
//!   turned suspect is back: the fence is called off (`aborted`), nothing was touched.
//! - `repair`, `repair_wait` (repair before power-cycle, when configured): a host that still
//!   answers on the network is asked over SSH to run `nodekeeper-guard repair` (restart
//!   libvirtd and the guard); a heartbeat within `repair_wait` calls the fence off with the
//!   repair in its event, else the fence goes on to `power_off`.
//! - `power_off`: through the BMC, confirmed by its power status; retried a bounded number of
//!   times. When it never confirms, the next fencing level is tried; with none left, the
//!   operation fails: no instance moves without a confirmed fence (an operator's
//!   `host mark-fenced` is the last level).
//! - `outlet_off`: every switched PDU outlet the host hangs off, off and confirmed (a host
//!   with two power supplies is off only when both are); the mass-failure brake holds it.
//! - `watchdog` (watchdog fencing, [`super::watchdog`]): for a host whose guard reported an
//!   armed hardware watchdog and a self-fence with an exact quorum, wait — while a majority of
//!   its guard's quorum cell heartbeats — until the host must have reset or stopped its HA
//!   domains; a heartbeat meanwhile calls the fence off.
//! - `evacuate`: every HA instance of the host gets a new owner (generation + 1, compare-and-set
//!   per instance, so a resumed or repeated pass moves nothing twice).
//! - `restore`: per policy, power the host back on (its guard's `boot` quarantines what moved),
//!   request a reimage, or leave it fenced for an operator.

use serde::{Deserialize, Serialize};

crate::steps! {
    /// A step of the fence.
    pub enum Step ("fence") {
        /// Is the host still silent?
        Confirm = "confirm",
        /// Ask the host over SSH to restart libvirtd and its guard.
        Repair = "repair",
        /// Wait for a heartbeat after the repair.
        RepairWait = "repair_wait",
        /// Power it off through the BMC, confirmed.
        PowerOff = "power_off",
        /// Switch off its PDU outlets, confirmed.
        OutletOff = "outlet_off",
        /// Wait out its guard's self-fence and hardware watchdog (watchdog fencing).
        Watchdog = "watchdog",
        /// Give its HA instances new owners.
        Evacuate = "evacuate",
        /// Power it on again, reimage it, or leave it (policy).
        Restore = "restore",
    }
}
pub use crate::config::AfterFence;

/// The operation's own state (the operation row's `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceData {
    /// Policy after the fence.
    pub after: AfterFence,
    /// BMC attempts per step before the operation fails.
    pub bmc_attempts: u32,
    /// What `evacuate` did: instances moved, and those no host could take.
    pub moved: usize,
    /// Instances left on the fenced host for want of room (reported; the GC pass retries).
    pub unplaced: usize,
    /// Its PDU outlets were switched off (the way back switches them on first).
    #[serde(default)]
    pub outlets_off: bool,
}

impl FenceData {
    /// A fence's data at its start.
    pub fn new(after: AfterFence, bmc_attempts: u32) -> FenceData {
        FenceData { after, bmc_attempts, moved: 0, unplaced: 0, outlets_off: false }
    }
}

/// The work a step asks of the executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Look at the host's heartbeat.
    Confirm,
    /// Run the repair over SSH.
    Repair,
    /// Look for a heartbeat since the repair.
    RepairWait,
    /// BMC power off, confirmed.
    PowerOff,
    /// Its PDU outlets off, confirmed.
    OutletOff,
    /// Judge watchdog fencing.
    Watchdog,
    /// Move the HA instances.
    Evacuate,
    /// Per [`AfterFence`].
    Restore(AfterFence),
}

/// The work of `step`.
pub fn work(step: Step, data: &FenceData) -> Work {
    match step {
        Step::Confirm => Work::Confirm,
        Step::Repair => Work::Repair,
        Step::RepairWait => Work::RepairWait,
        Step::PowerOff => Work::PowerOff,
        Step::OutletOff => Work::OutletOff,
        Step::Watchdog => Work::Watchdog,
        Step::Evacuate => Work::Evacuate,
        Step::Restore => Work::Restore(data.after),
    }
}

/// What the executor does next (the one engine's decision, over this machine's steps).
pub type Decision = crate::ops::Decision<Step>;

/// What the network check found (`confirm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkCheck {
    /// No address to check, or checks are off.
    NotChecked,
    /// The address answered on the port: the host runs, its guard does not.
    Answers(String),
    /// No answer.
    Silent(String),
}

/// `confirm`: whether the host heartbeated since it turned suspect, and what the network
/// check found. A host that answers on the network but whose guard is silent is fenced all
/// the same — nothing watches its instances — and the event says so; with `repair` on, it is
/// first asked to repair itself.
pub fn confirm(heartbeat_since_suspect: bool, network: &NetworkCheck, repair: bool) -> Decision {
    if heartbeat_since_suspect {
        return Decision::Abort { why: "the host heartbeats again; fence called off".into() };
    }
    let why = match network {
        NetworkCheck::NotChecked => "still silent".to_owned(),
        NetworkCheck::Silent(addr) => format!("still silent, and {addr} does not answer"),
        NetworkCheck::Answers(addr) if repair => {
            let why = format!("still silent, though {addr} answers (the host runs, its guard does not): repair first");
            return Decision::Go { to: Step::Repair, after: None, why };
        }
        NetworkCheck::Answers(addr) => {
            format!("still silent, though {addr} answers (the host runs, its guard does not)")
        }
    };
    Decision::Go { to: Step::PowerOff, after: None, why }
}

/// After the repair over SSH (its report, or why it could not run): wait `wait` for a
/// heartbeat, or go on to the power-off at once.
pub fn after_repair(result: Result<String, String>, wait: std::time::Duration) -> Decision {
    match result {
        Ok(report) => Decision::Go {
            to: Step::RepairWait,
            after: Some(wait),
            why: format!("repaired over SSH ({report}); waiting {} for a heartbeat", humantime::format_duration(wait)),
        },
        Err(e) => Decision::Go { to: Step::PowerOff, after: None, why: format!("the repair over SSH failed: {e}") },
    }
}

/// `repair_wait`: a heartbeat since the fence began calls it off; past the deadline, the
/// fence goes on.
pub fn after_repair_wait(heartbeat_since_fence: bool, deadline_passed: bool) -> Decision {
    if heartbeat_since_fence {
        return Decision::Abort {
            why: "the host heartbeats again after its repair over SSH; fence called off (nothing was powered off)"
                .into(),
        };
    }
    if deadline_passed {
        return Decision::Go {
            to: Step::PowerOff,
            after: None,
            why: "no heartbeat within the repair's wait: powering off".into(),
        };
    }
    Decision::Stay
}

/// The fencing levels left after one failed: switched PDU outlets, then watchdog fencing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Levels {
    /// The host hangs off PDU outlets (and `outlet_off` has not failed yet).
    pub outlets: bool,
    /// Whether it may be fenced by its watchdog, or why not.
    pub watchdog: Result<(), String>,
}

impl Levels {
    /// The next level, with what it says of the failed one; or the failure.
    fn next(self, at: Step, failed: String) -> Decision {
        match self {
            Levels { outlets: true, .. } => {
                Decision::Go { to: Step::OutletOff, after: None, why: format!("{failed}; next level: its PDU outlets") }
            }
            Levels { watchdog: Ok(()), .. } => Decision::Go {
                to: Step::Watchdog,
                after: None,
                why: format!("{failed}; its guard keeps a hardware watchdog armed: watchdog fencing"),
            },
            Levels { watchdog: Err(no), .. } => Decision::Failed {
                at,
                reason: format!(
                    "{failed}, and no watchdog fencing: {no}; no instance moves without a confirmed fence (an \
                     operator may run `host mark-fenced`)"
                ),
            },
        }
    }
}

/// After a BMC step's work (`attempts` so far, this one included); `levels`: what is left
/// when the BMC gives up.
pub fn after_power_off(attempts: u32, result: Result<(), String>, data: &FenceData, levels: Levels) -> Decision {
    match result {
        Ok(()) => Decision::Go { to: Step::Evacuate, after: None, why: "powered off, confirmed by the BMC".into() },
        Err(e) if attempts < data.bmc_attempts => Decision::Retry { attempts, error: e },
        Err(e) => {
            levels.next(Step::PowerOff, format!("the BMC did not confirm power off after {attempts} attempts ({e})"))
        }
    }
}

/// After `outlet_off`'s work on `count` outlets (`attempts` so far); `brake`: why the
/// mass-failure brake holds, if it does (nothing was switched); `watchdog`: the level after.
pub fn after_outlet_off(
    attempts: u32,
    result: Result<usize, String>,
    data: &FenceData,
    brake: Option<&str>,
    watchdog: Result<(), String>,
) -> Decision {
    if brake.is_some() {
        return Decision::Stay;
    }
    match result {
        Ok(n) => Decision::Go {
            to: Step::Evacuate,
            after: None,
            why: format!("its {n} PDU outlet(s) switched off, confirmed by the PDU"),
        },
        Err(e) if attempts < data.bmc_attempts => Decision::Retry { attempts, error: e },
        Err(e) => Levels { outlets: false, watchdog }
            .next(Step::OutletOff, format!("its PDU outlets did not confirm off after {attempts} attempts ({e})")),
    }
}

/// After the watchdog level's look.
pub fn after_watchdog(verdict: super::watchdog::Verdict, heartbeat_since_fence: bool) -> Decision {
    use super::watchdog::Verdict;
    if heartbeat_since_fence {
        return Decision::Abort {
            why: "the host heartbeats again while its watchdog fencing waited; fence called off (nothing was \
                  powered off)"
                .into(),
        };
    }
    match verdict {
        Verdict::Fenced(proof) => Decision::Go { to: Step::Evacuate, after: None, why: proof },
        Verdict::Wait(_) => Decision::Stay,
        Verdict::Refused(why) => Decision::Failed {
            at: Step::Watchdog,
            reason: format!(
                "no watchdog fencing: {why}; no instance moves without a confirmed fence (an operator may run \
                 `host mark-fenced`)"
            ),
        },
    }
}

/// After `evacuate` (`moved`, `unplaced`), or its error (a database error: retried forever,
/// since the move is idempotent and nothing else can make progress without the database).
pub fn after_evacuate(result: Result<(usize, usize), String>, attempts: u32) -> Decision {
    match result {
        Ok((moved, 0)) => {
            Decision::Go { to: Step::Restore, after: None, why: format!("{moved} HA instances have new owners") }
        }
        Ok((moved, unplaced)) => Decision::Go {
            to: Step::Restore,
            after: None,
            why: format!("{moved} HA instances have new owners; {unplaced} found no host with room and stay fenced"),
        },
        Err(e) => Decision::Retry { attempts, error: e },
    }
}

/// After `restore`'s work.
pub fn after_restore(attempts: u32, result: Result<(), String>, data: &FenceData) -> Decision {
    let what = match data.after {
        AfterFence::PowerOn => "powered on again",
        AfterFence::Reimage => "reimage requested",
        AfterFence::Nothing => "left off for an operator",
    };
    match result {
        Ok(()) => Decision::Done { why: what.into() },
        Err(e) if attempts < data.bmc_attempts => Decision::Retry { attempts, error: e },
        // The instances are safe; only the way back failed. The host stays fenced.
        Err(e) => {
            Decision::Failed { at: Step::Restore, reason: format!("{what} failed after {attempts} attempts: {e}") }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(after: AfterFence) -> FenceData {
        FenceData { after, bmc_attempts: 3, moved: 0, unplaced: 0, outlets_off: false }
    }

    fn levels(outlets: bool, watchdog: Result<(), String>) -> Levels {
        Levels { outlets, watchdog }
    }

    #[test]
    fn steps_round_trip_and_do_their_work() {
        for &s in Step::ALL {
            assert_eq!(s.as_str().parse::<Step>(), Ok(s));
        }
        assert!("reboot".parse::<Step>().is_err());
        assert_eq!(work(Step::Restore, &data(AfterFence::Reimage)), Work::Restore(AfterFence::Reimage));
        assert_eq!(work(Step::PowerOff, &data(AfterFence::PowerOn)), Work::PowerOff);
    }

    #[test]
    fn a_host_that_comes_back_before_the_power_off_is_not_fenced() {
        assert!(matches!(confirm(true, &NetworkCheck::Answers("10.0.0.5:22".into()), true), Decision::Abort { .. }));
        assert_eq!(
            confirm(false, &NetworkCheck::NotChecked, true),
            Decision::Go { to: Step::PowerOff, after: None, why: "still silent".into() }
        );
        match confirm(false, &NetworkCheck::Answers("10.0.0.5:22".into()), false) {
            Decision::Go { to: Step::PowerOff, why, .. } => assert!(why.contains("its guard does not"), "{why}"),
            other => panic!("{other:?}"),
        }
        // With repair on, a host that answers is asked to repair itself first; a silent one is not.
        assert!(matches!(
            confirm(false, &NetworkCheck::Answers("10.0.0.5:22".into()), true),
            Decision::Go { to: Step::Repair, .. }
        ));
        assert!(matches!(
            confirm(false, &NetworkCheck::Silent("10.0.0.5:22".into()), true),
            Decision::Go { to: Step::PowerOff, .. }
        ));
        match confirm(false, &NetworkCheck::Silent("10.0.0.5:22".into()), false) {
            Decision::Go { to: Step::PowerOff, why, .. } => assert!(why.contains("does not answer"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_repair_waits_for_a_heartbeat_then_the_fence_goes_on() {
        let wait = std::time::Duration::from_secs(30);
        match after_repair(Ok("libvirtd ok, guard ok".into()), wait) {
            Decision::Go { to: Step::RepairWait, after: Some(w), why } => {
                assert!(w == wait && why.contains("guard ok"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(after_repair(Err("Permission denied".into()), wait), Decision::Go { to: Step::PowerOff, .. }));
        assert_eq!(after_repair_wait(false, false), Decision::Stay);
        assert!(matches!(after_repair_wait(true, false), Decision::Abort { .. }));
        assert!(matches!(after_repair_wait(true, true), Decision::Abort { .. }), "a heartbeat wins");
        assert!(matches!(after_repair_wait(false, true), Decision::Go { to: Step::PowerOff, .. }));
    }

    #[test]
    fn no_confirmed_power_off_no_recovery() {
        let d = data(AfterFence::PowerOn);
        let no = || levels(false, Err("its guard reported no armed hardware watchdog".to_owned()));
        let retry = |a, l| matches!(after_power_off(a, Err("timeout".into()), &d, l), Decision::Retry { attempts, .. } if attempts == a);
        assert!(retry(1, no()));
        assert!(retry(2, levels(true, Ok(()))));
        match after_power_off(3, Err("still on".into()), &d, no()) {
            Decision::Failed { at: Step::PowerOff, reason } => assert!(
                reason.contains("no instance moves") && reason.contains("mark-fenced") && reason.contains("no armed"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(after_power_off(1, Ok(()), &d, no()), Decision::Go { to: Step::Evacuate, .. }));
        // The next levels, in order: the outlets, then the watchdog.
        let go = |l| match after_power_off(3, Err("x".into()), &d, l) {
            Decision::Go { to, .. } => Some(to),
            _ => None,
        };
        assert_eq!(go(levels(true, Ok(()))), Some(Step::OutletOff));
        assert_eq!(go(levels(true, Err("no".into()))), Some(Step::OutletOff));
        assert_eq!(go(levels(false, Ok(()))), Some(Step::Watchdog));
    }

    #[test]
    fn outlets_confirm_the_fence_or_hand_over_to_the_watchdog_and_the_brake_holds_them() {
        let d = data(AfterFence::PowerOn);
        match after_outlet_off(1, Ok(2), &d, None, Err("no".into())) {
            Decision::Go { to: Step::Evacuate, why, .. } => assert!(why.contains("2 PDU outlet(s)"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(after_outlet_off(1, Ok(2), &d, Some("3 of 4 silent"), Ok(())), Decision::Stay, "the brake holds");
        assert!(matches!(after_outlet_off(2, Err("timeout".into()), &d, None, Ok(())), Decision::Retry { .. }));
        assert!(matches!(
            after_outlet_off(3, Err("timeout".into()), &d, None, Ok(())),
            Decision::Go { to: Step::Watchdog, .. }
        ));
        match after_outlet_off(3, Err("timeout".into()), &d, None, Err("self-fence off".into())) {
            Decision::Failed { at: Step::OutletOff, reason } => {
                assert!(reason.contains("outlets did not confirm") && reason.contains("self-fence off"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_watchdog_level_waits_moves_on_with_its_proof_or_fails_and_a_heartbeat_calls_it_off() {
        use crate::recovery::watchdog::Verdict;
        assert_eq!(after_watchdog(Verdict::Wait("not yet".into()), false), Decision::Stay);
        assert_eq!(
            after_watchdog(Verdict::Fenced("proof".into()), false),
            Decision::Go { to: Step::Evacuate, after: None, why: "proof".into() }
        );
        assert!(matches!(after_watchdog(Verdict::Fenced("proof".into()), true), Decision::Abort { .. }));
        assert!(matches!(after_watchdog(Verdict::Wait("x".into()), true), Decision::Abort { .. }));
        match after_watchdog(Verdict::Refused("self-fence off".into()), false) {
            Decision::Failed { at: Step::Watchdog, reason } => assert!(reason.contains("self-fence off"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn evacuation_reports_what_found_no_room_and_retries_database_errors() {
        assert!(matches!(after_evacuate(Ok((4, 0)), 1), Decision::Go { to: Step::Restore, .. }));
        match after_evacuate(Ok((3, 2)), 1) {
            Decision::Go { to: Step::Restore, why, .. } => assert!(why.contains("2 found no host"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(after_evacuate(Err("database down".into()), 7), Decision::Retry { attempts: 7, .. }));
    }

    #[test]
    fn restore_follows_the_policy_and_its_failure_keeps_the_host_fenced() {
        assert_eq!(
            after_restore(1, Ok(()), &data(AfterFence::Nothing)),
            Decision::Done { why: "left off for an operator".into() }
        );
        assert!(matches!(
            after_restore(3, Err("x".into()), &data(AfterFence::PowerOn)),
            Decision::Failed { at: Step::Restore, .. }
        ));
        let policy: AfterFence = serde_json::from_str("\"reimage\"").expect("policy");
        assert_eq!(policy, AfterFence::Reimage);
    }
}
