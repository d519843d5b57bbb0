//! [`TrackedDisk`]: the wrapper every write to a tokenized disk goes through.
//!
//! Tokens are immutable (MS-FSCC 2.3.80: the data a token represents must not change while
//! it lives). This provider does not pin data; instead each disk keeps the ranges of its live
//! tokens, and a write, zeroing or discard overlapping one invalidates that token *before*
//! the data changes. Invalidation is exact: a write elsewhere on the disk leaves the token
//! alive. The disk also counts its writes (its write generation), which minted tokens record.
//!
//! Writes that bypass the wrapper (to the inner device directly, or to another wrapper of
//! the same disk) are not seen: wrap each disk once and route all its writes here.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{BlockDevice, DiskInfo, RawBuf, Result, StatusRun};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::body::TokenId;

/// The shared liveness of one token: set once a write overlaps its range.
#[derive(Debug, Default)]
pub(crate) struct LiveState {
    invalidated: AtomicBool,
}

impl LiveState {
    pub(crate) fn is_invalidated(&self) -> bool {
        self.invalidated.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Watched {
    offset: u64,
    end: u64,
    state: Arc<LiveState>,
}

/// A [`BlockDevice`] whose writes invalidate the live tokens they overlap.
pub struct TrackedDisk {
    inner: Arc<dyn BlockDevice>,
    id: Uuid,
    generation: AtomicU64,
    watched: Mutex<BTreeMap<TokenId, Watched>>,
}

impl std::fmt::Debug for TrackedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedDisk")
            .field("id", &self.id)
            .field("generation", &self.generation())
            .field("live_tokens", &self.watched.lock().len())
            .finish_non_exhaustive()
    }
}

impl TrackedDisk {
    /// Wraps `inner`, naming it by its format's disk id (VHDX disk id, VHD unique id) or, for
    /// a disk without one, a random id.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        let id = inner.info().disk_id.unwrap_or_else(Uuid::new_v4);
        Self::with_id(inner, id)
    }

    /// Wraps `inner` under the id `id` (what access policies and tokens name).
    pub fn with_id(inner: Arc<dyn BlockDevice>, id: Uuid) -> Self {
        TrackedDisk {
            inner,
            id,
            generation: AtomicU64::new(0),
            watched: Mutex::new(BTreeMap::new()),
        }
    }

    /// The disk's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The number of modifying requests seen so far (writes, zeroings, discards), failed
    /// ones included.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// The number of live tokens whose range lies on this disk.
    pub fn live_tokens(&self) -> usize {
        self.watched.lock().len()
    }

    /// Starts watching `[offset, offset+len)` for a token.
    pub(crate) fn watch(&self, id: TokenId, offset: u64, len: u64, state: Arc<LiveState>) {
        let end = offset.saturating_add(len);
        self.watched
            .lock()
            .insert(id, Watched { offset, end, state });
    }

    /// Stops watching a token (it died or was revoked).
    pub(crate) fn forget(&self, id: &TokenId) {
        self.watched.lock().remove(id);
    }

    /// Invalidates every token overlapping `[offset, offset+len)`, then counts the write.
    /// Called before the data changes, so a redeem that re-checks its token after reading
    /// the source knows no overlapping write had started by the end of its read.
    fn modifying(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        {
            let mut w = self.watched.lock();
            if !w.is_empty() {
                w.retain(|_, t| {
                    let overlaps = t.offset < end && offset < t.end;
                    if overlaps {
                        t.state.invalidated.store(true, Ordering::SeqCst);
                    }
                    !overlaps
                });
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl BlockDevice for TrackedDisk {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.modifying(offset, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.modifying(offset, len);
        self.inner.write_vectored_at(bufs, offset)
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract (buffers valid for writes).
        unsafe { self.inner.read_raw_at(bufs, offset) }
    }

    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // An overflowing total is refused by the inner device; invalidate up to the end of
        // the disk meanwhile.
        let len = block_io::raw_total(bufs).unwrap_or(u64::MAX);
        self.modifying(offset, len);
        // SAFETY: forwarded caller contract (buffers valid for reads).
        unsafe { self.inner.write_raw_at(bufs, offset) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.modifying(offset, len);
        self.inner.write_zeroes(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.modifying(offset, len);
        self.inner.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        self.inner.block_status(offset, len)
    }

    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_data_at(buf, offset)
    }
}
