//! The admin API against a real `serve` (the release of the tests' build) with real clients:
//! every endpoint with every role (allowed, or refused with 401/403 and nothing changed),
//! tokens that expired, were revoked or are not admin tokens, bodies that are too large,
//! malformed or carry unknown fields; `/metrics` for a scraper's network; and the remote CLI
//! (`--server`) printing exactly what the local CLI prints.

use std::process::{Command, Output};
use std::time::Duration;

mod common;

use common::{free_port, serve_config, spawn_serve, wait_until, KillOnDrop, PROVISIONER};
use nodekeeper_provisioner::http::admin_api::ENDPOINTS;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{EventFilter, Role, Store};
use serde_json::Value;

struct Rig {
    db: TestDb,
    store: Store,
    dir: tempfile::TempDir,
    base: String,
    _serve: KillOnDrop,
}

impl Rig {
    async fn start() -> Rig {
        let db = TestDb::sqlite();
        let store = db.store().await;
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().display().to_string();
        let port = free_port();
        // 127.0.0.2 stands for the scraper's network.
        let sections = "[http.auth]\nmetrics_from = [\"127.0.0.2/32\"]\n[recovery]\nenabled = false\n";
        let (config, base) = serve_config(&d, "serve", db.url(), port, sections);
        let serve = spawn_serve(&config, &format!("{d}/serve.log"));
        let rig = Rig { db, store, dir, base, _serve: serve };
        rig.cli(&["host", "add", "node-a", "--mac", "52:54:00:00:00:0a"]);
        rig.cli(&["host", "add", "node-b", "--mac", "52:54:00:00:00:0b"]);
        rig.cli(&["host", "add", "node-c"]);
        let healthz = format!("{}/healthz", rig.base);
        wait_until("serve answers", Duration::from_secs(30), async || http("GET", &healthz, None, None).0 == 200).await;
        rig
    }

    /// The CLI on the database itself; expects success, returns stdout.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.run(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(PROVISIONER)
            .args(args)
            .env("NODEKEEPER_DATABASE_URL", self.db.url())
            .env_remove("NODEKEEPER_SERVER")
            .env_remove("NODEKEEPER_TOKEN_FILE")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .output()
            .expect("run nodekeeper-provisioner")
    }

    /// A new token of `role`, made by the local CLI; returns it (and writes it to a file named
    /// after it).
    fn token(&self, name: &str, role: &str, expires: &str) -> String {
        let token = self.cli(&["token", "create", name, "--role", role, "--expires", expires]).trim().to_owned();
        std::fs::write(self.dir.path().join(name), format!("{token}\n")).expect("token file");
        token
    }

    /// What an admin call could change: hosts, instances, tokens, the event log.
    async fn fingerprint(&self) -> String {
        let hosts = serde_json::to_string(&self.store.hosts().await.expect("hosts")).expect("json");
        let instances = serde_json::to_string(&self.store.instances(None).await.expect("instances")).expect("json");
        let tokens: Vec<(String, bool)> = self
            .store
            .admin_tokens()
            .await
            .expect("tokens")
            .into_iter()
            .map(|t| (t.name, t.revoked_at.is_some()))
            .collect();
        let events =
            self.store.events(&EventFilter { limit: Some(100_000), ..Default::default() }).await.expect("events");
        format!("{hosts}\n{instances}\n{tokens:?}\n{}", events.len())
    }
}

/// One HTTP request with curl: (status, body). `auth`: a bearer token.
fn http(method: &str, url: &str, auth: Option<&str>, body: Option<(&str, &str)>) -> (u16, String) {
    http_from(None, method, url, auth, body)
}

fn http_from(
    source: Option<&str>,
    method: &str,
    url: &str,
    auth: Option<&str>,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-X", method, "--max-time", "10", "-w", "\n%{http_code}"]);
    if url.ends_with("/stream") {
        // A stream answers its status at once and then stays open.
        c.args(["-N", "--max-time", "1"]);
    }
    if let Some(source) = source {
        c.args(["--interface", source]);
    }
    if let Some(token) = auth {
        c.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let file = tempfile::NamedTempFile::new().expect("body file");
    if let Some((content_type, data)) = body {
        std::fs::write(file.path(), data).expect("write body");
        c.args(["-H", &format!("Content-Type: {content_type}"), "--data-binary"]);
        c.arg(format!("@{}", file.path().display()));
    }
    let out = c.arg(url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON error: {body}"));
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("an error code: {body}")).to_owned()
}

/// A request for each endpoint (`n` makes names and UUIDs fresh per attempt) and the status
/// the allowed role gets.
fn sample(method: &str, path: &str, n: usize) -> (String, Option<(&'static str, String)>, u16) {
    let json = |v: Value| Some(("application/json", v.to_string()));
    let uuid = |i: usize| format!("00000000-0000-4000-8000-{i:012}");
    match (method, path) {
        ("GET", "/api/v1/hosts") => (path.into(), None, 200),
        ("POST", "/api/v1/hosts") => (path.into(), json(serde_json::json!({ "name": format!("new-{n}") })), 200),
        ("GET", "/api/v1/hosts/{name}") => ("/api/v1/hosts/node-a".into(), None, 200),
        ("PATCH", "/api/v1/hosts/{name}") => {
            ("/api/v1/hosts/node-a".into(), json(serde_json::json!({ "vcpus": n.to_string() })), 200)
        }
        // node-a is in service: refused, and stays.
        ("DELETE", "/api/v1/hosts/{name}") => ("/api/v1/hosts/node-a".into(), None, 409),
        ("GET", "/api/v1/hosts/{name}/details") => ("/api/v1/hosts/node-a/details".into(), None, 200),
        ("GET", "/api/v1/hosts/{name}/outlets") => ("/api/v1/hosts/node-a/outlets".into(), None, 200),
        ("PUT", "/api/v1/hosts/{name}/outlets") => (
            "/api/v1/hosts/node-a/outlets".into(),
            json(serde_json::json!({ "urls": [format!("snmp://pdu-{n}.example/3")] })),
            200,
        ),
        ("POST", "/api/v1/hosts/{name}/mark-fenced") => ("/api/v1/hosts/node-b/mark-fenced".into(), None, 200),
        ("POST", "/api/v1/hosts/{name}/token") => ("/api/v1/hosts/node-b/token".into(), None, 200),
        // node-a has no BMC: allowed, and refused for that.
        ("GET", "/api/v1/hosts/{name}/power") => ("/api/v1/hosts/node-a/power".into(), None, 400),
        ("POST", "/api/v1/hosts/{name}/power") => {
            ("/api/v1/hosts/node-a/power".into(), json(serde_json::json!({ "action": "on" })), 400)
        }
        ("POST", "/api/v1/hosts/{name}/reimage") => {
            ("/api/v1/hosts/node-a/reimage".into(), json(serde_json::json!({})), 409)
        }
        // node-c has no HA instance: drained at once; then its maintenance is refused (a drain runs).
        ("POST", "/api/v1/hosts/{name}/drain") => {
            ("/api/v1/hosts/node-c/drain".into(), json(serde_json::json!({})), 200)
        }
        ("POST", "/api/v1/hosts/{name}/maintenance") => {
            ("/api/v1/hosts/node-c/maintenance".into(), json(serde_json::json!({ "state": "on" })), 409)
        }
        ("GET", "/api/v1/instances") => ("/api/v1/instances?host=node-a".into(), None, 200),
        ("PATCH", "/api/v1/instances") => {
            ("/api/v1/instances".into(), json(serde_json::json!({ "uuids": [uuid(1)], "priority": n })), 200)
        }
        ("POST", "/api/v1/instances/import") => {
            let line = serde_json::json!({ "uuid": uuid(100 + n), "name": format!("vm-{n}"), "host": "node-a", "ha": true, "storage": "shared" });
            (path.into(), Some(("application/x-ndjson", format!("{line}\n"))), 200)
        }
        ("POST", "/api/v1/instances/evacuate") => {
            (path.into(), json(serde_json::json!({ "to": "node-c", "uuids": [uuid(2)], "force": true })), 200)
        }
        ("POST", "/api/v1/instances/delete") => (path.into(), json(serde_json::json!({ "uuids": [uuid(3)] })), 200),
        ("GET", "/api/v1/operations") => ("/api/v1/operations?running=true&limit=5".into(), None, 200),
        ("GET", "/api/v1/operations/{id}") => ("/api/v1/operations/1".into(), None, 200),
        // Operation 2 is node-c's drain (no controller here: it runs on); cancelling it is
        // asked for (again by the admin: nothing against that).
        ("POST", "/api/v1/operations/{id}/cancel") => ("/api/v1/operations/2/cancel".into(), None, 200),
        ("GET", "/api/v1/images") => (path.into(), None, 200),
        ("GET", "/api/v1/images/{name}") => ("/api/v1/images/none-such".into(), None, 404),
        ("GET", "/api/v1/services") => (path.into(), None, 200),
        ("POST", "/api/v1/services") => (
            path.into(),
            json(serde_json::json!({ "name": format!("svc-{n}"), "copies": 1, "start": "true", "stop": "true" })),
            200,
        ),
        ("GET", "/api/v1/services/{name}") => ("/api/v1/services/none-such".into(), None, 404),
        ("DELETE", "/api/v1/services/{name}") => ("/api/v1/services/none-such".into(), None, 404),
        ("GET", "/api/v1/hosts/{name}/labels") => ("/api/v1/hosts/node-a/labels".into(), None, 200),
        ("PUT", "/api/v1/hosts/{name}/labels") => {
            ("/api/v1/hosts/node-a/labels".into(), json(serde_json::json!({ "labels": [format!("l{n}")] })), 200)
        }
        ("GET", "/api/v1/tokens") => (path.into(), None, 200),
        ("POST", "/api/v1/tokens") => {
            (path.into(), json(serde_json::json!({ "name": format!("made-{n}"), "role": "viewer" })), 200)
        }
        ("DELETE", "/api/v1/tokens/{name}") => ("/api/v1/tokens/spare".into(), None, 200),
        ("GET", "/api/v1/events") => ("/api/v1/events?host=node-a".into(), None, 200),
        ("GET", "/api/v1/events/stream") => (path.into(), None, 200),
        ("GET", "/metrics") => (path.into(), None, 200),
        _ => panic!("no sample for {method} {path}: add one"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_every_role_as_its_table_says() {
    let rig = Rig::start().await;
    let lines: String = (1..=3)
        .map(|i| {
            let v = serde_json::json!({ "uuid": format!("00000000-0000-4000-8000-{i:012}"), "name": format!("vm{i}"), "host": "node-a", "ha": true, "storage": "shared" });
            format!("{v}\n")
        })
        .collect();
    std::fs::write(rig.dir.path().join("vms.jsonl"), lines).expect("write");
    rig.cli(&["instance", "import", "vms.jsonl"]);
    let tokens = [
        (Role::Viewer, rig.token("v", "viewer", "1h")),
        (Role::Operator, rig.token("o", "operator", "1h")),
        (Role::Admin, rig.token("a", "admin", "1h")),
    ];
    rig.token("spare", "viewer", "1h");
    let mut table = Vec::new();
    for (n, e) in ENDPOINTS.iter().enumerate() {
        let need = e.role.expect("admin endpoints have a role");
        let (path, body, allowed) = sample(e.method, e.path, n);
        let url = format!("{}{path}", rig.base);
        let body = body.as_ref().map(|(t, b)| (*t, b.as_str()));
        let before = rig.fingerprint().await;
        let (code, answer) = http(e.method, &url, None, body);
        assert_eq!(code, 401, "{} {path} without a token: {answer}", e.method);
        assert_eq!(error_code(&answer), "unauthorized");
        let mut row = vec![format!("{} {}", e.method, e.path), "401".to_owned()];
        for (role, token) in &tokens {
            let (code, answer) = http(e.method, &url, Some(token), body);
            if *role < need {
                assert_eq!(code, 403, "{} {path} as {role}: {answer}", e.method);
                assert_eq!(error_code(&answer), "forbidden");
                assert_eq!(rig.fingerprint().await, before, "{} {path} as {role} changed something", e.method);
            } else {
                assert_eq!(code, allowed, "{} {path} as {role}: {answer}", e.method);
            }
            row.push(code.to_string());
        }
        table.push(row.join(" | "));
    }
    // The table for the closing note and docs (cargo nextest shows it with --no-capture).
    println!("endpoint | none | viewer | operator | admin\n{}", table.join("\n"));

    // What the calls did, and who the events name.
    let hosts: Vec<String> = rig.store.hosts().await.expect("hosts").into_iter().map(|h| h.name.to_string()).collect();
    assert_eq!(hosts.iter().filter(|h| h.starts_with("new-")).count(), 1, "only the admin's host add: {hosts:?}");
    let events = rig.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    let added = events.iter().find(|e| e.kind == "host.added" && e.message.contains("new-")).expect("host.added");
    assert_eq!(added.actor, "token:a");
    let fenced =
        events.iter().find(|e| e.host.as_ref().is_some_and(|h| h.as_str() == "node-b") && e.actor == "token:o");
    assert!(fenced.is_some(), "the operator's mark-fenced names it: {events:?}");
    let spare = rig.store.admin_token("spare").await.expect("read").expect("spare");
    assert!(spare.0.revoked_at.is_some());
    // The drain's cancel is asked for, by the operator first; the fence of node-b (marked
    // fenced: at its evacuation, past its point of return) cannot be cancelled.
    let drain = rig.store.operation(2).await.expect("read").expect("operation 2");
    assert_eq!((drain.kind.as_str(), drain.cancel_requested.as_deref()), ("drain", Some("token:a")), "{drain:?}");
    assert!(events.iter().any(|e| e.kind == "drain.cancel_requested" && e.actor == "token:o"), "{events:?}");
    let fence = rig.store.operation(1).await.expect("read").expect("operation 1");
    assert_eq!(fence.kind, "fence");
    let (code, answer) = http("POST", &format!("{}/api/v1/operations/1/cancel", rig.base), Some(&tokens[1].1), None);
    assert_eq!((code, error_code(&answer).as_str()), (409, "conflict"), "{answer}");
    assert!(answer.contains("point of return"), "{answer}");
    assert!(rig.store.operation(1).await.expect("read").expect("fence").cancel_requested.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_bad_bodies_change_nothing() {
    let rig = Rig::start().await;
    let admin = rig.token("root", "admin", "1h");
    let hosts = format!("{}/api/v1/hosts", rig.base);
    let add = |name: &str| serde_json::json!({ "name": name }).to_string();

    // Expired, revoked, forged, and a node token where an admin token is needed.
    let short = rig.token("short", "admin", "1s");
    let revoked = rig.token("gone", "admin", "1h");
    rig.cli(&["token", "revoke", "gone"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut forged = admin.clone();
    forged.replace_range(forged.len() - 4.., "0000");
    let node = rig.cli(&["host", "token", "node-c"]).trim().to_owned();
    let before = rig.fingerprint().await;
    for (what, token) in [("expired", &short), ("revoked", &revoked), ("forged", &forged), ("node", &node)] {
        let (code, body) = http("POST", &hosts, Some(token), Some(("application/json", &add("x-1"))));
        assert_eq!((code, error_code(&body).as_str()), (401, "unauthorized"), "{what}: {body}");
        let (code, _) = http("GET", &hosts, Some(token), None);
        assert_eq!(code, 401, "{what} reads nothing either");
    }
    assert_eq!(rig.fingerprint().await, before);
    let listed = rig.cli(&["token", "list"]);
    assert!(listed.lines().any(|l| l.starts_with("short ") && l.contains(" expired ")), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("gone ") && l.contains(" revoked ")), "{listed}");
    assert!(!listed.contains("nkt."), "secrets are never listed: {listed}");

    // A node token reads its own host record (its guard checks its name at boot), no other.
    let own = format!("{}/api/v1/hosts/node-c", rig.base);
    assert_eq!(http("GET", &own, Some(&node), None).0, 200);
    assert_eq!(http("GET", &format!("{}/api/v1/hosts/node-a", rig.base), Some(&node), None).0, 401);
    assert_eq!(http("GET", &format!("{}/api/v1/hosts/node-z", rig.base), Some(&node), None).0, 404, "unknown host");

    // Bodies: too large, malformed, unknown fields, wrong types; then a good one.
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(2 << 20));
    for (what, body, status, code) in [
        ("too large", big.as_str(), 413, "too_large"),
        ("malformed", "{\"name\":", 400, "invalid"),
        ("unknown field", "{\"name\":\"x-2\",\"colour\":\"red\"}", 400, "invalid"),
        ("wrong type", "{\"name\":7}", 400, "invalid"),
        ("bad name", "{\"name\":\"Not A Name\"}", 400, "invalid"),
    ] {
        let (got, answer) = http("POST", &hosts, Some(&admin), Some(("application/json", body)));
        assert_eq!((got, error_code(&answer).as_str()), (status, code), "{what}: {answer}");
        if what == "unknown field" {
            assert!(answer.contains("unknown field `colour`"), "{answer}");
        }
    }
    let import = format!("{}/api/v1/instances/import", rig.base);
    let (code, answer) = http("POST", &import, Some(&admin), Some(("application/x-ndjson", "{\"uuid\":\"nope\"}\n")));
    assert_eq!((code, error_code(&answer).as_str()), (400, "invalid"), "{answer}");
    assert!(answer.contains("line 1"), "the bad line is named: {answer}");
    assert_eq!(rig.fingerprint().await, before, "nothing changed");
    let (code, answer) = http("POST", &hosts, Some(&admin), Some(("application/json", &add("x-3"))));
    assert_eq!(code, 200, "{answer}");
    let (code, answer) = http("POST", &hosts, Some(&admin), Some(("application/json", &add("x-3"))));
    assert_eq!((code, error_code(&answer).as_str()), (409, "exists"), "{answer}");

    // /metrics: the scraper's network without a token; nothing else opens for it.
    let metrics = format!("{}/metrics", rig.base);
    assert_eq!(http_from(Some("127.0.0.1"), "GET", &metrics, None, None).0, 401);
    let (code, page) = http_from(Some("127.0.0.2"), "GET", &metrics, None, None);
    assert!(code == 200 && page.contains("nodekeeper_hosts{"), "{code} {page}");
    assert_eq!(http_from(Some("127.0.0.2"), "GET", &hosts, None, None).0, 401);
    // The document is public, and lists every endpoint.
    let (code, doc) = http("GET", &format!("{}/api/v1/openapi.json", rig.base), None, None);
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&doc).expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/hosts/{name}/reimage"]["post"]["requestBody"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_cli_prints_what_the_local_cli_prints() {
    let rig = Rig::start().await;
    rig.token("ops", "admin", "1h");
    rig.token("look", "viewer", "1h");
    let lines: String = (1..=4)
        .map(|i| {
            let v = serde_json::json!({ "uuid": format!("00000000-0000-4000-8000-{i:012}"), "name": format!("vm{i}"), "host": if i % 2 == 0 { "node-a" } else { "node-b" }, "ha": i < 3, "storage": "shared" });
            format!("{v}\n")
        })
        .collect();
    std::fs::write(rig.dir.path().join("vms.jsonl"), lines).expect("write");
    rig.cli(&["instance", "import", "vms.jsonl"]);
    let server = rig.base.clone();
    let remote_env = [("NODEKEEPER_SERVER", server.as_str()), ("NODEKEEPER_TOKEN_FILE", "ops")];
    // The remote CLI never opens the database: give it one that does not exist.
    let remote = |args: &[&str]| {
        let mut env = remote_env.to_vec();
        env.push(("NODEKEEPER_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"));
        let mut cmd = Command::new(PROVISIONER);
        cmd.args(args).env_remove("RUST_LOG").envs(env.iter().copied()).current_dir(rig.dir.path());
        cmd.output().expect("run")
    };
    for args in [
        &["host", "list"][..],
        &["host", "show", "node-a"],
        &["instance", "list"],
        &["instance", "list", "--host", "node-b"],
        &["image", "list"],
        &["host", "outlets", "node-a"],
        &["token", "list"],
        &["operation", "list"],
    ] {
        for json in [false, true] {
            let mut all: Vec<&str> = if json { vec!["--json"] } else { vec![] };
            all.extend_from_slice(args);
            let far = remote(&all);
            let near = rig.run(&all, &[]);
            assert!(far.status.success(), "{all:?} remote: {}", String::from_utf8_lossy(&far.stderr));
            assert_eq!(
                String::from_utf8_lossy(&far.stdout),
                String::from_utf8_lossy(&near.stdout),
                "{all:?}: remote and local differ"
            );
        }
    }
    // Errors read the same and fail the same.
    for args in [
        &["host", "show", "node-z"][..],
        &["instance", "evacuate", "--to", "node-z", "00000000-0000-4000-8000-000000000001"],
    ] {
        let (far, near) = (remote(args), rig.run(args, &[]));
        assert!(!far.status.success() && !near.status.success(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&far.stderr), String::from_utf8_lossy(&near.stderr), "{args:?}");
    }
    // Writes: the same sentence, the token named in the event.
    let far = remote(&["host", "add", "node-r", "--mac", "52:54:00:00:00:99"]);
    assert_eq!(String::from_utf8_lossy(&far.stdout), "host node-r added\n", "{}", String::from_utf8_lossy(&far.stderr));
    let events = rig.store.events(&EventFilter { limit: Some(1000), ..Default::default() }).await.expect("events");
    assert!(events.iter().any(|e| e.kind == "host.added" && e.actor == "token:ops" && e.message.contains("node-r")));
    let far = remote(&["--json", "instance", "set", "00000000-0000-4000-8000-000000000001", "--priority", "7"]);
    let set: Value = serde_json::from_slice(&far.stdout).expect("json");
    assert_eq!(set[0]["policy"]["priority"], 7);
    // The flags (not the environment) say the same: `--server URL --token-file FILE`.
    let token_file = rig.dir.path().join("ops").display().to_string();
    let flags = rig.run(&["--server", &server, "--token-file", &token_file, "--json", "host", "list"], &[]);
    let local = rig.run(&["--json", "host", "list"], &[]);
    assert!(flags.status.success(), "{}", String::from_utf8_lossy(&flags.stderr));
    assert_eq!(flags.stdout, local.stdout, "--server and --token-file as flags");
    // A viewer token cannot write; commands of the provisioner itself refuse --server.
    let viewer = [("NODEKEEPER_SERVER", server.as_str()), ("NODEKEEPER_TOKEN_FILE", "look")];
    let out = rig.run(&["host", "add", "node-s"], &viewer);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("token look has the role viewer; this needs admin"), "{said}");
    assert!(rig.store.host(&"node-s".parse().expect("name")).await.expect("read").is_none());
    let out = remote(&["db", "migrate"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --server"));
    let out = rig.run(&["host", "list"], &[("NODEKEEPER_SERVER", server.as_str())]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"), "{}", String::from_utf8_lossy(&out.stderr));
}
