//! `nodekeeper-guard watch`: the guard as a service ("Recovery" in DESIGN.md).
//!
//! One loop, so that its health is one thing systemd can watch (`Type=notify`,
//! `WatchdogSec=`: `WATCHDOG=1` is sent only from the loop, after a heartbeat attempt that
//! returned in time):
//! - **heartbeat** into the database every `heartbeat_interval`;
//! - **peers**: the cell's other hosts and the keys shared with them are fetched from the
//!   provisioner and cached on disk; the guard answers their checks on `peer_listen`
//!   ([`crate::peers`]);
//! - **isolation** ([`isolation`]): when a heartbeat fails, the guard asks its peers, and asks
//!   them to relay its heartbeat (a bad cable of its own is not a dead host). Without the
//!   database for `isolation_timeout`, it applies the quorum rule: when a peer relays, or
//!   when it and the peers that answer are a majority of the cell and none of them reaches
//!   the controller (the controller is down, not this host), it holds its instances;
//!   otherwise — in a minority, cut off from the controller and most of the cell — it stops
//!   (destroys, keeps defined) its running HA domains before the controller's `grace` can
//!   expire, and starts them again only when the database, reachable again, confirms they are
//!   still this host's;
//! - **converge** every `converge_interval`, while the database answers: remove what the
//!   database moved away (the post-libvirt pass: saved to `quarantine/`, then destroyed and
//!   undefined), then define from the stored XML, and start, every instance the database
//!   assigns here that is missing; start HA instances that are stopped. A definition whose
//!   generation is behind the database's is replaced before it starts;
//! - **libvirtd liveness**, by a real libvirt call with `libvirt_timeout`: an error → restart
//!   it; no answer (stuck) → kill, then restart; more than `max_restarts` in `restart_window`
//!   → reboot the host, once.
//!
//! Its parts: [`converge`] (the pure `plan` and the libvirt work that carries it out),
//! [`isolation`] (the pure quorum rule), [`services`] (checks, commands and the pure restart
//! budget), [`notify`] (systemd and the hardware watchdog); this module is the loop that
//! wires them.

pub mod contact;
pub mod converge;
pub mod copies;
/// The quorum rule (a pure module of the crate's own: the peer protocol feeds it too).
pub use crate::isolation;
pub mod notify;
pub mod services;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodekeeper_store::guard_api::PeerList;
use nodekeeper_store::{FencingProfile, Generation, HostName, InstanceId, NewEvent, ReportedDomain};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Revision};
use crate::config::Config;
use converge::{define_and_start, list, recreate_local_disks, stop_ha_domains};
pub use notify::{notify, HardwareWatchdog};
use services::{check_service, run_command, Remedy, RestartBudget};

/// What the loop did; returned when it stops (tests) and logged as it goes.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    /// Heartbeats written.
    pub heartbeats: u64,
    /// Heartbeats that failed.
    pub heartbeat_failures: u64,
    /// Converge passes that ran.
    pub converges: u64,
    /// Domains defined from the database.
    pub defined: u64,
    /// Domains started.
    pub started: u64,
    /// Self-fences.
    pub self_fences: u64,
    /// Restarts of libvirtd and of the configured services.
    pub restarts: u64,
    /// Converge passes that had nothing to ask the database (the host's revision and its
    /// libvirt unchanged since the last complete pass): libvirt listed, service copies
    /// checked, no request.
    pub unchanged: u64,
}

/// The self-fence's record (`state_dir/self-fenced.json`): survives a restart of the guard,
/// so a guard that comes back still refuses to start what it stopped until the database
/// confirms it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SelfFence {
    /// When (ms since the epoch).
    pub at: i64,
    /// The domains it stopped.
    pub stopped: Vec<InstanceId>,
}

/// What the two loops share (never locked across an await).
struct Shared {
    /// The cached peer list.
    peers: crate::peers::PeerCache,
    /// When the peer list was last fetched.
    peers_fetched: std::sync::Mutex<Option<Instant>>,
    /// The last reason to hold logged (logged again only when it changes).
    held: std::sync::Mutex<Option<String>>,
    last_db_ok: std::sync::Mutex<Instant>,
    fenced: std::sync::Mutex<Option<SelfFence>>,
    counters: std::sync::Mutex<Counters>,
    /// When each loop last finished a round: (heartbeat, converge).
    rounds: std::sync::Mutex<(Instant, Instant)>,
    /// The reboot command ran (once per guard process).
    rebooted: std::sync::atomic::AtomicBool,
    /// A self-fence was due and could not stop the HA domains (libvirt erred or did not
    /// answer): why. While set, the hardware watchdog is not fed, so the machine resets —
    /// the one way left to stop those domains before the controller moves them.
    unfenced: std::sync::Mutex<Option<String>>,
    /// The armed hardware watchdog's timeout (`None`: none armed, or unknown).
    watchdog: std::sync::Mutex<Option<Duration>>,
    /// The fencing profile the database last acknowledged.
    profile_sent: std::sync::Mutex<Option<FencingProfile>>,
    /// What the last heartbeat answered of the host's revision (`None` after a failed one).
    revision: std::sync::Mutex<Option<Revision>>,
    /// `state_dir/last-contact` ([`contact`]).
    contact_file: PathBuf,
}

impl Shared {
    fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut Self::lock(&self.counters));
    }
    fn since_db_ok(&self) -> Duration {
        Self::lock(&self.last_db_ok).elapsed()
    }
    fn is_fenced(&self) -> bool {
        Self::lock(&self.fenced).is_some()
    }
}

/// Whether the hardware watchdog is fed this round: only while the loops are healthy and no
/// self-fence is owed (a due self-fence that could not stop the HA domains — `unfenced` — must
/// end in a reset, as SBD's does, or a host cut off with a hung libvirtd would keep running
/// domains the controller is about to start elsewhere). Pure.
pub fn feeds_hardware(loops_healthy: bool, unfenced: Option<&str>) -> bool {
    loops_healthy && unfenced.is_none()
}

/// What this guard tells the controller about how it fences itself, with `list` as its peer
/// list and `watchdog` as its armed watchdog's timeout. Its quorum is exact — a majority of a
/// known set — only when the list is whole (every counted host of the cell is in it: not a
/// large cell's cut) and every peer of it is asked at once (`peer_sample`). Pure.
pub fn fencing_profile(config: &Config, list: &PeerList, watchdog: Option<Duration>) -> FencingProfile {
    let w = &config.watch;
    let counted: Vec<_> = list.peers.iter().filter(|p| p.counted).map(|p| p.host.clone()).collect();
    let exact = counted.len() + 1 == list.cell_size && w.peer_sample >= list.peers.len();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    FencingProfile {
        self_fence: w.self_fence,
        boot_blocks_ha: config.boot.on_db_unreachable != crate::config::OnDbUnreachable::Allow,
        heartbeat_interval_ms: ms(w.heartbeat_interval),
        isolation_timeout_ms: ms(w.isolation_timeout),
        libvirt_timeout_ms: ms(w.libvirt_timeout),
        watchdog_timeout_ms: watchdog.map(ms),
        quorum_cell: exact.then_some(counted),
        migration_uri: config.libvirt.migration_uri.clone(),
    }
}

/// How to get the armed watchdog from its timeout `now` to `want`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutChange {
    /// It is there already.
    Keep,
    /// Shorter (or unknown: nothing about it was reported): set it at once — the controller
    /// waits out what it was told, which is never less than the truth.
    SetNow,
    /// Longer: announce it first, set it only once the database has acknowledged a profile
    /// with it — until then the controller could wait out the shorter one.
    AfterAnnouncing,
}

/// The rule that keeps the real watchdog timeout no longer than what the database knows. Pure.
pub fn timeout_change(now: Option<Duration>, want: Duration) -> TimeoutChange {
    match now {
        Some(now) if want > now => TimeoutChange::AfterAnnouncing,
        Some(now) if want == now => TimeoutChange::Keep,
        _ => TimeoutChange::SetNow,
    }
}

/// One of the two loops (heartbeat, converge): its own database pool and libvirt state.
struct Watch {
    config: Config,
    store: Option<Backend>,
    shared: std::sync::Arc<Shared>,
    fence_file: PathBuf,
    /// Recent restarts, per service (`libvirtd` and the configured ones).
    budget: RestartBudget,
    /// Started by the current converge pass (for its report).
    started_now: Vec<(InstanceId, Generation)>,
    /// Held instances asked to shut down, and since when (destroyed past `shutdown_timeout`).
    stopping: HashMap<InstanceId, Instant>,
    /// For peer checks.
    peer_client: Option<reqwest::Client>,
    /// The basis of the last complete converge pass, when it began, and the share of the full
    /// pass interval after which the next is due ([`converge::spread`]).
    converged: Option<(converge::Basis, Instant, u64)>,
    /// The service copies the last complete pass fetched.
    copies: Vec<nodekeeper_store::guard_api::AssignedService>,
    /// Live migrations this guard runs (libvirt's calls block until done): instance → its
    /// target and the call.
    migrations: HashMap<InstanceId, (HostName, tokio::task::JoinHandle<anyhow::Result<bool>>)>,
    /// Live migrations that failed, while the database still asks for them (reported, not
    /// tried again: the controller gives them up and the drain moves the instance cold).
    migration_failed: HashMap<InstanceId, (HostName, String)>,
    /// The last complete pass saw a live migration to or from this host under way.
    migration_involved: bool,
}

/// Runs until `stop` resolves; returns what it did. The heartbeat and converge loops run
/// side by side, so a slow libvirt never delays a heartbeat; the watchdog is fed only while
/// both keep finishing rounds.
pub async fn run(config: Config, stop: impl std::future::Future<Output = ()>) -> Counters {
    virt::error::clear_error_callback();
    // libvirt's test driver (`test:///default`, the tests' libvirt) frees its domains when its
    // last connection closes, and every libvirt call here opens and closes its own: one held
    // for the guard's life keeps them (with a real libvirtd the domains live there).
    let _test_driver = config
        .libvirt
        .uri
        .starts_with("test:")
        .then(|| virt::connect::Connect::open(Some(&config.libvirt.uri)).ok())
        .flatten();
    if let Err(e) = std::fs::create_dir_all(&config.boot.state_dir) {
        tracing::error!("creating {}: {e}", config.boot.state_dir.display());
    }
    let fence_file = config.boot.state_dir.join("self-fenced.json");
    let fenced: Option<SelfFence> = std::fs::read(&fence_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
    // The isolation clock goes on from the last contact of this boot, not from this start.
    let contact_file = config.boot.state_dir.join("last-contact");
    let last_db_ok = match contact::since_last(&contact_file) {
        Some(ago) => {
            tracing::info!(
                "last reached the database {} ago (this boot)",
                humantime::format_duration(Duration::from_secs(ago.as_secs()))
            );
            Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
        }
        None => Instant::now(),
    };
    // Armed before the loops start, so the first fencing profile says so. The real timeout
    // must never exceed what the database was told (the controller waits it out): a shorter
    // one is set at once, a longer one only once a profile announcing it is acknowledged.
    let want = config.watch.watchdog_timeout;
    let mut hardware = config.watch.hardware_watchdog.as_deref().and_then(|path| HardwareWatchdog::arm(path, want));
    let mut longer = None;
    if let (Some(dog), Some(want)) = (&mut hardware, want) {
        match timeout_change(dog.timeout(), want) {
            TimeoutChange::Keep => {}
            TimeoutChange::SetNow => dog.set_timeout(want),
            TimeoutChange::AfterAnnouncing => longer = Some(want),
        }
    }
    let announced = longer.or(hardware.as_ref().and_then(HardwareWatchdog::timeout));
    if !config.watch.peers.is_empty() {
        tracing::warn!("watch.peers is no longer used: the peers are the cell's other hosts, from the provisioner");
    }
    let shared = std::sync::Arc::new(Shared {
        peers: crate::peers::PeerCache::load(&config.boot.state_dir),
        peers_fetched: std::sync::Mutex::new(None),
        held: std::sync::Mutex::new(None),
        last_db_ok: std::sync::Mutex::new(last_db_ok),
        fenced: std::sync::Mutex::new(fenced),
        counters: std::sync::Mutex::new(Counters::default()),
        rounds: std::sync::Mutex::new((Instant::now(), Instant::now())),
        rebooted: std::sync::atomic::AtomicBool::new(false),
        unfenced: std::sync::Mutex::new(None),
        watchdog: std::sync::Mutex::new(announced),
        profile_sent: std::sync::Mutex::new(None),
        revision: std::sync::Mutex::new(None),
        contact_file,
    });
    let worker = || Watch {
        config: config.clone(),
        store: None,
        shared: shared.clone(),
        fence_file: fence_file.clone(),
        budget: RestartBudget::new(config.watch.max_restarts, config.watch.restart_window),
        started_now: Vec::new(),
        stopping: HashMap::new(),
        peer_client: None,
        converged: None,
        copies: Vec::new(),
        migrations: HashMap::new(),
        migration_failed: HashMap::new(),
        migration_involved: false,
    };
    let w = config.watch.clone();
    let peer_server = match w.peer_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(listen = %addr, "answering peer checks");
                let responder = std::sync::Arc::new(responder(&config, shared.clone()));
                Some(tokio::spawn(crate::peers::serve(listener, responder, std::future::pending())))
            }
            Err(e) => {
                tracing::error!("peer checks: binding {addr}: {e}: peers will count this host as unreachable");
                None
            }
        },
        None => None,
    };
    let mut hb = worker();
    let heartbeats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(hb.config.watch.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            hb.heartbeat().await;
            Shared::lock(&hb.shared.rounds).0 = Instant::now();
        }
    });
    let mut sv = worker();
    let services = tokio::spawn(async move {
        if sv.config.watch.services.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(sv.config.watch.converge_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rejuvenated: HashMap<String, Instant> = HashMap::new();
        loop {
            tick.tick().await;
            for svc in sv.config.watch.services.clone() {
                match check_service(&svc).await {
                    Ok(()) => {
                        let last = *rejuvenated.entry(svc.name.clone()).or_insert_with(Instant::now);
                        if svc.rejuvenate_every.is_some_and(|every| last.elapsed() >= every) {
                            tracing::info!("rejuvenating {}: a graceful restart", svc.name);
                            run_command(&svc.restart).await;
                            rejuvenated.insert(svc.name.clone(), Instant::now());
                        }
                    }
                    Err(services::Failure::Down(why)) => {
                        sv.failed(&svc.name, &svc.restart, &svc.kill, false, &why).await
                    }
                    Err(services::Failure::Stuck(why)) => {
                        sv.failed(&svc.name, &svc.restart, &svc.kill, true, &why).await
                    }
                }
            }
        }
    });
    let mut cv = worker();
    let converges = tokio::spawn(async move {
        let mut tick = tokio::time::interval(cv.config.watch.converge_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            cv.converge().await;
            Shared::lock(&cv.shared.rounds).1 = Instant::now();
        }
    });
    // A loop that has not finished a round in this long is stuck: stop feeding the watchdog.
    let (hb_limit, cv_limit) =
        (w.heartbeat_interval * 4, w.converge_interval + w.libvirt_timeout * 3 + w.converge_interval);
    let mut feed = tokio::time::interval(w.heartbeat_interval);
    tokio::pin!(stop);
    let (mut ready, mut starving) = (false, false);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = feed.tick() => {
                let (h, c) = *Shared::lock(&shared.rounds);
                if h.elapsed() < hb_limit && c.elapsed() < cv_limit {
                    if !ready {
                        notify("READY=1");
                        ready = true;
                    }
                    notify("WATCHDOG=1");
                    let unfenced = Shared::lock(&shared.unfenced).clone();
                    if let Some(dog) = &mut hardware {
                        let told = Shared::lock(&shared.profile_sent).as_ref().and_then(|p| p.watchdog_timeout_ms);
                        if let Some(want) = longer.filter(|w| told.is_some_and(|t| u128::from(t) >= w.as_millis())) {
                            dog.set_timeout(want);
                            *Shared::lock(&shared.watchdog) = dog.timeout();
                            longer = None;
                        }
                        if feeds_hardware(true, unfenced.as_deref()) {
                            dog.ping();
                        } else if !starving {
                            tracing::error!(
                                "self-fence failed ({}): no longer feeding the hardware watchdog; the host resets",
                                unfenced.as_deref().unwrap_or_default()
                            );
                        }
                    }
                    starving = unfenced.is_some();
                } else {
                    tracing::error!("a loop is stuck (heartbeat {:?} ago, converge {:?} ago): not feeding the watchdog", h.elapsed(), c.elapsed());
                }
            }
        }
    }
    notify("STOPPING=1");
    for task in [heartbeats, converges, services] {
        task.abort();
        let _ = task.await;
    }
    if let Some(dog) = hardware {
        // The controller may count on this watchdog to fence the host (watchdog fencing):
        // it is disarmed only once the database knows; otherwise it stays armed, and the host
        // resets unless a guard starts again and feeds it in time.
        *Shared::lock(&shared.watchdog) = None;
        let mut last = worker();
        match last.send_profile(true).await {
            Ok(()) => dog.disarm(),
            Err(e) => tracing::error!(
                "stopping: the database cannot be told that the hardware watchdog is disarmed ({e:#}): it stays \
                 armed, and the host resets within {} unless the guard starts again",
                dog.timeout().map_or("its timeout".into(), |t| humantime::format_duration(t).to_string())
            ),
        }
        if let Some(s) = last.store.take() {
            s.close().await;
        }
    }
    if let Some(task) = peer_server {
        task.abort();
        let _ = task.await;
    }
    let counters = Shared::lock(&shared.counters).clone();
    counters
}

/// The answering side of the peer checks: this host reaches the controller when its own
/// last heartbeat went through within three intervals; a relay goes through a connection of
/// its own.
fn responder(config: &Config, shared: std::sync::Arc<Shared>) -> crate::peers::Responder {
    let fresh = config.watch.heartbeat_interval * 3;
    let ok_shared = shared.clone();
    let controller_ok = Box::new(move || ok_shared.since_db_ok() < fresh);
    let backend: std::sync::Arc<tokio::sync::Mutex<Option<Backend>>> = std::sync::Arc::default();
    let (relay_config, me) = (config.clone(), config.host.clone());
    let relay = Box::new(move |peer: nodekeeper_store::HostName| {
        let (backend, config, me) = (backend.clone(), relay_config.clone(), me.clone());
        let fut: futures_util::future::BoxFuture<'static, anyhow::Result<()>> = Box::pin(async move {
            let mut slot = backend.lock().await;
            if slot.is_none() {
                *slot = Some(Backend::connect(&config, crate::peers::ASK_TIMEOUT).await?);
            }
            let b = slot.as_ref().ok_or_else(|| anyhow::anyhow!("no connection"))?;
            let r = b.relay(&me, &peer).await;
            if r.is_err() {
                if let Some(b) = slot.take() {
                    b.close().await;
                }
            }
            r
        });
        fut
    });
    crate::peers::Responder::new(config.host.clone(), shared.peers.clone(), controller_ok, relay)
}

impl Watch {
    fn actor(&self) -> String {
        format!("guard:{}", self.config.host)
    }

    /// The database (or the provisioner's guard API), connected now if need be, within
    /// `budget`.
    async fn store(&mut self, budget: Duration) -> anyhow::Result<Backend> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = Backend::connect(&self.config, budget).await?;
        self.store = Some(s.clone());
        Ok(s)
    }

    async fn heartbeat(&mut self) {
        let budget = self.config.watch.heartbeat_interval;
        let host = self.config.host.clone();
        let result = tokio::time::timeout(budget, async {
            let store = self.store(budget).await?;
            store.heartbeat(&host).await
        })
        .await;
        match result {
            Ok(Ok(revision)) => {
                *Shared::lock(&self.shared.revision) = revision;
                self.shared.count(|c| c.heartbeats += 1);
                *Shared::lock(&self.shared.last_db_ok) = Instant::now();
                Shared::lock(&self.shared.held).take();
                // The database answers: this host is not cut off, no self-fence is owed.
                Shared::lock(&self.shared.unfenced).take();
                contact::record(&self.shared.contact_file);
                self.refresh_peers(budget).await;
                if let Err(e) = self.send_profile(false).await {
                    tracing::warn!("reporting the fencing profile: {e:#}");
                }
            }
            other => {
                // Whatever changed now goes unseen: the next converge pass asks everything.
                Shared::lock(&self.shared.revision).take();
                self.shared.count(|c| c.heartbeat_failures += 1);
                let e = match other {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no answer within {}", humantime::format_duration(budget)),
                };
                tracing::warn!("heartbeat failed: {e}");
                // A pool whose server went away is rebuilt on the next try.
                if let Some(s) = self.store.take() {
                    s.close().await;
                }
                self.maybe_self_fence().await;
            }
        }
    }

    /// Fetches the peer list again when it is older than `peer_refresh` (or was never fetched).
    async fn refresh_peers(&mut self, budget: Duration) {
        let every = self.config.watch.peer_refresh;
        let due = Shared::lock(&self.shared.peers_fetched).is_none_or(|t| t.elapsed() >= every);
        if !due {
            return;
        }
        let Some(store) = self.store.clone() else { return };
        *Shared::lock(&self.shared.peers_fetched) = Some(Instant::now());
        match tokio::time::timeout(budget, store.peers(&self.config.host)).await {
            // The guard decides on the very cell it last reported: a new list is taken only
            // once the database has the profile that names it.
            Ok(Ok(list)) if list != self.shared.peers.get() => {
                let watchdog = *Shared::lock(&self.shared.watchdog);
                let profile = fencing_profile(&self.config, &list, watchdog);
                match tokio::time::timeout(budget, store.save_fencing(&self.config.host, &profile)).await {
                    Ok(Ok(())) => {
                        self.shared.peers.set(list);
                        *Shared::lock(&self.shared.profile_sent) = Some(profile);
                    }
                    Ok(Err(e)) => tracing::warn!("reporting the fencing profile of a new peer list: {e:#}"),
                    Err(_) => tracing::warn!("reporting the fencing profile of a new peer list: no answer in time"),
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("fetching the peer list: {e:#}"),
            Err(_) => tracing::warn!("fetching the peer list: no answer in time"),
        }
    }

    /// Tells the database this guard's fencing profile when it differs from what the database
    /// last acknowledged (`force`: in any case).
    async fn send_profile(&mut self, force: bool) -> anyhow::Result<()> {
        let watchdog = *Shared::lock(&self.shared.watchdog);
        let profile = fencing_profile(&self.config, &self.shared.peers.get(), watchdog);
        if !force && Shared::lock(&self.shared.profile_sent).as_ref() == Some(&profile) {
            return Ok(());
        }
        let budget = self.config.watch.heartbeat_interval;
        let host = self.config.host.clone();
        let sent = tokio::time::timeout(budget, async {
            let store = self.store(budget).await?;
            let mut sent = profile.clone();
            if matches!(store, Backend::Role(_)) {
                sent.migration_uri = None; // the guard role carries no live migrations
            }
            store.save_fencing(&host, &sent).await
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(budget)))?;
        sent?;
        *Shared::lock(&self.shared.profile_sent) = Some(profile);
        Ok(())
    }

    /// After a failed heartbeat: ask the peers (and ask them to relay this host's heartbeat);
    /// past `isolation_timeout` without the database, apply the quorum rule.
    async fn maybe_self_fence(&mut self) {
        let w = self.config.watch.clone();
        let list = self.shared.peers.get();
        let view = if list.peers.is_empty() {
            isolation::PeerView::default()
        } else {
            let client = self.peer_client.get_or_insert_with(reqwest::Client::new).clone();
            crate::peers::ask(&self.config.host, &list, w.peer_port, w.peer_sample, true, &client).await
        };
        if view.relayed {
            tracing::info!("the controller is unreachable from here; a peer relays this host's heartbeat");
        }
        let silent = self.shared.since_db_ok();
        if !w.self_fence || self.shared.is_fenced() || silent < w.isolation_timeout {
            return;
        }
        let silent_for = humantime::format_duration(Duration::from_secs(silent.as_secs()));
        match isolation::decide(list.cell_size, &view) {
            isolation::Isolation::Hold(why) => {
                let mut held = Shared::lock(&self.shared.held);
                if held.as_deref() != Some(why.as_str()) {
                    tracing::warn!("no database for {silent_for}: holding the instances: {why}");
                    *held = Some(why);
                }
                return;
            }
            isolation::Isolation::SelfFence(why) => {
                tracing::error!("no database for {silent_for}, {why}: stopping the HA instances (self-fence)");
            }
        }
        let (uri, cache) = (self.config.libvirt.uri.clone(), self.config.boot.state_dir.join("cache.json"));
        // The record is written before the first domain is destroyed: a guard that dies half-way
        // through still knows, once restarted, that it was fencing and what. A retry after a
        // failed destroy adds to the record of the earlier try.
        let fence_file = self.fence_file.clone();
        let record_first = move |stopping: &[InstanceId]| {
            use anyhow::Context;
            let mut record: SelfFence =
                std::fs::read(&fence_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            record.at = nodekeeper_store::Timestamp::now().0;
            for id in stopping {
                if !record.stopped.contains(id) {
                    record.stopped.push(*id);
                }
            }
            crate::fsutil::write_atomic(&fence_file, &serde_json::to_vec(&record).unwrap_or_default())
                .with_context(|| format!("recording the self-fence in {}", fence_file.display()))
        };
        let result = tokio::time::timeout(
            self.config.watch.libvirt_timeout,
            tokio::task::spawn_blocking(move || stop_ha_domains(&uri, &cache, record_first)),
        )
        .await;
        let stopped = match result {
            Ok(Ok(Ok(stopped))) => stopped,
            Ok(Ok(Err(e))) => {
                tracing::error!("self-fence: {e:#}");
                *Shared::lock(&self.shared.unfenced) = Some(format!("{e:#}"));
                return; // tried again on the next heartbeat failure
            }
            _ => {
                tracing::error!("self-fence: libvirt did not answer");
                *Shared::lock(&self.shared.unfenced) = Some("libvirt did not answer".into());
                return;
            }
        };
        *Shared::lock(&self.shared.unfenced) = None;
        // The exclusive service copies stop with the HA domains: the controller moves them
        // once this host is fenced, as it moves the instances.
        let path = self.config.boot.state_dir.join("services.json");
        let mut started = copies::load(&path);
        let exclusive: Vec<(String, copies::Running)> =
            started.iter().filter(|(_, r)| r.exclusive).map(|(k, r)| (k.clone(), r.clone())).collect();
        // All at once, bounded as a libvirt call is: this is the heartbeat loop, which feeds
        // the watchdog.
        let failed = copies::stop_all(self.config.host.as_str(), &exclusive, self.config.watch.libvirt_timeout).await;
        for (key, _) in &exclusive {
            if !failed.iter().any(|(k, _)| k == key) {
                started.remove(key);
            }
        }
        if let Err(e) = copies::save(&path, &started) {
            tracing::error!("self-fence: services: {e:#}");
        }
        if !failed.is_empty() {
            // A copy that may still run is a self-fence not done: no `fenced` record (the
            // next heartbeat failure tries again) and the hardware watchdog starves — the
            // controller's watchdog fencing counts on the copy being gone by its bound.
            let why: Vec<String> = failed.iter().map(|(k, d)| format!("{k}: {d}")).collect();
            tracing::error!("self-fence: exclusive service copies did not stop: {}", why.join("; "));
            *Shared::lock(&self.shared.unfenced) = Some(format!("exclusive copies did not stop: {}", why.join("; ")));
            return;
        }
        let record = SelfFence { at: nodekeeper_store::Timestamp::now().0, stopped };
        tracing::error!("self-fenced: stopped {} HA domains", record.stopped.len());
        self.shared.count(|c| c.self_fences += 1);
        *Shared::lock(&self.shared.fenced) = Some(record);
    }

    /// The service copies: starts what is assigned here and does not run (by its check, else
    /// by what this guard started), stops what it started and is no longer assigned here.
    /// Returns the events of what it did.
    async fn converge_services(
        &mut self,
        assigned: Vec<nodekeeper_store::guard_api::AssignedService>,
    ) -> Vec<NewEvent> {
        let path = self.config.boot.state_dir.join("services.json");
        let mut started = copies::load(&path);
        if assigned.is_empty() && started.is_empty() {
            return Vec::new();
        }
        let host = self.config.host.to_string();
        let mut alive = std::collections::BTreeMap::new();
        for a in &assigned {
            if let Some(check) = &a.check {
                let env = copies::env(&host, &a.service, &a.slot.to_string());
                let ran = services::run_command_env(check, &env, copies::COMMAND_TIMEOUT).await;
                alive.insert(a.key(), ran.is_some_and(|r| r.ok));
            }
        }
        let (actor, mut events) = (self.actor(), Vec::new());
        for step in copies::plan(&assigned, &started, &alive) {
            match step {
                copies::Step::Start(a) => {
                    let env = copies::env(&host, &a.service, &a.slot.to_string());
                    let ran = services::run_command_env(&a.start, &env, copies::COMMAND_TIMEOUT).await;
                    let key = a.key();
                    if ran.as_ref().is_some_and(|r| r.ok) {
                        started.insert(
                            key.clone(),
                            copies::Running { generation: a.generation, stop: a.stop.clone(), exclusive: a.exclusive },
                        );
                        let m = format!("service {} copy {} started on {host}", a.service, a.slot);
                        events.push(NewEvent::host(&actor, "service.started", &self.config.host, m));
                    } else {
                        let why = ran.map_or_else(|| "no command".to_owned(), |r| r.detail);
                        let m = format!("service {} copy {} did not start on {host}: {why}", a.service, a.slot);
                        let k = format!("service-start-failed:{host}:{key}:{}", a.generation);
                        events.push(NewEvent::host(&actor, "service.start_failed", &self.config.host, m).with_key(k));
                    }
                }
                copies::Step::Stop(key, r) => {
                    let (service, slot) = key.rsplit_once('/').unwrap_or((key.as_str(), ""));
                    let env = copies::env(&host, service, slot);
                    let ran = services::run_command_env(&r.stop, &env, copies::COMMAND_TIMEOUT).await;
                    let ok = ran.as_ref().is_some_and(|x| x.ok);
                    // Forgotten either way: it is no longer this host's (a failed stop is said).
                    started.remove(&key);
                    let m = if ok {
                        format!("service {service} copy {slot} stopped on {host}: assigned elsewhere")
                    } else {
                        format!(
                            "service {service} copy {slot}: its stop failed on {host}: {}",
                            ran.map_or_else(String::new, |x| x.detail)
                        )
                    };
                    events.push(NewEvent::host(&actor, "service.stopped", &self.config.host, m));
                }
            }
        }
        if let Err(e) = copies::save(&path, &started) {
            tracing::error!("services: {e:#}");
        }
        events
    }

    /// One look at a held instance that runs: asked to shut down the first time, destroyed
    /// once `shutdown_timeout` has passed. Returns its event (once per way) and whether it
    /// still runs; `None` when libvirt did not answer.
    async fn shut_down(&mut self, action: &converge::Action) -> Option<(Option<NewEvent>, bool)> {
        let since = *self.stopping.entry(action.uuid).or_insert_with(Instant::now);
        let first = since.elapsed() < self.config.watch.converge_interval;
        let force = since.elapsed() >= self.config.watch.shutdown_timeout;
        let (uri, uuid) = (self.config.libvirt.uri.clone(), action.uuid);
        let done = tokio::task::spawn_blocking(move || converge::shut_down(&uri, uuid, force)).await;
        let still = match done {
            Ok(Ok(still)) => still,
            Ok(Err(e)) => {
                tracing::warn!(uuid = %uuid, "shutting {} down: {e:#}", action.name);
                return None;
            }
            Err(e) => {
                tracing::warn!(uuid = %uuid, "shutting {} down: {e}", action.name);
                return None;
            }
        };
        let (actor, host, name) = (self.actor(), self.config.host.clone(), &action.name);
        let event = if force {
            let m = format!("{name} destroyed: held for a drain, it did not shut down within the shutdown_timeout");
            Some(NewEvent::instance(&actor, "instance.destroyed", &host, uuid, m))
        } else if first {
            let m = format!("{name} asked to shut down: held for a drain");
            let key = format!("shutdown:{host}:{uuid}:{}", action.generation.0);
            Some(NewEvent::instance(&actor, "instance.shutdown", &host, uuid, m).with_key(key))
        } else {
            None
        };
        if !still {
            self.stopping.remove(&uuid);
        }
        Some((event, still))
    }

    /// Begins the live migration of `action`'s instance to `m.to` in the background, unless
    /// one of it runs or failed (then the controller decides).
    fn start_migration(&mut self, action: &converge::Action, m: &nodekeeper_store::guard_api::Migration) {
        if self.migrations.contains_key(&action.uuid)
            || self.migration_failed.get(&action.uuid).is_some_and(|(to, _)| to == &m.to)
        {
            return;
        }
        let (uri, uuid, m2, next, ha) =
            (self.config.libvirt.uri.clone(), action.uuid, m.clone(), action.generation.next(), action.ha);
        tracing::info!(uuid = %uuid, to = %m.to, "converge: live-migrating {}", action.name);
        let call = tokio::task::spawn_blocking(move || converge::migrate(&uri, uuid, &m2, next, ha));
        self.migrations.insert(uuid, (m.to.clone(), call));
    }

    /// The live migrations that ended since the last pass: their events; a failure is kept
    /// for the report.
    async fn finished_migrations(&mut self) -> Vec<NewEvent> {
        let done: Vec<InstanceId> =
            self.migrations.iter().filter(|(_, (_, call))| call.is_finished()).map(|(id, _)| *id).collect();
        let (actor, host) = (self.actor(), self.config.host.clone());
        let mut events = Vec::new();
        for id in done {
            let Some((to, call)) = self.migrations.remove(&id) else { continue };
            let outcome = call.await.map_err(anyhow::Error::from).and_then(|r| r);
            match outcome {
                Ok(true) => {
                    let m = format!("instance {id} live-migrated from {host} to {to}");
                    events.push(NewEvent::instance(&actor, "instance.migrated", &host, id, m));
                }
                Ok(false) => {} // an earlier guard's migration runs: the next pass looks again
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::warn!(uuid = %id, %to, "converge: live migration failed: {why}");
                    let m = format!("instance {id}: its live migration from {host} to {to} failed: {why}");
                    events.push(NewEvent::instance(&actor, "instance.migration_failed", &host, id, m));
                    self.migration_failed.insert(id, (to, why));
                }
            }
        }
        events
    }

    async fn converge(&mut self) {
        // libvirtd first: alive, and answering in time?
        let uri = self.config.libvirt.uri.clone();
        let limit = self.config.watch.libvirt_timeout;
        let listed = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || list(&uri))).await;
        let local = match listed {
            Ok(Ok(Ok(local))) => local,
            Ok(Ok(Err(e))) => return self.libvirt_failed(false, &format!("{e:#}")).await,
            Ok(Err(e)) => return self.libvirt_failed(false, &e.to_string()).await,
            Err(_) => return self.libvirt_failed(true, "no answer").await,
        };
        if self.shared.since_db_ok() > self.config.watch.heartbeat_interval * 2 {
            return; // no database: nothing to converge on
        }
        let budget = self.config.watch.converge_interval;
        let Ok(store) = self.store(budget).await else { return };
        // Nothing changed of this host's in the database, nor in its libvirt, since the last
        // complete pass: nothing to ask (the traffic of a fleet at rest is its heartbeats).
        let began = Instant::now();
        let revision = *Shared::lock(&self.shared.revision);
        let basis = revision.map(|r| converge::Basis::of(r.value, &local));
        let busy = !self.stopping.is_empty()
            || self.shared.is_fenced()
            || !self.migrations.is_empty()
            || self.migration_involved;
        let last = self.converged.as_ref().map(|(b, at, _)| (b.clone(), at.elapsed()));
        let seed = self.converged.as_ref().map_or(0, |c| c.2);
        if let (Some(basis), Some(Revision { full_pass, .. })) = (&basis, revision) {
            if converge::nothing_new(last.as_ref(), basis, converge::spread(full_pass, seed), busy) {
                self.shared.count(|c| c.unchanged += 1);
                let copies = self.copies.clone();
                let events = self.converge_services(copies).await;
                if !events.is_empty() {
                    if let Err(e) = store.record_events(&events).await {
                        tracing::warn!("converge: recording events: {e:#}");
                    }
                }
                self.shared.count(|c| c.converges += 1);
                return;
            }
        }
        // Complete only if every question was answered and every action done.
        self.converged = None;
        let mut complete = true;
        // What moved away: the post-libvirt pass (saves, destroys, undefines; its events).
        match tokio::time::timeout(budget, crate::boot::live::run(&self.config)).await {
            Ok(Ok(report)) if !report.destroyed.is_empty() || !report.undefined.is_empty() => {
                tracing::info!(destroyed = ?report.destroyed, undefined = ?report.undefined, "converge: removed what moved away");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                complete = false;
                tracing::warn!("converge: {e:#}");
            }
            Err(_) => complete = false,
        }
        let owned = match store.assigned(&self.config.host).await {
            Ok(o) => o,
            Err(e) => return tracing::warn!("converge: {e:#}"),
        };
        let mut events = self.finished_migrations().await;
        let mut stopped_now = Vec::new();
        let actions = converge::plan(&self.config.host, &local, &owned);
        self.stopping.retain(|id, _| actions.iter().any(|a| a.stop && a.uuid == *id));
        for action in actions {
            if let Some(m) = &action.migrate {
                self.start_migration(&action, m);
                continue;
            }
            if action.stop {
                if let Some((event, still)) = self.shut_down(&action).await {
                    events.extend(event);
                    if !still {
                        stopped_now.push(action.uuid);
                    }
                }
                continue;
            }
            let xml = if action.define {
                match store.domain_xml(action.uuid).await {
                    Ok(Some(x)) => Some(x),
                    Ok(None) => {
                        tracing::warn!(uuid = %action.uuid, "converge: {} is assigned here but has no stored domain XML", action.name);
                        complete = false;
                        continue;
                    }
                    Err(e) => return tracing::warn!("converge: {e:#}"),
                }
            } else {
                None
            };
            let (uri, uuid, generation, ha) =
                (self.config.libvirt.uri.clone(), action.uuid, action.generation, action.ha);
            // Local storage: the disks died with the old owner; a new owner recreates them
            // from their backing image (the same identity, fresh data).
            let (recreate, start) = (action.recreate_disks, action.start);
            let done = tokio::task::spawn_blocking(move || {
                let recreated = match (&xml, recreate) {
                    (Some(xml), true) => recreate_local_disks(xml)?,
                    _ => Vec::new(),
                };
                define_and_start(&uri, uuid, xml.as_deref(), generation, ha, start).map(|r| (r, recreated))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
            let name = &action.name;
            match done {
                Ok(((defined, started), recreated)) => {
                    let actor = self.actor();
                    for disk in recreated {
                        let m = format!("{name}: {disk} (local storage: the data on the old owner is lost)");
                        events.push(NewEvent::instance(&actor, "instance.disk_recreated", &self.config.host, uuid, m));
                    }
                    if defined {
                        self.shared.count(|c| c.defined += 1);
                        let m = format!("{name} defined from the database (generation {generation})");
                        events.push(NewEvent::instance(&actor, "instance.defined", &self.config.host, uuid, m));
                    }
                    if started {
                        self.started_now.push((uuid, generation));
                        self.shared.count(|c| c.started += 1);
                        let m = format!("{name} started by the guard");
                        events.push(NewEvent::instance(&actor, "instance.started", &self.config.host, uuid, m));
                    }
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(uuid = %uuid, "converge: {name}: {e:#}");
                    let m = format!("{name} not started here: {e:#}");
                    let key = format!("converge-failed:{}:{uuid}:{}", self.config.host, generation.0);
                    events.push(
                        NewEvent::instance(&self.actor(), "instance.converge_failed", &self.config.host, uuid, m)
                            .with_key(key),
                    );
                }
            }
        }
        let lifted = Shared::lock(&self.shared.fenced).take();
        // What this pass saw (and did), for the controller's GC pass.
        let mut seen: HashMap<InstanceId, (bool, Option<Generation>)> =
            local.iter().map(|(id, d)| (*id, (d.active, d.generation))).collect();
        for (id, generation) in &self.started_now {
            seen.insert(*id, (true, Some(*generation)));
        }
        for id in stopped_now {
            if let Some(d) = seen.get_mut(&id) {
                d.0 = false;
            }
        }
        self.started_now.clear();
        // A failed migration is reported while the database still asks for it.
        self.migration_failed.retain(|id, (to, _)| {
            owned.iter().any(|a| a.uuid == *id && a.migration.as_ref().is_some_and(|m| &m.to == to))
        });
        self.migration_involved = owned.iter().any(|a| a.migration.is_some());
        let report: Vec<ReportedDomain> = seen
            .into_iter()
            .map(|(uuid, (running, generation))| ReportedDomain {
                uuid,
                running,
                generation,
                migration_failed: self.migration_failed.get(&uuid).map(|(_, why)| why.clone()),
            })
            .collect();
        if let Err(e) = store.save_report(&self.config.host, &report).await {
            complete = false;
            tracing::warn!("converge: saving the report: {e:#}");
        }
        if let Some(f) = lifted {
            // The database answers and confirmed what is ours: what the self-fence stopped and
            // is still ours was started above; the rest was recovered elsewhere.
            let m = format!(
                "the database is back: {} HA domains stopped by the self-fence were judged again",
                f.stopped.len()
            );
            events.push(NewEvent::host(&self.actor(), "host.self_fence_lifted", &self.config.host, m));
            let _ = std::fs::remove_file(&self.fence_file);
        }
        match store.services(&self.config.host).await {
            Ok(copies) => {
                self.copies = copies.clone();
                events.extend(self.converge_services(copies).await);
            }
            Err(e) => {
                complete = false;
                tracing::warn!("converge: services: {e:#}");
            }
        }
        if !events.is_empty() {
            if let Err(e) = store.record_events(&events).await {
                tracing::warn!("converge: recording events: {e:#}");
            }
        }
        if let (true, Some(basis)) = (complete, basis) {
            use std::hash::BuildHasher;
            let seed = std::collections::hash_map::RandomState::new().hash_one(began);
            self.converged = Some((basis, began, seed));
        }
        self.shared.count(|c| c.converges += 1);
    }

    async fn libvirt_failed(&mut self, stuck: bool, why: &str) {
        let w = self.config.watch.clone();
        self.failed("libvirtd", &w.libvirt_restart, &w.libvirt_kill, stuck, why).await;
    }

    /// A service is dead (`stuck` false) or stuck: kill if stuck, restart; past `max_restarts`
    /// within `restart_window`, reboot the host — once.
    async fn failed(&mut self, name: &str, restart: &[String], kill: &[String], stuck: bool, why: &str) {
        let w = self.config.watch.clone();
        tracing::error!("{name} {}: {why}", if stuck { "is stuck" } else { "is down" });
        if restart.is_empty() || self.shared.rebooted.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if self.budget.on_failure(name, Instant::now()) == Remedy::Reboot {
            if self.shared.rebooted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            tracing::error!(
                "{name} failed after {} restarts within {}: rebooting the host",
                self.budget.restarts(name),
                humantime::format_duration(w.restart_window)
            );
            run_command(&w.reboot).await;
            return;
        }
        if stuck && !kill.is_empty() {
            run_command(kill).await;
        }
        run_command(restart).await;
        self.shared.count(|c| c.restarts += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::{feeds_hardware, fencing_profile};
    use nodekeeper_store::guard_api::{Peer, PeerList};
    use std::time::Duration;

    #[test]
    fn the_watchdog_timeout_is_never_lengthened_before_it_is_announced() {
        use super::{timeout_change, TimeoutChange};
        let s = Duration::from_secs;
        assert_eq!(timeout_change(Some(s(60)), s(30)), TimeoutChange::SetNow, "shorter: at once");
        assert_eq!(timeout_change(Some(s(30)), s(60)), TimeoutChange::AfterAnnouncing, "longer: told first");
        assert_eq!(timeout_change(Some(s(60)), s(60)), TimeoutChange::Keep);
        assert_eq!(timeout_change(None, s(60)), TimeoutChange::SetNow, "unknown: nothing was reported of it");
    }

    #[test]
    fn the_fencing_profile_names_the_cell_only_when_the_quorum_is_exact() {
        let config =
            crate::config::Config::parse("host = \"a\"\ndatabase_url = \"sqlite:///tmp/x.db\"\n").expect("config");
        let peer = |h: &str, counted| Peer {
            host: h.parse().expect("name"),
            address: "127.0.0.1".parse().expect("ip"),
            key: "k".into(),
            counted,
        };
        // b and c active, d suspect (asked, not counted): the whole cell, asked at once.
        let list = PeerList { cell_size: 3, peers: vec![peer("b", true), peer("c", true), peer("d", false)] };
        let p = fencing_profile(&config, &list, Some(Duration::from_secs(60)));
        let cell: Vec<String> = p.quorum_cell.expect("exact").iter().map(ToString::to_string).collect();
        assert_eq!(cell, ["b", "c"]);
        assert_eq!(
            (p.watchdog_timeout_ms, p.heartbeat_interval_ms, p.isolation_timeout_ms),
            (Some(60_000), 5_000, 20_000)
        );
        assert!(p.self_fence && p.boot_blocks_ha);
        // A large cell's cut (fewer counted peers than the cell counts): a sample, not exact.
        let cut = PeerList { cell_size: 100, ..list.clone() };
        assert_eq!(fencing_profile(&config, &cut, None).quorum_cell, None);
        // More peers than a round asks: not exact either.
        let mut small = config.clone();
        small.watch.peer_sample = 2;
        assert_eq!(fencing_profile(&small, &list, None).quorum_cell, None);
        let mut allow = config.clone();
        allow.boot.on_db_unreachable = crate::config::OnDbUnreachable::Allow;
        assert!(!fencing_profile(&allow, &list, None).boot_blocks_ha);
    }

    #[test]
    fn a_self_fence_that_could_not_stop_the_domains_starves_the_hardware_watchdog() {
        assert!(feeds_hardware(true, None));
        assert!(!feeds_hardware(false, None), "a stuck loop is not fed (as before)");
        assert!(!feeds_hardware(true, Some("libvirt did not answer")), "owed a self-fence: reset");
    }
}
