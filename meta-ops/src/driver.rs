//! The driver task of a job: it claims dirty blocks a chunk at a time (clearing their bits),
//! takes tokens from the rate limiter, and hands each chunk to `spawn_blocking`, where the
//! chunk first lets guest requests already in flight finish (priority), then takes its blocks
//! exclusively in the range lock and copies them. Up to `parallel` chunks run at once. When a
//! pass over the range ends with little left dirty, the driver pivots; when more is left, it
//! first switches guest writes to write-through, so that the next pass only shrinks the dirty
//! set and the pivot's pause stays short.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::BlockStatus;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::copy::Copier;
use crate::error::{JobError, JobResult};
use crate::handle::{Control, JobReport, Phase, Shared};
use crate::job::{JobOptions, Pivot};
use crate::live::LiveDisk;

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
    pub(crate) ctl: watch::Receiver<Control>,
}

/// Write-through passes before the pivot copies whatever is still dirty.
const CONVERGE_PASSES: u32 = 2;

type ChunkResult = Result<(u64, u64), JobError>;

impl Driver {
    pub(crate) async fn run(mut self) -> JobResult {
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
                self.reap_or_drain(r, &mut set).await?;
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
                    self.reap_or_drain(r, &mut set).await?;
                }
                continue;
            }
            let max_bits =
                (self.shared.chunk_for(self.shared.limiter.rate()) / tracker.gran).max(1);
            let Some(first) = tracker.dirty.next_set(cursor) else {
                if let Some(r) = set.join_next().await {
                    self.reap_or_drain(r, &mut set).await?;
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

    /// [`reaped`](Self::reaped); on an error, first waits for the other chunks in flight, so
    /// that none still writes the destination or holds a range lock when the job ends.
    async fn reap_or_drain(
        &self,
        r: Result<ChunkResult, tokio::task::JoinError>,
        set: &mut JoinSet<ChunkResult>,
    ) -> Result<(), JobError> {
        let e = match self.reaped(r) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let _ = self.drain(set).await;
        Err(e)
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
        let hook = self.before_switch.clone();
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
/// anything, else those the source holds data in (and, for a merge, zeros in).
fn scan(copier: &Copier, shared: &Shared, dest_zeroed: bool) -> Result<(), JobError> {
    let t = &copier.tracker;
    if !dest_zeroed && !copier.merge {
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
        // A merge also carries zeros of the layers above the base down into it.
        if run.status == BlockStatus::Data || (copier.merge && run.status == BlockStatus::Zero) {
            if let Some((a, b)) = t.bits(pos, n) {
                t.dirty.set(a, b);
            }
        }
        pos += n;
    }
    Ok(())
}
