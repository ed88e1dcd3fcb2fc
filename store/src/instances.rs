//! The instance table: who owns each VM, at which generation, and how to recreate it.
//!
//! Ownership only changes through a compare-and-set on the generation
//! ([`Store::transfer_owner`]), in the same statement that bumps it: of two concurrent
//! moves of one instance, exactly one wins and the other gets [`StoreError::Conflict`].

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use crate::db::{backend_of, placeholders};
use crate::db::{get, parse_column};
use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::{Generation, HostName, HostState, InstanceId, Storage, Timestamp};
use crate::Store;

/// Rows per multi-row `INSERT` during import: 1,000 rows of 9 parameters stay far below both
/// SQLite's (32,766) and PostgreSQL's (65,535) limit on bound parameters.
const IMPORT_BATCH: usize = 1000;
const IMPORT_COLUMNS: usize = 9;
/// Ids per `IN (...)` list: the guard's boot asks about all its definitions in one query
/// (10,000 ids is one statement), under both engines' bound-parameter limits.
const LOOKUP_BATCH: usize = 30_000;

/// An instance to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInstance {
    /// Its UUID (libvirt's `<uuid>`).
    pub uuid: InstanceId,
    /// Its libvirt name.
    pub name: String,
    /// The host that owns it now.
    pub owner: HostName,
    /// Whether it is recovered on another host when its owner fails.
    pub ha: bool,
    /// Where its disks live.
    pub storage: Storage,
    /// Its generation (1 for a new instance).
    pub generation: Generation,
    /// The domain XML to recreate it from.
    pub domain_xml: Option<String>,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// UUID.
    pub uuid: InstanceId,
    /// libvirt name.
    pub name: String,
    /// Owning host.
    #[serde(rename = "host")]
    pub owner: HostName,
    /// +1 on every change of owner.
    pub generation: Generation,
    /// Recovered elsewhere on failure.
    pub ha: bool,
    /// Where its disks live.
    pub storage: Storage,
    /// Tombstone: deleted instances are kept, never erased.
    pub deleted: bool,
    /// Whether a domain XML is stored (the XML itself is left out of listings).
    pub has_domain_xml: bool,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Held by a drain: its owner's guard keeps it stopped until it moves.
    pub held: bool,
    /// Being live-migrated by a drain to this host (its owner's guard migrates it; the
    /// controller makes the target its owner once the move is seen done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<HostName>,
    /// The target's libvirt URI, while migrating.
    #[serde(skip)]
    pub migration_uri: Option<String>,
    /// Since when it is migrating (a guard report must be newer to count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration_started_at: Option<Timestamp>,
}

/// What the guard needs to judge a local definition: owner, generation, tombstone, HA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// UUID.
    pub uuid: InstanceId,
    /// Owning host.
    pub owner: HostName,
    /// Current generation.
    pub generation: Generation,
    /// Tombstoned.
    pub deleted: bool,
    /// HA flag.
    pub ha: bool,
    /// Being live-migrated to this host: its domain there is the instance arriving, not a
    /// stale copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<HostName>,
}

/// Why the controller moves an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// A recovery from a fenced host (counts towards `max_relocate`).
    Recovery,
    /// A drain's planned move of a held instance.
    Drain,
}

/// The result of moving one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transfer {
    /// The instance.
    pub uuid: InstanceId,
    /// The owner before.
    pub from: HostName,
    /// The owner after.
    pub to: HostName,
    /// The generation after (unchanged when `moved` is false).
    pub generation: Generation,
    /// False when it was already owned by the target.
    pub moved: bool,
}

// Booleans are read as 0/1 BIGINTs: `sqlx::Any` cannot decode SQLite's BOOLEAN, and a CAST
// reads the same on both engines.
const INSTANCE_COLUMNS: &str = "uuid, name, owner, generation, \
    CAST(CASE WHEN ha THEN 1 ELSE 0 END AS BIGINT) AS ha, storage, \
    CAST(CASE WHEN deleted THEN 1 ELSE 0 END AS BIGINT) AS deleted, \
    CAST(CASE WHEN domain_xml IS NULL THEN 0 ELSE 1 END AS BIGINT) AS has_xml, created_at, updated_at, \
    CAST(CASE WHEN held THEN 1 ELSE 0 END AS BIGINT) AS held, migrating_to, migration_uri, migration_started_at";
const OWNERSHIP_COLUMNS: &str = "uuid, owner, generation, \
    CAST(CASE WHEN deleted THEN 1 ELSE 0 END AS BIGINT) AS deleted, \
    CAST(CASE WHEN ha THEN 1 ELSE 0 END AS BIGINT) AS ha, migrating_to";

pub(crate) fn flag(row: &AnyRow, column: &str) -> Result<bool> {
    Ok(get::<i64>(row, "instances", column)? != 0)
}

fn instance_from_row(row: &AnyRow) -> Result<Instance> {
    const T: &str = "instances";
    Ok(Instance {
        uuid: parse_column(T, "uuid", &get::<String>(row, T, "uuid")?)?,
        name: get(row, T, "name")?,
        owner: parse_column(T, "owner", &get::<String>(row, T, "owner")?)?,
        generation: Generation::from_db(get(row, T, "generation")?),
        ha: flag(row, "ha")?,
        storage: parse_column(T, "storage", &get::<String>(row, T, "storage")?)?,
        deleted: flag(row, "deleted")?,
        has_domain_xml: flag(row, "has_xml")?,
        created_at: Timestamp(get(row, T, "created_at")?),
        updated_at: Timestamp(get(row, T, "updated_at")?),
        held: flag(row, "held")?,
        migrating_to: migrating_to(row)?,
        migration_uri: get(row, T, "migration_uri")?,
        migration_started_at: get::<Option<i64>>(row, T, "migration_started_at")?.map(Timestamp),
    })
}

fn migrating_to(row: &AnyRow) -> Result<Option<HostName>> {
    const T: &str = "instances";
    get::<Option<String>>(row, T, "migrating_to")?.map(|h| parse_column(T, "migrating_to", &h)).transpose()
}

pub(crate) fn ownership_from_row(row: &AnyRow) -> Result<Ownership> {
    const T: &str = "instances";
    Ok(Ownership {
        uuid: parse_column(T, "uuid", &get::<String>(row, T, "uuid")?)?,
        owner: parse_column(T, "owner", &get::<String>(row, T, "owner")?)?,
        generation: Generation::from_db(get(row, T, "generation")?),
        deleted: flag(row, "deleted")?,
        ha: flag(row, "ha")?,
        migrating_to: migrating_to(row)?,
    })
}

fn item_error(index: usize, source: StoreError) -> StoreError {
    StoreError::Item { index, source: Box::new(source) }
}

impl Store {
    /// Imports instances all or nothing, in one transaction with multi-row inserts.
    ///
    /// Every item is checked first (its owner exists, its UUID appears once in the batch and
    /// not in the database); the first bad one fails the whole import with
    /// [`StoreError::Item`] giving its position, and nothing is written.
    pub async fn import_instances(&self, items: &[NewInstance], actor: &str) -> Result<usize> {
        self.import_instances_with(items, &[], actor).await
    }

    /// [`Store::import_instances`], with each item's recovery policy (`policies[i]` for
    /// `items[i]`; missing ones are the default), in the same transaction.
    pub async fn import_instances_with(
        &self,
        items: &[NewInstance],
        policies: &[crate::InstancePolicy],
        actor: &str,
    ) -> Result<usize> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "importing instances";
        let mut seen = HashMap::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            if seen.insert(item.uuid, index).is_some() {
                return Err(item_error(index, StoreError::InstanceExists(item.uuid)));
            }
        }
        let mut tx = self.begin_write(WHAT).await?;
        let hosts: HashSet<String> = sqlx::query_scalar("SELECT name FROM hosts")
            .fetch_all(&mut *tx)
            .await
            .map_err(query(WHAT))?
            .into_iter()
            .collect();
        if let Some((index, item)) = items.iter().enumerate().find(|(_, i)| !hosts.contains(i.owner.as_str())) {
            return Err(item_error(index, StoreError::UnknownHost(item.owner.clone())));
        }
        let existing = lookup_in(&mut tx, items.iter().map(|i| i.uuid)).await?;
        if let Some(first) = existing.iter().filter_map(|o| seen.get(&o.uuid)).min() {
            return Err(item_error(*first, StoreError::InstanceExists(items[*first].uuid)));
        }
        let now = db_now;
        for chunk in items.chunks(IMPORT_BATCH) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|r| format!("({})", placeholders(self.backend(), r * IMPORT_COLUMNS + 1, IMPORT_COLUMNS)))
                .collect();
            let sql = format!(
                "INSERT INTO instances (uuid, name, owner, generation, ha, storage, domain_xml, created_at, updated_at) VALUES {}",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for item in chunk {
                q = q
                    .bind(item.uuid.to_string())
                    .bind(item.name.clone())
                    .bind(item.owner.as_str().to_owned())
                    .bind(item.generation.to_db())
                    .bind(item.ha)
                    .bind(item.storage.as_str())
                    .bind(item.domain_xml.clone())
                    .bind(now)
                    .bind(now);
            }
            q.execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        let default = crate::InstancePolicy::default();
        for (index, (item, p)) in items.iter().zip(policies).enumerate().filter(|(_, (_, p))| **p != default) {
            crate::policy::write_policy(&mut tx, item.uuid, p).await.map_err(|e| item_error(index, e))?;
        }
        let owners: HashSet<&HostName> = items.iter().map(|i| &i.owner).collect();
        for owner in owners {
            let count = items.iter().filter(|i| &i.owner == owner).count();
            insert_event(
                &mut tx,
                &NewEvent::host(
                    actor,
                    "instance.imported",
                    owner,
                    format!("{count} instances imported for host {owner}"),
                ),
            )
            .await?;
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(items.len())
    }

    /// Live and deleted instances, by owner then name; only `owner`'s when given.
    pub async fn instances(&self, owner: Option<&HostName>) -> Result<Vec<Instance>> {
        let rows = match owner {
            Some(h) => {
                sqlx::query(&format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE owner = $1 ORDER BY owner, name, uuid"
                ))
                .bind(h.as_str())
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(&format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY owner, name, uuid"))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(query("listing instances"))?;
        rows.iter().map(instance_from_row).collect()
    }

    /// One instance, if it exists (deleted ones too).
    pub async fn instance(&self, id: InstanceId) -> Result<Option<Instance>> {
        let row = sqlx::query(&format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE uuid = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading an instance"))?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// The stored domain XML of an instance, if any.
    pub async fn domain_xml(&self, id: InstanceId) -> Result<Option<String>> {
        let xml: Option<Option<String>> = sqlx::query_scalar("SELECT domain_xml FROM instances WHERE uuid = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading a domain XML"))?;
        Ok(xml.flatten())
    }

    /// Ownership of every listed instance that the database knows, in few round trips
    /// (one query per 4,000 ids). Unknown ids are simply absent from the result.
    pub async fn ownership(&self, ids: &[InstanceId]) -> Result<Vec<Ownership>> {
        let mut conn = self.pool.acquire().await.map_err(query("looking up instances"))?;
        lookup_in(&mut conn, ids.iter().copied()).await
    }

    /// Compare-and-set of the owner: moves `id` to `to` if its generation is still
    /// `expected`, bumping the generation in the same statement, and records an event.
    /// Returns the new generation. Of concurrent callers with the same `expected`,
    /// exactly one succeeds; the others get [`StoreError::Conflict`]. The controller's recoveries
    /// move instances this way: each counts towards the instance's `max_relocate`.
    pub async fn transfer_owner(
        &self,
        id: InstanceId,
        expected: Generation,
        to: &HostName,
        actor: &str,
        reason: &str,
    ) -> Result<Generation> {
        self.move_one(id, expected, to, actor, reason, Move::Recovery).await
    }

    /// Recoveries in one transaction (the evacuations of many fences at once): each a
    /// compare-and-set as [`Store::transfer_owner`], counted towards its `max_relocate`, with
    /// its event. One whose instance moved, was deleted or is unknown meanwhile fails alone
    /// (its `Err` in the answer, in order); any other error — the database, a target host
    /// that does not exist — writes none of them.
    pub async fn transfer_owners(&self, moves: &[OwnerMove], actor: &str) -> Result<Vec<Result<Generation>>> {
        const WHAT: &str = "moving instances";
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let mut out = Vec::with_capacity(moves.len());
        for m in moves {
            // Each a compare-and-set counted as a recovery; one that lost its race, was
            // deleted or is unknown fails alone (nothing written for it).
            match cas_owner(&mut tx, m.id, m.expected, &m.from, &m.to, actor, &m.reason, db_now, true).await {
                Ok(generation) => out.push(Ok(generation)),
                Err(
                    e @ (StoreError::Conflict { .. } | StoreError::InstanceDeleted(_) | StoreError::UnknownInstance(_)),
                ) => out.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(out)
    }

    /// A drain's move: `id`, held on its owner and reported stopped there, goes to `to` (a
    /// compare-and-set on `expected`, which clears the hold), without counting towards its
    /// `max_relocate` (a planned move is not a recovery). Refused unless it is held.
    pub async fn transfer_held(
        &self,
        id: InstanceId,
        expected: Generation,
        to: &HostName,
        actor: &str,
        reason: &str,
    ) -> Result<Generation> {
        self.move_one(id, expected, to, actor, reason, Move::Drain).await
    }

    async fn move_one(
        &self,
        id: InstanceId,
        expected: Generation,
        to: &HostName,
        actor: &str,
        reason: &str,
        kind: Move,
    ) -> Result<Generation> {
        const WHAT: &str = "moving an instance";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let row = sqlx::query(&format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE uuid = $1"))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(query(WHAT))?
            .ok_or(StoreError::UnknownInstance(id))?;
        let current = instance_from_row(&row)?;
        if kind == Move::Drain && !current.held {
            return Err(StoreError::Invalid(format!("instance {id} is not held: a drain moves only what it holds")));
        }
        // An automatic recovery is counted against the instance's max_relocate.
        let recovery = kind == Move::Recovery;
        let generation = cas_owner(&mut tx, id, expected, &current.owner, to, actor, reason, db_now, recovery).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(generation)
    }

    /// Holds (`true`) or lets go (`false`) those of `ids` that `host` owns, with one event
    /// each that changed (its `updated_at` set to now); returns how many changed. A held
    /// instance is kept stopped by its owner's guard.
    pub async fn hold_instances(
        &self,
        host: &HostName,
        ids: &[InstanceId],
        held: bool,
        actor: &str,
        why: &str,
    ) -> Result<usize> {
        const WHAT: &str = "holding instances";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let mut changed = 0;
        for id in ids {
            // `updated_at` says since when it is held (a guard report must be newer to count).
            let done = sqlx::query(
                "UPDATE instances SET held = $1, updated_at = $5 WHERE uuid = $2 AND owner = $3 AND held = $4",
            )
            .bind(held)
            .bind(id.to_string())
            .bind(host.as_str())
            .bind(!held)
            .bind(db_now)
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
            if done.rows_affected() == 1 {
                changed += 1;
                let (kind, verb) = if held { ("instance.held", "held") } else { ("instance.released", "released") };
                insert_event(
                    &mut tx,
                    &NewEvent::instance(actor, kind, host, *id, format!("instance {id} {verb} on {host}: {why}")),
                )
                .await?;
            }
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(changed)
    }

    /// What `host`'s guard converges on: the instances it owns, and those being live-migrated
    /// to it (their [`crate::guard_api::Assigned::migration`] says so).
    pub async fn assigned(&self, host: &HostName) -> Result<Vec<crate::guard_api::Assigned>> {
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE owner = $1 \
             UNION ALL SELECT {INSTANCE_COLUMNS} FROM instances WHERE migrating_to = $1 AND owner <> $1 \
             ORDER BY name, uuid"
        ))
        .bind(host.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(query("listing assigned instances"))?;
        rows.iter().map(|r| instance_from_row(r).map(|i| crate::guard_api::Assigned::from(&i))).collect()
    }

    /// The instances being live-migrated (few: a drain's), oldest intent first.
    pub async fn migrations(&self) -> Result<Vec<Instance>> {
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE migrating_to IS NOT NULL AND deleted = FALSE \
             ORDER BY migration_started_at, uuid"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query("listing migrations"))?;
        rows.iter().map(instance_from_row).collect()
    }

    /// A drain's live migration `m` of `id` (from its owner to a host whose libvirt is at
    /// `m.uri`) begins: compare-and-set on owner and generation; refused (`Conflict`) when the
    /// instance moved, is held, deleted or already migrating. One `instance.migrating` event.
    pub async fn start_migration(
        &self,
        id: InstanceId,
        expected: Generation,
        m: &crate::guard_api::Migration,
        actor: &str,
        why: &str,
    ) -> Result<()> {
        const WHAT: &str = "starting a live migration";
        let (from, to, uri) = (&m.from, &m.to, m.uri.as_str());
        if from == to {
            return Err(StoreError::Invalid(format!("instance {id}: a live migration to its own host {to}")));
        }
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query(
            "UPDATE instances SET migrating_to = $1, migration_uri = $2, migration_started_at = $3, updated_at = $3 \
             WHERE uuid = $4 AND owner = $5 AND generation = $6 AND deleted = FALSE AND held = FALSE \
             AND migrating_to IS NULL",
        )
        .bind(to.as_str())
        .bind(uri)
        .bind(db_now)
        .bind(id.to_string())
        .bind(from.as_str())
        .bind(expected.to_db())
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        if done.rows_affected() != 1 {
            let now = lookup_in(&mut tx, [id]).await?.pop().ok_or(StoreError::UnknownInstance(id))?;
            return Err(StoreError::Conflict { instance: id, expected, found: now.generation });
        }
        let m = format!("instance {id} migrates live from {from} to {to}: {why}");
        insert_event(&mut tx, &NewEvent::instance(actor, "instance.migrating", from, id, m)).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(())
    }

    /// The live migration of `id` to `to` is seen done: `to` owns it (generation + 1, not
    /// counted against `max_relocate`), a compare-and-set on the generation and the intent.
    pub async fn finish_migration(
        &self,
        id: InstanceId,
        expected: Generation,
        to: &HostName,
        actor: &str,
        why: &str,
    ) -> Result<Generation> {
        const WHAT: &str = "finishing a live migration";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let now = lookup_in(&mut tx, [id]).await?.pop().ok_or(StoreError::UnknownInstance(id))?;
        if now.migrating_to.as_ref() != Some(to) {
            return Err(StoreError::Conflict { instance: id, expected, found: now.generation });
        }
        let generation = cas_owner(&mut tx, id, expected, &now.owner, to, actor, why, db_now, false).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(generation)
    }

    /// The live migration of `id` to `to` is given up (it failed, or its target is gone):
    /// the instance stays with its owner. `false` when it was not migrating there.
    pub async fn abandon_migration(&self, id: InstanceId, to: &HostName, actor: &str, why: &str) -> Result<bool> {
        const WHAT: &str = "abandoning a live migration";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query(
            "UPDATE instances SET migrating_to = NULL, migration_uri = NULL, migration_started_at = NULL, \
             updated_at = $1 WHERE uuid = $2 AND migrating_to = $3",
        )
        .bind(db_now)
        .bind(id.to_string())
        .bind(to.as_str())
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        let changed = done.rows_affected() == 1;
        if changed {
            let m = format!("instance {id}: its live migration to {to} is given up: {why}");
            insert_event(&mut tx, &NewEvent::instance(actor, "instance.migration_abandoned", to, id, m)).await?;
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(changed)
    }

    /// Moves instances to host `to`, all or nothing, in one transaction. `to` must be an
    /// active host; deleted or unknown instances refuse the whole request. Instances already
    /// owned by `to` are reported with `moved: false` and left unchanged.
    ///
    /// The instance must be known not to run where it is ([`evacuation_source_safe`]): its
    /// host is fenced, or in maintenance with a guard report taken since then that shows the
    /// instance stopped. Otherwise [`StoreError::SourceLive`], unless `force` (the operator's
    /// word that it is stopped; it may run twice if that is wrong, and the event says so).
    pub async fn evacuate(&self, ids: &[InstanceId], to: &HostName, force: bool, actor: &str) -> Result<Vec<Transfer>> {
        const WHAT: &str = "evacuating instances";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let target = self.host_in(&mut tx, to).await?.ok_or_else(|| StoreError::UnknownHost(to.clone()))?;
        if target.state != HostState::Active {
            return Err(StoreError::HostNotActive { host: to.clone(), state: target.state });
        }
        let current: HashMap<InstanceId, Ownership> =
            lookup_in(&mut tx, ids.iter().copied()).await?.into_iter().map(|o| (o.uuid, o)).collect();
        let mut sources: HashMap<HostName, (crate::Host, Option<crate::GuardReport>)> = HashMap::new();
        let mut out = Vec::with_capacity(ids.len());
        for (index, id) in ids.iter().enumerate() {
            let now = current.get(id).ok_or_else(|| item_error(index, StoreError::UnknownInstance(*id)))?;
            if now.deleted {
                return Err(item_error(index, StoreError::InstanceDeleted(*id)));
            }
            if &now.owner == to {
                out.push(Transfer {
                    uuid: *id,
                    from: to.clone(),
                    to: to.clone(),
                    generation: now.generation,
                    moved: false,
                });
                continue;
            }
            if !sources.contains_key(&now.owner) {
                let host = self
                    .host_in(&mut tx, &now.owner)
                    .await?
                    .ok_or_else(|| StoreError::UnknownHost(now.owner.clone()))?;
                let report = crate::reports::guard_report_in(&mut tx, &now.owner).await?;
                sources.insert(now.owner.clone(), (host, report));
            }
            let (source, report) = &sources[&now.owner];
            let safe = match &now.migrating_to {
                // It may run there already: only there is it safe to go.
                Some(target) if target != to => Err(format!("its live migration to {target} is not resolved")),
                _ => evacuation_source_safe(source, report.as_ref(), *id),
            };
            let reason = match safe {
                Ok(()) => "evacuated by operator".to_owned(),
                Err(why) if force => format!("evacuated by operator with --force ({why}): it may run twice"),
                Err(why) => {
                    return Err(item_error(
                        index,
                        StoreError::SourceLive { instance: *id, host: source.name.clone(), state: source.state, why },
                    ))
                }
            };
            let generation = cas_owner(&mut tx, *id, now.generation, &now.owner, to, actor, &reason, db_now, false)
                .await
                .map_err(|e| item_error(index, e))?;
            out.push(Transfer { uuid: *id, from: now.owner.clone(), to: to.clone(), generation, moved: true });
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(out)
    }

    /// Tombstones instances, all or nothing: the rows stay (with their XML), marked deleted,
    /// so a host that still has them quarantines them. Idempotent.
    pub async fn delete_instances(&self, ids: &[InstanceId], actor: &str) -> Result<Vec<Ownership>> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "deleting instances";
        let mut tx = self.begin_write(WHAT).await?;
        let current: HashMap<InstanceId, Ownership> =
            lookup_in(&mut tx, ids.iter().copied()).await?.into_iter().map(|o| (o.uuid, o)).collect();
        let mut out = Vec::with_capacity(ids.len());
        for (index, id) in ids.iter().enumerate() {
            let now = current.get(id).ok_or_else(|| item_error(index, StoreError::UnknownInstance(*id)))?;
            if !now.deleted {
                sqlx::query(
                    "UPDATE instances SET deleted = TRUE, updated_at = $1, migrating_to = NULL, \
                     migration_uri = NULL, migration_started_at = NULL WHERE uuid = $2",
                )
                .bind(db_now)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
                insert_event(
                    &mut tx,
                    &NewEvent::instance(actor, "instance.deleted", &now.owner, *id, format!("instance {id} deleted")),
                )
                .await?;
            }
            out.push(Ownership { deleted: true, ..now.clone() });
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(out)
    }
}

impl Store {
    /// Changes instances' HA flag and/or storage, all or nothing, with an event for each
    /// that changed. Deleted or unknown instances refuse the whole request.
    pub async fn set_instance_kind(
        &self,
        ids: &[InstanceId],
        ha: Option<bool>,
        storage: Option<crate::Storage>,
        actor: &str,
    ) -> Result<Vec<Instance>> {
        const WHAT: &str = "changing instances";
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (index, id) in ids.iter().enumerate() {
            let row = sqlx::query(&format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE uuid = $1"))
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(query(WHAT))?
                .ok_or_else(|| item_error(index, StoreError::UnknownInstance(*id)))?;
            let mut i = instance_from_row(&row)?;
            if i.deleted {
                return Err(item_error(index, StoreError::InstanceDeleted(*id)));
            }
            let (new_ha, new_storage) = (ha.unwrap_or(i.ha), storage.unwrap_or(i.storage));
            if (new_ha, new_storage) != (i.ha, i.storage) {
                sqlx::query("UPDATE instances SET ha = $1, storage = $2, updated_at = $3 WHERE uuid = $4")
                    .bind(new_ha)
                    .bind(new_storage.as_str())
                    .bind(db_now)
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(query(WHAT))?;
                let m = format!("instance {id}: ha {new_ha}, storage {new_storage}");
                insert_event(&mut tx, &NewEvent::instance(actor, "instance.changed", &i.owner, *id, m)).await?;
                (i.ha, i.storage) = (new_ha, new_storage);
            }
            out.push(i);
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(out)
    }
}

/// Whether `instance` is known not to run on its host `source`: the host is fenced (powered
/// off, confirmed), or in maintenance and its guard reported since it entered maintenance
/// (the report is newer than the host's last change) without the instance running. Otherwise
/// why not, in words. Pure.
pub fn evacuation_source_safe(
    source: &crate::Host,
    report: Option<&crate::GuardReport>,
    instance: InstanceId,
) -> std::result::Result<(), String> {
    match source.state {
        HostState::Fenced => Ok(()),
        HostState::Maintenance => match report {
            Some(r) if r.at > source.updated_at => {
                if r.domains.iter().any(|d| d.uuid == instance && d.running) {
                    Err("its guard reports it running there".into())
                } else {
                    Ok(())
                }
            }
            Some(_) => Err("its guard has not reported since the host entered maintenance".into()),
            None => Err("its guard never reported what runs there".into()),
        },
        _ => Err("the host is not fenced, so the instance may be running there".into()),
    }
}

/// The conditional update at the heart of ownership: owner and generation change together,
/// only if nobody changed them since `expected` was read. `recovery`: an automatic recovery,
/// counted against the instance's `max_relocate` in the same statement.
#[allow(clippy::too_many_arguments)]
async fn cas_owner(
    conn: &mut sqlx::AnyConnection,
    id: InstanceId,
    expected: Generation,
    from: &HostName,
    to: &HostName,
    actor: &str,
    reason: &str,
    now: i64,
    recovery: bool,
) -> Result<Generation> {
    const WHAT: &str = "moving an instance";
    let next = expected.next();
    let done = sqlx::query(
        "UPDATE instances SET owner = $1, generation = $2, updated_at = $3, held = FALSE, \
         migrating_to = NULL, migration_uri = NULL, migration_started_at = NULL, relocations = relocations + $6 \
         WHERE uuid = $4 AND generation = $5 AND deleted = FALSE",
    )
    .bind(to.as_str())
    .bind(next.to_db())
    .bind(now)
    .bind(id.to_string())
    .bind(expected.to_db())
    .bind(i64::from(recovery))
    .execute(&mut *conn)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(ref d) if d.is_foreign_key_violation() => StoreError::UnknownHost(to.clone()),
        e => StoreError::Query { what: WHAT, source: e },
    })?;
    if done.rows_affected() != 1 {
        let now = lookup_in(conn, [id]).await?.pop().ok_or(StoreError::UnknownInstance(id))?;
        if now.deleted {
            return Err(StoreError::InstanceDeleted(id));
        }
        return Err(StoreError::Conflict { instance: id, expected, found: now.generation });
    }
    insert_event(
        conn,
        &NewEvent::instance(
            actor,
            "instance.moved",
            // The host that lost it: the one an operator investigates after a failure.
            from,
            id,
            format!("instance {id} moved from {from} to {to} (generation {next}): {reason}"),
        ),
    )
    .await?;
    Ok(next)
}

/// One move of [`Store::transfer_owners`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerMove {
    /// The instance.
    pub id: InstanceId,
    /// Its generation as the caller saw it.
    pub expected: Generation,
    /// Its owner at that generation (the event names it).
    pub from: HostName,
    /// Its new owner.
    pub to: HostName,
    /// Why (the event says it).
    pub reason: String,
}

/// Ownership rows for `ids`, batched into `IN` lists.
async fn lookup_in(
    conn: &mut sqlx::AnyConnection,
    ids: impl IntoIterator<Item = InstanceId>,
) -> Result<Vec<Ownership>> {
    let backend = backend_of(conn);
    let ids: Vec<String> = ids.into_iter().map(|i| i.to_string()).collect();
    let mut out = Vec::new();
    for chunk in ids.chunks(LOOKUP_BATCH) {
        let sql = format!(
            "SELECT {OWNERSHIP_COLUMNS} FROM instances WHERE uuid IN ({})",
            placeholders(backend, 1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        let rows = q.fetch_all(&mut *conn).await.map_err(query("looking up instances"))?;
        for row in &rows {
            out.push(ownership_from_row(row)?);
        }
    }
    Ok(out)
}
