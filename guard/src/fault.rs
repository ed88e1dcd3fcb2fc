//! Fault injection for crash tests: when `NODEKEEPER_CRASH_AT` names a point, the process
//! aborts there (as `kill -9` would stop it), so tests can prove that the next run finishes
//! the job. Unset in production; reading it costs one lookup per process.

use std::sync::OnceLock;

/// The environment variable naming the point to crash at.
pub const CRASH_AT_VAR: &str = "NODEKEEPER_CRASH_AT";

/// Aborts the process if `name` is the configured crash point.
pub fn point(name: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    if TARGET.get_or_init(|| std::env::var(CRASH_AT_VAR).ok()).as_deref() == Some(name) {
        eprintln!("{CRASH_AT_VAR}={name}: aborting here (fault injection)");
        std::process::abort();
    }
}
