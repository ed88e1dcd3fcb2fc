//! `nodekeeper-lab chaos --runs N --seed S`: a Jepsen-style campaign against real processes.
//!
//! Each run: a fresh database on a private PostgreSQL, two `serve` replicas on it, three hosts
//! (a namespace, a libvirtd and a guard each; see [`fleet`]) with BMCs ([`bmc`]), nine
//! instances (six HA). Once everything runs where the database says, the run's faults
//! ([`schedule`], drawn from its seed) land within a 20 s window; then every fault is healed
//! and the fleet must settle. The checker ([`checker`]) samples every 200 ms throughout.
//!
//! A run passes when no sample saw an instance on two hosts or on a host it had been taken
//! from, and the fleet settled within 3 minutes: every host active, no operation running,
//! every instance running on its owner and nowhere else (none lost), a fenced host's HA
//! instances on the others. A failing run prints its schedule and the command that replays it
//! (`--seed` of that run, `--runs 1`): the same faults at the same offsets; the processes' own
//! timing is not replayed.

pub mod bmc;
pub mod checker;
pub mod fleet;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nodekeeper_store::{Generation, HostName, HostState, InstanceId, NewHost, NewInstance, Storage, Store};

use crate::{fmt, Narrator};
use checker::{Checker, Findings, ServiceWatch, Watched};
use fleet::Fleet;
use schedule::{Fault, Schedule};

/// How a campaign runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many runs.
    pub runs: u32,
    /// Run k's seed is `seed + k`.
    pub seed: u64,
    /// Hosts per run.
    pub hosts: usize,
    /// The fault window.
    pub window: Duration,
    /// Where `nodekeeper-provisioner` and `nodekeeper-guard` are.
    pub bin_dir: PathBuf,
    /// Keep the campaign's directory (logs) even when every run passed.
    pub keep: bool,
}

/// Instances per host, and how many of them are HA.
const PER_HOST: usize = 3;
const HA_PER_HOST: usize = 2;
const REPLICAS: usize = 2;
const SETTLE: Duration = Duration::from_secs(180);
/// The exclusive service every run has: one copy, a `sleep` with this argument.
const SERVICE: &str = "api";
const SERVICE_MARK: &str = "7654321";

/// One run's outcome.
#[derive(Debug)]
pub struct RunResult {
    /// Its faults.
    pub schedule: Schedule,
    /// What the checker saw.
    pub findings: Findings,
    /// Why it failed (empty: passed).
    pub problems: Vec<String>,
    /// From faults to settled.
    pub settled_in: Duration,
    /// Power-ons and power-offs by BMCs, reboots asked by guards (self-fences).
    pub power: [u32; 3],
    /// Fences the controller finished.
    pub fences: usize,
}

/// The campaign's outcome.
#[derive(Debug, Default)]
pub struct Report {
    /// Every run.
    pub runs: Vec<RunResult>,
    /// The campaign's directory (logs), when kept.
    pub kept: Option<PathBuf>,
}

impl Report {
    /// Whether every run passed.
    pub fn passed(&self) -> bool {
        self.runs.iter().all(|r| r.problems.is_empty())
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut kinds: BTreeMap<&str, usize> = Fault::KINDS.iter().map(|k| (*k, 0)).collect();
        for r in &self.runs {
            for (_, f) in &r.schedule.faults {
                *kinds.entry(f.kind()).or_default() += 1;
            }
        }
        let sum = |f: &dyn Fn(&RunResult) -> usize| self.runs.iter().map(f).sum::<usize>();
        let failed: Vec<String> =
            self.runs.iter().filter(|r| !r.problems.is_empty()).map(|r| r.schedule.seed.to_string()).collect();
        let settle: Vec<Duration> = self.runs.iter().map(|r| r.settled_in).collect();
        let worst = settle.iter().max().copied().unwrap_or_default();
        let mut moves: Vec<Duration> =
            self.runs.iter().flat_map(|r| r.findings.service_moves.iter().copied()).collect();
        moves.sort();
        let mut rows: Vec<(String, String)> = vec![
            ("runs (passed)".into(), format!("{} ({})", self.runs.len(), self.runs.len() - failed.len())),
            ("failed seeds".into(), if failed.is_empty() { "-".into() } else { failed.join(", ") }),
            ("faults injected".into(), sum(&|r| r.schedule.faults.len()).to_string()),
        ];
        rows.extend(kinds.iter().map(|(k, n)| (format!("  {k}"), n.to_string())));
        rows.extend([
            ("samples".into(), sum(&|r| r.findings.samples).to_string()),
            ("samples with a host unreachable".into(), sum(&|r| r.findings.hosts_unreachable).to_string()),
            ("samples with the database unreachable".into(), sum(&|r| r.findings.db_unreachable).to_string()),
            ("instance-samples not running (availability cost)".into(), sum(&|r| r.findings.not_running).to_string()),
            ("double runs".into(), sum(&|r| r.findings.doubles.len()).to_string()),
            ("stale runs (after the move)".into(), sum(&|r| r.findings.stale.len()).to_string()),
            ("samples over n copies (exclusive service)".into(), sum(&|r| r.findings.over_copies.len()).to_string()),
            (
                "runs not settled (lost, stuck)".into(),
                sum(&|r| usize::from(r.problems.iter().any(|p| p.starts_with("not settled")))).to_string(),
            ),
            ("fence operations finished".into(), sum(&|r| r.fences).to_string()),
            ("power-offs by BMCs".into(), sum(&|r| r.power[1] as usize).to_string()),
            ("self-fence reboots".into(), sum(&|r| r.power[2] as usize).to_string()),
            ("settle after the faults: worst".into(), fmt(worst)),
            ("exclusive service moved (times)".into(), moves.len().to_string()),
            (
                "  its copy ran nowhere for: median / worst".into(),
                match (moves.get(moves.len() / 2), moves.last()) {
                    (Some(m), Some(w)) => format!("{:.1} s / {:.1} s", m.as_secs_f64(), w.as_secs_f64()),
                    _ => "-".into(),
                },
            ),
        ]);
        let w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(10);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("| {k:<w$} | {v} |\n"));
        }
        out
    }
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// What this machine lacks for a campaign.
pub fn missing(bin_dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root".to_owned());
    }
    for p in [fleet::FAKETIME.to_owned(), "/usr/lib/postgresql/15/bin/initdb".to_owned()]
        .into_iter()
        .chain(["nodekeeper-guard", "nodekeeper-provisioner"].map(|b| bin_dir.join(b).display().to_string()))
    {
        if !Path::new(&p).exists() {
            missing.push(p);
        }
    }
    for tool in ["libvirtd", "setpriv", "ip", "psql"] {
        if !std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            missing.push(tool.to_owned());
        }
    }
    if !std::process::Command::new("id").arg(fleet::LIBVIRT_USER).output().is_ok_and(|o| o.status.success()) {
        missing.push(format!("the user {} (scripts/setup-test-deps.sh)", fleet::LIBVIRT_USER));
    }
    missing
}

/// Runs the campaign, narrating each run.
pub async fn campaign(opts: &Options, n: &Narrator) -> anyhow::Result<Report> {
    // libvirt prints every failed call on stderr; a host that is off is expected here.
    virt::error::clear_error_callback();
    let lacking = missing(&opts.bin_dir);
    anyhow::ensure!(lacking.is_empty(), "this machine lacks: {}", lacking.join(", "));
    let pid = std::process::id();
    let dir = PathBuf::from(format!("/tmp/nkchaos-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::process::Command::new("chmod").args(["755"]).arg(&dir).status()?;
    // A subnet and names no other campaign on this machine uses (their bridge exists).
    let tag = (0..200)
        .map(|i| 20 + (pid + i) % 200)
        .find(|t| !Path::new(&format!("/sys/class/net/nkc{t}b")).exists())
        .context("every chaos subnet is taken")?;
    n.say(&format!(
        "chaos: {} runs from seed {}; PostgreSQL, {} hosts, logs in {}",
        opts.runs,
        opts.seed,
        opts.hosts,
        dir.display()
    ));
    let fleet = Arc::new(Mutex::new(Fleet::new(&dir, tag, opts.hosts, &opts.bin_dir)?));
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                fleet.lock().unwrap_or_else(|p| p.into_inner()).tick();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let bmc = bmc::serve(fleet.clone()).await?;
    let mut report = Report::default();
    let mut outcome = Ok(());
    for k in 0..opts.runs {
        let seed = opts.seed.wrapping_add(u64::from(k));
        let schedule = Schedule::draw(seed, opts.hosts, REPLICAS, opts.window);
        let result = one_run(&fleet, &dir, &bmc, k, schedule, opts, n).await;
        lock(&fleet).stop_all();
        match result {
            Ok(r) => {
                if r.problems.is_empty() {
                    n.say(&format!(
                        "run {k} (seed {seed}): passed — {} faults, {} samples, settled in {}",
                        r.schedule.faults.len(),
                        r.findings.samples,
                        fmt(r.settled_in)
                    ));
                } else {
                    n.say(&format!("run {k} (seed {seed}): FAILED\n{}", r.schedule));
                    for p in r.problems.iter().take(20) {
                        eprintln!("    {p}");
                    }
                    eprintln!(
                        "    replay: nodekeeper-lab chaos --runs 1 --seed {seed}  (logs: {}/run{k})",
                        dir.display()
                    );
                }
                report.runs.push(r);
            }
            Err(e) => {
                outcome = Err(e.context(format!("run {k} (seed {seed}) could not be run")));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    lock(&fleet).shutdown();
    drop(fleet);
    if opts.keep || !report.passed() || outcome.is_err() {
        report.kept = Some(dir);
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome.map(|()| report)
}

fn lock(fleet: &Mutex<Fleet>) -> std::sync::MutexGuard<'_, Fleet> {
    fleet.lock().unwrap_or_else(|p| p.into_inner())
}

fn host(i: usize) -> HostName {
    format!("h{i}").parse().expect("a valid host name")
}

/// One run, from a fresh database to settled.
async fn one_run(
    fleet: &Arc<Mutex<Fleet>>,
    dir: &Path,
    bmc: &str,
    k: u32,
    schedule: Schedule,
    opts: &Options,
    n: &Narrator,
) -> anyhow::Result<RunResult> {
    let run_dir = dir.join(format!("run{k}"));
    std::fs::create_dir_all(&run_dir)?;
    let db = format!("run{k}");
    let (url, guard_url, watched, ips) = {
        let f = lock(fleet);
        f.wipe_hosts()?;
        f.postgres.sql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))?;
        f.postgres.sql(&format!("CREATE DATABASE {db}"))?;
        let watched: Vec<Watched> =
            f.machines.iter().map(|m| Watched { name: m.name.clone(), uri: m.uri(), ns: m.ns().to_owned() }).collect();
        let ips: Vec<String> = (0..opts.hosts).map(|i| f.network.ip(i)).collect();
        (f.postgres.url("127.0.0.1", &db), f.postgres.url(&f.network.gateway, &db), watched, ips)
    };
    let store = Store::connect(&url).await.context("the run's database")?;
    store.migrate().await?;
    for (i, ip) in ips.iter().enumerate() {
        let new = NewHost {
            name: host(i),
            mac: None,
            ip: Some(ip.parse()?),
            bmc_url: Some(format!("{bmc}h{i}")),
            bmc_credentials: None,
        };
        store.add_host(&new, "chaos").await?;
    }
    let mut items = Vec::new();
    for i in 0..opts.hosts {
        for j in 0..PER_HOST {
            let uuid = InstanceId::random();
            let name = format!("h{i}-vm{j}");
            items.push(NewInstance {
                domain_xml: Some(format!(
                    "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory>\
                     <os><type arch='x86_64'>hvm</type></os><devices/></domain>"
                )),
                uuid,
                name,
                owner: host(i),
                ha: j < HA_PER_HOST,
                storage: Storage::Shared,
                generation: Generation(1),
            });
        }
    }
    store.import_instances(&items, "chaos").await?;
    // An exclusive service with one copy: a process in the host's namespace (it dies with the
    // host's power, not with its guard), its pid in the host's directory.
    let pidfile = format!("{}/$NK_HOST-$NK_SERVICE-$NK_SLOT.pid", dir.display());
    let sh = |script: String| vec!["sh".to_owned(), "-c".to_owned(), script];
    store
        .put_service(
            &nodekeeper_store::Service {
                name: SERVICE.into(),
                copies: 1,
                labels: Vec::new(),
                start: sh(format!("setsid sleep {SERVICE_MARK} </dev/null >/dev/null 2>&1 & echo $! > {pidfile}")),
                stop: sh(format!("kill $(cat {pidfile}) 2>/dev/null; rm -f {pidfile}")),
                check: Some(sh(format!("kill -0 $(cat {pidfile} 2>/dev/null) 2>/dev/null"))),
                exclusive: true,
            },
            "chaos",
        )
        .await?;
    let names: BTreeMap<String, String> = items.iter().map(|i| (i.uuid.to_string(), i.name.clone())).collect();
    // The first host's guard reaches PostgreSQL itself; the others go through a replica's
    // guard API (the production path: node tokens, the heartbeat's revision and the converge
    // pass that asks nothing at rest), host i through replica (i - 1) % replicas.
    let mut tokens = Vec::new();
    for i in 1..opts.hosts {
        use sha2::Digest;
        let token = format!("{}", InstanceId::random()).replace('-', "") + &format!("{k:08}x{i:04}");
        store.set_node_token(&host(i), &format!("{:x}", sha2::Sha256::digest(token.as_bytes()))).await?;
        tokens.push(token);
    }
    {
        let mut f = lock(fleet);
        let apis = f.prepare_run(&run_dir, &url, REPLICAS)?;
        for (i, m) in f.machines.iter().enumerate() {
            let backend = match i {
                0 => fleet::GuardBackend::Database(guard_url.clone()),
                _ => fleet::GuardBackend::Api { url: apis[(i - 1) % apis.len()].clone(), token: tokens[i - 1].clone() },
            };
            m.write_config(&backend, &ips[i])?;
        }
        let now = Instant::now();
        for m in &mut f.machines {
            m.power_on(now);
        }
        f.running = true;
    }
    let service =
        ServiceWatch { name: SERVICE.into(), marker: format!("sleep\0{SERVICE_MARK}").into_bytes(), copies: 1 };
    let checker = Checker::start(watched, service, store.clone(), names, &run_dir.join("timeline.log"))?;
    n.wait("every instance running on its owner", Duration::from_secs(90), async || {
        Ok(settled(&store, &checker.findings(), opts.hosts).await.is_empty().then_some(()))
    })
    .await
    .with_context(|| format!("run {k}: the fleet never came up (logs in {})", dir.display()))?;

    // The faults.
    let t0 = checker.findings().samples;
    n.say(&format!("run {k}: {}", schedule.to_string().trim_end().replace('\n', "\n   ")));
    let start = Instant::now();
    for (at, fault) in &schedule.faults {
        tokio::time::sleep((start + *at).saturating_duration_since(Instant::now())).await;
        let applied = lock(fleet).apply(fault);
        if let Err(e) = applied {
            eprintln!("chaos: applying {fault}: {e:#}");
        }
    }
    tokio::time::sleep((start + opts.window + Duration::from_secs(2)).saturating_duration_since(Instant::now())).await;
    lock(fleet).heal_all()?;

    // Settled: within the bound, or what is still wrong.
    let healed = Instant::now();
    let mut left = Vec::new();
    while healed.elapsed() < SETTLE {
        left = settled(&store, &checker.findings(), opts.hosts).await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled_in = healed.elapsed();
    let findings = checker.finish();
    let mut problems: Vec<String> =
        findings.doubles.iter().chain(&findings.stale).chain(&findings.over_copies).cloned().collect();
    if !left.is_empty() {
        problems.push(format!("not settled within {}: {}", fmt(SETTLE), left.join("; ")));
    }
    let fences = store
        .operations(None, false, 1000)
        .await?
        .iter()
        .filter(|o| o.kind == "fence" && o.status == nodekeeper_store::OperationStatus::Done)
        .count();
    let power = lock(fleet).machines.iter().fold([0; 3], |mut a, m| {
        for (x, y) in a.iter_mut().zip(m.counts) {
            *x += y;
        }
        a
    });
    let events = store.events(&nodekeeper_store::EventFilter { limit: Some(10_000), ..Default::default() }).await?;
    let text: String = events
        .iter()
        .map(|e| {
            let host = e.host.as_ref().map(ToString::to_string).unwrap_or_default();
            format!("{} {} {} {host} {}\n", e.at, e.actor, e.kind, e.message)
        })
        .collect();
    std::fs::write(run_dir.join("events.log"), format!("faults from sample {t0}\n{}\n{text}", schedule))?;
    store.close().await;
    Ok(RunResult { schedule, findings, problems, settled_in, power, fences })
}

/// What keeps the fleet from being settled (empty: settled): hosts not active, operations
/// running, instances not running on exactly their owner.
async fn settled(store: &Store, seen: &Findings, hosts: usize) -> Vec<String> {
    let mut wrong = Vec::new();
    let read = async {
        let h = store.hosts().await?;
        let ops = store.operations(None, true, 100).await?;
        let inst = store.instances(None).await?;
        let copies = store.service_copies(Some(SERVICE)).await?;
        anyhow::Ok((h, ops, inst, copies))
    };
    let (h, ops, inst, copies) = match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return vec![format!("database: {e:#}")],
        Err(_) => return vec!["database: no answer within 3 s".into()],
    };
    for host in h.iter().filter(|h| h.state != HostState::Active) {
        wrong.push(format!("{} is {}", host.name, host.state));
    }
    for op in &ops {
        wrong.push(format!("{} of {} running at {}", op.kind, op.target, op.step));
    }
    if seen.last.len() != hosts {
        wrong.push("no sample yet".into());
        return wrong;
    }
    for i in inst.iter().filter(|i| !i.deleted) {
        let on: Vec<String> = seen
            .last
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.contains(&i.uuid.to_string())))
            .map(|(h, _)| format!("h{h}"))
            .collect();
        if on != [i.owner.to_string()] {
            wrong.push(format!("{} (owner {}) running on [{}]", i.name, i.owner, on.join(", ")));
        }
    }
    let want: Vec<usize> =
        (0..hosts).map(|i| copies.iter().filter(|c| c.host.as_str() == format!("h{i}")).count()).collect();
    if seen.last_copies != want {
        wrong.push(format!("{SERVICE} copies per host {:?}, assigned {want:?}", seen.last_copies));
    }
    wrong
}
