//! The reimage state machine (contract: "Reimage" in DESIGN.md), as pure functions:
//!
//! `power_off → pxe_next_boot → power_on → agent_booted → image_written → verified →
//! local_boot → heartbeat → done`, or `failed` with the step and the reason.
//!
//! BMC steps (`power_off`, `pxe_next_boot`, `power_on`, `local_boot`) are work the executor
//! does and reports back ([`after_work`]); they are idempotent, so an executor that resumes
//! after a crash simply does them again. Waiting steps (`agent_booted`, `image_written`,
//! `verified`, `heartbeat`) advance on what is observed — the deploy agent's reports, the
//! node's heartbeat — or on their deadline ([`observe`]). When the agent never calls back
//! (hardware that ignores a one-time PXE override, a lost ramdisk), the PXE steps are
//! retried a bounded number of times before the operation fails.

use std::time::Duration;

use serde::{Deserialize, Serialize};

crate::steps! {
    /// A step of the reimage.
    pub enum Step ("reimage") {
        /// Power the host off (through its BMC, confirmed).
        PowerOff = "power_off",
        /// Ask the BMC to boot from the network once.
        PxeNextBoot = "pxe_next_boot",
        /// Power the host on: it PXE-boots the deploy ramdisk.
        PowerOn = "power_on",
        /// Wait for the deploy agent's first call.
        AgentBooted = "agent_booted",
        /// Wait until it has written the image.
        ImageWritten = "image_written",
        /// Wait until it has verified the image's sha256.
        Verified = "verified",
        /// Set the BMC to boot the disk, then power the host off (confirmed: the agent powered
        /// off after `verified`, or is forced off — the image is verified and synced by then) and
        /// on: the firmware boots the disk as the BMC was just told, never the network first
        /// (whose "boot the next entry" differs between firmwares: EDK2 shows its setup menu when
        /// a network loader returns success).
        LocalBoot = "local_boot",
        /// Wait for the installed node to report in.
        Heartbeat = "heartbeat",
    }
}

impl Step {
    fn next(self) -> Option<Step> {
        let i = Step::ALL.iter().position(|s| *s == self)?;
        Step::ALL.get(i + 1).copied()
    }
}
/// How far the deploy agent says it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStage {
    /// It runs and called back.
    Booted,
    /// The image is on the disk.
    Written,
    /// Its sha256 matched.
    Verified,
    /// The node booted from its new disk and called in (its first boot's report, with the
    /// token the agent left in the disk's config block): the provisioner records a heartbeat.
    Up,
}

/// The agent's latest report: the stage it reached, or the stage it failed in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The stage.
    pub stage: AgentStage,
    /// Set when it failed at `stage` (e.g. "sha256 mismatch").
    pub error: Option<String>,
}

/// Deadlines per step; per host, since slow hardware needs long ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// One BMC step (command plus confirmation).
    pub bmc: Duration,
    /// From power-on to the agent's first call.
    pub agent_boot: Duration,
    /// Writing the image.
    pub image_write: Duration,
    /// Verifying it.
    pub verify: Duration,
    /// From local boot to the first heartbeat.
    pub heartbeat: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            bmc: Duration::from_secs(120),
            agent_boot: Duration::from_secs(600),
            image_write: Duration::from_secs(3600),
            verify: Duration::from_secs(900),
            heartbeat: Duration::from_secs(900),
        }
    }
}

/// Retry bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Attempts of one BMC step.
    pub bmc_attempts: u32,
    /// PXE boots tried before giving up on the agent calling back.
    pub pxe_boots: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { bmc_attempts: 3, pxe_boots: 3 }
    }
}

/// The operation's own state, persisted as its JSON `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReimageData {
    /// The image to write (name under `/images/`).
    pub image: String,
    /// PXE boots started so far (1 after the first power-on).
    pub pxe_boots: u32,
    /// The agent's latest report.
    pub agent: Option<AgentReport>,
    /// Deadlines in force.
    pub deadlines: Deadlines,
    /// Retry bounds.
    pub limits: Limits,
    /// How the deploy ramdisk reaches the host in this reimage (the host's setting when the
    /// reimage was requested; a reimage from before boot paths existed was PXE).
    #[serde(default)]
    pub boot_path: nodekeeper_store::BootPath,
    /// The catalogue's served form of `image` when the reimage was requested (`None`: a file
    /// under the images directory, served raw, as before the catalogue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<Served>,
}

/// A catalogue image as the deploy agent fetches it (recorded when the reimage is requested).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// The zstd-compressed raw image, relative to `/images/`.
    pub file: String,
    /// Bytes of the raw image.
    pub raw_size: u64,
    /// sha256 of the served file, as the catalogue recorded it: the agent refuses a file
    /// whose `ETag` says otherwise (replaced under the same name since).
    pub sha256: String,
}

/// What the deploy agent fetches: a path under `/images/`, served raw, or a catalogue image
/// (zstd-compressed, with its raw size and the catalogue's digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef<'a> {
    /// Relative to `/images/`.
    pub path: &'a str,
    /// `Some` for a catalogue image.
    pub served: Option<&'a Served>,
}

impl ImageRef<'_> {
    /// `image`: its catalogue entry when it has one, else a raw file of that name.
    pub fn new<'a>(image: &'a str, served: Option<&'a Served>) -> ImageRef<'a> {
        ImageRef { path: served.map_or(image, |s| s.file.as_str()), served }
    }
}

impl ReimageData {
    /// What the agent fetches for this reimage.
    pub fn image_ref(&self) -> ImageRef<'_> {
        ImageRef::new(&self.image, self.served.as_ref())
    }
}

impl ReimageData {
    /// The state of a reimage of `image` in its first PXE boot, with the default deadlines
    /// and limits (for tests and tools that set up a reimage already under way).
    pub fn first_boot(image: &str) -> ReimageData {
        ReimageData {
            image: image.into(),
            pxe_boots: 1,
            agent: None,
            deadlines: Deadlines::default(),
            limits: Limits::default(),
            boot_path: Default::default(),
            served: None,
        }
    }
}

/// What the executor must do for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Power off, confirmed.
    PowerOff,
    /// One-time PXE boot.
    SetPxeOnce,
    /// Power on, confirmed.
    PowerOn,
    /// Boot from disk from now on, and power-cycle into it (off confirmed, on confirmed).
    BootDisk,
    /// Nothing to do: wait for the agent or the heartbeat.
    Wait,
}

/// The work a step needs.
pub fn work(step: Step) -> Work {
    match step {
        Step::PowerOff => Work::PowerOff,
        Step::PxeNextBoot => Work::SetPxeOnce,
        Step::PowerOn => Work::PowerOn,
        Step::LocalBoot => Work::BootDisk,
        Step::AgentBooted | Step::ImageWritten | Step::Verified | Step::Heartbeat => Work::Wait,
    }
}

/// What to do with the operation (the one engine's decision, over this machine's steps).
pub type Decision = crate::ops::Decision<Step>;

/// The deadline a step gets when it starts.
pub fn deadline_for(step: Step, d: &Deadlines) -> Duration {
    match step {
        Step::PowerOff | Step::PxeNextBoot | Step::PowerOn | Step::LocalBoot => d.bmc,
        Step::AgentBooted => d.agent_boot,
        Step::ImageWritten => d.image_write,
        Step::Verified => d.verify,
        Step::Heartbeat => d.heartbeat,
    }
}

fn go(from: Step, data: &ReimageData, why: String) -> Decision {
    match from.next() {
        Some(to) => Decision::Go { to, after: Some(deadline_for(to, &data.deadlines)), why },
        None => Decision::Done { why },
    }
}

/// After the executor did a BMC step's work, `attempts` of it so far (this one included).
pub fn after_work(step: Step, attempts: u32, result: Result<(), String>, data: &ReimageData) -> Decision {
    match result {
        Ok(()) => go(step, data, format!("{step} done")),
        Err(e) if attempts < data.limits.bmc_attempts => Decision::Retry { attempts, error: e },
        Err(e) => Decision::Failed { at: step, reason: format!("{e} (after {attempts} attempts)") },
    }
}

/// The step where an agent failure at `stage` is reported.
fn step_of(stage: AgentStage) -> Step {
    match stage {
        AgentStage::Booted => Step::AgentBooted,
        AgentStage::Written => Step::ImageWritten,
        AgentStage::Verified => Step::Verified,
        AgentStage::Up => Step::Heartbeat,
    }
}

/// What the deploy API does with a report of the deploy agent (or of the node's first boot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The operation waits for exactly this report: store it (at `step`, compare-and-set).
    Record {
        /// The step it is taken at.
        step: Step,
    },
    /// A repeat of the stage already stored, without an error (the agent's progress while it
    /// writes): an event, nothing stored.
    Progress,
    /// Out of order, or from a step that does not wait for it (409; nothing stored).
    Refuse(String),
}

/// Judges a report of `stage` (`failed`: it carries an error) against the operation's
/// current `step` and the report already stored. Reports are taken in order and only by the
/// step that waits for them: `booted` at `agent_booted`, `written` at `image_written`,
/// `verified` at `verified`, and `up` only at `heartbeat` — after the executor recorded
/// `verified` and `local_boot`. So a report sent before the host was even powered on (a
/// hijack from elsewhere on the network), or `up` while the image is still being written,
/// changes nothing. Pure.
pub fn judge_report(step: &str, stored: Option<&AgentReport>, stage: AgentStage, failed: bool) -> Verdict {
    let Ok(step) = step.parse::<Step>() else {
        return Verdict::Refuse(format!("the reimage is at {step:?}, which takes no report"));
    };
    if !failed && stored.is_some_and(|r| r.error.is_none() && r.stage == stage) {
        return Verdict::Progress;
    }
    let waits = step_of(stage);
    if step == waits {
        Verdict::Record { step }
    } else {
        Verdict::Refuse(format!(
            "the reimage is at {step}; a {} report is taken only at {waits}",
            format!("{stage:?}").to_lowercase()
        ))
    }
}

/// For a waiting step: what the agent reported, whether the node sent a heartbeat since the
/// operation started, and whether the step's deadline has passed.
pub fn observe(step: Step, data: &ReimageData, heartbeat_seen: bool, deadline_passed: bool) -> Decision {
    if let Some(AgentReport { stage, error: Some(e) }) = &data.agent {
        if matches!(step, Step::AgentBooted | Step::ImageWritten | Step::Verified) {
            return Decision::Failed { at: step_of(*stage), reason: format!("deploy agent: {e}") };
        }
    }
    let reached = data.agent.as_ref().filter(|r| r.error.is_none()).map(|r| r.stage);
    let waiting_for = match step {
        Step::AgentBooted => AgentStage::Booted,
        Step::ImageWritten => AgentStage::Written,
        Step::Verified => AgentStage::Verified,
        Step::Heartbeat => {
            return if heartbeat_seen {
                Decision::Done { why: "the node heartbeats from its new system".into() }
            } else if deadline_passed {
                Decision::Failed {
                    at: step,
                    reason: format!("no heartbeat within {}", humantime::format_duration(data.deadlines.heartbeat)),
                }
            } else {
                Decision::Stay
            };
        }
        // BMC steps advance through after_work.
        _ => return Decision::Stay,
    };
    if reached.is_some_and(|r| r >= waiting_for) {
        return go(step, data, format!("deploy agent reports {waiting_for:?}").to_lowercase());
    }
    if !deadline_passed {
        return Decision::Stay;
    }
    let waited = humantime::format_duration(deadline_for(step, &data.deadlines));
    if step == Step::AgentBooted && data.pxe_boots < data.limits.pxe_boots {
        // The classic: the one-time PXE override was ignored or the ramdisk got lost. Boot
        // it again from the top.
        return Decision::Go {
            to: Step::PowerOff,
            after: Some(data.deadlines.bmc),
            why: format!(
                "the deploy agent did not call back within {waited}; PXE boot {} of {}",
                data.pxe_boots + 1,
                data.limits.pxe_boots
            ),
        };
    }
    let what = match step {
        Step::AgentBooted => {
            format!("the deploy agent did not call back within {waited} after {} PXE boots", data.pxe_boots)
        }
        _ => format!("the deploy agent did not report {waiting_for:?} within {waited}").to_lowercase(),
    };
    Decision::Failed { at: step, reason: what }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(agent: Option<(AgentStage, Option<&str>)>, pxe_boots: u32) -> ReimageData {
        ReimageData {
            image: "node.img".into(),
            pxe_boots,
            agent: agent.map(|(stage, e)| AgentReport { stage, error: e.map(str::to_owned) }),
            deadlines: Deadlines::default(),
            limits: Limits::default(),
            boot_path: Default::default(),
            served: None,
        }
    }

    #[test]
    fn reports_are_taken_only_in_order_by_the_step_that_waits_for_them() {
        use AgentStage::*;
        let ok = |stage| Some(AgentReport { stage, error: None });
        let cases: &[(&str, Option<AgentReport>, AgentStage, bool, &str)] = &[
            // The happy path, one report per waiting step.
            ("agent_booted", None, Booted, false, "record"),
            ("image_written", ok(Booted), Written, false, "record"),
            ("verified", ok(Written), Verified, false, "record"),
            ("heartbeat", ok(Verified), Up, false, "record"),
            // A hijack before the host was powered on: nothing at the BMC steps.
            ("power_off", None, Booted, false, "refuse"),
            ("pxe_next_boot", None, Up, false, "refuse"),
            ("power_on", None, Verified, false, "refuse"),
            // Skipping ahead, or `up` before local_boot was recorded.
            ("agent_booted", None, Written, false, "refuse"),
            ("agent_booted", None, Up, false, "refuse"),
            ("image_written", ok(Booted), Verified, false, "refuse"),
            ("verified", ok(Written), Up, false, "refuse"),
            ("local_boot", ok(Verified), Up, false, "refuse"),
            // Going back.
            ("verified", ok(Written), Booted, false, "refuse"),
            // Progress: the stored stage again, while writing.
            ("image_written", ok(Booted), Booted, false, "progress"),
            ("agent_booted", ok(Booted), Booted, false, "progress"),
            // Failures are taken by the step that waits for that stage.
            ("image_written", ok(Booted), Written, true, "record"),
            ("verified", ok(Written), Verified, true, "record"),
            ("agent_booted", None, Written, true, "refuse"),
            ("agent_booted", ok(Booted), Booted, true, "record"),
            ("done", ok(Verified), Up, false, "refuse"),
        ];
        for (step, stored, stage, failed, want) in cases {
            let got = match judge_report(step, stored.as_ref(), *stage, *failed) {
                Verdict::Record { .. } => "record",
                Verdict::Progress => "progress",
                Verdict::Refuse(_) => "refuse",
            };
            assert_eq!(got, *want, "{step} {stored:?} {stage:?} failed={failed}");
        }
    }

    #[test]
    fn steps_round_trip_and_chain_in_contract_order() {
        let words: Vec<&str> = Step::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            words,
            [
                "power_off",
                "pxe_next_boot",
                "power_on",
                "agent_booted",
                "image_written",
                "verified",
                "local_boot",
                "heartbeat"
            ]
        );
        for &s in Step::ALL {
            assert_eq!(s.as_str().parse::<Step>(), Ok(s));
        }
        assert!("reboot".parse::<Step>().is_err());
    }

    #[test]
    fn bmc_steps_advance_retry_and_fail() {
        let d = data(None, 0);
        for (step, next) in [
            (Step::PowerOff, Step::PxeNextBoot),
            (Step::PxeNextBoot, Step::PowerOn),
            (Step::PowerOn, Step::AgentBooted),
            (Step::LocalBoot, Step::Heartbeat),
        ] {
            assert!(matches!(after_work(step, 1, Ok(()), &d), Decision::Go { to, .. } if to == next), "{step}");
            assert_eq!(
                after_work(step, 1, Err("HTTP 500".into()), &d),
                Decision::Retry { attempts: 1, error: "HTTP 500".into() }
            );
            assert!(
                matches!(after_work(step, 3, Err("timeout".into()), &d), Decision::Failed { at, .. } if at == step),
                "{step}"
            );
        }
        assert!(
            matches!(after_work(Step::PowerOn, 1, Ok(()), &d), Decision::Go { after, .. } if after == Some(d.deadlines.agent_boot))
        );
        assert_eq!(work(Step::PxeNextBoot), Work::SetPxeOnce);
        assert_eq!(work(Step::LocalBoot), Work::BootDisk);
        assert_eq!(work(Step::Verified), Work::Wait);
    }

    #[test]
    fn waiting_steps_follow_the_agent() {
        // Nothing yet, before the deadline: stay.
        for step in [Step::AgentBooted, Step::ImageWritten, Step::Verified, Step::Heartbeat] {
            assert_eq!(observe(step, &data(None, 1), false, false), Decision::Stay, "{step}");
        }
        let at = |s: AgentStage| data(Some((s, None)), 1);
        assert!(matches!(
            observe(Step::AgentBooted, &at(AgentStage::Booted), false, false),
            Decision::Go { to: Step::ImageWritten, .. }
        ));
        assert!(matches!(
            observe(Step::ImageWritten, &at(AgentStage::Written), false, false),
            Decision::Go { to: Step::Verified, .. }
        ));
        assert!(matches!(
            observe(Step::Verified, &at(AgentStage::Verified), false, false),
            Decision::Go { to: Step::LocalBoot, .. }
        ));
        // A fast agent already past the step: advance one step at a time.
        assert!(matches!(
            observe(Step::AgentBooted, &at(AgentStage::Verified), false, false),
            Decision::Go { to: Step::ImageWritten, .. }
        ));
        // Behind: stay.
        assert_eq!(observe(Step::Verified, &at(AgentStage::Written), false, false), Decision::Stay);
        // Heartbeat ends it.
        assert!(matches!(observe(Step::Heartbeat, &at(AgentStage::Verified), true, false), Decision::Done { .. }));
    }

    #[test]
    fn a_bad_image_fails_at_verified_and_agent_errors_at_their_stage() {
        let bad = data(Some((AgentStage::Verified, Some("sha256 mismatch: expected 1f2e.., got 9a8b.."))), 1);
        for step in [Step::AgentBooted, Step::ImageWritten, Step::Verified] {
            assert!(
                matches!(observe(step, &bad, false, false), Decision::Failed { at: Step::Verified, ref reason } if reason.contains("sha256 mismatch")),
                "{step}"
            );
        }
        let disk = data(Some((AgentStage::Written, Some("no disk /dev/vda"))), 1);
        assert!(matches!(
            observe(Step::ImageWritten, &disk, false, false),
            Decision::Failed { at: Step::ImageWritten, .. }
        ));
    }

    #[test]
    fn deadlines_retry_pxe_then_fail() {
        // The agent never called back: PXE again, up to the limit.
        for boots in 1..3 {
            let d = data(None, boots);
            assert!(
                matches!(observe(Step::AgentBooted, &d, false, true), Decision::Go { to: Step::PowerOff, ref why, .. } if why.contains(&format!("PXE boot {} of 3", boots + 1)))
            );
        }
        assert!(
            matches!(observe(Step::AgentBooted, &data(None, 3), false, true), Decision::Failed { at: Step::AgentBooted, ref reason } if reason.contains("after 3 PXE boots"))
        );
        // Later waits fail at their deadline; no PXE retry once the agent ran.
        let booted = data(Some((AgentStage::Booted, None)), 1);
        assert!(matches!(
            observe(Step::ImageWritten, &booted, false, true),
            Decision::Failed { at: Step::ImageWritten, .. }
        ));
        let written = data(Some((AgentStage::Written, None)), 1);
        assert!(matches!(observe(Step::Verified, &written, false, true), Decision::Failed { at: Step::Verified, .. }));
        assert!(
            matches!(observe(Step::Heartbeat, &data(Some((AgentStage::Verified, None)), 1), false, true), Decision::Failed { at: Step::Heartbeat, ref reason } if reason.contains("no heartbeat"))
        );
        // A heartbeat that arrives with the deadline still wins.
        assert!(matches!(observe(Step::Heartbeat, &data(None, 1), true, true), Decision::Done { .. }));
    }

    #[test]
    fn data_round_trips_as_json() {
        let d = data(Some((AgentStage::Written, None)), 2);
        let text = serde_json::to_string(&d).expect("json");
        assert_eq!(serde_json::from_str::<ReimageData>(&text).expect("parse"), d);
        assert!(text.contains("\"stage\":\"written\""), "{text}");
    }
}
