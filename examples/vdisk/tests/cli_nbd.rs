//! `vdisk serve --nbd-socket` with qemu-io as the client: a write lands in the image, a read
//! sees it, and SIGTERM flushes and exits 0 with the socket removed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn serve_nbd_to_qemu_io_and_stop_cleanly() {
    let Some(qemu_io) = oracle("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = p(&dir, "d.vhdx");
    let sock = p(&dir, "nbd.sock");
    vdisk_ok(&["create", "-f", "vhdx", &img, "8M"]);
    let child = Command::new(vdisk_bin())
        .args(["serve", "--nbd-socket", &sock, "--export", "disk", &img])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if Path::new(&sock).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///disk?socket={sock}");
    let o = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 1M 64k",
            "-c",
            "read -P 0x5c 1M 64k",
            &url,
        ],
    );
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let wrote = o.status.success() && !t.contains("Pattern verification failed");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(wrote, "qemu-io over NBD: {t}");
    assert!(out.status.success(), "serve exit {:?}: {log}", out.status);
    assert!(log.contains("flushed"), "{log}");
    assert!(!Path::new(&sock).exists(), "the socket was left behind");
    // The data is in the image, read back without the server.
    vdisk_ok(&["io", "-r", &img, "-c", "read -P 0x5c 1M 64k"]);
}
