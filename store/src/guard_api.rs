//! The wire types of the provisioner's guard API (`/api/v1/hosts/{name}/guard/...`), shared by
//! the server (the provisioner) and its client (the guard), so the two cannot drift apart.
//!
//! The guard API is how a guard on a node reaches the database when it cannot open it itself
//! (the embedded SQLite lives on the provisioner's disk). Every request carries the host's node
//! token (`Authorization: Bearer …`); the provisioner answers only for that host.

use serde::{Deserialize, Serialize};

use crate::types::{Generation, HostName, InstanceId, Storage};

/// The path prefix of a host's guard API, below the provisioner's public URL.
pub fn path(host: &crate::HostName, rest: &str) -> String {
    format!("/api/v1/hosts/{host}/guard/{rest}")
}

/// `GET …/services`: one copy of a service the database assigns to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedService {
    /// The service.
    pub service: String,
    /// The copy's slot.
    pub slot: u32,
    /// The copy's generation (+1 on every move).
    pub generation: u64,
    /// Starts it (argv).
    pub start: Vec<String>,
    /// Stops it (argv).
    pub stop: Vec<String>,
    /// Exits 0 while it runs (argv), if the service has a check.
    pub check: Option<Vec<String>>,
    /// The service is exclusive: a self-fence stops it too.
    pub exclusive: bool,
}

impl AssignedService {
    /// `SERVICE/SLOT`, how the guard keys what it runs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.service, self.slot)
    }
}

impl From<(crate::ServiceCopy, crate::Service)> for AssignedService {
    fn from((c, s): (crate::ServiceCopy, crate::Service)) -> Self {
        AssignedService {
            service: c.service,
            slot: c.slot,
            generation: c.generation,
            start: s.start,
            stop: s.stop,
            check: s.check,
            exclusive: s.exclusive,
        }
    }
}

/// The answer to a heartbeat. `revision` and `full_pass_ms` came with fleet scale (a
/// provisioner older than them answers `at` alone, and its guards ask everything every pass).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// When the database recorded it (RFC 3339, UTC: the database's clock).
    pub at: String,
    /// The host's revision: +1 on every change of what its guard converges on (its instances,
    /// including those moved away, its service copies and their definitions, its state). A
    /// guard whose last complete pass began at this revision, and whose libvirt shows what it
    /// showed then, has nothing new to ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// The longest a guard may go without a complete pass, whatever the revision (ms): its
    /// report must stay fresh for the controller's GC pass (which reads reports younger than
    /// three graces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_pass_ms: Option<u64>,
}

/// `POST …/ownership`: which of these UUIDs the database knows, and who owns them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnershipQuery {
    /// The UUIDs found on the host.
    pub uuids: Vec<InstanceId>,
}

/// `GET …/assigned`: one instance the database assigns to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    /// UUID.
    pub uuid: InstanceId,
    /// libvirt name.
    pub name: String,
    /// Current generation.
    pub generation: Generation,
    /// HA flag.
    pub ha: bool,
    /// Tombstoned.
    pub deleted: bool,
    /// Where its disks live (`local`: recreated from their backing image on a new owner).
    pub storage: Storage,
    /// Held by a drain: keep it stopped (shut it down cleanly if it runs, never start it).
    #[serde(default)]
    pub held: bool,
    /// A drain's live migration of it, from its owner to another host: the owner's guard
    /// migrates it, the target's leaves the arriving domain alone (the list of a target names
    /// the instances coming to it too). Neither defines nor starts it meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// A live migration under way (see [`Assigned::migration`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The owner, that migrates it.
    pub from: HostName,
    /// The host it goes to.
    pub to: HostName,
    /// The target's libvirt URI (as its guard announced it).
    pub uri: String,
}

impl From<&crate::Instance> for Assigned {
    fn from(i: &crate::Instance) -> Self {
        Assigned {
            uuid: i.uuid,
            name: i.name.clone(),
            generation: i.generation,
            ha: i.ha,
            deleted: i.deleted,
            storage: i.storage,
            held: i.held,
            migration: match (&i.migrating_to, &i.migration_uri) {
                (Some(to), Some(uri)) => Some(Migration { from: i.owner.clone(), to: to.clone(), uri: uri.clone() }),
                _ => None,
            },
        }
    }
}

/// `POST …/events`: an event the guard records. The provisioner fills in the actor
/// (`guard:HOST`) and the host itself: a guard can speak only for its own host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardEvent {
    /// Dotted kind (`instance.quarantined`, ...).
    pub kind: String,
    /// The instance concerned, if any.
    #[serde(default)]
    pub instance: Option<InstanceId>,
    /// One human sentence.
    pub message: String,
    /// Idempotency key.
    #[serde(default)]
    pub key: Option<String>,
}

/// A node token's shape: 32 to 128 characters of `[A-Za-z0-9_-]`.
pub fn valid_token(token: &str) -> bool {
    (32..=128).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `GET …/peers`: the cell as this host's guard sees it, for the quorum rule of its
/// self-fence: the other hosts it asks when it cannot reach the controller, and the key it
/// shares with each. Cached on the node's disk (`state_dir/peers.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerList {
    /// How many hosts the cell counts, this one included: the watched hosts (active or
    /// suspect, heartbeated at least once) that have an address.
    pub cell_size: usize,
    /// Every other of them.
    pub peers: Vec<Peer>,
}

/// One peer of a host's guard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its name.
    pub host: crate::HostName,
    /// Its address (its guard listens on the cell-wide peer port there).
    pub address: std::net::IpAddr,
    /// The key the two share (hex): HMAC-SHA256 of both names under the cell's secret. Only
    /// the two hosts (and the provisioner) know it, so a check between them is authenticated
    /// both ways and another host cannot pose as either.
    pub key: String,
    /// Whether it counts in `cell_size` (it is active): a suspect peer is asked (it may relay)
    /// but its answer does not count towards a majority it is not part of. Lists from before
    /// this field counted every answer.
    #[serde(default = "counted_by_default")]
    pub counted: bool,
}

fn counted_by_default() -> bool {
    true
}

/// How long a guard waits for one peer's answer (the asker's budget per round, the answering
/// side's budget for a relay). The controller counts it in the bound of watchdog fencing.
pub const PEER_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `POST …/relay`: this host's guard vouches that `host` is alive — `host` cannot reach the
/// provisioner, but answered an authenticated peer check just now — and the provisioner
/// records a heartbeat for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// The host whose heartbeat is relayed.
    pub host: crate::HostName,
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The key hosts `a` and `b` share (hex), derived from the cell's secret; the same whichever
/// of the two asks.
pub fn peer_key(cell_secret: &str, a: &crate::HostName, b: &crate::HostName) -> String {
    let (lo, hi) = if a.as_str() <= b.as_str() { (a, b) } else { (b, a) };
    mac_hex(cell_secret.as_bytes(), &format!("nodekeeper-peer-v1|{lo}|{hi}"))
}

/// HMAC-SHA256 of `message` under `key`, hex.
pub fn mac_hex(key: &[u8], message: &str) -> String {
    use hmac::Mac;
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(message.as_bytes());
    m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `mac` (hex) is HMAC-SHA256 of `message` under `key`, compared in constant time.
pub fn mac_ok(key: &[u8], message: &str, mac: &str) -> bool {
    use hmac::Mac;
    let Some(bytes) = hex_bytes(mac) else { return false };
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(message.as_bytes());
    m.verify_slice(&bytes).is_ok()
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 || hex.len() > 256 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_are_symmetric_and_differ_per_pair_and_secret() {
        let (a, b, c) = ("node-a".parse().expect("a"), "node-b".parse().expect("b"), "node-c".parse().expect("c"));
        assert_eq!(peer_key("s", &a, &b), peer_key("s", &b, &a));
        assert_ne!(peer_key("s", &a, &b), peer_key("s", &a, &c));
        assert_ne!(peer_key("s", &a, &b), peer_key("t", &a, &b));
        let key = peer_key("s", &a, &b);
        let mac = mac_hex(key.as_bytes(), "check|node-a|node-b|n1");
        assert!(mac_ok(key.as_bytes(), "check|node-a|node-b|n1", &mac));
        assert!(!mac_ok(key.as_bytes(), "check|node-a|node-b|n2", &mac));
        assert!(!mac_ok(b"other", "check|node-a|node-b|n1", &mac));
        for bad in ["", "zz", "abc", &"0".repeat(1000)] {
            assert!(!mac_ok(key.as_bytes(), "x", bad), "{bad:?}");
        }
    }
}
