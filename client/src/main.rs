//! `blockgate`: the command-line client. Each subcommand is a thin layer
//! over the library: parse, build an [`ImageClient`], run, report. Errors
//! end the process with a one-line reason and a non-zero exit code.

mod vm_commands;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use blockgate_client::transfer::{self, DEFAULT_CONNECTIONS, Progress, Stats, TransferOptions};
use blockgate_client::{ClientError, ImageClient, LocalImage, RETRY_LOG, Scope, Trust, chain, printable};
use blockgate_protocol::blkhash::{Algorithm, BlockHasher, DEFAULT_BLOCK_SIZE, check_block_size};
use blockgate_protocol::{DirtyState, ZeroState};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "blockgate",
    version,
    about = "Client for blockgate and imageio-compatible disk image servers",
    after_help = "Examples:\n  blockgate info --cacert ca.pem https://host:54322/images/disk\n  blockgate download --cacert ca.pem https://host:54322/images/disk disk.qcow2\n  blockgate backup --cacert ca.pem --since cp1 --checkpoint cp2 https://host:54322/images/disk > inc.sparse\n\nEvery command has --help with its own example."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Trust this CA (PEM), e.g. the server's generated ca.pem.
    #[arg(long, global = true, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Trust any certificate (tests only).
    #[arg(short = 'k', long, global = true, conflicts_with = "cacert")]
    insecure: bool,
    /// Reach the server's local listener on this unix socket (no TLS); the
    /// URL's path names the image.
    #[arg(long, global = true, value_name = "PATH")]
    unix_socket: Option<PathBuf>,
    /// Log retries and other warnings on stderr.
    #[arg(short, long, global = true)]
    verbose: bool,
}

/// How a transfer shows its progress.
#[derive(Args)]
struct ProgressArg {
    /// Progress: a bar on a terminal, JSON lines on stderr, or nothing.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
}

/// How download and upload run.
#[derive(Args)]
struct TransferArgs {
    /// Parallel connections (capped by the server's max_readers/max_writers).
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    connections: u16,
    #[command(flatten)]
    progress: ProgressArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProgressMode {
    /// A bar when stderr is a terminal, else nothing.
    Auto,
    /// Always a bar.
    Bar,
    /// JSON lines on stderr: {"done":N,"total":N}, then the stats.
    Json,
    /// Nothing.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum ContextArg {
    Zero,
    Dirty,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Raw,
    Qcow2,
}

/// The format of a local file, as the server picks one: never probed from
/// the content (a raw image holds whatever its guest wrote, such as a
/// qcow2 header naming a host file as its backing file).
#[derive(Args)]
struct FormatChoice {
    /// Format of the local file [default: qcow2 for *.qcow2, else raw];
    /// never guessed from its content.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
}

impl FormatChoice {
    /// Opens `file` read-only in its format, with a note on stderr when
    /// its first bytes announce another one.
    async fn open(&self, file: &Path, follow_links: bool) -> Result<LocalImage> {
        let format = self.of(file);
        if let Ok(Some(looks_like)) = blockgate_nbd::qemu::sniff_format(file).await {
            if looks_like != format {
                eprintln!(
                    "blockgate: note: {} looks like {looks_like} but is read as {format} (formats are never guessed; --format says which)",
                    file.display()
                );
            }
        }
        Ok(LocalImage::open_read_only(file, format, follow_links).await?)
    }

    fn of(&self, file: &Path) -> &'static str {
        match self.format {
            Some(FormatArg::Qcow2) => "qcow2",
            Some(FormatArg::Raw) => "raw",
            None if file.extension().is_some_and(|extension| extension == "qcow2") => "qcow2",
            None => "raw",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Show the image's size, features and limits.
    #[command(after_help = "Example:\n  blockgate info --cacert ca.pem https://host:54322/images/disk")]
    Info {
        /// Image URL.
        url: String,
    },
    /// List data and zero ranges, or dirty ranges.
    #[command(after_help = "Example:\n  blockgate extents --cacert ca.pem --context dirty https://host:54322/images/disk")]
    Extents {
        /// Image URL.
        url: String,
        /// zero: data and zero ranges; dirty: what the bitmap marks (or
        /// what changed since --since).
        #[arg(long, value_enum, default_value_t = ContextArg::Zero)]
        context: ContextArg,
        /// What changed since this checkpoint (implies --context dirty).
        #[arg(long, value_name = "ID")]
        since: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The blkhash of a remote image or a local file (same content, same value).
    #[command(
        after_help = "Example:\n  blockgate checksum --cacert ca.pem https://host:54322/images/disk\n  blockgate checksum disk.qcow2"
    )]
    Checksum {
        /// Image URL or local file.
        target: String,
        #[command(flatten)]
        format: FormatChoice,
        /// Follow a local qcow2's backing and data files, if they lie
        /// directly in its directory (never hidden files).
        #[arg(long)]
        follow_links: bool,
        /// Block size of the hash.
        #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
        block_size: u64,
        /// Hash function: blake2b, blake2s, sha1, sha224, sha256, sha384, sha512 or md5.
        #[arg(long, default_value = "blake2b", value_parser = Algorithm::parse)]
        algorithm: Algorithm,
    },
    /// Download an image into a local raw or qcow2 file.
    #[command(
        after_help = "Examples:\n  blockgate download --cacert ca.pem --checkpoint cp1 https://host:54322/images/disk full.qcow2\n  blockgate download --cacert ca.pem --incremental --since cp1 --checkpoint cp2 --backing full.qcow2 https://host:54322/images/disk inc1.qcow2"
    )]
    Download {
        /// Image URL.
        url: String,
        /// File to create (must not exist).
        file: PathBuf,
        #[command(flatten)]
        format: FormatChoice,
        /// Only the dirty ranges, into a qcow2 overlay on --backing.
        #[arg(long, requires = "backing")]
        incremental: bool,
        /// The previous backup (qcow2) the overlay sits on.
        #[arg(long, value_name = "BASE.qcow2", requires = "incremental")]
        backing: Option<PathBuf>,
        /// With --incremental: what changed since this checkpoint (else
        /// what the ticket's bitmap marks).
        #[arg(long, value_name = "ID", requires = "incremental")]
        since: Option<String>,
        /// The checkpoint this backup reaches; made when the image map is
        /// read if it does not exist.
        #[arg(long, value_name = "ID2")]
        checkpoint: Option<String>,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Upload a local raw or qcow2 image.
    #[command(after_help = "Example:\n  blockgate upload --cacert ca.pem disk.qcow2 https://host:54322/images/disk")]
    Upload {
        /// Local file.
        file: PathBuf,
        #[command(flatten)]
        format: FormatChoice,
        /// Follow a local qcow2's backing and data files, if they lie
        /// directly in its directory (never hidden files).
        #[arg(long)]
        follow_links: bool,
        /// Image URL.
        url: String,
        /// Upload a file smaller than the remote image and zero the rest
        /// of it (else the sizes must be equal).
        #[arg(long)]
        zero_tail: bool,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Write the sparse stream (full, or incremental) to stdout.
    #[command(
        after_help = "Examples:\n  blockgate backup --cacert ca.pem --checkpoint cp1 https://host:54322/images/disk > full.sparse\n  blockgate backup --cacert ca.pem --since cp1 --checkpoint cp2 https://host:54322/images/disk > inc1.sparse"
    )]
    Backup {
        /// Image URL.
        url: String,
        /// Only what the ticket's dirty bitmap marks (imageio's bitmap).
        #[arg(long)]
        incremental: bool,
        /// Only what changed since this checkpoint (the previous backup's).
        #[arg(long, value_name = "ID", conflicts_with = "incremental")]
        since: Option<String>,
        /// The checkpoint this backup reaches: made in the same instant the
        /// changes are frozen if it does not exist.
        #[arg(long, value_name = "ID2")]
        checkpoint: Option<String>,
        #[command(flatten)]
        progress: ProgressArg,
    },
    /// Apply sparse streams, from files in the order given (a full backup
    /// then its incrementals) or from stdin; prints each summary and the
    /// checkpoint the image reached. A stream out of its chain stops it.
    #[command(
        after_help = "Examples:\n  blockgate restore --cacert ca.pem https://host:54322/images/disk < full.sparse\n  blockgate restore --cacert ca.pem https://host:54322/images/disk vda.cp1.sparse vda.cp2.sparse vda.cp3.sparse"
    )]
    Restore {
        /// Image URL.
        url: String,
        /// Stream files, applied in this order [default: stdin].
        files: Vec<PathBuf>,
        /// Apply an incremental that does not continue the image's chain.
        #[arg(long)]
        force: bool,
        /// Apply a full stream of a smaller image and zero the rest of the
        /// image (else the sizes must be equal).
        #[arg(long)]
        zero_tail: bool,
        #[command(flatten)]
        progress: ProgressArg,
    },
    /// List, make or delete the image's checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Running VMs: list them and their checkpoints, back them up.
    #[command(subcommand)]
    Vm(vm_commands::VmCommand),
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// List the checkpoints, oldest first.
    #[command(after_help = "Example:\n  blockgate checkpoint list --cacert ca.pem https://host:54322/images/disk")]
    List {
        /// Image URL.
        url: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a checkpoint (the server names it when no ID is given); prints it as JSON.
    #[command(after_help = "Example:\n  blockgate checkpoint create --cacert ca.pem https://host:54322/images/disk cp1")]
    Create {
        /// Image URL.
        url: String,
        /// Checkpoint id: 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'.
        id: Option<String>,
    },
    /// Delete a checkpoint; no other checkpoint changes.
    #[command(after_help = "Example:\n  blockgate checkpoint delete --cacert ca.pem https://host:54322/images/disk cp1")]
    Delete {
        /// Image URL.
        url: String,
        /// Checkpoint id.
        id: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Private by default: the local qemu-nbd's socket, and what it creates.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            // clap's own words, with the prefix of every other error.
            let text = error.render().to_string();
            eprint!("blockgate: {}", text.strip_prefix("error: ").map_or(text.clone(), |rest| format!("error: {rest}")));
            return ExitCode::from(2);
        }
    };
    // Retries are always announced (a transfer that waits must say why);
    // -v adds every other warning.
    let filter = if cli.global.verbose { "warn".to_string() } else { format!("off,{RETRY_LOG}=warn") };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .with_level(false)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let outcome = tokio::select! {
        // A signal wins over a failure it caused in the same instant.
        biased;
        signal = interrupted() => Err(anyhow::Error::new(Interrupted(signal))),
        outcome = run(cli) => outcome,
    };
    if outcome.as_ref().is_err_and(|error| error.downcast_ref::<Interrupted>().is_some()) {
        vm_commands::end_interrupted().await;
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blockgate: error: {}", in_cli_words(&printable(&chain(error.as_ref()))));
            if error.downcast_ref::<Interrupted>().is_some() {
                ExitCode::from(130)
            } else if error.downcast_ref::<ClientError>().is_some_and(ClientError::is_size_mismatch) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// SIGINT or SIGTERM arrived: the transfer was stopped (its future
/// dropped, so a partial download was removed by its [`PartialFile`]).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}; the transfer was stopped")]
struct Interrupted(&'static str);

/// Completes at the first SIGINT or SIGTERM, with its name.
async fn interrupted() -> &'static str {
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// A download's file while it is written: a hidden name beside the target,
/// linked to the target's name only when the download is complete, and
/// removed if it never is (failure, Ctrl-C), so no file that looks like a
/// finished backup is ever left behind. One left by a CLI that was killed
/// (SIGKILL, a crash) is removed by the next download to the same name.
struct PartialFile {
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PartialFile {
    fn new(target: &Path) -> Result<PartialFile> {
        // lstat: a dangling symlink is there too (the final link would
        // fail on it, after the whole transfer).
        if target.symlink_metadata().is_ok() {
            bail!("{} exists; choose a new file", target.display());
        }
        let name = target.file_name().with_context(|| format!("{} is not a file name", target.display()))?;
        let prefix = format!(".{}.partial-", name.to_string_lossy());
        remove_stale(target, &prefix);
        let temporary = target.with_file_name(format!("{prefix}{}", std::process::id()));
        Ok(PartialFile { temporary, target: target.to_path_buf(), committed: false })
    }

    /// Gives the complete file its name, on stable storage like the
    /// file's data (the directory is synced); never replaces a file that
    /// appeared there meanwhile.
    fn commit(mut self) -> Result<()> {
        std::fs::hard_link(&self.temporary, &self.target)
            .with_context(|| format!("naming the download {} (from {})", self.target.display(), self.temporary.display()))?;
        let _ = std::fs::remove_file(&self.temporary);
        self.committed = true;
        let directory = self.target.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(directory)
            .and_then(|directory| directory.sync_all())
            .with_context(|| format!("syncing {}", directory.display()))
    }
}

/// Removes the partial files beside `target` (`PREFIX` then a process
/// id) whose process is gone (signal 0 finds no such process; a process
/// of another user still counts as running): this one's own id counts as
/// gone too, since it has made none yet.
fn remove_stale(target: &Path, prefix: &str) {
    let directory = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(directory) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|name| name.strip_prefix(prefix)).and_then(|pid| pid.parse::<i32>().ok());
        let Some(pid) = pid.filter(|&pid| pid > 0) else { continue };
        let gone = pid.unsigned_abs() == std::process::id()
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH);
        if gone && std::fs::remove_file(entry.path()).is_ok() {
            eprintln!("blockgate: removed the stale partial download {} (its process {pid} is gone)", entry.path().display());
        }
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed && std::fs::remove_file(&self.temporary).is_ok() {
            eprintln!("blockgate: removed the partial download {}", self.temporary.display());
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let global = &cli.global;
    let trust = match (&global.cacert, global.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => Trust::Insecure,
        (None, false) => Trust::System,
    };
    let client_with = |url: &str, connections: usize| match &global.unix_socket {
        Some(socket) => ImageClient::over_unix_socket(url, socket, connections),
        None => ImageClient::new(url, &trust, connections),
    };
    let client = |url: &str| client_with(url, DEFAULT_CONNECTIONS);
    match &cli.command {
        Command::Info { url } => {
            let client = client(url)?;
            let options = client.options().await?;
            let size = client.size().await?;
            let info = serde_json::json!({"url": client.url(), "size": size, "options": options});
            println!("{}", printable_json(serde_json::to_string_pretty(&info)?));
        }
        Command::Extents { url, context, since, json } => {
            let scope = Scope { incremental: matches!(context, ContextArg::Dirty), since: since.clone(), checkpoint: None };
            list_extents(&client(url)?, &scope, *json).await?
        }
        Command::Checksum { target, format, follow_links, block_size, algorithm } => {
            check_block_size(*block_size).map_err(anyhow::Error::msg)?;
            let checksum = if target.starts_with("https://") {
                if format.format.is_some() || *follow_links {
                    bail!("--format and --follow-links are for a local file; the server knows its image");
                }
                client(target)?.checksum(*algorithm, Some(*block_size)).await?.checksum
            } else {
                local_checksum(format.open(Path::new(target), *follow_links).await?, *algorithm, *block_size).await?
            };
            println!("{}  {target}", printable(&checksum));
        }
        Command::Download { url, file, format, incremental, backing, since, checkpoint, transfer } => {
            let partial = PartialFile::new(file)?;
            let connections = usize::from(transfer.connections);
            let client = client_with(url, connections)?;
            let reporter = Reporter::new(transfer.progress.progress);
            let options = TransferOptions { connections, progress: reporter.callback(), zero_tail: false };
            let stats = match backing {
                Some(backing) if *incremental => {
                    let local = LocalImage::create_overlay(&partial.temporary, backing).await?;
                    let scope = Scope { incremental: true, since: since.clone(), checkpoint: checkpoint.clone() };
                    finish(transfer::download_incremental(&client, &local, &scope, &options).await, local).await?
                }
                _ => {
                    let size = client.size().await?;
                    let local = LocalImage::create(&partial.temporary, format.of(file), size).await?;
                    if let Some(checkpoint) = checkpoint {
                        // Made before the first byte is read: every later
                        // write is in the next incremental.
                        ensure_checkpoint(&client, checkpoint).await?;
                    }
                    finish(transfer::download(&client, &local, &options).await, local).await?
                }
            };
            partial.commit()?;
            reporter.done("downloaded", &stats);
        }
        Command::Upload { file, format, follow_links, url, zero_tail, transfer } => {
            let connections = usize::from(transfer.connections);
            let client = client_with(url, connections)?;
            let reporter = Reporter::new(transfer.progress.progress);
            let options = TransferOptions { connections, progress: reporter.callback(), zero_tail: *zero_tail };
            let local = format.open(file, *follow_links).await?;
            let stats = finish(transfer::upload(&local, &client, &options).await, local).await?;
            reporter.done("uploaded", &stats);
            if stats.tail_zeroed > 0 {
                eprintln!("blockgate: zeroed the {} bytes past the end of {} in the remote image", stats.tail_zeroed, file.display());
            }
        }
        Command::Backup { url, incremental, since, checkpoint, progress } => {
            if std::io::stdout().is_terminal() {
                bail!("the stream is binary: redirect stdout to a file or a pipe");
            }
            let scope = Scope { incremental: *incremental, since: since.clone(), checkpoint: checkpoint.clone() };
            let reporter = Reporter::new(progress.progress);
            let stream = client(url)?.backup(&scope).await?;
            let stats = save_stream(stream, &mut tokio::io::stdout(), &reporter).await?;
            reporter.done("backed up", &stats);
        }
        Command::Restore { url, files, force, zero_tail, progress } => {
            let client = client(url)?;
            let options = RestoreOptions { force: *force, zero_tail: *zero_tail, progress: progress.progress };
            if files.is_empty() {
                restore_stream(&client, tokio::io::stdin(), &options).await?;
            }
            for file in files {
                let opened = tokio::fs::File::open(file).await.with_context(|| format!("opening {}", file.display()))?;
                restore_stream(&client, opened, &options).await.with_context(|| format!("restoring {}", file.display()))?;
            }
        }
        Command::Checkpoint(command) => checkpoint_command(command, client).await?,
        Command::Vm(command) => vm_commands::run(command, &trust).await?,
    }
    Ok(())
}

async fn checkpoint_command(command: &CheckpointCommand, client: impl Fn(&str) -> blockgate_client::Result<ImageClient>) -> Result<()> {
    match command {
        CheckpointCommand::List { url, json } => {
            let checkpoints = client(url)?.checkpoints().await?;
            if !json {
                println!("{:<24} {:<20} {:<24} {:>14} {:>6}", "id", "created", "parent", "dirty_bytes", "usable");
            }
            for checkpoint in checkpoints {
                if *json {
                    println!("{}", printable_json(serde_json::to_string(&checkpoint)?));
                    continue;
                }
                let dirty = checkpoint.dirty_bytes.map_or_else(|| "-".to_string(), |bytes| bytes.to_string());
                let (id, created) = (printable(&checkpoint.id), printable(&checkpoint.created));
                let parent = printable(checkpoint.parent.as_deref().unwrap_or("-"));
                println!("{id:<24} {created:<20} {parent:<24} {dirty:>14} {:>6}", checkpoint.usable);
            }
        }
        CheckpointCommand::Create { url, id } => {
            let checkpoint = client(url)?.create_checkpoint(id.as_deref()).await?;
            println!("{}", printable_json(serde_json::to_string(&checkpoint)?));
        }
        CheckpointCommand::Delete { url, id } => client(url)?.delete_checkpoint(id).await?,
    }
    Ok(())
}

/// Makes checkpoint `id` unless the image has it already (a retried
/// backup finds the one its first try made).
async fn ensure_checkpoint(client: &ImageClient, id: &str) -> Result<()> {
    if client.checkpoints().await?.iter().any(|checkpoint| checkpoint.id == id) {
        return Ok(());
    }
    client.create_checkpoint(Some(id)).await?;
    Ok(())
}

/// How `restore` applies its streams.
struct RestoreOptions {
    force: bool,
    zero_tail: bool,
    progress: ProgressMode,
}

/// Applies one sparse stream read from `source` (`total` bytes, 0 when
/// unknown); prints the summary and the checkpoint the image reached.
async fn restore_stream(
    client: &ImageClient,
    source: impl tokio::io::AsyncRead + Send + Sync + 'static,
    options: &RestoreOptions,
) -> Result<()> {
    let reporter = Reporter::new(options.progress);
    let started = std::time::Instant::now();
    let progress = Arc::new(std::sync::Mutex::new(StreamProgress::new(reporter.callback())));
    let counted = progress.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(source, 1 << 20)
        .inspect_ok(move |chunk| counted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pass(chunk));
    let restored = match client.restore(stream, options.force, options.zero_tail).await {
        Ok(restored) => restored,
        // A stream cannot be read twice: nothing to start over from.
        Err(error) if error.lost_writes() => {
            return Err(anyhow::Error::new(error)
                .context("the server may have lost writes (its storage daemon restarted): run the restore again from the start"));
        }
        Err(error) if error.is_size_mismatch() && !options.zero_tail => {
            return Err(anyhow::Error::new(error)
                .context("the stream's image and this one differ in size (--zero-tail applies a smaller one and zeroes the rest)"));
        }
        Err(error) => return Err(error.into()),
    };
    println!("{}", printable_json(serde_json::to_string(&restored)?));
    if let Some(checkpoint) = &restored.checkpoint {
        eprintln!("the image is now at checkpoint {}", printable(checkpoint));
    }
    let data_bytes = {
        let progress = progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        progress.finish();
        progress.passed
    };
    reporter.done("restored", &Stats { data_bytes, requests: 1, seconds: started.elapsed().as_secs_f64(), ..Stats::default() });
    Ok(())
}

/// Writes a sparse stream to `writer` as it arrives, reporting progress
/// against the data size its `meta` frame announces.
async fn save_stream(
    stream: impl futures::Stream<Item = blockgate_client::Result<bytes::Bytes>>,
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    reporter: &Reporter,
) -> Result<Stats> {
    let mut progress = StreamProgress::new(reporter.callback());
    let started = std::time::Instant::now();
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        writer.write_all(&chunk).await.context("writing the stream")?;
        progress.pass(&chunk);
    }
    writer.flush().await.context("writing the stream")?;
    progress.finish();
    Ok(Stats { data_bytes: progress.passed, requests: 1, seconds: started.elapsed().as_secs_f64(), ..Stats::default() })
}

/// The progress of a sparse stream passing through: in bytes of the
/// stream, against a total its `meta` frame announces (data-size and the
/// frames' overhead are known only as the stream goes, so the total is
/// the data size and `done` stays within it until the end). Nothing is
/// reported before the `meta` frame is read, so every line has its total.
struct StreamProgress {
    callback: Option<transfer::ProgressFn>,
    head: Vec<u8>,
    total: Option<u64>,
    /// Bytes of the stream so far.
    passed: u64,
}

impl StreamProgress {
    fn new(callback: Option<transfer::ProgressFn>) -> StreamProgress {
        StreamProgress { callback, head: Vec::new(), total: None, passed: 0 }
    }

    fn pass(&mut self, chunk: &[u8]) {
        self.passed += chunk.len() as u64;
        if self.total.is_none() && self.head.len() < META_PEEK {
            self.head.extend_from_slice(&chunk[..chunk.len().min(META_PEEK - self.head.len())]);
            self.total = announced_data_size(&self.head);
        }
        // Short of the total until the end: `finish` says done.
        if let (Some(callback), Some(total)) = (&self.callback, self.total.filter(|total| *total > 0)) {
            callback(Progress { done: self.passed.min(total - 1), total });
        }
    }

    /// The last line: all done.
    fn finish(&self) {
        if let Some(callback) = &self.callback {
            let total = self.total.unwrap_or(self.passed);
            callback(Progress { done: total, total });
        }
    }
}

/// The least time between two `--progress json` lines.
const JSON_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The server's advice in the CLI's words: the query parameters it names
/// are the flags that set them.
fn in_cli_words(message: &str) -> String {
    message.replace("add force=y", "use --force").replace("add zero_tail=y", "use --zero-tail")
}

/// JSON text fit for a terminal: serde_json escapes C0 controls in
/// strings but leaves DEL and the C1 codes (U+0080-U+009F, CSI among
/// them) raw; they are escaped too. Newlines stay: outside strings they
/// are layout, and inside strings serde_json escaped them already.
fn printable_json(json: String) -> String {
    if !json.chars().any(|c| c.is_control() && c != '\n') {
        return json;
    }
    json.chars().map(|c| if c.is_control() && c != '\n' { format!("\\u{:04x}", u32::from(c)) } else { c.to_string() }).collect()
}

/// Bytes of a stream's start kept to read its `meta` frame.
const META_PEEK: usize = 64 << 10;

/// The `data-size` a stream's `meta` frame announces, once `head` holds
/// it: what a backup's progress counts towards (frame headers aside).
fn announced_data_size(head: &[u8]) -> Option<u64> {
    announced_meta(head)?["data-size"].as_u64()
}

/// The `meta` frame at the start of a sparse stream, if `head` holds it.
fn announced_meta(head: &[u8]) -> Option<serde_json::Value> {
    let length = usize::from_str_radix(std::str::from_utf8(head.get(22..38)?).ok()?, 16).ok()?;
    serde_json::from_slice(head.get(40..40usize.checked_add(length)?)?).ok()
}

/// Closes the local image whatever happened, then returns the outcome.
async fn finish(result: blockgate_client::Result<Stats>, local: LocalImage) -> Result<Stats> {
    let closed = local.close().await;
    let stats = result?;
    closed?;
    Ok(stats)
}

async fn list_extents(client: &ImageClient, scope: &Scope, json: bool) -> Result<()> {
    match scope.incremental || scope.since.is_some() {
        false => print_extents::<ZeroState>(client, scope, json, ["zero", "hole"], |flags| [flags.zero, flags.hole]).await,
        true => print_extents::<DirtyState>(client, scope, json, ["dirty", "zero"], |flags| [flags.dirty, flags.zero]).await,
    }
}

/// Prints extents as a table with two flag columns, or as JSON lines.
async fn print_extents<F>(client: &ImageClient, scope: &Scope, json: bool, columns: [&str; 2], flags: fn(&F) -> [bool; 2]) -> Result<()>
where
    F: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    let mut extents = std::pin::pin!(client.extents::<F>(scope, None).await?);
    if !json {
        println!("{:>16} {:>16} {:>5} {:>5}", "start", "length", columns[0], columns[1]);
    }
    while let Some(extent) = extents.try_next().await? {
        if json {
            println!("{}", serde_json::to_string(&extent)?);
        } else {
            let [first, second] = flags(&extent.flags);
            println!("{:>16} {:>16} {first:>5} {second:>5}", extent.start, extent.length);
        }
    }
    Ok(())
}

/// The blkhash of a local file, zero runs hashed without reading.
async fn local_checksum(local: LocalImage, algorithm: Algorithm, block_size: u64) -> Result<String> {
    let hashed = async {
        let mut hasher = BlockHasher::with_algorithm(algorithm, block_size);
        for run in local.runs().await? {
            if run.zero {
                hasher.zero(run.length);
                continue;
            }
            let end = run.start + run.length;
            for offset in (run.start..end).step_by(4 << 20) {
                hasher.update(&local.read(offset, (end - offset).min(4 << 20) as usize).await?);
            }
        }
        Ok::<_, anyhow::Error>(hasher.finish())
    }
    .await;
    local.close().await?;
    hashed
}

/// Shows progress as asked.
struct Reporter {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
}

impl Reporter {
    fn new(mode: ProgressMode) -> Reporter {
        let show_bar = mode == ProgressMode::Bar || (mode == ProgressMode::Auto && std::io::stderr().is_terminal());
        let bar = show_bar.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").expect("valid template"),
            );
            bar
        });
        Reporter { mode, bar }
    }

    fn callback(&self) -> Option<transfer::ProgressFn> {
        if let Some(bar) = &self.bar {
            let bar = bar.clone();
            return Some(Arc::new(move |progress: Progress| {
                bar.set_length(progress.total);
                bar.set_position(progress.done);
            }));
        }
        (self.mode == ProgressMode::Json).then(|| -> transfer::ProgressFn {
            // At most four lines a second, and always the last one.
            let last = std::sync::Mutex::new(None::<std::time::Instant>);
            Arc::new(move |progress: Progress| {
                let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let due = last.is_none_or(|at| at.elapsed() >= JSON_PROGRESS_EVERY);
                if due || progress.done == progress.total {
                    *last = Some(std::time::Instant::now());
                    eprintln!("{}", serde_json::to_string(&progress).expect("serializable"));
                }
            })
        })
    }

    fn done(&self, what: &str, stats: &Stats) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        match self.mode {
            ProgressMode::Json => eprintln!("{}", serde_json::json!({ "event": what, "stats": stats })),
            ProgressMode::None => {}
            _ if self.bar.is_some() => eprintln!(
                "{what} {} MiB of data and {} MiB of zeros in {:.1} s",
                stats.data_bytes >> 20,
                stats.zero_bytes >> 20,
                stats.seconds
            ),
            _ => {}
        }
    }
}
