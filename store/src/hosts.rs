//! The host table: compute hosts, their boot MAC, BMC and lifecycle state.

use std::net::IpAddr;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::{BootMode, BootPath, HostName, HostState, MacAddr, Timestamp};
use crate::Store;

/// A host to add.
#[derive(Debug, Clone)]
pub struct NewHost {
    /// Unique name; the guard's `host` config key.
    pub name: HostName,
    /// The MAC it PXE-boots from.
    pub mac: Option<MacAddr>,
    /// A fixed address on the provisioning network.
    pub ip: Option<IpAddr>,
    /// Its BMC endpoint (`redfish+https://…`, `ipmi://…`).
    pub bmc_url: Option<String>,
    /// Where its BMC credentials are (`env:VAR`, `file:/path`): a reference, never the secret.
    pub bmc_credentials: Option<String>,
}

/// How a host is to be installed: which disk, which firmware mode. Kept beside the host (not in
/// [`Host`], which every state change carries) and read when a reimage or a boot needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BootSettings {
    /// Its root-device hint (the agent's one-word form), if any.
    pub root_device: Option<String>,
    /// How its firmware boots, if known.
    pub boot_mode: Option<BootMode>,
    /// How its deploy ramdisk reaches it.
    pub boot_path: BootPath,
}

/// A change of boot settings: `Some` fields are set (`Some(None)` clears an optional value),
/// `None` fields are left alone.
#[derive(Debug, Clone, Default)]
pub struct BootChange<'a> {
    /// The root-device hint.
    pub root_device: Option<Option<&'a str>>,
    /// The firmware's boot mode.
    pub boot_mode: Option<Option<BootMode>>,
    /// The boot path.
    pub boot_path: Option<BootPath>,
}

/// A host as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Unique name.
    pub name: HostName,
    /// Boot MAC.
    pub mac: Option<MacAddr>,
    /// Fixed address.
    pub ip: Option<IpAddr>,
    /// BMC endpoint.
    pub bmc_url: Option<String>,
    /// BMC credentials reference.
    pub bmc_credentials: Option<String>,
    /// Lifecycle state.
    pub state: HostState,
    /// When its guard last reported in.
    pub last_heartbeat: Option<Timestamp>,
    /// The image it was last installed with.
    pub image: Option<String>,
    /// When it was added.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

const HOST_COLUMNS: &str =
    "name, mac, ip, bmc_url, bmc_credentials, state, last_heartbeat, image, created_at, updated_at";

/// Parses a text column into its typed form, or reports the row as corrupt.
use crate::db::{get, parse_column};

fn host_from_row(row: &AnyRow) -> Result<Host> {
    const T: &str = "hosts";
    let opt = |col: &str| -> Result<Option<String>> { get(row, T, col) };
    Ok(Host {
        name: parse_column(T, "name", &get::<String>(row, T, "name")?)?,
        mac: opt("mac")?.map(|m| parse_column(T, "mac", &m)).transpose()?,
        ip: opt("ip")?.map(|ip| parse_column(T, "ip", &ip)).transpose()?,
        bmc_url: opt("bmc_url")?,
        bmc_credentials: opt("bmc_credentials")?,
        state: parse_column(T, "state", &get::<String>(row, T, "state")?)?,
        last_heartbeat: get::<Option<i64>>(row, T, "last_heartbeat")?.map(Timestamp),
        image: opt("image")?,
        created_at: Timestamp(get(row, T, "created_at")?),
        updated_at: Timestamp(get(row, T, "updated_at")?),
    })
}

impl Store {
    /// Adds a host in state `active`, with an event. Refuses a duplicate name or MAC.
    pub async fn add_host(&self, new: &NewHost, actor: &str) -> Result<Host> {
        self.add_host_with(new, &BootSettings::default(), actor).await
    }

    /// [`Store::add_host`] with its boot settings in the same transaction: a host never
    /// exists, even for a moment, without the hint that says which disk a reimage may write.
    pub async fn add_host_with(&self, new: &NewHost, boot: &BootSettings, actor: &str) -> Result<Host> {
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write("adding a host").await?;
        if self.host_in(&mut tx, &new.name).await?.is_some() {
            return Err(StoreError::HostExists(new.name.clone()));
        }
        if let Some(mac) = new.mac {
            let owner: Option<String> = sqlx::query_scalar("SELECT name FROM hosts WHERE mac = $1")
                .bind(mac.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(query("adding a host"))?;
            if let Some(owner) = owner {
                return Err(StoreError::MacInUse { mac, host: parse_column("hosts", "name", &owner)? });
            }
        }
        let now = db_now;
        sqlx::query(
            "INSERT INTO hosts (name, mac, ip, bmc_url, bmc_credentials, state, created_at, updated_at, root_device, \
             boot_mode, boot_path) VALUES ($1, $2, $3, $4, $5, 'active', $6, $6, $7, $8, $9)",
        )
        .bind(new.name.as_str())
        .bind(new.mac.map(|m| m.to_string()))
        .bind(new.ip.map(|ip| ip.to_string()))
        .bind(new.bmc_url.clone())
        .bind(new.bmc_credentials.clone())
        .bind(now)
        .bind(boot.root_device.clone())
        .bind(boot.boot_mode.map(|m| m.as_str().to_owned()))
        .bind(boot.boot_path.as_str())
        .execute(&mut *tx)
        .await
        .map_err(query("adding a host"))?;
        insert_event(&mut tx, &NewEvent::host(actor, "host.added", &new.name, format!("host {} added", new.name)))
            .await?;
        let host = self.host_in(&mut tx, &new.name).await?.ok_or_else(|| StoreError::UnknownHost(new.name.clone()))?;
        tx.commit().await.map_err(query("adding a host"))?;
        Ok(host)
    }

    /// Sets a host's state with an event saying why. Idempotent: setting the state it already
    /// has records nothing.
    pub async fn set_host_state(&self, name: &HostName, state: HostState, actor: &str, reason: &str) -> Result<Host> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "changing a host's state";
        let mut tx = self.begin_write(WHAT).await?;
        let host = self.host_in(&mut tx, name).await?.ok_or_else(|| StoreError::UnknownHost(name.clone()))?;
        if host.state == state {
            return Ok(host);
        }
        sqlx::query("UPDATE hosts SET state = $1, updated_at = $2 WHERE name = $3")
            .bind(state.as_str())
            .bind(db_now)
            .bind(name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let message = format!("host {name}: {} -> {state}: {reason}", host.state);
        insert_event(&mut tx, &NewEvent::host(actor, "host.state", name, message)).await?;
        let host = self.host_in(&mut tx, name).await?.ok_or_else(|| StoreError::UnknownHost(name.clone()))?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(host)
    }

    /// Removes a host that is out of service — in maintenance, or never heard from — and owns
    /// nothing: no instance (live or tombstoned: a tombstone keeps its last owner), no service
    /// copy, no running operation. Its outlets, labels, reports, fencing profile and guard role
    /// row go with it; its events and ended operations stay (history). An event says so.
    pub async fn remove_host(&self, name: &HostName, actor: &str) -> Result<()> {
        const WHAT: &str = "removing a host";
        let mut tx = self.begin_write(WHAT).await?;
        let host = self.host_in(&mut tx, name).await?.ok_or_else(|| StoreError::UnknownHost(name.clone()))?;
        let refuse = |why: String| Err(StoreError::HostInUse { host: name.clone(), why });
        if host.state != HostState::Maintenance && host.last_heartbeat.is_some() {
            return refuse(format!(
                "it is {}: put it in maintenance first (host drain, or host maintenance on)",
                host.state
            ));
        }
        let mut count = async |sql: &'static str| -> Result<i64> {
            sqlx::query_scalar::<_, i64>(sql).bind(name.as_str()).fetch_one(&mut *tx).await.map_err(query(WHAT))
        };
        let instances = count("SELECT COUNT(*) FROM instances WHERE owner = $1").await?;
        if instances > 0 {
            return refuse(format!("it owns {instances} instance(s), tombstones included: evacuate them first"));
        }
        let copies = count("SELECT COUNT(*) FROM service_copies WHERE host = $1").await?;
        if copies > 0 {
            return refuse(format!("{copies} service copy(ies) are assigned to it"));
        }
        let running = count("SELECT COUNT(*) FROM operations WHERE target = $1 AND status = 'running'").await?;
        if running > 0 {
            return refuse("an operation of it runs".into());
        }
        for sql in [
            "DELETE FROM guard_reports WHERE host = $1",
            "DELETE FROM guard_fencing WHERE host = $1",
            "DELETE FROM host_outlets WHERE host = $1",
            "DELETE FROM host_labels WHERE host = $1",
            "DELETE FROM guard_roles WHERE host = $1",
            "DELETE FROM hosts WHERE name = $1",
        ] {
            sqlx::query(sql).bind(name.as_str()).execute(&mut *tx).await.map_err(query(WHAT))?;
        }
        insert_event(&mut tx, &NewEvent::host(actor, "host.removed", name, format!("host {name} removed"))).await?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// Compare-and-set of a host's state: from `expected` to `state`, with its event, or
    /// nothing (`None`) when the host is no longer in `expected` — someone else changed it in
    /// between (an operator's `maintenance`, another controller).
    pub async fn set_host_state_from(
        &self,
        name: &HostName,
        expected: HostState,
        state: HostState,
        actor: &str,
        reason: &str,
    ) -> Result<Option<Host>> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "changing a host's state";
        let mut tx = self.begin_write(WHAT).await?;
        if !cas_state(&mut tx, name, expected, state, db_now, actor, reason).await? {
            return Ok(None);
        }
        let host = self.host_in(&mut tx, name).await?.ok_or_else(|| StoreError::UnknownHost(name.clone()))?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(Some(host))
    }

    /// [`Store::set_host_state_from`] for many hosts in one transaction (detection marking a
    /// rack's hosts suspect at once), each with its reason and its event; those no longer in
    /// `expected` are left alone. Returns how many changed.
    pub async fn set_hosts_state_from(
        &self,
        changes: &[(HostName, String)],
        expected: HostState,
        state: HostState,
        actor: &str,
    ) -> Result<usize> {
        const WHAT: &str = "changing hosts' states";
        if changes.is_empty() {
            return Ok(0);
        }
        let db_now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let mut changed = 0;
        for (name, reason) in changes {
            changed += usize::from(cas_state(&mut tx, name, expected, state, db_now, actor, reason).await?);
        }
        tx.commit().await.map_err(query(WHAT))?;
        Ok(changed)
    }

    /// Every host, by name.
    pub async fn hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query("listing hosts"))?;
        rows.iter().map(host_from_row).collect()
    }

    /// What failure detection looks at each tick: every host that is not `active`, was never
    /// heard, or was last heard before `quiet_since`, by name — and how many active hosts
    /// were heard since (left out: at rest, the read is the few hosts that fell silent, not
    /// the fleet; the database scans the heartbeats, nothing converts them). Two reads: a host
    /// heard between them counts in both — a share of thousands off by a few.
    pub async fn hosts_to_watch(&self, quiet_since: Timestamp) -> Result<(Vec<Host>, usize)> {
        const WHAT: &str = "reading the hosts to watch";
        let rows = sqlx::query(&format!(
            "SELECT {HOST_COLUMNS} FROM hosts WHERE state <> 'active' OR last_heartbeat IS NULL OR last_heartbeat < $1 \
             ORDER BY name"
        ))
        .bind(quiet_since.0)
        .fetch_all(&self.pool)
        .await
        .map_err(query(WHAT))?;
        let quiet: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM hosts WHERE state = 'active' AND last_heartbeat >= $1")
                .bind(quiet_since.0)
                .fetch_one(&self.pool)
                .await
                .map_err(query(WHAT))?;
        let hosts = rows.iter().map(host_from_row).collect::<Result<Vec<Host>>>()?;
        Ok((hosts, usize::try_from(quiet).unwrap_or(0)))
    }

    /// Every host's name, state and last heartbeat, by name: what placement and detection
    /// must see fresh, without the rest of each row (a fleet of 10,000 is read several times a
    /// second while a rack's hosts are evacuated).
    pub async fn host_liveness(&self) -> Result<Vec<(HostName, HostState, Option<Timestamp>)>> {
        const WHAT: &str = "reading the hosts' states";
        let rows: Vec<(String, String, Option<i64>)> =
            sqlx::query_as("SELECT name, state, last_heartbeat FROM hosts ORDER BY name")
                .fetch_all(&self.pool)
                .await
                .map_err(query(WHAT))?;
        rows.into_iter()
            .map(|(name, state, beat)| {
                Ok((
                    parse_column("hosts", "name", &name)?,
                    parse_column("hosts", "state", &state)?,
                    beat.map(Timestamp),
                ))
            })
            .collect()
    }

    /// One host by name, if it exists.
    pub async fn host(&self, name: &HostName) -> Result<Option<Host>> {
        let mut conn = self.pool.acquire().await.map_err(query("reading a host"))?;
        self.host_in(&mut conn, name).await
    }

    /// The host that boots from `mac`, if any.
    pub async fn host_by_mac(&self, mac: MacAddr) -> Result<Option<Host>> {
        let row = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts WHERE mac = $1"))
            .bind(mac.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query("looking up a host by MAC"))?;
        row.as_ref().map(host_from_row).transpose()
    }

    /// Records that `name`'s guard (or freshly installed node) reported in now.
    pub async fn record_heartbeat(&self, name: &HostName) -> Result<Timestamp> {
        let now = self.now().await?.0;
        let done = sqlx::query("UPDATE hosts SET last_heartbeat = $1 WHERE name = $2")
            .bind(now)
            .bind(name.as_str())
            .execute(&self.pool)
            .await
            .map_err(query("recording a heartbeat"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownHost(name.clone()));
        }
        Ok(Timestamp(now))
    }

    /// Records the heartbeats of many guards at once — one statement, one commit (the guard
    /// API's group commit) — each only if the host's stored node token has the SHA-256 given
    /// with it. Answers when, and each host's revision (+1 on every change of what its guard
    /// converges on; see migration 0024), or `None` for a host unknown or whose token did not
    /// match (nothing recorded for it).
    pub async fn record_heartbeats(&self, beats: &[(HostName, String)]) -> Result<(Timestamp, Vec<Option<i64>>)> {
        const WHAT: &str = "recording heartbeats";
        let now = self.now().await?.0;
        if beats.is_empty() {
            return Ok((Timestamp(now), Vec::new()));
        }
        let values: Vec<String> = (0..beats.len()).map(|i| format!("(${}, ${})", 2 * i + 2, 2 * i + 3)).collect();
        let sql = format!(
            "UPDATE hosts SET last_heartbeat = $1 FROM (VALUES {}) AS beat \
             WHERE hosts.name = beat.column1 AND hosts.node_token_sha256 = beat.column2 \
             RETURNING hosts.name, hosts.revision",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(now);
        for (name, sha) in beats {
            q = q.bind(name.as_str()).bind(sha.as_str());
        }
        // A transaction only to take this process's turn to write on SQLite (one statement).
        let mut tx = self.begin_write(WHAT).await?;
        let rows = q.fetch_all(&mut *tx).await.map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))?;
        let mut revisions = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get(0).map_err(query(WHAT))?;
            let revision: i64 = row.try_get(1).map_err(query(WHAT))?;
            revisions.insert(name, revision);
        }
        Ok((Timestamp(now), beats.iter().map(|(n, _)| revisions.get(n.as_str()).copied()).collect()))
    }

    /// `name`'s revision (see [`Store::record_heartbeats`]), `None` for an unknown host.
    pub async fn host_revision(&self, name: &HostName) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT revision FROM hosts WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading a host's revision"))
    }

    /// Records a heartbeat for `host` on the word of `via`'s guard: `host` cannot reach the
    /// controller, but answered `via`'s authenticated peer check just now. Only for a watched
    /// host (active or suspect, heartbeated before): `false`, and nothing recorded, otherwise
    /// (a fenced host that seems alive is for an operator to look at, not to revive). One
    /// event per relaying peer and minute.
    pub async fn relay_heartbeat(&self, host: &HostName, via: &HostName) -> Result<bool> {
        const WHAT: &str = "relaying a heartbeat";
        let now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query(
            "UPDATE hosts SET last_heartbeat = $1 WHERE name = $2 AND last_heartbeat IS NOT NULL \
             AND state IN ('active', 'suspect')",
        )
        .bind(now)
        .bind(host.as_str())
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let message = format!("{host} cannot reach the controller; its heartbeat is relayed by {via}'s guard");
        let key = format!("relay:{host}:{via}:{}", now / 60_000);
        insert_event(
            &mut tx,
            &NewEvent::host(&format!("guard:{via}"), "host.heartbeat_relayed", host, message).with_key(key),
        )
        .await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(true)
    }

    /// `name`'s root-device hint, if it has one.
    pub async fn root_device(&self, name: &HostName) -> Result<Option<String>> {
        Ok(self.boot_settings(name).await?.root_device)
    }

    /// `name`'s boot settings (an unknown host has none).
    pub async fn boot_settings(&self, name: &HostName) -> Result<BootSettings> {
        const WHAT: &str = "reading a host's boot settings";
        let row = sqlx::query("SELECT root_device, boot_mode, boot_path FROM hosts WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query(WHAT))?;
        let Some(row) = row else { return Ok(BootSettings::default()) };
        let root_device: Option<String> = get(&row, "hosts", "root_device")?;
        let mode: Option<String> = get(&row, "hosts", "boot_mode")?;
        let boot_mode = mode.map(|m| parse_column("hosts", "boot_mode", &m)).transpose()?;
        let boot_path = parse_column("hosts", "boot_path", &get::<String>(&row, "hosts", "boot_path")?)?;
        Ok(BootSettings { root_device, boot_mode, boot_path })
    }

    /// Every host's boot mode, by name (hosts without one are left out).
    pub async fn boot_modes(&self) -> Result<std::collections::HashMap<HostName, BootMode>> {
        let modes = self.hosts_where_set("boot_mode", "reading the hosts' boot modes").await?;
        modes.into_iter().map(|(name, mode)| Ok((name, parse_column("hosts", "boot_mode", &mode)?))).collect()
    }

    /// `(name, value)` of every host whose text column `column` is set, by name.
    async fn hosts_where_set(&self, column: &'static str, what: &'static str) -> Result<Vec<(HostName, String)>> {
        let rows = sqlx::query(&format!("SELECT name, {column} FROM hosts WHERE {column} IS NOT NULL ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query(what))?;
        rows.iter()
            .map(|row| {
                let name: String = get(row, "hosts", "name")?;
                Ok((parse_column("hosts", "name", &name)?, get(row, "hosts", column)?))
            })
            .collect()
    }

    /// Changes a host's boot settings as `change` says, with an event naming what changed.
    /// Refused while the host is being reimaged (the running reimage read the old ones).
    pub async fn change_boot_settings(
        &self,
        name: &HostName,
        change: &BootChange<'_>,
        actor: &str,
    ) -> Result<BootSettings> {
        let BootChange { root_device, boot_mode, boot_path } = change.clone();
        const WHAT: &str = "changing a host's boot settings";
        let mut tx = self.begin_write(WHAT).await?;
        let host = self.host_in(&mut tx, name).await?.ok_or_else(|| StoreError::UnknownHost(name.clone()))?;
        if host.state == HostState::Reimaging {
            return Err(StoreError::Invalid(format!(
                "{name} is being reimaged with its current boot settings: change them after the reimage ends"
            )));
        }
        let mut changed = Vec::new();
        if let Some(hint) = root_device {
            sqlx::query("UPDATE hosts SET root_device = $1 WHERE name = $2")
                .bind(hint.map(str::to_owned))
                .bind(name.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
            changed.push(format!("root device {}", hint.unwrap_or("(none: the smallest fixed disk)")));
        }
        if let Some(mode) = boot_mode {
            sqlx::query("UPDATE hosts SET boot_mode = $1 WHERE name = $2")
                .bind(mode.map(|m| m.as_str().to_owned()))
                .bind(name.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
            changed.push(format!("boot mode {}", mode.map_or("(unknown)", BootMode::as_str)));
        }
        if let Some(path) = boot_path {
            sqlx::query("UPDATE hosts SET boot_path = $1 WHERE name = $2")
                .bind(path.as_str())
                .bind(name.as_str())
                .execute(&mut *tx)
                .await
                .map_err(query(WHAT))?;
            changed.push(format!("boot path {path}"));
        }
        if !changed.is_empty() {
            let message = format!("{name}: {}", changed.join(", "));
            insert_event(&mut tx, &NewEvent::host(actor, "host.changed", name, message)).await?;
        }
        tx.commit().await.map_err(query(WHAT))?;
        self.boot_settings(name).await
    }

    /// Runs one statement as this store's user (for tests that prove what a user may not do).
    #[cfg(feature = "testing")]
    pub async fn execute_raw(&self, sql: &str) -> std::result::Result<u64, String> {
        sqlx::query(sql).execute(&self.pool).await.map(|r| r.rows_affected()).map_err(|e| e.to_string())
    }

    /// A heartbeat stamped `at` instead of now: for tests that run the controller on a
    /// simulated clock.
    #[cfg(feature = "testing")]
    pub async fn record_heartbeat_at(&self, name: &HostName, at: Timestamp) -> Result<()> {
        sqlx::query("UPDATE hosts SET last_heartbeat = $1 WHERE name = $2")
            .bind(at.0)
            .bind(name.as_str())
            .execute(&self.pool)
            .await
            .map_err(query("recording a heartbeat"))?;
        Ok(())
    }

    /// Sets the image a host was (or is being) installed with.
    pub async fn set_host_image(&self, name: &HostName, image: &str) -> Result<()> {
        const WHAT: &str = "setting a host's image";
        let db_now = self.now().await?.0;
        // A transaction of its own: a writer under a lease proves its term first.
        let mut tx = self.begin_write(WHAT).await?;
        sqlx::query("UPDATE hosts SET image = $1, updated_at = $2 WHERE name = $3")
            .bind(image)
            .bind(db_now)
            .bind(name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// Records the SHA-256 (hex) of a freshly minted one-time deploy token for `name`, valid
    /// until `expires`, for the boot `boot` (e.g. `"OPERATION:PXE_BOOT"`) — only if no token
    /// was issued for that boot yet: `true` when this call issued it, `false` when an earlier
    /// fetch in the same boot got one (a compare-and-set: of two concurrent fetches, one wins).
    /// A token of an earlier boot is replaced.
    pub async fn issue_deploy_token(
        &self,
        name: &HostName,
        sha256_hex: &str,
        expires: Timestamp,
        boot: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE hosts SET deploy_token_sha256 = $1, deploy_token_expires = $2, deploy_token_boot = $3 \
             WHERE name = $4 AND (deploy_token_boot IS NULL OR deploy_token_boot <> $3)",
        )
        .bind(sha256_hex)
        .bind(expires.0)
        .bind(boot)
        .bind(name.as_str())
        .execute(&self.pool)
        .await
        .map_err(query("storing a deploy token"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets `name`'s deploy token for the boot `boot` whatever was there: the token of a
    /// boot medium the provisioner builds itself (a virtual-media ISO), replaced when the
    /// medium is built again — the earlier one can no longer deploy. Under this store's lease,
    /// if any (a stale executor changes nothing). `false` when the host is unknown.
    pub async fn replace_deploy_token(
        &self,
        name: &HostName,
        sha256_hex: &str,
        expires: Timestamp,
        boot: &str,
    ) -> Result<bool> {
        const WHAT: &str = "replacing a deploy token";
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query(
            "UPDATE hosts SET deploy_token_sha256 = $1, deploy_token_expires = $2, deploy_token_boot = $3 \
             WHERE name = $4",
        )
        .bind(sha256_hex)
        .bind(expires.0)
        .bind(boot)
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(done.rows_affected() == 1)
    }

    /// `name`'s current deploy token, if one is set and unexpired (by the database's clock):
    /// its SHA-256 (hex) and the boot it was issued for.
    pub async fn current_deploy_token(&self, name: &HostName) -> Result<Option<(String, String)>> {
        const WHAT: &str = "reading a deploy token";
        let db_now = self.now().await?.0;
        let row = sqlx::query(
            "SELECT deploy_token_sha256, deploy_token_boot FROM hosts \
             WHERE name = $1 AND deploy_token_sha256 IS NOT NULL AND deploy_token_expires > $2",
        )
        .bind(name.as_str())
        .bind(db_now)
        .fetch_optional(&self.pool)
        .await
        .map_err(query(WHAT))?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = get(&row, "hosts", "deploy_token_sha256")?;
        let boot: Option<String> = get(&row, "hosts", "deploy_token_boot")?;
        Ok(Some((hash, boot.unwrap_or_default())))
    }

    /// Records the virtual-media image inserted into `name`'s BMC (`None`: ejected). Under
    /// this store's lease, if any.
    pub async fn set_media_inserted(&self, name: &HostName, url: Option<&str>) -> Result<()> {
        const WHAT: &str = "recording a host's virtual media";
        let mut tx = self.begin_write(WHAT).await?;
        sqlx::query("UPDATE hosts SET media_inserted = $1 WHERE name = $2")
            .bind(url.map(str::to_owned))
            .bind(name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// Hosts with a virtual-media image inserted by the provisioner and not seen ejected, with
    /// its URL.
    pub async fn hosts_with_media(&self) -> Result<Vec<(HostName, String)>> {
        self.hosts_where_set("media_inserted", "listing hosts with virtual media").await
    }

    /// Whether `sha256_hex` is `name`'s current, unexpired deploy token. With `burn`, a
    /// match also clears it (single use), atomically: of two concurrent uses one succeeds.
    pub async fn check_deploy_token(&self, name: &HostName, sha256_hex: &str, burn: bool) -> Result<bool> {
        let db_now = self.now().await?.0;
        let sql = if burn {
            "UPDATE hosts SET deploy_token_sha256 = NULL, deploy_token_expires = NULL \
             WHERE name = $1 AND deploy_token_sha256 = $2 AND deploy_token_expires > $3"
        } else {
            "UPDATE hosts SET deploy_token_sha256 = deploy_token_sha256 \
             WHERE name = $1 AND deploy_token_sha256 = $2 AND deploy_token_expires > $3"
        };
        let done = sqlx::query(sql)
            .bind(name.as_str())
            .bind(sha256_hex)
            .bind(db_now)
            .execute(&self.pool)
            .await
            .map_err(query("checking a deploy token"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets `name`'s deploy token, whatever it is (its reimage ended).
    pub async fn clear_deploy_token(&self, name: &HostName) -> Result<()> {
        const WHAT: &str = "clearing a deploy token";
        // A transaction of its own: a writer under a lease proves its term first (a stale
        // executor must not clear the token of a boot its successor started).
        let mut tx = self.begin_write(WHAT).await?;
        sqlx::query("UPDATE hosts SET deploy_token_sha256 = NULL, deploy_token_expires = NULL WHERE name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))
    }

    /// Records the SHA-256 (hex) of `name`'s node token (the guard API's credential),
    /// replacing any earlier one.
    pub async fn set_node_token(&self, name: &HostName, sha256_hex: &str) -> Result<()> {
        let done = sqlx::query("UPDATE hosts SET node_token_sha256 = $1 WHERE name = $2")
            .bind(sha256_hex)
            .bind(name.as_str())
            .execute(&self.pool)
            .await
            .map_err(query("storing a node token"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownHost(name.clone()));
        }
        Ok(())
    }

    /// Whether `sha256_hex` is `name`'s node token; `None` when no host has that name. One
    /// query: the guard API asks on every request.
    pub async fn check_node_token(&self, name: &HostName, sha256_hex: &str) -> Result<Option<bool>> {
        let row = sqlx::query("SELECT node_token_sha256 FROM hosts WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(query("checking a node token"))?;
        let Some(row) = row else { return Ok(None) };
        let stored: Option<String> = row.try_get(0).map_err(query("reading a node token"))?;
        Ok(Some(stored.as_deref() == Some(sha256_hex)))
    }

    /// One host, or [`StoreError::UnknownHost`].
    pub async fn require_host(&self, name: &HostName) -> Result<Host> {
        self.host(name).await?.ok_or_else(|| StoreError::UnknownHost(name.clone()))
    }

    pub(crate) async fn host_in(&self, conn: &mut sqlx::AnyConnection, name: &HostName) -> Result<Option<Host>> {
        let row = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = $1"))
            .bind(name.as_str())
            .fetch_optional(conn)
            .await
            .map_err(query("reading a host"))?;
        row.as_ref().map(host_from_row).transpose()
    }
}

/// `name`'s state from `expected` to `state` (a compare-and-set), with its event; whether it
/// changed.
async fn cas_state(
    conn: &mut sqlx::AnyConnection,
    name: &HostName,
    expected: HostState,
    state: HostState,
    now: i64,
    actor: &str,
    reason: &str,
) -> Result<bool> {
    const WHAT: &str = "changing a host's state";
    let done = sqlx::query("UPDATE hosts SET state = $1, updated_at = $2 WHERE name = $3 AND state = $4")
        .bind(state.as_str())
        .bind(now)
        .bind(name.as_str())
        .bind(expected.as_str())
        .execute(&mut *conn)
        .await
        .map_err(query(WHAT))?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let message = format!("host {name}: {expected} -> {state}: {reason}");
    insert_event(conn, &NewEvent::host(actor, "host.state", name, message)).await?;
    Ok(true)
}
