//! Errors: [`FormatError`] says why a token's 512 bytes were refused (envelope, version,
//! key, seal, body fields); [`Error`] is the crate's one public error for offload
//! operations, with [`Error::ntstatus`] mapping it to the status an FSCTL would return.

use uuid::Uuid;

use crate::acl::{Access, PrincipalId};
use crate::body::TokenId;

/// Why a token's bytes were refused: the envelope, the body version, the key id, the seal or
/// a body field. Parsing stops at the first problem, in the order of the variants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Not 512 bytes.
    #[error("a token is 512 bytes, not {0}")]
    WrongSize(usize),
    /// TokenType is neither the zero-data type nor this crate's vendor type.
    #[error("token type {0:#010x} is not one this provider knows")]
    UnknownType(u32),
    /// The envelope's two reserved bytes are not zero.
    #[error("the envelope's reserved bytes are not zero")]
    ReservedNotZero,
    /// TokenIdLength is not 0x01F8.
    #[error("token id length {0:#06x} is not 0x01f8")]
    BadIdLength(u16),
    /// A zero-data token whose 504 id bytes are not all zero.
    #[error("the zero-data token's id bytes are not zero")]
    ZeroTokenNotBlank,
    /// The body's format version is not one this crate reads.
    #[error("token body version {0} is not supported")]
    UnsupportedVersion(u16),
    /// The body names a key id the key ring does not hold (never issued here, or retired).
    #[error("token sealed under key id {0}, which this provider does not hold")]
    UnknownKey(u32),
    /// The HMAC-SHA256 seal does not verify: the token was forged, altered, or sealed under
    /// another secret with the same key id.
    #[error("the token's seal does not verify")]
    BadMac,
    /// Reserved body bytes or padding are not zero.
    #[error("reserved body bytes ({0}) are not zero")]
    NonZeroReserved(&'static str),
    /// A body field holds a value no token of this version can have.
    #[error("body field {field} is invalid: {why}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// The error of every offload operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token's bytes were refused (malformed, forged, tampered, unknown key).
    #[error("token refused")]
    Format(#[from] FormatError),
    /// The token is well formed and sealed by a key this provider holds, but names another
    /// provider (a provider-to-provider transfer, not handled locally).
    #[error("token was issued by provider {0}, not this one")]
    ForeignProvider(Uuid),
    /// No live or remembered token has this id (the registry was lost, or the token was
    /// forgotten long after it died).
    #[error("token {0} is not known to this provider")]
    UnknownToken(TokenId),
    /// The token's hard expiry or inactivity limit has passed.
    #[error("token {0} has expired")]
    Expired(TokenId),
    /// The token was revoked.
    #[error("token {0} was revoked")]
    Revoked(TokenId),
    /// A write overlapping the token's source range happened after it was minted: the data
    /// it stood for is gone.
    #[error("token {0} was invalidated by a write to its source range")]
    Invalidated(TokenId),
    /// The source's recorded stamp (identity, write state) differs from the token's: it
    /// changed since the token was minted, or it is another disk.
    #[error("the source changed since the token was minted")]
    SourceChanged,
    /// The redeemer is not in the token's audience.
    #[error("principal {0} is not in the token's audience")]
    AudienceRefused(PrincipalId),
    /// The access policy refuses the principal this access to the disk.
    #[error("principal {principal} may not {op} disk {disk}")]
    AccessDenied {
        /// Who asked.
        principal: PrincipalId,
        /// Read (mint) or write (redeem).
        op: Access,
        /// The disk.
        disk: Uuid,
    },
    /// The principal (or the provider as a whole) holds as many live tokens as allowed.
    #[error("principal {principal} already holds {limit} live tokens")]
    TooManyTokens {
        /// Who asked.
        principal: PrincipalId,
        /// The limit reached.
        limit: usize,
    },
    /// An offset or length is not a multiple of the logical sector size.
    #[error("{what} {value} is not a multiple of the {sector}-byte logical sector")]
    Unaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The sector size it must be a multiple of.
        sector: u64,
    },
    /// An offset lies at or past the end of the disk or the token's range.
    #[error("{what} {offset} is outside the {size} bytes of the {within}")]
    OutOfRange {
        /// Which argument.
        what: &'static str,
        /// Its value.
        offset: u64,
        /// The size of what it must lie in.
        size: u64,
        /// What it must lie in ("disk", "token range").
        within: &'static str,
    },
    /// A request that no provider could satisfy (zero length, overflow, a limit of zero).
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// The key file could not be read, written or parsed.
    #[error("key file")]
    KeyFile(#[from] crate::keyfile::KeyFileError),
    /// A disk operation failed.
    #[error("{0} failed")]
    Io(&'static str, #[source] block_io::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// NTSTATUS values an FSCTL_OFFLOAD_READ/WRITE server would return (MS-ERREF 2.3).
pub mod status {
    /// STATUS_INVALID_PARAMETER.
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    /// STATUS_ACCESS_DENIED.
    pub const ACCESS_DENIED: u32 = 0xC000_0022;
    /// STATUS_END_OF_FILE.
    pub const END_OF_FILE: u32 = 0xC000_0011;
    /// STATUS_INSUFFICIENT_RESOURCES.
    pub const INSUFFICIENT_RESOURCES: u32 = 0xC000_009A;
    /// STATUS_INVALID_TOKEN: the token is malformed, forged, expired, revoked or invalid.
    pub const INVALID_TOKEN: u32 = 0xC000_0465;
    /// STATUS_IO_DEVICE_ERROR.
    pub const IO_DEVICE_ERROR: u32 = 0xC000_0185;
}

impl Error {
    /// The NTSTATUS an FSCTL_OFFLOAD_READ/WRITE server maps this error to (rule 10: errors
    /// become the protocol's status at the boundary).
    pub fn ntstatus(&self) -> u32 {
        match self {
            Error::Format(_)
            | Error::ForeignProvider(_)
            | Error::UnknownToken(_)
            | Error::Expired(_)
            | Error::Revoked(_)
            | Error::Invalidated(_)
            | Error::SourceChanged => status::INVALID_TOKEN,
            Error::AudienceRefused(_) | Error::AccessDenied { .. } => status::ACCESS_DENIED,
            Error::TooManyTokens { .. } => status::INSUFFICIENT_RESOURCES,
            Error::Unaligned { .. } | Error::InvalidRequest(_) | Error::KeyFile(_) => {
                status::INVALID_PARAMETER
            }
            Error::OutOfRange { .. } => status::END_OF_FILE,
            Error::Io(..) => status::IO_DEVICE_ERROR,
        }
    }

    /// The [`FormatError`] when the token's bytes were refused.
    pub fn format_error(&self) -> Option<&FormatError> {
        match self {
            Error::Format(e) => Some(e),
            _ => None,
        }
    }
}
