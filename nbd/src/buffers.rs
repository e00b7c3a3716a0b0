//! Image data buffers, reused: READ replies are read into them and PUT
//! bodies gathered in them. A fresh 256 KiB allocation is served by
//! `mmap`, so every 4 KiB page of it faults when it is first written, and
//! the pages go back to the kernel when it is freed: 12% of a TLS
//! download's CPU went to those faults. A filled buffer is handed out as
//! [`Bytes`] whose owner puts the buffer back into a small process-wide
//! pool when the last view of it is dropped, so its pages stay mapped for
//! the next use. The pool keeps at most `KEPT` buffers: memory stays
//! bounded by the requests in flight.

use std::sync::Mutex;

use bytes::Bytes;

/// Capacity of a pooled buffer: the largest request the server issues.
pub const POOLED_CAPACITY: usize = 256 << 10;

/// Most idle buffers kept (8 MiB): a few transfers' pipelines.
const KEPT: usize = 32;

static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for `length` bytes; a pooled one when
/// `length` fits in one. Its spare capacity may hold stale bytes of an
/// earlier request, which are never exposed: only what is written counts
/// as length.
pub fn take(length: usize) -> Vec<u8> {
    if length > POOLED_CAPACITY {
        return Vec::with_capacity(length);
    }
    let idle = IDLE.lock().expect("read buffer pool lock").pop();
    idle.map_or_else(
        || Vec::with_capacity(POOLED_CAPACITY),
        |mut buffer| {
            buffer.clear();
            buffer
        },
    )
}

/// Puts a buffer that is no longer needed back into the pool (or frees it
/// when it is not a pooled one or the pool is full).
pub fn give_back(buffer: Vec<u8>) {
    if buffer.capacity() != POOLED_CAPACITY {
        return;
    }
    let mut idle = IDLE.lock().expect("read buffer pool lock");
    if idle.len() < KEPT {
        idle.push(buffer);
    }
}

/// The filled buffer as `Bytes` that go back to the pool when dropped.
pub fn freeze(buffer: Vec<u8>) -> Bytes {
    if buffer.capacity() == POOLED_CAPACITY { Bytes::from_owner(Pooled(buffer)) } else { Bytes::from(buffer) }
}

/// A pooled buffer owned by `Bytes`; returns to the pool on drop.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_read_gives_its_buffer_to_the_next_one_without_its_bytes() {
        let mut first = take(4096);
        first.extend_from_slice(&[7; 4096]);
        let pointer = first.as_ptr();
        let bytes = freeze(first);
        assert_eq!(&bytes[..], &[7; 4096][..]);
        drop(bytes);
        // Other tests share the pool, so look for this buffer among a few.
        let taken: Vec<Vec<u8>> = (0..KEPT).map(|_| take(100)).collect();
        let reused = taken.iter().find(|buffer| buffer.as_ptr() == pointer).expect("the buffer came back to the pool");
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), POOLED_CAPACITY);
    }
}
