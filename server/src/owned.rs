//! The NBD server blockgate owns for a local image: a qemu-nbd child on a
//! private socket, opened with an explicit format, and a task that watches
//! it. When the child dies (killed, crashed) the task reaps it at once, so
//! no zombie is left, and starts it again on the same socket, waiting
//! longer after each failed start, until the image is released. Requests
//! that were in flight get 502; the backend reconnects on the next one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockgate_nbd::qemu::{ExportSettings, QemuError, QemuNbd};
use blockgate_protocol::ticket::ImageFormat;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// First wait before a restart; it doubles after each failed start.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between two starts.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A child that ran this long was healthy: the next restart is quick again.
const STABLE: Duration = Duration::from_secs(60);

/// What the child exports and how.
#[derive(Debug, Clone)]
pub struct OwnedSettings {
    /// Image file.
    pub path: PathBuf,
    /// Its format, never probed.
    pub format: ImageFormat,
    /// Export read-only.
    pub read_only: bool,
    /// Persistent bitmap to export.
    pub bitmap: Option<String>,
    /// Client connections the child accepts.
    pub shared: u32,
}

impl OwnedSettings {
    fn export(&self) -> ExportSettings<'_> {
        ExportSettings {
            path: &self.path,
            format: self.format.as_str(),
            read_only: self.read_only,
            bitmap: self.bitmap.as_deref(),
            shared: self.shared,
            direct: false,
        }
    }
}

/// A supervised qemu-nbd child.
pub struct OwnedExport {
    socket: PathBuf,
    stop: CancellationToken,
    supervisor: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    restarts: Arc<AtomicU64>,
}

impl OwnedExport {
    /// Starts the child and its watcher.
    pub async fn start(settings: OwnedSettings) -> Result<OwnedExport, QemuError> {
        let child = QemuNbd::start(&settings.export()).await?;
        let socket = child.socket().to_path_buf();
        let stop = CancellationToken::new();
        let restarts = Arc::new(AtomicU64::new(0));
        let supervisor = tokio::spawn(supervise(child, settings, stop.clone(), restarts.clone()));
        Ok(OwnedExport { socket, stop, supervisor: tokio::sync::Mutex::new(Some(supervisor)), restarts })
    }

    /// The socket the child listens on (the same across restarts).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How many times the child was started again after dying.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Stops the child (SIGTERM, so qcow2 metadata and bitmaps are written
    /// back) and its watcher; waits for both.
    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(supervisor) = self.supervisor.lock().await.take() {
            let _ = supervisor.await;
        }
    }
}

/// Waits for the child to exit and starts it again, until `stop`.
async fn supervise(mut child: QemuNbd, settings: OwnedSettings, stop: CancellationToken, restarts: Arc<AtomicU64>) {
    let image = settings.path.display().to_string();
    let mut delay = FIRST_DELAY;
    loop {
        let started = Instant::now();
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            () = stop.cancelled() => None,
        };
        let Some(status) = exited else {
            child.stop().await;
            return;
        };
        if started.elapsed() > STABLE {
            delay = FIRST_DELAY;
        }
        let status = status.map_or_else(|error| error.to_string(), |status| status.to_string());
        tracing::warn!(%image, %status, "qemu-nbd exited; restarting it in {delay:?}");
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            delay = (delay * 2).min(MAX_DELAY);
            match child.respawn(&settings.export()).await {
                Ok(()) => {
                    restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%image, "qemu-nbd restarted");
                    break;
                }
                Err(error) => tracing::warn!(%image, %error, "restarting qemu-nbd failed; next try in {delay:?}"),
            }
        }
    }
}
