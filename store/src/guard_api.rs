//! The wire types of the provisioner's guard API (`/api/v1/hosts/{name}/guard/...`), shared by
//! the server (the provisioner) and its client (the guard), so the two cannot drift apart.
//!
//! The guard API is how a guard on a node reaches the database when it cannot open it itself
//! (the embedded SQLite lives on the provisioner's disk). Every request carries the host's node
//! token (`Authorization: Bearer …`); the provisioner answers only for that host.

use serde::{Deserialize, Serialize};

use crate::types::{Generation, InstanceId, Storage};

/// The path prefix of a host's guard API, below the provisioner's public URL.
pub fn path(host: &crate::HostName, rest: &str) -> String {
    format!("/api/v1/hosts/{host}/guard/{rest}")
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
