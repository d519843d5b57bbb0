//! Model-checked copy, convert and compact jobs under concurrent guest I/O: many seeds of random
//! interleavings of guest writes, reads, discards, write-zeroes and flushes from several
//! threads while a job runs with random tuning; after the job, the destination must equal
//! the disk as the pivot saw it and the disk the guest uses must equal the model, with no
//! mismatch anywhere (guest reads included).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use block_io::{BlockDevice, MemStorage, RawDisk};
use common::{Model, BLK};
use meta_ops::{Job, JobOptions, JobReport, JobRunner, LiveDisk, Pivot};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 4 << 20;

fn seeds() -> u64 {
    std::env::var("META_OPS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16)
}

/// Random tuning for `seed`.
fn options(rng: &mut ChaCha8Rng) -> JobOptions {
    let granularity = [4096u64, 16 << 10, 64 << 10][rng.random_range(0..3)];
    JobOptions {
        rate: [0, 0, 48 << 20][rng.random_range(0..3)],
        granularity,
        chunk: granularity * [1u64, 4, 16][rng.random_range(0..3)],
        parallel: rng.random_range(1..=3),
        pivot_threshold: [0u64, 64 << 10, 1 << 20][rng.random_range(0..3)],
        background_passes: rng.random_range(1..=3),
        copy_file_range: rng.random_bool(0.8),
        ..JobOptions::default()
    }
}

struct Case {
    src: Arc<dyn BlockDevice>,
    initial: Vec<u8>,
    dest: Arc<dyn BlockDevice>,
    /// The destination's contents before the job (for a range copy, what lies outside).
    dest_before: Option<Vec<u8>>,
    job: Job,
    pivot: Pivot,
    /// `(start, len, dest_offset)` of a range copy.
    range: Option<(u64, u64, u64)>,
    threads: u64,
    seed: u64,
    discard_zeroes: bool,
}

fn run(runner: &JobRunner, c: Case) -> JobReport {
    let live = LiveDisk::new(c.src.clone());
    let guests = common::start(
        &live,
        Model::new(c.initial, live.generation()),
        c.threads,
        c.seed,
        c.discard_zeroes,
    );
    guests.run_for_ops(100);
    let h = runner.start(&live, c.job).unwrap();
    let report = h.wait_blocking().unwrap();
    assert_eq!(live.generation(), 1);
    guests.run_for_ops(200);
    let (model, counts) = guests.stop();
    let seed = c.seed;
    assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "seed {seed}");
    assert_eq!(
        counts.mismatches.load(Ordering::Relaxed),
        0,
        "guest reads, seed {seed}"
    );
    // The disk the guest uses holds everything it wrote.
    let (now, other) = match c.pivot {
        Pivot::Switch => {
            assert!(
                Arc::ptr_eq(&live.current(), &c.dest),
                "seed {seed}: switched"
            );
            (c.dest.clone(), c.src.clone())
        }
        Pivot::Detach => (c.src.clone(), c.dest.clone()),
    };
    assert_eq!(
        common::mismatches(&*now, 0, &model.cur),
        0,
        "now, seed {seed}"
    );
    // The other holds the disk as the pivot saw it.
    match c.range {
        None => assert_eq!(
            common::mismatches(&*other, 0, &model.at_pivot),
            0,
            "pivot image, seed {seed}, {report:?}"
        ),
        Some((start, len, doff)) => {
            let (s, l, d) = (start as usize, len as usize, doff as usize);
            assert_eq!(
                common::mismatches(&*other, doff, &model.at_pivot[s..s + l]),
                0,
                "range, seed {seed}, {report:?}"
            );
            let before = c.dest_before.unwrap();
            assert_eq!(
                common::mismatches(&*other, 0, &before[..d]),
                0,
                "before range"
            );
            let end = d + l;
            assert_eq!(
                common::mismatches(&*other, end as u64, &before[end..]),
                0,
                "after range"
            );
        }
    }
    if std::env::var_os("META_OPS_VERBOSE").is_some() {
        eprintln!("seed {seed}: {report:?}");
    }
    report
}

#[test]
fn copy_in_memory_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    let mut recopied = 0;
    for seed in 0..seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let initial = common::initial(SIZE, seed);
        let src = common::mem_disk(&initial);
        let zeroed = rng.random_bool(0.5);
        let dest: Arc<dyn BlockDevice> = if zeroed {
            common::mem_disk(&vec![0; SIZE as usize])
        } else {
            common::junk_disk(SIZE)
        };
        let pivot = if rng.random_bool(0.5) {
            Pivot::Detach
        } else {
            Pivot::Switch
        };
        let job = Job::copy(dest.clone())
            .dest_zeroed(zeroed)
            .pivot(pivot)
            .options(options(&mut rng));
        let r = run(
            &runner,
            Case {
                src,
                initial,
                dest,
                dest_before: None,
                job,
                pivot,
                range: None,
                threads: rng.random_range(2..=4),
                seed,
                discard_zeroes: true,
            },
        );
        recopied += r.blocks_dirtied;
    }
    assert!(recopied > 0, "guest writes never met the job");
}

#[test]
fn copy_a_range_to_another_offset() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 500);
        let initial = common::initial(SIZE, seed);
        let src = common::mem_disk(&initial);
        let dest_size = SIZE + (1 << 20);
        let before = vec![0xA5u8; dest_size as usize];
        let dest: Arc<dyn BlockDevice> =
            Arc::new(RawDisk::new(MemStorage::from_bytes(&before)).unwrap());
        let start = rng.random_range(0..SIZE / 512 / 2) * 512;
        let len = rng.random_range(1..=(SIZE - start) / 512) * 512;
        let doff = rng.random_range(0..=(dest_size - len) / 512) * 512;
        let job = Job::copy(dest.clone())
            .range(start, len)
            .dest_offset(doff)
            .options(options(&mut rng));
        run(
            &runner,
            Case {
                src,
                initial,
                dest,
                dest_before: Some(before),
                job,
                pivot: Pivot::Detach,
                range: Some((start, len, doff)),
                threads: 3,
                seed,
                discard_zeroes: true,
            },
        );
    }
}

/// A VHDX or VHD image of `size` in memory.
fn mem_image(vhdx: bool, size: u64) -> Arc<dyn BlockDevice> {
    if vhdx {
        let mut o = vhdx_format::CreateOptions::dynamic(size);
        o.block_size = Some(1 << 20);
        Arc::new(vhdx_format::create(MemStorage::new(), &o).unwrap())
    } else {
        let mut o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
        o.block_size = 512 * 1024;
        Arc::new(vhd_format::VhdFile::create(MemStorage::new(), &o).unwrap())
    }
}

#[test]
fn convert_between_formats_in_memory_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
        let initial = common::initial(SIZE, seed);
        // raw -> VHDX, VHDX -> VHD, VHD -> VHDX, VHDX -> raw.
        let (src, dest): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) = match seed % 4 {
            0 => (common::mem_disk(&initial), mem_image(true, SIZE)),
            1 => (mem_image(true, SIZE), mem_image(false, SIZE)),
            2 => (mem_image(false, SIZE), mem_image(true, SIZE)),
            _ => (
                mem_image(true, SIZE),
                common::mem_disk(&vec![0; SIZE as usize]),
            ),
        };
        if seed % 4 != 0 {
            common::fill(&*src, &initial);
        }
        let job = Job::convert(dest.clone()).options(options(&mut rng));
        run(
            &runner,
            Case {
                src,
                initial,
                dest,
                dest_before: None,
                job,
                pivot: Pivot::Switch,
                range: None,
                threads: 3,
                seed,
                discard_zeroes: true,
            },
        );
    }
}

#[test]
fn empty_source_pivots_at_once() {
    // An empty source: nothing to copy, the job pivots at once.
    let runner = JobRunner::new().unwrap();
    let src = common::mem_disk(&vec![0; SIZE as usize]);
    let dest = common::mem_disk(&vec![0; SIZE as usize]);
    let live = LiveDisk::new(src);
    let r = runner
        .start(&live, Job::convert(dest.clone()))
        .unwrap()
        .wait_blocking()
        .unwrap();
    assert_eq!(r.bytes, 0);
    assert_eq!(live.generation(), 1);
    assert!(Arc::ptr_eq(
        &live.current(),
        &(dest as Arc<dyn BlockDevice>)
    ));
    let _ = BLK;
}

/// A dynamic VHD or VHDX in memory (kept reachable for a reopen), filled with `initial`, with
/// some blocks allocated but all zeros (reclaimable) and some data past them (to move).
fn compactable(
    vhdx: bool,
    initial: &[u8],
    rng: &mut ChaCha8Rng,
) -> (Arc<meta_ops::CompactTarget>, Arc<MemStorage>, u64) {
    let size = initial.len() as u64;
    let mem = Arc::new(MemStorage::new());
    let (target, bs) = if vhdx {
        let mut o = vhdx_format::CreateOptions::dynamic(size);
        o.block_size = Some(1 << 20);
        let f = Arc::new(vhdx_format::create(mem.clone(), &o).unwrap());
        (meta_ops::CompactTarget::vhdx(f).unwrap(), 1u64 << 20)
    } else {
        let mut o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
        o.block_size = 512 * 1024;
        let f = Arc::new(vhd_format::VhdFile::create(mem.clone(), &o).unwrap());
        (meta_ops::CompactTarget::vhd(f).unwrap(), 512u64 * 1024)
    };
    let dev = target.device();
    // Every block allocated in order, then the zero ones written as zeros.
    for b in 0..size / bs {
        dev.write_at(&[1; 512], b * bs).unwrap();
    }
    for b in 0..size / bs {
        let at = (b * bs) as usize;
        dev.write_at(&initial[at..at + bs as usize], b * bs)
            .unwrap();
        if rng.random_bool(0.5) {
            dev.write_at(&vec![0; bs as usize], b * bs).unwrap();
        }
    }
    dev.flush().unwrap();
    (target, mem, bs)
}

#[test]
fn compact_in_memory_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    let size = 8u64 << 20;
    let (mut reclaimed, mut moved, mut freed) = (0, 0, 0);
    for seed in 0..seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 3000);
        let vhdx = seed % 2 == 1;
        let initial = common::initial(size, seed);
        let (target, mem, bs) = compactable(vhdx, &initial, &mut rng);
        let mut start = vec![0u8; size as usize];
        target.device().read_at(&mut start, 0).unwrap();
        let live = LiveDisk::new(target.device());
        let options = JobOptions {
            rate: [0, 0, 64 << 20][rng.random_range(0..3)],
            yield_cap: std::time::Duration::from_millis(rng.random_range(0..5)),
            ..JobOptions::default()
        };
        let h = runner
            .start(&live, Job::compact(target.clone()).options(options))
            .unwrap();
        // The guests start with the job (so that some zero blocks stay zero until checked).
        let guests = common::start(&live, common::Model::new(start, 1), 3, seed, true);
        if rng.random_bool(0.3) {
            h.pause();
            guests.run_for_ops(50);
            h.resume();
        }
        let r = h.wait_blocking().unwrap();
        assert_eq!(r.kind, meta_ops::JobKind::Compact);
        guests.run_for_ops(200);
        let (model, counts) = guests.stop();
        assert_eq!(counts.errors.load(Ordering::Relaxed), 0, "seed {seed}");
        assert_eq!(
            counts.mismatches.load(Ordering::Relaxed),
            0,
            "guest reads, seed {seed}"
        );
        assert_eq!(live.generation(), 0, "no pivot");
        assert_eq!(common::mismatches(&*live, 0, &model.cur), 0, "seed {seed}");
        let s = target.stats();
        if std::env::var_os("META_OPS_VERBOSE").is_some() {
            eprintln!("seed {seed}: {s:?} {r:?}");
        }
        reclaimed += s.reclaimed_blocks;
        moved += s.moved_blocks;
        freed += s.freed();
        assert_eq!(s.block_size, bs);
        live.flush().unwrap();
        // The image reopened from its bytes holds the same.
        drop(live);
        drop(target);
        let bytes = mem.to_vec().unwrap();
        let again: Arc<dyn BlockDevice> = if vhdx {
            Arc::new(
                vhdx_format::VhdxFile::open(
                    MemStorage::from_bytes(&bytes),
                    &vhdx_format::OpenOptions::new().read_only(false),
                )
                .unwrap(),
            )
        } else {
            Arc::new(
                vhd_format::VhdFile::open(
                    MemStorage::from_bytes(&bytes),
                    &vhd_format::OpenOptions::new().read_only(false),
                )
                .unwrap(),
            )
        };
        assert_eq!(
            common::mismatches(&*again, 0, &model.cur),
            0,
            "reopened, seed {seed}"
        );
    }
    // Guests keep writing everywhere, so blocks freed are allocated again at the end: the
    // file need not shrink here (tests/compact.rs checks that it does without them).
    assert!(reclaimed > 0 && moved > 0, "{reclaimed} {moved} {freed}");
}
