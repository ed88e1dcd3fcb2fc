//! Switched PDU outlets: the fence's level after the BMC (Pacemaker's fencing levels: IPMI,
//! then a PDU). A host may hang off several outlets (two power supplies on two PDUs): it is
//! off only when every one of them is. Drivers: Redfish (`Outlet` of the DMTF
//! `PowerDistribution` model, [`super::redfish::Outlet`]) and SNMP ([`super::snmp::Outlet`]).

use super::{BmcError, Credentials, PowerState, Switch};

/// One outlet, by its URL's scheme.
#[derive(Debug)]
pub enum Outlet {
    /// `redfish+https://…/Outlets/ID` (also `redfish://`, `redfish+http://`, `http(s)://`).
    Redfish(super::redfish::Outlet),
    /// `snmp://PDU[:PORT]/OUTLET[?…]`.
    Snmp(super::snmp::Outlet),
}

impl Outlet {
    /// The outlet at `url`, with `credentials`.
    pub fn from_url(url: &str, credentials: Option<Credentials>) -> Result<Outlet, BmcError> {
        if url.starts_with("snmp://") {
            Ok(Outlet::Snmp(super::snmp::Outlet::new(url, credentials)?))
        } else {
            Ok(Outlet::Redfish(super::redfish::Outlet::new(url, credentials)?))
        }
    }
}

impl Switch for Outlet {
    fn switch_endpoint(&self) -> String {
        match self {
            Outlet::Redfish(o) => o.endpoint(),
            Outlet::Snmp(o) => o.endpoint(),
        }
    }
    async fn read_power(&self) -> Result<PowerState, BmcError> {
        match self {
            Outlet::Redfish(o) => o.power_state().await,
            Outlet::Snmp(o) => o.power_state().await,
        }
    }
    async fn switch_power(&self, on: bool) -> Result<(), BmcError> {
        match self {
            Outlet::Redfish(o) => o.set_power(on).await,
            Outlet::Snmp(o) => o.set_power(on).await,
        }
    }
}

/// Checks an outlet URL's shape (for `host add --outlet`, before anything is stored).
pub fn check_url(url: &str) -> Result<(), BmcError> {
    // Credentials are resolved only when the outlet is driven; a placeholder proves the shape.
    let placeholder = Some(Credentials { user: "x".into(), password: String::new() });
    Outlet::from_url(url, placeholder).map(drop)
}
