//! A local image in a format qemu must read (qcow2), reached the way
//! imageio's client does it: through a qemu-nbd child on a private socket
//! and our NBD client. Downloads create the file (or a qcow2 overlay on
//! the previous backup); uploads open it read-only in the format they are
//! told (never probed) and list its data and zero ranges so holes travel
//! as zero requests, not bytes.

use std::path::Path;

use blockgate_nbd::allocation;
use blockgate_nbd::qcow2::{self, LinkPolicy};
use blockgate_nbd::qemu::{self, ExportSettings, QemuNbd};
use blockgate_nbd::{Address, BASE_ALLOCATION, Client, ConnectOptions, ZeroFlags};
use bytes::Bytes;

use super::Run;
use crate::error::Result;

/// Local connections to the child; the transfer pipelines on them.
const CONNECTIONS: u32 = 4;

/// A local image exported by our own qemu-nbd.
pub struct NbdImage {
    qemu: QemuNbd,
    nbd: Client,
}

/// The links of a file this program made: its own, or the `--backing`
/// the user named, and that file's chain.
fn made_here() -> LinkPolicy {
    LinkPolicy { anywhere: true, ..LinkPolicy::default() }
}

impl NbdImage {
    /// Creates `path` (`raw` or `qcow2`) of `size` bytes and opens it.
    pub async fn create(path: &Path, format: &str, size: u64) -> Result<NbdImage> {
        qemu::create_image(path, format, size).await?;
        Self::open(path, format, false, made_here()).await
    }

    /// Creates `path` as a qcow2 overlay of `backing` (a file the user
    /// named) and opens it.
    pub async fn create_overlay(path: &Path, backing: &Path) -> Result<NbdImage> {
        qemu::create_overlay(path, backing).await?;
        Self::open(path, "qcow2", false, made_here()).await
    }

    /// Opens an existing file read-only as `format`, never as what its
    /// content looks like: a raw image holds whatever its guest wrote, a
    /// qcow2 header naming a host file as backing, say. A qcow2 that names
    /// a backing or data file is refused unless `follow_links`, and then
    /// they are followed only directly in its own directory (as `blockgate
    /// download` makes a chain), never to a hidden file.
    pub async fn open_read_only(path: &Path, format: &str, follow_links: bool) -> Result<NbdImage> {
        let real = std::fs::canonicalize(path).map_err(|error| qemu::QemuError::new(format!("{}: {error}", path.display())))?;
        let directories = if follow_links { real.parent().map(Path::to_path_buf).into_iter().collect() } else { Vec::new() };
        let rule = if follow_links {
            "with --follow-links, only directly in the image's own directory, never to a hidden file"
        } else {
            "a local qcow2's backing and data files are followed only with --follow-links"
        };
        Self::open(&real, format, true, LinkPolicy { directories, rule, ..LinkPolicy::default() }).await
    }

    /// Opens `path`, following its links where `policy` allows.
    async fn open(path: &Path, format: &str, read_only: bool, policy: LinkPolicy) -> Result<NbdImage> {
        let path = std::fs::canonicalize(path).map_err(|error| qemu::QemuError::new(format!("{}: {error}", path.display())))?;
        let format = format.to_string();
        let chain = tokio::task::spawn_blocking(move || qcow2::resolve(&path, &format, &policy))
            .await
            .map_err(|error| qemu::QemuError::new(error.to_string()))??;
        // A file being written bypasses the page cache: on the machines
        // measured, filling the cache with a new file cost more CPU than
        // the whole network transfer. Filesystems without O_DIRECT (tmpfs)
        // get the page cache after all.
        let mut settings = ExportSettings { image: &chain.image, read_only, bitmap: None, shared: CONNECTIONS, direct: !read_only };
        let qemu = match QemuNbd::start(&settings).await {
            Ok(qemu) => qemu,
            Err(error) if settings.direct => {
                tracing::warn!(%error, "direct I/O refused; using the page cache");
                settings.direct = false;
                QemuNbd::start(&settings).await?
            }
            Err(error) => return Err(error.into()),
        };
        let options = ConnectOptions { meta_contexts: vec![BASE_ALLOCATION.to_string()], ..Default::default() };
        let nbd = Client::connect(&Address::unix(qemu.socket(), ""), &options).await?;
        Ok(NbdImage { qemu, nbd })
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.nbd.size()
    }

    /// The data and zero runs of the whole image, in order, coalesced.
    pub async fn runs(&self) -> Result<Vec<Run>> {
        let mut runs: Vec<Run> = Vec::new();
        let mut offset = 0;
        while offset < self.size() {
            let status = self.nbd.block_status(offset, self.size() - offset).await?;
            for piece in allocation::pieces(&status, None)? {
                match runs.last_mut() {
                    Some(last) if last.zero == piece.state.zero => last.length += piece.length,
                    _ => runs.push(Run { start: piece.start, length: piece.length, zero: piece.state.zero }),
                }
                offset = piece.start + piece.length;
            }
        }
        Ok(runs)
    }

    /// Reads a range.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        Ok(self.nbd.read(offset, length).await?)
    }

    /// Writes a range.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        Ok(self.nbd.write(offset, data, false).await?)
    }

    /// Zeroes a range (may punch a hole).
    pub async fn zero(&self, offset: u64, length: u64) -> Result<()> {
        Ok(self.nbd.write_zeroes(offset, length, ZeroFlags::default()).await?)
    }

    /// Flushes and stops qemu-nbd (read-only images only stop).
    pub async fn close(self) -> Result<()> {
        if !self.nbd.is_read_only() {
            self.nbd.flush().await?;
        }
        self.nbd.disconnect().await;
        self.qemu.stop().await;
        Ok(())
    }
}
