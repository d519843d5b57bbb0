//! A measurement, not a check (ignored by default): N threads allocating blocks of a dynamic
//! VHDX on a real file at once, with flushes, timed; fdatasyncs counted with a wrapper
//! storage. Run with
//! `cargo test -p vhdx-format --release --test alloc_bench -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, FileStorage, OpenOptions, Result, Storage};
use vhdx_format::{CreateOptions, VhdxFile};

/// A file that counts its fdatasyncs and the time spent in them; `delay` is added to each
/// (a disk whose cache flush is slower than this VM's).
#[derive(Debug)]
struct Counting {
    inner: FileStorage,
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    delay: Duration,
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.sync_data();
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

const THREADS: u64 = 8;
const BLOCKS_PER_THREAD: u64 = 32;
const WRITE: usize = 64 << 10;

struct Figures {
    wall: Duration,
    syncs: u64,
    sync_time: Duration,
    max_write: Duration,
    max_read: Duration,
}

/// `flush_every`: each writer flushes after every `flush_every` allocating writes (0: only
/// one flush at the end). A reader thread rereads an allocated block all along.
fn run(flush_every: u64, delay: Duration) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.vhdx");
    let mut o = CreateOptions::dynamic(THREADS * BLOCKS_PER_THREAD * (1 << 20) + (1 << 20));
    o.block_size = Some(1 << 20);
    drop(vhdx_format::create_file(&path, &o).unwrap());
    let st = Counting {
        inner: FileStorage::open(&path, &OpenOptions::new()).unwrap(),
        syncs: AtomicU64::new(0),
        sync_nanos: AtomicU64::new(0),
        delay,
    };
    let dev =
        Arc::new(VhdxFile::open(st, &vhdx_format::OpenOptions::new().read_only(false)).unwrap());
    // The last block is allocated before the run: the reader reads it, a writer overwrites it.
    let last = THREADS * BLOCKS_PER_THREAD;
    dev.write_at(&[1u8; WRITE], last << 20).unwrap();
    dev.flush().unwrap();
    let s0 = dev.storage().syncs.load(Ordering::Relaxed);
    let n0 = dev.storage().sync_nanos.load(Ordering::Relaxed);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut max = Duration::ZERO;
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                dev.read_at(&mut buf, last << 20).unwrap();
                dev.write_at(&buf, (last << 20) + 8192).unwrap();
                max = max.max(t.elapsed());
                std::thread::sleep(Duration::from_micros(200));
            }
            max
        })
    };
    let t0 = Instant::now();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let data = vec![t as u8 + 1; WRITE];
                let mut max = Duration::ZERO;
                for i in 0..BLOCKS_PER_THREAD {
                    // Neighbouring threads take neighbouring blocks.
                    let block = i * THREADS + t;
                    let w = Instant::now();
                    dev.write_at(&data, block << 20).unwrap();
                    max = max.max(w.elapsed());
                    if flush_every != 0 && i % flush_every == flush_every - 1 {
                        dev.flush().unwrap();
                    }
                }
                max
            })
        })
        .collect();
    let max_write = writers
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap();
    dev.flush().unwrap();
    let wall = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let max_read = reader.join().unwrap();
    let syncs = dev.storage().syncs.load(Ordering::Relaxed) - s0;
    let sync_time = Duration::from_nanos(dev.storage().sync_nanos.load(Ordering::Relaxed) - n0);
    let mut buf = vec![0u8; WRITE];
    for b in 0..last {
        dev.read_at(&mut buf, b << 20).unwrap();
        assert!(buf.iter().all(|&x| x == (b % THREADS) as u8 + 1));
    }
    dev.close().unwrap();
    Figures {
        wall,
        syncs,
        sync_time,
        max_write,
        max_read,
    }
}

#[test]
#[ignore = "a measurement: run by hand with --ignored --nocapture"]
fn concurrent_allocation_figures() {
    let rounds = 5;
    for delay_ms in [0, 2] {
        for flush_every in [1, 4, 0] {
            let mut runs: Vec<Figures> = (0..rounds)
                .map(|_| run(flush_every, Duration::from_millis(delay_ms)))
                .collect();
            let med = |v: &mut Vec<Duration>| {
                v.sort();
                v[v.len() / 2]
            };
            let mut wall: Vec<Duration> = runs.iter().map(|f| f.wall).collect();
            let mut syncs: Vec<u64> = runs.iter().map(|f| f.syncs).collect();
            syncs.sort();
            let mut st: Vec<Duration> = runs.iter().map(|f| f.sync_time).collect();
            let mut mw: Vec<Duration> = runs.iter().map(|f| f.max_write).collect();
            let mut mr: Vec<Duration> = runs.iter().map(|f| f.max_read).collect();
            println!(
                "threads {THREADS} allocations {} flush_every {flush_every} extra sync delay \
                 {delay_ms} ms, median of {rounds}: wall {:.1?}, fdatasyncs {}, time in \
                 fdatasync {:.1?}, slowest allocating write {:.1?}, slowest read+overwrite \
                 of an allocated block {:.1?}",
                THREADS * BLOCKS_PER_THREAD,
                med(&mut wall),
                syncs[syncs.len() / 2],
                med(&mut st),
                med(&mut mw),
                med(&mut mr),
            );
            runs.clear();
        }
    }
}
