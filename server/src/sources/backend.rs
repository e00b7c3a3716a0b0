//! The storage behind a ticket: an NBD export (on the qemu-storage-daemon
//! the server owns for a local file, or a URI given to us) and a small
//! pool of pipelined NBD connections to it. A connection that breaks (the
//! daemon restarted, say) is replaced on next use, so a client that
//! retries after a 502 gets through. Every request has a deadline: a
//! frozen NBD server costs a 502 and a new connection, never a request
//! that hangs forever. Dirty maps of an owned image are read through a
//! frozen view ([`Backend::dirty_view`]): a backend of its own on a
//! temporary export, removed when the last request using it is dropped.
//! Every write is entered in a [`Ledger`]: a connection that breaks (the
//! daemon died) turns the writes it had not flushed into lost ones, and a
//! flush answers 502 until they are written again.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blockgate_nbd::qemu;
use blockgate_nbd::{
    ALLOCATION_DEPTH, Address, BASE_ALLOCATION, BlockStatus, Client, ConnectOptions, DIRTY_BITMAP_PREFIX, ZeroFlags, wire::tflag,
};
use bytes::Bytes;

use crate::config::{ImageFormat, ImageSource, ImageSpec, SpecOption};
use crate::error::{ApiError, ApiResult};
use crate::metrics::metrics;
use crate::sources::checkpoints::{self, Checkpoints};
use crate::sources::durability::Ledger;
use crate::sources::image_files;
use crate::sources::owned::{MAIN_EXPORT, OwnedImage, OwnedSettings};

/// Largest single READ or WRITE the data routes issue. nbd.md measured
/// 256 KiB to 1 MiB as the best request sizes; 256 KiB was as fast as 1 MiB
/// here for a TLS download and keeps eight transfers' buffers near 16 MiB.
pub const REQUEST_SIZE: usize = blockgate_nbd::buffers::POOLED_CAPACITY;
/// NBD requests a single transfer keeps in flight.
pub const PIPELINE_DEPTH: usize = 8;
/// errno of an I/O error, the one failure worth a second read: a flaky
/// disk or network block device often succeeds the next time.
const EIO: u32 = 5;

/// How the server reaches its images.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// NBD connections per image.
    pub connections: u32,
    /// Longest wait for one NBD request's reply (or a connection).
    pub request_timeout: Duration,
    /// Where checkpoint and restore records are kept.
    pub state_dir: Arc<std::path::Path>,
    /// Where the backing and data files a qcow2 names may lie.
    pub allowed_links: Arc<blockgate_nbd::qcow2::LinkPolicy>,
    /// The most checkpoints one image may have.
    pub max_checkpoints: usize,
}

/// Which dirty map a request reads.
#[derive(Debug, Clone, Copy)]
pub enum DirtySource<'a> {
    /// The ticket's own bitmap (imageio's `context=dirty`).
    Ticket,
    /// What changed since a checkpoint; `next` names the checkpoint that
    /// starts the next round (made now if it does not exist).
    Since {
        /// The checkpoint of the last backup.
        since: &'a str,
        /// The checkpoint this backup reaches.
        next: Option<&'a str>,
    },
}

/// What a backup job's export is: the point in time of checkpoint
/// `checkpoint`, and (for an incremental) a dirty map of what changed
/// since `since`. Streams of such an export carry both in their `meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPoint {
    /// The checkpoint its dirty map starts from; none for a full export.
    pub since: Option<String>,
    /// The checkpoint made with the job; none when no disk can hold one.
    pub checkpoint: Option<String>,
    /// Which disk of which VM: `VM-UUID/TARGET`.
    pub disk: String,
}

/// A frozen view's export and bitmap, removed when its backend goes.
struct View {
    owned: Arc<OwnedImage>,
    name: String,
}

impl Drop for View {
    fn drop(&mut self) {
        let (owned, name) = (self.owned.clone(), std::mem::take(&mut self.name));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { checkpoints::release_view(owned.monitor(), &name).await });
        }
    }
}

/// A connection of the pool, and how often the owned daemon had exited
/// when it was opened: a connection that the daemon's exit closed is a
/// break the ledger already counted ([`Backend::notice_restart`]).
struct Slot {
    client: Client,
    daemon_exits: u64,
}

/// A place in the pool. The open connection is looked up under a lock
/// that is never held across an await; only opening one waits, on an
/// async lock of its own. (One async lock around both let a request
/// whose future is not being polled, such as a response body that hyper
/// does not ask for data, hold every request using the slot: tokio's
/// locks are fair, so the lock is handed to the first waiter even before
/// that waiter runs again.)
#[derive(Default)]
struct SlotCell {
    slot: parking_lot::Mutex<Option<Slot>>,
    connecting: tokio::sync::Mutex<()>,
}

impl SlotCell {
    fn holding(slot: Slot) -> SlotCell {
        SlotCell { slot: parking_lot::Mutex::new(Some(slot)), connecting: tokio::sync::Mutex::new(()) }
    }

    /// The slot's connection, if it is open.
    fn live(&self) -> Option<Client> {
        self.slot.lock().as_ref().filter(|slot| !slot.client.is_closed()).map(|slot| slot.client.clone())
    }
}

/// An NBD export and connections to it.
pub struct Backend {
    address: Address,
    options: ConnectOptions,
    slots: Vec<SlotCell>,
    next_slot: AtomicUsize,
    request_timeout: Duration,
    size: u64,
    read_only: bool,
    contexts: Vec<String>,
    /// The dirty bitmap context of these connections.
    dirty_context: Option<String>,
    /// The ticket's own bitmap.
    bitmap: Option<String>,
    /// Set when the export is a backup job's point in time.
    point: Option<BackupPoint>,
    owned: Option<Arc<OwnedImage>>,
    checkpoints: Result<Checkpoints, String>,
    /// What a restore record is kept for: the image's path or the URI.
    target: String,
    /// What writes and restores claim: the image file's device and inode,
    /// or the URI.
    identity: String,
    /// The files the image links to (backing chain, data files).
    linked_files: Vec<std::path::PathBuf>,
    /// Kept for its `Drop`, which removes the view from the daemon.
    _view: Option<View>,
    settings: BackendSettings,
    /// Writes not yet flushed, and those a broken connection may have lost.
    ledger: Ledger,
    /// The owned daemon's restart count the ledger has accounted for.
    restarts_seen: AtomicU64,
}

/// A first connection to `address`, negotiated within `timeout`.
async fn connect_within(address: &Address, options: &ConnectOptions, timeout: Duration) -> Result<Client> {
    tokio::time::timeout(timeout, Client::connect(address, options))
        .await
        .map_err(|_| blockgate_nbd::Error::TimedOut(timeout))?
        .with_context(|| format!("connecting to {address}"))
}

fn no_bitmap() -> ApiError {
    ApiError::NotFound("the ticket has no dirty bitmap; context=dirty needs one (or since=CHECKPOINT)".into())
}

/// The one bitmap of a `dirty` image, or why there is not exactly one;
/// `how_to_add` says how this kind of image gets one.
fn only_bitmap(mut names: Vec<String>, image: &str, spec: &ImageSpec, how_to_add: &str) -> Result<String> {
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => bail!("{image} has no dirty bitmap; {how_to_add}, or drop {}", spec.option_name(SpecOption::Dirty)),
        _ => bail!("{image} has several dirty bitmaps ({}); name one with {}", names.join(", "), spec.option_name(SpecOption::Bitmap)),
    }
}

/// What an NBD URI's writes and restores claim: the URI with its unix
/// socket resolved, so that `socket=/d/nbd.sock` and `socket=/d/./nbd.sock`
/// are one target (two host names for one TCP server are not seen).
fn uri_identity(address: &Address) -> String {
    match &address.endpoint {
        blockgate_nbd::Endpoint::Unix(socket) => match std::fs::canonicalize(socket) {
            Ok(real) => Address::unix(real, address.export.as_str()).to_string(),
            Err(_) => address.to_string(),
        },
        blockgate_nbd::Endpoint::Tcp { .. } => address.to_string(),
    }
}

/// The format a local file is opened with: the one named, else qcow2 for
/// a `.qcow2` name, else raw. Never what the content looks like: a client
/// may have written those bytes (api.md, "Formats and host files").
fn file_format(spec: &ImageSpec, path: &std::path::Path) -> ImageFormat {
    spec.format.unwrap_or(if path.extension().is_some_and(|extension| extension == "qcow2") {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Logs when a file's content announces another format than the one it is
/// opened with: a raw image a client filled with a qcow2 header, say.
async fn warn_if_content_differs(path: &std::path::Path, format: ImageFormat) {
    match qemu::sniff_format(path).await {
        Ok(Some(looks_like)) if looks_like != format.as_str() => tracing::warn!(
            image = %path.display(),
            format = format.as_str(),
            looks_like,
            "the image's content looks like {looks_like}, but it is opened as {} (formats are never probed)",
            format.as_str()
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(image = %path.display(), %error, "could not read the image's first bytes"),
    }
}

impl Backend {
    /// Opens the source of an `--image` spec or a ticket: creates and
    /// exports a local file, or connects to a URI, and checks what the
    /// spec asks for.
    pub async fn open(spec: &ImageSpec, settings: BackendSettings) -> Result<Backend> {
        match &spec.source {
            ImageSource::Nbd(address) => {
                let mut bitmap = spec.bitmap.clone();
                if spec.dirty && bitmap.is_none() {
                    let listed = Self::listed_bitmaps(address, &settings).await?;
                    let how_to_add = "its NBD server must export one (qemu-nbd -B NAME)";
                    bitmap = Some(only_bitmap(listed, &format!("the NBD export {address}"), spec, how_to_add)?);
                }
                let mut backend = Self::connect(address.clone(), bitmap.clone(), settings).await?;
                if backend.read_only && !spec.read_only {
                    backend.stop().await;
                    bail!("the NBD export {address} is read-only; serve it read-only ({})", spec.option_name(SpecOption::ReadOnly));
                }
                backend.bitmap = bitmap;
                backend.target = address.to_string();
                backend.identity = uri_identity(address);
                Ok(backend)
            }
            ImageSource::File(path) => Self::open_file(spec, path, settings).await,
        }
    }

    /// Opens a local file on a qemu-storage-daemon of our own.
    async fn open_file(spec: &ImageSpec, path: &std::path::Path, settings: BackendSettings) -> Result<Backend> {
        let format = file_format(spec, path);
        let exists = path.exists();
        match (exists, spec.create_size) {
            (true, _) => {}
            (false, Some(size)) => qemu::create_image(path, format.as_str(), size).await?,
            (false, None) => bail!("{} does not exist", path.display()),
        }
        let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        // File-system work off the async workers; the file is checked (no
        // FIFO, no link outside the allowed directories) before anything
        // else reads it.
        let (layer, pins) = {
            let (path, allowed) = (path.clone(), settings.allowed_links.clone());
            tokio::task::spawn_blocking(move || image_files::resolve(&path, format.as_str(), &allowed)).await??
        };
        if exists {
            warn_if_content_differs(&path, format).await;
        }
        let info = qemu::image_info(&path, format.as_str()).await?;
        let image = path.display().to_string();
        let bitmap = match (&spec.bitmap, spec.dirty) {
            (Some(name), _) if !info.bitmaps.contains(name) => bail!("{image} has no dirty bitmap {name:?}"),
            (Some(name), _) => Some(name.clone()),
            (None, true) => Some(only_bitmap(info.bitmaps, &image, spec, "add one (qemu-img bitmap --add)")?),
            (None, false) => None,
        };
        if let Some(name) = bitmap.as_ref().filter(|name| info.inconsistent_bitmaps.contains(name)) {
            bail!("{image}: dirty bitmap {name:?} is inconsistent (its writer did not close the image); it cannot be used");
        }
        // Checkpoints need the image open for writing even when the
        // ticket's data is read-only: a backup ticket rotates its chain.
        let node_read_only = spec.read_only && !(format == ImageFormat::Qcow2 && spec.checkpoints);
        let checkpoints = match format {
            ImageFormat::Raw => Err("the image is raw, which cannot hold persistent bitmaps; checkpoints need qcow2".to_string()),
            ImageFormat::Qcow2 => Ok(Checkpoints::open(&path, &settings.state_dir, settings.max_checkpoints)?),
        };
        let identity = pins.identity().unwrap_or_else(|| image.clone());
        let linked_files = pins.linked_files();
        let owned_settings =
            OwnedSettings { image: layer, pins, read_only: spec.read_only, node_read_only, command_timeout: settings.request_timeout };
        let owned = OwnedImage::start(owned_settings).await?;
        let owned = Arc::new(owned);
        let address = Address::unix(owned.nbd_socket(), MAIN_EXPORT);
        match Self::connect(address, None, settings).await {
            Ok(backend) => Ok(Backend { bitmap, owned: Some(owned), checkpoints, target: image, identity, linked_files, ..backend }),
            Err(error) => {
                owned.stop().await;
                Err(error)
            }
        }
    }

    /// The dirty bitmaps an NBD server lists.
    async fn listed_bitmaps(address: &Address, settings: &BackendSettings) -> Result<Vec<String>> {
        let listing = ConnectOptions { list_meta_contexts: vec![DIRTY_BITMAP_PREFIX.to_string()], ..Default::default() };
        let probe = connect_within(address, &listing, settings.request_timeout).await?;
        let names = probe.info().listed_contexts.iter().filter_map(|c| c.strip_prefix(DIRTY_BITMAP_PREFIX)).map(str::to_string).collect();
        probe.disconnect().await;
        Ok(names)
    }

    /// Negotiates the first connection and learns the export's size,
    /// flags and contexts (`bitmap`'s among them).
    async fn connect(address: Address, bitmap: Option<String>, settings: BackendSettings) -> Result<Backend> {
        let dirty_context = bitmap.as_ref().map(|name| format!("{DIRTY_BITMAP_PREFIX}{name}"));
        let mut wanted = vec![BASE_ALLOCATION.to_string(), ALLOCATION_DEPTH.to_string()];
        wanted.extend(dirty_context.clone());
        let options = ConnectOptions { meta_contexts: wanted, ..Default::default() };
        let first = connect_within(&address, &options, settings.request_timeout).await?;
        let contexts: Vec<String> = first.info().contexts.iter().map(|(_, name)| name.clone()).collect();
        if let (Some(context), Some(name)) = (&dirty_context, &bitmap) {
            if !contexts.contains(context) {
                bail!("the NBD export {address} has no dirty bitmap {name:?} (is it exported with -B {name}?)");
            }
        }
        let export_read_only = first.is_read_only();
        let size = first.size();
        let mut slots: Vec<_> = (1..settings.connections).map(|_| SlotCell::default()).collect();
        slots.insert(0, SlotCell::holding(Slot { client: first, daemon_exits: 0 }));
        Ok(Backend {
            target: address.to_string(),
            identity: address.to_string(),
            linked_files: Vec::new(),
            address,
            options,
            slots,
            next_slot: AtomicUsize::new(0),
            request_timeout: settings.request_timeout,
            size,
            read_only: export_read_only,
            contexts,
            dirty_context,
            bitmap,
            point: None,
            owned: None,
            checkpoints: Err("checkpoints need an image the server owns (a file), not an NBD URI".to_string()),
            _view: None,
            settings,
            ledger: Ledger::default(),
            restarts_seen: AtomicU64::new(0),
        })
    }

    /// A backend that reads the dirty map of `source`, frozen now. For an
    /// NBD URI (imageio's bitmap, exported by someone else) it is this one.
    pub async fn dirty_view(self: &Arc<Self>, source: DirtySource<'_>) -> ApiResult<Arc<Backend>> {
        let (owned, name) = match (source, &self.owned) {
            (DirtySource::Ticket, None) if self.dirty_context.is_some() => return Ok(self.clone()),
            (DirtySource::Ticket, None) => return Err(no_bitmap()),
            (DirtySource::Ticket, Some(owned)) => {
                (owned, checkpoints::freeze_bitmap(owned.monitor(), self.bitmap.as_deref().ok_or_else(no_bitmap)?).await?)
            }
            (DirtySource::Since { since, next }, _) => {
                let (checkpoints, owned) = self.checkpoints()?;
                (owned, checkpoints.freeze_since(owned.monitor(), since, next).await?)
            }
        };
        let view = View { owned: owned.clone(), name: name.clone() };
        let address = Address::unix(owned.nbd_socket(), name.as_str());
        let backend = Self::connect(address, Some(name), self.settings.clone())
            .await
            .map_err(|error| ApiError::Daemon(format!("opening a frozen view: {error:#}")))?;
        Ok(Arc::new(Backend { _view: Some(view), ..backend }))
    }

    /// This export, labeled as a backup job's point in time.
    pub fn at_backup_point(self, point: BackupPoint) -> Backend {
        Backend { point: Some(point), ..self }
    }

    /// The backup job's point in time this export is, if it is one.
    pub fn backup_point(&self) -> Option<&BackupPoint> {
        self.point.as_ref()
    }

    /// The image's checkpoints and the daemon that keeps them, or 409
    /// saying why this image has none.
    pub fn checkpoints(&self) -> ApiResult<(&Checkpoints, &Arc<OwnedImage>)> {
        match (&self.checkpoints, &self.owned) {
            (Ok(checkpoints), Some(owned)) => Ok((checkpoints, owned)),
            (Err(why), _) => Err(ApiError::Conflict(why.clone())),
            (Ok(_), None) => Err(ApiError::Internal("checkpoints without a daemon".into())),
        }
    }

    /// True if the image can hold checkpoints.
    pub fn supports_checkpoints(&self) -> bool {
        self.checkpoints.is_ok()
    }

    /// The image's path, or the URI: what restore records are kept for.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The image file's device and inode, or the URI: what writes and
    /// restores claim, the same through every path to one file.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The files the image links to: its backing chain and data files.
    pub fn linked_files(&self) -> &[std::path::PathBuf] {
        &self.linked_files
    }

    /// Where checkpoint and restore records live.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.settings.state_dir
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True if the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// True if the export describes the given metadata context.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|context| context == name)
    }

    /// The dirty bitmap context, when the image has one.
    pub fn dirty_context(&self) -> Option<&str> {
        self.dirty_context.as_deref()
    }

    /// The ticket's dirty bitmap, when it has one.
    pub fn bitmap(&self) -> Option<&str> {
        self.bitmap.as_deref()
    }

    /// A live connection, reconnecting a broken one.
    async fn client(&self) -> Result<Client, blockgate_nbd::Error> {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let cell = &self.slots[index];
        if let Some(client) = cell.live() {
            return Ok(client);
        }
        let _connecting = cell.connecting.lock().await;
        if let Some(client) = cell.live() {
            return Ok(client);
        }
        if let Some(closed) = cell.slot.lock().take() {
            self.notice_closed(&closed);
        }
        let daemon_exits = self.daemon_exits();
        let client = Client::connect(&self.address, &self.options).await?;
        if client.size() != self.size {
            return Err(blockgate_nbd::Error::Protocol(format!("the export changed size from {} to {} bytes", self.size, client.size())));
        }
        *cell.slot.lock() = Some(Slot { client: client.clone(), daemon_exits });
        Ok(client)
    }

    /// How often the owned daemon exited (0 for an NBD URI).
    fn daemon_exits(&self) -> u64 {
        self.owned.as_ref().map_or(0, |owned| owned.restarts())
    }

    /// Enters a closed connection in the ledger, unless a daemon exit
    /// that the ledger counted already explains it.
    fn notice_closed(&self, closed: &Slot) {
        self.notice_restart();
        if closed.daemon_exits == self.daemon_exits() {
            self.ledger.connection_broke();
        }
    }

    /// A live connection within the request timeout.
    async fn live_client(&self) -> Result<Client, blockgate_nbd::Error> {
        let timeout = self.request_timeout;
        tokio::time::timeout(timeout, self.client()).await.map_err(|_| blockgate_nbd::Error::TimedOut(timeout))?
    }

    /// Runs one NBD command on a live connection within the request
    /// timeout.
    async fn call<T>(&self, command: impl AsyncFnOnce(&Client) -> Result<T, blockgate_nbd::Error>) -> Result<T, blockgate_nbd::Error> {
        let client = self.live_client().await?;
        self.within_timeout(&client, command).await
    }

    /// Runs a write or zero command over `range` and enters it in the
    /// ledger once acknowledged, with the epoch it was sent in.
    async fn call_write(
        &self,
        range: Range<u64>,
        command: impl AsyncFnOnce(&Client) -> Result<(), blockgate_nbd::Error>,
    ) -> Result<(), blockgate_nbd::Error> {
        let client = self.live_client().await?;
        self.notice_restart();
        let epoch = self.ledger.epoch();
        self.within_timeout(&client, command).await?;
        self.ledger.acknowledged(epoch, range);
        Ok(())
    }

    /// Enters a restart of the owned daemon in the ledger, if one happened
    /// since the last look (its connections may not have seen EOF yet).
    fn notice_restart(&self) {
        let exits = self.daemon_exits();
        if self.restarts_seen.swap(exits, Ordering::SeqCst) != exits {
            self.ledger.connection_broke();
        }
    }

    /// Enters every connection that broke, and a daemon restart, in the
    /// ledger.
    async fn notice_breaks(&self) {
        self.notice_restart();
        for cell in &self.slots {
            // Taken out, so that one closed connection counts once.
            let closed = cell.slot.lock().take_if(|slot| slot.client.is_closed());
            if let Some(closed) = closed {
                self.notice_closed(&closed);
            }
        }
    }

    /// Runs `command` on `client` within the request timeout. A command
    /// that times out closes its connection (its late reply could only
    /// confuse the next one), so the next command opens a new one.
    async fn within_timeout<T>(
        &self,
        client: &Client,
        command: impl AsyncFnOnce(&Client) -> Result<T, blockgate_nbd::Error>,
    ) -> Result<T, blockgate_nbd::Error> {
        let timeout = self.request_timeout;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(timeout, command(client)).await;
        metrics().observe_nbd(started.elapsed(), !matches!(outcome, Ok(Ok(_))));
        match outcome {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(address = %self.address, "NBD request got no reply within {timeout:?}; replacing the connection");
                client.abort(&format!("no reply within {timeout:?}"));
                Err(blockgate_nbd::Error::TimedOut(timeout))
            }
        }
    }

    /// Reads a range (at most [`REQUEST_SIZE`] is best). A read that fails
    /// with EIO is tried once more before the failure is reported.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes, blockgate_nbd::Error> {
        let data = match self.call(async |client| client.read(offset, length).await).await {
            Err(blockgate_nbd::Error::Server { errno: EIO, message }) => {
                tracing::warn!(offset, length, message, "NBD read failed with EIO; trying once more");
                self.call(async |client| client.read(offset, length).await).await
            }
            result => result,
        }?;
        metrics().read_bytes.inc_by(data.len() as u64);
        Ok(data)
    }

    /// Writes a range.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), blockgate_nbd::Error> {
        let length = data.len() as u64;
        self.call_write(offset..offset.saturating_add(length), async |client| client.write(offset, data, false).await).await?;
        metrics().written_bytes.inc_by(length);
        Ok(())
    }

    /// Zeroes a range; with `may_deallocate` the export may punch a hole.
    pub async fn zero(&self, offset: u64, length: u64, may_deallocate: bool) -> Result<(), blockgate_nbd::Error> {
        let flags = ZeroFlags { no_hole: !may_deallocate, ..ZeroFlags::default() };
        self.call_write(offset..offset.saturating_add(length), async |client| client.write_zeroes(offset, length, flags).await).await?;
        metrics().zeroed_bytes.inc_by(length);
        Ok(())
    }

    /// True when writes acknowledged before a connection broke were never
    /// flushed and not written again since.
    pub async fn lost_writes(&self) -> bool {
        self.notice_breaks().await;
        self.ledger.has_lost()
    }

    /// Makes every acknowledged write stable, or fails with 502: when the
    /// NBD server fails the flush, or when writes acknowledged before a
    /// connection broke were never flushed and not written again since
    /// (however often the flush is retried).
    pub async fn flush(&self) -> ApiResult<()> {
        self.notice_breaks().await;
        let flushing = self.ledger.begin_flush()?;
        let flushed = self.flush_connections().await;
        self.notice_breaks().await;
        self.ledger.end_flush(flushing, flushed.is_ok())?;
        Ok(flushed?)
    }

    /// Flushes every open connection, so writes sent on any of them are
    /// stable whether or not the export offers CAN_MULTI_CONN.
    async fn flush_connections(&self) -> Result<(), blockgate_nbd::Error> {
        let multi_conn = self.call(async |client| client.flush().await.map(|()| client.info().has_flag(tflag::CAN_MULTI_CONN))).await?;
        if multi_conn {
            return Ok(());
        }
        for cell in &self.slots {
            if let Some(other) = cell.live() {
                self.within_timeout(&other, async |client| client.flush().await).await?;
            }
        }
        Ok(())
    }

    /// BLOCK_STATUS of every negotiated context from `offset`.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<BlockStatus, blockgate_nbd::Error> {
        self.call(async |client| client.block_status(offset, length).await).await
    }

    /// Closes the connections and stops the qemu-storage-daemon, if this
    /// backend owns one.
    pub async fn stop(&self) {
        for cell in &self.slots {
            let slot = cell.slot.lock().take();
            if let Some(slot) = slot {
                slot.client.disconnect().await;
            }
        }
        if let Some(owned) = &self.owned {
            owned.stop().await;
        }
    }
}
