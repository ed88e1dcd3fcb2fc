//! Admin tokens (`admin_tokens`): who may use the admin API, and as what. Only a digest of
//! each token is stored; the token is shown once, at creation. A revoked or expired token
//! keeps its row, so its name stays taken and the events that name it stay readable.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use crate::db::get;
use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::Timestamp;
use crate::Store;

/// What a token may do; each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: hosts, instances, operations, events, metrics, the console.
    Viewer,
    /// Also act on hosts: power, reimage, drain, maintenance, mark-fenced.
    Operator,
    /// Everything: hosts and instances added, changed, removed; tokens.
    Admin,
}

impl Role {
    /// The role's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role {s:?}: expected viewer, operator or admin")),
        }
    }
}

/// One token as stored (without its digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminToken {
    /// Its name: what events name as the actor (`token:NAME`).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made, and by whom.
    pub created_at: Timestamp,
    /// The actor that made it.
    pub created_by: String,
    /// When it stops working (none: never).
    pub expires_at: Option<Timestamp>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
    /// When it was last used (written at most once a minute).
    pub last_used_at: Option<Timestamp>,
}

impl AdminToken {
    /// Whether it works at `now`: neither revoked nor expired.
    pub fn usable_at(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// A token name: 1 to 64 of `[A-Za-z0-9_.@-]` (a person or a system: `alice@ops`, `grafana`).
pub fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

const T: &str = "admin_tokens";
const COLUMNS: &str = "name, role, created_at, created_by, expires_at, revoked_at, last_used_at";

fn token_from(row: &AnyRow) -> Result<AdminToken> {
    let role: String = get(row, T, "role")?;
    Ok(AdminToken {
        name: get(row, T, "name")?,
        role: crate::db::parse_column(T, "role", &role)?,
        created_at: Timestamp(get(row, T, "created_at")?),
        created_by: get(row, T, "created_by")?,
        expires_at: get::<Option<i64>>(row, T, "expires_at")?.map(Timestamp),
        revoked_at: get::<Option<i64>>(row, T, "revoked_at")?.map(Timestamp),
        last_used_at: get::<Option<i64>>(row, T, "last_used_at")?.map(Timestamp),
    })
}

impl Store {
    /// Stores a new token under `name` with the digest of its secret, with an event.
    pub async fn create_admin_token(
        &self,
        name: &str,
        role: Role,
        sha256_hex: &str,
        expires_at: Option<Timestamp>,
        actor: &str,
    ) -> Result<AdminToken> {
        const WHAT: &str = "creating an admin token";
        if !valid_token_name(name) {
            return Err(StoreError::Invalid(format!("token name {name:?}: 1 to 64 of [A-Za-z0-9_.@-]")));
        }
        let now = Timestamp::now();
        let mut tx = self.begin_write(WHAT).await?;
        let inserted = sqlx::query(
            "INSERT INTO admin_tokens (name, role, sha256, created_at, created_by, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(sha256_hex)
        .bind(now.0)
        .bind(actor)
        .bind(expires_at.map(|t| t.0))
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(StoreError::TokenExists(name.to_owned()))
            }
            Err(e) => return Err(StoreError::Query { what: WHAT, source: e }),
        }
        let until = expires_at.map_or_else(|| "without expiry".to_owned(), |e| format!("until {e}"));
        insert_event(&mut tx, &NewEvent::cell(actor, "token.created", format!("admin token {name} ({role}) {until}")))
            .await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens WHERE name = $1"))
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let token = token_from(&row)?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(token)
    }

    /// Every token, revoked and expired ones too, by name.
    pub async fn admin_tokens(&self) -> Result<Vec<AdminToken>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query("listing admin tokens"))?;
        rows.iter().map(token_from).collect()
    }

    /// The token named `name` and the digest it was stored with.
    pub async fn admin_token(&self, name: &str) -> Result<Option<(AdminToken, String)>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS}, sha256 FROM admin_tokens WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading an admin token"))?;
        row.map(|r| Ok((token_from(&r)?, get(&r, T, "sha256")?))).transpose()
    }

    /// Revokes the token `name` (at once: the next request with it is refused), with an
    /// event. Revoking a revoked token changes nothing.
    pub async fn revoke_admin_token(&self, name: &str, actor: &str) -> Result<AdminToken> {
        const WHAT: &str = "revoking an admin token";
        let now = Timestamp::now();
        let mut tx = self.begin_write(WHAT).await?;
        let done = sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
            .bind(now.0)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query(WHAT))?
            .ok_or_else(|| StoreError::UnknownToken(name.to_owned()))?;
        if done.rows_affected() > 0 {
            insert_event(&mut tx, &NewEvent::cell(actor, "token.revoked", format!("admin token {name} revoked")))
                .await?;
        }
        let token = token_from(&row)?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(token)
    }

    /// Notes that `name` was used at `now`, unless that was noted within the last minute
    /// (one write a minute per token, not one per request).
    pub async fn touch_admin_token(&self, name: &str, now: Timestamp) -> Result<()> {
        sqlx::query(
            "UPDATE admin_tokens SET last_used_at = $1 WHERE name = $2 \
             AND (last_used_at IS NULL OR last_used_at < $3)",
        )
        .bind(now.0)
        .bind(name)
        .bind(now.0 - 60_000)
        .execute(&self.pool)
        .await
        .map_err(query("noting an admin token's use"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn names_are_checked() {
        for ok in ["alice", "alice@ops", "grafana-1", "a.b_c"] {
            assert!(valid_token_name(ok), "{ok}");
        }
        for bad in ["", "a b", "x/y", &"n".repeat(65), "é"] {
            assert!(!valid_token_name(bad), "{bad}");
        }
    }

    #[test]
    fn expiry_and_revocation_end_a_token() {
        let t = AdminToken {
            name: "a".into(),
            role: Role::Viewer,
            created_at: Timestamp(0),
            created_by: "test".into(),
            expires_at: Some(Timestamp(1000)),
            revoked_at: None,
            last_used_at: None,
        };
        assert!(t.usable_at(Timestamp(999)));
        assert!(!t.usable_at(Timestamp(1000)));
        let revoked = AdminToken { revoked_at: Some(Timestamp(5)), expires_at: None, ..t };
        assert!(!revoked.usable_at(Timestamp(0)));
    }
}
