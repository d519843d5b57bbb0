//! GUIDs in the Microsoft mixed-endian layout (MS-VHDX 1.3, MS-DTYP 2.3.4.2) and the
//! well-known GUIDs of MS-VHDX: region ids (2.2.3.1), metadata item ids (2.6.2) and the
//! parent locator type (2.6.2.6).
//!
//! On disk, Data1 is a little-endian u32, Data2 and Data3 little-endian u16s, Data4 eight raw
//! bytes: exactly [`Uuid::from_bytes_le`] / [`Uuid::to_bytes_le`].

use uuid::Uuid;

/// Reads a GUID stored in the Microsoft layout.
pub fn from_disk(bytes: [u8; 16]) -> Uuid {
    Uuid::from_bytes_le(bytes)
}

/// Encodes a GUID in the Microsoft layout.
pub fn to_disk(id: &Uuid) -> [u8; 16] {
    id.to_bytes_le()
}

/// BAT region (MS-VHDX 2.2.3.1).
pub const BAT_REGION: Uuid = uuid::uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Metadata region (MS-VHDX 2.2.3.1).
pub const METADATA_REGION: Uuid = uuid::uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");
/// File Parameters metadata item (MS-VHDX 2.6.2.1).
pub const FILE_PARAMETERS: Uuid = uuid::uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Virtual Disk Size metadata item (MS-VHDX 2.6.2.2).
pub const VIRTUAL_DISK_SIZE: Uuid = uuid::uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Virtual Disk ID (page 83 data) metadata item (MS-VHDX 2.6.2.3).
pub const VIRTUAL_DISK_ID: Uuid = uuid::uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Logical Sector Size metadata item (MS-VHDX 2.6.2.4).
pub const LOGICAL_SECTOR_SIZE: Uuid = uuid::uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Physical Sector Size metadata item (MS-VHDX 2.6.2.5).
pub const PHYSICAL_SECTOR_SIZE: Uuid = uuid::uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Parent Locator metadata item (MS-VHDX 2.6.2.6).
pub const PARENT_LOCATOR: Uuid = uuid::uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// The VHDX parent locator type (MS-VHDX 2.6.2.6.1).
pub const VHDX_LOCATOR_TYPE: Uuid = uuid::uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// Formats a GUID as Windows does in parent locators: `{xxxxxxxx-...}` lower-case.
pub fn braced(id: &Uuid) -> String {
    format!("{{{}}}", id.hyphenated())
}

/// Parses a GUID written with or without braces, in any case.
pub fn parse_braced(s: &str) -> Option<Uuid> {
    let t = s.trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    Uuid::parse_str(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_endian_layout() {
        let b = to_disk(&BAT_REGION);
        assert_eq!(&b[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(&b[4..6], &[0x23, 0xF6]);
        assert_eq!(&b[6..8], &[0x00, 0x42]);
        assert_eq!(&b[8..], &[0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
        assert_eq!(from_disk(b), BAT_REGION);
    }

    #[test]
    fn braced_round_trip() {
        let s = braced(&METADATA_REGION);
        assert_eq!(s, "{8b7ca206-4790-4b9a-b8fe-575f050f886e}");
        assert_eq!(parse_braced(&s.to_uppercase()), Some(METADATA_REGION));
        assert_eq!(parse_braced("{nope}"), None);
    }
}
