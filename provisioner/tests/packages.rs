//! `make deb` (scripts/make-deb.sh) with the binaries of this build: both packages install on
//! this machine with `dpkg -i`, the installed binaries run — the provisioner as its system
//! user, under the installed config with only its addresses changed, answering `/healthz` —
//! the units pass `systemd-analyze verify`, and `dpkg --purge` takes everything but the
//! fleet's state away again. Runs as root only (it changes the machine), one run at a time.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{free_port, wait_until, KillOnDrop, PROVISIONER};

const PACKAGES: [&str; 2] = ["nodekeeper-provisioner", "nodekeeper-guard"];

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Purges the packages when dropped (the test's end, or its panic).
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge"]).args(PACKAGES).stdout(Stdio::null()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packages_install_run_and_purge() {
    let root = common::nix_is_root() && Path::new("/usr/bin/dpkg-deb").exists();
    assert!(root || std::env::var("NODEKEEPER_REQUIRE_NETNS").as_deref() != Ok("1"), "make test runs as root");
    if !root {
        return;
    }
    // One run at a time on this machine (a CI run and a developer's share it).
    let lock = std::fs::File::create("/tmp/nodekeeper-packages-test.lock").expect("lock file");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let out = tempfile::tempdir().expect("dir");
    let bin = Path::new(PROVISIONER).parent().expect("bin dir");
    let made = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/make-deb.sh"))
        .env("NK_DEB_BIN_DIR", bin)
        .env("NK_DEB_OUT", out.path())
        .output()
        .expect("make-deb.sh");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let debs: Vec<String> = String::from_utf8_lossy(&made.stdout).lines().map(str::to_owned).collect();
    assert_eq!(debs.len(), 2, "{debs:?}");
    let guard_deb = debs.iter().find(|d| d.contains("nodekeeper-guard_")).expect("the guard's");
    let depends = String::from_utf8_lossy(&run("dpkg-deb", &["-f", guard_deb, "Depends"]).stdout).into_owned();
    assert!(depends.contains("libvirt0") && depends.contains("libc6"), "{depends}");
    let conffiles = String::from_utf8_lossy(&run("dpkg-deb", &["--info", guard_deb, "conffiles"]).stdout).into_owned();
    assert_eq!(conffiles.trim(), "/etc/nodekeeper/guard.toml");

    let _purge = Purge;
    let mut args = vec!["-i"];
    args.extend(debs.iter().map(String::as_str));
    run("dpkg", &args);
    for p in PACKAGES {
        let status = String::from_utf8_lossy(&run("dpkg-query", &["-W", "-f", "${Status}", p]).stdout).into_owned();
        assert_eq!(status, "install ok installed", "{p}");
    }
    let version = env!("CARGO_PKG_VERSION");
    for b in ["/usr/bin/nodekeeper-provisioner", "/usr/bin/nodekeeper-guard"] {
        let said = String::from_utf8_lossy(&run(b, &["--version"]).stdout).into_owned();
        assert!(said.contains(version), "{b}: {said}");
    }
    // The system user, its state, the config only it (and root) may read.
    let user = String::from_utf8_lossy(&run("getent", &["passwd", "nodekeeper"]).stdout).into_owned();
    assert!(user.trim_end().ends_with(":/usr/sbin/nologin"), "{user}");
    let uid: u32 = user.split(':').nth(2).and_then(|u| u.parse().ok()).expect("uid");
    let state = std::fs::metadata("/var/lib/nodekeeper/images").expect("images dir");
    assert_eq!(state.uid(), uid);
    let config = std::fs::metadata("/etc/nodekeeper/provisioner.toml").expect("config");
    assert_eq!((config.uid(), config.mode() & 0o777), (0, 0o640));
    for unit in ["nodekeeper-provisioner.service", "nodekeeper-guard.service", "nodekeeper-guard-boot.service"] {
        let path = format!("/usr/lib/systemd/system/{unit}");
        let verified =
            Command::new("systemd-analyze").args(["verify", "--man=no", &path]).output().expect("systemd-analyze");
        let said = String::from_utf8_lossy(&verified.stderr).into_owned();
        // Without systemd as PID 1 it still parses and checks the unit (no man pages are
        // shipped: not looked for); only its own lines count.
        let own: Vec<&str> = said.lines().filter(|l| l.contains(unit)).collect();
        assert!(own.is_empty(), "{unit}: {said}");
    }

    // The installed provisioner, as its user, with the installed config's addresses changed.
    let work = tempfile::tempdir().expect("dir");
    run("chown", &["nodekeeper:nodekeeper", &work.path().display().to_string()]);
    let (http, tftp) = (free_port(), free_port());
    let installed = std::fs::read_to_string("/etc/nodekeeper/provisioner.toml").expect("read");
    let config = installed
        .replace("sqlite:///var/lib/nodekeeper/nodekeeper.db", &format!("sqlite://{}/nk.db", work.path().display()))
        .replace("0.0.0.0:69", &format!("127.0.0.1:{tftp}"))
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{http}"));
    assert_ne!(config, installed, "the installed config has the keys this test changes");
    let path = work.path().join("provisioner.toml");
    std::fs::write(&path, config).expect("write");
    run("chown", &["nodekeeper:nodekeeper", &path.display().to_string()]);
    // As the user, by setuid in the child itself (not runuser, which forks: killing it would
    // leave serve running).
    let gid: u32 = user.split(':').nth(3).and_then(|g| g.parse().ok()).expect("gid");
    let _serve = KillOnDrop(
        Command::new("/usr/bin/nodekeeper-provisioner")
            .uid(uid)
            .gid(gid)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("serve.log")).expect("log"))
            .spawn()
            .expect("serve"),
    );
    let url = format!("http://127.0.0.1:{http}/healthz");
    let client = reqwest::Client::new();
    wait_until("the installed serve answers", Duration::from_secs(30), async || {
        client.get(&url).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    // What it made is its user's.
    assert_eq!(std::fs::metadata(work.path().join("nk.db")).expect("db").uid(), uid);
    let console = client.get(format!("http://127.0.0.1:{http}/")).send().await.expect("console");
    assert!(console.text().await.expect("text").contains("nodekeeper"));
    drop(_serve);

    run("dpkg", &["--purge", PACKAGES[0], PACKAGES[1]]);
    for gone in ["/usr/bin/nodekeeper-provisioner", "/usr/bin/nodekeeper-guard", "/etc/nodekeeper/provisioner.toml"] {
        assert!(!Path::new(gone).exists(), "{gone} after purge");
    }
    assert!(Path::new("/var/lib/nodekeeper").exists(), "the fleet's state is kept");
}
