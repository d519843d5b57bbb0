//! Following and steering a job: [`JobHandle`], [`Progress`], [`Phase`], and what a
//! completed job returns, [`JobReport`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::RateLimiter;
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::error::{JobError, JobResult};
use crate::job::JobKind;
use crate::live::{LiveDisk, Tracker};

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
    /// Cancelled; the guest stays on its disk, which reads as it did.
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
    /// The disk's generation after the pivot ([`LiveDisk::generation`](crate::LiveDisk::generation)).
    pub generation: u64,
}

impl JobReport {
    /// The report of a job that copies nothing through the copier (stream, compact) and
    /// started at `t0`: its bytes, one pass, the time, the guest's longest wait and the
    /// generation; the caller fills in the rest.
    pub(crate) fn base(shared: &Shared, live: &LiveDisk, t0: Instant) -> JobReport {
        JobReport {
            kind: shared.kind,
            bytes: shared.done.load(Ordering::Acquire),
            copy_file_range_bytes: 0,
            buffered_bytes: 0,
            zeroed_bytes: 0,
            skipped_bytes: 0,
            blocks_dirtied: 0,
            written_through: 0,
            passes: 1,
            yields: 0,
            duration: t0.elapsed(),
            pivot_pause: Duration::ZERO,
            max_guest_wait: live.guest_stats().max_wait,
            generation: live.generation(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Control {
    pub(crate) paused: bool,
    pub(crate) cancelled: bool,
}

/// State shared by a job's driver and its handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) kind: JobKind,
    pub(crate) ctl: watch::Sender<Control>,
    pub(crate) cancelled: AtomicBool,
    pub(crate) limiter: RateLimiter,
    pub(crate) chunk: u64,
    pub(crate) gran: u64,
    pub(crate) phase: AtomicU8,
    pub(crate) start: Instant,
    pub(crate) paused_ns: AtomicU64,
    pub(crate) done: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) result: Mutex<Option<JobResult>>,
    pub(crate) finished: AtomicBool,
    pub(crate) done_cv: Condvar,
    pub(crate) done_tx: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Bytes per chunk at `rate`: about an eighth of a second's worth, so the throttle is
    /// smooth, within `[granularity, chunk]`.
    pub(crate) fn chunk_for(&self, rate: u64) -> u64 {
        let want = if rate == 0 { self.chunk } else { rate / 8 };
        let c = want.clamp(self.gran, self.chunk.max(self.gran));
        c - c % self.gran
    }

    pub(crate) fn finish(&self, r: JobResult) {
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

/// Follows and steers a running job. Dropping it does not stop the job.
#[derive(Debug)]
pub struct JobHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) done_rx: watch::Receiver<bool>,
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
    /// [`JobError::Cancelled`]. The guest's disk reads as it did: copy and convert never
    /// write it, a commit writes its base only where the layers above hide it.
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
