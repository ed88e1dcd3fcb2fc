//! Guards on PostgreSQL under a role that can do no more than the guard API.
//!
//! A guard with full database credentials can rewrite ownership, read every domain XML and
//! the cell secret, or point a BMC URL at itself. A **guard role** (made by
//! [`Store::create_guard_role`], `nodekeeper-provisioner db guard-role HOST`) has no privilege
//! on any table: it may read the migrations table (to check the schema) and call the
//! `nk_guard_*` functions of migration 0011, which run as their owner, find the caller's host
//! by `session_user` and act for that host alone — the guard API's answers and checks, in the
//! database. A guard that connects as such a role talks through a [`GuardSession`].

use sqlx::Row;

use crate::db::parse_column;
use crate::error::{query, Result};
use crate::guard_api::{Assigned, GuardEvent, PeerList};
use crate::instances::{flag, ownership_from_row};
use crate::settings::{peer_list, PeerCandidate};
use crate::types::{Generation, HostName, InstanceId, Timestamp};
use crate::{Backend, Ownership, ReportedDomain, Store, StoreError};

/// The functions a guard role may call (with their argument types, for `GRANT`).
const FUNCTIONS: &[&str] = &[
    "nk_guard_me()",
    "nk_guard_heartbeat()",
    "nk_guard_host_known()",
    "nk_guard_ownership(TEXT)",
    "nk_guard_assigned()",
    "nk_guard_domain_xml(TEXT)",
    "nk_guard_report(TEXT)",
    "nk_guard_events(TEXT)",
    "nk_guard_peer_material()",
    "nk_guard_relay(TEXT)",
    "nk_guard_fencing(TEXT)",
    "nk_guard_held()",
    "nk_guard_services()",
];

/// A guard role, as made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuardRole {
    /// The host it acts for.
    pub host: HostName,
    /// The PostgreSQL role (`nk_guard_HOST` unless named).
    pub role: String,
    /// Its new password (shown once).
    #[serde(skip)]
    pub password: String,
}

/// A role name: 1 to 63 of `[A-Za-z0-9_.-]` (quoted in SQL; never anything to escape).
fn valid_role(role: &str) -> bool {
    (1..=63).contains(&role.len()) && role.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Store {
    /// Makes (or, when it exists, gives a new password to) the login role `role` (default
    /// `nk_guard_HOST`) for `host`'s guard: CONNECT on this database, USAGE on its schema,
    /// SELECT on the migrations table, EXECUTE on the guard functions, nothing else. Needs a
    /// user with CREATEROLE (PostgreSQL only).
    pub async fn create_guard_role(&self, host: &HostName, role: Option<&str>) -> Result<GuardRole> {
        const WHAT: &str = "making a guard role";
        if self.backend() != Backend::Postgres {
            return Err(StoreError::Invalid(
                "guard roles are a PostgreSQL feature: on SQLite, guards use the provisioner's guard API".into(),
            ));
        }
        let role = role.map_or_else(|| format!("nk_guard_{host}"), str::to_owned);
        if !valid_role(&role) {
            return Err(StoreError::Invalid(format!("role name {role:?}: 1 to 63 of [A-Za-z0-9_.-]")));
        }
        self.require_host(host).await?;
        let password = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let mut tx = self.pool.begin().await.map_err(query(WHAT))?;
        let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_roles WHERE rolname = $1")
            .bind(role.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let verb = if exists > 0 { "ALTER" } else { "CREATE" };
        let (db, schema) = names(&mut tx).await?;
        let mut statements = vec![
            format!("{verb} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}'", ident(&role)),
            format!("GRANT CONNECT ON DATABASE {} TO {}", ident(&db), ident(&role)),
            format!("GRANT USAGE ON SCHEMA {} TO {}", ident(&schema), ident(&role)),
            format!("GRANT SELECT ON _sqlx_migrations TO {}", ident(&role)),
        ];
        statements.extend(FUNCTIONS.iter().map(|f| format!("GRANT EXECUTE ON FUNCTION {f} TO {}", ident(&role))));
        for sql in &statements {
            sqlx::query(sql).execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        sqlx::query(
            "INSERT INTO guard_roles (role, host) VALUES ($1, $2) ON CONFLICT (role) DO UPDATE SET host = EXCLUDED.host",
        )
        .bind(role.as_str())
        .bind(host.as_str())
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(GuardRole { host: host.clone(), role, password })
    }

    /// Drops a guard role made by [`Store::create_guard_role`], its grants first.
    pub async fn drop_guard_role(&self, role: &str) -> Result<()> {
        const WHAT: &str = "dropping a guard role";
        if !valid_role(role) {
            return Err(StoreError::Invalid(format!("role name {role:?}: 1 to 63 of [A-Za-z0-9_.-]")));
        }
        let mut tx = self.pool.begin().await.map_err(query(WHAT))?;
        sqlx::query("DELETE FROM guard_roles WHERE role = $1")
            .bind(role)
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let (db, schema) = names(&mut tx).await?;
        let role = ident(role);
        let mut statements: Vec<String> =
            FUNCTIONS.iter().map(|f| format!("REVOKE EXECUTE ON FUNCTION {f} FROM {role}")).collect();
        statements.extend([
            format!("REVOKE SELECT ON _sqlx_migrations FROM {role}"),
            format!("REVOKE USAGE ON SCHEMA {} FROM {role}", ident(&schema)),
            format!("REVOKE CONNECT ON DATABASE {} FROM {role}", ident(&db)),
            format!("DROP ROLE IF EXISTS {role}"),
        ]);
        for sql in &statements {
            sqlx::query(sql).execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        tx.commit().await.map_err(query(WHAT))
    }
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// This database's name and schema.
async fn names(conn: &mut sqlx::AnyConnection) -> Result<(String, String)> {
    const WHAT: &str = "reading the database's name";
    let row = sqlx::query("SELECT CAST(current_database() AS TEXT) AS db, CAST(current_schema() AS TEXT) AS schema")
        .fetch_one(&mut *conn)
        .await
        .map_err(query(WHAT))?;
    Ok((row.try_get("db").map_err(query(WHAT))?, row.try_get("schema").map_err(query(WHAT))?))
}

/// A connection as a guard role: everything goes through the guard functions, for the role's
/// host alone.
#[derive(Debug, Clone)]
pub struct GuardSession {
    store: Store,
    host: HostName,
}

impl GuardSession {
    /// `Some` when the store's user is a guard role (its host found by `session_user`);
    /// `None` for any other user and on SQLite.
    pub async fn open(store: &Store) -> Result<Option<GuardSession>> {
        if store.backend() != Backend::Postgres {
            return Ok(None);
        }
        let host: Option<String> = sqlx::query_scalar("SELECT nk_guard_identity()")
            .fetch_one(&store.pool)
            .await
            .map_err(query("asking which guard this role is"))?;
        let host = host.map(|h| parse_column("guard_roles", "host", &h)).transpose()?;
        Ok(host.map(|host| GuardSession { store: store.clone(), host }))
    }

    /// The host this session acts for.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// The store underneath (for the schema check and the clock).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the host table knows this session's host.
    pub async fn host_known(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT nk_guard_host_known()")
            .fetch_one(&self.store.pool)
            .await
            .map_err(query("looking up the guard's host"))?;
        Ok(n > 0)
    }

    /// Records a heartbeat (the database's time).
    pub async fn heartbeat(&self) -> Result<Timestamp> {
        let at: i64 = sqlx::query_scalar("SELECT nk_guard_heartbeat()")
            .fetch_one(&self.store.pool)
            .await
            .map_err(query("recording a heartbeat"))?;
        Ok(Timestamp(at))
    }

    /// Ownership of the listed instances that the database knows (4,000 per round trip).
    pub async fn ownership(&self, ids: &[InstanceId]) -> Result<Vec<Ownership>> {
        const WHAT: &str = "looking up instances";
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(4000) {
            let list: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let json = serde_json::to_string(&list).map_err(|e| StoreError::Invalid(e.to_string()))?;
            let rows = sqlx::query(
                "SELECT uuid, owner, generation, deleted, ha, NULL::text AS migrating_to FROM nk_guard_ownership($1)",
            )
            .bind(json)
            .fetch_all(&self.store.pool)
            .await
            .map_err(query(WHAT))?;
            for row in &rows {
                out.push(ownership_from_row(row)?);
            }
        }
        Ok(out)
    }

    /// The instances assigned to this host.
    pub async fn assigned(&self) -> Result<Vec<Assigned>> {
        const WHAT: &str = "listing assigned instances";
        const T: &str = "instances";
        let rows = sqlx::query("SELECT uuid, name, generation, ha, deleted, storage FROM nk_guard_assigned()")
            .fetch_all(&self.store.pool)
            .await
            .map_err(query(WHAT))?;
        let held: std::collections::HashSet<String> = sqlx::query_scalar("SELECT uuid FROM nk_guard_held()")
            .fetch_all(&self.store.pool)
            .await
            .map_err(query(WHAT))?
            .into_iter()
            .collect();
        rows.iter()
            .map(|row| {
                let text = |c: &str| row.try_get::<String, _>(c).map_err(query(WHAT));
                let uuid = text("uuid")?;
                Ok(Assigned {
                    held: held.contains(&uuid),
                    uuid: parse_column(T, "uuid", &uuid)?,
                    name: text("name")?,
                    generation: Generation::from_db(row.try_get("generation").map_err(query(WHAT))?),
                    ha: flag(row, "ha")?,
                    deleted: flag(row, "deleted")?,
                    storage: parse_column(T, "storage", &text("storage")?)?,
                    // The guard role does not carry live migrations: its guard announces no
                    // migration URI, so no drain migrates to or from it.
                    migration: None,
                })
            })
            .collect()
    }

    /// The service copies assigned to this host.
    pub async fn services(&self) -> Result<Vec<crate::guard_api::AssignedService>> {
        const WHAT: &str = "listing assigned services";
        const T: &str = "service_copies";
        let rows = sqlx::query(
            "SELECT service, slot, generation, start_cmd, stop_cmd, check_cmd, exclusive FROM nk_guard_services()",
        )
        .fetch_all(&self.store.pool)
        .await
        .map_err(query(WHAT))?;
        let argv = |text: &str, column: &str| -> Result<Vec<String>> {
            serde_json::from_str(text)
                .map_err(|e| StoreError::Corrupt { table: T, reason: format!("column {column}: {e}") })
        };
        rows.iter()
            .map(|row| {
                let int = |c: &str| row.try_get::<i64, _>(c).map_err(query(WHAT));
                let text = |c: &str| row.try_get::<String, _>(c).map_err(query(WHAT));
                let check: Option<String> = row.try_get("check_cmd").map_err(query(WHAT))?;
                Ok(crate::guard_api::AssignedService {
                    service: text("service")?,
                    slot: u32::try_from(int("slot")?).unwrap_or(0),
                    generation: u64::try_from(int("generation")?).unwrap_or(0),
                    start: argv(&text("start_cmd")?, "start_cmd")?,
                    stop: argv(&text("stop_cmd")?, "stop_cmd")?,
                    check: check.map(|c| argv(&c, "check_cmd")).transpose()?,
                    exclusive: int("exclusive")? != 0,
                })
            })
            .collect()
    }

    /// The stored domain XML of an instance assigned to this host (`None` for any other).
    pub async fn domain_xml(&self, id: InstanceId) -> Result<Option<String>> {
        let xml: Option<String> = sqlx::query_scalar("SELECT nk_guard_domain_xml($1)")
            .bind(id.to_string())
            .fetch_one(&self.store.pool)
            .await
            .map_err(query("reading a domain XML"))?;
        Ok(xml)
    }

    /// Replaces this host's report of what its libvirt runs.
    pub async fn save_report(&self, domains: &[ReportedDomain]) -> Result<()> {
        let json = serde_json::to_string(domains).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query("SELECT nk_guard_report($1)")
            .bind(json)
            .execute(&self.store.pool)
            .await
            .map_err(query("saving a guard report"))?;
        Ok(())
    }

    /// Replaces this host's fencing profile.
    pub async fn save_fencing(&self, profile: &crate::FencingProfile) -> Result<()> {
        let json = serde_json::to_string(profile).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query("SELECT nk_guard_fencing($1)")
            .bind(json)
            .execute(&self.store.pool)
            .await
            .map_err(query("saving the fencing profile"))?;
        Ok(())
    }

    /// Appends events as this host's guard (actor, host and key space are the function's).
    pub async fn record_events(&self, events: &[GuardEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let json = serde_json::to_string(events).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query("SELECT nk_guard_events($1)")
            .bind(json)
            .execute(&self.store.pool)
            .await
            .map_err(query("recording events"))?;
        Ok(())
    }

    /// This host's peer list, cut and counted as the guard API's.
    pub async fn peers(&self) -> Result<PeerList> {
        const WHAT: &str = "listing peers";
        const T: &str = "hosts";
        let rows = sqlx::query("SELECT name, state, ip, leased_ip, heartbeated, key FROM nk_guard_peer_material()")
            .fetch_all(&self.store.pool)
            .await
            .map_err(query(WHAT))?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let opt = |c: &str| row.try_get::<Option<String>, _>(c).map_err(query(WHAT));
            let address = match (opt("ip")?, opt("leased_ip")?) {
                (Some(ip), _) | (None, Some(ip)) => Some(parse_column(T, "ip", &ip)?),
                (None, None) => None,
            };
            candidates.push(PeerCandidate {
                host: parse_column(T, "name", &row.try_get::<String, _>("name").map_err(query(WHAT))?)?,
                state: parse_column(T, "state", &row.try_get::<String, _>("state").map_err(query(WHAT))?)?,
                heartbeated: flag(row, "heartbeated")?,
                address,
                key: row.try_get("key").map_err(query(WHAT))?,
            });
        }
        Ok(peer_list(candidates))
    }

    /// Vouches for `peer` (see [`Store::relay_heartbeat`]): `false`, nothing recorded, for a
    /// host that is not watched.
    pub async fn relay(&self, peer: &HostName) -> Result<bool> {
        let done: i64 = sqlx::query_scalar("SELECT nk_guard_relay($1)")
            .bind(peer.as_str())
            .fetch_one(&self.store.pool)
            .await
            .map_err(query("relaying a heartbeat"))?;
        Ok(done > 0)
    }
}
