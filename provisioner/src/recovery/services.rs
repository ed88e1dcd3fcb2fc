//! Services with n active copies: where each copy runs, as a pure function of the services,
//! their copies and the hosts ([`plan`]), applied by the controller each tick under its lease
//! ([`reconcile`]); the guards start what is assigned to their host and stop what is not.
//!
//! - A host may run a copy of a service when it is `active`, heard within the grace, carries
//!   every label the service asks for, and is not being drained.
//! - Copies spread: never two copies of one service on one host.
//! - A missing copy (a new service, more copies asked for) goes to the eligible host with the
//!   fewest copies of any service (ties by name); copies past the count are dropped.
//! - A copy whose host can no longer run it moves to such a host. For an **exclusive** service
//!   only once its host is `fenced` (confirmed off, as an HA instance; not one its fence's way
//!   back powered on again, until it is fenced again): until then the copy may still run
//!   there, and never more than n copies run. Otherwise as soon as the host is not
//!   eligible (silent, suspect, fenced, in maintenance, without the labels).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use nodekeeper_store::{CopyChange, Host, HostName, HostState, Service, ServiceCopy, Store, StoreError, Timestamp};

/// The actor of the controller's changes.
pub const ACTOR: &str = "controller";

/// What the controller should change now.
pub fn plan(
    services: &[Service],
    copies: &[ServiceCopy],
    hosts: &[Host],
    labels: &BTreeMap<HostName, BTreeSet<String>>,
    cordoned: &HashSet<HostName>,
    now: Timestamp,
    grace: Duration,
) -> Vec<CopyChange> {
    let none = BTreeSet::new();
    let by_name: BTreeMap<&HostName, &Host> = hosts.iter().map(|h| (&h.name, h)).collect();
    let eligible = |h: &Host, s: &Service| {
        h.state == HostState::Active
            && h.last_heartbeat.is_some_and(|t| now.since(t) <= grace)
            && !cordoned.contains(&h.name)
            && s.labels.iter().all(|l| labels.get(&h.name).unwrap_or(&none).contains(l))
    };
    // Copies of any service per host: the load placement evens out.
    let mut load: BTreeMap<HostName, usize> = BTreeMap::new();
    for c in copies {
        *load.entry(c.host.clone()).or_default() += 1;
    }
    let mut changes = Vec::new();
    for s in services {
        let mine: BTreeMap<u32, &ServiceCopy> =
            copies.iter().filter(|c| c.service == s.name).map(|c| (c.slot, c)).collect();
        for (slot, c) in mine.range(s.copies..) {
            changes.push(CopyChange::Drop { service: s.name.clone(), slot: *slot });
            if let Some(n) = load.get_mut(&c.host) {
                *n = n.saturating_sub(1);
            }
        }
        let mut used: HashSet<HostName> = mine.range(..s.copies).map(|(_, c)| c.host.clone()).collect();
        for slot in 0..s.copies {
            let current = mine.get(&slot);
            let leave = match current {
                None => None,
                Some(c) => match by_name.get(&c.host) {
                    Some(h) if eligible(h, s) => continue,
                    Some(h) if s.exclusive && h.state != HostState::Fenced => continue,
                    Some(h) => Some((c, format!("{} is {}", h.name, why_not(h, s, labels, cordoned, now, grace)))),
                    None => Some((c, format!("{} is gone", c.host))),
                },
            };
            let best = hosts
                .iter()
                .filter(|h| eligible(h, s) && !used.contains(&h.name))
                .min_by_key(|h| (load.get(&h.name).copied().unwrap_or(0), h.name.clone()))
                .map(|h| h.name.clone());
            let Some(to) = best else { continue };
            used.insert(to.clone());
            *load.entry(to.clone()).or_default() += 1;
            changes.push(match leave {
                None => CopyChange::Place { service: s.name.clone(), slot, host: to },
                Some((c, why)) => CopyChange::Move {
                    service: s.name.clone(),
                    slot,
                    generation: c.generation,
                    from: c.host.clone(),
                    to,
                    why,
                },
            });
        }
    }
    changes
}

/// Why `h` may not run `s`, in words.
fn why_not(
    h: &Host,
    s: &Service,
    labels: &BTreeMap<HostName, BTreeSet<String>>,
    cordoned: &HashSet<HostName>,
    now: Timestamp,
    grace: Duration,
) -> String {
    if h.state != HostState::Active {
        return h.state.to_string();
    }
    if h.last_heartbeat.is_none_or(|t| now.since(t) > grace) {
        return "silent".into();
    }
    if cordoned.contains(&h.name) {
        return "being drained".into();
    }
    let have = labels.get(&h.name);
    let missing: Vec<&str> =
        s.labels.iter().filter(|l| !have.is_some_and(|set| set.contains(*l))).map(String::as_str).collect();
    format!("without the label(s) {}", missing.join(", "))
}

/// One pass: reads the services, their copies, the hosts (as they are after this tick's
/// fences), their labels and drains, and applies [`plan`]'s changes (each a compare-and-set
/// with its event). Returns how many applied.
pub async fn reconcile(store: &Store, now: Timestamp, grace: Duration) -> Result<usize, StoreError> {
    let services = store.services().await?;
    let copies = store.service_copies(None).await?;
    if services.is_empty() && copies.is_empty() {
        return Ok(0);
    }
    let mut hosts = store.hosts().await?;
    // A fenced host powered on again may run its exclusive copy: as a suspect one, it keeps
    // it until it is fenced again (or heard: active). Asked only of the fenced hosts that hold
    // such a copy (one query each; a rack's fences would otherwise cost one per host a tick).
    let exclusive: HashSet<&str> = services.iter().filter(|s| s.exclusive).map(|s| s.name.as_str()).collect();
    let holding: HashSet<&HostName> =
        copies.iter().filter(|c| exclusive.contains(c.service.as_str())).map(|c| &c.host).collect();
    let asked: Vec<&Host> = hosts.iter().filter(|h| holding.contains(&h.name)).collect();
    let on = super::powered_on_again(store, &asked).await?;
    for h in hosts.iter_mut().filter(|h| on.contains_key(&h.name)) {
        h.state = HostState::Suspect;
    }
    let labels = store.host_labels().await?;
    let cordoned = super::drain::draining(store).await?;
    let mut applied = 0;
    for change in plan(&services, &copies, &hosts, &labels, &cordoned, now, grace) {
        if store.change_service_copy(&change, ACTOR).await? {
            applied += 1;
        }
    }
    // Copies of services removed meanwhile are gone with them (`remove_service`).
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::testing::host;

    const NOW: Timestamp = Timestamp(1_000_000);
    const GRACE: Duration = Duration::from_secs(30);

    fn service(name: &str, copies: u32, labels: &[&str], exclusive: bool) -> Service {
        Service {
            name: name.into(),
            copies,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            start: vec!["start".into()],
            stop: vec!["stop".into()],
            check: None,
            exclusive,
        }
    }

    fn copy(service: &str, slot: u32, on: &str) -> ServiceCopy {
        ServiceCopy {
            service: service.into(),
            slot,
            host: on.parse().expect("host"),
            generation: 1,
            since: Timestamp(0),
        }
    }

    fn hosts(states: &[(&str, HostState)]) -> Vec<Host> {
        states.iter().map(|(n, s)| host(n, *s, Some(NOW.0 - 1_000))).collect()
    }

    fn labelled(pairs: &[(&str, &[&str])]) -> BTreeMap<HostName, BTreeSet<String>> {
        pairs.iter().map(|(h, ls)| (h.parse().expect("host"), ls.iter().map(|l| (*l).to_owned()).collect())).collect()
    }

    fn run(s: &[Service], c: &[ServiceCopy], h: &[Host], l: &BTreeMap<HostName, BTreeSet<String>>) -> Vec<CopyChange> {
        plan(s, c, h, l, &HashSet::new(), NOW, GRACE)
    }

    #[test]
    fn copies_spread_over_labelled_hosts_and_the_least_loaded_first() {
        use HostState::Active as A;
        let h = hosts(&[("a", A), ("b", A), ("c", A), ("d", A)]);
        let l = labelled(&[("a", &["api"]), ("b", &["api"]), ("c", &["api", "db"])]);
        // c already runs a copy of something else: a and b first.
        let other = [copy("other", 0, "c")];
        let changes = run(&[service("api", 2, &["api"], false), service("other", 1, &[], false)], &other, &h, &l);
        let placed: Vec<(u32, String)> = changes
            .iter()
            .filter_map(|c| match c {
                CopyChange::Place { service, slot, host } if service == "api" => Some((*slot, host.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(placed, [(0, "a".to_owned()), (1, "b".to_owned())]);
        // Three copies asked, three labelled hosts: one each; a fourth has nowhere to go.
        let changes = run(&[service("api", 4, &["api"], false)], &[], &h, &l);
        let on: BTreeSet<String> = changes
            .iter()
            .filter_map(|c| if let CopyChange::Place { host, .. } = c { Some(host.to_string()) } else { None })
            .collect();
        assert_eq!(on, ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(changes.len(), 3, "never two copies on one host: {changes:?}");
    }

    #[test]
    fn a_copy_leaves_a_failed_host_and_an_exclusive_one_only_once_it_is_fenced() {
        use HostState::{Active as A, Fenced as F, Suspect as S};
        let l = BTreeMap::new();
        for (state, exclusive, moves) in [(S, false, true), (S, true, false), (F, true, true), (F, false, true)] {
            let h = hosts(&[("a", state), ("b", A)]);
            let changes = run(&[service("sched", 1, &[], exclusive)], &[copy("sched", 0, "a")], &h, &l);
            let moved =
                matches!(changes.as_slice(), [CopyChange::Move { to, generation: 1, .. }] if to.as_str() == "b");
            assert_eq!(moved, moves, "{state} exclusive={exclusive}: {changes:?}");
        }
        // A silent active host counts as failed for a non-exclusive service.
        let mut h = hosts(&[("a", A), ("b", A)]);
        h[0].last_heartbeat = Some(Timestamp(NOW.0 - 31_000));
        let changes = run(&[service("sched", 1, &[], false)], &[copy("sched", 0, "a")], &h, &l);
        assert!(matches!(changes.as_slice(), [CopyChange::Move { why, .. }] if why.contains("silent")), "{changes:?}");
    }

    #[test]
    fn slots_past_the_count_are_dropped_and_a_drained_host_takes_none() {
        use HostState::Active as A;
        let h = hosts(&[("a", A), ("b", A), ("c", A)]);
        let have = [copy("api", 0, "a"), copy("api", 1, "b"), copy("api", 2, "c")];
        let changes = run(&[service("api", 1, &[], false)], &have, &h, &BTreeMap::new());
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| matches!(c, CopyChange::Drop { slot, .. } if *slot > 0)), "{changes:?}");
        let cordoned: HashSet<HostName> = ["a".parse().expect("a")].into();
        let changes = plan(&[service("api", 1, &[], false)], &[], &h, &BTreeMap::new(), &cordoned, NOW, GRACE);
        assert!(matches!(changes.as_slice(), [CopyChange::Place { host, .. }] if host.as_str() == "b"), "{changes:?}");
    }

    #[test]
    fn a_healthy_assignment_changes_nothing() {
        use HostState::Active as A;
        let h = hosts(&[("a", A), ("b", A)]);
        let have = [copy("api", 0, "a"), copy("api", 1, "b")];
        assert!(run(&[service("api", 2, &[], true)], &have, &h, &BTreeMap::new()).is_empty());
    }
}
