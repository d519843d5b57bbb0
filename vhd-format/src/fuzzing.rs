//! The steps the `vhd_open` fuzz target runs on arbitrary bytes, shared with the stable test
//! that replays the seed corpus (`tests/fuzz_corpus.rs`), so both exercise exactly the same
//! paths. Every step must return `Ok` or an `Err`, never panic, hang or allocate without bound.

use std::sync::Arc;

use block_io::{BlockDevice, MemStorage, Storage};

use crate::{check_storage, probe, repair_storage, VhdFile};

/// Room for the input plus what a few writes may allocate.
pub const CAPACITY: u64 = 8 << 20;

/// Opens `data` as a VHD in a capacity-limited [`MemStorage`] and, when that works, reads,
/// writes, discards, flushes, reopens and checks through it. Returns whether it opened.
pub fn run(data: &[u8]) -> bool {
    let st = Arc::new(MemStorage::with_capacity_limit(CAPACITY));
    if st.write_at(data, 0).is_err() {
        return false;
    }
    let _ = probe(&*st);
    let _ = check_storage(&*st);
    let Ok(f) = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)) else {
        let copy = MemStorage::from_bytes(data);
        let _ = repair_storage(&copy);
        return false;
    };
    let _ = f.details();
    let size = f.info().virtual_size;
    let mut buf = vec![0u8; 64 * 1024];
    let n = (size.min(buf.len() as u64) / 512 * 512) as usize;
    let _ = f.read_at(&mut buf[..n], 0);
    let last = size.saturating_sub(n as u64) / 512 * 512;
    let _ = f.read_at(&mut buf[..n], last);
    let _ = f.read_data_at(&mut buf[..n], 0);
    let _ = f.read_data_at(&mut buf[..n], last);
    let _ = f.block_status(0, size.max(512));
    let pattern = vec![0xA5u8; 4096.min(n)];
    let mid = size / 2 / 512 * 512;
    for off in [0, mid, last] {
        let _ = f.write_at(&pattern, off);
    }
    let _ = f.discard(0, 512.min(size));
    let _ = f.write_zeroes(mid, 1024.min(size - mid) / 512 * 512, true);
    let _ = f.flush();
    let _ = f.check();
    drop(f);
    if let Ok(g) = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(true)) {
        let _ = g.read_at(&mut buf[..n], 0);
        let _ = g.read_at(&mut buf[..n], mid.min(last));
    }
    true
}
