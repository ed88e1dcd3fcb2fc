//! The fleet simulator in `make test`, small (`make bench` runs it at 1,000 and 10,000 hosts):
//! 60 simulated guards on the real guard API of a real `serve` (SQLite, grace 12 s), two of them crash,
//! then 60 % of the rest are cut off at once. The crashed hosts' HA instances must move, no
//! host that talks may be powered off (the brake must hold through the partition, and while it
//! heals), no instance may be left without an owner.

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
        crash: 2,
        partition: 0.6,
        // Twice the heartbeat interval and more: a partition's hosts (drawn across the fleet,
        // their heartbeats spread over 5 s) are all past half the grace when the first is past it.
        grace: Duration::from_secs(12),
        bmc_delay: Duration::from_secs(1),
        seed: 7,
        bin_dir: paths.bin_dir,
    };
    let report = simulate(&opts, &Narrator::new(false)).await.unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{}", report.table());
    assert_eq!(report.violations, [0, 0, 0], "false fences, HA not moved in time, ownerless:\n{}", report.table());
    let row = |k: &str| report.rows.iter().find(|(r, _)| r.starts_with(k)).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(row("crashed hosts (HA moved)"), "2 (2)");
    assert!(row("partition: hosts cut").starts_with("35 ("), "{}", row("partition: hosts cut"));
    assert_eq!(row("guard API errors"), "0");
}
