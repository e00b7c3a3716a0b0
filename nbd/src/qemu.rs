//! qemu's tools for local images: `qemu-img` to create and inspect files;
//! a qemu-nbd child exporting one on a private unix socket
//! (`-t -e N --discard=unmap -A`, `-B` for a bitmap), which the CLI uses
//! for local qcow2 files (it reads and writes raw files itself); and a qemu-storage-daemon child with an
//! NBD server and a QMP monitor on private sockets, which the server uses
//! for the images it owns (exports and bitmaps are managed live over
//! [`crate::qmp`]). Children are started without a shell or `--fork`, so
//! their owner waits for them and reaps them, and stopped with SIGTERM so
//! qcow2 metadata and persistent bitmaps are written back cleanly; the
//! CLI's qemu-nbd also dies with its owner and never gets the terminal's
//! signals (see [`QemuNbd::start`]).

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

impl QemuError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> QemuError {
        QemuError(message.into())
    }
}

fn failed(message: impl Into<String>) -> QemuError {
    QemuError(message.into())
}

/// How long qemu-nbd may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long qemu-nbd may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a qemu-img run may take before it is killed (a file that
/// cannot be read, such as a FIFO or a hung mount, must not hang its
/// caller).
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

/// What qemu-nbd should export and how.
#[derive(Debug, Clone)]
pub struct ExportSettings<'a> {
    /// The image and the files it links to, as resolved
    /// ([`crate::qcow2::resolve`]): qemu-nbd opens nothing else.
    pub image: &'a ImageLayer,
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
    /// connections. It runs in a process group of its own and is killed
    /// when this process dies, even by SIGKILL.
    pub async fn start(settings: &ExportSettings<'_>) -> Result<QemuNbd> {
        let socket_dir = private_directory("blockgate-nbd-")?;
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
        terminate(&mut self.child, "qemu-nbd").await;
    }
}

/// A new temporary directory for a child's sockets, mode 0700 whatever the
/// umask: whoever reaches an NBD socket reads and writes the image, and
/// whoever could write the directory could put a server of their own at
/// the socket's path after a crash.
fn private_directory(prefix: &str) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(|error| failed(format!("creating a socket directory: {error}")))
}

/// Makes every socket in a child's directory mode 0600 (the child created
/// them with its umask).
fn private_sockets(directory: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let entries = std::fs::read_dir(directory).map_err(|error| failed(format!("listing {}: {error}", directory.display())))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_socket()) {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                .map_err(|error| failed(format!("chmod {}: {error}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// Starts qemu-nbd on `socket` and waits until it accepts connections.
///
/// The child must not outlive its owner (a CLI killed with SIGKILL would
/// leave a `--persistent` qemu-nbd holding the file forever), and must not
/// get the terminal's signals (Ctrl-C signals the whole foreground process
/// group; a qemu-nbd that died first made a transfer fail with "Broken
/// pipe" instead of stopping cleanly). So it runs in a process group of
/// its own, and under `setpriv --pdeathsig KILL` (util-linux), which asks
/// the kernel to kill it when its parent dies, with no `unsafe` here. The
/// kernel sends that signal when the parent *thread* that forked it exits,
/// not the process, so the fork happens on [`lasting_spawner`]'s thread,
/// which lives as long as the process.
async fn spawn(settings: &ExportSettings<'_>, socket: &Path) -> Result<Child> {
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--", "qemu-nbd"])
        .arg("--persistent")
        .arg(format!("--shared={}", settings.shared))
        .arg("--discard=unmap")
        .arg("--allocation-depth")
        .arg("--socket")
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
    // The whole node tree as a json: filename (ours, never a header's):
    // every format explicit, and a qcow2 without a backing says so.
    command.arg(format!("json:{}", settings.image.to_json()?));
    launch(command, "qemu-nbd", &[socket], &settings.image.path).await
}

/// A command and where to send the child it starts.
type SpawnRequest = (Command, tokio::runtime::Handle, tokio::sync::oneshot::Sender<std::io::Result<Child>>);

/// Starts commands on one thread that never exits, in the caller's
/// runtime (which reaps the children): the parent thread a parent-death
/// signal watches. A runtime's own threads may exit before the process
/// does (blocking-pool threads end when idle).
fn lasting_spawner() -> &'static std::sync::mpsc::Sender<SpawnRequest> {
    static SPAWNER: std::sync::OnceLock<std::sync::mpsc::Sender<SpawnRequest>> = std::sync::OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut command, runtime, reply) in receiver {
                    let _entered = runtime.enter();
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("a thread to start children from");
        sender
    })
}

/// True if an NBD server greets on `socket`; the probe says goodbye
/// properly, so the server logs nothing.
async fn answers_nbd(socket: &Path) -> bool {
    let Ok(mut stream) = tokio::net::UnixStream::connect(socket).await else { return false };
    matches!(tokio::time::timeout(Duration::from_secs(5), crate::handshake::greet_and_leave(&mut stream)).await, Ok(Ok(())))
}

/// Spawns a qemu program (no shell, stderr logged and kept for the error
/// message) in a process group of its own, from [`lasting_spawner`]'s
/// thread (for `setpriv --pdeathsig`), waits until every one of `sockets`
/// accepts connections, and makes the sockets of their directory mode
/// 0600.
async fn launch(mut command: Command, program: &'static str, sockets: &[&Path], image: &Path) -> Result<Child> {
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
    let (reply, child) = tokio::sync::oneshot::channel();
    lasting_spawner()
        .send((command, tokio::runtime::Handle::current(), reply))
        .map_err(|_| failed("the thread that starts children is gone"))?;
    let spawned = child.await.map_err(|_| failed("the thread that starts children is gone"))?;
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            let wanted =
                format!("{} and {} (setpriv)", crate::packages::provider(program).await, crate::packages::provider("setpriv").await);
            return Err(failed(format!("starting {program}: {error}; install {wanted}")));
        }
    };
    let stderr_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    if let Some(stderr) = child.stderr.take() {
        let lines = stderr_lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                tracing::warn!(program, "{line}");
                lines.lock().unwrap_or_else(PoisonError::into_inner).push(line);
            }
        });
    }
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    for socket in sockets {
        loop {
            if answers_nbd(socket).await {
                break;
            }
            if let Some(status) = child.try_wait().map_err(|error| failed(error.to_string()))? {
                // Let the stderr task catch the last words.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let said = stderr_lines.lock().unwrap_or_else(PoisonError::into_inner).join("; ");
                // 127: setpriv found no such program to run.
                let missing = match status.code() {
                    Some(127) => format!("; install {}", crate::packages::provider(program).await),
                    _ => String::new(),
                };
                return Err(failed(format!("{program} exited ({status}) while opening {}: {said}{missing}", image.display())));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(failed(format!("{program} did not open {} within {START_TIMEOUT:?}", socket.display())));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for directory in sockets.iter().filter_map(|socket| socket.parent()) {
        private_sockets(directory)?;
    }
    tracing::info!(program, image = %image.display(), "started");
    Ok(child)
}

/// Stops a child: SIGTERM (qemu writes qcow2 metadata and persistent
/// bitmaps back on it), then SIGKILL if it lingers.
async fn terminate(child: &mut Child, program: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_ok() {
            tracing::info!(program, "stopped");
            return;
        }
        tracing::warn!(program, "ignored SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

/// One image file of a daemon's block graph and the files it links to,
/// each decided by the caller (qemu is never left to open a file a header
/// names: see [`crate::qcow2`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    /// The file, resolved.
    pub path: PathBuf,
    /// Its format, never probed: `raw` or `qcow2`.
    pub format: String,
    /// The backing image of a qcow2, opened read-only; `None` opens none.
    pub backing: Option<Box<ImageLayer>>,
    /// The external data file of a qcow2.
    pub data_file: Option<PathBuf>,
}

impl ImageLayer {
    /// A file with no backing and no data file.
    pub fn single(path: &Path, format: &str) -> ImageLayer {
        ImageLayer { path: path.to_path_buf(), format: format.to_string(), backing: None, data_file: None }
    }

    /// The layer as qemu's nested block options (the `json:` form): a
    /// qcow2 names its backing (`null`: none) and data file itself. A path
    /// that is not UTF-8 is refused: JSON cannot carry it as it is, and a
    /// lossy copy would name another file.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let file = |path: &Path| {
            let name = path.to_str().ok_or_else(|| failed(format!("{} is not UTF-8; rename it", path.display())))?;
            Ok::<_, QemuError>(serde_json::json!({"driver": "file", "filename": name}))
        };
        let mut options = serde_json::json!({"driver": self.format, "file": file(&self.path)?});
        if self.format == "qcow2" {
            options["backing"] = match &self.backing {
                Some(backing) => backing.to_json()?,
                None => serde_json::Value::Null,
            };
            if let Some(data_file) = &self.data_file {
                options["data-file"] = file(data_file)?;
            }
        }
        Ok(options)
    }
}

/// What qemu-storage-daemon should open.
#[derive(Debug, Clone)]
pub struct DaemonSettings<'a> {
    /// The image and what it links to.
    pub image: &'a ImageLayer,
    /// Open the image read-only (no writes, no persistent bitmaps).
    pub read_only: bool,
}

/// A running qemu-storage-daemon with the image open as the block node
/// [`StorageDaemon::NODE`], an NBD server with no exports yet, and a QMP
/// monitor, both on unix sockets in a private directory. Exports and dirty
/// bitmaps are added live through QMP. Like [`QemuNbd`], it can be started
/// again on the same sockets.
pub struct StorageDaemon {
    child: Child,
    nbd_socket: PathBuf,
    qmp_socket: PathBuf,
    _socket_dir: tempfile::TempDir,
}

impl StorageDaemon {
    /// Name of the image's format node, as QMP commands name it.
    pub const NODE: &'static str = "disk0";

    /// Starts the daemon and waits until both sockets accept connections.
    pub async fn start(settings: &DaemonSettings<'_>) -> Result<StorageDaemon> {
        let socket_dir = private_directory("blockgate-qsd-")?;
        let nbd_socket = socket_dir.path().join("nbd.sock");
        let qmp_socket = socket_dir.path().join("qmp.sock");
        let child = spawn_daemon(settings, &nbd_socket, &qmp_socket).await?;
        Ok(StorageDaemon { child, nbd_socket, qmp_socket, _socket_dir: socket_dir })
    }

    /// Starts a new daemon on the same sockets, after the last one exited.
    pub async fn respawn(&mut self, settings: &DaemonSettings<'_>) -> Result<()> {
        let _ = std::fs::remove_file(&self.nbd_socket);
        let _ = std::fs::remove_file(&self.qmp_socket);
        self.child = spawn_daemon(settings, &self.nbd_socket, &self.qmp_socket).await?;
        Ok(())
    }

    /// The NBD server's socket.
    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// The QMP monitor's socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// Waits until the daemon exits (and reaps it).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the daemon; its persistent bitmaps are written back.
    pub async fn stop(&mut self) {
        terminate(&mut self.child, "qemu-storage-daemon").await;
    }
}

/// The `--blockdev` options of `layer` and the layers below it, those a
/// node refers to first; the name of its format node. Layer `depth` has
/// the nodes `file{depth}`, `data{depth}` and `disk{depth}` (the image
/// itself is [`StorageDaemon::NODE`]). A qcow2 node always says what its
/// backing and data file are (`null`: none), so qemu opens nothing the
/// header names by itself.
fn blockdevs(layer: &ImageLayer, depth: usize, read_only: bool, nodes: &mut Vec<serde_json::Value>) -> Result<String> {
    let filename = |path: &Path| path.to_str().map(str::to_string).ok_or_else(|| failed(format!("{} is not UTF-8", path.display())));
    let backing = match &layer.backing {
        Some(backing) => serde_json::Value::from(blockdevs(backing, depth + 1, true, nodes)?),
        None => serde_json::Value::Null,
    };
    let file = format!("file{depth}");
    nodes.push(serde_json::json!({
        "driver": "file", "node-name": file, "filename": filename(&layer.path)?, "discard": "unmap", "read-only": read_only,
    }));
    let node = format!("disk{depth}");
    let mut format = serde_json::json!({
        "driver": layer.format, "node-name": node, "file": file, "discard": "unmap", "read-only": read_only,
    });
    if layer.format == "qcow2" {
        format["backing"] = backing;
        if let Some(data_file) = &layer.data_file {
            let data = format!("data{depth}");
            nodes.push(serde_json::json!({
                "driver": "file", "node-name": data, "filename": filename(data_file)?, "discard": "unmap", "read-only": read_only,
            }));
            format["data-file"] = data.into();
        }
    } else if layer.backing.is_some() || layer.data_file.is_some() {
        return Err(failed(format!("{}: only a qcow2 image has a backing or data file", layer.path.display())));
    }
    nodes.push(format);
    Ok(node)
}

/// `qemu-storage-daemon` with the image's block nodes (JSON, so no path
/// needs quoting), the NBD server and the monitor. Like qemu-nbd it runs
/// in a process group of its own (a Ctrl-C at the server's terminal must
/// not stop it under running transfers: the server stops it last) and
/// under `setpriv --pdeathsig TERM`, so a server killed with SIGKILL (the
/// OOM killer) leaves no daemon holding the image's lock; TERM, not KILL,
/// so it still writes its qcow2 metadata and bitmaps back.
async fn spawn_daemon(settings: &DaemonSettings<'_>, nbd_socket: &Path, qmp_socket: &Path) -> Result<Child> {
    let mut nodes = Vec::new();
    let top = blockdevs(settings.image, 0, settings.read_only, &mut nodes)?;
    debug_assert_eq!(top, StorageDaemon::NODE);
    let keyval_path = |path: &Path| path.to_string_lossy().replace(',', ",,");
    let mut command = Command::new("setpriv");
    command.args(["--pdeathsig", "TERM", "--", "qemu-storage-daemon"]);
    for node in nodes {
        command.arg("--blockdev").arg(node.to_string());
    }
    command
        .arg("--chardev")
        .arg(format!("socket,id=qmp0,path={},server=on,wait=off", keyval_path(qmp_socket)))
        .args(["--monitor", "chardev=qmp0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", keyval_path(nbd_socket)));
    // Options are applied in order, so a listening NBD socket means the
    // monitor is set up too. Only the NBD socket is probed: the monitor
    // serves one client at a time, and a probe's connection could still
    // hold it when the real one arrives. Clients wait for it with
    // `Qmp::connect_when_ready`.
    launch(command, "qemu-storage-daemon", &[nbd_socket], &settings.image.path).await
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
    let mut command = Command::new("qemu-img");
    command.args(args);
    let output = match output_within(command, QEMU_IMG_TIMEOUT).await {
        Ok(output) => output,
        Err(error) => {
            return Err(failed(format!("running qemu-img: {error}; install {}", crate::packages::provider("qemu-img").await)));
        }
    };
    if !output.status.success() {
        return Err(failed(format!("qemu-img {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim())));
    }
    Ok(output.stdout)
}

/// Runs a program to its end and collects its output, unless it runs
/// longer than `timeout`: then it is killed and this fails.
async fn output_within(mut command: Command, timeout: Duration) -> std::io::Result<std::process::Output> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = command.spawn()?;
    // On a timeout the child is dropped, which kills it (tokio reaps it).
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("it did not finish within {timeout:?} and was killed")))?
}

/// What `qemu-img info` says of a file's bitmaps.
pub struct ImageInfo {
    /// Names of its persistent dirty bitmaps (qcow2).
    pub bitmaps: Vec<String>,
    /// Those of them flagged `in-use`: left inconsistent by a writer that
    /// did not close the image.
    pub inconsistent_bitmaps: Vec<String>,
}

/// Asks `qemu-img info` about a file (works while the file is exported),
/// opened as `format` (never probed).
pub async fn image_info(path: &Path, format: &str) -> Result<ImageInfo> {
    let path_text = path.to_string_lossy();
    let output = qemu_img(&["info", "-U", "--output=json", "-f", format, &path_text]).await?;
    let info: serde_json::Value = serde_json::from_slice(&output).map_err(|error| failed(format!("parsing qemu-img info: {error}")))?;
    let listed = info["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    let names = |in_use_only: bool| {
        listed
            .iter()
            .filter(|bitmap| !in_use_only || bitmap["flags"].as_array().is_some_and(|flags| flags.iter().any(|flag| flag == "in-use")))
            .filter_map(|bitmap| bitmap["name"].as_str().map(str::to_string))
            .collect()
    };
    Ok(ImageInfo { bitmaps: names(false), inconsistent_bitmaps: names(true) })
}

/// Magic numbers at offset 0 of image formats qemu would probe.
const MAGICS: &[(&[u8], &str)] =
    &[(b"QFI\xfb", "qcow2"), (b"QED\0", "qed"), (b"KDMV", "vmdk"), (b"vhdxfile", "vhdx"), (b"LUKS\xba\xbe", "luks")];

/// The format a file's first bytes announce, if any, read here without
/// asking qemu to open it (a forged header names any host file as its
/// backing or data file). Read off the async workers; anything but a
/// regular file or a block device is an error ([`open_image_file`]).
pub async fn sniff_format(path: &Path) -> std::io::Result<Option<&'static str>> {
    let path = path.to_path_buf();
    let head = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut head = Vec::with_capacity(8);
        open_image_file(&path)?.take(8).read_to_end(&mut head)?;
        Ok::<_, std::io::Error>(head)
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(MAGICS.iter().find(|(magic, _)| head.starts_with(magic)).map(|(_, name)| *name))
}

/// Opens an image for reading, only if it is a regular file or a block
/// device, and without blocking: a FIFO would block its opener (and then
/// qemu) until someone writes into it, and opening a character device can
/// do anything. The type is checked before the open (stat) and on what was
/// opened (fstat). A blocking call: use it off the async workers.
pub fn open_image_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_image = |kind: std::fs::FileType| kind.is_file() || kind.is_block_device();
    let refused =
        || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a regular file or a block device", path.display()));
    if !is_image(std::fs::metadata(path)?.file_type()) {
        return Err(refused());
    }
    let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits()).open(path)?;
    if !is_image(file.metadata()?.file_type()) {
        return Err(refused());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_program_is_named_with_the_package_that_provides_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let missing = dir.path().join("no-such-dir/qemu-storage-daemon");
        let error = launch(Command::new(&missing), "qemu-storage-daemon", &[&socket], dir.path()).await.unwrap_err();
        let wanted = crate::packages::provider("qemu-storage-daemon").await;
        assert!(error.to_string().starts_with("starting qemu-storage-daemon: No such file or directory"), "{error}");
        assert!(error.to_string().contains(&format!("; install {wanted}")), "{error}");
        // Under setpriv, which starts but finds no program to run.
        let mut command = Command::new("setpriv");
        command.args(["--pdeathsig", "TERM", "--"]).arg(&missing);
        let error = launch(command, "qemu-storage-daemon", &[&socket], dir.path()).await.unwrap_err();
        assert!(error.to_string().ends_with(&format!("; install {wanted}")), "{error}");
    }

    #[tokio::test]
    async fn a_program_that_runs_too_long_is_killed() {
        let mut command = Command::new("sleep");
        command.arg("31.4159");
        let error = output_within(command, Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        let running = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .any(|entry| std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == b"sleep\x0031.4159\x00"))
        };
        for _ in 0..50 {
            if !running() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the program still runs");
    }

    #[tokio::test]
    async fn only_regular_files_and_block_devices_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let image = dir.path().join("disk.qcow2");
        std::fs::write(&image, b"QFI\xfb and the rest").unwrap();
        for refused in [fifo.as_path(), dir.path(), Path::new("/dev/null")] {
            let error = sniff_format(refused).await.unwrap_err();
            assert!(error.to_string().contains("not a regular file or a block device"), "{}: {error}", refused.display());
        }
        assert_eq!(sniff_format(&image).await.unwrap(), Some("qcow2"));
    }

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
