//! Cell-wide settings made once (the peer keys' secret), and the peer lists derived from it.

use sqlx::Row;

use crate::error::{query, Result};
use crate::guard_api::{peer_key, Peer, PeerList};
use crate::types::{HostName, HostState};
use crate::Store;

/// About this many peers in one host's list, of a larger cell (a stable, symmetric subset).
pub(crate) const PEER_LIST_MAX: usize = 64;

impl Store {
    /// The cell's secret, made (256 random bits) the first time any replica asks; every
    /// replica gets the same one (the first insert wins).
    pub async fn cell_secret(&self) -> Result<String> {
        const WHAT: &str = "reading the cell secret";
        // Read first: every guard's peer fetch asks, and a write each time would be an fsync.
        let made = sqlx::query("SELECT value FROM settings WHERE name = 'cell_secret'")
            .fetch_optional(&self.pool)
            .await
            .map_err(query(WHAT))?;
        if let Some(row) = made {
            return row.try_get("value").map_err(query(WHAT));
        }
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
    /// once) that has an address — its fixed one, else its DHCP lease — each with the key the
    /// two share; and the size of the cell the quorum is judged against: `host` and the
    /// **active** peers. A suspect host is asked (it may be alive, only cut off from the
    /// controller) but not counted: after a mass failure that the brake left unfenced, dead
    /// suspects must not outvote the living, or a provisioner outage then would make every
    /// surviving guard fence itself.
    pub async fn peers_of(&self, host: &HostName) -> Result<PeerList> {
        let secret = self.cell_secret().await?;
        let hosts = self.hosts().await?;
        let watched =
            |h: &crate::Host| h.last_heartbeat.is_some() && matches!(h.state, HostState::Active | HostState::Suspect);
        // The leases only when some peer has no fixed address (every guard asks each minute).
        let leased: std::collections::HashMap<crate::MacAddr, std::net::IpAddr> =
            if hosts.iter().any(|h| watched(h) && h.ip.is_none() && h.mac.is_some()) {
                self.leases().await?.into_iter().map(|l| (l.mac, std::net::IpAddr::V4(l.ip))).collect()
            } else {
                Default::default()
            };
        let candidates = hosts
            .iter()
            .filter(|h| &h.name != host)
            .map(|h| PeerCandidate {
                host: h.name.clone(),
                state: h.state,
                heartbeated: h.last_heartbeat.is_some(),
                address: h.ip.or_else(|| h.mac.and_then(|m| leased.get(&m).copied())),
                key: peer_key(&secret, host, &h.name),
            })
            .collect();
        Ok(peer_list(candidates))
    }
}

/// Another host of the cell, as a peer list is made of it.
#[derive(Debug, Clone)]
pub(crate) struct PeerCandidate {
    pub(crate) host: HostName,
    pub(crate) state: HostState,
    pub(crate) heartbeated: bool,
    /// Its fixed address, else its DHCP lease.
    pub(crate) address: Option<std::net::IpAddr>,
    /// The key the pair shares.
    pub(crate) key: String,
}

/// A host's peer list from the cell's other hosts: every watched one (active or suspect,
/// heartbeated at least once) that has an address; the size of the cell the quorum is judged
/// against is this host and the **active** peers. A suspect host is asked (it may be alive,
/// only cut off from the controller) but not counted: after a mass failure that the brake left
/// unfenced, dead suspects must not outvote the living, or a provisioner outage then would
/// make every surviving guard fence itself.
pub(crate) fn peer_list(candidates: Vec<PeerCandidate>) -> PeerList {
    let watched = |c: &PeerCandidate| c.heartbeated && matches!(c.state, HostState::Active | HostState::Suspect);
    let active: std::collections::HashSet<HostName> =
        candidates.iter().filter(|c| c.state == HostState::Active).map(|c| c.host.clone()).collect();
    let mut peers: Vec<Peer> = candidates
        .into_iter()
        .filter(watched)
        .filter_map(|c| {
            let counted = active.contains(&c.host);
            Some(Peer { address: c.address?, host: c.host, key: c.key, counted })
        })
        .collect();
    let cell_size = 1 + peers.iter().filter(|p| p.counted).count();
    if peers.len() > PEER_LIST_MAX {
        // A large cell: each host gets the peers whose pair key (a hash of both names,
        // the same from either side) falls below a threshold — about PEER_LIST_MAX of them,
        // the same from one fetch to the next, and symmetric: when A lists B, B lists A,
        // so B can check A's requests. The quorum is judged on the peers asked anyway.
        let share = PEER_LIST_MAX as f64 / peers.len() as f64;
        let limit = (share * u64::MAX as f64) as u64;
        peers.retain(|p| u64::from_str_radix(p.key.get(..16).unwrap_or("0"), 16).is_ok_and(|v| v < limit));
    }
    PeerList { cell_size, peers }
}
