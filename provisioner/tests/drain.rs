//! Drain with real processes (issue "The operator's surface"): `serve` (its controller) and
//! three `nodekeeper-guard watch` processes on one SQLite database, each guard with its own
//! libvirt (`test:///default`, private to its process).
//!
//! `host drain node-a` moves node-a's HA instances — each shut down by node-a's guard, then
//! started by its new owner's — and never are two hosts' guards seen running the same one
//! (sampled every 200 ms from their reports); node-a ends in maintenance, and its guard
//! dying there fences nothing and moves nothing. A drain the rest of the cell has no room for
//! is refused and changes nothing.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{
    free_port, guard_binary, guard_config, serve_config, spawn_serve, started_by, test_domain_xml, wait_until,
    PROVISIONER,
};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{Generation, HostState, InstanceId, NewHost, NewInstance, OperationStatus, Storage};

const HOSTS: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Kills (and reaps) the guards still running when dropped.
struct Reap(Arc<Mutex<HashMap<String, Child>>>);

impl Drop for Reap {
    fn drop(&mut self) {
        for (_, mut c) in self.0.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn instance(name: &str, owner: &str, ha: bool) -> NewInstance {
    let uuid = InstanceId::random();
    NewInstance {
        uuid,
        domain_xml: Some(test_domain_xml(name, uuid)),
        name: name.into(),
        owner: n(owner),
        ha,
        storage: Storage::Shared,
        generation: Generation(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_each_ha_instance_once_stopped_and_leaves_the_host_alone() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    for h in HOSTS {
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
    let mut items: Vec<NewInstance> = (0..3).map(|i| instance(&format!("vm-{i}"), "node-a", true)).collect();
    items.push(instance("vm-local", "node-a", false));
    items.push(instance("web-1", "node-b", true));
    items.push(instance("web-2", "node-b", true));
    store.import_instances(&items, "test").await.expect("import");
    let (ha, web): (Vec<InstanceId>, Vec<InstanceId>) =
        (items[..3].iter().map(|i| i.uuid).collect(), vec![items[4].uuid, items[5].uuid]);
    let plain = items[3].uuid;
    let cli = |args: &[&str]| {
        Command::new(PROVISIONER)
            .args(args)
            .env("NODEKEEPER_DATABASE_URL", db.url())
            .env_remove("RUST_LOG")
            .output()
            .expect("cli")
    };
    let out = cli(&["instance", "set", &web[0].to_string(), &web[1].to_string(), "--anti-affinity", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let guards: Arc<Mutex<HashMap<String, Child>>> = Arc::default();
    let _reap = Reap(guards.clone());
    let guard = guard_binary();
    for h in HOSTS {
        let config = guard_config(&d, h, db.url(), "peer_listen = \"off\"\nshutdown_timeout = \"5s\"\n");
        let log = std::fs::File::create(format!("{d}/{h}.log")).expect("log");
        let child = Command::new(&guard)
            .args(["-v", "watch", "--config", &config])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("guard");
        guards.lock().expect("lock").insert(h.into(), child);
    }
    wait_until("every instance running", Duration::from_secs(60), async || {
        let mut all = true;
        for i in &items {
            all &= !started_by(&store, i.uuid).await.is_empty();
        }
        all
    })
    .await;
    let http = free_port();
    let recovery = "[recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nafter_fence = \"nothing\"\n";
    let (config, _) = serve_config(&d, "provisioner", db.url(), http, recovery);
    let _serve = spawn_serve(&config, &format!("{d}/serve.log"));

    // An independent look, every 200 ms: which hosts' guards report each instance running.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One more HA instance comes to node-a while it is drained (held and moved too).
    let late = instance("vm-late", "node-a", true);
    let ours: std::collections::HashSet<InstanceId> = items.iter().chain([&late]).map(|i| i.uuid).collect();
    let sampler = {
        let (store, stop) = (db.store().await, stop.clone());
        tokio::spawn(async move {
            let (mut samples, mut worst) = (0usize, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(180);
            while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let reports = store.guard_reports().await.expect("reports");
                let mut running: HashMap<InstanceId, Vec<String>> = HashMap::new();
                for r in &reports {
                    // (The test driver's own `test` domain runs on every host: not an instance.)
                    for dom in r.domains.iter().filter(|d| d.running && ours.contains(&d.uuid)) {
                        running.entry(dom.uuid).or_default().push(r.host.to_string());
                    }
                }
                worst.extend(running.into_iter().filter(|(_, hosts)| hosts.len() > 1));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (samples, worst)
        })
    };

    let started = Instant::now();
    let out = cli(&["host", "drain", "node-a", "--timeout", "2m"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("drain of node-a started"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    store.import_instances(std::slice::from_ref(&late), "test").await.expect("a late import");
    wait_until("the drain of node-a done", Duration::from_secs(90), async || {
        store.latest_operation(&n("node-a")).await.expect("op").is_some_and(|o| o.status != OperationStatus::Running)
    })
    .await;
    let took = started.elapsed();
    let op = store.latest_operation(&n("node-a")).await.expect("op").expect("the drain");
    assert_eq!((op.kind.as_str(), op.status, op.step.as_str()), ("drain", OperationStatus::Done, "done"), "{op:?}");
    assert_eq!(store.require_host(&n("node-a")).await.expect("a").state, HostState::Maintenance);
    let owners: HashMap<InstanceId, (String, Generation, bool)> = store
        .instances(None)
        .await
        .expect("instances")
        .into_iter()
        .map(|i| (i.uuid, (i.owner.to_string(), i.generation, i.held)))
        .collect();
    for id in ha.iter().chain([&late.uuid]) {
        let (owner, generation, held) = &owners[id];
        assert!(owner != "node-a" && *generation == Generation(2) && !held, "{id}: {owner} {generation:?} held {held}");
        // Shut down on node-a, moved, then started by its new owner's guard.
        let filter = nodekeeper_store::EventFilter { instance: Some(*id), limit: Some(1000), ..Default::default() };
        let events = store.events(&filter).await.expect("events");
        let at = |kind: &str, actor: &str| {
            events
                .iter()
                .find(|e| e.kind == kind && e.actor.contains(actor))
                .map(|e| e.id)
                .unwrap_or_else(|| panic!("{kind} by {actor}: {events:?}"))
        };
        // (The late one may have been held before node-a's guard ever started it: no shutdown.)
        let down = if *id == late.uuid {
            events.iter().find(|e| e.kind == "instance.shutdown").map_or(0, |e| e.id)
        } else {
            at("instance.shutdown", "node-a")
        };
        let moved = at("instance.moved", "controller");
        let up = events
            .iter()
            .filter(|e| e.kind == "instance.started" && e.actor.contains(owner.as_str()))
            .map(|e| e.id)
            .max();
        wait_until("started by the new owner", Duration::from_secs(20), async || {
            started_by(&store, *id).await.iter().any(|(actor, _)| actor.contains(owner.as_str()))
        })
        .await;
        assert!(down < moved && up.is_none_or(|u| moved < u), "shutdown {down} < moved {moved} < started {up:?}");
    }
    assert_eq!(owners[&plain].0, "node-a", "a non-HA instance stays with its host");
    println!("drain of node-a: {} HA instances moved in {:.1} s", ha.len() + 1, took.as_secs_f64());

    // No room: web-1 and web-2 are anti-affine, node-a is in maintenance, only node-c is left.
    let before = store.instances(None).await.expect("instances");
    let out = cli(&["host", "drain", "node-b"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("no room for") && said.contains("nothing changed"), "{said}");
    assert_eq!(store.instances(None).await.expect("instances"), before, "nothing held, nothing moved");
    assert!(store.latest_operation(&n("node-b")).await.expect("op").is_none(), "no operation");

    // Left alone in maintenance: its guard dies, no fence, nothing moves.
    if let Some(mut g) = guards.lock().expect("lock").remove("node-a") {
        let _ = g.kill();
        let _ = g.wait();
    }
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await; // grace 6 s, 1 s ticks
    assert_eq!(store.require_host(&n("node-a")).await.expect("a").state, HostState::Maintenance);
    assert_eq!(store.latest_operation(&n("node-a")).await.expect("op").expect("op").id, op.id, "no fence");
    assert_eq!(store.instances(Some(&n("node-a"))).await.expect("i").len(), 1, "only the non-HA instance");
    // Out of maintenance only with a guard that heartbeats.
    tokio::time::sleep(Duration::from_secs(16).saturating_sub(killed.elapsed())).await;
    let out = cli(&["host", "maintenance", "node-a", "off"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("heartbeated"), "{said}");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (samples, doubles) = sampler.await.expect("sampler");
    assert!(samples > 50, "{samples} samples");
    assert!(doubles.is_empty(), "an instance reported running on two hosts: {doubles:?}");
}
