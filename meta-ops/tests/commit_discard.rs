//! A guest discard of the live top during a commit uncovers BASE where the job already
//! wrote: what the guest reads there must not change at the pivot.
//!
//! The guest's chain reads BASE through the read-only handle it opened, whose block table and
//! sector bitmaps were loaded before the job allocated blocks in BASE through its own
//! writable handle. So after the guest discards a block of the top that the job had already
//! copied, the guest reads BASE as it was (zeros, or BASE's parent) while BASE now holds the
//! guest's old data there; after the pivot the guest reads BASE itself. The job must make
//! BASE show what the guest saw. Each case: the guest writes blocks, a slow commit copies the
//! first, the job is paused, the guest discards and reads that block, the commit finishes,
//! and the guest (on BASE) and BASE reopened must read what the guest read before the pivot.
//! Discards while guest writes go through to BASE (the converging phase) are covered too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, FileStorage, OpenOptions as FileOptions};
use chain::{Disk, OpenOptions};
use meta_ops::{CommitOptions, Job, JobHandle, JobOptions, JobRunner, LiveDisk, Phase, Retire};

const SIZE: u64 = 8 << 20;
const BLK: u64 = 4096;
/// The block the guest discards after the job copied it (the first the job copies).
const X: u64 = 0;

fn pattern(seed: u8) -> Vec<u8> {
    (0..BLK as usize)
        .map(|i| seed ^ (i as u8).wrapping_mul(31) ^ (i >> 9) as u8)
        .collect()
}

/// A dynamic VHD at `path`; `data` written into it.
fn dynamic(path: &Path, data: &[(u64, Vec<u8>)]) {
    let storage = FileStorage::create(path).unwrap();
    let o = vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
    let f = vhd_format::VhdFile::create(storage, &o).unwrap();
    for (off, d) in data {
        f.write_at(d, *off).unwrap();
    }
    f.close().unwrap();
}

/// An empty differencing VHD at `path` over `parent`.
fn child(path: &Path, parent: &Path) {
    let ps = FileStorage::open(parent, &FileOptions::new().read_only(true)).unwrap();
    let d = vhd_format::VhdFile::open(ps, &vhd_format::OpenOptions::new().read_only(true))
        .unwrap()
        .details();
    let name = parent.file_name().unwrap().to_str().unwrap();
    let o = vhd_format::DifferencingOptions::for_parent(
        &d,
        parent.display().to_string(),
        Some(parent.display().to_string()),
        Some(format!(".\\{name}")),
    );
    let storage = FileStorage::create(path).unwrap();
    vhd_format::VhdFile::create_differencing(storage, &o)
        .unwrap()
        .close()
        .unwrap();
}

/// A chain in `dir`, top first: with `deep`, BASE is a differencing image over an image
/// holding data at X (what a discard of the top then shows), else a dynamic image.
fn build(dir: &Path, deep: bool) -> (PathBuf, PathBuf) {
    let (base, top) = (dir.join("base.vhd"), dir.join("top.vhd"));
    if deep {
        let grand = dir.join("grand.vhd");
        dynamic(&grand, &[(X, pattern(0x5a))]);
        child(&base, &grand);
    } else {
        dynamic(&base, &[]);
    }
    child(&top, &base);
    (top, base)
}

fn read(dev: &dyn BlockDevice, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLK as usize];
    dev.read_at(&mut b, off).unwrap();
    b
}

fn wait_until(h: &JobHandle, what: &str, f: impl Fn(&JobHandle) -> bool) {
    let t0 = Instant::now();
    while !f(h) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {:?}",
            h.progress()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One case (see the module docs); `through`: the discard happens while guest changes go
/// through to BASE.
fn case(runner: &JobRunner, deep: bool, through: bool) -> Result<(), String> {
    let what = format!("deep {deep} through {through}");
    let dir = tempfile::tempdir().unwrap();
    let (top, base) = build(dir.path(), deep);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    // The guest's data: X first (the job copies in order), then blocks that keep the job
    // busy, one per 1 MiB.
    live.write_at(&pattern(1), X).unwrap();
    for i in 1..8u64 {
        live.write_at(&pattern(1 + i as u8), i << 20).unwrap();
    }
    // One 4 KiB chunk per 1/8 s.
    let opts = JobOptions {
        rate: 8 * BLK,
        granularity: BLK,
        chunk: BLK,
        parallel: 1,
        pivot_threshold: 0,
        background_passes: 1,
        ..JobOptions::default()
    };
    let job = Job::commit(disk.clone(), CommitOptions::new().retire(Retire::Keep))
        .unwrap()
        .options(opts);
    let h = runner.start(&live, job).unwrap();
    // X is copied once a chunk after it is reaped.
    wait_until(&h, "the first chunk", |h| h.progress().done >= BLK);
    if through {
        // Dirty blocks the pass is past: the next pass converges (write-through) and copies
        // them one chunk at a time.
        for k in 1..8u64 {
            live.write_at(&pattern(0x70 + k as u8), X + k * BLK)
                .unwrap();
        }
        wait_until(&h, "write-through", |h| {
            h.progress().phase == Phase::Converging
        });
    }
    h.pause();
    assert_eq!(live.generation(), 0, "{what}: the job pivoted too early");
    live.discard(X, BLK).unwrap();
    let seen = read(&*live, X);
    h.set_rate(0);
    h.resume();
    h.wait_blocking().unwrap();
    assert_eq!(live.generation(), 1, "{what}");
    let after = read(&*live, X);
    if seen != after {
        return Err(format!(
            "{what}: block X read {:?}... before the pivot, {:?}... after",
            &seen[..4],
            &after[..4]
        ));
    }
    live.flush().unwrap();
    drop(live);
    drop(disk);
    let reopened = Disk::open(&base, &OpenOptions::new().read_only(true)).unwrap();
    if read(&reopened, X) != seen {
        return Err(format!("{what}: BASE reopened differs at X"));
    }
    for i in 1..8u64 {
        assert!(
            read(&reopened, i << 20) == pattern(1 + i as u8),
            "{what}: block {i}"
        );
        if through {
            assert!(
                read(&reopened, X + i * BLK) == pattern(0x70 + i as u8),
                "{what}"
            );
        }
    }
    Ok(())
}

#[test]
fn discard_after_the_copy_reads_the_same_across_the_pivot() {
    let runner = JobRunner::new().unwrap();
    let mut failed = Vec::new();
    for deep in [false, true] {
        for through in [false, true] {
            if let Err(e) = case(&runner, deep, through) {
                failed.push(e);
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
