//! Replays the fuzz seed corpus (fuzz/corpus/vhd_open/) through the same steps as the
//! `vhd_open` fuzz target, so the corpus stays valid input on stable Rust. Every image that
//! opens must also survive the write/read/reopen cycle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use block_io::{BlockDevice, MemStorage};
use vhd_format::fuzzing::run as one;
use vhd_format::VhdFile;

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
        let Ok(f) = VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(false))
        else {
            continue;
        };
        let size = f.info().virtual_size;
        let off = size / 3 / 512 * 512;
        f.write_at(&[0x5Au8; 1024], off).unwrap();
        f.flush().unwrap();
        drop(f);
        let g = VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true)).unwrap();
        let mut b = [0u8; 1024];
        g.read_at(&mut b, off).unwrap();
        assert!(b.iter().all(|&x| x == 0x5A), "{}", path.display());
        assert!(g.check().unwrap().is_clean(), "{}", path.display());
    }
}
