//! Interop with qemu-img/qemu-io (`-f vpc`) both ways: images qemu makes and writes read
//! byte-identical to `qemu-img convert -O raw`; images we make and write compare equal (in
//! qemu) to a raw model. Note: `qemu-img check` does not support vpc (exit 63, "does not
//! support checks"); we run it and accept 0 or 63, and rely on info/compare for the rest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, FileStorage, OpenOptions};
use common::{have_qemu, pattern, run, s};
use vhd_format::{CreateOptions, DiskType, Subformat, VhdFile};

fn open_file(path: &std::path::Path, read_only: bool) -> VhdFile<FileStorage> {
    let st = FileStorage::open(path, &OpenOptions::new().read_only(read_only)).unwrap();
    VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(read_only)).unwrap()
}

/// (subformat, size argument, force_size)
const QEMU_CASES: &[(&str, &str, bool)] = &[
    ("dynamic", "10M", false),
    ("dynamic", "5243392", true),  // 5 MiB + 1 KiB, odd
    ("dynamic", "7000000", false), // CHS-rounded
    ("fixed", "3M", false),
    ("fixed", "3146240", true), // 3 MiB + 512
];

#[test]
fn qemu_made_images_read_identically() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, &(sub, size, force)) in QEMU_CASES.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.vhd"));
        let raw = dir.path().join(format!("q{i}.raw"));
        let opts = format!(
            "subformat={sub},force_size={}",
            if force { "on" } else { "off" }
        );
        run(
            "qemu-img",
            &["create", "-q", "-f", "vpc", "-o", &opts, s(&img), size],
        );
        // Patterned writes: inside a block, across a block boundary, single sectors, the end.
        let vsize = open_file(&img, true).info().virtual_size;
        let writes = [
            (0u64, 4096u64, 0x11),
            (2 * 1024 * 1024 - 1024, 8192, 0x22),
            (1536, 512, 0x33),
            (vsize - 512, 512, 0x44),
            (vsize / 2 / 512 * 512, 65536.min(vsize / 2), 0x55),
        ];
        for (off, len, p) in writes {
            let cmd = format!("write -P {p:#x} {off} {len}");
            run("qemu-io", &["-f", "vpc", "-c", &cmd, s(&img)]);
        }
        run(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", s(&img), s(&raw)],
        );
        let want = std::fs::read(&raw).unwrap();
        let f = open_file(&img, true);
        assert_eq!(f.info().virtual_size, want.len() as u64, "case {i}");
        let mut got = vec![0u8; want.len()];
        f.read_at(&mut got, 0).unwrap();
        assert!(got == want, "case {i} ({sub} {size} force={force}) differs");
        let d = f.details();
        assert_eq!(
            d.disk_type,
            if sub == "fixed" {
                DiskType::Fixed
            } else {
                DiskType::Dynamic
            }
        );
        assert_eq!(d.creator_app, if force { "qem2" } else { "qemu" });
        assert!(f.check().unwrap().is_clean());
        // Then write through us and let qemu read it back.
        drop(f);
        let f = open_file(&img, false);
        let data = pattern(i as u64, 12288);
        let off = (vsize / 3) / 512 * 512;
        f.write_at(&data, off).unwrap();
        f.flush().unwrap();
        drop(f);
        let raw2 = dir.path().join(format!("q{i}b.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", s(&img), s(&raw2)],
        );
        let mut model = want.clone();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        assert!(
            std::fs::read(&raw2).unwrap() == model,
            "case {i}: qemu reads our write"
        );
    }
}

/// Creates an image with us, writes patterns, and has qemu compare it with a raw model.
fn ours_to_qemu(dir: &std::path::Path, name: &str, opts: &CreateOptions) {
    let img = dir.join(format!("{name}.vhd"));
    let raw = dir.join(format!("{name}.raw"));
    let st = FileStorage::open(&img, &OpenOptions::new().create(true)).unwrap();
    let f = Arc::new(VhdFile::create(st, opts).unwrap());
    let size = f.info().virtual_size;
    let mut model = vec![0u8; size as usize];
    let bs = u64::from(opts.block_size);
    let writes = [
        (0u64, 4096u64),
        (bs - 512, 1024),
        (bs * 2 + 512, 512),
        (size - 4096, 4096),
        (size / 2 / 512 * 512, (3 * bs).min(size / 2) / 512 * 512),
    ];
    for (k, (off, len)) in writes.into_iter().enumerate() {
        if off >= size {
            continue;
        }
        let len = len.min(size - off);
        let data = pattern(k as u64 + 100, len as usize);
        f.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    f.flush().unwrap();
    drop(f);
    std::fs::write(&raw, &model).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vpc", s(&img)])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(63)),
        "{name}: qemu-img check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = run("qemu-img", &["info", "-f", "vpc", "--output=json", s(&img)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{name}: qemu sees another size: {info}"
    );
    run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(&img), s(&raw)],
    );
    if opts.subformat == Subformat::Fixed {
        assert_eq!(std::fs::metadata(&img).unwrap().len(), size + 512);
    }
}

#[test]
fn our_images_compare_equal_in_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    let mut o = CreateOptions::new(10 << 20, Subformat::Dynamic);
    cases.push(("dyn_exact", o.clone()));
    o.size = 5 * 1024 * 1024 + 3 * 512; // odd size
    cases.push(("dyn_odd", o.clone()));
    o.block_size = 512 * 1024;
    cases.push(("dyn_small_blocks", o.clone()));
    o.chs_size = true;
    o.block_size = 2 << 20;
    o.size = 7_000_000;
    cases.push(("dyn_chs", o.clone()));
    let mut f = CreateOptions::new(4 << 20, Subformat::Fixed);
    cases.push(("fixed_azure", f.clone()));
    f.size = 3 * 1024 * 1024 + 512;
    cases.push(("fixed_odd", f.clone()));
    f.chs_size = true;
    cases.push(("fixed_chs", f));
    for (name, o) in &cases {
        ours_to_qemu(dir.path(), name, o);
    }
}

#[test]
fn chs_size_matches_qemu_default_sizing() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for size in [7_000_000u64, 1 << 30, 100 << 20] {
        let img = dir.path().join("c.vhd");
        let _ = std::fs::remove_file(&img);
        run(
            "qemu-img",
            &["create", "-q", "-f", "vpc", s(&img), &size.to_string()],
        );
        let theirs = open_file(&img, true).details();
        let (ours, geo) = vhd_format::size_and_geometry(size, true).unwrap();
        assert_eq!(theirs.virtual_size, ours, "size {size}");
        assert_eq!(theirs.geometry, geo, "size {size}");
    }
}
