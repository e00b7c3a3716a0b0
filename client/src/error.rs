//! The client's one error type. Policy: a transfer retries what may pass
//! (connection trouble, 5xx such as the 502 of a restarted qemu-nbd, a
//! body cut off or short) a bounded number of times; a 4xx is the caller's
//! mistake and fails at once with the server's one-line message. Each
//! variant's text names only its own level; its source carries the rest
//! of the chain, so a printed chain never says a thing twice.

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
    #[error(transparent)]
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
    #[error("local image")]
    Local(#[from] blockgate_nbd::Error),
    /// qemu-img or qemu-nbd failed.
    #[error(transparent)]
    Qemu(#[from] blockgate_nbd::qemu::QemuError),
    /// A local file or stream failed.
    #[error(transparent)]
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
            // Connection trouble, and a body cut off half-way (read again
            // from where it stopped).
            ClientError::Transport(error) => !error.is_builder() && !error.is_redirect(),
            ClientError::ShortRead { .. } => true,
            _ => false,
        }
    }
}

/// Result alias of the client library.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An error and its sources on one line, each cause once: a cause whose
/// text the line already holds (many libraries repeat their source in
/// their own message) is left out.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer ({0})")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_chain_names_each_cause_once() {
        let io = || std::io::Error::other("connection refused");
        assert_eq!(chain(&Repeats(io())), "outer (connection refused)");
        let local = ClientError::Local(blockgate_nbd::Error::Protocol("bad reply".into()));
        assert_eq!(chain(&local), "local image: NBD protocol violation: bad reply");
        assert_eq!(chain(&ClientError::Io(io())), "connection refused");
    }
}
