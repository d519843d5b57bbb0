//! [`LiveDisk`]: the guest's view of a disk that jobs run on.
//!
//! Guest I/O goes through a `LiveDisk` (it is a [`BlockDevice`]); a job attaches a
//! [`Tracker`] to it. While one is attached, every guest write, write-zeroes and discard:
//! - passes a *gate* (a task-fair read/write lock: many guest writes at once, the pivot alone);
//! - takes its blocks shared in a [`RangeLock`] whose exclusive holders are the job's chunk
//!   copies, so a chunk copy and a guest write to the same block never overlap;
//! - after changing the source, marks its blocks dirty in the tracker so that the job copies
//!   them (again) — or, once the job converges (write-through), writes the same bytes to the
//!   destination too when those blocks are already in sync.
//!
//! Reads take no lock of the job's: the job never changes the source, and after a pivot that
//! switches the guest to the destination they go there. They hold the device's read lock for
//! their duration, which only a device swap takes exclusively (a pivot, briefly; a resize,
//! [`LiveDisk::exclusive`], which must know no read runs on the device it changes). Devices
//! the guest was switched away from are kept open as long as the `LiveDisk`, so that extents
//! mapped from them stay valid.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, BlockStatus, DiskInfo, Mapping, RangeLock, RawBuf, StatusRun};
use parking_lot::{Mutex, RwLock};

use crate::bitmap::Bitmap;
use crate::error::JobError;

/// Granularity of the guest/job range lock, in bytes.
const LOCK_BLOCK: u64 = 4096;

/// What a job keeps about the source range it copies: which blocks are dirty (still to copy),
/// which destination blocks it or the guest wrote, and whether guest writes go through.
pub(crate) struct Tracker {
    /// The destination.
    pub(crate) dest: Arc<dyn BlockDevice>,
    /// The source range `[start, end)` the job copies.
    pub(crate) start: u64,
    /// End of the source range.
    pub(crate) end: u64,
    /// Where `start` lands in the destination.
    pub(crate) dest_offset: u64,
    /// Bytes per bit; a multiple of both disks' sector sizes.
    pub(crate) gran: u64,
    /// Block number (`offset / gran`) of bit 0.
    pub(crate) first_block: u64,
    /// Blocks the destination does not hold yet.
    pub(crate) dirty: Bitmap,
    /// Blocks of the destination that may hold data (written by the job or the guest).
    pub(crate) touched: Bitmap,
    /// Blocks where a guest discard that was not repeated on the destination may have
    /// uncovered the layers below the source's top. A commit copies the guest's view of
    /// those blocks into its base even where no merged layer holds them (see
    /// [`crate::commit`], "Why a crash never loses the chain", 1).
    pub(crate) uncovered: Bitmap,
    /// Write-through: guest writes to clean blocks go to both disks.
    pub(crate) through: AtomicBool,
    /// The destination's logical sector size.
    pub(crate) dest_sector: u64,
    /// Guest bytes written through to the destination.
    pub(crate) through_bytes: AtomicU64,
    /// Bits guest writes set (blocks made dirty again or first).
    pub(crate) marked: AtomicU64,
    /// The source does not change with guest writes (a commit of layers below the live
    /// top): guest changes are neither tracked nor written through.
    pub(crate) ignore_guest: bool,
    /// What a switching pivot moves the guest to (default: the destination).
    pub(crate) switch_to: Option<Arc<dyn BlockDevice>>,
    /// Guest changes no longer go to the source (a mirror switched the guest to a device
    /// that keeps its own record): they are neither tracked nor written through.
    pub(crate) untracked: AtomicBool,
    /// The guest-write throttle (a mirror's backlog bound): see [`Tracker::throttle`].
    pub(crate) throttle: Option<crate::mirror::Throttle>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("range", &(self.start..self.end))
            .field("dest_offset", &self.dest_offset)
            .field("granularity", &self.gran)
            .field("dirty", &self.dirty.count())
            .field("through", &self.through.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How a guest request changes the disk.
enum Change<'a> {
    Write(&'a [u8]),
    Vectored(&'a [IoSlice<'a>]),
    Raw(&'a [RawBuf]),
    Zeroes(bool),
    Discard,
}

impl Tracker {
    /// A tracker for `[start, end)` of the source copied to `dest` at `dest_offset`.
    pub(crate) fn new(
        dest: Arc<dyn BlockDevice>,
        start: u64,
        end: u64,
        dest_offset: u64,
        gran: u64,
    ) -> Self {
        let first_block = start / gran;
        let blocks = end.div_ceil(gran).saturating_sub(first_block);
        let dest_sector = u64::from(dest.info().logical_sector_size.max(1));
        Tracker {
            dest,
            start,
            end,
            dest_offset,
            gran,
            first_block,
            dirty: Bitmap::new(blocks),
            touched: Bitmap::new(blocks),
            uncovered: Bitmap::new(blocks),
            through: AtomicBool::new(false),
            dest_sector,
            through_bytes: AtomicU64::new(0),
            marked: AtomicU64::new(0),
            ignore_guest: false,
            switch_to: None,
            untracked: AtomicBool::new(false),
            throttle: None,
        }
    }

    /// The bits covering source bytes `[off, off+len)` clipped to the range, if any.
    pub(crate) fn bits(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        let a = off.max(self.start);
        let b = off.saturating_add(len).min(self.end);
        (a < b).then(|| {
            (
                a / self.gran - self.first_block,
                b.div_ceil(self.gran) - self.first_block,
            )
        })
    }

    /// Source bytes of bit `bit`, clipped to the range.
    pub(crate) fn span(&self, first: u64, last: u64) -> (u64, u64) {
        let a = ((first + self.first_block) * self.gran).max(self.start);
        let b = ((last + self.first_block) * self.gran).min(self.end);
        (a, b)
    }

    /// Where source offset `off` lands in the destination.
    pub(crate) fn dest_pos(&self, off: u64) -> u64 {
        off - self.start + self.dest_offset
    }

    fn mark(&self, off: u64, len: u64) {
        if let Some((a, b)) = self.bits(off, len) {
            let n = self.dirty.set(a, b);
            self.marked.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// After a guest change of `[off, off+len)` of the source: with `through` (decided when
    /// the guest took its range lock, exclusively), repeat it on the destination when its
    /// blocks are in sync there, else mark them dirty (and, for a `discard`, uncovered).
    fn after_guest(
        &self,
        src: &dyn BlockDevice,
        off: u64,
        len: u64,
        what: Applied<'_>,
        through: bool,
        discard: bool,
    ) {
        if self.ignore_guest || self.untracked.load(Ordering::Acquire) {
            return;
        }
        let Some((a, b)) = self.bits(off, len) else {
            return;
        };
        let inside = off >= self.start && off.saturating_add(len) <= self.end;
        let go = through
            && inside
            && (self.dest_pos(off.max(self.start))) % self.dest_sector == 0
            && len % self.dest_sector == 0
            && self.dirty.all_clear(a, b);
        if go {
            let at = self.dest_pos(off);
            let r = match what {
                Applied::Bytes(d) => {
                    self.touched.set(a, b);
                    self.dest.write_at(d, at)
                }
                Applied::Vectored(v) => {
                    self.touched.set(a, b);
                    self.dest.write_vectored_at(v, at)
                }
                Applied::Zeroes(unmap) => self.dest.write_zeroes(at, len, unmap),
                // A discard reads back as zeros, or as a parent's data in a chain, or keeps
                // data (part of a block): zeros are repeated as zeros, anything else is
                // what the source reads now (the guest's exclusive range lock keeps it
                // still), written across as a guest write would be.
                Applied::Discarded => match src.block_status(off, len) {
                    Ok(run) if run.status != BlockStatus::Data && run.len >= len => {
                        self.dest.write_zeroes(at, len, true)
                    }
                    Ok(_) if len <= MAX_DISCARD_COPY => {
                        self.touched.set(a, b);
                        let mut buf = vec![0u8; len as usize];
                        src.read_at(&mut buf, off)
                            .and_then(|()| self.dest.write_at(&buf, at))
                    }
                    _ => Err(block_io::Error::new(
                        block_io::ErrorKind::InvalidInput,
                        "discard left data",
                    )),
                },
                Applied::Failed => Err(block_io::Error::new(
                    block_io::ErrorKind::Io,
                    "the guest's change failed",
                )),
            };
            if r.is_ok() {
                self.through_bytes.fetch_add(len, Ordering::Relaxed);
                return;
            }
            // The job copies the blocks again (and reports the destination's error itself).
        }
        if discard {
            // Set before the dirty bits, under the guest's range lock: the chunk that copies
            // these blocks again sees it.
            self.uncovered.set(a, b);
        }
        self.mark(off, len);
    }
}

/// What a guest change did to the source, for [`Tracker::after_guest`].
enum Applied<'a> {
    Bytes(&'a [u8]),
    Vectored(&'a [IoSlice<'a>]),
    Zeroes(bool),
    Discarded,
    /// It failed (part of the range may have changed anyway).
    Failed,
}

/// The gate's contents: what guest writes need, changed only by the pivot and job setup.
struct Gate {
    side: Arc<dyn BlockDevice>,
    tracker: Option<Arc<Tracker>>,
}

/// Longest guest discard that leaves data (part of a block) whose bytes write-through reads
/// from the source and writes across; a longer one marks its blocks for the job.
const MAX_DISCARD_COPY: u64 = 1 << 20;

/// The longest pause a job makes after one of its steps while the guest is busy
/// ([`JobOptions::busy_duty`](crate::JobOptions::busy_duty)).
pub const MAX_BACK_OFF: Duration = Duration::from_millis(50);

/// How a job's steps give way to a busy guest ([`LiveDisk::paced_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pace {
    /// Most percent of the time the steps take
    /// ([`JobOptions::busy_duty`](crate::JobOptions::busy_duty)).
    pub(crate) max_duty: u8,
    /// Percent of its request rate the guest keeps
    /// ([`JobOptions::guest_share`](crate::JobOptions::guest_share); 0: off).
    pub(crate) share: u8,
}

impl Pace {
    pub(crate) fn of(o: &crate::JobOptions) -> Pace {
        Pace {
            max_duty: o.busy_duty,
            share: o.guest_share.min(99),
        }
    }
}

/// The least duty the guest-share feedback lowers a job to, in percent.
const MIN_DUTY: f64 = 2.0;

/// How often the feedback measures the guest with the job's steps stopped (a probe), how
/// long it lets the guest settle first, and how long it counts its requests then.
const PROBE_EVERY: Duration = Duration::from_millis(2000);
const PROBE_SETTLE: Duration = Duration::from_millis(20);
const PROBE_COUNT: Duration = Duration::from_millis(100);

/// How long the feedback counts guest requests between two changes of the duty.
const FEEDBACK_WINDOW: Duration = Duration::from_millis(200);

/// The guest-share feedback of a disk's job steps (held while the guest is busy, so its
/// steps run one at a time).
///
/// Now and then (every [`PROBE_EVERY`]) the steps stop for a probe, which counts the guest's
/// requests with the job still: the guest's rate without the job (kept as a running mean).
/// Between probes, the rate over each [`FEEDBACK_WINDOW`] is the guest's rate with the job,
/// smoothed over the windows (one window's count is noisy: a tenth either way). Below the
/// share of the probes' rate the duty drops in proportion: the guest's loss is taken to be
/// proportional to the duty, so the duty goes to `(100 - share) / (100 - kept)` of itself,
/// to between half and 95% of itself per window, down to [`MIN_DUTY`]. Above the share by
/// three points or more the duty rises by 15% (up to the job's `busy_duty`).
#[derive(Debug)]
struct Feedback {
    /// Percent of the time the steps take now (`None`: the job's `busy_duty`).
    duty: Option<f64>,
    /// Guest requests per second without the job, from the probes (`None`: no probe yet).
    reference: Option<f64>,
    /// Percent of `reference` the guest kept with the job, smoothed over the windows.
    kept: Option<f64>,
    next_probe: Instant,
    window_start: Instant,
    window_done: u64,
}

impl Feedback {
    fn new() -> Feedback {
        let now = Instant::now();
        Feedback {
            duty: None,
            reference: None,
            kept: None,
            next_probe: now,
            window_start: now,
            window_done: 0,
        }
    }
}

/// Counters of the guest I/O a [`LiveDisk`] served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    /// Requests started.
    pub requests: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// The longest time a guest request waited for a job (its chunk locks, or the pivot)
    /// since the last [`LiveDisk::reset_max_wait`].
    pub max_wait: Duration,
    /// Pivots done on this disk (the generation of [`LiveDisk::generation`]).
    pub generation: u64,
}

/// The guest's view of a disk that online jobs run on (see the module docs).
pub struct LiveDisk {
    gate: RwLock<Gate>,
    side: RwLock<Arc<dyn BlockDevice>>,
    lock: RangeLock,
    generation: AtomicU64,
    arrived: AtomicU64,
    completed: AtomicU64,
    max_wait_ns: AtomicU64,
    busy: AtomicBool,
    retired: Mutex<Vec<Arc<dyn BlockDevice>>>,
    /// Guest reads take their blocks shared in the range lock (a compaction moves data
    /// in place; see [`LiveDisk::lock_reads`]).
    reads_locked: AtomicBool,
    /// Guest reads in flight that took no range lock.
    unlocked_reads: AtomicU64,
    /// Held by a job step, and the pause after it, while the guest is busy: a job running
    /// several steps at once then still takes only its duty share of the time in all
    /// ([`LiveDisk::paced_step`]).
    steps: Mutex<Feedback>,
    /// Guest requests arrived during the last job step.
    guest_busy: AtomicBool,
}

impl std::fmt::Debug for LiveDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveDisk")
            .field("info", &self.info())
            .field("stats", &self.guest_stats())
            .field("job", &self.busy.load(Ordering::Relaxed))
            .finish()
    }
}

/// Counts a guest request from start to end (the job's priority rule looks at these).
struct InFlight<'a>(&'a LiveDisk);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.completed.fetch_add(1, Ordering::AcqRel);
    }
}

impl LiveDisk {
    /// A live view of `dev` with no job attached: requests pass straight through.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Arc<LiveDisk> {
        Arc::new(LiveDisk {
            gate: RwLock::new(Gate {
                side: dev.clone(),
                tracker: None,
            }),
            side: RwLock::new(dev),
            lock: RangeLock::new(LOCK_BLOCK),
            generation: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            max_wait_ns: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            retired: Mutex::new(Vec::new()),
            reads_locked: AtomicBool::new(false),
            steps: Mutex::new(Feedback::new()),
            guest_busy: AtomicBool::new(false),
            unlocked_reads: AtomicU64::new(0),
        })
    }

    /// The device guest I/O goes to now (the destination after a switching pivot).
    pub fn current(&self) -> Arc<dyn BlockDevice> {
        self.side.read().clone()
    }

    /// Runs `f` on the current device with the device's read lock held (guest reads: see
    /// the module docs).
    fn reading<T>(&self, f: impl FnOnce(&dyn BlockDevice) -> T) -> T {
        let side = self.side.read();
        f(&**side)
    }

    /// Runs `f` with every guest request paused: new changes wait at the gate and new reads
    /// at the device lock, those in flight finish first. `f` gets the current device and may
    /// return a new one, which guest I/O goes to from the next request on (the old one is
    /// kept open, as after a pivot, and the generation advances). For jobs that change the
    /// disk itself (a resize). Fails with [`JobError::Busy`] while a job is attached. Returns
    /// how long guest I/O was paused, and what `f` returned.
    pub(crate) fn exclusive<T, E>(
        &self,
        f: impl FnOnce(&Arc<dyn BlockDevice>) -> (Option<Arc<dyn BlockDevice>>, Result<T, E>),
    ) -> Result<(Duration, Result<T, E>), JobError> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(JobError::Busy);
        }
        let t0 = Instant::now();
        let mut gate = self.gate.write();
        let mut side = self.side.write();
        let (next, r) = f(&gate.side);
        if let Some(next) = next {
            let old = std::mem::replace(&mut gate.side, next.clone());
            *side = next;
            self.retired.lock().push(old);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        drop(side);
        drop(gate);
        self.busy.store(false, Ordering::Release);
        Ok((t0.elapsed(), r))
    }

    /// How many pivots this disk has been through: a guest change made while the value is
    /// `g` is in every image a pivot `g + 1` completes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a job is attached.
    pub fn job_running(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Counters of the guest I/O served so far.
    pub fn guest_stats(&self) -> GuestStats {
        let arrived = self.arrived.load(Ordering::Acquire);
        let completed = self.completed.load(Ordering::Acquire);
        GuestStats {
            requests: arrived,
            in_flight: arrived.saturating_sub(completed),
            max_wait: Duration::from_nanos(self.max_wait_ns.load(Ordering::Acquire)),
            generation: self.generation(),
        }
    }

    /// Starts measuring [`GuestStats::max_wait`] afresh.
    pub fn reset_max_wait(&self) {
        self.max_wait_ns.store(0, Ordering::Release);
    }

    /// [`BlockDevice::write_at`] that also returns the [`generation`](Self::generation) the
    /// write landed in: it is in the image of every pivot numbered above it, and in none
    /// numbered up to it. For callers that must know which side of a pivot holds a write
    /// (journals, model-checking tests).
    pub fn write_at_gen(&self, buf: &[u8], offset: u64) -> block_io::Result<u64> {
        self.change(offset, buf.len() as u64, Change::Write(buf))
    }

    /// [`BlockDevice::write_zeroes`] returning the generation, as [`write_at_gen`](Self::write_at_gen).
    pub fn write_zeroes_gen(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<u64> {
        self.change(offset, len, Change::Zeroes(unmap))
    }

    /// [`BlockDevice::discard`] returning the generation, as [`write_at_gen`](Self::write_at_gen).
    pub fn discard_gen(&self, offset: u64, len: u64) -> block_io::Result<u64> {
        self.change(offset, len, Change::Discard)
    }

    fn enter(&self) -> InFlight<'_> {
        self.arrived.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    /// Requests started so far (the job's priority rule waits for those started before it
    /// looked to complete).
    pub(crate) fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::Acquire)
    }

    /// Requests completed so far.
    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    /// The priority rule of every job step: guest requests that started before the step go
    /// first. Waits (at most `cap`) until as many guest requests have completed as had
    /// started when it looked; counts a wait in `yields` and returns whether it waited.
    pub(crate) fn yield_to_guests(&self, cap: Duration, yields: &AtomicU64) -> bool {
        let target = self.arrived();
        if self.completed() >= target {
            return false;
        }
        yields.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + cap;
        let mut spins = 0u32;
        while self.completed() < target && Instant::now() < deadline {
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        true
    }

    /// Runs one job step `f` paced for a busy guest: if guest requests arrived during the
    /// step, the guest is busy, and the step is followed by a pause that keeps the job's
    /// steps to their duty share of the time (at most [`MAX_BACK_OFF`] per step). The duty
    /// is `pace.max_duty` percent (100 or more: no pause), or less where the guest-share
    /// feedback ([`Feedback`]) finds that the guest keeps less than `pace.share` percent of
    /// its request rate. While the guest is busy, the steps of all the disk's jobs (a job's
    /// parallel chunks included) run one at a time, each with its pause: the duty share
    /// bounds the job as a whole, not each of its threads. An idle guest leaves the steps
    /// running side by side at full speed.
    pub(crate) fn paced_step<T>(&self, pace: Pace, f: impl FnOnce() -> T) -> T {
        let on = pace.max_duty < 100;
        let mut held = (on && self.guest_busy.load(Ordering::Acquire)).then(|| self.steps.lock());
        if let Some(fb) = held.as_mut().filter(|_| pace.share > 0) {
            self.probe(fb);
        }
        let (t0, arrived) = (Instant::now(), self.arrived());
        let r = f();
        let busy = self.arrived() != arrived;
        self.guest_busy.store(busy, Ordering::Release);
        if on && busy {
            let max = f64::from(pace.max_duty.max(1));
            let duty = match held.as_mut() {
                Some(fb) if pace.share > 0 => self.feedback(fb, pace.share, max),
                _ => max,
            };
            let pause = t0.elapsed().mul_f64((100.0 - duty) / duty);
            std::thread::sleep(pause.min(MAX_BACK_OFF));
        }
        r
    }

    /// A probe of the guest's rate without the job, when one is due (see [`Feedback`]).
    fn probe(&self, fb: &mut Feedback) {
        if Instant::now() < fb.next_probe {
            return;
        }
        std::thread::sleep(PROBE_SETTLE);
        let (t, done) = (Instant::now(), self.completed());
        std::thread::sleep(PROBE_COUNT);
        let rate = (self.completed() - done) as f64 / t.elapsed().as_secs_f64();
        fb.reference = Some(fb.reference.map_or(rate, |r| (r + rate) / 2.0));
        let now = Instant::now();
        fb.next_probe = now + PROBE_EVERY;
        fb.window_start = now;
        fb.window_done = self.completed();
    }

    /// The duty after a step, at most `max`: changed once a window is over (see [`Feedback`]).
    fn feedback(&self, fb: &mut Feedback, share: u8, max: f64) -> f64 {
        let mut duty = fb.duty.unwrap_or(max).min(max);
        let span = fb.window_start.elapsed();
        let reference = fb.reference.filter(|&r| r > 0.0);
        if let Some(reference) = reference.filter(|_| span >= FEEDBACK_WINDOW) {
            let done = self.completed();
            let rate = (done - fb.window_done) as f64 / span.as_secs_f64();
            // Smoothed over windows: one window's count is noisy (a tenth either way).
            let now_kept = 100.0 * rate / reference;
            let kept = match fb.kept {
                Some(k) => 0.7 * k + 0.3 * now_kept,
                None => now_kept,
            };
            fb.kept = Some(kept);
            let share = f64::from(share);
            if kept < share {
                // In proportion: the guest's loss is about proportional to the duty.
                let cut = ((100.0 - share) / (100.0 - kept).max(1.0)).clamp(0.5, 0.95);
                duty = (duty * cut).max(MIN_DUTY);
            } else if kept > share + 3.0 {
                duty = (duty * 1.15).min(max);
            }
            fb.window_start = Instant::now();
            fb.window_done = done;
        }
        fb.duty = Some(duty);
        duty
    }

    /// The range lock chunk copies take exclusively.
    pub(crate) fn range_lock(&self) -> &RangeLock {
        &self.lock
    }

    /// Makes guest reads take their blocks shared in the range lock (`on`), so that a job
    /// holding a block exclusively (a compaction moving it in the file) never overlaps one;
    /// returns once no read that took no lock is still running. Mapped reads are refused
    /// meanwhile (the caller falls back to `read_at`).
    pub(crate) fn lock_reads(&self, on: bool) {
        self.reads_locked.store(on, Ordering::SeqCst);
        while on && self.unlocked_reads.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// What a guest read of `[offset, offset+len)` holds while it runs (see
    /// [`lock_reads`](Self::lock_reads)): a shared range lock, or its place in the count of
    /// unlocked reads.
    fn read_lock(&self, offset: u64, len: u64) -> ReadLock<'_> {
        if !self.reads_locked.load(Ordering::SeqCst) {
            self.unlocked_reads.fetch_add(1, Ordering::SeqCst);
            // Checked again after counting: `lock_reads` sets the flag, then waits for the
            // count, so one of the two sees the other.
            if !self.reads_locked.load(Ordering::SeqCst) {
                return ReadLock::Counted(self);
            }
            self.unlocked_reads.fetch_sub(1, Ordering::SeqCst);
        }
        let t0 = Instant::now();
        let g = self.lock.lock_shared(offset, len);
        self.max_wait_ns.fetch_max(
            u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::AcqRel,
        );
        ReadLock::Held(g)
    }

    /// A guest change of `[offset, offset+len)`.
    fn change(&self, offset: u64, len: u64, change: Change<'_>) -> block_io::Result<u64> {
        let _c = self.enter();
        let t0 = Instant::now();
        let gate = self.gate.read();
        // Write-through repeats the change on the destination: overlapping guest changes
        // then take their blocks exclusively, so both disks see them in one order.
        let through = gate
            .tracker
            .as_ref()
            .is_some_and(|t| t.through.load(Ordering::Acquire));
        let _range = gate.tracker.as_ref().map(|_| {
            if through {
                self.lock.lock_exclusive(offset, len)
            } else {
                self.lock.lock_shared(offset, len)
            }
        });
        let waited = t0.elapsed().as_nanos();
        self.max_wait_ns
            .fetch_max(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::AcqRel);
        let gen = self.generation.load(Ordering::Acquire);
        let dev = &*gate.side;
        // Raw guest memory may change under us: when the bytes may go to both disks, take
        // one copy of them so both get the same.
        let bounced: Option<Vec<u8>> = match &change {
            Change::Raw(bufs) if through => Some(gather(bufs)?),
            _ => None,
        };
        let r = match (&change, &bounced) {
            (_, Some(b)) => dev.write_at(b, offset),
            (Change::Write(b), None) => dev.write_at(b, offset),
            (Change::Vectored(v), None) => dev.write_vectored_at(v, offset),
            // SAFETY: the caller of `write_raw_at` vouched for the buffers for this call.
            (Change::Raw(bufs), None) => unsafe { dev.write_raw_at(bufs, offset) },
            (Change::Zeroes(unmap), None) => dev.write_zeroes(offset, len, *unmap),
            (Change::Discard, None) => dev.discard(offset, len),
        };
        if let Some(t) = &gate.tracker {
            // Even a failed change may have changed part of the range: never skip the mark.
            let what = match (&change, &bounced, r.is_ok()) {
                (_, _, false) => Applied::Failed,
                (_, Some(b), true) => Applied::Bytes(b),
                (Change::Write(b), None, true) => Applied::Bytes(b),
                (Change::Vectored(v), None, true) => Applied::Vectored(v),
                (Change::Raw(_), None, true) => Applied::Failed,
                (Change::Zeroes(unmap), None, true) => Applied::Zeroes(*unmap),
                (Change::Discard, None, true) => Applied::Discarded,
            };
            let discard = matches!(change, Change::Discard);
            t.after_guest(dev, offset, len, what, through, discard);
        }
        // A mirror's throttle: the change is done; its caller waits, holding no lock, while
        // the job's backlog is above its bound.
        let throttled = gate
            .tracker
            .as_ref()
            .filter(|t| t.throttle.is_some())
            .cloned();
        drop(_range);
        drop(gate);
        if let Some(t) = throttled {
            crate::mirror::throttle_guest(&t);
        }
        r.map(|()| gen)
    }

    /// Attaches a job's tracker; returns the source the job copies. Guest changes in flight
    /// finish first, so every change after this returns is tracked.
    pub(crate) fn attach(&self, tracker: Arc<Tracker>) -> Result<Arc<dyn BlockDevice>, JobError> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(JobError::Busy);
        }
        let mut gate = self.gate.write();
        gate.tracker = Some(tracker);
        Ok(gate.side.clone())
    }

    /// Moves guest I/O to `to` with the job staying attached (a mirror switching the guest to
    /// the device that combines both hosts): closes the gate (guest changes in flight drain
    /// on the old device, new ones wait and then go to `to`) and the device lock (reads in
    /// flight drain), runs `during` with both closed, swaps, and advances the generation.
    /// Returns how long guest I/O was paused.
    pub(crate) fn switch_attached(
        &self,
        to: Arc<dyn BlockDevice>,
        during: impl FnOnce(),
    ) -> Duration {
        let t0 = Instant::now();
        let mut gate = self.gate.write();
        let mut side = self.side.write();
        during();
        let old = std::mem::replace(&mut gate.side, to.clone());
        *side = to;
        self.retired.lock().push(old);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(side);
        drop(gate);
        t0.elapsed()
    }

    /// Detaches `tracker` without a pivot (cancel, failure), if it is still the one attached.
    pub(crate) fn detach(&self, tracker: &Arc<Tracker>) {
        let mut gate = self.gate.write();
        if gate
            .tracker
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, tracker))
        {
            gate.tracker = None;
            self.busy.store(false, Ordering::Release);
        }
    }

    /// The pivot: closes the gate (new guest changes wait, those in flight drain), runs
    /// `finish` (copy what is left, flush the destination), then, if it succeeded, switches
    /// the guest to the destination when `switch` is set, detaches the tracker and bumps the
    /// generation; finally opens the gate. Returns how long the gate was closed.
    pub(crate) fn pivot<E>(
        &self,
        switch: bool,
        finish: impl FnOnce() -> Result<(), E>,
    ) -> (Duration, Result<(), E>) {
        let t0 = Instant::now();
        let mut gate = self.gate.write();
        let r = finish();
        if r.is_ok() {
            if let Some(t) = gate.tracker.take() {
                if switch {
                    let to = t.switch_to.clone().unwrap_or_else(|| t.dest.clone());
                    let old = std::mem::replace(&mut gate.side, to.clone());
                    *self.side.write() = to;
                    self.retired.lock().push(old);
                }
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.busy.store(false, Ordering::Release);
        }
        drop(gate);
        (t0.elapsed(), r)
    }
}

/// A guest read's hold (see [`LiveDisk::read_lock`]).
enum ReadLock<'a> {
    /// Counted as a read without a lock.
    Counted(&'a LiveDisk),
    /// Holding its blocks shared (released on drop).
    Held(#[allow(dead_code)] block_io::RangeGuard<'a>),
}

impl Drop for ReadLock<'_> {
    fn drop(&mut self) {
        if let ReadLock::Counted(d) = self {
            d.unlocked_reads.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Copies the concatenation of `bufs` into a vector.
fn gather(bufs: &[RawBuf]) -> block_io::Result<Vec<u8>> {
    let total = usize::try_from(block_io::raw_total(bufs)?).map_err(|_| {
        block_io::Error::new(block_io::ErrorKind::InvalidInput, "request too large")
    })?;
    let mut out = vec![0u8; total];
    let mut at = 0usize;
    for b in bufs {
        // SAFETY: the caller of `write_raw_at` guarantees each buffer is valid for reads of
        // `len` bytes during the call; `out[at..at + len]` is in bounds (the lengths sum to
        // `total`) and is our own memory, so the two cannot overlap. No reference to the
        // caller's memory is formed.
        unsafe { std::ptr::copy_nonoverlapping(b.ptr, out.as_mut_ptr().add(at), b.len) };
        at += b.len;
    }
    Ok(out)
}

impl BlockDevice for LiveDisk {
    fn info(&self) -> DiskInfo {
        self.current().info()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        let _c = self.enter();
        let _r = self.read_lock(offset, buf.len() as u64);
        self.reading(|d| d.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.write_at_gen(buf, offset).map(drop)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> block_io::Result<()> {
        let _c = self.enter();
        let _r = self.read_lock(offset, bufs.iter().map(|b| b.len() as u64).sum());
        self.reading(|d| d.read_vectored_at(bufs, offset))
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> block_io::Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.change(offset, len, Change::Vectored(bufs)).map(drop)
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> block_io::Result<()> {
        let _c = self.enter();
        let _r = self.read_lock(offset, block_io::raw_total(bufs)?);
        // SAFETY: forwarded caller contract (buffers valid for writes).
        self.reading(|d| unsafe { d.read_raw_at(bufs, offset) })
    }

    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> block_io::Result<()> {
        let len = block_io::raw_total(bufs)?;
        self.change(offset, len, Change::Raw(bufs)).map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.write_zeroes_gen(offset, len, unmap).map(drop)
    }

    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.discard_gen(offset, len).map(drop)
    }

    fn flush(&self) -> block_io::Result<()> {
        let _c = self.enter();
        // Under the device lock: a resize must know no flush runs on the device it changes.
        self.reading(|d| d.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<StatusRun> {
        self.current().block_status(offset, len)
    }

    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        let _c = self.enter();
        let _r = self.read_lock(offset, buf.len() as u64);
        self.reading(|d| d.read_data_at(buf, offset))
    }

    /// Reads map through to the current device (devices switched away from stay open as
    /// long as this disk, so the extents stay valid); writes never map, so that every write
    /// is seen by the job.
    fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Mapping>,
    ) -> block_io::Result<bool> {
        if write || self.reads_locked.load(Ordering::SeqCst) {
            block_io::check_request(&self.info(), offset, len, write)?;
            return Ok(false);
        }
        self.current().map(offset, len, false, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_io::{MemStorage, RawDisk, Storage};

    /// Steps that stop the guest while they run (they hold the device lock), for 2 s with
    /// `pace`: the share of the time the steps took after the first half second, and the
    /// guest's reads in all.
    fn run_steps(pace: Pace) -> (f64, u64) {
        let mem = MemStorage::new();
        mem.set_len(1 << 20).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(mem).unwrap());
        let live = LiveDisk::new(dev);
        let stop = Arc::new(AtomicBool::new(false));
        let guest = {
            let (live, stop) = (live.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    live.read_at(&mut b, 0).unwrap();
                    n += 1;
                }
                n
            })
        };
        // The feedback has half a second to settle; then the steps' share is counted.
        let (t0, mut stepping) = (Instant::now(), Duration::ZERO);
        let settled = Duration::from_millis(500);
        while t0.elapsed() < Duration::from_millis(2000) {
            live.paced_step(pace, || {
                let t = Instant::now();
                let _stopped = live.side.write();
                std::thread::sleep(Duration::from_millis(2));
                if t0.elapsed() > settled {
                    stepping += t.elapsed();
                }
            });
        }
        let wall = t0.elapsed() - settled;
        stop.store(true, Ordering::Release);
        let reads = guest.join().unwrap();
        (stepping.as_secs_f64() / wall.as_secs_f64(), reads)
    }

    #[test]
    fn guest_share_lowers_the_duty_until_the_guest_keeps_its_share() {
        // A fixed duty of 50%: the steps take about half the time.
        let (fixed, fixed_reads) = run_steps(Pace {
            max_duty: 50,
            share: 0,
        });
        // The guest stops during every step: keeping 85% of its rate takes a duty of at
        // most 15%.
        let (fed, fed_reads) = run_steps(Pace {
            max_duty: 50,
            share: 85,
        });
        assert!(
            fixed > 0.33,
            "a fixed duty of 50% took {fixed:.2} of the time"
        );
        assert!(
            fed < 0.22,
            "the feedback left the steps {fed:.2} of the time"
        );
        assert!(
            fed_reads > fixed_reads,
            "the guest read no more with the feedback: {fed_reads} against {fixed_reads}"
        );
    }
}
