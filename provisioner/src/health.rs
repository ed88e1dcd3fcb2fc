//! What `/healthz` reports: each component of `serve` (HTTP, TFTP, DHCP, the reimage
//! executor, the recovery controller) is up, or down since when and why. A component that
//! ends or fails is restarted with backoff by its supervisor ([`crate::serve`]); until it is
//! back, `/healthz` answers 503 and names it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use nodekeeper_store::Timestamp;

/// One component's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Running.
    pub up: bool,
    /// Since when (this process's clock).
    pub since: Timestamp,
    /// Times it was restarted.
    pub restarts: u32,
    /// Why it went down last.
    pub last_error: Option<String>,
}

/// Every component's state.
#[derive(Debug, Default)]
pub struct Health {
    components: Mutex<BTreeMap<&'static str, Component>>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<&'static str, Component>) -> T) -> T {
        f(&mut self.components.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `name` is (again) running.
    pub fn up(&self, name: &'static str) {
        self.with(|c| {
            let restarts = c.get(name).map_or(0, |old| old.restarts + u32::from(!old.up));
            let last_error = c.get(name).and_then(|old| old.last_error.clone());
            c.insert(name, Component { up: true, since: Timestamp::now(), restarts, last_error });
        });
    }

    /// `name` ended or failed with `why`.
    pub fn down(&self, name: &'static str, why: String) {
        self.with(|c| {
            let restarts = c.get(name).map_or(0, |old| old.restarts);
            c.insert(name, Component { up: false, since: Timestamp::now(), restarts, last_error: Some(why) });
        });
    }

    /// Every component, by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, Component> {
        self.with(|c| c.clone())
    }

    /// The components that are down, one line each (empty when all are up).
    pub fn problems(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, c)| !c.up)
            .map(|(name, c)| {
                format!(
                    "{name}: down since {} (restarted {} times): {}",
                    c.since,
                    c.restarts,
                    c.last_error.as_deref().unwrap_or("ended")
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_go_down_and_come_back_counted() {
        let h = Health::default();
        h.up("dhcp");
        h.up("tftp");
        assert!(h.problems().is_empty());
        h.down("dhcp", "loading DHCP leases: the database is down".into());
        let p = h.problems();
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("dhcp: down since ") && p[0].contains("leases"), "{p:?}");
        h.up("dhcp");
        assert!(h.problems().is_empty());
        assert_eq!(h.snapshot()["dhcp"].restarts, 1);
        assert_eq!(h.snapshot()["tftp"].restarts, 0);
    }
}
