//! Writing a [`VhdxFile`]: header updates, payload writes, allocation (see `alloc.rs`), BAT
//! and sector-bitmap changes (committed through the log by `commit.rs`), zeroing and discard.
//!
//! - Headers (MS-VHDX 2.2.2): never through the log; write the non-current slot with
//!   SequenceNumber + 1 and flush, then the other slot.
//! - Session start: before the first change, FileWriteGuid, DataWriteGuid and a fresh LogGuid
//!   are written in one header update (2.2.2.1), under the header mutex only.
//! - Overwrites of FULLY_PRESENT blocks are one positional write, no lock. Writes into
//!   PARTIALLY_PRESENT blocks write the data without a lock, then take the state lock to set
//!   bitmap bits (data before the bit that makes it visible, 2.5.1.2). Allocating writes
//!   reserve space under the state lock and write the payload without it (`alloc.rs`).
//! - No lock is held across payload I/O, `set_len`, a bitmap read or a sync but the header
//!   mutex across a header update.
//! - Freed space is never reused by this writer; it is punched only after the BAT change that
//!   frees it is durable.
//! - The first failed write or sync latches [`block_io::FailStop`].

use std::sync::atomic::Ordering;

use block_io::{check_request, Result, Storage};
use uuid::Uuid;

use crate::alloc::Reserve;
use crate::bat::{state, BatEntry, BlockState};
use crate::commit::After;
use crate::error::corrupt_io;
use crate::file::{HeaderState, VhdxFile, WriteState};
use crate::header::{Header, HEADER_OFFSETS, MIB};
use crate::log::SECTOR;

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

impl<S: Storage> VhdxFile<S> {
    fn ensure_session(&self) -> Result<()> {
        if self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut h = self.hdr.lock();
        self.start_session(&mut h)
    }

    /// MS-VHDX 2.2.2.1: a new FileWriteGuid before the first write of the session and a new
    /// DataWriteGuid before the first user-visible change, with a fresh LogGuid, in one
    /// header update that is durable before any of those writes.
    pub(crate) fn start_session(&self, h: &mut HeaderState) -> Result<()> {
        if h.session {
            return Ok(());
        }
        let mut next = h.header;
        next.file_write_guid = Uuid::new_v4();
        next.data_write_guid = Uuid::new_v4();
        next.log_guid = Uuid::new_v4();
        self.store_header(h, next)?;
        h.session = true;
        self.session_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Starts the write session now, with `data_write_guid` as the new DataWriteGuid (and a
    /// new FileWriteGuid and LogGuid), durable before this returns (MS-VHDX 2.2.2.1). For a
    /// merge into this image: the merging child records the id in its `parent_linkage2`
    /// first, then the id changes here, so the child's parent check passes at every instant
    /// (MS-VHDX 2.6.2.6.1). Errors: `ReadOnly`, `InvalidInput` when a session has already
    /// started (its id is chosen), I/O errors (which latch the fail-stop state).
    pub fn begin_session_with(&self, data_write_guid: Uuid) -> Result<()> {
        if self.read_only {
            return Err(block_io::Error::new(
                block_io::ErrorKind::ReadOnly,
                "cannot start a write session on a read-only image",
            ));
        }
        self.failstop.check()?;
        let mut h = self.hdr.lock();
        if h.session {
            return Err(block_io::Error::new(
                block_io::ErrorKind::InvalidInput,
                "a write session has already started",
            ));
        }
        let mut next = h.header;
        next.file_write_guid = Uuid::new_v4();
        next.data_write_guid = data_write_guid;
        next.log_guid = Uuid::new_v4();
        self.store_header(&mut h, next)?;
        h.session = true;
        self.session_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes `next` the current header ([`update_header`]), latching the fail-stop state on
    /// error.
    pub(crate) fn store_header(&self, h: &mut HeaderState, next: Header) -> Result<()> {
        let (header, slot) = self
            .failstop
            .guard(update_header(&self.storage, next, h.slot))?;
        h.header = header;
        h.slot = slot;
        *self.current_header.write() = header;
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
            self.write_piece(p.block, p.in_block, &buf[p.range()])?;
        }
        Ok(())
    }

    /// Writes `piece` at `in_block` of `block`, allocating the block if needed.
    fn write_piece(&self, block: u64, in_block: u64, piece: &[u8]) -> Result<()> {
        let len = piece.len() as u64;
        loop {
            let e = BatEntry::try_from(self.entry(block))?;
            match e.state {
                BlockState::FullyPresent => {
                    return self
                        .failstop
                        .guard(self.storage.write_at(piece, e.file_offset + in_block))
                }
                BlockState::PartiallyPresent => {
                    self.ensure_bitmap(block / self.geo.chunk_ratio, true)?;
                    // MS-VHDX 2.5.1.2: the block's place is fixed; the data goes first, the
                    // bits that make it visible after.
                    self.failstop
                        .guard(self.storage.write_at(piece, e.file_offset + in_block))?;
                    let mut st = self.state.lock();
                    let now = BatEntry::try_from(self.entry(block))?;
                    if now.state.has_data() && now.file_offset == e.file_offset {
                        if now.state == BlockState::PartiallyPresent {
                            self.set_bits(&mut st, block, in_block, len)?;
                        }
                        let pending = st.pending();
                        drop(st);
                        return self.maybe_commit(pending);
                    }
                    // Zeroed or discarded meanwhile: write again through the new state.
                }
                _ => match self.reserve_block(block, in_block, len, true)? {
                    Reserve::Got(r) => {
                        // The payload goes to the reserved space with no lock held.
                        let res = self
                            .failstop
                            .guard(self.storage.write_at(piece, r.at + in_block));
                        let pending = {
                            let mut st = self.state.lock();
                            match res {
                                Ok(()) => self.publish_locked(&mut st, &r).map(|()| st.pending()),
                                Err(e) => {
                                    if st.allocating.remove(&block) {
                                        self.state_cv.notify_all();
                                    }
                                    Err(e)
                                }
                            }
                        };
                        return self.maybe_commit(self.failstop.guard(pending)?);
                    }
                    // Allocated by another writer meanwhile: write in place.
                    Reserve::Present | Reserve::Busy => continue,
                },
            }
        }
    }

    /// `true` if `[in_block, in_block+len)` covers all of `block` that lies inside the disk.
    pub(crate) fn covers_block(&self, block: u64, in_block: u64, len: u64) -> bool {
        let bs = u64::from(self.geo.block_size);
        let block_end = ((block + 1) * bs).min(self.meta.virtual_size) - block * bs;
        in_block == 0 && len >= block_end
    }

    /// Changes BAT entry `index` in memory and marks its sector pending.
    pub(crate) fn set_entry(&self, st: &mut WriteState, index: u64, value: u64) {
        if let Some(a) = self.bat.get(index as usize) {
            a.store(value, Ordering::Release);
            st.dirty_bat.insert(index * 8 / SECTOR);
        }
    }

    /// Marks sectors present in the sector bitmap of `block`'s chunk (in memory; committed
    /// with the next log entry). The chunk's bitmap must be in memory
    /// ([`ensure_bitmap`](Self::ensure_bitmap)).
    pub(crate) fn set_bits(
        &self,
        st: &mut WriteState,
        block: u64,
        in_block: u64,
        len: u64,
    ) -> Result<()> {
        let chunk = block / self.geo.chunk_ratio;
        let sector = u64::from(self.geo.logical_sector_size);
        let spb = u64::from(self.geo.block_size) / sector;
        let block0 = (block % self.geo.chunk_ratio) * spb;
        let first = block0 + in_block / sector;
        let count = len / sector;
        // A block whose sectors are all present becomes FULLY_PRESENT, so later writes take
        // the lock-free path (spb >= 256, so the block's bits are whole bytes).
        let all = {
            let mut maps = self.bitmaps.write();
            let bm = maps
                .get_mut(&chunk)
                .ok_or_else(|| corrupt_io("sector bitmap not in memory"))?;
            for i in first..first + count {
                if let Some(b) = bm.get_mut((i / 8) as usize) {
                    *b |= 1 << (i % 8);
                }
            }
            let b0 = (block0 / 8) as usize;
            bm.get(b0..b0 + (spb / 8) as usize)
                .is_some_and(|r| r.iter().all(|&b| b == 0xFF))
        };
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
                // An allocation of the block in progress finishes first (never an entry
                // change under a writer that has reserved the block).
                while st.allocating.contains(&block) {
                    self.state_cv.wait(&mut st);
                }
                let cur = BatEntry::try_from(self.entry(block))?;
                let index = self.geo.payload_index(block);
                self.set_entry(&mut st, index, BatEntry::encode(new_state, 0));
                if cur.state.has_data() {
                    st.punch.push((cur.file_offset, bs));
                }
                let pending = st.pending();
                drop(st);
                self.maybe_commit(pending)?;
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

    /// Commits pending changes and marks the log empty (LogGuid = 0). Call before dropping a
    /// writable image to leave it clean; dropping does the same, ignoring errors. Writes
    /// still running on other threads when `close` is called may land in a new session.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.failstop.check()?;
        if !self.hdr.lock().session {
            return Ok(());
        }
        self.commit_coalesced(After::Close)
    }

    /// Marks the log empty and ends the session. Called by a commit holding the commit slot
    /// right after it applied every entry in place and synced (so no other commit can log
    /// under the LogGuid being retired).
    pub(crate) fn end_session(&self) -> Result<()> {
        let mut h = self.hdr.lock();
        if !h.session {
            return Ok(());
        }
        // MS-VHDX 2.2.2: LogGuid 0 says the log holds nothing to replay; true now, as every
        // entry of this session is applied in place and durable.
        let mut next = h.header;
        next.log_guid = Uuid::nil();
        self.store_header(&mut h, next)?;
        h.session = false;
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
