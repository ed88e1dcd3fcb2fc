//! The switched PDU outlets each host hangs off (`host_outlets`): the fence's level after the
//! BMC. A host with two power supplies on two PDUs has two; it is off only when both are.

use serde::Serialize;
use sqlx::Row;

use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::HostName;
use crate::Store;

/// One outlet of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostOutlet {
    /// `redfish+https://PDU/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/ID` or
    /// `snmp://PDU[:PORT]/OUTLET[?…]`.
    pub url: String,
    /// Where its credentials are (`env:VAR`, `file:/path`), never the secret.
    pub credentials: Option<String>,
}

impl Store {
    /// `host`'s outlets, by URL.
    pub async fn host_outlets(&self, host: &HostName) -> Result<Vec<HostOutlet>> {
        const WHAT: &str = "reading a host's outlets";
        let rows = sqlx::query("SELECT url, credentials FROM host_outlets WHERE host = $1 ORDER BY url")
            .bind(host.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(query(WHAT))?;
        rows.iter()
            .map(|r| {
                Ok(HostOutlet {
                    url: r.try_get("url").map_err(query(WHAT))?,
                    credentials: r.try_get("credentials").map_err(query(WHAT))?,
                })
            })
            .collect()
    }

    /// Replaces `host`'s outlets (none: the host has no PDU level), with an event.
    pub async fn set_host_outlets(&self, host: &HostName, outlets: &[HostOutlet], actor: &str) -> Result<()> {
        const WHAT: &str = "setting a host's outlets";
        let mut urls: Vec<&str> = outlets.iter().map(|o| o.url.as_str()).collect();
        urls.sort_unstable();
        if urls.windows(2).any(|w| w[0] == w[1]) {
            return Err(StoreError::Invalid("an outlet is named twice".into()));
        }
        let mut tx = self.begin_write(WHAT).await?;
        self.host_in(&mut tx, host).await?.ok_or_else(|| StoreError::UnknownHost(host.clone()))?;
        sqlx::query("DELETE FROM host_outlets WHERE host = $1")
            .bind(host.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        for o in outlets {
            sqlx::query("INSERT INTO host_outlets (host, url, credentials) VALUES ($1, $2, $3)")
                .bind(host.as_str())
                .bind(o.url.as_str())
                .bind(o.credentials.as_deref())
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
        }
        let message = if urls.is_empty() {
            format!("{host}: no PDU outlets")
        } else {
            format!("{host}: PDU outlets {}", urls.join(", "))
        };
        insert_event(&mut tx, &NewEvent::host(actor, "host.changed", host, message)).await?;
        tx.commit().await.map_err(query(WHAT))
    }
}
