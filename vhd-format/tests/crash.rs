//! Crash consistency on `block_io::FaultStorage`: a seeded allocating workload (writes across
//! blocks, single sectors, discards in a differencing layer, flushes in between) is cut at
//! every write-like op index; for several seeds of `crash_image` per cut, the image must open
//! (read-only and writable), every write acknowledged before the last successful flush must
//! read back, and every other sector must hold a value it held at some point since then
//! (never another block's data). A differencing layer is read as a chain over a parent of
//! known data would read it, so that a sector marked present over data that never became
//! durable shows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage, Storage};
use common::workload::{parent_sector, read_composed};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vhd_format::{CreateOptions, DifferencingOptions, Subformat, VhdFile};

const SIZE: u64 = 1 << 20;
const BLOCK: u32 = 16 * 1024;
const SECTORS: usize = (SIZE / 512) as usize;
const SEEDS: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u64),
    Discard(u64, u64),
    Flush,
}

fn workload(seed: u64, diff: bool) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..30)
        .map(|i| {
            let r = rng.random_range(0..10);
            if r < 2 {
                Op::Flush
            } else if r < 3 && diff {
                let s = rng.random_range(0..SECTORS as u64 - 8);
                Op::Discard(s, rng.random_range(1..8))
            } else {
                let s = rng.random_range(0..SECTORS as u64);
                let n = rng.random_range(1..=40u64).min(SECTORS as u64 - s);
                Op::Write(s, n, seed * 1000 + i)
            }
        })
        .collect()
}

fn base_image(diff: bool) -> MemStorage {
    let st = Arc::new(MemStorage::new());
    if diff {
        let o = DifferencingOptions {
            size: SIZE,
            block_size: BLOCK,
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
        let mut o = CreateOptions::new(SIZE, Subformat::Dynamic);
        o.block_size = BLOCK;
        VhdFile::create(st.clone(), &o).unwrap();
    }
    (*st).clone()
}

/// Candidate contents per sector: `[0]` is the value at the last successful flush.
type Cands = Vec<Vec<[u8; 512]>>;

/// What sector `s` reads as before any write or after a discard: zeros, or in a differencing
/// layer its parent's data (`verify` reads the layer as a chain would, so a bitmap bit set
/// over data that never became durable shows).
fn absent(diff: bool, s: u64) -> [u8; 512] {
    if diff {
        parent_sector(s)
    } else {
        [0; 512]
    }
}

/// Runs `ops` until the first error; returns the candidates.
fn run(dev: &VhdFile<Arc<FaultStorage>>, ops: &[Op], diff: bool) -> Cands {
    let mut cands: Cands = (0..SECTORS as u64).map(|s| vec![absent(diff, s)]).collect();
    for op in ops {
        // Record first (an op cut midway may still have partly landed), then do it.
        match *op {
            Op::Write(s, n, tag) => {
                let data = common::pattern(tag, (n * 512) as usize);
                for i in 0..n as usize {
                    let mut sec = [0u8; 512];
                    sec.copy_from_slice(&data[i * 512..(i + 1) * 512]);
                    cands[s as usize + i].push(sec);
                }
                if dev.write_at(&data, s * 512).is_err() {
                    break;
                }
            }
            Op::Discard(s, n) => {
                for k in s..s + n {
                    cands[k as usize].push(absent(diff, k));
                }
                if dev.discard(s * 512, n * 512).is_err() {
                    break;
                }
            }
            Op::Flush => {
                if dev.flush().is_err() {
                    break;
                }
                for c in &mut cands {
                    let last = *c.last().unwrap();
                    *c = vec![last];
                }
            }
        }
    }
    cands
}

fn verify(img: &MemStorage, cands: &Cands, diff: bool, what: &str) {
    for writable in [false, true] {
        let st = Arc::new(img.clone());
        let f = VhdFile::open(
            st.clone(),
            &vhd_format::OpenOptions::new().read_only(!writable),
        )
        .unwrap_or_else(|e| panic!("{what}: reopen (writable={writable}) failed: {e:?}"));
        let buf = read_composed(&f, SIZE, diff);
        for (i, c) in cands.iter().enumerate() {
            let got = &buf[i * 512..(i + 1) * 512];
            assert!(
                c.iter().any(|v| v[..] == *got),
                "{what}: sector {i} holds data it never held since the last flush \
                 (flushed value {})",
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

fn crash_all_cuts(diff: bool, wseed: u64) {
    let base = base_image(diff);
    let ops = workload(wseed, diff);
    // Dry run: count the ops.
    let fs = Arc::new(FaultStorage::new(base.clone()));
    let dev = VhdFile::open(fs.clone(), &vhd_format::OpenOptions::new().read_only(false)).unwrap();
    let full = run(&dev, &ops, diff);
    let total = fs.ops();
    drop(dev);
    verify(&fs.live_image(), &full, diff, "no crash (live)");
    assert!(total > 20, "workload too small: {total} ops");
    eprintln!("diff={diff} wseed={wseed}: {total} ops");
    for n in 0..=total {
        let fs = Arc::new(FaultStorage::new(base.clone()));
        fs.set_cut(CutPoint::AfterOps(n));
        let dev =
            VhdFile::open(fs.clone(), &vhd_format::OpenOptions::new().read_only(false)).unwrap();
        let cands = run(&dev, &ops, diff);
        drop(dev);
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
}

#[test]
fn dynamic_survives_a_crash_at_every_op() {
    for wseed in [1, 2] {
        crash_all_cuts(false, wseed);
    }
}

#[test]
fn differencing_survives_a_crash_at_every_op() {
    for wseed in [3, 4] {
        crash_all_cuts(true, wseed);
    }
}

#[test]
fn failed_write_latches_fail_stop() {
    let base = base_image(false);
    let fs = Arc::new(FaultStorage::new(base));
    fs.inject(block_io::Injection::WriteError { nth: 0 });
    let dev = VhdFile::open(fs.clone(), &vhd_format::OpenOptions::new().read_only(false)).unwrap();
    assert!(dev.write_at(&[1u8; 512], 0).is_err());
    assert!(dev.is_failed());
    let e = dev.write_at(&[1u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), block_io::ErrorKind::Failed);
    assert_eq!(dev.flush().unwrap_err().kind(), block_io::ErrorKind::Failed);
    // Reads still work.
    let mut b = [0u8; 512];
    dev.read_at(&mut b, 0).unwrap();
    assert!(fs.len().unwrap() > 0);
}
