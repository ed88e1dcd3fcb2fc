//! Recovery by policy: what placement weighs besides load — per instance its priority,
//! anti-affinity group, relocation budget and size; per host its capacity and whether it is
//! a reserved (standby) host. Kept beside the instance and host rows (migration 0019) and read
//! in bulk by the controller.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::{HostName, InstanceId};
use crate::Store;

/// An instance's recovery policy and size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePolicy {
    /// Higher is placed (and so started) first when room is short (default 0).
    pub priority: i64,
    /// Members of one group never share a host, also during recovery.
    pub anti_affinity: Option<String>,
    /// Automatic recoveries allowed (`None`: no limit).
    pub max_relocate: Option<u32>,
    /// Automatic recoveries so far (read only: counted by each move of the controller).
    #[serde(default)]
    pub relocations: u32,
    /// vCPUs (from its domain XML's `<vcpu>`).
    pub vcpus: u32,
    /// Memory in MiB (from its domain XML's `<memory>`).
    pub memory_mib: u64,
    /// Instances that must run before this one is moved during a recovery (restart order:
    /// start the database before the web server).
    #[serde(default)]
    pub after: Vec<InstanceId>,
}

/// A host's inventory for placement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInventory {
    /// vCPUs it may give its instances (`None`: not known, not limited).
    pub vcpus: Option<u32>,
    /// Memory in MiB it may give them (`None`: not known, not limited).
    pub memory_mib: Option<u64>,
    /// A standby host: recovered instances go to reserved hosts first.
    pub reserved: bool,
}

/// A group name: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn valid_group(g: &str) -> bool {
    (1..=64).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn to_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Writes `p` (not `relocations`) to live instance `id`, on `conn` (inside a caller's
/// transaction); an unknown or deleted instance is an error.
pub(crate) async fn write_policy(conn: &mut sqlx::AnyConnection, id: InstanceId, p: &InstancePolicy) -> Result<()> {
    const WHAT: &str = "setting an instance's policy";
    if p.after.contains(&id) {
        return Err(StoreError::Invalid(format!("{id} cannot start after itself")));
    }
    for target in &p.after {
        let known: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE uuid = $1 AND NOT deleted")
            .bind(target.to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(query(WHAT))?;
        if known == 0 {
            return Err(StoreError::Invalid(format!("{id} starts after {target}, which is no live instance")));
        }
    }
    if p.anti_affinity.as_deref().is_some_and(|g| !valid_group(g)) {
        return Err(StoreError::Invalid(format!(
            "anti-affinity group {:?}: 1 to 64 of [A-Za-z0-9_.-]",
            p.anti_affinity.as_deref().unwrap_or_default()
        )));
    }
    let done = sqlx::query(
        "UPDATE instances SET priority = $1, anti_affinity = $2, max_relocate = $3, vcpus = $4, memory_mib = $5, \
         start_after = $6 WHERE uuid = $7 AND NOT deleted",
    )
    .bind(p.priority)
    .bind(p.anti_affinity.as_deref())
    .bind(p.max_relocate.map(to_i64))
    .bind(to_i64(p.vcpus))
    .bind(to_i64(p.memory_mib))
    .bind(if p.after.is_empty() { None } else { serde_json::to_string(&p.after).ok() })
    .bind(id.to_string())
    .execute(&mut *conn)
    .await
    .map_err(query(WHAT))?;
    if done.rows_affected() == 0 {
        return Err(StoreError::UnknownInstance(id));
    }
    Ok(())
}

impl Store {
    /// Every live instance's policy, by UUID.
    pub async fn instance_policies(&self) -> Result<HashMap<InstanceId, InstancePolicy>> {
        const WHAT: &str = "reading instance policies";
        let rows = sqlx::query(
            "SELECT uuid, priority, anti_affinity, max_relocate, relocations, vcpus, memory_mib, start_after \
             FROM instances WHERE NOT deleted",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query(WHAT))?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            let uuid: String = r.try_get("uuid").map_err(query(WHAT))?;
            let id = crate::db::parse_column("instances", "uuid", &uuid)?;
            let n = |c: &str| r.try_get::<i64, _>(c).map_err(query(WHAT));
            out.insert(
                id,
                InstancePolicy {
                    priority: n("priority")?,
                    anti_affinity: r.try_get("anti_affinity").map_err(query(WHAT))?,
                    max_relocate: r
                        .try_get::<Option<i64>, _>("max_relocate")
                        .map_err(query(WHAT))?
                        .map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
                    relocations: u32::try_from(n("relocations")?).unwrap_or(u32::MAX),
                    vcpus: u32::try_from(n("vcpus")?).unwrap_or(0),
                    memory_mib: u64::try_from(n("memory_mib")?).unwrap_or(0),
                    after: match r.try_get::<Option<String>, _>("start_after").map_err(query(WHAT))? {
                        Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                            table: "instances",
                            reason: format!("start_after: {e}"),
                        })?,
                        None => Vec::new(),
                    },
                },
            );
        }
        Ok(out)
    }

    /// Sets the policies of instances, all or nothing, one event each (`relocations` is not
    /// written). An unknown or deleted instance refuses the whole request.
    pub async fn set_instance_policies(&self, items: &[(InstanceId, InstancePolicy)], actor: &str) -> Result<()> {
        const WHAT: &str = "setting instance policies";
        let mut tx = self.begin_write(WHAT).await?;
        for (id, p) in items {
            write_policy(&mut tx, *id, p).await?;
            let after: Vec<String> = p.after.iter().map(ToString::to_string).collect();
            let message = format!(
                "{id}: priority {}, anti-affinity {}, max relocations {}, {} vCPU, {} MiB, starts after {}",
                p.priority,
                p.anti_affinity.as_deref().unwrap_or("none"),
                p.max_relocate.map_or("unlimited".into(), |m| m.to_string()),
                p.vcpus,
                p.memory_mib,
                if after.is_empty() { "nothing".to_owned() } else { after.join(", ") }
            );
            let e = NewEvent { instance: Some(*id), ..NewEvent::cell(actor, "instance.policy", message) };
            insert_event(&mut tx, &e).await?;
        }
        tx.commit().await.map_err(query(WHAT))
    }

    /// Every host's inventory, by name.
    pub async fn host_inventories(&self) -> Result<HashMap<HostName, HostInventory>> {
        const WHAT: &str = "reading host inventories";
        let rows = sqlx::query(
            "SELECT name, vcpus, memory_mib, CAST(CASE WHEN reserved THEN 1 ELSE 0 END AS BIGINT) AS reserved FROM hosts",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query(WHAT))?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            let name: String = r.try_get("name").map_err(query(WHAT))?;
            let n = |c: &str| r.try_get::<Option<i64>, _>(c).map_err(query(WHAT));
            out.insert(
                crate::db::parse_column("hosts", "name", &name)?,
                HostInventory {
                    vcpus: n("vcpus")?.map(|v| u32::try_from(v).unwrap_or(0)),
                    memory_mib: n("memory_mib")?.map(|v| u64::try_from(v).unwrap_or(0)),
                    reserved: r.try_get::<i64, _>("reserved").map_err(query(WHAT))? != 0,
                },
            );
        }
        Ok(out)
    }

    /// Sets a host's inventory, with an event.
    pub async fn set_host_inventory(&self, host: &HostName, inv: &HostInventory, actor: &str) -> Result<()> {
        const WHAT: &str = "setting a host's inventory";
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query("UPDATE hosts SET vcpus = $1, memory_mib = $2, reserved = $3 WHERE name = $4")
            .bind(inv.vcpus.map(to_i64))
            .bind(inv.memory_mib.map(to_i64))
            .bind(inv.reserved)
            .bind(host.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownHost(host.clone()));
        }
        let message = format!(
            "{host}: capacity {} vCPU, {} MiB{}",
            inv.vcpus.map_or("unlimited".into(), |v| v.to_string()),
            inv.memory_mib.map_or("unlimited".into(), |v| v.to_string()),
            if inv.reserved { ", reserved (standby) for recovery" } else { "" }
        );
        insert_event(&mut tx, &NewEvent::host(actor, "host.changed", host, message)).await?;
        tx.commit().await.map_err(query(WHAT))
    }
}
