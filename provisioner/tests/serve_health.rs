//! `serve` watches its own components (issue "Safe under its own faults", item 9): a TFTP
//! server whose root is missing does not die silently — `/healthz` answers 503 and names it,
//! and it is started again, with backoff, until its root is there.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::TestDb;

fn healthz(base: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", &format!("{base}/healthz")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
async fn a_component_that_fails_is_reported_and_restarted_until_it_runs() {
    let db = TestDb::sqlite();
    let _store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let (port, tftp_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let config = format!("{d}/provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nlisten = \"127.0.0.1:{tftp_port}\"\nroot = \"{d}/tftp\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"{base}\"\nimages_dir = \"{d}/images\"\n\
             [recovery]\nenabled = false\n",
            db.url()
        ),
    )
    .expect("config");
    let _serve = KillOnDrop(
        Command::new(PROVISIONER)
            .args(["serve", "--config", &config])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    );
    // The TFTP root does not exist: TFTP fails, serve goes on and says so.
    let started = Instant::now();
    let (code, body) = loop {
        let (code, body) = healthz(&base);
        if code == 503 {
            break (code, body);
        }
        assert!(started.elapsed() < Duration::from_secs(20), "healthz never reported the failed TFTP: {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503);
    assert!(body.starts_with("tftp: down since ") && body.contains("TFTP root"), "{body}");
    // Still down a few seconds later: it was tried again, and failed again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (code, body) = healthz(&base);
    assert_eq!(code, 503, "{body}");
    assert!(!body.contains("restarted 0 times"), "tried again: {body}");
    // The root appears: the next restart runs, and the whole is healthy.
    std::fs::create_dir_all(format!("{d}/tftp")).expect("root");
    std::fs::write(format!("{d}/tftp/undionly.kpxe"), b"ipxe").expect("file");
    let back = Instant::now();
    loop {
        let (code, body) = healthz(&base);
        if code == 200 {
            assert_eq!(body, "ok\n");
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(40), "TFTP never came back: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", &format!("tftp://127.0.0.1:{tftp_port}/undionly.kpxe")])
        .output()
        .expect("curl");
    assert_eq!(out.stdout, b"ipxe", "TFTP serves once restarted");
}
