//! The guard API: `/api/v1/hosts/{name}/guard/...`, how the guard on a node reaches the
//! database through the provisioner (the embedded SQLite cannot be opened from another
//! machine). Every request must carry that host's node token (`Authorization: Bearer …`); a
//! guard can read and write only for its own host, and the provisioner sets the actor of the
//! events it records (`guard:HOST`).
//!
//! - `POST heartbeat` → [`HeartbeatAnswer`] `{"at": …, "revision": …, "full_pass_ms": …}`:
//!   group-committed ([`super::guard_writes`]); the revision tells the guard whether anything
//!   it converges on changed since its last complete pass
//! - `POST ownership` `{"uuids": [...]}` → `[Ownership]` (what `guard boot` asks)
//! - `GET assigned` → `[Assigned]` (what `guard watch` converges on)
//! - `GET assigned/{uuid}/domain.xml` → the stored XML of an instance assigned to the host
//! - `PUT report` `[ReportedDomain]` (what its libvirt runs, for the GC pass; group-committed)
//! - `POST events` `[GuardEvent]` (their idempotency keys are kept under `guard:HOST:`, so a
//!   node cannot pre-empt a key of the controller's or of another host)
//! - `GET peers` → [`PeerList`] (the cell's other hosts and the key shared with each: the
//!   quorum rule of the guard's self-fence)
//! - `POST relay` [`Relay`] → 204: the guard vouches that a peer, which cannot reach the
//!   provisioner but answered its authenticated check, is alive: a heartbeat for that peer
//! - `PUT fencing` [`FencingProfile`] → 204: how the guard fences itself (self-fence settings,
//!   its armed hardware watchdog, the cell its quorum counts): watchdog fencing's evidence
//!
//! An unknown host is a 404 (the guard reports a renamed host as a configuration error); a
//! missing or wrong token a 401; a database that fails a 500, and nothing is changed.

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use nodekeeper_store::guard_api::{valid_token, GuardEvent, HeartbeatAnswer, OwnershipQuery, PeerList, Relay};
use nodekeeper_store::{FencingProfile, HostName, InstanceId, NewEvent, ReportedDomain};
use sha2::{Digest, Sha256};

use super::{internal, text, HttpState};

/// At most this many UUIDs per ownership query or domains per report.
const MAX_ITEMS: usize = 50_000;
/// At most this many events per request.
const MAX_EVENTS: usize = 10_000;

/// The routes, to be merged into the main router.
pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/hosts/{name}/guard/heartbeat", post(heartbeat))
        .route("/api/v1/hosts/{name}/guard/ownership", post(ownership))
        .route("/api/v1/hosts/{name}/guard/assigned", get(assigned))
        .route("/api/v1/hosts/{name}/guard/services", get(services))
        .route("/api/v1/hosts/{name}/guard/assigned/{uuid}/domain.xml", get(domain_xml))
        .route("/api/v1/hosts/{name}/guard/report", put(report))
        .route("/api/v1/hosts/{name}/guard/events", post(events))
        .route("/api/v1/hosts/{name}/guard/peers", get(peers))
        .route("/api/v1/hosts/{name}/guard/relay", post(relay))
        .route("/api/v1/hosts/{name}/guard/fencing", put(fencing))
}

/// The SHA-256 (hex) under which a node token is stored.
pub fn token_hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// The well-formed bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| valid_token(t))
}

/// The host named in the path, if the request carries its node token.
async fn authorize(state: &HttpState, name: &str, headers: &HeaderMap) -> Result<HostName, Response> {
    let Ok(name) = name.parse::<HostName>() else {
        return Err(text(StatusCode::BAD_REQUEST, format!("invalid host name {name:?}\n")));
    };
    let token = bearer(headers);
    // A missing token is checked against the host too: an unknown host is a 404 either way.
    let hash = token.map(token_hash).unwrap_or_default();
    match state.guard_store.check_node_token(&name, &hash).await {
        Ok(Some(true)) if token.is_some() => Ok(name),
        Ok(Some(_)) => {
            let mut r = text(StatusCode::UNAUTHORIZED, format!("a valid node token for {name} is required\n"));
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            Err(r)
        }
        Ok(None) => Err(text(StatusCode::NOT_FOUND, format!("unknown host {name}\n"))),
        Err(e) => Err(internal(e)),
    }
}

/// The host the request is authorized for, and the JSON list of at most `max` items its body
/// holds; or the refusal.
async fn authorized_list<T: serde::de::DeserializeOwned>(
    state: &HttpState,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    max: usize,
) -> Result<(HostName, Vec<T>), Response> {
    let host = authorize(state, name, headers).await?;
    let items: Vec<T> = parse(body).map_err(|e| text(StatusCode::BAD_REQUEST, e))?;
    if items.len() > max {
        return Err(text(StatusCode::PAYLOAD_TOO_LARGE, format!("at most {max} items per request\n")));
    }
    Ok((host, items))
}

/// A JSON body, or what is wrong with it (for a 400).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}\n"))
}

async fn heartbeat(State(state): State<HttpState>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let full_pass_ms = Some(u64::try_from(state.guard_writes.full_pass.as_millis()).unwrap_or(u64::MAX));
    // The common case in one batched statement that checks the token too; any refusal is
    // worked out by the one-request path below (which answers 400, 401 or 404).
    if let (Ok(host), Some(token)) = (name.parse::<HostName>(), bearer(&headers)) {
        match state.guard_writes.beat(host, token_hash(token)).await {
            Ok(Some((at, revision))) => {
                let answer = HeartbeatAnswer { at: at.to_string(), revision: Some(revision), full_pass_ms };
                return Json(answer).into_response();
            }
            Ok(None) => {}
            // The writer failed or stopped: the one-request path below answers (a database
            // that is down fails there too, with the same 500).
            Err(e) => tracing::warn!("heartbeat of {name} through the group commit: {e}; one by one"),
        }
    }
    let host = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    // Refused above, or the token matched only now (set between the two), or the group commit
    // failed: recorded one by one.
    match state.guard_store.record_heartbeat(&host).await {
        Ok(at) => Json(HeartbeatAnswer { at: at.to_string(), revision: None, full_pass_ms: None }).into_response(),
        Err(e) => internal(e),
    }
}

async fn ownership(
    State(state): State<HttpState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&state, &name, &headers).await {
        return r;
    }
    let query: OwnershipQuery = match parse(&body) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    if query.uuids.len() > MAX_ITEMS {
        return text(StatusCode::PAYLOAD_TOO_LARGE, format!("at most {MAX_ITEMS} UUIDs per query\n"));
    }
    match state.guard_store.ownership(&query.uuids).await {
        Ok(o) => Json(o).into_response(),
        Err(e) => internal(e),
    }
}

async fn assigned(State(state): State<HttpState>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let host = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    match state.guard_store.assigned(&host).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => internal(e),
    }
}

async fn services(State(state): State<HttpState>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let host = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    match state.guard_store.services_of(&host).await {
        Ok(list) => {
            let out: Vec<nodekeeper_store::guard_api::AssignedService> = list.into_iter().map(Into::into).collect();
            Json(out).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn domain_xml(
    State(state): State<HttpState>,
    UrlPath((name, uuid)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let host = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let Ok(uuid) = uuid.parse::<InstanceId>() else {
        return text(StatusCode::BAD_REQUEST, format!("invalid UUID {uuid:?}\n"));
    };
    // Only the owner may read it: a domain XML can carry secrets (disk paths, passwords).
    match state.guard_store.instance(uuid).await {
        Ok(Some(i)) if i.owner == host && !i.deleted => {}
        Ok(_) => return text(StatusCode::NOT_FOUND, format!("{uuid} is not assigned to {host}\n")),
        Err(e) => return internal(e),
    }
    match state.guard_store.domain_xml(uuid).await {
        Ok(Some(xml)) => ([(header::CONTENT_TYPE, "application/xml")], xml).into_response(),
        Ok(None) => text(StatusCode::NOT_FOUND, format!("{uuid} has no stored domain XML\n")),
        Err(e) => internal(e),
    }
}

async fn report(
    State(state): State<HttpState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (host, domains) = match authorized_list::<ReportedDomain>(&state, &name, &headers, &body, MAX_ITEMS).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let saved = match state.guard_writes.report(host.clone(), domains.clone()).await {
        Ok(()) => Ok(()),
        // The writer failed or stopped: one by one (a database that is down fails here too).
        Err(_) => state.guard_store.save_guard_report(&host, &domains).await,
    };
    match saved {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => internal(e),
    }
}

async fn events(
    State(state): State<HttpState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (host, events) = match authorized_list::<GuardEvent>(&state, &name, &headers, &body, MAX_EVENTS).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(bad) = events.iter().find(|e| !valid_kind(&e.kind) || e.message.len() > 4096) {
        return text(StatusCode::BAD_REQUEST, format!("invalid event kind {:?} or message too long\n", bad.kind));
    }
    let actor = format!("guard:{host}");
    let events: Vec<NewEvent> = events
        .into_iter()
        .map(|e| NewEvent {
            actor: actor.clone(),
            kind: e.kind,
            host: Some(host.clone()),
            instance: e.instance,
            message: e.message,
            key: e.key.map(|k| format!("{actor}:{k}")),
        })
        .collect();
    match state.guard_store.record_events(&events).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => internal(e),
    }
}

async fn peers(State(state): State<HttpState>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let host = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    match state.guard_store.peers_of(&host).await {
        Ok(list) => Json::<PeerList>(list).into_response(),
        Err(e) => internal(e),
    }
}

async fn relay(
    State(state): State<HttpState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let via = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let relay: Relay = match parse(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    if relay.host == via {
        return text(StatusCode::BAD_REQUEST, "a host cannot relay its own heartbeat\n".into());
    }
    match state.guard_store.relay_heartbeat(&relay.host, &via).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => text(StatusCode::CONFLICT, format!("{} is not a watched host of the cell\n", relay.host)),
        Err(e) => internal(e),
    }
}

async fn fencing(
    State(state): State<HttpState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let host = match authorize(&state, &name, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    if body.len() > 65_536 {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "a fencing profile is at most 64 KiB\n".into());
    }
    let profile: FencingProfile = match parse(&body) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    match state.guard_store.save_guard_fencing(&host, &profile).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => internal(e),
    }
}

/// A dotted kind of lowercase words: `instance.quarantined`, `guard.host-unknown`, ...
fn valid_kind(kind: &str) -> bool {
    (3..=64).contains(&kind.len())
        && kind.contains('.')
        && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert!(valid_kind("instance.quarantined"));
        assert!(valid_kind("guard.host-unknown"));
        assert!(valid_kind("host.self_fence_lifted"));
        assert!(!valid_kind("nodot"));
        assert!(!valid_kind("Instance.Started"));
        assert!(!valid_kind("a.b\n"));
    }
}
