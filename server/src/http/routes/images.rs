//! `/images/{ticket}`: OPTIONS, HEAD, GET (whole or one range), PUT (at the
//! `Content-Range` start) and PATCH (zero, flush), with imageio's status
//! codes and headers. Everything about a request is checked before its
//! body is read, so `Expect: 100-continue` clients get the refusal instead
//! of a 100.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use blockgate_protocol::sparse;
use blockgate_protocol::{ByteRange, ImageOptions, MAX_PATCH_BODY, PatchRequest, parse_content_range, parse_patch, parse_range};

use super::AppState;
use super::dirty::{self, MapRequest};
use super::query::{Params, flag};
use crate::error::{ApiError, ApiResult};
use crate::http::json_line::JsonLine;
use crate::tickets::{Access, Operation, Ticket};
use crate::transfer::ConnectionCut;
use crate::transfer::backup::{Scope, backup_body};
use crate::transfer::restore::{RestoreSettings, restore};
use crate::transfer::restore_record;
use crate::transfer::{Hold, WriteTarget, cancelable, discard_body, guard_body, read_body, with_known_length, write_body};

const ALLOW_WRITABLE: &str = "OPTIONS,HEAD,GET,PUT,PATCH";
const ALLOW_READ_ONLY: &str = "OPTIONS,HEAD,GET";

fn features(writable: bool) -> Vec<String> {
    let features: &[&str] = if writable { &["checksum", "extents", "flush", "zero"] } else { &["checksum", "extents"] };
    features.iter().map(|feature| feature.to_string()).collect()
}

/// `OPTIONS /images/{ticket}`; `OPTIONS /images/*` answers for the server.
pub async fn options(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    if id == "*" {
        return Ok(server_options(&state));
    }
    let ticket = state.tickets.get(&id)?;
    ticket.check()?;
    let body = ImageOptions {
        features: features(ticket.writable),
        max_readers: ticket.limits.max_readers,
        max_writers: ticket.limits.max_writers,
        unix_socket: state.local_socket.clone(),
        size: Some(ticket.backend.size()),
        dirty: Some(ticket.backend.bitmap().is_some()),
        sparse_stream: Some(true),
        checkpoints: Some(ticket.backend.supports_checkpoints()),
    };
    let allow = if ticket.writable { ALLOW_WRITABLE } else { ALLOW_READ_ONLY };
    Ok(([(header::ALLOW, allow)], JsonLine(body)).into_response())
}

fn server_options(state: &AppState) -> Response {
    let body = ImageOptions {
        features: features(true),
        max_readers: state.limits.max_readers,
        max_writers: state.limits.max_writers,
        unix_socket: state.local_socket.clone(),
        size: None,
        dirty: None,
        sparse_stream: Some(true),
        checkpoints: None,
    };
    ([(header::ALLOW, "OPTIONS")], JsonLine(body)).into_response()
}

pub async fn head(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let ticket = state.tickets.get(&id)?;
    ticket.check()?;
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(ticket.backend.size()));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(response)
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<Params>,
    connection: Option<Extension<ConnectionCut>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let connection = connection.map(|Extension(cut)| cut);
    let operation = state.tickets.begin(&id, Access::Read)?;
    let ticket = operation.ticket().clone();
    let close = flag(&params, "close", false)?;
    let map = dirty::parse(&params)?;
    if transfer_format(&params)? == Format::Sparse {
        let map = dirty::for_ticket(&ticket, map, true)?;
        let without_checksum = !flag(&params, "checksum", true)?;
        return sparse_get(operation, map, without_checksum, &headers, close, connection).await;
    }
    if map.since.is_some() || map.checkpoint.is_some() {
        return Err(ApiError::BadRequest("since= and checkpoint= apply to format=sparse and to extents, not to raw data".into()));
    }
    refuse_checksum_on_raw(&params)?;
    let size = ticket.backend.size();
    let (status, range) = match headers.get(header::RANGE) {
        None => (StatusCode::OK, ByteRange { start: 0, end: size }),
        Some(value) => {
            let value = value.to_str().map_err(|_| ApiError::BadRequest("Range header is not ASCII".into()))?;
            (StatusCode::PARTIAL_CONTENT, parse_range(value, size).map_err(|error| ApiError::from_range(error, size))?)
        }
    };
    let body = cancelable(read_body(ticket.backend.clone(), range), &ticket).await?;
    let mut response = Response::new(with_known_length(guard_body(body, operation, Some(range.start), connection), range.len()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(range.len()));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&range.content_range(size)).expect("ASCII"));
    }
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// `GET ?format=sparse[&context=zero|dirty][&since=ID][&checkpoint=ID2][&checksum=n]`:
/// a full or incremental backup.
async fn sparse_get(
    operation: Operation,
    map: MapRequest,
    without_checksum: bool,
    headers: &HeaderMap,
    close: bool,
    connection: Option<ConnectionCut>,
) -> ApiResult<Response> {
    if headers.contains_key(header::RANGE) {
        return Err(ApiError::BadRequest("Range does not apply to format=sparse; the stream covers the image".into()));
    }
    let ticket = operation.ticket().clone();
    let backend = cancelable(dirty::open(&ticket, &map), &ticket).await?;
    let legacy = map.incremental && map.since.is_none();
    let scope = Scope {
        incremental: map.incremental,
        bitmap: if legacy { ticket.backend.bitmap().map(str::to_string) } else { None },
        since: map.since,
        checkpoint: map.checkpoint,
        disk: ticket.backend.backup_point().map(|point| point.disk.clone()),
        without_checksum,
    };
    let body = cancelable(backup_body(backend, scope), &ticket).await?;
    let mut response = Response::new(guard_body(body, operation, None, connection));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(sparse::CONTENT_TYPE));
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// What a PUT will do, decided before its body is read.
struct PutPlan {
    operation: Operation,
    start: u64,
    /// Body length from Content-Range or Content-Length, if announced.
    expected: Option<u64>,
    flush: bool,
    /// Apply an incremental stream out of its chain.
    force: bool,
    /// Zero what a smaller full stream leaves of the target.
    zero_tail: bool,
    /// Check a full stream's trailer checksum against the data.
    verify_checksum: bool,
    format: Format,
    /// The target, held for this write or restore.
    claim: restore_record::Claim,
}

pub async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let plan = match plan_put(&state, &id, &params, &headers) {
        Ok(plan) => plan,
        Err(error) => {
            discard_body(&headers, body);
            return Err(error);
        }
    };
    let PutPlan { operation, start, expected, flush, force, zero_tail, verify_checksum, format, claim } = plan;
    let ticket = operation.ticket().clone();
    let hold: Hold = Arc::new(claim);
    if format == Format::Sparse {
        let settings =
            RestoreSettings { may_deallocate: ticket.sparse, flush, force, zero_tail, verify_checksum, body_timeout: state.body_timeout };
        let restored = cancelable(restore(ticket.backend.clone(), body, settings, hold), &ticket).await?;
        return Ok(JsonLine(restored).into_response());
    }
    let size = ticket.backend.size();
    let limit = expected.unwrap_or(size - start);
    let over_limit = |received: u64| match expected {
        Some(expected) => ApiError::BadRequest(format!("request body is longer than the {expected} bytes announced (at least {received})")),
        None => ApiError::range(format!("request body passes the end of the image ({size} bytes) at offset {}", start + received), size),
    };
    let writing = async {
        let target = WriteTarget { backend: ticket.backend.clone(), hold, start, limit, body_timeout: state.body_timeout };
        write_body(target, body, over_limit).await.map_err(|failure| {
            tracing::warn!(written = failure.applied.data, error = %failure.error, "PUT failed");
            with_written(failure.error, failure.applied.data)
        })
    };
    let written = cancelable(writing, &ticket).await?;
    if let Some(expected) = expected {
        if written != expected {
            return Err(ApiError::BadRequest(format!(
                "request body has {written} bytes but {expected} were announced; the {written} bytes at offset {start} were written"
            )));
        }
    }
    if flush {
        ticket.backend.flush().await?;
    }
    operation.record(start, start + written);
    Ok(StatusCode::OK.into_response())
}

fn plan_put(state: &AppState, id: &str, params: &Params, headers: &HeaderMap) -> ApiResult<PutPlan> {
    let operation = state.tickets.begin(id, Access::Write)?;
    let ticket = operation.ticket();
    let format = transfer_format(params)?;
    let flush = flag(params, "flush", true)?;
    let force = flag(params, "force", false)?;
    let zero_tail = flag(params, "zero_tail", false)?;
    if format == Format::Sparse {
        if headers.contains_key(header::CONTENT_RANGE) {
            return Err(ApiError::BadRequest("Content-Range does not apply to format=sparse; frames carry their offsets".into()));
        }
        let verify_checksum = flag(params, "checksum", true)?;
        let claim = restore_record::begin_restore(&ticket.backend)?;
        return Ok(PutPlan { operation, start: 0, expected: None, flush, force, zero_tail, verify_checksum, format, claim });
    }
    if zero_tail {
        return Err(ApiError::BadRequest("zero_tail=y applies to format=sparse; zero the rest of a raw upload with PATCH zero".into()));
    }
    refuse_checksum_on_raw(params)?;
    let size = ticket.backend.size();
    let content_range = match headers.get(header::CONTENT_RANGE) {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| ApiError::BadRequest("Content-Range header is not ASCII".into()))?;
            Some(parse_content_range(value).map_err(|error| ApiError::from_range(error, size))?)
        }
    };
    let content_length = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|value| value.parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?,
        ),
    };
    let start = content_range.map_or(0, |range| range.start);
    let range_length = content_range.and_then(|range| range.end).map(|end| end - start);
    if let (Some(range_length), Some(content_length)) = (range_length, content_length) {
        if range_length != content_length {
            return Err(ApiError::BadRequest(format!("Content-Range covers {range_length} bytes but Content-Length is {content_length}")));
        }
    }
    let expected = range_length.or(content_length);
    let end = start.checked_add(expected.unwrap_or(0));
    if start > size || end.is_none_or(|end| end > size) {
        return Err(ApiError::range(
            format!("writing {} bytes at offset {start} would pass the end of the image ({size} bytes)", expected.unwrap_or(0)),
            size,
        ));
    }
    let claim = restore_record::begin_write(&ticket.backend)?;
    Ok(PutPlan { operation, start, expected, flush, force, zero_tail, verify_checksum: true, format, claim })
}

/// `checksum=` names the sparse stream's trailer hash: on raw data a 400.
fn refuse_checksum_on_raw(params: &Params) -> ApiResult<()> {
    match params.get("checksum") {
        Some(value) => Err(ApiError::BadRequest(format!(
            "checksum={value:?} applies to format=sparse, not to raw data (GET .../checksum computes an image's checksum)"
        ))),
        None => Ok(()),
    }
}

/// Adds how much of a failed write landed to its message.
fn with_written(error: ApiError, written: u64) -> ApiError {
    let note = format!(" ({written} bytes were written before the failure)");
    match error {
        ApiError::BadRequest(message) => ApiError::BadRequest(message + &note),
        ApiError::RangeNotSatisfiable { message, size } => ApiError::RangeNotSatisfiable { message: message + &note, size },
        other => other,
    }
}

pub async fn patch(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let too_large = || ApiError::PayloadTooLarge(format!("PATCH body is larger than {MAX_PATCH_BODY} bytes"));
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let operation = match (state.tickets.begin(&id, Access::Write), announced) {
        (Err(error), _) => {
            discard_body(&headers, body);
            return Err(error);
        }
        (Ok(_), Some(length)) if length > MAX_PATCH_BODY as u64 => {
            discard_body(&headers, body);
            return Err(too_large());
        }
        (Ok(operation), _) => operation,
    };
    let ticket = operation.ticket().clone();
    let body = match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, MAX_PATCH_BODY)).await {
        Err(_) => return Err(ApiError::BadRequest(format!("the request body stalled for {:?}", state.body_timeout))),
        Ok(body) => body.map_err(|_| too_large())?,
    };
    match parse_patch(&body).map_err(|error| ApiError::BadRequest(error.0))? {
        PatchRequest::Zero { offset, size, flush } => cancelable(zero(&ticket, offset, size, flush), &ticket).await?,
        PatchRequest::Flush => cancelable(ticket.backend.flush(), &ticket).await?,
    }
    Ok(StatusCode::OK.into_response())
}

async fn zero(ticket: &Ticket, offset: u64, length: u64, flush: bool) -> ApiResult<()> {
    let size = ticket.backend.size();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(ApiError::range(
            format!("zeroing {length} bytes at offset {offset} would pass the end of the image ({size} bytes)"),
            size,
        ));
    }
    if length == 0 {
        // Nothing to write: no claim, and the chain record stays.
        return if flush { ticket.backend.flush().await } else { Ok(()) };
    }
    let claim = restore_record::begin_write(&ticket.backend)?;
    // A task of its own, holding the claim until the storage answers,
    // even if this request is dropped meanwhile.
    let backend = ticket.backend.clone();
    let may_deallocate = ticket.sparse;
    tokio::spawn(async move {
        let _claim = claim;
        backend.zero(offset, length, may_deallocate).await
    })
    .await
    .map_err(|error| ApiError::Internal(format!("zero task failed: {error}")))??;
    if flush {
        ticket.backend.flush().await?;
    }
    Ok(())
}

/// How a GET or PUT body carries the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// The bytes themselves.
    Raw,
    /// The sparse stream.
    Sparse,
}

fn transfer_format(params: &Params) -> ApiResult<Format> {
    match params.get("format").map(String::as_str) {
        None | Some("raw") => Ok(Format::Raw),
        Some("sparse") => Ok(Format::Sparse),
        Some(other) => Err(ApiError::BadRequest(format!("unsupported format={other:?}: expected raw or sparse"))),
    }
}
