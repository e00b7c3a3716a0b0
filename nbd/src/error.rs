//! The one error type of the NBD client. A request fails either because the
//! server answered with an errno (`Server`), because the connection can no
//! longer be trusted (`Protocol`, `Io`, `Disconnected`: every pending request
//! fails with it), or because the caller asked for something the export
//! does not allow (`Unsupported`, `OutOfRange`).

use crate::wire;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket error.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol; the connection is closed.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused an option during the handshake.
    #[error("NBD server refused {option}: {reason}{}", message_suffix(.message))]
    OptionRefused {
        /// Option name.
        option: &'static str,
        /// What the error reply type means.
        reason: &'static str,
        /// The server's message.
        message: String,
    },
    /// The server failed a command.
    #[error("NBD server error {} ({errno}){}", wire::errno_name(*.errno), message_suffix(.message))]
    Server {
        /// NBD errno.
        errno: u32,
        /// The server's message, possibly empty.
        message: String,
    },
    /// The connection was lost while the request was pending, or before it
    /// was sent.
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    /// No reply came in time; the connection was closed, since a late
    /// reply could no longer be matched with anything.
    #[error("NBD server sent no reply within {0:?}; connection closed")]
    TimedOut(std::time::Duration),
    /// The export's flags do not allow this command.
    #[error("the NBD export does not support {0}")]
    Unsupported(&'static str),
    /// The request does not fit the export.
    #[error("NBD request out of range: {0}")]
    OutOfRange(String),
    /// An NBD URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

impl Error {
    /// True when the connection is unusable and a new one might succeed.
    pub fn is_connection_error(&self) -> bool {
        matches!(self, Error::Io(_) | Error::Protocol(_) | Error::Disconnected(_) | Error::TimedOut(_))
    }
}

/// Result alias for the NBD client.
pub type Result<T, E = Error> = std::result::Result<T, E>;
