//! A streaming reader for a JSON array of objects, as the extents route
//! sends it: bytes arrive in any pieces, items come out one at a time, and
//! only the item being parsed is buffered, so a listing of millions of
//! extents costs a client no more memory than one of ten. Sans-I/O: feed a
//! buffer, take items until it needs more.

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;

/// Where the reader is in the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Before `[`.
    Start,
    /// After `[`: an item or `]`.
    First,
    /// After an item: `,` or `]`.
    Between,
    /// After `,`: an item.
    Item,
    /// After `]`.
    End,
}

/// Why the input is not a JSON array of items.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON array: {0}")]
pub struct ArrayError(String);

/// The streaming array reader.
#[derive(Debug)]
pub struct ArrayDecoder {
    position: Position,
}

impl Default for ArrayDecoder {
    fn default() -> Self {
        ArrayDecoder { position: Position::Start }
    }
}

impl ArrayDecoder {
    /// The next item from `buffer`; `Ok(None)` when more input is needed or
    /// the array has ended ([`ArrayDecoder::is_done`] tells which).
    pub fn decode<T: DeserializeOwned>(&mut self, buffer: &mut BytesMut) -> Result<Option<T>, ArrayError> {
        loop {
            let skipped = buffer.iter().take_while(|b| b.is_ascii_whitespace()).count();
            buffer.advance(skipped);
            let Some(&next) = buffer.first() else { return Ok(None) };
            match (self.position, next) {
                (Position::Start, b'[') => {
                    buffer.advance(1);
                    self.position = Position::First;
                }
                (Position::First | Position::Between, b']') => {
                    buffer.advance(1);
                    self.position = Position::End;
                }
                (Position::Between, b',') => {
                    buffer.advance(1);
                    self.position = Position::Item;
                }
                (Position::First | Position::Item, _) => {
                    let mut items = serde_json::Deserializer::from_slice(buffer).into_iter::<T>();
                    return match items.next() {
                        Some(Ok(item)) => {
                            let used = items.byte_offset();
                            buffer.advance(used);
                            self.position = Position::Between;
                            Ok(Some(item))
                        }
                        Some(Err(error)) if error.is_eof() => Ok(None),
                        Some(Err(error)) => Err(ArrayError(error.to_string())),
                        None => Ok(None),
                    };
                }
                (Position::End, _) => return Err(ArrayError("data after the closing ]".into())),
                (_, other) => return Err(ArrayError(format!("unexpected {:?}", char::from(other)))),
            }
        }
    }

    /// True once the closing `]` was read.
    pub fn is_done(&self) -> bool {
        self.position == Position::End
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Extent, ZeroState};
    use proptest::prelude::*;

    fn decode_all(input: &[u8], chunk: usize) -> Result<Vec<Extent<ZeroState>>, ArrayError> {
        let mut decoder = ArrayDecoder::default();
        let mut buffer = BytesMut::new();
        let mut items = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buffer.extend_from_slice(piece);
            while let Some(item) = decoder.decode(&mut buffer)? {
                items.push(item);
            }
        }
        if !decoder.is_done() {
            return Err(ArrayError("truncated".into()));
        }
        Ok(items)
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_items(
            extents in proptest::collection::vec((any::<u32>(), 1u32.., any::<bool>(), any::<bool>()), 0..30),
            chunk in 1usize..200,
            pretty in any::<bool>(),
        ) {
            let extents: Vec<Extent<ZeroState>> = extents
                .into_iter()
                .map(|(start, length, zero, hole)| Extent { start: start.into(), length: length.into(), flags: ZeroState { zero, hole } })
                .collect();
            let input = if pretty { serde_json::to_vec_pretty(&extents) } else { serde_json::to_vec(&extents) }.unwrap();
            prop_assert_eq!(decode_all(&input, chunk).unwrap(), extents);
        }

        #[test]
        fn truncated_arrays_are_not_complete(count in 1usize..10, cut in any::<proptest::sample::Index>()) {
            let extents: Vec<Extent<ZeroState>> = (0..count as u64).map(|i| Extent { start: i, length: 1, flags: ZeroState { zero: false, hole: false } }).collect();
            let input = serde_json::to_vec(&extents).unwrap();
            let cut = cut.index(input.len());
            prop_assert!(decode_all(&input[..cut], 7).is_err());
        }

        #[test]
        fn garbage_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200), chunk in 1usize..50) {
            let _ = decode_all(&input, chunk);
        }
    }

    #[test]
    fn rejects_what_is_not_an_array_of_items() {
        for input in [&b"{}"[..], b"[1,]", b"[{\"start\":1}]", b"[] x", b"[{},{}"] {
            assert!(decode_all(input, 3).is_err(), "{}", String::from_utf8_lossy(input));
        }
    }
}
