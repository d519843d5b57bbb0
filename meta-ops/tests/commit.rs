//! Model-checked commit jobs: VHD and VHDX chains 2-4 layers deep, committed into their
//! parent or a deeper ancestor while guest threads do random writes, reads, write-zeroes and
//! flushes through the `LiveDisk`, checked against a byte model. After the job the guest is on
//! BASE, every guest read matched, BASE reopened (lineage checks on) holds what the guest
//! wrote; paused, throttled and cancelled commits; a cancelled one leaves the old chain
//! openable and equal to the model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chains;
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use block_io::BlockDevice;
use chain::{Disk, OpenOptions, PathPolicy};
use chains::Kind;
use common::Model;
use meta_ops::{CommitOptions, Job, JobOptions, JobRunner, LiveDisk, Phase, Retire};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 6 << 20;

fn seeds() -> u64 {
    std::env::var("META_OPS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

fn options(rng: &mut ChaCha8Rng) -> JobOptions {
    let granularity = [4096u64, 16 << 10, 64 << 10][rng.random_range(0..3)];
    JobOptions {
        rate: [0, 0, 32 << 20][rng.random_range(0..3)],
        granularity,
        chunk: granularity * [1u64, 4, 16][rng.random_range(0..3)],
        parallel: rng.random_range(1..=3),
        pivot_threshold: [0u64, 64 << 10, 1 << 20][rng.random_range(0..3)],
        background_passes: rng.random_range(1..=3),
        copy_file_range: rng.random_bool(0.7),
        ..JobOptions::default()
    }
}

/// Opens the chain at `top` for a commit into depth `base` (preparing a VHDX top first).
fn open(top: &std::path::Path, base: usize) -> Arc<Disk> {
    if base == 1 {
        meta_ops::prepare_top(top, &PathPolicy::default()).unwrap();
    }
    Arc::new(Disk::open(top, &OpenOptions::new()).unwrap())
}

enum End {
    Complete,
    Cancel,
}

fn case(runner: &JobRunner, kind: Kind, seed: u64, end: End) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let depth = rng.random_range(2..=4);
    let base = rng.random_range(1..depth);
    let (top, initial) = chains::build(dir.path(), kind, depth, SIZE, seed);
    let disk = open(&top, base);
    assert_eq!(chains::diff_blocks(&chains::read_all(&*disk), &initial), 0);
    let retire = if rng.random_bool(0.5) {
        Retire::Delete
    } else {
        Retire::Keep
    };
    let live = LiveDisk::new(disk.clone());
    let guests = common::start(
        &live,
        Model::new(initial, live.generation()),
        rng.random_range(1..=3),
        seed,
        false,
    );
    guests.run_for_ops(50);
    let job = Job::commit(disk.clone(), CommitOptions::new().base(base).retire(retire))
        .unwrap()
        .options(options(&mut rng));
    let h = runner.start(&live, job).unwrap();
    let what = format!("{kind:?} seed {seed} depth {depth} base {base} {retire:?}");
    match end {
        End::Complete => {
            if rng.random_bool(0.3) {
                h.pause();
                guests.run_for_ops(100);
                assert!(!h.is_finished() || h.progress().phase == Phase::Completed);
                h.resume();
            }
            let report = h.wait_blocking().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(live.generation(), 1, "{what}");
            assert!(
                report.bytes > 0 && report.skipped_bytes > 0,
                "{what}: {report:?}"
            );
            guests.run_for_ops(150);
            let (model, counts) = guests.stop();
            assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "{what}");
            assert_eq!(
                counts.mismatches.load(Ordering::Relaxed),
                0,
                "{what}: guest reads"
            );
            assert!(!Arc::ptr_eq(
                &live.current(),
                &(disk.clone() as Arc<dyn BlockDevice>)
            ));
            assert_eq!(
                chains::diff_blocks(&chains::read_all(&*live.current()), &model.cur),
                0,
                "{what}: the guest's new disk, {report:?}"
            );
            live.flush().unwrap();
            drop(live);
            drop(disk);
            // BASE, reopened with lineage checks, holds everything.
            let base_path = chains::layer_path(dir.path(), kind, depth - 1 - base);
            let reopened = Disk::open(&base_path, &OpenOptions::new().read_only(true)).unwrap();
            assert_eq!(reopened.layers().len(), depth - base, "{what}");
            assert_eq!(
                chains::diff_blocks(&chains::read_all(&reopened), &model.cur),
                0,
                "{what}: reopened base"
            );
            for i in depth - base..depth {
                let p = chains::layer_path(dir.path(), kind, i);
                assert_eq!(
                    p.exists(),
                    retire == Retire::Keep,
                    "{what}: {}",
                    p.display()
                );
            }
            if retire == Retire::Keep && kind == Kind::Vhdx {
                // The stale layers no longer open over BASE: the job unlinked BASE's child
                // (not the live top); the live top is unlinked once closed.
                if base == 1 {
                    assert!(meta_ops::unlink_stale(&top, block_io::LockMode::Auto).unwrap());
                }
                let e = Disk::open(&top, &OpenOptions::new().read_only(true)).unwrap_err();
                assert!(
                    matches!(e, chain::ChainError::LineageMismatch { .. }),
                    "{what}: {e}"
                );
            }
        }
        End::Cancel => {
            guests.run_for_ops(rng.random_range(0..200));
            h.cancel();
            let r = h.wait_blocking();
            guests.run_for_ops(100);
            let (model, counts) = guests.stop();
            assert_eq!(
                counts.mismatches.load(Ordering::Relaxed),
                0,
                "{what}: guest reads"
            );
            assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "{what}");
            let on_old = r.as_ref().is_err_and(|e| e.is_cancelled());
            live.flush().unwrap();
            drop(live);
            drop(disk);
            if on_old {
                // The old chain, reopened with lineage checks, is the guest's disk.
                let d = Disk::open(&top, &OpenOptions::new().read_only(true)).unwrap();
                assert_eq!(d.layers().len(), depth);
                assert_eq!(
                    chains::diff_blocks(&chains::read_all(&d), &model.cur),
                    0,
                    "{what}: old chain after cancel"
                );
            }
        }
    }
}

#[test]
fn commit_vhdx_chains_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..seeds() {
        case(&runner, Kind::Vhdx, seed, End::Complete);
    }
}

#[test]
fn commit_vhd_chains_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..seeds() {
        case(&runner, Kind::Vhd, 100 + seed, End::Complete);
    }
}

#[test]
fn cancelled_commits_leave_the_old_chain() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..seeds() / 2 {
        case(&runner, Kind::Vhdx, 200 + seed, End::Cancel);
        case(&runner, Kind::Vhd, 300 + seed, End::Cancel);
    }
}

#[test]
fn throttled_commit_honours_the_rate_and_can_change_it() {
    let runner = JobRunner::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (top, initial) = chains::build(dir.path(), Kind::Vhdx, 2, SIZE, 7);
    let disk = open(&top, 1);
    let live = LiveDisk::new(disk.clone());
    let job = Job::commit(disk.clone(), CommitOptions::new())
        .unwrap()
        .options(JobOptions {
            rate: 1 << 20,
            granularity: 64 << 10,
            chunk: 64 << 10,
            ..JobOptions::default()
        });
    let h = runner.start(&live, job).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let p = h.progress();
    assert!(p.done <= (2 << 20), "1 MiB/s for 0.5 s moved {}", p.done);
    h.set_rate(0);
    let r = h.wait_blocking().unwrap();
    assert!(r.bytes > 0);
    assert_eq!(
        chains::diff_blocks(&chains::read_all(&*live.current()), &initial),
        0
    );
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    // One layer: nothing to commit into.
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 1, SIZE, 1);
    let d = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    assert!(matches!(
        Job::commit(d, CommitOptions::new()),
        Err(meta_ops::JobError::Invalid(_))
    ));
    // A VHDX top not prepared: refused before anything is written.
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 2, SIZE, 2);
    let d = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    assert!(matches!(
        Job::commit(d.clone(), CommitOptions::new()),
        Err(meta_ops::JobError::Invalid(_))
    ));
    assert!(matches!(
        Job::commit(d, CommitOptions::new().base(2)),
        Err(meta_ops::JobError::Invalid(_))
    ));
}

#[test]
fn base_with_another_writer_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhd, 2, SIZE, 3);
    // The chain opened without locks (-U); another writer holds the base.
    let d = Arc::new(Disk::open(&top, &OpenOptions::new().lock(block_io::LockMode::Off)).unwrap());
    let base = chains::layer_path(dir.path(), Kind::Vhd, 0);
    let _writer =
        block_io::FileStorage::open(&base, &block_io::OpenOptions::new().read_only(false)).unwrap();
    match Job::commit(d, CommitOptions::new()) {
        Err(meta_ops::JobError::Prepare { source, .. }) => {
            assert_eq!(source.kind(), block_io::ErrorKind::Locked)
        }
        other => panic!("expected Locked, got {other:?}"),
    }
}

/// A middle range of a VHDX chain 4-5 deep merged into a deeper layer while the guest
/// writes its top: the guest's disk and the reopened chain (the layer above the range now
/// over BASE, lineage checked) equal the model.
#[test]
fn commit_middle_range_of_vhdx_chains() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..seeds().div_ceil(2) {
        let mut rng = ChaCha8Rng::seed_from_u64(500 + seed);
        let dir = tempfile::tempdir().unwrap();
        let depth = rng.random_range(4..=5);
        let top_m = rng.random_range(2..depth - 1);
        let base = rng.random_range(top_m + 1..depth);
        let (top, initial) = chains::build(dir.path(), Kind::Vhdx, depth, SIZE, 500 + seed);
        let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
        let retire = if rng.random_bool(0.5) {
            Retire::Delete
        } else {
            Retire::Keep
        };
        let what = format!("seed {seed} depth {depth} top {top_m} base {base} {retire:?}");
        let live = LiveDisk::new(disk.clone());
        let guests = common::start(
            &live,
            Model::new(initial, live.generation()),
            2,
            500 + seed,
            false,
        );
        guests.run_for_ops(50);
        let job = Job::commit(
            disk.clone(),
            CommitOptions::new().base(base).top(top_m).retire(retire),
        )
        .unwrap()
        .options(options(&mut rng));
        let report = runner
            .start(&live, job)
            .unwrap()
            .wait_blocking()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(report.bytes > 0, "{what}: {report:?}");
        guests.run_for_ops(150);
        let (model, counts) = guests.stop();
        assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "{what}");
        assert_eq!(
            counts.mismatches.load(Ordering::Relaxed),
            0,
            "{what}: guest reads"
        );
        let now = live.current();
        assert_eq!(
            chains::diff_blocks(&chains::read_all(&*now), &model.cur),
            0,
            "{what}: the guest's disk"
        );
        assert_eq!(live.generation(), 1, "{what}");
        live.flush().unwrap();
        drop((live, now, disk));
        let reopened = Disk::open(&top, &OpenOptions::new().read_only(true))
            .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        assert_eq!(reopened.layers().len(), depth - (base - top_m), "{what}");
        assert_eq!(
            chains::diff_blocks(&chains::read_all(&reopened), &model.cur),
            0,
            "{what}: reopened chain"
        );
        for i in depth - base..depth - top_m {
            let p = chains::layer_path(dir.path(), Kind::Vhdx, i);
            assert_eq!(
                p.exists(),
                retire == Retire::Keep,
                "{what}: {}",
                p.display()
            );
        }
    }
}

#[test]
fn middle_range_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 4, SIZE, 9);
    let d = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    for (t, b) in [(1, 2), (2, 2), (3, 2)] {
        assert!(
            matches!(
                Job::commit(d.clone(), CommitOptions::new().base(b).top(t)),
                Err(meta_ops::JobError::Invalid(_))
            ),
            "top {t} base {b}"
        );
    }
    drop(d);
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhd, 4, SIZE, 10);
    let d = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    assert!(matches!(
        Job::commit(d, CommitOptions::new().base(3).top(2)),
        Err(meta_ops::JobError::Invalid(_))
    ));
}
