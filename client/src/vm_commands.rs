//! `blockgate vm`: running VMs through a server's control API (its
//! control socket, or `--control URL` with a client certificate). `list`
//! and `checkpoints` print what the server reports; `backup` starts one
//! backup of a VM (one instant across its disks), pulls every disk as a
//! sparse stream into a file of its own, ends the backup whatever
//! happened (a Ctrl-C included: [`end_interrupted`]), and fails naming
//! each disk it could not save. A file is
//! named only once it is complete; `CHECKPOINT.json` beside them records
//! what was saved, so a restore applies the files in their chain's order.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use blockgate_client::{ControlArgs, ControlClient};
use blockgate_client::{ImageClient, Scope, Trust, printable};
use blockgate_protocol::checkpoint::check_id;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::{META_PEEK, PartialFile, ProgressArg, Reporter, announced_meta, printable_json, save_stream};

#[derive(Subcommand)]
pub enum VmCommand {
    /// List the VMs and their disks.
    #[command(after_help = "Example:\n  blockgate vm list --control-socket /run/blockgate/control.sock")]
    List {
        #[command(flatten)]
        control: ControlArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a VM's checkpoints, oldest first.
    #[command(after_help = "Example:\n  blockgate vm checkpoints --control-socket /run/blockgate/control.sock vm1")]
    Checkpoints {
        #[command(flatten)]
        control: ControlArgs,
        /// The VM's name.
        vm: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Back up a running VM's disks into a directory: a full backup, or
    /// what changed since --since.
    #[command(
        after_help = "Examples:\n  blockgate vm backup --control-socket /run/blockgate/control.sock --cacert ca.pem --checkpoint cp1 vm1 --out /backups/vm1\n  blockgate vm backup --control https://host:54323 --cert client.pem --key client.key --cacert ca.pem --since cp1 --checkpoint cp2 vm1 --out /backups/vm1"
    )]
    Backup {
        #[command(flatten)]
        control: ControlArgs,
        /// The VM's name.
        vm: String,
        /// Directory for the streams (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Only what changed since this checkpoint (the last backup's).
        #[arg(long, value_name = "ID")]
        since: Option<String>,
        /// The checkpoint this backup makes [default: the server names it].
        #[arg(long, value_name = "ID2")]
        checkpoint: Option<String>,
        /// Freeze the guest's file systems around the start (needs its
        /// guest agent).
        #[arg(long)]
        quiesce: bool,
        /// Back up this disk only (repeatable) [default: every disk].
        #[arg(long = "disk", value_name = "NAME")]
        disks: Vec<String>,
        /// Seconds the server keeps the backup before ending it.
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
        timeout: u64,
        #[command(flatten)]
        progress: ProgressArg,
    },
}

/// A backup as the server describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Backup {
    id: String,
    vm: String,
    since: Option<String>,
    checkpoint: Option<String>,
    disks: Vec<BackupDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BackupDisk {
    name: String,
    size: u64,
    incremental: bool,
    url: String,
}

/// What `backup.json` records of one backup.
#[derive(Debug, Serialize)]
struct Saved<'a> {
    vm: &'a str,
    since: Option<&'a str>,
    checkpoint: Option<&'a str>,
    disks: Vec<SavedDisk>,
}

#[derive(Debug, Serialize)]
struct SavedDisk {
    name: String,
    incremental: bool,
    file: String,
}

/// The backup this process started and has not ended: where to DELETE it.
static STARTED: std::sync::Mutex<Option<(ControlClient, String)>> = std::sync::Mutex::new(None);

/// Ends the backup an interrupted `vm backup` left running (within 10 s),
/// so its job does not hold the VM's scratch space until it expires.
pub async fn end_interrupted() {
    let started = STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    let Some((control, path)) = started else { return };
    match tokio::time::timeout(std::time::Duration::from_secs(10), control.delete(&path)).await {
        Ok(Ok(())) => eprintln!("blockgate: ended the backup on the server"),
        Ok(Err(error)) => eprintln!("blockgate: could not end the backup ({error}); the server ends it when its tickets expire"),
        Err(_) => eprintln!("blockgate: the server did not end the backup within 10 s; it ends it when its tickets expire"),
    }
}

/// A VM name in a URL path: percent-encoded.
fn vm_path(vm: &str) -> String {
    percent_encoding::utf8_percent_encode(vm, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Runs a `vm` command.
pub async fn run(command: &VmCommand, trust: &Trust) -> Result<()> {
    match command {
        VmCommand::List { control, json } => {
            let vms = control.client(trust)?.get_json("/vms").await?;
            for vm in vms.as_array().context("the server's VM list is not a list")? {
                if *json {
                    println!("{}", printable_json(serde_json::to_string(vm)?));
                    continue;
                }
                let disks: Vec<String> = vm["disks"]
                    .as_array()
                    .map(|disks| disks.iter().map(|disk| format!("{}:{}", text(&disk["name"]), text(&disk["format"]))).collect())
                    .unwrap_or_default();
                println!("{:<24} {:<10} {}", text(&vm["name"]), text(&vm["state"]), disks.join(" "));
            }
        }
        VmCommand::Checkpoints { control, vm, json } => {
            let checkpoints = control.client(trust)?.get_json(&format!("/vms/{}/checkpoints", vm_path(vm))).await?;
            if !json {
                println!("{:<24} {:<21} {:<24} {:<12} usable", "id", "created", "parent", "disks");
            }
            for checkpoint in checkpoints.as_array().context("the server's checkpoint list is not a list")? {
                if *json {
                    println!("{}", printable_json(serde_json::to_string(checkpoint)?));
                    continue;
                }
                let disks: Vec<String> = checkpoint["disks"].as_array().map(|disks| disks.iter().map(text).collect()).unwrap_or_default();
                let usable = checkpoint["usable"].as_bool().map_or("unknown", |usable| if usable { "yes" } else { "no" });
                let parent = if checkpoint["parent"].is_null() { "-".to_string() } else { text(&checkpoint["parent"]) };
                println!(
                    "{:<24} {:<21} {:<24} {:<12} {usable}",
                    text(&checkpoint["id"]),
                    text(&checkpoint["created"]),
                    parent,
                    disks.join(",")
                );
            }
        }
        VmCommand::Backup { control, vm, out, since, checkpoint, quiesce, disks, timeout, progress } => {
            let control = control.client(trust)?;
            std::fs::create_dir_all(out).with_context(|| format!("making {}", out.display()))?;
            let request =
                serde_json::json!({"disks": disks, "since": since, "checkpoint": checkpoint, "quiesce": quiesce, "timeout": timeout});
            let (_, answer) = control.post_json(&format!("/vms/{}/backups", vm_path(vm)), &request).await?;
            let backup: Backup = serde_json::from_value(answer).context("the server's backup description")?;
            eprintln!(
                "blockgate: backup {} of VM {} started: {} disk(s), since {}, checkpoint {}",
                printable(&backup.id),
                printable(&backup.vm),
                backup.disks.len(),
                printable(backup.since.as_deref().unwrap_or("- (full)")),
                printable(backup.checkpoint.as_deref().unwrap_or("-"))
            );
            let backup_path = format!("/vms/{}/backups/{}", vm_path(vm), backup.id);
            *STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((control.clone(), backup_path.clone()));
            let saved = pull_disks(&backup, disks, out, trust, progress).await;
            // Ended whatever happened: its job holds scratch space on the host.
            let ended = control.delete(&backup_path).await;
            STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            let saved = saved?;
            ended.context("ending the backup on the server")?;
            println!("{}", printable_json(serde_json::to_string_pretty(&saved)?));
        }
    }
    Ok(())
}

/// A JSON value as one line of text.
fn text(value: &serde_json::Value) -> String {
    printable(value.as_str().map_or_else(|| value.to_string(), str::to_string).as_str()).into_owned()
}

/// Refuses a backup description whose names could not be file names in
/// `--out` as they are: a disk is a target such as `vda`, a checkpoint or
/// backup id is 1-64 of `[A-Za-z0-9._-]` not starting with `.`. A server
/// that says otherwise (`../../etc/x`) is not followed.
fn check_names(backup: &Backup, requested: &[String]) -> Result<()> {
    for id in [Some(&backup.id), backup.since.as_ref(), backup.checkpoint.as_ref()].into_iter().flatten() {
        check_id(id).map_err(|error| anyhow::anyhow!("the server named the backup {:?}: {error}", printable(id)))?;
    }
    for disk in &backup.disks {
        if disk.name.is_empty() || disk.name.len() > 32 || !disk.name.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
            bail!("the server named a disk {:?}, which is not a disk target such as vda", printable(&disk.name));
        }
    }
    let missing: Vec<&str> =
        requested.iter().filter(|name| !backup.disks.iter().any(|disk| &disk.name == *name)).map(String::as_str).collect();
    if !missing.is_empty() {
        bail!("the server's backup lacks disk(s) {}", printable(&missing.join(", ")));
    }
    if backup.disks.is_empty() {
        bail!("the server's backup has no disk");
    }
    Ok(())
}

/// Refuses a saved stream whose `meta` frame does not say what the
/// backup says of its disk: a full or an incremental since the backup's
/// `since`, reaching its `checkpoint`.
fn check_labels(file: &Path, backup: &Backup, disk: &BackupDisk) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(file)?.take(META_PEEK as u64).read_to_end(&mut head)?;
    let meta = announced_meta(&head).context("the stream starts with no meta frame")?;
    let since = backup.since.as_deref().filter(|_| disk.incremental);
    let labels = (meta["incremental"].as_bool().unwrap_or(false), meta["since"].as_str(), meta["checkpoint"].as_str());
    if labels != (disk.incremental, since, backup.checkpoint.as_deref()) {
        bail!(
            "the stream says incremental {}, since {:?}, checkpoint {:?}; the backup said incremental {}, since {:?}, checkpoint {:?}",
            labels.0,
            labels.1.map(printable),
            labels.2.map(printable),
            disk.incremental,
            since,
            backup.checkpoint
        );
    }
    Ok(())
}

/// Pulls every disk into `out`; then writes `CHECKPOINT.json` if all were
/// saved, or fails naming the disks that were not.
async fn pull_disks(backup: &Backup, requested: &[String], out: &Path, trust: &Trust, progress: &ProgressArg) -> Result<serde_json::Value> {
    check_names(backup, requested)?;
    let label = backup.checkpoint.clone().unwrap_or_else(|| backup.id.clone());
    let mut saved = Vec::new();
    let mut failed = Vec::new();
    for disk in &backup.disks {
        let file = out.join(format!("{}.{label}.sparse", disk.name));
        match pull_disk(backup, disk, &file, trust, progress).await {
            Ok(()) => saved.push(SavedDisk { name: disk.name.clone(), incremental: disk.incremental, file: file.display().to_string() }),
            Err(error) => {
                eprintln!("blockgate: disk {} was not saved: {error:#}", printable(&disk.name));
                failed.push(disk.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("the backup is incomplete: disk(s) {} were not saved; run the backup again", failed.join(", "));
    }
    let record = Saved { vm: &backup.vm, since: backup.since.as_deref(), checkpoint: backup.checkpoint.as_deref(), disks: saved };
    let manifest = out.join(format!("{label}.json"));
    let partial = PartialFile::new(&manifest)?;
    std::fs::write(&partial.temporary, serde_json::to_vec_pretty(&record)?)?;
    partial.commit()?;
    Ok(serde_json::to_value(&record)?)
}

/// Saves one disk's sparse stream into `file`, named only when complete.
async fn pull_disk(backup: &Backup, disk: &BackupDisk, file: &Path, trust: &Trust, progress: &ProgressArg) -> Result<()> {
    let partial = PartialFile::new(file)?;
    let client = ImageClient::new(&disk.url, trust, 1)?;
    let scope = Scope {
        incremental: disk.incremental,
        since: backup.since.clone().filter(|_| disk.incremental),
        checkpoint: backup.checkpoint.clone(),
    };
    let reporter = Reporter::new(progress.progress);
    let stream = client.backup(&scope).await?;
    let mut output =
        tokio::fs::File::create(&partial.temporary).await.with_context(|| format!("creating {}", partial.temporary.display()))?;
    let stats = save_stream(stream, &mut output, &reporter).await?;
    output.sync_all().await.context("syncing the stream file")?;
    check_labels(&partial.temporary, backup, disk)?;
    partial.commit()?;
    reporter.done(&format!("saved disk {} to {}:", disk.name, file.display()), &stats);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(disk: &str, checkpoint: &str) -> Backup {
        let disks = vec![BackupDisk { name: disk.into(), size: 1, incremental: false, url: "https://h/images/t".into() }];
        Backup { id: "b1".into(), vm: "vm".into(), since: None, checkpoint: Some(checkpoint.into()), disks }
    }

    #[test]
    fn names_from_the_server_become_file_names_only_when_they_are_plain() {
        assert!(check_names(&backup("vda", "cp1"), &[]).is_ok());
        for (disk, checkpoint) in [("../x", "cp1"), ("vda", "../../etc/cron.d/x"), ("", "cp1"), ("vda", ".hidden"), ("v/a", "cp1")] {
            assert!(check_names(&backup(disk, checkpoint), &[]).is_err(), "{disk} {checkpoint}");
        }
        assert!(check_names(&backup("vda", "cp1"), &["vdb".to_string()]).is_err());
    }
}
