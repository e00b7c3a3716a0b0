//! Byte ranges of HTTP: the `Range` request header of GET and the
//! `Content-Range` header of PUT, with the edge cases of `docs/api.md`:
//! single, open-ended and suffix ranges; 416 for what cannot be satisfied
//! (or for several ranges, which we do not serve); 400 for what does not
//! parse. Ranges here are half-open, `[start, end)`.

use std::fmt;

/// A half-open byte range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The `Content-Range` value of a 206 response for an image of `size`.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end - 1)
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bytes {}-{}", self.start, self.end.saturating_sub(1))
    }
}

/// Why a range header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The header does not parse: 400.
    #[error("malformed {header} header {value:?}: {reason}")]
    Malformed {
        /// `Range` or `Content-Range`.
        header: &'static str,
        /// The header value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The range is valid but cannot be served for this image: 416.
    #[error("range {value:?} not satisfiable for an image of {size} bytes{}", hint(.reason))]
    Unsatisfiable {
        /// The header value.
        value: String,
        /// Image size.
        size: u64,
        /// Why.
        reason: &'static str,
    },
}

fn hint(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(": {reason}") }
}

/// Parses a GET `Range` header against an image of `size` bytes.
///
/// `bytes=A-B` (B clamped to the last byte), `bytes=A-`, `bytes=-N` (the
/// last N bytes, clamped to the image). Several ranges are refused as
/// unsatisfiable, since we serve no multipart responses.
pub fn parse_range(value: &str, size: u64) -> Result<ByteRange, RangeError> {
    let malformed = |reason| RangeError::Malformed { header: "Range", value: value.to_string(), reason };
    let unsatisfiable = |reason| RangeError::Unsatisfiable { value: value.to_string(), size, reason };
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(|| malformed("expected bytes=START-END"))?;
    if spec.contains(',') {
        return Err(unsatisfiable("multiple ranges are not supported; ask for one range"));
    }
    let (first, last) = spec.trim().split_once('-').ok_or_else(|| malformed("expected bytes=START-END"))?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let suffix = parse_number(last).ok_or_else(|| malformed("suffix length is not a number"))?;
        if suffix == 0 || size == 0 {
            return Err(unsatisfiable("empty suffix range"));
        }
        return Ok(ByteRange { start: size - suffix.min(size), end: size });
    }
    let start = parse_number(first).ok_or_else(|| malformed("start is not a number"))?;
    let end = if last.is_empty() {
        size
    } else {
        let last = parse_number(last).ok_or_else(|| malformed("end is not a number"))?;
        if last < start {
            return Err(malformed("end before start"));
        }
        last.saturating_add(1).min(size)
    };
    if start >= size {
        return Err(unsatisfiable("start at or past the end of the image"));
    }
    Ok(ByteRange { start, end })
}

/// A PUT `Content-Range`: where the body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// Offset of the first byte of the body.
    pub start: u64,
    /// One past the last byte, when the header gives it.
    pub end: Option<u64>,
    /// The complete length after `/`, unless `*`.
    pub complete_length: Option<u64>,
}

/// Parses a PUT `Content-Range`: `bytes A-B/*`, `bytes A-B/SIZE`, or
/// `bytes A-/*` (the end is then the body's length).
pub fn parse_content_range(value: &str) -> Result<ContentRange, RangeError> {
    let malformed = |reason| RangeError::Malformed { header: "Content-Range", value: value.to_string(), reason };
    let spec = value.trim().strip_prefix("bytes ").ok_or_else(|| malformed("expected bytes START-END/*"))?;
    let (range, complete) = spec.trim().split_once('/').ok_or_else(|| malformed("expected bytes START-END/*"))?;
    let complete_length = match complete.trim() {
        "*" => None,
        number => Some(parse_number(number).ok_or_else(|| malformed("complete length is not a number or *"))?),
    };
    let (first, last) = range.trim().split_once('-').ok_or_else(|| malformed("expected bytes START-END/*"))?;
    let start = parse_number(first.trim()).ok_or_else(|| malformed("start is not a number"))?;
    let end = match last.trim() {
        "" => None,
        last => {
            let last = parse_number(last).ok_or_else(|| malformed("end is not a number"))?;
            if last < start {
                return Err(malformed("end before start"));
            }
            Some(last.checked_add(1).ok_or_else(|| malformed("end overflows"))?)
        }
    };
    if let (Some(end), Some(complete)) = (end, complete_length) {
        if end > complete {
            return Err(malformed("end past the complete length"));
        }
    }
    Ok(ContentRange { start, end, complete_length })
}

/// A decimal u64 with digits only (no sign, no spaces inside).
fn parse_number(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1000;

    fn range(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn single_open_and_suffix_ranges() {
        assert_eq!(parse_range("bytes=0-99", SIZE), Ok(range(0, 100)));
        assert_eq!(parse_range("bytes=990-5000", SIZE), Ok(range(990, 1000)));
        assert_eq!(parse_range("bytes=500-", SIZE), Ok(range(500, 1000)));
        assert_eq!(parse_range("bytes=-10", SIZE), Ok(range(990, 1000)));
        assert_eq!(parse_range("bytes=-5000", SIZE), Ok(range(0, 1000)));
        assert_eq!(parse_range(" bytes=1-1 ", SIZE), Ok(range(1, 2)));
    }

    #[test]
    fn unsatisfiable_ranges() {
        for value in ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=0-1,5-6"] {
            assert!(matches!(parse_range(value, SIZE), Err(RangeError::Unsatisfiable { .. })), "{value}");
        }
        assert!(matches!(parse_range("bytes=0-", 0), Err(RangeError::Unsatisfiable { .. })));
    }

    #[test]
    fn malformed_ranges() {
        for value in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=+1-2",
            "bytes=1",
            "bytes=99999999999999999999999-",
        ] {
            assert!(matches!(parse_range(value, SIZE), Err(RangeError::Malformed { .. })), "{value}");
        }
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-99/*"), Ok(ContentRange { start: 0, end: Some(100), complete_length: None }));
        assert_eq!(parse_content_range("bytes 100-199/1000"), Ok(ContentRange { start: 100, end: Some(200), complete_length: Some(1000) }));
        assert_eq!(parse_content_range("bytes 7-/*"), Ok(ContentRange { start: 7, end: None, complete_length: None }));
        for value in ["bytes */1000", "bytes 5-1/*", "bytes 0-99", "0-99/*", "bytes 0-2000/1000", "bytes x-1/*"] {
            assert!(parse_content_range(value).is_err(), "{value}");
        }
    }

    proptest! {
        #[test]
        fn parsed_ranges_lie_inside_the_image(value in "(bytes=)?[0-9]{0,4}-?[0-9]{0,4}(,[0-9]-[0-9])?", size in 0u64..20000) {
            if let Ok(range) = parse_range(&value, size) {
                prop_assert!(range.start < range.end && range.end <= size);
            }
        }

        #[test]
        fn any_header_parses_or_errs_without_panic(value in ".{0,40}", size in any::<u64>()) {
            let _ = parse_range(&value, size);
            let _ = parse_content_range(&value);
        }

        #[test]
        fn explicit_ranges_round_trip(start in 0u64..1 << 40, len in 1u64..1 << 30, size in 1u64..1 << 41) {
            let value = format!("bytes={}-{}", start, start + len - 1);
            match parse_range(&value, size) {
                Ok(range) => {
                    prop_assert_eq!(range.start, start);
                    prop_assert_eq!(range.end, (start + len).min(size));
                    let content_range = range.content_range(size);
                    prop_assert_eq!(content_range, format!("bytes {}-{}/{}", start, range.end - 1, size));
                }
                Err(RangeError::Unsatisfiable { .. }) => prop_assert!(start >= size),
                Err(other) => prop_assert!(false, "{}", other),
            }
        }

        #[test]
        fn content_ranges_round_trip(start in any::<u64>(), len in 1u64..1 << 40, total in proptest::option::of(any::<u64>())) {
            prop_assume!(start.checked_add(len).is_some());
            let end = start + len;
            let value = format!("bytes {}-{}/{}", start, end - 1, total.map_or("*".to_string(), |t| t.to_string()));
            match parse_content_range(&value) {
                Ok(parsed) => prop_assert_eq!(parsed, ContentRange { start, end: Some(end), complete_length: total }),
                Err(_) => prop_assert!(total.is_some_and(|t| end > t)),
            }
        }
    }
}
