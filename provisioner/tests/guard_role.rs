//! Guards on PostgreSQL under a role that can do no more than the guard API (issue "Safe under
//! its own faults", should-fix): `db guard-role HOST` makes a login role whose only powers are
//! the guard functions, for its own host. A guard connected as it boots and works as with full
//! credentials (the same peer keys as the API's, to the byte); everything else — rewriting
//! ownership, pointing a BMC URL elsewhere, reading the cell secret or another host's domain
//! XML, writing events as the controller — is refused by PostgreSQL, and changes nothing.

mod common;

use std::process::Command;

use common::{guard_binary, PROVISIONER};
use nodekeeper_store::guard_api::GuardEvent;
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, GuardSession, InstanceId, NewHost, NewInstance, ReportedDomain, Storage, Store};

fn domain_xml(name: &str, uuid: InstanceId) -> String {
    format!("<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><memory>1024</memory></domain>")
}

/// Drops the test's role, whatever happens (roles outlive the test's database).
struct DropRole(String, String);

impl Drop for DropRole {
    fn drop(&mut self) {
        let (url, role) = (self.0.clone(), self.1.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().expect("runtime").block_on(async {
                let store = Store::connect(&url).await?;
                let dropped = store.drop_guard_role(&role).await;
                store.close().await;
                dropped
            })
        })
        .join();
        if !std::thread::panicking() {
            dropped.expect("join").expect("the guard role is dropped");
        }
    }
}

#[tokio::test]
async fn a_guard_role_does_what_the_guard_api_does_and_nothing_more() {
    let Some(db) = TestDb::postgres().await else { return };
    let admin = db.store().await;
    for (name, ip) in [("node-a", "10.20.0.11"), ("node-b", "10.20.0.12"), ("node-c", "10.20.0.13")] {
        let host = NewHost {
            name: n(name),
            mac: None,
            ip: Some(ip.parse().expect("ip")),
            bmc_url: None,
            bmc_credentials: None,
        };
        admin.add_host(&host, "test").await.expect("host");
        admin.record_heartbeat(&n(name)).await.expect("heartbeat");
    }
    let (a, b) = (InstanceId::random(), InstanceId::random());
    let items: Vec<NewInstance> = [(a, "vm-a", "node-a"), (b, "vm-b", "node-b")]
        .into_iter()
        .map(|(uuid, name, owner)| NewInstance {
            uuid,
            name: name.into(),
            owner: n(owner),
            ha: true,
            storage: Storage::Shared,
            generation: nodekeeper_store::Generation(1),
            domain_xml: Some(domain_xml(name, uuid)),
        })
        .collect();
    admin.import_instances(&items, "test").await.expect("import");

    let role = format!("nk_guard_t{}", std::process::id());
    let out = Command::new(PROVISIONER)
        .args(["--database-url", db.url(), "--json", "db", "guard-role", "node-a", "--role", &role])
        .output()
        .expect("guard-role");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _cleanup = DropRole(db.url().to_owned(), role.clone());
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let url = made["database_url"].as_str().expect("url").to_owned();
    assert!(url.contains(&role), "{url}");

    let guard_store = Store::connect(&url).await.expect("connect as the guard role");
    let session = GuardSession::open(&guard_store).await.expect("identity").expect("a guard role");
    assert_eq!(session.host(), &n("node-a"));
    assert!(GuardSession::open(&admin).await.expect("identity").is_none(), "the admin is no guard");
    guard_store.check_schema().await.expect("the schema check works");

    // What the guard API allows.
    let before = admin.require_host(&n("node-a")).await.expect("a").last_heartbeat;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    session.heartbeat().await.expect("heartbeat");
    assert!(admin.require_host(&n("node-a")).await.expect("a").last_heartbeat > before);
    let mut owners: Vec<(InstanceId, String)> = session
        .ownership(&[a, b])
        .await
        .expect("ownership")
        .into_iter()
        .map(|o| (o.uuid, o.owner.to_string()))
        .collect();
    owners.sort();
    let mut expected = vec![(a, "node-a".to_owned()), (b, "node-b".to_owned())];
    expected.sort();
    assert_eq!(owners, expected, "ownership of any instance, as guard boot needs");
    let assigned = session.assigned().await.expect("assigned");
    assert_eq!(assigned.iter().map(|i| i.uuid).collect::<Vec<_>>(), [a]);
    assert!(!assigned[0].held);
    // A held instance, and the service copies of this host only (0022, 0023).
    admin.hold_instances(&n("node-a"), &[a], true, "test", "a drain").await.expect("hold");
    assert!(session.assigned().await.expect("assigned")[0].held, "the role sees its hold");
    let svc = nodekeeper_store::Service {
        name: "sched".into(),
        copies: 2,
        labels: vec![],
        start: vec!["true".into()],
        stop: vec!["true".into()],
        check: Some(vec!["true".into()]),
        exclusive: true,
    };
    admin.put_service(&svc, "test").await.expect("service");
    for (slot, h) in [(0, "node-a"), (1, "node-b")] {
        let place = nodekeeper_store::CopyChange::Place { service: "sched".into(), slot, host: n(h) };
        admin.change_service_copy(&place, "test").await.expect("place");
    }
    let mine = session.services().await.expect("services");
    assert_eq!(
        mine.iter().map(|c| (c.service.as_str(), c.slot, c.exclusive)).collect::<Vec<_>>(),
        [("sched", 0, true)]
    );
    assert_eq!(mine[0].check.as_deref(), Some(&["true".to_owned()][..]));
    assert!(session.domain_xml(a).await.expect("xml").is_some_and(|x| x.contains("vm-a")));
    assert_eq!(session.domain_xml(b).await.expect("xml"), None, "another host's XML is not shown");
    session
        .save_report(&[ReportedDomain {
            uuid: a,
            running: true,
            generation: Some(nodekeeper_store::Generation(1)),
            migration_failed: None,
        }])
        .await
        .expect("report");
    assert_eq!(admin.guard_reports().await.expect("reports")[0].host, n("node-a"));
    let profile = nodekeeper_store::FencingProfile {
        self_fence: true,
        boot_blocks_ha: true,
        heartbeat_interval_ms: 5_000,
        isolation_timeout_ms: 20_000,
        libvirt_timeout_ms: 15_000,
        watchdog_timeout_ms: Some(60_000),
        quorum_cell: Some(vec![n("node-b")]),
        migration_uri: None,
    };
    session.save_fencing(&profile).await.expect("fencing profile");
    session.save_fencing(&profile).await.expect("replaced, not added");
    let saved = admin.guard_fencing().await.expect("profiles");
    assert_eq!(saved.iter().map(|(h, _, p)| (h.clone(), p.clone())).collect::<Vec<_>>(), [(n("node-a"), profile)]);
    let event =
        GuardEvent { kind: "instance.checked".into(), instance: Some(a), message: "m".into(), key: Some("k1".into()) };
    session.record_events(&[event.clone(), event]).await.expect("events");
    let events = admin.events(&EventFilter::default()).await.expect("events");
    let mine: Vec<_> = events.iter().filter(|e| e.kind == "instance.checked").collect();
    assert_eq!(mine.len(), 1, "the key makes a replay a no-op");
    assert_eq!((mine[0].actor.as_str(), mine[0].host.as_ref()), ("guard:node-a", Some(&n("node-a"))));
    let bad = GuardEvent { kind: "Not A Kind".into(), instance: None, message: "m".into(), key: None };
    assert!(session.record_events(&[bad]).await.is_err(), "kinds are checked as by the API");
    // The peer list, keys computed in the database: the same as the API hands out.
    assert_eq!(session.peers().await.expect("peers"), admin.peers_of(&n("node-a")).await.expect("peers"));
    let hb_b = admin.require_host(&n("node-b")).await.expect("b").last_heartbeat;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(session.relay(&n("node-b")).await.expect("relay"));
    assert!(admin.require_host(&n("node-b")).await.expect("b").last_heartbeat > hb_b);
    assert!(session.relay(&n("node-a")).await.is_err(), "not for itself");
    assert!(!session.relay(&n("node-z")).await.expect("relay"), "not for an unknown host");

    // And nothing more: every direct statement is refused, and changes nothing.
    for sql in [
        "UPDATE instances SET owner = 'node-a', generation = generation + 1",
        "UPDATE hosts SET bmc_url = 'redfish+http://10.20.0.11/redfish/v1/Systems/x' WHERE name = 'node-b'",
        "UPDATE hosts SET state = 'fenced' WHERE name = 'node-b'",
        "SELECT value FROM settings",
        "SELECT domain_xml FROM instances",
        "SELECT node_token_sha256 FROM hosts",
        "INSERT INTO events (at, actor, kind, message) VALUES (0, 'controller', 'host.fenced', 'forged')",
        "DELETE FROM guard_reports",
        "INSERT INTO guard_roles (role, host) VALUES ('x', 'node-b')",
        "UPDATE guard_roles SET host = 'node-b'",
        "CREATE TABLE mine (x INT)",
    ] {
        let e = guard_store.execute_raw(sql).await.expect_err(sql);
        assert!(e.contains("permission denied") || e.contains("does not exist"), "{sql}: {e}");
    }
    let o = admin.ownership(&[a, b]).await.expect("ownership");
    assert!(o.iter().all(|o| o.generation.0 == 1), "no owner changed: {o:?}");
    assert!(admin.require_host(&n("node-b")).await.expect("b").bmc_url.is_none());
    assert!(admin.events(&EventFilter::default()).await.expect("events").iter().all(|e| e.kind != "host.fenced"));
    // The role cannot call the guard functions as another host: they act for its own alone,
    // and a guard configured as another host refuses to start on it.
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    std::fs::create_dir_all(format!("{d}/qemu")).expect("qemu");
    std::fs::write(format!("{d}/qemu/vm-b.xml"), domain_xml("vm-b", b)).expect("stale xml");
    std::fs::write(format!("{d}/qemu/vm-a.xml"), domain_xml("vm-a", a)).expect("own xml");
    let boot = |host: &str| -> serde_json::Value {
        let config = format!("{d}/guard-{host}.toml");
        std::fs::write(
            &config,
            format!(
                "host = \"{host}\"\ndatabase_url = \"{url}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"test:///default\"\n\
                 [boot]\nstate_dir = \"{d}/state-{host}\"\ndb_wait = \"2s\"\n"
            ),
        )
        .expect("config");
        let out = Command::new(guard_binary()).args(["boot", "--json", "--config", &config]).output().expect("boot");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let wrong = boot("node-c");
    assert_ne!(wrong["database"], "ok", "{wrong}");
    assert!(std::path::Path::new(&format!("{d}/qemu/vm-b.xml")).exists(), "nothing done as another host");
    let report = boot("node-a");
    assert_eq!(report["database"], "ok", "{report}");
    assert!(!std::path::Path::new(&format!("{d}/qemu/vm-b.xml")).exists(), "node-b's instance quarantined: {report}");
    assert!(std::path::Path::new(&format!("{d}/qemu/vm-a.xml")).exists(), "its own kept");
    guard_store.close().await;
}
