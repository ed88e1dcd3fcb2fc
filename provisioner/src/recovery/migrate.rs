//! Live migrations' outcome (a drain's, [`super::drain`]): each tick, the controller looks at
//! every instance being live-migrated and decides from the two guards' reports — never from
//! what a guard says it did — so that a guard that dies, a call that hangs or a report that
//! is lost can only delay the decision, never make it wrong.
//!
//! The source's guard migrates (libvirt pauses the domain there before it runs on the
//! target; `UNDEFINE_SOURCE` removes it there); the target's guard leaves the arriving
//! domain alone and reports it. An instance being migrated from `S` to `T` since `t0`:
//! - **done** when `T`'s report (newer than `t0`) shows it running and `S`'s (newer than
//!   `t0`) does not: `T` owns it (generation + 1, compare-and-set; the domain arrived with
//!   that generation in its metadata);
//! - **given up** when it runs on neither (`T`'s report newer than `S`'s, both newer than
//!   `t0`, neither running it: it runs nowhere, and `S`'s guard starts it again, or the
//!   drain moves it cold); or when `S`'s guard reports the migration failed and a report of
//!   `T` since the controller first saw that failure shows it not running there; or when
//!   `T` is fenced or gone (it cannot run there);
//! - left to recovery when `S` is fenced: the fence's evacuation gives it to `T` (the only
//!   host where it may run already) while `T` is active.
//!
//! A report counts only if newer than the intent, and a failure only against a target
//! report newer than when it was first seen: a stale report never ends a migration.

use std::collections::HashMap;

use nodekeeper_store::{GuardReport, HostName, HostState, InstanceId, Store, StoreError, Timestamp};

/// The actor of the decisions.
pub const ACTOR: &str = "controller";

/// What became of the migrations at one look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// Given their new owner.
    pub done: usize,
    /// Given up.
    pub abandoned: usize,
    /// Still under way.
    pub pending: usize,
}

/// The decision about one migration. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target owns it now.
    Done,
    /// Given up, with why.
    Abandon(String),
    /// Not yet.
    Wait,
}

/// What the reports say of one migration of `id` since `t0`: `source`/`target` are the two
/// guards' last reports, `target_state` the target's state (`None`: removed), `failure_seen`
/// when the controller first saw the source report a failure (it is noted by the caller).
pub fn judge(
    id: InstanceId,
    t0: Timestamp,
    source: Option<&GuardReport>,
    target: Option<&GuardReport>,
    target_state: Option<HostState>,
    failure_seen: Option<Timestamp>,
) -> Outcome {
    match target_state {
        None => return Outcome::Abandon("its target was removed".into()),
        Some(HostState::Fenced) => return Outcome::Abandon("its target is fenced: it does not run there".into()),
        Some(_) => {}
    }
    let runs = |r: &GuardReport| r.domains.iter().any(|d| d.uuid == id && d.running);
    let (Some(s), t) = (source.filter(|r| r.at > t0), target.filter(|r| r.at > t0)) else { return Outcome::Wait };
    if let Some(t) = t {
        if runs(t) && !runs(s) {
            return Outcome::Done;
        }
        if !runs(t) && !runs(s) && t.at > s.at {
            return Outcome::Abandon("it runs on neither host".into());
        }
    }
    let failed = s.domains.iter().find(|d| d.uuid == id).and_then(|d| d.migration_failed.as_deref());
    match (failed, failure_seen, target) {
        (Some(why), Some(seen), Some(t)) if t.at > seen && !runs(t) => {
            Outcome::Abandon(format!("the source's guard reports it failed: {why}"))
        }
        _ => Outcome::Wait,
    }
}

/// One look at every live migration (few: a drain's); `failures` keeps, per instance, when a
/// failure report was first seen (in memory: a new leader sees it again, later).
pub async fn resolve(
    store: &Store,
    now: Timestamp,
    failures: &std::sync::Mutex<HashMap<InstanceId, Timestamp>>,
) -> Result<Resolved, StoreError> {
    let migrating = store.migrations().await?;
    let mut out = Resolved::default();
    if migrating.is_empty() {
        failures.lock().unwrap_or_else(|p| p.into_inner()).clear();
        return Ok(out);
    }
    let states: HashMap<HostName, HostState> = store.hosts().await?.into_iter().map(|h| (h.name, h.state)).collect();
    let mut reports: HashMap<HostName, Option<GuardReport>> = HashMap::new();
    for i in &migrating {
        let (Some(to), Some(t0)) = (i.migrating_to.clone(), i.migration_started_at) else { continue };
        if states.get(&i.owner) == Some(&HostState::Fenced) {
            out.pending += 1; // the fence's evacuation gives it to the target
            continue;
        }
        for h in [&i.owner, &to] {
            if !reports.contains_key(h) {
                reports.insert(h.clone(), store.guard_report(h).await?);
            }
        }
        let (source, target) = (reports[&i.owner].as_ref(), reports[&to].as_ref());
        let failed = source
            .filter(|r| r.at > t0)
            .is_some_and(|r| r.domains.iter().any(|d| d.uuid == i.uuid && d.migration_failed.is_some()));
        let seen = if failed {
            Some(*failures.lock().unwrap_or_else(|p| p.into_inner()).entry(i.uuid).or_insert(now))
        } else {
            None
        };
        match judge(i.uuid, t0, source, target, states.get(&to).copied(), seen) {
            Outcome::Done => {
                let why = format!("live-migrated from {} (its guard reports it gone, {to}'s running it)", i.owner);
                match store.finish_migration(i.uuid, i.generation, &to, ACTOR, &why).await {
                    Ok(_) => {
                        out.done += 1;
                        failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&i.uuid);
                    }
                    // Changed meanwhile (moved, deleted): looked at again next tick, if still migrating.
                    Err(StoreError::Conflict { .. } | StoreError::InstanceDeleted(_)) => {}
                    // One that cannot be written now (its target removed meanwhile) holds up no other.
                    Err(e) => tracing::warn!(instance = %i.uuid, "live migration to {to}: {e}"),
                }
            }
            Outcome::Abandon(why) => {
                if store.abandon_migration(i.uuid, &to, ACTOR, &why).await? {
                    out.abandoned += 1;
                }
                failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&i.uuid);
            }
            Outcome::Wait => out.pending += 1,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::{Generation, ReportedDomain};

    fn id() -> InstanceId {
        "00000000-0000-4000-8000-000000000001".parse().expect("uuid")
    }

    fn report(at: i64, running: Option<bool>, failed: Option<&str>) -> GuardReport {
        GuardReport {
            host: "h".parse().expect("host"),
            at: Timestamp(at),
            domains: running
                .map(|running| ReportedDomain {
                    uuid: id(),
                    running,
                    generation: Some(Generation(2)),
                    migration_failed: failed.map(str::to_owned),
                })
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn only_reports_newer_than_the_intent_decide_and_never_while_it_may_run_on_the_source() {
        let t0 = Timestamp(1_000);
        let active = Some(HostState::Active);
        let j = |s: GuardReport, t: GuardReport| judge(id(), t0, Some(&s), Some(&t), active, None);
        // Done: gone from the source, running on the target — both seen after the intent.
        assert_eq!(j(report(1_500, None, None), report(1_400, Some(true), None)), Outcome::Done);
        assert_eq!(j(report(1_500, Some(false), None), report(1_400, Some(true), None)), Outcome::Done);
        // Mid-migration: paused on the target (running), still on the source: wait.
        assert_eq!(j(report(1_500, Some(true), None), report(1_400, Some(true), None)), Outcome::Wait);
        // A source report from before the intent says nothing.
        assert_eq!(j(report(900, None, None), report(1_400, Some(true), None)), Outcome::Wait);
        // Nor does a target report from before it.
        assert_eq!(j(report(1_500, None, None), report(900, Some(true), None)), Outcome::Wait);
        // Runs nowhere: only when the target looked after the source did.
        assert!(matches!(j(report(1_500, None, None), report(1_600, None, None)), Outcome::Abandon(_)));
        assert_eq!(j(report(1_500, None, None), report(1_400, None, None)), Outcome::Wait);
    }

    #[test]
    fn a_failure_is_given_up_only_once_the_target_looked_since_and_does_not_run_it() {
        let t0 = Timestamp(1_000);
        let active = Some(HostState::Active);
        let failed = report(1_500, Some(true), Some("unable to connect"));
        let target = |at, running| report(at, Some(running), None);
        let j = |t: GuardReport, seen| judge(id(), t0, Some(&failed), Some(&t), active, seen);
        assert_eq!(j(target(1_400, false), None), Outcome::Wait, "not noted yet");
        assert_eq!(
            j(target(1_400, false), Some(Timestamp(1_600))),
            Outcome::Wait,
            "target report older than the failure"
        );
        assert!(matches!(j(target(1_700, false), Some(Timestamp(1_600))), Outcome::Abandon(w) if w.contains("unable")));
        assert_eq!(j(target(1_700, true), Some(Timestamp(1_600))), Outcome::Wait, "it runs there: wait");
    }

    #[test]
    fn a_fenced_or_removed_target_ends_the_migration_and_nothing_else_needs_reports() {
        let t0 = Timestamp(1_000);
        assert!(matches!(judge(id(), t0, None, None, Some(HostState::Fenced), None), Outcome::Abandon(_)));
        assert!(matches!(judge(id(), t0, None, None, None, None), Outcome::Abandon(_)));
        assert_eq!(judge(id(), t0, None, None, Some(HostState::Suspect), None), Outcome::Wait);
    }
}
