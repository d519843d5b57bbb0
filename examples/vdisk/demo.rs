//! `vdisk demo`: a guided tour in a temporary folder. Each step does real work, verifies it,
//! and is timed; a failed verification fails the demo. The tour grows with each capability.

use std::path::Path;
use std::time::Instant;

use vdisk::block_io::{
    BlockDevice, CutPoint, FaultStorage, MemStorage, RateLimiter, RawDisk, Storage,
};

use vdisk::chain::Format;

use crate::cmds::{copy, first_difference, human};
use crate::image::{self, Image};
use crate::info::actual_size;
use crate::{CliError, CliResult};

struct Step {
    name: &'static str,
    detail: String,
    millis: u128,
}

fn verify(ok: bool, what: &str) -> Result<(), CliError> {
    if ok {
        Ok(())
    } else {
        Err(CliError::new(format!("demo verification failed: {what}")))
    }
}

pub fn run(keep: bool) -> CliResult {
    let dir = tempfile::Builder::new()
        .prefix("vdisk-demo-")
        .tempdir()
        .map_err(|e| CliError::new(format!("cannot make a temporary folder: {e}")))?;
    println!("vdisk demo in {}\n", dir.path().display());
    let mut steps = Vec::new();
    let started = Instant::now();
    type StepFn = fn(&Path) -> Result<String, CliError>;
    let plan: [(&'static str, StepFn); 9] = [
        ("create + write a raw disk", raw_roundtrip),
        ("convert, skipping holes", convert_sparse),
        ("VHDX: create, write, snapshot", vhdx_snapshot),
        ("lineage: modified parent", lineage_guard),
        ("convert a chain to VHD", chain_to_vhd),
        ("crash consistency", crash_tour),
        ("throttled copy", throttled_copy),
        ("online convert, guest writing", online_convert),
        ("offload copy between providers", crate::provider::demo_step),
    ];
    for (name, f) in plan {
        let t = Instant::now();
        println!("== {name}");
        let detail = f(dir.path())?;
        let millis = t.elapsed().as_millis();
        println!("   {detail}\n   ok in {millis} ms\n");
        steps.push(Step {
            name,
            detail,
            millis,
        });
    }
    println!("Summary ({} ms in all)", started.elapsed().as_millis());
    for s in &steps {
        println!("  [ok] {:<28} {:>6} ms  {}", s.name, s.millis, s.detail);
    }
    if keep {
        let p = dir.keep();
        println!("\nfiles kept in {}", p.display());
    }
    Ok(0)
}

/// Creates a sparse 64 MiB raw disk, writes patterns at scattered offsets, reads them back.
fn raw_roundtrip(dir: &Path) -> Result<String, CliError> {
    let path = dir.join("disk.raw");
    let img = image::create(Format::Raw, &path, 64 << 20, &[], None)?;
    let writes: Vec<(u64, u8)> = (0..16u64)
        .map(|i| (i * (4 << 20) + i * 4096, i as u8 + 1))
        .collect();
    for &(off, p) in &writes {
        img.dev.write_at(&vec![p; 64 * 1024], off)?;
    }
    img.dev.flush()?;
    drop(img);
    let img = image::open(&path, None, true)?;
    let mut buf = vec![0u8; 64 * 1024];
    for &(off, p) in &writes {
        img.dev.read_at(&mut buf, off)?;
        verify(buf.iter().all(|&b| b == p), "pattern read back")?;
    }
    Ok(format!(
        "64 MiB raw disk, 16 x 64 KiB patterns written, flushed, reopened and verified ({} on disk)",
        human(actual_size(&path))
    ))
}

/// Converts the raw disk to another raw file; the copy skips holes and compares equal.
fn convert_sparse(dir: &Path) -> Result<String, CliError> {
    let src = image::open(&dir.join("disk.raw"), None, true)?;
    let dst_path = dir.join("copy.raw");
    let dst = convert_into(&src, Format::Raw, &dst_path)?;
    verify(
        first_difference(&*src.dev, &*dst.dev, true)?.is_none(),
        "copy equals source",
    )?;
    let used = actual_size(&dst_path);
    verify(used < 8 << 20, "copy stayed sparse")?;
    Ok(format!(
        "copied 64 MiB virtual, wrote only the data ({} allocated), compare: identical",
        human(used)
    ))
}

/// Creates a dynamic VHDX, writes it, takes a snapshot (differencing child), writes the child,
/// and reads the chain back: the child's bytes over the parent's, sector-exact.
fn vhdx_snapshot(dir: &Path) -> Result<String, CliError> {
    let base = dir.join("base.vhdx");
    let child = dir.join("snap.vhdx");
    let img = image::create(Format::Vhdx, &base, 256 << 20, &[], None)?;
    img.dev.write_at(&vec![0x42; 8 << 20], 0)?;
    img.dev.flush()?;
    drop(img);
    let snap = image::create(Format::Vhdx, &child, 0, &[], Some(&base))?;
    drop(snap);
    let chain = image::open(&child, None, false)?;
    chain.dev.write_at(&vec![0x99; 4096], 4 << 20)?;
    chain.dev.write_at(&vec![0x77; 512], (4 << 20) + 8192)?;
    chain.dev.flush()?;
    drop(chain);
    let chain = image::open(&child, None, true)?;
    let mut buf = vec![0u8; 16384];
    chain.dev.read_at(&mut buf, 4 << 20)?;
    let ok = buf[..4096].iter().all(|&b| b == 0x99)
        && buf[4096..8192].iter().all(|&b| b == 0x42)
        && buf[8192..8704].iter().all(|&b| b == 0x77)
        && buf[8704..].iter().all(|&b| b == 0x42);
    verify(ok, "the snapshot reads child sectors over parent sectors")?;
    let parent = image::open(&base, None, true)?;
    parent.dev.read_at(&mut buf, 4 << 20)?;
    verify(buf.iter().all(|&b| b == 0x42), "the parent is untouched")?;
    Ok(format!(
        "256 MiB dynamic VHDX ({}), snapshot ({}) took 4 KiB + 512 B of writes; chain verified",
        human(actual_size(&base)),
        human(actual_size(&child))
    ))
}

/// Writes to the parent after the snapshot: its DataWriteGuid changes and the child refuses
/// to open on top of it, naming both ids. (Done on copies, so the chain stays usable.)
fn lineage_guard(dir: &Path) -> Result<String, CliError> {
    let sub = dir.join("lineage");
    std::fs::create_dir_all(&sub).map_err(|e| CliError::new(e.to_string()))?;
    for f in ["base.vhdx", "snap.vhdx"] {
        std::fs::copy(dir.join(f), sub.join(f)).map_err(|e| CliError::new(e.to_string()))?;
    }
    let p = image::open(&sub.join("base.vhdx"), None, false)?;
    p.dev.write_at(&[1u8; 512], 0)?;
    p.dev.flush()?;
    drop(p);
    let opts = image::chain_options(None, true)?;
    match vdisk::chain::Disk::open(sub.join("snap.vhdx"), &opts) {
        Ok(_) => Err(CliError::new(
            "demo verification failed: a modified parent was accepted",
        )),
        Err(e @ vdisk::chain::ChainError::LineageMismatch { .. }) => {
            let msg = e.to_string();
            Ok(format!(
                "refused: {}",
                msg.chars().take(110).collect::<String>() + "..."
            ))
        }
        Err(e) => Err(CliError::new(format!(
            "unexpected error: {}",
            crate::cause_chain(&e)
        ))),
    }
}

/// Converts the VHDX chain into one dynamic VHD and compares contents.
fn chain_to_vhd(dir: &Path) -> Result<String, CliError> {
    let src = image::open(&dir.join("snap.vhdx"), None, true)?;
    let dst_path = dir.join("flat.vhd");
    drop(convert_into(&src, Format::Vhd, &dst_path)?);
    let dst = image::open(&dst_path, None, true)?;
    verify(
        first_difference(&*src.dev, &*dst.dev, false)?.is_none(),
        "the VHD equals the chain",
    )?;
    Ok(format!(
        "2-deep VHDX chain -> dynamic VHD ({}), compare: identical",
        human(actual_size(&dst_path))
    ))
}

/// Writes A, flushes, writes B, cuts the power, and inspects 200 possible crash images.
fn crash_tour(_dir: &Path) -> Result<String, CliError> {
    let base = MemStorage::new();
    base.set_len(1 << 20)?;
    let fault = FaultStorage::new(base);
    fault.set_cut(CutPoint::AfterOps(4));
    let disk = RawDisk::new(fault)?;
    disk.write_at(&[0xAA; 8192], 0)?; // op 0
    disk.flush()?; // op 1
    disk.write_at(&[0xBB; 8192], 65536)?; // op 2
    disk.write_at(&[0xCC; 4096], 0)?; // op 3: overwrites flushed data, unflushed
    let cut = disk.flush().is_err(); // op 4: the power goes
    verify(cut, "the armed cut struck")?;
    let fault = disk.into_storage();
    let (mut b_whole, mut b_lost, mut b_torn) = (0, 0, 0);
    for seed in 0..200 {
        let img = fault.crash_image(seed).to_vec()?;
        // Sectors of A are either A or the unflushed overwrite, never anything else.
        verify(
            img[..8192]
                .chunks(512)
                .all(|s| s.iter().all(|&b| b == 0xAA) || s.iter().all(|&b| b == 0xCC)),
            "flushed data intact or cleanly overwritten",
        )?;
        let b = &img[65536..65536 + 8192];
        match b.chunks(512).filter(|s| s[0] == 0xBB).count() {
            16 => b_whole += 1,
            0 => b_lost += 1,
            _ => b_torn += 1,
        }
    }
    verify(b_whole > 0 && b_lost > 0 && b_torn > 0, "all fates reached")?;
    Ok(format!(
        "power cut after 4 ops; 200 crash images: flushed data always intact; unflushed write whole {b_whole}, lost {b_lost}, torn {b_torn}"
    ))
}

/// Copies 16 MiB through a 64 MiB/s token bucket (1 MiB burst) and measures the rate: the
/// bucket starts full, so the first MiB goes at once and the rate is the 15 MiB after it.
fn throttled_copy(_dir: &Path) -> Result<String, CliError> {
    const LIMIT: f64 = (64u64 << 20) as f64;
    let limiter = RateLimiter::new(64 << 20, 1 << 20);
    let src = RawDisk::new(MemStorage::from_bytes(&vec![7u8; 16 << 20]))?;
    let dst_s = MemStorage::new();
    dst_s.set_len(16 << 20)?;
    let dst = RawDisk::new(dst_s)?;
    let t = Instant::now();
    let mut after_burst = None;
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..16u64 {
        limiter.acquire(1 << 20);
        if i == 1 {
            after_burst = Some(Instant::now());
        }
        src.read_at(&mut buf, i << 20)?;
        dst.write_at(&buf, i << 20)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let paced = after_burst.map_or(secs, |a| a.elapsed().as_secs_f64());
    // 14 MiB were paced between the second acquire and the end (the last MiB's copy aside).
    let rate = (14u64 << 20) as f64 / paced.max(1e-9);
    verify(
        (0.5 * LIMIT..1.02 * LIMIT).contains(&rate),
        "the limiter held the rate at 64 MiB/s",
    )?;
    verify(
        dst.into_storage().to_vec()? == vec![7u8; 16 << 20],
        "throttled copy is complete",
    )?;
    Ok(format!(
        "16 MiB at a 64 MiB/s limit (1 MiB burst) took {secs:.2} s: {}/s past the burst",
        human(rate as u64)
    ))
}

/// An online job: a guest keeps writing a VHDX through a `LiveDisk` while a convert job (at
/// a 64 MiB/s rate limit) moves it into a new VHD and switches the guest over; every write,
/// before, during and after the switch, reads back, live and from the VHD reopened.
fn online_convert(dir: &Path) -> Result<String, CliError> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use vdisk::meta_ops::{Job, JobRunner, LiveDisk, Pivot};

    const SIZE: u64 = 32 << 20;
    const PIECE: u64 = 16 << 10;
    let job_err = |e: vdisk::meta_ops::JobError| CliError::new(crate::cause_chain(&e));
    let src = image::create(Format::Vhdx, &dir.join("live.vhdx"), SIZE, &[], None)?;
    let mut start = vec![0u8; SIZE as usize];
    for i in 0..8u64 {
        let off = i * (4 << 20);
        let d = vec![i as u8 + 1; 512 << 10];
        src.dev.write_at(&d, off)?;
        start[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    let vhd_path = dir.join("moved.vhd");
    let dst = image::create(Format::Vhd, &vhd_path, SIZE, &[], None)?;
    let live = LiveDisk::new(src.dev.clone());
    let model = Arc::new(Mutex::new(start));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    // The guest: one thread writing 16 KiB pieces at pseudo-random places, recording each in
    // the model once the write returned.
    let guest = {
        let (live, model, stop, writes) =
            (live.clone(), model.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || -> Result<(), CliError> {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (SIZE / PIECE)) * PIECE;
                let n = writes.fetch_add(1, Ordering::Relaxed);
                let d = vec![(n % 251) as u8 + 1; PIECE as usize];
                live.write_at(&d, off)?;
                let mut m = model
                    .lock()
                    .map_err(|_| CliError::new("model lock poisoned"))?;
                m[off as usize..(off + PIECE) as usize].copy_from_slice(&d);
            }
            Ok(())
        })
    };
    let runner = JobRunner::new().map_err(job_err)?;
    let job = Job::convert(dst.dev.clone())
        .pivot(Pivot::Switch)
        .rate(64 << 20);
    let report = runner
        .start(&live, job)
        .map_err(job_err)?
        .wait_blocking()
        .map_err(job_err)?;
    let during = writes.load(Ordering::Relaxed);
    // The guest goes on for a moment on the VHD.
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    guest
        .join()
        .map_err(|_| CliError::new("the guest thread panicked"))??;
    live.flush()?;
    let model = model
        .lock()
        .map_err(|_| CliError::new("model lock poisoned"))?
        .clone();
    let mut got = vec![0u8; SIZE as usize];
    live.read_at(&mut got, 0)?;
    verify(
        got == model,
        "every guest write reads back after the switch",
    )?;
    let total = writes.load(Ordering::Relaxed);
    drop((live, runner, dst, src));
    let reopened = image::open(&vhd_path, None, true)?;
    verify(
        reopened.format == Format::Vhd,
        "the guest's disk is now the VHD",
    )?;
    reopened.dev.read_at(&mut got, 0)?;
    verify(
        got == model,
        "the VHD reopened from disk holds every guest write",
    )?;
    Ok(format!(
        "{total} guest writes ({during} while the job ran, {} blocks dirtied and copied again), \
         VHDX -> VHD in {} ms; guest writes paused {} us at the switch",
        report.blocks_dirtied,
        report.duration.as_millis(),
        report.pivot_pause.as_micros()
    ))
}

/// Creates `dst_path` as a `format` image the size of `src`, copies `src` into it (skipping
/// holes) and flushes it.
fn convert_into(src: &Image, format: Format, dst_path: &Path) -> Result<Image, CliError> {
    let dst = image::create(format, dst_path, src.dev.info().virtual_size, &[], None)?;
    copy(&*src.dev, &*dst.dev, |_| {})?;
    dst.dev.flush()?;
    Ok(dst)
}
