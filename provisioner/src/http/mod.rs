//! The provisioner's HTTP server (axum): iPXE scripts, images, the read-only API, health
//! and metrics. [`serve`] takes a bound listener and a shutdown token, so tests start the
//! real server in-process on port 0.

pub mod admin_api;
pub mod console;
pub mod guard_api;
pub mod guard_writes;
pub mod images;
pub mod ipxe;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use nodekeeper_store::{EventFilter, HostName, MacAddr, Store};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower_http::services::ServeFile;

use crate::config::HttpConfig;
use crate::metrics::Metrics;
use images::Images;

/// How long a deploy token minted for an iPXE script stays valid.
pub const DEPLOY_TOKEN_TTL: Duration = Duration::from_secs(3 * 3600);
/// Read size when streaming images.
const IMAGE_CHUNK: usize = 1 << 20;
pub use crate::reimage::DEFAULT_IMAGE;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The database.
    pub store: Store,
    /// `[http]` of the config.
    pub config: Arc<HttpConfig>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The images directory and its digests.
    pub images: Arc<Images>,
    /// The state of `serve`'s components, for `/healthz`.
    pub health: Arc<crate::health::Health>,
    /// The guard API's own pool: heartbeats never wait behind readers of the API or the
    /// event stream (a separate pool on the same database).
    pub guard_store: Store,
    /// The group commit of the guards' heartbeats and reports (on `guard_store`).
    pub guard_writes: guard_writes::GuardWrites,
    /// Event streams open now (capped at `max_event_streams`).
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
    /// The HTTPS listener nodes are sent to, when `[http.tls]` is set.
    pub tls: Option<Arc<tls::NodeTls>>,
    /// The boot loaders (the TFTP root, `[tftp] root`), served at `/boot/loaders/` for UEFI
    /// HTTP boot. Opened per request: a root that appears after `serve` started is served.
    pub loaders: Option<std::path::PathBuf>,
    /// The deploy ISOs of virtual media, served at `/vmedia/`.
    pub media: Option<Arc<crate::reimage::vmedia::Media>>,
    /// `[bmc]`: how the admin API's power commands are confirmed, and where BMC credentials
    /// may be read from.
    pub bmc: Arc<crate::config::BmcConfig>,
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP.
    Plain,
    /// HTTPS.
    Tls,
}

/// How long an API request may take before it is answered 408 (the event stream and image
/// downloads are not bounded: they are long by nature).
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an admin API call may take before it is answered 408.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// One open event stream, counted while it lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The routes.
pub fn router(state: HttpState) -> Router {
    // Bounded: everything but the stream and the images.
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/boot/{file}", get(boot_script))
        .route("/api/v1/hosts/{name}", get(api_host))
        .route("/api/v1/events", get(api_events))
        .route("/api/v1/hosts/{name}/deploy", axum::routing::post(api_deploy))
        .merge(guard_api::routes())
        .merge(console::routes())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, API_TIMEOUT));
    // The admin API has a bound of its own: a power command waits for its BMC to confirm
    // (3 × 30 s by default), an import may be large; cut short, a call would stop half-way.
    let admin = admin_api::routes()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, ADMIN_TIMEOUT));
    Router::new()
        .route("/images/{*path}", get(image).head(image))
        .route("/boot/loaders/{*path}", get(loader).head(loader))
        .route("/vmedia/{name}", get(vmedia).head(vmedia))
        .route("/api/v1/events/stream", get(api_events_stream))
        .route("/tls/ca.pem", get(ca_pem))
        .merge(api)
        .merge(admin)
        .layer(middleware::from_fn_with_state(state.clone(), admin_api::authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), node_apis_over_tls))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Serves plain HTTP until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = app(state, Transport::Plain, &shutdown).into_make_service_with_connect_info::<admin_api::Peer>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Serves the same routes over TLS until `shutdown` is cancelled.
pub async fn serve_tls(
    listener: tls::TlsListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = app(state, Transport::Tls, &shutdown).into_make_service_with_connect_info::<admin_api::Peer>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn app(state: HttpState, transport: Transport, shutdown: &CancellationToken) -> Router {
    // The token also ends open event streams, so a shutdown does not wait for their clients.
    router(state).layer(axum::Extension(shutdown.clone())).layer(axum::Extension(transport))
}

/// With `[http.tls] require`, the guard API and deploy reports answer only over TLS: a node
/// token or deploy token sent in clear gets 403 (and is not looked at).
async fn node_apis_over_tls(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let plain = req.extensions().get::<Transport>() != Some(&Transport::Tls);
    if plain && state.tls.as_ref().is_some_and(|t| t.require) {
        let path = req.uri().path();
        let node_api = path
            .strip_prefix("/api/v1/hosts/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, rest)| rest == "deploy" || rest.starts_with("guard/"));
        if node_api {
            let url = state.tls.as_ref().map(|t| t.public_url.as_str()).unwrap_or_default();
            return text(StatusCode::FORBIDDEN, format!("the node APIs answer only over TLS: use {url}\n"));
        }
    }
    next.run(req).await
}

/// The CA nodes trust (public: nodes check it against the digest their deploy carries).
async fn ca_pem(State(state): State<HttpState>) -> Response {
    match &state.tls {
        Some(t) => ([(header::CONTENT_TYPE, "application/x-pem-file")], t.ca_pem.clone()).into_response(),
        None => text(StatusCode::NOT_FOUND, "no TLS listener is configured\n".into()),
    }
}

async fn count_requests(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let uri = req.uri().clone(); // shares its bytes: no copy
    let response = next.run(req).await;
    if response.status() == StatusCode::NOT_FOUND {
        // What a loader asked for and did not get: the first thing to look at when a boot stops.
        tracing::debug!(route, path = uri.path(), "HTTP 404");
    }
    state.metrics.http_request(&route, response.status().as_u16());
    response
}

/// `ok` (200) when the database answers within 2 s and every component of `serve` runs;
/// otherwise 503, one line per problem (a component down since when, and why).
async fn healthz(State(state): State<HttpState>) -> Response {
    let mut problems = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Vec::new(),
        Ok(Err(e)) => vec![format!("database: {e}")],
        Err(_) => vec!["database: no answer within 2s".to_owned()],
    };
    problems.extend(state.health.problems());
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", problems.join("\n"))).into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    // The fleet's gauges, from the database, within 2 s (a database that is away is a gauge
    // of its own, not a failed scrape).
    let gauges = match tokio::time::timeout(Duration::from_secs(2), state.store.fleet_gauges()).await {
        Ok(Ok(g)) => Some(g),
        Ok(Err(e)) => {
            tracing::debug!("metrics: {e}");
            None
        }
        Err(_) => None,
    };
    let body = format!("{}{}", state.metrics.render(), crate::metrics::render_fleet(gauges.as_ref()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// A 500 that tells the client nothing of the cause (a database error can name tables,
/// hosts or a redacted URL): the cause goes to the log under an id, and the answer carries
/// only that id.
fn internal(e: impl std::fmt::Display) -> Response {
    let id = logged(&e);
    text(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error {id}: see the provisioner's log\n"))
}

/// Logs `e` under a new id and returns the id: what an answer may say instead of the cause.
pub(crate) fn logged(e: &dyn std::fmt::Display) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    tracing::error!(error_id = id, "{e}");
    id
}

/// `/boot/{mac}.ipxe`
async fn boot_script(State(state): State<HttpState>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(mac) = file.strip_suffix(".ipxe").and_then(|m| m.parse::<MacAddr>().ok()) else {
        return text(StatusCode::NOT_FOUND, "expected /boot/MAC.ipxe\n".into());
    };
    let scripts = BootScripts { store: state.store.clone(), config: state.config.clone(), tls: state.tls.clone() };
    match scripts.script(mac, ipxe::Flavor::Ipxe).await {
        Ok(Script::Known(script)) => text(StatusCode::OK, script),
        Ok(Script::UnknownMac) => {
            text(StatusCode::NOT_FOUND, format!("#!ipxe\necho nodekeeper: unknown MAC {mac}\nexit 1\n"))
        }
        Err(e) => internal(e),
    }
}

/// Over TFTP: `grub/grub.cfg` (GRUB's entry, the same for all) and `grub/nk/MAC.cfg` (the
/// host's script; an unknown MAC gets one that says so and hands back to the firmware).
impl crate::tftp::Generated for BootScripts {
    fn generate<'a>(&'a self, name: &'a str) -> Option<crate::tftp::Made<'a>> {
        if name == "grub/grub.cfg" {
            return Some(Box::pin(async { Ok(ipxe::GRUB_ENTRY.as_bytes().to_vec()) }));
        }
        let mac = name.strip_prefix("grub/nk/")?.strip_suffix(".cfg")?;
        Some(Box::pin(async move {
            let Ok(mac) = mac.parse::<MacAddr>() else {
                return Ok(b"echo 'nodekeeper: not a MAC address'\nexit\n".to_vec());
            };
            match self.script(mac, ipxe::Flavor::Grub).await {
                Ok(Script::Known(script)) => Ok(script.into_bytes()),
                Ok(Script::UnknownMac) => {
                    Ok(format!("echo 'nodekeeper: unknown MAC {mac}'\nsleep 10\nexit\n").into_bytes())
                }
                Err(e) => Err(e.to_string()),
            }
        }))
    }
}

/// What a boot-script fetch got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// The script for a known host (its deploy, or its local boot).
    Known(String),
    /// No host has this MAC.
    UnknownMac,
}

/// Makes hosts' boot scripts, for iPXE over HTTP and for GRUB over TFTP alike: the same
/// decision (deploy only for a reimage that powered the host on, until it verified) and the
/// same one-time deploy token per boot, whichever loader asks.
#[derive(Clone)]
pub struct BootScripts {
    /// The database.
    pub store: Store,
    /// `[http]` of the config.
    pub config: Arc<HttpConfig>,
    /// The HTTPS listener nodes are sent to, when `[http.tls]` is set.
    pub tls: Option<Arc<tls::NodeTls>>,
}

impl BootScripts {
    /// The script for the host with `mac`, in `flavor`. Mints (and stores the hash of) a
    /// deploy token when the host is to deploy now.
    pub async fn script(&self, mac: MacAddr, flavor: ipxe::Flavor) -> Result<Script, nodekeeper_store::StoreError> {
        let Some(host) = self.store.host_by_mac(mac).await? else { return Ok(Script::UnknownMac) };
        let boot = self.store.boot_settings(&host.name).await?;
        if flavor == ipxe::Flavor::Ipxe && boot.boot_mode == Some(nodekeeper_store::BootMode::UefiSecureBoot) {
            // Its deploy kernel is loaded by shim and GRUB; an iPXE asking (an option ROM)
            // gets no deploy token to burn.
            return Ok(Script::Known(format!(
                "#!ipxe\necho nodekeeper: {} boots with Secure Boot, through shim and GRUB: not through iPXE\nexit 1\n",
                host.name
            )));
        }
        let op = if host.state == nodekeeper_store::HostState::Reimaging {
            running_reimage_past_power_on(&self.store, &host.name).await?
        } else {
            None
        };
        let c = &self.config;
        let Some(deploy) = ipxe::deploy_for(&host, op.as_ref()) else {
            let image = crate::reimage::machine::ImageRef::new(DEFAULT_IMAGE, None);
            let params = deploy_params(c, self.tls.as_deref(), image, None);
            return Ok(Script::Known(ipxe::boot_script(&host, &params, None, flavor)));
        };
        // Which disk the agent writes (the host's root-device hint, if any).
        let root_device = boot.root_device;
        // One token per boot of this reimage, to the first fetch: it proves to the deploy API
        // that the caller booted this script. Only its hash is stored.
        let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let hash = format!("{:x}", Sha256::digest(token.as_bytes()));
        let expires = self.store.now().await? + DEPLOY_TOKEN_TTL;
        if self.store.issue_deploy_token(&host.name, &hash, expires, &deploy.boot).await? {
            let params = deploy_params(c, self.tls.as_deref(), deploy.image_ref(), root_device.as_deref());
            return Ok(Script::Known(ipxe::boot_script(&host, &params, Some(&token), flavor)));
        }
        // Someone fetched this boot's script already: the host itself retrying, or another
        // machine on the network. Nobody gets a second token.
        let message = format!(
            "{}: the deploy script of boot {} was fetched again; no second deploy token is handed out",
            host.name, deploy.boot
        );
        tracing::warn!("{message}");
        let key = format!("deploy-token-refused:{}:{}", host.name, deploy.boot);
        let event = nodekeeper_store::NewEvent::host("provisioner:http", "reimage.token_refused", &host.name, message)
            .with_key(key);
        if let Err(e) = self.store.record_event(&event).await {
            tracing::warn!("recording an event: {e}");
        }
        let said = format!("nodekeeper: the deploy token of this boot of {} was handed out already", host.name);
        Ok(Script::Known(match flavor {
            ipxe::Flavor::Ipxe => format!("#!ipxe\necho {said}\nexit 1\n"),
            ipxe::Flavor::Grub => format!("echo '{said}'\nsleep 10\nexit\n"),
        }))
    }
}

pub(crate) fn deploy_params<'a>(
    c: &'a HttpConfig,
    tls: Option<&'a tls::NodeTls>,
    image: crate::reimage::machine::ImageRef<'a>,
    root_device: Option<&'a str>,
) -> ipxe::DeployParams<'a> {
    ipxe::DeployParams {
        root_device,
        public_url: &c.public_url,
        tls: tls.map(|t| (t.public_url.as_str(), t.ca_sha256.as_str())),
        kernel: &c.deploy_kernel,
        initrd: &c.deploy_initrd,
        kernel_args: &c.deploy_kernel_args,
        image,
        repair_key: c.repair_public_key.as_deref(),
    }
}

/// How long a script fetch waits for the executor to record `power_on` (see below).
const POWER_ON_WAIT: Duration = Duration::from_secs(20);

/// `host`'s running reimage (or the latest operation, if none runs). A host that fetches
/// its script while the reimage is still at `power_on` was powered on by the executor, which
/// has not recorded the BMC's confirmation yet: the fetch waits (up to [`POWER_ON_WAIT`]) for
/// the step to move, so the host gets its deploy instead of a race-lost disk boot.
async fn running_reimage_past_power_on(
    store: &Store,
    host: &HostName,
) -> Result<Option<nodekeeper_store::Operation>, nodekeeper_store::StoreError> {
    let started = tokio::time::Instant::now();
    loop {
        let op = store.latest_operation(host).await?;
        let powering_on = op.as_ref().is_some_and(|o| {
            o.kind == crate::reimage::executor::KIND
                && o.status == nodekeeper_store::OperationStatus::Running
                && o.step == crate::reimage::machine::Step::PowerOn.as_str()
        });
        if !powering_on || started.elapsed() >= POWER_ON_WAIT {
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/images/{path}` (GET and HEAD).
async fn image(State(state): State<HttpState>, UrlPath(path): UrlPath<String>, req: Request) -> Response {
    let Ok(file) = state.images.resolve(&path) else {
        return text(StatusCode::NOT_FOUND, format!("no image {path}\n"));
    };
    let digest = {
        let (images, target) = (state.images.clone(), file.clone());
        match tokio::task::spawn_blocking(move || images.digest(&target)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return internal(format!("digest of {}: {e}", file.display())),
            Err(e) => return internal(e),
        }
    };
    let etag = format!("\"{digest}\"");
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if not_modified && matches!(*req.method(), Method::GET | Method::HEAD) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    // 1 MiB reads: tokio::fs hands each read to the blocking pool, so the default 64 KiB
    // chunks spent more time hopping threads than copying (0.7x nginx; 1 MiB: see docs).
    let served = match tower::ServiceExt::oneshot(ServeFile::new(&file).with_buf_chunk_size(IMAGE_CHUNK), req).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let mut response = served.map(Body::new);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

/// `/boot/loaders/{path}` (GET and HEAD): a file of the TFTP root (iPXE, shim, GRUB), for
/// firmware that boots over HTTP; the same confinement as the images.
async fn loader(State(state): State<HttpState>, UrlPath(path): UrlPath<String>, req: Request) -> Response {
    // As over TFTP: shim asks for `…/loaders//grubx64.efi` (its `\grubx64.efi` appended to
    // the directory of its own URL), and loaders spell paths with backslashes now and then.
    let path = path.replace('\\', "/");
    let path = path.trim_start_matches('/');
    let loaders = state.loaders.as_deref().and_then(|root| Images::new(root).ok());
    let Some(file) = loaders.and_then(|l| l.resolve(path).ok()) else {
        return text(StatusCode::NOT_FOUND, format!("no boot loader {path}\n"));
    };
    match tower::ServiceExt::oneshot(ServeFile::new(&file).with_buf_chunk_size(IMAGE_CHUNK), req).await {
        Ok(r) => r.map(Body::new),
        Err(e) => internal(e),
    }
}

/// `/vmedia/{name}` (GET and HEAD, with Range: BMCs read ISOs in pieces): a deploy ISO, only
/// while the token inside it is its host's current one — not once its reimage ended, nor after
/// a newer boot replaced it.
async fn vmedia(State(state): State<HttpState>, UrlPath(name): UrlPath<String>, req: Request) -> Response {
    let Some(media) = &state.media else { return text(StatusCode::NOT_FOUND, "no virtual media here\n".into()) };
    let file = match media.resolve(&state.store, &name).await {
        Ok(Some(file)) => file,
        Ok(None) => return text(StatusCode::NOT_FOUND, format!("no deploy ISO {name} (or its reimage ended)\n")),
        Err(e) => return internal(e),
    };
    match tower::ServiceExt::oneshot(ServeFile::new(&file).with_buf_chunk_size(IMAGE_CHUNK), req).await {
        Ok(r) => r.map(Body::new),
        Err(e) => internal(e),
    }
}

async fn api_host(State(state): State<HttpState>, UrlPath(name): UrlPath<String>) -> Response {
    let Ok(name) = name.parse::<HostName>() else {
        return text(StatusCode::BAD_REQUEST, format!("invalid host name {name:?}\n"));
    };
    match state.store.host(&name).await {
        Ok(Some(h)) => Json(h).into_response(),
        Ok(None) => text(StatusCode::NOT_FOUND, format!("unknown host {name}\n")),
        Err(e) => internal(e),
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<i64>,
    limit: Option<u32>,
    host: Option<String>,
}

async fn api_events(State(state): State<HttpState>, Query(q): Query<EventsQuery>) -> Response {
    let host = match q.host.map(|h| h.parse::<HostName>()) {
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        None => None,
    };
    let filter = EventFilter { host, instance: None, after: q.after, limit: Some(q.limit.unwrap_or(100).min(1000)) };
    match state.store.events(&filter).await {
        Ok(events) => Json(events).into_response(),
        Err(e) => internal(e),
    }
}

/// `GET /api/v1/events/stream[?after=ID][&host=NAME]`: Server-Sent Events, one per event
/// (`id:` the event's id, `event:` its kind, `data:` its JSON), in order, none skipped: from
/// `after` (or the `Last-Event-ID` a reconnecting client sends), else from now. The database
/// is polled every 500 ms; a comment keeps idle connections open.
async fn api_events_stream(
    State(state): State<HttpState>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
    shutdown: Option<axum::Extension<CancellationToken>>,
) -> Response {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use std::sync::atomic::Ordering;
    if state.streams.fetch_add(1, Ordering::SeqCst) >= state.config.max_event_streams {
        state.streams.fetch_sub(1, Ordering::SeqCst);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many event streams open (max_event_streams = {})\n", state.config.max_event_streams),
        );
    }
    let slot = StreamSlot(state.streams.clone());
    let host = match q.host.map(|h| h.parse::<HostName>()) {
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        None => None,
    };
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let after = match resume.or(q.after) {
        Some(a) => a,
        None => match state.store.last_event_id().await {
            Ok(id) => id,
            Err(e) => return internal(e),
        },
    };
    let stop = shutdown.map(|s| s.0).unwrap_or_default();
    let start = (state.store.clone(), after, std::collections::VecDeque::new(), slot);
    let stream = futures_util::stream::unfold(start, move |(store, mut after, mut queue, slot)| {
        let (host, stop) = (host.clone(), stop.clone());
        async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Some((Ok::<_, std::convert::Infallible>(e), (store, after, queue, slot)));
                }
                match store.events_after(after, host.as_ref(), 500).await {
                    Ok(batch) if !batch.is_empty() => {
                        for e in batch {
                            after = e.id;
                            let data = serde_json::to_string(&e).unwrap_or_default();
                            queue.push_back(SseEvent::default().id(e.id.to_string()).event(e.kind.clone()).data(data));
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("event stream: {e}"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// What the deploy agent posts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployReport {
    token: String,
    stage: crate::reimage::machine::AgentStage,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    /// With `up`: the node token the node made for its guard (see [`guard_api`]); stored
    /// (hashed) once the deploy token proves the report.
    #[serde(default)]
    node_token: Option<String>,
}

/// `POST /api/v1/hosts/{name}/deploy`: the deploy agent's progress and result, authenticated
/// by the host's one-time token. The token outlives `verified`: the agent leaves it in the
/// disk's config block, and the node's first boot from that disk reports `up` with it, which
/// counts as the node's first heartbeat and burns it (as does any error).
///
/// Reports are taken in order, only by the step that waits for them
/// ([`crate::reimage::machine::judge_report`]): anything else is a 409 and stores nothing (the
/// agent sends it again once the executor has moved on). `up` — which installs the node's
/// guard credential — is taken only after the executor recorded `verified` and `local_boot`.
async fn api_deploy(
    State(state): State<HttpState>,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    use crate::reimage::{executor, machine};
    let Ok(name) = name.parse::<HostName>() else {
        return text(StatusCode::BAD_REQUEST, format!("invalid host name {name:?}\n"));
    };
    let report: DeployReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("invalid report: {e}\n")),
    };
    if report
        .node_token
        .as_deref()
        .is_some_and(|t| report.stage != machine::AgentStage::Up || !nodekeeper_store::guard_api::valid_token(t))
    {
        return text(StatusCode::BAD_REQUEST, "node_token: only with \"up\", 32 to 128 of [A-Za-z0-9_-]\n".into());
    }
    let hash = format!("{:x}", Sha256::digest(report.token.as_bytes()));
    // The token is checked first and burnt only once everything the report causes is
    // recorded: a report that fails half-way (the database blinked) can be sent again.
    let last = report.error.is_some() || report.stage == machine::AgentStage::Up;
    match state.store.check_deploy_token(&name, &hash, false).await {
        Ok(true) => {}
        Ok(false) => return text(StatusCode::FORBIDDEN, "invalid or expired deploy token\n".into()),
        Err(e) => return internal(e),
    }
    let op = match state.store.latest_operation(&name).await {
        Ok(Some(op)) if op.kind == executor::KIND && op.status == nodekeeper_store::OperationStatus::Running => op,
        Ok(_) => return text(StatusCode::CONFLICT, format!("no reimage of {name} is running\n")),
        Err(e) => return internal(e),
    };
    let stored = op.report.as_deref().and_then(|r| serde_json::from_str::<machine::AgentReport>(r).ok());
    let message = match (&report.error, &report.detail) {
        (Some(e), _) => format!("deploy agent on {name}: {:?} failed: {e}", report.stage),
        (None, Some(d)) => format!("deploy agent on {name}: {:?}: {d}", report.stage),
        (None, None) => format!("deploy agent on {name}: {:?}", report.stage),
    };
    let actor = format!("agent:{name}");
    let at = match machine::judge_report(&op.step, stored.as_ref(), report.stage, report.error.is_some()) {
        machine::Verdict::Record { step } => step,
        machine::Verdict::Progress => {
            let event = nodekeeper_store::NewEvent::host(&actor, "reimage.progress", &name, message.to_lowercase());
            return match state.store.record_event(&event).await {
                Ok(()) => Json(serde_json::json!({ "operation": op.id, "step": op.step })).into_response(),
                Err(e) => internal(e),
            };
        }
        machine::Verdict::Refuse(why) => {
            tracing::warn!("{name}: deploy report {:?} refused: {why}", report.stage);
            return text(StatusCode::CONFLICT, format!("{why}\n"));
        }
    };
    if report.stage == machine::AgentStage::Up && report.error.is_none() {
        if let Some(t) = &report.node_token {
            if let Err(e) = state.store.set_node_token(&name, &guard_api::token_hash(t)).await {
                return internal(e);
            }
        }
        if let Err(e) = state.store.record_heartbeat(&name).await {
            return internal(e);
        }
    }
    let agent = machine::AgentReport { stage: report.stage, error: report.error.clone() };
    let json = serde_json::to_string(&agent).unwrap_or_default();
    let reported =
        state.store.report_operation(executor::KIND, &name, at.as_str(), &json, &message.to_lowercase(), &actor).await;
    if last && matches!(reported, Ok(Some(_))) {
        // Single use from here on (of two concurrent last reports, both were recorded alike).
        if let Err(e) = state.store.check_deploy_token(&name, &hash, true).await {
            return internal(e);
        }
    }
    match reported {
        Ok(Some(op)) => Json(serde_json::json!({ "operation": op.id, "step": op.step })).into_response(),
        Ok(None) => text(StatusCode::CONFLICT, format!("the reimage of {name} moved on meanwhile; send it again\n")),
        Err(e) => internal(e),
    }
}
