//! The two 4 KiB headers at 64 KiB and 128 KiB (MS-VHDX 2.2.2).
//!
//! A header is valid when its signature is "head", its CRC-32C (over 4 KiB, checksum field
//! zeroed) matches, Version is 1 and LogVersion 0. The current header is the valid one with the
//! larger SequenceNumber (2.2.2.1). Headers are updated with the two-slot protocol: write the
//! non-current slot with SequenceNumber + 1, flush, then (for safety) the other slot.

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{corrupt, FormatError};
use crate::guid;

/// Header size on disk.
pub const HEADER_SIZE: usize = 4096;
/// File offsets of header 1 and header 2.
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
/// 1 MiB, the alignment of every object in a VHDX file.
pub const MIB: u64 = 1 << 20;

/// On-disk header (4 KiB).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// "head".
    pub signature: [u8; 4],
    /// CRC-32C over the 4 KiB header with this field zero.
    pub checksum: U32,
    /// Larger = newer.
    pub sequence_number: U64,
    /// Changes when the file is first opened for writing in a session.
    pub file_write_guid: [u8; 16],
    /// Changes before the first user-visible data change.
    pub data_write_guid: [u8; 16],
    /// Identifies valid log entries; zero means the log is empty.
    pub log_guid: [u8; 16],
    /// Must be 0.
    pub log_version: U16,
    /// Must be 1.
    pub version: U16,
    /// Log size in bytes, a multiple of 1 MiB.
    pub log_length: U32,
    /// Log offset in bytes, a multiple of 1 MiB.
    pub log_offset: U64,
    /// Reserved, zero.
    pub reserved: [u8; 4016],
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Sequence number.
    pub sequence_number: u64,
    /// FileWriteGuid.
    pub file_write_guid: Uuid,
    /// DataWriteGuid.
    pub data_write_guid: Uuid,
    /// LogGuid (nil = empty log).
    pub log_guid: Uuid,
    /// Log length in bytes.
    pub log_length: u32,
    /// Log offset in bytes.
    pub log_offset: u64,
}

impl TryFrom<&RawHeader> for Header {
    type Error = FormatError;
    fn try_from(raw: &RawHeader) -> Result<Self, FormatError> {
        if &raw.signature != b"head" {
            return Err(corrupt("header", "signature is not \"head\""));
        }
        let mut copy = raw.clone();
        copy.checksum = U32::new(0);
        if crc32c::crc32c(copy.as_bytes()) != raw.checksum.get() {
            return Err(corrupt("header", "checksum mismatch"));
        }
        // MS-VHDX 2.2.2.1: Version must be 1 and LogVersion 0.
        if raw.version.get() != 1 {
            return Err(FormatError::unsupported(
                "header",
                format!("version {}", raw.version.get()),
            ));
        }
        if raw.log_version.get() != 0 {
            return Err(FormatError::unsupported(
                "header",
                format!("log version {}", raw.log_version.get()),
            ));
        }
        let log_offset = raw.log_offset.get();
        let log_length = raw.log_length.get();
        // MS-VHDX 2.2.2.1: LogOffset and LogLength are multiples of 1 MiB; the log lies past the
        // first MiB (header section).
        if log_offset % MIB != 0 || u64::from(log_length) % MIB != 0 {
            return Err(corrupt("header", "log is not 1 MiB aligned"));
        }
        if log_length == 0 || log_offset < MIB {
            return Err(corrupt(
                "header",
                "log region is empty or inside the header section",
            ));
        }
        if log_offset.checked_add(u64::from(log_length)).is_none() {
            return Err(corrupt("header", "log region overflows"));
        }
        Ok(Header {
            sequence_number: raw.sequence_number.get(),
            file_write_guid: guid::from_disk(raw.file_write_guid),
            data_write_guid: guid::from_disk(raw.data_write_guid),
            log_guid: guid::from_disk(raw.log_guid),
            log_length,
            log_offset,
        })
    }
}

impl Header {
    /// The log's file range `[start, end)` (cannot overflow: parsing checked it).
    pub(crate) fn log_range(&self) -> (u64, u64) {
        (
            self.log_offset,
            self.log_offset + u64::from(self.log_length),
        )
    }

    /// Parses and validates a 4 KiB header.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let (raw, _) =
            RawHeader::read_from_prefix(bytes).map_err(|_| corrupt("header", "too short"))?;
        Header::try_from(&raw)
    }

    /// Encodes the header with a fresh checksum (4 KiB).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut raw = RawHeader {
            signature: *b"head",
            checksum: U32::new(0),
            sequence_number: U64::new(self.sequence_number),
            file_write_guid: guid::to_disk(&self.file_write_guid),
            data_write_guid: guid::to_disk(&self.data_write_guid),
            log_guid: guid::to_disk(&self.log_guid),
            log_version: U16::new(0),
            version: U16::new(1),
            log_length: U32::new(self.log_length),
            log_offset: U64::new(self.log_offset),
            reserved: [0; 4016],
        };
        raw.checksum = U32::new(crc32c::crc32c(raw.as_bytes()));
        raw.as_bytes().to_vec()
    }
}

/// Chooses the current header from the two slots (MS-VHDX 2.2.2): the valid one with the larger
/// sequence number; with equal numbers, slot 0. Returns the header and its slot index.
pub fn select_current(
    h1: Result<Header, FormatError>,
    h2: Result<Header, FormatError>,
) -> Result<(Header, usize), FormatError> {
    match (h1, h2) {
        (Ok(a), Ok(b)) => {
            if b.sequence_number > a.sequence_number {
                Ok((b, 1))
            } else {
                Ok((a, 0))
            }
        }
        (Ok(a), Err(_)) => Ok((a, 0)),
        (Err(_), Ok(b)) => Ok((b, 1)),
        (Err(e1), Err(e2)) => Err(corrupt(
            "headers",
            format!("neither header is valid (1: {e1}; 2: {e2})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Header {
        Header {
            sequence_number: seq,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample(7);
        let b = h.to_bytes();
        assert_eq!(b.len(), HEADER_SIZE);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn bad_crc_and_signature_and_version() {
        let mut b = sample(1).to_bytes();
        b[100] ^= 1;
        assert!(Header::parse(&b).is_err());
        let mut b = sample(1).to_bytes();
        b[0] = b'H';
        assert!(Header::parse(&b).is_err());
        // Version 2 with a valid CRC.
        let mut raw = RawHeader::read_from_bytes(&sample(1).to_bytes()[..]).unwrap();
        raw.version = U16::new(2);
        raw.checksum = U32::new(0);
        raw.checksum = U32::new(crc32c::crc32c(raw.as_bytes()));
        assert!(matches!(
            Header::parse(raw.as_bytes()),
            Err(FormatError::Unsupported { .. })
        ));
    }

    #[test]
    fn unaligned_log_refused() {
        let mut h = sample(1);
        h.log_offset = MIB + 4096;
        assert!(Header::parse(&h.to_bytes()).is_err());
        let mut h = sample(1);
        h.log_offset = 0;
        assert!(Header::parse(&h.to_bytes()).is_err());
    }

    #[test]
    fn current_is_larger_sequence() {
        let (h, slot) = select_current(Ok(sample(3)), Ok(sample(4))).unwrap();
        assert_eq!((h.sequence_number, slot), (4, 1));
        let (h, slot) = select_current(Ok(sample(5)), Ok(sample(4))).unwrap();
        assert_eq!((h.sequence_number, slot), (5, 0));
        let (h, slot) = select_current(Ok(sample(5)), Ok(sample(5))).unwrap();
        assert_eq!((h.sequence_number, slot), (5, 0));
        let (_, slot) = select_current(Err(corrupt("x", "y")), Ok(sample(1))).unwrap();
        assert_eq!(slot, 1);
        assert!(select_current(Err(corrupt("x", "y")), Err(corrupt("x", "y"))).is_err());
    }
}
