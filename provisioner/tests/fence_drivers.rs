//! Each fence is driven on its own (`recovery::controller`, `Controller::run`): a fence
//! waiting on a BMC that accepts ForceOff and never powers off holds up neither another
//! host's fence nor the detection of a host that falls silent meanwhile. One real `serve` on
//! SQLite; a Redfish BMC in this test: node-a's lies (accepts ForceOff, stays `On`), the
//! others' power off when told. node-a and node-b fall silent together; node-e heartbeats
//! until node-a's fence is sending its commands, then falls silent too. While node-a's fence
//! is still in its first power-off attempt, node-b and node-e must be fenced and their HA
//! instances moved to the hosts that heartbeat. (Stepped inside one tick, as before, node-b's
//! evacuation waited for node-a's attempt, and the tick — detection — with it.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{free_port, serve_config, spawn_serve, wait_until};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{Generation, HostState, InstanceId, NewHost, NewInstance, Storage};

/// Power by system id; node-a's never goes off.
type Power = Arc<Mutex<HashMap<String, bool>>>;

async fn system(State(p): State<Power>, UrlPath(id): UrlPath<String>) -> Json<serde_json::Value> {
    let on = p.lock().expect("lock").get(&id).copied().unwrap_or(true);
    Json(serde_json::json!({ "Id": id, "PowerState": if on { "On" } else { "Off" } }))
}

async fn reset(
    State(p): State<Power>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<serde_json::Value>,
) -> axum::http::StatusCode {
    let off = body["ResetType"] == "ForceOff";
    if id != "node-a" {
        p.lock().expect("lock").insert(id, !off);
    }
    axum::http::StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_stuck_on_its_bmc_holds_up_neither_other_fences_nor_detection() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();

    let power: Power = Arc::default();
    let app = Router::new()
        .route("/redfish/v1/Systems/{id}", get(system))
        .route("/redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset", post(reset))
        .with_state(power.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bmc_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut ha = HashMap::new();
    for h in ["node-a", "node-b", "node-c", "node-d", "node-e"] {
        let bmc = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{h}");
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: Some(bmc), bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
        store.record_heartbeat(&n(h)).await.expect("heartbeat");
        let uuid = InstanceId::random();
        let i = NewInstance {
            uuid,
            name: format!("{h}-vm"),
            domain_xml: None,
            owner: n(h),
            ha: true,
            storage: Storage::Shared,
            generation: Generation(1),
        };
        store.import_instances(&[i], "test").await.expect("instance");
        ha.insert(h, uuid);
    }
    // node-c and node-d are heard all along; node-e until node-a's fence is under way.
    let beats = common::heartbeats(&store, &["node-c", "node-d"], Duration::from_millis(300));
    let e_beats = common::heartbeats(&store, &["node-e"], Duration::from_millis(300));

    // node-a's power-off attempt lasts 30 s (confirm_within): far longer than the rest needs.
    let sections = "[recovery]\ngrace = \"2s\"\ninterval = \"200ms\"\nnetwork_check_port = 0\n\
                    after_fence = \"nothing\"\nprobe_after = \"0s\"\n\
                    [bmc]\nconfirm_within = \"30s\"\npoll = \"100ms\"\ncommands = 1\n";
    let (config, _) = serve_config(&d, "provisioner", db.url(), free_port(), sections);
    let log = format!("{d}/serve.log");
    let _serve = spawn_serve(&config, &log);
    let serve_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let fence_at = async |h: &str| store.latest_operation(&n(h)).await.expect("read").filter(|o| o.kind == "fence");
    wait_until("node-a's fence to send its power-off", Duration::from_secs(30), async || {
        fence_at("node-a").await.is_some_and(|o| o.step == "power_off")
    })
    .await;
    let a_started = fence_at("node-a").await.expect("fence");
    e_beats.abort();

    let owner = async |h: &str| {
        store.instances(None).await.expect("read").into_iter().find(|i| i.uuid == ha[h]).expect("instance").owner
    };
    let heard = [n("node-c"), n("node-d")];
    wait_until("node-b's and node-e's HA instances on hosts that are heard", Duration::from_secs(25), async || {
        heard.contains(&owner("node-b").await) && heard.contains(&owner("node-e").await)
    })
    .await;
    // All this while node-a's fence was in its first power-off attempt: nothing moved it on.
    let a_now = fence_at("node-a").await.expect("fence");
    assert_eq!(
        (a_now.step.as_str(), a_now.attempts, a_now.updated_at),
        ("power_off", 0, a_started.updated_at),
        "node-a's fence moved on meanwhile; serve's log:\n{}",
        serve_log()
    );
    for (h, state) in [("node-a", HostState::Suspect), ("node-b", HostState::Fenced), ("node-e", HostState::Fenced)] {
        assert_eq!(store.host(&n(h)).await.expect("read").expect("host").state, state, "{h}");
    }
    assert_eq!(owner("node-a").await, n("node-a"), "nothing of node-a moves before it is fenced");
    beats.abort();
    store.close().await;
}
