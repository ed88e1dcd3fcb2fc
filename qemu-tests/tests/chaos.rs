//! A short chaos campaign in `make test` (`nodekeeper-lab chaos` runs long ones): three seeded
//! runs against real processes — two `serve` replicas on a private PostgreSQL, three hosts each
//! with its own libvirtd and guard, BMCs over their power — with the checker sampling what each
//! libvirt and each host really runs every 200 ms. Needs root, libvirtd, PostgreSQL's binaries,
//! libfaketime and the `nkchaos` user (`scripts/setup-test-deps.sh`); skipped without them
//! unless NODEKEEPER_REQUIRE_NETNS=1. NODEKEEPER_CHAOS_SEED and NODEKEEPER_CHAOS_RUNS change
//! the seed (default 1000) and the number of runs (default 3).

use std::time::Duration;

use nodekeeper_lab::chaos::{campaign, missing, Options};
use nodekeeper_lab::lab::Paths;
use nodekeeper_lab::Narrator;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_campaign_never_runs_an_instance_twice_nor_loses_one() {
    let paths = Paths::discover().expect("paths");
    let lacking = missing(&paths.bin_dir);
    if !lacking.is_empty() {
        assert!(std::env::var("NODEKEEPER_REQUIRE_NETNS").as_deref() != Ok("1"), "chaos needs: {lacking:?}");
        eprintln!("skipped: chaos needs {lacking:?}");
        return;
    }
    let opts = Options {
        runs: env_or("NODEKEEPER_CHAOS_RUNS", 3),
        seed: env_or("NODEKEEPER_CHAOS_SEED", 1000),
        hosts: 3,
        window: Duration::from_secs(20),
        bin_dir: paths.bin_dir,
        keep: false,
    };
    let report = campaign(&opts, &Narrator::new(false)).await.unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{}", report.table());
    assert_eq!(report.runs.len(), opts.runs as usize);
    for r in &report.runs {
        assert!(r.problems.is_empty(), "seed {}: {:#?}\n{}", r.schedule.seed, r.problems, r.schedule);
        // Sampled throughout: 22 s of faults and healing at a sample every 200 ms plus the
        // sample's own time (4 to 5 a second here).
        assert!(r.findings.samples >= 70, "seed {}: {} samples", r.schedule.seed, r.findings.samples);
        assert!(!r.schedule.faults.is_empty());
    }
    assert!(report.runs.iter().any(|r| r.findings.not_running > 0), "the faults cost something: they landed");
}
