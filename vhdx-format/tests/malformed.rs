//! Regression tests on malformed bytes: every damaged image yields an error (never a panic),
//! damage to one copy of a redundant structure is survived, and read-only opens never write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, ErrorKind, MemStorage};
use uuid::Uuid;
use vhdx_format::header::{Header, HEADER_OFFSETS};
use vhdx_format::log::{build_entry, EntryParams};
use vhdx_format::region::{Region, RegionTable, REGION_TABLE_OFFSETS};
use vhdx_format::{create, CreateOptions, VhdxFile};

const MIB: usize = 1 << 20;

/// A small dynamic image with two allocated blocks, as bytes.
fn image() -> Vec<u8> {
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(8 << 20);
    o.block_size = Some(1 << 20);
    let f = create(m.clone(), &o).unwrap();
    f.write_at(&[0x42; 4096], 0).unwrap();
    f.write_at(&[0x43; 4096], 5 << 20).unwrap();
    f.close().unwrap();
    drop(f);
    m.to_vec().unwrap()
}

fn open(bytes: &[u8]) -> block_io::Result<VhdxFile<MemStorage>> {
    VhdxFile::open(
        MemStorage::from_bytes(bytes),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
}

fn header(bytes: &[u8], slot: usize) -> Header {
    let o = HEADER_OFFSETS[slot] as usize;
    Header::parse(&bytes[o..o + 4096]).unwrap()
}

fn put_header(bytes: &mut [u8], slot: usize, h: &Header) {
    let o = HEADER_OFFSETS[slot] as usize;
    bytes[o..o + 4096].copy_from_slice(&h.to_bytes());
}

fn regions(bytes: &[u8]) -> RegionTable {
    let o = REGION_TABLE_OFFSETS[0] as usize;
    RegionTable::parse(&bytes[o..o + 65536]).unwrap()
}

fn put_regions(bytes: &mut [u8], t: &RegionTable) {
    for o in REGION_TABLE_OFFSETS {
        let o = o as usize;
        bytes[o..o + 65536].copy_from_slice(&t.to_bytes());
    }
}

fn kind(bytes: &[u8]) -> ErrorKind {
    open(bytes).unwrap_err().kind()
}

#[test]
fn valid_image_opens() {
    let f = open(&image()).unwrap();
    let mut b = [0u8; 4096];
    f.read_at(&mut b, 5 << 20).unwrap();
    assert_eq!(b, [0x43; 4096]);
}

#[test]
fn bad_signature_and_tiny_files() {
    let mut b = image();
    b[0] = b'X';
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    assert!(open(&[]).is_err());
    assert!(open(&image()[..300 * 1024]).is_err());
    assert!(!vhdx_format::probe(&MemStorage::from_bytes(&b)));
    assert!(vhdx_format::probe(&MemStorage::from_bytes(&image())));
    assert!(!vhdx_format::probe(&MemStorage::from_bytes(b"vhdx")));
}

#[test]
fn header_damage() {
    let good = image();
    // One header damaged: the other is used.
    for slot in 0..2 {
        let mut b = good.clone();
        b[HEADER_OFFSETS[slot] as usize + 40] ^= 0xFF;
        open(&b).unwrap();
    }
    // Both damaged.
    let mut b = good.clone();
    b[HEADER_OFFSETS[0] as usize + 40] ^= 0xFF;
    b[HEADER_OFFSETS[1] as usize + 40] ^= 0xFF;
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // The newer header wins: give the older slot a log offset that would fail.
    let h0 = header(&good, 0);
    let h1 = header(&good, 1);
    let (new, old) = if h0.sequence_number > h1.sequence_number {
        (0, 1)
    } else {
        (1, 0)
    };
    let mut b = good.clone();
    let mut bad = header(&good, old);
    bad.log_offset = 64 << 20; // beyond the file, would be refused if used with a log
    bad.log_guid = Uuid::from_u128(5);
    put_header(&mut b, old, &bad);
    open(&b).unwrap();
    // ...unless it has the larger sequence number.
    bad.sequence_number = header(&good, new).sequence_number + 1;
    put_header(&mut b, old, &bad);
    assert!(open(&b).is_err());
}

#[test]
fn region_table_damage() {
    let good = image();
    // Table 1 damaged: table 2 is used.
    let mut b = good.clone();
    b[REGION_TABLE_OFFSETS[0] as usize + 20] ^= 1;
    open(&b).unwrap();
    b[REGION_TABLE_OFFSETS[1] as usize + 20] ^= 1;
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // BAT overlapping metadata (valid CRC).
    let mut b = good.clone();
    let mut t = regions(&good);
    t.bat.file_offset = t.metadata.file_offset;
    put_regions(&mut b, &t);
    assert!(open(&b).is_err());
    // Region overlapping the log.
    let mut b = good.clone();
    let mut t = regions(&good);
    t.other.push(Region {
        guid: Uuid::from_u128(77),
        file_offset: 1 << 20,
        length: 1 << 20,
        required: false,
    });
    put_regions(&mut b, &t);
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // Unknown required region.
    let mut b = good.clone();
    let mut t = regions(&good);
    t.other.push(Region {
        guid: Uuid::from_u128(77),
        file_offset: 100 << 20,
        length: 1 << 20,
        required: true,
    });
    put_regions(&mut b, &t);
    assert_eq!(kind(&b), ErrorKind::Unsupported);
    // Unknown optional region past the end of the file is kept and ignored.
    let mut b = good.clone();
    let mut t = regions(&good);
    t.other.push(Region {
        guid: Uuid::from_u128(77),
        file_offset: 100 << 20,
        length: 1 << 20,
        required: false,
    });
    put_regions(&mut b, &t);
    assert_eq!(open(&b).unwrap().regions().other.len(), 1);
    // BAT region beyond the end of the file.
    let mut b = good.clone();
    let mut t = regions(&good);
    t.bat.file_offset = 1 << 40;
    put_regions(&mut b, &t);
    assert!(open(&b).is_err());
}

fn meta_offset(bytes: &[u8]) -> usize {
    regions(bytes).metadata.file_offset as usize
}

#[test]
fn metadata_damage() {
    let good = image();
    let m = meta_offset(&good);
    // Huge entry count.
    let mut b = good.clone();
    b[m + 10..m + 12].copy_from_slice(&0xFFFFu16.to_le_bytes());
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // Unknown required item: turn the page-83 item into an unknown id, keep IsRequired.
    let mut b = good.clone();
    let e = m + 32 + 2 * 32;
    b[e] ^= 0xFF;
    assert_eq!(kind(&b), ErrorKind::Unsupported);
    // ...and the same item not required: now the disk id item is missing.
    b[e + 24..e + 28].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // Item length past the region.
    let mut b = good.clone();
    b[m + 32 + 20..m + 32 + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // Values: find the file parameters item and break the block size.
    let fp = m + u32::from_le_bytes(b[m + 48..m + 52].try_into().unwrap()) as usize;
    for bs in [0u32, 3 << 20, 512 << 20, 1024] {
        let mut b = good.clone();
        b[fp..fp + 4].copy_from_slice(&bs.to_le_bytes());
        assert_eq!(kind(&b), ErrorKind::Corrupt, "block size {bs}");
    }
    // HasParent without a locator.
    let mut b = good.clone();
    b[fp + 4] |= 2;
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // Virtual size: huge and unaligned.
    let vs = m + u32::from_le_bytes(good[m + 80..m + 84].try_into().unwrap()) as usize;
    for size in [1u64 << 60, 1000, 0] {
        let mut b = good.clone();
        b[vs..vs + 8].copy_from_slice(&size.to_le_bytes());
        assert_eq!(kind(&b), ErrorKind::Corrupt, "size {size}");
    }
    // A size needing a bigger BAT than the region holds.
    let mut b = good.clone();
    b[vs..vs + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_eq!(kind(&b), ErrorKind::Corrupt);
}

#[test]
fn bat_damage() {
    let good = image();
    let bat = regions(&good).bat.file_offset as usize;
    let set = |v: u64| {
        let mut b = good.clone();
        b[bat..bat + 8].copy_from_slice(&v.to_le_bytes());
        kind(&b)
    };
    assert_eq!(set(4), ErrorKind::Corrupt); // reserved state
    assert_eq!(set(7 | (20 << 20)), ErrorKind::Corrupt); // partially present, not differencing
    assert_eq!(set(6 | (2 << 20)), ErrorKind::Corrupt); // onto the metadata region
    assert_eq!(set(6), ErrorKind::Corrupt); // inside the header section
    assert_eq!(set(6 | (1 << 40)), ErrorKind::Corrupt); // beyond the end of the file
                                                        // Two blocks at the same offset.
    let mut b = good.clone();
    let first = b[bat..bat + 8].to_vec();
    b[bat + 8..bat + 16].copy_from_slice(&first);
    assert_eq!(kind(&b), ErrorKind::Corrupt);
}

/// Builds a dirty image: a log entry writing `sector` at `target`, flushed offset `flushed`.
fn dirty(good: &[u8], target: u64, flushed: u64, guid_matches: bool) -> Vec<u8> {
    let mut b = good.to_vec();
    let h0 = header(&b, 0);
    let h1 = header(&b, 1);
    let (slot, mut h) = if h0.sequence_number > h1.sequence_number {
        (0, h0)
    } else {
        (1, h1)
    };
    h.log_guid = Uuid::from_u128(0xABC);
    put_header(&mut b, slot, &h);
    let sector = vec![0x99u8; 4096];
    let e = build_entry(
        &EntryParams {
            sequence_number: 5,
            log_guid: if guid_matches {
                h.log_guid
            } else {
                Uuid::from_u128(1)
            },
            tail: 0,
            flushed_file_offset: flushed,
            last_file_offset: flushed,
        },
        &[(target, &sector)],
    );
    let lo = h.log_offset as usize;
    b[lo..lo + e.len()].copy_from_slice(&e);
    b
}

#[test]
fn log_damage() {
    let good = image();
    let len = good.len() as u64;
    // Payload of block 0 lives somewhere past the BAT; find it through a clean open.
    let f = open(&good).unwrap();
    let st = f.block_status(0, 4096).unwrap();
    let target = st.file_offset.unwrap();
    drop(f);
    // A valid dirty log is replayed in memory and the file is untouched.
    let b = dirty(&good, target, len, true);
    let m = MemStorage::from_bytes(&b);
    let f = VhdxFile::open(m.clone(), &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
    let mut buf = [0u8; 4096];
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x99; 4096]);
    assert!(f.details().log_dirty);
    assert!(m.to_vec().unwrap() == b, "read-only open changed the file");
    // The same, writable: replayed into the file, log cleared.
    let m = Arc::new(MemStorage::from_bytes(&b));
    let old = VhdxFile::open(
        MemStorage::from_bytes(&b),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap()
    .header();
    let f = VhdxFile::open(m.clone(), &vhdx_format::OpenOptions::new().read_only(false)).unwrap();
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x99; 4096]);
    // Replay is a write session: new FileWriteGuid, same DataWriteGuid, log cleared.
    let h = f.header();
    assert_ne!(h.file_write_guid, old.file_write_guid);
    assert_eq!(h.data_write_guid, old.data_write_guid);
    assert!(h.log_guid.is_nil());
    drop(f);
    let f = VhdxFile::open(
        m.as_ref().clone(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    assert!(!f.details().log_dirty);
    // A foreign entry (other LogGuid) is ignored.
    let b = dirty(&good, target, len, false);
    let f = open(&b).unwrap();
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x42; 4096]);
    // Truncated file: shorter than FlushedFileOffset.
    let b = dirty(&good, target, len + (1 << 20), true);
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // An entry aimed at the headers is refused.
    let b = dirty(&good, 65536, len, true);
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // Torn entry (bad CRC): nothing to replay.
    let mut b = dirty(&good, target, len, true);
    let lo = header(&b, 0).log_offset as usize;
    b[lo + 5000] ^= 1;
    let f = open(&b).unwrap();
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x42; 4096]);
    // Log region beyond the end of the file while dirty.
    let mut b = dirty(&good, target, len, true);
    b.truncate(MIB + 4096);
    assert!(open(&b).is_err());
}

#[test]
fn log_update_beyond_the_file_is_refused() {
    let good = image();
    let len = good.len() as u64;
    let b = dirty(&good, 1 << 44, len, true);
    assert_eq!(kind(&b), ErrorKind::Corrupt);
    // The last sector of the file is fine.
    let b = dirty(&good, len - 4096, len, true);
    assert!(open(&b).is_ok());
    // One sector past it is not.
    let b = dirty(&good, len, len, true);
    assert_eq!(kind(&b), ErrorKind::Corrupt);
}

#[test]
fn writable_open_rewrites_a_damaged_region_table_copy() {
    let good = image();
    for (slot, &off) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let mut b = good.clone();
        let o = off as usize;
        b[o + 100] ^= 0x10;
        let m = Arc::new(MemStorage::from_bytes(&b));
        // Read-only: nothing written.
        drop(
            VhdxFile::open(
                m.as_ref().clone(),
                &vhdx_format::OpenOptions::new().read_only(true),
            )
            .unwrap(),
        );
        let f =
            VhdxFile::open(m.clone(), &vhdx_format::OpenOptions::new().read_only(false)).unwrap();
        drop(f);
        let after = m.to_vec().unwrap();
        assert_eq!(
            after[o..o + 65536],
            good[o..o + 65536],
            "slot {slot} repaired"
        );
    }
}
