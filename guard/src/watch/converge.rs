//! The converge pass's parts: what libvirt holds ([`list`]), what to do about it — a pure
//! [`plan`] from the local domains and the database's assignments, table-tested — and the
//! libvirt work that carries it out ([`define_and_start`], [`recreate_local_disks`], and
//! [`stop_ha_domains`] for the self-fence).

use std::collections::HashMap;
use std::time::Duration;

use nodekeeper_store::guard_api::{Assigned, Migration};
use nodekeeper_store::{Generation, HostName, InstanceId, Storage};

use crate::domain::{parse_domain_xml, NK_NAMESPACE};

/// What the pass does about one assigned instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The instance.
    pub uuid: InstanceId,
    /// Its libvirt name.
    pub name: String,
    /// Its generation in the database.
    pub generation: Generation,
    /// HA.
    pub ha: bool,
    /// (Re)define it from the stored XML: missing here, or its definition is behind.
    pub define: bool,
    /// Start it.
    pub start: bool,
    /// Local storage defined anew: recreate its missing disks from their backing images.
    pub recreate_disks: bool,
    /// Held by a drain and running here: shut it down (cleanly; forced after the guard's
    /// `shutdown_timeout`).
    pub stop: bool,
    /// Live-migrate it (it runs here, a drain moves it live).
    pub migrate: Option<Migration>,
}

/// What to do, from what libvirt holds (`local`) and what the database assigns here: an
/// instance new here is defined and started; a definition whose generation is behind the
/// database's is replaced (and started, unless it was running: then the replacement waits
/// for its next start); an HA instance that is stopped (a crash, a lifted self-fence) is
/// started; a non-HA one stopped stays stopped; tombstones are not touched (the post-libvirt
/// pass removes them). An instance held by a drain is never defined or started: shut down
/// if it runs. One being live-migrated is never defined or started either, on `me` its
/// owner (which migrates it while it runs here) nor on `me` its target (where the arriving
/// domain is left alone).
pub fn plan(me: &HostName, local: &HashMap<InstanceId, Local>, assigned: &[Assigned]) -> Vec<Action> {
    let mut actions = Vec::new();
    for inst in assigned.iter().filter(|i| !i.deleted) {
        let here = local.get(&inst.uuid);
        // Neither defined nor started: migrated (by its owner, while it runs), or shut down.
        let only = |stop: bool, migrate: Option<Migration>| Action {
            uuid: inst.uuid,
            name: inst.name.clone(),
            generation: inst.generation,
            ha: inst.ha,
            define: false,
            start: false,
            recreate_disks: false,
            stop,
            migrate,
        };
        if let Some(m) = &inst.migration {
            if &m.from == me && here.is_some_and(|d| d.active) {
                actions.push(only(false, Some(m.clone())));
            }
            continue;
        }
        if inst.held {
            if here.is_some_and(|d| d.active) {
                actions.push(only(true, None));
            }
            continue;
        }
        let behind = here.is_some_and(|d| d.generation.is_some_and(|g| g < inst.generation));
        let define = here.is_none() || behind;
        let needs_start = here.is_none() || (inst.ha && here.is_some_and(|d| !d.active));
        if !define && !needs_start {
            continue;
        }
        actions.push(Action {
            uuid: inst.uuid,
            name: inst.name.clone(),
            generation: inst.generation,
            ha: inst.ha,
            define,
            start: needs_start && !(behind && here.is_some_and(|d| d.active)),
            recreate_disks: define && inst.storage == Storage::Local,
            stop: false,
            migrate: None,
        });
    }
    actions
}

/// A local domain, as the converge pass needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// Running.
    pub active: bool,
    /// The generation in its metadata, if any.
    pub generation: Option<Generation>,
}

/// What a complete converge pass began from: the host's revision (as the last heartbeat
/// before it answered) and what libvirt showed. Whatever the pass read of the database was at
/// least that revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basis {
    /// The host's revision.
    pub revision: i64,
    /// Each local domain: UUID, running, generation (sorted by UUID).
    pub local: Vec<(InstanceId, bool, Option<Generation>)>,
}

impl Basis {
    /// The basis of a pass that begins now.
    pub fn of(revision: i64, local: &HashMap<InstanceId, Local>) -> Basis {
        let mut local: Vec<_> = local.iter().map(|(id, d)| (*id, d.active, d.generation)).collect();
        local.sort_unstable_by_key(|d| d.0);
        Basis { revision, local }
    }
}

/// Whether a converge pass has nothing to ask the database: the last complete pass began from
/// this very basis — the database changed nothing of this host's since, libvirt shows the same
/// domains in the same states — less than `full_pass` ago, and nothing is under way (a held
/// instance shutting down, a self-fence to lift). Anything else asks everything again. Pure.
pub fn nothing_new(last: Option<&(Basis, Duration)>, now: &Basis, full_pass: Duration, busy: bool) -> bool {
    !busy && last.is_some_and(|(basis, ago)| basis == now && *ago < full_pass)
}

/// When the next full pass is due: between three quarters and all of `full_pass`, spread by
/// `seed` (any number, drawn per pass), so that guards that started together — a provisioner
/// restart, a row powered on — do not all ask everything in the same second ever after. Pure.
pub fn spread(full_pass: Duration, seed: u64) -> Duration {
    full_pass * 3 / 4 + full_pass.mul_f64((seed % 1000) as f64 / 4000.0)
}

/// Every domain libvirt holds that is nodekeeper's to judge (a parseable definition).
pub fn list(uri: &str) -> anyhow::Result<HashMap<InstanceId, Local>> {
    use anyhow::Context;
    crate::libvirt::with_connection(uri, |conn| {
        let mut out = HashMap::new();
        for dom in conn.list_all_domains(0).context("listing domains")? {
            let Some(xml) = crate::libvirt::xml_unless_gone(&dom, 0)? else { continue };
            let Ok(meta) = parse_domain_xml(xml.as_bytes()) else { continue };
            out.insert(meta.uuid, Local { active: dom.is_active().unwrap_or(false), generation: meta.generation });
        }
        Ok(out)
    })
}

/// Destroys every running domain that is HA (by its metadata, else the boot pass's cache);
/// definitions stay. Returns what it stopped.
pub fn stop_ha_domains(
    uri: &str,
    cache: &std::path::Path,
    record_first: impl FnOnce(&[InstanceId]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<InstanceId>> {
    use anyhow::Context;
    let cached: HashMap<InstanceId, bool> = std::fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::boot::decide::Cache>(&b).ok())
        .map(|c| c.instances.into_iter().map(|(id, i)| (id, i.ha)).collect())
        .unwrap_or_default();
    crate::libvirt::with_connection(uri, |conn| {
        let mut ha = Vec::new();
        for dom in conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE).context("listing domains")? {
            let Some(xml) = crate::libvirt::xml_unless_gone(&dom, 0)? else { continue };
            let Ok(meta) = parse_domain_xml(xml.as_bytes()) else { continue };
            if meta.ha.or_else(|| cached.get(&meta.uuid).copied()) == Some(true) {
                ha.push((meta.uuid, meta.name, dom));
            }
        }
        let stopping: Vec<InstanceId> = ha.iter().map(|(id, _, _)| *id).collect();
        record_first(&stopping)?;
        for (_, name, dom) in &ha {
            dom.destroy().with_context(|| format!("destroying {name}"))?;
        }
        Ok(stopping)
    })
}

/// Creates the missing file-backed disks of a local-storage instance's definition: a qcow2
/// overlay on the disk's declared backing image (`<backingStore>`), as image-backed local
/// disks are made. A missing disk with no backing image, or not qcow2, cannot be recreated:
/// an error, and the instance is not defined. Returns what was created, for the events.
pub fn recreate_local_disks(xml: &str) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let mut created = Vec::new();
    for disk in crate::domain::file_disks(xml.as_bytes()).context("the stored domain XML")? {
        if disk.path.exists() {
            continue;
        }
        let shown = disk.path.display();
        let Some((base, base_format)) = &disk.backing else {
            anyhow::bail!(
                "disk {} ({shown}) is missing and declares no backing image to recreate it from",
                disk.target
            );
        };
        anyhow::ensure!(
            disk.format == "qcow2",
            "disk {} ({shown}) is missing; only a qcow2 overlay can be recreated, not {}",
            disk.target,
            disk.format
        );
        anyhow::ensure!(
            base.exists(),
            "disk {} ({shown}): its backing image {} is not on this host",
            disk.target,
            base.display()
        );
        if let Some(dir) = disk.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Made beside, then renamed: a half-made disk is never taken for the real one.
        let partial = disk.path.with_extension("nk-partial");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
            .arg(base)
            .arg(&partial)
            .output()
            .context("running qemu-img")?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&partial);
            anyhow::bail!("qemu-img create {}: {}", partial.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        std::fs::rename(&partial, &disk.path).with_context(|| format!("renaming to {shown}"))?;
        created.push(format!("disk {} recreated at {shown} over {}", disk.target, base.display()));
    }
    Ok(created)
}

/// Shuts `uuid` down: an ACPI shutdown request (`force`: destroyed at once, kept defined).
/// Returns whether it is still running.
pub fn shut_down(uri: &str, uuid: InstanceId, force: bool) -> anyhow::Result<bool> {
    use anyhow::Context;
    crate::libvirt::with_connection(uri, |conn| {
        let dom = virt::domain::Domain::lookup_by_uuid_string(conn, &uuid.to_string()).context("looking it up")?;
        if !dom.is_active().unwrap_or(false) {
            return Ok(false);
        }
        if force {
            dom.destroy().context("destroying")?;
        } else {
            dom.shutdown().context("asking it to shut down")?;
        }
        Ok(dom.is_active().unwrap_or(false))
    })
}

/// Defines `uuid` from `xml` (when given) with nodekeeper's metadata, and starts it (when
/// asked and not running). Returns (defined, started).
pub fn define_and_start(
    uri: &str,
    uuid: InstanceId,
    xml: Option<&str>,
    generation: Generation,
    ha: bool,
    start: bool,
) -> anyhow::Result<(bool, bool)> {
    use anyhow::Context;
    crate::libvirt::with_connection(uri, |conn| {
        let defined = if let Some(xml) = xml {
            if xml.contains('\0') {
                anyhow::bail!("the stored domain XML contains a NUL byte");
            }
            let meta = parse_domain_xml(xml.as_bytes()).context("the stored domain XML")?;
            if meta.uuid != uuid {
                anyhow::bail!("the stored domain XML names UUID {}, not {uuid}", meta.uuid);
            }
            let dom = virt::domain::Domain::define_xml(conn, xml).context("defining")?;
            let element = format!("<instance generation=\"{}\" ha=\"{ha}\"/>", generation.0);
            dom.set_metadata(
                virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some("nk"),
                Some(NK_NAMESPACE),
                virt::sys::VIR_DOMAIN_AFFECT_CONFIG,
            )
            .context("recording the generation in the domain's metadata")?;
            true
        } else {
            false
        };
        let dom = virt::domain::Domain::lookup_by_uuid_string(conn, &uuid.to_string()).context("looking it up")?;
        let started = if start && !dom.is_active().unwrap_or(false) {
            dom.create().context("starting")?;
            true
        } else {
            false
        };
        Ok((defined, started))
    })
}

/// Live-migrates `uuid` from this host's libvirt (`uri`) to `m.uri`, peer to peer (this
/// host's libvirtd talks to the target's; the data goes to the same address), keeping it
/// running: it arrives at generation `next` (its live and persistent XML say so), its
/// definition here is undefined. libvirt pauses it here before it runs there, so it never
/// runs on both. `Ok(false)`: a job of it already runs here (a migration an earlier guard
/// began; its outcome shows in the next pass). Blocks until libvirt is done.
pub fn migrate(uri: &str, uuid: InstanceId, m: &Migration, next: Generation, ha: bool) -> anyhow::Result<bool> {
    use anyhow::Context;
    use virt::sys;
    let data = crate::config::migration_data_uri(&m.uri)
        .with_context(|| format!("the target's migration URI {:?} names no address", m.uri))?;
    crate::libvirt::with_connection(uri, |conn| {
        let dom = virt::domain::Domain::lookup_by_uuid_string(conn, &uuid.to_string()).context("looking it up")?;
        let job = dom.get_job_info().context("reading its job")?;
        if job.r#type != sys::VIR_DOMAIN_JOB_NONE as i32 {
            return Ok(false);
        }
        let xml_of = |flags: u32| -> anyhow::Result<String> {
            let xml = dom.get_xml_desc(flags | sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE)?;
            Ok(crate::domain::with_instance_metadata(&xml, next, ha)?)
        };
        let live = xml_of(0).context("its live XML")?;
        let persistent = xml_of(sys::VIR_DOMAIN_XML_INACTIVE).context("its persistent XML")?;
        let params = virt::domain::MigrateParameters {
            uri: Some(data),
            dest_xml: Some(live),
            persist_xml: Some(persistent),
            ..Default::default()
        };
        let flags = sys::VIR_MIGRATE_LIVE
            | sys::VIR_MIGRATE_PEER2PEER
            | sys::VIR_MIGRATE_PERSIST_DEST
            | sys::VIR_MIGRATE_UNDEFINE_SOURCE
            | sys::VIR_MIGRATE_AUTO_CONVERGE
            | sys::VIR_MIGRATE_ABORT_ON_ERROR;
        dom.migrate_to_uri3(Some(&m.uri), params, flags).with_context(|| format!("migrating it to {}", m.to))?;
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> InstanceId {
        format!("00000000-0000-4000-8000-0000000000{n:02x}").parse().expect("uuid")
    }

    fn assigned(n: u8, generation: u64, ha: bool, storage: Storage, deleted: bool) -> Assigned {
        Assigned {
            uuid: id(n),
            name: format!("vm-{n}"),
            generation: Generation(generation),
            ha,
            deleted,
            storage,
            held: false,
            migration: None,
        }
    }

    fn me() -> HostName {
        "node-a".parse().expect("host")
    }

    #[test]
    fn the_plan_defines_starts_and_replaces_as_the_database_says() {
        use Storage::{Local as L, Shared as S};
        // (assigned, local state: None = not here, Some((active, generation)), expected (define, start, recreate))
        type Row = (Assigned, Option<(bool, Option<u64>)>, Option<(bool, bool, bool)>);
        let table: Vec<Row> = vec![
            (assigned(1, 1, true, S, false), None, Some((true, true, false))),
            (assigned(2, 1, false, S, false), None, Some((true, true, false))),
            (assigned(3, 2, true, L, false), None, Some((true, true, true))),
            // Here, current, running: nothing.
            (assigned(4, 1, true, S, false), Some((true, Some(1))), None),
            // HA, stopped: started, not redefined.
            (assigned(5, 1, true, S, false), Some((false, Some(1))), Some((false, true, false))),
            // Not HA, stopped: left stopped.
            (assigned(6, 1, false, S, false), Some((false, Some(1))), None),
            // Behind and running: redefined, not started (the replacement waits for its next start).
            (assigned(7, 3, true, S, false), Some((true, Some(2))), Some((true, false, false))),
            // Behind and stopped, HA: redefined and started.
            (assigned(8, 3, true, S, false), Some((false, Some(2))), Some((true, true, false))),
            // Behind, stopped, local storage: redefined with its disks recreated.
            (assigned(9, 3, true, L, false), Some((false, Some(2))), Some((true, true, true))),
            // No generation in its metadata (defined by hand): not behind.
            (assigned(10, 5, true, S, false), Some((true, None)), None),
            // Ahead of the database (should not happen): not replaced.
            (assigned(11, 1, true, S, false), Some((true, Some(4))), None),
            // Tombstones are never defined or started.
            (assigned(12, 1, true, S, true), None, None),
            (assigned(13, 1, true, S, true), Some((false, Some(1))), None),
        ];
        for (a, here, want) in table {
            let local: HashMap<InstanceId, Local> =
                here.map(|(active, g)| (a.uuid, Local { active, generation: g.map(Generation) })).into_iter().collect();
            let got =
                plan(&me(), &local, std::slice::from_ref(&a)).pop().map(|x| (x.define, x.start, x.recreate_disks));
            assert_eq!(got, want, "{} (generation {}, here {here:?})", a.name, a.generation.0);
        }
    }

    #[test]
    fn a_held_instance_is_shut_down_and_never_started() {
        let held = |n| Assigned { held: true, ..assigned(n, 2, true, Storage::Shared, false) };
        let mut local = HashMap::new();
        local.insert(id(1), Local { active: true, generation: Some(Generation(2)) });
        local.insert(id(2), Local { active: false, generation: Some(Generation(2)) });
        // 3: not here at all; 4: here, behind and stopped (would be redefined if not held).
        local.insert(id(4), Local { active: false, generation: Some(Generation(1)) });
        let actions = plan(&me(), &local, &[held(1), held(2), held(3), held(4)]);
        assert_eq!(actions.len(), 1, "{actions:?}");
        let a = &actions[0];
        assert_eq!((a.uuid, a.stop, a.start, a.define), (id(1), true, false, false));
    }

    #[test]
    fn a_migrating_instance_is_migrated_by_its_owner_and_never_defined_or_started() {
        let host = |h: &str| -> HostName { h.parse().expect("host") };
        let migration =
            |from: &str, to: &str| Migration { from: host(from), to: host(to), uri: format!("qemu+tcp://{to}/system") };
        let out = |n| Assigned {
            migration: Some(migration("node-a", "node-b")),
            ..assigned(n, 2, true, Storage::Shared, false)
        };
        let inc = |n| Assigned {
            migration: Some(migration("node-c", "node-a")),
            ..assigned(n, 2, true, Storage::Shared, false)
        };
        let mut local = HashMap::new();
        // 1: outgoing, runs here: migrate. 2: outgoing, stopped here: nothing (never started).
        // 3: outgoing, gone from here (migrated; the owner changes next): nothing.
        // 4: incoming, arriving here: nothing. 5: incoming, not here yet: nothing.
        local.insert(id(1), Local { active: true, generation: Some(Generation(2)) });
        local.insert(id(2), Local { active: false, generation: Some(Generation(2)) });
        local.insert(id(4), Local { active: true, generation: Some(Generation(3)) });
        let actions = plan(&me(), &local, &[out(1), out(2), out(3), inc(4), inc(5)]);
        assert_eq!(actions.len(), 1, "{actions:?}");
        let a = &actions[0];
        assert_eq!((a.uuid, a.define, a.start, a.stop), (id(1), false, false, false));
        assert_eq!(a.migrate, Some(migration("node-a", "node-b")));
    }

    #[test]
    fn a_plan_covers_every_assignment_and_nothing_else() {
        let all = [assigned(1, 1, true, Storage::Shared, false), assigned(2, 1, false, Storage::Shared, false)];
        let mut local = HashMap::new();
        // Something here the database does not assign (the post-libvirt pass judges it).
        local.insert(id(9), Local { active: true, generation: Some(Generation(1)) });
        let actions = plan(&me(), &local, &all);
        assert_eq!(actions.iter().map(|a| a.uuid).collect::<Vec<_>>(), [id(1), id(2)]);
    }

    #[test]
    fn a_pass_asks_nothing_only_from_the_same_basis_within_the_full_pass() {
        let local = |active: bool, generation: u64| {
            HashMap::from([
                (id(2), Local { active: true, generation: Some(Generation(1)) }),
                (id(1), Local { active, generation: Some(Generation(generation)) }),
            ])
        };
        let basis = Basis::of(7, &local(true, 3));
        assert_eq!(basis.local[0].0, id(1), "sorted: the map's order does not matter");
        let full = Duration::from_secs(30);
        let last = Some((basis.clone(), Duration::from_secs(5)));
        assert!(nothing_new(last.as_ref(), &Basis::of(7, &local(true, 3)), full, false));
        assert!(!nothing_new(None, &basis, full, false), "no complete pass yet");
        assert!(!nothing_new(last.as_ref(), &Basis::of(8, &local(true, 3)), full, false), "the revision moved");
        assert!(!nothing_new(last.as_ref(), &Basis::of(7, &local(false, 3)), full, false), "a domain stopped");
        assert!(!nothing_new(last.as_ref(), &Basis::of(7, &local(true, 4)), full, false), "redefined");
        assert!(!nothing_new(last.as_ref(), &Basis::of(7, &HashMap::new()), full, false), "undefined");
        assert!(!nothing_new(last.as_ref(), &basis, full, true), "a shutdown or self-fence under way");
        let old = Some((basis.clone(), full));
        assert!(!nothing_new(old.as_ref(), &basis, full, false), "the full pass is due");
        let spread: Vec<Duration> = (0..1000).map(|seed| super::spread(full, seed)).collect();
        assert!(spread.iter().all(|d| *d >= full * 3 / 4 && *d < full), "within the last quarter");
        assert!(spread.iter().any(|d| *d < full * 8 / 10) && spread.iter().any(|d| *d > full * 95 / 100), "spread");
    }
}
