//! Our log, replayed by qemu: power is cut in the middle of our commit (after the log entry
//! is durable, before the BAT is written in place), and `qemu-img check -r all` must replay
//! our entry to the same content our own read-only open shows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage};
use common::{oracle, read_all, run, s};
use vhdx_format::{create, CreateOptions, VhdxFile};

#[test]
fn qemu_replays_our_dirty_log() {
    if !oracle("qemu-img") {
        return;
    }
    let size: u64 = 8 << 20;
    let mem = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(size);
    o.block_size = Some(1 << 20);
    drop(create(mem.clone(), &o).unwrap());
    let base = mem.as_ref().clone();
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i / 512) as u8 | 1).collect();
    // Dry run to count operations.
    let fs = Arc::new(FaultStorage::new(base.clone()));
    let dev = VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap();
    dev.write_at(&data, 1 << 20).unwrap();
    dev.flush().unwrap();
    std::mem::forget(dev);
    let total = fs.ops();
    let dir = tempfile::tempdir().unwrap();
    let mut dirty = 0;
    for n in 0..total {
        let fs = Arc::new(FaultStorage::new(base.clone()));
        fs.set_cut(CutPoint::AfterOps(n));
        let dev = VhdxFile::open(
            fs.clone(),
            &vhdx_format::OpenOptions::new().read_only(false),
        )
        .unwrap();
        let _ = dev.write_at(&data, 1 << 20).and_then(|_| dev.flush());
        std::mem::forget(dev);
        let img = fs.durable_image();
        let ro = VhdxFile::open(
            img.clone(),
            &vhdx_format::OpenOptions::new().read_only(true),
        )
        .unwrap();
        if !ro.details().log_dirty {
            continue;
        }
        dirty += 1;
        let ours = read_all(&ro);
        let p = dir.path().join(format!("c{n}.vhdx"));
        std::fs::write(&p, img.to_vec().unwrap()).unwrap();
        let _ = std::process::Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx", s(&p)])
            .output()
            .unwrap();
        let raw = dir.path().join(format!("c{n}.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "vhdx", "-O", "raw", s(&p), s(&raw)],
        );
        assert!(
            std::fs::read(&raw).unwrap() == ours,
            "cut {n}: qemu replays differently"
        );
        // The replayed entry carried the new block's mapping.
        assert!(ours[1 << 20..(1 << 20) + 512] == data[..512]);
    }
    assert!(dirty > 0, "no cut point left a dirty log");
}
