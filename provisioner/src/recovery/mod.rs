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

/// The `fenced` hosts that the way back of their last fence powered on again
/// (`after_fence = power-on`), with when that fence ended, and those a new fence is powering
/// off again: no longer known off — until they are heard (active again) or confirmed off
/// again, they may run what was theirs. Their exclusive
/// service copies stay (services), their HA instances move only after a new power-off
/// (the GC pass's retry).
pub async fn powered_on_again(
    store: &nodekeeper_store::Store,
    hosts: &[&nodekeeper_store::Host],
) -> Result<
    std::collections::HashMap<nodekeeper_store::HostName, nodekeeper_store::Timestamp>,
    nodekeeper_store::StoreError,
> {
    let mut out = std::collections::HashMap::new();
    for h in hosts.iter().filter(|h| h.state == nodekeeper_store::HostState::Fenced) {
        let Some(op) = store.latest_operation_of("fence", &h.name).await? else { continue };
        let on = serde_json::from_str::<fence::FenceData>(&op.data)
            .is_ok_and(|d| d.after == crate::config::AfterFence::PowerOn);
        let ended = op.status != nodekeeper_store::OperationStatus::Running;
        // A fence of it again that has not confirmed it off yet (the GC pass's retry).
        let confirming = !ended && matches!(op.step.as_str(), "power_off" | "outlet_off" | "watchdog");
        if (on && ended) || confirming {
            out.insert(h.name.clone(), op.updated_at);
        }
    }
    Ok(out)
}

/// Seeded pseudo-random draws for the randomized tests (xorshift64): each `draw(m)` is in `0..m`.
#[cfg(test)]
pub(crate) fn draws(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |m| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    }
}
