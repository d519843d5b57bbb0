//! The verbs other than `io` and `demo`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use vdisk::block_io::{BlockDevice, BlockStatus};
use vdisk::chain::Format;
use vdisk::meta_ops::{JobHandle, JobResult};

use crate::guard;
use crate::image::{self, parse_format, Image};
use crate::size::parse_size;
use crate::{CliError, CliResult};

/// Bytes moved per request by convert and compare.
const CHUNK: u64 = 2 << 20;

pub fn create(
    format: &str,
    options: &[String],
    backing: Option<&Path>,
    path: &Path,
    size: Option<&str>,
) -> CliResult {
    let format = parse_format(format)?;
    if let Some(parent) = backing {
        // Before the image is created (which truncates it): not the parent nor any of its
        // ancestors.
        let why = "the new image's parent chain";
        guard::refuse_same_file(path, [parent], why)?;
        let p = image::open(parent, None, true)?;
        let layers = p.chain.as_ref().map(|c| c.layers()).unwrap_or_default();
        guard::refuse_same_file(path, layers.iter().map(|l| l.path.as_path()), why)?;
    }
    let size = match size {
        Some(s) => parse_size(s)?,
        None if backing.is_some() => 0,
        None => return Err(CliError::new("a size is needed unless -b names a parent")),
    };
    let existed = path.symlink_metadata().is_ok();
    let img = match image::create(format, path, size, options, backing) {
        Ok(img) => img,
        Err(e) => {
            // Refused options or a failed create leave no half-made new file behind.
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };
    img.dev.flush()?;
    println!(
        "Formatting '{}', fmt={} size={}",
        path.display(),
        format.name(),
        img.dev.info().virtual_size
    );
    Ok(0)
}

pub fn convert(
    format: Option<&str>,
    out_format: &str,
    options: &[String],
    copy_opts: &crate::convert::CopyOptions,
    src: &Path,
    dst: &Path,
) -> CliResult {
    let progress = copy_opts.progress;
    if copy_opts.parallel == 0 {
        return Err(CliError::new("-m takes at least 1 request in flight"));
    }
    let out = parse_format(out_format)?;
    let s = image::open(src, format, true)?;
    // Before the destination is created (which truncates it): not a file the source reads.
    let layers = s.chain.as_ref().map(|c| c.layers()).unwrap_or_default();
    let mut reads: Vec<&Path> = vec![src];
    reads.extend(layers.iter().map(|l| l.path.as_path()));
    guard::refuse_same_file(dst, reads, "which the conversion reads")?;
    let size = s.dev.info().virtual_size;
    if crate::remote::is_url(dst) {
        let bar = progress.then(|| progress_bar(size));
        crate::remote::convert_to(&*s.dev, out, options, dst, |done| {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        })?;
        if let Some(b) = bar {
            b.finish();
        }
        return Ok(0);
    }
    let d = image::create(out, dst, size, options, None)?;
    crate::convert::copy_job(s.dev.clone(), d.dev.clone(), copy_opts)?;
    Ok(0)
}

/// A bytes progress bar on stderr.
pub(crate) fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style);
    }
    b
}

/// How [`wait_job`] leaves its progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BarEnd {
    /// Removed from the terminal.
    Clear,
    /// Left showing the bytes the job handled, full.
    Keep,
}

/// Waits for the job `h` to end, a progress bar on stderr following it when `show`; returns
/// its result.
pub(crate) fn wait_job(h: JobHandle, show: bool, end: BarEnd) -> JobResult {
    let bar = show.then(|| progress_bar(1));
    while !h.wait_timeout(Duration::from_millis(100)) {
        if let Some(b) = &bar {
            let p = h.progress();
            b.set_length(p.total.max(1));
            b.set_position(p.done);
        }
    }
    let done = h.progress().done;
    let r = h.wait_blocking();
    match (bar, end) {
        (Some(b), BarEnd::Clear) => b.finish_and_clear(),
        (Some(b), BarEnd::Keep) => {
            b.set_length(done.max(1));
            b.set_position(done);
            b.finish();
        }
        (None, _) => {}
    }
    r
}

/// Copies every data run of `src` to a freshly created `dst` (which reads as zeros), skipping
/// runs that are or read as zeros. Calls `on_progress` with the bytes done.
pub fn copy(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    mut on_progress: impl FnMut(u64),
) -> Result<(), CliError> {
    let size = src.info().virtual_size;
    if dst.info().virtual_size < size {
        return Err(CliError::new("the destination is smaller than the source"));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let want = (size - pos).min(CHUNK);
        let run = src.block_status(pos, want)?;
        let n = run.len.min(want);
        if run.status == BlockStatus::Data {
            let b = &mut buf[..n as usize];
            src.read_at(b, pos)?;
            if b.iter().any(|&x| x != 0) {
                dst.write_at(b, pos)?;
            }
        }
        pos += n;
        on_progress(pos);
    }
    Ok(())
}

pub fn compare(a: &Path, fa: Option<&str>, b: &Path, fb: Option<&str>, strict: bool) -> CliResult {
    // Like qemu-img: 0 identical, 1 different, 2 on error.
    let as_err = |e: CliError| CliError::with_code(e.message, 2);
    let ia = image::open(a, fa, true).map_err(as_err)?;
    let ib = image::open(b, fb, true).map_err(as_err)?;
    match first_difference(&*ia.dev, &*ib.dev, strict).map_err(as_err)? {
        None => {
            println!("Images are identical.");
            Ok(0)
        }
        Some(Difference::Size) => {
            println!("Strict mode: Image size mismatch!");
            Ok(1)
        }
        Some(Difference::Status(off)) => {
            println!("Strict mode: Offset {off} block status mismatch!");
            Ok(1)
        }
        Some(Difference::At(off)) => {
            // qemu-img reports the start of the first differing 512-byte sector.
            println!("Content mismatch at offset {}!", off - off % 512);
            Ok(1)
        }
    }
}

/// Where two disks first differ.
pub enum Difference {
    /// Sizes differ (strict mode only).
    Size,
    /// The first differing byte offset.
    At(u64),
    /// Allocation status differs at this offset (strict mode only).
    Status(u64),
}

/// Finds the first difference; beyond the smaller disk, the larger must read as zeros.
pub fn first_difference(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    strict: bool,
) -> Result<Option<Difference>, CliError> {
    let (sa, sb) = (a.info().virtual_size, b.info().virtual_size);
    if strict && sa != sb {
        return Ok(Some(Difference::Size));
    }
    let common = sa.min(sb);
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        let n = (common - pos).min(CHUNK);
        let (ra, rb) = (a.block_status(pos, n)?, b.block_status(pos, n)?);
        let step = ra.len.min(rb.len).min(n);
        // Strict, like qemu-img: allocation status must match too.
        if strict && ra.status != rb.status {
            return Ok(Some(Difference::Status(pos)));
        }
        let zero = |s: BlockStatus| s != BlockStatus::Data;
        if !(zero(ra.status) && zero(rb.status)) {
            let x = &mut ba[..step as usize];
            let y = &mut bb[..step as usize];
            a.read_at(x, pos)?;
            b.read_at(y, pos)?;
            if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
                return Ok(Some(Difference::At(pos + i as u64)));
            }
        }
        pos += step;
    }
    let larger = if sa > sb { a } else { b };
    let end = sa.max(sb);
    while pos < end {
        let n = (end - pos).min(CHUNK);
        let run = larger.block_status(pos, n)?;
        if run.status != BlockStatus::Data {
            pos += run.len;
            continue;
        }
        let x = &mut ba[..run.len.min(n) as usize];
        larger.read_at(x, pos)?;
        if let Some(i) = x.iter().position(|&p| p != 0) {
            return Ok(Some(Difference::At(pos + i as u64)));
        }
        pos += x.len() as u64;
    }
    Ok(None)
}

/// `check`'s `-r [MODE]` and image: `-r IMG` (clap takes IMG as the mode), `-r leaks IMG`
/// and `-r all IMG` repair; any other mode is refused. Returns (repair, image).
pub fn check_repair_mode(
    mode: Option<String>,
    image: Option<std::path::PathBuf>,
) -> Result<(bool, std::path::PathBuf), CliError> {
    let is_mode = |m: &str| matches!(m, "leaks" | "all");
    match (mode, image) {
        (None, Some(img)) => Ok((false, img)),
        (Some(m), Some(img)) if is_mode(&m) => Ok((true, img)),
        (Some(m), Some(_)) => Err(CliError::new(format!(
            "unknown repair mode '{m}' (use -r, -r leaks or -r all)"
        ))),
        (Some(m), None) if !is_mode(&m) => Ok((true, m.into())),
        (_, None) => Err(CliError::new("check needs an image")),
    }
}

pub fn check(path: &Path, format: Option<&str>, repair: bool, json: bool) -> CliResult {
    let started = Instant::now();
    let fmt = format.map(parse_format).transpose()?;
    let (mut corruptions, repaired) = check_one(path, fmt, repair)?;
    // Structures can check clean while the data is half-applied: say so (the exit status
    // is about the structures).
    let journal = vdisk::meta_ops::send::journal_path(path);
    if journal.exists() {
        eprintln!(
            "vdisk: {} has the journal of an interrupted receive beside it ({}): its data is \
             partly updated; finish it with `vdisk receive --resume {}` before using it",
            path.display(),
            journal.display(),
            path.display()
        );
    }
    // The whole chain: every parent's own structures, and every link's lineage.
    let mut opts = image::chain_options(format, true)?;
    opts.ignore_lineage = true;
    match vdisk::chain::Disk::open(path, &opts) {
        Err(e) => corruptions.push(format!("chain: {}", crate::cause_chain(&e))),
        Ok(disk) => {
            for (i, link) in disk.links().iter().enumerate() {
                if let vdisk::chain::LinkCheck::Mismatch(m) = link {
                    corruptions.push(format!("chain link {i}: {m}"));
                }
            }
            for l in disk.layers().iter().skip(1) {
                let (c, _) = check_one(&l.path, Some(l.format), false)?;
                corruptions.extend(c.into_iter().map(|c| format!("{}: {c}", l.path.display())));
            }
        }
    }
    if json {
        let v = json!({
            "filename": path.display().to_string(),
            "check-errors": corruptions.len(),
            "corruptions": corruptions,
            "repaired": repaired,
        });
        println!("{}", pretty(&v));
    } else {
        for c in &corruptions {
            println!("ERROR: {c}");
        }
        for r in &repaired {
            println!("Repaired: {r}");
        }
        if corruptions.is_empty() {
            println!(
                "No errors were found on the image ({} ms).",
                started.elapsed().as_millis()
            );
        } else {
            println!("{} errors were found on the image.", corruptions.len());
        }
    }
    Ok(if corruptions.is_empty() { 0 } else { 2 })
}

/// Checks one image file's own structures; returns (problems left, repairs made).
fn check_one(
    path: &Path,
    format: Option<Format>,
    repair: bool,
) -> Result<(Vec<String>, Vec<String>), CliError> {
    use vdisk::block_io::FileStorage;
    let mut s = FileStorage::open(path, &image::file_options(!repair))?;
    let format = match format {
        Some(f) => f,
        None => vdisk::chain::detect(&s)?,
    };
    image::refuse_writers_if_format(&mut s, format)?;
    Ok(match format {
        Format::Raw => (Vec::new(), Vec::new()),
        Format::Vhd => {
            let r = if repair {
                vdisk::vhd_format::repair_storage(&s)?
            } else {
                vdisk::vhd_format::check_storage(&s)?
            };
            let (fixed, left): (Vec<_>, Vec<_>) = r.issues.into_iter().partition(|i| i.repaired);
            (
                left.into_iter().map(|i| i.message).collect(),
                fixed.into_iter().map(|i| i.message).collect(),
            )
        }
        Format::Vhdx => match vdisk::vhdx_format::VhdxFile::open(
            s,
            &vhdx_format::OpenOptions::new().read_only(!repair),
        ) {
            Err(e) => (vec![e.chain_string()], Vec::new()),
            Ok(f) => {
                let r = if repair { f.repair()? } else { f.check()? };
                let mut fixed = Vec::new();
                if r.log_replayed {
                    fixed.push("replayed the log".to_string());
                } else if r.log_was_dirty {
                    // Not corruption: a crash leaves a log to replay. Say so on stderr.
                    eprintln!(
                        "note: {}: the log holds writes not yet replayed into the file, the \
                         normal state after a crash; they were replayed in memory and check \
                         clean (-r replays them into the file)",
                        path.display()
                    );
                }
                (r.errors, fixed)
            }
        },
    })
}

pub fn map(path: &Path, format: Option<&str>, json: bool) -> CliResult {
    let img: Image = image::open(path, format, true)?;
    let size = img.dev.info().virtual_size;
    let stdout = std::io::stdout();
    let mut out = MapWriter {
        out: std::io::BufWriter::new(stdout.lock()),
        img: &img,
        path,
        json,
        last: None,
        written: 0,
    };
    out.start()?;
    let mut pos = 0;
    while pos < size {
        let (r, depth) = match &img.chain {
            Some(c) => c.block_status_depth(pos, size - pos)?,
            None => (img.dev.block_status(pos, size - pos)?, 0),
        };
        let len = r.len.clamp(1, size - pos);
        out.push(Run {
            start: pos,
            len,
            status: r.status,
            offset: r.file_offset,
            depth,
        })?;
        pos += len;
    }
    out.finish()?;
    Ok(0)
}

/// One run of `map`: where it starts, how long, what it is and where it lives.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    len: u64,
    status: BlockStatus,
    offset: Option<u64>,
    depth: usize,
}

impl Run {
    /// Whether `next` continues this run in status, layer and file offset (checked: a
    /// malformed image may report any offset).
    fn extended_by(&self, next: &Run) -> bool {
        self.status == next.status
            && self.depth == next.depth
            && match (self.offset, next.offset) {
                (Some(o), Some(n)) => o.checked_add(self.len) == Some(n),
                (None, None) => true,
                _ => false,
            }
    }
}

/// Prints `map`'s runs as they come, merging adjacent equal ones: constant memory however
/// many runs an image has.
struct MapWriter<'a, W: std::io::Write> {
    out: W,
    img: &'a Image,
    path: &'a Path,
    json: bool,
    /// The run being extended, not yet printed.
    last: Option<Run>,
    /// Runs printed so far.
    written: u64,
}

impl<W: std::io::Write> MapWriter<'_, W> {
    fn start(&mut self) -> Result<(), CliError> {
        if self.json {
            self.write("[")
        } else {
            let head = format!("{:<20}{:<20}{:<20}File\n", "Offset", "Length", "Mapped to");
            self.write(&head)
        }
    }

    fn push(&mut self, run: Run) -> Result<(), CliError> {
        match &mut self.last {
            Some(last) if last.extended_by(&run) => last.len += run.len,
            _ => {
                if let Some(done) = self.last.replace(run) {
                    self.emit(done)?;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), CliError> {
        if let Some(done) = self.last.take() {
            self.emit(done)?;
        }
        if self.json {
            self.write("]\n")?;
        }
        self.out
            .flush()
            .map_err(|e| CliError::new(format!("writing the map failed: {e}")))
    }

    fn emit(&mut self, r: Run) -> Result<(), CliError> {
        let line = if self.json {
            let mut m = json!({
                "start": r.start,
                "length": r.len,
                "depth": r.depth,
                "present": r.status != BlockStatus::Unallocated,
                "zero": r.status != BlockStatus::Data,
                "data": r.status == BlockStatus::Data,
                "compressed": false,
            });
            if let (Some(o), serde_json::Value::Object(map)) = (r.offset, &mut m) {
                map.insert("offset".into(), json!(o));
                let layer = self
                    .img
                    .chain
                    .as_ref()
                    .and_then(|c| c.layers().get(r.depth));
                if let Some(l) = layer {
                    map.insert("filename".into(), json!(l.path.display().to_string()));
                }
            }
            let sep = if self.written == 0 { "" } else { "," };
            format!("{sep}\n{m}")
        } else if r.status == BlockStatus::Data {
            let mapped = r.offset.map_or("-".to_string(), |o| format!("{o:#x}"));
            // The file of the layer the run is in, as qemu-img map prints it.
            let layer = self
                .img
                .chain
                .as_ref()
                .and_then(|c| c.layers().get(r.depth))
                .filter(|_| r.depth > 0);
            format!(
                "{:<20}{:<20}{:<20}{}\n",
                format!("{:#x}", r.start),
                format!("{:#x}", r.len),
                mapped,
                layer.map_or(self.path, |l| l.path.as_path()).display()
            )
        } else {
            String::new()
        };
        self.written += 1;
        self.write(&line)
    }

    fn write(&mut self, s: &str) -> Result<(), CliError> {
        self.out
            .write_all(s.as_bytes())
            .map_err(|e| CliError::new(format!("writing the map failed: {e}")))
    }
}

pub fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// "1 GiB", "512 KiB", "100 B".
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000 ", " ")
    }
}
