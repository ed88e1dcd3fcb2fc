//! What `/metrics` says of the fleet, read in a few aggregate queries (no per-host series:
//! a fleet of 50,000 hosts is not 50,000 series): hosts per state, the oldest heartbeat of the
//! watched hosts, running operations per kind and step, ended operations per kind and
//! outcome, the leadership terms.

use sqlx::Row;

use crate::error::{query, Result};
use crate::Store;

/// The fleet's gauges at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetGauges {
    /// (state, hosts).
    pub hosts: Vec<(String, i64)>,
    /// The oldest last heartbeat among active and suspect hosts that ever heartbeated, ms
    /// since the epoch (`None`: none).
    pub oldest_heartbeat: Option<i64>,
    /// The database's time, ms since the epoch.
    pub now: i64,
    /// (kind, step, running operations).
    pub running: Vec<(String, String, i64)>,
    /// (kind, outcome — `done`, `failed`, `aborted` —, operations).
    pub ended: Vec<(String, String, i64)>,
    /// (role, term).
    pub terms: Vec<(String, i64)>,
    /// Live instances, and of them HA.
    pub instances: (i64, i64),
}

impl Store {
    /// The fleet's gauges (see [`FleetGauges`]).
    pub async fn fleet_gauges(&self) -> Result<FleetGauges> {
        const WHAT: &str = "reading the fleet's gauges";
        let now = self.now().await?.0;
        let mut g = FleetGauges { now, ..FleetGauges::default() };
        for r in sqlx::query("SELECT state, COUNT(*) AS n FROM hosts GROUP BY state ORDER BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(query(WHAT))?
        {
            g.hosts.push((r.try_get("state").map_err(query(WHAT))?, r.try_get("n").map_err(query(WHAT))?));
        }
        g.oldest_heartbeat = sqlx::query_scalar(
            "SELECT MIN(last_heartbeat) FROM hosts WHERE state IN ('active', 'suspect') AND last_heartbeat IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(query(WHAT))?;
        for r in sqlx::query(
            "SELECT kind, step, COUNT(*) AS n FROM operations WHERE status = 'running' GROUP BY kind, step ORDER BY kind, step",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query(WHAT))?
        {
            let t = |c: &str| r.try_get::<String, _>(c).map_err(query(WHAT));
            g.running.push((t("kind")?, t("step")?, r.try_get("n").map_err(query(WHAT))?));
        }
        for r in sqlx::query(
            "SELECT kind, CASE WHEN status = 'failed' THEN 'failed' WHEN step = 'aborted' THEN 'aborted' ELSE 'done' END \
             AS outcome, COUNT(*) AS n FROM operations WHERE status <> 'running' GROUP BY kind, outcome ORDER BY kind, outcome",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query(WHAT))?
        {
            let t = |c: &str| r.try_get::<String, _>(c).map_err(query(WHAT));
            g.ended.push((t("kind")?, t("outcome")?, r.try_get("n").map_err(query(WHAT))?));
        }
        for r in sqlx::query("SELECT role, term FROM leadership ORDER BY role")
            .fetch_all(&self.pool)
            .await
            .map_err(query(WHAT))?
        {
            g.terms.push((r.try_get("role").map_err(query(WHAT))?, r.try_get("term").map_err(query(WHAT))?));
        }
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN ha THEN 1 ELSE 0 END), 0) AS ha FROM instances WHERE NOT deleted",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(query(WHAT))?;
        g.instances = (row.try_get("n").map_err(query(WHAT))?, row.try_get("ha").map_err(query(WHAT))?);
        Ok(g)
    }
}
