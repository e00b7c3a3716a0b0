//! The qemu-storage-daemon blockgate owns for a local image: the image
//! opened with an explicit format, an NBD server and a QMP monitor on
//! private sockets, the image's main export added over QMP, and a task
//! that watches the child. When the child dies (killed, crashed) the task
//! reaps it at once, so no zombie is left, and starts it again on the same
//! sockets with the main export, waiting longer after each failed start,
//! until the image is released. Requests that were in flight get 502; the
//! backend reconnects on the next one. Bitmaps of a daemon that died are
//! reported by [`crate::sources::checkpoints`], which reads them over [`Monitor`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockgate_nbd::qemu::{DaemonSettings, ImageLayer, QemuError, StorageDaemon};
use blockgate_nbd::qmp::{Qmp, QmpError};

use crate::sources::image_files::Pins;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// First wait before a restart; it doubles after each failed start.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between two starts.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A child that ran this long was healthy: the next restart is quick again.
const STABLE: Duration = Duration::from_secs(60);
/// How long a new or restarted daemon's monitor may take to accept us.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// Name (and id) of the export data requests use.
pub const MAIN_EXPORT: &str = "disk";

/// What the daemon opens and exports.
#[derive(Debug, Clone)]
pub struct OwnedSettings {
    /// The image, its format (never probed) and the files it links to,
    /// checked ([`crate::sources::image_files`]).
    pub image: ImageLayer,
    /// Those files by device and inode, checked before every start.
    pub pins: Pins,
    /// The main export refuses writes.
    pub read_only: bool,
    /// The image is opened read-only too (then it cannot hold new bitmaps).
    pub node_read_only: bool,
    /// Longest wait for a QMP reply (`--nbd-timeout`): bitmap and export
    /// commands take milliseconds, so a daemon that does not answer is
    /// frozen, and the request fails rather than hangs.
    pub command_timeout: Duration,
}

/// The daemon's QMP monitor: one connection, opened when first needed and
/// again after a failure, one command at a time.
pub struct Monitor {
    socket: PathBuf,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<Qmp>>,
}

impl Monitor {
    /// Runs a QMP command within the command timeout.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        let mut connection = self.connection.lock().await;
        let run = async {
            if connection.is_none() {
                *connection = Some(Qmp::connect_when_ready(&self.socket, CONNECT_WITHIN).await?);
            }
            connection.as_mut().expect("connected above").execute(command, arguments).await
        };
        let result = tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(QmpError::Protocol(format!("no reply to {command} within {timeout:?}"))));
        if matches!(result, Err(QmpError::Io(_) | QmpError::Protocol(_))) {
            // A broken or confused connection is not reused.
            *connection = None;
        }
        result
    }

    /// Forgets the connection (the daemon behind it was replaced).
    async fn reset(&self) {
        *self.connection.lock().await = None;
    }
}

/// A supervised qemu-storage-daemon child.
pub struct OwnedImage {
    nbd_socket: PathBuf,
    monitor: Arc<Monitor>,
    stop: CancellationToken,
    supervisor: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    exits: Arc<AtomicU64>,
}

impl OwnedImage {
    /// Starts the daemon, adds the main export and starts the watcher.
    pub async fn start(settings: OwnedSettings) -> Result<OwnedImage, QemuError> {
        let mut daemon = StorageDaemon::start(&daemon_settings(&settings)).await?;
        check_open_files(&mut daemon, &settings).await?;
        let monitor = Arc::new(Monitor {
            socket: daemon.qmp_socket().to_path_buf(),
            timeout: settings.command_timeout,
            connection: tokio::sync::Mutex::new(None),
        });
        if let Err(error) = add_main_export(&monitor, &settings).await {
            daemon.stop().await;
            return Err(error);
        }
        let nbd_socket = daemon.nbd_socket().to_path_buf();
        let stop = CancellationToken::new();
        let exits = Arc::new(AtomicU64::new(0));
        let supervisor = tokio::spawn(supervise(daemon, settings, monitor.clone(), stop.clone(), exits.clone()));
        Ok(OwnedImage { nbd_socket, monitor, stop, supervisor: tokio::sync::Mutex::new(Some(supervisor)), exits })
    }

    /// How often the daemon exited without being asked to (each exit may
    /// have lost writes it had acknowledged and not flushed).
    pub fn restarts(&self) -> u64 {
        self.exits.load(Ordering::SeqCst)
    }

    /// The NBD server's socket (the same across restarts).
    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// The QMP monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// Stops the daemon (SIGTERM, so qcow2 metadata and bitmaps are
    /// written back) and its watcher; waits for both.
    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(supervisor) = self.supervisor.lock().await.take() {
            let _ = supervisor.await;
        }
    }
}

fn daemon_settings(settings: &OwnedSettings) -> DaemonSettings<'_> {
    DaemonSettings { image: &settings.image, read_only: settings.node_read_only }
}

/// Stops a daemon that does not hold the checked files open: one of them
/// was swapped between the check and qemu's open.
async fn check_open_files(daemon: &mut StorageDaemon, settings: &OwnedSettings) -> Result<(), QemuError> {
    let checked = match daemon.pid() {
        Some(pid) => settings.pins.verify_open_by(pid),
        None => Err(anyhow::anyhow!("qemu-storage-daemon exited as it started")),
    };
    if let Err(error) = checked {
        daemon.stop().await;
        return Err(QemuError::new(format!("{error:#}")));
    }
    Ok(())
}

/// Starts the daemon again on its sockets, if its files are still the
/// checked ones.
async fn restart(daemon: &mut StorageDaemon, settings: &OwnedSettings, monitor: &Monitor) -> Result<(), QemuError> {
    settings.pins.verify_paths().map_err(|error| QemuError::new(format!("{error:#}")))?;
    daemon.respawn(&daemon_settings(settings)).await?;
    check_open_files(daemon, settings).await?;
    add_main_export(monitor, settings).await
}

/// Adds the export data requests use. It carries no bitmap: dirty maps
/// are served from frozen copies on exports of their own
/// ([`crate::sources::checkpoints`]), because qemu refuses an enabled bitmap on a
/// read-only export, and a bitmap that changes under a running request
/// would split one round's writes between two backups.
async fn add_main_export(monitor: &Monitor, settings: &OwnedSettings) -> Result<(), QemuError> {
    let export = json!({
        "type": "nbd", "id": MAIN_EXPORT, "node-name": StorageDaemon::NODE, "name": MAIN_EXPORT,
        "writable": !settings.read_only, "allocation-depth": true,
    });
    monitor
        .execute("block-export-add", export)
        .await
        .map(drop)
        .map_err(|error| QemuError::new(format!("exporting {}: {error}", settings.image.path.display())))
}

/// Waits for the daemon to exit and starts it again, until `stop`.
async fn supervise(
    mut daemon: StorageDaemon,
    settings: OwnedSettings,
    monitor: Arc<Monitor>,
    stop: CancellationToken,
    exits: Arc<AtomicU64>,
) {
    let image = settings.image.path.display().to_string();
    let mut delay = FIRST_DELAY;
    loop {
        let started = Instant::now();
        let exited = tokio::select! {
            status = daemon.wait() => Some(status),
            () = stop.cancelled() => None,
        };
        let Some(status) = exited else {
            daemon.stop().await;
            return;
        };
        exits.fetch_add(1, Ordering::SeqCst);
        if started.elapsed() > STABLE {
            delay = FIRST_DELAY;
        }
        let status = status.map_or_else(|error| error.to_string(), |status| status.to_string());
        tracing::warn!(%image, %status, "qemu-storage-daemon exited; restarting it in {delay:?}");
        monitor.reset().await;
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            delay = (delay * 2).min(MAX_DELAY);
            match restart(&mut daemon, &settings, &monitor).await {
                Ok(()) => {
                    crate::metrics::metrics().count_restart(&image.to_string());
                    tracing::info!(%image, "qemu-storage-daemon restarted; checkpoints made before the crash need a new full backup");
                    break;
                }
                Err(error) => tracing::warn!(%image, %error, "restarting qemu-storage-daemon failed; next try in {delay:?}"),
            }
        }
    }
}
