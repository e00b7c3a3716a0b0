//! Extents of a range, from the backend's BLOCK_STATUS replies (merged
//! across contexts by `blockgate_nbd::allocation`), turned into imageio's
//! `zero`/`hole` or `dirty`/`zero` flags and coalesced. Produced as a
//! stream, one BLOCK_STATUS request at a time, so neither the extents route
//! nor a GET ever holds a whole image's map.

use std::sync::Arc;

use blockgate_nbd::allocation::{self, Piece, PieceState};
use blockgate_nbd::BASE_ALLOCATION;
use blockgate_protocol::{ByteRange, Coalescer, DirtyState, Extent, ZeroState};
use futures::stream::{self, Stream, TryStreamExt};

use crate::backend::Backend;
use crate::error::ApiError;

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

/// The extents of `range` with flags `F`, coalesced, as a stream.
pub fn extents<F>(backend: Arc<Backend>, range: ByteRange) -> impl Stream<Item = Result<Extent<F>, ApiError>> + Send
where
    F: FromPiece + PartialEq + Copy + Send + 'static,
{
    let steps = stream::try_unfold((range.start, Coalescer::default(), false), move |(offset, mut coalescer, finished)| {
        let backend = backend.clone();
        async move {
            if finished {
                return Ok::<_, ApiError>(None);
            }
            if offset >= range.end {
                return Ok(Some((coalescer.finish().into_iter().collect::<Vec<_>>(), (offset, Coalescer::default(), true))));
            }
            let (pieces, next) = status_pieces(&backend, offset, range.end - offset).await?;
            let done: Vec<_> = pieces
                .into_iter()
                .filter_map(|piece| coalescer.push(Extent { start: piece.start, length: piece.length, flags: F::from_piece(piece.state) }))
                .collect();
            Ok(Some((done, (next, coalescer, false))))
        }
    });
    steps.map_ok(|extents: Vec<_>| stream::iter(extents.into_iter().map(Ok))).try_flatten()
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
