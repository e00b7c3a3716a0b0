//! The client's one error type. Policy: a transfer retries what may pass
//! (connection trouble, 5xx such as the 502 of a restarted qemu-nbd, a
//! body cut off or short) a bounded number of times, but never a 502 that
//! says writes may be lost (only writing them again helps); a 4xx is the
//! caller's mistake and fails at once with the server's one-line message
//! (control characters escaped: see [`printable`]). Each
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
    /// TLS refused the server's certificate: no retry helps.
    #[error("{url}: {reason}")]
    Untrusted {
        /// Request URL.
        url: String,
        /// Why, and what to do about it.
        reason: String,
    },
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
    /// A local image and the remote one differ in size; nothing was written.
    #[error(
        "the local image has {local} bytes and the remote image {remote}: nothing was written (a smaller local image may be uploaded with the rest of the remote image zeroed: --zero-tail)"
    )]
    SizeMismatch {
        /// Virtual size of the local image.
        local: u64,
        /// Size of the remote image.
        remote: u64,
    },
    /// The server lost writes in every try of an upload.
    #[error(
        "writes were lost in each of {tries} tries (the server's storage daemon restarted before they were flushed): run the upload again"
    )]
    WritesLost {
        /// Tries made.
        tries: u32,
        /// The server's last answer.
        #[source]
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// True if trying the same request again may succeed. Not after lost
    /// writes: the flush would pass once the lost ranges are written again,
    /// not by itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { .. } if self.lost_writes() => false,
            ClientError::Status { status, .. } => status.is_server_error() && *status != StatusCode::NOT_IMPLEMENTED,
            // Connection trouble, and a body cut off half-way (read again
            // from where it stopped).
            ClientError::Transport(error) => !error.is_builder() && !error.is_redirect(),
            ClientError::ShortRead { .. } => true,
            _ => false,
        }
    }
}

impl ClientError {
    /// The server says writes since its storage daemon restarted may be
    /// lost (a 502 that says "writes may be lost", to a flush): what was
    /// written since the last flush must be written again.
    pub fn lost_writes(&self) -> bool {
        matches!(self, ClientError::Status { status: StatusCode::BAD_GATEWAY, message, .. } if message.contains("writes may be lost"))
    }

    /// A refusal because two sizes differ: the local image and the remote
    /// one, or (a 400 naming the virtual-size) a restored stream and the
    /// image.
    pub fn is_size_mismatch(&self) -> bool {
        match self {
            ClientError::SizeMismatch { .. } => true,
            ClientError::Status { status: StatusCode::BAD_REQUEST, message, .. } => message.contains("virtual-size"),
            _ => false,
        }
    }
}

/// `text` fit for a terminal: control characters (escape sequences,
/// bells, C1 codes) are shown escaped (`\u{1b}`), never sent raw, since
/// much of what the CLI prints comes from the server.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect::<String>().into()
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

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("plain text é"), "plain text é");
        assert_eq!(printable("a\u{1b}[2Jb\u{9b}c\u{7}\n"), "a\\u{1b}[2Jb\\u{9b}c\\u{7}\\n");
    }
}
