//! What one BLOCK_STATUS reply says about a range, in one set of flags per
//! piece: the contexts (`base:allocation`, `qemu:allocation-depth`, a dirty
//! bitmap) are merged at the union of their boundaries. Pure functions; the
//! callers loop over a range and coalesce.

use crate::client::BlockStatus;
use crate::error::{Error, Result};
use crate::reply::StatusExtent;
use crate::{ALLOCATION_DEPTH, BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// What the export knows of one piece of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceState {
    /// Reads as zeros (base:allocation ZERO).
    pub zero: bool,
    /// Not allocated in the top layer (allocation depth 0, else HOLE).
    pub hole: bool,
    /// Changed since the bitmap was created (false without a bitmap).
    pub dirty: bool,
}

/// A described range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Flags.
    pub state: PieceState,
}

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

/// The pieces one BLOCK_STATUS reply describes, with the dirty bitmap of
/// `dirty_context` if given. Never empty.
pub fn pieces(status: &BlockStatus, dirty_context: Option<&str>) -> Result<Vec<Piece>> {
    let allocation = status
        .extents(BASE_ALLOCATION)
        .ok_or_else(|| Error::Protocol(format!("BLOCK_STATUS at {} without {BASE_ALLOCATION}", status.offset)))?;
    let depth = status.extents(ALLOCATION_DEPTH);
    let dirty = dirty_context.and_then(|context| status.extents(context));
    let merged = merge_contexts(status.offset, [allocation, depth.unwrap_or(allocation), dirty.unwrap_or(allocation)]);
    if merged.is_empty() {
        return Err(Error::Protocol(format!("BLOCK_STATUS at {} described nothing", status.offset)));
    }
    Ok(merged
        .into_iter()
        .map(|(start, length, [allocation, depth_flags, dirty_flags])| Piece {
            start,
            length,
            state: PieceState {
                zero: allocation & STATE_ZERO != 0,
                hole: if depth.is_some() { depth_flags == 0 } else { allocation & STATE_HOLE != 0 },
                dirty: dirty.is_some() && dirty_flags & STATE_DIRTY != 0,
            },
        })
        .collect())
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

    #[test]
    fn pieces_combine_allocation_depth_and_dirty() {
        let status = BlockStatus {
            offset: 0,
            contexts: vec![
                (BASE_ALLOCATION.into(), extents(&[(4096, 0), (4096, 3)])),
                (ALLOCATION_DEPTH.into(), extents(&[(8192, 1)])),
                ("qemu:dirty-bitmap:b".into(), extents(&[(2048, 1), (6144, 0)])),
            ],
        };
        let state = |zero, hole, dirty| PieceState { zero, hole, dirty };
        let got: Vec<_> = pieces(&status, Some("qemu:dirty-bitmap:b")).unwrap().into_iter().map(|p| (p.start, p.length, p.state)).collect();
        assert_eq!(
            got,
            vec![(0, 2048, state(false, false, true)), (2048, 2048, state(false, false, false)), (4096, 4096, state(true, false, false))]
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
