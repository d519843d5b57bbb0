//! Drives a `RawDisk` over a capacity-limited `MemStorage` with arbitrary requests — unaligned,
//! out of range, overflowing — and checks that each either succeeds or returns an error, and
//! that reads agree with a model.
#![no_main]

use block_io::{BlockDevice, MemStorage, RawDisk, Storage};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let m = MemStorage::with_capacity_limit(SIZE);
    if m.set_len(SIZE).is_err() {
        return;
    }
    let Ok(disk) = RawDisk::new(m) else { return };
    let mut model = vec![0u8; SIZE as usize];
    for op in data.chunks_exact(11) {
        let off = u64::from_le_bytes([op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8]]);
        let len = u64::from(u16::from_le_bytes([op[9], op[10]])) * 8;
        let ok_range = off % 512 == 0
            && len % 512 == 0
            && off.checked_add(len).is_some_and(|e| e <= SIZE);
        match op[0] % 5 {
            0 => {
                let mut buf = vec![0u8; len as usize];
                let r = disk.read_at(&mut buf, off);
                assert_eq!(r.is_ok(), ok_range);
                if r.is_ok() {
                    assert_eq!(buf[..], model[off as usize..(off + len) as usize]);
                }
            }
            1 => {
                let r = disk.write_at(&vec![op[9]; len as usize], off);
                assert_eq!(r.is_ok(), ok_range);
                if r.is_ok() {
                    model[off as usize..(off + len) as usize].fill(op[9]);
                }
            }
            2 => {
                let r = disk.discard(off, len);
                assert_eq!(r.is_ok(), ok_range);
                if r.is_ok() {
                    model[off as usize..(off + len) as usize].fill(0);
                }
            }
            3 => {
                let _ = disk.block_status(off, len);
            }
            _ => {
                let _ = disk.flush();
            }
        }
    }
});
