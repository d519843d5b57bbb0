//! # meta-ops
//!
//! Online meta-operations over a live disk (DESIGN.md, "Online meta-operations"): jobs that
//! run while the guest keeps reading and writing the same disk. This release has the job
//! engine and two jobs, **copy** (a disk or a byte range of it to another [`BlockDevice`]) and
//! **convert** (the whole disk — a differencing chain flattened when the source is the chain's
//! top `chain::Disk` — into a new image of another format that the caller created), with
//! **commit** (merge layers of a chain into an ancestor) and **compact** (return an image's
//! unused space in place while the guest uses it, [`Job::compact`]), and a **resize** of the
//! top image under a running guest ([`resize_live`]; offline [`resize_image`]). With the
//! `remote` feature, **stream** pulls a remote base into a local replica under its child
//! (copy-on-read meanwhile) and then makes the chain local (`stream`,
//! `JobRunner::start_stream`). Offline, [`convert_layers`] converts a differencing chain
//! layer by layer into a new chain of the same depth in VHD or VHDX ([`layers`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use meta_ops::{Job, JobRunner, LiveDisk};
//! # fn demo(disk: Arc<dyn block_io::BlockDevice>, new_image: Arc<dyn block_io::BlockDevice>)
//! # -> Result<(), meta_ops::JobError> {
//! let live = LiveDisk::new(disk);          // hand `live` to the guest (it is a BlockDevice)
//! let runner = JobRunner::new()?;          // or JobRunner::from_handle(tokio_handle)
//! let job = runner.start(&live, Job::convert(new_image).rate(64 << 20))?;
//! println!("{:?}", job.progress());        // phase, done/total bytes, rate, ETA
//! let report = job.wait_blocking()?;       // or `job.wait().await`
//! println!("guest writes paused for {:?}", report.pivot_pause);
//! # Ok(()) }
//! ```
//!
//! ## Design
//!
//! - **The guest's view.** Guest I/O goes through a [`LiveDisk`], a [`BlockDevice`] over the
//!   source. With no job attached it only passes requests through (and counts them).
//! - **Coordination.** A job tracks its range in a dirty bitmap, one bit per *granule*
//!   (64 KiB by default). Its chunk copies take their blocks exclusively in a block-granular
//!   [`block_io::RangeLock`]; guest writes, write-zeroes and discards take theirs shared,
//!   change the source, then mark their blocks dirty, so a block the job already copied is
//!   copied again (the mirror pattern). The job claims a chunk's bits *before* locking it, and
//!   a guest write sets them *after* writing while still holding its lock: whichever order
//!   they run in, the block ends up copied after the last write, or marked dirty again.
//! - **Convergence and pivot.** After a pass, if at most `pivot_threshold` bytes are dirty the
//!   job pivots; otherwise (after `background_passes` passes) guest writes to blocks already
//!   in sync go to both disks (write-through) so the dirty set only shrinks. The pivot closes
//!   a task-fair gate that every guest change passes (new changes wait, those in flight
//!   drain), copies what is left, flushes the destination, switches the guest to it
//!   ([`Pivot::Switch`]) or leaves it as a point-in-time copy ([`Pivot::Detach`]), and opens
//!   the gate. The time the gate was closed is reported as [`JobReport::pivot_pause`]; the
//!   longest wait of any one guest request as [`JobReport::max_guest_wait`]. Guest reads wait
//!   only for the device swap itself (and for a whole [`resize_live`], which changes the file
//!   under them).
//! - **Yielding to the guest.** Before each chunk the job lets the guest requests that were
//!   already in flight finish (up to `yield_cap`), and it takes the chunk's bytes from a
//!   [`block_io::RateLimiter`] whose rate [`JobHandle::set_rate`] changes while it runs.
//! - **Moving bytes.** Holes are skipped via `block_status` (or zeroed when the destination
//!   may hold data there); data moves with `copy_file_range(2)` where both disks map the range
//!   to plain files ([`BlockDevice::map`]), else through a buffer, `parallel` chunks at once.
//! - **Runtime.** A job's driver is a tokio task ([`JobRunner`] owns a small runtime or uses
//!   the caller's); every blocking device call runs in `spawn_blocking`.
//!
//! ## Guarantees
//!
//! - Copy and convert never write the source. A commit writes its base, which is part of
//!   the source chain, only where the layers above hide it, so the guest's view never
//!   changes. A cancelled or failed job leaves the guest's disk reading as the guest left
//!   it, and guest I/O goes on there; the job reports [`JobError::Cancelled`] or the error.
//! - After a completed job the destination holds exactly what the guest's disk held at the
//!   pivot, and it was flushed before the job reported success (and, with
//!   [`Pivot::Switch`], before the guest's first request to it). Every guest write is in
//!   the image of the pivot iff it was applied before it: [`LiveDisk::write_at_gen`] tells
//!   which.
//! - Guest requests never fail because of a job: a failed write-through only marks the
//!   blocks dirty again.
//! - The destination is valid at every instant as far as its format keeps it so: the job
//!   writes it only through [`BlockDevice`] calls and mapped file extents of blocks already
//!   allocated. Commit, copy, convert and mirror have crash sweeps on the fault backend
//!   (`tests/commit_crash.rs`, `tests/crash_jobs.rs`): after a power cut at any write or
//!   sync the destination opens and checks clean, reads exactly the source once the job
//!   reported success, and the disk the guest was on holds every write it saw flushed.
//! - A compact job changes where blocks lie in the guest's own image, never what it reads;
//!   each step leaves the file openable after a crash at any write or sync, with every
//!   flushed guest write intact (`tests/compact.rs`, [`Job::compact`]).
//!
//! [`BlockDevice`]: block_io::BlockDevice
//! [`BlockDevice::map`]: block_io::BlockDevice::map
#![warn(missing_docs)]

mod bitmap;
mod commit;
mod compact;
mod copy;
mod driver;
mod error;
mod handle;
mod job;
pub mod layers;
mod live;
pub mod mirror;
mod new_layer;
mod resize;
pub mod send;
pub mod split;
#[cfg(feature = "remote")]
pub mod stream;
mod task;

pub use commit::{prepare_top, set_vhdx_linkage, unlink_stale, CommitOptions, Retire};
pub use compact::{
    open_chain_for_compact, open_chain_for_compact_layer, CompactStats, CompactTarget,
};
pub use error::{JobError, JobResult};
pub use handle::{JobHandle, JobReport, Phase, Progress};
pub use job::{Job, JobKind, JobOptions, JobRunner, Pivot};
pub use layers::{convert_layers, convert_layers_to, LayersError, LayersOptions, LayersReport};
pub use live::{GuestStats, LiveDisk, MAX_BACK_OFF};
pub use mirror::{MirrorTiming, DEFAULT_MAX_BACKLOG, THROTTLE_CAP};
pub use resize::{resize_image, resize_live, ResizeError, Resized};
pub use split::{split, SplitError, SplitFormat, SplitOptions, SplitReport};
