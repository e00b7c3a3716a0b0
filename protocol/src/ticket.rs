//! Tickets as the control API carries them, imageio-compatible: the JSON an
//! orchestrator PUTs (`uuid`, `size`, `url`, `ops`, `timeout`, and the
//! optional `inactivity_timeout`, `sparse`, `dirty`, `transfer_id`,
//! `filename`, plus blockgate's `bitmap` and `format`), and the status a
//! GET returns.
//! Parsed by hand from a JSON value so each refusal names its field;
//! unknown keys are ignored, as imageio does.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fields;

/// Largest ticket body accepted.
pub const MAX_TICKET_BODY: usize = 64 << 10;
/// Inactivity timeout when the ticket gives none (seconds).
pub const DEFAULT_INACTIVITY_TIMEOUT: u64 = 60;
/// Longest `timeout` or `inactivity_timeout` accepted: ten years. Larger
/// numbers are a mistake, and past about 2^63 nanoseconds no clock can
/// hold them.
pub const MAX_TIMEOUT: u64 = 10 * 365 * 24 * 60 * 60;

/// Format of the image behind a `file://` url. Never probed from the
/// file's content: a client that wrote a qcow2 header into a raw image
/// would otherwise choose what qemu opens next (api.md, "Formats and host
/// files").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Raw bytes (the default).
    #[default]
    Raw,
    /// qcow2.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses `raw` or `qcow2`.
    pub fn parse(name: &str) -> Result<ImageFormat, String> {
        match name {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!("unknown format {other:?}: expected raw or qcow2")),
        }
    }
}

/// A ticket as added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketSpec {
    /// Ticket id.
    pub uuid: String,
    /// Image size in bytes.
    pub size: u64,
    /// NBD URI or `file:///PATH`.
    pub url: String,
    /// `read`, `write` (write implies read), `checkpoint` (blockgate).
    pub ops: Vec<String>,
    /// Seconds until expiry, renewed by every operation.
    pub timeout: u64,
    /// Seconds a ticket may sit unused with no connection.
    pub inactivity_timeout: u64,
    /// Zeroing may deallocate.
    pub sparse: bool,
    /// Use the export's one dirty bitmap.
    pub dirty: bool,
    /// Orchestrator's transfer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    /// File name for browsers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Dirty bitmap by name (blockgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// Format of a `file://` image (blockgate; default raw).
    #[serde(default)]
    pub format: ImageFormat,
}

impl TicketSpec {
    /// True if the ticket allows writing.
    pub fn writable(&self) -> bool {
        self.ops.iter().any(|op| op == "write")
    }

    /// True if the ticket may make and delete checkpoints: `write`, or the
    /// extension op `checkpoint` (a read-only backup ticket that rotates
    /// its chain).
    pub fn may_checkpoint(&self) -> bool {
        self.ops.iter().any(|op| op == "write" || op == "checkpoint")
    }
}

/// A ticket refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TicketError(pub String);

/// Parses a ticket body.
pub fn parse_ticket(body: &[u8]) -> Result<TicketSpec, TicketError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| TicketError(format!("ticket is not valid JSON: {error}")))?;
    let Value::Object(object) = value else {
        return Err(TicketError("ticket must be a JSON object".into()));
    };
    let uuid = string(&object, "uuid")?.ok_or_else(|| missing("uuid"))?;
    if uuid.is_empty() || uuid.contains('/') {
        return Err(TicketError("field \"uuid\" must be a non-empty string without '/'".into()));
    }
    let ops = match object.get("ops") {
        Some(Value::Array(ops)) => ops
            .iter()
            .map(|op| match op.as_str() {
                Some(op @ ("read" | "write" | "checkpoint")) => Ok(op.to_string()),
                _ => Err(TicketError(format!("field \"ops\" may hold \"read\", \"write\" and \"checkpoint\", not {op}"))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(TicketError("field \"ops\" must be an array such as [\"read\"]".into())),
        None => return Err(missing("ops")),
    };
    if ops.is_empty() {
        return Err(TicketError("field \"ops\" must name at least one op".into()));
    }
    let url = string(&object, "url")?.ok_or_else(|| missing("url"))?;
    Ok(TicketSpec {
        uuid,
        size: integer(&object, "size")?.ok_or_else(|| missing("size"))?,
        url,
        ops,
        timeout: seconds(&object, "timeout")?.ok_or_else(|| missing("timeout"))?,
        inactivity_timeout: seconds(&object, "inactivity_timeout")?.unwrap_or(DEFAULT_INACTIVITY_TIMEOUT),
        sparse: boolean(&object, "sparse")?.unwrap_or(false),
        dirty: boolean(&object, "dirty")?.unwrap_or(false),
        transfer_id: string(&object, "transfer_id")?,
        filename: string(&object, "filename")?,
        bitmap: string(&object, "bitmap")?,
        format: match string(&object, "format")? {
            None => ImageFormat::Raw,
            Some(name) => ImageFormat::parse(&name).map_err(|error| TicketError(format!("field \"format\": {error}")))?,
        },
    })
}

/// Parses the body of `PATCH /tickets/{id}`: `{"timeout": N}`.
pub fn parse_timeout(body: &[u8]) -> Result<u64, TicketError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| TicketError(format!("body is not valid JSON: {error}")))?;
    let Value::Object(object) = value else {
        return Err(TicketError("body must be a JSON object such as {\"timeout\": 300}".into()));
    };
    seconds(&object, "timeout")?.ok_or_else(|| missing("timeout"))
}

/// A duration field in seconds, at most [`MAX_TIMEOUT`].
fn seconds(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, TicketError> {
    match integer(object, field)? {
        Some(seconds) if seconds > MAX_TIMEOUT => {
            Err(TicketError(format!("field {field:?}: {seconds} seconds is more than the {MAX_TIMEOUT} (ten years) a ticket may last")))
        }
        seconds => Ok(seconds),
    }
}

fn missing(field: &str) -> TicketError {
    TicketError(format!("missing field {field:?}"))
}

fn string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, TicketError> {
    fields::string(object, field).map_err(TicketError)
}

fn integer(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, TicketError> {
    fields::integer(object, field).map_err(TicketError)
}

fn boolean(object: &Map<String, Value>, field: &str) -> Result<Option<bool>, TicketError> {
    fields::boolean(object, field).map_err(TicketError)
}

/// What `GET /tickets/{id}` returns: the ticket and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketStatus {
    /// The ticket as added.
    #[serde(flatten)]
    pub spec: TicketSpec,
    /// An operation is running.
    pub active: bool,
    /// The ticket was deleted while operations ran.
    pub canceled: bool,
    /// Requests in flight.
    pub connections: u64,
    /// When it expires, in seconds on the monotonic clock.
    pub expires: u64,
    /// Seconds since the last operation ended.
    pub idle_time: u64,
    /// Bytes of the union of completed ranges.
    pub transferred: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const GOOD: &str =
        r#"{"uuid":"t1","size":1073741824,"url":"nbd:unix:/run/nbd.sock","ops":["read","write"],"timeout":300,"extra":"ignored"}"#;

    #[test]
    fn accepts_imageio_tickets_with_defaults() {
        let ticket = parse_ticket(GOOD.as_bytes()).unwrap();
        assert_eq!(ticket.uuid, "t1");
        assert!(ticket.writable());
        assert_eq!(ticket.inactivity_timeout, DEFAULT_INACTIVITY_TIMEOUT);
        assert!(!ticket.sparse && !ticket.dirty);
    }

    #[test]
    fn refusals_name_the_field() {
        for field in ["uuid", "size", "url", "ops", "timeout"] {
            let mut value: Value = serde_json::from_str(GOOD).unwrap();
            value.as_object_mut().unwrap().remove(field);
            let error = parse_ticket(value.to_string().as_bytes()).unwrap_err();
            assert!(error.0.contains(field), "{error}");
            value[field] = serde_json::json!(-1);
            let error = parse_ticket(value.to_string().as_bytes()).unwrap_err();
            assert!(error.0.contains(field), "{error}");
        }
        let bad_op = GOOD.replace(r#"["read","write"]"#, r#"["read","delete"]"#);
        assert!(parse_ticket(bad_op.as_bytes()).unwrap_err().0.contains("ops"));
        assert!(parse_timeout(br#"{"timeout":"soon"}"#).unwrap_err().0.contains("timeout"));
        assert_eq!(parse_timeout(br#"{"timeout":30}"#), Ok(30));
        let bad_format = GOOD.replace(r#""timeout":300"#, r#""timeout":300,"format":"vmdk""#);
        assert!(parse_ticket(bad_format.as_bytes()).unwrap_err().0.contains("format"));
    }

    #[test]
    fn the_format_is_raw_unless_named() {
        assert_eq!(parse_ticket(GOOD.as_bytes()).unwrap().format, ImageFormat::Raw);
        let qcow2 = GOOD.replace(r#""timeout":300"#, r#""timeout":300,"format":"qcow2""#);
        assert_eq!(parse_ticket(qcow2.as_bytes()).unwrap().format, ImageFormat::Qcow2);
    }

    #[test]
    fn absurd_timeouts_are_refused_not_wrapped() {
        for field in ["timeout", "inactivity_timeout"] {
            for seconds in [u64::MAX, i64::MAX as u64, MAX_TIMEOUT + 1] {
                let mut value: Value = serde_json::from_str(GOOD).unwrap();
                value[field] = json!(seconds);
                let error = parse_ticket(value.to_string().as_bytes()).unwrap_err();
                assert!(error.0.contains(field) && error.0.contains("ten years"), "{error}");
            }
        }
        assert!(parse_timeout(format!("{{\"timeout\":{}}}", u64::MAX).as_bytes()).is_err());
        assert_eq!(parse_timeout(format!("{{\"timeout\":{MAX_TIMEOUT}}}").as_bytes()), Ok(MAX_TIMEOUT));
    }

    proptest! {
        #[test]
        fn arbitrary_objects_never_panic(key in "[a-z_]{1,20}", value in prop_oneof![
            Just(Value::Null), any::<i64>().prop_map(Value::from), any::<bool>().prop_map(Value::from), ".{0,8}".prop_map(Value::from)
        ]) {
            let mut ticket: Value = serde_json::from_str(GOOD).unwrap();
            ticket[key] = value;
            let _ = parse_ticket(ticket.to_string().as_bytes());
        }

        #[test]
        fn timeouts_are_accepted_exactly_up_to_the_limit(seconds in any::<u64>()) {
            let body = format!("{{\"timeout\":{seconds}}}");
            prop_assert_eq!(parse_timeout(body.as_bytes()).is_ok(), seconds <= MAX_TIMEOUT);
        }

        #[test]
        fn valid_tickets_round_trip(uuid in "[a-z0-9-]{1,36}", size in any::<u64>(), timeout in 0..=MAX_TIMEOUT, write in any::<bool>()) {
            let ops = if write { vec!["read", "write"] } else { vec!["read"] };
            let body = serde_json::json!({"uuid": uuid, "size": size, "url": "file:///x", "ops": ops, "timeout": timeout});
            let ticket = parse_ticket(body.to_string().as_bytes()).unwrap();
            prop_assert_eq!((ticket.writable(), ticket.uuid, ticket.size, ticket.timeout), (write, uuid, size, timeout));
        }
    }
}
