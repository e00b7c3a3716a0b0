//! `GET /images/{ticket}/checksum?algorithm=blake2b&block_size=N` and
//! `GET /images/{ticket}/checksum/algorithms`: imageio's blkhash of the
//! image. Zero ranges are hashed from their extents instead of read; data
//! blocks are hashed on the blocking pool, as many at once as there are
//! cores, while the next blocks are read, and their digests are combined
//! in image order.

use std::collections::VecDeque;

use axum::extract::{Path, Query, State};
use axum::Json;
use blockgate_protocol::blkhash::{block_digest, check_block_size, BlockHasher, BlockPart, ALGORITHM, DEFAULT_BLOCK_SIZE};
use blockgate_protocol::sparse::Checksum;
use blockgate_protocol::ByteRange;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};

use super::query::{number, Params};
use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::tickets::Access;
use crate::transfer::{cancelable, read_pieces, Piece};

pub async fn get(State(state): State<AppState>, Path(id): Path<String>, Query(params): Query<Params>) -> ApiResult<Json<Checksum>> {
    let operation = state.tickets.begin(&id, Access::Read)?;
    let ticket = operation.ticket();
    match params.get("algorithm").map(String::as_str) {
        None | Some(ALGORITHM) => {}
        Some(other) => return Err(ApiError::BadRequest(format!("unsupported algorithm={other:?}: expected {ALGORITHM}"))),
    }
    let block_size = number(&params, "block_size")?.unwrap_or(DEFAULT_BLOCK_SIZE);
    check_block_size(block_size).map_err(ApiError::BadRequest)?;
    let backend = ticket.backend.clone();
    let range = ByteRange { start: 0, end: backend.size() };
    // One block hashing per core, and two more read ahead meanwhile.
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let digests = blocks(read_pieces(backend, range), block_size)
        .map(|block| async move {
            match block? {
                Block::Zeros(count) => Ok(Digests::Zeros(count)),
                Block::Parts(parts) => {
                    let digest = tokio::task::spawn_blocking(move || {
                        block_digest(parts.iter().map(|part| match part {
                            Part::Data(data) => BlockPart::Data(data),
                            Part::Zeros(length) => BlockPart::Zeros(*length),
                        }))
                    });
                    Ok(Digests::One(digest.await.map_err(|error| ApiError::Internal(format!("hashing failed: {error}")))?))
                }
            }
        })
        .buffered(workers + 2);
    let hashing = digests.try_fold(BlockHasher::new(block_size), |mut hasher, digests| async move {
        match digests {
            Digests::Zeros(count) => hasher.push_zero_blocks(count),
            Digests::One(digest) => hasher.push_digest(digest),
        }
        Ok(hasher)
    });
    let hasher = cancelable(hashing, ticket).await?;
    Ok(Json(Checksum { algorithm: ALGORITHM.to_string(), block_size, checksum: hasher.finish() }))
}

pub async fn algorithms(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    state.tickets.get(&id)?.check()?;
    Ok(Json(json!({ "algorithms": [ALGORITHM] })))
}

enum Digests {
    Zeros(u64),
    One([u8; 32]),
}

/// A piece of a block.
enum Part {
    Data(Bytes),
    Zeros(u64),
}

/// What to hash next.
enum Block {
    /// This many whole blocks of zeros.
    Zeros(u64),
    /// One block (or the short last one), in parts.
    Parts(Vec<Part>),
}

/// Cuts image pieces into blocks of `block_size`.
struct Blocker {
    block_size: u64,
    parts: Vec<Part>,
    filled: u64,
}

impl Blocker {
    fn add(&mut self, part: Part, length: u64, ready: &mut VecDeque<Block>) {
        self.parts.push(part);
        self.filled += length;
        if self.filled == self.block_size {
            ready.push_back(Block::Parts(std::mem::take(&mut self.parts)));
            self.filled = 0;
        }
    }

    fn push(&mut self, piece: Piece, ready: &mut VecDeque<Block>) {
        match piece {
            Piece::Zeros(mut length) => {
                if self.filled > 0 {
                    let take = length.min(self.block_size - self.filled);
                    self.add(Part::Zeros(take), take, ready);
                    length -= take;
                }
                let whole = length / self.block_size;
                if whole > 0 {
                    ready.push_back(Block::Zeros(whole));
                    length -= whole * self.block_size;
                }
                if length > 0 {
                    self.add(Part::Zeros(length), length, ready);
                }
            }
            Piece::Data(mut data) => {
                while !data.is_empty() {
                    let take = (data.len() as u64).min(self.block_size - self.filled);
                    self.add(Part::Data(data.split_to(take as usize)), take, ready);
                }
            }
        }
    }
}

/// The blocks of a stream of pieces, in order.
fn blocks(pieces: impl Stream<Item = Result<Piece, ApiError>> + Send, block_size: u64) -> impl Stream<Item = Result<Block, ApiError>> + Send {
    let blocker = Blocker { block_size, parts: Vec::new(), filled: 0 };
    stream::unfold((Box::pin(pieces), blocker, VecDeque::new(), false), |(mut pieces, mut blocker, mut ready, mut ended)| async move {
        loop {
            if let Some(block) = ready.pop_front() {
                return Some((Ok(block), (pieces, blocker, ready, ended)));
            }
            if ended {
                return None;
            }
            match pieces.next().await {
                Some(Ok(piece)) => blocker.push(piece, &mut ready),
                Some(Err(error)) => return Some((Err(error), (pieces, blocker, ready, true))),
                None => {
                    ended = true;
                    if blocker.filled > 0 {
                        ready.push_back(Block::Parts(std::mem::take(&mut blocker.parts)));
                    }
                }
            }
        }
    })
}
