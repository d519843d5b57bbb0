//! The vhost-user-blk backend driven by the VM-less frontend: every request type, multi-queue,
//! malformed chains, discard/write-zeroes reaching the image, flush durability, reconnect.
#![cfg(feature = "vhost-user")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vhost_user_util;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use block_io::vhost_user::client::{
    ClientQueue, RawDesc, Request, STATUS_UNSET, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use block_io::vhost_user::config::*;
use block_io::vhost_user::request::*;
use block_io::vhost_user::ServerOptions;
use block_io::{
    BlockDevice, FaultStorage, FileStorage, Injection, MemStorage, OpenOptions, RawDisk,
    RawOptions, Storage,
};
use vhost_user_util::{connect, pattern, Served};
use vm_memory::{Bytes, GuestAddress};

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

#[test]
fn read_write_round_trip_with_and_without_event_idx() {
    let s = Served::start(mem_disk(16 << 20), 1);
    for event_idx in [true, false] {
        let mut c = connect(&s.path, 1, event_idx);
        assert_eq!(c.features() & VIRTIO_RING_F_EVENT_IDX != 0, event_idx);
        let seed = u64::from(event_idx);
        let data = pattern(64 << 10, seed);
        assert_eq!(c.write(8, &data).unwrap(), VIRTIO_BLK_S_OK);
        let (st, back) = c.read(8, 64 << 10).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(back == data);
        // Many small requests in a row: notifications must not be lost.
        for i in 0..200u64 {
            let d = pattern(512, i + seed);
            assert_eq!(c.write(i, &d).unwrap(), VIRTIO_BLK_S_OK);
            assert_eq!(c.read(i, 512).unwrap(), (VIRTIO_BLK_S_OK, d));
        }
    }
    assert_eq!(s.stop(), 2);
}

#[test]
fn config_space_and_features() {
    let s = Served::start(mem_disk(3 << 20), 3);
    let c = connect(&s.path, 2, true);
    let cfg = c.config();
    assert_eq!(cfg.capacity, (3 << 20) / 512);
    assert_eq!(cfg.blk_size, 512);
    assert_eq!(cfg.num_queues, 3);
    assert_eq!(cfg.seg_max, SEG_MAX);
    assert_eq!(cfg.max_discard_sectors, MAX_DISCARD_SECTORS);
    assert_eq!(cfg.max_write_zeroes_sectors, MAX_WRITE_ZEROES_SECTORS);
    assert_eq!((cfg.max_discard_seg, cfg.max_write_zeroes_seg), (1, 1));
    let f = c.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} missing");
    }
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    // One frontend at a time: the next one is served once this one leaves.
    drop(c);
    // Asking for more queues than served fails cleanly.
    assert!(block_io::vhost_user::client::Client::connect(
        &s.path,
        &block_io::vhost_user::client::ClientOptions {
            num_queues: 4,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn four_k_sectors_and_physical_exponent() {
    let m = MemStorage::new();
    m.set_len(1 << 20).unwrap();
    let d: Arc<dyn BlockDevice> =
        Arc::new(RawDisk::open(m, &RawOptions::new().sector_size(4096)).unwrap());
    let s = Served::start(d, 1);
    let mut c = s.client(1);
    assert_eq!(c.config().blk_size, 4096);
    assert_eq!(c.config().discard_sector_alignment, 8);
    // sector 1 is not on a 4 KiB boundary.
    assert_eq!(c.read(1, 4096).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(c.read(8, 4096).unwrap().0, VIRTIO_BLK_S_OK);
    let q = c.queue(0).unwrap();
    assert_eq!(
        q.discard_or_zero(false, 4, 8, 0).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(q.discard_or_zero(false, 8, 8, 0).unwrap(), VIRTIO_BLK_S_OK);
}

#[test]
fn read_only_disk_advertises_ro_and_refuses_writes() {
    let m = MemStorage::from_bytes(&pattern(1 << 20, 9));
    let d: Arc<dyn BlockDevice> =
        Arc::new(RawDisk::open(m, &RawOptions::new().read_only(true)).unwrap());
    let s = Served::start(d, 1);
    let mut c = s.client(1);
    assert_ne!(c.features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(c.features() & VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(c.write(0, &[1; 512]).unwrap(), VIRTIO_BLK_S_IOERR);
    let q = c.queue(0).unwrap();
    assert_eq!(
        q.discard_or_zero(true, 0, 1, 0).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        q.discard_or_zero(false, 0, 1, 0).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(q.flush().unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        q.read(0, 4096).unwrap(),
        (VIRTIO_BLK_S_OK, pattern(4096, 9))
    );
}

#[test]
fn get_id_returns_the_serial() {
    let s = Served::start(mem_disk(1 << 20), 1);
    let mut c = s.client(1);
    let (st, id) = c.queue(0).unwrap().get_id().unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(&id[..6], b"vdisk\0");
    // A short buffer gets a prefix.
    let r = c
        .request(&Request {
            kind: VIRTIO_BLK_T_GET_ID,
            in_len: 3,
            ..Request::default()
        })
        .unwrap();
    assert_eq!(
        (r.status, r.data.as_slice()),
        (VIRTIO_BLK_S_OK, &b"vdi"[..])
    );
}

#[test]
fn unsupported_types_and_bad_ranges() {
    let s = Served::start(mem_disk(1 << 20), 1);
    let mut c = s.client(1);
    let r = c
        .request(&Request {
            kind: 42,
            ..Request::default()
        })
        .unwrap();
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(c.read(2048, 512).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(c.read(2047, 1024).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(c.read(u64::MAX, 512).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(c.write(2047, &[0; 1024]).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(c.read(0, 100).unwrap().0, VIRTIO_BLK_S_IOERR);
    let q = c.queue(0).unwrap();
    assert_eq!(
        q.discard_or_zero(false, 0, 8, 1).unwrap(),
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        q.discard_or_zero(true, 0, 8, 2).unwrap(),
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        q.discard_or_zero(true, 2040, 9, 0).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(c.read(2047, 512).unwrap().0, VIRTIO_BLK_S_OK);
}

#[test]
fn large_scattered_requests() {
    let dir = tempfile::tempdir().unwrap();
    // Memory: the default bounce in 256 KiB pieces; a file: preadv/pwritev into guest memory.
    for dev in [
        mem_disk(16 << 20),
        file_disk(&dir.path().join("disk.raw"), 16 << 20),
    ] {
        large_scattered_requests_on(dev);
    }
}

fn large_scattered_requests_on(dev: Arc<dyn BlockDevice>) {
    let s = Served::start(dev, 1);
    let mut c = block_io::vhost_user::client::Client::connect(
        &s.path,
        &block_io::vhost_user::client::ClientOptions {
            data_per_queue: 12 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    // 3.5 MiB spans several 256 KiB bounce pieces; 16000-byte segments straddle them.
    let data = pattern(3584 << 10, 21);
    let w = c
        .request(&Request {
            kind: VIRTIO_BLK_T_OUT,
            sector: 512,
            out: data.clone(),
            seg: 16000,
            ..Request::default()
        })
        .unwrap();
    assert_eq!(w.status, VIRTIO_BLK_S_OK);
    let r = c
        .request(&Request {
            kind: VIRTIO_BLK_T_IN,
            sector: 512,
            in_len: data.len() as u32,
            seg: 16000,
            ..Request::default()
        })
        .unwrap();
    assert_eq!(r.status, VIRTIO_BLK_S_OK);
    assert_eq!(r.used_len, data.len() as u32 + 1);
    assert!(r.data == data);
}

#[test]
fn multi_queue_concurrent_io() {
    // Four queues on one worker each, on fewer workers (unevenly: 4 on 3), on one.
    for workers in [Some(4), Some(3), Some(1), None] {
        multi_queue_concurrent_io_on(workers);
    }
}

fn multi_queue_concurrent_io_on(workers: Option<u16>) {
    let dev = mem_disk(32 << 20);
    let s = Served::start_opts(
        dev.clone(),
        &ServerOptions {
            num_queues: 4,
            workers,
            ..ServerOptions::default()
        },
    );
    let mut c = s.client(4);
    let queues: Vec<ClientQueue> = (0..4).map(|i| c.take_queue(i).unwrap()).collect();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            std::thread::spawn(move || {
                let base = i as u64 * 16384; // 8 MiB apart, in sectors
                for k in 0..50u64 {
                    let d = pattern(8192, i as u64 * 1000 + k);
                    assert_eq!(q.write(base + k * 16, &d).unwrap(), VIRTIO_BLK_S_OK);
                }
                for k in 0..50u64 {
                    let d = pattern(8192, i as u64 * 1000 + k);
                    assert_eq!(q.read(base + k * 16, 8192).unwrap(), (VIRTIO_BLK_S_OK, d));
                }
                q
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every queue's data reached the device.
    for i in 0..4u64 {
        let mut b = vec![0u8; 8192];
        dev.read_at(&mut b, i * (8 << 20) + 49 * 8192).unwrap();
        assert_eq!(b, pattern(8192, i * 1000 + 49));
    }
}

#[test]
fn discard_and_write_zeroes_free_blocks_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let s = Served::start(file_disk(&path, 8 << 20), 1);
    let mut c = s.client(1);
    let data = pattern(4 << 20, 5);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        assert_eq!(c.write(i as u64 * 2048, chunk).unwrap(), VIRTIO_BLK_S_OK);
    }
    assert_eq!(c.flush().unwrap(), VIRTIO_BLK_S_OK);
    let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let full = blocks(&path);
    assert!(full >= 4 << 20, "allocated {full}");
    let q = c.queue(0).unwrap();
    // Discard the first MiB, write-zeroes with UNMAP the second, without UNMAP the third.
    assert_eq!(
        q.discard_or_zero(false, 0, 2048, 0).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        q.discard_or_zero(true, 2048, 2048, 1).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        q.discard_or_zero(true, 4096, 2048, 0).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let after = blocks(&path);
    assert!(
        after <= full - (2 << 20),
        "2 MiB should have been freed: {full} -> {after}"
    );
    assert!(
        after >= 2 << 20,
        "write-zeroes without UNMAP keeps its blocks: {after}"
    );
    let (st, back) = q.read(0, 4 << 20).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(back[..3 << 20].iter().all(|&b| b == 0));
    assert!(back[3 << 20..] == data[3 << 20..]);
    // The file itself says the same.
    let f = std::fs::read(&path).unwrap();
    assert!(f[..3 << 20].iter().all(|&b| b == 0));
}

#[test]
fn flush_makes_acknowledged_writes_durable() {
    let m = MemStorage::new();
    m.set_len(4 << 20).unwrap();
    let fault = Arc::new(FaultStorage::new(m));
    let dev: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(fault.clone()).unwrap());
    let s = Served::start(dev, 1);
    let mut c = s.client(1);
    let d = pattern(8192, 77);
    assert_eq!(c.write(16, &d).unwrap(), VIRTIO_BLK_S_OK);
    let durable = |f: &FaultStorage| {
        let mut b = vec![0u8; 8192];
        f.durable_image().read_at(&mut b, 16 * 512).unwrap();
        b
    };
    let mut live = vec![0u8; 8192];
    fault.live_image().read_at(&mut live, 16 * 512).unwrap();
    assert_eq!(live, d, "the acknowledged write is in the live image");
    assert_ne!(durable(&fault), d, "not durable before FLUSH");
    assert_eq!(c.flush().unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(durable(&fault), d, "durable after FLUSH");
    assert_eq!(fault.pending_writes(), 0);
}

#[test]
fn device_errors_become_ioerr_and_serving_goes_on() {
    let m = MemStorage::new();
    m.set_len(1 << 20).unwrap();
    let fault = Arc::new(FaultStorage::new(m));
    let dev: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(fault.clone()).unwrap());
    let s = Served::start(dev, 1);
    let mut c = s.client(1);
    fault.inject(Injection::ReadError { nth: 0 });
    assert_eq!(c.read(0, 512).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(c.read(0, 512).unwrap().0, VIRTIO_BLK_S_OK);
    fault.inject(Injection::SyncError { nth: 0 });
    assert_eq!(c.write(0, &[3; 512]).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(c.flush().unwrap(), VIRTIO_BLK_S_IOERR);
    // The device latched the failure (fail-stop): writes now fail, reads still work.
    assert_eq!(c.write(0, &[4; 512]).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(c.read(0, 512).unwrap(), (VIRTIO_BLK_S_OK, vec![3; 512]));
}

#[test]
fn reconnect_keeps_serving_the_same_disk() {
    let s = Served::start(mem_disk(4 << 20), 2);
    for round in 0..3u64 {
        let mut c = s.client(2);
        if round > 0 {
            let (st, d) = c.queue(1).unwrap().read(round * 8 - 8, 4096).unwrap();
            assert_eq!((st, d), (VIRTIO_BLK_S_OK, pattern(4096, round - 1)));
        }
        assert_eq!(
            c.write(round * 8, &pattern(4096, round)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        // Leave with a request in flight half the time: the backend must cope.
        if round % 2 == 1 {
            let q = c.queue(0).unwrap();
            let (base, _) = q.data_area();
            q.submit(&[
                (base, 16, false),
                (base + 4096, 512, true),
                (base + 64, 1, true),
            ])
            .unwrap();
            q.kick().unwrap();
        }
        c.close();
    }
    assert_eq!(s.stop(), 3);
}

// ---- malformed chains -------------------------------------------------------------------

const OUTSIDE: u64 = 1 << 40;

/// Writes an IN header for `sector` at the queue's data area, returns (header, data, status)
/// addresses.
fn layout(q: &ClientQueue, kind: u32, sector: u64) -> (u64, u64, u64) {
    let (base, _) = q.data_area();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    q.mem().write_slice(&hdr, GuestAddress(base)).unwrap();
    q.mem()
        .write_obj(STATUS_UNSET, GuestAddress(base + 64))
        .unwrap();
    (base, base + 4096, base + 64)
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

const N: u16 = VRING_DESC_F_NEXT;
const W: u16 = VRING_DESC_F_WRITE;

fn status(q: &ClientQueue, at: u64) -> u8 {
    q.mem().read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn malformed_chains_complete_with_ioerr_and_serving_goes_on() {
    let s = Served::start(mem_disk(1 << 20), 1);
    let mut c = s.client(1);
    let q = c.queue(0).unwrap();
    let (h, dt, st) = layout(q, VIRTIO_BLK_T_IN, 0);
    let (mem_end, _) = {
        let (b, l) = q.data_area();
        (b + l, ())
    };
    // (name, table, expected status, expected used length)
    type Case = (&'static str, Vec<RawDesc>, u8, u32);
    let cases: Vec<Case> = vec![
        (
            "header outside memory",
            vec![d(OUTSIDE, 16, N, 1), d(dt, 512, N | W, 2), d(st, 1, W, 0)],
            1,
            513,
        ),
        (
            "data outside memory",
            vec![d(h, 16, N, 1), d(OUTSIDE, 512, N | W, 2), d(st, 1, W, 0)],
            1,
            513,
        ),
        (
            "data straddling the end of memory",
            vec![
                d(h, 16, N, 1),
                d(mem_end - 256, 512, N | W, 2),
                d(st, 1, W, 0),
            ],
            1,
            513,
        ),
        (
            "huge data descriptor",
            vec![d(h, 16, N, 1), d(dt, 0xf000_0000, N | W, 2), d(st, 1, W, 0)],
            1,
            0xf000_0001,
        ),
        (
            "short header",
            vec![d(h, 8, N, 1), d(dt, 512, N | W, 2), d(st, 1, W, 0)],
            1,
            513,
        ),
        (
            "read into a device-readable buffer",
            vec![d(h, 16, N, 1), d(dt, 512, N, 2), d(st, 1, W, 0)],
            1,
            1,
        ),
        (
            "readable after writable",
            vec![
                d(h, 16, N, 1),
                d(dt, 512, N | W, 2),
                d(dt, 512, N, 3),
                d(st, 1, W, 0),
            ],
            1,
            513,
        ),
        (
            "descriptor loop",
            vec![d(h, 16, N, 1), d(st, 1, N | W, 0)],
            1,
            128,
        ),
    ];
    for (name, table, want_status, want_used) in cases {
        q.mem().write_obj(STATUS_UNSET, GuestAddress(st)).unwrap();
        let t: Vec<(u16, RawDesc)> = table
            .into_iter()
            .enumerate()
            .map(|(i, x)| (i as u16, x))
            .collect();
        let done = q.send_raw(&t, 0).unwrap();
        assert_eq!(status(q, st), want_status, "{name}: status");
        assert_eq!(done.len, want_used, "{name}: used length");
        assert_eq!(
            q.read(0, 512).unwrap().0,
            VIRTIO_BLK_S_OK,
            "{name}: still serving"
        );
    }

    // A write whose data is device-writable.
    let (h, dt, st) = layout(q, VIRTIO_BLK_T_OUT, 0);
    let done = q
        .send_raw(
            &[
                (0, d(h, 16, N, 1)),
                (1, d(dt, 512, N | W, 2)),
                (2, d(st, 1, W, 0)),
            ],
            0,
        )
        .unwrap();
    assert_eq!((status(q, st), done.len), (VIRTIO_BLK_S_IOERR, 513));

    // Chains with no room for a status complete with used length 0 and write nothing.
    let (h, dt, st) = layout(q, VIRTIO_BLK_T_IN, 0);
    let no_status: Vec<(&str, Vec<(u16, RawDesc)>)> = vec![
        ("header only", vec![(0, d(h, 16, 0, 0))]),
        (
            "zero-length status",
            vec![(0, d(h, 16, N, 1)), (1, d(st, 0, W, 0))],
        ),
        (
            "status outside memory",
            vec![(0, d(h, 16, N, 1)), (1, d(OUTSIDE, 1, W, 0))],
        ),
        ("next beyond the table", vec![(0, d(h, 16, N, 5000))]),
        (
            "indirect table outside memory",
            vec![(0, d(OUTSIDE, 64, VRING_DESC_F_INDIRECT, 0))],
        ),
        (
            "chain longer than 4 GiB",
            vec![
                (0, d(h, 16, N, 1)),
                (1, d(dt, u32::MAX - 8, N | W, 2)),
                (2, d(st, 1, W, 0)),
            ],
        ),
        (
            "indirect table of odd size",
            vec![(0, d(dt, 20, VRING_DESC_F_INDIRECT, 0))],
        ),
    ];
    for (name, t) in no_status {
        q.mem().write_obj(STATUS_UNSET, GuestAddress(st)).unwrap();
        let done = q.send_raw(&t, 0).unwrap();
        assert_eq!(done.len, 0, "{name}: used length");
        assert_eq!(status(q, st), STATUS_UNSET, "{name}: nothing written");
        assert_eq!(
            q.read(0, 512).unwrap().0,
            VIRTIO_BLK_S_OK,
            "{name}: still serving"
        );
    }

    // A head index beyond the queue cannot be completed; later requests still are.
    q.publish(q.size() + 3).unwrap();
    q.kick().unwrap();
    assert_eq!(q.read(0, 512).unwrap().0, VIRTIO_BLK_S_OK);
}

#[test]
fn a_batch_of_big_scattered_requests() {
    let dir = tempfile::tempdir().unwrap();
    let dev = file_disk(&dir.path().join("disk.raw"), 16 << 20);
    dev.write_at(&pattern(8 << 20, 50), 0).unwrap();
    let s = Served::start(dev.clone(), 1);
    let mut c = block_io::vhost_user::client::Client::connect(
        &s.path,
        &block_io::vhost_user::client::ClientOptions {
            data_per_queue: 12 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let q = c.queue(0).unwrap();
    let (base, _) = q.data_area();
    const SLOT: u64 = (1 << 20) + 4096;
    // Six 1 MiB reads, four 512 KiB writes (in 64 KiB pieces), one kick: one batch.
    let mut heads = Vec::new();
    for i in 0..10u64 {
        let at = base + i * SLOT;
        let read = i < 6;
        let (kind, sector, len) = if read {
            (VIRTIO_BLK_T_IN, i * 2048, 1u32 << 20)
        } else {
            (VIRTIO_BLK_T_OUT, (8 << 11) + i * 1024, 512 << 10)
        };
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        q.mem().write_slice(&hdr, GuestAddress(at)).unwrap();
        q.mem()
            .write_obj(STATUS_UNSET, GuestAddress(at + 64))
            .unwrap();
        let mut bufs = vec![(at, 16u32, false)];
        if read {
            bufs.push((at + 4096, len, true));
        } else {
            q.mem()
                .write_slice(&pattern(len as usize, 60 + i), GuestAddress(at + 4096))
                .unwrap();
            for k in 0..8u64 {
                bufs.push((at + 4096 + k * 65536, 65536, false));
            }
        }
        bufs.push((at + 64, 1, true));
        heads.push(q.submit(&bufs).unwrap());
    }
    q.kick().unwrap();
    let mut done = std::collections::HashMap::new();
    while done.len() < heads.len() {
        for c in q.wait(Duration::from_secs(10)).unwrap() {
            assert!(done.insert(c.id, c.len).is_none(), "completed twice");
        }
    }
    let all = pattern(8 << 20, 50);
    for (i, h) in heads.iter().enumerate() {
        let at = base + i as u64 * SLOT;
        assert_eq!(status(q, at + 64), VIRTIO_BLK_S_OK, "#{i}");
        if i < 6 {
            assert_eq!(done[&u32::from(*h)], (1 << 20) + 1);
            let mut b = vec![0u8; 1 << 20];
            q.mem().read_slice(&mut b, GuestAddress(at + 4096)).unwrap();
            assert!(b[..] == all[i << 20..(i + 1) << 20], "read #{i}");
        } else {
            assert_eq!(done[&u32::from(*h)], 1);
            let mut b = vec![0u8; 512 << 10];
            dev.read_at(&mut b, (8 << 20) + i as u64 * (512 << 10))
                .unwrap();
            assert!(b == pattern(512 << 10, 60 + i as u64), "write #{i}");
        }
    }
    // Still serving, and a stop counts the connection.
    assert_eq!(
        c.read(0, 4096).unwrap(),
        (VIRTIO_BLK_S_OK, all[..4096].to_vec())
    );
    drop(c);
    assert_eq!(s.stop(), 1);
}

/// A batch of reads that complete on the spot (page-cache hits) is notified in parts, not
/// once per request; the entry the driver asked about (EVENT_IDX used event) is notified
/// wherever it falls in the batch, the last part included.
#[test]
fn the_completion_the_driver_asks_about_is_notified_wherever_it_falls_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let dev = file_disk(&dir.path().join("disk.raw"), 1 << 20);
    let all = pattern(1 << 20, 70);
    // Written through the page cache: the reads below are hits and complete inline.
    dev.write_at(&all, 0).unwrap();
    let s = Served::start(dev, 1);
    let mut c = s.client(1);
    let q = c.queue(0).unwrap();
    let (base, _) = q.data_area();
    const SLOT: u64 = 4096 + 64;
    for n in [1u16, 5, 31, 32, 38, 64] {
        for target in [0, n / 2, n - 1] {
            let first = q.used_idx().unwrap();
            q.set_used_event(first.wrapping_add(target)).unwrap();
            // A notification left over from an earlier round must not count.
            q.wait_signal(Duration::ZERO).unwrap();
            for i in 0..u64::from(n) {
                let at = base + i * SLOT;
                let mut hdr = [0u8; 16];
                hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
                hdr[8..16].copy_from_slice(&(i * 8).to_le_bytes());
                q.mem().write_slice(&hdr, GuestAddress(at)).unwrap();
                q.mem()
                    .write_obj(STATUS_UNSET, GuestAddress(at + 4096 + 16))
                    .unwrap();
                q.submit(&[
                    (at, 16, false),
                    (at + 16, 4096, true),
                    (at + 4096 + 16, 1, true),
                ])
                .unwrap();
            }
            q.kick().unwrap();
            assert!(
                q.wait_signal(Duration::from_secs(10)).unwrap() > 0,
                "a batch of {n}: entry {target} was never notified"
            );
            // The notification comes once that entry is in the ring: every entry before it
            // is too, and the rest follow.
            let end = first.wrapping_add(n);
            let t0 = std::time::Instant::now();
            while q.used_idx().unwrap() != end {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "a batch of {n} stalled"
                );
                std::thread::yield_now();
            }
            assert_eq!(q.reap().unwrap().len(), usize::from(n));
            for i in 0..usize::from(n) {
                let at = base + i as u64 * SLOT;
                assert_eq!(status(q, at + 4096 + 16), VIRTIO_BLK_S_OK);
                let mut b = vec![0u8; 4096];
                q.mem().read_slice(&mut b, GuestAddress(at + 16)).unwrap();
                assert!(b[..] == all[i * 4096..(i + 1) * 4096], "read #{i} of {n}");
            }
        }
    }
    drop(c);
    assert_eq!(s.stop(), 1);
}

#[test]
fn zero_copy_with_aliased_and_bad_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let dev = file_disk(&dir.path().join("disk.raw"), 1 << 20);
    let s = Served::start(dev.clone(), 1);
    let mut c = s.client(1);
    let (lo, hi) = (pattern(4096, 40), pattern(4096, 41));
    assert_eq!(c.write(0, &lo).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(c.write(8, &hi).unwrap(), VIRTIO_BLK_S_OK);
    let q = c.queue(0).unwrap();
    let (base, len) = q.data_area();
    let mem_end = base + len;

    // A read whose two data descriptors are the same guest bytes: it completes, and the bytes
    // hold one of the two sectors' data (the device fills them in turn).
    let (h, dt, st) = layout(q, VIRTIO_BLK_T_IN, 0);
    let done = q
        .send_raw(
            &[
                (0, d(h, 16, N, 1)),
                (1, d(dt, 4096, N | W, 2)),
                (2, d(dt, 4096, N | W, 3)),
                (3, d(st, 1, W, 0)),
            ],
            0,
        )
        .unwrap();
    assert_eq!((status(q, st), done.len), (VIRTIO_BLK_S_OK, 8193));
    let mut b = vec![0u8; 4096];
    q.mem().read_slice(&mut b, GuestAddress(dt)).unwrap();
    assert!(b == lo || b == hi);

    // A read whose data overlaps the header and the status byte: the status wins its byte.
    let (h, _, _) = layout(q, VIRTIO_BLK_T_IN, 0);
    let done = q
        .send_raw(&[(0, d(h, 16, N, 1)), (1, d(h, 1025, W, 0))], 0)
        .unwrap();
    assert_eq!((status(q, h + 1024), done.len), (VIRTIO_BLK_S_OK, 1025));
    let mut b = vec![0u8; 1024];
    q.mem().read_slice(&mut b, GuestAddress(h)).unwrap();
    assert_eq!(b[..], lo[..1024]);

    // A write from the same guest bytes twice writes them twice.
    let (h, dt, st) = layout(q, VIRTIO_BLK_T_OUT, 16);
    q.mem()
        .write_slice(&pattern(2048, 42), GuestAddress(dt))
        .unwrap();
    let done = q
        .send_raw(
            &[
                (0, d(h, 16, N, 1)),
                (1, d(dt, 2048, N, 2)),
                (2, d(dt, 2048, N, 3)),
                (3, d(st, 1, W, 0)),
            ],
            0,
        )
        .unwrap();
    assert_eq!((status(q, st), done.len), (VIRTIO_BLK_S_OK, 1));
    let mut back = vec![0u8; 4096];
    dev.read_at(&mut back, 16 * 512).unwrap();
    assert!(back[..2048] == pattern(2048, 42)[..] && back[2048..] == pattern(2048, 42)[..]);

    // Data outside guest memory, or straddling its end, in either direction: IOERR, and the
    // disk is untouched.
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let flags = if kind == VIRTIO_BLK_T_IN { N | W } else { N };
        for addr in [OUTSIDE, mem_end - 256] {
            let (h, _, st) = layout(q, kind, 0);
            let done = q
                .send_raw(
                    &[
                        (0, d(h, 16, N, 1)),
                        (1, d(addr, 512, flags, 2)),
                        (2, d(st, 1, W, 0)),
                    ],
                    0,
                )
                .unwrap();
            assert_eq!(status(q, st), VIRTIO_BLK_S_IOERR, "{kind} {addr:#x}");
            let used = if kind == VIRTIO_BLK_T_IN { 513 } else { 1 };
            assert_eq!(done.len, used);
        }
    }
    let mut back = vec![0u8; 4096];
    dev.read_at(&mut back, 0).unwrap();
    assert!(back == lo, "failed writes left the disk alone");
    // Still serving.
    assert_eq!(c.read(8, 4096).unwrap(), (VIRTIO_BLK_S_OK, hi));
}

#[test]
fn unusual_but_valid_layouts_work() {
    let s = Served::start(mem_disk(1 << 20), 1);
    let mut c = s.client(1);
    assert_eq!(c.write(0, &pattern(1024, 8)).unwrap(), VIRTIO_BLK_S_OK);
    let q = c.queue(0).unwrap();
    let (h, dt, st) = layout(q, VIRTIO_BLK_T_IN, 0);
    // Header split in two, data and status in one descriptor.
    q.send_raw(
        &[
            (0, d(h, 7, N, 1)),
            (1, d(h + 7, 9, N, 2)),
            (2, d(dt, 1025, W, 0)),
        ],
        0,
    )
    .unwrap();
    assert_eq!(
        q.mem().read_obj::<u8>(GuestAddress(dt + 1024)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut b = vec![0u8; 1024];
    q.mem().read_slice(&mut b, GuestAddress(dt)).unwrap();
    assert_eq!(b, pattern(1024, 8));
    // An indirect table: header, data, status.
    let table = dt + 8192;
    let entries = [d(h, 16, N, 1), d(dt, 512, N | W, 2), d(st, 1, W, 0)];
    for (i, e) in entries.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&e.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&e.len.to_le_bytes());
        raw[12..14].copy_from_slice(&e.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&e.next.to_le_bytes());
        q.mem()
            .write_slice(&raw, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    q.mem().write_obj(STATUS_UNSET, GuestAddress(st)).unwrap();
    let done = q
        .send_raw(&[(0, d(table, 48, VRING_DESC_F_INDIRECT, 0))], 0)
        .unwrap();
    assert_eq!((status(q, st), done.len), (VIRTIO_BLK_S_OK, 513));
}

#[test]
fn stop_while_a_frontend_is_connected() {
    let s = Served::start(mem_disk(1 << 20), 2);
    let mut c = s.client(2);
    assert_eq!(c.write(0, &[9; 512]).unwrap(), VIRTIO_BLK_S_OK);
    // A request left in flight on queue 1, and the frontend still connected.
    let q = c.queue(1).unwrap();
    let (base, _) = q.data_area();
    q.submit(&[
        (base, 16, false),
        (base + 4096, 512, true),
        (base + 64, 1, true),
    ])
    .unwrap();
    q.kick().unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(s.stop(), 1);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The session is gone: the client's next request fails instead of hanging.
    assert!(c.flush().is_err());
}

#[test]
fn a_frontend_speaking_garbage_only_ends_its_own_connection() {
    use std::io::Write;
    let s = Served::start(mem_disk(1 << 20), 1);
    {
        let mut raw = std::os::unix::net::UnixStream::connect(&s.path).unwrap();
        // A header announcing a huge request of an unknown type, then garbage.
        raw.write_all(&[0xff; 64]).unwrap();
    }
    {
        // Connect and vanish without a word.
        let _ = std::os::unix::net::UnixStream::connect(&s.path).unwrap();
    }
    let mut c = s.client(1);
    assert_eq!(c.write(0, &[5; 512]).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(c.read(0, 512).unwrap(), (VIRTIO_BLK_S_OK, vec![5; 512]));
    drop(c);
    assert_eq!(s.stop(), 3);
}

#[test]
fn stopping_a_queue_waits_for_the_requests_it_took() {
    let s = Served::start(mem_disk(64 << 20), 1);
    let mut c = block_io::vhost_user::client::Client::connect(
        &s.path,
        &block_io::vhost_user::client::ClientOptions {
            data_per_queue: 40 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut took_some = false;
    for round in 0..5u32 {
        let q = c.queue(0).unwrap();
        let (base, _) = q.data_area();
        // 32 reads of 1 MiB: long enough for GET_VRING_BASE to arrive mid-way.
        for i in 0..32u64 {
            let at = base + i * ((1 << 20) + 4096);
            let mut hdr = [0u8; 16];
            hdr[8..16].copy_from_slice(&(i * 2048).to_le_bytes());
            q.mem().write_slice(&hdr, GuestAddress(at)).unwrap();
            q.submit(&[
                (at, 16, false),
                (at + 4096, 1 << 20, true),
                (at + 64, 1, true),
            ])
            .unwrap();
        }
        q.kick().unwrap();
        // Give the worker 0, 1, 2, 4, 8 ms to get going.
        std::thread::sleep(Duration::from_micros((1u64 << round) / 2 * 1000));
        let taken = c.stop_queue(0).unwrap();
        took_some |= taken > 0;
        let used = c.queue(0).unwrap().used_idx().unwrap();
        assert_eq!(
            u32::from(used),
            taken,
            "round {round}: every request taken from the ring is complete when the base is reported"
        );
        if round < 4 {
            // Start a fresh session for the next round (the stopped ring stays stopped).
            drop(c);
            c = block_io::vhost_user::client::Client::connect(
                &s.path,
                &block_io::vhost_user::client::ClientOptions {
                    data_per_queue: 40 << 20,
                    ..Default::default()
                },
            )
            .unwrap();
        }
    }
    assert!(
        took_some,
        "the worker never got going: the test proved nothing"
    );
}

#[test]
fn an_available_index_beyond_the_ring_stalls_only_that_queue() {
    for event_idx in [true, false] {
        let s = Served::start(mem_disk(1 << 20), 2);
        let mut c = connect(&s.path, 2, event_idx);
        assert_eq!(c.write(0, &[1; 512]).unwrap(), VIRTIO_BLK_S_OK);
        let q = c.queue(0).unwrap();
        // The driver claims size + 5 new entries: more than the ring holds.
        q.publish(0).unwrap();
        let bogus = q.size() + 5;
        q.set_avail_idx(bogus).unwrap();
        q.kick().unwrap();
        // The other queue still serves.
        let q1 = c.queue(1).unwrap();
        assert_eq!(q1.read(0, 512).unwrap(), (VIRTIO_BLK_S_OK, vec![1; 512]));
        // And the server stops promptly: no worker is spinning on the broken ring.
        let t0 = std::time::Instant::now();
        drop(c);
        s.stop();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}

/// A memory disk whose size the test changes (as an online resize does to a `LiveDisk`).
struct Growable {
    mem: MemStorage,
    size: std::sync::atomic::AtomicU64,
}

impl Growable {
    /// A disk of `size` bytes over `room` bytes of memory it may grow into.
    fn new(size: u64, room: u64) -> Arc<Growable> {
        let mem = MemStorage::new();
        mem.set_len(room).unwrap();
        Arc::new(Growable {
            mem,
            size: std::sync::atomic::AtomicU64::new(size),
        })
    }
}

impl BlockDevice for Growable {
    fn info(&self) -> block_io::DiskInfo {
        block_io::DiskInfo {
            virtual_size: self.size.load(std::sync::atomic::Ordering::Acquire),
            logical_sector_size: 512,
            physical_sector_size: 512,
            read_only: false,
            disk_id: None,
            format: "raw",
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        block_io::check_request(&self.info(), offset, buf.len() as u64, false)?;
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        block_io::check_request(&self.info(), offset, buf.len() as u64, true)?;
        self.mem.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> block_io::Result<()> {
        self.write_at(&vec![0u8; len as usize], offset)
    }
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> block_io::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<block_io::StatusRun> {
        block_io::check_request(&self.info(), offset, len, false)?;
        Ok(block_io::StatusRun {
            status: block_io::BlockStatus::Data,
            len,
            file_offset: None,
        })
    }
}

/// The disk grows under a connected frontend: `ConfigHandle::refresh` sends
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel, GET_CONFIG then shows
/// the new capacity, and requests past the old end, refused before, are served.
#[test]
fn a_resized_disk_announces_its_new_capacity() {
    const OLD: u64 = 4 << 20;
    const NEW: u64 = 8 << 20;
    let dev = Growable::new(OLD, NEW);
    let s = Served::start(dev.clone(), 1);
    let mut c = s.client(1);
    c.watch_config_changes().unwrap();
    assert_eq!(c.config().capacity, OLD / 512);
    assert_eq!(s.config.capacity(), OLD / 512);
    assert_eq!(c.read(OLD / 512, 4096).unwrap().0, VIRTIO_BLK_S_IOERR);
    // Nothing changed: no message.
    assert!(!s.config.refresh().unwrap());
    assert_eq!(c.wait_config_change(Duration::from_millis(50)).unwrap(), 0);

    dev.size.store(NEW, std::sync::atomic::Ordering::Release);
    let config = s.config.clone();
    // With REPLY_ACK the backend waits for the frontend's answer.
    let announcer = std::thread::spawn(move || config.refresh());
    assert_eq!(c.wait_config_change(Duration::from_secs(10)).unwrap(), 1);
    assert!(announcer.join().unwrap().unwrap());
    assert_eq!(c.read_config().unwrap().capacity, NEW / 512);
    assert_eq!(c.config().capacity, NEW / 512);
    let data = pattern(4096, 9);
    assert_eq!(c.write(OLD / 512, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(c.read(OLD / 512, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
    assert_eq!(c.read(NEW / 512, 512).unwrap().0, VIRTIO_BLK_S_IOERR);
}

/// A frontend that negotiated REPLY_ACK but does not answer the configuration change: the
/// refresh gives up after its timeout with an error saying so (the new capacity is in the
/// config space all the same), and once the frontend answers, the next change is announced
/// and acknowledged as usual.
#[test]
fn a_frontend_that_does_not_acknowledge_a_config_change_does_not_hang_the_refresh() {
    const OLD: u64 = 4 << 20;
    let dev = Growable::new(OLD, 16 << 20);
    let s = Served::start(dev.clone(), 1);
    let mut c = s.client(1);
    c.watch_config_changes().unwrap();
    dev.size
        .store(8 << 20, std::sync::atomic::Ordering::Release);
    let t0 = std::time::Instant::now();
    let e = s
        .config
        .refresh_within(Duration::from_millis(300))
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("did not acknowledge"), "{e}");
    assert_eq!(c.read_config().unwrap().capacity, (8 << 20) / 512);
    // The frontend answers late; the next change goes through.
    assert_eq!(c.wait_config_change(Duration::from_secs(10)).unwrap(), 1);
    dev.size
        .store(12 << 20, std::sync::atomic::Ordering::Release);
    let config = s.config.clone();
    let announcer = std::thread::spawn(move || config.refresh());
    assert_eq!(c.wait_config_change(Duration::from_secs(10)).unwrap(), 2);
    assert!(announcer.join().unwrap().unwrap());
    assert_eq!(c.read_config().unwrap().capacity, (12 << 20) / 512);
}
