//! Guest threads doing random I/O through a `LiveDisk` against a byte model, for the job
//! tests. Each thread owns the 4 KiB blocks `b` with `b % threads == t`, so the threads'
//! requests interleave across every job chunk while each block's history stays sequential
//! (and the model exact). Every write records the generation it landed in, so the model
//! knows the disk both now and at the pivot.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use block_io::{BlockDevice, FileStorage, MemStorage, RawDisk, Storage};
use meta_ops::LiveDisk;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const BLK: u64 = 4096;

/// The disk now, and as the pivot saw it.
#[derive(Debug, Clone)]
pub struct Model {
    pub cur: Vec<u8>,
    pub at_pivot: Vec<u8>,
    /// Changes that land in this generation or earlier are in the pivot's image.
    pub pivot_gen: u64,
}

impl Model {
    pub fn new(initial: Vec<u8>, pivot_gen: u64) -> Self {
        Model {
            at_pivot: initial.clone(),
            cur: initial,
            pivot_gen,
        }
    }

    fn apply(&mut self, at: usize, data: Option<&[u8]>, len: usize, gen: u64) {
        let put = |v: &mut Vec<u8>| match data {
            Some(d) => v[at..at + len].copy_from_slice(d),
            None => v[at..at + len].fill(0),
        };
        put(&mut self.cur);
        if gen <= self.pivot_gen {
            put(&mut self.at_pivot);
        }
    }
}

/// Counts of what the guests did.
#[derive(Debug, Default)]
pub struct Counts {
    pub ops: AtomicU64,
    pub mismatches: AtomicU64,
    pub errors: AtomicU64,
}

pub struct Guests {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub model: Arc<Mutex<Model>>,
    pub counts: Arc<Counts>,
}

/// Starts `n` guest threads on `live`. `discard_zeroes`: a discard reads back as zeros (a
/// base image); otherwise the threads use `write_zeroes(unmap)` in its place.
pub fn start(
    live: &Arc<LiveDisk>,
    model: Model,
    n: u64,
    seed: u64,
    discard_zeroes: bool,
) -> Guests {
    let stop = Arc::new(AtomicBool::new(false));
    let model = Arc::new(Mutex::new(model));
    let counts = Arc::new(Counts::default());
    let size = live.info().virtual_size;
    let blocks = size / BLK;
    let threads = (0..n)
        .map(|t| {
            let (live, stop, model, counts) =
                (live.clone(), stop.clone(), model.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(t));
                let mut buf = vec![0u8; BLK as usize];
                while !stop.load(Ordering::Acquire) {
                    let b = t + n * rng.random_range(0..blocks.div_ceil(n));
                    if b >= blocks {
                        continue;
                    }
                    guest_op(
                        &live,
                        &model,
                        &counts,
                        &mut rng,
                        &mut buf,
                        b,
                        discard_zeroes,
                    );
                    counts.ops.fetch_add(1, Ordering::Relaxed);
                    if rng.random_range(0..8) == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    Guests {
        stop,
        threads,
        model,
        counts,
    }
}

fn guest_op(
    live: &LiveDisk,
    model: &Mutex<Model>,
    counts: &Counts,
    rng: &mut ChaCha8Rng,
    buf: &mut [u8],
    b: u64,
    discard_zeroes: bool,
) {
    // A piece of the block: whole, or some 512-byte sectors of it.
    let (s0, ns) = if rng.random_bool(0.5) {
        (0u64, 8u64)
    } else {
        let s0 = rng.random_range(0..8);
        (s0, rng.random_range(1..=8 - s0))
    };
    let off = b * BLK + s0 * 512;
    let len = (ns * 512) as usize;
    let at = off as usize;
    match rng.random_range(0..100) {
        0..45 => {
            let data: Vec<u8> = {
                let k: u8 = rng.random();
                (0..len)
                    .map(|i| k ^ (i as u8).wrapping_mul(31) ^ (b as u8))
                    .collect()
            };
            match live.write_at_gen(&data, off) {
                Ok(g) => model.lock().apply(at, Some(&data), len, g),
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        45..80 => {
            let piece = &mut buf[..len];
            match live.read_at(piece, off) {
                Ok(()) => {
                    if model.lock().cur[at..at + len] != *piece {
                        counts.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        80..90 => {
            // Whole blocks only: a discard of part of a block may leave its data.
            let r = if discard_zeroes {
                live.discard_gen(b * BLK, BLK)
            } else {
                live.write_zeroes_gen(b * BLK, BLK, true)
            };
            match r {
                Ok(g) => model
                    .lock()
                    .apply((b * BLK) as usize, None, BLK as usize, g),
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        90..95 => match live.write_zeroes_gen(off, len as u64, rng.random_bool(0.5)) {
            Ok(g) => model.lock().apply(at, None, len, g),
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        },
        _ => {
            if live.flush().is_err() {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Guests {
    /// Lets the guests run until they did `more` further operations.
    pub fn run_for_ops(&self, more: u64) {
        let target = self.counts.ops.load(Ordering::Acquire) + more;
        while self.counts.ops.load(Ordering::Acquire) < target {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the threads; returns the model.
    pub fn stop(self) -> (Model, Arc<Counts>) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().unwrap();
        }
        let m = self.model.lock().clone();
        (m, self.counts)
    }
}

/// Number of 4 KiB blocks of `dev` (from `offset`) that differ from `expect`.
pub fn mismatches(dev: &dyn BlockDevice, offset: u64, expect: &[u8]) -> usize {
    let mut got = vec![0u8; expect.len()];
    dev.read_at(&mut got, offset).unwrap();
    got.chunks(BLK as usize)
        .zip(expect.chunks(BLK as usize))
        .filter(|(a, b)| a != b)
        .count()
}

/// Initial contents: data in about half of the 64 KiB regions, holes elsewhere.
pub fn initial(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut v = vec![0u8; size as usize];
    for r in v.chunks_mut(64 << 10) {
        if rng.random_bool(0.5) {
            let k: u8 = rng.random_range(1..=255);
            let len = rng.random_range(1..=r.len() / 512) * 512;
            for (i, x) in r[..len].iter_mut().enumerate() {
                *x = k.wrapping_add((i / 512) as u8) | 1;
            }
        }
    }
    v
}

/// Writes the non-zero 4 KiB blocks of `data` to `dev` (so zeros stay holes).
pub fn fill(dev: &dyn BlockDevice, data: &[u8]) {
    for (i, c) in data.chunks(BLK as usize).enumerate() {
        if c.iter().any(|&x| x != 0) {
            dev.write_at(c, i as u64 * BLK).unwrap();
        }
    }
    dev.flush().unwrap();
}

/// A raw disk in memory holding `data`'s non-zero blocks.
pub fn mem_disk(data: &[u8]) -> Arc<RawDisk<MemStorage>> {
    let s = MemStorage::new();
    s.set_len(data.len() as u64).unwrap();
    let d = Arc::new(RawDisk::new(s).unwrap());
    fill(&*d, data);
    d
}

/// A raw disk in memory of `size` full of junk (a destination that is not zeroed).
pub fn junk_disk(size: u64) -> Arc<RawDisk<MemStorage>> {
    let s = MemStorage::from_bytes(&vec![0xA5; size as usize]);
    Arc::new(RawDisk::new(s).unwrap())
}

/// A sparse raw file of `size` at `path`.
pub fn raw_file(path: &Path, size: u64) -> Arc<RawDisk<FileStorage>> {
    let s = FileStorage::create(path).unwrap();
    s.set_len(size).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}
