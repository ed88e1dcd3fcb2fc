//! Watchdog fencing with real processes (issue "Recovery when the BMC is gone"): `serve` (its
//! controller) and three `nodekeeper-guard watch` processes on one SQLite database, each guard
//! with its own libvirt (`test:///default`, private to its process: the domains live and die
//! with it), answering its peers on its own loopback address, and keeping a hardware watchdog
//! armed. There is no hardware watchdog here (and a softdog would reset this machine): each
//! guard's `/dev/watchdog` is a FIFO read by this test, which plays the watchdog — no ping for
//! its timeout, and it "resets the machine": SIGKILL of that host's guard, whose domains vanish
//! with it. node-a's BMC is dead (every request a 500).
//!
//! node-a hangs (SIGSTOP of its guard: nothing runs, nothing pings). The controller cannot
//! power it off; its guard reported an armed watchdog and an exact quorum, and node-b and
//! node-c heartbeat: the fence waits for the bound, then moves node-a's HA instances. They
//! start on node-b and node-c only after node-a was reset — never on two hosts — and never
//! before the bound the fence's event states.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{
    free_port, guard_binary, guard_config, serve_config, spawn_serve, started_by, test_domain_xml, wait_until,
};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{
    EventFilter, Generation, HostState, InstanceId, NewHost, NewInstance, OperationStatus, Storage, Timestamp,
};

const HOSTS: [(&str, &str); 3] = [("node-a", "127.0.0.2"), ("node-b", "127.0.0.3"), ("node-c", "127.0.0.4")];
/// The watchdogs' timeout (the guards' `watchdog_timeout`).
const WATCHDOG: Duration = Duration::from_secs(3);

/// The guards' processes, by host.
type Guards = Arc<Mutex<HashMap<String, Child>>>;

/// Kills (and reaps) every guard still running when dropped: at the test's end, or when it
/// panics (the watchdog threads hold the map too, so its own drop would never come).
struct Reap(Guards);

impl Drop for Reap {
    fn drop(&mut self) {
        let mut guards = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (_, mut c) in guards.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Plays the hardware watchdog of `host` on the reading end of its FIFO: armed by the first
/// ping, disarmed by 'V', and past `WATCHDOG` without a ping it resets the machine (kills the
/// guard) and records when, in the database's clock (SQLite: this machine's).
fn watchdog(host: &str, mut fifo: std::fs::File, guards: Guards, resets: Arc<Mutex<Vec<(String, Timestamp)>>>) {
    let host = host.to_owned();
    std::thread::spawn(move || {
        let (mut armed, mut last) = (false, Instant::now());
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut fifo, &mut buf) {
                Ok(n) if n > 0 => {
                    if buf[..n].contains(&b'p') {
                        (armed, last) = (true, Instant::now());
                    }
                    if buf[n - 1] == b'V' {
                        armed = false;
                    }
                }
                _ => {}
            }
            if armed && last.elapsed() > WATCHDOG {
                if let Some(mut guard) = guards.lock().expect("lock").remove(&host) {
                    let _ = guard.kill();
                    let _ = guard.wait();
                }
                resets.lock().expect("lock").push((host.clone(), Timestamp::now()));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_host_with_a_dead_bmc_is_fenced_by_its_watchdog_and_its_instances_never_run_twice() {
    hung_host_with_a_dead_bmc(false).await;
}

/// The same hang, the BMC as dead, but node-a hangs off a switched PDU outlet (a Redfish
/// outlet of this test's, whose `Off` cuts the machine's power: its guard killed): the fence's
/// PDU level confirms it off in the tick after the BMC gives up — no watchdog wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_host_with_a_dead_bmc_is_fenced_through_its_pdu_outlet() {
    hung_host_with_a_dead_bmc(true).await;
}

async fn hung_host_with_a_dead_bmc(pdu: bool) {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();

    let peer_port = free_port();
    let guards: Guards = Arc::default();
    let _reap = Reap(guards.clone());
    let resets: Arc<Mutex<Vec<(String, Timestamp)>>> = Arc::default();
    // Every BMC is dead: every request a 500. The PDU's outlets (one per host, named by it)
    // answer: Off cuts that machine's power.
    let outlets: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/{id}",
            axum::routing::get({
                let outlets = outlets.clone();
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let on = outlets.lock().expect("lock").get(&id).copied().unwrap_or(true);
                    async move { axum::Json(serde_json::json!({"Id": id, "PowerState": if on { "On" } else { "Off" }})) }
                }
            }),
        )
        .route(
            "/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/{id}/Actions/Outlet.PowerControl",
            axum::routing::post({
                let (outlets, guards, resets) = (outlets.clone(), guards.clone(), resets.clone());
                move |axum::extract::Path(id): axum::extract::Path<String>, axum::Json(body): axum::Json<serde_json::Value>| {
                    let on = body["PowerState"] == "On";
                    outlets.lock().expect("lock").insert(id.clone(), on);
                    if !on {
                        if let Some(mut guard) = guards.lock().expect("lock").remove(&id) {
                            let _ = guard.kill();
                            let _ = guard.wait();
                        }
                        resets.lock().expect("lock").push((format!("{id} (power cut)"), Timestamp::now()));
                    }
                    async { axum::http::StatusCode::NO_CONTENT }
                }
            }),
        )
        .fallback(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "the BMC is gone\n") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bmc_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut configs = HashMap::new();
    for (h, ip) in HOSTS {
        let bmc = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{h}");
        let new = NewHost {
            name: n(h),
            mac: None,
            ip: Some(ip.parse().expect("ip")),
            bmc_url: Some(bmc),
            bmc_credentials: None,
        };
        store.add_host(&new, "test").await.expect("host");
        let fifo = format!("{d}/{h}.watchdog");
        nix::unistd::mkfifo(fifo.as_str(), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&fifo)
            .expect("open the FIFO");
        watchdog(h, reader, guards.clone(), resets.clone());
        let watch = format!(
            "peer_refresh = \"1s\"\npeer_listen = \"{ip}:{peer_port}\"\npeer_port = {peer_port}\n\
             hardware_watchdog = \"{fifo}\"\nwatchdog_timeout = \"{}s\"\n",
            WATCHDOG.as_secs()
        );
        let config = guard_config(&d, h, db.url(), &watch);
        configs.insert(h, config);
    }
    let items: Vec<NewInstance> = (0..3)
        .map(|i| {
            let uuid = InstanceId::random();
            let name = format!("vm-{i}");
            NewInstance {
                uuid,
                domain_xml: Some(test_domain_xml(&name, uuid)),
                name,
                owner: n("node-a"),
                ha: true,
                storage: Storage::Shared,
                generation: Generation(1),
            }
        })
        .collect();
    store.import_instances(&items, "test").await.expect("import");
    if pdu {
        let url = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/node-a");
        let outlet = nodekeeper_store::HostOutlet { url, credentials: None };
        store.set_host_outlets(&n("node-a"), &[outlet], "test").await.expect("outlets");
    }
    let ha: Vec<InstanceId> = items.iter().map(|i| i.uuid).collect();
    let guard = guard_binary();
    for (h, _) in HOSTS {
        let log = std::fs::File::create(format!("{d}/{h}.log")).expect("log");
        let child = Command::new(&guard)
            .args(["-v", "watch", "--config", &configs[h]])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("guard");
        guards.lock().expect("lock").insert(h.into(), child);
    }
    wait_until("every instance running on node-a", Duration::from_secs(60), async || {
        let mut all = true;
        for id in &ha {
            all &= !started_by(&store, *id).await.is_empty();
        }
        all
    })
    .await;
    // node-a's guard has reported its armed watchdog and its whole cell.
    wait_until("node-a's fencing profile with its cell of three", Duration::from_secs(30), async || {
        store.guard_fencing().await.expect("profiles").iter().any(|(h, _, p)| {
            *h == n("node-a")
                && p.watchdog_timeout_ms == Some(3_000)
                && p.quorum_cell.as_ref().is_some_and(|c| c.len() == 2)
        })
    })
    .await;

    let http = free_port();
    let (config, _) = serve_config(
        &d,
        "provisioner",
        db.url(),
        http,
        "[recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nafter_fence = \"nothing\"\n",
    );
    let serve = spawn_serve(&config, &format!("{d}/serve.log"));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // node-a hangs: its guard is stopped, its domains with it (as a hung kernel stops all).
    let pid = guards.lock().expect("lock")["node-a"].id();
    let stopped =
        AtomicBool::new(Command::new("kill").args(["-STOP", &pid.to_string()]).status().is_ok_and(|s| s.success()));
    assert!(stopped.load(Ordering::SeqCst), "SIGSTOP");
    let last = store.require_host(&n("node-a")).await.expect("a").last_heartbeat.expect("heartbeat");
    let mut elsewhere: HashMap<InstanceId, Timestamp> = HashMap::new();
    let limit = Instant::now();
    while elsewhere.len() < ha.len() {
        if limit.elapsed() > Duration::from_secs(120) {
            let events = store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
            let said: Vec<String> =
                events.iter().map(|e| format!("{} {} {}: {}", e.at, e.actor, e.kind, e.message)).collect();
            panic!(
                "not recovered: {elsewhere:?}\nevents:\n{}\nserve log:\n{}",
                said.join("\n"),
                std::fs::read_to_string(format!("{d}/serve.log")).unwrap_or_default()
            );
        }
        for id in &ha {
            let runs: Vec<_> =
                started_by(&store, *id).await.into_iter().filter(|(actor, _)| actor != "guard:node-a").collect();
            if let Some((_, at)) = runs.first() {
                elsewhere.insert(*id, *at);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("the fence done", Duration::from_secs(30), async || {
        store.latest_operation(&n("node-a")).await.expect("op").is_some_and(|o| o.status != OperationStatus::Running)
    })
    .await;
    drop(serve);

    // node-a was reset by its watchdog (and, with the PDU, its power cut) before any of its
    // instances started elsewhere.
    let resets = resets.lock().expect("lock").clone();
    let reset = resets.iter().filter(|(h, _)| h.starts_with("node-a")).map(|(_, at)| *at).min().expect("node-a reset");
    assert!(resets.iter().all(|(h, _)| h.starts_with("node-a")), "only node-a was reset: {resets:?}");
    let first = elsewhere.values().map(|t| t.0).min().expect("times");
    assert!(first > reset.0, "started elsewhere at {first} while node-a ran until {}", reset.0);
    // Fenced by the watchdog level, its proof in the event, not before its bound.
    let fence = store.latest_operation(&n("node-a")).await.expect("op").expect("fence");
    assert_eq!(
        (fence.kind.as_str(), fence.status, fence.step.as_str()),
        ("fence", OperationStatus::Done, "done"),
        "{fence:?}"
    );
    let events = store
        .events(&EventFilter { host: Some(n("node-a")), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    let level = if pdu { "its 1 PDU outlet(s) switched off" } else { "fenced by its watchdog" };
    let proof = events.iter().find(|e| e.message.contains(level)).expect("the level's event");
    assert!(pdu || proof.message.contains("2 of the 3 hosts"), "{}", proof.message);
    assert_eq!(resets.iter().any(|(h, _)| h.ends_with("(power cut)")), pdu, "{resets:?}");
    assert!(first >= proof.at.0, "started before the fence's point of return");
    assert_eq!(store.require_host(&n("node-a")).await.expect("a").state, HostState::Fenced);
    for id in &ha {
        let i = store.instance(*id).await.expect("get").expect("instance");
        assert!(i.owner != n("node-a") && i.generation == Generation(2), "{i:?}");
        // Started by its new owner alone (again and again: `test:///default` forgets its
        // domains between the guard's connections, so each converge pass starts it anew).
        let starters: std::collections::BTreeSet<String> =
            started_by(&store, *id).await.into_iter().map(|(a, _)| a).filter(|a| a != "guard:node-a").collect();
        assert_eq!(starters, [format!("guard:{}", i.owner)].into(), "{id}: one new owner");
    }
    let took =
        Duration::from_millis(u64::try_from(elsewhere.values().map(|t| t.0).max().unwrap_or(0) - last.0).unwrap_or(0));
    eprintln!(
        "{}: last heartbeat of node-a to its HA instances running elsewhere: {took:?}; reset {:?} after its last \
         heartbeat; the fence's event: {}",
        if pdu { "PDU level" } else { "watchdog fencing" },
        Duration::from_millis(u64::try_from(reset.0 - last.0).unwrap_or(0)),
        proof.message
    );
    store.close().await;
}
