//! The hosts' BMCs: a small Redfish endpoint (the two calls nodekeeper's Redfish driver makes
//! for power: a system's `PowerState`, and `ComputerSystem.Reset`) over the fleet's power.
//! A test double for the machines' power, which cannot be real here; the Redfish driver itself
//! is tested against sushy-tools. While a fault lasts, a BMC hangs (never answers), fails
//! (500), or takes a power-off and lands it late (its state says On until then).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::fleet::Fleet;
use super::schedule::BmcFault;

type Shared = Arc<Mutex<Fleet>>;

/// Serves the BMCs on 127.0.0.1; returns the base URL of system `h{i}`'s BMC:
/// `redfish+http://127.0.0.1:PORT/redfish/v1/Systems/` (append the host's name).
pub async fn serve(fleet: Shared) -> anyhow::Result<String> {
    let app = Router::new()
        .route("/redfish/v1/Systems/{id}", get(system))
        .route("/redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset", post(reset))
        .with_state(fleet);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/"))
}

/// What the BMC of `id` does with a request: answer (`None`: go on), or misbehave.
enum Misbehave {
    Hang,
    Fail,
}

fn index(fleet: &Fleet, id: &str) -> Option<usize> {
    fleet.machines.iter().position(|m| m.name == id)
}

fn fault_of(fleet: &Fleet, i: usize) -> Option<BmcFault> {
    fleet.machines[i].bmc.filter(|(_, until)| Instant::now() < *until).map(|(f, _)| f)
}

async fn misbehave(m: Misbehave) -> Response {
    match m {
        Misbehave::Hang => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Misbehave::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "BMC fault").into_response(),
    }
}

fn check(fleet: &Fleet, i: usize) -> Option<Misbehave> {
    match fault_of(fleet, i) {
        Some(BmcFault::Hang) => Some(Misbehave::Hang),
        Some(BmcFault::Fail) => Some(Misbehave::Fail),
        _ => None,
    }
}

async fn system(State(fleet): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let answer = {
        let f = fleet.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = index(&f, &id) else { return StatusCode::NOT_FOUND.into_response() };
        check(&f, i).ok_or(f.machines[i].powered)
    };
    match answer {
        Ok(m) => misbehave(m).await,
        Err(on) => Json(serde_json::json!({ "Id": id, "PowerState": if on { "On" } else { "Off" } })).into_response(),
    }
}

async fn reset(
    State(fleet): State<Shared>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let outcome = {
        let mut f = fleet.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = index(&f, &id) else { return StatusCode::NOT_FOUND.into_response() };
        match check(&f, i) {
            Some(m) => Err(m),
            None => {
                let late = match fault_of(&f, i) {
                    Some(BmcFault::Late(by)) => Some(by),
                    _ => None,
                };
                let m = &mut f.machines[i];
                match body["ResetType"].as_str() {
                    Some("ForceOff") => {
                        match late {
                            Some(by) if m.powered => {
                                m.pending_off.get_or_insert(Instant::now() + by);
                            }
                            _ => {
                                if m.powered {
                                    m.counts[1] += 1;
                                }
                                m.kill_all();
                                m.powered = false;
                                m.pending_off = None;
                            }
                        }
                        Ok(StatusCode::NO_CONTENT)
                    }
                    Some("On") => {
                        if !m.powered {
                            m.counts[0] += 1;
                            m.power_on(Instant::now());
                        }
                        Ok(StatusCode::NO_CONTENT)
                    }
                    _ => Ok(StatusCode::BAD_REQUEST),
                }
            }
        }
    };
    match outcome {
        Ok(status) => status.into_response(),
        Err(m) => misbehave(m).await,
    }
}
