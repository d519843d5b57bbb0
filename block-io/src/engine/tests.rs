//! The engine against a real file, on both backends: many ops in flight with scattered
//! buffers, short files, bad descriptors, and sync coalescing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use rand::{Rng, SeedableRng};

use std::sync::Arc;

use super::*;

/// The backends this machine has (io_uring may be refused by a sandbox: then only threads,
/// said loudly).
fn engines(depth: u32) -> Vec<Engine> {
    let mut v = vec![Engine::new(Aio::Threads, depth).unwrap()];
    match Engine::new(Aio::IoUring, depth) {
        Ok(e) => v.push(e),
        Err(e) => eprintln!("!!! io_uring unavailable here ({e}); testing threads only !!!"),
    }
    v
}

fn buf(v: &mut [u8]) -> RawBuf {
    RawBuf {
        ptr: v.as_mut_ptr(),
        len: v.len(),
    }
}

#[test]
fn many_scattered_ops_in_flight_match_a_model() {
    for mut e in engines(16) {
        let f = tempfile::tempfile().unwrap();
        let size = 4u64 << 20;
        f.set_len(size).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for round in 0..8 {
            // 64 non-overlapping writes of 1..4 buffers each, all in flight at once.
            let mut datas: Vec<Vec<Vec<u8>>> = Vec::new();
            let mut ops = Vec::new();
            for i in 0..64u64 {
                let off = i * (size / 64) + rng.random_range(0..8) * 512;
                let pieces: Vec<Vec<u8>> = (0..rng.random_range(1..4))
                    .map(|_| {
                        let n = rng.random_range(1..8) * 512;
                        (0..n).map(|_| rng.random()).collect()
                    })
                    .collect();
                let mut pos = off as usize;
                for p in &pieces {
                    model[pos..pos + p.len()].copy_from_slice(p);
                    pos += p.len();
                }
                datas.push(pieces);
                ops.push((off, datas.len() - 1));
            }
            let ops: Vec<Op> = ops
                .into_iter()
                .map(|(off, d)| Op {
                    kind: OpKind::Write,
                    fd: f.as_raw_fd(),
                    offset: off,
                    bufs: datas[d].iter_mut().map(|p| buf(p)).collect(),
                    tag: off,
                })
                .collect();
            // SAFETY: the buffers live in `datas` until `run` returns.
            unsafe { e.run(ops) }.unwrap();
            // Read it all back in scattered pieces, in flight together.
            let mut back = vec![0u8; size as usize];
            let ops: Vec<Op> = back
                .chunks_mut(size as usize / 32)
                .enumerate()
                .map(|(i, c)| {
                    let (a, b) = c.split_at_mut(c.len() / 3);
                    Op {
                        kind: OpKind::Read,
                        fd: f.as_raw_fd(),
                        offset: (i * (size as usize / 32)) as u64,
                        bufs: vec![buf(a), buf(b)],
                        tag: i as u64,
                    }
                })
                .collect();
            // SAFETY: `back` outlives the call.
            unsafe { e.run(ops) }.unwrap();
            assert!(back == model, "{:?} round {round}", e.aio());
        }
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn completions_carry_tags_and_whole_lengths() {
    for mut e in engines(4) {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[9u8; 8192], 0).unwrap();
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        for (tag, v, off) in [(11u64, &mut a, 0u64), (22, &mut b, 4096)] {
            // SAFETY: `a` and `b` outlive the reaping below.
            unsafe {
                e.submit(Op {
                    kind: OpKind::Read,
                    fd: f.as_raw_fd(),
                    offset: off,
                    bufs: vec![buf(v)],
                    tag,
                })
            }
            .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 2 {
            e.wait().unwrap();
            e.reap(&mut got).unwrap();
        }
        got.sort_by_key(|c| c.tag);
        assert_eq!(got[0].tag, 11);
        assert_eq!(got[1].tag, 22);
        assert!(got.iter().all(|c| matches!(c.result, Ok(4096))));
        assert!(a.iter().chain(b.iter()).all(|&x| x == 9));
    }
}

#[test]
fn errors_complete_instead_of_panicking() {
    for mut e in engines(4) {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let mut v = vec![0u8; 8192];
        // Past the end of the file: a short read, then nothing: an error, not a hang.
        let r = unsafe {
            e.run(vec![Op {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: 0,
                bufs: vec![buf(&mut v)],
                tag: 1,
            }])
        };
        assert!(r.unwrap_err().to_string().contains("end of the file"));
        // A closed descriptor.
        let r = unsafe {
            e.run(vec![Op {
                kind: OpKind::Write,
                fd: -1,
                offset: 0,
                bufs: vec![buf(&mut v)],
                tag: 2,
            }])
        };
        assert!(r.is_err());
        // An offset no file can hold is refused at submit.
        let r = unsafe {
            e.submit(Op {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: u64::MAX - 10,
                bufs: vec![buf(&mut v)],
                tag: 3,
            })
        };
        assert!(r.is_err());
        assert_eq!(e.in_flight(), 0);
    }
}

#[test]
fn syncs_coalesce_until_a_write_completes() {
    for mut e in engines(8) {
        let f = tempfile::tempfile().unwrap();
        let sync = |tag| Op {
            kind: OpKind::Sync,
            fd: f.as_raw_fd(),
            offset: 0,
            bufs: Vec::new(),
            tag,
        };
        // Three syncs submitted together: one reaches the backend, all three complete.
        for t in 1..=3 {
            unsafe { e.submit(sync(t)) }.unwrap();
        }
        assert_eq!(e.in_flight(), 3);
        let mut got = Vec::new();
        while got.len() < 3 {
            e.wait().unwrap();
            e.reap(&mut got).unwrap();
        }
        let mut tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
        tags.sort();
        assert_eq!(tags, [1, 2, 3]);
        assert!(got.iter().all(|c| c.result.is_ok()));
        assert_eq!(e.in_flight(), 0);
        assert!(e.syncs.is_empty());
    }
}

/// A plain file as a `Storage` with an `IoHandle`, as `FileStorage` is. `PlainFile::new`
/// is a buffered file; `PlainFile(f, 4096)` says its transfers must be aligned as an
/// `O_DIRECT` file's (which the engine then sends to the disk at once, see
/// `DeviceQueue::set_eager_submit`).
struct PlainFile(std::fs::File, usize);

impl PlainFile {
    fn new(f: std::fs::File) -> Self {
        PlainFile(f, 1)
    }
}

impl crate::Storage for PlainFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.0.read_exact_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.0.write_all_at(buf, offset)?)
    }
    fn len(&self) -> Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> Result<()> {
        Ok(self.0.set_len(len)?)
    }
    fn sync_data(&self) -> Result<()> {
        Ok(self.0.sync_data()?)
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn io_handle(&self) -> Option<crate::IoHandle> {
        Some(crate::IoHandle {
            fd: self.0.as_raw_fd(),
            align: self.1,
        })
    }
}

#[test]
fn device_queue_runs_mapped_and_fallback_requests_against_a_model() {
    use crate::{BlockDevice, MemStorage, RawDisk, Storage};
    let size = 1u64 << 20;
    for aio in [Aio::Threads, Aio::IoUring] {
        let Ok(engine) = Engine::new(aio, 32) else {
            eprintln!("!!! {aio:?} unavailable; skipped !!!");
            continue;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        let file: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(PlainFile::new(f)).unwrap());
        let m = MemStorage::new();
        m.set_len(size).unwrap();
        let mem: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(m).unwrap());
        let (mut qf, mut qm) = (
            DeviceQueue::new(file.clone(), engine),
            DeviceQueue::new(mem.clone(), Engine::new(Aio::Threads, 4).unwrap()),
        );
        let mut model = vec![0u8; size as usize];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            // 32 non-overlapping writes then 32 reads, all in flight, on both queues.
            let mut bufs: Vec<(u64, Vec<u8>)> = (0..32u64)
                .map(|i| {
                    let off = i * (size / 32) + rng.random_range(0..16) * 512;
                    let data: Vec<u8> = (0..rng.random_range(1..9) * 512)
                        .map(|_| rng.random())
                        .collect();
                    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                    (off, data)
                })
                .collect();
            for q in [&mut qf, &mut qm] {
                let mut done = Vec::new();
                for (i, (off, d)) in bufs.iter_mut().enumerate() {
                    // SAFETY: `bufs` outlives the draining below.
                    match unsafe { q.start(true, *off, &[buf(d)], i) } {
                        Started::Queued => {}
                        Started::Done(t, r) => done.push((t, r)),
                    }
                }
                q.commit().unwrap();
                q.drain(&mut done).unwrap();
                assert_eq!(done.len(), 32);
                assert!(done.iter().all(|(_, r)| r.is_ok()));
                let mut back = vec![0u8; size as usize];
                let mut done = Vec::new();
                for (i, c) in back.chunks_mut(size as usize / 32).enumerate() {
                    let off = (i * c.len()) as u64;
                    // SAFETY: `back` outlives the draining below.
                    match unsafe { q.start(false, off, &[buf(c)], i) } {
                        Started::Queued => {}
                        Started::Done(t, r) => done.push((t, r)),
                    }
                }
                q.commit().unwrap();
                q.drain(&mut done).unwrap();
                assert!(done.iter().all(|(_, r)| r.is_ok()));
                assert!(back == model);
            }
        }
        // The file went through the engine, the memory disk through its own methods.
        assert!(
            qf.stats().mapped > 0 && qf.stats().fallback == 0,
            "{:?}",
            qf.stats()
        );
        assert!(qm.stats().mapped == 0 && qm.stats().fallback > 0);
        // A request past the end is refused as the device refuses it.
        let mut v = vec![0u8; 4096];
        match unsafe { qf.start(false, size, &[buf(&mut v)], 99) } {
            Started::Done(99, Err(e)) => assert_eq!(e.kind(), ErrorKind::OutOfRange),
            other => panic!("{other:?}"),
        }
    }
}

/// The `BlockDevice` methods a test device passes to its `inner` raw disk unchanged.
macro_rules! forward_to_inner {
    () => {
        fn info(&self) -> crate::DiskInfo {
            self.inner.info()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
            self.inner.write_zeroes(offset, len, unmap)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.discard(offset, len)
        }
    };
}

/// A raw disk whose flush waits at a gate and counts its calls.
struct GatedFlush {
    inner: crate::RawDisk<PlainFile>,
    open: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
    flushes: std::sync::atomic::AtomicUsize,
    entered: std::sync::atomic::AtomicUsize,
}

impl crate::BlockDevice for GatedFlush {
    forward_to_inner!();
    fn flush(&self) -> Result<()> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock();
        while !*open {
            self.cv.wait(&mut open);
        }
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<crate::StatusRun> {
        self.inner.block_status(offset, len)
    }
    fn map(&self, o: u64, l: u64, w: bool, out: &mut Vec<crate::Mapping>) -> Result<bool> {
        self.inner.map(o, l, w, out)
    }
}

#[test]
fn a_flush_blocks_no_read_and_queued_flushes_share_one() {
    use crate::BlockDevice;
    for aio in [Aio::Threads, Aio::IoUring] {
        let Ok(engine) = Engine::new(aio, 16) else {
            continue;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let dev = Arc::new(GatedFlush {
            inner: crate::RawDisk::new(PlainFile::new(f)).unwrap(),
            open: parking_lot::Mutex::new(false),
            cv: parking_lot::Condvar::new(),
            flushes: std::sync::atomic::AtomicUsize::new(0),
            entered: std::sync::atomic::AtomicUsize::new(0),
        });
        let mut q = DeviceQueue::new(dev.clone() as Arc<dyn BlockDevice>, engine);
        assert!(matches!(q.start_flush(0usize), Started::Queued));
        // Reads go on while the flush is stuck (those the page cache holds complete at once).
        let mut bufs = vec![vec![0u8; 4096]; 8];
        let mut got = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            match unsafe { q.start(false, i as u64 * 4096, &[buf(b)], 10 + i) } {
                Started::Queued => {}
                Started::Done(t, r) => got.push((t, r)),
            }
        }
        q.commit().unwrap();
        while got.len() < 8 {
            q.wait().unwrap();
            q.reap(&mut got).unwrap();
        }
        assert!(got.iter().all(|(t, r)| *t >= 10 && r.is_ok()));
        // Two more flushes queue behind the stuck one (once it is inside the device), then
        // all three finish with two flushes of the device.
        while dev.entered.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(matches!(q.start_flush(1), Started::Queued));
        assert!(matches!(q.start_flush(2), Started::Queued));
        std::thread::sleep(std::time::Duration::from_millis(50));
        *dev.open.lock() = true;
        dev.cv.notify_all();
        let mut got = Vec::new();
        q.drain(&mut got).unwrap();
        let mut tags: Vec<usize> = got.iter().map(|(t, _)| *t).collect();
        tags.sort();
        assert_eq!(tags, [0, 1, 2]);
        assert_eq!(dev.flushes.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}

#[test]
fn page_cache_hits_complete_inline_and_misses_go_to_the_ring() {
    use crate::{BlockDevice, RawDisk};
    let Ok(engine) = Engine::new(Aio::IoUring, 32) else {
        eprintln!("!!! io_uring unavailable here; inline cached reads not tested !!!");
        return;
    };
    let size = 1usize << 20;
    let f = tempfile::tempfile().unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
    f.write_all_at(&data, 0).unwrap();
    let drop_pages = {
        let f = f.try_clone().unwrap();
        move || {
            f.sync_all().unwrap();
            // SAFETY: fadvise on an open descriptor; no memory is passed.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(r, 0);
        }
    };
    let tmpfs = crate::file::on_tmpfs(&f);
    let dev: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(PlainFile::new(f)).unwrap());
    let mut q = DeviceQueue::new(dev, engine);
    let read = |q: &mut DeviceQueue<usize>, off: usize| -> bool {
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: `v` outlives the draining below.
        let inline = match unsafe { q.start(false, off as u64, &[buf(&mut v)], 1) } {
            Started::Done(1, r) => {
                r.unwrap();
                true
            }
            Started::Queued => {
                let mut done = Vec::new();
                q.drain(&mut done).unwrap();
                assert!(matches!(done.as_slice(), [(1, Ok(()))]), "{done:?}");
                false
            }
            other => panic!("{other:?}"),
        };
        assert!(v == data[off..off + v.len()], "wrong data at {off}");
        inline
    };
    // Just written: in the page cache, read on this thread.
    assert!(read(&mut q, 0));
    assert!(read(&mut q, 300 << 10));
    // Turned off: through the ring.
    q.set_inline_cached_reads(false);
    assert!(!read(&mut q, 0));
    q.set_inline_cached_reads(true);
    if tmpfs {
        eprintln!("!!! tmpfs keeps every page: the page-cache miss is not tested !!!");
        return;
    }
    // Out of the page cache: the inline attempt would wait for the disk, so the ring reads it.
    drop_pages();
    assert!(!read(&mut q, 512 << 10));
    // Now cached again.
    assert!(read(&mut q, 512 << 10));
}

/// What [`Allocating`] saw: how often it was asked to map an allocating write, and the
/// result each of its guards was completed with.
#[derive(Default)]
struct AllocLog {
    asked: std::sync::atomic::AtomicUsize,
    completed: parking_lot::Mutex<Vec<std::result::Result<(), ErrorKind>>>,
    failed_writes: std::sync::atomic::AtomicUsize,
}

/// A device whose every write needs new space: `map` refuses writes, `map_allocating` maps
/// them onto `fd` (at the same offset) with a guard that logs its completion and, when
/// `refuse_publish` is set, fails it.
struct Allocating {
    inner: crate::RawDisk<PlainFile>,
    fd: std::os::unix::io::RawFd,
    log: Arc<AllocLog>,
    refuse_publish: bool,
}

struct LoggingGuard {
    log: Arc<AllocLog>,
    refuse: bool,
}

impl crate::WriteGuard for LoggingGuard {
    fn complete(self: Box<Self>, result: Result<()>) -> Result<()> {
        self.log
            .completed
            .lock()
            .push(result.as_ref().map(|_| ()).map_err(|e| e.kind()));
        match result {
            Ok(()) if self.refuse => Err(Error::new(ErrorKind::Corrupt, "publish refused")),
            r => r,
        }
    }
}

impl crate::BlockDevice for Allocating {
    forward_to_inner!();
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<crate::StatusRun> {
        self.inner.block_status(offset, len)
    }
    fn map(&self, o: u64, l: u64, w: bool, out: &mut Vec<crate::Mapping>) -> Result<bool> {
        if w {
            return Ok(false);
        }
        self.inner.map(o, l, w, out)
    }
    fn mapped_write_failed(&self, _err: &Error) {
        self.log
            .failed_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn map_allocating(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        out: &mut Vec<crate::Mapping>,
    ) -> Result<Option<Box<dyn crate::WriteGuard>>> {
        self.log
            .asked
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        out.push(crate::Mapping::File {
            handle: crate::IoHandle {
                fd: self.fd,
                align: 1,
            },
            file_offset: offset,
            len,
        });
        Ok(Some(Box::new(LoggingGuard {
            log: self.log.clone(),
            refuse: self.refuse_publish,
        })))
    }
}

/// One write of `data` at `offset` through `q`, waited for.
fn write_one(q: &mut DeviceQueue<usize>, data: &mut [u8], offset: u64) -> Result<()> {
    let mut got = Vec::new();
    // SAFETY: `data` outlives the request, which is drained before returning.
    match unsafe { q.start(true, offset, &[buf(data)], 1) } {
        Started::Done(_, r) => return r,
        Started::Queued => {}
    }
    q.commit().unwrap();
    q.drain(&mut got).unwrap();
    assert_eq!(got.len(), 1);
    got.pop().map(|(_, r)| r).unwrap()
}

#[test]
fn allocating_writes_complete_their_guard_with_the_payload_result() {
    use crate::BlockDevice;
    for aio in [Aio::Threads, Aio::IoUring] {
        let Ok(engine) = Engine::new(aio, 16) else {
            eprintln!("!!! {aio:?} unavailable here; skipped !!!");
            continue;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        let log = Arc::new(AllocLog::default());
        let dev = |fd, refuse_publish| {
            Arc::new(Allocating {
                inner: crate::RawDisk::new(PlainFile::new(f.try_clone().unwrap())).unwrap(),
                fd,
                log: log.clone(),
                refuse_publish,
            }) as Arc<dyn BlockDevice>
        };
        let mut q = DeviceQueue::new(dev(f.as_raw_fd(), false), engine);
        // An aligned write runs on the engine; its guard sees the payload's success.
        let mut data = crate::AlignedBuf::new(8192, 4096);
        data.fill(0x5a);
        write_one(&mut q, &mut data, 64 << 10).unwrap();
        let mut back = vec![0u8; 8192];
        f.read_exact_at(&mut back, 64 << 10).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        assert_eq!(q.stats().allocating, 1, "{aio:?}");
        assert_eq!(*log.completed.lock(), [Ok(())]);
        // An unaligned one is not offered to the device (a reservation it gave up would be
        // space lost): it runs on the device's own path.
        let mut odd = vec![0x33u8; 4096 + 512];
        write_one(&mut q, &mut odd[512..], 128 << 10).unwrap();
        assert_eq!(log.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(q.stats().fallback, 1);
        drop(q);
        // A payload write that fails (the descriptor is read-only) fails the request, is
        // reported to the device, and reaches the guard as the error.
        let engine = Engine::new(aio, 16).unwrap();
        let mut q = DeviceQueue::new(dev(ro.as_raw_fd(), false), engine);
        let e = write_one(&mut q, &mut data, 0).unwrap_err();
        assert_eq!(log.completed.lock().last().cloned(), Some(Err(e.kind())));
        assert_eq!(
            log.failed_writes.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        drop(q);
        // A guard that cannot publish fails the request although the payload was written.
        let engine = Engine::new(aio, 16).unwrap();
        let mut q = DeviceQueue::new(dev(f.as_raw_fd(), true), engine);
        let e = write_one(&mut q, &mut data, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(log.completed.lock().last().cloned(), Some(Ok(())));
        *log.completed.lock() = Vec::new();
        log.failed_writes
            .store(0, std::sync::atomic::Ordering::SeqCst);
        log.asked.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A queue on `aio` over a raw disk of 64 KiB, every byte `byte`, whose file claims
/// transfers aligned to `align` (see [`PlainFile`]); `None` (said loudly) where this machine
/// has no such engine.
fn raw_queue(aio: Aio, byte: u8, align: usize) -> Option<DeviceQueue<usize>> {
    let Ok(engine) = Engine::new(aio, 16) else {
        eprintln!("!!! {aio:?} unavailable here; skipped !!!");
        return None;
    };
    let f = tempfile::tempfile().unwrap();
    f.write_all_at(&[byte; 65536], 0).unwrap();
    let dev = Arc::new(crate::RawDisk::new(PlainFile(f, align)).unwrap());
    Some(DeviceQueue::new(dev as Arc<dyn crate::BlockDevice>, engine))
}

#[test]
fn reap_ready_picks_up_ring_and_slow_completions_without_waiting() {
    for aio in [Aio::Threads, Aio::IoUring] {
        let Some(mut q) = raw_queue(aio, 7, 1) else {
            continue;
        };
        let mut got = Vec::new();
        // Nothing in flight: nothing to reap.
        q.reap_ready(&mut got).unwrap();
        assert!(got.is_empty());
        let mut v = vec![0u8; 8192];
        // SAFETY: `v` outlives the read, which completes in the loop below.
        let read = unsafe { q.start(false, 4096, &[buf(&mut v)], 1usize) };
        for s in [read, q.start_flush(2)] {
            if let Started::Done(t, r) = s {
                got.push((t, r));
            }
        }
        q.commit().unwrap();
        let t0 = std::time::Instant::now();
        while got.len() < 2 {
            assert!(t0.elapsed().as_secs() < 10, "{aio:?}: {got:?}");
            q.reap_ready(&mut got).unwrap();
            std::thread::yield_now();
        }
        assert!(got.iter().all(|(_, r)| r.is_ok()));
        assert!(v.iter().all(|&b| b == 7));
        assert_eq!(q.in_flight(), 0);
    }
}

#[test]
fn disk_bound_requests_reach_io_uring_before_the_commit_unless_told_not_to() {
    for aio in [Aio::Threads, Aio::IoUring] {
        for eager in [true, false] {
            let Some(mut q) = raw_queue(aio, 5, 4096) else {
                continue;
            };
            q.set_eager_submit(eager);
            // The thread pool takes its ops at the commit only.
            let eager = eager && aio == Aio::IoUring;
            let mut mem = vec![0u8; 3 * 4096];
            let skip = mem.as_ptr().align_offset(4096);
            let v = &mut mem[skip..skip + 8192];
            // SAFETY: `mem` outlives the read, which completes below.
            let started = unsafe { q.start(false, 4096, &[buf(v)], 1usize) };
            assert!(matches!(started, Started::Queued), "{aio:?}");
            // No commit: an eager queue's read completes anyway, the other's stays staged.
            let mut got = Vec::new();
            let patience = std::time::Duration::from_millis(if eager { 10_000 } else { 300 });
            let t0 = std::time::Instant::now();
            while got.is_empty() && t0.elapsed() < patience {
                q.reap_ready(&mut got).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(got.len(), usize::from(eager), "{aio:?} eager {eager}");
            q.drain(&mut got).unwrap();
            assert!(matches!(got.as_slice(), [(1, Ok(()))]), "{aio:?}: {got:?}");
            assert!(mem[skip..skip + 8192].iter().all(|&b| b == 5), "{aio:?}");
        }
    }
}
