//! `nodekeeper-guard`: parses the command line and runs the command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodekeeper_guard::boot::{self, Report};
use nodekeeper_guard::config::Config;

/// Exit status when the configuration itself is unusable (the only failure of `boot`).
const EXIT_CONFIG: u8 = 2;

/// nodekeeper's host agent.
#[derive(Debug, Parser)]
#[command(name = "nodekeeper-guard", version, about)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Before libvirtd starts: quarantine definitions of instances recovered elsewhere.
    Boot {
        /// The guard's config file.
        #[arg(long, default_value = "/etc/nodekeeper/guard.toml")]
        config: PathBuf,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Run the pass for after libvirtd has started: ask libvirt itself, and undefine (or,
        /// when recovered elsewhere, destroy) the stale domains that escaped the file pass.
        #[arg(long)]
        post_libvirt: bool,
    },
    /// The service: heartbeat, converge on the database, watch libvirtd, self-fence when cut
    /// off (systemd `Type=notify` with `WatchdogSec=`).
    Watch {
        /// The guard's config file.
        #[arg(long, default_value = "/etc/nodekeeper/guard.toml")]
        config: PathBuf,
    },
    /// Restart libvirtd and the guard, and print what happened as one JSON line (what the
    /// provisioner's SSH key runs on a suspect host before it power-cycles it; exit 1 when a
    /// step failed).
    Repair {
        /// The guard's config file.
        #[arg(long, default_value = "/etc/nodekeeper/guard.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let (config, json, post_libvirt, watch, repair) = match cli.command {
        Command::Boot { config, json, post_libvirt } => (config, json, post_libvirt, false, false),
        Command::Watch { config } => (config, false, false, true, false),
        Command::Repair { config } => (config, true, false, false, true),
    };
    let config = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if watch {
        let counters = rt.block_on(nodekeeper_guard::watch::run(config, async {
            use tokio::signal::unix::{signal, SignalKind};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
        }));
        tracing::info!(?counters, "watch stopped");
        return ExitCode::SUCCESS;
    }
    if repair {
        let report = rt.block_on(nodekeeper_guard::repair::repair(&config));
        print_json(&report);
        return if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    if post_libvirt {
        return match rt.block_on(boot::live::run(&config)) {
            Ok(report) => {
                print_live_report(&report, json);
                ExitCode::SUCCESS
            }
            Err(e) => {
                // libvirtd unreachable: nothing was touched; the host may go on.
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(boot::run(&config)) {
        Ok(report) => {
            print_report(&report, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::new(e));
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// One JSON object on stdout (the `--json` contract).
fn print_json<T: serde::Serialize>(report: &T) {
    match serde_json::to_string(report) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: encoding the report: {e}"),
    }
}

fn print_report(r: &Report, json: bool) {
    if json {
        return print_json(r);
    }
    println!(
        "guard boot on {}: database {}; {} kept, {} quarantined, {} unknown, {} blocked, {} restored, {} errors ({} ms)",
        r.host,
        serde_json::to_value(r.database).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        r.kept.len(),
        r.quarantined.len(),
        r.unknown.len(),
        r.blocked.len(),
        r.restored.len(),
        r.errors.len(),
        r.elapsed_ms
    );
    if let Some(e) = &r.database_error {
        println!("  database: {e}");
    }
    // The full lists are in --json; a console gets the first few of each.
    const SHOWN: usize = 10;
    for (label, ids) in [("quarantined", &r.quarantined), ("blocked", &r.blocked), ("restored", &r.restored)] {
        for id in ids.iter().take(SHOWN) {
            println!("  {label}: {id}");
        }
        if ids.len() > SHOWN {
            println!("  {label}: ... and {} more (see --json)", ids.len() - SHOWN);
        }
    }
    for e in &r.errors {
        println!("  error: {}: {}", e.path.display(), e.reason);
    }
}

fn print_live_report(r: &boot::live::LiveReport, json: bool) {
    if json {
        return print_json(r);
    }
    println!(
        "guard post-libvirt on {}: {} kept, {} destroyed, {} undefined, {} unknown, {} left running, {} errors",
        r.host,
        r.kept.len(),
        r.destroyed.len(),
        r.undefined.len(),
        r.unknown.len(),
        r.left_running.len(),
        r.errors.len()
    );
    for l in &r.left_running {
        println!("  left running: {}: {}", l.uuid, l.reason);
    }
    for e in &r.errors {
        println!("  error: {}: {}", e.path.display(), e.reason);
    }
}

fn init_logging(verbose: u8) {
    let default = ["warn", "info", "debug"][usize::from(verbose.min(2))];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}
