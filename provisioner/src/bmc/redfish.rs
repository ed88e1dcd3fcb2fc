//! Redfish (DMTF DSP0266): `ComputerSystem.Reset`, `PowerState`, and a one-time
//! `BootSourceOverrideTarget = Pxe` (with `BootSourceOverrideMode` when the host's boot mode
//! is known and the BMC has another). Basic auth; tested against sushy-tools (libvirt driver).
//!
//! URLs: `redfish+http://HOST:PORT/redfish/v1/Systems/ID`, `redfish+https://…` or
//! `redfish://…` (HTTPS). Without a system path, the first system of the collection is used.
//! BMCs ship self-signed certificates: `?verify=false` accepts them (say so explicitly).

use std::time::Duration;

use serde_json::{json, Value};

use nodekeeper_store::BootMode;

use super::{Bmc, BmcError, BootTarget, Credentials, PowerState};

/// One Redfish system.
#[derive(Debug)]
pub struct Redfish {
    base: String,
    system: Option<String>,
    client: reqwest::Client,
    credentials: Option<Credentials>,
}

impl Redfish {
    /// A driver for `url`.
    pub fn new(url: &str, credentials: Option<Credentials>) -> Result<Redfish, BmcError> {
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| BmcError::Config(format!("BMC URL {url:?} has no scheme")))?;
        let http = match scheme {
            "redfish+http" | "http" => "http",
            "redfish" | "redfish+https" | "https" => "https",
            other => return Err(BmcError::Config(format!("not a Redfish URL scheme: {other}"))),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let verify = !query.split('&').any(|kv| kv == "verify=false");
        let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        if host.is_empty() {
            return Err(BmcError::Config(format!("BMC URL {url:?} has no host")));
        }
        let system =
            (!path.is_empty() && path.contains("Systems/")).then(|| format!("/{}", path.trim_end_matches('/')));
        let client = reqwest::Client::builder()
            .user_agent(super::user_agent())
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .danger_accept_invalid_certs(!verify)
            .build()
            .map_err(|e| BmcError::Config(format!("HTTP client: {e}")))?;
        Ok(Redfish { base: format!("{http}://{host}"), system, client, credentials })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base)).header("Accept", "application/json");
        match &self.credentials {
            Some(c) => r.basic_auth(&c.user, Some(&c.password)),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<Value, BmcError> {
        let resp =
            r.send().await.map_err(|e| BmcError::Unreachable { endpoint: self.endpoint(), reason: without_url(&e) })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| body.chars().take(200).collect());
            return Err(BmcError::Refused { endpoint: self.endpoint(), reason: format!("HTTP {status}: {detail}") });
        }
        Ok(if body.trim().is_empty() { Value::Null } else { serde_json::from_str(&body).unwrap_or(Value::Null) })
    }

    /// The system's path, discovering the first one when the URL names none.
    async fn system(&self) -> Result<String, BmcError> {
        if let Some(s) = &self.system {
            return Ok(s.clone());
        }
        let v = self.send(self.request(reqwest::Method::GET, "/redfish/v1/Systems")).await?;
        v.pointer("/Members/0/@odata.id").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| BmcError::Refused {
            endpoint: self.endpoint(),
            reason: "no system in /redfish/v1/Systems".into(),
        })
    }
}

impl Redfish {
    /// Sets the boot override. With a mode, `BootSourceOverrideMode` is sent only when the
    /// system reports another one (one that reports none does not have the setting): BMCs
    /// differ here (iDRAC turns a mode change into a BIOS
    /// setting and wants it with a UEFI target; iLO 5 and others keep it read-only, and
    /// sushy-tools' libvirt driver rebuilds the firmware section, Secure Boot off, on every
    /// mode it is sent). A mode the BMC lists as not allowed fails here with what to do.
    async fn boot_override(
        &self,
        target: &str,
        enabled: &str,
        mode: Option<BootMode>,
        uri: Option<&str>,
    ) -> Result<(), BmcError> {
        let system = self.system().await?;
        let mut boot = json!({ "BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": enabled });
        if let Some(uri) = uri {
            boot["HttpBootUri"] = json!(uri);
        }
        if let Some(mode) = mode {
            let wanted = if mode.is_uefi() { "UEFI" } else { "Legacy" };
            let v = self.send(self.request(reqwest::Method::GET, &system)).await?;
            let current = v.pointer("/Boot/BootSourceOverrideMode").and_then(Value::as_str);
            if current.is_some_and(|c| c != wanted) {
                let allowed =
                    v.pointer("/Boot/BootSourceOverrideMode@Redfish.AllowableValues").and_then(Value::as_array);
                if let Some(allowed) = allowed.filter(|a| !a.iter().any(|m| m.as_str() == Some(wanted))) {
                    let allowed: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
                    return Err(BmcError::Refused {
                        endpoint: self.endpoint(),
                        reason: format!(
                            "the host boots in {mode} mode but the BMC's boot override mode is {} and it allows only \
                             [{}]: set the boot mode in the server's firmware setup, or the host's with \
                             `host set --boot-mode`",
                            current.unwrap_or_default(),
                            allowed.join(", ")
                        ),
                    });
                }
                boot["BootSourceOverrideMode"] = json!(wanted);
            }
        }
        let body = json!({ "Boot": boot });
        let refused = match self.send(self.request(reqwest::Method::PATCH, &system).json(&body)).await {
            Ok(_) => return Ok(()),
            Err(e @ BmcError::Refused { .. }) => e,
            Err(e) => return Err(e),
        };
        // BMCs built on AMI MegaRAC (Lenovo's TSM among them) take Boot changes only at the
        // system's settings object (`@Redfish.Settings`, applied at the next reset): there,
        // when the system names one; else the BMC's own refusal.
        let Ok(v) = self.send(self.request(reqwest::Method::GET, &system)).await else { return Err(refused) };
        match v.pointer("/@Redfish.Settings/SettingsObject/@odata.id").and_then(Value::as_str) {
            Some(settings) if settings != system => {
                tracing::info!(bmc = %self.endpoint(), "boot override refused at the system; sent to {settings}");
                self.send(self.request(reqwest::Method::PATCH, settings).json(&body)).await.map(drop)
            }
            _ => Err(refused),
        }
    }
    /// Whether the system lists `target` among its boot override targets (one that lists
    /// none passes).
    async fn check_target(&self, target: BootTarget) -> Result<(), BmcError> {
        let system = self.system().await?;
        let v = self.send(self.request(reqwest::Method::GET, &system)).await?;
        let allowed = v.pointer("/Boot/BootSourceOverrideTarget@Redfish.AllowableValues").and_then(Value::as_array);
        match allowed {
            Some(allowed) if !allowed.iter().any(|t| t.as_str() == Some(target.redfish())) => {
                let allowed: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
                let mode = v.pointer("/Boot/BootSourceOverrideMode").and_then(Value::as_str);
                Err(BmcError::Unsupported {
                    endpoint: self.endpoint(),
                    reason: format!(
                        "the system's boot override targets are [{}]{}: no {}",
                        allowed.join(", "),
                        mode.map(|m| format!(" (in {m} mode)")).unwrap_or_default(),
                        target.redfish()
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// The system's virtual CD slot and its state: the first `VirtualMedia` member whose
    /// `MediaTypes` hold `CD` or `DVD`, under the system (Redfish 2021.1 on, sushy-tools) or
    /// under a manager of it (iDRAC, iLO before that).
    async fn virtual_cd(&self) -> Result<(String, Value), BmcError> {
        let system = self.system().await?;
        let v = self.send(self.request(reqwest::Method::GET, &system)).await?;
        let mut collections: Vec<String> =
            v.pointer("/VirtualMedia/@odata.id").and_then(Value::as_str).map(str::to_owned).into_iter().collect();
        if collections.is_empty() {
            let managers = v.pointer("/Links/ManagedBy").and_then(Value::as_array).cloned().unwrap_or_default();
            for m in managers.iter().filter_map(|m| m.get("@odata.id").and_then(Value::as_str)) {
                let manager = self.send(self.request(reqwest::Method::GET, m)).await?;
                collections
                    .extend(manager.pointer("/VirtualMedia/@odata.id").and_then(Value::as_str).map(str::to_owned));
            }
        }
        for collection in &collections {
            let c = self.send(self.request(reqwest::Method::GET, collection)).await?;
            let members = c.get("Members").and_then(Value::as_array).cloned().unwrap_or_default();
            for member in members.iter().filter_map(|m| m.get("@odata.id").and_then(Value::as_str)) {
                let slot = self.send(self.request(reqwest::Method::GET, member)).await?;
                let types = slot.get("MediaTypes").and_then(Value::as_array).cloned().unwrap_or_default();
                if types.iter().any(|t| matches!(t.as_str(), Some("CD" | "DVD"))) {
                    return Ok((member.to_owned(), slot));
                }
            }
        }
        Err(BmcError::Unsupported {
            endpoint: self.endpoint(),
            reason: if collections.is_empty() {
                "no virtual media: neither the system nor its managers list a VirtualMedia collection".into()
            } else {
                format!("no virtual CD or DVD in {}", collections.join(", "))
            },
        })
    }

    /// POSTs the slot's `VirtualMedia.{action}` (at the target the slot names, else the
    /// standard path).
    async fn post_action(&self, slot: &str, v: &Value, action: &str, body: Value) -> Result<(), BmcError> {
        let named = v.pointer(&format!("/Actions/#VirtualMedia.{action}/target")).and_then(Value::as_str);
        let target = named.map_or_else(|| format!("{slot}/Actions/VirtualMedia.{action}"), str::to_owned);
        self.send(self.request(reqwest::Method::POST, &target).json(&body)).await.map(drop)
    }
}

/// reqwest's errors include the URL; ours already name the endpoint.
fn without_url(e: &reqwest::Error) -> String {
    let mut e2 = e.to_string();
    if let Some(url) = e.url() {
        e2 = e2.replace(url.as_str(), "");
    }
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        e2 = s.to_string();
        src = s.source();
    }
    e2
}

impl Bmc for Redfish {
    fn endpoint(&self) -> String {
        format!("{}{}", self.base, self.system.as_deref().unwrap_or(""))
    }

    async fn power_state(&self) -> Result<PowerState, BmcError> {
        let system = self.system().await?;
        let v = self.send(self.request(reqwest::Method::GET, &system)).await?;
        let raw = v.get("PowerState").and_then(Value::as_str);
        let state = PowerState::from_redfish(raw);
        if state == PowerState::Unknown {
            tracing::warn!(bmc = %self.endpoint(), "unexpected PowerState {raw:?}: taken as not off");
        }
        Ok(state)
    }

    async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        let system = self.system().await?;
        let reset = if on { "On" } else { "ForceOff" };
        self.send(
            self.request(reqwest::Method::POST, &format!("{system}/Actions/ComputerSystem.Reset"))
                .json(&json!({ "ResetType": reset })),
        )
        .await
        .map(drop)
    }

    async fn set_boot_once(&self, target: BootTarget, mode: Option<BootMode>) -> Result<(), BmcError> {
        if target != BootTarget::Pxe {
            self.check_boot(target).await?;
        }
        self.boot_override(target.redfish(), "Once", mode, None).await
    }

    async fn set_http_boot_uri_once(&self, uri: &str, mode: Option<BootMode>) -> Result<(), BmcError> {
        self.check_boot(BootTarget::UefiHttp).await?;
        self.boot_override(BootTarget::UefiHttp.redfish(), "Once", mode, Some(uri)).await
    }

    /// The system's `Boot` has `HttpBootUri` (Redfish 2019.1 on; null until set).
    async fn takes_http_boot_uri(&self) -> Result<bool, BmcError> {
        let system = self.system().await?;
        let v = self.send(self.request(reqwest::Method::GET, &system)).await?;
        Ok(v.pointer("/Boot").and_then(Value::as_object).is_some_and(|b| b.contains_key("HttpBootUri")))
    }

    /// A target the system's `BootSourceOverrideTarget@Redfish.AllowableValues` leaves out is
    /// refused with that list (a system that lists none is taken at its word when the PATCH
    /// comes: its refusal is the message then). `Cd` also needs a virtual CD.
    async fn check_boot(&self, target: BootTarget) -> Result<(), BmcError> {
        self.check_target(target).await?;
        if target == BootTarget::Cd {
            self.virtual_cd().await?;
        }
        Ok(())
    }

    async fn insert_media(&self, url: &str) -> Result<(), BmcError> {
        let (slot, v) = self.virtual_cd().await?;
        let inserted = v.get("Inserted").and_then(Value::as_bool) == Some(true);
        if inserted && v.get("Image").and_then(Value::as_str) == Some(url) {
            return Ok(());
        }
        if inserted || v.get("Image").and_then(Value::as_str).is_some_and(|i| !i.is_empty()) {
            self.post_action(&slot, &v, "EjectMedia", json!({})).await?;
        }
        let body = json!({ "Image": url, "Inserted": true, "WriteProtected": true });
        self.post_action(&slot, &v, "InsertMedia", body).await?;
        let after = self.send(self.request(reqwest::Method::GET, &slot)).await?;
        let now = (after.get("Inserted").and_then(Value::as_bool), after.get("Image").and_then(Value::as_str));
        match now {
            (Some(true), Some(image)) if image == url => Ok(()),
            // Some BMCs show only the image's file name.
            (Some(true), Some(image)) if url.ends_with(image) && !image.is_empty() => Ok(()),
            (inserted, image) => Err(BmcError::Refused {
                endpoint: self.endpoint(),
                reason: format!(
                    "InsertMedia was accepted but {slot} says Inserted={} Image={}",
                    inserted.map_or("(none)".into(), |b| b.to_string()),
                    image.unwrap_or("(none)")
                ),
            }),
        }
    }

    async fn eject_media(&self) -> Result<(), BmcError> {
        let (slot, v) = self.virtual_cd().await?;
        let inserted = v.get("Inserted").and_then(Value::as_bool) == Some(true);
        if !inserted && v.get("Image").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Ok(());
        }
        self.post_action(&slot, &v, "EjectMedia", json!({})).await?;
        let after = self.send(self.request(reqwest::Method::GET, &slot)).await?;
        if after.get("Inserted").and_then(Value::as_bool) == Some(true) {
            return Err(BmcError::Refused {
                endpoint: self.endpoint(),
                reason: format!("EjectMedia was accepted but {slot} still says Inserted=true"),
            });
        }
        Ok(())
    }

    async fn set_disk_boot(&self, mode: Option<BootMode>) -> Result<(), BmcError> {
        self.boot_override("Hdd", "Continuous", mode, None).await
    }
}

/// A switched PDU outlet through Redfish (DMTF `Outlet`, under `PowerEquipment` —
/// `redfish+https://PDU/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/A1`): its `PowerState`,
/// and `#Outlet.PowerControl` with `{"PowerState": "On" | "Off"}` (the target the outlet
/// names, else the schema's path).
#[derive(Debug)]
pub struct Outlet {
    redfish: Redfish,
    path: String,
}

impl Outlet {
    /// The outlet at `url` (its path must name an outlet: `…/Outlets/ID`).
    pub fn new(url: &str, credentials: Option<Credentials>) -> Result<Outlet, BmcError> {
        let redfish = Redfish::new(url, credentials)?;
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
        let path = rest.split_once('/').map_or("", |(_, p)| p).trim_end_matches('/');
        if !path.contains("/Outlets/") {
            return Err(BmcError::Config(format!("PDU outlet URL {url:?}: expected …/Outlets/ID")));
        }
        Ok(Outlet { redfish, path: format!("/{path}") })
    }

    /// Where it is.
    pub fn endpoint(&self) -> String {
        format!("{}{}", self.redfish.base, self.path)
    }

    async fn resource(&self) -> Result<Value, BmcError> {
        self.redfish.send(self.redfish.request(reqwest::Method::GET, &self.path)).await
    }

    /// Its power state (`PowerState`; anything but `On`/`Off`/`PoweringOn`/`PoweringOff` is
    /// unknown, never off).
    pub async fn power_state(&self) -> Result<PowerState, BmcError> {
        let v = self.resource().await?;
        Ok(PowerState::from_redfish(v.get("PowerState").and_then(Value::as_str)))
    }

    /// Switches it on or off (not confirmed).
    pub async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        let v = self.resource().await?;
        let target = v
            .pointer("/Actions/#Outlet.PowerControl/target")
            .and_then(Value::as_str)
            .map_or_else(|| format!("{}/Actions/Outlet.PowerControl", self.path), str::to_owned);
        let state = if on { "On" } else { "Off" };
        self.redfish
            .send(self.redfish.request(reqwest::Method::POST, &target).json(&json!({ "PowerState": state })))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bmc::{power, Policy, PowerAction};
    use std::sync::{Arc, Mutex};

    /// A Redfish system whose `PowerState` answers follow a script (the last one repeats), and
    /// which records every reset it is sent; a `ForceOff` makes it answer `Off` from then on,
    /// unless it `ignores` commands. Real HTTP to the real driver: only the BMC is scripted.
    #[derive(Default)]
    struct Scripted {
        answers: Vec<&'static str>,
        ignores: bool,
        reads: usize,
        resets: Vec<String>,
        off: bool,
    }

    async fn scripted_bmc(answers: Vec<&'static str>, ignores: bool) -> (String, Arc<Mutex<Scripted>>) {
        use axum::routing::{get, post};
        let state = Arc::new(Mutex::new(Scripted { answers, ignores, ..Scripted::default() }));
        let (get_state, post_state) = (state.clone(), state.clone());
        let app = axum::Router::new()
            .route(
                "/redfish/v1/Systems/s1",
                get(move || {
                    let state = get_state.clone();
                    async move {
                        let mut s = state.lock().expect("lock");
                        let answer = if s.off {
                            "Off"
                        } else {
                            let i = s.reads.min(s.answers.len() - 1);
                            s.answers[i]
                        };
                        s.reads += 1;
                        axum::Json(json!({ "PowerState": answer }))
                    }
                }),
            )
            .route(
                "/redfish/v1/Systems/s1/Actions/ComputerSystem.Reset",
                post(move |axum::Json(body): axum::Json<Value>| {
                    let state = post_state.clone();
                    async move {
                        let mut s = state.lock().expect("lock");
                        let kind = body["ResetType"].as_str().unwrap_or_default().to_owned();
                        s.off = kind == "ForceOff" && !s.ignores;
                        s.resets.push(kind);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("redfish+http://{addr}/redfish/v1/Systems/s1"), state)
    }

    fn fast() -> Policy {
        Policy { confirm_within: Duration::from_millis(300), attempts: 2, poll: Duration::from_millis(20) }
    }

    #[tokio::test]
    async fn a_host_powering_on_is_not_off_and_gets_a_real_power_off() {
        // A host that is booting (a fence racing its own power-on): the BMC says PoweringOn,
        // then On. Only a ForceOff and the BMC's "Off" afterwards confirm the fence.
        let (url, bmc) = scripted_bmc(vec!["PoweringOn", "PoweringOn", "On"], false).await;
        let driver = Redfish::new(&url, None).expect("driver");
        assert_eq!(driver.power_state().await.expect("state"), PowerState::PoweringOn);
        let state = power(&driver, PowerAction::Off, &fast()).await.expect("off");
        assert_eq!(state, PowerState::Off);
        assert_eq!(bmc.lock().expect("lock").resets, ["ForceOff"], "the fence sent its power-off");
    }

    #[tokio::test]
    async fn unknown_and_transitional_states_never_confirm_off() {
        // A BMC that accepts ForceOff but keeps saying it is on its way (or something unknown)
        // never confirms a fence.
        for stuck in ["PoweringOn", "PoweringOff", "Paused", ""] {
            let (url, bmc) = scripted_bmc(vec![stuck], true).await;
            let driver = Redfish::new(&url, None).expect("driver");
            let err = power(&driver, PowerAction::Off, &fast()).await.expect_err(stuck);
            assert!(
                matches!(err, crate::bmc::BmcError::NotConfirmed { wanted: PowerState::Off, .. }),
                "{stuck}: {err}"
            );
            assert_eq!(bmc.lock().expect("lock").resets.len(), 2, "{stuck}: one ForceOff per attempt");
        }
    }

    #[tokio::test]
    async fn a_host_already_powering_on_is_waited_for_not_commanded_twice() {
        let (url, bmc) = scripted_bmc(vec!["PoweringOn", "PoweringOn", "On"], false).await;
        let driver = Redfish::new(&url, None).expect("driver");
        assert_eq!(power(&driver, PowerAction::On, &fast()).await.expect("on"), PowerState::On);
        assert!(bmc.lock().expect("lock").resets.is_empty(), "no second On sent");
    }

    /// A system whose `Boot` object is `boot`; records every PATCH body.
    async fn boot_bmc(boot: Value) -> (String, Arc<Mutex<Vec<Value>>>) {
        boot_bmc_with(boot, false).await
    }

    /// The same; `settings_only`: the system refuses PATCH (405) and names a settings object
    /// (`/redfish/v1/Systems/s1/SD`, AMI's future-state URI), whose PATCH bodies are recorded
    /// with `"at": "SD"`.
    async fn boot_bmc_with(boot: Value, settings_only: bool) -> (String, Arc<Mutex<Vec<Value>>>) {
        use axum::routing::{get, patch};
        let patches = Arc::new(Mutex::new(Vec::new()));
        let (recorded, at_sd) = (patches.clone(), patches.clone());
        let app = axum::Router::new()
            .route(
                "/redfish/v1/Systems/s1",
                get(move || {
                    let boot = boot.clone();
                    async move {
                        let mut v = json!({ "PowerState": "Off", "Boot": boot });
                        if settings_only {
                            v["@Redfish.Settings"] =
                                json!({ "SettingsObject": { "@odata.id": "/redfish/v1/Systems/s1/SD" } });
                        }
                        axum::Json(v)
                    }
                })
                .patch(move |axum::Json(body): axum::Json<Value>| {
                    let recorded = recorded.clone();
                    async move {
                        if settings_only {
                            return axum::http::StatusCode::METHOD_NOT_ALLOWED;
                        }
                        recorded.lock().expect("lock").push(body);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            )
            .route(
                "/redfish/v1/Systems/s1/SD",
                patch(move |axum::Json(mut body): axum::Json<Value>| {
                    let recorded = at_sd.clone();
                    async move {
                        body["at"] = json!("SD");
                        recorded.lock().expect("lock").push(body);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("redfish+http://{addr}/redfish/v1/Systems/s1"), patches)
    }

    #[tokio::test]
    async fn the_boot_mode_is_sent_only_when_it_differs_and_a_read_only_one_is_a_clear_error() {
        // Already UEFI: target and frequency only.
        let (url, patches) = boot_bmc(json!({ "BootSourceOverrideMode": "UEFI" })).await;
        let driver = Redfish::new(&url, None).expect("driver");
        driver.set_boot_once(BootTarget::Pxe, Some(BootMode::UefiSecureBoot)).await.expect("pxe");
        driver.set_boot_once(BootTarget::Pxe, None).await.expect("pxe, mode unknown");
        assert_eq!(
            *patches.lock().expect("lock"),
            vec![json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" } }); 2]
        );
        // A BMC that reports no mode has no such setting: none is sent.
        let (url, patches) = boot_bmc(json!({ "BootSourceOverrideTarget": "None" })).await;
        Redfish::new(&url, None)
            .expect("driver")
            .set_boot_once(BootTarget::Pxe, Some(BootMode::Bios))
            .await
            .expect("pxe");
        assert_eq!(
            *patches.lock().expect("lock"),
            [json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" } })]
        );
        // Legacy now, UEFI allowed: the mode goes with the target (iDRAC wants both at once).
        let (url, patches) = boot_bmc(json!({
            "BootSourceOverrideMode": "Legacy", "BootSourceOverrideMode@Redfish.AllowableValues": ["Legacy", "UEFI"]
        }))
        .await;
        Redfish::new(&url, None).expect("driver").set_disk_boot(Some(BootMode::Uefi)).await.expect("disk");
        assert_eq!(
            *patches.lock().expect("lock"),
            [
                json!({ "Boot": { "BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Continuous", "BootSourceOverrideMode": "UEFI" } })
            ]
        );
        // A BMC that keeps the mode read-only (iLO 5): refused with what to do, nothing sent.
        let (url, patches) = boot_bmc(json!({
            "BootSourceOverrideMode": "Legacy", "BootSourceOverrideMode@Redfish.AllowableValues": ["Legacy"]
        }))
        .await;
        let err = Redfish::new(&url, None)
            .expect("driver")
            .set_boot_once(BootTarget::Pxe, Some(BootMode::Uefi))
            .await
            .expect_err("mode");
        let message = err.to_string();
        assert!(
            message.contains("boots in uefi mode")
                && message.contains("allows only [Legacy]")
                && message.contains("firmware setup"),
            "{message}"
        );
        assert!(patches.lock().expect("lock").is_empty(), "nothing was changed");
        // An AMI-style BMC: the system refuses the PATCH, its settings object takes it.
        let (url, patches) = boot_bmc_with(json!({ "BootSourceOverrideMode": "UEFI" }), true).await;
        Redfish::new(&url, None)
            .expect("driver")
            .set_boot_once(BootTarget::Pxe, Some(BootMode::Uefi))
            .await
            .expect("via SD");
        assert_eq!(
            *patches.lock().expect("lock"),
            [json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" }, "at": "SD" })]
        );
    }

    #[test]
    fn power_states_parse_strictly() {
        assert_eq!(PowerState::from_redfish(Some("Off")), PowerState::Off);
        assert_eq!(PowerState::from_redfish(Some("PoweringOn")), PowerState::PoweringOn);
        assert_eq!(PowerState::from_redfish(Some("off")), PowerState::Unknown);
        assert_eq!(PowerState::from_redfish(None), PowerState::Unknown);
        assert_eq!(PowerState::from_ipmitool("Chassis Power is off\n"), PowerState::Off);
        assert_eq!(PowerState::from_ipmitool("Chassis Power is on"), PowerState::On);
        assert_eq!(PowerState::from_ipmitool("Chassis Power Control: Up/On"), PowerState::Unknown);
        assert_eq!(PowerState::from_ipmitool(""), PowerState::Unknown);
    }

    #[test]
    fn urls_pick_scheme_and_system() {
        let r = Redfish::new("redfish+http://127.0.0.1:8000/redfish/v1/Systems/abc", None).expect("url");
        assert_eq!(r.base, "http://127.0.0.1:8000");
        assert_eq!(r.system.as_deref(), Some("/redfish/v1/Systems/abc"));
        let r = Redfish::new("redfish://10.0.0.5?verify=false", None).expect("url");
        assert_eq!((r.base.as_str(), r.system.as_deref()), ("https://10.0.0.5", None));
        assert!(Redfish::new("ipmi://10.0.0.5", None).is_err());
        assert!(Redfish::new("redfish://", None).is_err());
    }
}
