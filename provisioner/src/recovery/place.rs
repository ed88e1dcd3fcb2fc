//! Placement of a failed host's HA instances, as a pure function: among hosts that are
//! `active` and heartbeating (never the failed host), the one with the most free room —
//! fewest live instances, as the database knows no sizes yet — ties broken by name, so a
//! resumed evacuation decides the same. Each placement counts toward the next, so a
//! failed host's instances spread over the cell instead of piling onto one host.

use std::collections::BTreeMap;
use std::time::Duration;

use nodekeeper_store::{Host, HostName, HostState, Instance, InstanceId, Timestamp};

/// Where each instance goes; `None` when no host can take it (it stays with the failed host,
/// fenced, and the evacuation reports it).
pub fn place(
    failed: &HostName,
    moving: &[InstanceId],
    hosts: &[Host],
    instances: &[Instance],
    now: Timestamp,
    grace: Duration,
) -> Vec<(InstanceId, Option<HostName>)> {
    let fresh = |h: &Host| h.last_heartbeat.is_some_and(|t| now.since(t) <= grace);
    let mut load: BTreeMap<HostName, usize> = hosts
        .iter()
        .filter(|h| h.state == HostState::Active && &h.name != failed && fresh(h))
        .map(|h| (h.name.clone(), 0))
        .collect();
    for i in instances.iter().filter(|i| !i.deleted) {
        if let Some(n) = load.get_mut(&i.owner) {
            *n += 1;
        }
    }
    moving
        .iter()
        .map(|id| {
            // BTreeMap iterates by name: the first minimum is the tie-break.
            let best = load.iter().min_by_key(|(_, n)| **n).map(|(h, _)| h.clone());
            if let Some(h) = &best {
                *load.entry(h.clone()).or_default() += 1;
            }
            (*id, best)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::{Generation, Storage};

    fn host(name: &str, state: HostState, heartbeat: Option<i64>) -> Host {
        Host {
            name: name.parse().expect("name"),
            mac: None,
            ip: None,
            bmc_url: None,
            bmc_credentials: None,
            state,
            last_heartbeat: heartbeat.map(Timestamp),
            image: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    fn instance(owner: &str, deleted: bool) -> Instance {
        Instance {
            uuid: InstanceId::random(),
            name: "vm".into(),
            owner: owner.parse().expect("owner"),
            generation: Generation(1),
            ha: true,
            storage: Storage::Shared,
            deleted,
            has_domain_xml: true,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    const NOW: Timestamp = Timestamp(100_000);
    const GRACE: Duration = Duration::from_secs(30);

    fn n(s: &str) -> HostName {
        s.parse().expect("name")
    }

    #[test]
    fn instances_spread_over_the_least_loaded_healthy_hosts() {
        let hosts = [
            host("a", HostState::Fenced, Some(0)),
            host("b", HostState::Active, Some(NOW.0)),
            host("c", HostState::Active, Some(NOW.0)),
            host("d", HostState::Active, Some(NOW.0 - 31_000)), // silent: not a candidate
            host("e", HostState::Maintenance, Some(NOW.0)),
            host("f", HostState::Suspect, Some(NOW.0)),
        ];
        let mut instances = vec![instance("b", false), instance("b", false), instance("c", true)];
        let moving: Vec<InstanceId> = (0..4).map(|_| InstanceId::random()).collect();
        instances.extend(moving.iter().map(|id| Instance { uuid: *id, ..instance("a", false) }));
        let placed = place(&n("a"), &moving, &hosts, &instances, NOW, GRACE);
        let targets: Vec<_> = placed.iter().map(|(_, h)| h.clone().expect("placed")).collect();
        // c has 0 live (its one is deleted), b has 2: c, c; then a tie, broken by name (b); then c.
        assert_eq!(targets, vec![n("c"), n("c"), n("b"), n("c")]);
        assert!(!targets.contains(&n("a")), "never back onto the failed host");
        // The same inputs decide the same (a resumed evacuation).
        assert_eq!(placed, place(&n("a"), &moving, &hosts, &instances, NOW, GRACE));
    }

    #[test]
    fn with_no_healthy_host_nothing_is_placed() {
        let hosts = [host("a", HostState::Fenced, Some(0)), host("b", HostState::Active, Some(0))];
        let id = InstanceId::random();
        assert_eq!(place(&n("a"), &[id], &hosts, &[], NOW, GRACE), vec![(id, None)]);
    }
}
