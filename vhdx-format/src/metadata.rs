//! The metadata region: its table and the six known items (MS-VHDX 2.6).
//!
//! The table (first 64 KiB of the region) holds "metadata", EntryCount (at most 2047) and
//! 32-byte entries {ItemId, Offset, Length, IsUser|IsVirtualDisk|IsRequired}. Items lie inside
//! the region past the table and do not overlap. Known system items: File Parameters, Virtual
//! Disk Size, Virtual Disk ID (page 83), Logical and Physical Sector Size, and the Parent
//! Locator (2.6.2). An unknown required item makes the file unopenable.

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{corrupt, FormatError};
use crate::guid;
use crate::locator::ParentLocator;

const S: &str = "metadata";
/// Size of the metadata table at the start of the region.
pub const TABLE_SIZE: usize = 64 * 1024;
/// MS-VHDX 2.6.1.1: at most 2047 entries.
pub const MAX_ENTRIES: u16 = 2047;
/// Largest known item this crate reads (a parent locator is a few hundred bytes).
pub const MAX_ITEM_LEN: u32 = 1 << 20;
/// MS-VHDX 2.6.2.2: the largest virtual disk, 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Smallest and largest block sizes (MS-VHDX 2.6.2.1).
pub const BLOCK_SIZE_RANGE: (u32, u32) = (1 << 20, 256 << 20);

/// Flag bits of a metadata entry.
pub const IS_USER: u32 = 1;
/// Flag: the item describes the virtual disk.
pub const IS_VIRTUAL_DISK: u32 = 2;
/// Flag: a reader must understand the item.
pub const IS_REQUIRED: u32 = 4;

/// On-disk metadata table header (32 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawMetadataHeader {
    /// "metadata".
    pub signature: [u8; 8],
    /// Reserved.
    pub reserved: U16,
    /// Number of entries.
    pub entry_count: U16,
    /// Reserved.
    pub reserved2: [u8; 20],
}

/// On-disk metadata table entry (32 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawMetadataEntry {
    /// Item id.
    pub item_id: [u8; 16],
    /// Offset from the start of the region (>= 64 KiB unless the length is 0).
    pub offset: U32,
    /// Item length.
    pub length: U32,
    /// IsUser, IsVirtualDisk, IsRequired.
    pub flags: U32,
    /// Reserved.
    pub reserved: U32,
}

/// A validated table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Item id.
    pub item_id: Uuid,
    /// Offset within the region.
    pub offset: u32,
    /// Length.
    pub length: u32,
    /// Flag bits.
    pub flags: u32,
}

/// Parses and validates the metadata table; `region_len` bounds the items.
pub fn parse_table(bytes: &[u8], region_len: u32) -> Result<Vec<MetadataEntry>, FormatError> {
    let (hdr, _) =
        RawMetadataHeader::read_from_prefix(bytes).map_err(|_| corrupt(S, "table too short"))?;
    if &hdr.signature != b"metadata" {
        return Err(corrupt(S, "signature is not \"metadata\""));
    }
    let count = hdr.entry_count.get();
    if count > MAX_ENTRIES {
        return Err(corrupt(S, format!("{count} entries (max {MAX_ENTRIES})")));
    }
    let mut out: Vec<MetadataEntry> = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let at = 32 + 32 * i;
        let (raw, _) = RawMetadataEntry::read_from_prefix(bytes.get(at..).unwrap_or(&[]))
            .map_err(|_| corrupt(S, "entry out of table"))?;
        let e = MetadataEntry {
            item_id: guid::from_disk(raw.item_id),
            offset: raw.offset.get(),
            length: raw.length.get(),
            flags: raw.flags.get(),
        };
        if e.length == 0 {
            // MS-VHDX 2.6.1.2: a zero-length item has offset 0.
            if e.offset != 0 {
                return Err(corrupt(S, "empty item with an offset"));
            }
        } else {
            // MS-VHDX 2.6.1.2: items lie past the table and inside the region.
            let end = u64::from(e.offset) + u64::from(e.length);
            if (e.offset as usize) < TABLE_SIZE || end > u64::from(region_len) {
                return Err(corrupt(
                    S,
                    format!("item {} lies outside the region", e.item_id),
                ));
            }
            if out.iter().any(|o| {
                o.length != 0
                    && u64::from(e.offset) < u64::from(o.offset) + u64::from(o.length)
                    && u64::from(o.offset) < end
            }) {
                return Err(corrupt(S, format!("item {} overlaps another", e.item_id)));
            }
        }
        if out
            .iter()
            .any(|o| o.item_id == e.item_id && (o.flags & IS_USER) == (e.flags & IS_USER))
        {
            return Err(corrupt(S, format!("item {} appears twice", e.item_id)));
        }
        out.push(e);
    }
    Ok(out)
}

/// The validated contents of the metadata region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size in bytes (power of two, 1..=256 MiB).
    pub block_size: u32,
    /// LeaveBlocksAllocated (fixed disks).
    pub leave_blocks_allocated: bool,
    /// HasParent (differencing disks).
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Virtual disk id (page 83 data).
    pub disk_id: Uuid,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
    /// Parent locator, present iff `has_parent`.
    pub parent_locator: Option<ParentLocator>,
    /// All entries of the table, known or not.
    pub entries: Vec<MetadataEntry>,
}

fn fixed<const N: usize>(item: &[u8], what: &str) -> Result<[u8; N], FormatError> {
    item.try_into().map_err(|_| {
        corrupt(
            S,
            format!("{what} item has length {} (want {N})", item.len()),
        )
    })
}

impl Metadata {
    /// Parses the region: `table` is its first 64 KiB, `read_item(offset, len)` reads bytes of
    /// the region (called only for known items, with `len <= MAX_ITEM_LEN`).
    pub fn parse(
        table: &[u8],
        region_len: u32,
        mut read_item: impl FnMut(u32, u32) -> Result<Vec<u8>, block_io::Error>,
    ) -> Result<Self, block_io::Error> {
        let entries = parse_table(table, region_len)?;
        let mut items: [Option<Vec<u8>>; 6] = Default::default();
        let known = [
            guid::FILE_PARAMETERS,
            guid::VIRTUAL_DISK_SIZE,
            guid::VIRTUAL_DISK_ID,
            guid::LOGICAL_SECTOR_SIZE,
            guid::PHYSICAL_SECTOR_SIZE,
            guid::PARENT_LOCATOR,
        ];
        for e in &entries {
            let slot = if e.flags & IS_USER == 0 {
                known.iter().position(|k| *k == e.item_id)
            } else {
                None
            };
            match slot {
                Some(i) => {
                    if e.length > MAX_ITEM_LEN {
                        return Err(corrupt(S, format!("item {} is too long", e.item_id)).into());
                    }
                    items[i] = Some(read_item(e.offset, e.length)?);
                }
                // MS-VHDX 2.6.1.2: unknown required items make the file unopenable.
                None if e.flags & IS_REQUIRED != 0 => {
                    return Err(FormatError::unsupported(
                        S,
                        format!("unknown required item {}", e.item_id),
                    )
                    .into())
                }
                None => {}
            }
        }
        let [fp, vs, id, ls, ps, pl] = items;
        let need = |x: Option<Vec<u8>>, what: &str| -> Result<Vec<u8>, FormatError> {
            x.ok_or_else(|| corrupt(S, format!("missing {what} item")))
        };
        let fp: [u8; 8] = fixed(&need(fp, "file parameters")?, "file parameters")?;
        let block_size = u32::from_le_bytes([fp[0], fp[1], fp[2], fp[3]]);
        let flags = u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]);
        // MS-VHDX 2.6.2.1: a power of two between 1 MiB and 256 MiB.
        if !block_size.is_power_of_two()
            || block_size < BLOCK_SIZE_RANGE.0
            || block_size > BLOCK_SIZE_RANGE.1
        {
            return Err(corrupt(S, format!("block size {block_size}")).into());
        }
        let virtual_size = u64::from_le_bytes(fixed(&need(vs, "virtual disk size")?, "size")?);
        let disk_id = guid::from_disk(fixed(&need(id, "virtual disk id")?, "disk id")?);
        let sector = |b: Vec<u8>, what: &str| -> Result<u32, FormatError> {
            let v = u32::from_le_bytes(fixed(&b, what)?);
            // MS-VHDX 2.6.2.4/2.6.2.5: 512 or 4096.
            if v == 512 || v == 4096 {
                Ok(v)
            } else {
                Err(corrupt(S, format!("{what} {v}")))
            }
        };
        let logical_sector_size = sector(need(ls, "logical sector size")?, "logical sector size")?;
        let physical_sector_size =
            sector(need(ps, "physical sector size")?, "physical sector size")?;
        // MS-VHDX 2.6.2.2: a multiple of the logical sector size, at most 64 TiB.
        if virtual_size == 0
            || virtual_size % u64::from(logical_sector_size) != 0
            || virtual_size > MAX_VIRTUAL_SIZE
        {
            return Err(corrupt(S, format!("virtual disk size {virtual_size}")).into());
        }
        let has_parent = flags & 2 != 0;
        let parent_locator = match (has_parent, pl) {
            (true, Some(b)) => Some(ParentLocator::parse(&b)?),
            (true, None) => return Err(corrupt(S, "differencing disk without a locator").into()),
            (false, _) => None,
        };
        Ok(Metadata {
            block_size,
            leave_blocks_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            disk_id,
            logical_sector_size,
            physical_sector_size,
            parent_locator,
            entries,
        })
    }

    /// Encodes the region contents (table plus items, items from 64 KiB on); the result is
    /// shorter than the region and the rest is zeros.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let mut fp = Vec::with_capacity(8);
        fp.extend_from_slice(&self.block_size.to_le_bytes());
        let flags = u32::from(self.leave_blocks_allocated) | (u32::from(self.has_parent) << 1);
        fp.extend_from_slice(&flags.to_le_bytes());
        let mut items: Vec<(Uuid, Vec<u8>, u32)> = vec![
            (guid::FILE_PARAMETERS, fp, IS_REQUIRED),
            (
                guid::VIRTUAL_DISK_SIZE,
                self.virtual_size.to_le_bytes().to_vec(),
                IS_REQUIRED | IS_VIRTUAL_DISK,
            ),
            (
                guid::VIRTUAL_DISK_ID,
                guid::to_disk(&self.disk_id).to_vec(),
                IS_REQUIRED | IS_VIRTUAL_DISK,
            ),
            (
                guid::LOGICAL_SECTOR_SIZE,
                self.logical_sector_size.to_le_bytes().to_vec(),
                IS_REQUIRED | IS_VIRTUAL_DISK,
            ),
            (
                guid::PHYSICAL_SECTOR_SIZE,
                self.physical_sector_size.to_le_bytes().to_vec(),
                IS_REQUIRED | IS_VIRTUAL_DISK,
            ),
        ];
        if let Some(l) = &self.parent_locator {
            items.push((guid::PARENT_LOCATOR, l.to_bytes()?, IS_REQUIRED));
        }
        let mut out = vec![0u8; TABLE_SIZE];
        let hdr = RawMetadataHeader {
            signature: *b"metadata",
            reserved: U16::new(0),
            entry_count: U16::new(items.len() as u16),
            reserved2: [0; 20],
        };
        out[..32].copy_from_slice(hdr.as_bytes());
        for (i, (id, data, flags)) in items.iter().enumerate() {
            let offset = out.len() as u32;
            let raw = RawMetadataEntry {
                item_id: guid::to_disk(id),
                offset: U32::new(offset),
                length: U32::new(data.len() as u32),
                flags: U32::new(*flags),
                reserved: U32::new(0),
            };
            out[32 + 32 * i..64 + 32 * i].copy_from_slice(raw.as_bytes());
            out.extend_from_slice(data);
            // Keep items 8-byte aligned, as Hyper-V does.
            while out.len() % 8 != 0 {
                out.push(0);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        Metadata {
            block_size: 32 << 20,
            leave_blocks_allocated: false,
            has_parent: false,
            virtual_size: 1 << 30,
            disk_id: Uuid::from_u128(77),
            logical_sector_size: 512,
            physical_sector_size: 4096,
            parent_locator: None,
            entries: vec![],
        }
    }

    fn parse(bytes: &[u8]) -> Result<Metadata, block_io::Error> {
        let mut region = bytes.to_vec();
        region.resize(1 << 20, 0);
        Metadata::parse(&region[..TABLE_SIZE], 1 << 20, |o, l| {
            Ok(region[o as usize..(o + l) as usize].to_vec())
        })
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let mut p = parse(&m.to_bytes().unwrap()).unwrap();
        assert_eq!(p.entries.len(), 5);
        p.entries.clear();
        assert_eq!(p, m);
    }

    #[test]
    fn invalid_values_refused() {
        for f in [
            |m: &mut Metadata| m.block_size = 3 << 20,
            |m: &mut Metadata| m.block_size = 512 << 20,
            |m: &mut Metadata| m.logical_sector_size = 1024,
            |m: &mut Metadata| m.virtual_size = 1000,
            |m: &mut Metadata| m.virtual_size = MAX_VIRTUAL_SIZE + 512,
            |m: &mut Metadata| m.has_parent = true,
        ] {
            let mut m = sample();
            f(&mut m);
            assert!(parse(&m.to_bytes().unwrap()).is_err());
        }
    }

    #[test]
    fn unknown_required_item_refused_optional_kept() {
        let good = sample().to_bytes().unwrap();
        let mut b = good.clone();
        // Sixth entry: unknown item.
        let raw = RawMetadataEntry {
            item_id: guid::to_disk(&Uuid::from_u128(5)),
            offset: U32::new(0),
            length: U32::new(0),
            flags: U32::new(IS_REQUIRED),
            reserved: U32::new(0),
        };
        b[10..12].copy_from_slice(&6u16.to_le_bytes());
        b[32 + 5 * 32..32 + 6 * 32].copy_from_slice(raw.as_bytes());
        assert_eq!(
            parse(&b).unwrap_err().kind(),
            block_io::ErrorKind::Unsupported
        );
        let opt = RawMetadataEntry {
            flags: U32::new(0),
            ..raw
        };
        b[32 + 5 * 32..32 + 6 * 32].copy_from_slice(opt.as_bytes());
        assert_eq!(parse(&b).unwrap().entries.len(), 6);
    }

    #[test]
    fn bad_tables_refused() {
        let good = sample().to_bytes().unwrap();
        let mut b = good.clone();
        b[10..12].copy_from_slice(&3000u16.to_le_bytes());
        assert!(parse(&b).is_err());
        let mut b = good.clone();
        b[0] = b'M';
        assert!(parse(&b).is_err());
        // First item moved into the table.
        let mut b = good.clone();
        b[48..52].copy_from_slice(&100u32.to_le_bytes());
        assert!(parse(&b).is_err());
        // Second item overlapping the first.
        let mut b = good.clone();
        let first = u32::from_le_bytes(b[48..52].try_into().unwrap());
        b[80..84].copy_from_slice(&first.to_le_bytes());
        assert!(parse(&b).is_err());
        // Item beyond the region.
        let mut b = good;
        b[48..52].copy_from_slice(&(2u32 << 20).to_le_bytes());
        assert!(parse(&b).is_err());
    }
}
