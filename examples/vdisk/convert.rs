//! The data movement of `vdisk convert` between local images: a meta-ops convert job, so it
//! gets what the online jobs have — holes skipped by `block_status`, `copy_file_range(2)`
//! where both ends map to plain files (the kernel copies; no bytes through user space),
//! `-m` chunks in flight, a `--rate` limit in bytes/s, and progress — and the destination is
//! flushed once at the end (the format layers then write their metadata in a few ordered
//! commits, not one per block).

use std::sync::Arc;

use vdisk::block_io::BlockDevice;
use vdisk::meta_ops::{Job, JobOptions, JobRunner, LiveDisk, Pivot};

use crate::cmds::{wait_job, BarEnd};
use crate::{job_err, CliError};

/// How a convert moves its data.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Bytes per second (0: unlimited).
    pub rate: u64,
    /// Chunks in flight.
    pub parallel: usize,
    /// Show an indicatif progress bar.
    pub progress: bool,
}

/// Bytes one chunk of the job moves: large enough that a chunk is one `copy_file_range` or
/// one 4 MiB read and write, small enough that `-m 8` keeps 32 MiB in flight.
const CHUNK: u64 = 4 << 20;

/// Copies all of `src` into `dst`, a new image (reading as zeros) at least as large, and
/// flushes `dst`. `opts.parallel` is at least 1 (`cmds::convert` checks it before it creates
/// the destination).
pub fn copy_job(
    src: Arc<dyn BlockDevice>,
    dst: Arc<dyn BlockDevice>,
    opts: &CopyOptions,
) -> Result<(), CliError> {
    let size = src.info().virtual_size;
    if dst.info().virtual_size < size {
        return Err(CliError::new("the destination is smaller than the source"));
    }
    let live = LiveDisk::new(src);
    let runner = JobRunner::new().map_err(job_err)?;
    let options = JobOptions {
        rate: opts.rate,
        parallel: opts.parallel,
        chunk: CHUNK,
        ..JobOptions::default()
    };
    let job = Job::convert(dst)
        .pivot(Pivot::Detach)
        .dest_zeroed(true)
        .options(options);
    let handle = runner.start(&live, job).map_err(job_err)?;
    wait_job(handle, opts.progress, BarEnd::Keep).map_err(job_err)?;
    Ok(())
}
