//! Guard reports: what each guard last saw in its libvirt (replaced on every converge pass),
//! for the controller's GC pass to compare with the database's assignments.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::{query, Result, StoreError};
use crate::types::{Generation, HostName, InstanceId, Timestamp};
use crate::Store;

/// One domain as a guard saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedDomain {
    /// Its UUID.
    pub uuid: InstanceId,
    /// Running (or paused).
    pub running: bool,
    /// The generation in its metadata, if any.
    pub generation: Option<Generation>,
    /// Why its live migration failed, while the database still asks for it (the controller
    /// then gives the migration up once the target reports it does not run it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_failed: Option<String>,
}

/// A guard's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardReport {
    /// The host.
    pub host: HostName,
    /// When.
    pub at: Timestamp,
    /// What it saw.
    pub domains: Vec<ReportedDomain>,
}

impl Store {
    /// Replaces `host`'s report.
    pub async fn save_guard_report(&self, host: &HostName, domains: &[ReportedDomain]) -> Result<()> {
        self.save_guard_reports(&[(host.clone(), domains.to_vec())]).await
    }

    /// Replaces the reports of many hosts in one transaction (the guard API's group commit);
    /// a host named twice keeps its last.
    pub async fn save_guard_reports(&self, reports: &[(HostName, Vec<ReportedDomain>)]) -> Result<()> {
        const WHAT: &str = "saving guard reports";
        let db_now = self.now().await?.0;
        let mut last: std::collections::HashMap<&str, &[ReportedDomain]> = std::collections::HashMap::new();
        for (host, domains) in reports {
            last.insert(host.as_str(), domains);
        }
        let mut rows = Vec::with_capacity(last.len());
        for (host, domains) in last {
            let json = serde_json::to_string(domains)
                .map_err(|e| StoreError::Corrupt { table: "guard_reports", reason: e.to_string() })?;
            rows.push((host, json));
        }
        let mut tx = self.begin_write(WHAT).await?;
        for chunk in rows.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!("DELETE FROM guard_reports WHERE host IN ({})", marks.join(", "));
            let mut del = sqlx::query(&sql);
            for (host, _) in chunk {
                del = del.bind(*host);
            }
            del.execute(&mut *tx).await.map_err(query(WHAT))?;
            let values: Vec<String> =
                (0..chunk.len()).map(|i| format!("(${}, $1, ${})", 2 * i + 2, 2 * i + 3)).collect();
            let sql = format!("INSERT INTO guard_reports (host, at, domains) VALUES {}", values.join(", "));
            let mut ins = sqlx::query(&sql).bind(db_now);
            for (host, json) in chunk {
                ins = ins.bind(*host).bind(json.as_str());
            }
            ins.execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(())
    }

    /// `host`'s last report, if any.
    pub async fn guard_report(&self, host: &HostName) -> Result<Option<GuardReport>> {
        let mut conn = self.pool.acquire().await.map_err(query("reading a guard report"))?;
        guard_report_in(&mut conn, host).await
    }

    /// Every host's last report (an unreadable one is skipped with a warning).
    pub async fn guard_reports(&self) -> Result<Vec<GuardReport>> {
        const WHAT: &str = "reading guard reports";
        let rows = sqlx::query("SELECT host, at, domains FROM guard_reports ORDER BY host")
            .fetch_all(&self.pool)
            .await
            .map_err(query(WHAT))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let host: String = row.try_get("host").map_err(query(WHAT))?;
            let text: String = row.try_get("domains").map_err(query(WHAT))?;
            match (host.parse::<HostName>(), serde_json::from_str::<Vec<ReportedDomain>>(&text)) {
                (Ok(host), Ok(domains)) => {
                    out.push(GuardReport { host, at: Timestamp(row.try_get("at").map_err(query(WHAT))?), domains })
                }
                (h, d) => {
                    tracing::warn!("skipping an unreadable guard report of {host:?}: {:?} {:?}", h.err(), d.err())
                }
            }
        }
        Ok(out)
    }
}

/// `host`'s last report, read on `conn` (inside a caller's transaction).
pub(crate) async fn guard_report_in(conn: &mut sqlx::AnyConnection, host: &HostName) -> Result<Option<GuardReport>> {
    const WHAT: &str = "reading a guard report";
    let row = sqlx::query("SELECT at, domains FROM guard_reports WHERE host = $1")
        .bind(host.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(query(WHAT))?;
    let Some(row) = row else { return Ok(None) };
    let text: String = row.try_get("domains").map_err(query(WHAT))?;
    let domains = serde_json::from_str::<Vec<ReportedDomain>>(&text)
        .map_err(|e| StoreError::Corrupt { table: "guard_reports", reason: e.to_string() })?;
    Ok(Some(GuardReport { host: host.clone(), at: Timestamp(row.try_get("at").map_err(query(WHAT))?), domains }))
}

/// How a guard fences itself, as it last said (`guard_fencing`): the evidence watchdog
/// fencing rests on. A guard sends it at start, whenever it changes (a new peer list), and on
/// a clean stop — with `watchdog_timeout_ms` empty — before it disarms its watchdog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencingProfile {
    /// `watch.self_fence`: it stops its HA domains when isolated in a minority.
    pub self_fence: bool,
    /// `boot.on_db_unreachable` is not `allow`: a host that resets and cannot ask the database
    /// does not autostart its HA domains.
    pub boot_blocks_ha: bool,
    /// `watch.heartbeat_interval`, ms.
    pub heartbeat_interval_ms: u64,
    /// `watch.isolation_timeout`, ms.
    pub isolation_timeout_ms: u64,
    /// `watch.libvirt_timeout`, ms (how long stopping the HA domains may take before the
    /// guard stops feeding the watchdog).
    pub libvirt_timeout_ms: u64,
    /// The timeout of the hardware watchdog it keeps armed, ms; `None`: none armed.
    pub watchdog_timeout_ms: Option<u64>,
    /// The hosts its quorum rule counts besides itself, when it asks every one of them at
    /// once (its majority is then a majority of this very set); `None` when it judges on a
    /// sample (a large cell) — then its quorum is not exact, and no watchdog fencing.
    pub quorum_cell: Option<Vec<HostName>>,
    /// `libvirt.migration_uri`: the libvirt URI its peers live-migrate to (a drain migrates
    /// an instance with shared storage live only between two hosts that announce one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uri: Option<String>,
}

impl Store {
    /// Replaces `host`'s fencing profile.
    pub async fn save_guard_fencing(&self, host: &HostName, profile: &FencingProfile) -> Result<()> {
        const WHAT: &str = "saving a guard's fencing profile";
        let json = serde_json::to_string(profile)
            .map_err(|e| StoreError::Corrupt { table: "guard_fencing", reason: e.to_string() })?;
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        sqlx::query(
            "INSERT INTO guard_fencing (host, at, profile) VALUES ($1, $2, $3) \
             ON CONFLICT (host) DO UPDATE SET at = EXCLUDED.at, profile = EXCLUDED.profile",
        )
        .bind(host.as_str())
        .bind(db_now)
        .bind(json)
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(())
    }

    /// `host`'s fencing profile (an unreadable one is none: it proves nothing).
    pub async fn guard_fencing_of(&self, host: &HostName) -> Result<Option<FencingProfile>> {
        const WHAT: &str = "reading a guard's fencing profile";
        let text: Option<String> = sqlx::query_scalar("SELECT profile FROM guard_fencing WHERE host = $1")
            .bind(host.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query(WHAT))?;
        Ok(text.and_then(|t| match serde_json::from_str(&t) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("an unreadable fencing profile of {host}: {e}");
                None
            }
        }))
    }

    /// Every host's fencing profile with when it was saved (an unreadable one is left out
    /// with a warning: it proves nothing).
    pub async fn guard_fencing(&self) -> Result<Vec<(HostName, Timestamp, FencingProfile)>> {
        const WHAT: &str = "reading the guards' fencing profiles";
        let rows = sqlx::query("SELECT host, at, profile FROM guard_fencing ORDER BY host")
            .fetch_all(&self.pool)
            .await
            .map_err(query(WHAT))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let host: String = row.try_get("host").map_err(query(WHAT))?;
            let text: String = row.try_get("profile").map_err(query(WHAT))?;
            match (host.parse::<HostName>(), serde_json::from_str::<FencingProfile>(&text)) {
                (Ok(h), Ok(p)) => out.push((h, Timestamp(row.try_get("at").map_err(query(WHAT))?), p)),
                (h, p) => {
                    tracing::warn!("skipping an unreadable fencing profile of {host:?}: {:?} {:?}", h.err(), p.err())
                }
            }
        }
        Ok(out)
    }
}
