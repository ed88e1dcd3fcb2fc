//! An in-memory BMC for tests and dry runs: it powers nothing, records what it was asked, and
//! can be told to fail (injected BMC errors). Documented test double — the real drivers are
//! tested against sushy-tools and VirtualBMC.

use std::sync::{Arc, Mutex};

use super::{Bmc, BmcError, PowerState};

/// The fake's state, visible to tests.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Powered on.
    pub on: bool,
    /// A one-time PXE boot is set.
    pub pxe_once: bool,
    /// The target of the last one-time boot override.
    pub boot_target: Option<super::BootTarget>,
    /// Refuse boot checks and overrides for these targets (a BMC without them; `Cd`: no
    /// virtual media either).
    pub lacks: Vec<super::BootTarget>,
    /// The image in its virtual CD.
    pub media: Option<String>,
    /// Every insert and eject, in order (`insert URL`, `eject`).
    pub media_log: Vec<String>,
    /// Fail every eject (a BMC that lost its virtual media service).
    pub eject_fails: bool,
    /// It takes `HttpBootUri`.
    pub http_boot_uri: bool,
    /// The `HttpBootUri` of the last one-time UEFI HTTP boot.
    pub boot_uri: Option<String>,
    /// Boot from disk is set.
    pub disk_boot: bool,
    /// The firmware mode the last boot override asked for.
    pub boot_mode: Option<nodekeeper_store::BootMode>,
    /// Times it was powered on.
    pub power_ons: u32,
    /// Fail this many power commands.
    pub fail_next: u32,
    /// Fail every power command.
    pub always_fail: bool,
    /// Never answer a power command (a hung BMC: the caller's timeout must fire).
    pub hang: bool,
}

/// An in-memory BMC.
#[derive(Clone, Default, Debug)]
pub struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    /// Reads its state.
    pub fn get<T>(&self, f: impl FnOnce(&FakeState) -> T) -> T {
        f(&self.0.lock().expect("lock"))
    }
    /// Changes its state.
    pub fn set(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.0.lock().expect("lock"))
    }
}

impl Bmc for Fake {
    fn endpoint(&self) -> String {
        format!("fake-{:p}", Arc::as_ptr(&self.0))
    }
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        Ok(if self.get(|s| s.on) { PowerState::On } else { PowerState::Off })
    }
    async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        if self.get(|s| s.hang) {
            std::future::pending::<()>().await;
        }
        let mut s = self.0.lock().expect("lock");
        if s.always_fail || s.fail_next > 0 {
            s.fail_next = s.fail_next.saturating_sub(1);
            return Err(BmcError::Refused { endpoint: "fake".into(), reason: "HTTP 500".into() });
        }
        if on && !s.on {
            s.power_ons += 1;
        }
        s.on = on;
        Ok(())
    }
    async fn set_boot_once(
        &self,
        target: super::BootTarget,
        mode: Option<nodekeeper_store::BootMode>,
    ) -> Result<(), BmcError> {
        self.check_boot(target).await?;
        self.set(|s| {
            (s.pxe_once, s.boot_target, s.boot_mode) = (true, Some(target), mode);
            s.boot_uri = None;
        });
        Ok(())
    }
    async fn insert_media(&self, url: &str) -> Result<(), BmcError> {
        self.check_boot(super::BootTarget::Cd).await?;
        self.set(|s| {
            s.media = Some(url.to_owned());
            s.media_log.push(format!("insert {url}"));
        });
        Ok(())
    }
    async fn set_http_boot_uri_once(
        &self,
        uri: &str,
        mode: Option<nodekeeper_store::BootMode>,
    ) -> Result<(), BmcError> {
        self.check_boot(super::BootTarget::UefiHttp).await?;
        if !self.get(|s| s.http_boot_uri) {
            return Err(BmcError::Refused { endpoint: "fake".into(), reason: "HttpBootUri: unknown property".into() });
        }
        self.set(|s| {
            (s.pxe_once, s.boot_target, s.boot_mode) = (true, Some(super::BootTarget::UefiHttp), mode);
            s.boot_uri = Some(uri.to_owned());
        });
        Ok(())
    }
    async fn takes_http_boot_uri(&self) -> Result<bool, BmcError> {
        Ok(self.get(|s| s.http_boot_uri))
    }
    async fn eject_media(&self) -> Result<(), BmcError> {
        self.check_boot(super::BootTarget::Cd).await?;
        if self.get(|s| s.eject_fails) {
            return Err(BmcError::Refused { endpoint: "fake".into(), reason: "HTTP 503: virtual media busy".into() });
        }
        self.set(|s| {
            s.media = None;
            s.media_log.push("eject".into());
        });
        Ok(())
    }
    async fn check_boot(&self, target: super::BootTarget) -> Result<(), BmcError> {
        if self.get(|s| s.lacks.contains(&target)) {
            let reason = format!("boot target {} is not supported", target.redfish());
            return Err(BmcError::Unsupported { endpoint: "fake".into(), reason });
        }
        Ok(())
    }
    async fn set_disk_boot(&self, mode: Option<nodekeeper_store::BootMode>) -> Result<(), BmcError> {
        self.set(|s| (s.disk_boot, s.boot_mode) = (true, mode));
        Ok(())
    }
}

/// A fake BMC per host name, with a quick confirmation policy (200 ms, one command, 5 ms
/// polls): the factory tests give the executors.
#[derive(Clone, Default, Debug)]
pub struct Fakes(pub Arc<std::collections::HashMap<String, Fake>>);

impl Fakes {
    /// One fake for each of `hosts`.
    pub fn of(hosts: impl IntoIterator<Item = (String, Fake)>) -> Fakes {
        Fakes(Arc::new(hosts.into_iter().collect()))
    }
}

impl super::BmcFactory for Fakes {
    type B = Fake;
    fn for_host(&self, host: &nodekeeper_store::Host) -> Result<Fake, BmcError> {
        self.0.get(host.name.as_str()).cloned().ok_or_else(|| BmcError::Config(format!("no BMC for {}", host.name)))
    }
    fn policy(&self) -> super::Policy {
        super::Policy {
            confirm_within: std::time::Duration::from_millis(200),
            attempts: 1,
            poll: std::time::Duration::from_millis(5),
        }
    }
}
