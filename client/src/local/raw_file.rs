//! A local raw image read and written by this process itself, with
//! positional I/O: no qemu-nbd child, no NBD round trip, no copy through
//! a socket. Uploads read it through the page cache and find its data and
//! holes with `SEEK_DATA`/`SEEK_HOLE` (a block device is all data), so
//! holes travel as zero requests. Downloads create it sparse and write
//! each piece where it belongs with `O_DIRECT`, bypassing the page cache
//! (measured on 2 GiB: the kernel's copy into the cache and its writeback
//! cost more CPU and time than the whole direct write); a piece that is
//! not aligned, or a file system without `O_DIRECT` (tmpfs), goes through
//! the page cache. [`RawFile::close`] syncs the file to stable storage
//! (`fdatasync`) before anyone calls the copy complete. The blocking calls
//! run on tokio's blocking pool, never on the async workers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use nix::unistd::{Whence, lseek};

use super::{Piece, Run};
use crate::error::{ClientError, Result};

/// Most zeros written at once where a hole cannot be punched.
const ZEROS: usize = 1 << 20;

/// An open raw image: its file, the same file opened for direct writes
/// (a new file where the file system allows it), its path (for
/// messages) and its size.
#[derive(Clone)]
pub struct RawFile {
    file: Arc<File>,
    direct: Option<Arc<File>>,
    path: Arc<PathBuf>,
    size: u64,
    writable: bool,
}

impl RawFile {
    /// Creates `path` (it must not exist) with mode 0600 whatever the
    /// umask, `size` bytes long, all a hole.
    pub async fn create(path: &Path, size: u64) -> Result<RawFile> {
        let path = Arc::new(path.to_path_buf());
        let made = path.clone();
        blocking(move || {
            // Past i64::MAX set_len's own error says only "out of range
            // integral type conversion attempted".
            if i64::try_from(size).is_err() {
                return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, format!("{size} bytes are more than a file can hold")));
            }
            let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&*made)?;
            if let Err(error) = file.set_len(size) {
                let _ = std::fs::remove_file(&*made);
                return Err(error);
            }
            let direct = reopened_direct(&file);
            Ok(RawFile { file: Arc::new(file), direct: direct.map(Arc::new), path: made, size, writable: true })
        })
        .await
        .map_err(|error| named(error, format!("creating {}", path.display())))
    }

    /// Opens `path` read-only, only if it is a regular file or a block
    /// device (a FIFO would block the reader forever), without blocking
    /// on the open.
    pub async fn open(path: &Path) -> Result<RawFile> {
        let path = Arc::new(path.to_path_buf());
        let opened = path.clone();
        blocking(move || {
            let mut file = blockgate_nbd::qemu::open_image_file(&opened)?;
            // A block device's metadata says 0 bytes; its end says more.
            let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
            Ok(RawFile { file: Arc::new(file), direct: None, path: opened, size, writable: false })
        })
        .await
        .map_err(|error| named(error, format!("opening {}", path.display())))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The data and zero runs of the whole file, in order: holes read as
    /// zeros, the rest is data (a block device, or a file system without
    /// `SEEK_DATA`, is all data).
    pub async fn runs(&self) -> Result<Vec<Run>> {
        let this = self.clone();
        self.run(move || {
            let mut runs = Vec::new();
            let mut offset = 0;
            while offset < this.size {
                let data = this.seek(offset, Whence::SeekData)?;
                if data > offset {
                    runs.push(Run { start: offset, length: data - offset, zero: true });
                }
                if data == this.size {
                    break;
                }
                let hole = this.seek(data, Whence::SeekHole)?;
                runs.push(Run { start: data, length: hole - data, zero: false });
                offset = hole;
            }
            // A file that shrank reads as a hole past its new end: those
            // bytes would be sent as zeros, the upload called complete.
            let end = lseek(this.file.as_raw_fd(), 0, Whence::SeekEnd)? as u64;
            if end < this.size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("it ends at byte {end} of {}: did it shrink while it was read?", this.size),
                ));
            }
            Ok(runs)
        })
        .await
    }

    /// Where the next data or hole at or after `offset` starts, within the
    /// size (no more data: the size).
    fn seek(&self, offset: u64, whence: Whence) -> std::io::Result<u64> {
        match lseek(self.file.as_raw_fd(), offset as i64, whence) {
            Ok(found) => Ok((found as u64).clamp(offset, self.size)),
            Err(Errno::ENXIO) => Ok(self.size),
            Err(Errno::EINVAL) if matches!(whence, Whence::SeekData) => Ok(offset),
            Err(Errno::EINVAL) => Ok(self.size),
            Err(error) => Err(error.into()),
        }
    }

    /// Reads `length` bytes at `offset`; a file that ends before them (it
    /// shrank since it was opened) is an error, never zeros.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        let this = self.clone();
        self.run(move || {
            let mut buffer = vec![0; length];
            match this.file.read_exact_at(&mut buffer, offset) {
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(std::io::Error::new(
                    error.kind(),
                    format!("it ends before byte {} of {}: did it shrink while it was read?", offset + length as u64, this.size),
                )),
                read => read.map(|()| Bytes::from(buffer)),
            }
        })
        .await
    }

    /// Writes `piece` at `offset`, directly if it is aligned; gives it back.
    pub async fn write(&self, offset: u64, piece: Piece) -> Result<Piece> {
        let this = self.clone();
        self.run(move || {
            let file = this.direct.as_ref().filter(|_| piece.is_aligned_at(offset)).unwrap_or(&this.file);
            file.write_all_at(&piece, offset).map(|()| piece)
        })
        .await
    }

    /// Zeroes `length` bytes at `offset`: punches a hole, or writes zeros
    /// where holes cannot be punched.
    pub async fn zero(&self, offset: u64, length: u64) -> Result<()> {
        let this = self.clone();
        self.run(move || {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match nix::fcntl::fallocate(this.file.as_raw_fd(), punch, offset as i64, length as i64) {
                Ok(()) => return Ok(()),
                Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => {}
                Err(error) => return Err(error.into()),
            }
            let zeros = vec![0; ZEROS.min(length as usize)];
            let end = offset + length;
            for at in (offset..end).step_by(ZEROS) {
                this.file.write_all_at(&zeros[..(end - at).min(ZEROS as u64) as usize], at)?;
            }
            Ok(())
        })
        .await
    }

    /// Syncs what was written to stable storage (`fdatasync`); a file
    /// opened read-only only closes.
    pub async fn close(self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let this = self.clone();
        self.run(move || this.file.sync_data()).await
    }

    /// Runs blocking file I/O off the async workers; an error names the file.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T> {
        blocking(work).await.map_err(|error| named(error, self.path.display().to_string()))
    }
}

/// `file` opened again (the same inode, through /proc/self/fd) for
/// writes that bypass the page cache, or `None` where that cannot be: a
/// file system that refuses `O_DIRECT` (EINVAL), no /proc (a chroot or
/// a sandbox without it: ENOENT). Either way the page cache still works.
fn reopened_direct(file: &File) -> Option<File> {
    let reopened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()));
    match reopened {
        Ok(direct) => Some(direct),
        Err(error) => {
            tracing::warn!(%error, "no direct I/O; writing through the page cache");
            None
        }
    }
}

/// `error` after what it happened to (a file, what was done to it).
fn named(error: std::io::Error, context: String) -> ClientError {
    ClientError::Io(std::io::Error::new(error.kind(), format!("{context}: {error}")))
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A piece of `length` bytes of `byte`.
    fn piece(byte: u8, length: usize) -> Piece {
        let mut piece = Piece::new(length);
        assert_eq!(piece.fill(&vec![byte; length]), length);
        piece
    }

    #[tokio::test]
    async fn written_pieces_aligned_or_not_zeroed_ranges_and_holes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let size = 3 << 20;
        let raw = RawFile::create(&path, size).await.unwrap();
        assert!(RawFile::create(&path, size).await.is_err(), "an existing file is never replaced");
        raw.write(0, piece(1, 1 << 20)).await.unwrap();
        // An unaligned tail: through the page cache.
        raw.write(size - 100, piece(2, 100)).await.unwrap();
        raw.zero(4096, 8192).await.unwrap();
        raw.close().await.unwrap();

        let raw = RawFile::open(&path).await.unwrap();
        assert_eq!(raw.size(), size);
        let mut expected = vec![0u8; size as usize];
        expected[..1 << 20].fill(1);
        expected[4096..12288].fill(0);
        expected[size as usize - 100..].fill(2);
        assert!(raw.read(0, size as usize).await.unwrap() == expected);
        let runs = raw.runs().await.unwrap();
        assert_eq!(runs.first(), Some(&Run { start: 0, length: 4096, zero: false }), "{runs:?}");
        assert!(
            runs.iter().any(|run| run.zero && run.start <= 4096 && run.start + run.length >= 12288),
            "the zeroed range is a hole: {runs:?}"
        );
        assert_eq!(runs.iter().map(|run| run.length).sum::<u64>(), size, "the runs cover the file: {runs:?}");
        let error = raw.read(size - 10, 20).await.unwrap_err().to_string();
        assert!(error.contains("disk.raw") && error.contains("did it shrink"), "{error}");
    }

    #[tokio::test]
    async fn a_file_that_shrank_after_it_was_opened_is_an_error_not_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let raw = RawFile::open(&path).await.unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let error = raw.runs().await.map(|runs| format!("{runs:?}")).unwrap_err().to_string();
        assert!(error.contains("disk.raw") && error.contains("did it shrink"), "{error}");
    }
}
