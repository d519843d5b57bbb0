//! [`VhdFile`]: one VHD image as a [`BlockDevice`] layer — fixed, dynamic, or differencing
//! (VHD spec 1.0, "Block Allocation Table and Data Blocks").
//!
//! Concurrency: the BAT lives in memory as atomics; reads and overwrites of allocated blocks
//! take no lock and are a single positional write (dynamic) or, in a differencing layer whose
//! bitmap already marks the sectors, the same. No metadata lock is held across payload I/O or
//! a sync: allocation reserves space under a short lock, writes and syncs outside it, and
//! commits the BAT entry and footer under another short lock (see [`crate::alloc`]); syncs
//! of concurrent allocations, bitmap updates and flushes coalesce. Sector bitmap updates of a
//! differencing layer are serialised per block by striped mutexes (held for the lookup or the
//! 512-byte bitmap write, never for payload I/O or a sync).
//!
//! Crash-safe allocation order: (1) write the data and the block's bitmap past the footer (the
//! data on a 64 KiB boundary), (2) sync, (3) write the BAT sector, (4) write the footer at the
//! end of the highest reserved space. A crash before (3) leaves the block unreferenced; a lost
//! footer is recovered from the copy at offset 0 on the next open (a writable open rewrites
//! it). Nothing is made durable before `flush()`, except that data always reaches the disk
//! before any metadata pointing at it.
//!
//! Dynamic disks: a new block's bitmap is all ones (like qemu) and reads ignore bitmaps.
//! Differencing layers honour them: absent sectors read as zeros from this layer and
//! `block_status` reports them `Unallocated` so a chain reads them from the parent. A first
//! write to absent sectors of an allocated block writes the data, syncs (coalesced), then
//! sets the bits.
//!
//! Discard and write-zeroes (VHD has no zero state): a fixed disk and allocated blocks of a
//! dynamic disk keep their space and get zeros (through `Storage::punch_hole` for discard and
//! unmapping write-zeroes, explicit zeros otherwise); unallocated dynamic blocks already read
//! as zeros. A differencing layer's discard clears the bitmap bits (the range reads from the
//! parent again); its write-zeroes writes zeros into the layer so they hide the parent.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use block_io::{
    check_request, push_mapping, BlockDevice, BlockStatus, DiskInfo, Error, ErrorKind, FailStop,
    Mapping, Result, StatusRun, Storage,
};
use parking_lot::{Condvar, Mutex};

use crate::alloc::{AllocState, Durability, Pending};
use crate::bat;
use crate::error::corrupt;
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::layout::{self, DynamicLayout, FooterSource};

const STRIPES: usize = 16;

/// One stripe of cached bitmaps: block number to bitmap.
type BitmapMap = HashMap<usize, Vec<u8>, BuildHasherDefault<BlockHasher>>;

/// A multiplicative hash for block numbers (looked up on every differencing read; SipHash's
/// resistance to chosen keys buys nothing for block numbers).
#[derive(Debug, Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

const ZERO_CHUNK: u64 = 1 << 20;

/// Calls `write(zeros, done)` for each piece of `[0, len)`, at most [`ZERO_CHUNK`] bytes each.
fn in_zero_chunks(len: u64, mut write: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = ZERO_CHUNK.min(len - done);
        write(&zeros[..n as usize], done)?;
        done += n;
    }
    Ok(())
}

/// One VHD image over a [`Storage`].
pub struct VhdFile<S: Storage> {
    /// `None` only after [`VhdFile::into_storage`] took it (the file is then being dropped).
    store: Option<S>,
    pub(crate) footer: Footer,
    pub(crate) footer_bytes: [u8; FOOTER_SIZE],
    pub(crate) source: FooterSource,
    pub(crate) end_footer_error: Option<String>,
    pub(crate) dynamic: Option<DynamicLayout>,
    read_only: bool,
    /// Allocation state: the end of the highest reserved space (where the footer goes, the
    /// end of data for `map`) and the blocks being allocated.
    pub(crate) alloc: Mutex<AllocState>,
    /// Signalled when an allocation ends (done or given up).
    pub(crate) alloc_done: Condvar,
    /// Allocations published in memory whose BAT entries are not yet in the file; also
    /// serialises the BAT sector and footer writes that persist them.
    pub(crate) commit: Mutex<Pending>,
    /// Coalesced syncs.
    pub(crate) durability: Durability,
    /// Cached sector bitmaps of a differencing layer, striped by block number.
    bitmaps: Vec<Mutex<BitmapMap>>,
    pub(crate) failstop: FailStop,
}

impl<S: Storage> std::fmt::Debug for VhdFile<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdFile")
            .field("disk_type", &self.footer.disk_type)
            .field("virtual_size", &self.footer.current_size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Drop for VhdFile<S> {
    /// Persists the BAT entries of allocations no flush has written yet (best effort: a
    /// failure here cannot be reported; [`VhdFile::close`] reports it).
    fn drop(&mut self) {
        if self.store.is_some() {
            let _ = self.persist_on_close();
        }
    }
}

/// How an image is opened (shared with the other format crate: the same entry-point shape).
pub use block_io::ImageOpenOptions as OpenOptions;

impl<S: Storage> VhdFile<S> {
    /// Opens an image. A writable open of an image whose end footer was lost (a crash during
    /// allocation) trims the unreferenced tail and rewrites the footer from the copy at 0.
    pub fn open(storage: S, opts: &OpenOptions) -> Result<Self> {
        let read_only = opts.is_read_only();
        let l = layout::load(&storage)?;
        // End of data. A read-only open of an image whose last block was cut short by a
        // crash: only what the file holds maps (the rest reads as zeros through `read_file`).
        let end = if read_only && l.source == FooterSource::CopyAtStart {
            l.footer_offset.min(storage.len()?)
        } else {
            l.footer_offset
        };
        let file = VhdFile {
            store: Some(storage),
            footer: l.footer,
            footer_bytes: l.footer_bytes,
            source: l.source,
            end_footer_error: l.end_footer_error,
            dynamic: l.dynamic,
            read_only,
            alloc: Mutex::new(AllocState::new(end)),
            alloc_done: Condvar::new(),
            commit: Mutex::new(Pending::default()),
            durability: Durability::default(),
            bitmaps: (0..STRIPES).map(|_| Mutex::default()).collect(),
            failstop: FailStop::new(),
        };
        if !read_only && file.source == FooterSource::CopyAtStart {
            // Order: drop the unreferenced tail, write the footer, sync.
            let pos = l.footer_offset;
            file.storage().set_len(pos)?;
            file.storage().write_at(&file.footer_bytes, pos)?;
            file.storage().sync_data()?;
        }
        Ok(file)
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        match &self.store {
            Some(s) => s,
            // `store` is taken only by `into_storage`, which consumes the file.
            None => unreachable!("a VhdFile's storage is present until into_storage"),
        }
    }

    /// Gives the storage back, after writing the BAT entries of allocations no flush has
    /// persisted yet (errors are ignored here: use [`VhdFile::close`] to see them).
    pub fn into_storage(mut self) -> S {
        let _ = self.persist_on_close();
        match self.store.take() {
            Some(s) => s,
            None => unreachable!("a VhdFile's storage is present until into_storage"),
        }
    }

    /// Makes everything written so far durable and part of the image (as
    /// [`BlockDevice::flush`]) and closes the file, reporting any error. Dropping a
    /// `VhdFile` does the same but cannot report a failure.
    pub fn close(mut self) -> Result<()> {
        let r = self.persist_on_close();
        // Nothing is left for `Drop` to do.
        self.store.take();
        r
    }

    /// The flush that closing a writable file owes: BAT entries still pending.
    fn persist_on_close(&self) -> Result<()> {
        if self.read_only || self.failstop.is_failed() {
            return Ok(());
        }
        self.persist()
    }

    /// The validated footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The disk type.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// Which footer the image was opened with.
    pub fn footer_source(&self) -> FooterSource {
        self.source
    }

    /// `true` once a write or sync failed (writes are refused until reopen).
    pub fn is_failed(&self) -> bool {
        self.failstop.is_failed()
    }

    fn block_size(&self) -> u64 {
        self.dynamic
            .as_ref()
            .map_or(1, |d| u64::from(d.header.block_size))
    }

    /// File offset of block `b`'s data, if allocated.
    pub(crate) fn data_offset(&self, d: &DynamicLayout, b: usize) -> Option<u64> {
        d.bat.get(b).map(|s| u64::from(s) * 512 + d.bitmap_size)
    }

    pub(crate) fn guard<T>(&self, r: Result<T>) -> Result<T> {
        self.failstop.guard(r)
    }

    /// Reads from the file; bytes past its end read as zeros (a block partly written before
    /// a crash, opened read-only).
    fn read_file(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self.storage().read_at(buf, off) {
            Err(e) if e.kind() == ErrorKind::OutOfRange => {
                let len = self.storage().len()?;
                let avail = usize::try_from(len.saturating_sub(off))
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                buf[avail..].fill(0);
                if avail > 0 {
                    self.storage().read_at(&mut buf[..avail], off)?;
                }
                Ok(())
            }
            r => r,
        }
    }

    pub(crate) fn is_diff(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// Runs `f` with block `b`'s bitmap (loaded on first use) under its stripe lock.
    fn with_bitmap<T>(
        &self,
        d: &DynamicLayout,
        b: usize,
        f: impl FnOnce(&mut Vec<u8>) -> Result<T>,
    ) -> Result<T> {
        let mut stripe = self.bitmaps[b % STRIPES].lock();
        let bm = match stripe.entry(b) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let sector = d
                    .bat
                    .get(b)
                    .ok_or_else(|| corrupt("bitmap of an unallocated block"))?;
                let mut bm = vec![0u8; d.bitmap_size as usize];
                self.read_file(&mut bm, u64::from(sector) * 512)?;
                v.insert(bm)
            }
        };
        f(bm)
    }

    /// Caches the bitmap of a block being published (before its BAT entry is, so that
    /// `with_bitmap` never reads it from the file while it may still change).
    pub(crate) fn cache_bitmap(&self, b: usize, bm: Vec<u8>) {
        self.bitmaps[b % STRIPES].lock().insert(b, bm);
    }

    /// Writes the bitmap sectors of block `b` covering sectors `[s0, s1)`.
    fn write_bitmap_range(
        &self,
        d: &DynamicLayout,
        b: usize,
        bm: &[u8],
        s0: usize,
        s1: usize,
    ) -> Result<()> {
        let sector = d
            .bat
            .get(b)
            .ok_or_else(|| corrupt("bitmap of an unallocated block"))?;
        let first = s0 / 8 / 512 * 512;
        let last = (s1.saturating_sub(1) / 8 / 512 + 1) * 512;
        let last = last.min(bm.len());
        self.guard(
            self.storage()
                .write_at(&bm[first..last], u64::from(sector) * 512 + first as u64),
        )
    }

    /// Reads part of block `b`; with `bitmaps` (a differencing layer's `read_at`), sectors its
    /// bitmap marks absent read as zeros.
    fn read_block_part(
        &self,
        d: &DynamicLayout,
        b: usize,
        within: u64,
        buf: &mut [u8],
        bitmaps: bool,
    ) -> Result<()> {
        let Some(data) = self.data_offset(d, b) else {
            buf.fill(0);
            return Ok(());
        };
        if !bitmaps {
            return self.read_file(buf, data + within);
        }
        let s0 = (within / 512) as usize;
        let s1 = s0 + buf.len() / 512;
        // One run at a time: the bitmap lock is held for the lookup only, never the I/O.
        let mut s = s0;
        while s < s1 {
            let (present, n) =
                self.with_bitmap(d, b, |bm| Ok((bat::bit(bm, s), bat::run_len(bm, s, s1))))?;
            let n = n.max(1);
            let part = &mut buf[(s - s0) * 512..(s - s0 + n) * 512];
            if present {
                self.read_file(part, data + s as u64 * 512)?;
            } else {
                part.fill(0);
            }
            s += n;
        }
        Ok(())
    }

    fn write_block_part(&self, d: &DynamicLayout, b: usize, within: u64, buf: &[u8]) -> Result<()> {
        let data = match self.data_offset(d, b) {
            Some(o) => o,
            None => match self.allocate(d, b, within, buf)? {
                None => return Ok(()),
                Some(o) => o,
            },
        };
        if !self.is_diff() {
            return self.guard(self.storage().write_at(buf, data + within));
        }
        let s0 = (within / 512) as usize;
        let s1 = s0 + buf.len() / 512;
        let present = self.with_bitmap(d, b, |bm| Ok(bat::all_set(bm, s0, s1)))?;
        self.guard(self.storage().write_at(buf, data + within))?;
        if !present {
            // The data must be durable before a bit claims it (a sync shared with concurrent
            // writers; no lock held).
            self.sync_durable()?;
            self.with_bitmap(d, b, |bm| {
                bat::set_bits(bm, s0, s1, true);
                self.write_bitmap_range(d, b, bm, s0, s1)
            })?;
        }
        Ok(())
    }

    /// Calls `f(block, within, start, len)` for each block-sized piece of `[off, off+len)`.
    fn for_each_piece(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size();
        let mut done = 0u64;
        while done < len {
            let cur = off + done;
            let within = cur % bs;
            let n = (bs - within).min(len - done);
            f((cur / bs) as usize, within, done as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }

    /// `read_at`, or with `bitmaps` false `read_data_at` (allocated blocks are read without
    /// consulting a differencing layer's sector bitmaps).
    fn read_layer(&self, buf: &mut [u8], offset: u64, bitmaps: bool) -> Result<()> {
        check_request(&self.info(), offset, buf.len() as u64, false)?;
        let Some(d) = &self.dynamic else {
            return self.storage().read_at(buf, offset);
        };
        let bitmaps = bitmaps && self.is_diff();
        self.for_each_piece(offset, buf.len() as u64, |b, within, start, n| {
            self.read_block_part(d, b, within, &mut buf[start..start + n], bitmaps)
        })
    }

    /// Zeros `[file_off, +len)` of the container, by hole punching when `punch`.
    fn zero_file_range(&self, file_off: u64, len: u64, punch: bool) -> Result<()> {
        if punch {
            match self.storage().punch_hole(file_off, len) {
                Err(e) if e.kind() == ErrorKind::Unsupported => {}
                r => return self.guard(r),
            }
        }
        in_zero_chunks(len, |zeros, done| {
            self.guard(self.storage().write_at(zeros, file_off + done))
        })
    }

    /// Zeros a range of a fixed disk or of a dynamic disk's allocated blocks.
    fn zero_in_place(&self, off: u64, len: u64, punch: bool) -> Result<()> {
        match &self.dynamic {
            None => self.zero_file_range(off, len, punch),
            Some(d) => {
                self.for_each_piece(off, len, |b, within, _, n| match self.data_offset(d, b) {
                    Some(data) => self.zero_file_range(data + within, n as u64, punch),
                    None => Ok(()),
                })
            }
        }
    }

    fn check_write(&self, off: u64, len: u64) -> Result<()> {
        check_request(&self.info(), off, len, true)?;
        self.failstop.check()
    }

    /// [`BlockDevice::map`]: a fixed disk maps one to one; a dynamic disk maps allocated
    /// blocks to their data (for a differencing layer, sector runs through the bitmap, absent
    /// ones to the parent) and, for reads, unallocated blocks to zeros (or the parent). A
    /// write maps only where no bitmap or BAT changes: allocated blocks, and in a differencing
    /// layer only sectors already present. Data past the footer (a block cut short by a
    /// crash, which reads as zeros) does not map.
    fn map_inner(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Mapping>,
    ) -> Result<bool> {
        if write {
            self.check_write(offset, len)?;
        } else {
            check_request(&self.info(), offset, len, false)?;
        }
        let Some(handle) = self.storage().io_handle() else {
            return Ok(false);
        };
        let Some(d) = &self.dynamic else {
            push_mapping(
                out,
                Mapping::File {
                    handle,
                    file_offset: offset,
                    len,
                },
            );
            return Ok(true);
        };
        // Every published block lies below the reserved end; a block being allocated is not
        // published yet (`data_offset` is `None`), so it never maps before its BAT entry and
        // footer are written.
        let end_of_data = self.alloc.lock().end;
        let diff = self.is_diff();
        let mut ok = true;
        self.for_each_piece(offset, len, |b, within, _, n| {
            if !ok {
                return Ok(());
            }
            let n = n as u64;
            let Some(data) = self.data_offset(d, b) else {
                if write {
                    ok = false;
                } else if diff {
                    push_mapping(out, Mapping::Parent { len: n });
                } else {
                    push_mapping(out, Mapping::Zero { len: n });
                }
                return Ok(());
            };
            if data + within + n > end_of_data {
                ok = false;
                return Ok(());
            }
            let file = |at: u64, len: u64| Mapping::File {
                handle,
                file_offset: data + at,
                len,
            };
            if !diff {
                push_mapping(out, file(within, n));
                return Ok(());
            }
            let s0 = (within / 512) as usize;
            let s1 = s0 + (n / 512) as usize;
            if write {
                if self.with_bitmap(d, b, |bm| Ok(bat::all_set(bm, s0, s1)))? {
                    push_mapping(out, file(within, n));
                } else {
                    ok = false;
                }
                return Ok(());
            }
            let mut s = s0;
            while s < s1 {
                let (present, run) =
                    self.with_bitmap(d, b, |bm| Ok((bat::bit(bm, s), bat::run_len(bm, s, s1))))?;
                let run = run.max(1);
                let (at, len) = (s as u64 * 512, run as u64 * 512);
                push_mapping(
                    out,
                    if present {
                        file(at, len)
                    } else {
                        Mapping::Parent { len }
                    },
                );
                s += run;
            }
            Ok(())
        })?;
        Ok(ok)
    }
}

impl<S: Storage> BlockDevice for VhdFile<S> {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            virtual_size: self.footer.current_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            read_only: self.read_only,
            disk_id: Some(self.footer.unique_id),
            format: "vhd",
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_layer(buf, offset, true)
    }

    /// Allocated blocks are read without consulting their sector bitmap (the caller vouches
    /// that the range is present); unallocated ones read as zeros.
    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_layer(buf, offset, false)
    }

    fn map(&self, offset: u64, len: u64, write: bool, out: &mut Vec<Mapping>) -> Result<bool> {
        self.map_inner(offset, len, write, out)
    }

    fn mapped_write_failed(&self, err: &Error) {
        self.failstop.latch(err);
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        let Some(d) = &self.dynamic else {
            return self.guard(self.storage().write_at(buf, offset));
        };
        self.for_each_piece(offset, buf.len() as u64, |b, within, start, n| {
            self.write_block_part(d, b, within, &buf[start..start + n])
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        if self.is_diff() {
            // Zeros must hide the parent: store them in this layer.
            return in_zero_chunks(len, |zeros, done| self.write_at(zeros, offset + done));
        }
        self.zero_in_place(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        let Some(d) = self.dynamic.as_ref().filter(|_| self.is_diff()) else {
            return self.zero_in_place(offset, len, true);
        };
        self.for_each_piece(offset, len, |b, within, _, n| {
            if d.bat.get(b).is_none() {
                return Ok(());
            }
            let s0 = (within / 512) as usize;
            let s1 = s0 + n / 512;
            self.with_bitmap(d, b, |bm| {
                if bat::run_len(bm, s0, s1) == s1 - s0 && !bat::bit(bm, s0) {
                    return Ok(());
                }
                bat::set_bits(bm, s0, s1, false);
                self.write_bitmap_range(d, b, bm, s0, s1)
            })
        })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.failstop.check()?;
        // Takes no allocation or bitmap lock: reads and overwrites go on meanwhile, and
        // concurrent flushes share their syncs and BAT writes.
        self.persist()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        check_request(&self.info(), offset, len, false)?;
        if len == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "empty block_status query",
            ));
        }
        let Some(d) = &self.dynamic else {
            return Ok(StatusRun {
                status: BlockStatus::Data,
                len,
                file_offset: Some(offset),
            });
        };
        let bs = self.block_size();
        let b = (offset / bs) as usize;
        let within = offset % bs;
        let n = (bs - within).min(len);
        let Some(data) = self.data_offset(d, b) else {
            // Merge following unallocated blocks.
            let mut run = n;
            while run < len && d.bat.get(((offset + run) / bs) as usize).is_none() {
                run += bs.min(len - run);
            }
            return Ok(StatusRun {
                status: BlockStatus::Unallocated,
                len: run,
                file_offset: None,
            });
        };
        if !self.is_diff() {
            return Ok(StatusRun {
                status: BlockStatus::Data,
                len: n,
                file_offset: Some(data + within),
            });
        }
        let s0 = (within / 512) as usize;
        let s1 = s0 + (n / 512) as usize;
        let (present, run) =
            self.with_bitmap(d, b, |bm| Ok((bat::bit(bm, s0), bat::run_len(bm, s0, s1))))?;
        Ok(if present {
            StatusRun {
                status: BlockStatus::Data,
                len: run as u64 * 512,
                file_offset: Some(data + within),
            }
        } else {
            StatusRun {
                status: BlockStatus::Unallocated,
                len: run as u64 * 512,
                file_offset: None,
            }
        })
    }
}
