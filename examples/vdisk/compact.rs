//! `vdisk compact IMG [-p] [--rate BYTES/S]`: return the unused space of a dynamic or
//! differencing VHD or VHDX, with the online compact job of `meta_ops` (no guest here, so the
//! job has the image to itself): blocks that hold nothing give their space back (VHD:
//! unallocated; VHDX: ZERO in a dynamic image, NOT_PRESENT for an empty partially present
//! block of a differencing one), blocks at
//! the end of the file move into the holes, and the file is truncated. A differencing image's
//! parents are not opened: nothing that hides the parent is ever dropped. Prints what it
//! freed.

use std::path::PathBuf;

use vdisk::meta_ops::{CompactTarget, Job, JobRunner, LiveDisk};

use crate::cmds::{wait_job, BarEnd};
use crate::{job_err, CliError, CliResult};

/// `vdisk compact` arguments.
#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Rate limit in bytes per second (K/M/G suffixes; default: unlimited).
    #[arg(long)]
    pub rate: Option<String>,
    /// The image (VHD or VHDX, dynamic or differencing).
    pub image: PathBuf,
}

/// Runs the verb; exit 0 when the image is compacted.
pub fn run(a: CompactArgs) -> CliResult {
    let rate = crate::size::parse_rate(a.rate.as_deref())?;
    let target = CompactTarget::open(&a.image, crate::image::lock_mode()).map_err(job_err)?;
    let live = LiveDisk::new(target.device());
    let runner = JobRunner::new().map_err(job_err)?;
    let h = runner
        .start(&live, Job::compact(target.clone()).rate(rate))
        .map_err(job_err)?;
    wait_job(h, a.progress, BarEnd::Clear).map_err(job_err)?;
    vdisk::block_io::BlockDevice::flush(&*live).map_err(CliError::from)?;
    drop(live);
    drop(runner);
    let s = target.stats();
    drop(target);
    println!(
        "Image compacted: {} block(s) of {} bytes reclaimed, {} moved; file {} -> {} bytes ({} bytes freed).",
        s.reclaimed_blocks,
        s.block_size,
        s.moved_blocks,
        s.len_before,
        s.len_after,
        s.freed()
    );
    Ok(0)
}
