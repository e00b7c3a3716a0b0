//! Checks the frames of a sparse stream as it passes through unchanged
//! (a backup written to stdout): the first frame is `meta`, every header
//! parses, the stream ends right after its `stop` frame. Payloads are
//! skipped, not read: only the 40 bytes of a header are held at a time,
//! and the receiver (a restore) checks the rest.

use blockgate_protocol::sparse::{HEADER_LEN, Kind, parse_header};

/// Where a stream is in its frames.
#[derive(Debug, Default)]
pub(crate) struct FrameWalker {
    /// Bytes of the header being read.
    header: Vec<u8>,
    /// Payload bytes (and their CR LF) still to pass.
    skip: u64,
    /// Frames seen.
    frames: u64,
    /// The `stop` header was read.
    stopped: bool,
}

impl FrameWalker {
    /// Takes the next bytes of the stream.
    pub(crate) fn pass(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let skipped = self.skip.min(bytes.len() as u64);
                self.skip -= skipped;
                bytes = &bytes[skipped as usize..];
                continue;
            }
            if self.stopped {
                return Err(format!("{} bytes after the stop frame", bytes.len()));
            }
            let taken = (HEADER_LEN - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..taken]);
            bytes = &bytes[taken..];
            if self.header.len() == HEADER_LEN {
                let (kind, _, length) = parse_header(&self.header).map_err(|reason| format!("frame {}: {reason}", self.frames + 1))?;
                if self.frames == 0 && kind != Kind::Meta {
                    return Err("the first frame is not meta".into());
                }
                self.frames += 1;
                self.stopped = kind == Kind::Stop;
                // Zero frames, and a stop without trailer, have no payload.
                let payload = !(kind == Kind::Zero || (kind == Kind::Stop && length == 0));
                self.skip = if payload { length.checked_add(2).ok_or("a frame length past 2^64 bytes")? } else { 0 };
                self.header.clear();
            }
        }
        Ok(())
    }

    /// At the end of the stream: it must have ended with its `stop` frame.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.stopped && self.skip == 0 {
            return Ok(());
        }
        Err(format!("the stream ended before its stop frame (after {} frames)", self.frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockgate_protocol::sparse::{CRLF, header};

    fn stream(frames: &[(Kind, u64, &[u8])]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (kind, start, payload) in frames {
            let length = if *kind == Kind::Zero { 4096 } else { payload.len() as u64 };
            bytes.extend_from_slice(&header(*kind, *start, length));
            if !payload.is_empty() {
                bytes.extend_from_slice(payload);
                bytes.extend_from_slice(CRLF);
            }
        }
        bytes
    }

    fn walk(bytes: &[u8], piece: usize) -> Result<(), String> {
        let mut walker = FrameWalker::default();
        for chunk in bytes.chunks(piece) {
            walker.pass(chunk)?;
        }
        walker.finish()
    }

    #[test]
    fn a_whole_stream_passes_in_any_pieces_and_a_cut_or_padded_one_does_not() {
        let whole = stream(&[(Kind::Meta, 0, b"{}"), (Kind::Data, 0, b"data"), (Kind::Zero, 4, b""), (Kind::Stop, 0, b"{\"frames\":2}")]);
        for piece in [1, 7, 40, 4096] {
            assert_eq!(walk(&whole, piece), Ok(()), "pieces of {piece}");
            let error = walk(&whole[..whole.len() - 1], piece).unwrap_err();
            assert!(error.contains("ended before its stop frame"), "{error}");
        }
        assert!(walk(&[&whole[..], b"x"].concat(), 3).unwrap_err().contains("after the stop frame"));
        let without_stop = stream(&[(Kind::Meta, 0, b"{}"), (Kind::Zero, 0, b"")]);
        assert!(walk(&without_stop, 5).unwrap_err().contains("ended before its stop frame"));
        assert!(walk(&stream(&[(Kind::Data, 0, b"x")]), 9).unwrap_err().contains("not meta"));
        assert!(walk(b"meta 00000000000000zz 0000000000000002\r\n", 40).unwrap_err().contains("frame 1"));
    }
}
