//! The control routes of running VMs (`/vms`): list them, list and delete
//! their checkpoints, and run backups. A backup is one libvirt pull-mode
//! job across the disks asked for ([`VmHost::begin`]) and one read-only
//! ticket per disk on the job's NBD export, labeled with the job's
//! `since` and `checkpoint` so that its sparse streams carry them and a
//! restore chain-checks them. One backup per VM at a time. A backup ends
//! when it is deleted, when a ticket of it expires (its `timeout` with no
//! request, as for any ticket) or is deleted, or when its job stops
//! running (the VM stopped): [`watch`] looks every second and ends it,
//! tickets and files included. A backup is started on a task of its own,
//! so a client that hangs up mid-request leaves no job unaccounted for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use blockgate_nbd::Address;
use blockgate_protocol::ticket::{ImageFormat, MAX_TICKET_BODY, MAX_TIMEOUT, TicketSpec};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::ControlState;
use crate::config::{ImageSource, ImageSpec};
use crate::error::{ApiError, ApiResult};
use crate::http::json_line::JsonLine;
use crate::http::routes::query::{Params, flag};
use crate::sources::backend::{Backend, BackendSettings, BackupPoint};
use crate::sources::checkpoints::check_id;
use crate::sources::vm::{Job, JobDisk, JobRequest, VmHost};
use crate::tickets::{Limits, Ticket, Tickets};

/// A backup's lifetime when the request names none.
const DEFAULT_TIMEOUT: u64 = 3600;

/// `POST /vms/{vm}/backups`'s body; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupRequest {
    #[serde(default)]
    disks: Vec<String>,
    since: Option<String>,
    checkpoint: Option<String>,
    #[serde(default)]
    quiesce: bool,
    timeout: Option<u64>,
}

/// A disk of a backup as the API shows it.
#[derive(Debug, Clone, Serialize)]
struct BackupDiskView {
    name: String,
    size: u64,
    incremental: bool,
    url: String,
}

/// A backup as `POST` and `GET` show it.
#[derive(Debug, Clone, Serialize)]
struct BackupView {
    id: String,
    vm: String,
    since: Option<String>,
    checkpoint: Option<String>,
    expires: String,
    disks: Vec<BackupDiskView>,
}

/// A running backup: its job and its tickets.
struct Backup {
    job: Job,
    ticket_ids: Vec<String>,
    view: BackupView,
}

/// A VM's slot: a backup starting (the slot is taken) or running.
enum Slot {
    Starting,
    Running(Arc<Backup>),
}

/// The VM routes' state.
pub struct VmBackups {
    /// libvirt, or why VM backups are off.
    host: Result<VmHost, String>,
    slots: Mutex<HashMap<String, Slot>>,
    /// `https://HOST:PORT` of the data API, for the disks' urls.
    data_url: String,
}

impl VmBackups {
    /// VM backups through `host`, or off for the reason given.
    pub fn new(host: Result<VmHost, String>, data_url: String) -> VmBackups {
        VmBackups { host, slots: Mutex::new(HashMap::new()), data_url }
    }

    fn host(&self) -> ApiResult<&VmHost> {
        self.host.as_ref().map_err(|why| ApiError::Unavailable(why.clone()))
    }

    /// Ends the jobs a previous run left behind.
    pub async fn end_leftovers(&self) {
        if let Ok(host) = &self.host {
            host.end_leftovers().await;
        }
    }

    fn running(&self) -> Vec<Arc<Backup>> {
        self.slots
            .lock()
            .values()
            .filter_map(|slot| match slot {
                Slot::Running(backup) => Some(backup.clone()),
                Slot::Starting => None,
            })
            .collect()
    }

    /// Ends `backup`: its tickets go (running transfers are canceled), then
    /// its job and files; its slot is freed.
    async fn end(&self, backup: &Arc<Backup>, tickets: &Tickets) {
        for id in &backup.ticket_ids {
            if let Err(error) = tickets.remove(id).await {
                tracing::warn!(vm = %backup.job.vm, backup = %backup.job.id, %error, "a backup ticket is still busy; ending its job anyway");
            }
        }
        if let Ok(host) = &self.host {
            host.end(&backup.job).await;
        }
        let mut slots = self.slots.lock();
        if matches!(slots.get(&backup.job.vm), Some(Slot::Running(current)) if Arc::ptr_eq(current, backup)) {
            slots.remove(&backup.job.vm);
        }
    }

    /// Ends every backup (at shutdown).
    pub async fn end_all(&self, tickets: &Tickets) {
        for backup in self.running() {
            self.end(&backup, tickets).await;
        }
    }
}

/// Ends backups whose tickets expired or are gone, or whose job no longer
/// runs, once a second, for as long as the server runs.
pub async fn watch(backups: Arc<VmBackups>, tickets: Arc<Tickets>) {
    let Ok(host) = &backups.host else { return };
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        host.end_unended().await;
        for backup in backups.running() {
            let why = if backup.ticket_ids.iter().any(|id| tickets.find(id).is_none()) {
                Some("a ticket of it expired or was removed")
            } else {
                match host.is_running(&backup.job).await {
                    Ok(true) => None,
                    Ok(false) => Some("its job stopped (the VM stopped, or someone aborted the job)"),
                    Err(error) => {
                        tracing::warn!(vm = %backup.job.vm, %error, "cannot ask libvirt about a backup job");
                        None
                    }
                }
            };
            if let Some(why) = why {
                tracing::info!(vm = %backup.job.vm, backup = %backup.job.id, "ending the backup: {why}");
                backups.end(&backup, &tickets).await;
            }
        }
    }
}

/// 128 random bits as 32 hex digits (ticket ids are credentials).
fn random_hex(bytes: usize) -> ApiResult<String> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|error| ApiError::Internal(format!("no random numbers: {error}")))?;
    Ok(hex::encode(buffer))
}

/// A VM name from a path: what libvirt could name, within reason.
fn check_vm_name(vm: &str) -> ApiResult<()> {
    if vm.is_empty() || vm.len() > 255 || vm.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError::BadRequest(format!("invalid VM name {vm:?}: 1-255 characters, no '/' and no control characters")));
    }
    Ok(())
}

/// A disk name: a target such as `vda` or `sdb`.
fn check_disk_name(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 32 || !name.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
        return Err(ApiError::BadRequest(format!("field \"disks\": invalid disk name {name:?}: expected a target such as vda")));
    }
    Ok(())
}

fn parse_request(body: &[u8]) -> ApiResult<BackupRequest> {
    let request: BackupRequest = if body.iter().all(u8::is_ascii_whitespace) {
        BackupRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|error| ApiError::BadRequest(format!("backup request: {error}")))?
    };
    for (index, name) in request.disks.iter().enumerate() {
        check_disk_name(name)?;
        if request.disks[..index].contains(name) {
            return Err(ApiError::BadRequest(format!("field \"disks\": disk {name:?} is named twice")));
        }
    }
    for (field, id) in [("since", &request.since), ("checkpoint", &request.checkpoint)] {
        if let Some(id) = id {
            check_id(id).map_err(|error| ApiError::BadRequest(format!("field {field:?}: {error}")))?;
        }
    }
    if request.since.is_some() && request.since == request.checkpoint {
        return Err(ApiError::BadRequest("field \"checkpoint\" must differ from \"since\"".into()));
    }
    match request.timeout {
        Some(0) => Err(ApiError::BadRequest("field \"timeout\": must be at least 1 second".into())),
        Some(timeout) if timeout > MAX_TIMEOUT => Err(ApiError::BadRequest(format!("field \"timeout\": at most {MAX_TIMEOUT} seconds"))),
        _ => Ok(request),
    }
}

fn rfc3339(time: SystemTime) -> String {
    time::OffsetDateTime::from(time)
        .replace_nanosecond(0)
        .ok()
        .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// `GET /vms`.
pub async fn list(State(state): State<ControlState>) -> ApiResult<Response> {
    Ok(JsonLine(state.vms.host()?.list().await?).into_response())
}

/// `GET /vms/{vm}/checkpoints`.
pub async fn checkpoints(State(state): State<ControlState>, Path(vm): Path<String>) -> ApiResult<Response> {
    check_vm_name(&vm)?;
    Ok(JsonLine(state.vms.host()?.checkpoints(&vm).await?).into_response())
}

/// `DELETE /vms/{vm}/checkpoints/{id}[?metadata_only=y]`.
pub async fn delete_checkpoint(
    State(state): State<ControlState>,
    Path((vm, id)): Path<(String, String)>,
    Query(params): Query<Params>,
) -> ApiResult<Response> {
    check_vm_name(&vm)?;
    check_id(&id)?;
    let metadata_only = flag(&params, "metadata_only", false)?;
    if let Some(Slot::Running(backup)) = state.vms.slots.lock().get(&vm) {
        if [&backup.job.since, &backup.job.checkpoint].into_iter().flatten().any(|used| used == &id) {
            return Err(ApiError::Conflict(format!(
                "checkpoint {id:?} belongs to the running backup {} of VM {vm:?}; delete the backup first",
                backup.job.id
            )));
        }
    }
    state.vms.host()?.delete_checkpoint(&vm, &id, metadata_only).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /vms/{vm}/backups`: begins the job and makes its tickets.
pub async fn create_backup(State(state): State<ControlState>, Path(vm): Path<String>, body: Body) -> ApiResult<Response> {
    check_vm_name(&vm)?;
    let body = axum::body::to_bytes(body, MAX_TICKET_BODY)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(format!("body is larger than {MAX_TICKET_BODY} bytes")))?;
    let request = parse_request(&body)?;
    state.vms.host()?;
    {
        let mut slots = state.vms.slots.lock();
        match slots.get(&vm) {
            Some(Slot::Running(backup)) => {
                return Err(ApiError::Conflict(format!("VM {vm:?} already has a backup running ({}); delete it first", backup.job.id)));
            }
            Some(Slot::Starting) => return Err(ApiError::Conflict(format!("VM {vm:?} has a backup starting"))),
            None => slots.insert(vm.clone(), Slot::Starting),
        };
    }
    // On a task of its own: a client that hangs up must not drop a job
    // half-begun, nor leave the slot taken.
    let started = tokio::spawn({
        let (state, vm) = (state.clone(), vm.clone());
        async move {
            let started = start_backup(&state, &vm, request).await;
            let mut slots = state.vms.slots.lock();
            match started {
                Ok(backup) => {
                    let view = backup.view.clone();
                    slots.insert(vm, Slot::Running(backup));
                    Ok(view)
                }
                Err(error) => {
                    slots.remove(&vm);
                    Err(error)
                }
            }
        }
    })
    .await
    .map_err(|error| ApiError::Internal(format!("starting the backup: {error}")))??;
    Ok((StatusCode::CREATED, JsonLine(started)).into_response())
}

/// Begins the job, then opens one ticket per disk; a failure ends what
/// was made.
async fn start_backup(state: &ControlState, vm: &str, request: BackupRequest) -> ApiResult<Arc<Backup>> {
    let host = state.vms.host()?;
    let id = random_hex(8)?;
    let checkpoint = match request.checkpoint {
        Some(checkpoint) => checkpoint,
        None => format!("{}-{id}", time::OffsetDateTime::now_utc().unix_timestamp()),
    };
    let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let job_request = JobRequest { disks: request.disks, since: request.since, checkpoint, quiesce: request.quiesce };
    let began = std::time::Instant::now();
    let job = host.begin(vm, &id, job_request).await?;
    tracing::info!(vm, backup = %id, since = ?job.since, checkpoint = ?job.checkpoint, elapsed = ?began.elapsed(), "backup job begun");
    let mut ticket_ids = Vec::new();
    let mut disks = Vec::new();
    for disk in &job.disks {
        match open_disk_ticket(&job, disk, timeout, state.limits, &state.backend).await {
            Ok(ticket) => {
                disks.push(BackupDiskView {
                    name: disk.name.clone(),
                    size: disk.size,
                    incremental: disk.incremental,
                    url: format!("{}/images/{}", state.vms.data_url, ticket.id),
                });
                ticket_ids.push(ticket.id.clone());
                if let Some(raced) = state.tickets.insert(ticket) {
                    raced.backend.stop().await;
                }
            }
            Err(error) => {
                for id in &ticket_ids {
                    let _ = state.tickets.remove(id).await;
                }
                host.end(&job).await;
                return Err(error);
            }
        }
    }
    let expires = SystemTime::now() + Duration::from_secs(timeout);
    let view = BackupView {
        id,
        vm: vm.to_string(),
        since: job.since.clone(),
        checkpoint: job.checkpoint.clone(),
        expires: rfc3339(expires),
        disks,
    };
    Ok(Arc::new(Backup { job, ticket_ids, view }))
}

/// A read-only ticket on one disk of the job's export.
async fn open_disk_ticket(job: &Job, disk: &JobDisk, timeout: u64, limits: Limits, settings: &BackendSettings) -> ApiResult<Ticket> {
    let address = Address::unix(job.socket(), disk.name.as_str());
    let bitmap = disk.incremental.then(|| format!("backup-{}", disk.name));
    let image = ImageSpec {
        id: disk.name.clone(),
        source: ImageSource::Nbd(address.clone()),
        read_only: true,
        bitmap: bitmap.clone(),
        dirty: false,
        create_size: None,
        sparse: false,
        format: None,
        checkpoints: false,
        from_ticket: true,
    };
    let point = BackupPoint {
        since: job.since.clone().filter(|_| disk.incremental),
        checkpoint: job.checkpoint.clone(),
        disk: format!("{}/{}", job.uuid, disk.name),
    };
    let backend = Backend::open(&image, settings.clone())
        .await
        .map_err(|error| ApiError::Libvirt(format!("cannot open the export of disk {:?}: {error:#}", disk.name)))?
        .at_backup_point(point);
    let spec = TicketSpec {
        uuid: random_hex(16)?,
        size: backend.size(),
        url: address.to_string(),
        ops: vec!["read".into()],
        timeout,
        // Only `timeout` ends it, pushed back by each request and by a
        // PATCH: a backup's disks are pulled one after another, and no
        // ticket may lapse while the others are read.
        inactivity_timeout: MAX_TIMEOUT,
        sparse: false,
        dirty: false,
        transfer_id: None,
        filename: None,
        bitmap,
        format: ImageFormat::Raw,
    };
    Ok(Ticket::from_spec(spec, Arc::new(backend), limits))
}

fn find_backup(state: &ControlState, vm: &str, id: &str) -> ApiResult<Arc<Backup>> {
    match state.vms.slots.lock().get(vm) {
        Some(Slot::Running(backup)) if backup.job.id == id => Ok(backup.clone()),
        _ => Err(ApiError::NotFound(format!("VM {vm:?} has no backup {id:?}"))),
    }
}

/// `GET /vms/{vm}/backups/{id}`: the backup, its job's state, the scratch
/// bytes its job holds, and the transfers running on its tickets.
pub async fn backup_status(State(state): State<ControlState>, Path((vm, id)): Path<(String, String)>) -> ApiResult<Response> {
    check_vm_name(&vm)?;
    let backup = find_backup(&state, &vm, &id)?;
    let running = state.vms.host()?.is_running(&backup.job).await?;
    let scratch_bytes = scratch_bytes(&backup.job.directory);
    let transfers: u64 = backup
        .ticket_ids
        .iter()
        .filter_map(|id| state.tickets.find(id))
        .filter_map(|ticket| ticket.status())
        .map(|status| status.connections)
        .sum();
    let mut body = serde_json::to_value(&backup.view).map_err(|error| ApiError::Internal(error.to_string()))?;
    body["state"] = serde_json::Value::from(if running { "running" } else { "ended" });
    body["scratch_bytes"] = serde_json::Value::from(scratch_bytes);
    body["transfers"] = serde_json::Value::from(transfers);
    Ok(JsonLine(body).into_response())
}

/// Bytes allocated by the job's scratch files.
fn scratch_bytes(directory: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(directory)
        .map(|entries| {
            entries.flatten().filter_map(|entry| entry.metadata().ok()).filter(|meta| meta.is_file()).map(|meta| meta.blocks() * 512).sum()
        })
        .unwrap_or(0)
}

/// `DELETE /vms/{vm}/backups/{id}`: ends the job, removes its tickets and
/// scratch files.
pub async fn delete_backup(State(state): State<ControlState>, Path((vm, id)): Path<(String, String)>) -> ApiResult<Response> {
    check_vm_name(&vm)?;
    let backup = find_backup(&state, &vm, &id)?;
    state.vms.end(&backup, &state.tickets).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_requests_are_checked_field_by_field() {
        let empty = parse_request(b"").unwrap();
        assert!(empty.disks.is_empty() && empty.since.is_none() && !empty.quiesce);
        let full = parse_request(br#"{"disks":["vda","vdb"],"since":"cp1","checkpoint":"cp2","quiesce":true,"timeout":60}"#).unwrap();
        assert_eq!((full.disks.len(), full.since.as_deref(), full.timeout), (2, Some("cp1"), Some(60)));
        for (body, words) in [
            (&br#"{"disks":["../x"]}"#[..], "disk name"),
            (br#"{"since":"a/b"}"#, "\"since\""),
            (br#"{"since":"cp1","checkpoint":"cp1"}"#, "differ"),
            (br#"{"timeout":0}"#, "timeout"),
            (br#"{"timeout":18446744073709551615}"#, "timeout"),
            (br#"{"disk":["vda"]}"#, "unknown field"),
            (br#"{"disks":["vda","vda"]}"#, "twice"),
            (br#"{"quiesce":"yes"}"#, "backup request"),
        ] {
            let error = parse_request(body).unwrap_err().to_string();
            assert!(error.contains(words), "{error}");
        }
    }
}
