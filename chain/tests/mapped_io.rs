//! Mapped I/O through chains: reads and writes run on the I/O engine (`block_io::engine`)
//! from `BlockDevice::map` — VHD and VHDX chains 1 to 4 deep, many requests in flight, on
//! both engine backends — agree byte for byte with the model and with `read_at`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::sync::Arc;

use block_io::engine::{Aio, DeviceQueue, Engine, Started};
use block_io::{BlockDevice, Mapping, RawBuf};
use chain::{Disk, OpenOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn engine(aio: Aio) -> Option<Engine> {
    match Engine::new(aio, 32) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("!!! {aio:?} unavailable ({e}); skipped !!!");
            None
        }
    }
}

/// Runs `reqs` (write?, offset, buffer) on `q` all in flight, returning the results.
fn run_all(q: &mut DeviceQueue<usize>, reqs: &mut [(bool, u64, Vec<u8>)]) {
    let raw: Vec<(bool, u64, RawBuf)> = reqs
        .iter_mut()
        .map(|(write, off, buf)| {
            let b = RawBuf {
                ptr: buf.as_mut_ptr(),
                len: buf.len(),
            };
            (*write, *off, b)
        })
        .collect();
    run_raw(q, &raw);
}

/// Runs `reqs` (write?, offset, memory) on `q` all in flight and checks every result.
fn run_raw(q: &mut DeviceQueue<usize>, reqs: &[(bool, u64, RawBuf)]) {
    let mut done = Vec::new();
    for (i, &(write, off, b)) in reqs.iter().enumerate() {
        // SAFETY: the callers keep the memory alive until this returns, after every request
        // is drained below.
        match unsafe { q.start(write, off, &[b], i) } {
            Started::Queued => {}
            Started::Done(t, r) => done.push((t, r)),
        }
    }
    q.commit().unwrap();
    q.drain(&mut done).unwrap();
    assert_eq!(done.len(), reqs.len());
    for (i, r) in done {
        r.unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
}

/// Reads the whole disk through `q` in random pieces, all in flight.
fn read_through(q: &mut DeviceQueue<usize>, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut reqs = Vec::new();
    let mut off = 0u64;
    while off < SIZE {
        let n = (rng.random_range(1..=256u64) * 512).min(SIZE - off);
        reqs.push((false, off, vec![0xEEu8; n as usize]));
        off += n;
    }
    run_all(q, &mut reqs);
    reqs.into_iter().flat_map(|(_, _, b)| b).collect()
}

fn check(fmt: Fmt, depth: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (paths, models) = build_chain(fmt, dir.path(), depth, seed);
    let mut model = models[depth - 1].clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x55);
    for aio in [Aio::Threads, Aio::IoUring] {
        let Some(e) = engine(aio) else { continue };
        // Read-only: every read maps (formats over files).
        let ro: Arc<dyn BlockDevice> =
            Arc::new(Disk::open(&paths[depth - 1], &OpenOptions::new().read_only(true)).unwrap());
        let mut q = DeviceQueue::new(ro.clone(), e);
        let got = read_through(&mut q, &mut rng);
        assert!(
            got == model,
            "{fmt:?} depth {depth} {aio:?}: mapped reads differ"
        );
        assert_eq!(q.stats().fallback, 0, "{fmt:?} {aio:?}: {:?}", q.stats());
        drop(q);
        drop(ro);
        // Read-write: random writes (some map, allocating ones fall back), then reads.
        let rw: Arc<dyn BlockDevice> =
            Arc::new(Disk::open(&paths[depth - 1], &OpenOptions::new()).unwrap());
        let mut q = DeviceQueue::new(rw.clone(), engine(aio).unwrap());
        for _ in 0..4 {
            // Non-overlapping writes in flight together.
            let slots = 16u64;
            let mut reqs: Vec<(bool, u64, Vec<u8>)> = (0..slots)
                .map(|i| {
                    let span = SIZE / slots;
                    let n = rng.random_range(1..=64u64) * 512;
                    let off = i * span + rng.random_range(0..(span - n) / 512) * 512;
                    let data: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                    model[off as usize..(off + n) as usize].copy_from_slice(&data);
                    (true, off, data)
                })
                .collect();
            run_all(&mut q, &mut reqs);
            let got = read_through(&mut q, &mut rng);
            assert!(got == model, "{fmt:?} depth {depth} {aio:?}: after writes");
        }
        assert!(q.stats().mapped > 0, "{:?}", q.stats());
        drop(q);
        rw.flush().unwrap();
        // The synchronous path agrees.
        assert!(read_all(&*rw) == model);
    }
}

#[test]
fn vhdx_chains_map_and_match_the_model() {
    for depth in 1..=4 {
        check(Fmt::Vhdx, depth, 100 + depth as u64);
    }
}

#[test]
fn vhd_chains_map_and_match_the_model() {
    for depth in 1..=4 {
        check(Fmt::Vhd, depth, 200 + depth as u64);
    }
}

#[test]
fn a_chain_maps_parent_pieces_to_the_parent_file() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(Fmt::Vhdx, dir.path(), 2, 9);
    let disk = Disk::open(&paths[1], &OpenOptions::new().read_only(true)).unwrap();
    let mut out = Vec::new();
    assert!(disk.map(0, SIZE, false, &mut out).unwrap());
    assert_eq!(out.iter().map(|m| m.len()).sum::<u64>(), SIZE);
    assert!(!out.iter().any(|m| matches!(m, Mapping::Parent { .. })));
    // Two files appear: the child's and the parent's.
    let mut fds: Vec<i32> = out
        .iter()
        .filter_map(|m| match m {
            Mapping::File { handle, .. } => Some(handle.fd),
            _ => None,
        })
        .collect();
    fds.sort();
    fds.dedup();
    assert_eq!(fds.len(), 2, "{out:?}");
    // A write to a read-only chain is refused, as write_at refuses it.
    assert!(disk.map(0, 4096, true, &mut Vec::new()).is_err());
}

/// Allocating writes on the engine (`BlockDevice::map_allocating`): 4 KiB-aligned writes
/// into unallocated blocks of a VHDX top, many in flight, several into the same new block at
/// once (one reserves it, the others wait on the synchronous path) and some across two
/// blocks, buffered and `O_DIRECT`, on both engine backends. Each round reads back through the
/// queue as the model says; after a flush the reopened chain reads the same, every layer
/// checks clean, and qemu-img finds no error in a one-layer image.
#[test]
fn allocating_vhdx_writes_run_on_the_engine() {
    for depth in [1, 2] {
        for direct in [false, true] {
            for aio in [Aio::Threads, Aio::IoUring] {
                let Some(e) = engine(aio) else { continue };
                let dir = tempfile::tempdir().unwrap();
                let (paths, models) = build_chain(Fmt::Vhdx, dir.path(), depth, 7 + depth as u64);
                let top = &paths[depth - 1];
                let mut model = models[depth - 1].clone();
                let mut opts = OpenOptions::new();
                opts.direct = direct;
                let rw: Arc<dyn BlockDevice> = Arc::new(Disk::open(top, &opts).unwrap());
                let mut q = DeviceQueue::new(rw.clone(), e);
                let mut rng = ChaCha8Rng::seed_from_u64(depth as u64 * 31 + direct as u64);
                let what = format!("depth {depth} direct {direct} {aio:?}");
                // The first write of a session updates the header: it never maps.
                write_aligned(&mut q, &mut model, &[(0, 4096)], &mut rng);
                for round in 0..6 {
                    // 24 writes: 8 blocks (1 MiB each) hit by 3 writes each, one of them
                    // running into the next block.
                    let mut reqs = Vec::new();
                    for i in 0..8u64 {
                        let block = (round * 8 + i * 3 + 1) % (SIZE >> 20);
                        let base = block << 20;
                        reqs.push((base + 64 * 1024, 8192));
                        reqs.push((base + 512 * 1024, 4096));
                        if base + (1 << 20) < SIZE {
                            reqs.push((base + (1 << 20) - 4096, 12288));
                        }
                    }
                    write_aligned(&mut q, &mut model, &reqs, &mut rng);
                    let got = read_through(&mut q, &mut rng);
                    assert!(
                        got == model,
                        "{what} round {round}: {:?}",
                        first_diff(&got, &model)
                    );
                }
                let stats = q.stats();
                assert!(stats.allocating > 0, "{what}: {stats:?}");
                drop(q);
                rw.flush().unwrap();
                drop(rw);
                let again = Disk::open(top, &OpenOptions::new().read_only(true)).unwrap();
                assert!(read_all(&again) == model, "{what}: after reopening");
                drop(again);
                for p in &paths {
                    let s = block_io::FileStorage::open(
                        p,
                        &block_io::OpenOptions::new().read_only(true),
                    )
                    .unwrap();
                    let f = vhdx_format::VhdxFile::open(
                        s,
                        &vhdx_format::OpenOptions::new().read_only(true),
                    )
                    .unwrap();
                    let c = f.check().unwrap();
                    assert!(
                        c.errors.is_empty(),
                        "{what}: {}: {:?}",
                        p.display(),
                        c.errors
                    );
                }
                // qemu's vhdx driver opens no differencing image: the base only.
                if depth == 1 && block_io::testing::oracle("qemu-img") {
                    let out = std::process::Command::new("qemu-img")
                        .args(["check", "-f", "vhdx"])
                        .arg(top)
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{what}: qemu-img check: {out:?}");
                }
            }
        }
    }
}

/// Writes `(offset, len)` pieces of random bytes from 4 KiB-aligned buffers, all in flight,
/// and records them in `model`.
fn write_aligned(
    q: &mut DeviceQueue<usize>,
    model: &mut [u8],
    reqs: &[(u64, u64)],
    rng: &mut ChaCha8Rng,
) {
    let mut bufs: Vec<block_io::AlignedBuf> = reqs
        .iter()
        .map(|&(off, n)| {
            let mut b = block_io::AlignedBuf::new(n as usize, 4096);
            rng.fill(&mut b[..]);
            model[off as usize..(off + n) as usize].copy_from_slice(&b);
            b
        })
        .collect();
    let raw: Vec<(bool, u64, RawBuf)> = bufs
        .iter_mut()
        .zip(reqs)
        .map(|(b, &(off, _))| {
            let r = RawBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            };
            (true, off, r)
        })
        .collect();
    run_raw(q, &raw);
}
