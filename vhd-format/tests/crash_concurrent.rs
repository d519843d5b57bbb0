//! Power cuts during concurrent allocation (issue 11): four threads write (allocating blocks
//! they share, updating differencing bitmaps), read and flush on `block_io::FaultStorage`,
//! which is cut after the n-th write or sync for every n of the run; each run is a new
//! interleaving (a `Probe` yields at random before storage operations). For several seeds of
//! `crash_image` per cut (lost, torn and reordered unsynced writes), the image must open
//! read-only and writable, show no structural corruption (unreferenced space is allowed),
//! check clean once reopened writable, and every sector must hold the last write to it that
//! completed before a successful flush started, or a later write to it (never another
//! sector's or block's data, never an older value).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use block_io::{CutPoint, FaultStorage, MemStorage};
use common::probe::Probe;
use common::workload::{
    crash_candidates, parent_sector, read_composed, run_thread, thread_ops, Cands, Geometry, Log,
};
use vhd_format::{CreateOptions, DifferencingOptions, Subformat, VhdFile};

const GEO: Geometry = Geometry {
    size: 1 << 20,
    block: 16 << 10,
    chunk: 4,
    threads: 4,
    hot: 6,
};
const OPS_PER_THREAD: usize = 32;
const SEEDS: u64 = 3;

fn base_image(diff: bool) -> MemStorage {
    let st = Arc::new(MemStorage::new());
    if diff {
        let o = DifferencingOptions {
            size: GEO.size,
            block_size: GEO.block as u32,
            parent_unique_id: uuid::Uuid::from_bytes([1; 16]),
            parent_timestamp: 1,
            parent_name: "p.vhd".into(),
            absolute_path: None,
            relative_path: Some(".\\p.vhd".into()),
            unique_id: None,
            timestamp: Some(2),
            creator: Default::default(),
        };
        VhdFile::create_differencing(st.clone(), &o).unwrap();
    } else {
        let mut o = CreateOptions::new(GEO.size, Subformat::Dynamic);
        o.block_size = GEO.block as u32;
        VhdFile::create(st.clone(), &o).unwrap();
    }
    (*st).clone()
}

/// One concurrent run of the workload, cut after `cut` ops if given.
fn run(base: &MemStorage, wseed: u64, cut: Option<u64>) -> (Arc<FaultStorage>, Vec<Log>) {
    let fs = Arc::new(FaultStorage::new(base.clone()));
    if let Some(n) = cut {
        fs.set_cut(CutPoint::AfterOps(n));
    }
    let probe = Arc::new(Probe::new(fs.clone()));
    probe.set_jitter(true);
    let dev = VhdFile::open(probe, &vhd_format::OpenOptions::new().read_only(false)).unwrap();
    let clock = AtomicU64::new(0);
    let logs = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..GEO.threads)
            .map(|t| {
                let (dev, clock) = (&dev, &clock);
                let ops = thread_ops(&GEO, wseed, t, OPS_PER_THREAD);
                sc.spawn(move || run_thread(dev, &GEO, t, &ops, clock))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (fs, logs)
}

fn verify(img: &MemStorage, cands: &Cands, diff: bool, what: &str) {
    // No structural damage before any repair: what a crash may leave is a lost end footer
    // (the copy at 0 stands in) and unreferenced space, never blocks over blocks or metadata.
    let r = vhd_format::check_storage(img).unwrap();
    assert_eq!(r.header_ok, Some(true), "{what}: {r:?}");
    assert!(r.overlapping_blocks.is_empty(), "{what}: {r:?}");
    assert!(r.blocks_overlapping_metadata.is_empty(), "{what}: {r:?}");
    for writable in [false, true] {
        let st = Arc::new(img.clone());
        let f = VhdFile::open(
            st.clone(),
            &vhd_format::OpenOptions::new().read_only(!writable),
        )
        .unwrap_or_else(|e| panic!("{what}: reopen (writable={writable}) failed: {e:?}"));
        let buf = read_composed(&f, GEO.size, diff);
        for (i, c) in cands.iter().enumerate() {
            let got = &buf[i * 512..(i + 1) * 512];
            assert!(
                c.iter().any(|v| v[..] == *got),
                "{what}: sector {i} (thread {}) holds data it never held since the last \
                 flush (flushed value {})",
                GEO.owner(i as u64),
                if c[0][..] == *got {
                    "matches"
                } else {
                    "differs"
                }
            );
        }
        if writable {
            let r = f.check().unwrap();
            assert!(r.is_clean(), "{what}: check after writable reopen: {r:?}");
            drop(f);
            VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(true)).unwrap();
        }
    }
}

/// A sector before the run: zeros, or for a differencing layer its parent's data.
fn initial(diff: bool, s: u64) -> [u8; 512] {
    if diff {
        parent_sector(s)
    } else {
        [0; 512]
    }
}

fn cut_everywhere(diff: bool, wseed: u64) {
    let base = base_image(diff);
    // Uncut runs: every thread finishes; the op count (which varies a little with the
    // interleaving) bounds the cut points.
    let mut total = 0;
    for _ in 0..3 {
        let (fs, logs) = run(&base, wseed, None);
        assert!(logs.iter().all(|l| l.error.is_none()), "{logs:?}");
        let cands = crash_candidates(&GEO, &logs, |s| initial(diff, s));
        verify(&fs.live_image(), &cands, diff, "uncut (live)");
        total = total.max(fs.ops());
    }
    assert!(total > 100, "workload too small: {total} ops");
    let (mut flushed, mut cut_runs) = (0usize, 0u64);
    for n in 0..=total + 5 {
        let (fs, logs) = run(&base, wseed, Some(n));
        cut_runs += u64::from(fs.is_cut());
        let cands = crash_candidates(&GEO, &logs, |s| initial(diff, s));
        flushed += (0..GEO.sectors())
            .filter(|&s| cands[s as usize].len() == 1 && cands[s as usize][0] != initial(diff, s))
            .count();
        for seed in 0..SEEDS {
            let img = fs.crash_image(seed);
            verify(
                &img,
                &cands,
                diff,
                &format!("diff={diff} wseed={wseed} cut={n} seed={seed}"),
            );
        }
    }
    eprintln!(
        "diff={diff} wseed={wseed}: up to {total} ops, {cut_runs} runs cut, {flushed} \
         flushed sectors checked exactly"
    );
    assert!(cut_runs > total / 2);
}

#[test]
fn concurrent_dynamic_writers_survive_a_cut_at_every_op() {
    for wseed in [1, 2, 5] {
        cut_everywhere(false, wseed);
    }
}

#[test]
fn concurrent_differencing_writers_survive_a_cut_at_every_op() {
    for wseed in [3, 4, 6] {
        cut_everywhere(true, wseed);
    }
}
