//! Extents of a range, from the backend's BLOCK_STATUS replies: the
//! contexts (`base:allocation`, `qemu:allocation-depth`, the dirty bitmap)
//! are merged at the union of their boundaries, turned into imageio's
//! `zero`/`hole` or `dirty`/`zero` flags and coalesced. Produced as a
//! stream, one BLOCK_STATUS request at a time, so neither the extents route
//! nor a GET ever holds a whole image's map.

use std::sync::Arc;

use blockgate_nbd::{StatusExtent, ALLOCATION_DEPTH, BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use blockgate_protocol::{ByteRange, Coalescer, DirtyState, Extent, ZeroState};
use futures::stream::{self, Stream, TryStreamExt};

use crate::backend::Backend;
use crate::error::ApiError;

/// Splits `N` context extent lists that start at `offset` into pieces with
/// one flags value per context, up to where the shortest list ends.
pub fn merge_contexts<const N: usize>(offset: u64, lists: [&[StatusExtent]; N]) -> Vec<(u64, u64, [u32; N])> {
    let mut pieces = Vec::new();
    let mut index = [0usize; N];
    let mut used = [0u64; N];
    let mut position = offset;
    while (0..N).all(|i| index[i] < lists[i].len()) {
        let step = (0..N).map(|i| u64::from(lists[i][index[i]].length) - used[i]).min().expect("N > 0");
        let flags = std::array::from_fn(|i| lists[i][index[i]].flags);
        pieces.push((position, step, flags));
        position += step;
        for i in 0..N {
            used[i] += step;
            if used[i] == u64::from(lists[i][index[i]].length) {
                index[i] += 1;
                used[i] = 0;
            }
        }
    }
    pieces
}

/// What the backend knows of one piece of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceState {
    /// Reads as zeros (base:allocation ZERO).
    pub zero: bool,
    /// Not allocated in the top layer (allocation depth 0, else HOLE).
    pub hole: bool,
    /// Changed since the bitmap was created (false without a bitmap).
    pub dirty: bool,
}

impl From<PieceState> for ZeroState {
    fn from(state: PieceState) -> ZeroState {
        ZeroState { zero: state.zero, hole: state.hole }
    }
}

impl From<PieceState> for DirtyState {
    fn from(state: PieceState) -> DirtyState {
        DirtyState { dirty: state.dirty, zero: state.zero }
    }
}

/// The extents of `range` with flags `F`, coalesced, as a stream.
pub fn extents<F>(backend: Arc<Backend>, range: ByteRange) -> impl Stream<Item = Result<Extent<F>, ApiError>> + Send
where
    F: From<PieceState> + PartialEq + Copy + Send + 'static,
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
                .filter_map(|piece| coalescer.push(Extent { start: piece.start, length: piece.length, flags: F::from(piece.flags) }))
                .collect();
            Ok(Some((done, (next, coalescer, false))))
        }
    });
    steps.map_ok(|extents: Vec<_>| stream::iter(extents.into_iter().map(Ok))).try_flatten()
}

/// One BLOCK_STATUS step: the pieces it describes and where it stopped.
async fn status_pieces(backend: &Backend, offset: u64, length: u64) -> Result<(Vec<Extent<PieceState>>, u64), ApiError> {
    if !backend.has_context(BASE_ALLOCATION) {
        let all_data = Extent { start: offset, length, flags: PieceState { zero: false, hole: false, dirty: false } };
        return Ok((vec![all_data], offset + length));
    }
    let status = backend.block_status(offset, length).await?;
    let allocation = status.extents(BASE_ALLOCATION).unwrap_or_default();
    let depth = status.extents(ALLOCATION_DEPTH);
    let dirty = backend.dirty_context().and_then(|context| status.extents(context));
    let pieces = merge_contexts(offset, [allocation, depth.unwrap_or(allocation), dirty.unwrap_or(allocation)]);
    let Some(&(last_start, last_length, _)) = pieces.last() else {
        return Err(ApiError::Backend(blockgate_nbd::Error::Protocol(format!("BLOCK_STATUS at {offset} described nothing"))));
    };
    let extents = pieces
        .into_iter()
        .map(|(start, length, [allocation, depth_flags, dirty_flags])| {
            let flags = PieceState {
                zero: allocation & STATE_ZERO != 0,
                hole: if depth.is_some() { depth_flags == 0 } else { allocation & STATE_HOLE != 0 },
                dirty: dirty.is_some() && dirty_flags & STATE_DIRTY != 0,
            };
            Extent { start, length, flags }
        })
        .collect();
    Ok((extents, last_start + last_length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extents(pairs: &[(u32, u32)]) -> Vec<StatusExtent> {
        pairs.iter().map(|&(length, flags)| StatusExtent { length, flags }).collect()
    }

    #[test]
    fn merges_at_the_union_of_boundaries() {
        let a = extents(&[(4096, 0), (8192, 3)]);
        let b = extents(&[(8192, 1), (2048, 0), (10000, 1)]);
        assert_eq!(
            merge_contexts(100, [&a[..], &b[..]]),
            vec![(100, 4096, [0, 1]), (4196, 4096, [3, 1]), (8292, 2048, [3, 0]), (10340, 2048, [3, 1])]
        );
    }

    proptest! {
        #[test]
        fn merged_pieces_tile_the_shortest_list(a in proptest::collection::vec((1u32..5000, 0u32..4), 1..20),
                                                b in proptest::collection::vec((1u32..5000, 0u32..4), 1..20)) {
            let (a, b) = (extents(&a), extents(&b));
            let pieces = merge_contexts(0, [&a[..], &b[..]]);
            let total = |list: &[StatusExtent]| list.iter().map(|e| u64::from(e.length)).sum::<u64>();
            let mut position = 0;
            for (start, length, [fa, fb]) in &pieces {
                prop_assert_eq!(*start, position);
                prop_assert!(*length > 0);
                // Each piece carries the flags of the extent covering it.
                let flag_at = |list: &[StatusExtent], at: u64| {
                    let mut end = 0;
                    list.iter().find(|e| { end += u64::from(e.length); at < end }).map(|e| e.flags)
                };
                prop_assert_eq!(Some(*fa), flag_at(&a, *start));
                prop_assert_eq!(Some(*fb), flag_at(&b, *start));
                position += length;
            }
            prop_assert_eq!(position, total(&a).min(total(&b)));
        }
    }
}
