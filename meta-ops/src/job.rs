//! Jobs: what to copy ([`Job`], [`JobOptions`]), where they run ([`JobRunner`]), how a caller
//! follows and steers one ([`JobHandle`], [`Progress`]) and what it returns ([`JobReport`]).
//!
//! A job's driver is a tokio task. It claims dirty blocks a chunk at a time (clearing their
//! bits), takes tokens from the rate limiter, and hands each chunk to `spawn_blocking`, where
//! the chunk first lets guest requests that are already waiting finish (priority), then takes
//! its blocks exclusively in the range lock and copies them. Up to `parallel` chunks run at
//! once. When a pass over the range ends with little left dirty, the driver pivots; when more
//! is left, it first switches guest writes to write-through, so that the next pass only
//! shrinks the dirty set and the pivot's pause stays short.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, BlockStatus, RateLimiter};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::copy::{Copier, Counters};
use crate::error::{JobError, JobResult};
use crate::live::{LiveDisk, Tracker};

/// Which job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A disk or a byte range of it to another block device.
    Copy,
    /// The whole disk (a chain flattened) into a new image of another format.
    Convert,
}

impl JobKind {
    /// `copy` or `convert`.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Copy => "copy",
            JobKind::Convert => "convert",
        }
    }
}

/// What happens at the pivot, after the last dirty blocks are copied and the destination is
/// flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pivot {
    /// Guest I/O goes to the destination from then on (online convert, a move). The source is
    /// left as it was at the pivot.
    Switch,
    /// Guest I/O stays on the source; the destination is the disk as it was at the pivot (a
    /// point-in-time copy).
    Detach,
}

/// Tuning of a job. [`Default`] gives the values documented on each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    /// Bytes per second the job may move (0: unlimited; default 0). Changeable while it runs
    /// ([`JobHandle::set_rate`]).
    pub rate: u64,
    /// Bytes per dirty bit and copy unit (default 64 KiB): a power of two, at least 4 KiB.
    pub granularity: u64,
    /// Most bytes one chunk copies (default 1 MiB); rounded down to whole granules.
    pub chunk: u64,
    /// Chunks in flight at once (default 2).
    pub parallel: usize,
    /// The pivot happens once a pass leaves at most this many dirty bytes (default 4 MiB);
    /// they are copied with guest writes paused.
    pub pivot_threshold: u64,
    /// Background passes (guest writes mark blocks dirty) before guest writes to blocks
    /// already in sync go through to the destination as well (default 1).
    pub background_passes: u32,
    /// Use `copy_file_range(2)` where both disks map to plain files (default true).
    pub copy_file_range: bool,
    /// The longest a chunk waits for guest requests before it starts anyway (default 10 ms).
    pub yield_cap: Duration,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            rate: 0,
            granularity: 64 << 10,
            chunk: 1 << 20,
            parallel: 2,
            pivot_threshold: 4 << 20,
            background_passes: 1,
            copy_file_range: true,
            yield_cap: Duration::from_millis(10),
        }
    }
}

/// A job to start on a [`LiveDisk`] with [`JobRunner::start`].
#[derive(Clone)]
pub struct Job {
    kind: JobKind,
    dest: Arc<dyn BlockDevice>,
    range: Option<(u64, u64)>,
    dest_offset: Option<u64>,
    dest_zeroed: bool,
    pivot: Pivot,
    options: JobOptions,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("kind", &self.kind)
            .field("dest", &self.dest.info())
            .field("range", &self.range)
            .field("dest_offset", &self.dest_offset)
            .field("dest_zeroed", &self.dest_zeroed)
            .field("pivot", &self.pivot)
            .field("options", &self.options)
            .finish()
    }
}

impl Job {
    /// Copy the whole disk to `dest` (at least as large), which may hold anything: ranges
    /// that read as zeros in the source are written as zeros. Ends with [`Pivot::Detach`].
    pub fn copy(dest: Arc<dyn BlockDevice>) -> Job {
        Job {
            kind: JobKind::Copy,
            dest,
            range: None,
            dest_offset: None,
            dest_zeroed: false,
            pivot: Pivot::Detach,
            options: JobOptions::default(),
        }
    }

    /// Convert the whole disk (through its chain) into `dest`, a new image of the same size
    /// that the caller created and that nothing else uses, so it reads as zeros and holes stay
    /// holes. Ends with [`Pivot::Switch`]: the guest continues on the new image.
    pub fn convert(dest: Arc<dyn BlockDevice>) -> Job {
        Job {
            kind: JobKind::Convert,
            dest,
            range: None,
            dest_offset: None,
            dest_zeroed: true,
            pivot: Pivot::Switch,
            options: JobOptions::default(),
        }
    }

    /// Only `[offset, offset+len)` of the source (copy jobs; sector-aligned).
    pub fn range(mut self, offset: u64, len: u64) -> Job {
        self.range = Some((offset, len));
        self
    }

    /// Where the range starts in the destination (default: the same offset).
    pub fn dest_offset(mut self, offset: u64) -> Job {
        self.dest_offset = Some(offset);
        self
    }

    /// Whether the destination is known to read as zeros (skip holes instead of zeroing).
    pub fn dest_zeroed(mut self, yes: bool) -> Job {
        self.dest_zeroed = yes;
        self
    }

    /// What the pivot does.
    pub fn pivot(mut self, pivot: Pivot) -> Job {
        self.pivot = pivot;
        self
    }

    /// The bytes-per-second limit (0: unlimited).
    pub fn rate(mut self, bytes_per_sec: u64) -> Job {
        self.options.rate = bytes_per_sec;
        self
    }

    /// All tuning at once.
    pub fn options(mut self, options: JobOptions) -> Job {
        self.options = options;
        self
    }

    /// Checks the job against the source; returns `(start, end, dest_offset)`.
    fn validate(&self, src: &dyn BlockDevice) -> Result<(u64, u64, u64), JobError> {
        let bad = |s: String| Err(JobError::Invalid(s));
        let (si, di) = (src.info(), self.dest.info());
        if di.read_only {
            return bad("the destination is read-only".into());
        }
        let o = &self.options;
        if o.granularity < 4096 || !o.granularity.is_power_of_two() {
            return bad(format!(
                "granularity {} is not a power of two of at least 4096",
                o.granularity
            ));
        }
        let sector = u64::from(si.logical_sector_size.max(di.logical_sector_size).max(1));
        if o.granularity % sector != 0 {
            return bad(format!(
                "granularity {} is not a multiple of the {sector}-byte sectors",
                o.granularity
            ));
        }
        let (start, len) = self.range.unwrap_or((0, si.virtual_size));
        if self.kind == JobKind::Convert && self.range.is_some() {
            return bad("a convert covers the whole disk".into());
        }
        let end = start
            .checked_add(len)
            .filter(|&e| e <= si.virtual_size)
            .ok_or_else(|| {
                JobError::Invalid(format!("range {start}+{len} is outside the source"))
            })?;
        let doff = self.dest_offset.unwrap_or(start);
        if start % sector != 0 || len % sector != 0 || doff % sector != 0 {
            return bad(format!(
                "range {start}+{len} at {doff} is not aligned to {sector}-byte sectors"
            ));
        }
        if doff.checked_add(len).is_none_or(|e| e > di.virtual_size) {
            return bad(format!(
                "the destination ({} bytes) cannot hold {len} bytes at {doff}",
                di.virtual_size
            ));
        }
        let whole = start == 0 && doff == 0 && len == si.virtual_size;
        if (self.pivot == Pivot::Switch || self.kind == JobKind::Convert)
            && (!whole || di.virtual_size != si.virtual_size)
        {
            return bad(format!(
                "the destination must have the source's size ({} bytes, not {}) and take all of it",
                si.virtual_size, di.virtual_size
            ));
        }
        Ok((start, end, doff))
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Finding the allocated ranges of the source.
    Scanning,
    /// Copying; guest writes mark blocks dirty.
    Copying,
    /// Copying what is still dirty; guest writes to blocks in sync also go to the destination.
    Converging,
    /// Paused by [`JobHandle::pause`].
    Paused,
    /// Guest writes paused: the last blocks, the flush and the switch.
    Pivoting,
    /// Done; the result is ready.
    Completed,
    /// Cancelled; the source is untouched.
    Cancelled,
    /// Failed; see the result.
    Failed,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Scanning,
            1 => Phase::Copying,
            2 => Phase::Converging,
            3 => Phase::Paused,
            4 => Phase::Pivoting,
            5 => Phase::Completed,
            6 => Phase::Cancelled,
            _ => Phase::Failed,
        }
    }

    /// A lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Scanning => "scanning",
            Phase::Copying => "copying",
            Phase::Converging => "converging",
            Phase::Paused => "paused",
            Phase::Pivoting => "pivoting",
            Phase::Completed => "completed",
            Phase::Cancelled => "cancelled",
            Phase::Failed => "failed",
        }
    }
}

/// A snapshot of a job's progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Where the job is.
    pub phase: Phase,
    /// Bytes handled so far (copied, zeroed or skipped; blocks copied again count again).
    pub done: u64,
    /// `done` plus the bytes still dirty or in flight: grows when guest writes dirty blocks.
    pub total: u64,
    /// Average bytes per second while not paused.
    pub rate: f64,
    /// At that rate, the time left (None before any progress or when finished).
    pub eta: Option<Duration>,
    /// Time since the start, paused time included.
    pub elapsed: Duration,
}

/// What a completed job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobReport {
    /// Which job.
    pub kind: JobKind,
    /// Bytes handled (blocks copied again count again).
    pub bytes: u64,
    /// Of those, moved file to file by `copy_file_range`.
    pub copy_file_range_bytes: u64,
    /// Moved through a buffer.
    pub buffered_bytes: u64,
    /// Written as zeros.
    pub zeroed_bytes: u64,
    /// Skipped: holes the destination already reads as zeros.
    pub skipped_bytes: u64,
    /// Dirty bits set by guest changes while the job ran.
    pub blocks_dirtied: u64,
    /// Guest bytes written through to the destination while converging.
    pub written_through: u64,
    /// Passes over the range before the pivot.
    pub passes: u32,
    /// Chunks that first let waiting guest requests finish.
    pub yields: u64,
    /// From start to end.
    pub duration: Duration,
    /// How long guest writes were paused at the pivot (the longest pause the job causes).
    pub pivot_pause: Duration,
    /// The longest time one guest request waited for the job (range locks or the pivot).
    pub max_guest_wait: Duration,
    /// The disk's generation after the pivot ([`LiveDisk::generation`]).
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Control {
    paused: bool,
    cancelled: bool,
}

/// State shared by a job's driver and its handle.
#[derive(Debug)]
struct Shared {
    kind: JobKind,
    ctl: watch::Sender<Control>,
    cancelled: AtomicBool,
    limiter: RateLimiter,
    chunk: u64,
    gran: u64,
    phase: AtomicU8,
    start: Instant,
    paused_ns: AtomicU64,
    done: AtomicU64,
    in_flight: AtomicU64,
    tracker: Arc<Tracker>,
    result: Mutex<Option<JobResult>>,
    finished: AtomicBool,
    done_cv: Condvar,
    done_tx: watch::Sender<bool>,
}

impl Shared {
    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Bytes per chunk at `rate`: about an eighth of a second's worth, so the throttle is
    /// smooth, within `[granularity, chunk]`.
    fn chunk_for(&self, rate: u64) -> u64 {
        let want = if rate == 0 { self.chunk } else { rate / 8 };
        let c = want.clamp(self.gran, self.chunk.max(self.gran));
        c - c % self.gran
    }

    fn finish(&self, r: JobResult) {
        let mut slot = self.result.lock();
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        self.set_phase(match &r {
            Ok(_) => Phase::Completed,
            Err(JobError::Cancelled) => Phase::Cancelled,
            Err(_) => Phase::Failed,
        });
        *slot = Some(r);
        self.finished.store(true, Ordering::Release);
        drop(slot);
        self.done_cv.notify_all();
        self.done_tx.send_replace(true);
    }
}

/// Where jobs run: a tokio runtime, the caller's or one of its own.
#[derive(Debug)]
pub struct JobRunner {
    handle: tokio::runtime::Handle,
    owned: Option<tokio::runtime::Runtime>,
}

impl JobRunner {
    /// A runner with a runtime of its own (two worker threads; blocking copies run on its
    /// blocking pool). Drop it outside async code: dropping waits for running chunks.
    pub fn new() -> Result<JobRunner, JobError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meta-ops")
            .enable_time()
            .build()
            .map_err(JobError::Runtime)?;
        Ok(JobRunner {
            handle: rt.handle().clone(),
            owned: Some(rt),
        })
    }

    /// A runner on an existing runtime (it must have the time driver enabled).
    pub fn from_handle(handle: tokio::runtime::Handle) -> JobRunner {
        JobRunner {
            handle,
            owned: None,
        }
    }

    /// A runner on the runtime the caller runs in, if any.
    pub fn current() -> Option<JobRunner> {
        tokio::runtime::Handle::try_current()
            .ok()
            .map(JobRunner::from_handle)
    }

    /// Whether the runner owns its runtime.
    pub fn owns_runtime(&self) -> bool {
        self.owned.is_some()
    }

    /// Starts `job` on `live`: checks it, attaches it (guest changes from now on are
    /// tracked) and spawns its driver. Fails with [`JobError::Busy`] if a job already runs
    /// there.
    pub fn start(&self, live: &Arc<LiveDisk>, job: Job) -> Result<JobHandle, JobError> {
        let (start, end, doff) = job.validate(&*live.current())?;
        let o = job.options.clone();
        let tracker = Arc::new(Tracker::new(
            job.dest.clone(),
            start,
            end,
            doff,
            o.granularity,
        ));
        let src = live.attach(tracker.clone())?;
        let (ctl, ctl_rx) = watch::channel(Control::default());
        let (done_tx, done_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            kind: job.kind,
            ctl,
            cancelled: AtomicBool::new(false),
            limiter: RateLimiter::new(0, 1),
            chunk: o.chunk,
            gran: o.granularity,
            phase: AtomicU8::new(Phase::Scanning as u8),
            start: Instant::now(),
            paused_ns: AtomicU64::new(0),
            done: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            tracker: tracker.clone(),
            result: Mutex::new(None),
            finished: AtomicBool::new(false),
            done_cv: Condvar::new(),
            done_tx,
        });
        shared
            .limiter
            .set_rate(o.rate, shared.chunk_for(o.rate).max(1));
        let copier = Arc::new(Copier {
            src,
            tracker,
            live: live.clone(),
            dest_zeroed: job.dest_zeroed,
            use_cfr: AtomicBool::new(o.copy_file_range),
            counters: Counters::default(),
            yield_cap: o.yield_cap,
        });
        live.reset_max_wait();
        let driver = Driver {
            shared: shared.clone(),
            copier,
            live: live.clone(),
            pivot: job.pivot,
            opts: o,
            ctl: ctl_rx,
        };
        let cleanup = Cleanup {
            shared: shared.clone(),
            live: live.clone(),
        };
        self.handle.spawn(async move {
            let r = driver.run().await;
            cleanup.shared.finish(r);
            drop(cleanup);
        });
        Ok(JobHandle { shared, done_rx })
    }
}

/// Detaches the job and reports [`JobError::Aborted`] if its driver is dropped before it
/// finished (the runtime shut down); after a normal end it only makes sure nothing stays
/// attached.
struct Cleanup {
    shared: Arc<Shared>,
    live: Arc<LiveDisk>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.shared.finished.load(Ordering::Acquire) {
            self.live.detach(&self.shared.tracker);
            self.shared.finish(Err(JobError::Aborted));
        }
    }
}

/// Follows and steers a running job. Dropping it does not stop the job.
#[derive(Debug)]
pub struct JobHandle {
    shared: Arc<Shared>,
    done_rx: watch::Receiver<bool>,
}

impl JobHandle {
    /// Which job.
    pub fn kind(&self) -> JobKind {
        self.shared.kind
    }

    /// Where the job is and how far it got.
    pub fn progress(&self) -> Progress {
        let s = &self.shared;
        let phase = s.phase();
        let done = s.done.load(Ordering::Acquire);
        let left = s.tracker.dirty.count() * s.gran + s.in_flight.load(Ordering::Acquire);
        let elapsed = s.start.elapsed();
        let active = elapsed
            .saturating_sub(Duration::from_nanos(s.paused_ns.load(Ordering::Acquire)))
            .as_secs_f64();
        let rate = if active > 0.0 {
            done as f64 / active
        } else {
            0.0
        };
        let finished = matches!(phase, Phase::Completed | Phase::Cancelled | Phase::Failed);
        let eta = (!finished && rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate));
        Progress {
            phase,
            done,
            total: done + if finished { 0 } else { left },
            rate,
            eta,
            elapsed,
        }
    }

    /// Stops starting chunks (those running finish); guest I/O goes on as before.
    pub fn pause(&self) {
        self.shared.ctl.send_modify(|c| c.paused = true);
    }

    /// Continues after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.shared.ctl.send_modify(|c| c.paused = false);
    }

    /// Stops the job: running chunks finish, the job detaches and ends with
    /// [`JobError::Cancelled`]. The source is never written by a job, so it stays intact.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
        self.shared.ctl.send_modify(|c| c.cancelled = true);
    }

    /// Changes the rate limit (bytes per second, 0: unlimited) while the job runs.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let burst = self.shared.chunk_for(bytes_per_sec).max(1);
        self.shared.limiter.set_rate(bytes_per_sec, burst);
        // Wake the driver should it be waiting for tokens at the old rate.
        self.shared.ctl.send_modify(|_| {});
    }

    /// The rate limit now (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.shared.limiter.rate()
    }

    /// Whether the job has ended (its result is ready).
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the job to end; returns whether it has.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let mut slot = self.shared.result.lock();
        if !self.is_finished() {
            let _ = self.shared.done_cv.wait_for(&mut slot, timeout);
        }
        self.is_finished()
    }

    fn take(&self) -> JobResult {
        self.shared
            .result
            .lock()
            .take()
            .unwrap_or(Err(JobError::Aborted))
    }

    /// Waits for the job to end and returns its result.
    pub async fn wait(mut self) -> JobResult {
        if self.done_rx.wait_for(|d| *d).await.is_err() {
            return Err(JobError::Aborted);
        }
        self.take()
    }

    /// Waits for the job to end from synchronous code (never from inside async code: it
    /// blocks the thread).
    pub fn wait_blocking(self) -> JobResult {
        let mut slot = self.shared.result.lock();
        while !self.shared.finished.load(Ordering::Acquire) {
            self.shared.done_cv.wait(&mut slot);
        }
        drop(slot);
        self.take()
    }
}

/// The driver task of one job.
struct Driver {
    shared: Arc<Shared>,
    copier: Arc<Copier>,
    live: Arc<LiveDisk>,
    pivot: Pivot,
    opts: JobOptions,
    ctl: watch::Receiver<Control>,
}

/// Write-through passes before the pivot copies whatever is still dirty.
const CONVERGE_PASSES: u32 = 2;

type ChunkResult = Result<(u64, u64), JobError>;

impl Driver {
    async fn run(mut self) -> JobResult {
        let r = self.main().await;
        if r.is_err() {
            self.live.detach(&self.shared.tracker);
        }
        r
    }

    async fn main(&mut self) -> JobResult {
        let t0 = Instant::now();
        let tracker = self.shared.tracker.clone();
        let (copier, shared) = (self.copier.clone(), self.shared.clone());
        let dest_zeroed = self.copier.dest_zeroed;
        tokio::task::spawn_blocking(move || scan(&copier, &shared, dest_zeroed))
            .await
            .map_err(|_| JobError::Aborted)??;
        self.shared.set_phase(Phase::Copying);
        let mut set: JoinSet<ChunkResult> = JoinSet::new();
        let mut cursor = 0u64;
        let mut passes = 1u32;
        loop {
            while let Some(r) = set.try_join_next() {
                self.reaped(r)?;
            }
            let c = *self.ctl.borrow_and_update();
            if c.cancelled {
                self.drain(&mut set).await?;
                return Err(JobError::Cancelled);
            }
            if c.paused {
                self.drain(&mut set).await?;
                self.paused().await;
                continue;
            }
            if set.len() >= self.opts.parallel.max(1) {
                if let Some(r) = set.join_next().await {
                    self.reaped(r)?;
                }
                continue;
            }
            let max_bits =
                (self.shared.chunk_for(self.shared.limiter.rate()) / tracker.gran).max(1);
            let Some(first) = tracker.dirty.next_set(cursor) else {
                if let Some(r) = set.join_next().await {
                    self.reaped(r)?;
                    continue;
                }
                // A pass is over. Pivot when little is left, or when write-through has had
                // its passes (what guests keep dirtying then, such as writes of sectors
                // smaller than the destination's, is copied during the pause).
                if tracker.dirty.count() * tracker.gran <= self.opts.pivot_threshold
                    || passes >= self.opts.background_passes.saturating_add(CONVERGE_PASSES)
                {
                    break;
                }
                if passes >= self.opts.background_passes {
                    tracker.through.store(true, Ordering::Release);
                    self.shared.set_phase(Phase::Converging);
                }
                passes += 1;
                cursor = 0;
                continue;
            };
            let last = (first + max_bits).min(tracker.dirty.len());
            let runs = tracker.dirty.take(first, last);
            cursor = last;
            let bytes: u64 = runs
                .iter()
                .map(|&(a, b)| {
                    let (x, y) = tracker.span(a, b);
                    y - x
                })
                .sum();
            if !self.tokens(bytes).await {
                // Paused or cancelled while waiting: give the blocks back.
                for &(a, b) in &runs {
                    tracker.dirty.set(a, b);
                }
                cursor = first;
                continue;
            }
            self.shared.in_flight.fetch_add(bytes, Ordering::AcqRel);
            let copier = self.copier.clone();
            set.spawn_blocking(move || copier.chunk(&runs).map(|n| (n, bytes)));
        }
        self.finish(t0, passes).await
    }

    /// Takes `bytes` tokens from the limiter; false if the job was paused or cancelled
    /// meanwhile.
    async fn tokens(&mut self, bytes: u64) -> bool {
        loop {
            let c = *self.ctl.borrow_and_update();
            if c.paused || c.cancelled {
                return false;
            }
            match self.shared.limiter.try_acquire(bytes) {
                Ok(()) => return true,
                Err(wait) => {
                    let wait = wait.min(Duration::from_millis(100));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = self.ctl.changed() => {}
                    }
                }
            }
        }
    }

    fn reaped(&self, r: Result<ChunkResult, tokio::task::JoinError>) -> Result<(), JobError> {
        let (n, claimed) = r.map_err(|_| JobError::Aborted)??;
        self.shared.in_flight.fetch_sub(claimed, Ordering::AcqRel);
        self.shared.done.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    async fn drain(&self, set: &mut JoinSet<ChunkResult>) -> Result<(), JobError> {
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            if let Err(e) = self.reaped(r) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn paused(&mut self) {
        let before = self.shared.phase();
        self.shared.set_phase(Phase::Paused);
        let t = Instant::now();
        loop {
            let c = *self.ctl.borrow_and_update();
            if !c.paused || c.cancelled {
                break;
            }
            if self.ctl.changed().await.is_err() {
                break;
            }
        }
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.paused_ns.fetch_add(ns, Ordering::AcqRel);
        self.shared.set_phase(before);
    }

    /// The pivot, then the report.
    async fn finish(&mut self, t0: Instant, passes: u32) -> JobResult {
        if self.shared.cancelled.load(Ordering::Acquire) {
            return Err(JobError::Cancelled);
        }
        self.shared.set_phase(Phase::Pivoting);
        let dest = self.copier.tracker.dest.clone();
        let switch = self.pivot == Pivot::Switch;
        let (copier, shared, live) = (self.copier.clone(), self.shared.clone(), self.live.clone());
        let pause = tokio::task::spawn_blocking(move || {
            // Most of the flush outside the pause.
            dest.flush().map_err(|source| JobError::Destination {
                op: "flush",
                offset: 0,
                source,
            })?;
            let (pause, r) = live.pivot(switch, || -> Result<(), JobError> {
                let t = &copier.tracker;
                let runs = t.dirty.take(0, t.dirty.len());
                let n = copier.runs(&runs)?;
                shared.done.fetch_add(n, Ordering::AcqRel);
                if switch {
                    // The guest continues on the destination: what it had must be durable.
                    t.dest.flush().map_err(|source| JobError::Destination {
                        op: "flush",
                        offset: 0,
                        source,
                    })?;
                }
                Ok(())
            });
            r?;
            if !switch {
                copier
                    .tracker
                    .dest
                    .flush()
                    .map_err(|source| JobError::Destination {
                        op: "flush",
                        offset: 0,
                        source,
                    })?;
            }
            Ok::<_, JobError>(pause)
        })
        .await
        .map_err(|_| JobError::Aborted)??;
        let c = &self.copier.counters;
        let t = &self.copier.tracker;
        Ok(JobReport {
            kind: self.shared.kind,
            bytes: self.shared.done.load(Ordering::Acquire),
            copy_file_range_bytes: c.cfr.load(Ordering::Relaxed),
            buffered_bytes: c.buffered.load(Ordering::Relaxed),
            zeroed_bytes: c.zeroed.load(Ordering::Relaxed),
            skipped_bytes: c.skipped.load(Ordering::Relaxed),
            blocks_dirtied: t.marked.load(Ordering::Relaxed),
            written_through: t.through_bytes.load(Ordering::Relaxed),
            passes,
            yields: c.yields.load(Ordering::Relaxed),
            duration: t0.elapsed(),
            pivot_pause: pause,
            max_guest_wait: self.live.guest_stats().max_wait.max(pause),
            generation: self.live.generation(),
        })
    }
}

/// Marks the blocks the job must handle dirty: all of them when the destination may hold
/// anything, else those the source holds data in.
fn scan(copier: &Copier, shared: &Shared, dest_zeroed: bool) -> Result<(), JobError> {
    let t = &copier.tracker;
    if !dest_zeroed {
        t.dirty.set(0, t.dirty.len());
        return Ok(());
    }
    let mut pos = t.start;
    while pos < t.end {
        if shared.cancelled.load(Ordering::Acquire) {
            return Ok(());
        }
        let want = (t.end - pos).min(1 << 30);
        let run = copier
            .src
            .block_status(pos, want)
            .map_err(|source| JobError::Source {
                offset: pos,
                source,
            })?;
        let n = run.len.clamp(1, want);
        if run.status == BlockStatus::Data {
            if let Some((a, b)) = t.bits(pos, n) {
                t.dirty.set(a, b);
            }
        }
        pos += n;
    }
    Ok(())
}
