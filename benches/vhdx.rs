//! vhdx-format: a dynamic VHDX on a real file. 4 KiB random reads and overwrites of allocated
//! blocks (the lock-free path), 1 MiB sequential reads, and allocating 4 KiB writes into fresh
//! blocks with a flush every 256 writes (the logged metadata path). Compare with `block_io`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use vdisk::block_io::{BlockDevice, FileStorage, OpenOptions};
use vdisk::vhdx_format::{create, CreateOptions, VhdxFile};

const SIZE: u64 = 256 << 20;

fn image(dir: &std::path::Path, name: &str, fill: bool) -> VhdxFile<FileStorage> {
    let path = dir.join(name);
    let s = FileStorage::open(&path, &OpenOptions::new().create(true)).unwrap();
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = Some(8 << 20);
    let f = create(s, &o).unwrap();
    if fill {
        let chunk = vec![0x5Au8; 1 << 20];
        for i in 0..SIZE >> 20 {
            f.write_at(&chunk, i << 20).unwrap();
        }
        f.flush().unwrap();
    }
    f
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "full.vhdx", true);
    let mut g = c.benchmark_group("vhdx");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut buf4k = vec![0u8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function(BenchmarkId::new("read_4k_random", "dynamic"), |b| {
        b.iter(|| {
            let off = rng.random_range(0..SIZE / 4096) * 4096;
            disk.read_at(&mut buf4k, off).unwrap();
        })
    });
    g.bench_function(BenchmarkId::new("write_4k_random", "dynamic"), |b| {
        b.iter(|| {
            let off = rng.random_range(0..SIZE / 4096) * 4096;
            disk.write_at(&buf4k, off).unwrap();
        })
    });
    let mut buf1m = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function(BenchmarkId::new("read_1m_seq", "dynamic"), |b| {
        b.iter(|| {
            disk.read_at(&mut buf1m, pos).unwrap();
            pos = (pos + (1 << 20)) % SIZE;
        })
    });
    // Allocating writes: a fresh image each time the disk is full.
    let mut n = 0u64;
    let mut round = 0u32;
    let mut fresh = image(dir.path(), "alloc0.vhdx", false);
    g.throughput(Throughput::Bytes(4096));
    g.bench_function(BenchmarkId::new("write_4k_allocating", "dynamic"), |b| {
        b.iter(|| {
            // One write per 1 MiB so most writes allocate a new 8 MiB block every 8 writes.
            if n >= SIZE >> 20 {
                round += 1;
                let name = format!("alloc{round}.vhdx");
                drop(std::mem::replace(
                    &mut fresh,
                    image(dir.path(), &name, false),
                ));
                let _ = std::fs::remove_file(dir.path().join(format!("alloc{}.vhdx", round - 1)));
                n = 0;
            }
            fresh.write_at(&buf4k, n << 20).unwrap();
            n += 1;
            if n % 256 == 0 {
                fresh.flush().unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
