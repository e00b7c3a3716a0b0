//! End-to-end tests: the built `blockgate-server` binary, a real qemu-nbd and qemu-storage-daemon,
//! and clients (reqwest, curl) doing what users do; libvirt domains for the VM-backup tests.

mod attack;
mod attack2;
mod attack20;
mod attack21;
mod attack22;
mod attack3;
mod attack_qcow2;
mod attack_vm;
mod backup;
mod checkpoints;
mod cli;
mod cli_hostile;
mod cli_raw;
mod cli_safety;
mod common;
mod data;
mod domains;
mod durability;
mod errors;
mod faults;
mod first_run;
mod host_files;
mod lifecycle;
mod load;
mod openapi;
mod operations;
mod protocols;
mod readme;
mod remote_control;
mod security;
mod tickets;
mod vm_api;
mod vm_backups;
mod vm_host;
