//! vhost-user-blk throughput: our backend (`block_io::vhost_user`) against qemu-storage-daemon
//! serving the same image — a raw file, then a dynamic VHDX with every block allocated — driven
//! by the same VM-less frontend in the same run.
//!
//! Workloads: 4 KiB random reads at queue depth 32 and 1 MiB sequential reads at queue depth 8
//! per queue, on 1 and 2 queues (one client thread per queue). The file is fully allocated
//! and in the page cache, so the figures measure the backends, not the disk.
//!
//! `cargo bench --bench vhost_user` (VHOST_BENCH_SECS sets seconds per case, default 2).
//! Prints one line per case and the ratio ours/qsd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdisk::block_io::vhost_user::client::{BenchSpec, Client, ClientOptions};
use vdisk::block_io::vhost_user::{ServerOptions, VhostUserBlkServer};
use vdisk::block_io::{BlockDevice, FileStorage, OpenOptions, RawDisk, Storage};

const SIZE: u64 = 512 << 20;

struct Case {
    name: &'static str,
    block: u32,
    depth: u16,
    random: bool,
}

const CASES: [Case; 2] = [
    Case {
        name: "4k-randread-qd32",
        block: 4096,
        depth: 32,
        random: true,
    },
    Case {
        name: "1m-seqread-qd8",
        block: 1 << 20,
        depth: 8,
        random: false,
    },
];

/// (ops, bytes, seconds) of one case on `queues` queues against the backend at `sock`.
fn run(sock: &Path, queues: u16, case: &Case, secs: f64) -> (u64, u64, f64) {
    let mut c = Client::connect(
        sock,
        &ClientOptions {
            num_queues: queues,
            queue_size: 256,
            data_per_queue: u64::from(case.depth) * (u64::from(case.block) + 4096),
            event_idx: true,
        },
    )
    .unwrap();
    let threads: Vec<_> = (0..queues)
        .map(|i| {
            let mut q = c.take_queue(usize::from(i)).unwrap();
            let spec = BenchSpec {
                block: case.block,
                depth: case.depth,
                random: case.random,
                span: SIZE,
                duration: Duration::from_secs_f64(secs),
                seed: u64::from(i) + 1,
            };
            std::thread::spawn(move || q.bench_reads(&spec).unwrap())
        })
        .collect();
    let mut ops = 0;
    let mut bytes = 0;
    let mut t = 0f64;
    for th in threads {
        let r = th.join().unwrap();
        assert_eq!(r.errors, 0, "read errors");
        ops += r.ops;
        bytes += r.bytes;
        t = t.max(r.elapsed.as_secs_f64());
    }
    drop(c);
    (ops, bytes, t)
}

fn wait_for(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("VHOST_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.2 } else { 2.0 });
    let have_qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have_qsd {
        println!("WARNING: qemu-storage-daemon not found: measuring our backend alone");
    }
    let dir = tempfile::tempdir().unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let raw = dir.path().join("bench.raw");
    {
        let s = FileStorage::create(&raw).unwrap();
        for i in 0..SIZE >> 20 {
            s.write_at(&chunk, i << 20).unwrap();
        }
        s.sync_data().unwrap();
    }
    let vhdx = dir.path().join("bench.vhdx");
    {
        let o = vdisk::vhdx_format::CreateOptions::dynamic(SIZE);
        let f = vdisk::vhdx_format::create(FileStorage::create(&vhdx).unwrap(), &o).unwrap();
        for i in 0..SIZE >> 20 {
            f.write_at(&chunk, i << 20).unwrap();
        }
        f.flush().unwrap();
    }
    println!(
        "vhost-user-blk read benchmark, {} MiB images, {secs} s per case",
        SIZE >> 20
    );
    println!(
        "{:<5} {:<18} {:>2}  {:>12} {:>10}  {:>12} {:>10}  {:>6}",
        "image", "case", "q", "ours IOPS", "ours MB/s", "qsd IOPS", "qsd MB/s", "ratio"
    );
    for (fmt, img) in [("raw", &raw), ("vhdx", &vhdx)] {
        for queues in [1u16, 2] {
            for case in &CASES {
                let storage = FileStorage::open(img, &OpenOptions::new()).unwrap();
                let dev: Arc<dyn BlockDevice> = if fmt == "raw" {
                    Arc::new(RawDisk::new(storage).unwrap())
                } else {
                    Arc::new(
                        vdisk::vhdx_format::VhdxFile::open(
                            storage,
                            &vhdx_format::OpenOptions::new().read_only(false),
                        )
                        .unwrap(),
                    )
                };
                let sock = dir.path().join("ours.sock");
                let mut server = VhostUserBlkServer::bind(
                    &sock,
                    dev,
                    &ServerOptions {
                        num_queues: queues,
                        ..ServerOptions::default()
                    },
                )
                .unwrap();
                let stop = server.stop_handle();
                let th = std::thread::spawn(move || server.serve().unwrap());
                let ours = run(&sock, queues, case, secs);
                stop.stop();
                th.join().unwrap();

                let theirs = have_qsd.then(|| {
                let qsock = dir.path().join("qsd.sock");
                let _ = std::fs::remove_file(&qsock);
                let mut child = Command::new("qemu-storage-daemon")
                    .arg("--blockdev")
                    .arg(format!("driver=file,node-name=f0,filename={}", img.display()))
                    .arg("--blockdev")
                    .arg(format!("driver={fmt},node-name=d0,file=f0"))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},num-queues={queues}",
                        qsock.display()
                    ))
                    .spawn()
                    .unwrap();
                wait_for(&qsock);
                let r = run(&qsock, queues, case, secs);
                let _ = child.kill();
                let _ = child.wait();
                r
            });
                let iops = |r: (u64, u64, f64)| r.0 as f64 / r.2;
                let mbs = |r: (u64, u64, f64)| r.1 as f64 / r.2 / 1e6;
                match theirs {
                    Some(t) => println!(
                        "{:<5} {:<18} {:>2}  {:>12.0} {:>10.1}  {:>12.0} {:>10.1}  {:>6.2}",
                        fmt,
                        case.name,
                        queues,
                        iops(ours),
                        mbs(ours),
                        iops(t),
                        mbs(t),
                        iops(ours) / iops(t)
                    ),
                    None => println!(
                        "{:<5} {:<18} {:>2}  {:>12.0} {:>10.1}  {:>12} {:>10}  {:>6}",
                        fmt,
                        case.name,
                        queues,
                        iops(ours),
                        mbs(ours),
                        "-",
                        "-",
                        "-"
                    ),
                }
            }
        }
    }
}
