//! Every admin command that can go through the admin API, as a value. The local CLI runs a
//! [`Call`] on the database; the remote CLI (`--server`) sends it as [`Call::request`] says;
//! `serve`'s admin API turns the request back into the same `Call` and runs the same code,
//! answering the command's JSON (or, asked for `text/plain`, its text) — so both CLIs print
//! the same, and the role a call needs is decided in one place ([`Call::role`]).

use std::net::IpAddr;

use nodekeeper_store::{HostName, InstanceId, MacAddr, Role, Store};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PowerCommand, Reply};

/// `POST /api/v1/hosts`: `host add`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostAdd {
    /// Unique host name (the guard's `host`).
    #[schemars(with = "String")]
    pub name: HostName,
    /// The MAC address it PXE-boots from.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub mac: Option<MacAddr>,
    /// A fixed address on the provisioning network.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Its BMC: `redfish+https://HOST/redfish/v1/Systems/ID` or `ipmi://HOST:PORT`.
    #[serde(default)]
    pub bmc: Option<String>,
    /// Where the BMC's credentials are: `env:VAR` or `file:/path`.
    #[serde(default)]
    pub bmc_credentials: Option<String>,
    /// Root-device hint: `serial=`, `wwn=`, `by-path=`, `model=`, `name=`, `size>=`.
    #[serde(default)]
    pub root_device: Option<String>,
    /// `bios`, `uefi` or `uefi-secureboot`.
    #[serde(default)]
    pub boot_mode: Option<String>,
    /// `pxe` (default), `http` or `virtual-media`.
    #[serde(default)]
    pub boot: Option<String>,
    /// Its labels (which services it may run).
    #[serde(default)]
    pub labels: Vec<String>,
}

/// `PATCH /api/v1/hosts/{name}`: `host set` (what is absent stays as it is).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSet {
    /// A root-device hint, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_device: Option<String>,
    /// `bios`, `uefi`, `uefi-secureboot` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<String>,
    /// `pxe`, `http` or `virtual-media`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    /// vCPUs for placement, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<String>,
    /// Memory for placement (`256G`, `65536M`), or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// A reserved (standby) host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<bool>,
}

/// `PUT /api/v1/hosts/{name}/outlets`: `host outlets NAME URL… [--credentials REF] | --none`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Outlets {
    /// The outlets' URLs; empty: the host has no PDU level.
    pub urls: Vec<String>,
    /// Where their credentials are.
    #[serde(default)]
    pub credentials: Option<String>,
}

/// `POST /api/v1/hosts/{name}/power`: `power HOST on|off|cycle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Power {
    /// `on`, `off` (hard) or `cycle`.
    pub action: String,
}

/// `POST /api/v1/hosts/{name}/reimage`: `reimage HOST [--image NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reimage {
    /// The catalogue image (default: the host's last, else node.img).
    #[serde(default)]
    pub image: Option<String>,
}

/// `POST /api/v1/hosts/{name}/drain`: `host drain NAME [--timeout D]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// How long its HA instances may take to stop and move (`15m` by default).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `POST /api/v1/hosts/{name}/maintenance`: `host maintenance NAME on|off`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// `on` or `off`.
    pub state: String,
}

/// `POST /api/v1/instances/evacuate`: `instance evacuate --to HOST [--force] UUID…`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Evacuate {
    /// The new owner (an active host).
    #[schemars(with = "String")]
    pub to: HostName,
    /// Move even when the source host is not known to be off: the instance MAY RUN TWICE.
    #[serde(default)]
    pub force: bool,
    /// The instances.
    #[schemars(with = "Vec<String>")]
    pub uuids: Vec<InstanceId>,
}

/// `POST /api/v1/instances/delete`: `instance delete UUID…`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Uuids {
    /// The instances.
    #[schemars(with = "Vec<String>")]
    pub uuids: Vec<InstanceId>,
}

/// `PATCH /api/v1/instances`: `instance set UUID… [--priority …]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSet {
    /// The instances.
    #[schemars(with = "Vec<String>")]
    pub uuids: Vec<InstanceId>,
    /// Higher is placed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// An anti-affinity group, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// Automatic recoveries allowed, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_relocate: Option<String>,
    /// UUIDs (comma-separated) that must run first, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Recovered elsewhere on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<bool>,
    /// `shared`, `volume` or `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// `POST /api/v1/tokens`: `token create NAME --role ROLE [--expires D]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// The token's name (`token:NAME` in events).
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// How long it works (`90d`, `12h`), or `never`; default 90 days.
    #[serde(default)]
    pub expires: Option<String>,
}

/// `POST /api/v1/services`: `service add NAME …` (a service of that name is redefined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAdd {
    /// Its name: 1 to 64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// How many copies run at once.
    pub copies: u32,
    /// Labels every host of a copy must carry.
    #[serde(default)]
    pub labels: Vec<String>,
    /// A systemd unit: started, stopped and checked with `systemctl` (instead of commands).
    #[serde(default)]
    pub unit: Option<String>,
    /// Start command (run by `sh -c` on the host; `$NK_SERVICE`, `$NK_SLOT`, `$NK_HOST` set).
    #[serde(default)]
    pub start: Option<String>,
    /// Stop command.
    #[serde(default)]
    pub stop: Option<String>,
    /// Liveness check: exits 0 while the copy runs.
    #[serde(default)]
    pub check: Option<String>,
    /// A copy leaves a failed host only once it is fenced (never more than `copies` run).
    #[serde(default)]
    pub exclusive: bool,
}

/// `PUT /api/v1/hosts/{name}/labels`: `host labels NAME LABEL… | --none`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    /// The host's labels (replacing those it has).
    pub labels: Vec<String>,
}

/// An admin command.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `host add`
    HostAdd(HostAdd),
    /// `host set`
    HostSet(HostName, HostSet),
    /// `host outlets` (none: show them)
    HostOutlets(HostName, Option<Outlets>),
    /// `host list`
    HostList,
    /// `host show`
    HostShow(HostName),
    /// `host mark-fenced`
    MarkFenced(HostName),
    /// `host remove`
    HostRemove(HostName),
    /// `host token`
    HostToken(HostName),
    /// `power HOST ACTION`
    Power(HostName, PowerCommand),
    /// `reimage`
    Reimage(HostName, Reimage),
    /// `host drain`
    HostDrain(HostName, Drain),
    /// `host maintenance NAME on|off` (`true`: on)
    HostMaintenance(HostName, bool),
    /// `instance import`: where the lines came from, and the lines.
    InstanceImport(String, String),
    /// `instance list [--host]`
    InstanceList(Option<HostName>),
    /// `instance evacuate`
    InstanceEvacuate(Evacuate),
    /// `instance delete`
    InstanceDelete(Uuids),
    /// `instance set`
    InstanceSet(InstanceSet),
    /// `operation list [--host NAME] [--running] [--limit N]`
    OperationList(Option<HostName>, bool, u32),
    /// `operation show ID`
    OperationShow(i64),
    /// `operation cancel ID`
    OperationCancel(i64),
    /// `image list`
    ImageList,
    /// `image show`
    ImageShow(String),
    /// `service add`
    ServiceAdd(ServiceAdd),
    /// `service list`
    ServiceList,
    /// `service show`
    ServiceShow(String),
    /// `service remove`
    ServiceRemove(String),
    /// `host labels NAME [LABEL…]` (none: show them)
    HostLabels(HostName, Option<Labels>),
    /// `token create`
    TokenCreate(TokenCreate),
    /// `token list`
    TokenList,
    /// `token revoke`
    TokenRevoke(String),
}

/// A request body of the admin API.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// None.
    Empty,
    /// JSON.
    Json(serde_json::Value),
    /// JSON lines (`application/x-ndjson`): an instance import.
    Lines(String),
}

/// How the remote CLI sends a call.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// GET, POST, PUT, PATCH or DELETE.
    pub method: &'static str,
    /// The path under the server's URL, query included.
    pub path: String,
    /// The body.
    pub body: Body,
}

/// What the API needs of `serve` to run a call.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The database.
    pub store: &'a Store,
    /// Who acts: `cli:USER` locally, `token:NAME` through the API.
    pub actor: &'a str,
    /// How power commands are confirmed and where BMC credentials may be read from.
    pub bmc: &'a crate::config::BmcConfig,
}

fn json<T: Serialize>(value: &T) -> Body {
    Body::Json(serde_json::to_value(value).unwrap_or_default())
}

/// `a b` → `a%20b`: the path segments the CLI puts in a URL (names are checked on the server).
fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

impl Call {
    /// The least role that may make this call.
    pub fn role(&self) -> Role {
        match self {
            Call::HostList
            | Call::HostShow(_)
            | Call::HostOutlets(_, None)
            | Call::InstanceList(_)
            | Call::ImageList
            | Call::ImageShow(_)
            | Call::OperationList(..)
            | Call::OperationShow(_)
            | Call::ServiceList
            | Call::ServiceShow(_)
            | Call::HostLabels(_, None) => Role::Viewer,
            Call::MarkFenced(_)
            | Call::Power(..)
            | Call::Reimage(..)
            | Call::HostDrain(..)
            | Call::HostMaintenance(..)
            | Call::OperationCancel(_) => Role::Operator,
            Call::HostAdd(_)
            | Call::HostSet(..)
            | Call::HostOutlets(_, Some(_))
            | Call::HostToken(_)
            | Call::HostRemove(_)
            | Call::InstanceImport(..)
            | Call::InstanceEvacuate(_)
            | Call::InstanceDelete(_)
            | Call::InstanceSet(_)
            | Call::ServiceAdd(_)
            | Call::ServiceRemove(_)
            | Call::HostLabels(_, Some(_))
            | Call::TokenCreate(_)
            | Call::TokenList
            | Call::TokenRevoke(_) => Role::Admin,
        }
    }

    /// The HTTP request that makes this call (see the routes in `http::admin_api`).
    pub fn request(&self) -> Request {
        let host = |n: &HostName| format!("/api/v1/hosts/{}", seg(n.as_str()));
        let (method, path, body) = match self {
            Call::HostAdd(b) => ("POST", "/api/v1/hosts".to_owned(), json(b)),
            Call::HostSet(n, b) => ("PATCH", host(n), json(b)),
            Call::HostOutlets(n, None) => ("GET", format!("{}/outlets", host(n)), Body::Empty),
            Call::HostOutlets(n, Some(b)) => ("PUT", format!("{}/outlets", host(n)), json(b)),
            Call::HostList => ("GET", "/api/v1/hosts".to_owned(), Body::Empty),
            Call::HostShow(n) => ("GET", format!("{}/details", host(n)), Body::Empty),
            Call::MarkFenced(n) => ("POST", format!("{}/mark-fenced", host(n)), Body::Empty),
            Call::HostToken(n) => ("POST", format!("{}/token", host(n)), Body::Empty),
            Call::HostRemove(n) => ("DELETE", host(n), Body::Empty),
            Call::Power(n, PowerCommand::Status) => ("GET", format!("{}/power", host(n)), Body::Empty),
            Call::Power(n, action) => {
                let action = format!("{action:?}").to_lowercase();
                ("POST", format!("{}/power", host(n)), json(&Power { action }))
            }
            Call::Reimage(n, b) => ("POST", format!("{}/reimage", host(n)), json(b)),
            Call::HostDrain(n, b) => ("POST", format!("{}/drain", host(n)), json(b)),
            Call::HostMaintenance(n, on) => {
                let state = if *on { "on" } else { "off" }.to_owned();
                ("POST", format!("{}/maintenance", host(n)), json(&Maintenance { state }))
            }
            Call::InstanceImport(_, lines) => {
                ("POST", "/api/v1/instances/import".to_owned(), Body::Lines(lines.clone()))
            }
            Call::InstanceList(None) => ("GET", "/api/v1/instances".to_owned(), Body::Empty),
            Call::InstanceList(Some(h)) => ("GET", format!("/api/v1/instances?host={}", seg(h.as_str())), Body::Empty),
            Call::InstanceEvacuate(b) => ("POST", "/api/v1/instances/evacuate".to_owned(), json(b)),
            Call::InstanceDelete(b) => ("POST", "/api/v1/instances/delete".to_owned(), json(b)),
            Call::InstanceSet(b) => ("PATCH", "/api/v1/instances".to_owned(), json(b)),
            Call::OperationList(h, running, limit) => {
                let mut q = format!("/api/v1/operations?limit={limit}");
                if let Some(h) = h {
                    q.push_str(&format!("&host={}", seg(h.as_str())));
                }
                if *running {
                    q.push_str("&running=true");
                }
                ("GET", q, Body::Empty)
            }
            Call::OperationShow(id) => ("GET", format!("/api/v1/operations/{id}"), Body::Empty),
            Call::OperationCancel(id) => ("POST", format!("/api/v1/operations/{id}/cancel"), Body::Empty),
            Call::ImageList => ("GET", "/api/v1/images".to_owned(), Body::Empty),
            Call::ImageShow(n) => ("GET", format!("/api/v1/images/{}", seg(n)), Body::Empty),
            Call::ServiceAdd(b) => ("POST", "/api/v1/services".to_owned(), json(b)),
            Call::ServiceList => ("GET", "/api/v1/services".to_owned(), Body::Empty),
            Call::ServiceShow(n) => ("GET", format!("/api/v1/services/{}", seg(n)), Body::Empty),
            Call::ServiceRemove(n) => ("DELETE", format!("/api/v1/services/{}", seg(n)), Body::Empty),
            Call::HostLabels(n, None) => ("GET", format!("{}/labels", host(n)), Body::Empty),
            Call::HostLabels(n, Some(b)) => ("PUT", format!("{}/labels", host(n)), json(b)),
            Call::TokenCreate(b) => ("POST", "/api/v1/tokens".to_owned(), json(b)),
            Call::TokenList => ("GET", "/api/v1/tokens".to_owned(), Body::Empty),
            Call::TokenRevoke(n) => ("DELETE", format!("/api/v1/tokens/{}", seg(n)), Body::Empty),
        };
        Request { method, path, body }
    }

    /// Runs the call on the database.
    pub async fn run(self, cx: Ctx<'_>) -> anyhow::Result<Reply> {
        use super::*;
        let Ctx { store, actor, bmc } = cx;
        match self {
            Call::HostAdd(b) => {
                let boot_mode = b
                    .boot_mode
                    .as_deref()
                    .map(|m| m.parse())
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("boot_mode: {e}"))?;
                let boot_path =
                    b.boot.as_deref().map(|p| p.parse()).transpose().map_err(|e| anyhow::anyhow!("boot: {e}"))?;
                let new =
                    NewHost { name: b.name, mac: b.mac, ip: b.ip, bmc_url: b.bmc, bmc_credentials: b.bmc_credentials };
                if let Some(l) = b.labels.iter().find(|l| !nodekeeper_store::valid_name(l)) {
                    anyhow::bail!("--label {l:?}: 1 to 64 of [A-Za-z0-9_.-]");
                }
                let name = new.name.clone();
                let root_device = b.root_device.as_deref();
                let reply =
                    host_add(store, actor, bmc, new, root_device, boot_mode, boot_path.unwrap_or_default()).await?;
                if !b.labels.is_empty() {
                    store.set_host_labels(&name, &b.labels.iter().cloned().collect(), actor).await?;
                }
                Ok(reply)
            }
            Call::HostSet(name, b) => host_change(store, actor, &name, &b).await,
            Call::HostOutlets(name, change) => {
                let (urls, credentials, none) = match &change {
                    None => (&[][..], None, false),
                    Some(o) => (&o.urls[..], o.credentials.as_deref(), o.urls.is_empty()),
                };
                host_outlets(store, actor, bmc, &name, urls, credentials, none).await
            }
            Call::HostList => host_list(store).await,
            Call::HostShow(name) => host_show(store, &name).await,
            Call::MarkFenced(name) => mark_fenced(store, actor, &name).await,
            Call::HostToken(name) => host_token(store, actor, &name).await,
            Call::HostRemove(name) => host_remove(store, actor, &name).await,
            Call::Power(name, action) => power(store, actor, bmc, &name, action).await,
            Call::Reimage(name, b) => reimage(store, actor, &name, b.image.as_deref()).await,
            Call::HostDrain(name, b) => host_drain(store, actor, &name, b.timeout.as_deref()).await,
            Call::HostMaintenance(name, on) => host_maintenance(store, actor, &name, on).await,
            Call::InstanceImport(source, lines) => instance_import(store, actor, &source, &lines).await,
            Call::InstanceList(host) => instance_list(store, host.as_ref()).await,
            Call::InstanceEvacuate(b) => instance_evacuate(store, actor, &b.to, b.force, &b.uuids).await,
            Call::InstanceDelete(b) => instance_delete(store, actor, &b.uuids).await,
            Call::InstanceSet(b) => {
                let change = PolicyChange {
                    priority: b.priority,
                    anti_affinity: b.anti_affinity.as_deref(),
                    max_relocate: b.max_relocate.as_deref(),
                    after: b.after.as_deref(),
                };
                instance_change(store, actor, &b.uuids, &change, b.ha, b.storage.as_deref()).await
            }
            Call::OperationList(h, running, limit) => operation_list(store, h.as_ref(), running, limit).await,
            Call::OperationShow(id) => operation_show(store, id).await,
            Call::OperationCancel(id) => operation_cancel(store, actor, id).await,
            Call::ImageList => image_list(store).await,
            Call::ImageShow(name) => image_show(store, &name).await,
            Call::ServiceAdd(b) => service_add(store, actor, &b).await,
            Call::ServiceList => service_list(store).await,
            Call::ServiceShow(name) => service_show(store, &name).await,
            Call::ServiceRemove(name) => service_remove(store, actor, &name).await,
            Call::HostLabels(name, labels) => host_labels(store, actor, &name, labels.map(|l| l.labels)).await,
            Call::TokenCreate(b) => token_create(store, actor, &b).await,
            Call::TokenList => token_list(store).await,
            Call::TokenRevoke(name) => token_revoke(store, actor, &name).await,
        }
    }
}

/// `power` actions by name (the API's body).
pub fn power_action(name: &str) -> Option<PowerCommand> {
    match name {
        "on" => Some(PowerCommand::On),
        "off" => Some(PowerCommand::Off),
        "cycle" => Some(PowerCommand::Cycle),
        _ => None,
    }
}
