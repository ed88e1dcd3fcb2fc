//! Failure detection, as a pure function of the hosts and the clock ("Recovery" in
//! DESIGN.md): a host that has heartbeated and then stays silent past `grace` turns `suspect`;
//! a suspect that heartbeats again (before its fence began) is `active` again; suspects are
//! fenced — unless more than `mass_failure_share` of the watched hosts are suspect at once,
//! which looks like a partition of the controller, not a wave of dead hosts: then nothing is
//! fenced and an alert is raised, until an operator acts or the hosts come back.
//!
//! A host need not wait the whole grace when its fence device already says it is off: after
//! `probe_after` of silence the controller asks the BMC ([`to_probe`]), and a host whose BMC
//! answered `Off` after its last heartbeat is suspect at once, and fenced (the brake counts it
//! like any suspect).

use std::time::Duration;

use nodekeeper_store::{Host, HostName, HostState, Timestamp};

/// The knobs of detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Silence after which a host is suspect.
    pub grace: Duration,
    /// Share of watched hosts (0..=1) suspect at once above which automatic recovery stops.
    pub mass_failure_share: f64,
    /// Silence after which the BMC is asked whether the host is off (`None`: never).
    pub probe_after: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { grace: Duration::from_secs(30), mass_failure_share: 0.5, probe_after: Some(Duration::from_secs(10)) }
    }
}

/// One thing the controller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mark an active host suspect.
    Suspect {
        /// The host.
        host: HostName,
        /// How long it has been silent (for the event).
        silent_for: Duration,
        /// Its BMC said it is off (before the grace ran out).
        off: bool,
    },
    /// A suspect host heartbeats again: back to active.
    Recovered {
        /// The host.
        host: HostName,
    },
    /// A fenced host heartbeats again after its fence (it was powered on, its guard's boot
    /// quarantined what moved away): back to active.
    Returned {
        /// The host.
        host: HostName,
    },
    /// Start fencing a suspect host (unless a fence already runs: the store refuses twice).
    Fence {
        /// The host.
        host: HostName,
    },
    /// Too many suspects at once: no fencing; say so.
    MassFailure {
        /// Hosts suspect now.
        suspects: usize,
        /// Hosts watched.
        watched: usize,
    },
}

/// Hosts that count: the ones whose silence means something. A host that never heartbeated
/// (just added, not installed) is not watched; nor is one in maintenance or being reimaged.
fn watched(h: &Host) -> bool {
    h.last_heartbeat.is_some() && matches!(h.state, HostState::Active | HostState::Suspect)
}

/// How long `h` has been silent as seen by a controller watching since `since`.
fn silent_for(h: &Host, now: Timestamp, since: Timestamp) -> Duration {
    now.since(h.last_heartbeat.map_or(since, |t| t.max(since)))
}

/// Whether `h` counts toward the brake at `now`: suspect, or silent past half the grace. A
/// partition silences its hosts within one heartbeat interval of each other, so when the
/// first of them is past the grace the others are past half of it; counting only those past
/// the grace would fence the first few before the brake sees the rest.
fn counts_for_brake(h: &Host, now: Timestamp, since: Timestamp, policy: &Policy) -> bool {
    h.state == HostState::Suspect || silent_for(h, now, since) > policy.grace / 2
}

/// The active hosts whose BMC should be asked now whether they are off: silent longer than
/// `probe_after`, not yet past the grace.
pub fn to_probe(hosts: &[Host], now: Timestamp, since: Timestamp, policy: &Policy) -> Vec<HostName> {
    let Some(after) = policy.probe_after else { return Vec::new() };
    hosts
        .iter()
        .filter(|h| watched(h) && h.state == HostState::Active)
        .filter(|h| {
            let silent = silent_for(h, now, since);
            silent > after && silent <= policy.grace
        })
        .map(|h| h.name.clone())
        .collect()
}

/// What to do at `now`. `fencing` lists the hosts whose fence operation is already running
/// (they are past the point of return: a heartbeat now does not stop their fence); `held`,
/// suspects whose last fence failed recently (no new fence yet, but they may come back);
/// `off`, hosts whose BMC answered `Off` since their last heartbeat (see [`to_probe`]).
/// `since`: when this controller started watching (silence before it is not counted).
pub fn plan(
    hosts: &[Host],
    fencing: &[HostName],
    held: &[HostName],
    off: &[HostName],
    now: Timestamp,
    since: Timestamp,
    policy: &Policy,
) -> Vec<Action> {
    plan_among(hosts, 0, fencing, held, off, now, since, policy)
}

/// How recently a host must have been heard to be left out of detection's read at `now`
/// ([`plan_among`]): one heard since can neither be probed nor count toward the brake.
pub fn quiet_since(now: Timestamp, policy: &Policy) -> Timestamp {
    let half = policy.grace / 2;
    Timestamp(
        now.0 - i64::try_from(policy.probe_after.map_or(half, |p| p.min(half)).as_millis()).unwrap_or(i64::MAX / 4),
    )
}

/// [`plan`] over the hosts detection must look at — every host not `active`, never heard,
/// or heard before [`quiet_since`] — and `quiet`, how many active hosts heard since were left
/// out (they count among the watched, and for nothing else): the tick's read is the hosts
/// that fell silent, not the fleet.
#[allow(clippy::too_many_arguments)]
pub fn plan_among(
    hosts: &[Host],
    quiet: usize,
    fencing: &[HostName],
    held: &[HostName],
    off: &[HostName],
    now: Timestamp,
    since: Timestamp,
    policy: &Policy,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for h in hosts {
        // `updated_at` moves with the state, not with heartbeats: a heartbeat after it is one
        // sent since the host was fenced.
        if h.state == HostState::Fenced
            && !fencing.contains(&h.name)
            && h.last_heartbeat.is_some_and(|t| t > h.updated_at && now.since(t) <= policy.grace)
        {
            actions.push(Action::Returned { host: h.name.clone() });
        }
    }
    let watched: Vec<&Host> = hosts.iter().filter(|h| watched(h)).collect();
    let mut suspects = Vec::new();
    for h in &watched {
        let silent = silent_for(h, now, since);
        let known_off = policy.probe_after.is_some_and(|after| silent > after) && off.contains(&h.name);
        let is_silent = silent > policy.grace || known_off;
        match (h.state, is_silent) {
            (HostState::Active, true) => {
                actions.push(Action::Suspect { host: h.name.clone(), silent_for: silent, off: known_off });
                suspects.push(h.name.clone());
            }
            (HostState::Suspect, false) if !fencing.contains(&h.name) => {
                actions.push(Action::Recovered { host: h.name.clone() });
            }
            (HostState::Suspect, _) => suspects.push(h.name.clone()),
            _ => {}
        }
    }
    let silent =
        watched.iter().filter(|h| suspects.contains(&h.name) || counts_for_brake(h, now, since, policy)).count();
    let share = silent as f64 / (watched.len() + quiet).max(1) as f64;
    // One host of one, or of two, failing is no partition: the brake needs company.
    if silent > 1 && share > policy.mass_failure_share {
        actions.push(Action::MassFailure { suspects: silent, watched: watched.len() + quiet });
        return actions;
    }
    for s in suspects {
        if !fencing.contains(&s) && !held.contains(&s) {
            actions.push(Action::Fence { host: s });
        }
    }
    actions
}

/// Whether the mass-failure brake holds at `now` (why, in words): more than
/// `mass_failure_share` of the watched hosts suspect or silent past half the grace, and more
/// than one. Fencing levels after the BMC (watchdog fencing) ask it again before they count a host
/// as fenced.
pub fn brake(hosts: &[Host], now: Timestamp, since: Timestamp, policy: &Policy) -> Option<String> {
    let watched: Vec<&Host> = hosts.iter().filter(|h| watched(h)).collect();
    let silent = watched.iter().filter(|h| counts_for_brake(h, now, since, policy)).count();
    let share = silent as f64 / watched.len().max(1) as f64;
    (silent > 1 && share > policy.mass_failure_share).then(|| {
        format!(
            "{silent} of {} watched hosts are silent at once (more than {:.0}%)",
            watched.len(),
            policy.mass_failure_share * 100.0
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::testing::host;

    fn n(s: &str) -> HostName {
        s.parse().expect("name")
    }

    const NOW: Timestamp = Timestamp(1_000_000);
    /// A controller that has watched all along.
    const LONG_AGO: Timestamp = Timestamp(0);

    #[test]
    fn a_controller_that_just_took_over_counts_silence_from_then() {
        // The provisioner was down for 5 minutes (guards on the embedded SQLite heartbeat
        // through it): its controller comes back and must not fence every host at once.
        let p = Policy::default();
        let hosts = [host("a", HostState::Active, Some(NOW.0 - 300_000)), host("b", HostState::Active, None)];
        assert!(plan(&hosts, &[], &[], &[], NOW, NOW, &p).is_empty());
        assert!(plan(&hosts, &[], &[], &[], Timestamp(NOW.0 + 30_000), NOW, &p).is_empty(), "exactly grace: not yet");
        let later = plan(&hosts, &[], &[], &[], Timestamp(NOW.0 + 31_000), NOW, &p);
        assert_eq!(later[0], Action::Suspect { host: n("a"), silent_for: Duration::from_secs(31), off: false });
    }

    #[test]
    fn silence_past_grace_makes_a_suspect_then_a_fence() {
        let p = Policy::default();
        let hosts = [
            host("a", HostState::Active, Some(NOW.0 - 31_000)),
            host("b", HostState::Active, Some(NOW.0 - 1_000)),
            host("c", HostState::Active, Some(NOW.0 - 30_000)), // exactly grace: not yet
            host("d", HostState::Active, Some(NOW.0 - 2_000)),
        ];
        let a = plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p);
        assert_eq!(
            a,
            vec![
                Action::Suspect { host: n("a"), silent_for: Duration::from_secs(31), off: false },
                Action::Fence { host: n("a") }
            ]
        );
    }

    #[test]
    fn unwatched_hosts_are_never_suspect() {
        let p = Policy::default();
        let hosts = [
            host("new", HostState::Active, None),
            host("maint", HostState::Maintenance, Some(0)),
            host("reimaging", HostState::Reimaging, Some(0)),
            host("fenced", HostState::Fenced, Some(0)),
        ];
        assert!(plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p).is_empty());
    }

    #[test]
    fn a_fenced_host_that_heartbeats_after_its_fence_returns() {
        let p = Policy::default();
        let mut fenced = host("a", HostState::Fenced, Some(NOW.0 - 1_000));
        fenced.updated_at = Timestamp(NOW.0 - 5_000); // fenced before that heartbeat
        let b = host("b", HostState::Active, Some(NOW.0));
        assert_eq!(
            plan(&[fenced.clone(), b.clone()], &[], &[], &[], NOW, LONG_AGO, &p),
            vec![Action::Returned { host: n("a") }]
        );
        // Not while its fence runs, and not on a heartbeat from before the fence.
        assert!(plan(&[fenced.clone(), b.clone()], &[n("a")], &[], &[], NOW, LONG_AGO, &p).is_empty());
        fenced.updated_at = Timestamp(NOW.0);
        assert!(plan(&[fenced, b], &[], &[], &[], NOW, LONG_AGO, &p).is_empty());
    }

    #[test]
    fn a_suspect_that_heartbeats_again_is_active_unless_its_fence_started() {
        let p = Policy::default();
        let hosts = [host("a", HostState::Suspect, Some(NOW.0 - 500)), host("b", HostState::Active, Some(NOW.0))];
        assert_eq!(plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p), vec![Action::Recovered { host: n("a") }]);
        // Its fence runs: past the point of return, nothing to do here (the fence finishes).
        assert!(plan(&hosts, &[n("a")], &[], &[], NOW, LONG_AGO, &p).is_empty());
    }

    #[test]
    fn a_suspect_is_fenced_once() {
        let p = Policy::default();
        let hosts = [host("a", HostState::Suspect, Some(0)), host("b", HostState::Active, Some(NOW.0))];
        assert_eq!(plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p), vec![Action::Fence { host: n("a") }]);
        assert!(plan(&hosts, &[n("a")], &[], &[], NOW, LONG_AGO, &p).is_empty(), "its fence already runs");
        assert!(plan(&hosts, &[], &[n("a")], &[], NOW, LONG_AGO, &p).is_empty(), "its last fence failed just now");
        // Held back after a failed fence, it may still come back.
        let back = [host("a", HostState::Suspect, Some(NOW.0)), host("b", HostState::Active, Some(NOW.0))];
        assert_eq!(plan(&back, &[], &[n("a")], &[], NOW, LONG_AGO, &p), vec![Action::Recovered { host: n("a") }]);
    }

    #[test]
    fn a_host_its_bmc_says_is_off_is_fenced_before_the_grace() {
        let p = Policy::default();
        let hosts = [
            host("a", HostState::Active, Some(NOW.0 - 11_000)),
            host("b", HostState::Active, Some(NOW.0 - 9_000)),
            host("c", HostState::Active, Some(NOW.0)),
            host("m", HostState::Maintenance, Some(NOW.0 - 20_000)),
        ];
        // Past probe_after (10 s) and within the grace: a is asked; b not yet; m never.
        assert_eq!(to_probe(&hosts, NOW, LONG_AGO, &p), vec![n("a")]);
        assert!(to_probe(&hosts, NOW, LONG_AGO, &Policy { probe_after: None, ..p.clone() }).is_empty());
        // Its BMC said Off: suspect and fenced now, 19 s before the grace.
        let a = plan(&hosts, &[], &[], &[n("a")], NOW, LONG_AGO, &p);
        assert_eq!(
            a,
            vec![
                Action::Suspect { host: n("a"), silent_for: Duration::from_secs(11), off: true },
                Action::Fence { host: n("a") }
            ]
        );
        // On, or asked too early (b, silent 9 s: an Off from before probe_after does not
        // count), or with probing off: the grace as before.
        assert!(plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p).is_empty());
        assert!(plan(&hosts, &[], &[], &[n("b")], NOW, LONG_AGO, &p).is_empty());
        assert!(plan(&hosts, &[], &[], &[n("a")], NOW, LONG_AGO, &Policy { probe_after: None, ..p.clone() }).is_empty());
        // A controller that just took over counts silence from then, for the probe too.
        assert!(to_probe(&hosts, NOW, Timestamp(NOW.0 - 5_000), &p).is_empty());
        assert!(plan(&hosts, &[], &[], &[n("a")], NOW, Timestamp(NOW.0 - 5_000), &p).is_empty());
    }

    #[test]
    fn the_brake_counts_hosts_their_bmc_says_are_off() {
        let p = Policy::default();
        let quiet = Some(NOW.0 - 12_000);
        let hosts = [
            host("a", HostState::Active, quiet),
            host("b", HostState::Active, quiet),
            host("c", HostState::Active, quiet),
            host("d", HostState::Active, Some(NOW.0)),
        ];
        let a = plan(&hosts, &[], &[], &[n("a"), n("b"), n("c")], NOW, LONG_AGO, &p);
        assert!(a.contains(&Action::MassFailure { suspects: 3, watched: 4 }), "{a:?}");
        assert!(!a.iter().any(|x| matches!(x, Action::Fence { .. })), "{a:?}");
    }

    #[test]
    fn a_partition_whose_hosts_heartbeated_at_different_moments_brakes_before_the_first_is_fenced() {
        // 6 of 10 hosts cut off at once; their last heartbeats were spread over 5 s (each
        // guard's own phase). At the tick where the first is past the 30 s grace the others
        // are 25-30 s silent: the brake must hold now, not once the last of them is past it.
        let p = Policy { probe_after: None, ..Policy::default() };
        let mut hosts: Vec<Host> =
            (0..6).map(|i| host(&format!("cut{i}"), HostState::Active, Some(NOW.0 - 30_100 + i * 1_000))).collect();
        hosts.extend((0..4).map(|i| host(&format!("ok{i}"), HostState::Active, Some(NOW.0 - 1_000))));
        let a = plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p);
        assert!(a.contains(&Action::MassFailure { suspects: 6, watched: 10 }), "{a:?}");
        assert!(!a.iter().any(|x| matches!(x, Action::Fence { .. })), "{a:?}");
        assert!(brake(&hosts, NOW, LONG_AGO, &p).is_some());
        // One host silent past the grace and one past half of it, of ten: no partition; the
        // one past the grace is fenced.
        let mut hosts: Vec<Host> =
            (0..8).map(|i| host(&format!("ok{i}"), HostState::Active, Some(NOW.0 - 1_000))).collect();
        hosts.push(host("dead", HostState::Active, Some(NOW.0 - 31_000)));
        hosts.push(host("slow", HostState::Active, Some(NOW.0 - 16_000)));
        let a = plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p);
        assert_eq!(
            a.iter().filter(|x| matches!(x, Action::Fence { .. })).collect::<Vec<_>>(),
            [&Action::Fence { host: n("dead") }]
        );
        assert!(brake(&hosts, NOW, LONG_AGO, &p).is_none());
    }

    #[test]
    fn too_many_suspects_at_once_brake_instead_of_fencing() {
        let p = Policy { mass_failure_share: 0.5, ..Policy::default() };
        let old = Some(NOW.0 - 60_000);
        let fresh = Some(NOW.0);
        // 3 of 5 silent: 60% > 50%: brake, and nothing is fenced.
        let hosts = [
            host("a", HostState::Active, old),
            host("b", HostState::Active, old),
            host("c", HostState::Suspect, old),
            host("d", HostState::Active, fresh),
            host("e", HostState::Active, fresh),
        ];
        let a = plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p);
        assert!(a.contains(&Action::MassFailure { suspects: 3, watched: 5 }), "{a:?}");
        assert!(!a.iter().any(|x| matches!(x, Action::Fence { .. })), "{a:?}");
        // They are still marked suspect: the state is visible to a scheduler.
        assert_eq!(a.iter().filter(|x| matches!(x, Action::Suspect { .. })).count(), 2);
        // 2 of 5: 40%: fenced.
        let hosts = [
            host("a", HostState::Active, old),
            host("b", HostState::Active, old),
            host("c", HostState::Active, fresh),
            host("d", HostState::Active, fresh),
            host("e", HostState::Active, fresh),
        ];
        let a = plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p);
        assert_eq!(a.iter().filter(|x| matches!(x, Action::Fence { .. })).count(), 2, "{a:?}");
        // One of two failing is not a partition.
        let hosts = [host("a", HostState::Active, old), host("b", HostState::Active, fresh)];
        assert!(plan(&hosts, &[], &[], &[], NOW, LONG_AGO, &p).contains(&Action::Fence { host: n("a") }));
    }

    /// Detection over the hosts that fell silent and a count of the rest decides exactly as
    /// over the whole fleet, over random fleets: states, heartbeats (some never), a controller
    /// that began to lead lately or long ago, BMCs that said off, fences running — partitions
    /// that hold the brake among them.
    #[test]
    fn the_hosts_that_fell_silent_and_a_count_of_the_rest_decide_as_the_whole_fleet() {
        let mut next = crate::recovery::draws(0x2545_f491_4f6c_dd1d_u64);
        let states = [HostState::Active, HostState::Suspect, HostState::Fenced, HostState::Maintenance];
        for round in 0..300 {
            let p = Policy {
                grace: Duration::from_secs(30),
                mass_failure_share: 0.5,
                probe_after: (next(2) == 0).then(|| Duration::from_secs(5 + next(20))),
            };
            let silent_share = next(100);
            let hosts: Vec<Host> = (0..(1 + next(30)))
                .map(|i| {
                    let state = if next(4) == 0 { states[next(4) as usize] } else { HostState::Active };
                    let ago = if next(100) < silent_share { next(60_000) as i64 } else { next(4_000) as i64 };
                    let beat = (next(10) > 0).then_some(NOW.0 - ago);
                    let mut h = host(&format!("h{i:02}"), state, beat);
                    h.updated_at = Timestamp(NOW.0 - next(60_000) as i64);
                    h
                })
                .collect();
            let since = if next(3) == 0 { Timestamp(NOW.0 - next(40_000) as i64) } else { LONG_AGO };
            let pick = |hosts: &[Host], every: u64| -> Vec<HostName> {
                hosts.iter().step_by(every as usize).map(|h| h.name.clone()).collect()
            };
            let fencing = pick(&hosts, 3 + next(3));
            let off = pick(&hosts, 2 + next(3));
            let cutoff = quiet_since(NOW, &p);
            let heard = |h: &Host| h.state == HostState::Active && h.last_heartbeat.is_some_and(|t| t >= cutoff);
            let listed: Vec<Host> = hosts.iter().filter(|h| !heard(h)).cloned().collect();
            let quiet = hosts.iter().filter(|h| heard(h)).count();
            assert_eq!(
                plan_among(&listed, quiet, &fencing, &[], &off, NOW, since, &p),
                plan(&hosts, &fencing, &[], &off, NOW, since, &p),
                "round {round}"
            );
            assert_eq!(to_probe(&listed, NOW, since, &p), to_probe(&hosts, NOW, since, &p), "round {round}");
        }
    }
}
