//! Crash consistency of our writer on `block_io::FaultStorage`: cut power after every n-th
//! write-like operation of a workload (allocating writes, overwrites, zeroes, discards,
//! flushes), build several crash images (unsynced writes lost, whole or torn, in any order),
//! and check each one opens (read-only: replay in memory; writable: replay into the file) and
//! every 512-byte sector reads either what it held at the last successful flush or a value
//! written to it after that flush — never another block's data, never garbage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use block_io::{BlockDevice, CutPoint, ErrorKind, FaultStorage, MemStorage, Storage};
use common::read_all;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vhdx_format::{create, CreateOptions, ParentRef, VhdxFile};

const SIZE: u64 = 6 << 20;
const SECTOR: usize = 512;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

fn workload(seed: u64) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ops = Vec::new();
    for i in 0..28 {
        let r = rng.random_range(0..10);
        let off = rng.random_range(0..(SIZE / 4096)) * 4096;
        let max = ((SIZE - off) / 4096).min(96);
        let len = rng.random_range(1..=max) * 4096;
        ops.push(match r {
            0 => Op::Zero(off, len, rng.random_bool(0.5)),
            1 => Op::Discard(off & !((1 << 20) - 1), 1 << 20),
            _ => {
                let fill = (i as u8).wrapping_mul(37).wrapping_add(1);
                Op::Write(
                    off,
                    (0..len as usize).map(|k| fill ^ (k / 512) as u8).collect(),
                )
            }
        });
        if rng.random_range(0..4) == 0 {
            ops.push(Op::Flush);
        }
    }
    ops.push(Op::Flush);
    ops
}

/// Per-sector candidates: the value at the last successful flush plus every value written
/// since.
struct Model {
    durable: Vec<u8>,
    current: Vec<u8>,
    since: HashMap<usize, Vec<Vec<u8>>>,
}

impl Model {
    fn new(base: Vec<u8>) -> Self {
        Model {
            durable: base.clone(),
            current: base,
            since: HashMap::new(),
        }
    }
    fn apply(&mut self, off: u64, data: &[u8]) {
        let off = off as usize;
        self.current[off..off + data.len()].copy_from_slice(data);
        for (k, chunk) in data.chunks(SECTOR).enumerate() {
            self.since
                .entry(off / SECTOR + k)
                .or_default()
                .push(chunk.to_vec());
        }
    }
    fn maybe(&mut self, off: u64, data: &[u8]) {
        let off = off as usize;
        for (k, chunk) in data.chunks(SECTOR).enumerate() {
            self.since
                .entry(off / SECTOR + k)
                .or_default()
                .push(chunk.to_vec());
        }
    }
    fn flushed(&mut self) {
        self.durable = self.current.clone();
        self.since.clear();
    }
    fn check(&self, got: &[u8], what: &str) {
        for (s, chunk) in got.chunks(SECTOR).enumerate() {
            let old = &self.durable[s * SECTOR..(s + 1) * SECTOR];
            if chunk == old {
                continue;
            }
            let ok = self
                .since
                .get(&s)
                .is_some_and(|c| c.iter().any(|v| v.as_slice() == chunk));
            assert!(
                ok,
                "{what}: sector {s} holds neither its flushed value nor a later write"
            );
        }
    }
}

/// Runs `ops` on `dev`, applying acknowledged effects to `model`; stops at the first error
/// (the power cut) and returns whether it finished.
fn run(dev: &VhdxFile<Arc<FaultStorage>>, ops: &[Op], model: &mut Model) -> bool {
    for op in ops {
        let r = match op {
            Op::Write(off, d) => dev.write_at(d, *off).map(|_| model.apply(*off, d)),
            Op::Zero(off, len, unmap) => dev
                .write_zeroes(*off, *len, *unmap)
                .map(|_| model.apply(*off, &vec![0u8; *len as usize])),
            Op::Discard(off, len) => dev
                .discard(*off, *len)
                .map(|_| model.apply(*off, &vec![0u8; *len as usize])),
            Op::Flush => dev.flush().map(|_| model.flushed()),
        };
        if let Err(e) = r {
            // The failed operation may have partly landed: its data are candidates too.
            match op {
                Op::Write(off, d) => model.maybe(*off, d),
                Op::Zero(off, len, _) | Op::Discard(off, len) => {
                    model.maybe(*off, &vec![0u8; *len as usize])
                }
                Op::Flush => {}
            }
            assert!(
                matches!(e.kind(), ErrorKind::PowerCut | ErrorKind::Failed),
                "unexpected error {e:?}"
            );
            return false;
        }
    }
    true
}

fn crash_suite(base: MemStorage, base_content: Vec<u8>, seed: u64, stride: u64) -> u64 {
    let ops = workload(seed);
    // Dry run: count operations.
    let fs = Arc::new(FaultStorage::new(base.clone()));
    let dev = VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap();
    let mut model = Model::new(base_content.clone());
    assert!(run(&dev, &ops, &mut model));
    assert!(read_all(&dev) == model.current);
    dev.close().unwrap();
    drop(dev);
    let total = fs.ops();
    let mut images = 0;
    let mut n = 0;
    while n < total {
        let fs = Arc::new(FaultStorage::new(base.clone()));
        fs.set_cut(CutPoint::AfterOps(n));
        let mut model = Model::new(base_content.clone());
        if let Ok(dev) = VhdxFile::open(
            fs.clone(),
            &vhdx_format::OpenOptions::new().read_only(false),
        ) {
            run(&dev, &ops, &mut model);
            std::mem::forget(dev); // power is gone: no clean close
        }
        for crash_seed in 0..3 {
            let img = fs.crash_image(crash_seed);
            let what = format!("seed {seed} cut {n} crash {crash_seed}");
            let ro = VhdxFile::open(
                img.clone(),
                &vhdx_format::OpenOptions::new().read_only(true),
            )
            .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e:?}"));
            let got = read_all(&ro);
            model.check(&got, &what);
            drop(ro);
            let rw_store = Arc::new(img);
            let rw = VhdxFile::open(
                rw_store.clone(),
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .unwrap_or_else(|e| panic!("{what}: writable open failed: {e:?}"));
            assert!(read_all(&rw) == got, "{what}: writable replay differs");
            rw.close().unwrap();
            drop(rw);
            let again = VhdxFile::open(
                rw_store.as_ref().clone(),
                &vhdx_format::OpenOptions::new().read_only(true),
            )
            .unwrap();
            assert!(!again.details().log_dirty, "{what}: log still dirty");
            assert!(read_all(&again) == got);
            images += 1;
        }
        n += stride;
    }
    images
}

fn fresh(opts: &CreateOptions) -> (MemStorage, Vec<u8>) {
    let m = Arc::new(MemStorage::new());
    let f = create(m.clone(), opts).unwrap();
    let content = read_all(&f);
    drop(f);
    (m.as_ref().clone(), content)
}

#[test]
fn dynamic_image_survives_power_cuts() {
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = Some(1 << 20);
    let (base, content) = fresh(&o);
    let mut images = 0;
    for seed in 0..2 {
        images += crash_suite(base.clone(), content.clone(), seed, 1);
    }
    assert!(images > 50);
}

#[test]
fn differencing_image_survives_power_cuts() {
    let o = CreateOptions {
        block_size: Some(1 << 20),
        ..CreateOptions::differencing(
            SIZE,
            ParentRef {
                data_write_guid: uuid::Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        )
    };
    let (base, content) = fresh(&o);
    let images = crash_suite(base, content, 7, 1);
    assert!(images > 20);
}

#[test]
fn failed_sync_latches_fail_stop() {
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = Some(1 << 20);
    let (base, _) = fresh(&o);
    let fs = Arc::new(FaultStorage::new(base));
    fs.inject(block_io::Injection::SyncError { nth: 2 });
    let dev = VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap();
    let mut failed = false;
    for i in 0..4u64 {
        let r = dev
            .write_at(&[1u8; 4096], i << 20)
            .and_then(|_| dev.flush());
        if r.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the injected sync error never surfaced");
    let e = dev.write_at(&[2u8; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Failed);
    assert_eq!(dev.flush().unwrap_err().kind(), ErrorKind::Failed);
    let _ = fs.len();
}

#[test]
fn allocating_writes_are_batched() {
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = Some(1 << 20);
    let (base, _) = fresh(&o);
    let fs = Arc::new(FaultStorage::new(base));
    let dev = VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap();
    let before = fs.syncs();
    // 6 blocks allocated by 4 KiB writes, then one flush.
    for i in 0..(SIZE / 4096) {
        dev.write_at(&[i as u8; 4096], i * 4096).unwrap();
    }
    dev.flush().unwrap();
    let syncs = fs.syncs() - before;
    // Session start (2 header syncs) + one commit (3 syncs).
    assert!(syncs <= 5, "{syncs} syncs for {} 4 KiB writes", SIZE / 4096);
    // Overwrites of allocated blocks need no metadata at all: one sync for the flush.
    let before = fs.syncs();
    for i in 0..64u64 {
        dev.write_at(&[0xEE; 4096], i * 4096).unwrap();
    }
    dev.flush().unwrap();
    assert_eq!(fs.syncs() - before, 1);
}

#[test]
fn interrupted_allocation_leaks_space_that_check_reports() {
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = Some(1 << 20);
    let (base, _) = fresh(&o);
    let r = vhdx_format::check_image(base.clone()).unwrap();
    assert_eq!(r.unreferenced_bytes, 0, "a fresh image wastes nothing");
    // Allocate a block and lose power before any flush: the payload and the new file length
    // reach the disk (an OS writeback), the BAT change never does.
    let fs = Arc::new(FaultStorage::new(base));
    let dev = VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap();
    dev.write_at(&[7u8; 4096], 2 << 20).unwrap();
    fs.sync_data().unwrap(); // the payload and the new length reach the disk
    fs.cut_now();
    std::mem::forget(dev);
    let img = fs.crash_image(0);
    let r = vhdx_format::check_image(img).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.allocated_blocks, 0);
    assert!(r.unreferenced_bytes >= 1 << 20, "{r:?}");
}
