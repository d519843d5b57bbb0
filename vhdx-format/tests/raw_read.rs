//! Zero-copy reads (`read_raw_at`) return exactly what `read_at` returns: fully present blocks
//! through the storage's preadv, everything else (zero states, absent blocks, partially
//! present differencing blocks, a log replayed in memory) through the bounce path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use block_io::{BlockDevice, FileStorage, OpenOptions, RawBuf};
use rand::{Rng, SeedableRng};
use vhdx_format::{create, CreateOptions, ParentRef, VhdxFile};

const SIZE: u64 = 24 << 20;

/// Reads `[off, off+len)` with `read_raw_at` into `pieces` separate buffers.
fn raw_read(dev: &dyn BlockDevice, off: u64, len: usize, pieces: usize) -> Vec<u8> {
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut left = len;
    for i in 0..pieces {
        let n = if i + 1 == pieces {
            left
        } else {
            (len / pieces).min(left)
        };
        bufs.push(vec![0xEE; n]);
        left -= n;
    }
    let raw: Vec<RawBuf> = bufs
        .iter_mut()
        .map(|b| RawBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        })
        .collect();
    // SAFETY: every buffer is ours, alive and unaliased for the call.
    unsafe { dev.read_raw_at(&raw, off).unwrap() };
    bufs.concat()
}

fn compare_all(dev: &dyn BlockDevice, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..60 {
        let off = rng.random_range(0..SIZE / 512) * 512;
        let len = (rng.random_range(1..=8192u64) * 512).min(SIZE - off) as usize;
        let pieces = rng.random_range(1..=7);
        let mut want = vec![0u8; len];
        dev.read_at(&mut want, off).unwrap();
        assert!(
            raw_read(dev, off, len, pieces) == want,
            "seed {seed} at {off}+{len}"
        );
    }
}

#[test]
fn raw_reads_equal_reads_on_every_block_state() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhdx");
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = Some(1 << 20);
    let f = create(FileStorage::create(&base).unwrap(), &o).unwrap();
    for (i, off) in [0u64, 3 << 20, 5 << 20, 9 << 20, 20 << 20]
        .iter()
        .enumerate()
    {
        f.write_at(&vec![i as u8 + 1; 3 << 19], *off).unwrap();
    }
    f.write_zeroes(3 << 20, 1 << 20, false).unwrap(); // a ZERO block
    f.discard(9 << 20, 1 << 20).unwrap(); // an UNMAPPED block
    f.flush().unwrap();
    compare_all(&f, 1);
    let dwg = f.details().data_write_guid;
    drop(f);

    // A differencing layer with partially present blocks.
    let child = d.path().join("child.vhdx");
    let mut o = CreateOptions::differencing(
        SIZE,
        ParentRef {
            data_write_guid: dwg,
            relative_path: "base.vhdx".into(),
            absolute_path: None,
        },
    );
    o.block_size = Some(1 << 20);
    let c = create(FileStorage::create(&child).unwrap(), &o).unwrap();
    c.write_at(&vec![0x77; 4096], 512 * 1024).unwrap();
    c.write_at(&vec![0x78; 2 << 20], 6 << 20).unwrap();
    c.flush().unwrap();
    compare_all(&c, 2);
    drop(c);

    // Read-only reopen, as a parent would be.
    let r = VhdxFile::open(
        FileStorage::open(&base, &OpenOptions::new().read_only(true)).unwrap(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    compare_all(&r, 3);
}

#[test]
fn raw_reads_see_a_log_replayed_in_memory() {
    // A qemu image left with a dirty log (from the fuzz seeds): read-only opens replay it in
    // memory, and raw reads must see the replayed state too.
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus/vhdx_open/qemu_dirty_log");
    let bytes = std::fs::read(&seed).unwrap();
    let img = vhdx_format::fuzzing::materialize(&bytes).expect("seed decodes");
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dirty.vhdx");
    std::fs::write(&p, img.to_vec().unwrap()).unwrap();
    let f = VhdxFile::open(
        FileStorage::open(&p, &OpenOptions::new().read_only(true)).unwrap(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    assert!(f.details().log_dirty, "the seed must carry a dirty log");
    let size = f.info().virtual_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for _ in 0..40 {
        let off = rng.random_range(0..size / 512) * 512;
        let len = (rng.random_range(1..=4096u64) * 512).min(size - off) as usize;
        let mut want = vec![0u8; len];
        f.read_at(&mut want, off).unwrap();
        assert!(raw_read(&f, off, len, 3) == want);
    }
}
