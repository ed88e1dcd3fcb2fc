//! The fence operation (kind `fence`), as pure functions in the reimage's manner:
//!
//! `confirm → power_off [→ watchdog] → evacuate → restore → done`, or `failed` with the step
//! and reason.
//!
//! - `confirm`: the last look before the point of return. A host that heartbeated since it
//!   turned suspect is back: the fence is called off (`aborted`), nothing was touched.
//! - `power_off`: through the BMC, confirmed by its power status; retried a bounded number of
//!   times. When it never confirms, the next fencing level is tried; with none left, the
//!   operation fails: no instance moves without a confirmed fence (an operator's
//!   `host mark-fenced` is the last level).
//! - `watchdog` (watchdog fencing, [`super::watchdog`]): for a host whose guard reported an
//!   armed hardware watchdog and a self-fence with an exact quorum, wait — while a majority of
//!   its guard's quorum cell heartbeats — until the host must have reset or stopped its HA
//!   domains; a heartbeat meanwhile calls the fence off.
//! - `evacuate`: every HA instance of the host gets a new owner (generation + 1, compare-and-set
//!   per instance, so a resumed or repeated pass moves nothing twice).
//! - `restore`: per policy, power the host back on (its guard's `boot` quarantines what moved),
//!   request a reimage, or leave it fenced for an operator.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A step of the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Is the host still silent?
    Confirm,
    /// Power it off through the BMC, confirmed.
    PowerOff,
    /// Wait out its guard's self-fence and hardware watchdog (watchdog fencing).
    Watchdog,
    /// Give its HA instances new owners.
    Evacuate,
    /// Power it on again, reimage it, or leave it (policy).
    Restore,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 5] = [Step::Confirm, Step::PowerOff, Step::Watchdog, Step::Evacuate, Step::Restore];

    /// The persisted word.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Confirm => "confirm",
            Step::PowerOff => "power_off",
            Step::Watchdog => "watchdog",
            Step::Evacuate => "evacuate",
            Step::Restore => "restore",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Step {
    type Err = String;
    fn from_str(s: &str) -> Result<Step, String> {
        Step::ALL.iter().copied().find(|x| x.as_str() == s).ok_or_else(|| format!("unknown fence step {s:?}"))
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
}

/// The work a step asks of the executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Look at the host's heartbeat.
    Confirm,
    /// BMC power off, confirmed.
    PowerOff,
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
        Step::PowerOff => Work::PowerOff,
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
/// the same — nothing watches its instances — and the event says so.
pub fn confirm(heartbeat_since_suspect: bool, network: &NetworkCheck) -> Decision {
    if heartbeat_since_suspect {
        return Decision::Abort { why: "the host heartbeats again; fence called off".into() };
    }
    let why = match network {
        NetworkCheck::NotChecked => "still silent".to_owned(),
        NetworkCheck::Silent(addr) => format!("still silent, and {addr} does not answer"),
        NetworkCheck::Answers(addr) => {
            format!("still silent, though {addr} answers (the host runs, its guard does not)")
        }
    };
    Decision::Go { to: Step::PowerOff, after: None, why }
}

/// After a BMC step's work (`attempts` so far, this one included). `watchdog`: whether the
/// host may be fenced by its watchdog (the next level), or why not.
pub fn after_power_off(
    attempts: u32,
    result: Result<(), String>,
    data: &FenceData,
    watchdog: Result<(), String>,
) -> Decision {
    match result {
        Ok(()) => Decision::Go { to: Step::Evacuate, after: None, why: "powered off, confirmed by the BMC".into() },
        Err(e) if attempts < data.bmc_attempts => Decision::Retry { attempts, error: e },
        Err(e) => match watchdog {
            Ok(()) => Decision::Go {
                to: Step::Watchdog,
                after: None,
                why: format!(
                    "the BMC did not confirm power off after {attempts} attempts ({e}); its guard keeps a hardware \
                     watchdog armed: watchdog fencing"
                ),
            },
            Err(no) => Decision::Failed {
                at: Step::PowerOff,
                reason: format!(
                    "the BMC did not confirm power off after {attempts} attempts ({e}), and no watchdog fencing: {no}; \
                     no instance moves without a confirmed fence (an operator may run `host mark-fenced`)"
                ),
            },
        },
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
        FenceData { after, bmc_attempts: 3, moved: 0, unplaced: 0 }
    }

    #[test]
    fn steps_round_trip_and_do_their_work() {
        for s in Step::ALL {
            assert_eq!(s.as_str().parse::<Step>(), Ok(s));
        }
        assert!("reboot".parse::<Step>().is_err());
        assert_eq!(work(Step::Restore, &data(AfterFence::Reimage)), Work::Restore(AfterFence::Reimage));
        assert_eq!(work(Step::PowerOff, &data(AfterFence::PowerOn)), Work::PowerOff);
    }

    #[test]
    fn a_host_that_comes_back_before_the_power_off_is_not_fenced() {
        assert!(matches!(confirm(true, &NetworkCheck::Answers("10.0.0.5:22".into())), Decision::Abort { .. }));
        assert_eq!(
            confirm(false, &NetworkCheck::NotChecked),
            Decision::Go { to: Step::PowerOff, after: None, why: "still silent".into() }
        );
        match confirm(false, &NetworkCheck::Answers("10.0.0.5:22".into())) {
            Decision::Go { to: Step::PowerOff, why, .. } => assert!(why.contains("its guard does not"), "{why}"),
            other => panic!("{other:?}"),
        }
        match confirm(false, &NetworkCheck::Silent("10.0.0.5:22".into())) {
            Decision::Go { to: Step::PowerOff, why, .. } => assert!(why.contains("does not answer"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_confirmed_power_off_no_recovery() {
        let d = data(AfterFence::PowerOn);
        let no = || Err("its guard reported no armed hardware watchdog".to_owned());
        assert!(matches!(after_power_off(1, Err("timeout".into()), &d, no()), Decision::Retry { attempts: 1, .. }));
        assert!(matches!(after_power_off(2, Err("HTTP 500".into()), &d, Ok(())), Decision::Retry { attempts: 2, .. }));
        match after_power_off(3, Err("still on".into()), &d, no()) {
            Decision::Failed { at: Step::PowerOff, reason } => assert!(
                reason.contains("no instance moves") && reason.contains("mark-fenced") && reason.contains("no armed"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(after_power_off(1, Ok(()), &d, no()), Decision::Go { to: Step::Evacuate, .. }));
        // The next level, when the guard qualifies.
        assert!(matches!(after_power_off(3, Err("x".into()), &d, Ok(())), Decision::Go { to: Step::Watchdog, .. }));
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
