//! The JSON bodies of the small routes: `OPTIONS /images/{ticket}` (imageio's
//! keys plus blockgate's extensions) and `GET /info/`.

use serde::{Deserialize, Serialize};

/// The body of `OPTIONS /images/{ticket}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOptions {
    /// Optional operations this ticket supports (`checksum`, `extents`,
    /// `flush`, `zero`).
    pub features: Vec<String>,
    /// Connections that may read at once.
    pub max_readers: u32,
    /// Connections that may write at once.
    pub max_writers: u32,
    /// Path of the local listener, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<String>,
    /// Image size in bytes (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// True if the ticket has a dirty bitmap (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<bool>,
    /// `format=sparse` is served (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_stream: Option<bool>,
    /// The image can hold checkpoints (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<bool>,
}

/// The body of `GET /info/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Server version.
    pub version: String,
}
