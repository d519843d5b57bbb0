//! [`Probe`]: a `Storage` wrapper for concurrency tests and measurements. It counts writes and
//! syncs, can hold every sync at a gate (to look at the image while one is in progress), can
//! yield the thread at random before operations (to shake up interleavings), and runs an
//! optional hook before each write (to hold or fail a chosen one).

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use block_io::{Extent, IoHandle, Result, Storage};
use parking_lot::{Condvar, Mutex};

/// Called before each write with its offset and data; an error fails the write.
pub type WriteHook = Box<dyn Fn(u64, &[u8]) -> Result<()> + Send + Sync>;

/// See the module docs.
pub struct Probe<S> {
    inner: S,
    writes: AtomicU64,
    syncs: AtomicU64,
    /// Syncs currently held at the gate.
    held: AtomicU64,
    gate_closed: Mutex<bool>,
    gate: Condvar,
    jitter: AtomicBool,
    hook: Mutex<Option<std::sync::Arc<WriteHook>>>,
}

impl<S: Storage> Probe<S> {
    pub fn new(inner: S) -> Self {
        Probe {
            inner,
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            held: AtomicU64::new(0),
            gate_closed: Mutex::new(false),
            gate: Condvar::new(),
            jitter: AtomicBool::new(false),
            hook: Mutex::new(None),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Write-like operations so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Syncs so far (counted when they start).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Syncs waiting at the closed gate now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Closes (`true`) or opens the sync gate.
    pub fn close_gate(&self, closed: bool) {
        *self.gate_closed.lock() = closed;
        self.gate.notify_all();
    }

    /// Yield the thread at random before each operation.
    pub fn set_jitter(&self, on: bool) {
        self.jitter.store(on, Ordering::SeqCst);
    }

    pub fn set_hook(&self, hook: Option<WriteHook>) {
        *self.hook.lock() = hook.map(std::sync::Arc::new);
    }

    fn before(&self) {
        if self.jitter.load(Ordering::Relaxed) {
            thread_local!(static X: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
            let r = X.with(|x| {
                let mut v = x.get();
                if v == 0 {
                    // A different seed per thread.
                    static NEXT: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
                    v = NEXT.fetch_add(0x6A09_E667_F3BC_C909, Ordering::Relaxed) | 1;
                }
                v ^= v << 13;
                v ^= v >> 7;
                v ^= v << 17;
                x.set(v);
                v
            });
            match r % 8 {
                0 => std::thread::sleep(std::time::Duration::from_micros(50)),
                1..=3 => std::thread::yield_now(),
                _ => {}
            }
        }
    }

    fn run_hook(&self, offset: u64, data: &[u8]) -> Result<()> {
        let hook = self.hook.lock().clone();
        match hook {
            Some(h) => h(offset, data),
            None => Ok(()),
        }
    }
}

impl<S: Storage> Storage for Probe<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.before();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.before();
        self.run_hook(offset, buf)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<()> {
        self.before();
        self.syncs.fetch_add(1, Ordering::SeqCst);
        let mut closed = self.gate_closed.lock();
        if *closed {
            self.held.fetch_add(1, Ordering::SeqCst);
            while *closed {
                self.gate.wait(&mut closed);
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        drop(closed);
        let r = self.inner.sync_data();
        // Also after: a caller that lingers between the sync and its bookkeeping exposes
        // waiters that trust a sync which started before their writes.
        self.before();
        r
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.punch_hole(offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.extent(offset, len)
    }
    fn io_handle(&self) -> Option<IoHandle> {
        self.inner.io_handle()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.before();
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.before();
        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.write_at(&joined, offset)
    }
}
