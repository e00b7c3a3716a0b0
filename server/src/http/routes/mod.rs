//! The HTTP routes of the data API and the router that ties them together,
//! with CORS for browser consoles and one access log line per request. Each submodule owns one family of routes; handlers parse and
//! authorize, then hand the work to the ticket's backend.

mod checkpoints;
mod checksum;
mod cors;
mod dirty;
mod extents;
mod images;
mod info;
pub(crate) mod query;

use std::sync::Arc;

use axum::Router;
use axum::http::{Method, header};
use axum::routing::{delete, get, options};

use crate::error::ApiError;
use crate::http::access_log;
use crate::tickets::{Limits, Tickets};

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    /// The tickets this server serves.
    pub tickets: Arc<Tickets>,
    /// Connection limits of new tickets (and of `OPTIONS /images/*`).
    pub limits: Limits,
    /// Path of the local listener, when it is on.
    pub local_socket: Option<String>,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: std::time::Duration,
}

/// Every route and the methods it serves, for the `Allow` header of a 405
/// (`OPTIONS /images/*` is the `{ticket}` route with ticket `*`).
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/images/{ticket}", &["OPTIONS", "HEAD", "GET", "PUT", "PATCH"]),
    ("/images/{ticket}/extents", &["GET"]),
    ("/images/{ticket}/checkpoints", &["GET", "POST"]),
    ("/images/{ticket}/checkpoints/{id}", &["DELETE"]),
    ("/images/{ticket}/checksum", &["GET"]),
    ("/images/{ticket}/checksum/algorithms", &["GET"]),
    ("/info/", &["GET"]),
    ("/healthz", &["GET"]),
];

/// The data API router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/images/{ticket}", options(images::options).head(images::head).get(images::get).put(images::put).patch(images::patch))
        .route("/images/{ticket}/extents", get(extents::get))
        .route("/images/{ticket}/checkpoints", get(checkpoints::list).post(checkpoints::create))
        .route("/images/{ticket}/checkpoints/{id}", delete(checkpoints::delete))
        .route("/images/{ticket}/checksum", get(checksum::get))
        .route("/images/{ticket}/checksum/algorithms", get(checksum::algorithms))
        .route("/info/", get(info::get))
        .route("/healthz", get(crate::http::health::healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(cors::cors))
        .layer(axum::middleware::from_fn(drop_connection_header_on_h2))
        .layer(axum::middleware::from_fn(refuse_control_characters))
        .layer(axum::middleware::from_fn(|request, next| access_log::log_requests(ROUTES, request, next)))
        .with_state(state)
}

/// `Connection: close` (on 403 and `?close=y`) means something only to
/// HTTP/1; HTTP/2 forbids the header and resets a stream that carries it.
async fn drop_connection_header_on_h2(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let version = request.version();
    let mut response = next.run(request).await;
    if version >= axum::http::Version::HTTP_2 {
        response.headers_mut().remove(header::CONNECTION);
    }
    response
}

/// 400 for a path with control characters once percent-decoded (a ticket
/// id with a newline would forge log lines wherever it is written).
pub async fn refuse_control_characters(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(request.uri().path()).collect();
    if String::from_utf8_lossy(&decoded).chars().any(char::is_control) {
        return ApiError::BadRequest("the path holds control characters".into()).into_response();
    }
    next.run(request).await
}

/// 404 for any route a router does not know.
pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> axum::response::Response {
    refuse_method(ROUTES, &method, uri.path())
}

/// 405 with `Allow` from a route table.
pub fn refuse_method(routes: &[(&str, &[&str])], method: &Method, path: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let allowed = routes.iter().find(|(pattern, _)| route_matches(pattern, path)).map(|(_, methods)| methods.join(",")).unwrap_or_default();
    let mut response = ApiError::MethodNotAllowed(format!("{method} is not allowed on {path}; allowed: {allowed}")).into_response();
    if let Ok(value) = header::HeaderValue::from_str(&allowed) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// The pattern of `routes` that `path` matches, such as `/images/{ticket}`.
pub fn route_pattern(routes: &[(&'static str, &[&str])], path: &str) -> Option<&'static str> {
    routes.iter().map(|(pattern, _)| *pattern).find(|pattern| route_matches(pattern, path))
}

/// Whether a concrete path matches a route pattern with `{param}` segments.
fn route_matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<_> = pattern.split('/').collect();
    let path: Vec<_> = path.split('/').collect();
    // A `{parameter}` stands for one non-empty segment: `/tickets/` is
    // not `/tickets/{id}` with an empty id.
    pattern.len() == path.len() && pattern.iter().zip(&path).all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s)
}
