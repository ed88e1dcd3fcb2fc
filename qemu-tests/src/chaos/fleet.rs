//! The processes under test and the "hardware" around them.
//!
//! - **PostgreSQL**: a private cluster (initdb in the campaign's directory, its own port), so
//!   stopping it hurts nothing else on the machine; a database per run.
//! - **Hosts**: each a network namespace on a bridge (its link is what a cut takes down), a
//!   libvirtd of its own (a session daemon as the `nkchaos` user, its socket in the host's
//!   directory; libvirt's test driver, whose domains live while the daemon does — held by an
//!   anchor connection, as a machine's memory holds its VMs) and a `nodekeeper-guard watch`
//!   in the namespace, its wall clock moved by libfaketime when a fault says so.
//! - **Supervision**, as systemd does on a host: a dead libvirtd or guard is started again a
//!   second later, and the guard's `libvirt_restart` and `reboot` commands are requests the
//!   supervisor carries out (a reboot: everything on the host dies, boots 2 s later).
//! - **Power**: what the BMCs ([`super::bmc`]) switch. Off kills the host's guard and libvirtd
//!   (its domains die with it) before the BMC answers.
//! - **`serve`**: replicas on the run's database, each started again after its fault's downtime.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::schedule::{BmcFault, Fault};

/// libfaketime, which moves a guard's wall clock (not its monotonic one).
pub const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// The user the hosts' libvirtds run as (session daemons: one per host, each its own state).
pub const LIBVIRT_USER: &str = "nkchaos";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The port every guard answers its peers on (each in its own namespace).
pub const PEER_PORT: u16 = 7443;

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    anyhow::ensure!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kill_child(slot: &mut Option<Child>) {
    if let Some(mut c) = slot.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts `cmd` with no input, its output to the end of `log`.
fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> anyhow::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log)?)
        .spawn()
        .with_context(|| format!("starting {what}"))
}

/// A supervised process that exited: its slot emptied, its restart no sooner than a second
/// from `now` (systemd's RestartSec).
fn reap(slot: &mut Option<Child>, after: &mut Instant, now: Instant) {
    if slot.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
        *slot = None;
        *after = (*after).max(now + Duration::from_secs(1));
    }
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("{}", path.display()))
}

/// The processes in namespace `ns`.
pub fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The private PostgreSQL cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    /// Its port (on 127.0.0.1 and the bridge's address).
    pub port: u16,
    /// Whether it is running.
    pub up: bool,
}

impl Postgres {
    /// initdb in `dir/pg`, listening on loopback (and `also_on`); started.
    pub fn create(dir: &Path, also_on: Option<&str>) -> anyhow::Result<Postgres> {
        let pg = dir.join("pg");
        std::fs::create_dir_all(&pg)?;
        run("chown", &["postgres:postgres", &pg.display().to_string()])?;
        let data = pg.join("data");
        let d = data.display().to_string();
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &format!("{PG_BIN}/initdb"),
                "-D",
                &d,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .context("initdb")?;
        let port = free_port()?;
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1{}'\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = on\nlog_min_messages = warning\n",
            also_on.map(|a| format!(",{a}")).unwrap_or_default(),
            pg.display()
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhost all all 0.0.0.0/0 trust\n")?;
        let mut me = Postgres { dir: pg, port, up: false };
        me.start()?;
        Ok(me)
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("log").display().to_string();
        let pg_ctl = format!("{PG_BIN}/pg_ctl");
        let mut all = vec!["-u", "postgres", "--", &pg_ctl, "-D", &data, "-l", &log];
        all.extend_from_slice(args);
        run("runuser", &all)
    }

    /// Starts it, waiting until it accepts connections.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.ctl(&["-w", "-t", "60", "start"]).context("starting PostgreSQL")?;
        self.up = true;
        Ok(())
    }

    /// Stops it as a crash would (immediate: no checkpoint).
    pub fn crash(&mut self) -> anyhow::Result<()> {
        self.ctl(&["-m", "immediate", "stop"]).context("stopping PostgreSQL")?;
        self.up = false;
        Ok(())
    }

    /// Runs SQL as the superuser on its `postgres` database.
    pub fn sql(&self, sql: &str) -> anyhow::Result<()> {
        let host = self.dir.display().to_string();
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "psql",
                "-q",
                "-h",
                &host,
                "-p",
                &self.port.to_string(),
                "-d",
                "postgres",
                "-c",
                sql,
            ],
        )
        .map(drop)
    }

    /// The URL of database `db` from this namespace (`ip`: 127.0.0.1) or a host's (the bridge).
    pub fn url(&self, ip: &str, db: &str) -> String {
        format!("postgres://postgres@{ip}:{}/{db}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.up {
            let _ = self.crash();
        }
    }
}

/// The hosts' network: a bridge in this namespace, a namespace per host on it.
#[derive(Debug)]
pub struct Network {
    bridge: String,
    /// The bridge's address (PostgreSQL listens there).
    pub gateway: String,
    prefix: String,
    tag: u32,
    namespaces: Vec<String>,
}

impl Network {
    /// A bridge `nkc{tag}b` with `10.77.{tag}.1/24`, and `hosts` namespaces `nkc{tag}h{i}` with
    /// `eth0` at `10.77.{tag}.{10+i}`.
    pub fn new(tag: u32, hosts: usize) -> anyhow::Result<Network> {
        let prefix = format!("10.77.{tag}");
        let mut net = Network {
            bridge: format!("nkc{tag}b"),
            gateway: format!("{prefix}.1"),
            prefix,
            tag,
            namespaces: Vec::new(),
        };
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{}/24", net.gateway), "dev", &net.bridge])?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        for i in 0..hosts {
            let ns = format!("nkc{tag}h{i}");
            run("ip", &["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let veth = format!("nkc{tag}v{i}");
            run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run("ip", &["link", "set", &veth, "master", &net.bridge, "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", net.ip(i)), "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, 10 + i)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Takes host `i`'s link down (cut off) or up again.
    pub fn link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let veth = format!("nkc{}v{i}", self.tag);
        run("ip", &["link", "set", &veth, if up { "up" } else { "down" }]).map(drop)
    }
}

impl Network {
    /// Removes the namespaces and the bridge (once: again does nothing).
    pub fn remove(&mut self) {
        for ns in std::mem::take(&mut self.namespaces) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if !self.bridge.is_empty() {
            let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
            self.bridge.clear();
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// One host: its power, its processes, its BMC's behaviour.
pub struct Machine {
    /// `h0`, `h1`, …
    pub name: String,
    ns: String,
    dir: PathBuf,
    /// Where this run's logs of its processes go.
    log_dir: PathBuf,
    guard_bin: PathBuf,
    /// Whether its power is on.
    pub powered: bool,
    boot_at: Instant,
    libvirtd: Option<Child>,
    libvirtd_after: Instant,
    anchor: Option<virt::connect::Connect>,
    guard: Option<Child>,
    guard_after: Instant,
    /// The BMC's fault and until when.
    pub bmc: Option<(BmcFault, Instant)>,
    /// A late power-off: when it lands.
    pub pending_off: Option<Instant>,
    /// Power-ons by its BMC, power-offs by its BMC, reboots the guard asked for.
    pub counts: [u32; 3],
}

impl Machine {
    fn new(i: usize, ns: &str, dir: &Path, guard_bin: &Path) -> anyhow::Result<Machine> {
        let name = format!("h{i}");
        let dir = dir.join(&name);
        for sub in ["run", "home", "qemu", "state"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        for sub in ["run", "home"] {
            run("chown", &["-R", LIBVIRT_USER, &dir.join(sub).display().to_string()])?;
        }
        std::fs::write(dir.join("clock"), "+0\n")?;
        let now = Instant::now();
        Ok(Machine {
            name,
            ns: ns.to_owned(),
            log_dir: dir.clone(),
            dir,
            guard_bin: guard_bin.to_owned(),
            powered: false,
            boot_at: now,
            libvirtd: None,
            libvirtd_after: now,
            anchor: None,
            guard: None,
            guard_after: now,
            bmc: None,
            pending_off: None,
            counts: [0; 3],
        })
    }

    /// Its namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Its libvirt, as the guard and the checker reach it.
    pub fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket().display())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-sock")
    }

    /// Its guard's config path.
    pub fn config(&self) -> PathBuf {
        self.dir.join("guard.toml")
    }

    /// Writes its guard's config (and its node token, for the guard API).
    pub fn write_config(&self, backend: &GuardBackend, ip: &str) -> anyhow::Result<()> {
        let d = self.dir.display();
        let (db_url, token_line) = match backend {
            GuardBackend::Database(url) => (url.clone(), String::new()),
            GuardBackend::Api { url, token } => {
                let file = self.dir.join("node-token");
                std::fs::write(&file, token)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                (url.clone(), format!("token_file = \"{}\"\n", file.display()))
            }
        };
        let text = format!(
            "host = \"{name}\"\ndatabase_url = \"{db_url}\"\n{token_line}[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"{uri}\"\n\
             [boot]\nstate_dir = \"{d}/state\"\ndb_wait = \"1s\"\n\
             [watch]\nheartbeat_interval = \"1s\"\nconverge_interval = \"1s\"\nisolation_timeout = \"4s\"\n\
             libvirt_timeout = \"2s\"\nshutdown_timeout = \"3s\"\npeer_listen = \"{ip}:{PEER_PORT}\"\n\
             peer_port = {PEER_PORT}\nmax_restarts = 3\nlibvirt_restart = [\"touch\", \"{d}/restart-libvirtd\"]\n\
             libvirt_kill = [\"touch\", \"{d}/restart-libvirtd\"]\nreboot = [\"touch\", \"{d}/reboot\"]\n",
            name = self.name,
            uri = self.uri(),
        );
        std::fs::write(self.config(), text)?;
        Ok(())
    }

    /// Power off: the guard and libvirtd die (SIGKILL), the domains with libvirtd, and every
    /// other process of the host (its service copies: whatever runs in its namespace).
    pub fn kill_all(&mut self) {
        kill_child(&mut self.guard);
        for pid in netns_pids(&self.ns) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        self.drop_anchor();
        kill_child(&mut self.libvirtd);
    }

    fn drop_anchor(&mut self) {
        if let Some(mut c) = self.anchor.take() {
            let _ = c.close();
        }
    }

    /// Power on (by the BMC, or after a reboot): processes start at `at`.
    pub fn power_on(&mut self, at: Instant) {
        self.powered = true;
        self.boot_at = at;
        self.libvirtd_after = at;
        self.guard_after = self.guard_after.max(at);
    }

    /// SIGKILL of the guard; started again no sooner than `down` from now.
    pub fn kill_guard(&mut self, down: Duration) {
        kill_child(&mut self.guard);
        self.guard_after = Instant::now() + down;
    }

    /// SIGKILL of libvirtd; its supervisor starts it again a second later.
    pub fn kill_libvirtd(&mut self) {
        self.drop_anchor();
        kill_child(&mut self.libvirtd);
        self.libvirtd_after = Instant::now() + Duration::from_secs(1);
    }

    /// Moves the guard's wall clock by `by` seconds (0: back to true time).
    pub fn set_clock(&self, by: i64) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("clock"), format!("{by:+}\n"))?;
        Ok(())
    }

    /// What the supervisor and the power do, every 100 ms.
    fn tick(&mut self, now: Instant) {
        reap(&mut self.guard, &mut self.guard_after, now);
        reap(&mut self.libvirtd, &mut self.libvirtd_after, now);
        if self.libvirtd.is_none() {
            self.drop_anchor();
        }
        if self.pending_off.is_some_and(|t| now >= t) {
            self.pending_off = None;
            self.kill_all();
            self.powered = false;
            self.counts[1] += 1;
        }
        if std::fs::remove_file(self.dir.join("reboot")).is_ok() && self.powered {
            self.kill_all();
            self.counts[2] += 1;
            self.power_on(now + Duration::from_secs(2));
        }
        if std::fs::remove_file(self.dir.join("restart-libvirtd")).is_ok() && self.libvirtd.is_some() {
            self.kill_libvirtd();
        }
        if !self.powered || now < self.boot_at {
            return;
        }
        if self.libvirtd.is_none() && now >= self.libvirtd_after {
            let _ = std::fs::remove_file(self.socket());
            match self.spawn_libvirtd() {
                Ok(c) => self.libvirtd = Some(c),
                Err(e) => eprintln!("chaos: {}: libvirtd: {e:#}", self.name),
            }
        }
        if self.libvirtd.is_some() && self.anchor.is_none() && self.socket().exists() {
            self.anchor = virt::connect::Connect::open(Some(&self.uri())).ok();
        }
        if self.guard.is_none() && self.anchor.is_some() && now >= self.guard_after {
            match self.spawn_guard() {
                Ok(c) => self.guard = Some(c),
                Err(e) => eprintln!("chaos: {}: guard: {e:#}", self.name),
            }
        }
    }

    fn spawn_libvirtd(&self) -> anyhow::Result<Child> {
        let d = &self.dir;
        let mut cmd = Command::new("setpriv");
        cmd.args([&format!("--reuid={LIBVIRT_USER}"), &format!("--regid={LIBVIRT_USER}"), "--clear-groups", "env"])
            .arg(format!("HOME={}", d.join("home").display()))
            .arg(format!("XDG_RUNTIME_DIR={}", d.join("run").display()))
            .arg(format!("XDG_CONFIG_HOME={}", d.join("home/.config").display()))
            .arg(format!("XDG_CACHE_HOME={}", d.join("home/.cache").display()))
            .arg("libvirtd");
        spawn_logged(&mut cmd, &self.log_dir.join(format!("{}-libvirtd.log", self.name)), "libvirtd")
    }

    fn spawn_guard(&self) -> anyhow::Result<Child> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.guard_bin)
            .args(["-v", "watch", "--config"])
            .arg(self.config())
            .env("LD_PRELOAD", FAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", self.dir.join("clock"))
            .env("FAKETIME_CACHE_DURATION", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        spawn_logged(&mut cmd, &self.log_dir.join(format!("{}-guard.log", self.name)), "the guard")
    }
}

/// Where a host's guard keeps its state.
#[derive(Debug, Clone)]
pub enum GuardBackend {
    /// PostgreSQL itself, at this URL.
    Database(String),
    /// A `serve` replica's guard API, with the host's node token.
    Api {
        /// `http://BRIDGE:PORT`.
        url: String,
        /// The node token.
        token: String,
    },
}

/// A `serve` replica.
struct Replica {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    after: Instant,
}

/// Something a fault undoes when its time is up.
#[derive(Debug, Clone, Copy)]
enum Heal {
    Postgres,
    Link(usize),
    Clock(usize),
}

/// Everything under test, behind one lock (the BMCs', the supervisor's and the faults').
pub struct Fleet {
    /// The hosts.
    pub machines: Vec<Machine>,
    replicas: Vec<Replica>,
    provisioner: PathBuf,
    /// The database.
    pub postgres: Postgres,
    /// The hosts' network.
    pub network: Network,
    heals: Vec<(Instant, Heal)>,
    /// Whether the supervisor runs the processes (off between runs).
    pub running: bool,
}

impl Fleet {
    /// The network, PostgreSQL, and `hosts` machines (powered off) under `dir`.
    pub fn new(dir: &Path, tag: u32, hosts: usize, bin_dir: &Path) -> anyhow::Result<Fleet> {
        let network = Network::new(tag, hosts)?;
        let postgres = Postgres::create(dir, Some(&network.gateway))?;
        let guard_bin = bin_dir.join("nodekeeper-guard");
        let machines =
            (0..hosts).map(|i| Machine::new(i, network.ns(i), dir, &guard_bin)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Fleet {
            machines,
            replicas: Vec::new(),
            provisioner: bin_dir.join("nodekeeper-provisioner"),
            postgres,
            network,
            heals: Vec::new(),
            running: false,
        })
    }

    /// A run in `dir` (its logs and configs): `replicas` replicas of `serve` on `db_url`,
    /// started by the next tick once [`Fleet::running`]. Returns each replica's guard API URL
    /// (on the bridge: the hosts' namespaces reach it).
    pub fn prepare_run(&mut self, dir: &Path, db_url: &str, replicas: usize) -> anyhow::Result<Vec<String>> {
        let mut urls = Vec::new();
        for m in &mut self.machines {
            m.log_dir = dir.to_owned();
        }
        self.replicas.clear();
        std::fs::create_dir_all(dir.join("images"))?;
        let gw = self.network.gateway.clone();
        for r in 0..replicas {
            let port = free_port()?;
            let config = dir.join(format!("serve-{r}.toml"));
            std::fs::write(
                &config,
                format!(
                    "database_url = \"{db_url}\"\n[dhcp]\nmode = \"off\"\n[http]\nlisten = \"{gw}:{port}\"\n\
                     public_url = \"http://{gw}:{port}\"\nimages_dir = \"{}\"\n\
                     [recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nboot_within = \"30s\"\n",
                    dir.join("images").display()
                ),
            )?;
            let log = dir.join(format!("serve-{r}.log"));
            self.replicas.push(Replica { config, log, child: None, after: Instant::now() });
            urls.push(format!("http://{gw}:{port}"));
        }
        Ok(urls)
    }

    /// Does what `fault` says, now; what it undoes later is queued.
    pub fn apply(&mut self, fault: &Fault) -> anyhow::Result<()> {
        let now = Instant::now();
        match *fault {
            Fault::KillGuard { host, down } => self.machines[host].kill_guard(down),
            Fault::KillServe { replica, down } => {
                let r = &mut self.replicas[replica];
                kill_child(&mut r.child);
                r.after = now + down;
            }
            Fault::KillLibvirtd { host } => self.machines[host].kill_libvirtd(),
            Fault::StopPostgres { down } => {
                if self.postgres.up {
                    self.postgres.crash()?;
                }
                self.heals.push((now + down, Heal::Postgres));
            }
            Fault::Cut { host, down } => {
                self.network.link(host, false)?;
                self.heals.push((now + down, Heal::Link(host)));
            }
            Fault::Bmc { host, fault, lasts } => self.machines[host].bmc = Some((fault, now + lasts)),
            Fault::ClockJump { host, by, lasts } => {
                self.machines[host].set_clock(by)?;
                self.heals.push((now + lasts, Heal::Clock(host)));
            }
        }
        Ok(())
    }

    fn heal(&mut self, h: Heal) -> anyhow::Result<()> {
        match h {
            Heal::Postgres if !self.postgres.up => self.postgres.start(),
            Heal::Postgres => Ok(()),
            Heal::Link(i) => self.network.link(i, true),
            Heal::Clock(i) => self.machines[i].set_clock(0),
        }
    }

    /// Ends every fault now: the database up, links up, clocks right, BMCs well, processes
    /// allowed back (late power-offs still land).
    pub fn heal_all(&mut self) -> anyhow::Result<()> {
        for (_, h) in std::mem::take(&mut self.heals) {
            self.heal(h)?;
        }
        let now = Instant::now();
        for m in &mut self.machines {
            m.bmc = None;
            m.guard_after = m.guard_after.min(now);
        }
        for r in &mut self.replicas {
            r.after = r.after.min(now);
        }
        Ok(())
    }

    /// One pass of the supervisor: heals due, hosts, replicas.
    pub fn tick(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.heals).into_iter().partition(|(t, _)| *t <= now);
        self.heals = later;
        for (_, h) in due {
            if let Err(e) = self.heal(h) {
                eprintln!("chaos: healing {h:?}: {e:#}");
            }
        }
        if !self.running {
            return;
        }
        for m in &mut self.machines {
            if m.bmc.is_some_and(|(_, until)| now >= until) {
                m.bmc = None;
            }
            m.tick(now);
        }
        for r in &mut self.replicas {
            reap(&mut r.child, &mut r.after, now);
            if r.child.is_none() && now >= r.after {
                let mut cmd = Command::new(&self.provisioner);
                cmd.args(["serve", "--config"]).arg(&r.config).env("RUST_LOG", "info");
                let spawned = spawn_logged(&mut cmd, &r.log, "serve");
                match spawned {
                    Ok(c) => r.child = Some(c),
                    Err(e) => eprintln!("chaos: serve: {e:#}"),
                }
            }
        }
    }

    /// Stops every process of the run (between runs and at the end).
    pub fn stop_all(&mut self) {
        self.running = false;
        for m in &mut self.machines {
            m.kill_all();
            m.powered = false;
            m.pending_off = None;
            m.bmc = None;
            m.counts = [0; 3];
            let _ = m.set_clock(0);
            for f in ["reboot", "restart-libvirtd"] {
                let _ = std::fs::remove_file(m.dir.join(f));
            }
        }
        for r in &mut self.replicas {
            kill_child(&mut r.child);
        }
        self.heals.clear();
    }

    /// Resets each host's guard state (a fresh run: nothing remembered from the last).
    pub fn wipe_hosts(&self) -> anyhow::Result<()> {
        for m in &self.machines {
            for sub in ["qemu", "state"] {
                let p = m.dir.join(sub);
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p)?;
            }
        }
        Ok(())
    }
}

impl Fleet {
    /// Everything gone: the processes, PostgreSQL, the network. The campaign calls it at its
    /// end, since the BMCs' server holds the fleet too (dropping the campaign's handle is
    /// not the last).
    pub fn shutdown(&mut self) {
        self.stop_all();
        if self.postgres.up {
            let _ = self.postgres.crash();
        }
        self.network.remove();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}
