//! Checkpoints of an image blockgate owns (checkpoints.md): each one a
//! persistent qcow2 dirty bitmap named by its id, added live over QMP and
//! left recording, so "changed since X" is bitmap X alone and deleting X
//! touches no other. blockgate keeps its own record of them (id, created,
//! parent) in the state directory, because a daemon killed with `kill -9`
//! leaves its bitmaps inconsistent or loses the newest ones entirely: a
//! recorded checkpoint whose bitmap is missing or inconsistent is listed
//! as not usable, and an incremental from it is refused.
//!
//! A dirty map is never read from a bitmap that is still recording: each
//! request freezes a disabled copy (one QMP transaction, together with the
//! checkpoint that starts the next round, when one is asked for) and reads
//! it through an export of its own, removed when the request ends. Writes
//! made during the request land in the next round, never half in this one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blockgate_nbd::qemu::StorageDaemon;
use blockgate_nbd::qmp::QmpError;
use blockgate_protocol::checkpoint::{self, Checkpoint};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::sources::owned::Monitor;
use crate::state_file;

/// Checkpoints one image may have unless `--max-checkpoints` says
/// otherwise.
pub const DEFAULT_LIMIT: usize = 16;
/// Prefix of the bitmaps and exports blockgate makes for itself; no
/// checkpoint id can start with it (ids never start with `.`).
const RESERVED_PREFIX: &str = ".blockgate.";

/// Refuses an id that is not 1-64 of `[A-Za-z0-9._-]` or starts with `.`.
pub fn check_id(id: &str) -> ApiResult<()> {
    checkpoint::check_id(id).map_err(ApiError::BadRequest)
}

/// What blockgate records of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    id: String,
    created: String,
    parent: Option<String>,
}

/// The record file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordFile {
    image: String,
    checkpoints: Vec<Record>,
}

/// A bitmap as `query-named-block-nodes` describes it.
#[derive(Debug, Clone, Deserialize)]
struct BitmapState {
    name: String,
    count: u64,
    #[serde(default)]
    recording: bool,
    #[serde(default)]
    inconsistent: bool,
}

impl BitmapState {
    fn usable(&self) -> bool {
        self.recording && !self.inconsistent
    }
}

/// The bitmaps of the image node.
async fn bitmaps(monitor: &Monitor) -> ApiResult<Vec<BitmapState>> {
    let nodes = monitor.execute("query-named-block-nodes", json!({"flat": true})).await.map_err(qmp_failed)?;
    let node = nodes
        .as_array()
        .and_then(|nodes| nodes.iter().find(|node| node["node-name"] == StorageDaemon::NODE))
        .ok_or_else(|| ApiError::Internal("qemu-storage-daemon does not list the image node".into()))?;
    match node.get("dirty-bitmaps") {
        None => Ok(Vec::new()),
        Some(list) => serde_json::from_value(list.clone()).map_err(|error| ApiError::Internal(format!("reading the bitmap list: {error}"))),
    }
}

fn qmp_failed(error: QmpError) -> ApiError {
    ApiError::Daemon(error.to_string())
}

/// The checkpoints of one qcow2 image the server owns.
pub struct Checkpoints {
    image: PathBuf,
    record_path: PathBuf,
    /// The records; the lock also makes checkpoint changes one at a time.
    records: tokio::sync::Mutex<Vec<Record>>,
    /// The most checkpoints the image may have.
    limit: usize,
}

impl Checkpoints {
    /// Loads the records of `image` from the state directory.
    pub fn open(image: &Path, state_dir: &Path, limit: usize) -> anyhow::Result<Checkpoints> {
        let key = image.display().to_string();
        let record_path = state_file::path_for(state_dir, "checkpoints", &key);
        let records = state_file::load::<RecordFile>(&record_path)?.map(|file| file.checkpoints).unwrap_or_default();
        Ok(Checkpoints { image: image.to_path_buf(), record_path, records: tokio::sync::Mutex::new(records), limit })
    }

    fn save(&self, records: &[Record]) -> ApiResult<()> {
        let file = RecordFile { image: self.image.display().to_string(), checkpoints: records.to_vec() };
        state_file::save(&self.record_path, &file).map_err(|error| ApiError::Internal(format!("{error:#}")))
    }

    /// Every checkpoint, oldest first, with its bitmap's state.
    pub async fn list(&self, monitor: &Monitor) -> ApiResult<Vec<Checkpoint>> {
        let records = self.records.lock().await;
        let bitmaps = bitmaps(monitor).await?;
        Ok(records
            .iter()
            .map(|record| {
                let bitmap = bitmaps.iter().find(|bitmap| bitmap.name == record.id);
                Checkpoint {
                    id: record.id.clone(),
                    created: record.created.clone(),
                    parent: record.parent.clone(),
                    dirty_bytes: bitmap.map(|bitmap| bitmap.count),
                    usable: bitmap.is_some_and(BitmapState::usable),
                }
            })
            .collect())
    }

    /// Makes a checkpoint (a new id when none is given).
    pub async fn create(&self, monitor: &Monitor, id: Option<String>) -> ApiResult<Checkpoint> {
        let mut records = self.records.lock().await;
        let id = match id {
            Some(id) => id,
            None => new_id(&records),
        };
        let record = admit(&records, &id, self.limit)?;
        let add = json!({"node": StorageDaemon::NODE, "name": id, "persistent": true});
        monitor.execute("block-dirty-bitmap-add", add).await.map_err(|error| refused_bitmap(&id, error))?;
        self.commit(monitor, &mut records, record.clone()).await?;
        tracing::info!(image = %self.image.display(), checkpoint = %id, "checkpoint created");
        Ok(Checkpoint { id: record.id, created: record.created, parent: record.parent, dirty_bytes: Some(0), usable: true })
    }

    /// Records a checkpoint whose bitmap was just added; removes the bitmap
    /// again if the record cannot be written.
    async fn commit(&self, monitor: &Monitor, records: &mut Vec<Record>, record: Record) -> ApiResult<()> {
        records.push(record);
        if let Err(error) = self.save(records) {
            let record = records.pop().expect("pushed above");
            remove_bitmap(monitor, &record.id).await;
            return Err(error);
        }
        Ok(())
    }

    /// Deletes a checkpoint and its bitmap; no other checkpoint changes.
    pub async fn delete(&self, monitor: &Monitor, id: &str) -> ApiResult<()> {
        let mut records = self.records.lock().await;
        let index = records.iter().position(|record| record.id == id).ok_or_else(|| unknown(id))?;
        match monitor.execute("block-dirty-bitmap-remove", json!({"node": StorageDaemon::NODE, "name": id})).await {
            Ok(_) => {}
            // Gone with a daemon that was killed: only the record is left.
            Err(QmpError::Command { desc, .. }) if desc.contains("not found") => {}
            Err(error) => return Err(qmp_failed(error)),
        }
        let removed = records.remove(index);
        if let Err(error) = self.save(&records) {
            records.insert(index, removed);
            return Err(error);
        }
        tracing::info!(image = %self.image.display(), checkpoint = %id, "checkpoint deleted");
        Ok(())
    }

    /// True if checkpoint `id` is recorded.
    pub async fn contains(&self, id: &str) -> bool {
        self.records.lock().await.iter().any(|record| record.id == id)
    }

    /// Makes sure checkpoint `id` exists (for a full backup that starts a
    /// chain from it); true if it was made now.
    pub async fn ensure(&self, monitor: &Monitor, id: &str) -> ApiResult<bool> {
        if self.contains(id).await {
            return Ok(false);
        }
        self.create(monitor, Some(id.to_string())).await.map(|_| true)
    }

    /// Freezes what changed since checkpoint `since` into a view, and
    /// starts checkpoint `next` in the same instant when it does not exist
    /// yet (when it does, it must be newer than `since`).
    pub async fn freeze_since(&self, monitor: &Monitor, since: &str, next: Option<&str>) -> ApiResult<String> {
        let mut records = self.records.lock().await;
        let position = |id: &str| records.iter().position(|record| record.id == id);
        let since_index = position(since).ok_or_else(|| unknown(since))?;
        let state = bitmaps(monitor).await?.into_iter().find(|bitmap| bitmap.name == since);
        if !state.is_some_and(|state| state.usable()) {
            return Err(ApiError::Conflict(format!(
                "checkpoint {since:?} is not usable: its bitmap was lost or left inconsistent when qemu-storage-daemon \
                 stopped without saving it; take a full backup (format=sparse&checkpoint=NEW_ID) to start a new chain"
            )));
        }
        let new_record = match next.map(|next| (next, position(next))) {
            None => None,
            Some((_, Some(index))) if index > since_index => None,
            Some((next, Some(_))) => {
                return Err(ApiError::BadRequest(format!("checkpoint {next:?} is not newer than since={since:?}")));
            }
            Some((next, None)) => Some(admit(&records, next, self.limit)?),
        };
        let view = next_view_name();
        let mut actions = Vec::new();
        if let Some(record) = &new_record {
            actions.push(
                json!({"type": "block-dirty-bitmap-add", "data": {"node": StorageDaemon::NODE, "name": record.id, "persistent": true}}),
            );
        }
        actions.extend(freeze_actions(&view, since));
        monitor.execute("transaction", json!({"actions": actions})).await.map_err(|error| match &new_record {
            Some(record) => refused_bitmap(&record.id, error),
            None => qmp_failed(error),
        })?;
        if let Some(record) = new_record {
            let id = record.id.clone();
            if let Err(error) = self.commit(monitor, &mut records, record).await {
                remove_bitmap(monitor, &view).await;
                return Err(error);
            }
            tracing::info!(image = %self.image.display(), checkpoint = %id, "checkpoint created");
        }
        drop(records);
        export_view(monitor, &view).await?;
        Ok(view)
    }
}

/// Freezes a copy of any bitmap of the image (an imageio ticket's own
/// bitmap) into a view; the view's export and bitmap share its name.
pub async fn freeze_bitmap(monitor: &Monitor, bitmap: &str) -> ApiResult<String> {
    let view = next_view_name();
    monitor.execute("transaction", json!({"actions": freeze_actions(&view, bitmap)})).await.map_err(qmp_failed)?;
    export_view(monitor, &view).await?;
    Ok(view)
}

/// The transaction actions that copy bitmap `source` into a new disabled,
/// non-persistent bitmap `view`: a map that no later write changes.
fn freeze_actions(view: &str, source: &str) -> [Value; 2] {
    [
        json!({"type": "block-dirty-bitmap-add", "data": {"node": StorageDaemon::NODE, "name": view, "persistent": false, "disabled": true}}),
        json!({"type": "block-dirty-bitmap-merge", "data": {"node": StorageDaemon::NODE, "target": view, "bitmaps": [source]}}),
    ]
}

/// Exports a frozen bitmap read-only under its own name.
async fn export_view(monitor: &Monitor, view: &str) -> ApiResult<()> {
    let export = json!({
        "type": "nbd", "id": export_id(view), "node-name": StorageDaemon::NODE, "name": view,
        "writable": false, "bitmaps": [view], "allocation-depth": true,
    });
    if let Err(error) = monitor.execute("block-export-add", export).await {
        remove_bitmap(monitor, view).await;
        return Err(qmp_failed(error));
    }
    Ok(())
}

/// Removes a view: its export (dropping its connections), then its bitmap,
/// which qemu releases once the export is really gone.
pub async fn release_view(monitor: &Monitor, view: &str) {
    if let Err(error) = monitor.execute("block-export-del", json!({"id": export_id(view), "mode": "hard"})).await {
        tracing::debug!(view, %error, "removing a view's export");
    }
    if remove_bitmap(monitor, view).await {
        tracing::debug!(view, "view released");
    }
}

/// Removes a bitmap, waiting up to a second for an export that still
/// holds it to go away; true if it was removed.
async fn remove_bitmap(monitor: &Monitor, name: &str) -> bool {
    for _ in 0..50 {
        match monitor.execute("block-dirty-bitmap-remove", json!({"node": StorageDaemon::NODE, "name": name})).await {
            Err(QmpError::Command { desc, .. }) if desc.contains("in use") => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(error) => {
                tracing::debug!(bitmap = name, %error, "removing a bitmap");
                return false;
            }
            Ok(_) => return true,
        }
    }
    tracing::warn!(bitmap = name, "a bitmap stayed in use; it goes away when the daemon stops");
    false
}

/// The QMP id of a view's export: ids may not hold or start with `.`.
fn export_id(view: &str) -> String {
    view.replace('.', "-").trim_start_matches('-').to_string()
}

/// A name for a new view (its bitmap and its NBD export), unique in this
/// process.
fn next_view_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{RESERVED_PREFIX}view-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The record of a new checkpoint `id`, if the id is valid, new, and the
/// image has room for it.
fn admit(records: &[Record], id: &str, limit: usize) -> ApiResult<Record> {
    check_id(id)?;
    if records.iter().any(|record| record.id == id) {
        return Err(ApiError::Conflict(format!("checkpoint {id:?} already exists")));
    }
    if records.len() >= limit {
        return Err(ApiError::Conflict(format!(
            "the image already has {limit} checkpoints, the most it may have (--max-checkpoints); delete the oldest ones first"
        )));
    }
    Ok(Record { id: id.to_string(), created: crate::clock::now_rfc3339(), parent: records.last().map(|record| record.id.clone()) })
}

/// An id for a checkpoint the client did not name: `cp-` and the time,
/// with a counter when two are made in one second.
fn new_id(records: &[Record]) -> String {
    let stamp = time::OffsetDateTime::now_utc();
    let base = format!(
        "cp-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second()
    );
    let taken = |id: &str| records.iter().any(|record| record.id == id);
    (1..).map(|n| if n == 1 { base.clone() } else { format!("{base}.{n}") }).find(|id| !taken(id)).expect("an unused id exists")
}

fn unknown(id: &str) -> ApiError {
    ApiError::NotFound(format!("no checkpoint {id:?} on this image"))
}

/// A bitmap qemu would not add: one of that name already exists (made
/// outside blockgate), or the image cannot hold it.
fn refused_bitmap(id: &str, error: QmpError) -> ApiError {
    match error {
        QmpError::Command { desc, .. } if desc.contains("already exists") => {
            ApiError::Conflict(format!("the image already has a bitmap named {id:?} (made outside blockgate); choose another id"))
        }
        QmpError::Command { desc, .. } => ApiError::Conflict(format!("the image cannot hold checkpoint {id:?}: {desc}")),
        other => qmp_failed(other),
    }
}

/// The id a `POST` body names: `{"id": "ID"}`, or none for `{}` or an
/// empty body.
pub fn parse_create(body: &[u8]) -> ApiResult<Option<String>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|error| ApiError::BadRequest(format!("body is not valid JSON: {error}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::BadRequest("body must be a JSON object such as {\"id\": \"cp1\"}".into()));
    };
    match object.get("id") {
        None => Ok(None),
        Some(Value::String(id)) => check_id(id).map(|()| Some(id.clone())),
        Some(other) => Err(ApiError::BadRequest(format!("field \"id\" must be a string, not {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_records_chain_to_the_newest_and_respect_the_limit() {
        let mut records = Vec::new();
        for n in 0..DEFAULT_LIMIT {
            let record = admit(&records, &format!("cp{n}"), DEFAULT_LIMIT).unwrap();
            assert_eq!(record.parent, n.checked_sub(1).map(|p| format!("cp{p}")));
            records.push(record);
        }
        assert!(matches!(admit(&records[..3], "cp1", DEFAULT_LIMIT), Err(ApiError::Conflict(_))));
        let full = admit(&records, "another", DEFAULT_LIMIT).unwrap_err().to_string();
        assert!(admit(&records, "another", DEFAULT_LIMIT + 1).is_ok(), "a higher limit admits more");
        assert!(full.contains("16 checkpoints"), "{full}");
        let generated = new_id(&records);
        assert!(check_id(&generated).is_ok() && generated.starts_with("cp-"), "{generated}");
        records.push(Record { id: generated.clone(), created: String::new(), parent: None });
        assert_ne!(new_id(&records), generated);
    }

    #[test]
    fn create_bodies() {
        assert_eq!(parse_create(b"").unwrap(), None);
        assert_eq!(parse_create(b"{}").unwrap(), None);
        assert_eq!(parse_create(br#"{"id": "cp1"}"#).unwrap().as_deref(), Some("cp1"));
        for body in [&br#"{"id": 1}"#[..], br#"{"id": null}"#, br#"{"id": ".x"}"#, b"[]", b"{", br#""cp1""#] {
            assert!(matches!(parse_create(body), Err(ApiError::BadRequest(_))), "{}", String::from_utf8_lossy(body));
        }
    }

    proptest! {
        #[test]
        fn any_body_parses_or_is_a_bad_request(body in prop::collection::vec(any::<u8>(), 0..100)) {
            match parse_create(&body) {
                Ok(Some(id)) => prop_assert!(check_id(&id).is_ok()),
                Ok(None) | Err(ApiError::BadRequest(_)) => {}
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }

    }
}
