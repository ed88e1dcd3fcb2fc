//! The web console: three static files compiled into the binary (no build step, nothing
//! fetched from anywhere but this server), served to anyone — they hold no data. The page
//! asks for an admin token and reads everything through the admin API with it, as the remote
//! CLI does; its actions are the operator's calls, behind a confirmation.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::HttpState;

const INDEX: &str = include_str!("console/index.html");
const APP: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// Only this server's own scripts, styles and API; never framed.
const POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// `/`, `/console/app.js`, `/console/style.css`.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/console/app.js", get(|| async { file("text/javascript; charset=utf-8", APP) }))
        .route("/console/style.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
}
