//! The boot script a host gets — iPXE's at `/boot/{mac}.ipxe`, GRUB's over TFTP at
//! `grub/nk/{mac}.cfg` for Secure Boot hosts (shim → signed GRUB) — as a pure function of
//! its state.
//!
//! A host being reimaged gets the deploy ramdisk with a one-time token on its kernel command
//! line; every other known host boots its local disk, so a deployed host never loops back
//! into the installer (a classic of netboot systems).

use nodekeeper_store::{Host, HostState, Operation, OperationStatus};

use crate::reimage::executor;
use crate::reimage::machine::{AgentReport, AgentStage, ImageRef, ReimageData, Served, Step};

/// What the deploy ramdisk needs to know.
#[derive(Debug, Clone)]
pub struct DeployParams<'a> {
    /// The provisioner's base URL, as nodes reach it.
    pub public_url: &'a str,
    /// The HTTPS base URL and the sha256 of its CA (`[http.tls]`): the agent reports there
    /// and takes the image's digest from there.
    pub tls: Option<(&'a str, &'a str)>,
    /// Deploy kernel, relative to `/images/`.
    pub kernel: &'a str,
    /// Deploy initramfs, relative to `/images/`.
    pub initrd: &'a str,
    /// Extra kernel arguments.
    pub kernel_args: &'a str,
    /// The image to write.
    pub image: ImageRef<'a>,
    /// The host's root-device hint (the agent's one-word form), if any.
    pub root_device: Option<&'a str>,
    /// The provisioner's repair key (`TYPE BASE64`), for the node's `authorized_keys`.
    pub repair_key: Option<&'a str>,
}

/// What a host is to deploy in this boot: the image, and the boot it is for
/// (`"OPERATION:PXE_BOOT"`, the key its one-time token is issued under).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deploy {
    /// The image to write (its catalogue name, or a file under `/images/`).
    pub image: String,
    /// Its catalogue entry, as the reimage recorded it.
    pub served: Option<Served>,
    /// This boot of this reimage.
    pub boot: String,
}

/// What `host` is to deploy now, or `None` when it boots its disk. Only a host in
/// `reimaging` whose running reimage is at `agent_booted` — the executor powered it on and
/// recorded so — gets the installer, with that reimage's image: not before power-on (whoever
/// fetches the script then is not the host we booted), and not once the agent reported
/// `verified` (from then on it boots its disk even if its firmware still prefers the
/// network, so it never loops into the installer). `reimaging` without a running reimage (set
/// by hand) deploys nothing: no operation would take the agent's reports.
pub fn deploy_for(host: &Host, op: Option<&Operation>) -> Option<Deploy> {
    if host.state != HostState::Reimaging {
        return None;
    }
    let op = op.filter(|op| op.status == OperationStatus::Running && op.kind == executor::KIND)?;
    let verified = op
        .report
        .as_deref()
        .and_then(|r| serde_json::from_str::<AgentReport>(r).ok())
        .is_some_and(|r| r.stage >= AgentStage::Verified && r.error.is_none());
    if verified || op.step != Step::AgentBooted.as_str() {
        return None;
    }
    let data = serde_json::from_str::<ReimageData>(&op.data).ok()?;
    Some(Deploy { image: data.image, served: data.served, boot: format!("{}:{}", op.id, data.pxe_boots) })
}

impl Deploy {
    /// What the agent fetches.
    pub fn image_ref(&self) -> ImageRef<'_> {
        ImageRef::new(&self.image, self.served.as_ref())
    }
}

/// Which boot loader reads the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// iPXE (BIOS and UEFI without Secure Boot): loads over HTTP.
    Ipxe,
    /// Debian's signed GRUB, network build (UEFI with Secure Boot): loads over TFTP from the
    /// server it booted from; its `exit` hands back to the firmware.
    Grub,
}

/// The kernel arguments of a deploy boot (after the kernel path).
pub(crate) fn deploy_args(host: &Host, params: &DeployParams<'_>, token: &str) -> Vec<String> {
    let base = params.public_url.trim_end_matches('/');
    let mut args = vec![
        format!("nk.server={}", params.tls.map_or(base, |(url, _)| url.trim_end_matches('/'))),
        format!("nk.host={}", host.name),
        format!("nk.token={token}"),
        format!("nk.image={base}/images/{}", params.image.path),
    ];
    if let Some(served) = params.image.served {
        args.push("nk.format=zstd".into());
        args.push(format!("nk.size={}", served.raw_size));
        args.push(format!("nk.sha256={}", served.sha256));
    }
    args.extend(params.tls.map(|(_, ca)| format!("nk.ca={ca}")));
    args.extend(params.root_device.map(|h| format!("nk.root_device={h}")));
    args.extend(host.mac.map(|m| format!("nk.mac={m}")));
    // One word on the command line: TYPE:BASE64.
    args.extend(params.repair_key.map(|k| format!("nk.repair_key={}", k.replacen(' ', ":", 1))));
    args.extend(params.kernel_args.split_whitespace().map(str::to_owned));
    args
}

/// One word for GRUB's shell: single-quoted (nothing inside is special), `'` spelled `'\''`.
pub(crate) fn grub_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script for `host` in `flavor`. `token` is the freshly minted one-time deploy token
/// (only used while reimaging).
pub fn boot_script(host: &Host, params: &DeployParams<'_>, token: Option<&str>, flavor: Flavor) -> String {
    let base = params.public_url.trim_end_matches('/');
    match (host.state, token, flavor) {
        (HostState::Reimaging, Some(token), Flavor::Ipxe) => format!(
            "#!ipxe\n\
             # nodekeeper: {name} is being reimaged with {image}\n\
             echo nodekeeper: loading the deploy ramdisk for {name}\n\
             kernel {base}/images/{kernel} initrd=initrd.img {args}\n\
             initrd --name initrd.img {base}/images/{initrd}\n\
             boot\n",
            name = host.name,
            image = params.image.path,
            kernel = params.kernel,
            initrd = params.initrd,
            args = deploy_args(host, params, token).join(" "),
        ),
        // GRUB reads the kernel and initrd over TFTP (`images/` of the TFTP server is the
        // images directory); with Secure Boot, shim checks the kernel's signature.
        (HostState::Reimaging, Some(token), Flavor::Grub) => format!(
            "# nodekeeper: {name} is being reimaged with {image}\n\
             set timeout=0\n\
             echo {echo}\n\
             linux /images/{kernel} {args}\n\
             initrd /images/{initrd}\n\
             boot\n",
            name = host.name,
            image = params.image.path,
            echo = grub_word(&format!("nodekeeper: loading the deploy ramdisk for {}", host.name)),
            kernel = params.kernel,
            initrd = params.initrd,
            args = deploy_args(host, params, token).iter().map(|a| grub_word(a)).collect::<Vec<_>>().join(" "),
        ),
        (_, _, Flavor::Ipxe) => format!(
            "#!ipxe\n\
             # nodekeeper: {name} ({state}) boots from its local disk\n\
             echo nodekeeper: booting {name} from its local disk\n\
             iseq ${{platform}} efi && goto efi ||\n\
             sanboot --no-describe --drive 0x80 || exit 1\n\
             :efi\n\
             # UEFI: hand back to the firmware, which boots its next entry (the disk)\n\
             exit 0\n",
            name = host.name,
            state = host.state,
        ),
        (_, _, Flavor::Grub) => format!(
            "# nodekeeper: {name} ({state}) boots from its local disk\n\
             echo {echo}\n\
             # hand back to the firmware, which boots its next entry (the disk)\n\
             exit\n",
            name = host.name,
            state = host.state,
            echo = grub_word(&format!("nodekeeper: booting {} from its local disk", host.name)),
        ),
    }
}

/// What GRUB (network build, prefix `/grub`) reads first: it goes on to this host's own
/// script by the MAC it booted from.
pub const GRUB_ENTRY: &str = "# nodekeeper: each host's script is grub/nk/MAC.cfg, made when it is read\n\
set timeout=0\n\
configfile $prefix/nk/${net_default_mac}.cfg\n\
echo 'nodekeeper: no boot script for this machine'\n\
sleep 10\n\
exit\n";

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::Timestamp;

    fn host(state: HostState) -> Host {
        Host {
            name: "node-a".parse().expect("name"),
            mac: Some("52:54:00:00:00:0a".parse().expect("mac")),
            ip: None,
            bmc_url: None,
            bmc_credentials: None,
            state,
            last_heartbeat: None,
            image: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    const PARAMS: DeployParams<'static> = DeployParams {
        public_url: "http://10.20.0.1:8080/",
        tls: None,
        kernel: "deploy/vmlinuz",
        initrd: "deploy/initrd.img",
        kernel_args: "console=ttyS0",
        image: ImageRef { path: "node.img", served: None },
        root_device: None,
        repair_key: None,
    };

    #[test]
    fn reimaging_hosts_get_the_deploy_ramdisk_with_their_token() {
        let s = boot_script(&host(HostState::Reimaging), &PARAMS, Some("t0k3n"), Flavor::Ipxe);
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.20.0.1:8080/images/deploy/vmlinuz initrd=initrd.img nk.server=http://10.20.0.1:8080 nk.host=node-a nk.token=t0k3n nk.image=http://10.20.0.1:8080/images/node.img nk.mac=52:54:00:00:00:0a console=ttyS0\n"), "{s}");
        assert!(s.contains("initrd --name initrd.img http://10.20.0.1:8080/images/deploy/initrd.img\n"));
        assert!(s.ends_with("boot\n"));
    }

    #[test]
    fn a_catalogue_image_is_fetched_compressed_with_its_raw_size() {
        let served =
            Served { file: "catalogue/debian-0123.raw.zst".into(), raw_size: 1 << 30, sha256: "ab".repeat(32) };
        let params = DeployParams { image: ImageRef::new("debian", Some(&served)), ..PARAMS };
        let s = boot_script(&host(HostState::Reimaging), &params, Some("t0k3n"), Flavor::Ipxe);
        let args = format!(
            " nk.image=http://10.20.0.1:8080/images/catalogue/debian-0123.raw.zst nk.format=zstd nk.size=1073741824 nk.sha256={} ",
            "ab".repeat(32)
        );
        assert!(s.contains(&args), "{s}");
    }

    #[test]
    fn the_repair_key_rides_the_command_line_as_one_word() {
        let host = host(HostState::Reimaging);
        let params = DeployParams { repair_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK"), ..PARAMS };
        let args = deploy_args(&host, &params, "tok");
        assert!(args.contains(&"nk.repair_key=ssh-ed25519:AAAAC3NzaC1lZDI1NTE5AAAAIK".to_owned()), "{args:?}");
        assert!(!deploy_args(&host, &PARAMS, "tok").iter().any(|a| a.starts_with("nk.repair_key")));
    }

    #[test]
    fn a_root_device_hint_rides_the_command_line() {
        let params = DeployParams { root_device: Some("serial=S4EW,size>=1073741824B"), ..PARAMS };
        let s = boot_script(&host(HostState::Reimaging), &params, Some("t0k3n"), Flavor::Ipxe);
        assert!(
            s.contains(" nk.root_device=serial=S4EW,size>=1073741824B nk.mac=52:54:00:00:00:0a console=ttyS0\n"),
            "{s}"
        );
    }

    #[test]
    fn with_tls_the_agent_reports_over_https_and_learns_the_ca_digest() {
        let params = DeployParams { tls: Some(("https://10.20.0.1:8443/", "ab12")), ..PARAMS };
        let s = boot_script(&host(HostState::Reimaging), &params, Some("t0k3n"), Flavor::Ipxe);
        assert!(s.contains(" nk.server=https://10.20.0.1:8443 nk.host=node-a nk.token=t0k3n nk.image=http://10.20.0.1:8080/images/node.img nk.ca=ab12 nk.mac=52:54:00:00:00:0a console=ttyS0\n"), "{s}");
        // The firmware still loads the ramdisk over plain HTTP.
        assert!(s.contains("kernel http://10.20.0.1:8080/images/deploy/vmlinuz "), "{s}");
    }

    #[test]
    fn every_other_state_boots_the_local_disk() {
        for state in [HostState::Active, HostState::Suspect, HostState::Fenced, HostState::Maintenance] {
            let s = boot_script(&host(state), &PARAMS, None, Flavor::Ipxe);
            assert!(s.contains("sanboot --no-describe --drive 0x80 || exit 1"), "{state}: {s}");
            assert!(
                s.contains("iseq ${platform} efi && goto efi ||\n")
                    && s.ends_with(
                        ":efi\n# UEFI: hand back to the firmware, which boots its next entry (the disk)\nexit 0\n"
                    ),
                "{state}: UEFI hands back to the firmware: {s}"
            );
            assert!(!s.contains("kernel"), "{state}: {s}");
        }
        // Reimaging without a token (none could be minted) never hands out the installer.
        assert!(boot_script(&host(HostState::Reimaging), &PARAMS, None, Flavor::Ipxe).contains("sanboot"));
    }

    #[test]
    fn grub_scripts_load_over_tftp_quote_every_argument_and_exit_to_the_firmware() {
        let params = DeployParams { root_device: Some("size>=1073741824B"), ..PARAMS };
        let s = boot_script(&host(HostState::Reimaging), &params, Some("t0k3n"), Flavor::Grub);
        assert!(s.contains("\nlinux /images/deploy/vmlinuz 'nk.server=http://10.20.0.1:8080' 'nk.host=node-a' 'nk.token=t0k3n' 'nk.image=http://10.20.0.1:8080/images/node.img' 'nk.root_device=size>=1073741824B' 'nk.mac=52:54:00:00:00:0a' 'console=ttyS0'\n"), "{s}");
        assert!(s.contains("\ninitrd /images/deploy/initrd.img\nboot\n"), "{s}");
        for state in [HostState::Active, HostState::Fenced] {
            let s = boot_script(&host(state), &PARAMS, None, Flavor::Grub);
            assert!(s.ends_with("\nexit\n") && !s.contains("linux"), "{s}");
        }
        assert_eq!(grub_word("it's"), "'it'\\''s'");
        assert!(GRUB_ENTRY.contains("configfile $prefix/nk/${net_default_mac}.cfg"));
    }

    fn op(step: &str, report: Option<&str>) -> Operation {
        Operation {
            id: 1,
            kind: executor::KIND.into(),
            target: "node-a".parse().expect("name"),
            step: step.into(),
            status: OperationStatus::Running,
            attempts: 0,
            deadline: None,
            last_error: None,
            data: serde_json::to_string(&ReimageData {
                image: "requested.img".into(),
                pxe_boots: 1,
                agent: None,
                deadlines: Default::default(),
                limits: Default::default(),
                boot_path: Default::default(),
                served: None,
            })
            .expect("json"),
            report: report.map(str::to_owned),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            cancel_requested: None,
        }
    }

    #[test]
    fn only_a_reimage_that_powered_the_host_on_deploys_until_it_verified() {
        let mut h = host(HostState::Reimaging);
        h.image = Some("previous.img".into());
        let deploy = |h: &Host, op: Option<&Operation>| deploy_for(h, op).map(|d| d.image);
        assert_eq!(deploy(&host(HostState::Active), Some(&op("agent_booted", None))), None);
        // The image this reimage asked for, not the one the host had, for this boot.
        assert_eq!(
            deploy_for(&h, Some(&op("agent_booted", None))),
            Some(Deploy { image: "requested.img".into(), served: None, boot: "1:1".into() })
        );
        // Before the executor recorded power_on, nobody gets the installer.
        for step in ["power_off", "pxe_next_boot", "power_on"] {
            assert_eq!(deploy(&h, Some(&op(step, None))), None, "{step}");
        }
        // Once the agent runs past its first report, a new fetch gets nothing either.
        let written = r#"{"stage":"written","error":null}"#;
        assert_eq!(deploy(&h, Some(&op("image_written", Some(written)))), None);
        let verified = r#"{"stage":"verified","error":null}"#;
        assert_eq!(deploy(&h, Some(&op("agent_booted", Some(verified)))), None);
        assert_eq!(deploy(&h, Some(&op("local_boot", None))), None);
        assert_eq!(deploy(&h, Some(&op("heartbeat", None))), None);
        // Reimaging set by hand, or only an ended operation: nothing to deploy.
        let mut ended = op("agent_booted", None);
        ended.status = OperationStatus::Done;
        assert_eq!(deploy(&h, Some(&ended)), None);
        assert_eq!(deploy(&host(HostState::Reimaging), None), None);
    }
}
