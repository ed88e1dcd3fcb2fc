//! Services with n active copies (`services`, `service_copies`, `host_labels`; migration 0023):
//! what runs where beside the instances. The controller assigns each copy (a slot) to an
//! eligible host; the guard of that host starts it, the guards of the others stop it. A copy
//! moves by a compare-and-set on its generation, as an instance's owner does.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use crate::db::get;
use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::{HostName, Timestamp};
use crate::Store;

/// A service's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Its name: 1 to 64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// How many copies run at once.
    pub copies: u32,
    /// A host runs a copy only with every one of these labels.
    pub labels: Vec<String>,
    /// Starts a copy on a host (argv; `$NK_SERVICE`, `$NK_SLOT`, `$NK_HOST` in its environment).
    pub start: Vec<String>,
    /// Stops it.
    pub stop: Vec<String>,
    /// Exits 0 while the copy runs (none: the guard trusts what it started).
    pub check: Option<Vec<String>>,
    /// A copy leaves a failed host only once that host is fenced (confirmed off).
    pub exclusive: bool,
}

/// One copy of a service: where it runs, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceCopy {
    /// The service.
    pub service: String,
    /// Its slot, 0 to copies - 1.
    pub slot: u32,
    /// The host it is assigned to.
    pub host: HostName,
    /// +1 on every move.
    pub generation: u64,
    /// Assigned to that host since.
    pub since: Timestamp,
}

/// A change of one copy, as the controller decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyChange {
    /// Put a missing slot on `host`.
    Place {
        /// The service.
        service: String,
        /// The slot.
        slot: u32,
        /// Where.
        host: HostName,
    },
    /// Move a slot from the host it has at `generation` to `to`.
    Move {
        /// The service.
        service: String,
        /// The slot.
        slot: u32,
        /// The generation read.
        generation: u64,
        /// Its host now.
        from: HostName,
        /// Where it goes.
        to: HostName,
        /// Why (the event).
        why: String,
    },
    /// Drop a slot past the service's copies.
    Drop {
        /// The service.
        service: String,
        /// The slot.
        slot: u32,
    },
}

/// A service or label name: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn valid_name(name: &str) -> bool {
    crate::policy::valid_group(name)
}

const T: &str = "services";
const COLUMNS: &str = "name, copies, labels, start_cmd, stop_cmd, check_cmd, \
    CAST(CASE WHEN exclusive THEN 1 ELSE 0 END AS BIGINT) AS exclusive";

fn json_column<V: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> Result<V> {
    let text: String = get(row, T, column)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt { table: T, reason: format!("column {column}: {e}") })
}

fn service_from(row: &AnyRow) -> Result<Service> {
    let check: Option<String> = get(row, T, "check_cmd")?;
    Ok(Service {
        name: get(row, T, "name")?,
        copies: u32::try_from(get::<i64>(row, T, "copies")?).unwrap_or(0),
        labels: json_column(row, "labels")?,
        start: json_column(row, "start_cmd")?,
        stop: json_column(row, "stop_cmd")?,
        check: check
            .map(|c| serde_json::from_str(&c))
            .transpose()
            .map_err(|e| StoreError::Corrupt { table: T, reason: format!("column check_cmd: {e}") })?,
        exclusive: get::<i64>(row, T, "exclusive")? != 0,
    })
}

fn copy_from(row: &AnyRow) -> Result<ServiceCopy> {
    const C: &str = "service_copies";
    let host: String = get(row, C, "host")?;
    Ok(ServiceCopy {
        service: get(row, C, "service")?,
        slot: u32::try_from(get::<i64>(row, C, "slot")?).unwrap_or(0),
        host: crate::db::parse_column(C, "host", &host)?,
        generation: u64::try_from(get::<i64>(row, C, "generation")?).unwrap_or(0),
        since: Timestamp(get(row, C, "since")?),
    })
}

/// Checks a definition: names, a non-empty start and stop, no empty argv.
fn check(s: &Service) -> Result<()> {
    if !valid_name(&s.name) {
        return Err(StoreError::Invalid(format!("service name {:?}: 1 to 64 of [A-Za-z0-9_.-]", s.name)));
    }
    if let Some(l) = s.labels.iter().find(|l| !valid_name(l)) {
        return Err(StoreError::Invalid(format!("label {l:?}: 1 to 64 of [A-Za-z0-9_.-]")));
    }
    let argv = |what: &str, v: &[String]| {
        if v.is_empty() || v[0].is_empty() {
            Err(StoreError::Invalid(format!("service {}: the {what} command is empty", s.name)))
        } else {
            Ok(())
        }
    };
    argv("start", &s.start)?;
    argv("stop", &s.stop)?;
    if let Some(c) = &s.check {
        argv("check", c)?;
    }
    if s.copies > 1000 {
        return Err(StoreError::Invalid(format!("service {}: at most 1000 copies", s.name)));
    }
    Ok(())
}

fn json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

impl Store {
    /// Adds a service, or replaces the definition of one of that name (its copies stay where
    /// they run; the controller adds or drops slots to match `copies`).
    pub async fn put_service(&self, s: &Service, actor: &str) -> Result<Service> {
        const WHAT: &str = "defining a service";
        check(s)?;
        let now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let exists = sqlx::query("SELECT name FROM services WHERE name = $1")
            .bind(&s.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query(WHAT))?
            .is_some();
        let sql = if exists {
            "UPDATE services SET copies = $2, labels = $3, start_cmd = $4, stop_cmd = $5, check_cmd = $6, \
             exclusive = $7, updated_at = $8 WHERE name = $1"
        } else {
            "INSERT INTO services (name, copies, labels, start_cmd, stop_cmd, check_cmd, exclusive, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"
        };
        sqlx::query(sql)
            .bind(&s.name)
            .bind(i64::from(s.copies))
            .bind(json(&s.labels))
            .bind(json(&s.start))
            .bind(json(&s.stop))
            .bind(s.check.as_ref().map(json))
            .bind(s.exclusive)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let verb = if exists { "changed" } else { "added" };
        let message = format!(
            "service {} {verb}: {} cop{}{}{}",
            s.name,
            s.copies,
            if s.copies == 1 { "y" } else { "ies" },
            if s.labels.is_empty() { String::new() } else { format!(" on hosts labelled {}", s.labels.join(", ")) },
            if s.exclusive { ", exclusive" } else { "" }
        );
        insert_event(&mut tx, &NewEvent::cell(actor, &format!("service.{verb}"), message)).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(s.clone())
    }

    /// Removes a service and its copies (the guards stop them).
    pub async fn remove_service(&self, name: &str, actor: &str) -> Result<()> {
        const WHAT: &str = "removing a service";
        let mut tx = self.begin_write(WHAT).await?;
        sqlx::query("DELETE FROM service_copies WHERE service = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let done = sqlx::query("DELETE FROM services WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownService(name.to_owned()));
        }
        insert_event(&mut tx, &NewEvent::cell(actor, "service.removed", format!("service {name} removed"))).await?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// Every service, by name.
    pub async fn services(&self) -> Result<Vec<Service>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM services ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query("listing services"))?;
        rows.iter().map(service_from).collect()
    }

    /// Every copy of every service (of `service` only, when given), by service and slot.
    pub async fn service_copies(&self, service: Option<&str>) -> Result<Vec<ServiceCopy>> {
        let rows = sqlx::query(
            "SELECT service, slot, host, generation, since FROM service_copies \
             WHERE ($1 = '' OR service = $1) ORDER BY service, slot",
        )
        .bind(service.unwrap_or(""))
        .fetch_all(&self.pool)
        .await
        .map_err(query("listing service copies"))?;
        rows.iter().map(copy_from).collect()
    }

    /// The copies assigned to `host`, with their services' definitions (what its guard runs).
    pub async fn services_of(&self, host: &HostName) -> Result<Vec<(ServiceCopy, Service)>> {
        let copies: Vec<ServiceCopy> =
            self.service_copies(None).await?.into_iter().filter(|c| &c.host == host).collect();
        if copies.is_empty() {
            return Ok(Vec::new());
        }
        let defs: BTreeMap<String, Service> = self.services().await?.into_iter().map(|s| (s.name.clone(), s)).collect();
        Ok(copies.into_iter().filter_map(|c| defs.get(&c.service).cloned().map(|s| (c, s))).collect())
    }

    /// Replaces `host`'s labels, with an event.
    pub async fn set_host_labels(&self, host: &HostName, labels: &BTreeSet<String>, actor: &str) -> Result<()> {
        const WHAT: &str = "setting a host's labels";
        if let Some(l) = labels.iter().find(|l| !valid_name(l)) {
            return Err(StoreError::Invalid(format!("label {l:?}: 1 to 64 of [A-Za-z0-9_.-]")));
        }
        let mut tx = self.begin_write(WHAT).await?;
        self.host_in(&mut tx, host).await?.ok_or_else(|| StoreError::UnknownHost(host.clone()))?;
        sqlx::query("DELETE FROM host_labels WHERE host = $1")
            .bind(host.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        for l in labels {
            sqlx::query("INSERT INTO host_labels (host, label) VALUES ($1, $2)")
                .bind(host.as_str())
                .bind(l)
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
        }
        let shown =
            if labels.is_empty() { "none".to_owned() } else { labels.iter().cloned().collect::<Vec<_>>().join(", ") };
        insert_event(&mut tx, &NewEvent::host(actor, "host.changed", host, format!("{host}: labels {shown}"))).await?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// Every host's labels.
    pub async fn host_labels(&self) -> Result<BTreeMap<HostName, BTreeSet<String>>> {
        let rows = sqlx::query("SELECT host, label FROM host_labels ORDER BY host, label")
            .fetch_all(&self.pool)
            .await
            .map_err(query("reading host labels"))?;
        let mut out: BTreeMap<HostName, BTreeSet<String>> = BTreeMap::new();
        for r in &rows {
            let host: String = get(r, "host_labels", "host")?;
            out.entry(crate::db::parse_column("host_labels", "host", &host)?).or_default().insert(get(
                r,
                "host_labels",
                "label",
            )?);
        }
        Ok(out)
    }

    /// Applies one change of the controller's, with its event: `false` when it lost its
    /// compare-and-set (someone else changed the slot first), and nothing changed.
    pub async fn change_service_copy(&self, change: &CopyChange, actor: &str) -> Result<bool> {
        const WHAT: &str = "changing a service copy";
        let now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let (done, event) = match change {
            CopyChange::Place { service, slot, host } => {
                let done = sqlx::query(
                    "INSERT INTO service_copies (service, slot, host, generation, since) \
                     SELECT $1, $2, $3, 1, $4 WHERE NOT EXISTS \
                     (SELECT 1 FROM service_copies WHERE service = $1 AND slot = $2)",
                )
                .bind(service)
                .bind(i64::from(*slot))
                .bind(host.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
                let e = NewEvent::host(
                    actor,
                    "service.placed",
                    host,
                    format!("service {service} copy {slot} runs on {host}"),
                );
                (done.rows_affected() == 1, e)
            }
            CopyChange::Move { service, slot, generation, from, to, why } => {
                let done = sqlx::query(
                    "UPDATE service_copies SET host = $1, generation = generation + 1, since = $2 \
                     WHERE service = $3 AND slot = $4 AND generation = $5 AND host = $6",
                )
                .bind(to.as_str())
                .bind(now)
                .bind(service)
                .bind(i64::from(*slot))
                .bind(i64::try_from(*generation).unwrap_or(i64::MAX))
                .bind(from.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
                let m = format!("service {service} copy {slot} moved from {from} to {to}: {why}");
                (done.rows_affected() == 1, NewEvent::host(actor, "service.moved", from, m))
            }
            CopyChange::Drop { service, slot } => {
                let done = sqlx::query("DELETE FROM service_copies WHERE service = $1 AND slot = $2")
                    .bind(service)
                    .bind(i64::from(*slot))
                    .execute(&mut *tx)
                    .await
                    .map_err(query(WHAT))?;
                (
                    done.rows_affected() == 1,
                    NewEvent::cell(actor, "service.dropped", format!("service {service} copy {slot} dropped")),
                )
            }
        };
        if !done {
            return Ok(false);
        }
        insert_event(&mut tx, &event).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(true)
    }
}
