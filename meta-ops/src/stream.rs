//! The stream job: pull a remote base into its local replica while the guest runs on the
//! child (issue 15, "stream"), then make the chain local.
//!
//! ## The pieces
//!
//! - [`chain::cor::open_streaming`] opens a differencing child whose parent is remote (an
//!   HTTP/S3 object or an NBD export, `chain::remote`) over a copy-on-read parent
//!   ([`CopyOnRead`]): guest reads of data the host lacks fetch whole granules (one remote
//!   request per run of missing granules) and keep them in a local replica, recorded in a
//!   sidecar bitmap only once durable. Guest writes go to the child as always.
//! - [`JobRunner::start_stream`] runs the job on the [`LiveDisk`] the guest uses: it walks the
//!   base from the first missing granule to the last, asks the remote which ranges hold data
//!   (`block_status`: holes are recorded without a fetch), and fetches the rest, `parallel`
//!   chunks at once, each at most `chunk` bytes (rounded to whole granules; a fetch is one
//!   remote request).
//! - [`chain::cor::finish_streaming`] (re-exported as [`finish_stream`]), once the chain is
//!   closed: the replica takes the base's identity, the child's parent locator is repointed at
//!   it, the sidecar is deleted; a crash at any point leaves the child openable with its
//!   remote parent or with the local one (see the `chain::cor` module docs for the order).
//!
//! ## Guest I/O meanwhile
//!
//! The job never writes the child, so guest writes are not tracked (the job holds the
//! [`LiveDisk`] only to be its one job, to follow its priority rule and to report the
//! longest guest wait). Guest reads and the job meet in the copy-on-read device, which holds a
//! granule exclusively while fetching it: a guest read of a granule the job is fetching waits
//! for that fetch (one round trip) and reads the replica. Before each chunk the job lets the
//! guest requests already in flight finish (up to `yield_cap`) and takes the chunk's bytes
//! from the rate limiter ([`crate::JobHandle::set_rate`]); holes cost no tokens.
//!
//! ## Failures
//!
//! The remote clients retry and reconnect on their own (`block_io::remote`, NBD
//! `RetryPolicy`); the job retries a failed fetch [`FETCH_ATTEMPTS`] times with a growing
//! pause, then fails with [`JobError::Source`] naming the offset. Nothing is lost: what was
//! fetched stays fetched, the sidecar is written at the end whatever the result, and the
//! child opens with its remote parent as before; starting the job again continues.
//!
//! ## Report
//!
//! `bytes` counts the base's bytes handled, `buffered_bytes` those fetched, `skipped_bytes`
//! the holes recorded without a fetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, BlockStatus};
pub use chain::cor::{
    default_replica, finish_streaming as finish_stream, open_streaming, sidecar_path, CopyOnRead,
    CorStats, Finished, StreamError, StreamOptions, Streaming,
};
use tokio::task::JoinSet;

use crate::error::{JobError, JobResult};
use crate::handle::{JobHandle, JobReport, Phase, Shared};
use crate::job::{JobKind, JobOptions, JobRunner};
use crate::live::{LiveDisk, Tracker};
use crate::task::{self, Spec, Steering};

/// How many times the job tries one fetch before failing.
pub const FETCH_ATTEMPTS: u32 = 4;

/// How often the job records the fetched granules in the sidecar while it runs.
const PERSIST_EVERY: Duration = Duration::from_secs(2);

impl JobRunner {
    /// Starts the stream job for `cor`, the copy-on-read parent of the chain the guest uses
    /// through `live` (see the module docs). `opts`: `rate`, `chunk` (bytes per fetch,
    /// rounded to whole granules, at least one), `parallel` (fetches in flight) and
    /// `yield_cap` apply; `granularity` is the device's granule. Fails with
    /// [`JobError::Busy`] if a job already runs on `live`.
    pub fn start_stream(
        &self,
        live: &Arc<LiveDisk>,
        cor: Arc<CopyOnRead>,
        opts: JobOptions,
    ) -> Result<JobHandle, JobError> {
        let gran = cor.granule();
        let size = cor.info().virtual_size;
        let dest: Arc<dyn BlockDevice> = cor.clone();
        let mut tracker = Tracker::new(dest, 0, size, 0, gran);
        // The job writes nothing the guest reads from: guest changes need no tracking.
        tracker.ignore_guest = true;
        let tracker = Arc::new(tracker);
        // The bits still to fetch: the progress's "left".
        for g in 0..cor.granules() {
            if !cor.is_fetched(g) {
                tracker.dirty.set(g, g + 1);
            }
        }
        live.attach(tracker.clone())?;
        let chunk = opts.chunk.max(gran);
        let job = Spec {
            kind: JobKind::Stream,
            chunk: chunk - chunk % gran,
            gran,
            phase: Phase::Copying,
            rate: opts.rate,
        };
        let rt = self.runtime();
        Ok(task::spawn(rt, live, tracker, job, task::detach, |ctl| {
            Stream {
                shared: ctl.shared.clone(),
                live: live.clone(),
                cor,
                ctl,
                parallel: opts.parallel.max(1),
                yield_cap: opts.yield_cap,
                yields: Arc::new(AtomicU64::new(0)),
                fetched: Arc::new(AtomicU64::new(0)),
                skipped: 0,
            }
            .run()
        }))
    }
}

/// The driver task of a stream job.
struct Stream {
    shared: Arc<Shared>,
    live: Arc<LiveDisk>,
    cor: Arc<CopyOnRead>,
    ctl: Steering,
    parallel: usize,
    yield_cap: Duration,
    yields: Arc<AtomicU64>,
    fetched: Arc<AtomicU64>,
    skipped: u64,
}

/// Fetches `[off, off+len)` into the replica, retrying; the error names the offset.
fn fetch_with_retries(cor: &CopyOnRead, off: u64, len: u64) -> Result<u64, JobError> {
    let mut attempt = 0;
    loop {
        match cor.fetch(off, len) {
            Ok(n) => return Ok(n),
            Err(source) => {
                attempt += 1;
                // A corrupt or changed remote does not get better by asking again.
                let permanent = matches!(
                    source.kind(),
                    block_io::ErrorKind::Corrupt | block_io::ErrorKind::OutOfRange
                );
                if attempt >= FETCH_ATTEMPTS || permanent {
                    return Err(JobError::Source {
                        offset: off,
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(250 << attempt));
            }
        }
    }
}

impl Stream {
    async fn run(mut self) -> JobResult {
        let r = self.main().await;
        // Whatever the result: record what was fetched.
        let cor = self.cor.clone();
        let p = tokio::task::spawn_blocking(move || cor.persist())
            .await
            .map_err(|_| JobError::Aborted)?;
        let report = r?;
        p.map_err(|source| JobError::Destination {
            op: "flush",
            offset: 0,
            source,
        })?;
        Ok(report)
    }

    async fn main(&mut self) -> JobResult {
        let t0 = Instant::now();
        let gran = self.shared.gran;
        let size = self.cor.info().virtual_size;
        let mut tasks: JoinSet<Result<(), JobError>> = JoinSet::new();
        let mut g = 0u64;
        let mut last_persist = Instant::now();
        loop {
            if let Err(e) = self.ctl.checkpoint().await {
                drain(&mut tasks).await;
                return Err(e);
            }
            // Keep at most `parallel` fetches in flight; the first error ends the job.
            while tasks.len() >= self.parallel {
                if let Some(r) = tasks.join_next().await {
                    if let Err(e) = flatten(r) {
                        drain(&mut tasks).await;
                        return Err(e);
                    }
                }
            }
            if last_persist.elapsed() >= PERSIST_EVERY {
                last_persist = Instant::now();
                let cor = self.cor.clone();
                tokio::task::spawn_blocking(move || cor.persist())
                    .await
                    .map_err(|_| JobError::Aborted)?
                    .map_err(|source| JobError::Destination {
                        op: "flush",
                        offset: 0,
                        source,
                    })?;
            }
            let Some(next) = self.cor.next_missing(g) else {
                self.shared.tracker.dirty.take(g, self.cor.granules());
                break;
            };
            // Granules guest reads fetched meanwhile are no longer left to do.
            self.shared.tracker.dirty.take(g, next);
            let off = next * gran;
            let chunk = self.shared.chunk_for(self.shared.limiter.rate());
            let want = chunk.max(gran).min(size - off);
            // Where the remote holds data. A status that fails is taken as data: fetching
            // reads what is there either way.
            let cor = self.cor.clone();
            let st = tokio::task::spawn_blocking(move || cor.remote().block_status(off, want))
                .await
                .map_err(|_| JobError::Aborted)?;
            let (hole, run) = match st {
                Ok(r) if r.len > 0 => (r.status != BlockStatus::Data, r.len.min(want)),
                _ => (false, want),
            };
            if hole {
                // The whole granules inside the hole (a last partial one at the disk's end
                // counts as whole).
                let run_end = off + run;
                let g1 = if run_end >= size {
                    size.div_ceil(gran)
                } else {
                    run_end / gran
                };
                if g1 > next {
                    self.cor.mark_zero(off, run);
                    self.shared.tracker.dirty.take(next, g1);
                    let bytes = (g1 * gran).min(size) - off;
                    self.skipped += bytes;
                    self.shared.done.fetch_add(bytes, Ordering::AcqRel);
                    g = g1;
                    continue;
                }
                // A hole smaller than the granule: fetch the granule.
            }
            // Whole granules, at least one.
            let end = (off + run.max(1)).div_ceil(gran).max(next + 1);
            let (a, b) = (off, (end * gran).min(size));
            if !self.ctl.tokens(b - a).await {
                continue;
            }
            self.shared.tracker.dirty.take(next, end);
            self.shared.in_flight.fetch_add(b - a, Ordering::AcqRel);
            let (cor, live, shared) = (self.cor.clone(), self.live.clone(), self.shared.clone());
            let (yields, fetched, cap) =
                (self.yields.clone(), self.fetched.clone(), self.yield_cap);
            tasks.spawn_blocking(move || {
                live.yield_to_guests(cap, &yields);
                let r = fetch_with_retries(&cor, a, b - a);
                shared.in_flight.fetch_sub(b - a, Ordering::AcqRel);
                let n = r?;
                fetched.fetch_add(n, Ordering::AcqRel);
                shared.done.fetch_add(b - a, Ordering::AcqRel);
                Ok(())
            });
            g = end;
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = flatten(r) {
                drain(&mut tasks).await;
                return Err(e);
            }
        }
        // Granules a failed-then-retried or concurrent path left behind (none expected).
        if let Some(g) = self.cor.next_missing(0) {
            return Err(JobError::Invalid(format!(
                "granule {g} of the base is still missing after the pass"
            )));
        }
        Ok(JobReport {
            buffered_bytes: self.fetched.load(Ordering::Acquire),
            skipped_bytes: self.skipped,
            yields: self.yields.load(Ordering::Relaxed),
            ..JobReport::base(&self.shared, &self.live, t0)
        })
    }
}

fn flatten(r: Result<Result<(), JobError>, tokio::task::JoinError>) -> Result<(), JobError> {
    r.map_err(|_| JobError::Aborted)?
}

/// Waits for the fetches in flight (they cannot be stopped midway; each leaves the replica
/// and the bits consistent).
async fn drain(tasks: &mut JoinSet<Result<(), JobError>>) {
    while tasks.join_next().await.is_some() {}
}
