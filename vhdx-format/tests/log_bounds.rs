//! Regression tests for hostile and unusual logs: a log scan costs reads linear in the log
//! size and never one read (or allocation) sized by a header's EntryLength; a replay grows the
//! file no further than its layout needs, whatever LastFileOffset says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{BlockDevice, MemStorage, Result, Storage};
use uuid::Uuid;
use vhdx_format::header::{Header, HEADER_OFFSETS};
use vhdx_format::log::{build_entry, header_sectors, EntryParams};
use vhdx_format::{create, CreateOptions, VhdxFile};

const MIB: u64 = 1 << 20;
const SECTOR: usize = 4096;
const GUID: Uuid = Uuid::from_u128(0x5157_AB1E);

/// Forwards to a [`MemStorage`], recording the largest single read and the bytes read.
#[derive(Default)]
struct Counting {
    inner: MemStorage,
    max_read: AtomicU64,
    total_read: AtomicU64,
}

impl Counting {
    fn new(inner: MemStorage) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            ..Counting::default()
        })
    }
    fn reset(&self) {
        self.max_read.store(0, Ordering::Relaxed);
        self.total_read.store(0, Ordering::Relaxed);
    }
    fn max_read(&self) -> u64 {
        self.max_read.load(Ordering::Relaxed)
    }
    fn total_read(&self) -> u64 {
        self.total_read.load(Ordering::Relaxed)
    }
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.max_read.fetch_max(buf.len() as u64, Ordering::Relaxed);
        self.total_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

struct Image {
    mem: MemStorage,
    log_offset: u64,
    log_len: u64,
    bat_offset: u64,
    /// File offset of block 0's payload (virtual offset 0).
    payload: u64,
}

/// A clean 8 MiB dynamic image (1 MiB blocks) with a log of `log_len` bytes, block 0 filled
/// with 0x42, whose current header names [`GUID`] as LogGuid (so the log is scanned).
fn image(log_len: u32) -> Image {
    let mem = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(8 << 20);
    o.block_size = Some(1 << 20);
    o.log_size = log_len;
    let f = create(mem.clone(), &o).unwrap();
    f.write_at(&vec![0x42; 1 << 20], 0).unwrap();
    f.close().unwrap();
    let payload = f.block_status(0, 4096).unwrap().file_offset.unwrap();
    let bat_offset = f.regions().bat.file_offset;
    let h = f.header();
    drop(f);
    let mem = MemStorage::clone(&mem);
    set_log_guid(&mem, GUID);
    Image {
        mem,
        log_offset: h.log_offset,
        log_len: u64::from(h.log_length),
        bat_offset,
        payload,
    }
}

fn current_header(m: &MemStorage) -> (usize, Header) {
    let h = |slot: usize| {
        let mut b = vec![0u8; 4096];
        m.read_at(&mut b, HEADER_OFFSETS[slot]).unwrap();
        Header::parse(&b).unwrap()
    };
    let (a, b) = (h(0), h(1));
    if b.sequence_number > a.sequence_number {
        (1, b)
    } else {
        (0, a)
    }
}

fn set_log_guid(m: &MemStorage, g: Uuid) {
    let (slot, mut h) = current_header(m);
    h.log_guid = g;
    m.write_at(&h.to_bytes(), HEADER_OFFSETS[slot]).unwrap();
}

/// A log entry header sector: "loge" with the given fields, `valid_descriptors` "desc"
/// descriptors in the rest of the sector, and a CRC computed over this sector alone (as if the
/// entry were one sector long).
fn header_sector(length: u32, count: u32, seq: u64, valid_descriptors: usize) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR];
    s[..4].copy_from_slice(b"loge");
    s[8..12].copy_from_slice(&length.to_le_bytes());
    s[16..24].copy_from_slice(&seq.to_le_bytes());
    s[24..28].copy_from_slice(&count.to_le_bytes());
    s[32..48].copy_from_slice(&vhdx_format::guid::to_disk(&GUID));
    for i in 0..valid_descriptors.min(126) {
        let d = &mut s[64 + 32 * i..96 + 32 * i];
        d[..4].copy_from_slice(b"desc");
        d[16..24].copy_from_slice(&(4u64 << 20).to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
    }
    let crc = crc32c::crc32c(&s);
    s[4..8].copy_from_slice(&crc.to_le_bytes());
    s
}

fn put_log(img: &Image, pos: u64, bytes: &[u8]) {
    let first = (img.log_len - pos).min(bytes.len() as u64) as usize;
    img.mem
        .write_at(&bytes[..first], img.log_offset + pos)
        .unwrap();
    if first < bytes.len() {
        img.mem.write_at(&bytes[first..], img.log_offset).unwrap();
    }
}

/// Opens read-only and writable through a counting storage; both must succeed with every read
/// at most 1 MiB and at most `max_total` bytes read in all. Returns the writable image's bytes.
fn open_bounded(mem: &MemStorage, max_total: u64, dirty: bool) -> MemStorage {
    for read_only in [true, false] {
        let st = Counting::new(mem.clone());
        st.reset();
        let f = VhdxFile::open(
            st.clone(),
            &vhdx_format::OpenOptions::new().read_only(read_only),
        )
        .unwrap();
        assert_eq!(f.details().log_dirty, dirty);
        assert!(
            st.max_read() <= MIB,
            "read_only={read_only}: a single read of {} bytes",
            st.max_read()
        );
        assert!(
            st.total_read() <= max_total,
            "read_only={read_only}: {} bytes read, bound {max_total}",
            st.total_read()
        );
        if !read_only {
            drop(f);
            assert!(current_header(&st.inner).1.log_guid.is_nil());
            return st.inner.clone();
        }
    }
    unreachable!()
}

#[test]
fn bogus_headers_with_huge_entry_length_cost_bounded_reads() {
    // Before the fix each of these headers made open read (and allocate) EntryLength bytes in
    // one go: 64 headers claiming ~256 MiB each.
    let img = image(256 << 20);
    for k in 0..64u64 {
        let pos = k * 4 * MIB + 4096 * k;
        let claim = (img.log_len - pos) as u32 & !0xFFF;
        let s = if k % 2 == 0 {
            // One descriptor cannot need 60000 sectors: refused from the header alone.
            header_sector(claim, 1, k + 1, 1)
        } else {
            // 60000 descriptors and an EntryLength that matches them exactly; the descriptors
            // in the first sector look valid, the second header sector is zeros.
            let count = 60_000u32;
            let len = (header_sectors(60_000) + 60_000) as u32 * 4096;
            header_sector(len, count, k + 1, 126)
        };
        put_log(&img, pos, &s);
    }
    let log = img.log_len;
    open_bounded(&img.mem, 2 * log + 8 * MIB, false);
}

#[test]
fn a_log_of_nothing_but_bogus_headers_is_scanned_linearly() {
    // Every sector is a header whose 126 descriptors look valid and whose EntryLength matches
    // them exactly (127 sectors); each one's data sectors are the next headers. Before the fix
    // every one cost 127 sectors: 127 times the log.
    let img = image(8 << 20);
    let mut log = Vec::with_capacity(img.log_len as usize);
    for k in 0..img.log_len / 4096 {
        log.extend_from_slice(&header_sector(127 * 4096, 126, k + 1, 126));
    }
    put_log(&img, 0, &log);
    let l = img.log_len;
    open_bounded(&img.mem, 3 * l + 8 * MIB, false);
}

#[test]
fn a_log_full_of_valid_entries_replays_with_bounded_reads() {
    let img = image(4 << 20);
    let sectors = img.log_len / 4096;
    // A sequence starting 20 sectors before the end of the log, wrapping, filling it but one
    // sector. Entry i writes fill i into 1..=40 sectors of block 0.
    let start = img.log_len - 20 * 4096;
    let mut pos = start;
    let mut used = 0u64;
    let mut model = vec![0x42u8; 1 << 20];
    let mut seq = 100u64;
    let mut i = 0u64;
    loop {
        let n = 1 + (i * 7) % 40;
        let hs = header_sectors(n);
        if used + hs + n >= sectors {
            break;
        }
        let fill = (i % 250) as u8 + 1;
        let data = vec![fill; 4096];
        let targets: Vec<u64> = (0..n).map(|j| ((i * 13 + j) % 256) * 4096).collect();
        let refs: Vec<(u64, &[u8])> = targets
            .iter()
            .map(|&t| (img.payload + t, &data[..]))
            .collect();
        let e = build_entry(
            &EntryParams {
                sequence_number: seq,
                log_guid: GUID,
                tail: start,
                flushed_file_offset: img.mem.len().unwrap(),
                last_file_offset: img.mem.len().unwrap(),
            },
            &refs,
        );
        put_log(&img, pos, &e);
        for t in targets {
            model[t as usize..t as usize + 4096].fill(fill);
        }
        pos = (pos + e.len() as u64) % img.log_len;
        used += hs + n;
        seq += 1;
        i += 1;
    }
    assert!(i > 20);
    let l = img.log_len;
    let before = img.mem.clone();
    // Read-only: replayed in memory, matching the model.
    let f = VhdxFile::open(
        before.clone(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    assert!(f.details().log_dirty);
    let mut got = vec![0u8; 1 << 20];
    f.read_at(&mut got, 0).unwrap();
    assert!(got == model, "read-only replay differs");
    drop(f);
    let after = open_bounded(&img.mem, 4 * l + 8 * MIB, true);
    let f = VhdxFile::open(after, &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
    assert!(!f.details().log_dirty);
    f.read_at(&mut got, 0).unwrap();
    assert!(got == model, "writable replay differs");
}

/// Puts one valid entry in the log: the BAT's first sector with block `block` set to `entry`
/// (or unchanged), with the given LastFileOffset.
fn dirty_bat(img: &Image, change: Option<(usize, u64)>, last_file_offset: u64) {
    let mut sector = vec![0u8; 4096];
    img.mem.read_at(&mut sector, img.bat_offset).unwrap();
    if let Some((i, e)) = change {
        sector[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    let e = build_entry(
        &EntryParams {
            sequence_number: 1,
            log_guid: GUID,
            tail: 0,
            flushed_file_offset: img.mem.len().unwrap(),
            last_file_offset,
        },
        &[(img.bat_offset, &sector)],
    );
    put_log(img, 0, &e);
}

#[test]
fn a_huge_last_file_offset_does_not_grow_the_file() {
    // Before the fix a writable open grew this 8 MiB image to 8 TiB.
    let img = image(1 << 20);
    let len = img.mem.len().unwrap();
    dirty_bat(&img, None, 8 << 40);
    // Read-only: the replayed view is as long as the file.
    let f = VhdxFile::open(
        img.mem.clone(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    assert!(f.details().log_dirty);
    assert_eq!(f.check().unwrap().file_size, len);
    drop(f);
    assert_eq!(img.mem.len().unwrap(), len);
    // Writable: replayed, the file keeps its length, and a new block goes at its end.
    let m = Arc::new(img.mem.clone());
    let f = VhdxFile::open(m.clone(), &vhdx_format::OpenOptions::new().read_only(false)).unwrap();
    assert!(f.details().log_dirty);
    assert_eq!(m.len().unwrap(), len);
    f.write_at(&[0x77; 4096], 5 << 20).unwrap();
    f.flush().unwrap();
    f.close().unwrap();
    drop(f);
    assert_eq!(m.len().unwrap(), len + MIB);
    let f = VhdxFile::open(m, &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
    let mut buf = [0u8; 4096];
    f.read_at(&mut buf, 5 << 20).unwrap();
    assert_eq!(buf, [0x77; 4096]);
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x42; 4096]);
}

#[test]
fn a_lost_file_extension_is_restored_as_far_as_the_layout_needs() {
    // The log maps block 1 just past the end of the file: the extension that made room for it
    // was lost. Replay extends the file to cover the block, but not to LastFileOffset when
    // that lies further.
    for extra in [MIB, 64 * MIB] {
        let img = image(1 << 20);
        let len = img.mem.len().unwrap();
        dirty_bat(&img, Some((1, len | 6)), len + extra);
        let f = VhdxFile::open(
            img.mem.clone(),
            &vhdx_format::OpenOptions::new().read_only(true),
        )
        .unwrap();
        assert_eq!(f.check().unwrap().file_size, len + MIB);
        let mut buf = vec![9u8; 1 << 20];
        f.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(
            f.block_status(1 << 20, 1 << 20).unwrap().file_offset,
            Some(len)
        );
        drop(f);
        let m = Arc::new(img.mem.clone());
        let f =
            VhdxFile::open(m.clone(), &vhdx_format::OpenOptions::new().read_only(false)).unwrap();
        assert_eq!(m.len().unwrap(), len + MIB, "extra {extra}");
        f.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
