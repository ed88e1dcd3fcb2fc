//! The QEMU lab: a provisioning network in a network namespace, `nodekeeper-provisioner serve`
//! on it with its embedded SQLite database, compute nodes as QEMU guests (libvirt domains,
//! `-accel tcg`) with a sushy-tools Redfish BMC, installed by the provisioner itself (PXE →
//! deploy ramdisk → node image → first boot → guard and libvirtd up), and small nested
//! instances inside the nodes. The scenarios ([`scenarios`]) run on it, narrated.
//!
//! Needs root, iproute2, libvirtd, QEMU, the BMC venv (`scripts/setup-test-deps.sh` makes all
//! of them) and the images (`make images`; built here when missing, cached).

pub mod chaos;
pub mod hw;
pub mod lab;
pub mod net;
pub mod scenarios;
pub mod sim;

use std::io::Write;
use std::time::{Duration, Instant};

/// A timestamped narrative on stderr, with a progress line during long waits.
#[derive(Debug)]
pub struct Narrator {
    started: Instant,
    /// Print progress lines (the demo) or only the narrative (tests).
    pub progress: bool,
}

impl Narrator {
    /// Starts the clock.
    pub fn new(progress: bool) -> Narrator {
        Narrator { started: Instant::now(), progress }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// One line of the story: `[HH:MM:SS +MM:SS] text`.
    pub fn say(&self, text: &str) {
        let now = nodekeeper_store::Timestamp::now().to_string();
        let clock = now.get(11..19).unwrap_or("--:--:--");
        let e = self.started.elapsed().as_secs();
        eprintln!("[{clock} +{:02}:{:02}] {text}", e / 60, e % 60);
    }

    /// Polls `ok` every second until it returns `Some`, up to `limit`; shows what it waits for
    /// every 15 s. An error when the time runs out.
    pub async fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut ok: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<(T, Duration)> {
        let start = Instant::now();
        let mut shown = Instant::now();
        loop {
            if let Some(v) = ok().await? {
                if self.progress {
                    eprint!("\r\x1b[K");
                }
                return Ok((v, start.elapsed()));
            }
            anyhow::ensure!(start.elapsed() < limit, "{what}: not within {}", fmt(limit));
            if self.progress {
                eprint!("\r\x1b[K    … {what} ({})", fmt(start.elapsed()));
                let _ = std::io::stderr().flush();
            } else if shown.elapsed() >= Duration::from_secs(15) {
                eprintln!("    … {what} ({})", fmt(start.elapsed()));
                shown = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// `83 s`, `4 min 05 s`.
pub fn fmt(d: Duration) -> String {
    let s = d.as_secs();
    if s < 120 {
        format!("{s} s")
    } else {
        format!("{} min {:02} s", s / 60, s % 60)
    }
}
