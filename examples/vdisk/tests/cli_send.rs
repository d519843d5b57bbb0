//! `vdisk send | vdisk receive` through a real pipe between two processes: a full stream
//! into new images of each format (`vdisk compare`, and `qemu-img compare` as the oracle),
//! an incremental stream `--since` the base into a copy of it, and a corrupted or truncated
//! stream refused with exit status 1, a message naming the cause, and no file left behind;
//! `vdisk receive --resume` and a later `vdisk receive` finishing an incremental receive
//! that a power cut interrupted (made through the library on the fault backend).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use block_io::{CutPoint, FaultStorage, MemStorage};
use vdisk::meta_ops::send::{self, ReceiveOptions, SendError};

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

/// What a power cut leaves after `ops` writes and syncs of an incremental receive of the
/// stream in the file `stream` into `dest` (a VHDX without parents): the receive runs in
/// this process through the library with DEST's bytes on the fault backend, its journal
/// goes beside DEST, and DEST is rewritten with what a reboot would find on its disk.
fn interrupted(dest: &str, stream: &str, ops: u64) {
    let dest = Path::new(dest);
    let bytes = std::fs::read(dest).unwrap();
    let fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(&bytes)));
    let f = vhdx_format::VhdxFile::open(
        fs.clone(),
        &vhdx_format::OpenOptions::new().read_only(false),
    )
    .unwrap();
    let d = f.details();
    let layer = chain::Layer {
        path: dest.to_path_buf(),
        format: chain::Format::Vhdx,
        dev: Arc::new(f),
        identity: chain::Identity::Vhdx {
            data_write_guid: d.data_write_guid,
            disk_id: d.disk_id,
        },
        parent: None,
    };
    let disk = chain::Disk::from_layers(vec![layer], false).unwrap();
    fs.set_cut(CutPoint::AfterOps(fs.ops() + ops));
    let input = std::fs::read(stream).unwrap();
    let e = send::receive_into(
        &mut &input[..],
        &disk,
        dest.parent().unwrap(),
        &ReceiveOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, SendError::Interrupted { .. }), "{e}");
    drop(disk);
    std::fs::write(dest, fs.crash_image(1).to_vec().unwrap()).unwrap();
    assert!(send::journal_path(dest).exists());
}

#[test]
fn an_interrupted_receive_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let base = source(dir.path());
    let child = p(dir.path(), "child.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &child]);
    vdisk_ok(&[
        "io",
        &child,
        "-c",
        "write -P 0x5a 2M 3M",
        "-c",
        "write -z 17M 2M",
        "-c",
        "write -P 0x33 30M 1M",
    ]);
    let stream = p(dir.path(), "inc.bin");
    vdisk_ok(&["send", "--since", &base, "-o", &stream, &child]);
    let dest = p(dir.path(), "dest.vhdx");
    std::fs::copy(&base, &dest).unwrap();
    let journal = format!("{dest}.vdisk-receive");

    // Nothing to finish.
    let o = vdisk(&["receive", "--resume", &dest]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("has no interrupted receive to finish") && err.contains(&journal),
        "{err}"
    );

    // check mentions the journal; --resume finishes it.
    interrupted(&dest, &stream, 4);
    let o = vdisk(&["check", &dest]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the journal of an interrupted receive"),
        "{o:?}"
    );
    assert_eq!(vdisk(&["compare", &child, &dest]).status.code(), Some(1));
    let o = vdisk(&["receive", "--resume", &dest]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_ok(o, "receive --resume");
    assert!(
        err.contains(&format!(
            "vdisk: finished an interrupted receive into {dest} ("
        )) && err.contains(" bytes) from its journal"),
        "{err}"
    );
    assert!(assert_ok(vdisk(&["compare", &child, &dest]), "compare").contains("identical"));
    assert!(!Path::new(&journal).exists());

    // The next receive finishes it, then finds its stream already applied.
    std::fs::copy(&base, &dest).unwrap();
    interrupted(&dest, &stream, 2);
    let o = vdisk(&["receive", "-i", &stream, &dest]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = assert_ok(o, "receive after the cut");
    assert!(err.contains("finished an interrupted receive"), "{err}");
    assert!(out.contains("already applied"), "{out}");
    assert!(assert_ok(vdisk(&["compare", &child, &dest]), "compare").contains("identical"));
    // With no journal left, the same stream is refused by its lineage as after any receive.
    let o = vdisk(&["receive", "-i", &stream, &dest]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not the stream's base snapshot"));

    // A torn journal is refused, naming it, and DEST is left as it is.
    std::fs::copy(&base, &dest).unwrap();
    interrupted(&dest, &stream, 3);
    let good = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, &good[..good.len() / 2]).unwrap();
    let crashed = std::fs::read(&dest).unwrap();
    let o = vdisk(&["receive", "--resume", &dest]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot use the receive journal {journal}"))
            && err.contains("truncated"),
        "{err}"
    );
    assert!(std::fs::read(&dest).unwrap() == crashed);
}
