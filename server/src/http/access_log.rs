//! One log line per request, written when the response body is done (sent
//! whole, failed, or dropped because the client left): request id, client
//! address, HTTP version, method, route, status, bytes in and out,
//! duration, and whether the body was complete. The route is the pattern
//! (`/images/{ticket}`), never the path: a ticket id is a credential and
//! stays out of the logs. Lines the handlers log carry the same id,
//! method and route in their span; the access line carries its fields
//! once, outside it. A request refused for its ticket (403: unknown,
//! expired, not allowed) is also logged at warn with its client, and so is
//! a failed TLS handshake, each at most [`WarnLimiter`]'s rate, so ticket
//! guessing shows and can be traced without flooding the log.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, Version};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tracing::Instrument;

use crate::http::Peer;
use crate::http::routes::route_pattern;
use crate::metrics::metrics;

/// Request ids, unique in this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Warnings about failed TLS handshakes.
pub static HANDSHAKE_WARNINGS: WarnLimiter = WarnLimiter::new();
/// Warnings about requests refused for their ticket.
static TICKET_WARNINGS: WarnLimiter = WarnLimiter::new();

/// At most [`WarnLimiter::PER_MINUTE`] warnings of one kind a minute; the
/// first one after a quiet spell says how many were suppressed.
pub struct WarnLimiter {
    state: parking_lot::Mutex<(Option<Instant>, u64, u64)>,
}

impl WarnLimiter {
    /// Warnings a minute.
    pub const PER_MINUTE: u64 = 20;

    const fn new() -> WarnLimiter {
        WarnLimiter { state: parking_lot::const_mutex((None, 0, 0)) }
    }

    /// Some(suppressed so far) when this warning may be logged.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let (window, logged, suppressed) = &mut *state;
        let now = Instant::now();
        if window.is_none_or(|started| now.duration_since(started).as_secs() >= 60) {
            *window = Some(now);
            *logged = 0;
        }
        if *logged >= Self::PER_MINUTE {
            *suppressed += 1;
            return None;
        }
        *logged += 1;
        Some(std::mem::take(suppressed))
    }
}

/// The middleware, for a router whose routes are `routes`.
pub async fn log_requests(routes: &'static [(&'static str, &'static [&'static str])], request: Request, next: Next) -> Response {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let method = request.method().clone();
    let version = request.version();
    let client = request.extensions().get::<Peer>().map_or_else(|| Arc::from("-"), |peer| peer.0.clone());
    let route = route_pattern(routes, request.uri().path()).unwrap_or("(no route)");
    let span = tracing::info_span!("request", id, method = %method, route);
    let received = Arc::new(AtomicU64::new(0));
    let request = request.map(|body| Body::new(Counted { inner: body, bytes: received.clone(), on_end: None }));
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    if status == StatusCode::FORBIDDEN && route.contains("{ticket}") {
        if let Some(suppressed) = TICKET_WARNINGS.admit() {
            tracing::warn!(%client, route, suppressed, "request refused for its ticket (unknown, expired or not allowed)");
        }
    }
    drop(span);
    let line = Line { id, client, version, method, route, status, received, started };
    response.map(|body| Body::new(Counted { inner: body, bytes: Arc::new(AtomicU64::new(0)), on_end: Some(line) }))
}

/// What the line says, kept until the response body is done.
struct Line {
    id: u64,
    client: Arc<str>,
    version: Version,
    method: Method,
    route: &'static str,
    status: StatusCode,
    received: Arc<AtomicU64>,
    started: Instant,
}

impl Line {
    fn write(self, sent: u64, complete: bool) {
        metrics().count_request(self.route, self.method.as_str(), self.status.as_u16());
        tracing::info!(
            target: "blockgate_server::access",
            id = self.id,
            client = %self.client,
            version = ?self.version,
            method = %self.method,
            route = self.route,
            status = self.status.as_u16(),
            bytes_in = self.received.load(Ordering::Relaxed),
            bytes_out = sent,
            duration_ms = self.started.elapsed().as_millis() as u64,
            complete,
            "request"
        );
    }
}

/// A body that counts its bytes, and writes the request's line (if it has
/// one) once: at its end, or when it is dropped before that.
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
    on_end: Option<Line>,
}

impl Counted {
    fn finish(&mut self, complete: bool) {
        if let Some(line) = self.on_end.take() {
            line.write(self.bytes.load(Ordering::Relaxed), complete);
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(None) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // A body never polled to its end (a client that left, an empty
        // body hyper never asked for) still gets its line.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
