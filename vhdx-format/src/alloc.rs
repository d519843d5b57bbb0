//! Allocating blocks of a [`VhdxFile`] with no metadata lock held across I/O, and the
//! allocation guard through which an I/O engine writes a new block's payload itself.
//!
//! An allocation, whoever writes the payload:
//! 1. under the state lock (in-memory work only): check the block is still unallocated and
//!    nobody else is allocating it, reserve its space by moving the end of the file, and
//!    record the block as being allocated (a second writer of the block waits on the state
//!    condvar, or is told to come back later; never two allocations of one block);
//! 2. with no lock but the grow mutex: grow the file over the new space (`set_len`; the file
//!    only grows, so new space reads as zeros: MS-VHDX 2.5.1.1 lets a block's unwritten
//!    sectors read as anything, and a differencing block's absent sectors are the sector
//!    bitmap's business, 2.5.1.2);
//! 3. with no lock: write the payload;
//! 4. under the state lock: publish the block (its BAT entry in memory, the sector bitmap
//!    bits of a partially present differencing block) and add the changed sectors to the
//!    pending set. Only now can a read, or a commit's snapshot, see the block, so its
//!    payload write has completed before a commit syncs ahead of logging the entry
//!    (see `commit.rs`, MS-VHDX 2.3: data durable before the metadata pointing at it).
//!
//! Sector bitmaps (differencing layers) are loaded into memory whole before a chunk's first
//! change, and given new space if the chunk has none, in the same pattern: marked as loading
//! under the lock, read or grown without it, inserted under it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use block_io::{check_request, Mapping, Result, Storage};

use crate::bat::{state, BatEntry, BlockState};
use crate::error::corrupt_io;
use crate::file::{VhdxFile, WriteState, BITMAP_BLOCK};
use crate::header::MIB;

/// Pending sectors above which a writer starts a commit itself (MS-VHDX 2.3 allows any
/// number of sectors per log entry up to the log's size; this bounds how much metadata a
/// crash can lose and how long the next flush takes).
pub(crate) const AUTO_COMMIT_SECTORS: usize = 192;

/// A writer waits for a running commit (back-pressure) once this many sectors are pending.
const BACKPRESSURE_SECTORS: usize = 4 * AUTO_COMMIT_SECTORS;

/// A block whose space is reserved and whose allocation this writer owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reserved {
    /// The payload block.
    pub block: u64,
    /// File offset of its new space.
    pub at: u64,
    /// A differencing block the write does not cover: it becomes PARTIALLY_PRESENT with
    /// the written sectors' bits set.
    pub partial: bool,
    /// The written range inside the block.
    pub in_block: u64,
    /// Its length.
    pub len: u64,
}

/// The outcome of [`VhdxFile::reserve_block`].
#[derive(Debug)]
pub(crate) enum Reserve {
    /// Reserved: write the payload at `at + in_block`, then publish.
    Got(Reserved),
    /// The block has data now (someone else allocated it): write in place.
    Present,
    /// Someone else is allocating the block or loading its bitmap, and the caller asked not
    /// to wait.
    Busy,
}

/// One file extent of a reserved write (see [`VhdxFile::reserve_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteExtent {
    /// Where the bytes go in the image file.
    pub file_offset: u64,
    /// How many (the extents of a request add up to its length, in order).
    pub len: u64,
}

#[derive(Debug)]
enum Part {
    /// A new block: published at completion.
    New(Reserved),
    /// A PARTIALLY_PRESENT block at `file_offset`: its bits are set at completion.
    Partial {
        block: u64,
        file_offset: u64,
        in_block: u64,
        len: u64,
    },
}

/// The blocks an allocating write reserved (see [`VhdxFile::reserve_write`]). Complete it
/// with the payload write's result; dropping it uncompleted releases the reservations as if
/// the write had failed, without latching the fail-stop state.
#[must_use = "an allocating write publishes its blocks only through `complete`"]
#[derive(Debug)]
pub struct AllocGuard<'a, S: Storage> {
    file: FileRef<'a, S>,
    parts: Vec<Part>,
}

/// The image a guard completes on: borrowed ([`VhdxFile::reserve_write`]) or shared
/// ([`BlockDevice::map_allocating`](block_io::BlockDevice::map_allocating), whose guard
/// outlives the call).
#[derive(Debug)]
enum FileRef<'a, S: Storage> {
    Borrowed(&'a VhdxFile<S>),
    Shared(Arc<VhdxFile<S>>),
}

impl<S: Storage> std::ops::Deref for FileRef<'_, S> {
    type Target = VhdxFile<S>;

    fn deref(&self) -> &VhdxFile<S> {
        match self {
            FileRef::Borrowed(f) => f,
            FileRef::Shared(f) => f,
        }
    }
}

impl<S: Storage> AllocGuard<'_, S> {
    /// Finishes the allocating write. With `Ok(())` (every extent written), publishes the new
    /// blocks and sector bitmap bits in memory and queues their metadata for the next commit
    /// (a `flush` makes them durable). Never does I/O or waits for a commit, so an engine can
    /// call it on its completion thread; when [`VhdxFile::wants_commit`] says many changes
    /// are pending, the engine should flush soon, off that thread. With an error, latches the
    /// fail-stop state (a failed write, STYLE rule 7), releases the reservations (their space
    /// stays unused) and returns the error.
    pub fn complete(mut self, result: Result<()>) -> Result<()> {
        let parts = std::mem::take(&mut self.parts);
        let f = &*self.file;
        if let Err(e) = result {
            f.failstop.latch(&e);
            f.release(parts.iter().filter_map(|p| match p {
                Part::New(r) => Some(r.block),
                Part::Partial { .. } => None,
            }));
            return Err(e);
        }
        let mut first_err = None;
        {
            let mut st = f.state.lock();
            // Every part is visited, so every reservation ends even after an error.
            for p in &parts {
                let r = match *p {
                    Part::New(r) => f.publish_locked(&mut st, &r),
                    Part::Partial {
                        block,
                        file_offset,
                        in_block,
                        len,
                    } => BatEntry::try_from(f.entry(block))
                        .map_err(Into::into)
                        .and_then(|now| {
                            // Zeroed or discarded meanwhile: the discard counts as after this
                            // write (the two overlapped), so there is nothing to mark.
                            if now.state == BlockState::PartiallyPresent
                                && now.file_offset == file_offset
                            {
                                f.set_bits(&mut st, block, in_block, len)?;
                            }
                            Ok(())
                        }),
                };
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            f.failstop.latch(&e);
            return Err(e);
        }
        Ok(())
    }
}

impl<S: Storage> block_io::WriteGuard for AllocGuard<'static, S> {
    fn complete(self: Box<Self>, result: Result<()>) -> Result<()> {
        AllocGuard::complete(*self, result)
    }
}

impl<S: Storage> Drop for AllocGuard<'_, S> {
    fn drop(&mut self) {
        let parts = std::mem::take(&mut self.parts);
        self.file.release(parts.iter().filter_map(|p| match p {
            Part::New(r) => Some(r.block),
            Part::Partial { .. } => None,
        }));
    }
}

impl<S: Storage> VhdxFile<S> {
    /// Grows the file to at least `end` (never shrinks it: two growths racing keep the
    /// larger). Holds only the grow mutex across `set_len`.
    pub(crate) fn grow_to(&self, end: u64) -> Result<()> {
        let mut grown = self.grown.lock();
        if *grown >= end {
            return Ok(());
        }
        let cur = self.failstop.guard(self.storage.len())?;
        if cur < end {
            self.failstop.guard(self.storage.set_len(end))?;
        }
        *grown = cur.max(end);
        Ok(())
    }

    /// Reserves `len` bytes of new space past everything in use (in memory only).
    pub(crate) fn reserve_space(st: &mut WriteState, len: u64) -> Result<u64> {
        let at = st.file_end;
        let end = at
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(MIB))
            .ok_or_else(|| corrupt_io("the file would grow past 2^64 bytes"))?;
        st.file_end = end;
        Ok(at)
    }

    /// Makes sure the sector bitmap of `chunk` is in memory, reading it from the file or
    /// giving it new space (then its BAT entry changes, pending). `Ok(false)`: it would have
    /// to wait for another loader or read the file, and `wait` is false.
    pub(crate) fn ensure_bitmap(&self, chunk: u64, wait: bool) -> Result<bool> {
        loop {
            if self.bitmaps.read().contains_key(&chunk) {
                return Ok(true);
            }
            let mut st = self.state.lock();
            if self.bitmaps.read().contains_key(&chunk) {
                return Ok(true);
            }
            if st.loading.contains(&chunk) {
                if !wait {
                    return Ok(false);
                }
                self.state_cv.wait(&mut st);
                continue;
            }
            let e = BatEntry::try_from(self.bitmap_entry(chunk))?;
            let present = e.state == BlockState::FullyPresent;
            if present && !wait {
                return Ok(false);
            }
            let new_at = if present {
                None
            } else {
                Some(Self::reserve_space(&mut st, BITMAP_BLOCK)?)
            };
            st.loading.insert(chunk);
            drop(st);
            let loaded = match new_at {
                None => {
                    let mut v = vec![0u8; BITMAP_BLOCK as usize];
                    self.read_file(&mut v, e.file_offset).map(|()| v)
                }
                // New space always lies past the end the file had at open (it is never
                // reused), so the new bitmap block reads as zeros once grown into: only
                // the sectors that get bits need writing (through the log, at commit).
                Some(at) => self
                    .grow_to(at + BITMAP_BLOCK)
                    .map(|()| vec![0u8; BITMAP_BLOCK as usize]),
            };
            let mut st = self.state.lock();
            st.loading.remove(&chunk);
            self.state_cv.notify_all();
            let bm = loaded?;
            if let Some(at) = new_at {
                // MS-VHDX 2.5.1.2: the chunk's bitmap entry becomes SB_BLOCK_PRESENT, now that
                // the space it points at is inside the file.
                self.set_entry(
                    &mut st,
                    self.geo.bitmap_index(chunk),
                    BatEntry::encode(state::FULLY_PRESENT, at),
                );
            }
            self.bitmaps.write().insert(chunk, bm.into_boxed_slice());
            return Ok(true);
        }
    }

    /// `true` if a write of `[in_block, in_block + len)` into `block` in state `e` leaves
    /// the block partially present (differencing, not present, not covered).
    fn needs_bitmap(&self, e: BlockState, block: u64, in_block: u64, len: u64) -> bool {
        self.geo.has_parent
            && e == BlockState::NotPresent
            && !self.covers_block(block, in_block, len)
    }

    /// Reserves new space for `block` and marks it as being allocated by the caller (see the
    /// module docs). Waits for another allocation of the block (or a bitmap load) when
    /// `wait`, else answers [`Reserve::Busy`].
    pub(crate) fn reserve_block(
        &self,
        block: u64,
        in_block: u64,
        len: u64,
        wait: bool,
    ) -> Result<Reserve> {
        let bs = u64::from(self.geo.block_size);
        let chunk = block / self.geo.chunk_ratio;
        loop {
            let e = BatEntry::try_from(self.entry(block))?;
            if e.state.has_data() {
                return Ok(Reserve::Present);
            }
            // Load the chunk's bitmap before reserving, outside the lock.
            if self.needs_bitmap(e.state, block, in_block, len)
                && !self.ensure_bitmap(chunk, wait)?
            {
                return Ok(Reserve::Busy);
            }
            let mut st = self.state.lock();
            let e = BatEntry::try_from(self.entry(block))?;
            if e.state.has_data() {
                return Ok(Reserve::Present);
            }
            if st.allocating.contains(&block) {
                if !wait {
                    return Ok(Reserve::Busy);
                }
                self.state_cv.wait(&mut st);
                continue;
            }
            let partial = self.needs_bitmap(e.state, block, in_block, len);
            if partial && !self.bitmaps.read().contains_key(&chunk) {
                continue;
            }
            let at = Self::reserve_space(&mut st, bs)?;
            st.allocating.insert(block);
            drop(st);
            let r = Reserved {
                block,
                at,
                partial,
                in_block,
                len,
            };
            if let Err(e) = self.grow_to(at + bs) {
                self.release([block]);
                return Err(e);
            }
            return Ok(Reserve::Got(r));
        }
    }

    /// Ends the allocations of `blocks` without publishing them (their space stays unused).
    pub(crate) fn release(&self, blocks: impl IntoIterator<Item = u64>) {
        let mut st = self.state.lock();
        let mut any = false;
        for b in blocks {
            any |= st.allocating.remove(&b);
        }
        if any {
            self.state_cv.notify_all();
        }
    }

    /// Publishes a reserved block whose payload write completed: its BAT entry (and bitmap
    /// bits) in memory, the changed sectors pending. Ends the allocation.
    pub(crate) fn publish_locked(&self, st: &mut WriteState, r: &Reserved) -> Result<()> {
        if st.allocating.remove(&r.block) {
            self.state_cv.notify_all();
        }
        let index = self.geo.payload_index(r.block);
        if r.partial {
            self.set_bits(st, r.block, r.in_block, r.len)?;
            self.set_entry(st, index, BatEntry::encode(state::PARTIALLY_PRESENT, r.at));
        } else {
            self.set_entry(st, index, BatEntry::encode(state::FULLY_PRESENT, r.at));
        }
        Ok(())
    }

    /// Commits when many sectors are pending. A commit already running is left alone unless
    /// the pending set has grown far past the threshold (then the writer waits: back-pressure).
    pub(crate) fn maybe_commit(&self, pending: usize) -> Result<()> {
        if pending <= AUTO_COMMIT_SECTORS
            || (pending <= BACKPRESSURE_SECTORS && self.commit_running())
        {
            return Ok(());
        }
        self.commit_coalesced(crate::commit::After::Nothing)
    }

    /// `true` when so many BAT and sector bitmap changes wait for a commit that a writer
    /// would start one itself: a caller completing [`AllocGuard`]s (which never commit)
    /// should then [`flush`](block_io::BlockDevice::flush), off its I/O thread.
    pub fn wants_commit(&self) -> bool {
        self.state.lock().pending() > AUTO_COMMIT_SECTORS
    }

    /// Reserves an allocating write of `len` bytes at virtual `offset` for a caller that
    /// writes the payload itself (an I/O engine): returns the file extents the bytes go to,
    /// in order, and a guard to [`complete`](AllocGuard::complete) with the result of
    /// writing them (to [`storage`](Self::storage)). Blocks not allocated yet get new space
    /// (reserved, not yet visible to reads); FULLY_ and PARTIALLY_PRESENT blocks map in place.
    /// Completion publishes the blocks; a later `flush` makes them durable in MS-VHDX order.
    ///
    /// Never waits for another request: `Ok(None)` when it would (this session's header
    /// update not done yet, a block of the range being allocated by someone else, a sector
    /// bitmap not in memory yet) and when the image cannot take writes this way (read-only).
    /// The caller then writes through [`BlockDevice::write_at`](block_io::BlockDevice), which
    /// waits. The guard borrows the image; the file offsets stay valid until completion.
    pub fn reserve_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<(Vec<WriteExtent>, AllocGuard<'_, S>)>> {
        self.reserve_into(FileRef::Borrowed(self), offset, len)
    }

    /// [`reserve_write`](Self::reserve_write) with the guard holding `file` (which is `self`).
    fn reserve_into<'a>(
        &self,
        file: FileRef<'a, S>,
        offset: u64,
        len: u64,
    ) -> Result<Option<(Vec<WriteExtent>, AllocGuard<'a, S>)>> {
        check_request(&self.info_inner(), offset, len, true)?;
        self.failstop.check()?;
        if self.read_only || self.overlay.is_some() || !self.session_started.load(Ordering::Acquire)
        {
            return Ok(None);
        }
        let mut extents: Vec<WriteExtent> = Vec::new();
        let mut guard = AllocGuard {
            file,
            parts: Vec::new(),
        };
        for p in self.geo.pieces(offset, len) {
            let (block, in_block) = (p.block, p.in_block);
            let file_offset = loop {
                let e = BatEntry::try_from(self.entry(block))?;
                match e.state {
                    BlockState::FullyPresent => break e.file_offset + in_block,
                    BlockState::PartiallyPresent => {
                        if !self.ensure_bitmap(block / self.geo.chunk_ratio, false)? {
                            return Ok(None);
                        }
                        guard.parts.push(Part::Partial {
                            block,
                            file_offset: e.file_offset,
                            in_block,
                            len: p.len,
                        });
                        break e.file_offset + in_block;
                    }
                    _ => match self.reserve_block(block, in_block, p.len, false)? {
                        Reserve::Got(r) => {
                            guard.parts.push(Part::New(r));
                            break r.at + in_block;
                        }
                        Reserve::Present => continue,
                        Reserve::Busy => return Ok(None),
                    },
                }
            };
            match extents.last_mut() {
                Some(x) if x.file_offset + x.len == file_offset => x.len += p.len,
                _ => extents.push(WriteExtent {
                    file_offset,
                    len: p.len,
                }),
            }
        }
        Ok(Some((extents, guard)))
    }

    /// [`reserve_write`](Self::reserve_write) as [`Mapping::File`] pieces of the storage's
    /// [`io_handle`](Storage::io_handle), for the I/O engine. `Ok(None)` also when the
    /// storage is not a plain file.
    #[allow(clippy::type_complexity)]
    pub fn map_allocating_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<(Vec<Mapping>, AllocGuard<'_, S>)>> {
        let mut maps = Vec::new();
        Ok(self
            .map_into(FileRef::Borrowed(self), offset, len, &mut maps)?
            .map(|guard| (maps, guard)))
    }

    /// The body of [`map_allocating_write`](Self::map_allocating_write) and of
    /// [`BlockDevice::map_allocating`](block_io::BlockDevice::map_allocating): the pieces go
    /// to `out`.
    fn map_into<'a>(
        &self,
        file: FileRef<'a, S>,
        offset: u64,
        len: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<Option<AllocGuard<'a, S>>> {
        let Some(handle) = self.storage.io_handle() else {
            check_request(&self.info_inner(), offset, len, true)?;
            return Ok(None);
        };
        Ok(self
            .reserve_into(file, offset, len)?
            .map(|(extents, guard)| {
                out.extend(extents.into_iter().map(|x| Mapping::File {
                    handle,
                    file_offset: x.file_offset,
                    len: x.len,
                }));
                guard
            }))
    }

    /// [`BlockDevice::map_allocating`](block_io::BlockDevice::map_allocating): a guard that
    /// holds the image. `Ok(None)` also once so many changes wait for a commit that a writer
    /// would start one ([`wants_commit`](Self::wants_commit)): that write then goes through
    /// the blocking path, which commits, so a stream of engine allocations never lets the
    /// pending metadata (what a crash may lose, and what the next flush must log) grow
    /// without bound.
    pub(crate) fn map_allocating_shared(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<Option<AllocGuard<'static, S>>> {
        if self.wants_commit() {
            check_request(&self.info_inner(), offset, len, true)?;
            return Ok(None);
        }
        let me = Arc::clone(&self);
        self.map_into(FileRef::Shared(me), offset, len, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, CreateOptions, ParentRef};
    use block_io::{BlockDevice, BlockStatus, MemStorage};
    use std::sync::Arc;

    fn dynamic() -> VhdxFile<Arc<MemStorage>> {
        let mut o = CreateOptions::dynamic(8 * MIB);
        o.block_size = Some(MIB as u32);
        create(Arc::new(MemStorage::new()), &o).unwrap()
    }

    fn write_extents(f: &VhdxFile<Arc<MemStorage>>, x: &[WriteExtent], data: &[u8]) {
        let mut at = 0;
        for e in x {
            f.storage()
                .write_at(&data[at..at + e.len as usize], e.file_offset)
                .unwrap();
            at += e.len as usize;
        }
        assert_eq!(at, data.len());
    }

    #[test]
    fn guard_reserves_then_publishes_one_allocator_per_block() {
        let f = dynamic();
        // No session yet: the header update would have to wait.
        assert!(f.reserve_write(2 * MIB, 8192).unwrap().is_none());
        f.write_at(&[1; 512], 0).unwrap();
        let (x, g) = f.reserve_write(2 * MIB + 4096, 8192).unwrap().unwrap();
        assert_eq!(x.len(), 1);
        assert!(x[0].file_offset >= f.storage().len().unwrap() - MIB);
        // A second allocator of the same block is told to come back.
        assert!(f.reserve_write(2 * MIB, 512).unwrap().is_none());
        write_extents(&f, &x, &[9; 8192]);
        // Not visible before completion.
        let mut buf = [0u8; 8192];
        f.read_at(&mut buf, 2 * MIB + 4096).unwrap();
        assert_eq!(buf, [0; 8192]);
        g.complete(Ok(())).unwrap();
        f.read_at(&mut buf, 2 * MIB + 4096).unwrap();
        assert_eq!(buf, [9; 8192]);
        // Now the block maps in place, with nothing to publish.
        let (y, g) = f.reserve_write(2 * MIB, 4096).unwrap().unwrap();
        assert_eq!(y[0].file_offset, x[0].file_offset - 4096);
        g.complete(Ok(())).unwrap();
        // Spanning blocks: one extent per block, in order.
        let (z, g) = f.reserve_write(3 * MIB - 4096, 8192).unwrap().unwrap();
        assert_eq!(z.iter().map(|e| e.len).sum::<u64>(), 8192);
        write_extents(&f, &z, &[5; 8192]);
        g.complete(Ok(())).unwrap();
        f.flush().unwrap();
        f.read_at(&mut buf, 3 * MIB - 4096).unwrap();
        assert_eq!(buf, [5; 8192]);
        assert!(f.check().unwrap().errors.is_empty());
    }

    #[test]
    fn dropped_guard_releases_and_failed_one_latches() {
        let f = dynamic();
        f.write_at(&[1; 512], 0).unwrap();
        let (x, g) = f.reserve_write(4 * MIB, 4096).unwrap().unwrap();
        drop(g);
        // Released: reservable again, in new space (never reused).
        let (y, g) = f.reserve_write(4 * MIB, 4096).unwrap().unwrap();
        assert_ne!(x[0].file_offset, y[0].file_offset);
        let mut buf = [0u8; 4096];
        f.read_at(&mut buf, 4 * MIB).unwrap();
        assert_eq!(buf, [0; 4096]);
        let e = block_io::Error::new(block_io::ErrorKind::InvalidInput, "payload failed");
        assert!(g.complete(Err(e)).is_err());
        assert_eq!(
            f.write_at(&[2; 512], 0).unwrap_err().kind(),
            block_io::ErrorKind::Failed
        );
    }

    #[test]
    fn guard_on_differencing_sets_bits_and_maps_files_only() {
        let mut o = CreateOptions::differencing(
            8 * MIB,
            ParentRef {
                data_write_guid: uuid::Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        );
        o.block_size = Some(MIB as u32);
        let f = create(Arc::new(MemStorage::new()), &o).unwrap();
        // Memory storage has no file handle for an engine.
        f.write_at(&[1; 512], 0).unwrap();
        assert!(f.map_allocating_write(MIB, 4096).unwrap().is_none());
        let (x, g) = f.reserve_write(MIB + 8192, 4096).unwrap().unwrap();
        write_extents(&f, &x, &[3; 4096]);
        g.complete(Ok(())).unwrap();
        let s = f.block_status(MIB, MIB).unwrap();
        assert_eq!((s.status, s.len), (BlockStatus::Unallocated, 8192));
        let s = f.block_status(MIB + 8192, MIB - 8192).unwrap();
        assert_eq!((s.status, s.len), (BlockStatus::Data, 4096));
        // A second write into the now partially present block sets its bits at completion.
        let (y, g) = f.reserve_write(MIB, 512).unwrap().unwrap();
        assert_eq!(y[0].file_offset + 8192, x[0].file_offset);
        write_extents(&f, &y, &[4; 512]);
        g.complete(Ok(())).unwrap();
        let s = f.block_status(MIB, MIB).unwrap();
        assert_eq!((s.status, s.len), (BlockStatus::Data, 512));
        f.close().unwrap();
        assert!(f.check().unwrap().errors.is_empty());
    }

    #[test]
    fn map_allocating_write_gives_file_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = CreateOptions::dynamic(8 * MIB);
        o.block_size = Some(MIB as u32);
        let f = crate::create_file(dir.path().join("a.vhdx"), &o).unwrap();
        f.write_at(&[1; 512], 0).unwrap();
        let (m, g) = f.map_allocating_write(MIB, 4096).unwrap().unwrap();
        assert!(matches!(m[..], [Mapping::File { len: 4096, .. }]));
        g.complete(Ok(())).unwrap();
        assert!(!f.wants_commit());
    }
}
