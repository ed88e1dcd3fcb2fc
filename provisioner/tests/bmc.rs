//! `power HOST on|off|cycle|status` against the real BMC emulators driving a real libvirt
//! QEMU domain: sushy-tools (Redfish, libvirt driver) and VirtualBMC (IPMI, via ipmitool).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodekeeper_provisioner::bmc::{Bmc, BootTarget, Driver};
use nodekeeper_store::testing::free_port;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::BootMode;

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

/// A shut-off QEMU domain, and the emulator processes; all removed on drop.
struct Rig {
    domain: String,
    uuid: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
    /// Where sushy-tools puts inserted media (dropped after the emulators are gone).
    pool: Option<nodekeeper_lab::hw::MediaPool>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Each emulator runs in a process group of its own (vbmcd forks a worker per BMC):
        // the whole group goes, by its id.
        for c in &mut self.children {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
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
            "<domain type='qemu'><name>{domain}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type><boot dev='hd'/></os><features><acpi/></features>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <interface type='user'><model type='virtio'/></interface></devices></domain>",
            disk.display()
        ),
    )
    .expect("xml");
    let out = Command::new("virsh").args(["-q", "define"]).arg(&xml).output().expect("virsh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Rig { domain, uuid, children: Vec::new(), dir, pool: None }
}

/// sushy-tools for the rig's domain on `port`, answering; returns the system's URL.
fn sushy(rig: &mut Rig, venv: &Path, port: u16) -> String {
    let pool = nodekeeper_lab::hw::MediaPool::new(rig.dir.path(), &rig.uuid[..8]).expect("storage pool");
    let config = pool.config.display().to_string();
    rig.pool = Some(pool);
    rig.children.push(
        Command::new(venv.join("bin/sushy-emulator"))
            .args(["--libvirt-uri", "qemu:///system", "-i", "127.0.0.1", "-p", &port.to_string(), "--config", &config])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sushy-emulator"),
    );
    let system = format!("http://127.0.0.1:{port}/redfish/v1/Systems/{}", rig.uuid);
    wait_for("sushy-emulator", || {
        Command::new("curl").args(["-sf", "-o", "/dev/null", &system]).status().is_ok_and(|s| s.success())
    });
    system
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
    let system = sushy(&mut rig, &venv, port);

    let db = TestDb::sqlite();
    let url = db.url().to_owned();
    // Credentials live in the BMC credentials directory; a reference outside it is refused
    // at `host add` and never read.
    let creds_dir = rig.dir.path().join("bmc");
    std::fs::create_dir(&creds_dir).expect("creds dir");
    let creds = creds_dir.join("node-r");
    std::fs::write(&creds, "admin:password\n").expect("creds");
    let dir = creds_dir.to_str().expect("utf-8");
    let scope = [("NODEKEEPER_BMC_CREDENTIALS_DIR", dir)];
    let bmc = format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/{}", rig.uuid);
    let outside = rig.dir.path().join("creds-elsewhere");
    std::fs::write(&outside, "admin:password\n").expect("creds");
    let (ok, _, err) = nk(
        &url,
        &scope,
        &["host", "add", "node-o", "--bmc", &bmc, "--bmc-credentials", &format!("file:{}", outside.display())],
    );
    assert!(!ok && err.contains("outside"), "{err}");
    let (ok, _, err) = nk(
        &url,
        &scope,
        &["host", "add", "node-r", "--bmc", &bmc, "--bmc-credentials", &format!("file:{}", creds.display())],
    );
    assert!(ok, "{err}");

    assert_eq!(power(&url, &scope, "node-r", "status"), "off");
    assert_eq!(power(&url, &scope, "node-r", "on"), "on");
    assert_eq!(domstate(&rig.domain), "running", "the real domain runs");
    assert_eq!(power(&url, &scope, "node-r", "cycle"), "on");
    assert_eq!(power(&url, &scope, "node-r", "off"), "off");
    assert_eq!(domstate(&rig.domain), "shut off");
    assert_eq!(power(&url, &scope, "node-r", "off"), "off", "idempotent");
    // The same record read with another credentials directory: refused, nothing sent.
    let (ok, _, err) = nk(&url, &[("NODEKEEPER_BMC_CREDENTIALS_DIR", "/nonexistent")], &["power", "node-r", "status"]);
    assert!(!ok && err.contains("outside"), "{err}");

    // PXE once, as the reimage will ask before powering on.
    let driver = Driver::from_url(&bmc, None).expect("driver");
    let system_json = || -> serde_json::Value {
        let out = Command::new("curl").args(["-sf", &system]).output().expect("curl");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    driver.set_boot_once(BootTarget::Pxe, None).await.expect("pxe once");
    let v = system_json();
    assert_eq!(v["Boot"]["BootSourceOverrideTarget"], "Pxe");
    // sushy-tools' libvirt driver rewrites the domain's boot order and always reports
    // "Continuous": like hardware that ignores a one-time override, which is why the
    // reimage's local_boot step sets the disk back explicitly.
    assert!(matches!(v["Boot"]["BootSourceOverrideEnabled"].as_str(), Some("Once" | "Continuous")), "{v}");
    // And back to the disk, as the reimage's local_boot step does.
    driver.set_disk_boot(None).await.expect("disk boot");
    assert_eq!(system_json()["Boot"]["BootSourceOverrideTarget"], "Hdd");

    // Boot modes. sushy-tools reports none for a BIOS domain (no loader): as a BMC without
    // the setting, nothing is sent, whatever the host's mode.
    let os_section = || {
        let out = Command::new("virsh").args(["dumpxml", "--inactive", &rig.domain]).output().expect("virsh");
        let xml = String::from_utf8_lossy(&out.stdout).into_owned();
        let (start, end) = (xml.find("<os").expect("<os>"), xml.find("</os>").expect("</os>"));
        xml[start..end].to_owned()
    };
    let bios = os_section();
    assert!(system_json()["Boot"]["BootSourceOverrideMode"].is_null(), "{}", system_json());
    // UEFI HTTP boot on a BIOS machine: refused before anything changes, in the BMC's terms.
    assert!(!driver.takes_http_boot_uri().await.expect("read"), "no HttpBootUri on BIOS");
    let err = driver.check_boot(BootTarget::UefiHttp).await.expect_err("no UefiHttp on BIOS");
    assert!(matches!(err, nodekeeper_provisioner::bmc::BmcError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("[Pxe, Cd, Hdd]: no UefiHttp"), "{err}");
    driver.set_boot_once(BootTarget::Pxe, Some(BootMode::Uefi)).await.expect("pxe once, mode not reported");
    assert_eq!(os_section(), bios, "no mode sent to a BMC that reports none");
    // An operator switches the machine to UEFI (here with a PATCH of its own): it reports UEFI.
    let out = Command::new("curl")
        .args(["-sf", "-X", "PATCH", "-H", "Content-Type: application/json"])
        .args(["-d", r#"{"Boot": {"BootSourceOverrideMode": "UEFI"}}"#, &system])
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let uefi = os_section();
    assert!(uefi.contains("pflash"), "UEFI firmware: {uefi}");
    // UEFI: UefiHttp is a target now (sushy-tools boots the network for it, as firmware
    // whose PXE is off and HTTP boot on would).
    driver.check_boot(BootTarget::UefiHttp).await.expect("UefiHttp on UEFI");
    assert!(driver.takes_http_boot_uri().await.expect("read"), "sushy-tools lists HttpBootUri in UEFI mode");
    driver.set_boot_once(BootTarget::UefiHttp, Some(BootMode::Uefi)).await.expect("UefiHttp once");
    assert_eq!(system_json()["Boot"]["BootSourceOverrideTarget"], "Pxe", "{}", system_json());
    assert_eq!(os_section(), uefi, "the firmware section is untouched");
    // Already UEFI: the mode is not sent again (sushy-tools would rebuild the firmware
    // section, and Secure Boot with it; iDRAC would queue a BIOS job).
    driver.set_disk_boot(Some(BootMode::UefiSecureBoot)).await.expect("disk, UEFI");
    let v = system_json();
    assert_eq!(
        (v["Boot"]["BootSourceOverrideTarget"].as_str(), v["Boot"]["BootSourceOverrideMode"].as_str()),
        (Some("Hdd"), Some("UEFI")),
        "{v}"
    );
    assert_eq!(os_section(), uefi, "the firmware section is untouched when the mode is already right");
    // A BIOS host on it: Legacy is sent, and sushy-tools' libvirt driver cannot do it here (a
    // `rom` loader without a path): the BMC's own message comes back, and nothing changed.
    let err = driver
        .set_boot_once(BootTarget::Pxe, Some(BootMode::Bios))
        .await
        .expect_err("sushy-tools cannot go back to Legacy");
    assert!(err.to_string().contains("HTTP 500") && err.to_string().contains("boot mode"), "{err}");
    assert_eq!(os_section(), uefi);

    // A BMC that is not there: a clear error, no hang.
    let (_, _, _) =
        nk(&url, &[], &["host", "add", "node-x", "--bmc", "redfish+http://127.0.0.1:1/redfish/v1/Systems/x"]);
    let (ok, _, err) = nk(&url, &[], &["power", "node-x", "status"]);
    assert!(!ok && err.contains("unreachable"), "{err}");
}

/// Redfish virtual media through sushy-tools: the BMC fetches the ISO from our URL and
/// attaches it to the domain as a CD; inserting again is a no-op, ejecting detaches it, and
/// ejecting an empty slot is one too.
#[tokio::test]
async fn virtual_media_through_sushy_tools() {
    let Some(venv) = venv() else { return };
    let mut rig = rig();
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let system = sushy(&mut rig, &venv, port);
    // The ISO, served over HTTP as `serve` serves /vmedia/.
    let iso = rig.dir.path().join("media/node.iso");
    std::fs::create_dir_all(iso.parent().expect("dir")).expect("mkdir");
    std::fs::write(&iso, vec![0x5a; 512 * 1024]).expect("iso");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/node.iso", listener.local_addr().expect("addr"));
    let files = axum::Router::new().fallback_service(tower_http::services::ServeDir::new(rig.dir.path().join("media")));
    tokio::spawn(async move { axum::serve(listener, files).await });
    let driver = Driver::from_url(&format!("redfish+http{}", system.trim_start_matches("http")), None).expect("driver");
    let cdrom = || {
        let out = Command::new("virsh").args(["dumpxml", "--inactive", &rig.domain]).output().expect("virsh");
        let xml = String::from_utf8_lossy(&out.stdout).into_owned();
        xml.split("<disk ").filter(|d| d.contains("device='cdrom'") && d.contains("<source file=")).count()
    };
    driver.check_boot(BootTarget::Cd).await.expect("sushy-tools has a virtual CD");
    assert_eq!(cdrom(), 0);
    driver.insert_media(&url).await.expect("insert");
    assert_eq!(cdrom(), 1, "the ISO is the domain's CD");
    let slot = || -> serde_json::Value {
        let out = Command::new("curl").args(["-sf", &format!("{system}/VirtualMedia/Cd")]).output().expect("curl");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    assert_eq!((slot()["Inserted"].as_bool(), slot()["Image"].as_str()), (Some(true), Some(url.as_str())));
    driver.insert_media(&url).await.expect("insert again");
    assert_eq!(cdrom(), 1, "still one CD");
    driver.set_boot_once(BootTarget::Cd, None).await.expect("boot the CD once");
    driver.eject_media().await.expect("eject");
    assert_eq!(cdrom(), 0, "ejected");
    assert_ne!(slot()["Inserted"].as_bool(), Some(true));
    driver.eject_media().await.expect("eject an empty slot");
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
            .process_group(0)
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
    let good = [("NODEKEEPER_BMC_TEST_IPMI", "admin:s3cret-ipmi")];
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
            "env:NODEKEEPER_BMC_TEST_IPMI",
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
    let (ok, stdout, err) =
        nk(&url, &[("NODEKEEPER_BMC_TEST_IPMI", "admin:wrong-pass-123")], &["power", "node-i", "status"]);
    assert!(!ok, "a wrong password must fail");
    assert!(!err.contains("wrong-pass-123") && !stdout.contains("wrong-pass-123"), "{err}");
}

/// The real `serve`, killed with SIGKILL at every step of a reimage and started again: the
/// operation resumes from the database each time, no step runs twice, and the deploy agent's
/// download resumes across a kill in the middle of the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_at_every_step_resumes_the_reimage() {
    use nodekeeper_store::{OperationStatus, Store};
    let Some(venv) = venv() else { return };
    let mut rig = rig();
    let port = free_port();
    sushy(&mut rig, &venv, port);
    let d = rig.dir.path().to_owned();
    std::fs::create_dir_all(d.join("images")).expect("images");
    let image: Vec<u8> = (0..64_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    std::fs::write(d.join("images/node.img"), &image).expect("image");
    let db = format!("sqlite://{}/nk.db", d.display());
    let mac = "52:54:00:4b:11:01";
    let bmc = format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/{}", rig.uuid);
    assert!(nk(&db, &[], &["db", "migrate"]).0);
    let (ok, _, err) = nk(&db, &[], &["host", "add", "node-k", "--mac", mac, "--bmc", &bmc]);
    assert!(ok, "{err}");
    let http = free_port();
    let base = format!("http://127.0.0.1:{http}");
    let config = d.join("provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{db}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{http}\"\npublic_url = \"{base}\"\nimages_dir = \"{}/images\"\n",
            d.display()
        ),
    )
    .expect("config");
    let start = || {
        let child = Command::new(BIN)
            .args(["serve", "--config", &config.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve");
        wait_for("serve", || {
            Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &format!("{base}/healthz")])
                .status()
                .is_ok_and(|s| s.success())
        });
        child
    };
    let kill9 = |mut child: Child| {
        let _ = Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
        let _ = child.wait();
    };
    let store = Store::connect(&db).await.expect("store");
    let host: nodekeeper_store::HostName = "node-k".parse().expect("name");
    let step = || {
        let store = store.clone();
        let host = host.clone();
        async move { store.latest_operation(&host).await.expect("op").expect("an operation") }
    };
    let wait_step = |want: &'static str| async move {
        for _ in 0..600 {
            let op = step().await;
            assert_eq!(op.status, OperationStatus::Running, "{op:?}");
            if op.step == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never reached {want}");
    };

    let mut serve = start();
    let (ok, _, err) = nk(&db, &[], &["reimage", "node-k"]);
    assert!(ok, "{err}");
    // Each BMC step: killed as soon as it is the current step, then started again.
    for s in ["power_off", "pxe_next_boot", "power_on", "agent_booted"] {
        wait_step(s).await;
        kill9(serve);
        serve = start();
    }
    wait_step("agent_booted").await;
    let script = Command::new("curl").args(["-sf", &format!("{base}/boot/{mac}.ipxe")]).output().expect("curl");
    let script = String::from_utf8_lossy(&script.stdout).into_owned();
    let token = script.split("nk.token=").nth(1).and_then(|r| r.split_whitespace().next()).expect("token").to_owned();
    let disk = d.join("disk.img");
    let params = nodekeeper_deploy::Params::from_cmdline(&format!(
        "nk.server={base} nk.host=node-k nk.token={token} nk.image={base}/images/node.img nk.disk={}",
        disk.display()
    ))
    .expect("params");
    assert_eq!(nodekeeper_deploy::report_until_heard(&params, "booted", None, None, 10).expect("report"), 200);
    wait_step("image_written").await;
    // The agent's download, with the provisioner killed under it at 10%.
    let serve_cell = std::sync::Mutex::new(Some(serve));
    let (outcome, head) = {
        let p = params.clone();
        let mut killed = false;
        nodekeeper_deploy::write_image(&p, |_, _| {
            if !killed {
                killed = true;
                if let Some(c) = serve_cell.lock().expect("lock").take() {
                    kill9(c);
                }
                *serve_cell.lock().expect("lock") = Some(start());
            }
        })
        .expect("the download resumes across the kill")
    };
    let mut serve = serve_cell.into_inner().expect("lock").expect("serve");
    assert!(matches!(outcome, nodekeeper_deploy::Outcome::Verified { bytes: 64_000_000, .. }), "{outcome:?}");
    assert_eq!(nodekeeper_deploy::report_until_heard(&params, "written", None, None, 10).expect("report"), 200);
    nodekeeper_deploy::finish(&params, 64_000_000, &head).expect("finish");
    kill9(serve); // the final report arrives while the provisioner is down: the agent retries
    let reporter = std::thread::spawn(move || {
        nodekeeper_deploy::report_until_heard(&params, "verified", None, None, 30).expect("report")
    });
    std::thread::sleep(Duration::from_secs(3));
    serve = start();
    assert_eq!(reporter.join().expect("reporter"), 200);
    for s in ["local_boot", "heartbeat"] {
        wait_step(s).await;
        kill9(serve);
        serve = start();
    }
    wait_step("heartbeat").await;
    let written = std::fs::read(&disk).expect("disk");
    assert_eq!(&written[..image.len()], image.as_slice(), "the image, byte for byte, across the kill");
    let up = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-H", "Content-Type: application/json"])
        .args(["-d", &format!(r#"{{"token":"{token}","stage":"up"}}"#), &format!("{base}/api/v1/hosts/node-k/deploy")])
        .status()
        .expect("curl");
    assert!(up.success(), "the node's first boot reports up");
    for _ in 0..100 {
        if step().await.status != OperationStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let op = step().await;
    kill9(serve);
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Done, "done"), "{op:?}");
    // Every transition happened once: the kills repeated none.
    let events = store
        .events(&nodekeeper_store::EventFilter { host: Some(host.clone()), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    for next in ["next pxe_next_boot", "next power_on", "next agent_booted", "next image_written", "next local_boot"] {
        let n = events.iter().filter(|e| e.kind == "reimage.step" && e.message.ends_with(next)).count();
        assert_eq!(n, 1, "{next}: {n} times");
    }
    assert_eq!(domstate(&rig.domain), "running", "powered on once, by the reimage");
    store.close().await;
}

/// A PDU's outlets over SNMP against snmpsim (an SNMP agent simulator, its `writecache`
/// variation keeping what is set): APC's PowerNet-MIB `sPDUOutletCtl`, SNMPv2c. Off and on,
/// confirmed by reading back; a wrong community and an outlet the PDU does not have fail,
/// and are never taken as off; credentials are required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snmp_outlets_through_snmpsim() {
    use nodekeeper_provisioner::bmc::{self, pdu::Outlet, Credentials, PowerAction, PowerState, Switch};
    let Some(venv) = venv() else { return };
    let responder = venv.join("bin/snmpsim-command-responder");
    let have = responder.exists() && Command::new("snmpget").arg("-V").output().is_ok_and(|o| o.status.success());
    assert!(have, "snmpsim ({}) and net-snmp's snmpget (Debian: snmp) are set up by make test", responder.display());
    // snmpsim drops to `nobody`: its data and cache must be readable (and the cache writable).
    let dir = tempfile::tempdir().expect("dir");
    let (data, cache) = (dir.path().join("data"), dir.path().join("cache"));
    for d in [dir.path(), &data, &cache] {
        std::fs::create_dir_all(d).expect("mkdir");
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    }
    let ctl = "1.3.6.1.4.1.318.1.1.4.4.2.1.3";
    std::fs::write(
        data.join("private.snmprec"),
        format!(
            "1.3.6.1.2.1.1.1.0|4|nodekeeper test PDU\n{ctl}.1|2:writecache|value=1\n{ctl}.2|2:writecache|value=1\n"
        ),
    )
    .expect("snmprec");
    std::fs::set_permissions(data.join("private.snmprec"), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr").port();
    let child = Command::new(&responder)
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--cache-dir={}", cache.display()))
        .arg(format!("--agent-udpv4-endpoint=127.0.0.1:{port}"))
        .args(["--process-user=nobody", "--process-group=nogroup", "--logging-method=null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("snmpsim");
    let _snmpsim = Group(child);
    let community = || Some(Credentials { user: "private".into(), password: String::new() });
    let outlet = Outlet::from_url(&format!("snmp://127.0.0.1:{port}/1"), community()).expect("outlet");
    wait_for("snmpsim answering", || {
        Command::new("snmpget")
            .args(["-v2c", "-c", "private", "-t", "1", "-r", "0", &format!("127.0.0.1:{port}"), "1.3.6.1.2.1.1.1.0"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let policy = bmc::Policy { confirm_within: Duration::from_secs(5), attempts: 2, poll: Duration::from_millis(100) };
    assert_eq!(outlet.read_power().await.expect("state"), PowerState::On);
    assert_eq!(bmc::power(&outlet, PowerAction::Off, &policy).await.expect("off"), PowerState::Off);
    assert_eq!(outlet.read_power().await.expect("state"), PowerState::Off, "read back from the agent");
    let other = Outlet::from_url(&format!("snmp://127.0.0.1:{port}/2"), community()).expect("outlet 2");
    assert_eq!(other.read_power().await.expect("state"), PowerState::On, "only outlet 1 switched");
    assert_eq!(bmc::power(&outlet, PowerAction::On, &policy).await.expect("on"), PowerState::On);
    // A wrong community: the agent does not answer (SNMP's way); an error, not "off".
    let wrong = Outlet::from_url(
        &format!("snmp://127.0.0.1:{port}/1"),
        Some(Credentials { user: "guess".into(), password: String::new() }),
    )
    .expect("outlet");
    let e = wrong.read_power().await.expect_err("wrong community").to_string();
    assert!(e.contains("Timeout") || e.contains("No Response"), "{e}");
    // An outlet the PDU does not have: never confirmed off.
    let missing = Outlet::from_url(&format!("snmp://127.0.0.1:{port}/9"), community()).expect("outlet 9");
    assert_ne!(missing.read_power().await.unwrap_or(PowerState::Unknown), PowerState::Off);
    let quick =
        bmc::Policy { confirm_within: Duration::from_millis(500), attempts: 1, poll: Duration::from_millis(100) };
    assert!(bmc::power(&missing, PowerAction::Off, &quick).await.is_err(), "not confirmed");
}

/// A process and its group, killed (by the group's id) when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
