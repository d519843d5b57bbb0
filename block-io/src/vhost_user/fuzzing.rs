//! The steps the `virtio_blk_request` fuzz target runs on arbitrary bytes, shared with the
//! stable tests (`tests/vhost_user_fuzzing.rs`) that replay the seed corpus and run random
//! inputs, so both exercise exactly the same paths.
//!
//! An input is a device choice, a descriptor chain and the guest memory the chain points
//! into; [`run`] hands them to the request parser the backend uses ([`request`](super::request)),
//! then checks what the guest and the disk see against a model: the used length never exceeds
//! the writable bytes, the status byte is OK, IOERR or UNSUPP, a successful IN copies the
//! disk's bytes, a successful OUT or WRITE_ZEROES changes exactly its range, and nothing else
//! ever changes the disk. Any failed check panics (that is the fuzzer's finding).
//!
//! Input layout (little-endian; missing bytes read as zero):
//! - byte 0: device flags: bit 0 read-only, bit 1 4096-byte logical sectors;
//! - byte 1: descriptor count, `1 + b % MAX_DESCS`;
//! - then 7 bytes per descriptor: `addr u32` (guest address; when bit 31 is set the address is
//!   `u64::MAX - (addr & 0x7fff_ffff)`, far outside guest memory), `len u16` (bit 15 set:
//!   `len & 0x7fff` times 512), `flags u8` (bit 0: device-writable);
//! - the rest is copied into guest memory from address 0 (headers, segments, data).

// A harness: a broken rule must panic, as that is what the fuzzer reports. Nothing on the
// serving path calls into this module.
#![allow(clippy::panic)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{process, Desc, Target};
use crate::{BlockDevice, MemStorage, RawDisk, RawOptions, Storage};

/// Guest memory: two regions with a hole between them.
pub const REGIONS: [(u64, usize); 2] = [(0, 64 << 10), (128 << 10, 64 << 10)];
/// Disk size in bytes.
pub const DISK_SIZE: u64 = 128 << 10;
/// Most descriptors in one chain.
pub const MAX_DESCS: u8 = 8;

/// What one input did: the used length reported and the status byte written, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Used length the device reports.
    pub used: u32,
    /// The status byte, when the chain had a place for it.
    pub status: Option<u8>,
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    for (d, s) in a.iter_mut().zip(b) {
        *d = *s;
    }
    u32::from_le_bytes(a)
}

/// Decodes `data` into (read-only, 4 KiB sectors, descriptors, memory image).
fn decode(data: &[u8]) -> (bool, bool, Vec<Desc>, &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let n = 1 + usize::from(data.get(1).copied().unwrap_or(0) % MAX_DESCS);
    let mut descs = Vec::with_capacity(n);
    let mut pos = 2;
    for _ in 0..n {
        let d = data.get(pos..).unwrap_or(&[]);
        let raw = le_u32(d.get(..4).unwrap_or(d));
        let addr = if raw & 0x8000_0000 != 0 {
            u64::MAX - u64::from(raw & 0x7fff_ffff)
        } else {
            u64::from(raw)
        };
        let l = le_u32(d.get(4..6).unwrap_or(&[])) as u16;
        let len = if l & 0x8000 != 0 {
            u32::from(l & 0x7fff) * 512
        } else {
            u32::from(l)
        };
        let writable = d.get(6).is_some_and(|f| f & 1 != 0);
        descs.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable,
        });
        pos += 7;
    }
    let rest = data.get(pos..).unwrap_or(&[]);
    (flags & 1 != 0, flags & 2 != 0, descs, rest)
}

/// Encodes a chain for [`run`] (seeds and tests): `descs` as `(addr, len, writable)` with
/// `addr < 2^31` and `len < 2^15`, then `memory` copied to guest address 0.
pub fn encode(
    read_only: bool,
    sector_4k: bool,
    descs: &[(u32, u16, bool)],
    memory: &[u8],
) -> Vec<u8> {
    let mut out = vec![
        u8::from(read_only) | u8::from(sector_4k) << 1,
        (descs.len().saturating_sub(1)) as u8,
    ];
    for &(addr, len, w) in descs {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.push(u8::from(w));
    }
    out.extend_from_slice(memory);
    out
}

/// The bytes of guest memory at `[addr, addr + len)` as the region map holds them, or `None`
/// when any of them is outside guest memory.
fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<Vec<u8>> {
    let mut v = vec![0u8; usize::try_from(len).ok()?];
    mem.read_slice(&mut v, GuestAddress(addr)).ok()?;
    Some(v)
}

/// Runs one input (see the module docs) and checks the outcome against the model.
///
/// # Panics
/// When the device breaks a rule the module docs list: that is what the fuzzer looks for.
pub fn run(data: &[u8]) -> Outcome {
    let (read_only, sector_4k, descs, image) = decode(data);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(REGIONS[0].0), REGIONS[0].1),
        (GuestAddress(REGIONS[1].0), REGIONS[1].1),
    ]) else {
        panic!("guest memory could not be mapped");
    };
    let first = image.len().min(REGIONS[0].1);
    if mem.write_slice(&image[..first], GuestAddress(0)).is_err() {
        panic!("guest memory write failed");
    }
    // A disk with a recognisable pattern, so reads are checked byte for byte.
    let model: Vec<u8> = (0..DISK_SIZE)
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
        .collect();
    let storage = MemStorage::from_bytes(&model);
    let sector = if sector_4k { 4096 } else { 512 };
    let Ok(disk) = RawDisk::open(
        storage,
        &RawOptions::new().sector_size(sector).read_only(read_only),
    ) else {
        panic!("raw disk over {DISK_SIZE} bytes refused");
    };
    let id = *b"vdisk-fuzz-serial-00";
    let info = disk.info();
    let target = Target {
        dev: &disk,
        sectors: info.virtual_size / 512,
        block_size: u64::from(info.logical_sector_size),
        read_only: info.read_only,
        id: &id,
    };

    // What the guest handed over, before the device touched anything.
    let readable: Option<Vec<u8>> =
        descs
            .iter()
            .take_while(|d| !d.writable)
            .try_fold(Vec::new(), |mut acc, d| {
                if d.len > 0 {
                    acc.extend(guest_bytes(&mem, d.addr.0, u64::from(d.len))?);
                }
                Some(acc)
            });
    let used = process(&mem, &descs, &target);

    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    let writable_total: u64 = descs[split..]
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    assert!(
        u64::from(used) <= writable_total,
        "used {used} > writable {writable_total}"
    );
    let status_at = descs[split..]
        .iter()
        .rev()
        .find(|d| d.writable)
        .filter(|d| d.len > 0)
        .and_then(|d| d.addr.0.checked_add(u64::from(d.len) - 1));
    let status = if used > 0 {
        let at = status_at.unwrap_or_else(|| panic!("used {used} without a status byte"));
        let s = guest_bytes(&mem, at, 1).unwrap_or_else(|| panic!("status at {at:#x} unmapped"))[0];
        assert!(s <= 2, "status byte {s}");
        Some(s)
    } else {
        None
    };

    let mut after = vec![0u8; DISK_SIZE as usize];
    if disk.storage().read_at(&mut after, 0).is_err() {
        panic!("reading the disk back failed");
    }
    let changed: Vec<usize> = (0..after.len()).filter(|&i| after[i] != model[i]).collect();

    // The model: only a request whose descriptors do not overlap has a single right answer.
    let disjoint = {
        let mut r: Vec<(u64, u64)> = descs
            .iter()
            .filter(|d| d.len > 0)
            .map(|d| (d.addr.0, d.addr.0.saturating_add(u64::from(d.len))))
            .collect();
        r.sort_unstable();
        r.windows(2).all(|w| w[0].1 <= w[1].0)
    };
    let header = readable.as_deref().filter(|r| r.len() >= 16);
    let kind = header.map(|h| le_u32(&h[0..4]) & 0x7fff_ffff);
    let sector_no = header.map(|h| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[8..16]);
        u64::from_le_bytes(a)
    });
    let ok = status == Some(0);
    // The segment of a discard or write-zeroes: `(byte offset, byte length)`.
    let segment = || {
        let r = readable.as_deref().unwrap_or(&[]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&r[16..24]);
        (
            u64::from_le_bytes(a) * 512,
            u64::from(le_u32(&r[24..28])) * 512,
        )
    };
    let only_inside = |at: u64, n: u64, what: &str| {
        for &i in &changed {
            let i = i as u64;
            assert!(i >= at && i < at + n, "{what} changed byte {i}");
        }
    };
    match (kind, ok) {
        // The device reads the header and the data before it writes anything to the guest,
        // so what it writes is what the guest handed over, overlapping descriptors or not.
        (Some(1), true) => {
            let data = &readable.as_deref().unwrap_or(&[])[16..];
            let at = sector_no.unwrap_or(0) * 512;
            only_inside(at, data.len() as u64, "a write");
            let (a, n) = (at as usize, data.len());
            assert!(after[a..a + n] == *data, "written bytes differ");
        }
        (Some(13), true) => {
            let (at, n) = segment();
            only_inside(at, n, "write-zeroes");
            assert!(after[at as usize..(at + n) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        // A discard may leave zeros or the old bytes, inside its range.
        (Some(11), true) => {
            let (at, n) = segment();
            only_inside(at, n, "a discard");
        }
        (Some(0), true) => {
            assert!(changed.is_empty(), "a read changed the disk");
            // What lands in the guest is the disk's bytes, unless two writable descriptors
            // (or the status byte) overlap: then later bytes win.
            if disjoint {
                let len = writable_total - 1;
                let at = (sector_no.unwrap_or(0) * 512) as usize;
                let mut got = Vec::new();
                for d in descs[split..].iter() {
                    got.extend(guest_bytes(&mem, d.addr.0, u64::from(d.len)).unwrap_or_default());
                }
                assert!(
                    got[..len as usize] == model[at..at + len as usize],
                    "read bytes differ"
                );
            }
        }
        // Anything else that succeeded (flush, get-id) or failed leaves the disk alone.
        _ => assert!(
            changed.is_empty(),
            "a failed or read-only request changed the disk"
        ),
    }
    Outcome { used, status }
}
