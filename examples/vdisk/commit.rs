//! `vdisk commit [-b BASE] [-d|--keep|--delete] [-p] [--rate BYTES/S] CHILD`: fold CHILD (and
//! the layers between it and BASE) into BASE, as `qemu-img commit [-b BASE]` does, with the
//! online commit job of `meta_ops` (no guest here, so the job has the disk to itself).
//!
//! BASE defaults to CHILD's parent; `-b` names any image of CHILD's chain below it. The merged
//! layers stay on disk, stale, unless `--delete` removes them (`-d`/`--keep` say keep
//! explicitly, as qemu-img's `-d` keeps the child as it is). A kept VHDX layer right above
//! BASE no longer opens over it (`meta_ops::unlink_stale`); kept VHD layers still do and
//! show stale data: do not use them. For a VHDX chain committed into
//! the parent, CHILD first records the parent's next DataWriteGuid in its `parent_linkage2`
//! (`meta_ops::prepare_top`), so that a crash at any point leaves CHILD's chain openable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk::chain::Disk;
use vdisk::meta_ops::{self, CommitOptions, Job, JobRunner, LiveDisk, Retire};

use crate::cmds::{wait_job, BarEnd};
use crate::image::chain_options;
use crate::{job_err, CliError, CliResult};

/// `vdisk commit` arguments.
#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// The image to commit into (default: CHILD's parent); must be in CHILD's chain.
    #[arg(short = 'b')]
    pub base: Option<PathBuf>,
    /// Keep the merged layers (the default; they are stale afterwards).
    #[arg(short = 'd', long = "keep", conflicts_with = "delete")]
    pub keep: bool,
    /// Delete the merged layers once BASE holds their data.
    #[arg(long)]
    pub delete: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Rate limit in bytes per second (K/M/G suffixes; default: unlimited).
    #[arg(long)]
    pub rate: Option<String>,
    /// Format of CHILD (detected if absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// The image to commit (the top of the chain).
    pub child: PathBuf,
}

/// Depth of `base` in `child`'s chain (1 = the parent).
fn base_depth(child: &Path, base: Option<&Path>, format: Option<&str>) -> Result<usize, CliError> {
    let Some(base) = base else {
        return Ok(1);
    };
    let want = std::fs::canonicalize(base)
        .map_err(|e| CliError::new(format!("cannot open {}: {e}", base.display())))?;
    let d = Disk::open(child, &chain_options(format, true)?)?;
    d.layers()
        .iter()
        .position(|l| std::fs::canonicalize(&l.path).is_ok_and(|p| p == want))
        .filter(|&i| i >= 1)
        .ok_or_else(|| {
            CliError::new(format!(
                "{} is not a backing file of {}",
                base.display(),
                child.display()
            ))
        })
}

/// Runs the verb; exit 0 when BASE holds everything.
pub fn run(a: CommitArgs) -> CliResult {
    let rate = crate::size::parse_rate(a.rate.as_deref())?;
    let format = a.format.as_deref();
    let depth = base_depth(&a.child, a.base.as_deref(), format)?;
    let opts = chain_options(format, false)?;
    if depth == 1 {
        meta_ops::prepare_top(&a.child, &opts.policy).map_err(job_err)?;
    }
    let disk = Arc::new(Disk::open(&a.child, &opts)?);
    let retire = if a.delete && !a.keep {
        Retire::Delete
    } else {
        Retire::Keep
    };
    let job = Job::commit(
        disk.clone(),
        CommitOptions::new().base(depth).retire(retire),
    )
    .map_err(job_err)?
    .rate(rate);
    let live = LiveDisk::new(disk);
    let runner = JobRunner::new().map_err(job_err)?;
    let h = runner.start(&live, job).map_err(job_err)?;
    wait_job(h, a.progress, BarEnd::Keep).map_err(job_err)?;
    // The guest (no one here) is on BASE: make it durable and clean before exiting.
    vdisk::block_io::BlockDevice::flush(&*live).map_err(CliError::from)?;
    drop(live);
    drop(runner);
    if retire == Retire::Keep && depth == 1 {
        // CHILD is closed now: make the stale VHDX refuse BASE (the job did it itself for a
        // deeper BASE's child).
        meta_ops::unlink_stale(&a.child, crate::image::lock_mode()).map_err(job_err)?;
    }
    println!("Image committed.");
    Ok(0)
}
