//! `nodekeeper-guard watch`, the real binary, against a real libvirtd (QEMU driver, TCG
//! domains of 32 MiB with no disk) and a real database: it heartbeats, defines and starts what
//! the database assigns, removes what moved away, and — cut off from a PostgreSQL that stops
//! accepting connections — stops its HA domains and starts them again once the database is
//! back and confirms them.

use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::libvirtd_available;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, Generation, InstanceId, NewHost, NewInstance, Storage, Store};
use virt::connect::Connect;
use virt::domain::Domain;

const URI: &str = "qemu:///system";

/// The guard process and the test's domains, removed however the test ends.
struct Rig {
    guard: Option<Child>,
    domains: Vec<InstanceId>,
    dir: tempfile::TempDir,
    /// The cell's peer port (node-w1's guard answers on 127.0.0.2, node-w2's would on .3).
    peer_port: u16,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        let Ok(mut conn) = Connect::open(Some(URI)) else { return };
        for id in &self.domains {
            if let Ok(dom) = Domain::lookup_by_uuid_string(&conn, &id.to_string()) {
                let _ = dom.destroy();
                let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM);
            }
        }
        let _ = conn.close();
    }
}

/// A stored domain XML as an operator would import it: no nodekeeper metadata.
fn domain_xml(name: &str, uuid: InstanceId) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices/></domain>"
    )
}

/// (exists, running) of a domain.
fn state(id: InstanceId) -> (bool, bool) {
    let Ok(mut conn) = Connect::open(Some(URI)) else { return (false, false) };
    let s = match Domain::lookup_by_uuid_string(&conn, &id.to_string()) {
        Ok(d) => (true, d.is_active().unwrap_or(false)),
        Err(_) => (false, false),
    };
    let _ = conn.close();
    s
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {limit:?}");
}

/// node-w1 and node-w2, a cell of two (each has an address and heartbeated): node-w2 is
/// node-w1's one peer, and no guard answers for it unless a test starts one.
async fn setup(db: &TestDb, instances: &[(&str, &str, bool)]) -> (Rig, Store, Vec<InstanceId>) {
    let store = db.store().await;
    for (h, ip) in [("node-w1", "127.0.0.2"), ("node-w2", "127.0.0.3")] {
        let ip = Some(ip.parse().expect("ip"));
        let host = NewHost { name: n(h), mac: None, ip, bmc_url: None, bmc_credentials: None };
        store.add_host(&host, "test").await.expect("host");
    }
    store.record_heartbeat(&n("node-w2")).await.expect("heartbeat");
    let tag = &InstanceId::random().to_string()[..8];
    let items: Vec<NewInstance> = instances
        .iter()
        .map(|(name, owner, ha)| {
            let uuid = InstanceId::random();
            let name = format!("nk-watch-{tag}-{name}");
            NewInstance {
                uuid,
                domain_xml: Some(domain_xml(&name, uuid)),
                name,
                owner: n(owner),
                ha: *ha,
                storage: Storage::Shared,
                generation: Generation(1),
            }
        })
        .collect();
    setup_with(db, store, items).await
}

/// Imports `items`, then starts a guard for node-w1.
async fn setup_with(db: &TestDb, store: Store, items: Vec<NewInstance>) -> (Rig, Store, Vec<InstanceId>) {
    store.import_instances(&items, "test").await.expect("import");
    let peer_port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let ids: Vec<InstanceId> = items.iter().map(|i| i.uuid).collect();
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("guard.toml");
    std::fs::create_dir_all(dir.path().join("qemu")).expect("config dir");
    std::fs::write(
        &config,
        format!(
            "host = \"node-w1\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"{URI}\"\n\
             [boot]\nstate_dir = \"{d}/state\"\ndb_wait = \"1s\"\n\
             [watch]\nheartbeat_interval = \"400ms\"\nconverge_interval = \"500ms\"\nisolation_timeout = \"3s\"\n\
             libvirt_timeout = \"20s\"\nmax_restarts = 0\nlibvirt_restart = []\n\
             peer_listen = \"127.0.0.2:{peer_port}\"\npeer_port = {peer_port}\n",
            db.url(),
            d = dir.path().display()
        ),
    )
    .expect("config");
    let guard = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
        .args(["-v", "watch", "--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("guard.log")).expect("log"))
        .spawn()
        .expect("guard");
    (Rig { guard: Some(guard), domains: ids.clone(), dir, peer_port }, store, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_storage_instance_gets_its_disk_recreated_from_its_backing_image() {
    if !libvirtd_available() {
        return;
    }
    let db = TestDb::sqlite();
    let store = db.store().await;
    for h in ["node-w1", "node-w2"] {
        let host = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
        store.add_host(&host, "test").await.expect("host");
    }
    // Under target/: QEMU (another user under libvirt) must reach the files.
    let disks = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    std::fs::set_permissions(disks.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let base = disks.path().join("base.raw");
    std::fs::File::create(&base).and_then(|f| f.set_len(8 << 20)).expect("base image");
    let instance = |name: &str, disk: &str| {
        let uuid = InstanceId::random();
        let name = format!("nk-watch-{}-{name}", &uuid.to_string()[..8]);
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>\
             <os><type arch='x86_64'>hvm</type></os><devices>{disk}</devices></domain>"
        );
        NewInstance {
            uuid,
            name,
            owner: n("node-w1"),
            ha: true,
            storage: Storage::Local,
            generation: Generation(2),
            domain_xml: Some(xml),
        }
    };
    let path = disks.path().join("instances/a/disk");
    let with_backing = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <backingStore type='file'><format type='raw'/><source file='{}'/></backingStore><target dev='vda' bus='virtio'/></disk>",
        path.display(),
        base.display()
    );
    let lost = disks.path().join("instances/b/disk");
    let without = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        lost.display()
    );
    let items = vec![instance("local", &with_backing), instance("nobase", &without)];
    let (rig, store, ids) = setup_with(&db, store, items).await;
    let (local, nobase) = (ids[0], ids[1]);
    let started = Instant::now();
    while state(local) != (true, true) {
        let log = std::fs::read_to_string(rig.dir.path().join("guard.log")).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "the local instance not running; guard log:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(&path).output().expect("qemu-img");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info");
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["backing-filename"], base.display().to_string(), "{info}");
    let kinds = |id: InstanceId| {
        let store = store.clone();
        async move {
            let filter = EventFilter { instance: Some(id), limit: Some(100), ..Default::default() };
            store.events(&filter).await.expect("events").into_iter().map(|e| e.kind).collect::<Vec<_>>()
        }
    };
    // (the pass records its events once it has been through every instance)
    for _ in 0..50 {
        if kinds(local).await.contains(&"instance.disk_recreated".to_owned())
            && kinds(nobase).await.contains(&"instance.converge_failed".to_owned())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kinds(local).await.contains(&"instance.disk_recreated".to_owned()));
    // No backing image: nothing to recreate it from. Not defined, said once, nothing made.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = kinds(nobase).await.into_iter().filter(|k| k == "instance.converge_failed").count();
    assert_eq!(failed, 1, "one event, not one per pass");
    assert_eq!(state(nobase), (false, false));
    assert!(!lost.exists() && !lost.parent().is_some_and(|p| p.exists()), "nothing made for it");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_heartbeats_and_converges_on_the_database() {
    if !libvirtd_available() {
        return;
    }
    let db = TestDb::sqlite();
    let (mut rig, store, ids) =
        setup(&db, &[("ha", "node-w1", true), ("plain", "node-w1", false), ("theirs", "node-w2", true)]).await;
    let (ha, plain, theirs) = (ids[0], ids[1], ids[2]);
    wait_for("the assigned domains defined and running", Duration::from_secs(60), || {
        state(ha) == (true, true) && state(plain) == (true, true)
    });
    assert_eq!(state(theirs), (false, false), "another host's instance is not defined here");
    let log = || std::fs::read_to_string(rig.dir.path().join("guard.log")).unwrap_or_default();
    let hb = store.require_host(&n("node-w1")).await.expect("host").last_heartbeat;
    let hb = hb.unwrap_or_else(|| panic!("no heartbeat; guard log:\n{}", log()));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = store.require_host(&n("node-w1")).await.expect("host").last_heartbeat.expect("a heartbeat");
    assert!(later > hb, "heartbeats keep coming");
    // The generation it was defined with is in its metadata (what `guard boot` judges by).
    let mut conn = Connect::open(Some(URI)).expect("libvirt");
    let xml = Domain::lookup_by_uuid_string(&conn, &ha.to_string()).and_then(|d| d.get_xml_desc(0)).expect("xml");
    let _ = conn.close();
    assert!(xml.contains("https://nodekeeper.dev/xmlns/instance/1") && xml.contains("generation=\"1\""), "{xml}");

    // The instance moves to node-w2: stopped here, its definition saved, then undefined.
    // (Forced: the test moves it off a live host on purpose, to watch the guard react.)
    store.evacuate(&[ha], &n("node-w2"), true, "test").await.expect("evacuate");
    wait_for("the moved instance removed", Duration::from_secs(30), || state(ha) == (false, false));
    let quarantined: Vec<_> = std::fs::read_dir(rig.dir.path().join("state/quarantine"))
        .expect("quarantine")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(quarantined.iter().any(|f| f.starts_with(&ha.to_string())), "{quarantined:?}");
    assert_eq!(state(plain), (true, true), "what is still ours keeps running");

    // SIGTERM: a clean exit.
    let mut guard = rig.guard.take().expect("guard");
    let _ = Command::new("kill").args(["-TERM", &guard.id().to_string()]).status();
    let status = guard.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_guard_stops_its_ha_domains_and_starts_them_when_the_database_confirms() {
    if !libvirtd_available() {
        return;
    }
    let Some(db) = TestDb::postgres().await else { return };
    let (rig, store, ids) = setup(&db, &[("ha", "node-w1", true), ("plain", "node-w1", false)]).await;
    let (ha, plain) = (ids[0], ids[1]);
    wait_for("both running", Duration::from_secs(60), || state(ha) == (true, true) && state(plain) == (true, true));
    store.close().await;

    // The database goes away, and node-w1's one peer does not answer: cut off from the
    // controller and from its cell (1 host of 2), it stops its HA domain.
    assert!(db.set_reachable(false).await);
    let cut = Instant::now();
    wait_for("the HA domain stopped", Duration::from_secs(30), || state(ha) == (true, false));
    let took = cut.elapsed();
    // isolation_timeout counts from the last heartbeat that got through, up to one
    // interval before the cut.
    assert!(took >= Duration::from_millis(2600), "not before isolation_timeout: {took:?}");
    assert_eq!(state(plain), (true, true), "non-HA instances are not fenced");
    assert!(rig.dir.path().join("state/self-fenced.json").exists());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state(ha), (true, false), "not restarted while the database is away");

    // Back: the database confirms ha is still node-w1's; the guard starts it again.
    assert!(db.set_reachable(true).await);
    wait_for("the HA domain started again", Duration::from_secs(30), || state(ha) == (true, true));
    wait_for("the self-fence lifted", Duration::from_secs(10), || {
        !rig.dir.path().join("state/self-fenced.json").exists()
    });
    eprintln!("self-fence {took:?} after the database went away (isolation_timeout 3 s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_that_still_reaches_a_peer_holds_its_instances() {
    if !libvirtd_available() {
        return;
    }
    let Some(db) = TestDb::postgres().await else { return };
    let (rig, store, ids) = setup(&db, &[("ha", "node-w1", true)]).await;
    wait_for("running", Duration::from_secs(60), || state(ids[0]) == (true, true));
    wait_for("the peer list cached", Duration::from_secs(10), || {
        std::fs::read_to_string(rig.dir.path().join("state/peers.json")).is_ok_and(|p| p.contains("node-w2"))
    });
    // node-w2's guard, the library's own responder, with the key the provisioner derives for
    // the pair; it does not reach the database either.
    let secret = store.cell_secret().await.expect("secret");
    let key = nodekeeper_store::guard_api::peer_key(&secret, &n("node-w1"), &n("node-w2"));
    let peer_dir = tempfile::tempdir().expect("dir");
    let cache = nodekeeper_guard::peers::PeerCache::load(peer_dir.path());
    let address = "127.0.0.2".parse().expect("ip");
    cache.set(nodekeeper_store::guard_api::PeerList {
        cell_size: 2,
        peers: vec![nodekeeper_store::guard_api::Peer { host: n("node-w1"), address, key, counted: true }],
    });
    let responder = nodekeeper_guard::peers::Responder::new(
        n("node-w2"),
        cache,
        Box::new(|| false),
        Box::new(|_| Box::pin(async { anyhow::bail!("no database") })),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.3", rig.peer_port)).await.expect("peer port");
    let peer =
        tokio::spawn(nodekeeper_guard::peers::serve(listener, std::sync::Arc::new(responder), std::future::pending()));
    store.close().await;
    assert!(db.set_reachable(false).await);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(state(ids[0]), (true, true), "the database is down, not this host: it holds");
    assert!(!rig.dir.path().join("state/self-fenced.json").exists());
    let log = std::fs::read_to_string(rig.dir.path().join("guard.log")).unwrap_or_default();
    assert!(log.contains("2 of 2 hosts (this one included) answer"), "{log}");
    assert!(db.set_reachable(true).await);
    peer.abort();
}

/// A database with host node-w1, and a directory for the test's files.
async fn one_host() -> (TestDb, Store, tempfile::TempDir) {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let host = NewHost { name: n("node-w1"), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
    store.add_host(&host, "test").await.expect("host");
    (db, store, tempfile::tempdir().expect("dir"))
}

/// A script in `dir` that appends a line to `dir/NAME.count` each time it runs (a stand-in
/// for restart and reboot commands); returns its path.
fn counting_script(dir: &str, name: &str) -> String {
    let path = format!("{dir}/{name}.sh");
    std::fs::write(&path, format!("#!/bin/sh\necho run >> {dir}/{name}.count\n")).expect("script");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    path
}

/// How many times `counting_script(dir, name)` ran.
fn runs(dir: &str, name: &str) -> usize {
    std::fs::read_to_string(format!("{dir}/{name}.count")).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_libvirtd_is_restarted_a_bounded_number_of_times_then_the_host_reboots() {
    // A libvirt URI whose socket does not exist stands for a dead libvirtd; the restart and
    // reboot commands are scripts that count their runs (this machine is not rebooted).
    let (db, store, dir) = one_host().await;
    let d = dir.path().display().to_string();
    let script = |name: &str| counting_script(&d, name);
    let (restart, reboot) = (script("restart"), script("reboot"));
    let config = format!("{d}/guard.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"node-w1\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\n\
             uri = \"qemu+unix:///system?socket={d}/no-such-libvirt-sock\"\n[boot]\nstate_dir = \"{d}/state\"\n\
             [watch]\nheartbeat_interval = \"200ms\"\nconverge_interval = \"200ms\"\nisolation_timeout = \"5s\"\n\
             libvirt_restart = [\"{restart}\"]\nlibvirt_kill = []\nmax_restarts = 3\nrestart_window = \"1m\"\nreboot = [\"{reboot}\"]\n",
            db.url()
        ),
    )
    .expect("config");
    let mut guard = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
        .args(["watch", "--config", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("guard");
    let count = |name: &str| runs(&d, name);
    wait_for("the reboot", Duration::from_secs(20), || count("reboot") == 1);
    std::thread::sleep(Duration::from_secs(1));
    let _ = guard.kill();
    let _ = guard.wait();
    assert_eq!(count("restart"), 3, "max_restarts, then the reboot");
    assert_eq!(count("reboot"), 1, "once: no loop");
    // Heartbeats went on all along: libvirt's trouble is not the host's silence.
    assert!(store.require_host(&n("node-w1")).await.expect("host").last_heartbeat.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_services_are_checked_restarted_rejuvenated_and_bounded() {
    let (db, store, dir) = one_host().await;
    let d = dir.path().display().to_string();
    let script = |name: &str| counting_script(&d, name);
    // A healthy HTTP service (answers 200 to every request).
    let web = std::net::TcpListener::bind("127.0.0.1:0").expect("web");
    let web_addr = web.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in web.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 512];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let _ = std::io::Write::write_all(&mut s, b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let (r_web, r_broken, r_fresh, reboot) = (script("web"), script("broken"), script("fresh"), script("reboot"));
    let config = format!("{d}/guard.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"node-w1\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"test:///default\"\n\
             [boot]\nstate_dir = \"{d}/state\"\n\
             [watch]\nheartbeat_interval = \"200ms\"\nconverge_interval = \"200ms\"\nisolation_timeout = \"5s\"\n\
             libvirt_restart = []\nmax_restarts = 3\nrestart_window = \"1m\"\nreboot = [\"{reboot}\"]\n\
             [[watch.services]]\nname = \"web\"\nhttp = \"http://{web_addr}/healthz\"\nrestart = [\"{r_web}\"]\n\
             [[watch.services]]\nname = \"broken\"\ncheck = [\"false\"]\nrestart = [\"{r_broken}\"]\n\
             [[watch.services]]\nname = \"fresh\"\ncheck = [\"true\"]\nrestart = [\"{r_fresh}\"]\nrejuvenate_every = \"500ms\"\n",
            db.url()
        ),
    )
    .expect("config");
    let mut guard = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
        .args(["watch", "--config", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("guard");
    let count = |name: &str| runs(&d, name);
    wait_for("the reboot", Duration::from_secs(20), || count("reboot") == 1);
    wait_for("a rejuvenation or two", Duration::from_secs(20), || count("fresh") >= 2);
    let _ = guard.kill();
    let _ = guard.wait();
    assert_eq!(count("broken"), 3, "restarted max_restarts times, then the reboot");
    assert_eq!(count("reboot"), 1, "once");
    assert_eq!(count("web"), 0, "a healthy service is left alone");
    assert!(store.require_host(&n("node-w1")).await.expect("host").last_heartbeat.is_some(), "heartbeats went on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_then_watchdog_pings_and_the_hardware_watchdog_is_fed() {
    // What systemd's NOTIFY_SOCKET receives, read from a datagram socket of the test's own.
    let (_db, _store, dir) = one_host().await;
    let d = dir.path().display().to_string();
    let (fifo, mut dog) = watchdog_fifo(&d);
    let socket_path = format!("{d}/notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let config = format!("{d}/guard.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"node-w1\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"test:///default\"\n\
             [boot]\nstate_dir = \"{d}/state\"\n[watch]\nheartbeat_interval = \"200ms\"\nconverge_interval = \"200ms\"\n\
             isolation_timeout = \"5s\"\nlibvirt_restart = []\nhardware_watchdog = \"{fifo}\"\n",
            _db.url()
        ),
    )
    .expect("config");
    let mut guard = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
        .args(["watch", "--config", &config])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("guard");
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    while heard.len() < 4 {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let _ = Command::new("kill").args(["-TERM", &guard.id().to_string()]).status();
    assert!(guard.wait().expect("wait").success());
    assert_eq!(heard[0], "READY=1", "{heard:?}");
    assert!(heard[1..].iter().all(|m| m == "WATCHDOG=1"), "{heard:?}");
    // Then, past the pings sent meanwhile, the goodbye.
    loop {
        let n = socket.recv(&mut buf).expect("STOPPING=1 before the socket went quiet");
        match &buf[..n] {
            b"STOPPING=1" => break,
            b"WATCHDOG=1" => continue,
            other => panic!("unexpected {:?}", String::from_utf8_lossy(other)),
        }
    }
    // Pinged along with systemd, then disarmed by the magic 'V' of a clean stop.
    let mut fed = Vec::new();
    std::io::Read::read_to_end(&mut dog, &mut fed).expect("read the FIFO");
    let fed = String::from_utf8_lossy(&fed).into_owned();
    assert!(fed.len() >= 4 && fed.ends_with('V') && fed[..fed.len() - 1].chars().all(|c| c == 'p'), "{fed:?}");
}

/// The hardware watchdog's stand-in in `dir`: a FIFO (there is no /dev/watchdog here, and this
/// kernel has no softdog module; the QEMU nodes have both), opened for reading first (non-
/// blocking), so the guard's open for writing does not wait. Its path and the reading end.
fn watchdog_fifo(dir: &str) -> (String, std::fs::File) {
    let fifo = format!("{dir}/watchdog");
    nix::unistd::mkfifo(fifo.as_str(), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let dog = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&fifo)
        .expect("open the FIFO");
    (fifo, dog)
}

/// Two hosts on PostgreSQL (node-w1, the guard's, and node-w2, heard once, both with
/// loopback addresses), a directory, a FIFO watchdog and a free peer port.
struct WatchdogCell {
    db: TestDb,
    store: Store,
    dir: tempfile::TempDir,
    fifo: String,
    dog: std::fs::File,
    peer_port: u16,
}

async fn watchdog_cell() -> Option<WatchdogCell> {
    let db = TestDb::postgres().await?;
    let store = db.store().await;
    for (h, ip) in [("node-w1", "127.0.0.2"), ("node-w2", "127.0.0.3")] {
        let host =
            NewHost { name: n(h), mac: None, ip: Some(ip.parse().expect("ip")), bmc_url: None, bmc_credentials: None };
        store.add_host(&host, "test").await.expect("host");
    }
    store.record_heartbeat(&n("node-w2")).await.expect("heartbeat");
    let dir = tempfile::tempdir().expect("dir");
    let (fifo, dog) = watchdog_fifo(&dir.path().display().to_string());
    let peer_port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    Some(WatchdogCell { db, store, dir, fifo, dog, peer_port })
}

/// Everything a non-blocking FIFO holds now.
fn drain(fifo: &mut std::fs::File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(fifo, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading the FIFO: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts `nodekeeper-guard watch` as node-w1 of a watchdog cell in `d` on `libvirt_uri`,
/// with its hardware watchdog on `fifo`; returns it and its log's path.
fn watchdog_guard(
    d: &str,
    db_url: &str,
    libvirt_uri: &str,
    libvirt_timeout: &str,
    fifo: &str,
    peer_port: u16,
) -> (std::process::Child, std::path::PathBuf) {
    let config = format!("{d}/guard.toml");
    std::fs::create_dir_all(format!("{d}/qemu")).expect("config dir");
    std::fs::write(
        &config,
        format!(
            "host = \"node-w1\"\ndatabase_url = \"{db_url}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\n\
             uri = \"{libvirt_uri}\"\n[boot]\nstate_dir = \"{d}/state\"\ndb_wait = \"1s\"\n\
             [watch]\nheartbeat_interval = \"400ms\"\nconverge_interval = \"500ms\"\nisolation_timeout = \"3s\"\n\
             libvirt_timeout = \"{libvirt_timeout}\"\nmax_restarts = 0\nlibvirt_restart = []\nhardware_watchdog = \"{fifo}\"\n\
             peer_listen = \"127.0.0.2:{peer_port}\"\npeer_port = {peer_port}\n"
        ),
    )
    .expect("config");
    let log = std::path::Path::new(d).join("guard.log");
    let guard = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
        .args(["-v", "watch", "--config", &config])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("guard");
    (guard, log)
}

/// Cut off (the database gone, its one peer silent), the guard owes a self-fence; its libvirt
/// cannot be reached, so the HA domains cannot be stopped: it stops feeding the hardware
/// watchdog (a FIFO here), so that the machine resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_fence_that_cannot_stop_the_domains_starves_the_hardware_watchdog() {
    let Some(WatchdogCell { db, store, dir, fifo, mut dog, peer_port }) = watchdog_cell().await else { return };
    let d = dir.path().display().to_string();
    // A libvirt that is not there: every call fails (as a hung or dead libvirtd would).
    let uri = format!("qemu+unix:///system?socket={d}/no-libvirt-sock");
    let (mut guard, log) = watchdog_guard(&d, db.url(), &uri, "5s", &fifo, peer_port);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Fed while it heartbeats (its peer list fetched on the first heartbeat).
    wait_for("the watchdog fed", Duration::from_secs(20), || drain(&mut dog).contains('p'));
    tokio::time::sleep(Duration::from_secs(2)).await;
    store.close().await;
    assert!(db.set_reachable(false).await);
    wait_for("the self-fence given up on", Duration::from_secs(30), || {
        read_log().contains("no longer feeding the hardware watchdog")
    });
    let _ = drain(&mut dog);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fed = drain(&mut dog);
    assert!(!fed.contains('p'), "pinged after the self-fence failed: {fed:?}\n{}", read_log());
    // The database answers again (libvirt still does not): not cut off, nothing owed — fed again.
    assert!(db.set_reachable(true).await);
    wait_for("the watchdog fed again", Duration::from_secs(20), || drain(&mut dog).contains('p'));
    let _ = Command::new("kill").args(["-KILL", &guard.id().to_string()]).status();
    let _ = guard.wait();
}

/// Cut off, the guard's HA domains stop (there are none here) but the exclusive service copy
/// it runs does not (its stop command fails): the self-fence is not done — it stops feeding
/// the hardware watchdog, so that the machine resets before the controller's watchdog
/// fencing could move the copy — and it says which copy and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_copy_that_will_not_stop_leaves_the_self_fence_undone() {
    let Some(WatchdogCell { db, store, dir, fifo, mut dog, peer_port }) = watchdog_cell().await else { return };
    let d = dir.path().display().to_string();
    let started = format!("{d}/started");
    store
        .put_service(
            &nodekeeper_store::Service {
                name: "api".into(),
                copies: 1,
                labels: Vec::new(),
                start: vec!["touch".into(), started.clone()],
                stop: vec!["sh".into(), "-c".into(), "echo stuck >&2; exit 1".into()],
                check: None,
                exclusive: true,
            },
            "test",
        )
        .await
        .expect("service");
    let place = nodekeeper_store::CopyChange::Place { service: "api".into(), slot: 0, host: n("node-w1") };
    assert!(store.change_service_copy(&place, "test").await.expect("place"));
    let (mut guard, log) = watchdog_guard(&d, db.url(), "test:///default", "2s", &fifo, peer_port);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the copy started", Duration::from_secs(20), || std::path::Path::new(&started).exists());
    wait_for("the watchdog fed", Duration::from_secs(20), || drain(&mut dog).contains('p'));
    store.close().await;
    assert!(db.set_reachable(false).await);
    wait_for("the self-fence given up on", Duration::from_secs(30), || {
        read_log().contains("no longer feeding the hardware watchdog")
    });
    let text = read_log();
    assert!(text.contains("exclusive service copies did not stop: api/0") && text.contains("stuck"), "{text}");
    assert!(!text.contains("self-fenced: stopped"), "declared fenced with the copy still up:\n{text}");
    let _ = drain(&mut dog);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fed = drain(&mut dog);
    assert!(!fed.contains('p'), "pinged with the copy still up: {fed:?}\n{}", read_log());
    assert!(db.set_reachable(true).await);
    let _ = Command::new("kill").args(["-KILL", &guard.id().to_string()]).status();
    let _ = guard.wait();
}

/// The watchdog fencing contract of the guard: it reports its armed watchdog (a FIFO here: its
/// timeout is the configured one) and the cell its quorum counts; a clean stop while the
/// database answers says so first, then disarms ('V'); a clean stop that cannot tell the
/// database leaves the watchdog armed (no 'V': the machine would reset), and a guard started
/// again goes on counting its isolation from the last contact, not from its own start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_reported_and_disarmed_only_once_the_database_knows() {
    let Some(WatchdogCell { db, store, dir, fifo, mut dog, peer_port }) = watchdog_cell().await else { return };
    let d = dir.path().display().to_string();
    let config = format!("{d}/guard.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"node-w1\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"test:///default\"\n\
             [boot]\nstate_dir = \"{d}/state\"\n[watch]\nheartbeat_interval = \"300ms\"\nconverge_interval = \"300ms\"\n\
             isolation_timeout = \"30s\"\nlibvirt_restart = []\nhardware_watchdog = \"{fifo}\"\nwatchdog_timeout = \"3s\"\n\
             peer_listen = \"127.0.0.2:{peer_port}\"\npeer_port = {peer_port}\n",
            db.url()
        ),
    )
    .expect("config");
    let log = dir.path().join("guard.log");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
            .args(["-v", "watch", "--config", &config])
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log"))
            .spawn()
            .expect("guard")
    };
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let profile = |store: Store| async move {
        store.guard_fencing().await.expect("profiles").into_iter().find(|(h, _, _)| *h == n("node-w1"))
    };
    let mut guard = spawn();
    let mut reported = None;
    for _ in 0..100 {
        reported = profile(store.clone()).await.map(|(_, _, p)| p).filter(|p| p.quorum_cell.is_some());
        if reported.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = reported.unwrap_or_else(|| panic!("no fencing profile reported\n{}", read_log()));
    assert_eq!((p.watchdog_timeout_ms, p.heartbeat_interval_ms), (Some(3_000), 300), "{p:?}");
    assert_eq!(p.quorum_cell, Some(vec![n("node-w2")]), "{p:?}");
    // A clean stop with the database there: told, then disarmed.
    let _ = Command::new("kill").args(["-TERM", &guard.id().to_string()]).status();
    assert!(guard.wait().expect("wait").success());
    let fed = drain(&mut dog);
    assert!(fed.ends_with('V'), "disarmed: {fed:?}");
    let (_, _, after) = profile(store.clone()).await.expect("profile");
    assert_eq!(after.watchdog_timeout_ms, None, "the database was told first: {after:?}");

    // Again, then the database goes away and the guard is stopped: it cannot tell, so it
    // leaves the watchdog armed.
    let mut guard = spawn();
    wait_for("the watchdog armed and reported again", Duration::from_secs(20), || drain(&mut dog).contains('p'));
    for _ in 0..100 {
        if profile(store.clone()).await.is_some_and(|(_, _, p)| p.watchdog_timeout_ms == Some(3_000)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.close().await;
    assert!(db.set_reachable(false).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = Command::new("kill").args(["-TERM", &guard.id().to_string()]).status();
    let _ = guard.wait();
    let fed = drain(&mut dog);
    assert!(!fed.contains('V'), "disarmed though the database was not told: {fed:?}\n{}", read_log());
    assert!(read_log().contains("stays armed"), "{}", read_log());
    // Started again, still cut off: the isolation clock runs from the last contact.
    let mut guard = spawn();
    wait_for("the last contact found", Duration::from_secs(20), || read_log().contains("last reached the database"));
    let _ = Command::new("kill").args(["-KILL", &guard.id().to_string()]).status();
    let _ = guard.wait();
    assert!(db.set_reachable(true).await);
}
