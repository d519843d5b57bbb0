//! `vdisk stress IMG --job copy|convert|merge|resize --seconds N [--threads T] [--rate BYTES/S]`: random
//! guest I/O against an in-memory model while an online job runs, as a guest would see it.
//!
//! Guest threads do 4 KiB random writes, reads, discards, write-zeroes and flushes through a
//! `meta_ops::LiveDisk`; thread `t` owns the blocks `b % T == t`, so its model of them is
//! exact. First they run alone (idle IOPS), then with the job (IOPS during the job), and on
//! after it until N seconds are up; a job still running then is cancelled. Every read is
//! checked against the model, and at the end the whole disk the guest ended on is checked
//! against the model, and the job's other side against the model at the pivot (blocks no one
//! touched: the two sides must agree). One JSON line goes to stdout; any mismatch, I/O error
//! or job failure exits non-zero.
//!
//! The destination is a temporary file next to IMG, deleted afterwards: for `copy` a raw
//! image (the guest stays on IMG, the copy is a point-in-time image), for `convert` an image
//! of another format (VHDX for raw and VHD, VHD for VHDX) that the guest switches to at the
//! pivot. For `merge`, the guests run on a temporary differencing child of IMG (a VHD or
//! VHDX), which the commit job folds into IMG while they write; they end on IMG and the child
//! is deleted. For `compact`, the guests run on IMG (a VHD or VHDX, over its parents if it
//! has any) while the compact job returns its unused space in place; there is no other side
//! to compare. For `resize`, IMG itself grows to twice its size under
//! the guests (`meta_ops::resize_live`): they address the new size from the start, requests
//! past the old end must be refused until the switch and served after it, and the new space
//! reads as zeros. IMG's contents are overwritten by the guest writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdisk::block_io::BlockDevice;
use vdisk::chain::{Disk, Format};
use vdisk::meta_ops::{
    CommitOptions, Job, JobError, JobOptions, JobReport, JobRunner, LiveDisk, Pivot, Retire,
};

use crate::CliError;

/// Bytes per guest request and per model block.
const BLK: u64 = 4096;

/// Which job `vdisk stress` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StressJob {
    /// Copy the disk to a raw file (point-in-time copy; the guest stays on IMG).
    Copy,
    /// Convert to another format (the guest switches to the new image at the pivot).
    Convert,
    /// Commit a temporary child of IMG into IMG (the guest ends on IMG).
    Merge,
    /// Grow IMG to twice its size (online resize; the guests use the new space after it).
    Resize,
    /// Compact IMG in place (the guest stays on IMG).
    Compact,
    /// Mirror IMG to our NBD server in-process on a temporary raw file (host B); the guests
    /// end on the NBD client (`--timing`).
    Mirror,
    /// Stream: IMG served read-only over NBD in-process, the guests on a temporary child of
    /// the export while the stream job pulls IMG into a local replica.
    Stream,
}

/// `vdisk stress` arguments.
#[derive(Debug, clap::Args)]
pub struct StressArgs {
    /// The job to run under guest I/O.
    #[arg(long, value_enum)]
    pub job: StressJob,
    /// How long the guests run, idle phase included.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Guest threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: u64,
    /// The job's rate limit in bytes per second (K/M/G suffixes; default: unlimited).
    #[arg(long)]
    pub rate: Option<String>,
    /// Percent of the time the job's steps may take while the guests are busy (the job's
    /// default when absent; 100: never pause for the guests).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub busy_duty: Option<u8>,
    /// Percent of its request rate the guests keep while the job runs: the job lowers its
    /// duty below --busy-duty as far as it takes (the job's default when absent; 0: off).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub guest_share: Option<u8>,
    /// Passes in which guest writes only mark blocks dirty before they go through to the
    /// destination as well (the job's default when absent; 0: write-through from the start).
    #[arg(long)]
    pub background_passes: Option<u32>,
    /// Image format (detected if absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// When a mirror moves the guest: before, after or split.
    #[arg(long, default_value = "before", value_parser = crate::mirror::parse_timing)]
    pub timing: vdisk::meta_ops::MirrorTiming,
    /// Print the job's report to stderr.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// The image (its contents are overwritten).
    pub image: PathBuf,
}

/// What the model knows of one 4 KiB block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Never touched and never read: whatever the image held.
    Orig,
    /// Bytes whose hash is this (read once, or the original before a first change).
    Hash(u64),
    /// Written with the pattern of this seed.
    Pattern(u64),
    /// Zeros.
    Zero,
    /// Discarded in a chain: zeros or the parent's bytes, fixed by the next read.
    Unknown,
}

/// One block of a thread's model: now, and at the pivot when it has changed since.
#[derive(Debug, Clone, Copy)]
struct Cell {
    cur: St,
    at_pivot: Option<St>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn pattern(block: u64, seed: u64, out: &mut [u8]) {
    let key = splitmix(block ^ seed.rotate_left(32));
    for (i, w) in out.chunks_mut(8).enumerate() {
        let v = splitmix(key.wrapping_add(i as u64)).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

fn hash(data: &[u8]) -> u64 {
    data.chunks(8).fold(0x243f_6a88_85a3_08d3, |h, w| {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        splitmix(h ^ u64::from_le_bytes(b))
    })
}

/// Whether `data` is what `st` says (`Orig` and `Unknown` accept anything).
fn matches(st: St, block: u64, data: &[u8], scratch: &mut [u8]) -> bool {
    match st {
        St::Orig | St::Unknown => true,
        St::Hash(h) => hash(data) == h,
        St::Zero => data.iter().all(|&b| b == 0),
        St::Pattern(s) => {
            pattern(block, s, scratch);
            data == scratch
        }
    }
}

/// Counters all guest threads share.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    ops: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A small xorshift generator per thread (no shared state, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = splitmix(self.0);
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What every guest thread knows of the disk.
#[derive(Debug)]
struct Layout {
    /// Guest threads (thread `t` owns blocks `t`, `t + threads`, ...).
    threads: u64,
    /// 4 KiB blocks the guests address.
    blocks: u64,
    /// Blocks the disk has before a resize (those past it read as zeros once they exist).
    old_blocks: u64,
    /// The disk is a chain (a discard may uncover the parent's bytes).
    chain: bool,
    /// The hash of each block's original contents, where [`learn`] read them.
    orig: Option<Vec<u64>>,
}

/// One guest thread: random requests on its own blocks until told to stop.
fn guest(live: Arc<LiveDisk>, shared: Arc<Shared>, t: u64, layout: &Layout) -> Vec<Cell> {
    let Layout {
        threads,
        blocks,
        old_blocks,
        chain,
        ref orig,
    } = *layout;
    let mine = blocks.saturating_sub(t).div_ceil(threads);
    // Blocks past the old end (a resize) read as zeros once they exist.
    let mut cells: Vec<Cell> = (0..mine)
        .map(|i| {
            let b = t + i * threads;
            let cur = match orig {
                _ if b >= old_blocks => St::Zero,
                Some(h) => h.get(b as usize).map_or(St::Orig, |&h| St::Hash(h)),
                None => St::Orig,
            };
            Cell {
                cur,
                at_pivot: None,
            }
        })
        .collect();
    let mut rng = Rng(0x5eed ^ t.wrapping_mul(0x1234_5678_9abc));
    let mut buf = vec![0u8; BLK as usize];
    let mut scratch = vec![0u8; BLK as usize];
    let mut seq = 0u64;
    let fail = |shared: &Shared| {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    };
    while !shared.stop.load(Ordering::Acquire) && mine > 0 {
        let i = rng.below(mine);
        let b = t + i * threads;
        let off = b * BLK;
        let cell = &mut cells[i as usize];
        let op = rng.below(100);
        shared.ops.fetch_add(1, Ordering::Relaxed);
        // Past the old end before the resize: refused, and nothing changes.
        let beyond = b >= old_blocks;
        let refused = |e: &vdisk::block_io::Error| {
            beyond && e.kind() == vdisk::block_io::ErrorKind::OutOfRange
        };
        if op < 40 {
            if let Err(e) = live.read_at(&mut buf, off) {
                if !refused(&e) {
                    fail(&shared);
                }
                continue;
            }
            if !matches(cell.cur, b, &buf, &mut scratch) {
                shared.mismatches.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "vdisk stress: read of block {b} differs from the model ({:?})",
                    cell.cur
                );
            }
            if matches!(cell.cur, St::Orig | St::Unknown) {
                cell.cur = St::Hash(hash(&buf));
            }
            continue;
        }
        if op >= 95 {
            if live.flush().is_err() {
                fail(&shared);
            }
            continue;
        }
        // A change: learn the original first, so both sides of a pivot can be checked.
        if cell.cur == St::Orig {
            shared.ops.fetch_add(1, Ordering::Relaxed);
            if live.read_at(&mut buf, off).is_err() {
                fail(&shared);
                continue;
            }
            cell.cur = St::Hash(hash(&buf));
        }
        let before = cell.cur;
        let (r, next) = if op < 80 {
            seq += 1;
            let seed = (t << 40) | seq;
            pattern(b, seed, &mut buf);
            (live.write_at_gen(&buf, off), St::Pattern(seed))
        } else if op < 90 {
            if chain {
                (live.discard_gen(off, BLK), St::Unknown)
            } else {
                (live.discard_gen(off, BLK), St::Zero)
            }
        } else {
            (live.write_zeroes_gen(off, BLK, rng.below(2) == 0), St::Zero)
        };
        match r {
            Ok(0) if beyond => {
                shared.mismatches.fetch_add(1, Ordering::Relaxed);
                eprintln!("vdisk stress: a change of block {b} past the old end was accepted");
            }
            Err(e) if refused(&e) => {}
            Ok(gen) => {
                if gen >= 1 && cell.at_pivot.is_none() {
                    cell.at_pivot = Some(before);
                }
                cell.cur = next;
            }
            Err(_) => {
                fail(&shared);
                // The block may hold either now.
                cell.cur = St::Unknown;
                if cell.at_pivot.is_none() && live.generation() >= 1 {
                    cell.at_pivot = Some(St::Unknown);
                }
            }
        }
    }
    cells
}

/// Checks the disk the guest ended on (`now`) against the model, and `other` (the job's
/// other side, if it completed) against the model at the pivot. Returns the mismatches.
fn verify(
    now: &dyn BlockDevice,
    other: Option<&dyn BlockDevice>,
    models: &[Vec<Cell>],
    threads: u64,
    blocks: u64,
) -> Result<u64, CliError> {
    let batch = 256u64;
    let mut a = vec![0u8; (batch * BLK) as usize];
    let mut o = vec![0u8; (batch * BLK) as usize];
    let mut scratch = vec![0u8; BLK as usize];
    let mut bad = 0u64;
    let mut b0 = 0u64;
    while b0 < blocks {
        let n = batch.min(blocks - b0);
        let len = (n * BLK) as usize;
        now.read_at(&mut a[..len], b0 * BLK)?;
        if let Some(other) = other {
            other.read_at(&mut o[..len], b0 * BLK)?;
        }
        for k in 0..n {
            let b = b0 + k;
            let r = (k * BLK) as usize..((k + 1) * BLK) as usize;
            let cell = models
                .get((b % threads) as usize)
                .and_then(|m| m.get((b / threads) as usize))
                .copied()
                .unwrap_or(Cell {
                    cur: St::Orig,
                    at_pivot: None,
                });
            let mut ok = matches(cell.cur, b, &a[r.clone()], &mut scratch);
            if other.is_some() {
                let then = cell.at_pivot.unwrap_or(cell.cur);
                ok &= match (cell.cur, cell.at_pivot) {
                    // Untouched since the pivot and not pinned down: both sides must agree.
                    (St::Orig | St::Unknown, None) => a[r.clone()] == o[r.clone()],
                    _ => matches(then, b, &o[r.clone()], &mut scratch),
                };
            }
            if !ok {
                bad += 1;
                if bad <= 10 {
                    eprintln!("vdisk stress: block {b} differs from the model ({cell:?})");
                }
            }
        }
        b0 += n;
    }
    Ok(bad)
}

/// The destination of the job: a temporary image next to `image`.
fn destination(
    image: &Path,
    job: StressJob,
    source: Format,
    size: u64,
) -> Result<(Arc<dyn BlockDevice>, TempFile), CliError> {
    let format = match (job, source) {
        (
            StressJob::Copy
            | StressJob::Resize
            | StressJob::Merge
            | StressJob::Compact
            | StressJob::Mirror
            | StressJob::Stream,
            _,
        ) => Format::Raw,
        (StressJob::Convert, Format::Vhdx) => Format::Vhd,
        (StressJob::Convert, _) => Format::Vhdx,
    };
    let ext = match format {
        Format::Raw => "raw",
        Format::Vhd => "vhd",
        _ => "vhdx",
    };
    let mut name = image
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".stress-{}.{ext}", std::process::id()));
    let path = image.with_file_name(name);
    let guard = TempFile(path.clone());
    let img = crate::image::create(format, &path, size, &[], None)?;
    Ok((img.dev, guard))
}

/// A temporary differencing child of `image` (VHD or VHDX), prepared for a commit and
/// opened as a chain.
fn merge_chain(
    image: &Path,
    format: Option<&str>,
) -> Result<(crate::image::Image, Arc<Disk>, TempFile), CliError> {
    let base = crate::image::open(image, format, true)?;
    let fmt = base.format;
    drop(base);
    let ext = match fmt {
        Format::Vhd => "vhd",
        Format::Vhdx => "vhdx",
        _ => return Err(CliError::new("--job merge needs a VHD or VHDX image")),
    };
    let mut name = image
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".stress-{}.{ext}", std::process::id()));
    let path = image.with_file_name(name);
    let guard = TempFile(path.clone());
    drop(crate::image::create(fmt, &path, 0, &[], Some(image))?);
    let mut opts = crate::image::chain_options(None, false)?;
    opts.random_access = true;
    vdisk::meta_ops::prepare_top(&path, &opts.policy).map_err(crate::job_err)?;
    let disk = Arc::new(Disk::open(&path, &opts)?);
    let img = crate::image::Image {
        dev: disk.clone(),
        chain: Some(disk.clone()),
        format: fmt,
    };
    Ok((img, disk, guard))
}

fn rate_of(per_sec: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        per_sec as f64 / s
    } else {
        0.0
    }
}

/// Most blocks whose originals [`learn`] reads first (a table of 256 MiB).
const LEARN_MAX: u64 = 1 << 25;

/// The hash of each of the first `blocks` 4 KiB blocks of `dev`, read in 1 MiB pieces.
///
/// With every original known before the guests start, the first read of a block is checked
/// too, and the guests' mix of requests is the same from the first second to the last: a
/// block whose original is unknown costs its first change an extra read, which made the idle
/// phase (the first seconds, with most blocks unknown) look busier than the rest of the run.
fn learn(dev: &dyn BlockDevice, blocks: u64) -> Result<Vec<u64>, CliError> {
    const PIECE: u64 = 256;
    let mut out = Vec::with_capacity(blocks as usize);
    let mut buf = vec![0u8; (PIECE * BLK) as usize];
    let mut b = 0;
    while b < blocks {
        let n = (blocks - b).min(PIECE);
        let piece = &mut buf[..(n * BLK) as usize];
        dev.read_at(piece, b * BLK).map_err(|e| {
            CliError::new(format!(
                "reading the image's original contents at byte {}: {}",
                b * BLK,
                crate::cause_chain(&e)
            ))
        })?;
        out.extend(piece.chunks(BLK as usize).map(hash));
        b += n;
    }
    Ok(out)
}

/// Runs `vdisk stress`.
pub fn run(a: StressArgs) -> crate::CliResult {
    let rate = crate::size::parse_rate(a.rate.as_deref())?;
    let mut compacted = None;
    let mut streamed = None;
    // The guest's disk is opened as `vdisk serve --cache writeback` opens it: host readahead
    // off (`block_io::OpenOptions::random_access`).
    let (img, merged, merge_temp) = if a.job == StressJob::Merge {
        let (img, disk, temp) = merge_chain(&a.image, a.format.as_deref())?;
        (img, Some(disk), Some(temp))
    } else if a.job == StressJob::Compact {
        let mut opts = crate::image::chain_options(a.format.as_deref(), false)?;
        opts.random_access = true;
        let (disk, target) =
            vdisk::meta_ops::open_chain_for_compact(&a.image, &opts).map_err(crate::job_err)?;
        compacted = Some(target);
        let format = disk.layers()[0].format;
        let img = crate::image::Image {
            dev: disk.clone(),
            chain: Some(disk),
            format,
        };
        (img, None, None)
    } else if a.job == StressJob::Stream {
        let s = crate::stream::stress_setup(&a.image)?;
        let format = s.disk.layers()[0].format;
        let img = crate::image::Image {
            dev: s.disk.clone(),
            chain: Some(s.disk.clone()),
            format,
        };
        streamed = Some(s);
        (img, None, None)
    } else {
        (
            crate::image::open_with(
                &a.image,
                a.format.as_deref(),
                &crate::image::Access {
                    random_access: true,
                    ..crate::image::Access::default()
                },
            )?,
            None,
            None,
        )
    };
    let info = img.dev.info();
    if info.read_only {
        return Err(CliError::new(format!("{} is read-only", a.image.display())));
    }
    let size = info.virtual_size;
    let old_blocks = size / BLK;
    if old_blocks == 0 {
        return Err(CliError::new("the image is smaller than 4 KiB"));
    }
    // A resize doubles the disk: the guests address the new size from the start.
    let resize_to = size.saturating_mul(2);
    let blocks = if a.job == StressJob::Resize {
        resize_to / BLK
    } else {
        old_blocks
    };
    let resized_disk = match (a.job, &img.chain) {
        (StressJob::Resize, Some(d)) => Some(d.clone()),
        (StressJob::Resize, None) => {
            return Err(CliError::new("--job resize needs an image file"));
        }
        _ => None,
    };
    let chain = img.chain.as_ref().is_some_and(|c| c.layers().len() > 1);
    // A merge has no destination of its own (the job builds it from the chain).
    let mut mirror_host = None;
    let (dest, temp) = if a.job == StressJob::Mirror {
        let (d, host) = crate::mirror::stress_destination(&a.image, size)?;
        mirror_host = Some(host);
        (d, None)
    } else if matches!(
        a.job,
        StressJob::Resize | StressJob::Merge | StressJob::Compact | StressJob::Stream
    ) {
        (img.dev.clone(), None)
    } else {
        let (d, t) = destination(&a.image, a.job, img.format, size)?;
        (d, Some(t))
    };
    let source = img.dev.clone();
    let live = LiveDisk::new(img.dev.clone());
    drop(img);
    let runner = JobRunner::new().map_err(crate::job_err)?;

    // The model learns every original first, except where reading the disk would do the
    // job's work (a stream pulls what is read) or the table would be too large.
    let orig = match a.job {
        StressJob::Stream => None,
        _ if old_blocks > LEARN_MAX => None,
        _ => Some(learn(&*live, old_blocks)?),
    };
    let layout = Arc::new(Layout {
        threads: a.threads,
        blocks,
        old_blocks,
        chain,
        orig,
    });
    let shared = Arc::new(Shared::default());
    let threads: Vec<_> = (0..a.threads)
        .map(|t| {
            let (live, shared, layout) = (live.clone(), shared.clone(), layout.clone());
            std::thread::spawn(move || guest(live, shared, t, &layout))
        })
        .collect();

    let total = Duration::from_secs(a.seconds.max(1));
    let t0 = Instant::now();
    let idle = total
        .mul_f64(0.25)
        .clamp(Duration::from_millis(500), Duration::from_secs(5));
    std::thread::sleep(idle);
    let idle_ops = shared.ops.load(Ordering::Relaxed);
    let idle_time = t0.elapsed();

    let job = match (a.job, &merged) {
        (StressJob::Merge, Some(disk)) => {
            Job::commit(disk.clone(), CommitOptions::new().retire(Retire::Delete))
        }
        (StressJob::Convert, _) => Ok(Job::convert(dest.clone())),
        (StressJob::Mirror, _) => Ok(Job::mirror(dest.clone()).timing(a.timing)),
        (StressJob::Compact, _) => compacted
            .clone()
            .map(Job::compact)
            .ok_or_else(|| JobError::Invalid("no image to compact".into())),
        _ => Ok(Job::copy(dest.clone()).dest_zeroed(true)),
    };
    let defaults = JobOptions::default();
    let options = JobOptions {
        rate,
        busy_duty: a.busy_duty.unwrap_or(defaults.busy_duty),
        guest_share: a.guest_share.unwrap_or(defaults.guest_share),
        background_passes: a.background_passes.unwrap_or(defaults.background_passes),
        ..defaults
    };
    let ops_at_start = shared.ops.load(Ordering::Relaxed);
    let started = Instant::now();
    let handle = match &resized_disk {
        Some(_) => Err(JobError::Invalid("a resize is no engine job".into())),
        None if a.job == StressJob::Stream => match &streamed {
            Some(s) => runner.start_stream(&live, s.cor.clone(), options),
            None => Err(JobError::Invalid("nothing to stream".into())),
        },
        None => job.and_then(|job| runner.start(&live, job.options(options))),
    };
    let outcome: Result<JobReport, JobError>;
    let mut during = (0u64, Duration::ZERO);
    let mut resize_result = None;
    match handle {
        _ if resized_disk.is_some() => {
            let disk = resized_disk.as_ref().map(Arc::clone);
            let r = disk.map(|d| vdisk::meta_ops::resize_live(&live, &d, resize_to, false));
            during = (
                shared.ops.load(Ordering::Relaxed) - ops_at_start,
                started.elapsed(),
            );
            outcome = Err(JobError::Cancelled);
            resize_result = r;
        }
        Err(e) => outcome = Err(e),
        Ok(h) => {
            let deadline = t0 + total;
            while !h.wait_timeout(Duration::from_millis(20)) {
                if Instant::now() >= deadline {
                    h.cancel();
                }
            }
            during = (
                shared.ops.load(Ordering::Relaxed) - ops_at_start,
                started.elapsed(),
            );
            outcome = h.wait_blocking();
        }
    }
    // The guests go on until the time is up (at least a little past the pivot).
    let end = (t0 + total).max(Instant::now() + Duration::from_millis(300));
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    shared.stop.store(true, Ordering::Release);
    let mut models = Vec::new();
    for t in threads {
        models.push(
            t.join()
                .map_err(|_| CliError::new("a guest thread panicked"))?,
        );
    }
    live.flush()?;

    let (job_state, pivot) = match (&outcome, &resize_result) {
        (_, Some(Ok(_))) => ("completed", None),
        (_, Some(Err(e))) => {
            eprintln!("vdisk stress: the resize failed: {}", crate::cause_chain(e));
            ("failed", None)
        }
        (Ok(_), None) => (
            "completed",
            match a.job {
                // A mirror's source holds the disk as at the pivot (before) or the switch
                // (after, split): generation 1 either way.
                StressJob::Convert | StressJob::Mirror => Some(Pivot::Switch),
                StressJob::Copy => Some(Pivot::Detach),
                // The old chain's base is the guest's disk now: nothing else to compare.
                StressJob::Merge | StressJob::Resize => None,
                // In place: the guest's disk is the only side.
                StressJob::Compact => None,
                // The guests' disk (the child) is the only side; its parent is now local.
                StressJob::Stream => None,
            },
        ),
        (Err(e), None) if e.is_cancelled() => ("cancelled", None),
        (Err(_), None) => ("failed", None),
    };
    if let (true, Ok(r)) = (a.verbose, &outcome) {
        eprintln!("vdisk stress: {r:?}");
    }
    if let (Err(e), None) = (&outcome, &resize_result) {
        if !e.is_cancelled() {
            eprintln!("vdisk stress: the job failed: {}", crate::cause_chain(e));
        }
    }
    let now = live.current();
    let other: Option<Arc<dyn BlockDevice>> = match pivot {
        Some(Pivot::Switch) => Some(source.clone()),
        Some(Pivot::Detach) => Some(dest.clone()),
        None => None,
    };
    let final_bad = verify(&*now, other.as_deref(), &models, a.threads, blocks)?;
    let mismatches = shared.mismatches.load(Ordering::Relaxed) + final_bad;
    let errors = shared.errors.load(Ordering::Relaxed);
    let max_pause = match &resize_result {
        Some(Ok(r)) => r.pause,
        _ => outcome
            .as_ref()
            .map(|r| r.pivot_pause.max(r.max_guest_wait))
            .unwrap_or(live.guest_stats().max_wait),
    };
    let line = serde_json::json!({
        "ios": shared.ops.load(Ordering::Relaxed),
        "mismatches": mismatches,
        "job": job_state,
        "guest_iops_idle": rate_of(idle_ops, idle_time).round(),
        "guest_iops_during_job": rate_of(during.0, during.1).round(),
        "max_pause_ms": (max_pause.as_secs_f64() * 1e6).round() / 1e3,
        "errors": errors,
        "job_seconds": (during.1.as_secs_f64() * 1e3).round() / 1e3,
        "bytes_copied": outcome.as_ref().map(|r| r.bytes).unwrap_or(0),
        "copy_file_range_bytes": outcome.as_ref().map(|r| r.copy_file_range_bytes).unwrap_or(0),
    });
    println!("{line}");
    drop((
        live,
        now,
        other,
        dest,
        source,
        merged,
        resized_disk,
        resize_result,
    ));
    drop(temp);
    drop(merge_temp);
    drop(mirror_host);
    drop(streamed);
    Ok(u8::from(
        mismatches > 0 || errors > 0 || job_state == "failed",
    ))
}
