//! The append-only audit log: who did what to which host or instance, when, and why.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use crate::db::placeholders;
use crate::db::{get, parse_column};
use crate::error::{query, Result};
use crate::types::{HostName, InstanceId, Timestamp};
use crate::Store;

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Who acted: `cli:USER`, `guard:HOST`, `controller`, ...
    pub actor: String,
    /// Dotted kind: `host.added`, `instance.evacuated`, `instance.quarantined`, ...
    pub kind: String,
    /// The host concerned, if any.
    pub host: Option<HostName>,
    /// The instance concerned, if any.
    pub instance: Option<InstanceId>,
    /// One human sentence.
    pub message: String,
    /// Idempotency key: an event with a key already recorded is not recorded again.
    pub key: Option<String>,
}

impl NewEvent {
    /// An event about a host.
    pub fn host(actor: &str, kind: &str, host: &HostName, message: String) -> NewEvent {
        NewEvent {
            actor: actor.to_owned(),
            kind: kind.to_owned(),
            host: Some(host.clone()),
            instance: None,
            message,
            key: None,
        }
    }

    /// An event about an instance (and the host it concerns).
    pub fn instance(actor: &str, kind: &str, host: &HostName, instance: InstanceId, message: String) -> NewEvent {
        NewEvent {
            actor: actor.to_owned(),
            kind: kind.to_owned(),
            host: Some(host.clone()),
            instance: Some(instance),
            message,
            key: None,
        }
    }

    /// An event about the cell as a whole (the image catalogue, ...): no host, no instance.
    pub fn cell(actor: &str, kind: &str, message: String) -> NewEvent {
        NewEvent { actor: actor.to_owned(), kind: kind.to_owned(), host: None, instance: None, message, key: None }
    }

    /// The same event with an idempotency key.
    pub fn with_key(self, key: String) -> NewEvent {
        NewEvent { key: Some(key), ..self }
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Position in the log (increasing).
    pub id: i64,
    /// When it was recorded.
    pub at: Timestamp,
    /// Who acted.
    pub actor: String,
    /// Dotted kind.
    pub kind: String,
    /// The host concerned.
    pub host: Option<HostName>,
    /// The instance concerned.
    pub instance: Option<InstanceId>,
    /// One human sentence.
    pub message: String,
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only about this host.
    pub host: Option<HostName>,
    /// Only about this instance.
    pub instance: Option<InstanceId>,
    /// Only with an id greater than this (for following the log).
    pub after: Option<i64>,
    /// At most this many, the newest (default 100).
    pub limit: Option<u32>,
}

/// Appends an event inside the caller's transaction, so the event exists iff the change does.
/// Serializes the transactions that append events (PostgreSQL; SQLite has one writer at a
/// time anyway), so event ids become visible in order: a follower that read up to id N never
/// misses an N-1 that was still uncommitted (PostgreSQL hands out sequence values at insert,
/// not at commit). Held until the transaction ends; taken by every writer of events.
pub(crate) async fn lock_event_order(conn: &mut sqlx::AnyConnection) -> Result<()> {
    if crate::db::backend_of(conn) == crate::Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7271001)")
            .execute(&mut *conn)
            .await
            .map_err(query("ordering events"))?;
    }
    Ok(())
}

/// Its time is the database server's.
pub(crate) async fn insert_event(conn: &mut sqlx::AnyConnection, e: &NewEvent) -> Result<()> {
    lock_event_order(conn).await?;
    let sql = format!(
        "INSERT INTO events (at, actor, kind, host, instance, message, key) VALUES ({}, $1, $2, $3, $4, $5, $6) \
         ON CONFLICT (key) DO NOTHING",
        crate::db::db_now_sql(crate::db::backend_of(conn))
    );
    sqlx::query(&sql)
        .bind(e.actor.as_str())
        .bind(e.kind.as_str())
        .bind(e.host.as_ref().map(|h| h.as_str().to_owned()))
        .bind(e.instance.map(|i| i.to_string()))
        .bind(e.message.as_str())
        .bind(e.key.clone())
        .execute(conn)
        .await
        .map_err(query("recording an event"))?;
    Ok(())
}

fn event_from_row(row: &AnyRow) -> Result<Event> {
    const T: &str = "events";
    Ok(Event {
        id: get(row, T, "id")?,
        at: Timestamp(get(row, T, "at")?),
        actor: get(row, T, "actor")?,
        kind: get(row, T, "kind")?,
        host: get::<Option<String>>(row, T, "host")?.map(|h| parse_column(T, "host", &h)).transpose()?,
        instance: get::<Option<String>>(row, T, "instance")?.map(|i| parse_column(T, "instance", &i)).transpose()?,
        message: get(row, T, "message")?,
    })
}

/// Rows per multi-row event insert (7 parameters each).
const EVENT_BATCH: usize = 1000;
const EVENT_COLUMNS: usize = 7;

impl Store {
    /// Appends events in one transaction, in order (all or none). Events whose key is
    /// already recorded are skipped, so replaying a batch after a crash records nothing twice.
    pub async fn record_events(&self, events: &[NewEvent]) -> Result<()> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "recording events";
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write(WHAT).await?;
        lock_event_order(&mut tx).await?;
        let now = db_now;
        for chunk in events.chunks(EVENT_BATCH) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|r| format!("({})", placeholders(self.backend(), r * EVENT_COLUMNS + 1, EVENT_COLUMNS)))
                .collect();
            let sql = format!(
                "INSERT INTO events (at, actor, kind, host, instance, message, key) VALUES {} ON CONFLICT (key) DO NOTHING",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(now)
                    .bind(e.actor.as_str())
                    .bind(e.kind.as_str())
                    .bind(e.host.as_ref().map(|h| h.as_str().to_owned()))
                    .bind(e.instance.map(|i| i.to_string()))
                    .bind(e.message.as_str())
                    .bind(e.key.clone());
            }
            q.execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(())
    }

    /// Appends one event on its own.
    pub async fn record_event(&self, e: &NewEvent) -> Result<()> {
        const WHAT: &str = "recording an event";
        let mut tx = self.begin_write(WHAT).await?;
        insert_event(&mut tx, e).await?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// The first `limit` events after id `after` (of `host`, if given), oldest first: for
    /// followers that must see every event once, in order.
    pub async fn events_after(&self, after: i64, host: Option<&HostName>, limit: u32) -> Result<Vec<Event>> {
        let mut sql = String::from("SELECT id, at, actor, kind, host, instance, message FROM events WHERE id > $1");
        if host.is_some() {
            sql.push_str(" AND host = $2");
        }
        sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
        let mut q = sqlx::query(&sql).bind(after);
        if let Some(h) = host {
            q = q.bind(h.as_str().to_owned());
        }
        let rows = q.fetch_all(&self.pool).await.map_err(query("reading events"))?;
        rows.iter().map(event_from_row).collect()
    }

    /// The newest event's id (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64> {
        let row = sqlx::query("SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) AS id FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(query("reading events"))?;
        sqlx::Row::try_get(&row, "id").map_err(query("reading events"))
    }

    /// Events matching `filter`, oldest first (the newest `limit` of them).
    pub async fn events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        let mut sql = String::from("SELECT id, at, actor, kind, host, instance, message FROM events WHERE id > $1");
        if filter.host.is_some() {
            sql.push_str(" AND host = $2");
        }
        if filter.instance.is_some() {
            sql.push_str(if filter.host.is_some() { " AND instance = $3" } else { " AND instance = $2" });
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", filter.limit.unwrap_or(100)));
        let mut q = sqlx::query(&sql).bind(filter.after.unwrap_or(0));
        if let Some(h) = &filter.host {
            q = q.bind(h.as_str().to_owned());
        }
        if let Some(i) = filter.instance {
            q = q.bind(i.to_string());
        }
        let rows = q.fetch_all(&self.pool).await.map_err(query("reading events"))?;
        let mut events = rows.iter().map(event_from_row).collect::<Result<Vec<_>>>()?;
        events.reverse();
        Ok(events)
    }
}
