//! The storage behind a ticket: an NBD export (our own supervised
//! qemu-nbd child for a local file, or a URI given to us) and a small pool
//! of pipelined NBD connections to it. A connection that breaks (qemu-nbd
//! restarted, say) is replaced on next use, so a client that retries after
//! a 502 gets through. Every request has a deadline: a frozen NBD server
//! costs a 502 and a new connection, never a request that hangs forever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blockgate_nbd::qemu;
use blockgate_nbd::{
    ALLOCATION_DEPTH, Address, BASE_ALLOCATION, BlockStatus, Client, ConnectOptions, DIRTY_BITMAP_PREFIX, ZeroFlags, wire::tflag,
};
use bytes::Bytes;

use crate::config::{ImageFormat, ImageSource, ImageSpec};
use crate::owned::{OwnedExport, OwnedSettings};

/// Largest single READ or WRITE the data routes issue. nbd.md measured
/// 256 KiB to 1 MiB as the best request sizes; 256 KiB was as fast as 1 MiB
/// here for a TLS download and keeps eight transfers' buffers near 16 MiB.
pub const REQUEST_SIZE: usize = 256 << 10;
/// NBD requests a single transfer keeps in flight.
pub const PIPELINE_DEPTH: usize = 8;
/// errno of an I/O error, the one failure worth a second read: a flaky
/// disk or network block device often succeeds the next time.
const EIO: u32 = 5;

/// How the server reaches its images.
#[derive(Debug, Clone, Copy)]
pub struct BackendSettings {
    /// NBD connections per image.
    pub connections: u32,
    /// Longest wait for one NBD request's reply (or a connection).
    pub request_timeout: Duration,
}

/// An NBD export and connections to it.
pub struct Backend {
    address: Address,
    options: ConnectOptions,
    slots: Vec<tokio::sync::Mutex<Option<Client>>>,
    next_slot: AtomicUsize,
    request_timeout: Duration,
    size: u64,
    read_only: bool,
    contexts: Vec<String>,
    dirty_context: Option<String>,
    owned: Option<OwnedExport>,
}

/// The one bitmap of a `dirty` image, or why there is not exactly one.
fn only_bitmap(mut names: Vec<String>, image: &str) -> Result<String> {
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => bail!("{image} has no dirty bitmap; add one (qemu-img bitmap --add) or drop dirty"),
        _ => bail!("{image} has several dirty bitmaps ({}); name one with bitmap=NAME", names.join(", ")),
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
fn warn_if_content_differs(path: &std::path::Path, format: ImageFormat) {
    match qemu::sniff_format(path) {
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
        let mut bitmap = spec.bitmap.clone();
        let (address, owned) = match &spec.source {
            ImageSource::Nbd(address) => (address.clone(), None),
            ImageSource::File(path) => {
                let format = file_format(spec, path);
                match (path.exists(), spec.create_size) {
                    (true, _) => warn_if_content_differs(path, format),
                    (false, Some(size)) => qemu::create_image(path, format.as_str(), size).await?,
                    (false, None) => bail!("{} does not exist", path.display()),
                }
                let info = qemu::image_info(path, Some(format.as_str())).await?;
                if spec.dirty && spec.bitmap.is_none() {
                    bitmap = Some(only_bitmap(info.bitmaps, &path.display().to_string())?);
                }
                let owned = OwnedExport::start(OwnedSettings {
                    path: path.clone(),
                    format,
                    read_only: spec.read_only,
                    bitmap: bitmap.clone(),
                    shared: settings.connections + 4,
                })
                .await?;
                (Address::unix(owned.socket(), ""), Some(owned))
            }
        };
        let opened = Self::connect(spec, settings, address, bitmap, owned.as_ref()).await;
        match (opened, owned) {
            (Ok(backend), owned) => Ok(Backend { owned, ..backend }),
            (Err(error), Some(owned)) => {
                owned.stop().await;
                Err(error)
            }
            (Err(error), None) => Err(error),
        }
    }

    /// Negotiates the first connection and learns the export's size,
    /// flags and contexts.
    async fn connect(
        spec: &ImageSpec,
        settings: BackendSettings,
        address: Address,
        mut bitmap: Option<String>,
        owned: Option<&OwnedExport>,
    ) -> Result<Backend> {
        let connect = async |options: &ConnectOptions| {
            tokio::time::timeout(settings.request_timeout, Client::connect(&address, options))
                .await
                .map_err(|_| blockgate_nbd::Error::TimedOut(settings.request_timeout))?
                .with_context(|| format!("connecting to {address}"))
        };
        if spec.dirty && bitmap.is_none() && owned.is_none() {
            let listing = ConnectOptions { list_meta_contexts: vec![DIRTY_BITMAP_PREFIX.to_string()], ..Default::default() };
            let probe = connect(&listing).await?;
            let names =
                probe.info().listed_contexts.iter().filter_map(|c| c.strip_prefix(DIRTY_BITMAP_PREFIX)).map(str::to_string).collect();
            probe.disconnect().await;
            bitmap = Some(only_bitmap(names, &address.to_string())?);
        }
        let dirty_context = bitmap.as_ref().map(|name| format!("{DIRTY_BITMAP_PREFIX}{name}"));
        let mut wanted = vec![BASE_ALLOCATION.to_string(), ALLOCATION_DEPTH.to_string()];
        wanted.extend(dirty_context.clone());
        let options = ConnectOptions { meta_contexts: wanted, ..Default::default() };
        let first = connect(&options).await?;
        let contexts: Vec<String> = first.info().contexts.iter().map(|(_, name)| name.clone()).collect();
        if let (Some(context), Some(name)) = (&dirty_context, &bitmap) {
            if !contexts.contains(context) {
                bail!("the NBD export {address} has no dirty bitmap {name:?} (is it exported with -B {name}?)");
            }
        }
        let read_only = first.is_read_only();
        if read_only && !spec.read_only {
            bail!("the NBD export {address} is read-only; add ,ro to the image spec");
        }
        let size = first.size();
        let mut slots: Vec<_> = (1..settings.connections).map(|_| tokio::sync::Mutex::new(None)).collect();
        slots.insert(0, tokio::sync::Mutex::new(Some(first)));
        Ok(Backend {
            address,
            options,
            slots,
            next_slot: AtomicUsize::new(0),
            request_timeout: settings.request_timeout,
            size,
            read_only,
            contexts,
            dirty_context,
            owned: None,
        })
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

    /// The dirty bitmap's name, when the image has one.
    pub fn bitmap(&self) -> Option<&str> {
        self.dirty_context.as_deref().and_then(|context| context.strip_prefix(DIRTY_BITMAP_PREFIX))
    }

    /// A live connection, reconnecting a broken one.
    async fn client(&self) -> Result<Client, blockgate_nbd::Error> {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[index].lock().await;
        if let Some(client) = slot.as_ref().filter(|client| !client.is_closed()) {
            return Ok(client.clone());
        }
        let client = Client::connect(&self.address, &self.options).await?;
        if client.size() != self.size {
            return Err(blockgate_nbd::Error::Protocol(format!("the export changed size from {} to {} bytes", self.size, client.size())));
        }
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs one NBD command on a live connection within the request
    /// timeout.
    async fn call<T>(&self, command: impl AsyncFnOnce(&Client) -> Result<T, blockgate_nbd::Error>) -> Result<T, blockgate_nbd::Error> {
        let timeout = self.request_timeout;
        let client = tokio::time::timeout(timeout, self.client()).await.map_err(|_| blockgate_nbd::Error::TimedOut(timeout))??;
        self.within_timeout(&client, command).await
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
        match tokio::time::timeout(timeout, command(client)).await {
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
        match self.call(async |client| client.read(offset, length).await).await {
            Err(blockgate_nbd::Error::Server { errno: EIO, message }) => {
                tracing::warn!(offset, length, message, "NBD read failed with EIO; trying once more");
                self.call(async |client| client.read(offset, length).await).await
            }
            result => result,
        }
    }

    /// Writes a range.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), blockgate_nbd::Error> {
        self.call(async |client| client.write(offset, data, false).await).await
    }

    /// Zeroes a range; with `may_deallocate` the export may punch a hole.
    pub async fn zero(&self, offset: u64, length: u64, may_deallocate: bool) -> Result<(), blockgate_nbd::Error> {
        let flags = ZeroFlags { no_hole: !may_deallocate, ..ZeroFlags::default() };
        self.call(async |client| client.write_zeroes(offset, length, flags).await).await
    }

    /// Flushes every open connection, so writes sent on any of them are
    /// stable whether or not the export offers CAN_MULTI_CONN.
    pub async fn flush(&self) -> Result<(), blockgate_nbd::Error> {
        let multi_conn = self.call(async |client| client.flush().await.map(|()| client.info().has_flag(tflag::CAN_MULTI_CONN))).await?;
        if multi_conn {
            return Ok(());
        }
        for slot in &self.slots {
            let other = slot.lock().await.clone();
            if let Some(other) = other.filter(|other| !other.is_closed()) {
                self.within_timeout(&other, async |client| client.flush().await).await?;
            }
        }
        Ok(())
    }

    /// BLOCK_STATUS of every negotiated context from `offset`.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<BlockStatus, blockgate_nbd::Error> {
        self.call(async |client| client.block_status(offset, length).await).await
    }

    /// Times the owned NBD server was restarted after dying.
    pub fn restarts(&self) -> u64 {
        self.owned.as_ref().map_or(0, OwnedExport::restarts)
    }

    /// Closes the connections and stops the qemu-nbd child, if this
    /// backend owns one.
    pub async fn stop(&self) {
        for slot in &self.slots {
            if let Some(client) = slot.lock().await.take() {
                client.disconnect().await;
            }
        }
        if let Some(owned) = &self.owned {
            owned.stop().await;
        }
    }
}
