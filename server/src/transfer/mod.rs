//! Moving image bytes between HTTP bodies and the backend with bounded
//! memory. Reading is a stream of [`Piece`]s: extents first, zero ranges
//! produced without touching storage, data ranges read in [`REQUEST_SIZE`]
//! pieces with [`PIPELINE_DEPTH`] reads in flight. Writing goes through a
//! [`Pipeline`] of the same depth. A PUT body is cut into requests of
//! [`REQUEST_SIZE`]; what a refused request still sends is read and
//! dropped. Memory per transfer is a few requests, whatever the image size.

pub mod backup;
pub mod extents;
pub mod hashing;
pub mod restore;
pub mod restore_record;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::http::{HeaderMap, header};
use blockgate_nbd::buffers;
use blockgate_protocol::{ByteRange, ZeroState};
use bytes::Bytes;
use futures::stream::{self, Peekable, Stream, StreamExt, TryStreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::sources::backend::{Backend, PIPELINE_DEPTH, REQUEST_SIZE};
use crate::tickets::{Operation, Ticket};

/// Cuts off the connection a request came on: put in every request's
/// extensions, so a handler can drop a client that no longer reads (a
/// canceled ticket), and used for HTTP/1 bodies that fail half-way.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCut(CancellationToken);

impl ConnectionCut {
    /// Drops the connection: its socket is reset, with no TLS close_notify
    /// and no HTTP/1.1 last chunk.
    pub fn cut(&self) {
        self.0.cancel();
    }

    /// Completes when the connection is cut.
    pub async fn cut_off(&self) {
        self.0.cancelled().await
    }

    /// True once the connection was cut.
    pub(crate) fn is_cut(&self) -> bool {
        self.0.is_cancelled()
    }
}

static ZEROS: [u8; REQUEST_SIZE] = [0; REQUEST_SIZE];

/// Static zeros, for bodies that must carry zero bytes.
pub fn zeros(length: usize) -> Bytes {
    Bytes::from_static(&ZEROS[..length])
}

/// A piece of an image range, in image order.
#[derive(Debug)]
pub enum Piece {
    /// This many bytes read as zeros (storage was not read).
    Zeros(u64),
    /// Bytes read from storage.
    Data(Bytes),
}

enum ReadStep {
    Zeros(u64),
    Read(u64, usize),
}

/// The pieces of `range`: data read pipelined, zero ranges as lengths.
pub fn read_pieces(backend: Arc<Backend>, range: ByteRange) -> impl Stream<Item = Result<Piece, ApiError>> + Send {
    let steps = extents::extents::<ZeroState>(backend.clone(), range)
        .map_ok(|extent| {
            let steps: Box<dyn Iterator<Item = ReadStep> + Send> = if extent.flags.zero {
                Box::new(std::iter::once(ReadStep::Zeros(extent.length)))
            } else {
                Box::new(read_steps(extent.start, extent.end()))
            };
            stream::iter(steps.map(Ok::<_, ApiError>))
        })
        .try_flatten();
    steps
        .map(move |step| {
            let backend = backend.clone();
            async move {
                match step? {
                    ReadStep::Zeros(length) => Ok(Piece::Zeros(length)),
                    ReadStep::Read(offset, length) => Ok(Piece::Data(backend.read(offset, length).await?)),
                }
            }
        })
        .buffered(PIPELINE_DEPTH)
}

fn read_steps(start: u64, end: u64) -> impl Iterator<Item = ReadStep> + Send {
    (start..end).step_by(REQUEST_SIZE).map(move |offset| ReadStep::Read(offset, (end - offset).min(REQUEST_SIZE as u64) as usize))
}

/// Polls the first item of a stream before a response is committed, so a
/// backend that is already gone is a plain error status rather than a body
/// that fails at once.
pub async fn started<S, T>(stream: S) -> Result<Peekable<Pin<Box<S>>>, ApiError>
where
    S: Stream<Item = Result<T, ApiError>>,
{
    let mut stream = Box::pin(stream).peekable();
    if let Some(Err(_)) = Pin::new(&mut stream).peek().await {
        let Some(Err(error)) = stream.next().await else { unreachable!("peeked an error") };
        return Err(error);
    }
    Ok(stream)
}

/// The bytes of `range` as a response body. A failure after the response
/// started ends the stream with an error, which makes hyper abort the
/// connection (HTTP/1) or reset the stream (HTTP/2) instead of ending the
/// body as if it were complete.
pub async fn read_body(backend: Arc<Backend>, range: ByteRange) -> Result<Body, ApiError> {
    let bytes = read_pieces(backend, range)
        .map_ok(|piece| {
            // Lazily: a 1 TiB hole is 4 M chunks, produced as they are sent.
            let chunks: Box<dyn Iterator<Item = Result<Bytes, ApiError>> + Send> = match piece {
                Piece::Data(data) => Box::new(std::iter::once(Ok(data))),
                Piece::Zeros(length) => {
                    Box::new((0..length).step_by(REQUEST_SIZE).map(move |at| Ok(zeros((length - at).min(REQUEST_SIZE as u64) as usize))))
                }
            };
            stream::iter(chunks)
        })
        .try_flatten();
    Ok(Body::from_stream(exact_length(started(bytes).await?, range.len())))
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
        Some((Err(abort_body(error)), (inner, sent, true)))
    })
}

/// Runs `work` unless the ticket is canceled first (403).
pub async fn cancelable<T>(work: impl Future<Output = Result<T, ApiError>>, ticket: &Ticket) -> Result<T, ApiError> {
    let token = ticket.cancellation();
    tokio::select! {
        biased;
        () = token.cancelled() => Err(ApiError::Forbidden(format!("ticket {} was canceled", ticket.fingerprint))),
        result = work => result,
    }
}

/// Ties a response body to its operation: the operation (its slot, its
/// activity) lasts as long as the body; bytes sent from `start` are
/// recorded as transferred; a canceled ticket cuts the body off with an
/// error rather than letting it end short but clean. A client that stopped
/// reading never lets the body be polled again, so cancellation also cuts
/// its `connection` off, which drops the body and ends the operation.
pub fn guard_body(body: Body, operation: Operation, start: Option<u64>, connection: Option<ConnectionCut>) -> Body {
    let token = operation.ticket().cancellation();
    let body_gone = CancellationToken::new();
    if let Some(connection) = connection {
        let (canceled, body_gone) = (token.clone(), body_gone.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = canceled.cancelled() => connection.cut(),
                () = body_gone.cancelled() => {}
            }
        });
    }
    let state = (body.into_data_stream(), operation, start, false, body_gone.drop_guard());
    Body::from_stream(stream::unfold(state, move |(mut frames, operation, position, ended, watcher)| {
        let token = token.clone();
        async move {
            if ended {
                return None;
            }
            let next = tokio::select! {
                biased;
                () = token.cancelled() => Err(abort_body(ApiError::Forbidden(format!("ticket {} was canceled", operation.ticket().fingerprint)))),
                next = frames.next() => match next {
                    None => return None,
                    Some(Ok(bytes)) => Ok(bytes),
                    Some(Err(error)) => Err(std::io::Error::other(error)),
                },
            };
            let position = match (&next, position) {
                (Ok(bytes), Some(at)) => {
                    operation.record(at, at + bytes.len() as u64);
                    Some(at + bytes.len() as u64)
                }
                _ => position,
            };
            let ended = next.is_err();
            Some((next, (frames, operation, position, ended, watcher)))
        }
    }))
}

/// A response body of `length` bytes that says so: its size hint is exact
/// and it reports its end together with its last bytes. Without this, the
/// end of a streamed body is known only when it is polled once more, and
/// HTTP/2 sends the END_STREAM flag in an empty DATA frame after the data;
/// QEMU's curl block driver (libcurl) left that 9-byte frame unread in
/// about one download in five and waited forever (measured: 31 bytes in
/// each of its sockets' receive queues, nothing left to send here).
pub fn with_known_length(body: Body, length: u64) -> Body {
    Body::new(ExactLength { inner: body, remaining: length })
}

struct ExactLength {
    inner: Body,
    remaining: u64,
}

impl http_body::Body for ExactLength {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            let sent = frame.data_ref().map_or(0, |data| data.len() as u64);
            self.remaining = self.remaining.saturating_sub(sent);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// Logs why a response body is being cut off and turns the reason into the
/// error that makes hyper abort it.
pub fn abort_body(error: ApiError) -> std::io::Error {
    tracing::warn!(%error, "aborting a response body");
    std::io::Error::other(error.to_string())
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
    let expects_continue =
        headers.get(header::EXPECT).and_then(|value| value.to_str().ok()).is_some_and(|value| value.eq_ignore_ascii_case("100-continue"));
    if !expects_continue {
        tokio::spawn(discard(body.into_data_stream()));
    }
}

/// Drops the rest of a body already being read.
pub fn discard_rest(frames: BodyDataStream) {
    tokio::spawn(discard(frames));
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

/// Bytes that reached storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Bytes written with data.
    pub data: u64,
    /// Bytes zeroed.
    pub zeros: u64,
}

/// Why writing stopped, and what landed before.
#[derive(Debug)]
pub struct WriteFailure {
    /// What reached storage before the failure.
    pub applied: Applied,
    /// What went wrong.
    pub error: ApiError,
}

/// The next piece of a request body, failing if none comes within
/// `timeout` (a stalled client must not hold a transfer open forever).
pub async fn next_frame(frames: &mut BodyDataStream, timeout: Duration, received: u64) -> Result<Option<Bytes>, ApiError> {
    match tokio::time::timeout(timeout, frames.next()).await {
        Err(_) => Err(ApiError::BadRequest(format!("the request body stalled for {timeout:?} after {received} bytes"))),
        Ok(None) => Ok(None),
        Ok(Some(Ok(frame))) => Ok(Some(frame)),
        Ok(Some(Err(error))) => Err(ApiError::BadRequest(format!("reading the request body failed after {received} bytes: {error}"))),
    }
}

/// What every write of a request holds until the storage answered it,
/// even after the request itself is gone (a client that disconnects, a
/// canceled ticket): the target's claim, so that nothing else starts on
/// the target while those writes may still land.
pub type Hold = Arc<dyn std::any::Any + Send + Sync>;

/// Where a PUT body goes.
pub struct WriteTarget {
    /// The image.
    pub backend: Arc<Backend>,
    /// Held by each write until it ends.
    pub hold: Hold,
    /// Offset of the first byte.
    pub start: u64,
    /// Most bytes accepted.
    pub limit: u64,
    /// Longest wait for the next piece of body.
    pub body_timeout: Duration,
}

/// Writes `body` at `target.start`, refusing (before writing them) bytes
/// beyond `target.limit`. Returns the number of bytes written.
pub async fn write_body(target: WriteTarget, body: Body, over_limit: impl Fn(u64) -> ApiError) -> Result<u64, WriteFailure> {
    let WriteTarget { backend, hold, start, limit, body_timeout } = target;
    let mut frames = body.into_data_stream();
    let mut pipeline = Pipeline::new(hold);
    let mut buffer = Vec::new();
    let mut offset = start;
    let mut received = 0u64;
    loop {
        let mut frame = match next_frame(&mut frames, body_timeout, received).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(error) => return Err(pipeline.fail(error).await),
        };
        received += frame.len() as u64;
        if received > limit {
            discard_rest(frames);
            return Err(pipeline.fail(over_limit(received)).await);
        }
        while !frame.is_empty() {
            let request = if buffer.is_empty() && frame.len() >= REQUEST_SIZE {
                frame.split_to(REQUEST_SIZE)
            } else {
                if buffer.capacity() == 0 {
                    buffer = buffers::take(REQUEST_SIZE);
                }
                let take = frame.len().min(REQUEST_SIZE - buffer.len());
                buffer.extend_from_slice(&frame.split_to(take));
                if buffer.len() < REQUEST_SIZE {
                    continue;
                }
                buffers::freeze(std::mem::take(&mut buffer))
            };
            let at = offset;
            offset += request.len() as u64;
            if let Err(error) = pipeline.write(&backend, at, request).await {
                discard_rest(frames);
                return Err(pipeline.fail(error).await);
            }
        }
    }
    if !buffer.is_empty() {
        if let Err(error) = pipeline.write(&backend, offset, buffers::freeze(buffer)).await {
            return Err(pipeline.fail(error).await);
        }
    }
    pipeline.finish().await.map(|applied| applied.data)
}

/// Writes in flight, oldest first, at most [`PIPELINE_DEPTH`]; each is a
/// task, so it makes progress while the caller waits for more input, and
/// holds the pipeline's [`Hold`] until it ends.
pub struct Pipeline {
    in_flight: VecDeque<(Applied, JoinHandle<Result<(), ApiError>>)>,
    applied: Applied,
    hold: Hold,
}

impl Pipeline {
    /// A pipeline whose writes hold `hold`.
    pub fn new(hold: Hold) -> Pipeline {
        Pipeline { in_flight: VecDeque::new(), applied: Applied::default(), hold }
    }

    /// Starts writing `data` at `offset`.
    pub async fn write(&mut self, backend: &Arc<Backend>, offset: u64, data: Bytes) -> Result<(), ApiError> {
        let work = Applied { data: data.len() as u64, zeros: 0 };
        let backend = backend.clone();
        self.push(work, async move { Ok(backend.write(offset, data).await?) }).await
    }

    /// Starts zeroing `length` bytes at `offset`.
    pub async fn zero(&mut self, backend: &Arc<Backend>, offset: u64, length: u64, may_deallocate: bool) -> Result<(), ApiError> {
        let work = Applied { data: 0, zeros: length };
        let backend = backend.clone();
        self.push(work, async move { Ok(backend.zero(offset, length, may_deallocate).await?) }).await
    }

    /// Starts `operation`, first waiting for the oldest one if the pipeline
    /// is full.
    async fn push(
        &mut self,
        work: Applied,
        operation: impl Future<Output = Result<(), ApiError>> + Send + 'static,
    ) -> Result<(), ApiError> {
        if self.in_flight.len() >= PIPELINE_DEPTH {
            self.wait_oldest().await?;
        }
        let hold = self.hold.clone();
        self.in_flight.push_back((
            work,
            tokio::spawn(async move {
                let _hold = hold;
                operation.await
            }),
        ));
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), ApiError> {
        let Some((work, handle)) = self.in_flight.pop_front() else { return Ok(()) };
        handle.await.map_err(|error| ApiError::Internal(format!("write task failed: {error}")))??;
        self.applied.data += work.data;
        self.applied.zeros += work.zeros;
        Ok(())
    }

    /// Waits for every operation; what was applied, or the first failure.
    pub async fn finish(mut self) -> Result<Applied, WriteFailure> {
        while !self.in_flight.is_empty() {
            if let Err(error) = self.wait_oldest().await {
                return Err(self.fail(error).await);
            }
        }
        Ok(self.applied)
    }

    /// Lets the operations already started complete, then reports `error`
    /// with what was applied before it.
    pub async fn fail(mut self, error: ApiError) -> WriteFailure {
        while !self.in_flight.is_empty() {
            if self.wait_oldest().await.is_err() {
                break;
            }
        }
        for (_, handle) in self.in_flight.drain(..) {
            let _ = handle.await;
        }
        WriteFailure { applied: self.applied, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_of_known_length_ends_with_its_last_bytes() {
        let chunks = stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        let mut body = with_known_length(Body::from_stream(chunks), 5);
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "abc");
        assert!(!body.is_end_stream());
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "de");
        // Known now, without polling again: HTTP/2 puts END_STREAM on the
        // frame that carried "de" instead of sending an empty one.
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
