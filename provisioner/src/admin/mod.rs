//! The admin commands: each reads or changes the database through the store and prints a
//! table, or with `--json` one JSON document on stdout (stable; see docs/cli.md).

mod call;
mod import;

pub use call::{
    power_action, Drain, Evacuate, HostAdd, HostSet, InstanceSet, Labels, Maintenance, Outlets, Power, Reimage,
    ServiceAdd, TokenCreate, Uuids,
};
pub use call::{Body, Call, Ctx, Request};

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use nodekeeper_store::{
    BootChange, BootMode, BootPath, BootSettings, EventFilter, HostName, InstanceId, NewHost, Store, StoreError,
};
use serde::Serialize;
use serde_json::json;

pub use import::{parse_jsonl, ImportError};

/// What an admin command answers: its JSON document (`--json`, and the admin API's body) and
/// the same as text for a terminal. Made once, by the command; printed by the local CLI or
/// sent by the API, so the remote CLI prints exactly what the local one does.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The JSON document (stable; see docs/cli.md).
    pub json: serde_json::Value,
    /// The table or sentence.
    pub text: String,
}

impl Reply {
    fn new<T: Serialize>(value: &T, table: impl FnOnce() -> String) -> anyhow::Result<Reply> {
        Ok(Reply { json: serde_json::to_value(value).context("rendering JSON")?, text: table() })
    }

    /// Prints it on stdout: pretty JSON, or the text.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if json {
            serde_json::to_writer_pretty(&mut stdout, &self.json).context("writing JSON to stdout")?;
            writeln!(stdout).context("writing to stdout")?;
        } else {
            write!(stdout, "{}", self.text).context("writing to stdout")?;
        }
        Ok(())
    }
}

/// Who the events say acted when the CLI works on the database itself: `cli:USER`.
pub fn local_actor() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

/// Connects and makes sure the schema fits. An embedded SQLite database is migrated on the
/// spot (it has one user: this machine); PostgreSQL is shared by replicas, so a schema that
/// is behind is an error asking for `db migrate` — unless that is the command being run.
pub async fn open_store(url: &str, migrating: bool) -> anyhow::Result<Store> {
    if migrating {
        return Ok(Store::connect(url).await?);
    }
    Ok(Store::open_for_service(url, &nodekeeper_store::ConnectOptions::default()).await?)
}

/// `db migrate`
pub async fn db_migrate(store: &Store) -> anyhow::Result<Reply> {
    let applied = store.migrate().await?;
    let version = store.schema_version().await?;
    let value = json!({ "database": store.redacted_url(), "applied": applied, "schema_version": version });
    Reply::new(&value, || {
        format!("{}: {applied} migration(s) applied, schema version {version}\n", store.redacted_url())
    })
}

/// `db guard-role HOST [--role NAME]`: prints the guard's `database_url` (with the role's new
/// password: shown once).
pub async fn db_guard_role(
    store: &Store,
    admin_url: &str,
    host: &HostName,
    role: Option<&str>,
) -> anyhow::Result<Reply> {
    let made = store.create_guard_role(host, role).await?;
    let mut url = url::Url::parse(admin_url).context("the database URL")?;
    url.set_username(&made.role).map_err(|()| anyhow::anyhow!("the database URL cannot carry a user"))?;
    url.set_password(Some(&made.password)).map_err(|()| anyhow::anyhow!("the database URL cannot carry a password"))?;
    #[derive(serde::Serialize)]
    struct Made<'a> {
        host: &'a HostName,
        role: &'a str,
        database_url: &'a str,
    }
    let shown = Made { host, role: &made.role, database_url: url.as_str() };
    Reply::new(&shown, || format!("{}\n", url.as_str()))
}

/// `tls init --config FILE [--name N]... [--new-ca]`
pub fn tls_init(config: &std::path::Path, names: &[String], new_ca: bool) -> anyhow::Result<Reply> {
    let config = crate::config::ServeConfig::load(config)?;
    let tls = config.http.tls.as_ref().context("the config has no [http.tls] (listen, public_url, cert, key, ca)")?;
    let issued = crate::http::tls::init(tls, names, new_ca)?;
    Reply::new(&issued, || {
        let ca = if issued.ca_created { "made" } else { "kept" };
        format!(
            "CA {} ({ca}), sha256 {}\nserver certificate {} for {} (until {})\nkey {}\n",
            issued.ca.display(),
            issued.ca_sha256,
            issued.cert.display(),
            issued.names.join(", "),
            issued.not_after,
            issued.key.display()
        )
    })
}

/// `host add`
pub async fn host_add(
    store: &Store,
    actor: &str,
    bmc: &crate::config::BmcConfig,
    new: NewHost,
    root_device: Option<&str>,
    boot_mode: Option<BootMode>,
    boot_path: BootPath,
) -> anyhow::Result<Reply> {
    if let Some(bmc) = &new.bmc_url {
        check_bmc_url(bmc)?;
    }
    if let Some(reference) = &new.bmc_credentials {
        crate::bmc::CredentialScope::from(bmc).check(reference)?;
    }
    let root_device = root_device.map(root_device_hint).transpose()?;
    check_boot_path(boot_path, boot_mode, new.bmc_url.as_deref())?;
    let host = store.add_host_with(&new, &BootSettings { root_device, boot_mode, boot_path }, actor).await?;
    Reply::new(&host, || format!("host {} added\n", host.name))
}

/// A `--root-device` hint, checked and in the agent's one-word form.
fn root_device_hint(hint: &str) -> anyhow::Result<String> {
    nodekeeper_deploy::disks::Hint::parse(hint).map(|h| h.to_arg()).map_err(|e| anyhow::anyhow!("--root-device: {e}"))
}

/// `host set`
pub async fn host_set(
    store: &Store,
    actor: &str,
    name: &HostName,
    root_device: Option<&str>,
    boot_mode: Option<&str>,
    boot_path: Option<BootPath>,
) -> anyhow::Result<Reply> {
    if root_device.is_none() && boot_mode.is_none() && boot_path.is_none() {
        bail!("host set {name}: nothing to change (--root-device, --boot-mode, --boot)");
    }
    let root_device = match root_device {
        None => None,
        Some("none") => Some(None),
        Some(hint) => Some(Some(root_device_hint(hint)?)),
    };
    let boot_mode = match boot_mode {
        None => None,
        Some("unknown") => Some(None),
        Some(mode) => Some(Some(mode.parse::<BootMode>().map_err(|e| anyhow::anyhow!("--boot-mode: {e} or unknown"))?)),
    };
    let host = store.require_host(name).await?;
    let current = store.boot_settings(name).await?;
    check_boot_path(
        boot_path.unwrap_or(current.boot_path),
        boot_mode.unwrap_or(current.boot_mode),
        host.bmc_url.as_deref(),
    )?;
    let change = BootChange { root_device: root_device.as_ref().map(|h| h.as_deref()), boot_mode, boot_path };
    let settings = store.change_boot_settings(name, &change, actor).await?;
    Reply::new(&settings, || {
        format!(
            "{name}: root device {}, boot mode {}, boot path {}\n",
            settings.root_device.as_deref().unwrap_or("(the smallest fixed disk)"),
            settings.boot_mode.map_or("(unknown)", BootMode::as_str),
            settings.boot_path
        )
    })
}

/// `host set`: the boot settings, the placement inventory, or both (one reply: the changed
/// settings' fields, and the inventory's when it changed too).
pub async fn host_change(store: &Store, actor: &str, name: &HostName, change: &HostSet) -> anyhow::Result<Reply> {
    let boot_path =
        change.boot.as_deref().map(str::parse::<BootPath>).transpose().map_err(|e| anyhow::anyhow!("--boot: {e}"))?;
    let inventory = change.vcpus.is_some() || change.memory.is_some() || change.reserved.is_some();
    let boot = change.root_device.is_some() || change.boot_mode.is_some() || boot_path.is_some();
    if !inventory && !boot {
        bail!("host set {name}: nothing to change (--root-device, --boot-mode, --boot, --vcpus, --memory, --reserved)");
    }
    // Checked before anything is written: a bad inventory value changes no boot setting.
    let mut reply: Option<Reply> = None;
    if boot {
        reply = Some(
            host_set(store, actor, name, change.root_device.as_deref(), change.boot_mode.as_deref(), boot_path).await?,
        );
    }
    if inventory {
        let more =
            host_inventory(store, actor, name, change.vcpus.as_deref(), change.memory.as_deref(), change.reserved)
                .await?;
        reply = Some(match reply {
            None => more,
            Some(mut r) => {
                if let (Some(a), serde_json::Value::Object(b)) = (r.json.as_object_mut(), more.json) {
                    a.extend(b);
                }
                r.text.push_str(&more.text);
                r
            }
        });
    }
    reply.context("nothing changed")
}

/// `host outlets`: shows (no URL) or replaces a host's PDU outlets.
pub async fn host_outlets(
    store: &Store,
    actor: &str,
    bmc: &crate::config::BmcConfig,
    name: &HostName,
    urls: &[String],
    credentials: Option<&str>,
    none: bool,
) -> anyhow::Result<Reply> {
    if none || !urls.is_empty() {
        if let Some(reference) = credentials {
            crate::bmc::CredentialScope::from(bmc).check(reference)?;
        }
        for url in urls {
            crate::bmc::pdu::check_url(url).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let outlets: Vec<nodekeeper_store::HostOutlet> = urls
            .iter()
            .map(|u| nodekeeper_store::HostOutlet { url: u.clone(), credentials: credentials.map(str::to_owned) })
            .collect();
        store.set_host_outlets(name, &outlets, actor).await?;
    } else if credentials.is_some() {
        bail!("host outlets {name}: --credentials goes with the outlets' URLs");
    }
    let outlets = store.host_outlets(name).await?;
    Reply::new(&outlets, || {
        if outlets.is_empty() {
            return format!("{name}: no PDU outlets\n");
        }
        outlets.iter().map(|o| format!("{name}: {}\n", o.url)).collect()
    })
}

/// A boot path the host can take: UEFI HTTP boot needs UEFI firmware, virtual media a Redfish
/// BMC (IPMI has no virtual media).
fn check_boot_path(path: BootPath, mode: Option<BootMode>, bmc: Option<&str>) -> anyhow::Result<()> {
    if path == BootPath::Http && mode == Some(BootMode::Bios) {
        bail!("--boot http: UEFI HTTP boot needs UEFI firmware, and the host's boot mode is bios");
    }
    if path == BootPath::VirtualMedia && bmc.is_some_and(|b| b.starts_with("ipmi://")) {
        bail!("--boot virtual-media: needs a Redfish BMC; IPMI has no virtual media");
    }
    Ok(())
}

fn check_bmc_url(bmc: &str) -> anyhow::Result<()> {
    const SCHEMES: &[&str] = &["redfish", "redfish+http", "redfish+https", "ipmi", "http", "https"];
    let scheme = bmc.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if SCHEMES.contains(&s) && bmc.len() > s.len() + 3 => Ok(()),
        _ => bail!("BMC URL {bmc:?}: expected one of {} followed by ://HOST", SCHEMES.join(", ")),
    }
}

/// `host list`
pub async fn host_list(store: &Store) -> anyhow::Result<Reply> {
    let hosts = store.hosts().await?;
    Reply::new(&hosts, || {
        table(
            &["NAME", "STATE", "MAC", "IP", "BMC", "LAST HEARTBEAT"],
            hosts.iter().map(|h| {
                vec![
                    h.name.to_string(),
                    h.state.to_string(),
                    opt(h.mac),
                    opt(h.ip),
                    opt(h.bmc_url.as_ref()),
                    opt(h.last_heartbeat),
                ]
            }),
        )
    })
}

/// `host show`
pub async fn host_show(store: &Store, name: &HostName) -> anyhow::Result<Reply> {
    let host = store.require_host(name).await?;
    let instances = store.instances(Some(name)).await?;
    let live = instances.iter().filter(|i| !i.deleted);
    let counts = json!({
        "total": live.clone().count(),
        "ha": live.filter(|i| i.ha).count(),
        "deleted": instances.iter().filter(|i| i.deleted).count(),
    });
    let events = store.events(&EventFilter { host: Some(name.clone()), limit: Some(20), ..Default::default() }).await?;
    let operation = store.latest_operation(name).await?;
    let boot = store.boot_settings(name).await?;
    let last_path = store
        .latest_operation_of(crate::reimage::executor::KIND, name)
        .await?
        .and_then(|o| serde_json::from_str::<crate::reimage::machine::ReimageData>(&o.data).ok().map(|d| d.boot_path));
    let outlets = store.host_outlets(name).await?;
    let fencing = store.guard_fencing_of(name).await?;
    let inventory = store.host_inventories().await?.remove(name).unwrap_or_default();
    let value = json!({
        "host": host, "boot": boot, "last_reimage_boot_path": last_path, "instances": counts,
        "operation": operation, "events": events, "outlets": outlets, "fencing": fencing,
        "inventory": inventory,
    });
    Reply::new(&value, || {
        let mut s = String::new();
        let fields = [
            ("name", host.name.to_string()),
            ("state", host.state.to_string()),
            ("mac", opt(host.mac)),
            ("ip", opt(host.ip)),
            ("bmc", opt(host.bmc_url.as_ref())),
            ("image", opt(host.image.as_ref())),
            ("boot mode", opt(boot.boot_mode)),
            (
                "boot path",
                last_path
                    .map_or_else(|| boot.boot_path.to_string(), |p| format!("{} (last reimage: {p})", boot.boot_path)),
            ),
            ("root device", opt(boot.root_device.as_ref())),
            (
                "capacity",
                format!(
                    "{} vCPU, {} MiB{}",
                    inventory.vcpus.map_or("unlimited".into(), |v| v.to_string()),
                    inventory.memory_mib.map_or("unlimited".into(), |v| v.to_string()),
                    if inventory.reserved { ", reserved for recovery" } else { "" }
                ),
            ),
            (
                "outlets",
                if outlets.is_empty() {
                    "-".to_owned()
                } else {
                    outlets.iter().map(|o| o.url.as_str()).collect::<Vec<_>>().join(", ")
                },
            ),
            (
                "watchdog fencing",
                match crate::recovery::watchdog::refusal(fencing.as_ref()) {
                    None => format!(
                        "possible (watchdog {} s, quorum of {} hosts)",
                        fencing.as_ref().and_then(|p| p.watchdog_timeout_ms).unwrap_or(0) / 1000,
                        fencing.as_ref().and_then(|p| p.quorum_cell.as_ref()).map_or(0, |c| c.len() + 1)
                    ),
                    Some(why) => format!("no: {why}"),
                },
            ),
            ("last heartbeat", opt(host.last_heartbeat)),
            ("added", host.created_at.to_string()),
            ("instances", format!("{} ({} HA), {} deleted", counts["total"], counts["ha"], counts["deleted"])),
            (
                "operation",
                operation.as_ref().map_or_else(
                    || "-".to_owned(),
                    |o| {
                        let deadline = o.deadline.map(|d| format!(", deadline {d}")).unwrap_or_default();
                        let error = o.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default();
                        format!(
                            "{} #{} {} at {} (attempt {}{deadline}{error})",
                            o.kind, o.id, o.status, o.step, o.attempts
                        )
                    },
                ),
            ),
        ];
        for (k, v) in fields {
            s.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
        }
        s.push_str("\nrecent events:\n");
        s.push_str(&table(
            &["AT", "ACTOR", "KIND", "MESSAGE"],
            events.iter().map(|e| vec![e.at.to_string(), e.actor.clone(), e.kind.clone(), e.message.clone()]),
        ));
        s
    })
}

/// `instance import`: `text` is the JSON lines, `source` names where they came from (a file,
/// stdin, a request) in errors.
pub async fn instance_import(store: &Store, actor: &str, source: &str, text: &str) -> anyhow::Result<Reply> {
    let started = Instant::now();
    let parsed = parse_jsonl(text).with_context(|| format!("{source}: nothing imported"))?;
    let items: Vec<_> = parsed.iter().map(|(_, item, _)| item.clone()).collect();
    let policies: Vec<_> = parsed.iter().map(|(_, _, p)| p.clone()).collect();
    let imported = store.import_instances_with(&items, &policies, actor).await.map_err(|e| match e {
        StoreError::Item { index, source: e } => {
            let line = parsed.get(index).map_or(0, |(line, _, _)| *line);
            anyhow::anyhow!("{source}: line {line}: {e}; nothing imported")
        }
        e => anyhow::Error::new(e).context(format!("{source}: nothing imported")),
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let value = json!({ "imported": imported, "seconds": seconds });
    Reply::new(&value, || format!("imported {imported} instances in {seconds:.2} s\n"))
}

/// The JSON lines of `instance import FILE` (`-`: stdin).
pub fn read_import_file(file: &Path) -> anyhow::Result<String> {
    if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading instances from stdin")
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    }
}

/// `instance list`
pub async fn instance_list(store: &Store, host: Option<&HostName>) -> anyhow::Result<Reply> {
    if let Some(h) = host {
        store.require_host(h).await?;
    }
    let instances = store.instances(host).await?;
    Reply::new(&instances, || {
        table(
            &["UUID", "NAME", "HOST", "GEN", "HA", "STORAGE", "DELETED"],
            instances.iter().map(|i| {
                vec![
                    i.uuid.to_string(),
                    i.name.clone(),
                    i.owner.to_string(),
                    i.generation.to_string(),
                    yes_no(i.ha),
                    i.storage.to_string(),
                    yes_no(i.deleted),
                ]
            }),
        )
    })
}

/// `instance evacuate`
pub async fn instance_evacuate(
    store: &Store,
    actor: &str,
    to: &HostName,
    force: bool,
    ids: &[InstanceId],
) -> anyhow::Result<Reply> {
    let transfers = store.evacuate(ids, to, force, actor).await.map_err(unwrap_item)?;
    Reply::new(&transfers, || {
        table(
            &["UUID", "FROM", "TO", "GEN", "MOVED"],
            transfers.iter().map(|t| {
                vec![
                    t.uuid.to_string(),
                    t.from.to_string(),
                    t.to.to_string(),
                    t.generation.to_string(),
                    yes_no(t.moved),
                ]
            }),
        )
    })
}

/// What `instance set` changes (`None`: left as it is).
#[derive(Debug, Default)]
pub struct PolicyChange<'a> {
    /// `--priority`.
    pub priority: Option<i64>,
    /// `--anti-affinity GROUP|none`.
    pub anti_affinity: Option<&'a str>,
    /// `--max-relocate N|none`.
    pub max_relocate: Option<&'a str>,
    /// `--after UUID,…|none`.
    pub after: Option<&'a str>,
}

/// `instance set`: changes the given fields of each instance's recovery policy.
pub async fn instance_set(
    store: &Store,
    actor: &str,
    ids: &[InstanceId],
    change: &PolicyChange<'_>,
) -> anyhow::Result<Reply> {
    let PolicyChange { priority, anti_affinity, max_relocate, after } = *change;
    if priority.is_none() && anti_affinity.is_none() && max_relocate.is_none() && after.is_none() {
        bail!("instance set: nothing to change (--priority, --anti-affinity, --max-relocate, --after)");
    }
    let after: Option<Vec<InstanceId>> = match after {
        None => None,
        Some("none") => Some(Vec::new()),
        Some(list) => Some(
            list.split(',')
                .map(|u| u.trim().parse::<InstanceId>().map_err(|e| anyhow::anyhow!("--after {u:?}: {e}")))
                .collect::<anyhow::Result<_>>()?,
        ),
    };
    let max_relocate = match max_relocate {
        None => None,
        Some("none") => Some(None),
        Some(n) => Some(Some(n.parse::<u32>().map_err(|_| anyhow::anyhow!("--max-relocate {n:?}: a count or none"))?)),
    };
    if let Some(g) = anti_affinity.filter(|g| *g != "none" && !nodekeeper_store::valid_group(g)) {
        bail!("--anti-affinity {g:?}: 1 to 64 of [A-Za-z0-9_.-], or none");
    }
    let current = store.instance_policies().await?;
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        let mut p = current.get(id).cloned().ok_or(StoreError::UnknownInstance(*id))?;
        if let Some(v) = priority {
            p.priority = v;
        }
        if let Some(g) = anti_affinity {
            p.anti_affinity = (g != "none").then(|| g.to_owned());
        }
        if let Some(m) = max_relocate {
            p.max_relocate = m;
        }
        if let Some(a) = &after {
            p.after = a.clone();
        }
        items.push((*id, p));
    }
    store.set_instance_policies(&items, actor).await?;
    let value: Vec<_> = items.iter().map(|(id, p)| json!({ "uuid": id, "policy": p })).collect();
    Reply::new(&value, || {
        items
            .iter()
            .map(|(id, p)| {
                format!(
                    "{id}: priority {}, anti-affinity {}, max relocations {} ({} so far)\n",
                    p.priority,
                    p.anti_affinity.as_deref().unwrap_or("none"),
                    p.max_relocate.map_or("unlimited".into(), |m| m.to_string()),
                    p.relocations
                )
            })
            .collect()
    })
}

/// `instance set`: the recovery policy, the HA flag and the storage, or any of them (one
/// JSON array: per instance its `uuid` and what it now has of what was asked).
pub async fn instance_change(
    store: &Store,
    actor: &str,
    ids: &[InstanceId],
    policy: &PolicyChange<'_>,
    ha: Option<bool>,
    storage: Option<&str>,
) -> anyhow::Result<Reply> {
    let PolicyChange { priority, anti_affinity, max_relocate, after } = *policy;
    let kind = ha.is_some() || storage.is_some();
    let policies = priority.is_some() || anti_affinity.is_some() || max_relocate.is_some() || after.is_some();
    if !kind {
        return instance_set(store, actor, ids, policy).await;
    }
    let storage = storage
        .map(str::parse::<nodekeeper_store::Storage>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--storage: {e}"))?;
    let changed = store.set_instance_kind(ids, ha, storage, actor).await.map_err(unwrap_item)?;
    let mut reply = Reply::new(
        &changed.iter().map(|i| json!({ "uuid": i.uuid, "ha": i.ha, "storage": i.storage })).collect::<Vec<_>>(),
        || changed.iter().map(|i| format!("{}: ha {}, storage {}\n", i.uuid, yes_no(i.ha), i.storage)).collect(),
    )?;
    if policies {
        let more = instance_set(store, actor, ids, policy).await?;
        if let (Some(a), Some(b)) = (reply.json.as_array_mut(), more.json.as_array()) {
            for (x, y) in a.iter_mut().zip(b) {
                if let (Some(x), Some(p)) = (x.as_object_mut(), y.get("policy")) {
                    x.insert("policy".into(), p.clone());
                }
            }
        }
        reply.text.push_str(&more.text);
    }
    Ok(reply)
}

/// `host remove NAME`
pub async fn host_remove(store: &Store, actor: &str, name: &HostName) -> anyhow::Result<Reply> {
    store.remove_host(name, actor).await?;
    Reply::new(&json!({ "removed": name }), || format!("host {name} removed\n"))
}

/// `host set --vcpus --memory --reserved`: the host's inventory for placement.
pub async fn host_inventory(
    store: &Store,
    actor: &str,
    name: &HostName,
    vcpus: Option<&str>,
    memory: Option<&str>,
    reserved: Option<bool>,
) -> anyhow::Result<Reply> {
    let mut inv = store.host_inventories().await?.remove(name).ok_or_else(|| StoreError::UnknownHost(name.clone()))?;
    match vcpus {
        None => {}
        Some("none") => inv.vcpus = None,
        Some(v) => inv.vcpus = Some(v.parse().map_err(|_| anyhow::anyhow!("--vcpus {v:?}: a count or none"))?),
    }
    match memory {
        None => {}
        Some("none") => inv.memory_mib = None,
        Some(m) => inv.memory_mib = Some(memory_mib(m)?),
    }
    if let Some(r) = reserved {
        inv.reserved = r;
    }
    store.set_host_inventory(name, &inv, actor).await?;
    Reply::new(&inv, || {
        format!(
            "{name}: capacity {} vCPU, {} MiB{}\n",
            inv.vcpus.map_or("unlimited".into(), |v| v.to_string()),
            inv.memory_mib.map_or("unlimited".into(), |v| v.to_string()),
            if inv.reserved { ", reserved for recovery" } else { "" }
        )
    })
}

/// `256G`, `65536M`, `1T`, or a number of MiB.
fn memory_mib(text: &str) -> anyhow::Result<u64> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().map_err(|_| anyhow::anyhow!("--memory {text:?}: e.g. 256G, 65536M or none"))?;
    let per = match unit {
        "" | "M" | "MiB" => 1,
        "G" | "GiB" => 1 << 10,
        "T" | "TiB" => 1 << 20,
        _ => bail!("--memory {text:?}: e.g. 256G, 65536M or none"),
    };
    Ok(n.saturating_mul(per))
}

/// `instance delete`
pub async fn instance_delete(store: &Store, actor: &str, ids: &[InstanceId]) -> anyhow::Result<Reply> {
    let deleted = store.delete_instances(ids, actor).await.map_err(unwrap_item)?;
    Reply::new(&deleted, || {
        table(
            &["UUID", "HOST", "GEN", "DELETED"],
            deleted
                .iter()
                .map(|o| vec![o.uuid.to_string(), o.owner.to_string(), o.generation.to_string(), yes_no(o.deleted)]),
        )
    })
}

/// `power HOST ACTION`
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PowerCommand {
    /// Power on.
    On,
    /// Hard power off.
    Off,
    /// Off, then on.
    Cycle,
    /// Report the power state.
    Status,
}

/// `power HOST on|off|cycle|status`
pub async fn power(
    store: &Store,
    actor: &str,
    config: &crate::config::BmcConfig,
    name: &HostName,
    action: PowerCommand,
) -> anyhow::Result<Reply> {
    use crate::bmc::{self, Bmc, PowerAction};
    let host = store.require_host(name).await?;
    let url = host.bmc_url.as_deref().with_context(|| format!("host {name} has no BMC (host add --bmc URL)"))?;
    let scope = bmc::CredentialScope::from(config);
    let credentials = host.bmc_credentials.as_deref().map(|r| bmc::Credentials::resolve(r, &scope)).transpose()?;
    let driver = bmc::Driver::from_url(url, credentials)?;
    let state = match action {
        PowerCommand::Status => driver.power_state().await?,
        PowerCommand::On | PowerCommand::Off | PowerCommand::Cycle => {
            let act = match action {
                PowerCommand::On => PowerAction::On,
                PowerCommand::Off => PowerAction::Off,
                _ => PowerAction::Cycle,
            };
            let state = bmc::power(&driver, act, &bmc::Policy::from(config)).await?;
            let verb = format!("{action:?}").to_lowercase();
            let event = nodekeeper_store::NewEvent::host(
                actor,
                "host.power",
                name,
                format!("power {verb} through {}: now {state}", driver.endpoint()),
            );
            store.record_event(&event).await?;
            state
        }
    };
    let value = json!({ "host": name, "bmc": driver.endpoint(), "power": state });
    Reply::new(&value, || format!("{name}: power {state}\n"))
}

/// `host mark-fenced NAME`
pub async fn mark_fenced(store: &Store, actor: &str, name: &HostName) -> anyhow::Result<Reply> {
    use crate::recovery::controller;
    let (op, started) = controller::mark_fenced(store, name, &controller::RecoveryConfig::default(), actor).await?;
    let value = json!({ "operation": op, "started": started });
    Reply::new(&value, || {
        if started {
            format!(
                "{name} is fenced (operation {}): `serve` moves its HA instances; it stays off for you to bring back\n",
                op.id
            )
        } else {
            format!("a fence of {name} already runs (operation {}, step {}); it goes on\n", op.id, op.step)
        }
    })
}

/// `host token NAME`
pub async fn host_token(store: &Store, actor: &str, name: &HostName) -> anyhow::Result<Reply> {
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    store.set_node_token(name, &crate::http::guard_api::token_hash(&token)).await?;
    store
        .record_event(&nodekeeper_store::NewEvent::host(
            actor,
            "host.node_token",
            name,
            format!("a new node token for {name} (the old one no longer works)"),
        ))
        .await?;
    Reply::new(&json!({ "host": name, "token": token }), || format!("{token}\n"))
}

/// `reimage HOST [--image NAME]`
pub async fn reimage(store: &Store, actor: &str, name: &HostName, image: Option<&str>) -> anyhow::Result<Reply> {
    use crate::reimage::{executor, machine};
    let (op, started) =
        executor::request(store, name, image, machine::Deadlines::default(), machine::Limits::default(), actor).await?;
    let value = json!({ "operation": op, "started": started });
    Reply::new(&value, || {
        if started {
            format!(
                "reimage of {name} started (operation {}); `serve` carries it out, `host show {name}` follows it\n",
                op.id
            )
        } else {
            format!("reimage of {name} already running (operation {}, step {})\n", op.id, op.step)
        }
    })
}

/// `host drain NAME [--timeout D]`: refused, changing nothing, without room for its HA
/// instances elsewhere; else a drain operation that `serve` carries out.
pub async fn host_drain(store: &Store, actor: &str, name: &HostName, timeout: Option<&str>) -> anyhow::Result<Reply> {
    use crate::recovery::drain;
    let timeout = match timeout {
        None => drain::DEFAULT_TIMEOUT,
        Some(t) => humantime::parse_duration(t).map_err(|e| anyhow::anyhow!("--timeout {t:?}: {e} (e.g. 15m)"))?,
    };
    let grace = crate::config::RecoveryConfig::default().grace;
    let (op, started) = drain::request(store, name, grace, timeout, actor).await?;
    let instances = serde_json::from_str::<drain::DrainData>(&op.data).map_or(0, |d| d.instances.len());
    let value = json!({ "operation": op, "started": started, "instances": instances });
    Reply::new(&value, || {
        if started {
            format!(
                "drain of {name} started (operation {}): its {instances} HA instance(s) stop and move, then it is in \
                 maintenance; `host show {name}` follows it\n",
                op.id
            )
        } else {
            format!("a drain of {name} already runs (operation {}, step {})\n", op.id, op.step)
        }
    })
}

/// How recent a heartbeat `host maintenance NAME off` wants: a silent host back in service
/// would be fenced at the controller's next look.
const BACK_FROM_MAINTENANCE: std::time::Duration = std::time::Duration::from_secs(15);

/// `host maintenance NAME on|off`
pub async fn host_maintenance(store: &Store, actor: &str, name: &HostName, on: bool) -> anyhow::Result<Reply> {
    use nodekeeper_store::HostState;
    let host = store.require_host(name).await?;
    if let Some(op) =
        store.latest_operation(name).await?.filter(|o| o.status == nodekeeper_store::OperationStatus::Running)
    {
        crate::conflict!(
            "host maintenance {name}: a {} of it runs (operation {}, step {}); wait for it",
            op.kind,
            op.id,
            op.step
        );
    }
    let (from, to) =
        if on { (HostState::Active, HostState::Maintenance) } else { (HostState::Maintenance, HostState::Active) };
    if host.state != from {
        crate::conflict!("host maintenance {name}: the host is {}, not {from}", host.state);
    }
    if !on {
        let now = store.now().await?;
        if let Some(hb) = host.last_heartbeat.filter(|t| now.since(*t) > BACK_FROM_MAINTENANCE) {
            crate::conflict!(
                "host maintenance {name} off: its guard last heartbeated at {hb}; a silent host back in service is \
                 fenced at once. Start its guard (or reimage it) first"
            );
        }
    }
    let why = if on { "maintenance on" } else { "maintenance off" };
    let changed = store.set_host_state_from(name, from, to, actor, why).await?;
    let host = changed.with_context(|| format!("host maintenance {name}: the host changed meanwhile; nothing done"))?;
    let unprotected =
        if on { store.instances(Some(name)).await?.iter().filter(|i| i.ha && !i.deleted).count() } else { 0 };
    let value = json!({ "host": host, "ha_instances_unprotected": unprotected });
    Reply::new(&value, || {
        let mut s = format!("{name} is {}\n", host.state);
        if unprotected > 0 {
            s.push_str(&format!(
                "{unprotected} HA instance(s) stay on it, not recovered while it is in maintenance (`host drain` moves them first)\n"
            ));
        }
        s
    })
}

/// `operation list [--host NAME] [--running] [--limit N]`: newest first.
pub async fn operation_list(
    store: &Store,
    host: Option<&HostName>,
    running: bool,
    limit: u32,
) -> anyhow::Result<Reply> {
    if let Some(h) = host {
        store.require_host(h).await?;
    }
    let ops = store.operations(host, running, limit.clamp(1, 10_000)).await?;
    Reply::new(&ops, || {
        table(
            &["ID", "KIND", "HOST", "STATUS", "STEP", "ATTEMPTS", "UPDATED", "LAST ERROR"],
            ops.iter().map(|o| {
                vec![
                    o.id.to_string(),
                    o.kind.clone(),
                    o.target.to_string(),
                    o.status.to_string(),
                    o.step.clone(),
                    o.attempts.to_string(),
                    o.updated_at.to_string(),
                    opt(o.last_error.as_ref()),
                ]
            }),
        )
    })
}

/// `operation cancel ID`: refused (409, changing nothing) unless it runs and its kind may be
/// cancelled at its step ([`crate::ops::cancel_rule`]); its runner ends it at its next step.
pub async fn operation_cancel(store: &Store, actor: &str, id: i64) -> anyhow::Result<Reply> {
    let Some(op) = store.operation(id).await? else {
        return Err(anyhow::Error::new(NotFound(format!("no operation {id}"))));
    };
    if op.status != nodekeeper_store::OperationStatus::Running {
        crate::conflict!("operation cancel {id}: the {} of {} is {} already", op.kind, op.target, op.status);
    }
    if let Err(why) = crate::ops::cancel_rule(&op.kind, &op.step) {
        crate::conflict!("operation cancel {id}: {why}");
    }
    let Some(op) = store.request_cancel(id, actor).await? else {
        crate::conflict!("operation cancel {id}: it ended meanwhile");
    };
    let value = json!({ "operation": op, "cancel_requested": true });
    Reply::new(&value, || {
        format!(
            "cancel of operation {id} ({} of {}, step {}) requested: it ends at its next step\n",
            op.kind, op.target, op.step
        )
    })
}

/// `operation show ID`
pub async fn operation_show(store: &Store, id: i64) -> anyhow::Result<Reply> {
    let Some(op) = store.operation(id).await? else {
        return Err(anyhow::Error::new(NotFound(format!("no operation {id}"))));
    };
    let events =
        store.events(&EventFilter { host: Some(op.target.clone()), limit: Some(1000), ..Default::default() }).await?;
    // Its events: those of its host since it started that name it (kinds `KIND.*`).
    let mine: Vec<_> =
        events.into_iter().filter(|e| e.at >= op.created_at && e.kind.starts_with(&format!("{}.", op.kind))).collect();
    let value = json!({ "operation": op, "events": mine });
    Reply::new(&value, || {
        let mut s = format!(
            "operation {}: {} of {}, {} at {} (attempt {}), started {}, updated {}\n",
            op.id, op.kind, op.target, op.status, op.step, op.attempts, op.created_at, op.updated_at
        );
        if let Some(e) = &op.last_error {
            s.push_str(&format!("last error: {e}\n"));
        }
        s.push('\n');
        s.push_str(&table(
            &["AT", "ACTOR", "KIND", "MESSAGE"],
            mine.iter().map(|e| vec![e.at.to_string(), e.actor.clone(), e.kind.clone(), e.message.clone()]),
        ));
        s
    })
}

/// `service add NAME --copies N [--label L]… (--unit U | --start CMD --stop CMD [--check CMD]) [--exclusive]`
pub async fn service_add(store: &Store, actor: &str, b: &ServiceAdd) -> anyhow::Result<Reply> {
    let sh = |cmd: &str| vec!["sh".to_owned(), "-c".to_owned(), cmd.to_owned()];
    let (start, stop, check) = match (&b.unit, &b.start, &b.stop) {
        (Some(unit), None, None) if b.check.is_none() => {
            if !nodekeeper_store::valid_name(unit.trim_end_matches(".service")) {
                bail!("--unit {unit:?}: a systemd unit name");
            }
            let ctl = |verb: &str| ["systemctl", verb, unit].iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
            (
                ctl("start"),
                ctl("stop"),
                Some(["systemctl", "is-active", "--quiet", unit].iter().map(|s| (*s).to_owned()).collect()),
            )
        }
        (None, Some(start), Some(stop)) => (sh(start), sh(stop), b.check.as_deref().map(sh)),
        _ => bail!("service add {}: --unit UNIT, or --start CMD and --stop CMD (and --check CMD)", b.name),
    };
    let service = nodekeeper_store::Service {
        name: b.name.clone(),
        copies: b.copies,
        labels: b.labels.clone(),
        start,
        stop,
        check,
        exclusive: b.exclusive,
    };
    let s = store.put_service(&service, actor).await?;
    Reply::new(&s, || {
        format!("service {} defined: {} cop{}\n", s.name, s.copies, if s.copies == 1 { "y" } else { "ies" })
    })
}

/// `service list`
pub async fn service_list(store: &Store) -> anyhow::Result<Reply> {
    let services = store.services().await?;
    let copies = store.service_copies(None).await?;
    let value: Vec<serde_json::Value> = services
        .iter()
        .map(|s| {
            let on: Vec<&nodekeeper_store::ServiceCopy> = copies.iter().filter(|c| c.service == s.name).collect();
            json!({ "service": s, "copies": on })
        })
        .collect();
    Reply::new(&value, || {
        table(
            &["NAME", "COPIES", "RUNS ON", "LABELS", "EXCLUSIVE"],
            services.iter().map(|s| {
                let on: Vec<String> =
                    copies.iter().filter(|c| c.service == s.name).map(|c| c.host.to_string()).collect();
                vec![
                    s.name.clone(),
                    s.copies.to_string(),
                    if on.is_empty() { "-".into() } else { on.join(", ") },
                    if s.labels.is_empty() { "-".into() } else { s.labels.join(", ") },
                    yes_no(s.exclusive),
                ]
            }),
        )
    })
}

/// `service show NAME`: its definition, and where its copies run and since when (what a
/// scheduler or load balancer reads).
pub async fn service_show(store: &Store, name: &str) -> anyhow::Result<Reply> {
    let s = store
        .services()
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| StoreError::UnknownService(name.to_owned()))?;
    let copies = store.service_copies(Some(name)).await?;
    let value = json!({ "service": s, "copies": copies });
    Reply::new(&value, || {
        let mut out = format!(
            "service {}: {} cop{}{}{}\nstart: {}\nstop: {}\ncheck: {}\n\n",
            s.name,
            s.copies,
            if s.copies == 1 { "y" } else { "ies" },
            if s.labels.is_empty() { String::new() } else { format!(", on hosts labelled {}", s.labels.join(", ")) },
            if s.exclusive { ", exclusive" } else { "" },
            s.start.join(" "),
            s.stop.join(" "),
            s.check.as_ref().map_or("-".to_owned(), |c| c.join(" "))
        );
        out.push_str(&table(
            &["SLOT", "HOST", "SINCE", "GENERATION"],
            copies
                .iter()
                .map(|c| vec![c.slot.to_string(), c.host.to_string(), c.since.to_string(), c.generation.to_string()]),
        ));
        out
    })
}

/// `service remove NAME`
pub async fn service_remove(store: &Store, actor: &str, name: &str) -> anyhow::Result<Reply> {
    store.remove_service(name, actor).await?;
    Reply::new(&json!({ "removed": name }), || format!("service {name} removed (its copies are stopped)\n"))
}

/// `host labels NAME [LABEL…] [--none]`: shows (`None`) or replaces a host's labels.
pub async fn host_labels(
    store: &Store,
    actor: &str,
    name: &HostName,
    labels: Option<Vec<String>>,
) -> anyhow::Result<Reply> {
    if let Some(l) = labels {
        store.set_host_labels(name, &l.into_iter().collect(), actor).await?;
    } else {
        store.require_host(name).await?;
    }
    let now: Vec<String> = store.host_labels().await?.remove(name).unwrap_or_default().into_iter().collect();
    Reply::new(&now, || {
        if now.is_empty() {
            format!("{name}: no labels\n")
        } else {
            format!("{name}: {}\n", now.join(", "))
        }
    })
}

/// An image as `image list|show --json` print it: `sha256` and `size` are the raw image's
/// (what its builder published), `served` the compressed file the deploy agent fetches.
fn image_json(i: &nodekeeper_store::Image, installed_on: Option<&[String]>) -> serde_json::Value {
    let mut v = json!({
        "name": i.name,
        "format": i.source_format,
        "size": i.raw_size,
        "sha256": i.raw_sha256,
        "data_bytes": i.data_bytes,
        "served": { "file": i.file, "format": "zstd", "size": i.served_size, "sha256": i.served_sha256 },
        "created_at": i.created_at,
        "last_used_at": i.last_used_at,
    });
    if let Some(hosts) = installed_on {
        v["installed_on"] = json!(hosts);
    }
    v
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// `image add NAME FILE`
pub async fn image_add(
    store: &Store,
    actor: &str,
    images_dir: &Path,
    name: &str,
    file: &Path,
    level: i32,
) -> anyhow::Result<Reply> {
    let started = Instant::now();
    let image = crate::catalogue::add(store, images_dir, name, file, level, actor).await?;
    let secs = started.elapsed().as_secs_f64();
    Reply::new(&image_json(&image, None), || {
        format!(
            "image {} added from {} in {secs:.1} s: {} raw ({} of data), served as {} (zstd), sha256 {}\n",
            image.name,
            image.source_format,
            mib(image.raw_size),
            mib(image.data_bytes),
            mib(image.served_size),
            image.raw_sha256
        )
    })
}

/// `image list`
pub async fn image_list(store: &Store) -> anyhow::Result<Reply> {
    let images = store.images().await?;
    let value: Vec<serde_json::Value> = images.iter().map(|i| image_json(i, None)).collect();
    Reply::new(&value, || {
        table(
            &["NAME", "FROM", "RAW", "DATA", "SERVED", "SHA256"],
            images.iter().map(|i| {
                vec![
                    i.name.clone(),
                    i.source_format.to_string(),
                    mib(i.raw_size),
                    mib(i.data_bytes),
                    mib(i.served_size),
                    i.raw_sha256.chars().take(16).collect(),
                ]
            }),
        )
    })
}

/// `image show NAME`
pub async fn image_show(store: &Store, name: &str) -> anyhow::Result<Reply> {
    let image = store.image(name).await?.ok_or_else(|| StoreError::UnknownImage(name.to_owned()))?;
    let hosts: Vec<String> = store
        .hosts()
        .await?
        .into_iter()
        .filter(|h| h.image.as_deref() == Some(name))
        .map(|h| h.name.to_string())
        .collect();
    Reply::new(&image_json(&image, Some(&hosts)), || {
        let rows = [
            ("name", image.name.clone()),
            ("added from", image.source_format.to_string()),
            ("raw size", format!("{} ({} bytes)", mib(image.raw_size), image.raw_size)),
            ("sha256", image.raw_sha256.clone()),
            ("data", format!("{} outside all-zero 64 KiB blocks", mib(image.data_bytes))),
            ("served", format!("{} ({}, zstd)", image.file, mib(image.served_size))),
            ("served sha256", image.served_sha256.clone()),
            ("added", image.created_at.to_string()),
            ("last used", opt(image.last_used_at)),
            ("installed on", if hosts.is_empty() { "-".into() } else { hosts.join(", ") }),
        ];
        rows.iter().map(|(k, v)| format!("{k:<14} {v}\n")).collect()
    })
}

/// `image remove NAME`
pub async fn image_remove(store: &Store, actor: &str, images_dir: &Path, name: &str) -> anyhow::Result<Reply> {
    let image = crate::catalogue::remove(store, images_dir, name, actor).await?;
    Reply::new(&json!({ "removed": image.name, "file": image.file }), || {
        format!("image {} removed ({} deleted)\n", image.name, image.file)
    })
}

/// How long a token works unless told: 90 days.
pub const TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// A new admin token for `name`: `nkt.NAME.SECRET` (256 random bits, hex). The name in it
/// lets the server find the row and logs say whose token it was, never the secret.
pub fn mint_admin_token(name: &str) -> String {
    format!("nkt.{name}.{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The name and secret of an admin token (`None`: not one).
pub fn split_admin_token(token: &str) -> Option<(&str, &str)> {
    let (name, secret) = token.strip_prefix("nkt.")?.rsplit_once('.')?;
    let hex = secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && nodekeeper_store::valid_token_name(name)).then_some((name, secret))
}

/// `token create NAME --role ROLE [--expires D|never]`: prints the token once.
pub async fn token_create(store: &Store, actor: &str, body: &TokenCreate) -> anyhow::Result<Reply> {
    let role: nodekeeper_store::Role = body.role.parse().map_err(|e| anyhow::anyhow!("--role: {e}"))?;
    let lifetime = match body.expires.as_deref() {
        None => Some(TOKEN_LIFETIME),
        Some("never") => None,
        Some(d) => Some(
            humantime::parse_duration(d).map_err(|e| anyhow::anyhow!("--expires {d:?}: {e} (e.g. 90d, 12h, never)"))?,
        ),
    };
    // By the database's clock: the one every replica checks the expiry against.
    let now = store.now().await?;
    let expires_at = lifetime
        .map(|l| {
            let ms = i64::try_from(l.as_millis()).ok().filter(|ms| *ms > 0).context("--expires: out of range")?;
            Ok::<_, anyhow::Error>(nodekeeper_store::Timestamp(now.0.saturating_add(ms)))
        })
        .transpose()?;
    if !nodekeeper_store::valid_token_name(&body.name) {
        bail!("token name {:?}: 1 to 64 of [A-Za-z0-9_.@-]", body.name);
    }
    let token = mint_admin_token(&body.name);
    let stored = store
        .create_admin_token(&body.name, role, &crate::http::guard_api::token_hash(&token), expires_at, actor)
        .await?;
    let value = json!({ "name": stored.name, "role": stored.role, "expires_at": stored.expires_at, "token": token });
    Reply::new(&value, || format!("{token}\n"))
}

/// `token list`
pub async fn token_list(store: &Store) -> anyhow::Result<Reply> {
    let tokens = store.admin_tokens().await?;
    let now = store.now().await?;
    Reply::new(&tokens, || {
        table(
            &["NAME", "ROLE", "STATE", "EXPIRES", "LAST USED", "CREATED BY"],
            tokens.iter().map(|t| {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.usable_at(now) {
                    "active"
                } else {
                    "expired"
                };
                vec![
                    t.name.clone(),
                    t.role.to_string(),
                    state.to_owned(),
                    t.expires_at.map_or_else(|| "never".to_owned(), |e| e.to_string()),
                    opt(t.last_used_at),
                    t.created_by.clone(),
                ]
            }),
        )
    })
}

/// `token revoke NAME`
pub async fn token_revoke(store: &Store, actor: &str, name: &str) -> anyhow::Result<Reply> {
    let token = store.revoke_admin_token(name, actor).await?;
    Reply::new(&token, || format!("token {name} revoked\n"))
}

/// A request the state of the fleet refuses (a host in the wrong state, an operation that
/// runs, no room): the admin API answers it 409.
#[derive(Debug)]
pub struct StateConflict(pub String);

impl std::fmt::Display for StateConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StateConflict {}

/// Something asked for that does not exist (beyond the store's own unknown host, instance,
/// image, token): the admin API answers it 404.
#[derive(Debug)]
pub struct NotFound(pub String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}

/// `bail!`, for a [`StateConflict`].
#[macro_export]
macro_rules! conflict {
    ($($t:tt)*) => {
        return Err(anyhow::Error::new($crate::admin::StateConflict(format!($($t)*))))
    };
}

/// A refused batch (a list of UUIDs): the item's own error says which one, and that nothing
/// changed. Keeps the store's error, for the admin API's status code.
#[derive(Debug)]
pub struct NothingChanged(pub StoreError);

impl std::fmt::Display for NothingChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let item = match &self.0 {
            StoreError::Item { source, .. } => source,
            e => e,
        };
        // The item's error with its causes, as `{:#}` would print them.
        let mut text = item.to_string();
        let mut cause = std::error::Error::source(item);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        write!(f, "{text}; nothing changed")
    }
}

impl std::error::Error for NothingChanged {}

fn unwrap_item(e: StoreError) -> anyhow::Error {
    anyhow::Error::new(NothingChanged(e))
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = cells.zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut headers.iter().copied());
    for row in &rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let t = table(&["A", "LONGER"], [vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]].into_iter());
        assert_eq!(t, "A    LONGER\nxyz  1\nq\n");
    }

    #[test]
    fn bmc_urls_are_checked() {
        for ok in ["redfish+https://10.0.0.5/redfish/v1/Systems/1", "ipmi://10.0.0.5:623", "http://127.0.0.1:8000"] {
            check_bmc_url(ok).expect(ok);
        }
        for bad in ["10.0.0.5", "ftp://x", "redfish://", "ipmi:/x"] {
            assert!(check_bmc_url(bad).is_err(), "{bad}");
        }
    }
}
