//! The services the guard watches (libvirtd, and `[[watch.services]]`): their checks, the
//! commands that kill, restart or reboot, and the restart budget — a pure rule: restart a
//! failed service, but after `max_restarts` within `restart_window`, reboot the host.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What to do about a service that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// Restart it (after killing it, if it is stuck).
    Restart,
    /// It failed `max_restarts` times within the window: reboot the host.
    Reboot,
}

/// Restarts per service within a sliding window.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    window: Duration,
    max: u32,
    recent: HashMap<String, VecDeque<Instant>>,
}

impl RestartBudget {
    /// `max` restarts within `window` before a reboot; `max = 0`: never reboot.
    pub fn new(max: u32, window: Duration) -> RestartBudget {
        RestartBudget { window, max, recent: HashMap::new() }
    }

    /// `name` failed at `now`: what to do. A restart is counted against the budget.
    pub fn on_failure(&mut self, name: &str, now: Instant) -> Remedy {
        let recent = self.recent.entry(name.to_owned()).or_default();
        while recent.front().is_some_and(|t| now.duration_since(*t) > self.window) {
            recent.pop_front();
        }
        if self.max > 0 && recent.len() as u32 >= self.max {
            return Remedy::Reboot;
        }
        recent.push_back(now);
        Remedy::Restart
    }

    /// Restarts of `name` counted now.
    pub fn restarts(&self, name: &str) -> usize {
        self.recent.get(name).map_or(0, VecDeque::len)
    }
}

/// Why a service's check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// It answered, badly (a failed command, an HTTP error, nothing listening).
    #[error("is down: {0}")]
    Down(String),
    /// It did not answer within its timeout: kill it before restarting.
    #[error("is stuck: {0}")]
    Stuck(String),
}

/// Runs a service's check.
pub async fn check_service(svc: &crate::config::ServiceCheck) -> Result<(), Failure> {
    let work = async {
        if let Some(url) = &svc.http {
            return http_ok(url, svc.timeout).await;
        }
        let Some((program, args)) = svc.check.split_first() else { return Ok(()) };
        let out = tokio::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("{:?}: {e}", svc.check))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{:?}: {} {}", svc.check, out.status, String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    match tokio::time::timeout(svc.timeout, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::Down(e)),
        Err(_) => Err(Failure::Stuck(format!("no answer within {}", humantime::format_duration(svc.timeout)))),
    }
}

/// GET `url` (http or https): a 2xx status is healthy.
async fn http_ok(url: &str, timeout: Duration) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent("nodekeeper-guard")
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    let status = client.get(url).send().await.map_err(|e| format!("{url}: {e}"))?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {}", status.as_u16()))
    }
}

/// What one command run came to.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Ran {
    /// The argv.
    pub command: Vec<String>,
    /// It exited 0 within its time.
    pub ok: bool,
    /// Its exit status or error, and the end of its stderr.
    pub detail: String,
}

/// Runs `argv` (nothing for an empty one) within 60 s, logging the outcome.
pub async fn run_command(argv: &[String]) {
    run_command_within(argv, Duration::from_secs(60)).await;
}

/// Runs `argv` within `limit`, logging and returning the outcome (`None`: an empty argv).
pub async fn run_command_within(argv: &[String], limit: Duration) -> Option<Ran> {
    run_command_env(argv, &[], limit).await
}

/// [`run_command_within`] with `env` added to the command's environment.
pub async fn run_command_env(argv: &[String], env: &[(String, String)], limit: Duration) -> Option<Ran> {
    let (program, args) = argv.split_first()?;
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let (ok, detail) = match out {
        Ok(Ok(o)) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let err = err.trim();
            let skip = err.chars().count().saturating_sub(300);
            let tail: String = err.chars().skip(skip).collect();
            (o.status.success(), if tail.is_empty() { o.status.to_string() } else { format!("{}: {tail}", o.status) })
        }
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, format!("did not finish within {}", humantime::format_duration(limit))),
    };
    if ok {
        tracing::info!("ran {argv:?}");
    } else {
        tracing::error!("{argv:?}: {detail}");
    }
    Some(Ran { command: argv.to_vec(), ok, detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_budget_restarts_then_reboots_within_its_window() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let window = Duration::from_secs(600);
        // (max, failures at seconds, what each gets)
        let table: &[(u32, &[u64], &[Remedy])] = &[
            (3, &[0, 10, 20, 30], &[Remedy::Restart, Remedy::Restart, Remedy::Restart, Remedy::Reboot]),
            // Spread out beyond the window: restarts forever.
            (3, &[0, 700, 1400, 2100, 2800], &[Remedy::Restart; 5]),
            // The oldest restart leaves the window: room for one more.
            (2, &[0, 100, 650, 660], &[Remedy::Restart, Remedy::Restart, Remedy::Restart, Remedy::Reboot]),
            // max = 0: never reboot.
            (0, &[0, 1, 2, 3, 4, 5], &[Remedy::Restart; 6]),
            (1, &[0, 1], &[Remedy::Restart, Remedy::Reboot]),
        ];
        for (max, at, want) in table {
            let mut budget = RestartBudget::new(*max, window);
            let got: Vec<Remedy> = at.iter().map(|t| budget.on_failure("libvirtd", s(*t))).collect();
            assert_eq!(&got, want, "max {max}, failures at {at:?}");
        }
    }

    #[test]
    fn each_service_has_its_own_budget() {
        let t0 = Instant::now();
        let mut budget = RestartBudget::new(2, Duration::from_secs(600));
        assert_eq!(budget.on_failure("libvirtd", t0), Remedy::Restart);
        assert_eq!(budget.on_failure("libvirtd", t0), Remedy::Restart);
        assert_eq!(budget.on_failure("ovs-vswitchd", t0), Remedy::Restart, "another service's restarts do not count");
        assert_eq!(budget.on_failure("libvirtd", t0), Remedy::Reboot);
        assert_eq!((budget.restarts("libvirtd"), budget.restarts("ovs-vswitchd")), (2, 1));
    }
}
