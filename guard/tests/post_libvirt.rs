//! `nodekeeper-guard boot --post-libvirt` against a real libvirtd with the QEMU driver
//! (`make test` starts one; domains are `type='qemu'`, software emulation).

use std::path::Path;
use std::process::Command;

use nodekeeper_store::testing::libvirtd_available;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, Generation, HostName, InstanceId, NewHost, NewInstance, Storage};
use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;

const URI: &str = "qemu:///system";

/// Destroys and undefines the test's domains however the test ends.
struct Cleanup(Vec<InstanceId>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(mut conn) = Connect::open(Some(URI)) else { return };
        for id in &self.0 {
            if let Ok(dom) = Domain::lookup_by_uuid_string(&conn, &id.to_string()) {
                let _ = dom.destroy();
                let _ = dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM);
            }
        }
        let _ = conn.close();
    }
}

fn xml(name: &str, uuid: InstanceId, generation: u64) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>\
         <metadata><nk:instance xmlns:nk='https://nodekeeper.dev/xmlns/instance/1' generation='{generation}' ha='true'/></metadata>\
         <os><type arch='x86_64'>hvm</type></os><devices/></domain>"
    )
}

fn host(name: &str) -> HostName {
    name.parse().expect("host")
}

/// Hosts node-a (this one) and node-b.
async fn add_hosts(store: &nodekeeper_store::Store) {
    for h in ["node-a", "node-b"] {
        let new = NewHost { name: host(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
}

fn exists(conn: &Connect, id: InstanceId) -> Option<bool> {
    Domain::lookup_by_uuid_string(conn, &id.to_string()).ok().map(|d| d.is_active().expect("state"))
}

/// Runs `boot --post-libvirt --json` for node-a with its files in `dir` and its state
/// directory at `state`; expects exit 0; returns the report.
fn post_libvirt_pass(db_url: &str, dir: &Path, state: &Path) -> Value {
    let config = dir.join("guard.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"node-a\"\ndatabase_url = \"{db_url}\"\n[libvirt]\nconfig_dir = \"{}\"\nuri = \"{URI}\"\n[boot]\nstate_dir = \"{}\"\ndb_wait = \"5s\"\n",
            dir.join("unused").display(),
            state.display()
        ),
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"))
        .args(["boot", "--post-libvirt", "--json", "--config"])
        .arg(&config)
        .output()
        .expect("run guard");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[tokio::test]
async fn stale_domains_are_removed_and_running_ones_only_when_recovered_elsewhere() {
    if !libvirtd_available() {
        return;
    }
    let [moved_running, moved_off, moved_transient, mine, deleted_running, stranger] =
        std::array::from_fn::<_, 6, _>(|_| InstanceId::random());
    let _cleanup = Cleanup(vec![moved_running, moved_off, moved_transient, mine, deleted_running, stranger]);
    let tag = &moved_running.to_string()[..8];

    // The database: three recovered on node-b, one mine, one deleted; the stranger unknown.
    let db = TestDb::sqlite();
    let store = db.store().await;
    add_hosts(&store).await;
    let rows = [
        (moved_running, "node-b"),
        (moved_off, "node-b"),
        (moved_transient, "node-b"),
        (mine, "node-a"),
        (deleted_running, "node-a"),
    ];
    let items: Vec<_> = rows
        .iter()
        .map(|(uuid, owner)| NewInstance {
            uuid: *uuid,
            name: format!("nk-{uuid}"),
            owner: host(owner),
            ha: true,
            storage: Storage::Shared,
            generation: Generation(if *owner == "node-b" { 2 } else { 1 }),
            domain_xml: None,
        })
        .collect();
    store.import_instances(&items, "test").await.expect("import");
    store.delete_instances(&[deleted_running], "test").await.expect("delete");

    // libvirt: what a host that was down might have.
    let mut conn = Connect::open(Some(URI)).expect("connect to libvirtd");
    for (uuid, name, start) in [
        (moved_running, "moved-running", true),
        (moved_off, "moved-off", false),
        (mine, "mine", true),
        (deleted_running, "deleted-running", true),
        (stranger, "stranger", false),
    ] {
        let dom = Domain::define_xml(&conn, &xml(&format!("nk-{tag}-{name}"), uuid, 1)).expect("define");
        if start {
            dom.create().expect("start");
        }
    }
    Domain::create_xml(&conn, &xml(&format!("nk-{tag}-transient"), moved_transient, 1), 0).expect("transient");

    let dir = tempfile::tempdir().expect("dir");
    let report = post_libvirt_pass(db.url(), dir.path(), &dir.path().join("state"));
    let ids = |key: &str| -> Vec<String> {
        let mut v: Vec<String> =
            report[key].as_array().expect(key).iter().map(|x| x.as_str().expect("uuid").to_owned()).collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(report["database"], "ok");
    assert_eq!(ids("destroyed"), sorted(vec![moved_running.to_string(), moved_transient.to_string()]), "{report}");
    assert_eq!(ids("undefined"), sorted(vec![moved_running.to_string(), moved_off.to_string()]), "{report}");
    assert_eq!(ids("kept"), vec![mine.to_string()]);
    assert!(ids("unknown").contains(&stranger.to_string()));
    assert_eq!(report["left_running"][0]["uuid"], deleted_running.to_string());
    assert_eq!(report["left_running"][0]["reason"], "deleted");
    assert!(report["errors"].as_array().expect("errors").is_empty(), "{report}");

    // libvirt now: the recovered ones are gone, the rest as they were.
    assert_eq!(exists(&conn, moved_running), None);
    assert_eq!(exists(&conn, moved_off), None);
    assert_eq!(exists(&conn, moved_transient), None);
    assert_eq!(exists(&conn, mine), Some(true), "this host's domain keeps running");
    assert_eq!(exists(&conn, deleted_running), Some(true), "not recovered elsewhere: left running");
    assert_eq!(exists(&conn, stranger), Some(false), "unknown: left alone");
    let _ = conn.close();

    // Nothing deleted: each removed domain's XML is in quarantine.
    let saved: Vec<String> = std::fs::read_dir(dir.path().join("state/quarantine"))
        .expect("quarantine")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("read"))
        .collect();
    for id in [moved_running, moved_off, moved_transient] {
        assert_eq!(saved.iter().filter(|x| x.contains(&id.to_string())).count(), 1, "{id} saved once");
    }
    let events = store
        .events(&EventFilter { host: Some(host("node-a")), limit: Some(100), ..Default::default() })
        .await
        .expect("events");
    let kinds: Vec<_> = events.iter().filter(|e| e.actor == "guard:node-a").map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "instance.destroyed").count(), 2, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "instance.undefined").count(), 2, "{kinds:?}");
}

/// A mount made by the test, undone however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_running_copy_recovered_elsewhere_is_destroyed_even_when_its_xml_cannot_be_saved() {
    if !libvirtd_available() {
        return;
    }
    let moved = InstanceId::random();
    let _cleanup = Cleanup(vec![moved]);
    let db = TestDb::sqlite();
    let store = db.store().await;
    add_hosts(&store).await;
    let item = NewInstance {
        uuid: moved,
        name: format!("nk-{moved}"),
        owner: host("node-b"),
        ha: true,
        storage: Storage::Shared,
        generation: Generation(2),
        domain_xml: None,
    };
    store.import_instances(&[item], "test").await.expect("import");
    let mut conn = Connect::open(Some(URI)).expect("connect to libvirtd");
    let name = format!("nk-{}-ro", &moved.to_string()[..8]);
    let dom = Domain::define_xml(&conn, &xml(&name, moved, 1)).expect("define");
    dom.create().expect("start");
    dom.set_autostart(true).expect("autostart");

    // The state directory is read-only: the XML cannot be saved to quarantine/.
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let s = state.display().to_string();
    assert!(Command::new("mount").args(["--bind", &s, &s]).status().expect("mount").success());
    let _mount = Mount(state.clone());
    assert!(Command::new("mount").args(["-o", "remount,bind,ro", &s]).status().expect("mount").success());
    let report = post_libvirt_pass(db.url(), dir.path(), &state);
    assert_eq!(report["destroyed"], serde_json::json!([moved.to_string()]), "{report}");
    assert!(!report["errors"].as_array().expect("errors").is_empty(), "said loudly: {report}");
    // Not running, still defined (nothing lost), no autostart.
    assert_eq!(exists(&conn, moved), Some(false), "destroyed, kept defined");
    let dom = Domain::lookup_by_uuid_string(&conn, &moved.to_string()).expect("defined");
    assert!(!dom.get_autostart().expect("autostart"), "autostart off");
    let _ = conn.close();
}
