//! The monitoring kit (`monitoring/`): the alert rules pass `promtool check rules` and their
//! own `promtool test rules` suite; a live `/metrics` of `serve` passes `promtool check
//! metrics` and carries the fleet's gauges from the database; every metric the rules and the
//! Grafana dashboard use is one `/metrics` exports.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{curl, free_port, serve_config, spawn_serve, wait_until};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::NewHost;

const KIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../monitoring");

fn promtool() -> Option<&'static str> {
    let ok = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var("NODEKEEPER_REQUIRE_BMC").as_deref() != Ok("1"),
        "promtool (Debian: prometheus) is set up by make test"
    );
    ok.then_some("promtool")
}

/// The `nodekeeper_*` metric names in `text` (an expression, or an exposition).
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("nodekeeper_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_and_the_dashboard_check_out_against_a_live_metrics_page() {
    let Some(promtool) = promtool() else { return };
    let rules = format!("{KIT}/prometheus/nodekeeper-rules.yml");
    for args in [vec!["check", "rules", rules.as_str()], vec!["test", "rules", "nodekeeper-rules.test.yml"]] {
        let out =
            Command::new(promtool).args(&args).current_dir(format!("{KIT}/prometheus")).output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A live /metrics: one active host that heartbeated, one never heard.
    let db = TestDb::sqlite();
    let store = db.store().await;
    for h in ["node-a", "node-b"] {
        let host = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
        store.add_host(&host, "test").await.expect("host");
    }
    store.record_heartbeat(&n("node-a")).await.expect("heartbeat");
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let port = free_port();
    let (config, base) = serve_config(
        &d,
        "serve",
        db.url(),
        port,
        "[http.auth]\nmetrics_from = [\"127.0.0.1/32\"]\n[recovery]\nenabled = false\n",
    );
    let _serve = spawn_serve(&config, &format!("{d}/serve.log"));
    let url = format!("{base}/metrics");
    wait_until("serve answers", Duration::from_secs(30), async || curl(&[&url]).0 == 200).await;
    let (_, page) = curl(&[&url]);
    assert!(page.contains("nodekeeper_database_up 1"), "{page}");
    assert!(page.contains("nodekeeper_hosts{state=\"active\"} 2"), "{page}");
    assert!(page.contains("nodekeeper_heartbeat_age_max_seconds "), "{page}");
    let mut lint = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(lint.stdin.as_mut().expect("stdin"), page.as_bytes()).expect("write");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric the rules and the dashboard use is on the page.
    let exported = names(&page);
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{KIT}/grafana/nodekeeper.json")).expect("dashboard"))
            .expect("the dashboard is JSON");
    let mut used = names(&std::fs::read_to_string(&rules).expect("rules"));
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            used.extend(names(target["expr"].as_str().expect("expr")));
        }
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}\n{page}");
    store.close().await;
}
