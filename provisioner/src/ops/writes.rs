//! Step changes in group commits (as the guards' heartbeats are): the steps of many
//! operations driven at once (a rack's fences) queue here, and one writer records everything
//! that queued while the previous batch was being written — up to [`MAX_BATCH`] — in one
//! transaction ([`Store::advance_operations`]), each still a compare-and-set of its own. On
//! SQLite, 500 fences were ~2,000 commits through its one writer, queued behind each other
//! and in front of every evacuation's moves; now a handful. Alone, a change waits for nobody.
//! The writer writes through the store it was started with: under the lease of the term its
//! operations are driven in (a new term starts a new one).

use nodekeeper_store::{Operation, StepChange, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

/// At most this many step changes per transaction.
pub const MAX_BATCH: usize = 256;

struct Job {
    id: i64,
    change: StepChange,
    actor: &'static str,
    reply: oneshot::Sender<Result<Option<Operation>, StoreError>>,
}

/// The handle the operations' steps send their changes to; cheap to clone.
#[derive(Clone)]
pub struct StepWrites {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for StepWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepWrites")
    }
}

impl StepWrites {
    /// Starts the writer on `store` (it ends when every handle is dropped).
    pub fn start(store: Store) -> StepWrites {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(writer(store, rx));
        StepWrites { tx }
    }

    /// [`Store::advance_operation`], in the next group commit.
    pub async fn advance(
        &self,
        id: i64,
        change: StepChange,
        actor: &'static str,
    ) -> Result<Option<Operation>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Invalid("the step writer stopped".into());
        self.tx.send(Job { id, change, actor, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn writer(store: Store, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let changes: Vec<(i64, StepChange, &str)> = batch.iter().map(|j| (j.id, j.change.clone(), j.actor)).collect();
        match store.advance_operations(&changes).await {
            Ok(done) => {
                for (job, op) in batch.drain(..).zip(done) {
                    let _ = job.reply.send(Ok(op));
                }
            }
            // A lost lease, a database error: each written (or refused) on its own, so each
            // gets its own answer.
            Err(e) => {
                if batch.len() > 1 {
                    tracing::warn!(changes = batch.len(), "recording steps together: {e}; one by one");
                }
                for job in batch.drain(..) {
                    let _ = job.reply.send(store.advance_operation(job.id, &job.change, job.actor).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_store::testing::{host_name as n, TestDb};
    use nodekeeper_store::{NewHost, OperationStatus};

    fn change(from: &str, to: &str) -> StepChange {
        StepChange {
            from: from.into(),
            to: to.into(),
            status: OperationStatus::Running,
            attempts: 0,
            deadline: None,
            last_error: None,
            data: None,
            event: format!("{from} -> {to}"),
        }
    }

    /// Forty operations stepped at once through one writer under a lease: each gets its own
    /// answer (one sent from a step it is not at changes nothing);
    /// once another replica holds the lease, every change is refused and none is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_sent_at_once_each_get_their_own_answer_and_a_lost_lease_refuses_each() {
        let db = TestDb::sqlite();
        let store = db.store().await;
        let mut ids = Vec::new();
        for i in 0..40 {
            let new =
                NewHost { name: n(&format!("node-{i}")), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
            store.add_host(&new, "test").await.expect("host");
            let (op, _) = store.start_operation("fence", &new.name, "confirm", None, "{}", "test").await.expect("op");
            ids.push(op.id);
        }
        let lease = store.acquire_leadership("controller", "replica-1", 60_000).await.expect("lease");
        let writes = StepWrites::start(store.under_lease(lease.token()));
        let mut calls = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().copied().enumerate() {
            let w = writes.clone();
            // Every tenth from the wrong step.
            let from = if i % 10 == 9 { "power_off" } else { "confirm" };
            calls.spawn(async move { (i, w.advance(id, change(from, "power_off"), "test").await) });
        }
        while let Some(done) = calls.join_next().await {
            let (i, result) = done.expect("task");
            let op = result.expect("written");
            assert_eq!(op.is_some(), i % 10 != 9, "operation {i}");
        }
        let ops = store.running_operations("fence").await.expect("ops");
        assert_eq!(ops.iter().filter(|o| o.step == "power_off").count(), 36);
        // Another replica takes the lease over (this one's expired): every change refused.
        store.release_leadership("controller", "replica-1").await.expect("released");
        store.acquire_leadership("controller", "replica-2", 60_000).await.expect("taken over");
        let mut calls = tokio::task::JoinSet::new();
        for id in ids.iter().copied() {
            let w = writes.clone();
            calls.spawn(async move { w.advance(id, change("power_off", "evacuate"), "test").await });
        }
        while let Some(done) = calls.join_next().await {
            assert!(matches!(done.expect("task"), Err(StoreError::LeaseLost { .. })), "refused under a lost lease");
        }
        let ops = store.running_operations("fence").await.expect("ops");
        assert!(ops.iter().all(|o| o.step != "evacuate"), "nothing written by the stale replica");
    }
}
