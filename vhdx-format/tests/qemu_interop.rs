//! Interop with qemu-img/qemu-io: images qemu creates and writes read byte-identical to
//! `qemu-img convert -O raw`; images we create and write pass `qemu-img check` and compare
//! equal to a raw model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use block_io::{BlockDevice, BlockStatus, FileStorage, OpenOptions};
use common::{oracle, read_all, run, s};
use vhdx_format::{create, CreateOptions, Subformat, VhdxFile};

fn open_ro(p: &std::path::Path) -> VhdxFile<FileStorage> {
    let st = FileStorage::open(p, &OpenOptions::new().read_only(true)).unwrap();
    VhdxFile::open(st, &vhdx_format::OpenOptions::new().read_only(true)).unwrap()
}

fn qemu_case(size: u64, block_mib: u32, fixed: bool, zero: bool, writes: &[(u64, u64, u8)]) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhdx");
    let raw = dir.path().join("a.raw");
    let opts = format!(
        "subformat={},block_size={}M,block_state_zero={}",
        if fixed { "fixed" } else { "dynamic" },
        block_mib,
        if zero { "on" } else { "off" }
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &opts,
            s(&img),
            &size.to_string(),
        ],
    );
    for (off, len, pat) in writes {
        run(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                &format!("write -P {pat:#x} {off} {len}"),
                s(&img),
            ],
        );
    }
    run(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", s(&img), s(&raw)],
    );
    let expect = std::fs::read(&raw).unwrap();
    let f = open_ro(&img);
    assert_eq!(f.info().virtual_size, size);
    assert_eq!(f.metadata().block_size, block_mib << 20);
    assert_eq!(
        f.subformat(),
        if fixed {
            Subformat::Fixed
        } else {
            Subformat::Dynamic
        }
    );
    let got = read_all(&f);
    assert!(
        got == expect,
        "{opts} size {size}: content differs from qemu's"
    );
    // block_status never claims zeros where qemu has data.
    let mut pos = 0;
    while pos < size {
        let r = f.block_status(pos, size - pos).unwrap();
        if r.status != BlockStatus::Data {
            let a = pos as usize;
            assert!(expect[a..a + r.len as usize].iter().all(|&b| b == 0));
        }
        pos += r.len;
    }
}

#[test]
fn reads_qemu_images_of_many_shapes() {
    if !oracle("qemu-img") || !oracle("qemu-io") {
        return;
    }
    let odd = (67 << 20) + 3 * 512;
    for (size, bs, fixed, zero) in [
        (odd, 1, false, true),
        (odd, 1, false, false),
        (odd, 8, false, true),
        (odd, 32, false, false),
        (odd, 256, false, true),
        (odd, 8, true, true),
        (odd, 8, true, false),
        (64 << 20, 32, true, false),
    ] {
        let writes = [
            (0u64, 4096u64, 0x11u8),
            (1 << 20, 65536, 0x22),
            ((9 << 20) - 512, 8192, 0x33),
            (size - 4096 - 512, 4096, 0x44),
        ];
        qemu_case(size, bs, fixed, zero, &writes);
    }
}

#[test]
fn reads_qemu_default_image() {
    if !oracle("qemu-img") || !oracle("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    run("qemu-img", &["create", "-q", "-f", "vhdx", s(&img), "3G"]);
    run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0x5a 2147483136 1048576",
            s(&img),
        ],
    );
    let f = open_ro(&img);
    assert_eq!(f.metadata().block_size, 16 << 20);
    assert_eq!(
        f.metadata().block_size,
        vhdx_format::default_block_size(3 << 30)
    );
    let mut buf = vec![0u8; 2 << 20];
    f.read_at(&mut buf, (2 << 30) - (1 << 20)).unwrap();
    assert!(buf[..(1 << 20) - 512].iter().all(|&b| b == 0));
    assert!(buf[(1 << 20) - 512..(2 << 20) - 512]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(buf[(2 << 20) - 512..].iter().all(|&b| b == 0));
    let d = f.details();
    assert!(!d.log_dirty);
    assert!(d.creator.contains("QEMU"), "creator {:?}", d.creator);
}

fn model_write(model: &mut [u8], off: u64, data: &[u8]) {
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    if !oracle("qemu-img") {
        return;
    }
    for (sub, bs, lss, zero) in [
        (Subformat::Dynamic, Some(1u32 << 20), 512u32, false),
        (Subformat::Dynamic, None, 512, true),
        (Subformat::Dynamic, Some(8 << 20), 4096, false),
        (Subformat::Dynamic, Some(256 << 20), 512, false),
        (Subformat::Fixed, Some(2 << 20), 512, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("o.vhdx");
        let rawp = dir.path().join("o.raw");
        let size: u64 = (40 << 20) + 8192;
        let st = FileStorage::open(&img, &OpenOptions::new().create(true)).unwrap();
        let mut o = if sub == Subformat::Fixed {
            CreateOptions::fixed(size)
        } else {
            CreateOptions::dynamic(size)
        };
        o.block_size = bs;
        o.logical_sector_size = lss;
        o.block_state_zero = zero;
        let f = create(st, &o).unwrap();
        let mut model = vec![0u8; size as usize];
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (0, vec![1u8; 8192]),
            (3 << 20, (0..(5 << 20)).map(|i| (i % 253) as u8).collect()),
            (size - 8192, vec![7u8; 8192]),
            (4 << 20, vec![9u8; 4096]),
        ];
        for (off, d) in &writes {
            f.write_at(d, *off).unwrap();
            model_write(&mut model, *off, d);
        }
        f.flush().unwrap();
        f.write_zeroes(3 << 20, 4 << 20, true).unwrap();
        model_write(&mut model, 3 << 20, &vec![0u8; 4 << 20]);
        f.discard(20 << 20, 8 << 20).unwrap();
        model_write(&mut model, 20 << 20, &vec![0u8; 8 << 20]);
        assert!(read_all(&f) == model);
        f.close().unwrap();
        drop(f);
        // qemu refuses 4096-byte logical sectors ("Operation not supported").
        if lss == 4096 {
            let f = open_ro(&img);
            assert!(read_all(&f) == model);
            continue;
        }
        std::fs::write(&rawp, &model).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx", s(&img)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        run(
            "qemu-img",
            &["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&rawp)],
        );
        let info = run("qemu-img", &["info", "--output=json", s(&img)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        // And we read it back after reopening.
        let f = open_ro(&img);
        assert!(read_all(&f) == model);
    }
}

#[test]
fn our_defaults_match_qemu_layout() {
    if !oracle("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for size in [64u64 << 20, 3 << 30, 200 << 30] {
        let q = dir.path().join("q.vhdx");
        let _ = std::fs::remove_file(&q);
        run(
            "qemu-img",
            &["create", "-q", "-f", "vhdx", s(&q), &size.to_string()],
        );
        let theirs = open_ro(&q);
        let o = dir.path().join("o.vhdx");
        let _ = std::fs::remove_file(&o);
        let st = FileStorage::open(&o, &OpenOptions::new().create(true)).unwrap();
        let ours = create(st, &CreateOptions::dynamic(size)).unwrap();
        let (t, u) = (theirs.details(), ours.details());
        assert_eq!(t.block_size, u.block_size, "block size for {size}");
        assert_eq!(t.log_size, u.log_size);
        assert_eq!(t.logical_sector_size, u.logical_sector_size);
        assert_eq!(t.physical_sector_size, u.physical_sector_size);
        assert_eq!(
            theirs.header().log_offset,
            ours.header().log_offset,
            "log offset"
        );
        assert_eq!(
            theirs.regions().metadata.file_offset,
            ours.regions().metadata.file_offset
        );
        assert_eq!(
            theirs.regions().bat.file_offset,
            ours.regions().bat.file_offset
        );
    }
}
