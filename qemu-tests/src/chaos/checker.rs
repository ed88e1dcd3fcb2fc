//! The independent checker: outside every process under test, every 200 ms it asks each host's
//! libvirt what really runs there (not what the guards report) and the database who owns what.
//!
//! A sample is a violation when an instance runs on two hosts (a double run), or runs on a host
//! the database had already taken it from before the listing (a stale run: the old owner still
//! running it after the move). The hosts are listed one after another within a few
//! milliseconds; a legitimate move takes far longer (the old host dies before its BMC answers,
//! then the controller writes, then the new owner's guard converges), so a double run seen in
//! one sample is real.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_store::Store;

/// What the checker saw.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    /// Samples taken.
    pub samples: usize,
    /// Samples in which a host's libvirt could not be asked (a host off or rebooting).
    pub hosts_unreachable: usize,
    /// Samples in which the database could not be asked.
    pub db_unreachable: usize,
    /// Instance-samples in which an instance the database holds ran nowhere (what the faults
    /// cost in availability; not a violation by itself).
    pub not_running: usize,
    /// Each double run: which instance, on which hosts, at which sample.
    pub doubles: Vec<String>,
    /// Each stale run.
    pub stale: Vec<String>,
    /// Each time the service's one copy came up on another host: how long it ran nowhere
    /// (from the last sample that saw it on the old host to the first on the new one).
    pub service_moves: Vec<Duration>,
    /// Samples in which an exclusive service ran more copies than it may.
    pub over_copies: Vec<String>,
    /// The last sample: per host, the instances running there (`None`: not reachable).
    pub last: Vec<Option<BTreeSet<String>>>,
    /// The last sample: per host, the service copies running there.
    pub last_copies: Vec<usize>,
}

/// A host the checker watches.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Its name.
    pub name: String,
    /// Its libvirt.
    pub uri: String,
    /// Its namespace (where its service copies run).
    pub ns: String,
}

/// An exclusive service's copies are processes whose command line is exactly `marker`; at
/// most `copies` of them may run in the whole fleet at once.
#[derive(Debug, Clone)]
pub struct ServiceWatch {
    /// Its name.
    pub name: String,
    /// The copies' command line (arguments joined by NUL).
    pub marker: Vec<u8>,
    /// n.
    pub copies: usize,
}

/// How many processes in `ns` have `marker` as their command line.
fn copies_in(ns: &str, marker: &[u8]) -> usize {
    super::fleet::netns_pids(ns)
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.strip_suffix(b"\0") == Some(marker)))
        .count()
}

/// The sampling thread.
pub struct Checker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    findings: Arc<Mutex<Findings>>,
}

/// The domain every test-driver libvirt starts with; not an instance.
const BUILTIN: &str = "test";

fn list(conn: &virt::connect::Connect) -> Result<BTreeSet<String>, virt::error::Error> {
    let mut running = BTreeSet::new();
    for d in conn.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
        if d.get_name()? != BUILTIN {
            running.insert(d.get_uuid_string()?);
        }
    }
    Ok(running)
}

impl Checker {
    /// Starts sampling the hosts at `uris` (host names alongside) and `store`.
    /// Every change it sees (a host's running set, a host going unreachable) is written to
    /// `timeline`, with the time since the start.
    pub fn start(
        hosts: Vec<Watched>,
        service: ServiceWatch,
        store: Store,
        names: BTreeMap<String, String>,
        timeline: &std::path::Path,
    ) -> anyhow::Result<Checker> {
        let mut timeline = std::io::BufWriter::new(std::fs::File::create(timeline)?);
        let started = std::time::Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let findings = Arc::new(Mutex::new(Findings::default()));
        let handle = tokio::runtime::Handle::current();
        let (s, f) = (stop.clone(), findings.clone());
        let thread = std::thread::spawn(move || {
            let mut previous: Vec<Option<BTreeSet<String>>> = hosts.iter().map(|_| None).collect();
            // The service's copy: on which host, last seen when.
            let mut copy_seen: Option<(usize, std::time::Instant)> = None;
            let mut conns: Vec<Option<virt::connect::Connect>> = hosts.iter().map(|_| None).collect();
            while !s.load(Ordering::Relaxed) {
                // The database first: an owner read before the listings is what a stale run is
                // judged against.
                let owners = handle.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), store.instances(None)).await.ok()?.ok()
                });
                let mut sample: Vec<Option<BTreeSet<String>>> = Vec::new();
                let copies: Vec<usize> = hosts.iter().map(|h| copies_in(&h.ns, &service.marker)).collect();
                for (i, Watched { uri, .. }) in hosts.iter().enumerate() {
                    if conns[i].is_none() {
                        conns[i] = virt::connect::Connect::open(Some(uri)).ok();
                    }
                    let got = conns[i].as_ref().map(list);
                    sample.push(match got {
                        Some(Ok(set)) => Some(set),
                        Some(Err(_)) => {
                            if let Some(mut c) = conns[i].take() {
                                let _ = c.close();
                            }
                            None
                        }
                        None => None,
                    });
                }
                let name = |u: &str| names.get(u).cloned().unwrap_or_else(|| u.to_owned());
                for (i, now) in sample.iter().enumerate() {
                    if *now != previous[i] {
                        let t = started.elapsed().as_secs_f64();
                        let wall = nodekeeper_store::Timestamp::now().to_string();
                        let wall = wall.get(11..23).unwrap_or_default().to_owned();
                        let what = match (now, &previous[i]) {
                            (None, _) => "unreachable".to_owned(),
                            (Some(now), before) => {
                                let empty = BTreeSet::new();
                                let before = before.as_ref().unwrap_or(&empty);
                                let mut w: Vec<String> =
                                    now.difference(before).map(|u| format!("+{}", name(u))).collect();
                                w.extend(before.difference(now).map(|u| format!("-{}", name(u))));
                                w.join(" ")
                            }
                        };
                        let _ = writeln!(timeline, "{wall} {t:8.2} {} {what}", hosts[i].name);
                        previous[i] = now.clone();
                    }
                }
                let _ = timeline.flush();
                let mut found = f.lock().unwrap_or_else(|p| p.into_inner());
                found.samples += 1;
                let n = found.samples;
                if sample.iter().any(Option::is_none) {
                    found.hosts_unreachable += 1;
                }
                let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for (i, set) in sample.iter().enumerate() {
                    for uuid in set.iter().flatten() {
                        seen.entry(uuid).or_default().push(&hosts[i].name);
                    }
                }
                for (uuid, on) in &seen {
                    if on.len() > 1 {
                        found.doubles.push(format!("sample {n}: {} running on {}", name(uuid), on.join(" and ")));
                    }
                }
                match &owners {
                    None => found.db_unreachable += 1,
                    Some(owners) => {
                        let owner: BTreeMap<String, &str> = owners
                            .iter()
                            .filter(|i| !i.deleted)
                            .map(|i| (i.uuid.to_string(), i.owner.as_str()))
                            .collect();
                        found.not_running += owner.keys().filter(|u| !seen.contains_key(u.as_str())).count();
                        for (uuid, on) in &seen {
                            for host in on {
                                if owner.get(*uuid).is_some_and(|o| o != host) {
                                    found.stale.push(format!(
                                        "sample {n}: {} running on {host}, owned by {}",
                                        name(uuid),
                                        owner[*uuid]
                                    ));
                                }
                            }
                        }
                    }
                }
                let total: usize = copies.iter().sum();
                if total > service.copies {
                    let on: Vec<String> = copies
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(i, c)| format!("{}×{c}", hosts[i].name))
                        .collect();
                    found.over_copies.push(format!(
                        "sample {n}: {total} copies of exclusive {} (n = {}) on {}",
                        service.name,
                        service.copies,
                        on.join(", ")
                    ));
                }
                if let Some(h) = copies.iter().position(|c| *c > 0) {
                    if let Some((before, last)) = copy_seen {
                        if before != h {
                            found.service_moves.push(last.elapsed());
                        }
                    }
                    copy_seen = Some((h, std::time::Instant::now()));
                }
                if copies != found.last_copies {
                    let t = started.elapsed().as_secs_f64();
                    let _ = writeln!(timeline, "{:>21.2} {} copies per host {copies:?}", t, service.name);
                }
                found.last = sample;
                found.last_copies = copies;
                drop(found);
                std::thread::sleep(Duration::from_millis(200));
            }
            for c in conns.iter_mut().flatten() {
                let _ = c.close();
            }
        });
        Ok(Checker { stop, thread: Some(thread), findings })
    }

    /// What it saw so far.
    pub fn findings(&self) -> Findings {
        self.findings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops it; what it saw.
    pub fn finish(mut self) -> Findings {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.findings()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
