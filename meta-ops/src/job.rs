//! Jobs: what to copy ([`Job`], [`JobOptions`]) and where they run ([`JobRunner`]).
//!
//! Starting a job checks it against the source, attaches its tracker to the [`LiveDisk`]
//! (every guest change from then on is tracked) and spawns its driver ([`crate::driver`]) on
//! the runner's tokio runtime; the caller gets a [`JobHandle`].

use std::sync::Arc;
use std::time::Duration;

use block_io::BlockDevice;

use crate::copy::Copier;
use crate::driver::Driver;
use crate::error::JobError;
use crate::handle::{JobHandle, Phase};
use crate::live::{LiveDisk, Tracker};
use crate::task::{self, Spec};

/// Which job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A disk or a byte range of it to another block device.
    Copy,
    /// The whole disk (a chain flattened) into a new image of another format.
    Convert,
    /// Layers of a chain folded into an ancestor, the guest then moved onto it
    /// ([`Job::commit`]).
    Commit,
    /// Unused space of an image returned, the file truncated ([`Job::compact`]).
    Compact,
    /// A remote base pulled into its local replica
    #[cfg_attr(feature = "remote", doc = "([`JobRunner::start_stream`]).")]
    #[cfg_attr(
        not(feature = "remote"),
        doc = "(`JobRunner::start_stream`, feature `remote`)."
    )]
    Stream,
    /// The disk moved to another host's block device (an NBD export), the guest then moved
    /// onto it ([`Job::mirror`]).
    Mirror,
}

impl JobKind {
    /// `copy` or `convert`.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Copy => "copy",
            JobKind::Convert => "convert",
            JobKind::Commit => "commit",
            JobKind::Compact => "compact",
            JobKind::Stream => "stream",
            JobKind::Mirror => "mirror",
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
    /// already in sync go through to the destination as well (default 1; 0: from the
    /// start). With a guest writing all over the disk, every background pass dirties nearly
    /// every block again and the job copies the disk once more, while write-through costs
    /// each guest write to a copied block a second write, in the guest's time: measured
    /// with `vdisk stress`, guests kept more of their IOPS with one background pass. A
    /// mirror makes at least one (its write-through crosses the network).
    pub background_passes: u32,
    /// Use `copy_file_range(2)` where both disks map to plain files (default true).
    pub copy_file_range: bool,
    /// The longest a chunk waits for guest requests before it starts anyway (default 10 ms).
    pub yield_cap: Duration,
    /// While the guest is busy (requests arrived during the job's last step), the job's
    /// steps take at most this percent of the time: each is followed by a pause of up to
    /// [`MAX_BACK_OFF`](crate::MAX_BACK_OFF) (default 25; 100: no pause). An idle guest
    /// leaves the job at full speed.
    pub busy_duty: u8,
    /// While the guest is busy, the job lowers its duty below
    /// [`busy_duty`](Self::busy_duty), down to 2%, as far as it takes for the guest to keep
    /// this percent of the request rate it has with the job's steps stopped (measured by a
    /// stop of the steps of 120 ms every two seconds), and raises it again when the guest
    /// keeps more (default 85; 0: off, the duty stays at `busy_duty`). A guest that is busy
    /// all the time and slowed by every step (a CPU-bound guest on few cores) slows the job
    /// down a lot: with `vdisk stress` (four guest threads on two cores) a 1 GiB convert
    /// took 15-25 s instead of 4-5 s. Set 0 or a lower share to favour the job.
    pub guest_share: u8,
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
            busy_duty: 25,
            guest_share: 85,
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
    /// Commit: what the job reads (the layers above the base, through the chain).
    pub(crate) merge: Option<Arc<dyn BlockDevice>>,
    /// Commit: the disk the guest must be on when the job starts.
    pub(crate) guest: Option<Arc<dyn BlockDevice>>,
    /// Commit: what happens to the merged layers once the guest has moved onto the base.
    pub(crate) retire: Vec<crate::commit::Post>,
    /// Commit of layers below the live top: guest writes do not change what is merged.
    pub(crate) static_source: bool,
    /// Commit: the disk the guest moves to, when it is not the destination.
    pub(crate) switch_to: Option<Arc<dyn BlockDevice>>,
    /// Commit, convert of a top: the chain the guest is on after the switch
    /// ([`Job::guest_chain`]).
    pub(crate) guest_chain: Option<Arc<chain::Disk>>,
    /// Commit: run with guest writes paused, after the destination is flushed and before
    /// the guest moves (repointing the layer above the merged ones).
    pub(crate) before_switch: Option<crate::commit::Hook>,
    /// Compact: the image compacted in place (the job has no destination of its own).
    pub(crate) compact: Option<Arc<crate::compact::CompactTarget>>,
    /// Mirror: the timing and the guest-write throttle.
    pub(crate) mirror: Option<crate::mirror::MirrorSpec>,
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
            .field("retire", &self.retire)
            .finish_non_exhaustive()
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
            merge: None,
            guest: None,
            retire: Vec::new(),
            static_source: false,
            switch_to: None,
            guest_chain: None,
            before_switch: None,
            compact: None,
            mirror: None,
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
            merge: None,
            guest: None,
            retire: Vec::new(),
            static_source: false,
            switch_to: None,
            guest_chain: None,
            before_switch: None,
            compact: None,
            mirror: None,
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
    /// Ignored by a commit and by [`Job::convert_top`] (a new top reads its parents).
    pub fn dest_zeroed(mut self, yes: bool) -> Job {
        if self.kind != JobKind::Commit && self.merge.is_none() {
            self.dest_zeroed = yes;
        }
        self
    }

    /// What the pivot does. A commit always switches.
    pub fn pivot(mut self, pivot: Pivot) -> Job {
        if self.kind != JobKind::Commit {
            self.pivot = pivot;
        }
        self
    }

    /// A job of `kind` into `dest` (the crate's job constructors).
    pub(crate) fn with_kind(kind: JobKind, dest: Arc<dyn BlockDevice>) -> Job {
        Job {
            kind,
            dest,
            range: None,
            dest_offset: None,
            dest_zeroed: false,
            pivot: Pivot::Switch,
            options: JobOptions::default(),
            merge: None,
            guest: None,
            retire: Vec::new(),
            static_source: false,
            switch_to: None,
            guest_chain: None,
            before_switch: None,
            compact: None,
            mirror: None,
        }
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
        if self.kind != JobKind::Copy && self.range.is_some() {
            return bad(format!("a {} covers the whole disk", self.kind.name()));
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

    /// The runtime jobs are spawned on (stream jobs start their own tasks on it).
    #[cfg(feature = "remote")]
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Whether the runner owns its runtime.
    pub fn owns_runtime(&self) -> bool {
        self.owned.is_some()
    }

    /// Starts `job` on `live`: checks it, attaches it (guest changes from now on are
    /// tracked) and spawns its driver. Fails with [`JobError::Busy`] if a job already runs
    /// there.
    pub fn start(&self, live: &Arc<LiveDisk>, job: Job) -> Result<JobHandle, JobError> {
        if let Some(target) = job.compact.clone() {
            return crate::compact::start(&self.handle, live, target, job.options.clone());
        }
        if let Some(spec) = job.mirror.clone() {
            let (dest, zeroed, o) = (job.dest.clone(), job.dest_zeroed, job.options.clone());
            return crate::mirror::start(&self.handle, live, dest, zeroed, o, spec);
        }
        let current = live.current();
        if let Some(g) = &job.guest {
            if !std::ptr::addr_eq(Arc::as_ptr(g), Arc::as_ptr(&current)) {
                return Err(JobError::Invalid(
                    "the guest is not on the disk this commit was prepared for".into(),
                ));
            }
        }
        let (start, end, doff) = job.validate(&*current)?;
        let o = job.options.clone();
        let mut tracker = Tracker::new(job.dest.clone(), start, end, doff, o.granularity);
        tracker.ignore_guest = job.static_source;
        tracker.switch_to = job.switch_to.clone();
        let tracker = Arc::new(tracker);
        let mut src = live.attach(tracker.clone())?;
        if let Some(m) = &job.merge {
            if job
                .guest
                .as_ref()
                .is_some_and(|g| !std::ptr::addr_eq(Arc::as_ptr(g), Arc::as_ptr(&src)))
            {
                live.detach(&tracker);
                return Err(JobError::Invalid(
                    "the guest moved to another disk while the commit started".into(),
                ));
            }
            src = m.clone();
        }
        let copier = Copier::new(
            src,
            tracker.clone(),
            live,
            job.dest_zeroed,
            job.merge.is_some(),
            &o,
        );
        let spec = Spec {
            kind: job.kind,
            chunk: o.chunk,
            gran: o.granularity,
            phase: Phase::Scanning,
            rate: o.rate,
        };
        Ok(task::spawn(
            &self.handle,
            live,
            tracker,
            spec,
            task::detach,
            |ctl| {
                Driver {
                    shared: ctl.shared.clone(),
                    copier: Arc::new(copier),
                    live: live.clone(),
                    pivot: job.pivot,
                    retire: job.retire,
                    before_switch: job.before_switch,
                    opts: o,
                    ctl,
                }
                .run()
            },
        ))
    }
}
