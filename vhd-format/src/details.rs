//! [`VhdDetails`]: the format facts of an image for `info`-style output (VHD spec 1.0 footer
//! and dynamic header fields, decoded). The parent of a differencing image is never opened.

use block_io::{Result, Storage};
use uuid::Uuid;

use crate::file::VhdFile;
use crate::footer::{DiskType, Geometry, VHD_EPOCH_UNIX};
use crate::layout::{read_exact, FooterSource};
use crate::locator::{ascii_text, LocatorEntry};

/// One parent locator, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatorDetails {
    /// Platform code as text ("W2ku", "W2ru", "Wi2k", "Wi2r", "MacX", ...).
    pub platform_code: String,
    /// The raw entry.
    pub entry: LocatorEntry,
    /// Decoded path (or URL), when the platform has a text form and the data could be read.
    pub path: Option<String>,
}

/// Format facts of a VHD image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdDetails {
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// Virtual size in bytes (the footer's current size).
    pub virtual_size: u64,
    /// Size at creation.
    pub original_size: u64,
    /// Stored CHS geometry.
    pub geometry: Geometry,
    /// Bytes the geometry addresses (what Virtual PC would use as the size).
    pub chs_size: u64,
    /// Creator application, e.g. "win ", "qemu".
    pub creator_app: String,
    /// Creator version as (major, minor).
    pub creator_version: (u16, u16),
    /// Creator host OS, e.g. "Wi2k".
    pub creator_os: String,
    /// Unique id.
    pub unique_id: Uuid,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Saved-state flag.
    pub saved_state: bool,
    /// Which footer was used.
    pub footer_source: FooterSource,
    /// Why the footer at the end was not used, when it was not.
    pub end_footer_error: Option<String>,
    /// Block size (dynamic and differencing).
    pub block_size: Option<u32>,
    /// BAT entries (dynamic and differencing).
    pub max_table_entries: Option<u32>,
    /// Allocated blocks (dynamic and differencing).
    pub allocated_blocks: Option<u64>,
    /// Parent name (differencing).
    pub parent_name: Option<String>,
    /// Parent unique id (differencing).
    pub parent_unique_id: Option<Uuid>,
    /// Parent timestamp (differencing).
    pub parent_timestamp: Option<u32>,
    /// Parent locators (differencing).
    pub locators: Vec<LocatorDetails>,
}

impl VhdDetails {
    /// The subformat name: "fixed", "dynamic" or "differencing".
    pub fn subformat(&self) -> &'static str {
        self.disk_type.as_str()
    }

    /// A VHD timestamp as seconds since the Unix epoch.
    pub fn unix_time(vhd_timestamp: u32) -> u64 {
        u64::from(vhd_timestamp) + VHD_EPOCH_UNIX
    }

    /// `true` for a fixed image Azure accepts: a whole number of MiB.
    pub fn is_azure_compatible(&self) -> bool {
        self.disk_type == DiskType::Fixed && self.virtual_size % (1 << 20) == 0
    }
}

impl<S: Storage> VhdFile<S> {
    /// The image's format facts. A parent locator whose bytes cannot be read or decoded is
    /// listed with no path.
    pub fn details(&self) -> VhdDetails {
        let f = &self.footer;
        let mut d = VhdDetails {
            disk_type: f.disk_type,
            virtual_size: f.current_size,
            original_size: f.original_size,
            geometry: f.geometry,
            chs_size: f.geometry.size(),
            creator_app: ascii_text(&f.creator_app),
            creator_version: ((f.creator_version >> 16) as u16, f.creator_version as u16),
            creator_os: ascii_text(&f.creator_os),
            unique_id: f.unique_id,
            timestamp: f.timestamp,
            saved_state: f.saved_state,
            footer_source: self.source,
            end_footer_error: self.end_footer_error.clone(),
            block_size: None,
            max_table_entries: None,
            allocated_blocks: None,
            parent_name: None,
            parent_unique_id: None,
            parent_timestamp: None,
            locators: Vec::new(),
        };
        let Some(dy) = &self.dynamic else {
            return d;
        };
        let h = &dy.header;
        d.block_size = Some(h.block_size);
        d.max_table_entries = Some(h.max_table_entries);
        d.allocated_blocks = Some(dy.bat.allocated().count() as u64);
        if f.disk_type != DiskType::Differencing {
            return d;
        }
        d.parent_name = Some(h.parent_name.clone());
        d.parent_unique_id = Some(h.parent_unique_id);
        d.parent_timestamp = Some(h.parent_timestamp);
        for l in &h.locators {
            // Length bounded and inside the file (checked at open).
            let path = read_exact(
                self.storage(),
                l.data_length as usize,
                l.data_offset,
                "parent locator",
            )
            .ok()
            .and_then(|data| l.platform.decode(&data));
            d.locators.push(LocatorDetails {
                platform_code: l.platform.as_string(),
                entry: *l,
                path,
            });
        }
        d
    }
}

/// Opens `storage` read-only and returns its details.
pub fn read_details<S: Storage>(storage: S) -> Result<VhdDetails> {
    Ok(VhdFile::open(storage, &crate::OpenOptions::new().read_only(true))?.details())
}
