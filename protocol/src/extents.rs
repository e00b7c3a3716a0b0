//! Extents as the extents route sends them: imageio's JSON shapes for
//! `context=zero` (`zero`, `hole`) and `context=dirty` (`dirty`, `zero`),
//! and the coalescing rule (adjacent extents with equal flags become one).
//! The coalescer works one extent at a time, so a listing of any length is
//! streamed without being held in memory.

use serde::{Deserialize, Serialize};

/// Flags of a `context=zero` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZeroState {
    /// The range reads as zeros.
    pub zero: bool,
    /// The range is not allocated in the top layer.
    pub hole: bool,
}

/// Flags of a `context=dirty` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyState {
    /// The range changed since the bitmap was created.
    pub dirty: bool,
    /// The range reads as zeros.
    pub zero: bool,
}

/// One extent: a range and its flags, serialized flat as imageio does
/// (`{"start":0,"length":65536,"zero":false,"hole":false}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent<F> {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Context flags.
    #[serde(flatten)]
    pub flags: F,
}

impl<F> Extent<F> {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// Merges adjacent extents with equal flags. Feed extents in ascending,
/// contiguous order; `push` returns an extent once it can no longer grow.
#[derive(Debug)]
pub struct Coalescer<F> {
    current: Option<Extent<F>>,
}

impl<F> Default for Coalescer<F> {
    fn default() -> Self {
        Coalescer { current: None }
    }
}

impl<F: PartialEq + Copy> Coalescer<F> {
    /// Adds the next extent; returns the previous one if it is complete.
    pub fn push(&mut self, next: Extent<F>) -> Option<Extent<F>> {
        if next.length == 0 {
            return None;
        }
        match &mut self.current {
            Some(current) if current.flags == next.flags && current.end() == next.start => {
                current.length += next.length;
                None
            }
            _ => self.current.replace(next),
        }
    }

    /// The last extent, if any.
    pub fn finish(self) -> Option<Extent<F>> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn serializes_like_imageio() {
        let extent = Extent { start: 0, length: 65536, flags: ZeroState { zero: false, hole: true } };
        assert_eq!(serde_json::to_string(&extent).unwrap(), r#"{"start":0,"length":65536,"zero":false,"hole":true}"#);
        let dirty = Extent { start: 4096, length: 4096, flags: DirtyState { dirty: true, zero: false } };
        assert_eq!(serde_json::to_string(&dirty).unwrap(), r#"{"start":4096,"length":4096,"dirty":true,"zero":false}"#);
    }

    proptest! {
        #[test]
        fn coalescing_keeps_the_tiling_and_merges_all_equal_neighbours(
            pieces in proptest::collection::vec((1u64..1000, any::<bool>(), any::<bool>()), 0..50)
        ) {
            let mut coalescer = Coalescer::default();
            let mut out = Vec::new();
            let mut start = 0;
            for (length, zero, hole) in &pieces {
                if let Some(done) = coalescer.push(Extent { start, length: *length, flags: ZeroState { zero: *zero, hole: *hole } }) {
                    out.push(done);
                }
                start += length;
            }
            out.extend(coalescer.finish());
            let mut expected_start = 0;
            for (i, extent) in out.iter().enumerate() {
                prop_assert_eq!(extent.start, expected_start);
                expected_start = extent.end();
                if i > 0 {
                    prop_assert_ne!(out[i - 1].flags, extent.flags);
                }
            }
            prop_assert_eq!(expected_start, start);
            // Every input byte keeps its flags.
            for (offset, flags) in pieces.iter().scan(0u64, |at, (l, z, h)| { let o = *at; *at += l; Some((o, ZeroState { zero: *z, hole: *h })) }) {
                let covering = out.iter().find(|e| e.start <= offset && offset < e.end()).unwrap();
                prop_assert_eq!(covering.flags, flags);
            }
        }
    }
}
