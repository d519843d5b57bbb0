//! `vdisk commit [-b BASE] [--keep|--delete] [-p] [--rate] CHILD` on VHD and VHDX chains:
//! the committed image reads exactly what the chain read before (`vdisk compare`, and
//! `qemu-img compare` / `qemu-img check` for non-differencing results, libvhdi's `vhdiinfo`
//! and `pyvhdi` for differencing ones), merged layers kept or deleted, the chain that remains
//! opens with lineage checks on, and a base held by another writer is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};

/// base (data), mid (data over it), top (data, zeroed runs): returns their paths and a raw
/// flattening of top.
fn chain(dir: &Path, fmt: &str) -> (String, String, String, String) {
    let (base, mid, top) = (
        p(dir, &format!("base.{fmt}")),
        p(dir, &format!("mid.{fmt}")),
        p(dir, &format!("top.{fmt}")),
    );
    vdisk_ok(&["create", "-f", fmt, &base, "16M"]);
    vdisk_ok(&[
        "io",
        &base,
        "-c",
        "write -P 7 0 3M",
        "-c",
        "write -P 3 9M 1M",
    ]);
    vdisk_ok(&["create", "-f", fmt, "-b", &base, &mid]);
    vdisk_ok(&[
        "io",
        &mid,
        "-c",
        "write -P 8 1M 1M",
        "-c",
        "write -P 5 7M 4k",
        "-c",
        "write -P 6 9M 512",
    ]);
    vdisk_ok(&["create", "-f", fmt, "-b", &mid, &top]);
    vdisk_ok(&[
        "io",
        &top,
        "-c",
        "write -P 9 1536k 4k",
        "-c",
        "write -P 10 2047k 3k",
        "-c",
        "write -z 9M 64k",
        "-c",
        "write -P 11 12M 2M",
    ]);
    let before = p(dir, "before.raw");
    vdisk_ok(&["convert", "-O", "raw", &top, &before]);
    (base, mid, top, before)
}

fn qemu_fmt(fmt: &str) -> &str {
    if fmt == "vhd" {
        "vpc"
    } else {
        "vhdx"
    }
}

/// libvhdi reads `child` over `parent` and must see `expect`'s bytes.
fn pyvhdi_equal(child: &str, parent: &str, grand: Option<&str>, expect: &str) {
    let py = Path::new("/usr/bin/python3");
    if !py.is_file() || oracle("vhdiinfo").is_none() {
        return;
    }
    let info = run(Path::new("vhdiinfo"), &[child]);
    assert!(info.status.success(), "vhdiinfo {child}: {info:?}");
    let script = r#"
import sys, pyvhdi
paths = sys.argv[1:-1]
files = []
for p in paths:
    f = pyvhdi.file(); f.open(p); files.append(f)
for a, b in zip(files, files[1:]):
    a.set_parent(b)
top = files[0]
want = open(sys.argv[-1], 'rb').read()
got = top.read_buffer_at_offset(len(want), 0)
if got != want:
    bad = next(i for i in range(len(want)) if got[i] != want[i])
    print('differ at', bad); sys.exit(1)
"#;
    let mut args = vec!["-c", script, child, parent];
    if let Some(g) = grand {
        args.push(g);
    }
    args.push(expect);
    let o = run(py, &args);
    if String::from_utf8_lossy(&o.stderr).contains("No module named") {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("pyvhdi is not installed; CI must install it");
        }
        eprintln!("!!! WARNING: pyvhdi not importable; this oracle check is SKIPPED !!!");
        return;
    }
    assert!(o.status.success(), "pyvhdi {child}: {o:?}");
}

#[test]
fn commit_into_the_root_base_deletes_and_matches_qemu() {
    let Some(qemu) = oracle("qemu-img") else {
        return;
    };
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let (base, mid, top, before) = chain(d.path(), fmt);
        let out = vdisk_ok(&["commit", "-b", &base, "--delete", "-p", &top]);
        assert!(out.contains("Image committed."), "{out}");
        assert!(!Path::new(&mid).exists() && !Path::new(&top).exists());
        vdisk_ok(&["compare", &base, &before]);
        let o = run(
            &qemu,
            &["compare", "-f", qemu_fmt(fmt), "-F", "raw", &base, &before],
        );
        assert!(o.status.success(), "qemu-img compare {fmt}: {o:?}");
        if fmt == "vhdx" {
            let o = run(&qemu, &["check", "-f", "vhdx", &base]);
            assert!(o.status.success(), "qemu-img check: {o:?}");
        } else {
            let o = run(&qemu, &["info", "-f", "vpc", &base]);
            assert!(o.status.success(), "qemu-img info: {o:?}");
        }
        vdisk_ok(&["check", &base]);
    }
}

#[test]
fn commit_into_the_parent_keeps_layers_and_libvhdi_reads_the_result() {
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let (base, mid, top, before) = chain(d.path(), fmt);
        let out = vdisk_ok(&["commit", "--rate", "64M", &top]);
        assert!(out.contains("Image committed."), "{out}");
        // Kept (stale) by default; mid now reads what top read, over base.
        assert!(Path::new(&top).exists());
        vdisk_ok(&["compare", &mid, &before]);
        vdisk_ok(&["check", &mid]);
        pyvhdi_equal(&mid, &base, None, &before);
        // mid's chain opens with lineage checks on (info walks it).
        vdisk_ok(&["info", "--backing-chain", &mid]);
        // The stale VHDX top no longer opens over mid (its lineage check fails).
        if fmt == "vhdx" {
            let o = vdisk(&["compare", &top, &before]);
            assert!(!o.status.success(), "stale top opened: {o:?}");
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("DataWriteGuid"),
                "{o:?}"
            );
        }
    }
}

#[test]
fn commit_two_layers_deep_then_the_rest() {
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let (base, mid, top, before) = chain(d.path(), fmt);
        // -d keeps, as qemu-img's -d keeps the child.
        vdisk_ok(&["commit", "-d", "-b", &base, &top]);
        assert!(Path::new(&mid).exists() && Path::new(&top).exists());
        if fmt == "vhdx" {
            // mid (BASE's child, unlinked by the job) no longer opens over base.
            let o = vdisk(&["compare", &mid, &before]);
            assert!(!o.status.success(), "stale mid opened: {o:?}");
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("DataWriteGuid"),
                "{o:?}"
            );
        }
        vdisk_ok(&["compare", &base, &before]);
        vdisk_ok(&["check", &base]);
    }
}

#[test]
fn refusals_leave_the_chain_alone() {
    let d = tempfile::tempdir().unwrap();
    let (base, _mid, top, before) = chain(d.path(), "vhdx");
    // Not in the chain.
    let other = p(d.path(), "other.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &other, "16M"]);
    let o = vdisk(&["commit", "-b", &other, &top]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a backing file"));
    // A base image with nothing under it.
    let o = vdisk(&["commit", &base]);
    assert!(!o.status.success());
    vdisk_ok(&["compare", &top, &before]);

    // A base another process writes: locked, nothing changed.
    let Some(qio) = oracle("qemu-io") else {
        return;
    };
    let mut holder = Command::new(qio)
        .args(["-f", "vhdx", &base])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = vdisk(&["commit", "-b", &base, &top]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(!o.status.success(), "commit under a writer: {o:?}");
    assert!(err.to_lowercase().contains("lock"), "{err}");
    vdisk_ok(&["compare", &top, &before]);
}

/// `vdisk stress IMG --job merge`: guests on a temporary child of IMG while it is committed
/// into IMG; zero mismatches, the child removed, IMG checks clean.
#[test]
fn stress_merge_zero_mismatches() {
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let img = p(d.path(), &format!("s.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &img, "32M"]);
        vdisk_ok(&["io", &img, "-c", "write -P 3 0 8M"]);
        let out = vdisk_ok(&[
            "stress",
            &img,
            "--job",
            "merge",
            "--seconds",
            "3",
            "--threads",
            "3",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["mismatches"], 0, "{fmt}: {v}");
        assert_eq!(v["errors"], 0, "{fmt}: {v}");
        assert_eq!(v["job"], "completed", "{fmt}: {v}");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{fmt}: the temporary child was removed");
        vdisk_ok(&["check", &img]);
    }
    // A raw image has no children: refused.
    let d = tempfile::tempdir().unwrap();
    let raw = p(d.path(), "r.raw");
    vdisk_ok(&["create", &raw, "8M"]);
    let o = vdisk(&["stress", &raw, "--job", "merge", "--seconds", "1"]);
    assert!(!o.status.success());
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// `vdisk compact` of dynamic VHD and VHDX images with zeroed blocks: the file shrinks by at
/// least the zeroed blocks, and vdisk and qemu-img read the same bytes as before (qemu-img
/// check for VHDX, which qemu checks; VHD has no check in qemu).
#[test]
fn compact_shrinks_and_qemu_reads_the_same() {
    let qemu = oracle("qemu-img");
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let img = p(d.path(), &format!("c.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, "-o", "block_size=1M", &img, "16M"]);
        vdisk_ok(&[
            "io",
            &img,
            "-c",
            "write -P 1 0 4M",
            "-c",
            "write -P 2 4M 4M",
            "-c",
            "write -P 3 12M 4M",
            "-c",
            "write -z 0 4M",
            "-c",
            "write -z 4M 2M",
        ]);
        let before = p(d.path(), "before.raw");
        vdisk_ok(&["convert", "-O", "raw", &img, &before]);
        let len0 = file_len(&img);
        let out = vdisk_ok(&["compact", "-p", "--rate", "1G", &img]);
        assert!(out.contains("Image compacted: 6 block(s)"), "{out}");
        let len1 = file_len(&img);
        assert!(len1 + (6 << 20) <= len0, "{fmt}: {len0} -> {len1}");
        vdisk_ok(&["compare", &img, &before]);
        vdisk_ok(&["check", &img]);
        if let Some(q) = &qemu {
            let o = run(
                q,
                &["compare", "-f", qemu_fmt(fmt), "-F", "raw", &img, &before],
            );
            assert!(o.status.success(), "qemu-img compare {fmt}: {o:?}");
            if fmt == "vhdx" {
                let o = run(q, &["check", "-f", "vhdx", &img]);
                assert!(o.status.success(), "qemu-img check: {o:?}");
            }
        }
        // Compacting again finds nothing more to do.
        let out = vdisk_ok(&["compact", &img]);
        assert!(out.contains("0 block(s)"), "{out}");
        assert_eq!(file_len(&img), len1);
    }
}

/// `vdisk compact` of a differencing child: blocks with nothing present go, zeros written over
/// the parent stay (they hide it), later blocks move down, the file shrinks, and the chain
/// reads the same through vdisk and libvhdi.
#[test]
fn compact_differencing_child_reads_the_same_through_libvhdi() {
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let base = p(d.path(), &format!("base.{fmt}"));
        let child = p(d.path(), &format!("child.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, "-o", "block_size=1M", &base, "16M"]);
        // The parent reads zeros at 2-4M: there a VHDX child's UNMAPPED block reads as zeros
        // both in vdisk and in libvhdi (which reads it from the parent).
        vdisk_ok(&[
            "io",
            &base,
            "-c",
            "write -P 7 0 2M",
            "-c",
            "write -P 7 4M 12M",
        ]);
        vdisk_ok(&["create", "-f", fmt, "-b", &base, &child]);
        // Whole 2 MiB blocks (the children's block size).
        let mut cmds = vec![
            "write -P 5 0 2M",
            "write -z 0 2M",
            "write -P 6 2M 2M",
            "write -P 8 12M 1M",
            "write -P 9 15M 4k",
        ];
        // A discard: VHD clears the sector bitmap (nothing present, the block goes), VHDX
        // makes the block UNMAPPED and punches it (a hole the later blocks move into). Zeros
        // written over the parent stay in both (they hide it).
        cmds.push("discard 2M 2M");
        let mut args = vec!["io", child.as_str()];
        for c in &cmds {
            args.push("-c");
            args.push(c);
        }
        vdisk_ok(&args);
        let before = p(d.path(), "before.raw");
        vdisk_ok(&["convert", "-O", "raw", &child, &before]);
        let len0 = file_len(&child);
        let out = vdisk_ok(&["compact", &child]);
        assert!(!out.contains(" 0 moved"), "{fmt}: {out}");
        let len1 = file_len(&child);
        assert!(len1 < len0, "{fmt}: {len0} -> {len1}");
        vdisk_ok(&["compare", &child, &before]);
        vdisk_ok(&["check", &child]);
        pyvhdi_equal(&child, &base, None, &before);
    }
}
