//! # vdisk
//!
//! The facade of the vdisk crate family: one dependency that re-exports every member.
//!
//! | crate | owns |
//! |---|---|
//! | [`block_io`] | `Storage` and `BlockDevice` traits, file/memory/fault-injecting backends, raw disks, range locks, rate limiter |
//! | [`vhd_format`] | VHD (fixed, dynamic, differencing layer) |
//! | [`vhdx_format`] | VHDX (fixed, dynamic, differencing layer, log) |
//! | [`chain`] | format detection, parents, lineage |
//! | [`meta_ops`] | online jobs on a live disk: job engine (progress, pause, resume, cancel, throttle, guest-first, pivot), copy, convert and commit/merge (compact, resize planned) |
//! | [`offload_token`] | ODX-style offload tokens: sealed 512-byte tokens, offload read/write, registry (provider-to-provider transfer planned) |
//!
//! ```
//! use vdisk::block_io::{BlockDevice, MemStorage, RawDisk, Storage};
//!
//! let storage = MemStorage::new();
//! storage.set_len(1 << 20)?;
//! let disk = RawDisk::new(storage)?;
//! disk.write_at(&[0xAB; 4096], 8192)?;
//! let mut buf = [0u8; 4096];
//! disk.read_at(&mut buf, 8192)?;
//! assert_eq!(buf, [0xAB; 4096]);
//! # Ok::<(), vdisk::block_io::Error>(())
//! ```
#![warn(missing_docs)]

pub use block_io;
pub use chain;
pub use meta_ops;
pub use offload_token;
pub use vhd_format;
pub use vhdx_format;
