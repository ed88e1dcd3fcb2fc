//! A switched PDU outlet over SNMP, through net-snmp's `snmpget`/`snmpset` (Debian's `snmp`):
//! the common PDUs speak it where they speak nothing else. The URL names the PDU, the outlet
//! and how to drive it:
//!
//! - `snmp://PDU[:PORT]/OUTLET` — APC (PowerNet-MIB `sPDUOutletCtl`,
//!   `.1.3.6.1.4.1.318.1.1.4.4.2.1.3.OUTLET`: read 1 on, 2 off; write 1 immediateOn,
//!   2 immediateOff);
//! - `snmp://PDU[:PORT]/OUTLET?oid=OID&on=N&off=N[&state_oid=OID&state_on=N&state_off=N]` —
//!   any other PDU, by its MIB's numbers (`OUTLET` is appended to both OIDs).
//!
//! Credentials (`--outlet-credentials`, as a BMC's): `COMMUNITY:` — SNMPv2c with that community —
//! or `USER:PASSWORD` — SNMPv3, authPriv, SHA and AES with that password. Each call is one
//! attempt of 2 s (`-t 2 -r 0`); [`super::power`] adds the retries and the confirmation.

use std::time::Duration;

use super::{BmcError, Credentials, PowerState};

/// One outlet of an SNMP PDU.
#[derive(Debug, Clone)]
pub struct Outlet {
    agent: String,
    control: String,
    on: i64,
    off: i64,
    state: String,
    state_on: i64,
    state_off: i64,
    auth: Vec<String>,
}

/// PowerNet-MIB `sPDUOutletCtl`.
const APC_OUTLET_CTL: &str = ".1.3.6.1.4.1.318.1.1.4.4.2.1.3";

fn oid_ok(oid: &str) -> bool {
    let digits = oid.strip_prefix('.').unwrap_or(oid);
    !digits.is_empty()
        && digits.split('.').all(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()))
}

impl Outlet {
    /// The outlet at `url` (see the module's doc), with `credentials` (required: a PDU's
    /// write community is a secret).
    pub fn new(url: &str, credentials: Option<Credentials>) -> Result<Outlet, BmcError> {
        let bad = |why: &str| BmcError::Config(format!("SNMP outlet URL {url:?}: {why}"));
        let rest = url.strip_prefix("snmp://").ok_or_else(|| bad("expected snmp://PDU[:PORT]/OUTLET"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (agent, outlet) = rest.split_once('/').ok_or_else(|| bad("no outlet number"))?;
        let outlet = outlet.trim_end_matches('/');
        if agent.is_empty() || agent.contains('@') || agent.starts_with('-') {
            return Err(bad("expected a PDU address (credentials go in --outlet-credentials)"));
        }
        if outlet.is_empty() || outlet.len() > 5 || !outlet.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the outlet must be a number"));
        }
        let mut params = std::collections::HashMap::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad("query parameters are KEY=VALUE"))?;
            if !["oid", "on", "off", "state_oid", "state_on", "state_off"].contains(&k) {
                return Err(bad(&format!("unknown parameter {k:?}")));
            }
            params.insert(k, v);
        }
        let number = |k: &str, default: i64| -> Result<i64, BmcError> {
            params.get(k).map_or(Ok(default), |v| v.parse().map_err(|_| bad(&format!("{k} must be a number"))))
        };
        let control = params.get("oid").copied().unwrap_or(APC_OUTLET_CTL);
        let state = params.get("state_oid").copied().unwrap_or(control);
        if !oid_ok(control) || !oid_ok(state) {
            return Err(bad("an OID is dotted numbers"));
        }
        let (on, off) = (number("on", 1)?, number("off", 2)?);
        let (state_on, state_off) = (number("state_on", on)?, number("state_off", off)?);
        if on == off || state_on == state_off {
            return Err(bad("on and off must differ"));
        }
        let credentials = credentials.ok_or_else(|| {
            bad("an SNMP outlet needs --outlet-credentials (COMMUNITY: for v2c, USER:PASSWORD for v3)")
        })?;
        let auth = if credentials.password.is_empty() {
            vec!["-v2c".into(), "-c".into(), credentials.user.clone()]
        } else {
            let p = credentials.password.clone();
            ["-v3", "-l", "authPriv", "-u", &credentials.user, "-a", "SHA", "-A", &p, "-x", "AES", "-X", &p]
                .map(str::to_owned)
                .to_vec()
        };
        let dot = |oid: &str| format!("{}.{outlet}", oid.trim_end_matches('.'));
        Ok(Outlet {
            agent: agent.to_owned(),
            control: dot(control),
            on,
            off,
            state: dot(state),
            state_on,
            state_off,
            auth,
        })
    }

    /// Where it is.
    pub fn endpoint(&self) -> String {
        format!("snmp://{} {}", self.agent, self.control)
    }

    async fn run(&self, program: &str, args: &[&str]) -> Result<String, BmcError> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.auth).args(["-t", "2", "-r", "0", "-On", "-Oe", "-Oqv"]).arg(&self.agent).args(args);
        cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
        let unreachable = |reason: String| BmcError::Unreachable { endpoint: self.endpoint(), reason };
        let out = tokio::time::timeout(Duration::from_secs(5), cmd.output())
            .await
            .map_err(|_| unreachable(format!("{program} did not finish in 5 s")))?
            .map_err(|e| unreachable(format!("running {program} (Debian package snmp): {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(BmcError::Refused { endpoint: self.endpoint(), reason: err.trim().to_owned() });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Its state: the state OID's value, `state_on` or `state_off`; anything else unknown.
    pub async fn power_state(&self) -> Result<PowerState, BmcError> {
        let value = self.run("snmpget", &[&self.state]).await?;
        Ok(match value.parse::<i64>() {
            Ok(v) if v == self.state_on => PowerState::On,
            Ok(v) if v == self.state_off => PowerState::Off,
            _ => {
                tracing::warn!(outlet = %self.endpoint(), "unexpected outlet state {value:?}: taken as not off");
                PowerState::Unknown
            }
        })
    }

    /// Switches it (not confirmed).
    pub async fn set_power(&self, on: bool) -> Result<(), BmcError> {
        let value = if on { self.on } else { self.off }.to_string();
        self.run("snmpset", &[&self.control, "i", &value]).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn community() -> Option<Credentials> {
        Some(Credentials { user: "private".into(), password: String::new() })
    }

    #[test]
    fn urls_name_the_pdu_the_outlet_and_the_mib_and_bad_ones_are_refused() {
        let apc = Outlet::new("snmp://10.0.0.9/3", community()).expect("apc");
        assert_eq!((apc.agent.as_str(), apc.control.as_str()), ("10.0.0.9", ".1.3.6.1.4.1.318.1.1.4.4.2.1.3.3"));
        assert_eq!((apc.on, apc.off, apc.state_on, apc.state_off), (1, 2, 1, 2));
        assert_eq!(apc.auth, ["-v2c", "-c", "private"]);
        let other = Outlet::new(
            "snmp://pdu:1161/12?oid=.1.3.6.1.4.1.13742.6.4.1.2.1.2.1&on=1&off=0&state_oid=1.3.6.1.2&state_on=7&state_off=8",
            Some(Credentials { user: "nk".into(), password: "s3cret-long".into() }),
        )
        .expect("generic");
        assert_eq!(other.control, ".1.3.6.1.4.1.13742.6.4.1.2.1.2.1.12");
        assert_eq!((other.state.as_str(), other.state_on, other.state_off), ("1.3.6.1.2.12", 7, 8));
        assert_eq!(other.auth[..3], ["-v3", "-l", "authPriv"]);
        for (url, want) in [
            ("snmp://pdu", "no outlet"),
            ("snmp://pdu/x", "number"),
            ("snmp://private@pdu/1", "credentials go in"),
            ("snmp://-c/1", "PDU address"),
            ("snmp://pdu/1?oid=1.3.x", "dotted"),
            ("snmp://pdu/1?on=1&off=1", "differ"),
            ("snmp://pdu/1?colour=red", "unknown parameter"),
            ("http://pdu/1", "expected snmp://"),
        ] {
            let e = Outlet::new(url, community()).expect_err(url).to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
        let e = Outlet::new("snmp://pdu/1", None).expect_err("no credentials").to_string();
        assert!(e.contains("needs --outlet-credentials"), "{e}");
    }
}
