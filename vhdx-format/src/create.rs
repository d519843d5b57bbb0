//! Creating VHDX images: fixed, dynamic and differencing (MS-VHDX 2.1 layout), with qemu-img's
//! defaults.
//!
//! Layout (as qemu-img writes it): file identifier, two headers and two region tables in the
//! first MiB; the log at 1 MiB; the BAT after the log; the metadata region (1 MiB) after the
//! BAT; payload blocks after the metadata. Block size defaults follow qemu's `vhdx.c`: 8 MiB up
//! to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB above; a differencing layer
//! defaults to 2 MiB (as Hyper-V). The log defaults to 1 MiB, the logical sector to 512 bytes,
//! the physical sector to the logical one: 512/512 as qemu-img writes it, 4096/4096 as Hyper-V
//! writes a 4 KiB-sector disk. A physical sector smaller than the logical one is refused
//! ([`CreateError::PhysicalBelowLogical`]); opening an image made elsewhere that way is not.

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
    /// Physical sector size, 512 or 4096 and at least the logical sector size; `None` uses
    /// the logical sector size.
    pub physical_sector_size: Option<u32>,
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
            physical_sector_size: None,
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

/// Why [`create`] refused its options: the source of its [`ErrorKind::InvalidInput`] errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// A parent was given for a non-differencing image, or none for a differencing one.
    #[error("a parent is given exactly for differencing images")]
    ParentMismatch,
    /// The block size is not a power of two from 1 to 256 MiB (MS-VHDX 2.6.2.1).
    #[error("block size {0} is not a power of two from 1 to 256 MiB")]
    BlockSize(u32),
    /// A sector size is neither 512 nor 4096 (MS-VHDX 2.6.2.4, 2.6.2.5).
    #[error("sector size {0} is neither 512 nor 4096")]
    SectorSize(u32),
    /// The physical sector size is smaller than the logical one.
    #[error("physical sector size {physical} is smaller than the logical sector size {logical}")]
    PhysicalBelowLogical {
        /// The physical sector size asked for.
        physical: u32,
        /// The logical sector size.
        logical: u32,
    },
    /// The virtual size is zero, not a multiple of the logical sector or above 64 TiB
    /// (MS-VHDX 2.6.2.2).
    #[error("virtual size {size} is zero, not a multiple of {sector} or above 64 TiB")]
    VirtualSize {
        /// The virtual size asked for.
        size: u64,
        /// The logical sector size.
        sector: u32,
    },
    /// The log size is zero or not a multiple of 1 MiB (MS-VHDX 2.2.2).
    #[error("log size {0} is not a non-zero multiple of 1 MiB")]
    LogSize(u32),
    /// The BAT would not fit a region (its length is a u32).
    #[error("the BAT ({0} bytes) is too large for a region")]
    BatTooLarge(u64),
    /// The parent locator does not fit the 1 MiB metadata region.
    #[error("the parent paths are too long for the metadata region")]
    ParentPathsTooLong,
}

impl From<CreateError> for Error {
    fn from(e: CreateError) -> Self {
        Error::with_source(
            ErrorKind::InvalidInput,
            "invalid options for a new VHDX image",
            e,
        )
    }
}

impl<S: Storage> VhdxFile<S> {
    /// Creates an image on `storage` (which should be empty) and opens it writable: the same
    /// entry point as `vhd_format::VhdFile::create` (also reachable as the free [`create`]).
    pub fn create(storage: S, opts: &CreateOptions) -> Result<Self> {
        create(storage, opts)
    }
}

/// Creates an image on `storage` (which should be empty) and opens it writable.
pub fn create<S: Storage>(storage: S, opts: &CreateOptions) -> Result<VhdxFile<S>> {
    let diff = opts.subformat == Subformat::Differencing;
    if diff != opts.parent.is_some() {
        return Err(CreateError::ParentMismatch.into());
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
        return Err(CreateError::BlockSize(block_size).into());
    }
    let logical = opts.logical_sector_size;
    let physical = opts.physical_sector_size.unwrap_or(logical);
    for s in [logical, physical] {
        if s != 512 && s != 4096 {
            return Err(CreateError::SectorSize(s).into());
        }
    }
    // A physical sector holds whole logical sectors (Hyper-V makes 4096/4096, never 512
    // physical under 4096 logical).
    if physical < logical {
        return Err(CreateError::PhysicalBelowLogical { physical, logical }.into());
    }
    let ls = u64::from(logical);
    if opts.virtual_size == 0 || opts.virtual_size % ls != 0 || opts.virtual_size > MAX_VIRTUAL_SIZE
    {
        return Err(CreateError::VirtualSize {
            size: opts.virtual_size,
            sector: logical,
        }
        .into());
    }
    if opts.log_size == 0 || u64::from(opts.log_size) % MIB != 0 {
        return Err(CreateError::LogSize(opts.log_size).into());
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
    let bat_len32 = u32::try_from(bat_len).map_err(|_| CreateError::BatTooLarge(bat_len))?;
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
        physical_sector_size: physical,
        parent_locator: locator,
        entries: vec![],
    };
    let meta_bytes = meta.to_bytes()?;
    if meta_bytes.len() as u64 > MIB {
        return Err(CreateError::ParentPathsTooLong.into());
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
    VhdxFile::open(storage, &crate::OpenOptions::new().read_only(false))
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

    fn sector_sizes(logical: u32, physical: Option<u32>) -> Result<(u32, u32)> {
        let mut o = CreateOptions::dynamic(8 << 20);
        o.logical_sector_size = logical;
        o.physical_sector_size = physical;
        let f = create(block_io::MemStorage::new(), &o)?;
        let d = f.details();
        Ok((d.logical_sector_size, d.physical_sector_size))
    }

    #[test]
    fn physical_sector_defaults_to_logical_and_is_never_smaller() {
        // qemu-img's 512/512; Hyper-V's 4096/4096 (was 4096/512).
        assert_eq!(sector_sizes(512, None).unwrap(), (512, 512));
        assert_eq!(sector_sizes(4096, None).unwrap(), (4096, 4096));
        assert_eq!(sector_sizes(512, Some(4096)).unwrap(), (512, 4096));
        let e = sector_sizes(4096, Some(512)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let source = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<CreateError>())
            .cloned();
        assert_eq!(
            source,
            Some(CreateError::PhysicalBelowLogical {
                physical: 512,
                logical: 4096
            })
        );
        assert!(matches!(
            std::error::Error::source(&sector_sizes(512, Some(1024)).unwrap_err())
                .and_then(|s| s.downcast_ref::<CreateError>()),
            Some(CreateError::SectorSize(1024))
        ));
    }

    #[test]
    fn images_made_elsewhere_with_physical_below_logical_still_open() {
        // Rewrite the physical sector size item of a 4096/4096 image to 512: opening reports
        // what is on disk.
        let m = std::sync::Arc::new(block_io::MemStorage::new());
        let mut o = CreateOptions::dynamic(8 << 20);
        o.logical_sector_size = 4096;
        let f = create(m.clone(), &o).unwrap();
        let md = f.regions().metadata;
        f.close().unwrap();
        drop(f);
        let mut region = vec![0u8; md.length as usize];
        m.read_at(&mut region, md.file_offset).unwrap();
        let mut meta = Metadata::parse(&region[..64 * 1024], md.length, |off, len| {
            Ok(region[off as usize..(off + len) as usize].to_vec())
        })
        .unwrap();
        meta.physical_sector_size = 512;
        m.write_at(&meta.to_bytes().unwrap(), md.file_offset)
            .unwrap();
        let f = VhdxFile::open(m, &crate::OpenOptions::new().read_only(true)).unwrap();
        let d = f.details();
        assert_eq!((d.logical_sector_size, d.physical_sector_size), (4096, 512));
    }
}
