//! The GC pass's judgement, pure: what the guards' reports show against the database's
//! assignments. It moves nothing by itself (the guards converge; a running domain is never
//! stopped from the controller) — it says what drifted, once per occurrence.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nodekeeper_store::{GuardReport, Host, HostName, HostState, Instance, InstanceId, Timestamp};

/// One drift, as its event says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `gc.running_astray` or `gc.not_running`.
    pub kind: &'static str,
    /// The instance.
    pub instance: InstanceId,
    /// The host whose report shows it.
    pub host: HostName,
    /// The event's sentence.
    pub message: String,
    /// The event's key (once per instance, host and generation).
    pub key: String,
}

/// What the reports of active hosts, fresher than `3 × grace`, show at `now`:
/// - a domain running where the database does not assign it (another owner's, or deleted) —
///   **running astray**;
/// - an HA instance assigned to the host a while ago (more than `grace` before the report:
///   not just moved) that is not running there — **not running**.
///
/// Domains the database does not know are not its to judge.
pub fn drift(
    reports: &[GuardReport],
    hosts: &[Host],
    instances: &[Instance],
    now: Timestamp,
    grace: Duration,
) -> Vec<Drift> {
    // Indexed once: a fleet's reports × its hosts or instances would be quadratic (10,000
    // hosts, 100,000 instances: a billion comparisons a pass).
    let by_id: HashMap<InstanceId, &Instance> = instances.iter().map(|i| (i.uuid, i)).collect();
    let active: HashSet<&HostName> = hosts.iter().filter(|h| h.state == HostState::Active).map(|h| &h.name).collect();
    let mut owned: HashMap<&HostName, Vec<&Instance>> = HashMap::new();
    for i in instances.iter().filter(|i| i.ha && !i.deleted) {
        owned.entry(&i.owner).or_default().push(i);
    }
    let mut out = Vec::new();
    for r in reports {
        let active = active.contains(&r.host);
        if !active || now.since(r.at) > grace * 3 {
            continue;
        }
        let running: HashSet<InstanceId> = r.domains.iter().filter(|d| d.running).map(|d| d.uuid).collect();
        for d in r.domains.iter().filter(|d| d.running) {
            let Some(i) = by_id.get(&d.uuid) else { continue };
            let message = if i.deleted {
                format!("{} is deleted but runs on {}", i.name, r.host)
            } else if i.owner != r.host {
                format!("{} runs on {} but belongs to {} (generation {})", i.name, r.host, i.owner, i.generation)
            } else {
                continue;
            };
            let key = format!("gc:astray:{}:{}:{}", i.uuid, r.host, i.generation);
            out.push(Drift { kind: "gc.running_astray", instance: i.uuid, host: r.host.clone(), message, key });
        }
        for i in owned.get(&r.host).into_iter().flatten() {
            if running.contains(&i.uuid) || r.at.since(i.updated_at) < grace {
                continue;
            }
            let message = format!("HA instance {} is not running on its host {}", i.name, r.host);
            let key = format!("gc:not_running:{}:{}:{}", i.uuid, r.host, i.generation);
            out.push(Drift { kind: "gc.not_running", instance: i.uuid, host: r.host.clone(), message, key });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::{Generation, ReportedDomain, Storage};

    const NOW: Timestamp = Timestamp(1_800_000_000_000);
    const GRACE: Duration = Duration::from_secs(30);

    fn n(s: &str) -> HostName {
        s.parse().expect("name")
    }

    fn host(name: &str, state: HostState) -> Host {
        nodekeeper_store::testing::host(name, state, Some(NOW.0))
    }

    fn instance(k: u8, owner: &str, ha: bool, deleted: bool, moved_ms_ago: i64) -> Instance {
        Instance {
            uuid: format!("00000000-0000-4000-8000-0000000000{k:02x}").parse().expect("uuid"),
            name: format!("vm-{k}"),
            owner: n(owner),
            generation: Generation(2),
            ha,
            storage: Storage::Shared,
            deleted,
            has_domain_xml: true,
            created_at: Timestamp(0),
            updated_at: Timestamp(NOW.0 - moved_ms_ago),
            held: false,
            migrating_to: None,
            migration_uri: None,
            migration_started_at: None,
        }
    }

    fn report(host: &str, at: Timestamp, running: &[&Instance]) -> GuardReport {
        GuardReport {
            host: n(host),
            at,
            domains: running
                .iter()
                .map(|i| ReportedDomain {
                    uuid: i.uuid,
                    running: true,
                    generation: Some(i.generation),
                    migration_failed: None,
                })
                .collect(),
        }
    }

    #[test]
    fn drift_is_what_runs_astray_and_what_does_not_run_where_it_belongs() {
        let hosts = [host("a", HostState::Active), host("b", HostState::Active), host("f", HostState::Fenced)];
        let on_a = instance(1, "a", true, false, 600_000);
        let moved_to_b = instance(2, "b", true, false, 600_000);
        let just_moved = instance(3, "b", true, false, 5_000);
        let deleted = instance(4, "a", true, true, 600_000);
        let not_ha = instance(5, "b", false, false, 600_000);
        let all = [on_a.clone(), moved_to_b.clone(), just_moved.clone(), deleted.clone(), not_ha.clone()];
        // a runs its own, b's moved one (astray), and a deleted one (astray); b runs nothing.
        let reports = [report("a", NOW, &[&on_a, &moved_to_b, &deleted]), report("b", NOW, &[])];
        let got: Vec<(&str, String, String)> = drift(&reports, &hosts, &all, NOW, GRACE)
            .into_iter()
            .map(|d| (d.kind, d.instance.to_string()[34..].to_owned(), d.host.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("gc.running_astray", "02".to_owned(), "a".to_owned()),
                ("gc.running_astray", "04".to_owned(), "a".to_owned()),
                // b's HA instance moved long ago is not running there; the one just moved is
                // given time; the non-HA one is not the guard's to start.
                ("gc.not_running", "02".to_owned(), "b".to_owned()),
            ]
        );
    }

    #[test]
    fn stale_reports_and_hosts_not_active_are_not_judged() {
        let hosts = [host("a", HostState::Active), host("f", HostState::Fenced)];
        let theirs = instance(1, "f", true, false, 600_000);
        let stale = report("a", Timestamp(NOW.0 - 91_000), &[&theirs]);
        let fresh_enough = report("a", Timestamp(NOW.0 - 89_000), &[&theirs]);
        let fenced = report("f", NOW, &[]);
        assert!(drift(&[stale], &hosts, std::slice::from_ref(&theirs), NOW, GRACE).is_empty(), "older than 3 × grace");
        assert_eq!(drift(&[fresh_enough], &hosts, std::slice::from_ref(&theirs), NOW, GRACE).len(), 1);
        assert!(drift(&[fenced], &hosts, &[theirs], NOW, GRACE).is_empty(), "a fenced host's report is not judged");
    }
}
