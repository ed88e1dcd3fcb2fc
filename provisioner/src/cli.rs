//! The command line (contract: "Provisioner admin" in DESIGN.md).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use nodekeeper_store::{BootMode, BootPath, HostName, InstanceId, MacAddr};

use crate::admin;

/// The default database: an embedded SQLite file in the current directory, created on
/// demand, so the admin commands work with no setup.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./nodekeeper.db";

/// nodekeeper's provisioner and admin tool.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-provisioner", version, about, propagate_version = true)]
pub struct Cli {
    /// Database URL: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DB.
    #[arg(long, global = true, env = "NODEKEEPER_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Send admin commands to this `serve`'s admin API (http[s]://HOST:PORT) instead of
    /// opening the database; needs --token-file.
    #[arg(long, global = true, env = "NODEKEEPER_SERVER")]
    pub server: Option<String>,

    /// The file holding the admin token (`token create`) for --server.
    #[arg(long, global = true, env = "NODEKEEPER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The CA (PEM) that signed an https --server's certificate (default: the system's).
    #[arg(long, global = true, env = "NODEKEEPER_SERVER_CA")]
    pub server_ca: Option<PathBuf>,

    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Database schema management.
    #[command(subcommand)]
    Db(DbCommand),
    /// Compute hosts.
    #[command(subcommand)]
    Host(HostCommand),
    /// Instances (VMs) and who owns them.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Operations (reimage, fence, drain, evacuate) and their steps.
    #[command(subcommand)]
    Operation(OperationCommand),
    /// The image catalogue: what a reimage writes.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Drive a host's power through its BMC; every command is confirmed by reading it back.
    Power {
        /// Host name.
        host: HostName,
        /// on | off (hard) | cycle | status
        action: PowerCommand,
    },
    /// Reimage a host over PXE (runs inside `serve`); a second request returns the running one.
    Reimage {
        /// Host name.
        host: HostName,
        /// The catalogue image to write (`image list`); default: the host's last, else node.img.
        /// A name that is not in the catalogue but a file under the images directory is
        /// written raw, as before the catalogue (deprecated: `image add` it).
        #[arg(long)]
        image: Option<String>,
    },
    /// Services with n active copies, run by the guards of the hosts the controller assigns.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Admin tokens: who may use the admin API (`--server`, the console), and as what.
    #[command(subcommand)]
    Token(TokenCommand),
    /// TLS for the API nodes use (`[http.tls]`).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Run the network-boot servers (DHCP, TFTP, HTTP) until SIGTERM.
    Serve {
        /// The provisioner's config file.
        #[arg(long, default_value = "/etc/nodekeeper/provisioner.toml")]
        config: PathBuf,
    },
}

pub use crate::admin::PowerCommand;

/// `service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Define a service (or redefine one of that name): n copies at once, spread over the
    /// active hosts that carry its labels; a copy on a failed host moves to another.
    Add {
        /// Its name.
        name: String,
        /// How many copies run at once.
        #[arg(long)]
        copies: u32,
        /// A label every host of a copy must carry (repeat for more).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// A systemd unit, started, stopped and checked with systemctl.
        #[arg(long, conflicts_with_all = ["start", "stop", "check"])]
        unit: Option<String>,
        /// The start command (`sh -c` on the host; $NK_SERVICE, $NK_SLOT, $NK_HOST are set).
        #[arg(long)]
        start: Option<String>,
        /// The stop command.
        #[arg(long)]
        stop: Option<String>,
        /// A liveness check: exits 0 while the copy runs.
        #[arg(long)]
        check: Option<String>,
        /// A copy leaves a failed host only once it is fenced: never more than n copies run.
        #[arg(long)]
        exclusive: bool,
    },
    /// List services and where their copies run.
    List,
    /// A service: its definition, and where its copies run and since when.
    Show {
        /// Its name.
        name: String,
    },
    /// Remove a service (its copies are stopped).
    Remove {
        /// Its name.
        name: String,
    },
}

/// `operation ...`
#[derive(Debug, Subcommand)]
pub enum OperationCommand {
    /// List operations, newest first.
    List {
        /// Only those of this host.
        #[arg(long)]
        host: Option<HostName>,
        /// Only running ones.
        #[arg(long)]
        running: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One operation, with its events.
    Show {
        /// Its id.
        id: i64,
    },
    /// Cancel a running operation: its runner ends it at its next step (a reimage and a
    /// drain anywhere; a fence only before its point of return, its host then in
    /// maintenance).
    Cancel {
        /// Its id.
        id: i64,
    },
}

/// `token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it once (only its digest is kept).
    Create {
        /// Its name: events name it as the actor (`token:NAME`); never reused.
        name: String,
        /// viewer (read), operator (also power, reimage, mark-fenced, drain, maintenance) or
        /// admin (everything, tokens too).
        #[arg(long)]
        role: String,
        /// How long it works: 90d, 12h, … or never.
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token: the next request with it is refused.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// `tls ...`
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make the server certificate of `[http.tls]` (and its CA, when there is none yet: an
    /// existing CA is kept, so deployed nodes keep trusting the new certificate).
    Init {
        /// The provisioner's config file (its `[http.tls]` names the files).
        #[arg(long, default_value = "/etc/nodekeeper/provisioner.toml")]
        config: PathBuf,
        /// More names or addresses for the certificate (beside the host of `public_url`).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Make a new CA even if one exists (nodes trusting the old one must be reimaged).
        #[arg(long)]
        new_ca: bool,
    },
}

/// Where `image add|remove` finds the images directory.
#[derive(Debug, clap::Args)]
pub struct ImagesDir {
    /// The images directory (`serve`'s `[http] images_dir`).
    #[arg(long, env = "NODEKEEPER_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// The provisioner's config file, read for `[http] images_dir` when --images-dir is not given.
    #[arg(long, default_value = "/etc/nodekeeper/provisioner.toml")]
    pub config: PathBuf,
}

impl ImagesDir {
    /// The directory: given, or from the config file.
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.images_dir {
            return Ok(dir.clone());
        }
        let config = crate::config::ServeConfig::load(&self.config).map_err(|e| {
            anyhow::anyhow!(
                "{e:#} (the images directory comes from --images-dir DIR or the config's [http] images_dir)"
            )
        })?;
        Ok(config.http.images_dir)
    }
}

/// `image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Add an image: raw, qcow2, or raw compressed with zstd, gzip or xz (told by its first
    /// bytes). Stored zstd-compressed under the images directory, with the raw image's sha256.
    Add {
        /// The catalogue name (`reimage --image NAME`).
        name: String,
        /// The image file.
        file: PathBuf,
        /// zstd compression level of the served form, 1 (fast) to 19 (small).
        #[arg(long, default_value_t = crate::catalogue::DEFAULT_LEVEL)]
        level: i32,
        /// Where the images directory is.
        #[command(flatten)]
        dir: ImagesDir,
    },
    /// List the catalogue.
    List,
    /// One image in detail (JSON: `sha256` is the raw image's).
    Show {
        /// The catalogue name.
        name: String,
    },
    /// Remove an image and its file (refused while a host or a running reimage uses it).
    Remove {
        /// The catalogue name.
        name: String,
        /// Where the images directory is.
        #[command(flatten)]
        dir: ImagesDir,
    },
}

/// `db ...`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Apply pending schema migrations (idempotent).
    Migrate,
    /// Make a PostgreSQL login role for HOST's guard that can do no more than the guard API
    /// (or give an existing one a new password); prints the guard's database_url once.
    GuardRole {
        /// The host whose guard uses it.
        host: HostName,
        /// The role's name (default nk_guard_HOST).
        #[arg(long)]
        role: Option<String>,
    },
}

/// `host ...`
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Register a compute host (state `active`).
    Add {
        /// Unique host name; the guard's `host` config key.
        name: HostName,
        /// The MAC address it PXE-boots from.
        #[arg(long)]
        mac: Option<MacAddr>,
        /// A fixed address on the provisioning network.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// Its BMC: redfish+https://HOST/redfish/v1/Systems/ID or ipmi://HOST:PORT.
        #[arg(long)]
        bmc: Option<String>,
        /// Where the BMC's user:password is: env:VAR or file:/path (never the secret itself).
        #[arg(long)]
        bmc_credentials: Option<String>,
        /// Which disk a reimage writes (Ironic's root-device hints): serial=, wwn=, by-path=,
        /// model=, name=, size>= (comma-separated, all must hold).
        #[arg(long)]
        root_device: Option<String>,
        /// How its firmware boots: bios, uefi or uefi-secureboot (PXE through Debian's signed
        /// shim and GRUB instead of iPXE). Unset: the BMC's override keeps the mode it has.
        #[arg(long)]
        boot_mode: Option<BootMode>,
        /// How the deploy ramdisk reaches it: pxe (DHCP and TFTP), http (UEFI HTTP boot, no
        /// TFTP) or virtual-media (a per-reimage ISO the Redfish BMC attaches; no DHCP of ours).
        #[arg(long = "boot", default_value = "pxe")]
        boot_path: BootPath,
        /// A label (which services it may run; repeat for more).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Change how a host is installed: its root-device hint and its boot mode (refused while
    /// it is being reimaged).
    Set {
        /// Host name.
        name: HostName,
        /// A new root-device hint (as for `host add`), or `none` for the smallest fixed disk.
        #[arg(long)]
        root_device: Option<String>,
        /// bios, uefi, uefi-secureboot, or `unknown`.
        #[arg(long)]
        boot_mode: Option<String>,
        /// pxe, http or virtual-media (as for `host add`).
        #[arg(long = "boot")]
        boot_path: Option<BootPath>,
        /// vCPUs it may give its instances (placement's capacity), or `none` (not limited).
        #[arg(long)]
        vcpus: Option<String>,
        /// Memory it may give its instances (e.g. 256G, 65536M), or `none`.
        #[arg(long)]
        memory: Option<String>,
        /// A reserved (standby) host: recovered instances go to reserved hosts first.
        #[arg(long)]
        reserved: Option<bool>,
    },
    /// Show or replace the switched PDU outlets a host hangs off: the fence's level after its
    /// BMC switches every one of them off, confirmed (a host with two power supplies on two
    /// PDUs has two). No URL: show them.
    Outlets {
        /// Host name.
        name: HostName,
        /// Outlets: redfish+https://PDU/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/ID or
        /// snmp://PDU[:PORT]/OUTLET[?oid=…&on=…&off=…] (APC's PowerNet-MIB by default).
        urls: Vec<String>,
        /// Where the outlets' credentials are: env:VAR or file:/path, reading user:password
        /// (SNMP: COMMUNITY: for v2c, USER:PASSWORD for v3).
        #[arg(long)]
        credentials: Option<String>,
        /// Remove every outlet (no PDU level for this host).
        #[arg(long, conflicts_with_all = ["urls", "credentials"])]
        none: bool,
    },
    /// List hosts.
    List,
    /// One host in detail, with its instance counts and recent events.
    Show {
        /// Host name.
        name: HostName,
    },
    /// Confirm that a host is powered off (pulled plug, switched PDU) when its BMC cannot
    /// say so: the host turns `fenced` and `serve`'s controller moves its HA instances.
    MarkFenced {
        /// Host name.
        name: HostName,
    },
    /// Take a host out for planned work: its HA instances are shut down cleanly by its guard
    /// and started elsewhere (never on two hosts), then it is in maintenance. Refused, changing
    /// nothing, when the rest of the cell lacks room.
    Drain {
        /// Host name.
        name: HostName,
        /// How long its instances may take to stop and move before the drain gives up.
        #[arg(long, default_value = "15m")]
        timeout: String,
    },
    /// Put a host in maintenance (nothing of it is fenced or moved) or take it out again.
    Maintenance {
        /// Host name.
        name: HostName,
        /// on | off
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Show or replace a host's labels (which services it may run). No label: show them.
    Labels {
        /// Host name.
        name: HostName,
        /// Its labels (replacing those it has).
        labels: Vec<String>,
        /// Remove every label.
        #[arg(long, conflicts_with = "labels")]
        none: bool,
    },
    /// Remove a host that is out of service (in maintenance, or never heard from) and owns
    /// nothing (no instance, tombstones included; no service copy; no running operation).
    Remove {
        /// Host name.
        name: HostName,
    },
    /// Mint a new node token for a host's guard (the guard API's credential; it replaces the
    /// old one) and print it once. Hosts installed by `reimage` get theirs at first boot;
    /// this is for hosts installed otherwise, or to rotate it.
    Token {
        /// Host name.
        name: HostName,
    },
}

/// `instance ...`
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Import instances from JSON lines (all or nothing); FILE `-` reads stdin.
    Import {
        /// One JSON object per line: {"uuid","name","host","ha","storage","generation"?,"domain_xml"?}.
        file: PathBuf,
    },
    /// List instances.
    List {
        /// Only those owned by this host.
        #[arg(long)]
        host: Option<HostName>,
    },
    /// Give instances a new owner (generation +1 each), all or nothing.
    Evacuate {
        /// The new owner; must be an active host.
        #[arg(long)]
        to: HostName,
        /// Move even when the source host is not known to be off (not fenced, nor in
        /// maintenance with the instance reported stopped): the instance MAY RUN TWICE.
        #[arg(long)]
        force: bool,
        /// Instance UUIDs.
        #[arg(required = true)]
        uuids: Vec<InstanceId>,
    },
    /// Tombstone instances: kept in the database, quarantined by any host that still has them.
    Delete {
        /// Instance UUIDs.
        #[arg(required = true)]
        uuids: Vec<InstanceId>,
    },
    /// Change instances' recovery policy (what is not given stays as it is).
    Set {
        /// Instance UUIDs.
        #[arg(required = true)]
        uuids: Vec<InstanceId>,
        /// Higher is placed, and so started, first when room is short.
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i64>,
        /// An anti-affinity group (members never share a host, also during recovery), or `none`.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Automatic recoveries allowed, or `none` (no limit).
        #[arg(long)]
        max_relocate: Option<String>,
        /// Restart order: UUIDs (comma-separated) of instances that must run before this one
        /// moves in a recovery, or `none`.
        #[arg(long)]
        after: Option<String>,
        /// Recovered elsewhere on failure (true/false).
        #[arg(long)]
        ha: Option<bool>,
        /// Where its disks live: shared, volume or local.
        #[arg(long)]
        storage: Option<String>,
    },
    /// Add one instance (an import of one line).
    Add {
        /// Its UUID (libvirt's).
        #[arg(long)]
        uuid: InstanceId,
        /// Its libvirt name.
        #[arg(long)]
        name: String,
        /// The host that owns it.
        #[arg(long)]
        host: HostName,
        /// Recovered elsewhere on failure.
        #[arg(long)]
        ha: bool,
        /// shared, volume or local.
        #[arg(long, default_value = "shared")]
        storage: String,
        /// Its libvirt domain XML (what a new owner defines it from).
        #[arg(long)]
        domain_xml: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve { config } => return serve(config).await,
        Command::Tls(TlsCommand::Init { config, names, new_ca }) => {
            return admin::tls_init(config, names, *new_ca)?.print(cli.json)
        }
        _ => {}
    }
    let call = to_call(&cli.command)?;
    if let Some(server) = &cli.server {
        let Some(call) = call else {
            bail!("this command works on the provisioner's own database or files: run it there, without --server");
        };
        let remote = crate::remote::Remote::new(server, cli.token_file.as_deref(), cli.server_ca.as_deref())?;
        let reply = remote.call(&call, cli.json).await?;
        return reply.print(cli.json);
    }
    let migrate_only = matches!(cli.command, Command::Db(DbCommand::Migrate));
    let store = admin::open_store(&cli.database_url, migrate_only).await?;
    let actor = admin::local_actor();
    let result = match (call, cli.command) {
        (Some(call), _) => {
            let bmc = crate::config::BmcConfig::default();
            call.run(admin::Ctx { store: &store, actor: &actor, bmc: &bmc }).await
        }
        (None, Command::Db(DbCommand::Migrate)) => admin::db_migrate(&store).await,
        (None, Command::Db(DbCommand::GuardRole { host, role })) => {
            admin::db_guard_role(&store, &cli.database_url, &host, role.as_deref()).await
        }
        (None, Command::Image(ImageCommand::Add { name, file, level, dir })) => match dir.resolve() {
            Ok(d) => admin::image_add(&store, &actor, &d, &name, &file, level).await,
            Err(e) => Err(e),
        },
        (None, Command::Image(ImageCommand::Remove { name, dir })) => match dir.resolve() {
            Ok(d) => admin::image_remove(&store, &actor, &d, &name).await,
            Err(e) => Err(e),
        },
        (None, _) => unreachable!("every other command is a call"),
    };
    store.close().await;
    result?.print(cli.json)
}

/// The command as an admin [`admin::Call`]; `None` for those that only work on the
/// provisioner itself (the schema, database roles, the images directory).
fn to_call(command: &Command) -> anyhow::Result<Option<admin::Call>> {
    use admin::Call;
    Ok(Some(match command {
        Command::Db(_) | Command::Image(ImageCommand::Add { .. } | ImageCommand::Remove { .. }) => return Ok(None),
        Command::Serve { .. } | Command::Tls(_) => return Ok(None),
        Command::Host(HostCommand::Add {
            name,
            mac,
            ip,
            bmc,
            bmc_credentials,
            root_device,
            boot_mode,
            boot_path,
            labels,
        }) => Call::HostAdd(admin::HostAdd {
            name: name.clone(),
            mac: *mac,
            ip: *ip,
            bmc: bmc.clone(),
            bmc_credentials: bmc_credentials.clone(),
            root_device: root_device.clone(),
            boot_mode: boot_mode.map(|m| m.to_string()),
            boot: Some(boot_path.to_string()),
            labels: labels.clone(),
        }),
        Command::Host(HostCommand::Set { name, root_device, boot_mode, boot_path, vcpus, memory, reserved }) => {
            Call::HostSet(
                name.clone(),
                admin::HostSet {
                    root_device: root_device.clone(),
                    boot_mode: boot_mode.clone(),
                    boot: boot_path.map(|p| p.to_string()),
                    vcpus: vcpus.clone(),
                    memory: memory.clone(),
                    reserved: *reserved,
                },
            )
        }
        Command::Host(HostCommand::Outlets { name, urls, credentials, none }) => {
            if urls.is_empty() && !none {
                if credentials.is_some() {
                    bail!("host outlets {name}: --credentials goes with the outlets' URLs");
                }
                Call::HostOutlets(name.clone(), None)
            } else {
                Call::HostOutlets(
                    name.clone(),
                    Some(admin::Outlets { urls: urls.clone(), credentials: credentials.clone() }),
                )
            }
        }
        Command::Host(HostCommand::List) => Call::HostList,
        Command::Host(HostCommand::Show { name }) => Call::HostShow(name.clone()),
        Command::Host(HostCommand::MarkFenced { name }) => Call::MarkFenced(name.clone()),
        Command::Host(HostCommand::Token { name }) => Call::HostToken(name.clone()),
        Command::Host(HostCommand::Remove { name }) => Call::HostRemove(name.clone()),
        Command::Host(HostCommand::Drain { name, timeout }) => {
            Call::HostDrain(name.clone(), admin::Drain { timeout: Some(timeout.clone()) })
        }
        Command::Host(HostCommand::Maintenance { name, state }) => Call::HostMaintenance(name.clone(), state == "on"),
        Command::Power { host, action } => Call::Power(host.clone(), *action),
        Command::Reimage { host, image } => Call::Reimage(host.clone(), admin::Reimage { image: image.clone() }),
        Command::Operation(OperationCommand::List { host, running, limit }) => {
            Call::OperationList(host.clone(), *running, *limit)
        }
        Command::Operation(OperationCommand::Show { id }) => Call::OperationShow(*id),
        Command::Operation(OperationCommand::Cancel { id }) => Call::OperationCancel(*id),
        Command::Image(ImageCommand::List) => Call::ImageList,
        Command::Image(ImageCommand::Show { name }) => Call::ImageShow(name.clone()),
        Command::Instance(InstanceCommand::Import { file }) => {
            Call::InstanceImport(file.display().to_string(), admin::read_import_file(file)?)
        }
        Command::Instance(InstanceCommand::List { host }) => Call::InstanceList(host.clone()),
        Command::Instance(InstanceCommand::Evacuate { to, force, uuids }) => {
            Call::InstanceEvacuate(admin::Evacuate { to: to.clone(), force: *force, uuids: uuids.clone() })
        }
        Command::Instance(InstanceCommand::Delete { uuids }) => {
            Call::InstanceDelete(admin::Uuids { uuids: uuids.clone() })
        }
        Command::Instance(InstanceCommand::Set {
            uuids,
            priority,
            anti_affinity,
            max_relocate,
            after,
            ha,
            storage,
        }) => Call::InstanceSet(admin::InstanceSet {
            uuids: uuids.clone(),
            priority: *priority,
            anti_affinity: anti_affinity.clone(),
            max_relocate: max_relocate.clone(),
            after: after.clone(),
            ha: *ha,
            storage: storage.clone(),
        }),
        Command::Instance(InstanceCommand::Add { uuid, name, host, ha, storage, domain_xml }) => {
            let xml = match domain_xml {
                Some(f) => {
                    Some(std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?)
                }
                None => None,
            };
            let line = serde_json::json!({
                "uuid": uuid, "name": name, "host": host, "ha": ha, "storage": storage, "domain_xml": xml,
            });
            Call::InstanceImport("instance add".into(), format!("{line}\n"))
        }
        Command::Token(TokenCommand::Create { name, role, expires }) => Call::TokenCreate(admin::TokenCreate {
            name: name.clone(),
            role: role.clone(),
            expires: Some(expires.clone()),
        }),
        Command::Token(TokenCommand::List) => Call::TokenList,
        Command::Service(ServiceCommand::Add { name, copies, labels, unit, start, stop, check, exclusive }) => {
            Call::ServiceAdd(admin::ServiceAdd {
                name: name.clone(),
                copies: *copies,
                labels: labels.clone(),
                unit: unit.clone(),
                start: start.clone(),
                stop: stop.clone(),
                check: check.clone(),
                exclusive: *exclusive,
            })
        }
        Command::Service(ServiceCommand::List) => Call::ServiceList,
        Command::Service(ServiceCommand::Show { name }) => Call::ServiceShow(name.clone()),
        Command::Service(ServiceCommand::Remove { name }) => Call::ServiceRemove(name.clone()),
        Command::Host(HostCommand::Labels { name, labels, none }) => {
            if labels.is_empty() && !none {
                Call::HostLabels(name.clone(), None)
            } else {
                Call::HostLabels(name.clone(), Some(admin::Labels { labels: labels.clone() }))
            }
        }
        Command::Token(TokenCommand::Revoke { name }) => Call::TokenRevoke(name.clone()),
    }))
}

/// `serve --config FILE`: the database URL comes from the config file.
async fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    use crate::serve;
    let config = crate::config::ServeConfig::load(path)?;
    let store = serve::open_store(&config.database_url).await?;
    let bound = serve::Bound::bind(&config).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    serve::cancel_on_signals(shutdown.clone())?;
    serve::run(config, bound, store, shutdown).await
}
