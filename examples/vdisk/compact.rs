//! `vdisk compact IMG [-p] [--rate BYTES/S]`: return the unused space of a dynamic or
//! differencing VHD or VHDX, with the online compact job of `meta_ops` (no guest here, so the
//! job has the image to itself): blocks that hold nothing give their space back (VHD:
//! unallocated; VHDX: ZERO in a dynamic image, NOT_PRESENT for an empty partially present
//! block of a differencing one), blocks at
//! the end of the file move into the holes, and the file is truncated. A differencing image's
//! parents are not opened: nothing that hides the parent is ever dropped. Prints what it
//! freed.

use std::path::PathBuf;
use std::time::Duration;

use vdisk::meta_ops::{CompactTarget, Job, JobError, JobRunner, LiveDisk};

use crate::{CliError, CliResult};

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

fn job_err(e: JobError) -> CliError {
    CliError::new(crate::cause_chain(&e))
}

/// Runs the verb; exit 0 when the image is compacted.
pub fn run(a: CompactArgs) -> CliResult {
    let rate = a
        .rate
        .as_deref()
        .map(crate::size::parse_size)
        .transpose()?
        .unwrap_or(0);
    let target = CompactTarget::open(&a.image, crate::image::lock_mode()).map_err(job_err)?;
    let live = LiveDisk::new(target.device());
    let runner = JobRunner::new().map_err(job_err)?;
    let h = runner
        .start(&live, Job::compact(target.clone()).rate(rate))
        .map_err(job_err)?;
    let bar = a.progress.then(progress_bar);
    while !h.wait_timeout(Duration::from_millis(100)) {
        if let Some(b) = &bar {
            let p = h.progress();
            b.set_length(p.total.max(1));
            b.set_position(p.done);
        }
    }
    let r = h.wait_blocking();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    r.map_err(job_err)?;
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

fn progress_bar() -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(1);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style);
    }
    b
}
