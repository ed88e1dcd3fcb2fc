//! The web console in a real headless browser (Debian's chromium, driven over WebDriver by
//! chromedriver), against a real `serve` whose controller fences through a real Redfish BMC
//! emulator (sushy-tools on libvirt's test driver): log in with a token; watch a host turn
//! suspect and then fenced as the controller acts, without reloading the page; start a
//! reimage from the host's page, through the confirmation, and watch its steps.
//!
//! Screenshots are taken on the way (into `$NODEKEEPER_CONSOLE_SCREENSHOTS` when set: that is
//! how docs/console-*.png are made).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, serve_config, spawn_serve, sushy_test_driver, wait_until, KillOnDrop, BMC_VENV, PROVISIONER};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{NewHost, OperationStatus};
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The parts this test needs, or why it cannot run (an error under `NODEKEEPER_REQUIRE_BMC`).
fn available() -> bool {
    let ok = Path::new("/usr/bin/chromium").exists()
        && Path::new("/usr/bin/chromedriver").exists()
        && Path::new(BMC_VENV).join("bin/sushy-emulator").exists();
    assert!(
        ok || std::env::var("NODEKEEPER_REQUIRE_BMC").as_deref() != Ok("1"),
        "chromium, chromium-driver and sushy-tools are set up by make test"
    );
    ok
}

/// A WebDriver session: the W3C protocol over HTTP, no client crate.
struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: KillOnDrop,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = KillOnDrop(
            Command::new("/usr/bin/chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver"),
        );
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        wait_until("chromedriver answers", Duration::from_secs(20), async || {
            http.get(format!("{root}/status")).send().await.is_ok()
        })
        .await;
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
        } } } });
        let made: Value =
            http.post(format!("{root}/session")).json(&caps).send().await.expect("session").json().await.expect("json");
        let id = made["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("a session: {made}"));
        Browser { http, base: format!("{root}/session/{id}"), _driver: driver }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body).await.unwrap_or_else(|v| panic!("webdriver {path}: {v}"))
    }

    /// The WebDriver answer's value, or the whole answer when it is an error.
    async fn try_call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.expect("webdriver").json().await.expect("json");
        if v["value"].get("error").is_some() {
            return Err(v);
        }
        Ok(v["value"].clone())
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn find(&self, css: &str) -> String {
        let v =
            self.call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("an element {css}: {v}")).to_owned()
    }

    /// Clicks `css`; found again when the live page re-rendered it between the find and the
    /// click (a stale element), a few times.
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            let e = self.find(css).await;
            match self.try_call(reqwest::Method::POST, &format!("/element/{e}/click"), Some(json!({}))).await {
                Ok(_) => return,
                Err(v) if v["value"]["error"] == "stale element reference" => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(v) => panic!("webdriver click {css}: {v}"),
            }
        }
        panic!("{css} went stale 20 times in a row");
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), Some(json!({ "text": text }))).await;
    }

    /// Runs `script` in the page; its return value.
    async fn js(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": [] }))).await
    }

    async fn text(&self, css: &str) -> String {
        let script = format!("const e = document.querySelector({}); return e ? e.textContent : null;", json!(css));
        self.js(&script).await.as_str().unwrap_or_default().to_owned()
    }

    async fn screenshot(&self, to: &Path) {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64")).expect("decode");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
        std::fs::write(to, png).expect("write screenshot");
    }

    async fn close(&self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_a_fence_live_and_starts_a_reimage() {
    if !available() {
        return;
    }
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let shots: PathBuf =
        std::env::var_os("NODEKEEPER_CONSOLE_SCREENSHOTS").map_or_else(|| dir.path().into(), PathBuf::from);

    // A real Redfish BMC: sushy-tools on libvirt's test driver, whose `test` domain runs.
    let (_sushy, bmc) = sushy_test_driver(&d).await;
    let http = reqwest::Client::new();
    for (h, bmc) in [("node-a", Some(bmc)), ("node-b", None)] {
        let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: bmc, bmc_credentials: None };
        store.add_host(&new, "test").await.expect("host");
    }
    // Both heartbeat until node-a stops.
    let beating: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec!["node-a", "node-b"]));
    let heart = {
        let (store, beating) = (db.store().await, beating.clone());
        tokio::spawn(async move {
            loop {
                let hosts = beating.lock().expect("lock").clone();
                for h in hosts {
                    let _ = store.record_heartbeat(&n(h)).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let port = free_port();
    let recovery = "[recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nafter_fence = \"nothing\"\n";
    let (config, base) = serve_config(&d, "serve", db.url(), port, recovery);
    let _serve = spawn_serve(&config, &format!("{d}/serve.log"));
    let out = Command::new(PROVISIONER)
        .args(["token", "create", "ops", "--role", "operator"])
        .env("NODEKEEPER_DATABASE_URL", db.url())
        .output()
        .expect("token create");
    let token = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert!(token.starts_with("nkt.ops."), "{token}");
    wait_until("serve answers", Duration::from_secs(30), async || {
        http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;

    let browser = Browser::start().await;
    browser.go(&format!("{base}/")).await;
    assert_eq!(browser.js("return document.querySelector('#login-view').hidden").await, json!(false));
    // A wrong token is refused, on the page.
    browser.type_into("#token", "nkt.ops.0000000000000000000000000000000000000000000000000000000000000000").await;
    browser.click("#login-button").await;
    wait_until("the refusal shows", Duration::from_secs(10), async || {
        browser.text("#login-error").await.contains("not valid")
    })
    .await;
    browser.js("document.querySelector('#token').value = ''; return null").await;
    browser.type_into("#token", &token).await;
    browser.click("#login-button").await;
    wait_until("the fleet shows, live", Duration::from_secs(20), async || {
        browser.js("return document.querySelectorAll('#hosts tr').length").await == json!(2)
            && browser.text("#live").await == "live"
    })
    .await;
    assert_eq!(browser.text("#who").await, "ops");
    browser.js("window.nkMarker = 42; return null").await;
    assert_eq!(browser.text("tr[data-host='node-a'] td.state").await, "active");

    // node-a goes silent: the page shows what the controller does, as it does it.
    beating.lock().expect("lock").retain(|h| *h != "node-a");
    let silent = Instant::now();
    let mut seen: Vec<(String, f64)> = Vec::new();
    let mut shot_suspect = false;
    while seen.last().is_none_or(|(s, _)| s != "fenced") {
        assert!(silent.elapsed() < Duration::from_secs(60), "node-a never showed fenced: {seen:?}");
        let s = browser.text("tr[data-host='node-a'] td.state").await;
        if seen.last().is_none_or(|(last, _)| *last != s) {
            seen.push((s.clone(), silent.elapsed().as_secs_f64()));
        }
        if s == "suspect" && !shot_suspect {
            browser.screenshot(&shots.join("console-fleet-suspect.png")).await;
            shot_suspect = true;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let states: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(states, ["active", "suspect", "fenced"], "{seen:?}");
    assert_eq!(browser.js("return window.nkMarker").await, json!(42), "live: the page was never reloaded");
    browser.screenshot(&shots.join("console-fleet.png")).await;
    assert!(browser.js("return document.querySelector('#events').children.length").await.as_u64().unwrap_or(0) > 0);
    println!("console: node-a seen {seen:?} (seconds since its last heartbeat)");

    // The fence ends (after_fence = nothing); then a reimage from the host's page.
    wait_until("the fence done", Duration::from_secs(30), async || {
        store.latest_operation(&n("node-a")).await.expect("op").is_some_and(|o| o.status != OperationStatus::Running)
    })
    .await;
    browser.click("tr[data-host='node-a'] a").await;
    wait_until("node-a's page", Duration::from_secs(10), async || browser.text("#host-name").await == "node-a").await;
    browser.click("button[data-action='reimage']").await;
    assert_eq!(browser.js("return document.querySelector('#confirm').hidden").await, json!(false), "asks first");
    assert!(browser.text("#confirm-text").await.contains("reimage"), "says what");
    browser.click("#confirm-yes").await;
    wait_until("the reimage started", Duration::from_secs(10), async || {
        browser.text("#action-result").await.contains("(reimage)")
    })
    .await;
    let op = store.latest_operation(&n("node-a")).await.expect("op").expect("the reimage");
    assert_eq!(op.kind, "reimage");
    let events =
        store.events(&nodekeeper_store::EventFilter { limit: Some(1000), ..Default::default() }).await.expect("e");
    assert!(events.iter().any(|e| e.kind == "reimage.started" && e.actor == "token:ops"), "the token is the actor");
    // Its steps, as the page shows them: power off, PXE next boot, power on, then waiting
    // for the deploy agent (which never comes here).
    let row = format!("#host-operations tr[data-operation='{}'] td.step", op.id);
    let mut steps: Vec<String> = Vec::new();
    let start = Instant::now();
    while steps.last().is_none_or(|s| s != "agent_booted") {
        assert!(start.elapsed() < Duration::from_secs(60), "the reimage never reached agent_booted: {steps:?}");
        let s = browser.text(&row).await;
        if !s.is_empty() && steps.last() != Some(&s) {
            steps.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = ["power_off", "pxe_next_boot", "power_on", "agent_booted"];
    let positions: Vec<usize> = steps.iter().filter_map(|s| order.iter().position(|o| o == s)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]) && steps.len() >= 2, "steps in order, live: {steps:?}");
    assert_eq!(browser.text("#host-state").await, "reimaging");
    browser.screenshot(&shots.join("console-host.png")).await;
    println!("console: reimage steps seen {steps:?}");
    // Cancelled from the page: it ends failed where it waited, the host in maintenance.
    browser.click("button[data-action='cancel']").await;
    assert!(browser.text("#confirm-text").await.contains("cancel"), "says what");
    browser.click("#confirm-yes").await;
    wait_until("the reimage cancelled", Duration::from_secs(30), async || {
        store.operation(op.id).await.expect("read").is_some_and(|o| o.status == OperationStatus::Failed)
    })
    .await;
    wait_until("the page shows the host in maintenance", Duration::from_secs(20), async || {
        browser.text("#host-state").await == "maintenance"
    })
    .await;
    let ended = store.operation(op.id).await.expect("read").expect("op");
    assert_eq!(ended.cancel_requested.as_deref(), Some("token:ops"), "{ended:?}");
    browser.close().await;
    heart.abort();
}
