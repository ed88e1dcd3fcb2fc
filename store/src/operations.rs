//! Multi-step operations (reimage, fence, evacuate): one row each, with the current step,
//! attempts, deadline and last error, so the process running them can die at any point and
//! its successor resumes from the database. At most one running operation per kind and
//! target (a partial unique index); a step only advances from the step the caller read
//! (compare-and-set), so two executors can never both act on one transition.

use serde::Serialize;
use sqlx::any::AnyRow;

use crate::db::{get, parse_column};
use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::{HostName, OperationStatus, Timestamp};
use crate::Store;

/// An operation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// Its id.
    pub id: i64,
    /// `reimage`, `fence`, ...
    pub kind: String,
    /// The host it acts on.
    pub target: HostName,
    /// The current (or, when ended, the last) step.
    pub step: String,
    /// Running, done or failed.
    pub status: OperationStatus,
    /// Attempts of the current step.
    pub attempts: u32,
    /// When the current step times out.
    pub deadline: Option<Timestamp>,
    /// Why the last attempt (or the operation) failed.
    pub last_error: Option<String>,
    /// Kind-specific state (JSON text), written by the executor.
    pub data: String,
    /// The latest report from outside (the deploy agent), JSON text.
    pub report: Option<String>,
    /// When it started.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Who asked to cancel it (`operation cancel`): its runner ends it at its next step where
    /// its kind allows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<String>,
}

/// A change of step, applied only if the operation is still at `from` (see
/// [`Store::advance_operation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepChange {
    /// The step the caller read.
    pub from: String,
    /// The step it goes to (may equal `from`: a retry).
    pub to: String,
    /// Running, or ended as done / failed.
    pub status: OperationStatus,
    /// Attempts of the new step.
    pub attempts: u32,
    /// Its deadline.
    pub deadline: Option<Timestamp>,
    /// Error to record (a failed attempt or the final reason).
    pub last_error: Option<String>,
    /// New kind-specific state, if it changes.
    pub data: Option<String>,
    /// The event recorded with the change (same transaction).
    pub event: String,
}

const COLUMNS: &str =
    "id, kind, target, step, status, attempts, deadline, last_error, data, report, created_at, updated_at, \
     cancel_requested";

fn from_row(row: &AnyRow) -> Result<Operation> {
    const T: &str = "operations";
    Ok(Operation {
        id: get(row, T, "id")?,
        kind: get(row, T, "kind")?,
        target: parse_column(T, "target", &get::<String>(row, T, "target")?)?,
        step: get(row, T, "step")?,
        status: parse_column(T, "status", &get::<String>(row, T, "status")?)?,
        attempts: u32::try_from(get::<i64>(row, T, "attempts")?).unwrap_or(u32::MAX),
        deadline: get::<Option<i64>>(row, T, "deadline")?.map(Timestamp),
        last_error: get(row, T, "last_error")?,
        data: get(row, T, "data")?,
        report: get(row, T, "report")?,
        created_at: Timestamp(get(row, T, "created_at")?),
        updated_at: Timestamp(get(row, T, "updated_at")?),
        cancel_requested: get(row, T, "cancel_requested")?,
    })
}

/// Operation `id` as `conn` sees it (inside a transaction that just changed it).
async fn operation_in(conn: &mut sqlx::AnyConnection, id: i64, what: &'static str) -> Result<Operation> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .map_err(query(what))?;
    from_row(&row)
}

impl Store {
    /// Starts an operation, or returns the one of this kind already running on `target`
    /// (`false` in the second field). Records an event when it starts one.
    pub async fn start_operation(
        &self,
        kind: &str,
        target: &HostName,
        first_step: &str,
        deadline: Option<Timestamp>,
        data: &str,
        actor: &str,
    ) -> Result<(Operation, bool)> {
        self.start_operation_using(kind, target, first_step, deadline, data, actor, None).await
    }

    /// [`Store::start_operation`] for an operation that uses the catalogue image `image`
    /// (a reimage): the image must exist ([`StoreError::UnknownImage`]), and cannot be removed
    /// while the operation runs. Its row is locked first, so a concurrent `image remove`
    /// either sees this operation or happened before it (on PostgreSQL as on SQLite).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_operation_using(
        &self,
        kind: &str,
        target: &HostName,
        first_step: &str,
        deadline: Option<Timestamp>,
        data: &str,
        actor: &str,
        image: Option<&str>,
    ) -> Result<(Operation, bool)> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "starting an operation";
        let mut tx = self.begin_write(WHAT).await?;
        if self.host_in(&mut tx, target).await?.is_none() {
            return Err(StoreError::UnknownHost(target.clone()));
        }
        let running = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operations WHERE kind = $1 AND target = $2 AND status = 'running'"
        ))
        .bind(kind)
        .bind(target.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        if let Some(row) = running {
            return Ok((from_row(&row)?, false));
        }
        let now = db_now;
        if let Some(image) = image {
            let touched = sqlx::query("UPDATE images SET last_used_at = $1 WHERE name = $2")
                .bind(now)
                .bind(image)
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
            if touched.rows_affected() == 0 {
                return Err(StoreError::UnknownImage(image.to_owned()));
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO operations (kind, target, step, status, attempts, deadline, data, created_at, updated_at, \
             image) VALUES ($1, $2, $3, 'running', 0, $4, $5, $6, $6, $7)",
        )
        .bind(kind)
        .bind(target.as_str())
        .bind(first_step)
        .bind(deadline.map(|d| d.0))
        .bind(data)
        .bind(now)
        .bind(image)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // A concurrent start won (the partial unique index): return its operation.
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                drop(tx);
                let row = sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM operations WHERE kind = $1 AND target = $2 AND status = 'running'"
                ))
                .bind(kind)
                .bind(target.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(query(WHAT))?;
                return Ok((from_row(&row)?, false));
            }
            Err(e) => return Err(StoreError::Query { what: WHAT, source: e }),
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operations WHERE kind = $1 AND target = $2 AND status = 'running'"
        ))
        .bind(kind)
        .bind(target.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        let op = from_row(&row)?;
        let message = format!("{kind} of {target} started (operation {}, step {first_step})", op.id);
        insert_event(&mut tx, &NewEvent::host(actor, &format!("{kind}.started"), target, message)).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok((op, true))
    }

    /// [`Store::start_operation`] for many hosts in one transaction (a rack's fences at once),
    /// each at `first_step` with `data`: returns, in order, each new operation's id, or `None`
    /// when it did not start (one of its kind already runs for that host, or the host does not
    /// exist). A race
    /// with another start (the unique index) fails the whole batch: nothing is written, and
    /// the caller may start them one by one.
    pub async fn start_operations(
        &self,
        kind: &str,
        starts: &[(HostName, String, String)],
        actor: &str,
    ) -> Result<Vec<Option<i64>>> {
        const WHAT: &str = "starting operations";
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let mut out = Vec::with_capacity(starts.len());
        for (target, first_step, data) in starts {
            if self.host_in(&mut tx, target).await?.is_none() {
                out.push(None);
                continue;
            }
            let running: Option<i64> =
                sqlx::query_scalar("SELECT id FROM operations WHERE kind = $1 AND target = $2 AND status = 'running'")
                    .bind(kind)
                    .bind(target.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(query(WHAT))?;
            if running.is_some() {
                out.push(None);
                continue;
            }
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO operations (kind, target, step, status, attempts, deadline, data, created_at, updated_at) \
                 VALUES ($1, $2, $3, 'running', 0, NULL, $4, $5, $5) RETURNING id",
            )
            .bind(kind)
            .bind(target.as_str())
            .bind(first_step)
            .bind(data)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(query(WHAT))?;
            let message = format!("{kind} of {target} started (operation {id}, step {first_step})");
            insert_event(&mut tx, &NewEvent::host(actor, &format!("{kind}.started"), target, message)).await?;
            out.push(Some(id));
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(out)
    }

    /// Running operations of `kind`, oldest first (what an executor resumes after a restart).
    pub async fn running_operations(&self, kind: &str) -> Result<Vec<Operation>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operations WHERE kind = $1 AND status = 'running' ORDER BY id"
        ))
        .bind(kind)
        .fetch_all(&self.pool)
        .await
        .map_err(query("listing running operations"))?;
        rows.iter().map(from_row).collect()
    }

    /// Operations, newest first: of `target` only when given, running ones only when
    /// `running`, at most `limit`.
    pub async fn operations(&self, target: Option<&HostName>, running: bool, limit: u32) -> Result<Vec<Operation>> {
        let mut sql = format!("SELECT {COLUMNS} FROM operations WHERE ($1 = '' OR target = $1)");
        if running {
            sql.push_str(" AND status = 'running'");
        }
        sql.push_str(" ORDER BY id DESC LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(target.map_or("", HostName::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query("listing operations"))?;
        rows.iter().map(from_row).collect()
    }

    /// The newest operation on `target` of any kind, running or ended.
    pub async fn latest_operation(&self, target: &HostName) -> Result<Option<Operation>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM operations WHERE target = $1 ORDER BY id DESC LIMIT 1"))
            .bind(target.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading an operation"))?;
        row.as_ref().map(from_row).transpose()
    }

    /// The newest operation of `kind` on `target`, running or ended.
    pub async fn latest_operation_of(&self, kind: &str, target: &HostName) -> Result<Option<Operation>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operations WHERE kind = $1 AND target = $2 ORDER BY id DESC LIMIT 1"
        ))
        .bind(kind)
        .bind(target.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(query("reading an operation"))?;
        row.as_ref().map(from_row).transpose()
    }

    /// Stores an outside report (the deploy agent's) on the running operation `kind` of
    /// `target`, with an event — only while that operation is at `step` (the step that waits
    /// for this report; a compare-and-set). Returns the operation, or `None` when none is
    /// running at that step (nothing stored).
    pub async fn report_operation(
        &self,
        kind: &str,
        target: &HostName,
        step: &str,
        report: &str,
        message: &str,
        actor: &str,
    ) -> Result<Option<Operation>> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "recording a report";
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query(
            "UPDATE operations SET report = $1, updated_at = $2 \
             WHERE kind = $3 AND target = $4 AND status = 'running' AND step = $5",
        )
        .bind(report)
        .bind(db_now)
        .bind(kind)
        .bind(target.as_str())
        .bind(step)
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM operations WHERE kind = $1 AND target = $2 AND status = 'running'"
        ))
        .bind(kind)
        .bind(target.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        insert_event(&mut tx, &NewEvent::host(actor, &format!("{kind}.report"), target, message.to_owned())).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(Some(from_row(&row)?))
    }

    /// `actor` asks to cancel running operation `id` (its runner decides at its next step);
    /// one `KIND.cancel_requested` event. `None` when no operation `id` runs.
    pub async fn request_cancel(&self, id: i64, actor: &str) -> Result<Option<Operation>> {
        const WHAT: &str = "cancelling an operation";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query(
            "UPDATE operations SET cancel_requested = $1, updated_at = $2 WHERE id = $3 AND status = 'running'",
        )
        .bind(actor)
        .bind(db_now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        let op = operation_in(&mut tx, id, WHAT).await?;
        let m = format!("{} of {} (operation {id}, step {}): cancel requested by {actor}", op.kind, op.target, op.step);
        insert_event(&mut tx, &NewEvent::host(actor, &format!("{}.cancel_requested", op.kind), &op.target, m)).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(Some(op))
    }

    /// One operation by id.
    pub async fn operation(&self, id: i64) -> Result<Option<Operation>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading an operation"))?;
        row.as_ref().map(from_row).transpose()
    }

    /// Applies `change` if operation `id` is still running at step `change.from`, with its
    /// event, in one transaction. Returns the operation after the change, or `None` when
    /// someone else moved it first (the caller re-reads and decides again).
    pub async fn advance_operation(&self, id: i64, change: &StepChange, actor: &str) -> Result<Option<Operation>> {
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(ADVANCING).await?;
        let op = advance_in(&mut tx, id, change, actor, db_now).await?;
        tx.commit().await.map_err(query(ADVANCING))?;
        Ok(op)
    }

    /// [`Store::advance_operation`] for many operations in one transaction (the steps of a
    /// rack's fences: one commit, not one each), each a compare-and-set of its own: returns,
    /// in order, each operation after its change, or `None` for one someone else moved first.
    /// A database error writes none of them (the caller may write them one by one).
    pub async fn advance_operations(&self, changes: &[(i64, StepChange, &str)]) -> Result<Vec<Option<Operation>>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(ADVANCING).await?;
        let mut out = Vec::with_capacity(changes.len());
        for (id, change, actor) in changes {
            out.push(advance_in(&mut tx, *id, change, actor, db_now).await?);
        }
        tx.commit().await.map_err(query(ADVANCING))?;
        Ok(out)
    }
}

const ADVANCING: &str = "advancing an operation";

/// One step change inside `conn`'s transaction (see [`Store::advance_operation`]).
async fn advance_in(
    conn: &mut sqlx::AnyConnection,
    id: i64,
    change: &StepChange,
    actor: &str,
    db_now: i64,
) -> Result<Option<Operation>> {
    let done = sqlx::query(
        "UPDATE operations SET step = $1, status = $2, attempts = $3, deadline = $4, last_error = $5, \
         data = COALESCE($6, data), updated_at = $7 WHERE id = $8 AND step = $9 AND status = 'running'",
    )
    .bind(change.to.as_str())
    .bind(change.status.as_str())
    .bind(i64::from(change.attempts))
    .bind(change.deadline.map(|d| d.0))
    .bind(change.last_error.clone())
    .bind(change.data.clone())
    .bind(db_now)
    .bind(id)
    .bind(change.from.as_str())
    .execute(&mut *conn)
    .await
    .map_err(query(ADVANCING))?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    let op = operation_in(&mut *conn, id, ADVANCING).await?;
    let kind = format!(
        "{}.{}",
        op.kind,
        if change.status == OperationStatus::Running { "step" } else { change.status.as_str() }
    );
    insert_event(&mut *conn, &NewEvent::host(actor, &kind, &op.target, change.event.clone())).await?;
    Ok(Some(op))
}
