//! blockgate-server: an HTTPS disk-image transfer server in the mould of
//! ovirt-imageio. An HTTP request flows through one straight line of
//! modules: [`server`] (TLS, HTTP) → [`routes`] (parse, authorize) →
//! [`tickets`] → [`backend`] (NBD pool, qemu-nbd child) → the
//! `blockgate-nbd` crate → qemu-nbd, and back as a stream ([`transfer`],
//! [`extents`]; the sparse stream: [`backup`] out, [`restore`] in).

pub mod access_log;
pub mod backend;
pub mod backup;
pub mod checkpoints;
pub mod config;
pub mod connections;
pub mod control;
pub mod durability;
pub mod error;
pub mod extents;
pub mod hashing;
pub mod image_files;
pub mod metrics;
pub mod owned;
pub mod ranges;
pub mod restore;
pub mod restore_record;
pub mod routes;
pub mod server;
pub mod state_file;
pub mod tickets;
pub mod tls;
pub mod transfer;
