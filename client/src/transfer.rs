//! Whole-image transfers between a local file and a server, on several
//! connections at once. The work follows the extents: data ranges are cut
//! into [`CHUNK`]-sized GET or PUT requests run `connections` at a time
//! (each retried on its own), zero ranges become a PATCH zero on the
//! server or a local zero, and nothing at all where the target is known to
//! read as zeros already. Progress goes to a callback.
//!
//! An image's extents must cover it exactly, or the transfer fails (a
//! download that followed a listing of half the image would look whole).
//! An upload whose writes the server lost (its storage daemon restarted
//! before they were flushed: the flush answers 502 "writes may be lost")
//! starts over and writes every range again, zeros too, since lost data
//! reads as zeros; it gives up after [`UPLOAD_TRIES`] tries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use blockgate_protocol::{DirtyState, Extent, ZeroState};
use futures::stream::{self, Stream, TryStreamExt};
use serde::Serialize;

use crate::error::{ClientError, Result};
use crate::image::{ImageClient, Scope};
use crate::local::{LocalImage, Piece, Run};
use crate::retry::RETRY_LOG;

/// Bytes per data request: large enough to amortise a request, small
/// enough that `connections` of them in memory stay modest.
pub const CHUNK: u64 = 8 << 20;

/// Bytes of a download's body gathered before they are written: large
/// enough that direct writes keep the disk busy, small enough that the
/// rest of the body is not long held up.
const WRITE_PIECE: usize = 4 << 20;

/// Connections used unless told otherwise.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Tries of an upload whose writes the server keeps losing.
pub const UPLOAD_TRIES: u32 = 3;

/// How far a transfer got.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Progress {
    /// Bytes of the image handled (data moved, or zeros handled).
    pub done: u64,
    /// Bytes of the image to handle.
    pub total: u64,
}

/// Called after each piece of work.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a transfer did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stats {
    /// Bytes of data that crossed the network.
    pub data_bytes: u64,
    /// Bytes zeroed without sending them (or skipped as already zero).
    pub zero_bytes: u64,
    /// Data requests made.
    pub requests: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Bytes of the remote image past the end of a smaller local one,
    /// zeroed (an upload with `zero_tail`).
    pub tail_zeroed: u64,
}

/// How to run a transfer.
#[derive(Clone)]
pub struct TransferOptions {
    /// Parallel requests (capped by the server's `max_readers`/`max_writers`).
    pub connections: usize,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Upload a local image smaller than the remote one and zero the rest
    /// of the remote image (else the sizes must be equal).
    pub zero_tail: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions { connections: DEFAULT_CONNECTIONS, progress: None, zero_tail: false }
    }
}

/// One piece of work.
#[derive(Debug, Clone, Copy)]
enum Job {
    Data {
        offset: u64,
        length: u64,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    /// Zeros the target already has: only counted.
    Skip {
        length: u64,
    },
}

/// The jobs of a run, made as they are taken: a data run the server
/// says spans 2^62 bytes is 2^39 requests, never held at once.
fn split(run: Run, zero_job: fn(u64, u64) -> Job) -> impl Iterator<Item = Job> {
    let end = run.start + run.length;
    let zero = run.zero.then(|| zero_job(run.start, run.length));
    let data = (!run.zero)
        .then(|| (run.start..end).step_by(CHUNK as usize).map(move |offset| Job::Data { offset, length: (end - offset).min(CHUNK) }));
    zero.into_iter().chain(data.into_iter().flatten())
}

struct Tally {
    done: AtomicU64,
    data: AtomicU64,
    zero: AtomicU64,
    requests: AtomicU64,
    total: u64,
    progress: Option<ProgressFn>,
}

impl Tally {
    fn new(total: u64, progress: Option<ProgressFn>) -> Tally {
        Tally { done: AtomicU64::new(0), data: AtomicU64::new(0), zero: AtomicU64::new(0), requests: AtomicU64::new(0), total, progress }
    }

    fn add(&self, job: Job) {
        let length = match job {
            Job::Data { length, .. } => {
                self.data.fetch_add(length, Ordering::Relaxed);
                self.requests.fetch_add(1, Ordering::Relaxed);
                length
            }
            Job::Zero { length, .. } | Job::Skip { length } => {
                self.zero.fetch_add(length, Ordering::Relaxed);
                length
            }
        };
        let done = self.done.fetch_add(length, Ordering::Relaxed) + length;
        if let Some(progress) = &self.progress {
            progress(Progress { done, total: self.total });
        }
    }

    /// Progress starts again from nothing (the work done still counts).
    fn restart(&self) {
        self.done.store(0, Ordering::Relaxed);
    }

    fn stats(&self, started: Instant) -> Stats {
        Stats {
            data_bytes: self.data.load(Ordering::Relaxed),
            zero_bytes: self.zero.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs_f64(),
            tail_zeroed: 0,
        }
    }
}

/// Runs jobs `connections` at a time.
async fn run_jobs<F, Fut>(jobs: impl futures::Stream<Item = Result<Job>>, connections: usize, tally: &Tally, work: F) -> Result<()>
where
    F: Fn(Job) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    jobs.try_for_each_concurrent(connections.max(1), |job| {
        let done = work(job);
        async move {
            done.await?;
            tally.add(job);
            Ok(())
        }
    })
    .await
}

async fn connections_for(client: &ImageClient, wanted: usize, writing: bool) -> Result<usize> {
    let options = client.options().await?;
    let limit = if writing { options.max_writers } else { options.max_readers };
    Ok(wanted.min(limit.max(1) as usize))
}

/// The extents of the whole image, which has `size` bytes, checked to
/// end where it ends ([`ImageClient::extents`] checks they follow each
/// other from 0).
async fn covering<F>(client: &ImageClient, scope: &Scope, size: u64) -> Result<impl Stream<Item = Result<Extent<F>>> + use<F>>
where
    F: serde::de::DeserializeOwned + Send + 'static,
{
    let extents = Box::pin(client.extents::<F>(scope, None).await?);
    Ok(stream::try_unfold((extents, 0u64), move |(mut extents, end)| async move {
        match extents.try_next().await? {
            Some(extent) if extent.start + extent.length > size => Err(ClientError::Protocol(format!(
                "the extents pass the end of the image ({} of {size} bytes)",
                extent.start + extent.length
            ))),
            Some(extent) => {
                let end = extent.start + extent.length;
                Ok(Some((extent, (extents, end))))
            }
            None if end == size => Ok(None),
            None => Err(ClientError::Protocol(format!("the extents end at {end} of {size} bytes"))),
        }
    }))
}

/// Downloads the whole image into `local` (a fresh file that reads as
/// zeros): data ranges are fetched, zero ranges cost nothing.
pub async fn download(client: &ImageClient, local: &LocalImage, options: &TransferOptions) -> Result<Stats> {
    let size = client.size().await?;
    let extents = covering::<ZeroState>(client, &Scope::full(), size).await?;
    let jobs = extents.map_ok(|extent: Extent<ZeroState>| {
        let run = Run { start: extent.start, length: extent.length, zero: extent.flags.zero };
        split(run, |_, length| Job::Skip { length })
    });
    download_jobs(client, local, size, options, jobs).await
}

/// Downloads only the ranges `scope` marks changed into `local` (an overlay
/// on the previous backup): dirty data is fetched, dirty zeros are zeroed
/// locally, clean ranges are left to the backing file.
pub async fn download_incremental(client: &ImageClient, local: &LocalImage, scope: &Scope, options: &TransferOptions) -> Result<Stats> {
    let scope = Scope { incremental: true, ..scope.clone() };
    let size = client.size().await?;
    let extents = covering::<DirtyState>(client, &scope, size).await?;
    let jobs = extents.map_ok(|extent: Extent<DirtyState>| {
        if extent.flags.dirty {
            let run = Run { start: extent.start, length: extent.length, zero: extent.flags.zero };
            split(run, |offset, length| Job::Zero { offset, length })
        } else {
            // Clean: one job that only counts.
            split(Run { start: extent.start, length: extent.length, zero: true }, |_, length| Job::Skip { length })
        }
    });
    download_jobs(client, local, size, options, jobs).await
}

/// Runs the jobs of a download, each extent's at a time.
async fn download_jobs(
    client: &ImageClient,
    local: &LocalImage,
    size: u64,
    options: &TransferOptions,
    jobs: impl futures::Stream<Item = Result<impl Iterator<Item = Job>>>,
) -> Result<Stats> {
    let started = Instant::now();
    check_sizes(size, local.size())?;
    let connections = connections_for(client, options.connections, false).await?;
    let tally = Tally::new(size, options.progress.clone());
    let jobs = jobs.map_ok(|jobs| stream::iter(jobs.map(Ok))).try_flatten();
    let spare = SparePieces::default();
    run_jobs(jobs, connections, &tally, |job| fetch(client, local, &spare, job)).await?;
    Ok(tally.stats(started))
}

async fn fetch(client: &ImageClient, local: &LocalImage, spare: &SparePieces, job: Job) -> Result<()> {
    match job {
        Job::Data { offset, length } => fetch_data(client, local, spare, offset, length).await,
        Job::Zero { offset, length } => local.zero(offset, length).await,
        Job::Skip { .. } => Ok(()),
    }
}

/// The pieces of ranges already written, for the next ones: a new
/// piece costs a page fault for each of its pages (measured: a fifth of
/// a download's CPU when each range had its own).
#[derive(Default)]
struct SparePieces(std::sync::Mutex<Vec<Piece>>);

impl SparePieces {
    fn take(&self) -> Piece {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_else(|| Piece::new(WRITE_PIECE))
    }

    fn keep(&self, piece: Piece) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(piece);
    }
}

/// Writes a range to `local` as its body arrives, in [`WRITE_PIECE`]
/// pieces, each where it belongs: the body is never held whole.
async fn fetch_data(client: &ImageClient, local: &LocalImage, spare: &SparePieces, offset: u64, length: u64) -> Result<()> {
    let mut body = std::pin::pin!(client.read_resuming(offset, length));
    let mut piece = spare.take();
    let mut at = offset;
    while let Some(chunk) = body.try_next().await? {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            rest = &rest[piece.fill(rest)..];
            if piece.is_full() {
                let written = piece.len() as u64;
                piece = local.write(at, piece).await?;
                at += written;
            }
        }
    }
    if !piece.is_empty() {
        piece = local.write(at, piece).await?;
    }
    spare.keep(piece);
    Ok(())
}

/// Uploads `local` into the image: data ranges are sent, zero ranges are
/// zeroed on the server, or skipped when the target reads as zeros
/// throughout; then one flush. The sizes must be equal, or, with
/// `zero_tail`, the local image smaller: the rest of the remote image is
/// zeroed. Nothing is written when they do not fit. If the server lost
/// writes, the upload starts over, writing every range (up to
/// [`UPLOAD_TRIES`] tries).
pub async fn upload(local: &LocalImage, client: &ImageClient, options: &TransferOptions) -> Result<Stats> {
    let started = Instant::now();
    let size = client.size().await?;
    if local.size() > size || (local.size() < size && !options.zero_tail) {
        return Err(ClientError::SizeMismatch { local: local.size(), remote: size });
    }
    let connections = connections_for(client, options.connections, true).await?;
    let target_is_zero = covering::<ZeroState>(client, &Scope::full(), size)
        .await?
        .try_all(|extent: Extent<ZeroState>| std::future::ready(extent.flags.zero))
        .await?;
    let runs = local.runs().await?;
    let tail = Job::Zero { offset: local.size(), length: size - local.size() };
    let tally = Tally::new(size, options.progress.clone());
    let mut tries = 1;
    loop {
        // Lost data reads as zeros: after a loss, zeros are written too.
        let zero_job: fn(u64, u64) -> Job =
            if target_is_zero && tries == 1 { |_, length| Job::Skip { length } } else { |offset, length| Job::Zero { offset, length } };
        let jobs = runs.iter().flat_map(|run| split(*run, zero_job)).chain((size > local.size()).then_some(tail));
        let sent = async {
            run_jobs(stream::iter(jobs.map(Ok)), connections, &tally, |job| send(local, client, job)).await?;
            client.flush().await
        };
        match sent.await {
            Ok(()) => break,
            Err(error) if error.lost_writes() && tries < UPLOAD_TRIES => {
                tries += 1;
                let error = crate::error::chain(&error);
                tracing::warn!(target: RETRY_LOG, "the server lost writes ({error}); starting the upload over, every range again (try {tries} of {UPLOAD_TRIES})");
                tally.restart();
            }
            Err(error) if error.lost_writes() => return Err(ClientError::WritesLost { tries, last: Box::new(error) }),
            Err(error) => return Err(error),
        }
    }
    Ok(Stats { tail_zeroed: size - local.size(), ..tally.stats(started) })
}

async fn send(local: &LocalImage, client: &ImageClient, job: Job) -> Result<()> {
    match job {
        Job::Data { offset, length } => client.write(offset, local.read(offset, length as usize).await?, false).await,
        Job::Zero { offset, length } => client.zero(offset, length, false).await,
        Job::Skip { .. } => Ok(()),
    }
}

fn check_sizes(remote: u64, local: u64) -> Result<()> {
    if remote == local { Ok(()) } else { Err(ClientError::Invalid(format!("the image has {remote} bytes but the local file {local}"))) }
}
