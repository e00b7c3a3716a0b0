//! [`Piece`]: a buffer that gathers a downloaded range's bytes as they
//! arrive, up to a fixed capacity, in memory aligned for direct I/O
//! (`O_DIRECT` writes need the buffer, the offset and the length aligned
//! to the device's block; [`ALIGN`] covers the usual 512 and 4096). It is
//! written whole and then reused, so its pages are touched once.

use aligned_vec::{AVec, ConstAlign};

/// Alignment of the buffer, and of the offsets and lengths written from
/// it directly.
pub const ALIGN: usize = 4096;

/// Bytes gathered to be written at one offset.
pub struct Piece {
    bytes: AVec<u8, ConstAlign<ALIGN>>,
    capacity: usize,
}

impl Piece {
    /// An empty piece that holds up to `capacity` bytes.
    pub fn new(capacity: usize) -> Piece {
        Piece { bytes: AVec::with_capacity(ALIGN, capacity), capacity }
    }

    /// Takes as much of `data` as fits; how much it took.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let taken = data.len().min(self.capacity - self.bytes.len());
        self.bytes.extend_from_slice(&data[..taken]);
        taken
    }

    /// True when it holds `capacity` bytes.
    pub fn is_full(&self) -> bool {
        self.bytes.len() == self.capacity
    }

    /// True if written at `offset` it meets `O_DIRECT`'s alignment.
    pub fn is_aligned_at(&self, offset: u64) -> bool {
        offset % ALIGN as u64 == 0 && self.bytes.len() % ALIGN == 0
    }

    /// Empties it for the next bytes.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

impl std::ops::Deref for Piece {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}
