//! blkhash of a stream of image pieces, with the block digests computed on
//! the blocking pool, as many at once as there are cores, while the caller
//! goes on reading; digests are combined in image order. Used by the
//! checksum route and by the full sparse stream's trailer, so the two agree
//! by construction and neither is held to one core's BLAKE2b speed.

use std::collections::VecDeque;

use blockgate_protocol::blkhash::{Algorithm, BlockHasher, BlockPart, block_digest};
use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::transfer::Piece;

/// A piece of a block.
enum Part {
    Data(Bytes),
    Zeros(u64),
}

enum Pending {
    /// This many whole zero blocks (digest precomputed).
    ZeroBlocks(u64),
    /// A block being hashed.
    Block(JoinHandle<Box<[u8]>>),
}

/// A blkhash fed in pieces, hashing whole blocks in parallel.
pub struct ParallelHasher {
    algorithm: Algorithm,
    hasher: BlockHasher,
    block_size: u64,
    parts: Vec<Part>,
    filled: u64,
    pending: VecDeque<Pending>,
    depth: usize,
}

impl ParallelHasher {
    /// A hasher of `algorithm` over `block_size` blocks.
    pub fn new(algorithm: Algorithm, block_size: u64) -> ParallelHasher {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        ParallelHasher {
            algorithm,
            hasher: BlockHasher::with_algorithm(algorithm, block_size),
            block_size,
            parts: Vec::new(),
            filled: 0,
            pending: VecDeque::new(),
            depth: cores + 1,
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
        self.parts.push(part);
        self.filled += length;
        if self.filled == self.block_size {
            self.start_block();
            while self.pending.len() > self.depth {
                self.combine_oldest().await?;
            }
        }
        Ok(())
    }

    fn start_block(&mut self) {
        let parts = std::mem::take(&mut self.parts);
        self.filled = 0;
        let algorithm = self.algorithm;
        let task = tokio::task::spawn_blocking(move || {
            block_digest(
                algorithm,
                parts.iter().map(|part| match part {
                    Part::Data(data) => BlockPart::Data(data),
                    Part::Zeros(length) => BlockPart::Zeros(*length),
                }),
            )
        });
        self.pending.push_back(Pending::Block(task));
    }

    async fn combine_oldest(&mut self) -> Result<(), ApiError> {
        match self.pending.pop_front() {
            Some(Pending::ZeroBlocks(count)) => self.hasher.push_zero_blocks(count),
            Some(Pending::Block(task)) => {
                let digest = task.await.map_err(|error| ApiError::Internal(format!("hashing failed: {error}")))?;
                self.hasher.push_digest(&digest);
            }
            None => {}
        }
        Ok(())
    }

    /// The checksum as lowercase hex.
    pub async fn finish(mut self) -> Result<String, ApiError> {
        if self.filled > 0 {
            self.start_block();
        }
        while !self.pending.is_empty() {
            self.combine_oldest().await?;
        }
        Ok(self.hasher.finish())
    }
}
