//! Cell-wide recovery ("Recovery" in DESIGN.md), built as pure parts first: failure
//! detection with the mass-failure brake ([`detect`]) and placement of a failed host's HA
//! instances ([`place`]). The fencing operation and the controller that runs them inside
//! `serve` (behind the leadership lease in the store) build on these.

pub mod detect;
pub mod place;
