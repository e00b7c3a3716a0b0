//! blockgate-client: the HTTP client library of blockgate (and of any
//! imageio-compatible server) and the `blockgate` command-line tool.
//!
//! [`ImageClient`] makes single requests (options, size, extents, ranged
//! reads and writes, zero, flush, checksum, the sparse stream,
//! checkpoints), retried
//! with backoff when that is safe. [`transfer`] moves whole images between
//! a local raw or qcow2 file ([`LocalImage`]: a raw file read and written
//! directly, a qcow2 through a local qemu-nbd) and a server on several
//! connections, following extents.
//! [`ControlClient`] speaks to the server's control API (tickets,
//! metrics), on its unix socket or over TLS with a client certificate,
//! as the [`ControlArgs`] flags say.

mod control;
mod error;
mod framing;
mod http;
mod image;
mod local;
mod retry;
pub mod transfer;

pub use control::{ControlArgs, ControlClient};
pub use error::{ClientError, Result, chain, printable};
pub use http::Trust;
pub use image::{ImageClient, Scope};
pub use local::{LocalImage, Run};
pub use retry::{RETRY_LOG, RetryPolicy};
