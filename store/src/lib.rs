//! nodekeeper's database: the single source of truth for who owns which instance.
//!
//! One data model, two engines: embedded SQLite (the default, one provisioner) and PostgreSQL
//! (production, several provisioner replicas). The engine is chosen by the URL; every query is
//! written once in the SQL both understand (numbered `$N` placeholders, portable types:
//! text, BIGINT, BOOLEAN, timestamps as milliseconds since the epoch), and each engine has
//! its own numbered migrations under `migrations/`.
//!
//! Queries are checked at run time (through `sqlx::Any`), not at compile time: the
//! compile-time macros are per engine and would have to be written twice. The shared
//! integration suite (`tests/store.rs`) runs every query against both engines instead.
//!
//! Layout: `types` (names, UUIDs, generations, timestamps: pure, a leaf) ← `error` ← `db`
//! (the pool, migrations, the database's clock, leases as fencing tokens, row helpers) ← one
//! module per table or concern (`hosts`, `images`, `instances`, `operations`, `outlets`, `policy`, `events`, `leadership`,
//! `leases`, `reports`, `settings`, `guard_role`, `tokens`); `guard_api` holds the wire types the guard
//! API and its clients share. No other crate writes SQL.

mod db;
mod error;
mod events;
mod gauges;
pub mod guard_api;
mod guard_role;
mod hosts;
mod images;
mod instances;
mod leadership;
mod leases;
mod operations;
mod outlets;
mod policy;
mod reports;
mod services;
mod settings;
mod tokens;
mod types;

pub use db::{redact_url, Backend, ConnectOptions, DatabaseUrl, LeaseToken, Store};
pub use error::{Result, StoreError};
pub use events::{Event, EventFilter, NewEvent};
pub use gauges::FleetGauges;
pub use guard_role::{GuardRole, GuardSession};
pub use hosts::{BootChange, BootSettings, Host, NewHost};
pub use images::{check_image_name, Image, ImageFormat, NewImage};
pub use instances::{evacuation_source_safe, Instance, NewInstance, OwnerMove, Ownership, Transfer};
pub use leadership::Leadership;
pub use leases::Lease;
pub use operations::{Operation, StepChange};
pub use outlets::HostOutlet;
pub use policy::{valid_group, HostInventory, InstancePolicy};
pub use reports::{FencingProfile, GuardReport, ReportedDomain};
pub use services::{valid_name, CopyChange, Service, ServiceCopy};
pub use tokens::{valid_token_name, AdminToken, Role};
pub use types::{
    BootMode, BootPath, Generation, HostName, HostState, InstanceId, MacAddr, OperationStatus, ParseError, Storage,
    Timestamp,
};

#[cfg(feature = "testing")]
pub mod testing;
