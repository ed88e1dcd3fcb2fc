//! Load test of the reimage executor: N hosts reimaged at once against in-memory BMCs and a
//! stub agent that reports through the store, on SQLite. Prints, per N: wall time until every
//! operation is done, operations per second, the process's CPU time and peak memory.
//!
//! usage: cargo run --release --example reimage_load -- [N...]   (default 100 1000 5000)

use std::sync::Arc;
use std::time::{Duration, Instant};

use nodekeeper_provisioner::bmc::fake::Fake;
use nodekeeper_provisioner::bmc::{BmcError, Policy};
use nodekeeper_provisioner::reimage::executor::{self, BmcFactory, KIND};
use nodekeeper_provisioner::reimage::machine::{Deadlines, Limits};
use nodekeeper_store::{ConnectOptions, NewHost, OperationStatus, Store};
use tokio_util::sync::CancellationToken;

struct Factory;

impl BmcFactory for Factory {
    type B = Fake;
    fn for_host(&self, _: &nodekeeper_store::Host) -> Result<Fake, BmcError> {
        Ok(Fake::default())
    }
    fn policy(&self) -> Policy {
        Policy { confirm_within: Duration::from_millis(200), attempts: 1, poll: Duration::from_millis(5) }
    }
}

fn proc_status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(|l| l[key.len()..].trim().to_owned()))
        .unwrap_or_default()
}

fn cpu_seconds() -> f64 {
    // utime + stime from /proc/self/stat, in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

async fn run(n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // NK_SQLITE_SYNC=normal: SQLite with synchronous = NORMAL, to measure what FULL costs.
    let sync = if std::env::var("NK_SQLITE_SYNC").as_deref() == Ok("normal") { "?synchronous=normal" } else { "" };
    let url = format!("sqlite://{}/nk.db{sync}", dir.path().display());
    let store = Store::connect_with(&url, &ConnectOptions { max_connections: 8, ..Default::default() }).await?;
    store.migrate().await?;
    for i in 0..n {
        let h = NewHost {
            name: format!("node-{i:05}").parse()?,
            mac: None,
            ip: None,
            bmc_url: Some("redfish://fake".into()),
            bmc_credentials: None,
        };
        store.add_host(&h, "load").await?;
    }
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    for i in 0..n {
        executor::request(
            &store,
            &format!("node-{i:05}").parse()?,
            None,
            Deadlines::default(),
            Limits::default(),
            "load",
        )
        .await?;
    }
    let stop = CancellationToken::new();
    tokio::spawn(executor::run(
        store.clone(),
        Arc::new(Factory),
        "load".into(),
        Duration::from_millis(100),
        stop.clone(),
    ));
    // The stub agent (and node): report each stage as soon as the operation waits for it.
    loop {
        let running = store.running_operations(KIND).await?;
        if running.is_empty() {
            break;
        }
        for op in running {
            let report = match op.step.as_str() {
                "agent_booted" => Some(r#"{"stage":"booted","error":null}"#),
                "image_written" => Some(r#"{"stage":"written","error":null}"#),
                "verified" => Some(r#"{"stage":"verified","error":null}"#),
                "heartbeat" => {
                    store.record_heartbeat(&op.target).await?;
                    None
                }
                _ => None,
            };
            if let Some(r) = report {
                if op.report.as_deref() != Some(r) {
                    store.report_operation(KIND, &op.target, &op.step, r, "stub agent", "load").await?;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    let mut done = 0;
    for i in 0..n {
        let op = store.latest_operation(&format!("node-{i:05}").parse()?).await?;
        if op.is_some_and(|o| o.status == OperationStatus::Done) {
            done += 1;
        }
    }
    println!(
        "reimages at once {n:>6}: all done in {:>6.1} s ({:>6.0} reimages/s, {done} done), CPU {:>5.1} s, peak RSS {}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        cpu_seconds() - cpu0,
        proc_status("VmHWM:")
    );
    store.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    for n in if sizes.is_empty() { vec![100, 1000, 5000] } else { sizes } {
        run(n).await?;
    }
    Ok(())
}
