//! Liveness is judged by the database's clock, not the writer's (issue "Safe under its own
//! faults", item 5). Two real guards heartbeat into PostgreSQL with their own clocks a minute
//! off — one behind, one ahead, by libfaketime — while a real `serve` (with the right clock)
//! watches them with a 3 s grace. Neither is taken for silent while it heartbeats, and the one
//! whose clock runs ahead turns suspect within the grace once it stops, not a minute later.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, guard_binary, serve_config, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{HostState, NewHost};

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_whose_clock_is_a_minute_off_is_neither_fenced_nor_missed() {
    let Some(db) = TestDb::postgres().await else { return };
    assert!(std::path::Path::new(FAKETIME).exists(), "libfaketime is missing (apt-get install faketime)");
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let guard = guard_binary();

    let mut guards = Vec::new();
    for (h, skew) in [("node-behind", "-60s"), ("node-ahead", "+60s")] {
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
        let config = format!("{d}/{h}.toml");
        std::fs::write(
            &config,
            format!(
                "host = \"{h}\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/{h}/qemu\"\nuri = \"test:///default\"\n\
                 [boot]\nstate_dir = \"{d}/{h}/state\"\ndb_wait = \"1s\"\n\
                 [watch]\nheartbeat_interval = \"500ms\"\nconverge_interval = \"1s\"\nmax_restarts = 0\nlibvirt_restart = []\n",
                db.url()
            ),
        )
        .expect("guard config");
        let child = Command::new(&guard)
            .args(["-v", "watch", "--config", &config])
            .env("LD_PRELOAD", FAKETIME)
            .env("FAKETIME", skew)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{config}.log")).expect("log"))
            .spawn()
            .expect("guard");
        guards.push((h, KillOnDrop(child)));
    }
    // Both heartbeat before the controller starts.
    let started = Instant::now();
    for (h, _) in &guards {
        while store.require_host(&n(h)).await.expect("host").last_heartbeat.is_none() {
            assert!(started.elapsed() < Duration::from_secs(30), "{h} never heartbeated");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let recovery = "[recovery]\ngrace = \"3s\"\ninterval = \"200ms\"\nlease_ttl = \"2s\"\nnetwork_check_port = 0\n";
    let (path, _) = serve_config(&d, "provisioner", db.url(), free_port(), recovery);
    let _serve = KillOnDrop(
        Command::new(PROVISIONER)
            .args(["-v", "serve", "--config", &path])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{d}/serve.log")).expect("log"))
            .spawn()
            .expect("serve"),
    );

    // Watched for four graces: both stay active, their heartbeats stamped with the database's
    // time (within a second of it), not their own.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(12) {
        let now = store.now().await.expect("now");
        for (h, _) in &guards {
            let host = store.require_host(&n(h)).await.expect("host");
            assert_eq!(host.state, HostState::Active, "{h} was taken for silent: {host:?}");
            let age = now.0 - host.last_heartbeat.expect("heartbeat").0;
            assert!((-1_000..2_000).contains(&age), "{h}'s heartbeat is stamped {age} ms before the database's now");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The one whose clock runs ahead dies: missed within the grace, not a minute later.
    let ahead = guards.iter().position(|(h, _)| *h == "node-ahead").expect("ahead");
    let (_, killed) = guards.remove(ahead);
    drop(killed);
    let died = Instant::now();
    loop {
        let host = store.require_host(&n("node-ahead")).await.expect("host");
        if host.state != HostState::Active {
            break;
        }
        assert!(
            died.elapsed() < Duration::from_secs(10),
            "node-ahead still active {:?} after its guard died: {host:?}\n{}",
            died.elapsed(),
            std::fs::read_to_string(format!("{d}/serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(died.elapsed() >= Duration::from_secs(2), "suspected before its grace: {:?}", died.elapsed());
    assert_eq!(store.require_host(&n("node-behind")).await.expect("host").state, HostState::Active);
    store.close().await;
}
