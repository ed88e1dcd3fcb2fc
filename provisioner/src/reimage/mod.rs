//! Reimaging a host: the persisted state machine ([`machine`]) and the executor that drives
//! it from the database inside `serve` ([`executor`]). The deploy agent reports through
//! `POST /api/v1/hosts/{name}/deploy`.

pub mod executor;
pub mod iso;
pub mod machine;
pub mod vmedia;

/// The image written when a host has none set.
pub const DEFAULT_IMAGE: &str = "node.img";
