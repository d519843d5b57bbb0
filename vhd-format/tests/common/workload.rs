//! A multi-writer workload with an exact model, for the concurrency and concurrent-crash
//! tests.
//!
//! Last-writer-wins is not decidable for overlapping concurrent writes, so every sector has
//! one owning thread, and threads share blocks at a finer grain: in a *shared* block, chunk
//! `c` of block `b` belongs to thread `(b + c) % threads` (neighbouring chunks have different
//! owners, so neighbouring writers allocate and update the same block at once); every fourth
//! block is a *solo* block owned whole by one thread, which writes it whole or in part. Each
//! thread's model of its own sectors is then exact, and so is the merged model.
//!
//! For crash runs each thread logs its writes with a completion stamp and its flushes with a
//! start stamp from one global clock: a write that completed before a successful flush
//! started must survive a power cut.

use std::sync::atomic::{AtomicU64, Ordering};

use block_io::{BlockDevice, Mapping, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vhd_format::VhdFile;

use super::pattern;

/// How the disk is shared out.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub size: u64,
    /// Block size in bytes.
    pub block: u64,
    /// Chunk size in sectors (shared blocks are shared out by chunk).
    pub chunk: u64,
    pub threads: usize,
    /// Writes prefer the first `hot` blocks (so that threads meet in the same blocks).
    pub hot: u64,
}

impl Geometry {
    pub fn sectors(&self) -> u64 {
        self.size / 512
    }

    fn spb(&self) -> u64 {
        self.block / 512
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block)
    }

    fn solo(b: u64) -> bool {
        b % 4 == 3
    }

    /// The thread owning sector `s`.
    pub fn owner(&self, s: u64) -> usize {
        let b = s / self.spb();
        if Self::solo(b) {
            (b / 4) as usize % self.threads
        } else {
            ((b + (s % self.spb()) / self.chunk) as usize) % self.threads
        }
    }

    /// Sector ranges `[start, end)` thread `t` owns, one per solo block or chunk, inside
    /// block `b`.
    fn regions_in(&self, t: usize, b: u64) -> Vec<(u64, u64)> {
        let first = b * self.spb();
        let last = ((b + 1) * self.spb()).min(self.sectors());
        if Self::solo(b) {
            return if self.owner(first) == t {
                vec![(first, last)]
            } else {
                vec![]
            };
        }
        (first..last)
            .step_by(self.chunk as usize)
            .filter(|&s| self.owner(s) == t)
            .map(|s| (s, (s + self.chunk).min(last)))
            .collect()
    }

    /// A random piece of a region of thread `t`: often a whole region, else a sub-range.
    fn pick(&self, rng: &mut ChaCha8Rng, t: usize) -> (u64, u64) {
        loop {
            let b = if rng.random_bool(0.7) {
                rng.random_range(0..self.hot.min(self.blocks()))
            } else {
                rng.random_range(0..self.blocks())
            };
            let regions = self.regions_in(t, b);
            if regions.is_empty() {
                continue;
            }
            let (a, e) = regions[rng.random_range(0..regions.len())];
            if rng.random_bool(0.3) {
                return (a, e - a);
            }
            let s = rng.random_range(a..e);
            return (s, rng.random_range(1..=e - s));
        }
    }
}

/// One operation of a thread.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write `n` sectors at sector `s` with `pattern(tag)`; `mapped` writes through
    /// `BlockDevice::map` where it maps (as the I/O engine does).
    Write {
        s: u64,
        n: u64,
        tag: u64,
        mapped: bool,
    },
    /// Read and check `n` of the thread's own sectors at `s` (through `map` when `mapped`).
    Read {
        s: u64,
        n: u64,
        mapped: bool,
    },
    Flush,
}

/// The fixed op list of thread `t` for `seed`.
pub fn thread_ops(geo: &Geometry, seed: u64, t: usize, count: usize) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + t as u64);
    (0..count)
        .map(|i| {
            let r = rng.random_range(0..20);
            if r < 2 {
                Op::Flush
            } else if r < 6 {
                let (s, n) = geo.pick(&mut rng, t);
                Op::Read {
                    s,
                    n,
                    mapped: rng.random_bool(0.5),
                }
            } else {
                let (s, n) = geo.pick(&mut rng, t);
                Op::Write {
                    s,
                    n,
                    tag: (seed << 32) | ((t as u64) << 20) | i as u64,
                    mapped: rng.random_bool(0.5),
                }
            }
        })
        .collect()
}

/// What one thread did.
#[derive(Debug, Default)]
pub struct Log {
    /// `(sector, count, tag, completion stamp)`: the stamp is `None` for a write that failed
    /// (it may have partly landed).
    pub writes: Vec<(u64, u64, u64, Option<u64>)>,
    /// Start stamps of flushes that succeeded.
    pub flushes: Vec<u64>,
    /// Reads checked against the thread's model.
    pub reads: u64,
    /// Writes and reads that went through `map`.
    pub mapped: u64,
    /// The first error, which ended the thread.
    pub error: Option<String>,
}

/// Reads through `map` where the whole range maps (`None` when it does not).
fn mapped_read<S: Storage>(dev: &VhdFile<S>, buf: &mut [u8], off: u64) -> Option<()> {
    let mut out = Vec::new();
    if !dev.map(off, buf.len() as u64, false, &mut out).ok()? {
        return None;
    }
    let mut pos = 0usize;
    for m in out {
        let len = m.len() as usize;
        match m {
            Mapping::File { file_offset, .. } => {
                dev.storage()
                    .read_at(&mut buf[pos..pos + len], file_offset)
                    .ok()?;
            }
            // A lone layer: the parent's part reads as zeros here, as `read_at` gives it.
            Mapping::Zero { .. } | Mapping::Parent { .. } => buf[pos..pos + len].fill(0),
        }
        pos += len;
    }
    Some(())
}

/// Writes through `map` where the whole range maps; `None` when it does not (the caller
/// then uses `write_at`), `Some(Err)` when the mapped write failed.
fn mapped_write<S: Storage>(
    dev: &VhdFile<S>,
    data: &[u8],
    off: u64,
) -> Option<block_io::Result<()>> {
    let mut out = Vec::new();
    match dev.map(off, data.len() as u64, true, &mut out) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => return Some(Err(e)),
    }
    let mut pos = 0usize;
    for m in out {
        let len = m.len() as usize;
        let Mapping::File { file_offset, .. } = m else {
            panic!("a write mapping holds {m:?}");
        };
        if let Err(e) = dev.storage().write_at(&data[pos..pos + len], file_offset) {
            dev.mapped_write_failed(&e);
            return Some(Err(e));
        }
        pos += len;
    }
    Some(Ok(()))
}

/// Runs thread `t`'s `ops` until the first error, checking every read of its own sectors
/// against its model (exact: no other thread writes them). Panics on a mismatch.
pub fn run_thread<S: Storage>(
    dev: &VhdFile<S>,
    geo: &Geometry,
    t: usize,
    ops: &[Op],
    clock: &AtomicU64,
) -> Log {
    let mut model = vec![0u8; geo.size as usize];
    let mut log = Log::default();
    for op in ops {
        match *op {
            Op::Write { s, n, tag, mapped } => {
                let data = pattern(tag, (n * 512) as usize);
                let r = match mapped.then(|| mapped_write(dev, &data, s * 512)).flatten() {
                    Some(r) => {
                        log.mapped += 1;
                        r
                    }
                    None => dev.write_at(&data, s * 512),
                };
                if let Err(e) = r {
                    log.writes.push((s, n, tag, None));
                    log.error = Some(e.to_string());
                    break;
                }
                let done = clock.fetch_add(1, Ordering::SeqCst);
                log.writes.push((s, n, tag, Some(done)));
                model[(s * 512) as usize..((s + n) * 512) as usize].copy_from_slice(&data);
            }
            Op::Read { s, n, mapped } => {
                let mut buf = vec![0u8; (n * 512) as usize];
                let via_map = mapped && mapped_read(dev, &mut buf, s * 512).is_some();
                if via_map {
                    log.mapped += 1;
                } else if let Err(e) = dev.read_at(&mut buf, s * 512) {
                    log.error = Some(e.to_string());
                    break;
                }
                let want = &model[(s * 512) as usize..((s + n) * 512) as usize];
                if let Some(i) = (0..n as usize)
                    .find(|&i| buf[i * 512..(i + 1) * 512] != want[i * 512..(i + 1) * 512])
                {
                    panic!(
                        "thread {t}: sector {} reads other data than it wrote (map: {via_map})",
                        s + i as u64
                    );
                }
                log.reads += 1;
            }
            Op::Flush => {
                let start = clock.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = dev.flush() {
                    log.error = Some(e.to_string());
                    break;
                }
                log.flushes.push(start);
            }
        }
    }
    log
}

/// The exact final contents after every thread finished without error.
pub fn merged_model(geo: &Geometry, logs: &[Log]) -> Vec<u8> {
    let mut model = vec![0u8; geo.size as usize];
    for log in logs {
        for &(s, n, tag, _) in &log.writes {
            let data = pattern(tag, (n * 512) as usize);
            model[(s * 512) as usize..((s + n) * 512) as usize].copy_from_slice(&data);
        }
    }
    model
}

/// Per sector, what it may hold after a power cut: `[0]` is the value of the last write that
/// completed before a successful flush started (or zeros), then every later write to it
/// (whose fate is unknown). Each sector has one writer, so its writes are in program order.
pub type Cands = Vec<Vec<[u8; 512]>>;

/// `initial` is what the sectors held before the run (for a differencing layer, what its
/// parent supplies: see [`parent_sector`]).
pub fn crash_candidates(geo: &Geometry, logs: &[Log], initial: impl Fn(u64) -> [u8; 512]) -> Cands {
    let last_flush = logs.iter().flat_map(|l| l.flushes.iter().copied()).max();
    let mut cands: Cands = (0..geo.sectors()).map(|s| vec![initial(s)]).collect();
    for log in logs {
        for &(s, n, tag, done) in &log.writes {
            let must = matches!((done, last_flush), (Some(d), Some(f)) if d < f);
            let data = pattern(tag, (n * 512) as usize);
            for i in 0..n as usize {
                let mut v = [0u8; 512];
                v.copy_from_slice(&data[i * 512..(i + 1) * 512]);
                let c = &mut cands[s as usize + i];
                if must {
                    *c = vec![v];
                } else {
                    c.push(v);
                }
            }
        }
    }
    cands
}

/// What an imagined parent holds at sector `s`: a differencing layer checked on its own reads
/// sectors its bitmap marks absent as this (as a chain would), so that a bit set over data
/// that never became durable shows (the block's zeros instead of the parent's data).
pub fn parent_sector(s: u64) -> [u8; 512] {
    // Computed once (the pattern is slow in debug builds): a 4 MiB parent, repeated.
    static PARENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let p = PARENT.get_or_init(|| pattern(0xFEED, 4 << 20));
    let at = ((s % (8 << 10)) * 512) as usize;
    let mut v = [0u8; 512];
    v.copy_from_slice(&p[at..at + 512]);
    v
}

/// Reads the whole layer as a chain over a parent of [`parent_sector`]s would (with
/// `diff`), or as it is.
pub fn read_composed<S: Storage>(dev: &VhdFile<S>, size: u64, diff: bool) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    dev.read_at(&mut buf, 0).unwrap();
    if diff {
        let mut off = 0;
        while off < size {
            let run = dev.block_status(off, size - off).unwrap();
            if run.status == block_io::BlockStatus::Unallocated {
                for s in off / 512..(off + run.len) / 512 {
                    buf[(s * 512) as usize..(s * 512 + 512) as usize]
                        .copy_from_slice(&parent_sector(s));
                }
            }
            off += run.len;
        }
    }
    buf
}
