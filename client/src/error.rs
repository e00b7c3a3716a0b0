//! The client's one error type. Policy: a transfer retries what may pass
//! (connection trouble, 5xx such as the 502 of a restarted qemu-nbd, a
//! short read) a bounded number of times; a 4xx is the caller's mistake and
//! fails at once with the server's one-line message.

use reqwest::StatusCode;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{method} {url}: {status}: {message}")]
    Status {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// HTTP status.
        status: StatusCode,
        /// The server's message.
        message: String,
    },
    /// The request did not complete.
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    /// A body had fewer or more bytes than asked for.
    #[error("short read: {got} of {expected} bytes at offset {offset}")]
    ShortRead {
        /// Offset asked for.
        offset: u64,
        /// Bytes asked for.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The local image failed.
    #[error("local image: {0}")]
    Local(#[from] blockgate_nbd::Error),
    /// qemu-img or qemu-nbd failed.
    #[error("{0}")]
    Qemu(#[from] blockgate_nbd::qemu::QemuError),
    /// A local file or stream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that does not parse.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The request cannot be made as asked.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// True if trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => status.is_server_error() && *status != StatusCode::NOT_IMPLEMENTED,
            ClientError::Transport(error) => !error.is_builder() && !error.is_redirect() && !error.is_decode(),
            ClientError::ShortRead { .. } => true,
            _ => false,
        }
    }
}

/// Result alias of the client library.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
