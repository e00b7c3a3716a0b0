//! The sparse stream in (`PUT ?format=sparse`): frames are decoded as the
//! body arrives, data is gathered piece by piece and goes out as
//! pipelined WRITEs of at most [`DATA_PIECE`] bytes as soon as each piece
//! is in, and zero frames as WRITE_ZEROES. A full stream is hashed on the
//! blocking pool while it is written ([`ParallelHasher`]), and its
//! trailer's checksum checked at the end, unless the client asked not to
//! (`checksum=n`). A full stream's zero frames cost nothing when the
//! target already reads as zeros throughout.
//! A bad frame stops everything after it; the error names the frame and
//! how much was applied before it, because storage cannot undo what landed.
//! An incremental that does not continue the target's chain is refused
//! before anything is written ([`crate::transfer::restore_record`]), and so
//! is a stream whose `meta` frame does not fit the target: an incremental
//! without `since`, a full stream that names one, a size other than the
//! target's. A smaller full stream would leave the target's old data past
//! its end, so it is applied only with `zero_tail`, which zeroes the rest.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use blockgate_protocol::blkhash::{Algorithm, DEFAULT_BLOCK_SIZE};
use blockgate_protocol::checkpoint::Restored;
use blockgate_protocol::sparse::{DATA_PIECE, Decoder, Event, Meta};
use blockgate_protocol::{ByteRange, ZeroState};
use bytes::{Buf, Bytes, BytesMut};
use futures::TryStreamExt;

use crate::error::ApiError;
use crate::sources::backend::{Backend, REQUEST_SIZE};
use crate::transfer::extents::extents;
use crate::transfer::hashing::ParallelHasher;
use crate::transfer::restore_record;
use crate::transfer::{Applied, Hold, Piece, Pipeline, WriteFailure, discard_rest, next_frame};

// A data event is one write.
const _: () = assert!(DATA_PIECE as usize <= REQUEST_SIZE);

/// How a restore writes.
#[derive(Debug, Clone, Copy)]
pub struct RestoreSettings {
    /// Zero frames may deallocate.
    pub may_deallocate: bool,
    /// Flush once the stream is applied.
    pub flush: bool,
    /// Apply an incremental that does not continue the target's chain.
    pub force: bool,
    /// Zero the target past the end of a smaller full stream.
    pub zero_tail: bool,
    /// Hash a full stream to check its trailer's checksum (`checksum=n`
    /// skips it: the summary then says the checksum was not checked).
    pub verify_checksum: bool,
    /// Longest stall of the body.
    pub body_timeout: Duration,
}

/// Applies a sparse stream; its summary on success. Each write holds
/// `hold` (the target's claim) until it ends, and the restore holds it
/// until its checkpoint is recorded.
pub async fn restore(backend: Arc<Backend>, body: Body, settings: RestoreSettings, hold: Hold) -> Result<Restored, ApiError> {
    let RestoreSettings { may_deallocate, flush, force, zero_tail, verify_checksum, body_timeout } = settings;
    let mut frames = body.into_data_stream();
    let mut decoder = Decoder::new(backend.size());
    let mut buffer = BytesMut::new();
    let mut pipeline = Pipeline::new(hold.clone());
    let mut skip_zero_frames = false;
    let mut input_done = false;
    let mut received = 0u64;
    let mut checkpoint = None;
    let mut disk = None;
    let mut tail = None;
    let mut hasher = None;
    loop {
        if let Some(length) = decoder.piece_wanted().filter(|_| !input_done) {
            match gather_piece(&mut frames, &mut buffer, length, body_timeout, &mut received).await {
                Ok(Some(piece)) => decoder.put_piece(piece),
                // The decoder reports the truncated frame.
                Ok(None) => input_done = true,
                Err(error) => return Err(rejected(pipeline.fail(error).await)),
            }
        }
        let event = match decoder.decode(&mut buffer) {
            Ok(Some(event)) => event,
            Ok(None) if input_done => {
                let error = decoder.finish(&buffer).expect_err("no End event, so the stream is incomplete");
                return Err(rejected(pipeline.fail(ApiError::BadRequest(error.to_string())).await));
            }
            Ok(None) => {
                match next_frame(&mut frames, body_timeout, received).await {
                    Ok(Some(chunk)) => {
                        received += chunk.len() as u64;
                        buffer.extend_from_slice(&chunk);
                    }
                    Ok(None) => input_done = true,
                    Err(error) => return Err(rejected(pipeline.fail(error).await)),
                }
                continue;
            }
            Err(error) => {
                discard_rest(frames);
                return Err(rejected(pipeline.fail(ApiError::BadRequest(error.to_string())).await));
            }
        };
        let applied = match event {
            Event::Meta(meta) => {
                let verdict =
                    check_meta(&meta, backend.size(), zero_tail, force).and_then(|()| restore_record::admit(&backend, &meta, force));
                if let Err(refused) = verdict {
                    discard_rest(frames);
                    return Err(refused);
                }
                if meta.virtual_size < backend.size() {
                    tail = Some(meta.virtual_size..backend.size());
                }
                checkpoint = meta.checkpoint;
                disk = meta.disk;
                if !meta.incremental && verify_checksum {
                    hasher = Some(ParallelHasher::new(Algorithm::Blake2b, DEFAULT_BLOCK_SIZE));
                }
                // Zeros are skipped on a target that reads as zeros, unless
                // it lost writes (lost data reads as zeros too, and only
                // writing those ranges again makes a flush succeed), or it
                // reads through a backing or data file that may change.
                skip_zero_frames = !meta.incremental
                    && backend.linked_files().is_empty()
                    && !backend.lost_writes().await
                    && reads_as_zeros(&backend).await?;
                Ok(())
            }
            Event::Data { offset, data } => match hash(&mut hasher, Piece::Data(data.clone())).await {
                Ok(()) => pipeline.write(&backend, offset, data).await,
                Err(error) => Err(error),
            },
            Event::Zero { offset, length } => match hash(&mut hasher, Piece::Zeros(length)).await {
                Ok(()) if skip_zero_frames => Ok(()),
                Ok(()) => pipeline.zero(&backend, offset, length, may_deallocate).await,
                Err(error) => Err(error),
            },
            Event::End(ending) => {
                let computed = match hasher.take() {
                    Some(hasher) if ending.checkable() => match hasher.finish().await {
                        Ok(checksum) => Some(checksum),
                        Err(error) => return Err(rejected(pipeline.fail(error).await)),
                    },
                    _ => None,
                };
                let end = decoder.finish(&buffer).and_then(|()| ending.verify(computed.as_deref()));
                let summary = match end {
                    Ok(summary) => summary,
                    Err(error) => return Err(rejected(pipeline.fail(ApiError::BadRequest(error.to_string())).await)),
                };
                // The stream is whole only if the body ends here: bytes
                // that arrive after `stop`, however late, are refused.
                if !input_done {
                    if let Err(error) = expect_body_end(&mut frames, body_timeout, received).await {
                        discard_rest(frames);
                        return Err(rejected(pipeline.fail(error).await));
                    }
                }
                if let Some(tail) = tail.clone().filter(|_| !skip_zero_frames) {
                    if let Err(error) = pipeline.zero(&backend, tail.start, tail.end - tail.start, may_deallocate).await {
                        return Err(rejected(pipeline.fail(error).await));
                    }
                }
                pipeline.finish().await.map_err(rejected)?;
                // A checkpoint is recorded only once its data is stable,
                // even with flush=n: the record outlives a crash.
                if flush || checkpoint.is_some() {
                    backend.flush().await?;
                }
                if let Some(checkpoint) = &checkpoint {
                    restore_record::set(&backend, checkpoint, disk.as_deref())?;
                }
                drop(hold);
                return Ok(Restored { summary, checkpoint, zero_tail: tail.map(|tail| tail.end - tail.start) });
            }
        };
        if let Err(error) = applied {
            discard_rest(frames);
            return Err(rejected(pipeline.fail(error).await));
        }
    }
}

/// Gathers the next `length` bytes of the body, a data piece, into a
/// buffer of its own: first what `buffer` holds, then the body's chunks;
/// the rest of the last chunk goes to `buffer`. Gathered in `buffer`
/// itself, pieces kept it shared with the writes and the hash that held
/// them, so every chunk after one reallocated and copied it (7% of a
/// restore's CPU). Not in the pooled read buffers: the hash holds up to
/// 32 MiB of pieces, more than the pool keeps, and a short piece would
/// hold a whole pooled buffer (a stream of 64 KiB frames held four times
/// its data). `None` when the body ends first.
async fn gather_piece(
    frames: &mut BodyDataStream,
    buffer: &mut BytesMut,
    length: usize,
    timeout: Duration,
    received: &mut u64,
) -> Result<Option<Bytes>, ApiError> {
    let mut piece = Vec::with_capacity(length);
    let buffered = buffer.len().min(length);
    piece.extend_from_slice(&buffer[..buffered]);
    buffer.advance(buffered);
    while piece.len() < length {
        let Some(chunk) = next_frame(frames, timeout, *received).await? else {
            return Ok(None);
        };
        *received += chunk.len() as u64;
        let taken = chunk.len().min(length - piece.len());
        piece.extend_from_slice(&chunk[..taken]);
        buffer.extend_from_slice(&chunk[taken..]);
    }
    Ok(Some(Bytes::from(piece)))
}

/// Adds a piece of a full stream to its checksum.
async fn hash(hasher: &mut Option<ParallelHasher>, piece: Piece) -> Result<(), ApiError> {
    match hasher {
        Some(hasher) => hasher.push(piece).await,
        None => Ok(()),
    }
}

/// Refuses a `meta` frame that does not fit the target or cannot be
/// checked against its chain, before anything is written.
fn check_meta(meta: &Meta, target_size: u64, zero_tail: bool, force: bool) -> Result<(), ApiError> {
    let refuse = |why: String| Err(ApiError::BadRequest(format!("meta frame: {why}")));
    if meta.incremental && meta.since.is_none() && !force {
        return refuse(
            "an incremental stream must name the checkpoint it continues from (since), or it cannot be checked against the \
             target's chain; add force=y to apply it anyway"
                .into(),
        );
    }
    if !meta.incremental && meta.since.is_some() {
        return refuse("a full stream (incremental false) names since; only incrementals continue from a checkpoint".into());
    }
    let size = meta.virtual_size;
    if size == target_size || (0 < size && size < target_size && zero_tail && !meta.incremental) {
        return Ok(());
    }
    let advice = if size < target_size && !meta.incremental {
        "; applied as is, the target would keep its old data past the stream's end: add zero_tail=y to zero it"
    } else {
        ""
    };
    refuse(format!("virtual-size {size} differs from the target image's {target_size} bytes{advice}"))
}

/// Reads the body to its end; any byte is a 400.
async fn expect_body_end(frames: &mut BodyDataStream, timeout: Duration, received: u64) -> Result<(), ApiError> {
    while let Some(chunk) = next_frame(frames, timeout, received).await? {
        if !chunk.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{} bytes follow the stop frame at offset {received}: the stream ends at its stop frame",
                chunk.len()
            )));
        }
    }
    Ok(())
}

/// True when the whole target reads as zeros (a fresh image).
async fn reads_as_zeros(backend: &Arc<Backend>) -> Result<bool, ApiError> {
    let range = ByteRange { start: 0, end: backend.size() };
    extents::<ZeroState>(backend.clone(), range).try_all(|extent| std::future::ready(extent.flags.zero)).await
}

/// Adds what landed before a failure to its message.
fn rejected(failure: WriteFailure) -> ApiError {
    let Applied { data, zeros } = failure.applied;
    let note = format!("; {data} bytes of data and {zeros} bytes of zeros were applied before it (restore again from a good stream)");
    match failure.error {
        ApiError::BadRequest(message) => ApiError::BadRequest(message + &note),
        other => {
            tracing::warn!(data, zeros, error = %other, "restore failed after applying part of the stream");
            other
        }
    }
}
