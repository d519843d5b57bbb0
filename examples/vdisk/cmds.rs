//! The verbs other than `io` and `demo`.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use vdisk::block_io::{BlockDevice, BlockStatus};
use vdisk::chain::Format;

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
    let size = match size {
        Some(s) => parse_size(s)?,
        None if backing.is_some() => 0,
        None => return Err(CliError::new("a size is needed unless -b names a parent")),
    };
    let img = image::create(format, path, size, options, backing)?;
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
    progress: bool,
    src: &Path,
    dst: &Path,
) -> CliResult {
    let out = parse_format(out_format)?;
    let s = image::open(src, format, true)?;
    let size = s.dev.info().virtual_size;
    let d = image::create(out, dst, size, options, None)?;
    let bar = progress.then(|| progress_bar(size));
    copy(&*s.dev, &*d.dev, |done| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    })?;
    d.dev.flush()?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(0)
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style);
    }
    b
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

pub fn check(path: &Path, format: Option<&str>, repair: bool, json: bool) -> CliResult {
    let started = Instant::now();
    let fmt = format.map(parse_format).transpose()?;
    let (mut corruptions, repaired) = check_one(path, fmt, repair)?;
    // The whole chain: every parent's own structures, and every link's lineage.
    let mut opts = image::chain_options(format, true)?;
    opts.ignore_lineage = true;
    match vdisk::chain::Disk::open(path, &opts) {
        Err(e) => corruptions.push(format!("chain: {e}")),
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
    use vdisk::block_io::{FileStorage, OpenOptions};
    let s = FileStorage::open(path, &OpenOptions::new().read_only(!repair))?;
    let format = match format {
        Some(f) => f,
        None => vdisk::chain::detect(&s)?,
    };
    Ok(match format {
        Format::Raw => (Vec::new(), Vec::new()),
        Format::Vhd => {
            let r = vdisk::vhd_format::check_storage(&s, repair)?;
            let (fixed, left): (Vec<_>, Vec<_>) = r.issues.into_iter().partition(|i| i.repaired);
            (
                left.into_iter().map(|i| i.message).collect(),
                fixed.into_iter().map(|i| i.message).collect(),
            )
        }
        Format::Vhdx => match vdisk::vhdx_format::VhdxFile::open(s, !repair) {
            Err(e) => (vec![e.chain_string()], Vec::new()),
            Ok(f) => {
                let r = f.check(repair)?;
                let mut fixed = Vec::new();
                if r.log_replayed {
                    fixed.push("replayed the log".to_string());
                } else if r.log_was_dirty {
                    // Not corruption: a crash leaves a log to replay. Say so on stderr.
                    eprintln!(
                        "note: {}: the log is dirty; it was replayed in memory only (-r writes it)",
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
    // (start, length, status, file offset, depth)
    let mut runs: Vec<(u64, u64, BlockStatus, Option<u64>, usize)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (r, depth) = match &img.chain {
            Some(c) => c.block_status_depth(pos, size - pos)?,
            None => (img.dev.block_status(pos, size - pos)?, 0),
        };
        let len = r.len.clamp(1, size - pos);
        // A run extends the last one when it continues it in status, layer and file offset
        // (checked: a malformed image may report any offset).
        let extends = |last: &(u64, u64, BlockStatus, Option<u64>, usize)| {
            last.2 == r.status
                && last.4 == depth
                && match (last.3, r.file_offset) {
                    (Some(o), Some(n)) => o.checked_add(last.1) == Some(n),
                    (None, None) => true,
                    _ => false,
                }
        };
        match runs.last_mut() {
            Some(last) if extends(last) => last.1 += len,
            _ => runs.push((pos, len, r.status, r.file_offset, depth)),
        }
        pos += len;
    }
    if json {
        let v: Vec<_> = runs
            .iter()
            .map(|&(start, length, st, off, depth)| {
                let mut m = json!({
                    "start": start,
                    "length": length,
                    "depth": depth,
                    "present": st != BlockStatus::Unallocated,
                    "zero": st != BlockStatus::Data,
                    "data": st == BlockStatus::Data,
                    "compressed": false,
                });
                if let (Some(o), serde_json::Value::Object(map)) = (off, &mut m) {
                    map.insert("offset".into(), json!(o));
                    let layer = img.chain.as_ref().and_then(|c| c.layers().get(depth));
                    if let Some(l) = layer {
                        map.insert("filename".into(), json!(l.path.display().to_string()));
                    }
                }
                m
            })
            .collect();
        println!("{}", pretty(&serde_json::Value::Array(v)));
    } else {
        println!("{:<20}{:<20}{:<20}File", "Offset", "Length", "Mapped to");
        for (start, length, st, off, _) in runs {
            if st == BlockStatus::Data {
                let mapped = off.map_or("-".to_string(), |o| format!("{o:#x}"));
                println!(
                    "{:<20}{:<20}{:<20}{}",
                    format!("{start:#x}"),
                    format!("{length:#x}"),
                    mapped,
                    path.display()
                );
            }
        }
    }
    Ok(0)
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
