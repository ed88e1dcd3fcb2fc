//! Live migration in a drain (issue "The operator's surface"), with real parts: two real
//! libvirtds with the QEMU driver, each in its own mount and UTS namespace (its own
//! `/run/libvirt`, `/etc/libvirt` with its own host UUID, its own hostname — libvirt refuses
//! to migrate to "the same host"), both in one network namespace on two addresses of its loopback; a real
//! QEMU guest (TCG); `serve` with its controller and two `nodekeeper-guard watch` processes
//! on one SQLite database.
//!
//! `host drain node-a` sends node-a's HA instance (shared storage) live to node-b: it keeps
//! running throughout — sampled every 100 ms from both libvirts, it is never down on both
//! and never running on both — and arrives at generation 2 (its live XML says so), without a
//! shutdown and without node-b's guard starting or redefining it; node-a ends in maintenance.
//! A target whose libvirt cannot be reached makes the migration fail: the controller gives it
//! up, and the drain moves the instance cold (shut down, then started by node-b).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{
    free_port, guard_binary, netns_available, serve_config, spawn_serve, started_by, wait_until, PROVISIONER,
};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{Generation, HostState, InstanceId, NewHost, NewInstance, OperationStatus, Storage};

/// Two libvirtds (hosts `a` and `b`) in network namespace `netns`, on 10.77.0.2 and .3.
struct Pair {
    netns: String,
    dir: std::path::PathBuf,
    daemons: Vec<Child>,
}

impl Pair {
    /// `None` (skipped, or a panic under NODEKEEPER_REQUIRE_QEMU=1) without QEMU or libvirtd.
    fn start(dir: &std::path::Path) -> Option<Pair> {
        let have = |p: &str| std::path::Path::new(p).exists();
        if !netns_available() {
            return None;
        }
        if !(have("/usr/sbin/libvirtd") && have("/usr/bin/qemu-system-x86_64") && have("/usr/bin/unshare")) {
            assert!(
                std::env::var("NODEKEEPER_REQUIRE_QEMU").as_deref() != Ok("1"),
                "NODEKEEPER_REQUIRE_QEMU=1 but libvirtd, qemu-system-x86_64 or unshare is missing"
            );
            eprintln!("skipping: libvirtd, qemu-system-x86_64 and unshare are needed");
            return None;
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let netns = format!("nkmig{}x{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &netns]);
        let mut pair = Pair { netns: netns.clone(), dir: dir.to_path_buf(), daemons: Vec::new() };
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["-n", &netns, "addr", "add", "10.77.0.2/32", "dev", "lo"]);
        ip(&["-n", &netns, "addr", "add", "10.77.0.3/32", "dev", "lo"]);
        for (i, h) in ["a", "b"].into_iter().enumerate() {
            let d = dir.join(format!("libvirt-{h}"));
            for sub in ["etc", "run", "lib/qemu", "cache", "log/qemu"] {
                std::fs::create_dir_all(d.join(sub)).expect("dir");
            }
            let d = d.display().to_string();
            std::fs::write(
                format!("{d}/etc/libvirtd.conf"),
                format!(
                    "listen_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\nlisten_addr = \"10.77.0.{}\"\n\
                     host_uuid = \"00000000-0000-4000-8000-00000000000{}\"\nunix_sock_dir = \"{d}/run\"\n",
                    i + 2,
                    i + 2
                ),
            )
            .expect("libvirtd.conf");
            // Logs to files (no virtlogd in this namespace); no confinement of the guest.
            std::fs::write(format!("{d}/etc/qemu.conf"), "stdio_handler = \"file\"\nsecurity_driver = \"none\"\n")
                .expect("qemu.conf");
            let script = format!(
                "hostname nkmig-{h}\nmount -t tmpfs none /run/libvirt\nmount --bind {d}/etc /etc/libvirt\n\
                 mount --bind {d}/lib /var/lib/libvirt\nmount --bind {d}/cache /var/cache/libvirt\n\
                 mount --bind {d}/log /var/log/libvirt\nexec libvirtd --listen --pid-file {d}/pid\n"
            );
            std::fs::write(format!("{d}/start.sh"), script).expect("start.sh");
            let child = Command::new("ip")
                .args(["netns", "exec", &netns, "unshare", "-m", "-u", "--propagation", "private", "sh"])
                .arg(format!("{d}/start.sh"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(format!("{d}/libvirtd.log")).expect("log"))
                .spawn()
                .expect("libvirtd");
            pair.daemons.push(child);
        }
        for h in ["a", "b"] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !virsh(&pair.uri(h), &["version"]).0 {
                assert!(Instant::now() < deadline, "libvirtd of {h} did not answer: see {}", dir.display());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Some(pair)
    }

    /// The local URI of host `h`'s libvirtd (its socket in the test's directory).
    fn uri(&self, h: &str) -> String {
        format!("qemu+unix:///system?socket={}/libvirt-{h}/run/libvirt-sock", self.dir.display())
    }

    /// The URI its peer migrates to.
    fn migration_uri(h: &str) -> String {
        format!("qemu+tcp://10.77.0.{}/system", if h == "a" { 2 } else { 3 })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for h in ["a", "b"] {
            let uri = self.uri(h);
            let (_, list) = virsh(&uri, &["list", "--all", "--uuid"]);
            for uuid in list.split_whitespace() {
                virsh(&uri, &["destroy", uuid]);
                virsh(&uri, &["undefine", uuid]);
            }
        }
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
    }
}

/// `virsh -c URI ARGS…`: (success, stdout).
fn virsh(uri: &str, args: &[&str]) -> (bool, String) {
    match Command::new("virsh").arg("-c").arg(uri).args(args).stderr(Stdio::null()).output() {
        Ok(o) => (o.status.success(), String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Err(_) => (false, String::new()),
    }
}

/// The instance's state on a libvirt: `running`, `paused`, `shut off`, or "" when absent.
fn state(uri: &str, id: InstanceId) -> String {
    let (ok, out) = virsh(uri, &["domstate", &id.to_string()]);
    if ok {
        out
    } else {
        String::new()
    }
}

/// Kills (and reaps) the guards when dropped.
struct Reap(Vec<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn guard_config(dir: &str, h: &str, pair: &Pair, db_url: &str, migration_uri: &str) -> String {
    let path = format!("{dir}/node-{h}.toml");
    std::fs::write(
        &path,
        format!(
            "host = \"node-{h}\"\ndatabase_url = \"{db_url}\"\n[libvirt]\nconfig_dir = \"{dir}/node-{h}/qemu\"\n\
             uri = \"{}\"\nmigration_uri = \"{migration_uri}\"\n[boot]\nstate_dir = \"{dir}/node-{h}/state\"\n\
             db_wait = \"1s\"\n[watch]\nheartbeat_interval = \"1s\"\nconverge_interval = \"1s\"\n\
             isolation_timeout = \"4s\"\nlibvirt_timeout = \"10s\"\nmax_restarts = 0\nlibvirt_restart = []\n\
             peer_listen = \"off\"\nshutdown_timeout = \"5s\"\n",
            pair.uri(h)
        ),
    )
    .expect("guard config");
    path
}

/// A QEMU guest with no disk (its firmware finds nothing to boot and waits): all a live
/// migration needs, small enough to move in seconds under TCG.
fn instance(name: &str) -> NewInstance {
    let uuid = InstanceId::random();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"
    );
    NewInstance {
        uuid,
        domain_xml: Some(xml),
        name: name.into(),
        owner: n("node-a"),
        ha: true,
        storage: Storage::Shared,
        generation: Generation(1),
    }
}

/// One drain of node-a with its instance on it, the target's migration URI as given:
/// returns the store, the instance, the sampled states (a, b) and how long the drain took.
struct Run {
    db: TestDb,
    vm: InstanceId,
    samples: Vec<(String, String)>,
    took: Duration,
    _serve: common::KillOnDrop,
    _guards: Reap,
    pair: Pair,
    _dir: tempfile::TempDir,
}

/// `kill_source_guard`: node-a's guard is SIGKILLed once it has begun the migration, and
/// started again a second later.
async fn drain_with(b_migration_uri: &str, kill_source_guard: bool) -> Option<Run> {
    let mut dir = tempfile::tempdir().expect("dir");
    dir.disable_cleanup(std::env::var_os("NODEKEEPER_TEST_KEEP").is_some());
    let pair = Pair::start(dir.path())?;
    let d = dir.path().display().to_string();
    let db = TestDb::sqlite();
    let store = db.store().await;
    for h in ["node-a", "node-b"] {
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
    let vm = instance("mig-vm");
    store.import_instances(std::slice::from_ref(&vm), "test").await.expect("import");
    let guard = guard_binary();
    let mut guards = Reap(Vec::new());
    let spawn = |h: &str, config: &str| {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(format!("{d}/node-{h}.log")).expect("log");
        Command::new(&guard)
            .args(["-v", "watch", "--config", config])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("guard")
    };
    let mut configs = Vec::new();
    for (h, uri) in [("a", Pair::migration_uri("a")), ("b", b_migration_uri.to_owned())] {
        let config = guard_config(&d, h, &pair, db.url(), &uri);
        guards.0.push(spawn(h, &config));
        configs.push(config);
    }
    let (a, b) = (pair.uri("a"), pair.uri("b"));
    wait_until("the instance running on node-a", Duration::from_secs(60), async || state(&a, vm.uuid) == "running")
        .await;
    let http = free_port();
    let recovery = "[recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nafter_fence = \"nothing\"\n";
    let (config, _) = serve_config(&d, "provisioner", db.url(), http, recovery);
    let serve = spawn_serve(&config, &format!("{d}/serve.log"));
    wait_until("both guards announce their migration URI", Duration::from_secs(30), async || {
        let mut both = true;
        for h in ["node-a", "node-b"] {
            both &= store.guard_fencing_of(&n(h)).await.expect("profile").is_some_and(|p| p.migration_uri.is_some());
        }
        both
    })
    .await;

    // An independent look at both libvirts, every 100 ms, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, a, b, id) = (stop.clone(), a.clone(), b.clone(), vm.uuid);
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(240);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                // node-a before and after node-b: two `virsh` calls are not one instant (under
                // load, a switch-over falls between them). node-a's state is kept when it did not
                // change around node-b's, else "before>after" — never "running" on its own.
                let (before, there, after) = (state(&a, id), state(&b, id), state(&a, id));
                samples.push((if before == after { before } else { format!("{before}>{after}") }, there));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let started = Instant::now();
    let out = Command::new(PROVISIONER)
        .args(["host", "drain", "node-a", "--timeout", "3m"])
        .env("NODEKEEPER_DATABASE_URL", db.url())
        .env_remove("RUST_LOG")
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if kill_source_guard {
        let log = format!("{d}/node-a.log");
        wait_until("node-a's guard begins the migration", Duration::from_secs(30), async || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("live-migrating")
        })
        .await;
        let _ = guards.0[0].kill();
        let _ = guards.0[0].wait();
        tokio::time::sleep(Duration::from_secs(1)).await;
        guards.0[0] = spawn("a", &configs[0]);
    }
    wait_until("the drain of node-a done", Duration::from_secs(200), async || {
        store.latest_operation(&n("node-a")).await.expect("op").is_some_and(|o| o.status != OperationStatus::Running)
    })
    .await;
    let took = started.elapsed();
    // A few more looks: it stays where it is.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("sampler");
    let op = store.latest_operation(&n("node-a")).await.expect("op").expect("the drain");
    assert_eq!((op.kind.as_str(), op.status), ("drain", OperationStatus::Done), "{op:?}\nsee {d}");
    assert_eq!(store.require_host(&n("node-a")).await.expect("a").state, HostState::Maintenance);
    let i = store.instance(vm.uuid).await.expect("read").expect("instance");
    assert_eq!((i.owner.as_str(), i.generation, i.held, &i.migrating_to), ("node-b", Generation(2), false, &None));
    // A domain that leaves while a guard lists its libvirt is gone, not a libvirtd failure.
    for h in ["a", "b"] {
        let log = std::fs::read_to_string(format!("{d}/node-{h}.log")).expect("guard log");
        assert!(!log.contains("libvirtd is down"), "node-{h}'s guard took libvirtd for down:\n{log}");
    }
    drop(store);
    Some(Run { db, vm: vm.uuid, samples, took, _serve: serve, _guards: guards, pair, _dir: dir })
}

async fn events_of(db: &TestDb, vm: InstanceId) -> Vec<nodekeeper_store::Event> {
    let filter = nodekeeper_store::EventFilter { instance: Some(vm), limit: Some(1000), ..Default::default() };
    db.store().await.events(&filter).await.expect("events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_an_instance_on_shared_storage_live_and_it_never_stops_nor_runs_twice() {
    let Some(run) = drain_with(&Pair::migration_uri("b"), false).await else { return };
    let (a, b) = (run.pair.uri("a"), run.pair.uri("b"));
    // Never running on both; never down on both once it ran (a cold move would show a gap).
    let both: Vec<_> = run.samples.iter().filter(|(x, y)| x == "running" && y == "running").collect();
    assert!(both.is_empty(), "running on both hosts at once: {both:?}");
    // Up at either end of node-a's look (a change around node-b's look says nothing of a gap).
    let up = |s: &str| s.split('>').any(|s| s == "running" || s == "paused");
    let down: Vec<_> = run.samples.iter().filter(|(x, y)| !up(x) && !up(y)).collect();
    assert!(down.is_empty(), "down on both hosts ({} of {} samples): {down:?}", down.len(), run.samples.len());
    assert!(
        run.samples.iter().any(|(x, _)| x == "running")
            && run.samples.last().is_some_and(|(x, y)| x.is_empty() && y == "running")
    );
    // It arrived at generation 2; its definition left node-a.
    assert_eq!(state(&b, run.vm), "running");
    assert_eq!(state(&a, run.vm), "", "undefined on node-a");
    let (_, xml) = virsh(&b, &["dumpxml", &run.vm.to_string()]);
    assert!(xml.contains("generation=\"2\""), "{xml}");
    let (_, inactive) = virsh(&b, &["dumpxml", "--inactive", &run.vm.to_string()]);
    assert!(inactive.contains("generation=\"2\""), "persistent there, at generation 2: {inactive}");
    // Its story: migrating (controller) → migrated (node-a's guard) → moved (controller); no
    // shutdown, no hold, and node-b's guard neither started nor redefined it.
    let events = events_of(&run.db, run.vm).await;
    let at = |kind: &str, actor: &str| events.iter().find(|e| e.kind == kind && e.actor.contains(actor)).map(|e| e.id);
    let (migrating, migrated, moved) =
        (at("instance.migrating", "controller"), at("instance.migrated", "node-a"), at("instance.moved", "controller"));
    assert!(migrating.is_some() && migrated.is_some() && moved.is_some(), "{events:?}");
    assert!(migrating < migrated && migrated < moved, "{events:?}");
    for (kind, actor) in [
        ("instance.shutdown", ""),
        ("instance.held", ""),
        ("instance.started", "node-b"),
        ("instance.defined", "node-b"),
    ] {
        assert!(at(kind, actor).is_none(), "{kind} by {actor:?}: {events:?}");
    }
    assert_eq!(started_by(&run.db.store().await, run.vm).await.len(), 1, "started once, by node-a, at the beginning");
    let op = run.db.store().await.latest_operation(&n("node-a")).await.expect("op").expect("drain");
    let data: serde_json::Value = serde_json::from_str(&op.data).expect("data");
    assert_eq!((data["live"].as_u64(), data["moved"].as_u64()), (Some(1), Some(1)), "{data}");
    println!(
        "live drain of node-a: 1 instance migrated in {:.1} s (drain request to maintenance), {} samples, never down",
        run.took.as_secs_f64(),
        run.samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_that_fails_is_given_up_and_the_drain_moves_the_instance_cold() {
    // node-b announces a URI nothing answers on: the migration fails at its first step.
    let Some(run) = drain_with("qemu+tcp://10.77.0.3:1/system", false).await else { return };
    let b = run.pair.uri("b");
    let both: Vec<_> = run.samples.iter().filter(|(x, y)| x == "running" && y == "running").collect();
    assert!(both.is_empty(), "running on both hosts at once: {both:?}");
    wait_until("started by node-b", Duration::from_secs(30), async || state(&b, run.vm) == "running").await;
    let events = events_of(&run.db, run.vm).await;
    let at = |kind: &str, actor: &str| events.iter().find(|e| e.kind == kind && e.actor.contains(actor)).map(|e| e.id);
    let order = [
        at("instance.migrating", "controller"),
        at("instance.migration_failed", "node-a"),
        at("instance.migration_abandoned", "controller"),
        at("instance.held", "controller"),
        at("instance.shutdown", "node-a"),
        at("instance.moved", "controller"),
    ];
    assert!(order.iter().all(Option::is_some), "{order:?}: {events:?}");
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in this order: {order:?}");
    let op = run.db.store().await.latest_operation(&n("node-a")).await.expect("op").expect("drain");
    let data: serde_json::Value = serde_json::from_str(&op.data).expect("data");
    assert_eq!(data["moved"].as_u64(), Some(1), "{data}");
    println!("failed live migration given up, moved cold in {:.1} s", run.took.as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_guard_killed_mid_migration_leaves_it_to_end_and_it_never_runs_twice() {
    let Some(run) = drain_with(&Pair::migration_uri("b"), true).await else { return };
    let both: Vec<_> = run.samples.iter().filter(|(x, y)| x == "running" && y == "running").collect();
    assert!(both.is_empty(), "running on both hosts at once: {both:?}");
    assert_eq!(state(&run.pair.uri("b"), run.vm), "running");
    assert_eq!(state(&run.pair.uri("a"), run.vm), "", "gone from node-a");
    println!(
        "source guard killed mid-migration: drained in {:.1} s, {} samples",
        run.took.as_secs_f64(),
        run.samples.len()
    );
}
