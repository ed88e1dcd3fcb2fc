//! Reimaging a host: the persisted state machine ([`machine`]) and the executor that drives
//! it from the database inside `serve` ([`executor`]). The deploy agent reports through
//! `POST /api/v1/hosts/{name}/deploy`.

pub mod executor;
pub mod machine;
