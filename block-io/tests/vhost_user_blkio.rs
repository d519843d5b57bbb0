//! libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate, which QEMU's `blkio` block
//! driver is built on) against our vhost-user-blk backend: connection and protocol feature
//! negotiation (libblkio insists on REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS, and gives the
//! backend every buffer with ADD_MEM_REG, never SET_MEM_TABLE), then every request type at a
//! queue depth above one, on two queues, over a memory-backed and a file-backed disk; and
//! random I/O checked against an in-memory model, with buffer regions mapped and unmapped
//! between rounds.
#![cfg(feature = "vhost-user")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vhost_user_util;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use block_io::{BlockDevice, FileStorage, MemStorage, OpenOptions, RawDisk, Storage};
use rand::{Rng, SeedableRng};
use vhost_user_util::{pattern, Served};

const DRIVER: &str = "virtio-blk-vhost-user";
const EIO: i32 = 5;

fn mem_disk(len: u64) -> Arc<dyn BlockDevice> {
    let m = MemStorage::new();
    m.set_len(len).unwrap();
    Arc::new(RawDisk::new(m).unwrap())
}

fn file_disk(path: &Path, len: u64) -> Arc<dyn BlockDevice> {
    let s = FileStorage::open(path, &OpenOptions::new().create(true)).unwrap();
    s.set_len(len).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}

/// A buffer memory region libblkio allocated (a memfd) and mapped into the backend.
struct Buf(MemoryRegion);

impl Buf {
    fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.0.len, "{off}+{len} beyond the region");
        (self.0.addr + off) as *mut u8
    }

    /// Copies `data` into the region at `off`; no request in flight may touch those bytes.
    fn fill(&self, off: usize, data: &[u8]) {
        let p = self.ptr(off, data.len());
        // SAFETY: `p..p+len` lies in the region's live shared mapping (checked by `ptr`), and no
        // request in flight uses these bytes, so nothing writes them concurrently.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// The region's bytes at `off`; no request in flight may touch them.
    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        let p = self.ptr(off, len);
        let mut v = vec![0u8; len];
        // SAFETY: as in `fill`; the backend finished writing these bytes before it completed the
        // request (the used ring update is a release, the completion read an acquire).
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }
}

/// A started libblkio instance connected to our backend, with one mapped buffer region.
struct Blk {
    // Declared first so the queues drop before the instance that owns the connection.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    buf: Buf,
}

/// Connects the way QEMU's blkio driver does: path, connect, queue setup, start, buffer region.
fn open(path: &Path, num_queues: i32, queue_size: i32, buf_len: usize) -> Blk {
    let mut b = Blkio::new(DRIVER).unwrap();
    b.set_str("path", path.to_str().unwrap()).unwrap();
    if let Err(e) = b.connect() {
        panic!("libblkio cannot connect: {e} ({})", e.errno());
    }
    b.set_i32("num-queues", num_queues).unwrap();
    b.set_i32("queue-size", queue_size).unwrap();
    let started = b.start().unwrap();
    let region = b.alloc_mem_region(buf_len).unwrap();
    b.map_mem_region(&region).unwrap();
    Blk {
        queues: started.queues,
        blkio: b,
        buf: Buf(region),
    }
}

/// Runs the queue until `n` requests have completed: (user_data, ret) in completion order.
fn complete(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::with_capacity(n);
    let mut slots: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let want = n - out.len();
        let mut timeout = Duration::from_secs(30);
        let got = q
            .do_io(&mut slots[..want], want, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io: {e}"));
        for s in &slots[..got] {
            // SAFETY: do_io initialised the first `got` slots.
            let c = unsafe { s.assume_init_read() };
            out.push((c.user_data, c.ret));
        }
    }
    out
}

/// Completes `n` requests and asserts that each succeeded.
fn complete_ok(q: &mut Blkioq, n: usize) {
    for (id, ret) in complete(q, n) {
        assert_eq!(ret, 0, "request {id} failed");
    }
}

/// One request type after another at queue depth 32, on two queues at once.
fn conformance(dev: Arc<dyn BlockDevice>, size: u64) {
    const CHUNK: usize = 64 << 10;
    const DEPTH: usize = 32;
    let s = Served::start(dev, 2);
    let mut blk = open(&s.path, 2, 64, 8 << 20);

    assert_eq!(blk.blkio.get_u64("capacity").unwrap(), size);
    assert_eq!(blk.blkio.get_i32("request-alignment").unwrap(), 512);
    assert!(!blk.blkio.get_bool("read-only").unwrap());
    let max_discard = blk.blkio.get_u64("max-discard-len").unwrap();
    let max_zeroes = blk.blkio.get_u64("max-write-zeroes-len").unwrap();
    assert!(max_discard >= 1 << 20 && max_zeroes >= 1 << 20);
    assert!(blk.blkio.get_u64("max-mem-regions").unwrap() >= 2);

    // 32 writes in flight on queue 0, each 64 KiB at a 128 KiB stride.
    let data: Vec<Vec<u8>> = (0..DEPTH).map(|i| pattern(CHUNK, 100 + i as u64)).collect();
    let at = |i: usize| (i * 2 * CHUNK) as u64;
    for (i, d) in data.iter().enumerate() {
        blk.buf.fill(i * CHUNK, d);
    }
    let (q0, rest) = blk.queues.split_at_mut(1);
    let (q0, q1) = (&mut q0[0], &mut rest[0]);
    for i in 0..DEPTH {
        q0.write(
            at(i),
            blk.buf.ptr(i * CHUNK, CHUNK),
            CHUNK,
            i,
            ReqFlags::empty(),
        );
    }
    let done = complete(q0, DEPTH);
    let mut ids: Vec<usize> = done.iter().map(|&(id, _)| id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..DEPTH).collect::<Vec<_>>());
    assert!(done.iter().all(|&(_, ret)| ret == 0), "{done:?}");

    // 32 reads in flight on queue 0 while queue 1 reads the same data scattered over three
    // buffers each (readv).
    let rbase = DEPTH * CHUNK;
    for i in 0..DEPTH {
        q0.read(
            at(i),
            blk.buf.ptr(rbase + i * CHUNK, CHUNK),
            CHUNK,
            i,
            ReqFlags::empty(),
        );
    }
    let vbase = 2 * DEPTH * CHUNK;
    let pieces = [512usize, 3584, CHUNK - 4096];
    let iovs: Vec<[libc::iovec; 3]> = (0..8)
        .map(|i| {
            let mut off = vbase + i * (CHUNK + 4096);
            pieces.map(|len| {
                let v = libc::iovec {
                    iov_base: blk.buf.ptr(off, len).cast(),
                    iov_len: len,
                };
                off += len + 512; // a gap between the pieces
                v
            })
        })
        .collect();
    for (i, iov) in iovs.iter().enumerate() {
        q1.readv(at(i), iov.as_ptr(), 3, 1000 + i, ReqFlags::empty());
    }
    complete_ok(q1, iovs.len());
    complete_ok(q0, DEPTH);
    for (i, d) in data.iter().enumerate() {
        assert!(blk.buf.bytes(rbase + i * CHUNK, CHUNK) == *d, "read {i}");
    }
    for (i, iov) in iovs.iter().enumerate() {
        let got: Vec<u8> = iov
            .iter()
            .flat_map(|v| {
                let off = v.iov_base as usize - blk.buf.0.addr;
                blk.buf.bytes(off, v.iov_len)
            })
            .collect();
        assert!(got == data[i], "readv {i}");
    }

    // writev from three pieces, then flush, FUA write, write-zeroes (unmap allowed and not) and
    // discard, all in flight together on queue 1 over disjoint ranges.
    let v = &iovs[0];
    let new0 = pattern(CHUNK, 7);
    let mut pos = 0;
    for p in v {
        blk.buf.fill(
            p.iov_base as usize - blk.buf.0.addr,
            &new0[pos..pos + p.iov_len],
        );
        pos += p.iov_len;
    }
    q1.writev(at(0), v.as_ptr(), 3, 0, ReqFlags::empty());
    let fua = pattern(CHUNK, 8);
    blk.buf.fill(0, &fua);
    q1.write(at(1), blk.buf.ptr(0, CHUNK), CHUNK, 1, ReqFlags::FUA);
    q1.write_zeroes(at(2), CHUNK as u64, 2, ReqFlags::empty());
    q1.write_zeroes(at(3) + 512, 4096, 3, ReqFlags::NO_UNMAP);
    q1.discard(at(4), CHUNK as u64, 4, ReqFlags::empty());
    q1.flush(5, ReqFlags::empty());
    complete_ok(q1, 6);
    q1.flush(6, ReqFlags::empty());
    complete_ok(q1, 1);

    let mut expect: Vec<Vec<u8>> = data.clone();
    expect[0] = new0;
    expect[1] = fua;
    expect[2] = vec![0; CHUNK];
    expect[3][512..512 + 4096].fill(0);
    for i in 0..8 {
        q0.read(
            at(i),
            blk.buf.ptr(rbase + i * CHUNK, CHUNK),
            CHUNK,
            i,
            ReqFlags::empty(),
        );
    }
    complete_ok(q0, 8);
    for (i, e) in expect.iter().enumerate().take(8) {
        // The discarded range may read as anything (virtio 1.2, 5.2.6.2).
        if i != 4 {
            assert!(
                blk.buf.bytes(rbase + i * CHUNK, CHUNK) == *e,
                "after update {i}"
            );
        }
    }

    // A read crossing the end of the disk fails with EIO and the queue goes on.
    q0.read(
        size - 512,
        blk.buf.ptr(0, 4096),
        4096,
        77,
        ReqFlags::empty(),
    );
    q0.read(
        at(5),
        blk.buf.ptr(rbase, CHUNK),
        CHUNK,
        78,
        ReqFlags::empty(),
    );
    let mut done = complete(q0, 2);
    done.sort_unstable();
    assert_eq!(done, vec![(77, -EIO), (78, 0)]);
    assert!(blk.buf.bytes(rbase, CHUNK) == data[5]);

    drop(blk);
    assert_eq!(s.stop(), 1);
}

#[test]
fn blkio_connects_and_serves_every_request_type_mem_disk() {
    let size = 32 << 20;
    conformance(mem_disk(size), size);
}

#[test]
fn blkio_connects_and_serves_every_request_type_file_disk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 << 20;
    conformance(file_disk(&dir.path().join("disk.raw"), size), size);
}

/// One request of a model round.
enum Op {
    Write,
    Read,
    Zeroes,
    Discard,
    Flush,
}

/// Random writes, reads, write-zeroes, discards and flushes through libblkio, up to 48 in
/// flight on a 32-entry queue (libblkio holds back what does not fit), every read compared
/// with an in-memory model; every few rounds a second buffer region is mapped (ADD_MEM_REG)
/// and later unmapped (REM_MEM_REG), and requests use it in between.
#[test]
fn blkio_random_io_matches_model() {
    const SIZE: u64 = 8 << 20;
    const MAX_LEN: usize = 64 << 10;
    const MAX_DEPTH: usize = 48;
    let s = Served::start(mem_disk(SIZE), 1);
    let mut blk = open(&s.path, 1, 32, MAX_DEPTH * MAX_LEN);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed_b1c0);
    let mut extra: Option<Buf> = None;
    let mut extra_used = 0;
    let sectors = SIZE / 512;

    for round in 0..300 {
        // Map a second region now and then, use it for a few rounds, unmap it.
        if round % 20 == 5 {
            let r = blk.blkio.alloc_mem_region(MAX_DEPTH * MAX_LEN).unwrap();
            blk.blkio.map_mem_region(&r).unwrap();
            extra = Some(Buf(r));
        } else if round % 20 == 15 {
            if let Some(Buf(r)) = extra.take() {
                blk.blkio.unmap_mem_region(&r);
                blk.blkio.free_mem_region(&r);
            }
        }
        let depth = rng.random_range(1..=MAX_DEPTH);
        let mut taken: Vec<(u64, u64)> = Vec::new();
        // Reads in flight: slot -> (in the extra region?, disk offset, length).
        let mut reads: HashMap<usize, (bool, u64, usize)> = HashMap::new();
        let mut n = 0;
        let q = &mut blk.queues[0];
        for slot in 0..depth {
            let len = 512 * rng.random_range(1..=(MAX_LEN / 512) as u64);
            let off = 512 * rng.random_range(0..=sectors - len / 512);
            // Requests in flight together never overlap: their order is not defined.
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            let in_extra = extra.is_some() && rng.random_bool(0.5);
            let buf = match &extra {
                Some(e) if in_extra => e,
                _ => &blk.buf,
            };
            extra_used += usize::from(in_extra);
            let boff = slot * MAX_LEN;
            let (o, l) = (off as usize, len as usize);
            let op = match rng.random_range(0..100) {
                0..45 => Op::Write,
                45..80 => Op::Read,
                80..90 => Op::Zeroes,
                90..95 => Op::Discard,
                _ => Op::Flush,
            };
            match op {
                Op::Write => {
                    let d: Vec<u8> = (0..l).map(|_| rng.random()).collect();
                    buf.fill(boff, &d);
                    model[o..o + l].copy_from_slice(&d);
                    q.write(off, buf.ptr(boff, l), l, slot, ReqFlags::empty());
                }
                Op::Read => {
                    buf.fill(boff, &vec![0xa5; l]);
                    reads.insert(slot, (in_extra, off, l));
                    q.read(off, buf.ptr(boff, l), l, slot, ReqFlags::empty());
                }
                Op::Zeroes => {
                    model[o..o + l].fill(0);
                    let flags = if rng.random_bool(0.5) {
                        ReqFlags::NO_UNMAP
                    } else {
                        ReqFlags::empty()
                    };
                    q.write_zeroes(off, len, slot, flags);
                }
                Op::Discard => {
                    // Our raw disks read a discarded range as zeros.
                    model[o..o + l].fill(0);
                    q.discard(off, len, slot, ReqFlags::empty());
                }
                Op::Flush => q.flush(slot, ReqFlags::empty()),
            }
            taken.push((off, len));
            n += 1;
        }
        for (slot, ret) in complete(q, n) {
            assert_eq!(ret, 0, "round {round} request {slot}");
            if let Some((in_extra, off, l)) = reads.remove(&slot) {
                let buf = match &extra {
                    Some(e) if in_extra => e,
                    _ => &blk.buf,
                };
                let o = off as usize;
                assert!(
                    buf.bytes(slot * MAX_LEN, l) == model[o..o + l],
                    "round {round}: read of {l} bytes at {off} differs from the model"
                );
            }
        }
        assert!(reads.is_empty());
    }
    assert!(extra_used > 0);

    // The whole disk, read back at depth 16, equals the model.
    let q = &mut blk.queues[0];
    for base in (0..SIZE as usize).step_by(16 * MAX_LEN) {
        for i in 0..16 {
            let off = (base + i * MAX_LEN) as u64;
            q.read(
                off,
                blk.buf.ptr(i * MAX_LEN, MAX_LEN),
                MAX_LEN,
                i,
                ReqFlags::empty(),
            );
        }
        complete_ok(q, 16);
        assert!(blk.buf.bytes(0, 16 * MAX_LEN) == model[base..base + 16 * MAX_LEN]);
    }
    drop(blk);
    assert_eq!(s.stop(), 1);
}
