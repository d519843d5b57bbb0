//! Format detection by content, never by file name.
//!
//! - VHDX: the file identifier at offset 0 starts with the ASCII signature "vhdxfile"
//!   (MS-VHDX 2.2.1).
//! - VHD: a footer with the cookie "conectix" in the last 512 bytes (fixed and dynamic disks;
//!   some old writers leave a 511-byte footer), or the copy at offset 0 (dynamic and
//!   differencing disks whose tail is damaged). Note qemu probes a fixed VHD as raw; we do not.
//! - Anything else is raw.

use block_io::{Result, Storage};

/// An image format this family knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Raw bytes.
    Raw,
    /// Virtual Hard Disk 1.0.
    Vhd,
    /// VHDX (MS-VHDX).
    Vhdx,
}

impl Format {
    /// The short name used on the command line ("raw", "vhd", "vhdx").
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }

    /// Parses a short name; qemu's "vpc" is accepted for VHD.
    pub fn from_name(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "raw" => Some(Format::Raw),
            "vhd" | "vpc" => Some(Format::Vhd),
            "vhdx" => Some(Format::Vhdx),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
const VHD_COOKIE: &[u8; 8] = b"conectix";

/// Detects the format of the image in `storage` by its content.
pub fn detect(storage: &dyn Storage) -> Result<Format> {
    let len = storage.len()?;
    let mut head = [0u8; 8];
    if len >= 8 {
        storage.read_at(&mut head, 0)?;
        if &head == VHDX_SIGNATURE {
            return Ok(Format::Vhdx);
        }
        if &head == VHD_COOKIE {
            return Ok(Format::Vhd);
        }
    }
    for footer in [512u64, 511] {
        if len >= footer {
            let mut cookie = [0u8; 8];
            storage.read_at(&mut cookie, len - footer)?;
            if &cookie == VHD_COOKIE {
                return Ok(Format::Vhd);
            }
        }
    }
    Ok(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_io::MemStorage;

    #[test]
    fn detects_by_content() {
        assert_eq!(detect(&MemStorage::new()).unwrap(), Format::Raw);
        let mut v = vec![0u8; 4096];
        v[..8].copy_from_slice(b"vhdxfile");
        assert_eq!(detect(&MemStorage::from_bytes(&v)).unwrap(), Format::Vhdx);
        let mut v = vec![0u8; 4096];
        v[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(detect(&MemStorage::from_bytes(&v)).unwrap(), Format::Vhd);
        let mut v = vec![0u8; 4096];
        v[4096 - 511..4096 - 503].copy_from_slice(b"conectix");
        assert_eq!(detect(&MemStorage::from_bytes(&v)).unwrap(), Format::Vhd);
        // A raw disk whose data merely contains the cookie elsewhere stays raw.
        let mut v = vec![0u8; 4096];
        v[100..108].copy_from_slice(b"conectix");
        assert_eq!(detect(&MemStorage::from_bytes(&v)).unwrap(), Format::Raw);
    }
}
