//! Nothing to export: this crate only holds the end-to-end tests in
//! `tests/e2e/`, which drive the built `blockgate-server` binary with a real
//! qemu-nbd, reqwest and curl.
