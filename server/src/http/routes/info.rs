//! `GET /info/`: the server version, no ticket needed.

use axum::Json;
use blockgate_protocol::ServerInfo;

pub async fn get() -> Json<ServerInfo> {
    Json(ServerInfo { version: env!("CARGO_PKG_VERSION").to_string() })
}
