//! The lab itself: the network, the provisioner, the BMC emulator and the nodes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use nodekeeper_store::{HostName, HostState, InstanceId, OperationStatus, Store, Timestamp};

use crate::net::Net;
use crate::Narrator;

/// Where things are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The repository (images, scripts).
    pub repo: PathBuf,
    /// Where `nodekeeper-provisioner` and `nodekeeper-guard` are.
    pub bin_dir: PathBuf,
    /// The BMC venv (sushy-tools).
    pub venv: PathBuf,
}

impl Paths {
    /// From the build: the binaries beside this program (or beside `deps/` for a test).
    pub fn discover() -> anyhow::Result<Paths> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut dir = exe.parent().context("no parent")?.to_owned();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let venv = PathBuf::from(std::env::var("NODEKEEPER_BMC_VENV").unwrap_or_else(|_| "/opt/nk-bmc-venv".into()));
        Ok(Paths { repo, bin_dir: dir, venv })
    }

    /// Whether this machine can run the lab; what is missing otherwise.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")) {
            missing.push("root".to_owned());
        }
        if !self.venv.join("bin/sushy-emulator").exists() {
            missing.push(format!("sushy-tools in {}", self.venv.display()));
        }
        if !Path::new("/run/libvirt/libvirt-sock").exists() {
            missing.push("a running libvirtd".to_owned());
        }
        for tool in ["virsh", "qemu-system-x86_64", "ip", "debootstrap"] {
            if !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                missing.push(tool.to_owned());
            }
        }
        missing
    }

    fn bin(&self, name: &str) -> String {
        self.bin_dir.join(name).display().to_string()
    }
}

/// One compute node: a libvirt domain with an empty disk, its MAC on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its host name (`node-a`, ...).
    pub name: HostName,
    /// The libvirt domain's name on this machine.
    pub domain: String,
    /// Its UUID (the BMC's system id).
    pub uuid: String,
    /// Its MAC.
    pub mac: String,
    /// Its serial console.
    pub serial: PathBuf,
    /// Its hardware (firmware, NIC, disks).
    pub hw: crate::hw::Hardware,
}

/// A sample of who runs what, from the guards' reports and the nodes' power.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When.
    pub at: Timestamp,
    /// Per node: powered on?
    pub on: BTreeMap<HostName, bool>,
    /// Per instance: the nodes that may be running it.
    pub running: BTreeMap<InstanceId, Vec<HostName>>,
}

/// The lab.
pub struct Lab {
    /// Where things are.
    pub paths: Paths,
    /// Its directory (database, logs, disks, consoles).
    pub dir: PathBuf,
    /// The database URL (`sqlite://…`).
    pub db_url: String,
    /// The database, for watching.
    pub store: Store,
    /// The nodes.
    pub nodes: Vec<Node>,
    net: Net,
    serve: Option<u32>,
    config: PathBuf,
    /// When each node was last seen powered off (reports older than that are void).
    off_since: BTreeMap<HostName, Timestamp>,
    _tmp: Option<tempdir::Dir>,
    /// sushy-tools' storage pool for virtual media (after the processes are gone).
    _pool: crate::hw::MediaPool,
}

mod tempdir {
    /// A directory removed on drop.
    #[derive(Debug)]
    pub(super) struct Dir(pub(super) std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The provisioner's address on the provisioning network.
pub const SERVER: &str = "http://10.20.0.1:8080";
/// The provisioner's HTTPS listener, where nodes reach its guard and deploy APIs.
pub const SERVER_TLS: &str = "https://10.20.0.1:8443";

impl Lab {
    /// Sets the lab up with `count` nodes (not installed yet): images, network, BMC emulator,
    /// database with the hosts, `serve`, the node domains with empty disks.
    pub async fn up(paths: Paths, fleet: &[crate::hw::Hardware], n: &Narrator) -> anyhow::Result<Lab> {
        let missing = paths.missing();
        anyhow::ensure!(missing.is_empty(), "the lab needs: {} (scripts/setup-test-deps.sh)", missing.join(", "));
        n.say("building the images (deploy ramdisk, node image; cached)");
        for script in ["images/deploy/build.sh", "images/node/build.sh"] {
            let out = Command::new(paths.repo.join(script)).output().with_context(|| script.to_owned())?;
            anyhow::ensure!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        }
        for bin in ["nodekeeper-provisioner", "nodekeeper-guard"] {
            anyhow::ensure!(paths.bin_dir.join(bin).exists(), "{} missing: cargo build first", paths.bin(bin));
        }
        // Under target/ (the images' file system: hard links, not copies), readable by QEMU.
        let tag = format!("{}", std::process::id() % 100_000);
        let dir = paths.repo.join("target/lab").join(&tag);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["images/deploy", "tftp", "disks"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        for d in [dir.parent().unwrap_or(&dir), &dir, &dir.join("disks")] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let tmp = tempdir::Dir(dir.clone());
        for (from, to) in [
            ("images/deploy/out/vmlinuz", "images/deploy/vmlinuz"),
            ("images/deploy/out/initrd.img", "images/deploy/initrd.img"),
            ("images/node/out/node.img", "images/node.img"),
            // Secure Boot hosts PXE-boot Debian's signed shim, which loads the network GRUB.
            ("images/node/out/efi/shimx64.efi", "tftp/shimx64.efi"),
            ("images/node/out/efi/grubnetx64.efi", "tftp/grubx64.efi"),
            // Virtual media's ISOs: shim → the CD GRUB (UEFI), ISOLINUX (BIOS).
            ("images/node/out/efi/grubcdx64.efi", "tftp/grubcdx64.efi"),
            ("/usr/lib/ISOLINUX/isolinux.bin", "tftp/isolinux.bin"),
            ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "tftp/ldlinux.c32"),
            // What a firmware's own PXE or HTTP boot loads (QEMU's NICs carry iPXE in their
            // option ROM, which boots first where it is left in).
            ("/usr/lib/ipxe/undionly.kpxe", "tftp/undionly.kpxe"),
            ("/usr/lib/ipxe/ipxe.efi", "tftp/ipxe.efi"),
            ("/usr/lib/ipxe/snponly.efi", "tftp/snponly.efi"),
        ] {
            let (from, to) = (paths.repo.join(from), dir.join(to));
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
            }
        }

        n.say("provisioning network: namespace with br0 10.20.0.1/24, bridged to the nodes' NICs");
        let mut net = Net::new(&tag)?;
        let bmc_port = 8000;
        let pool = crate::hw::MediaPool::new(&dir, &tag)?;
        net.spawn(
            &paths.venv.join("bin/sushy-emulator").display().to_string(),
            &[
                "--libvirt-uri",
                "qemu:///system",
                "-i",
                "127.0.0.1",
                "-p",
                &bmc_port.to_string(),
                "--config",
                &pool.config.display().to_string(),
            ],
            &dir.join("sushy.log"),
        )?;
        // A fleet on virtual media only: no DHCP of ours. The nodes have fixed addresses; the
        // site's DHCP server (dnsmasq, standing in for it) gives each its own when the
        // installed system asks.
        let virtual_media = fleet.iter().all(|h| h.boot == crate::hw::BootPath::VirtualMedia);
        let fixed_ip = |i: usize| format!("10.20.0.{}", 40 + i);
        if virtual_media {
            let mut args = vec![
                "--no-daemon".to_owned(),
                "--port=0".into(),
                "--conf-file=/dev/null".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--interface=br0".into(),
                "--bind-interfaces".into(),
                "--dhcp-range=10.20.0.150,10.20.0.199,1h".into(),
                format!("--dhcp-leasefile={}", dir.join("site-dhcp.leases").display()),
            ];
            args.extend(
                (0..fleet.len()).map(|i| format!("--dhcp-host=52:54:00:6e:6b:{:02x},{}", 0x0a + i, fixed_ip(i))),
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            net.spawn("dnsmasq", &args, &dir.join("site-dhcp.log"))?;
            n.say("no DHCP of ours: the site's DHCP server (dnsmasq) gives the installed nodes their fixed addresses");
        }

        let db_url = format!("sqlite://{}/nodekeeper.db", dir.display());
        let nk = |args: &[&str]| nk(&paths, &db_url, args);
        nk(&["db", "migrate"])?;

        let mut nodes = Vec::new();
        // Domains defined so far, undefined if the lab is dropped before it owns them (an
        // error, or SIGTERM, half-way through setting up).
        let mut defined = Defined(Vec::new());
        for (i, hw) in fleet.iter().enumerate() {
            let letter = (b'a' + u8::try_from(i).context("too many nodes")?) as char;
            let uuid = uuid::Uuid::new_v4().to_string();
            let node = Node {
                name: format!("node-{letter}").parse()?,
                domain: format!("nk-lab{tag}-node-{letter}"),
                uuid: uuid.clone(),
                mac: format!("52:54:00:6e:6b:{:02x}", 0x0a + i),
                serial: dir.join(format!("node-{letter}.console")),
                hw: hw.clone(),
            };
            // 1.5 GiB for the node and its nested instances; a watchdog the guard arms.
            let domain = crate::hw::Domain {
                name: &node.domain,
                uuid: &node.uuid,
                mac: &node.mac,
                bridge: &net.bridge,
                serial: &node.serial,
                memory_mib: 1536,
                watchdog: true,
                dir: &dir.join("disks"),
            };
            let (xml, _) = hw.domain_xml(&domain)?;
            let path = dir.join(format!("{}.xml", node.domain));
            std::fs::write(&path, xml)?;
            virsh(&["define", &path.display().to_string()])?;
            defined.0.push(node.domain.clone());
            let bmc = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{uuid}");
            let mut add = vec!["host", "add", node.name.as_str(), "--mac", &node.mac, "--bmc", &bmc];
            let hw_args = hw.host_args();
            add.extend(hw_args.iter().map(String::as_str));
            let ip = fixed_ip(i);
            if hw.boot == crate::hw::BootPath::VirtualMedia {
                add.extend(["--ip", ip.as_str()]);
            }
            nk(&add)?;
            n.say(&format!("{}: {} (1 vCPU, 1.5 GiB, i6300esb watchdog)", node.name, hw.describe()));
            nodes.push(node);
        }
        let count = if nodes.len() == 1 { "1 node".to_owned() } else { format!("{} nodes", nodes.len()) };
        n.say(&format!("{count} defined, each with a Redfish BMC (sushy-tools)"));

        let config = dir.join("provisioner.toml");
        std::fs::write(
            &config,
            format!(
                "database_url = \"{db_url}\"\n{dhcp}[virtual_media]\ndir = \"{d}/vmedia\"\n\
                 [tftp]\n{tftp_listen}root = \"{d}/tftp\"\n\
                 [http]\nlisten = \"10.20.0.1:8080\"\npublic_url = \"{SERVER}\"\nimages_dir = \"{d}/images\"\n\
                 deploy_kernel_args = \"console=ttyS0 quiet panic=-1\"\n\
                 [http.tls]\nlisten = \"10.20.0.1:8443\"\npublic_url = \"{SERVER_TLS}\"\ncert = \"{d}/tls/server.pem\"\n\
                 key = \"{d}/tls/server.key\"\nca = \"{d}/tls/ca.pem\"\nrequire = true\n",
                d = dir.display(),
                // A fleet that boots over UEFI HTTP only: no TFTP server at all.
                tftp_listen = if fleet.iter().any(|h| h.boot == crate::hw::BootPath::Pxe) {
                    "listen = \"10.20.0.1:69\"\n"
                } else {
                    ""
                },
                dhcp = if virtual_media {
                    "[dhcp]\nmode = \"off\"\n"
                } else {
                    "[dhcp]\nmode = \"full\"\ninterface = \"br0\"\nserver_ip = \"10.20.0.1\"\n\
                     subnet = \"10.20.0.0/24\"\nrange = [\"10.20.0.100\", \"10.20.0.199\"]\n"
                },
            ),
        )?;
        // The node APIs answer only over TLS: agents, first boots and guards trust the CA the
        // deploy carries to them.
        nk(&["tls", "init", "--config", &config.display().to_string()])?;
        // The node image goes into the catalogue: served zstd-compressed (221 of 1056 MiB),
        // written zero-aware. `image add` records its digest: no first request digests it.
        let (images_dir, node_img) = (dir.join("images"), dir.join("images/node.img"));
        nk(&[
            "image",
            "add",
            NODE_IMAGE,
            &node_img.display().to_string(),
            "--images-dir",
            &images_dir.display().to_string(),
        ])?;
        let store = Store::connect(&db_url).await?;
        defined.0.clear(); // the lab owns them now
        let mut lab = Lab {
            paths,
            dir,
            db_url,
            store,
            nodes,
            net,
            serve: None,
            config,
            off_since: BTreeMap::new(),
            _tmp: Some(tmp),
            _pool: pool,
        };
        lab.start_serve()?;
        n.wait("serve answering", Duration::from_secs(60), async || {
            let out = lab.net.run(3, "curl", &["-sf", "-o", "/dev/null", &format!("{SERVER}/healthz")])?;
            Ok(out.status.success().then_some(()))
        })
        .await?;
        let pxe = fleet.iter().any(|h| h.boot == crate::hw::BootPath::Pxe);
        let servers = match (virtual_media, pxe) {
            (true, _) => "HTTP",
            (false, true) => "DHCP, TFTP, HTTP",
            (false, false) => "DHCP, HTTP (no TFTP)",
        };
        n.say(&format!(
            "nodekeeper-provisioner serve: {servers}, HTTPS (node APIs TLS-only) and the recovery controller, on the \
             embedded SQLite"
        ));
        Ok(lab)
    }

    /// Keeps the lab's directory (logs, consoles) when it goes.
    pub fn keep(&mut self) -> &Path {
        if let Some(mut t) = self._tmp.take() {
            t.0 = PathBuf::new();
        }
        &self.dir
    }

    /// Runs the provisioner's CLI against the lab's database.
    pub fn nk(&self, args: &[&str]) -> anyhow::Result<String> {
        nk(&self.paths, &self.db_url, args)
    }

    /// Starts `serve` (again).
    pub fn start_serve(&mut self) -> anyhow::Result<()> {
        if self.serve.is_none() {
            let (bin, config) = (self.paths.bin("nodekeeper-provisioner"), self.config.display().to_string());
            self.serve = Some(self.net.spawn(&bin, &["serve", "--config", &config], &self.dir.join("serve.log"))?);
        }
        Ok(())
    }

    /// Stops `serve`: the nodes' guards lose the database (they reach it through it).
    pub fn stop_serve(&mut self) {
        if let Some(pid) = self.serve.take() {
            self.net.stop(pid);
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name.as_str() == name).unwrap_or(&self.nodes[0])
    }

    /// Reimages every node at once and waits until each is `active` with its guard reporting.
    /// Returns the phases of each node's install (step, seconds).
    pub async fn install(&self, n: &Narrator) -> anyhow::Result<Vec<(String, Duration)>> {
        for node in &self.nodes {
            self.nk(&["reimage", node.name.as_str(), "--image", NODE_IMAGE])?;
        }
        let how = |path: crate::hw::BootPath| match path {
            crate::hw::BootPath::Pxe => "PXE boot once, power on → DHCP → iPXE (Secure Boot: shim → GRUB)",
            crate::hw::BootPath::Http => "UEFI HTTP boot once, power on → DHCP (HTTPClient) → iPXE over HTTP",
            crate::hw::BootPath::VirtualMedia => "this boot's ISO inserted, CD once, power on → shim → GRUB",
        };
        let mut paths: Vec<&str> = self.nodes.iter().map(|n| how(n.hw.boot)).collect();
        paths.dedup();
        n.say(&format!(
            "reimaging {}: power off, {} → deploy ramdisk → node image → powered on into its disk",
            self.names(),
            paths.join("; ")
        ));
        let start = std::time::Instant::now();
        let mut phases = Vec::new();
        let mut installed = BTreeMap::new();
        for node in &self.nodes {
            let (op, _) = n
                .wait(&format!("{} installing", node.name), Duration::from_secs(1200), async || {
                    let op = self.store.latest_operation(&node.name).await?.context("no operation")?;
                    Ok((op.status != OperationStatus::Running).then_some(op))
                })
                .await
                .with_context(|| self.console_tail(node))?;
            anyhow::ensure!(
                op.status == OperationStatus::Done,
                "{}: reimage {:?} at {}: {:?}\n{}",
                node.name,
                op.status,
                op.step,
                op.last_error,
                self.console_tail(node)
            );
            // From the operation's own times: the nodes install side by side.
            let took = Duration::from_millis(u64::try_from(op.updated_at.0 - op.created_at.0).unwrap_or(0));
            n.say(&format!("{} installed: its first boot from disk reported in ({})", node.name, crate::fmt(took)));
            phases.push((format!("{}: install (network or CD boot → image written → first boot)", node.name), took));
            installed.insert(node.name.clone(), op.updated_at);
        }
        for node in &self.nodes {
            let done = installed[&node.name];
            let (at, _) = n
                .wait(&format!("{}'s guard reporting", node.name), Duration::from_secs(300), async || {
                    Ok(self.report(&node.name).await?.filter(|r| r.0 > done).map(|r| r.0))
                })
                .await
                .with_context(|| self.console_tail(node))?;
            let console = std::fs::read_to_string(&node.serial).unwrap_or_default();
            let watchdog = if console.contains("nodekeeper-firstboot: watchdog: hardware_watchdog") {
                "; first boot set its guard to arm /dev/watchdog"
            } else {
                "; no watchdog device found"
            };
            n.say(&format!(
                "{}: guard up, heartbeating and reporting its libvirt through the guard API with its node token{watchdog}",
                node.name
            ));
            let took = Duration::from_millis(u64::try_from(at.0 - done.0).unwrap_or(0));
            phases.push((format!("{}: first boot → guard reporting", node.name), took));
        }
        n.say(&format!("{} installed in {}", self.names(), crate::fmt(start.elapsed())));
        Ok(phases)
    }

    /// Per installed node: name, hardware, boot path, target disk (checked: the image's GPT
    /// is on it, every other disk is still empty at its start), and how its image booted (its
    /// first boot's word, from its console).
    pub fn node_rows(&self) -> anyhow::Result<Vec<[String; 5]>> {
        self.nodes
            .iter()
            .map(|node| {
                let disks = self.dir.join("disks");
                let mut target = None;
                for (i, disk) in node.hw.disks.iter().enumerate() {
                    let file = disks.join(format!("{}-disk{i}.raw", node.domain));
                    let mut head = vec![0u8; 1 << 20];
                    std::io::Read::read_exact(&mut std::fs::File::open(&file)?, &mut head)
                        .with_context(|| format!("reading {}", file.display()))?;
                    if &head[512..520] == b"EFI PART" {
                        anyhow::ensure!(target.is_none(), "{}: the image is on two disks", node.name);
                        target = Some(disk);
                    } else {
                        anyhow::ensure!(
                            head.iter().all(|b| *b == 0),
                            "{}: disk {} was written",
                            node.name,
                            disk.serial
                        );
                    }
                }
                let target = target.with_context(|| format!("{}: no disk holds the image", node.name))?;
                let hinted = if node.hw.disks.len() > 1 { ", by hint" } else { "" };
                let console = std::fs::read_to_string(&node.serial).unwrap_or_default();
                let booted = console
                    .lines()
                    .filter_map(|l| l.split("nodekeeper-firstboot: booted by ").nth(1))
                    .next()
                    .map_or("?".to_owned(), |w| w.trim_end_matches(" firmware").trim().to_owned());
                let path = match (node.hw.boot, node.hw.firmware) {
                    (crate::hw::BootPath::VirtualMedia, crate::hw::Firmware::Bios) => "virtual CD → ISOLINUX",
                    (crate::hw::BootPath::VirtualMedia, _) => "virtual CD → shim → GRUB",
                    (crate::hw::BootPath::Http, crate::hw::Firmware::UefiSecureBoot) => "HttpBootUri ISO → shim → GRUB",
                    (crate::hw::BootPath::Http, _) => "UEFI HTTP → ipxe.efi → HTTP",
                    (_, crate::hw::Firmware::UefiSecureBoot) => "PXE → shim → GRUB (TFTP)",
                    (_, crate::hw::Firmware::Uefi) => "PXE → ipxe.efi → HTTP",
                    (_, crate::hw::Firmware::Bios) => "PXE → undionly.kpxe → HTTP",
                };
                Ok([
                    node.name.to_string(),
                    node.hw.describe(),
                    path.to_owned(),
                    format!("{} {}G {}{hinted}", format!("{:?}", target.bus).to_lowercase(), target.gib, target.serial),
                    booted,
                ])
            })
            .collect()
    }

    fn names(&self) -> String {
        self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The last 40 lines of a node's console.
    pub fn console_tail(&self, node: &Node) -> String {
        let text = std::fs::read_to_string(&node.serial).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("{} console:\n{}", node.name, lines[lines.len().saturating_sub(40)..].join("\n"))
    }

    /// A node's last guard report: (when, running instances).
    pub async fn report(&self, host: &HostName) -> anyhow::Result<Option<(Timestamp, Vec<InstanceId>)>> {
        let reports = self.store.guard_reports().await?;
        Ok(reports
            .into_iter()
            .find(|r| &r.host == host)
            .map(|r| (r.at, r.domains.iter().filter(|d| d.running).map(|d| d.uuid).collect())))
    }

    /// Whether a node's domain is running (its "power").
    pub fn powered(&self, node: &Node) -> bool {
        Command::new("virsh")
            .args(["-q", "domstate", &node.domain])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "running")
    }

    /// Cuts a node off the provisioning network (its NIC's link goes down in the root
    /// namespace); its BMC stays reachable, as an out-of-band BMC does.
    pub fn cut_network(&self, node: &Node) -> anyhow::Result<()> {
        let out = virsh(&["domiflist", &node.domain])?;
        let tap = out
            .lines()
            .find(|l| l.contains(&node.mac))
            .and_then(|l| l.split_whitespace().next())
            .context("the node's tap device")?
            .to_owned();
        let done = Command::new("ip").args(["link", "set", &tap, "down"]).output()?;
        anyhow::ensure!(done.status.success(), "ip link set {tap} down: {}", String::from_utf8_lossy(&done.stderr));
        Ok(())
    }

    /// Who may run what now, from the guards' reports and the nodes' power: a powered-off
    /// node runs nothing; a report older than the node's last power-off is void (a node
    /// starts with nothing running, and only its guard starts instances); otherwise the last
    /// report counts, fresh or not (a node cut off keeps running what it last reported until
    /// it is powered off or reports otherwise).
    pub async fn sample(&mut self) -> anyhow::Result<Sample> {
        let at = Timestamp::now();
        let mut s = Sample { at, on: BTreeMap::new(), running: BTreeMap::new() };
        for node in self.nodes.clone() {
            let on = self.powered(&node);
            s.on.insert(node.name.clone(), on);
            if !on {
                self.off_since.insert(node.name.clone(), at);
                continue;
            }
            let Some((when, running)) = self.report(&node.name).await? else { continue };
            if self.off_since.get(&node.name).is_some_and(|off| when <= *off) {
                continue;
            }
            for id in running {
                s.running.entry(id).or_default().push(node.name.clone());
            }
        }
        Ok(s)
    }

    /// The host's state.
    pub async fn state(&self, host: &HostName) -> anyhow::Result<HostState> {
        Ok(self.store.require_host(host).await?.state)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_serve();
        drop(Defined(self.nodes.iter().map(|n| n.domain.clone()).collect()));
    }
}

/// libvirt domains, destroyed and undefined (with their UEFI variables) on drop.
struct Defined(Vec<String>);

impl Drop for Defined {
    fn drop(&mut self) {
        for domain in &self.0 {
            let _ = virsh(&["destroy", domain]);
            let _ = virsh(&["undefine", "--nvram", domain]);
        }
    }
}

/// Runs the provisioner's CLI against `db_url`; its stdout.
/// The node image's catalogue name.
pub const NODE_IMAGE: &str = "node";

fn nk(paths: &Paths, db_url: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(paths.bin("nodekeeper-provisioner"))
        .args(args)
        .env("NODEKEEPER_DATABASE_URL", db_url)
        .output()
        .context("nodekeeper-provisioner")?;
    anyhow::ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs virsh on the machine's libvirtd.
pub fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("virsh").arg("-q").args(args).output().context("virsh")?;
    anyhow::ensure!(out.status.success(), "virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
