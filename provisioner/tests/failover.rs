//! Recovery with real processes: `nodekeeper-provisioner serve` (its controller) and three
//! `nodekeeper-guard watch` processes, one per "host", on one SQLite database. Each guard has
//! its own libvirt (`test:///default` is private to each process), and each host a BMC: a
//! small Redfish endpoint in this test whose ForceOff kills that host's guard and whose On
//! starts it again (the test double for a machine's power; the Redfish driver itself is
//! tested against sushy-tools). node-a's guard is killed — the host hangs — and the test
//! follows — with two replicas of `serve`, the leading one killed first: suspect after the grace, fenced through its BMC, its HA instances given to node-b
//! and node-c, defined and started there by their guards, node-a powered on again and back
//! to active. It prints the time from node-a's last heartbeat to the last instance running
//! elsewhere.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{free_port, guard_binary, started_by, test_domain_xml, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{Generation, HostState, InstanceId, NewHost, NewInstance, OperationStatus, Storage, Timestamp};

/// The "machines": each host's power and its guard process.
#[derive(Default)]
struct Machines {
    on: HashMap<String, bool>,
    guards: HashMap<String, Child>,
    configs: HashMap<String, String>,
    guard: String,
    power_ons: HashMap<String, u32>,
}

impl Machines {
    fn boot(&mut self, host: &str) {
        let config = self.configs[host].clone();
        let log = std::fs::File::create(format!("{config}.log")).expect("log");
        let child = Command::new(&self.guard)
            .args(["-v", "watch", "--config", &config])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("guard");
        self.guards.insert(host.into(), child);
        self.on.insert(host.into(), true);
    }

    fn kill(&mut self, host: &str) {
        if let Some(mut c) = self.guards.remove(host) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        for (_, mut c) in self.guards.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

type Shared = Arc<Mutex<Machines>>;

async fn system(State(m): State<Shared>, UrlPath(id): UrlPath<String>) -> Json<serde_json::Value> {
    let on = m.lock().expect("lock").on.get(&id).copied().unwrap_or(false);
    Json(serde_json::json!({ "Id": id, "PowerState": if on { "On" } else { "Off" } }))
}

async fn reset(
    State(m): State<Shared>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<serde_json::Value>,
) -> axum::http::StatusCode {
    let mut m = m.lock().expect("lock");
    match body["ResetType"].as_str() {
        Some("ForceOff") => {
            m.kill(&id);
            m.on.insert(id, false);
        }
        Some("On") => {
            if !m.on.get(&id).copied().unwrap_or(false) {
                *m.power_ons.entry(id.clone()).or_default() += 1;
                m.boot(&id);
            }
        }
        _ => return axum::http::StatusCode::BAD_REQUEST,
    }
    axum::http::StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_host_is_fenced_and_its_ha_instances_run_elsewhere() {
    // NODEKEEPER_FAILOVER_DEFAULTS=1: the shipped intervals and grace (30 s), for the figure
    // in docs/performance.md; otherwise short ones, so the test takes seconds.
    let defaults = std::env::var("NODEKEEPER_FAILOVER_DEFAULTS").as_deref() == Ok("1");
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();

    let mut m = Machines::default();
    m.guard = guard_binary();
    let machines: Shared = Arc::new(Mutex::new(m));
    let app = Router::new()
        .route("/redfish/v1/Systems/{id}", get(system))
        .route("/redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset", post(reset))
        .with_state(machines.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bmc_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let hosts = ["node-a", "node-b", "node-c"];
    for h in hosts {
        let bmc = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{h}");
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: Some(bmc), bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
        let config = format!("{d}/{h}.toml");
        std::fs::write(
            &config,
            format!(
                "host = \"{h}\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/{h}/qemu\"\nuri = \"test:///default\"\n\
                 [boot]\nstate_dir = \"{d}/{h}/state\"\ndb_wait = \"1s\"\n\
                 [watch]\n{timing}max_restarts = 0\nlibvirt_restart = []\n",
                db.url(),
                timing = if defaults {
                    ""
                } else {
                    "heartbeat_interval = \"1s\"\nconverge_interval = \"1s\"\nisolation_timeout = \"4s\"\n"
                }
            ),
        )
        .expect("guard config");
        machines.lock().expect("lock").configs.insert(h.into(), config);
    }
    let items: Vec<NewInstance> = (0..4)
        .map(|i| {
            let uuid = InstanceId::random();
            let name = format!("vm-{i}");
            NewInstance {
                uuid,
                domain_xml: Some(test_domain_xml(&name, uuid)),
                name,
                owner: n("node-a"),
                ha: i < 3,
                storage: if i == 0 { Storage::Local } else { Storage::Shared },
                generation: Generation(1),
            }
        })
        .collect();
    store.import_instances(&items, "test").await.expect("import");
    let ha: Vec<InstanceId> = items.iter().take(3).map(|i| i.uuid).collect();

    for h in hosts {
        machines.lock().expect("lock").boot(h);
    }
    // Every instance running on node-a.
    let started = Instant::now();
    for id in items.iter().map(|i| i.uuid) {
        while started_by(&store, id).await.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(60), "node-a's guard never started {id}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The controller, with a 6 s grace.
    let http = free_port();
    std::fs::create_dir_all(format!("{d}/images")).expect("images");
    let config = format!("{d}/provisioner.toml");
    // (the base config; each replica gets its own copy with its own port)
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{http}\"\npublic_url = \"http://127.0.0.1:{http}\"\nimages_dir = \"{d}/images\"\n\
             [recovery]\n{timing}",
            db.url(),
            timing = if defaults { "" } else { "grace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\n" }
        ),
    )
    .expect("config");
    // Two replicas of serve: one controller acts, the other waits for its lease.
    let mut replicas: Vec<KillOnDrop> = Vec::new();
    for r in 0..2 {
        let port = free_port();
        let text = std::fs::read_to_string(&config)
            .expect("config")
            .replace(&format!("127.0.0.1:{http}"), &format!("127.0.0.1:{port}"));
        let path = format!("{d}/provisioner-{r}.toml");
        std::fs::write(&path, text).expect("replica config");
        let child = Command::new(PROVISIONER)
            .args(["serve", "--config", &path])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{d}/serve-{r}.log")).expect("log"))
            .spawn()
            .expect("serve");
        replicas.push(KillOnDrop(child));
    }
    tokio::time::sleep(Duration::from_secs(if defaults { 12 } else { 3 })).await;
    for h in hosts {
        assert_eq!(store.require_host(&n(h)).await.expect("host").state, HostState::Active, "{h} is healthy");
    }

    // The leading replica dies (SIGKILL, no release): the other takes the lease over once it
    // runs out, in a new term.
    let leader = store.leadership("controller").await.expect("read").expect("a leader");
    let pid: u32 = leader.holder.rsplit(':').next().and_then(|p| p.parse().ok()).expect("holder host:pid");
    let index = replicas.iter().position(|k| k.0.id() == pid).expect("the leader is one of ours");
    let mut dead = replicas.remove(index);
    let _ = dead.0.kill();
    let _ = dead.0.wait();

    // node-a hangs: its guard dies, its power stays on.
    machines.lock().expect("lock").kill("node-a");
    let last = store.require_host(&n("node-a")).await.expect("a").last_heartbeat.expect("a heartbeat");
    let mut elsewhere: HashMap<InstanceId, Timestamp> = HashMap::new();
    let limit = Instant::now();
    while elsewhere.len() < ha.len() {
        assert!(
            limit.elapsed() < Duration::from_secs(150),
            "not recovered: {elsewhere:?}\nserve logs:\n{}\n{}",
            std::fs::read_to_string(format!("{d}/serve-0.log")).unwrap_or_default(),
            std::fs::read_to_string(format!("{d}/serve-1.log")).unwrap_or_default()
        );
        for id in &ha {
            let runs: Vec<_> =
                started_by(&store, *id).await.into_iter().filter(|(actor, _)| actor != "guard:node-a").collect();
            if let Some((_, at)) = runs.first() {
                elsewhere.insert(*id, *at);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered = elsewhere.values().map(|t| t.0).max().expect("times");
    let took = Duration::from_millis(u64::try_from(recovered - last.0).unwrap_or(0));

    // Exactly one owner each, moved once, started once elsewhere; the non-HA one stayed.
    for id in &ha {
        let i = store.instance(*id).await.expect("get").expect("instance");
        assert!(i.owner != n("node-a") && i.generation == Generation(2), "{i:?}");
        let elsewhere_runs = started_by(&store, *id).await.into_iter().filter(|(a, _)| a != "guard:node-a").count();
        assert_eq!(elsewhere_runs, 1, "{id} started once on its new owner");
    }
    let plain = store.instance(items[3].uuid).await.expect("get").expect("instance");
    assert_eq!((plain.owner.as_str(), plain.generation), ("node-a", Generation(1)));
    let fence = store.latest_operation(&n("node-a")).await.expect("op").expect("fence");
    assert_eq!(fence.kind, "fence");

    // node-a was powered on again by the fence's restore; its guard heartbeats; active.
    let back = Instant::now();
    loop {
        let a = store.require_host(&n("node-a")).await.expect("a");
        if a.state == HostState::Active {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(60), "node-a not back: {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fence = store.operation(fence.id).await.expect("op").expect("fence");
    let now = store.leadership("controller").await.expect("read").expect("a leader");
    assert!(now.term > leader.term && now.holder != leader.holder, "{leader:?} then {now:?}");
    assert_eq!((fence.status, fence.step.as_str()), (OperationStatus::Done, "done"), "{fence:?}");
    assert_eq!(machines.lock().expect("lock").power_ons.get("node-a").copied(), Some(1));
    let grace = if defaults { "30 s, shipped intervals" } else { "6 s, 1 s intervals" };
    eprintln!(
        "failover: last heartbeat of node-a to its HA instances running on node-b/node-c: {took:?} (grace {grace})"
    );
    store.close().await;
}
