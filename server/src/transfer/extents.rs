//! Extents of a range, from the backend's BLOCK_STATUS replies (merged
//! across contexts by `blockgate_nbd::allocation`), turned into imageio's
//! `zero`/`hole` or `dirty`/`zero` flags and coalesced. Produced as a
//! stream, a few windows of BLOCK_STATUS requests ahead, so neither the
//! extents route nor a GET ever holds a whole image's map.

use std::sync::Arc;

use blockgate_nbd::BASE_ALLOCATION;
use blockgate_nbd::allocation::{self, Piece, PieceState};
use blockgate_protocol::{ByteRange, Coalescer, DirtyState, Extent, ZeroState};
use futures::stream::{self, Stream, StreamExt, TryStreamExt};

use crate::error::ApiError;
use crate::sources::backend::Backend;

/// Flags an extent listing can be made of.
pub trait FromPiece {
    /// The flags of a piece.
    fn from_piece(state: PieceState) -> Self;
}

impl FromPiece for ZeroState {
    fn from_piece(state: PieceState) -> ZeroState {
        ZeroState { zero: state.zero, hole: state.hole }
    }
}

impl FromPiece for DirtyState {
    fn from_piece(state: PieceState) -> DirtyState {
        DirtyState { dirty: state.dirty, zero: state.zero }
    }
}

/// The image is described in windows of this size, several at once: a
/// 1 TiB map is 1024 BLOCK_STATUS requests, kept [`STATUS_DEPTH`] in
/// flight, and one window's pieces stay small even on a fragmented image.
const STATUS_WINDOW: u64 = 1 << 30;
const STATUS_DEPTH: usize = 4;

/// The extents of `range` with flags `F`, coalesced, as a stream.
pub fn extents<F>(backend: Arc<Backend>, range: ByteRange) -> impl Stream<Item = Result<Extent<F>, ApiError>> + Send
where
    F: FromPiece + PartialEq + Copy + Send + 'static,
{
    let windows =
        (range.start..range.end).step_by(STATUS_WINDOW as usize).map(move |start| (start, (start + STATUS_WINDOW).min(range.end)));
    let pieces = stream::iter(windows)
        .map(move |(start, end)| {
            let backend = backend.clone();
            async move { window_pieces(&backend, start, end).await }
        })
        .buffered(STATUS_DEPTH)
        .map_ok(|pieces| stream::iter(pieces.into_iter().map(Ok::<_, ApiError>)))
        .try_flatten();
    let state = (Box::pin(pieces), Coalescer::default(), false);
    stream::unfold(state, |(mut pieces, mut coalescer, ended)| async move {
        if ended {
            return None;
        }
        loop {
            match pieces.next().await {
                Some(Ok(piece)) => {
                    let extent = Extent { start: piece.start, length: piece.length, flags: F::from_piece(piece.state) };
                    if let Some(done) = coalescer.push(extent) {
                        return Some((Ok(done), (pieces, coalescer, false)));
                    }
                }
                Some(Err(error)) => return Some((Err(error), (pieces, Coalescer::default(), true))),
                None => return coalescer.finish().map(|last| (Ok(last), (pieces, Coalescer::default(), true))),
            }
        }
    })
}

/// The pieces of `[start, end)`, asking again where a reply stops short.
async fn window_pieces(backend: &Backend, start: u64, end: u64) -> Result<Vec<Piece>, ApiError> {
    let mut pieces = Vec::new();
    let mut at = start;
    while at < end {
        let (described, next) = status_pieces(backend, at, end - at).await?;
        pieces.extend(described);
        at = next;
    }
    Ok(pieces)
}

/// One BLOCK_STATUS step: the pieces it describes and where it stopped.
async fn status_pieces(backend: &Backend, offset: u64, length: u64) -> Result<(Vec<Piece>, u64), ApiError> {
    if !backend.has_context(BASE_ALLOCATION) {
        let all_data = Piece { start: offset, length, state: PieceState { zero: false, hole: false, dirty: false } };
        return Ok((vec![all_data], offset + length));
    }
    let status = backend.block_status(offset, length).await?;
    let pieces = allocation::pieces(&status, backend.dirty_context())?;
    let last = pieces.last().expect("never empty");
    let next = last.start + last.length;
    Ok((pieces, next))
}
