//! Test hosts made of network namespaces: a server namespace with a bridge `br0`
//! (10.20.0.1/24), and peers on veth pairs to it, each with its own `eth0`. Everything is
//! removed in `Drop`, and the processes started in the namespaces are killed by id.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One lab: a server namespace and its peers.
pub struct Lab {
    pub server: String,
    peers: Vec<String>,
    children: Vec<Child>,
    /// Links made in the root namespace (removed on drop).
    root_links: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether this process may build namespaces (root with iproute2). A test that cannot run
/// says so on stderr; with NODEKEEPER_REQUIRE_NETNS=1 (make test) it fails instead.
pub fn netns_available() -> bool {
    let ok = nix_is_root() && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("NODEKEEPER_REQUIRE_NETNS").as_deref() != Ok("1"),
            "NODEKEEPER_REQUIRE_NETNS=1 but network namespaces are not available (root + iproute2)"
        );
        eprintln!("skipping: network namespaces need root and iproute2");
    }
    ok
}

pub fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"))
}

impl Lab {
    /// A fresh server namespace with `br0` at 10.20.0.1/24 and loopback up.
    pub fn new() -> Lab {
        static N: AtomicU32 = AtomicU32::new(0);
        let server = format!("nk{}x{}s", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &server]);
        let lab = Lab { server: server.clone(), peers: Vec::new(), children: Vec::new(), root_links: Vec::new() };
        ip(&["-n", &server, "link", "set", "lo", "up"]);
        ip(&["-n", &server, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &server, "addr", "add", "10.20.0.1/24", "dev", "br0"]);
        ip(&["-n", &server, "link", "set", "br0", "up"]);
        lab
    }

    /// A peer namespace whose `eth0` (with `mac`, no address) is on the bridge.
    pub fn peer(&mut self, mac: &str) -> String {
        let name = format!("{}p{}", self.server, self.peers.len());
        ip(&["netns", "add", &name]);
        self.peers.push(name.clone());
        let port = format!("vp{}", self.peers.len());
        ip(&["-n", &self.server, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &name]);
        ip(&["-n", &self.server, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "link", "set", "eth0", "address", mac]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        name
    }

    /// A DHCP server that is not ours (dnsmasq, as a site's would be) on a machine of its own
    /// on the lab's network, 10.20.0.2: addresses from `range` (`FIRST,LAST`), and the fixed
    /// ones of `fixed` (`MAC,IP`); its leases in `leases`. Returns its namespace.
    pub fn site_dhcp(&mut self, range: &str, fixed: &[String], leases: &std::path::Path) -> String {
        let ns = self.peer("52:54:00:aa:00:fe");
        let out = Self::run(&ns, 5, "ip", &["addr", "add", "10.20.0.2/24", "dev", "eth0"]);
        assert!(out.status.success(), "{out:?}");
        let mut args: Vec<String> = [
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--interface=eth0",
            "--bind-interfaces",
            "--dhcp-authoritative",
        ]
        .map(str::to_owned)
        .to_vec();
        args.push(format!("--dhcp-range={range},1h"));
        args.push(format!("--dhcp-leasefile={}", leases.display()));
        args.extend(fixed.iter().map(|h| format!("--dhcp-host={h}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&ns, "dnsmasq", &args);
        ns
    }

    /// A bridge in the root namespace, with no address and no other uplink, joined to the
    /// server's `br0` by a veth pair: for guests that libvirt (in the root namespace) plugs
    /// into the lab. Returns its name.
    pub fn root_bridge(&mut self) -> String {
        let tag = self.server.trim_start_matches("nk");
        let (bridge, veth) = (format!("nb{tag}"), format!("nv{tag}"));
        ip(&["link", "add", &bridge, "type", "bridge"]);
        self.root_links.push(bridge.clone());
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "up0", "netns", &self.server]);
        self.root_links.push(veth.clone());
        ip(&["link", "set", &veth, "master", &bridge, "up"]);
        ip(&["link", "set", &bridge, "up"]);
        ip(&["-n", &self.server, "link", "set", "up0", "master", "br0", "up"]);
        bridge
    }

    /// A command that runs inside namespace `ns`.
    pub fn cmd(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Runs to completion inside `ns` (bounded by `timeout SECONDS`).
    pub fn run(ns: &str, seconds: u32, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns, "timeout", &seconds.to_string(), program])
            .args(args)
            .output()
            .expect("run in namespace")
    }

    /// Starts a long-running process inside `ns`; it is killed when the lab is dropped.
    pub fn spawn(&mut self, ns: &str, program: &str, args: &[&str]) -> u32 {
        let child = Self::cmd(ns, program).args(args).stdin(Stdio::null()).spawn().expect("spawn in namespace");
        let id = child.id();
        self.children.push(child);
        id
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        for c in &mut self.children {
            for _ in 0..50 {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for link in &self.root_links {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
        for ns in self.peers.iter().chain(std::iter::once(&self.server)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The provisioner's binary (of the test's own crate).
pub const PROVISIONER: &str = env!("CARGO_BIN_EXE_nodekeeper-provisioner");

/// The guard's binary, beside the provisioner's in the same target directory (built here
/// when the test runs alone, `-p nodekeeper-provisioner`).
pub fn guard_binary() -> String {
    let path = std::path::Path::new(PROVISIONER).with_file_name("nodekeeper-guard");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-q", "-p", "nodekeeper-guard"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok && path.exists(), "building nodekeeper-guard for {}", path.display());
    }
    path.display().to_string()
}

pub use nodekeeper_store::testing::free_port;

/// Writes `dir/NAME.toml`, a `serve` config on `db_url` with HTTP on 127.0.0.1:`port`, DHCP
/// off and images in `dir/images`, then `sections` (e.g. `[recovery]` …) as given. Returns
/// its path and the provisioner's base URL.
pub fn serve_config(dir: &str, name: &str, db_url: &str, port: u16, sections: &str) -> (String, String) {
    let base = format!("http://127.0.0.1:{port}");
    std::fs::create_dir_all(format!("{dir}/images")).expect("images");
    let path = format!("{dir}/{name}.toml");
    std::fs::write(
        &path,
        format!(
            "database_url = \"{db_url}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             public_url = \"{base}\"\nimages_dir = \"{dir}/images\"\n{sections}"
        ),
    )
    .expect("serve config");
    (path, base)
}

/// Writes `dir/HOST.toml`, the config of a real-process test's guard for `host` on `db_url`:
/// libvirt's test driver, state under `dir/HOST/`, 1 s heartbeats and converges, isolation
/// after 4 s, libvirtd never restarted; `watch` (more `[watch]` keys) appended. Returns its path.
pub fn guard_config(dir: &str, host: &str, db_url: &str, watch: &str) -> String {
    let path = format!("{dir}/{host}.toml");
    std::fs::write(
        &path,
        format!(
            "host = \"{host}\"\ndatabase_url = \"{db_url}\"\n[libvirt]\nconfig_dir = \"{dir}/{host}/qemu\"\n\
             uri = \"test:///default\"\n[boot]\nstate_dir = \"{dir}/{host}/state\"\ndb_wait = \"1s\"\n\
             [watch]\nheartbeat_interval = \"1s\"\nconverge_interval = \"1s\"\nisolation_timeout = \"4s\"\n\
             libvirt_timeout = \"2s\"\nmax_restarts = 0\nlibvirt_restart = []\n{watch}"
        ),
    )
    .expect("guard config");
    path
}

/// The BMC emulators' venv (sushy-tools, VirtualBMC, snmpsim), made by make test.
pub const BMC_VENV: &str = "/opt/nk-bmc-venv";

/// A real Redfish BMC for one host: sushy-tools on libvirt's test driver (its `test` domain
/// runs, and powers off and on as told), its log in `dir/sushy.log`. Returns it (killed when
/// dropped) and the BMC URL of its one system, once it answers.
pub async fn sushy_test_driver(dir: &str) -> (KillOnDrop, String) {
    let port = free_port();
    let sushy = KillOnDrop(
        Command::new(std::path::Path::new(BMC_VENV).join("bin/sushy-emulator"))
            .args(["--libvirt-uri", "test:///default", "-i", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{dir}/sushy.log")).expect("log"))
            .spawn()
            .expect("sushy-emulator"),
    );
    let systems = format!("http://127.0.0.1:{port}/redfish/v1/Systems");
    let http = reqwest::Client::new();
    wait_until("sushy-tools answers", std::time::Duration::from_secs(30), async || {
        http.get(&systems).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    let listed: serde_json::Value = http.get(&systems).send().await.expect("systems").json().await.expect("json");
    let member = listed["Members"][0]["@odata.id"].as_str().expect("a system").to_owned();
    (sushy, format!("redfish+http://127.0.0.1:{port}{member}"))
}

/// Runs curl (10 s at most); returns (HTTP status, body). A status of 0: no answer.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// Waits until `ok`, polling every 200 ms; a panic naming `what` after `limit`.
pub async fn wait_until(what: &str, limit: std::time::Duration, mut ok: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ok().await {
        assert!(start.elapsed() < limit, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A small QEMU machine under software emulation (`/dev/kvm` does not work here): TCG, 512 MiB,
/// one vCPU, no display, no monitor, exits instead of rebooting.
pub const QEMU_TCG: [&str; 11] =
    ["-accel", "tcg", "-m", "512", "-smp", "1", "-display", "none", "-monitor", "none", "-no-reboot"];

/// A `test:///` libvirt domain's XML (the guards' libvirt in the real-process tests).
pub fn test_domain_xml(name: &str, uuid: nodekeeper_store::InstanceId) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices/></domain>"
    )
}

/// Who started instance `uuid`, and when (its `instance.started` events, by actor).
pub async fn started_by(
    store: &nodekeeper_store::Store,
    uuid: nodekeeper_store::InstanceId,
) -> Vec<(String, nodekeeper_store::Timestamp)> {
    let filter = nodekeeper_store::EventFilter { instance: Some(uuid), limit: Some(1000), ..Default::default() };
    let events = store.events(&filter).await.expect("events");
    events.into_iter().filter(|e| e.kind == "instance.started").map(|e| (e.actor, e.at)).collect()
}

/// `nodekeeper-provisioner serve --config CONFIG`, its stderr in `log`; killed when dropped.
pub fn spawn_serve(config: &str, log: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(PROVISIONER)
            .args(["serve", "--config", config])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("serve"),
    )
}

/// Heartbeats for `hosts` every `every` (hosts that are there only to be heard), until the
/// handle is aborted.
pub fn heartbeats(
    store: &nodekeeper_store::Store,
    hosts: &'static [&'static str],
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    let store = store.clone();
    tokio::spawn(async move {
        loop {
            for h in hosts {
                let _ = store.record_heartbeat(&nodekeeper_store::testing::host_name(h)).await;
            }
            tokio::time::sleep(every).await;
        }
    })
}
