//! `power HOST on|off|cycle|status` against the real BMC emulators driving a real libvirt
//! QEMU domain: sushy-tools (Redfish, libvirt driver) and VirtualBMC (IPMI, via ipmitool).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodekeeper_provisioner::bmc::{Bmc, Driver};
use nodekeeper_store::testing::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_nodekeeper-provisioner");

fn venv() -> Option<PathBuf> {
    let venv = PathBuf::from(std::env::var("NODEKEEPER_BMC_VENV").unwrap_or_else(|_| "/opt/nk-bmc-venv".into()));
    let ok = venv.join("bin/sushy-emulator").exists()
        && venv.join("bin/vbmcd").exists()
        && Path::new("/run/libvirt/libvirt-sock").exists()
        && Command::new("ipmitool").arg("-V").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("NODEKEEPER_REQUIRE_BMC").as_deref() != Ok("1"),
            "NODEKEEPER_REQUIRE_BMC=1 but sushy-tools/VirtualBMC (venv {}), ipmitool or libvirtd is missing",
            venv.display()
        );
        eprintln!("skipping: needs the BMC emulators venv, ipmitool and libvirtd (make test sets them up)");
        return None;
    }
    Some(venv)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// A shut-off QEMU domain, and the emulator processes; all removed on drop.
struct Rig {
    domain: String,
    uuid: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("virsh").args(["-q", "destroy", &self.domain]).output();
        let _ = Command::new("virsh").args(["-q", "undefine", &self.domain]).output();
    }
}

fn rig() -> Rig {
    let uuid = uuid::Uuid::new_v4().to_string();
    let domain = format!("nk-bmc-{}", &uuid[..8]);
    let dir = tempfile::tempdir().expect("dir");
    let xml = dir.path().join("domain.xml");
    // A disk and a NIC: sushy maps the Hdd and Pxe boot targets to them.
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(1 << 20)).expect("disk");
    std::fs::write(
        &xml,
        format!(
            "<domain type='qemu'><name>{domain}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <interface type='user'><model type='virtio'/></interface></devices></domain>",
            disk.display()
        ),
    )
    .expect("xml");
    let out = Command::new("virsh").args(["-q", "define"]).arg(&xml).output().expect("virsh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Rig { domain, uuid, children: Vec::new(), dir }
}

fn domstate(domain: &str) -> String {
    String::from_utf8_lossy(&Command::new("virsh").args(["domstate", domain]).output().expect("virsh").stdout)
        .trim()
        .to_owned()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} never became ready");
}

fn nk(url: &str, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("NODEKEEPER_DATABASE_URL", url)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn power(url: &str, env: &[(&str, &str)], host: &str, action: &str) -> String {
    let (ok, stdout, stderr) = nk(url, env, &["--json", "power", host, action]);
    assert!(ok, "power {host} {action}: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    v["power"].as_str().expect("power").to_owned()
}

#[tokio::test]
async fn redfish_through_sushy_tools() {
    let Some(venv) = venv() else { return };
    let mut rig = rig();
    let port = free_port();
    rig.children.push(
        Command::new(venv.join("bin/sushy-emulator"))
            .args(["--libvirt-uri", "qemu:///system", "-i", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sushy-emulator"),
    );
    let system = format!("http://127.0.0.1:{port}/redfish/v1/Systems/{}", rig.uuid);
    wait_for("sushy-emulator", || {
        Command::new("curl").args(["-sf", "-o", "/dev/null", &system]).status().is_ok_and(|s| s.success())
    });

    let db = TestDb::sqlite();
    let url = db.url().to_owned();
    let creds = rig.dir.path().join("creds");
    std::fs::write(&creds, "admin:password\n").expect("creds");
    let bmc = format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/{}", rig.uuid);
    let (ok, _, err) = nk(
        &url,
        &[],
        &["host", "add", "node-r", "--bmc", &bmc, "--bmc-credentials", &format!("file:{}", creds.display())],
    );
    assert!(ok, "{err}");

    assert_eq!(power(&url, &[], "node-r", "status"), "off");
    assert_eq!(power(&url, &[], "node-r", "on"), "on");
    assert_eq!(domstate(&rig.domain), "running", "the real domain runs");
    assert_eq!(power(&url, &[], "node-r", "cycle"), "on");
    assert_eq!(power(&url, &[], "node-r", "off"), "off");
    assert_eq!(domstate(&rig.domain), "shut off");
    assert_eq!(power(&url, &[], "node-r", "off"), "off", "idempotent");

    // PXE once, as the reimage will ask before powering on.
    let driver = Driver::from_url(&bmc, None).expect("driver");
    driver.set_pxe_once().await.expect("pxe once");
    let body =
        String::from_utf8(Command::new("curl").args(["-sf", &system]).output().expect("curl").stdout).expect("utf-8");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["Boot"]["BootSourceOverrideTarget"], "Pxe");
    // sushy-tools' libvirt driver rewrites the domain's boot order and always reports
    // "Continuous": like hardware that ignores a one-time override, which is why the
    // reimage's local_boot step sets the disk back explicitly.
    assert!(matches!(v["Boot"]["BootSourceOverrideEnabled"].as_str(), Some("Once" | "Continuous")), "{v}");
    // And back to the disk, as the reimage's local_boot step does.
    driver.set_disk_boot().await.expect("disk boot");
    let body =
        String::from_utf8(Command::new("curl").args(["-sf", &system]).output().expect("curl").stdout).expect("utf-8");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["Boot"]["BootSourceOverrideTarget"], "Hdd");

    // A BMC that is not there: a clear error, no hang.
    let (_, _, _) =
        nk(&url, &[], &["host", "add", "node-x", "--bmc", "redfish+http://127.0.0.1:1/redfish/v1/Systems/x"]);
    let (ok, _, err) = nk(&url, &[], &["power", "node-x", "status"]);
    assert!(!ok && err.contains("unreachable"), "{err}");
}

#[tokio::test]
async fn ipmi_through_virtualbmc() {
    let Some(venv) = venv() else { return };
    let mut rig = rig();
    let (server_port, ipmi_port) = (free_port(), free_port());
    let conf = rig.dir.path().join("virtualbmc.conf");
    std::fs::write(
        &conf,
        format!(
            "[default]\nconfig_dir = {0}/vbmc\npid_file = {0}/vbmcd.pid\nserver_port = {server_port}\n[log]\nlogfile = {0}/vbmc.log\n",
            rig.dir.path().display()
        ),
    )
    .expect("conf");
    // vbmcd exits at once without its config_dir, and vbmc then waits for it forever.
    std::fs::create_dir_all(rig.dir.path().join("vbmc")).expect("vbmc dir");
    let env = [("VIRTUALBMC_CONFIG", conf.display().to_string())];
    rig.children.push(
        Command::new(venv.join("bin/vbmcd"))
            .arg("--foreground")
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vbmcd"),
    );
    let vbmc = |args: &[&str]| {
        Command::new(venv.join("bin/vbmc")).args(args).envs(env.iter().cloned()).output().expect("vbmc")
    };
    wait_for("vbmcd", || vbmc(&["list"]).status.success());
    let out = vbmc(&[
        "add",
        &rig.domain,
        "--port",
        &ipmi_port.to_string(),
        "--address",
        "127.0.0.1",
        "--username",
        "admin",
        "--password",
        "s3cret-ipmi",
        "--libvirt-uri",
        "qemu:///system",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(vbmc(&["start", &rig.domain]).status.success());

    let db = TestDb::sqlite();
    let url = db.url().to_owned();
    let good = [("NK_TEST_IPMI", "admin:s3cret-ipmi")];
    let (ok, _, err) = nk(
        &url,
        &[],
        &[
            "host",
            "add",
            "node-i",
            "--bmc",
            &format!("ipmi://127.0.0.1:{ipmi_port}"),
            "--bmc-credentials",
            "env:NK_TEST_IPMI",
        ],
    );
    assert!(ok, "{err}");
    wait_for("the IPMI endpoint", || nk(&url, &good, &["power", "node-i", "status"]).0);
    assert_eq!(power(&url, &good, "node-i", "status"), "off");
    assert_eq!(power(&url, &good, "node-i", "on"), "on");
    assert_eq!(domstate(&rig.domain), "running");
    assert_eq!(power(&url, &good, "node-i", "off"), "off");
    assert_eq!(domstate(&rig.domain), "shut off");

    // A wrong password: refused, and the secret appears nowhere in the output.
    let (ok, stdout, err) = nk(&url, &[("NK_TEST_IPMI", "admin:wrong-pass-123")], &["power", "node-i", "status"]);
    assert!(!ok, "a wrong password must fail");
    assert!(!err.contains("wrong-pass-123") && !stdout.contains("wrong-pass-123"), "{err}");
}
