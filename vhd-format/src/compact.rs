//! Compaction of a dynamic or differencing [`VhdFile`]: blocks that hold nothing become
//! unallocated, allocated blocks move from the end of the file into holes lower down, and the
//! file is truncated (VHD spec 1.0, "Block Allocation Table and Data Blocks": a block is
//! wherever its BAT entry says; unreferenced space between blocks is legal).
//!
//! [`VhdCompactor`] works in steps, so that an online job can run each one with the block's
//! guest range held exclusively (no guest I/O to the block while it changes) and yield to
//! the guest in between; [`VhdCompactor::compact`] runs them all for an image nobody else
//! uses.
//!
//! 1. [`reclaim`](VhdCompactor::reclaim): a block of a dynamic disk whose data is all zeros,
//!    or a block of a differencing disk whose sector bitmap is all clear (nothing present:
//!    discarded, reads fall through to the parent), gets the BAT entry `0xFFFFFFFF`. A
//!    differencing block with any sector present is kept even when its data is zeros: it
//!    hides the parent. The BAT sector is written at once; the space is reused only after a
//!    sync (step 2 starts with one).
//! 2. [`plan_move`](VhdCompactor::plan_move) makes every earlier change durable (a flush),
//!    then picks the block lying highest in the file and the lowest hole below it that holds
//!    a block (its data on a 64 KiB boundary when the hole allows it, else on a sector).
//!    [`move_block`](VhdCompactor::move_block) copies the bitmap and data there, syncs, and
//!    only then rewrites the block's BAT sector (no sync: the old copy stays valid and
//!    untouched until the truncation, which syncs first).
//! 3. [`truncate`](VhdCompactor::truncate): a flush, then the footer at the new end of data,
//!    a sync, `set_len`, a sync.
//!
//! Crash safety at every write or sync: a BAT entry only ever points at a durable copy of its
//! block (the old one until the new one is synced; an unallocated entry points nowhere); a
//! hole is written only after the BAT change that freed it is durable; the old place of a
//! moved block is never written again before the truncation; a footer lies past every block
//! before the file is cut (until `set_len`, the old footer at the old end is still the last
//! sector). Allocations by concurrent writers go past the end as always and are never moved
//! until published and persisted; the truncation waits for none but holds the allocation lock
//! across its two syncs (an allocating writer waits that long), and is skipped while an
//! allocation is in flight.

use std::sync::Arc;

use block_io::{Error, ErrorKind, Result, Storage};

use crate::bat::{self, ENTRIES_PER_SECTOR, UNALLOCATED};
use crate::file::VhdFile;
use crate::footer::{DiskType, FOOTER_SIZE};
use crate::header::HEADER_SIZE;
use crate::layout::{self, Area};

/// Where a moved block's data should start (as new blocks are placed, `alloc.rs`).
const DATA_ALIGN: u64 = 65536;

/// Bytes copied or checked per I/O.
const IO_CHUNK: u64 = 1 << 20;

/// One block move chosen by [`VhdCompactor::plan_move`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMove {
    /// The block (BAT index).
    pub block: u64,
    /// File offset of its bitmap now.
    pub from: u64,
    /// File offset its bitmap moves to.
    pub to: u64,
    /// Bytes moved (bitmap and data).
    pub len: u64,
}

/// What [`VhdCompactor::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactStats {
    /// Blocks made unallocated.
    pub reclaimed: u64,
    /// Blocks moved lower in the file.
    pub moved: u64,
    /// File length before.
    pub len_before: u64,
    /// File length after.
    pub len_after: u64,
}

/// Compaction steps over a writable dynamic or differencing VHD (see the module docs).
#[derive(Debug)]
pub struct VhdCompactor<S: Storage> {
    file: Arc<VhdFile<S>>,
}

fn unsupported(what: &str) -> Error {
    Error::new(ErrorKind::Unsupported, format!("cannot compact {what}"))
}

impl<S: Storage> VhdCompactor<S> {
    /// A compactor for `file`, which must be a writable dynamic or differencing image
    /// (`Unsupported` for a fixed disk, `ReadOnly` for a read-only open).
    pub fn new(file: Arc<VhdFile<S>>) -> Result<Self> {
        if file.dynamic.is_none() || file.disk_type() == DiskType::Fixed {
            return Err(unsupported("a fixed VHD"));
        }
        if block_io::BlockDevice::info(&*file).read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "cannot compact an image opened read-only",
            ));
        }
        Ok(VhdCompactor { file })
    }

    /// The image.
    pub fn file(&self) -> &Arc<VhdFile<S>> {
        &self.file
    }

    fn layout(&self) -> Result<&crate::layout::DynamicLayout> {
        self.file
            .dynamic
            .as_ref()
            .ok_or_else(|| unsupported("a fixed VHD"))
    }

    /// Virtual bytes per block (what a job locks while it changes one).
    pub fn block_size(&self) -> u64 {
        self.file
            .dynamic
            .as_ref()
            .map_or(0, |d| u64::from(d.header.block_size))
    }

    /// Blocks covering the virtual disk.
    pub fn block_count(&self) -> u64 {
        let bs = self.block_size().max(1);
        self.file.footer.current_size.div_ceil(bs)
    }

    /// File bytes one allocated block takes (bitmap and data).
    fn block_total(&self) -> u64 {
        self.file
            .dynamic
            .as_ref()
            .map_or(0, |d| d.bitmap_size + u64::from(d.header.block_size))
    }

    /// Whether block `b`'s entry is published but not yet in the file (a flush persists it).
    fn pending(&self, b: usize) -> bool {
        self.file.commit.lock().contains(b)
    }

    /// Step 1: makes block `block` unallocated if it holds nothing (see the module docs).
    /// The caller keeps guest I/O off the block's range meanwhile. Returns whether it did.
    pub fn reclaim(&self, block: u64) -> Result<bool> {
        let d = self.layout()?;
        let f = &*self.file;
        f.failstop.check()?;
        let b = usize::try_from(block).map_err(|_| unsupported("a block past the BAT"))?;
        if f.dynamic.as_ref().and_then(|d| d.bat.get(b)).is_none() {
            return Ok(false);
        }
        if self.pending(b) {
            f.persist()?;
        }
        let Some(sector) = d.bat.get(b) else {
            return Ok(false);
        };
        let start = u64::from(sector) * 512;
        let empty = if f.is_diff() {
            let mut bm = vec![0u8; d.bitmap_size as usize];
            f.storage().read_at(&mut bm, start)?;
            let spb = (u64::from(d.header.block_size) / 512) as usize;
            !bat::bit(&bm, 0) && bat::run_len(&bm, 0, spb) >= spb
        } else {
            self.all_zero(start + d.bitmap_size, u64::from(d.header.block_size))?
        };
        if !empty {
            return Ok(false);
        }
        let p = f.commit.lock();
        f.failstop.check()?;
        if d.bat.get(b) != Some(sector) || p.contains(b) {
            return Ok(false);
        }
        d.bat.set(b, UNALLOCATED);
        let (rel, bytes) = d
            .bat
            .sector_bytes(b / ENTRIES_PER_SECTOR, |i| p.contains(i));
        f.guard(f.storage().write_at(&bytes, d.header.table_offset + rel))?;
        Ok(true)
    }

    fn all_zero(&self, off: u64, len: u64) -> Result<bool> {
        let mut buf = vec![0u8; IO_CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = IO_CHUNK.min(len - done) as usize;
            self.file.storage().read_at(&mut buf[..n], off + done)?;
            if buf[..n].iter().any(|&x| x != 0) {
                return Ok(false);
            }
            done += n as u64;
        }
        Ok(true)
    }

    /// Metadata areas: footer copy, dynamic header, BAT, parent locator data.
    fn meta_areas(&self) -> Result<Vec<Area>> {
        let d = self.layout()?;
        let f = &*self.file;
        let bat_bytes = (u64::from(d.header.max_table_entries) * 4).div_ceil(512) * 512;
        let mut areas = vec![
            (0, FOOTER_SIZE as u64),
            (f.footer.data_offset.unwrap_or(512), HEADER_SIZE as u64),
            (d.header.table_offset, bat_bytes),
        ];
        if f.is_diff() {
            for l in &d.header.locators {
                let len = u64::from(l.data_length).div_ceil(512) * 512;
                areas.push((l.data_offset, len.max(l.reserved_bytes())));
            }
        }
        Ok(areas)
    }

    /// Step 2a: flushes (every earlier change durable, so freed space may be reused), then
    /// picks the highest block and the lowest hole below it that holds it; `None` when no
    /// block can move lower.
    pub fn plan_move(&self) -> Result<Option<BlockMove>> {
        let d = self.layout()?;
        let f = &*self.file;
        f.persist()?;
        let total = self.block_total();
        let mut used = self.meta_areas()?;
        let p = f.commit.lock();
        let mut highest: Option<(u64, usize)> = None;
        for (b, sector) in d.bat.allocated() {
            let off = u64::from(sector) * 512;
            used.push((off, total));
            // A block published after the flush is moved by a later pass.
            if !p.contains(b) && highest.is_none_or(|(o, _)| off > o) {
                highest = Some((off, b));
            }
        }
        drop(p);
        let Some((from, block)) = highest else {
            return Ok(None);
        };
        used.sort_unstable();
        let mut cursor = 0u64;
        for &(s, l) in &used {
            if s > from {
                break;
            }
            let aligned = (cursor + d.bitmap_size).next_multiple_of(DATA_ALIGN) - d.bitmap_size;
            let sector = cursor.next_multiple_of(512);
            for to in [aligned, sector] {
                if to + total <= s && to + total <= from {
                    return Ok(Some(BlockMove {
                        block: block as u64,
                        from,
                        to,
                        len: total,
                    }));
                }
            }
            cursor = cursor.max(s.saturating_add(l));
        }
        Ok(None)
    }

    /// Step 2b: moves a block as planned (see the module docs); the caller keeps guest I/O
    /// off the block's range meanwhile. Returns `false`, having changed nothing, when the
    /// block is no longer where the plan found it.
    pub fn move_block(&self, m: &BlockMove) -> Result<bool> {
        let d = self.layout()?;
        let f = &*self.file;
        f.failstop.check()?;
        let b = usize::try_from(m.block).map_err(|_| unsupported("a block past the BAT"))?;
        let (Ok(from_s), Ok(to_s)) = (u32::try_from(m.from / 512), u32::try_from(m.to / 512))
        else {
            return Ok(false);
        };
        if m.len != self.block_total()
            || m.from % 512 != 0
            || m.to % 512 != 0
            || m.to + m.len > m.from
            || to_s == UNALLOCATED
            || d.bat.get(b) != Some(from_s)
            || self.pending(b)
        {
            return Ok(false);
        }
        let mut buf = vec![0u8; IO_CHUNK.min(m.len) as usize];
        let mut done = 0;
        while done < m.len {
            let n = IO_CHUNK.min(m.len - done) as usize;
            f.storage().read_at(&mut buf[..n], m.from + done)?;
            f.guard(f.storage().write_at(&buf[..n], m.to + done))?;
            done += n as u64;
        }
        // The copy is durable before the BAT points at it.
        f.sync_durable()?;
        let p = f.commit.lock();
        f.failstop.check()?;
        if d.bat.get(b) != Some(from_s) || p.contains(b) {
            return Ok(false);
        }
        d.bat.set(b, to_s);
        let (rel, bytes) = d
            .bat
            .sector_bytes(b / ENTRIES_PER_SECTOR, |i| p.contains(i));
        f.guard(f.storage().write_at(&bytes, d.header.table_offset + rel))?;
        Ok(true)
    }

    /// Step 3: flushes, then cuts the file after the last block (see the module docs).
    /// Returns the bytes the file shrank by (0 when nothing could be cut, or an allocation
    /// was in flight).
    pub fn truncate(&self) -> Result<u64> {
        let d = self.layout()?;
        let f = &*self.file;
        f.persist()?;
        let meta = self.meta_areas()?;
        let total = self.block_total();
        let _p = f.commit.lock();
        let mut st = f.alloc.lock();
        if !st.idle() {
            return Ok(0);
        }
        let last = d.bat.allocated().map(|(_, s)| u64::from(s) * 512).max();
        let new_end = layout::first_free(&meta, last, total)
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "image end out of range"))?;
        let old_len = f.storage().len()?;
        if new_end >= st.end || new_end + FOOTER_SIZE as u64 >= old_len {
            return Ok(0);
        }
        // VHD 1.0: the footer is the last structure; durable past every block before the
        // file is cut, so a lost `set_len` leaves the old end footer in place.
        f.guard(f.storage().write_at(&f.footer_bytes, new_end))?;
        f.sync_durable()?;
        let new_len = new_end + FOOTER_SIZE as u64;
        f.guard(f.storage().set_len(new_len))?;
        st.end = new_end;
        f.sync_durable()?;
        Ok(old_len - new_len)
    }

    /// All steps, for an image no one else writes: reclaims every empty block, moves blocks
    /// down while a hole below them fits one, truncates.
    pub fn compact(&self) -> Result<CompactStats> {
        let mut stats = CompactStats {
            len_before: self.file.storage().len()?,
            ..CompactStats::default()
        };
        for b in 0..self.block_count() {
            stats.reclaimed += u64::from(self.reclaim(b)?);
        }
        while let Some(m) = self.plan_move()? {
            if !self.move_block(&m)? {
                break;
            }
            stats.moved += 1;
        }
        self.truncate()?;
        stats.len_after = self.file.storage().len()?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use block_io::{BlockDevice, BlockStatus, FaultStorage, MemStorage};

    use super::*;
    use crate::{CreateOptions, DifferencingOptions, Subformat};

    const MB2: u64 = 2 << 20;

    fn image(blocks: u64) -> Arc<VhdFile<Arc<MemStorage>>> {
        let st = Arc::new(MemStorage::new());
        let opts = CreateOptions::new(blocks * MB2, Subformat::Dynamic);
        Arc::new(VhdFile::create(st, &opts).unwrap())
    }

    fn read_all<D: BlockDevice + ?Sized>(d: &D) -> Vec<u8> {
        let mut v = vec![0u8; d.info().virtual_size as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    /// Zero blocks become unallocated, the blocks past them move down, the file shrinks, and
    /// the image reads as before (also after a reopen) and checks clean.
    #[test]
    fn dynamic_compacts_and_reads_the_same() {
        let f = image(8);
        for b in 0..8u64 {
            f.write_at(&[b as u8 + 1; 4096], b * MB2 + 512).unwrap();
        }
        // Blocks 1, 2 and 5 end up all zeros (allocated, data zeroed).
        for b in [1u64, 2, 5] {
            f.write_at(&vec![0u8; MB2 as usize], b * MB2).unwrap();
        }
        f.flush().unwrap();
        let before = read_all(&*f);
        let c = VhdCompactor::new(f.clone()).unwrap();
        let s = c.compact().unwrap();
        assert_eq!(s.reclaimed, 3);
        assert!(s.moved >= 2, "{s:?}");
        assert!(
            s.len_after + 3 * MB2 <= s.len_before,
            "the file shrank by three blocks: {s:?}"
        );
        assert_eq!(f.storage().len().unwrap(), s.len_after);
        assert_eq!(read_all(&*f), before);
        for b in [1u64, 2, 5] {
            let st = f.block_status(b * MB2, MB2).unwrap().status;
            assert_eq!(st, BlockStatus::Unallocated);
        }
        let st = f.storage().clone();
        drop(c);
        drop(f);
        assert!(crate::check_storage(&*st).unwrap().is_clean());
        let again = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        assert_eq!(read_all(&again), before);
        // Writes after compaction allocate past the new end and read back.
        again.write_at(&[9; 512], 2 * MB2).unwrap();
        again.flush().unwrap();
        let mut buf = [0u8; 512];
        again.read_at(&mut buf, 2 * MB2).unwrap();
        assert_eq!(buf, [9; 512]);
        drop(again);
        assert!(crate::check_storage(&*st).unwrap().is_clean());
    }

    /// A differencing block is dropped only when no sector is present; zeros written into
    /// the layer stay (they hide the parent).
    #[test]
    fn differencing_keeps_blocks_that_hide_the_parent() {
        let parent = image(4);
        parent.write_at(&[7; 4096], 0).unwrap();
        let details = parent.details();
        let opts = DifferencingOptions::for_parent(&details, "p.vhd", None, None);
        let child =
            Arc::new(VhdFile::create_differencing(Arc::new(MemStorage::new()), &opts).unwrap());
        child.write_zeroes(0, 4096, false).unwrap(); // hides the parent: kept
        child.write_at(&[3; 512], MB2).unwrap();
        child.discard(MB2, 512).unwrap(); // nothing present any more: dropped
        child.write_at(&[4; 512], 3 * MB2).unwrap(); // the last block: moved down
        child.flush().unwrap();
        let c = VhdCompactor::new(child.clone()).unwrap();
        let s = c.compact().unwrap();
        assert_eq!((s.reclaimed, s.moved), (1, 1), "{s:?}");
        assert!(s.len_after < s.len_before);
        assert_eq!(
            child.block_status(0, 4096).unwrap().status,
            BlockStatus::Data
        );
        let mut buf = [1u8; 4096];
        child.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4096]);
        let st = child.block_status(MB2, MB2).unwrap();
        assert_eq!((st.status, st.len), (BlockStatus::Unallocated, MB2));
        child.read_at(&mut buf[..512], 3 * MB2).unwrap();
        assert_eq!(buf[..512], [4; 512]);
    }

    #[test]
    fn fixed_and_read_only_are_refused() {
        let opts = CreateOptions::new(MB2, Subformat::Fixed);
        let f = Arc::new(VhdFile::create(Arc::new(MemStorage::new()), &opts).unwrap());
        assert_eq!(
            VhdCompactor::new(f).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let d = image(2);
        let st = d.storage().clone();
        drop(d);
        let ro = Arc::new(VhdFile::open(st, &crate::OpenOptions::new().read_only(true)).unwrap());
        assert_eq!(
            VhdCompactor::new(ro).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }

    /// Data and, for a differencing layer (where absent sectors show the parent), presence
    /// (`block_status` per 4 KiB) of a layer.
    fn view<S: Storage>(f: &VhdFile<S>) -> (Vec<u8>, Vec<bool>) {
        let size = f.info().virtual_size;
        let diff = f.disk_type() == DiskType::Differencing;
        let present = (0..size / 4096)
            .filter(|_| diff)
            .map(|i| f.block_status(i * 4096, 4096).unwrap().status == BlockStatus::Data)
            .collect();
        (read_all(f), present)
    }

    /// Power cut at every write and sync of a compaction of `bytes` (each pending write lost,
    /// kept or torn by a seed): the image opens, checks clean and reads as before (data and
    /// which sectors the layer holds).
    fn crash_sweep(bytes: &[u8]) {
        let before = view(
            &VhdFile::open(
                MemStorage::from_bytes(bytes),
                &crate::OpenOptions::new().read_only(true),
            )
            .unwrap(),
        );
        let total = FaultStorage::sweep_cuts(
            bytes,
            |fs| Arc::new(VhdFile::open(fs, &crate::OpenOptions::new()).unwrap()),
            |f| {
                let _ = VhdCompactor::new(f).and_then(|c| c.compact());
            },
            4,
            |n, seed, img| {
                let img = Arc::new(img);
                let f = VhdFile::open(img.clone(), &crate::OpenOptions::new().read_only(true))
                    .unwrap_or_else(|e| panic!("cut {n} seed {seed}: {e}"));
                assert!(view(&f) == before, "cut {n} seed {seed}");
                drop(f);
                let r = crate::check_storage(&*img).unwrap();
                assert!(r.is_clean(), "cut {n} seed {seed}: {r:?}");
            },
        );
        assert!(total > 4);
    }

    #[test]
    fn crash_at_every_step_leaves_the_image_readable() {
        let f = image(6);
        for b in 0..6u64 {
            f.write_at(&[b as u8 + 1; 1024], b * MB2).unwrap();
        }
        for b in [0u64, 2] {
            f.write_at(&vec![0u8; MB2 as usize], b * MB2).unwrap();
        }
        f.flush().unwrap();
        let bytes = f.storage().to_vec().unwrap();
        drop(f);
        crash_sweep(&bytes);
    }

    /// The same for a differencing layer: blocks discarded (nothing present) go, the later
    /// ones (bitmaps included) move down.
    #[test]
    fn crash_at_every_step_of_a_differencing_compaction() {
        let parent = image(6);
        let details = parent.details();
        let opts = DifferencingOptions::for_parent(&details, "p.vhd", None, None);
        let child = VhdFile::create_differencing(Arc::new(MemStorage::new()), &opts).unwrap();
        for b in 0..6u64 {
            child
                .write_at(&[b as u8 + 1; 1024], b * MB2 + 4096)
                .unwrap();
        }
        child.write_zeroes(5 * MB2, 4096, false).unwrap();
        for b in [1u64, 3] {
            child.discard(b * MB2, MB2).unwrap();
        }
        child.flush().unwrap();
        let bytes = child.storage().to_vec().unwrap();
        drop(child);
        let f = Arc::new(
            VhdFile::open(
                MemStorage::from_bytes(&bytes),
                &crate::OpenOptions::new().read_only(false),
            )
            .unwrap(),
        );
        let s = VhdCompactor::new(f).unwrap().compact().unwrap();
        assert!(s.reclaimed == 2 && s.moved >= 1, "{s:?}");
        crash_sweep(&bytes);
    }
}
