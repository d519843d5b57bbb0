//! # vhdx-format
//!
//! VHDX images per MS-VHDX (Open Specification rev 8.0). This crate owns:
//! - parsing and validation of every on-disk structure, one module each: the file identifier
//!   ([`file_id`], 2.2.1), headers ([`header`], 2.2.2), region tables ([`region`], 2.2.3), log
//!   entries ([`log`], 2.3) and replay ([`replay`], 2.3.3), the BAT ([`bat`], 2.5), the
//!   metadata region ([`metadata`], 2.6) and the parent locator ([`locator`], 2.6.2.6);
//!   raw `zerocopy` structs become validated types through `TryFrom`/`parse`, and every count
//!   read from disk is bounded;
//! - [`VhdxFile`], one layer (fixed, dynamic or differencing) implementing
//!   [`block_io::BlockDevice`]: lock-free reads through an in-memory BAT of atomics, sector
//!   bitmaps (LSB-first) for PARTIALLY_PRESENT blocks, log replay on open (into the file when
//!   writable, in memory when read-only), writing with allocation committed through the log at
//!   `flush`, `write_zeroes`/`discard` through ZERO/UNMAPPED states and hole punching;
//! - concurrency: reads and overwrites of allocated blocks take no lock; an allocation
//!   reserves its space under a short lock and writes its payload with none (a second writer
//!   of the same block waits); commits snapshot the pending BAT/bitmap sectors under that
//!   lock and do their syncs and log writes without it, batched, one at a time, and
//!   concurrent flushes share one commit (`alloc.rs`, `commit.rs`);
//! - [`VhdxFile::reserve_write`] / [`VhdxFile::map_allocating_write`]: an allocating write's
//!   file extents and an [`AllocGuard`] whose [`complete`](AllocGuard::complete) publishes
//!   the new blocks, for an I/O engine that writes the payload itself;
//! - [`create()`] for fixed, dynamic and differencing images with qemu-img's defaults;
//! - [`VhdxFile::set_parent_locator`]: a new parent locator through the log (`reparent`,
//!   2.6.2.6), for rebasing a child onto a moved or copied parent;
//! - [`VhdxFile::resize`]: grow or shrink the virtual size through the log ([`resize`]);
//! - [`probe`], [`VhdxFile::details`] and [`VhdxFile::check`] for tools;
//! - [`VhdxCompactor`]: empty blocks give their space back (ZERO, or NOT_PRESENT for an empty
//!   partially present block of a differencing image), blocks move
//!   down into holes, the file is truncated, in steps an online job can interleave with
//!   guest I/O ([`compact`]).
//!
//! Not implemented yet (honestly):
//! - `check` reports what `open` cannot already refuse (dirty log not replayed, partially
//!   present blocks without a bitmap) and counts unreferenced (leaked) bytes, but reclaims
//!   nothing; repairing needs a writable open ([`repair_image`], or [`VhdxFile::repair`] on
//!   a writable handle), which replays the log and rewrites a damaged region table copy;
//! - blocks that qemu marks ZERO while keeping a preallocated offset (old qemu fixed images)
//!   get new space at the end of the file on first write instead of reusing that offset;
//! - freed space (discard, unmap) is punched but never reused; a PARTIALLY_PRESENT block whose
//!   sectors all become present is not promoted to FULLY_PRESENT;
//! - two valid headers with the same sequence number are accepted (the one at 64 KiB wins)
//!   even when they differ (qemu refuses that case);
//! - a dirty log whose replay updates more than [`replay::MAX_OVERLAY_RANGES`] separate file
//!   ranges is refused as unsupported (replay folds the log in memory first; real logs update
//!   far fewer ranges);
//! - the `parent_linkage2` merge protocol (the `meta-ops` commit job does it).
//!
//! ```
//! use block_io::{BlockDevice, MemStorage};
//! use vhdx_format::{create, CreateOptions, VhdxFile};
//!
//! let mem = std::sync::Arc::new(MemStorage::new());
//! let disk = create(mem.clone(), &CreateOptions::dynamic(64 << 20))?;
//! disk.write_at(&[0xAB; 4096], 1 << 20)?;
//! disk.flush()?; // payload synced, BAT change logged, applied in place
//! disk.close()?; // log marked empty
//! drop(disk);
//! let again = VhdxFile::open(mem, &vhdx_format::OpenOptions::new().read_only(true))?;
//! let mut buf = [0u8; 4096];
//! again.read_at(&mut buf, 1 << 20)?;
//! assert_eq!(buf, [0xAB; 4096]);
//! assert_eq!(again.details().block_size, 8 << 20); // qemu-img's default for 64 MiB
//! # Ok::<(), block_io::Error>(())
//! ```
//!
//! Reads of sectors absent from a differencing layer return zeros from the layer itself and
//! are reported as [`block_io::BlockStatus::Unallocated`]; the `chain` crate reads the parent.
#![warn(missing_docs)]

mod alloc;
pub mod bat;
mod commit;
pub mod compact;
mod create;
pub mod error;
mod file;
pub mod file_id;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod guid;
pub mod header;
pub mod locator;
pub mod log;
pub mod metadata;
mod read;
pub mod region;
mod reparent;
pub mod replay;
pub mod resize;
mod write;

pub use alloc::{AllocGuard, WriteExtent};
pub use compact::VhdxCompactor;
pub use create::{create, create_file, default_block_size, CreateError, CreateOptions, ParentRef};
pub use error::FormatError;
pub use file::{
    check_image, open_file, probe, repair_image, CheckReport, OpenOptions, Subformat, VhdxDetails,
    VhdxFile,
};
pub use resize::{ResizeError, ResizeReport};
