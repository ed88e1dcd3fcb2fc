//! The iPXE script a host gets at `/boot/{mac}.ipxe`, as a pure function of its state.
//!
//! A host being reimaged gets the deploy ramdisk with a one-time token on its kernel command
//! line; every other known host boots its local disk, so a deployed host never loops back
//! into the installer (a classic of netboot systems).

use nodekeeper_store::{Host, HostState, Operation, OperationStatus};

use crate::reimage::executor;
use crate::reimage::machine::{AgentReport, AgentStage, ReimageData};

/// What the deploy ramdisk needs to know.
#[derive(Debug, Clone)]
pub struct DeployParams<'a> {
    /// The provisioner's base URL, as nodes reach it.
    pub public_url: &'a str,
    /// Deploy kernel, relative to `/images/`.
    pub kernel: &'a str,
    /// Deploy initramfs, relative to `/images/`.
    pub initrd: &'a str,
    /// Extra kernel arguments.
    pub kernel_args: &'a str,
    /// The image to write, relative to `/images/`.
    pub image: &'a str,
}

/// The image `host` is to be deployed with now, or `None` when it boots its disk. A host in
/// `reimaging` gets its running reimage's image — until the agent reported `verified` (or the
/// step moved past it): from then on it boots its disk even if its BIOS still prefers the
/// network, so it never loops into the installer, and no new token orphans the one in the
/// disk's config block. `reimaging` without a running reimage (set by hand) deploys the
/// host's own image.
pub fn deploy_image(host: &Host, op: Option<&Operation>, default: &str) -> Option<String> {
    if host.state != HostState::Reimaging {
        return None;
    }
    let own = || host.image.clone().unwrap_or_else(|| default.to_owned());
    let Some(op) = op.filter(|op| op.status == OperationStatus::Running && op.kind == executor::KIND) else {
        return Some(own());
    };
    let verified = op
        .report
        .as_deref()
        .and_then(|r| serde_json::from_str::<AgentReport>(r).ok())
        .is_some_and(|r| r.stage >= AgentStage::Verified && r.error.is_none());
    if verified || matches!(op.step.as_str(), "local_boot" | "heartbeat") {
        return None;
    }
    Some(serde_json::from_str::<ReimageData>(&op.data).map(|d| d.image).unwrap_or_else(|_| own()))
}

/// The script for `host`. `token` is the freshly minted one-time deploy token (only used
/// while reimaging).
pub fn boot_script(host: &Host, params: &DeployParams<'_>, token: Option<&str>) -> String {
    let base = params.public_url.trim_end_matches('/');
    match (host.state, token) {
        (HostState::Reimaging, Some(token)) => format!(
            "#!ipxe\n\
             # nodekeeper: {name} is being reimaged with {image}\n\
             echo nodekeeper: loading the deploy ramdisk for {name}\n\
             kernel {base}/images/{kernel} initrd=initrd.img nk.server={base} nk.host={name} nk.token={token} nk.image={base}/images/{image} {args}\n\
             initrd --name initrd.img {base}/images/{initrd}\n\
             boot\n",
            name = host.name,
            image = params.image,
            kernel = params.kernel,
            initrd = params.initrd,
            args = params.kernel_args,
        ),
        _ => format!(
            "#!ipxe\n\
             # nodekeeper: {name} ({state}) boots from its local disk\n\
             echo nodekeeper: booting {name} from its local disk\n\
             sanboot --no-describe --drive 0x80 || exit 1\n",
            name = host.name,
            state = host.state,
        ),
    }
}

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
        kernel: "deploy/vmlinuz",
        initrd: "deploy/initrd.img",
        kernel_args: "console=ttyS0",
        image: "node.img",
    };

    #[test]
    fn reimaging_hosts_get_the_deploy_ramdisk_with_their_token() {
        let s = boot_script(&host(HostState::Reimaging), &PARAMS, Some("t0k3n"));
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.20.0.1:8080/images/deploy/vmlinuz initrd=initrd.img nk.server=http://10.20.0.1:8080 nk.host=node-a nk.token=t0k3n nk.image=http://10.20.0.1:8080/images/node.img console=ttyS0\n"), "{s}");
        assert!(s.contains("initrd --name initrd.img http://10.20.0.1:8080/images/deploy/initrd.img\n"));
        assert!(s.ends_with("boot\n"));
    }

    #[test]
    fn every_other_state_boots_the_local_disk() {
        for state in [HostState::Active, HostState::Suspect, HostState::Fenced, HostState::Maintenance] {
            let s = boot_script(&host(state), &PARAMS, None);
            assert!(s.contains("sanboot --no-describe --drive 0x80 || exit 1"), "{state}: {s}");
            assert!(!s.contains("kernel"), "{state}: {s}");
        }
        // Reimaging without a token (none could be minted) never hands out the installer.
        assert!(boot_script(&host(HostState::Reimaging), &PARAMS, None).contains("sanboot"));
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
            })
            .expect("json"),
            report: report.map(str::to_owned),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    #[test]
    fn the_deploy_image_is_the_running_reimages_until_it_verified() {
        let mut h = host(HostState::Reimaging);
        h.image = Some("previous.img".into());
        assert_eq!(deploy_image(&host(HostState::Active), Some(&op("agent_booted", None)), "node.img"), None);
        // The image this reimage asked for, not the one the host had.
        for step in ["power_on", "agent_booted", "image_written", "verified"] {
            assert_eq!(deploy_image(&h, Some(&op(step, None)), "node.img").as_deref(), Some("requested.img"), "{step}");
        }
        let written = r#"{"stage":"written","error":null}"#;
        assert_eq!(deploy_image(&h, Some(&op("image_written", Some(written))), "x").as_deref(), Some("requested.img"));
        // Verified (even before the executor's next tick), or past it: the local disk.
        let verified = r#"{"stage":"verified","error":null}"#;
        assert_eq!(deploy_image(&h, Some(&op("image_written", Some(verified))), "x"), None);
        assert_eq!(deploy_image(&h, Some(&op("local_boot", None)), "x"), None);
        assert_eq!(deploy_image(&h, Some(&op("heartbeat", None)), "x"), None);
        // A failed verification is not a verified image.
        let bad = r#"{"stage":"verified","error":"sha256 mismatch"}"#;
        assert!(deploy_image(&h, Some(&op("verified", Some(bad))), "x").is_some());
        // Reimaging set by hand, or only an ended operation: the host's own image, or the default.
        let mut ended = op("done", None);
        ended.status = OperationStatus::Done;
        assert_eq!(deploy_image(&h, Some(&ended), "x").as_deref(), Some("previous.img"));
        assert_eq!(deploy_image(&host(HostState::Reimaging), None, "node.img").as_deref(), Some("node.img"));
    }
}
