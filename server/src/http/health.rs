//! `GET /healthz` on every listener, with no ticket: 200 `ok` while the
//! server serves, 503 `shutting down` once a shutdown began (a load
//! balancer or an orchestrator stops sending work while the running
//! requests finish).

use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;

static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Marks the server as shutting down: `/healthz` answers 503 from now on.
pub fn begin_shutdown() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
}

/// `GET /healthz`.
pub async fn healthz() -> (StatusCode, &'static str) {
    match SHUTTING_DOWN.load(Ordering::SeqCst) {
        false => (StatusCode::OK, "ok\n"),
        true => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}
