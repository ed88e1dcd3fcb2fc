//! Cell-wide recovery ("Recovery" in DESIGN.md), built as pure parts first: failure
//! detection with the mass-failure brake ([`detect`]), placement of a failed host's HA
//! instances ([`place`]), the fence operation's state machine ([`fence`]), and the GC pass's
//! judgement of the guards' reports ([`drift`]). The executor
//! and the controller that run them inside `serve` (behind the leadership lease in the
//! store) build on these.

pub mod controller;
pub mod detect;
pub mod drain;
pub mod drift;
pub mod fence;
pub mod migrate;
pub mod place;
pub mod services;
pub mod watchdog;
