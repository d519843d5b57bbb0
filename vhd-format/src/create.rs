//! Creating images (VHD spec 1.0, "Creating a Hard Disk" and the CHS appendix): fixed,
//! dynamic and differencing.
//!
//! Sizes: by default the current size is exactly the size asked (rounded up to a sector), as
//! Hyper-V and Azure expect, and the CHS geometry is computed from it with the spec's
//! algorithm. With `chs_size` the size is rounded up to what the geometry addresses, as
//! Virtual PC and qemu (without `force_size`) do. A fixed image is the data plus 512 bytes,
//! so a whole-MiB size gives the file Azure accepts.
//!
//! The creator application defaults to "win ": readers such as qemu take the size from the
//! CHS geometry unless the creator is one they know uses the current size ("win ", "qem2",
//! "d2v ", ...), and this crate, like Hyper-V, always means the current size.
//!
//! Differencing layers get the parent's unique id, timestamp and UTF-16BE name, and W2ku
//! (absolute) and W2ru (relative) locators written the way Hyper-V writes them: UTF-16LE, the
//! data space in bytes, each in its own sector-aligned area before the first block.

use block_io::{Error, ErrorKind, Result, Storage};
use uuid::Uuid;

use crate::details::VhdDetails;
use crate::error::invalid_input;
use crate::file::VhdFile;
use crate::footer::{
    vhd_timestamp_now, DiskType, Footer, Geometry, FOOTER_SIZE, MAX_CHS_SECTORS, MAX_VIRTUAL_SIZE,
};
use crate::header::{
    DynamicHeader, DEFAULT_BLOCK_SIZE, HEADER_SIZE, MAX_BLOCK_SIZE, MAX_TABLE_ENTRIES,
    MIN_BLOCK_SIZE,
};
use crate::locator::hyper_v_locators;

/// Fixed or dynamic (qemu-img's `subformat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// All data preallocated, then the footer.
    Fixed,
    /// Sparse, blocks allocated on first write.
    Dynamic,
}

/// Who the footer says created the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creator {
    /// Creator application (default "win ").
    pub app: [u8; 4],
    /// Creator version (default 0x000a0000).
    pub version: u32,
    /// Creator host OS (default "Wi2k").
    pub os: [u8; 4],
}

impl Default for Creator {
    fn default() -> Self {
        Creator {
            app: *b"win ",
            version: 0x000a_0000,
            os: *b"Wi2k",
        }
    }
}

/// Options for [`VhdFile::create`], mirroring qemu-img's `-o` options for `vpc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// `subformat=fixed|dynamic`.
    pub subformat: Subformat,
    /// `block_size` of a dynamic image (power of two, 512 B..256 MiB; default 2 MiB).
    pub block_size: u32,
    /// `chs_size=on`: round the size up to the CHS geometry, like Virtual PC.
    pub chs_size: bool,
    /// Unique id (random when `None`).
    pub unique_id: Option<Uuid>,
    /// Timestamp in seconds since 2000-01-01 (now when `None`).
    pub timestamp: Option<u32>,
    /// Creator fields.
    pub creator: Creator,
}

impl CreateOptions {
    /// Options for a `size`-byte image of `subformat`, with defaults otherwise.
    pub fn new(size: u64, subformat: Subformat) -> Self {
        CreateOptions {
            size,
            subformat,
            block_size: DEFAULT_BLOCK_SIZE,
            chs_size: false,
            unique_id: None,
            timestamp: None,
            creator: Creator::default(),
        }
    }
}

/// Options for [`VhdFile::create_differencing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DifferencingOptions {
    /// Virtual size (the parent's).
    pub size: u64,
    /// Block size (default 2 MiB).
    pub block_size: u32,
    /// The parent's unique id (from its footer).
    pub parent_unique_id: Uuid,
    /// The parent's footer timestamp.
    pub parent_timestamp: u32,
    /// Parent name stored in the header (UTF-16BE, at most 256 code units); Hyper-V stores
    /// the absolute path.
    pub parent_name: String,
    /// Absolute path for the W2ku locator.
    pub absolute_path: Option<String>,
    /// Relative path for the W2ru locator (e.g. `.\parent.vhd`).
    pub relative_path: Option<String>,
    /// Unique id (random when `None`).
    pub unique_id: Option<Uuid>,
    /// Timestamp (now when `None`).
    pub timestamp: Option<u32>,
    /// Creator fields.
    pub creator: Creator,
}

impl DifferencingOptions {
    /// Options for a child of the parent described by `parent` (its details), named
    /// `parent_name`, with optional absolute and relative locator paths.
    pub fn for_parent(
        parent: &VhdDetails,
        parent_name: impl Into<String>,
        absolute_path: Option<String>,
        relative_path: Option<String>,
    ) -> Self {
        DifferencingOptions {
            size: parent.virtual_size,
            block_size: parent.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            parent_unique_id: parent.unique_id,
            parent_timestamp: parent.timestamp,
            parent_name: parent_name.into(),
            absolute_path,
            relative_path,
            unique_id: None,
            timestamp: None,
            creator: Creator::default(),
        }
    }
}

/// The size and geometry an image of `size` bytes gets.
pub fn size_and_geometry(size: u64, chs_size: bool) -> Result<(u64, Geometry)> {
    let size = size
        .checked_next_multiple_of(512)
        .filter(|&s| s > 0 && s <= MAX_VIRTUAL_SIZE)
        .ok_or_else(|| invalid_input(format!("VHD size {size} must be 1 B..2040 GiB")))?;
    if chs_size {
        let g = Geometry::covering(size);
        if g.sectors() < MAX_CHS_SECTORS {
            return Ok((g.size(), g));
        }
        // Like qemu: beyond the largest geometry the exact size is used.
        return Ok((size, g));
    }
    Ok((size, Geometry::for_sectors(size / 512)))
}

fn make_footer(
    size: u64,
    geometry: Geometry,
    disk_type: DiskType,
    unique_id: Option<Uuid>,
    timestamp: Option<u32>,
    creator: Creator,
) -> Footer {
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: (disk_type != DiskType::Fixed).then_some(FOOTER_SIZE as u64),
        timestamp: timestamp.unwrap_or_else(vhd_timestamp_now),
        creator_app: creator.app,
        creator_version: creator.version,
        creator_os: creator.os,
        original_size: size,
        current_size: size,
        geometry,
        disk_type,
        unique_id: unique_id.unwrap_or_else(Uuid::new_v4),
        saved_state: false,
    }
}

fn check_block_size(bs: u32) -> Result<()> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        Ok(())
    } else {
        Err(invalid_input(format!(
            "block size {bs} must be a power of two between 512 B and 256 MiB"
        )))
    }
}

/// A header for `block_size` with no parent; [`write_dynamic`] fills in the BAT and locators.
fn blank_header(block_size: u32) -> DynamicHeader {
    DynamicHeader {
        table_offset: 0,
        max_table_entries: 0,
        block_size,
        parent_unique_id: Uuid::nil(),
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Vec::new(),
    }
}

/// Writes a dynamic or differencing image: footer copy, header, BAT, the W2ku
/// (`absolute_path`) and W2ru (`relative_path`) locator data, footer. Nothing is written when
/// an argument is refused.
fn write_dynamic<S: Storage>(
    storage: &S,
    footer: &Footer,
    mut header: DynamicHeader,
    absolute_path: Option<&str>,
    relative_path: Option<&str>,
) -> Result<()> {
    let entries = footer.current_size.div_ceil(u64::from(header.block_size));
    let entries = u32::try_from(entries)
        .ok()
        .filter(|&e| e <= MAX_TABLE_ENTRIES)
        .ok_or_else(|| invalid_input("too many blocks; use a larger block size"))?;
    header.max_table_entries = entries;
    header.table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
    let bat_len = (u64::from(entries) * 4).div_ceil(512) * 512;
    let pos = header.table_offset + bat_len;
    let (locators, locator_data) = hyper_v_locators(absolute_path, relative_path, pos)?;
    header.locators = locators;
    let hb = header
        .to_bytes()
        .map_err(|e| invalid_input(e.to_string()))?;
    let fb = footer.to_bytes();
    storage.set_len(0)?;
    storage.write_at(&fb, 0)?;
    storage.write_at(&hb, FOOTER_SIZE as u64)?;
    let bat = vec![0xFFu8; usize::try_from(bat_len).map_err(|_| invalid_input("BAT too large"))?];
    storage.write_at(&bat, header.table_offset)?;
    if !locator_data.is_empty() {
        storage.write_at(&locator_data, pos)?;
    }
    storage.write_at(&fb, pos + locator_data.len() as u64)?;
    storage.sync_data()
}

impl<S: Storage> VhdFile<S> {
    /// Creates a fixed or dynamic image in `storage` (its old contents are discarded) and
    /// opens it writable.
    pub fn create(storage: S, opts: &CreateOptions) -> Result<Self> {
        let (size, geometry) = size_and_geometry(opts.size, opts.chs_size)?;
        let disk_type = match opts.subformat {
            Subformat::Fixed => DiskType::Fixed,
            Subformat::Dynamic => DiskType::Dynamic,
        };
        let footer = make_footer(
            size,
            geometry,
            disk_type,
            opts.unique_id,
            opts.timestamp,
            opts.creator,
        );
        match opts.subformat {
            Subformat::Fixed => {
                storage.set_len(0)?;
                storage.set_len(size)?;
                storage.write_at(&footer.to_bytes(), size)?;
                storage.sync_data()?;
            }
            Subformat::Dynamic => {
                check_block_size(opts.block_size)?;
                let header = blank_header(opts.block_size);
                write_dynamic(&storage, &footer, header, None, None)?;
            }
        }
        VhdFile::open(storage, &crate::OpenOptions::new().read_only(false))
    }

    /// Creates a differencing image in `storage` and opens it writable. The parent is never
    /// opened: its identity comes from `opts`.
    pub fn create_differencing(storage: S, opts: &DifferencingOptions) -> Result<Self> {
        check_block_size(opts.block_size)?;
        let (size, geometry) = size_and_geometry(opts.size, false)?;
        if size != opts.size {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "a differencing image must have its parent's (sector-multiple) size",
            ));
        }
        let footer = make_footer(
            size,
            geometry,
            DiskType::Differencing,
            opts.unique_id,
            opts.timestamp,
            opts.creator,
        );
        let header = DynamicHeader {
            parent_unique_id: opts.parent_unique_id,
            parent_timestamp: opts.parent_timestamp,
            parent_name: opts.parent_name.clone(),
            ..blank_header(opts.block_size)
        };
        let (absolute, relative) = (opts.absolute_path.as_deref(), opts.relative_path.as_deref());
        write_dynamic(&storage, &footer, header, absolute, relative)?;
        VhdFile::open(storage, &crate::OpenOptions::new().read_only(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_io::{BlockDevice, MemStorage};
    use std::sync::Arc;

    #[test]
    fn azure_fixed_is_size_plus_512() {
        let st = Arc::new(MemStorage::new());
        let f =
            VhdFile::create(st.clone(), &CreateOptions::new(16 << 20, Subformat::Fixed)).unwrap();
        assert_eq!(st.len().unwrap(), (16 << 20) + 512);
        let d = f.details();
        assert!(d.is_azure_compatible());
        assert_eq!(d.virtual_size, 16 << 20);
        assert_eq!(f.info().virtual_size, 16 << 20);
    }

    #[test]
    fn sizes_exact_or_chs() {
        assert_eq!(size_and_geometry(1000, false).unwrap().0, 1024);
        let (s, g) = size_and_geometry(1 << 30, true).unwrap();
        assert_eq!(s, 1_073_995_776);
        assert_eq!(g.size(), s);
        let (s, g) = size_and_geometry(1 << 30, false).unwrap();
        assert_eq!(s, 1 << 30);
        assert!(g.size() <= s);
        assert!(size_and_geometry(0, false).is_err());
        assert!(size_and_geometry(MAX_VIRTUAL_SIZE + 512, false).is_err());
        // Beyond the largest geometry the exact size is kept.
        let big = 200u64 << 30;
        assert_eq!(size_and_geometry(big, true).unwrap().0, big);
    }

    #[test]
    fn dynamic_layout_like_qemu() {
        let st = Arc::new(MemStorage::new());
        VhdFile::create(
            st.clone(),
            &CreateOptions::new(10 << 20, Subformat::Dynamic),
        )
        .unwrap();
        let b = st.to_vec().unwrap();
        // Footer copy, header at 512, BAT at 1536 (5 entries in one sector), footer.
        assert_eq!(b.len(), 512 + 1024 + 512 + 512);
        assert_eq!(&b[..8], b"conectix");
        assert_eq!(&b[512..520], b"cxsparse");
        assert_eq!(&b[1536..1556], &[0xFF; 20]);
        assert_eq!(&b[..512], &b[2048..]);
        // New blocks' data starts on a 4 KiB boundary.
        let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        for off in [0u64, 5 << 20, 3 << 20] {
            f.write_at(&[1u8; 512], off).unwrap();
            let run = f.block_status(off, 512).unwrap();
            assert_eq!(run.file_offset.unwrap() % 4096, 0, "{run:?}");
        }
    }

    #[test]
    fn differencing_locators_hyper_v_style() {
        let st = Arc::new(MemStorage::new());
        let o = DifferencingOptions {
            size: 4 << 20,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_unique_id: Uuid::from_bytes([4; 16]),
            parent_timestamp: 77,
            parent_name: "C:\\p.vhd".into(),
            absolute_path: Some("C:\\p.vhd".into()),
            relative_path: Some(".\\p.vhd".into()),
            unique_id: None,
            timestamp: None,
            creator: Creator::default(),
        };
        let f = VhdFile::create_differencing(st.clone(), &o).unwrap();
        let d = f.details();
        assert_eq!(d.parent_timestamp, Some(77));
        assert_eq!(d.locators.len(), 2);
        let w2ru = &d.locators[1];
        assert_eq!(w2ru.platform_code, "W2ru");
        assert_eq!(w2ru.path.as_deref(), Some(".\\p.vhd"));
        // UTF-16LE data, data space in bytes.
        assert_eq!(w2ru.entry.data_length, 14);
        assert_eq!(w2ru.entry.data_space, 512);
        let b = st.to_vec().unwrap();
        let off = w2ru.entry.data_offset as usize;
        assert_eq!(&b[off..off + 4], &[b'.', 0, b'\\', 0]);
        // A wrong size is refused.
        let bad = DifferencingOptions { size: 1000, ..o };
        assert!(VhdFile::create_differencing(MemStorage::new(), &bad).is_err());
    }
}
