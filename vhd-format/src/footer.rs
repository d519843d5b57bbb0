//! The hard disk footer (VHD spec 1.0, "Hard Disk Footer Format"): 512 bytes at the end of
//! every image, and a copy at offset 0 of dynamic and differencing images.
//!
//! [`RawFooter`] is the on-disk layout (big-endian); [`Footer`] is the validated domain type
//! made by `TryFrom`. Also here: the footer checksum, the CHS geometry algorithm of the spec's
//! appendix ("CHS Calculation") and the VHD timestamp epoch (2000-01-01 UTC).

use uuid::Uuid;
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::error::FormatError;

/// Size of the footer in bytes.
pub const FOOTER_SIZE: usize = 512;
/// The footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Data offset of a fixed disk (no dynamic header).
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;
/// Largest number of sectors CHS can express (65535 cylinders, 16 heads, 255 sectors).
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Largest virtual size this crate accepts (2040 GiB, the limit of the 32-bit BAT sector
/// offsets with 2 MiB blocks that Hyper-V and qemu also apply).
pub const MAX_VIRTUAL_SIZE: u64 = 2040 * 1024 * 1024 * 1024;

/// The footer as stored (VHD spec 1.0, "Hard Disk Footer Format"), all fields big-endian.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawFooter {
    /// "conectix".
    pub cookie: [u8; 8],
    /// Feature bits; 0x2 (reserved) is always set.
    pub features: U32,
    /// File format version, 0x00010000.
    pub version: U32,
    /// Offset of the dynamic header; all ones for fixed disks.
    pub data_offset: U64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: U32,
    /// Creator application ("win ", "qemu", "vpc ", ...).
    pub creator_app: [u8; 4],
    /// Creator version (major << 16 | minor).
    pub creator_version: U32,
    /// Creator host OS ("Wi2k", "Mac ").
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: U64,
    /// Current virtual size in bytes.
    pub current_size: U64,
    /// Cylinders.
    pub cylinders: U16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: U32,
    /// One's complement of the byte sum with this field zeroed.
    pub checksum: U32,
    /// Unique id.
    pub unique_id: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
    /// Zeros.
    pub reserved: [u8; 427],
}

const _: () = assert!(std::mem::size_of::<RawFooter>() == FOOTER_SIZE);

/// The kind of a VHD image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskType {
    /// Fixed: the data, then the footer.
    Fixed,
    /// Dynamic (sparse): footer copy, dynamic header, BAT, blocks, footer.
    Dynamic,
    /// Differencing: a dynamic layer over a parent image.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The qemu-style subformat name ("fixed", "dynamic", "differencing").
    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// Cylinder/head/sector geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// Number of sectors the geometry addresses.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// Bytes the geometry addresses (what Virtual PC takes as the disk size).
    pub fn size(self) -> u64 {
        self.sectors() * 512
    }

    /// The geometry for `total_sectors` by the spec's algorithm (appendix "CHS Calculation"),
    /// which rounds down.
    pub fn for_sectors(total_sectors: u64) -> Self {
        let total = total_sectors.min(MAX_CHS_SECTORS);
        let (spt, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17u64;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        // Bounded above: cylinders <= 65535, heads <= 16, spt <= 255.
        Geometry {
            cylinders: u16::try_from(cyl_times_heads / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(255),
        }
    }

    /// The smallest geometry (by the same algorithm, as qemu and Virtual PC size disks) that
    /// covers at least `size` bytes, or the maximum geometry when none does.
    pub fn covering(size: u64) -> Self {
        let want = size.div_ceil(512);
        let mut n = want;
        loop {
            let g = Geometry::for_sectors(n);
            if g.sectors() >= want || n >= MAX_CHS_SECTORS {
                return g;
            }
            n += 1;
        }
    }
}

/// One's complement of the byte sum of `bytes` (the checksum field must be zeroed by the
/// caller or skipped with `skip`).
pub fn checksum(bytes: &[u8], skip: std::ops::Range<usize>) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

const FOOTER_CHECKSUM_RANGE: std::ops::Range<usize> = 64..68;

/// A validated footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits.
    pub features: u32,
    /// Format version.
    pub version: u32,
    /// Offset of the dynamic header (`None` for fixed disks).
    pub data_offset: Option<u64>,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Virtual size in bytes (a multiple of 512).
    pub current_size: u64,
    /// Stored geometry.
    pub geometry: Geometry,
    /// Disk type.
    pub disk_type: DiskType,
    /// Unique id (stored as 16 raw bytes, shown in that byte order).
    pub unique_id: Uuid,
    /// Saved-state flag.
    pub saved_state: bool,
}

impl Footer {
    /// Parses and validates 512 bytes; `check_sum` false skips the checksum (for `check`).
    pub fn parse(bytes: &[u8], check_sum: bool) -> Result<Self, FormatError> {
        let raw = RawFooter::read_from_bytes(bytes)
            .map_err(|_| FormatError::Truncated { what: "footer" })?;
        if &raw.cookie != FOOTER_COOKIE {
            return Err(FormatError::BadCookie { what: "footer" });
        }
        if check_sum {
            let computed = checksum(bytes, FOOTER_CHECKSUM_RANGE);
            if computed != raw.checksum.get() {
                return Err(FormatError::Checksum {
                    what: "footer",
                    stored: raw.checksum.get(),
                    computed,
                });
            }
        }
        Footer::try_from(&raw)
    }

    /// Serialises with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut raw = RawFooter::new_zeroed();
        raw.cookie = *FOOTER_COOKIE;
        raw.features.set(self.features);
        raw.version.set(self.version);
        raw.data_offset
            .set(self.data_offset.unwrap_or(FIXED_DATA_OFFSET));
        raw.timestamp.set(self.timestamp);
        raw.creator_app = self.creator_app;
        raw.creator_version.set(self.creator_version);
        raw.creator_os = self.creator_os;
        raw.original_size.set(self.original_size);
        raw.current_size.set(self.current_size);
        raw.cylinders.set(self.geometry.cylinders);
        raw.heads = self.geometry.heads;
        raw.sectors_per_track = self.geometry.sectors_per_track;
        raw.disk_type.set(self.disk_type.code());
        raw.unique_id = *self.unique_id.as_bytes();
        raw.saved_state = u8::from(self.saved_state);
        let mut out = [0u8; FOOTER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        let sum = checksum(&out, FOOTER_CHECKSUM_RANGE);
        out[FOOTER_CHECKSUM_RANGE].copy_from_slice(&sum.to_be_bytes());
        out
    }
}

impl TryFrom<&RawFooter> for Footer {
    type Error = FormatError;

    fn try_from(raw: &RawFooter) -> Result<Self, FormatError> {
        if &raw.cookie != FOOTER_COOKIE {
            return Err(FormatError::BadCookie { what: "footer" });
        }
        // VHD 1.0: major version 1.
        if raw.version.get() >> 16 != 1 {
            return Err(FormatError::Unsupported(format!(
                "footer version {:#x}",
                raw.version.get()
            )));
        }
        let disk_type = DiskType::from_code(raw.disk_type.get()).ok_or_else(|| {
            FormatError::Unsupported(format!("disk type {}", raw.disk_type.get()))
        })?;
        let current_size = raw.current_size.get();
        if current_size % 512 != 0 {
            return Err(FormatError::Invalid(format!(
                "current size {current_size} is not a multiple of 512"
            )));
        }
        if current_size > MAX_VIRTUAL_SIZE && disk_type != DiskType::Fixed {
            return Err(FormatError::Invalid(format!(
                "current size {current_size} exceeds 2040 GiB"
            )));
        }
        let data_offset = match (disk_type, raw.data_offset.get()) {
            (DiskType::Fixed, _) => None,
            (_, FIXED_DATA_OFFSET) => {
                return Err(FormatError::Invalid(
                    "dynamic disk without a header offset".into(),
                ))
            }
            (_, off) => Some(off),
        };
        Ok(Footer {
            features: raw.features.get(),
            version: raw.version.get(),
            data_offset,
            timestamp: raw.timestamp.get(),
            creator_app: raw.creator_app,
            creator_version: raw.creator_version.get(),
            creator_os: raw.creator_os,
            original_size: raw.original_size.get(),
            current_size,
            geometry: Geometry {
                cylinders: raw.cylinders.get(),
                heads: raw.heads,
                sectors_per_track: raw.sectors_per_track,
            },
            disk_type,
            unique_id: Uuid::from_bytes(raw.unique_id),
            saved_state: raw.saved_state != 0,
        })
    }
}

/// Seconds since the VHD epoch for the current time (0 if the clock is before 2000).
pub fn vhd_timestamp_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_qemu_examples() {
        // qemu-img create -f vpc x.vhd 1G gives 1073995776 bytes = 2081*16*63 sectors.
        let g = Geometry::covering(1 << 30);
        assert_eq!(g.size(), 1_073_995_776);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (2081, 16, 63));
        // ext2.vhd from dfvfs: 121/4/17.
        let g = Geometry::covering(4_212_736);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (121, 4, 17));
        assert_eq!(Geometry::for_sectors(u64::MAX).sectors(), MAX_CHS_SECTORS);
    }

    #[test]
    fn footer_round_trip_and_checksum() {
        let f = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: Some(512),
            timestamp: 12345,
            creator_app: *b"win ",
            creator_version: 0x000a_0000,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: Geometry::for_sectors(2048),
            disk_type: DiskType::Dynamic,
            unique_id: Uuid::from_bytes([7; 16]),
            saved_state: false,
        };
        let mut b = f.to_bytes();
        assert_eq!(Footer::parse(&b, true).unwrap(), f);
        b[100] ^= 1;
        assert!(matches!(
            Footer::parse(&b, true),
            Err(FormatError::Checksum { .. })
        ));
        assert!(Footer::parse(&b, false).is_ok());
        b[0] = b'x';
        assert!(matches!(
            Footer::parse(&b, false),
            Err(FormatError::BadCookie { .. })
        ));
    }
}
