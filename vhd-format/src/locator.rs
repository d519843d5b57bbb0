//! Parent locators (VHD spec 1.0, "Dynamic Disk Header Format", parent locator entries):
//! where a differencing disk's parent may be found, per platform.
//!
//! TRAPs handled here: W2ku (absolute) and W2ru (relative) paths are UTF-16
//! **little-endian** (the parent name in the header is big-endian); the data space is in
//! sectors per the spec but in **bytes** as Hyper-V writes it; Wi2k/Wi2r are deprecated
//! single-byte paths; MacX is a UTF-8 file URL.

use block_io::Result;

use crate::error::invalid_input;
use crate::header::RawLocator;

/// Largest locator data this crate reads (64 KiB; a path is far shorter).
pub const MAX_LOCATOR_DATA: u32 = 64 * 1024;

/// A locator's platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlatformCode {
    /// "W2ku": absolute Windows path, UTF-16LE.
    W2ku,
    /// "W2ru": relative Windows path, UTF-16LE.
    W2ru,
    /// "Wi2k": absolute Windows path, deprecated single-byte form.
    Wi2k,
    /// "Wi2r": relative Windows path, deprecated single-byte form.
    Wi2r,
    /// "MacX": UTF-8 file URL.
    MacX,
    /// "Mac ": a Mac OS alias blob (not decoded).
    Mac,
    /// Any other code.
    Other([u8; 4]),
}

impl PlatformCode {
    /// Classifies the four code bytes.
    pub fn from_bytes(b: [u8; 4]) -> Self {
        match &b {
            b"W2ku" => PlatformCode::W2ku,
            b"W2ru" => PlatformCode::W2ru,
            b"Wi2k" => PlatformCode::Wi2k,
            b"Wi2r" => PlatformCode::Wi2r,
            b"MacX" => PlatformCode::MacX,
            b"Mac " => PlatformCode::Mac,
            _ => PlatformCode::Other(b),
        }
    }

    /// The four code bytes.
    pub fn to_bytes(self) -> [u8; 4] {
        match self {
            PlatformCode::W2ku => *b"W2ku",
            PlatformCode::W2ru => *b"W2ru",
            PlatformCode::Wi2k => *b"Wi2k",
            PlatformCode::Wi2r => *b"Wi2r",
            PlatformCode::MacX => *b"MacX",
            PlatformCode::Mac => *b"Mac ",
            PlatformCode::Other(b) => b,
        }
    }

    /// The code as text (non-ASCII bytes escaped).
    pub fn as_string(self) -> String {
        ascii_text(&self.to_bytes())
    }

    /// `true` for codes whose data is a relative path.
    pub fn is_relative(self) -> bool {
        matches!(self, PlatformCode::W2ru | PlatformCode::Wi2r)
    }

    /// Decodes locator data into a path (or URL for MacX); `None` for undecodable codes.
    pub fn decode(self, data: &[u8]) -> Option<String> {
        match self {
            PlatformCode::W2ku | PlatformCode::W2ru => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                Some(String::from_utf16_lossy(&units))
            }
            PlatformCode::Wi2k | PlatformCode::Wi2r | PlatformCode::MacX => {
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                Some(String::from_utf8_lossy(&data[..end]).into_owned())
            }
            PlatformCode::Mac | PlatformCode::Other(_) => None,
        }
    }

    /// Encodes a path for this platform (W2ku/W2ru as UTF-16LE; others as UTF-8).
    pub fn encode(self, path: &str) -> Vec<u8> {
        match self {
            PlatformCode::W2ku | PlatformCode::W2ru => {
                path.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
            }
            _ => path.as_bytes().to_vec(),
        }
    }
}

/// One parent locator entry in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Platform.
    pub platform: PlatformCode,
    /// The stored data space (unit ambiguous; see [`LocatorEntry::reserved_bytes`]).
    pub data_space: u32,
    /// Data length in bytes.
    pub data_length: u32,
    /// Absolute file offset of the data.
    pub data_offset: u64,
}

impl LocatorEntry {
    /// From the raw entry.
    pub fn from_raw(raw: &RawLocator) -> Self {
        LocatorEntry {
            platform: PlatformCode::from_bytes(raw.platform_code),
            data_space: raw.data_space.get(),
            data_length: raw.data_length.get(),
            data_offset: raw.data_offset.get(),
        }
    }

    /// To the raw entry.
    pub fn to_raw(&self) -> RawLocator {
        let mut raw = RawLocator {
            platform_code: self.platform.to_bytes(),
            data_space: 0.into(),
            data_length: 0.into(),
            reserved: 0.into(),
            data_offset: 0.into(),
        };
        raw.data_space.set(self.data_space);
        raw.data_length.set(self.data_length);
        raw.data_offset.set(self.data_offset);
        raw
    }

    /// Bytes the entry reserves in the file. TRAP: the spec counts data space in sectors,
    /// Hyper-V in bytes. A space at least as large as the length is taken as bytes, a
    /// smaller one as sectors; never less than the data length rounded up to a sector.
    pub fn reserved_bytes(&self) -> u64 {
        let len = u64::from(self.data_length).div_ceil(512) * 512;
        let space = u64::from(self.data_space);
        let space = if space >= u64::from(self.data_length) {
            space
        } else {
            space * 512
        };
        space.max(len)
    }
}

/// `bytes` as text, non-printable and non-ASCII bytes escaped.
pub(crate) fn ascii_text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// The W2ku (`absolute`) and W2ru (`relative`) locators laid out from file offset `pos` the way
/// Hyper-V writes them: UTF-16LE paths, each in its own sector-aligned area of at least one
/// sector, the data space in bytes. Returns the entries and the areas' bytes (to be written at
/// `pos`); a path longer than [`MAX_LOCATOR_DATA`] is `InvalidInput`.
pub(crate) fn hyper_v_locators(
    absolute: Option<&str>,
    relative: Option<&str>,
    pos: u64,
) -> Result<(Vec<LocatorEntry>, Vec<u8>)> {
    let mut entries = Vec::new();
    let mut data = Vec::new();
    let paths = [
        (PlatformCode::W2ku, absolute),
        (PlatformCode::W2ru, relative),
    ];
    for (platform, path) in paths {
        let Some(path) = path else { continue };
        let bytes = platform.encode(path);
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|&l| l <= MAX_LOCATOR_DATA)
            .ok_or_else(|| invalid_input("parent path too long"))?;
        // Bounded by MAX_LOCATOR_DATA: the casts below cannot truncate.
        let space = u64::from(len).div_ceil(512).max(1) * 512;
        let start = data.len();
        entries.push(LocatorEntry {
            platform,
            data_space: space as u32,
            data_length: len,
            data_offset: pos + start as u64,
        });
        data.extend_from_slice(&bytes);
        data.resize(start + space as usize, 0);
    }
    Ok((entries, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16le_paths_round_trip() {
        let p = PlatformCode::W2ku;
        let enc = p.encode("C:\\x\\\u{e9}.vhd");
        assert_eq!(&enc[..2], &[b'C', 0]);
        assert_eq!(p.decode(&enc).unwrap(), "C:\\x\\\u{e9}.vhd");
        assert_eq!(
            PlatformCode::MacX.decode(b"file://x\0\0").unwrap(),
            "file://x"
        );
        assert_eq!(PlatformCode::from_bytes(*b"abcd").as_string(), "abcd");
    }

    #[test]
    fn data_space_units() {
        let bytes = LocatorEntry {
            platform: PlatformCode::W2ru,
            data_space: 65536,
            data_length: 0x20,
            data_offset: 0x3000,
        };
        assert_eq!(bytes.reserved_bytes(), 65536);
        let sectors = LocatorEntry {
            data_space: 1,
            data_length: 0x54,
            ..bytes
        };
        assert_eq!(sectors.reserved_bytes(), 512);
    }
}
