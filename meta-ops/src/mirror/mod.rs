//! The mirror job: move a live disk to another host without shared storage (issue 15).
//!
//! Host A runs the guest on a [`LiveDisk`] (any chain); host B exports a disk of the same
//! size, typically over NBD (`vdisk serve --nbd`, qemu-nbd, nbdkit), which A opens as an
//! `NbdClient` (feature `remote` of block-io) and hands to [`Job::mirror`] as the
//! destination. Any [`BlockDevice`] works as B.
//!
//! ## Timings ([`MirrorTiming`])
//!
//! - **`Before`** (the classic): background copy of the allocated blocks while the guest
//!   runs on A, guest writes tracked in the dirty bitmap and copied again; after
//!   `background_passes` passes guest writes to blocks in sync go to both hosts
//!   (write-through), and the pivot closes the gate, copies what is left, flushes B and
//!   switches the guest to B.
//! - **`After`**: the guest switches to B at once. From then on it runs on a device that
//!   straddles both hosts (module `straddle`): writes go to B (a write covering part of a
//!   granule B lacks first brings that granule over: copy-before-write), reads of granules
//!   not yet copied are served from A, and a background copy moves the rest. When nothing
//!   is left the guest is moved onto B itself.
//! - **`Split`**: one background pass as for `before` (or [`Job::split_budget`] bytes),
//!   then the switch and the rest as for `after`.
//!
//! Holes of A are skipped when B is known to read as zeros ([`Job::dest_zeroed`], or B
//! reports zeros over its whole size through `block_status` when the job starts); else
//! they are written as zeros on B, which may hold an old disk.
//!
//! ## Throttling guest writes when B falls behind
//!
//! While the guest still runs on A (`before`, from its second pass on: what is dirty then
//! is the guest's doing, not the first copy), the backlog is the bytes of dirty granules
//! (what B lacks). A guest write, write-zeroes or discard
//! that completes while the backlog is above the bound ([`Job::max_backlog`], default
//! [`DEFAULT_MAX_BACKLOG`]) waits, holding no lock, until the job has brought it back to
//! the bound, for at most [`THROTTLE_CAP`] per request (so a stalled B slows the guest to
//! about one change per second per thread instead of stopping it). Guest writes therefore
//! cannot outrun B by more than the bound plus what is in flight, and the pivot's pause
//! copies at most about that much. The wait counts in [`crate::JobReport::max_guest_wait`].
//! Paused jobs do not throttle. After the switch there is nothing to throttle: guest writes
//! go to B at B's pace.
//!
//! ## The pivot: requests in flight
//!
//! Both the `before` pivot and the `after`/`split` switch close the [`LiveDisk`]'s gate:
//! guest changes already running on A finish there (and are tracked, so the job copies
//! them), guest changes that arrive meanwhile wait without having touched A and are then
//! issued on B (or the straddling device); reads already running on A finish there, new
//! ones wait for the swap. So each request is applied exactly once, on one host.
//!
//! ## Failures
//!
//! - **Before the pivot** (or the switch): a failure of B (the NBD client gives up after its
//!   `block_io::nbd::RetryPolicy`) fails the job with
//!   [`JobError::Destination`]; the job detaches and the guest stays on A, untouched (the job
//!   never writes A). A write-through to a failing B only marks the blocks dirty again (the
//!   guest's request waits for the client's retries, then succeeds on A).
//! - **After the switch** (`after`, `split`): guest writes exist only on B. A request that
//!   needs B fails with B's error, its kind kept and "the mirror destination (host B)
//!   failed" in its context; nothing is dropped silently. The job fails too and the guest
//!   stays on the straddling device (reads of granules still on A keep working); A still
//!   holds the disk as it was at the switch. Cancelling after the switch likewise stops the
//!   copy and leaves the guest on the straddling device: it cannot go back to A.
//! - **A power cut** (`tests/crash_jobs.rs`): before the switch A holds every write the
//!   guest saw flushed, after the pivot B does; in between (`after`, `split`) a flushed
//!   write made after the switch is on B and the others on A or B, which granules B holds
//!   being known only in memory: neither host alone is the disk then. A guest flush after
//!   the switch flushes A too (writes acknowledged on A before it may not be durable yet).

mod straddle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, BlockStatus};
use tokio::task::JoinSet;

use crate::copy::Copier;
use crate::driver::copy_chunk;
use crate::error::{JobError, JobResult};
use crate::handle::{JobHandle, Phase, Shared};
use crate::job::{Job, JobKind, JobOptions};
use crate::live::{LiveDisk, Tracker};
use crate::task::{self, ChunkResult, Spec, Steering};

use self::straddle::Straddle;

/// Default bound of a mirror's backlog before guest writes wait (64 MiB).
pub const DEFAULT_MAX_BACKLOG: u64 = 64 << 20;

/// Longest one guest request waits for the backlog to shrink.
pub const THROTTLE_CAP: Duration = Duration::from_secs(1);

/// When the guest moves to host B (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MirrorTiming {
    /// The disk moves first, then the guest (reads and writes on A until the pivot).
    #[default]
    Before,
    /// The guest moves at once; reads of blocks not copied yet are served from A.
    After,
    /// One background pass (or a byte budget) first, then as `After`.
    Split,
}

impl MirrorTiming {
    /// `before`, `after` or `split`.
    pub fn name(self) -> &'static str {
        match self {
            MirrorTiming::Before => "before",
            MirrorTiming::After => "after",
            MirrorTiming::Split => "split",
        }
    }
}

impl std::str::FromStr for MirrorTiming {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "before" => Ok(MirrorTiming::Before),
            "after" => Ok(MirrorTiming::After),
            "split" => Ok(MirrorTiming::Split),
            _ => Err(format!("unknown timing {s:?} (before, after or split)")),
        }
    }
}

/// A mirror's own settings (kept in its [`Job`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MirrorSpec {
    timing: MirrorTiming,
    max_backlog: u64,
    split_budget: u64,
}

impl Job {
    /// Mirror the whole disk to `dest` (another host's disk of the same size, typically an
    /// NBD export), then move the guest onto it (see the module docs of `mirror`). `dest`
    /// may hold anything (holes are written as zeros) unless it reads as zeros everywhere or
    /// [`dest_zeroed`](Job::dest_zeroed) says so. Timing [`MirrorTiming::Before`] unless
    /// [`timing`](Job::timing) says otherwise; 8 chunks in flight (a network destination
    /// wants many requests in flight).
    pub fn mirror(dest: Arc<dyn BlockDevice>) -> Job {
        let mut job = Job::with_kind(JobKind::Mirror, dest);
        job.mirror = Some(MirrorSpec {
            timing: MirrorTiming::Before,
            max_backlog: DEFAULT_MAX_BACKLOG,
            split_budget: 0,
        });
        job.options(JobOptions {
            parallel: 8,
            ..JobOptions::default()
        })
    }

    /// A mirror's timing (ignored by other jobs).
    pub fn timing(mut self, timing: MirrorTiming) -> Job {
        if let Some(m) = &mut self.mirror {
            m.timing = timing;
        }
        self
    }

    /// A mirror's backlog bound in bytes: guest changes wait while more is dirty (0: no
    /// throttle). Ignored by other jobs.
    pub fn max_backlog(mut self, bytes: u64) -> Job {
        if let Some(m) = &mut self.mirror {
            m.max_backlog = bytes;
        }
        self
    }

    /// A `split` mirror's part before the switch: the switch comes once this many bytes were
    /// copied (0, the default: after one background pass).
    pub fn split_budget(mut self, bytes: u64) -> Job {
        if let Some(m) = &mut self.mirror {
            m.split_budget = bytes;
        }
        self
    }
}

/// The guest-write throttle of a tracker (see the module docs).
#[derive(Debug)]
pub(crate) struct Throttle {
    max_backlog: u64,
    /// On while the job copies with the guest on A (off when paused, switched or ended).
    on: AtomicBool,
    /// Guest requests that waited.
    waits: AtomicU64,
}

/// Called by a guest change after it completed, holding no lock: waits while `t`'s backlog
/// is above its bound (at most [`THROTTLE_CAP`]). Returns how long it waited.
pub(crate) fn throttle_guest(t: &Tracker) -> Duration {
    let Some(th) = &t.throttle else {
        return Duration::ZERO;
    };
    let over = || th.on.load(Ordering::Acquire) && t.dirty.count() * t.gran > th.max_backlog;
    if !over() {
        return Duration::ZERO;
    }
    th.waits.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    while over() && t0.elapsed() < THROTTLE_CAP {
        std::thread::sleep(Duration::from_micros(500));
    }
    t0.elapsed()
}

/// Starts a mirror (called by [`crate::JobRunner::start`]).
pub(crate) fn start(
    rt: &tokio::runtime::Handle,
    live: &Arc<LiveDisk>,
    dest: Arc<dyn BlockDevice>,
    dest_zeroed: bool,
    o: JobOptions,
    spec: MirrorSpec,
) -> Result<JobHandle, JobError> {
    let (si, di) = (live.current().info(), dest.info());
    let bad = |s: String| Err(JobError::Invalid(s));
    if di.read_only {
        return bad("the mirror destination is read-only".into());
    }
    if di.virtual_size != si.virtual_size {
        return bad(format!(
            "the mirror destination must have the disk's size ({} bytes, not {})",
            si.virtual_size, di.virtual_size
        ));
    }
    let sector = u64::from(si.logical_sector_size.max(di.logical_sector_size).max(1));
    if o.granularity < 4096 || !o.granularity.is_power_of_two() || o.granularity % sector != 0 {
        return bad(format!(
            "granularity {} is not a power of two of at least 4096 and of {sector}-byte sectors",
            o.granularity
        ));
    }
    let size = si.virtual_size;
    // B reads as zeros when the caller says so or B reports it over its whole size.
    let dest_zeroed = dest_zeroed || reads_zeros(&*dest, size);
    let mut tracker = Tracker::new(dest.clone(), 0, size, 0, o.granularity);
    if spec.max_backlog > 0 && spec.timing != MirrorTiming::After {
        tracker.throttle = Some(Throttle {
            max_backlog: spec.max_backlog,
            on: AtomicBool::new(false),
            waits: AtomicU64::new(0),
        });
    }
    let tracker = Arc::new(tracker);
    let src = live.attach(tracker.clone())?;
    let copier = Arc::new(Copier::new(
        src,
        tracker.clone(),
        live,
        dest_zeroed,
        false,
        &o,
    ));
    let job = Spec {
        kind: JobKind::Mirror,
        chunk: o.chunk,
        gran: o.granularity,
        phase: Phase::Scanning,
        rate: o.rate,
    };
    Ok(task::spawn(rt, live, tracker, job, release, |ctl| {
        Mirror {
            shared: ctl.shared.clone(),
            copier,
            live: live.clone(),
            opts: o,
            spec,
            ctl,
            passes: 0,
            pause: Duration::ZERO,
            straddle: None,
        }
        .run()
    }))
}

/// Stops the throttle and detaches the job when its task ends, however it ends.
fn release(live: &LiveDisk, shared: &Shared) {
    if let Some(th) = &shared.tracker.throttle {
        th.on.store(false, Ordering::Release);
    }
    live.detach(&shared.tracker);
}

/// Write-through passes of a `before` mirror before its pivot copies whatever is dirty.
const CONVERGE_PASSES: u32 = 2;

/// How a copy loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Loop {
    /// Pivot (or switch) now.
    Done,
    /// Cancelled.
    Cancelled,
}

/// The driver task of a mirror.
struct Mirror {
    shared: Arc<Shared>,
    copier: Arc<Copier>,
    live: Arc<LiveDisk>,
    opts: JobOptions,
    spec: MirrorSpec,
    ctl: Steering,
    passes: u32,
    /// Guest I/O paused by the switch and the pivot.
    pause: Duration,
    straddle: Option<Arc<Straddle>>,
}

fn dst_err(op: &'static str) -> impl FnOnce(block_io::Error) -> JobError {
    move |source| JobError::Destination {
        op,
        offset: 0,
        source,
    }
}

impl Mirror {
    fn throttling(&self, on: bool) {
        if let Some(th) = &self.shared.tracker.throttle {
            th.on.store(on, Ordering::Release);
        }
    }

    async fn run(mut self) -> JobResult {
        let t0 = Instant::now();
        let (copier, shared) = (self.copier.clone(), self.shared.clone());
        tokio::task::spawn_blocking(move || scan(&copier, &shared))
            .await
            .map_err(|_| JobError::Aborted)??;
        self.shared.set_phase(Phase::Copying);
        let timing = self.spec.timing;
        if timing != MirrorTiming::After {
            let r = self.local().await;
            self.throttling(false);
            if r? == Loop::Cancelled {
                return Err(JobError::Cancelled);
            }
        }
        if timing == MirrorTiming::Before {
            self.pivot().await?;
        } else {
            self.switch().await?;
            if self.remote().await? == Loop::Cancelled {
                return Err(JobError::Cancelled);
            }
            self.finish().await?;
        }
        Ok(self
            .copier
            .report(&self.shared, t0, self.passes, self.pause))
    }

    /// Copying with the guest on A: claims dirty granules a chunk at a time (guest writes
    /// mark them again) until the timing's part is done: for `before`, a pass that leaves at
    /// most `pivot_threshold` dirty (write-through after `background_passes`, at least one:
    /// write-through crosses the network), for `split` one pass or the byte budget.
    async fn local(&mut self) -> Result<Loop, JobError> {
        let tracker = self.shared.tracker.clone();
        let background = self.opts.background_passes.max(1);
        let split = self.spec.timing == MirrorTiming::Split;
        let mut set: JoinSet<ChunkResult> = JoinSet::new();
        let mut cursor = 0u64;
        self.passes = 1;
        loop {
            self.ctl.reap_ended(&mut set).await?;
            if let Some(l) = self.control(&mut set).await? {
                return Ok(l);
            }
            if split
                && self.spec.split_budget > 0
                && self.shared.done.load(Ordering::Acquire) >= self.spec.split_budget
            {
                self.ctl.drain(&mut set).await?;
                return Ok(Loop::Done);
            }
            if self.ctl.wait_room(&mut set, self.opts.parallel).await? {
                continue;
            }
            let max_bits =
                (self.shared.chunk_for(self.shared.limiter.rate()) / tracker.gran).max(1);
            let Some(first) = tracker.dirty.next_set(cursor) else {
                if let Some(r) = set.join_next().await {
                    self.ctl.reap_or_drain(r, &mut set).await?;
                    continue;
                }
                if split
                    || tracker.dirty.count() * tracker.gran <= self.opts.pivot_threshold
                    || self.passes >= background.saturating_add(CONVERGE_PASSES)
                {
                    return Ok(Loop::Done);
                }
                // From the second pass on, what is dirty is the guest's doing: the throttle
                // holds it to the bound.
                self.throttling(true);
                if self.passes >= background {
                    tracker.through.store(true, Ordering::Release);
                    self.shared.set_phase(Phase::Converging);
                }
                self.passes += 1;
                cursor = 0;
                continue;
            };
            cursor = copy_chunk(&mut self.ctl, &self.copier, &mut set, first, max_bits).await;
        }
    }

    /// Copying with the guest on the straddling device: one pass over the granules B lacks,
    /// each chunk copied with its granules held and marked copied after.
    async fn remote(&mut self) -> Result<Loop, JobError> {
        let tracker = self.shared.tracker.clone();
        let straddle = self.straddle();
        let mut set: JoinSet<ChunkResult> = JoinSet::new();
        let mut cursor = 0u64;
        loop {
            self.ctl.reap_ended(&mut set).await?;
            if let Some(l) = self.control(&mut set).await? {
                return Ok(l);
            }
            if self.ctl.wait_room(&mut set, self.opts.parallel).await? {
                continue;
            }
            let max_bits =
                (self.shared.chunk_for(self.shared.limiter.rate()) / tracker.gran).max(1);
            let Some(first) = tracker.dirty.next_set(cursor) else {
                self.ctl.drain(&mut set).await?;
                if tracker.dirty.count() == 0 {
                    return Ok(Loop::Done);
                }
                // Granules a chunk in flight skipped are looked at again.
                cursor = 0;
                continue;
            };
            let last = (first + max_bits).min(tracker.dirty.len());
            cursor = last;
            let (a, b) = tracker.span(first, last);
            if !self.ctl.tokens(b - a).await {
                cursor = first;
                continue;
            }
            let (s, copier) = (straddle.clone(), self.copier.clone());
            set.spawn_blocking(move || {
                let mut n = 0;
                let mut pos = a;
                while pos < b {
                    let end = b.min(pos + (256 << 10));
                    copier.yield_to_guests();
                    n += s.copy_granules(pos, end)?;
                    pos = end;
                }
                Ok((n, 0))
            });
        }
    }

    /// The straddling device (one per job: its granule locks are what keep guest changes
    /// and the background copy apart).
    fn straddle(&mut self) -> Arc<Straddle> {
        self.straddle
            .get_or_insert_with(|| Arc::new(Straddle::new(self.copier.clone())))
            .clone()
    }

    /// `after`/`split`: the guest moves to the straddling device (the gate drains requests
    /// in flight on A; those waiting go to the new device).
    async fn switch(&mut self) -> Result<(), JobError> {
        self.shared.set_phase(Phase::Pivoting);
        let tracker = self.shared.tracker.clone();
        let dev: Arc<dyn BlockDevice> = self.straddle();
        let live = self.live.clone();
        self.pause += tokio::task::spawn_blocking(move || {
            live.switch_attached(dev, || {
                tracker.untracked.store(true, Ordering::Release);
                tracker.through.store(false, Ordering::Release);
            })
        })
        .await
        .map_err(|_| JobError::Aborted)?;
        self.shared.set_phase(Phase::Copying);
        Ok(())
    }

    /// `after`/`split`: B holds everything; it is flushed and the guest moves onto it.
    async fn finish(&mut self) -> Result<(), JobError> {
        self.shared.set_phase(Phase::Pivoting);
        let (dest, live) = (self.copier.tracker.dest.clone(), self.live.clone());
        let pause = tokio::task::spawn_blocking(move || {
            dest.flush().map_err(dst_err("flush"))?;
            let (pause, r) = live.pivot(true, || dest.flush().map_err(dst_err("flush")));
            r.map(|()| pause)
        })
        .await
        .map_err(|_| JobError::Aborted)??;
        self.pause += pause;
        Ok(())
    }

    /// `before`: the gate closes, what is still dirty is copied, B flushed, the guest
    /// switched to B.
    async fn pivot(&mut self) -> Result<(), JobError> {
        if self.shared.cancelled.load(Ordering::Acquire) {
            return Err(JobError::Cancelled);
        }
        self.shared.set_phase(Phase::Pivoting);
        let (copier, shared, live) = (self.copier.clone(), self.shared.clone(), self.live.clone());
        let pause = tokio::task::spawn_blocking(move || {
            let t = &copier.tracker;
            t.dest.flush().map_err(dst_err("flush"))?;
            let (pause, r) = live.pivot(true, || -> Result<(), JobError> {
                let runs = t.dirty.take(0, t.dirty.len());
                let n = copier.runs(&runs)?;
                shared.done.fetch_add(n, Ordering::AcqRel);
                t.dest.flush().map_err(dst_err("flush"))
            });
            r.map(|()| pause)
        })
        .await
        .map_err(|_| JobError::Aborted)??;
        self.pause += pause;
        Ok(())
    }

    /// Pause and cancel between chunks: `Some` when the loop must end.
    async fn control(&mut self, set: &mut JoinSet<ChunkResult>) -> Result<Option<Loop>, JobError> {
        let c = self.ctl.now();
        if c.cancelled {
            self.ctl.drain(set).await?;
            return Ok(Some(Loop::Cancelled));
        }
        if c.paused {
            self.ctl.drain(set).await?;
            let was = self
                .shared
                .tracker
                .throttle
                .as_ref()
                .is_some_and(|th| th.on.load(Ordering::Acquire));
            self.throttling(false);
            self.ctl.paused().await;
            self.throttling(was);
        }
        Ok(None)
    }
}

/// Marks the granules to copy: those A holds data in when B reads as zeros, else all.
fn scan(copier: &Copier, shared: &Shared) -> Result<(), JobError> {
    crate::driver::mark_runs(copier, shared, !copier.dest_zeroed, |s| {
        s == BlockStatus::Data || s == BlockStatus::Unallocated
    })
}

/// Whether `dev` reports zeros over `[0, size)` in at most 1024 block-status runs.
fn reads_zeros(dev: &dyn BlockDevice, size: u64) -> bool {
    let mut pos = 0;
    for _ in 0..1024 {
        if pos >= size {
            return true;
        }
        let want = (size - pos).min(1 << 30);
        match dev.block_status(pos, want) {
            Ok(r) if r.status == BlockStatus::Zero && r.len > 0 => pos += r.len.min(want),
            _ => return false,
        }
    }
    pos >= size
}
