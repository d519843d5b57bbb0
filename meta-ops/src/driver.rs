//! The driver task of a job: it claims dirty blocks a chunk at a time (clearing their bits),
//! takes tokens from the rate limiter, and hands each chunk to `spawn_blocking`, where the
//! chunk first lets guest requests already in flight finish (priority), then takes its blocks
//! exclusively in the range lock and copies them. Up to `parallel` chunks run at once. When a
//! pass over the range ends with little left dirty, the driver pivots; when more is left, it
//! first switches guest writes to write-through, so that the next pass only shrinks the dirty
//! set and the pivot's pause stays short.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use block_io::BlockStatus;
use tokio::task::JoinSet;

use crate::copy::Copier;
use crate::error::{JobError, JobResult};
use crate::handle::{Phase, Shared};
use crate::job::{JobOptions, Pivot};
use crate::live::LiveDisk;
use crate::task::{ChunkResult, Steering};

/// The driver task of one job.
pub(crate) struct Driver {
    pub(crate) shared: Arc<Shared>,
    pub(crate) copier: Arc<Copier>,
    pub(crate) live: Arc<LiveDisk>,
    pub(crate) pivot: Pivot,
    /// What happens after the pivot to a commit's merged layers.
    pub(crate) retire: Vec<crate::commit::Post>,
    /// Run inside the pivot, after the flush, before the guest moves.
    pub(crate) before_switch: Option<crate::commit::Hook>,
    pub(crate) opts: JobOptions,
    pub(crate) ctl: Steering,
}

/// Most flushes of the destination before the pivot's pause (see [`Driver::finish`]).
const PRE_FLUSHES: u32 = 4;

/// A destination flush this quick ends the flushes before the pivot's pause.
const QUICK_FLUSH: std::time::Duration = std::time::Duration::from_millis(20);

/// Write-through passes before the pivot copies whatever is still dirty.
const CONVERGE_PASSES: u32 = 2;

impl Driver {
    /// Runs the job; [`task::spawn`](crate::task::spawn) detaches it when it ends.
    pub(crate) async fn run(mut self) -> JobResult {
        let t0 = Instant::now();
        let tracker = self.shared.tracker.clone();
        let (copier, shared) = (self.copier.clone(), self.shared.clone());
        let dest_zeroed = self.copier.dest_zeroed;
        tokio::task::spawn_blocking(move || scan(&copier, &shared, dest_zeroed))
            .await
            .map_err(|_| JobError::Aborted)??;
        self.shared.set_phase(Phase::Copying);
        if self.opts.background_passes == 0 {
            // Write-through from the start: a guest write to a block already copied goes
            // to both disks, so the first pass leaves (almost) nothing to copy again.
            tracker.through.store(true, Ordering::Release);
        }
        let mut set: JoinSet<ChunkResult> = JoinSet::new();
        let mut cursor = 0u64;
        let mut passes = 1u32;
        loop {
            self.ctl.reap_ended(&mut set).await?;
            let c = self.ctl.now();
            if c.cancelled {
                self.ctl.drain(&mut set).await?;
                return Err(JobError::Cancelled);
            }
            if c.paused {
                self.ctl.drain(&mut set).await?;
                self.ctl.paused().await;
                continue;
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
            cursor = copy_chunk(&mut self.ctl, &self.copier, &mut set, first, max_bits).await;
        }
        self.finish(t0, passes).await
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
        let hook = self.before_switch.clone();
        let pause = tokio::task::spawn_blocking(move || {
            // Most of the flush outside the pause: flushes while guest writes go on (through
            // to the destination, too) until one is quick, so that the flush inside the
            // pause finds little to write.
            for _ in 0..PRE_FLUSHES {
                let t = Instant::now();
                dest.flush().map_err(|source| JobError::Destination {
                    op: "flush",
                    offset: 0,
                    source,
                })?;
                if t.elapsed() < QUICK_FLUSH {
                    break;
                }
            }
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
                    if let Some(hook) = &hook {
                        hook()?;
                    }
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
        for post in std::mem::take(&mut self.retire) {
            tokio::task::spawn_blocking(move || post.run())
                .await
                .map_err(|_| JobError::Aborted)??;
        }
        Ok(self.copier.report(&self.shared, t0, passes, pause))
    }
}

/// Claims the dirty bits `[first, first + max_bits)` of the copier's tracker, takes their
/// bytes from the limiter and spawns their copy into `set`. Returns where the next claim
/// starts: after them, or `first` again when the job was paused or cancelled while waiting
/// for tokens (the bits are given back).
pub(crate) async fn copy_chunk(
    ctl: &mut Steering,
    copier: &Arc<Copier>,
    set: &mut JoinSet<ChunkResult>,
    first: u64,
    max_bits: u64,
) -> u64 {
    let tracker = &copier.tracker;
    let last = (first + max_bits).min(tracker.dirty.len());
    let runs = tracker.dirty.take(first, last);
    let bytes: u64 = runs
        .iter()
        .map(|&(a, b)| {
            let (x, y) = tracker.span(a, b);
            y - x
        })
        .sum();
    if !ctl.tokens(bytes).await {
        for &(a, b) in &runs {
            tracker.dirty.set(a, b);
        }
        return first;
    }
    ctl.shared.in_flight.fetch_add(bytes, Ordering::AcqRel);
    let copier = copier.clone();
    set.spawn_blocking(move || copier.chunk(&runs).map(|n| (n, bytes)));
    last
}

/// Marks the blocks the job must handle dirty: all of them when the destination may hold
/// anything, else those the source holds data in (and, for a merge, zeros in).
fn scan(copier: &Copier, shared: &Shared, dest_zeroed: bool) -> Result<(), JobError> {
    let merge = copier.merge;
    // A merge also carries zeros of the layers above the base down into it.
    mark_runs(copier, shared, !dest_zeroed && !merge, |s| {
        s == BlockStatus::Data || (merge && s == BlockStatus::Zero)
    })
}

/// The scan of every copying job: marks all of the tracker's blocks dirty when `all`, else
/// those in source runs whose status `wanted` picks (stopping early on a cancel).
pub(crate) fn mark_runs(
    copier: &Copier,
    shared: &Shared,
    all: bool,
    wanted: impl Fn(BlockStatus) -> bool,
) -> Result<(), JobError> {
    let t = &copier.tracker;
    if all {
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
        if wanted(run.status) {
            if let Some((a, b)) = t.bits(pos, n) {
                t.dirty.set(a, b);
            }
        }
        pos += n;
    }
    Ok(())
}
