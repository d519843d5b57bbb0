//! The sealed body inside a vendor token's 504-byte TokenId: [`RawBody`] is the on-wire
//! layout (all integers big-endian, like the envelope), [`TokenBody`] the validated fields.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 2 | format version (1) |
//! | 2 | 2 | flags (reserved, zero) |
//! | 4 | 4 | key id of the sealing key |
//! | 8 | 16 | token id (random) |
//! | 24 | 16 | issuing provider id |
//! | 40 | 16 | source disk id |
//! | 56 | 8 | source write generation at mint |
//! | 64 | 8 | source offset (bytes) |
//! | 72 | 8 | length (bytes) |
//! | 80 | 4 | logical sector size of the source |
//! | 84 | 4 | inactivity TTL (ms) |
//! | 88 | 8 | issue time (ms since the Unix epoch) |
//! | 96 | 8 | hard expiry (ms since the Unix epoch) |
//! | 104 | 1 | audience count (1..=4) |
//! | 105 | 7 | reserved, zero |
//! | 112 | 16 | minter (principal id) |
//! | 128 | 64 | audience: 4 principal ids, unused slots zero |
//! | 192 | 32 | source stamp (opaque binding to the source's state; zero if none) |
//! | 224 | 2 | locator length (0..=246) |
//! | 226 | 246 | locator (opaque, e.g. a path), zero past its length |
//! | 472 | 32 | HMAC-SHA256 over the 8-byte envelope header and bytes 0..472 |

use std::fmt;

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use uuid::Uuid;

use crate::acl::PrincipalId;
use crate::envelope::TOKEN_ID_SIZE;
use crate::error::FormatError;

/// The body format version this crate writes and reads.
pub const BODY_VERSION: u16 = 1;
/// Most principals an audience can name.
pub const MAX_AUDIENCE: usize = 4;
/// Longest locator a body can carry.
pub const MAX_LOCATOR: usize = 246;
/// Offset of the MAC in the body; the MAC covers the envelope header and `body[..MAC_OFFSET]`.
pub const MAC_OFFSET: usize = 472;

/// The on-wire body (MS-FSCC leaves TokenId vendor-specific; this is ours).
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBody {
    /// Format version.
    pub version: U16,
    /// Reserved flags; zero.
    pub flags: U16,
    /// Id of the key that sealed the body.
    pub key_id: U32,
    /// Random token id.
    pub token_id: [u8; 16],
    /// Issuing provider.
    pub provider_id: [u8; 16],
    /// Source disk.
    pub disk_id: [u8; 16],
    /// Source write generation at mint.
    pub generation: U64,
    /// Source offset.
    pub offset: U64,
    /// Length.
    pub length: U64,
    /// Source logical sector size.
    pub sector_size: U32,
    /// Inactivity TTL in milliseconds.
    pub inactivity_ttl_ms: U32,
    /// Issue time, ms since the Unix epoch.
    pub issued_ms: U64,
    /// Hard expiry, ms since the Unix epoch.
    pub expires_ms: U64,
    /// Number of audience entries used.
    pub audience_count: u8,
    /// Reserved; zero.
    pub reserved: [u8; 7],
    /// Minter's principal id.
    pub minter: [u8; 16],
    /// Audience principal ids.
    pub audience: [[u8; 16]; MAX_AUDIENCE],
    /// Opaque source stamp.
    pub source_stamp: [u8; 32],
    /// Locator length.
    pub locator_len: U16,
    /// Locator bytes.
    pub locator: [u8; MAX_LOCATOR],
    /// HMAC-SHA256.
    pub mac: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<RawBody>() == TOKEN_ID_SIZE);
const _: () = assert!(std::mem::offset_of!(RawBody, mac) == MAC_OFFSET);

impl fmt::Debug for RawBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawBody")
            .field("version", &self.version.get())
            .field("key_id", &self.key_id.get())
            .field("offset", &self.offset.get())
            .field("length", &self.length.get())
            .finish_non_exhaustive()
    }
}

/// A token's random 16-byte id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(pub [u8; 16]);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

/// Who may redeem a token: one to [`MAX_AUDIENCE`] distinct principals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience(Vec<PrincipalId>);

impl Audience {
    /// Exactly one principal.
    pub fn single(who: PrincipalId) -> Self {
        Audience(vec![who])
    }

    /// The given principals (duplicates dropped); `None` if there are none or more than
    /// [`MAX_AUDIENCE`].
    pub fn new(who: &[PrincipalId]) -> Option<Self> {
        let mut v: Vec<PrincipalId> = Vec::with_capacity(who.len());
        for p in who {
            if !v.contains(p) {
                v.push(*p);
            }
        }
        (!v.is_empty() && v.len() <= MAX_AUDIENCE).then_some(Audience(v))
    }

    /// Whether `who` may redeem.
    pub fn admits(&self, who: &PrincipalId) -> bool {
        self.0.contains(who)
    }

    /// The principals.
    pub fn members(&self) -> &[PrincipalId] {
        &self.0
    }
}

/// The validated fields of a sealed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBody {
    /// Id of the key that sealed it.
    pub key_id: u32,
    /// Random token id.
    pub id: TokenId,
    /// Issuing provider.
    pub provider: Uuid,
    /// Source disk.
    pub disk: Uuid,
    /// The source's write generation when the token was minted (informational: validity
    /// is decided by the registry's per-range invalidation or the source stamp).
    pub generation: u64,
    /// Source offset in bytes.
    pub offset: u64,
    /// Length in bytes (> 0, whole sectors).
    pub length: u64,
    /// Source logical sector size (512 or 4096).
    pub sector_size: u32,
    /// Inactivity TTL in milliseconds (> 0).
    pub inactivity_ttl_ms: u32,
    /// Issue time, ms since the Unix epoch.
    pub issued_ms: u64,
    /// Hard expiry, ms since the Unix epoch (after the issue time).
    pub expires_ms: u64,
    /// Who minted it.
    pub minter: PrincipalId,
    /// Who may redeem it.
    pub audience: Audience,
    /// Opaque binding to the source's state, checked by whoever re-admits the token in
    /// another process (zeros when unused).
    pub source_stamp: [u8; 32],
    /// Opaque locator of the source (the CLI stores the image path), at most
    /// [`MAX_LOCATOR`] bytes.
    pub locator: Vec<u8>,
}

fn field(field: &'static str, why: &'static str) -> FormatError {
    FormatError::InvalidField { field, why }
}

impl TryFrom<&RawBody> for TokenBody {
    type Error = FormatError;

    /// Validates every field. Does not check the seal: [`KeyRing::open`](crate::KeyRing::open)
    /// does that first and calls this only on a body whose seal verified.
    fn try_from(raw: &RawBody) -> Result<Self, FormatError> {
        let version = raw.version.get();
        if version != BODY_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if raw.flags.get() != 0 {
            return Err(FormatError::NonZeroReserved("flags"));
        }
        if raw.reserved != [0; 7] {
            return Err(FormatError::NonZeroReserved(
                "reserved after the audience count",
            ));
        }
        let sector_size = raw.sector_size.get();
        if sector_size != 512 && sector_size != 4096 {
            return Err(field("sector_size", "neither 512 nor 4096"));
        }
        let sector = u64::from(sector_size);
        let (offset, length) = (raw.offset.get(), raw.length.get());
        if length == 0 {
            return Err(field("length", "zero"));
        }
        if offset % sector != 0 || length % sector != 0 {
            return Err(field("offset/length", "not whole sectors"));
        }
        if offset.checked_add(length).is_none() {
            return Err(field("offset/length", "end overflows u64"));
        }
        let inactivity_ttl_ms = raw.inactivity_ttl_ms.get();
        if inactivity_ttl_ms == 0 {
            return Err(field("inactivity_ttl_ms", "zero"));
        }
        let (issued_ms, expires_ms) = (raw.issued_ms.get(), raw.expires_ms.get());
        if expires_ms <= issued_ms {
            return Err(field("expires_ms", "not after the issue time"));
        }
        let count = usize::from(raw.audience_count);
        if count == 0 || count > MAX_AUDIENCE {
            return Err(field("audience_count", "not 1..=4"));
        }
        if raw.audience[count..].iter().flatten().any(|&b| b != 0) {
            return Err(FormatError::NonZeroReserved("unused audience slots"));
        }
        let members: Vec<PrincipalId> = raw.audience[..count]
            .iter()
            .map(|b| PrincipalId::from_bytes(*b))
            .collect();
        let audience = Audience::new(&members)
            .filter(|a| a.members().len() == count)
            .ok_or_else(|| field("audience", "repeats a principal"))?;
        let locator_len = usize::from(raw.locator_len.get());
        if locator_len > MAX_LOCATOR {
            return Err(field("locator_len", "longer than 246"));
        }
        if raw.locator[locator_len..].iter().any(|&b| b != 0) {
            return Err(FormatError::NonZeroReserved("locator padding"));
        }
        Ok(TokenBody {
            key_id: raw.key_id.get(),
            id: TokenId(raw.token_id),
            provider: Uuid::from_bytes(raw.provider_id),
            disk: Uuid::from_bytes(raw.disk_id),
            generation: raw.generation.get(),
            offset,
            length,
            sector_size,
            inactivity_ttl_ms,
            issued_ms,
            expires_ms,
            minter: PrincipalId::from_bytes(raw.minter),
            audience,
            source_stamp: raw.source_stamp,
            locator: raw.locator[..locator_len].to_vec(),
        })
    }
}

impl TokenBody {
    /// The on-wire body with a zero MAC. Fails if the locator is too long.
    pub fn to_raw(&self) -> Result<RawBody, FormatError> {
        if self.locator.len() > MAX_LOCATOR {
            return Err(field("locator_len", "longer than 246"));
        }
        let mut raw = RawBody::new_zeroed();
        raw.version.set(BODY_VERSION);
        raw.key_id.set(self.key_id);
        raw.token_id = self.id.0;
        raw.provider_id = *self.provider.as_bytes();
        raw.disk_id = *self.disk.as_bytes();
        raw.generation.set(self.generation);
        raw.offset.set(self.offset);
        raw.length.set(self.length);
        raw.sector_size.set(self.sector_size);
        raw.inactivity_ttl_ms.set(self.inactivity_ttl_ms);
        raw.issued_ms.set(self.issued_ms);
        raw.expires_ms.set(self.expires_ms);
        let members = self.audience.members();
        raw.audience_count =
            u8::try_from(members.len()).map_err(|_| field("audience_count", "not 1..=4"))?;
        for (slot, p) in raw.audience.iter_mut().zip(members) {
            *slot = *p.as_bytes();
        }
        raw.minter = *self.minter.as_bytes();
        raw.source_stamp = self.source_stamp;
        // Bounded by MAX_LOCATOR above.
        raw.locator_len.set(self.locator.len() as u16);
        raw.locator[..self.locator.len()].copy_from_slice(&self.locator);
        Ok(raw)
    }

    /// The end of the source range (`offset + length`; validated not to overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}
