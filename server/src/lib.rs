//! blockgate-server: an HTTPS disk-image transfer server in the mould of
//! ovirt-imageio. The crate's parts, each a folder: [`http`] (listeners,
//! TLS, connections, the data API's routes) and [`control`] (the control
//! API: tickets) take requests; [`transfer`]
//! moves the bytes (raw ranges, extents, the sparse stream out and in)
//! for a ticket ([`tickets`]: who may do what, for how long);
//! [`sources`] is where the bytes live (an NBD pool on an owned
//! qemu-storage-daemon or on an NBD URI). Imports run one way: http and
//! control → transfer → tickets → sources → the `blockgate-nbd` crate.

pub mod clock;
pub mod config;
pub mod control;
pub mod error;
pub mod http;
pub mod metrics;
pub mod ranges;
pub mod sources;
pub mod state_file;
pub mod tickets;
pub mod transfer;
