//! blkhash, imageio's block-based image checksum: the image is split into
//! `block_size` blocks (the last may be shorter), each block is hashed with
//! BLAKE2b-256, and the checksum is BLAKE2b-256 over the block digests in
//! order. A range known to read as zeros is hashed with a precomputed
//! digest instead of its bytes; the value is the same as hashing the zeros,
//! so the checksum depends on content only, never on sparseness.
//!
//! [`BlockHasher`] is fed data and zero ranges in image order, in pieces of
//! any size, and keeps one running block hash: memory does not grow with
//! the image.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};

/// BLAKE2b with a 32-byte digest.
type Blake2b256 = Blake2b<U32>;

/// The only algorithm served.
pub const ALGORITHM: &str = "blake2b";
/// Default block size (imageio's).
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u64 = 16 << 20;

static ZERO_CHUNK: [u8; 64 << 10] = [0; 64 << 10];

/// Checks a requested block size: a multiple of 4096 in [4 KiB, 16 MiB].
pub fn check_block_size(block_size: u64) -> Result<(), String> {
    if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) && block_size % 4096 == 0 {
        Ok(())
    } else {
        Err(format!("block_size {block_size} must be a multiple of 4096 between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"))
    }
}

/// The digest of one block (BLAKE2b-256 of its bytes), for hashing blocks
/// in parallel and combining them in order with [`BlockHasher::push_digest`].
pub fn block_digest<'a>(parts: impl IntoIterator<Item = BlockPart<'a>>) -> [u8; 32] {
    let mut block = Blake2b256::new();
    for part in parts {
        match part {
            BlockPart::Data(data) => block.update(data),
            BlockPart::Zeros(mut length) => {
                while length > 0 {
                    let step = length.min(ZERO_CHUNK.len() as u64);
                    block.update(&ZERO_CHUNK[..step as usize]);
                    length -= step;
                }
            }
        }
    }
    block.finalize().into()
}

/// A piece of a block: bytes, or a run of zeros.
#[derive(Debug, Clone, Copy)]
pub enum BlockPart<'a> {
    /// Bytes of the image.
    Data(&'a [u8]),
    /// This many zero bytes.
    Zeros(u64),
}

/// A streaming blkhash.
#[derive(Clone)]
pub struct BlockHasher {
    block_size: u64,
    outer: Blake2b256,
    block: Blake2b256,
    /// Bytes hashed into the current block.
    filled: u64,
    zero_block_digest: [u8; 32],
}

impl BlockHasher {
    /// A hasher with the given block size (see [`check_block_size`]).
    pub fn new(block_size: u64) -> BlockHasher {
        let mut zero_block = Blake2b256::new();
        let mut left = block_size;
        while left > 0 {
            let step = left.min(ZERO_CHUNK.len() as u64) as usize;
            zero_block.update(&ZERO_CHUNK[..step]);
            left -= step as u64;
        }
        BlockHasher {
            block_size,
            outer: Blake2b256::new(),
            block: Blake2b256::new(),
            filled: 0,
            zero_block_digest: zero_block.finalize().into(),
        }
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Hashes the next bytes of the image.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let step = (self.block_size - self.filled).min(data.len() as u64) as usize;
            self.block.update(&data[..step]);
            self.filled += step as u64;
            data = &data[step..];
            self.end_block_if_full();
        }
    }

    /// Hashes the next `length` bytes of the image, known to be zeros.
    pub fn zero(&mut self, mut length: u64) {
        while length > 0 {
            if self.filled == 0 && length >= self.block_size {
                self.outer.update(self.zero_block_digest);
                length -= self.block_size;
                continue;
            }
            let step = (self.block_size - self.filled).min(length).min(ZERO_CHUNK.len() as u64);
            self.block.update(&ZERO_CHUNK[..step as usize]);
            self.filled += step;
            length -= step;
            self.end_block_if_full();
        }
    }

    fn end_block_if_full(&mut self) {
        if self.filled == self.block_size {
            let digest = std::mem::take(&mut self.block).finalize();
            self.outer.update(digest);
            self.filled = 0;
        }
    }

    /// Adds the digest of the next whole block (see [`block_digest`]); only
    /// valid between blocks.
    pub fn push_digest(&mut self, digest: [u8; 32]) {
        debug_assert_eq!(self.filled, 0, "push_digest inside a block");
        self.outer.update(digest);
    }

    /// Adds `count` whole blocks of zeros.
    pub fn push_zero_blocks(&mut self, count: u64) {
        for _ in 0..count {
            self.outer.update(self.zero_block_digest);
        }
    }

    /// The checksum as lowercase hex.
    pub fn finish(mut self) -> String {
        if self.filled > 0 {
            let digest = std::mem::take(&mut self.block).finalize();
            self.outer.update(digest);
        }
        hex::encode(self.outer.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, over a whole buffer.
    fn reference(image: &[u8], block_size: usize) -> String {
        let mut outer = Blake2b256::new();
        for block in image.chunks(block_size) {
            outer.update(Blake2b256::digest(block));
        }
        hex::encode(outer.finalize())
    }

    #[test]
    fn empty_image_hashes_nothing() {
        assert_eq!(BlockHasher::new(4096).finish(), hex::encode(Blake2b256::new().finalize()));
    }

    #[test]
    fn block_sizes_are_checked() {
        assert!(check_block_size(4 << 20).is_ok());
        for bad in [0, 4095, 4097, 32 << 20, 2048] {
            assert!(check_block_size(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn block_digests_combine_to_the_reference(image in proptest::collection::vec(any::<u8>(), 0..40000), zeros in 0usize..3) {
            let block_size = 4096usize;
            let mut hasher = BlockHasher::new(block_size as u64);
            let whole_zero_blocks = zeros as u64;
            hasher.push_zero_blocks(whole_zero_blocks);
            let mut reference_image = vec![0u8; zeros * block_size];
            for block in image.chunks(block_size) {
                let half = block.len() / 2;
                hasher.push_digest(block_digest([BlockPart::Data(&block[..half]), BlockPart::Data(&block[half..])]));
            }
            reference_image.extend(&image);
            prop_assert_eq!(hasher.finish(), reference(&reference_image, block_size));
            prop_assert_eq!(block_digest([BlockPart::Zeros(5000)]), block_digest([BlockPart::Data(&[0u8; 5000])]));
        }

        #[test]
        fn any_split_into_data_and_zero_pieces_gives_the_reference(
            pieces in proptest::collection::vec((1usize..20000, any::<bool>(), any::<u8>()), 0..12),
            block_size in prop_oneof![Just(4096u64), Just(8192u64), Just(12288u64)],
        ) {
            let mut image = Vec::new();
            let mut hasher = BlockHasher::new(block_size);
            for (length, zero, byte) in pieces {
                if zero {
                    image.extend(std::iter::repeat_n(0u8, length));
                    hasher.zero(length as u64);
                } else {
                    let data: Vec<u8> = (0..length).map(|i| byte.wrapping_add(i as u8) | 1).collect();
                    hasher.update(&data);
                    image.extend(data);
                }
            }
            prop_assert_eq!(hasher.finish(), reference(&image, block_size as usize));
        }
    }
}
