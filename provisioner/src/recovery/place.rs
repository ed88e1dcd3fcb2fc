//! Placement of a failed host's HA instances, as a pure function, by policy:
//!
//! - candidates are the hosts that are `active` and heartbeating (never the failed host);
//! - instances are placed in order of **priority** (highest first; ties by UUID), so when room
//!   is short the important ones get it;
//! - a host takes an instance only if it has **room** — its capacity (`host set --vcpus
//!   --memory`), if known, minus what its live instances use (each instance's size comes from
//!   its domain XML) — and runs no other member of the instance's **anti-affinity group**
//!   (members never share a host, during recovery too: when no host qualifies, the instance
//!   waits, and the reason is said, rather than break the rule);
//! - an instance whose **max_relocate** is spent is not moved again;
//! - an instance that **starts after** others (restart order) is moved only once each of them
//!   runs on its owner, as that owner's guard reported;
//! - among the hosts that qualify, **reserved** (standby) hosts first (Masakari's
//!   `reserved_host`), then the least loaded (fewest live instances), ties by name.
//!
//! Each placement counts toward the next, so a failed host's instances spread over the cell;
//! the same inputs decide the same (a resumed evacuation).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use nodekeeper_store::{Host, HostInventory, HostName, HostState, Instance, InstanceId, InstancePolicy, Timestamp};

/// What placement looks at besides the hosts and instances.
#[derive(Debug, Clone, Copy)]
pub struct Policies<'a> {
    /// Per instance.
    pub instances: &'a HashMap<InstanceId, InstancePolicy>,
    /// Per host.
    pub hosts: &'a HashMap<HostName, HostInventory>,
    /// The instances their owner's guard last reported running (at their current generation).
    pub running: &'a HashSet<InstanceId>,
}

/// The instances that run where the database says, by the guards' last reports: reported
/// running by their owner's guard at their current generation.
pub fn running(instances: &[Instance], reports: &[nodekeeper_store::GuardReport]) -> HashSet<InstanceId> {
    let by_id: HashMap<InstanceId, &Instance> = instances.iter().map(|i| (i.uuid, i)).collect();
    reports
        .iter()
        .flat_map(|r| r.domains.iter().map(move |d| (&r.host, d)))
        .filter(|(host, d)| {
            d.running
                && by_id
                    .get(&d.uuid)
                    .is_some_and(|i| &i.owner == *host && !i.deleted && d.generation == Some(i.generation))
        })
        .map(|(_, d)| d.uuid)
        .collect()
}

/// Why `p` must wait for its restart order, if it must.
pub fn waits_for_order(p: &InstancePolicy, running: &HashSet<InstanceId>) -> Option<String> {
    let missing: Vec<String> = p.after.iter().filter(|a| !running.contains(a)).map(ToString::to_string).collect();
    (!missing.is_empty())
        .then(|| format!("it starts after {}, which does not run yet (restart order)", missing.join(", ")))
}

#[derive(Debug, Default)]
struct Room {
    count: usize,
    vcpus: u64,
    memory_mib: u64,
    groups: HashSet<String>,
    reserved: bool,
    cap_vcpus: Option<u64>,
    cap_memory_mib: Option<u64>,
}

impl Room {
    fn fits(&self, p: &InstancePolicy) -> bool {
        self.cap_vcpus.is_none_or(|c| self.vcpus + u64::from(p.vcpus) <= c)
            && self.cap_memory_mib.is_none_or(|c| self.memory_mib + p.memory_mib <= c)
    }
    fn take(&mut self, p: &InstancePolicy) {
        self.count += 1;
        self.vcpus += u64::from(p.vcpus);
        self.memory_mib += p.memory_mib;
        self.groups.extend(p.anti_affinity.clone());
    }
}

/// Where each instance of `moving` goes (in `moving`'s order), or why it waits (it stays
/// with the failed host, fenced, and the evacuation reports it; the GC pass tries again).
pub fn place(
    failed: &HostName,
    moving: &[InstanceId],
    hosts: &[Host],
    instances: &[Instance],
    policies: Policies<'_>,
    now: Timestamp,
    grace: Duration,
) -> Vec<(InstanceId, Result<HostName, String>)> {
    Rooms::new(|h| h == failed, hosts, instances, policies, now, grace).place(moving, policies)
}

/// The room each candidate host has: built once from the fleet, then kept in step with each
/// placement — so the evacuations of many hosts in one pass each count what the ones before
/// took, without counting the fleet again.
pub struct Rooms {
    rooms: BTreeMap<HostName, Room>,
    /// Every candidate in the order placement prefers it — reserved first, then the least
    /// loaded, ties by name — kept in step with each placement: the host an instance gets is
    /// the first here it fits (one look, not a scan of the fleet, while the first fits).
    order: BTreeSet<(bool, usize, HostName)>,
}

impl Rooms {
    /// The candidates — `active`, heartbeating within `grace`, not `excluded` — and what their
    /// live instances take (a live-migrating one on its target too).
    pub fn new(
        excluded: impl Fn(&HostName) -> bool,
        hosts: &[Host],
        instances: &[Instance],
        policies: Policies<'_>,
        now: Timestamp,
        grace: Duration,
    ) -> Rooms {
        let fresh = |h: &Host| h.last_heartbeat.is_some_and(|t| now.since(t) <= grace);
        let none = InstancePolicy::default();
        let policy = |id: &InstanceId| policies.instances.get(id).unwrap_or(&none);
        let mut rooms: BTreeMap<HostName, Room> = hosts
            .iter()
            .filter(|h| h.state == HostState::Active && !excluded(&h.name) && fresh(h))
            .map(|h| {
                let inv = policies.hosts.get(&h.name).cloned().unwrap_or_default();
                let room = Room {
                    reserved: inv.reserved,
                    cap_vcpus: inv.vcpus.map(u64::from),
                    cap_memory_mib: inv.memory_mib,
                    ..Room::default()
                };
                (h.name.clone(), room)
            })
            .collect();
        for i in instances.iter().filter(|i| !i.deleted) {
            if let Some(room) = rooms.get_mut(&i.owner) {
                room.take(policy(&i.uuid));
            }
            // One being live-migrated takes room on its target too (it may run there already).
            if let Some(room) = i.migrating_to.as_ref().and_then(|t| rooms.get_mut(t)) {
                room.take(policy(&i.uuid));
            }
        }
        let order = rooms.iter().map(|(h, r)| (!r.reserved, r.count, h.clone())).collect();
        Rooms { rooms, order }
    }

    /// Where each instance of `moving` goes (in `moving`'s order), or why it waits; each
    /// placed takes its room.
    pub fn place(
        &mut self,
        moving: &[InstanceId],
        policies: Policies<'_>,
    ) -> Vec<(InstanceId, Result<HostName, String>)> {
        let none = InstancePolicy::default();
        let policy = |id: &InstanceId| policies.instances.get(id).unwrap_or(&none);
        let (rooms, preferred) = (&mut self.rooms, &mut self.order);
        let mut order: Vec<&InstanceId> = moving.iter().collect();
        order.sort_by_key(|id| (std::cmp::Reverse(policy(id).priority), id.uuid()));
        let mut decided: HashMap<InstanceId, Result<HostName, String>> = HashMap::with_capacity(moving.len());
        for id in order {
            let p = policy(id);
            let outcome = if let Some(max) = p.max_relocate.filter(|m| p.relocations >= *m) {
                Err(format!("its max_relocate ({max}) is spent: {} automatic recoveries already", p.relocations))
            } else if let Some(why) = waits_for_order(p, policies.running) {
                Err(why)
            } else {
                let group_ok = |r: &Room| p.anti_affinity.as_ref().is_none_or(|g| !r.groups.contains(g));
                // Reserved hosts first, then the least loaded, ties by name: the first that fits.
                let best = preferred.iter().find(|(_, _, h)| rooms.get(h).is_some_and(|r| r.fits(p) && group_ok(r)));
                match best.cloned() {
                    Some(key) => {
                        let h = key.2.clone();
                        if let Some(r) = rooms.get_mut(&h) {
                            preferred.remove(&key);
                            r.take(p);
                            preferred.insert((!r.reserved, r.count, h.clone()));
                        }
                        Ok(h)
                    }
                    None if rooms.is_empty() => Err("no active, heartbeating host to take it".into()),
                    None if !rooms.values().any(|r| r.fits(p)) => {
                        Err(format!("no host has room for it ({} vCPU, {} MiB)", p.vcpus, p.memory_mib))
                    }
                    None => Err(format!(
                        "every host with room already runs a member of its anti-affinity group {:?}: it waits rather \
                         than share a host",
                        p.anti_affinity.as_deref().unwrap_or_default()
                    )),
                }
            };
            decided.insert(*id, outcome);
        }
        moving.iter().map(|id| (*id, decided.remove(id).unwrap_or_else(|| Err("not decided".into())))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::testing::host;
    use nodekeeper_store::{Generation, Storage};

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
            held: false,
            migrating_to: None,
            migration_uri: None,
            migration_started_at: None,
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
        let (ip, hp) = (HashMap::new(), HashMap::new());
        let none = Policies { instances: &ip, hosts: &hp, running: &HashSet::new() };
        let placed = place(&n("a"), &moving, &hosts, &instances, none, NOW, GRACE);
        let targets: Vec<_> = placed.iter().map(|(_, h)| h.clone().expect("placed")).collect();
        // c has 0 live (its one is deleted), b has 2; placed in UUID order (equal priorities):
        // c, c, then a tie broken by name (b), then c — whichever instances those are.
        let mut by_order: Vec<(InstanceId, HostName)> =
            placed.iter().map(|(id, h)| (*id, h.clone().expect("placed"))).collect();
        by_order.sort_by_key(|(id, _)| id.uuid());
        let in_order: Vec<HostName> = by_order.into_iter().map(|(_, h)| h).collect();
        assert_eq!(in_order, vec![n("c"), n("c"), n("b"), n("c")]);
        assert!(!targets.contains(&n("a")), "never back onto the failed host");
        // The same inputs decide the same (a resumed evacuation).
        assert_eq!(placed, place(&n("a"), &moving, &hosts, &instances, none, NOW, GRACE));
    }

    #[test]
    fn with_no_healthy_host_nothing_is_placed() {
        let hosts = [host("a", HostState::Fenced, Some(0)), host("b", HostState::Active, Some(0))];
        let id = InstanceId::random();
        let (ip, hp) = (HashMap::new(), HashMap::new());
        let placed = place(
            &n("a"),
            &[id],
            &hosts,
            &[],
            Policies { instances: &ip, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        assert!(placed[0].1.as_ref().is_err_and(|e| e.contains("no active")), "{placed:?}");
    }

    fn sized(vcpus: u32, memory_mib: u64) -> InstancePolicy {
        InstancePolicy { vcpus, memory_mib, ..InstancePolicy::default() }
    }

    #[test]
    fn with_too_little_room_the_higher_priorities_run_and_the_rest_wait_saying_why() {
        let hosts = [host("a", HostState::Fenced, Some(0)), host("b", HostState::Active, Some(NOW.0))];
        // b has room for 8 vCPU; three 4-vCPU instances of priorities 1, 5, 3 need 12.
        let ids: Vec<InstanceId> = (0..3).map(|_| InstanceId::random()).collect();
        let prio = [1, 5, 3];
        let ip: HashMap<InstanceId, InstancePolicy> =
            ids.iter().zip(prio).map(|(id, priority)| (*id, InstancePolicy { priority, ..sized(4, 1024) })).collect();
        let hp: HashMap<HostName, HostInventory> =
            [(n("b"), HostInventory { vcpus: Some(8), memory_mib: Some(65_536), reserved: false })].into();
        let placed = place(
            &n("a"),
            &ids,
            &hosts,
            &[],
            Policies { instances: &ip, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        assert_eq!(placed[1].1, Ok(n("b")), "priority 5");
        assert_eq!(placed[2].1, Ok(n("b")), "priority 3");
        let why = placed[0].1.as_ref().expect_err("priority 1 waits");
        assert!(why.contains("no host has room") && why.contains("4 vCPU"), "{why}");
        // Memory counts too, and what b already runs.
        let running = Instance { uuid: InstanceId::random(), ..instance("b", false) };
        let mut ip2 = ip.clone();
        ip2.insert(running.uuid, sized(0, 65_000));
        let placed = place(
            &n("a"),
            &ids[1..2],
            &hosts,
            &[running],
            Policies { instances: &ip2, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        assert!(placed[0].1.is_err(), "b's memory is taken: {placed:?}");
    }

    #[test]
    fn anti_affinity_holds_during_recovery_and_reserved_hosts_come_first() {
        let hosts = [
            host("a", HostState::Fenced, Some(0)),
            host("b", HostState::Active, Some(NOW.0)),
            host("c", HostState::Active, Some(NOW.0)),
            host("s", HostState::Active, Some(NOW.0)),
        ];
        let group = |g: &str| InstancePolicy { anti_affinity: Some(g.into()), ..InstancePolicy::default() };
        // b runs db-1; a ran db-2 and db-3 (the same group) and web-1.
        let db1 = Instance { uuid: InstanceId::random(), ..instance("b", false) };
        let moving: Vec<InstanceId> = (0..3).map(|_| InstanceId::random()).collect();
        let mut ip: HashMap<InstanceId, InstancePolicy> =
            [(db1.uuid, group("db")), (moving[0], group("db")), (moving[1], group("db"))].into();
        ip.insert(moving[2], InstancePolicy::default());
        // s is a reserved (standby) host.
        let hp: HashMap<HostName, HostInventory> =
            [(n("s"), HostInventory { reserved: true, ..HostInventory::default() })].into();
        let placed = place(
            &n("a"),
            &moving,
            &hosts,
            std::slice::from_ref(&db1),
            Policies { instances: &ip, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        let to = |i: usize| placed[i].1.clone().expect("placed");
        // The db members: never b (db-1 is there), never together; the standby first.
        assert!(to(0) != n("b") && to(1) != n("b") && to(0) != to(1), "{placed:?}");
        assert!(to(0) == n("s") || to(1) == n("s"), "the reserved host takes one first: {placed:?}");
        // With s gone, only c is left for two db members: one waits, saying why.
        let fewer = &hosts[..3];
        let placed = place(
            &n("a"),
            &moving[..2],
            fewer,
            &[db1],
            Policies { instances: &ip, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        let ok: Vec<_> = placed.iter().filter_map(|(_, r)| r.clone().ok()).collect();
        assert_eq!(ok, [n("c")], "{placed:?}");
        let why = placed.iter().find_map(|(_, r)| r.clone().err()).expect("one waits");
        assert!(why.contains("anti-affinity group \"db\""), "{why}");
    }

    #[test]
    fn an_instance_waits_for_what_it_starts_after_to_run() {
        let hosts = [host("a", HostState::Fenced, Some(0)), host("b", HostState::Active, Some(NOW.0))];
        let (db, web) = (Instance { uuid: InstanceId::random(), ..instance("a", false) }, InstanceId::random());
        let ip: HashMap<InstanceId, InstancePolicy> =
            [(web, InstancePolicy { after: vec![db.uuid], ..InstancePolicy::default() })].into();
        let hp = HashMap::new();
        let not_yet = HashSet::new();
        let placed = place(
            &n("a"),
            &[db.uuid, web],
            &hosts,
            &[],
            Policies { instances: &ip, hosts: &hp, running: &not_yet },
            NOW,
            GRACE,
        );
        assert_eq!(placed[0].1, Ok(n("b")), "db first");
        assert!(placed[1].1.as_ref().is_err_and(|e| e.contains("restart order")), "{placed:?}");
        // db runs on b now (its guard reported it at its new generation): web goes.
        let moved = Instance { owner: n("b"), generation: nodekeeper_store::Generation(2), ..db.clone() };
        let report = nodekeeper_store::GuardReport {
            host: n("b"),
            at: NOW,
            domains: vec![nodekeeper_store::ReportedDomain {
                uuid: db.uuid,
                running: true,
                generation: Some(nodekeeper_store::Generation(2)),
                migration_failed: None,
            }],
        };
        let run = running(std::slice::from_ref(&moved), std::slice::from_ref(&report));
        assert!(run.contains(&db.uuid));
        let placed = place(
            &n("a"),
            &[web],
            &hosts,
            std::slice::from_ref(&moved),
            Policies { instances: &ip, hosts: &hp, running: &run },
            NOW,
            GRACE,
        );
        assert_eq!(placed[0].1, Ok(n("b")));
        // A report of an older generation, or from another host, proves nothing.
        let stale = nodekeeper_store::GuardReport { host: n("a"), ..report };
        assert!(running(&[moved], &[stale]).is_empty());
    }

    #[test]
    fn a_spent_relocation_budget_keeps_an_instance_where_it_is() {
        let hosts = [host("a", HostState::Fenced, Some(0)), host("b", HostState::Active, Some(NOW.0))];
        let id = InstanceId::random();
        let spent = InstancePolicy { max_relocate: Some(2), relocations: 2, ..InstancePolicy::default() };
        let ip: HashMap<InstanceId, InstancePolicy> = [(id, spent.clone())].into();
        let hp = HashMap::new();
        let placed = place(
            &n("a"),
            &[id],
            &hosts,
            &[],
            Policies { instances: &ip, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        assert!(placed[0].1.as_ref().is_err_and(|e| e.contains("max_relocate (2) is spent")), "{placed:?}");
        let left: HashMap<InstanceId, InstancePolicy> = [(id, InstancePolicy { relocations: 1, ..spent })].into();
        let placed = place(
            &n("a"),
            &[id],
            &hosts,
            &[],
            Policies { instances: &left, hosts: &hp, running: &HashSet::new() },
            NOW,
            GRACE,
        );
        assert_eq!(placed[0].1, Ok(n("b")));
    }

    /// The preferred order kept beside the rooms places exactly as a scan of every room for
    /// the least loaded that fits would (the order before it), over random fleets: capacities,
    /// reserved hosts, anti-affinity groups, sizes, some that fit nowhere.
    #[test]
    fn the_kept_order_places_as_a_scan_of_every_room_would() {
        fn scan(rooms: &mut BTreeMap<HostName, Room>, p: &InstancePolicy) -> Option<HostName> {
            let group_ok = |r: &Room| p.anti_affinity.as_ref().is_none_or(|g| !r.groups.contains(g));
            let best = rooms
                .iter()
                .filter(|(_, r)| r.fits(p) && group_ok(r))
                .min_by_key(|(_, r)| (!r.reserved, r.count))
                .map(|(h, _)| h.clone())?;
            if let Some(r) = rooms.get_mut(&best) {
                r.take(p);
            }
            Some(best)
        }
        let mut next = crate::recovery::draws(0x9e37_79b9_7f4a_7c15_u64);
        for round in 0..40 {
            let hosts: Vec<Host> =
                (0..(5 + next(40))).map(|i| host(&format!("h{i:03}"), HostState::Active, Some(NOW.0))).collect();
            let mut hp = HashMap::new();
            for h in &hosts {
                let inv = HostInventory {
                    vcpus: (next(3) > 0).then(|| 2 + next(14) as u32),
                    memory_mib: (next(3) > 0).then(|| 1024 * (1 + next(16))),
                    reserved: next(6) == 0,
                };
                hp.insert(h.name.clone(), inv);
            }
            let mut instances = Vec::new();
            let mut ip = HashMap::new();
            for _ in 0..next(60) {
                let owner = hosts[next(hosts.len() as u64) as usize].name.to_string();
                let i = instance(&owner, false);
                ip.insert(
                    i.uuid,
                    InstancePolicy { vcpus: 1 + next(4) as u32, memory_mib: 512 * (1 + next(4)), ..Default::default() },
                );
                instances.push(i);
            }
            let moving: Vec<InstanceId> = (0..(1 + next(80))).map(|_| InstanceId::random()).collect();
            for id in &moving {
                let p = InstancePolicy {
                    priority: next(3) as i64,
                    anti_affinity: (next(3) == 0).then(|| format!("g{}", next(3))),
                    vcpus: 1 + next(6) as u32,
                    memory_mib: 512 * (1 + next(8)),
                    ..Default::default()
                };
                ip.insert(*id, p);
            }
            let running = HashSet::new();
            let policies = Policies { instances: &ip, hosts: &hp, running: &running };
            let excluded = |_: &HostName| false;
            let placed = Rooms::new(excluded, &hosts, &instances, policies, NOW, GRACE).place(&moving, policies);
            let mut reference = Rooms::new(excluded, &hosts, &instances, policies, NOW, GRACE).rooms;
            let mut order: Vec<&InstanceId> = moving.iter().collect();
            order.sort_by_key(|id| (std::cmp::Reverse(ip[*id].priority), id.uuid()));
            let expected: HashMap<InstanceId, Option<HostName>> =
                order.into_iter().map(|id| (*id, scan(&mut reference, &ip[id]))).collect();
            for (id, got) in &placed {
                assert_eq!(got.as_ref().ok(), expected[id].as_ref(), "round {round}: instance {id}");
            }
        }
    }
}
