//! The compact job: return unused space of a dynamic or differencing VHD or VHDX while the
//! guest keeps reading and writing it (Hyper-V's `Optimize-VHD` does it only offline or
//! read-only).
//!
//! ## What it does
//!
//! [`Job::compact`] takes a [`CompactTarget`] (the image, opened read-write through the
//! format crate: [`CompactTarget::open`], [`CompactTarget::vhd`], [`CompactTarget::vhdx`]),
//! [`crate::JobRunner::start`] runs it on a [`LiveDisk`] whose guest I/O goes to that image,
//! or to a chain whose top it is ([`open_chain_for_compact`]). The steps are those of the
//! format crates ([`vhd_format::compact`], [`vhdx_format::compact`]):
//! 1. **Reclaim** ([`Phase::Scanning`]): every block is checked, and one that holds nothing
//!    gives its space back (VHD: all zeros, or in a differencing image no sector present,
//!    becomes unallocated; VHDX: all zeros in a dynamic image becomes PAYLOAD_BLOCK_ZERO, a
//!    partially present block of a differencing image with no sector present NOT_PRESENT; a
//!    block that hides the parent never starts showing it).
//! 2. **Move** ([`Phase::Copying`]): the block lying highest in the file moves into the
//!    lowest hole below it, one block at a time, until none fits lower (a VHDX sector bitmap
//!    block too, with the whole chunk it serves held).
//! 3. **Truncate** ([`Phase::Pivoting`]): the file is cut after the last block.
//!
//! ## Guest I/O meanwhile
//!
//! While the job is attached, guest writes take their blocks shared in the disk's range lock
//! (as for every job) and so do guest reads ([`LiveDisk`] switches reads to locking when the
//! job starts, after the reads already running without a lock have finished; mapped reads
//! fall back to `read_at`). Each reclaim and each move holds its block exclusively: a guest
//! request to that block waits for one block check or move (a few MiB of I/O and, for a
//! move, a sync), every other block is served as usual. Before each step the job lets the
//! guest requests already in flight finish (priority, up to `yield_cap`) and takes the bytes
//! it reads from the rate limiter ([`crate::JobHandle::set_rate`]). Guest writes are not
//! tracked: the job never copies guest data elsewhere, it changes where a block lies while
//! nobody uses the block. Pausing stops between steps; cancelling leaves the image valid and
//! as compact as it got (nothing to undo: every step is complete on its own).
//!
//! A block allocated by a guest write while the job runs lands past the end of the file as
//! always and takes part in the moves once its allocation is durable; the truncation is
//! skipped when an allocation is in flight at that moment.
//!
//! ## Crash safety
//!
//! Every step leaves the file openable after a power cut at any write or sync (old or new
//! place of a block valid, a BAT entry never pointing at unwritten data, freed space reused
//! only after the change freeing it is durable): see the format modules for the order of
//! writes and syncs, and `tests/compact_crash.rs` for the sweep.
//!
//! ## Report
//!
//! The [`crate::JobReport`] of a compact job counts, in `bytes`, the bytes checked and moved;
//! `zeroed_bytes` are the bytes of reclaimed blocks, `buffered_bytes` those moved. What the
//! file lost is in [`CompactTarget::stats`].

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, FileStorage, LockMode, Storage};
use chain::{Disk, Format, Layer};
use parking_lot::Mutex;
use vhd_format::{VhdCompactor, VhdFile};
use vhdx_format::{VhdxCompactor, VhdxFile};

use crate::error::{JobError, JobResult};
use crate::handle::{JobHandle, JobReport, Phase, Shared};
use crate::job::{Job, JobKind, JobOptions};
use crate::live::{LiveDisk, Pace, Tracker};
use crate::task::{self, Spec, Steering};

/// A block move, whatever the format.
#[derive(Debug, Clone, Copy)]
struct Move {
    block: u64,
    /// A VHDX sector bitmap block (`block` is its chunk).
    sector_bitmap: bool,
    from: u64,
    to: u64,
    len: u64,
    /// The guest range `(offset, len)` held exclusively while it moves.
    range: (u64, u64),
}

/// The format's compaction steps.
trait Steps: Send + Sync {
    fn block_size(&self) -> u64;
    fn block_count(&self) -> u64;
    fn reclaim(&self, block: u64) -> block_io::Result<bool>;
    fn plan_move(&self) -> block_io::Result<Option<Move>>;
    fn move_block(&self, m: &Move) -> block_io::Result<bool>;
    fn truncate(&self) -> block_io::Result<u64>;
    fn file_len(&self) -> block_io::Result<u64>;
}

impl<S: Storage> Steps for VhdCompactor<S> {
    fn block_size(&self) -> u64 {
        VhdCompactor::block_size(self)
    }
    fn block_count(&self) -> u64 {
        VhdCompactor::block_count(self)
    }
    fn reclaim(&self, block: u64) -> block_io::Result<bool> {
        VhdCompactor::reclaim(self, block)
    }
    fn plan_move(&self) -> block_io::Result<Option<Move>> {
        let bs = VhdCompactor::block_size(self);
        let size = self.file().info().virtual_size;
        Ok(VhdCompactor::plan_move(self)?.map(|m| {
            let start = m.block.saturating_mul(bs).min(size);
            Move {
                block: m.block,
                sector_bitmap: false,
                from: m.from,
                to: m.to,
                len: m.len,
                range: (start, bs.min(size - start)),
            }
        }))
    }
    fn move_block(&self, m: &Move) -> block_io::Result<bool> {
        VhdCompactor::move_block(
            self,
            &vhd_format::compact::BlockMove {
                block: m.block,
                from: m.from,
                to: m.to,
                len: m.len,
            },
        )
    }
    fn truncate(&self) -> block_io::Result<u64> {
        VhdCompactor::truncate(self)
    }
    fn file_len(&self) -> block_io::Result<u64> {
        self.file().storage().len()
    }
}

impl<S: Storage> Steps for VhdxCompactor<S> {
    fn block_size(&self) -> u64 {
        VhdxCompactor::block_size(self)
    }
    fn block_count(&self) -> u64 {
        VhdxCompactor::block_count(self)
    }
    fn reclaim(&self, block: u64) -> block_io::Result<bool> {
        VhdxCompactor::reclaim(self, block)
    }
    fn plan_move(&self) -> block_io::Result<Option<Move>> {
        Ok(VhdxCompactor::plan_move(self)?.map(|m| Move {
            block: m.block,
            sector_bitmap: m.sector_bitmap,
            from: m.from,
            to: m.to,
            len: m.len,
            range: m.guest_range,
        }))
    }
    fn move_block(&self, m: &Move) -> block_io::Result<bool> {
        VhdxCompactor::move_block(
            self,
            &vhdx_format::compact::BlockMove {
                block: m.block,
                sector_bitmap: m.sector_bitmap,
                from: m.from,
                to: m.to,
                len: m.len,
                guest_range: m.range,
            },
        )
    }
    fn truncate(&self) -> block_io::Result<u64> {
        VhdxCompactor::truncate(self)
    }
    fn file_len(&self) -> block_io::Result<u64> {
        self.file().storage().len()
    }
}

/// What a compaction did to its image so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactStats {
    /// Blocks that gave their space back.
    pub reclaimed_blocks: u64,
    /// Blocks moved lower in the file.
    pub moved_blocks: u64,
    /// Bytes per block.
    pub block_size: u64,
    /// The file's length when the job started.
    pub len_before: u64,
    /// The file's length when the job ended (0 before).
    pub len_after: u64,
}

impl CompactStats {
    /// Bytes the file shrank by.
    pub fn freed(&self) -> u64 {
        self.len_before.saturating_sub(self.len_after)
    }
}

/// An image a compact job can work on: a dynamic or differencing VHD or VHDX opened
/// read-write, as the block device the guest (or the top of its chain) uses and as the
/// format's compaction steps.
pub struct CompactTarget {
    steps: Box<dyn Steps>,
    dev: Arc<dyn BlockDevice>,
    stats: Mutex<CompactStats>,
}

impl std::fmt::Debug for CompactTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactTarget")
            .field("info", &self.dev.info())
            .field("stats", &*self.stats.lock())
            .finish_non_exhaustive()
    }
}

fn prep(path: &Path) -> impl FnOnce(block_io::Error) -> JobError + '_ {
    move |source| JobError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(e: block_io::Error) -> JobError {
    JobError::Invalid(e.to_string())
}

impl CompactTarget {
    /// A VHD opened read-write (dynamic or differencing; `Invalid` otherwise).
    pub fn vhd<S: Storage + 'static>(file: Arc<VhdFile<S>>) -> Result<Arc<Self>, JobError> {
        let steps = VhdCompactor::new(file.clone()).map_err(invalid)?;
        Ok(Self::with(Box::new(steps), file))
    }

    /// A VHDX opened read-write (dynamic or differencing; `Invalid` otherwise). Starts its
    /// write session keeping its DataWriteGuid when none has started (see
    /// [`vhdx_format::compact`]).
    pub fn vhdx<S: Storage + 'static>(file: Arc<VhdxFile<S>>) -> Result<Arc<Self>, JobError> {
        let steps = VhdxCompactor::new(file.clone()).map_err(invalid)?;
        Ok(Self::with(Box::new(steps), file))
    }

    fn with(steps: Box<dyn Steps>, dev: Arc<dyn BlockDevice>) -> Arc<Self> {
        Arc::new(CompactTarget {
            stats: Mutex::new(CompactStats {
                block_size: steps.block_size(),
                ..CompactStats::default()
            }),
            steps,
            dev,
        })
    }

    /// Opens the image file at `path` read-write with image locks `lock` (QEMU's writer
    /// locks with [`LockMode::Auto`]), VHD or VHDX by content. Its parents are not opened:
    /// compaction never reads them.
    pub fn open(path: &Path, lock: LockMode) -> Result<Arc<Self>, JobError> {
        let storage = FileStorage::open(
            path,
            &block_io::OpenOptions::new().read_only(false).lock(lock),
        )
        .map_err(prep(path))?;
        if vhdx_format::probe(&storage) {
            let f = VhdxFile::open(storage, &vhdx_format::OpenOptions::new().read_only(false))
                .map_err(prep(path))?;
            Self::vhdx(Arc::new(f))
        } else if vhd_format::probe(&storage) {
            let f = VhdFile::open(storage, &vhd_format::OpenOptions::new().read_only(false))
                .map_err(prep(path))?;
            Self::vhd(Arc::new(f))
        } else {
            Err(JobError::Invalid(format!(
                "{} is neither a VHD nor a VHDX image",
                path.display()
            )))
        }
    }

    /// The image as a block device (a differencing one reads absent sectors as zeros: put
    /// it on top of its parents for a guest, see [`open_chain_for_compact`]).
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        self.dev.clone()
    }

    /// What the compaction did so far.
    pub fn stats(&self) -> CompactStats {
        *self.stats.lock()
    }

    /// Compacts the image at once, with no guest and no job (an image nobody else uses).
    pub fn compact_offline(&self) -> Result<CompactStats, JobError> {
        let err = |op: &'static str| {
            move |source| JobError::Destination {
                op,
                offset: 0,
                source,
            }
        };
        let s = &*self.steps;
        let before = s.file_len().map_err(err("compact"))?;
        self.stats.lock().len_before = before;
        for b in 0..s.block_count() {
            if s.reclaim(b).map_err(err("reclaim"))? {
                self.stats.lock().reclaimed_blocks += 1;
            }
        }
        while let Some(m) = s.plan_move().map_err(err("move"))? {
            if !s.move_block(&m).map_err(err("move"))? {
                break;
            }
            self.stats.lock().moved_blocks += 1;
        }
        s.truncate().map_err(err("truncate"))?;
        let after = s.file_len().map_err(err("compact"))?;
        let mut st = self.stats.lock();
        st.len_after = after;
        Ok(*st)
    }
}

/// Opens the chain at `path` for a guest while its top is compacted: the top read-write as
/// a [`CompactTarget`], its parents as [`Disk::open`] opens them with `opts` (which must be
/// writable). Returns the disk for the guest's [`LiveDisk`] and the target for
/// [`Job::compact`].
pub fn open_chain_for_compact(
    path: &Path,
    opts: &chain::OpenOptions,
) -> Result<(Arc<Disk>, Arc<CompactTarget>), JobError> {
    open_chain_for_compact_layer(path, opts, 0)
}

/// As [`open_chain_for_compact`], for the layer at `depth` (0 = the top, 1 = its parent, ...):
/// that layer is opened read-write (with `opts.lock`, so another user of it is refused) as
/// the target, and stays in the guest's chain below the top, which the guest keeps writing.
/// Compaction changes nothing a reader sees, so the layers above keep matching it (a VHDX
/// keeps its DataWriteGuid, a VHD its ids). Every other chain over that layer must be
/// closed: its handle would not see the blocks move.
pub fn open_chain_for_compact_layer(
    path: &Path,
    opts: &chain::OpenOptions,
    depth: usize,
) -> Result<(Arc<Disk>, Arc<CompactTarget>), JobError> {
    let chain_err = |e: chain::ChainError| JobError::Prepare {
        path: path.to_path_buf(),
        source: block_io::Error::with_source(e.kind(), "cannot open the chain", e),
    };
    if opts.read_only {
        return Err(JobError::Invalid(
            "a compaction needs a writable disk".into(),
        ));
    }
    // The chain resolves and checks the parents.
    let disk = Disk::open(path, opts).map_err(chain_err)?;
    let mut layers: Vec<Layer> = disk.layers().to_vec();
    drop(disk);
    if depth >= layers.len() {
        return Err(JobError::Invalid(format!(
            "the chain of {} has {} layer(s), none at depth {depth}",
            path.display(),
            layers.len()
        )));
    }
    let old = layers.remove(depth);
    let format = old.format;
    let (layer_path, identity, parent) = (old.path.clone(), old.identity, old.parent.clone());
    // The chain's own handle is closed (and unlocked) before the target opens the file.
    drop(old);
    if !matches!(format, Format::Vhd | Format::Vhdx) {
        return Err(JobError::Invalid(format!(
            "{} is not a VHD or VHDX image",
            layer_path.display()
        )));
    }
    let target = CompactTarget::open(&layer_path, opts.lock)?;
    layers.insert(
        depth,
        Layer {
            path: layer_path,
            format,
            dev: target.device(),
            identity,
            parent,
        },
    );
    let disk = Disk::from_layers(layers, opts.ignore_lineage).map_err(chain_err)?;
    Ok((Arc::new(disk), target))
}

impl Job {
    /// Compacts `target` (see the module docs). Start it on the [`LiveDisk`] the guest uses
    /// for the target's [`device`](CompactTarget::device), or for a chain whose top it is;
    /// the job changes no guest data, so there is no pivot: the guest stays where it is.
    pub fn compact(target: Arc<CompactTarget>) -> Job {
        let mut job = Job::with_kind(JobKind::Compact, target.device());
        job.compact = Some(target);
        job
    }
}

/// Starts a compact job (from [`crate::JobRunner::start`]).
pub(crate) fn start(
    rt: &tokio::runtime::Handle,
    live: &Arc<LiveDisk>,
    target: Arc<CompactTarget>,
    o: JobOptions,
) -> Result<JobHandle, JobError> {
    let size = target.dev.info().virtual_size;
    let guest = live.current().info();
    if guest.virtual_size != size {
        return Err(JobError::Invalid(format!(
            "the guest's disk ({} bytes) is not the image compacted ({size} bytes)",
            guest.virtual_size
        )));
    }
    let bs = target.steps.block_size().max(1);
    let mut tracker = Tracker::new(target.device(), 0, size, 0, bs);
    // Guest changes take their range locks but are not tracked: nothing is copied for them.
    tracker.ignore_guest = true;
    let tracker = Arc::new(tracker);
    live.attach(tracker.clone())?;
    let job = Spec {
        kind: JobKind::Compact,
        chunk: bs,
        gran: bs,
        phase: Phase::Scanning,
        rate: o.rate,
    };
    Ok(task::spawn(rt, live, tracker, job, release, |ctl| {
        Compaction {
            shared: ctl.shared.clone(),
            live: live.clone(),
            target,
            ctl,
            yield_cap: o.yield_cap,
            pace: Pace::of(&o),
            yields: Arc::new(AtomicU64::new(0)),
        }
        .run()
    }))
}

/// Puts guest reads back to lock-free and detaches the job when its task ends, however it
/// ends.
fn release(live: &LiveDisk, shared: &Shared) {
    live.lock_reads(false);
    live.detach(&shared.tracker);
}

/// The driver task of a compact job.
struct Compaction {
    shared: Arc<Shared>,
    live: Arc<LiveDisk>,
    target: Arc<CompactTarget>,
    ctl: Steering,
    yield_cap: Duration,
    pace: Pace,
    yields: Arc<AtomicU64>,
}

fn step_err(op: &'static str, offset: u64) -> impl FnOnce(block_io::Error) -> JobError {
    move |source| JobError::Destination { op, offset, source }
}

impl Compaction {
    async fn run(mut self) -> JobResult {
        let live = self.live.clone();
        tokio::task::spawn_blocking(move || live.lock_reads(true))
            .await
            .map_err(|_| JobError::Aborted)?;
        self.main().await
    }

    /// The guest range of block `block`.
    fn block_range(&self, block: u64) -> (u64, u64) {
        let bs = self.shared.gran;
        let size = self.target.dev.info().virtual_size;
        let start = block.saturating_mul(bs).min(size);
        (start, bs.min(size - start))
    }

    /// Runs `f` on the blocking pool with the guest range `(offset, len)` held exclusively,
    /// after the guest requests already in flight.
    async fn locked<T: Send + 'static>(
        &self,
        (offset, len): (u64, u64),
        f: impl FnOnce(&CompactTarget) -> T + Send + 'static,
    ) -> Result<T, JobError> {
        let (live, target, yields) = (self.live.clone(), self.target.clone(), self.yields.clone());
        let (cap, pace) = (self.yield_cap, self.pace);
        tokio::task::spawn_blocking(move || {
            live.yield_to_guests(cap, &yields);
            live.paced_step(pace, || {
                let _g = live.range_lock().lock_exclusive(offset, len);
                f(&target)
            })
        })
        .await
        .map_err(|_| JobError::Aborted)
    }

    async fn main(&mut self) -> JobResult {
        let t0 = Instant::now();
        let bs = self.shared.gran;
        let t = self.target.clone();
        let steps = &*t.steps;
        let before = steps.file_len().map_err(step_err("compact", 0))?;
        self.target.stats.lock().len_before = before;
        let tracker = self.shared.tracker.clone();
        tracker.dirty.set(0, tracker.dirty.len());
        let (mut reclaimed, mut moved) = (0u64, 0u64);
        // 1. Reclaim.
        let mut b = 0;
        while b < steps.block_count() {
            self.ctl.checkpoint().await?;
            if !self.ctl.tokens(bs).await {
                continue;
            }
            tracker.dirty.take(b, b + 1);
            self.shared.in_flight.fetch_add(bs, Ordering::AcqRel);
            let r = self
                .locked(self.block_range(b), move |t| t.steps.reclaim(b))
                .await;
            self.shared.in_flight.fetch_sub(bs, Ordering::AcqRel);
            if r?.map_err(step_err("reclaim", b * bs))? {
                reclaimed += 1;
                self.target.stats.lock().reclaimed_blocks += 1;
            }
            self.shared.done.fetch_add(bs, Ordering::AcqRel);
            b += 1;
        }
        // 2. Move.
        self.shared.set_phase(Phase::Copying);
        let mut stale = 0u32;
        loop {
            self.ctl.checkpoint().await?;
            let target = self.target.clone();
            let plan = tokio::task::spawn_blocking(move || target.steps.plan_move())
                .await
                .map_err(|_| JobError::Aborted)?
                .map_err(step_err("move", 0))?;
            let Some(m) = plan else {
                break;
            };
            if !self.ctl.tokens(m.len).await {
                continue;
            }
            self.shared.in_flight.fetch_add(m.len, Ordering::AcqRel);
            let r = self.locked(m.range, move |t| t.steps.move_block(&m)).await;
            self.shared.in_flight.fetch_sub(m.len, Ordering::AcqRel);
            if r?.map_err(step_err("move", m.range.0))? {
                stale = 0;
                moved += 1;
                self.target.stats.lock().moved_blocks += 1;
                self.shared.done.fetch_add(m.len, Ordering::AcqRel);
            } else {
                // The block changed under the plan (a guest wrote or discarded it): plan
                // again, a few times at most.
                stale += 1;
                if stale > 8 {
                    break;
                }
            }
        }
        // 3. Truncate.
        self.ctl.checkpoint().await?;
        self.shared.set_phase(Phase::Pivoting);
        let target = self.target.clone();
        let pause = Instant::now();
        let after = tokio::task::spawn_blocking(move || {
            target.steps.truncate()?;
            target.steps.file_len()
        })
        .await
        .map_err(|_| JobError::Aborted)?
        .map_err(step_err("truncate", 0))?;
        let truncate_time = pause.elapsed();
        self.target.stats.lock().len_after = after;
        Ok(JobReport {
            buffered_bytes: moved * bs,
            zeroed_bytes: reclaimed * bs,
            yields: self.yields.load(Ordering::Relaxed),
            // Guest I/O is never paused as a whole; allocating writers wait for the
            // truncation's syncs at most.
            pivot_pause: truncate_time.min(self.live.guest_stats().max_wait),
            ..JobReport::base(&self.shared, &self.live, t0)
        })
    }
}
