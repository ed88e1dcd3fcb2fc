//! The self-fence's quorum rule with real processes (issue "Safe under its own faults",
//! item 1): `serve` on the embedded SQLite and three `nodekeeper-guard watch` processes on the
//! guard API, each guard reaching the provisioner through a TCP proxy of this test (so one
//! host's link can be cut alone), and answering its peers on its own loopback address
//! (127.0.0.2–4, the cell-wide peer port). Each guard runs an HA instance
//! (`test:///default`, private to each guard process — and forgotten between its libvirt
//! connections, so the guards define and start it again and again: what is checked here is
//! what each guard decides, from its log and the database).
//!
//! 1. The provisioner stops for four isolation timeouts: every guard holds (its peers answer
//!    and none reaches the controller), no HA instance is stopped, and nothing is suspected
//!    when it returns.
//! 2. node-a's own link to the provisioner is cut for longer than the grace: its peers relay its
//!    heartbeat; it is neither suspected nor self-fenced.
//! 3. node-a is cut off from the provisioner and from its peers: it self-fences.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{free_port, guard_binary, serve_config, test_domain_xml, wait_until, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, Generation, HostState, InstanceId, NewHost, NewInstance, Storage, Store};

const HOSTS: [(&str, &str); 3] = [("node-a", "127.0.0.2"), ("node-b", "127.0.0.3"), ("node-c", "127.0.0.4")];

/// A TCP proxy to `target` that can be cut (existing connections dropped, new ones refused).
struct Link {
    port: u16,
    cut: Arc<AtomicBool>,
}

async fn link(target: u16) -> Link {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            if flag.load(Ordering::SeqCst) {
                continue; // dropped
            }
            let flag = flag.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                let watch = async {
                    while !flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! { _ = copy => {}, _ = watch => {} }
            });
        }
    });
    Link { port, cut }
}

async fn kinds(store: &Store, host: &str) -> Vec<String> {
    let filter = EventFilter { host: Some(n(host)), limit: Some(1000), ..Default::default() };
    store.events(&filter).await.expect("events").into_iter().map(|e| e.kind).collect()
}

async fn started(store: &Store, uuid: InstanceId) -> usize {
    let filter = EventFilter { instance: Some(uuid), limit: Some(1000), ..Default::default() };
    store.events(&filter).await.expect("events").iter().filter(|e| e.kind == "instance.started").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provisioner_outage_stops_nothing_and_only_a_host_cut_off_from_its_cell_fences_itself() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let mut ha = Vec::new();
    for (h, ip) in HOSTS {
        let new =
            NewHost { name: n(h), mac: None, ip: Some(ip.parse().expect("ip")), bmc_url: None, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
        let uuid = InstanceId::random();
        let name = format!("vm-{h}");
        let item = NewInstance {
            uuid,
            domain_xml: Some(test_domain_xml(&name, uuid)),
            name,
            owner: n(h),
            ha: true,
            storage: Storage::Shared,
            generation: Generation(1),
        };
        store.import_instances(&[item], "test").await.expect("import");
        ha.push(uuid);
    }

    // serve, with a 4 s grace: a host whose heartbeat stops turns suspect quickly.
    let port = free_port();
    let recovery = "[recovery]\ngrace = \"4s\"\ninterval = \"500ms\"\nlease_ttl = \"3s\"\nnetwork_check_port = 0\n";
    let (config, base) = serve_config(&d, "provisioner", db.url(), port, recovery);
    let serve_log = format!("{d}/serve.log");
    let start_serve = || {
        KillOnDrop(
            Command::new(PROVISIONER)
                .args(["-v", "serve", "--config", &config])
                .stdout(Stdio::null())
                .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&serve_log).expect("log"))
                .spawn()
                .expect("serve"),
        )
    };
    let serve = start_serve();
    let healthy = async || {
        Command::new("curl")
            .args(["-sf", "--max-time", "2", &format!("{base}/healthz")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    wait_until("serve answers", Duration::from_secs(30), healthy).await;

    let peer_port = free_port();
    let guard = guard_binary();
    let mut links = Vec::new();
    let mut guards = Vec::new();
    for (h, ip) in HOSTS {
        let out =
            Command::new(PROVISIONER).args(["--database-url", db.url(), "host", "token", h]).output().expect("token");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let token_file = format!("{d}/{h}.token");
        std::fs::write(&token_file, &out.stdout).expect("token file");
        let l = link(port).await;
        let guard_config = format!("{d}/{h}.toml");
        std::fs::write(
            &guard_config,
            format!(
                "host = \"{h}\"\ndatabase_url = \"http://127.0.0.1:{}\"\ntoken_file = \"{token_file}\"\n\
                 [libvirt]\nconfig_dir = \"{d}/{h}/qemu\"\nuri = \"test:///default\"\n\
                 [boot]\nstate_dir = \"{d}/{h}/state\"\ndb_wait = \"1s\"\n\
                 [watch]\nheartbeat_interval = \"500ms\"\nconverge_interval = \"1s\"\nisolation_timeout = \"2s\"\n\
                 max_restarts = 0\nlibvirt_restart = []\npeer_refresh = \"1s\"\npeer_listen = \"{ip}:{peer_port}\"\npeer_port = {peer_port}\n",
                l.port
            ),
        )
        .expect("guard config");
        let child = Command::new(&guard)
            .args(["-v", "watch", "--config", &guard_config])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{d}/{h}.log")).expect("log"))
            .spawn()
            .expect("guard");
        links.push(l);
        guards.push(Some(KillOnDrop(child)));
    }
    let log = |h: &str| std::fs::read_to_string(format!("{d}/{h}.log")).unwrap_or_default();
    for id in &ha {
        wait_until("every HA instance started", Duration::from_secs(30), async || started(&store, *id).await == 1)
            .await;
    }
    for (h, _) in HOSTS {
        let peers = format!("{d}/{h}/state/peers.json");
        wait_until("every peer list cached", Duration::from_secs(10), async || {
            std::fs::read_to_string(&peers).is_ok_and(|p| p.contains("\"cell_size\":3"))
        })
        .await;
    }

    // 1. The provisioner stops for four isolation timeouts: everyone holds.
    drop(serve);
    tokio::time::sleep(Duration::from_secs(8)).await;
    for (h, _) in HOSTS {
        let l = log(h);
        assert!(!l.contains("self-fenced"), "{h} self-fenced during a provisioner outage:\n{l}");
        assert!(l.contains("holding the instances"), "{h} says why it holds:\n{l}");
    }
    let _serve = start_serve();
    wait_until("serve answers again", Duration::from_secs(30), healthy).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (h, _) in HOSTS {
        assert_eq!(store.require_host(&n(h)).await.expect("host").state, HostState::Active, "{h}");
        assert!(!kinds(&store, h).await.contains(&"host.self_fenced".to_string()));
    }
    // 2. node-a's own link is cut for twice the grace: its peers relay its heartbeat.
    links[0].cut.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(8) {
        let a = store.require_host(&n("node-a")).await.expect("a");
        assert_eq!(a.state, HostState::Active, "node-a was suspected for a cut cable:\n{}", log("node-a"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let a_log = log("node-a");
    assert!(!a_log.contains("self-fenced"), "node-a self-fenced although its peers relay it:\n{a_log}");
    assert!(kinds(&store, "node-a").await.contains(&"host.heartbeat_relayed".to_string()));

    // 3. node-a is cut off from the provisioner and from its peers: it fences itself.
    guards[1] = None;
    guards[2] = None;
    let fenced = Instant::now();
    while !log("node-a").contains("self-fenced: stopped") {
        let l = log("node-a");
        let tail: Vec<&str> = l.lines().rev().take(20).collect();
        assert!(fenced.elapsed() < Duration::from_secs(20), "node-a did not self-fence:\n{}", tail.join("\n"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    links[0].cut.store(false, Ordering::SeqCst);
    store.close().await;
}
