//! # block-io
//!
//! The foundation of the vdisk family. It owns:
//! - [`Storage`], what an image file lives in (positional `&self` I/O, length, sync, holes), with
//!   a file backend ([`FileStorage`]: pread/pwrite, optional `O_DIRECT`, hole punching, image
//!   locks shared with QEMU, see [`LockMode`]), a sparse memory backend ([`MemStorage`]) and,
//!   with the `testing` feature, a fault-injecting backend (`FaultStorage`) that keeps live and
//!   durable bytes apart, cuts power at a chosen write or sync, and injects EIO/ENOSPC;
//! - [`BlockDevice`], what a guest sees (a virtual disk), and [`RawDisk`], a raw image over any
//!   `Storage`;
//! - [`RangeLock`] (block-granular shared/exclusive locks), [`RateLimiter`] (token bucket) and
//!   [`FailStop`] (latch the first write or sync error), the concurrency tools every format and
//!   online job shares;
//! - with the `testing` feature, the rule of the workspace's oracle tests
//!   (`testing::oracle`: a missing oracle fails under `CI=true`, is skipped loudly elsewhere).
//!
//! Nothing here depends on an async runtime.
#![warn(missing_docs)]

mod device;
pub mod engine;
mod error;
mod failstop;
#[cfg(feature = "testing")]
mod fault;
mod file;
mod lock;
mod memory;
#[cfg(feature = "nbd")]
pub mod nbd;
mod rangelock;
mod ratelimit;
mod raw;
#[cfg(feature = "remote")]
pub mod remote;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;

pub use device::{
    bounce_read_raw, bounce_read_vectored, bounce_write_raw, bounce_write_vectored, check_request,
    push_mapping, read_bytes, write_bytes, BlockDevice, BlockStatus, DiskInfo, ImageOpenOptions,
    Mapping, StatusRun, WriteGuard,
};
pub use error::{Error, ErrorKind, Result};
pub use failstop::FailStop;
#[cfg(feature = "testing")]
pub use fault::{CutPoint, FaultStorage, Injection, WriteFate};
pub use file::{AlignedBuf, FileStorage, LockMode, OpenOptions};
pub use memory::MemStorage;
pub use rangelock::{RangeGuard, RangeLock};
pub use ratelimit::RateLimiter;
pub use raw::{RawDisk, RawOptions};
pub use storage::{check_bounds, raw_slice, raw_total, Extent, IoHandle, RawBuf, Storage};
