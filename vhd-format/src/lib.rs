//! # vhd-format
//!
//! Reads and writes VHD images as specified by the Microsoft *Virtual Hard Disk Image Format
//! Specification* 1.0: fixed, dynamic and differencing disks. This crate owns the on-disk
//! structures — the footer and its copy at offset 0 ([`footer`]), the dynamic header
//! ([`header`]), parent locators ([`locator`]), the BAT and sector bitmaps ([`bat`]) — and
//! [`VhdFile`], one image as a [`block_io::BlockDevice`] *layer*: a differencing layer reports
//! the sectors it lacks as [`block_io::BlockStatus::Unallocated`] and reads them as zeros; it
//! never opens its parent (that is the `chain` crate's business).
//!
//! Every structure has a raw big-endian zerocopy struct and a validated domain type made by
//! `TryFrom`; every count read from disk is bounded before it sizes an allocation, and a
//! malformed image yields an error ([`block_io::ErrorKind::Corrupt`]), never a panic.
//!
//! Entry points: [`probe`], [`VhdFile::open`], [`VhdFile::create`],
//! [`VhdFile::create_differencing`], [`VhdFile::details`], [`VhdFile::check`] and
//! [`VhdFile::repair`] (or [`check_storage`] and [`repair_storage`] on a storage), and
//! [`VhdFile::set_parent`] (new parent name and locators, for rebasing onto a moved parent),
//! [`VhdFile::resize`] and [`resize_storage`] (a new virtual size, see [`resize`]).
//!
//! ```
//! use block_io::{BlockDevice, BlockStatus, MemStorage};
//! use vhd_format::{CreateOptions, DifferencingOptions, Subformat, VhdFile};
//!
//! // A 64 MiB dynamic disk (exact size, 2 MiB blocks), one write.
//! let base = VhdFile::create(MemStorage::new(), &CreateOptions::new(64 << 20, Subformat::Dynamic))?;
//! base.write_at(&[0xAB; 4096], 1 << 20)?;
//! base.flush()?;
//! let details = base.details();
//! assert_eq!((details.subformat(), details.virtual_size), ("dynamic", 64 << 20));
//!
//! // A differencing child: sectors it lacks are Unallocated (the chain asks the parent).
//! let opts = DifferencingOptions::for_parent(&details, "base.vhd", None, Some(".\\base.vhd".into()));
//! let child = VhdFile::create_differencing(MemStorage::new(), &opts)?;
//! child.write_at(&[0xCD; 512], 0)?;
//! assert_eq!(child.block_status(0, 4096)?.status, BlockStatus::Data);
//! assert_eq!(child.block_status(512, 4096)?.status, BlockStatus::Unallocated);
//! assert_eq!(child.details().parent_unique_id, Some(details.unique_id));
//! # Ok::<(), block_io::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod alloc;
pub mod bat;
mod check;
pub mod compact;
mod create;
mod details;
mod error;
mod file;
pub mod footer;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
mod layout;
pub mod locator;
mod reparent;
pub mod resize;

pub use check::{check_storage, repair_storage, CheckReport, Issue};
pub use compact::VhdCompactor;
pub use create::{size_and_geometry, CreateOptions, Creator, DifferencingOptions, Subformat};
pub use details::{read_details, LocatorDetails, VhdDetails};
pub use error::FormatError;
pub use file::{OpenOptions, VhdFile};
pub use footer::{DiskType, Geometry};
pub use layout::FooterSource;
pub use locator::PlatformCode;
pub use resize::{resize_storage, resize_storage_with, ResizeError, ResizeReport};

use block_io::{Result, Storage};

/// `true` if `storage` looks like a VHD: a footer cookie at the end (any VHD, the only mark
/// of a fixed one) or at offset 0 (the copy every dynamic and differencing image starts
/// with). Checksums are not verified, so a damaged VHD is still recognised (and then refused
/// by [`VhdFile::open`] with a precise error).
pub fn probe<S: Storage + ?Sized>(storage: &S) -> bool {
    let Ok(len) = storage.len() else {
        return false;
    };
    if len < footer::FOOTER_SIZE as u64 {
        return false;
    }
    let mut cookie = [0u8; 8];
    let at =
        |off: u64, c: &mut [u8; 8]| storage.read_at(c, off).is_ok() && c == footer::FOOTER_COOKIE;
    at(len - footer::FOOTER_SIZE as u64, &mut cookie) || at(0, &mut cookie)
}

impl<S: Storage> VhdFile<S> {
    /// Checks this image's file (see [`check_storage`]).
    pub fn check(&self) -> Result<CheckReport> {
        self.check_with(false)
    }

    /// Checks this image's file and repairs what is safe (see [`repair_storage`]); on a
    /// read-only open it only checks.
    pub fn repair(&self) -> Result<CheckReport> {
        self.check_with(true)
    }

    fn check_with(&self, repair: bool) -> Result<CheckReport> {
        let writable = !block_io::BlockDevice::info(self).read_only;
        if writable {
            // The file, not the memory, is what is checked: write what a flush would.
            block_io::BlockDevice::flush(self)?;
        }
        if repair && writable {
            repair_storage(self.storage())
        } else {
            check_storage(self.storage())
        }
    }
}
