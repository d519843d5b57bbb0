//! The file type identifier at offset 0 (MS-VHDX 2.2.1): the signature "vhdxfile" and a
//! UTF-16LE creator string of up to 256 code units. It is written once at creation and never
//! rewritten.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{corrupt, FormatError};

/// The signature at offset 0, compared as bytes.
pub const SIGNATURE: &[u8; 8] = b"vhdxfile";

/// On-disk layout of the file identifier (the first 520 bytes of the 64 KiB structure).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawFileIdentifier {
    /// "vhdxfile".
    pub signature: [u8; 8],
    /// UTF-16LE creator, NUL padded.
    pub creator: [u8; 512],
}

/// A validated file identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentifier {
    /// The creator application, decoded (lossily) up to the first NUL.
    pub creator: String,
}

impl TryFrom<&RawFileIdentifier> for FileIdentifier {
    type Error = FormatError;
    fn try_from(raw: &RawFileIdentifier) -> Result<Self, FormatError> {
        if &raw.signature != SIGNATURE {
            return Err(corrupt("file identifier", "signature is not \"vhdxfile\""));
        }
        let units: Vec<u16> = raw
            .creator
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }
}

impl FileIdentifier {
    /// Parses the identifier from the first bytes of the file.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let (raw, _) = RawFileIdentifier::read_from_prefix(bytes)
            .map_err(|_| corrupt("file identifier", "file is too short"))?;
        FileIdentifier::try_from(&raw)
    }

    /// Encodes the identifier (520 bytes); the creator is cut to 256 UTF-16 units.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut raw = RawFileIdentifier {
            signature: *SIGNATURE,
            creator: [0; 512],
        };
        for (i, u) in self.creator.encode_utf16().take(256).enumerate() {
            raw.creator[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
        }
        raw.as_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_signature() {
        let id = FileIdentifier {
            creator: "vdisk test".into(),
        };
        let bytes = id.to_bytes();
        assert_eq!(bytes.len(), 520);
        assert_eq!(FileIdentifier::parse(&bytes).unwrap(), id);
        let mut bad = bytes.clone();
        bad[0] = b'V';
        assert!(FileIdentifier::parse(&bad).is_err());
        assert!(FileIdentifier::parse(&bytes[..100]).is_err());
    }
}
