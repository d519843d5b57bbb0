//! The parent locator metadata item (MS-VHDX 2.6.2.6).
//!
//! A header {LocatorType, Reserved, KeyValueCount} is followed by 12-byte entries {KeyOffset,
//! ValueOffset, KeyLength, ValueLength} pointing at UTF-16LE strings (no terminator) inside the
//! item. For the VHDX locator type the keys are `parent_linkage` (the parent's DataWriteGuid,
//! required), `parent_linkage2`, `relative_path`, `volume_path` and `absolute_win32_path`
//! (2.6.2.6.1). Keys are unique; unknown keys are kept.

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{corrupt, FormatError};
use crate::guid;

const S: &str = "parent locator";

/// On-disk locator header (20 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLocatorHeader {
    /// Locator type GUID.
    pub locator_type: [u8; 16],
    /// Reserved.
    pub reserved: U16,
    /// Number of key/value entries.
    pub key_value_count: U16,
}

/// On-disk key/value entry (12 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLocatorEntry {
    /// Byte offset of the key from the start of the item.
    pub key_offset: U32,
    /// Byte offset of the value.
    pub value_offset: U32,
    /// Key length in bytes.
    pub key_length: U16,
    /// Value length in bytes.
    pub value_length: U16,
}

/// A validated parent locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// Locator type (the VHDX type for every image this crate accepts).
    pub locator_type: Uuid,
    /// Key/value pairs in on-disk order.
    pub entries: Vec<(String, String)>,
}

fn utf16(bytes: &[u8]) -> Result<String, FormatError> {
    if bytes.len() % 2 != 0 {
        return Err(corrupt(S, "string of odd byte length"));
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).map_err(|_| corrupt(S, "string is not valid UTF-16"))
}

impl ParentLocator {
    /// Parses the item bytes.
    pub fn parse(item: &[u8]) -> Result<Self, FormatError> {
        let (hdr, _) =
            RawLocatorHeader::read_from_prefix(item).map_err(|_| corrupt(S, "too short"))?;
        let locator_type = guid::from_disk(hdr.locator_type);
        // MS-VHDX 2.6.2.6.1: only the VHDX locator type is defined.
        if locator_type != guid::VHDX_LOCATOR_TYPE {
            return Err(FormatError::unsupported(
                S,
                format!("locator type {locator_type}"),
            ));
        }
        let count = usize::from(hdr.key_value_count.get());
        let table_end = 20 + 12 * count;
        if table_end > item.len() {
            return Err(corrupt(S, format!("{count} entries do not fit the item")));
        }
        let mut entries: Vec<(String, String)> = Vec::with_capacity(count);
        for i in 0..count {
            let (e, _) = RawLocatorEntry::read_from_prefix(&item[20 + 12 * i..])
                .map_err(|_| corrupt(S, "entry out of item"))?;
            let field = |off: u32, len: u16| -> Result<String, FormatError> {
                let off = off as usize;
                let end = off
                    .checked_add(usize::from(len))
                    .filter(|&e| e <= item.len())
                    .ok_or_else(|| corrupt(S, "string lies outside the item"))?;
                // MS-VHDX 2.6.2.6: strings lie after the entry table.
                if off < table_end {
                    return Err(corrupt(S, "string overlaps the entry table"));
                }
                utf16(&item[off..end])
            };
            if e.key_length.get() == 0 {
                return Err(corrupt(S, "empty key"));
            }
            let key = field(e.key_offset.get(), e.key_length.get())?;
            let value = field(e.value_offset.get(), e.value_length.get())?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(corrupt(S, format!("key {key:?} appears twice")));
            }
            entries.push((key, value));
        }
        let loc = ParentLocator {
            locator_type,
            entries,
        };
        // MS-VHDX 2.6.2.6.1: parent_linkage is required and holds a GUID.
        match loc.get("parent_linkage") {
            None => return Err(corrupt(S, "no parent_linkage")),
            Some(v) if guid::parse_braced(v).is_none() => {
                return Err(corrupt(S, "parent_linkage is not a GUID"))
            }
            Some(_) => {}
        }
        if let Some(v) = loc.get("parent_linkage2") {
            if guid::parse_braced(v).is_none() {
                return Err(corrupt(S, "parent_linkage2 is not a GUID"));
            }
        }
        Ok(loc)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parent's DataWriteGuid recorded as `parent_linkage`.
    pub fn parent_linkage(&self) -> Option<Uuid> {
        self.get("parent_linkage").and_then(guid::parse_braced)
    }

    /// The alternative parent DataWriteGuid (`parent_linkage2`), if any.
    pub fn parent_linkage2(&self) -> Option<Uuid> {
        self.get("parent_linkage2").and_then(guid::parse_braced)
    }

    /// `relative_path`, if any.
    pub fn relative_path(&self) -> Option<&str> {
        self.get("relative_path")
    }

    /// `volume_path`, if any.
    pub fn volume_path(&self) -> Option<&str> {
        self.get("volume_path")
    }

    /// `absolute_win32_path`, if any.
    pub fn absolute_win32_path(&self) -> Option<&str> {
        self.get("absolute_win32_path")
    }

    /// `true` if `id` matches `parent_linkage` or `parent_linkage2` (MS-VHDX 2.6.2.6.1).
    pub fn links_to(&self, id: &Uuid) -> bool {
        self.parent_linkage() == Some(*id) || self.parent_linkage2() == Some(*id)
    }

    /// A VHDX locator from key/value pairs.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        ParentLocator {
            locator_type: guid::VHDX_LOCATOR_TYPE,
            entries,
        }
    }

    /// Encodes the item.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let count = u16::try_from(self.entries.len())
            .map_err(|_| FormatError::unsupported(S, "too many entries"))?;
        let mut out = Vec::new();
        out.extend_from_slice(
            RawLocatorHeader {
                locator_type: guid::to_disk(&self.locator_type),
                reserved: U16::new(0),
                key_value_count: U16::new(count),
            }
            .as_bytes(),
        );
        let mut strings = Vec::new();
        let base = 20 + 12 * self.entries.len();
        let mut table = Vec::new();
        for (k, v) in &self.entries {
            let enc =
                |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
            let (kb, vb) = (enc(k), enc(v));
            let too_long = || FormatError::unsupported(S, "string too long");
            let ko = base + strings.len();
            strings.extend_from_slice(&kb);
            let vo = base + strings.len();
            strings.extend_from_slice(&vb);
            table.extend_from_slice(
                RawLocatorEntry {
                    key_offset: U32::new(u32::try_from(ko).map_err(|_| too_long())?),
                    value_offset: U32::new(u32::try_from(vo).map_err(|_| too_long())?),
                    key_length: U16::new(u16::try_from(kb.len()).map_err(|_| too_long())?),
                    value_length: U16::new(u16::try_from(vb.len()).map_err(|_| too_long())?),
                }
                .as_bytes(),
            );
        }
        out.extend_from_slice(&table);
        out.extend_from_slice(&strings);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ParentLocator {
        ParentLocator::new(vec![
            (
                "parent_linkage".into(),
                "{0A0B0C0D-0102-0304-0506-070809101112}".into(),
            ),
            ("relative_path".into(), "..\\base.vhdx".into()),
            ("absolute_win32_path".into(), "C:\\vm\\base.vhdx".into()),
        ])
    }

    #[test]
    fn round_trip_and_lookup() {
        let l = sample();
        let p = ParentLocator::parse(&l.to_bytes().unwrap()).unwrap();
        assert_eq!(p, l);
        assert_eq!(
            p.parent_linkage(),
            Some(uuid::uuid!("0a0b0c0d-0102-0304-0506-070809101112"))
        );
        assert!(p.links_to(&uuid::uuid!("0A0B0C0D-0102-0304-0506-070809101112")));
        assert_eq!(p.relative_path(), Some("..\\base.vhdx"));
        assert_eq!(p.volume_path(), None);
    }

    #[test]
    fn malformed_refused() {
        let good = sample().to_bytes().unwrap();
        // Count larger than the item.
        let mut b = good.clone();
        b[18..20].copy_from_slice(&1000u16.to_le_bytes());
        assert!(ParentLocator::parse(&b).is_err());
        // Key offset out of the item.
        let mut b = good.clone();
        b[20..24].copy_from_slice(&60000u32.to_le_bytes());
        assert!(ParentLocator::parse(&b).is_err());
        // Wrong type.
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(ParentLocator::parse(&b).is_err());
        // No parent_linkage.
        let l = ParentLocator::new(vec![("relative_path".into(), "x".into())]);
        assert!(ParentLocator::parse(&l.to_bytes().unwrap()).is_err());
        // Duplicate key.
        let mut l = sample();
        l.entries.push(("relative_path".into(), "y".into()));
        assert!(ParentLocator::parse(&l.to_bytes().unwrap()).is_err());
        // Truncated.
        assert!(ParentLocator::parse(&good[..10]).is_err());
    }
}
