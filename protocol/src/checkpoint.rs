//! Checkpoints as the API carries them (checkpoints.md): the id rule, an
//! entry of `GET /images/{ticket}/checkpoints`, and what a restore
//! answers.

use serde::{Deserialize, Serialize};

use crate::sparse::Summary;

/// Checks an id: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` (the
/// server keeps its own bitmaps under a prefix that does).
pub fn check_id(id: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&id.len())
        && !id.starts_with('.')
        && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid {
        return Ok(());
    }
    Err(format!(
        "invalid checkpoint id {:?}: expected 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
        id.chars().take(80).collect::<String>()
    ))
}

/// One checkpoint of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its id.
    pub id: String,
    /// When it was made (RFC 3339).
    pub created: String,
    /// The checkpoint that was newest when it was made.
    pub parent: Option<String>,
    /// Bytes written since it was made (`null` when its bitmap is gone).
    pub dirty_bytes: Option<u64>,
    /// False when its bitmap is missing or inconsistent (the daemon died):
    /// an incremental from it needs a new full backup first.
    pub usable: bool,
}

/// What `PUT ?format=sparse` answers: the stream's summary and the
/// checkpoint the target reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The stream's summary.
    #[serde(flatten)]
    pub summary: Summary,
    /// The checkpoint the stream's `meta` frame named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Bytes zeroed past the end of a smaller full stream (`zero_tail=y`).
    #[serde(rename = "zero-tail", default, skip_serializing_if = "Option::is_none")]
    pub zero_tail: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_follow_the_contract() {
        for id in ["cp1", "2026-11-22T10.00", "a_b-c.d", &"x".repeat(64)] {
            assert!(check_id(id).is_ok(), "{id}");
        }
        for id in ["", ".hidden", ".blockgate.view-1", "a/b", "a b", "é", &"x".repeat(65), "a,b", "cp:1"] {
            assert!(check_id(id).is_err(), "{id}");
        }
    }

    proptest! {
        #[test]
        fn any_id_is_checked_without_panic(id in ".{0,80}") {
            let valid = check_id(&id).is_ok();
            prop_assert_eq!(valid, !id.is_empty() && id.len() <= 64 && !id.starts_with('.')
                && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
        }
    }
}
