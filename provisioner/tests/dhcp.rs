//! DHCP with real clients in network namespaces: busybox udhcpc and ISC dhclient get an
//! address, next-server and boot file from `nodekeeper-provisioner serve`; an unknown MAC
//! gets nothing; leases survive a restart; proxy mode works beside a real dnsmasq.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::Lab;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::NewHost;

const BIN: &str = env!("CARGO_BIN_EXE_nodekeeper-provisioner");
const MAC_A: &str = "52:54:00:aa:00:01";
const MAC_B: &str = "52:54:00:aa:00:02";

struct Setup {
    lab: Lab,
    dir: tempfile::TempDir,
    db: TestDb,
    config: String,
}

async fn setup(mode: &str) -> Setup {
    let db = TestDb::sqlite();
    let store = db.store().await;
    for (name, mac, ip) in [("node-a", MAC_A, None), ("node-b", MAC_B, Some("10.20.0.42"))] {
        let h = NewHost {
            name: name.parse().expect("name"),
            mac: Some(mac.parse().expect("mac")),
            ip: ip.map(|i| i.parse().expect("ip")),
            bmc_url: None,
            bmc_credentials: None,
        };
        store.add_host(&h, "test").await.expect("host");
    }
    store.close().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let dhcp = match mode {
        "full" => "mode = \"full\"\ninterface = \"br0\"\nserver_ip = \"10.20.0.1\"\nsubnet = \"10.20.0.0/24\"\nrange = [\"10.20.0.100\", \"10.20.0.199\"]\nrouter = \"10.20.0.1\"\ndns = [\"10.20.0.1\"]\nlease_time = \"1h\"\n",
        _ => "mode = \"proxy\"\ninterface = \"br0\"\nserver_ip = \"10.20.0.1\"\n",
    };
    let config = format!("{d}/provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[dhcp]\n{dhcp}[tftp]\nlisten = \"10.20.0.1:69\"\nroot = \"{d}/tftp\"\n[http]\nlisten = \"10.20.0.1:8080\"\npublic_url = \"http://10.20.0.1:8080\"\nimages_dir = \"{d}/images\"\n[http.auth]\nmetrics_from = [\"10.20.0.1/32\"]\n",
            db.url()
        ),
    )
    .expect("config");
    std::fs::create_dir_all(dir.path().join("tftp")).expect("tftp root");
    Setup { lab: Lab::new(), dir, db, config }
}

impl Setup {
    fn start_server(&mut self) {
        let server = self.lab.server.clone();
        self.lab.spawn(&server, BIN, &["serve", "--config", &self.config]);
        for _ in 0..100 {
            let out = Lab::run(&server, 2, "curl", &["-sf", "http://10.20.0.1:8080/healthz"]);
            if out.status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the provisioner did not come up");
    }

    /// Runs ISC dhclient once in `ns`, sending `class` (option 60) and `arch` (option 93);
    /// returns its lease file.
    fn dhclient(&self, ns: &str, class: &str, arch: u16) -> String {
        let conf = self.dir.path().join(format!("dhclient-{arch}.conf"));
        std::fs::write(
            &conf,
            format!(
                "timeout 20;\nretry 1;\noption pxe-arch code 93 = unsigned integer 16;\nsend pxe-arch {arch};\n\
                 send vendor-class-identifier \"{class}\";\n\
                 request subnet-mask, routers, host-name, vendor-class-identifier;\n"
            ),
        )
        .expect("dhclient.conf");
        let leases = self.dir.path().join(format!("dhclient-{arch}.leases"));
        let pid = self.dir.path().join(format!("dhclient-{arch}.pid"));
        let _ = std::fs::remove_file(&leases);
        let out = Lab::run(
            ns,
            40,
            "dhclient",
            &[
                "-1",
                "-v",
                "-cf",
                &conf.display().to_string(),
                "-lf",
                &leases.display().to_string(),
                "-pf",
                &pid.display().to_string(),
                "-sf",
                "/bin/true",
                "eth0",
            ],
        );
        if let Ok(p) = std::fs::read_to_string(&pid) {
            let _ = std::process::Command::new("kill").arg(p.trim()).status();
        }
        let lease = std::fs::read_to_string(&leases).unwrap_or_default();
        assert!(!lease.is_empty(), "dhclient got no lease: {}", String::from_utf8_lossy(&out.stderr));
        lease
    }

    /// Runs busybox udhcpc in `ns` with extra args; returns the variables of its `bound` call.
    fn udhcpc(&self, ns: &str, extra: &[&str]) -> Option<HashMap<String, String>> {
        let out_file = self.dir.path().join(format!("{ns}.env"));
        let script = self.dir.path().join(format!("{ns}.sh"));
        std::fs::write(&script, format!("#!/bin/sh\n[ \"$1\" = bound ] && env > {}\nexit 0\n", out_file.display()))
            .expect("script");
        std::process::Command::new("chmod").args(["+x", &script.display().to_string()]).status().expect("chmod");
        let script = script.display().to_string();
        let mut args = vec!["udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "4", "-T", "1", "-s", &script];
        args.extend_from_slice(extra);
        let _ = Lab::run(ns, 30, "busybox", &args);
        let text = std::fs::read_to_string(&out_file).ok()?;
        Some(text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }
}

#[tokio::test]
async fn real_clients_get_address_next_server_and_boot_file() {
    if !common::netns_available() {
        return;
    }
    let mut s = setup("full").await;
    s.start_server();
    let a = s.lab.peer(MAC_A);
    let b = s.lab.peer(MAC_B);
    let stranger = s.lab.peer("52:54:00:aa:00:99");

    // udhcpc as a BIOS PXE client (option 60 PXEClient, option 93 = 0).
    let env = s.udhcpc(&a, &["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"]).expect("udhcpc got a lease");
    let ip_a = env["ip"].clone();
    let last: u8 = ip_a.strip_prefix("10.20.0.").and_then(|o| o.parse().ok()).expect("an address on 10.20.0.0/24");
    assert!((100..=199).contains(&last), "from the range: {ip_a}");
    assert_eq!(env["siaddr"], "10.20.0.1", "next-server");
    assert_eq!(env["boot_file"], "undionly.kpxe");
    assert_eq!(env["router"], "10.20.0.1");
    assert_eq!(env["subnet"], "255.255.255.0");
    assert_eq!(env.get("hostname").map(String::as_str), Some("node-a"));

    // The same client as iPXE (user class "iPXE") is chained to its HTTP script.
    let env = s.udhcpc(&a, &["-x", "0x4d:69505845", "-x", "0x5d:0000"]).expect("iPXE lease");
    assert_eq!(env["boot_file"], format!("http://10.20.0.1:8080/boot/{MAC_A}.ipxe"));
    assert_eq!(env["ip"], ip_a, "the same client keeps its address");

    // dhclient as an x86-64 UEFI client; node-b has a fixed address.
    let lease = s.dhclient(&b, "PXEClient:Arch:00007:UNDI:003016", 7);
    assert!(lease.contains("fixed-address 10.20.0.42;"), "dhclient: {lease}");
    assert!(lease.contains("filename \"ipxe.efi\";"), "{lease}");
    assert!(
        lease.contains("next-server 10.20.0.1;") || lease.contains("option dhcp-server-identifier 10.20.0.1;"),
        "{lease}"
    );
    assert!(lease.contains("option vendor-class-identifier \"PXEClient\";"), "{lease}");

    // dhclient as an x86-64 UEFI HTTP boot client (what EDK2's HttpBootDxe sends: option 60
    // HTTPClient, option 93 = 16): a full URL on the HTTP server, and HTTPClient echoed.
    let lease = s.dhclient(&b, "HTTPClient:Arch:00016:UNDI:003001", 16);
    assert!(lease.contains("fixed-address 10.20.0.42;"), "{lease}");
    assert!(lease.contains("filename \"http://10.20.0.1:8080/boot/loaders/ipxe.efi\";"), "{lease}");
    assert!(lease.contains("option vendor-class-identifier \"HTTPClient\";"), "{lease}");
    // udhcpc as an arm64 HTTP boot client.
    let env = s.udhcpc(&a, &["-V", "HTTPClient:Arch:00019:UNDI:003001", "-x", "0x5d:0013"]).expect("HTTP lease");
    assert_eq!(env["boot_file"], "http://10.20.0.1:8080/boot/loaders/ipxe-arm64.efi");
    // A 32-bit UEFI HTTP client gets an address and no loader (there is none for it here).
    let env = s.udhcpc(&a, &["-V", "HTTPClient:Arch:00015:UNDI:003001", "-x", "0x5d:000f"]).expect("lease");
    assert_eq!(env.get("boot_file"), None, "{env:?}");

    // An unknown MAC gets nothing.
    assert!(s.udhcpc(&stranger, &["-V", "PXEClient", "-x", "0x5d:0000"]).is_none(), "unknown MAC must not get a lease");

    // The lease is stored, and a restarted server keeps it.
    let store = nodekeeper_store::Store::connect(s.db.url()).await.expect("db");
    let stored = store.leases().await.expect("leases");
    assert!(stored.iter().any(|l| l.mac.to_string() == MAC_A && l.ip.to_string() == ip_a), "{stored:?}");
    let metrics = Lab::run(&s.lab.server, 5, "curl", &["-sf", "http://10.20.0.1:8080/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(value("nodekeeper_dhcp_offers_total") >= 3 && value("nodekeeper_dhcp_acks_total") >= 3, "{metrics}");
    assert!(value("nodekeeper_dhcp_drops_total") >= 1, "the stranger's packets are counted: {metrics}");
}

#[tokio::test]
async fn leases_survive_a_restart() {
    if !common::netns_available() {
        return;
    }
    let mut s = setup("full").await;
    s.start_server();
    let a = s.lab.peer(MAC_A);
    let first = s.udhcpc(&a, &[]).expect("lease")["ip"].clone();
    // Restart: a new lab process on the same database.
    drop(std::mem::replace(&mut s.lab, Lab::new()));
    s.start_server();
    let a = s.lab.peer(MAC_A);
    let again = s.udhcpc(&a, &[]).expect("lease after restart")["ip"].clone();
    assert_eq!(again, first, "the stored lease is honoured after a restart");
}

#[tokio::test]
async fn proxy_mode_beside_dnsmasq() {
    if !common::netns_available() {
        return;
    }
    let mut s = setup("proxy").await;
    s.start_server();
    // dnsmasq, in a namespace of its own on the same bridge, hands out the addresses.
    let leasefile = s.dir.path().join("dnsmasq.leases");
    s.lab.site_dhcp("10.20.0.50,10.20.0.60", &[], &leasefile);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let a = s.lab.peer(MAC_A);
    // A plain client gets its address from dnsmasq; the proxy stays out of its way.
    let env = s.udhcpc(&a, &[]).expect("lease from dnsmasq");
    assert!(env["ip"].starts_with("10.20.0.5") || env["ip"] == "10.20.0.60", "{env:?}");
    assert_eq!(env["serverid"], "10.20.0.2");
    // A PXE DISCOVER gets both answers: dnsmasq's address and the proxy's boot file.
    let probe = s.dir.path().join("probe.py");
    std::fs::write(&probe, PROBE).expect("probe");
    let out =
        Lab::run(&a, 20, "python3", &[&probe.display().to_string(), MAC_A, "PXEClient:Arch:00007:UNDI:003016", "7"]);
    let offers = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        offers.contains("server=10.20.0.2 yiaddr=10.20.0."),
        "dnsmasq offers an address: {offers}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        offers.contains("server=10.20.0.1 yiaddr=0.0.0.0 siaddr=10.20.0.1 file=ipxe.efi class=PXEClient"),
        "the proxy offers the boot file only: {offers}"
    );
    // A UEFI HTTP boot DISCOVER: dnsmasq's address, and the proxy's URL with HTTPClient echoed.
    let out =
        Lab::run(&a, 20, "python3", &[&probe.display().to_string(), MAC_A, "HTTPClient:Arch:00016:UNDI:003001", "16"]);
    let offers = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(offers.contains("server=10.20.0.2 yiaddr=10.20.0."), "dnsmasq offers an address: {offers}");
    assert!(
        offers.contains("server=10.20.0.1 yiaddr=0.0.0.0 siaddr=10.20.0.1 file=http://10.20.0.1:8080/boot/loaders/ipxe.efi class=HTTPClient"),
        "the proxy offers the URL: {offers}"
    );
    assert!(Path::new(&leasefile).exists());
}

/// A minimal DISCOVER from eth0 with option 60 = argv[2] and option 93 = argv[3] (what a
/// firmware's PXE or HTTP boot sends first); prints every OFFER seen in 3 s, with its option 60.
const PROBE: &str = r#"
import socket, struct, sys, time, os
mac = bytes.fromhex(sys.argv[1].replace(':', ''))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, 25, b'eth0\0')
s.bind(('0.0.0.0', 68))
xid = os.urandom(4)
pkt = struct.pack('!BBBB4sHH4s4s4s4s16s64s128s', 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10), bytes(64), bytes(128))
cls = sys.argv[2].encode()
opts = b'\x63\x82\x53\x63' + b'\x35\x01\x01' + bytes([60, len(cls)]) + cls + b'\x5d\x02' + struct.pack('!H', int(sys.argv[3])) + b'\xff'
s.sendto(pkt + opts, ('255.255.255.255', 67))
s.settimeout(0.5)
end = time.time() + 3
while time.time() < end:
    try:
        data, addr = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data[4:8] != xid:
        continue
    yiaddr, siaddr = socket.inet_ntoa(data[16:20]), socket.inet_ntoa(data[20:24])
    fname = data[108:236].split(b'\0')[0].decode()
    i, server, cls = 240, None, None
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1; continue
        code, ln = data[i], data[i + 1]
        val = data[i + 2:i + 2 + ln]
        if code == 54: server = socket.inet_ntoa(val)
        if code == 60: cls = val.decode()
        i += 2 + ln
    print(f'server={server} yiaddr={yiaddr} siaddr={siaddr} file={fname} class={cls}', flush=True)
"#;
