//! Watchdog fencing — SBD's diskless mode — as pure functions: when neither the BMC nor any
//! other device can confirm that a silent host is off, the controller may still count it as
//! fenced once enough time has passed, *if* its guard said it fences itself and keeps a
//! hardware watchdog armed, and a majority of the cell the guard's quorum rule counts has
//! been heartbeating all along. The argument, step by step, is in docs/watchdog-fencing.md;
//! in short, a host silent while that majority heartbeats is in one of three states:
//!
//! - **dead** (off, crashed): nothing runs;
//! - **hung** (kernel, or the guard's loops): the watchdog is no longer fed, and resets the
//!   host within its timeout;
//! - **alive but cut off** from the controller: its guard, past `isolation_timeout`, asks its
//!   peers. It holds only if a peer relays its heartbeat (then the controller hears it, and
//!   the fence is called off), or if it and the peers that answer are a majority of its cell
//!   with none reaching the controller. Its cell is the set it reported, asked in full (the
//!   profile's `quorum_cell`); two majorities of one set meet, so one of the answering peers
//!   is one that heartbeats — it reaches the controller, and the guard fences itself: it
//!   stops its HA domains within `libvirt_timeout`, or stops feeding the watchdog.
//!
//! After a reset, `guard boot` does not autostart HA domains without the database
//! (`boot_blocks_ha`), and `guard watch` starts them only when the database assigns them.

use std::collections::HashMap;
use std::time::Duration;

use nodekeeper_store::guard_api::PEER_ASK_TIMEOUT;
use nodekeeper_store::{FencingProfile, Host, HostName, Timestamp};

/// Why a host cannot be fenced by waiting out its watchdog, if it cannot: its guard's
/// profile alone (the quorum and the clock are judged by [`judge`]).
pub fn refusal(profile: Option<&FencingProfile>) -> Option<String> {
    let Some(p) = profile else {
        return Some("its guard never reported how it fences itself".into());
    };
    let why = if !p.self_fence {
        "its guard's self-fence is off (watch.self_fence = false)"
    } else if p.watchdog_timeout_ms.is_none() {
        "its guard reported no armed hardware watchdog with a known timeout (watch.hardware_watchdog)"
    } else if !p.boot_blocks_ha {
        "its guard's boot would autostart HA domains without the database (boot.on_db_unreachable = allow)"
    } else if p.quorum_cell.is_none() {
        "its guard judges its quorum on a sample of a large cell, not on a majority of a known set \
         (raise watch.peer_sample above the cell's size)"
    } else if p.quorum_cell.as_ref().is_some_and(Vec::is_empty) {
        "its guard knows no peer: a cell of one never fences itself"
    } else {
        return None;
    };
    Some(why.into())
}

/// A majority of the silent host's quorum cell heartbeating, at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    /// Members (the silent host excluded) whose heartbeat is fresh.
    pub fresh: usize,
    /// The cell's size, the silent host included.
    pub size: usize,
}

impl Quorum {
    /// A strict majority of the cell heartbeats (the silent host is not among them).
    pub fn held(&self) -> bool {
        self.fresh * 2 > self.size
    }
}

/// Counts the members of `cell` (the silent host's quorum cell, itself excluded) that
/// heartbeated at `now` within 1.5 of their own heartbeat intervals (`intervals`, from their
/// profiles: a member without one is not counted). With looks no more than 1.5 intervals
/// apart ([`track`]), such a member heartbeated less than three intervals before any moment
/// in between — and a guard answers its peers that it reaches the controller while its own
/// last heartbeat is less than three intervals old.
pub fn quorum(cell: &[HostName], hosts: &[Host], intervals: &HashMap<HostName, Duration>, now: Timestamp) -> Quorum {
    let by_name: HashMap<&HostName, &Host> = hosts.iter().map(|h| (&h.name, h)).collect();
    let fresh = cell
        .iter()
        .filter(|name| {
            let (Some(h), Some(every)) = (by_name.get(name), intervals.get(*name)) else { return false };
            h.last_heartbeat.is_some_and(|t| now.since(t) <= *every * 3 / 2)
        })
        .count();
    Quorum { fresh, size: cell.len() + 1 }
}

/// Since when a quorum has been seen at every look, the looks no further apart than `max_gap`
/// (1.5 of the cell's shortest heartbeat interval: a gap — a paused or restarted controller —
/// starts the count again: what happened in it was not seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The first look of the unbroken run.
    pub since: Timestamp,
    /// The latest look.
    pub last: Timestamp,
}

/// The run after a look at `now` that found the quorum `held` (or not).
pub fn track(prev: Option<Seen>, now: Timestamp, held: bool, max_gap: Duration) -> Option<Seen> {
    if !held {
        return None;
    }
    match prev {
        Some(s) if now.0 >= s.last.0 && now.since(s.last) <= max_gap => Some(Seen { since: s.since, last: now }),
        _ => Some(Seen { since: now, last: now }),
    }
}

/// When the silent host is off, or has stopped its HA domains, at the latest; with the terms
/// of the sum, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The earliest time the host may be counted as fenced.
    pub at: Timestamp,
    /// How it was reckoned.
    pub terms: String,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn words(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0))).to_string()
}

/// The bound for a host last heard at `last_heartbeat` (the database's time), whose cell's
/// majority has heartbeated at every look since `quorum_since`:
///
/// - its guard's isolation clock runs out by `last_heartbeat + I + H` (it counts from the
///   answer to its last heartbeat, at most one interval — the heartbeat's budget — later);
/// - from then, or from `quorum_since` if later, it decides within `2H + A` (the next failed
///   heartbeat: one interval plus that heartbeat's budget; one round of peer checks);
/// - it stops its HA domains within `L`, or stops feeding the watchdog; the last ping is at
///   most `H` before that; the watchdog resets the host within `W` of the last ping;
/// - never earlier than `last_heartbeat + grace + I + W` (the bound);
/// - plus a margin for clock rates: 10 % of the wait, at least 5 s.
pub fn bound(p: &FencingProfile, last_heartbeat: Timestamp, grace: Duration, quorum_since: Timestamp) -> Bound {
    let to = |v: u64| i64::try_from(v).unwrap_or(i64::MAX / 4);
    let (h, i, l) = (to(p.heartbeat_interval_ms), to(p.isolation_timeout_ms), to(p.libvirt_timeout_ms));
    let w = to(p.watchdog_timeout_ms.unwrap_or(0));
    let a = ms(PEER_ASK_TIMEOUT);
    let last = last_heartbeat.0;
    let start = (last + i + h).max(quorum_since.0);
    let decided = start + 2 * h + a;
    let reset = decided + l + h + w;
    let floor = last + ms(grace) + i + w;
    let raw = reset.max(floor);
    let margin = ((raw - last) / 10).max(5_000);
    let at = Timestamp(raw + margin);
    let terms = format!(
        "its guard decides by {} (isolation {} + heartbeat {} after its last heartbeat {}, or the quorum seen since {}; \
         then two heartbeats and a peer round {}), stops its HA domains within libvirt's {} or stops feeding its \
         watchdog (last ping within {}), which resets the host within {}: {}; not before last heartbeat + grace {} + \
         isolation + watchdog = {}; margin {}",
        Timestamp(decided),
        words(i),
        words(h),
        last_heartbeat,
        quorum_since,
        words(a),
        words(l),
        words(h),
        words(w),
        Timestamp(reset),
        words(ms(grace)),
        Timestamp(floor),
        words(margin),
    );
    Bound { at, terms }
}

/// What the watchdog level decides at one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This host cannot be fenced so: why.
    Refused(String),
    /// Not yet: why.
    Wait(String),
    /// Fenced: the proof, for the event.
    Fenced(String),
}

/// What the controller saw of the cell around a silent host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Look {
    /// The unbroken run of looks that saw its guard's quorum cell's majority heartbeat.
    pub seen: Option<Seen>,
    /// The latest look at that cell.
    pub quorum: Option<Quorum>,
    /// Why the mass-failure brake holds, if it does.
    pub brake: Option<String>,
}

/// The watchdog level at `now` for `host`: its guard's `profile`, its last heartbeat, the
/// controller's grace, and what the controller saw of the cell.
pub fn judge(
    now: Timestamp,
    host: &HostName,
    profile: Option<&FencingProfile>,
    last_heartbeat: Option<Timestamp>,
    grace: Duration,
    look: &Look,
) -> Verdict {
    let (seen, quorum) = (look.seen, look.quorum);
    if let Some(why) = refusal(profile) {
        return Verdict::Refused(why);
    }
    let (Some(p), Some(last)) = (profile, last_heartbeat) else {
        return Verdict::Refused("it never heartbeated".into());
    };
    if let Some(why) = &look.brake {
        return Verdict::Wait(format!("the mass-failure brake holds: {why}"));
    }
    let (Some(seen), Some(q)) = (seen, quorum) else {
        let q = quorum.map_or(String::new(), |q| format!(" ({} of its cell of {} heartbeat)", q.fresh, q.size));
        return Verdict::Wait(format!(
            "no majority of its guard's quorum cell is heard{q}: a guard cut off with a majority of its cell may hold"
        ));
    };
    let b = bound(p, last, grace, seen.since);
    if now.0 < b.at.0 {
        return Verdict::Wait(format!("watchdog fencing of {host} at {} at the earliest", b.at));
    }
    Verdict::Fenced(format!(
        "fenced by its watchdog: silent since {last}, while {} of the {} hosts of its guard's quorum cell have \
         heartbeated at every look since {}; {}; bound {} passed (now {now})",
        q.fresh, q.size, seen.since, b.terms, b.at
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::HostState;

    fn n(s: &str) -> HostName {
        s.parse().expect("name")
    }

    fn profile() -> FencingProfile {
        FencingProfile {
            self_fence: true,
            boot_blocks_ha: true,
            heartbeat_interval_ms: 5_000,
            isolation_timeout_ms: 20_000,
            libvirt_timeout_ms: 15_000,
            watchdog_timeout_ms: Some(60_000),
            quorum_cell: Some(vec![n("b"), n("c")]),
            migration_uri: None,
        }
    }

    fn host(name: &str, heartbeat: Option<i64>) -> Host {
        nodekeeper_store::testing::host(name, HostState::Active, heartbeat)
    }

    #[test]
    fn only_a_guard_that_fences_itself_with_an_armed_watchdog_and_an_exact_quorum_qualifies() {
        assert!(refusal(None).expect("none").contains("never reported"));
        assert_eq!(refusal(Some(&profile())), None);
        type Change = fn(&mut FencingProfile);
        let cases: [(Change, &str); 5] = [
            (|p| p.self_fence = false, "self-fence is off"),
            (|p| p.watchdog_timeout_ms = None, "no armed hardware watchdog"),
            (|p| p.boot_blocks_ha = false, "autostart"),
            (|p| p.quorum_cell = None, "sample"),
            (|p| p.quorum_cell = Some(Vec::new()), "cell of one"),
        ];
        for (change, want) in cases {
            let mut p = profile();
            change(&mut p);
            let why = refusal(Some(&p)).expect(want);
            assert!(why.contains(want), "{why}");
        }
    }

    #[test]
    fn the_quorum_counts_fresh_members_of_the_reported_cell_by_their_own_intervals() {
        let now = Timestamp(100_000);
        let hosts = [host("b", Some(95_000)), host("c", Some(80_000)), host("d", Some(99_000)), host("e", None)];
        let every: HashMap<HostName, Duration> =
            ["b", "c", "d"].iter().map(|h| (n(h), Duration::from_secs(5))).collect();
        // b fresh (5 s ≤ 1.5 × 5 s), c 20 s old; d fresh but not in the cell; e never heard.
        let q = quorum(&[n("b"), n("c"), n("e")], &hosts, &every, now);
        assert_eq!(q, Quorum { fresh: 1, size: 4 });
        assert!(!q.held(), "1 of 4 is no majority");
        let q = quorum(&[n("b"), n("d")], &hosts, &every, now);
        assert!(q.held(), "{q:?}: 2 of 3");
        let none: HashMap<HostName, Duration> = HashMap::new();
        assert_eq!(quorum(&[n("b")], &hosts, &none, now).fresh, 0, "no profile, not counted");
        // c with a long interval of its own is fresh.
        let mut long = every.clone();
        long.insert(n("c"), Duration::from_secs(15));
        assert_eq!(quorum(&[n("b"), n("c")], &hosts, &long, now).fresh, 2);
    }

    #[test]
    fn a_gap_or_a_lost_majority_starts_the_count_again() {
        let gap = Duration::from_secs(5);
        let s = track(None, Timestamp(10_000), true, gap).expect("seen");
        let s = track(Some(s), Timestamp(14_000), true, gap).expect("seen");
        assert_eq!(s, Seen { since: Timestamp(10_000), last: Timestamp(14_000) });
        let after_gap = track(Some(s), Timestamp(30_000), true, gap).expect("seen");
        assert_eq!(after_gap.since, Timestamp(30_000), "a 16 s gap was not watched");
        assert_eq!(track(Some(s), Timestamp(15_000), false, gap), None);
        assert_eq!(track(Some(s), Timestamp(9_000), true, gap).expect("seen").since, Timestamp(9_000), "time ran back");
    }

    #[test]
    fn the_bound_covers_isolation_decision_stop_and_the_watchdog_with_a_margin() {
        let p = profile();
        // Quorum seen from the start: the guard's own clock is what counts.
        let b = bound(&p, Timestamp(0), Duration::from_secs(30), Timestamp(0));
        // decided = 20 + 5 + 2×5 + 2 = 37; reset = 37 + 15 + 5 + 60 = 117; floor = 30 + 20 + 60
        // = 110; margin 11.7 s.
        assert_eq!(b.at, Timestamp(117_000 + 11_700), "{}", b.terms);
        // A quorum seen only later pushes the bound: the guard may have held until then.
        let later = bound(&p, Timestamp(0), Duration::from_secs(30), Timestamp(100_000));
        assert_eq!(later.at, Timestamp(100_000 + 12_000 + 80_000 + 19_200), "{}", later.terms);
        // A long grace is the floor.
        let slow = bound(&p, Timestamp(0), Duration::from_secs(300), Timestamp(0));
        assert_eq!(slow.at, Timestamp(380_000 + 38_000));
        // The margin is at least 5 s.
        let quick = FencingProfile {
            heartbeat_interval_ms: 100,
            isolation_timeout_ms: 300,
            libvirt_timeout_ms: 100,
            watchdog_timeout_ms: Some(1_000),
            ..p
        };
        let b = bound(&quick, Timestamp(0), Duration::from_secs(1), Timestamp(0));
        assert_eq!(b.at, Timestamp(300 + 100 + 200 + 2_000 + 100 + 100 + 1_000 + 5_000));
    }

    #[test]
    fn judge_waits_for_quorum_brake_and_bound_then_gives_the_proof() {
        let (a, p, grace) = (n("a"), profile(), Duration::from_secs(30));
        let quorum = Some(Quorum { fresh: 2, size: 3 });
        let seen = Some(Seen { since: Timestamp(31_000), last: Timestamp(200_000) });
        let look = Look { seen, quorum, brake: None };
        let last = Some(Timestamp(0));
        let at = bound(&p, Timestamp(0), grace, Timestamp(31_000)).at;
        let before = Timestamp(at.0 - 1);
        let wait = |v: Verdict, want: &str| matches!(v, Verdict::Wait(w) if w.contains(want));
        assert!(wait(judge(before, &a, Some(&p), last, grace, &look), "at the earliest"));
        match judge(at, &a, Some(&p), last, grace, &look) {
            Verdict::Fenced(proof) => {
                assert!(proof.contains("2 of the 3 hosts") && proof.contains("watchdog"), "{proof}")
            }
            other => panic!("{other:?}"),
        }
        let far = Timestamp(at.0 + 1_000_000);
        let lost = Look { seen: None, ..look.clone() };
        assert!(wait(judge(far, &a, Some(&p), last, grace, &lost), "no majority"));
        let braked = Look { brake: Some("3 of 4 silent".into()), ..look.clone() };
        assert!(wait(judge(far, &a, Some(&p), last, grace, &braked), "brake"));
        assert!(matches!(judge(far, &a, None, last, grace, &look), Verdict::Refused(_)));
        assert!(matches!(judge(far, &a, Some(&p), None, grace, &look), Verdict::Refused(_)));
    }
}
