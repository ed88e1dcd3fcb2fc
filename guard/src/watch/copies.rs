//! Service copies: the guard starts the copies the database assigns to its host and stops
//! the ones it no longer does — what it started is kept in `state_dir/services.json` with the
//! command that stops it, so a copy moved away (or a service removed) is stopped even though
//! its definition is gone. A copy with a check is judged by it each pass (restarted when it
//! fails); one without, by what this guard started. A self-fence stops the exclusive copies
//! along with the HA domains.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nodekeeper_store::guard_api::AssignedService;
use serde::{Deserialize, Serialize};

/// A copy this guard started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// Its generation then.
    pub generation: u64,
    /// What stops it.
    pub stop: Vec<String>,
    /// Its service is exclusive.
    pub exclusive: bool,
}

/// What this guard started, by `SERVICE/SLOT`.
pub type Started = BTreeMap<String, Running>;

/// What to do about one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start it (not running here, or its check fails).
    Start(AssignedService),
    /// Stop it: no longer assigned here.
    Stop(String, Running),
}

/// What to do, from what is assigned, what this guard started, and the checks' verdicts
/// (`alive`, by key, for copies that have a check). Pure.
pub fn plan(assigned: &[AssignedService], started: &Started, alive: &BTreeMap<String, bool>) -> Vec<Step> {
    let mut steps = Vec::new();
    for a in assigned {
        let key = a.key();
        let runs = alive.get(&key).copied().unwrap_or_else(|| started.contains_key(&key));
        if !runs {
            steps.push(Step::Start(a.clone()));
        }
    }
    for (key, r) in started {
        if !assigned.iter().any(|a| a.key() == *key) {
            steps.push(Step::Stop(key.clone(), r.clone()));
        }
    }
    steps
}

/// The file, read (missing or unreadable: nothing started).
pub fn load(path: &Path) -> Started {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// The file, written whole (atomically).
pub fn save(path: &Path, started: &Started) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::fsutil::write_atomic(path, &serde_json::to_vec(started).unwrap_or_default())
        .with_context(|| format!("writing {}", path.display()))
}

/// How long a start, stop or check may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment a copy's commands get.
pub fn env(host: &str, service: &str, slot: &str) -> Vec<(String, String)> {
    vec![("NK_HOST".into(), host.into()), ("NK_SERVICE".into(), service.into()), ("NK_SLOT".into(), slot.into())]
}

/// Stops `copies` (by `SERVICE/SLOT`) all at once, each within `limit`, so the whole takes no
/// longer than one; returns those that did not stop (a stop that failed, timed out, or that
/// there is no command for) with why.
pub async fn stop_all(host: &str, copies: &[(String, Running)], limit: Duration) -> Vec<(String, String)> {
    let mut set = tokio::task::JoinSet::new();
    for (key, r) in copies {
        let (service, slot) = key.rsplit_once('/').unwrap_or((key.as_str(), ""));
        let env = env(host, service, slot);
        let (key, stop) = (key.clone(), r.stop.clone());
        set.spawn(async move {
            let why = match super::services::run_command_env(&stop, &env, limit).await {
                Some(ran) if ran.ok => None,
                Some(ran) => Some(ran.detail),
                None => Some("no stop command".to_owned()),
            };
            (key, why)
        });
    }
    let mut failed = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((key, Some(why))) => failed.push((key, why)),
            Ok((_, None)) => {}
            Err(e) => failed.push(("?".to_owned(), e.to_string())),
        }
    }
    failed.sort();
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(service: &str, slot: u32, check: bool) -> AssignedService {
        AssignedService {
            service: service.into(),
            slot,
            generation: 1,
            start: vec!["start".into()],
            stop: vec!["stop".into()],
            check: check.then(|| vec!["check".into()]),
            exclusive: false,
        }
    }

    fn running() -> Running {
        Running { generation: 1, stop: vec!["stop".into()], exclusive: true }
    }

    fn stopping(script: &str) -> Running {
        Running { generation: 1, stop: vec!["sh".into(), "-c".into(), script.into()], exclusive: true }
    }

    #[tokio::test]
    async fn stopping_all_copies_names_each_that_did_not_stop_and_runs_them_side_by_side() {
        let dir = tempfile::tempdir().expect("dir");
        let mark = dir.path().join("stopped");
        let copies = [
            ("api/0".to_owned(), stopping(&format!("echo \"$NK_SERVICE/$NK_SLOT on $NK_HOST\" >> {}", mark.display()))),
            ("db/1".to_owned(), stopping("echo refused >&2; exit 3")),
            ("slow/0".to_owned(), stopping("sleep 30")),
            ("none/0".to_owned(), Running { generation: 1, stop: Vec::new(), exclusive: true }),
        ];
        let failed = stop_all("node-a", &copies, Duration::from_secs(2)).await;
        let keys: Vec<&str> = failed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["db/1", "none/0", "slow/0"], "{failed:?}");
        assert!(failed[0].1.contains("refused"), "{failed:?}");
        assert_eq!(std::fs::read_to_string(&mark).expect("ran"), "api/0 on node-a\n", "with the copy's environment");
        // Side by side: the slow one's time, not the sum, bounds it (two slow ones, one limit).
        let two = [("a/0".to_owned(), stopping("sleep 30")), ("b/0".to_owned(), stopping("sleep 30"))];
        let start = std::time::Instant::now();
        assert_eq!(stop_all("node-a", &two, Duration::from_secs(2)).await.len(), 2);
        assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    }

    #[test]
    fn assigned_copies_start_once_and_the_rest_stop() {
        let mut started = Started::new();
        started.insert("api/0".into(), running());
        started.insert("old/1".into(), running());
        let alive = BTreeMap::new();
        let steps = plan(&[assigned("api", 0, false), assigned("web", 0, false)], &started, &alive);
        assert_eq!(
            steps,
            [Step::Start(assigned("web", 0, false)), Step::Stop("old/1".into(), running())],
            "api/0 runs (started here), web/0 starts, old/1 (moved away) stops"
        );
    }

    #[test]
    fn a_check_decides_over_what_was_started() {
        let mut started = Started::new();
        started.insert("api/0".into(), running());
        let failed: BTreeMap<String, bool> = [("api/0".to_owned(), false)].into();
        assert_eq!(plan(&[assigned("api", 0, true)], &started, &failed), [Step::Start(assigned("api", 0, true))]);
        // Running already (started by hand, or before the state file was lost): left alone.
        let fine: BTreeMap<String, bool> = [("api/0".to_owned(), true)].into();
        assert!(plan(&[assigned("api", 0, true)], &Started::new(), &fine).is_empty());
    }
}
