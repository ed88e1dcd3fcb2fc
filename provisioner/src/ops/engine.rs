//! The one engine every persisted operation runs on (reimage, fence): parse the row's typed
//! step and data, let the operation's [`Machine`] decide (observing, or carrying out the
//! step's effect and judging its result), carry out what the decision changes outside the
//! row, and record it on the row — a compare-and-set on the step with its event, written
//! under whatever lease the store carries (a leadership term, a per-operation claim).
//!
//! A step is idempotent: run twice on the same row, it decides the same, and only the first
//! record applies (the second loses its compare-and-set). So a runner that dies anywhere —
//! after a BMC command, after the host's state changed, before the row moved — is resumed by
//! running the step again (`provisioner/tests/ops_crash.rs` does so after every write of both
//! machines).

use std::fmt::Display;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use nodekeeper_store::{Operation, OperationStatus, StepChange, Store, StoreError, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What one step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<S> {
    /// Nothing yet (what a waiting step waits for has not happened).
    Stay,
    /// Go to `to` (attempts reset), with a deadline `after` from now if it has one.
    Go {
        /// The next step.
        to: S,
        /// Its deadline, from now.
        after: Option<Duration>,
        /// One sentence for the event log.
        why: String,
    },
    /// The step failed; try it again.
    Retry {
        /// Attempts so far, the failed one included.
        attempts: u32,
        /// What went wrong.
        error: String,
    },
    /// Called off before the point of return: the operation ends `done` at `aborted`.
    Abort {
        /// For the event.
        why: String,
    },
    /// Finished.
    Done {
        /// For the event.
        why: String,
    },
    /// Gave up at `at`.
    Failed {
        /// The step.
        at: S,
        /// Why.
        reason: String,
    },
}

/// A kind of operation: its typed step and data, how a step is decided, and what each
/// decision changes outside the operation's row.
pub trait Machine: Send + Sync {
    /// Its steps (persisted as words).
    type Step: Copy + PartialEq + Display + FromStr<Err = String> + Send + Sync;
    /// Its data (persisted as JSON).
    type Data: Serialize + DeserializeOwned + Send + Sync;

    /// `operations.kind`, and the word its events start with.
    const KIND: &'static str;
    /// The actor of its events.
    const ACTOR: &'static str;

    /// Decides `step` of `op`: observes, or carries out the step's effect (a BMC command, an
    /// evacuation) and judges its result. May update `data` (saved with `Go` and `Done`).
    fn decide(
        &self,
        store: &Store,
        op: &Operation,
        step: Self::Step,
        data: &mut Self::Data,
    ) -> impl Future<Output = Result<Decision<Self::Step>, StoreError>> + Send;

    /// What `decision` changes outside the row (a host's state, its image), carried out
    /// before the row records it: each idempotent, so a crash in between repeats both.
    fn effects(
        &self,
        store: &Store,
        op: &Operation,
        step: Self::Step,
        data: &mut Self::Data,
        decision: &Decision<Self::Step>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a step change on the operation's row ([`Store::advance_operation`]); a
    /// machine driven with many others at once may send it to a group commit instead
    /// ([`super::writes::StepWrites`]).
    fn advance(
        &self,
        store: &Store,
        id: i64,
        change: StepChange,
    ) -> impl Future<Output = Result<Option<Operation>, StoreError>> + Send {
        async move { store.advance_operation(id, &change, Self::ACTOR).await }
    }

    /// What cancelling it at `step` (asked by `by`) decides, or why it cannot be cancelled
    /// there (past its point of return); see [`super::cancel_rule`]. Not by default.
    fn cancel(&self, step: Self::Step, by: &str) -> Result<Decision<Self::Step>, String> {
        let _ = (step, by);
        Err(format!("a {} cannot be cancelled", Self::KIND))
    }

    /// The deadline a retried step gets (none by default).
    fn retry_deadline(&self, _data: &Self::Data) -> Option<Duration> {
        None
    }

    /// How many attempts a step has, for the events (not said by default).
    fn attempts_limit(&self, _data: &Self::Data) -> Option<u32> {
        None
    }
}

/// One step of `op` on machine `m`. An unreadable row fails the operation with the reason
/// rather than being guessed at. Everything logged meanwhile carries the operation's kind, id,
/// host and step.
#[tracing::instrument(name = "step", skip_all, fields(kind = M::KIND, operation = op.id, host = %op.target, step = %op.step))]
pub async fn step<M: Machine>(m: &M, store: &Store, op: Operation) -> Result<(), StoreError> {
    let (step, mut data): (M::Step, M::Data) = match super::parse_state(&op) {
        Ok(state) => state,
        Err(unreadable) => {
            return finish(m, store, &op, &op.step, OperationStatus::Failed, Some(unreadable.to_string())).await
        }
    };
    // Cancelled where its kind allows it at this step; past that point, it goes on.
    if let Some(Ok(decision)) = op.cancel_requested.as_deref().map(|by| m.cancel(step, by)) {
        return apply(m, store, &op, step, data, decision).await;
    }
    let decision = m.decide(store, &op, step, &mut data).await?;
    apply(m, store, &op, step, data, decision).await
}

/// Records `decision` (taken at `step`) on `op`, after its effects.
pub async fn apply<M: Machine>(
    m: &M,
    store: &Store,
    op: &Operation,
    step: M::Step,
    mut data: M::Data,
    decision: Decision<M::Step>,
) -> Result<(), StoreError> {
    if decision == Decision::Stay {
        return Ok(());
    }
    m.effects(store, op, step, &mut data, &decision).await?;
    let (kind, target) = (M::KIND, &op.target);
    match decision {
        Decision::Stay => Ok(()),
        Decision::Go { to, after: d, why } => {
            let change = StepChange {
                from: step.to_string(),
                to: to.to_string(),
                status: OperationStatus::Running,
                attempts: 0,
                deadline: match d {
                    Some(d) => Some(after(store, d).await?),
                    None => None,
                },
                last_error: None,
                data: serde_json::to_string(&data).ok(),
                event: format!("{kind} of {target}: {why}; next {to}"),
            };
            m.advance(store, op.id, change).await.map(drop)
        }
        Decision::Retry { attempts, error } => {
            let of = m.attempts_limit(&data).map(|n| format!(" of {n}")).unwrap_or_default();
            let change = StepChange {
                from: step.to_string(),
                to: step.to_string(),
                status: OperationStatus::Running,
                attempts,
                deadline: match m.retry_deadline(&data) {
                    Some(d) => Some(after(store, d).await?),
                    None => None,
                },
                last_error: Some(error.clone()),
                data: None,
                event: format!("{kind} of {target}: {step} failed (attempt {attempts}{of}): {error}"),
            };
            m.advance(store, op.id, change).await.map(drop)
        }
        Decision::Abort { why } => finish(m, store, op, "aborted", OperationStatus::Done, Some(why)).await,
        Decision::Done { why } => {
            let change = StepChange {
                from: step.to_string(),
                to: "done".into(),
                status: OperationStatus::Done,
                attempts: op.attempts,
                deadline: None,
                last_error: None,
                data: serde_json::to_string(&data).ok(),
                event: if why.is_empty() {
                    format!("{kind} of {target} done")
                } else {
                    format!("{kind} of {target} done: {why}")
                },
            };
            m.advance(store, op.id, change).await.map(drop)
        }
        Decision::Failed { at, reason } => {
            finish(m, store, op, &at.to_string(), OperationStatus::Failed, Some(reason)).await
        }
    }
}

/// Ends `op` at `step` with `status` (a `Failed` one with `reason` as its error; a `Done`
/// one — a fence called off — with `reason` in its event only).
async fn finish<M: Machine>(
    m: &M,
    store: &Store,
    op: &Operation,
    step: &str,
    status: OperationStatus,
    reason: Option<String>,
) -> Result<(), StoreError> {
    let (kind, target) = (M::KIND, &op.target);
    let event = match (&reason, status) {
        (Some(r), OperationStatus::Failed) => format!("{kind} of {target} failed at {step}: {r}"),
        (Some(r), _) => format!("{kind} of {target}: {r}"),
        (None, _) => format!("{kind} of {target} {step}"),
    };
    let change = StepChange {
        from: op.step.clone(),
        to: step.into(),
        status,
        attempts: op.attempts,
        deadline: None,
        last_error: if status == OperationStatus::Failed { reason } else { None },
        data: None,
        event,
    };
    m.advance(store, op.id, change).await.map(drop)
}

/// `d` from now, by the database's clock (deadlines are compared across replicas).
pub async fn after(store: &Store, d: Duration) -> Result<Timestamp, StoreError> {
    Ok(store.now().await? + d)
}
