//! The data movement of `vdisk convert` between local images: a meta-ops convert job, so it
//! gets what the online jobs have — holes skipped by `block_status`, `copy_file_range(2)`
//! where both ends map to plain files (the kernel copies; no bytes through user space),
//! `-m` chunks in flight, a `--rate` limit in bytes/s, and progress — and the destination is
//! flushed once at the end (the format layers then write their metadata in a few ordered
//! commits, not one per block).
//!
//! `--keep-layers` converts a differencing chain layer by layer instead
//! ([`vdisk::meta_ops::convert_layers`]): DST is the new top, its parents are written next
//! to it as `<DST stem>-1.<ext>` (the top's parent), `<DST stem>-2.<ext>`, ... down to the
//! base, each holding what the matching source layer holds and linked to its new parent.
//! Offline only: the source's layers are opened with the usual image locks, so a served or
//! otherwise open image is refused with the lock named.

use std::path::Path;
use std::sync::Arc;

use vdisk::block_io::BlockDevice;
use vdisk::chain::Format;
use vdisk::meta_ops::layers::LayersProgress;
use vdisk::meta_ops::{convert_layers, Job, JobOptions, JobRunner, LayersOptions, LiveDisk, Pivot};

use crate::cmds::{wait_job, BarEnd};
use crate::{job_err, CliError, CliResult};

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

/// `vdisk convert --keep-layers`: the chain from `src` converted layer by layer to
/// `out_format` (vhd or vhdx), DST the new top; prints the files made, top first. A source
/// without parents gives one plain image, as a convert without `--keep-layers` would.
pub fn keep_layers(
    format: Option<&str>,
    out_format: &str,
    options: &[String],
    progress: bool,
    src: &Path,
    dst: &Path,
) -> CliResult {
    let out = crate::image::parse_format(out_format)?;
    if out == Format::Raw {
        return Err(CliError::new(
            "--keep-layers needs -O vhd or -O vhdx: a raw image has no parent link, so it \
             cannot hold a layer (drop --keep-layers to flatten the chain into one raw image)",
        ));
    }
    if crate::remote::is_url(src) || crate::remote::is_url(dst) {
        return Err(CliError::new(
            "--keep-layers converts local files only (the new layers are written next to DST)",
        ));
    }
    let mut o = LayersOptions::new(out);
    for (k, v) in crate::size::parse_options(options)? {
        match k.as_str() {
            "block_size" => {
                let b = crate::size::parse_size(&v)?;
                o.block_size =
                    Some(u32::try_from(b).map_err(|_| {
                        CliError::new(format!("option block_size={v} is too large"))
                    })?);
            }
            _ => {
                return Err(CliError::new(format!(
                    "--keep-layers takes only -o block_size (given to every layer), not '{k}'"
                )))
            }
        }
    }
    o.lock = crate::image::lock_mode();
    let s = crate::image::open(src, format, true)?;
    let Some(chain) = s.chain else {
        return Err(CliError::new(format!(
            "{} did not open as a chain",
            src.display()
        )));
    };
    let bar = progress.then(|| crate::cmds::progress_bar(0));
    if let Some(b) = &bar {
        let b = b.clone();
        o.progress = Some(Arc::new(move |p: &LayersProgress| {
            b.set_length(p.total_bytes);
            b.set_position(p.done_bytes);
            b.set_message(format!("layer {}/{}", p.layers - p.layer, p.layers));
        }));
    }
    let r = convert_layers(&chain, dst, &o);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = r.map_err(|e| CliError::new(crate::cause_chain(&e)))?;
    println!(
        "Converted {} layer{} to {out}, top first:",
        r.layers.len(),
        if r.layers.len() == 1 { "" } else { "s" }
    );
    for l in &r.layers {
        println!(
            "  {} (from {}, {})",
            l.path.display(),
            l.source.display(),
            if l.differencing {
                "differencing"
            } else {
                "base"
            }
        );
    }
    Ok(0)
}
