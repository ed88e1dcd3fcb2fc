//! `nodekeeper-provisioner serve`: the network-boot servers in one tokio runtime, on the
//! configured addresses only, stopped cleanly by SIGTERM or SIGINT.

/// The config file (a leaf module of its own; here for the paths callers know).
pub use crate::config;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nodekeeper_store::{ConnectOptions, Store};
use tokio_util::sync::CancellationToken;

use crate::http::{self, images::Images, HttpState};
use crate::metrics::Metrics;
use config::{DhcpMode, ServeConfig};

/// How often the reimage executor looks at its operations.
const REIMAGE_TICK: Duration = Duration::from_secs(1);
/// How long in-flight work may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// The sockets of a provisioner, bound (so a test can bind port 0 and read the address).
#[derive(Debug)]
pub struct Bound {
    /// HTTP.
    pub http: tokio::net::TcpListener,
    /// HTTPS, when `[http.tls]` is set.
    pub https: Option<tokio::net::TcpListener>,
    /// TFTP, when configured.
    pub tftp: Option<tokio::net::UdpSocket>,
    /// DHCP, unless `mode = "off"`.
    pub dhcp: Option<crate::dhcp::Sockets>,
}

impl Bound {
    /// Binds every configured server's socket.
    pub async fn bind(config: &ServeConfig) -> anyhow::Result<Bound> {
        let http = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding HTTP on {}", config.http.listen))?;
        let https = match &config.http.tls {
            Some(tls) => Some(
                tokio::net::TcpListener::bind(tls.listen)
                    .await
                    .with_context(|| format!("binding HTTPS on {}", tls.listen))?,
            ),
            None => None,
        };
        let tftp = match config.tftp.listen {
            Some(addr) => {
                Some(tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("binding TFTP on {addr}"))?)
            }
            None => None,
        };
        let dhcp = match config.dhcp.mode {
            DhcpMode::Off => None,
            mode => {
                let interface = config.dhcp.interface.as_deref().unwrap_or_default();
                let port = config.dhcp.port.unwrap_or(67);
                Some(crate::dhcp::bind(interface, port, mode == DhcpMode::Proxy)?)
            }
        };
        Ok(Bound { http, https, tftp, dhcp })
    }
}

/// Opens the database as a long-running service does (16 connections).
pub async fn open_store(url: &str) -> anyhow::Result<Store> {
    Ok(Store::open_for_service(url, &ConnectOptions { max_connections: 16, ..Default::default() }).await?)
}

/// Runs the servers on `bound` until `shutdown` is cancelled, then waits for them to drain.
/// Each component runs under a supervisor ([`supervise`]): one that ends or fails — DHCP whose
/// leases could not be read, TFTP whose root is missing, a panic — is marked down in
/// `/healthz` and started again with backoff (sockets bound anew), never left dead silently.
pub async fn run(config: ServeConfig, bound: Bound, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(crate::health::Health::default());
    std::fs::create_dir_all(&config.http.images_dir)
        .with_context(|| format!("creating {}", config.http.images_dir.display()))?;
    let images = Arc::new(
        Images::new(&config.http.images_dir)
            .with_context(|| format!("opening {}", config.http.images_dir.display()))?,
    );
    {
        let images = images.clone();
        tokio::task::spawn_blocking(move || images.warm());
    }
    let guard_store = Store::connect_with(
        &config.database_url,
        &ConnectOptions { max_connections: 8, create_if_missing: false, ..Default::default() },
    )
    .await
    .context("opening the guard API's connection pool")?;
    let state = HttpState {
        store: store.clone(),
        config: Arc::new(config.http.clone()),
        metrics: metrics.clone(),
        images,
        health: health.clone(),
        guard_store: guard_store.clone(),
        // A guard's report must stay younger than three graces for the GC pass: a complete
        // pass at least every two graces (and a converge interval) leaves it that. Anything
        // that changes brings a pass at once; this one is the safety net.
        guard_writes: http::guard_writes::GuardWrites::start(guard_store, config.recovery.grace * 2),
        streams: Default::default(),
        tls: None,
        loaders: config.tftp.root.clone(),
        media: None,
        bmc: Arc::new(config.bmc.clone()),
    };
    let tls = match &config.http.tls {
        Some(tls) => {
            let hint = "(`nodekeeper-provisioner tls init --config FILE` makes a CA and a server certificate)";
            let server = http::tls::server_config(tls).with_context(|| format!("[http.tls] {hint}"))?;
            let nodes = http::tls::NodeTls::load(tls).with_context(|| format!("[http.tls] ca {hint}"))?;
            Some((server, Arc::new(nodes)))
        }
        None => None,
    };
    let nodes_tls = tls.as_ref().map(|(_, nodes)| (nodes.public_url.clone(), nodes.ca_sha256.clone()));
    let media = crate::reimage::vmedia::from_config(&config, nodes_tls).map(Arc::new);
    let state = HttpState { tls: tls.as_ref().map(|(_, nodes)| nodes.clone()), media: media.clone(), ..state };
    let http_addr = bound.http.local_addr()?;
    tracing::info!(listen = %http_addr, "HTTP serving");
    let mut tasks = tokio::task::JoinSet::new();
    {
        let mut listener = Some(bound.http);
        let (state, stop) = (state.clone(), shutdown.clone());
        tasks.spawn(supervise("http", health.clone(), shutdown.clone(), move || {
            let (first, state, stop) = (listener.take(), state.clone(), stop.clone());
            async move {
                let listener = match first {
                    Some(l) => l,
                    None => tokio::net::TcpListener::bind(http_addr)
                        .await
                        .with_context(|| format!("binding HTTP on {http_addr}"))?,
                };
                Ok(http::serve(listener, state, stop).await?)
            }
        }));
    }
    if let (Some(listener), Some((server, nodes))) = (bound.https, tls) {
        let addr = listener.local_addr()?;
        tracing::info!(listen = %addr, public_url = %nodes.public_url, ca_sha256 = %nodes.ca_sha256, require = nodes.require, "HTTPS serving");
        let mut listener = Some(listener);
        let (state, stop) = (state.clone(), shutdown.clone());
        tasks.spawn(supervise("https", health.clone(), shutdown.clone(), move || {
            let (first, state, stop, server) = (listener.take(), state.clone(), stop.clone(), server.clone());
            async move {
                let listener = match first {
                    Some(l) => l,
                    None => {
                        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding HTTPS on {addr}"))?
                    }
                };
                let listener = http::tls::TlsListener::new(listener, server)?;
                Ok(http::serve_tls(listener, state, stop).await?)
            }
        }));
    }
    if let (Some(socket), Some(root)) = (bound.tftp, config.tftp.root.clone()) {
        let addr = socket.local_addr()?;
        tracing::info!(listen = %addr, root = %root.display(), "TFTP serving");
        let mut socket = Some(socket);
        let (metrics, stop) = (metrics.clone(), shutdown.clone());
        // The images directory as `images/`, and each host's GRUB script (Secure Boot hosts).
        let scripts = http::BootScripts { store: store.clone(), config: state.config.clone(), tls: state.tls.clone() };
        let tree = crate::tftp::Tree {
            root,
            images: Some(config.http.images_dir.clone()),
            generated: Some(Arc::new(scripts)),
        };
        tasks.spawn(supervise("tftp", health.clone(), shutdown.clone(), move || {
            let (first, root, metrics, stop) = (socket.take(), tree.clone(), metrics.clone(), stop.clone());
            async move {
                let socket = match first {
                    Some(s) => s,
                    None => {
                        tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("binding TFTP on {addr}"))?
                    }
                };
                Ok(crate::tftp::serve(socket, root, metrics, stop).await?)
            }
        }));
    }

    if let Some(sockets) = bound.dhcp {
        let (settings, range) = dhcp_settings(&config)?;
        let interface = config.dhcp.interface.clone().unwrap_or_default();
        let port = config.dhcp.port.unwrap_or(67);
        tracing::info!(interface = %interface, proxy = settings.proxy, "DHCP serving");
        let mut sockets = Some(sockets);
        let (store, metrics, stop) = (store.clone(), metrics.clone(), shutdown.clone());
        tasks.spawn(supervise("dhcp", health.clone(), shutdown.clone(), move || {
            let first = sockets.take();
            let (settings, store, metrics, stop, interface) =
                (settings.clone(), store.clone(), metrics.clone(), stop.clone(), interface.clone());
            async move {
                let sockets = match first {
                    Some(s) => s,
                    None => crate::dhcp::bind(&interface, port, settings.proxy)?,
                };
                Ok(crate::dhcp::serve(sockets, settings, range, store, metrics, stop).await?)
            }
        }));
    }

    // This replica's name in leases and claims (unique among replicas).
    let holder = format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        std::process::id()
    );
    {
        let (store, stop, holder, media) = (store.clone(), shutdown.clone(), holder.clone(), media.clone());
        let (policy, scope) = (crate::bmc::Policy::from(&config.bmc), crate::bmc::CredentialScope::from(&config.bmc));
        tasks.spawn(supervise("reimage", health.clone(), shutdown.clone(), move || {
            let factory = Arc::new(crate::reimage::executor::Drivers { policy: policy.clone(), scope: scope.clone() });
            let (store, holder, stop, media) = (store.clone(), holder.clone(), stop.clone(), media.clone());
            async move {
                match media {
                    Some(media) => {
                        crate::reimage::executor::run_with_media(store, factory, media, holder, REIMAGE_TICK, stop)
                            .await
                    }
                    None => crate::reimage::executor::run(store, factory, holder, REIMAGE_TICK, stop).await,
                }
                Ok(())
            }
        }));
    }

    if config.recovery.enabled {
        tracing::info!(%holder, grace = ?config.recovery.grace, "recovery controller (runs while this replica holds the lease)");
        let (store, stop, recovery, policy, metrics) = (
            store.clone(),
            shutdown.clone(),
            config.recovery.clone(),
            crate::bmc::Policy::from(&config.bmc),
            metrics.clone(),
        );
        let scope = crate::bmc::CredentialScope::from(&config.bmc);
        tasks.spawn(supervise("recovery", health.clone(), shutdown.clone(), move || {
            let controller = crate::recovery::controller::Controller::new(
                store.clone(),
                Arc::new(crate::reimage::executor::Drivers { policy: policy.clone(), scope: scope.clone() }),
                recovery.clone(),
                holder.clone(),
            )
            .with_metrics(metrics.clone());
            let stop = stop.clone();
            async move {
                controller.run(stop).await;
                Ok(())
            }
        }));
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let drained = tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("servers did not drain within {DRAIN:?}; stopping anyway");
    }
    state.guard_store.close().await;
    store.close().await;
    Ok(())
}

/// The first pause before a component that ended is started again (doubling up to 30 s).
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Runs the component `name` (each call of `start` makes a fresh run) until `shutdown`: when
/// a run ends, fails or panics before then, the component is marked down in `health` with
/// the reason, logged, and started again after a pause that doubles from 1 s up to 30 s
/// (back to 1 s after a run that lasted a minute).
pub async fn supervise<F, Fut>(
    name: &'static str,
    health: Arc<crate::health::Health>,
    shutdown: CancellationToken,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut pause = RESTART_BACKOFF;
    loop {
        health.up(name);
        let began = tokio::time::Instant::now();
        let ended = tokio::spawn(start()).await;
        if shutdown.is_cancelled() {
            return;
        }
        let why = match ended {
            Ok(Ok(())) => "ended by itself".to_owned(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => format!("panicked: {e}"),
            Err(e) => e.to_string(),
        };
        if began.elapsed() >= Duration::from_secs(60) {
            pause = RESTART_BACKOFF;
        }
        tracing::error!(component = name, "{why}; starting it again in {pause:?}");
        health.down(name, why);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The DHCP server's settings and dynamic range, from a checked config.
fn dhcp_settings(
    config: &ServeConfig,
) -> anyhow::Result<(crate::dhcp::logic::Settings, (std::net::Ipv4Addr, std::net::Ipv4Addr))> {
    let d = &config.dhcp;
    let server_ip = d.server_ip.context("dhcp.server_ip is required")?;
    let (netmask, range) = match (&d.subnet, d.range) {
        (Some(subnet), Some(range)) => {
            let (_, prefix) = config::parse_subnet(subnet).map_err(anyhow::Error::msg)?;
            (std::net::Ipv4Addr::from(u32::MAX << (32 - prefix)), (range[0], range[1]))
        }
        // proxy mode hands out no addresses
        _ => (std::net::Ipv4Addr::new(255, 255, 255, 0), (server_ip, server_ip)),
    };
    let settings = crate::dhcp::logic::Settings {
        proxy: d.mode == DhcpMode::Proxy,
        server_ip,
        netmask,
        router: d.router,
        dns: d.dns.clone(),
        lease_secs: d.lease_time.map_or(3600, |t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX).max(60)),
        allow_unknown: d.allow_unknown,
        public_url: config.http.public_url.clone(),
        uefi_boot_file: d.uefi_boot_file.clone().unwrap_or_else(|| "ipxe.efi".into()),
    };
    Ok((settings, range))
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        token.cancel();
    });
    Ok(())
}
