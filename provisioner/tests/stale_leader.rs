//! A leader that pauses past its lease acts no more when it wakes (issue "Safe under its own
//! faults", item 3). Two real `serve` replicas on PostgreSQL; a Redfish BMC in this test that
//! ignores ForceOff (so a fence sits in `power_off`, sending commands) and logs every command
//! with the sender's `User-Agent` (which names the replica). Replica A leads and starts the
//! fence; A is frozen with SIGSTOP until its lease expires and B has taken over in a new term
//! and sent a command of its own; then B is frozen too, and A thawed: until B's lease would
//! run out, nobody may act — and A, with its stale term, sends no BMC command and changes no
//! step.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{free_port, serve_config, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{NewHost, Operation, Store};

/// Every reset command: (when, user agent, reset type).
type Log = Arc<Mutex<Vec<(Instant, String, String)>>>;

async fn system(UrlPath(id): UrlPath<String>) -> Json<serde_json::Value> {
    // Never off: this BMC accepts ForceOff and does nothing (a classic).
    Json(serde_json::json!({ "Id": id, "PowerState": "On" }))
}

async fn reset(
    State(log): State<Log>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> axum::http::StatusCode {
    let ua = headers.get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let kind = body["ResetType"].as_str().unwrap_or_default().to_owned();
    log.lock().expect("lock").push((Instant::now(), ua, kind));
    axum::http::StatusCode::NO_CONTENT
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

fn sent_by(log: &Log, pid: u32) -> Vec<Instant> {
    let tag = format!(":{pid})");
    log.lock().expect("lock").iter().filter(|(_, ua, _)| ua.ends_with(&tag)).map(|(t, _, _)| *t).collect()
}

async fn wait_for<T>(
    what: &str,
    limit: Duration,
    logs: &dyn Fn() -> Vec<String>,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}; serve logs:\n{}", logs().join("\n----\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fence(store: &Store) -> Option<Operation> {
    store.latest_operation(&n("node-a")).await.expect("read").filter(|o| o.kind == "fence")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_sends_no_bmc_command_and_changes_no_step() {
    let Some(db) = TestDb::postgres().await else { return };
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();

    let log: Log = Arc::default();
    let app = Router::new()
        .route("/redfish/v1/Systems/{id}", get(system))
        .route("/redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset", post(reset))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bmc_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    for h in ["node-a", "node-b", "node-c"] {
        let bmc = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{h}");
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: Some(bmc), bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
    // node-b and node-c heartbeat; node-a, once, then never again.
    store.record_heartbeat(&n("node-a")).await.expect("heartbeat");
    let beats = common::heartbeats(&store, &["node-b", "node-c"], Duration::from_millis(300));

    let mut replicas: Vec<KillOnDrop> = Vec::new();
    let mut spawn = |r: usize| {
        let sections = "[recovery]\ngrace = \"2s\"\ninterval = \"200ms\"\nlease_ttl = \"3s\"\nbmc_attempts = 1000\n\
                        network_check_port = 0\nafter_fence = \"nothing\"\n\
                        [bmc]\nconfirm_within = \"500ms\"\npoll = \"100ms\"\ncommands = 1\n";
        let (path, _) = serve_config(&d, &format!("provisioner-{r}"), db.url(), free_port(), sections);
        let child = Command::new(PROVISIONER)
            .args(["-v", "serve", "--config", &path])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(format!("{d}/serve-{r}.log")).expect("log"))
            .spawn()
            .expect("serve");
        let pid = child.id();
        replicas.push(KillOnDrop(child));
        pid
    };
    let logs = || {
        (0..2).map(|r| std::fs::read_to_string(format!("{d}/serve-{r}.log")).unwrap_or_default()).collect::<Vec<_>>()
    };

    // A leads alone first; then B starts and waits for the lease.
    let a = spawn(0);
    let first = wait_for("A to lead", Duration::from_secs(20), &logs, async || {
        store.leadership("controller").await.expect("read").filter(|l| l.holder.ends_with(&format!(":{a}")))
    })
    .await;
    let b = spawn(1);
    // A marks node-a suspect, starts the fence and sends ForceOff (ignored) again and again.
    wait_for("A's power-off commands", Duration::from_secs(30), &logs, async || {
        (sent_by(&log, a).len() >= 2).then_some(())
    })
    .await;
    assert_eq!(fence(&store).await.expect("a fence").step, "power_off");

    // A freezes mid-fence. B takes the lease over in a new term and goes on with the fence.
    signal(a, "-STOP");
    let second = wait_for("B to take over", Duration::from_secs(20), &logs, async || {
        store.leadership("controller").await.expect("read").filter(|l| l.holder.ends_with(&format!(":{b}")))
    })
    .await;
    assert!(second.term > first.term, "{first:?} then {second:?}");
    let b_before = sent_by(&log, b).len();
    wait_for("B's own power-off command", Duration::from_secs(20), &logs, async || {
        (sent_by(&log, b).len() > b_before).then_some(())
    })
    .await;

    // B freezes too, holding a fresh lease; A thaws. Until B's lease would run out, any
    // command or step change could only be A's.
    signal(b, "-STOP");
    let lease = store.leadership("controller").await.expect("read").expect("lease");
    let until = lease.expires_at.0 - store.now().await.expect("now").0 - 300;
    assert!(until > 1_000, "B's lease has {until} ms left: too little to watch");
    let before = fence(&store).await.expect("fence");
    let a_sent = sent_by(&log, a).len();
    let thawed = Instant::now();
    signal(a, "-CONT");
    tokio::time::sleep(Duration::from_millis(u64::try_from(until).unwrap_or(0))).await;
    let after = fence(&store).await.expect("fence");
    let late: Vec<_> = sent_by(&log, a).into_iter().skip(a_sent).filter(|t| *t >= thawed).collect();
    signal(b, "-CONT");
    let [la, lb] = <[String; 2]>::try_from(logs()).expect("two logs");
    assert!(late.is_empty(), "the stale leader sent {} BMC commands after waking\nA:\n{la}\nB:\n{lb}", late.len());
    assert_eq!(before, after, "the stale leader changed the fence\nA:\n{la}");
    assert!(la.contains("no longer held"), "A says why it stopped:\n{la}");
    beats.abort();
    store.close().await;
}
