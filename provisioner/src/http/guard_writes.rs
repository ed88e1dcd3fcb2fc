//! The guard API's group commit (as DHCP leases are written): every heartbeat and every
//! report queues here; one writer takes what has queued — everything that arrived while the
//! previous batch was being written, up to [`MAX_BATCH`] — and writes it in one transaction per
//! kind: the heartbeats in one statement that checks each token too
//! ([`Store::record_heartbeats`]), the reports in a few ([`Store::save_guard_reports`]). Under
//! load a batch grows instead of the queue: one commit (one fsync on SQLite) for hundreds of
//! guards. Alone, a request waits for nobody.

use std::time::Duration;

use nodekeeper_store::{HostName, ReportedDomain, Store, StoreError, Timestamp};
use tokio::sync::{mpsc, oneshot};

/// At most this many requests per batch (a heartbeat statement has two parameters each, well
/// under SQLite's 32,766 and PostgreSQL's 65,535).
pub const MAX_BATCH: usize = 1024;

/// What a heartbeat gets back: when and the host's revision, or `None` when the host is
/// unknown or its token did not match (nothing recorded: the caller finds out which).
pub type Recorded = Option<(Timestamp, i64)>;

enum Job {
    Beat { host: HostName, token_sha256: String, reply: oneshot::Sender<Result<Recorded, String>> },
    Report { host: HostName, domains: Vec<ReportedDomain>, reply: oneshot::Sender<Result<(), String>> },
}

/// The handle the guard API's handlers send to; cheap to clone.
#[derive(Debug, Clone)]
pub struct GuardWrites {
    tx: mpsc::Sender<Job>,
    /// How long a guard may go without a complete converge pass (told with every answer).
    pub full_pass: Duration,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Beat { host, .. } => write!(f, "heartbeat of {host}"),
            Job::Report { host, .. } => write!(f, "report of {host}"),
        }
    }
}

const STOPPED: &str = "the guard API's writer stopped";

impl GuardWrites {
    /// Starts the writer on `store` (it ends when every handle is dropped).
    pub fn start(store: Store, full_pass: Duration) -> GuardWrites {
        let (tx, rx) = mpsc::channel(64 * MAX_BATCH);
        tokio::spawn(writer(store, rx));
        GuardWrites { tx, full_pass }
    }

    /// Records `host`'s heartbeat if `token_sha256` is its node token's hash.
    pub async fn beat(&self, host: HostName, token_sha256: String) -> Result<Recorded, String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job::Beat { host, token_sha256, reply }).await.map_err(|_| STOPPED.to_owned())?;
        answer.await.map_err(|_| STOPPED.to_owned())?
    }

    /// Replaces `host`'s report (the caller has checked its token).
    pub async fn report(&self, host: HostName, domains: Vec<ReportedDomain>) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job::Report { host, domains, reply }).await.map_err(|_| STOPPED.to_owned())?;
        answer.await.map_err(|_| STOPPED.to_owned())?
    }
}

async fn writer(store: Store, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (mut beats, mut reports) = (Vec::new(), Vec::new());
        for job in batch.drain(..) {
            match job {
                Job::Beat { host, token_sha256, reply } => beats.push(((host, token_sha256), reply)),
                Job::Report { host, domains, reply } => reports.push(((host, domains), reply)),
            }
        }
        if !beats.is_empty() {
            let (items, replies): (Vec<_>, Vec<_>) = beats.into_iter().unzip();
            let mut result = store.record_heartbeats(&items).await;
            // A batch that lost a deadlock to a controller transaction (PostgreSQL) is tried once more.
            if let Err(StoreError::Query { .. }) = &result {
                result = store.record_heartbeats(&items).await;
            }
            match result {
                Ok((at, revisions)) => {
                    for (reply, r) in replies.into_iter().zip(revisions) {
                        let _ = reply.send(Ok(r.map(|r| (at, r))));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    tracing::warn!(heartbeats = items.len(), "recording heartbeats: {e}");
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        if !reports.is_empty() {
            let (items, replies): (Vec<_>, Vec<_>) = reports.into_iter().unzip();
            if let Err(e) = store.save_guard_reports(&items).await {
                // One bad report (its host removed meanwhile) must not fail the others.
                tracing::warn!(reports = items.len(), "saving guard reports together: {e}; one by one");
                for ((host, domains), reply) in items.iter().zip(replies) {
                    let _ = reply.send(store.save_guard_report(host, domains).await.map_err(|e| e.to_string()));
                }
                continue;
            }
            for reply in replies {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::testing::{host_name as n, TestDb};
    use nodekeeper_store::{Generation, InstanceId, NewHost};

    fn sha(token: &str) -> String {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(token.as_bytes()))
    }

    /// Many guards at once, in one or a few batches: each gets its own answer — a wrong token
    /// or an unknown host records nothing and does not fail the others; a report of a host
    /// that does not exist fails alone (the batch is written again one by one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_request_of_a_batch_gets_its_own_answer_and_one_bad_one_fails_alone() {
        let db = TestDb::sqlite();
        let store = db.store().await;
        let hosts: Vec<String> = (0..40).map(|i| format!("node-{i}")).collect();
        for h in &hosts {
            let new = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
            store.add_host(&new, "test").await.expect("host");
            store.set_node_token(&n(h), &sha(&format!("token-of-{h}"))).await.expect("token");
        }
        let writes = GuardWrites::start(store.clone(), Duration::from_secs(60));
        let mut calls = tokio::task::JoinSet::new();
        for (i, h) in hosts.iter().enumerate() {
            let (w, h) = (writes.clone(), h.clone());
            // Every fourth guard has a wrong token.
            let token = if i % 4 == 3 { sha("wrong") } else { sha(&format!("token-of-{h}")) };
            calls.spawn(async move { (h.clone(), "beat", w.beat(n(&h), token).await.map(|r| r.is_some())) });
            let (w, h) = (writes.clone(), hosts[i].clone());
            let domains = vec![ReportedDomain {
                uuid: InstanceId::random(),
                running: true,
                generation: Some(Generation(1)),
                migration_failed: None,
            }];
            calls.spawn(async move { (h.clone(), "report", w.report(n(&h), domains).await.map(|()| true)) });
        }
        let ghost = writes.clone();
        calls.spawn(
            async move { ("ghost".into(), "report", ghost.report(n("ghost"), Vec::new()).await.map(|()| true)) },
        );
        let unknown = writes.clone();
        calls.spawn(
            async move { ("ghost".into(), "beat", unknown.beat(n("ghost"), sha("x")).await.map(|r| r.is_some())) },
        );
        let mut answers = std::collections::HashMap::new();
        while let Some(done) = calls.join_next().await {
            let (h, kind, r) = done.expect("task");
            answers.insert((h, kind), r);
        }
        for (i, h) in hosts.iter().enumerate() {
            assert_eq!(answers[&(h.clone(), "beat")], Ok(i % 4 != 3), "{h}'s heartbeat");
            assert_eq!(answers[&(h.clone(), "report")], Ok(true), "{h}'s report");
            let recorded = store.require_host(&n(h)).await.expect("host").last_heartbeat.is_some();
            assert_eq!(recorded, i % 4 != 3, "{h}: recorded only with its own token");
            let report = store.guard_report(&n(h)).await.expect("read").expect("saved");
            assert_eq!(report.domains.len(), 1);
        }
        assert!(answers[&("ghost".into(), "report")].is_err(), "a report of an unknown host fails alone");
        assert_eq!(answers[&("ghost".into(), "beat")], Ok(false));
    }
}
