//! Regression tests for the defects a new user found (issue 10), each at the CLI, where the
//! user met it: data loss through a destination that is a source, errors that hid their cause,
//! `check -r` parsing and a dirty log reported as corruption, `map` memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;

use vdisk::block_io::Storage;

/// The stderr of a run that must fail, asserting it failed.
fn fails(args: &[&str]) -> String {
    let o = vdisk(args);
    assert!(
        !o.status.success(),
        "vdisk {args:?} succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stderr).unwrap()
}

/// `vdisk io -r IMG -c 'read -P 0xab 0 64k'` passes: the data is still there.
fn still_holds_ab(img: &str) {
    vdisk_ok(&["io", "-r", img, "-c", "read -P 0xab 0 64k"]);
}

// Item 1: `convert SRC DST` where DST is a file SRC reads lost the data (raw, VHD) or
// truncated the source before failing (VHDX).
#[test]
fn convert_refuses_a_destination_that_is_a_source_layer() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["raw", "vhd", "vhdx"] {
        let s = p(&dir, &format!("s.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &s, "4M"]);
        vdisk_ok(&["io", &s, "-c", "write -P 0xab 0 64k"]);
        let hard = p(&dir, &format!("hard.{fmt}"));
        let soft = p(&dir, &format!("soft.{fmt}"));
        std::fs::hard_link(&s, &hard).unwrap();
        std::os::unix::fs::symlink(&s, &soft).unwrap();
        let before = std::fs::read(&s).unwrap();
        for out in ["raw", "vhd", "vhdx"] {
            // The same name, a hard link, a symlink; and the source named through either.
            for (src, dst) in [(&s, &s), (&s, &hard), (&s, &soft), (&soft, &s), (&hard, &s)] {
                let err = fails(&["convert", "-O", out, src, dst]);
                assert!(err.contains("same file"), "{fmt}->{out} {dst}: {err}");
            }
        }
        assert_eq!(std::fs::read(&s).unwrap(), before, "{fmt} source changed");
        still_holds_ab(&s);
    }
    // A parent (or grandparent) in the source's chain, for both formats with children.
    for fmt in ["vhd", "vhdx"] {
        let base = p(&dir, &format!("base.{fmt}"));
        let mid = p(&dir, &format!("mid.{fmt}"));
        let top = p(&dir, &format!("top.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &base, "4M"]);
        vdisk_ok(&["io", &base, "-c", "write -P 0xab 0 64k"]);
        vdisk_ok(&["create", "-f", fmt, "-b", &base, &mid]);
        vdisk_ok(&["create", "-f", fmt, "-b", &mid, &top]);
        let before = (std::fs::read(&base).unwrap(), std::fs::read(&mid).unwrap());
        for dst in [&base, &mid] {
            let err = fails(&["convert", "-O", fmt, &top, dst]);
            assert!(err.contains("same file"), "{fmt} {dst}: {err}");
        }
        let after = (std::fs::read(&base).unwrap(), std::fs::read(&mid).unwrap());
        assert!(before == after, "{fmt}: a parent changed");
        still_holds_ab(&top);
    }
    // A different file is still fine.
    let s = p(&dir, "s.raw");
    vdisk_ok(&["convert", "-O", "vhdx", &s, &p(&dir, "other.vhdx")]);
}

// Item 2: `create -b P P` overwrote the parent with a child naming itself.
#[test]
fn create_refuses_a_parent_that_is_the_new_image() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["vhd", "vhdx"] {
        let parent = p(&dir, &format!("p.{fmt}"));
        let child = p(&dir, &format!("c.{fmt}"));
        let link = p(&dir, &format!("link.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &parent, "4M"]);
        vdisk_ok(&["io", &parent, "-c", "write -P 0xab 0 64k"]);
        vdisk_ok(&["create", "-f", fmt, "-b", &parent, &child]);
        std::os::unix::fs::symlink(&parent, &link).unwrap();
        let before = std::fs::read(&parent).unwrap();
        // The parent itself, through a symlink, and the child's own parent under the child.
        for (b, img) in [(&parent, &parent), (&link, &parent), (&parent, &link)] {
            let err = fails(&["create", "-f", fmt, "-b", b, img]);
            assert!(err.contains("same file"), "{fmt} -b {b} {img}: {err}");
        }
        let err = fails(&["create", "-f", fmt, "-b", &child, &parent]);
        assert!(err.contains("same file"), "{fmt} ancestor: {err}");
        assert_eq!(
            std::fs::read(&parent).unwrap(),
            before,
            "{fmt} parent changed"
        );
        still_holds_ab(&child);
    }
}

/// Rewrites a VHDX's region-table entry counts so neither table's checksum matches.
fn break_region_tables(path: &str) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for table in [192u64 << 10, 256 << 10] {
        f.write_all_at(&5u32.to_le_bytes(), table + 8).unwrap();
    }
}

// Item 4: io, convert, map and compare printed only "cannot open PATH".
#[test]
fn every_verb_names_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, other) = (p(&dir, "b.vhdx"), p(&dir, "t.vhdx"), p(&dir, "o.raw"));
    vdisk_ok(&["create", "-f", "vhdx", &base, "4M"]);
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &top]);
    vdisk_ok(&["create", &other, "4M"]);
    let dst = p(&dir, "out.raw");
    let verbs = |img: &str| -> Vec<Vec<String>> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        vec![
            v(&["io", img, "-c", "read 0 512"]),
            v(&["io", "-r", img, "-c", "read 0 512"]),
            v(&["convert", "-O", "raw", img, &dst]),
            v(&["map", img]),
            v(&["map", "--output", "json", img]),
            v(&["compare", img, &other]),
            v(&["compare", &other, img]),
            v(&["info", "--backing-chain", img]),
        ]
    };
    // A malformed parent, then a malformed image itself: the reason is named.
    break_region_tables(&base);
    for img in [&top, &base] {
        for args in verbs(img) {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            let err = fails(&a);
            assert!(err.contains("checksum mismatch"), "{a:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{a:?}: not one line: {err}");
        }
    }
    // The job verbs: on the malformed image itself, and through a child over it (compact
    // works on the child alone and never opens its parent).
    for a in [
        vec!["compact", base.as_str()],
        vec!["resize", base.as_str(), "+1M"],
        vec!["resize", top.as_str(), "+1M"],
        vec!["commit", top.as_str()],
    ] {
        let err = fails(&a);
        assert!(err.contains("checksum mismatch"), "{a:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{a:?}: not one line: {err}");
    }
    // check names it too (in its report).
    let o = vdisk(&["check", &top]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stdout).contains("checksum mismatch"));
    // A missing parent: the error says the parent was not found and where it looked.
    std::fs::remove_file(&base).unwrap();
    for args in verbs(&top) {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        if a[0] == "info" {
            continue; // info --backing-chain reports a missing parent in its output
        }
        let err = fails(&a);
        assert!(
            err.contains("parent") && err.contains("not found"),
            "{a:?}: {err}"
        );
    }
    for a in [
        vec!["resize", top.as_str(), "+1M"],
        vec!["commit", top.as_str()],
    ] {
        let err = fails(&a);
        assert!(
            err.contains("parent") && err.contains("not found"),
            "{a:?}: {err}"
        );
    }
}

/// A VHDX whose log needs replay: the qemu-made fuzz seed (left by a killed qemu-io).
fn dirty_log_image(path: &Path) {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/vhdx_open/qemu_dirty_log");
    let m = vdisk::vhdx_format::fuzzing::materialize(&std::fs::read(seed).unwrap()).unwrap();
    let mut bytes = vec![0u8; m.len().unwrap() as usize];
    m.read_at(&mut bytes, 0).unwrap();
    std::fs::write(path, bytes).unwrap();
}

// Item 5: `check -r IMG` was a usage error, `-r nonsense` accepted, a dirty log an error.
#[test]
fn check_repair_modes_and_a_dirty_log() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(&dir, "d.vhdx");
    dirty_log_image(dir.path().join("d.vhdx").as_path());
    let dirty = |img: &str| vdisk_json(&["info", "--output", "json", img])["log_dirty"] == true;
    assert!(dirty(&img));
    // Plain check: clean, exit 0, and a note (not an error) that the log awaits replay.
    let o = vdisk(&["check", &img]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("No errors"), "{out}");
    assert!(
        err.contains("normal state after a crash") && err.contains("-r"),
        "{err}"
    );
    assert!(dirty(&img), "a plain check wrote the image");
    let j = vdisk_json(&["check", "--output", "json", &img]);
    assert_eq!(j["check-errors"], 0, "{j}");
    // Modes: a wrong one is refused before anything is written.
    let err = fails(&["check", "-r", "nonsense", &img]);
    assert!(err.contains("unknown repair mode 'nonsense'"), "{err}");
    assert!(dirty(&img));
    // `-r IMG` (mode left out) repairs: the log is replayed into the file.
    let out = vdisk_ok(&["check", "-r", &img]);
    assert!(out.contains("Repaired: replayed the log"), "{out}");
    assert!(!dirty(&img));
    // `-r leaks` and `-r all` parse and pass on the clean image.
    for mode in ["leaks", "all"] {
        let out = vdisk_ok(&["check", "-r", mode, &img]);
        assert!(out.contains("No errors"), "{mode}: {out}");
    }
    // The mode alone, with no image, is a usage error naming what is missing.
    let err = fails(&["check", "-r", "all"]);
    assert!(err.contains("needs an image"), "{err}");
}

/// Peak RSS in KiB of `vdisk ARGS` with stdout discarded, from `wait4`.
#[allow(clippy::zombie_processes)] // reaped by wait4, which std's Child does not offer
fn peak_rss_kib(args: &[&str]) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    let child = std::process::Command::new(vdisk_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; the pid is our own child, reaped here.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a status and a rusage living across the call.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    let st = std::process::ExitStatus::from_raw(status);
    assert!(st.success(), "vdisk {args:?}: {st}");
    ru.ru_maxrss
}

/// The BAT region's file offset in a VHDX (region table 1, MS-VHDX 2.2.3).
fn bat_offset(img: &[u8]) -> usize {
    // 2DC27766-F623-4200-9D64-115E9BFD4A08 in the on-disk mixed-endian layout.
    let bat = [
        0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A,
        0x08,
    ];
    let t = 192 << 10;
    let n = u32::from_le_bytes(img[t + 8..t + 12].try_into().unwrap()) as usize;
    (0..n)
        .map(|i| t + 16 + 32 * i)
        .find(|&e| img[e..e + 16] == bat)
        .map(|e| u64::from_le_bytes(img[e + 16..e + 24].try_into().unwrap()) as usize)
        .unwrap()
}

// Item 8: `map --output json` kept every run (~1.1 KB each) in memory.
#[test]
fn map_streams_runs_in_constant_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(&dir, "alt.vhdx");
    // 256 GiB of 1 MiB blocks (chunk ratio 4096): every even block ZERO, every odd block
    // NOT_PRESENT, so no two neighbouring blocks form one run.
    vdisk_ok(&["create", "-f", "vhdx", "-o", "block_size=1M", &img, "256G"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let bat = bat_offset(&bytes);
    let blocks: usize = 256 << 10;
    for b in (0..blocks).step_by(2) {
        let i = bat + 8 * (b + b / 4096);
        bytes[i..i + 8].copy_from_slice(&2u64.to_le_bytes()); // MS-VHDX 2.5.1.1: ZERO
    }
    std::fs::write(&img, &bytes).unwrap();
    drop(bytes);
    // 256 Ki runs held in memory took ~290 MiB; streamed, the process stays small (the BAT
    // is 2 MiB). Measured first: a child spawned with CLONE_VM inherits this process's peak
    // so far, which must stay small until then.
    let kib = peak_rss_kib(&["map", "--output", "json", &img]);
    assert!(kib < 64 << 10, "map peak RSS {kib} KiB");
    // The runs are all there and alternate.
    let out = vdisk_ok(&["map", "--output", "json", &img]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(runs.len(), blocks);
    assert!(runs.iter().step_by(2).all(|r| r["present"] == true));
    assert!(runs
        .iter()
        .skip(1)
        .step_by(2)
        .all(|r| r["present"] == false));
}

// Item 9: a VHDX with 4096-byte logical sectors reported 512-byte physical sectors.
#[test]
fn vhdx_physical_sectors_are_never_smaller_than_logical() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = |img: &str| {
        let j = vdisk_json(&["info", "--output", "json", img]);
        (
            j["logical_sector_size"].clone(),
            j["physical_sector_size"].clone(),
        )
    };
    let a = p(&dir, "a.vhdx");
    vdisk_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "logical_sector_size=4096",
        &a,
        "8M",
    ]);
    assert_eq!(sizes(&a), (4096.into(), 4096.into()));
    // qemu-img's default stays: 512/512.
    let b = p(&dir, "b.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &b, "8M"]);
    assert_eq!(sizes(&b), (512.into(), 512.into()));
    // An explicit smaller physical size is refused, and nothing is left behind.
    let c = p(&dir, "c.vhdx");
    let err = fails(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "logical_sector_size=4096,physical_sector_size=512",
        &c,
        "8M",
    ]);
    assert!(err.contains("physical"), "{err}");
    assert!(
        !std::path::Path::new(&c).exists(),
        "a refused create left {c}"
    );
}
