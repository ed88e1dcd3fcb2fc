//! Where the guard asks: the database itself (`postgres://`, `sqlite://`), or the
//! provisioner's guard API (`http://`, `https://`) when it cannot open the database — the
//! embedded SQLite lives on the provisioner's disk. Both answer the same questions; the
//! decisions made on the answers are the same code.

use std::time::Duration;

use anyhow::Context;
use nodekeeper_store::guard_api::{self, Assigned, GuardEvent, OwnershipQuery, PeerList, Relay};
use nodekeeper_store::{
    ConnectOptions, FencingProfile, GuardSession, HostName, InstanceId, NewEvent, Ownership, ReportedDomain, Store,
    Timestamp,
};

use crate::config::Config;

/// What a heartbeat answered of the host's revision (see [`guard_api::HeartbeatAnswer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revision {
    /// The host's revision.
    pub value: i64,
    /// The longest the guard may go without a complete pass.
    pub full_pass: Duration,
}

/// A connection to the database, direct or through the provisioner.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The database itself.
    Db(Store),
    /// PostgreSQL as a guard role (`db guard-role`): only the guard functions, for its host.
    Role(GuardSession),
    /// The provisioner's guard API.
    Api(Api),
}

/// A client of the guard API, for one host.
#[derive(Debug, Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    host: HostName,
    token: String,
}

pub use crate::config::{is_api_url, read_ca, read_token};

impl Backend {
    /// Connects within `timeout` (the API: builds a client whose every request has that
    /// budget; the first request proves the provisioner answers).
    pub async fn connect(config: &Config, timeout: Duration) -> anyhow::Result<Backend> {
        if is_api_url(&config.database_url) {
            let token = read_token(&config.token_file)?;
            let mut builder = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout);
            if let Some(ca) = &config.ca_file {
                builder = builder.tls_built_in_root_certs(false);
                for cert in read_ca(ca)? {
                    builder = builder.add_root_certificate(cert);
                }
            }
            let client = builder.build().context("building the HTTP client")?;
            let base = config.database_url.trim_end_matches('/').to_owned();
            return Ok(Backend::Api(Api { client, base, host: config.host.clone(), token }));
        }
        let opts = ConnectOptions { timeout, max_connections: 2, create_if_missing: false };
        let store = Store::connect_with(&config.database_url, &opts).await?;
        match GuardSession::open(&store).await? {
            Some(session) if session.host() != &config.host => anyhow::bail!(
                "the database role of database_url is the guard role of host {}, not of {} (this guard's host)",
                session.host(),
                config.host
            ),
            Some(session) => Ok(Backend::Role(session)),
            None => Ok(Backend::Db(store)),
        }
    }

    /// The database's schema is the one this guard was built for (the API: the provisioner
    /// checks its own).
    pub async fn check_schema(&self) -> anyhow::Result<()> {
        match self {
            Backend::Db(s) => Ok(s.check_schema().await?),
            Backend::Role(r) => Ok(r.store().check_schema().await?),
            Backend::Api(_) => Ok(()),
        }
    }

    /// Whether the host table knows `host`.
    pub async fn host_known(&self, host: &HostName) -> anyhow::Result<bool> {
        match self {
            Backend::Db(s) => Ok(s.host(host).await?.is_some()),
            Backend::Role(r) => Ok(r.host() == host && r.host_known().await?),
            Backend::Api(a) => {
                let r = a.send(a.client.get(format!("{}/api/v1/hosts/{host}", a.base))).await?;
                match r.status() {
                    reqwest::StatusCode::NOT_FOUND => Ok(false),
                    s if s.is_success() => Ok(true),
                    _ => Err(a.failed(r).await),
                }
            }
        }
    }

    /// Owner, generation, tombstone and HA flag of those of `uuids` the database knows.
    pub async fn ownership(&self, uuids: &[InstanceId]) -> anyhow::Result<Vec<Ownership>> {
        match self {
            Backend::Db(s) => Ok(s.ownership(uuids).await?),
            Backend::Role(r) => Ok(r.ownership(uuids).await?),
            Backend::Api(a) => {
                let mut out = Vec::with_capacity(uuids.len());
                // The provisioner takes 50,000 per request.
                for chunk in uuids.chunks(50_000) {
                    let body = OwnershipQuery { uuids: chunk.to_vec() };
                    out.extend(a.json::<Vec<Ownership>>(a.post("ownership").json(&body)).await?);
                }
                Ok(out)
            }
        }
    }

    /// Records a heartbeat for `host`; the provisioner's API answers the host's revision and
    /// how long a guard may go without a complete pass ([`guard_api::HeartbeatAnswer`]). The
    /// database itself answers nothing of it: a guard on it asks everything every pass.
    pub async fn heartbeat(&self, host: &HostName) -> anyhow::Result<Option<Revision>> {
        match self {
            Backend::Db(s) => s.record_heartbeat(host).await.map(|_: Timestamp| None).map_err(Into::into),
            Backend::Role(r) => r.heartbeat().await.map(|_: Timestamp| None).map_err(Into::into),
            Backend::Api(a) => {
                let answer: guard_api::HeartbeatAnswer = a.json(a.post("heartbeat")).await?;
                Ok(match (answer.revision, answer.full_pass_ms) {
                    (Some(value), Some(ms)) => Some(Revision { value, full_pass: Duration::from_millis(ms) }),
                    _ => None,
                })
            }
        }
    }

    /// The instances the database assigns to `host` (tombstones included).
    pub async fn assigned(&self, host: &HostName) -> anyhow::Result<Vec<Assigned>> {
        match self {
            Backend::Db(s) => Ok(s.assigned(host).await?),
            Backend::Role(r) => Ok(r.assigned().await?),
            Backend::Api(a) => a.json(a.client.get(a.url("assigned"))).await,
        }
    }

    /// The service copies assigned to `host` (a provisioner older than services: none).
    pub async fn services(&self, host: &HostName) -> anyhow::Result<Vec<nodekeeper_store::guard_api::AssignedService>> {
        match self {
            Backend::Db(s) => Ok(s.services_of(host).await?.into_iter().map(Into::into).collect()),
            Backend::Role(r) => Ok(r.services().await?),
            Backend::Api(a) => {
                let r = a.send(a.client.get(a.url("services"))).await?;
                match r.status() {
                    reqwest::StatusCode::NOT_FOUND => Ok(Vec::new()),
                    s if s.is_success() => Ok(r.json().await.context("reading the assigned services")?),
                    _ => Err(a.failed(r).await),
                }
            }
        }
    }

    /// The stored domain XML of an instance assigned to this host.
    pub async fn domain_xml(&self, uuid: InstanceId) -> anyhow::Result<Option<String>> {
        match self {
            Backend::Db(s) => Ok(s.domain_xml(uuid).await?),
            Backend::Role(r) => Ok(r.domain_xml(uuid).await?),
            Backend::Api(a) => {
                let r = a.send(a.client.get(a.url(&format!("assigned/{uuid}/domain.xml")))).await?;
                match r.status() {
                    reqwest::StatusCode::NOT_FOUND => Ok(None),
                    s if s.is_success() => Ok(Some(r.text().await.context("reading a domain XML")?)),
                    _ => Err(a.failed(r).await),
                }
            }
        }
    }

    /// Replaces `host`'s report of what its libvirt runs.
    pub async fn save_report(&self, host: &HostName, domains: &[ReportedDomain]) -> anyhow::Result<()> {
        match self {
            Backend::Db(s) => Ok(s.save_guard_report(host, domains).await?),
            Backend::Role(r) => Ok(r.save_report(domains).await?),
            Backend::Api(a) => a.ok(a.client.put(a.url("report")).json(domains)).await,
        }
    }

    /// Appends events (the API records them as this host's guard, whatever their actor).
    pub async fn record_events(&self, events: &[NewEvent]) -> anyhow::Result<()> {
        match self {
            Backend::Db(s) => Ok(s.record_events(events).await?),
            Backend::Role(r) => Ok(r.record_events(&guard_events(events)).await?),
            Backend::Api(a) => a.ok(a.post("events").json(&guard_events(events))).await,
        }
    }

    /// `host`'s peers and the keys it shares with them.
    pub async fn peers(&self, host: &HostName) -> anyhow::Result<PeerList> {
        match self {
            Backend::Db(s) => Ok(s.peers_of(host).await?),
            Backend::Role(r) => Ok(r.peers().await?),
            Backend::Api(a) => a.json(a.client.get(a.url("peers"))).await,
        }
    }

    /// Relays the heartbeat of `peer`, which answered this host's authenticated check but
    /// cannot reach the controller itself.
    pub async fn relay(&self, me: &HostName, peer: &HostName) -> anyhow::Result<()> {
        match self {
            Backend::Db(s) => {
                anyhow::ensure!(s.relay_heartbeat(peer, me).await?, "{peer} is not a watched host of the cell");
                Ok(())
            }
            Backend::Role(r) => {
                anyhow::ensure!(r.relay(peer).await?, "{peer} is not a watched host of the cell");
                Ok(())
            }
            Backend::Api(a) => a.ok(a.post("relay").json(&Relay { host: peer.clone() })).await,
        }
    }

    /// Replaces `host`'s fencing profile (watchdog fencing's evidence).
    pub async fn save_fencing(&self, host: &HostName, profile: &FencingProfile) -> anyhow::Result<()> {
        match self {
            Backend::Db(s) => Ok(s.save_guard_fencing(host, profile).await?),
            Backend::Role(r) => Ok(r.save_fencing(profile).await?),
            Backend::Api(a) => a.ok(a.client.put(a.url("fencing")).json(profile)).await,
        }
    }

    /// Closes the database pool (nothing to close for the API).
    pub async fn close(&self) {
        match self {
            Backend::Db(s) => s.close().await,
            Backend::Role(r) => r.store().close().await,
            Backend::Api(_) => {}
        }
    }
}

/// Events as a guard sends them: the actor and host are the receiver's to set.
fn guard_events(events: &[NewEvent]) -> Vec<GuardEvent> {
    events
        .iter()
        .map(|e| GuardEvent {
            kind: e.kind.clone(),
            instance: e.instance,
            message: e.message.clone(),
            key: e.key.clone(),
        })
        .collect()
}

impl Api {
    fn url(&self, rest: &str) -> String {
        format!("{}{}", self.base, guard_api::path(&self.host, rest))
    }

    fn post(&self, rest: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(rest))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.bearer_auth(&self.token).send().await.with_context(|| format!("the provisioner at {}", self.base))
    }

    async fn failed(&self, r: reqwest::Response) -> anyhow::Error {
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        anyhow::anyhow!("the provisioner at {} answered {status}: {}", self.base, body.trim())
    }

    async fn ok(&self, req: reqwest::RequestBuilder) -> anyhow::Result<()> {
        let r = self.send(req).await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(self.failed(r).await)
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let r = self.send(req).await?;
        if !r.status().is_success() {
            return Err(self.failed(r).await);
        }
        r.json().await.with_context(|| format!("an answer of the provisioner at {}", self.base))
    }
}
