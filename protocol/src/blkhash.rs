//! blkhash, imageio's block-based image checksum: the image is split into
//! `block_size` blocks (the last may be shorter), each block is hashed
//! (BLAKE2b-256 by default, or another of imageio's algorithms), and the
//! checksum is the same hash over the block digests in order. A range known to read as zeros is hashed with a precomputed
//! digest instead of its bytes; the value is the same as hashing the zeros,
//! so the checksum depends on content only, never on sparseness.
//!
//! [`BlockHasher`] is fed data and zero ranges in image order, in pieces of
//! any size, and keeps one running block hash: memory does not grow with
//! the image.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2s256};
use digest::{Digest, DynDigest};

/// BLAKE2b with a 32-byte digest.
type Blake2b256 = Blake2b<U32>;

/// The default algorithm, and the one the sparse stream's trailer uses.
pub const ALGORITHM: &str = "blake2b";
/// Default block size (imageio's).
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u64 = 16 << 20;

static ZERO_CHUNK: [u8; 64 << 10] = [0; 64 << 10];

/// A hash function blkhash can be built on: imageio's set, from Python's
/// hashlib. BLAKE2b uses a 32-byte digest, as imageio does; the others
/// their standard size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// BLAKE2b-256 (the default).
    Blake2b,
    /// BLAKE2s-256.
    Blake2s,
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// MD5.
    Md5,
}

impl Algorithm {
    /// Every algorithm, in the order `/checksum/algorithms` lists them.
    pub const ALL: [Algorithm; 8] = [
        Algorithm::Blake2b,
        Algorithm::Blake2s,
        Algorithm::Sha1,
        Algorithm::Sha224,
        Algorithm::Sha256,
        Algorithm::Sha384,
        Algorithm::Sha512,
        Algorithm::Md5,
    ];

    /// hashlib's name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Blake2b => "blake2b",
            Algorithm::Blake2s => "blake2s",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha224 => "sha224",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
            Algorithm::Md5 => "md5",
        }
    }

    /// The algorithm of a hashlib name.
    pub fn parse(name: &str) -> Result<Algorithm, String> {
        Algorithm::ALL.into_iter().find(|algorithm| algorithm.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Algorithm::ALL.iter().map(|algorithm| algorithm.name()).collect();
            format!("unsupported algorithm {name:?}: expected one of {}", names.join(", "))
        })
    }

    fn hasher(self) -> Box<dyn DynDigest + Send> {
        match self {
            Algorithm::Blake2b => Box::new(Blake2b256::new()),
            Algorithm::Blake2s => Box::new(Blake2s256::new()),
            Algorithm::Sha1 => Box::new(sha1::Sha1::new()),
            Algorithm::Sha224 => Box::new(sha2::Sha224::new()),
            Algorithm::Sha256 => Box::new(sha2::Sha256::new()),
            Algorithm::Sha384 => Box::new(sha2::Sha384::new()),
            Algorithm::Sha512 => Box::new(sha2::Sha512::new()),
            Algorithm::Md5 => Box::new(md5::Md5::new()),
        }
    }
}

/// Checks a requested block size: a multiple of 4096 in [4 KiB, 16 MiB].
pub fn check_block_size(block_size: u64) -> Result<(), String> {
    if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) && block_size % 4096 == 0 {
        Ok(())
    } else {
        Err(format!("block_size {block_size} must be a multiple of 4096 between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"))
    }
}

/// Feeds `length` zero bytes to a hash.
fn hash_zeros(hash: &mut dyn DynDigest, mut length: u64) {
    while length > 0 {
        let step = length.min(ZERO_CHUNK.len() as u64);
        hash.update(&ZERO_CHUNK[..step as usize]);
        length -= step;
    }
}

/// The digest of one block (the algorithm's hash of its bytes), for
/// hashing blocks in parallel and combining them in order with
/// [`BlockHasher::push_digest`].
pub fn block_digest<'a>(algorithm: Algorithm, parts: impl IntoIterator<Item = BlockPart<'a>>) -> Box<[u8]> {
    let mut block = algorithm.hasher();
    for part in parts {
        match part {
            BlockPart::Data(data) => block.update(data),
            BlockPart::Zeros(length) => hash_zeros(block.as_mut(), length),
        }
    }
    block.finalize()
}

/// Blocks [`block_digests`] hashes in one pass: BLAKE2b's AVX2
/// implementation runs four hashes side by side.
pub const LANES: usize = 4;

/// The digests of several blocks, in order. BLAKE2b hashes up to
/// [`LANES`] blocks at once in SIMD lanes (2.7 GB/s per core measured
/// here, against 0.96 GB/s one block at a time); other algorithms hash one
/// block after another. Same values as [`block_digest`] on each block.
pub fn block_digests(algorithm: Algorithm, blocks: &[Vec<BlockPart<'_>>]) -> Vec<Box<[u8]>> {
    if algorithm != Algorithm::Blake2b {
        return blocks.iter().map(|parts| block_digest(algorithm, parts.iter().copied())).collect();
    }
    let mut digests = Vec::with_capacity(blocks.len());
    for group in blocks.chunks(LANES) {
        let params = blake2b_simd::Params::new().hash_length(32).clone();
        let mut states: Vec<blake2b_simd::State> = group.iter().map(|_| params.to_state()).collect();
        let mut inputs: Vec<_> = group.iter().map(|parts| parts.iter().flat_map(|part| part_slices(*part))).collect();
        loop {
            let round: Vec<_> = states.iter_mut().zip(&mut inputs).filter_map(|(state, input)| Some((state, input.next()?))).collect();
            if round.is_empty() {
                break;
            }
            blake2b_simd::many::update_many(round);
        }
        digests.extend(states.iter().map(|state| Box::from(state.finalize().as_bytes())));
    }
    digests
}

/// A block part as byte slices: zeros come from a static zero chunk.
fn part_slices(part: BlockPart<'_>) -> Box<dyn Iterator<Item = &[u8]> + '_> {
    match part {
        BlockPart::Data(data) => Box::new(std::iter::once(data)),
        BlockPart::Zeros(length) => {
            let chunk = ZERO_CHUNK.len() as u64;
            Box::new((0..length).step_by(ZERO_CHUNK.len()).map(move |at| &ZERO_CHUNK[..(length - at).min(chunk) as usize]))
        }
    }
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
pub struct BlockHasher {
    algorithm: Algorithm,
    block_size: u64,
    outer: Box<dyn DynDigest + Send>,
    block: Box<dyn DynDigest + Send>,
    /// Bytes hashed into the current block.
    filled: u64,
    zero_block_digest: Box<[u8]>,
}

impl BlockHasher {
    /// A BLAKE2b hasher with the given block size (see [`check_block_size`]).
    pub fn new(block_size: u64) -> BlockHasher {
        BlockHasher::with_algorithm(Algorithm::Blake2b, block_size)
    }

    /// A hasher of `algorithm` with the given block size.
    pub fn with_algorithm(algorithm: Algorithm, block_size: u64) -> BlockHasher {
        BlockHasher {
            algorithm,
            block_size,
            outer: algorithm.hasher(),
            block: algorithm.hasher(),
            filled: 0,
            zero_block_digest: block_digest(algorithm, [BlockPart::Zeros(block_size)]),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
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
                self.outer.update(&self.zero_block_digest);
                length -= self.block_size;
                continue;
            }
            let step = (self.block_size - self.filled).min(length);
            hash_zeros(self.block.as_mut(), step);
            self.filled += step;
            length -= step;
            self.end_block_if_full();
        }
    }

    fn end_block_if_full(&mut self) {
        if self.filled == self.block_size {
            let digest = self.block.finalize_reset();
            self.outer.update(&digest);
            self.filled = 0;
        }
    }

    /// Adds the digest of the next whole block (see [`block_digest`]); only
    /// valid between blocks.
    pub fn push_digest(&mut self, digest: &[u8]) {
        debug_assert_eq!(self.filled, 0, "push_digest inside a block");
        self.outer.update(digest);
    }

    /// Adds `count` whole blocks of zeros.
    pub fn push_zero_blocks(&mut self, count: u64) {
        for _ in 0..count {
            self.outer.update(&self.zero_block_digest);
        }
    }

    /// The checksum as lowercase hex.
    pub fn finish(mut self) -> String {
        if self.filled > 0 {
            let digest = self.block.finalize_reset();
            self.outer.update(&digest);
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
            Digest::update(&mut outer, Blake2b256::digest(block));
        }
        hex::encode(outer.finalize())
    }

    #[test]
    fn every_algorithm_hashes_zeros_and_data_alike() {
        for algorithm in Algorithm::ALL {
            assert_eq!(Algorithm::parse(algorithm.name()), Ok(algorithm));
            let mut by_data = BlockHasher::with_algorithm(algorithm, 4096);
            by_data.update(&[0u8; 10000]);
            let mut by_zeros = BlockHasher::with_algorithm(algorithm, 4096);
            by_zeros.zero(10000);
            assert_eq!(by_data.finish(), by_zeros.finish(), "{}", algorithm.name());
        }
        assert!(Algorithm::parse("sha3_256").unwrap_err().contains("sha512"));
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
                hasher.push_digest(&block_digest(Algorithm::Blake2b, [BlockPart::Data(&block[..half]), BlockPart::Data(&block[half..])]));
            }
            reference_image.extend(&image);
            prop_assert_eq!(hasher.finish(), reference(&reference_image, block_size));
            prop_assert_eq!(block_digest(Algorithm::Blake2b, [BlockPart::Zeros(5000)]), block_digest(Algorithm::Blake2b, [BlockPart::Data(&[0u8; 5000])]));
        }

        #[test]
        fn blocks_hashed_side_by_side_match_one_at_a_time(
            blocks in proptest::collection::vec(proptest::collection::vec((0usize..70_000, any::<bool>(), any::<u8>()), 0..4), 0..7),
        ) {
            let data: Vec<Vec<Vec<u8>>> = blocks.iter().map(|parts| parts.iter().map(|&(length, _, byte)| vec![byte; length]).collect()).collect();
            let parts: Vec<Vec<BlockPart>> = blocks
                .iter()
                .zip(&data)
                .map(|(shape, bytes)| {
                    shape.iter().zip(bytes).map(|(&(length, zero, _), bytes)| if zero { BlockPart::Zeros(length as u64) } else { BlockPart::Data(bytes) }).collect()
                })
                .collect();
            for algorithm in [Algorithm::Blake2b, Algorithm::Sha256] {
                let one_at_a_time: Vec<Box<[u8]>> = parts.iter().map(|block| block_digest(algorithm, block.iter().copied())).collect();
                prop_assert_eq!(block_digests(algorithm, &parts), one_at_a_time);
            }
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
