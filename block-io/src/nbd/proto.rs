//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): magic numbers, flags, option
//! and command codes, and pure parsers and encoders of every message the server reads or
//! writes. Nothing here does I/O, so a client and a fuzz target reuse it as it is.
//!
//! Parsing validates: a parsed [`Request`] or [`OptionHeader`] has a known magic and fields a
//! caller may use without re-checking their framing (bounds against the export are the
//! caller's: they depend on the export). All integers are big-endian ("network byte order",
//! proto.md "Conventions").

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes a server sends (proto.md "Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag `NBD_FLAG_HAS_FLAGS` (always set).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_ROTATIONAL`.
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_SEND_DF`.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag `NBD_FLAG_SEND_CACHE`.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag `NBD_FLAG_SEND_FAST_ZERO`.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `NBD_STATE_HOLE` of the `base:allocation` context.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` of the `base:allocation` context.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this crate serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// `NBD_EPERM`.
pub const EPERM: u32 = 1;
/// `NBD_EIO`.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

/// The largest read or write payload served: proto.md "Size constraints" says any payload up
/// to 2^25 bytes should be accepted, and we accept no more.
pub const MAX_PAYLOAD: u32 = 1 << 25;
/// Longest string (export name, context name, query) accepted: proto.md "Conventions" limits
/// strings to 4096 bytes.
pub const MAX_STRING: usize = 4096;
/// Longest option data accepted whole; longer options are skipped and refused with
/// `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Most metadata-context queries accepted in one option.
pub const MAX_QUERIES: u32 = 128;

/// Size of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;

/// Why a message does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number is not the one the message must start with.
    #[error("bad magic {found:#x}")]
    BadMagic {
        /// What was found.
        found: u64,
    },
    /// The message is shorter than its fixed fields or its own length fields say.
    #[error("truncated message: needed {needed} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// Bytes are left over after the fields a message defines.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A string is longer than [`MAX_STRING`] or a count larger than its bound.
    #[error("{what} too long ({len})")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its length or count.
        len: u64,
    },
    /// A string is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// A cursor over a message's bytes: each read checks the length first.
#[derive(Debug)]
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(ProtoError::Truncated {
                needed: self.pos.saturating_add(n),
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes, bounded by [`MAX_STRING`].
    fn string(&mut self, len: u32, what: &'static str) -> Result<String, ProtoError> {
        if len as usize > MAX_STRING {
            return Err(ProtoError::TooLong {
                what,
                len: u64::from(len),
            });
        }
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::NotUtf8(what))
    }

    fn finish(&self) -> Result<(), ProtoError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(ProtoError::Trailing(n)),
        }
    }
}

/// The header of an option request (proto.md "Newstyle negotiation"); `len` bytes of data
/// follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Parses the 16-byte header; the magic must be `IHAVEOPT`.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic { found: magic });
        }
        Ok(OptionHeader {
            option: c.u32()?,
            len: c.u32()?,
        })
    }

    /// The header's bytes (a client sends them).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked for ("" is the default export).
    pub name: String,
    /// The `NBD_INFO_*` items asked for, in order.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data.
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let len = c.u32()?;
        let name = c.string(len, "export name")?;
        let n = c.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        c.finish()?;
        Ok(InfoRequest { name, requests })
    }

    /// The option data (a client sends it).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub name: String,
    /// The queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the option data; at most [`MAX_QUERIES`] queries.
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let len = c.u32()?;
        let name = c.string(len, "export name")?;
        let n = c.u32()?;
        if n > MAX_QUERIES {
            return Err(ProtoError::TooLong {
                what: "query count",
                len: u64::from(n),
            });
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let len = c.u32()?;
            queries.push(c.string(len, "query")?);
        }
        c.finish()?;
        Ok(MetaContextRequest { name, queries })
    }

    /// The option data (a client sends it).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }
}

/// An option reply (fixed newstyle): header and data in one buffer.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_LEN + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The header of an option reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Parses the 20-byte header.
    pub fn parse(b: &[u8; OPTION_REPLY_LEN]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        Ok(OptionReplyHeader {
            option: c.u32()?,
            reply: c.u32()?,
            len: c.u32()?,
        })
    }
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&minimum.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&maximum.to_be_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_REP_SERVER` data: an export name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` data: an id and a context name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// What a transmission request asks for (proto.md "Request types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`: `length` bytes of payload follow the header.
    Write,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// A code this crate does not know (answered with `NBD_EINVAL`).
    Unknown(u16),
}

impl Command {
    /// The command of a wire code.
    pub fn from_code(code: u16) -> Self {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disconnect => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(c) => c,
        }
    }

    /// The command flags proto.md allows on this command ("Command flags"); FUA is valid on
    /// every command once negotiated.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }
}

/// A transmission request header (proto.md "Request message"). For [`Command::Write`],
/// `length` bytes of payload follow it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`), unchecked: see [`Command::allowed_flags`].
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's opaque cookie (once called handle), echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Parses the 28-byte header; the magic must be `NBD_REQUEST_MAGIC`.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                found: u64::from(magic),
            });
        }
        Ok(Request {
            flags: c.u16()?,
            command: Command::from_code(c.u16()?),
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u32()?,
        })
    }

    /// The header's bytes (a client sends them, then any write payload).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header (proto.md "Simple reply message"); a successful read's data follows
/// it.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (proto.md "Structured reply chunk message"); `len` bytes
/// of payload follow it.
pub fn structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    len: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk (the final one) with a message cut to fit the
/// 4096-byte string limit.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let mut msg = message.as_bytes();
    if msg.len() > MAX_STRING {
        // Cut at a character boundary so the message stays UTF-8.
        let mut end = MAX_STRING;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        msg = &msg[..end];
    }
    let len = 6 + msg.len() as u32;
    let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN + len as usize);
    b.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// One descriptor of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u32,
    /// Status flags (`NBD_STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// A whole `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for context `id`.
pub fn block_status_chunk(cookie: u64, flags: u16, id: u32, extents: &[Extent]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN + len);
    b.extend_from_slice(&structured_header(
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    b.extend_from_slice(&id.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

/// A reply header as a client reads it: the first 16 bytes tell simple from structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: the error and the cookie (a read's data follows on success).
    Simple {
        /// `NBD_E*` or 0.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk: `length` bytes of payload follow.
    Structured {
        /// `NBD_REPLY_FLAG_*`.
        flags: u16,
        /// `NBD_REPLY_TYPE_*`.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Parses the first 16 bytes of a reply. Returns the header and how many more header
    /// bytes to read: 0 for a simple reply, 4 for a structured chunk (its big-endian payload
    /// length, which the caller stores in `length`).
    pub fn parse_prefix(b: &[u8; 16]) -> Result<(Self, usize), ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        match magic {
            SIMPLE_REPLY_MAGIC => Ok((
                ReplyHeader::Simple {
                    error: c.u32()?,
                    cookie: c.u64()?,
                },
                0,
            )),
            STRUCTURED_REPLY_MAGIC => Ok((
                ReplyHeader::Structured {
                    flags: c.u16()?,
                    kind: c.u16()?,
                    cookie: c.u64()?,
                    length: 0,
                },
                4,
            )),
            other => Err(ProtoError::BadMagic {
                found: u64::from(other),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
    }

    #[test]
    fn bad_request_magic_is_refused() {
        let mut b = [0u8; REQUEST_LEN];
        b[0] = 0xff;
        assert!(matches!(
            Request::parse(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_round_trips_and_rejects_bad_lengths() {
        let r = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let b = r.encode();
        assert_eq!(InfoRequest::parse(&b), Ok(r));
        // A name length pointing past the data.
        let mut bad = b.clone();
        bad[3] = 200;
        assert!(matches!(
            InfoRequest::parse(&bad),
            Err(ProtoError::Truncated { .. })
        ));
        // Trailing garbage.
        let mut long = b;
        long.push(0);
        assert_eq!(InfoRequest::parse(&long), Err(ProtoError::Trailing(1)));
        // A name longer than any string may be.
        let mut huge = vec![0u8; 4];
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            InfoRequest::parse(&huge),
            Err(ProtoError::TooLong { .. })
        ));
    }

    #[test]
    fn meta_context_request_round_trips_and_bounds_queries() {
        let r = MetaContextRequest {
            name: String::new(),
            queries: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:x".into()],
        };
        assert_eq!(MetaContextRequest::parse(&r.encode()), Ok(r));
        let mut b = vec![0u8; 8];
        b[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MetaContextRequest::parse(&b),
            Err(ProtoError::TooLong { .. })
        ));
        assert!(MetaContextRequest::parse(&[0, 0]).is_err());
    }

    #[test]
    fn replies_parse_back() {
        let s = simple_reply(EINVAL, 7);
        assert_eq!(
            ReplyHeader::parse_prefix(&s),
            Ok((
                ReplyHeader::Simple {
                    error: EINVAL,
                    cookie: 7
                },
                0
            ))
        );
        let e = error_chunk(9, EIO, &"x".repeat(5000));
        assert_eq!(e.len(), STRUCTURED_REPLY_LEN + 6 + MAX_STRING);
        let mut p = [0u8; 16];
        p.copy_from_slice(&e[..16]);
        assert!(matches!(
            ReplyHeader::parse_prefix(&p),
            Ok((
                ReplyHeader::Structured {
                    cookie: 9,
                    kind: REPLY_TYPE_ERROR,
                    ..
                },
                4
            ))
        ));
        let h = option_reply(OPT_GO, REP_ACK, &[]);
        let mut a = [0u8; OPTION_REPLY_LEN];
        a.copy_from_slice(&h);
        assert_eq!(
            OptionReplyHeader::parse(&a),
            Ok(OptionReplyHeader {
                option: OPT_GO,
                reply: REP_ACK,
                len: 0
            })
        );
    }
}
