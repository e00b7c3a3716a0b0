//! An async, pipelined NBD client for tokio.
//!
//! blockgate talks to qemu-nbd through this crate: fixed-newstyle
//! negotiation with structured replies and metadata contexts, then READ,
//! WRITE, WRITE_ZEROES, TRIM, FLUSH and BLOCK_STATUS with many requests in
//! flight on one connection. No published crate does this (see
//! `docs/nbd.md`); this one knows nothing of HTTP.
//!
//! ```no_run
//! # async fn demo() -> blockgate_nbd::Result<()> {
//! use blockgate_nbd::{Address, Client, ConnectOptions};
//! let address = Address::parse("nbd+unix:///?socket=/tmp/nbd.sock")?;
//! let options = ConnectOptions { meta_contexts: vec!["base:allocation".into()], ..Default::default() };
//! let client = Client::connect(&address, &options).await?;
//! let first_block = client.read(0, 4096).await?;
//! # Ok(()) }
//! ```

mod address;
pub mod allocation;
pub mod buffers;
mod client;
mod error;
mod handshake;
mod packages;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod reply;
pub mod wire;

pub use address::{Address, DEFAULT_PORT, Endpoint};
pub use client::{BlockStatus, Client, ZeroFlags};
pub use error::{Error, Result};
pub use handshake::{BlockSizes, ConnectOptions, ExportInfo};
pub use reply::StatusExtent;

/// Context name of allocation status (HOLE and ZERO flags).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context name of qemu's allocation depth (0 = unallocated).
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of qemu's dirty bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// base:allocation flag: the range is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu:dirty-bitmap flag: the range changed.
pub const STATE_DIRTY: u32 = 1 << 0;
