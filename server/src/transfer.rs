//! Moving image bytes between HTTP bodies and the backend with bounded
//! memory. A GET becomes a stream: extents first, zero ranges produced from
//! a static zero buffer without touching storage, data ranges read in
//! [`REQUEST_SIZE`] pieces with [`PIPELINE_DEPTH`] reads in flight. A PUT
//! body is cut into requests of the same size and written with the same
//! depth. Memory per transfer is a few requests, whatever the image size.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::http::{header, HeaderMap};
use blockgate_protocol::{ByteRange, Extent, ZeroState};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, Stream, StreamExt, TryStreamExt};
use tokio::task::JoinHandle;

use crate::backend::{Backend, PIPELINE_DEPTH, REQUEST_SIZE};
use crate::error::ApiError;
use crate::extents;

static ZEROS: [u8; REQUEST_SIZE] = [0; REQUEST_SIZE];

/// One step of a read.
enum ReadStep {
    Zeros(usize),
    Read(u64, usize),
}

/// The bytes of `range` as a response body. The first piece is fetched
/// before this returns, so a backend that is already gone is a plain 502
/// rather than a body that fails at once. A failure after that ends the
/// stream with an error, which makes hyper abort the connection (HTTP/1)
/// or reset the stream (HTTP/2) instead of ending the body as if it were
/// complete.
pub async fn read_body(backend: Arc<Backend>, range: ByteRange) -> Result<Body, ApiError> {
    let mut pieces = Box::pin(read_pieces(backend, range).peekable());
    if let Some(Err(_)) = pieces.as_mut().peek().await {
        let Some(Err(error)) = pieces.next().await else { unreachable!("peeked an error") };
        return Err(error);
    }
    Ok(Body::from_stream(exact_length(pieces, range.len())))
}

fn read_pieces(backend: Arc<Backend>, range: ByteRange) -> impl Stream<Item = Result<Bytes, ApiError>> + Send {
    let steps = extents::extents::<ZeroState>(backend.clone(), range)
        .map_ok(|extent| stream::iter(split_extent(extent).map(Ok::<_, ApiError>)))
        .try_flatten();
    steps
        .map(move |step| {
            let backend = backend.clone();
            async move {
                match step? {
                    ReadStep::Zeros(length) => Ok(Bytes::from_static(&ZEROS[..length])),
                    ReadStep::Read(offset, length) => Ok(backend.read(offset, length).await?),
                }
            }
        })
        .buffered(PIPELINE_DEPTH)
}

fn split_extent(extent: Extent<ZeroState>) -> impl Iterator<Item = ReadStep> {
    let end = extent.end();
    let zero = extent.flags.zero;
    (extent.start..end).step_by(REQUEST_SIZE).map(move |offset| {
        let length = (end - offset).min(REQUEST_SIZE as u64) as usize;
        if zero { ReadStep::Zeros(length) } else { ReadStep::Read(offset, length) }
    })
}

/// Passes `stream` through, failing it if it produces more or less than
/// `expected` bytes, and stopping at its first error: a body must never
/// look complete when it is not.
fn exact_length(
    stream: impl Stream<Item = Result<Bytes, ApiError>> + Send,
    expected: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    stream::unfold((Box::pin(stream), 0u64, false), move |(mut inner, sent, failed)| async move {
        if failed {
            return None;
        }
        let error = match inner.next().await {
            Some(Ok(bytes)) if sent + bytes.len() as u64 <= expected => {
                let sent = sent + bytes.len() as u64;
                return Some((Ok(bytes), (inner, sent, false)));
            }
            Some(Ok(_)) => ApiError::Internal(format!("read produced more than the {expected} bytes asked for")),
            Some(Err(error)) => error,
            None if sent == expected => return None,
            None => ApiError::Internal(format!("read ended after {sent} of {expected} bytes")),
        };
        tracing::warn!(%error, sent, "aborting a response body");
        Some((Err(std::io::Error::other(error.to_string())), (inner, sent, true)))
    })
}

/// Most of an unwanted request body that is read and thrown away, and for
/// how long, so that the client reads the refusal instead of a connection
/// reset (the lingering close of other HTTP servers).
const DISCARD_LIMIT: u64 = 64 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(10);

/// Reads and drops what a refused request still sends, in the background,
/// after the response went out. A client that asked `Expect: 100-continue`
/// got its answer instead of a 100 and sends nothing, so its body is left
/// alone (reading it would invite the body after all).
pub fn discard_body(headers: &HeaderMap, body: Body) {
    let expects_continue = headers
        .get(header::EXPECT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"));
    if !expects_continue {
        tokio::spawn(discard(body.into_data_stream()));
    }
}

async fn discard(mut frames: BodyDataStream) {
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = frames.next().await {
            read += frame.len() as u64;
            if read > DISCARD_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// Why writing a body stopped.
#[derive(Debug)]
pub struct WriteFailure {
    /// Bytes of the body known to be written before the failure.
    pub written: u64,
    /// What went wrong.
    pub error: ApiError,
}

/// Writes `body` at `start`, refusing (before writing them) bytes beyond
/// `limit`. Returns the number of bytes written.
pub async fn write_body(backend: Arc<Backend>, start: u64, limit: u64, body: Body, over_limit: impl Fn(u64) -> ApiError) -> Result<u64, WriteFailure> {
    let mut frames = body.into_data_stream();
    let mut pipeline = Pipeline { backend, next_offset: start, in_flight: VecDeque::new(), completed: 0 };
    let mut buffer = BytesMut::new();
    let mut received = 0u64;
    while let Some(frame) = frames.next().await {
        let mut frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                let error = ApiError::BadRequest(format!("reading the request body failed after {received} bytes: {error}"));
                return Err(pipeline.fail(error).await);
            }
        };
        received += frame.len() as u64;
        if received > limit {
            tokio::spawn(discard(frames));
            return Err(pipeline.fail(over_limit(received)).await);
        }
        while !frame.is_empty() {
            let request = if buffer.is_empty() && frame.len() >= REQUEST_SIZE {
                frame.split_to(REQUEST_SIZE)
            } else {
                let take = frame.len().min(REQUEST_SIZE - buffer.len());
                buffer.extend_from_slice(&frame.split_to(take));
                if buffer.len() < REQUEST_SIZE {
                    continue;
                }
                buffer.split().freeze()
            };
            if let Err(error) = pipeline.push(request).await {
                tokio::spawn(discard(frames));
                return Err(pipeline.fail(error).await);
            }
        }
    }
    if !buffer.is_empty() {
        if let Err(error) = pipeline.push(buffer.freeze()).await {
            return Err(pipeline.fail(error).await);
        }
    }
    pipeline.finish().await
}

/// Writes in flight, oldest first, at most [`PIPELINE_DEPTH`].
struct Pipeline {
    backend: Arc<Backend>,
    next_offset: u64,
    in_flight: VecDeque<(u64, JoinHandle<Result<(), ApiError>>)>,
    completed: u64,
}

impl Pipeline {
    /// Starts writing `data` after the previous write, first waiting for
    /// the oldest write if the pipeline is full.
    async fn push(&mut self, data: Bytes) -> Result<(), ApiError> {
        if self.in_flight.len() >= PIPELINE_DEPTH {
            self.wait_oldest().await?;
        }
        let length = data.len() as u64;
        let (backend, offset) = (self.backend.clone(), self.next_offset);
        let write = tokio::spawn(async move { backend.write(offset, data).await.map_err(ApiError::from) });
        self.in_flight.push_back((length, write));
        self.next_offset += length;
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), ApiError> {
        let Some((length, handle)) = self.in_flight.pop_front() else { return Ok(()) };
        handle.await.map_err(|error| ApiError::Internal(format!("write task failed: {error}")))??;
        self.completed += length;
        Ok(())
    }

    /// Waits for every write; the total written, or the first failure.
    async fn finish(mut self) -> Result<u64, WriteFailure> {
        while !self.in_flight.is_empty() {
            if let Err(error) = self.wait_oldest().await {
                return Err(self.fail(error).await);
            }
        }
        Ok(self.completed)
    }

    /// Lets the writes already sent complete, then reports `error` with the
    /// count of bytes that were written before it.
    async fn fail(mut self, error: ApiError) -> WriteFailure {
        while !self.in_flight.is_empty() {
            if self.wait_oldest().await.is_err() {
                break;
            }
        }
        for (_, handle) in self.in_flight.drain(..) {
            let _ = handle.await;
        }
        WriteFailure { written: self.completed, error }
    }
}
