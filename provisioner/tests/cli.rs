//! The admin CLI as operators run it: the real binary against a throwaway SQLite file and a
//! throwaway database on a real PostgreSQL server.

use std::process::{Command, Output};

use nodekeeper_store::on_both_engines;
use nodekeeper_store::testing::TestDb;
use serde_json::Value;

on_both_engines!(
    a_fleet_is_managed_end_to_end,
    a_bad_import_line_is_named_and_nothing_is_imported,
    evacuate_to_an_unknown_host_changes_nothing,
    a_large_import_is_one_transaction,
    mark_fenced_is_refused_for_a_running_host_and_starts_one_fence,
    the_image_commands_keep_their_contract,
    a_hosts_pdu_outlets_are_set_shown_and_checked,
    recovery_policies_are_imported_set_and_checked,
    instances_are_added_one_by_one_and_changed_and_hosts_removed,
);

struct Cli {
    url: String,
    dir: tempfile::TempDir,
}

impl Cli {
    fn new(db: &TestDb) -> Cli {
        Cli { url: db.url().to_owned(), dir: tempfile::tempdir().expect("work dir") }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nodekeeper-provisioner"))
            .args(args)
            .env("NODEKEEPER_DATABASE_URL", &self.url)
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path())
            .output()
            .expect("run nodekeeper-provisioner")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} should fail; stdout: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("--json prints JSON")
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write input file");
        path.display().to_string()
    }

    fn setup(&self) {
        self.ok(&["db", "migrate"]);
        self.ok(&["host", "add", "node-a", "--mac", "52:54:00:00:00:0a", "--ip", "10.20.0.11"]);
        self.ok(&["host", "add", "node-b", "--mac", "52:54:00:00:00:0b", "--bmc", "ipmi://127.0.0.1:6230"]);
    }
}

fn jsonl(n: usize, host: impl Fn(usize) -> &'static str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"uuid\":\"{}\",\"name\":\"vm-{i}\",\"host\":\"{}\",\"ha\":{},\"storage\":\"shared\"}}\n",
                uuid::Uuid::new_v4(),
                host(i),
                i % 2 == 0
            )
        })
        .collect()
}

async fn a_fleet_is_managed_end_to_end(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let hosts = cli.json(&["host", "list"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(2));
    assert_eq!(hosts[0]["name"], "node-a");
    assert_eq!(hosts[0]["ip"], "10.20.0.11");
    assert_eq!(hosts[1]["bmc_url"], "ipmi://127.0.0.1:6230");

    // A root-device hint is checked when given and kept in the agent's one-word form.
    let e = cli.fails(&["host", "add", "node-h", "--root-device", "colour=red"]);
    assert!(e.contains("--root-device") && e.contains("colour"), "{e}");
    assert_eq!(cli.json(&["host", "list"]).as_array().map(Vec::len), Some(2), "nothing added");
    cli.ok(&["host", "add", "node-h", "--root-device", "serial=S4EW NX0, size>=100G"]);
    let store = db.store().await;
    let hint = store.root_device(&"node-h".parse().expect("name")).await.expect("hint");
    assert_eq!(hint.as_deref(), Some("serial=S4EW%20NX0,size>=107374182400B"));

    // The boot mode: at add, changed later with the hint, shown by `host show`; bad values
    // and a host being reimaged are refused, with nothing changed.
    let e = cli.fails(&["host", "add", "node-u", "--boot-mode", "efi"]);
    assert!(e.contains("uefi-secureboot"), "{e}");
    cli.ok(&["host", "add", "node-u", "--boot-mode", "uefi"]);
    let show = cli.json(&["host", "show", "node-u"]);
    assert_eq!((show["boot"]["boot_mode"].as_str(), show["boot"]["root_device"].as_str()), (Some("uefi"), None));
    let set = cli.json(&["host", "set", "node-u", "--boot-mode", "uefi-secureboot", "--root-device", "model=PM9A3"]);
    assert_eq!(
        (set["boot_mode"].as_str(), set["root_device"].as_str()),
        (Some("uefi-secureboot"), Some("model=PM9A3"))
    );
    let e = cli.fails(&["host", "set", "node-u", "--root-device", "colour=red"]);
    assert!(e.contains("--root-device"), "{e}");
    let e = cli.fails(&["host", "set", "node-u"]);
    assert!(e.contains("nothing to change"), "{e}");
    let set = cli.json(&["host", "set", "node-u", "--root-device", "none", "--boot-mode", "unknown"]);
    assert_eq!((set["boot_mode"].as_str(), set["root_device"].as_str()), (None, None));
    let text = String::from_utf8(cli.run(&["host", "show", "node-h"]).stdout).expect("utf-8");
    assert!(text.contains("root device:    serial=S4EW%20NX0,size>=107374182400B"), "{text}");
    store
        .set_host_state(&"node-u".parse().expect("name"), nodekeeper_store::HostState::Reimaging, "test", "test")
        .await
        .expect("state");
    let e = cli.fails(&["host", "set", "node-u", "--boot-mode", "bios"]);
    assert!(e.contains("being reimaged"), "{e}");

    // The boot path: pxe by default, http or virtual-media at add or later; UEFI HTTP boot
    // needs UEFI firmware, virtual media a Redfish BMC.
    assert_eq!(cli.json(&["host", "show", "node-h"])["boot"]["boot_path"], "pxe");
    let e = cli.fails(&["host", "add", "node-p", "--boot", "tftp"]);
    assert!(e.contains("virtual-media"), "{e}");
    let e = cli.fails(&["host", "add", "node-p", "--boot", "http", "--boot-mode", "bios"]);
    assert!(e.contains("needs UEFI firmware"), "{e}");
    let e = cli.fails(&["host", "add", "node-p", "--boot", "virtual-media", "--bmc", "ipmi://127.0.0.1:6231"]);
    assert!(e.contains("Redfish"), "{e}");
    assert_eq!(cli.json(&["host", "list"]).as_array().map(Vec::len), Some(4), "nothing added");
    cli.ok(&["host", "add", "node-p", "--boot", "http", "--boot-mode", "uefi"]);
    let show = cli.json(&["host", "show", "node-p"]);
    assert_eq!((show["boot"]["boot_path"].as_str(), show["last_reimage_boot_path"].as_str()), (Some("http"), None));
    let e = cli.fails(&["host", "set", "node-p", "--boot-mode", "bios"]);
    assert!(e.contains("needs UEFI firmware"), "{e}");
    let set = cli.json(&["host", "set", "node-p", "--boot", "virtual-media"]);
    assert_eq!((set["boot_path"].as_str(), set["boot_mode"].as_str()), (Some("virtual-media"), Some("uefi")));
    let text = String::from_utf8(cli.run(&["host", "show", "node-p"]).stdout).expect("utf-8");
    assert!(text.contains("boot path:      virtual-media\n"), "{text}");

    let file = cli.write("inv.jsonl", &jsonl(4, |_| "node-a"));
    assert_eq!(cli.json(&["instance", "import", &file])["imported"], 4);
    let list = cli.json(&["instance", "list", "--host", "node-a"]);
    let uuids: Vec<String> =
        list.as_array().expect("array").iter().map(|i| i["uuid"].as_str().expect("uuid").to_owned()).collect();
    assert_eq!(uuids.len(), 4);

    // node-a is up: moving its instances could run them twice.
    let err = cli.fails(&["instance", "evacuate", "--to", "node-b", &uuids[0]]);
    assert!(err.contains("node-a, which is active") && err.contains("--force; nothing changed"), "{err}");
    assert_eq!(cli.json(&["instance", "list", "--host", "node-a"]).as_array().map(Vec::len), Some(4));
    // The operator confirms it is off; then they move.
    cli.ok(&["host", "mark-fenced", "node-a"]);
    let moved = cli.json(&["instance", "evacuate", "--to", "node-b", &uuids[0], &uuids[1]]);
    assert_eq!(moved[0]["from"], "node-a");
    assert_eq!(moved[0]["to"], "node-b");
    assert_eq!(moved[0]["generation"], 2);
    assert_eq!(cli.json(&["instance", "list", "--host", "node-b"]).as_array().map(Vec::len), Some(2));

    let deleted = cli.json(&["instance", "delete", &uuids[2]]);
    assert_eq!(deleted[0]["deleted"], true);
    let show = cli.json(&["host", "show", "node-a"]);
    assert_eq!(show["host"]["state"], "fenced");
    assert_eq!(show["instances"], serde_json::json!({"total": 1, "ha": 0, "deleted": 1}));
    let kinds: Vec<&str> =
        show["events"].as_array().expect("events").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "host.added",
            "instance.imported",
            "fence.started",
            "host.state",
            "instance.moved",
            "instance.moved",
            "instance.deleted"
        ]
    );

    // The human form is a table with a header.
    let table = cli.ok(&["instance", "list"]);
    assert!(table.starts_with("UUID "), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
}

async fn mark_fenced_is_refused_for_a_running_host_and_starts_one_fence(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    // node-b just heartbeated: it is running, the operator is told so and nothing changes.
    db.store().await.record_heartbeat(&"node-b".parse().expect("name")).await.expect("heartbeat");
    let out = cli.run(&["host", "mark-fenced", "node-b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("within the grace period"), "{err}");
    assert_eq!(cli.json(&["host", "show", "node-b"])["host"]["state"], "active");
    // node-a never reported in: marked, once.
    let first = cli.json(&["host", "mark-fenced", "node-a"]);
    assert_eq!((first["started"].as_bool(), first["operation"]["step"].as_str()), (Some(true), Some("evacuate")));
    let again = cli.json(&["host", "mark-fenced", "node-a"]);
    assert_eq!(again["started"], false);
    assert_eq!(again["operation"]["id"], first["operation"]["id"]);
    let shown = cli.json(&["host", "show", "node-a"]);
    assert_eq!((shown["host"]["state"].as_str(), shown["operation"]["kind"].as_str()), (Some("fenced"), Some("fence")));
}

async fn a_bad_import_line_is_named_and_nothing_is_imported(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let good = jsonl(3, |_| "node-a");
    let mut lines: Vec<&str> = good.lines().collect();
    let dup = lines[0].to_owned();
    lines.push(&dup);
    let file = cli.write("dup.jsonl", &(lines.join("\n") + "\n"));
    let err = cli.fails(&["instance", "import", &file]);
    assert!(err.contains("line 4: instance") && err.contains("already appears on line 1"), "{err}");

    let file = cli.write("bad-host.jsonl", &jsonl(5, |i| if i == 3 { "node-x" } else { "node-a" }));
    let err = cli.fails(&["instance", "import", &file]);
    assert!(err.contains("line 4: unknown host node-x; nothing imported"), "{err}");
    assert_eq!(cli.json(&["instance", "list"]), serde_json::json!([]));

    // A UUID already in the database: the whole second import is refused.
    let first = cli.write("first.jsonl", &good);
    cli.ok(&["instance", "import", &first]);
    let second =
        cli.write("second.jsonl", &format!("{}{}", jsonl(2, |_| "node-b"), good.lines().nth(1).expect("line 2")));
    let err = cli.fails(&["instance", "import", &second]);
    assert!(err.contains("line 3: instance") && err.contains("already exists; nothing imported"), "{err}");
    assert_eq!(cli.json(&["instance", "list"]).as_array().map(Vec::len), Some(3));
}

async fn evacuate_to_an_unknown_host_changes_nothing(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let file = cli.write("inv.jsonl", &jsonl(2, |_| "node-a"));
    cli.ok(&["instance", "import", &file]);
    cli.ok(&["host", "mark-fenced", "node-a"]);
    let before = cli.json(&["instance", "list"]);
    let uuid = before[0]["uuid"].as_str().expect("uuid").to_owned();
    let err = cli.fails(&["instance", "evacuate", "--to", "node-x", &uuid]);
    assert_eq!(err.trim(), "error: unknown host node-x; nothing changed");
    let err = cli.fails(&["instance", "evacuate", "--to", "node-b", &uuid, "00000000-0000-4000-8000-000000000000"]);
    assert!(err.contains("unknown instance 00000000-0000-4000-8000-000000000000; nothing changed"), "{err}");
    let err = cli.fails(&["instance", "evacuate", "--to", "node-b", "not-a-uuid"]);
    assert!(err.contains("invalid instance UUID"), "{err}");
    assert_eq!(cli.json(&["instance", "list"]), before);
}

async fn a_large_import_is_one_transaction(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let file = cli.write("big.jsonl", &jsonl(20_000, |i| if i % 2 == 0 { "node-a" } else { "node-b" }));
    assert_eq!(cli.json(&["instance", "import", &file])["imported"], 20_000);
    assert_eq!(cli.json(&["instance", "list", "--host", "node-b"]).as_array().map(Vec::len), Some(10_000));
}

#[test]
fn database_errors_are_clear_and_keep_the_password() {
    let cli =
        Cli { url: "postgres://nk:hunter2@127.0.0.1:1/nodekeeper".into(), dir: tempfile::tempdir().expect("dir") };
    let err = cli.fails(&["host", "list"]);
    assert!(err.starts_with("error: cannot connect to database postgres://nk:***@127.0.0.1:1/nodekeeper"), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    for (url, want) in [
        ("mysql://root@db/nk", "unsupported scheme"),
        ("postgres://nk:hunter2@db:port/nk", "invalid port number"),
        ("sqlite://", "no file path"),
    ] {
        let cli = Cli { url: url.into(), dir: tempfile::tempdir().expect("dir") };
        let err = cli.fails(&["host", "list"]);
        assert!(err.contains("is not usable") && err.contains(want), "{url}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn the_default_database_is_created_on_demand() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(env!("CARGO_BIN_EXE_nodekeeper-provisioner"))
        .args(["--json", "host", "list"])
        .env_remove("NODEKEEPER_DATABASE_URL")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(dir.path().join("nodekeeper.db").exists());
}

#[tokio::test]
async fn postgres_schema_behind_asks_for_db_migrate() {
    let Some(db) = TestDb::postgres().await else { return };
    let cli = Cli::new(&db);
    let err = cli.fails(&["host", "list"]);
    assert!(err.contains("schema version 0") && err.contains("run `nodekeeper-provisioner db migrate`"), "{err}");
    cli.ok(&["db", "migrate"]);
    assert_eq!(cli.json(&["host", "list"]), serde_json::json!([]));
}

#[test]
fn serve_starts_answers_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let config = dir.path().join("provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{0}/nk.db\"\n[http]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\nimages_dir = \"{0}/images\"\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodekeeper-provisioner"))
        .args(["serve", "--config"])
        .arg(&config)
        .spawn()
        .expect("start serve");
    let url = format!("http://127.0.0.1:{port}/healthz");
    let mut healthy = false;
    for _ in 0..100 {
        let out = Command::new("curl").args(["-sf", "--max-time", "2", &url]).output().expect("curl");
        if out.status.success() && out.stdout == b"ok\n" {
            healthy = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "serve did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(healthy, "serve never answered /healthz");
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");

    std::fs::write(&config, "database_url = \"sqlite:///tmp/x.db\"\n[http]\nlisten = \"nowhere\"\n")
        .expect("bad config");
    let out = Command::new(env!("CARGO_BIN_EXE_nodekeeper-provisioner"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("provisioner.toml") && err.contains("listen"), "{err}");
}

/// `image add|list|show|remove` (DESIGN.md, "Provisioner admin"): `image show --json` carries
/// the raw image's sha256; a reimage names a catalogue entry; removal is refused while used.
async fn the_image_commands_keep_their_contract(db: TestDb) {
    use sha2::Digest;
    let cli = Cli::new(&db);
    cli.setup();
    let mut disk = vec![0u8; 4 << 20];
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk[1 << 20..(1 << 20) + 4096].fill(0x5a);
    let raw = cli.dir.path().join("disk.img");
    std::fs::write(&raw, &disk).expect("disk");
    let images = cli.dir.path().join("images").display().to_string();
    let added = cli.json(&["image", "add", "debian", &raw.display().to_string(), "--images-dir", &images]);
    let sha = format!("{:x}", sha2::Sha256::digest(&disk));
    assert_eq!(added["sha256"], sha.as_str(), "{added}");
    let shown = cli.json(&["image", "show", "debian"]);
    assert_eq!((shown["name"].as_str(), shown["sha256"].as_str()), (Some("debian"), Some(sha.as_str())), "{shown}");
    assert_eq!((shown["format"].as_str(), shown["size"].as_u64()), (Some("raw"), Some(4 << 20)));
    let served = cli.dir.path().join("images").join(shown["served"]["file"].as_str().expect("file"));
    assert!(served.exists(), "{shown}");
    let listed = cli.json(&["image", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(cli.fails(&["image", "show", "nope"]).contains("unknown image nope"));
    // Taken names and files that are no disk are refused, with nothing added.
    let again = cli.fails(&["image", "add", "debian", &raw.display().to_string(), "--images-dir", &images]);
    assert!(again.contains("already exists"), "{again}");
    let notes = cli.write("notes.txt", "not a disk\n");
    assert!(cli.fails(&["image", "add", "notes", &notes, "--images-dir", &images]).contains("is not a disk image"));
    // A reimage names it: the image is in use until that reimage ends.
    let reimage = cli.json(&["reimage", "node-b", "--image", "debian"]);
    assert_eq!(reimage["started"], true, "{reimage}");
    let refused = cli.fails(&["image", "remove", "debian", "--images-dir", &images]);
    assert!(refused.contains("is in use") && refused.contains("reimage of node-b"), "{refused}");
    assert!(served.exists());
}

async fn a_hosts_pdu_outlets_are_set_shown_and_checked(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let a = "redfish+https://pdu-1/redfish/v1/PowerEquipment/RackPDUs/1/Outlets/A4";
    let b = "snmp://pdu-2:161/4";
    // Refusals change nothing: a URL that is no outlet, a literal secret, an unknown host.
    let err = cli.fails(&["host", "outlets", "node-a", "redfish+https://pdu-1/redfish/v1/Systems/1"]);
    assert!(err.contains("Outlets/ID"), "{err}");
    assert!(cli.fails(&["host", "outlets", "node-a", "snmp://pdu/x"]).contains("number"));
    assert!(cli.fails(&["host", "outlets", "node-a", b, "--credentials", "private:"]).contains("env:VAR or file:"));
    assert!(cli.fails(&["host", "outlets", "node-z", a]).contains("node-z"));
    assert!(cli.fails(&["host", "outlets", "node-a", a, a]).contains("twice"));
    assert_eq!(cli.json(&["host", "outlets", "node-a"]), serde_json::json!([]));
    // Two power supplies on two PDUs.
    let set = cli.json(&["host", "outlets", "node-a", a, b, "--credentials", "env:NODEKEEPER_BMC_PDU"]);
    assert_eq!(set.as_array().map(Vec::len), Some(2), "{set}");
    assert_eq!(set[1]["credentials"], "env:NODEKEEPER_BMC_PDU");
    let shown = cli.json(&["host", "show", "node-a"]);
    assert_eq!(shown["outlets"][0]["url"], a, "{shown}");
    assert!(shown["fencing"].is_null(), "no guard has reported: {shown}");
    let text = cli.ok(&["host", "show", "node-a"]);
    assert!(
        text.contains("pdu-2:161/4") && text.contains("watchdog fencing") && text.contains("never reported"),
        "{text}"
    );
    // Removed again.
    assert_eq!(cli.json(&["host", "outlets", "node-a", "--none"]), serde_json::json!([]));
    assert!(cli.fails(&["host", "outlets", "node-a", "--none", a]).contains("cannot be used with"));
}

async fn recovery_policies_are_imported_set_and_checked(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let (a, b) = ("11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222");
    let xml = "<domain type='kvm'><name>db-1</name><vcpu>4</vcpu><memory unit='GiB'>8</memory></domain>";
    let file = cli.write(
        "policy.jsonl",
        &format!(
            "{{\"uuid\":\"{a}\",\"name\":\"db-1\",\"host\":\"node-a\",\"ha\":true,\"storage\":\"shared\",\
             \"priority\":10,\"anti_affinity\":\"db\",\"max_relocate\":3,\"domain_xml\":\"{xml}\"}}\n\
             {{\"uuid\":\"{b}\",\"name\":\"web-1\",\"host\":\"node-a\",\"ha\":true,\"storage\":\"shared\"}}\n"
        ),
    );
    cli.ok(&["instance", "import", &file]);
    let store = db.store().await;
    let p = store.instance_policies().await.expect("policies");
    let pa = &p[&a.parse().expect("uuid")];
    assert_eq!((pa.priority, pa.anti_affinity.as_deref(), pa.max_relocate), (10, Some("db"), Some(3)));
    assert_eq!((pa.vcpus, pa.memory_mib), (4, 8192), "the size from the domain XML");
    // instance set: only what is given changes; bad values change nothing.
    let set = cli.json(&["instance", "set", b, "--priority", "-5", "--anti-affinity", "web"]);
    assert_eq!(
        (set[0]["policy"]["priority"].as_i64(), set[0]["policy"]["anti_affinity"].as_str()),
        (Some(-5), Some("web"))
    );
    assert!(cli.fails(&["instance", "set", b, "--anti-affinity", "no spaces"]).contains("anti-affinity"));
    assert!(cli.fails(&["instance", "set", b, "--max-relocate", "lots"]).contains("a count or none"));
    assert!(cli.fails(&["instance", "set", b]).contains("nothing to change"));
    assert!(cli
        .fails(&["instance", "set", "33333333-3333-4333-8333-333333333333", "--priority", "1"])
        .contains("33333333"));
    let set = cli.json(&["instance", "set", a, "--anti-affinity", "none", "--max-relocate", "none"]);
    assert!(set[0]["policy"]["anti_affinity"].is_null() && set[0]["policy"]["max_relocate"].is_null(), "{set}");
    assert_eq!(set[0]["policy"]["priority"], 10, "kept");
    // host set: capacity and the standby flag.
    let inv = cli.json(&["host", "set", "node-b", "--vcpus", "32", "--memory", "256G", "--reserved", "true"]);
    assert_eq!(
        (inv["vcpus"].as_u64(), inv["memory_mib"].as_u64(), inv["reserved"].as_bool()),
        (Some(32), Some(262_144), Some(true))
    );
    assert!(cli.fails(&["host", "set", "node-b", "--memory", "lots"]).contains("256G"));
    assert_eq!(cli.json(&["host", "show", "node-b"])["inventory"]["reserved"], true);
    let inv = store.host_inventories().await.expect("inventories");
    assert_eq!(inv[&"node-b".parse().expect("name")].vcpus, Some(32));
}

async fn instances_are_added_one_by_one_and_changed_and_hosts_removed(db: TestDb) {
    let cli = Cli::new(&db);
    cli.setup();
    let uuid = "00000000-0000-4000-8000-0000000000aa";
    let xml = cli.write("vm.xml", &format!("<domain type='qemu'><name>vm-aa</name><uuid>{uuid}</uuid></domain>"));
    let out = cli.ok(&[
        "instance",
        "add",
        "--uuid",
        uuid,
        "--name",
        "vm-aa",
        "--host",
        "node-a",
        "--ha",
        "--domain-xml",
        &xml,
    ]);
    assert!(out.starts_with("imported 1 instances"), "{out}");
    let again = cli.fails(&["instance", "add", "--uuid", uuid, "--name", "vm-aa", "--host", "node-a"]);
    assert!(again.contains("already exists"), "{again}");
    let set = cli.json(&["instance", "set", uuid, "--ha", "false", "--storage", "local", "--priority", "3"]);
    assert_eq!((set[0]["ha"].as_bool(), set[0]["storage"].as_str()), (Some(false), Some("local")), "{set}");
    assert_eq!(set[0]["policy"]["priority"], 3, "{set}");
    let bad = cli.fails(&["instance", "set", uuid, "--storage", "tape"]);
    assert!(bad.contains("--storage"), "{bad}");
    let listed = cli.json(&["instance", "list"]);
    assert_eq!((listed[0]["ha"].as_bool(), listed[0]["storage"].as_str()), (Some(false), Some("local")));
    // node-a owns vm-aa: not removable; node-b, never heard from and owning nothing, is.
    let refused = cli.fails(&["host", "remove", "node-a"]);
    assert!(refused.contains("cannot be removed") && refused.contains("instance"), "{refused}");
    assert_eq!(cli.ok(&["host", "remove", "node-b"]), "host node-b removed\n");
    let hosts = cli.json(&["host", "list"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
}
