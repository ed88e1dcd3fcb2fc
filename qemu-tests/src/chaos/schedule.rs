//! A run's faults, drawn from its seed: the same seed gives the same schedule (what replays a
//! failing run; the processes' own timing is not replayed, only what is done to them and when).

use std::fmt;
use std::time::Duration;

/// SplitMix64: small, seedable, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A duration in whole milliseconds within `lo..=hi`.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_millis(self.range(lo.as_millis() as u64, hi.as_millis() as u64))
    }
}

/// How a BMC misbehaves while its fault lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcFault {
    /// Accepts the connection and never answers.
    Hang,
    /// Answers every request with a 500.
    Fail,
    /// Accepts a power-off, but the power goes off (and the state says so) only this much later.
    Late(Duration),
}

/// One thing done to the fleet. `host` is a host's index (`h{host}`); `down` and `lasts` how
/// long the fault holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are named by the enum's doc
pub enum Fault {
    /// SIGKILL of a host's guard; its supervisor starts it again after `down`.
    KillGuard { host: usize, down: Duration },
    /// SIGKILL of a `serve` replica, started again after `down`.
    KillServe { replica: usize, down: Duration },
    /// SIGKILL of a host's libvirtd (the test driver's domains die with it); its supervisor
    /// starts it again, or the guard asks for it.
    KillLibvirtd { host: usize },
    /// PostgreSQL stopped (immediate: as a crash) and started after `down`.
    StopPostgres { down: Duration },
    /// A host cut from the database, its peers and the provisioner: its link down for `down`.
    Cut { host: usize, down: Duration },
    /// A host's BMC misbehaves for `lasts`.
    Bmc { host: usize, fault: BmcFault, lasts: Duration },
    /// A host's wall clock jumps by `by` seconds (the guard's, by libfaketime) for `lasts`.
    ClockJump { host: usize, by: i64, lasts: Duration },
}

impl Fault {
    /// The kind, for the campaign's table.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillGuard { .. } => "guard SIGKILL",
            Fault::KillServe { .. } => "serve SIGKILL",
            Fault::KillLibvirtd { .. } => "libvirtd SIGKILL",
            Fault::StopPostgres { .. } => "PostgreSQL stopped",
            Fault::Cut { .. } => "host cut off",
            Fault::Bmc { fault: BmcFault::Hang, .. } => "BMC hangs",
            Fault::Bmc { fault: BmcFault::Fail, .. } => "BMC fails",
            Fault::Bmc { fault: BmcFault::Late(_), .. } => "BMC confirms late",
            Fault::ClockJump { .. } => "clock jump",
        }
    }

    /// Every kind, in the table's order.
    pub const KINDS: [&'static str; 9] = [
        "guard SIGKILL",
        "serve SIGKILL",
        "libvirtd SIGKILL",
        "PostgreSQL stopped",
        "host cut off",
        "BMC hangs",
        "BMC fails",
        "BMC confirms late",
        "clock jump",
    ];
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillGuard { host, down } => write!(f, "SIGKILL guard of h{host}, down {}", secs(*down)),
            Fault::KillServe { replica, down } => write!(f, "SIGKILL serve replica {replica}, down {}", secs(*down)),
            Fault::KillLibvirtd { host } => write!(f, "SIGKILL libvirtd of h{host}"),
            Fault::StopPostgres { down } => write!(f, "PostgreSQL stopped for {}", secs(*down)),
            Fault::Cut { host, down } => write!(f, "h{host} cut off for {}", secs(*down)),
            Fault::Bmc { host, fault, lasts } => match fault {
                BmcFault::Hang => write!(f, "BMC of h{host} hangs for {}", secs(*lasts)),
                BmcFault::Fail => write!(f, "BMC of h{host} fails for {}", secs(*lasts)),
                BmcFault::Late(by) => {
                    write!(f, "BMC of h{host} powers off {} late, for {}", secs(*by), secs(*lasts))
                }
            },
            Fault::ClockJump { host, by, lasts } => write!(f, "clock of h{host} jumps {by:+} s for {}", secs(*lasts)),
        }
    }
}

/// A run's schedule: faults at offsets from the start of its fault window.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The run's seed.
    pub seed: u64,
    /// (offset, fault), by offset.
    pub faults: Vec<(Duration, Fault)>,
}

impl Schedule {
    /// The schedule for `seed`: 3 to 6 faults within `window`, on `hosts` hosts and `replicas`
    /// replicas of `serve`.
    pub fn draw(seed: u64, hosts: usize, replicas: usize, window: Duration) -> Schedule {
        let mut r = Rng::new(seed);
        let count = r.range(3, 6);
        let s = Duration::from_secs;
        let mut faults: Vec<(Duration, Fault)> = (0..count)
            .map(|_| {
                let at = r.duration(s(1), window);
                let host = r.below(hosts);
                let fault = match r.below(9) {
                    0 => Fault::KillGuard { host, down: r.duration(s(1), s(15)) },
                    1 => Fault::KillServe { replica: r.below(replicas), down: r.duration(s(1), s(12)) },
                    2 => Fault::KillLibvirtd { host },
                    3 => Fault::StopPostgres { down: r.duration(s(1), s(10)) },
                    4 | 5 => Fault::Cut { host, down: r.duration(s(2), s(15)) },
                    6 => {
                        let fault = match r.below(3) {
                            0 => BmcFault::Hang,
                            1 => BmcFault::Fail,
                            _ => BmcFault::Late(r.duration(s(1), s(8))),
                        };
                        Fault::Bmc { host, fault, lasts: r.duration(s(5), s(25)) }
                    }
                    _ => {
                        let by = if r.below(2) == 0 { -1 } else { 1 } * r.range(30, 3600) as i64;
                        Fault::ClockJump { host, by, lasts: r.duration(s(2), s(20)) }
                    }
                };
                (at, fault)
            })
            .collect();
        faults.sort_by_key(|(at, _)| *at);
        Schedule { seed, faults }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schedule of seed {}:", self.seed)?;
        for (at, fault) in &self.faults {
            writeln!(f, "  +{:>5.1} s  {fault}", at.as_secs_f64())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_and_seeds_differ() {
        let w = Duration::from_secs(20);
        let a = Schedule::draw(42, 3, 2, w);
        assert_eq!(a.faults, Schedule::draw(42, 3, 2, w).faults);
        assert_ne!(a.faults, Schedule::draw(43, 3, 2, w).faults);
        assert!((3..=6).contains(&a.faults.len()));
        assert!(a.faults.windows(2).all(|p| p[0].0 <= p[1].0), "by time");
    }

    #[test]
    fn schedules_stay_within_the_fleet_and_window_and_cover_every_kind() {
        let w = Duration::from_secs(20);
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..300 {
            for (at, f) in Schedule::draw(seed, 3, 2, w).faults {
                assert!(at >= Duration::from_secs(1) && at <= w, "{at:?}");
                match f {
                    Fault::KillGuard { host, .. }
                    | Fault::KillLibvirtd { host }
                    | Fault::Cut { host, .. }
                    | Fault::Bmc { host, .. }
                    | Fault::ClockJump { host, .. } => assert!(host < 3),
                    Fault::KillServe { replica, .. } => assert!(replica < 2),
                    Fault::StopPostgres { .. } => {}
                }
                kinds.insert(f.kind());
            }
        }
        assert_eq!(kinds.len(), Fault::KINDS.len(), "{kinds:?}");
        assert!(kinds.iter().all(|k| Fault::KINDS.contains(k)));
    }
}
