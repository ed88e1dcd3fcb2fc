//! `nodekeeper-lab`: runs a scenario of the QEMU lab, narrated, ending in a summary table.
//!
//! - `nodekeeper-lab demo`: the `failover` scenario with a progress line during the waits.
//! - `nodekeeper-lab run failover|db-down-at-boot|provisioner-outage`
//! - `nodekeeper-lab up [--nodes N]`: a lab with N installed nodes, kept until Ctrl-C.

use clap::{Parser, ValueEnum};

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
    },
    /// A lab with installed nodes, left running until Ctrl-C (then torn down).
    Up {
        /// How many compute nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
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
    let (scenario, progress) = match cli {
        Cli::Demo => (Scenario::Failover, true),
        Cli::Run { scenario } => (scenario, false),
        Cli::Up { nodes } => return up(paths, nodes).await,
    };
    let n = nodekeeper_lab::Narrator::new(progress);
    let result = match scenario {
        Scenario::Failover => nodekeeper_lab::scenarios::failover(paths, &n).await,
        Scenario::DbDownAtBoot => nodekeeper_lab::scenarios::db_down_at_boot(paths, &n).await,
        Scenario::ProvisionerOutage => nodekeeper_lab::scenarios::provisioner_outage(paths, &n).await,
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

/// `up`: installs the nodes, says where everything is, waits for Ctrl-C.
async fn up(paths: nodekeeper_lab::lab::Paths, nodes: usize) -> std::process::ExitCode {
    let n = nodekeeper_lab::Narrator::new(true);
    let lab = async {
        let lab = nodekeeper_lab::lab::Lab::up(paths, nodes, &n).await?;
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
    let _ = tokio::signal::ctrl_c().await;
    n.say("tearing the lab down");
    drop(lab);
    std::process::ExitCode::SUCCESS
}
