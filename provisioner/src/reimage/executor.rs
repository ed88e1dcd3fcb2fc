//! Runs reimage operations from the database: every tick, each running operation gets one
//! step of work or observation ([`super::machine`]), and the result is written back with a
//! compare-and-set on the step. Nothing lives only in memory: killing the process at any
//! point and starting another resumes every operation where the database says it is (BMC
//! steps are idempotent and simply run again).
//!
//! Every replica of `serve` runs an executor; each step is taken under a **claim** on its
//! operation — a lease in the database (role `reimage:ID`) renewed while the step works and
//! released after it — so one replica at a time steps an operation, and a replica that paused
//! past its claim (another took it over) sends no BMC command and changes no step when it
//! wakes: its writes carry the claim's term and the database refuses them.

use std::sync::Arc;
use std::time::Duration;

use nodekeeper_store::{Host, HostName, HostState, Operation, Store};
use tokio_util::sync::CancellationToken;

use super::machine::{self, AgentReport, Deadlines, Decision, Limits, ReimageData, Step, Work};
use crate::bmc::{self, Bmc, BmcError, BootTarget, PowerAction};
use nodekeeper_store::BootPath;

/// The operation kind.
pub const KIND: &str = "reimage";
/// Who the executor's events say acted.
pub const ACTOR: &str = "provisioner:reimage";

pub use crate::bmc::BmcFactory;

/// The real drivers, from each host's BMC URL and credentials reference, with the
/// configured confirmation policy (`[bmc]`).
#[derive(Debug, Default)]
pub struct Drivers {
    /// How power commands are confirmed.
    pub policy: bmc::Policy,
    /// Where credentials references may point.
    pub scope: bmc::CredentialScope,
}

impl BmcFactory for Drivers {
    type B = bmc::Driver;
    fn for_host(&self, host: &Host) -> Result<bmc::Driver, BmcError> {
        let url = host.bmc_url.as_deref().ok_or_else(|| BmcError::Config(format!("host {} has no BMC", host.name)))?;
        let credentials =
            host.bmc_credentials.as_deref().map(|r| bmc::Credentials::resolve(r, &self.scope)).transpose()?;
        bmc::Driver::from_url(url, credentials)
    }
    fn policy(&self) -> bmc::Policy {
        self.policy.clone()
    }
    fn outlet(&self, outlet: &nodekeeper_store::HostOutlet) -> Result<bmc::pdu::Outlet, BmcError> {
        let credentials =
            outlet.credentials.as_deref().map(|r| bmc::Credentials::resolve(r, &self.scope)).transpose()?;
        bmc::pdu::Outlet::from_url(&outlet.url, credentials)
    }
}

/// Why a reimage cannot be requested.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] nodekeeper_store::StoreError),
    /// The host has no BMC to power it.
    #[error("host {0} has no BMC (host add --bmc URL): it cannot be reimaged automatically")]
    NoBmc(HostName),
}

/// Starts a reimage of `host`, or returns the one already running (`false`). The host turns
/// `reimaging`, so its iPXE script serves the deploy ramdisk.
pub async fn request(
    store: &Store,
    host: &HostName,
    image: Option<&str>,
    deadlines: Deadlines,
    limits: Limits,
    actor: &str,
) -> Result<(Operation, bool), RequestError> {
    let h = store.require_host(host).await?;
    if h.bmc_url.is_none() {
        return Err(RequestError::NoBmc(host.clone()));
    }
    let image = image.map(str::to_owned).or(h.image).unwrap_or_else(|| super::DEFAULT_IMAGE.to_owned());
    let boot_path = store.boot_settings(host).await?.boot_path;
    // A catalogue image is served compressed; any other name is a raw file under the images
    // directory (as before the catalogue).
    let catalogued = store.image(&image).await?;
    let served = catalogued.map(|i| machine::Served { file: i.file, raw_size: i.raw_size, sha256: i.served_sha256 });
    let uses = served.is_some().then_some(image.as_str());
    let data = ReimageData { image: image.clone(), pxe_boots: 0, agent: None, deadlines, limits, boot_path, served };
    let deadline = crate::ops::engine::after(store, machine::deadline_for(Step::PowerOff, &data.deadlines)).await?;
    let json = serde_json::to_string(&data).unwrap_or_else(|_| "{}".into());
    let (op, started) =
        store.start_operation_using(KIND, host, Step::PowerOff.as_str(), Some(deadline), &json, actor, uses).await?;
    if started {
        store
            .set_host_state(
                host,
                HostState::Reimaging,
                actor,
                &format!("reimage with {} (operation {})", data.image, op.id),
            )
            .await?;
    }
    Ok((op, started))
}

/// A waiting step's decision: what the agent reported, whether the node heartbeated since
/// the operation began, whether the step's deadline passed (by the database's clock). Reads
/// only.
async fn observe(
    store: &Store,
    op: &Operation,
    host: &Host,
    step: Step,
    data: &ReimageData,
) -> Result<Decision, nodekeeper_store::StoreError> {
    let heartbeat_seen = host.last_heartbeat.is_some_and(|h| h > op.created_at);
    let now = store.now().await?;
    let deadline_passed = op.deadline.is_some_and(|d| now >= d);
    Ok(machine::observe(step, data, heartbeat_seen, deadline_passed))
}

/// Drives every running reimage until `shutdown`, looking every `tick`, on the one runner
/// ([`crate::ops::runner`]). `holder` names this replica in its claims.
pub async fn run<F: BmcFactory>(
    store: Store,
    factory: Arc<F>,
    holder: String,
    tick: Duration,
    shutdown: CancellationToken,
) {
    crate::ops::runner::run(store, Arc::new(Reimage { factory, media: None }), holder, tick, shutdown).await;
}

/// [`run`], with virtual media (`host add --boot virtual-media`): the executor builds each
/// boot's ISO and drives the BMC's virtual CD, and a sweeper ejects what an ended reimage left.
pub async fn run_with_media<F: BmcFactory>(
    store: Store,
    factory: Arc<F>,
    media: Arc<super::vmedia::Media>,
    holder: String,
    tick: Duration,
    shutdown: CancellationToken,
) {
    let sweeper = tokio::spawn(super::vmedia::sweep(store.clone(), factory.clone(), media.clone(), shutdown.clone()));
    let machine = Arc::new(Reimage { factory, media: Some(media) });
    crate::ops::runner::run(store, machine, holder, tick, shutdown).await;
    let _ = sweeper.await;
}

impl<F: BmcFactory> crate::ops::runner::Claimed for Reimage<F> {
    /// A waiting step whose awaited report, heartbeat or deadline has not come: reads only.
    async fn idle(&self, store: &Store, op: &Operation) -> Result<bool, nodekeeper_store::StoreError> {
        let Ok((step, mut data)) = crate::ops::parse_state::<Step, ReimageData>(op) else { return Ok(false) };
        if machine::work(step) != Work::Wait {
            return Ok(false);
        }
        data.agent = op.report.as_deref().and_then(|r| serde_json::from_str::<AgentReport>(r).ok());
        let host = store.require_host(&op.target).await?;
        Ok(observe(store, op, &host, step, &data).await? == Decision::Stay)
    }
}

/// The reimage machine on the operation engine: its decisions ([`super::machine`]) and
/// effects (BMC commands; the host's token, image and state when it ends). A step is
/// idempotent: run twice on the same state, it decides the same and only the first write
/// applies; the store it is given carries the lease it acts under, if any (BMC commands are
/// gated on it and its writes fenced by it).
pub struct Reimage<F> {
    /// Where BMC drivers come from.
    pub factory: Arc<F>,
    /// Virtual media's ISOs, when configured.
    pub media: Option<Arc<super::vmedia::Media>>,
}

impl<F: BmcFactory> Reimage<F> {
    /// This boot's ISO (built unless it is there), for a virtual-media reimage.
    async fn iso(
        &self,
        store: &Store,
        host: &Host,
        op: &Operation,
        data: &ReimageData,
        boot: &nodekeeper_store::BootSettings,
    ) -> Result<String, String> {
        let Some(media) = &self.media else {
            return Err(
                "deploy ISOs are not set up in this provisioner (they need [tftp] root for their loaders)".into()
            );
        };
        let iso = super::vmedia::IsoFor {
            host,
            op,
            boot: data.pxe_boots + 1,
            image: data.image_ref(),
            boot_mode: boot.boot_mode,
            root_device: boot.root_device.as_deref(),
        };
        media.ensure(store, &iso).await.map_err(|e| e.to_string())
    }

    /// Ejects `host`'s virtual CD as its reimage ends (whatever the outcome) and deletes its
    /// ISOs; an eject the BMC refuses stays recorded for the sweeper.
    async fn end_media(&self, store: &Store, host: &Host) -> Result<(), nodekeeper_store::StoreError> {
        if let Some(media) = &self.media {
            media.remove(&host.name);
        }
        if !store.hosts_with_media().await?.iter().any(|(h, _)| *h == host.name) {
            return Ok(());
        }
        let ejected = match self.factory.for_host(host) {
            Ok(driver) => bmc::Leased::new(driver, store.clone()).eject_media().await,
            Err(e) => Err(e),
        };
        match ejected {
            Ok(()) => store.set_media_inserted(&host.name, None).await,
            Err(e) => {
                tracing::warn!(host = %host.name, "virtual media not ejected (the sweeper tries again): {e}");
                Ok(())
            }
        }
    }
}

impl<F: BmcFactory> crate::ops::Machine for Reimage<F> {
    type Step = Step;
    type Data = ReimageData;
    const KIND: &'static str = KIND;
    const ACTOR: &'static str = ACTOR;

    async fn decide(
        &self,
        store: &Store,
        op: &Operation,
        step: Step,
        data: &mut ReimageData,
    ) -> Result<Decision, nodekeeper_store::StoreError> {
        data.agent = op.report.as_deref().and_then(|r| serde_json::from_str::<AgentReport>(r).ok());
        let host = store.require_host(&op.target).await?;
        let work = machine::work(step);
        if work == Work::Wait {
            return observe(store, op, &host, step, data).await;
        }
        // Read once per step: the mode for the overrides, the hint for a deploy ISO.
        let boot = store.boot_settings(&op.target).await?;
        let boot_mode = boot.boot_mode;
        let virtual_media = data.boot_path == BootPath::VirtualMedia;
        // UEFI HTTP boot by the BMC's HttpBootUri, to this boot's ISO: where no DHCP of ours
        // tells the firmware where to boot from, and for Secure Boot (shim → the CD GRUB on
        // the ISO: Debian 12's signed network GRUB, loaded over HTTP, does not bring its
        // network up and finds no configuration — seen in the lab).
        let http_by_uri = data.boot_path == BootPath::Http
            && (self.media.as_ref().is_some_and(|m| m.dhcp_off)
                || boot_mode == Some(nodekeeper_store::BootMode::UefiSecureBoot));
        // This boot's ISO, before the BMC is asked anything: one that cannot be built (a full
        // disk, a missing loader) fails the reimage at once, with the host still untouched.
        let iso = match work {
            Work::PowerOff | Work::SetPxeOnce if virtual_media || http_by_uri => {
                match self.iso(store, &host, op, data, &boot).await {
                    Ok(url) => Some(url),
                    Err(reason) => return Ok(Decision::Failed { at: step, reason }),
                }
            }
            _ => None,
        };
        if let (Work::SetPxeOnce, Some(url), true) = (work, &iso, virtual_media) {
            // Recorded before the BMC has it: whatever happens next, it is ejected in the end.
            store.set_media_inserted(&host.name, Some(url)).await?;
        }
        let result = match self.factory.for_host(&host) {
            Err(e) => Err(e.to_string()),
            Ok(driver) => {
                let driver = bmc::Leased::new(driver, store.clone());
                let policy = self.factory.policy();
                let target = BootTarget::of(data.boot_path);
                let act = async {
                    match work {
                        Work::PowerOff => {
                            // A BMC that cannot take this reimage's boot path fails it here,
                            // with the host still running what it ran; so does an ISO that
                            // cannot be built.
                            driver.check_boot(target).await?;
                            if http_by_uri && !driver.takes_http_boot_uri().await? {
                                let why = if boot_mode == Some(nodekeeper_store::BootMode::UefiSecureBoot) {
                                    "a Secure Boot host boots over UEFI HTTP from its deploy ISO, by the BMC's \
                                     HttpBootUri, and this BMC takes none (`host set --boot virtual-media` or \
                                     `--boot pxe`)"
                                } else {
                                    "no DHCP of ours answers the firmware (dhcp.mode = \"off\") and the BMC takes \
                                     no HttpBootUri: nothing would tell the firmware where to boot from (set \
                                     dhcp.mode to full or proxy, or `host set --boot virtual-media`)"
                                };
                                return Err(BmcError::Unsupported { endpoint: driver.endpoint(), reason: why.into() });
                            }
                            bmc::power(&driver, PowerAction::Off, &policy).await.map(drop)
                        }
                        Work::PowerOn => bmc::power(&driver, PowerAction::On, &policy).await.map(drop),
                        Work::SetPxeOnce if http_by_uri => {
                            driver.set_http_boot_uri_once(iso.as_deref().unwrap_or_default(), boot_mode).await
                        }
                        Work::SetPxeOnce if iso.is_some() => {
                            driver.insert_media(iso.as_deref().unwrap_or_default()).await?;
                            driver.set_boot_once(target, boot_mode).await
                        }
                        Work::SetPxeOnce => driver.set_boot_once(target, boot_mode).await,
                        Work::BootDisk => {
                            if virtual_media {
                                // The deploy ISO out first: the disk boots, never the CD again.
                                driver.eject_media().await?;
                            }
                            driver.set_disk_boot(boot_mode).await?;
                            bmc::power(&driver, PowerAction::Off, &policy).await?;
                            bmc::power(&driver, PowerAction::On, &policy).await.map(drop)
                        }
                        Work::Wait => Ok(()),
                    }
                };
                match tokio::time::timeout(data.deadlines.bmc, act).await {
                    // What the BMC cannot do at all is not tried again.
                    Ok(Err(e @ BmcError::Unsupported { .. })) => {
                        return Ok(Decision::Failed { at: step, reason: e.to_string() });
                    }
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => {
                        Err(format!("{step} took longer than {}", humantime::format_duration(data.deadlines.bmc)))
                    }
                }
            }
        };
        if work == Work::BootDisk && virtual_media && result.is_ok() {
            store.set_media_inserted(&host.name, None).await?;
        }
        Ok(machine::after_work(step, op.attempts + 1, result, data))
    }

    async fn effects(
        &self,
        store: &Store,
        op: &Operation,
        step: Step,
        data: &mut ReimageData,
        decision: &Decision,
    ) -> Result<(), nodekeeper_store::StoreError> {
        data.agent = None; // the report lives in its own column
        match decision {
            Decision::Go { .. } if step == Step::PowerOn => data.pxe_boots += 1,
            // The host first, the operation last: a crash in between leaves the operation
            // running, and the next step decides the same and repeats both (both idempotent).
            Decision::Done { .. } => {
                if let Some(host) = store.host(&op.target).await? {
                    self.end_media(store, &host).await?;
                }
                store.clear_deploy_token(&op.target).await?;
                store.set_host_image(&op.target, &data.image).await?;
                let why = format!("reimaged with {}", data.image);
                store.set_host_state(&op.target, HostState::Active, ACTOR, &why).await?;
            }
            // Out of service until an operator looks: its script boots the disk, not the installer.
            Decision::Failed { at, reason } => {
                if let Some(host) = store.host(&op.target).await? {
                    self.end_media(store, &host).await?;
                }
                store.clear_deploy_token(&op.target).await?;
                let why = format!("reimage failed at {at}: {reason}");
                store.set_host_state(&op.target, HostState::Maintenance, ACTOR, &why).await?;
            }
            _ => {}
        }
        Ok(())
    }

    fn retry_deadline(&self, data: &ReimageData) -> Option<Duration> {
        Some(data.deadlines.bmc)
    }

    fn cancel(&self, step: Step, by: &str) -> Result<Decision, String> {
        crate::ops::cancel_rule(KIND, step.as_str())?;
        Ok(Decision::Failed { at: step, reason: format!("cancelled by {by}") })
    }

    fn attempts_limit(&self, data: &ReimageData) -> Option<u32> {
        Some(data.limits.bmc_attempts)
    }
}
