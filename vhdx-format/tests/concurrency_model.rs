//! Concurrency against a model (issue 11): many writers allocating the same and neighbouring
//! blocks, overwriting, zeroing, discarding, reading and flushing at once, on dynamic and
//! differencing layers; and power cuts at every index of multi-writer runs.
//!
//! Every writer owns its sectors (4 KiB slots interleaved across writers inside shared
//! blocks, plus stripes that share blocks with the neighbours), so the model is exact: each
//! sector has one writer and one order of writes. Every sector a write puts down names the
//! write (its id and the sector number in the first 8 bytes, a fill derived from both), so a
//! sector read back says which write it came from, or zeros.
//!
//! Crash rule, per sector: let F be the latest start of a flush that returned Ok; the last
//! write to the sector acknowledged before F must have survived or been superseded by a later
//! write (acknowledged or not, whole: sectors never tear inside). Nothing older, no other
//! sector's data, no garbage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage, Storage};
use common::read_all;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vhdx_format::{create, CreateOptions, ParentRef, VhdxFile};

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// The bytes write `id` puts in absolute sector `s` (id 0: zeros).
fn sector_bytes(id: u32, s: u64) -> Vec<u8> {
    if id == 0 {
        return vec![0; SECTOR as usize];
    }
    let fill = (id.wrapping_mul(31) as u64 + s) as u8 | 1;
    let mut v = vec![fill; SECTOR as usize];
    v[..4].copy_from_slice(&id.to_le_bytes());
    v[4..8].copy_from_slice(&(s as u32).to_le_bytes());
    v
}

fn payload(id: u32, off: u64, len: u64) -> Vec<u8> {
    (off / SECTOR..(off + len) / SECTOR)
        .flat_map(|s| sector_bytes(id, s))
        .collect()
}

/// Which write sector `s` holds: `Some(id)` (0 = zeros) or `None` for foreign bytes.
fn identify(bytes: &[u8], s: u64) -> Option<u32> {
    let id = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    (bytes == sector_bytes(id, s).as_slice()).then_some(id)
}

fn options(diff: bool, size: u64) -> CreateOptions {
    let mut o = if diff {
        CreateOptions::differencing(
            size,
            ParentRef {
                data_write_guid: uuid::Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        )
    } else {
        CreateOptions::dynamic(size)
    };
    o.block_size = Some(MIB as u32);
    o
}

/// Who owns what: 4 KiB slots of the first `shared_blocks` blocks go round the writers;
/// after them each writer has a stripe of `stripe` bytes (not block aligned: neighbours
/// share blocks).
#[derive(Clone, Copy)]
struct Layout {
    writers: u64,
    shared_blocks: u64,
    stripe: u64,
}

impl Layout {
    fn size(&self) -> u64 {
        (self.shared_blocks * MIB + self.writers * self.stripe).next_multiple_of(MIB)
    }
    /// A random request of writer `w` inside what it owns: (offset, len).
    fn pick(&self, w: u64, rng: &mut ChaCha8Rng) -> (u64, u64) {
        if rng.random_bool(0.5) {
            let slots = self.shared_blocks * MIB / 4096 / self.writers;
            let slot = rng.random_range(0..slots) * self.writers + w;
            (slot * 4096, 4096)
        } else {
            let base = self.shared_blocks * MIB + w * self.stripe;
            let sectors = self.stripe / SECTOR;
            let first = rng.random_range(0..sectors);
            let n = rng.random_range(1..=(sectors - first).min(2 * MIB / SECTOR));
            (base + first * SECTOR, n * SECTOR)
        }
    }
    /// Whole blocks inside writer `w`'s stripe (discardable by it alone).
    fn own_blocks(&self, w: u64) -> Vec<u64> {
        let base = self.shared_blocks * MIB + w * self.stripe;
        (base.div_ceil(MIB)..(base + self.stripe) / MIB).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Threads against an exact model

fn threads_against_model(diff: bool, seed: u64) {
    let layout = Layout {
        writers: 8,
        shared_blocks: 4,
        stripe: 3 * MIB / 2,
    };
    let size = layout.size();
    let mem = Arc::new(MemStorage::new());
    let dev = Arc::new(create(mem.clone(), &options(diff, size)).unwrap());
    let next_id = Arc::new(AtomicU64::new(1));
    // The model: content id per sector (each sector written by one thread only).
    let model = Arc::new(Mutex::new(vec![0u32; (size / SECTOR) as usize]));
    let handles: Vec<_> = (0..layout.writers)
        .map(|w| {
            let (dev, next_id, model) = (dev.clone(), next_id.clone(), model.clone());
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed * 100 + w);
                let mut mine: HashMap<u64, u32> = HashMap::new();
                for _ in 0..120 {
                    let r = rng.random_range(0..20);
                    let (off, len) = layout.pick(w, &mut rng);
                    match r {
                        0..=10 => {
                            let id = next_id.fetch_add(1, Ordering::Relaxed) as u32;
                            dev.write_at(&payload(id, off, len), off).unwrap();
                            for s in off / SECTOR..(off + len) / SECTOR {
                                mine.insert(s, id);
                            }
                        }
                        11 => {
                            dev.write_zeroes(off, len, rng.random_bool(0.5)).unwrap();
                            for s in off / SECTOR..(off + len) / SECTOR {
                                mine.insert(s, 0);
                            }
                        }
                        12 => {
                            let blocks = layout.own_blocks(w);
                            if let Some(&b) = blocks.get(rng.random_range(0..blocks.len().max(1))) {
                                dev.discard(b * MIB, MIB).unwrap();
                                for s in b * MIB / SECTOR..(b + 1) * MIB / SECTOR {
                                    mine.insert(s, 0);
                                }
                            }
                        }
                        13..=14 => dev.flush().unwrap(),
                        _ => {
                            // Read back what this thread owns there: exact.
                            let mut buf = vec![0u8; len as usize];
                            dev.read_at(&mut buf, off).unwrap();
                            for (k, sec) in buf.chunks(SECTOR as usize).enumerate() {
                                let s = off / SECTOR + k as u64;
                                let want = mine.get(&s).copied().unwrap_or(0);
                                assert_eq!(
                                    identify(sec, s),
                                    Some(want),
                                    "diff {diff} writer {w}: sector {s} read back wrong"
                                );
                            }
                            // And something that is not ours: must not fail.
                            let other = (rng.random_range(0..size / 4096)) * 4096;
                            dev.read_at(&mut [0u8; 4096], other).unwrap();
                        }
                    }
                }
                let mut m = model.lock().unwrap();
                for (s, id) in mine {
                    m[s as usize] = id;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let model = model.lock().unwrap().clone();
    let verify = |got: &[u8], what: &str| {
        let mut bad = 0;
        for (s, sec) in got.chunks(SECTOR as usize).enumerate() {
            if identify(sec, s as u64) != Some(model[s]) {
                bad += 1;
            }
        }
        assert_eq!(
            bad, 0,
            "diff {diff} seed {seed} {what}: {bad} sectors differ"
        );
    };
    verify(&read_all(dev.as_ref()), "live");
    dev.close().unwrap();
    drop(Arc::try_unwrap(dev).unwrap());
    let r = vhdx_format::check_image(mem.clone()).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let again = VhdxFile::open(mem, &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
    verify(&read_all(&again), "reopened");
}

#[test]
fn eight_threads_dynamic_against_model() {
    for seed in 0..3 {
        threads_against_model(false, seed);
    }
}

#[test]
fn eight_threads_differencing_against_model() {
    for seed in 0..3 {
        threads_against_model(true, seed);
    }
}

// ---------------------------------------------------------------------------------------
// Power cuts

/// One write of the history of a sector.
#[derive(Clone, Copy, Debug)]
struct Wr {
    id: u32,
    /// Logical time of acknowledgement (`None`: failed or never finished).
    ack: Option<u64>,
}

/// Writes and flushes as they happened, with logical times.
#[derive(Default)]
struct History {
    clock: AtomicU64,
    sectors: Mutex<HashMap<u64, Vec<Wr>>>,
    /// Latest start of a flush that returned Ok.
    flushed_from: AtomicU64,
}

impl History {
    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }
    /// Records a write of `id` (0: zeros) over `[off, off+len)`, acknowledged at `ack`.
    fn write(&self, id: u32, off: u64, len: u64, ack: Option<u64>) {
        let mut m = self.sectors.lock().unwrap();
        for s in off / SECTOR..(off + len) / SECTOR {
            m.entry(s).or_default().push(Wr { id, ack });
        }
    }
    fn flushed(&self, start: u64) {
        self.flushed_from.fetch_max(start, Ordering::SeqCst);
    }
    /// Checks a crash image's contents against the rule in the module docs.
    fn check(&self, got: &[u8], what: &str) {
        let f = self.flushed_from.load(Ordering::SeqCst);
        let m = self.sectors.lock().unwrap();
        for (s, sec) in got.chunks(SECTOR as usize).enumerate() {
            let s = s as u64;
            let Some(id) = identify(sec, s) else {
                panic!("{what}: sector {s} holds foreign bytes");
            };
            let hist = m.get(&s).map(Vec::as_slice).unwrap_or(&[]);
            let floor = hist.iter().rposition(|w| w.ack.is_some_and(|a| a < f));
            let ok = match floor {
                Some(d) => hist[d..].iter().any(|w| w.id == id),
                None => id == 0 || hist.iter().any(|w| w.id == id),
            };
            assert!(
                ok,
                "{what}: sector {s} holds write {id}, not allowed by its history {hist:?} \
                 (flushed from {f})"
            );
        }
    }
}

/// What a crash image must satisfy: opens writable (replaying the log), checks clean,
/// reads back per the history; then closes clean and reopens read-only the same.
fn verify_crash_image(img: MemStorage, hist: &History, what: &str) {
    let store = Arc::new(img);
    let rw = VhdxFile::open(
        store.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap_or_else(|e| panic!("{what}: writable open failed: {e:?}"));
    let r = rw.check().unwrap();
    assert!(r.errors.is_empty(), "{what}: check: {:?}", r.errors);
    let got = read_all(&rw);
    hist.check(&got, what);
    rw.close().unwrap();
    drop(rw);
    let ro = VhdxFile::open(
        store.as_ref().clone(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    assert!(
        !ro.details().log_dirty,
        "{what}: log still dirty after close"
    );
    assert!(read_all(&ro) == got, "{what}: reopen differs");
}

/// One step of a writer in a deterministic schedule.
enum Stage<'a> {
    Idle,
    /// Reserved (id, offset, len, extents, guard): payload not written yet.
    Reserved(
        u32,
        u64,
        u64,
        Vec<vhdx_format::WriteExtent>,
        vhdx_format::AllocGuard<'a, Arc<FaultStorage>>,
    ),
    /// Payload written, not completed.
    Written(
        u32,
        u64,
        u64,
        vhdx_format::AllocGuard<'a, Arc<FaultStorage>>,
    ),
}

/// How much of the interesting interleavings a schedule hit.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    /// Flushes run while another writer held a reservation.
    flushes_during_allocation: u64,
    /// Reservations refused because another writer was allocating the block.
    busy: u64,
    /// Guards completed.
    completed: u64,
}

/// Runs a deterministic interleaving of `writers` writers on `dev`: allocating writes split
/// into reserve / payload / complete steps (the allocation guard), synchronous writes and
/// zeroes, and flushes, chosen by `seed`. Stops at the first error (the power cut).
fn schedule(
    dev: &VhdxFile<Arc<FaultStorage>>,
    layout: Layout,
    seed: u64,
    hist: &History,
) -> Coverage {
    let mut cov = Coverage::default();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stages: Vec<Stage<'_>> = (0..layout.writers).map(|_| Stage::Idle).collect();
    let mut next_id = 1u32;
    for _ in 0..90 {
        let w = rng.random_range(0..layout.writers);
        let stage = std::mem::replace(&mut stages[w as usize], Stage::Idle);
        let res: block_io::Result<()> = match stage {
            Stage::Idle => {
                let (off, len) = layout.pick(w, &mut rng);
                let id = next_id;
                next_id += 1;
                // A synchronous write waits for another writer's allocation of its blocks,
                // and that writer is this thread: such writes take the guard path instead.
                let blocks = |o: u64, l: u64| (o / MIB, (o + l - 1) / MIB);
                let (b0, b1) = blocks(off, len);
                let clash = stages.iter().any(|st| match st {
                    Stage::Reserved(_, o, l, ..) | Stage::Written(_, o, l, _) => {
                        let (c0, c1) = blocks(*o, *l);
                        c0 <= b1 && b0 <= c1
                    }
                    Stage::Idle => false,
                });
                let mut pick = rng.random_range(0..10);
                if clash && (6..=8).contains(&pick) {
                    pick = 0;
                }
                match pick {
                    0..=5 => match dev.reserve_write(off, len) {
                        Ok(Some((x, g))) => {
                            stages[w as usize] = Stage::Reserved(id, off, len, x, g);
                            Ok(())
                        }
                        // Busy (another writer allocates the block): try later.
                        Ok(None) => {
                            cov.busy += 1;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    6..=7 => {
                        let r = dev.write_at(&payload(id, off, len), off);
                        hist.write(id, off, len, r.is_ok().then(|| hist.now()));
                        r
                    }
                    8 => {
                        let r = dev.write_zeroes(off, len, false);
                        hist.write(0, off, len, r.is_ok().then(|| hist.now()));
                        r
                    }
                    _ => {
                        if stages.iter().any(|s| !matches!(s, Stage::Idle)) {
                            cov.flushes_during_allocation += 1;
                        }
                        let start = hist.now();
                        let r = dev.flush();
                        if r.is_ok() {
                            hist.flushed(start);
                        }
                        r
                    }
                }
            }
            Stage::Reserved(id, off, len, extents, guard) => {
                let data = payload(id, off, len);
                let mut at = 0usize;
                let mut r = Ok(());
                for x in &extents {
                    r = r.and_then(|()| {
                        dev.storage()
                            .write_at(&data[at..at + x.len as usize], x.file_offset)
                    });
                    at += x.len as usize;
                }
                match r {
                    Ok(()) => {
                        stages[w as usize] = Stage::Written(id, off, len, guard);
                        Ok(())
                    }
                    Err(e) => {
                        hist.write(id, off, len, None);
                        guard.complete(Err(e))
                    }
                }
            }
            Stage::Written(id, off, len, guard) => {
                let r = guard.complete(Ok(()));
                cov.completed += 1;
                hist.write(id, off, len, r.is_ok().then(|| hist.now()));
                r
            }
        };
        if res.is_err() {
            // Writes begun but not completed may have landed: they are later writes.
            for st in stages.drain(..) {
                match st {
                    Stage::Reserved(id, off, len, _, _) | Stage::Written(id, off, len, _) => {
                        hist.write(id, off, len, None)
                    }
                    Stage::Idle => {}
                }
            }
            return cov;
        }
    }
    // Finish what is in flight, then flush.
    for st in stages.drain(..) {
        let r = match st {
            Stage::Reserved(id, off, len, extents, guard) => {
                let data = payload(id, off, len);
                let mut at = 0usize;
                let mut r = Ok(());
                for x in &extents {
                    r = r.and_then(|()| {
                        dev.storage()
                            .write_at(&data[at..at + x.len as usize], x.file_offset)
                    });
                    at += x.len as usize;
                }
                let r = guard.complete(r);
                hist.write(id, off, len, r.is_ok().then(|| hist.now()));
                r
            }
            Stage::Written(id, off, len, guard) => {
                let r = guard.complete(Ok(()));
                hist.write(id, off, len, r.is_ok().then(|| hist.now()));
                r
            }
            Stage::Idle => Ok(()),
        };
        if r.is_err() {
            return cov;
        }
    }
    let start = hist.now();
    if dev.flush().is_ok() {
        hist.flushed(start);
    }
    cov
}

/// A fresh image of `layout`'s size with its session started (the allocation guard needs
/// it), as the base of every run.
fn base_image(diff: bool, layout: Layout) -> MemStorage {
    let mem = Arc::new(MemStorage::new());
    let f = create(mem.clone(), &options(diff, layout.size())).unwrap();
    f.close().unwrap();
    drop(f);
    mem.as_ref().clone()
}

fn open_session(fs: &Arc<FaultStorage>) -> block_io::Result<VhdxFile<Arc<FaultStorage>>> {
    let dev = VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )?;
    // Start the session with a write that changes nothing visible (zeros over an
    // unallocated sector of a dynamic layer are no change; of a differencing layer they
    // are a write of zeros, recorded by no one because every sector reads zeros anyway).
    dev.write_at(&[0u8; 512], 0)?;
    Ok(dev)
}

fn schedule_crash_sweep(diff: bool, seeds: std::ops::Range<u64>) -> u64 {
    let layout = Layout {
        writers: 4,
        shared_blocks: 2,
        stripe: 3 * MIB / 2,
    };
    let base = base_image(diff, layout);
    let mut images = 0;
    let mut cov = Coverage::default();
    for seed in seeds {
        // Dry run: how many write-like operations and syncs the schedule does.
        let fs = Arc::new(FaultStorage::new(base.clone()));
        let total = {
            let dev = open_session(&fs).unwrap();
            let hist = History::default();
            let c = schedule(&dev, layout, seed, &hist);
            cov.flushes_during_allocation += c.flushes_during_allocation;
            cov.busy += c.busy;
            cov.completed += c.completed;
            let got = read_all(&dev);
            hist.check(&got, "dry run");
            std::mem::forget(dev);
            fs.ops()
        };
        for n in 0..total {
            let fs = Arc::new(FaultStorage::new(base.clone()));
            fs.set_cut(CutPoint::AfterOps(n));
            let hist = History::default();
            if let Ok(dev) = open_session(&fs) {
                schedule(&dev, layout, seed, &hist);
                std::mem::forget(dev); // the power is gone: no clean close
            }
            fs.cut_now();
            for crash in 0..3 {
                let what = format!("diff {diff} schedule {seed} cut {n}/{total} crash {crash}");
                verify_crash_image(fs.crash_image(crash), &hist, &what);
                images += 1;
            }
        }
    }
    // The schedules did interleave: flushes between a reservation and its completion, and
    // two writers after one block.
    assert!(
        cov.flushes_during_allocation > 0 && cov.busy > 0 && cov.completed > 10,
        "{cov:?}"
    );
    images
}

#[test]
fn power_cut_at_every_index_of_a_multi_writer_schedule_dynamic() {
    assert!(schedule_crash_sweep(false, 0..3) > 300);
}

#[test]
fn power_cut_at_every_index_of_a_multi_writer_schedule_differencing() {
    assert!(schedule_crash_sweep(true, 10..12) > 200);
}

/// Real threads on a fault storage: `writers` threads writing and flushing at once; the
/// power is cut after the n-th operation for every n over the run (the interleaving varies
/// from run to run; the rule holds for every one).
fn threaded_run(dev: &Arc<VhdxFile<Arc<FaultStorage>>>, layout: Layout, hist: &Arc<History>) {
    let next_id = Arc::new(AtomicU64::new(1));
    let handles: Vec<_> = (0..layout.writers)
        .map(|w| {
            let (dev, hist, next_id) = (dev.clone(), hist.clone(), next_id.clone());
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(w);
                for _ in 0..12 {
                    let (off, len) = layout.pick(w, &mut rng);
                    let r = if rng.random_range(0..4) == 0 {
                        let start = hist.now();
                        let r = dev.flush();
                        if r.is_ok() {
                            hist.flushed(start);
                        }
                        r
                    } else {
                        let id = next_id.fetch_add(1, Ordering::Relaxed) as u32;
                        let r = dev.write_at(&payload(id, off, len), off);
                        hist.write(id, off, len, r.is_ok().then(|| hist.now()));
                        r
                    };
                    if r.is_err() {
                        return;
                    }
                }
                let start = hist.now();
                if dev.flush().is_ok() {
                    hist.flushed(start);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn threaded_crash_sweep(diff: bool, stride: u64) -> u64 {
    let layout = Layout {
        writers: 4,
        shared_blocks: 2,
        stripe: 3 * MIB / 2,
    };
    let base = base_image(diff, layout);
    let fs = Arc::new(FaultStorage::new(base.clone()));
    let total = {
        let dev = Arc::new(open_session(&fs).unwrap());
        let hist = Arc::new(History::default());
        threaded_run(&dev, layout, &hist);
        hist.check(&read_all(dev.as_ref()), "dry run");
        std::mem::forget(dev);
        fs.ops()
    };
    let mut images = 0;
    let mut n = 0;
    while n < total + 10 {
        let fs = Arc::new(FaultStorage::new(base.clone()));
        fs.set_cut(CutPoint::AfterOps(n));
        let hist = Arc::new(History::default());
        if let Ok(dev) = open_session(&fs) {
            let dev = Arc::new(dev);
            threaded_run(&dev, layout, &hist);
            std::mem::forget(dev);
        }
        fs.cut_now();
        for crash in 0..2 {
            let what = format!("diff {diff} threaded cut {n}/{total} crash {crash}");
            verify_crash_image(fs.crash_image(crash + n), &hist, &what);
            images += 1;
        }
        n += stride;
    }
    images
}

#[test]
fn power_cuts_over_a_threaded_run_dynamic() {
    assert!(threaded_crash_sweep(false, 1) > 50);
}

#[test]
fn power_cuts_over_a_threaded_run_differencing() {
    assert!(threaded_crash_sweep(true, 2) > 25);
}

// ---------------------------------------------------------------------------------------
// Nothing waits for a sync or a payload write it does not need

/// A memory storage whose syncs, and writes of one chosen length, can be held at a gate.
#[derive(Debug, Default)]
struct Gated {
    inner: MemStorage,
    closed: Mutex<(bool, Option<usize>)>,
    cv: std::sync::Condvar,
    /// Syncs and writes currently held.
    held: AtomicU64,
    /// Syncs done.
    syncs: AtomicU64,
}

impl Gated {
    /// Holds every sync (`syncs`) and every write of `write_len` bytes until `open`.
    fn close(&self, syncs: bool, write_len: Option<usize>) {
        *self.closed.lock().unwrap() = (syncs, write_len);
    }
    fn open(&self) {
        *self.closed.lock().unwrap() = (false, None);
        self.cv.notify_all();
    }
    fn pass(&self, is_held: impl Fn(&(bool, Option<usize>)) -> bool) {
        let mut g = self.closed.lock().unwrap();
        if is_held(&g) {
            self.held.fetch_add(1, Ordering::SeqCst);
            while is_held(&g) {
                g = self.cv.wait(g).unwrap();
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
    fn wait_held(&self) {
        let t = std::time::Instant::now();
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(t.elapsed().as_secs() < 20, "nothing reached the gate");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Storage for Gated {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.pass(|g| g.1 == Some(buf.len()));
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> block_io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> block_io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> block_io::Result<()> {
        self.pass(|g| g.0);
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

/// Runs `f` on a thread and fails the test if it has not finished within 20 s.
fn finishes(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(20)).is_ok(),
        "{what} waited for something it does not need"
    );
}

fn nothing_waits(diff: bool) {
    let st = Arc::new(Gated::default());
    let dev = Arc::new(create(st.clone(), &options(diff, 16 * MIB)).unwrap());
    dev.write_at(&[1; MIB as usize], 0).unwrap(); // block 0: fully present
    dev.write_at(&[2; 8192], MIB).unwrap(); // block 1: partially present if differencing
    dev.flush().unwrap();

    // 1. A flush stuck in its sync (with an allocation pending in it).
    st.close(true, None);
    dev.write_at(&[3; 4096], 2 * MIB).unwrap();
    let flusher = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.flush().unwrap())
    };
    st.wait_held();
    let d = dev.clone();
    finishes(
        "a read, overwrite or allocation during a stuck flush",
        move || {
            let mut buf = vec![0u8; 4096];
            d.read_at(&mut buf, 4096).unwrap();
            assert_eq!(buf, vec![1; 4096]);
            d.write_at(&[4; 4096], 8192).unwrap();
            d.read_at(&mut buf, MIB).unwrap();
            assert_eq!(buf, vec![2; 4096]);
            d.write_at(&[5; 4096], MIB + 65536).unwrap(); // into the partially present block
            d.write_at(&[6; 4096], 3 * MIB).unwrap(); // allocates block 3
            d.read_at(&mut buf, 3 * MIB).unwrap();
            assert_eq!(buf, vec![6; 4096]);
        },
    );
    st.open();
    flusher.join().unwrap();

    // 2. An allocating write stuck in its payload write.
    st.close(false, Some(12800));
    let writer = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.write_at(&[7; 12800], 4 * MIB).unwrap())
    };
    st.wait_held();
    let d = dev.clone();
    finishes(
        "a flush, read or other allocation during a stuck payload write",
        move || {
            d.write_at(&[8; 4096], 5 * MIB).unwrap(); // allocates block 5
            d.flush().unwrap();
            let mut buf = vec![0u8; 4096];
            d.read_at(&mut buf, 5 * MIB).unwrap();
            assert_eq!(buf, vec![8; 4096]);
            // Block 4 is not visible before its payload is written.
            d.read_at(&mut buf, 4 * MIB).unwrap();
            assert_eq!(buf, vec![0; 4096]);
        },
    );
    st.open();
    writer.join().unwrap();
    dev.flush().unwrap();
    let mut buf = vec![0u8; 12800];
    dev.read_at(&mut buf, 4 * MIB).unwrap();
    assert_eq!(buf, vec![7; 12800]);
    dev.close().unwrap();
    let r = dev.check().unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn reads_overwrites_and_allocations_never_wait_for_unrelated_io() {
    nothing_waits(false);
    nothing_waits(true);
}

/// Flushes that arrive while a commit runs share the next one: eight flushers, two commits.
#[test]
fn concurrent_flushes_coalesce() {
    let st = Arc::new(Gated::default());
    let dev = Arc::new(create(st.clone(), &options(false, 16 * MIB)).unwrap());
    dev.write_at(&[1; 4096], 0).unwrap();
    st.close(true, None);
    let first = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.flush().unwrap())
    };
    st.wait_held();
    let before = st.syncs.load(Ordering::SeqCst);
    // Block 1 allocated while the first commit is stuck: the next commit must carry it.
    dev.write_at(&[2; 4096], MIB).unwrap();
    let others: Vec<_> = (0..7)
        .map(|_| {
            let dev = dev.clone();
            std::thread::spawn(move || dev.flush().unwrap())
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    st.open();
    first.join().unwrap();
    for h in others {
        h.join().unwrap();
    }
    // The stuck commit: payload sync, entry sync, in-place sync (3, one was held); the
    // shared one: 3 more. Seven separate commits would be 21 syncs.
    let syncs = st.syncs.load(Ordering::SeqCst) - before;
    assert!(syncs <= 6, "{syncs} syncs for eight concurrent flushes");
    drop(Arc::try_unwrap(dev).unwrap());
    let again = VhdxFile::open(
        Arc::new(st.inner.clone()),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    again.read_at(&mut buf, MIB).unwrap();
    assert_eq!(buf, [2; 4096]);
}
