//! DHCP leases: which MAC holds which address until when. The DHCP server keeps them in
//! memory and writes through here before it acknowledges a lease, in batches (one
//! transaction for every lease decided meanwhile), so durability costs one commit per batch,
//! not per client.

use std::net::Ipv4Addr;

use sqlx::Row;

use crate::db::placeholders;
use crate::error::{query, Result, StoreError};
use crate::types::{MacAddr, Timestamp};
use crate::Store;

/// One lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The client.
    pub mac: MacAddr,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Until when.
    pub expires_at: Timestamp,
}

const LEASE_BATCH: usize = 1000;

impl Store {
    /// Every stored lease (expired ones too: the server decides what to reuse).
    pub async fn leases(&self) -> Result<Vec<Lease>> {
        let rows = sqlx::query("SELECT mac, ip, expires_at FROM leases")
            .fetch_all(&self.pool)
            .await
            .map_err(query("reading leases"))?;
        rows.iter()
            .map(|r| {
                let corrupt = |reason: String| StoreError::Corrupt { table: "leases", reason };
                let mac: String = r.try_get("mac").map_err(|e| corrupt(e.to_string()))?;
                let ip: String = r.try_get("ip").map_err(|e| corrupt(e.to_string()))?;
                Ok(Lease {
                    mac: mac.parse().map_err(|e| corrupt(format!("{e}")))?,
                    ip: ip.parse().map_err(|_| corrupt(format!("bad address {ip:?}")))?,
                    expires_at: Timestamp(r.try_get("expires_at").map_err(|e| corrupt(e.to_string()))?),
                })
            })
            .collect()
    }

    /// Writes leases in one transaction: each MAC gets its address, and an address moving to
    /// a new MAC is taken from the old one. The last lease of a MAC in `leases` wins.
    pub async fn save_leases(&self, leases: &[Lease]) -> Result<()> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "saving leases";
        if leases.is_empty() {
            return Ok(());
        }
        // Last write per MAC and per address wins within the batch.
        let mut latest: Vec<Lease> = Vec::with_capacity(leases.len());
        for l in leases.iter().rev() {
            if !latest.iter().any(|x| x.mac == l.mac || x.ip == l.ip) {
                latest.push(*l);
            }
        }
        let now = db_now;
        let mut tx = self.begin_write(WHAT).await?;
        for chunk in latest.chunks(LEASE_BATCH) {
            let b = self.backend();
            let sql = format!("DELETE FROM leases WHERE ip IN ({})", placeholders(b, 1, chunk.len()));
            let mut q = sqlx::query(&sql);
            for l in chunk {
                q = q.bind(l.ip.to_string());
            }
            q.execute(&mut *tx).await.map_err(query(WHAT))?;
            let rows: Vec<String> = (0..chunk.len()).map(|r| format!("({})", placeholders(b, r * 4 + 1, 4))).collect();
            let sql = format!(
                "INSERT INTO leases (mac, ip, expires_at, updated_at) VALUES {} \
                 ON CONFLICT (mac) DO UPDATE SET ip = excluded.ip, expires_at = excluded.expires_at, updated_at = excluded.updated_at",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for l in chunk {
                q = q.bind(l.mac.to_string()).bind(l.ip.to_string()).bind(l.expires_at.0).bind(now);
            }
            q.execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(())
    }

    /// Forgets the lease of `mac` (DHCPRELEASE). Idempotent.
    pub async fn delete_lease(&self, mac: MacAddr) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE mac = $1")
            .bind(mac.to_string())
            .execute(&self.pool)
            .await
            .map_err(query("deleting a lease"))?;
        Ok(())
    }
}
