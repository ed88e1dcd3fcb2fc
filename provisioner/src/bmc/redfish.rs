//! Redfish (DMTF DSP0266): `ComputerSystem.Reset`, `PowerState`, and a one-time
//! `BootSourceOverrideTarget = Pxe`. Basic auth; tested against sushy-tools (libvirt driver).
//!
//! URLs: `redfish+http://HOST:PORT/redfish/v1/Systems/ID`, `redfish+https://…` or
//! `redfish://…` (HTTPS). Without a system path, the first system of the collection is used.
//! BMCs ship self-signed certificates: `?verify=false` accepts them (say so explicitly).

use std::time::Duration;

use serde_json::{json, Value};

use super::{Bmc, BmcError, Credentials, PowerState};

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
        match v.get("PowerState").and_then(Value::as_str) {
            Some("On") | Some("PoweringOff") => Ok(PowerState::On),
            Some("Off") | Some("PoweringOn") => Ok(PowerState::Off),
            other => {
                Err(BmcError::Refused { endpoint: self.endpoint(), reason: format!("unexpected PowerState {other:?}") })
            }
        }
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

    async fn set_pxe_once(&self) -> Result<(), BmcError> {
        let system = self.system().await?;
        let body = json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" } });
        self.send(self.request(reqwest::Method::PATCH, &system).json(&body)).await.map(drop)
    }

    async fn set_disk_boot(&self) -> Result<(), BmcError> {
        let system = self.system().await?;
        let body = json!({ "Boot": { "BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Continuous" } });
        self.send(self.request(reqwest::Method::PATCH, &system).json(&body)).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
