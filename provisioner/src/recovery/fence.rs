//! The fence operation (kind `fence`), as pure functions in the reimage's manner:
//!
//! `confirm → power_off → evacuate → restore → done`, or `failed` with the step and reason.
//!
//! - `confirm`: the last look before the point of return. A host that heartbeated since it
//!   turned suspect is back: the fence is called off (`aborted`), nothing was touched.
//! - `power_off`: through the BMC, confirmed by its power status; retried a bounded number of
//!   times. When it never confirms, the operation fails **here**: no instance moves without a
//!   confirmed fence (an operator's `host mark-fenced` is the only other way).
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
    /// Give its HA instances new owners.
    Evacuate,
    /// Power it on again, reimage it, or leave it (policy).
    Restore,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 4] = [Step::Confirm, Step::PowerOff, Step::Evacuate, Step::Restore];

    /// The persisted word.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Confirm => "confirm",
            Step::PowerOff => "power_off",
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

/// After a BMC step's work (`attempts` so far, this one included).
pub fn after_power_off(attempts: u32, result: Result<(), String>, data: &FenceData) -> Decision {
    match result {
        Ok(()) => Decision::Go { to: Step::Evacuate, after: None, why: "powered off, confirmed by the BMC".into() },
        Err(e) if attempts < data.bmc_attempts => Decision::Retry { attempts, error: e },
        Err(e) => Decision::Failed {
            at: Step::PowerOff,
            reason: format!(
                "the BMC did not confirm power off after {attempts} attempts ({e}); no instance moves \
                 without a confirmed fence (an operator may run `host mark-fenced`)"
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
        assert!(matches!(after_power_off(1, Err("timeout".into()), &d), Decision::Retry { attempts: 1, .. }));
        assert!(matches!(after_power_off(2, Err("HTTP 500".into()), &d), Decision::Retry { attempts: 2, .. }));
        match after_power_off(3, Err("still on".into()), &d) {
            Decision::Failed { at: Step::PowerOff, reason } => {
                assert!(reason.contains("no instance moves") && reason.contains("mark-fenced"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(after_power_off(1, Ok(()), &d), Decision::Go { to: Step::Evacuate, .. }));
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
