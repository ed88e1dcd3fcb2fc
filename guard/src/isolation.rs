//! The self-fence's quorum rule, as a pure function (as SBD's with Pacemaker): a guard that
//! cannot reach the controller asks its peers before it stops anything.
//!
//! - A peer that reaches the controller relayed this host's heartbeat → **hold**: the host is
//!   alive to the controller (a bad cable or switch port of its own, not a dead host).
//! - A peer reaches the controller but could not relay → **self-fence**: the controller is up
//!   and sees this host silent; it will fence it and recover its HA instances elsewhere.
//! - No peer reaches the controller, and this host with the peers that answered is a strict
//!   majority of the cell → **hold**: the controller is what is down (an upgrade, a crash, a
//!   restart), and stopping every HA instance of the cell for it is exactly the mass
//!   self-fence that must not happen; the controller's own mass-failure brake decides when it
//!   is back.
//! - Otherwise this host is in a minority, cut off from the controller and from most of the
//!   cell → **self-fence**.
//!
//! A cell of one (no peers known: none has an address, or the list was never fetched) always
//! holds: the BMC fence is the first line, the self-fence only the second.

/// What one round of peer checks found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerView {
    /// Peers asked.
    pub asked: usize,
    /// Peers counted in the cell (active ones) whose authenticated answer came back.
    pub answered: usize,
    /// Of every peer that answered (counted or not), how many reach the controller.
    pub reach_controller: usize,
    /// Whether one of them relayed this host's heartbeat.
    pub relayed: bool,
}

/// The decision, with its reason in words (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Keep the instances running.
    Hold(String),
    /// Stop the HA instances.
    SelfFence(String),
}

/// Decides for a host cut off from the controller, in a cell of `cell_size` hosts (itself
/// included), after asking `view.asked` of its peers: a sample when the cell is large, in
/// which case the majority is judged on the sample (this host plus the peers asked). Pure.
pub fn decide(cell_size: usize, view: &PeerView) -> Isolation {
    if view.relayed {
        return Isolation::Hold("a peer that reaches the controller relays this host's heartbeat".into());
    }
    if view.reach_controller > 0 {
        return Isolation::SelfFence(format!(
            "{} peer(s) reach the controller but none could relay this host's heartbeat: the controller \
             sees this host silent",
            view.reach_controller
        ));
    }
    let counted = if view.asked + 1 < cell_size { view.asked + 1 } else { cell_size.max(1) };
    let with_us = view.answered + 1;
    if with_us * 2 > counted {
        Isolation::Hold(format!(
            "{} of {counted} hosts (this one included) answer and none reaches the controller: the controller is \
             down, not this host",
            with_us
        ))
    } else {
        Isolation::SelfFence(format!(
            "cut off from the controller and from most of the cell ({with_us} of {counted} hosts reachable, this \
             one included)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(asked: usize, answered: usize, reach: usize, relayed: bool) -> PeerView {
        PeerView { asked, answered, reach_controller: reach, relayed }
    }

    #[test]
    fn a_cut_off_guard_fences_itself_only_in_a_minority() {
        let hold = |cell, v: PeerView| matches!(decide(cell, &v), Isolation::Hold(_));
        let cases = [
            // (cell size, view, hold?)
            // The provisioner is down: everyone answers, nobody reaches it.
            (3, view(2, 2, 0, false), true),
            (2, view(1, 1, 0, false), true),
            (50, view(16, 16, 0, false), true),
            // This host's own link is down, its peers reach the controller and relay.
            (3, view(2, 2, 2, true), true),
            (3, view(2, 1, 1, true), true),
            // Peers reach the controller, but no relay got through: it will fence us.
            (3, view(2, 2, 1, false), false),
            // Cut off from everything.
            (3, view(2, 0, 0, false), false),
            (2, view(1, 0, 0, false), false),
            // Half is not a majority.
            (4, view(3, 1, 0, false), false),
            (4, view(3, 2, 0, false), true),
            // A sample of a large cell: judged on the sample.
            (1000, view(16, 8, 0, false), true),
            (1000, view(16, 7, 0, false), false),
            // A cell of one (no peers known): hold; the BMC fence is the first line.
            (1, view(0, 0, 0, false), true),
            (0, view(0, 0, 0, false), true),
        ];
        for (cell, v, want) in cases {
            assert_eq!(hold(cell, v), want, "cell {cell}, {v:?}: {:?}", decide(cell, &v));
        }
    }
}
