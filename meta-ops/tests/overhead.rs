//! What a job costs the guest path by itself: 4 KiB random reads and writes from four threads
//! on a raw file through a `LiveDisk`, with no job and with a (paused) job attached. Run by
//! hand: `cargo test --release -p meta-ops --test overhead -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use block_io::BlockDevice;
use meta_ops::{Job, JobOptions, JobRunner, LiveDisk};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Guest requests per second over `secs` seconds.
fn iops(live: &Arc<LiveDisk>, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let size = live.info().virtual_size;
    let th: Vec<_> = (0..4u64)
        .map(|t| {
            let (live, stop, ops) = (live.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut x = t + 1;
                let mut buf = vec![7u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = ((x >> 20) % (size / 4096)) * 4096;
                    if x % 2 == 0 {
                        live.write_at(&buf, off).unwrap();
                    } else {
                        live.read_at(&mut buf, off).unwrap();
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = ops.load(Ordering::Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in th {
        t.join().unwrap();
    }
    n as f64 / dt
}

#[test]
#[ignore]
fn guest_overhead() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    let src = common::raw_file(&dir.path().join("s"), size);
    common::fill(&*src, &vec![1u8; size as usize]);
    let dest = common::raw_file(&dir.path().join("d"), size);
    let live = LiveDisk::new(src);
    let runner = JobRunner::new().unwrap();
    for round in 0..2 {
        let idle = iops(&live, 2.0);
        let h = runner
            .start(
                &live,
                Job::copy(dest.clone()).options(JobOptions {
                    rate: 1,
                    ..JobOptions::default()
                }),
            )
            .unwrap();
        h.pause();
        let paused = iops(&live, 2.0);
        h.cancel();
        let _ = h.wait_blocking();
        eprintln!(
            "round {round}: idle {idle:.0} with paused job {paused:.0} ratio {:.2}",
            paused / idle
        );
    }
}
