//! Which map a sparse GET or an extents request reads, from `context`,
//! `since` and `checkpoint`: the image itself (a full backup, which may
//! start a chain at `checkpoint`), the ticket's own bitmap (imageio's
//! `context=dirty`), or what changed since a checkpoint (which may start
//! the next round at `checkpoint`). Dirty maps come from a frozen view
//! that lives as long as the response.

use std::sync::Arc;

use super::query::Params;
use crate::error::{ApiError, ApiResult};
use crate::sources::backend::{Backend, DirtySource};
use crate::sources::checkpoints::check_id;
use crate::tickets::Ticket;

/// What the query asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapRequest {
    /// Only what changed (`context=dirty`, or `since`).
    pub incremental: bool,
    /// Changed since this checkpoint.
    pub since: Option<String>,
    /// The checkpoint this backup reaches (made now if it does not exist).
    pub checkpoint: Option<String>,
    /// True if the query named a `context`.
    pub context_given: bool,
}

/// Parses `context`, `since` and `checkpoint`.
pub fn parse(params: &Params) -> ApiResult<MapRequest> {
    let id = |name: &str| -> ApiResult<Option<String>> {
        match params.get(name) {
            None => Ok(None),
            Some(id) => check_id(id).map(|()| Some(id.clone())).map_err(|error| ApiError::BadRequest(format!("{name}=: {error}"))),
        }
    };
    let (since, checkpoint) = (id("since")?, id("checkpoint")?);
    let incremental = match (params.get("context").map(String::as_str), &since) {
        (None | Some("dirty"), Some(_)) => true,
        (Some("zero"), Some(_)) => return Err(ApiError::BadRequest("since= lists changes: it needs context=dirty (or no context)".into())),
        (Some("dirty"), None) if checkpoint.is_some() => {
            return Err(ApiError::BadRequest(
                "checkpoint= with context=dirty needs since=ID: the ticket's own bitmap is not part of a chain".into(),
            ));
        }
        (Some("dirty"), None) => true,
        (None | Some("zero"), None) => false,
        (Some(other), _) => return Err(ApiError::BadRequest(format!("invalid context={other:?}: expected zero or dirty"))),
    };
    if let (Some(since), Some(checkpoint)) = (&since, &checkpoint) {
        if since == checkpoint {
            return Err(ApiError::BadRequest(format!("checkpoint={checkpoint:?} must be newer than since={since:?}")));
        }
    }
    Ok(MapRequest { incremental, since, checkpoint, context_given: params.contains_key("context") })
}

/// The request as `ticket`'s export answers it. A backup job's export is
/// one point in time: it reaches the job's checkpoint and its dirty map
/// starts at the job's `since`, so other values are a 409, and both label
/// what it serves. Without a `context`, a sparse stream of an incremental
/// job's export is incremental (`sparse_stream`); extents stay `zero`.
pub fn for_ticket(ticket: &Ticket, request: MapRequest, sparse_stream: bool) -> ApiResult<MapRequest> {
    let Some(point) = ticket.backend.backup_point() else { return Ok(request) };
    let describe = |id: &Option<String>| id.as_ref().map_or("none".to_string(), |id| format!("{id:?}"));
    if request.checkpoint.is_some() && request.checkpoint != point.checkpoint {
        return Err(ApiError::Conflict(format!(
            "this export is a backup job's point in time (checkpoint {}); it cannot reach checkpoint={}",
            describe(&point.checkpoint),
            describe(&request.checkpoint)
        )));
    }
    if request.since.is_some() && request.since != point.since {
        return Err(ApiError::Conflict(format!(
            "this export's changes start at checkpoint {}, not since={}; start a backup with that since",
            describe(&point.since),
            describe(&request.since)
        )));
    }
    let incremental = match (request.context_given || request.since.is_some(), sparse_stream) {
        (true, _) => request.incremental,
        (false, true) => point.since.is_some(),
        (false, false) => false,
    };
    if incremental && point.since.is_none() {
        return Err(ApiError::Conflict("this export is a full backup: it has no dirty map (use context=zero)".into()));
    }
    Ok(MapRequest {
        incremental,
        since: point.since.clone().filter(|_| incremental),
        checkpoint: point.checkpoint.clone(),
        context_given: true,
    })
}

/// The backend to read the map (and an incremental's data) from.
pub async fn open(ticket: &Ticket, request: &MapRequest) -> ApiResult<Arc<Backend>> {
    let backend = &ticket.backend;
    if backend.backup_point().is_some() {
        // Labeled by `for_ticket`: the export is the point in time, and
        // its own bitmap is the dirty map.
        return match request.incremental {
            true => backend.dirty_view(DirtySource::Ticket).await,
            false => Ok(backend.clone()),
        };
    }
    if let Some(checkpoint) = &request.checkpoint {
        let (checkpoints, _) = backend.checkpoints()?;
        if !ticket.may_checkpoint && !checkpoints.contains(checkpoint).await {
            return Err(ApiError::Forbidden(format!(
                "ticket {} may not make checkpoint {checkpoint:?}: that needs the \"write\" or \"checkpoint\" op",
                ticket.fingerprint
            )));
        }
    }
    match (request.incremental, &request.since) {
        (false, _) => {
            if let Some(checkpoint) = &request.checkpoint {
                let (checkpoints, owned) = backend.checkpoints()?;
                checkpoints.ensure(owned.monitor(), checkpoint).await?;
            }
            Ok(backend.clone())
        }
        (true, None) => backend.dirty_view(DirtySource::Ticket).await,
        (true, Some(since)) => backend.dirty_view(DirtySource::Since { since, next: request.checkpoint.as_deref() }).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    #[test]
    fn context_since_and_checkpoint_combine_as_the_contract_says() {
        let request = |pairs: &[(&str, &str)]| parse(&params(pairs));
        assert_eq!(request(&[]).unwrap(), MapRequest::default());
        assert!(request(&[("context", "dirty")]).unwrap().incremental);
        let chained = request(&[("since", "cp1"), ("checkpoint", "cp2")]).unwrap();
        assert_eq!((chained.incremental, chained.since.as_deref(), chained.checkpoint.as_deref()), (true, Some("cp1"), Some("cp2")));
        let full = request(&[("context", "zero"), ("checkpoint", "cp1")]).unwrap();
        assert!(!full.incremental && full.checkpoint.as_deref() == Some("cp1"));
        for bad in [
            &[("context", "zero"), ("since", "cp1")][..],
            &[("context", "dirty"), ("checkpoint", "cp1")],
            &[("since", ".x")],
            &[("checkpoint", "a/b")],
            &[("since", "cp1"), ("checkpoint", "cp1")],
            &[("context", "other")],
        ] {
            assert!(matches!(request(bad), Err(ApiError::BadRequest(_))), "{bad:?}");
        }
    }
}
