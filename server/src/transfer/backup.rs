//! The sparse stream out (`GET ?format=sparse`): a full backup tiles the
//! image with data and zero frames; an incremental one (`context=dirty`,
//! `since=CHECKPOINT`) covers exactly the dirty ranges of a frozen view,
//! dirty zero ranges as zero frames. The
//! `meta` frame needs the data size up front, so the extents are walked
//! twice (cheap: no data is read the first time) rather than held in
//! memory. Data is read pipelined; the full stream's blkhash is computed
//! from the frames as they go out (on every core) and sent in the trailer,
//! unless the client asked for none.
//! A failure after the first byte aborts the body without a `stop` frame.

use std::sync::Arc;

use axum::body::Body;
use blockgate_protocol::blkhash::{ALGORITHM, Algorithm, DEFAULT_BLOCK_SIZE};
use blockgate_protocol::sparse::{self, Checksum, DATA_SEGMENT, Kind, Meta, Trailer};
use blockgate_protocol::{ByteRange, DirtyState, Extent, ZeroState};
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt, TryStreamExt};

use crate::error::ApiError;
use crate::sources::backend::{Backend, PIPELINE_DEPTH, REQUEST_SIZE};
use crate::transfer::extents::extents;
use crate::transfer::hashing::ParallelHasher;
use crate::transfer::{Piece, abort_body, started};

/// What a stream carries and how its `meta` frame labels it.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only the dirty ranges of the backend's bitmap (a frozen view).
    pub incremental: bool,
    /// The ticket's bitmap, for imageio's `context=dirty`.
    pub bitmap: Option<String>,
    /// The checkpoint an incremental continues from.
    pub since: Option<String>,
    /// The checkpoint the stream reaches.
    pub checkpoint: Option<String>,
    /// The VM disk the stream is of (`VM-UUID/TARGET`).
    pub disk: Option<String>,
    /// Leave the blkhash out of a full stream's trailer (`checksum=n`):
    /// hashing costs more CPU than the rest of the stream.
    pub without_checksum: bool,
}

/// A range the stream carries as one frame.
#[derive(Debug, Clone, Copy)]
struct FrameRange {
    start: u64,
    length: u64,
    zero: bool,
}

/// The frames of `scope`, in order; data frames at most [`DATA_SEGMENT`].
fn frame_ranges(backend: Arc<Backend>, incremental: bool) -> impl Stream<Item = Result<FrameRange, ApiError>> + Send {
    let range = ByteRange { start: 0, end: backend.size() };
    let carried: std::pin::Pin<Box<dyn Stream<Item = Result<FrameRange, ApiError>> + Send>> = match incremental {
        false => Box::pin(extents::<ZeroState>(backend, range).map_ok(|e: Extent<ZeroState>| FrameRange {
            start: e.start,
            length: e.length,
            zero: e.flags.zero,
        })),
        true => Box::pin(extents::<DirtyState>(backend, range).try_filter(|e| std::future::ready(e.flags.dirty)).map_ok(|e| FrameRange {
            start: e.start,
            length: e.length,
            zero: e.flags.zero,
        })),
    };
    carried
        .map_ok(|range| {
            // Lazily: a fully allocated 1 TiB image is 128 K data frames.
            let end = range.start + range.length;
            let frames: Box<dyn Iterator<Item = Result<FrameRange, ApiError>> + Send> = if range.zero {
                Box::new(std::iter::once(Ok(range)))
            } else {
                Box::new(
                    (range.start..end)
                        .step_by(DATA_SEGMENT as usize)
                        .map(move |start| Ok(FrameRange { start, length: (end - start).min(DATA_SEGMENT), zero: false })),
                )
            };
            stream::iter(frames)
        })
        .try_flatten()
}

/// What goes out, in order.
enum Step {
    /// A data frame's header.
    DataHeader(Bytes),
    /// The CR LF that ends a data frame.
    Terminator,
    /// Image data to read.
    Read(u64, usize),
    /// A zero frame: its header, and the length to hash.
    Zero(Bytes, u64),
}

enum Output {
    DataHeader(Bytes),
    Terminator,
    Data(Bytes),
    Zero(Bytes, u64),
}

/// The sparse stream of `scope` as a response body.
pub async fn backup_body(backend: Arc<Backend>, scope: Scope) -> Result<Body, ApiError> {
    let incremental = scope.incremental;
    let data_size = frame_ranges(backend.clone(), incremental)
        .try_fold(0u64, |sum, frame| std::future::ready(Ok(sum + if frame.zero { 0 } else { frame.length })))
        .await?;
    let meta = Meta {
        virtual_size: backend.size(),
        data_size,
        date: Some(crate::clock::now_rfc3339()),
        incremental,
        context: Some(if incremental { "dirty" } else { "zero" }.to_string()),
        bitmap: scope.bitmap,
        generator: Some(format!("blockgate {}", env!("CARGO_PKG_VERSION"))),
        since: scope.since,
        checkpoint: scope.checkpoint,
        disk: scope.disk,
    };
    let steps = frame_ranges(backend.clone(), incremental)
        .map_ok(|frame| {
            let header = sparse::header(if frame.zero { Kind::Zero } else { Kind::Data }, frame.start, frame.length);
            let steps: Vec<Result<Step, ApiError>> = if frame.zero {
                vec![Ok(Step::Zero(header, frame.length))]
            } else {
                let end = frame.start + frame.length;
                let reads =
                    (frame.start..end).step_by(REQUEST_SIZE).map(|at| Ok(Step::Read(at, (end - at).min(REQUEST_SIZE as u64) as usize)));
                std::iter::once(Ok(Step::DataHeader(header))).chain(reads).chain(std::iter::once(Ok(Step::Terminator))).collect()
            };
            stream::iter(steps)
        })
        .try_flatten();
    let outputs = steps
        .map(move |step| {
            let backend = backend.clone();
            async move {
                Ok(match step? {
                    Step::DataHeader(header) => Output::DataHeader(header),
                    Step::Terminator => Output::Terminator,
                    Step::Zero(header, length) => Output::Zero(header, length),
                    Step::Read(offset, length) => Output::Data(backend.read(offset, length).await?),
                })
            }
        })
        .buffered(PIPELINE_DEPTH);
    let outputs = started(outputs).await?;
    let state = Frames {
        outputs,
        hasher: (!incremental && !scope.without_checksum).then(|| ParallelHasher::new(Algorithm::Blake2b, DEFAULT_BLOCK_SIZE)),
        frames: 0,
        data_size: 0,
        zero_size: 0,
        expected_data: data_size,
        ended: false,
    };
    let body = stream::once(async move { Ok(sparse::json_frame(Kind::Meta, &meta)) }).chain(stream::unfold(state, Frames::next));
    Ok(Body::from_stream(body))
}

/// The running state of a stream going out.
struct Frames<S> {
    outputs: S,
    hasher: Option<ParallelHasher>,
    frames: u64,
    data_size: u64,
    zero_size: u64,
    expected_data: u64,
    ended: bool,
}

impl<S: Stream<Item = Result<Output, ApiError>> + Unpin> Frames<S> {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        if self.ended {
            return None;
        }
        let bytes = match self.outputs.next().await {
            Some(Ok(Output::DataHeader(header))) => {
                self.frames += 1;
                header
            }
            Some(Ok(Output::Terminator)) => Bytes::from_static(sparse::CRLF),
            Some(Ok(Output::Data(data))) => {
                self.data_size += data.len() as u64;
                if let Some(hasher) = &mut self.hasher {
                    if let Err(error) = hasher.push(Piece::Data(data.clone())).await {
                        self.ended = true;
                        return Some((Err(abort_body(error)), self));
                    }
                }
                data
            }
            Some(Ok(Output::Zero(header, length))) => {
                self.frames += 1;
                self.zero_size += length;
                if let Some(hasher) = &mut self.hasher {
                    if let Err(error) = hasher.push(Piece::Zeros(length)).await {
                        self.ended = true;
                        return Some((Err(abort_body(error)), self));
                    }
                }
                header
            }
            Some(Err(error)) => {
                self.ended = true;
                return Some((Err(abort_body(error)), self));
            }
            None => {
                self.ended = true;
                if self.data_size != self.expected_data {
                    // The image changed between the two walks: the meta
                    // frame would lie, so the stream must not look complete.
                    let error = ApiError::Internal(format!(
                        "the image changed during the backup ({} bytes of data, {} announced)",
                        self.data_size, self.expected_data
                    ));
                    return Some((Err(abort_body(error)), self));
                }
                let checksum = match self.hasher.take() {
                    None => None,
                    Some(hasher) => {
                        let block_size = hasher.block_size();
                        match hasher.finish().await {
                            Ok(checksum) => Some(Checksum { algorithm: ALGORITHM.to_string(), block_size, checksum }),
                            Err(error) => return Some((Err(abort_body(error)), self)),
                        }
                    }
                };
                let trailer = Trailer { frames: self.frames, data_size: self.data_size, zero_size: self.zero_size, checksum };
                sparse::json_frame(Kind::Stop, &trailer)
            }
        };
        Some((Ok(bytes), self))
    }
}
