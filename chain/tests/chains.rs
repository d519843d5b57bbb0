//! Chains 1..8 deep, VHD and VHDX, random writes at every level: every level reads equal to
//! its model through `chain::Disk` and through libvhdi, the independent oracle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use block_io::{BlockDevice, BlockStatus};
use chain::{Disk, OpenOptions};

fn check_chain(fmt: Fmt, depth: usize, seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let (paths, models) = build_chain(fmt, d.path(), depth, seed);
    for level in 0..depth {
        let disk = Disk::open(&paths[level], &OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(disk.layers().len(), level + 1);
        assert!(disk
            .links()
            .iter()
            .all(|l| *l == chain::LinkCheck::Verified));
        let got = read_all(&disk);
        if let Some(i) = first_diff(&got, &models[level]) {
            panic!("{fmt:?} depth {depth} level {level}: byte {i} differs from the model");
        }
        // block_status across the chain: Data runs only where some layer wrote; anything not
        // Data reads as zeros.
        let mut off = 0;
        while off < SIZE {
            let r = disk.block_status(off, SIZE - off).unwrap();
            assert!(r.len > 0 && r.len % 512 == 0);
            if r.status != BlockStatus::Data {
                let run = &models[level][off as usize..(off + r.len) as usize];
                assert!(
                    run.iter().all(|&b| b == 0),
                    "{fmt:?} level {level}: {:?} run at {off} holds data",
                    r.status
                );
            }
            off += r.len;
        }
        let chain_paths: Vec<_> = paths[..=level].iter().rev().cloned().collect();
        if let Some(theirs) = libvhdi_read(&chain_paths, SIZE) {
            if let Some(i) = first_diff(&theirs, &models[level]) {
                panic!("{fmt:?} depth {depth} level {level}: libvhdi differs at byte {i}");
            }
        }
    }
}

#[test]
fn vhd_chains_1_to_8_deep_match_model_and_libvhdi() {
    for depth in [1, 2, 3, 5, 8] {
        check_chain(Fmt::Vhd, depth, depth as u64);
    }
}

#[test]
fn vhdx_chains_1_to_8_deep_match_model_and_libvhdi() {
    for depth in [1, 2, 3, 5, 8] {
        check_chain(Fmt::Vhdx, depth, 100 + depth as u64);
    }
}

/// One sector and odd ranges written into a child read back exactly, with the parent's
/// sectors around them intact.
#[test]
fn partial_block_writes_keep_parent_sectors() {
    for fmt in [Fmt::Vhd, Fmt::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join(format!("base.{}", fmt.ext()));
        let child = d.path().join(format!("child.{}", fmt.ext()));
        let b = create_base(fmt, &base, SIZE);
        b.write_at(&vec![0x11; 4 << 20], 0).unwrap();
        b.flush().unwrap();
        drop(b);
        let rel = format!("base.{}", fmt.ext());
        drop(create_child(fmt, &child, &base, &rel));
        let disk = Disk::open(&child, &OpenOptions::new()).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        model[..4 << 20].fill(0x11);
        for (off, len, byte) in [
            (512u64, 512usize, 0xA1u8),
            (3 * 512 + (1 << 20), 7 * 512, 0xA2),
            ((2 << 20) - 512, 1024, 0xA3),
            (5 << 20, 512, 0xA4),
        ] {
            disk.write_at(&vec![byte; len], off).unwrap();
            model[off as usize..off as usize + len].fill(byte);
        }
        disk.flush().unwrap();
        drop(disk);
        let disk = Disk::open(&child, &OpenOptions::new().read_only(true)).unwrap();
        let got = read_all(&disk);
        assert_eq!(first_diff(&got, &model), None, "{fmt:?}");
        // The child holds only what was written: sector-exact in VHDX; in VHD, whole 4 KiB
        // groups (the chain widens writes to a differencing VHD, see chain::Disk).
        let top = &disk.layers()[0].dev;
        let status = |off| top.block_status(off, 512).unwrap().status;
        let grain = if fmt == Fmt::Vhdx { 512 } else { 4096 };
        assert_eq!(status(512), BlockStatus::Data);
        assert_eq!(status(512 + grain), BlockStatus::Unallocated, "{fmt:?}");
        assert_eq!(
            status(0),
            if grain == 512 {
                BlockStatus::Unallocated
            } else {
                BlockStatus::Data
            }
        );
        assert_eq!(status(4 << 20), BlockStatus::Unallocated);
        if let Some(theirs) = libvhdi_read(&[child.clone(), base.clone()], SIZE) {
            assert_eq!(first_diff(&theirs, &model), None, "{fmt:?} libvhdi");
        }
    }
}
