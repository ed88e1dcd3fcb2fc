//! `nodekeeper-deploy`: PID 1's helper in the deploy ramdisk. Reads its parameters from the
//! kernel command line, writes and verifies the image, and reports. Then it exits and the
//! ramdisk's init powers the machine off: the provisioner sets the BMC to boot the disk and
//! powers it on (the reimage's `local_boot`), so the new system is booted by the firmware
//! from its disk, not through a network boot that hands back. `--cmdline FILE` is for tests.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmdline_path = args
        .iter()
        .position(|a| a == "--cmdline")
        .and_then(|i| args.get(i + 1))
        .map_or("/proc/cmdline", String::as_str);
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
    if ok {
        println!("nodekeeper-deploy: done; powering off: the provisioner boots the new system from its disk");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
