//! Throughput of the NBD client next to qemu's own NBD client (`qemu-img bench`) on the same
//! servers in one run: 4 KiB reads with 16 in flight and 1 MiB sequential reads, over
//! loopback against our server, qemu-nbd and nbdkit. A measurement, not a check:
//! `cargo test --release -p block-io --features nbd --test nbd_client_bench -- --ignored --nocapture`.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod nbd_client_util;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use block_io::nbd::NbdClient;
use block_io::{BlockDevice, FileStorage, RawDisk, Storage};
use nbd_client_util::{free_port, oracle, pattern, quick_opts, Listen, Ours, Proc};

const SIZE: u64 = 256 << 20;

/// 4 KiB reads, sequential within each of 16 threads' slices: ops/s.
fn ours_4k(c: &NbdClient, ops: u64) -> f64 {
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (c, done) = (c, &done);
            s.spawn(move || {
                let mut b = vec![0u8; 4096];
                let slice = SIZE / 16;
                for i in 0..ops / 16 {
                    c.read_at(&mut b, t * slice + (i * 4096) % slice).unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// 1 MiB sequential reads from one thread: MiB/s.
fn ours_1m(c: &NbdClient) -> f64 {
    let mut b = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    for i in 0..SIZE >> 20 {
        c.read_at(&mut b, i << 20).unwrap();
    }
    (SIZE >> 20) as f64 / t0.elapsed().as_secs_f64()
}

/// `qemu-img bench` on `url` (raw, reads): seconds for `count` requests (process start
/// included, a few milliseconds).
fn qemu_bench(url: &str, count: u64, depth: u32, size: &str) -> f64 {
    let t0 = Instant::now();
    let out = std::process::Command::new("qemu-img")
        .args([
            "bench",
            "-f",
            "raw",
            "-c",
            &count.to_string(),
            "-d",
            &depth.to_string(),
        ])
        .args(["-s", size, url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed().as_secs_f64()
}

/// Best of three runs of each, alternating ours and qemu's (the host is shared and noisy).
fn compare(who: &str, url: &str) {
    let c = NbdClient::open(url, quick_opts()).unwrap();
    let ops = 64_000;
    // Warm up the page cache and the connection.
    ours_1m(&c);
    let qemu = oracle("qemu-img");
    let (mut ours4, mut ours1, mut q4, mut q1) = (0f64, 0f64, 0f64, 0f64);
    for _ in 0..3 {
        ours4 = ours4.max(ours_4k(&c, ops));
        ours1 = ours1.max(ours_1m(&c));
        if qemu {
            q4 = q4.max(ops as f64 / qemu_bench(url, ops, 16, "4k"));
            q1 = q1.max((SIZE >> 20) as f64 / qemu_bench(url, SIZE >> 20, 1, "1M"));
        }
    }
    eprintln!(
        "{who:>10}: 4 KiB QD16 ours {ours4:>8.0} ops/s, qemu-img bench {q4:>8.0} ops/s ({:.2}x); \
         1 MiB seq ours {ours1:>6.0} MiB/s, qemu-img bench {q1:>6.0} MiB/s ({:.2}x)",
        ours4 / q4,
        ours1 / q1
    );
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture in release"]
fn nbd_client_throughput_next_to_qemu_img_bench() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    std::fs::write(&f, pattern(0, SIZE as usize, 1)).unwrap();
    {
        let d =
            RawDisk::new(FileStorage::open(&f, &block_io::OpenOptions::new()).unwrap()).unwrap();
        assert_eq!(d.storage().len().unwrap(), SIZE);
        let srv = Ours::start(std::sync::Arc::new(d));
        compare("ours", &srv.url());
    }
    if oracle("qemu-nbd") {
        let p = Proc::qemu_nbd(&f, "raw", Listen::Tcp(free_port()), &["-r"]);
        compare("qemu-nbd", &p.url());
    }
    if oracle("nbdkit") {
        let p = Proc::nbdkit(&f, Listen::Tcp(free_port()), &[], &["-r"]);
        compare("nbdkit", &p.url());
    }
}
