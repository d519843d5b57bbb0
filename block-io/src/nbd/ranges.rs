//! [`IoRanges`]: the parts of an export its requests are working on, shared by all its
//! connections, so that a trim or write-zeroes waits only for the reads and writes near it
//! (and they for it), never for the whole export.
//!
//! Why anything waits: a device may release blocks on a discard or write-zeroes, and a mapped
//! read or write in flight to a released block could then touch whatever the space is reused
//! for ([`BlockDevice::map`](crate::BlockDevice::map): a mapping stays valid until *its
//! range* is discarded or zeroed). Reads and writes take their range shared, trims and
//! write-zeroes exclusively.
//!
//! The export is cut into [`CHUNK`]-byte chunks, and chunk `i` is guarded by stripe
//! `i % STRIPES`, a fair (FIFO) tokio `RwLock`: overlapping requests always share a stripe,
//! requests far apart rarely do. A request takes the stripes of its chunks in ascending order
//! (all of them when it spans [`STRIPES`] chunks or more), so there are no cycles, and a
//! waiting exclusive request is not starved by later shared ones. A small read or write
//! takes one read lock, as with one lock for the whole export, but on one of
//! [`STRIPES`] locks, so connections and threads contend less.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes per chunk: the granularity of the locks.
pub(crate) const CHUNK: u64 = 1 << 20;
/// Locks per export.
pub(crate) const STRIPES: usize = 64;

/// Shared/exclusive locks on the chunks of one export, for async requests.
#[derive(Debug)]
pub(crate) struct IoRanges {
    stripes: Box<[RwLock<()>]>,
}

impl Default for IoRanges {
    fn default() -> Self {
        IoRanges {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

/// Held stripes; released on drop.
#[derive(Debug)]
#[must_use = "the range is unlocked when the guard is dropped"]
// The guards are held for their `Drop` only.
#[allow(dead_code)]
pub(crate) enum RangeGuard<'a> {
    /// One stripe, shared (the common case: no allocation).
    Shared(RwLockReadGuard<'a, ()>),
    /// Several stripes, shared.
    SharedMany(Vec<RwLockReadGuard<'a, ()>>),
    /// Stripes held exclusively.
    Exclusive(Vec<RwLockWriteGuard<'a, ()>>),
}

impl IoRanges {
    /// The stripes `[offset, offset+len)` (at least one byte) touches, ascending.
    fn stripes(offset: u64, len: u64) -> Vec<usize> {
        let first = offset / CHUNK;
        let last = offset.saturating_add(len.max(1) - 1) / CHUNK;
        if last - first >= STRIPES as u64 - 1 {
            return (0..STRIPES).collect();
        }
        // Fewer than STRIPES consecutive chunks: distinct stripes.
        let mut s: Vec<usize> = (first..=last)
            .map(|c| (c % STRIPES as u64) as usize)
            .collect();
        s.sort_unstable();
        s
    }

    /// Locks `[offset, offset+len)` (at least one byte), shared or exclusive, waiting for
    /// conflicting requests on the same stripes that came first.
    pub async fn lock(&self, offset: u64, len: u64, exclusive: bool) -> RangeGuard<'_> {
        let first = offset / CHUNK;
        let last = offset.saturating_add(len.max(1) - 1) / CHUNK;
        if !exclusive && first == last {
            let i = (first % STRIPES as u64) as usize;
            return RangeGuard::Shared(self.stripes[i].read().await);
        }
        let idx = Self::stripes(offset, len);
        if exclusive {
            let mut held = Vec::with_capacity(idx.len());
            for i in idx {
                held.push(self.stripes[i].write().await);
            }
            RangeGuard::Exclusive(held)
        } else {
            let mut held = Vec::with_capacity(idx.len());
            for i in idx {
                held.push(self.stripes[i].read().await);
            }
            RangeGuard::SharedMany(held)
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
    fn stripes_cover_every_chunk_touched_in_ascending_order() {
        assert_eq!(IoRanges::stripes(0, 1), vec![0]);
        assert_eq!(IoRanges::stripes(0, 0), vec![0]);
        assert_eq!(IoRanges::stripes(CHUNK - 1, 2), vec![0, 1]);
        assert_eq!(IoRanges::stripes(65 * CHUNK, CHUNK), vec![1]);
        assert_eq!(IoRanges::stripes(63 * CHUNK, 2 * CHUNK), vec![0, 63]);
        assert_eq!(IoRanges::stripes(5, 64 * CHUNK).len(), STRIPES);
        assert_eq!(IoRanges::stripes(u64::MAX - 1, 100), vec![STRIPES - 1]);
    }

    #[test]
    fn shared_ranges_never_wait_for_each_other() {
        rt().block_on(async {
            let r = IoRanges::default();
            let _a = r.lock(0, 4096, false).await;
            let _b = r.lock(0, 3 * CHUNK, false).await;
            assert!(completes(r.lock(0, 4096, false)).await);
        });
    }

    #[test]
    fn exclusive_waits_only_for_what_is_near() {
        rt().block_on(async {
            let r = Arc::new(IoRanges::default());
            let read = r.lock(0, 4096, false).await;
            // A trim in another chunk goes ahead at once.
            assert!(completes(r.lock(CHUNK, 4096, true)).await);
            // A trim over the read waits for it.
            let r2 = r.clone();
            let trim = tokio::spawn(async move {
                let _g = r2.lock(2048, CHUNK, true).await;
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!trim.is_finished());
            // A later read where the trim waits queues behind it (no starvation); one
            // elsewhere does not wait.
            assert!(!completes(r.lock(4096, 512, false)).await);
            assert!(completes(r.lock(2 * CHUNK, 512, false)).await);
            drop(read);
            trim.await.unwrap();
            assert!(completes(r.lock(CHUNK, 512, false)).await);
            assert!(completes(r.lock(0, 64 * CHUNK, true)).await);
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
            // Per chunk (81 of them, so stripes are shared): readers in it, or -1 while an
            // exclusive holder is in it.
            let inside: Arc<Vec<std::sync::atomic::AtomicI64>> = Arc::new(
                (0..81)
                    .map(|_| std::sync::atomic::AtomicI64::new(0))
                    .collect(),
            );
            let mut tasks = Vec::new();
            for i in 0..64u64 {
                let (r, inside) = (r.clone(), inside.clone());
                tasks.push(tokio::spawn(async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    for j in 0..50u64 {
                        let chunk = ((i * 7 + j * 13) % 80) as usize;
                        // Two chunks; 63 and 64 take stripes 63 and 0.
                        let chunks = [chunk, chunk + 1];
                        let exclusive = (i + j) % 5 == 0;
                        let off = chunk as u64 * CHUNK + 4096;
                        let _g = r.lock(off, CHUNK, exclusive).await;
                        for &c in &chunks {
                            if exclusive {
                                assert_eq!(inside[c].swap(-1, SeqCst), 0);
                            } else {
                                assert!(inside[c].fetch_add(1, SeqCst) >= 0);
                            }
                        }
                        tokio::task::yield_now().await;
                        for &c in &chunks {
                            if exclusive {
                                assert_eq!(inside[c].swap(0, SeqCst), -1);
                            } else {
                                assert!(inside[c].fetch_sub(1, SeqCst) >= 1);
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
}
