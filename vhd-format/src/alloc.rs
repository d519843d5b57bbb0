//! Block allocation of a dynamic or differencing [`VhdFile`] without a lock held across
//! payload I/O or a sync (VHD spec 1.0, "Block Allocation Table and Data Blocks": a new block
//! goes where the footer was and the footer moves to the new end of the file).
//!
//! An allocation runs in four steps; only (1) and (4) take a lock, and neither does I/O
//! but the two 512-byte metadata writes of (4):
//! 1. **Reserve** (under `alloc`, no I/O): take the next space past the highest reserved end
//!    plus one footer slot, advance the end, and put the block on the in-flight list. A second
//!    writer of the same block waits on `alloc_done` and then finds it published (or, after a
//!    failed allocation, reserves it anew): a block is never allocated twice.
//! 2. **Fill** (no lock): write the payload and the block's sector bitmap into the reserved
//!    space.
//! 3. **Sync** (no lock): [`Durability`] runs one `sync_data` at a time and lets every writer
//!    whose writes completed before a sync started share it, so concurrent allocations
//!    coalesce their syncs (group commit). Data and bitmap are now durable: the crash-order
//!    rule is that nothing points at them before that.
//! 4. **Commit** (under `commit`): write the BAT sector holding the entry, write the footer at
//!    the end of the highest reserved space, cache the bitmap, then publish the entry in the
//!    in-memory BAT. Readers, overwrites and [`BlockDevice::map`](block_io::BlockDevice::map)
//!    see the block only from here on, once it lies inside the file.
//!
//! Why a reservation starts one footer slot past the reserved end: a commit may be writing the
//! footer at that end at the same moment, and a new block's bitmap must never race it.
//!
//! Crash safety: a BAT entry reaches the file only after its block's data and bitmap are
//! durable, and a BAT sector is built from published entries only (all durable). A cut before
//! a commit leaves the reserved space unreferenced; so does an allocation that fails (every
//! failure latches fail-stop, and reservations never reuse space). Unreferenced space between
//! blocks is legal VHD: the BAT is what readers follow (qemu and libvhdi read such images, see
//! `tests/concurrent.rs`). A valid footer at the end of the file always lies past every block
//! its BAT references: it was written at the highest reserved end when it was written, and a
//! block reserved later starts past that footer and was written (durably, before its entry)
//! beyond it, so such a footer is no longer at the end. Otherwise the copy at offset 0 is used,
//! as after a crash in the middle of a serial allocation.

use block_io::{Error, ErrorKind, FailStop, Result, Storage};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::bat::{self, UNALLOCATED};
use crate::file::VhdFile;
use crate::footer::FOOTER_SIZE;
use crate::layout::DynamicLayout;

/// Alignment of a new block's data in the file. 64 KiB rather than 4 KiB: the page cache then
/// holds a block's data in large folios and 1 MiB sequential reads went from 0.85-0.89x to
/// 0.91-0.95x of a raw file (`.ci/bench-formats vhd`); the padding is a hole of under 64 KiB
/// per block (about 3% of apparent size with 2 MiB blocks), never written.
const DATA_ALIGN: u64 = 65536;

/// What `VhdFile::alloc` guards.
#[derive(Debug)]
pub(crate) struct AllocState {
    /// End of the highest reserved space: where a commit writes the footer. Every published
    /// block lies below it; the next reservation starts at least one footer slot past it.
    pub end: u64,
    /// Blocks reserved and not yet published or given up (a handful: one per allocating
    /// writer in flight).
    in_flight: Vec<usize>,
}

impl AllocState {
    /// The state of an image whose footer (and end of data) is at `end`.
    pub fn new(end: u64) -> Self {
        AllocState {
            end,
            in_flight: Vec::new(),
        }
    }
}

/// Coalesced `sync_data`: one sync at a time, shared by every caller whose writes completed
/// before it started.
#[derive(Debug, Default)]
pub(crate) struct Durability {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Syncs started so far; a running sync has the latest number.
    started: u64,
    /// Number of the latest sync that succeeded: everything written before it started is
    /// durable.
    durable: u64,
    running: bool,
}

impl Durability {
    /// Returns once every write that completed before this call is durable: by a sync that
    /// started after the call (its own or another caller's). A failed sync latches `failstop`
    /// and fails every caller waiting for it (after `fsync` fails, the kernel may have
    /// dropped the dirty pages: a later sync proves nothing).
    pub fn sync<S: Storage>(&self, storage: &S, failstop: &FailStop) -> Result<()> {
        let mut s = self.state.lock();
        // A sync in progress may have started before our writes completed: only one that
        // starts from now on counts.
        let target = s.started + 1;
        loop {
            failstop.check()?;
            if s.durable >= target {
                return Ok(());
            }
            if s.running {
                self.done.wait(&mut s);
                continue;
            }
            s.running = true;
            s.started += 1;
            let ticket = s.started;
            let r = MutexGuard::unlocked(&mut s, || failstop.guard(storage.sync_data()));
            s.running = false;
            if r.is_ok() {
                s.durable = ticket;
            }
            self.done.notify_all();
            r?;
        }
    }
}

/// A reserved block: its space is taken, its BAT entry not yet published. Dropping it (the
/// allocation done or given up) takes the block off the in-flight list and wakes the writers
/// waiting for it.
struct Reservation<'a, S: Storage> {
    file: &'a VhdFile<S>,
    block: usize,
    /// File offset of the block's bitmap; its data follows the bitmap.
    start: u64,
    /// `start` in sectors: the BAT entry.
    sector: u32,
}

impl<S: Storage> Drop for Reservation<'_, S> {
    fn drop(&mut self) {
        let mut st = self.file.alloc.lock();
        st.in_flight.retain(|&b| b != self.block);
        drop(st);
        self.file.alloc_done.notify_all();
    }
}

/// The outcome of [`VhdFile::reserve`].
enum Reserved<'a, S: Storage> {
    /// Another writer allocated the block: its data offset.
    Published(u64),
    /// The block's space is ours to fill and commit.
    Mine(Reservation<'a, S>),
}

impl<S: Storage> VhdFile<S> {
    /// Makes every write completed before the call durable, sharing a sync with concurrent
    /// callers (allocations, bitmap updates, flushes).
    pub(crate) fn sync_durable(&self) -> Result<()> {
        self.durability.sync(&self.storage, &self.failstop)
    }

    /// Allocates block `b` with `buf` written at `within` (see the module docs). Returns
    /// `None` when done, or the block's data offset when another writer allocated it first.
    pub(crate) fn allocate(
        &self,
        d: &DynamicLayout,
        b: usize,
        within: u64,
        buf: &[u8],
    ) -> Result<Option<u64>> {
        let res = match self.reserve(d, b)? {
            Reserved::Published(data) => return Ok(Some(data)),
            Reserved::Mine(r) => r,
        };
        let block = u64::from(d.header.block_size);
        let mut bm = vec![0u8; d.bitmap_size as usize];
        if self.is_diff() {
            let s0 = (within / 512) as usize;
            bat::set_bits(&mut bm, s0, s0 + buf.len() / 512, true);
        } else {
            // Dynamic disks: the whole block is present (as qemu writes it); reads ignore it.
            bat::set_bits(&mut bm, 0, (block / 512) as usize, true);
        }
        // (2) data and bitmap into the reserved space, no lock held.
        self.guard(
            self.storage
                .write_at(buf, res.start + d.bitmap_size + within),
        )?;
        self.guard(self.storage.write_at(&bm, res.start))?;
        // (3) both durable before the BAT entry points at them.
        self.sync_durable()?;
        // (4) BAT entry and footer, then publish.
        self.commit(d, &res, bm)?;
        Ok(None)
    }

    /// Step (1): reserves space for block `b`, or waits for the writer allocating it.
    fn reserve(&self, d: &DynamicLayout, b: usize) -> Result<Reserved<'_, S>> {
        let mut st = self.alloc.lock();
        loop {
            if let Some(data) = self.data_offset(d, b) {
                return Ok(Reserved::Published(data));
            }
            if !st.in_flight.contains(&b) {
                break;
            }
            // Another writer is allocating this block: never allocate it twice.
            self.alloc_done.wait(&mut st);
        }
        self.failstop.check()?;
        let block = u64::from(d.header.block_size);
        // Past the footer slot at `end`, which a commit may be writing now. The data starts
        // on a DATA_ALIGN boundary (the bitmap just before it), so block I/O is page-aligned
        // and works with O_DIRECT on 4K-sector devices; the gap is unreferenced.
        let next = st.end + FOOTER_SIZE as u64;
        let start = (next + d.bitmap_size).next_multiple_of(DATA_ALIGN) - d.bitmap_size;
        let new_end = start + d.bitmap_size + block;
        // VHD 1.0: BAT entries are 32-bit sector offsets, 0xFFFFFFFF meaning unallocated.
        let sector = u32::try_from(start / 512)
            .ok()
            .filter(|&s| s != UNALLOCATED && new_end / 512 < u64::from(u32::MAX))
            .ok_or_else(|| Error::new(ErrorKind::NoSpace, "VHD BAT offsets exhausted"))?;
        st.end = new_end;
        st.in_flight.push(b);
        Ok(Reserved::Mine(Reservation {
            file: self,
            block: b,
            start,
            sector,
        }))
    }

    /// Step (4): writes the BAT sector and the footer, caches the bitmap, publishes the entry.
    fn commit(&self, d: &DynamicLayout, res: &Reservation<'_, S>, bm: Vec<u8>) -> Result<()> {
        // One commit at a time: a BAT sector carries 128 entries, built from the published
        // ones, so two commits into one sector must not interleave.
        let _commit = self.commit.lock();
        // Fail-stop: after another writer's failure, publish nothing more.
        self.failstop.check()?;
        let (rel, sec) = d.bat.sector_with(res.block, res.sector);
        self.guard(self.storage.write_at(&sec, d.header.table_offset + rel))?;
        // VHD 1.0: the footer is the last structure of the file. At the end of the highest
        // reserved space it lies past this block (and any block reserved before); blocks
        // reserved later start past its slot.
        let footer_at = self.alloc.lock().end;
        self.guard(self.storage.write_at(&self.footer_bytes, footer_at))?;
        if self.is_diff() {
            self.cache_bitmap(res.block, bm);
        }
        // Publish last: from here the block is read, overwritten and mapped in place.
        d.bat.set(res.block, res.sector);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use block_io::{Extent, MemStorage};

    use super::*;

    /// Counts syncs; holds them while the gate is closed; fails them when `fail` is set.
    #[derive(Debug, Default)]
    struct Gated {
        mem: MemStorage,
        syncs: AtomicU64,
        closed: Mutex<bool>,
        open: Condvar,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Storage for Gated {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn len(&self) -> Result<u64> {
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.mem.set_len(len)
        }
        fn sync_data(&self) -> Result<()> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            let mut closed = self.closed.lock();
            while *closed {
                self.open.wait(&mut closed);
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Io, "sync failed"));
            }
            Ok(())
        }
        fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
            self.mem.punch_hole(offset, len)
        }
        fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
            self.mem.extent(offset, len)
        }
    }

    fn gate(st: &Gated, closed: bool) {
        *st.closed.lock() = closed;
        st.open.notify_all();
    }

    #[test]
    fn each_call_gets_a_sync_that_started_after_it() {
        let (d, st, fs) = (Durability::default(), Gated::default(), FailStop::new());
        for n in 1..=3 {
            d.sync(&st, &fs).unwrap();
            assert_eq!(st.syncs.load(Ordering::SeqCst), n);
        }
    }

    /// Callers arriving during a sync wait for it (it may have started before their writes)
    /// and then share one more.
    #[test]
    fn callers_during_a_sync_share_the_next_one() {
        let d = Arc::new(Durability::default());
        let st = Arc::new(Gated::default());
        let fs = Arc::new(FailStop::new());
        gate(&st, true);
        let spawn = || {
            let (d, st, fs) = (d.clone(), st.clone(), fs.clone());
            std::thread::spawn(move || d.sync(&*st, &fs))
        };
        let first = spawn();
        while st.syncs.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let waiters: Vec<_> = (0..4).map(|_| spawn()).collect();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(st.syncs.load(Ordering::SeqCst), 1, "one sync at a time");
        gate(&st, false);
        first.join().unwrap().unwrap();
        for w in waiters {
            w.join().unwrap().unwrap();
        }
        assert_eq!(st.syncs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_sync_fails_its_waiters_and_latches() {
        let d = Arc::new(Durability::default());
        let st = Arc::new(Gated::default());
        let fs = Arc::new(FailStop::new());
        gate(&st, true);
        st.fail.store(true, Ordering::SeqCst);
        let spawn = || {
            let (d, st, fs) = (d.clone(), st.clone(), fs.clone());
            std::thread::spawn(move || d.sync(&*st, &fs))
        };
        let first = spawn();
        while st.syncs.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let waiter = spawn();
        std::thread::sleep(Duration::from_millis(50));
        gate(&st, false);
        assert_eq!(first.join().unwrap().unwrap_err().kind(), ErrorKind::Io);
        // The waiter never trusts a later sync after a failed one: fail-stop.
        assert_eq!(
            waiter.join().unwrap().unwrap_err().kind(),
            ErrorKind::Failed
        );
        assert!(fs.is_failed());
        st.fail.store(false, Ordering::SeqCst);
        assert_eq!(d.sync(&*st, &fs).unwrap_err().kind(), ErrorKind::Failed);
    }
}
