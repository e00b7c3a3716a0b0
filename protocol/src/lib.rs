//! What the blockgate server and its clients must agree on, without I/O:
//! byte ranges and `Content-Range`, extents, the PATCH body, and the JSON
//! of OPTIONS and `/info/`, tickets, the sparse stream codec and blkhash. Every
//! parser here has property tests.

pub mod blkhash;
pub mod extents;
mod fields;
pub mod json_array;
pub mod options;
pub mod patch;
pub mod range;
pub mod sparse;
pub mod ticket;

pub use extents::{Coalescer, DirtyState, Extent, ZeroState};
pub use options::{ImageOptions, ServerInfo};
pub use patch::{parse_patch, PatchError, PatchRequest, MAX_PATCH_BODY};
pub use range::{parse_content_range, parse_range, ByteRange, ContentRange, RangeError};
