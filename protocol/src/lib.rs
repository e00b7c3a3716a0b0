//! What the blockgate server and its clients must agree on, without I/O:
//! byte ranges and `Content-Range`, extents, the PATCH body, and the JSON
//! of OPTIONS and `/info/`, tickets, checkpoints, the sparse stream codec and blkhash. Every
//! parser here has property tests.

pub mod blkhash;
pub mod checkpoint;
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
pub use patch::{MAX_PATCH_BODY, PatchError, PatchRequest, parse_patch};
pub use range::{ByteRange, ContentRange, RangeError, parse_content_range, parse_range};
