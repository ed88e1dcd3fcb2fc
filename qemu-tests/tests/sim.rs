//! The fleet simulator in `make test`, small (`make bench` runs it at 1,000 and 10,000 hosts):
//! 60 simulated guards on the real guard API of a real `serve` (SQLite, grace 12 s), three of them
//! crash — one with a BMC that hangs — and `serve` is SIGKILLed while their fences run (started
//! again 2 s later); then 60 % of the rest are cut off at once. The HA instances of the two
//! crashed hosts whose BMCs answer must move; the third's must stay (no confirmed fence, nothing
//! moves); no host that talks may be powered off (the brake must hold through the partition,
//! and while it heals); no instance may be left without an owner, nor seen running on two hosts.

use std::time::Duration;

use nodekeeper_lab::lab::Paths;
use nodekeeper_lab::sim::{simulate, Engine, Options};
use nodekeeper_lab::Narrator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_recovers_its_crashed_hosts_and_the_brake_holds_a_partition() {
    let paths = Paths::discover().expect("paths");
    if !paths.bin_dir.join("nodekeeper-provisioner").exists() {
        assert!(std::env::var("NODEKEEPER_REQUIRE_NETNS").as_deref() != Ok("1"), "no nodekeeper-provisioner built");
        eprintln!("skipped: no nodekeeper-provisioner in {}", paths.bin_dir.display());
        return;
    }
    let opts = Options {
        hosts: 60,
        instances: 3,
        engine: Engine::Sqlite,
        steady: Duration::from_secs(5),
        crash: 3,
        partition: 0.6,
        // Twice the heartbeat interval and more: a partition's hosts (drawn across the fleet,
        // their heartbeats spread over 5 s) are all past half the grace when the first is past it.
        grace: Duration::from_secs(12),
        bmc_delay: Duration::from_secs(1),
        seed: 7,
        bmc_hang: 1,
        kill_serve: true,
        restart_db: false,
        replicas: 1,
        bin_dir: paths.bin_dir,
    };
    let report = simulate(&opts, &Narrator::new(false)).await.unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{}", report.table());
    assert_eq!(
        report.violations,
        [0; 4],
        "false fences, HA not moved in time, ownerless, on two hosts:\n{}",
        report.table()
    );
    let row = |k: &str| report.rows.iter().find(|(r, _)| r.starts_with(k)).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(row("crashed hosts (HA moved)"), "3 (2)");
    assert_eq!(row("crashed hosts with a hanging BMC (suspect, HA instances kept)"), "1 (1)");
    assert!(row("partition: hosts cut").starts_with("34 ("), "{}", row("partition: hosts cut"));
    let samples: u64 = row("samples of what runs where").split(':').next().unwrap_or("0").parse().unwrap_or(0);
    assert!(samples > 100, "the checker sampled {samples} times");
}
