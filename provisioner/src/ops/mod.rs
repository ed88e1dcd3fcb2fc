//! What the operation executors (reimage, fence) share: one engine that decides, carries
//! out and records every step ([`engine`]), and acting under a lease (a leadership term, or a
//! per-operation claim) that is renewed while they work.

pub mod engine;
pub mod runner;
pub mod writes;

#[cfg(test)]
mod crash_tests;

pub use engine::{Decision, Machine};

/// A machine's steps: the enum (persisted as the words given), every step in order (`ALL`),
/// `as_str`, `Display`, and `FromStr` refusing an unknown word ("unknown KIND step").
#[macro_export]
macro_rules! steps {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($kind:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $( $(#[$vmeta])* #[serde(rename = $word)] $variant ),+
        }

        impl $name {
            /// Every step, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The persisted word.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<$name, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|x| x.as_str() == s)
                    .ok_or_else(|| format!(concat!("unknown ", $kind, " step {:?}"), s))
            }
        }
    };
}

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use nodekeeper_store::{Leadership, Operation, Store, StoreError};
use serde::de::DeserializeOwned;

/// Runs `work` while renewing `lease` (held by its holder, `ttl_ms` long) every third of its
/// length. When the lease is lost — another holder or another term, as after this process
/// was paused past its expiry — or could not be renewed for two thirds of its length (the
/// database is away: stop before it can run out under us), `work` is dropped where it stands
/// and [`StoreError::LeaseLost`] returned. What `work` writes, it writes through a store
/// `under_lease` of the same term, so even a write already on its way when the loss is
/// noticed is refused by the database.
pub async fn while_leading<T>(
    store: &Store,
    lease: &Leadership,
    ttl_ms: i64,
    work: impl Future<Output = T>,
) -> Result<T, StoreError> {
    let every = Duration::from_millis(u64::try_from(ttl_ms / 3).unwrap_or(1).max(1));
    let lost = || StoreError::LeaseLost { role: lease.role.clone(), term: lease.term };
    let renew = async {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match store.acquire_leadership(&lease.role, &lease.holder, ttl_ms).await {
                Ok(l) if l.holder == lease.holder && l.term == lease.term => renewed = tokio::time::Instant::now(),
                Ok(_) => return lost(),
                Err(e) if renewed.elapsed() >= every * 2 => {
                    tracing::warn!(role = %lease.role, "renewing the lease: {e}");
                    return lost();
                }
                Err(e) => tracing::warn!(role = %lease.role, "renewing the lease: {e}"),
            }
        }
    };
    tokio::select! {
        done = work => Ok(done),
        lost = renew => {
            tracing::warn!(role = %lease.role, term = lease.term, "{lost}; stopping where it stands");
            Err(lost)
        }
    }
}

/// An operation row whose step or data this program cannot read (written by a newer
/// version, or edited by hand): the operation fails with this, it is never guessed at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable operation state (step {step:?}: {}; data: {})", step_error.as_deref().unwrap_or("ok"), data_error.as_deref().unwrap_or("ok"))]
pub struct UnreadableState {
    /// The stored step.
    pub step: String,
    /// Why the step cannot be read, if it cannot.
    pub step_error: Option<String>,
    /// Why the data cannot be read, if it cannot.
    pub data_error: Option<String>,
}

/// The typed step and data of `op`.
pub fn parse_state<S, D>(op: &Operation) -> Result<(S, D), UnreadableState>
where
    S: FromStr<Err = String>,
    D: DeserializeOwned,
{
    match (op.step.parse::<S>(), serde_json::from_str::<D>(&op.data)) {
        (Ok(s), Ok(d)) => Ok((s, d)),
        (s, d) => Err(UnreadableState {
            step: op.step.clone(),
            step_error: s.err(),
            data_error: d.err().map(|e| e.to_string()),
        }),
    }
}

/// Whether an operation of `kind` at `step` may be cancelled now (`operation cancel`), or why
/// not: a reimage and a drain anywhere (a reimage ends `failed` with its host in maintenance,
/// its deploy token burnt; a drain lets go of what it holds); a fence only before its point
/// of return (`confirm`, `repair`, `repair_wait`: nothing was powered off yet), and then its
/// host goes to maintenance — it would be fenced again at the next look otherwise. Pure; the
/// runner asks it again at the step it cancels at.
pub fn cancel_rule(kind: &str, step: &str) -> Result<(), String> {
    match kind {
        crate::reimage::executor::KIND | crate::recovery::drain::KIND => Ok(()),
        "fence" => match step {
            "confirm" | "repair" | "repair_wait" => Ok(()),
            _ => Err(format!(
                "the fence is past its point of return (step {step}): the host may be off already, and its instances \
                 move; it cannot be cancelled"
            )),
        },
        _ => Err(format!("a {kind} cannot be cancelled")),
    }
}
