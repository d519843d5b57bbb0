//! Differencing layers: creation with a locator, partial-block writes marked sector by sector
//! in the bitmap (LSB-first), block_status reporting Unallocated for absent sectors, reads of
//! absent sectors returning zeros from the layer; checked against a model and against
//! libvhdi (an independent reader that follows the chain).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use block_io::{BlockDevice, BlockStatus, FileStorage, MemStorage, OpenOptions};
use common::{read_all, s};
use vhdx_format::{create, CreateOptions, ParentRef, Subformat, VhdxFile};

/// Reads `child` over `parent` as a chain would.
fn chain_read(child: &dyn BlockDevice, parent: &dyn BlockDevice) -> Vec<u8> {
    let size = child.info().virtual_size;
    let mut out = read_all(child);
    let mut pos = 0;
    while pos < size {
        let r = child.block_status(pos, size - pos).unwrap();
        if r.status == BlockStatus::Unallocated {
            let a = pos as usize;
            // The layer itself returns zeros for absent sectors.
            assert!(out[a..a + r.len as usize].iter().all(|&b| b == 0));
            parent
                .read_at(&mut out[a..a + r.len as usize], pos)
                .unwrap();
        }
        pos += r.len;
    }
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn partial_writes_mark_only_their_sectors() {
    for lss in [512u32, 4096] {
        let size: u64 = 24 << 20;
        let mut po = CreateOptions::dynamic(size);
        po.block_size = Some(1 << 20);
        po.logical_sector_size = lss;
        let parent = create(MemStorage::new(), &po).unwrap();
        parent.write_at(&vec![0xAA; size as usize], 0).unwrap();
        parent.flush().unwrap();
        let pguid = parent.header().data_write_guid;

        let mut co = CreateOptions::differencing(
            size,
            ParentRef {
                data_write_guid: pguid,
                relative_path: "parent.vhdx".into(),
                absolute_path: Some("C:\\images\\parent.vhdx".into()),
            },
        );
        co.logical_sector_size = lss;
        let mem = std::sync::Arc::new(MemStorage::new());
        let child = create(mem.clone(), &co).unwrap();
        assert_eq!(child.subformat(), Subformat::Differencing);
        let mut model = vec![0xAAu8; size as usize];
        let ls = lss as usize;
        let writes = [
            (ls as u64, pattern(ls, 1)),
            (3 * ls as u64, pattern(2 * ls, 2)),
            ((1 << 20) - ls as u64, pattern(2 * ls, 3)), // spans two blocks
            (5 << 20, pattern(1 << 20, 4)),              // a whole block
            ((7 << 20) + 8 * ls as u64, pattern(ls, 5)),
        ];
        for (off, d) in &writes {
            child.write_at(d, *off).unwrap();
            model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        assert!(chain_read(&child, &parent) == model);
        // Sector 0 is absent; sector 1 present; sector 2 absent.
        let r = child.block_status(0, size).unwrap();
        assert_eq!((r.status, r.len), (BlockStatus::Unallocated, ls as u64));
        let r = child.block_status(ls as u64, size - ls as u64).unwrap();
        assert_eq!((r.status, r.len), (BlockStatus::Data, ls as u64));
        let r = child
            .block_status(2 * ls as u64, size - 2 * ls as u64)
            .unwrap();
        assert_eq!((r.status, r.len), (BlockStatus::Unallocated, ls as u64));
        let r = child.block_status(5 << 20, 1 << 20).unwrap();
        assert_eq!(r.status, BlockStatus::Data);
        child.flush().unwrap();
        child.close().unwrap();
        drop(child);
        // Reopen from the bytes: the bitmap is on disk, LSB-first.
        let child = VhdxFile::open(
            mem.clone(),
            &vhdx_format::OpenOptions::new().read_only(true),
        )
        .unwrap();
        assert!(chain_read(&child, &parent) == model);
        let loc = child.parent_locator().unwrap();
        assert_eq!(loc.parent_linkage(), Some(pguid));
        assert_eq!(loc.relative_path(), Some("parent.vhdx"));
        assert_eq!(loc.absolute_win32_path(), Some("C:\\images\\parent.vhdx"));
        let g = *child.geometry();
        let bm_entry = {
            let bytes = mem.to_vec().unwrap();
            let at = (child.regions().bat.file_offset + g.bitmap_index(0) * 8) as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
        };
        assert_eq!(bm_entry & 7, 6, "sector bitmap block present");
        let bytes = mem.to_vec().unwrap();
        let bm = (bm_entry & !0xFFFFF) as usize;
        // Sector 1 -> bit 1 of byte 0 (LSB-first); sectors 3 and 4 -> bits 3, 4.
        assert_eq!(bytes[bm], 0b0001_1010);
    }
}

#[test]
fn discard_and_zeroes_in_a_child() {
    let size: u64 = 8 << 20;
    let mut po = CreateOptions::dynamic(size);
    po.block_size = Some(1 << 20);
    let parent = create(MemStorage::new(), &po).unwrap();
    parent.write_at(&vec![0x55; size as usize], 0).unwrap();
    let co = CreateOptions {
        block_size: Some(1 << 20),
        ..CreateOptions::differencing(
            size,
            ParentRef {
                data_write_guid: parent.header().data_write_guid,
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        )
    };
    let child = create(MemStorage::new(), &co).unwrap();
    let mut model = vec![0x55u8; size as usize];
    // Whole-block zeroes become a ZERO block: zeros, not the parent.
    child.write_zeroes(1 << 20, 1 << 20, false).unwrap();
    model[1 << 20..2 << 20].fill(0);
    // Partial zeroes over absent sectors must be written (else the parent shows through).
    child.write_zeroes((3 << 20) + 4096, 8192, true).unwrap();
    model[(3 << 20) + 4096..(3 << 20) + 12288].fill(0);
    assert!(chain_read(&child, &parent) == model);
    let r = child.block_status(1 << 20, 1 << 20).unwrap();
    assert_eq!(r.status, BlockStatus::Zero);
}

#[test]
fn libvhdi_reads_our_chain() {
    if !block_io::testing::pyvhdi() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pp = dir.path().join("parent.vhdx");
    let cp = dir.path().join("child.vhdx");
    let size: u64 = 6 << 20;
    let mut po = CreateOptions::dynamic(size);
    po.block_size = Some(1 << 20);
    let parent = create(
        FileStorage::open(&pp, &OpenOptions::new().create(true)).unwrap(),
        &po,
    )
    .unwrap();
    parent.write_at(&pattern(size as usize, 9), 0).unwrap();
    parent.close().unwrap();
    let pguid = parent.header().data_write_guid;
    drop(parent);
    let mut co = CreateOptions::differencing(
        size,
        ParentRef {
            data_write_guid: pguid,
            relative_path: ".\\parent.vhdx".into(),
            absolute_path: Some(s(&pp).into()),
        },
    );
    co.block_size = Some(1 << 20);
    let child = create(
        FileStorage::open(&cp, &OpenOptions::new().create(true)).unwrap(),
        &co,
    )
    .unwrap();
    let mut model = pattern(size as usize, 9);
    for (off, len, seed) in [
        (512u64, 1024usize, 1u8),
        ((2 << 20) - 512, 4096, 2),
        (4 << 20, 1 << 20, 3),
    ] {
        let d = pattern(len, seed);
        child.write_at(&d, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    child.close().unwrap();
    drop(child);
    let out_path = dir.path().join("libvhdi.raw");
    let script = format!(
        "import pyvhdi\nf=pyvhdi.file();f.open('{}')\np=pyvhdi.file();p.open('{}')\nf.set_parent(p)\nopen('{}','wb').write(f.read_buffer_at_offset({size},0))\n",
        s(&cp),
        s(&pp),
        s(&out_path)
    );
    let st = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "pyvhdi: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = std::fs::read(&out_path).unwrap();
    assert!(got == model, "libvhdi reads our chain differently");
}

#[test]
fn block_filled_sector_by_sector_becomes_fully_present() {
    let size: u64 = 4 << 20;
    let co = CreateOptions {
        block_size: Some(1 << 20),
        ..CreateOptions::differencing(
            size,
            ParentRef {
                data_write_guid: uuid::Uuid::from_u128(1),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        )
    };
    let mem = std::sync::Arc::new(MemStorage::new());
    let child = create(mem.clone(), &co).unwrap();
    // Fill block 1 in two halves.
    child.write_at(&vec![1u8; 512 << 10], 1 << 20).unwrap();
    let r = child.block_status(1 << 20, 1 << 20).unwrap();
    assert_eq!((r.status, r.len), (BlockStatus::Data, 512 << 10));
    child
        .write_at(&vec![2u8; 512 << 10], (1 << 20) + (512 << 10))
        .unwrap();
    child.close().unwrap();
    drop(child);
    let bytes = mem.to_vec().unwrap();
    let child = VhdxFile::open(
        MemStorage::from_bytes(&bytes),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    let bat = child.regions().bat.file_offset as usize;
    let idx = child.geometry().payload_index(1) as usize;
    let e = u64::from_le_bytes(bytes[bat + 8 * idx..bat + 8 * idx + 8].try_into().unwrap());
    assert_eq!(e & 7, 6, "promoted to FULLY_PRESENT on disk");
    let r = child.block_status(1 << 20, 1 << 20).unwrap();
    assert_eq!((r.status, r.len), (BlockStatus::Data, 1 << 20));
    let mut b = vec![0u8; 1 << 20];
    child.read_at(&mut b, 1 << 20).unwrap();
    assert!(b[..512 << 10].iter().all(|&x| x == 1) && b[512 << 10..].iter().all(|&x| x == 2));
}
