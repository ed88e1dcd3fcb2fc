//! What the operation executors (reimage, fence) share about their persisted rows.

use std::str::FromStr;

use nodekeeper_store::Operation;
use serde::de::DeserializeOwned;

/// The typed step and data of `op`, or why they cannot be read (the operation then fails
/// with that reason instead of being guessed at).
pub fn parse_state<S, D>(op: &Operation) -> Result<(S, D), String>
where
    S: FromStr<Err = String>,
    D: DeserializeOwned,
{
    match (op.step.parse::<S>(), serde_json::from_str::<D>(&op.data)) {
        (Ok(s), Ok(d)) => Ok((s, d)),
        (s, d) => Err(format!(
            "unreadable operation state (step {:?}: {:?}; data: {:?})",
            op.step,
            s.err(),
            d.err().map(|e| e.to_string())
        )),
    }
}
