//! Counters for `/metrics`, shared by the DHCP, TFTP and HTTP servers, rendered in the
//! Prometheus text format, and the fleet's gauges read from the database at each scrape
//! ([`render_fleet`]). Lock-free on the hot paths (atomics); the per-route HTTP counts
//! take a short mutex.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// One monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter the provisioner exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// DHCPOFFERs sent.
    pub dhcp_offers: Counter,
    /// DHCPACKs sent.
    pub dhcp_acks: Counter,
    /// DHCPNAKs sent.
    pub dhcp_naks: Counter,
    /// Packets dropped: malformed, not for us, unknown MAC, no address left.
    pub dhcp_drops: Counter,
    /// TFTP transfers completed.
    pub tftp_transfers: Counter,
    /// TFTP transfers that ended in an error (refused, timed out, aborted).
    pub tftp_errors: Counter,
    /// Bytes of file data sent over TFTP.
    pub tftp_bytes: Counter,
    /// Recovery controller ticks, and their time (ms) in total and the last one's.
    pub recovery_ticks: Counter,
    /// See `recovery_ticks`.
    pub recovery_tick_ms: Counter,
    /// See `recovery_ticks`.
    pub recovery_tick_last_ms: AtomicU64,
    http: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    /// Counts one controller tick that took `took`.
    pub fn recovery_tick(&self, took: std::time::Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        self.recovery_ticks.inc();
        self.recovery_tick_ms.add(ms);
        self.recovery_tick_last_ms.store(ms, Ordering::Relaxed);
    }

    /// Counts one HTTP request by route and status code.
    pub fn http_request(&self, route: &str, status: u16) {
        if let Ok(mut m) = self.http.lock() {
            *m.entry((route.to_owned(), status)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter("nodekeeper_dhcp_offers_total", "DHCPOFFER messages sent.", self.dhcp_offers.get());
        counter("nodekeeper_dhcp_acks_total", "DHCPACK messages sent.", self.dhcp_acks.get());
        counter("nodekeeper_dhcp_naks_total", "DHCPNAK messages sent.", self.dhcp_naks.get());
        counter(
            "nodekeeper_dhcp_drops_total",
            "DHCP packets dropped (malformed, unknown MAC, not for us, pool exhausted).",
            self.dhcp_drops.get(),
        );
        counter("nodekeeper_tftp_transfers_total", "TFTP transfers completed.", self.tftp_transfers.get());
        counter("nodekeeper_tftp_errors_total", "TFTP transfers ended by an error.", self.tftp_errors.get());
        counter("nodekeeper_tftp_bytes_total", "File bytes sent over TFTP.", self.tftp_bytes.get());
        counter("nodekeeper_recovery_ticks_total", "Recovery controller ticks.", self.recovery_ticks.get());
        let _ = writeln!(
            out,
            "# HELP nodekeeper_recovery_tick_seconds_total Time spent in recovery controller ticks.\n\
             # TYPE nodekeeper_recovery_tick_seconds_total counter\n\
             nodekeeper_recovery_tick_seconds_total {}\n\
             # HELP nodekeeper_recovery_tick_last_seconds How long the last recovery controller tick took.\n\
             # TYPE nodekeeper_recovery_tick_last_seconds gauge\n\
             nodekeeper_recovery_tick_last_seconds {}",
            self.recovery_tick_ms.get() as f64 / 1000.0,
            self.recovery_tick_last_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "# HELP nodekeeper_http_requests_total HTTP requests by route and status.\n# TYPE nodekeeper_http_requests_total counter");
        if let Ok(m) = self.http.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(out, "nodekeeper_http_requests_total{{route=\"{route}\",code=\"{status}\"}} {n}");
            }
        }
        out
    }
}

/// The fleet's gauges in the Prometheus text format: `nodekeeper_database_up`, and when the
/// database answered, hosts per state, the oldest heartbeat's age, operations running per kind
/// and step, ended per kind and outcome, leadership terms, instances. Label values come from
/// the database's own words (states, kinds, steps, roles), never from what a node sent.
pub fn render_fleet(gauges: Option<&nodekeeper_store::FleetGauges>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family("nodekeeper_database_up", "gauge", "Whether the database answered this scrape.");
    let Some(g) = gauges else {
        let _ = writeln!(out, "nodekeeper_database_up 0");
        return out;
    };
    let _ = writeln!(out, "nodekeeper_database_up 1");
    let label = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let mut lines = Vec::new();
    for (state, n) in &g.hosts {
        lines.push(format!("nodekeeper_hosts{{state=\"{}\"}} {n}", label(state)));
    }
    let mut section = |name: &str, kind: &str, help: &str, lines: &mut Vec<String>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for l in lines.drain(..) {
            let _ = writeln!(out, "{l}");
        }
    };
    section("nodekeeper_hosts", "gauge", "Hosts by state.", &mut lines);
    let age = g.oldest_heartbeat.map_or(0.0, |t| (g.now - t).max(0) as f64 / 1000.0);
    lines.push(format!("nodekeeper_heartbeat_age_max_seconds {age}"));
    section(
        "nodekeeper_heartbeat_age_max_seconds",
        "gauge",
        "Seconds since the oldest last heartbeat of the active and suspect hosts.",
        &mut lines,
    );
    for (kind, step, n) in &g.running {
        lines.push(format!("nodekeeper_operations_running{{kind=\"{}\",step=\"{}\"}} {n}", label(kind), label(step)));
    }
    section("nodekeeper_operations_running", "gauge", "Running operations by kind and step.", &mut lines);
    for (kind, outcome, n) in &g.ended {
        lines.push(format!(
            "nodekeeper_operations_ended{{kind=\"{}\",outcome=\"{}\"}} {n}",
            label(kind),
            label(outcome)
        ));
    }
    section(
        "nodekeeper_operations_ended",
        "gauge",
        "Ended operations (fences, reimages) by kind and outcome: done, failed, aborted.",
        &mut lines,
    );
    for (role, term) in &g.terms {
        lines.push(format!("nodekeeper_leader_term{{role=\"{}\"}} {term}", label(role)));
    }
    section("nodekeeper_leader_term", "gauge", "The current leadership term per role.", &mut lines);
    lines.push(format!("nodekeeper_instances {}", g.instances.0));
    section("nodekeeper_instances", "gauge", "Live instances.", &mut lines);
    lines.push(format!("nodekeeper_instances_ha {}", g.instances.1));
    section("nodekeeper_instances_ha", "gauge", "Live HA instances.", &mut lines);
    out
}
