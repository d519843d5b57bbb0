//! # offload-token
//!
//! ODX-style offload tokens over any [`block_io::BlockDevice`]: minting on offload read,
//! redeeming on offload write, and the registry that keeps tokens honest. The semantics are
//! those of FSCTL_OFFLOAD_READ and FSCTL_OFFLOAD_WRITE (MS-FSCC 2.3.77-2.3.80). With the
//! feature `transfer`, the module
#![cfg_attr(feature = "transfer", doc = "[`transfer`]")]
#![cfg_attr(not(feature = "transfer"), doc = "`transfer` (not in this build)")]
//! copies between two independent providers (DESIGN.md, "Offload tokens"): a per-transfer
//! CA, a versioned control protocol, and the data pulled by the destination from the source
//! over NBD with mutual TLS 1.3.
//!
//! ## Token layout
//!
//! A token is 512 bytes in the MS-FSCC 2.1.11 STORAGE_OFFLOAD_TOKEN envelope ([`RawToken`]):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | TokenType, big-endian: [`TOKEN_TYPE_VDISK`] (0x56444F54) or [`TOKEN_TYPE_ZERO_DATA`] (0xFFFF0001) |
//! | 4 | 2 | reserved, zero |
//! | 6 | 2 | TokenIdLength, big-endian: 0x01F8 |
//! | 8 | 504 | TokenId: zeros for the zero-data token, else the sealed body |
//!
//! The body ([`RawBody`], all integers big-endian) holds the format version, the sealing key
//! id, a random token id, the issuing provider id, the source disk id and its write
//! generation, the source offset and length, the logical sector size, the inactivity TTL, the
//! issue time and hard expiry (ms since the Unix epoch), the minter and the audience (up to 4
//! principal ids), an opaque source stamp and locator, zero padding, and at bytes 472..504 an
//! HMAC-SHA256 over the 8 envelope bytes and body bytes 0..472 under the provider key named
//! by the key id ([`KeyRing`]; rotation keeps old keys verifying until retired). See
//! [`body`](RawBody) for the byte table.
//!
//! Parsing is strict and typed ([`FormatError`]): wrong size, unknown type, non-zero
//! reserved bytes, wrong id length, a zero-data token with non-zero id bytes, an unknown
//! body version, an unknown key id, a bad seal (checked in constant time before any other
//! body field is trusted), non-zero padding or reserved body bytes, and impossible field
//! values are each refused with their own variant.
//!
//! ## Semantics
//!
//! - [`Provider::offload_read`] mints a token over a [`TrackedDisk`] range and returns a
//!   transfer length that may be shorter than asked: at most 256 MiB
//!   ([`Limits::max_token_len`]), never past the end of the disk, and ending where the
//!   allocated data ends (by [`BlockDevice::block_status`](block_io::BlockDevice::block_status))
//!   when the rest of the asked range reads as zero, flagged
//!   [`ALL_ZERO_BEYOND_CURRENT_RANGE`]. A range that starts with at least 1 MiB of zeros, or
//!   is all zeros, is answered with the zero-data token for that run. Offsets and lengths
//!   must be whole logical sectors ([`Error::Unaligned`]).
//! - [`Provider::offload_write`] redeems a token from an offset into it and writes at most
//!   16 MiB per call ([`Limits::max_write_len`]), never more than asked or than the token
//!   holds; callers loop ([`Provider::copy`] does). The zero-data token writes zeros and is
//!   redeemable by anyone who may write the destination.
//! - Tokens are immutable. This provider does not pin data: every write, zeroing or discard
//!   through a [`TrackedDisk`] that overlaps a live token's range invalidates that token
//!   before the data changes (exactly: writes elsewhere do not), and a redeem re-checks after
//!   reading the source, so it never writes data the token did not stand for.
//! - The registry enforces a hard expiry (1 h by default) and an inactivity TTL (asked per
//!   token, 30 s by default, at most 10 min; a successful redeem restarts it), revocation
//!   (per token, per minter, per disk), and per-principal and total live-token limits.
//!   Dead tokens are remembered (up to 65,536) so a late redeem learns why:
//!   [`Error::Expired`], [`Error::Revoked`], [`Error::Invalidated`].
//! - Rights: minting needs read access to the source, redeeming needs write access to the
//!   destination ([`AccessPolicy`]), membership of the token's audience
//!   ([`Error::AudienceRefused`]), and the minter's read access still standing. A token is
//!   thus a capability its minter delegates to named principals, never a bearer token, and a
//!   redeemer cannot name a source by itself (the LIO XCOPY flaw, CVE-2020-28374).
//! - Tokens name their provider; another provider's token is [`Error::ForeignProvider`].
//!
//! ## Limits
//!
//! - The registry lives in memory: a provider restart forgets live tokens (they are then
//!   refused as unknown). [`Provider::admit`] re-admits a token in another process from its
//!   seal and a [`stamp`](StampBuilder) of the source's files; that is what the `vdisk token`
//!   verbs do. Such a token cannot be revoked (short of retiring its key), and its
//!   inactivity counts from the issue time. The stamp's own limits are in [`settle`].
//! - Writes that do not go through the [`TrackedDisk`] (another process, another wrapper)
//!   are not seen; a source must be wrapped once and written only through it.
//! - An offload read racing a write to the same range is, like an ordinary read, not atomic
//!   against it; a write that starts after `offload_read` returns always invalidates.
//! - A token is sealed, not encrypted: anyone holding it can read its fields (offsets, disk
//!   ids, the locator).
//! - Secrets are not wiped from memory on drop.
#![warn(missing_docs)]

mod acl;
mod body;
mod clock;
mod envelope;
mod error;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod hex;
mod key;
mod keyfile;
mod provider;
mod registry;
mod stamp;
mod tracked;
#[cfg(feature = "transfer")]
pub mod transfer;

pub use acl::{Access, AccessPolicy, Acl, AllowAll, Principal, PrincipalId};
pub use body::{
    Audience, RawBody, TokenBody, TokenId, BODY_VERSION, MAC_OFFSET, MAX_AUDIENCE, MAX_LOCATOR,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use envelope::{
    Envelope, RawToken, Token, HEADER_SIZE, TOKEN_ID_LENGTH, TOKEN_ID_SIZE, TOKEN_SIZE,
    TOKEN_TYPE_VDISK, TOKEN_TYPE_ZERO_DATA,
};
pub use error::{status, Error, FormatError, Result};
pub use key::{KeyRing, Opened, ProviderKey, SECRET_LEN};
pub use keyfile::{KeyFile, KeyFileError};
pub use provider::{
    CopyStats, Limits, Provider, ReadOutput, ReadRequest, ALL_ZERO_BEYOND_CURRENT_RANGE,
};
pub use registry::MAX_TOMBSTONES;
pub use stamp::{settle, FileState, StampBuilder};
pub use tracked::TrackedDisk;
