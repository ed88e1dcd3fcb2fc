//! The guard API with real processes: `nodekeeper-provisioner serve` on the embedded SQLite,
//! a node token minted by `host token`, and `nodekeeper-guard boot` and `watch` configured with
//! `database_url = "http://…"`, on the machine's real libvirtd (TCG domains of 32 MiB with no
//! disk; the `libvirt-guard` nextest group gives guards the machine's libvirtd in turn). Checked:
//! the API refuses requests without the host's own token and bad bodies, changing nothing; the
//! boot pass quarantines through it; the watch heartbeats, converges and reports through it;
//! and when the provisioner dies and its one peer does not answer (a minority of its cell), the
//! guard self-fences, then starts its HA instance again
//! once the provisioner is back and confirms it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{curl, free_port, guard_binary, wait_until, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::libvirtd_available;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, Generation, InstanceId, NewHost, NewInstance, Storage, Store};

const URI: &str = "qemu:///system";

fn domain_xml(name: &str, uuid: InstanceId) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices/></domain>"
    )
}

/// The test's domains, destroyed and undefined however the test ends.
struct Domains(Vec<InstanceId>);

impl Drop for Domains {
    fn drop(&mut self) {
        let Ok(mut conn) = virt::connect::Connect::open(Some(URI)) else { return };
        for id in &self.0 {
            if let Ok(dom) = virt::domain::Domain::lookup_by_uuid_string(&conn, &id.to_string()) {
                let _ = dom.destroy();
                let _ = dom.undefine();
            }
        }
        let _ = conn.close();
    }
}

struct Serve {
    config: String,
    log: String,
    child: Option<KillOnDrop>,
}

impl Serve {
    fn start(&mut self) {
        let child = Command::new(PROVISIONER)
            .args(["serve", "--config", &self.config])
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log"))
            .spawn()
            .expect("serve");
        self.child = Some(KillOnDrop(child));
    }

    fn kill(&mut self) {
        self.child = None;
    }
}

/// `(actor, kind)` of the events about `uuid`.
async fn events_of(store: &Store, uuid: InstanceId) -> Vec<(String, String)> {
    let filter = EventFilter { instance: Some(uuid), limit: Some(1000), ..Default::default() };
    store.events(&filter).await.expect("events").into_iter().map(|e| (e.actor, e.kind)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guard_reaches_the_embedded_database_through_the_provisioner() {
    if !libvirtd_available() {
        return;
    }
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    // node-b is a peer of node-a (an address, a heartbeat) whose guard does not answer: cut
    // off from the provisioner, node-a is cut off from its cell too (1 host of 2).
    for (h, ip) in [("node-a", "127.0.0.2"), ("node-b", "127.0.0.3")] {
        let ip = Some(ip.parse().expect("ip"));
        let new = NewHost { name: n(h), mac: None, ip, bmc_url: None, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
    store.record_heartbeat(&n("node-b")).await.expect("heartbeat");
    let peer_port = free_port();
    let items: Vec<NewInstance> = [("ha", "node-a", true), ("plain", "node-a", false), ("b", "node-b", true)]
        .into_iter()
        .map(|(name, owner, ha)| {
            let uuid = InstanceId::random();
            let name = format!("nk-api-{name}-{}", &uuid.to_string()[..8]);
            NewInstance {
                uuid,
                domain_xml: Some(domain_xml(&name, uuid)),
                name,
                owner: n(owner),
                ha,
                storage: Storage::Shared,
                generation: Generation(1),
            }
        })
        .collect();
    store.import_instances(&items, "test").await.expect("import");
    let (ha, plain, b) = (items[0].uuid, items[1].uuid, items[2].uuid);
    let _domains = Domains(vec![ha, plain, b]);

    // serve on the SQLite file; recovery off (nothing here has a BMC).
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    std::fs::create_dir_all(format!("{d}/images")).expect("images");
    let config = format!("{d}/provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"{base}\"\n\
             images_dir = \"{d}/images\"\n[recovery]\nenabled = false\n",
            db.url()
        ),
    )
    .expect("config");
    let mut serve = Serve { config, log: format!("{d}/serve.log"), child: None };
    serve.start();
    wait_until("serve answers", Duration::from_secs(30), async || curl(&[&format!("{base}/healthz")]).0 == 200).await;

    // Node tokens, minted by the CLI (printed once).
    let token_of = |h: &str| {
        let out = Command::new(PROVISIONER)
            .args(["--database-url", db.url(), "host", "token", h])
            .output()
            .expect("host token");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let token = token_of("node-a");
    let token_b = token_of("node-b");
    let bearer = format!("Authorization: Bearer {token}");
    let api = |rest: &str| format!("{base}/api/v1/hosts/node-a/guard/{rest}");

    // Refusals change nothing.
    assert_eq!(curl(&["-X", "POST", &api("heartbeat")]).0, 401, "no token");
    let wrong = format!("Authorization: Bearer {}", "x".repeat(40));
    assert_eq!(curl(&["-X", "POST", "-H", &wrong, &api("heartbeat")]).0, 401, "a wrong token");
    let other = format!("Authorization: Bearer {token_b}");
    assert_eq!(curl(&["-X", "POST", "-H", &other, &api("heartbeat")]).0, 401, "another host's token");
    let unknown = format!("{base}/api/v1/hosts/node-z/guard/heartbeat");
    assert_eq!(curl(&["-X", "POST", "-H", &bearer, &unknown]).0, 404, "an unknown host");
    assert!(store.require_host(&n("node-a")).await.expect("a").last_heartbeat.is_none());
    let xml_of_b = api(&format!("assigned/{b}/domain.xml"));
    assert_eq!(curl(&["-H", &bearer, &xml_of_b]).0, 404, "another host's instance XML is not shown");
    let (code, body) = curl(&["-H", &bearer, "-X", "PUT", "-d", "{not json", &api("report")]);
    assert_eq!(code, 400, "{body}");
    let bad_kind = r#"[{"kind":"Instance Started!","message":"x"}]"#;
    assert_eq!(curl(&["-H", &bearer, "-H", "Content-Type: application/json", "-d", bad_kind, &api("events")]).0, 400);
    let spoof = format!(r#"[{{"kind":"instance.checked","instance":"{ha}","message":"m","actor":"controller"}}]"#);
    assert_eq!(curl(&["-H", &bearer, "-d", &spoof, &api("events")]).0, 400, "a guard cannot set the actor");
    assert!(store.guard_reports().await.expect("reports").is_empty());
    let fencing = |body: &str, auth: bool| {
        let mut args = vec!["-X", "PUT", "-H", "Content-Type: application/json", "-d", body];
        if auth {
            args.extend(["-H", bearer.as_str()]);
        }
        let url = api("fencing");
        curl(&[args.as_slice(), &[url.as_str()]].concat()).0
    };
    assert_eq!(fencing(r#"{"self_fence":1}"#, true), 400, "a malformed profile");
    assert_eq!(fencing("{}", false), 401, "no token");
    assert!(store.guard_fencing().await.expect("profiles").is_empty());
    // Relays: not for oneself, not for a host that is not watched, not with a spoofed field.
    let relay =
        |body: &str| curl(&["-H", &bearer, "-H", "Content-Type: application/json", "-d", body, &api("relay")]).0;
    assert_eq!(relay(r#"{"host":"node-a"}"#), 400, "a host cannot relay itself");
    assert_eq!(relay(r#"{"host":"node-z"}"#), 409, "an unknown host is not relayed");
    assert_eq!(relay(r#"{"host":"node-b","at":1}"#), 400, "unknown fields");
    assert_eq!(curl(&["-X", "POST", "-d", r#"{"host":"node-b"}"#, &api("relay")]).0, 401, "no token");
    let hb_b = store.require_host(&n("node-b")).await.expect("b").last_heartbeat;
    assert_eq!(relay(r#"{"host":"node-b"}"#), 204, "node-a vouches for its peer node-b");
    assert!(store.require_host(&n("node-b")).await.expect("b").last_heartbeat > hb_b, "node-b's heartbeat relayed");
    // The peer list: node-b, with the key the pair shares, in a cell of two.
    let (code, body) = curl(&["-H", &bearer, &api("peers")]);
    assert_eq!(code, 200, "{body}");
    let peers: serde_json::Value = serde_json::from_str(&body).expect("peers JSON");
    assert_eq!((peers["cell_size"].as_u64(), peers["peers"][0]["host"].as_str()), (Some(2), Some("node-b")), "{peers}");
    assert_eq!(peers["peers"][0]["address"], "127.0.0.3");
    assert!(events_of(&store, ha).await.iter().all(|(_, k)| k != "instance.checked"));
    let event = format!(r#"[{{"kind":"instance.checked","instance":"{ha}","message":"m"}}]"#);
    assert_eq!(curl(&["-H", &bearer, "-d", &event, &api("events")]).0, 204);
    assert!(events_of(&store, ha).await.contains(&("guard:node-a".into(), "instance.checked".into())));

    // guard boot through the API: node-a still holds node-b's instance from before: quarantined.
    let token_file = format!("{d}/node-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let qemu = format!("{d}/node-a/qemu");
    std::fs::create_dir_all(&qemu).expect("qemu dir");
    std::fs::write(format!("{qemu}/b.xml"), items[2].domain_xml.as_deref().expect("xml")).expect("xml");
    std::fs::write(format!("{qemu}/ha.xml"), items[0].domain_xml.as_deref().expect("xml")).expect("xml");
    let guard_config = format!("{d}/guard.toml");
    std::fs::write(
        &guard_config,
        format!(
            "host = \"node-a\"\ndatabase_url = \"{base}\"\ntoken_file = \"{token_file}\"\n\
             [libvirt]\nconfig_dir = \"{qemu}\"\nuri = \"{URI}\"\n\
             [boot]\nstate_dir = \"{d}/node-a/state\"\ndb_wait = \"2s\"\n\
             [watch]\nheartbeat_interval = \"1s\"\nconverge_interval = \"1s\"\nisolation_timeout = \"3s\"\n\
             max_restarts = 0\nlibvirt_restart = []\npeer_listen = \"127.0.0.2:{peer_port}\"\npeer_port = {peer_port}\n"
        ),
    )
    .expect("guard config");
    let guard = guard_binary();
    let out = Command::new(&guard).args(["boot", "--json", "--config", &guard_config]).output().expect("boot");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("boot report");
    assert_eq!(report["database"], "ok", "{report}");
    assert_eq!(report["quarantined"], serde_json::json!([b.to_string()]), "{report}");
    assert_eq!(report["kept"], serde_json::json!([ha.to_string()]), "{report}");
    assert!(events_of(&store, b).await.contains(&("guard:node-a".into(), "instance.quarantined".into())));
    std::fs::remove_file(format!("{qemu}/ha.xml")).expect("rm");

    // guard watch through the API: heartbeats, defines and starts both of node-a's, reports.
    let log = format!("{d}/guard.log");
    let child = Command::new(&guard)
        .args(["watch", "--config", &guard_config])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("watch");
    let _watch = KillOnDrop(child);
    let started = |store: Store, id: InstanceId| async move {
        events_of(&store, id).await.iter().filter(|(a, k)| a == "guard:node-a" && k == "instance.started").count()
    };
    wait_until("both started on node-a", Duration::from_secs(30), async || {
        started(store.clone(), ha).await == 1 && started(store.clone(), plain).await == 1
    })
    .await;
    assert!(store.require_host(&n("node-a")).await.expect("a").last_heartbeat.is_some());
    wait_until("a report with both running", Duration::from_secs(10), async || {
        let reports = store.guard_reports().await.expect("reports");
        reports.iter().any(|r| {
            r.host == n("node-a") && [ha, plain].iter().all(|id| r.domains.iter().any(|d| d.uuid == *id && d.running))
        })
    })
    .await;

    // At rest the guard asks nothing: its heartbeat answers the host's revision, unchanged, and
    // its libvirt shows what it showed, so no pass re-sends the report (it would every second,
    // before fleet scale)...
    let report_at = async || {
        let reports = store.guard_reports().await.expect("reports");
        reports.iter().find(|r| r.host == n("node-a")).map(|r| r.at).expect("node-a's report")
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_rest = report_at().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(report_at().await, at_rest, "four passes at rest re-sent the report");
    // ... and an instance newly assigned (the revision moves) is started on the next pass.
    let later_id = InstanceId::random();
    let later_name = format!("nk-api-later-{}", &later_id.to_string()[..8]);
    let later = NewInstance {
        uuid: later_id,
        domain_xml: Some(domain_xml(&later_name, later_id)),
        name: later_name,
        owner: n("node-a"),
        ha: true,
        storage: Storage::Shared,
        generation: Generation(1),
    };
    let _later_domain = Domains(vec![later_id]);
    store.import_instances(std::slice::from_ref(&later), "test").await.expect("import");
    wait_until("the new instance started on node-a", Duration::from_secs(10), async || {
        started(store.clone(), later_id).await == 1
    })
    .await;
    assert!(report_at().await > at_rest, "the report after the change");

    // The guard has its peer list: node-b.
    let peers = format!("{d}/node-a/state/peers.json");
    wait_until("the peer list cached", Duration::from_secs(10), async || {
        std::fs::read_to_string(&peers).is_ok_and(|p| p.contains("node-b") && p.contains("\"cell_size\":2"))
    })
    .await;
    // And has told how it fences itself: the cell it counts (node-b), no watchdog armed.
    wait_until("the fencing profile reported", Duration::from_secs(10), async || {
        store.guard_fencing().await.expect("profiles").iter().any(|(h, _, p)| {
            *h == n("node-a") && p.quorum_cell == Some(vec![n("node-b")]) && p.watchdog_timeout_ms.is_none()
        })
    })
    .await;
    // The provisioner dies: node-a reaches neither it nor its peer (a minority of its cell):
    // cut off, the guard stops its HA instance (the plain one stays).
    serve.kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    serve.start();
    wait_until("the self-fence lifted and vm-ha started again", Duration::from_secs(30), async || {
        let lifted = store
            .events(&EventFilter { host: Some(n("node-a")), limit: Some(1000), ..Default::default() })
            .await
            .expect("events")
            .iter()
            .any(|e| e.kind == "host.self_fence_lifted");
        lifted && started(store.clone(), ha).await == 2
    })
    .await;
    let guard_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(started(store.clone(), plain).await, 1, "the non-HA instance was not stopped: {guard_log}");
    assert!(guard_log.contains("self-fenced: stopped 2 HA domains"), "{guard_log}");
    store.close().await;
}
