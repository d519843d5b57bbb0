//! [`Storage`]: what an image file lives in.
//!
//! A `Storage` is a flat, growable byte container with positional I/O through `&self` (never a
//! shared seek cursor), so many threads can read and write it at once. Image formats sit on a
//! `Storage`; raw disks expose one directly. Implementations: [`FileStorage`](crate::FileStorage)
//! (pread/pwrite, optional `O_DIRECT`), [`MemStorage`](crate::MemStorage) (sparse, in memory),
//! and [`FaultStorage`](crate::FaultStorage) (crash and error injection for tests).

use std::io::{IoSlice, IoSliceMut};

use crate::error::{Error, ErrorKind, Result};

/// Whether a byte range of a [`Storage`] holds data or is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// `true` if the range may hold data; `false` if it is a hole that reads as zeros.
    pub allocated: bool,
    /// Length of the run starting at the queried offset (> 0 when the offset is inside the file).
    pub len: u64,
}

/// A flat, growable byte container with positional I/O.
///
/// Reads must lie inside `[0, len)`: a read past the end is an [`ErrorKind::OutOfRange`] error,
/// never a silent short read. Writes past the end grow the storage; any gap reads as zeros.
/// Nothing is durable until [`sync_data`](Storage::sync_data) returns.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Current length in bytes.
    fn len(&self) -> Result<u64>;

    /// `true` when the storage holds no bytes.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> Result<()>;

    /// Makes every completed write and length change durable.
    fn sync_data(&self) -> Result<()>;

    /// Makes `[offset, offset+len)` (clamped to the current length) read as zeros and, where the
    /// backend can, releases its space. Never changes the length.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;

    /// Reports whether the run starting at `offset` is allocated, looking at most `len` bytes.
    /// The default says everything is allocated.
    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let end = self.len()?;
        Ok(Extent {
            allocated: true,
            len: len.min(end.saturating_sub(offset)),
        })
    }

    /// Scatter read: fills `bufs` in order from `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off = add(off, b.len() as u64)?;
        }
        Ok(())
    }

    /// Gather write: writes `bufs` in order from `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off = add(off, b.len() as u64)?;
        }
        Ok(())
    }
}

fn add(a: u64, b: u64) -> Result<u64> {
    a.checked_add(b)
        .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "offset overflows u64"))
}

/// Checks that `[offset, offset+len)` lies inside `size`, returning the end.
pub fn check_bounds(offset: u64, len: u64, size: u64) -> Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!("range {offset}+{len} lies beyond the end ({size} bytes)"),
        )),
    }
}

/// Forwards every `Storage` method through a smart pointer.
macro_rules! forward_storage {
    ($($ptr:ident)::+) => {
        impl<T: Storage + ?Sized> Storage for $($ptr)::+<T> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
                (**self).write_at(buf, offset)
            }
            fn len(&self) -> Result<u64> {
                (**self).len()
            }
            fn set_len(&self, len: u64) -> Result<()> {
                (**self).set_len(len)
            }
            fn sync_data(&self) -> Result<()> {
                (**self).sync_data()
            }
            fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
                (**self).punch_hole(offset, len)
            }
            fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
                (**self).extent(offset, len)
            }
            fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
                (**self).read_vectored_at(bufs, offset)
            }
            fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
                (**self).write_vectored_at(bufs, offset)
            }
        }
    };
}

forward_storage!(std::sync::Arc);
forward_storage!(Box);
