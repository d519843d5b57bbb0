//! `engine::AsyncDisk` from tokio: many tasks with requests in flight against a model, on raw
//! disks over files (the engine path, buffered and `O_DIRECT`) and over memory (the fallback
//! path), on io_uring and on threads; flushes while I/O goes on, errors as values, closing, and
//! dropping the disk with requests in flight.
#![cfg(feature = "async")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use block_io::engine::{Aio, AsyncDisk, AsyncOptions, Engine, IoBuf};
use block_io::{
    BlockDevice, BlockStatus, ErrorKind, FaultStorage, FileStorage, Injection, MemStorage,
    OpenOptions, RawDisk, RawOptions, Storage,
};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;
/// Each task owns every TASKS-th slot of this size, so tasks never overlap.
const SLOT: u64 = 64 << 10;
const TASKS: u64 = 16;

/// The engines this machine has (io_uring may be refused by a sandbox: then threads only,
/// said loudly).
fn engines() -> Vec<Aio> {
    let mut v = vec![Aio::Threads];
    match Engine::new(Aio::IoUring, 4) {
        Ok(_) => v.push(Aio::IoUring),
        Err(e) => eprintln!("!!! io_uring unavailable here ({e}); testing threads only !!!"),
    }
    v
}

fn serve(dev: Arc<dyn BlockDevice>, aio: Aio) -> AsyncDisk {
    let disk = AsyncDisk::with_options(dev, &AsyncOptions::new().aio(aio).depth(32)).unwrap();
    assert_eq!(disk.aio(), aio);
    disk
}

fn file_disk(dir: &tempfile::TempDir, name: &str) -> Arc<dyn BlockDevice> {
    let s = FileStorage::create(dir.path().join(name)).unwrap();
    s.set_len(SIZE).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}

fn mem_disk() -> Arc<dyn BlockDevice> {
    let s = MemStorage::new();
    s.set_len(SIZE).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}

/// An `O_DIRECT` raw disk, or `None` where the file system refuses `O_DIRECT`.
fn direct_disk(dir: &tempfile::TempDir, name: &str) -> Option<Arc<dyn BlockDevice>> {
    let opts = OpenOptions::new().create(true).truncate(true).direct(true);
    match FileStorage::open(dir.path().join(name), &opts) {
        Ok(s) => {
            s.set_len(SIZE).unwrap();
            Some(Arc::new(RawDisk::new(s).unwrap()))
        }
        Err(e) => {
            eprintln!("!!! O_DIRECT unavailable here ({e}); skipping the O_DIRECT case !!!");
            None
        }
    }
}

/// A buffer of `data`: a plain `Vec`, or one aligned for `O_DIRECT`.
enum Buf {
    Plain(Vec<u8>),
    Aligned(block_io::AlignedBuf),
}

/// `TASKS` tasks, each with several requests in flight at once, write random data at random
/// sector-aligned places of their own slots and read random ranges back, checking every
/// read against a model; one more task flushes meanwhile. Then the whole disk is read back,
/// asynchronously and through the device's own synchronous read.
async fn model_run(disk: AsyncDisk, seed: u64) {
    let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (disk, model) = (disk.clone(), model.clone());
        tasks.spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed * 1000 + t);
            let slots = SIZE / SLOT / TASKS;
            for _round in 0..12 {
                // Four requests in flight from this task alone, on distinct slots.
                let mut picks: Vec<u64> = Vec::new();
                while picks.len() < 4 {
                    let s = rng.random_range(0..slots);
                    if !picks.contains(&s) {
                        picks.push(s);
                    }
                }
                let mut reqs = Vec::new();
                for s in picks {
                    let base = (s * TASKS + t) * SLOT;
                    let sectors = SLOT / 512;
                    let first = rng.random_range(0..sectors);
                    let n = rng.random_range(1..=(sectors - first).min(32));
                    let (off, len) = (base + first * 512, (n * 512) as usize);
                    let write = rng.random_bool(0.5);
                    let buf = if rng.random_bool(0.5) {
                        Buf::Plain(vec![0u8; len])
                    } else {
                        Buf::Aligned(disk.alloc(len))
                    };
                    let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    let disk = disk.clone();
                    let model = model.clone();
                    reqs.push(async move {
                        let range = off as usize..off as usize + len;
                        if write {
                            let got: Vec<u8> = match buf {
                                Buf::Plain(mut b) => {
                                    b.copy_from_slice(&data);
                                    disk.write_at(b, off).await.unwrap()
                                }
                                Buf::Aligned(mut b) => {
                                    b.copy_from_slice(&data);
                                    disk.write_at(b, off).await.unwrap().to_vec()
                                }
                            };
                            assert_eq!(got, data, "write hands the buffer back unchanged");
                            model.lock()[range].copy_from_slice(&data);
                        } else {
                            let got: Vec<u8> = match buf {
                                Buf::Plain(b) => disk.read_at(b, off).await.unwrap(),
                                Buf::Aligned(b) => disk.read_at(b, off).await.unwrap().to_vec(),
                            };
                            assert!(
                                got == model.lock()[range],
                                "read of {len} bytes at {off} differs from the model"
                            );
                        }
                    });
                }
                let mut set = tokio::task::JoinSet::new();
                for r in reqs {
                    set.spawn(r);
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
            }
        });
    }
    {
        let disk = disk.clone();
        tasks.spawn(async move {
            for _ in 0..8 {
                disk.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    disk.flush().await.unwrap();
    let model = model.lock().clone();
    let mut back = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(1 << 20) {
        back.extend_from_slice(&disk.read_at(vec![0u8; 1 << 20], off).await.unwrap());
    }
    assert!(back == model, "the disk read back differs from the model");
    let mut sync = vec![0u8; SIZE as usize];
    disk.device().read_at(&mut sync, 0).unwrap();
    assert!(
        sync == model,
        "the device's own read differs from the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_a_file_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        let disk = serve(file_disk(&dir, &format!("f{i}.raw")), aio);
        model_run(disk.clone(), i as u64).await;
        let st = disk.stats();
        assert!(
            st.mapped > 0,
            "{aio:?}: no request went to the engine: {st:?}"
        );
        disk.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_an_o_direct_file_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        let Some(dev) = direct_disk(&dir, &format!("d{i}.raw")) else {
            return;
        };
        let disk = serve(dev, aio);
        model_run(disk.clone(), 10 + i as u64).await;
        // Aligned buffers went to the engine; plain ones may have fallen back.
        let st = disk.stats();
        assert!(
            st.mapped > 0,
            "{aio:?}: no request went to the engine: {st:?}"
        );
        disk.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_memory_match_a_model() {
    for (i, aio) in engines().into_iter().enumerate() {
        let disk = serve(mem_disk(), aio);
        model_run(disk.clone(), 20 + i as u64).await;
        let st = disk.stats();
        assert_eq!(st.mapped, 0, "memory storage cannot be mapped: {st:?}");
        assert!(st.fallback > 0);
        disk.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_engine_serves() {
    let disk = AsyncDisk::new(mem_disk()).unwrap();
    let expect = if engines().contains(&Aio::IoUring) {
        Aio::IoUring
    } else {
        Aio::Threads
    };
    assert_eq!(disk.aio(), expect);
    let b = disk.write_at(vec![9u8; 4096], 0).await.unwrap();
    assert_eq!(b.len(), 4096);
    let b = disk
        .read_at(vec![0u8; 4096].into_boxed_slice(), 0)
        .await
        .unwrap();
    assert!(b.iter().all(|&x| x == 9));
    // Empty requests are fine.
    assert!(disk.read_at(Vec::new(), 0).await.unwrap().is_empty());
    // Clones share one disk; dropping all of them closes it.
    let other = disk.clone();
    drop(disk);
    other.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_values() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        for dev in [file_disk(&dir, &format!("e{i}.raw")), mem_disk()] {
            let disk = serve(dev, aio);
            let e = disk
                .read_at(vec![0u8; 4096], SIZE)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e:?}");
            let e = disk
                .read_at(vec![0u8; 8192], SIZE - 4096)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e:?}");
            let e = disk
                .write_at(vec![0u8; 512], u64::MAX - 511)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e:?}");
            let e = disk
                .read_at(vec![0u8; 100], 0)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unaligned, "{e:?}");
            let e = disk
                .write_at(vec![0u8; 512], 7)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unaligned, "{e:?}");
            let e = disk.block_status(SIZE, 512).await.map(|_| ()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e:?}");
            let e = disk
                .discard(SIZE - 512, 1024)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e:?}");
            // The disk still works after them.
            disk.write_at(vec![1u8; 512], SIZE - 512).await.unwrap();
            disk.close().await.unwrap();
        }
    }
    // A read-only disk refuses writes.
    let s = MemStorage::new();
    s.set_len(1 << 20).unwrap();
    let disk = AsyncDisk::new(Arc::new(
        RawDisk::open(s, &RawOptions::new().read_only(true)).unwrap(),
    ))
    .unwrap();
    let e = disk
        .write_at(vec![0u8; 512], 0)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e:?}");
    let e = disk
        .write_zeroes(0, 512, false)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_reach_the_caller() {
    for aio in engines() {
        let s = FaultStorage::empty();
        s.set_len(1 << 20).unwrap();
        s.inject(Injection::WriteError { nth: s.writes() });
        let disk = serve(Arc::new(RawDisk::new(s).unwrap()), aio);
        let e = disk
            .write_at(vec![3u8; 4096], 0)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e:?}");
        // Fail-stop: the device refuses writes from now on, and says so.
        let e = disk
            .write_at(vec![3u8; 4096], 0)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Failed, "{e:?}");
        let e = disk.flush().await.map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Failed, "{e:?}");

        let s = FaultStorage::empty();
        s.set_len(1 << 20).unwrap();
        s.inject(Injection::SyncError { nth: s.syncs() });
        let disk = serve(Arc::new(RawDisk::new(s).unwrap()), aio);
        disk.write_at(vec![3u8; 4096], 0).await.unwrap();
        let e = disk.flush().await.map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushes_coalesce_and_do_not_stop_io() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        let disk = serve(file_disk(&dir, &format!("c{i}.raw")), aio);
        let mut set = tokio::task::JoinSet::new();
        for t in 0..32u64 {
            let disk = disk.clone();
            set.spawn(async move {
                let off = t * 65536;
                let b = disk.write_at(vec![t as u8; 65536], off).await.unwrap();
                disk.flush().await.unwrap();
                let b = disk.read_at(b, off).await.unwrap();
                assert!(b.iter().all(|&x| x == t as u8));
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        disk.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroes_discard_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        for dev in [file_disk(&dir, &format!("z{i}.raw")), mem_disk()] {
            let disk = serve(dev, aio);
            disk.write_at(vec![5u8; 1 << 20], 0).await.unwrap();
            let run = disk.block_status(0, 1 << 20).await.unwrap();
            assert_eq!(run.status, BlockStatus::Data);
            disk.write_zeroes(0, 65536, false).await.unwrap();
            disk.write_zeroes(65536, 65536, true).await.unwrap();
            disk.discard(131072, 65536).await.unwrap();
            let b = disk.read_at(vec![1u8; 196608], 0).await.unwrap();
            assert!(b.iter().all(|&x| x == 0));
            let b = disk.read_at(vec![0u8; 4096], 196608).await.unwrap();
            assert!(b.iter().all(|&x| x == 5));
            let run = disk.block_status(65536, 65536).await.unwrap();
            assert_ne!(run.status, BlockStatus::Data, "a punched range is a hole");
            disk.close().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_disk_refuses_requests() {
    for aio in engines() {
        let disk = serve(mem_disk(), aio);
        let other = disk.clone();
        disk.write_at(vec![1u8; 512], 0).await.unwrap();
        disk.close().await.unwrap();
        disk.close().await.unwrap();
        let e = other
            .read_at(vec![0u8; 512], 0)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e:?}");
        assert!(other.flush().await.is_err());
        assert!(other.block_status(0, 512).await.is_err());
    }
}

/// Polls `f` once (the request goes to the I/O thread), then drops it.
async fn poll_once<F: std::future::Future>(f: F) {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        let _ = f.as_mut().poll(cx);
        std::task::Poll::Ready(())
    })
    .await
}

/// Futures dropped after their first poll leave their requests in flight; dropping the disk
/// then waits for all of them: every write sent lands, and every buffer outlives its I/O.
/// On the engine (a raw file), and through the device's own methods with slow writes (where a
/// drop that did not wait would find most writes missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_with_requests_in_flight_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        for delay in [None, Some(Duration::from_millis(2))] {
            let dev = TestDev::new(&dir, &format!("x{i}{}.raw", delay.is_some()), delay);
            let disk = serve(dev.clone(), aio);
            let n = 64u64;
            let len = SIZE / n;
            for k in 0..n {
                let w = disk.write_at(vec![k as u8 + 1; len as usize], k * len);
                poll_once(w).await;
                let r = disk.read_at(disk.alloc(len as usize), k * len);
                poll_once(r).await;
            }
            // Tasks holding clones, aborted while their requests are in flight.
            let mut set = tokio::task::JoinSet::new();
            for k in 0..16u64 {
                let disk = disk.clone();
                set.spawn(async move { disk.read_at(vec![0u8; 1 << 20], k * 65536).await });
            }
            set.abort_all();
            while set.join_next().await.is_some() {}
            drop(disk);
            let mut back = vec![0u8; SIZE as usize];
            dev.read_at(&mut back, 0).unwrap();
            for k in 0..n {
                let r = (k * len) as usize..((k + 1) * len) as usize;
                assert!(
                    back[r].iter().all(|&x| x == k as u8 + 1),
                    "{aio:?} {delay:?}: write {k} sent before the drop did not land"
                );
            }
        }
    }
}

/// Options are honoured: a small engine depth and one control thread still serve many
/// requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_depth_and_one_control_thread() {
    let dir = tempfile::tempdir().unwrap();
    let opts = AsyncOptions::new()
        .aio(Aio::Threads)
        .depth(1)
        .control_threads(1);
    let disk = AsyncDisk::with_options(file_disk(&dir, "s.raw"), &opts).unwrap();
    let mut set = tokio::task::JoinSet::new();
    for k in 0..64u64 {
        let disk = disk.clone();
        set.spawn(async move {
            disk.write_at(vec![k as u8; 4096], k * 4096).await.unwrap();
            disk.flush().await.unwrap();
            let b = disk.read_at(vec![0u8; 4096], k * 4096).await.unwrap();
            assert!(b.iter().all(|&x| x == k as u8));
            disk.block_status(k * 4096, 4096).await.unwrap();
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    disk.close().await.unwrap();
}

/// A raw file disk whose flushes wait at a gate (and are counted), and whose writes may be
/// slow (then never mapped, so that they run through the device's synchronous methods).
struct TestDev {
    inner: RawDisk<FileStorage>,
    /// Open: flushes pass; closed: they wait.
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    flushes: std::sync::atomic::AtomicUsize,
    /// Slept by every write before it starts.
    write_delay: Option<Duration>,
}

impl TestDev {
    fn new(dir: &tempfile::TempDir, name: &str, write_delay: Option<Duration>) -> Arc<Self> {
        let s = FileStorage::create(dir.path().join(name)).unwrap();
        s.set_len(SIZE).unwrap();
        Arc::new(TestDev {
            inner: RawDisk::new(s).unwrap(),
            // Closed for the flush test (no delay), open for the slow-write one.
            open: std::sync::Mutex::new(write_delay.is_some()),
            cv: std::sync::Condvar::new(),
            flushes: Default::default(),
            write_delay,
        })
    }

    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.cv.notify_all();
    }
}

impl BlockDevice for TestDev {
    fn info(&self) -> block_io::DiskInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    unsafe fn read_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> block_io::Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.read_raw_at(bufs, offset) }
    }
    unsafe fn write_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> block_io::Result<()> {
        if let Some(d) = self.write_delay {
            std::thread::sleep(d);
        }
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.write_raw_at(bufs, offset) }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> block_io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<block_io::StatusRun> {
        self.inner.block_status(offset, len)
    }
    fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<block_io::Mapping>,
    ) -> block_io::Result<bool> {
        if write && self.write_delay.is_some() {
            return Ok(false);
        }
        self.inner.map(offset, len, write, out)
    }
    fn mapped_write_failed(&self, err: &block_io::Error) {
        self.inner.mapped_write_failed(err)
    }
}

/// A flush stuck in the device holds up neither reads nor writes (they complete meanwhile,
/// on the engine), and the flushes asked while it runs share one more device flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_flush_does_not_stop_io_and_waiting_flushes_coalesce() {
    let dir = tempfile::tempdir().unwrap();
    for (i, aio) in engines().into_iter().enumerate() {
        let dev = TestDev::new(&dir, &format!("g{i}.raw"), None);
        let disk = serve(dev.clone(), aio);
        let first = tokio::spawn({
            let disk = disk.clone();
            async move { disk.flush().await }
        });
        while dev.flushes.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The flush is stuck in the device: I/O goes on.
        let io = async {
            for k in 0..32u64 {
                let b = disk.write_at(disk.alloc(65536), k * 65536).await.unwrap();
                disk.read_at(b, k * 65536).await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), io)
            .await
            .expect("reads and writes waited for a flush");
        let mut more = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let disk = disk.clone();
            more.spawn(async move { disk.flush().await });
        }
        // Let the eight reach the queue behind the stuck flush.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!first.is_finished());
        dev.set_open(true);
        first.await.unwrap().unwrap();
        while let Some(r) = more.join_next().await {
            r.unwrap().unwrap();
        }
        // One stuck flush, then one for the eight (a straggler that came late gets its own).
        let n = dev.flushes.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (2..=3).contains(&n),
            "{aio:?}: {n} device flushes for 9 asked"
        );
        assert!(disk.stats().mapped >= 64, "{:?}", disk.stats());
        disk.close().await.unwrap();
    }
}

/// A buffer that holds a clone of the disk it is used with.
struct Holder {
    _disk: AsyncDisk,
    data: Vec<u8>,
}

// SAFETY: the bytes are the Vec's heap memory, which moving the holder does not move.
unsafe impl IoBuf for Holder {
    fn as_raw(&mut self) -> block_io::RawBuf {
        self.data.as_raw()
    }
}

/// The last clone dropped on the I/O thread itself (inside a buffer whose caller went away)
/// ends the disk without the thread joining itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_clone_dropped_on_the_io_thread() {
    // A panic on an I/O thread would not fail the test by itself: note it.
    static IO_PANIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("vdisk-async-io") {
            IO_PANIC.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        prev(info)
    }));
    let dev = TestDev::new(
        &tempfile::tempdir().unwrap(),
        "h.raw",
        Some(Duration::from_millis(20)),
    );
    let disk = serve(dev.clone(), Aio::Threads);
    let buf = Holder {
        _disk: disk.clone(),
        data: vec![4u8; 4096],
    };
    poll_once(disk.write_at(buf, 0)).await;
    drop(disk);
    // The write completes, its answer finds nobody, the holder (and the last clone) drops
    // there, and the thread ends: the device is released.
    for _ in 0..500 {
        if Arc::strong_count(&dev) == 1 {
            let mut b = vec![0u8; 4096];
            dev.read_at(&mut b, 0).unwrap();
            assert!(b.iter().all(|&x| x == 4));
            assert!(
                !IO_PANIC.load(std::sync::atomic::Ordering::SeqCst),
                "the I/O thread panicked"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the I/O thread did not end");
}
