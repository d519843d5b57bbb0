//! The compact job on the fault-injecting backend and under control:
//! - crash sweep: a dynamic VHD or VHDX (blocks with data, blocks allocated but all zeros) on a
//!   `FaultStorage` is compacted online while a guest thread writes and flushes through the
//!   `LiveDisk`; the power is cut after the N-th write or sync (every N up to the clean run's
//!   count), and each crash image (pending writes lost, kept or torn by a seed) must open,
//!   check clean and hold every guest write that was acknowledged and flushed (blocks
//!   written after the last good flush may read either way);
//! - pause, resume, rate limit and cancel: a cancelled compaction leaves the image valid and
//!   reading as before; a completed one without guests shrinks the file;
//! - the parent of a live VHDX chain compacted while guests write the child: the base file
//!   shrinks, the guests see their model, and the chain reopens with lineage checks on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage, Storage};
use meta_ops::{CompactTarget, Job, JobError, JobRunner, LiveDisk, Phase};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 8 << 20;
const BLK: u64 = 4096;

/// The image's bytes: every block allocated in order, about half of them then zeroed (the
/// job reclaims those and moves the later ones down).
fn image(vhdx: bool, seed: u64) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev: Arc<dyn BlockDevice> = if vhdx {
        let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
        o.block_size = Some(1 << 20);
        Arc::new(vhdx_format::create(mem.clone(), &o).unwrap())
    } else {
        let mut o = vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
        o.block_size = 512 << 10;
        Arc::new(vhd_format::VhdFile::create(mem.clone(), &o).unwrap())
    };
    let bs = if vhdx { 1u64 << 20 } else { 512 << 10 };
    for b in 0..SIZE / bs {
        dev.write_at(&vec![b as u8 + 1; 8192], b * bs).unwrap();
    }
    for b in 0..SIZE / bs {
        if rng.random_bool(0.5) {
            dev.write_zeroes(b * bs, bs, false).unwrap();
        }
    }
    dev.flush().unwrap();
    drop(dev); // closes the VHDX log
    mem.to_vec().unwrap()
}

fn target_on<S: Storage + 'static>(vhdx: bool, s: S) -> block_io::Result<Arc<CompactTarget>> {
    let t = if vhdx {
        CompactTarget::vhdx(Arc::new(vhdx_format::VhdxFile::open(
            s,
            &vhdx_format::OpenOptions::new().read_only(false),
        )?))
    } else {
        CompactTarget::vhd(Arc::new(vhd_format::VhdFile::open(
            s,
            &vhd_format::OpenOptions::new().read_only(false),
        )?))
    };
    t.map_err(|e| block_io::Error::new(block_io::ErrorKind::Io, e.to_string()))
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.info().virtual_size as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// What the guest knows when the power goes.
#[derive(Default)]
struct Known {
    model: Vec<u8>,
    /// The disk as of the last flush that returned success.
    flushed: Vec<u8>,
    /// Blocks written after that flush (or by a write that failed).
    unsure: HashSet<u64>,
}

/// The workload with the power cut after `cut` ops (none: a clean run). Returns what the
/// guest knows, the storage and the ops the compaction and guest did.
fn workload(
    runner: &JobRunner,
    vhdx: bool,
    bytes: &[u8],
    cut: Option<u64>,
    seed: u64,
) -> (Known, Arc<FaultStorage>, u64) {
    let fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(bytes)));
    let target = target_on(vhdx, fs.clone()).unwrap();
    let initial = read_all(&*target.device());
    let ops0 = fs.ops();
    if let Some(n) = cut {
        fs.set_cut(CutPoint::AfterOps(ops0 + n));
    }
    let live = LiveDisk::new(target.device());
    let known = Arc::new(Mutex::new(Known {
        model: initial.clone(),
        flushed: initial,
        unsure: HashSet::new(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (live, known, stop) = (live.clone(), known.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfeed);
            let mut n = 0u8;
            while !stop.load(Ordering::Acquire) {
                if rng.random_bool(0.2) {
                    if live.flush().is_ok() {
                        let mut k = known.lock();
                        k.flushed = k.model.clone();
                        k.unsure.clear();
                    }
                    continue;
                }
                let b = rng.random_range(0..SIZE / BLK);
                n = n.wrapping_add(1);
                let data = vec![n | 1; BLK as usize];
                let r = live.write_at(&data, b * BLK);
                let mut k = known.lock();
                k.unsure.insert(b);
                if r.is_ok() {
                    let at = (b * BLK) as usize;
                    k.model[at..at + BLK as usize].copy_from_slice(&data);
                }
                drop(k);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let r = runner
        .start(&live, Job::compact(target.clone()))
        .unwrap()
        .wait_blocking();
    if cut.is_none() {
        r.unwrap();
    }
    stop.store(true, Ordering::Release);
    guest.join().unwrap();
    let ops = fs.ops() - ops0;
    let k = std::mem::take(&mut *known.lock());
    drop(live);
    drop(target);
    (k, fs, ops)
}

fn sweep(vhdx: bool) {
    let runner = JobRunner::new().unwrap();
    let bytes = image(vhdx, 7);
    let (_, _, total) = workload(&runner, vhdx, &bytes, None, 1);
    assert!(total > 20, "{total} ops");
    // Every cut point (a sample when the run is long: the guest makes counts vary a little).
    let step = (total / 150).max(1);
    let mut checked = 0;
    for n in (0..=total + 2).step_by(step as usize) {
        let (k, fs, _) = workload(&runner, vhdx, &bytes, Some(n), n);
        for seed in 0..3 {
            let img = fs.crash_image(seed + n);
            let what = format!("vhdx {vhdx} cut {n} seed {seed}");
            let dev: Arc<dyn BlockDevice> = if vhdx {
                let f = vhdx_format::VhdxFile::open(
                    img.clone(),
                    &vhdx_format::OpenOptions::new().read_only(false),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let r = f.check().unwrap();
                assert!(r.errors.is_empty(), "{what}: {r:?}");
                Arc::new(f)
            } else {
                let r = vhd_format::check_storage(&img).unwrap();
                let f = vhd_format::VhdFile::open(
                    img.clone(),
                    &vhd_format::OpenOptions::new().read_only(false),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                // A lost footer (the copy at 0 used) is repaired by the writable open.
                let r2 = vhd_format::check_storage(f.storage()).unwrap();
                assert!(r2.is_clean(), "{what}: {r:?} then {r2:?}");
                Arc::new(f)
            };
            let got = read_all(&*dev);
            for b in 0..SIZE / BLK {
                if k.unsure.contains(&b) {
                    continue;
                }
                let r = (b * BLK) as usize..((b + 1) * BLK) as usize;
                assert!(got[r.clone()] == k.flushed[r], "{what}: block {b}");
            }
            checked += 1;
        }
    }
    assert!(checked > 20);
}

#[test]
fn crash_sweep_vhd() {
    sweep(false);
}

#[test]
fn crash_sweep_vhdx() {
    sweep(true);
}

/// Paused: no progress; resumed under a rate limit; cancelled: the image reads as before and
/// checks clean. Then a full run without guests shrinks the file.
#[test]
fn pause_resume_rate_cancel_then_complete() {
    let runner = JobRunner::new().unwrap();
    for vhdx in [false, true] {
        let bytes = image(vhdx, 3);
        let mem = Arc::new(MemStorage::from_bytes(&bytes));
        let target = target_on(vhdx, mem.clone()).unwrap();
        let before = read_all(&*target.device());
        let live = LiveDisk::new(target.device());
        // 1 MiB/s: a few blocks a second.
        let h = runner
            .start(&live, Job::compact(target.clone()).rate(1 << 20))
            .unwrap();
        assert!(matches!(
            runner.start(&live, Job::compact(target.clone())),
            Err(JobError::Busy)
        ));
        h.pause();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(h.progress().phase, Phase::Paused);
        let done = h.progress().done;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(h.progress().done, done, "no progress while paused");
        h.resume();
        h.set_rate(4 << 20);
        std::thread::sleep(Duration::from_millis(400));
        assert!(h.progress().done > done, "progress after resume");
        h.cancel();
        assert!(h.wait_blocking().unwrap_err().is_cancelled());
        assert!(!live.job_running());
        assert_eq!(read_all(&*live), before);
        // Guest reads are lock-free again, and mapped reads allowed.
        let mut out = Vec::new();
        let _ = live.map(0, 4096, false, &mut out);
        drop(live);
        // The whole job, with no guest: the file shrinks by the zeroed blocks.
        let live = LiveDisk::new(target.device());
        let r = runner
            .start(&live, Job::compact(target.clone()))
            .unwrap()
            .wait_blocking()
            .unwrap();
        let s = target.stats();
        assert!(s.reclaimed_blocks > 0, "{s:?}");
        assert!(
            s.len_after + s.reclaimed_blocks * s.block_size <= bytes.len() as u64,
            "{s:?} {r:?}"
        );
        assert_eq!(mem.len().unwrap(), s.len_after);
        assert_eq!(read_all(&*live), before);
        drop(live);
        drop(target);
        let again = target_on(vhdx, MemStorage::from_bytes(&mem.to_vec().unwrap())).unwrap();
        assert_eq!(read_all(&*again.device()), before);
    }
}

/// A VHDX base (zeroed blocks among data) under a differencing child, on files; the base is
/// compacted online (`open_chain_for_compact_layer` at depth 1) while guests write the child.
#[test]
fn parent_of_a_live_chain_compacts_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let bytes = image(true, 11);
    std::fs::write(&base, &bytes).unwrap();
    let dwg = vhdx_format::open_file(&base, &vhdx_format::OpenOptions::new().read_only(true))
        .unwrap()
        .header()
        .data_write_guid;
    let mut o = vhdx_format::CreateOptions::differencing(
        SIZE,
        vhdx_format::ParentRef {
            data_write_guid: dwg,
            relative_path: "base.vhdx".into(),
            absolute_path: None,
        },
    );
    o.block_size = Some(1 << 20);
    vhdx_format::create_file(&child, &o)
        .unwrap()
        .close()
        .unwrap();
    let (disk, target) =
        meta_ops::open_chain_for_compact_layer(&child, &chain::OpenOptions::new(), 1).unwrap();
    let live = LiveDisk::new(disk);
    let initial = read_all(&*live);
    let guests = common::start(&live, common::Model::new(initial, 1), 2, 11, false);
    guests.run_for_ops(50);
    let r = runner
        .start(&live, Job::compact(target.clone()))
        .unwrap()
        .wait_blocking()
        .unwrap();
    guests.run_for_ops(100);
    let (model, counts) = guests.stop();
    assert_eq!(counts.errors.load(Ordering::Relaxed), 0);
    assert_eq!(counts.mismatches.load(Ordering::Relaxed), 0);
    assert_eq!(common::mismatches(&*live, 0, &model.cur), 0);
    let s = target.stats();
    assert!(s.reclaimed_blocks > 0 && s.freed() > 0, "{s:?} {r:?}");
    live.flush().unwrap();
    drop(live);
    drop(target);
    assert!(std::fs::metadata(&base).unwrap().len() < bytes.len() as u64);
    // The chain opens with lineage checks on (the base kept its DataWriteGuid).
    let again = chain::Disk::open(&child, &chain::OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(common::mismatches(&again, 0, &model.cur), 0);
    assert_eq!(
        vhdx_format::open_file(&base, &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap()
            .header()
            .data_write_guid,
        dwg
    );
}
