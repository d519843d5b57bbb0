//! The task side of a job, the same for every kind: starting one ([`spawn`]: its [`Shared`]
//! state, the rate limit, the driver spawned with a guard that detaches it however it ends)
//! and what a driver asks its handle while it runs ([`Steering`]: pause, cancel, rate
//! tokens, chunks reaped).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::RateLimiter;
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};

use crate::error::{JobError, JobResult};
use crate::handle::{Control, JobHandle, Phase, Shared};
use crate::job::JobKind;
use crate::live::{LiveDisk, Tracker};

/// What one chunk of a copy did: bytes handled, and the bytes it had claimed in flight.
pub(crate) type ChunkResult = Result<(u64, u64), JobError>;

/// How a job starts: its kind, chunk and granule sizes, first phase and rate limit.
pub(crate) struct Spec {
    pub(crate) kind: JobKind,
    pub(crate) chunk: u64,
    pub(crate) gran: u64,
    pub(crate) phase: Phase,
    /// Bytes per second (0: unlimited).
    pub(crate) rate: u64,
}

/// What a job undoes on `live` when its task ends, before the result is out (a caller that
/// saw the result may start another job): at least detaching its tracker.
pub(crate) type Release = fn(&LiveDisk, &Shared);

/// The usual [`Release`]: detach the tracker (a no-op when the pivot already did).
pub(crate) fn detach(live: &LiveDisk, shared: &Shared) {
    live.detach(&shared.tracker);
}

/// Starts a job whose `tracker` the caller attached to `live`: makes its shared state,
/// sets its rate, resets the guest-wait maximum and spawns on `rt` the driver that `driver`
/// makes from its [`Steering`]. When the driver ends (or the runtime drops it: the result
/// is then [`JobError::Aborted`]) `release` runs, then the result is published.
pub(crate) fn spawn<F>(
    rt: &tokio::runtime::Handle,
    live: &Arc<LiveDisk>,
    tracker: Arc<Tracker>,
    spec: Spec,
    release: Release,
    driver: impl FnOnce(Steering) -> F,
) -> JobHandle
where
    F: Future<Output = JobResult> + Send + 'static,
{
    let (ctl, ctl_rx) = watch::channel(Control::default());
    let (done_tx, done_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        kind: spec.kind,
        ctl,
        cancelled: AtomicBool::new(false),
        limiter: RateLimiter::new(0, 1),
        chunk: spec.chunk,
        gran: spec.gran,
        phase: AtomicU8::new(spec.phase as u8),
        start: Instant::now(),
        paused_ns: AtomicU64::new(0),
        done: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        tracker,
        result: Mutex::new(None),
        finished: AtomicBool::new(false),
        done_cv: Condvar::new(),
        done_tx,
    });
    shared
        .limiter
        .set_rate(spec.rate, shared.chunk_for(spec.rate).max(1));
    live.reset_max_wait();
    let run = driver(Steering {
        shared: shared.clone(),
        ctl: ctl_rx,
    });
    let guard = Guard {
        shared: shared.clone(),
        live: live.clone(),
        release,
    };
    rt.spawn(async move {
        let r = run.await;
        (guard.release)(&guard.live, &guard.shared);
        guard.shared.finish(r);
        drop(guard);
    });
    JobHandle { shared, done_rx }
}

/// Releases the job and reports [`JobError::Aborted`] if its task is dropped before it
/// finished (the runtime shut down).
struct Guard {
    shared: Arc<Shared>,
    live: Arc<LiveDisk>,
    release: Release,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.shared.finished.load(Ordering::Acquire) {
            (self.release)(&self.live, &self.shared);
            self.shared.finish(Err(JobError::Aborted));
        }
    }
}

/// What a driver holds to follow its [`JobHandle`]: the shared state and the control
/// channel (pause, cancel, rate changes).
pub(crate) struct Steering {
    pub(crate) shared: Arc<Shared>,
    ctl: watch::Receiver<Control>,
}

impl Steering {
    /// Pause and cancel as they are now.
    pub(crate) fn now(&mut self) -> Control {
        *self.ctl.borrow_and_update()
    }

    /// Takes `bytes` tokens from the limiter; false if the job was paused or cancelled
    /// meanwhile.
    pub(crate) async fn tokens(&mut self, bytes: u64) -> bool {
        loop {
            let c = self.now();
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

    /// Waits while paused (in phase [`Phase::Paused`], the time counted), until resumed or
    /// cancelled.
    pub(crate) async fn paused(&mut self) {
        let before = self.shared.phase();
        self.shared.set_phase(Phase::Paused);
        let t = Instant::now();
        loop {
            let c = self.now();
            if !c.paused || c.cancelled {
                break;
            }
            if self.ctl.changed().await.is_err() {
                break;
            }
        }
        self.paused_for(t);
        self.shared.set_phase(before);
    }

    /// Returns at once unless paused (then waits for resume or cancel); errs when cancelled.
    pub(crate) async fn checkpoint(&mut self) -> Result<(), JobError> {
        loop {
            let c = self.now();
            if c.cancelled {
                return Err(JobError::Cancelled);
            }
            if !c.paused {
                return Ok(());
            }
            let before = self.shared.phase();
            self.shared.set_phase(Phase::Paused);
            let t = Instant::now();
            let closed = self.ctl.changed().await.is_err();
            self.paused_for(t);
            self.shared.set_phase(before);
            if closed {
                return Err(JobError::Aborted);
            }
        }
    }

    fn paused_for(&self, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.paused_ns.fetch_add(ns, Ordering::AcqRel);
    }

    /// Counts a finished chunk: its claim leaves `in_flight`, what it handled joins `done`.
    fn reaped(&self, r: Result<ChunkResult, JoinError>) -> Result<(), JobError> {
        let (n, claimed) = r.map_err(|_| JobError::Aborted)??;
        self.shared.in_flight.fetch_sub(claimed, Ordering::AcqRel);
        self.shared.done.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// [`reaped`](Self::reaped); on an error, first waits for the other chunks in flight, so
    /// that none still writes the destination or holds a range lock when the job ends.
    pub(crate) async fn reap_or_drain(
        &self,
        r: Result<ChunkResult, JoinError>,
        set: &mut JoinSet<ChunkResult>,
    ) -> Result<(), JobError> {
        let e = match self.reaped(r) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let _ = self.drain(set).await;
        Err(e)
    }

    /// Reaps the chunks that have ended (as [`reap_or_drain`](Self::reap_or_drain)).
    pub(crate) async fn reap_ended(&self, set: &mut JoinSet<ChunkResult>) -> Result<(), JobError> {
        while let Some(r) = set.try_join_next() {
            self.reap_or_drain(r, set).await?;
        }
        Ok(())
    }

    /// With `parallel` (at least one) chunks in flight, waits for one to end and reaps it,
    /// then returns true; false at once when there is room for another.
    pub(crate) async fn wait_room(
        &self,
        set: &mut JoinSet<ChunkResult>,
        parallel: usize,
    ) -> Result<bool, JobError> {
        if set.len() < parallel.max(1) {
            return Ok(false);
        }
        if let Some(r) = set.join_next().await {
            self.reap_or_drain(r, set).await?;
        }
        Ok(true)
    }

    /// Waits for every chunk in flight; the first error, if any.
    pub(crate) async fn drain(&self, set: &mut JoinSet<ChunkResult>) -> Result<(), JobError> {
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            if let Err(e) = self.reaped(r) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
