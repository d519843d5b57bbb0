//! Compaction of a dynamic or differencing [`VhdxFile`]: payload blocks that hold nothing
//! change state and give their space back, blocks move from the end of the file into holes
//! lower down, and the file is truncated (MS-VHDX 2.5: a block is wherever its BAT entry
//! says; 2.5.1.1: payload block states).
//!
//! [`VhdxCompactor`] works in steps, so that an online job can run each with the block's guest
//! range held exclusively and yield to the guest in between; [`VhdxCompactor::compact`] runs
//! them all for an image nobody else uses.
//!
//! 1. [`reclaim`](VhdxCompactor::reclaim), by state (MS-VHDX 2.5.1.1):
//!    - FULLY_PRESENT with all-zero data becomes PAYLOAD_BLOCK_ZERO ("the block's contents
//!      are zero") in a dynamic image. In a differencing image such a block hides the
//!      parent and stays as it is: NOT_PRESENT would show the parent, and although MS-VHDX
//!      gives ZERO the same meaning there, libvhdi reads a ZERO block of a differencing
//!      image from the parent (checked with pyvhdi), so the space is not worth a chain that
//!      reads differently elsewhere;
//!    - PARTIALLY_PRESENT (differencing) with no sector present in its sector bitmap becomes
//!      NOT_PRESENT: it held no data, and every sector already read from the parent;
//!    - every other block is left alone (a partially present block whose present sectors are
//!      zeros would need ZERO for those sectors only; the format has no such state).
//!
//!    The new entry goes through the log like any BAT change, and the freed space is
//!    punched after that change is durable (`commit.rs`).
//! 2. [`plan_move`](VhdxCompactor::plan_move) commits what is pending (every freed range is
//!    durable and punched by then), then picks the payload block lying highest in the file
//!    and the lowest 1 MiB-aligned hole below it that holds a block.
//!    [`move_block`](VhdxCompactor::move_block) copies the block there and changes its BAT
//!    entry in memory; the next commit syncs the copy and then logs the entry (MS-VHDX 2.3:
//!    data durable before the metadata pointing at it). The old place is punched after that
//!    commit and not written before it.
//! 3. [`truncate`](VhdxCompactor::truncate), holding the log (no other commit runs):
//!    commits what is pending, marks the log empty (LogGuid = 0, a header update), cuts the
//!    file after the last structure in use, syncs, and starts a new log (a fresh LogGuid).
//!    Cutting with entries in the log would leave them claiming a FlushedFileOffset past the
//!    end of the file, which replay must refuse (MS-VHDX 2.3.3).
//!
//! A differencing image's sector bitmap blocks move the same way, with the log held (no
//! commit writes bitmap sectors at the old place meanwhile) and guest I/O kept off the whole
//! chunk the bitmap serves ([`BlockMove::guest_range`]).
//!
//! A compactor starts the image's write session keeping its DataWriteGuid when none has
//! started: moving blocks changes nothing a reader sees (MS-VHDX 2.2.2: DataWriteGuid changes
//! before the first user-visible change), so children of the image keep matching it.
//!
//! Crash safety at every write or sync: a BAT entry only ever points at a durable copy of its
//! block (the old one until the commit logging the new one; freed space is not reused before
//! the change freeing it is durable); a replay never meets a file cut below a logged
//! FlushedFileOffset (the log is empty while the file is cut). Allocations by concurrent
//! writers go past the end as always; the truncation is skipped while one is in flight.

use std::sync::Arc;

use block_io::{Error, ErrorKind, Result, Storage};
use uuid::Uuid;

use crate::bat::{state, BatEntry, BlockState};
use crate::file::{Subformat, VhdxFile, WriteState, BITMAP_BLOCK};
use crate::header::MIB;

/// Bytes copied or checked per I/O.
const IO_CHUNK: u64 = MIB;

/// One block move chosen by [`VhdxCompactor::plan_move`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMove {
    /// The payload block, or with `sector_bitmap` the chunk whose sector bitmap moves.
    pub block: u64,
    /// Whether a sector bitmap block moves (differencing images).
    pub sector_bitmap: bool,
    /// File offset of its data now.
    pub from: u64,
    /// File offset it moves to.
    pub to: u64,
    /// Bytes of file space it takes (the block size, or 1 MiB for a sector bitmap).
    pub len: u64,
    /// The virtual range `(offset, len)` the caller keeps guest I/O off while it moves: the
    /// block's, or for a sector bitmap its whole chunk's.
    pub guest_range: (u64, u64),
}

/// What [`VhdxCompactor::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactStats {
    /// Blocks that gave their space back.
    pub reclaimed: u64,
    /// Blocks moved lower in the file.
    pub moved: u64,
    /// File length before.
    pub len_before: u64,
    /// File length after.
    pub len_after: u64,
}

/// File ranges `(start, end)` in use, and the block lying highest `(offset, index, is a
/// sector bitmap)` (index: payload block or chunk).
type Used = (Vec<(u64, u64)>, Option<(u64, u64, bool)>);

/// Compaction steps over a writable dynamic or differencing VHDX (see the module docs).
#[derive(Debug)]
pub struct VhdxCompactor<S: Storage> {
    file: Arc<VhdxFile<S>>,
}

impl<S: Storage> VhdxCompactor<S> {
    /// A compactor for `file`, a writable dynamic or differencing image (`Unsupported` for a
    /// fixed one, whose blocks stay allocated, MS-VHDX 2.6.2.1; `ReadOnly` for a read-only
    /// open). Starts the write session, keeping the DataWriteGuid, if none has started.
    pub fn new(file: Arc<VhdxFile<S>>) -> Result<Self> {
        if file.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "cannot compact an image opened read-only",
            ));
        }
        if file.subformat() == Subformat::Fixed {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "cannot compact a fixed VHDX (LeaveBlockAllocated)",
            ));
        }
        let started = file.hdr.lock().session;
        if !started {
            match file.begin_session_with(file.header().data_write_guid) {
                // Another writer started it meanwhile.
                Err(e) if e.kind() == ErrorKind::InvalidInput => {}
                r => r?,
            }
        }
        Ok(VhdxCompactor { file })
    }

    /// The image.
    pub fn file(&self) -> &Arc<VhdxFile<S>> {
        &self.file
    }

    /// Virtual bytes per block (what a job locks while it changes one).
    pub fn block_size(&self) -> u64 {
        u64::from(self.file.geo.block_size)
    }

    /// Payload blocks covering the virtual disk.
    pub fn block_count(&self) -> u64 {
        self.file.geo.data_blocks
    }

    /// Bytes of block `b` inside the virtual disk (the last may be short).
    fn used_len(&self, b: u64) -> u64 {
        let bs = self.block_size();
        bs.min(self.file.meta.virtual_size.saturating_sub(b * bs))
    }

    fn all_zero(&self, off: u64, len: u64) -> Result<bool> {
        let mut buf = vec![0u8; IO_CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = IO_CHUNK.min(len - done) as usize;
            self.file.storage.read_at(&mut buf[..n], off + done)?;
            if buf[..n].iter().any(|&x| x != 0) {
                return Ok(false);
            }
            done += n as u64;
        }
        Ok(true)
    }

    /// Whether no sector of `block` (partially present) is present in its bitmap.
    fn no_sector_present(&self, block: u64) -> Result<bool> {
        let f = &*self.file;
        let chunk = block / f.geo.chunk_ratio;
        f.ensure_bitmap(chunk, true)?;
        let spb = self.block_size() / u64::from(f.geo.logical_sector_size);
        // spb >= 256 (blocks >= 1 MiB, sectors <= 4 KiB): the block's bits are whole bytes.
        let first = ((block % f.geo.chunk_ratio) * spb / 8) as usize;
        let maps = f.bitmaps.read();
        let bm = maps
            .get(&chunk)
            .ok_or_else(|| Error::new(ErrorKind::Corrupt, "sector bitmap not in memory"))?;
        Ok(bm
            .get(first..first + (spb / 8) as usize)
            .is_some_and(|r| r.iter().all(|&x| x == 0)))
    }

    /// Step 1: gives block `block`'s space back if it holds nothing (see the module docs).
    /// The caller keeps guest I/O off the block's range meanwhile. Returns whether it did.
    pub fn reclaim(&self, block: u64) -> Result<bool> {
        let f = &*self.file;
        f.failstop.check()?;
        if block >= self.block_count() {
            return Ok(false);
        }
        let raw = f.entry(block);
        let e = BatEntry::try_from(raw)?;
        let new_state = match e.state {
            BlockState::FullyPresent
                if !f.geo.has_parent && self.all_zero(e.file_offset, self.used_len(block))? =>
            {
                state::ZERO
            }
            BlockState::PartiallyPresent if self.no_sector_present(block)? => state::NOT_PRESENT,
            _ => return Ok(false),
        };
        let mut st = f.state.lock();
        while st.allocating.contains(&block) {
            f.state_cv.wait(&mut st);
        }
        if f.entry(block) != raw {
            return Ok(false);
        }
        let index = f.geo.payload_index(block);
        f.set_entry(&mut st, index, BatEntry::encode(new_state, 0));
        // Punched once the change is durable (commit.rs).
        st.punch.push((e.file_offset, self.block_size()));
        let pending = st.pending();
        drop(st);
        f.maybe_commit(pending)?;
        Ok(true)
    }

    /// File ranges `(start, end)` in use: header section, log, regions, present blocks
    /// (payload and sector bitmap), ranges waiting to be punched; and the highest payload
    /// block `(offset, block)`.
    fn used(&self, st: &WriteState) -> Result<Used> {
        let f = &*self.file;
        let h = f.header();
        let mut used = vec![(0, MIB), h.log_range()];
        used.extend(f.regions.all().map(|r| (r.file_offset, r.end())));
        let bs = self.block_size();
        used.extend(st.punch.iter().map(|&(o, l)| (o, o.saturating_add(l))));
        let mut highest: Option<(u64, u64, bool)> = None;
        for (i, a) in f.bat.iter().enumerate() {
            let raw = a.load(std::sync::atomic::Ordering::Acquire);
            let e = BatEntry::try_from(raw)?;
            if !e.state.has_data() {
                continue;
            }
            let i = i as u64;
            let bitmap = f.geo.has_parent && f.geo.is_bitmap_index(i);
            let (len, index) = if bitmap {
                (BITMAP_BLOCK, i / (f.geo.chunk_ratio + 1))
            } else {
                (bs, i - i / (f.geo.chunk_ratio + 1))
            };
            used.push((e.file_offset, e.file_offset.saturating_add(len)));
            if highest.is_none_or(|(o, _, _)| e.file_offset > o) {
                highest = Some((e.file_offset, index, bitmap));
            }
        }
        used.sort_unstable();
        Ok((used, highest))
    }

    /// Step 2a: commits what is pending (so freed space may be reused), then picks the
    /// highest payload block and the lowest hole below it that holds it; `None` when no
    /// block can move lower.
    pub fn plan_move(&self) -> Result<Option<BlockMove>> {
        self.file.flush_inner()?;
        let (used, highest) = self.used(&self.file.state.lock())?;
        let Some((from, block, sector_bitmap)) = highest else {
            return Ok(None);
        };
        let (len, guest_range) = self.span(block, sector_bitmap);
        let mut cursor = 0u64;
        for &(s, e) in &used {
            if s > from {
                break;
            }
            // MS-VHDX 2.5: blocks lie on 1 MiB boundaries.
            let to = cursor.next_multiple_of(MIB);
            if to + len <= s && to + len <= from {
                return Ok(Some(BlockMove {
                    block,
                    sector_bitmap,
                    from,
                    to,
                    len,
                    guest_range,
                }));
            }
            cursor = cursor.max(e);
        }
        Ok(None)
    }

    /// File bytes of block `index` (payload, or a chunk's sector bitmap) and the virtual
    /// range it serves, clipped to the disk.
    fn span(&self, index: u64, sector_bitmap: bool) -> (u64, (u64, u64)) {
        let bs = self.block_size();
        let size = self.file.meta.virtual_size;
        let (len, per) = if sector_bitmap {
            (BITMAP_BLOCK, bs.saturating_mul(self.file.geo.chunk_ratio))
        } else {
            (bs, bs)
        };
        let start = index.saturating_mul(per).min(size);
        (len, (start, per.min(size - start)))
    }

    /// Step 2b: moves a block as planned (see the module docs); the caller keeps guest I/O
    /// off [`BlockMove::guest_range`] meanwhile. Returns `false`, having changed nothing,
    /// when the block is no longer where the plan found it.
    pub fn move_block(&self, m: &BlockMove) -> Result<bool> {
        let f = &*self.file;
        f.failstop.check()?;
        let (len, _) = self.span(m.block, m.sector_bitmap);
        if m.len != len || m.to % MIB != 0 || m.to.saturating_add(m.len) > m.from {
            return Ok(false);
        }
        if m.sector_bitmap {
            return self.move_bitmap(m);
        }
        if m.block >= self.block_count() {
            return Ok(false);
        }
        let raw = f.entry(m.block);
        let e = BatEntry::try_from(raw)?;
        if !e.state.has_data() || e.file_offset != m.from {
            return Ok(false);
        }
        let len = self.used_len(m.block);
        let mut buf = vec![0u8; IO_CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = IO_CHUNK.min(len - done) as usize;
            f.storage.read_at(&mut buf[..n], m.from + done)?;
            f.failstop
                .guard(f.storage.write_at(&buf[..n], m.to + done))?;
            done += n as u64;
        }
        let mut st = f.state.lock();
        if f.entry(m.block) != raw {
            return Ok(false);
        }
        let index = f.geo.payload_index(m.block);
        // The next commit syncs the copy before it logs this entry.
        f.set_entry(&mut st, index, BatEntry::encode(raw & 7, m.to));
        st.punch.push((m.from, m.len));
        let pending = st.pending();
        drop(st);
        f.maybe_commit(pending)?;
        Ok(true)
    }

    /// Moves the sector bitmap block of chunk `m.block`, holding the log so that no commit
    /// writes its sectors meanwhile: the commit that starts the slot writes the pending ones
    /// in place (old place), the copy takes them along, and bits set later stay pending for
    /// the next commit, which writes them at the new place (it reads the entry then).
    fn move_bitmap(&self, m: &BlockMove) -> Result<bool> {
        let f = &*self.file;
        if !f.geo.has_parent || m.block.saturating_mul(f.geo.chunk_ratio) >= self.block_count() {
            return Ok(false);
        }
        let index = f.geo.bitmap_index(m.block);
        let moved = f.exclusive_commit(|| {
            let raw = f.bitmap_entry(m.block);
            let e = BatEntry::try_from(raw)?;
            if e.state != BlockState::FullyPresent || e.file_offset != m.from {
                return Ok(false);
            }
            let mut buf = vec![0u8; IO_CHUNK as usize];
            let mut done = 0;
            while done < m.len {
                let n = IO_CHUNK.min(m.len - done) as usize;
                f.storage.read_at(&mut buf[..n], m.from + done)?;
                f.failstop
                    .guard(f.storage.write_at(&buf[..n], m.to + done))?;
                done += n as u64;
            }
            let mut st = f.state.lock();
            if f.bitmap_entry(m.block) != raw || st.loading.contains(&m.block) {
                return Ok(false);
            }
            // MS-VHDX 2.5.1.2: SB_BLOCK_PRESENT at the new place; logged by the next commit,
            // after its sync makes the copy durable.
            f.set_entry(&mut st, index, BatEntry::encode(state::FULLY_PRESENT, m.to));
            st.punch.push((m.from, m.len));
            Ok(true)
        })?;
        Ok(moved)
    }

    /// Step 3: cuts the file after the last structure in use (see the module docs). Returns
    /// the bytes the file shrank by (0 when nothing could be cut, or an allocation was in
    /// flight).
    pub fn truncate(&self) -> Result<u64> {
        let f = &*self.file;
        f.flush_inner()?;
        f.exclusive_commit(|| {
            let session = f.hdr.lock().session;
            if session {
                // MS-VHDX 2.2.2: LogGuid 0, the log holds nothing to replay; true, as the
                // commit just applied every entry in place and synced.
                let mut h = f.hdr.lock();
                let mut next = h.header;
                next.log_guid = Uuid::nil();
                f.store_header(&mut h, next)?;
            }
            let cut = self.cut();
            if session {
                // A new log for the rest of the session (entries of the old one no longer
                // match and are never replayed).
                let mut h = f.hdr.lock();
                let mut next = h.header;
                next.log_guid = Uuid::new_v4();
                f.store_header(&mut h, next)?;
            }
            cut
        })
    }

    /// The cut itself, with the log empty.
    fn cut(&self) -> Result<u64> {
        let f = &*self.file;
        let mut grown = f.grown.lock();
        let mut st = f.state.lock();
        if !st.allocating.is_empty() || !st.loading.is_empty() {
            return Ok(0);
        }
        // Under the state lock: no block is published meanwhile.
        let (used, _) = self.used(&st)?;
        let new_end = used
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(MIB)
            .next_multiple_of(MIB);
        let old_len = f.failstop.guard(f.storage.len())?;
        if new_end >= old_len || new_end > st.file_end {
            return Ok(0);
        }
        // Reservations from now on start at the new end; their growth waits for `grown`.
        st.file_end = new_end;
        drop(st);
        f.failstop.guard(f.storage.set_len(new_end))?;
        *grown = new_end;
        drop(grown);
        f.failstop.guard(f.storage.sync_data())?;
        Ok(old_len - new_end)
    }

    /// All steps, for an image no one else writes: reclaims every empty block, moves blocks
    /// down while a hole below them fits one, truncates.
    pub fn compact(&self) -> Result<CompactStats> {
        let mut stats = CompactStats {
            len_before: self.file.storage.len()?,
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
        stats.len_after = self.file.storage.len()?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use block_io::{BlockDevice, BlockStatus, FaultStorage, MemStorage};

    use super::*;
    use crate::{create, CreateOptions, ParentRef};

    fn dynamic(blocks: u64) -> Arc<VhdxFile<Arc<MemStorage>>> {
        let mut o = CreateOptions::dynamic(blocks * MIB);
        o.block_size = Some(MIB as u32);
        Arc::new(create(Arc::new(MemStorage::new()), &o).unwrap())
    }

    fn read_all<D: BlockDevice + ?Sized>(d: &D) -> Vec<u8> {
        let mut v = vec![0u8; d.info().virtual_size as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    /// Zero blocks become ZERO, the blocks past them move down, the file shrinks, and the
    /// image reads as before (also after a reopen) and checks clean.
    #[test]
    fn dynamic_compacts_and_reads_the_same() {
        let f = dynamic(8);
        for b in 0..8u64 {
            f.write_at(&[b as u8 + 1; 4096], b * MIB + 4096).unwrap();
        }
        for b in [1u64, 2, 5] {
            f.write_at(&vec![0u8; MIB as usize], b * MIB).unwrap();
        }
        f.flush().unwrap();
        let before = read_all(&*f);
        let c = VhdxCompactor::new(f.clone()).unwrap();
        let s = c.compact().unwrap();
        assert_eq!(s.reclaimed, 3, "{s:?}");
        assert!(s.moved >= 2, "{s:?}");
        assert!(s.len_after + 3 * MIB <= s.len_before, "{s:?}");
        assert_eq!(read_all(&*f), before);
        for b in [1u64, 2, 5] {
            assert_eq!(f.entry(b) & 7, state::ZERO);
            assert_eq!(
                f.block_status(b * MIB, MIB).unwrap().status,
                BlockStatus::Zero
            );
        }
        assert!(f.check().unwrap().errors.is_empty());
        f.close().unwrap();
        let st = f.storage().clone();
        drop(c);
        drop(f);
        let again =
            VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        assert_eq!(read_all(&again), before);
        assert_eq!(again.check().unwrap().unreferenced_bytes, 0);
        // A write after compaction allocates past the new end and reads back.
        again.write_at(&[9; 512], MIB).unwrap();
        again.flush().unwrap();
        let mut buf = [0u8; 512];
        again.read_at(&mut buf, MIB).unwrap();
        assert_eq!(buf, [9; 512]);
        assert!(again.check().unwrap().errors.is_empty());
    }

    /// A compaction keeps the DataWriteGuid (children still match) when it starts the session.
    #[test]
    fn compaction_keeps_the_data_write_guid() {
        let f = dynamic(4);
        f.write_at(&[1; 512], 3 * MIB).unwrap();
        f.close().unwrap();
        let st = f.storage().clone();
        drop(f);
        let f = Arc::new(VhdxFile::open(st, &crate::OpenOptions::new().read_only(false)).unwrap());
        let id = f.header().data_write_guid;
        VhdxCompactor::new(f.clone()).unwrap().compact().unwrap();
        assert_eq!(f.header().data_write_guid, id);
    }

    /// Differencing: an all-zero fully present block stays (it hides the parent), one with
    /// data stays; the blocks past a discarded one move down.
    #[test]
    fn differencing_never_shows_the_parent_where_it_was_hidden() {
        let mut o = CreateOptions::differencing(
            8 * MIB,
            ParentRef {
                data_write_guid: Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        );
        o.block_size = Some(MIB as u32);
        let f = Arc::new(create(Arc::new(MemStorage::new()), &o).unwrap());
        f.write_at(&vec![0u8; MIB as usize], 0).unwrap(); // fully present zeros
        f.write_at(&[5; 512], MIB).unwrap(); // partially present
        f.discard(MIB, MIB).unwrap(); // unmapped
        f.write_at(&[6; 512], 2 * MIB + 512).unwrap(); // partially present, with data
        f.write_at(&[7; 4096], 7 * MIB).unwrap();
        f.flush().unwrap();
        let c = VhdxCompactor::new(f.clone()).unwrap();
        let s = c.compact().unwrap();
        assert_eq!(s.reclaimed, 0, "{s:?}");
        assert!(s.moved >= 1, "{s:?}");
        assert_eq!(f.entry(0) & 7, state::FULLY_PRESENT);
        assert_eq!(f.block_status(0, MIB).unwrap().status, BlockStatus::Data);
        let mut buf = [0u8; 4096];
        f.read_at(&mut buf, 7 * MIB).unwrap();
        assert_eq!(buf, [7; 4096]);
        f.read_at(&mut buf[..512], 2 * MIB + 512).unwrap();
        assert_eq!(buf[..512], [6; 512]);
        assert_eq!(f.entry(2) & 7, state::PARTIALLY_PRESENT);
        assert!(s.len_after < s.len_before, "{s:?}");
        assert!(f.check().unwrap().errors.is_empty());
    }

    /// A partially present block whose bits were all cleared becomes NOT_PRESENT.
    #[test]
    fn empty_partial_block_becomes_not_present() {
        let mut o = CreateOptions::differencing(
            4 * MIB,
            ParentRef {
                data_write_guid: Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        );
        o.block_size = Some(MIB as u32);
        let f = Arc::new(create(Arc::new(MemStorage::new()), &o).unwrap());
        f.write_at(&[5; 512], MIB).unwrap();
        assert_eq!(f.entry(1) & 7, state::PARTIALLY_PRESENT);
        // Clear the bits by hand, as a discard of sectors inside a block would.
        let chunk = 0;
        {
            let mut maps = f.bitmaps.write();
            let bm = maps.get_mut(&chunk).unwrap();
            let spb = (MIB / 512) as usize;
            bm[spb / 8..2 * spb / 8].fill(0);
        }
        let c = VhdxCompactor::new(f.clone()).unwrap();
        assert!(c.reclaim(1).unwrap());
        assert_eq!(f.entry(1) & 7, state::NOT_PRESENT);
        let s = f.block_status(MIB, MIB).unwrap();
        assert_eq!((s.status, s.len), (BlockStatus::Unallocated, MIB));
    }

    #[test]
    fn fixed_and_read_only_are_refused() {
        let mut o = CreateOptions::fixed(2 * MIB);
        o.block_size = Some(MIB as u32);
        let f = Arc::new(create(Arc::new(MemStorage::new()), &o).unwrap());
        assert_eq!(
            VhdxCompactor::new(f).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let d = dynamic(2);
        d.close().unwrap();
        let st = d.storage().clone();
        drop(d);
        let ro = Arc::new(VhdxFile::open(st, &crate::OpenOptions::new().read_only(true)).unwrap());
        assert_eq!(
            VhdxCompactor::new(ro).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }

    /// Data and, for a differencing layer (where absent sectors show the parent), presence
    /// (`block_status` per 4 KiB) of a layer.
    fn view<S: Storage>(f: &VhdxFile<S>) -> (Vec<u8>, Vec<bool>) {
        let size = f.info().virtual_size;
        let diff = f.subformat() == Subformat::Differencing;
        let present = (0..size / 4096)
            .filter(|_| diff)
            .map(|i| f.block_status(i * 4096, 4096).unwrap().status == BlockStatus::Data)
            .collect();
        (read_all(f), present)
    }

    /// Power cut at every write and sync of a compaction of `bytes` (each pending write lost,
    /// kept or torn by a seed): the image opens (replaying its log), checks clean and reads
    /// as before (data and which sectors the layer holds).
    fn crash_sweep(bytes: &[u8]) {
        let before = view(
            &VhdxFile::open(
                MemStorage::from_bytes(bytes),
                &crate::OpenOptions::new().read_only(true),
            )
            .unwrap(),
        );
        let total = FaultStorage::sweep_cuts(
            bytes,
            |fs| Arc::new(VhdxFile::open(fs, &crate::OpenOptions::new()).unwrap()),
            |f| {
                let _ = VhdxCompactor::new(f).and_then(|c| c.compact());
            },
            4,
            |n, seed, img| {
                let img = Arc::new(img);
                let f = VhdxFile::open(img.clone(), &crate::OpenOptions::new().read_only(false))
                    .unwrap_or_else(|e| panic!("cut {n} seed {seed}: {e}"));
                assert!(view(&f) == before, "cut {n} seed {seed}");
                let r = f.check().unwrap();
                assert!(r.errors.is_empty(), "cut {n} seed {seed}: {r:?}");
            },
        );
        assert!(total > 8, "{total}");
    }

    #[test]
    fn crash_at_every_step_leaves_the_image_readable() {
        let f = dynamic(6);
        for b in 0..6u64 {
            f.write_at(&[b as u8 + 1; 1024], b * MIB).unwrap();
        }
        for b in [0u64, 2] {
            f.write_at(&vec![0u8; MIB as usize], b * MIB).unwrap();
        }
        f.close().unwrap();
        let bytes = f.storage().to_vec().unwrap();
        drop(f);
        crash_sweep(&bytes);
    }

    /// The same for a differencing layer: discarded blocks leave holes, the later blocks
    /// (partially present ones, and the sector bitmap block) move down.
    #[test]
    fn crash_at_every_step_of_a_differencing_compaction() {
        let mut o = CreateOptions::differencing(
            6 * MIB,
            ParentRef {
                data_write_guid: Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        );
        o.block_size = Some(MIB as u32);
        let f = create(Arc::new(MemStorage::new()), &o).unwrap();
        // Blocks 0-2 whole (no bitmap needed), then partial writes: the sector bitmap block
        // lands after them, the partial blocks after it; blocks 0-2 are then discarded.
        for b in 0..3u64 {
            f.write_at(&vec![b as u8 + 1; MIB as usize], b * MIB)
                .unwrap();
        }
        for b in 3..5u64 {
            f.write_at(&[b as u8 + 1; 1024], b * MIB + 4096).unwrap();
        }
        for b in 0..3u64 {
            f.discard(b * MIB, MIB).unwrap();
        }
        f.close().unwrap();
        let bytes = f.storage().to_vec().unwrap();
        drop(f);
        let g = Arc::new(
            VhdxFile::open(
                MemStorage::from_bytes(&bytes),
                &crate::OpenOptions::new().read_only(false),
            )
            .unwrap(),
        );
        let bitmap_at = g.bitmap_entry(0) & crate::bat::OFFSET_MASK;
        let s = VhdxCompactor::new(g.clone()).unwrap().compact().unwrap();
        assert!(s.moved >= 3 && s.len_after < s.len_before, "{s:?}");
        assert!(
            g.bitmap_entry(0) & crate::bat::OFFSET_MASK < bitmap_at,
            "the sector bitmap moved down"
        );
        assert!(g.check().unwrap().errors.is_empty());
        crash_sweep(&bytes);
    }
}
