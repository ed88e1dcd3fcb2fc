//! The lab's scenarios as tests (`make lab-test`): minutes each under TCG, so they are
//! ignored by the plain test run. CI runs the PXE install of one node and the guard-boot part
//! of the failover in `provisioner/tests/reimage_qemu.rs` instead.

use nodekeeper_lab::hw::Hardware;
use nodekeeper_lab::lab::Paths;
use nodekeeper_lab::scenarios::{self, Summary};
use nodekeeper_lab::Narrator;

async fn run(scenario: impl AsyncFnOnce(Paths, &[Hardware], &Narrator) -> anyhow::Result<Summary>) -> Summary {
    let n = Narrator::new(false);
    let fleet = [Hardware::virtio_bios()];
    let summary = scenario(Paths::discover().expect("paths"), &fleet, &n).await.unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{}", summary.table());
    assert_eq!(summary.double_runs, 0, "an instance ran on two nodes");
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the QEMU lab: two TCG nodes, ~15 min; make lab-test"]
async fn failover() {
    let summary = run(scenarios::failover).await;
    assert!(summary.samples > 100, "sampled throughout: {}", summary.samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the QEMU lab: one TCG node, ~10 min; make lab-test"]
async fn db_down_at_boot() {
    run(scenarios::db_down_at_boot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the QEMU lab: two TCG nodes, ~20 min; make lab-test"]
async fn provisioner_outage() {
    let summary = run(scenarios::provisioner_outage).await;
    assert!(summary.samples > 400, "sampled throughout: {}", summary.samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the QEMU lab: two TCG nodes, ~15 min; make lab-test"]
async fn power_loss() {
    let summary = run(scenarios::power_loss).await;
    // Each loss: fenced on the BMC's Off, not after the 30 s grace, and recovered within a
    // bound far below grace + fence + converge (what it was before the early probe).
    for (phase, took) in summary.phases.iter().filter(|(p, _)| p.contains("power loss of")) {
        assert!(took.as_secs() < 40, "{phase}: {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the QEMU lab: two TCG nodes, ~15 min; make lab-test"]
async fn drain() {
    let summary = run(scenarios::drain).await;
    assert!(summary.phases.iter().any(|(p, _)| p.starts_with("host drain node-a")), "{:?}", summary.phases);
}
