//! IPMI over LAN (lanplus) through `ipmitool`, tested against VirtualBMC. The password goes
//! through the environment (`-E`), never on a command line another user could read in `ps`.

use std::time::Duration;

use tokio::process::Command;

use nodekeeper_store::BootMode;

use super::{Bmc, BmcError, BootTarget, Credentials, PowerState};

/// How long one ipmitool call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// One IPMI BMC.
#[derive(Debug)]
pub struct Ipmi {
    host: String,
    port: u16,
    credentials: Option<Credentials>,
}

impl Ipmi {
    /// A driver for `ipmi://HOST[:PORT]` (port 623 by default).
    pub fn new(url: &str, credentials: Option<Credentials>) -> Result<Ipmi, BmcError> {
        let rest = url.strip_prefix("ipmi://").ok_or_else(|| BmcError::Config(format!("not an IPMI URL: {url:?}")))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| BmcError::Config(format!("bad IPMI port in {url:?}")))?),
            None => (rest, 623),
        };
        if host.is_empty() {
            return Err(BmcError::Config(format!("IPMI URL {url:?} has no host")));
        }
        Ok(Ipmi { host: host.to_owned(), port, credentials })
    }

    async fn run(&self, args: &[&str]) -> Result<String, BmcError> {
        let mut cmd = Command::new("ipmitool");
        cmd.args(["-I", "lanplus", "-H", &self.host, "-p", &self.port.to_string(), "-N", "2", "-R", "2"]);
        if let Some(c) = &self.credentials {
            cmd.args(["-U", &c.user, "-E"]).env("IPMI_PASSWORD", &c.password);
        }
        cmd.args(args).kill_on_drop(true);
        let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| BmcError::Unreachable { endpoint: self.endpoint(), reason: "ipmitool timed out".into() })?
            .map_err(|e| BmcError::Config(format!("running ipmitool: {e}")))?;
        if !out.status.success() {
            let reason =
                String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("ipmitool failed").to_owned();
            return Err(BmcError::Unreachable { endpoint: self.endpoint(), reason });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Bmc for Ipmi {
    fn endpoint(&self) -> String {
        format!("ipmi://{}:{}", self.host, self.port)
    }

    async fn power_state(&self) -> Result<PowerState, BmcError> {
        let out = self.run(&["chassis", "power", "status"]).await?;
        let state = PowerState::from_ipmitool(&out);
        if state == PowerState::Unknown {
            tracing::warn!(bmc = %self.endpoint(), "unexpected answer {:?}: taken as not off", out.trim());
        }
        Ok(state)
    }

    async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        self.run(&["chassis", "power", if on { "on" } else { "off" }]).await.map(drop)
    }

    async fn set_boot_once(&self, target: BootTarget, mode: Option<BootMode>) -> Result<(), BmcError> {
        self.check_boot(target).await?;
        // Without options=persistent, IPMI boot device overrides apply to the next boot only;
        // `efiboot` sets the "boot in UEFI mode" bit of the boot flags (IPMI 2.0, parameter 5).
        let device = if target == BootTarget::Cd { "cdrom" } else { "pxe" };
        let mut args = vec!["chassis", "bootdev", device];
        if mode.is_some_and(BootMode::is_uefi) {
            args.push("options=efiboot");
        }
        self.run(&args).await.map(drop)
    }

    async fn check_boot(&self, target: BootTarget) -> Result<(), BmcError> {
        // IPMI's boot devices (IPMI 2.0 table 28-14) have no HTTP boot and no way to attach
        // media: those paths need a Redfish BMC.
        match target {
            BootTarget::Pxe => Ok(()),
            BootTarget::UefiHttp | BootTarget::Cd => Err(BmcError::Unsupported {
                endpoint: self.endpoint(),
                reason: format!(
                    "IPMI has no {} boot: use a Redfish BMC URL for this host, or `host set --boot pxe`",
                    if target == BootTarget::Cd { "virtual media" } else { "UEFI HTTP" }
                ),
            }),
        }
    }

    async fn insert_media(&self, _: &str) -> Result<(), BmcError> {
        self.check_boot(BootTarget::Cd).await
    }

    async fn eject_media(&self) -> Result<(), BmcError> {
        self.check_boot(BootTarget::Cd).await
    }

    async fn set_http_boot_uri_once(&self, _: &str, _: Option<BootMode>) -> Result<(), BmcError> {
        self.check_boot(BootTarget::UefiHttp).await
    }

    async fn takes_http_boot_uri(&self) -> Result<bool, BmcError> {
        Ok(false)
    }

    async fn set_disk_boot(&self, mode: Option<BootMode>) -> Result<(), BmcError> {
        let options =
            if mode.is_some_and(BootMode::is_uefi) { "options=persistent,efiboot" } else { "options=persistent" };
        self.run(&["chassis", "bootdev", "disk", options]).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let i = Ipmi::new("ipmi://127.0.0.1:6230", None).expect("url");
        assert_eq!((i.host.as_str(), i.port), ("127.0.0.1", 6230));
        assert_eq!(Ipmi::new("ipmi://bmc.example", None).expect("url").port, 623);
        assert!(Ipmi::new("ipmi://", None).is_err());
        assert!(Ipmi::new("ipmi://h:x", None).is_err());
    }
}
