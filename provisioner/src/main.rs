//! `nodekeeper-provisioner`: parses the command line and runs the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nodekeeper_provisioner::cli::Cli::parse();
    nodekeeper_provisioner::logging::init(cli.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nodekeeper_provisioner::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
