//! The admin API under `/api/v1`: everything the admin CLI does, for the remote CLI
//! (`--server`), the console and scripts. Every request carries an admin token
//! (`Authorization: Bearer nkt.NAME.SECRET`); each call needs a role ([`Call::role`]) and its
//! events name the token (`token:NAME`). Answers are the CLI's `--json` documents (or, asked
//! for `text/plain`, the CLI's text); errors are one JSON shape,
//! `{"error": {"code": "...", "message": "..."}}`, with a stable code. [`ENDPOINTS`] lists
//! every route with its role: the OpenAPI document (`/api/v1/openapi.json`) is made from it,
//! and the tests call each endpoint with each role from it.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use nodekeeper_store::{HostName, Role, StoreError};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::HttpState;
use crate::admin::{self, Call};
use crate::config::ReadAccess;

/// Largest JSON body of an admin call.
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest instance import (JSON lines with domain XML).
pub const IMPORT_LIMIT: usize = 64 << 20;

/// Who a request comes from, once [`authenticate`] let it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An admin token.
    Token {
        /// Its name.
        name: String,
        /// Its role.
        role: Role,
    },
    /// A node's guard reading its own host record (`GET /api/v1/hosts/{name}`).
    Node(HostName),
    /// Nobody: reads are open (`[http.auth] reads = "open"`).
    Anonymous,
    /// A scraper of `/metrics` from `[http.auth] metrics_from`.
    Scraper,
}

/// The address a request came from, on either listener (for `[http.auth] metrics_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, super::tls::TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, super::tls::TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// One JSON error answer.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message.into() } });
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

fn unauthorized(message: &str) -> Response {
    error(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Whether `path` is one of the node APIs (guard, deploy), which have their own tokens.
fn node_api(path: &str) -> bool {
    path.strip_prefix("/api/v1/hosts/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, rest)| rest == "deploy" || rest.starts_with("guard/"))
}

/// Lets a request to the admin API, the event stream or `/metrics` in only with a usable
/// admin token (any role: each call checks its own), or as `[http.auth]` opens them; the
/// [`Principal`] goes into the request's extensions. Everything else passes untouched.
pub async fn authenticate(State(state): State<HttpState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let guarded = path == "/metrics" || (path.starts_with("/api/v1/") && !node_api(path) && path != OPENAPI_PATH);
    if !guarded {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let principal = match bearer {
        Some(token) if token.starts_with("nkt.") => match admin_token(&state, &token).await {
            Ok(p) => p,
            Err(response) => return response,
        },
        Some(token) => match own_host_record(&state, req.method(), path, &token).await {
            Ok(p) => p,
            Err(response) => return response,
        },
        None => {
            let read = matches!(*req.method(), Method::GET | Method::HEAD);
            let peer = req.extensions().get::<axum::extract::ConnectInfo<Peer>>().map(|c| c.0 .0.ip());
            if read && state.config.auth.reads == ReadAccess::Open {
                Principal::Anonymous
            } else if path == "/metrics"
                && peer.is_some_and(|ip| state.config.auth.metrics_from.iter().any(|n| n.contains(ip)))
            {
                Principal::Scraper
            } else {
                return unauthorized(
                    "an admin token is needed: Authorization: Bearer TOKEN (`token create` makes one)",
                );
            }
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The principal of an admin token, if it is one, usable, and its digest matches (compared
/// in constant time).
async fn admin_token(state: &HttpState, token: &str) -> Result<Principal, Response> {
    let refused = || unauthorized("invalid, expired or revoked admin token");
    let Some((name, _)) = admin::split_admin_token(token) else { return Err(refused()) };
    let (stored, digest) = match state.store.admin_token(name).await {
        Ok(Some(found)) => found,
        Ok(None) => return Err(refused()),
        Err(e) => return Err(database_error(&e)),
    };
    let presented = super::guard_api::token_hash(token);
    // Expiry by the database's clock, as every replica sees it (not this one's, which may be off).
    let now = match state.store.now().await {
        Ok(now) => now,
        Err(e) => return Err(database_error(&e)),
    };
    if !constant_time_eq(presented.as_bytes(), digest.as_bytes()) || !stored.usable_at(now) {
        tracing::info!(token = name, "admin API: refused a token that is invalid, expired or revoked");
        return Err(refused());
    }
    if stored.last_used_at.is_none_or(|t| now.0 - t.0 >= 60_000) {
        if let Err(e) = state.store.touch_admin_token(name, now).await {
            tracing::debug!("noting the use of token {name}: {e}");
        }
    }
    Ok(Principal::Token { name: stored.name, role: stored.role })
}

/// A guard may read its own host record with its node token (it checks at boot that the
/// database knows its name): `GET /api/v1/hosts/{name}` only. An unknown host is 404 to
/// anyone, as before tokens (the guard's "renamed host" check depends on it).
async fn own_host_record(state: &HttpState, method: &Method, path: &str, token: &str) -> Result<Principal, Response> {
    let refused = || unauthorized("not an admin token (nkt.NAME.SECRET); a node token only reads its own host");
    let own = path.strip_prefix("/api/v1/hosts/").filter(|rest| !rest.contains('/'));
    let Some(name) = own.filter(|_| *method == Method::GET).and_then(|n| n.parse::<HostName>().ok()) else {
        return Err(refused());
    };
    match state.store.check_node_token(&name, &super::guard_api::token_hash(token)).await {
        Ok(Some(true)) => Ok(Principal::Node(name)),
        Ok(Some(false)) => Err(refused()),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, "not_found", format!("unknown host {name}"))),
        Err(e) => Err(database_error(&e)),
    }
}

/// Equal, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn database_error(e: &dyn std::fmt::Display) -> Response {
    let id = super::logged(&format!("admin API: {e}"));
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "database",
        format!("the database did not answer (error {id}: see the provisioner's log)"),
    )
}

/// The status and code of an admin command's error: what the store said, if it said it.
fn classify(e: &anyhow::Error) -> (StatusCode, &'static str) {
    use crate::recovery::controller::MarkFencedError;
    use crate::reimage::executor::RequestError;
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return classify_store(s);
        }
        if let Some(RequestError::Store(s)) = cause.downcast_ref::<RequestError>() {
            return classify_store(s);
        }
        if let Some(MarkFencedError::Store(s)) = cause.downcast_ref::<MarkFencedError>() {
            return classify_store(s);
        }
        if let Some(admin::NothingChanged(s)) = cause.downcast_ref::<admin::NothingChanged>() {
            return classify_store(s);
        }
        if matches!(cause.downcast_ref::<MarkFencedError>(), Some(MarkFencedError::Alive { .. }))
            || matches!(cause.downcast_ref::<RequestError>(), Some(RequestError::NoBmc(_)))
        {
            return (StatusCode::CONFLICT, "conflict");
        }
        if cause.downcast_ref::<admin::NotFound>().is_some() {
            return (StatusCode::NOT_FOUND, "not_found");
        }
        if cause.downcast_ref::<admin::StateConflict>().is_some() {
            return (StatusCode::CONFLICT, "conflict");
        }
        if cause.downcast_ref::<crate::bmc::BmcError>().is_some() {
            return (StatusCode::BAD_GATEWAY, "bmc");
        }
    }
    (StatusCode::BAD_REQUEST, "invalid")
}

fn classify_store(e: &StoreError) -> (StatusCode, &'static str) {
    match e {
        StoreError::Item { source, .. } => classify_store(source),
        StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
        StoreError::UnknownHost(_)
        | StoreError::UnknownImage(_)
        | StoreError::UnknownInstance(_)
        | StoreError::UnknownToken(_)
        | StoreError::UnknownService(_) => (StatusCode::NOT_FOUND, "not_found"),
        StoreError::HostExists(_)
        | StoreError::MacInUse { .. }
        | StoreError::ImageExists(_)
        | StoreError::InstanceExists(_)
        | StoreError::TokenExists(_) => (StatusCode::CONFLICT, "exists"),
        StoreError::HostNotActive { .. }
        | StoreError::SourceLive { .. }
        | StoreError::ImageInUse { .. }
        | StoreError::InstanceDeleted(_)
        | StoreError::Conflict { .. }
        | StoreError::LeaseLost { .. }
        | StoreError::HostInUse { .. } => (StatusCode::CONFLICT, "conflict"),
        StoreError::InvalidUrl { .. }
        | StoreError::Connect { .. }
        | StoreError::Migrate { .. }
        | StoreError::SchemaBehind { .. }
        | StoreError::SchemaAhead { .. }
        | StoreError::Query { .. }
        | StoreError::Corrupt { .. } => (StatusCode::SERVICE_UNAVAILABLE, "database"),
    }
}

/// Runs `call` for `principal` if its role allows, answering its reply as JSON, or as text
/// when the client asks for `text/plain` (the remote CLI without `--json`).
async fn run(state: &HttpState, principal: &Principal, headers: &HeaderMap, call: Call) -> Response {
    let need = call.role();
    let actor = match principal {
        Principal::Token { name, role } if *role >= need => format!("token:{name}"),
        Principal::Token { name, role } => {
            let message = format!("token {name} has the role {role}; this needs {need}");
            return error(StatusCode::FORBIDDEN, "forbidden", message);
        }
        Principal::Anonymous if need == Role::Viewer => "anonymous".to_owned(),
        Principal::Anonymous => return unauthorized(&format!("an admin token with the role {need} is needed")),
        Principal::Node(_) | Principal::Scraper => {
            return error(StatusCode::FORBIDDEN, "forbidden", format!("this needs an admin token with the role {need}"))
        }
    };
    let cx = admin::Ctx { store: &state.store, actor: &actor, bmc: &state.bmc };
    match call.run(cx).await {
        Ok(reply) => {
            let text = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/plain") && !a.contains("application/json"));
            if text {
                (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], reply.text).into_response()
            } else {
                Json(reply.json).into_response()
            }
        }
        Err(e) => match classify(&e) {
            (StatusCode::SERVICE_UNAVAILABLE, _) => database_error(&format!("{e:#}")),
            (status, code) => error(status, code, format!("{e:#}")),
        },
    }
}

/// A JSON body as `T`, or the JSON error saying why not (unknown fields are refused).
#[allow(clippy::result_large_err, reason = "the error is the answer, made once per request")]
fn body<T: DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let bytes = bytes.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "invalid" };
        error(status, code, e.body_text())
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid", format!("the request body: {e}")))
}

#[allow(clippy::result_large_err, reason = "the error is the answer, made once per request")]
fn host_name(name: &str) -> Result<HostName, Response> {
    name.parse().map_err(|e| error(StatusCode::BAD_REQUEST, "invalid", format!("{e}")))
}

/// What a handler needs of every request.
type Who = Extension<Principal>;

/// The admin API's routes (the older reads — `GET /api/v1/hosts/{name}`, the events and the
/// stream — are in the parent module).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/hosts", get(host_list).post(host_add))
        .route("/api/v1/hosts/{name}", axum::routing::patch(host_set).delete(host_remove))
        .route("/api/v1/hosts/{name}/details", get(host_show))
        .route("/api/v1/hosts/{name}/outlets", get(outlets_show).put(outlets_set))
        .route("/api/v1/hosts/{name}/mark-fenced", post(mark_fenced))
        .route("/api/v1/hosts/{name}/token", post(host_token))
        .route("/api/v1/hosts/{name}/power", get(power_status).post(power))
        .route("/api/v1/hosts/{name}/reimage", post(reimage))
        .route("/api/v1/hosts/{name}/drain", post(drain))
        .route("/api/v1/hosts/{name}/maintenance", post(maintenance))
        .route("/api/v1/instances", get(instance_list).patch(instance_set))
        .route("/api/v1/instances/evacuate", post(instance_evacuate))
        .route("/api/v1/instances/delete", post(instance_delete))
        .route("/api/v1/operations", get(operation_list))
        .route("/api/v1/operations/{id}", get(operation_show))
        .route("/api/v1/operations/{id}/cancel", post(operation_cancel))
        .route("/api/v1/images", get(image_list))
        .route("/api/v1/images/{name}", get(image_show))
        .route("/api/v1/services", get(service_list).post(service_add))
        .route("/api/v1/services/{name}", get(service_show).delete(service_remove))
        .route("/api/v1/hosts/{name}/labels", get(labels_show).put(labels_set))
        .route("/api/v1/tokens", get(token_list).post(token_create))
        .route("/api/v1/tokens/{name}", axum::routing::delete(token_revoke))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .merge(
            Router::new()
                .route("/api/v1/instances/import", post(instance_import))
                .layer(DefaultBodyLimit::max(IMPORT_LIMIT)),
        )
        .route(OPENAPI_PATH, get(openapi))
}

macro_rules! try_or_answer {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(response) => return response,
        }
    };
}

/// A handler that only makes a call: from nothing, the host in the path (`host`), a name in
/// the path (`text`), a JSON body, or both a host and a body (`try`: a call that may be
/// refused, answered as it says).
macro_rules! handler {
    ($name:ident => |$host:ident: host| $call:expr) => {
        async fn $name(
            State(s): State<HttpState>,
            Extension(p): Who,
            h: HeaderMap,
            UrlPath($host): UrlPath<String>,
        ) -> Response {
            let $host = try_or_answer!(host_name(&$host));
            run(&s, &p, &h, $call).await
        }
    };
    ($name:ident => |$host:ident: host, $b:ident: $t:ty| try $call:expr) => {
        async fn $name(
            State(s): State<HttpState>,
            Extension(p): Who,
            h: HeaderMap,
            UrlPath($host): UrlPath<String>,
            b: Result<Bytes, BytesRejection>,
        ) -> Response {
            let $host = try_or_answer!(host_name(&$host));
            let $b: $t = try_or_answer!(body(b));
            let call = try_or_answer!($call);
            run(&s, &p, &h, call).await
        }
    };
    ($name:ident => |$host:ident: host, $b:ident: $t:ty| $call:expr) => {
        async fn $name(
            State(s): State<HttpState>,
            Extension(p): Who,
            h: HeaderMap,
            UrlPath($host): UrlPath<String>,
            b: Result<Bytes, BytesRejection>,
        ) -> Response {
            let $host = try_or_answer!(host_name(&$host));
            let $b: $t = try_or_answer!(body(b));
            run(&s, &p, &h, $call).await
        }
    };
    ($name:ident => |$n:ident: text| $call:expr) => {
        async fn $name(
            State(s): State<HttpState>,
            Extension(p): Who,
            h: HeaderMap,
            UrlPath($n): UrlPath<String>,
        ) -> Response {
            run(&s, &p, &h, $call).await
        }
    };
    ($name:ident => |$b:ident: $t:ty| $call:expr) => {
        async fn $name(
            State(s): State<HttpState>,
            Extension(p): Who,
            h: HeaderMap,
            b: Result<Bytes, BytesRejection>,
        ) -> Response {
            let $b: $t = try_or_answer!(body(b));
            run(&s, &p, &h, $call).await
        }
    };
    ($name:ident => $call:expr) => {
        async fn $name(State(s): State<HttpState>, Extension(p): Who, h: HeaderMap) -> Response {
            run(&s, &p, &h, $call).await
        }
    };
}

handler!(host_list => Call::HostList);
handler!(host_add => |add: admin::HostAdd| Call::HostAdd(add));
handler!(host_set => |name: host, change: admin::HostSet| Call::HostSet(name, change));
handler!(host_show => |name: host| Call::HostShow(name));
handler!(outlets_show => |name: host| Call::HostOutlets(name, None));
handler!(outlets_set => |name: host, outlets: admin::Outlets| Call::HostOutlets(name, Some(outlets)));
handler!(mark_fenced => |name: host| Call::MarkFenced(name));
handler!(host_token => |name: host| Call::HostToken(name));
handler!(host_remove => |name: host| Call::HostRemove(name));
handler!(power_status => |name: host| Call::Power(name, admin::PowerCommand::Status));
handler!(reimage => |name: host, asked: admin::Reimage| Call::Reimage(name, asked));
handler!(drain => |name: host, asked: admin::Drain| Call::HostDrain(name, asked));
handler!(instance_set => |change: admin::InstanceSet| Call::InstanceSet(change));
handler!(instance_evacuate => |asked: admin::Evacuate| Call::InstanceEvacuate(asked));
handler!(instance_delete => |asked: admin::Uuids| Call::InstanceDelete(asked));
handler!(image_list => Call::ImageList);
handler!(image_show => |name: text| Call::ImageShow(name));
handler!(service_list => Call::ServiceList);
handler!(service_add => |asked: admin::ServiceAdd| Call::ServiceAdd(asked));
handler!(service_show => |name: text| Call::ServiceShow(name));
handler!(service_remove => |name: text| Call::ServiceRemove(name));
handler!(labels_show => |name: host| Call::HostLabels(name, None));
handler!(labels_set => |name: host, labels: admin::Labels| Call::HostLabels(name, Some(labels)));
handler!(token_list => Call::TokenList);
handler!(token_create => |asked: admin::TokenCreate| Call::TokenCreate(asked));
handler!(token_revoke => |name: text| Call::TokenRevoke(name));

handler!(power => |name: host, asked: admin::Power| try power_call(name, &asked));
handler!(maintenance => |name: host, asked: admin::Maintenance| try maintenance_call(name, &asked));

#[allow(clippy::result_large_err, reason = "the error is the answer, made once per request")]
fn power_call(name: HostName, asked: &admin::Power) -> Result<Call, Response> {
    match admin::power_action(&asked.action) {
        Some(action) => Ok(Call::Power(name, action)),
        None => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("action {:?}: expected on, off or cycle", asked.action),
        )),
    }
}

#[allow(clippy::result_large_err, reason = "the error is the answer, made once per request")]
fn maintenance_call(name: HostName, asked: &admin::Maintenance) -> Result<Call, Response> {
    match asked.state.as_str() {
        "on" => Ok(Call::HostMaintenance(name, true)),
        "off" => Ok(Call::HostMaintenance(name, false)),
        other => Err(error(StatusCode::BAD_REQUEST, "invalid", format!("state {other:?}: expected on or off"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstancesQuery {
    host: Option<String>,
}

async fn instance_list(
    State(s): State<HttpState>,
    Extension(p): Who,
    h: HeaderMap,
    q: Result<Query<InstancesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else { return error(StatusCode::BAD_REQUEST, "invalid", "query: only host=NAME") };
    let host = match q.host.as_deref().map(host_name) {
        Some(Ok(h)) => Some(h),
        Some(Err(response)) => return response,
        None => None,
    };
    run(&s, &p, &h, Call::InstanceList(host)).await
}

async fn instance_import(
    State(s): State<HttpState>,
    Extension(p): Who,
    h: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let bytes = match b {
        Ok(bytes) => bytes,
        Err(e) => {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "invalid" };
            return error(e.status(), code, e.body_text());
        }
    };
    let Ok(text) = String::from_utf8(bytes.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "invalid", "the request body: JSON lines must be UTF-8");
    };
    run(&s, &p, &h, Call::InstanceImport("the request".into(), text)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationsQuery {
    host: Option<String>,
    #[serde(default)]
    running: bool,
    limit: Option<u32>,
}

async fn operation_list(
    State(s): State<HttpState>,
    Extension(p): Who,
    h: HeaderMap,
    q: Result<Query<OperationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(StatusCode::BAD_REQUEST, "invalid", "query: host=NAME, running=true|false, limit=N");
    };
    let host = match q.host.as_deref().map(host_name) {
        Some(Ok(h)) => Some(h),
        Some(Err(response)) => return response,
        None => None,
    };
    run(&s, &p, &h, Call::OperationList(host, q.running, q.limit.unwrap_or(50))).await
}

async fn operation_show(
    State(s): State<HttpState>,
    Extension(p): Who,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match id.parse::<i64>() {
        Ok(id) => run(&s, &p, &h, Call::OperationShow(id)).await,
        Err(_) => not_an_operation(&id),
    }
}

fn not_an_operation(id: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid", format!("operation {id:?}: a number"))
}

async fn operation_cancel(
    State(s): State<HttpState>,
    Extension(p): Who,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match id.parse::<i64>() {
        Ok(id) => run(&s, &p, &h, Call::OperationCancel(id)).await,
        Err(_) => not_an_operation(&id),
    }
}

/// Where the OpenAPI document is served (to anyone: it holds no data).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// One route of the API, as the OpenAPI document and the tests know it.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// The HTTP method.
    pub method: &'static str,
    /// The path, with `{name}` parameters.
    pub path: &'static str,
    /// The least role that may call it (`None`: no admin token — the node APIs and the
    /// document itself).
    pub role: Option<Role>,
    /// What it does.
    pub summary: &'static str,
    /// The request body's schema, by name.
    pub body: Option<&'static str>,
}

const fn ep(method: &'static str, path: &'static str, role: Role, summary: &'static str) -> Endpoint {
    Endpoint { method, path, role: Some(role), summary, body: None }
}

const fn with_body(e: Endpoint, body: &'static str) -> Endpoint {
    Endpoint { body: Some(body), ..e }
}

/// Every admin endpoint, with its role.
pub const ENDPOINTS: &[Endpoint] = &[
    ep("GET", "/api/v1/hosts", Role::Viewer, "host list"),
    with_body(ep("POST", "/api/v1/hosts", Role::Admin, "host add"), "HostAdd"),
    ep("GET", "/api/v1/hosts/{name}", Role::Viewer, "the host's record (also to its guard, with its node token)"),
    with_body(ep("PATCH", "/api/v1/hosts/{name}", Role::Admin, "host set"), "HostSet"),
    ep("DELETE", "/api/v1/hosts/{name}", Role::Admin, "host remove"),
    ep("GET", "/api/v1/hosts/{name}/details", Role::Viewer, "host show"),
    ep("GET", "/api/v1/hosts/{name}/outlets", Role::Viewer, "host outlets NAME"),
    with_body(ep("PUT", "/api/v1/hosts/{name}/outlets", Role::Admin, "host outlets NAME URL…"), "Outlets"),
    ep("POST", "/api/v1/hosts/{name}/mark-fenced", Role::Operator, "host mark-fenced"),
    ep("POST", "/api/v1/hosts/{name}/token", Role::Admin, "host token (a new node token)"),
    ep("GET", "/api/v1/hosts/{name}/power", Role::Operator, "power HOST status"),
    with_body(ep("POST", "/api/v1/hosts/{name}/power", Role::Operator, "power HOST on|off|cycle"), "Power"),
    with_body(ep("POST", "/api/v1/hosts/{name}/reimage", Role::Operator, "reimage"), "Reimage"),
    with_body(ep("POST", "/api/v1/hosts/{name}/drain", Role::Operator, "host drain"), "Drain"),
    with_body(ep("POST", "/api/v1/hosts/{name}/maintenance", Role::Operator, "host maintenance on|off"), "Maintenance"),
    ep("GET", "/api/v1/instances", Role::Viewer, "instance list [?host=NAME]"),
    with_body(ep("PATCH", "/api/v1/instances", Role::Admin, "instance set"), "InstanceSet"),
    ep("POST", "/api/v1/instances/import", Role::Admin, "instance import (a body of JSON lines)"),
    with_body(ep("POST", "/api/v1/instances/evacuate", Role::Admin, "instance evacuate"), "Evacuate"),
    with_body(ep("POST", "/api/v1/instances/delete", Role::Admin, "instance delete"), "Uuids"),
    ep("GET", "/api/v1/operations", Role::Viewer, "operation list [?host=NAME&running=true&limit=N]"),
    ep("GET", "/api/v1/operations/{id}", Role::Viewer, "operation show"),
    ep("POST", "/api/v1/operations/{id}/cancel", Role::Operator, "operation cancel"),
    ep("GET", "/api/v1/images", Role::Viewer, "image list"),
    ep("GET", "/api/v1/images/{name}", Role::Viewer, "image show"),
    ep("GET", "/api/v1/services", Role::Viewer, "service list"),
    with_body(ep("POST", "/api/v1/services", Role::Admin, "service add"), "ServiceAdd"),
    ep("GET", "/api/v1/services/{name}", Role::Viewer, "service show: where its copies run, since when"),
    ep("DELETE", "/api/v1/services/{name}", Role::Admin, "service remove"),
    ep("GET", "/api/v1/hosts/{name}/labels", Role::Viewer, "host labels NAME"),
    with_body(ep("PUT", "/api/v1/hosts/{name}/labels", Role::Admin, "host labels NAME LABEL…"), "Labels"),
    ep("GET", "/api/v1/tokens", Role::Admin, "token list"),
    with_body(ep("POST", "/api/v1/tokens", Role::Admin, "token create"), "TokenCreate"),
    ep("DELETE", "/api/v1/tokens/{name}", Role::Admin, "token revoke"),
    ep("GET", "/api/v1/events", Role::Viewer, "events [?after=ID&limit=N&host=NAME]"),
    ep("GET", "/api/v1/events/stream", Role::Viewer, "events as Server-Sent Events"),
    ep("GET", "/metrics", Role::Viewer, "Prometheus metrics (or from [http.auth] metrics_from)"),
];

/// The OpenAPI 3.1 document of the admin API, made from [`ENDPOINTS`] and the request types.
pub fn openapi_document() -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut schemas = Map::new();
    let mut add = |name: &str, mut schema: Value| {
        if let Some(o) = schema.as_object_mut() {
            o.remove("$schema");
        }
        schemas.insert(name.to_owned(), schema);
    };
    add("HostAdd", schemars::schema_for!(admin::HostAdd).to_value());
    add("HostSet", schemars::schema_for!(admin::HostSet).to_value());
    add("Outlets", schemars::schema_for!(admin::Outlets).to_value());
    add("Power", schemars::schema_for!(admin::Power).to_value());
    add("Reimage", schemars::schema_for!(admin::Reimage).to_value());
    add("Drain", schemars::schema_for!(admin::Drain).to_value());
    add("Maintenance", schemars::schema_for!(admin::Maintenance).to_value());
    add("InstanceSet", schemars::schema_for!(admin::InstanceSet).to_value());
    add("Evacuate", schemars::schema_for!(admin::Evacuate).to_value());
    add("Uuids", schemars::schema_for!(admin::Uuids).to_value());
    add("TokenCreate", schemars::schema_for!(admin::TokenCreate).to_value());
    add("ServiceAdd", schemars::schema_for!(admin::ServiceAdd).to_value());
    add("Labels", schemars::schema_for!(admin::Labels).to_value());
    add(
        "Error",
        json!({ "type": "object", "required": ["error"], "properties": { "error": {
            "type": "object", "required": ["code", "message"],
            "properties": {
                "code": { "type": "string", "enum": ["unauthorized", "forbidden", "invalid", "too_large", "not_found", "exists", "conflict", "bmc", "database"] },
                "message": { "type": "string" } } } } }),
    );
    let mut paths = Map::new();
    for e in ENDPOINTS {
        let params: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({ "name": p, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let err = |d: &str| json!({ "description": d, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
        let mut op = json!({
            "summary": e.summary,
            "description": format!("Needs an admin token with the role {} or above.", e.role.map_or("-", Role::as_str)),
            "x-nodekeeper-role": e.role.map(Role::as_str),
            "parameters": params,
            "responses": {
                "200": { "description": "The CLI's --json document (text/plain: the CLI's text)" },
                "400": err("Malformed request"),
                "401": err("No usable token"),
                "403": err("The token's role is not enough"),
                "404": err("No such host, instance, image or token"),
                "409": err("Exists already, or the state forbids it"),
                "413": err("The body is too large"),
                "503": err("The database did not answer"),
            },
        });
        if let Some(b) = e.body {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{b}") } } } });
        } else if e.path.ends_with("/import") {
            op["requestBody"] =
                json!({ "required": true, "content": { "application/x-ndjson": { "schema": { "type": "string" } } } });
        }
        let entry = paths.entry(e.path.to_owned()).or_insert_with(|| json!({}));
        entry[e.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "nodekeeper admin API", "version": env!("CARGO_PKG_VERSION") },
        "components": {
            "schemas": schemas,
            "securitySchemes": { "token": { "type": "http", "scheme": "bearer", "description": "nkt.NAME.SECRET from `token create`" } },
        },
        "security": [{ "token": [] }],
        "paths": paths,
    })
}

async fn openapi() -> Response {
    Json(openapi_document()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn every_endpoint_is_in_the_document_once() {
        let doc = openapi_document();
        let mut seen = std::collections::HashSet::new();
        for e in ENDPOINTS {
            assert!(seen.insert((e.method, e.path)), "{} {} twice", e.method, e.path);
            let op = &doc["paths"][e.path][e.method.to_lowercase()];
            assert_eq!(op["x-nodekeeper-role"], serde_json::json!(e.role.map(Role::as_str)), "{} {}", e.method, e.path);
            if let Some(b) = e.body {
                assert!(doc["components"]["schemas"][b]["properties"].is_object(), "{b}");
            }
        }
        // The request types refuse unknown fields, and say so in their schemas.
        assert_eq!(doc["components"]["schemas"]["HostAdd"]["additionalProperties"], serde_json::json!(false));
    }
}
