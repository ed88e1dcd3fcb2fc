//! How operations are stepped, in one place (as omicron's background-task driver runs every
//! task), two disciplines:
//! - [`run`]: every replica, every `tick`, each running operation of the machine's kind gets
//!   one step in a task of its own, under a **claim** on it — a lease row `KIND:ID` renewed
//!   while the step works and released after it — so one replica at a time steps an
//!   operation, and a replica that paused past its claim sends no BMC command and changes no
//!   step when it wakes (its writes carry the claim's term). Reimages run so.
//! - [`step_each`]: the operations given, once each, in order, under the lease the store
//!   already carries. Fences run so when a test drives the controller's tick (one step a
//!   tick); in `serve` each fence has a driver task of its own under the controller's lease
//!   (`recovery::controller`).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_store::{Operation, OperationStatus, Store, StoreError};
use tokio_util::sync::CancellationToken;

use super::engine::{self, Machine};

/// How long a claim on an operation lasts unless renewed (it is renewed every third of that
/// while its step works).
pub const CLAIM_TTL: Duration = Duration::from_secs(15);

/// A machine stepped by the runner: the engine's machine, and the cheap check that spares a
/// claim when a step would only wait.
pub trait Claimed: Machine {
    /// Whether `op` waits and nothing it waits for has happened: then there is nothing to
    /// write and no claim is taken (reads only — a claim is two commits, and most ticks of
    /// most long operations are waits). `false` by default.
    fn idle(&self, _store: &Store, _op: &Operation) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async { Ok(false) }
    }
}

/// Steps each of `ops` once, in order, under whatever lease `store` carries. A step that
/// fails is logged and the others go on. Returns how many were stepped.
pub async fn step_each<M: Machine>(m: &M, store: &Store, ops: Vec<Operation>) -> usize {
    let mut stepped = 0;
    for op in ops {
        let id = op.id;
        if let Err(e) = engine::step(m, store, op).await {
            tracing::warn!(kind = M::KIND, operation = id, "step: {e}");
        }
        stepped += 1;
    }
    stepped
}

/// The claim's role in the leadership table.
pub fn claim_role<M: Machine>(op: i64) -> String {
    format!("{}:{op}", M::KIND)
}

/// Takes the claim on `op` for `holder` and runs one step under it; `false` when another
/// replica holds it. The claim is released after the step (and forgotten once the operation
/// has ended), so whichever replica looks next may take the next step.
pub async fn step_claimed<M: Claimed>(m: &M, store: &Store, holder: &str, op: Operation) -> Result<bool, StoreError> {
    // A cancel asked for is news: the step is taken (the machine decides whether it can).
    if op.cancel_requested.is_none() && m.idle(store, &op).await? {
        return Ok(true);
    }
    let (role, ttl) = (claim_role::<M>(op.id), i64::try_from(CLAIM_TTL.as_millis()).unwrap_or(15_000));
    let claim = store.acquire_leadership(&role, holder, ttl).await?;
    if !claim.held_by(holder, store.now().await?) {
        return Ok(false);
    }
    let claimed = store.under_lease(claim.token());
    let id = op.id;
    let stepped = super::while_leading(store, &claim, ttl, engine::step(m, &claimed, op)).await;
    let ended = matches!(store.operation(id).await, Ok(Some(o)) if o.status != OperationStatus::Running);
    let released = if ended {
        store.forget_leadership(&role, holder).await
    } else {
        store.release_leadership(&role, holder).await
    };
    if let Err(e) = released {
        tracing::warn!(operation = id, "releasing the claim: {e}");
    }
    stepped??;
    Ok(true)
}

/// Steps every running operation of `M::KIND` until `shutdown`, looking every `tick`.
/// `holder` names this replica in its claims (unique among replicas: host name and process
/// id). An operation whose previous step still runs is skipped this tick.
pub async fn run<M: Claimed + 'static>(
    store: Store,
    machine: Arc<M>,
    holder: String,
    tick: Duration,
    shutdown: CancellationToken,
) {
    let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
        }
        while tasks.try_join_next().is_some() {}
        let ops = match store.running_operations(M::KIND).await {
            Ok(ops) => ops,
            Err(e) => {
                tracing::warn!(kind = M::KIND, "reading operations: {e}");
                continue;
            }
        };
        for op in ops {
            if !in_flight.lock().map(|mut s| s.insert(op.id)).unwrap_or(false) {
                continue; // its previous step is still running
            }
            let (store, machine, in_flight, holder) =
                (store.clone(), machine.clone(), in_flight.clone(), holder.clone());
            tasks.spawn(async move {
                let id = op.id;
                if let Err(e) = step_claimed(machine.as_ref(), &store, &holder, op).await {
                    tracing::warn!(kind = M::KIND, operation = id, "step: {e}");
                }
                in_flight.lock().map(|mut s| s.remove(&id)).ok();
            });
        }
    }
    // A clean stop lets the steps under way finish (they are bounded: a BMC step by its
    // deadline), rather than dropping one in the middle of a transaction; then stops the rest.
    let finishing = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), finishing).await.is_err() {
        tasks.shutdown().await;
    }
    // A clean stop hands the claims of the steps it interrupted to the next replica at once
    // (a crash leaves them to expire).
    if let Err(e) = store.release_all_leadership(&format!("{}:", M::KIND), &holder).await {
        tracing::warn!(kind = M::KIND, "releasing the claims: {e}");
    }
}
