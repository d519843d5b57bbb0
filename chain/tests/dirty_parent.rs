//! A parent left with a dirty log (a crash while it was a writable leaf) opens as a read-only
//! parent through in-memory replay, without a byte of it being written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use block_io::{BlockDevice, CutPoint, FaultStorage, FileStorage, MemStorage};
use chain::{Disk, OpenOptions};

/// Runs an allocating workload on a fresh dynamic VHDX over a fault backend cut at `cut`,
/// returning the crash images (for a few seeds) whose log is dirty.
fn dirty_images(cut: u64) -> Vec<MemStorage> {
    let f = std::sync::Arc::new(FaultStorage::new(MemStorage::new()));
    let o = vhdx_format::CreateOptions::dynamic(SIZE);
    let Ok(v) = vhdx_format::create(f.clone(), &o) else {
        return Vec::new();
    };
    let _ = v.flush();
    f.set_cut(CutPoint::AfterOps(f.ops() + cut));
    let mut failed = false;
    for i in 0..6u64 {
        if v.write_at(&vec![0x30 + i as u8; 1 << 20], i * (2 << 20))
            .is_err()
            || v.flush().is_err()
        {
            failed = true;
            break;
        }
    }
    if !failed {
        return Vec::new();
    }
    (0..4)
        .map(|seed| f.crash_image(seed))
        .filter(|img| {
            vhdx_format::VhdxFile::open(
                img.clone(),
                &vhdx_format::OpenOptions::new().read_only(true),
            )
            .is_ok_and(|v| v.details().log_dirty)
        })
        .collect()
}

#[test]
fn dirty_parent_is_replayed_in_memory_and_never_written() {
    // Find crash images with a dirty log from our own writer.
    let d = tempfile::tempdir().unwrap();
    // Prefer a crash whose log holds a BAT change not yet in place, so that reading without
    // replay would be wrong: the replayed file differs from the crashed one beyond headers.
    let mut found = None;
    'search: for cut in 0..200 {
        for img in dirty_images(cut) {
            let bytes = img.to_vec().unwrap();
            let probe = d.path().join("probe.vhdx");
            std::fs::write(&probe, &bytes).unwrap();
            let s = FileStorage::open(&probe, &block_io::OpenOptions::new()).unwrap();
            drop(
                vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(false))
                    .unwrap(),
            );
            let after = std::fs::read(&probe).unwrap();
            // Past the headers (first MiB) and the log (second MiB): replay changed the BAT.
            let tail = |v: &[u8]| v.get(2 << 20..).map(<[u8]>::to_vec).unwrap_or_default();
            if tail(&after) != tail(&bytes) {
                found = Some(img);
                break 'search;
            }
        }
    }
    let img = found.expect("no cut point left a log with changes to replay");
    let parent = d.path().join("parent.vhdx");
    std::fs::write(&parent, img.to_vec().unwrap()).unwrap();
    let parent_bytes = std::fs::read(&parent).unwrap();

    // What the parent holds after replay, from a writable open of a copy (replays into it).
    let copy = d.path().join("copy.vhdx");
    std::fs::write(&copy, &parent_bytes).unwrap();
    let expected = {
        let v = vhdx_format::VhdxFile::open(
            FileStorage::open(&copy, &block_io::OpenOptions::new()).unwrap(),
            &vhdx_format::OpenOptions::new().read_only(false),
        )
        .unwrap();
        assert!(!v.details().log_dirty || v.check().unwrap().log_replayed);
        read_all(&v)
    };

    // A child made on top of the dirty parent (reads its DataWriteGuid read-only).
    let child = d.path().join("child.vhdx");
    drop(create_child(Fmt::Vhdx, &child, &parent, "parent.vhdx"));
    let disk = Disk::open(&child, &OpenOptions::new()).unwrap();
    disk.write_at(&[0xC1; 4096], 0).unwrap();
    disk.flush().unwrap();
    let mut want = expected.clone();
    want[..4096].fill(0xC1);
    assert_eq!(first_diff(&read_all(&disk), &want), None);
    drop(disk);
    assert!(
        std::fs::read(&parent).unwrap() == parent_bytes,
        "the dirty parent was written"
    );
}
