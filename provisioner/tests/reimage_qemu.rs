//! End to end under QEMU (TCG): a libvirt domain with an empty disk, registered with its MAC
//! and a sushy-tools Redfish endpoint, is reimaged by `nodekeeper-provisioner reimage` while
//! `serve` runs: powered off, PXE-booted (DHCP → iPXE → deploy ramdisk), the node image
//! streamed to its disk and verified, rebooted from the disk, and the operation is done when
//! the node's first boot reports in. Then a corrupted image: `failed` at `verified`, and the
//! disk that was bootable is not any more. In between, the guard-boot part of a failover: the
//! node's guard (through the guard API, with the node token its first boot made) runs an HA
//! instance; the node crashes; serve's controller fences it through sushy-tools and moves the
//! instance; the node is powered on again and its guard quarantines the stale definition
//! before libvirtd starts. The node APIs are TLS-only (`[http.tls] require`): the agent, the
//! first boot and the guard all speak TLS, trusting the CA the deploy carried.
//!
//! Needs root, netns, libvirtd, the BMC venv, QEMU and the images (`make images`; built here
//! if missing, cached). The node image's first build downloads Debian packages (minutes).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use nodekeeper_lab::hw::{BootPath, Firmware, Hardware};
use nodekeeper_store::{EventFilter, HostName, HostState, Operation, OperationStatus, Store, Timestamp};

const BIN: &str = env!("CARGO_BIN_EXE_nodekeeper-provisioner");
const MAC: &str = "52:54:00:e2:e0:01";

fn requirements() -> Option<PathBuf> {
    let venv = PathBuf::from(std::env::var("NODEKEEPER_BMC_VENV").unwrap_or_else(|_| "/opt/nk-bmc-venv".into()));
    let ok = venv.join("bin/sushy-emulator").exists()
        && Path::new("/run/libvirt/libvirt-sock").exists()
        && Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success())
        && Command::new("debootstrap").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        let required = ["NODEKEEPER_REQUIRE_QEMU", "NODEKEEPER_REQUIRE_BMC"]
            .iter()
            .any(|v| std::env::var(v).as_deref() == Ok("1"));
        assert!(!required, "the end-to-end reimage needs sushy-tools, libvirtd, qemu-system-x86_64 and debootstrap");
        eprintln!("skipping: needs sushy-tools, libvirtd, qemu-system-x86_64 and debootstrap (make test sets them up)");
        return None;
    }
    Some(venv)
}

fn build(script: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(repo.join(script)).output().expect(script);
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hard link (same file system) or copy.
fn place(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

fn nk(db: &str, args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).env("NODEKEEPER_DATABASE_URL", db).output().expect("provisioner");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The libvirt domain; destroyed and undefined on drop.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["-q", "destroy", &self.0]).output();
        let _ = Command::new("virsh").args(["-q", "undefine", &self.0]).output();
    }
}

/// The last `n` lines of `text`.
/// The fixed address of a host that boots from virtual media (no DHCP of ours).
const FIXED_IP: &str = "10.20.0.42";

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Follows operation `id` until it ends (or `limit`), printing each step with its time.
async fn follow(store: &Store, host: &HostName, id: i64, limit: Duration, serial: &Path) -> (Operation, Vec<String>) {
    let started = Instant::now();
    let (mut last, mut phases, mut at) = (String::new(), Vec::new(), Instant::now());
    loop {
        let op = store.latest_operation(host).await.expect("operation").expect("an operation");
        assert_eq!(op.id, id);
        if op.step != last {
            if !last.is_empty() {
                let line = format!("{last:<14} {:>6.1} s", at.elapsed().as_secs_f64());
                eprintln!("reimage e2e: {line}");
                phases.push(line);
            }
            (last, at) = (op.step.clone(), Instant::now());
        }
        if op.status != OperationStatus::Running {
            return (op, phases);
        }
        if started.elapsed() > limit {
            let log = std::fs::read_to_string(serial).unwrap_or_default();
            panic!("operation still at {} after {limit:?}; serial tail:\n{}", op.step, tail(&log, 60));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A node under test: its libvirt domain (with a Redfish BMC), serve in the lab with TLS
/// required, the database with the host registered, the images in place.
struct Rig {
    dir: tempfile::TempDir,
    _lab: Lab,
    server: String,
    domain: Domain,
    db: String,
    store: Store,
    serial: PathBuf,
    /// The disks. files, in `Hardware::disks` order.
    disks: Vec<PathBuf>,
    node_len: u64,
    _serve: common::KillOnDrop,
    /// sushy-tools' storage pool for virtual media (dropped after the lab and its processes).
    _pool: nodekeeper_lab::hw::MediaPool,
}

impl Rig {
    fn d(&self) -> &Path {
        self.dir.path()
    }
    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

/// Starts a rig for a node with `hw` and boot MAC `mac`; `host add` gets the arguments the
/// hardware needs (its boot mode; with several disks a root-device hint naming the last).
async fn start(mac: &str, hw: &Hardware) -> Option<Rig> {
    if !common::netns_available() {
        return None;
    }
    let venv = requirements()?;
    build("images/deploy/build.sh");
    build("images/node/build.sh");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");

    // Everything under target/ (same file system as the images: hard links, not 1 GB copies),
    // readable by the QEMU process libvirt starts.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    for sub in ["images/deploy", "tftp"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    place(&repo.join("images/deploy/out/vmlinuz"), &d.join("images/deploy/vmlinuz"));
    place(&repo.join("images/deploy/out/initrd.img"), &d.join("images/deploy/initrd.img"));
    place(&repo.join("images/node/out/node.img"), &d.join("images/node.img"));
    let node_len = std::fs::metadata(d.join("images/node.img")).expect("image").len();
    // Debian's signed shim, its network GRUB as grubx64.efi (what shim loads over the
    // network) and its CD GRUB (what shim loads from a deploy ISO).
    place(&repo.join("images/node/out/efi/shimx64.efi"), &d.join("tftp/shimx64.efi"));
    place(&repo.join("images/node/out/efi/grubnetx64.efi"), &d.join("tftp/grubx64.efi"));
    place(&repo.join("images/node/out/efi/grubcdx64.efi"), &d.join("tftp/grubcdx64.efi"));
    for f in ["/usr/lib/ipxe/undionly.kpxe", "/usr/lib/ipxe/ipxe.efi", "/usr/lib/ISOLINUX/isolinux.bin"]
        .into_iter()
        .chain(["/usr/lib/syslinux/modules/bios/ldlinux.c32"])
    {
        let to = d.join("tftp").join(Path::new(f).file_name().expect("name"));
        std::fs::copy(f, to).unwrap_or_else(|e| panic!("{f}: {e}"));
    }

    // The domain: 1 GiB, one vCPU, empty disks, a NIC on the lab's bridge.
    let mut lab = Lab::new();
    let server = lab.server.clone();
    let bridge = lab.root_bridge();
    let uuid = uuid::Uuid::new_v4().to_string();
    let domain = Domain(format!("nk-e2e-{}", &uuid[..8]));
    let serial = d.join("serial.log");
    let domain_spec = nodekeeper_lab::hw::Domain {
        name: &domain.0,
        uuid: &uuid,
        mac,
        bridge: &bridge,
        serial: &serial,
        memory_mib: 1024,
        watchdog: false,
        dir: d,
    };
    let (xml, disks) = hw.domain_xml(&domain_spec).expect("domain XML");
    std::fs::write(d.join("domain.xml"), xml).expect("xml");
    let out = Command::new("virsh").args(["-q", "define"]).arg(d.join("domain.xml")).output().expect("virsh");
    assert!(out.status.success(), "virsh define: {}", String::from_utf8_lossy(&out.stderr));

    // Its BMC: sushy-tools, inside the lab (libvirt is reached through its socket), with a
    // storage pool for the media it is asked to insert.
    let pool = nodekeeper_lab::hw::MediaPool::new(d, &uuid[..8]).expect("storage pool");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    lab.spawn(
        &server,
        &venv.join("bin/sushy-emulator").display().to_string(),
        &[
            "--libvirt-uri",
            "qemu:///system",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--config",
            &pool.config.display().to_string(),
        ],
    );
    let system = format!("http://127.0.0.1:{port}/redfish/v1/Systems/{uuid}");
    let mut ready = false;
    for _ in 0..100 {
        if Lab::run(&server, 5, "curl", &["-sf", "-o", "/dev/null", &system]).status.success() {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready, "sushy-emulator never answered");

    let db = format!("sqlite://{}/nk.db", d.display());
    nk(&db, &["db", "migrate"]);
    let bmc = format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/{uuid}");
    let mut add = vec!["host", "add", "node-e2e", "--mac", mac, "--bmc", &bmc];
    let hw_args = hw.host_args();
    add.extend(hw_args.iter().map(String::as_str));
    let virtual_media = hw.boot == BootPath::VirtualMedia;
    if virtual_media {
        // No DHCP of ours: the agent takes the host's fixed address from its ISO, and the
        // installed node gets the same one from the site's DHCP server (dnsmasq on another
        // machine of the network).
        add.extend(["--ip", FIXED_IP]);
        lab.site_dhcp("10.20.0.150,10.20.0.199", &[format!("{mac},{FIXED_IP}")], &d.join("site-dhcp.leases"));
    }
    nk(&db, &add);
    // The node image in the catalogue too (served zstd-compressed, written zero-aware): the
    // reimages below use it, `reimage_figures` both it and the raw file.
    let images_dir = d.join("images").display().to_string();
    let node_img = d.join("images/node.img").display().to_string();
    nk(&db, &["image", "add", CATALOGUED, &node_img, "--images-dir", &images_dir]);
    let config = d.join("provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{db}\"\n{dhcp}[virtual_media]\ndir = \"{d}/vmedia\"\n[tftp]\n{tftp_listen}root = \"{d}/tftp\"\n[http]\nlisten = \"10.20.0.1:8080\"\npublic_url = \"http://10.20.0.1:8080\"\nimages_dir = \"{d}/images\"\ndeploy_kernel_args = \"console=ttyS0 quiet panic=-1\"\n\
             [http.tls]\nlisten = \"10.20.0.1:8443\"\npublic_url = \"https://10.20.0.1:8443\"\ncert = \"{d}/tls/server.pem\"\nkey = \"{d}/tls/server.key\"\nca = \"{d}/tls/ca.pem\"\nrequire = true\n[http.auth]\nmetrics_from = [\"10.20.0.1/32\"]\n",
            d = d.display(),
            // UEFI HTTP boot: no TFTP server at all (the loaders come from /boot/loaders/).
            tftp_listen = if hw.boot == BootPath::Pxe { "listen = \"10.20.0.1:69\"\n" } else { "" },
            dhcp = if virtual_media {
                "[dhcp]\nmode = \"off\"\n"
            } else {
                "[dhcp]\nmode = \"full\"\ninterface = \"br0\"\nserver_ip = \"10.20.0.1\"\nsubnet = \"10.20.0.0/24\"\nrange = [\"10.20.0.100\", \"10.20.0.199\"]\n"
            },
        ),
    )
    .expect("config");
    // TLS required for the node APIs: the agent's reports, the first boot's "up" and the
    // guard all go to https://10.20.0.1:8443 with the CA the deploy carries (plain would be 403).
    nk(&db, &["tls", "init", "--config", &config.display().to_string()]);
    let log = std::fs::File::create(d.join("serve.log")).expect("log");
    let serve = Lab::cmd(&server, BIN)
        .args(["serve", "--config", &config.display().to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("serve");
    let serve = common::KillOnDrop(serve);

    // The provisioner digests an image at its first request (then keeps the digest): done
    // here, so the timings below are the node's.
    let mut warm = false;
    for _ in 0..100 {
        if Lab::run(&server, 300, "curl", &["-sfI", "http://10.20.0.1:8080/images/node.img"]).status.success() {
            warm = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(warm, "serve answers for the node image");
    let store = Store::connect(&db).await.expect("store");
    Some(Rig { dir, _lab: lab, server, domain, db, store, serial, disks, node_len, _serve: serve, _pool: pool })
}

/// The node image's catalogue name (`image add`); `node.img` is the raw file beside it.
const CATALOGUED: &str = "node";

/// Reimages node-e2e with the catalogue's node image until the first boot reported in and the
/// guard came up; returns the operation, its phases and how long it took.
async fn reimage_to_guard(rig: &Rig) -> (Operation, Vec<String>, Duration) {
    reimage_with(rig, CATALOGUED).await
}

/// [`reimage_to_guard`] with `image`: a catalogue name, or a raw file under the images dir.
async fn reimage_with(rig: &Rig, image: &str) -> (Operation, Vec<String>, Duration) {
    let (store, host) = (&rig.store, &"node-e2e".parse::<HostName>().expect("name"));
    let started = Instant::now();
    nk(&rig.db, &["reimage", "node-e2e", "--image", image]);
    let op = store.latest_operation(host).await.expect("op").expect("op");
    let (op, phases) = follow(store, host, op.id, Duration::from_secs(900), &rig.serial).await;
    let took = started.elapsed();
    assert_eq!(
        (op.status, op.step.as_str()),
        (OperationStatus::Done, "done"),
        "{op:?}\nserve log:\n{}\nconsole:\n{}",
        std::fs::read_to_string(rig.d().join("serve.log")).unwrap_or_default(),
        tail(&rig.console(), 60)
    );
    assert!(rig.console().contains("nodekeeper deploy ramdisk"), "the deploy ramdisk ran");
    // Where the agent's time went (its last `verified:` line on the console).
    if let Some(line) = rig.console().lines().rev().find(|l| l.contains("nodekeeper-deploy: verified:")) {
        eprintln!("reimage e2e: {}", line.trim());
    }
    // The provisioner has the report before the guest's console shows it printed.
    let mut reported = false;
    for _ in 0..120 {
        reported = rig.console().contains("nodekeeper-firstboot: reported up");
        if reported {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(reported, "the node's first boot reported in, and said so on its console");
    // Its guard came up with the node token the first boot made (and libvirtd with it): the
    // guard's converge pass reports the node's libvirt through the guard API.
    let mut guard_up = false;
    for _ in 0..360 {
        let reports = store.guard_reports().await.expect("reports");
        if reports.iter().any(|r| &r.host == host && r.at > op.created_at) {
            guard_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(guard_up, "no report from the node's guard; console:\n{}", tail(&rig.console(), 60));
    let h = store.require_host(host).await.expect("host");
    assert_eq!((h.state, h.image.as_deref()), (HostState::Active, Some(image)));
    assert!(h.last_heartbeat.is_some_and(|t| t > op.created_at));
    (op, phases, took)
}

/// Real servers: UEFI with Secure Boot enforcing (OVMF with Microsoft's keys), an Intel
/// e1000e NIC, two disks — a small NVMe and a larger SATA one — and a root-device hint naming
/// the SATA disk by serial. The reimage PXE-boots through Debian's signed shim and GRUB, the
/// deploy ramdisk loads its drivers by modalias, writes the hinted disk and nothing else, and
/// the node boots its image (shim → GRUB → kernel, all signed) with Secure Boot on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_boot_server_with_two_disks_is_reimaged_onto_the_hinted_one() {
    // NVMe 2 GiB (NK-NVME-1), SATA 3 GiB (NK-SATA-2, named by the hint).
    let hw = Hardware::server(Firmware::UefiSecureBoot);
    let Some(rig) = start("52:54:00:e2:e0:02", &hw).await else { return };
    let (op, phases, took) = reimage_to_guard(&rig).await;
    let console = rig.console();
    assert!(console.contains("Welcome to GRUB"), "booted through GRUB");
    assert!(
        console.contains("nodekeeper-firstboot: booted by uefi-secureboot firmware"),
        "the node booted its image with Secure Boot on:\n{}",
        tail(&console, 80)
    );
    let events = rig
        .store
        .events(&EventFilter { host: Some("node-e2e".parse().expect("name")), limit: Some(200), ..Default::default() })
        .await
        .expect("events");
    assert!(
        events.iter().any(|e| e.kind == "reimage.report" && e.message.contains("(uefi-secureboot)")),
        "the first boot's report says how it booted: {:?}",
        events.iter().map(|e| &e.message).collect::<Vec<_>>()
    );
    // The SATA disk holds the image (a GPT), the NVMe disk was never written.
    let mut head = vec![0u8; 1024];
    std::io::Read::read_exact(&mut std::fs::File::open(&rig.disks[1]).expect("sata"), &mut head).expect("read");
    assert_eq!(&head[512..520], b"EFI PART", "the hinted SATA disk has the image's GPT");
    let mut nvme = std::fs::File::open(&rig.disks[0]).expect("nvme");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut nvme, &mut buf).expect("read nvme");
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == 0), "the NVMe disk (not hinted) is untouched");
    }
    eprintln!(
        "reimage e2e (UEFI Secure Boot, e1000e, NVMe + SATA, hint serial=NK-SATA-2): {} MiB image, empty disk to done \
         in {:.0} s under TCG (operation {}):\n  {}",
        rig.node_len >> 20,
        took.as_secs_f64(),
        op.id,
        phases.join("\n  ")
    );
}

/// UEFI HTTP boot (Ironic's `http` boot interface): the BMC is told `UefiHttp`, the
/// firmware's PXE is off, and no TFTP server runs at all. The firmware's DHCP (vendor class
/// HTTPClient) gets iPXE's URL, loads it over HTTP, and iPXE goes on as on the PXE path. The
/// NIC is virtio without QEMU's iPXE option ROM (which would boot by itself, as iPXE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uefi_server_is_reimaged_over_uefi_http_boot_with_no_tftp_server() {
    // virtio without its iPXE option ROM: OVMF's own driver, so the firmware boots, not iPXE.
    let hw = Hardware {
        boot: BootPath::Http,
        nic: "virtio".into(),
        disks: nodekeeper_lab::hw::parse_disks("sata:3G").expect("disks"),
        ..Hardware::server(Firmware::Uefi)
    };
    let Some(rig) = start("52:54:00:e2:e0:03", &hw).await else { return };
    let udp = Lab::run(&rig.server, 5, "ss", &["-Hulnp"]);
    let udp = String::from_utf8_lossy(&udp.stdout).into_owned();
    assert!(!udp.contains(":69 "), "no TFTP server listens: {udp}");
    let (op, phases, took) = reimage_to_guard(&rig).await;
    let log = std::fs::read_to_string(rig.d().join("serve.log")).unwrap_or_default();
    let metrics = Lab::run(&rig.server, 5, "curl", &["-sf", "http://10.20.0.1:8080/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        metrics.lines().any(|l| l.contains("route=\"/boot/loaders/{*path}\",code=\"200\"")),
        "the firmware fetched its loader over HTTP:\n{metrics}\n{log}"
    );
    let data: nodekeeper_provisioner::reimage::machine::ReimageData =
        serde_json::from_str(&op.data).expect("reimage data");
    assert_eq!(data.boot_path, BootPath::Http);
    eprintln!(
        "reimage e2e over UEFI HTTP boot (UEFI, virtio, SATA, no TFTP): {} MiB image, empty disk to done in {:.0} s \
         under TCG (operation {}):\n  {}",
        rig.node_len >> 20,
        took.as_secs_f64(),
        op.id,
        phases.join("\n  ")
    );
}

/// Redfish virtual media (Ironic's `redfish-virtual-media`) through sushy-tools, with no
/// DHCP of ours on the node's network: the BMC inserts this boot's ISO and boots its CD once;
/// shim → GRUB from the ISO → the deploy ramdisk with the host's fixed address from the ISO;
/// the node's own first boot takes that address from the site's DHCP server (dnsmasq). The
/// ISO is ejected at the end — and after a failed reimage too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uefi_server_is_reimaged_over_virtual_media_with_no_dhcp_of_ours() {
    let hw = Hardware {
        boot: BootPath::VirtualMedia,
        disks: nodekeeper_lab::hw::parse_disks("sata:3G").expect("disks"),
        ..Hardware::server(Firmware::Uefi)
    };
    let Some(rig) = start("52:54:00:e2:e0:04", &hw).await else { return };
    let udp = Lab::run(&rig.server, 5, "ss", &["-Hulnp"]);
    let udp = String::from_utf8_lossy(&udp.stdout).into_owned();
    assert!(!udp.contains(":67 ") && !udp.contains(":69 "), "no DHCP and no TFTP of ours: {udp}");
    let cdrom = || {
        let out = Command::new("virsh").args(["dumpxml", "--inactive", &rig.domain.0]).output().expect("virsh");
        let xml = String::from_utf8_lossy(&out.stdout).into_owned();
        xml.split("<disk ").filter(|d| d.contains("device='cdrom'") && d.contains("<source file=")).count()
    };
    let (op, phases, took) = reimage_to_guard(&rig).await;
    let console = rig.console();
    assert!(
        console.contains(&format!("nodekeeper deploy ramdisk: address {FIXED_IP}/24 (from the boot's parameters)")),
        "the agent took its address from the ISO:\n{}",
        tail(&console, 80)
    );
    let data: nodekeeper_provisioner::reimage::machine::ReimageData =
        serde_json::from_str(&op.data).expect("reimage data");
    assert_eq!(data.boot_path, BootPath::VirtualMedia);
    assert_eq!(cdrom(), 0, "the ISO is ejected");
    assert!(rig.store.hosts_with_media().await.expect("media").is_empty());
    assert_eq!(std::fs::read_dir(rig.d().join("vmedia")).map(|d| d.count()).unwrap_or(0), 0, "and deleted");
    let h = rig.store.require_host(&"node-e2e".parse().expect("name")).await.expect("host");
    assert_eq!(h.ip.map(|i| i.to_string()).as_deref(), Some(FIXED_IP));
    eprintln!(
        "reimage e2e over virtual media (UEFI, e1000e, SATA, no DHCP or TFTP of ours): {} MiB image, empty disk to \
         done in {:.0} s under TCG (operation {}):\n  {}",
        rig.node_len >> 20,
        took.as_secs_f64(),
        op.id,
        phases.join("\n  ")
    );

    // A reimage that fails (a hint no disk matches): the ISO is ejected all the same.
    nk(&rig.db, &["host", "set", "node-e2e", "--root-device", "serial=NO-SUCH-DISK"]);
    nk(&rig.db, &["reimage", "node-e2e"]);
    let host: HostName = "node-e2e".parse().expect("name");
    let op = rig.store.latest_operation(&host).await.expect("op").expect("op");
    let mut inserted = false;
    let (op, _) = {
        let started = Instant::now();
        loop {
            inserted |= cdrom() == 1;
            let o = rig.store.operation(op.id).await.expect("op").expect("op");
            if o.status != OperationStatus::Running || started.elapsed() > Duration::from_secs(600) {
                break (o, ());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    assert!(inserted, "the second reimage inserted its ISO");
    assert_eq!(op.status, OperationStatus::Failed, "{op:?}\n{}", tail(&rig.console(), 40));
    assert!(op.last_error.as_deref().unwrap_or_default().contains("NO-SUCH-DISK"), "{op:?}");
    assert_eq!(cdrom(), 0, "ejected after the failed reimage too");
    assert!(rig.store.hosts_with_media().await.expect("media").is_empty());
}

/// The figures of docs/performance.md: three reimages each on BIOS, UEFI and UEFI with Secure
/// Boot over PXE, and UEFI over UEFI HTTP boot and over virtual media, of the same node
/// otherwise (e1000e, one SATA disk), with each phase's time. Not in `make test` (fifteen TCG
/// reimages, ~30 min; `NODEKEEPER_FIGURES=uefi/pxe,uefi/http` picks some):
/// `cargo nextest run -p nodekeeper-provisioner --run-ignored only -E 'test(reimage_figures)' --no-capture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures: fifteen reimages under TCG, ~30 min"]
async fn reimage_figures() {
    let mut table = vec![
        "| firmware | boot | image | run | agent_booted | image_written | verified | local_boot | heartbeat | total |"
            .to_owned(),
    ];
    table.push("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into());
    // NODEKEEPER_FIGURES_IMAGES=node.img,node: the raw file and/or the catalogue's (default: the catalogue's).
    let images = std::env::var("NODEKEEPER_FIGURES_IMAGES").unwrap_or_else(|_| CATALOGUED.into());
    let paths = [
        (Firmware::Bios, BootPath::Pxe),
        (Firmware::Uefi, BootPath::Pxe),
        (Firmware::UefiSecureBoot, BootPath::Pxe),
        (Firmware::Uefi, BootPath::Http),
        (Firmware::Uefi, BootPath::VirtualMedia),
    ];
    // NODEKEEPER_FIGURES=uefi/pxe,uefi/http runs only those (firmware/path, as host add spells them).
    let only = std::env::var("NODEKEEPER_FIGURES").unwrap_or_default();
    let wanted = |f: Firmware, b: BootPath| {
        only.is_empty() || only.split(',').any(|w| w.trim() == format!("{}/{b}", f.boot_mode()))
    };
    for (firmware, boot) in paths.into_iter().filter(|(f, b)| wanted(*f, *b)) {
        // HTTP boot: virtio without QEMU's iPXE option ROM (see above).
        let nic = if boot == BootPath::Http { "virtio" } else { "e1000e" };
        let hw = Hardware {
            firmware,
            nic: nic.into(),
            disks: nodekeeper_lab::hw::parse_disks("sata:3G").expect("disks"),
            boot,
        };
        let Some(rig) = start("52:54:00:e2:e0:03", &hw).await else { return };
        for (image, run) in images.split(',').flat_map(|i| (1..=3).map(move |run| (i.trim(), run))) {
            let (_, phases, took) = reimage_with(&rig, image).await;
            let secs = |step: &str| {
                phases
                    .iter()
                    .find(|p| p.starts_with(step))
                    .and_then(|p| p.split_whitespace().nth(1))
                    .unwrap_or("-")
                    .to_owned()
            };
            table.push(format!(
                "| {firmware} | {boot} | {image} | {run} | {} s | {} s | {} s | {} s | {} s | {:.0} s |",
                secs("agent_booted"),
                secs("image_written"),
                secs("verified"),
                secs("local_boot"),
                secs("heartbeat"),
                took.as_secs_f64()
            ));
            eprintln!("{}", table.last().map(String::as_str).unwrap_or_default());
        }
    }
    eprintln!("reimage figures (TCG, 1 vCPU, e1000e (HTTP boot: virtio), SATA 3 GiB):\n{}", table.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_an_empty_disk_is_reimaged_through_sushy_tools_and_boots_its_image() {
    let Some(rig) = start(MAC, &Hardware::virtio_bios()).await else { return };
    let (store, db, serial, domain, node_len) = (&rig.store, &rig.db, &rig.serial, &rig.domain, rig.node_len);
    let (server, d, disk) = (&rig.server, rig.d(), &rig.disks[0]);
    let host: HostName = "node-e2e".parse().expect("name");
    let (_, phases, took) = reimage_to_guard(&rig).await;
    let mut written = vec![0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(disk).expect("disk"), &mut written).expect("mbr");
    assert_eq!(&written[510..], &[0x55, 0xaa], "the disk has its boot sector");
    eprintln!(
        "reimage e2e: {} MiB image, empty disk to done in {:.0} s under TCG:\n  {}",
        node_len >> 20,
        took.as_secs_f64(),
        phases.join("\n  ")
    );

    // The guard-boot part of a failover. An HA instance assigned to the node: its guard
    // defines and starts it (a 32 MiB TCG domain with no disk, nested in the TCG node).
    // node-other stands for a second compute node: the test heartbeats for it (a double: one
    // QEMU node is what CI affords; `make lab-test` runs two).
    nk(db, &["host", "add", "node-other"]);
    let other: HostName = "node-other".parse().expect("name");
    let beats = {
        let (store, other) = (store.clone(), other.clone());
        tokio::spawn(async move {
            loop {
                let _ = store.record_heartbeat(&other).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let inst = nodekeeper_store::InstanceId::random();
    let line = serde_json::json!({
        "uuid": inst.to_string(), "name": format!("nk-e2e-vm-{}", &inst.to_string()[..8]), "host": "node-e2e",
        "ha": true, "storage": "shared",
        "domain_xml": format!("<domain type='qemu'><name>nk-e2e-vm-{}</name><uuid>{inst}</uuid>\
            <memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os><devices/></domain>", &inst.to_string()[..8]),
    });
    std::fs::write(d.join("instances.jsonl"), format!("{line}\n")).expect("jsonl");
    nk(db, &["instance", "import", &d.join("instances.jsonl").display().to_string()]);
    let running_on = |store: Store, host: HostName, after: Timestamp| async move {
        let reports = store.guard_reports().await.expect("reports");
        reports
            .iter()
            .find(|r| r.host == host && r.at > after)
            .map(|r| r.domains.iter().any(|d| d.uuid == inst && d.running))
    };
    let t0 = Timestamp::now();
    let limit = Instant::now();
    while running_on(store.clone(), host.clone(), t0).await != Some(true) {
        let console = std::fs::read_to_string(serial).unwrap_or_default();
        assert!(
            limit.elapsed() < Duration::from_secs(300),
            "the node's guard never ran the instance:\n{}",
            tail(&console, 60)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ran = limit.elapsed();

    // The node crashes (its QEMU process is killed: power lost, no shutdown). The controller
    // in serve: silent past grace (30 s) → suspect → fenced through sushy-tools → the instance
    // moves to node-other (generation 2) → the node is powered on again.
    let crash = Instant::now();
    let out = Command::new("virsh").args(["-q", "destroy", &domain.0]).output().expect("virsh");
    assert!(out.status.success(), "virsh destroy: {}", String::from_utf8_lossy(&out.stderr));
    loop {
        let i = store.instance(inst).await.expect("get").expect("instance");
        if i.owner == other {
            assert_eq!(i.generation, nodekeeper_store::Generation(2));
            break;
        }
        assert!(crash.elapsed() < Duration::from_secs(180), "not recovered: {i:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let recovered = crash.elapsed();
    let fence = store.latest_operation(&host).await.expect("op").expect("a fence");
    assert_eq!(fence.kind, "fence");

    // Back from the fence: at boot, before libvirtd, its guard quarantines the stale definition
    // (through the guard API), and the instance does not run on the node again.
    let back = Instant::now();
    let quarantined = loop {
        let filter = EventFilter { instance: Some(inst), limit: Some(100), ..Default::default() };
        let found = store
            .events(&filter)
            .await
            .expect("events")
            .into_iter()
            .find(|e| e.kind == "instance.quarantined" && e.actor == "guard:node-e2e");
        if let Some(e) = found {
            break e;
        }
        let console = std::fs::read_to_string(serial).unwrap_or_default();
        assert!(back.elapsed() < Duration::from_secs(400), "no quarantine after the fence:\n{}", tail(&console, 60));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let quarantine_took = back.elapsed();
    let t1 = Timestamp::now();
    while running_on(store.clone(), host.clone(), t1).await.is_none() {
        assert!(back.elapsed() < Duration::from_secs(600), "the node's guard never reported after its reboot");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        running_on(store.clone(), host.clone(), t1).await,
        Some(false),
        "the stale copy is not defined or running"
    );
    loop {
        let h = store.require_host(&host).await.expect("host");
        if h.state == HostState::Active {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(600), "the node is not active again: {h:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    beats.abort();
    eprintln!(
        "failover e2e: guard ran the instance {:.0} s after import; crash to recovered on node-other {:.0} s \
         (grace 30 s); power-on to quarantine {:.0} s ({})",
        ran.as_secs_f64(),
        recovered.as_secs_f64(),
        quarantine_took.as_secs_f64(),
        quarantined.message
    );

    // A corrupted image: its ETag names the good bytes, one byte rots after the digest.
    let bad = d.join("images/bad.img");
    let mut bytes: Vec<u8> = (0..16_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    std::fs::write(&bad, &bytes).expect("bad image");
    let head = Lab::run(server, 30, "curl", &["-sfI", "http://10.20.0.1:8080/images/bad.img"]);
    assert!(head.status.success(), "the provisioner digests the good bytes first");
    let mtime = std::fs::metadata(&bad).and_then(|m| m.modified()).expect("mtime");
    bytes[8_000_000] ^= 0xff;
    std::fs::write(&bad, &bytes).expect("rot");
    std::fs::File::options().write(true).open(&bad).and_then(|f| f.set_modified(mtime)).expect("mtime");
    nk(db, &["reimage", "node-e2e", "--image", "bad.img"]);
    let op = store.latest_operation(&host).await.expect("op").expect("op");
    let (op, _) = follow(store, &host, op.id, Duration::from_secs(600), serial).await;
    assert_eq!((op.status, op.step.as_str()), (OperationStatus::Failed, "verified"), "{op:?}");
    assert!(op.last_error.as_deref().is_some_and(|e| e.contains("sha256 mismatch")), "{op:?}");
    std::io::Read::read_exact(&mut std::fs::File::open(disk).expect("disk"), &mut written).expect("mbr");
    assert!(written.iter().all(|b| *b == 0), "the disk that booted before has no boot sector now");
    assert_eq!(store.require_host(&host).await.expect("host").state, HostState::Maintenance);
    store.close().await;
}
