//! Creating VHDX images: fixed, dynamic and differencing (MS-VHDX 2.1 layout), with qemu-img's
//! defaults.
//!
//! Layout (as qemu-img writes it): file identifier, two headers and two region tables in the
//! first MiB; the log at 1 MiB; the BAT after the log; the metadata region (1 MiB) after the
//! BAT; payload blocks after the metadata. Block size defaults follow qemu's `vhdx.c`: 8 MiB up
//! to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB above; a differencing layer
//! defaults to 2 MiB (as Hyper-V). The log defaults to 1 MiB, sectors to 512 bytes (logical and
//! physical, as qemu-img writes them).

use block_io::{Error, ErrorKind, Result, Storage};
use uuid::Uuid;

use crate::bat::{state, BatEntry, Geometry};
use crate::file::{Subformat, VhdxFile};
use crate::file_id::FileIdentifier;
use crate::guid;
use crate::header::{Header, HEADER_OFFSETS, MIB};
use crate::locator::ParentLocator;
use crate::metadata::{Metadata, BLOCK_SIZE_RANGE, MAX_VIRTUAL_SIZE};
use crate::region::{Region, RegionTable, REGION_TABLE_OFFSETS};

/// The parent of a differencing layer, as the child records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// The parent's DataWriteGuid (written as `parent_linkage`).
    pub data_write_guid: Uuid,
    /// Path of the parent relative to the child's folder (`relative_path`).
    pub relative_path: String,
    /// Absolute path of the parent (`absolute_win32_path`), if known.
    pub absolute_path: Option<String>,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of the logical sector size, at most 64 TiB).
    pub virtual_size: u64,
    /// Fixed or dynamic; `Differencing` needs `parent`.
    pub subformat: Subformat,
    /// Block size in bytes; `None` picks qemu-img's default for the size.
    pub block_size: Option<u32>,
    /// Log size in bytes (multiple of 1 MiB, default 1 MiB).
    pub log_size: u32,
    /// Dynamic images: mark blocks ZERO instead of NOT_PRESENT (qemu's `block_state_zero`).
    pub block_state_zero: bool,
    /// Logical sector size, 512 or 4096.
    pub logical_sector_size: u32,
    /// Physical sector size, 512 or 4096.
    pub physical_sector_size: u32,
    /// The parent, for a differencing layer.
    pub parent: Option<ParentRef>,
    /// Virtual disk id; `None` makes a random one.
    pub disk_id: Option<Uuid>,
}

impl CreateOptions {
    /// A dynamic image of `virtual_size` bytes with qemu-img's defaults.
    pub fn dynamic(virtual_size: u64) -> Self {
        CreateOptions {
            virtual_size,
            subformat: Subformat::Dynamic,
            block_size: None,
            log_size: MIB as u32,
            block_state_zero: false,
            logical_sector_size: 512,
            physical_sector_size: 512,
            parent: None,
            disk_id: None,
        }
    }

    /// A fixed image of `virtual_size` bytes.
    pub fn fixed(virtual_size: u64) -> Self {
        CreateOptions {
            subformat: Subformat::Fixed,
            ..CreateOptions::dynamic(virtual_size)
        }
    }

    /// A differencing layer over `parent` (pass the parent's size and sector sizes).
    pub fn differencing(virtual_size: u64, parent: ParentRef) -> Self {
        CreateOptions {
            subformat: Subformat::Differencing,
            parent: Some(parent),
            ..CreateOptions::dynamic(virtual_size)
        }
    }
}

/// qemu-img's default block size for a dynamic or fixed image of `size` bytes.
pub fn default_block_size(size: u64) -> u32 {
    if size > 32 << 40 {
        64 << 20
    } else if size > 100 << 30 {
        32 << 20
    } else if size > 1 << 30 {
        16 << 20
    } else {
        8 << 20
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, msg.into())
}

/// Creates an image on `storage` (which should be empty) and opens it writable.
pub fn create<S: Storage>(storage: S, opts: &CreateOptions) -> Result<VhdxFile<S>> {
    let diff = opts.subformat == Subformat::Differencing;
    if diff != opts.parent.is_some() {
        return Err(invalid("a parent is given exactly for differencing images"));
    }
    let block_size = opts.block_size.unwrap_or(if diff {
        2 << 20
    } else {
        default_block_size(opts.virtual_size)
    });
    if !block_size.is_power_of_two()
        || block_size < BLOCK_SIZE_RANGE.0
        || block_size > BLOCK_SIZE_RANGE.1
    {
        return Err(invalid(format!(
            "block size {block_size} (1..256 MiB, power of two)"
        )));
    }
    for s in [opts.logical_sector_size, opts.physical_sector_size] {
        if s != 512 && s != 4096 {
            return Err(invalid(format!("sector size {s} (512 or 4096)")));
        }
    }
    let ls = u64::from(opts.logical_sector_size);
    if opts.virtual_size == 0 || opts.virtual_size % ls != 0 || opts.virtual_size > MAX_VIRTUAL_SIZE
    {
        return Err(invalid(format!(
            "virtual size {} (a multiple of {ls}, at most 64 TiB)",
            opts.virtual_size
        )));
    }
    if opts.log_size == 0 || u64::from(opts.log_size) % MIB != 0 {
        return Err(invalid("log size must be a non-zero multiple of 1 MiB"));
    }
    let geo = Geometry::new(
        block_size,
        opts.logical_sector_size,
        opts.virtual_size,
        diff,
    )?;
    let log_offset = MIB;
    let bat_offset = log_offset + u64::from(opts.log_size);
    let bat_len = geo.bat_bytes().max(MIB);
    let bat_len32 = u32::try_from(bat_len).map_err(|_| invalid("BAT too large"))?;
    let meta_offset = bat_offset + bat_len;
    let data_offset = meta_offset + MIB;

    let locator = opts.parent.as_ref().map(|p| {
        let mut entries = vec![
            (
                "parent_linkage".to_string(),
                guid::braced(&p.data_write_guid),
            ),
            ("relative_path".to_string(), p.relative_path.clone()),
        ];
        if let Some(a) = &p.absolute_path {
            entries.push(("absolute_win32_path".to_string(), a.clone()));
        }
        ParentLocator::new(entries)
    });
    let meta = Metadata {
        block_size,
        leave_blocks_allocated: opts.subformat == Subformat::Fixed,
        has_parent: diff,
        virtual_size: opts.virtual_size,
        disk_id: opts.disk_id.unwrap_or_else(Uuid::new_v4),
        logical_sector_size: opts.logical_sector_size,
        physical_sector_size: opts.physical_sector_size,
        parent_locator: locator,
        entries: vec![],
    };
    let meta_bytes = meta.to_bytes()?;
    if meta_bytes.len() as u64 > MIB {
        return Err(invalid("parent paths too long for the metadata region"));
    }
    let regions = RegionTable {
        bat: Region {
            guid: guid::BAT_REGION,
            file_offset: bat_offset,
            length: bat_len32,
            required: true,
        },
        metadata: Region {
            guid: guid::METADATA_REGION,
            file_offset: meta_offset,
            length: MIB as u32,
            required: true,
        },
        other: vec![],
    };

    let mut file_len = data_offset;
    let mut bat = vec![0u8; (geo.total_entries * 8) as usize];
    for b in 0..geo.data_blocks {
        let i = geo.payload_index(b) as usize;
        let e = match opts.subformat {
            Subformat::Fixed => {
                let at = data_offset + b * u64::from(block_size);
                file_len = at + u64::from(block_size);
                BatEntry::encode(state::FULLY_PRESENT, at)
            }
            Subformat::Dynamic if opts.block_state_zero => BatEntry::encode(state::ZERO, 0),
            _ => BatEntry::encode(state::NOT_PRESENT, 0),
        };
        bat[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }

    storage.set_len(0)?;
    storage.set_len(file_len)?;
    let id = FileIdentifier {
        creator: format!("vdisk vhdx-format {}", env!("CARGO_PKG_VERSION")),
    };
    storage.write_at(&id.to_bytes(), 0)?;
    let table = regions.to_bytes();
    for off in REGION_TABLE_OFFSETS {
        storage.write_at(&table, off)?;
    }
    storage.write_at(&meta_bytes, meta_offset)?;
    storage.write_at(&bat, bat_offset)?;
    let data_write_guid = Uuid::new_v4();
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let h = Header {
            sequence_number: i as u64,
            file_write_guid: Uuid::new_v4(),
            data_write_guid,
            log_guid: Uuid::nil(),
            log_length: opts.log_size,
            log_offset,
        };
        storage.write_at(&h.to_bytes(), *off)?;
    }
    storage.sync_data()?;
    VhdxFile::open(storage, false)
}

/// Creates an image file at `path` (replacing any file there) and opens it writable.
pub fn create_file(
    path: impl AsRef<std::path::Path>,
    opts: &CreateOptions,
) -> Result<VhdxFile<block_io::FileStorage>> {
    create(block_io::FileStorage::create(path)?, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_block_sizes_follow_qemu() {
        assert_eq!(default_block_size(1 << 30), 8 << 20);
        assert_eq!(default_block_size((1 << 30) + 512), 16 << 20);
        assert_eq!(default_block_size(100 << 30), 16 << 20);
        assert_eq!(default_block_size(200 << 30), 32 << 20);
        assert_eq!(default_block_size(33 << 40), 64 << 20);
    }

    #[test]
    fn bad_options_refused() {
        let m = block_io::MemStorage::new();
        let mut o = CreateOptions::dynamic(1 << 20);
        o.block_size = Some(3 << 20);
        assert!(create(m.clone(), &o).is_err());
        let mut o = CreateOptions::dynamic(1000);
        o.block_size = Some(1 << 20);
        assert!(create(m.clone(), &o).is_err());
        let o = CreateOptions {
            subformat: Subformat::Differencing,
            ..CreateOptions::dynamic(1 << 20)
        };
        assert!(create(m, &o).is_err());
    }
}
