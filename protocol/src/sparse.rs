//! The sparse stream of `docs/sparse-stream.md`: 40-byte ASCII frame
//! headers (`KIND START LENGTH\r\n`), a `meta` JSON frame first, `data`
//! and `zero` frames in ascending order, and `stop` with an optional
//! trailer. The frame syntax is imageio's `sparse-stream` example's.
//!
//! Writing is a handful of encoders. Reading is [`Decoder`], a sans-I/O
//! state machine: the caller appends received bytes to a buffer and takes
//! [`Event`]s out until the decoder needs more. It hands a data frame out
//! in pieces of at most [`DATA_PIECE`] bytes as they arrive, so a reader
//! can write while the rest of the frame is on its way; a reader may also
//! gather a piece itself, in memory of its choosing, and hand it in
//! ([`Decoder::piece_wanted`]), so that pieces held after they are handed
//! out do not pin the decoder's buffer. It checks every rule
//! of the reader section (with the frame number, offset and reason in
//! each error), and only hands out a piece once it knows the frame is
//! well formed up to that point, so nothing after a bad frame is ever
//! applied. The trailer's checksum is checked against a blkhash the
//! reader computes from the events ([`Ending::verify`]): hashing is the
//! costliest part of reading a stream, and a reader can spread it over
//! its cores.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::blkhash::{ALGORITHM, DEFAULT_BLOCK_SIZE};

/// Length of every frame header.
pub const HEADER_LEN: usize = 40;
/// Largest data frame a writer emits.
pub const DATA_SEGMENT: u64 = 8 << 20;
/// Most bytes of a data frame in one [`Event::Data`], and so the most of
/// one the decoder holds.
pub const DATA_PIECE: u64 = 256 << 10;
/// Largest `meta` or trailer JSON accepted.
pub const MAX_JSON_FRAME: u64 = 1 << 20;
/// Media type of the stream.
pub const CONTENT_TYPE: &str = "application/x-blockgate-sparse";

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Metadata JSON.
    Meta,
    /// Image data.
    Data,
    /// A range that reads as zeros.
    Zero,
    /// End of stream, optional trailer JSON.
    Stop,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Meta => "meta",
            Kind::Data => "data",
            Kind::Zero => "zero",
            Kind::Stop => "stop",
        }
    }
}

/// Encodes a frame header.
pub fn header(kind: Kind, start: u64, length: u64) -> Bytes {
    let text = format!("{} {start:016x} {length:016x}\r\n", kind.as_str());
    debug_assert_eq!(text.len(), HEADER_LEN);
    Bytes::from(text)
}

/// The frame terminator after a payload.
pub const CRLF: &[u8] = b"\r\n";

/// The `meta` frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Meta {
    /// Image size in bytes.
    pub virtual_size: u64,
    /// Sum of all data frame lengths.
    pub data_size: u64,
    /// When the stream was made (ISO 8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// True when only changed ranges are carried.
    #[serde(default)]
    pub incremental: bool,
    /// `zero` or `dirty` (blockgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Dirty bitmap of an incremental stream (blockgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// `blockgate X.Y.Z` (blockgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<String>,
    /// The checkpoint an incremental stream continues from (blockgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The checkpoint the image reaches once the stream is applied
    /// (blockgate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// The disk a running VM's stream was taken from, `VM-UUID/TARGET`
    /// (blockgate): disks of one VM share checkpoint names, so a restore
    /// also checks that an incremental is of the disk its full was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// A checksum as the checksum route and the trailer carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    /// `blake2b`.
    pub algorithm: String,
    /// Block size of the blkhash.
    pub block_size: u64,
    /// Hex digest.
    pub checksum: String,
}

/// The `stop` frame payload (blockgate extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Trailer {
    /// Number of data and zero frames.
    pub frames: u64,
    /// Sum of data frame lengths.
    pub data_size: u64,
    /// Sum of zero frame lengths.
    pub zero_size: u64,
    /// blkhash of the image (full streams only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
}

/// Encodes a JSON frame (`meta`, or `stop` with a trailer).
pub fn json_frame<T: Serialize>(kind: Kind, payload: &T) -> Bytes {
    let json = serde_json::to_vec(payload).expect("serializable");
    let mut frame = BytesMut::with_capacity(HEADER_LEN + json.len() + 2);
    frame.extend_from_slice(&header(kind, 0, json.len() as u64));
    frame.extend_from_slice(&json);
    frame.extend_from_slice(CRLF);
    frame.freeze()
}

/// What the decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The stream's metadata (always first).
    Meta(Meta),
    /// Data to write at `offset`; a frame longer than [`DATA_PIECE`]
    /// arrives as several events.
    Data {
        /// Image offset.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// A range to zero.
    Zero {
        /// Image offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// The end of a well-formed stream, its checksum still to check.
    End(Ending),
}

/// The end of a well-formed stream: what it carried, and the checksum its
/// trailer claims, to check against the one the reader computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    frames: u64,
    data_size: u64,
    zero_size: u64,
    incremental: bool,
    checksum: Option<Checksum>,
    /// The stop frame's number and offset, for the error.
    frame: u64,
    offset: u64,
}

impl Ending {
    /// True when the trailer carries a checksum a reader can check: the
    /// blkhash ([`ALGORITHM`], [`DEFAULT_BLOCK_SIZE`]) of a full stream.
    pub fn checkable(&self) -> bool {
        !self.incremental
            && self.checksum.as_ref().is_some_and(|checksum| checksum.algorithm == ALGORITHM && checksum.block_size == DEFAULT_BLOCK_SIZE)
    }

    /// The stream's summary, once the trailer's checksum is checked
    /// against `computed`: the blkhash ([`ALGORITHM`],
    /// [`DEFAULT_BLOCK_SIZE`]) of the data and zero events in order, which
    /// a reader must give when [`Ending::checkable`]. A checksum that
    /// differs rejects the stream at its stop frame.
    pub fn verify(self, computed: Option<&str>) -> Result<Summary, StreamError> {
        let check = match (&self.checksum, computed) {
            (None, _) => ChecksumCheck::None,
            (Some(expected), Some(actual)) if self.checkable() => {
                if !expected.checksum.eq_ignore_ascii_case(actual) {
                    return Err(StreamError {
                        frame: self.frame,
                        offset: self.offset,
                        reason: format!("checksum {actual} differs from the trailer's {}", expected.checksum),
                    });
                }
                ChecksumCheck::Verified
            }
            // Carried but not checkable (an incremental's image is not all
            // in the stream, or another algorithm): unchecked.
            (Some(_), _) => ChecksumCheck::Unchecked,
        };
        Ok(Summary::new(self.frames, self.data_size, self.zero_size, check))
    }
}

/// What a complete stream carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Summary {
    /// Data and zero frames.
    pub frames: u64,
    /// Bytes of data.
    pub data_size: u64,
    /// Bytes of zeros.
    pub zero_size: u64,
    /// What became of the stream's checksum (older servers did not say:
    /// read as none).
    #[serde(default)]
    pub checksum: ChecksumCheck,
    /// True when the trailer's checksum matched, false when it was not
    /// checked (another algorithm or block size, or the reader was asked
    /// not to); absent when the stream carries none (an incremental never
    /// does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

/// What became of a stream's trailer checksum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumCheck {
    /// It matched the data applied.
    Verified,
    /// Not checked: another algorithm or block size than the server
    /// computes, or the reader was asked not to (`checksum=n`).
    Unchecked,
    /// The stream carries no checksum (incrementals never do).
    #[default]
    None,
}

impl Summary {
    fn new(frames: u64, data_size: u64, zero_size: u64, checksum: ChecksumCheck) -> Summary {
        let verified = match checksum {
            ChecksumCheck::Verified => Some(true),
            ChecksumCheck::Unchecked => Some(false),
            ChecksumCheck::None => None,
        };
        Summary { frames, data_size, zero_size, checksum, verified }
    }
}

/// A rejected stream: which frame, where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct StreamError {
    /// 1-based frame number (the `meta` frame is 1).
    pub frame: u64,
    /// Offset of the frame (its START, or where the input ended).
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame {} at offset {}: {}", self.frame, self.offset, self.reason)
    }
}

enum State {
    Header,
    Meta {
        length: u64,
    },
    /// Inside a data frame; `gathered` is the next piece when the caller
    /// handed it in.
    Data {
        offset: u64,
        remaining: u64,
        gathered: Option<Bytes>,
    },
    Trailer {
        length: u64,
    },
    Done,
}

/// The streaming sparse-stream reader.
pub struct Decoder {
    target_size: u64,
    state: State,
    meta: Option<Meta>,
    frame: u64,
    frame_start: u64,
    /// End of the last data or zero frame.
    position: u64,
    frames: u64,
    data_size: u64,
    zero_size: u64,
}

impl Decoder {
    /// A decoder for a target image of `target_size` bytes.
    pub fn new(target_size: u64) -> Decoder {
        Decoder {
            target_size,
            state: State::Header,
            meta: None,
            frame: 0,
            frame_start: 0,
            position: 0,
            frames: 0,
            data_size: 0,
            zero_size: 0,
        }
    }

    fn error(&self, reason: impl Into<String>) -> StreamError {
        StreamError { frame: self.frame, offset: self.frame_start, reason: reason.into() }
    }

    /// Takes the next event out of `buffer`; `Ok(None)` means more input is
    /// needed. After an error the stream is rejected; stop feeding it.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Event>, StreamError> {
        loop {
            match self.state {
                State::Header => {
                    if buffer.len() < HEADER_LEN {
                        return Ok(None);
                    }
                    let raw = buffer.split_to(HEADER_LEN);
                    self.frame += 1;
                    // Until the header parses, the frame is where the last
                    // one ended.
                    self.frame_start = self.position;
                    if let Some(event) = self.start_frame(&raw)? {
                        return Ok(Some(event));
                    }
                }
                State::Meta { length } | State::Trailer { length } => {
                    if (buffer.len() as u64) < length + 2 {
                        return Ok(None);
                    }
                    let payload = buffer.split_to(length as usize);
                    let terminator = buffer.split_to(2);
                    if &terminator[..] != CRLF {
                        return Err(self.error("missing CR LF after the payload"));
                    }
                    return if matches!(self.state, State::Meta { .. }) {
                        self.finish_meta(&payload).map(Some)
                    } else {
                        self.finish_stream(Some(&payload)).map(Some)
                    };
                }
                State::Data { offset, remaining, ref mut gathered } => {
                    let segment = remaining.min(DATA_PIECE);
                    let last = segment == remaining;
                    let in_buffer = if gathered.is_some() { 0 } else { segment };
                    let needed = in_buffer + if last { 2 } else { 0 };
                    if (buffer.len() as u64) < needed {
                        return Ok(None);
                    }
                    let data = gathered.take().unwrap_or_else(|| buffer.split_to(segment as usize).freeze());
                    if last {
                        if &buffer[..2] != CRLF {
                            return Err(self.error("missing CR LF after the data"));
                        }
                        buffer.advance(2);
                        self.state = State::Header;
                    } else {
                        self.state = State::Data { offset: offset + segment, remaining: remaining - segment, gathered: None };
                    }
                    return Ok(Some(Event::Data { offset, data }));
                }
                State::Done => {
                    if buffer.is_empty() {
                        return Ok(None);
                    }
                    return Err(self.error(format!("{} bytes after the stop frame", buffer.len())));
                }
            }
        }
    }

    /// The length of the next data piece, when the decoder waits for one.
    /// The caller may then gather that piece itself: the bytes the buffer
    /// holds (they begin it; take them out of it) and then input up to
    /// that length, handed to [`Decoder::put_piece`] in place of being
    /// appended to the buffer. Input after the piece goes to the buffer
    /// as usual.
    pub fn piece_wanted(&self) -> Option<usize> {
        match self.state {
            State::Data { remaining, gathered: None, .. } => Some(remaining.min(DATA_PIECE) as usize),
            _ => None,
        }
    }

    /// Takes the piece [`Decoder::piece_wanted`] asked for; its event then
    /// comes out of [`Decoder::decode`] (the last piece of a frame once its
    /// CR LF is in the buffer).
    ///
    /// # Panics
    /// If no piece was wanted, or `piece` has another length: the caller
    /// broke the contract, not the stream.
    pub fn put_piece(&mut self, piece: Bytes) {
        match &mut self.state {
            State::Data { remaining, gathered: gathered @ None, .. } if piece.len() as u64 == (*remaining).min(DATA_PIECE) => {
                *gathered = Some(piece);
            }
            _ => panic!("put_piece of {} bytes that the decoder did not ask for", piece.len()),
        }
    }

    /// Call at end of input: a stream without its `stop` is truncated.
    pub fn finish(&self, buffer: &BytesMut) -> Result<(), StreamError> {
        match self.state {
            State::Done if buffer.is_empty() => Ok(()),
            State::Done => Err(self.error(format!("{} bytes after the stop frame", buffer.len()))),
            _ => Err(StreamError {
                frame: self.frame.max(1),
                offset: self.position,
                reason: "the stream ended before its stop frame (truncated)".into(),
            }),
        }
    }

    fn start_frame(&mut self, raw: &[u8]) -> Result<Option<Event>, StreamError> {
        let (kind, start, length) = parse_header(raw).map_err(|reason| self.error(reason))?;
        self.frame_start = start;
        let Some(meta) = &self.meta else {
            if kind != Kind::Meta {
                return Err(self.error(format!("the first frame must be meta, not {}", kind.as_str())));
            }
            if length > MAX_JSON_FRAME {
                return Err(self.error(format!("meta payload of {length} bytes is too large")));
            }
            self.state = State::Meta { length };
            return Ok(None);
        };
        match kind {
            Kind::Meta => Err(self.error("a second meta frame")),
            Kind::Stop => {
                if start != 0 {
                    return Err(self.error("stop frame with a non-zero start"));
                }
                if length == 0 {
                    return self.finish_stream(None).map(Some);
                }
                if length > MAX_JSON_FRAME {
                    return Err(self.error(format!("trailer of {length} bytes is too large")));
                }
                self.state = State::Trailer { length };
                Ok(None)
            }
            Kind::Data | Kind::Zero => {
                if length == 0 {
                    return Err(self.error("empty frame"));
                }
                if start < self.position {
                    return Err(self.error(format!("starts before the end of the previous frame ({})", self.position)));
                }
                if !meta.incremental && start > self.position {
                    return Err(self.error(format!("gap from {} in a full stream, which must tile the image", self.position)));
                }
                let end = start.checked_add(length).filter(|&end| end <= meta.virtual_size);
                let Some(end) = end else {
                    return Err(self.error(format!("{length} bytes end past the virtual size {}", meta.virtual_size)));
                };
                self.frames += 1;
                self.position = end;
                if kind == Kind::Zero {
                    self.zero_size += length;
                    return Ok(Some(Event::Zero { offset: start, length }));
                }
                if self.data_size + length > meta.data_size {
                    return Err(self.error(format!("data passes the data-size {} of the meta frame", meta.data_size)));
                }
                self.data_size += length;
                self.state = State::Data { offset: start, remaining: length, gathered: None };
                Ok(None)
            }
        }
    }

    fn finish_meta(&mut self, payload: &[u8]) -> Result<Event, StreamError> {
        let meta: Meta = serde_json::from_slice(payload).map_err(|error| self.error(format!("invalid meta JSON: {error}")))?;
        if meta.virtual_size > self.target_size {
            return Err(
                self.error(format!("virtual-size {} is larger than the target image ({} bytes)", meta.virtual_size, self.target_size))
            );
        }
        self.meta = Some(meta.clone());
        self.state = State::Header;
        Ok(Event::Meta(meta))
    }

    fn finish_stream(&mut self, trailer: Option<&[u8]>) -> Result<Event, StreamError> {
        let meta = self.meta.as_ref().expect("meta before stop");
        self.frame_start = self.position;
        if self.data_size != meta.data_size {
            return Err(self.error(format!("{} bytes of data, but meta says data-size {}", self.data_size, meta.data_size)));
        }
        if !meta.incremental && self.position != meta.virtual_size {
            return Err(self.error(format!("a full stream must tile the image, but it ends at {} of {}", self.position, meta.virtual_size)));
        }
        let mut checksum = None;
        if let Some(trailer) = trailer {
            let trailer: Trailer = serde_json::from_slice(trailer).map_err(|error| self.error(format!("invalid trailer JSON: {error}")))?;
            let read = (self.frames, self.data_size, self.zero_size);
            if (trailer.frames, trailer.data_size, trailer.zero_size) != read {
                return Err(self.error(format!(
                    "trailer counts (frames {}, data-size {}, zero-size {}) differ from the stream's ({}, {}, {})",
                    trailer.frames, trailer.data_size, trailer.zero_size, read.0, read.1, read.2
                )));
            }
            checksum = trailer.checksum;
        }
        self.state = State::Done;
        Ok(Event::End(Ending {
            frames: self.frames,
            data_size: self.data_size,
            zero_size: self.zero_size,
            incremental: meta.incremental,
            checksum,
            frame: self.frame,
            offset: self.frame_start,
        }))
    }
}

/// Parses a frame header, `KIND SP START SP LENGTH CR LF`: its kind,
/// start and length.
pub fn parse_header(raw: &[u8]) -> Result<(Kind, u64, u64), String> {
    let shown = || String::from_utf8_lossy(raw).escape_debug().to_string();
    if raw.len() != HEADER_LEN || raw[4] != b' ' || raw[21] != b' ' || &raw[38..40] != CRLF {
        return Err(format!("malformed frame header \"{}\"", shown()));
    }
    let kind = match &raw[0..4] {
        b"meta" => Kind::Meta,
        b"data" => Kind::Data,
        b"zero" => Kind::Zero,
        b"stop" => Kind::Stop,
        _ => return Err(format!("unknown frame kind in \"{}\"", shown())),
    };
    let hex = |field: &[u8]| -> Result<u64, String> {
        if !field.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("non-hex digits in frame header \"{}\"", shown()));
        }
        u64::from_str_radix(std::str::from_utf8(field).expect("ASCII"), 16).map_err(|error| error.to_string())
    };
    Ok((kind, hex(&raw[5..21])?, hex(&raw[22..38])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkhash::BlockHasher;
    use proptest::prelude::*;

    /// A stream as (kind, start, length) with data bytes derived from the
    /// offset, so any reordering shows.
    fn byte_at(offset: u64) -> u8 {
        (offset % 251) as u8 ^ 0x5a
    }

    #[derive(Debug, Clone)]
    struct Plan {
        virtual_size: u64,
        incremental: bool,
        frames: Vec<(Kind, u64, u64)>,
    }

    fn encode(plan: &Plan, trailer: bool) -> Vec<u8> {
        let data_size = plan.frames.iter().filter(|f| f.0 == Kind::Data).map(|f| f.2).sum();
        let meta = Meta {
            virtual_size: plan.virtual_size,
            data_size,
            date: Some("2026-11-21T10:00:00Z".into()),
            incremental: plan.incremental,
            context: None,
            bitmap: None,
            generator: Some("test".into()),
            since: plan.incremental.then(|| "cp1".into()),
            checkpoint: Some("cp2".into()),
            disk: None,
        };
        let mut out = json_frame(Kind::Meta, &meta).to_vec();
        let mut hasher = BlockHasher::new(DEFAULT_BLOCK_SIZE);
        let mut zero_size = 0;
        for &(kind, start, length) in &plan.frames {
            out.extend_from_slice(&header(kind, start, length));
            if kind == Kind::Data {
                let data: Vec<u8> = (start..start + length).map(byte_at).collect();
                hasher.update(&data);
                out.extend(data);
                out.extend_from_slice(CRLF);
            } else {
                hasher.zero(length);
                zero_size += length;
            }
        }
        if trailer {
            let checksum = (!plan.incremental).then(|| Checksum {
                algorithm: ALGORITHM.into(),
                block_size: DEFAULT_BLOCK_SIZE,
                checksum: hasher.finish(),
            });
            let trailer = Trailer { frames: plan.frames.len() as u64, data_size, zero_size, checksum };
            out.extend_from_slice(&json_frame(Kind::Stop, &trailer));
        } else {
            out.extend_from_slice(&header(Kind::Stop, 0, 0));
        }
        out
    }

    fn plans() -> impl Strategy<Value = Plan> {
        (proptest::collection::vec((1u64..3000, any::<bool>(), any::<bool>()), 1..10), any::<bool>()).prop_map(|(pieces, incremental)| {
            let mut frames = Vec::new();
            let mut position = 0;
            for (length, zero, skip) in pieces {
                if incremental && skip {
                    position += length;
                    continue;
                }
                frames.push((if zero { Kind::Zero } else { Kind::Data }, position, length));
                position += length;
            }
            Plan { virtual_size: position, incremental, frames }
        })
    }

    /// Decodes `input` fed in chunks of `chunk` bytes, hashing the events
    /// as a reader does; the events, or the error and the events applied
    /// before it.
    fn decode(input: &[u8], chunk: usize, target_size: u64) -> (Vec<Event>, Result<Summary, StreamError>) {
        decode_with(input, chunk, target_size, false)
    }

    /// [`decode`]; with `gather`, each data piece the decoder wants is
    /// gathered outside its buffer and handed in, as the server's restore
    /// does.
    fn decode_with(input: &[u8], chunk: usize, target_size: u64, gather: bool) -> (Vec<Event>, Result<Summary, StreamError>) {
        let mut decoder = Decoder::new(target_size);
        let mut buffer = BytesMut::new();
        let mut chunks = input.chunks(chunk.max(1));
        let mut events = Vec::new();
        let mut hasher = BlockHasher::new(DEFAULT_BLOCK_SIZE);
        let mut ending = None;
        let mut input_done = false;
        loop {
            if let Some(length) = decoder.piece_wanted().filter(|_| gather && !input_done) {
                let buffered = buffer.len().min(length);
                let mut piece = buffer[..buffered].to_vec();
                buffer.advance(buffered);
                while piece.len() < length {
                    let Some(chunk) = chunks.next() else {
                        input_done = true;
                        break;
                    };
                    let taken = chunk.len().min(length - piece.len());
                    piece.extend_from_slice(&chunk[..taken]);
                    buffer.extend_from_slice(&chunk[taken..]);
                }
                if !input_done {
                    decoder.put_piece(Bytes::from(piece));
                }
            }
            match decoder.decode(&mut buffer) {
                Ok(Some(Event::End(end))) => ending = Some(end),
                Ok(Some(event)) => {
                    match &event {
                        Event::Data { data, .. } => hasher.update(data),
                        Event::Zero { length, .. } => hasher.zero(*length),
                        _ => {}
                    }
                    events.push(event);
                }
                Ok(None) => match chunks.next() {
                    Some(chunk) => buffer.extend_from_slice(chunk),
                    None => break,
                },
                Err(error) => return (events, Err(error)),
            }
        }
        if let Err(error) = decoder.finish(&buffer) {
            return (events, Err(error));
        }
        let ending = ending.expect("finish succeeded without an End");
        let computed = ending.checkable().then(|| hasher.finish());
        (events, ending.verify(computed.as_deref()))
    }

    /// Reassembles data events into (offset, bytes) per contiguous run.
    fn applied_image(events: &[Event], size: u64) -> Vec<Option<u8>> {
        let mut image = vec![None; size as usize];
        for event in events {
            match event {
                Event::Data { offset, data } => {
                    for (i, byte) in data.iter().enumerate() {
                        image[*offset as usize + i] = Some(*byte);
                    }
                }
                Event::Zero { offset, length } => {
                    for i in *offset..offset + length {
                        image[i as usize] = Some(0);
                    }
                }
                _ => {}
            }
        }
        image
    }

    #[test]
    fn the_documented_example_decodes() {
        let plan = Plan { virtual_size: 8192, incremental: false, frames: vec![(Kind::Data, 0, 4096), (Kind::Zero, 4096, 4096)] };
        let (_, result) = decode(&encode(&plan, false), 7, 8192);
        assert_eq!(result.unwrap(), Summary::new(2, 4096, 4096, ChecksumCheck::None));
    }

    #[test]
    fn imageio_streams_without_blockgate_keys_are_accepted() {
        let meta = br#"{"virtual-size":4096,"data-size":4096,"date":"2026-01-01T00:00:00"}"#;
        let mut input = header(Kind::Meta, 0, meta.len() as u64).to_vec();
        input.extend_from_slice(meta);
        input.extend_from_slice(CRLF);
        input.extend_from_slice(&header(Kind::Data, 0, 4096));
        input.extend(vec![1u8; 4096]);
        input.extend_from_slice(CRLF);
        input.extend_from_slice(b"STOP 0000000000000000 0000000000000000\r\n".to_ascii_lowercase().as_slice());
        let (_, result) = decode(&input, 1000, 4096);
        assert_eq!(result.unwrap().data_size, 4096);
    }

    #[test]
    fn large_data_frames_arrive_in_bounded_pieces() {
        let size = DATA_PIECE * 2 + 5;
        let plan = Plan { virtual_size: size, incremental: false, frames: vec![(Kind::Data, 0, size)] };
        let (events, result) = decode(&encode(&plan, true), 1 << 20, size);
        let summary = result.unwrap();
        assert_eq!((summary.checksum, summary.verified), (ChecksumCheck::Verified, Some(true)));
        let lengths: Vec<usize> =
            events.iter().filter_map(|e| if let Event::Data { data, .. } = e { Some(data.len()) } else { None }).collect();
        assert_eq!(lengths, vec![DATA_PIECE as usize, DATA_PIECE as usize, 5]);
    }

    proptest! {
        #[test]
        fn round_trip_in_any_chunking(plan in plans(), chunk in 1usize..5000, trailer in any::<bool>()) {
            let input = encode(&plan, trailer);
            let (events, result) = decode(&input, chunk, plan.virtual_size);
            let summary = result.unwrap();
            prop_assert_eq!(summary.frames, plan.frames.len() as u64);
            prop_assert_eq!(summary.verified == Some(true), trailer && !plan.incremental);
            prop_assert_eq!(summary.checksum == ChecksumCheck::None, !trailer || plan.incremental);
            let image = applied_image(&events, plan.virtual_size);
            for &(kind, start, length) in &plan.frames {
                for offset in start..start + length {
                    let expected = if kind == Kind::Data { byte_at(offset) } else { 0 };
                    prop_assert_eq!(image[offset as usize], Some(expected));
                }
            }
            let covered = image.iter().filter(|b| b.is_some()).count() as u64;
            prop_assert_eq!(covered, plan.frames.iter().map(|f| f.2).sum::<u64>());
        }

        /// A reader that gathers data pieces itself sees the same events
        /// and the same verdict as one that buffers everything, on whole,
        /// cut and corrupted streams alike.
        #[test]
        fn gathered_pieces_decode_as_buffered_ones(
            plan in plans(),
            chunk in 1usize..300_000,
            trailer in any::<bool>(),
            cut in any::<proptest::sample::Index>(),
            flip in any::<Option<proptest::sample::Index>>(),
            large in any::<Option<u16>>(),
        ) {
            let mut plan = plan;
            // A frame of several pieces, the last one short.
            if let Some(extra) = large {
                let length = DATA_PIECE * 2 + u64::from(extra) + 1;
                plan.frames.push((Kind::Data, plan.virtual_size, length));
                plan.virtual_size += length;
            }
            let mut input = encode(&plan, trailer);
            if let Some(flip) = flip {
                let at = flip.index(input.len());
                input[at] ^= 0x5a;
            }
            let cut = if cut.index(4) == 0 { cut.index(input.len()) } else { input.len() };
            let buffered = decode_with(&input[..cut], chunk, plan.virtual_size, false);
            let gathered = decode_with(&input[..cut], chunk, plan.virtual_size, true);
            prop_assert_eq!(gathered, buffered);
        }

        #[test]
        fn truncation_anywhere_is_rejected(plan in plans(), cut in any::<proptest::sample::Index>(), trailer in any::<bool>()) {
            let input = encode(&plan, trailer);
            let cut = cut.index(input.len());
            let (_, result) = decode(&input[..cut], 997, plan.virtual_size);
            prop_assert!(result.is_err(), "a stream cut at {} of {} was accepted", cut, input.len());
        }

        #[test]
        fn a_flipped_header_byte_is_rejected_and_nothing_after_it_applied(plan in plans(), which in any::<proptest::sample::Index>(), position in 0usize..38, trailer in any::<bool>()) {
            let input = encode(&plan, trailer);
            // Header offsets: find every frame header in the encoding.
            let mut headers = Vec::new();
            let mut at = 0;
            while at < input.len() {
                headers.push(at);
                let (kind, _, length) = parse_header(&input[at..at + HEADER_LEN]).unwrap();
                at += HEADER_LEN + match kind {
                    Kind::Zero => 0,
                    Kind::Stop if length == 0 => 0,
                    _ => length as usize + 2,
                };
            }
            let header_at = headers[which.index(headers.len())];
            let mut corrupt = input.clone();
            // Replace one byte of the kind, a separator or a digit with a
            // character that cannot stand there.
            corrupt[header_at + position] = if position == 4 || position == 21 { b'x' } else { b'!' };
            let (events, result) = decode(&corrupt, 4096, plan.virtual_size);
            let error = result.unwrap_err();
            let frame_number = headers.iter().position(|&h| h == header_at).unwrap() as u64 + 1;
            prop_assert_eq!(error.frame, frame_number);
            // Frames before the corrupt one were applied whole; nothing after.
            let applied: u64 = events.iter().map(|e| match e { Event::Data { data, .. } => data.len() as u64, Event::Zero { length, .. } => *length, _ => 0 }).sum();
            let before: u64 = plan.frames.iter().take((frame_number as usize).saturating_sub(2)).map(|f| f.2).sum();
            prop_assert_eq!(applied, before);
        }

        #[test]
        fn overlaps_are_rejected(plan in plans().prop_filter("two frames", |p| p.frames.len() >= 2), back in 1u64..100) {
            let mut bad = plan.clone();
            let (_, first_start, first_length) = bad.frames[0];
            let (kind, _, length) = bad.frames[1];
            bad.frames[1] = (kind, first_start + first_length - back.min(first_length), length);
            let (_, result) = decode(&encode(&bad, false), 4096, bad.virtual_size);
            prop_assert!(result.unwrap_err().reason.contains("before the end of the previous frame"));
        }

        #[test]
        fn gaps_in_a_full_stream_are_rejected(plan in plans().prop_filter("full, two frames", |p| !p.incremental && p.frames.len() >= 2)) {
            let mut bad = plan.clone();
            bad.frames.remove(0);
            let (_, result) = decode(&encode(&bad, false), 4096, bad.virtual_size);
            prop_assert!(result.unwrap_err().reason.contains("gap"));
        }

        #[test]
        fn a_wrong_data_size_is_rejected(plan in plans().prop_filter("has data", |p| p.frames.iter().any(|f| f.0 == Kind::Data)), delta in prop_oneof![Just(-1i64), Just(1i64)]) {
            let input = encode(&plan, false);
            let meta_len = HEADER_LEN + u64::from_str_radix(std::str::from_utf8(&input[22..38]).unwrap(), 16).unwrap() as usize + 2;
            let mut meta: Meta = serde_json::from_slice(&input[HEADER_LEN..meta_len - 2]).unwrap();
            meta.data_size = meta.data_size.checked_add_signed(delta).unwrap();
            let mut bad = json_frame(Kind::Meta, &meta).to_vec();
            bad.extend_from_slice(&input[meta_len..]);
            let (_, result) = decode(&bad, 4096, plan.virtual_size);
            prop_assert!(result.unwrap_err().reason.contains("data-size"));
        }

        #[test]
        fn a_wrong_checksum_is_rejected(plan in plans().prop_filter("full, has data", |p| !p.incremental && p.frames.iter().any(|f| f.0 == Kind::Data))) {
            let mut input = encode(&plan, true);
            // Change one data byte: the trailer's checksum no longer holds.
            let first_data = HEADER_LEN + u64::from_str_radix(std::str::from_utf8(&input[22..38]).unwrap(), 16).unwrap() as usize + 2;
            let mut at = first_data;
            loop {
                let (kind, _, length) = parse_header(&input[at..at + HEADER_LEN]).unwrap();
                if kind == Kind::Data {
                    input[at + HEADER_LEN] ^= 0xff;
                    break;
                }
                at += HEADER_LEN + if kind == Kind::Zero { 0 } else { length as usize + 2 };
            }
            let (_, result) = decode(&input, 4096, plan.virtual_size);
            prop_assert!(result.unwrap_err().reason.contains("checksum"));
        }

        #[test]
        fn a_trailer_with_wrong_counts_is_rejected(plan in plans()) {
            let mut input = encode(&plan, false);
            input.truncate(input.len() - HEADER_LEN);
            let trailer = Trailer { frames: plan.frames.len() as u64 + 1, data_size: 0, zero_size: 0, checksum: None };
            input.extend_from_slice(&json_frame(Kind::Stop, &trailer));
            let (_, result) = decode(&input, 4096, plan.virtual_size);
            prop_assert!(result.unwrap_err().reason.contains("trailer counts"));
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300), chunk in 1usize..64) {
            let _ = decode(&input, chunk, 1 << 20);
        }
    }

    #[test]
    fn a_virtual_size_larger_than_the_target_is_rejected_at_frame_one() {
        let plan = Plan { virtual_size: 8192, incremental: false, frames: vec![(Kind::Zero, 0, 8192)] };
        let (events, result) = decode(&encode(&plan, false), 4096, 4096);
        let error = result.unwrap_err();
        assert_eq!((error.frame, events.len()), (1, 0));
        assert!(error.to_string().contains("larger than the target"), "{error}");
    }

    #[test]
    fn missing_crlf_after_data_is_rejected_before_the_data_is_handed_out() {
        let plan = Plan { virtual_size: 4096, incremental: false, frames: vec![(Kind::Data, 0, 4096)] };
        let mut input = encode(&plan, false);
        let crlf_at = input.len() - HEADER_LEN - 2;
        input[crlf_at] = b'X';
        let (events, result) = decode(&input, 100_000, 4096);
        assert!(result.unwrap_err().reason.contains("CR LF"));
        assert!(!events.iter().any(|e| matches!(e, Event::Data { .. })), "the bad frame's data must not be applied");
    }
}
