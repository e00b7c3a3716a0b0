//! `GET /info/`: the server version, no ticket needed.

use crate::http::json_line::JsonLine;
use blockgate_protocol::ServerInfo;

pub async fn get() -> JsonLine<ServerInfo> {
    JsonLine(ServerInfo { version: env!("CARGO_PKG_VERSION").to_string() })
}
