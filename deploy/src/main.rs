//! `nodekeeper-deploy`: PID 1's helper in the deploy ramdisk. Reads its parameters from the
//! kernel command line, writes and verifies the image, reports, and reboots into the new
//! system only when the image verified. `--cmdline FILE` and `--no-reboot` are for tests.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmdline_path = args
        .iter()
        .position(|a| a == "--cmdline")
        .and_then(|i| args.get(i + 1))
        .map_or("/proc/cmdline", String::as_str);
    let reboot = !args.iter().any(|a| a == "--no-reboot");
    let text = match std::fs::read_to_string(cmdline_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nodekeeper-deploy: reading {cmdline_path}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut params = match nodekeeper_deploy::Params::from_cmdline(&text) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nodekeeper-deploy: {e}");
            return ExitCode::from(2);
        }
    };
    let ok = nodekeeper_deploy::deploy(&mut params, &mut |line| println!("nodekeeper-deploy: {line}"));
    if ok && reboot {
        println!("nodekeeper-deploy: rebooting into the new system");
        let _ = std::process::Command::new("/bin/busybox").args(["reboot", "-f"]).status();
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
