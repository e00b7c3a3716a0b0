//! The one error type of the HTTP API and its one `IntoResponse`.
//!
//! Policy: what the client got wrong is 4xx with a one-line message that
//! says what was wrong (and what would be right); a failing or vanished
//! NBD server is 502, which a client may retry; our own bugs are 500.
//! 403 also closes the connection, as imageio does. The body is always
//! `text/plain`, one line ending in a newline.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use blockgate_protocol::RangeError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 403: no such ticket, expired, or the operation is not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown route or missing resource.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the request conflicts with the state of the ticket or image
    /// (busy ticket, checkpoint exists or is unusable, chain out of order).
    #[error("{0}")]
    Conflict(String),
    /// 413: a JSON body over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 416: the range does not fit an image of `size` bytes.
    #[error("{message}")]
    RangeNotSatisfiable {
        /// What is wrong.
        message: String,
        /// Image size for `Content-Range: bytes */SIZE`.
        size: u64,
    },
    /// 503: too many requests on this ticket.
    #[error("{0}")]
    Unavailable(String),
    /// 502: the NBD server failed or is gone.
    #[error("NBD backend failed: {0}")]
    Backend(#[from] blockgate_nbd::Error),
    /// 502: writes acknowledged before the NBD server restarted were never
    /// flushed; the transfer must start over.
    #[error("{0}")]
    WritesLost(#[from] crate::sources::durability::LostWrites),
    /// 502: the owned qemu-storage-daemon failed a QMP command.
    #[error("qemu-storage-daemon failed: {0}")]
    Daemon(String),
    /// 502: libvirt failed a call.
    #[error("libvirt failed: {0}")]
    Libvirt(String),
    /// 500: a bug or a local failure we cannot blame on anyone else.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Backend(_) | ApiError::WritesLost(_) | ApiError::Daemon(_) | ApiError::Libvirt(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A 416 for a range that does not fit the image.
    pub fn range(message: impl Into<String>, size: u64) -> ApiError {
        ApiError::RangeNotSatisfiable { message: message.into(), size }
    }

    /// Maps a `Range`/`Content-Range` parse error: 400 or 416.
    pub fn from_range(error: RangeError, size: u64) -> ApiError {
        match error {
            RangeError::Malformed { .. } => ApiError::BadRequest(error.to_string()),
            RangeError::Unsatisfiable { .. } => ApiError::range(error.to_string(), size),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        } else {
            tracing::debug!(%status, error = %self, "request refused");
        }
        let mut message = self.to_string().replace(['\r', '\n'], " ");
        message.push('\n');
        let mut response = (status, message).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        match &self {
            ApiError::RangeNotSatisfiable { size, .. } => {
                let value = HeaderValue::from_str(&format!("bytes */{size}")).expect("ASCII header");
                headers.insert(header::CONTENT_RANGE, value);
            }
            ApiError::Forbidden(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
