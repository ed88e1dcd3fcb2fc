//! Guards talking to each other, for the self-fence's quorum rule ([`crate::isolation`]).
//!
//! The provisioner hands every guard its peers — the cell's other watched hosts with an
//! address — and, for each, a key only the two hosts share (guard API `peers`, or the database
//! itself). The list is cached on disk (`state_dir/peers.json`), so it is at hand exactly when
//! the provisioner is not.
//!
//! One exchange, `POST /peer/v1/check` on the cell-wide peer port: the asker sends its name,
//! a fresh nonce and whether it wants its heartbeat relayed, under an HMAC with the pair's key;
//! the peer answers whether it reaches the controller and whether it relayed, under an HMAC
//! bound to that nonce. Neither side can be impersonated by a third host, an answer cannot be
//! replayed into another round, and a request cannot be replayed to keep a dead host alive
//! (the peer remembers the nonces it saw, and refuses requests stamped more than
//! [`MAX_SKEW`] from its own clock).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nodekeeper_store::guard_api::{mac_hex, mac_ok, PeerList};
use nodekeeper_store::HostName;
use serde::{Deserialize, Serialize};

use crate::isolation::PeerView;

/// How far a check's stamp may be from the answering peer's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(600);
/// How long one peer may take to answer.
pub const ASK_TIMEOUT: Duration = nodekeeper_store::guard_api::PEER_ASK_TIMEOUT;

/// `POST /peer/v1/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// The asking host.
    pub from: HostName,
    /// The host asked.
    pub to: HostName,
    /// Fresh per request (hex).
    pub nonce: String,
    /// The asker's clock, ms since the epoch (only to refuse replays of old requests).
    pub at: i64,
    /// Relay the asker's heartbeat to the controller.
    pub relay: bool,
    /// HMAC-SHA256 of the above under the pair's key (hex).
    pub mac: String,
}

impl Check {
    fn message(&self) -> String {
        format!("check|{}|{}|{}|{}|{}", self.from, self.to, self.nonce, self.at, self.relay)
    }
}

/// The answer to a [`Check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The answering host reaches the controller (its own last heartbeat went through).
    pub controller_ok: bool,
    /// It relayed the asker's heartbeat.
    pub relayed: bool,
    /// HMAC-SHA256 under the pair's key, bound to the check's nonce (hex).
    pub mac: String,
}

fn answer_message(check: &Check, controller_ok: bool, relayed: bool) -> String {
    format!("answer|{}|{}|{}|{controller_ok}|{relayed}", check.to, check.from, check.nonce)
}

/// The cached peer list (`state_dir/peers.json`).
#[derive(Debug, Clone)]
pub struct PeerCache {
    path: PathBuf,
    list: Arc<Mutex<PeerList>>,
}

impl PeerCache {
    /// The cache in `state_dir`, with what it held (nothing if missing or unreadable).
    pub fn load(state_dir: &Path) -> PeerCache {
        let path = state_dir.join("peers.json");
        let list = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        PeerCache { path, list: Arc::new(Mutex::new(list)) }
    }

    /// The list as it stands.
    pub fn get(&self) -> PeerList {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the list, on disk (crash-safe) when it changed.
    pub fn set(&self, list: PeerList) {
        let mut cur = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == list {
            return;
        }
        match serde_json::to_vec(&list) {
            Ok(bytes) => {
                if let Err(e) = crate::fsutil::write_atomic(&self.path, &bytes) {
                    tracing::warn!("caching the peer list in {}: {e:#}", self.path.display());
                }
            }
            Err(e) => tracing::warn!("caching the peer list: {e}"),
        }
        tracing::info!(cell = list.cell_size, peers = list.peers.len(), "peer list updated");
        *cur = list;
    }

    fn key_of(&self, host: &HostName) -> Option<String> {
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .peers
            .iter()
            .find(|p| &p.host == host)
            .map(|p| p.key.clone())
    }
}

/// What the answering side needs: who it is, whether it reaches the controller, and how to
/// relay a peer's heartbeat.
pub struct Responder {
    /// This host.
    pub host: HostName,
    /// Its peers and their keys.
    pub cache: PeerCache,
    /// Whether this host reaches the controller now.
    pub controller_ok: Box<dyn Fn() -> bool + Send + Sync>,
    /// Relays `host`'s heartbeat (through this host's own connection to the controller).
    pub relay: Box<dyn Fn(HostName) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + Send + Sync>,
    /// Nonces seen lately (replays are refused).
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Responder {
    /// A responder for `host`.
    pub fn new(
        host: HostName,
        cache: PeerCache,
        controller_ok: Box<dyn Fn() -> bool + Send + Sync>,
        relay: Box<dyn Fn(HostName) -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + Send + Sync>,
    ) -> Responder {
        Responder { host, cache, controller_ok, relay, seen: Mutex::default() }
    }

    /// Whether `nonce` is new (and remembers it; at most 8,192, the oldest forgotten first —
    /// a request older than [`MAX_SKEW`] is refused by its stamp; one replayed within it after
    /// 8,192 newer checks could only make this host relay the asker's heartbeat once more).
    fn fresh(&self, nonce: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *seen;
        if !set.insert(nonce.to_owned()) {
            return false;
        }
        order.push_back(nonce.to_owned());
        while order.len() > 8192 {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }
}

/// Serves peer checks on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    responder: Arc<Responder>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/peer/v1/check", axum::routing::post(check))
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .with_state(responder);
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

async fn check(State(r): State<Arc<Responder>>, body: axum::body::Bytes) -> Response {
    let Ok(c) = serde_json::from_slice::<Check>(&body) else {
        return (StatusCode::BAD_REQUEST, "invalid check\n").into_response();
    };
    // Every refusal is the same 403: nothing tells a prober which part was wrong.
    let refuse = || (StatusCode::FORBIDDEN, "refused\n").into_response();
    if c.to != r.host || c.nonce.len() < 16 || c.nonce.len() > 64 {
        return refuse();
    }
    let Some(key) = r.cache.key_of(&c.from) else { return refuse() };
    if !mac_ok(key.as_bytes(), &c.message(), &c.mac) {
        return refuse();
    }
    let skew = (nodekeeper_store::Timestamp::now().0 - c.at).unsigned_abs();
    if skew > MAX_SKEW.as_millis() as u64 || !r.fresh(&c.nonce) {
        tracing::warn!(peer = %c.from, "a peer check stamped {skew} ms from this host's clock, or replayed: refused");
        return refuse();
    }
    let controller_ok = (r.controller_ok)();
    let mut relayed = false;
    if c.relay && controller_ok {
        match tokio::time::timeout(ASK_TIMEOUT, (r.relay)(c.from.clone())).await {
            Ok(Ok(())) => {
                relayed = true;
                tracing::info!(peer = %c.from, "relayed the heartbeat of a peer that cannot reach the controller");
            }
            Ok(Err(e)) => tracing::warn!(peer = %c.from, "relaying its heartbeat: {e:#}"),
            Err(_) => tracing::warn!(peer = %c.from, "relaying its heartbeat: no answer in time"),
        }
    }
    let mac = mac_hex(key.as_bytes(), &answer_message(&c, controller_ok, relayed));
    Json(Answer { controller_ok, relayed, mac }).into_response()
}

/// Asks up to `sample` peers (chosen at random) at once, each on `port`, and counts the
/// authenticated answers. `relay`: ask them to relay this host's heartbeat.
pub async fn ask(
    me: &HostName,
    list: &PeerList,
    port: u16,
    sample: usize,
    relay: bool,
    client: &reqwest::Client,
) -> PeerView {
    let mut peers: Vec<_> = list.peers.iter().collect();
    // A random rotation: enough to spread the load of a cell-wide outage over all peers when
    // each asks only a sample, and no dependency for it.
    if !peers.is_empty() {
        let r = uuid::Uuid::new_v4().as_u128();
        let rot = (r % peers.len() as u128) as usize;
        peers.rotate_left(rot);
    }
    peers.truncate(sample.max(1));
    let asks = peers.iter().map(|p| {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut c = Check {
            from: me.clone(),
            to: p.host.clone(),
            nonce,
            at: nodekeeper_store::Timestamp::now().0,
            relay,
            mac: String::new(),
        };
        c.mac = mac_hex(p.key.as_bytes(), &c.message());
        let url = format!("http://{}/peer/v1/check", SocketAddr::new(p.address, port));
        let (key, counted) = (p.key.clone(), p.counted);
        async move {
            let sent = client.post(&url).timeout(ASK_TIMEOUT).json(&c).send().await.ok()?;
            if !sent.status().is_success() {
                return None;
            }
            let a: Answer = sent.json().await.ok()?;
            mac_ok(key.as_bytes(), &answer_message(&c, a.controller_ok, a.relayed), &a.mac).then_some((a, counted))
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut view = PeerView { asked: peers.len(), ..PeerView::default() };
    for (a, counted) in answers.into_iter().flatten() {
        // A suspect peer's answer does not count towards the majority (it is not in the
        // cell's size); whether it reaches the controller or relayed still does.
        view.answered += usize::from(counted);
        view.reach_controller += usize::from(a.controller_ok);
        view.relayed |= a.relayed;
    }
    view
}
