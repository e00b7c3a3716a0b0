//! The control API (imageio-compatible), served on the `--control-socket`
//! unix socket in plain HTTP and, with `--control-listen`, over TLS to
//! clients with a certificate of `--client-ca` (the same router; the TLS
//! listener admits no one else): an orchestrator adds tickets (`PUT`), reads
//! their status (`GET`), extends them (`PATCH {"timeout": N}`) and removes
//! them (`DELETE`, which cancels what runs on them). Opening a ticket's
//! `url` (an NBD URI, or `file:///PATH` exported by our own qemu-nbd)
//! happens when it is added, so a bad url or bitmap is a 400 then, not a
//! failure at the first transfer. A `file://` url must resolve inside a
//! directory the operator allowed (`--allow-dir`); anywhere else it is
//! refused with the same words whether the file exists or not. The VM
//! routes ([`vms`]) back up running VMs through libvirt.

pub mod vms;

use std::path::{Path as FilePath, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use blockgate_nbd::{Address, qemu};
use blockgate_protocol::ticket::{MAX_TICKET_BODY, TicketSpec, parse_ticket, parse_timeout};

use crate::config::{ImageSource, ImageSpec};
use crate::error::{ApiError, ApiResult};
use crate::http::access_log;
use crate::http::json_line::JsonLine;
use crate::http::routes::{not_found, refuse_control_characters, refuse_method};
use crate::sources::backend::{Backend, BackendSettings};
use crate::tickets::{Limits, Ticket, Tickets};

/// What the control routes need.
#[derive(Clone)]
pub struct ControlState {
    /// The server's tickets.
    pub tickets: Arc<Tickets>,
    /// Limits of new tickets.
    pub limits: Limits,
    /// How tickets reach their images.
    pub backend: BackendSettings,
    /// Where `file://` urls may point (canonical paths).
    pub allow_dirs: Arc<Vec<PathBuf>>,
    /// Backups of running VMs.
    pub vms: Arc<vms::VmBackups>,
}

impl axum::extract::FromRef<ControlState> for Arc<Tickets> {
    fn from_ref(state: &ControlState) -> Arc<Tickets> {
        state.tickets.clone()
    }
}

const ROUTES: &[(&str, &[&str])] = &[
    ("/tickets/{id}", &["GET", "PUT", "PATCH", "DELETE"]),
    ("/tickets/", &["DELETE"]),
    ("/metrics", &["GET"]),
    ("/healthz", &["GET"]),
    ("/vms", &["GET"]),
    ("/vms/{vm}/checkpoints", &["GET"]),
    ("/vms/{vm}/checkpoints/{id}", &["DELETE"]),
    ("/vms/{vm}/backups", &["POST"]),
    ("/vms/{vm}/backups/{id}", &["GET", "DELETE"]),
];

/// The control API router.
pub fn router(state: ControlState) -> Router {
    Router::new()
        .route("/tickets/{id}", put(add).get(status).patch(extend).delete(remove))
        .route("/tickets/", delete(remove_all))
        .route("/metrics", get(metrics))
        .route("/healthz", get(crate::http::health::healthz))
        .route("/vms", get(vms::list))
        .route("/vms/{vm}/checkpoints", get(vms::checkpoints))
        .route("/vms/{vm}/checkpoints/{id}", delete(vms::delete_checkpoint))
        .route("/vms/{vm}/backups", post(vms::create_backup))
        .route("/vms/{vm}/backups/{id}", get(vms::backup_status).delete(vms::delete_backup))
        .fallback(not_found)
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move { refuse_method(ROUTES, &method, uri.path()) })
        .layer(axum::middleware::from_fn(refuse_control_characters))
        .layer(axum::middleware::from_fn(|request, next| access_log::log_requests(ROUTES, request, next)))
        .with_state(state)
}

/// The file a `file://` url names, resolved (symlinks, `..`), if it lies
/// inside one of `allow_dirs` and is a regular file or a block device
/// (checked without blocking: not a FIFO). The refusal of a path outside
/// says nothing of the file: not whether it exists, nor its size. A
/// blocking call: run it off the async workers.
fn allowed_file(path: &str, allow_dirs: &[PathBuf]) -> ApiResult<PathBuf> {
    if allow_dirs.is_empty() {
        return Err(ApiError::BadRequest(
            "field \"url\": file:// urls are disabled on this server; start it with --allow-dir DIR to serve images under DIR".into(),
        ));
    }
    let inside = |real: &FilePath| allow_dirs.iter().any(|dir| real.starts_with(dir));
    let refused = || ApiError::BadRequest("field \"url\": the path is not inside a directory allowed with --allow-dir".into());
    let path = FilePath::new(path);
    match std::fs::canonicalize(path) {
        Ok(real) if inside(&real) => match qemu::open_image_file(&real) {
            Ok(_) => Ok(real),
            Err(error) if error.kind() == std::io::ErrorKind::InvalidInput => Err(ApiError::BadRequest(format!("field \"url\": {error}"))),
            Err(error) => Err(ApiError::BadRequest(format!("field \"url\": cannot open {}: {error}", real.display()))),
        },
        Ok(_) => Err(refused()),
        Err(_) => {
            // Missing: say so only where listing the directory is allowed.
            let parent = path.parent().and_then(|parent| std::fs::canonicalize(parent).ok());
            match (parent, path.file_name()) {
                (Some(parent), Some(name)) if inside(&parent) && name != ".." => {
                    Err(ApiError::BadRequest(format!("field \"url\": {} does not exist", parent.join(name).display())))
                }
                _ => Err(refused()),
            }
        }
    }
}

/// Opens the image a ticket names and makes the ticket.
pub async fn open_ticket(spec: TicketSpec, limits: Limits, backend: BackendSettings, allow_dirs: &[PathBuf]) -> ApiResult<Ticket> {
    if spec.url.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("field \"url\" holds control characters".into()));
    }
    let source = match spec.url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => {
            let (path, allow_dirs) = (path.to_string(), allow_dirs.to_vec());
            let checked = tokio::task::spawn_blocking(move || allowed_file(&path, &allow_dirs)).await;
            ImageSource::File(checked.map_err(|error| ApiError::Internal(error.to_string()))??)
        }
        Some(_) => return Err(ApiError::BadRequest(format!("field \"url\": {:?} must be file:///ABSOLUTE/PATH", spec.url))),
        None => ImageSource::Nbd(Address::parse(&spec.url).map_err(|error| ApiError::BadRequest(format!("field \"url\": {error}")))?),
    };
    let image = ImageSpec {
        id: spec.uuid.clone(),
        source,
        read_only: !spec.writable(),
        bitmap: spec.bitmap.clone(),
        dirty: spec.dirty,
        create_size: None,
        sparse: spec.sparse,
        format: Some(spec.format),
        checkpoints: spec.may_checkpoint(),
        from_ticket: true,
    };
    let backend = Backend::open(&image, backend)
        .await
        .map_err(|error| ApiError::BadRequest(format!("field \"url\": cannot open {}: {error:#}", spec.url)))?;
    if backend.size() != spec.size {
        let actual = backend.size();
        backend.stop().await;
        return Err(ApiError::BadRequest(format!("field \"size\": {} does not match the image's {actual} bytes", spec.size)));
    }
    Ok(Ticket::from_spec(spec, Arc::new(backend), limits))
}

async fn read_json_body(body: Body) -> ApiResult<bytes::Bytes> {
    axum::body::to_bytes(body, MAX_TICKET_BODY)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(format!("body is larger than {MAX_TICKET_BODY} bytes")))
}

async fn add(State(state): State<ControlState>, Path(id): Path<String>, body: Body) -> ApiResult<Response> {
    let spec = parse_ticket(&read_json_body(body).await?).map_err(|error| ApiError::BadRequest(error.0))?;
    if spec.uuid != id {
        return Err(ApiError::BadRequest(format!("field \"uuid\" {:?} differs from the path's {id:?}", spec.uuid)));
    }
    // A ticket replaced by one of the same id goes first, as on DELETE: its
    // qemu-nbd must release the image before a new one can lock it.
    state.tickets.remove(&id).await?;
    let ticket = open_ticket(spec, state.limits, state.backend.clone(), &state.allow_dirs).await?;
    tracing::info!(ticket = %ticket.fingerprint, size = ticket.backend.size(), "ticket added");
    if let Some(raced) = state.tickets.insert(ticket) {
        // Another PUT of this id won the race; retire its ticket.
        raced.cancellation().cancel();
        raced.backend.stop().await;
    }
    Ok(StatusCode::OK.into_response())
}

async fn status(State(state): State<ControlState>, Path(id): Path<String>) -> ApiResult<Response> {
    let status = state.tickets.find(&id).and_then(|ticket| ticket.status());
    match status {
        Some(status) => Ok(JsonLine(status).into_response()),
        None => Err(ApiError::NotFound(format!("no such ticket {id:?}"))),
    }
}

async fn extend(State(state): State<ControlState>, Path(id): Path<String>, body: Body) -> ApiResult<Response> {
    let timeout = parse_timeout(&read_json_body(body).await?).map_err(|error| ApiError::BadRequest(error.0))?;
    let Some(ticket) = state.tickets.find(&id) else {
        return Err(ApiError::NotFound(format!("no such ticket {id:?}")));
    };
    ticket.extend(timeout);
    Ok(StatusCode::OK.into_response())
}

async fn remove(State(state): State<ControlState>, Path(id): Path<String>) -> ApiResult<Response> {
    state.tickets.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /metrics`, here and on `--metrics-listen` ([`metrics_router`]).
async fn metrics(State(tickets): State<Arc<Tickets>>) -> Response {
    let (active, idle) = tickets.state_counts();
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::render(active, idle)).into_response()
}

/// The router of `--metrics-listen`: `GET /metrics` and nothing else.
pub fn metrics_router(tickets: Arc<Tickets>) -> Router {
    const METRICS_ROUTES: &[(&str, &[&str])] = &[("/metrics", &["GET"])];
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move { refuse_method(METRICS_ROUTES, &method, uri.path()) })
        .with_state(tickets)
}

async fn remove_all(State(state): State<ControlState>) -> ApiResult<Response> {
    state.tickets.remove_all().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_resolve_inside_the_allowed_directories_only() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("images");
        let secret_dir = root.path().join("secret");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&secret_dir).unwrap();
        std::fs::write(allowed.join("disk.raw"), b"disk").unwrap();
        std::fs::write(secret_dir.join("key"), b"secret").unwrap();
        std::os::unix::fs::symlink(secret_dir.join("key"), allowed.join("link")).unwrap();
        let dirs = vec![std::fs::canonicalize(&allowed).unwrap()];
        let text = |path: PathBuf| path.to_str().unwrap().to_string();
        assert_eq!(allowed_file(&text(allowed.join("disk.raw")), &dirs).unwrap(), dirs[0].join("disk.raw"));
        let refusal = allowed_file(&text(secret_dir.join("key")), &dirs).unwrap_err().to_string();
        for path in [allowed.join("link"), allowed.join("../secret/key"), allowed.join("../secret/missing"), secret_dir.join("missing")] {
            assert_eq!(allowed_file(&text(path.clone()), &dirs).unwrap_err().to_string(), refusal, "{}", path.display());
        }
        assert!(refusal.contains("--allow-dir") && !refusal.contains("secret"), "{refusal}");
        let missing = allowed_file(&text(allowed.join("new.raw")), &dirs).unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        let disabled = allowed_file(&text(allowed.join("disk.raw")), &[]).unwrap_err().to_string();
        assert!(disabled.contains("disabled"), "{disabled}");
    }
}
