//! Redfish virtual media for the reimage executor (Ironic's `redfish-virtual-media`): per
//! boot of a reimage, an ISO built for that boot alone ([`super::iso`]) whose kernel command
//! line carries the reimage's parameters, its one-time deploy token and — for a host with a
//! fixed address — the address the agent takes (no DHCP of ours needed). The BMC fetches it
//! from `/vmedia/NAME` and attaches it as a CD.
//!
//! The same ISO serves UEFI HTTP boot where no DHCP of ours answers the firmware: the BMC is
//! given its URL as `HttpBootUri` (Ironic's `redfish-https`), and the firmware boots it.
//!
//! An ISO's name is `HOST-OPERATION-BOOT-TOKENHASH16-RANDOM.iso`: unguessable, and tied to the
//! token it carries. It is served only while that token is the host's current one (so not
//! once the reimage ended, nor after a newer boot replaced it), and it is deleted when the
//! reimage ends. The media is ejected at `local_boot` and when the reimage ends, whatever
//! its outcome; an eject the BMC refused is recorded on the host and retried by [`sweep`].

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_store::{BootMode, Host, HostName, Operation, OperationStatus, Store};
use sha2::{Digest, Sha256};

use crate::bmc::{Bmc, BmcFactory};
use crate::config::HttpConfig;

/// The addressing an ISO gives the agent of a host with a fixed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    /// The network's prefix length.
    pub prefix: u8,
    /// Its default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// Its DNS servers.
    pub dns: Vec<Ipv4Addr>,
}

/// Why a boot medium could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The database.
    #[error(transparent)]
    Store(#[from] nodekeeper_store::StoreError),
    /// The ISO could not be built.
    #[error(transparent)]
    Iso(#[from] super::iso::IsoError),
}

/// What virtual media needs: where ISOs go, the loaders and the deploy ramdisk, and what the
/// agent is told.
#[derive(Debug, Clone)]
pub struct Media {
    /// Where the ISOs are written (`[virtual_media] dir`), served at `/vmedia/`.
    pub dir: PathBuf,
    /// The loaders (the TFTP root).
    pub loaders: PathBuf,
    /// `[http]` (public URL, deploy kernel, initrd and arguments, images directory).
    pub http: Arc<HttpConfig>,
    /// The HTTPS URL and CA digest the agent reports to, when `[http.tls]` is set.
    pub tls: Option<(String, String)>,
    /// For hosts with a fixed address.
    pub addressing: Addressing,
    /// No DHCP of ours answers firmware (`dhcp.mode = "off"`): a UEFI HTTP boot then goes by
    /// the BMC's `HttpBootUri`, to this boot's ISO.
    pub dhcp_off: bool,
}

/// Which ISO: boot `boot` of reimage `op` of `host`, writing `image`.
#[derive(Debug, Clone, Copy)]
pub struct IsoFor<'a> {
    /// The host.
    pub host: &'a Host,
    /// Its running reimage.
    pub op: &'a Operation,
    /// The boot of that reimage (1, then 2 when the agent never called back, …).
    pub boot: u32,
    /// The image the agent writes.
    pub image: super::machine::ImageRef<'a>,
    /// The host's firmware, if known.
    pub boot_mode: Option<BootMode>,
    /// Its root-device hint.
    pub root_device: Option<&'a str>,
}

/// How the ISO names of `host`'s boot `boot` of operation `op` begin.
fn prefix(host: &HostName, op: i64, boot: u32) -> String {
    format!("{host}-{op}-{boot}-")
}

impl Media {
    /// The URL of boot `boot` of `op`'s ISO for `host`, built now (with a fresh token that
    /// replaces any earlier one) unless the one there still carries the host's current token
    /// for this boot. Older ISOs of the host are deleted.
    pub async fn ensure(&self, store: &Store, boot: &IsoFor<'_>) -> Result<String, MediaError> {
        let IsoFor { host, op, boot, image, boot_mode, root_device } = *boot;
        let key = format!("{}:{boot}", op.id);
        let wanted = prefix(&host.name, op.id, boot);
        if let Some((hash, for_boot)) = store.current_deploy_token(&host.name).await? {
            if let (true, Some(hash16)) = (for_boot == key, hash.get(..16)) {
                let name = format!("{wanted}{hash16}-");
                if let Some(existing) = self.files_of(&host.name).into_iter().find(|f| f.starts_with(&name)) {
                    return Ok(self.url(&existing));
                }
            }
        }
        self.remove(&host.name);
        let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let hash = format!("{:x}", Sha256::digest(token.as_bytes()));
        let expires = store.now().await? + crate::http::DEPLOY_TOKEN_TTL;
        // The token first: an ISO is served only while its token is the current one.
        store.replace_deploy_token(&host.name, &hash, expires, &key).await?;
        let random = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{wanted}{}-{}.iso", &hash[..16], &random[..16]); // both hex, 64 and 32 long
        let params = crate::http::deploy_params(&self.http, None, image, root_device);
        let params =
            crate::http::ipxe::DeployParams { tls: self.tls.as_ref().map(|(u, c)| (u.as_str(), c.as_str())), ..params };
        let mut args = crate::http::ipxe::deploy_args(host, &params, &token);
        args.extend(self.address_args(host));
        let http = self.http.clone();
        let (loaders, out, label) = (self.loaders.clone(), self.dir.join(&name), host.name.to_string());
        let built = tokio::task::spawn_blocking(move || {
            let kernel = http.images_dir.join(&http.deploy_kernel);
            let initrd = http.images_dir.join(&http.deploy_initrd);
            let spec = super::iso::IsoSpec { kernel: &kernel, initrd: &initrd, args: &args, boot_mode, label: &label };
            super::iso::build(&spec, &loaders, &out)
        })
        .await
        .map_err(|e| super::iso::IsoError::Tool(format!("the ISO builder stopped: {e}")))??;
        tracing::info!(host = %host.name, operation = op.id, boot, bytes = built, "deploy ISO built");
        Ok(self.url(&name))
    }

    /// `nk.ip=… nk.gateway=… nk.dns=…` for a host with a fixed IPv4 address; nothing (DHCP
    /// from the site's server) otherwise.
    fn address_args(&self, host: &Host) -> Vec<String> {
        let Some(IpAddr::V4(ip)) = host.ip else { return Vec::new() };
        let a = &self.addressing;
        let mut args = vec![format!("nk.ip={ip}/{}", a.prefix)];
        args.extend(a.gateway.map(|g| format!("nk.gateway={g}")));
        if !a.dns.is_empty() {
            args.push(format!("nk.dns={}", a.dns.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(",")));
        }
        args
    }

    fn url(&self, name: &str) -> String {
        format!("{}/vmedia/{name}", self.http.public_url.trim_end_matches('/'))
    }

    /// The ISO files of `host` in the directory.
    fn files_of(&self, host: &HostName) -> Vec<String> {
        let start = format!("{host}-");
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&start) && n.ends_with(".iso") && owner(n).is_some_and(|o| o.0 == *host))
            .collect()
    }

    /// Deletes every ISO of `host`.
    pub fn remove(&self, host: &HostName) {
        for name in self.files_of(host) {
            if let Err(e) = std::fs::remove_file(self.dir.join(&name)) {
                tracing::warn!(%host, "removing {name}: {e}");
            }
        }
    }

    /// The file a `/vmedia/NAME` request may have: an ISO of this directory whose token is
    /// still its host's current one, for the boot it was built for.
    pub async fn resolve(&self, store: &Store, name: &str) -> Result<Option<PathBuf>, nodekeeper_store::StoreError> {
        let Some((host, op, boot, hash16)) = owner(name) else { return Ok(None) };
        let Some((hash, for_boot)) = store.current_deploy_token(&host).await? else { return Ok(None) };
        if !hash.starts_with(&hash16) || for_boot != format!("{op}:{boot}") {
            return Ok(None);
        }
        let path = self.dir.join(name);
        Ok(path.is_file().then_some(path))
    }
}

/// Parses `HOST-OP-BOOT-HASH16-RANDOM.iso` (host names may hold `-`: parsed from the right).
fn owner(name: &str) -> Option<(HostName, i64, u32, String)> {
    let stem = name.strip_suffix(".iso")?;
    if stem.contains(['/', '\\', '\0']) || stem.starts_with('.') {
        return None;
    }
    let mut parts = stem.rsplitn(5, '-');
    let random = parts.next()?;
    let hash16 = parts.next()?;
    let boot: u32 = parts.next()?.parse().ok()?;
    let op: i64 = parts.next()?.parse().ok()?;
    let host: HostName = parts.next()?.parse().ok()?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(random, 16) && hex(hash16, 16)).then(|| (host, op, boot, hash16.to_owned()))
}

/// How often [`sweep`] looks.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Ejects media the provisioner inserted and has not seen ejected, for hosts whose reimage
/// has ended (an eject the BMC refused then, or one a crash cut short), and deletes their
/// ISOs. Runs until `shutdown`.
pub async fn sweep<F: BmcFactory>(
    store: Store,
    factory: Arc<F>,
    media: Arc<Media>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(e) = sweep_once(&store, factory.as_ref(), &media).await {
            tracing::warn!("virtual media sweep: {e}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

/// One pass of [`sweep`]: returns the hosts whose media it ejected.
pub async fn sweep_once<F: BmcFactory>(
    store: &Store,
    factory: &F,
    media: &Media,
) -> Result<Vec<HostName>, nodekeeper_store::StoreError> {
    let mut ejected = Vec::new();
    for (name, url) in store.hosts_with_media().await? {
        let running = store
            .latest_operation_of(super::executor::KIND, &name)
            .await?
            .is_some_and(|o| o.status == OperationStatus::Running);
        if running {
            continue; // the reimage ejects it itself
        }
        let Some(host) = store.host(&name).await? else { continue };
        let result = match factory.for_host(&host) {
            Ok(driver) => driver.eject_media().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                store.set_media_inserted(&name, None).await?;
                media.remove(&name);
                tracing::info!(host = %name, "virtual media {url} ejected");
                ejected.push(name);
            }
            Err(e) => tracing::warn!(host = %name, "virtual media {url} still inserted: {e}"),
        }
    }
    Ok(ejected)
}

/// Where the deploy ISOs of a config go, and what they need.
pub fn from_config(config: &crate::config::ServeConfig, tls: Option<(String, String)>) -> Option<Media> {
    let loaders = config.tftp.root.clone()?;
    Some(Media {
        dir: config.virtual_media.dir.clone(),
        loaders,
        http: Arc::new(config.http.clone()),
        tls,
        addressing: config.media_addressing(),
        dhcp_off: config.dhcp.mode == crate::config::DhcpMode::Off,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_from_the_right_and_nothing_else_does() {
        let n = "node-a-b-12-3-0123456789abcdef-fedcba9876543210.iso";
        let (host, op, boot, hash) = owner(n).expect("parses");
        assert_eq!((host.as_str(), op, boot, hash.as_str()), ("node-a-b", 12, 3, "0123456789abcdef"));
        for bad in [
            "node-a-12-3-0123456789abcdef-fedcba9876543210.img",
            "node-a-12-3-0123456789abcdeg-fedcba9876543210.iso",
            "node-a-12-x-0123456789abcdef-fedcba9876543210.iso",
            "12-3-0123456789abcdef-fedcba9876543210.iso",
            "../node-a-12-3-0123456789abcdef-fedcba9876543210.iso",
            ".node-a-12-3-0123456789abcdef-fedcba9876543210.iso",
        ] {
            assert!(owner(bad).is_none(), "{bad}");
        }
        assert_eq!(prefix(&"node-a".parse().expect("name"), 7, 2), "node-a-7-2-");
    }

    #[test]
    fn a_fixed_address_rides_the_command_line() {
        let http = Arc::new(HttpConfig {
            listen: "127.0.0.1:8080".parse().expect("addr"),
            public_url: "http://10.20.0.1:8080".into(),
            images_dir: "/nonexistent".into(),
            deploy_kernel: "deploy/vmlinuz".into(),
            deploy_initrd: "deploy/initrd.img".into(),
            deploy_kernel_args: String::new(),
            repair_public_key: None,
            max_event_streams: 4,
            tls: None,
            auth: Default::default(),
        });
        let media = Media {
            dir: "/nonexistent".into(),
            loaders: "/nonexistent".into(),
            http,
            tls: None,
            addressing: Addressing {
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 20, 0, 1)),
                dns: vec![Ipv4Addr::new(10, 20, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
            },
            dhcp_off: false,
        };
        let mut host = Host {
            name: "node-a".parse().expect("name"),
            mac: None,
            ip: Some(IpAddr::V4(Ipv4Addr::new(10, 20, 0, 42))),
            bmc_url: None,
            bmc_credentials: None,
            state: nodekeeper_store::HostState::Reimaging,
            last_heartbeat: None,
            image: None,
            created_at: nodekeeper_store::Timestamp(0),
            updated_at: nodekeeper_store::Timestamp(0),
        };
        assert_eq!(
            media.address_args(&host),
            ["nk.ip=10.20.0.42/24", "nk.gateway=10.20.0.1", "nk.dns=10.20.0.1,9.9.9.9"]
        );
        host.ip = None;
        assert!(media.address_args(&host).is_empty(), "DHCP from the site's server");
    }
}
