//! Numbers and byte layouts of the NBD protocol (fixed newstyle, structured
//! replies), as in the NBD protocol document. Everything here is pure
//! encoding: no I/O, so the handshake and the transmission code stay readable
//! and the constants live in one place.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also prefixed to every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: no zero padding after the export.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Option codes.
pub mod opt {
    /// End negotiation without entering transmission.
    pub const ABORT: u32 = 2;
    /// Select the export and enter transmission.
    pub const GO: u32 = 7;
    /// Ask for structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts matching queries.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for BLOCK_STATUS.
    pub const SET_META_CONTEXT: u32 = 10;

    /// Name of an option, for error messages.
    pub fn name(option: u32) -> &'static str {
        match option {
            ABORT => "NBD_OPT_ABORT",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            _ => "unknown option",
        }
    }
}

/// Option reply types.
pub mod rep {
    /// The option is done.
    pub const ACK: u32 = 1;
    /// Information about the export (`NBD_INFO_*`).
    pub const INFO: u32 = 3;
    /// One metadata context (id and name).
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERROR_BIT: u32 = 1 << 31;

    /// Name of an error reply type, for error messages.
    pub fn error_name(reply: u32) -> &'static str {
        match reply & !ERROR_BIT {
            1 => "unsupported",
            2 => "forbidden by policy",
            3 => "invalid",
            4 => "unsupported on this platform",
            5 => "TLS required",
            6 => "unknown export",
            7 => "server shutting down",
            8 => "block size negotiation required",
            9 => "request too big",
            _ => "error",
        }
    }
}

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub mod info {
    /// Export size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Minimum, preferred and maximum block size.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (export flags).
pub mod tflag {
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections see each other's writes after FLUSH.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// The FAST_ZERO command flag is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    /// Read data.
    pub const READ: u16 = 0;
    /// Write data.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush written data to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard a range.
    pub const TRIM: u16 = 4;
    /// Write zeros without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: stable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must allocate (no hole).
    pub const NO_HOLE: u16 = 1 << 1;
    /// WRITE_ZEROES must fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload; ends a reply.
    pub const NONE: u16 = 0;
    /// u64 offset then data.
    pub const OFFSET_DATA: u16 = 1;
    /// u64 offset and u32 length of zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// u32 context id then (u32 length, u32 flags) pairs.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set in every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// u32 errno, u16 message length, message.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// As ERROR, then the u64 offset it applies to.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
    /// Chunk flag: last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
}

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header (magic already consumed: 16).
pub const CHUNK_HEADER_LEN: usize = 20;

/// Encodes a transmission request header.
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    let mut header = [0u8; REQUEST_LEN];
    header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..24].copy_from_slice(&offset.to_be_bytes());
    header[24..28].copy_from_slice(&length.to_be_bytes());
    header
}

/// Name of a POSIX errno as NBD carries it, for error messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "no error",
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown errno",
    }
}
