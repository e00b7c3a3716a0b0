//! Where a restore target's chain stands: the checkpoint the last restore
//! reached, so an incremental is applied only onto the image it continues
//! (checkpoints.md, "The stream and the restore").
//!
//! The record is a file in the state directory, keyed by the target (the
//! image file's device and inode, or its NBD URI). That works for every target,
//! raw or qcow2, owned or reached by URI, and survives restarts; a bitmap
//! in the target would only work for qcow2 images the server owns. Every
//! write through blockgate that is not a link of the chain (PUT of raw
//! data, PATCH zero, a stream that names no checkpoint) clears the record
//! before it writes, and a restore clears it before its first write and
//! sets it only once the whole stream is applied, so a failed restore
//! leaves no record. Writes that bypass blockgate (a VM started on the
//! target) are not seen: nothing else should write a target between the
//! links of its chain.
//!
//! A restore has its target to itself: while one runs, other writes and
//! restores into the same target (through any ticket or path: claims are
//! keyed by the file's device and inode) are refused with
//! 409, and a restore does not start while writes are running, so the
//! checkpoint it records describes what it wrote and nothing else.

use std::collections::HashMap;
use std::sync::LazyLock;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use blockgate_protocol::sparse::Meta;

use crate::clock::now_rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::sources::backend::Backend;
use crate::sources::checkpoints::check_id;
use crate::state_file;

/// The record's content.
#[derive(Debug, Serialize, Deserialize)]
struct Reached {
    target: String,
    checkpoint: String,
    restored: String,
    /// An incremental from `checkpoint` to this one failed part-way: the
    /// target holds `checkpoint` and part of that incremental, so only
    /// the same incremental may be applied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interrupted: Option<String>,
    /// The files the target links to (backing chain, data files) and
    /// their modification times (nanoseconds) when this was recorded: a
    /// write into one of them, through another ticket or behind
    /// blockgate's back, changes the target without clearing its record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    links: Vec<(String, u128)>,
    /// The VM disk the chain's streams are of (`VM-UUID/TARGET`), when
    /// they carry one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk: Option<String>,
}

/// The modification times of the files the target links to.
fn link_times(backend: &Backend) -> Vec<(String, u128)> {
    let modified = |path: &std::path::Path| {
        let time = std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok()?;
        Some(time.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos())
    };
    backend.linked_files().iter().map(|path| (path.display().to_string(), modified(path).unwrap_or(0))).collect()
}

/// The record of the target's file (device and inode, so every path and
/// hard link to it shares one), or of its URI.
fn record_path(backend: &Backend) -> std::path::PathBuf {
    state_file::path_for(backend.state_dir(), "restores", backend.identity())
}

fn failed(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("restore record: {error:#}"))
}

fn load(backend: &Backend) -> ApiResult<Option<Reached>> {
    state_file::load::<Reached>(&record_path(backend)).map_err(failed)
}

fn save(backend: &Backend, checkpoint: &str, interrupted: Option<&str>, disk: Option<&str>) -> ApiResult<()> {
    let reached = Reached {
        target: backend.target().to_string(),
        checkpoint: checkpoint.to_string(),
        restored: now_rfc3339(),
        interrupted: interrupted.map(str::to_string),
        links: link_times(backend),
        disk: disk.map(str::to_string),
    };
    state_file::save(&record_path(backend), &reached).map_err(failed)
}

/// Records that the target now holds the image at `checkpoint` (of VM
/// disk `disk`, for a running VM's streams).
pub fn set(backend: &Backend, checkpoint: &str, disk: Option<&str>) -> ApiResult<()> {
    save(backend, checkpoint, None, disk)
}

/// What runs into each target, process-wide.
#[derive(Debug, Default)]
struct Activity {
    writers: usize,
    restoring: bool,
}

static ACTIVITY: LazyLock<Mutex<HashMap<String, Activity>>> = LazyLock::new(Default::default);

/// A running write or restore into a target; released when dropped.
#[derive(Debug)]
pub struct Claim {
    target: String,
    restore: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut activity = ACTIVITY.lock();
        if let Some(entry) = activity.get_mut(&self.target) {
            if self.restore {
                entry.restoring = false;
            } else {
                entry.writers -= 1;
            }
            if entry.writers == 0 && !entry.restoring {
                activity.remove(&self.target);
            }
        }
    }
}

/// Claims the target for a write or a restore. A restore runs alone; a
/// write runs beside other writes.
fn claim(backend: &Backend, restore: bool) -> ApiResult<Claim> {
    let target = backend.identity().to_string();
    let mut activity = ACTIVITY.lock();
    let entry = activity.entry(target.clone()).or_default();
    if entry.restoring {
        return Err(ApiError::Conflict("a restore into this image is running; writes and other restores wait until it ends".into()));
    }
    if !restore {
        entry.writers += 1;
    } else if entry.writers > 0 {
        return Err(ApiError::Conflict(format!(
            "{} writes into this image are running; a restore starts once they end, so that its checkpoint describes the image",
            entry.writers
        )));
    } else {
        entry.restoring = true;
    }
    Ok(Claim { target, restore })
}

/// Starts a write outside the chain (raw PUT, PATCH zero): refused while a
/// restore runs; clears the record.
pub fn begin_write(backend: &Backend) -> ApiResult<Claim> {
    let claim = claim(backend, false)?;
    forget(backend)?;
    Ok(claim)
}

/// Starts a restore: refused while another restore or any write runs.
pub fn begin_restore(backend: &Backend) -> ApiResult<Claim> {
    claim(backend, true)
}

/// Clears the record: the target is about to change outside its chain.
fn forget(backend: &Backend) -> ApiResult<()> {
    match std::fs::remove_file(record_path(backend)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(failed(error)),
        _ => Ok(()),
    }
}

/// Decides whether a stream labelled `since` → `checkpoint` may be
/// applied, then records that it is under way until it ends. An
/// incremental must continue exactly where the last restore left the
/// target; `force` applies it anyway. While an incremental that continues
/// the chain runs, the record says the target holds `since` and part of
/// this incremental, so that if the restore fails, is dropped or the
/// server dies, the same incremental, and only it, may be applied again.
/// Anything else clears the record until the restore ends. The caller
/// holds the target's restore [`Claim`].
pub fn admit(backend: &Backend, meta: &Meta, force: bool) -> ApiResult<()> {
    let (since, checkpoint, disk) = (meta.since.as_deref(), meta.checkpoint.as_deref(), meta.disk.as_deref());
    for (key, id) in [("since", since), ("checkpoint", checkpoint)] {
        if let Some(id) = id {
            check_id(id).map_err(|error| ApiError::BadRequest(format!("meta frame, key {key:?}: {error}")))?;
        }
    }
    if let Some(since) = since {
        let reached = load(backend)?;
        let links_changed = reached.as_ref().is_some_and(|reached| reached.links != link_times(backend));
        let other_disk = reached.as_ref().is_some_and(|reached| reached.disk.as_deref() != disk);
        let continues = !links_changed
            && !other_disk
            && reached.as_ref().is_some_and(|reached| {
                reached.checkpoint == since && reached.interrupted.as_deref().is_none_or(|to| Some(to) == checkpoint)
            });
        if !continues && !force {
            let at = match &reached {
                Some(reached) if other_disk => format!(
                    "the target holds a backup of {}, and this stream is of {}",
                    reached.disk.as_deref().map_or("an image".to_string(), |disk| format!("VM disk {disk}")),
                    disk.map_or("an image".to_string(), |disk| format!("VM disk {disk}"))
                ),
                Some(reached) if links_changed => format!(
                    "a file the target reads through (its backing or data file) changed since checkpoint {:?} was recorded",
                    reached.checkpoint
                ),
                Some(Reached { checkpoint, interrupted: Some(to), .. }) => format!(
                    "the target holds checkpoint {checkpoint:?} and part of the incremental to {to:?}, which failed part-way \
                     (apply that incremental again)"
                ),
                Some(reached) => format!("the target is at checkpoint {:?}", reached.checkpoint),
                None => "the target has no checkpoint recorded (restore the full backup of the chain first)".to_string(),
            };
            return Err(ApiError::Conflict(format!(
                "this incremental continues from checkpoint {since:?}{}, but {at}; restore the chain in order, or add force=y",
                checkpoint.map(|checkpoint| format!(" to {checkpoint:?}")).unwrap_or_default()
            )));
        }
        if let (true, Some(checkpoint)) = (continues, checkpoint) {
            return save(backend, since, Some(checkpoint), disk);
        }
    }
    forget(backend)
}
