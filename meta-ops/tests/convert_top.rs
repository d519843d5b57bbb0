//! `Job::convert_top`: the top of a live VHD or VHDX chain converted into a new differencing
//! image of the other format over a converted copy of its parents, while guest threads do
//! random writes, reads, write-zeroes and flushes through the `LiveDisk` (checked against a
//! byte model). After the pivot the guest is on the new chain, which reads as the model, and
//! the new top holds only what the old one held (plus what the guests wrote): the layers are
//! kept, not flattened.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chains;
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus};
use chain::{Disk, OpenOptions};
use chains::Kind;
use common::Model;
use meta_ops::{Job, JobError, JobOptions, JobRunner, LiveDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 6 << 20;
const SECTOR: u64 = 512;

fn seeds() -> u64 {
    std::env::var("META_OPS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

/// Which 512-byte sectors layer `dev` (one image, not a chain) holds itself: `Data` or
/// `Zero` runs (a differencing image's `Unallocated` falls through to its parent).
fn covered(dev: &dyn BlockDevice) -> Vec<bool> {
    let size = dev.info().virtual_size;
    let mut v = vec![false; (size / SECTOR) as usize];
    let mut pos = 0;
    while pos < size {
        let run = dev.block_status(pos, size - pos).unwrap();
        let n = run.len.clamp(SECTOR, size - pos);
        if run.status != BlockStatus::Unallocated {
            v[(pos / SECTOR) as usize..((pos + n) / SECTOR) as usize].fill(true);
        }
        pos += n;
    }
    v
}

/// A dynamic image of `kind` at `path` holding `data` (4 KiB blocks of zeros left as holes).
fn flat_image(path: &Path, kind: Kind, data: &[u8]) {
    chains::create_base(path, kind, data.len() as u64, |dev| {
        for (i, b) in data.chunks(4096).enumerate() {
            if b.iter().any(|&x| x != 0) {
                dev.write_at(b, i as u64 * 4096).unwrap();
            }
        }
    });
}

/// An empty differencing image of `kind` at `path` over `parent` (same kind).
fn child_image(path: &Path, kind: Kind, parent: &Path, size: u64) {
    chains::create_child(path, kind, parent, size, |_| {});
}

/// The other format.
fn other(kind: Kind) -> Kind {
    match kind {
        Kind::Vhd => Kind::Vhdx,
        Kind::Vhdx => Kind::Vhd,
    }
}

/// The new chain for the top of the chain at `top` (`depth` layers): its parents flattened
/// into one image of the other format, and an empty child of that format over it; returns
/// the new top's path.
fn new_chain(dir: &Path, kind: Kind, top: &Path) -> PathBuf {
    let old = Disk::open(top, &OpenOptions::new().read_only(true)).unwrap();
    let parents = Disk::from_layers(old.layers()[1..].to_vec(), false).unwrap();
    let k = other(kind);
    let np = dir.join(format!("new-base.{}", k.ext()));
    flat_image(&np, k, &chains::read_all(&parents));
    let nt = dir.join(format!("new-top.{}", k.ext()));
    child_image(&nt, k, &np, SIZE);
    nt
}

fn case(runner: &JobRunner, kind: Kind, seed: u64, guests_run: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let depth = rng.random_range(2..=3);
    let (top, initial) = chains::build(dir.path(), kind, depth, SIZE, seed);
    let nt = new_chain(dir.path(), kind, &top);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let old_cover = covered(&*disk.layers()[0].dev);
    let dest = Arc::new(Disk::open(&nt, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    let what = format!("{kind:?} seed {seed} depth {depth} guests {guests_run}");
    let guests = guests_run.then(|| {
        let g = common::start(
            &live,
            Model::new(initial.clone(), live.generation()),
            rng.random_range(1..=3),
            seed,
            false,
        );
        g.run_for_ops(50);
        g
    });
    let granularity = [4096u64, 16 << 10, 64 << 10][rng.random_range(0..3)];
    let opts = JobOptions {
        granularity,
        chunk: granularity * [1u64, 4, 16][rng.random_range(0..3)],
        parallel: rng.random_range(1..=3),
        background_passes: rng.random_range(1..=3),
        ..JobOptions::default()
    };
    let job = Job::convert_top(disk.clone(), dest.clone())
        .unwrap()
        .dest_zeroed(true) // ignored: the new top reads its parents
        .options(opts);
    assert!(job.guest_chain().is_some_and(|c| Arc::ptr_eq(&c, &dest)));
    let report = runner
        .start(&live, job)
        .unwrap()
        .wait_blocking()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        Arc::ptr_eq(&live.current(), &(dest.clone() as Arc<dyn BlockDevice>)),
        "{what}: the guest is not on the new chain"
    );
    let model = match guests {
        Some(g) => {
            g.run_for_ops(100);
            let (model, counts) = g.stop();
            assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "{what}");
            assert_eq!(
                counts.mismatches.load(Ordering::Relaxed),
                0,
                "{what}: guest reads"
            );
            model.cur
        }
        None => initial,
    };
    assert_eq!(
        chains::diff_blocks(&chains::read_all(&*live.current()), &model),
        0,
        "{what}: the guest's new disk, {report:?}"
    );
    live.flush().unwrap();
    drop(live);
    drop(dest);
    // Reopened with lineage checks, the new chain holds everything.
    let reopened = Disk::open(&nt, &OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(reopened.layers().len(), 2, "{what}");
    assert_eq!(
        chains::diff_blocks(&chains::read_all(&reopened), &model),
        0,
        "{what}: reopened new chain"
    );
    if !guests_run {
        // Without guest writes, the new top holds what the old top held, sector for sector
        // (a VHD child takes whole 4 KiB groups), and nothing more: its parents supply the rest.
        let new_cover = covered(&*reopened.layers()[0].dev);
        for (i, (&o, &n)) in old_cover.iter().zip(&new_cover).enumerate() {
            assert!(
                !o || n,
                "{what}: sector {i} of the old top is not in the new one"
            );
            let group = i / 8 * 8;
            assert!(
                !n || old_cover[group..group + 8].iter().any(|&x| x),
                "{what}: the new top holds sector {i}, which the old top left to its parents"
            );
        }
        assert!(
            new_cover.iter().filter(|&&c| c).count() < new_cover.len(),
            "{what}: the new top was flattened"
        );
    }
}

#[test]
fn the_top_of_a_live_chain_converts_into_a_child_of_the_other_format() {
    let runner = JobRunner::new().unwrap();
    for kind in [Kind::Vhdx, Kind::Vhd] {
        for seed in 0..seeds() {
            case(&runner, kind, seed, seed % 4 != 0);
        }
    }
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 2, SIZE, 3);
    let base = chains::layer_path(dir.path(), Kind::Vhdx, 0);
    let nt = new_chain(dir.path(), Kind::Vhdx, &top);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let lone = Arc::new(Disk::open(&base, &OpenOptions::new().read_only(true)).unwrap());
    let invalid = |r: Result<Job, JobError>, what: &str| match r {
        Err(JobError::Invalid(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("expected Invalid({what}), got {other:?}"),
    };
    // A base has no top to convert apart from it, and cannot be a new top either.
    invalid(Job::convert_top(lone.clone(), disk.clone()), "no parent");
    invalid(Job::convert_top(disk.clone(), lone), "no parent");
    // Another size.
    let small = dir.path().join("small.vhdx");
    flat_image(&small, Kind::Vhdx, &vec![0u8; (SIZE / 2) as usize]);
    let st = dir.path().join("small-top.vhdx");
    child_image(&st, Kind::Vhdx, &small, SIZE / 2);
    let small = Arc::new(Disk::open(&st, &OpenOptions::new()).unwrap());
    invalid(Job::convert_top(disk.clone(), small), "bytes");
    // Read-only.
    let ro = Arc::new(Disk::open(&nt, &OpenOptions::new().read_only(true)).unwrap());
    invalid(Job::convert_top(disk, ro), "read-only");
}
