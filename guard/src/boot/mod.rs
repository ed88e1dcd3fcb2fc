//! `nodekeeper-guard boot`: before libvirtd starts, quarantine the definitions of instances
//! that were recovered elsewhere while this host was down.
//!
//! Flow: finish any journaled work → scan files → ask the database (one batched query,
//! retried with backoff up to `db_wait`) → [`decide`](decide::decide) (pure) →
//! [`execute`](execute::execute) (files) → record events → write the cache → report.

pub mod decide;
pub mod execute;
pub mod live;
pub mod scan;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodekeeper_store::{HostName, InstanceId, NewEvent};
use serde::Serialize;

use crate::backend::Backend;
use crate::config::Config;
use crate::fault;
use crate::fsutil;
use decide::{Cache, DbAnswer};
use execute::{Dirs, Journal};
use scan::FileError;

/// The `--json` report (contract: "Guard boot" in DESIGN.md; the keys after `errors` are
/// extensions).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    /// This host's name, from the config.
    pub host: HostName,
    /// `ok` or `unreachable`.
    pub database: DatabaseState,
    /// Definitions kept.
    pub kept: Vec<InstanceId>,
    /// Definitions moved to quarantine by this run.
    pub quarantined: Vec<InstanceId>,
    /// Definitions the database does not know (left alone).
    pub unknown: Vec<InstanceId>,
    /// Domains whose autostart link is moved aside (by this run or an earlier one).
    pub blocked: Vec<InstanceId>,
    /// Domains whose autostart link this run gave back.
    pub restored: Vec<InstanceId>,
    /// Files that could not be used or moved, and configuration problems.
    pub errors: Vec<FileError>,
    /// Why the database could not be used, when it could not (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_error: Option<String>,
    /// The policy applied when the database could not decide (extension).
    pub on_db_unreachable: crate::config::OnDbUnreachable,
    /// Wall time of the run in milliseconds (extension).
    pub elapsed_ms: u64,
    /// Stale definitions that could not be quarantined (state directory full or read-only)
    /// and were held in place: renamed `NAME.xml.nk-held`, autostart link removed, so
    /// libvirtd does not define them (extension).
    pub held: Vec<InstanceId>,
}

/// `ok` | `unreachable`
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseState {
    /// The database answered.
    Ok,
    /// It did not, within `db_wait`.
    Unreachable,
}

/// The run cannot proceed at all: the host may still boot, but the guard could not act.
#[derive(Debug, thiserror::Error)]
#[error("state directory {path} is unusable")]
pub struct BootError {
    /// `state_dir` (or the part of it that failed).
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Runs the boot pass. Idempotent: a second run right after the first changes nothing.
pub async fn run(config: &Config) -> Result<Report, BootError> {
    let started = Instant::now();
    let dirs = Dirs { config_dir: config.libvirt.config_dir.clone(), state_dir: config.boot.state_dir.clone() };
    let state_err = |source| BootError { path: dirs.state_dir.clone(), source };
    // A state directory that cannot be made (a read-only or full disk) does not stop the pass:
    // what cannot be quarantined is held in place (see `execute`), and the report says so.
    let unprepared = dirs.prepare().err();
    if let Some(e) = &unprepared {
        tracing::error!("state directory {}: {e}: stale definitions will be held in place", dirs.state_dir.display());
    }

    let (scan, journal, cache, mut errors) = {
        let (dirs, host) = (dirs.clone(), config.host.clone());
        tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            if let Some(e) = unprepared {
                errors
                    .push(FileError { path: dirs.state_dir.clone(), reason: format!("state directory unusable: {e}") });
            }
            let journal = Journal::load(&dirs, &mut errors);
            let cache = load_cache(&dirs, &host, &mut errors);
            scan::scan(&dirs.config_dir, &dirs.blocked()).map(|s| (s, journal, cache, errors))
        })
        .await
        .map_err(|e| state_err(std::io::Error::other(e)))?
        .map_err(state_err)?
    };
    tracing::info!(
        domains = scan.domains.len(),
        unreadable = scan.errors.len(),
        "scanned {}",
        dirs.config_dir.display()
    );

    let uuids: Vec<InstanceId> =
        scan.domains.iter().map(|d| d.meta.uuid).collect::<BTreeSet<_>>().into_iter().collect();
    let (answer, store, database_error) = ask_database(config, &uuids).await;
    if let DbAnswer::Reached { host_known: false, .. } = answer {
        errors.push(FileError {
            path: PathBuf::from("host"),
            reason: format!(
                "host {} is not in the database's host table: configuration error; nothing quarantined, autostarts blocked per {}",
                config.host,
                serde_json::to_value(config.boot.on_db_unreachable).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            ),
        });
    }

    tracing::info!(elapsed_ms = started.elapsed().as_millis(), "database answered");
    let plan = decide::decide(&config.host, &scan, &answer, &cache, config.boot.on_db_unreachable);
    let (outcome, mut journal, held_done) = {
        let (dirs, actions, held) = (dirs.clone(), plan.actions.clone(), scan.held.clone());
        tokio::task::spawn_blocking(move || {
            let (outcome, journal) = execute::execute(&dirs, journal, &actions)?;
            // Definitions an earlier run held in place join the quarantine now, if it can.
            let mut errors = Vec::new();
            let moved = execute::finish_held(&dirs, &held, &mut errors);
            Ok::<_, std::io::Error>((outcome, journal, (moved, errors)))
        })
        .await
        .map_err(|e| state_err(std::io::Error::other(e)))?
        .map_err(state_err)?
    };
    let (held_moved, held_errors) = held_done;
    errors.extend(held_errors);
    if !outcome.held.is_empty() {
        tracing::error!(
            held = ?outcome.held,
            "stale definitions could not be quarantined (state directory full or read-only): held in place, libvirtd will not define them"
        );
    }

    tracing::info!(elapsed_ms = started.elapsed().as_millis(), actions = plan.actions.len(), "files moved");
    // Events for what moved, then the journal can go.
    if let Some(store) = &store {
        let actor = format!("guard:{}", config.host);
        let mut events: Vec<NewEvent> = journal
            .entries
            .iter()
            .map(|q| {
                let message = format!(
                    "stale definition {} quarantined to {}: {}",
                    q.source.display(),
                    q.dest.display(),
                    q.reason
                );
                NewEvent::instance(&actor, "instance.quarantined", &config.host, q.uuid, message).with_key(format!(
                    "quarantine:{}:{}",
                    config.host,
                    q.dest.display()
                ))
            })
            .collect();
        events.extend(outcome.restored.iter().map(|u| {
            NewEvent::instance(
                &actor,
                "instance.autostart-restored",
                &config.host,
                *u,
                format!("autostart of {u} restored: the database confirms it"),
            )
        }));
        events.extend(held_moved.iter().map(|(from, to)| {
            NewEvent::host(
                &actor,
                "instance.quarantined",
                &config.host,
                format!("definition held in place earlier, {}, quarantined to {}", from.display(), to.display()),
            )
            .with_key(format!("quarantine:{}:{}", config.host, to.display()))
        }));
        events.extend(outcome.held.iter().map(|u| {
            NewEvent::instance(
                &actor,
                "instance.quarantine_held",
                &config.host,
                *u,
                format!("stale definition of {u} could not be quarantined (state directory full or read-only): held in place, not defined by libvirtd"),
            )
        }));
        if matches!(answer, DbAnswer::Reached { host_known: false, .. }) {
            events.push(NewEvent::host(
                &actor,
                "guard.host-unknown",
                &config.host,
                format!(
                    "guard boot on {}: host not in the host table; {} autostart link(s) blocked",
                    config.host,
                    outcome.blocked.len()
                ),
            ));
        }
        match store.record_events(&events).await {
            Ok(()) => {
                fault::point("after-events");
                journal.entries.clear();
            }
            Err(e) => errors.push(FileError {
                path: dirs.journal(),
                reason: format!("events not recorded yet, kept in the journal: {e:#}"),
            }),
        }
        store.close().await;
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis(), "events recorded");
    if let Err(e) = journal.store(&dirs) {
        errors.push(FileError { path: dirs.journal(), reason: format!("journal: {e}") });
    }
    if let Some(cache) = &plan.cache {
        let written = serde_json::to_vec_pretty(cache)
            .map_err(std::io::Error::other)
            .and_then(|b| fsutil::write_atomic(&dirs.cache(), &b));
        if let Err(e) = written {
            errors.push(FileError { path: dirs.cache(), reason: format!("cache not written: {e}") });
        }
    }

    errors.extend(plan.errors);
    errors.extend(outcome.errors);
    let quarantined: BTreeSet<InstanceId> = outcome.quarantined.iter().map(|q| q.uuid).collect();
    let blocked: BTreeSet<InstanceId> = outcome.blocked.iter().chain(&plan.still_blocked).copied().collect();
    Ok(Report {
        host: config.host.clone(),
        database: if store.is_some() { DatabaseState::Ok } else { DatabaseState::Unreachable },
        kept: plan.kept,
        quarantined: quarantined.into_iter().collect(),
        unknown: plan.unknown,
        blocked: blocked.into_iter().collect(),
        restored: outcome.restored,
        errors,
        database_error,
        on_db_unreachable: config.boot.on_db_unreachable,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        held: outcome.held,
    })
}

/// Asks the database about this host and every local UUID, retrying with exponential
/// backoff (0.25 s doubling to 5 s) until `db_wait` is spent. At least one attempt is made.
pub(crate) async fn ask_database(config: &Config, uuids: &[InstanceId]) -> (DbAnswer, Option<Backend>, Option<String>) {
    let deadline = Instant::now() + config.boot.db_wait;
    let mut delay = Duration::from_millis(250);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let budget =
            deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_secs(1), Duration::from_secs(10));
        let result = tokio::time::timeout(budget, query_database(config, uuids, budget)).await;
        let err = match result {
            Ok(Ok((answer, store))) => return (answer, Some(store), None),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {}", humantime::format_duration(budget)),
        };
        let now = Instant::now();
        if now + delay >= deadline {
            tracing::warn!(attempts = attempt, "database unreachable: {err}");
            return (DbAnswer::Unreachable, None, Some(err));
        }
        tracing::info!(attempt, "database not answering, retrying in {delay:?}: {err}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn query_database(
    config: &Config,
    uuids: &[InstanceId],
    timeout: Duration,
) -> anyhow::Result<(DbAnswer, Backend)> {
    let store = Backend::connect(config, timeout).await?;
    store.check_schema().await?;
    let host_known = store.host_known(&config.host).await?;
    let ownership = if host_known {
        store.ownership(uuids).await?.into_iter().map(|o| (o.uuid, o)).collect()
    } else {
        HashMap::new()
    };
    Ok((DbAnswer::Reached { host_known, ownership }, store))
}

/// The cache of the last run that reached the database; empty when missing, unreadable, or
/// written for another host name (a renamed host must not inherit HA flags).
fn load_cache(dirs: &Dirs, host: &HostName, errors: &mut Vec<FileError>) -> Cache {
    let cache = read_cache(dirs, errors);
    if cache.host.as_ref().is_some_and(|h| h != host) {
        return Cache::default();
    }
    cache
}

fn read_cache(dirs: &Dirs, errors: &mut Vec<FileError>) -> Cache {
    match std::fs::read(dirs.cache()) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            errors.push(FileError { path: dirs.cache(), reason: format!("cache unreadable, ignored: {e}") });
            Cache::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cache::default(),
        Err(e) => {
            errors.push(FileError { path: dirs.cache(), reason: format!("cache unreadable, ignored: {e}") });
            Cache::default()
        }
    }
}
