//! Parsing of transmission replies: the simple reply, the structured chunk
//! header and the payloads of the chunk types that are read whole (hole,
//! block status, errors). Pure functions over byte slices, so the property
//! tests can feed them anything; `OFFSET_DATA` payloads are streamed by the
//! connection itself and only their 8-byte offset prefix is parsed here.

use crate::error::Error;
use crate::wire::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk};

/// Largest non-data chunk payload we accept: block status replies for a
/// 2 GiB request at 512-byte granularity stay well below this, and a larger
/// claimed length is a corrupt stream, not a reason to allocate.
pub const MAX_CHUNK_PAYLOAD: u32 = 64 << 20;

/// The fixed part of a reply, after its 4-byte magic told which kind it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: errno (0 for success) and cookie.
    Simple {
        /// NBD errno, 0 on success.
        errno: u32,
        /// Request cookie.
        cookie: u64,
    },
    /// A structured reply chunk header; `length` bytes of payload follow.
    Chunk {
        /// Chunk flags (`FLAG_DONE`).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Request cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Length of the header that follows a magic: 12 for a simple reply,
    /// 16 for a chunk. Errors on an unknown magic.
    pub fn rest_len(magic: u32) -> Result<usize, Error> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(12),
            STRUCTURED_REPLY_MAGIC => Ok(16),
            other => Err(Error::Protocol(format!("bad reply magic {other:#010x}"))),
        }
    }

    /// Parses the bytes that follow `magic` (exactly `rest_len(magic)`).
    pub fn parse(magic: u32, rest: &[u8]) -> Result<ReplyHeader, Error> {
        let expected = Self::rest_len(magic)?;
        if rest.len() != expected {
            return Err(Error::Protocol(format!("reply header is {} bytes, expected {expected}", rest.len())));
        }
        if magic == SIMPLE_REPLY_MAGIC {
            return Ok(ReplyHeader::Simple { errno: be_u32(&rest[0..4]), cookie: be_u64(&rest[4..12]) });
        }
        let header = ReplyHeader::Chunk {
            flags: be_u16(&rest[0..2]),
            kind: be_u16(&rest[2..4]),
            cookie: be_u64(&rest[4..12]),
            length: be_u32(&rest[12..16]),
        };
        if let ReplyHeader::Chunk { kind, length, .. } = header {
            if kind != chunk::OFFSET_DATA && length > MAX_CHUNK_PAYLOAD {
                return Err(Error::Protocol(format!("chunk of type {kind} claims {length} bytes of payload")));
            }
            if kind == chunk::OFFSET_DATA && length <= 8 {
                return Err(Error::Protocol(format!("OFFSET_DATA chunk of {length} bytes carries no data")));
            }
        }
        Ok(header)
    }
}

/// One extent of a block-status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub length: u32,
    /// Context-specific flags (or depth for qemu:allocation-depth).
    pub flags: u32,
}

/// The payload of a chunk that is read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// A range that reads as zeros.
    Hole {
        /// Image offset.
        offset: u64,
        /// Length in bytes.
        length: u32,
    },
    /// Extents of one metadata context.
    BlockStatus {
        /// Context id as the server assigned it.
        context: u32,
        /// Extents, in order from the request offset.
        extents: Vec<StatusExtent>,
    },
    /// The request failed.
    Error {
        /// NBD errno.
        errno: u32,
        /// Server message, possibly empty.
        message: String,
        /// Offset the error applies to (ERROR_OFFSET).
        offset: Option<u64>,
    },
}

/// Parses the payload of a non-data chunk.
pub fn parse_chunk_payload(kind: u16, payload: &[u8]) -> Result<ChunkPayload, Error> {
    match kind {
        chunk::NONE if payload.is_empty() => Ok(ChunkPayload::None),
        chunk::NONE => Err(Error::Protocol("NONE chunk with a payload".into())),
        chunk::OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(Error::Protocol(format!("OFFSET_HOLE chunk of {} bytes, expected 12", payload.len())));
            }
            let length = be_u32(&payload[8..12]);
            if length == 0 {
                return Err(Error::Protocol("OFFSET_HOLE chunk of length 0".into()));
            }
            Ok(ChunkPayload::Hole { offset: be_u64(&payload[0..8]), length })
        }
        chunk::BLOCK_STATUS => {
            if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
                return Err(Error::Protocol(format!("BLOCK_STATUS chunk of {} bytes", payload.len())));
            }
            let extents = payload[4..]
                .chunks_exact(8)
                .map(|pair| StatusExtent { length: be_u32(&pair[0..4]), flags: be_u32(&pair[4..8]) })
                .collect::<Vec<_>>();
            if extents.iter().any(|extent| extent.length == 0) {
                return Err(Error::Protocol("BLOCK_STATUS extent of length 0".into()));
            }
            Ok(ChunkPayload::BlockStatus { context: be_u32(&payload[0..4]), extents })
        }
        kind if kind & chunk::ERROR_BIT != 0 => {
            if payload.len() < 6 {
                return Err(Error::Protocol(format!("error chunk of {} bytes", payload.len())));
            }
            let errno = be_u32(&payload[0..4]);
            let message_len = usize::from(be_u16(&payload[4..6]));
            let rest = &payload[6..];
            if message_len > rest.len() {
                return Err(Error::Protocol(format!("error chunk message of {message_len} bytes in a {}-byte payload", payload.len())));
            }
            let message = String::from_utf8_lossy(&rest[..message_len]).into_owned();
            let offset = match (kind, rest.len() - message_len) {
                (chunk::ERROR_OFFSET, 8) => Some(be_u64(&rest[message_len..])),
                (chunk::ERROR_OFFSET, n) => {
                    return Err(Error::Protocol(format!("ERROR_OFFSET chunk has {n} trailing bytes, expected 8")));
                }
                _ => None,
            };
            if errno == 0 {
                return Err(Error::Protocol("error chunk with errno 0".into()));
            }
            Ok(ChunkPayload::Error { errno, message, offset })
        }
        other => Err(Error::Protocol(format!("unknown reply chunk type {other}"))),
    }
}

pub(crate) fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

pub(crate) fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"))
}

pub(crate) fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[0..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn error_payload(errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
        let mut payload = errno.to_be_bytes().to_vec();
        payload.extend((message.len() as u16).to_be_bytes());
        payload.extend(message.as_bytes());
        if let Some(offset) = offset {
            payload.extend(offset.to_be_bytes());
        }
        payload
    }

    #[test]
    fn parses_error_offset_chunk() {
        let payload = error_payload(5, "I/O error", Some(4096));
        assert_eq!(
            parse_chunk_payload(chunk::ERROR_OFFSET, &payload).unwrap(),
            ChunkPayload::Error { errno: 5, message: "I/O error".into(), offset: Some(4096) }
        );
    }

    #[test]
    fn rejects_unknown_non_error_chunk() {
        assert!(matches!(parse_chunk_payload(7, &[]), Err(Error::Protocol(_))));
    }

    #[test]
    fn unknown_error_chunk_is_an_error_reply() {
        let payload = error_payload(22, "", None);
        assert!(matches!(parse_chunk_payload(chunk::ERROR_BIT | 99, &payload), Ok(ChunkPayload::Error { errno: 22, .. })));
    }

    proptest! {
        #[test]
        fn chunk_payload_parser_never_panics(kind in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_chunk_payload(kind, &payload);
        }

        #[test]
        fn header_parser_never_panics(magic in prop_oneof![Just(SIMPLE_REPLY_MAGIC), Just(STRUCTURED_REPLY_MAGIC), any::<u32>()],
                                      rest in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = ReplyHeader::parse(magic, &rest);
        }

        #[test]
        fn block_status_round_trips(context in any::<u32>(), pairs in proptest::collection::vec((1u32.., any::<u32>()), 1..32)) {
            let mut payload = context.to_be_bytes().to_vec();
            for (length, flags) in &pairs {
                payload.extend(length.to_be_bytes());
                payload.extend(flags.to_be_bytes());
            }
            let parsed = parse_chunk_payload(chunk::BLOCK_STATUS, &payload).unwrap();
            let extents = pairs.iter().map(|&(length, flags)| StatusExtent { length, flags }).collect();
            prop_assert_eq!(parsed, ChunkPayload::BlockStatus { context, extents });
        }

        #[test]
        fn error_chunks_round_trip(errno in 1u32.., message in "[ -~]{0,40}", offset in proptest::option::of(any::<u64>())) {
            let kind = if offset.is_some() { chunk::ERROR_OFFSET } else { chunk::ERROR };
            let parsed = parse_chunk_payload(kind, &error_payload(errno, &message, offset)).unwrap();
            prop_assert_eq!(parsed, ChunkPayload::Error { errno, message, offset });
        }

        #[test]
        fn truncated_error_chunks_are_rejected(errno in 1u32.., message in "[a-z]{1,40}", cut in 1usize..8) {
            let payload = error_payload(errno, &message, None);
            let cut = cut.min(message.len());
            prop_assert!(parse_chunk_payload(chunk::ERROR, &payload[..payload.len() - cut]).is_err());
        }

        #[test]
        fn chunk_headers_round_trip(flags in any::<u16>(), kind in prop_oneof![Just(chunk::OFFSET_HOLE), Just(chunk::BLOCK_STATUS), Just(chunk::ERROR)],
                                    cookie in any::<u64>(), length in 0u32..=MAX_CHUNK_PAYLOAD) {
            let mut rest = flags.to_be_bytes().to_vec();
            rest.extend(kind.to_be_bytes());
            rest.extend(cookie.to_be_bytes());
            rest.extend(length.to_be_bytes());
            prop_assert_eq!(ReplyHeader::parse(STRUCTURED_REPLY_MAGIC, &rest).unwrap(), ReplyHeader::Chunk { flags, kind, cookie, length });
        }
    }
}
