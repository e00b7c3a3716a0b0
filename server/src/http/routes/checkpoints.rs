//! `/images/{ticket}/checkpoints`: list (`GET`), make (`POST {"id": ID}`,
//! the id optional) and delete (`DELETE .../{id}`) the image's
//! checkpoints. Listing needs `read`; changing needs `write` or the
//! `checkpoint` op. An image that cannot hold checkpoints (raw, an NBD
//! URI, opened read-only) answers 409 saying why.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::json_line::JsonLine;
use crate::sources::checkpoints::{check_id, parse_create};
use crate::tickets::Access;
use crate::transfer::cancelable;

/// Largest `POST` body: `{"id": "..."}` with a 64-byte id is far smaller.
const MAX_BODY: usize = 4096;

pub async fn list(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let operation = state.tickets.begin(&id, Access::Read)?;
    let ticket = operation.ticket();
    let (checkpoints, owned) = ticket.backend.checkpoints()?;
    let list = cancelable(checkpoints.list(owned.monitor()), ticket).await?;
    Ok(JsonLine(list).into_response())
}

pub async fn create(State(state): State<AppState>, Path(id): Path<String>, body: Body) -> ApiResult<Response> {
    let operation = state.tickets.begin(&id, Access::Checkpoint)?;
    let ticket = operation.ticket();
    let (checkpoints, owned) = ticket.backend.checkpoints()?;
    let body = match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_) => return Err(ApiError::BadRequest(format!("the request body stalled for {:?}", state.body_timeout))),
        Ok(body) => body.map_err(|_| ApiError::PayloadTooLarge(format!("body is larger than {MAX_BODY} bytes")))?,
    };
    let checkpoint_id = parse_create(&body)?;
    let created = cancelable(checkpoints.create(owned.monitor(), checkpoint_id), ticket).await?;
    Ok((StatusCode::CREATED, JsonLine(created)).into_response())
}

pub async fn delete(State(state): State<AppState>, Path((id, checkpoint)): Path<(String, String)>) -> ApiResult<Response> {
    let operation = state.tickets.begin(&id, Access::Checkpoint)?;
    let ticket = operation.ticket();
    let (checkpoints, owned) = ticket.backend.checkpoints()?;
    if check_id(&checkpoint).is_err() {
        return Err(ApiError::NotFound(format!("no checkpoint {checkpoint:?} on this image")));
    }
    cancelable(checkpoints.delete(owned.monitor(), &checkpoint), ticket).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
