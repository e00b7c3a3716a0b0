//! `GET /images/{ticket}/extents?context=zero|dirty[&since=ID][&checkpoint=ID2][&start=S&length=L]`:
//! the image map as imageio's JSON array, streamed as it is read from
//! BLOCK_STATUS so a huge fragmented image costs no more memory than a
//! small one. A dirty map is frozen when the request starts.

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use blockgate_protocol::{ByteRange, DirtyState, ZeroState};
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;

use super::AppState;
use super::dirty;
use super::query::{Params, number};
use crate::error::{ApiError, ApiResult};
use crate::tickets::Access;
use crate::transfer::ConnectionCut;
use crate::transfer::extents::extents;
use crate::transfer::{cancelable, guard_body, started};

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<Params>,
    connection: Option<Extension<ConnectionCut>>,
) -> ApiResult<Response> {
    let operation = state.tickets.begin(&id, Access::Read)?;
    let backend = operation.ticket().backend.clone();
    let size = backend.size();
    let map = dirty::for_ticket(operation.ticket(), dirty::parse(&params)?, false)?;
    let start = number(&params, "start")?.unwrap_or(0);
    let length = match number(&params, "length")? {
        Some(0) => return Err(ApiError::BadRequest("invalid length=0: expected a positive length".into())),
        Some(length) => length,
        None => size.saturating_sub(start),
    };
    match start.checked_add(length) {
        Some(end) if start < size && end <= size => {}
        _ => return Err(ApiError::range(format!("extents start={start} length={length} do not fit an image of {size} bytes"), size)),
    }
    let range = ByteRange { start, end: start + length };
    let ticket = operation.ticket();
    let backend = cancelable(dirty::open(ticket, &map), ticket).await?;
    let body = match map.incremental {
        false => json_array(started(extents::<ZeroState>(backend, range)).await?),
        true => json_array(started(extents::<DirtyState>(backend, range)).await?),
    };
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(guard_body(body, operation, None, connection.map(|Extension(cut)| cut)))
        .expect("valid response"))
}

/// Streams `[e1,e2,...]`; an error mid-way aborts the body.
fn json_array<T: Serialize + Send + 'static>(items: impl Stream<Item = Result<T, ApiError>> + Send + 'static) -> Body {
    let elements = items.enumerate().map(|(index, item)| {
        let item = item.map_err(|error| std::io::Error::other(error.to_string()))?;
        let mut text = if index == 0 { String::new() } else { String::from(",") };
        text.push_str(&serde_json::to_string(&item).map_err(std::io::Error::other)?);
        Ok::<_, std::io::Error>(Bytes::from(text))
    });
    let open = stream::once(async { Ok(Bytes::from_static(b"[")) });
    let close = stream::once(async { Ok(Bytes::from_static(b"]\n")) });
    Body::from_stream(open.chain(elements).chain(close))
}
