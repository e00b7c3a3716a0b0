//! Running VMs as a source: the disks of libvirt domains, read through
//! pull-mode backup jobs. [`VmHost`] asks libvirt (through the
//! `blockgate-libvirt` crate) for domains, checkpoints and jobs: a job is
//! begun with its checkpoint in one call (one instant across its disks),
//! its scratch files and NBD socket live in a directory of its own under
//! the state directory, and ending it aborts the job and removes that
//! directory. What a job exports is then an NBD URI like any other; the
//! control routes turn it into tickets. Nothing half-made stays: a job
//! that fails to start leaves no directory (libvirt makes no checkpoint
//! without its job), and a server that starts ends the jobs a previous
//! run left behind.

pub mod xml;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockgate_libvirt::{Connection, Domain, code, state};
use serde::Serialize;

use crate::error::{ApiError, ApiResult};
use xml::{BackupDisk, DomainDisk};

/// The name of the file that marks a job directory as ours.
const JOB_FILE: &str = "job.json";

/// A disk of a VM, as `GET /vms` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    /// The target (`vda`).
    pub name: String,
    /// The file or block device behind it.
    pub file: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Size in bytes, as the guest sees it; null when libvirt cannot tell
    /// (the file of a VM that is off is gone).
    pub size: Option<u64>,
    /// True if the disk can hold checkpoints (qcow2).
    pub checkpoints: bool,
}

/// A VM, as `GET /vms` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// The domain's name.
    pub name: String,
    /// The domain's UUID.
    pub uuid: String,
    /// `running`, `paused`, `shut off`...
    pub state: &'static str,
    /// Its disks.
    pub disks: Vec<DiskInfo>,
}

/// A checkpoint of a VM, as `GET /vms/{vm}/checkpoints` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// The checkpoint's id.
    pub id: String,
    /// When it was made (RFC 3339).
    pub created: String,
    /// The checkpoint before it.
    pub parent: Option<String>,
    /// The disks it tracks.
    pub disks: Vec<String>,
    /// False when a bitmap of it is missing or inconsistent (the VM's
    /// qemu did not close its disks): an incremental from it is refused.
    /// Unknown (null) while the VM is not running.
    pub usable: Option<bool>,
}

/// What a backup job is asked for.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Disks to back up; empty for all.
    pub disks: Vec<String>,
    /// The checkpoint an incremental starts from.
    pub since: Option<String>,
    /// The checkpoint the job makes.
    pub checkpoint: String,
    /// Freeze the guest's file systems around the job's start.
    pub quiesce: bool,
}

/// A disk a job exports.
#[derive(Debug, Clone, Serialize)]
pub struct JobDisk {
    /// The disk's target, also the NBD export's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// True if only what changed since `since` is marked dirty (its
    /// export has the bitmap `backup-NAME`); false for a full export.
    pub incremental: bool,
}

/// A backup job libvirt runs for us.
#[derive(Debug, Clone)]
pub struct Job {
    /// The backup's id.
    pub id: String,
    /// The domain's name.
    pub vm: String,
    /// The domain's UUID.
    pub uuid: String,
    /// The checkpoint incremental disks start from.
    pub since: Option<String>,
    /// The checkpoint made with the job, if any disk can hold one.
    pub checkpoint: Option<String>,
    /// The disks it exports.
    pub disks: Vec<JobDisk>,
    /// Its directory: scratch files and the NBD socket.
    pub directory: PathBuf,
}

impl Job {
    /// The unix socket of the job's NBD server.
    pub fn socket(&self) -> PathBuf {
        self.directory.join("nbd.sock")
    }

    /// The scratch file of disk `name`.
    fn scratch(&self, name: &str) -> PathBuf {
        self.directory.join(format!("{name}.scratch.qcow2"))
    }
}

/// What a job's directory records, for the server's next start.
#[derive(Serialize, serde::Deserialize)]
struct JobMark {
    vm: String,
    id: String,
}

/// A libvirt error as the API answers it.
fn api_error(error: blockgate_libvirt::Error) -> ApiError {
    match error.code {
        code::UNAVAILABLE => ApiError::Unavailable(format!("VM backups are unavailable: {}", error.message)),
        code::NO_DOMAIN => ApiError::NotFound(format!("no such VM: {}", error.message)),
        code::NO_DOMAIN_CHECKPOINT => ApiError::NotFound(format!("no such checkpoint: {}", error.message)),
        code::CHECKPOINT_INCONSISTENT => {
            ApiError::Conflict(format!("the checkpoint cannot be used ({}); take a full backup to start a new chain", error.message))
        }
        code::OPERATION_INVALID | code::AGENT_UNRESPONSIVE => ApiError::Conflict(error.message),
        _ => ApiError::Libvirt(error.message),
    }
}

/// A domain state as the API names it.
fn state_name(value: i32) -> &'static str {
    match value {
        state::RUNNING => "running",
        2 => "blocked",
        state::PAUSED => "paused",
        4 => "shutting down",
        state::SHUTOFF => "shut off",
        6 => "crashed",
        7 => "suspended",
        _ => "unknown",
    }
}

/// The names of the dirty bitmaps qemu has and can use (present, not
/// marked inconsistent), from a `query-named-block-nodes` reply. A
/// checkpoint made while the VM ran has its bitmaps only in qemu's memory
/// until qemu closes the disk: when that qemu is killed they are gone.
fn usable_bitmaps(reply: &str) -> Result<HashSet<String>, String> {
    let reply: serde_json::Value = serde_json::from_str(reply).map_err(|error| format!("QMP reply: {error}"))?;
    let nodes = reply["return"].as_array().ok_or("QMP reply without a return list")?;
    Ok(nodes
        .iter()
        .filter_map(|node| node["dirty-bitmaps"].as_array())
        .flatten()
        .filter(|bitmap| bitmap["inconsistent"].as_bool() != Some(true))
        .filter_map(|bitmap| bitmap["name"].as_str().map(str::to_string))
        .collect())
}

/// libvirt, reached through one connection that is opened again when it
/// dies (libvirtd restarted).
pub struct VmHost {
    uri: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    jobs_dir: PathBuf,
    /// Jobs whose abort did not reach libvirt (it was down): their files
    /// stay, and [`VmHost::end_unended`] tries again.
    unended: parking_lot::Mutex<Vec<Job>>,
}

impl VmHost {
    /// libvirt at `uri`; each job keeps its files in a directory of its
    /// own under `jobs_dir`.
    pub fn new(uri: String, jobs_dir: PathBuf) -> VmHost {
        // libvirt needs absolute paths for the socket and scratch files.
        let jobs_dir = std::path::absolute(&jobs_dir).unwrap_or(jobs_dir);
        VmHost { uri, connection: tokio::sync::Mutex::new(None), jobs_dir, unended: parking_lot::Mutex::new(Vec::new()) }
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `call` off the async workers with a connection that answers,
    /// opening a new one when the last one does not (libvirtd restarted).
    /// Calls run one at a time.
    async fn with_connection<T: Send + 'static>(&self, call: impl FnOnce(&Connection) -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
        let mut current = self.connection.lock().await;
        let (existing, uri) = (current.clone(), self.uri.clone());
        let (connection, result) = tokio::task::spawn_blocking(move || {
            let connection = match existing.filter(|connection| connection.answers()) {
                Some(connection) => connection,
                None => Arc::new(Connection::open(&uri).map_err(|error| match error.code {
                    code::UNAVAILABLE => api_error(error),
                    _ => ApiError::Unavailable(format!("cannot reach libvirt at {uri}: {}", error.message)),
                })?),
            };
            let result = call(&connection);
            Ok::<_, ApiError>((connection, result))
        })
        .await
        .map_err(|error| ApiError::Internal(error.to_string()))??;
        *current = Some(connection);
        result
    }

    /// Every domain libvirt knows, with its disks.
    pub async fn list(&self) -> ApiResult<Vec<VmInfo>> {
        self.with_connection(|connection| {
            let mut vms = Vec::new();
            for domain in connection.domains().map_err(api_error)? {
                match describe(&domain) {
                    Ok(vm) => vms.push(vm),
                    // A domain undefined while we listed: not an error.
                    Err(ApiError::NotFound(_)) => {}
                    Err(error) => return Err(error),
                }
            }
            vms.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(vms)
        })
        .await
    }

    /// One domain.
    pub async fn get(&self, vm: &str) -> ApiResult<VmInfo> {
        let vm = vm.to_string();
        self.with_connection(move |connection| describe(&lookup(connection, &vm)?)).await
    }

    /// A VM's checkpoints, oldest first.
    pub async fn checkpoints(&self, vm: &str) -> ApiResult<Vec<CheckpointInfo>> {
        let vm = vm.to_string();
        self.with_connection(move |connection| checkpoints_of(&lookup(connection, &vm)?)).await
    }

    /// Deletes a checkpoint (libvirt merges its bitmaps into its parent's);
    /// with `metadata_only`, only libvirt's record of a broken one.
    pub async fn delete_checkpoint(&self, vm: &str, id: &str, metadata_only: bool) -> ApiResult<()> {
        let (vm, id) = (vm.to_string(), id.to_string());
        self.with_connection(move |connection| {
            let domain = lookup(connection, &vm)?;
            if !metadata_only && checkpoints_of(&domain)?.iter().any(|checkpoint| checkpoint.id == id && checkpoint.usable == Some(false)) {
                return Err(ApiError::Conflict(format!(
                    "checkpoint {id:?} of VM {vm:?} is broken (its bitmaps are missing or inconsistent); remove its record with metadata_only=y"
                )));
            }
            domain.delete_checkpoint(&id, metadata_only).map_err(|error| match error.code {
                code::NO_DOMAIN_CHECKPOINT => ApiError::NotFound(format!("VM {vm:?} has no checkpoint {id:?}")),
                _ => api_error(error),
            })
        })
        .await
    }

    /// Begins a pull-mode backup job, with its checkpoint. On any failure
    /// nothing is left: no job, no checkpoint, no directory.
    pub async fn begin(&self, vm: &str, id: &str, request: JobRequest) -> ApiResult<Job> {
        let directory = self.jobs_dir.join(id);
        let job = Job {
            id: id.to_string(),
            vm: vm.to_string(),
            uuid: String::new(),
            since: None,
            checkpoint: None,
            disks: Vec::new(),
            directory,
        };
        let started = {
            let job = job.clone();
            self.with_connection(move |connection| begin_job(connection, job, request)).await
        };
        if started.is_err() {
            remove_directory(&job.directory).await;
        }
        started
    }

    /// True while libvirt runs `job` (the domain runs and its backup job
    /// is the one exporting on the job's socket).
    pub async fn is_running(&self, job: &Job) -> ApiResult<bool> {
        let (vm, socket) = (job.vm.clone(), job.socket());
        self.with_connection(move |connection| match connection.domain(&vm) {
            Ok(domain) => Ok(runs_job(&domain, &socket)),
            Err(error) if error.code == code::NO_DOMAIN => Ok(false),
            Err(error) => Err(api_error(error)),
        })
        .await
    }

    /// Ends `job`: aborts it if it still runs, then removes its directory.
    /// When libvirt cannot be asked, the job and its files are kept and
    /// ended later ([`VmHost::end_unended`]), never forgotten.
    pub async fn end(&self, job: &Job) {
        let (vm, socket) = (job.vm.clone(), job.socket());
        match self.with_connection(move |connection| abort_if_running(connection, &vm, &socket)).await {
            Ok(()) => {
                remove_directory(&job.directory).await;
                tracing::info!(vm = %job.vm, backup = %job.id, "backup job ended");
            }
            Err(error) => {
                tracing::warn!(vm = %job.vm, backup = %job.id, %error, "could not end the backup job; trying again every second");
                self.unended.lock().push(job.clone());
            }
        }
    }

    /// Tries again to end the jobs libvirt could not be asked to end.
    pub async fn end_unended(&self) {
        let jobs = std::mem::take(&mut *self.unended.lock());
        for job in jobs {
            self.end(&job).await;
        }
    }

    /// Ends the jobs a previous run of the server left behind and removes
    /// their files: the directories under the jobs directory that hold a
    /// job record. Anything else there (another program's files, a
    /// symlink) is left alone.
    pub async fn end_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.jobs_dir) else { return };
        for entry in entries.flatten() {
            let directory = entry.path();
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let mark = std::fs::read(directory.join(JOB_FILE)).ok().and_then(|bytes| serde_json::from_slice::<JobMark>(&bytes).ok());
            let Some(mark) = mark else {
                tracing::warn!(directory = %directory.display(), "leaving alone a directory without a job record among the backup jobs");
                continue;
            };
            let job = Job {
                id: mark.id,
                vm: mark.vm,
                uuid: String::new(),
                since: None,
                checkpoint: None,
                disks: Vec::new(),
                directory: directory.clone(),
            };
            tracing::info!(vm = %job.vm, backup = %job.id, "ending a backup job left by an earlier run");
            self.end(&job).await;
        }
    }
}

async fn remove_directory(directory: &Path) {
    match tokio::fs::remove_dir_all(directory).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(directory = %directory.display(), %error, "could not remove a backup job's files"),
    }
}

fn lookup(connection: &Connection, vm: &str) -> ApiResult<Domain> {
    connection.domain(vm).map_err(|error| match error.code {
        code::NO_DOMAIN => ApiError::NotFound(format!("no such VM {vm:?}")),
        _ => api_error(error),
    })
}

fn disks_of(domain: &Domain) -> ApiResult<Vec<DomainDisk>> {
    xml::domain_disks(&domain.xml().map_err(api_error)?).map_err(ApiError::Libvirt)
}

fn describe(domain: &Domain) -> ApiResult<VmInfo> {
    let disks = disks_of(domain)?
        .into_iter()
        .map(|disk| {
            let size = domain.disk_size(&disk.name).ok();
            DiskInfo { checkpoints: disk.has_checkpoints(), name: disk.name, file: disk.file, format: disk.format, size }
        })
        .collect();
    Ok(VmInfo {
        name: domain.name(),
        uuid: domain.uuid().map_err(api_error)?,
        state: state_name(domain.state().map_err(api_error)?),
        disks,
    })
}

fn is_running(domain: &Domain) -> ApiResult<bool> {
    Ok(matches!(domain.state().map_err(api_error)?, state::RUNNING | state::PAUSED))
}

fn checkpoints_of(domain: &Domain) -> ApiResult<Vec<CheckpointInfo>> {
    let parsed = domain
        .checkpoints()
        .map_err(api_error)?
        .iter()
        .map(|text| xml::checkpoint(text).map_err(ApiError::Libvirt))
        .collect::<ApiResult<Vec<_>>>()?;
    let usable = match is_running(domain)? {
        true => match domain.qmp(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#) {
            Ok(reply) => usable_bitmaps(&reply).map_err(ApiError::Libvirt).map(Some)?,
            Err(error) => {
                tracing::warn!(vm = %domain.name(), %error, "cannot ask qemu which bitmaps it can use");
                None
            }
        },
        false => None,
    };
    Ok(parsed
        .into_iter()
        .map(|checkpoint| CheckpointInfo {
            usable: usable.as_ref().map(|usable| checkpoint.disks.iter().all(|(_, bitmap)| usable.contains(bitmap))),
            created: time::OffsetDateTime::from_unix_timestamp(checkpoint.created)
                .ok()
                .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_default(),
            disks: checkpoint.disks.into_iter().map(|(disk, _)| disk).collect(),
            parent: checkpoint.parent,
            id: checkpoint.name,
        })
        .collect())
}

/// True if `domain` runs a backup job exporting on `socket`.
fn runs_job(domain: &Domain, socket: &Path) -> bool {
    domain.backup_xml().is_ok_and(|xml| xml::backup_socket(&xml).is_some_and(|exported| Path::new(&exported) == socket))
}

fn abort_if_running(connection: &Connection, vm: &str, socket: &Path) -> ApiResult<()> {
    let domain = match connection.domain(vm) {
        Ok(domain) => domain,
        Err(error) if error.code == code::NO_DOMAIN => return Ok(()),
        Err(error) => return Err(api_error(error)),
    };
    if runs_job(&domain, socket) {
        match domain.abort_job() {
            Ok(()) => {}
            // Ended by itself between the check and the abort.
            Err(error) if matches!(error.code, code::OPERATION_INVALID | code::NO_DOMAIN_BACKUP) => {}
            Err(error) => return Err(api_error(error)),
        }
    }
    Ok(())
}

/// Gives the job's directory (0700: its scratch files hold guest data) to
/// the user that owns the VM's disk, which is the user qemu runs as when
/// libvirt manages ownership (`libvirt-qemu` on a stock host): qemu
/// writes the scratch files and the socket there. Only root can, and
/// only needs to when that user is another one.
fn share_with_qemu(directory: &Path, disk: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(disk) else { return };
    let ours = nix::unistd::geteuid();
    if ours.is_root() && meta.uid() != ours.as_raw() {
        if let Err(error) = std::os::unix::fs::chown(directory, Some(meta.uid()), Some(meta.gid())) {
            tracing::warn!(directory = %directory.display(), %error, "could not give the backup's directory to qemu's user");
        }
    }
}

/// Checks the request against the domain, then begins the job.
fn begin_job(connection: &Connection, mut job: Job, request: JobRequest) -> ApiResult<Job> {
    let domain = lookup(connection, &job.vm)?;
    job.uuid = domain.uuid().map_err(api_error)?;
    if !is_running(&domain)? {
        return Err(ApiError::Conflict(format!(
            "VM {:?} is not running, so it has no backup job; back up its disk files as images (an --image or a file:// ticket, with their checkpoints)",
            job.vm
        )));
    }
    let all_disks = disks_of(&domain)?;
    let chosen: Vec<&DomainDisk> = match request.disks.is_empty() {
        true => all_disks.iter().collect(),
        false => request
            .disks
            .iter()
            .map(|name| {
                all_disks.iter().find(|disk| &disk.name == name).ok_or_else(|| {
                    let known: Vec<&str> = all_disks.iter().map(|disk| disk.name.as_str()).collect();
                    ApiError::NotFound(format!("VM {:?} has no disk {name:?}; its disks: {}", job.vm, known.join(", ")))
                })
            })
            .collect::<ApiResult<_>>()?,
    };
    if chosen.is_empty() {
        return Err(ApiError::Conflict(format!("VM {:?} has no disk to back up", job.vm)));
    }
    let checkpoints = checkpoints_of(&domain)?;
    if checkpoints.iter().any(|checkpoint| checkpoint.id == request.checkpoint) {
        return Err(ApiError::Conflict(format!(
            "VM {:?} already has checkpoint {:?}; name a new one (or none, and the server names it)",
            job.vm, request.checkpoint
        )));
    }
    let since_disks: Vec<String> = match &request.since {
        None => Vec::new(),
        Some(since) => match checkpoints.iter().find(|checkpoint| &checkpoint.id == since) {
            None => return Err(ApiError::NotFound(format!("VM {:?} has no checkpoint {since:?}", job.vm))),
            Some(checkpoint) if checkpoint.usable == Some(false) => {
                return Err(ApiError::Conflict(format!(
                    "checkpoint {since:?} of VM {:?} cannot be used: its bitmaps are missing or inconsistent (the VM's qemu stopped without closing its disks); take a full backup to start a new chain",
                    job.vm
                )));
            }
            Some(checkpoint) => checkpoint.disks.clone(),
        },
    };
    job.disks = chosen
        .iter()
        .map(|disk| {
            let incremental = disk.has_checkpoints() && since_disks.contains(&disk.name);
            Ok(JobDisk { name: disk.name.clone(), size: domain.disk_size(&disk.name).map_err(api_error)?, incremental })
        })
        .collect::<ApiResult<_>>()?;
    let bitmap_disks: Vec<&str> = chosen.iter().filter(|disk| disk.has_checkpoints()).map(|disk| disk.name.as_str()).collect();
    let others: Vec<&str> =
        all_disks.iter().map(|disk| disk.name.as_str()).filter(|name| !job.disks.iter().any(|chosen| chosen.name == *name)).collect();
    let no_bitmap: Vec<&str> = all_disks.iter().map(|disk| disk.name.as_str()).filter(|name| !bitmap_disks.contains(name)).collect();
    let any_incremental = job.disks.iter().any(|disk| disk.incremental);
    job.since = request.since.clone().filter(|_| any_incremental);
    job.checkpoint = (!bitmap_disks.is_empty()).then(|| request.checkpoint.clone());

    // sun_path holds 108 bytes with its NUL: a longer socket path would
    // only fail inside qemu, with a vaguer message.
    if job.socket().as_os_str().len() >= 108 {
        return Err(ApiError::Internal(format!(
            "the backup's NBD socket {} is longer than a unix socket path may be; use a shorter --vm-scratch-dir",
            job.socket().display()
        )));
    }
    std::fs::create_dir_all(&job.directory).map_err(|error| ApiError::Internal(format!("{}: {error}", job.directory.display())))?;
    share_with_qemu(&job.directory, &chosen[0].file);
    let mark = serde_json::to_vec(&JobMark { vm: job.vm.clone(), id: job.id.clone() }).expect("serializable");
    std::fs::write(job.directory.join(JOB_FILE), mark)
        .map_err(|error| ApiError::Internal(format!("{}: {error}", job.directory.display())))?;

    let scratch: Vec<PathBuf> = job.disks.iter().map(|disk| job.scratch(&disk.name)).collect();
    let backup_disks: Vec<BackupDisk<'_>> = job
        .disks
        .iter()
        .zip(&scratch)
        .map(|(disk, scratch)| BackupDisk { name: &disk.name, scratch, incremental: disk.incremental })
        .collect();
    let backup_xml = xml::backup(&job.socket(), job.since.as_deref(), &backup_disks, &others);
    let checkpoint_xml = job.checkpoint.as_ref().map(|id| xml::new_checkpoint(id, &bitmap_disks, &no_bitmap));
    if request.quiesce {
        domain.freeze_filesystems().map_err(|error| {
            ApiError::Conflict(format!("cannot quiesce VM {:?} ({}); is its guest agent installed and running?", job.vm, error.message))
        })?;
    }
    let begun = domain.begin_backup(&backup_xml, checkpoint_xml.as_deref());
    if request.quiesce {
        if let Err(error) = domain.thaw_filesystems() {
            tracing::error!(vm = %job.vm, %error, "could not thaw the guest's file systems after the backup began");
        }
    }
    begun.map_err(|error| match error.code {
        code::OPERATION_INVALID => ApiError::Conflict(format!("VM {:?} cannot start a backup now: {}", job.vm, error.message)),
        _ => api_error(error),
    })?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_bitmaps_are_those_qemu_has_and_does_not_mark_inconsistent() {
        let reply =
            r#"{"return":[{"node-name":"a","dirty-bitmaps":[{"name":"cp1","inconsistent":true},{"name":"cp2"}]},{"node-name":"b"}]}"#;
        assert_eq!(usable_bitmaps(reply).unwrap(), HashSet::from(["cp2".to_string()]));
        assert!(usable_bitmaps("{}").is_err());
        assert!(usable_bitmaps("not json").is_err());
    }
}
