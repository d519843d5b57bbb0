//! [`AsyncDisk`]: the I/O engine behind an async API, for tokio (or any executor: nothing here
//! needs a runtime, only `tokio::sync::oneshot` channels).
//!
//! One I/O thread per disk owns a [`DeviceQueue`] on an [`Engine`] and the buffers of every
//! request in flight; callers reach it over an mpsc channel plus an eventfd, and the thread
//! sleeps in `poll(2)` on that eventfd and the engine's (which the queue's slow pool signals
//! too). Reads, writes and flushes go through the queue; write-zeroes, discards and
//! block-status queries, which the queue does not take, run on a small pool of control
//! threads beside it. The public description is on [`AsyncDisk`].

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::oneshot;

use super::{drain_event_fd, new_event_fd, signal_event_fd};
use super::{Aio, DeviceQueue, Engine, QueueStats, Started};
use crate::device::{BlockDevice, DiskInfo, StatusRun};
use crate::error::{Error, ErrorKind, Result};
use crate::file::AlignedBuf;
use crate::storage::RawBuf;

/// Ops the engine keeps in flight by default (more wait inside it).
const DEFAULT_DEPTH: u32 = 128;
/// Control threads (write-zeroes, discard, block status) started at most by default.
const DEFAULT_CONTROL_THREADS: usize = 4;
/// Alignment of [`AsyncDisk::alloc`] buffers at least (a page: enough for any `O_DIRECT`
/// file of 4 KiB sectors or less).
const MIN_ALIGN: usize = 4096;

/// An owned buffer an [`AsyncDisk`] reads into or writes from.
///
/// # Safety
/// [`as_raw`](IoBuf::as_raw) must return a region valid for reads and writes of its `len`
/// bytes that the value owns, stays at the same address while the value is moved (to another
/// thread too) and is neither freed nor reallocated before the value is dropped: heap memory
/// such as a `Vec<u8>`'s. The I/O thread hands the region to the kernel and gives the value
/// back only once the kernel is done with it.
pub unsafe trait IoBuf: Send + 'static {
    /// The buffer's bytes: a read fills all of them, a write writes all of them.
    fn as_raw(&mut self) -> RawBuf;
}

// SAFETY: a Vec's elements live on the heap (or at a dangling address when it holds none),
// which moving the Vec does not change; nothing reallocates it while the I/O thread holds it.
unsafe impl IoBuf for Vec<u8> {
    fn as_raw(&mut self) -> RawBuf {
        RawBuf {
            ptr: self.as_mut_ptr(),
            len: self.len(),
        }
    }
}

// SAFETY: as for Vec<u8>: boxed bytes stay where they are when the box moves.
unsafe impl IoBuf for Box<[u8]> {
    fn as_raw(&mut self) -> RawBuf {
        RawBuf {
            ptr: self.as_mut_ptr(),
            len: self.len(),
        }
    }
}

// SAFETY: an AlignedBuf's bytes are a window of a Vec it owns, which moving it does not move.
unsafe impl IoBuf for AlignedBuf {
    fn as_raw(&mut self) -> RawBuf {
        let s: &mut [u8] = self;
        RawBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }
}

/// How [`AsyncDisk::with_options`] sets up its engine and threads.
#[derive(Debug, Clone)]
pub struct AsyncOptions {
    aio: Option<Aio>,
    depth: u32,
    control_threads: usize,
}

impl Default for AsyncOptions {
    fn default() -> Self {
        AsyncOptions {
            aio: None,
            depth: DEFAULT_DEPTH,
            control_threads: DEFAULT_CONTROL_THREADS,
        }
    }
}

impl AsyncOptions {
    /// The defaults: io_uring, falling back to threads where it is not available; 128 ops in
    /// flight in the engine; at most 4 control threads.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses exactly this engine: [`Aio::IoUring`] then fails where io_uring is not available
    /// instead of falling back to threads.
    pub fn aio(mut self, aio: Aio) -> Self {
        self.aio = Some(aio);
        self
    }

    /// Ops the engine keeps in flight (1 to 4096); more requests wait inside it.
    pub fn depth(mut self, depth: u32) -> Self {
        self.depth = depth;
        self
    }

    /// Most threads running write-zeroes, discards and block-status queries at once (at least
    /// 1). Flushes do not use them: they run on the [`DeviceQueue`]'s own pool.
    pub fn control_threads(mut self, n: usize) -> Self {
        self.control_threads = n.max(1);
        self
    }
}

/// A [`BlockDevice`] with an async API on the I/O [`Engine`], for tokio or any other executor
/// (it needs no runtime). Clones share the device, the threads and the requests in flight;
/// the type is `Send + Sync`, so any number of tasks on any threads can keep requests in
/// flight together, and no call blocks the calling thread.
///
/// An `AsyncDisk` owns one I/O thread, which owns a [`DeviceQueue`] of the device on an
/// [`Engine`] (io_uring by default, a thread pool where io_uring is missing). A read or write
/// travels to that thread with its *owned* buffer, starts there with every other request in
/// flight, and its result comes back with the buffer. Reads and writes go where
/// [`DeviceQueue`] sends them: mapped pieces to the engine, the rest (memory storage,
/// allocating writes, a transfer `O_DIRECT` cannot take) through the device's synchronous raw
/// methods on the queue's small pool of threads. Flushes run on that pool too
/// ([`DeviceQueue::start_flush`]), so a flush never holds up reads and writes in flight, and
/// flushes waiting behind a running one share one [`BlockDevice::flush`]. Write-zeroes,
/// discards and block-status queries run on a few control threads (started when first
/// needed).
///
/// # Buffers
/// Buffers are owned values implementing [`IoBuf`]: `Vec<u8>`, `Box<[u8]>` and
/// [`AlignedBuf`]. A read fills the whole buffer, a write writes all of it, and either hands
/// the buffer back on success (on error it is dropped). The I/O thread holds the buffer until
/// the kernel (or the engine's threads) are done with it, even if the caller's future is
/// dropped meanwhile: dropping a future does not cancel its request, it only discards the
/// result (a write may still land). With `O_DIRECT` storage the engine needs buffers aligned
/// as the file requires; a buffer that is not (a `Vec<u8>` usually is not) still works,
/// through the device's synchronous path, which bounces it. [`AsyncDisk::alloc`] gives
/// buffers aligned for any file, which go to the engine.
///
/// # Closing
/// [`AsyncDisk::close`] refuses new requests, waits for every request already sent, stops the
/// threads and reports whether the engine failed. Dropping the last clone does the same,
/// blocking the dropping thread until the requests in flight are done. Neither flushes.
///
/// # Example
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> block_io::Result<()> {
/// use std::sync::Arc;
/// use block_io::engine::AsyncDisk;
/// use block_io::{MemStorage, RawDisk};
///
/// let storage = MemStorage::new();
/// block_io::Storage::set_len(&storage, 1 << 20)?;
/// let disk = AsyncDisk::new(Arc::new(RawDisk::new(storage)?))?;
/// let mut buf = disk.alloc(4096);
/// buf.fill(7);
/// let buf = disk.write_at(buf, 8192).await?;
/// disk.flush().await?;
/// let back = disk.read_at(vec![0u8; 4096], 8192).await?;
/// assert_eq!(&back[..], &buf[..]);
/// disk.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct AsyncDisk {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AsyncDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncDisk")
            .field("format", &self.shared.info.format)
            .field("virtual_size", &self.shared.info.virtual_size)
            .field("aio", &self.shared.aio)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// What every clone of an [`AsyncDisk`] shares.
struct Shared {
    /// To the I/O thread; `None` once the last clone is dropped.
    tx: Option<mpsc::Sender<Msg>>,
    /// Signalled after each message sent, to wake the I/O thread.
    wake: Arc<OwnedFd>,
    /// Set by `close`: requests are refused from then on.
    closed: AtomicBool,
    /// Why the I/O thread stopped early, if it did.
    failure: Arc<Mutex<Option<Error>>>,
    stats: Arc<Stats>,
    thread: Option<JoinHandle<()>>,
    dev: Arc<dyn BlockDevice>,
    info: DiskInfo,
    aio: Aio,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The I/O thread ends once its channel is disconnected and every request in flight
        // has completed (the buffers are its own until then); wait for that.
        self.closed.store(true, Ordering::Release);
        self.tx = None;
        signal_event_fd(self.wake.as_raw_fd());
        if let Some(h) = self.thread.take() {
            // The last clone may be dropped on the I/O thread itself (inside a buffer type
            // that holds one): it ends by itself then, and cannot join itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// [`QueueStats`] as the I/O thread last published them.
#[derive(Default)]
struct Stats {
    mapped: AtomicU64,
    fallback: AtomicU64,
    allocating: AtomicU64,
}

/// A message to the I/O thread.
enum Msg {
    /// A read or write of the request's own buffer.
    Io {
        write: bool,
        offset: u64,
        req: Box<dyn Pending>,
    },
    /// A flush, for the queue.
    Flush(oneshot::Sender<Result<()>>),
    /// A request for the control threads.
    Control(Job),
    /// Stop once everything sent so far has finished; then answer.
    Close(oneshot::Sender<Result<()>>),
}

/// A read or write with its buffer, as the I/O thread holds it until it completes.
trait Pending: Send {
    /// The buffer's memory.
    fn raw(&mut self) -> RawBuf;
    /// Answers the caller (handing the buffer back on success).
    fn finish(self: Box<Self>, result: Result<()>);
    /// Answers the caller with `err` and leaks the buffer: the kernel may still use it.
    fn abandon(self: Box<Self>, err: Error);
}

/// [`Pending`] for a buffer of type `B`.
struct PendingIo<B> {
    buf: B,
    reply: oneshot::Sender<Result<B>>,
}

impl<B: IoBuf> Pending for PendingIo<B> {
    fn raw(&mut self) -> RawBuf {
        self.buf.as_raw()
    }

    fn finish(self: Box<Self>, result: Result<()>) {
        let PendingIo { buf, reply } = *self;
        // A caller that went away drops the result (and the buffer, no longer in use).
        let _ = reply.send(result.map(|()| buf));
    }

    fn abandon(self: Box<Self>, err: Error) {
        let PendingIo { buf, reply } = *self;
        let _ = reply.send(Err(err));
        std::mem::forget(buf);
    }
}

/// A request started on the queue, as the I/O thread holds it until it completes.
enum Slot {
    Io(Box<dyn Pending>),
    Flush(oneshot::Sender<Result<()>>),
}

impl Slot {
    fn finish(self, result: Result<()>) {
        match self {
            Slot::Io(req) => req.finish(result),
            Slot::Flush(reply) => {
                let _ = reply.send(result);
            }
        }
    }

    fn abandon(self, err: Error) {
        match self {
            Slot::Io(req) => req.abandon(err),
            Slot::Flush(reply) => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

/// A request for the control threads, with where its answer goes.
enum Job {
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    Discard {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Status {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<StatusRun>>,
    },
}

impl AsyncDisk {
    /// Serves `dev` on io_uring, or on threads where io_uring is not available, with the
    /// default options. Starts the I/O thread (not yet any control thread).
    pub fn new(dev: Arc<dyn BlockDevice>) -> Result<AsyncDisk> {
        Self::with_options(dev, &AsyncOptions::default())
    }

    /// Serves `dev` as `options` say.
    pub fn with_options(dev: Arc<dyn BlockDevice>, options: &AsyncOptions) -> Result<AsyncDisk> {
        let info = dev.info();
        let wake = Arc::new(new_event_fd()?);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let failure = Arc::new(Mutex::new(None));
        let stats = Arc::new(Stats::default());
        let thread = {
            let (dev, wake, failure, stats) =
                (dev.clone(), wake.clone(), failure.clone(), stats.clone());
            let options = options.clone();
            std::thread::Builder::new()
                .name("vdisk-async-io".to_string())
                .spawn(move || {
                    let engine = match options.aio {
                        Some(aio) => Engine::new(aio, options.depth),
                        None => Engine::new_or_fallback(Aio::IoUring, options.depth),
                    };
                    let engine = match engine {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(engine.aio()));
                    let io = IoThread {
                        rx,
                        wake,
                        failure,
                        stats,
                        slots: Vec::new(),
                        free: Vec::new(),
                        reaped: Vec::new(),
                        control: ControlPool::new(dev.clone(), options.control_threads),
                        closers: Vec::new(),
                        closing: false,
                    };
                    io.run(DeviceQueue::new(dev, engine));
                })
                .map_err(|e| Error::io("cannot start the I/O thread", e))?
        };
        let aio = match ready_rx.recv() {
            Ok(Ok(aio)) => aio,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::new(
                    ErrorKind::Io,
                    "the I/O thread ended before its engine started",
                ));
            }
        };
        Ok(AsyncDisk {
            shared: Arc::new(Shared {
                tx: Some(tx),
                wake,
                closed: AtomicBool::new(false),
                failure,
                stats,
                thread: Some(thread),
                dev,
                info,
                aio,
            }),
        })
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.shared.dev
    }

    /// The device's [`DiskInfo`] (as it was when served).
    pub fn info(&self) -> &DiskInfo {
        &self.shared.info
    }

    /// The engine in use (threads if io_uring was not available and the options allowed
    /// falling back).
    pub fn aio(&self) -> Aio {
        self.shared.aio
    }

    /// How reads and writes ran so far: mapped to the engine, or through the device's
    /// synchronous methods (updated as the I/O thread goes; exact once it is idle).
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            mapped: self.shared.stats.mapped.load(Ordering::Relaxed),
            fallback: self.shared.stats.fallback.load(Ordering::Relaxed),
            allocating: self.shared.stats.allocating.load(Ordering::Relaxed),
        }
    }

    /// A zeroed buffer of `len` bytes aligned for any `O_DIRECT` file of this device (to
    /// 4 KiB, or its physical sector size when larger), so reads and writes of it can go to
    /// the engine.
    pub fn alloc(&self, len: usize) -> AlignedBuf {
        let sector = usize::try_from(
            self.shared
                .info
                .physical_sector_size
                .max(self.shared.info.logical_sector_size),
        )
        .unwrap_or(MIN_ALIGN);
        AlignedBuf::new(len, sector.max(MIN_ALIGN))
    }

    /// Reads `buf.len()` bytes at `offset` (both sector-aligned) into `buf` and hands it back.
    /// On error the buffer is dropped.
    pub async fn read_at<B: IoBuf>(&self, buf: B, offset: u64) -> Result<B> {
        self.io(false, buf, offset).await
    }

    /// Writes all of `buf` at `offset` (both sector-aligned) and hands the buffer back. On
    /// error the buffer is dropped.
    pub async fn write_at<B: IoBuf>(&self, buf: B, offset: u64) -> Result<B> {
        self.io(true, buf, offset).await
    }

    /// Makes `[offset, offset+len)` read as zeros ([`BlockDevice::write_zeroes`]; `unmap`
    /// lets the device release the space). It must not overlap reads or writes in flight.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Control(Job::WriteZeroes {
            offset,
            len,
            unmap,
            reply,
        }))?;
        self.answer(rx).await
    }

    /// Hints that `[offset, offset+len)` is no longer needed ([`BlockDevice::discard`]). It
    /// must not overlap reads or writes in flight.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Control(Job::Discard { offset, len, reply }))?;
        self.answer(rx).await
    }

    /// Makes every write completed before this call durable ([`BlockDevice::flush`]), while
    /// other reads and writes go on. Flushes waiting together share one device flush.
    pub async fn flush(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Flush(reply))?;
        self.answer(rx).await
    }

    /// The run of [`BlockStatus`](crate::BlockStatus) starting at `offset`, looking at most
    /// `len` bytes ([`BlockDevice::block_status`]).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Control(Job::Status { offset, len, reply }))?;
        self.answer(rx).await
    }

    /// Refuses new requests (of every clone), waits for every request sent before, stops the
    /// threads, and reports an engine failure if there was one. Does not flush. Calling it
    /// again, or after a failure was reported, returns `Ok(())` or the failure again.
    pub async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let (reply, rx) = oneshot::channel();
        let sent = match &self.shared.tx {
            Some(tx) => tx.send(Msg::Close(reply)).is_ok(),
            None => false,
        };
        if sent {
            signal_event_fd(self.shared.wake.as_raw_fd());
            if let Ok(r) = rx.await {
                return r;
            }
        }
        // The thread is gone already: it stopped for a close, or failed.
        match &*self.shared.failure.lock() {
            Some(e) => Err(dup(e)),
            None => Ok(()),
        }
    }

    async fn io<B: IoBuf>(&self, write: bool, buf: B, offset: u64) -> Result<B> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Io {
            write,
            offset,
            req: Box::new(PendingIo { buf, reply }),
        })?;
        self.answer(rx).await
    }

    /// Sends `msg` to the I/O thread and wakes it.
    fn send(&self, msg: Msg) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(self.gone());
        }
        let tx = self.shared.tx.as_ref().ok_or_else(|| self.gone())?;
        tx.send(msg).map_err(|_| self.gone())?;
        signal_event_fd(self.shared.wake.as_raw_fd());
        Ok(())
    }

    /// The answer to a request; an error if the I/O thread dropped it (it was closing).
    async fn answer<T>(&self, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        rx.await.map_err(|_| self.gone())?
    }

    /// The error of a request refused because the disk is closed or its thread failed.
    fn gone(&self) -> Error {
        match &*self.shared.failure.lock() {
            Some(e) => Error::new(
                e.kind(),
                format!("the disk's I/O thread failed: {}", e.chain_string()),
            ),
            None => Error::new(ErrorKind::InvalidInput, "the disk was closed"),
        }
    }
}

/// A copy of `e` (kind and message) for a second recipient.
fn dup(e: &Error) -> Error {
    Error::new(e.kind(), e.chain_string())
}

/// The I/O thread's state (its queue is passed alongside, so that a failure can leak it).
struct IoThread {
    rx: mpsc::Receiver<Msg>,
    wake: Arc<OwnedFd>,
    failure: Arc<Mutex<Option<Error>>>,
    stats: Arc<Stats>,
    /// Requests started on the queue, by its token.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    reaped: Vec<(usize, Result<()>)>,
    control: ControlPool,
    /// Callers of `close` waiting for the end.
    closers: Vec<oneshot::Sender<Result<()>>>,
    /// A close was asked for, or every sender is gone.
    closing: bool,
}

impl IoThread {
    fn run(mut self, mut queue: DeviceQueue<usize>) {
        let outcome = self.serve(&mut queue);
        self.publish(&queue);
        if let Err(e) = &outcome {
            *self.failure.lock() = Some(dup(e));
            // Let every request finish normally if the engine still can.
            self.reaped.clear();
            let drained = queue.drain(&mut self.reaped);
            self.complete();
            match drained {
                Ok(()) => drop(queue),
                Err(_) => {
                    for req in self.slots.drain(..).flatten() {
                        req.abandon(dup(e));
                    }
                    // The kernel or the engine's threads may still use the buffers and the
                    // device's files: leak them all rather than free or close them under it.
                    std::mem::forget(queue);
                }
            }
        } else {
            drop(queue);
        }
        self.control.shutdown();
        for c in self.closers.drain(..) {
            let _ = c.send(outcome.as_ref().map(|_| ()).map_err(dup));
        }
    }

    /// Serves requests until closed and idle, or until the engine or `poll` fails.
    fn serve(&mut self, queue: &mut DeviceQueue<usize>) -> Result<()> {
        loop {
            drain_event_fd(self.wake.as_raw_fd());
            let took = self.take_messages(queue);
            queue.commit()?;
            self.reaped.clear();
            queue.reap(&mut self.reaped)?;
            let reaped = !self.reaped.is_empty();
            self.complete();
            self.publish(queue);
            if self.closing && queue.in_flight() == 0 {
                return Ok(());
            }
            if took || reaped {
                // Reaping may have made room for ops waiting in the engine, and more
                // messages may have come: go round once more before sleeping.
                continue;
            }
            wait_readable(self.wake.as_raw_fd(), queue.event_fd())?;
        }
    }

    /// Handles every message waiting; whether there was any.
    fn take_messages(&mut self, queue: &mut DeviceQueue<usize>) -> bool {
        let mut took = false;
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Io { write, offset, req }) => self.start(queue, write, offset, req),
                Ok(Msg::Flush(reply)) => {
                    let idx = self.slot(Slot::Flush(reply));
                    if let Started::Done(idx, result) = queue.start_flush(idx) {
                        self.finish(idx, result);
                    }
                }
                Ok(Msg::Control(job)) => self.control.push(job),
                Ok(Msg::Close(reply)) => {
                    self.closing = true;
                    self.closers.push(reply);
                }
                Err(mpsc::TryRecvError::Empty) => return took,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closing = true;
                    return took;
                }
            }
            took = true;
        }
    }

    /// Starts a read or write; answers it at once if it finished synchronously.
    fn start(
        &mut self,
        queue: &mut DeviceQueue<usize>,
        write: bool,
        offset: u64,
        mut req: Box<dyn Pending>,
    ) {
        let bufs = [req.raw()];
        let idx = self.slot(Slot::Io(req));
        // SAFETY: the buffer belongs to the request now in slot `idx`, which stays there
        // until the queue reports the request done (here as `Done`, or from `reap`), or is
        // leaked if the engine fails with it in flight. Moving the request does not move the
        // buffer's memory (the `IoBuf` contract).
        match unsafe { queue.start(write, offset, &bufs, idx) } {
            Started::Queued => {}
            Started::Done(idx, result) => self.finish(idx, result),
        }
    }

    /// Puts `slot` in a free place; its index.
    fn slot(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                if let Some(s) = self.slots.get_mut(i) {
                    *s = Some(slot);
                }
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// Answers the request in slot `idx`.
    fn finish(&mut self, idx: usize, result: Result<()>) {
        if let Some(req) = self.slots.get_mut(idx).and_then(Option::take) {
            self.free.push(idx);
            req.finish(result);
        }
    }

    /// Answers every request in `self.reaped`.
    fn complete(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        for (idx, result) in reaped.drain(..) {
            self.finish(idx, result);
        }
        self.reaped = reaped;
    }

    fn publish(&self, queue: &DeviceQueue<usize>) {
        let s = queue.stats();
        self.stats.mapped.store(s.mapped, Ordering::Relaxed);
        self.stats.fallback.store(s.fallback, Ordering::Relaxed);
        self.stats.allocating.store(s.allocating, Ordering::Relaxed);
    }
}

/// Blocks until `a` or `b` is readable.
fn wait_readable(a: RawFd, b: RawFd) -> Result<()> {
    let mut fds = [a, b].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a local array of two pollfds, and its length is passed with it.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            _ => {
                return Err(Error::io(
                    "waiting for requests and completions failed",
                    err,
                ))
            }
        }
    }
}

/// Threads running [`Job`]s, started as needed up to a maximum.
struct ControlPool {
    pool: Arc<Pool>,
    dev: Arc<dyn BlockDevice>,
    max: usize,
    handles: Vec<JoinHandle<()>>,
}

/// What the control threads share.
struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    shutdown: bool,
}

impl ControlPool {
    fn new(dev: Arc<dyn BlockDevice>, max: usize) -> Self {
        ControlPool {
            pool: Arc::new(Pool {
                state: Mutex::new(PoolState::default()),
                work: Condvar::new(),
            }),
            dev,
            max: max.max(1),
            handles: Vec::new(),
        }
    }

    /// Queues `job`, starting a thread if none is idle and the maximum allows.
    fn push(&mut self, job: Job) {
        let spawn = {
            let mut st = self.pool.state.lock();
            st.jobs.push_back(job);
            let spawn = st.idle == 0 && st.threads < self.max;
            if spawn {
                st.threads += 1;
            }
            spawn
        };
        self.pool.work.notify_one();
        if !spawn {
            return;
        }
        let (pool, dev) = (self.pool.clone(), self.dev.clone());
        match std::thread::Builder::new()
            .name("vdisk-async-ctl".to_string())
            .spawn(move || control_worker(&pool, &*dev))
        {
            Ok(h) => self.handles.push(h),
            Err(_) => {
                let mut st = self.pool.state.lock();
                st.threads -= 1;
                if st.threads == 0 {
                    // No thread at all: run the jobs here rather than never.
                    while !st.jobs.is_empty() {
                        run_jobs(&mut st, &*self.dev);
                    }
                }
            }
        }
    }

    /// Lets the threads finish every queued job, then joins them.
    fn shutdown(&mut self) {
        self.pool.state.lock().shutdown = true;
        self.pool.work.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A control thread: runs jobs until shut down with none left.
fn control_worker(pool: &Pool, dev: &dyn BlockDevice) {
    let mut st = pool.state.lock();
    loop {
        if !st.jobs.is_empty() {
            run_jobs(&mut st, dev);
            continue;
        }
        if st.shutdown {
            st.threads -= 1;
            return;
        }
        st.idle += 1;
        pool.work.wait(&mut st);
        st.idle -= 1;
    }
}

/// Runs the first queued job with the lock released meanwhile.
fn run_jobs(st: &mut MutexGuard<'_, PoolState>, dev: &dyn BlockDevice) {
    let Some(job) = st.jobs.pop_front() else {
        return;
    };
    match job {
        Job::WriteZeroes {
            offset,
            len,
            unmap,
            reply,
        } => {
            let result = MutexGuard::unlocked(st, || dev.write_zeroes(offset, len, unmap));
            let _ = reply.send(result);
        }
        Job::Discard { offset, len, reply } => {
            let result = MutexGuard::unlocked(st, || dev.discard(offset, len));
            let _ = reply.send(result);
        }
        Job::Status { offset, len, reply } => {
            let result = MutexGuard::unlocked(st, || dev.block_status(offset, len));
            let _ = reply.send(result);
        }
    }
}
