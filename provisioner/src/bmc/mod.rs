//! Host power through baseboard management controllers: one [`Bmc`] trait, a Redfish and an
//! IPMI driver behind it. Every command is confirmed by reading the power state back (some
//! BMCs accept a command and do nothing), retried with backoff within a deadline, and
//! serialized per BMC (BMCs handle concurrent sessions badly). Credentials are never logged.

pub mod fake;
pub mod ipmi;
pub mod pdu;
pub mod redfish;
pub mod snmp;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nodekeeper_store::BootMode;
use serde::Serialize;

/// A host's power as its BMC reports it. Only [`PowerState::Off`] proves a host is off (a
/// fence is confirmed by nothing else): a host that is powering on or off, or whose BMC says
/// something we do not know, may be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Powered on.
    On,
    /// Powered off.
    Off,
    /// On its way up (Redfish `PoweringOn`): it may be running already.
    PoweringOn,
    /// On its way down (Redfish `PoweringOff`): it may still be running.
    PoweringOff,
    /// The BMC answered with a state we do not know (Redfish `Paused`, an empty or vendor
    /// value, an IPMI answer that is neither on nor off).
    Unknown,
}

impl PowerState {
    /// Redfish's `PowerState` property (DSP0268 `Resource.PowerState`). Anything but the four
    /// defined values is [`PowerState::Unknown`].
    pub fn from_redfish(value: Option<&str>) -> PowerState {
        match value {
            Some("On") => PowerState::On,
            Some("Off") => PowerState::Off,
            Some("PoweringOn") => PowerState::PoweringOn,
            Some("PoweringOff") => PowerState::PoweringOff,
            _ => PowerState::Unknown,
        }
    }

    /// `ipmitool chassis power status`: "Chassis Power is on|off"; anything else is unknown.
    pub fn from_ipmitool(out: &str) -> PowerState {
        match out.trim().to_ascii_lowercase().strip_prefix("chassis power is ").map(str::trim) {
            Some("on") => PowerState::On,
            Some("off") => PowerState::Off,
            _ => PowerState::Unknown,
        }
    }
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
            PowerState::PoweringOn => "powering_on",
            PowerState::PoweringOff => "powering_off",
            PowerState::Unknown => "unknown",
        })
    }
}

/// What to ask of a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Power on.
    On,
    /// Hard power off (a fence must not wait for the OS).
    Off,
    /// Off, then on.
    Cycle,
}

/// Where a one-time boot override sends the host (Redfish `BootSourceOverrideTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootTarget {
    /// The firmware's PXE (`Pxe`).
    Pxe,
    /// The firmware's UEFI HTTP boot (`UefiHttp`).
    UefiHttp,
    /// The (virtual) CD (`Cd`).
    Cd,
}

impl BootTarget {
    /// The target a boot path uses.
    pub fn of(path: nodekeeper_store::BootPath) -> BootTarget {
        match path {
            nodekeeper_store::BootPath::Pxe => BootTarget::Pxe,
            nodekeeper_store::BootPath::Http => BootTarget::UefiHttp,
            nodekeeper_store::BootPath::VirtualMedia => BootTarget::Cd,
        }
    }

    /// Redfish's word for it.
    pub fn redfish(self) -> &'static str {
        match self {
            BootTarget::Pxe => "Pxe",
            BootTarget::UefiHttp => "UefiHttp",
            BootTarget::Cd => "Cd",
        }
    }
}

/// What went wrong talking to a BMC. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    /// The BMC URL or credentials reference cannot be used.
    #[error("BMC configuration: {0}")]
    Config(String),
    /// The BMC could not be reached or did not answer in time.
    #[error("BMC {endpoint} unreachable: {reason}")]
    Unreachable {
        /// Where (no credentials).
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The BMC answered with an error.
    #[error("BMC {endpoint} refused: {reason}")]
    Refused {
        /// Where.
        endpoint: String,
        /// What it said.
        reason: String,
    },
    /// The BMC cannot do what the host's settings need (no such boot target, no virtual
    /// media): not worth a retry.
    #[error("BMC {endpoint} cannot do it: {reason}")]
    Unsupported {
        /// Where.
        endpoint: String,
        /// Why, in the BMC's words where it has them.
        reason: String,
    },
    /// This replica no longer holds the lease it acted under: the command was not sent.
    #[error("not sent to BMC {endpoint}: {reason}")]
    NotLeader {
        /// Where it would have gone.
        endpoint: String,
        /// The lease's loss, as the database said it.
        reason: String,
    },
    /// The command was accepted but the power state never followed. `actual` is what the BMC
    /// said last (`unknown` if it never answered).
    #[error("BMC {endpoint}: power is still {actual} {waited:?} after asking for {wanted}")]
    NotConfirmed {
        /// Where.
        endpoint: String,
        /// What was asked.
        wanted: PowerState,
        /// What it still is.
        actual: PowerState,
        /// How long we waited.
        waited: Duration,
    },
}

/// What [`power`] drives: a BMC, or a switched PDU outlet ([`pdu::Outlet`]). Every BMC is one.
pub trait Switch: Send + Sync {
    /// Where it is, for messages (never with credentials).
    fn switch_endpoint(&self) -> String;
    /// The current power state.
    fn read_power(&self) -> impl Future<Output = Result<PowerState, BmcError>> + Send;
    /// Asks for power on or off (not confirmed).
    fn switch_power(&self, on: bool) -> impl Future<Output = Result<(), BmcError>> + Send;
}

impl<B: Bmc> Switch for B {
    fn switch_endpoint(&self) -> String {
        self.endpoint()
    }
    fn read_power(&self) -> impl Future<Output = Result<PowerState, BmcError>> + Send {
        self.power_state()
    }
    fn switch_power(&self, on: bool) -> impl Future<Output = Result<(), BmcError>> + Send {
        self.set_power(on)
    }
}

/// The operations every BMC driver provides. Each call is one attempt; [`power`] adds the
/// confirmation, retries and per-BMC serialization.
pub trait Bmc: Send + Sync {
    /// Where it is, for messages (never with credentials).
    fn endpoint(&self) -> String;
    /// The current power state.
    fn power_state(&self) -> impl Future<Output = Result<PowerState, BmcError>> + Send;
    /// Asks for power on or off (not confirmed).
    fn set_power(&self, on: bool) -> impl Future<Output = Result<(), BmcError>> + Send;
    /// Boot `target` once, at the next power-on; in firmware mode `mode` when known.
    fn set_boot_once(
        &self,
        target: BootTarget,
        mode: Option<BootMode>,
    ) -> impl Future<Output = Result<(), BmcError>> + Send;
    /// Whether the BMC can send the host to `target` at all, asked before anything is changed
    /// (a reimage checks it before it powers the host off): an error says why not, in the
    /// BMC's words where it has them.
    fn check_boot(&self, target: BootTarget) -> impl Future<Output = Result<(), BmcError>> + Send;
    /// UEFI HTTP boot once, from `uri` (Redfish `HttpBootUri`): the firmware fetches it itself,
    /// whatever the DHCP server says.
    fn set_http_boot_uri_once(
        &self,
        uri: &str,
        mode: Option<BootMode>,
    ) -> impl Future<Output = Result<(), BmcError>> + Send;
    /// Whether the BMC takes `HttpBootUri`.
    fn takes_http_boot_uri(&self) -> impl Future<Output = Result<bool, BmcError>> + Send;
    /// Inserts the image at `url` (fetched by the BMC) into its virtual CD, replacing what is
    /// there; confirmed by reading the slot back.
    fn insert_media(&self, url: &str) -> impl Future<Output = Result<(), BmcError>> + Send;
    /// Ejects the virtual CD (nothing inserted: nothing to do).
    fn eject_media(&self) -> impl Future<Output = Result<(), BmcError>> + Send;
    /// Boot from the local disk from now on (after a deploy: some BMCs ignore "once").
    fn set_disk_boot(&self, mode: Option<BootMode>) -> impl Future<Output = Result<(), BmcError>> + Send;
}

/// Deadlines and retries for [`power`].
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long to wait for the state to follow one command.
    pub confirm_within: Duration,
    /// Commands sent before giving up.
    pub attempts: u32,
    /// Pause between polls of the power state.
    pub poll: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from(&crate::config::BmcConfig::default())
    }
}

impl From<&crate::config::BmcConfig> for Policy {
    fn from(c: &crate::config::BmcConfig) -> Policy {
        Policy { confirm_within: c.confirm_within, attempts: c.commands.max(1), poll: c.poll }
    }
}

/// How this process names itself to BMCs (Redfish `User-Agent`): the program, its version,
/// and the replica (`host:pid`, as in its leases), so a BMC's audit log says which replica
/// sent a command.
pub fn user_agent() -> &'static str {
    static UA: OnceLock<String> = OnceLock::new();
    UA.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("nodekeeper-provisioner/{} ({}:{})", env!("CARGO_PKG_VERSION"), host.trim(), std::process::id())
    })
}

/// One lock per BMC endpoint: commands to one BMC never overlap, different BMCs run in parallel.
fn lock_for(endpoint: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut map = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    map.entry(endpoint.to_owned()).or_default().clone()
}

/// Carries out `action` and confirms it by reading the state back, retrying the command
/// (with a doubling pause) when the BMC accepted it but nothing happened. Idempotent: asking
/// for the state the host is already in succeeds at once (except `Cycle`). Only the exact
/// state confirms: `PoweringOn` is not off, `PoweringOff` not yet off, and an unknown answer
/// is neither, so the command is sent (again) and the state polled until it says so.
pub async fn power<B: Switch>(bmc: &B, action: PowerAction, policy: &Policy) -> Result<PowerState, BmcError> {
    let lock = lock_for(&bmc.switch_endpoint());
    let _turn = lock.lock().await;
    match action {
        PowerAction::On => reach(bmc, PowerState::On, policy).await,
        PowerAction::Off => reach(bmc, PowerState::Off, policy).await,
        PowerAction::Cycle => {
            reach(bmc, PowerState::Off, policy).await?;
            reach(bmc, PowerState::On, policy).await
        }
    }
}

async fn reach<B: Switch>(bmc: &B, wanted: PowerState, policy: &Policy) -> Result<PowerState, BmcError> {
    let mut last_err = None;
    let mut pause = policy.poll;
    for attempt in 1..=policy.attempts.max(1) {
        let commanded = match bmc.read_power().await {
            Ok(s) if s == wanted => return Ok(s),
            // Already on its way up: a second "On" is refused by some BMCs; watch it arrive.
            Ok(PowerState::PoweringOn) if wanted == PowerState::On && attempt == 1 => false,
            Ok(_) => true,
            Err(e) => {
                last_err = Some(e);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if !commanded {
            tracing::info!(bmc = %bmc.switch_endpoint(), "powering on already: waiting for it");
        } else if let Err(e) = bmc.switch_power(wanted == PowerState::On).await {
            if matches!(e, BmcError::NotLeader { .. }) {
                return Err(e); // no retry: this replica must stop acting
            }
            tracing::info!(bmc = %bmc.switch_endpoint(), attempt, "power {wanted} failed: {e}");
            last_err = Some(e);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            continue;
        }
        let started = tokio::time::Instant::now();
        let mut actual = None;
        while started.elapsed() < policy.confirm_within {
            tokio::time::sleep(policy.poll).await;
            match bmc.read_power().await {
                Ok(s) if s == wanted => return Ok(s),
                Ok(s) => actual = Some(s),
                Err(e) => tracing::debug!(bmc = %bmc.switch_endpoint(), "polling the power state: {e}"),
            }
        }
        tracing::warn!(bmc = %bmc.switch_endpoint(), attempt, "power {wanted} accepted but not confirmed");
        last_err = Some(BmcError::NotConfirmed {
            endpoint: bmc.switch_endpoint(),
            wanted,
            actual: actual.unwrap_or(PowerState::Unknown),
            waited: policy.confirm_within,
        });
    }
    Err(last_err
        .unwrap_or_else(|| BmcError::Unreachable { endpoint: bmc.switch_endpoint(), reason: "no attempt made".into() }))
}

/// A switch whose every request (a read of the power state, a command) waits for a turn of
/// `slots`: what bounds the requests in flight towards BMCs and PDUs is the number of
/// requests, not of fences — a fence waiting between two polls for its host to go off holds
/// no turn, so a rack's power-offs are not done a slot-full per BMC delay. A BMC that hangs
/// holds its turn until its request times out.
pub struct Slotted<'a, S> {
    inner: S,
    slots: &'a tokio::sync::Semaphore,
}

impl<'a, S: Switch> Slotted<'a, S> {
    /// `inner`, its requests taking turns of `slots`.
    pub fn new(inner: S, slots: &'a tokio::sync::Semaphore) -> Slotted<'a, S> {
        Slotted { inner, slots }
    }
}

impl<S: Switch> Switch for Slotted<'_, S> {
    fn switch_endpoint(&self) -> String {
        self.inner.switch_endpoint()
    }
    async fn read_power(&self) -> Result<PowerState, BmcError> {
        let _turn = self.slots.acquire().await;
        self.inner.read_power().await
    }
    async fn switch_power(&self, on: bool) -> Result<(), BmcError> {
        let _turn = self.slots.acquire().await;
        self.inner.switch_power(on).await
    }
}

/// A BMC driven under a leadership term: before every command (power, boot override) it
/// proves in the database that the term is still current, and sends nothing otherwise
/// ([`BmcError::NotLeader`]). BMCs take no fencing token themselves; this check, right before
/// the request leaves, is the closest a controller can come, and it turns a leader that
/// paused past its lease (a GC pause, SIGSTOP, a stuck BMC call) into one that stops instead
/// of power-cycling a host that a newer leader now owns. Reads pass through.
pub struct Leased<B> {
    inner: B,
    store: nodekeeper_store::Store,
}

impl<B: Switch> Leased<B> {
    /// `inner`, gated on `store`'s lease (see `Store::under_lease`).
    pub fn new(inner: B, store: nodekeeper_store::Store) -> Leased<B> {
        Leased { inner, store }
    }

    async fn gate(&self) -> Result<(), BmcError> {
        self.store
            .check_lease()
            .await
            .map_err(|e| BmcError::NotLeader { endpoint: self.inner.switch_endpoint(), reason: e.to_string() })
    }
}

/// A PDU outlet under a leadership term, as a BMC is.
impl Switch for Leased<pdu::Outlet> {
    fn switch_endpoint(&self) -> String {
        self.inner.switch_endpoint()
    }
    async fn read_power(&self) -> Result<PowerState, BmcError> {
        self.inner.read_power().await
    }
    async fn switch_power(&self, on: bool) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.switch_power(on).await
    }
}

impl<B: Bmc> Bmc for Leased<B> {
    fn endpoint(&self) -> String {
        self.inner.endpoint()
    }
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.inner.power_state().await
    }
    async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.set_power(on).await
    }
    async fn set_boot_once(&self, target: BootTarget, mode: Option<BootMode>) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.set_boot_once(target, mode).await
    }
    async fn check_boot(&self, target: BootTarget) -> Result<(), BmcError> {
        self.inner.check_boot(target).await
    }
    async fn insert_media(&self, url: &str) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.insert_media(url).await
    }
    async fn set_http_boot_uri_once(&self, uri: &str, mode: Option<BootMode>) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.set_http_boot_uri_once(uri, mode).await
    }
    async fn takes_http_boot_uri(&self) -> Result<bool, BmcError> {
        self.inner.takes_http_boot_uri().await
    }
    async fn eject_media(&self) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.eject_media().await
    }
    async fn set_disk_boot(&self, mode: Option<BootMode>) -> Result<(), BmcError> {
        self.gate().await?;
        self.inner.set_disk_boot(mode).await
    }
}

/// Makes the BMC driver for a host (tests inject fakes here: [`fake::Fakes`]).
pub trait BmcFactory: Send + Sync + 'static {
    /// The driver type.
    type B: Bmc + 'static;
    /// The driver for `host`.
    fn for_host(&self, host: &nodekeeper_store::Host) -> Result<Self::B, BmcError>;
    /// Confirmation deadlines and retries for power commands.
    fn policy(&self) -> Policy {
        Policy::default()
    }
    /// The driver of one of a host's PDU outlets (by default without its credentials: the
    /// real factory resolves them).
    fn outlet(&self, outlet: &nodekeeper_store::HostOutlet) -> Result<pdu::Outlet, BmcError> {
        pdu::Outlet::from_url(&outlet.url, None)
    }
}

/// User and password for a BMC, from a reference that keeps the secret out of the database:
/// `env:VAR` (the variable holds `user:password`) or `file:/path` (the file does).
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password (never printed: `Debug` hides it).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"***").finish()
    }
}

/// Where credentials references may point: `file:` references only to files inside `dir`
/// (after symlinks are resolved), `env:` references only to variables named with
/// `env_prefix`. A host record is data that more than one party can write (the admin CLI, a
/// restored backup, anyone with database access): without this scope a record could name
/// `file:/etc/shadow` or another BMC's variable, and the provisioner would send that secret to
/// the record's BMC URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialScope {
    /// The directory credentials files live in (default `/etc/nodekeeper/bmc`).
    pub dir: std::path::PathBuf,
    /// The prefix of credentials variables (default `NODEKEEPER_BMC_`).
    pub env_prefix: String,
}

impl Default for CredentialScope {
    fn default() -> CredentialScope {
        CredentialScope {
            dir: crate::config::CREDENTIALS_DIR.into(),
            env_prefix: crate::config::CREDENTIALS_ENV_PREFIX.into(),
        }
    }
}

impl From<&crate::config::BmcConfig> for CredentialScope {
    fn from(c: &crate::config::BmcConfig) -> CredentialScope {
        CredentialScope { dir: c.credentials_dir.clone(), env_prefix: c.credentials_env_prefix.clone() }
    }
}

/// A checked credentials reference.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reference {
    Env(String),
    File(std::path::PathBuf),
}

impl CredentialScope {
    /// The scope from `NODEKEEPER_BMC_CREDENTIALS_DIR` and `NODEKEEPER_BMC_CREDENTIALS_ENV_PREFIX`,
    /// each defaulting as [`CredentialScope::default`] (what the admin CLI uses; `serve`
    /// takes these as the defaults of `[bmc] credentials_dir` / `credentials_env_prefix`).
    pub fn from_env() -> CredentialScope {
        CredentialScope::from(&crate::config::BmcConfig::default())
    }

    /// Checks a reference's form and that it stays in the scope, without reading it (a file
    /// may be put in place after `host add`): an absolute path under `dir` with no `..`, or a
    /// variable name of `[A-Z0-9_]` that starts with the prefix.
    pub fn check(&self, reference: &str) -> Result<(), BmcError> {
        self.parse(reference).map(|_| ())
    }

    fn parse(&self, reference: &str) -> Result<Reference, BmcError> {
        use std::path::{Component, Path};
        if let Some(var) = reference.strip_prefix("env:") {
            let named =
                !var.is_empty() && var.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !named || !var.starts_with(&self.env_prefix) || var.len() == self.env_prefix.len() {
                return Err(BmcError::Config(format!(
                    "credentials variable {var:?} is outside the allowed ones (names of A-Z, 0-9, _ that start with {})",
                    self.env_prefix
                )));
            }
            Ok(Reference::Env(var.to_owned()))
        } else if let Some(path) = reference.strip_prefix("file:") {
            let path = Path::new(path);
            let inside = path.is_absolute()
                && path.starts_with(&self.dir)
                && path != self.dir
                && path.components().all(|c| !matches!(c, Component::ParentDir));
            if !inside {
                return Err(BmcError::Config(format!(
                    "credentials file {} is outside {} (the BMC credentials directory)",
                    path.display(),
                    self.dir.display()
                )));
            }
            Ok(Reference::File(path.to_owned()))
        } else {
            Err(BmcError::Config("credentials reference must be env:VAR or file:/path".into()))
        }
    }
}

impl Credentials {
    /// Resolves a credentials reference within `scope`. A file is opened only when its real
    /// path (symlinks resolved) is still inside the scope's directory.
    pub fn resolve(reference: &str, scope: &CredentialScope) -> Result<Credentials, BmcError> {
        let raw =
            match scope.parse(reference)? {
                Reference::Env(var) => std::env::var(&var)
                    .map_err(|_| BmcError::Config(format!("credentials variable {var} is not set")))?,
                Reference::File(path) => {
                    let shown = path.display();
                    let real =
                        path.canonicalize().map_err(|e| BmcError::Config(format!("credentials file {shown}: {e}")))?;
                    let dir = scope.dir.canonicalize().map_err(|e| {
                        BmcError::Config(format!("the credentials directory {}: {e}", scope.dir.display()))
                    })?;
                    if !real.starts_with(&dir) {
                        return Err(BmcError::Config(format!(
                            "credentials file {shown} leads outside {} (to {})",
                            scope.dir.display(),
                            real.display()
                        )));
                    }
                    std::fs::read_to_string(&real)
                        .map_err(|e| BmcError::Config(format!("credentials file {shown}: {e}")))?
                }
            };
        let (user, password) = raw
            .trim_end_matches(['\n', '\r'])
            .split_once(':')
            .ok_or_else(|| BmcError::Config("credentials must read user:password".into()))?;
        Ok(Credentials { user: user.to_owned(), password: password.to_owned() })
    }
}

/// A driver chosen by the BMC URL's scheme.
#[derive(Debug)]
pub enum Driver {
    /// `redfish://`, `redfish+http://`, `redfish+https://`, `http(s)://`
    Redfish(redfish::Redfish),
    /// `ipmi://HOST[:PORT]`
    Ipmi(ipmi::Ipmi),
}

impl Driver {
    /// The driver for `url` with `credentials`.
    pub fn from_url(url: &str, credentials: Option<Credentials>) -> Result<Driver, BmcError> {
        if url.starts_with("ipmi://") {
            Ok(Driver::Ipmi(ipmi::Ipmi::new(url, credentials)?))
        } else {
            Ok(Driver::Redfish(redfish::Redfish::new(url, credentials)?))
        }
    }
}

impl Bmc for Driver {
    fn endpoint(&self) -> String {
        match self {
            Driver::Redfish(d) => d.endpoint(),
            Driver::Ipmi(d) => d.endpoint(),
        }
    }
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        match self {
            Driver::Redfish(d) => d.power_state().await,
            Driver::Ipmi(d) => d.power_state().await,
        }
    }
    async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.set_power(on).await,
            Driver::Ipmi(d) => d.set_power(on).await,
        }
    }
    async fn set_boot_once(&self, target: BootTarget, mode: Option<BootMode>) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.set_boot_once(target, mode).await,
            Driver::Ipmi(d) => d.set_boot_once(target, mode).await,
        }
    }
    async fn check_boot(&self, target: BootTarget) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.check_boot(target).await,
            Driver::Ipmi(d) => d.check_boot(target).await,
        }
    }
    async fn insert_media(&self, url: &str) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.insert_media(url).await,
            Driver::Ipmi(d) => d.insert_media(url).await,
        }
    }
    async fn set_http_boot_uri_once(&self, uri: &str, mode: Option<BootMode>) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.set_http_boot_uri_once(uri, mode).await,
            Driver::Ipmi(d) => d.set_http_boot_uri_once(uri, mode).await,
        }
    }
    async fn takes_http_boot_uri(&self) -> Result<bool, BmcError> {
        match self {
            Driver::Redfish(d) => d.takes_http_boot_uri().await,
            Driver::Ipmi(d) => d.takes_http_boot_uri().await,
        }
    }
    async fn eject_media(&self) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.eject_media().await,
            Driver::Ipmi(d) => d.eject_media().await,
        }
    }
    async fn set_disk_boot(&self, mode: Option<BootMode>) -> Result<(), BmcError> {
        match self {
            Driver::Redfish(d) => d.set_disk_boot(mode).await,
            Driver::Ipmi(d) => d.set_disk_boot(mode).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A BMC that ignores the first `ignore` commands (a classic) and then obeys.
    struct Lazy {
        on: Mutex<bool>,
        ignore: AtomicU32,
        commands: AtomicU32,
    }

    impl Bmc for Lazy {
        fn endpoint(&self) -> String {
            "lazy".into()
        }
        async fn power_state(&self) -> Result<PowerState, BmcError> {
            Ok(if *self.on.lock().expect("lock") { PowerState::On } else { PowerState::Off })
        }
        async fn set_power(&self, on: bool) -> Result<(), BmcError> {
            self.commands.fetch_add(1, Ordering::SeqCst);
            if self.ignore.load(Ordering::SeqCst) > 0 {
                self.ignore.fetch_sub(1, Ordering::SeqCst);
                return Ok(());
            }
            *self.on.lock().expect("lock") = on;
            Ok(())
        }
        async fn set_boot_once(&self, _: BootTarget, _: Option<BootMode>) -> Result<(), BmcError> {
            Ok(())
        }
        async fn check_boot(&self, _: BootTarget) -> Result<(), BmcError> {
            Ok(())
        }
        async fn insert_media(&self, _: &str) -> Result<(), BmcError> {
            Ok(())
        }
        async fn set_http_boot_uri_once(&self, _: &str, _: Option<BootMode>) -> Result<(), BmcError> {
            Ok(())
        }
        async fn takes_http_boot_uri(&self) -> Result<bool, BmcError> {
            Ok(false)
        }
        async fn eject_media(&self) -> Result<(), BmcError> {
            Ok(())
        }
        async fn set_disk_boot(&self, _: Option<BootMode>) -> Result<(), BmcError> {
            Ok(())
        }
    }

    fn fast() -> Policy {
        Policy { confirm_within: Duration::from_millis(50), attempts: 3, poll: Duration::from_millis(5) }
    }

    #[tokio::test]
    async fn ignored_commands_are_retried_until_the_state_follows() {
        let bmc = Lazy { on: Mutex::new(true), ignore: AtomicU32::new(2), commands: AtomicU32::new(0) };
        assert_eq!(power(&bmc, PowerAction::Off, &fast()).await.expect("off"), PowerState::Off);
        assert_eq!(bmc.commands.load(Ordering::SeqCst), 3);
        // Already off: nothing is sent.
        assert_eq!(power(&bmc, PowerAction::Off, &fast()).await.expect("off again"), PowerState::Off);
        assert_eq!(bmc.commands.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_bmc_that_never_obeys_is_reported() {
        let bmc = Lazy { on: Mutex::new(true), ignore: AtomicU32::new(100), commands: AtomicU32::new(0) };
        let err = power(&bmc, PowerAction::Off, &fast()).await.expect_err("never off");
        assert!(matches!(err, BmcError::NotConfirmed { wanted: PowerState::Off, actual: PowerState::On, .. }), "{err}");
        assert_eq!(bmc.commands.load(Ordering::SeqCst), 3, "bounded retries");
    }

    #[test]
    fn credentials_come_from_references_and_never_print() {
        let dir = tempfile::tempdir().expect("dir");
        let scope = CredentialScope { dir: dir.path().to_owned(), env_prefix: "NK_TEST_BMC_".into() };
        let file = dir.path().join("bmc");
        std::fs::write(&file, "admin:s3cret\n").expect("write");
        let c = Credentials::resolve(&format!("file:{}", file.display()), &scope).expect("file");
        assert_eq!((c.user.as_str(), c.password.as_str()), ("admin", "s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(Credentials::resolve("admin:s3cret", &scope).is_err(), "no literal secrets in the database");
        assert!(Credentials::resolve("env:NK_TEST_BMC_SURELY_UNSET", &scope).is_err());
    }

    #[test]
    fn credentials_references_stay_in_their_scope() {
        let dir = tempfile::tempdir().expect("dir");
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).expect("mkdir");
        let scope = CredentialScope { dir: creds.clone(), env_prefix: "NK_TEST_BMC_".into() };
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root:elsewhere\n").expect("write");
        std::os::unix::fs::symlink(&secret, creds.join("link")).expect("symlink");
        let refused = |r: String| {
            let e = Credentials::resolve(&r, &scope).expect_err(&r).to_string();
            assert!(!e.contains("elsewhere"), "{e}");
            assert!(
                scope.check(&r).is_err() || r.ends_with("link"),
                "{r} passes the lexical check only through a link"
            );
            e
        };
        assert!(refused(format!("file:{}", secret.display())).contains("outside"));
        assert!(refused(format!("file:{}/../secret", creds.display())).contains("outside"));
        assert!(refused("file:creds/x".into()).contains("outside"), "relative");
        assert!(refused(format!("file:{}", creds.display())).contains("outside"), "the directory itself");
        assert!(refused(format!("file:{}/link", creds.display())).contains("leads outside"));
        assert!(refused("env:HOME".into()).contains("outside"));
        assert!(refused("env:NK_TEST_BMC_".into()).contains("outside"), "the prefix alone");
        assert!(refused("env:NK_TEST_BMC_a".into()).contains("outside"), "lower case");
        assert!(scope.check(&format!("file:{}/node-a", creds.display())).is_ok(), "may be put in place later");
        assert!(scope.check("env:NK_TEST_BMC_NODE_A").is_ok());
    }
}
