//! 4 KiB random reads through an 8-deep differencing chain vs the same reads on one flattened
//! image (the target: at least 0.8x). Both are dynamic VHDX (and VHD) on real files with every
//! block of the flattened image allocated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use vdisk::block_io::{BlockDevice, FileStorage, OpenOptions as IoOpen};
use vdisk::chain::{Disk, OpenOptions};

const SIZE: u64 = 256 << 20;
const DEPTH: usize = 8;

fn create(vhdx: bool, path: &Path, parent: Option<&Path>) {
    let s = FileStorage::create(path).unwrap();
    match (vhdx, parent) {
        (true, None) => drop(
            vdisk::vhdx_format::create(s, &vdisk::vhdx_format::CreateOptions::dynamic(SIZE))
                .unwrap(),
        ),
        (true, Some(p)) => {
            let ps = FileStorage::open(p, &IoOpen::new().read_only(true)).unwrap();
            let dwg = vdisk::vhdx_format::VhdxFile::open(ps, true)
                .unwrap()
                .details()
                .data_write_guid;
            let pref = vdisk::vhdx_format::ParentRef {
                data_write_guid: dwg,
                relative_path: p.file_name().unwrap().to_string_lossy().into_owned(),
                absolute_path: None,
            };
            drop(
                vdisk::vhdx_format::create(
                    s,
                    &vdisk::vhdx_format::CreateOptions::differencing(SIZE, pref),
                )
                .unwrap(),
            );
        }
        (false, None) => {
            let o =
                vdisk::vhd_format::CreateOptions::new(SIZE, vdisk::vhd_format::Subformat::Dynamic);
            drop(vdisk::vhd_format::VhdFile::create(s, &o).unwrap());
        }
        (false, Some(p)) => {
            let ps = FileStorage::open(p, &IoOpen::new().read_only(true)).unwrap();
            let d = vdisk::vhd_format::VhdFile::open(ps, true)
                .unwrap()
                .details()
                .unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let o = vdisk::vhd_format::DifferencingOptions::for_parent(
                &d,
                name.clone(),
                None,
                Some(name),
            );
            drop(vdisk::vhd_format::VhdFile::create_differencing(s, &o).unwrap());
        }
    }
}

/// An 8-deep chain where each layer owns a share of the disk (written in 64 KiB pieces, so
/// every block is partly present in several layers), and a flattened copy.
fn build(dir: &Path, vhdx: bool) -> (PathBuf, PathBuf) {
    let ext = if vhdx { "vhdx" } else { "vhd" };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut prev: Option<PathBuf> = None;
    for level in 0..DEPTH {
        let p = dir.join(format!("l{level}.{ext}"));
        create(vhdx, &p, prev.as_deref());
        let disk = Disk::open(&p, &OpenOptions::new()).unwrap();
        let piece = vec![level as u8 + 1; 64 << 10];
        for _ in 0..(SIZE / (64 << 10)) / DEPTH as u64 {
            let off = rng.random_range(0..SIZE / (64 << 10)) * (64 << 10);
            disk.write_at(&piece, off).unwrap();
        }
        disk.flush().unwrap();
        prev = Some(p);
    }
    let top = prev.unwrap();
    let flat = dir.join(format!("flat.{ext}"));
    create(vhdx, &flat, None);
    let src = Disk::open(&top, &OpenOptions::new().read_only(true)).unwrap();
    let dst = Disk::open(&flat, &OpenOptions::new()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..SIZE >> 20 {
        src.read_at(&mut buf, i << 20).unwrap();
        // Allocate every block so the flattened image reads from data, never holes.
        buf[0] |= 0x80;
        dst.write_at(&buf, i << 20).unwrap();
    }
    dst.flush().unwrap();
    (top, flat)
}

fn bench(c: &mut Criterion) {
    for vhdx in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (top, flat) = build(dir.path(), vhdx);
        let name = if vhdx { "chain8_vhdx" } else { "chain8_vhd" };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(4096));
        for (label, path) in [("chain", &top), ("flat", &flat)] {
            let disk = Disk::open(path, &OpenOptions::new().read_only(true)).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let mut buf = vec![0u8; 4096];
            g.bench_function(BenchmarkId::new("read_4k_random", label), |b| {
                b.iter(|| {
                    let off = rng.random_range(0..SIZE / 4096) * 4096;
                    disk.read_at(&mut buf, off).unwrap();
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
