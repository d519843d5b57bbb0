//! Block allocation of a dynamic or differencing [`VhdFile`] without a lock held across
//! payload I/O or a sync (VHD spec 1.0, "Block Allocation Table and Data Blocks": a new block
//! goes where the footer was and the footer moves to the new end of the file).
//!
//! An allocation runs in three steps; only (1) and (3) take a lock, and only (3) does I/O
//! under it, a 512-byte write:
//! 1. **Reserve** (under `alloc`, no I/O): take the next space past the highest reserved end
//!    plus one footer slot, advance the end, and put the block on the in-flight list. A second
//!    writer of the same block waits on `alloc_done` and then finds it published (or, after a
//!    failed allocation, reserves it anew): a block is never allocated twice.
//! 2. **Fill** (no lock): write the payload and the block's sector bitmap into the reserved
//!    space.
//! 3. **Publish** (under `commit`; one 512-byte write, no sync): write the footer at the end
//!    of the highest reserved space (so the file covers the whole block), cache the bitmap,
//!    set the entry in the in-memory BAT and note it as *pending* with a sequence number. Readers, overwrites and
//!    [`BlockDevice::map`](block_io::BlockDevice::map) see the block from here on.
//!
//! The BAT entries reach the file at the next flush ([`VhdFile::persist`]), as a write
//! needs to be durable only once a flush returns: (a) note the sequence number of the next
//! publication, (b) one `sync_data` — every block published before (a) now has durable data
//! and bitmap, (c) under `commit`, write the BAT sectors of those blocks (an entry published
//! after (a) is written as unallocated, its data may not be durable yet) and the footer at
//! the end of the highest reserved space, (d) one more `sync_data`. Bulk writing of a new
//! image thus pays two syncs per flush, not one per block (it was 514 `fdatasync`s for a
//! 1 GiB convert). Syncs are shared by concurrent callers ([`Durability`], group commit), and
//! a flush that finds its entries already written by another still waits for a sync of
//! them. Closing or dropping a writable file persists what is pending.
//!
//! Why a reservation starts one footer slot past the reserved end: a flush may be writing the
//! footer at that end at the same moment, and a new block's bitmap must never race it.
//!
//! Crash safety: a BAT entry reaches the file only after its block's data and bitmap are
//! durable, and a BAT sector is built from published, durable entries only. A cut before a
//! flush leaves the reserved space unreferenced; so does an allocation that fails (every
//! failure latches fail-stop, and reservations never reuse space). Unreferenced space between
//! blocks is legal VHD: the BAT is what readers follow (qemu and libvhdi read such images, see
//! `tests/concurrent.rs`). A valid footer at the end of the file always lies past every block
//! its BAT references: it was written at the highest reserved end when it was written, and a
//! block reserved later starts past that footer and was written (durably, before its entry)
//! beyond it, so such a footer is no longer at the end. Otherwise the copy at offset 0 is used,
//! as after a crash in the middle of a serial allocation.

use block_io::{Error, ErrorKind, FailStop, Result, Storage};
use std::collections::BTreeMap;

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

    /// Whether no allocation is in flight (compaction may cut the file).
    pub fn idle(&self) -> bool {
        self.in_flight.is_empty()
    }
}

/// Allocations published in memory whose BAT entries the file does not have yet (guarded
/// by `VhdFile::commit`).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Sequence number of the next publication.
    next_seq: u64,
    /// Every block published with a lower sequence number has durable data and bitmap.
    durable_below: u64,
    /// Pending blocks and their publication sequence numbers.
    blocks: BTreeMap<usize, u64>,
    /// BAT/footer write batches done so far, and how many of them a sync has covered.
    meta_written: u64,
    meta_durable: u64,
}

impl Pending {
    /// Whether block `b` is published but its BAT entry is not in the file yet.
    pub(crate) fn contains(&self, b: usize) -> bool {
        self.blocks.contains_key(&b)
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
        self.durability.sync(self.storage(), &self.failstop)
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
            self.storage()
                .write_at(buf, res.start + d.bitmap_size + within),
        )?;
        self.guard(self.storage().write_at(&bm, res.start))?;
        // (3) publish; the BAT entry reaches the file at the next flush, after a sync.
        self.publish(&res, bm)?;
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

    /// Step (3): caches the bitmap, publishes the entry in memory and notes it pending.
    fn publish(&self, res: &Reservation<'_, S>, bm: Vec<u8>) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return Err(crate::error::corrupt("allocation in a fixed disk"));
        };
        let mut p = self.commit.lock();
        // Fail-stop: after another writer's failure, publish nothing more.
        self.failstop.check()?;
        if self.is_diff() {
            self.cache_bitmap(res.block, bm);
        }
        // VHD 1.0: the footer is the last structure of the file. Written at the end of the
        // highest reserved space, it lies past this block, so the file covers all of it (a
        // mapped read of the block's unwritten part must not meet the end of the file); blocks
        // reserved later start past its slot. No sync: the BAT does not point here yet.
        let footer_at = self.alloc.lock().end;
        self.guard(self.storage().write_at(&self.footer_bytes, footer_at))?;
        // From here the block is read, overwritten and mapped in place.
        d.bat.set(res.block, res.sector);
        let seq = p.next_seq;
        p.next_seq += 1;
        p.blocks.insert(res.block, seq);
        Ok(())
    }

    /// Makes every write completed before the call durable and every block allocated before
    /// it part of the image on disk (see the module docs): the body of
    /// [`BlockDevice::flush`](block_io::BlockDevice::flush).
    pub(crate) fn persist(&self) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return self.sync_durable();
        };
        // (a) Blocks published before this point have completed their data writes.
        let upto = self.commit.lock().next_seq;
        // (b)
        self.sync_durable()?;
        // (c)
        let need_sync = {
            let mut p = self.commit.lock();
            self.failstop.check()?;
            p.durable_below = p.durable_below.max(upto);
            let durable_below = p.durable_below;
            let ready: Vec<usize> = p
                .blocks
                .iter()
                .filter(|&(_, &seq)| seq < durable_below)
                .map(|(&b, _)| b)
                .collect();
            if !ready.is_empty() {
                let mut sectors: Vec<usize> =
                    ready.iter().map(|b| b / bat::ENTRIES_PER_SECTOR).collect();
                sectors.dedup();
                for sector in sectors {
                    // Entries published after (a) stay unallocated on disk for now.
                    let (rel, bytes) = d.bat.sector_bytes(sector, |i| {
                        p.blocks.get(&i).is_some_and(|&seq| seq >= durable_below)
                    });
                    self.guard(self.storage().write_at(&bytes, d.header.table_offset + rel))?;
                }
                // VHD 1.0: the footer is the last structure of the file. At the end of the
                // highest reserved space it lies past every block (published or in flight);
                // blocks reserved later start past its slot.
                let footer_at = self.alloc.lock().end;
                self.guard(self.storage().write_at(&self.footer_bytes, footer_at))?;
                for b in ready {
                    p.blocks.remove(&b);
                }
                p.meta_written += 1;
            }
            // Also when another flush wrote our entries and has not synced them yet.
            (p.meta_durable < p.meta_written).then_some(p.meta_written)
        };
        // (d)
        if let Some(written) = need_sync {
            self.sync_durable()?;
            let mut p = self.commit.lock();
            p.meta_durable = p.meta_durable.max(written);
        }
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

    fn dynamic_on(st: Arc<Gated>, blocks: u64) -> VhdFile<Arc<Gated>> {
        let opts = crate::CreateOptions::new(blocks * (2 << 20), crate::Subformat::Dynamic);
        VhdFile::create(st, &opts).unwrap()
    }

    fn on_disk_entry(st: &Gated, f: &VhdFile<Arc<Gated>>, b: u64) -> u32 {
        let table = f.dynamic.as_ref().unwrap().header.table_offset;
        let mut e = [0u8; 4];
        st.mem.read_at(&mut e, table + 4 * b).unwrap();
        u32::from_be_bytes(e)
    }

    /// Bulk writing: allocations pay no sync; a flush pays two (data, then BAT + footer),
    /// whatever the number of blocks.
    #[test]
    fn allocations_sync_nothing_and_a_flush_syncs_twice() {
        use block_io::BlockDevice;
        let st = Arc::new(Gated::default());
        let f = dynamic_on(st.clone(), 64);
        let base = st.syncs.load(Ordering::SeqCst);
        for b in 0..64u64 {
            f.write_at(&[b as u8 + 1; 4096], b * (2 << 20)).unwrap();
        }
        assert_eq!(
            st.syncs.load(Ordering::SeqCst),
            base,
            "no sync per allocation"
        );
        assert_eq!(
            on_disk_entry(&st, &f, 5),
            UNALLOCATED,
            "BAT entry before a flush"
        );
        let mut buf = [0u8; 4096];
        f.read_at(&mut buf, 5 * (2 << 20)).unwrap();
        assert_eq!(
            buf, [6u8; 4096],
            "published blocks read back before a flush"
        );
        f.flush().unwrap();
        assert_eq!(st.syncs.load(Ordering::SeqCst), base + 2);
        assert_ne!(on_disk_entry(&st, &f, 5), UNALLOCATED);
        // Nothing pending: a flush is one sync.
        f.flush().unwrap();
        assert_eq!(st.syncs.load(Ordering::SeqCst), base + 3);
    }

    /// A published block lies inside the file, all of it, before any flush: the engine maps
    /// its unwritten part to the file and reads it there.
    #[test]
    fn a_published_block_is_inside_the_file() {
        use block_io::BlockDevice;
        let st = Arc::new(Gated::default());
        let f = dynamic_on(st.clone(), 4);
        f.write_at(&[3; 512], 2 << 20).unwrap();
        let d = f.dynamic.as_ref().unwrap();
        let data = f.data_offset(d, 1).unwrap();
        assert!(st.mem.len().unwrap() >= data + (2 << 20));
        let mut buf = vec![1u8; 4096];
        st.mem.read_at(&mut buf, data + (2 << 20) - 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    /// An entry published after a flush's first sync started is not written by that flush
    /// (its data may not be durable): the BAT only ever points at durable data.
    #[test]
    fn a_flush_writes_only_entries_published_before_its_sync() {
        use block_io::BlockDevice;
        let st = Arc::new(Gated::default());
        let f = Arc::new(dynamic_on(st.clone(), 8));
        f.write_at(&[1; 512], 0).unwrap();
        gate(&st, true);
        let base = st.syncs.load(Ordering::SeqCst);
        let flusher = {
            let f = f.clone();
            std::thread::spawn(move || f.flush())
        };
        while st.syncs.load(Ordering::SeqCst) == base {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Published while the flush's data sync runs.
        f.write_at(&[2; 512], 2 << 20).unwrap();
        gate(&st, false);
        flusher.join().unwrap().unwrap();
        assert_ne!(on_disk_entry(&st, &f, 0), UNALLOCATED);
        assert_eq!(on_disk_entry(&st, &f, 1), UNALLOCATED);
        f.flush().unwrap();
        assert_ne!(on_disk_entry(&st, &f, 1), UNALLOCATED);
    }

    /// Dropping or closing a writable file persists what no flush has; a reopen finds it.
    #[test]
    fn close_and_drop_persist_pending_allocations() {
        use block_io::BlockDevice;
        for close in [false, true] {
            let st = Arc::new(Gated::default());
            let f = dynamic_on(st.clone(), 4);
            f.write_at(&[9; 512], 3 << 20).unwrap();
            if close {
                f.close().unwrap();
            } else {
                drop(f);
            }
            let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
            let mut buf = [0u8; 512];
            f.read_at(&mut buf, 3 << 20).unwrap();
            assert_eq!(buf, [9; 512], "close {close}");
        }
    }

    /// A close whose sync fails says so.
    #[test]
    fn close_reports_a_failed_sync() {
        use block_io::BlockDevice;
        let st = Arc::new(Gated::default());
        let f = dynamic_on(st.clone(), 4);
        f.write_at(&[9; 512], 0).unwrap();
        st.fail.store(true, Ordering::SeqCst);
        assert_eq!(f.close().unwrap_err().kind(), ErrorKind::Io);
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
