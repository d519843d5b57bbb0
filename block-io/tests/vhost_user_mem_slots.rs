//! Memory hot-plug (`VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS`): regions added with
//! ADD_MEM_REG and removed with REM_MEM_REG while both queues run requests. Requests whose
//! buffers lie in an added region work as soon as the backend acknowledged it; requests into a
//! removed region complete with IOERR (or, with no status byte the device can reach, a used
//! length of 0); a frontend that removes the memory holding the rings gets no service until it
//! adds it back; one that adds an overlapping region or removes one that does not exist gets
//! an error and loses its connection (never a crashed backend); and I/O in the remaining
//! memory goes on throughout.
#![cfg(feature = "vhost-user")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vhost_user_util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use block_io::vhost_user::client::{ClientQueue, MemRegion, Request, STATUS_UNSET};
use block_io::vhost_user::request::*;
use block_io::{BlockDevice, DiskInfo, MemStorage, RawBuf, RawDisk, StatusRun, Storage};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_util::{pattern, Served};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn mem_disk(len: u64) -> Arc<dyn BlockDevice> {
    let m = MemStorage::new();
    m.set_len(len).unwrap();
    Arc::new(RawDisk::new(m).unwrap())
}

/// Publishes (and kicks) a request whose header and status lie in slot `slot` (8 KiB each) of
/// the queue's own data area and whose data buffer, if `len > 0`, is `len` bytes at `data_gpa`
/// (anywhere, e.g. in an added or removed region). Returns the head and the status address.
fn submit_split(
    q: &mut ClientQueue,
    slot: u64,
    kind: u32,
    sector: u64,
    data_gpa: u64,
    len: u32,
) -> (u16, u64) {
    let (area, _) = q.data_area();
    let (hdr_at, status_at) = (area + slot * 8192, area + slot * 8192 + 4096);
    let mut hdr = [0u8; HEADER_LEN];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    q.mem().write_slice(&hdr, GuestAddress(hdr_at)).unwrap();
    q.mem()
        .write_obj(STATUS_UNSET, GuestAddress(status_at))
        .unwrap();
    let mut bufs = vec![(hdr_at, HEADER_LEN as u32, false)];
    if len > 0 {
        bufs.push((data_gpa, len, kind == VIRTIO_BLK_T_IN));
    }
    bufs.push((status_at, 1, true));
    let head = q.submit(&bufs).unwrap();
    q.kick().unwrap();
    (head, status_at)
}

/// [`submit_split`] in slot 0, waiting for the answer: the status and used length.
fn split_request(
    q: &mut ClientQueue,
    kind: u32,
    sector: u64,
    data_gpa: u64,
    len: u32,
) -> (u8, u32) {
    let (head, status_at) = submit_split(q, 0, kind, sector, data_gpa, len);
    let c = q.wait_for(head, Duration::from_secs(10)).unwrap();
    let status: u8 = q.mem().read_obj(GuestAddress(status_at)).unwrap();
    (status, c.len)
}

/// A disk whose flushes wait at a gate, so a test can hold a queue's worker in the middle of
/// draining its ring.
struct Gated {
    inner: Arc<dyn BlockDevice>,
    /// (open, a flush is waiting)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Gated {
    fn wait_entered(&self) {
        let g = self.state.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(10), |s| !s.1)
            .unwrap();
        assert!(!t.timed_out(), "the flush never reached the device");
        drop(g);
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
}

impl BlockDevice for Gated {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> block_io::Result<()> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.read_raw_at(bufs, offset) }
    }
    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> block_io::Result<()> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.write_raw_at(bufs, offset) }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> block_io::Result<()> {
        let mut g = self.state.lock().unwrap();
        g.1 = true;
        self.cv.notify_all();
        while !g.0 {
            g = self.cv.wait(g).unwrap();
        }
        drop(g);
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<StatusRun> {
        self.inner.block_status(offset, len)
    }
}

/// The worker must not resolve requests against a snapshot of guest memory taken before a
/// region was added: here it is held inside one drain of the ring (a flush waiting at the
/// gate, which runs on the queue's thread when the queue has no I/O engine) while ADD_MEM_REG
/// is acknowledged and a write whose data lies in the new region is published; when the flush
/// returns, the same drain goes on to the write, which must see the new region. With an
/// engine the flush runs off the queue's thread and the write goes on meanwhile.
#[test]
fn a_region_added_during_a_drain_serves_the_next_request() {
    for aio in [None, Some(block_io::engine::Aio::IoUring)] {
        region_added_during_a_drain(aio);
    }
}

fn region_added_during_a_drain(aio: Option<block_io::engine::Aio>) {
    let gated = Arc::new(Gated {
        inner: mem_disk(16 * MIB),
        state: Mutex::new((false, false)),
        cv: Condvar::new(),
    });
    let s = Served::start_with(gated.clone(), 1, aio);
    let mut c = s.client(1);
    let (flush, flush_status) = submit_split(c.queue(0).unwrap(), 0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    gated.wait_entered();
    let r = c.add_mem_region(GIB, MIB).unwrap();
    let data = pattern(64 << 10, 3);
    r.mem().write_slice(&data, GuestAddress(GIB)).unwrap();
    let q = c.queue(0).unwrap();
    let (write, write_status) = submit_split(q, 1, VIRTIO_BLK_T_OUT, 64, GIB, data.len() as u32);
    gated.open();
    let mut pending = vec![flush, write];
    while !pending.is_empty() {
        for done in q.wait(Duration::from_secs(10)).unwrap() {
            pending.retain(|&h| u32::from(h) != done.id);
        }
    }
    for at in [flush_status, write_status] {
        let st: u8 = q.mem().read_obj(GuestAddress(at)).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
    }
    assert_eq!(q.read(64, 64 << 10).unwrap(), (VIRTIO_BLK_S_OK, data));
    drop(c);
    assert_eq!(s.stop(), 1);
}

fn write_in(q: &mut ClientQueue, r: &MemRegion, at: u64, sector: u64, data: &[u8]) -> u8 {
    q.request_in(
        r.mem(),
        at,
        &Request {
            kind: VIRTIO_BLK_T_OUT,
            sector,
            out: data.to_vec(),
            ..Request::default()
        },
    )
    .unwrap()
    .status
}

fn read_in(q: &mut ClientQueue, r: &MemRegion, at: u64, sector: u64, len: u32) -> (u8, Vec<u8>) {
    let resp = q
        .request_in(
            r.mem(),
            at,
            &Request {
                kind: VIRTIO_BLK_T_IN,
                sector,
                in_len: len,
                ..Request::default()
            },
        )
        .unwrap();
    (resp.status, resp.data)
}

/// Queue 1 on its own thread: writes and reads back its half of the disk in the connect-time
/// memory, small and large requests (the large ones go to the offload thread), until told to
/// stop. Returns how many round trips it made.
fn background(mut q: ClientQueue, stop: Arc<AtomicBool>) -> u64 {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let len = if n % 3 == 0 { 1 << 20 } else { 16 << 10 };
        let sector = (32 * MIB + (n % 16) * MIB) / 512;
        let data = pattern(len, 1000 + n);
        assert_eq!(q.write(sector, &data).unwrap(), VIRTIO_BLK_S_OK, "bg {n}");
        let (st, back) = q.read(sector, len as u32).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK, "bg read {n}");
        assert!(back == data, "bg data {n}");
        n += 1;
    }
    n
}

#[test]
fn memory_regions_added_and_removed_while_io_runs() {
    let s = Served::start(mem_disk(64 * MIB), 2);
    let mut c = s.client(2);
    let pf = c.protocol_features();
    assert!(
        pf.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
        "{pf:?}"
    );
    assert!(pf.contains(VhostUserProtocolFeatures::REPLY_ACK), "{pf:?}");
    assert!(c.max_mem_slots().unwrap() >= 8);

    let stop = Arc::new(AtomicBool::new(false));
    let bg = {
        let q = c.take_queue(1).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || background(q, stop))
    };

    // A region that stays for the whole test, next to ones that come and go.
    let keep = c.add_mem_region(3 * GIB, 4 * MIB).unwrap();
    let keep_data = pattern(MIB as usize, 1);
    let keep_sector = 24 * MIB / 512;
    let q = c.queue(0).unwrap();
    assert_eq!(
        write_in(q, &keep, keep.start(), keep_sector, &keep_data),
        VIRTIO_BLK_S_OK
    );

    for round in 0..24u64 {
        // Requests in flight on queue 0 while the memory table changes: four writes in the
        // connect-time memory, published before ADD_MEM_REG and reaped after it.
        let q = c.queue(0).unwrap();
        let (area, _) = q.data_area();
        let mut heads = Vec::new();
        let mut expect = Vec::new();
        for i in 0..4u64 {
            let at = area + 8192 + i * (72 << 10);
            let hdr_at = at;
            let data_at = at + 4096;
            let status_at = data_at + (64 << 10);
            let sector = (16 * MIB + i * (64 << 10)) / 512;
            let data = pattern(64 << 10, round * 10 + i);
            let mut hdr = [0u8; HEADER_LEN];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            q.mem().write_slice(&hdr, GuestAddress(hdr_at)).unwrap();
            q.mem().write_slice(&data, GuestAddress(data_at)).unwrap();
            q.mem()
                .write_obj(STATUS_UNSET, GuestAddress(status_at))
                .unwrap();
            heads.push((
                q.submit(&[
                    (hdr_at, HEADER_LEN as u32, false),
                    (data_at, 64 << 10, false),
                    (status_at, 1, true),
                ])
                .unwrap(),
                status_at,
            ));
            expect.push((sector, data));
        }
        q.kick().unwrap();

        // Re-use three guest addresses, so a range is added again after its removal.
        let gpa = GIB + (round % 3) * 256 * MIB;
        let r = c.add_mem_region(gpa, 4 * MIB).unwrap();

        let q = c.queue(0).unwrap();
        let mut pending: Vec<u16> = heads.iter().map(|&(h, _)| h).collect();
        while !pending.is_empty() {
            for done in q.wait(Duration::from_secs(10)).unwrap() {
                pending.retain(|&h| u32::from(h) != done.id);
            }
        }
        for &(_, status_at) in &heads {
            let st: u8 = q.mem().read_obj(GuestAddress(status_at)).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK, "round {round}: in-flight write");
        }
        for (sector, data) in &expect {
            assert_eq!(
                q.read(*sector, 64 << 10).unwrap(),
                (VIRTIO_BLK_S_OK, data.clone())
            );
        }

        // The new region serves whole requests and data buffers of requests framed elsewhere.
        let sector = (round % 8) * MIB / 512;
        let data = pattern(MIB as usize, 100 + round);
        assert_eq!(write_in(q, &r, r.start(), sector, &data), VIRTIO_BLK_S_OK);
        let (st, back) = read_in(q, &r, r.start() + 2 * MIB, sector, MIB as u32);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(back == data, "round {round}: read into the new region");
        let (st, used) = split_request(q, VIRTIO_BLK_T_IN, sector, r.start() + 8192, 4096);
        assert_eq!((st, used), (VIRTIO_BLK_S_OK, 4097));
        let mut got = vec![0u8; 4096];
        r.mem()
            .read_slice(&mut got, GuestAddress(r.start() + 8192))
            .unwrap();
        assert!(got == data[..4096]);

        // The region that stays still works.
        let (st, back) = read_in(q, &keep, keep.start() + MIB, keep_sector, MIB as u32);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(back == keep_data, "round {round}: kept region");

        c.remove_mem_region(&r).unwrap();

        // Into the removed region: a request wholly there cannot even be answered (used length
        // 0, status untouched); one with its data there fails with IOERR and changes nothing.
        let q = c.queue(0).unwrap();
        let marker = pattern(4096, 5000 + round);
        r.mem()
            .write_slice(&marker, GuestAddress(r.start() + 3 * MIB))
            .unwrap();
        let resp = q
            .request_in(
                r.mem(),
                r.start(),
                &Request {
                    kind: VIRTIO_BLK_T_IN,
                    sector,
                    in_len: 4096,
                    ..Request::default()
                },
            )
            .unwrap();
        assert_eq!((resp.status, resp.used_len), (STATUS_UNSET, 0));
        assert_eq!(
            split_request(q, VIRTIO_BLK_T_OUT, sector, r.start() + 3 * MIB, 4096),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        // (The used length counts every device-writable byte, as QEMU reports it.)
        assert_eq!(
            split_request(q, VIRTIO_BLK_T_IN, sector, r.start() + 3 * MIB, 4096),
            (VIRTIO_BLK_S_IOERR, 4097)
        );
        let mut got = vec![0u8; 4096];
        r.mem()
            .read_slice(&mut got, GuestAddress(r.start() + 3 * MIB))
            .unwrap();
        assert!(
            got == marker,
            "round {round}: the device wrote into a removed region"
        );
        // The disk still holds what was written through the region before its removal.
        let (st, back) = q.read(sector, MIB as u32).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(back == data, "round {round}: data after removal");
    }

    stop.store(true, Ordering::Relaxed);
    let rounds = bg.join().unwrap();
    assert!(rounds > 0);

    // Removing the memory that holds the rings stalls the queue, but only until it is back.
    let main = c.main_region().unwrap();
    c.remove_mem_region(&main).unwrap();
    let q = c.queue(0).unwrap();
    let d1 = pattern(4096, 77);
    let h1 = {
        let (area, _) = q.data_area();
        q.mem().write_slice(&d1, GuestAddress(area + 4096)).unwrap();
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        q.mem().write_slice(&hdr, GuestAddress(area)).unwrap();
        q.mem()
            .write_obj(STATUS_UNSET, GuestAddress(area + 8192))
            .unwrap();
        q.submit(&[
            (area, HEADER_LEN as u32, false),
            (area + 4096, 4096, false),
            (area + 8192, 1, true),
        ])
        .unwrap()
    };
    q.force_kick().unwrap();
    assert!(
        q.wait(Duration::from_millis(300)).is_err(),
        "served without its rings"
    );
    c.re_add_mem_region(&main).unwrap();
    let q = c.queue(0).unwrap();
    q.force_kick().unwrap();
    let done = q.wait_for(h1, Duration::from_secs(10)).unwrap();
    assert_eq!(done.len, 1);
    assert_eq!(q.read(0, 4096).unwrap(), (VIRTIO_BLK_S_OK, d1));

    drop(c);
    assert_eq!(s.stop(), 1);
}

/// A memory table change the backend cannot make (a region overlapping one in use, the
/// removal of a region it does not have) is refused, and, as vhost-user-backend handles every
/// failed message, ends that frontend's connection; the server serves the next frontend.
#[test]
fn refused_memory_changes_end_only_their_connection() {
    let s = Served::start(mem_disk(16 * MIB), 1);

    let mut c = s.client(1);
    let err = c.add_mem_region(MIB, MIB).unwrap_err();
    assert!(err.to_string().contains("ADD_MEM_REG"), "{err}");
    // The queue workers stop a moment after the connection: a request now may be served or
    // fail, but it neither hangs nor harms the server.
    let _ = c.read(0, 4096);
    drop(c);

    let mut c = s.client(1);
    let r = c.add_mem_region(GIB, MIB).unwrap();
    c.remove_mem_region(&r).unwrap();
    let err = c.remove_mem_region(&r).unwrap_err();
    assert!(err.to_string().contains("REM_MEM_REG"), "{err}");
    drop(c);

    let mut c = s.client(1);
    let r = c.add_mem_region(GIB, MIB).unwrap();
    let data = pattern(64 << 10, 9);
    let q = c.queue(0).unwrap();
    assert_eq!(write_in(q, &r, r.start(), 8, &data), VIRTIO_BLK_S_OK);
    assert_eq!(q.read(8, 64 << 10).unwrap(), (VIRTIO_BLK_S_OK, data));
    drop(c);
    assert_eq!(s.stop(), 3);
}
