//! Cell-wide settings made once (the peer keys' secret), and the peer lists derived from it.

use sqlx::Row;

use crate::error::{query, Result};
use crate::guard_api::{peer_key, Peer, PeerList};
use crate::types::{HostName, HostState};
use crate::Store;

impl Store {
    /// The cell's secret, made (256 random bits) the first time any replica asks; every
    /// replica gets the same one (the first insert wins).
    pub async fn cell_secret(&self) -> Result<String> {
        const WHAT: &str = "reading the cell secret";
        let fresh = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        sqlx::query("INSERT INTO settings (name, value) VALUES ('cell_secret', $1) ON CONFLICT (name) DO NOTHING")
            .bind(fresh)
            .execute(&self.pool)
            .await
            .map_err(query(WHAT))?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = 'cell_secret'")
            .fetch_one(&self.pool)
            .await
            .map_err(query(WHAT))?;
        row.try_get("value").map_err(query(WHAT))
    }

    /// `host`'s peers: every other watched host (active or suspect, heartbeated at least
    /// once) that has an address, each with the key the two share; and the size of the cell
    /// they make with `host`.
    pub async fn peers_of(&self, host: &HostName) -> Result<PeerList> {
        let secret = self.cell_secret().await?;
        let hosts = self.hosts().await?;
        let counted = |h: &crate::Host| {
            h.ip.is_some() && h.last_heartbeat.is_some() && matches!(h.state, HostState::Active | HostState::Suspect)
        };
        let peers: Vec<Peer> = hosts
            .iter()
            .filter(|h| &h.name != host && counted(h))
            .filter_map(|h| Some(Peer { host: h.name.clone(), address: h.ip?, key: peer_key(&secret, host, &h.name) }))
            .collect();
        Ok(PeerList { cell_size: peers.len() + 1, peers })
    }
}
