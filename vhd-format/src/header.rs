//! The dynamic disk header (VHD spec 1.0, "Dynamic Disk Header Format"): 1024 bytes at the
//! footer's data offset of dynamic and differencing images. It locates the BAT, gives the
//! block size and, for differencing disks, the parent's unique id, timestamp, UTF-16
//! **big-endian** name and the eight parent locator entries.

use uuid::Uuid;
use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::error::FormatError;
use crate::footer::checksum;
use crate::locator::LocatorEntry;

/// Size of the dynamic header in bytes.
pub const HEADER_SIZE: usize = 1024;
/// The header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Default block size (2 MiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 * 1024 * 1024;
/// Smallest block size accepted (one 512-byte sector per bitmap bit byte... one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024 * 1024;
/// Largest BAT accepted, in entries (64 MiB of BAT in memory).
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;
/// Number of parent locator entries.
pub const LOCATOR_COUNT: usize = 8;

/// One parent locator entry as stored (24 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawLocator {
    /// Platform code ("W2ku", "W2ru", "Wi2k", "Wi2r", "MacX", "Mac "; zeros = unused).
    pub platform_code: [u8; 4],
    /// Space reserved for the data: sectors by the spec, **bytes** as Hyper-V writes it.
    pub data_space: U32,
    /// Length of the locator data in bytes.
    pub data_length: U32,
    /// Zero.
    pub reserved: U32,
    /// Absolute file offset of the data.
    pub data_offset: U64,
}

/// The dynamic header as stored, all fields big-endian.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawDynamicHeader {
    /// "cxsparse".
    pub cookie: [u8; 8],
    /// All ones (unused).
    pub data_offset: U64,
    /// Absolute offset of the BAT.
    pub table_offset: U64,
    /// 0x00010000.
    pub header_version: U32,
    /// Number of BAT entries.
    pub max_table_entries: U32,
    /// Block size in bytes (data only, not the bitmap).
    pub block_size: U32,
    /// One's complement of the byte sum with this field zeroed.
    pub checksum: U32,
    /// Parent's unique id (differencing).
    pub parent_unique_id: [u8; 16],
    /// Parent's footer timestamp (differencing).
    pub parent_timestamp: U32,
    /// Zero.
    pub reserved1: [u8; 4],
    /// Parent file name, UTF-16 **big-endian**, NUL-padded.
    pub parent_unicode_name: [u8; 512],
    /// Parent locators.
    pub locators: [RawLocator; LOCATOR_COUNT],
    /// Zeros.
    pub reserved2: [u8; 256],
}

const _: () = assert!(std::mem::size_of::<RawDynamicHeader>() == HEADER_SIZE);
const HEADER_CHECKSUM_RANGE: std::ops::Range<usize> = 36..40;

/// A validated dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Absolute offset of the BAT (a multiple of 512).
    pub table_offset: u64,
    /// Number of BAT entries (at most [`MAX_TABLE_ENTRIES`]).
    pub max_table_entries: u32,
    /// Block size: a power of two in [`MIN_BLOCK_SIZE`, `MAX_BLOCK_SIZE`].
    pub block_size: u32,
    /// Parent's unique id.
    pub parent_unique_id: Uuid,
    /// Parent's timestamp.
    pub parent_timestamp: u32,
    /// Parent name decoded from UTF-16BE (empty when unset).
    pub parent_name: String,
    /// The parent locator entries in use (platform code not zero).
    pub locators: Vec<LocatorEntry>,
}

impl DynamicHeader {
    /// Parses and validates 1024 bytes; `check_sum` false skips the checksum (for `check`).
    pub fn parse(bytes: &[u8], check_sum: bool) -> Result<Self, FormatError> {
        let raw = RawDynamicHeader::read_from_bytes(bytes).map_err(|_| FormatError::Truncated {
            what: "dynamic header",
        })?;
        if check_sum {
            let computed = checksum(bytes, HEADER_CHECKSUM_RANGE);
            if &raw.cookie == HEADER_COOKIE && computed != raw.checksum.get() {
                return Err(FormatError::Checksum {
                    what: "dynamic header",
                    stored: raw.checksum.get(),
                    computed,
                });
            }
        }
        DynamicHeader::try_from(&raw)
    }

    /// Bytes of a block's sector bitmap, padded to a sector.
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size)
    }

    /// Serialises with a fresh checksum.
    pub fn to_bytes(&self) -> Result<[u8; HEADER_SIZE], FormatError> {
        let mut raw = RawDynamicHeader::new_zeroed();
        raw.cookie = *HEADER_COOKIE;
        raw.data_offset.set(u64::MAX);
        raw.table_offset.set(self.table_offset);
        raw.header_version.set(HEADER_VERSION);
        raw.max_table_entries.set(self.max_table_entries);
        raw.block_size.set(self.block_size);
        raw.parent_unique_id = *self.parent_unique_id.as_bytes();
        raw.parent_timestamp.set(self.parent_timestamp);
        raw.parent_unicode_name = encode_parent_name(&self.parent_name)?;
        if self.locators.len() > LOCATOR_COUNT {
            return Err(FormatError::Invalid("more than 8 parent locators".into()));
        }
        for (slot, loc) in raw.locators.iter_mut().zip(&self.locators) {
            *slot = loc.to_raw();
        }
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        let sum = checksum(&out, HEADER_CHECKSUM_RANGE);
        out[HEADER_CHECKSUM_RANGE].copy_from_slice(&sum.to_be_bytes());
        Ok(out)
    }
}

/// Bytes of a sector bitmap for `block_size`, padded to 512.
pub fn bitmap_size(block_size: u32) -> u64 {
    (u64::from(block_size) / 512).div_ceil(8).div_ceil(512) * 512
}

impl TryFrom<&RawDynamicHeader> for DynamicHeader {
    type Error = FormatError;

    fn try_from(raw: &RawDynamicHeader) -> Result<Self, FormatError> {
        if &raw.cookie != HEADER_COOKIE {
            return Err(FormatError::BadCookie {
                what: "dynamic header",
            });
        }
        if raw.header_version.get() >> 16 != 1 {
            return Err(FormatError::Unsupported(format!(
                "dynamic header version {:#x}",
                raw.header_version.get()
            )));
        }
        let block_size = raw.block_size.get();
        // VHD 1.0: the block size is a power of two multiple of the sector size.
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(FormatError::Invalid(format!(
                "block size {block_size} is not a power of two between 512 B and 256 MiB"
            )));
        }
        let entries = raw.max_table_entries.get();
        if entries > MAX_TABLE_ENTRIES {
            return Err(FormatError::Invalid(format!(
                "BAT of {entries} entries is too large"
            )));
        }
        let table_offset = raw.table_offset.get();
        if table_offset % 512 != 0 {
            return Err(FormatError::Invalid(format!(
                "BAT offset {table_offset} is not sector-aligned"
            )));
        }
        let locators = raw
            .locators
            .iter()
            .filter(|l| l.platform_code != [0; 4])
            .map(LocatorEntry::from_raw)
            .collect();
        Ok(DynamicHeader {
            table_offset,
            max_table_entries: entries,
            block_size,
            parent_unique_id: Uuid::from_bytes(raw.parent_unique_id),
            parent_timestamp: raw.parent_timestamp.get(),
            parent_name: decode_parent_name(&raw.parent_unicode_name),
            locators,
        })
    }
}

/// Decodes the UTF-16BE parent name up to the first NUL (lossy).
pub fn decode_parent_name(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Encodes a parent name as UTF-16BE in 512 bytes (at most 256 code units).
pub fn encode_parent_name(name: &str) -> Result<[u8; 512], FormatError> {
    let mut out = [0u8; 512];
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > 256 {
        return Err(FormatError::Invalid(
            "parent name longer than 256 UTF-16 code units".into(),
        ));
    }
    for (i, u) in units.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        DynamicHeader {
            table_offset: 1536,
            max_table_entries: 10,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_unique_id: Uuid::from_bytes([3; 16]),
            parent_timestamp: 99,
            parent_name: "C:\\d\\p\u{e9}.vhd".into(),
            locators: vec![],
        }
    }

    #[test]
    fn header_round_trip() {
        let h = sample();
        let b = h.to_bytes().unwrap();
        assert_eq!(DynamicHeader::parse(&b, true).unwrap(), h);
        // UTF-16 big-endian: 'C' is 00 43.
        assert_eq!(&b[64..66], &[0x00, 0x43]);
    }

    #[test]
    fn rejects_bad_block_sizes_and_tables() {
        for bs in [0u32, 3000, 256, 512 * 1024 * 1024] {
            let mut b = sample().to_bytes().unwrap();
            b[32..36].copy_from_slice(&bs.to_be_bytes());
            assert!(DynamicHeader::parse(&b, false).is_err(), "block size {bs}");
        }
        let mut b = sample().to_bytes().unwrap();
        b[28..32].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(DynamicHeader::parse(&b, false).is_err());
        let mut b = sample().to_bytes().unwrap();
        b[40] ^= 0xff;
        assert!(matches!(
            DynamicHeader::parse(&b, true),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_size(2 * 1024 * 1024), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(16 * 1024 * 1024), 4096);
    }
}
