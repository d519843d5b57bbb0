//! Steering jobs: pause and resume, the throttle (respected within a tolerance and changed
//! while running), cancel mid-way (the source intact, the disk usable for the next job),
//! refusals, tracked raw and vectored guest writes, and waiting from async code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, MemStorage, RawBuf, RawDisk, RawOptions, Storage};
use common::Model;
use meta_ops::{Job, JobError, JobOptions, JobRunner, LiveDisk, Phase, Pivot};

const SIZE: u64 = 16 << 20;

fn full(size: u64) -> Vec<u8> {
    (0..size as usize)
        .map(|i| (i / 4096) as u8 ^ (i as u8).wrapping_mul(7) | 1)
        .collect()
}

fn opts(rate: u64) -> JobOptions {
    JobOptions {
        rate,
        ..JobOptions::default()
    }
}

fn wait_phase(h: &meta_ops::JobHandle, p: Phase) {
    let t = Instant::now();
    while h.progress().phase != p {
        assert!(t.elapsed() < Duration::from_secs(10), "never reached {p:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn pause_stops_progress_and_resume_finishes() {
    let runner = JobRunner::new().unwrap();
    let data = full(SIZE);
    let src = common::mem_disk(&data);
    let dest = common::mem_disk(&vec![0; SIZE as usize]);
    let live = LiveDisk::new(src.clone());
    let h = runner
        .start(&live, Job::convert(dest.clone()).options(opts(16 << 20)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let p = h.progress();
    assert_eq!(p.phase, Phase::Copying);
    assert!(p.done > 0 && p.done < p.total, "{p:?}");
    assert!(p.eta.is_some() && p.rate > 0.0, "{p:?}");
    h.pause();
    wait_phase(&h, Phase::Paused);
    let at = h.progress().done;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.progress().done, at, "no progress while paused");
    assert!(!h.is_finished());
    h.resume();
    let r = h.wait_blocking().unwrap();
    assert_eq!(r.bytes, SIZE);
    assert_eq!(common::mismatches(&*dest, 0, &data), 0);
    assert!(Arc::ptr_eq(
        &live.current(),
        &(dest as Arc<dyn BlockDevice>)
    ));
}

#[test]
fn throttle_is_respected_and_can_change_while_running() {
    let runner = JobRunner::new().unwrap();
    let size = 8u64 << 20;
    let data = full(size);
    let rate = 4u64 << 20;
    let dest = common::mem_disk(&vec![0; size as usize]);
    let live = LiveDisk::new(common::mem_disk(&data));
    let t = Instant::now();
    let h = runner
        .start(&live, Job::convert(dest.clone()).options(opts(rate)))
        .unwrap();
    assert_eq!(h.rate(), rate);
    // The bucket starts with one chunk's worth (rate / 8).
    let expected = (size - rate / 8) as f64 / rate as f64;
    // Sample the rate while running: never above the limit (plus the initial burst).
    std::thread::sleep(Duration::from_millis(800));
    let p = h.progress();
    let allowed = rate as f64 * p.elapsed.as_secs_f64() + (rate / 8) as f64 + (1 << 20) as f64;
    assert!((p.done as f64) <= allowed, "{p:?}");
    h.wait_blocking().unwrap();
    let took = t.elapsed().as_secs_f64();
    assert!(
        took > expected * 0.85 && took < expected * 1.5 + 0.3,
        "took {took:.2}s, expected about {expected:.2}s"
    );
    assert_eq!(common::mismatches(&*dest, 0, &data), 0);

    // Slow, then unlimited: finishes long before the slow rate would allow.
    let dest = common::mem_disk(&vec![0; size as usize]);
    let live = LiveDisk::new(common::mem_disk(&data));
    let t = Instant::now();
    let h = runner
        .start(&live, Job::convert(dest.clone()).options(opts(1 << 20)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.progress().done < size / 2);
    h.set_rate(0);
    assert_eq!(h.rate(), 0);
    h.wait_blocking().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(common::mismatches(&*dest, 0, &data), 0);
}

#[test]
fn cancel_mid_way_leaves_the_source_intact() {
    let runner = JobRunner::new().unwrap();
    for seed in 0..4u64 {
        let initial = common::initial(SIZE, seed);
        let src = common::mem_disk(&initial);
        let dest = common::mem_disk(&vec![0; SIZE as usize]);
        let live = LiveDisk::new(src.clone());
        let guests = common::start(&live, Model::new(initial, 0), 3, seed, true);
        let pivot = if seed % 2 == 0 {
            Pivot::Switch
        } else {
            Pivot::Detach
        };
        let h = runner
            .start(
                &live,
                Job::copy(dest.clone()).pivot(pivot).options(opts(8 << 20)),
            )
            .unwrap();
        guests.run_for_ops(300);
        std::thread::sleep(Duration::from_millis(50 + 30 * seed));
        assert!(!h.is_finished());
        if seed == 3 {
            // Cancel while paused.
            h.pause();
            wait_phase(&h, Phase::Paused);
        }
        h.cancel();
        let p = h.progress();
        let e = h.wait_blocking().unwrap_err();
        assert!(e.is_cancelled(), "{e}");
        assert!(p.done < SIZE);
        assert!(!live.job_running());
        assert_eq!(live.generation(), 0);
        assert!(Arc::ptr_eq(
            &live.current(),
            &(src.clone() as Arc<dyn BlockDevice>)
        ));
        guests.run_for_ops(300);
        let (model, counts) = guests.stop();
        assert_eq!(
            counts.mismatches.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(common::mismatches(&*src, 0, &model.cur), 0, "seed {seed}");
        // The disk takes the next job.
        let dest2 = common::mem_disk(&vec![0; SIZE as usize]);
        runner
            .start(&live, Job::copy(dest2.clone()))
            .unwrap()
            .wait_blocking()
            .unwrap();
        assert_eq!(common::mismatches(&*dest2, 0, &model.cur), 0);
    }
}

#[test]
fn refusals() {
    let runner = JobRunner::new().unwrap();
    let live = LiveDisk::new(common::mem_disk(&full(1 << 20)));
    let small = common::mem_disk(&vec![0; 512 << 10]);
    let e = runner
        .start(&live, Job::convert(small.clone()))
        .unwrap_err();
    assert!(matches!(e, JobError::Invalid(_)), "{e}");
    let e = runner
        .start(&live, Job::copy(small.clone()).range(0, 1 << 20))
        .unwrap_err();
    assert!(matches!(e, JobError::Invalid(_)), "{e}");
    let e = runner
        .start(&live, Job::copy(small.clone()).range(100, 512))
        .unwrap_err();
    assert!(matches!(e, JobError::Invalid(_)), "{e}");
    let ro = Arc::new(
        RawDisk::open(
            MemStorage::from_bytes(&vec![0; 1 << 20]),
            &RawOptions::new().read_only(true),
        )
        .unwrap(),
    );
    assert!(matches!(
        runner.start(&live, Job::copy(ro)).unwrap_err(),
        JobError::Invalid(_)
    ));
    let bad = JobOptions {
        granularity: 3000,
        ..JobOptions::default()
    };
    let dest = common::mem_disk(&vec![0; 1 << 20]);
    assert!(matches!(
        runner
            .start(&live, Job::copy(dest.clone()).options(bad))
            .unwrap_err(),
        JobError::Invalid(_)
    ));
    let h = runner
        .start(&live, Job::copy(dest.clone()).rate(1 << 20))
        .unwrap();
    let dest2 = common::mem_disk(&vec![0; 1 << 20]);
    assert!(matches!(
        runner.start(&live, Job::copy(dest2)).unwrap_err(),
        JobError::Busy
    ));
    h.set_rate(0);
    h.wait_blocking().unwrap();
    assert!(!live.job_running());
}

#[test]
fn raw_and_vectored_guest_writes_are_tracked() {
    let runner = JobRunner::new().unwrap();
    let data = full(SIZE);
    let src = common::mem_disk(&data);
    let dest = common::mem_disk(&vec![0; SIZE as usize]);
    let live = LiveDisk::new(src.clone());
    let o = JobOptions {
        rate: 32 << 20,
        granularity: 4096,
        chunk: 64 << 10,
        ..JobOptions::default()
    };
    let h = runner
        .start(&live, Job::copy(dest.clone()).options(o))
        .unwrap();
    let mut model = data.clone();
    // The disk at the pivot; a write the pivot happened during may be on either side.
    let mut at_pivot: Option<Vec<u8>> = None;
    let mut straddling: Option<(usize, Vec<u8>, Vec<u8>)> = None;
    let mut i = 0u64;
    while live.generation() == 0 {
        let off = (i * 7919 % (SIZE / 4096)) * 4096;
        let mut buf: Vec<u8> = (0..8192).map(|k| (k as u8) ^ (i as u8)).collect();
        let len = (SIZE - off).min(8192) as usize;
        let before = model[off as usize..off as usize + len].to_vec();
        if i % 2 == 0 {
            let (a, b) = buf[..len].split_at(len / 2);
            live.write_vectored_at(&[IoSlice::new(a), IoSlice::new(b)], off)
                .unwrap();
        } else {
            let bufs = [RawBuf {
                ptr: buf.as_mut_ptr(),
                len,
            }];
            // SAFETY: `buf` is alive and untouched during the call.
            unsafe { live.write_raw_at(&bufs, off) }.unwrap();
        }
        if live.generation() != 0 {
            at_pivot = Some(model.clone());
            straddling = Some((off as usize, before, buf[..len].to_vec()));
        }
        model[off as usize..off as usize + len].copy_from_slice(&buf[..len]);
        i += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    let r = h.wait_blocking().unwrap();
    assert!(r.blocks_dirtied > 0 || r.written_through > 0, "{r:?}");
    assert_eq!(common::mismatches(&*src, 0, &model), 0);
    let mut at_pivot = at_pivot.unwrap_or_else(|| model.clone());
    if let Some((off, old, new)) = straddling {
        let mut got = vec![0u8; old.len()];
        dest.read_at(&mut got, off as u64).unwrap();
        assert!(got == old || got == new, "a write is torn across the pivot");
        at_pivot[off..off + got.len()].copy_from_slice(&got);
    }
    assert_eq!(common::mismatches(&*dest, 0, &at_pivot), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_wait_on_the_callers_runtime() {
    let runner = JobRunner::current().unwrap();
    assert!(!runner.owns_runtime());
    let data = full(4 << 20);
    let dest = common::mem_disk(&vec![0; 4 << 20]);
    let live = LiveDisk::new(common::mem_disk(&data));
    let h = runner.start(&live, Job::convert(dest.clone())).unwrap();
    let r = h.wait().await.unwrap();
    assert_eq!(r.bytes, 4 << 20);
    assert_eq!(common::mismatches(&*dest, 0, &data), 0);
    let _ = Storage::len(&MemStorage::new());
}

/// A destination whose writes fail after a number of them.
struct Failing {
    inner: Arc<RawDisk<MemStorage>>,
    left: std::sync::atomic::AtomicI64,
}

impl Failing {
    fn tick(&self) -> block_io::Result<()> {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) <= 0 {
            return Err(block_io::Error::new(block_io::ErrorKind::Io, "injected"));
        }
        Ok(())
    }
}

impl BlockDevice for Failing {
    fn info(&self) -> block_io::DiskInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.tick()?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.tick()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> block_io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<block_io::StatusRun> {
        self.inner.block_status(offset, len)
    }
}

#[test]
fn a_failing_destination_fails_the_job_not_the_guest() {
    let runner = JobRunner::new().unwrap();
    let initial = common::initial(SIZE, 9);
    let src = common::mem_disk(&initial);
    let dest = Arc::new(Failing {
        inner: common::mem_disk(&vec![0; SIZE as usize]),
        left: std::sync::atomic::AtomicI64::new(20),
    });
    let live = LiveDisk::new(src.clone());
    let guests = common::start(&live, Model::new(initial, 0), 3, 9, true);
    let h = runner
        .start(
            &live,
            Job::convert(dest).options(JobOptions {
                chunk: 64 << 10,
                rate: 64 << 20,
                ..JobOptions::default()
            }),
        )
        .unwrap();
    let e = h.wait_blocking().unwrap_err();
    assert!(
        matches!(
            e,
            JobError::Destination {
                op: "write" | "zero",
                ..
            }
        ),
        "{e}"
    );
    assert!(!live.job_running());
    assert_eq!(live.generation(), 0);
    guests.run_for_ops(300);
    let (model, counts) = guests.stop();
    assert_eq!(counts.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(
        counts.mismatches.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(common::mismatches(&*src, 0, &model.cur), 0);
}
