//! The [`VhostUserBackend`] of one connection: hands out the configuration space and features,
//! and runs the queues' requests on worker threads (vhost-user-backend spawns one epoll thread
//! per entry of [`VhostUserBackend::queues_per_thread`]): queue `q` on worker `q % workers`,
//! each worker with its own I/O engine ([`Shared::workers`]). When the host has more cores
//! than workers, each worker also gets an offload thread: a big request (256 KiB or more) is
//! handed to it whenever it is idle, and the worker goes on with the next request, so one
//! queue streaming large transfers keeps two cores busy, as qemu's I/O thread pool does.
//! `stop_vring` waits for offloaded requests too, and [`BlkBackend::shutdown`] joins the
//! offload threads when the connection ends.
//!
//! Queue processing follows virtio 1.2, 2.7.10 "Driver notifications" with
//! `VIRTIO_RING_F_EVENT_IDX`: disable notifications, drain the available ring, re-enable, and
//! drain again if the driver raced in more requests. Each request is completed as soon as it
//! is done, and the driver is interrupted when the used-event index says so.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use parking_lot::{Condvar, Mutex, RwLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::{BlockDevice, DiskInfo};

use super::config::{device_features, BlkConfig, CONFIG_LEN};
use super::request::{prepare, process, Desc, IoRequest, Prepared, Target, ID_LEN};
use crate::engine::{Aio, DeviceQueue, Engine, Started};

/// Requests popped from a ring under one lock acquisition.
const BATCH: usize = 64;
/// Largest config read answered (the vhost-user message limit).
const MAX_CONFIG_READ: usize = 256;

/// What every connection shares: the disk and its fixed answers (but the capacity, which
/// follows the disk's size when told to, see [`Shared::refresh`]).
pub(crate) struct Shared {
    pub dev: Arc<dyn BlockDevice>,
    pub info: DiskInfo,
    /// The capacity in 512-byte sectors: config space and request checks.
    pub capacity: AtomicU64,
    /// The current connection's backend request channel (BACKEND_REQ), if it opened one.
    pub frontend: Mutex<Option<Backend>>,
    pub config: [u8; CONFIG_LEN],
    pub features: u64,
    pub num_queues: usize,
    /// Worker threads the queues are spread over (1 to `num_queues`).
    pub workers: usize,
    pub queue_size: usize,
    pub id: [u8; ID_LEN],
    /// The I/O engine each queue runs its reads and writes on; `None`: one at a time on the
    /// queue's worker thread.
    pub aio: Option<Aio>,
}

impl Shared {
    pub(crate) fn new(
        dev: Arc<dyn BlockDevice>,
        num_queues: u16,
        workers: u16,
        queue_size: u16,
        serial: &str,
        aio: Option<Aio>,
    ) -> Self {
        let info = dev.info();
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Shared {
            capacity: AtomicU64::new(info.virtual_size / 512),
            frontend: Mutex::new(None),
            config: BlkConfig::for_disk(&info, num_queues).to_bytes(),
            features: device_features(&info),
            num_queues: usize::from(num_queues),
            workers: usize::from(workers.clamp(1, num_queues.max(1))),
            queue_size: usize::from(queue_size),
            id,
            info,
            dev,
            aio,
        }
    }
}

impl Shared {
    /// Takes the disk's size again; when it changed, the config space's `capacity` changes
    /// and the connected frontend, if it opened the backend request channel, is sent
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (virtio 1.2, 2.5.1: the device's configuration
    /// change notification; the driver then reads the config space again). Requests are
    /// checked against the new capacity from their next batch on. Returns whether it changed.
    ///
    /// With REPLY_ACK the frontend's acknowledgement is awaited for at most `ack_timeout`:
    /// the message goes out on its own thread, which a frontend that never answers leaves
    /// waiting (until it answers or disconnects) instead of the caller. A later refresh then
    /// waits behind it, for its own `ack_timeout` at most.
    pub(crate) fn refresh(&self, ack_timeout: std::time::Duration) -> crate::Result<bool> {
        let sectors = self.dev.info().virtual_size / 512;
        if self.capacity.swap(sectors, Ordering::AcqRel) == sectors {
            return Ok(false);
        }
        let Some(fe) = self.frontend.lock().clone() else {
            return Ok(true);
        };
        let cannot = |e: std::io::Error| {
            crate::Error::io("cannot send the configuration change to the frontend", e)
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("vu-config-change".into())
            .spawn(move || {
                let _ = tx.send(fe.handle_config_change());
            })
            .map_err(cannot)?;
        match rx.recv_timeout(ack_timeout) {
            Ok(r) => {
                r.map_err(cannot)?;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(crate::Error::new(
                    crate::ErrorKind::Failed,
                    format!(
                        "the frontend did not acknowledge the configuration change within {} ms \
                         (the new capacity is in the config space for its next read)",
                        ack_timeout.as_millis()
                    ),
                ))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(cannot(std::io::Error::other("the sending thread died")))
            }
        }
        Ok(true)
    }
}

/// A read or write in flight on a queue's engine: what completing it needs.
struct IoToken {
    vring: VringRwLock,
    /// The vring's queue index.
    queue: u16,
    head: u16,
    io: IoRequest,
    /// The guest memory snapshot the request's buffers point into, kept mapped until then.
    mem: Arc<GuestMemoryMmap>,
}

// SAFETY: the token's raw pointers point into guest memory that `mem` keeps mapped; a token
// only moves with the queue state it belongs to (behind that queue's mutex) and its pointers
// are only handed to the kernel by that queue's engine.
unsafe impl Send for IoToken {}

/// `device_event` of every queue's engine eventfd (above the queues and the exit event).
pub(crate) fn engine_event(num_queues: usize) -> u16 {
    u16::try_from(num_queues + 1).unwrap_or(u16::MAX)
}

/// Per-worker scratch space, reused across requests, the worker's engine and its offload
/// thread.
#[derive(Default)]
struct Scratch {
    descs: Vec<Desc>,
    /// Reads and writes in flight on the queue's engine (`None`: synchronous).
    queue: Option<DeviceQueue<IoToken>>,
    /// Completions reaped from it, reused.
    reaped: Vec<(IoToken, crate::Result<()>)>,
    /// The rings a reaped batch completed into (each checked for a notification once).
    notify: Vec<VringRwLock>,
    /// The queues of a reaped batch's requests, one entry per request (their in-flight
    /// counts drop after the notifications).
    done: Vec<u16>,
    /// Where big requests are sent to run on the queue's offload thread (started on the first
    /// big request; `None` before that, or if it could not be started).
    offload: Option<mpsc::Sender<Job>>,
    offload_thread: Option<std::thread::JoinHandle<()>>,
    offload_failed: bool,
    /// Requests in flight on this worker's queues (on its engine, its offload thread, or
    /// its pool), per queue.
    in_flight: Arc<InFlight>,
}

/// A request handed to a queue's offload thread, with everything it needs to run and
/// complete it.
struct Job {
    mem: Arc<GuestMemoryMmap>,
    vring: VringRwLock,
    queue: u16,
    head: u16,
    descs: Vec<Desc>,
}

/// A worker's requests not yet completed, counted per queue, and a way to wait until a
/// queue has none (a worker may serve several queues; stopping one must not wait for the
/// others, which may keep going).
#[derive(Default)]
struct InFlight {
    /// Requests in flight per queue index.
    n: Mutex<Vec<usize>>,
    idle: Condvar,
}

impl InFlight {
    /// Requests in flight on all of the worker's queues.
    fn count(&self) -> usize {
        self.n.lock().iter().sum()
    }

    fn start(&self, queue: u16) {
        let mut n = self.n.lock();
        let q = usize::from(queue);
        if n.len() <= q {
            n.resize(q + 1, 0);
        }
        n[q] += 1;
    }

    fn finish(&self, queue: u16) {
        let mut n = self.n.lock();
        if let Some(c) = n.get_mut(usize::from(queue)) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.idle.notify_all();
            }
        }
    }

    fn wait_idle(&self, queue: u16) {
        let mut n = self.n.lock();
        while n.get(usize::from(queue)).is_some_and(|&c| c > 0) {
            self.idle.wait(&mut n);
        }
    }
}

/// Finishes one in-flight request of a queue when dropped, so the count stays right
/// whatever happens.
struct Finish<'a>(&'a InFlight, u16);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish(self.1);
    }
}

/// The questions a request needs answered about the device.
fn target(shared: &Shared) -> Target<'_> {
    Target {
        dev: &*shared.dev,
        sectors: shared.capacity.load(Ordering::Acquire),
        block_size: u64::from(shared.info.logical_sector_size.max(512)),
        read_only: shared.info.read_only,
        id: &shared.id,
    }
}

/// A drain's batch of requests completed on the spot (page-cache hits) notifies the driver
/// in at most this many parts, not once per request. Waking the driver's thread costs the
/// worker more than the read itself. With the driver asking to be told of every completion
/// (EVENT_IDX, its used event kept at the last entry it saw), hot 4 KiB reads at one queue
/// and QD32 ran at 1.05-1.19x qemu-storage-daemon with a check per request; with a check
/// every 4th, 8th and 16th entry of a batch of 32 (8, 4 and 2 parts) at 1.35-1.36x,
/// 1.31-1.32x and 1.19-1.26x; worker CPU per request went from 2.5-2.9 µs to 2.0-2.3 with 8
/// parts. Not in one part: the driver then waits for the whole batch and refills while the
/// worker idles (0.78x).
const NOTIFY_PARTS: u32 = 8;

/// Interrupts the driver if its used event asks for it. The worker and the offload thread
/// of a queue may both complete into its ring: `add_used` and `needs_notification` each take
/// the vring lock, and each `needs_notification` covers every entry added since the
/// previous one, so none is missed.
fn notify_if_asked(vring: &VringRwLock) {
    if vring.needs_notification().unwrap_or(true) {
        let _ = vring.signal_used_queue();
    }
}

/// Puts completed requests in one used ring, checking for a notification every `every`
/// entries. [`Notify::flush`] does the last check of a batch, before the worker moves on or
/// waits, so an entry is never left unnotified; until then at most `every - 1` entries wait
/// (behind a slow request only where the queue could not start its slow-path threads and
/// runs it inline).
struct Notify {
    /// Entries added since the last check.
    unsignalled: u32,
    every: u32,
}

impl Notify {
    /// A check after every entry.
    fn each() -> Notify {
        Notify {
            unsignalled: 0,
            every: 1,
        }
    }

    /// Checks in [`NOTIFY_PARTS`] parts of a batch of `batch` requests.
    fn in_parts(batch: usize) -> Notify {
        let batch = u32::try_from(batch).unwrap_or(u32::MAX);
        Notify {
            unsignalled: 0,
            every: (batch / NOTIFY_PARTS).max(1),
        }
    }

    /// Puts a completed request in the used ring; checks for a notification when its part
    /// is full.
    fn complete(&mut self, vring: &VringRwLock, head: u16, used: u32) {
        if vring.add_used(head, used).is_err() {
            // A head index beyond the queue size (or a used ring outside guest memory): that
            // chain cannot be completed; the others still can.
            return;
        }
        self.unsignalled += 1;
        if self.unsignalled >= self.every {
            self.flush(vring);
        }
    }

    /// Checks for a notification if entries went in the used ring since the last check.
    fn flush(&mut self, vring: &VringRwLock) {
        if self.unsignalled > 0 {
            self.unsignalled = 0;
            notify_if_asked(vring);
        }
    }
}

/// Completes a read or write that ran on the engine.
fn finish_io(tok: IoToken, r: crate::Result<()>, in_flight: &InFlight, notify: &mut Notify) {
    let used = tok.io.finish(&tok.mem, r);
    notify.complete(&tok.vring, tok.head, used);
    in_flight.finish(tok.queue);
}

/// The offload thread of one queue: runs the jobs it is sent until every sender is gone.
fn offload_loop(shared: Arc<Shared>, in_flight: Arc<InFlight>, jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        let t = target(&shared);
        let _done = Finish(&in_flight, job.queue);
        let used = process(&job.mem, &job.descs, &t);
        Notify::each().complete(&job.vring, job.head, used);
    }
}

/// Bytes of descriptors (data included) from which a request may go to the offload thread:
/// far more work than the hand-over costs.
const OFFLOAD_MIN_BYTES: u64 = 256 << 10;

/// The backend of one frontend connection.
#[derive(Clone)]
pub(crate) struct BlkBackend {
    shared: Arc<Shared>,
    mem: Arc<RwLock<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: Arc<AtomicBool>,
    scratch: Arc<Vec<Mutex<Scratch>>>,
    /// Whether queues may use offload threads: only with more cores than queues, since with
    /// a core per queue worker already, another thread per queue only adds hand-overs.
    offload_on: bool,
}

impl BlkBackend {
    pub(crate) fn new(shared: Arc<Shared>, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        let depth = u32::try_from(shared.queue_size).unwrap_or(1024).min(256);
        let scratch = (0..shared.workers)
            .map(|_| {
                let queue = shared.aio.and_then(|aio| {
                    Engine::new_or_fallback(aio, depth).ok().map(|e| {
                        let mut q = DeviceQueue::new(shared.dev.clone(), e);
                        // Page-cache hits inline only where a worker has one guest queue
                        // (see `set_inline_cached_reads` for the figures).
                        q.set_inline_cached_reads(shared.num_queues <= shared.workers);
                        q
                    })
                });
                Mutex::new(Scratch {
                    queue,
                    ..Scratch::default()
                })
            })
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        BlkBackend {
            offload_on: cores > shared.workers,
            shared,
            mem: Arc::new(RwLock::new(mem)),
            event_idx: Arc::new(AtomicBool::new(false)),
            scratch: Arc::new(scratch),
        }
    }

    /// The eventfd of worker `i`'s engine, if it has one (to register with that worker's
    /// epoll handler under [`engine_event`]).
    pub(crate) fn engine_fd(&self, i: usize) -> Option<std::os::unix::io::RawFd> {
        self.scratch
            .get(i)
            .and_then(|s| s.lock().queue.as_ref().map(|q| q.event_fd()))
    }

    /// Ends the offload threads once they have completed what they were sent, and waits for
    /// the engines' requests. Called after the queue workers are gone, so that nothing of
    /// this connection runs afterwards.
    pub(crate) fn shutdown(&self) {
        for s in self.scratch.iter() {
            let mut s = s.lock();
            let s = &mut *s;
            if let Some(q) = s.queue.as_mut() {
                let _ = q.drain(&mut s.reaped);
                for (tok, r) in s.reaped.drain(..) {
                    finish_io(tok, r, &s.in_flight, &mut Notify::each());
                }
            }
            // Its only sender gone, the thread's loop ends after the jobs already sent.
            s.offload = None;
            if let Some(h) = s.offload_thread.take() {
                let _ = h.join();
            }
        }
    }

    /// The sender to this queue's offload thread, starting it if need be; `None` if it cannot
    /// be started (then requests simply run on the worker).
    fn offload(&self, scratch: &mut Scratch) -> Option<mpsc::Sender<Job>> {
        if !self.offload_on {
            return None;
        }
        if scratch.offload.is_none() && !scratch.offload_failed {
            let (tx, rx) = mpsc::channel();
            let (shared, in_flight) = (self.shared.clone(), scratch.in_flight.clone());
            match std::thread::Builder::new()
                .name("vhost-blk-offload".to_string())
                .spawn(move || offload_loop(shared, in_flight, rx))
            {
                Ok(h) => {
                    scratch.offload = Some(tx);
                    scratch.offload_thread = Some(h);
                }
                Err(_) => scratch.offload_failed = true,
            }
        }
        scratch.offload.clone()
    }

    /// Drains `vring`: pops batches of chains, runs them, completes them. Returns how many
    /// chains it took.
    ///
    /// Guest memory changes under a running queue: with `CONFIGURE_MEM_SLOTS` the frontend
    /// adds and removes regions (ADD_MEM_REG, REM_MEM_REG) whenever it likes, and uses an
    /// added region as soon as the backend has acknowledged it. So each batch takes a fresh
    /// snapshot of the guest memory, and only after reading the available index: any chain
    /// published after an acknowledged ADD_MEM_REG is then resolved against memory that has
    /// the new region (the handler swapped the memory before acknowledging; the driver
    /// published after the acknowledgement; our acquire load of the index sees the
    /// publication), and the batch takes no chain published after that load. A snapshot
    /// keeps the regions it holds mapped until the batch is done, so a region removed
    /// meanwhile is never unmapped under a request; chains popped after the removal no
    /// longer find it and complete with IOERR (see [`request`](super::request)).
    fn drain(&self, vring: &VringRwLock, queue: u16, scratch: &mut Scratch) -> usize {
        let mut taken = 0;
        let t = target(&self.shared);
        loop {
            let atomic = self.mem.read().clone();
            let mut chains = Vec::new();
            let mem = {
                let mut state = vring.get_mut();
                let q = state.get_queue_mut();
                // A ring outside guest memory (its region removed) yields nothing until a
                // kick after the region is back.
                let Ok(avail) = q.avail_idx(&*atomic.memory(), Ordering::Acquire) else {
                    return taken;
                };
                let mem = atomic.memory();
                let ready = usize::from(avail.0.wrapping_sub(q.next_avail())).min(BATCH);
                while chains.len() < ready {
                    match q.pop_descriptor_chain(mem.clone()) {
                        Some(c) => chains.push(c),
                        None => break,
                    }
                }
                mem
            };
            if chains.is_empty() {
                return taken;
            }
            taken += chains.len();
            let mut notify = Notify::in_parts(chains.len());
            for chain in chains {
                let head = chain.head_index();
                scratch.descs.clear();
                // The iterator stops at a descriptor outside memory, a bad indirect table or
                // after queue-size hops; what it yields is what the request is made of.
                scratch.descs.extend(chain.map(|d| Desc {
                    addr: d.addr(),
                    len: d.len(),
                    writable: d.is_write_only(),
                }));
                let bytes = scratch
                    .descs
                    .iter()
                    .fold(0u64, |a, d| a.saturating_add(u64::from(d.len)));
                // A big request goes to the offload thread when it is idle, so a queue
                // streaming large transfers keeps two cores busy (as qemu's thread pool
                // does); the worker goes on with the next request meanwhile.
                if bytes >= OFFLOAD_MIN_BYTES && scratch.in_flight.count() == 0 {
                    if let Some(tx) = self.offload(scratch) {
                        let job = Job {
                            mem: mem.clone().into_inner(),
                            vring: vring.clone(),
                            queue,
                            head,
                            descs: scratch.descs.clone(),
                        };
                        scratch.in_flight.start(queue);
                        match tx.send(job) {
                            Ok(()) => continue,
                            Err(mpsc::SendError(_)) => {
                                // The thread is gone: run it here, and stop offloading.
                                scratch.in_flight.finish(queue);
                                scratch.offload = None;
                                scratch.offload_failed = true;
                            }
                        }
                    }
                }
                if let Some(q) = scratch.queue.as_mut() {
                    match prepare(&mem, &scratch.descs, &t) {
                        Prepared::Done(used) => notify.complete(vring, head, used),
                        Prepared::Io(io) => {
                            let (write, offset) = (io.write, io.offset);
                            let bufs = io.bufs().to_vec();
                            let tok = IoToken {
                                vring: vring.clone(),
                                queue,
                                head,
                                io,
                                mem: mem.clone().into_inner(),
                            };
                            scratch.in_flight.start(queue);
                            let started = match tok.io.control {
                                Some(c) => q.start_control(c, tok),
                                // SAFETY: the buffers point into guest memory that the token's
                                // snapshot keeps mapped and its guards keep valid until the
                                // request completes (the queue holds the token until then).
                                None => unsafe { q.start(write, offset, &bufs, tok) },
                            };
                            match started {
                                Started::Queued => {}
                                Started::Done(tok, r) => {
                                    finish_io(tok, r, &scratch.in_flight, &mut notify)
                                }
                            }
                        }
                    }
                    continue;
                }
                // No engine: every request runs here, synchronously, and is notified alone.
                notify.flush(vring);
                let used = process(&mem, &scratch.descs, &t);
                Notify::each().complete(vring, head, used);
            }
            notify.flush(vring);
            // One system call for what the batch left staged (requests bound for the disk
            // went at once: `DeviceQueue::set_eager_submit`), then complete at once what is
            // already done (page-cache hits complete inline), saving an epoll round trip.
            if let Some(q) = scratch.queue.as_mut() {
                if let Err(e) = q.commit() {
                    // The ring itself failed: what is queued stays queued for the next try.
                    let _ = e;
                }
                self.reap(scratch, true);
            }
        }
    }

    /// Completes what the queue's engine has finished. `ready_only`: right after a commit,
    /// where usually nothing has finished yet: skip the event fd's read then (what finishes
    /// later signals it).
    fn reap(&self, scratch: &mut Scratch, ready_only: bool) {
        let Some(q) = scratch.queue.as_mut() else {
            return;
        };
        let _ = if ready_only {
            q.reap_ready(&mut scratch.reaped)
        } else {
            q.reap(&mut scratch.reaped)
        };
        // The whole batch goes into the used rings first, then one notification check per
        // ring (with EVENT_IDX it covers every entry added since the last check), then the
        // in-flight count drops (stop_vring waits for it, and must find the entries in the
        // ring).
        let mut seen = 0u64;
        for (tok, r) in scratch.reaped.drain(..) {
            let used = tok.io.finish(&tok.mem, r);
            // A head beyond the queue (or a used ring outside memory) cannot be completed;
            // the others still can.
            let _ = tok.vring.add_used(tok.head, used);
            let bit = 1u64 << (tok.queue % 64);
            if seen & bit == 0 {
                seen |= bit;
                scratch.notify.push(tok.vring);
            }
            scratch.done.push(tok.queue);
        }
        for v in scratch.notify.drain(..) {
            notify_if_asked(&v);
        }
        for q in scratch.done.drain(..) {
            scratch.in_flight.finish(q);
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.shared.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.shared.queue_size
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // libblkio (and through it QEMU's `blkio` driver) refuses a backend without REPLY_ACK,
        // CONFIG and CONFIGURE_MEM_SLOTS: it hands over every buffer with ADD_MEM_REG and takes
        // it back with REM_MEM_REG, while I/O runs. vhost-user-backend answers
        // GET_MAX_MEM_SLOTS, ADD_MEM_REG and REM_MEM_REG by swapping the guest memory in the
        // `GuestMemoryAtomic` this backend shares (see `update_memory`); requests take a fresh
        // snapshot of it (see `drain`).
        // BACKEND_REQ: the channel a disk resize is announced on (Shared::refresh).
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let size = (size as usize).min(MAX_CONFIG_READ);
        let mut out = vec![0u8; size];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size).min(CONFIG_LEN);
        let mut config = self.shared.config;
        let capacity = self.shared.capacity.load(Ordering::Acquire);
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.shared.frontend.lock() = Some(backend);
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no VIRTIO_BLK_F_CONFIG_WCE).
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write() = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let w = self.shared.workers;
        (0..w)
            .map(|t| {
                (t..self.shared.num_queues)
                    .step_by(w)
                    .fold(0u64, |m, q| m | 1u64 << q)
            })
            .collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the queue is already marked not ready, so its worker pops nothing
        // more; wait until it has completed what it popped, so the base reported to the
        // frontend counts no request that would never complete.
        // Requests handed to the offload thread count too.
        // The scratch lock is not held while waiting: the worker takes it to reap.
        let worker = queue_index as usize % self.shared.workers.max(1);
        if let (Some(s), Ok(q)) = (self.scratch.get(worker), u16::try_from(queue_index)) {
            let in_flight = s.lock().in_flight.clone();
            in_flight.wait_idle(q);
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned here would end the worker thread: guest mistakes never do.
        if evset != EventSet::IN {
            return Ok(());
        }
        if device_event == engine_event(self.shared.num_queues) {
            if let Some(s) = self.scratch.get(thread_id) {
                self.reap(&mut s.lock(), false);
            }
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let Some(scratch) = self.scratch.get(thread_id) else {
            return Ok(());
        };
        let mut scratch = scratch.lock();
        if !self.event_idx.load(Ordering::Acquire) {
            self.drain(vring, device_event, &mut scratch);
            return Ok(());
        }
        loop {
            let _ = vring.disable_notification();
            let taken = self.drain(vring, device_event, &mut scratch);
            // Re-enabling reports "more available" whenever the available index moved, also
            // when nothing can be taken: a stopped queue (GET_VRING_BASE) or an index the
            // guest pushed beyond the ring. Only go round again after progress, so neither
            // spins; a later kick retries.
            match vring.enable_notification() {
                Ok(true) if taken > 0 => continue,
                _ => return Ok(()),
            }
        }
    }
}
