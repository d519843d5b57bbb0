//! `vdisk send | vdisk receive` through a real pipe between two processes: a full stream
//! into new images of each format (`vdisk compare`, and `qemu-img compare` as the oracle),
//! an incremental stream `--since` the base into a copy of it, and a corrupted or truncated
//! stream refused with exit status 1, a message naming the cause, and no file left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `vdisk send SEND_ARGS | vdisk receive RECV_ARGS`; returns both outputs.
fn pipe(send_args: &[&str], recv_args: &[&str]) -> (Output, Output) {
    let mut tx = Command::new(vdisk_bin())
        .arg("send")
        .args(send_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = Command::new(vdisk_bin())
        .arg("receive")
        .args(recv_args)
        .stdin(tx.stdout.take().unwrap())
        .output()
        .unwrap();
    (tx.wait_with_output().unwrap(), rx)
}

fn qemu_compare(a: &str, b: &str) {
    if let Some(q) = oracle("qemu-img") {
        assert_ok(run(&q, &["compare", "-U", a, b]), "qemu-img compare");
    }
}

/// A VHDX with data (compressible and not), a zeroed range and holes.
fn source(dir: &Path) -> String {
    let src = p(dir, "src.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &src, "48M"]);
    vdisk_ok(&[
        "io",
        &src,
        "-c",
        "write -P 0x41 0 3M",
        "-c",
        "write -P 0x07 17M 5M",
        "-c",
        "write -z 18M 1M",
        "-c",
        "write -P 0xfe 40M 512",
    ]);
    src
}

#[test]
fn send_receive_through_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for (i, (fmt, name)) in [("raw", "a.img"), ("vhd", "b.vhd"), ("vhdx", "c.vhdx")]
        .into_iter()
        .enumerate()
    {
        let dest = p(dir.path(), name);
        let level = ["auto", "0", "5"][i];
        let (s, r) = pipe(&["--level", level, &src], &["-O", fmt, &dest]);
        let err = String::from_utf8_lossy(&s.stderr).into_owned();
        assert!(s.status.success(), "send: {err}");
        assert!(err.contains("Sent "), "send reports: {err}");
        let out = assert_ok(r, "receive");
        assert!(out.contains(&format!("({fmt})")), "{out}");
        assert_ok(
            vdisk(&["compare", &src, &dest]),
            &format!("compare with {fmt}"),
        );
        qemu_compare(&src, &dest);
    }
    // A full stream refuses an existing destination.
    let dest = p(dir.path(), "c.vhdx");
    let (_, r) = pipe(&[&src], &[&dest]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("exists"));
}

#[test]
fn incremental_through_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let base = source(dir.path());
    let child = p(dir.path(), "child.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &child]);
    vdisk_ok(&[
        "io",
        &child,
        "-c",
        "write -P 0x99 1M 2M",
        "-c",
        "write -z 17M 1M",
    ]);
    let dest = p(dir.path(), "dest.vhdx");
    std::fs::copy(&base, &dest).unwrap();
    let (s, r) = pipe(&["--since", &base, "-p", &child], &[&dest]);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert!(assert_ok(r, "receive").contains("incremental"));
    assert_ok(vdisk(&["compare", &child, &dest]), "compare");
    qemu_compare(&p(dir.path(), "src.vhdx"), &base); // the base was never written
                                                     // The same stream again: DEST is no longer the snapshot (its DataWriteGuid changed).
    let (_, r) = pipe(&["--since", &base, &child], &[&dest]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("is not the stream's base snapshot"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn corrupt_stream_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let stream = p(dir.path(), "s.bin");
    vdisk_ok(&["send", "-o", &stream, &src]);
    let good = std::fs::read(&stream).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    let dest = p(dir.path(), "out.vhdx");
    for (what, bytes, cause) in [
        ("flip", flip(&good, good.len() / 2), "record"),
        (
            "cut",
            good[..good.len() - 7].to_vec(),
            "truncated after byte",
        ),
        ("magic", flip(&good, 0), "bad magic"),
    ] {
        let bad = p(dir.path(), "bad.bin");
        std::fs::write(&bad, bytes).unwrap();
        let o = vdisk(&["receive", "-i", &bad, &dest]);
        std::fs::remove_file(&bad).unwrap();
        assert_eq!(o.status.code(), Some(1), "{what}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(cause), "{what}: {err}");
        let now: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(now.len(), before.len(), "{what} left a file");
    }
    vdisk_ok(&["receive", "-i", &stream, &dest]);
    assert_ok(vdisk(&["compare", &src, &dest]), "compare");
}

fn flip(b: &[u8], at: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    v[at] ^= 0x10;
    v
}
