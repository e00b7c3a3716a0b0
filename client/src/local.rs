//! A local image file, in the format the caller names (never probed from
//! its content): a raw file is read and written by this process itself
//! ([`raw_file`]), a qcow2 through a qemu-nbd child ([`nbd_image`]).
//! Downloaded bytes reach either in [`Piece`]s.
//! Either way a transfer sees the same few operations: its size, its data
//! and zero runs, positional reads, writes and zeroing, and a close that
//! puts what was written on stable storage.

mod nbd_image;
mod piece;
mod raw_file;

use std::path::Path;

use bytes::Bytes;

use crate::error::Result;
use nbd_image::NbdImage;
pub use piece::Piece;
use raw_file::RawFile;

/// A run of bytes that are all data or all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Reads as zeros.
    pub zero: bool,
}

/// A local raw or qcow2 image, open for a transfer.
pub struct LocalImage(Reached);

/// How a local image is reached.
enum Reached {
    /// A raw file, with positional I/O.
    Raw(RawFile),
    /// Any other format, through qemu-nbd.
    Nbd(Box<NbdImage>),
}

impl LocalImage {
    /// Creates `path` (`raw` or `qcow2`) of `size` bytes, readable by its
    /// owner only, and opens it; `path` must not exist.
    pub async fn create(path: &Path, format: &str, size: u64) -> Result<LocalImage> {
        Ok(LocalImage(match format {
            "raw" => Reached::Raw(RawFile::create(path, size).await?),
            _ => Reached::Nbd(Box::new(NbdImage::create(path, format, size).await?)),
        }))
    }

    /// Creates `path` as a qcow2 overlay of `backing` (a file the user
    /// named) and opens it.
    pub async fn create_overlay(path: &Path, backing: &Path) -> Result<LocalImage> {
        Ok(LocalImage(Reached::Nbd(Box::new(NbdImage::create_overlay(path, backing).await?))))
    }

    /// Opens an existing regular file or block device read-only as
    /// `format`, never as what its content looks like (a raw image holds
    /// whatever its guest wrote, a qcow2 header naming a host file as
    /// backing, say). A qcow2's backing and data files are followed only
    /// with `follow_links`, and then only directly in its own directory.
    pub async fn open_read_only(path: &Path, format: &str, follow_links: bool) -> Result<LocalImage> {
        Ok(LocalImage(match format {
            "raw" => Reached::Raw(RawFile::open(path).await?),
            _ => Reached::Nbd(Box::new(NbdImage::open_read_only(path, format, follow_links).await?)),
        }))
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        match &self.0 {
            Reached::Raw(raw) => raw.size(),
            Reached::Nbd(nbd) => nbd.size(),
        }
    }

    /// The data and zero runs of the whole image, in order, coalesced.
    pub async fn runs(&self) -> Result<Vec<Run>> {
        match &self.0 {
            Reached::Raw(raw) => raw.runs().await,
            Reached::Nbd(nbd) => nbd.runs().await,
        }
    }

    /// Reads a range.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        match &self.0 {
            Reached::Raw(raw) => raw.read(offset, length).await,
            Reached::Nbd(nbd) => nbd.read(offset, length).await,
        }
    }

    /// Writes `piece` at `offset`; gives it back emptied, for the next.
    pub async fn write(&self, offset: u64, mut piece: Piece) -> Result<Piece> {
        match &self.0 {
            Reached::Raw(raw) => piece = raw.write(offset, piece).await?,
            Reached::Nbd(nbd) => nbd.write(offset, Bytes::copy_from_slice(&piece)).await?,
        }
        piece.clear();
        Ok(piece)
    }

    /// Zeroes a range (may punch a hole).
    pub async fn zero(&self, offset: u64, length: u64) -> Result<()> {
        match &self.0 {
            Reached::Raw(raw) => raw.zero(offset, length).await,
            Reached::Nbd(nbd) => nbd.zero(offset, length).await,
        }
    }

    /// Puts what was written on stable storage and closes the image.
    pub async fn close(self) -> Result<()> {
        match self.0 {
            Reached::Raw(raw) => raw.close().await,
            Reached::Nbd(nbd) => nbd.close().await,
        }
    }
}
