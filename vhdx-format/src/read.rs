//! The read side of [`VhdxFile`]: mapping a request through the in-memory BAT (MS-VHDX 2.5)
//! and, for PARTIALLY_PRESENT blocks, the sector bitmap (2.5.1.2, bit 0 of byte 0 = first
//! sector), then reading outside any lock; and `block_status`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use std::sync::atomic::Ordering;

use block_io::{
    check_request, push_mapping, BlockStatus, Error, ErrorKind, Mapping, RawBuf, Result, StatusRun,
    Storage,
};

use crate::bat::{BatEntry, BlockState};
use crate::error::corrupt_io;
use crate::file::{VhdxFile, BITMAP_BLOCK};

/// The bitmap page cache: page key (chunk * pages per bitmap block + page) to page bytes.
pub(crate) type PageMap = HashMap<u64, Box<[u8]>, BuildHasherDefault<PageHasher>>;

/// A multiplicative hash: the keys are page numbers, not attacker-chosen strings, and the
/// map is bounded, so SipHash's cost buys nothing on this hot path.
#[derive(Debug, Default)]
pub(crate) struct PageHasher(u64);

impl Hasher for PageHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// Bytes per cached sector-bitmap page (4096 * 8 sectors: 16 MiB of 512-byte sectors).
const BITMAP_PAGE: u64 = 4096;

/// Most bitmap pages cached per layer (4 MiB of memory); the cache is emptied when full.
const MAX_BITMAP_PAGES: usize = 1024;

/// The state of bit `bit0` of `bytes` (LSB-first, MS-VHDX 2.5.1.2) and how many of the
/// `count` bits from it share it (at least 1; bits past `bytes` count as absent).
fn run_of(bytes: &[u8], bit0: u64, count: u64) -> (bool, u64) {
    let byte = |i: u64| bytes.get((i / 8) as usize).copied().unwrap_or(0);
    let v = byte(bit0) & (1 << (bit0 % 8)) != 0;
    let end = bit0 + count.max(1);
    let mut i = bit0;
    while i < end {
        // Bits that differ from `v`, from bit `i` to the end of its byte.
        let differ = u32::from(if v { !byte(i) } else { byte(i) }) >> (i % 8);
        if differ != 0 {
            return (v, (i + u64::from(differ.trailing_zeros())).min(end) - bit0);
        }
        i += 8 - i % 8;
    }
    (v, end - bit0)
}

/// The status of a whole block in state `e` (PARTIALLY_PRESENT blocks need their bitmap).
fn status_of(e: &BatEntry) -> BlockStatus {
    match e.state {
        BlockState::NotPresent => BlockStatus::Unallocated,
        BlockState::FullyPresent | BlockState::PartiallyPresent => BlockStatus::Data,
        _ => BlockStatus::Zero,
    }
}

impl<S: Storage> VhdxFile<S> {
    /// Whether sector `first` of `block` (which is PARTIALLY_PRESENT) is present, and how many
    /// of the `count >= 1` sectors from it share that state (at least 1; a run may stop early
    /// at a cached page's end, so callers loop).
    ///
    /// The bitmap comes from the writer's in-memory copy of the chunk when it has one (it
    /// holds every change of this session), otherwise from a bounded cache of 4 KiB pages
    /// read from the file on demand. A chunk never leaves the writer's map, and the writer
    /// loads a chunk from the file before changing it, so a page cached from the file is
    /// only consulted while the file (through the replay overlay) is the truth for its chunk.
    pub(crate) fn sector_run(&self, block: u64, first: u64, count: u64) -> Result<(bool, u64)> {
        let chunk = block / self.geo.chunk_ratio;
        let sectors_per_block =
            u64::from(self.geo.block_size) / u64::from(self.geo.logical_sector_size);
        let bit0 = (block % self.geo.chunk_ratio) * sectors_per_block + first;
        // Only writes fill `bitmaps`: a read-only layer skips its lock.
        if !self.read_only {
            if let Some(bm) = self.bitmaps.read().get(&chunk) {
                return Ok(run_of(bm, bit0, count));
            }
        }
        let page = bit0 / (BITMAP_PAGE * 8);
        let in_page = bit0 % (BITMAP_PAGE * 8);
        let count = count.min(BITMAP_PAGE * 8 - in_page);
        let key = chunk * (BITMAP_BLOCK / BITMAP_PAGE) + page;
        if let Some(p) = self.bitmap_pages.read().get(&key) {
            return Ok(run_of(p, in_page, count));
        }
        let e = BatEntry::try_from(self.bitmap_entry(chunk))?;
        if e.state != BlockState::FullyPresent {
            return Err(corrupt_io(format!(
                "block {block} is partially present but its sector bitmap is not"
            )));
        }
        // MS-VHDX 2.5.1.2: a sector bitmap block is 1 MiB, so every page lies inside it (and
        // inside the file: open checked the entry).
        let mut p = vec![0u8; BITMAP_PAGE as usize].into_boxed_slice();
        self.read_file(&mut p, e.file_offset + page * BITMAP_PAGE)?;
        let run = run_of(&p, in_page, count);
        let mut pages = self.bitmap_pages.write();
        if pages.len() >= MAX_BITMAP_PAGES {
            pages.clear();
        }
        pages.insert(key, p);
        Ok(run)
    }

    pub(crate) fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(&self.info_inner(), offset, buf.len() as u64, false)?;
        for p in self.geo.pieces(offset, buf.len() as u64) {
            let e = BatEntry::try_from(self.entry(p.block))?;
            self.read_piece(&mut buf[p.range()], p.block, p.in_block, &e)?;
        }
        Ok(())
    }

    /// Reads `piece`, which starts `in_block` bytes into `block`, whose entry is `e`: from
    /// the file, through the sector bitmap, or as zeros.
    fn read_piece(&self, piece: &mut [u8], block: u64, in_block: u64, e: &BatEntry) -> Result<()> {
        match e.state {
            BlockState::FullyPresent => self.read_file(piece, e.file_offset + in_block)?,
            BlockState::PartiallyPresent => {
                let sector = u64::from(self.geo.logical_sector_size);
                let total = piece.len() as u64 / sector;
                let mut i = 0;
                while i < total {
                    let (present, run) =
                        self.sector_run(block, in_block / sector + i, total - i)?;
                    let (s, t) = ((i * sector) as usize, ((i + run) * sector) as usize);
                    if present {
                        self.read_file(&mut piece[s..t], e.file_offset + in_block + s as u64)?;
                    } else {
                        piece[s..t].fill(0);
                    }
                    i += run;
                }
            }
            _ => piece.fill(0),
        }
        Ok(())
    }

    /// [`BlockDevice::read_data_at`](block_io::BlockDevice::read_data_at): pieces in FULLY_ or
    /// PARTIALLY_PRESENT blocks are read from the block without consulting the sector bitmap
    /// (the caller vouches that they are present); other blocks read as
    /// [`read_inner`](Self::read_inner) reads them.
    pub(crate) fn read_data_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(&self.info_inner(), offset, buf.len() as u64, false)?;
        for p in self.geo.pieces(offset, buf.len() as u64) {
            let piece = &mut buf[p.range()];
            let e = BatEntry::try_from(self.entry(p.block))?;
            if e.state.has_data() {
                self.read_file(piece, e.file_offset + p.in_block)?;
            } else {
                self.read_piece(piece, p.block, p.in_block, &e)?;
            }
        }
        Ok(())
    }

    /// Zero-copy read into raw memory: pieces in FULLY_PRESENT blocks go to the storage's
    /// `read_raw_at` (preadv straight into the caller's memory for a file); everything else —
    /// partial blocks, zero states, and every read of a read-only open whose log was replayed
    /// in memory — takes the bounce path through [`read_inner`](Self::read_inner).
    ///
    /// # Safety
    /// As [`BlockDevice::read_raw_at`](block_io::BlockDevice::read_raw_at).
    pub(crate) unsafe fn read_raw_inner(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        if self.overlay.is_some() {
            // SAFETY: the caller's contract, forwarded (the bounce checks the request).
            return unsafe { block_io::bounce_read_raw(self, bufs, offset) };
        }
        let total = block_io::raw_total(bufs)?;
        check_request(&self.info_inner(), offset, total, false)?;
        for p in self.geo.pieces(offset, total) {
            let piece = block_io::raw_slice(bufs, p.at, p.len as usize);
            let e = BatEntry::try_from(self.entry(p.block))?;
            if e.state == BlockState::FullyPresent {
                // SAFETY: `piece` lies inside the caller's buffers, valid for writes.
                unsafe {
                    self.storage
                        .read_raw_at(&piece, e.file_offset + p.in_block)?
                }
            } else {
                // SAFETY: as above; the bounce path reads through `read_inner`.
                unsafe { block_io::bounce_read_raw(self, &piece, offset + p.at)? }
            }
        }
        Ok(())
    }

    /// [`BlockDevice::map`](block_io::BlockDevice::map): FULLY_PRESENT blocks map to the
    /// file; for reads, PARTIALLY_PRESENT blocks map sector runs through the bitmap (absent
    /// runs to the parent), NOT_PRESENT blocks of a differencing image to the parent and the
    /// other states to zeros. A write maps only when every block it touches is FULLY_PRESENT
    /// and this session's header update is done (anything else changes metadata). Nothing
    /// maps while a read-only open's log replay lives in memory, or on storage that is not a
    /// plain file.
    pub(crate) fn map_inner(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Mapping>,
    ) -> Result<bool> {
        check_request(&self.info_inner(), offset, len, write)?;
        if write {
            self.failstop.check()?;
            if !self.session_started.load(Ordering::Acquire) {
                return Ok(false);
            }
        }
        if self.overlay.is_some() {
            return Ok(false);
        }
        let Some(handle) = self.storage.io_handle() else {
            return Ok(false);
        };
        let absent = |len| {
            if self.geo.has_parent {
                Mapping::Parent { len }
            } else {
                Mapping::Zero { len }
            }
        };
        let sector = u64::from(self.geo.logical_sector_size);
        for p in self.geo.pieces(offset, len) {
            let e = BatEntry::try_from(self.entry(p.block))?;
            let file = |at: u64, len: u64| Mapping::File {
                handle,
                file_offset: e.file_offset + at,
                len,
            };
            match e.state {
                BlockState::FullyPresent => push_mapping(out, file(p.in_block, p.len)),
                _ if write => return Ok(false),
                BlockState::PartiallyPresent => {
                    let total = p.len / sector;
                    let mut i = 0;
                    while i < total {
                        let (present, run) =
                            self.sector_run(p.block, p.in_block / sector + i, total - i)?;
                        let (at, n) = (p.in_block + i * sector, run * sector);
                        push_mapping(out, if present { file(at, n) } else { absent(n) });
                        i += run;
                    }
                }
                BlockState::NotPresent => push_mapping(out, absent(p.len)),
                _ => push_mapping(out, Mapping::Zero { len: p.len }),
            }
        }
        Ok(true)
    }

    pub(crate) fn block_status_inner(&self, offset: u64, len: u64) -> Result<StatusRun> {
        let info = self.info_inner();
        check_request(&info, offset, len, false)?;
        if len == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "empty status query"));
        }
        let bs = u64::from(self.geo.block_size);
        let sector = u64::from(self.geo.logical_sector_size);
        let end = offset + len;
        let block = offset / bs;
        let in_block = offset % bs;
        let e = BatEntry::try_from(self.entry(block))?;
        if e.state == BlockState::PartiallyPresent {
            let n = (bs - in_block).min(len);
            let (present, run) = self.sector_run(block, in_block / sector, n / sector)?;
            let run = run * sector;
            return Ok(if present {
                StatusRun {
                    status: BlockStatus::Data,
                    len: run,
                    file_offset: Some(e.file_offset + in_block),
                }
            } else {
                StatusRun {
                    status: BlockStatus::Unallocated,
                    len: run,
                    file_offset: None,
                }
            });
        }
        let status = status_of(&e);
        let mut run_end = ((block + 1) * bs).min(end);
        let mut b = block + 1;
        while run_end < end {
            let n = BatEntry::try_from(self.entry(b))?;
            if n.state == BlockState::PartiallyPresent || status_of(&n) != status {
                break;
            }
            if status == BlockStatus::Data && n.file_offset != e.file_offset + (b - block) * bs {
                break;
            }
            run_end = ((b + 1) * bs).min(end);
            b += 1;
        }
        Ok(StatusRun {
            status,
            len: run_end - offset,
            file_offset: (status == BlockStatus::Data).then_some(e.file_offset + in_block),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::run_of;
    use crate::{create, CreateOptions, ParentRef, VhdxFile};
    use block_io::{BlockDevice, BlockStatus, MemStorage};
    use std::sync::Arc;

    /// Bitmap pages cached by reads of a reopened layer never hide later writes (the writer's
    /// chunk copy wins), and a fresh open sees everything that was flushed.
    #[test]
    fn cached_bitmap_pages_follow_writes_and_reopen() {
        let mut co = CreateOptions::differencing(
            64 << 20,
            ParentRef {
                data_write_guid: uuid::Uuid::new_v4(),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        );
        co.block_size = Some(1 << 20);
        let mem = Arc::new(MemStorage::new());
        let f = create(mem.clone(), &co).unwrap();
        f.write_at(&[1; 4096], 8192).unwrap();
        f.close().unwrap();
        drop(f);
        let status = |f: &VhdxFile<Arc<MemStorage>>, off| f.block_status(off, 65536).unwrap();
        let f = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        // Reads fill the page cache from the file.
        assert_eq!(status(&f, 8192).status, BlockStatus::Data);
        assert_eq!(status(&f, 12288).status, BlockStatus::Unallocated);
        assert_eq!(status(&f, 0).len, 8192);
        // A write into the same block and chunk must show at once.
        f.write_at(&[2; 4096], 12288).unwrap();
        assert_eq!(status(&f, 12288).status, BlockStatus::Data);
        assert_eq!(status(&f, 8192).len, 8192);
        let mut buf = [0u8; 4096];
        f.read_at(&mut buf, 12288).unwrap();
        assert_eq!(buf, [2; 4096]);
        f.flush().unwrap();
        drop(f);
        let ro = VhdxFile::open(mem, &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(status(&ro, 12288).status, BlockStatus::Data);
        assert_eq!(status(&ro, 8192).len, 8192);
        assert_eq!(status(&ro, 4096).status, BlockStatus::Unallocated);
        ro.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [1; 4096]);
    }

    /// `run_of` against a bit-by-bit model, on every start and length over mixed bytes.
    #[test]
    fn run_of_matches_bitwise_model() {
        let bytes = [0x00, 0xFF, 0x0F, 0xF0, 0xAA, 0xFF, 0xFF, 0x01, 0x00, 0x80];
        let bit = |i: u64| {
            bytes
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        };
        for bit0 in 0..(bytes.len() as u64 * 8 + 4) {
            for count in 1..40 {
                let v = bit(bit0);
                let n = (bit0..bit0 + count).take_while(|&i| bit(i) == v).count() as u64;
                assert_eq!(
                    run_of(&bytes, bit0, count),
                    (v, n),
                    "bit0 {bit0} count {count}"
                );
            }
        }
    }
}
