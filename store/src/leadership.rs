//! Leadership: one active controller among several provisioner replicas. A row per role with
//! its holder and an expiry; a replica renews its own row, and takes the row over only when it
//! has expired. Every change of holder increments `term`, so a replica can tell that it lost
//! the role in between (and a stale leader's term is visible in what it wrote).

use sqlx::Row;

use crate::error::{query, Result};
use crate::types::Timestamp;
use crate::Store;

/// The role as it stands after an acquire attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The role (`controller`).
    pub role: String,
    /// Who holds it.
    pub holder: String,
    /// Incremented on every change of holder.
    pub term: i64,
    /// Until when, unless renewed.
    pub expires_at: Timestamp,
}

impl Leadership {
    /// Whether `me` holds it at `now` (the database's time: [`Store::now`]).
    pub fn held_by(&self, me: &str, now: Timestamp) -> bool {
        self.holder == me && self.expires_at > now
    }

    /// The fencing token of this term, for [`Store::under_lease`].
    pub fn token(&self) -> crate::LeaseToken {
        crate::LeaseToken { role: self.role.clone(), holder: self.holder.clone(), term: self.term }
    }
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<Leadership> {
    const WHAT: &str = "reading leadership";
    Ok(Leadership {
        role: row.try_get("role").map_err(query(WHAT))?,
        holder: row.try_get("holder").map_err(query(WHAT))?,
        term: row.try_get("term").map_err(query(WHAT))?,
        expires_at: Timestamp(row.try_get("expires_at").map_err(query(WHAT))?),
    })
}

impl Store {
    /// Takes or renews `role` for `holder` until now + `ttl_ms`: renews when `holder` has it,
    /// takes it when nobody does or its holder let it expire, and otherwise changes nothing.
    /// Returns the role as it stands (check [`Leadership::held_by`]). Atomic: of two replicas
    /// racing for an expired role, one wins.
    pub async fn acquire_leadership(&self, role: &str, holder: &str, ttl_ms: i64) -> Result<Leadership> {
        let db_now = self.now().await?.0;
        const WHAT: &str = "acquiring leadership";
        let now = db_now;
        let expires = now + ttl_ms;
        let mut tx = self.begin_write_unfenced(WHAT).await?;
        // Insert when absent (a race loses on the primary key and falls through to UPDATE).
        sqlx::query(
            "INSERT INTO leadership (role, holder, term, expires_at, acquired_at) VALUES ($1, $2, 1, $3, $4) \
             ON CONFLICT (role) DO NOTHING",
        )
        .bind(role)
        .bind(holder)
        .bind(expires)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        sqlx::query(
            "UPDATE leadership SET \
               term = CASE WHEN holder = $2 THEN term ELSE term + 1 END, \
               acquired_at = CASE WHEN holder = $2 THEN acquired_at ELSE $4 END, \
               holder = $2, expires_at = $3 \
             WHERE role = $1 AND (holder = $2 OR expires_at <= $4)",
        )
        .bind(role)
        .bind(holder)
        .bind(expires)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        let row = sqlx::query("SELECT role, holder, term, expires_at FROM leadership WHERE role = $1")
            .bind(role)
            .fetch_one(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        tx.commit().await.map_err(query(WHAT))?;
        from_row(&row)
    }

    /// The role's row as it stands, without taking it (for `host show`-like views and tests).
    pub async fn leadership(&self, role: &str) -> Result<Option<Leadership>> {
        const WHAT: &str = "reading leadership";
        let row = sqlx::query("SELECT role, holder, term, expires_at FROM leadership WHERE role = $1")
            .bind(role)
            .fetch_optional(&self.pool)
            .await
            .map_err(query(WHAT))?;
        row.as_ref().map(from_row).transpose()
    }

    /// Deletes `role`'s row if `holder` has it: a per-operation claim whose operation ended.
    pub async fn forget_leadership(&self, role: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leadership WHERE role = $1 AND holder = $2")
            .bind(role)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(query("forgetting a claim"))?;
        Ok(())
    }

    /// Gives up every role whose name starts with `prefix` that `holder` has (a clean
    /// shutdown of an executor: its claims pass to another replica at once).
    pub async fn release_all_leadership(&self, prefix: &str, holder: &str) -> Result<()> {
        let now = self.now().await?.0;
        sqlx::query(
            "UPDATE leadership SET expires_at = $3 WHERE holder = $1 AND SUBSTR(role, 1, $4) = $2 AND expires_at > $3",
        )
        .bind(holder)
        .bind(prefix)
        .bind(now)
        .bind(i64::try_from(prefix.chars().count()).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(query("releasing claims"))?;
        Ok(())
    }

    /// Gives `role` up if `holder` has it (a clean shutdown: the next replica need not wait
    /// for the expiry).
    pub async fn release_leadership(&self, role: &str, holder: &str) -> Result<()> {
        let db_now = self.now().await?.0;
        sqlx::query("UPDATE leadership SET expires_at = $3 WHERE role = $1 AND holder = $2")
            .bind(role)
            .bind(holder)
            .bind(db_now)
            .execute(&self.pool)
            .await
            .map_err(query("releasing leadership"))?;
        Ok(())
    }
}
