//! The boot decision, as a pure function of what is on disk, what the database said, the
//! local cache and the policy. No I/O here: [`decide`] returns a [`Plan`] that the executor
//! carries out.
//!
//! Rules (contract: "Guard boot" in DESIGN.md):
//! - owned by this host, generation not behind the database → **keep**;
//! - owned by another host, deleted, or generation behind → **stale** (quarantine);
//! - not in the database → **unknown** (left alone);
//! - database unreachable, or this host unknown to it → nothing quarantined; autostart links
//!   blocked per `on_db_unreachable`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use nodekeeper_store::{Generation, HostName, InstanceId, Ownership};
use serde::{Deserialize, Serialize};

use super::scan::{FileError, LocalDomain, Scan};
use crate::config::OnDbUnreachable;

/// What the database answered.
#[derive(Debug, Clone)]
pub enum DbAnswer {
    /// It answered: whether it knows this host, and the ownership of every local UUID it knows.
    Reached {
        /// This host is in the host table.
        host_known: bool,
        /// Ownership by UUID (UUIDs it does not know are absent).
        ownership: HashMap<InstanceId, Ownership>,
    },
    /// It did not answer within `db_wait`.
    Unreachable,
}

/// What the last successful run learned, kept in `state_dir` for runs without a database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    /// The host it was written for.
    pub host: Option<HostName>,
    /// HA flag and generation of each instance the database assigned to this host.
    pub instances: BTreeMap<InstanceId, CachedInstance>,
}

/// One instance in the [`Cache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedInstance {
    /// Recovered elsewhere on failure.
    pub ha: bool,
    /// The generation the database had.
    pub generation: Generation,
}

/// Why a definition is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StaleReason {
    /// Another host owns it now.
    OwnedBy {
        /// The owner.
        owner: HostName,
        /// Its generation in the database.
        generation: Generation,
    },
    /// It was deleted (tombstoned).
    Deleted,
    /// This host still owns it, but the local copy is older than the database's.
    Behind {
        /// The generation in the local XML.
        local: Generation,
        /// The generation in the database.
        database: Generation,
    },
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleReason::OwnedBy { owner, generation } => write!(f, "owned by {owner} (generation {generation})"),
            StaleReason::Deleted => f.write_str("deleted"),
            StaleReason::Behind { local, database } => {
                write!(f, "local generation {local} is behind the database's {database}")
            }
        }
    }
}

/// One change to make on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Move a stale definition into `quarantine/` and remove its autostart link.
    Quarantine {
        /// The instance.
        uuid: InstanceId,
        /// `config_dir/NAME.xml`
        path: PathBuf,
        /// Its autostart link, if any.
        autostart: Option<PathBuf>,
        /// Why.
        reason: StaleReason,
    },
    /// Move an autostart link into `blocked/` so libvirtd will not start the domain.
    Block {
        /// The instance.
        uuid: InstanceId,
        /// `config_dir/autostart/NAME.xml`
        link: PathBuf,
    },
    /// Move a blocked link back into `config_dir/autostart/`: the database confirmed the
    /// domain is this host's (or does not know it, and it was only blocked for lack of an answer).
    Restore {
        /// The instance.
        uuid: InstanceId,
        /// `state_dir/blocked/NAME.xml`
        blocked: PathBuf,
    },
    /// A blocked link whose domain is stale or gone: move it into `quarantine/` (kept, inert).
    Retire {
        /// The instance, when its definition is still known.
        uuid: Option<InstanceId>,
        /// `state_dir/blocked/NAME.xml`
        blocked: PathBuf,
    },
}

/// The outcome of [`decide`]: the actions, and the parts of the report that need no I/O.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Changes to make, in order.
    pub actions: Vec<Action>,
    /// Definitions kept.
    pub kept: Vec<InstanceId>,
    /// Definitions the database does not know.
    pub unknown: Vec<InstanceId>,
    /// Domains whose autostart stays blocked (already blocked, nothing to do).
    pub still_blocked: Vec<InstanceId>,
    /// Problems with local files (and duplicate UUIDs).
    pub errors: Vec<FileError>,
    /// The cache to write after a run that reached the database (`None` otherwise).
    pub cache: Option<Cache>,
}

/// Decides what to do. Pure and total: every input yields a plan.
pub fn decide(me: &HostName, scan: &Scan, db: &DbAnswer, cache: &Cache, policy: OnDbUnreachable) -> Plan {
    let mut plan = Plan { errors: scan.errors.clone(), ..Plan::default() };

    // Group copies by UUID: two files with one UUID are judged together, and reported.
    let mut by_uuid: BTreeMap<InstanceId, Vec<&LocalDomain>> = BTreeMap::new();
    for d in &scan.domains {
        by_uuid.entry(d.meta.uuid).or_default().push(d);
    }
    for copies in by_uuid.values().filter(|c| c.len() > 1) {
        for dup in &copies[1..] {
            plan.errors.push(FileError {
                path: dup.path.clone(),
                reason: format!("duplicate UUID {}: also defined in {}", dup.meta.uuid, copies[0].path.display()),
            });
        }
    }
    let domain_of_blocked: HashMap<&str, &LocalDomain> =
        scan.domains.iter().map(|d| (d.file_name.as_str(), d)).collect();

    match db {
        DbAnswer::Reached { host_known: true, ownership } => {
            let mut new_cache = Cache { host: Some(me.clone()), instances: BTreeMap::new() };
            let mut stale: HashMap<InstanceId, bool> = HashMap::new();
            for (uuid, copies) in &by_uuid {
                let Some(owner) = ownership.get(uuid) else {
                    plan.unknown.push(*uuid);
                    continue;
                };
                // Judged on the oldest copy: if any copy is behind, all go.
                let oldest = copies.iter().filter_map(|c| c.meta.generation).min();
                let reason = judge(me, oldest, owner);
                stale.insert(*uuid, reason.is_some());
                match reason {
                    None => {
                        plan.kept.push(*uuid);
                        new_cache
                            .instances
                            .insert(*uuid, CachedInstance { ha: owner.ha, generation: owner.generation });
                    }
                    Some(reason) => {
                        for copy in copies {
                            plan.actions.push(Action::Quarantine {
                                uuid: *uuid,
                                path: copy.path.clone(),
                                autostart: copy.autostart.clone(),
                                reason: reason.clone(),
                            });
                        }
                    }
                }
            }
            for b in &scan.blocked {
                let action = match domain_of_blocked.get(b.file_name.as_str()) {
                    // Kept or unknown: give the link back. If the autostart link reappeared
                    // meanwhile, the executor only removes the blocked copy.
                    Some(d) if !stale.get(&d.meta.uuid).copied().unwrap_or(false) => {
                        Action::Restore { uuid: d.meta.uuid, blocked: b.path.clone() }
                    }
                    Some(d) => Action::Retire { uuid: Some(d.meta.uuid), blocked: b.path.clone() },
                    None => Action::Retire { uuid: None, blocked: b.path.clone() },
                };
                plan.actions.push(action);
            }
            plan.cache = Some(new_cache);
        }
        DbAnswer::Reached { host_known: false, .. } | DbAnswer::Unreachable => {
            for d in &scan.domains {
                let Some(link) = &d.autostart else { continue };
                if must_block(d, cache, policy) {
                    plan.actions.push(Action::Block { uuid: d.meta.uuid, link: link.clone() });
                }
            }
            // Links already moved aside stay there until a run that reaches the database.
            for b in &scan.blocked {
                if let Some(d) = domain_of_blocked.get(b.file_name.as_str()) {
                    if d.autostart.is_none() || !must_block(d, cache, policy) {
                        plan.still_blocked.push(d.meta.uuid);
                    }
                }
            }
        }
    }
    plan
}

/// The one rule for a local copy of an instance, shared by the file pass and the libvirt
/// pass: `None` means keep. `local` is the generation the copy records (none: judged by its
/// owner alone).
pub fn judge(me: &HostName, local: Option<Generation>, db: &Ownership) -> Option<StaleReason> {
    if db.deleted {
        return Some(StaleReason::Deleted);
    }
    // An instance being live-migrated here is arriving, not stale (its owner changes once
    // the controller sees it run here and no longer there).
    if &db.owner != me && db.migrating_to.as_ref() != Some(me) {
        return Some(StaleReason::OwnedBy { owner: db.owner.clone(), generation: db.generation });
    }
    if &db.owner != me {
        return None;
    }
    let local = local?;
    (local < db.generation).then_some(StaleReason::Behind { local, database: db.generation })
}

/// Whether policy blocks this domain's autostart. Its HA flag comes from its metadata, else
/// the cache; a domain of which neither says anything counts as HA (the safe side).
fn must_block(d: &LocalDomain, cache: &Cache, policy: OnDbUnreachable) -> bool {
    match policy {
        OnDbUnreachable::Allow => false,
        OnDbUnreachable::BlockAll => true,
        OnDbUnreachable::BlockHa => {
            d.meta.ha.or_else(|| cache.instances.get(&d.meta.uuid).map(|c| c.ha)).unwrap_or(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::scan::BlockedLink;
    use crate::domain::DomainMeta;

    const ME: &str = "node-a";

    fn me() -> HostName {
        ME.parse().expect("host")
    }

    fn id(n: u8) -> InstanceId {
        format!("00000000-0000-4000-8000-0000000000{n:02x}").parse().expect("uuid")
    }

    /// A local definition `vm-N.xml` with optional metadata generation/HA and autostart link.
    fn local(n: u8, generation: Option<u64>, ha: Option<bool>, autostart: bool) -> LocalDomain {
        let file_name = format!("vm-{n}.xml");
        LocalDomain {
            path: PathBuf::from(format!("/etc/libvirt/qemu/{file_name}")),
            autostart: autostart.then(|| PathBuf::from(format!("/etc/libvirt/qemu/autostart/{file_name}"))),
            file_name,
            meta: DomainMeta { uuid: id(n), name: format!("vm-{n}"), generation: generation.map(Generation), ha },
        }
    }

    fn owned(n: u8, owner: &str, generation: u64, deleted: bool) -> (InstanceId, Ownership) {
        let o = Ownership {
            uuid: id(n),
            owner: owner.parse().expect("owner"),
            generation: Generation(generation),
            deleted,
            ha: true,
            migrating_to: None,
        };
        (id(n), o)
    }

    fn reached(rows: &[(InstanceId, Ownership)]) -> DbAnswer {
        DbAnswer::Reached { host_known: true, ownership: rows.iter().cloned().collect() }
    }

    fn scan_of(domains: Vec<LocalDomain>) -> Scan {
        Scan { domains, ..Scan::default() }
    }

    fn quarantined(plan: &Plan) -> Vec<(InstanceId, StaleReason)> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::Quarantine { uuid, reason, .. } => Some((*uuid, reason.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_contract_rows_with_the_database() {
        let b = |g| StaleReason::OwnedBy { owner: "node-b".parse().expect("host"), generation: Generation(g) };
        // (local generation, db owner, db generation, deleted) -> expected
        #[allow(clippy::type_complexity)]
        let rows: Vec<(Option<u64>, &str, u64, bool, Option<StaleReason>)> = vec![
            (Some(3), ME, 3, false, None), // mine, equal
            (Some(4), ME, 3, false, None), // mine, ahead: not behind
            (Some(2), ME, 3, false, Some(StaleReason::Behind { local: Generation(2), database: Generation(3) })),
            (None, ME, 7, false, None),                         // no metadata: owner alone
            (Some(3), "node-b", 4, false, Some(b(4))),          // moved away
            (None, "node-b", 2, false, Some(b(2))),             // moved away, no metadata
            (Some(9), "node-b", 4, false, Some(b(4))),          // ahead but not mine
            (Some(3), ME, 3, true, Some(StaleReason::Deleted)), // tombstoned
            (Some(3), "node-b", 4, true, Some(StaleReason::Deleted)), // tombstoned elsewhere
        ];
        for (i, (local_gen, owner, db_gen, deleted, want)) in rows.into_iter().enumerate() {
            let scan = scan_of(vec![local(1, local_gen, Some(true), true)]);
            let plan = decide(
                &me(),
                &scan,
                &reached(&[owned(1, owner, db_gen, deleted)]),
                &Cache::default(),
                OnDbUnreachable::BlockHa,
            );
            match want {
                None => {
                    assert_eq!(plan.kept, vec![id(1)], "row {i}");
                    assert!(plan.actions.is_empty(), "row {i}: {:?}", plan.actions);
                }
                Some(reason) => {
                    assert!(plan.kept.is_empty(), "row {i}");
                    assert_eq!(quarantined(&plan), vec![(id(1), reason)], "row {i}");
                    let Action::Quarantine { autostart, .. } = &plan.actions[0] else { unreachable!() };
                    assert!(autostart.is_some(), "row {i}: the autostart link goes too");
                }
            }
        }
    }

    #[test]
    fn unknown_domains_are_left_alone_and_the_cache_is_rebuilt() {
        let scan = scan_of(vec![local(1, Some(1), Some(false), true), local(2, None, None, true)]);
        let plan =
            decide(&me(), &scan, &reached(&[owned(1, ME, 1, false)]), &Cache::default(), OnDbUnreachable::BlockAll);
        assert_eq!(plan.kept, vec![id(1)]);
        assert_eq!(plan.unknown, vec![id(2)]);
        assert!(plan.actions.is_empty());
        let cache = plan.cache.expect("a run that reached the database writes the cache");
        assert_eq!(cache.host, Some(me()));
        assert_eq!(cache.instances.keys().copied().collect::<Vec<_>>(), vec![id(1)]);
    }

    #[test]
    fn duplicate_uuids_are_judged_together_and_reported() {
        let mut copy = local(1, Some(1), None, false);
        copy.path = PathBuf::from("/etc/libvirt/qemu/vm-1-copy.xml");
        copy.file_name = "vm-1-copy.xml".into();
        let scan = scan_of(vec![local(1, Some(1), None, true), copy]);
        let stale = decide(
            &me(),
            &scan,
            &reached(&[owned(1, "node-b", 2, false)]),
            &Cache::default(),
            OnDbUnreachable::BlockHa,
        );
        assert_eq!(quarantined(&stale).len(), 2, "both copies are stale");
        assert_eq!(stale.errors.len(), 1);
        assert!(stale.errors[0].reason.starts_with("duplicate UUID"), "{:?}", stale.errors);
        let kept =
            decide(&me(), &scan, &reached(&[owned(1, ME, 1, false)]), &Cache::default(), OnDbUnreachable::BlockHa);
        assert_eq!(kept.kept, vec![id(1)]);
        assert!(kept.actions.is_empty());
        assert_eq!(kept.errors.len(), 1);
    }

    #[test]
    fn a_behind_copy_makes_all_copies_stale() {
        let mut old = local(1, Some(1), None, false);
        old.path = PathBuf::from("/etc/libvirt/qemu/old.xml");
        old.file_name = "old.xml".into();
        let scan = scan_of(vec![local(1, Some(2), None, true), old]);
        let plan =
            decide(&me(), &scan, &reached(&[owned(1, ME, 2, false)]), &Cache::default(), OnDbUnreachable::BlockHa);
        assert_eq!(quarantined(&plan).len(), 2);
    }

    #[test]
    fn unreachable_blocks_per_policy_and_quarantines_nothing() {
        let mut cache = Cache::default();
        cache.instances.insert(id(3), CachedInstance { ha: false, generation: Generation(1) });
        cache.instances.insert(id(4), CachedInstance { ha: true, generation: Generation(1) });
        let scan = scan_of(vec![
            local(1, Some(1), Some(true), true),  // HA by metadata
            local(2, Some(1), Some(false), true), // not HA by metadata
            local(3, None, None, true),           // not HA by cache
            local(4, None, None, true),           // HA by cache
            local(5, None, None, true),           // nothing known: counts as HA
            local(6, Some(1), Some(true), false), // HA, but no autostart link: nothing to block
        ]);
        let blocked = |policy| -> Vec<InstanceId> {
            let plan = decide(&me(), &scan, &DbAnswer::Unreachable, &cache, policy);
            assert!(plan.kept.is_empty() && plan.cache.is_none());
            assert!(quarantined(&plan).is_empty());
            plan.actions
                .iter()
                .map(|a| match a {
                    Action::Block { uuid, .. } => *uuid,
                    other => panic!("only blocks without a database: {other:?}"),
                })
                .collect()
        };
        assert_eq!(blocked(OnDbUnreachable::BlockHa), vec![id(1), id(4), id(5)]);
        assert_eq!(blocked(OnDbUnreachable::BlockAll), vec![id(1), id(2), id(3), id(4), id(5)]);
        assert_eq!(blocked(OnDbUnreachable::Allow), Vec::<InstanceId>::new());
    }

    #[test]
    fn an_unknown_host_is_a_configuration_error_not_a_mass_quarantine() {
        // The database says everything belongs elsewhere, but it does not know this host:
        // the Nova lesson is to do nothing destructive.
        let scan = scan_of(vec![local(1, Some(1), Some(true), true), local(2, Some(1), Some(false), true)]);
        let db =
            DbAnswer::Reached { host_known: false, ownership: [owned(1, "node-b", 2, false)].into_iter().collect() };
        let plan = decide(&me(), &scan, &db, &Cache::default(), OnDbUnreachable::BlockHa);
        assert!(quarantined(&plan).is_empty());
        assert_eq!(
            plan.actions,
            vec![Action::Block { uuid: id(1), link: PathBuf::from("/etc/libvirt/qemu/autostart/vm-1.xml") }]
        );
        assert!(plan.cache.is_none(), "the cache is not rewritten from a run that could not decide");
    }

    #[test]
    fn blocked_links_are_restored_retired_or_kept() {
        let blocked = |n: u8| BlockedLink {
            path: PathBuf::from(format!("/var/lib/nodekeeper/blocked/vm-{n}.xml")),
            file_name: format!("vm-{n}.xml"),
        };
        let scan = Scan {
            domains: vec![
                local(1, Some(1), Some(true), false),
                local(2, Some(1), Some(true), false),
                local(3, None, None, false),
            ],
            blocked: vec![blocked(1), blocked(2), blocked(3), blocked(9)],
            ..Scan::default()
        };
        let db = reached(&[owned(1, ME, 1, false), owned(2, "node-b", 2, false)]);
        let plan = decide(&me(), &scan, &db, &Cache::default(), OnDbUnreachable::BlockHa);
        let links: Vec<_> = plan.actions.iter().filter(|a| !matches!(a, Action::Quarantine { .. })).cloned().collect();
        assert_eq!(
            links,
            vec![
                Action::Restore { uuid: id(1), blocked: blocked(1).path }, // confirmed mine
                Action::Retire { uuid: Some(id(2)), blocked: blocked(2).path }, // moved away
                Action::Restore { uuid: id(3), blocked: blocked(3).path }, // unknown: back as it was
                Action::Retire { uuid: None, blocked: blocked(9).path },   // its definition is gone
            ]
        );
        // Without the database the blocks stay, and are reported.
        let plan = decide(&me(), &scan, &DbAnswer::Unreachable, &Cache::default(), OnDbUnreachable::BlockHa);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.still_blocked, vec![id(1), id(2), id(3)]);
    }

    #[test]
    fn unusable_files_are_reported_and_left() {
        let scan = Scan {
            errors: vec![FileError {
                path: PathBuf::from("/etc/libvirt/qemu/bad.xml"),
                reason: "malformed XML: x".into(),
            }],
            ..Scan::default()
        };
        let plan = decide(&me(), &scan, &reached(&[]), &Cache::default(), OnDbUnreachable::BlockHa);
        assert_eq!(plan.errors, scan.errors);
        assert!(plan.actions.is_empty());
    }
}
