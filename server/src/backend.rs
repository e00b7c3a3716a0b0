//! The storage behind a ticket: an NBD export (our own qemu-nbd child for a
//! local file, or a URI given to us) and a small pool of pipelined NBD
//! connections to it. A connection that breaks (qemu-nbd restarted, say) is
//! replaced on next use, so a client that retries after a 502 gets through.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use blockgate_nbd::qemu::{self, ExportSettings, QemuNbd};
use blockgate_nbd::{
    ALLOCATION_DEPTH, Address, BASE_ALLOCATION, BlockStatus, Client, ConnectOptions, DIRTY_BITMAP_PREFIX, ZeroFlags, wire::tflag,
};
use bytes::Bytes;

use crate::config::{ImageFormat, ImageSource, ImageSpec};

/// Largest single READ or WRITE the data routes issue. nbd.md measured
/// 256 KiB to 1 MiB as the best request sizes; 256 KiB was as fast as 1 MiB
/// here for a TLS download and keeps eight transfers' buffers near 16 MiB.
pub const REQUEST_SIZE: usize = 256 << 10;
/// NBD requests a single transfer keeps in flight.
pub const PIPELINE_DEPTH: usize = 8;

/// An NBD export and connections to it.
pub struct Backend {
    address: Address,
    options: ConnectOptions,
    slots: Vec<tokio::sync::Mutex<Option<Client>>>,
    next_slot: AtomicUsize,
    size: u64,
    read_only: bool,
    contexts: Vec<String>,
    dirty_context: Option<String>,
    child: tokio::sync::Mutex<Option<QemuNbd>>,
}

/// The one bitmap of a `dirty` image, or why there is not exactly one.
fn only_bitmap(mut names: Vec<String>, image: &str) -> Result<String> {
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => bail!("{image} has no dirty bitmap; add one (qemu-img bitmap --add) or drop dirty"),
        _ => bail!("{image} has several dirty bitmaps ({}); name one with bitmap=NAME", names.join(", ")),
    }
}

impl Backend {
    /// Opens the source of an `--image` spec: creates and exports a local
    /// file, or connects to a URI, and checks what the spec asks for.
    pub async fn open(spec: &ImageSpec, connections: u32) -> Result<Backend> {
        let mut bitmap = spec.bitmap.clone();
        let (address, child) = match &spec.source {
            ImageSource::Nbd(address) => (address.clone(), None),
            ImageSource::File(path) => {
                if !path.exists() {
                    let Some(size) = spec.create_size else {
                        bail!("image {} does not exist (add ,size=SIZE to create it)", path.display());
                    };
                    let format = spec.format.unwrap_or(if path.extension().is_some_and(|e| e == "qcow2") {
                        ImageFormat::Qcow2
                    } else {
                        ImageFormat::Raw
                    });
                    qemu::create_image(path, format.as_str(), size).await?;
                }
                let info = qemu::image_info(path).await?;
                let format = spec.format.map_or(info.format, |format| format.as_str().to_string());
                if spec.dirty && spec.bitmap.is_none() {
                    bitmap = Some(only_bitmap(info.bitmaps, &path.display().to_string())?);
                }
                let settings = ExportSettings {
                    path,
                    format: &format,
                    read_only: spec.read_only,
                    bitmap: bitmap.as_deref(),
                    shared: connections + 4,
                    direct: false,
                };
                let child = QemuNbd::start(&settings).await?;
                (Address::unix(child.socket(), ""), Some(child))
            }
        };
        if spec.dirty && bitmap.is_none() {
            let listing = ConnectOptions { list_meta_contexts: vec![DIRTY_BITMAP_PREFIX.to_string()], ..Default::default() };
            let probe = Client::connect(&address, &listing).await.with_context(|| format!("connecting to {address}"))?;
            let names =
                probe.info().listed_contexts.iter().filter_map(|c| c.strip_prefix(DIRTY_BITMAP_PREFIX)).map(str::to_string).collect();
            probe.disconnect().await;
            bitmap = Some(only_bitmap(names, &address.to_string())?);
        }
        let dirty_context = bitmap.as_ref().map(|name| format!("{DIRTY_BITMAP_PREFIX}{name}"));
        let mut wanted = vec![BASE_ALLOCATION.to_string(), ALLOCATION_DEPTH.to_string()];
        wanted.extend(dirty_context.clone());
        let options = ConnectOptions { meta_contexts: wanted, ..Default::default() };
        let first = Client::connect(&address, &options).await.with_context(|| format!("connecting to {address}"))?;
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
        let mut slots: Vec<_> = (1..connections).map(|_| tokio::sync::Mutex::new(None)).collect();
        slots.insert(0, tokio::sync::Mutex::new(Some(first)));
        Ok(Backend {
            address,
            options,
            slots,
            next_slot: AtomicUsize::new(0),
            size,
            read_only,
            contexts,
            dirty_context,
            child: tokio::sync::Mutex::new(child),
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

    /// Reads a range (at most [`REQUEST_SIZE`] is best).
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes, blockgate_nbd::Error> {
        self.client().await?.read(offset, length).await
    }

    /// Writes a range.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), blockgate_nbd::Error> {
        self.client().await?.write(offset, data, false).await
    }

    /// Zeroes a range; with `may_deallocate` the export may punch a hole.
    pub async fn zero(&self, offset: u64, length: u64, may_deallocate: bool) -> Result<(), blockgate_nbd::Error> {
        let flags = ZeroFlags { no_hole: !may_deallocate, ..ZeroFlags::default() };
        self.client().await?.write_zeroes(offset, length, flags).await
    }

    /// Flushes every open connection, so writes sent on any of them are
    /// stable whether or not the export offers CAN_MULTI_CONN.
    pub async fn flush(&self) -> Result<(), blockgate_nbd::Error> {
        let client = self.client().await?;
        client.flush().await?;
        if client.info().has_flag(tflag::CAN_MULTI_CONN) {
            return Ok(());
        }
        for slot in &self.slots {
            let other = slot.lock().await.clone();
            if let Some(other) = other.filter(|other| !other.is_closed()) {
                other.flush().await?;
            }
        }
        Ok(())
    }

    /// BLOCK_STATUS of every negotiated context from `offset`.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<BlockStatus, blockgate_nbd::Error> {
        self.client().await?.block_status(offset, length).await
    }

    /// Stops the qemu-nbd child, if this backend owns one.
    pub async fn stop(&self) {
        for slot in &self.slots {
            if let Some(client) = slot.lock().await.take() {
                client.disconnect().await;
            }
        }
        if let Some(child) = self.child.lock().await.take() {
            child.stop().await;
        }
    }
}
