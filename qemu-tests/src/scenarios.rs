//! The scenarios, each ending in a summary table and a check of the invariants: no instance
//! ever ran on two nodes (sampled every second throughout), and nothing was deleted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use nodekeeper_store::{EventFilter, Generation, HostName, HostState, InstanceId, Timestamp};

use crate::hw::Hardware;
use crate::lab::{Lab, Paths, Sample};
use crate::{fmt, Narrator};

/// What a scenario measured.
#[derive(Debug, Default)]
pub struct Summary {
    /// (phase, how long).
    pub phases: Vec<(String, Duration)>,
    /// Samples taken.
    pub samples: usize,
    /// Samples in which an instance ran on two nodes (must be 0).
    pub double_runs: usize,
    /// Per node: name, hardware, boot path, target disk, how its image booted.
    pub nodes: Vec<[String; 5]>,
}

impl Summary {
    /// The table.
    pub fn table(&self) -> String {
        let width = self.phases.iter().map(|p| p.0.chars().count()).max().unwrap_or(10).max(10);
        let mut out = String::new();
        if !self.nodes.is_empty() {
            let head = ["node", "hardware", "boot path (deploy)", "target disk", "booted its image as"];
            let w: Vec<usize> = (0..5)
                .map(|i| self.nodes.iter().map(|r| r[i].chars().count()).chain([head[i].len()]).max().unwrap_or(4))
                .collect();
            let line = |r: [&str; 5]| {
                let cells: Vec<String> = r.iter().zip(&w).map(|(c, w)| format!("{c:<w$}")).collect();
                format!("| {} |\n", cells.join(" | "))
            };
            out.push_str(&line(head));
            let rule: Vec<String> = w.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&format!("| {} |\n", rule.join(" | ")));
            for r in &self.nodes {
                out.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
            }
            out.push('\n');
        }
        out.push_str(&format!("| {:<width$} | {:>12} |\n| {:-<width$} | {:->12} |\n", "phase", "took", "", ""));
        for (phase, took) in &self.phases {
            out.push_str(&format!("| {phase:<width$} | {:>12} |\n", fmt(*took)));
        }
        out.push_str(&format!(
            "\n{} samples of who runs what (every second, every node): {} with an instance on two nodes\n",
            self.samples, self.double_runs
        ));
        out
    }
}

/// A tiny instance: 32 MiB, no disk (SeaBIOS idles looking for one). Nested TCG is slow;
/// what matters is which node defines and runs it.
fn instance_line(name: &str, host: &str, ha: bool) -> (InstanceId, String) {
    let uuid = InstanceId::random();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices/></domain>"
    );
    let line = serde_json::json!({
        "uuid": uuid.to_string(), "name": name, "host": host, "ha": ha, "storage": "shared", "domain_xml": xml,
    });
    (uuid, line.to_string())
}

/// Samples every second in the background of `work`, counting double runs.
struct Sampler {
    samples: Vec<Sample>,
}

impl Sampler {
    fn check(&mut self, s: Sample, n: &Narrator) -> usize {
        let doubles = s.running.iter().filter(|(_, nodes)| nodes.len() > 1).count();
        if doubles > 0 {
            n.say(&format!("!! double run at {}: {:?}", s.at, s.running));
        }
        self.samples.push(s);
        doubles
    }
}

async fn sample_while<T>(
    lab: &mut Lab,
    sampler: &mut Sampler,
    summary: &mut Summary,
    n: &Narrator,
    what: &str,
    limit: Duration,
    mut ok: impl AsyncFnMut(&Lab) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<(T, Duration)> {
    n.wait(what, limit, async || {
        let s = lab.sample().await?;
        summary.double_runs += sampler.check(s, n);
        summary.samples += 1;
        ok(lab).await
    })
    .await
}

async fn events(lab: &Lab, instance: InstanceId) -> anyhow::Result<Vec<(String, String)>> {
    let filter = EventFilter { instance: Some(instance), limit: Some(1000), ..Default::default() };
    Ok(lab.store.events(&filter).await?.into_iter().map(|e| (e.actor, e.kind)).collect())
}

/// Imports two HA instances and one plain one on node-a; waits until node-a's guard runs them.
async fn place_on_node_a(
    lab: &mut Lab,
    n: &Narrator,
    sampler: &mut Sampler,
    summary: &mut Summary,
) -> anyhow::Result<Vec<InstanceId>> {
    let mut ids = Vec::new();
    let mut lines = String::new();
    for (name, ha) in [("web-1", true), ("db-1", true), ("batch-1", false)] {
        let (id, line) = instance_line(name, "node-a", ha);
        ids.push(id);
        lines.push_str(&line);
        lines.push('\n');
    }
    let file = lab.dir.join("instances.jsonl");
    std::fs::write(&file, lines)?;
    lab.nk(&["instance", "import", &file.display().to_string()])?;
    n.say("imported web-1 (HA), db-1 (HA) and batch-1 (not HA), all owned by node-a");
    let a: HostName = "node-a".parse()?;
    let want = ids.clone();
    let (_, took) =
        sample_while(lab, sampler, summary, n, "node-a's guard starting them", Duration::from_secs(600), async |lab| {
            let running = lab.report(&a).await?.map(|r| r.1).unwrap_or_default();
            Ok(want.iter().all(|id| running.contains(id)).then_some(()))
        })
        .await?;
    n.say(&format!("node-a's guard defined and started all three from the database ({})", fmt(took)));
    summary.phases.push(("import → running on node-a".into(), took));
    Ok(ids)
}

/// `failover`: node-a loses its network; it self-fences; the controller fences it through its
/// BMC and moves its HA instances to node-b; node-a is powered on again and its guard
/// quarantines the stale definitions before libvirtd starts.
pub async fn failover(paths: Paths, fleet: &[Hardware], n: &Narrator) -> anyhow::Result<Summary> {
    n.say("scenario failover: two compute nodes, HA instances on node-a, node-a cut off");
    on_a_lab(paths, fleet, 2, n, failover_on).await
}

/// Runs `scenario` on a fresh lab of `nodes` nodes — node i with `fleet[i]` (the last entry
/// for the nodes past the fleet's end); keeps its logs and consoles when it fails.
async fn on_a_lab(
    paths: Paths,
    fleet: &[Hardware],
    nodes: usize,
    n: &Narrator,
    scenario: impl AsyncFnOnce(&mut Lab, &Narrator) -> anyhow::Result<Summary>,
) -> anyhow::Result<Summary> {
    let default = [Hardware::virtio_bios()];
    let fleet = if fleet.is_empty() { &default[..] } else { fleet };
    let fleet: Vec<Hardware> = (0..nodes).map(|i| fleet[i.min(fleet.len() - 1)].clone()).collect();
    let mut lab = Lab::up(paths, &fleet, n).await?;
    let result = scenario(&mut lab, n).await;
    if result.is_err() {
        let dir = lab.keep().display().to_string();
        n.say(&format!("kept the lab's logs and consoles in {dir}"));
    }
    result
}

async fn failover_on(lab: &mut Lab, n: &Narrator) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut sampler = Sampler { samples: Vec::new() };
    summary.phases.extend(lab.install(n).await?);
    summary.nodes = lab.node_rows()?;
    let ids = place_on_node_a(lab, n, &mut sampler, &mut summary).await?;
    cut_and_recover(lab, n, &ids, &mut sampler, &mut summary).await?;
    Ok(summary)
}

/// `provisioner-outage`: the provisioner (and the embedded database behind it) stops for five
/// minutes: no guard stops an HA instance — each reaches its peer, and neither reaches the
/// controller, so the controller is what is down — and nothing is fenced when it returns.
/// Then node-a's NIC is cut, as in `failover`: node-a, cut off from its peer too, self-fences,
/// and node-b gets its HA instances.
pub async fn provisioner_outage(paths: Paths, fleet: &[Hardware], n: &Narrator) -> anyhow::Result<Summary> {
    n.say("scenario provisioner-outage: the provisioner stops for 5 minutes, then node-a is cut off");
    on_a_lab(paths, fleet, 2, n, provisioner_outage_on).await
}

/// How long the provisioner stays down in `provisioner-outage`.
const OUTAGE: Duration = Duration::from_secs(300);

async fn provisioner_outage_on(lab: &mut Lab, n: &Narrator) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut sampler = Sampler { samples: Vec::new() };
    summary.phases.extend(lab.install(n).await?);
    summary.nodes = lab.node_rows()?;
    let ids = place_on_node_a(lab, n, &mut sampler, &mut summary).await?;
    // Both guards fetch their peer list on their first heartbeat and every minute after: wait
    // one round, so each knows the other.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(70) {
        let s = lab.sample().await?;
        summary.double_runs += sampler.check(s, n);
        summary.samples += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    n.say("both guards know their peer (the provisioner hands out the cell; each caches it on disk)");
    let starts_before = start_counts(lab, &ids).await?;
    let (a, b): (HostName, HostName) = ("node-a".parse()?, "node-b".parse()?);
    let before = lab.store.events(&EventFilter { limit: Some(1), ..Default::default() }).await?;
    let last_event = before.first().map_or(0, |e| e.id);
    lab.stop_serve();
    let stopped = Instant::now();
    n.say(&format!(
        "the provisioner stops for {} (an upgrade gone long): no guard reaches the controller",
        fmt(OUTAGE)
    ));
    while stopped.elapsed() < OUTAGE {
        let s = lab.sample().await?;
        summary.double_runs += sampler.check(s, n);
        summary.samples += 1;
        anyhow::ensure!(lab.powered(lab.node("node-a")) && lab.powered(lab.node("node-b")), "a node lost power");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let serve_back = Timestamp::now();
    lab.start_serve()?;
    n.say("the provisioner is back");
    let want = ids[..2].to_vec();
    let (_, took) = sample_while(
        lab,
        &mut sampler,
        &mut summary,
        n,
        "node-a's guard reporting again, its HA instances running",
        Duration::from_secs(300),
        async |lab| {
            let r = lab.report(&a).await?;
            Ok(r.filter(|r| r.0 > serve_back && want.iter().all(|id| r.1.contains(id))).map(|_| ()))
        },
    )
    .await?;
    summary.phases.push((format!("provisioner down {} → guards reporting again", fmt(OUTAGE)), took));
    // One more minute: the controller (leading anew) suspects nobody, fences nothing.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(60) {
        let s = lab.sample().await?;
        summary.double_runs += sampler.check(s, n);
        summary.samples += 1;
        for h in [&a, &b] {
            anyhow::ensure!(
                lab.state(h).await? == HostState::Active,
                "{h} is {} after the outage",
                lab.state(h).await?
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let starts_after = start_counts(lab, &ids).await?;
    anyhow::ensure!(
        starts_before == starts_after,
        "an instance was stopped and started again during the outage: {starts_before:?} then {starts_after:?}"
    );
    let since =
        lab.store.events(&EventFilter { after: Some(last_event), limit: Some(1000), ..Default::default() }).await?;
    let bad: Vec<String> = since
        .iter()
        .filter(|e| e.kind.starts_with("fence.") || e.kind == "host.self_fence_lifted" || e.kind == "host.state")
        .map(|e| format!("{} {}", e.kind, e.message))
        .collect();
    anyhow::ensure!(bad.is_empty(), "after the outage: {bad:?}");
    n.say(&format!(
        "after {} without the provisioner: no HA instance was stopped, nothing suspected or fenced",
        fmt(OUTAGE)
    ));
    cut_and_recover(lab, n, &ids, &mut sampler, &mut summary).await?;
    Ok(summary)
}

/// How many times each instance was started, by the events.
async fn start_counts(lab: &Lab, ids: &[InstanceId]) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for id in ids {
        out.push(events(lab, *id).await?.iter().filter(|(_, kind)| kind == "instance.started").count());
    }
    Ok(out)
}

/// node-a's NIC goes down: it self-fences, the controller fences it through its BMC, its HA
/// instances run on node-b; it is powered on again and quarantines the stale definitions.
async fn cut_and_recover(
    lab: &mut Lab,
    n: &Narrator,
    ids: &[InstanceId],
    sampler: &mut Sampler,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let (ha, plain) = (&ids[..2], ids[2]);
    let (a, b): (HostName, HostName) = ("node-a".parse()?, "node-b".parse()?);

    let node_a = lab.node("node-a").clone();
    lab.cut_network(&node_a)?;
    let cut = Timestamp::now();
    n.say("node-a loses its network (its NIC's link is down); its BMC stays reachable");
    let (_, took) =
        sample_while(lab, sampler, summary, n, "node-a turning suspect", Duration::from_secs(180), async |lab| {
            Ok(matches!(lab.state(&a).await?, HostState::Suspect | HostState::Fenced).then_some(()))
        })
        .await?;
    n.say(&format!("the controller: node-a silent past its grace (30 s) → suspect ({} after the cut)", fmt(took)));
    summary.phases.push(("network cut → suspect".into(), took));
    let (_, took) = sample_while(lab, sampler, summary, n, "node-a fenced", Duration::from_secs(180), async |lab| {
        Ok((lab.state(&a).await? == HostState::Fenced || !lab.powered(&node_a)).then_some(()))
    })
    .await?;
    n.say(&format!("node-a fenced: powered off through its BMC, confirmed by its power state (+{})", fmt(took)));
    summary.phases.push(("suspect → fenced (BMC power off)".into(), took));
    let want: Vec<InstanceId> = ha.to_vec();
    let (_, took) = sample_while(
        lab,
        sampler,
        summary,
        n,
        "web-1 and db-1 running on node-b",
        Duration::from_secs(600),
        async |lab| {
            let running = lab.report(&b).await?.map(|r| r.1).unwrap_or_default();
            Ok(want.iter().all(|id| running.contains(id)).then_some(()))
        },
    )
    .await?;
    let recovered = Timestamp::now();
    n.say(&format!(
        "web-1 and db-1 (HA) run on node-b: moved with generation 2, defined and started by node-b's guard (+{}; {} after the cut)",
        fmt(took),
        fmt(Duration::from_millis(u64::try_from(recovered.0 - cut.0).unwrap_or(0)))
    ));
    summary.phases.push(("fenced → HA instances running on node-b".into(), took));
    summary
        .phases
        .push(("network cut → recovered (total)".into(), Duration::from_millis(u64::try_from(recovered.0 - cut.0)?)));

    // node-a is powered on again by the fence's restore step; at boot its guard quarantines.
    let (_, took) =
        sample_while(lab, sampler, summary, n, "node-a powered on again", Duration::from_secs(300), async |lab| {
            Ok(lab.powered(&node_a).then_some(()))
        })
        .await?;
    n.say(&format!("the fence's last step: node-a powered on again through its BMC (+{})", fmt(took)));
    summary.phases.push(("recovered → node-a powered on again (the fence's last step)".into(), took));
    let want: Vec<InstanceId> = ha.to_vec();
    let (_, took) = sample_while(
        lab,
        sampler,
        summary,
        n,
        "node-a back, its stale definitions quarantined",
        Duration::from_secs(600),
        async |lab| {
            let mut all = true;
            for id in &want {
                all &= events(lab, *id)
                    .await?
                    .iter()
                    .any(|(actor, kind)| actor == "guard:node-a" && kind == "instance.quarantined");
            }
            Ok(all.then_some(()))
        },
    )
    .await
    .with_context(|| lab.console_tail(&node_a))?;
    n.say(&format!(
        "node-a booted; before libvirtd started, its guard quarantined the stale web-1 and db-1 (+{})",
        fmt(took)
    ));
    summary.phases.push(("power-on → stale definitions quarantined".into(), took));
    let (_, took) =
        sample_while(lab, sampler, summary, n, "node-a active again", Duration::from_secs(300), async |lab| {
            Ok((lab.state(&a).await? == HostState::Active).then_some(()))
        })
        .await?;
    summary.phases.push(("node-a active again".into(), took));
    n.say("node-a is active again; batch-1 (not HA) stayed node-a's: defined there, stopped (the guard restarts HA instances only)");
    for _ in 0..10 {
        let s = lab.sample().await?;
        summary.double_runs += sampler.check(s, n);
        summary.samples += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The invariants.
    for id in ha {
        let i = lab.store.instance(*id).await?.context("instance")?;
        anyhow::ensure!(i.owner == b && i.generation == Generation(2) && !i.deleted, "{i:?}");
    }
    let p = lab.store.instance(plain).await?.context("instance")?;
    anyhow::ensure!(p.owner == a && p.generation == Generation(1) && !p.deleted, "{p:?}");
    let all = lab.store.instances(None).await?;
    anyhow::ensure!(all.len() == 3 && all.iter().all(|i| !i.deleted), "nothing deleted: {all:?}");
    anyhow::ensure!(summary.double_runs == 0, "{} samples with a double run", summary.double_runs);
    let last: BTreeMap<InstanceId, Vec<HostName>> =
        sampler.samples.last().map(|s| s.running.clone()).unwrap_or_default();
    let now: Vec<String> = ids
        .iter()
        .zip(["web-1", "db-1", "batch-1"])
        .map(|(id, name)| {
            let on: Vec<&str> = last.get(id).map(|v| v.iter().map(|h| h.as_str()).collect()).unwrap_or_default();
            format!(
                "{name}: {}",
                if on.is_empty() { "stopped".to_owned() } else { format!("running on {}", on.join("+")) }
            )
        })
        .collect();
    n.say(&format!(
        "checked: each instance has one owner, none was deleted, none ran on two nodes in {} samples; now {}",
        summary.samples,
        now.join(", ")
    ));
    Ok(())
}

/// `db-down-at-boot`: node-a reboots while the database (here: the provisioner, through which
/// the guards reach it) is unreachable; its HA domains do not start; when it returns, what it
/// confirms as node-a's starts again.
pub async fn db_down_at_boot(paths: Paths, fleet: &[Hardware], n: &Narrator) -> anyhow::Result<Summary> {
    n.say("scenario db-down-at-boot: node-a reboots while the database cannot be reached");
    on_a_lab(paths, fleet, 1, n, db_down_on).await
}

async fn db_down_on(lab: &mut Lab, n: &Narrator) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut sampler = Sampler { samples: Vec::new() };
    summary.phases.extend(lab.install(n).await?);
    summary.nodes = lab.node_rows()?;
    let ids = place_on_node_a(lab, n, &mut sampler, &mut summary).await?;
    let a: HostName = "node-a".parse()?;
    let node_a = lab.node("node-a").clone();

    lab.stop_serve();
    n.say("the provisioner stops (the embedded database lives there; DHCP goes with it): node-a's guard cannot reach the database");
    crate::lab::virsh(&["reset", &node_a.domain])?;
    let reset = Instant::now();
    n.say("node-a is reset (a crash and reboot)");
    // It boots; the guard's boot pass cannot ask the database (db_wait 30 s); its watch
    // starts nothing. Wait for the guard's boot pass on the console, then 60 s more.
    let console_len = std::fs::metadata(&node_a.serial).map(|m| m.len()).unwrap_or(0);
    n.wait("node-a booting without the database", Duration::from_secs(600), async || {
        let text = std::fs::read(&node_a.serial).unwrap_or_default();
        let new = String::from_utf8_lossy(text.get(usize::try_from(console_len)?..).unwrap_or_default()).into_owned();
        Ok((new.contains("login:") || new.contains("Reached target") && new.contains("Multi-User")).then_some(()))
    })
    .await
    .with_context(|| lab.console_tail(&node_a))?;
    tokio::time::sleep(Duration::from_secs(60)).await;
    summary.phases.push(("reset → booted without the database (+60 s)".into(), reset.elapsed()));
    let serve_back = Timestamp::now();
    lab.start_serve()?;
    n.say("the provisioner is back (node-a's DHCP client is in its retry backoff: it finds it again within minutes)");
    let ha = ids[..2].to_vec();
    let want = ha.clone();
    let (_, took) = n
        .wait("node-a's guard starting its HA instances again", Duration::from_secs(600), async || {
            let r = lab.report(&a).await?;
            Ok(r.filter(|r| r.0 > serve_back && want.iter().all(|id| r.1.contains(id))).map(|_| ()))
        })
        .await?;
    summary.phases.push(("database back → node-a's HA instances running".into(), took));
    // Nothing of node-a's was started while the database was away: every start event is
    // from before the reset or after the database came back.
    for id in &ha {
        let filter = EventFilter { instance: Some(*id), limit: Some(1000), ..Default::default() };
        let starts: Vec<Timestamp> = lab
            .store
            .events(&filter)
            .await?
            .into_iter()
            .filter(|e| e.kind == "instance.started")
            .map(|e| e.at)
            .collect();
        anyhow::ensure!(starts.len() == 2, "{id}: started {} times, want twice: {starts:?}", starts.len());
    }
    n.say("node-a's HA instances did not start while the database was away, and started once it confirmed them");
    Ok(summary)
}

/// `power-loss`: the HA instances' node loses power (`virsh destroy`: its BMC then says Off),
/// three times, back and forth between node-a and node-b. With the shipped defaults the
/// controller asks the BMC after two missed heartbeats (`probe_after` 10 s), fences at once
/// on its `Off`, and the other node's guard starts the instances at its next converge.
pub async fn power_loss(paths: Paths, fleet: &[Hardware], n: &Narrator) -> anyhow::Result<Summary> {
    n.say("scenario power-loss: HA instances on node-a; their node loses power, three times, back and forth");
    on_a_lab(paths, fleet, 2, n, power_loss_on).await
}

async fn power_loss_on(lab: &mut Lab, n: &Narrator) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut sampler = Sampler { samples: Vec::new() };
    summary.phases.extend(lab.install(n).await?);
    summary.nodes = lab.node_rows()?;
    let ids = place_on_node_a(lab, n, &mut sampler, &mut summary).await?;
    let ha = ids[..2].to_vec();
    let (mut from, mut to): (HostName, HostName) = ("node-a".parse()?, "node-b".parse()?);
    for run in 1..=3 {
        // Both nodes active and heartbeating, the HA instances running on `from`.
        let want = ha.clone();
        let (_, _) = sample_while(
            lab,
            &mut sampler,
            &mut summary,
            n,
            &format!("web-1 and db-1 running on {from}, {to} active"),
            Duration::from_secs(600),
            async |lab| {
                let running = lab.report(&from).await?.map(|r| r.1).unwrap_or_default();
                let ready = want.iter().all(|id| running.contains(id))
                    && lab.state(&from).await? == HostState::Active
                    && lab.state(&to).await? == HostState::Active;
                Ok(ready.then_some(()))
            },
        )
        .await?;
        let node = lab.node(from.as_str()).clone();
        crate::lab::virsh(&["destroy", &node.domain])?;
        let lost = Timestamp::now();
        n.say(&format!("run {run}: {from} loses power (virsh destroy); its BMC now says Off"));
        let (_, took) = sample_while(
            lab,
            &mut sampler,
            &mut summary,
            n,
            &format!("{from} fenced"),
            Duration::from_secs(120),
            async |lab| Ok((lab.state(&from).await? == HostState::Fenced).then_some(())),
        )
        .await?;
        n.say(&format!("run {run}: {from} fenced without waiting the grace (+{})", fmt(took)));
        let want = ha.clone();
        let (_, _) = sample_while(
            lab,
            &mut sampler,
            &mut summary,
            n,
            &format!("web-1 and db-1 running on {to}"),
            Duration::from_secs(300),
            async |lab| {
                let running = lab.report(&to).await?.map(|r| r.1).unwrap_or_default();
                Ok(want.iter().all(|id| running.contains(id)).then_some(()))
            },
        )
        .await?;
        let recovered = Duration::from_millis(u64::try_from(Timestamp::now().0 - lost.0)?);
        n.say(&format!("run {run}: web-1 and db-1 run on {to}, {} after the power loss", fmt(recovered)));
        summary.phases.push((format!("run {run}: power loss of {from} → HA instances running on {to}"), recovered));
        std::mem::swap(&mut from, &mut to);
    }
    anyhow::ensure!(summary.double_runs == 0, "{} samples with a double run", summary.double_runs);
    for id in &ha {
        let i = lab.store.instance(*id).await?.context("instance")?;
        anyhow::ensure!(i.generation == Generation(4) && !i.deleted, "three moves, one owner: {i:?}");
    }
    n.say(&format!("checked: three moves each, none ran on two nodes in {} samples", summary.samples));
    Ok(summary)
}

/// `drain`: planned work on node-a. `host drain node-a`: its guard shuts web-1 and db-1 down
/// (ACPI; these tiny guests have no OS to answer it, so they are destroyed after the guard's
/// `shutdown_timeout`), each moves to node-b only once node-a's guard reports it stopped, and
/// node-a ends in maintenance with batch-1 (not HA). Then node-a loses power: in maintenance,
/// nothing of it is fenced or moved.
pub async fn drain(paths: Paths, fleet: &[Hardware], n: &Narrator) -> anyhow::Result<Summary> {
    n.say("scenario drain: HA instances on node-a; node-a is drained for planned work, then loses power");
    on_a_lab(paths, fleet, 2, n, drain_on).await
}

async fn drain_on(lab: &mut Lab, n: &Narrator) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut sampler = Sampler { samples: Vec::new() };
    summary.phases.extend(lab.install(n).await?);
    summary.nodes = lab.node_rows()?;
    let ids = place_on_node_a(lab, n, &mut sampler, &mut summary).await?;
    let (a, b): (HostName, HostName) = ("node-a".parse()?, "node-b".parse()?);
    let said = lab.nk(&["host", "drain", "node-a"])?;
    n.say(&format!("nodekeeper-provisioner host drain node-a: {}", said.trim()));
    let ha = ids[..2].to_vec();
    let (_, took) = sample_while(
        lab,
        &mut sampler,
        &mut summary,
        n,
        "web-1 and db-1 running on node-b, node-a in maintenance",
        Duration::from_secs(600),
        async |lab| {
            let running = lab.report(&b).await?.map(|r| r.1).unwrap_or_default();
            let done = ha.iter().all(|id| running.contains(id)) && lab.state(&a).await? == HostState::Maintenance;
            Ok(done.then_some(()))
        },
    )
    .await?;
    n.say(&format!(
        "drained: web-1 and db-1 stopped on node-a, then started on node-b; node-a in maintenance ({})",
        fmt(took)
    ));
    summary.phases.push(("host drain node-a → HA instances running on node-b, node-a in maintenance".into(), took));
    for id in &ha {
        let kinds: Vec<String> = events(lab, *id).await?.into_iter().map(|(_, k)| k).collect();
        let at = |k: &str| kinds.iter().position(|x| x == k);
        anyhow::ensure!(
            matches!((at("instance.held"), at("instance.moved")), (Some(h), Some(m)) if h < m),
            "held before moved: {kinds:?}"
        );
        let i = lab.store.instance(*id).await?.context("instance")?;
        anyhow::ensure!(i.owner == b && i.generation == Generation(2) && !i.held, "moved once, to node-b: {i:?}");
    }
    let batch = lab.store.instance(ids[2]).await?.context("batch-1")?;
    anyhow::ensure!(batch.owner == a, "batch-1 (not HA) stays with node-a: {batch:?}");

    // In maintenance, node-a loses power: its silence means nothing; nothing is fenced.
    let node = lab.node(a.as_str()).clone();
    crate::lab::virsh(&["destroy", &node.domain])?;
    n.say("node-a, in maintenance, loses power (virsh destroy)");
    let quiet = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let _ = sample_while(
        lab,
        &mut sampler,
        &mut summary,
        n,
        "a minute past the grace",
        quiet + Duration::from_secs(30),
        async |lab| {
            anyhow::ensure!(lab.state(&a).await? == HostState::Maintenance, "node-a left maintenance");
            Ok((started.elapsed() >= quiet).then_some(()))
        },
    )
    .await?;
    let last = lab.store.latest_operation(&a).await?.context("the drain")?;
    anyhow::ensure!(last.kind == "drain", "no fence of a host in maintenance: {last:?}");
    anyhow::ensure!(summary.double_runs == 0, "{} samples with a double run", summary.double_runs);
    n.say(&format!("checked: no fence, nothing moved; none ran on two nodes in {} samples", summary.samples));
    Ok(summary)
}
