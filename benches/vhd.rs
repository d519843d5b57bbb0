//! Allocated dynamic VHD vs `RawDisk` on real files: 4 KiB random and 1 MiB sequential reads
//! and overwrites. Every VHD block is allocated first, so the figures are the steady-state
//! cost of the format layer (BAT lookup + one positional I/O per block piece).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use vdisk::block_io::{BlockDevice, FileStorage, RawDisk, Storage};
use vdisk::vhd_format::{CreateOptions, Subformat, VhdFile};

const SIZE: u64 = 256 << 20;

fn fill(dev: &dyn BlockDevice) {
    let chunk = vec![0x5Au8; 1 << 20];
    for i in 0..SIZE >> 20 {
        dev.write_at(&chunk, i << 20).unwrap();
    }
    dev.flush().unwrap();
}

fn raw_disk(dir: &std::path::Path) -> RawDisk<FileStorage> {
    let s = FileStorage::create(dir.join("bench.raw")).unwrap();
    s.set_len(SIZE).unwrap();
    let d = RawDisk::new(s).unwrap();
    fill(&d);
    d
}

fn vhd_disk(dir: &std::path::Path) -> VhdFile<FileStorage> {
    let s = FileStorage::create(dir.join("bench.vhd")).unwrap();
    let d = VhdFile::create(s, &CreateOptions::new(SIZE, Subformat::Dynamic)).unwrap();
    fill(&d);
    d
}

fn run(c: &mut Criterion, name: &str, disk: &dyn BlockDevice) {
    let mut g = c.benchmark_group(name);
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

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path());
    run(c, "raw", &raw);
    drop(raw);
    let vhd = vhd_disk(dir.path());
    run(c, "vhd_dynamic", &vhd);
}

criterion_group!(benches, bench);
criterion_main!(benches);
