//! The PATCH request body: `{"op":"zero","size":N,"offset":O,"flush":B}`
//! or `{"op":"flush"}`. Parsed by hand from a JSON value rather than derived,
//! so that every refusal names the field that is wrong, as `docs/api.md`
//! asks.

use serde_json::{Map, Value};

use crate::fields::{boolean, integer};

/// Largest PATCH body accepted (64 KiB).
pub const MAX_PATCH_BODY: usize = 64 << 10;

/// A parsed PATCH request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchRequest {
    /// Zero `size` bytes at `offset`, then flush if asked.
    Zero {
        /// Offset of the first byte.
        offset: u64,
        /// Number of bytes.
        size: u64,
        /// Flush after zeroing.
        flush: bool,
    },
    /// Flush written data.
    Flush,
}

/// Why a PATCH body was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// Parses a PATCH body.
pub fn parse_patch(body: &[u8]) -> Result<PatchRequest, PatchError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| PatchError(format!("request body is not valid JSON: {error}")))?;
    let Value::Object(object) = value else {
        return Err(PatchError("request body must be a JSON object".into()));
    };
    let op = match object.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(PatchError("field \"op\" must be a string".into())),
        None => return Err(PatchError("missing field \"op\" (\"zero\" or \"flush\")".into())),
    };
    match op {
        "zero" => {
            reject_unknown(&object, op, &["op", "size", "offset", "flush"])?;
            let size = integer(&object, "size").map_err(PatchError)?.ok_or_else(|| PatchError("missing field \"size\"".into()))?;
            let offset = integer(&object, "offset").map_err(PatchError)?.unwrap_or(0);
            let flush = boolean(&object, "flush").map_err(PatchError)?.unwrap_or(false);
            Ok(PatchRequest::Zero { offset, size, flush })
        }
        "flush" => {
            reject_unknown(&object, op, &["op"])?;
            Ok(PatchRequest::Flush)
        }
        other => Err(PatchError(format!("unknown op {other:?}: expected \"zero\" or \"flush\""))),
    }
}

fn reject_unknown(object: &Map<String, Value>, op: &str, known: &[&str]) -> Result<(), PatchError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(PatchError(format!("unknown field {key:?} for op {op:?}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_imageio_forms() {
        assert_eq!(parse_patch(br#"{"op":"zero","size":4096}"#), Ok(PatchRequest::Zero { offset: 0, size: 4096, flush: false }));
        assert_eq!(
            parse_patch(br#"{"op":"zero","size":1,"offset":2,"flush":true}"#),
            Ok(PatchRequest::Zero { offset: 2, size: 1, flush: true })
        );
        assert_eq!(parse_patch(br#"{"op":"flush"}"#), Ok(PatchRequest::Flush));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: [(&[u8], &str); 10] = [
            (b"not json", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"size":1}"#, "\"op\""),
            (br#"{"op":"trim"}"#, "\"trim\""),
            (br#"{"op":"zero"}"#, "\"size\""),
            (br#"{"op":"zero","size":-1}"#, "\"size\""),
            (br#"{"op":"zero","size":"1"}"#, "\"size\""),
            (br#"{"op":"zero","size":1,"flush":"yes"}"#, "\"flush\""),
            (br#"{"op":"zero","size":1,"flush":null}"#, "\"flush\""),
            (br#"{"op":"zero","size":1,"colour":"red"}"#, "\"colour\""),
        ];
        for (body, field) in cases {
            let error = parse_patch(body).unwrap_err();
            assert!(error.0.contains(field), "{} should mention {field}", error.0);
        }
    }

    proptest! {
        #[test]
        fn zero_requests_round_trip(size in any::<u64>(), offset in proptest::option::of(any::<u64>()), flush in proptest::option::of(any::<bool>())) {
            let mut body = serde_json::json!({"op": "zero", "size": size});
            if let Some(offset) = offset { body["offset"] = offset.into(); }
            if let Some(flush) = flush { body["flush"] = flush.into(); }
            let parsed = parse_patch(body.to_string().as_bytes()).unwrap();
            prop_assert_eq!(parsed, PatchRequest::Zero { offset: offset.unwrap_or(0), size, flush: flush.unwrap_or(false) });
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse_patch(&body);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(key in "[a-z]{1,6}", value in prop_oneof![Just(serde_json::json!(null)), any::<i64>().prop_map(serde_json::Value::from), any::<f64>().prop_map(serde_json::Value::from), ".{0,5}".prop_map(serde_json::Value::from)]) {
            let body = serde_json::json!({"op": "zero", key: value});
            let _ = parse_patch(body.to_string().as_bytes());
        }
    }
}
