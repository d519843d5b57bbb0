//! block-io baselines: `RawDisk` on a real file, 4 KiB random and 1 MiB sequential I/O.
//! Format benches compare against these figures in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use vdisk::block_io::{BlockDevice, FileStorage, RawDisk, Storage};

const SIZE: u64 = 256 << 20;

fn raw_file(dir: &std::path::Path) -> RawDisk<FileStorage> {
    let path = dir.join("bench.raw");
    let s = FileStorage::create(&path).unwrap();
    // Allocate every block so reads and overwrites measure steady state.
    let chunk = vec![0x5Au8; 1 << 20];
    for i in 0..SIZE >> 20 {
        s.write_at(&chunk, i << 20).unwrap();
    }
    s.sync_data().unwrap();
    RawDisk::new(s).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let disk = raw_file(dir.path());
    let mut g = c.benchmark_group("raw");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut buf4k = vec![0u8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function(BenchmarkId::new("read_4k_random", "file"), |b| {
        b.iter(|| {
            let off = rng.random_range(0..SIZE / 4096) * 4096;
            disk.read_at(&mut buf4k, off).unwrap();
        })
    });
    g.bench_function(BenchmarkId::new("write_4k_random", "file"), |b| {
        b.iter(|| {
            let off = rng.random_range(0..SIZE / 4096) * 4096;
            disk.write_at(&buf4k, off).unwrap();
        })
    });
    let mut buf1m = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function(BenchmarkId::new("read_1m_seq", "file"), |b| {
        b.iter(|| {
            disk.read_at(&mut buf1m, pos).unwrap();
            pos = (pos + (1 << 20)) % SIZE;
        })
    });
    g.bench_function(BenchmarkId::new("write_1m_seq", "file"), |b| {
        b.iter(|| {
            disk.write_at(&buf1m, pos).unwrap();
            pos = (pos + (1 << 20)) % SIZE;
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
