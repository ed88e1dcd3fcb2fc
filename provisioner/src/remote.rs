//! The remote CLI: `--server URL --token-file FILE` sends an admin command to `serve`'s admin
//! API and prints what it answers — the command's JSON, or with no `--json` the very text the
//! local CLI prints (the server renders it with the same code).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::admin::{Body, Call, Reply};

/// How long one admin request may take (a power command waits for the BMC to confirm).
const TIMEOUT: Duration = Duration::from_secs(300);

/// A client of one server's admin API.
#[derive(Debug)]
pub struct Remote {
    base: String,
    token: String,
    client: reqwest::Client,
}

/// The error the admin API answers: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, serde::Deserialize)]
struct ApiError {
    error: ErrorBody,
}

#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

impl Remote {
    /// A client of `server` (`http[s]://HOST:PORT`) with the token in `token_file`, trusting
    /// `ca` (PEM) besides the system's roots for https.
    pub fn new(server: &str, token_file: Option<&Path>, ca: Option<&Path>) -> anyhow::Result<Remote> {
        let url = url::Url::parse(server).with_context(|| format!("--server {server:?}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!("--server {server:?}: expected http[s]://HOST[:PORT]");
        }
        let token_file = token_file
            .context("--server needs --token-file FILE (or NODEKEEPER_TOKEN_FILE): a token from `token create`")?;
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the token file {}", token_file.display()))?
            .trim()
            .to_owned();
        if crate::admin::split_admin_token(&token).is_none() {
            bail!("{}: not an admin token (nkt.NAME.SECRET, as `token create` prints it)", token_file.display());
        }
        let mut builder = reqwest::Client::builder().timeout(TIMEOUT).connect_timeout(Duration::from_secs(10));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().context("making the HTTP client")?;
        Ok(Remote { base: server.trim_end_matches('/').to_owned(), token, client })
    }

    /// Sends `call`; its reply as the server rendered it (JSON, or text when `json` is false).
    pub async fn call(&self, call: &Call, json: bool) -> anyhow::Result<Reply> {
        let request = call.request();
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).context("HTTP method")?;
        let url = format!("{}{}", self.base, request.path);
        let accept = if json { "application/json" } else { "text/plain" };
        let mut builder =
            self.client.request(method, &url).bearer_auth(&self.token).header(reqwest::header::ACCEPT, accept);
        builder = match request.body {
            Body::Empty => builder,
            Body::Json(v) => builder.json(&v),
            Body::Lines(text) => builder.header(reqwest::header::CONTENT_TYPE, "application/x-ndjson").body(text),
        };
        let response = builder.send().await.with_context(|| format!("{} {url}", request.method))?;
        let status = response.status();
        let body = response.text().await.with_context(|| format!("reading the answer of {url}"))?;
        if !status.is_success() {
            // The server's message is what the local CLI would say: printed alone.
            match serde_json::from_str::<ApiError>(&body) {
                Ok(e) => {
                    tracing::debug!(code = e.error.code, %status, "admin API refused {}", request.path);
                    bail!("{}", e.error.message)
                }
                Err(_) => bail!("{url}: {status}: {}", body.trim()),
            }
        }
        if json {
            let value: serde_json::Value =
                serde_json::from_str(&body).with_context(|| format!("{url}: the answer is not JSON"))?;
            Ok(Reply { json: value, text: String::new() })
        } else {
            Ok(Reply { json: serde_json::Value::Null, text: body })
        }
    }
}
