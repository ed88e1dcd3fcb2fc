//! `nodekeeper-guard boot` as systemd runs it: the real binary on real files, against a
//! throwaway SQLite file and a throwaway database on a real PostgreSQL server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nodekeeper_store::on_both_engines;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, Generation, HostName, InstanceId, NewHost, NewInstance, Storage, Store};
use serde_json::Value;

on_both_engines!(
    stale_definitions_are_quarantined_byte_for_byte,
    a_crash_at_any_step_loses_nothing_and_the_rerun_finishes,
    an_unreachable_database_blocks_ha_autostarts_until_it_confirms,
    an_unknown_host_name_quarantines_nothing,
);

const NK: &str = "https://nodekeeper.dev/xmlns/instance/1";

/// A compute host's files: `etc/libvirt/qemu` (+ `autostart/`), `var/lib/nodekeeper`, a config.
struct Node {
    root: tempfile::TempDir,
}

impl Node {
    fn new(url: &str) -> Node {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(root.path().join("etc/libvirt/qemu/autostart")).expect("config dir");
        let node = Node { root };
        node.configure("node-a", url, "2s", "block-ha");
        node
    }

    fn config_dir(&self) -> PathBuf {
        self.root.path().join("etc/libvirt/qemu")
    }
    fn state_dir(&self) -> PathBuf {
        self.root.path().join("var/lib/nodekeeper")
    }
    fn config(&self) -> PathBuf {
        self.root.path().join("guard.toml")
    }

    fn configure(&self, host: &str, url: &str, db_wait: &str, policy: &str) {
        let text = format!(
            "host = \"{host}\"\ndatabase_url = \"{url}\"\n[libvirt]\nconfig_dir = \"{}\"\n[boot]\nstate_dir = \"{}\"\ndb_wait = \"{db_wait}\"\non_db_unreachable = \"{policy}\"\n",
            self.config_dir().display(),
            self.state_dir().display()
        );
        std::fs::write(self.config(), text).expect("write config");
    }

    /// Writes `NAME.xml` as libvirt would, with an absolute autostart link when asked.
    fn define(&self, name: &str, uuid: InstanceId, meta: Option<(u64, bool)>, autostart: bool) -> PathBuf {
        let metadata = meta
            .map(|(g, ha)| format!("  <metadata>\n    <nk:instance xmlns:nk=\"{NK}\" generation=\"{g}\" ha=\"{ha}\"/>\n  </metadata>\n"))
            .unwrap_or_default();
        let xml = format!(
            "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n{metadata}  <memory unit='KiB'>65536</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n</domain>\n"
        );
        let path = self.config_dir().join(format!("{name}.xml"));
        std::fs::write(&path, xml).expect("write domain");
        if autostart {
            std::os::unix::fs::symlink(&path, self.autostart(name)).expect("autostart link");
        }
        path
    }

    fn autostart(&self, name: &str) -> PathBuf {
        self.config_dir().join(format!("autostart/{name}.xml"))
    }

    fn boot(&self, env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodekeeper-guard"));
        cmd.args(["boot", "--json", "--config"]).arg(self.config()).env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run nodekeeper-guard")
    }

    /// Runs `boot --json`, expects exit 0, returns the report.
    fn report(&self) -> Value {
        let out = self.boot(&[]);
        assert!(out.status.success(), "boot failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
    }

    /// Every file under the node's root: content for files, target for links.
    fn tree(&self) -> BTreeMap<PathBuf, String> {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, String>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(root).expect("under root").to_path_buf();
                let ft = e.file_type().expect("file type");
                if ft.is_symlink() {
                    out.insert(rel, format!("-> {}", std::fs::read_link(&p).expect("link").display()));
                } else if ft.is_dir() {
                    walk(&p, root, out);
                } else {
                    out.insert(rel, String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.root.path(), self.root.path(), &mut out);
        out
    }
}

fn host(name: &str) -> HostName {
    name.parse().expect("host")
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is an array: {v}"))
        .iter()
        .map(|x| x.as_str().expect("uuid string").to_owned())
        .collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The database: hosts node-a, node-b; instances as given (uuid, owner, generation, ha, deleted).
async fn database(db: &TestDb, rows: &[(InstanceId, &str, u64, bool, bool)]) -> Store {
    let store = db.store().await;
    for h in ["node-a", "node-b"] {
        store
            .add_host(&NewHost { name: host(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None }, "test")
            .await
            .expect("host");
    }
    let items: Vec<NewInstance> = rows
        .iter()
        .map(|(uuid, owner, g, ha, _)| NewInstance {
            uuid: *uuid,
            name: format!("vm-{uuid}"),
            owner: host(owner),
            ha: *ha,
            storage: Storage::Shared,
            generation: Generation(*g),
            domain_xml: None,
        })
        .collect();
    store.import_instances(&items, "test").await.expect("import");
    let deleted: Vec<InstanceId> = rows.iter().filter(|r| r.4).map(|r| r.0).collect();
    if !deleted.is_empty() {
        store.delete_instances(&deleted, "test").await.expect("delete");
    }
    store
}

/// The standard scene: one definition per contract row, all with autostart links.
struct Scene {
    kept: InstanceId,
    moved: InstanceId,
    deleted: InstanceId,
    behind: InstanceId,
    unknown: InstanceId,
    no_meta_kept: InstanceId,
}

async fn scene(db: &TestDb) -> (Node, Store, Scene) {
    let s = Scene {
        kept: InstanceId::random(),
        moved: InstanceId::random(),
        deleted: InstanceId::random(),
        behind: InstanceId::random(),
        unknown: InstanceId::random(),
        no_meta_kept: InstanceId::random(),
    };
    let store = database(
        db,
        &[
            (s.kept, "node-a", 2, true, false),
            (s.moved, "node-b", 3, true, false),
            (s.deleted, "node-a", 1, false, true),
            (s.behind, "node-a", 5, true, false),
            (s.no_meta_kept, "node-a", 9, false, false),
        ],
    )
    .await;
    let node = Node::new(db.url());
    node.define("kept", s.kept, Some((2, true)), true);
    node.define("moved", s.moved, Some((2, true)), true);
    node.define("deleted", s.deleted, Some((1, false)), true);
    node.define("behind", s.behind, Some((4, true)), true);
    node.define("unknown", s.unknown, Some((1, true)), true);
    node.define("nometa", s.no_meta_kept, None, false);
    std::fs::write(node.config_dir().join("broken.xml"), "<domain><name>broken</name>").expect("broken xml");
    (node, store, s)
}

async fn stale_definitions_are_quarantined_byte_for_byte(db: TestDb) {
    let (node, store, s) = scene(&db).await;
    let before = node.tree();
    let report = node.report();

    assert_eq!(report["host"], "node-a");
    assert_eq!(report["database"], "ok");
    assert_eq!(ids(&report, "kept"), sorted(vec![s.kept.to_string(), s.no_meta_kept.to_string()]));
    assert_eq!(
        ids(&report, "quarantined"),
        sorted(vec![s.moved.to_string(), s.deleted.to_string(), s.behind.to_string()])
    );
    assert_eq!(ids(&report, "unknown"), vec![s.unknown.to_string()]);
    assert!(ids(&report, "blocked").is_empty() && ids(&report, "restored").is_empty());
    let errors = report["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{report}");
    assert!(errors[0]["path"].as_str().expect("path").ends_with("broken.xml"));
    assert!(errors[0]["reason"].as_str().expect("reason").contains("malformed XML"));

    // Byte-identical, named with the UUID, out of config_dir, autostart links gone.
    let after = node.tree();
    for (name, uuid) in [("moved", s.moved), ("deleted", s.deleted), ("behind", s.behind)] {
        let original = &before[&PathBuf::from(format!("etc/libvirt/qemu/{name}.xml"))];
        let q = PathBuf::from(format!("var/lib/nodekeeper/quarantine/{uuid}.{name}.xml"));
        assert_eq!(after.get(&q), Some(original), "{name} quarantined byte for byte");
        assert!(!node.config_dir().join(format!("{name}.xml")).exists(), "{name} left config_dir");
        assert!(!node.autostart(name).exists(), "{name}'s autostart link removed");
    }
    for name in ["kept", "unknown"] {
        assert!(node.autostart(name).exists(), "{name} keeps its autostart");
    }
    assert!(node.config_dir().join("broken.xml").exists(), "malformed XML left in place");
    assert!(!node.state_dir().join("journal.json").exists(), "journal cleared once events are in");

    // One event per quarantine, filed under this host.
    let events = store
        .events(&EventFilter { host: Some(host("node-a")), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    let q: Vec<_> = events.iter().filter(|e| e.kind == "instance.quarantined").collect();
    assert_eq!(q.len(), 3, "{events:?}");
    assert!(
        q.iter().any(|e| e.instance == Some(s.moved) && e.message.contains("owned by node-b (generation 3)")),
        "{q:?}"
    );
    assert!(q.iter().all(|e| e.actor == "guard:node-a"));

    // A second run right after changes nothing.
    let again = node.report();
    assert!(ids(&again, "quarantined").is_empty(), "{again}");
    assert_eq!(ids(&again, "kept"), ids(&report, "kept"));
    assert_eq!(node.tree(), after, "the second run changed files");
    let events2 = store
        .events(&EventFilter { host: Some(host("node-a")), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    assert_eq!(events2.len(), events.len(), "the second run recorded events");
}

async fn a_crash_at_any_step_loses_nothing_and_the_rerun_finishes(db: TestDb) {
    let stale = [InstanceId::random(), InstanceId::random(), InstanceId::random()];
    let kept = InstanceId::random();
    let rows: Vec<_> =
        stale.iter().map(|u| (*u, "node-b", 2, true, false)).chain([(kept, "node-a", 1, true, false)]).collect();
    let store = database(&db, &rows).await;
    for point in ["after-journal", "after-unlink", "after-move", "after-moves", "after-events"] {
        let node = Node::new(db.url());
        let mut originals = BTreeMap::new();
        for (i, u) in stale.iter().enumerate() {
            let p = node.define(&format!("vm{i}"), *u, Some((1, true)), true);
            originals.insert(*u, std::fs::read(&p).expect("read"));
        }
        node.define("keep", kept, Some((1, true)), true);

        let crashed = node.boot(&[("NODEKEEPER_CRASH_AT", point)]);
        assert!(!crashed.status.success(), "{point}: the fault point was not reached");
        // Nothing lost at the crash: every definition is in config_dir or in quarantine.
        for (u, bytes) in &originals {
            let copies = find_copies(&node, *u);
            assert!(copies.iter().any(|c| c == bytes), "{point}: {u} lost at the crash");
        }

        let report = node.report();
        assert_eq!(report["database"], "ok", "{point}");
        for (i, u) in stale.iter().enumerate() {
            assert!(!node.config_dir().join(format!("vm{i}.xml")).exists(), "{point}: {u} still in config_dir");
            let copies = find_copies(&node, *u);
            assert_eq!(copies, vec![originals[u].clone()], "{point}: {u}: one byte-identical copy, in quarantine");
        }
        assert_eq!(ids(&report, "kept"), vec![kept.to_string()], "{point}");
        assert!(node.autostart("keep").exists(), "{point}");
        assert!(!node.state_dir().join("journal.json").exists(), "{point}: journal finished");
        let again = node.report();
        assert!(ids(&again, "quarantined").is_empty(), "{point}: third run had work left: {again}");
    }
    // Exactly one event per quarantined file, crash or not (5 scenarios x 3 files).
    let events = store
        .events(&EventFilter { host: Some(host("node-a")), limit: Some(1000), ..Default::default() })
        .await
        .expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "instance.quarantined").count(), 15, "{events:#?}");
}

/// Contents of every file holding `uuid` in config_dir (top level) and quarantine/.
fn find_copies(node: &Node, uuid: InstanceId) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dir in [node.config_dir(), node.state_dir().join("quarantine")] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let bytes = std::fs::read(e.path()).expect("read");
                if String::from_utf8_lossy(&bytes).contains(&uuid.to_string())
                    && !e.file_name().to_string_lossy().starts_with('.')
                {
                    out.push(bytes);
                }
            }
        }
    }
    out
}

async fn an_unreachable_database_blocks_ha_autostarts_until_it_confirms(db: TestDb) {
    let (mine_ha, mine_plain, moved, no_meta) =
        (InstanceId::random(), InstanceId::random(), InstanceId::random(), InstanceId::random());
    let _store = database(
        &db,
        &[
            (mine_ha, "node-a", 1, true, false),
            (mine_plain, "node-a", 1, false, false),
            (moved, "node-b", 2, true, false),
            (no_meta, "node-a", 1, false, false),
        ],
    )
    .await;
    let node = Node::new(db.url());
    node.define("mine-ha", mine_ha, Some((1, true)), true);
    node.define("mine-plain", mine_plain, Some((1, false)), true);
    node.define("moved", moved, Some((1, true)), true);
    node.define("no-meta", no_meta, None, true);

    // A first boot with the database fills the cache: no-meta is not HA.
    let first = node.report();
    assert_eq!(ids(&first, "quarantined"), vec![moved.to_string()]);
    node.define("moved", moved, Some((1, true)), true); // the stale copy comes back (restored from a backup, say)

    // Database down: a port where nothing listens.
    node.configure("node-a", "postgres://nk:hunter2@127.0.0.1:1/nk", "1s", "block-ha");
    let started = std::time::Instant::now();
    let down = node.report();
    assert!(started.elapsed() >= std::time::Duration::from_millis(700), "retried for db_wait");
    assert_eq!(down["database"], "unreachable");
    assert!(down["database_error"].as_str().expect("why").contains("127.0.0.1:1"), "{down}");
    assert!(!down.to_string().contains("hunter2"), "password leaked: {down}");
    assert!(ids(&down, "quarantined").is_empty() && ids(&down, "kept").is_empty());
    assert_eq!(
        ids(&down, "blocked"),
        sorted(vec![mine_ha.to_string(), moved.to_string()]),
        "HA ones only; no-meta is not HA per the cache"
    );
    assert!(!node.autostart("mine-ha").exists() && !node.autostart("moved").exists());
    assert!(node.autostart("mine-plain").exists() && node.autostart("no-meta").exists());
    assert!(node.state_dir().join("blocked/mine-ha.xml").exists());
    assert!(node.config_dir().join("moved.xml").exists(), "nothing quarantined without the database");
    // Still down: the same state, reported the same way.
    let tree = node.tree();
    let down2 = node.report();
    assert_eq!(ids(&down2, "blocked"), ids(&down, "blocked"));
    assert_eq!(node.tree(), tree);

    // block-all blocks the rest too.
    node.configure("node-a", "postgres://nk:hunter2@127.0.0.1:1/nk", "0s", "block-all");
    let all = node.report();
    assert_eq!(ids(&all, "blocked").len(), 4);

    // The database is back: what is confirmed mine gets its autostart back, the stale copy goes.
    node.configure("node-a", db.url(), "5s", "block-ha");
    let back = node.report();
    assert_eq!(back["database"], "ok");
    assert_eq!(ids(&back, "restored"), sorted(vec![mine_ha.to_string(), mine_plain.to_string(), no_meta.to_string()]));
    assert_eq!(ids(&back, "quarantined"), vec![moved.to_string()]);
    assert!(ids(&back, "blocked").is_empty());
    for name in ["mine-ha", "mine-plain", "no-meta"] {
        assert!(node.autostart(name).exists(), "{name} autostart restored");
    }
    assert!(!node.autostart("moved").exists());
    let blocked_left: Vec<_> = std::fs::read_dir(node.state_dir().join("blocked")).expect("blocked dir").collect();
    assert!(blocked_left.is_empty(), "blocked/ emptied");
    assert!(
        std::fs::symlink_metadata(node.state_dir().join(format!("quarantine/{moved}.moved.xml.autostart"))).is_ok(),
        "the stale link is kept, inert"
    );
}

async fn an_unknown_host_name_quarantines_nothing(db: TestDb) {
    let moved = InstanceId::random();
    let store = database(&db, &[(moved, "node-b", 2, true, false)]).await;
    let node = Node::new(db.url());
    node.configure("node-typo", db.url(), "1s", "block-ha");
    node.define("moved", moved, Some((1, true)), true);
    let report = node.report();
    assert_eq!(report["database"], "ok");
    assert!(ids(&report, "quarantined").is_empty());
    assert_eq!(ids(&report, "blocked"), vec![moved.to_string()]);
    let reason = report["errors"][0]["reason"].as_str().expect("reason");
    assert!(reason.contains("host node-typo is not in the database's host table"), "{reason}");
    assert!(node.config_dir().join("moved.xml").exists());
    let events =
        store.events(&EventFilter { host: Some(host("node-typo")), ..Default::default() }).await.expect("events");
    assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["guard.host-unknown"]);
}

#[tokio::test]
async fn a_database_that_comes_up_during_db_wait_is_used() {
    let db = TestDb::sqlite();
    let moved = InstanceId::random();
    let store = database(&db, &[(moved, "node-b", 2, true, false)]).await;
    store.close().await;
    // The database file appears 1.5 s into the guard's wait.
    let real = db.url().trim_start_matches("sqlite://").to_owned();
    let late = format!("{real}.late");
    let node = Node::new(&format!("sqlite://{late}"));
    node.configure("node-a", &format!("sqlite://{late}"), "20s", "block-ha");
    node.define("moved", moved, Some((1, true)), true);
    let mover = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::rename(format!("{real}{suffix}"), format!("{late}{suffix}"));
        }
        std::fs::rename(&real, &late).expect("move the database into place");
    });
    let report = node.report();
    mover.join().expect("mover");
    assert_eq!(report["database"], "ok", "{report}");
    assert_eq!(ids(&report, "quarantined"), vec![moved.to_string()]);
}

#[test]
fn an_unusable_config_exits_non_zero_and_touches_nothing() {
    let node = Node::new("sqlite:///nonexistent/nk.db");
    let uuid = InstanceId::random();
    node.define("vm", uuid, Some((1, true)), true);
    let tree = node.tree();
    for (text, want) in [
        ("host = \"node-a\"\n", "missing field `database_url`"),
        (
            "host = \"node-a\"\ndatabase_url = \"sqlite:///x.db\"\n[boot]\ndb_wait = \"forever\"\n",
            "expected a duration",
        ),
    ] {
        std::fs::write(node.config(), text).expect("config");
        let out = node.boot(&[]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_file(node.config()).expect("rm");
    let out = node.boot(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading config"));
    let mut after = node.tree();
    let mut before = tree;
    before.retain(|p, _| !p.ends_with("guard.toml"));
    after.retain(|p, _| !p.ends_with("guard.toml"));
    assert_eq!(after, before);
}

#[tokio::test]
async fn odd_autostart_layouts_are_handled() {
    let db = TestDb::sqlite();
    let (moved, kept) = (InstanceId::random(), InstanceId::random());
    let _store = database(&db, &[(moved, "node-b", 2, true, false), (kept, "node-a", 1, true, false)]).await;
    let node = Node::new(db.url());
    // No autostart directory at all.
    std::fs::remove_dir(node.config_dir().join("autostart")).expect("rm autostart");
    node.define("moved", moved, Some((1, true)), false);
    node.define("kept", kept, Some((1, true)), false);
    let report = node.report();
    assert_eq!(ids(&report, "quarantined"), vec![moved.to_string()]);
    // A dangling autostart link (its definition is gone) is left alone and breaks nothing.
    std::fs::create_dir(node.config_dir().join("autostart")).expect("mkdir");
    std::os::unix::fs::symlink(node.config_dir().join("ghost.xml"), node.autostart("ghost")).expect("link");
    let report = node.report();
    assert_eq!(ids(&report, "kept"), vec![kept.to_string()]);
    assert!(report["errors"].as_array().expect("errors").is_empty(), "{report}");
    assert!(std::fs::symlink_metadata(node.autostart("ghost")).is_ok());
}

/// A mount made by a test, undone however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn can_mount() -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !root {
        eprintln!("skipping: mounting a tmpfs needs root");
    }
    root
}

/// A node with two HA definitions with autostart links: `moved` (now node-b's: stale) and
/// `kept` (node-a's), and an empty state directory.
async fn moved_and_kept() -> (TestDb, Node, InstanceId, InstanceId) {
    let db = TestDb::sqlite();
    let (moved, kept) = (InstanceId::random(), InstanceId::random());
    database(&db, &[(moved, "node-b", 2, true, false), (kept, "node-a", 1, true, false)]).await.close().await;
    let node = Node::new(db.url());
    node.define("moved", moved, Some((1, true)), true);
    node.define("kept", kept, Some((1, true)), true);
    std::fs::create_dir_all(node.state_dir()).expect("state dir");
    (db, node, moved, kept)
}

#[tokio::test]
async fn a_full_state_directory_holds_stale_definitions_in_place_and_a_later_run_quarantines_them() {
    if !can_mount() {
        return;
    }
    let (_db, node, moved, _kept) = moved_and_kept().await;
    let moved_xml = node.config_dir().join("moved.xml");
    let original = std::fs::read(&moved_xml).expect("xml");
    // state_dir on a 256 KiB tmpfs, filled to the last byte.
    let state = node.state_dir().display().to_string();
    sh(&["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", &state]);
    let mount = Mount(node.state_dir());
    let _ = Command::new("dd").args(["if=/dev/zero", &format!("of={state}/fill"), "bs=4k"]).output();

    let report = node.report();
    assert_eq!(ids(&report, "held"), vec![moved.to_string()], "{report}");
    assert!(ids(&report, "quarantined").is_empty(), "{report}");
    assert!(!report["errors"].as_array().expect("errors").is_empty(), "said loudly: {report}");
    // libvirtd will not define it: no NAME.xml, no autostart link; the bytes are kept.
    assert!(!moved_xml.exists() && !node.autostart("moved").exists());
    let held = node.config_dir().join("moved.xml.nk-held");
    assert_eq!(std::fs::read(&held).expect("held"), original, "held byte for byte");
    assert!(node.autostart("kept").exists(), "what is ours keeps its autostart");

    // Room again: the next run quarantines what was held.
    drop(mount);
    let report = node.report();
    assert!(ids(&report, "held").is_empty(), "{report}");
    assert!(!held.exists());
    let quarantined: Vec<_> = std::fs::read_dir(node.state_dir().join("quarantine"))
        .expect("quarantine")
        .flatten()
        .map(|e| std::fs::read(e.path()).expect("read"))
        .collect();
    assert_eq!(quarantined, vec![original], "moved into quarantine, byte for byte");
}

#[tokio::test]
async fn a_read_only_state_directory_holds_and_blocks_in_place_and_a_later_run_finishes() {
    if !can_mount() {
        return;
    }
    let (db, node, moved, kept) = moved_and_kept().await;
    let moved_xml = node.config_dir().join("moved.xml");
    let state = node.state_dir().display().to_string();
    sh(&["mount", "--bind", &state, &state]);
    let mount = Mount(node.state_dir());
    sh(&["mount", "-o", "remount,bind,ro", &state]);

    // The database answers: the stale definition is held in place (quarantine/ is read-only).
    let report = node.report();
    assert_eq!(ids(&report, "held"), vec![moved.to_string()], "{report}");
    assert!(!moved_xml.exists() && node.config_dir().join("moved.xml.nk-held").exists());
    // The database does not answer: the HA autostart link cannot go to blocked/; it is
    // blocked in place, and libvirtd will not autostart it.
    node.configure("node-a", "sqlite:///nonexistent/nodekeeper.db", "1s", "block-ha");
    let report = node.report();
    assert_eq!(report["database"], "unreachable");
    assert_eq!(ids(&report, "blocked"), vec![kept.to_string()], "{report}");
    assert!(!node.autostart("kept").exists());
    assert!(node.config_dir().join("autostart/kept.xml.nk-blocked").exists());

    // Writable again, and the database back: the held definition is quarantined, the link
    // the database confirms is given back.
    drop(mount);
    node.configure("node-a", db.url(), "2s", "block-ha");
    let report = node.report();
    assert_eq!(ids(&report, "restored"), vec![kept.to_string()], "{report}");
    assert!(node.autostart("kept").exists() && !node.config_dir().join("autostart/kept.xml.nk-blocked").exists());
    assert!(!node.config_dir().join("moved.xml.nk-held").exists());
    assert_eq!(std::fs::read_dir(node.state_dir().join("quarantine")).expect("quarantine").count(), 1);
}

#[tokio::test]
async fn symlinked_and_oddly_named_definitions_are_judged_or_reported_never_skipped() {
    use std::os::unix::ffi::OsStrExt;
    let db = TestDb::sqlite();
    let (moved, mine) = (InstanceId::random(), InstanceId::random());
    let _store = database(&db, &[(moved, "node-b", 2, true, false), (mine, "node-a", 1, true, false)]).await;
    let node = Node::new(db.url());
    // Definitions reached through links (libvirtd follows them): one stale, one ours.
    let elsewhere = node.root.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("dir");
    let real = node.define("moved-real", moved, Some((1, true)), false);
    let target = elsewhere.join("moved-real.xml");
    std::fs::rename(&real, &target).expect("move aside");
    let original = std::fs::read(&target).expect("xml");
    std::os::unix::fs::symlink("../../../elsewhere/moved-real.xml", node.config_dir().join("moved.xml")).expect("link");
    let mine_real = node.define("mine-real", mine, Some((1, true)), false);
    let mine_target = elsewhere.join("mine-real.xml");
    std::fs::rename(&mine_real, &mine_target).expect("move aside");
    std::os::unix::fs::symlink(&mine_target, node.config_dir().join("mine.xml")).expect("link");
    // A link that leads nowhere, and a name that is not UTF-8.
    std::os::unix::fs::symlink("/nonexistent/x.xml", node.config_dir().join("dangling.xml")).expect("link");
    let odd = node.config_dir().join(std::ffi::OsStr::from_bytes(b"odd-\xff.xml"));
    std::fs::write(&odd, b"<domain/>").expect("odd name");

    let report = node.report();
    assert_eq!(ids(&report, "quarantined"), vec![moved.to_string()], "{report}");
    assert_eq!(ids(&report, "kept"), vec![mine.to_string()], "{report}");
    assert!(!node.config_dir().join("moved.xml").exists(), "the stale link left config_dir");
    let q = node.state_dir().join(format!("quarantine/{moved}.moved.xml"));
    assert!(!std::fs::symlink_metadata(&q).expect("quarantined").file_type().is_symlink(), "the bytes, not a link");
    assert_eq!(std::fs::read(&q).expect("read"), original, "byte for byte");
    let errors = report["errors"].to_string();
    assert!(errors.contains("dangling.xml") && errors.contains("cannot be read"), "{errors}");
    assert!(errors.contains("not UTF-8"), "{errors}");
    assert!(odd.exists(), "reported, left in place");
}
