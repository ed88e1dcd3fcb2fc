//! `/etc/nodekeeper/provisioner.toml` (contract: "Provisioner serve" in DESIGN.md).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole file. Unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The database.
    pub database_url: String,
    /// DHCP on the provisioning network.
    #[serde(default)]
    pub dhcp: DhcpConfig,
    /// TFTP (iPXE binaries).
    #[serde(default)]
    pub tftp: TftpConfig,
    /// HTTP (iPXE scripts, images, API).
    pub http: HttpConfig,
    /// The recovery controller (detection, fencing, evacuation).
    #[serde(default)]
    pub recovery: RecoveryConfig,
    /// How power commands are confirmed (every BMC driver).
    #[serde(default)]
    pub bmc: BmcConfig,
    /// The deploy ISOs of hosts that boot from virtual media.
    #[serde(default)]
    pub virtual_media: VirtualMediaConfig,
}

/// `[virtual_media]`: where the per-reimage deploy ISOs are written (and served from, at
/// `/vmedia/`), and the addressing the ISO gives the deploy agent of a host with a fixed
/// address (`host add --ip`) — where no DHCP of ours reaches it. A host without a fixed
/// address takes DHCP from the site's server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtualMediaConfig {
    /// The ISOs' directory (default `/var/lib/nodekeeper/vmedia`); every replica of `serve`
    /// that runs reimages must see the same one (the BMC fetches from `http.public_url`).
    pub dir: PathBuf,
    /// The prefix length of the hosts' network (default: `dhcp.subnet`'s, else 24).
    pub prefix: Option<u8>,
    /// Their default gateway (default `dhcp.router`).
    pub gateway: Option<Ipv4Addr>,
    /// Their DNS servers (default `dhcp.dns`).
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl Default for VirtualMediaConfig {
    fn default() -> Self {
        VirtualMediaConfig { dir: "/var/lib/nodekeeper/vmedia".into(), prefix: None, gateway: None, dns: None }
    }
}

/// `[bmc]`: how long a power command may take to show in the BMC's power state, how often
/// it is polled, and how many times a command the BMC accepted but did not carry out is sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BmcConfig {
    /// Wait for the state to follow one command (default 30 s).
    #[serde(with = "humantime_serde")]
    pub confirm_within: Duration,
    /// Pause between polls of the power state (default 500 ms).
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// Commands sent before giving up (default 3).
    pub commands: u32,
    /// The only directory `file:` credentials references may point into (default
    /// `$NODEKEEPER_BMC_CREDENTIALS_DIR`, else `/etc/nodekeeper/bmc`).
    pub credentials_dir: std::path::PathBuf,
    /// The prefix every `env:` credentials variable must have (default
    /// `$NODEKEEPER_BMC_CREDENTIALS_ENV_PREFIX`, else `NODEKEEPER_BMC_`).
    pub credentials_env_prefix: String,
}

/// The default directory of BMC credentials files.
pub const CREDENTIALS_DIR: &str = "/etc/nodekeeper/bmc";
/// The default prefix of BMC credentials variables.
pub const CREDENTIALS_ENV_PREFIX: &str = "NODEKEEPER_BMC_";

impl Default for BmcConfig {
    /// 30 s to confirm, polled every 500 ms, 3 commands; the credentials scope from
    /// `NODEKEEPER_BMC_CREDENTIALS_DIR` and `NODEKEEPER_BMC_CREDENTIALS_ENV_PREFIX`, else the
    /// defaults above (what the admin CLI, which reads no config file, uses too).
    fn default() -> BmcConfig {
        BmcConfig {
            confirm_within: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            commands: 3,
            credentials_dir: std::env::var_os("NODEKEEPER_BMC_CREDENTIALS_DIR")
                .map_or_else(|| CREDENTIALS_DIR.into(), Into::into),
            credentials_env_prefix: std::env::var("NODEKEEPER_BMC_CREDENTIALS_ENV_PREFIX")
                .unwrap_or_else(|_| CREDENTIALS_ENV_PREFIX.into()),
        }
    }
}

/// `full`: a DHCP server for the subnet; `proxy`: PXE answers beside another server; `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Addresses and boot options.
    Full,
    /// Boot options only (ports 67 and 4011), beside an existing DHCP server.
    Proxy,
    /// No DHCP.
    #[default]
    Off,
}

/// `[dhcp]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    /// full | proxy | off
    #[serde(default)]
    pub mode: DhcpMode,
    /// The provisioning interface; the server answers only there.
    pub interface: Option<String>,
    /// This server's address on it (next-server, server identifier).
    pub server_ip: Option<Ipv4Addr>,
    /// `10.20.0.0/24`
    pub subnet: Option<String>,
    /// First and last address handed out dynamically.
    pub range: Option<[Ipv4Addr; 2]>,
    /// Default gateway (option 3).
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Lease time (default 1h).
    #[serde(default, with = "humantime_serde")]
    pub lease_time: Option<Duration>,
    /// Also lease to MACs not in the host table.
    #[serde(default)]
    pub allow_unknown: bool,
    /// UDP port to listen on (default 67; tests use another).
    pub port: Option<u16>,
    /// The boot file of UEFI x86-64 PXE clients (default `ipxe.efi`; `snponly.efi` for NICs
    /// whose firmware driver iPXE should use). Secure Boot hosts get `shimx64.efi` instead.
    pub uefi_boot_file: Option<String>,
}

/// `[tftp]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TftpConfig {
    /// `ADDR:PORT`; no TFTP when absent.
    pub listen: Option<SocketAddr>,
    /// The read-only root.
    pub root: Option<PathBuf>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `ADDR:PORT`
    pub listen: SocketAddr,
    /// How nodes reach it (goes into iPXE scripts and kernel command lines).
    pub public_url: String,
    /// Images served under `/images/`.
    pub images_dir: PathBuf,
    /// Deploy kernel, relative to `images_dir` (default `deploy/vmlinuz`).
    #[serde(default = "default_kernel")]
    pub deploy_kernel: String,
    /// Deploy initramfs, relative to `images_dir` (default `deploy/initrd.img`).
    #[serde(default = "default_initrd")]
    pub deploy_initrd: String,
    /// Extra kernel arguments for the deploy ramdisk (default `console=ttyS0`).
    #[serde(default = "default_kernel_args")]
    pub deploy_kernel_args: String,
    /// The public half of `[recovery] repair_key` (`TYPE BASE64`), read when the config is
    /// loaded: reimaged nodes get it as their one `authorized_keys` line, limited to
    /// `nodekeeper-guard repair`. Not a config key.
    #[serde(skip)]
    pub repair_public_key: Option<String>,
    /// Event streams (`/api/v1/events/stream`) open at once; more are refused with 503
    /// (default 256): followers cannot starve the guard API.
    #[serde(default = "default_max_event_streams")]
    pub max_event_streams: usize,
    /// `[http.tls]`: the same API over HTTPS, for guards and deploy agents.
    pub tls: Option<TlsConfig>,
    /// `[http.auth]`: who may read the API, the event stream and `/metrics`.
    #[serde(default)]
    pub auth: AuthConfig,
}

/// `[http.auth]`. The admin API's writes always need an admin token of the right role; the
/// guard and deploy APIs keep their per-node tokens; boot scripts, images, `/healthz` and
/// the OpenAPI document answer anyone.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `token` (default): reads of `/api/v1`, the event stream and `/metrics` need a token
    /// (any role); `open`: they answer anyone, as before admin tokens.
    pub reads: ReadAccess,
    /// Networks that may scrape `/metrics` without a token (a Prometheus that has none), as
    /// `ADDRESS/PREFIX`: e.g. `["10.0.0.5/32", "fd00::/64"]`.
    pub metrics_from: Vec<Cidr>,
}

/// `[http.auth] reads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAccess {
    /// Reads need a token.
    #[default]
    Token,
    /// Reads answer anyone.
    Open,
}

/// A network, `ADDRESS/PREFIX` (IPv4 or IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in it (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX"))?;
        let net: std::net::IpAddr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix =
            prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?}: prefix 0 to {max}"))?;
        Ok(Cidr { net, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `[http.tls]`: an HTTPS listener serving the same routes. Nodes are pointed at it — the
/// deploy agent reports there and takes the image's digest from there (the bulk of the image
/// still streams over plain HTTP, checked against that digest), and the installed node's guard
/// and first boot use it with the CA the deploy carries in its config block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `ADDR:PORT` of the HTTPS listener.
    pub listen: SocketAddr,
    /// `https://ADDRESS:PORT`, how nodes reach it; the certificate must name ADDRESS.
    pub public_url: String,
    /// The server's certificate chain, PEM (leaf first).
    pub cert: PathBuf,
    /// The server's private key, PEM.
    pub key: PathBuf,
    /// The CA nodes are told to trust, PEM (its first certificate). `tls init` writes it, and
    /// its key beside it (`.key`), when none exists.
    pub ca: PathBuf,
    /// Refuse the guard API and deploy reports over plain HTTP (403): node tokens and deploy
    /// tokens then never cross the network in clear (default false: nodes installed before
    /// TLS was turned on keep working until reimaged).
    #[serde(default)]
    pub require: bool,
}

fn default_max_event_streams() -> usize {
    256
}

fn default_kernel() -> String {
    "deploy/vmlinuz".into()
}
fn default_initrd() -> String {
    "deploy/initrd.img".into()
}
fn default_kernel_args() -> String {
    "console=ttyS0".into()
}

/// The config file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong (names the key).
    pub message: String,
}

/// The public half of the SSH private key at `path` (`TYPE BASE64`), by `ssh-keygen -y`.
pub fn public_key_of(path: &Path) -> Result<String, String> {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("recovery.repair_key: running ssh-keygen (Debian: openssh-client): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (out.status.success(), words.next(), words.next()) {
        (true, Some(kind), Some(key)) if kind.starts_with("ssh-") || kind.starts_with("ecdsa-") => {
            Ok(format!("{kind} {key}"))
        }
        _ => Err(format!(
            "recovery.repair_key {}: not an unencrypted SSH private key ({})",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

impl ServeConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let err = |message: String| ConfigError { path: path.into(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut config = ServeConfig::parse(&text).map_err(err)?;
        if let Some(key) = &config.recovery.repair_key {
            config.http.repair_public_key = Some(public_key_of(key).map_err(err)?);
        }
        Ok(config)
    }

    /// Parses and checks config text: every key the enabled servers need is present and
    /// consistent (the range inside the subnet, the server inside the subnet, ...).
    pub fn parse(text: &str) -> Result<ServeConfig, String> {
        let c: ServeConfig = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        nodekeeper_store::DatabaseUrl::parse(&c.database_url).map_err(|e| e.to_string())?;
        url_host(&c.http.public_url).ok_or("http.public_url must be an http:// URL with a host")?;
        if let Some(tls) = &c.http.tls {
            let ok = tls.public_url.starts_with("https://") && url_host(&tls.public_url).is_some();
            if !ok {
                return Err(format!(
                    "http.tls.public_url must be an https:// URL with a host, not {:?}",
                    tls.public_url
                ));
            }
        }
        if c.dhcp.mode != DhcpMode::Off {
            let d = &c.dhcp;
            d.interface.as_deref().filter(|i| !i.is_empty()).ok_or("dhcp.interface is required")?;
            let server = d.server_ip.ok_or("dhcp.server_ip is required")?;
            if c.dhcp.mode == DhcpMode::Full {
                let (net, prefix) = parse_subnet(d.subnet.as_deref().ok_or("dhcp.subnet is required in full mode")?)?;
                let [first, last] = d.range.ok_or("dhcp.range is required in full mode")?;
                let inside = |ip: Ipv4Addr| in_subnet(ip, net, prefix);
                if !inside(first) || !inside(last) || u32::from(first) > u32::from(last) {
                    return Err(format!("dhcp.range {first}..{last} must be an ascending range inside {net}/{prefix}"));
                }
                if !inside(server) {
                    return Err(format!("dhcp.server_ip {server} is not inside {net}/{prefix}"));
                }
            }
        }
        if c.tftp.listen.is_some() && c.tftp.root.is_none() {
            return Err("tftp.root is required when tftp.listen is set".into());
        }
        if let Some(p) = c.virtual_media.prefix.filter(|p| !(8..=32).contains(p)) {
            return Err(format!("virtual_media.prefix {p}: must be 8..32"));
        }
        c.recovery.check()?;
        Ok(c)
    }

    /// The addressing a virtual-media ISO gives a host with a fixed address: the prefix,
    /// gateway and DNS of `[virtual_media]`, each defaulting to `[dhcp]`'s.
    pub fn media_addressing(&self) -> crate::reimage::vmedia::Addressing {
        let v = &self.virtual_media;
        let subnet_prefix = self.dhcp.subnet.as_deref().and_then(|s| parse_subnet(s).ok()).map(|(_, p)| p);
        crate::reimage::vmedia::Addressing {
            prefix: v.prefix.or(subnet_prefix).unwrap_or(24),
            gateway: v.gateway.or(self.dhcp.router),
            dns: v.dns.clone().unwrap_or_else(|| self.dhcp.dns.clone()),
        }
    }
}

fn url_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    let host = rest.split(['/', ':']).next()?;
    (!host.is_empty()).then_some(host)
}

/// `10.20.0.0/24` → (network, prefix length).
pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = s.split_once('/').ok_or_else(|| format!("subnet {s:?}: expected ADDRESS/PREFIX"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("subnet {s:?}: bad address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| format!("subnet {s:?}: prefix must be 8..30"))?;
    let mask = u32::MAX << (32 - prefix);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// Whether `ip` is inside `net/prefix`.
pub fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX << (32 - prefix);
    u32::from(ip) & mask == u32::from(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
database_url = "sqlite:///var/lib/nodekeeper/nodekeeper.db"
[dhcp]
mode = "full"
interface = "prov0"
server_ip = "10.20.0.1"
subnet = "10.20.0.0/24"
range = ["10.20.0.100", "10.20.0.199"]
router = "10.20.0.1"
allow_unknown = false
[tftp]
listen = "10.20.0.1:69"
root = "/var/lib/nodekeeper/tftp"
[http]
listen = "10.20.0.1:8080"
public_url = "http://10.20.0.1:8080"
images_dir = "/var/lib/nodekeeper/images"
"#;

    #[test]
    fn auth_defaults_to_tokens_and_metrics_networks_are_checked() {
        let c = ServeConfig::parse(CONTRACT).expect("contract");
        assert_eq!(c.http.auth.reads, ReadAccess::Token);
        assert!(c.http.auth.metrics_from.is_empty());
        let open = format!("{CONTRACT}[http.auth]\nreads = \"open\"\nmetrics_from = [\"10.0.0.0/8\", \"fd00::/64\"]\n");
        let c = ServeConfig::parse(&open).expect("open");
        assert_eq!(c.http.auth.reads, ReadAccess::Open);
        let [v4, v6] = c.http.auth.metrics_from[..] else { panic!("two networks") };
        assert!(
            v4.contains("10.200.0.1".parse().expect("address")) && !v4.contains("11.0.0.1".parse().expect("address"))
        );
        assert!(v4.contains("::ffff:10.1.2.3".parse().expect("address")), "IPv4-mapped");
        assert!(v6.contains("fd00::5".parse().expect("address")) && !v6.contains("fd01::5".parse().expect("address")));
        let all: Cidr = "0.0.0.0/0".parse().expect("address");
        assert!(all.contains("192.0.2.1".parse().expect("address")) && !all.contains("::1".parse().expect("address")));
        let mapped: Cidr = "::ffff:10.0.0.1/128".parse().expect("net");
        assert!(mapped.contains("::ffff:10.0.0.1".parse().expect("address")), "an IPv6 network matches as IPv6");
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "x/8", "10.0.0.0/-1"] {
            let text = format!("{CONTRACT}[http.auth]\nmetrics_from = [\"{bad}\"]\n");
            assert!(ServeConfig::parse(&text).is_err(), "{bad}");
        }
        let typo = format!("{CONTRACT}[http.auth]\nreads = \"public\"\n");
        assert!(ServeConfig::parse(&typo).is_err());
    }

    #[test]
    fn a_repair_key_is_read_for_its_public_half_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("repair_key");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "ssh-keygen (openssh-client, installed by make test)");
        let path = dir.path().join("serve.toml");
        let with = |k: &str| format!("{CONTRACT}[recovery]\nrepair_key = \"{k}\"\n");
        std::fs::write(&path, with(&key.display().to_string())).expect("write");
        let c = ServeConfig::load(&path).expect("loads");
        let public = c.http.repair_public_key.expect("the public half");
        assert!(public.starts_with("ssh-ed25519 AAAA") && public.split(' ').count() == 2, "{public}");
        let not_a_key = dir.path().join("not-a-key");
        std::fs::write(&not_a_key, "hello\n").expect("write");
        std::fs::write(&path, with(&not_a_key.display().to_string())).expect("write");
        let e = ServeConfig::load(&path).expect_err("not a key").to_string();
        assert!(e.contains("not an unencrypted SSH private key"), "{e}");
        let e = ServeConfig::parse(&with("relative/key")).expect_err("relative").to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = ServeConfig::parse(&format!("{}network_check_port = 0\n", with("/k"))).expect_err("no port");
        assert!(e.contains("network_check_port"), "{e}");
    }

    #[test]
    fn the_contract_example_parses() {
        let c = ServeConfig::parse(CONTRACT).expect("contract example");
        assert_eq!(c.dhcp.mode, DhcpMode::Full);
        assert_eq!(c.dhcp.range, Some(["10.20.0.100".parse().expect("ip"), "10.20.0.199".parse().expect("ip")]));
        assert_eq!(c.tftp.listen, Some("10.20.0.1:69".parse().expect("addr")));
        assert_eq!(c.http.deploy_kernel, "deploy/vmlinuz");
    }

    #[test]
    fn the_early_probe_defaults_to_two_missed_heartbeats_when_the_grace_allows() {
        let with = |extra: &str| ServeConfig::parse(&format!("{CONTRACT}[recovery]\n{extra}"));
        let probe = |extra: &str| with(extra).expect("config").recovery.probe_after();
        assert_eq!(probe(""), Some(Duration::from_secs(10)), "shipped defaults: grace 30 s");
        assert_eq!(probe("grace = \"8s\"\n"), None, "a short grace, as before: no early probe");
        assert_eq!(probe("grace = \"8s\"\nprobe_after = \"4s\"\n"), Some(Duration::from_secs(4)));
        assert_eq!(probe("probe_after = \"0s\"\n"), None);
        let e = with("grace = \"8s\"\nprobe_after = \"9s\"\n").expect_err("longer than the grace").to_string();
        assert!(e.contains("probe_after must be shorter"), "{e}");
    }

    #[test]
    fn inconsistent_configs_are_named() {
        let cases = [
            (CONTRACT.replace("10.20.0.199", "10.30.0.199"), "must be an ascending range inside"),
            (CONTRACT.replace("server_ip = \"10.20.0.1\"", "server_ip = \"10.9.0.1\""), "is not inside"),
            (CONTRACT.replace("interface = \"prov0\"\n", ""), "dhcp.interface is required"),
            (CONTRACT.replace("mode = \"full\"", "mode = \"relay\""), "unknown variant `relay`"),
            (CONTRACT.replace("allow_unknown", "allow_unkown"), "unknown field `allow_unkown`"),
            (CONTRACT.replace("root = \"/var/lib/nodekeeper/tftp\"\n", ""), "tftp.root is required"),
            (CONTRACT.replace("http://10.20.0.1:8080", "10.20.0.1:8080"), "http.public_url"),
            (CONTRACT.replace("10.20.0.0/24", "10.20.0.0/33"), "prefix must be"),
        ];
        for (text, want) in cases {
            let err = ServeConfig::parse(&text).expect_err(want);
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}

/// What happens to a fenced host once its instances are safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AfterFence {
    /// Power it on: it boots, its guard quarantines the stale definitions, it heartbeats.
    #[default]
    PowerOn,
    /// Reimage it with its image.
    Reimage,
    /// Leave it off and fenced for an operator.
    Nothing,
}

/// `[recovery]` in the provisioner's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Run the controller (default true).
    pub enabled: bool,
    /// Silence after which a host is suspect (default 30 s).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How often the controller looks (default 2 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Share of watched hosts suspect at once above which nothing is fenced (default 0.5).
    pub mass_failure_share: f64,
    /// What happens to a fenced host once its instances are safe (default `power-on`).
    pub after_fence: AfterFence,
    /// How long the leadership lease lasts unless renewed (default 15 s).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// BMC attempts per fence step (default 3).
    pub bmc_attempts: u32,
    /// After a fence failed (its BMC never confirmed), how long before the controller tries
    /// that host again (default 5 min); meanwhile an operator may `host mark-fenced` it.
    #[serde(with = "humantime_serde")]
    pub fence_retry_after: Duration,
    /// How often the GC pass compares the guards' reports with the database (default 30 s).
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// The port `confirm` tries on a suspect host's address, as evidence for the event
    /// (default 22; 0: no check).
    pub network_check_port: u16,
    /// Silence after which the controller asks a host's BMC for its power state, before the
    /// grace (unset: 10 s — two missed heartbeats of the guard's default 5 s — when that is
    /// shorter than the grace, else no early probe; 0: never). A host whose BMC answers `Off`
    /// is fenced at once — a crashed or unplugged host's HA instances need not wait the whole
    /// grace; one that is on but silent still does. See [`RecoveryConfig::probe_after`].
    #[serde(with = "humantime_serde")]
    pub probe_after: Option<Duration>,
    /// When the BMC cannot confirm a host off, fence it by waiting out its guard's self-fence
    /// and hardware watchdog — only for a host whose guard reported both, with an exact
    /// quorum, while a majority of its cell heartbeats (default true; docs/watchdog-fencing.md).
    pub watchdog_fencing: bool,
    /// Step a fence on as soon as each step moves it to the next (default true): once
    /// `confirm` has given the host its one more interval, power-off, evacuation and restore
    /// follow at once instead of an interval apart; a step that waits (the BMC, a repair, a
    /// watchdog's bound) or fails an attempt is taken again an interval later. `false`: one
    /// step an interval.
    pub step_through: bool,
    /// Repair before power-cycle (off when unset): the provisioner's SSH private key. A
    /// suspect host that still answers on `network_check_port` is first asked over SSH, as
    /// `repair_user`, to run the one command its `authorized_keys` allows
    /// (`nodekeeper-guard repair`: restart libvirtd and the guard); a heartbeat within
    /// `repair_wait` calls the fence off. Reimaged nodes get the matching `authorized_keys`
    /// line.
    pub repair_key: Option<PathBuf>,
    /// The user the repair logs in as (default `root`).
    pub repair_user: String,
    /// How long after the repair a heartbeat calls the fence off (default 30 s).
    #[serde(with = "humantime_serde")]
    pub repair_wait: Duration,
    /// How long a fence's evacuation goes on moving instances that start after others
    /// (restart order) as those come up, before it ends and leaves the rest to the GC pass
    /// (default 2 min).
    #[serde(with = "humantime_serde")]
    pub restart_order_wait: Duration,
    /// Requests to BMCs and PDU outlets in flight at once (default 128): power commands, the
    /// polls that confirm them, the probes of silent hosts. A row of racks that lost power is
    /// neither a wave of thousands of requests at once nor fenced a few hosts after another;
    /// a fence waiting for its host to go off holds no turn between polls. A BMC that hangs
    /// holds its turn until its request times out.
    pub bmc_at_once: usize,
    /// How long a fenced host that its fence's way back powered on again (nothing could take
    /// its HA instances then) has to boot and heartbeat (default 10 min: real servers take
    /// minutes to POST). Still silent after it while it owns HA instances, it is powered off
    /// again and left off; meanwhile, when some host could take them, it is powered off,
    /// confirmed, and they move.
    #[serde(with = "humantime_serde")]
    pub boot_within: Duration,
}

/// The early probe's default silence (two missed heartbeats of the guard's default interval).
pub const PROBE_AFTER: Duration = Duration::from_secs(10);

impl Default for RecoveryConfig {
    fn default() -> RecoveryConfig {
        RecoveryConfig {
            enabled: true,
            grace: Duration::from_secs(30),
            interval: Duration::from_secs(2),
            mass_failure_share: 0.5,
            after_fence: AfterFence::PowerOn,
            lease_ttl: Duration::from_secs(15),
            bmc_attempts: 3,
            fence_retry_after: Duration::from_secs(300),
            gc_interval: Duration::from_secs(30),
            network_check_port: 22,
            probe_after: None,
            watchdog_fencing: true,
            step_through: true,
            repair_key: None,
            repair_user: "root".into(),
            repair_wait: Duration::from_secs(30),
            restart_order_wait: Duration::from_secs(120),
            bmc_at_once: 128,
            boot_within: Duration::from_secs(600),
        }
    }
}

impl RecoveryConfig {
    /// Refuses settings that cannot work.
    pub fn check(&self) -> Result<(), String> {
        if self.grace.is_zero() || self.interval.is_zero() {
            return Err("recovery.grace and recovery.interval must be more than zero".into());
        }
        if !(self.mass_failure_share > 0.0 && self.mass_failure_share <= 1.0) {
            return Err(format!("recovery.mass_failure_share must be in (0, 1], not {}", self.mass_failure_share));
        }
        if self.lease_ttl <= self.interval * 2 {
            return Err(
                "recovery.lease_ttl must be more than twice recovery.interval (or the lease lapses between ticks)"
                    .into(),
            );
        }
        if self.boot_within.is_zero() {
            return Err("recovery.boot_within must be more than zero".into());
        }
        if self.bmc_attempts == 0 {
            return Err("recovery.bmc_attempts must be at least 1".into());
        }
        if self.repair_key.as_ref().is_some_and(|k| !k.is_absolute()) {
            return Err("recovery.repair_key must be an absolute path".into());
        }
        if self.repair_key.is_some() && self.network_check_port == 0 {
            return Err("recovery.repair_key needs recovery.network_check_port (the SSH port, 22)".into());
        }
        if self.repair_user.is_empty() || self.repair_user.starts_with('-') || self.repair_user.contains(['@', ' ']) {
            return Err(format!("recovery.repair_user {:?} is not a user name", self.repair_user));
        }
        if self.probe_after.is_some_and(|p| !p.is_zero() && p >= self.grace) {
            return Err("recovery.probe_after must be shorter than recovery.grace (or 0: no early probe)".into());
        }
        Ok(())
    }

    /// The silence after which BMCs are asked (`None`: never): the configured value, else
    /// [`PROBE_AFTER`] when it is shorter than the grace (a cell tuned to a grace of 10 s or
    /// less gets no early probe unless it asks for one).
    pub fn probe_after(&self) -> Option<Duration> {
        match self.probe_after {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => (PROBE_AFTER < self.grace).then_some(PROBE_AFTER),
        }
    }
}
