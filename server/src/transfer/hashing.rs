//! blkhash of a stream of image pieces. Whole blocks are gathered in
//! batches of [`LANES`] (BLAKE2b hashes a batch side by side in SIMD
//! lanes) and each batch is hashed on the blocking pool while the caller
//! goes on reading into the next; digests are combined in image order.
//! Memory is two batches at most, and a batch holds at most
//! `BATCH_BYTES` of blocks: pieces shorter than `SMALL_PART` are copied
//! together, so a block is a bounded number of parts whatever the number
//! of pieces it came in (a restore's client chooses them: a stream of
//! 1-byte frames). Used by the checksum route, the full sparse stream's
//! trailer and the restore's check of it, so they agree by construction.

use std::collections::VecDeque;

use blockgate_protocol::blkhash::{Algorithm, BlockHasher, BlockPart, LANES, block_digests};
use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::transfer::Piece;

/// Most bytes of blocks in one batch: four default (4 MiB) blocks, one of
/// the largest (16 MiB).
const BATCH_BYTES: u64 = 16 << 20;

/// Pieces shorter than this are copied into the block's own buffer
/// instead of held: a part per piece, each holding on to the whole buffer
/// it was cut from, made a stream of 1-byte frames cost about 70 times
/// the image it carried. A block is then at most two parts per
/// `SMALL_PART` of it.
const SMALL_PART: u64 = 64 << 10;

/// A piece of a block.
enum Part {
    Data(Bytes),
    Zeros(u64),
    /// Short pieces, copied together.
    Copied(BytesMut),
}

enum Pending {
    /// This many whole zero blocks (digest precomputed).
    ZeroBlocks(u64),
    /// A batch of blocks being hashed; their digests in order.
    Blocks(JoinHandle<Vec<Box<[u8]>>>),
}

/// A blkhash fed in pieces, hashing whole blocks in parallel.
pub struct ParallelHasher {
    algorithm: Algorithm,
    hasher: BlockHasher,
    block_size: u64,
    /// The block being gathered.
    parts: Vec<Part>,
    filled: u64,
    /// Whole blocks waiting for their batch to fill.
    batch: Vec<Vec<Part>>,
    batch_blocks: usize,
    pending: VecDeque<Pending>,
}

impl ParallelHasher {
    /// A hasher of `algorithm` over `block_size` blocks.
    pub fn new(algorithm: Algorithm, block_size: u64) -> ParallelHasher {
        ParallelHasher {
            algorithm,
            hasher: BlockHasher::with_algorithm(algorithm, block_size),
            block_size,
            parts: Vec::new(),
            filled: 0,
            batch: Vec::new(),
            batch_blocks: (BATCH_BYTES / block_size).clamp(1, LANES as u64) as usize,
            pending: VecDeque::new(),
        }
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Hashes the next piece of the image.
    pub async fn push(&mut self, piece: Piece) -> Result<(), ApiError> {
        match piece {
            Piece::Zeros(mut length) => {
                if self.filled > 0 {
                    let take = length.min(self.block_size - self.filled);
                    self.add(Part::Zeros(take), take).await?;
                    length -= take;
                }
                let whole = length / self.block_size;
                if whole > 0 {
                    // After the blocks gathered so far, to keep the order.
                    self.start_batch().await?;
                    self.pending.push_back(Pending::ZeroBlocks(whole));
                    length -= whole * self.block_size;
                }
                if length > 0 {
                    self.add(Part::Zeros(length), length).await?;
                }
            }
            Piece::Data(mut data) => {
                while !data.is_empty() {
                    let take = (data.len() as u64).min(self.block_size - self.filled);
                    self.add(Part::Data(data.split_to(take as usize)), take).await?;
                }
            }
        }
        Ok(())
    }

    async fn add(&mut self, part: Part, length: u64) -> Result<(), ApiError> {
        self.gather(part, length);
        self.filled += length;
        if self.filled == self.block_size {
            self.end_block();
            if self.batch.len() == self.batch_blocks {
                self.start_batch().await?;
            }
        }
        Ok(())
    }

    /// Adds `part` to the block being gathered: zeros after zeros and
    /// short parts after short parts are merged.
    fn gather(&mut self, part: Part, length: u64) {
        if let (Part::Zeros(more), Some(Part::Zeros(zeros))) = (&part, self.parts.last_mut()) {
            *zeros += more;
            return;
        }
        if length >= SMALL_PART {
            self.parts.push(part);
            return;
        }
        if !matches!(self.parts.last(), Some(Part::Copied(_))) {
            self.parts.push(Part::Copied(BytesMut::new()));
        }
        let Some(Part::Copied(copied)) = self.parts.last_mut() else { unreachable!("just pushed") };
        match part {
            Part::Data(data) => copied.extend_from_slice(&data),
            Part::Zeros(length) => copied.resize(copied.len() + length as usize, 0),
            Part::Copied(data) => copied.extend_from_slice(&data),
        }
    }

    fn end_block(&mut self) {
        self.batch.push(std::mem::take(&mut self.parts));
        self.filled = 0;
    }

    /// Starts hashing the gathered blocks, first waiting for the batch
    /// before the last (so at most one is hashed while the next gathers).
    async fn start_batch(&mut self) -> Result<(), ApiError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        while self.pending.iter().any(|pending| matches!(pending, Pending::Blocks(_))) {
            self.combine_oldest().await?;
        }
        let blocks = std::mem::take(&mut self.batch);
        let algorithm = self.algorithm;
        let task = tokio::task::spawn_blocking(move || {
            let parts: Vec<Vec<BlockPart>> = blocks
                .iter()
                .map(|block| {
                    block
                        .iter()
                        .map(|part| match part {
                            Part::Data(data) => BlockPart::Data(data),
                            Part::Copied(data) => BlockPart::Data(data),
                            Part::Zeros(length) => BlockPart::Zeros(*length),
                        })
                        .collect()
                })
                .collect();
            block_digests(algorithm, &parts)
        });
        self.pending.push_back(Pending::Blocks(task));
        Ok(())
    }

    async fn combine_oldest(&mut self) -> Result<(), ApiError> {
        match self.pending.pop_front() {
            Some(Pending::ZeroBlocks(count)) => self.hasher.push_zero_blocks(count),
            Some(Pending::Blocks(task)) => {
                let digests = task.await.map_err(|error| ApiError::Internal(format!("hashing failed: {error}")))?;
                for digest in digests {
                    self.hasher.push_digest(&digest);
                }
            }
            None => {}
        }
        Ok(())
    }

    /// The checksum as lowercase hex.
    pub async fn finish(mut self) -> Result<String, ApiError> {
        if self.filled > 0 {
            self.end_block();
        }
        self.start_batch().await?;
        while !self.pending.is_empty() {
            self.combine_oldest().await?;
        }
        Ok(self.hasher.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockgate_protocol::blkhash::DEFAULT_BLOCK_SIZE;

    /// Pieces of every size, short ones in long runs, hash as one
    /// streaming blkhash does, and a block of short pieces is a few parts.
    #[tokio::test]
    async fn short_pieces_are_gathered_into_few_parts_and_hash_the_same() {
        let mut parallel = ParallelHasher::new(Algorithm::Blake2b, DEFAULT_BLOCK_SIZE);
        let mut streaming = BlockHasher::new(DEFAULT_BLOCK_SIZE);
        let mut most_parts = 0;
        let mut byte = 0u8;
        for round in 0..3u64 {
            for at in 0..300_000u64 {
                if at % 3 == 0 {
                    parallel.push(Piece::Zeros(1)).await.unwrap();
                    streaming.zero(1);
                } else {
                    byte = byte.wrapping_add(7);
                    parallel.push(Piece::Data(Bytes::from(vec![byte]))).await.unwrap();
                    streaming.update(&[byte]);
                }
                most_parts = most_parts.max(parallel.parts.len());
            }
            let long = Bytes::from(vec![round as u8 + 1; (SMALL_PART * 3 + 5) as usize]);
            parallel.push(Piece::Data(long.clone())).await.unwrap();
            streaming.update(&long);
            parallel.push(Piece::Zeros(DEFAULT_BLOCK_SIZE * 2 + 3)).await.unwrap();
            streaming.zero(DEFAULT_BLOCK_SIZE * 2 + 3);
        }
        assert!(most_parts <= 3, "a block of 1-byte pieces held {most_parts} parts");
        assert_eq!(parallel.finish().await.unwrap(), streaming.finish());
    }
}
