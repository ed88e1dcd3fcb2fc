//! `nodekeeper-guard boot --post-libvirt`: once libvirtd is up, catch what escaped the file
//! pass — a transient domain, a definition that appeared in between, a domain someone
//! started by hand — by asking libvirt itself.
//!
//! Rules, with the same judgement as the file pass ([`judge`]):
//! - stale and not running → its XML is saved to `quarantine/`, then it is undefined;
//! - stale and running → destroyed (then undefined if persistent) **only** when the database
//!   says another host owns it now, i.e. it was recovered elsewhere; a running domain that is
//!   deleted or merely behind is left running and reported, for an operator to decide;
//! - unknown to the database, or no database answer → nothing is touched.

use std::path::PathBuf;

use nodekeeper_store::{Generation, HostName, InstanceId, NewEvent};
use serde::Serialize;

use super::decide::{judge, DbAnswer, StaleReason};
use super::scan::FileError;
use super::{ask_database, DatabaseState};
use crate::config::Config;
use crate::domain::parse_domain_xml;
use crate::fsutil;

/// A domain as libvirt lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDomain {
    /// Its UUID.
    pub uuid: InstanceId,
    /// Its name.
    pub name: String,
    /// Running (or paused).
    pub active: bool,
    /// Has a persistent definition.
    pub persistent: bool,
    /// The generation its metadata records.
    pub generation: Option<Generation>,
}

/// What to do to one live domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveAction {
    /// Save its XML, destroy it if running, undefine it if persistent.
    Remove {
        /// The domain.
        uuid: InstanceId,
        /// Its name.
        name: String,
        /// Destroy first (it runs, and runs elsewhere too).
        destroy: bool,
        /// Undefine (it has a persistent definition).
        undefine: bool,
        /// Why.
        reason: StaleReason,
    },
}

/// The decision for the live domains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LivePlan {
    /// Actions, in order.
    pub actions: Vec<LiveAction>,
    /// Domains that are this host's.
    pub kept: Vec<InstanceId>,
    /// Domains the database does not know.
    pub unknown: Vec<InstanceId>,
    /// Stale but running and not recovered elsewhere: left running.
    pub left_running: Vec<LeftRunning>,
}

/// A running domain the pass would not stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeftRunning {
    /// The domain.
    pub uuid: InstanceId,
    /// Why it is stale, and so why an operator should look.
    pub reason: String,
}

/// Decides, purely. Without a database answer for a known host, nothing is decided.
pub fn decide_live(me: &HostName, domains: &[LiveDomain], db: &DbAnswer) -> LivePlan {
    let mut plan = LivePlan::default();
    let DbAnswer::Reached { host_known: true, ownership } = db else { return plan };
    for d in domains {
        let Some(owner) = ownership.get(&d.uuid) else {
            plan.unknown.push(d.uuid);
            continue;
        };
        let Some(reason) = judge(me, d.generation, owner) else {
            plan.kept.push(d.uuid);
            continue;
        };
        let recovered_elsewhere = matches!(reason, StaleReason::OwnedBy { .. });
        if d.active && !recovered_elsewhere {
            plan.left_running.push(LeftRunning { uuid: d.uuid, reason: reason.to_string() });
            continue;
        }
        plan.actions.push(LiveAction::Remove {
            uuid: d.uuid,
            name: d.name.clone(),
            destroy: d.active,
            undefine: d.persistent,
            reason,
        });
    }
    plan
}

/// The `--post-libvirt --json` report.
#[derive(Debug, Clone, Serialize)]
pub struct LiveReport {
    /// This host.
    pub host: HostName,
    /// `ok` or `unreachable`.
    pub database: DatabaseState,
    /// Domains that are this host's.
    pub kept: Vec<InstanceId>,
    /// Domains destroyed (they ran here and elsewhere).
    pub destroyed: Vec<InstanceId>,
    /// Domains undefined (their XML saved in `quarantine/` first).
    pub undefined: Vec<InstanceId>,
    /// Domains the database does not know.
    pub unknown: Vec<InstanceId>,
    /// Stale domains left running, with the reason.
    pub left_running: Vec<LeftRunning>,
    /// What failed.
    pub errors: Vec<FileError>,
    /// Why the database could not be used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_error: Option<String>,
}

/// Runs the pass against `libvirt.uri`.
pub async fn run(config: &Config) -> anyhow::Result<LiveReport> {
    // libvirt prints every error to stderr by default; ours carry its message already.
    virt::error::clear_error_callback();
    let uri = config.libvirt.uri.clone();
    let domains = tokio::task::spawn_blocking(move || list_domains(&uri)).await??;
    let uuids: Vec<InstanceId> = domains.iter().map(|d| d.uuid).collect();
    let (answer, store, database_error) = ask_database(config, &uuids).await;
    let plan = decide_live(&config.host, &domains, &answer);

    let (uri, quarantine, actions) =
        (config.libvirt.uri.clone(), config.boot.state_dir.join("quarantine"), plan.actions.clone());
    let outcome = tokio::task::spawn_blocking(move || execute_live(&uri, &quarantine, &actions)).await??;

    let mut errors = outcome.errors;
    if let Some(store) = &store {
        let actor = format!("guard:{}", config.host);
        let events: Vec<NewEvent> = outcome
            .done
            .iter()
            .map(|(uuid, what, saved)| {
                let message = format!("{what} by the post-libvirt pass; XML saved to {}", saved.display());
                NewEvent::instance(&actor, &format!("instance.{what}"), &config.host, *uuid, message)
            })
            .collect();
        if let Err(e) = store.record_events(&events).await {
            errors.push(FileError { path: PathBuf::from("events"), reason: format!("events not recorded: {e:#}") });
        }
        store.close().await;
    }
    let pick = |what: &str| outcome.done.iter().filter(|d| d.1 == what).map(|d| d.0).collect::<Vec<_>>();
    Ok(LiveReport {
        host: config.host.clone(),
        database: if store.is_some() { DatabaseState::Ok } else { DatabaseState::Unreachable },
        kept: plan.kept,
        destroyed: pick("destroyed"),
        undefined: pick("undefined"),
        unknown: plan.unknown,
        left_running: plan.left_running,
        errors,
        database_error,
    })
}

/// Every domain libvirt knows, with the generation from its metadata.
fn list_domains(uri: &str) -> anyhow::Result<Vec<LiveDomain>> {
    use anyhow::Context;
    crate::libvirt::with_connection(uri, |conn| {
        let mut out = Vec::new();
        for dom in conn.list_all_domains(0).context("listing domains")? {
            let uuid_text = dom.get_uuid_string().context("reading a domain's UUID")?;
            let uuid = uuid_text.parse().with_context(|| format!("libvirt UUID {uuid_text:?}"))?;
            let Some(xml) = crate::libvirt::xml_unless_gone(&dom, 0).with_context(|| format!("{uuid}"))? else {
                continue;
            };
            out.push(LiveDomain {
                uuid,
                name: dom.get_name().with_context(|| format!("reading the name of {uuid}"))?,
                active: dom.is_active().with_context(|| format!("reading the state of {uuid}"))?,
                persistent: dom.is_persistent().with_context(|| format!("reading the persistence of {uuid}"))?,
                generation: parse_domain_xml(xml.as_bytes()).ok().and_then(|m| m.generation),
            });
        }
        Ok(out)
    })
}

struct LiveOutcome {
    /// (uuid, "destroyed" | "undefined", where its XML was saved)
    done: Vec<(InstanceId, &'static str, PathBuf)>,
    errors: Vec<FileError>,
}

/// Carries out the removals. Each saves the domain's full XML (inactive definition, with
/// secrets, as `virsh dumpxml --inactive --security-info` would) durably before acting.
fn execute_live(uri: &str, quarantine: &std::path::Path, actions: &[LiveAction]) -> anyhow::Result<LiveOutcome> {
    use anyhow::Context;
    let mut out = LiveOutcome { done: Vec::new(), errors: Vec::new() };
    if actions.is_empty() {
        return Ok(out);
    }
    // A quarantine that cannot be written (a full or read-only disk) must not keep a copy that
    // runs elsewhere running here: the domain is then destroyed anyway (the database holds its
    // XML), its autostart turned off, and it stays defined (nothing is lost).
    let writable = std::fs::create_dir_all(quarantine).with_context(|| format!("creating {}", quarantine.display()));
    if let Err(e) = &writable {
        tracing::error!("{e:#}: stale domains are destroyed without saving their XML, and kept defined");
    }
    crate::libvirt::with_connection(uri, |conn| {
        for action in actions {
            let LiveAction::Remove { uuid, name, destroy, undefine, reason } = action;
            let result: anyhow::Result<PathBuf> = (|| {
                let dom = virt::domain::Domain::lookup_by_uuid_string(conn, &uuid.to_string())?;
                let xml = dom.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE)?;
                let saved = free_name(quarantine, &format!("{uuid}.{name}.libvirt.xml"));
                let kept = writable.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|()| {
                    fsutil::write_atomic(&saved, xml.as_bytes()).with_context(|| format!("saving {}", saved.display()))
                });
                if let Err(e) = kept {
                    tracing::error!(uuid = %uuid, "{name}: its XML cannot be saved ({e:#}): destroying it anyway ({reason}); it stays defined, autostart off");
                    if *destroy {
                        dom.destroy().with_context(|| format!("destroying {name} ({reason})"))?;
                        out.done.push((*uuid, "destroyed", PathBuf::from("(not saved: the database holds it)")));
                    }
                    let _ = dom.set_autostart(false);
                    anyhow::bail!(
                        "its XML could not be saved ({e:#}): destroyed if running, left defined, autostart off"
                    );
                }
                if *destroy {
                    dom.destroy().with_context(|| format!("destroying {name} ({reason})"))?;
                    out.done.push((*uuid, "destroyed", saved.clone()));
                }
                if *undefine {
                    // Keep NVRAM: the guard never deletes what an operator may need.
                    dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
                        .with_context(|| format!("undefining {name} ({reason})"))?;
                    out.done.push((*uuid, "undefined", saved.clone()));
                }
                Ok(saved)
            })();
            if let Err(e) = result {
                out.errors.push(FileError { path: PathBuf::from(format!("libvirt:{name}")), reason: format!("{e:#}") });
            }
        }
        Ok(out)
    })
}

fn free_name(dir: &std::path::Path, base: &str) -> PathBuf {
    let mut path = dir.join(base);
    let mut n = 1;
    while fsutil::exists(&path) {
        path = dir.join(format!("{base}.{n}"));
        n += 1;
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::Ownership;

    fn id(n: u8) -> InstanceId {
        format!("00000000-0000-4000-8000-0000000000{n:02x}").parse().expect("uuid")
    }

    fn live(n: u8, active: bool, persistent: bool, generation: Option<u64>) -> LiveDomain {
        LiveDomain { uuid: id(n), name: format!("vm-{n}"), active, persistent, generation: generation.map(Generation) }
    }

    fn own(n: u8, owner: &str, generation: u64, deleted: bool) -> (InstanceId, Ownership) {
        (
            id(n),
            Ownership {
                uuid: id(n),
                owner: owner.parse().expect("host"),
                generation: Generation(generation),
                deleted,
                ha: true,
                migrating_to: None,
            },
        )
    }

    #[test]
    fn running_copies_are_destroyed_only_when_recovered_elsewhere() {
        let me: HostName = "node-a".parse().expect("host");
        let domains = [
            live(1, true, true, Some(1)),  // mine: keep
            live(2, true, true, Some(1)),  // recovered on node-b, running here: destroy + undefine
            live(3, false, true, Some(1)), // recovered on node-b, shut off: undefine
            live(4, true, false, None),    // recovered on node-b, transient: destroy
            live(5, true, true, Some(1)),  // deleted, running: leave running
            live(6, true, true, Some(1)),  // mine but behind, running: leave running
            live(7, false, true, Some(1)), // deleted, shut off: undefine
            live(8, true, true, None),     // unknown
            live(9, true, false, Some(3)), // node-b's, live-migrating here (arriving): keep
            live(10, true, true, Some(3)), // node-b's, migrating to node-c, running here: destroy
        ];
        let db = DbAnswer::Reached {
            host_known: true,
            ownership: [
                own(1, "node-a", 1, false),
                own(2, "node-b", 2, false),
                own(3, "node-b", 2, false),
                own(4, "node-b", 2, false),
                own(5, "node-a", 1, true),
                own(6, "node-a", 3, false),
                own(7, "node-a", 1, true),
                (id(9), Ownership { migrating_to: Some(me.clone()), ..own(9, "node-b", 2, false).1 }),
                (
                    id(10),
                    Ownership { migrating_to: Some("node-c".parse().expect("host")), ..own(10, "node-b", 2, false).1 },
                ),
            ]
            .into_iter()
            .collect(),
        };
        let plan = decide_live(&me, &domains, &db);
        assert_eq!(plan.kept, vec![id(1), id(9)]);
        assert_eq!(plan.unknown, vec![id(8)]);
        let removals: Vec<(InstanceId, bool, bool)> = plan
            .actions
            .iter()
            .map(|LiveAction::Remove { uuid, destroy, undefine, .. }| (*uuid, *destroy, *undefine))
            .collect();
        assert_eq!(
            removals,
            vec![
                (id(2), true, true),
                (id(3), false, true),
                (id(4), true, false),
                (id(7), false, true),
                (id(10), true, true)
            ]
        );
        assert_eq!(plan.left_running.iter().map(|l| l.uuid).collect::<Vec<_>>(), vec![id(5), id(6)]);

        // No answer, or a host the database does not know: touch nothing.
        assert_eq!(decide_live(&me, &domains, &DbAnswer::Unreachable), LivePlan::default());
        let unknown_host = DbAnswer::Reached { host_known: false, ownership: Default::default() };
        assert_eq!(decide_live(&me, &domains, &unknown_host), LivePlan::default());
    }
}
