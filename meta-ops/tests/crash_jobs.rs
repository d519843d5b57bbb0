//! Crash sweeps on the fault backend for the jobs that had none (issues 12 and 15): copy,
//! convert, receive (full and incremental) and the mirror's pivot. Each image sits on a
//! `FaultStorage`; the job runs once uncut to count its writes and syncs, then once per cut
//! point with the power cut there, and each file is rebuilt from its durable bytes plus a
//! fate (lost, whole or torn at 512 bytes) for every pending write, drawn from a seed.
//!
//! - **Copy and convert, no guest** (`FaultStorage::sweep_cuts`: every cut, 6 seeds each;
//!   the job runs one chunk at a time so a seed replays exactly): a 4 MiB dynamic VHDX or
//!   VHD source (data, zeroed runs, holes) copied or converted into a VHDX or VHD. After
//!   every cut the destination opens and checks clean; if the job had reported success it
//!   reads exactly the source, else every sector reads as the source or as the destination
//!   did before (zeros for a convert, junk for a copy). The source is never written (its
//!   storage counts no write after it was opened, and its bytes are unchanged).
//! - **Convert under two guest threads** (source and destination in one power domain, one op
//!   counter over both; 60 cuts sampled over the run, 2 seeds each; the count varies a
//!   little between runs as the guests run beside the job): both files open and check
//!   after every cut, and the file the guest was on (the destination once the pivot is
//!   done, else the source) holds every guest write that completed before a flush that
//!   returned success began (blocks written later, or by writes in flight then, may read
//!   either way).
//! - **Mirror under two guest threads**, each timing (`before`, `after`, `split`), host A
//!   and host B both VHDX in one power domain: 40 cuts sampled over the run plus every op
//!   within 12 of the pivot and of the switch, 2 seeds each. A and B open and check after
//!   every cut. Before the switch (or the `before` pivot) A holds every flushed guest
//!   write; after the end B does; in between (`after` and `split` after the switch) a
//!   flushed write made after the switch is on B, and every other flushed write is on A or
//!   on B (which granules B holds is in memory only: the disk is recoverable from A and B
//!   with that map, not from either alone).
//! - **Receive, full stream** (`send::receive_new` into an empty `FaultStorage`, every cut,
//!   6 seeds; VHDX, VHD, raw): once it returned success the image is synced, opens, checks
//!   and reads exactly the disk sent; before that it failed with a typed error naming the
//!   power cut, and `receive` renames its temporary file into place only after such a
//!   success (so DEST does not exist); `a_failed_full_receive_leaves_no_file` checks that
//!   on real files for streams cut short at sampled bytes.
//! - **Receive, incremental** (`send::receive_into` a VHDX or VHD snapshot on a
//!   `FaultStorage`, every cut, 6 seeds): the snapshot opens and checks after every cut;
//!   once receive returned success it reads exactly the disk sent and no journal is left;
//!   before, every sector reads as before or as after (the records go in place), the
//!   journal is there (it is made durable before the snapshot is written), and finishing
//!   it (`send::resume_into` on even seeds; on odd ones `send::receive_into` of the same
//!   stream, which finishes the journal and then reports the stream as already applied)
//!   makes the snapshot read exactly the disk sent, byte for byte, and check clean.
//!   `an_incremental_receive_stopped_before_its_journal_leaves_dest_as_it_was`: a receive
//!   that stops before the journal exists (the stream cut short at sampled bytes, or a
//!   spool left by a kill) writes nothing to the snapshot, and the stream then applies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chains;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{
    BlockDevice, ErrorKind, FaultStorage, MemStorage, RawDisk, Result as IoResult, Storage,
};
use chain::{Format, Identity, Layer};
use chains::Kind;
use meta_ops::send::{self, ReceiveOptions, SendError, SendOptions};
use meta_ops::{Job, JobError, JobOptions, JobRunner, LiveDisk, MirrorTiming};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 4 << 20;
const SECTOR: usize = 512;
/// Crash images per cut point in the sweeps over every cut.
const SEEDS: u64 = 6;
/// The guests' write size.
const BLK: usize = 4096;

// ---------------------------------------------------------------------------------------
// Images and devices

/// Opens an image of `kind` on `s`.
fn open_dev<S: Storage + 'static>(kind: Kind, s: S, ro: bool) -> IoResult<Arc<dyn BlockDevice>> {
    Ok(match kind {
        Kind::Vhdx => Arc::new(vhdx_format::VhdxFile::open(
            s,
            &vhdx_format::OpenOptions::new().read_only(ro),
        )?),
        Kind::Vhd => Arc::new(vhd_format::VhdFile::open(
            s,
            &vhd_format::OpenOptions::new().read_only(ro),
        )?),
    })
}

/// An empty dynamic image of `kind` in memory (1 MiB blocks for VHDX, 512 KiB for VHD).
fn create(kind: Kind, mem: Arc<MemStorage>) -> Arc<dyn BlockDevice> {
    match kind {
        Kind::Vhdx => {
            let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
            o.block_size = Some(1 << 20);
            Arc::new(vhdx_format::create(mem, &o).unwrap())
        }
        Kind::Vhd => {
            let mut o = vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
            o.block_size = 512 << 10;
            Arc::new(vhd_format::VhdFile::create(mem, &o).unwrap())
        }
    }
}

/// Random changes: data runs of 1 to 600 sectors, some zeroed runs; returns nothing, `model`
/// follows.
fn scribble(dev: &dyn BlockDevice, model: &mut [u8], rng: &mut ChaCha8Rng, n: usize) {
    for _ in 0..n {
        let sectors = match rng.random_range(0..3) {
            0 => rng.random_range(1..8),
            1 => 128,
            _ => rng.random_range(8..600),
        };
        let len = sectors * SECTOR;
        let off = rng.random_range(0..(SIZE as usize - len) / SECTOR + 1) * SECTOR;
        if rng.random_range(0..5) == 0 {
            dev.write_zeroes(off as u64, len as u64, rng.random_bool(0.5))
                .unwrap();
            model[off..off + len].fill(0);
        } else {
            let k: u8 = rng.random_range(1..=255);
            let data: Vec<u8> = (0..len)
                .map(|i| k ^ (i / SECTOR) as u8 ^ (i as u8).wrapping_mul(7))
                .collect();
            dev.write_at(&data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
    }
}

/// A closed image of `kind` holding `n` random changes (0: empty); its bytes and what it
/// reads.
fn image(kind: Kind, seed: u64, n: usize) -> (Vec<u8>, Vec<u8>) {
    let mem = Arc::new(MemStorage::new());
    let dev = create(kind, mem.clone());
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    scribble(&*dev, &mut model, &mut rng, n);
    dev.flush().unwrap();
    drop(dev); // closes the VHDX log
    (mem.to_vec().unwrap(), model)
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.info().virtual_size as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// Opens a crash image of `kind` as a reboot would (read-write: a VHDX log is replayed, a
/// lost VHD footer repaired), checks it clean, and returns what it reads.
fn reopen(kind: Kind, img: MemStorage, what: &str) -> Vec<u8> {
    match kind {
        Kind::Vhdx => {
            let f =
                vhdx_format::VhdxFile::open(img, &vhdx_format::OpenOptions::new().read_only(false))
                    .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
            let r = f.check().unwrap();
            assert!(r.errors.is_empty(), "{what}: check: {r:?}");
            read_all(&f)
        }
        Kind::Vhd => {
            let f =
                vhd_format::VhdFile::open(img, &vhd_format::OpenOptions::new().read_only(false))
                    .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
            let r = vhd_format::check_storage(f.storage()).unwrap();
            assert!(r.is_clean(), "{what}: check: {r:?}");
            read_all(&f)
        }
    }
}

/// Every sector of `got` reads as `a` or as `b`; panics naming the first that does not.
fn each_sector_either(got: &[u8], a: &[u8], b: &[u8], what: &str) {
    for (i, ((g, x), y)) in got
        .chunks(SECTOR)
        .zip(a.chunks(SECTOR))
        .zip(b.chunks(SECTOR))
        .enumerate()
    {
        assert!(
            g == x || g == y,
            "{what}: sector {i} reads neither as before nor as after: {:02x?}",
            &g[..8]
        );
    }
}

/// Whether a device error comes from the power cut: the cut itself, or the fail-stop latch
/// of an image whose earlier write or sync the cut failed.
fn from_cut(e: &block_io::Error) -> bool {
    matches!(e.kind(), ErrorKind::PowerCut | ErrorKind::Failed)
}

/// Whether a job failed because the power went (and not for another reason).
fn cut_error(e: &JobError) -> bool {
    match e {
        JobError::Source { source, .. }
        | JobError::Destination { source, .. }
        | JobError::Prepare { source, .. } => from_cut(source),
        _ => false,
    }
}

/// The job's tuning in the sweeps: small chunks (more cut points inside the copy), and a
/// fixed duty under busy guests. The guest-share feedback stops the steps for probes while
/// the guests go on, so how many operations come before the pivot varies from run to run, and
/// cut points taken from a first run's marks then missed whole generations (a mirror sweep
/// once cut every run before its switch).
fn opts(parallel: usize) -> JobOptions {
    JobOptions {
        granularity: 64 << 10,
        chunk: 256 << 10,
        parallel,
        guest_share: 0,
        ..JobOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// Copy and convert, no guest: every cut point.

struct CopyRun {
    src_fs: Arc<FaultStorage>,
    src_writes: u64,
    src_bytes: Vec<u8>,
    live: Arc<LiveDisk>,
    dest: Arc<dyn BlockDevice>,
}

fn copy_sweep(src_kind: Kind, dest_kind: Kind, convert: bool, seed: u64) {
    let runner = JobRunner::new().unwrap();
    let (src_bytes, model) = image(src_kind, seed, 24);
    // A convert's destination is a new image; a copy's holds an older disk (junk).
    let (dest_bytes, before) = image(dest_kind, seed ^ 0x5eed, if convert { 0 } else { 40 });
    let ok = Mutex::new(false);
    let mut checked = 0u64;
    let mut succeeded = 0u64;
    let name = if convert { "convert" } else { "copy" };
    let total = FaultStorage::sweep_cuts(
        &dest_bytes,
        |fs| {
            let src_fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(&src_bytes)));
            // Read-write, as the guest has it: the job must still not write it.
            let src = open_dev(src_kind, src_fs.clone(), false).unwrap();
            let dest = open_dev(dest_kind, fs, false).unwrap();
            CopyRun {
                src_writes: src_fs.writes(),
                src_bytes: src_fs.live_image().to_vec().unwrap(),
                src_fs,
                live: LiveDisk::new(src),
                dest,
            }
        },
        |run| {
            let job = if convert {
                Job::convert(run.dest.clone())
            } else {
                Job::copy(run.dest.clone())
            };
            let r = runner
                .start(&run.live, job.options(opts(1)))
                .unwrap()
                .wait_blocking();
            if let Err(e) = &r {
                assert!(cut_error(e), "{name}: the job failed otherwise: {e}");
            }
            *ok.lock() = r.is_ok();
            assert_eq!(
                run.src_fs.writes(),
                run.src_writes,
                "{name} wrote the source"
            );
            assert!(
                run.src_fs.live_image().to_vec().unwrap() == run.src_bytes,
                "{name} changed the source"
            );
            // Dropping the devices closes them (their writes are swept too).
        },
        SEEDS,
        |cut, s, img| {
            let what = format!("{name} {src_kind:?} -> {dest_kind:?} cut {cut} seed {s}");
            let got = reopen(dest_kind, img, &what);
            if *ok.lock() {
                assert!(
                    got == model,
                    "{what}: the job succeeded but the copy differs"
                );
                succeeded += 1;
            } else {
                each_sector_either(&got, &before, &model, &what);
            }
            checked += 1;
        },
    );
    eprintln!(
        "{name} {src_kind:?} -> {dest_kind:?}: {total} ops, {checked} crash images, \
         {succeeded} after success"
    );
    assert!(total > 10, "{total} ops");
    assert!(succeeded > 0 && succeeded < checked);
}

#[test]
fn convert_vhdx_to_vhdx_every_cut() {
    copy_sweep(Kind::Vhdx, Kind::Vhdx, true, 1);
}

#[test]
fn convert_vhdx_to_vhd_every_cut() {
    copy_sweep(Kind::Vhdx, Kind::Vhd, true, 2);
}

#[test]
fn convert_vhd_to_vhdx_every_cut() {
    copy_sweep(Kind::Vhd, Kind::Vhdx, true, 3);
}

#[test]
fn copy_vhd_over_an_old_vhdx_every_cut() {
    copy_sweep(Kind::Vhd, Kind::Vhdx, false, 4);
}

#[test]
fn copy_vhdx_over_an_old_vhd_every_cut() {
    copy_sweep(Kind::Vhdx, Kind::Vhd, false, 5);
}

// ---------------------------------------------------------------------------------------
// One power domain over several files, and guests model-checked across a cut.

/// One power domain over several fault storages: one op counter, and a cut cuts all. It
/// also notes the op count at which a watched disk's generation first reached 1 and 2 (the
/// pivot, or a mirror's switch and end).
#[derive(Debug, Default)]
struct Power {
    ops: AtomicU64,
    cut_at: AtomicU64,
    disks: Mutex<Vec<Arc<FaultStorage>>>,
    live: Mutex<Option<Arc<LiveDisk>>>,
    gen_at: [AtomicU64; 3],
    /// The watched disk's generation when the power went (`u64::MAX`: not cut).
    cut_gen: AtomicU64,
}

impl Power {
    fn new(cut_at: u64) -> Arc<Power> {
        let p = Power::default();
        p.cut_at.store(cut_at, Ordering::SeqCst);
        for g in &p.gen_at {
            g.store(u64::MAX, Ordering::SeqCst);
        }
        p.cut_gen.store(u64::MAX, Ordering::SeqCst);
        Arc::new(p)
    }

    fn tick(&self) -> IoResult<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if let Some(l) = &*self.live.lock() {
            let gen = l.generation();
            for slot in &self.gen_at[1..=(gen as usize).min(2)] {
                let _ = slot.compare_exchange(u64::MAX, n, Ordering::SeqCst, Ordering::SeqCst);
            }
            if n == self.cut_at.load(Ordering::SeqCst) {
                self.cut_gen.store(gen, Ordering::SeqCst);
            }
        }
        if n >= self.cut_at.load(Ordering::SeqCst) {
            for d in self.disks.lock().iter() {
                d.cut_now();
            }
            return Err(block_io::Error::new(ErrorKind::PowerCut, "power cut"));
        }
        Ok(())
    }
}

/// A file on a power domain.
#[derive(Debug, Clone)]
struct Disk0 {
    f: Arc<FaultStorage>,
    power: Arc<Power>,
}

impl Disk0 {
    fn new(bytes: &[u8], power: &Arc<Power>) -> Disk0 {
        let f = Arc::new(FaultStorage::new(MemStorage::from_bytes(bytes)));
        power.disks.lock().push(f.clone());
        Disk0 {
            f,
            power: power.clone(),
        }
    }
}

impl Storage for Disk0 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> IoResult<()> {
        self.f.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> IoResult<()> {
        self.power.tick()?;
        self.f.write_at(buf, offset)
    }
    fn len(&self) -> IoResult<u64> {
        self.f.len()
    }
    fn set_len(&self, len: u64) -> IoResult<()> {
        self.power.tick()?;
        self.f.set_len(len)
    }
    fn sync_data(&self) -> IoResult<()> {
        self.power.tick()?;
        self.f.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> IoResult<()> {
        self.power.tick()?;
        self.f.punch_hole(offset, len)
    }
}

/// What the guests know (see [`Guests`]).
#[derive(Debug, Default, Clone)]
struct Known {
    model: Vec<u8>,
    /// The generation each block's last completed write landed in.
    gens: Vec<u64>,
    /// Writes started so far; `started[b]` is the number of the last one to block `b`.
    seq: u64,
    started: Vec<u64>,
    in_flight: Vec<u32>,
    /// Blocks a write failed on (their contents are unknown from then on).
    failed: HashSet<usize>,
    /// As of the start of the latest flush that returned success: the model, its
    /// generations, the write count, and the blocks with writes in flight.
    flushed: Vec<u8>,
    flushed_gens: Vec<u64>,
    flushed_seq: u64,
    flushed_in_flight: HashSet<usize>,
    /// Guest requests done (writes and flushes).
    ops: u64,
}

impl Known {
    fn new(initial: Vec<u8>) -> Known {
        let blocks = initial.len() / BLK;
        Known {
            flushed: initial.clone(),
            model: initial,
            gens: vec![0; blocks],
            flushed_gens: vec![0; blocks],
            started: vec![0; blocks],
            in_flight: vec![0; blocks],
            ..Known::default()
        }
    }

    /// Whether block `b` may read either way after a crash.
    fn unsure(&self, b: usize) -> bool {
        self.started[b] > self.flushed_seq
            || self.flushed_in_flight.contains(&b)
            || self.failed.contains(&b)
    }
}

/// `threads` guest threads writing 4 KiB blocks (thread `t` the blocks `b % threads == t`,
/// so each block's writes are ordered) and flushing, until stopped.
struct Guests {
    known: Arc<Mutex<Known>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Guests {
    fn start(live: &Arc<LiveDisk>, initial: Vec<u8>, threads: usize, seed: u64) -> Guests {
        let known = Arc::new(Mutex::new(Known::new(initial)));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|t| {
                let (live, known, stop) = (live.clone(), known.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (t as u64 * 0x9e37));
                    let blocks = SIZE as usize / BLK;
                    while !stop.load(Ordering::Acquire) {
                        if rng.random_bool(0.2) {
                            let (s, snap, gens, inf) = {
                                let k = known.lock();
                                let inf: HashSet<usize> =
                                    (0..blocks).filter(|&b| k.in_flight[b] > 0).collect();
                                (k.seq, k.model.clone(), k.gens.clone(), inf)
                            };
                            let r = live.flush();
                            let mut k = known.lock();
                            k.ops += 1;
                            if r.is_ok() && s >= k.flushed_seq {
                                k.flushed = snap;
                                k.flushed_gens = gens;
                                k.flushed_seq = s;
                                k.flushed_in_flight = inf;
                            }
                            continue;
                        }
                        let b = rng.random_range(0..blocks / threads) * threads + t;
                        let n = {
                            let mut k = known.lock();
                            k.seq += 1;
                            let n = k.seq;
                            k.started[b] = n;
                            k.in_flight[b] += 1;
                            n
                        };
                        let mut data = vec![(n as u8) | 1; BLK];
                        data[..8].copy_from_slice(&n.to_le_bytes());
                        let r = live.write_at_gen(&data, (b * BLK) as u64);
                        let mut k = known.lock();
                        k.ops += 1;
                        k.in_flight[b] -= 1;
                        match r {
                            Ok(g) => {
                                k.model[b * BLK..(b + 1) * BLK].copy_from_slice(&data);
                                k.gens[b] = g;
                            }
                            Err(_) => {
                                k.failed.insert(b);
                            }
                        }
                        drop(k);
                        std::thread::sleep(Duration::from_micros(300));
                    }
                })
            })
            .collect();
        Guests {
            known,
            stop,
            threads,
        }
    }

    fn ops(&self) -> u64 {
        self.known.lock().ops
    }

    /// Lets the guests do `n` more requests (or 300 ms pass), then stops them.
    fn stop_after(self, n: u64) -> Known {
        let target = self.ops() + n;
        let t0 = Instant::now();
        while self.ops() < target && t0.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().unwrap();
        }
        let k = self.known.lock().clone();
        k
    }
}

/// The cut points of a sweep over a run of `total` ops: `samples` spread over it (and a few
/// past its end), plus every op within `window` of each of `marks`.
fn cut_points(total: u64, samples: u64, marks: &[u64], window: u64) -> Vec<u64> {
    let step = (total / samples).max(1);
    let mut v: Vec<u64> = (0..total + 4).step_by(step as usize).collect();
    for &m in marks.iter().filter(|&&m| m != u64::MAX) {
        v.extend(m.saturating_sub(window)..m + window);
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Checks that the crash image `img` of `kind` holds every flushed guest write for which
/// `want(b)` says so.
fn holds_flushed(
    got: &[u8],
    k: &Known,
    what: &str,
    side: &str,
    want: impl Fn(usize) -> bool,
) -> usize {
    let mut n = 0;
    for b in 0..k.started.len() {
        if k.unsure(b) || !want(b) {
            continue;
        }
        let r = b * BLK..(b + 1) * BLK;
        assert!(
            got[r.clone()] == k.flushed[r.clone()],
            "{what}: {side} lost the flushed guest write of block {b}: got {:02x?} want {:02x?}",
            &got[r.start..r.start + 8],
            &k.flushed[r.start..r.start + 8]
        );
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------
// Convert under guests.

/// A convert of a VHDX source into a new VHD or VHDX while two guest threads write and
/// flush, power cut after `cut_at` ops. Returns what the guests know, whether the pivot was
/// done, and the two files (source, destination).
fn convert_workload(
    runner: &JobRunner,
    dest_kind: Kind,
    src: &(Vec<u8>, Vec<u8>),
    dest_bytes: &[u8],
    cut_at: u64,
    seed: u64,
) -> (Known, bool, Arc<Power>, [Disk0; 2]) {
    let power = Power::new(cut_at);
    let (a, b) = (Disk0::new(&src.0, &power), Disk0::new(dest_bytes, &power));
    let src_dev = open_dev(Kind::Vhdx, a.clone(), false).unwrap();
    let dest_dev = open_dev(dest_kind, b.clone(), false).unwrap();
    let live = LiveDisk::new(src_dev);
    *power.live.lock() = Some(live.clone());
    let guests = Guests::start(&live, src.1.clone(), 2, seed);
    std::thread::sleep(Duration::from_millis(2));
    let r = runner
        .start(&live, Job::convert(dest_dev).options(opts(2)))
        .unwrap()
        .wait_blocking();
    if let Err(e) = &r {
        assert!(cut_error(e), "cut {cut_at}: the job failed otherwise: {e}");
    }
    // The guests go on a little on the destination.
    let k = guests.stop_after(60);
    let pivoted = live.generation() >= 1;
    assert!(r.is_ok() || cut_at != u64::MAX);
    *power.live.lock() = None;
    drop(live);
    (k, pivoted, power, [a, b])
}

fn convert_guest_sweep(dest_kind: Kind, seed: u64) {
    let runner = JobRunner::new().unwrap();
    let src = image(Kind::Vhdx, seed, 24);
    let (dest_bytes, _) = image(dest_kind, 0, 0);
    let (_, pivoted, power, _) =
        convert_workload(&runner, dest_kind, &src, &dest_bytes, u64::MAX, seed);
    assert!(pivoted);
    let total = power.ops.load(Ordering::SeqCst);
    let pivot = power.gen_at[1].load(Ordering::SeqCst);
    let cuts = cut_points(total, 60, &[pivot], 4);
    let (mut after, mut held) = (0, 0);
    for &n in &cuts {
        let (k, pivoted, _, files) =
            convert_workload(&runner, dest_kind, &src, &dest_bytes, n, seed ^ n);
        for s in 0..2u64 {
            let what = format!("convert under guests -> {dest_kind:?} cut {n}/{total} seed {s}");
            let a = reopen(Kind::Vhdx, files[0].f.crash_image(s * 7919 + n), &what);
            let b = reopen(dest_kind, files[1].f.crash_image(s * 7919 + n + 1), &what);
            held += if pivoted {
                holds_flushed(&b, &k, &what, "the destination", |_| true)
            } else {
                holds_flushed(&a, &k, &what, "the source", |_| true)
            };
        }
        after += u64::from(pivoted);
    }
    eprintln!(
        "convert under guests -> {dest_kind:?}: {} cuts over {total} ops (pivot at op {pivot}), \
         {after} after the pivot, {held} flushed blocks checked",
        cuts.len()
    );
    assert!(after > 0 && after < cuts.len() as u64);
    assert!(held > 0);
}

#[test]
fn convert_under_guests_to_vhdx() {
    convert_guest_sweep(Kind::Vhdx, 11);
}

#[test]
fn convert_under_guests_to_vhd() {
    convert_guest_sweep(Kind::Vhd, 12);
}

// ---------------------------------------------------------------------------------------
// Mirror under guests: around the pivot and the switch.

/// A mirror of a VHDX on host A to a new VHDX on host B with `timing`, two guest threads
/// writing and flushing, power cut after `cut_at` ops. Returns what the guests know, the
/// generation the guest had reached, and the two files (A, B).
fn mirror_workload(
    runner: &JobRunner,
    timing: MirrorTiming,
    src: &(Vec<u8>, Vec<u8>),
    dest_bytes: &[u8],
    cut_at: u64,
    seed: u64,
) -> (Known, u64, Arc<Power>, [Disk0; 2]) {
    let power = Power::new(cut_at);
    let (a, b) = (Disk0::new(&src.0, &power), Disk0::new(dest_bytes, &power));
    let a_dev = open_dev(Kind::Vhdx, a.clone(), false).unwrap();
    let b_dev = open_dev(Kind::Vhdx, b.clone(), false).unwrap();
    let live = LiveDisk::new(a_dev);
    *power.live.lock() = Some(live.clone());
    let guests = Guests::start(&live, src.1.clone(), 2, seed);
    std::thread::sleep(Duration::from_millis(2));
    let job = Job::mirror(b_dev).timing(timing).options(JobOptions {
        // Write-through from the start: the pivot comes sooner.
        background_passes: 0,
        ..opts(2)
    });
    let r = runner.start(&live, job).unwrap().wait_blocking();
    if let Err(e) = &r {
        assert!(
            cut_error(e),
            "cut {cut_at}: the mirror failed otherwise: {e} ({e:?})"
        );
    }
    let k = guests.stop_after(60);
    // Where the guest was when the power went: an `after` switch needs no I/O, so it may
    // come after the cut.
    let gen = live.generation().min(power.cut_gen.load(Ordering::SeqCst));
    assert!(r.is_ok() || cut_at != u64::MAX);
    *power.live.lock() = None;
    drop(live);
    (k, gen, power, [a, b])
}

fn mirror_sweep(timing: MirrorTiming, seed: u64) {
    let runner = JobRunner::new().unwrap();
    let src = image(Kind::Vhdx, seed, 24);
    let (dest_bytes, _) = image(Kind::Vhdx, 0, 0);
    // The generation the guest is on B alone: 1 after a `before` pivot, 2 after the end of
    // `after` or `split` (1 is the switch to the straddling device).
    let end = if timing == MirrorTiming::Before { 1 } else { 2 };
    let (_, gen, power, _) = mirror_workload(&runner, timing, &src, &dest_bytes, u64::MAX, seed);
    assert_eq!(gen, end);
    let total = power.ops.load(Ordering::SeqCst);
    let marks = [
        power.gen_at[1].load(Ordering::SeqCst),
        power.gen_at[2].load(Ordering::SeqCst),
    ];
    let cuts = cut_points(total, 40, &marks, 12);
    let mut by_gen = [0u64; 3];
    for &n in &cuts {
        let (k, gen, _, files) = mirror_workload(&runner, timing, &src, &dest_bytes, n, seed ^ n);
        for s in 0..2u64 {
            let what = format!(
                "mirror {} cut {n}/{total} (switch/end at {marks:?}) seed {s}, generation {gen}",
                timing.name()
            );
            let a = reopen(Kind::Vhdx, files[0].f.crash_image(s * 7919 + n), &what);
            let b = reopen(Kind::Vhdx, files[1].f.crash_image(s * 7919 + n + 1), &what);
            if gen == 0 {
                holds_flushed(&a, &k, &what, "host A", |_| true);
            } else if gen >= end {
                holds_flushed(&b, &k, &what, "host B", |_| true);
            } else {
                // Straddling: writes since the switch are on B only; the others on A or B.
                holds_flushed(&b, &k, &what, "host B", |x| k.flushed_gens[x] >= 1);
                for x in 0..k.started.len() {
                    let r = x * BLK..(x + 1) * BLK;
                    if k.unsure(x) || k.flushed_gens[x] >= 1 {
                        continue;
                    }
                    assert!(
                        a[r.clone()] == k.flushed[r.clone()] || b[r.clone()] == k.flushed[r],
                        "{what}: block {x}, flushed before the switch, is on neither host"
                    );
                }
            }
        }
        by_gen[(gen as usize).min(2)] += 1;
    }
    eprintln!(
        "mirror {}: {} cuts over {total} ops (switch/end at ops {marks:?}), per generation {by_gen:?}",
        timing.name(),
        cuts.len()
    );
    // An `after` mirror switches before its first write.
    let first = usize::from(timing == MirrorTiming::After);
    assert!(
        by_gen[first] > 0 && by_gen[1] > 0 && by_gen[end as usize] > 0,
        "{by_gen:?}"
    );
}

#[test]
fn mirror_before_pivot_under_guests() {
    mirror_sweep(MirrorTiming::Before, 21);
}

#[test]
fn mirror_after_switch_under_guests() {
    mirror_sweep(MirrorTiming::After, 22);
}

#[test]
fn mirror_split_under_guests() {
    mirror_sweep(MirrorTiming::Split, 23);
}

// ---------------------------------------------------------------------------------------
// Receive.

/// A 2-layer chain of `kind` in `dir` (base and child) of SIZE bytes; returns its full
/// stream, its stream since the base, what the base and the top read.
fn streams(dir: &Path, kind: Kind, seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let (top, model) = chains::build(dir, kind, 2, SIZE, seed);
    let base = chains::layer_path(dir, kind, 0);
    let disk = chain::Disk::open(&top, &chain::OpenOptions::new().read_only(true)).unwrap();
    let o = SendOptions {
        chunk: 128 << 10,
        ..SendOptions::default()
    };
    let mut full = Vec::new();
    send::send(&disk, &o, &mut full).unwrap();
    let mut inc = Vec::new();
    let since = SendOptions {
        since: Some(base.clone()),
        ..o
    };
    send::send(&disk, &since, &mut inc).unwrap();
    let b = chain::Disk::open(&base, &chain::OpenOptions::new().read_only(true)).unwrap();
    (full, inc, chains::read_all(&b), model)
}

/// Whether a receive failed because the power went.
fn recv_cut(e: &SendError) -> bool {
    matches!(e, SendError::Destination { source, .. } if from_cut(source))
}

fn receive_full_sweep(format: Format, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let kind = if format == Format::Vhd {
        Kind::Vhd
    } else {
        Kind::Vhdx
    };
    let (stream, _, _, model) = streams(dir.path(), kind, seed);
    let ok = Mutex::new(false);
    let (mut checked, mut succeeded) = (0u64, 0u64);
    let total = FaultStorage::sweep_cuts(
        &[],
        |fs| fs,
        |fs| {
            let r = send::receive_new(
                &mut &stream[..],
                fs,
                format,
                Path::new("dest"),
                &ReceiveOptions::default(),
            );
            if let Err(e) = &r {
                assert!(recv_cut(e), "receive {format}: failed otherwise: {e}");
            }
            *ok.lock() = r.is_ok();
        },
        SEEDS,
        |cut, s, img| {
            checked += 1;
            if !*ok.lock() {
                // `receive` would not have renamed its temporary file: DEST does not exist.
                return;
            }
            succeeded += 1;
            let what = format!("receive {format} cut {cut} seed {s}");
            let got = match format {
                Format::Raw => read_all(&RawDisk::new(img).unwrap()),
                Format::Vhd => reopen(Kind::Vhd, img, &what),
                Format::Vhdx => reopen(Kind::Vhdx, img, &what),
            };
            assert!(got == model, "{what}: the received image differs");
        },
    );
    eprintln!("receive {format}: {total} ops, {checked} crash images, {succeeded} after success");
    assert!(total > 3 && succeeded > 0 && succeeded < checked);
}

#[test]
fn receive_full_vhdx_every_cut() {
    receive_full_sweep(Format::Vhdx, 31);
}

#[test]
fn receive_full_vhd_every_cut() {
    receive_full_sweep(Format::Vhd, 32);
}

#[test]
fn receive_full_raw_every_cut() {
    receive_full_sweep(Format::Raw, 33);
}

/// The snapshot `bytes` of `kind` on `s`, opened read-write as a one-layer chain.
fn snapshot_disk<S: Storage + 'static>(kind: Kind, s: S) -> chain::Disk {
    let layer = match kind {
        Kind::Vhdx => {
            let f =
                vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(false))
                    .unwrap();
            let d = f.details();
            Layer {
                path: "dest.vhdx".into(),
                format: Format::Vhdx,
                dev: Arc::new(f),
                identity: Identity::Vhdx {
                    data_write_guid: d.data_write_guid,
                    disk_id: d.disk_id,
                },
                parent: None,
            }
        }
        Kind::Vhd => {
            let f = vhd_format::VhdFile::open(s, &vhd_format::OpenOptions::new().read_only(false))
                .unwrap();
            let d = f.details();
            Layer {
                path: "dest.vhd".into(),
                format: Format::Vhd,
                dev: Arc::new(f),
                identity: Identity::Vhd {
                    unique_id: d.unique_id,
                    timestamp: d.timestamp,
                },
                parent: None,
            }
        }
    };
    chain::Disk::from_layers(vec![layer], false).unwrap()
}

/// The name of the snapshot's file in `snapshot_disk`.
fn snapshot_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Vhdx => "dest.vhdx",
        Kind::Vhd => "dest.vhd",
    }
}

/// Whether a receive failed because the power went while the journal was applied.
fn apply_cut(e: &SendError) -> bool {
    matches!(e, SendError::Interrupted { source, .. } if recv_cut(source))
}

fn receive_incremental_sweep(kind: Kind, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (_, stream, before, after) = streams(dir.path(), kind, seed);
    assert!(before != after);
    let snapshot = std::fs::read(chains::layer_path(dir.path(), kind, 0)).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let journal = send::journal_path(&spool.path().join(snapshot_name(kind)));
    let ok = Mutex::new(false);
    let (mut checked, mut succeeded) = (0u64, 0u64);
    let total = FaultStorage::sweep_cuts(
        &snapshot,
        |fs| snapshot_disk(kind, fs),
        |disk| {
            // The last cut's journal (the checks finish copies of it).
            let _ = std::fs::remove_file(&journal);
            let r = send::receive_into(
                &mut &stream[..],
                &disk,
                spool.path(),
                &ReceiveOptions::default(),
            );
            if let Err(e) = &r {
                assert!(apply_cut(e), "incremental {kind:?}: failed otherwise: {e}");
            }
            assert_eq!(
                journal.exists(),
                r.is_err(),
                "the journal is kept on failure only"
            );
            *ok.lock() = r.is_ok();
        },
        SEEDS,
        |cut, s, img| {
            let what = format!("incremental receive into {kind:?} cut {cut} seed {s}");
            let bytes = img.to_vec().unwrap();
            let got = reopen(kind, MemStorage::from_bytes(&bytes), &what);
            checked += 1;
            if *ok.lock() {
                assert!(got == after, "{what}: receive succeeded but DEST differs");
                succeeded += 1;
                return;
            }
            each_sector_either(&got, &before, &after, &what);
            // Finish the journal (a copy: every seed of this cut needs it).
            let jdir = tempfile::tempdir().unwrap();
            std::fs::copy(
                &journal,
                send::journal_path(&jdir.path().join(snapshot_name(kind))),
            )
            .unwrap();
            let mem = Arc::new(MemStorage::from_bytes(&bytes));
            let disk = snapshot_disk(kind, mem.clone());
            let o = ReceiveOptions::default();
            if s % 2 == 0 {
                let r = send::resume_into(&disk, jdir.path(), &o)
                    .unwrap_or_else(|e| panic!("{what}: resume: {e}"))
                    .unwrap_or_else(|| panic!("{what}: no journal"));
                assert!(r.records > 0 && r.header.base.is_some(), "{what}: {r:?}");
            } else {
                let r = send::receive_into(&mut &stream[..], &disk, jdir.path(), &o)
                    .unwrap_or_else(|e| panic!("{what}: receive after the cut: {e}"));
                assert!(r.resumed.is_some() && r.already_applied, "{what}: {r:?}");
            }
            drop(disk);
            assert_eq!(std::fs::read_dir(jdir.path()).unwrap().count(), 0, "{what}");
            let mem = Arc::into_inner(mem).unwrap();
            let got = reopen(kind, mem, &format!("{what}, resumed"));
            assert!(got == after, "{what}: DEST differs after the resume");
        },
    );
    // No spool file is left, whatever happened; the last run (no cut) left no journal.
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
    eprintln!(
        "incremental receive into {kind:?}: {total} ops, {checked} crash images, \
         {succeeded} after success"
    );
    assert!(total > 3 && succeeded > 0 && succeeded < checked);
}

#[test]
fn receive_incremental_vhdx_every_cut() {
    receive_incremental_sweep(Kind::Vhdx, 41);
}

#[test]
fn receive_incremental_vhd_every_cut() {
    receive_incremental_sweep(Kind::Vhd, 42);
}

/// A reader that ends (with an error or early) after `limit` bytes.
struct Cut<'a> {
    data: &'a [u8],
    at: usize,
    limit: usize,
    error: bool,
}

impl std::io::Read for Cut<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let end = self.limit.min(self.data.len());
        if self.at >= end {
            return if self.error {
                Err(std::io::Error::other("the sender died"))
            } else {
                Ok(0)
            };
        }
        let n = buf.len().min(end - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// `receive` of a full stream cut short (the sender died, or the pipe closed) at 24
/// sampled bytes, on real files: it fails, DEST does not exist and no temporary file is
/// left; the whole stream then makes DEST, reading as the disk sent.
#[test]
fn a_failed_full_receive_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let (stream, _, _, model) = streams(dir.path(), Kind::Vhdx, 51);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("dest.vhdx");
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    for i in 0..24 {
        let limit = if i == 0 {
            stream.len() - 1
        } else {
            rng.random_range(0..stream.len())
        };
        let mut input = Cut {
            data: &stream,
            at: 0,
            limit,
            error: i % 2 == 0,
        };
        let r = send::receive(&mut input, &dest, &ReceiveOptions::default());
        assert!(r.is_err(), "cut at byte {limit} accepted");
        assert_eq!(
            std::fs::read_dir(out.path()).unwrap().count(),
            0,
            "cut at byte {limit}: a file is left"
        );
    }
    send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap();
    let got = chains::read_all(
        &chain::Disk::open(&dest, &chain::OpenOptions::new().read_only(true)).unwrap(),
    );
    assert!(got == model);
}

/// An incremental receive that stops before its journal exists writes nothing to the
/// snapshot: the stream cut short at sampled bytes (the sender died, or a kill while it
/// was spooled) fails with the snapshot's storage not written once and no file left; a
/// spool that a kill left under its temporary name is not taken for a journal; the whole
/// stream then applies as usual and the snapshot reads exactly the disk sent.
#[test]
fn an_incremental_receive_stopped_before_its_journal_leaves_dest_as_it_was() {
    for kind in [Kind::Vhdx, Kind::Vhd] {
        let dir = tempfile::tempdir().unwrap();
        let (_, stream, before, after) = streams(dir.path(), kind, 61);
        let snapshot = std::fs::read(chains::layer_path(dir.path(), kind, 0)).unwrap();
        let fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(&snapshot)));
        let disk = snapshot_disk(kind, fs.clone());
        let ops0 = fs.ops();
        let spool = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(61);
        for i in 0..16 {
            let limit = if i == 0 {
                stream.len() - 1
            } else {
                rng.random_range(0..stream.len())
            };
            let mut input = Cut {
                data: &stream,
                at: 0,
                limit,
                error: i % 2 == 0,
            };
            let r = send::receive_into(&mut input, &disk, spool.path(), &ReceiveOptions::default());
            assert!(r.is_err(), "{kind:?}: cut at byte {limit} accepted");
            assert_eq!(fs.ops(), ops0, "{kind:?}: cut at byte {limit} wrote DEST");
            assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
        }
        assert!(chains::read_all(&disk) == before);
        // A kill after the spool was synced, before its rename to the journal.
        let stale = spool
            .path()
            .join(format!(".{}.vdisk-spool-4194303-0", snapshot_name(kind)));
        std::fs::write(&stale, &stream).unwrap();
        let r = send::receive_into(
            &mut &stream[..],
            &disk,
            spool.path(),
            &ReceiveOptions::default(),
        )
        .unwrap();
        assert!(r.resumed.is_none() && !r.already_applied);
        assert!(chains::read_all(&disk) == after, "{kind:?}");
        drop(disk);
        let got = reopen(
            kind,
            fs.crash_image(0),
            &format!("{kind:?} after the receive"),
        );
        assert!(got == after, "{kind:?}: the flushed image differs");
    }
}
