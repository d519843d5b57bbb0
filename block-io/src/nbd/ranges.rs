//! [`IoRanges`]: the byte ranges an export's requests are working on, shared by all its
//! connections, so that a trim or write-zeroes waits only for the reads and writes it
//! overlaps (and they for it), never for the whole export.
//!
//! Why anything waits: a device may release blocks on a discard or write-zeroes, and a mapped
//! read or write in flight to a released block could then touch whatever the space is reused
//! for ([`BlockDevice::map`](crate::BlockDevice::map): a mapping stays valid until *its
//! range* is discarded or zeroed). Reads and writes take their range shared, trims and
//! write-zeroes exclusively. Requests are granted in arrival order among those that overlap:
//! a request waits only for earlier overlapping requests it conflicts with, so an exclusive
//! one is never starved by a stream of shared ones, and there are no cycles.
//!
//! The shared path is one short mutex hold to take a slot and one to free it; when no
//! exclusive request exists, nothing is scanned.

use std::pin::pin;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Arrival order.
    seq: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct Table {
    /// Slots; `None` is free.
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    next_seq: u64,
    /// Exclusive entries held or waiting.
    exclusive: usize,
    /// Requests waiting for a conflict to end.
    waiting: usize,
}

impl Table {
    /// Whether `e` must wait: an earlier overlapping entry conflicts with it.
    fn blocked(&self, e: &Entry) -> bool {
        if !e.exclusive && self.exclusive == 0 {
            return false;
        }
        self.slots.iter().flatten().any(|o| {
            o.seq < e.seq && o.start < e.end && e.start < o.end && (e.exclusive || o.exclusive)
        })
    }
}

/// Shared/exclusive locks on byte ranges of one export, for async requests.
#[derive(Debug, Default)]
pub(crate) struct IoRanges {
    table: Mutex<Table>,
    released: Notify,
}

/// A held (or awaited) range; released on drop.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    ranges: &'a IoRanges,
    slot: usize,
    waiting: bool,
}

impl IoRanges {
    /// Locks `[offset, offset+len)` (at least one byte), shared or exclusive, waiting for the
    /// earlier overlapping requests it conflicts with.
    pub async fn lock(&self, offset: u64, len: u64, exclusive: bool) -> RangeGuard<'_> {
        // One hold for the arrival number and the slot: an entry numbered is an entry seen.
        let (entry, slot, blocked) = {
            let mut t = self.table.lock();
            let entry = Entry {
                seq: t.next_seq,
                start: offset,
                end: offset.saturating_add(len.max(1)),
                exclusive,
            };
            t.next_seq += 1;
            let blocked = t.blocked(&entry);
            let slot = match t.free.pop() {
                Some(i) => {
                    t.slots[i] = Some(entry);
                    i
                }
                None => {
                    t.slots.push(Some(entry));
                    t.slots.len() - 1
                }
            };
            if exclusive {
                t.exclusive += 1;
            }
            if blocked {
                t.waiting += 1;
            }
            (entry, slot, blocked)
        };
        // From here on the guard owns the slot: a caller that gives up waiting frees it.
        let mut guard = RangeGuard {
            ranges: self,
            slot,
            waiting: blocked,
        };
        if blocked {
            loop {
                let mut notified = pin!(self.released.notified());
                // Registered before the check: a release in between still wakes us.
                notified.as_mut().enable();
                {
                    let mut t = self.table.lock();
                    if !t.blocked(&entry) {
                        t.waiting -= 1;
                        guard.waiting = false;
                        break;
                    }
                }
                notified.await;
            }
        }
        guard
    }

    /// Ranges held or awaited.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().slots.iter().flatten().count()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let wake = {
            let mut t = self.ranges.table.lock();
            if let Some(e) = t.slots.get_mut(self.slot).and_then(Option::take) {
                if e.exclusive {
                    t.exclusive -= 1;
                }
                t.free.push(self.slot);
            }
            if self.waiting {
                t.waiting -= 1;
            }
            t.waiting > 0
        };
        if wake {
            self.ranges.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Whether `f` completes within a short while.
    async fn completes<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_ok()
    }

    #[test]
    fn shared_ranges_never_wait_for_each_other() {
        rt().block_on(async {
            let r = IoRanges::default();
            let _a = r.lock(0, 4096, false).await;
            assert!(completes(r.lock(0, 4096, false)).await);
            assert_eq!(r.len(), 1);
        });
    }

    #[test]
    fn exclusive_waits_only_for_what_it_overlaps() {
        rt().block_on(async {
            let r = Arc::new(IoRanges::default());
            let read = r.lock(0, 4096, false).await;
            // A trim elsewhere goes ahead at once.
            assert!(completes(r.lock(4096, 4096, true)).await);
            // A trim over the read waits for it.
            let r2 = r.clone();
            let trim = tokio::spawn(async move {
                let _g = r2.lock(2048, 4096, true).await;
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!trim.is_finished());
            // A later read of the trimmed range waits for the trim (no starvation), one
            // elsewhere does not.
            assert!(!completes(r.lock(4096, 512, false)).await);
            assert!(completes(r.lock(8192, 512, false)).await);
            drop(read);
            trim.await.unwrap();
            assert!(completes(r.lock(4096, 512, false)).await);
            assert_eq!(r.len(), 0);
        });
    }

    #[test]
    fn a_waiter_that_gives_up_frees_its_slot() {
        rt().block_on(async {
            let r = IoRanges::default();
            let held = r.lock(0, 512, true).await;
            assert!(!completes(r.lock(0, 512, false)).await);
            drop(held);
            assert_eq!(r.len(), 0);
            assert_eq!(r.table.lock().waiting, 0);
            assert_eq!(r.table.lock().exclusive, 0);
            assert!(completes(r.lock(0, 512, true)).await);
        });
    }

    #[test]
    fn many_tasks_keep_exclusive_ranges_exclusive() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = Arc::new(IoRanges::default());
            // Per 4 KiB block: readers in it, or -1 while an exclusive holder is in it.
            let inside: Arc<Vec<std::sync::atomic::AtomicI64>> = Arc::new(
                (0..8)
                    .map(|_| std::sync::atomic::AtomicI64::new(0))
                    .collect(),
            );
            let mut tasks = Vec::new();
            for i in 0..64u64 {
                let (r, inside) = (r.clone(), inside.clone());
                tasks.push(tokio::spawn(async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    for j in 0..50u64 {
                        let block = ((i * 7 + j * 3) % 8) as usize;
                        let exclusive = (i + j) % 5 == 0;
                        let _g = r.lock(block as u64 * 4096, 4096, exclusive).await;
                        if exclusive {
                            assert_eq!(inside[block].swap(-1, SeqCst), 0);
                            tokio::task::yield_now().await;
                            assert_eq!(inside[block].swap(0, SeqCst), -1);
                        } else {
                            assert!(inside[block].fetch_add(1, SeqCst) >= 0);
                            tokio::task::yield_now().await;
                            assert!(inside[block].fetch_sub(1, SeqCst) >= 1);
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(r.len(), 0);
        });
    }
}
