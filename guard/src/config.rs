//! The guard's configuration file (contract: "Guard boot" in DESIGN.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use nodekeeper_store::HostName;
use serde::{Deserialize, Deserializer};

/// `/etc/nodekeeper/guard.toml`, typed. Unknown keys are refused so a typo cannot silently
/// fall back to a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's name in the database's host table.
    pub host: HostName,
    /// `postgres://…` or `sqlite:///path/to.db`; or the provisioner's guard API,
    /// `http://PROVISIONER:PORT`, when the database cannot be opened from this host (the
    /// embedded SQLite).
    pub database_url: String,
    /// With an `http(s)://` `database_url`: the file holding this host's node token (written
    /// at first boot, or by `nodekeeper-provisioner host token`).
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// With an `https://` `database_url`: the only CA the provisioner's certificate may chain
    /// to (PEM; written at first boot from the deploy's config block). Without it, the public
    /// CAs of the Mozilla root store are trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where libvirt keeps its persistent definitions.
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    /// The boot-time pass.
    #[serde(default)]
    pub boot: BootConfig,
    /// The service (`watch`).
    #[serde(default)]
    pub watch: WatchConfig,
}

/// `[watch]`: the guard as a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// How often to heartbeat into the database.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often to converge the local domains on what the database assigns.
    #[serde(with = "humantime_serde")]
    pub converge_interval: Duration,
    /// How long an instance held by a drain may take to shut down cleanly before it is
    /// destroyed (default 2 min).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Without the database (and every peer) this long, stop the HA instances (self-fence).
    /// Must be shorter than the controller's `grace`, with room for a heartbeat interval.
    #[serde(with = "humantime_serde")]
    pub isolation_timeout: Duration,
    /// No longer used (a bare TCP connect proved nothing): the peers are the cell's other
    /// hosts, handed out by the provisioner. Accepted, with a warning, so old configs load.
    pub peers: Vec<String>,
    /// Where this guard answers its peers' checks (`IP:PORT`; default `0.0.0.0:7443`; `off`:
    /// nowhere — then its peers count it as unreachable).
    #[serde(deserialize_with = "peer_listen")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The port the cell's guards listen on, used to reach every peer (default 7443).
    pub peer_port: u16,
    /// How many peers a cut-off guard asks at once (default 16): all of a small cell; in a
    /// large one, a random sample, so a cell-wide outage does not make every host ask every
    /// other.
    pub peer_sample: usize,
    /// How often the peer list is fetched again (default 60 s).
    #[serde(with = "humantime_serde")]
    pub peer_refresh: Duration,
    /// Self-fence at all (default true).
    pub self_fence: bool,
    /// How long a libvirt call may take before libvirtd counts as stuck.
    #[serde(with = "humantime_serde")]
    pub libvirt_timeout: Duration,
    /// The command that restarts libvirtd (argv), e.g. `["systemctl", "restart", "libvirtd"]`;
    /// empty: never restart it.
    pub libvirt_restart: Vec<String>,
    /// The command that kills a stuck libvirtd (argv), run before the restart.
    pub libvirt_kill: Vec<String>,
    /// Restarts within `restart_window` before the host reboots (0: never reboot).
    pub max_restarts: u32,
    /// The window for `max_restarts`.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// The command that reboots the host (argv).
    pub reboot: Vec<String>,
    /// The command that restarts the guard's service (argv), run last by `repair` (the
    /// provisioner's repair over SSH before a power-cycle); empty: not restarted.
    pub guard_restart: Vec<String>,
    /// Other services the host must run, checked every `converge_interval`
    /// (`[[watch.services]]`).
    pub services: Vec<ServiceCheck>,
    /// The hardware watchdog to arm (`/dev/watchdog`; softdog where there is none): pinged
    /// only while the guard's loops are healthy, so a hung host (or guard) reboots once the
    /// driver's timeout runs out. Disarmed on a clean stop. Off when absent.
    pub hardware_watchdog: Option<PathBuf>,
    /// The hardware watchdog's timeout, set when it is armed (`WDIOC_SETTIMEOUT`; the driver
    /// may round it, and the guard reports what it reads back). Unset: the driver's own.
    /// With a self-fence, a guard whose watchdog's timeout is known reports it, and the
    /// controller may then fence the host by waiting it out when its BMC is gone (watchdog
    /// fencing, docs/watchdog-fencing.md).
    #[serde(with = "humantime_serde")]
    pub watchdog_timeout: Option<Duration>,
}

/// `[[watch.services]]`: a service checked by a command or an HTTP GET. Dead (the check fails)
/// → `restart`; stuck (no answer within `timeout`) → `kill`, then `restart`; more than
/// `max_restarts` within `restart_window` → the host reboots (once, shared with libvirtd's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCheck {
    /// For logs.
    pub name: String,
    /// A command (argv) that exits 0 while the service is healthy.
    #[serde(default)]
    pub check: Vec<String>,
    /// Or an `http://HOST:PORT/PATH` that answers 2xx while it is healthy.
    #[serde(default)]
    pub http: Option<String>,
    /// How long the check may take.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Restarts it (argv).
    pub restart: Vec<String>,
    /// Kills it when stuck (argv), before the restart.
    #[serde(default)]
    pub kill: Vec<String>,
    /// Rejuvenation: a graceful `restart` this often even while healthy (off when absent).
    #[serde(default, with = "humantime_serde")]
    pub rejuvenate_every: Option<Duration>,
}

fn default_token_file() -> PathBuf {
    PathBuf::from("/etc/nodekeeper/node-token")
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(5)
}

fn peer_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("peer_listen {s:?}: {e} (IP:PORT or \"off\")")))
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            converge_interval: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(120),
            isolation_timeout: Duration::from_secs(20),
            peers: Vec::new(),
            peer_listen: Some(std::net::SocketAddr::from(([0, 0, 0, 0], 7443))),
            peer_port: 7443,
            peer_sample: 16,
            peer_refresh: Duration::from_secs(60),
            self_fence: true,
            libvirt_timeout: Duration::from_secs(15),
            libvirt_restart: vec!["systemctl".into(), "restart".into(), "libvirtd".into()],
            libvirt_kill: vec!["pkill".into(), "-KILL".into(), "-x".into(), "libvirtd".into()],
            max_restarts: 3,
            restart_window: Duration::from_secs(600),
            reboot: vec!["systemctl".into(), "reboot".into()],
            guard_restart: vec!["systemctl".into(), "restart".into(), "nodekeeper-guard".into()],
            services: Vec::new(),
            hardware_watchdog: None,
            watchdog_timeout: None,
        }
    }
}

/// `[libvirt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Persistent domain XMLs; `autostart/` below it holds the autostart links.
    pub config_dir: PathBuf,
    /// The libvirt URI for the pass after libvirtd is up (`boot --post-libvirt`).
    pub uri: String,
    /// The URI this host's libvirtd answers its peers on (`qemu+tcp://ADDR/system`,
    /// `qemu+ssh://…`, `qemu+tls://…`): a drain live-migrates an instance with shared storage
    /// between two hosts that announce one; the migration's data goes to the same address.
    /// Unset (the default): this host neither sends nor takes live migrations.
    pub migration_uri: Option<String>,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self { config_dir: PathBuf::from("/etc/libvirt/qemu"), uri: "qemu:///system".into(), migration_uri: None }
    }
}

/// The address a live migration's data goes to: `tcp://HOST` of a libvirt URI
/// `DRIVER+TRANSPORT://[USER@]HOST[:PORT]/PATH`. `None` when it names no host.
pub fn migration_data_uri(libvirt_uri: &str) -> Option<String> {
    let (_, rest) = libvirt_uri.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        format!("[{}]", v6.split(']').next()?)
    } else {
        host_port.split(':').next()?.to_owned()
    };
    let ok = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    ok.then(|| format!("tcp://{host}"))
}

/// `[boot]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// Local cache, `quarantine/`, `blocked/`, and the journal of unfinished moves.
    pub state_dir: PathBuf,
    /// How long to retry the database before applying `on_db_unreachable`.
    #[serde(with = "humantime_serde")]
    pub db_wait: Duration,
    /// What to block when the database cannot be asked.
    pub on_db_unreachable: OnDbUnreachable,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/nodekeeper"),
            db_wait: Duration::from_secs(30),
            on_db_unreachable: OnDbUnreachable::BlockHa,
        }
    }
}

/// Policy when the database is unreachable (or does not know this host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDbUnreachable {
    /// Move aside the autostart links of HA domains (they may have been recovered elsewhere).
    BlockHa,
    /// Move aside every autostart link.
    BlockAll,
    /// Block nothing: libvirtd autostarts as usual.
    Allow,
}

/// The configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("reading config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and position).
        message: String,
    },
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })?;
        if is_api_url(&config.database_url) {
            // Without its token the guard could never be heard: that is a broken install,
            // not an outage.
            read_token(&config.token_file)
                .map_err(|e| ConfigError::Parse { path: path.into(), message: format!("token_file: {e:#}") })?;
            if let Some(ca) = &config.ca_file {
                read_ca(ca)
                    .map_err(|e| ConfigError::Parse { path: path.into(), message: format!("ca_file: {e:#}") })?;
            }
        }
        Ok(config)
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        if is_api_url(&config.database_url) {
            let u = config.database_url.split_once("://").map_or("", |(_, rest)| rest);
            if u.is_empty() || u.starts_with('/') || u.contains(['?', '#', ' ']) {
                return Err(format!("database_url {:?}: expected http(s)://HOST[:PORT][/PATH]", config.database_url));
            }
            if !config.token_file.is_absolute() {
                return Err("token_file must be an absolute path".into());
            }
            if config.ca_file.as_ref().is_some_and(|c| !c.is_absolute()) {
                return Err("ca_file must be an absolute path".into());
            }
            if config.ca_file.is_some() && !config.database_url.starts_with("https://") {
                return Err(format!("ca_file is set but database_url {:?} is not https://", config.database_url));
            }
        } else {
            nodekeeper_store::DatabaseUrl::parse(&config.database_url).map_err(|e| e.to_string())?;
        }
        if !config.boot.state_dir.is_absolute() || !config.libvirt.config_dir.is_absolute() {
            return Err("libvirt.config_dir and boot.state_dir must be absolute paths".into());
        }
        if let Some(u) = &config.libvirt.migration_uri {
            if migration_data_uri(u).is_none() || u.contains(char::is_whitespace) {
                return Err(format!(
                    "libvirt.migration_uri {u:?}: expected a remote libvirt URI such as qemu+tcp://ADDRESS/system"
                ));
            }
        }
        let w = &config.watch;
        if w.heartbeat_interval.is_zero() || w.converge_interval.is_zero() || w.libvirt_timeout.is_zero() {
            return Err("watch intervals and timeouts must be more than zero".into());
        }
        if w.isolation_timeout <= w.heartbeat_interval * 2 {
            return Err("watch.isolation_timeout must exceed two heartbeat intervals".into());
        }
        if w.hardware_watchdog.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err("watch.hardware_watchdog must be an absolute path".into());
        }
        if let Some(t) = w.watchdog_timeout {
            if w.hardware_watchdog.is_none() {
                return Err("watch.watchdog_timeout is set but watch.hardware_watchdog is not".into());
            }
            if t <= w.heartbeat_interval * 2 || t.subsec_nanos() != 0 {
                return Err("watch.watchdog_timeout must be whole seconds, more than two heartbeat intervals".into());
            }
        }
        for svc in &w.services {
            if svc.check.is_empty() == svc.http.is_none() {
                return Err(format!("watch.services {:?}: give exactly one of check and http", svc.name));
            }
            if svc.http.as_deref().is_some_and(|u| !u.starts_with("http://")) {
                return Err(format!("watch.services {:?}: http must be an http:// URL", svc.name));
            }
            if svc.restart.is_empty() {
                return Err(format!("watch.services {:?}: restart is required", svc.name));
            }
        }
        Ok(config)
    }
}

/// Whether a `database_url` names the provisioner's guard API rather than a database.
pub fn is_api_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// Reads a node token file: one line, 32 to 128 of `[A-Za-z0-9_-]`.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the node token {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        nodekeeper_store::guard_api::valid_token(token),
        "{}: not a node token (32 to 128 of [A-Za-z0-9_-])",
        path.display()
    );
    Ok(token.to_owned())
}

/// Reads the CA a guard trusts for an `https://` guard API (PEM, one certificate or more).
pub fn read_ca(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).with_context(|| format!("reading the CA {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("{}: not PEM", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate in it", path.display());
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_example_parses() {
        let c = Config::parse(
            r#"
host = "node-a"
database_url = "postgres://nodekeeper@db/nodekeeper"
[libvirt]
config_dir = "/etc/libvirt/qemu"
[boot]
state_dir = "/var/lib/nodekeeper"
db_wait = "30s"
on_db_unreachable = "block-ha"
"#,
        )
        .expect("contract example");
        assert_eq!(c.host.as_str(), "node-a");
        assert_eq!(c.boot.db_wait, Duration::from_secs(30));
        assert_eq!(c.boot.on_db_unreachable, OnDbUnreachable::BlockHa);
        assert_eq!(c.libvirt.uri, "qemu:///system");
    }

    #[test]
    fn a_migration_uri_gives_the_address_of_the_migration_data() {
        let d = |u: &str| migration_data_uri(u);
        assert_eq!(d("qemu+tcp://10.0.0.3/system").as_deref(), Some("tcp://10.0.0.3"));
        assert_eq!(d("qemu+ssh://root@node-b.example:2222/system").as_deref(), Some("tcp://node-b.example"));
        assert_eq!(d("qemu+tls://[fd00::3]:16514/system").as_deref(), Some("tcp://[fd00::3]"));
        assert_eq!(d("qemu:///system"), None);
        assert_eq!(d("qemu+tcp://a b/system"), None);
        assert_eq!(d("no uri"), None);
    }

    #[test]
    fn defaults_apply_and_bad_configs_are_named() {
        let c = Config::parse("host = \"n1\"\ndatabase_url = \"sqlite:///tmp/x.db\"\n").expect("minimal");
        assert_eq!(c.boot.state_dir, PathBuf::from("/var/lib/nodekeeper"));
        assert_eq!(c.libvirt.config_dir, PathBuf::from("/etc/libvirt/qemu"));
        let cases = [
            ("database_url = \"sqlite:///x\"", "missing field `host`"),
            ("host = \"n1\"\ndatabase_url = \"sqlite:///x\"\nhots = 1", "unknown field `hots`"),
            ("host = \"n1\"\ndatabase_url = \"sqlite:///x\"\n[boot]\ndb_wait = \"soon\"", "expected a duration"),
            (
                "host = \"n1\"\ndatabase_url = \"sqlite:///x\"\n[boot]\non_db_unreachable = \"panic\"",
                "unknown variant `panic`",
            ),
            ("host = \"n 1\"\ndatabase_url = \"sqlite:///x\"", "invalid host name"),
            ("host = \"n1\"\ndatabase_url = \"mysql://x\"", "unsupported scheme"),
            ("host = \"n1\"\ndatabase_url = \"sqlite:///x\"\n[boot]\nstate_dir = \"rel\"", "absolute"),
            ("host = [", "invalid"),
            (
                "host = \"n1\"\ndatabase_url = \"sqlite:///x\"\n[libvirt]\nmigration_uri = \"qemu:///system\"",
                "migration_uri",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn watch_settings_are_checked() {
        let base = "host = \"a\"\ndatabase_url = \"sqlite:///tmp/x.db\"\n";
        let c = Config::parse(base).expect("defaults");
        assert_eq!(
            (c.watch.heartbeat_interval, c.watch.isolation_timeout),
            (Duration::from_secs(5), Duration::from_secs(20))
        );
        for (extra, want) in [
            ("[watch]\nisolation_timeout = \"8s\"\n", "two heartbeat intervals"),
            ("[[watch.services]]\nname = \"x\"\nrestart = [\"r\"]\n", "exactly one of check and http"),
            (
                "[[watch.services]]\nname = \"x\"\ncheck = [\"true\"]\nhttp = \"http://a/\"\nrestart = [\"r\"]\n",
                "exactly one",
            ),
            ("[[watch.services]]\nname = \"x\"\nhttp = \"https://a/\"\nrestart = [\"r\"]\n", "http:// URL"),
            ("[[watch.services]]\nname = \"x\"\ncheck = [\"true\"]\nrestart = []\n", "restart is required"),
            ("[watch]\nheartbeat = \"1s\"\n", "unknown field"),
            ("[watch]\nhardware_watchdog = \"dev/watchdog\"\n", "hardware_watchdog must be an absolute path"),
            ("[watch]\nwatchdog_timeout = \"60s\"\n", "hardware_watchdog is not"),
            ("[watch]\nhardware_watchdog = \"/dev/watchdog\"\nwatchdog_timeout = \"9s\"\n", "two heartbeat intervals"),
            ("[watch]\nhardware_watchdog = \"/dev/watchdog\"\nwatchdog_timeout = \"20500ms\"\n", "whole seconds"),
        ] {
            let err = Config::parse(&format!("{base}{extra}")).expect_err(extra);
            assert!(err.contains(want), "{extra}: {err}");
        }
        let ok = Config::parse(&format!(
            "{base}[[watch.services]]\nname = \"ovs\"\ncheck = [\"true\"]\nrestart = [\"r\"]\nrejuvenate_every = \"1d\"\n"
        ))
        .expect("a service");
        assert_eq!(ok.watch.services[0].rejuvenate_every, Some(Duration::from_secs(86_400)));
        assert_eq!(ok.watch.services[0].timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_provisioners_guard_api_needs_a_readable_token() {
        let dir = tempfile::tempdir().expect("dir");
        let token = dir.path().join("node-token");
        let config = dir.path().join("guard.toml");
        let text =
            format!("host = \"a\"\ndatabase_url = \"http://10.20.0.1:8080\"\ntoken_file = \"{}\"\n", token.display());
        std::fs::write(&config, &text).expect("config");
        let c = Config::parse(&text).expect("an API URL parses");
        assert_eq!(c.token_file, token);
        let err = Config::load(&config).expect_err("no token file").to_string();
        assert!(err.contains("token_file"), "{err}");
        std::fs::write(&token, "short\n").expect("token");
        assert!(Config::load(&config).is_err(), "a malformed token");
        std::fs::write(&token, format!("{}\n", "t".repeat(40))).expect("token");
        Config::load(&config).expect("a good token");
        let default = Config::parse("host = \"a\"\ndatabase_url = \"https://prov.example/nk\"\n").expect("https");
        assert_eq!(default.token_file, PathBuf::from("/etc/nodekeeper/node-token"));
        for (url, want) in [("http://", "expected http"), ("http://a/?x=1", "expected http")] {
            let err = Config::parse(&format!("host = \"a\"\ndatabase_url = \"{url}\"\n")).expect_err(url);
            assert!(err.contains(want), "{url}: {err}");
        }
        let rel = "host = \"a\"\ndatabase_url = \"http://p:1\"\ntoken_file = \"tok\"\n";
        assert!(Config::parse(rel).expect_err("relative").contains("absolute"));
    }
}
