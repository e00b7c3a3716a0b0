//! Fields of a JSON object read one by one, with refusals that name the
//! field and say what it should be: the shared helpers of the hand-written
//! parsers (PATCH bodies, tickets). An absent field reads as `None`; a
//! `null` is a wrong type like any other.

use serde_json::{Map, Value};

/// A non-negative integer field.
pub(crate) fn integer(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match object.get(field) {
        None => Ok(None),
        Some(Value::Number(number)) => {
            number.as_u64().map(Some).ok_or_else(|| format!("field {field:?} must be a non-negative integer, not {number}"))
        }
        Some(other) => Err(format!("field {field:?} must be a non-negative integer, not {other}")),
    }
}

/// A string field.
pub(crate) fn string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match object.get(field) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(format!("field {field:?} must be a string, not {other}")),
    }
}

/// A boolean field.
pub(crate) fn boolean(object: &Map<String, Value>, field: &str) -> Result<Option<bool>, String> {
    match object.get(field) {
        None => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(*flag)),
        Some(other) => Err(format!("field {field:?} must be true or false, not {other}")),
    }
}
