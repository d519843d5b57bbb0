//! Dirty logs from an independent writer: qemu-io killed (strace fault injection on
//! `pwrite64`) in the middle of a block allocation leaves a log that needs replay. Our
//! read-only open must read what `qemu-img check -r all` + `convert` gives without touching
//! the file; our writable open must replay the same into the file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use block_io::{FileStorage, OpenOptions};
use common::{oracle, read_all, run, s};
use std::process::{Command, Stdio};
use vhdx_format::VhdxFile;

fn is_dirty_for_qemu(img: &std::path::Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["info", s(img)])
        .output()
        .unwrap();
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("log")
}

#[test]
fn replays_logs_left_by_killed_qemu() {
    if !oracle("qemu-img") || !oracle("qemu-io") || !oracle("strace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            s(&base),
            "64M",
        ],
    );
    run(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x11 0 3M", s(&base)],
    );
    let mut dirty = 0;
    for (workload, range) in [
        // Wide ranges: qemu-io issues its writes from a thread pool, so which pwrite64 the
        // N-th is varies with load; a narrow range sometimes never lands inside the log window.
        ("write -P 0x5a 1M 4M", 1..=40),
        ("write -P 0x6b 40M 2M", 1..=40),
        ("write -P 0x7c 20M 9M", 1..=40),
    ] {
        for n in range {
            let img = dir.path().join(format!("t{n}.vhdx"));
            std::fs::copy(&base, &img).unwrap();
            let _ = Command::new("strace")
                .args([
                    "-f",
                    "-o",
                    "/dev/null",
                    "-e",
                    &format!("inject=pwrite64:signal=KILL:when={n}"),
                    "qemu-io",
                    "-f",
                    "vhdx",
                    "-c",
                    workload,
                    s(&img),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if !is_dirty_for_qemu(&img) {
                continue;
            }
            dirty += 1;
            let before = std::fs::read(&img).unwrap();
            // Read-only: replay in memory, file untouched.
            let st = FileStorage::open(&img, &OpenOptions::new().read_only(true)).unwrap();
            let f = VhdxFile::open(st, &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
            assert!(f.details().log_dirty);
            let ours_ro = read_all(&f);
            drop(f);
            assert!(
                std::fs::read(&img).unwrap() == before,
                "read-only open wrote"
            );
            // Writable: replay into a copy.
            let mine = dir.path().join(format!("m{n}.vhdx"));
            std::fs::copy(&img, &mine).unwrap();
            let st = FileStorage::open(&mine, &OpenOptions::new()).unwrap();
            let f = VhdxFile::open(st, &vhdx_format::OpenOptions::new().read_only(false)).unwrap();
            assert!(f.check().unwrap().log_replayed);
            let ours_rw = read_all(&f);
            drop(f);
            // The oracle: qemu replays a copy, then converts.
            let theirs = dir.path().join(format!("q{n}.vhdx"));
            std::fs::copy(&img, &theirs).unwrap();
            let _ = Command::new("qemu-img")
                .args(["check", "-r", "all", "-f", "vhdx", s(&theirs)])
                .output()
                .unwrap();
            let raw = dir.path().join(format!("q{n}.raw"));
            run(
                "qemu-img",
                &["convert", "-f", "vhdx", "-O", "raw", s(&theirs), s(&raw)],
            );
            let expect = std::fs::read(&raw).unwrap();
            assert!(
                ours_ro == expect,
                "{workload} n={n}: read-only replay differs"
            );
            assert!(
                ours_rw == expect,
                "{workload} n={n}: writable replay differs"
            );
            // After our replay qemu sees a clean image with the same content.
            assert!(!is_dirty_for_qemu(&mine));
            run(
                "qemu-img",
                &["compare", "-f", "vhdx", "-F", "raw", s(&mine), s(&raw)],
            );
        }
    }
    assert!(
        dirty > 0,
        "no kill point left a dirty log; the test proves nothing"
    );
    eprintln!("{dirty} dirty images replayed");
}
