//! Services with n active copies, with real processes (issue "Service failover with n
//! leaders"): `serve` (its controller) and three `nodekeeper-guard watch` processes on one
//! SQLite database; node-a's BMC is sushy-tools (libvirt's test driver). The services' copies
//! are real processes the guards start and stop through the services' commands, each leaving a
//! pid file named after its host.
//!
//! `sched` (one copy, exclusive, on hosts labelled `control`: node-a and node-b) and `web`
//! (two copies, anywhere) are placed and started. node-a dies (its guard and its copies
//! killed): `sched` moves to node-b — the only other labelled host — once node-a is fenced, and
//! at no sample (every 200 ms, from the processes themselves) do two copies of it run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{
    free_port, guard_binary, guard_config, serve_config, spawn_serve, sushy_test_driver, wait_until, BMC_VENV,
    PROVISIONER,
};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{HostState, NewHost};

/// Kills (and reaps) the guards, and the copies they started, when dropped.
struct Reap(std::sync::Arc<std::sync::Mutex<BTreeMap<String, Child>>>, PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, pid) in copies(&self.1) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

/// The copies' pid files: (file name `HOST.SERVICE.SLOT`, pid).
fn copies(dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().strip_suffix(".pid")?.to_owned();
            let pid = std::fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect()
}

/// Whether `pid` runs (and is not a zombie nobody reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Which hosts run a live copy of `service`.
fn running(dir: &Path, service: &str) -> Vec<String> {
    let mut hosts: Vec<String> = copies(dir)
        .into_iter()
        .filter(|(name, pid)| name.split('.').nth(1) == Some(service) && alive(*pid))
        .filter_map(|(name, _)| name.split('.').next().map(str::to_owned))
        .collect();
    hosts.sort();
    hosts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_copy_moves_off_a_dead_host_once_it_is_fenced_and_never_runs_twice() {
    if !Path::new(BMC_VENV).join("bin/sushy-emulator").exists() {
        assert!(std::env::var("NODEKEEPER_REQUIRE_BMC").as_deref() != Ok("1"), "sushy-tools is set up by make test");
        return;
    }
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");

    let (_sushy, bmc) = sushy_test_driver(&d).await;
    for h in ["node-a", "node-b", "node-c"] {
        let bmc = (h == "node-a").then(|| bmc.clone());
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: bmc, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
    let cli = |args: &[&str]| {
        let out = Command::new(PROVISIONER)
            .args(args)
            .env("NODEKEEPER_DATABASE_URL", db.url())
            .env_remove("RUST_LOG")
            .output()
            .expect("cli");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    cli(&["host", "labels", "node-a", "control"]);
    cli(&["host", "labels", "node-b", "control"]);
    let pid = format!("{}/$NK_HOST.$NK_SERVICE.$NK_SLOT.pid", run.display());
    let start = format!("sleep 600 >/dev/null 2>&1 </dev/null & echo $! > {pid}");
    let stop = format!("kill $(cat {pid}) 2>/dev/null; rm -f {pid}");
    let check = format!("kill -0 $(cat {pid} 2>/dev/null) 2>/dev/null");
    for (name, copies, extra) in [("sched", "1", &["--label", "control", "--exclusive"][..]), ("web", "2", &[][..])] {
        let mut args =
            vec!["service", "add", name, "--copies", copies, "--start", &start, "--stop", &stop, "--check", &check];
        args.extend_from_slice(extra);
        cli(&args);
    }

    let guards: std::sync::Arc<std::sync::Mutex<BTreeMap<String, Child>>> = Default::default();
    let _reap = Reap(guards.clone(), run.clone());
    let guard = guard_binary();
    for h in ["node-a", "node-b", "node-c"] {
        let config = guard_config(&d, h, db.url(), "peer_listen = \"off\"\n");
        let child = Command::new(&guard)
            .args(["-v", "watch", "--config", &config])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{d}/{h}.log")).expect("log"))
            .spawn()
            .expect("guard");
        guards.lock().expect("lock").insert(h.into(), child);
    }
    // The controller starts once every guard heartbeats: its first look places sched on
    // node-a (no copies anywhere yet; ties by name), the host with the BMC this test fences.
    wait_until("three guards heartbeating", Duration::from_secs(30), async || {
        store.hosts().await.expect("hosts").iter().all(|h| h.last_heartbeat.is_some())
    })
    .await;
    let recovery = "[recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nafter_fence = \"nothing\"\n";
    let (config, _) = serve_config(&d, "serve", db.url(), free_port(), recovery);
    let _serve = spawn_serve(&config, &format!("{d}/serve.log"));
    wait_until("sched on node-a, web on two hosts", Duration::from_secs(60), async || {
        running(&run, "sched") == ["node-a"] && running(&run, "web").len() == 2
    })
    .await;

    // The independent look, every 200 ms, from the processes.
    let stop_sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (run, stop) = (run.clone(), stop_sampling.clone());
        tokio::spawn(async move {
            let (mut samples, mut worst, mut on_c) = (0usize, 0usize, false);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let sched = running(&run, "sched");
                worst = worst.max(sched.len());
                on_c |= sched.iter().any(|h| h == "node-c");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (samples, worst, on_c)
        })
    };

    // node-a dies: its guard and the copies it runs.
    if let Some(mut g) = guards.lock().expect("lock").remove("node-a") {
        let _ = g.kill();
        let _ = g.wait();
    }
    for (name, pid) in copies(&run) {
        if name.starts_with("node-a.") {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
    let died = Instant::now();
    wait_until("sched running on node-b", Duration::from_secs(60), async || running(&run, "sched") == ["node-b"]).await;
    let took = died.elapsed();
    assert_eq!(store.require_host(&n("node-a")).await.expect("a").state, HostState::Fenced, "moved only once fenced");
    stop_sampling.store(true, std::sync::atomic::Ordering::SeqCst);
    let (samples, worst, on_c) = sampler.await.expect("sampler");
    assert!(samples > 20, "{samples} samples");
    assert!(worst <= 1, "two copies of the exclusive sched ran at once");
    assert!(!on_c, "sched ran on node-c, which lacks the label");
    wait_until("web on two live hosts", Duration::from_secs(30), async || {
        let web = running(&run, "web");
        web.len() == 2 && !web.contains(&"node-a".to_owned())
    })
    .await;
    let shown: serde_json::Value = serde_json::from_str(&cli(&["--json", "service", "show", "sched"])).expect("json");
    assert_eq!(shown["copies"][0]["host"], "node-b");
    assert_eq!(shown["copies"][0]["generation"], 2);
    let events =
        store.events(&nodekeeper_store::EventFilter { limit: Some(1000), ..Default::default() }).await.expect("e");
    assert!(events.iter().any(|e| e.kind == "service.moved" && e.message.contains("sched")), "dependents are told");
    let listed = cli(&["service", "list"]);
    assert!(listed.lines().any(|l| l.starts_with("sched ") && l.contains("node-b")), "{listed}");
    // Removed: its copies go, and node-b's guard stops what it started.
    assert_eq!(cli(&["service", "remove", "sched"]), "service sched removed (its copies are stopped)\n");
    wait_until("sched stopped on node-b", Duration::from_secs(20), async || running(&run, "sched").is_empty()).await;
    // Labels at `host add`, refused when malformed (and then no host is added).
    cli(&["host", "add", "node-d", "--label", "control", "--label", "rack-7"]);
    assert_eq!(cli(&["host", "labels", "node-d"]), "node-d: control, rack-7\n");
    let bad = Command::new(PROVISIONER)
        .args(["host", "add", "node-e", "--label", "no spaces"])
        .env("NODEKEEPER_DATABASE_URL", db.url())
        .output()
        .expect("cli");
    assert!(!bad.status.success() && store.host(&n("node-e")).await.expect("read").is_none());
    println!("services: sched moved off dead node-a and running on node-b {:.1} s after the death (grace 6 s); {samples} samples, at most {worst} copy", took.as_secs_f64());
}
