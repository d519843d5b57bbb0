//! The region tables at 192 KiB and 256 KiB (MS-VHDX 2.2.3).
//!
//! A table is 64 KiB: "regi", CRC-32C over the 64 KiB, EntryCount (at most 2047), then 32-byte
//! entries {Guid, FileOffset, Length, Required}. Regions are 1 MiB aligned, lie past the first
//! MiB and must not overlap each other (or the log). The BAT and metadata regions are
//! mandatory; an unknown region marked required makes the file unopenable; unknown optional
//! regions are kept (and ignored).

use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{corrupt, FormatError};
use crate::guid;
use crate::header::MIB;

/// Size of a region table.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// File offsets of region table 1 and 2.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
/// MS-VHDX 2.2.3.1: at most 2047 entries.
pub const MAX_ENTRIES: u32 = 2047;

/// On-disk region table header (16 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegionTableHeader {
    /// "regi".
    pub signature: [u8; 4],
    /// CRC-32C over 64 KiB with this field zero.
    pub checksum: U32,
    /// Number of entries.
    pub entry_count: U32,
    /// Reserved.
    pub reserved: U32,
}

/// On-disk region table entry (32 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegionEntry {
    /// Region id.
    pub guid: [u8; 16],
    /// Byte offset, multiple of 1 MiB.
    pub file_offset: U64,
    /// Byte length, multiple of 1 MiB.
    pub length: U32,
    /// Bit 0: required.
    pub required: U32,
}

/// A validated region entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Region id.
    pub guid: Uuid,
    /// Byte offset in the file.
    pub file_offset: u64,
    /// Byte length.
    pub length: u32,
    /// Whether a reader must understand the region.
    pub required: bool,
}

impl Region {
    /// End offset (exclusive); cannot overflow once validated.
    pub fn end(&self) -> u64 {
        self.file_offset.saturating_add(u64::from(self.length))
    }
}

/// A validated region table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// The BAT region.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Other (optional) regions, kept as found.
    pub other: Vec<Region>,
}

impl RegionTable {
    /// Parses and validates a 64 KiB region table.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        const S: &str = "region table";
        let bytes = bytes
            .get(..REGION_TABLE_SIZE)
            .ok_or_else(|| corrupt(S, "too short"))?;
        let (hdr, _) =
            RawRegionTableHeader::read_from_prefix(bytes).map_err(|_| corrupt(S, "too short"))?;
        if &hdr.signature != b"regi" {
            return Err(corrupt(S, "signature is not \"regi\""));
        }
        let mut copy = bytes.to_vec();
        copy[4..8].fill(0);
        if crc32c::crc32c(&copy) != hdr.checksum.get() {
            return Err(corrupt(S, "checksum mismatch"));
        }
        let count = hdr.entry_count.get();
        // MS-VHDX 2.2.3.1: EntryCount <= 2047.
        if count > MAX_ENTRIES {
            return Err(corrupt(S, format!("{count} entries (max {MAX_ENTRIES})")));
        }
        let mut regions: Vec<Region> = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = 16 + 32 * i;
            let (raw, _) = RawRegionEntry::read_from_prefix(&bytes[at..])
                .map_err(|_| corrupt(S, "entry out of table"))?;
            let r = Region {
                guid: guid::from_disk(raw.guid),
                file_offset: raw.file_offset.get(),
                length: raw.length.get(),
                required: raw.required.get() & 1 != 0,
            };
            // MS-VHDX 2.2.3.2: 1 MiB aligned, beyond the header section, non-empty.
            if r.file_offset % MIB != 0 || u64::from(r.length) % MIB != 0 {
                return Err(corrupt(
                    S,
                    format!("region {} is not 1 MiB aligned", r.guid),
                ));
            }
            if r.file_offset < MIB || r.length == 0 {
                return Err(corrupt(
                    S,
                    format!("region {} is misplaced or empty", r.guid),
                ));
            }
            if r.file_offset.checked_add(u64::from(r.length)).is_none() {
                return Err(corrupt(S, "region end overflows"));
            }
            if regions.iter().any(|o| o.guid == r.guid) {
                return Err(corrupt(S, format!("region {} appears twice", r.guid)));
            }
            // MS-VHDX 2.2.3: regions must not overlap.
            if regions
                .iter()
                .any(|o| r.file_offset < o.end() && o.file_offset < r.end())
            {
                return Err(corrupt(S, format!("region {} overlaps another", r.guid)));
            }
            regions.push(r);
        }
        let mut bat = None;
        let mut metadata = None;
        let mut other = Vec::new();
        for r in regions {
            if r.guid == guid::BAT_REGION {
                bat = Some(r);
            } else if r.guid == guid::METADATA_REGION {
                metadata = Some(r);
            } else if r.required {
                // MS-VHDX 2.2.3.2: an unknown required region means the file cannot be opened.
                return Err(FormatError::unsupported(
                    S,
                    format!("unknown required region {}", r.guid),
                ));
            } else {
                other.push(r);
            }
        }
        Ok(RegionTable {
            bat: bat.ok_or_else(|| corrupt(S, "no BAT region"))?,
            metadata: metadata.ok_or_else(|| corrupt(S, "no metadata region"))?,
            other,
        })
    }

    /// Every region, BAT and metadata first.
    pub fn all(&self) -> impl Iterator<Item = &Region> {
        [&self.bat, &self.metadata]
            .into_iter()
            .chain(self.other.iter())
    }

    /// Encodes the table (64 KiB) with a fresh checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; REGION_TABLE_SIZE];
        let regions: Vec<&Region> = self.all().collect();
        let hdr = RawRegionTableHeader {
            signature: *b"regi",
            checksum: U32::new(0),
            entry_count: U32::new(regions.len() as u32),
            reserved: U32::new(0),
        };
        out[..16].copy_from_slice(hdr.as_bytes());
        for (i, r) in regions.iter().enumerate() {
            let raw = RawRegionEntry {
                guid: guid::to_disk(&r.guid),
                file_offset: U64::new(r.file_offset),
                length: U32::new(r.length),
                required: U32::new(u32::from(r.required)),
            };
            out[16 + 32 * i..48 + 32 * i].copy_from_slice(raw.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RegionTable {
        RegionTable {
            bat: Region {
                guid: guid::BAT_REGION,
                file_offset: 3 * MIB,
                length: MIB as u32,
                required: true,
            },
            metadata: Region {
                guid: guid::METADATA_REGION,
                file_offset: 2 * MIB,
                length: MIB as u32,
                required: true,
            },
            other: vec![],
        }
    }

    fn with_extra(extra: Region) -> Vec<u8> {
        let mut t = sample();
        t.other.push(extra);
        t.to_bytes()
    }

    #[test]
    fn round_trip() {
        let t = sample();
        assert_eq!(RegionTable::parse(&t.to_bytes()).unwrap(), t);
    }

    #[test]
    fn refuses_bad_crc_overlap_unknown_required_and_huge_count() {
        let mut b = sample().to_bytes();
        b[20] ^= 1;
        assert!(RegionTable::parse(&b).is_err());

        let overlap = Region {
            guid: Uuid::from_u128(9),
            file_offset: 3 * MIB,
            length: MIB as u32,
            required: false,
        };
        assert!(RegionTable::parse(&with_extra(overlap)).is_err());

        let unknown_required = Region {
            guid: Uuid::from_u128(9),
            file_offset: 8 * MIB,
            length: MIB as u32,
            required: true,
        };
        assert!(matches!(
            RegionTable::parse(&with_extra(unknown_required)),
            Err(FormatError::Unsupported { .. })
        ));

        let unknown_optional = Region {
            required: false,
            ..unknown_required
        };
        let t = RegionTable::parse(&with_extra(unknown_optional)).unwrap();
        assert_eq!(t.other, vec![unknown_optional]);

        let unaligned = Region {
            file_offset: 8 * MIB + 4096,
            ..unknown_optional
        };
        assert!(RegionTable::parse(&with_extra(unaligned)).is_err());

        let mut b = sample().to_bytes();
        b[8..12].copy_from_slice(&5000u32.to_le_bytes());
        b[4..8].fill(0);
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(RegionTable::parse(&b).is_err());
    }

    #[test]
    fn missing_bat_refused() {
        let mut t = sample();
        t.bat.guid = Uuid::from_u128(5);
        t.bat.required = false;
        // Encoded with the BAT slot holding an optional unknown region: no BAT.
        assert!(RegionTable::parse(&t.to_bytes()).is_err());
    }
}
