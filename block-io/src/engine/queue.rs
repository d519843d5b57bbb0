//! [`DeviceQueue`]: block requests of one [`BlockDevice`] run on an [`Engine`]. Each request
//! is mapped ([`BlockDevice::map`]) to file pieces, which go to the engine with every other
//! request's in flight; zero pieces are filled at once. A write that needs new space is
//! mapped by [`BlockDevice::map_allocating`]: the device reserves the space, the engine writes
//! the payload like any other, and the request's [`WriteGuard`] publishes the metadata when
//! its last piece completes. A request the device cannot map (memory storage, an unaligned
//! `O_DIRECT` transfer, an allocation that would wait for another request or for a commit)
//! runs through the device's own synchronous raw methods instead, on a few threads of the
//! queue's own, so that a slow request (a commit and its syncs) does not hold up the mapped
//! ones. A request completes when its last piece does, with the first error of any piece.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::{Completion, Engine, Op, OpKind};
use crate::device::{BlockDevice, Mapping, WriteGuard};
use crate::error::{Error, Result};
use crate::storage::{raw_slice, raw_total, RawBuf};

/// A request in flight: the caller's token, pieces left, the first error.
struct Req<T> {
    token: T,
    left: usize,
    err: Option<Error>,
    write: bool,
    /// An allocating write's reservation, completed with the request's result.
    guard: Option<Box<dyn WriteGuard>>,
}

/// A request's result once its allocating write's guard (if any) has published or given up
/// its reservation.
fn finish_guard(guard: Option<Box<dyn WriteGuard>>, r: Result<()>) -> Result<()> {
    match guard {
        Some(g) => g.complete(r),
        None => r,
    }
}

/// Whether a transfer at `offset` of `bufs` is aligned for any file the engine may be handed
/// (`O_DIRECT` needs at most 4 KiB), checked before space is reserved for it: a reservation
/// given up is space the image never uses again.
fn aligned_for_any_file(offset: u64, bufs: &[RawBuf]) -> bool {
    const A: usize = 4096;
    offset % A as u64 == 0
        && bufs
            .iter()
            .all(|b| b.len % A == 0 && (b.ptr as usize) % A == 0)
}

/// How [`DeviceQueue::start`] left a request.
#[derive(Debug)]
pub enum Started<T> {
    /// In the engine: its completion comes from [`DeviceQueue::reap`].
    Queued,
    /// Already finished (nothing to move, done synchronously, or refused).
    Done(T, Result<()>),
}

/// A request without data that a [`DeviceQueue`] runs off its owner's thread
/// ([`DeviceQueue::start_control`]), for it may sync or change metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// [`BlockDevice::flush`]; flushes queued behind a running one share one.
    Flush,
    /// [`BlockDevice::write_zeroes`].
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The device may release the space.
        unmap: bool,
    },
    /// [`BlockDevice::discard`].
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl Control {
    /// Runs it on `dev`.
    fn run(self, dev: &dyn BlockDevice) -> Result<()> {
        match self {
            Control::Flush => dev.flush(),
            Control::WriteZeroes { offset, len, unmap } => dev.write_zeroes(offset, len, unmap),
            Control::Discard { offset, len } => dev.discard(offset, len),
        }
    }
}

/// A request the device could not map, or a control request, for the slow pool.
struct SlowJob {
    idx: usize,
    control: Option<Control>,
    flush: bool,
    write: bool,
    offset: u64,
    bufs: Vec<RawBuf>,
}

// SAFETY: the buffers are memory the submitter keeps valid until the request completes (the
// contract of `DeviceQueue::start`); a pool thread only hands them to the device's raw
// methods, which never form references to them.
unsafe impl Send for SlowJob {}

#[derive(Default)]
struct SlowState {
    jobs: std::collections::VecDeque<SlowJob>,
    done: Vec<(usize, Result<()>)>,
    idle: usize,
    threads: usize,
    shutdown: bool,
    /// A flush is running: the next one waits for it, then takes every flush queued by
    /// then with it.
    flushing: bool,
}

/// Threads that run the requests a device cannot map with its own synchronous methods (an
/// allocating write with its metadata and syncs, data held in memory), so that one slow
/// request does not hold up the mapped ones behind it. Completions are posted to `done` and
/// announced on the engine's eventfd.
struct SlowPool {
    state: Arc<(parking_lot::Mutex<SlowState>, parking_lot::Condvar)>,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// Jobs handed over and not yet reaped.
    pending: usize,
}

/// Most threads of a slow pool: allocations serialize inside a format anyway.
const SLOW_THREADS: usize = 4;

impl SlowPool {
    fn new() -> Self {
        SlowPool {
            state: Arc::default(),
            handles: Vec::new(),
            pending: 0,
        }
    }

    /// Hands `job` to a pool thread (starting one if none is idle); gives it back if no
    /// thread can run it.
    fn push(&mut self, job: SlowJob, dev: &Arc<dyn BlockDevice>, efd: RawFd) -> Option<SlowJob> {
        let spawn = {
            let mut st = self.state.0.lock();
            st.jobs.push_back(job);
            let spawn = st.idle == 0 && st.threads < SLOW_THREADS;
            if spawn {
                st.threads += 1;
            }
            spawn
        };
        self.state.1.notify_one();
        if spawn {
            let (state, dev) = (self.state.clone(), dev.clone());
            match std::thread::Builder::new()
                .name("vdisk-slow-io".to_string())
                .spawn(move || slow_worker(&state, &*dev, efd))
            {
                Ok(h) => self.handles.push(h),
                Err(_) => {
                    let mut st = self.state.0.lock();
                    st.threads -= 1;
                    if st.threads == 0 {
                        // Nobody to run it: take it back.
                        return st.jobs.pop_back();
                    }
                }
            }
        }
        self.pending += 1;
        None
    }

    fn has_done(&self) -> bool {
        !self.state.0.lock().done.is_empty()
    }

    fn take_done(&mut self, out: &mut Vec<(usize, Result<()>)>) {
        let mut st = self.state.0.lock();
        self.pending -= st.done.len().min(self.pending);
        out.append(&mut st.done);
    }
}

impl Drop for SlowPool {
    fn drop(&mut self) {
        self.state.0.lock().shutdown = true;
        self.state.1.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn slow_worker(
    state: &(parking_lot::Mutex<SlowState>, parking_lot::Condvar),
    dev: &dyn BlockDevice,
    efd: RawFd,
) {
    loop {
        let (job, joined) = {
            let mut st = state.0.lock();
            let job = loop {
                let flushing = st.flushing;
                if let Some(i) = st.jobs.iter().position(|j| !(j.flush && flushing)) {
                    if let Some(j) = st.jobs.remove(i) {
                        break j;
                    }
                }
                if st.shutdown {
                    st.threads -= 1;
                    return;
                }
                st.idle += 1;
                state.1.wait(&mut st);
                st.idle -= 1;
            };
            // Flushes coalesce: every flush queued now was submitted before this one starts,
            // so this one covers every write any of them must (all completed before it).
            let mut joined = Vec::new();
            if job.flush {
                st.flushing = true;
                st.jobs.retain(|j| {
                    if j.flush {
                        joined.push(j.idx);
                    }
                    !j.flush
                });
            }
            (job, joined)
        };
        let r = if let Some(c) = job.control {
            c.run(dev)
        } else {
            // SAFETY: the submitter keeps the buffers valid until this request is reaped
            // (`DeviceQueue::start`), which happens only after its result is posted below.
            unsafe {
                if job.write {
                    dev.write_raw_at(&job.bufs, job.offset)
                } else {
                    dev.read_raw_at(&job.bufs, job.offset)
                }
            }
        };
        {
            let mut st = state.0.lock();
            for idx in joined {
                let r2 = match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Error::new(e.kind(), e.chain_string())),
                };
                st.done.push((idx, r2));
            }
            st.done.push((job.idx, r));
            if job.flush {
                st.flushing = false;
            }
        }
        if job.flush {
            // A flush that waited for this one may go now.
            state.1.notify_all();
        }
        super::signal_event_fd(efd);
    }
}

/// Requests of one device in flight on one engine (owned by one thread, like the engine).
pub struct DeviceQueue<T> {
    // Dropped before the engine: its threads signal the engine's eventfd.
    slow: SlowPool,
    slow_done: Vec<(usize, Result<()>)>,
    engine: Engine,
    dev: Arc<dyn BlockDevice>,
    reqs: Vec<Option<Req<T>>>,
    free: Vec<usize>,
    live: usize,
    maps: Vec<Mapping>,
    done: Vec<Completion>,
    /// Requests that were mapped and went to the engine, and those that fell back.
    stats: QueueStats,
    /// Writes into the page cache (pieces of files not opened `O_DIRECT`) are done on the
    /// owner's thread rather than handed to io_uring (see [`DeviceQueue::start`]).
    inline_buffered_writes: bool,
    /// Reads of pieces wholly in the page cache are done on the owner's thread too (cleared
    /// when the kernel refuses `RWF_NOWAIT`).
    inline_cached_reads: bool,
    /// Requests with a piece bound for the disk (an `O_DIRECT` file, or a read the page
    /// cache does not hold) are handed to io_uring as soon as they are started (see
    /// [`DeviceQueue::set_eager_submit`]).
    eager_submit: bool,
}

/// Counts of how requests ran (for benchmarks and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests whose pieces went to the engine.
    pub mapped: u64,
    /// Requests that ran through the device's synchronous methods.
    pub fallback: u64,
    /// Of the mapped requests, the allocating writes (space reserved by
    /// [`BlockDevice::map_allocating`], the payload written by the engine).
    pub allocating: u64,
}

impl<T> std::fmt::Debug for DeviceQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceQueue")
            .field("engine", &self.engine)
            .field("in_flight", &self.live)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<T> DeviceQueue<T> {
    /// Requests of `dev` on `engine`.
    pub fn new(dev: Arc<dyn BlockDevice>, engine: Engine) -> Self {
        DeviceQueue {
            inline_buffered_writes: engine.aio() == super::Aio::IoUring,
            inline_cached_reads: engine.aio() == super::Aio::IoUring,
            eager_submit: engine.aio() == super::Aio::IoUring,
            slow: SlowPool::new(),
            slow_done: Vec::new(),
            engine,
            dev,
            reqs: Vec::new(),
            free: Vec::new(),
            live: 0,
            maps: Vec::new(),
            done: Vec::new(),
            stats: QueueStats::default(),
        }
    }

    /// Whether reads of pieces the page cache holds wholly are done on the owner's thread
    /// (`preadv2(RWF_NOWAIT)`, one system call per piece) rather than through the engine's
    /// ring (on by default with io_uring). A queue whose owner takes requests a few at a time
    /// (one guest queue per thread) gains from it: 4 KiB hot reads through vhost-user went
    /// from ~255k to ~380k IOPS on one queue. An owner serving several guest queues gets
    /// bigger batches, and one ring submission per batch then does better (~500k against
    /// ~380k on two queues sharing a thread); such an owner turns this off.
    pub fn set_inline_cached_reads(&mut self, yes: bool) {
        self.inline_cached_reads = yes && self.engine.aio() == super::Aio::IoUring;
    }

    /// Whether a request with a piece bound for the disk (a file opened `O_DIRECT`, or a
    /// read the page cache does not hold) is handed to the kernel as soon as it is started
    /// (on by default with io_uring), rather than with the rest of the owner's batch at
    /// [`commit`](Self::commit). Such a request then reaches the disk while the owner still
    /// maps the batch's others, for one more system call per request; requests the page cache
    /// serves keep one submission per batch. On this project's test machine (a 2-core VM on a
    /// virtio disk), 4 KiB random reads with the page cache dropped, through vhost-user at
    /// queue depth 32 on two queues, went from 80-83k IOPS (the disk's rate for batches) to
    /// 87-96k, above qemu-storage-daemon's 78-87k in the same runs, which submits one
    /// request at a time too.
    ///
    /// Only with io_uring: the thread pool wakes its threads at each commit, and a wake-up
    /// per request cost more than it gave (`vdisk bench -t none -i threads` at queue depth
    /// 32 fell from 1.10-1.35x `qemu-img bench` to 0.70-0.86x).
    pub fn set_eager_submit(&mut self, yes: bool) {
        self.eager_submit = yes && self.engine.aio() == super::Aio::IoUring;
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// The engine's event fd (readable when completions wait to be reaped).
    pub fn event_fd(&self) -> RawFd {
        self.engine.event_fd()
    }

    /// Requests started and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.live
    }

    /// How requests ran so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Starts reading (`write == false`) into or writing from the concatenation of `bufs` at
    /// `offset` of the device. Nothing reaches the kernel before [`commit`](Self::commit),
    /// except a request bound for the disk under [`set_eager_submit`](Self::set_eager_submit)
    /// (the default), which is submitted at once.
    ///
    /// # Safety
    /// Every buffer must stay valid (for a read, writable) for its length until the request's
    /// completion is reaped or returned as [`Started::Done`]. It may be shared memory that
    /// changes meanwhile (see [`RawBuf`]).
    pub unsafe fn start(
        &mut self,
        write: bool,
        offset: u64,
        bufs: &[RawBuf],
        token: T,
    ) -> Started<T> {
        let len = match raw_total(bufs) {
            Ok(n) => n,
            Err(e) => return Started::Done(token, Err(e)),
        };
        self.maps.clear();
        let mut mapped = match self.dev.map(offset, len, write, &mut self.maps) {
            Ok(m) => m,
            Err(e) => return Started::Done(token, Err(e)),
        };
        let mut guard = None;
        if !mapped && write && aligned_for_any_file(offset, bufs) {
            // An allocating write: the device reserves the space and the engine writes the
            // payload; the guard publishes the metadata when the request completes.
            self.maps.clear();
            match self.dev.clone().map_allocating(offset, len, &mut self.maps) {
                Ok(Some(g)) => {
                    guard = Some(g);
                    mapped = true;
                }
                Ok(None) => {}
                Err(e) => return Started::Done(token, Err(e)),
            }
        }
        let idx = self.slot();
        if !mapped || !self.engine_can_take(bufs, len) {
            // A reservation the engine cannot write (a file needing more than 4 KiB
            // alignment) is given up: its space stays unused.
            drop(guard.take());
            self.stats.fallback += 1;
            let job = SlowJob {
                idx,
                control: None,
                flush: false,
                write,
                offset,
                bufs: bufs.to_vec(),
            };
            let efd = self.engine.event_fd();
            return match self.slow.push(job, &self.dev, efd) {
                None => {
                    self.reqs[idx] = Some(Req {
                        token,
                        left: 1,
                        err: None,
                        write,
                        guard: None,
                    });
                    self.live += 1;
                    Started::Queued
                }
                Some(job) => {
                    // No thread to run it: run it here.
                    self.free.push(idx);
                    // SAFETY: forwarded caller contract (valid until we return).
                    let r = unsafe {
                        if write {
                            self.dev.write_raw_at(&job.bufs, offset)
                        } else {
                            self.dev.read_raw_at(&job.bufs, offset)
                        }
                    };
                    Started::Done(token, r)
                }
            };
        }
        self.stats.mapped += 1;
        if guard.is_some() {
            self.stats.allocating += 1;
        }
        let mut req = Req {
            token,
            left: 0,
            err: None,
            write,
            guard,
        };
        let mut pos = 0u64;
        // A write piece done here that failed, already reported to the device.
        let mut reported = false;
        // A piece went to the engine that the disk must serve (see `set_eager_submit`).
        let mut to_disk = false;
        for m in &self.maps {
            let n = m.len();
            match *m {
                Mapping::File {
                    handle,
                    file_offset,
                    ..
                } => {
                    let op = Op {
                        kind: if write { OpKind::Write } else { OpKind::Read },
                        fd: handle.fd,
                        offset: file_offset,
                        bufs: raw_slice(bufs, pos, n as usize),
                        tag: idx as u64,
                    };
                    if !write && handle.align <= 1 && self.inline_cached_reads {
                        // A read the page cache holds, done here: a copy costs less than the
                        // ring's round trip. One that would wait for the disk goes on.
                        match super::threads::read_cached(&op) {
                            super::threads::Cached::Read => {
                                pos += n;
                                continue;
                            }
                            super::threads::Cached::Miss => to_disk = true,
                            super::threads::Cached::Unsupported => {
                                self.inline_cached_reads = false;
                            }
                        }
                    }
                    if write && handle.align <= 1 && self.inline_buffered_writes {
                        // A write into the page cache, done here: io_uring would hand it to
                        // a kernel worker thread on file systems without asynchronous
                        // buffered writes (ext4), a thread switch per write that costs more
                        // than the copy into the page cache.
                        if let Err(e) = super::threads::execute(op) {
                            // Reported now: pieces already on the engine may complete the
                            // request later, and only their own failures are reported then.
                            self.dev.mapped_write_failed(&e);
                            reported = true;
                            req.err.get_or_insert(e);
                            break;
                        }
                        pos += n;
                        continue;
                    }
                    // SAFETY: the pieces lie inside the caller's buffers, valid until the
                    // request completes; the device (holding the fd open) lives in `self`,
                    // which waits for every op before it drops.
                    match unsafe { self.engine.submit(op) } {
                        Ok(()) => {
                            req.left += 1;
                            to_disk |= handle.align > 1;
                        }
                        Err(e) => {
                            req.err.get_or_insert(e);
                            break;
                        }
                    }
                }
                Mapping::Zero { .. } => {
                    for b in raw_slice(bufs, pos, n as usize) {
                        // SAFETY: inside the caller's buffer, valid for writes (a read's
                        // buffer); no reference to it is formed.
                        unsafe { std::ptr::write_bytes(b.ptr, 0, b.len) };
                    }
                }
                // Checked by engine_can_take.
                Mapping::Parent { .. } => {}
            }
            pos += n;
        }
        if req.left == 0 {
            self.free.push(idx);
            let r = req.err.map_or(Ok(()), Err);
            if write && !reported {
                if let Err(e) = &r {
                    self.dev.mapped_write_failed(e);
                }
            }
            return Started::Done(req.token, finish_guard(req.guard, r));
        }
        self.reqs[idx] = Some(req);
        self.live += 1;
        if to_disk && self.eager_submit {
            // A ring that fails keeps the ops queued: the owner's next commit reports it.
            let _ = self.engine.commit();
        }
        Started::Queued
    }

    /// A free request slot.
    fn slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.reqs.push(None);
            self.reqs.len() - 1
        })
    }

    /// Starts a flush of the device ([`BlockDevice::flush`]) off the owner's thread, so that
    /// reads and writes keep going while it syncs; flushes queued together share one.
    pub fn start_flush(&mut self, token: T) -> Started<T> {
        self.start_control(Control::Flush, token)
    }

    /// Starts `c` off the owner's thread (it may sync or change metadata), so that reads and
    /// writes keep going meanwhile.
    pub fn start_control(&mut self, c: Control, token: T) -> Started<T> {
        let idx = self.slot();
        let job = SlowJob {
            idx,
            control: Some(c),
            flush: c == Control::Flush,
            write: false,
            offset: 0,
            bufs: Vec::new(),
        };
        let efd = self.engine.event_fd();
        match self.slow.push(job, &self.dev, efd) {
            None => {
                self.reqs[idx] = Some(Req {
                    token,
                    left: 1,
                    err: None,
                    write: false,
                    guard: None,
                });
                self.live += 1;
                Started::Queued
            }
            Some(_) => {
                self.free.push(idx);
                Started::Done(token, c.run(&*self.dev))
            }
        }
    }

    /// Whether the mapping in `self.maps` covers `len` bytes of `bufs` with pieces the engine
    /// can move: no parent pieces, and every file piece aligned as its file needs.
    fn engine_can_take(&self, bufs: &[RawBuf], len: u64) -> bool {
        let mut pos = 0u64;
        for m in &self.maps {
            match *m {
                Mapping::Parent { .. } => return false,
                Mapping::File {
                    handle,
                    file_offset,
                    len: n,
                } => {
                    let Ok(n_usize) = usize::try_from(n) else {
                        return false;
                    };
                    if !handle.admits(file_offset, &raw_slice(bufs, pos, n_usize)) {
                        return false;
                    }
                }
                Mapping::Zero { .. } => {}
            }
            pos += m.len();
        }
        pos == len
    }

    /// Hands every started request's pieces to the kernel (or the engine's threads).
    pub fn commit(&mut self) -> Result<()> {
        self.engine.commit()
    }

    /// Moves every finished request into `out` as (token, result), without blocking.
    pub fn reap(&mut self, out: &mut Vec<(T, Result<()>)>) -> Result<()> {
        // The engine's reap clears the eventfd first; slow completions posted after the
        // take below signal it again.
        let mut done = std::mem::take(&mut self.done);
        let r = self.engine.reap(&mut done);
        for c in done.drain(..) {
            self.piece_done(c.tag as usize, c.result, true, out);
        }
        self.done = done;
        let mut slow = std::mem::take(&mut self.slow_done);
        self.slow.take_done(&mut slow);
        for (idx, result) in slow.drain(..) {
            // The device's own methods latch their failures themselves.
            self.piece_done(idx, result.map(|()| 0), false, out);
        }
        self.slow_done = slow;
        r
    }

    /// [`reap`](Self::reap) when something finished, else nothing: no system call (reap
    /// reads the engine's event fd). For an owner that reaps right after committing, to
    /// complete at once what already finished; whatever finishes later still signals the
    /// event fd.
    pub fn reap_ready(&mut self, out: &mut Vec<(T, Result<()>)>) -> Result<()> {
        if self.engine.has_completions() || (self.slow.pending > 0 && self.slow.has_done()) {
            return self.reap(out);
        }
        Ok(())
    }

    /// One piece of request `idx` finished with `result`; completes the request with its
    /// last piece. `mapped`: the piece ran on the engine (a failed write is reported to the
    /// device, whose fail-stop did not see it).
    fn piece_done(
        &mut self,
        idx: usize,
        result: Result<u64>,
        mapped: bool,
        out: &mut Vec<(T, Result<()>)>,
    ) {
        let Some(req) = self.reqs.get_mut(idx).and_then(|r| r.as_mut()) else {
            return;
        };
        req.left -= 1;
        if let Err(e) = result {
            if req.write && mapped {
                self.dev.mapped_write_failed(&e);
            }
            req.err.get_or_insert(e);
        }
        if req.left == 0 {
            if let Some(req) = self.reqs[idx].take() {
                self.free.push(idx);
                self.live -= 1;
                let r = finish_guard(req.guard, req.err.map_or(Ok(()), Err));
                out.push((req.token, r));
            }
        }
    }

    /// Commits, then blocks until at least one request can be reaped (at once when none is
    /// in flight).
    pub fn wait(&mut self) -> Result<()> {
        if self.live == 0 {
            return Ok(());
        }
        if self.slow.pending == 0 {
            return self.engine.wait();
        }
        // Slow requests in flight too: both announce completions on the eventfd.
        self.engine.commit()?;
        let mut pfd = libc::pollfd {
            fd: self.engine.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd, valid for the call.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("waiting for completions failed", e));
            }
        }
    }

    /// Waits for every request in flight and returns them (for shutting down).
    pub fn drain(&mut self, out: &mut Vec<(T, Result<()>)>) -> Result<()> {
        while self.live > 0 {
            self.wait()?;
            self.reap(out)?;
        }
        Ok(())
    }
}

impl<T> Drop for DeviceQueue<T> {
    fn drop(&mut self) {
        // The kernel may still write into the requests' memory: wait for all of it. An engine
        // that cannot wait any more (its ring failed) leaves nothing else to do.
        let mut out = Vec::new();
        let _ = self.drain(&mut out);
    }
}
