//! [`RangeLock`]: block-granular shared/exclusive locks over a disk's address space.
//!
//! Guest I/O and online jobs (copy, mirror, merge) coordinate through it: a job's chunk copy
//! takes the blocks it copies exclusively, guest writes take theirs shared (many guest writes
//! to different blocks at once; only conflicts wait). Byte ranges are widened to whole blocks,
//! so two requests conflict when they touch one block and at least one is exclusive.
//! Waiting is fair enough for its use: a waiter re-checks on every release.

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct Table {
    held: Vec<Held>,
    next_id: u64,
}

/// Shared/exclusive locks on ranges of blocks.
#[derive(Debug)]
pub struct RangeLock {
    block: u64,
    table: Mutex<Table>,
    released: Condvar,
}

/// A held range; released on drop.
#[derive(Debug)]
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Locks at `block_size`-byte granularity (0 is treated as 1).
    pub fn new(block_size: u64) -> Self {
        RangeLock {
            block: block_size.max(1),
            table: Mutex::new(Table::default()),
            released: Condvar::new(),
        }
    }

    /// The granularity in bytes.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset / self.block;
        let end = offset.saturating_add(len.max(1)).div_ceil(self.block);
        (start, end)
    }

    fn conflicts(table: &Table, start: u64, end: u64, exclusive: bool) -> bool {
        table
            .held
            .iter()
            .any(|h| h.start < end && start < h.end && (exclusive || h.exclusive))
    }

    fn acquire(&self, offset: u64, len: u64, exclusive: bool) -> RangeGuard<'_> {
        let (start, end) = self.blocks(offset, len);
        let mut t = self.table.lock();
        while Self::conflicts(&t, start, end, exclusive) {
            self.released.wait(&mut t);
        }
        self.insert(&mut t, start, end, exclusive)
    }

    fn try_acquire(&self, offset: u64, len: u64, exclusive: bool) -> Option<RangeGuard<'_>> {
        let (start, end) = self.blocks(offset, len);
        let mut t = self.table.lock();
        if Self::conflicts(&t, start, end, exclusive) {
            return None;
        }
        Some(self.insert(&mut t, start, end, exclusive))
    }

    fn insert(&self, t: &mut Table, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let id = t.next_id;
        t.next_id += 1;
        t.held.push(Held {
            id,
            start,
            end,
            exclusive,
        });
        RangeGuard { lock: self, id }
    }

    /// Locks the blocks covering `[offset, offset+len)` shared, waiting for exclusive holders.
    pub fn lock_shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.acquire(offset, len, false)
    }

    /// Locks the blocks covering `[offset, offset+len)` exclusively, waiting for any holder.
    pub fn lock_exclusive(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.acquire(offset, len, true)
    }

    /// Like [`lock_shared`](Self::lock_shared) but returns `None` instead of waiting.
    pub fn try_lock_shared(&self, offset: u64, len: u64) -> Option<RangeGuard<'_>> {
        self.try_acquire(offset, len, false)
    }

    /// Like [`lock_exclusive`](Self::lock_exclusive) but returns `None` instead of waiting.
    pub fn try_lock_exclusive(&self, offset: u64, len: u64) -> Option<RangeGuard<'_>> {
        self.try_acquire(offset, len, true)
    }

    /// Number of ranges held now.
    pub fn held(&self) -> usize {
        self.table.lock().held.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.lock.table.lock();
        t.held.retain(|h| h.id != self.id);
        drop(t);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn shared_coexist_exclusive_conflicts() {
        let l = RangeLock::new(4096);
        let a = l.lock_shared(0, 8192);
        let b = l.try_lock_shared(4096, 10).expect("shared with shared");
        assert!(l.try_lock_exclusive(8191, 1).is_none(), "block 1 is held");
        let c = l.try_lock_exclusive(8192, 4096).expect("block 2 is free");
        assert!(l.try_lock_shared(8192, 1).is_none());
        drop((a, b, c));
        assert_eq!(l.held(), 0);
        assert!(l.try_lock_exclusive(0, u64::MAX).is_some());
    }

    #[test]
    fn exclusive_sections_never_overlap_across_threads() {
        let l = Arc::new(RangeLock::new(512));
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (l, inside) = (l.clone(), inside.clone());
                std::thread::spawn(move || {
                    for i in 0..500u64 {
                        let off = ((i * 7 + t) % 4) * 512;
                        let _g = l.lock_exclusive(off, 1024);
                        let bit = 1u64 << (off / 512);
                        let bits = bit | (bit << 1);
                        let before = inside.fetch_or(bits, Ordering::SeqCst);
                        assert_eq!(before & bits, 0, "two holders inside one block");
                        inside.fetch_and(!bits, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
