//! The few libvirt calls blockgate needs to back up running VMs: list
//! domains, read their XML, list and delete checkpoints, begin, inspect
//! and abort pull-mode backup jobs, freeze and thaw guest file systems,
//! and a QMP query. libvirt is loaded at run time (`ffi`'s paragraph
//! says why), so [`Connection::open`] on a host without libvirt is an
//! [`Error`] with code [`code::UNAVAILABLE`], not a failure to start.
//! Calls block: run them off async workers.
#![deny(unsafe_code)]

mod ffi;

pub use ffi::{Connection, Domain};

/// libvirt error codes (`virErrorNumber`) blockgate tells apart.
pub mod code {
    /// Not a libvirt code: libvirt itself could not be loaded.
    pub const UNAVAILABLE: i32 = -1;
    /// An argument libvirt refused (or a NUL byte in one of ours).
    pub const INVALID_ARG: i32 = 8;
    /// No domain of that name.
    pub const NO_DOMAIN: i32 = 42;
    /// The operation does not apply now (a job already runs, the domain
    /// is not running...).
    pub const OPERATION_INVALID: i32 = 55;
    /// The guest agent is missing or does not answer.
    pub const AGENT_UNRESPONSIVE: i32 = 86;
    /// No checkpoint of that name.
    pub const NO_DOMAIN_CHECKPOINT: i32 = 103;
    /// No backup job.
    pub const NO_DOMAIN_BACKUP: i32 = 104;
    /// The checkpoint's bitmaps cannot be used (the VM's qemu crashed).
    pub const CHECKPOINT_INCONSISTENT: i32 = 109;
}

/// A failed libvirt call: libvirt's error code and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// A [`code`] (`virErrorNumber`).
    pub code: i32,
    /// libvirt's message.
    pub message: String,
}

impl Error {
    fn unavailable(message: String) -> Error {
        Error { code: code::UNAVAILABLE, message }
    }
}

/// `virDomainState` values.
pub mod state {
    /// Running.
    pub const RUNNING: i32 = 1;
    /// Paused.
    pub const PAUSED: i32 = 3;
    /// Shut off.
    pub const SHUTOFF: i32 = 5;
}
