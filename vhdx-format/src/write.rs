//! Writing a [`VhdxFile`]: header updates, payload writes, block allocation with BAT and
//! sector-bitmap changes committed through the log, zeroing and discard.
//!
//! - Headers (MS-VHDX 2.2.2): never through the log; write the non-current slot with
//!   SequenceNumber + 1 and flush, then the other slot.
//! - Session start: before the first change, FileWriteGuid, DataWriteGuid and a fresh LogGuid
//!   are written in one header update.
//! - Overwrites of FULLY_PRESENT blocks are one positional write, no lock; writes into
//!   PARTIALLY_PRESENT blocks write the data without the lock, then take it to set bitmap bits.
//!   Allocating a block writes its first data under the metadata lock (allocation is rare and
//!   this keeps two writers from allocating the same block twice).
//! - Allocation writes the payload into new space past the end of the file and changes the BAT
//!   in memory; BAT and bitmap sectors changed since the last commit go to disk at `flush()`
//!   (or when there are many): payload sync, log entry, sync, in-place writes, sync (2.3).
//!   Every entry is written at the start of the log with its own tail, as the previous entry is
//!   fully applied by then.
//! - Freed space is never reused by this writer; it is punched only after the BAT change that
//!   frees it is durable.
//! - The first failed write or sync latches [`block_io::FailStop`].

use std::sync::atomic::Ordering;

use block_io::{check_request, Result, Storage};
use uuid::Uuid;

use crate::bat::{state, BatEntry, BlockState};
use crate::error::corrupt_io;
use crate::file::{VhdxFile, WriteState, BITMAP_BLOCK};
use crate::header::{Header, HEADER_OFFSETS, MIB};
use crate::log::{build_entry, max_data_sectors, EntryParams, SECTOR};

/// Writes `h` with the two-slot protocol after the header in `slot`; returns the new current
/// header and its slot.
pub(crate) fn update_header<S: Storage + ?Sized>(
    storage: &S,
    h: Header,
    slot: usize,
) -> Result<(Header, usize)> {
    let mut next = h;
    for target in [1 - slot, slot] {
        next.sequence_number = next
            .sequence_number
            .checked_add(1)
            .ok_or_else(|| corrupt_io("header sequence number overflows"))?;
        storage.write_at(&next.to_bytes(), HEADER_OFFSETS[target])?;
        storage.sync_data()?;
    }
    Ok((next, slot))
}

/// Calls `write(zeros, at)` over `[offset, offset + len)` in pieces of at most 1 MiB.
pub(crate) fn in_zero_chunks(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let zeros = vec![0u8; len.min(MIB) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        write(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Pending commits larger than this many sectors are written before the next flush.
const AUTO_COMMIT_SECTORS: usize = 192;

impl<S: Storage> VhdxFile<S> {
    fn ensure_session(&self) -> Result<()> {
        if self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = self.state.lock();
        self.start_session(&mut st)
    }

    fn start_session(&self, st: &mut WriteState) -> Result<()> {
        if st.session {
            return Ok(());
        }
        let mut h = st.header;
        h.file_write_guid = Uuid::new_v4();
        h.data_write_guid = Uuid::new_v4();
        h.log_guid = Uuid::new_v4();
        self.store_header(st, h)?;
        st.session = true;
        self.session_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes `h` the current header ([`update_header`]), latching the fail-stop state on error.
    pub(crate) fn store_header(&self, st: &mut WriteState, h: Header) -> Result<()> {
        let (h, slot) = self
            .failstop
            .guard(update_header(&self.storage, h, st.slot))?;
        st.header = h;
        st.slot = slot;
        Ok(())
    }

    fn begin_write(&self, offset: u64, len: u64) -> Result<()> {
        check_request(&self.info_inner(), offset, len, true)?;
        self.failstop.check()?;
        self.ensure_session()
    }

    pub(crate) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.begin_write(offset, buf.len() as u64)?;
        for p in self.geo.pieces(offset, buf.len() as u64) {
            let (block, in_block, piece) = (p.block, p.in_block, &buf[p.range()]);
            let e = BatEntry::try_from(self.entry(block))?;
            if e.state == BlockState::FullyPresent {
                self.failstop
                    .guard(self.storage.write_at(piece, e.file_offset + in_block))?;
            } else if e.state == BlockState::PartiallyPresent {
                // The block's place is fixed: write outside the lock, then mark the sectors.
                self.failstop
                    .guard(self.storage.write_at(piece, e.file_offset + in_block))?;
                let mut st = self.state.lock();
                if self.entry(block) == BatEntry::encode(state::PARTIALLY_PRESENT, e.file_offset) {
                    self.set_bits(&mut st, block, in_block, piece.len() as u64)?;
                    self.maybe_commit(&mut st)?;
                } else {
                    drop(st);
                    // Zeroed or discarded meanwhile: write through the general path.
                    self.allocating_write(block, in_block, piece)?;
                }
            } else {
                self.allocating_write(block, in_block, piece)?;
            }
        }
        Ok(())
    }

    /// `true` if `[in_block, in_block+len)` covers all of `block` that lies inside the disk.
    fn covers_block(&self, block: u64, in_block: u64, len: u64) -> bool {
        let bs = u64::from(self.geo.block_size);
        let block_end = ((block + 1) * bs).min(self.meta.virtual_size) - block * bs;
        in_block == 0 && len >= block_end
    }

    fn set_entry(&self, st: &mut WriteState, index: u64, value: u64) {
        if let Some(a) = self.bat.get(index as usize) {
            a.store(value, Ordering::Release);
            st.dirty_bat.insert(index * 8 / SECTOR);
        }
    }

    /// Reserves `len` bytes of new space past everything in use.
    fn reserve(&self, st: &mut WriteState, len: u64) -> Result<u64> {
        let at = st.file_end;
        let end = at
            .checked_add(len)
            .ok_or_else(|| corrupt_io("the file would grow past 2^64 bytes"))?;
        if self.failstop.guard(self.storage.len())? < end {
            self.failstop.guard(self.storage.set_len(end))?;
        }
        st.file_end = end.div_ceil(MIB) * MIB;
        Ok(at)
    }

    fn allocating_write(&self, block: u64, in_block: u64, piece: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        let e = BatEntry::try_from(self.entry(block))?;
        let index = self.geo.payload_index(block);
        match e.state {
            BlockState::FullyPresent => {
                drop(st);
                self.failstop
                    .guard(self.storage.write_at(piece, e.file_offset + in_block))
            }
            BlockState::PartiallyPresent => {
                self.failstop
                    .guard(self.storage.write_at(piece, e.file_offset + in_block))?;
                self.set_bits(&mut st, block, in_block, piece.len() as u64)?;
                self.maybe_commit(&mut st)
            }
            _ => {
                let bs = u64::from(self.geo.block_size);
                let partial = self.geo.has_parent
                    && e.state == BlockState::NotPresent
                    && !self.covers_block(block, in_block, piece.len() as u64);
                let at = self.reserve(&mut st, bs)?;
                self.failstop
                    .guard(self.storage.write_at(piece, at + in_block))?;
                if partial {
                    self.set_bits(&mut st, block, in_block, piece.len() as u64)?;
                    self.set_entry(
                        &mut st,
                        index,
                        BatEntry::encode(state::PARTIALLY_PRESENT, at),
                    );
                } else {
                    self.set_entry(&mut st, index, BatEntry::encode(state::FULLY_PRESENT, at));
                }
                self.maybe_commit(&mut st)
            }
        }
    }

    /// Marks sectors present in the sector bitmap of `block`'s chunk (in memory; committed
    /// with the next log entry), allocating the bitmap block if needed.
    fn set_bits(&self, st: &mut WriteState, block: u64, in_block: u64, len: u64) -> Result<()> {
        let chunk = block / self.geo.chunk_ratio;
        let sector = u64::from(self.geo.logical_sector_size);
        let spb = u64::from(self.geo.block_size) / sector;
        if !self.bitmaps.read().contains_key(&chunk) {
            let e = BatEntry::try_from(self.bitmap_entry(chunk))?;
            let bm = if e.state == BlockState::FullyPresent {
                let mut v = vec![0u8; BITMAP_BLOCK as usize];
                self.read_file(&mut v, e.file_offset)?;
                v
            } else {
                let at = self.reserve(st, BITMAP_BLOCK)?;
                self.set_entry(
                    st,
                    self.geo.bitmap_index(chunk),
                    BatEntry::encode(state::FULLY_PRESENT, at),
                );
                // New space always lies past the end the file had at open (it is never
                // reused), so the new bitmap block reads as zeros: only the sectors that get
                // bits need writing.
                vec![0u8; BITMAP_BLOCK as usize]
            };
            self.bitmaps.write().insert(chunk, bm.into_boxed_slice());
        }
        let block0 = (block % self.geo.chunk_ratio) * spb;
        let first = block0 + in_block / sector;
        let count = len / sector;
        // A block whose sectors are all present becomes FULLY_PRESENT, so later writes take
        // the lock-free path (spb >= 256, so the block's bits are whole bytes).
        let all = self.bitmaps.write().get_mut(&chunk).is_some_and(|bm| {
            for i in first..first + count {
                bm[(i / 8) as usize] |= 1 << (i % 8);
            }
            let b0 = (block0 / 8) as usize;
            bm[b0..b0 + (spb / 8) as usize].iter().all(|&b| b == 0xFF)
        });
        let bits_per_sector = SECTOR * 8;
        for s in first / bits_per_sector..=(first + count.max(1) - 1) / bits_per_sector {
            st.dirty_bitmap.insert((chunk, s));
        }
        let e = BatEntry::try_from(self.entry(block))?;
        if all && e.state == BlockState::PartiallyPresent {
            let index = self.geo.payload_index(block);
            self.set_entry(
                st,
                index,
                BatEntry::encode(state::FULLY_PRESENT, e.file_offset),
            );
        }
        Ok(())
    }

    fn maybe_commit(&self, st: &mut WriteState) -> Result<()> {
        if st.dirty_bat.len() + st.dirty_bitmap.len() > AUTO_COMMIT_SECTORS {
            self.commit(st)?;
        }
        Ok(())
    }

    pub(crate) fn zero_inner(&self, offset: u64, len: u64, new_state: u64) -> Result<()> {
        self.begin_write(offset, len)?;
        let bs = u64::from(self.geo.block_size);
        for p in self.geo.pieces(offset, len) {
            let block = p.block;
            let e = BatEntry::try_from(self.entry(block))?;
            // Without unmap an allocated block stays allocated (zeros written in place).
            let keep = new_state == state::ZERO && e.state == BlockState::FullyPresent;
            if self.covers_block(block, p.in_block, p.len)
                && !self.meta.leave_blocks_allocated
                && !keep
            {
                let mut st = self.state.lock();
                let cur = BatEntry::try_from(self.entry(block))?;
                let index = self.geo.payload_index(block);
                self.set_entry(&mut st, index, BatEntry::encode(new_state, 0));
                if cur.state.has_data() {
                    st.punch.push((cur.file_offset, bs));
                }
                self.maybe_commit(&mut st)?;
            } else if e.state.has_data()
                || (self.geo.has_parent && e.state == BlockState::NotPresent)
            {
                in_zero_chunks(offset + p.at, p.len, |zeros, at| {
                    self.write_inner(zeros, at)
                })?;
            }
        }
        Ok(())
    }

    pub(crate) fn flush_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.failstop.check()?;
        let mut st = self.state.lock();
        self.commit(&mut st)
    }

    /// Writes one log entry holding `refs` (file offset, 4 KiB sector each), then the sectors in
    /// place: MS-VHDX 2.3's order, log entry, flush, write in place, flush.
    pub(crate) fn log_and_apply(&self, st: &mut WriteState, refs: &[(u64, &[u8])]) -> Result<()> {
        let fs = &self.failstop;
        let h = st.header;
        let file_len = fs.guard(self.storage.len())?;
        let entry = build_entry(
            &EntryParams {
                sequence_number: st.log_seq,
                log_guid: h.log_guid,
                tail: 0,
                flushed_file_offset: file_len,
                last_file_offset: file_len,
            },
            refs,
        );
        fs.guard(self.storage.write_at(&entry, h.log_offset))?;
        fs.guard(self.storage.sync_data())?;
        for (off, data) in refs {
            fs.guard(self.storage.write_at(data, *off))?;
        }
        fs.guard(self.storage.sync_data())?;
        st.log_seq += 1;
        Ok(())
    }

    /// Writes every pending BAT and bitmap change: payload sync, log entry, sync, in-place
    /// writes, sync; then punches freed space.
    pub(crate) fn commit(&self, st: &mut WriteState) -> Result<()> {
        let fs = &self.failstop;
        fs.guard(self.storage.sync_data())?;
        if st.dirty_bat.is_empty() && st.dirty_bitmap.is_empty() {
            return Ok(());
        }
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::new();
        for &s in &st.dirty_bat {
            let mut data = vec![0u8; SECTOR as usize];
            for (k, slot) in data.chunks_exact_mut(8).enumerate() {
                let i = s * (SECTOR / 8) + k as u64;
                if let Some(a) = self.bat.get(i as usize) {
                    slot.copy_from_slice(&a.load(Ordering::Acquire).to_le_bytes());
                }
            }
            sectors.push((self.regions.bat.file_offset + s * SECTOR, data));
        }
        {
            let maps = self.bitmaps.read();
            for &(chunk, s) in &st.dirty_bitmap {
                let e = BatEntry::try_from(self.bitmap_entry(chunk))?;
                let bm = maps
                    .get(&chunk)
                    .ok_or_else(|| corrupt_io("dirty sector bitmap not in memory"))?;
                let from = (s * SECTOR) as usize;
                sectors.push((
                    e.file_offset + s * SECTOR,
                    bm[from..from + SECTOR as usize].to_vec(),
                ));
            }
        }
        let per_entry = max_data_sectors(u64::from(st.header.log_length)).max(1) as usize;
        for group in sectors.chunks(per_entry) {
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, d)| (*o, &d[..])).collect();
            self.log_and_apply(st, &refs)?;
        }
        st.dirty_bat.clear();
        st.dirty_bitmap.clear();
        for (o, l) in std::mem::take(&mut st.punch) {
            fs.guard(self.storage.punch_hole(o, l))?;
        }
        Ok(())
    }

    /// Commits pending changes and marks the log empty (LogGuid = 0). Call before dropping a
    /// writable image to leave it clean; dropping does the same, ignoring errors.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.failstop.check()?;
        let mut st = self.state.lock();
        if !st.session {
            return Ok(());
        }
        self.commit(&mut st)?;
        let mut h = st.header;
        h.log_guid = Uuid::nil();
        self.store_header(&mut st, h)?;
        st.session = false;
        self.session_started.store(false, Ordering::Release);
        Ok(())
    }
}

impl<S: Storage> Drop for VhdxFile<S> {
    fn drop(&mut self) {
        if !self.failstop.is_failed() {
            let _ = self.close();
        }
    }
}
