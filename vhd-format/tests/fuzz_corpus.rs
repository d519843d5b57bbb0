//! Replays the fuzz seed corpus (fuzz/corpus/vhd_open/) through the same steps as the
//! `vhd_open` fuzz target, so the corpus stays valid input on stable Rust. Every image that
//! opens must also survive the write/read/reopen cycle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use block_io::{BlockDevice, MemStorage, Storage};
use vhd_format::{check_storage, probe, VhdFile};

const CAPACITY: u64 = 8 << 20;

/// The fuzz target's steps; returns whether the image opened.
fn one(data: &[u8]) -> bool {
    let st = Arc::new(MemStorage::with_capacity_limit(CAPACITY));
    if st.write_at(data, 0).is_err() {
        return false;
    }
    let _ = probe(&*st);
    let _ = check_storage(&*st, false);
    let Ok(f) = VhdFile::open(st.clone(), false) else {
        let copy = MemStorage::from_bytes(data);
        let _ = check_storage(&copy, true);
        return false;
    };
    let _ = f.details();
    let size = f.info().virtual_size;
    let mut buf = vec![0u8; 64 * 1024];
    let n = (size.min(buf.len() as u64) / 512 * 512) as usize;
    let _ = f.read_at(&mut buf[..n], 0);
    let last = size.saturating_sub(n as u64) / 512 * 512;
    let _ = f.read_at(&mut buf[..n], last);
    let _ = f.block_status(0, size.max(512));
    let pattern = vec![0xA5u8; 4096.min(n)];
    let mid = size / 2 / 512 * 512;
    for off in [0, mid, last] {
        let _ = f.write_at(&pattern, off);
    }
    let _ = f.discard(0, 512.min(size));
    let _ = f.write_zeroes(mid, 1024.min(size - mid) / 512 * 512, true);
    let _ = f.flush();
    let _ = f.check(false);
    drop(f);
    if let Ok(g) = VhdFile::open(st.clone(), true) {
        let _ = g.read_at(&mut buf[..n], 0);
        let _ = g.read_at(&mut buf[..n], mid.min(last));
    }
    true
}

#[test]
fn corpus_replays_without_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhd_open");
    let mut files = 0;
    let mut opened = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        files += 1;
        // Seeds we made from valid images must open and stay valid after the writes.
        if one(&data) {
            opened += 1;
        }
    }
    assert!(files >= 5, "seed corpus missing in {}", dir.display());
    assert!(opened >= 5, "only {opened} of {files} seeds open");
}

#[test]
fn seeds_stay_valid_after_writes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhd_open");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let st = Arc::new(MemStorage::from_bytes(&data));
        let Ok(f) = VhdFile::open(st.clone(), false) else {
            continue;
        };
        let size = f.info().virtual_size;
        let off = size / 3 / 512 * 512;
        f.write_at(&[0x5Au8; 1024], off).unwrap();
        f.flush().unwrap();
        drop(f);
        let g = VhdFile::open(st.clone(), true).unwrap();
        let mut b = [0u8; 1024];
        g.read_at(&mut b, off).unwrap();
        assert!(b.iter().all(|&x| x == 0x5A), "{}", path.display());
        assert!(g.check(false).unwrap().is_clean(), "{}", path.display());
    }
}
