//! Where a ticket's bytes come from. Every source ends as a
//! [`backend::Backend`]: a pool of NBD connections that the transfer code
//! reads and writes, whatever serves the export. The sources, side by
//! side: a local image file on a qemu-storage-daemon the server owns
//! ([`owned`], with its [`checkpoints`] and the [`image_files`] it may
//! read through), an NBD URI someone else serves, and the disks of a
//! running VM exported by a libvirt backup job ([`vm`]). [`durability`]
//! keeps the writes a broken connection may have lost.

pub mod backend;
pub mod checkpoints;
pub mod durability;
pub mod image_files;
pub mod owned;
pub mod vm;
