//! [`Storage`]: what an image file lives in.
//!
//! A `Storage` is a flat, growable byte container with positional I/O through `&self` (never a
//! shared seek cursor), so many threads can read and write it at once. Image formats sit on a
//! `Storage`; raw disks expose one directly. Implementations: [`FileStorage`](crate::FileStorage)
//! (pread/pwrite, optional `O_DIRECT`), [`MemStorage`](crate::MemStorage) (sparse, in memory),
//! and `FaultStorage` (crash and error injection for tests, with the `testing` feature).

use std::io::{IoSlice, IoSliceMut};

use crate::error::{Error, ErrorKind, Result};

/// A region of memory handed to [`Storage::read_raw_at`]/[`Storage::write_raw_at`] (and the
/// [`BlockDevice`](crate::BlockDevice) methods of the same names) by address and length.
///
/// Unlike `&mut [u8]`, a `RawBuf` promises nothing about exclusivity: the region may alias other
/// `RawBuf`s of the same call, and another party (a VM's vCPUs, another process) may read or
/// change it at any time. The caller of the `unsafe` methods only guarantees that it stays
/// mapped and valid for reads and writes of `len` bytes for the duration of the call.
/// Implementations must therefore never form a Rust reference (`&[u8]`, `&mut [u8]`,
/// `IoSlice`, ...) to it: they pass the pointers to the kernel (`preadv`/`pwritev`) or copy
/// through `std::ptr` to or from memory they own.
#[derive(Debug, Clone, Copy)]
pub struct RawBuf {
    /// First byte of the region.
    pub ptr: *mut u8,
    /// Length of the region in bytes.
    pub len: usize,
}

/// Size of the bounce buffer of the default raw methods; longer requests go in pieces (small
/// enough to stay in a core's cache between the read and the copy).
pub(crate) const RAW_BOUNCE: usize = 256 << 10;

/// Runs `f` on a scratch buffer of `len` (at most [`RAW_BOUNCE`]) bytes, reused per thread so
/// that the bounce paths neither allocate nor zero per request. Its initial contents are
/// whatever an earlier request left: callers only pass on bytes they wrote into it or that a
/// successful `read_at` (which fills its whole buffer) put there. A nested call (a device whose
/// `read_at` bounces again) gets a fresh buffer.
pub(crate) fn with_bounce<R>(len: usize, mut f: impl FnMut(&mut [u8]) -> R) -> R {
    thread_local! {
        static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let len = len.min(RAW_BOUNCE);
    let reused = BOUNCE.try_with(|b| {
        let mut v = b.try_borrow_mut().ok()?;
        if v.len() < len {
            v.resize(len, 0);
        }
        Some(f(&mut v[..len]))
    });
    match reused {
        Ok(Some(r)) => r,
        // Nested, or the thread is exiting: `f` has not run; give it a buffer of its own.
        _ => f(&mut vec![0u8; len]),
    }
}

/// Total length of `bufs`, or an [`ErrorKind::InvalidInput`] error if it overflows `u64`.
pub fn raw_total(bufs: &[RawBuf]) -> Result<u64> {
    bufs.iter()
        .try_fold(0u64, |a, b| a.checked_add(b.len as u64))
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "request too large"))
}

/// Copies bytes `[pos, pos + out.len())` of the concatenation of `bufs` into `out`.
///
/// # Safety
/// Every buffer must be valid for reads of its length for the duration of the call and must
/// not overlap `out` (which the caller owns exclusively, so it cannot).
pub(crate) unsafe fn raw_gather(bufs: &[RawBuf], pos: u64, out: &mut [u8]) {
    raw_walk(bufs, pos, out.len(), |b, at, n| {
        // SAFETY: `b` is valid for reads of `n` bytes (caller's contract); `out[at..at + n]`
        // is in bounds (raw_walk never exceeds `out.len()`) and is our own exclusive memory,
        // so the two cannot overlap. No reference to the caller's memory is formed.
        unsafe { std::ptr::copy_nonoverlapping(b, out.as_mut_ptr().add(at), n) }
    });
}

/// Copies `data` into bytes `[pos, pos + data.len())` of the concatenation of `bufs`.
///
/// # Safety
/// Every buffer must be valid for writes of its length for the duration of the call and must
/// not overlap `data` (which the caller owns, so it cannot).
pub(crate) unsafe fn raw_scatter(bufs: &[RawBuf], pos: u64, data: &[u8]) {
    raw_walk(bufs, pos, data.len(), |b, at, n| {
        // SAFETY: `b` is valid for writes of `n` bytes (caller's contract); `data[at..at + n]`
        // is in bounds and is memory the caller owns, so they cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(at), b, n) }
    });
}

/// The buffers covering bytes `[pos, pos + len)` of the concatenation of `bufs` (shorter if
/// `bufs` end first). Pure pointer arithmetic: nothing is read or written, so it is safe; the
/// pieces carry the same validity as the buffers they were cut from. Formats use it to hand a
/// part of a raw request to their storage.
pub fn raw_slice(bufs: &[RawBuf], pos: u64, len: usize) -> Vec<RawBuf> {
    let mut out = Vec::new();
    raw_walk(bufs, pos, len, |ptr, _, n| out.push(RawBuf { ptr, len: n }));
    out
}

/// Calls `f(ptr, at, n)` for the pieces of `bufs` covering `[pos, pos + want)` of their
/// concatenation: `ptr` is inside a buffer with at least `n` bytes after it, `at` counts from
/// `pos`. Stops early if the buffers end first. Pure pointer arithmetic; nothing is accessed.
fn raw_walk(bufs: &[RawBuf], pos: u64, want: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
    let mut skip = pos;
    let mut done = 0usize;
    for b in bufs {
        if done == want {
            break;
        }
        if skip >= b.len as u64 {
            skip -= b.len as u64;
            continue;
        }
        let s = skip as usize;
        let n = (b.len - s).min(want - done);
        f(b.ptr.wrapping_add(s), done, n);
        done += n;
        skip = 0;
    }
}

/// Reads `total` bytes in pieces of at most `piece` through a bounce buffer: `read(tmp, pos)`
/// fills `tmp` with bytes `[pos, pos + tmp.len())` of the request, which are then copied into
/// `bufs`. The one copy loop behind every default raw read.
///
/// # Safety
/// Every buffer in `bufs` must be valid for writes of its length for the whole call.
pub(crate) unsafe fn bounce_in(
    bufs: &[RawBuf],
    total: u64,
    piece: u64,
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    with_bounce(total.min(piece) as usize, |tmp| {
        let mut pos = 0u64;
        while pos < total {
            let n = (total - pos).min(tmp.len() as u64) as usize;
            read(&mut tmp[..n], pos)?;
            // SAFETY: the caller guarantees `bufs` valid for writes; `tmp` is ours.
            unsafe { raw_scatter(bufs, pos, &tmp[..n]) };
            pos += n as u64;
        }
        Ok(())
    })
}

/// Writes `total` bytes in pieces of at most `piece` through a bounce buffer: bytes
/// `[pos, pos + n)` of `bufs` are copied out, then handed to `write(tmp, pos)`.
///
/// # Safety
/// Every buffer in `bufs` must be valid for reads of its length for the whole call.
pub(crate) unsafe fn bounce_out(
    bufs: &[RawBuf],
    total: u64,
    piece: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    with_bounce(total.min(piece) as usize, |tmp| {
        let mut pos = 0u64;
        while pos < total {
            let n = (total - pos).min(tmp.len() as u64) as usize;
            // SAFETY: the caller guarantees `bufs` valid for reads; `tmp` is ours.
            unsafe { raw_gather(bufs, pos, &mut tmp[..n]) };
            write(&tmp[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    })
}

/// The default [`Storage::read_raw_at`]: `read_at` into a bounce buffer, then copy out.
///
/// # Safety
/// As [`Storage::read_raw_at`].
pub(crate) unsafe fn bounce_read_raw<S: Storage + ?Sized>(
    s: &S,
    bufs: &[RawBuf],
    offset: u64,
) -> Result<()> {
    let total = raw_total(bufs)?;
    add(offset, total)?;
    // SAFETY: forwarded caller contract.
    unsafe {
        bounce_in(bufs, total, RAW_BOUNCE as u64, |b, pos| {
            s.read_at(b, offset + pos)
        })
    }
}

/// The default [`Storage::write_raw_at`]: copy into a bounce buffer, then `write_at`.
///
/// # Safety
/// As [`Storage::write_raw_at`].
pub(crate) unsafe fn bounce_write_raw<S: Storage + ?Sized>(
    s: &S,
    bufs: &[RawBuf],
    offset: u64,
) -> Result<()> {
    let total = raw_total(bufs)?;
    add(offset, total)?;
    // SAFETY: forwarded caller contract.
    unsafe {
        bounce_out(bufs, total, RAW_BOUNCE as u64, |b, pos| {
            s.write_at(b, offset + pos)
        })
    }
}

/// Whether a byte range of a [`Storage`] holds data or is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// `true` if the range may hold data; `false` if it is a hole that reads as zeros.
    pub allocated: bool,
    /// Length of the run starting at the queried offset (> 0 when the offset is inside the file).
    pub len: u64,
}

/// The open file behind a [`Storage`], for an I/O engine that moves payload bytes itself
/// (see [`crate::engine`]): its descriptor and the alignment its `O_DIRECT` mode needs of
/// offsets, lengths and buffer addresses (1 without `O_DIRECT`).
///
/// The descriptor stays open as long as the storage lives; whoever uses it must keep the
/// storage (or the device owning it) alive until its I/O completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoHandle {
    /// The file descriptor.
    pub fd: std::os::unix::io::RawFd,
    /// Required alignment in bytes (a power of two; 1 for none).
    pub align: usize,
}

impl IoHandle {
    /// Whether a transfer at `offset` of `bufs` meets this file's alignment.
    pub fn admits(&self, offset: u64, bufs: &[RawBuf]) -> bool {
        let a = self.align.max(1);
        a == 1
            || (offset % a as u64 == 0
                && bufs
                    .iter()
                    .all(|b| b.len % a == 0 && (b.ptr as usize) % a == 0))
    }
}

/// A flat, growable byte container with positional I/O.
///
/// Reads must lie inside `[0, len)`: a read past the end is an [`ErrorKind::OutOfRange`] error,
/// never a silent short read. Writes past the end grow the storage; any gap reads as zeros.
/// Nothing is durable until [`sync_data`](Storage::sync_data) returns.
pub trait Storage: Send + Sync + 'static {
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

    /// The plain file behind this storage, when it is one, for an I/O engine to read and
    /// write directly ([`IoHandle`]). `None` (the default) for memory, fault injection and
    /// anything else whose bytes only its methods can reach: its callers use those methods.
    fn io_handle(&self) -> Option<IoHandle> {
        None
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

    /// Scatter read into raw memory: fills the concatenation of `bufs` from `offset`, exactly
    /// (past the end is an [`ErrorKind::OutOfRange`] error; the buffers' contents are then
    /// unspecified). The default reads into a bounce buffer and copies out; `FileStorage`
    /// reads straight into the buffers with `preadv`.
    ///
    /// # Safety
    /// Every [`RawBuf`] must be valid for writes of `len` bytes until the call returns (it may
    /// alias other buffers and be changed concurrently; see [`RawBuf`]).
    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { bounce_read_raw(self, bufs, offset) }
    }

    /// Gather write from raw memory: writes the concatenation of `bufs` at `offset`. The
    /// default copies into a bounce buffer and writes that; `FileStorage` uses `pwritev`.
    ///
    /// # Safety
    /// Every [`RawBuf`] must be valid for reads of `len` bytes until the call returns (it may
    /// alias other buffers and be changed concurrently; see [`RawBuf`]).
    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { bounce_write_raw(self, bufs, offset) }
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
            fn io_handle(&self) -> Option<IoHandle> {
                (**self).io_handle()
            }
            fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
                (**self).read_vectored_at(bufs, offset)
            }
            fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
                (**self).write_vectored_at(bufs, offset)
            }
            unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
                // SAFETY: forwarded caller contract.
                unsafe { (**self).read_raw_at(bufs, offset) }
            }
            unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
                // SAFETY: forwarded caller contract.
                unsafe { (**self).write_raw_at(bufs, offset) }
            }
        }
    };
}

forward_storage!(std::sync::Arc);
forward_storage!(Box);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounce_is_reused_and_a_nested_call_gets_its_own() {
        let a = with_bounce(100, |b| b.as_ptr() as usize);
        let b = with_bounce(50, |b| (b.as_ptr() as usize, b.len()));
        assert_eq!(b, (a, 50));
        assert_eq!(with_bounce(usize::MAX, |b| b.len()), RAW_BOUNCE);
        with_bounce(16, |outer| {
            outer.fill(1);
            with_bounce(16, |inner| {
                assert_ne!(inner.as_ptr(), outer.as_ptr());
                inner.fill(2);
            });
            assert!(outer.iter().all(|&x| x == 1));
        });
    }

    #[test]
    fn raw_walk_covers_exactly_the_range() {
        let mut m = [0u8; 10];
        let p = m.as_mut_ptr();
        let bufs = [
            RawBuf { ptr: p, len: 3 },
            RawBuf { ptr: p, len: 0 },
            RawBuf {
                ptr: p.wrapping_add(3),
                len: 7,
            },
        ];
        let mut got = Vec::new();
        raw_walk(&bufs, 2, 5, |q, at, n| {
            got.push((q as usize - p as usize, at, n))
        });
        assert_eq!(got, [(2, 0, 1), (3, 1, 4)]);
        let mut got = Vec::new();
        raw_walk(&bufs, 8, 100, |q, at, n| {
            got.push((q as usize - p as usize, at, n))
        });
        assert_eq!(got, [(8, 0, 2)]);
    }
}
