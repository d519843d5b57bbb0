//! [`RawDisk`]: a raw image — the virtual disk is the container's bytes, one to one.
//!
//! Reads and writes are single positional calls (vectored and raw ones go down as
//! `preadv`/`pwritev`, raw ones straight into or out of the caller's memory),
//! `write_zeroes(unmap)` and `discard` punch holes, and `block_status` reports holes as
//! [`BlockStatus::Zero`] using the storage's `SEEK_DATA`/`SEEK_HOLE`. Writes and syncs latch
//! the first failure ([`FailStop`]).

use std::io::{IoSlice, IoSliceMut};

use crate::device::{
    check_request, push_mapping, BlockDevice, BlockStatus, DiskInfo, Mapping, StatusRun,
};
use crate::error::{Error, ErrorKind, Result};
use crate::failstop::FailStop;
use crate::storage::{raw_total, RawBuf, Storage};

/// How [`RawDisk::open`] opens a raw image: 512-byte sectors, writable, unless told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawOptions {
    sector_size: u32,
    read_only: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        RawOptions {
            sector_size: 512,
            read_only: false,
        }
    }
}

impl RawOptions {
    /// 512-byte sectors, writable.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logical (and physical) sector size in bytes: 512 or 4096 ([`RawDisk::open`] refuses
    /// anything else).
    pub fn sector_size(mut self, bytes: u32) -> Self {
        self.sector_size = bytes;
        self
    }

    /// Opens read-only when `yes`: writes, discards and flushes are refused.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }
}

/// A raw disk image over any [`Storage`].
#[derive(Debug)]
pub struct RawDisk<S> {
    storage: S,
    info: DiskInfo,
    fail: FailStop,
}

impl<S: Storage> RawDisk<S> {
    /// A writable raw disk of the storage's current length with 512-byte sectors. The length
    /// must be a multiple of 512.
    pub fn new(storage: S) -> Result<Self> {
        Self::open(storage, &RawOptions::new())
    }

    /// A raw disk over `storage` as `options` say (sector size, read-only). The length must
    /// be a multiple of the sector size.
    pub fn open(storage: S, options: &RawOptions) -> Result<Self> {
        let (sector_size, read_only) = (options.sector_size, options.read_only);
        if sector_size != 512 && sector_size != 4096 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("sector size {sector_size} is neither 512 nor 4096"),
            ));
        }
        let len = storage.len()?;
        if len % u64::from(sector_size) != 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("raw image length {len} is not a multiple of {sector_size}"),
            ));
        }
        let mut info = DiskInfo::new("raw", len);
        info.logical_sector_size = sector_size;
        info.physical_sector_size = sector_size;
        info.read_only = read_only;
        Ok(RawDisk {
            storage,
            info,
            fail: FailStop::new(),
        })
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Gives back the storage.
    pub fn into_storage(self) -> S {
        self.storage
    }

    fn writing(&self, offset: u64, len: u64) -> Result<()> {
        check_request(&self.info, offset, len, true)?;
        self.fail.check()
    }

    /// Writes zeros without releasing space, in bounded chunks.
    fn fill_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64);
            self.storage.write_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }
}

impl<S: Storage> BlockDevice for RawDisk<S> {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    fn map(&self, offset: u64, len: u64, write: bool, out: &mut Vec<Mapping>) -> Result<bool> {
        if write {
            self.writing(offset, len)?;
        } else {
            check_request(&self.info, offset, len, false)?;
        }
        // One to one: the request's bytes are the file's bytes at the same offset.
        let Some(handle) = self.storage.io_handle() else {
            return Ok(false);
        };
        push_mapping(
            out,
            Mapping::File {
                handle,
                file_offset: offset,
                len,
            },
        );
        Ok(true)
    }

    fn mapped_write_failed(&self, err: &Error) {
        self.fail.latch(err);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(&self.info, offset, buf.len() as u64, false)?;
        self.storage.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writing(offset, buf.len() as u64)?;
        self.fail.guard(self.storage.write_at(buf, offset))
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_request(&self.info, offset, len, false)?;
        self.storage.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.writing(offset, len)?;
        self.fail
            .guard(self.storage.write_vectored_at(bufs, offset))
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        check_request(&self.info, offset, raw_total(bufs)?, false)?;
        // SAFETY: forwarded caller contract (buffers valid for writes).
        unsafe { self.storage.read_raw_at(bufs, offset) }
    }

    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        self.writing(offset, raw_total(bufs)?)?;
        // SAFETY: forwarded caller contract (buffers valid for reads).
        self.fail
            .guard(unsafe { self.storage.write_raw_at(bufs, offset) })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writing(offset, len)?;
        let r = if unmap {
            self.storage.punch_hole(offset, len)
        } else {
            self.fill_zeroes(offset, len)
        };
        self.fail.guard(r)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writing(offset, len)?;
        self.fail.guard(self.storage.punch_hole(offset, len))
    }

    fn flush(&self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.fail.check()?;
        self.fail.guard(self.storage.sync_data())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        check_request(&self.info, offset, len, false)?;
        if len == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "block status of 0 bytes",
            ));
        }
        let e = self.storage.extent(offset, len)?;
        let sector = u64::from(self.info.logical_sector_size);
        // Round the run to whole sectors; a partly allocated sector counts as data.
        let mut run = e.len.max(1).min(len);
        if e.allocated {
            run = run.div_ceil(sector) * sector;
        } else if run >= sector {
            run -= run % sector;
        } else {
            return Ok(StatusRun {
                status: BlockStatus::Data,
                len: sector,
                file_offset: Some(offset),
            });
        }
        let run = run.min(len);
        Ok(if e.allocated {
            StatusRun {
                status: BlockStatus::Data,
                len: run,
                file_offset: Some(offset),
            }
        } else {
            StatusRun {
                status: BlockStatus::Zero,
                len: run,
                file_offset: Some(offset),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemStorage;

    #[test]
    fn rejects_unaligned_and_out_of_range() {
        let m = MemStorage::new();
        m.set_len(8192).unwrap();
        let d = RawDisk::new(m).unwrap();
        let mut b = vec![0u8; 512];
        assert_eq!(
            d.read_at(&mut b, 1).unwrap_err().kind(),
            ErrorKind::Unaligned
        );
        assert_eq!(
            d.read_at(&mut b, 8192).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            d.read_at(&mut b, u64::MAX - 511).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            d.write_at(&b, !511).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let m = MemStorage::from_bytes(&[0; 1024]);
        let d = RawDisk::open(m, &super::RawOptions::new().read_only(true)).unwrap();
        assert_eq!(
            d.write_at(&[0; 512], 0).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(d.discard(0, 512).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn block_status_sees_holes() {
        let m = MemStorage::new();
        m.set_len(1 << 20).unwrap();
        let d = RawDisk::new(m).unwrap();
        d.write_at(&[7; 512], 65536).unwrap();
        let r = d.block_status(0, 1 << 20).unwrap();
        assert_eq!((r.status, r.len), (BlockStatus::Zero, 65536));
        let r = d.block_status(65536, (1 << 20) - 65536).unwrap();
        assert_eq!(r.status, BlockStatus::Data);
        d.write_zeroes(65536, 65536, true).unwrap();
        let r = d.block_status(0, 1 << 20).unwrap();
        assert_eq!((r.status, r.len), (BlockStatus::Zero, 1 << 20));
    }
}
