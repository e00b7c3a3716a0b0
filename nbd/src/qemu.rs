//! qemu's tools for local images: `qemu-img` to create and inspect files,
//! and a qemu-nbd child exporting one on a private unix socket
//! (`-t -e N --discard=unmap -A`, `-B` for a bitmap), started without
//! `--fork` so its owner can wait for it and reap it, and stopped with
//! SIGTERM so qcow2 metadata and persistent bitmaps are written back
//! cleanly. The server uses it for `--image FILE`; the CLI for local files
//! of any format.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A failure of qemu-img or qemu-nbd, with what they said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QemuError(String);

type Result<T> = std::result::Result<T, QemuError>;

fn failed(message: impl Into<String>) -> QemuError {
    QemuError(message.into())
}

/// How long qemu-nbd may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long qemu-nbd may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What qemu-nbd should export and how.
#[derive(Debug, Clone)]
pub struct ExportSettings<'a> {
    /// Image file.
    pub path: &'a Path,
    /// Format of the file.
    pub format: &'a str,
    /// Export read-only.
    pub read_only: bool,
    /// Persistent bitmap to export.
    pub bitmap: Option<&'a str>,
    /// Number of client connections to allow (`-e`).
    pub shared: u32,
    /// Bypass the page cache (`--cache=none --aio=native`): for writing
    /// a new file, where filling the page cache costs more than the disk.
    pub direct: bool,
}

/// A running qemu-nbd child and the private directory of its socket. The
/// child can be started again on the same socket ([`QemuNbd::respawn`]),
/// so connections made after a restart find it where they left it.
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    _socket_dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Starts qemu-nbd on a new private socket and waits until it accepts
    /// connections.
    pub async fn start(settings: &ExportSettings<'_>) -> Result<QemuNbd> {
        let socket_dir = tempfile::Builder::new()
            .prefix("blockgate-nbd-")
            .tempdir()
            .map_err(|error| failed(format!("creating a socket directory: {error}")))?;
        let socket = socket_dir.path().join("nbd.sock");
        let child = spawn(settings, &socket).await?;
        Ok(QemuNbd { child, socket, _socket_dir: socket_dir })
    }

    /// Starts a new child on the same socket, after the last one exited.
    pub async fn respawn(&mut self, settings: &ExportSettings<'_>) -> Result<()> {
        // qemu-nbd will not bind over the dead child's socket file.
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(settings, &self.socket).await?;
        Ok(())
    }

    /// The unix socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until the child exits (and reaps it).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Stops qemu-nbd: SIGTERM, then SIGKILL if it lingers.
    pub async fn stop(mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await.is_ok() {
                tracing::info!(socket = %self.socket.display(), "qemu-nbd stopped");
                return;
            }
            tracing::warn!("qemu-nbd ignored SIGTERM; killing it");
        }
        let _ = self.child.kill().await;
    }
}

/// Starts qemu-nbd on `socket` and waits until it accepts connections.
async fn spawn(settings: &ExportSettings<'_>, socket: &Path) -> Result<Child> {
    let mut command = Command::new("qemu-nbd");
    command
        .arg("--persistent")
        .arg(format!("--shared={}", settings.shared))
        .arg("--discard=unmap")
        .arg("--allocation-depth")
        .args(["--format", settings.format, "--socket"])
        .arg(socket);
    if settings.read_only {
        command.arg("--read-only");
    }
    if let Some(bitmap) = settings.bitmap {
        command.args(["--bitmap", bitmap]);
    }
    if settings.direct {
        command.args(["--cache=none", "--aio=native"]);
    }
    command.arg(settings.path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().map_err(|error| failed(format!("starting qemu-nbd (is qemu-utils installed?): {error}")))?;
    let stderr_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    if let Some(stderr) = child.stderr.take() {
        let lines = stderr_lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                tracing::warn!(target: "qemu-nbd", "{line}");
                lines.lock().unwrap_or_else(PoisonError::into_inner).push(line);
            }
        });
    }
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            break;
        }
        if let Some(status) = child.try_wait().map_err(|error| failed(error.to_string()))? {
            // Let the stderr task catch the last words.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let said = stderr_lines.lock().unwrap_or_else(PoisonError::into_inner).join("; ");
            return Err(failed(format!("qemu-nbd exited ({status}) while exporting {}: {said}", settings.path.display())));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(failed(format!("qemu-nbd did not open its socket within {START_TIMEOUT:?}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(image = %settings.path.display(), socket = %socket.display(), "qemu-nbd started");
    Ok(child)
}

/// Creates an image file with qemu-img, readable by its owner only (disk
/// images hold whatever the guest wrote): the file is made with mode 0600
/// first, so it is never readable by others, not even for a moment, and
/// an existing file is never overwritten.
pub async fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    create_private(path)?;
    let created = qemu_img(&["create", "-q", "-f", format, &path.to_string_lossy(), &size.to_string()]).await;
    if let Err(error) = created {
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    tracing::info!(image = %path.display(), format, size, "created image");
    Ok(())
}

/// Creates a qcow2 overlay on top of `backing` (a qcow2 image): reads of
/// ranges never written come from the backing file.
///
/// The backing file is recorded relative to the overlay's directory, as
/// qemu-img does when given a relative path, so a backup directory can be
/// moved or restored elsewhere without breaking its chain.
pub async fn create_overlay(path: &Path, backing: &Path) -> Result<()> {
    let real = |path: &Path| std::fs::canonicalize(path).map_err(|error| failed(format!("{}: {error}", path.display())));
    let backing = real(backing)?;
    let absolute = std::path::absolute(path).map_err(|error| failed(error.to_string()))?;
    let directory = real(absolute.parent().unwrap_or(Path::new("/")))?;
    let backing = relative_path(&backing, &directory);
    create_private(path)?;
    let created =
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing.to_string_lossy(), &path.to_string_lossy()]).await;
    if created.is_err() {
        let _ = std::fs::remove_file(path);
    }
    created.map(drop)
}

/// `target` as seen from `base` (both absolute and resolved).
fn relative_path(target: &Path, base: &Path) -> PathBuf {
    let (target, base): (Vec<_>, Vec<_>) = (target.components().collect(), base.components().collect());
    let shared = target.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut relative: PathBuf = base[shared..].iter().map(|_| std::path::Component::ParentDir).collect();
    relative.extend(&target[shared..]);
    relative
}

/// Creates an empty file with mode 0600; fails if it exists.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|error| failed(format!("creating {}: {error}", path.display())))
}

/// Runs qemu-img; its stdout.
async fn qemu_img(args: &[&str]) -> Result<Vec<u8>> {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|error| failed(format!("running qemu-img (is qemu-utils installed?): {error}")))?;
    if !output.status.success() {
        return Err(failed(format!("qemu-img {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim())));
    }
    Ok(output.stdout)
}

/// What `qemu-img info` says of a file.
pub struct ImageInfo {
    /// The format it was opened with (detected when none was given).
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Names of its persistent dirty bitmaps (qcow2).
    pub bitmaps: Vec<String>,
}

/// Asks `qemu-img info` about a file (works while the file is exported),
/// opened as `format`, or as whatever its content looks like when `None`:
/// only for files whose content the caller trusts.
pub async fn image_info(path: &Path, format: Option<&str>) -> Result<ImageInfo> {
    let path_text = path.to_string_lossy();
    let mut args = vec!["info", "-U", "--output=json"];
    if let Some(format) = format {
        args.extend(["-f", format]);
    }
    args.push(&path_text);
    let output = qemu_img(&args).await?;
    let info: serde_json::Value = serde_json::from_slice(&output).map_err(|error| failed(format!("parsing qemu-img info: {error}")))?;
    let format = info["format"].as_str().map(str::to_string).ok_or_else(|| failed("qemu-img info gave no format"))?;
    let size = info["virtual-size"].as_u64().ok_or_else(|| failed("qemu-img info gave no virtual-size"))?;
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|bitmaps| bitmaps.iter().filter_map(|bitmap| bitmap["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    Ok(ImageInfo { format, size, bitmaps })
}

/// Magic numbers at offset 0 of image formats qemu would probe.
const MAGICS: &[(&[u8], &str)] =
    &[(b"QFI\xfb", "qcow2"), (b"QED\0", "qed"), (b"KDMV", "vmdk"), (b"vhdxfile", "vhdx"), (b"LUKS\xba\xbe", "luks")];

/// The format a file's first bytes announce, if any, read here without
/// asking qemu to open it (a forged header names any host file as its
/// backing or data file).
pub fn sniff_format(path: &Path) -> std::io::Result<Option<&'static str>> {
    use std::io::Read;
    let mut head = [0u8; 8];
    let mut file = std::fs::File::open(path)?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..])? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(MAGICS.iter().find(|(magic, _)| head[..filled].starts_with(magic)).map(|(_, name)| *name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_walk_up_then_down() {
        let cases = [
            ("/b/full.qcow2", "/b", "full.qcow2"),
            ("/b/full.qcow2", "/b/inc", "../full.qcow2"),
            ("/b/x/full.qcow2", "/b/y/z", "../../x/full.qcow2"),
            ("/full.qcow2", "/b", "../full.qcow2"),
        ];
        for (target, base, expected) in cases {
            assert_eq!(relative_path(Path::new(target), Path::new(base)), PathBuf::from(expected), "{target} from {base}");
        }
    }
}
