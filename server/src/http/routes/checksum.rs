//! `GET /images/{ticket}/checksum?algorithm=NAME&block_size=N` and
//! `GET /images/{ticket}/checksum/algorithms`: imageio's blkhash of the
//! image, on any of imageio's algorithms (blake2b by default). Zero ranges are hashed from their extents instead of read; data
//! blocks are hashed on every core while the next ones are read
//! ([`ParallelHasher`]).

use axum::extract::{Path, Query, State};
use blockgate_protocol::ByteRange;
use blockgate_protocol::blkhash::{Algorithm, DEFAULT_BLOCK_SIZE, check_block_size};
use blockgate_protocol::sparse::Checksum;
use futures::TryStreamExt;
use serde_json::{Value, json};

use super::AppState;
use super::query::{Params, number};
use crate::error::{ApiError, ApiResult};
use crate::http::json_line::JsonLine;
use crate::tickets::Access;
use crate::transfer::hashing::ParallelHasher;
use crate::transfer::{cancelable, read_pieces};

pub async fn get(State(state): State<AppState>, Path(id): Path<String>, Query(params): Query<Params>) -> ApiResult<JsonLine<Checksum>> {
    let operation = state.tickets.begin(&id, Access::Read)?;
    let ticket = operation.ticket();
    let algorithm = match params.get("algorithm") {
        None => Algorithm::Blake2b,
        Some(name) => Algorithm::parse(name).map_err(|error| ApiError::BadRequest(format!("algorithm=: {error}")))?,
    };
    let block_size = number(&params, "block_size")?.unwrap_or(DEFAULT_BLOCK_SIZE);
    check_block_size(block_size).map_err(ApiError::BadRequest)?;
    let backend = ticket.backend.clone();
    let range = ByteRange { start: 0, end: backend.size() };
    let hashing = async {
        let mut hasher = ParallelHasher::new(algorithm, block_size);
        let mut pieces = std::pin::pin!(read_pieces(backend, range));
        while let Some(piece) = pieces.try_next().await? {
            hasher.push(piece).await?;
        }
        hasher.finish().await
    };
    let checksum = cancelable(hashing, ticket).await?;
    Ok(JsonLine(Checksum { algorithm: algorithm.name().to_string(), block_size, checksum }))
}

pub async fn algorithms(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<JsonLine<Value>> {
    state.tickets.get(&id)?.check()?;
    let names: Vec<&str> = Algorithm::ALL.iter().map(|algorithm| algorithm.name()).collect();
    Ok(JsonLine(json!({ "algorithms": names })))
}
