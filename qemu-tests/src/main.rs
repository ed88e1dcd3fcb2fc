//! `nodekeeper-lab`: runs a scenario of the QEMU lab, narrated, ending in a summary table.
//!
//! - `nodekeeper-lab demo`: the `failover` scenario on a mixed fleet (node-a a UEFI server with
//!   an e1000e NIC and two disks, node-b BIOS with virtio), with a progress line during waits.
//! - `nodekeeper-lab run failover|db-down-at-boot|provisioner-outage [HARDWARE]`
//! - `nodekeeper-lab up [--nodes N] [HARDWARE]`: a lab with N installed nodes, kept until Ctrl-C.
//!
//! HARDWARE, for every node: `--firmware bios|uefi|uefi-secureboot`, `--nic virtio|e1000e|igb`,
//! `--disks nvme:2G,sata:3G` (several: the last is the target, named by a root-device hint);
//! or `--mixed` for the demo's fleet.

use clap::{Parser, ValueEnum};
use nodekeeper_lab::hw::Hardware;

#[derive(Debug, Parser)]
#[command(
    name = "nodekeeper-lab",
    about = "nodekeeper's QEMU lab: compute nodes installed by the provisioner, failures, recovery"
)]
enum Cli {
    /// The failover scenario, narrated for a person watching.
    Demo,
    /// One scenario.
    Run {
        /// Which.
        scenario: Scenario,
        #[command(flatten)]
        hw: HwArgs,
    },
    /// A chaos campaign: real processes (two `serve` replicas on PostgreSQL, three hosts
    /// each with its libvirtd and guard, BMCs), a seeded fault schedule per run, and a
    /// checker sampling what each libvirt really runs every 200 ms.
    Chaos {
        /// How many runs.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Run k's seed is SEED + k; a failing run names its own (replay it with --runs 1).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Hosts per run.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Keep the logs even when every run passed.
        #[arg(long)]
        keep: bool,
    },
    /// A fleet simulator: N simulated guards on the real guard API of a real `serve`, BMCs
    /// with a delay; measures heartbeat latency, serve's CPU and memory, and crash → HA moved.
    Sim {
        /// Simulated hosts.
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        /// Instances per host (a third HA).
        #[arg(long, default_value_t = 10)]
        instances: usize,
        /// sqlite or postgres (a private cluster).
        #[arg(long, default_value = "sqlite")]
        engine: String,
        /// Seconds of steady state measured.
        #[arg(long, default_value_t = 30)]
        steady: u64,
        /// Hosts that crash at once after the steady phase.
        #[arg(long, default_value_t = 10)]
        crash: usize,
        /// The share of the fleet then cut off at once (the brake must hold); 0: none.
        #[arg(long, default_value_t = 0.6)]
        partition: f64,
        /// The controller's grace, seconds.
        #[arg(long, default_value_t = 30)]
        grace: u64,
        /// Seconds a BMC takes to land a power change.
        #[arg(long, default_value_t = 1)]
        bmc_delay: u64,
        /// Which hosts crash.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many of the crashed hosts have a BMC that hangs (their instances must stay).
        #[arg(long, default_value_t = 0)]
        bmc_hang: usize,
        /// SIGKILL serve while the crash's fences run, and start it again 2 s later.
        #[arg(long)]
        kill_serve: bool,
        /// Stop PostgreSQL (immediate) while the crash's fences run, start it 3 s later.
        #[arg(long)]
        restart_db: bool,
        /// serve replicas on the one database (more than one: PostgreSQL); --kill-serve
        /// kills the leader.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// A lab with installed nodes, left running until Ctrl-C (then torn down).
    Up {
        /// How many compute nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[command(flatten)]
        hw: HwArgs,
    },
}

/// The nodes' hardware.
#[derive(Debug, clap::Args)]
struct HwArgs {
    /// bios, uefi or uefi-secureboot (OVMF with Microsoft's keys).
    #[arg(long, default_value = "bios")]
    firmware: String,
    /// The NIC model: virtio, e1000e, igb.
    #[arg(long, default_value = "virtio")]
    nic: String,
    /// Disks as BUS:SIZE, comma-separated (virtio, sata, nvme; 2G..64G).
    #[arg(long, default_value = "virtio:3G")]
    disks: String,
    /// How the firmware reaches the deploy ramdisk: pxe, or http (UEFI HTTP boot; the
    /// firmware's PXE is off and no TFTP server runs).
    #[arg(long, default_value = "pxe")]
    boot: nodekeeper_lab::hw::BootPath,
    /// The demo's mixed fleet instead: node-a UEFI, e1000e, SATA 2G + NVMe 3G (the target, by
    /// hint); node-b BIOS, virtio.
    #[arg(long)]
    mixed: bool,
}

impl HwArgs {
    fn fleet(&self) -> anyhow::Result<Vec<Hardware>> {
        if self.mixed {
            return Ok(mixed());
        }
        let hw = Hardware {
            firmware: self.firmware.parse()?,
            nic: self.nic.clone(),
            disks: nodekeeper_lab::hw::parse_disks(&self.disks)?,
            boot: self.boot,
        };
        hw.check()?;
        Ok(vec![hw])
    }
}

/// node-a: a UEFI server (e1000e, a SATA disk and the NVMe disk the hint names); node-b: BIOS
/// with virtio.
fn mixed() -> Vec<Hardware> {
    let server = Hardware {
        firmware: nodekeeper_lab::hw::Firmware::Uefi,
        nic: "e1000e".into(),
        disks: nodekeeper_lab::hw::parse_disks("sata:2G,nvme:3G").unwrap_or_default(),
        boot: nodekeeper_lab::hw::BootPath::Pxe,
    };
    vec![server, Hardware::virtio_bios()]
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Scenario {
    /// node-a is cut off; fenced; its HA instances recovered on node-b; node-a back, stale
    /// definitions quarantined.
    Failover,
    /// node-a reboots while the database is unreachable.
    DbDownAtBoot,
    /// The provisioner stops for 5 minutes: nothing stops, nothing is fenced; then node-a is
    /// cut off and self-fences, and node-b gets its HA instances.
    ProvisionerOutage,
    /// The HA instances' node loses power (its BMC says Off), three times, back and forth:
    /// fenced without waiting the grace.
    PowerLoss,
    /// The HA instances' node is drained for planned work (its guard stops them, they move once
    /// stopped, it ends in maintenance), then loses power: nothing is fenced.
    Drain,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let paths = match nodekeeper_lab::lab::Paths::discover() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nodekeeper-lab: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Cli::Chaos { runs, seed, hosts, keep } = cli {
        return chaos(paths, runs, seed, hosts, keep).await;
    }
    if let Cli::Sim {
        hosts,
        instances,
        engine,
        steady,
        crash,
        partition,
        grace,
        bmc_delay,
        seed,
        bmc_hang,
        kill_serve,
        restart_db,
        replicas,
    } = cli
    {
        let engine = match engine.as_str() {
            "sqlite" => nodekeeper_lab::sim::Engine::Sqlite,
            "postgres" | "postgresql" => nodekeeper_lab::sim::Engine::Postgres,
            other => {
                eprintln!("nodekeeper-lab: --engine {other:?}: sqlite or postgres");
                return std::process::ExitCode::from(2);
            }
        };
        let s = std::time::Duration::from_secs;
        let opts = nodekeeper_lab::sim::Options {
            hosts: hosts.max(2),
            instances,
            engine,
            steady: s(steady),
            crash,
            partition,
            grace: s(grace),
            bmc_delay: s(bmc_delay),
            seed,
            bmc_hang,
            kill_serve,
            restart_db,
            replicas,
            bin_dir: paths.bin_dir,
        };
        let n = nodekeeper_lab::Narrator::new(false);
        let result = tokio::select! {
            r = nodekeeper_lab::sim::simulate(&opts, &n) => r,
            signal = interrupted() => Err(anyhow::anyhow!("stopped by {signal}")),
        };
        return finish(&n, result.map(|r| (r.table(), r.violations == [0; 4])));
    }
    let fleet = match &cli {
        Cli::Demo => Ok(mixed()),
        Cli::Chaos { .. } | Cli::Sim { .. } => unreachable!("handled above"),
        Cli::Run { hw, .. } | Cli::Up { hw, .. } => hw.fleet(),
    };
    let fleet = match fleet {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nodekeeper-lab: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let (scenario, progress) = match cli {
        Cli::Demo => (Scenario::Failover, true),
        Cli::Run { scenario, .. } => (scenario, false),
        Cli::Chaos { .. } | Cli::Sim { .. } => unreachable!("handled above"),
        Cli::Up { nodes, .. } => {
            let fleet: Vec<Hardware> = (0..nodes).map(|i| fleet[i.min(fleet.len() - 1)].clone()).collect();
            return up(paths, &fleet).await;
        }
    };
    let n = nodekeeper_lab::Narrator::new(progress);
    let run = async {
        match scenario {
            Scenario::Failover => nodekeeper_lab::scenarios::failover(paths, &fleet, &n).await,
            Scenario::DbDownAtBoot => nodekeeper_lab::scenarios::db_down_at_boot(paths, &fleet, &n).await,
            Scenario::ProvisionerOutage => nodekeeper_lab::scenarios::provisioner_outage(paths, &fleet, &n).await,
            Scenario::PowerLoss => nodekeeper_lab::scenarios::power_loss(paths, &fleet, &n).await,
            Scenario::Drain => nodekeeper_lab::scenarios::drain(paths, &fleet, &n).await,
        }
    };
    // SIGTERM or Ctrl-C ends the scenario; dropping it tears the lab down (domains, serve,
    // the BMC emulator, the namespace), as the end of a run does.
    let result = tokio::select! {
        r = run => r,
        signal = interrupted() => Err(anyhow::anyhow!("stopped by {signal}")),
    };
    match result {
        Ok(summary) => {
            n.say(&format!("done in {}", nodekeeper_lab::fmt(n.elapsed())));
            println!("\n{}", summary.table());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            n.say(&format!("FAILED: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The first of SIGTERM and SIGINT.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => std::future::pending().await,
    }
}

/// `up`: installs the nodes, says where everything is, waits for Ctrl-C.
async fn up(paths: nodekeeper_lab::lab::Paths, fleet: &[Hardware]) -> std::process::ExitCode {
    let n = nodekeeper_lab::Narrator::new(true);
    let lab = async {
        let lab = nodekeeper_lab::lab::Lab::up(paths, fleet, &n).await?;
        lab.install(&n).await?;
        anyhow::Ok(lab)
    }
    .await;
    let lab = match lab {
        Ok(lab) => lab,
        Err(e) => {
            n.say(&format!("FAILED: {e:#}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    n.say(&format!(
        "the lab is up: NODEKEEPER_DATABASE_URL={} nodekeeper-provisioner host list; consoles and logs in {}; \
         Ctrl-C tears it down",
        lab.db_url,
        lab.dir.display()
    ));
    let signal = interrupted().await;
    n.say(&format!("{signal}: tearing the lab down"));
    drop(lab);
    std::process::ExitCode::SUCCESS
}

/// `chaos`: the campaign, its table on stdout; fails when a run failed.
async fn chaos(
    paths: nodekeeper_lab::lab::Paths,
    runs: u32,
    seed: u64,
    hosts: usize,
    keep: bool,
) -> std::process::ExitCode {
    let n = nodekeeper_lab::Narrator::new(false);
    let opts = nodekeeper_lab::chaos::Options {
        runs,
        seed,
        hosts: hosts.max(2),
        window: std::time::Duration::from_secs(20),
        bin_dir: paths.bin_dir,
        keep,
    };
    let result = tokio::select! {
        r = nodekeeper_lab::chaos::campaign(&opts, &n) => r,
        signal = interrupted() => Err(anyhow::anyhow!("stopped by {signal}")),
    };
    finish(
        &n,
        result.map(|report| {
            let kept = report.kept.as_ref().map(|d| format!("logs: {}\n", d.display())).unwrap_or_default();
            (format!("{}{kept}", report.table()), report.passed())
        }),
    )
}

/// The end of `chaos` and `sim`: the table on stdout, success only when `ok`.
fn finish(n: &nodekeeper_lab::Narrator, result: anyhow::Result<(String, bool)>) -> std::process::ExitCode {
    match result {
        Ok((table, ok)) => {
            println!("\n{table}");
            if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            n.say(&format!("FAILED: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
