//! `nodekeeper-lab sim`: a fleet simulator that drives the real `serve` (the release build,
//! unchanged) the way a fleet of guards does, to find out what one provisioner carries.
//!
//! N simulated hosts, each with its own node token, speak the real guard API over HTTP with
//! keep-alive, on a guard's schedule: a heartbeat every 5 s, and after it a converge pass
//! (`ownership` of what it runs, `assigned`, `services`, `report`) when the heartbeat's answer
//! says the host's revision moved since the last complete pass, or the full pass is due (the
//! real guard's rule; its libvirt, here, changes only by what it is assigned). Each host's BMC is a Redfish
//! endpoint in the simulator whose power changes land after a delay; a host powered off stops
//! talking, powered on it boots (an `ownership` query) and talks again. The steady phase
//! measures heartbeat latency at the guard and `serve`'s CPU and memory; then some hosts crash
//! at once (they go silent, their power stays on) and the simulator times each until its HA
//! instances have new owners, while it checks that no host that talks is fenced and no
//! instance is lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nodekeeper_store::guard_api::{Assigned, HeartbeatAnswer};
use nodekeeper_store::{Generation, HostName, HostState, InstanceId, NewHost, NewInstance, Storage, Store};
use sha2::{Digest, Sha256};

use crate::chaos::fleet::{free_port, Postgres};
use crate::chaos::schedule::Rng;
use crate::{fmt, Narrator};

/// The database engine under `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The embedded SQLite.
    Sqlite,
    /// A private PostgreSQL cluster.
    Postgres,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hosts.
    pub hosts: usize,
    /// Instances per host (a third of them HA).
    pub instances: usize,
    /// The engine.
    pub engine: Engine,
    /// How long the steady phase measures.
    pub steady: Duration,
    /// How many hosts crash at once after it.
    pub crash: usize,
    /// The share of the remaining hosts then cut off at once (silent, power on) for the grace
    /// and 20 s more: the mass-failure brake must hold (0: no partition).
    pub partition: f64,
    /// The controller's grace.
    pub grace: Duration,
    /// How long a BMC takes to land a power change.
    pub bmc_delay: Duration,
    /// The crash's seed (which hosts).
    pub seed: u64,
    /// How many of the crashed hosts have a BMC that hangs (answers nothing): their fences
    /// cannot confirm them off, so their instances must stay where they are, and the other
    /// fences must not wait for them.
    pub bmc_hang: usize,
    /// SIGKILL `serve` while the crash's fences run (the first at `power_off`), and start it
    /// again 2 s later: the fences resume where they stand.
    pub kill_serve: bool,
    /// Stop PostgreSQL (immediate) at the same point, and start it again 3 s later.
    pub restart_db: bool,
    /// `serve` replicas on the one database (more than one: PostgreSQL). Each guard talks to
    /// one, and to the next when it does not answer (as behind a load balancer); `kill_serve`
    /// kills the one that leads the controller.
    pub replicas: usize,
    /// Where `nodekeeper-provisioner` is.
    pub bin_dir: PathBuf,
}

/// The guard's intervals.
const HEARTBEAT: Duration = Duration::from_secs(5);
const CONVERGE: Duration = Duration::from_secs(5);

/// Power states of the simulated hosts.
const OFF: u8 = 0;
const ON: u8 = 1;
/// Powered on but crashed: silent.
const HUNG: u8 = 2;

/// The simulated fleet's shared state.
struct World {
    power: Vec<AtomicU8>,
    /// What each host runs (its guard's last converge): kept while it hangs (a crashed or
    /// cut-off host's domains may still run), emptied when it is powered off.
    running: Vec<Mutex<Vec<InstanceId>>>,
    /// BMCs that answer nothing.
    hang: Vec<AtomicBool>,
    /// ForceOffs each host's BMC was sent.
    offs: Vec<std::sync::atomic::AtomicU32>,
    bmc_delay: Duration,
    /// Heartbeat latencies (µs) while `measuring`.
    latencies: Mutex<Vec<u32>>,
    measuring: AtomicBool,
    /// Guard API requests sent while `measuring`.
    requests: std::sync::atomic::AtomicU64,
    /// Requests that failed (status or transport), by kind.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    stop: AtomicBool,
    /// The checker's samples, instances seen on two powered hosts, most copies of one seen.
    copies: Mutex<(u64, usize, usize)>,
}

/// Every 250 ms: how many hosts with power run each instance.
async fn sample_copies(w: Arc<World>) {
    loop {
        let mut on: std::collections::HashMap<InstanceId, usize> = std::collections::HashMap::new();
        for (i, r) in w.running.iter().enumerate() {
            if w.power[i].load(Ordering::Relaxed) != OFF {
                for id in r.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    *on.entry(*id).or_default() += 1;
                }
            }
        }
        {
            let mut c = w.copies.lock().unwrap_or_else(|p| p.into_inner());
            c.0 += 1;
            c.1 += on.values().filter(|n| **n > 1).count();
            c.2 = c.2.max(on.values().copied().max().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the simulation measured.
#[derive(Debug, Default)]
pub struct Report {
    /// (what, value), in order.
    pub rows: Vec<(String, String)>,
    /// False fences, HA instances of crashed hosts not moved within the grace and 2 minutes
    /// (or missing), instances owned by no host, instances seen running on two hosts (each
    /// must be 0).
    pub violations: [usize; 4],
}

impl Report {
    fn row(&mut self, k: &str, v: impl ToString) {
        self.rows.push((k.to_owned(), v.to_string()));
    }

    /// The table.
    pub fn table(&self) -> String {
        let w = self.rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(10);
        self.rows.iter().map(|(k, v)| format!("| {k:<w$} | {v} |\n")).collect()
    }
}

fn percentile(sorted: &[u32], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_micros(u64::from(sorted[i]))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time (user + system) of `pid` so far, and its resident memory.
fn cpu_and_rss(pid: u32) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((Duration::from_millis(ticks * 10), rss_kb * 1024))
}

fn host(i: usize) -> HostName {
    format!("h{i:06}").parse().expect("a valid host name")
}

fn token(i: usize, salt: u64) -> String {
    format!("sim{i:06}x{salt:016x}{salt:016x}")
}

/// Runs it.
pub async fn simulate(opts: &Options, n: &Narrator) -> anyhow::Result<Report> {
    let dir = PathBuf::from(format!("/tmp/nksim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::process::Command::new("chmod").arg("755").arg(&dir).status()?;
    let result = run(opts, n, &dir).await;
    // NODEKEEPER_SIM_KEEP=1: the database and serve's log stay, to read what happened.
    if std::env::var("NODEKEEPER_SIM_KEEP").as_deref() == Ok("1") {
        n.say(&format!("kept {}", dir.display()));
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run(opts: &Options, n: &Narrator, dir: &Path) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut pg = None;
    let url = match opts.engine {
        Engine::Sqlite => format!("sqlite://{}/nodekeeper.db", dir.display()),
        Engine::Postgres => {
            let p = Postgres::create(dir, None)?;
            p.sql("CREATE DATABASE sim")?;
            let url = p.url("127.0.0.1", "sim");
            pg = Some(p);
            url
        }
    };
    anyhow::ensure!(!opts.restart_db || pg.is_some(), "restarting the database is for PostgreSQL");
    anyhow::ensure!(opts.replicas >= 1, "at least one serve replica");
    anyhow::ensure!(opts.replicas == 1 || pg.is_some(), "serve replicas share a PostgreSQL database");
    let engine = if opts.engine == Engine::Sqlite { "SQLite" } else { "PostgreSQL" };
    report.row("hosts", opts.hosts);
    report.row("engine", engine);

    // The BMCs.
    let world = Arc::new(World {
        power: (0..opts.hosts).map(|_| AtomicU8::new(ON)).collect(),
        running: (0..opts.hosts).map(|_| Mutex::new(Vec::new())).collect(),
        hang: (0..opts.hosts).map(|_| AtomicBool::new(false)).collect(),
        offs: (0..opts.hosts).map(|_| std::sync::atomic::AtomicU32::new(0)).collect(),
        bmc_delay: opts.bmc_delay,
        latencies: Mutex::new(Vec::new()),
        measuring: AtomicBool::new(false),
        requests: Default::default(),
        errors: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
        copies: Mutex::new((0, 0, 0)),
    });
    let app = Router::new()
        .route("/redfish/v1/Systems/{id}", get(bmc_system))
        .route("/redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset", post(bmc_reset))
        .with_state(world.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bmc_port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The fleet in the database.
    let began = Instant::now();
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    let salt = Rng::new(opts.seed ^ 0x5eed).next_u64();
    for i in 0..opts.hosts {
        let new = NewHost {
            name: host(i),
            mac: None,
            ip: None,
            bmc_url: Some(format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{i}")),
            bmc_credentials: None,
        };
        store.add_host(&new, "sim").await?;
        store.set_node_token(&host(i), &format!("{:x}", Sha256::digest(token(i, salt).as_bytes()))).await?;
    }
    let mut items = Vec::new();
    for i in 0..opts.hosts {
        for j in 0..opts.instances {
            let uuid = InstanceId::random();
            items.push(NewInstance {
                uuid,
                name: format!("h{i:06}-vm{j}"),
                domain_xml: None,
                owner: host(i),
                ha: j % 3 == 0,
                storage: Storage::Shared,
                generation: Generation(1),
            });
        }
    }
    for chunk in items.chunks(5_000) {
        store.import_instances(chunk, "sim").await?;
    }
    let total_instances = items.len();
    n.say(&format!("{} hosts and {total_instances} instances in {engine} ({})", opts.hosts, fmt(began.elapsed())));

    // serve: its replicas, each with its own port and log.
    std::fs::create_dir_all(dir.join("images"))?;
    let mut bases = Vec::new();
    let mut configs = Vec::new();
    for r in 0..opts.replicas {
        let port = free_port()?;
        let config = dir.join(if r == 0 { "serve.toml".to_owned() } else { format!("serve-{r}.toml") });
        std::fs::write(
            &config,
            format!(
                "database_url = \"{url}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
                 public_url = \"http://127.0.0.1:{port}\"\nimages_dir = \"{}\"\n[http.auth]\nmetrics_from = [\"127.0.0.1/32\"]\n\
                 [recovery]\ngrace = \"{}s\"\n",
                dir.join("images").display(),
                opts.grace.as_secs()
            ),
        )?;
        configs.push(config);
        bases.push(format!("http://127.0.0.1:{port}"));
    }
    let start_serve = |r: usize| -> anyhow::Result<Serve> {
        let name = if r == 0 { "serve.log".to_owned() } else { format!("serve-{r}.log") };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name))?;
        let child = std::process::Command::new(opts.bin_dir.join("nodekeeper-provisioner"))
            .args(["serve", "--config"])
            .arg(&configs[r])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting serve")?;
        Ok(Serve(child))
    };
    let mut serves = (0..opts.replicas).map(start_serve).collect::<anyhow::Result<Vec<Serve>>>()?;
    let pids: Vec<u32> = serves.iter().map(|s| s.0.id()).collect();
    let bases = Arc::new(bases);
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(usize::MAX).timeout(Duration::from_secs(10)).build()?;
    for base in bases.iter() {
        n.wait("serve answers", Duration::from_secs(60), async || {
            Ok(http.get(format!("{base}/healthz")).send().await.is_ok().then_some(()))
        })
        .await?;
    }
    if opts.replicas > 1 {
        report.row("serve replicas", opts.replicas);
    }

    // The hosts.
    let mut tasks = Vec::new();
    for i in 0..opts.hosts {
        let phase = Duration::from_millis((i as u64 * 5_000) / opts.hosts as u64);
        let (w, http, bases, tok) = (world.clone(), http.clone(), bases.clone(), token(i, salt));
        tasks.push(tokio::spawn(async move { guard_loop(i, phase, w, http, bases, tok).await }));
    }
    let hosts_active = async || -> anyhow::Result<usize> {
        Ok(store.hosts().await?.iter().filter(|h| h.state == HostState::Active && h.last_heartbeat.is_some()).count())
    };
    n.wait("every host heartbeats", Duration::from_secs(120), async || {
        Ok((hosts_active().await? == opts.hosts).then_some(()))
    })
    .await?;

    // Steady: latency, CPU, memory.
    tokio::time::sleep(CONVERGE * 2).await;
    // Every replica's CPU and memory, summed.
    let usage = || -> anyhow::Result<(Duration, u64)> {
        pids.iter().try_fold((Duration::ZERO, 0), |(cpu, rss), pid| {
            let (c, r) = cpu_and_rss(*pid).context("serve's /proc")?;
            Ok((cpu + c, rss + r))
        })
    };
    let (cpu0, _) = usage()?;
    let t0 = Instant::now();
    world.measuring.store(true, Ordering::Relaxed);
    // The controller's tick time, as `/metrics` says it, twice a second.
    let mut ticks = Vec::new();
    while t0.elapsed() < opts.steady {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The leader's (the others' ticks do nothing).
        let mut tick = None;
        for base in bases.iter() {
            tick = tick.max(tick_seconds(&http, base).await.map(|t| (t * 1e6) as u32));
        }
        ticks.extend(tick);
    }
    world.measuring.store(false, Ordering::Relaxed);
    ticks.sort_unstable();
    let (cpu1, rss) = usage()?;
    let cores = (cpu1 - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *world.latencies.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_unstable();
    report.row("heartbeats measured", lat.len());
    report.row("heartbeat p50 / p99", format!("{} / {}", ms(percentile(&lat, 0.5)), ms(percentile(&lat, 0.99))));
    report.row("serve CPU (cores), steady", format!("{cores:.2}"));
    let rate = world.requests.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    report.row(
        "guard API requests/s, steady",
        format!("{rate:.0} ({:.2} per host and 5 s)", rate * 5.0 / opts.hosts as f64),
    );
    report.row("serve RSS", format!("{} MiB", rss / (1024 * 1024)));
    report.row(
        "controller tick p50 / max, steady",
        format!(
            "{} / {}",
            ms(percentile(&ticks, 0.5)),
            ms(Duration::from_micros(u64::from(ticks.last().copied().unwrap_or(0))))
        ),
    );
    n.say(&format!(
        "steady: {}",
        report.rows.iter().skip(2).map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join("; ")
    ));

    // The crash.
    let mut rng = Rng::new(opts.seed);
    let mut crashed: Vec<usize> = Vec::new();
    while crashed.len() < opts.crash.min(opts.hosts / 2) {
        let i = rng.below(opts.hosts);
        if !crashed.contains(&i) {
            crashed.push(i);
        }
    }
    let ha_of: BTreeMap<HostName, Vec<InstanceId>> = crashed
        .iter()
        .map(|i| (host(*i), items.iter().filter(|x| x.owner == host(*i) && x.ha).map(|x| x.uuid).collect()))
        .collect();
    // The first `bmc_hang` of them: their BMCs answer nothing from now on.
    let hung_bmcs: Vec<usize> = crashed.iter().take(opts.bmc_hang.min(crashed.len())).copied().collect();
    for i in &hung_bmcs {
        world.hang[*i].store(true, Ordering::Relaxed);
    }
    let ha_of: BTreeMap<HostName, Vec<InstanceId>> =
        ha_of.into_iter().filter(|(h, _)| !hung_bmcs.iter().any(|i| host(*i) == *h)).collect();
    // The independent checker: from now on, every 250 ms, no instance runs on two hosts that
    // have power (a hung host's domains count as running until its power is off).
    let sampler = tokio::spawn(sample_copies(world.clone()));
    for i in &crashed {
        world.power[*i].store(HUNG, Ordering::Relaxed);
    }
    let crash_at = Instant::now();
    n.say(&format!(
        "{} hosts crash (silent, power on); {} of them with a BMC that hangs",
        crashed.len(),
        hung_bmcs.len()
    ));
    if opts.kill_serve || opts.restart_db {
        n.wait("a fence at power_off", opts.grace + Duration::from_secs(60), async || {
            Ok(store.running_operations("fence").await?.iter().any(|o| o.step == "power_off").then_some(()))
        })
        .await?;
    }
    if let Some(pg) = pg.as_mut().filter(|_| opts.restart_db) {
        pg.crash()?;
        n.say(&format!(
            "PostgreSQL stopped (immediate) at {} after the crash; started 3 s later",
            fmt(crash_at.elapsed())
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.start()?;
    }
    if opts.kill_serve {
        // The replica that leads the controller (its lease names it "host:pid").
        let holder = store.leadership("controller").await?.map(|l| l.holder).unwrap_or_default();
        let r = pids.iter().position(|pid| holder.ends_with(&format!(":{pid}"))).unwrap_or(0);
        let _ = serves[r].0.kill();
        let _ = serves[r].0.wait();
        n.say(&format!(
            "serve replica {r} of {} (the leader) SIGKILLed at {} after the crash; started again 2 s later",
            opts.replicas,
            fmt(crash_at.elapsed())
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        serves[r] = start_serve(r)?;
    }
    let mut moved: BTreeMap<HostName, Duration> = BTreeMap::new();
    let mut false_suspects = std::collections::BTreeSet::new();
    let limit = opts.grace + Duration::from_secs(120);
    while moved.len() < ha_of.len() && crash_at.elapsed() < limit {
        // (A read that fails — the database restarting — is taken again at the next look.)
        for h in ha_of.keys().filter(|h| !moved.contains_key(*h)).cloned().collect::<Vec<_>>() {
            if store.instances(Some(&h)).await.is_ok_and(|v| v.iter().all(|i| !i.ha)) {
                moved.insert(h, crash_at.elapsed());
            }
        }
        let hosts = store.hosts().await.unwrap_or_default();
        for h in hosts.iter().filter(|h| !crashed.iter().any(|i| host(*i) == h.name)) {
            if h.state != HostState::Active {
                false_suspects.insert(h.name.clone());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut took: Vec<u32> = moved.values().map(|d| d.as_micros() as u32).collect();
    took.sort_unstable();
    report.row("crashed hosts (HA moved)", format!("{} ({})", crashed.len(), moved.len()));
    report.row(
        &format!("crash → HA moved p50 / p99 (grace {} s)", opts.grace.as_secs()),
        format!("{:.1} s / {:.1} s", percentile(&took, 0.5).as_secs_f64(), percentile(&took, 0.99).as_secs_f64()),
    );

    report.row("hosts not active that talked (false suspects)", false_suspects.len());
    if !hung_bmcs.is_empty() {
        // No confirmed fence, nothing moves: each stays suspect, its instances its own.
        let mut kept = 0;
        for i in &hung_bmcs {
            let h = host(*i);
            let own = store.instances(Some(&h)).await?.iter().filter(|x| x.ha).count();
            let state = store.host(&h).await?.map(|x| x.state);
            if own == items.iter().filter(|x| x.owner == h && x.ha).count() && state == Some(HostState::Suspect) {
                kept += 1;
            }
        }
        report.row(
            "crashed hosts with a hanging BMC (suspect, HA instances kept)",
            format!("{} ({kept})", hung_bmcs.len()),
        );
    }

    // A partition: most of the fleet silent at once. Nothing may be fenced.
    if opts.partition > 0.0 {
        let live: Vec<usize> = (0..opts.hosts).filter(|i| !crashed.contains(i)).collect();
        let count = ((live.len() as f64) * opts.partition.min(1.0)).round() as usize;
        // Drawn across the fleet, so their guards' heartbeat phases spread over the whole
        // interval, as a real partition's do.
        let mut live = live;
        for i in (1..live.len()).rev() {
            live.swap(i, rng.below(i + 1));
        }
        let cut: Vec<usize> = live.into_iter().take(count).collect();
        for i in &cut {
            world.power[*i].store(HUNG, Ordering::Relaxed);
        }
        n.say(&format!("{} hosts ({:.0} %) cut off at once (silent, power on)", cut.len(), opts.partition * 100.0));
        tokio::time::sleep(opts.grace + Duration::from_secs(20)).await;
        let suspect = store.hosts().await?.iter().filter(|h| h.state == HostState::Suspect).count();
        for i in &cut {
            // Back: they boot their guard again (ownership first), as after a network heal.
            let _ = world.power[*i].compare_exchange(HUNG, ON, Ordering::Relaxed, Ordering::Relaxed);
        }
        n.wait("the cut-off hosts active again", Duration::from_secs(120), async || {
            Ok((hosts_active().await? + crashed.len() >= opts.hosts).then_some(()))
        })
        .await?;
        report.row("partition: hosts cut (suspect at the end of it)", format!("{} ({suspect})", cut.len()));
    }

    // The end: nothing lost, everything owned by a host that exists, no host that talked
    // powered off.
    world.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    sampler.abort();
    let (samples, doubles, most) = *world.copies.lock().unwrap_or_else(|p| p.into_inner());
    let (hosts, instances) = (store.hosts().await?, store.instances(None).await?);
    let names: std::collections::BTreeSet<&HostName> = hosts.iter().map(|h| &h.name).collect();
    let lost = total_instances.saturating_sub(instances.iter().filter(|i| !i.deleted).count())
        + ha_of.iter().filter(|(h, _)| !moved.contains_key(*h)).map(|(_, ha)| ha.len()).sum::<usize>();
    let orphans = instances.iter().filter(|i| !names.contains(&i.owner)).count();
    let false_fences =
        (0..opts.hosts).filter(|i| !crashed.contains(i) && world.offs[*i].load(Ordering::Relaxed) > 0).count();
    report.violations = [false_fences, lost, orphans, doubles];
    report.row("false fences / not moved in time or lost / ownerless", format!("{false_fences} / {lost} / {orphans}"));
    report.row(
        "samples of what runs where: instances on two hosts (most copies of one)",
        format!("{samples}: {doubles} ({most})"),
    );
    let errors = world.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.row("guard API errors", if errors.is_empty() { "0".into() } else { format!("{errors:?}") });
    report.row("database size", format!("{} MiB", db_size(opts.engine, dir) / (1024 * 1024)));
    store.close().await;
    drop(serves);
    Ok(report)
}

/// The last controller tick's time, from `serve`'s `/metrics`.
async fn tick_seconds(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("nodekeeper_recovery_tick_last_seconds ")?.trim().parse().ok())
}

fn db_size(engine: Engine, dir: &Path) -> u64 {
    match engine {
        Engine::Sqlite => ["nodekeeper.db", "nodekeeper.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum(),
        Engine::Postgres => dir_size(&dir.join("pg/data")),
    }
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `serve`, killed (and reaped) when dropped: at the end, or when the simulation fails.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One simulated guard: boots (ownership), then heartbeats and converges on a guard's
/// schedule while its power is on and it has not crashed.
async fn guard_loop(
    i: usize,
    phase: Duration,
    w: Arc<World>,
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    token: String,
) {
    // Its replica; the next one after a request that found none (a load balancer's failover).
    let at = std::sync::atomic::AtomicUsize::new(i % bases.len());
    let url = |rest: &str| format!("{}/api/v1/hosts/h{i:06}/guard/{rest}", bases[at.load(Ordering::Relaxed)]);
    let unanswered = |e: &reqwest::Error| {
        if e.is_connect() {
            at.store((at.load(Ordering::Relaxed) + 1) % bases.len(), Ordering::Relaxed);
        }
    };
    let auth = format!("Bearer {token}");
    let fail = |what: &'static str| {
        *w.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(what).or_default() += 1;
    };
    let count = || {
        if w.measuring.load(Ordering::Relaxed) {
            w.requests.fetch_add(1, Ordering::Relaxed);
        }
    };
    let mut booted = false;
    // The revision the last complete pass began from, and when (the real guard's rule: ask
    // again when the revision moves or the full pass is due).
    let mut basis: Option<(i64, Instant, u64)> = None;
    let mut rng = Rng::new(i as u64 ^ 0xba515);
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(HEARTBEAT.min(CONVERGE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !w.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        match w.power[i].load(Ordering::Relaxed) {
            ON => {}
            // Off: nothing runs. Hung: silent, and what ran may still run.
            p => {
                if p == OFF {
                    w.running[i].lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
                booted = false;
                basis = None;
                continue;
            }
        }
        let running = w.running[i].lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Who owns what this host runs (guard boot's question, and the converge pass's first).
        let ownership = async |running: &[InstanceId]| {
            count();
            let r = http
                .post(url("ownership"))
                .header("authorization", &auth)
                .json(&serde_json::json!({ "uuids": running }));
            let ok = r.send().await.inspect_err(unanswered).is_ok_and(|r| r.status().is_success());
            if !ok {
                fail("ownership");
            }
            ok
        };
        if !booted {
            // guard boot: what may this host run of what it has (nothing, after power-on).
            if !ownership(&running).await {
                continue;
            }
            booted = true;
        }
        let start = Instant::now();
        count();
        let mut revision = None;
        match http.post(url("heartbeat")).header("authorization", &auth).send().await.inspect_err(unanswered) {
            Ok(r) if r.status().is_success() => {
                if w.measuring.load(Ordering::Relaxed) {
                    let us = start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    w.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                }
                match r.json::<HeartbeatAnswer>().await {
                    Ok(a) => revision = a.revision.zip(a.full_pass_ms.map(Duration::from_millis)),
                    Err(_) => fail("heartbeat"),
                }
            }
            _ => fail("heartbeat"),
        }
        if let (Some((r, full_pass)), Some((b, at, seed))) = (revision, basis) {
            if r == b && at.elapsed() < nodekeeper_guard::watch::converge::spread(full_pass, seed) {
                continue; // nothing new: nothing to ask
            }
        }
        // converge: what it runs that moved away, what is assigned (and its services), then
        // the report.
        let began = Instant::now();
        let mut complete = ownership(&running).await;
        count();
        match http.get(url("assigned")).header("authorization", &auth).send().await.inspect_err(unanswered) {
            Ok(r) if r.status().is_success() => match r.json::<Vec<Assigned>>().await {
                Ok(a) => {
                    let now: Vec<InstanceId> = a.iter().filter(|x| !x.deleted && !x.held).map(|x| x.uuid).collect();
                    // A host that hung meanwhile converges nothing.
                    if w.power[i].load(Ordering::Relaxed) == ON {
                        *w.running[i].lock().unwrap_or_else(|p| p.into_inner()) = now;
                    }
                }
                Err(_) => {
                    complete = false;
                    fail("assigned")
                }
            },
            _ => {
                complete = false;
                fail("assigned")
            }
        }
        count();
        if !http
            .get(url("services"))
            .header("authorization", &auth)
            .send()
            .await
            .inspect_err(unanswered)
            .is_ok_and(|r| r.status().is_success())
        {
            complete = false;
            fail("services");
        }
        let running = w.running[i].lock().unwrap_or_else(|p| p.into_inner()).clone();
        let report: Vec<serde_json::Value> =
            running.iter().map(|u| serde_json::json!({ "uuid": u, "running": true, "generation": null })).collect();
        count();
        if !http
            .put(url("report"))
            .header("authorization", &auth)
            .json(&report)
            .send()
            .await
            .inspect_err(unanswered)
            .is_ok_and(|r| r.status().is_success())
        {
            complete = false;
            fail("report");
        }
        basis = revision.filter(|_| complete).map(|(r, _)| (r, began, rng.next_u64()));
    }
}

async fn bmc_system(State(w): State<Arc<World>>, UrlPath(id): UrlPath<usize>) -> Response {
    let Some(p) = w.power.get(id) else { return StatusCode::NOT_FOUND.into_response() };
    if w.hang[id].load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    let on = p.load(Ordering::Relaxed) != OFF;
    Json(serde_json::json!({ "Id": id.to_string(), "PowerState": if on { "On" } else { "Off" } })).into_response()
}

async fn bmc_reset(
    State(w): State<Arc<World>>,
    UrlPath(id): UrlPath<usize>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if id >= w.power.len() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if w.hang[id].load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    let to = match body["ResetType"].as_str() {
        Some("ForceOff") => OFF,
        Some("On") => ON,
        _ => return StatusCode::BAD_REQUEST.into_response(),
    };
    if to == OFF {
        w.offs[id].fetch_add(1, Ordering::Relaxed);
    }
    let w2 = w.clone();
    tokio::spawn(async move {
        tokio::time::sleep(w2.bmc_delay).await;
        let p = &w2.power[id];
        // On does not wake a crashed host that was never powered off; Off ends any state,
        // and every domain with it.
        if to == OFF {
            w2.running[id].lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        if to == OFF || p.load(Ordering::Relaxed) == OFF {
            p.store(to, Ordering::Relaxed);
        }
    });
    StatusCode::NO_CONTENT.into_response()
}
