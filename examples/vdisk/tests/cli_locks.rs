//! Image locks at the CLI (issue 10 item 3): `vdisk` and QEMU exclude each other's writers in
//! both directions, `vdisk serve` and `vdisk io` exclude each other, and `-U` (force share)
//! opens without locks as `qemu-img -U` does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `qemu-io` kept running with the image open, until dropped.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl QemuIo {
    /// Starts `qemu-io ARGS IMG` and waits until a read through it completed (locks held).
    fn hold(qemu_io: &Path, args: &[&str], img: &str) -> QemuIo {
        let mut child = Command::new(qemu_io)
            .args(args)
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut q = QemuIo {
            child,
            stdin,
            stdout,
        };
        let s = q.stdin.as_mut().unwrap();
        writeln!(s, "read 0 512").unwrap();
        s.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(q.stdout.read_line(&mut line).unwrap() > 0, "qemu-io ended");
            assert!(!line.contains("no file open"), "qemu-io could not open");
            if line.contains("read 512/512 bytes") {
                return q;
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

/// `vdisk serve` running on `img` until dropped.
struct Serve(Child);

impl Serve {
    fn start(dir: &tempfile::TempDir, img: &str) -> Serve {
        // A socket of its own: a stale one of an earlier serve would look like readiness.
        let sock = format!("{img}.sock");
        let _ = dir;
        let serve = Serve(
            Command::new(vdisk_bin())
                .args(["serve", "--socket", &sock, img])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        for _ in 0..200 {
            if Path::new(&sock).exists() {
                return serve;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("vdisk serve did not start");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_holding_an_image_refuses_vdisk_writers() {
    let Some(qemu_io) = oracle("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (fmt, qfmt) in [("raw", "raw"), ("vhdx", "vhdx"), ("vhd", "vpc")] {
        let img = p(&dir, &format!("q.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &img, "4M"]);
        let q = QemuIo::hold(&qemu_io, &["-f", qfmt], &img);
        let o = vdisk(&["io", &img, "-c", "write -P 0x11 0 4k"]);
        assert!(
            !o.status.success(),
            "{fmt}: vdisk wrote an image qemu-io holds"
        );
        assert!(text(&o).contains("lock"), "{fmt}: {}", text(&o));
        // Creating over it is refused too, and leaves it intact.
        let before = std::fs::read(&img).unwrap();
        let o = vdisk(&["create", "-f", fmt, &img, "4M"]);
        assert!(
            !o.status.success() && text(&o).contains("lock"),
            "{}",
            text(&o)
        );
        assert_eq!(std::fs::read(&img).unwrap(), before);
        // -U opens anyway, for reading.
        vdisk_ok(&["-U", "io", "-r", &img, "-c", "read 0 4k"]);
        drop(q);
        // Released with qemu-io gone.
        vdisk_ok(&["io", &img, "-c", "write -P 0x11 0 4k"]);
    }
}

#[test]
fn vdisk_holding_an_image_refuses_qemu_writers() {
    let (Some(qemu_io), Some(qemu_img)) = (oracle("qemu-io"), oracle("qemu-img")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (fmt, qfmt) in [("raw", "raw"), ("vhdx", "vhdx")] {
        let img = p(&dir, &format!("v.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &img, "4M"]);
        let serve = Serve::start(&dir, &img);
        let o = run(&qemu_io, &["-f", qfmt, "-c", "write 0 512", &img]);
        let t = text(&o);
        assert!(
            t.contains("Failed to get") && t.contains("lock"),
            "{fmt}: {t}"
        );
        assert!(!t.contains("bytes at offset"), "{fmt}: qemu-io wrote: {t}");
        // vdisk vs vdisk: the same.
        let o = vdisk(&["io", &img, "-c", "write 0 512"]);
        assert!(
            !o.status.success() && text(&o).contains("lock"),
            "{}",
            text(&o)
        );
        // Looking with -U works for both tools.
        let o = run(&qemu_img, &["info", "-U", "-f", qfmt, &img]);
        assert!(o.status.success(), "{}", text(&o));
        vdisk_ok(&["-U", "info", &img]);
        if fmt == "vhdx" {
            // Like `qemu-img info` without -U, a format's reader refuses a live writer.
            let o = vdisk(&["info", &img]);
            assert!(
                !o.status.success() && text(&o).contains("lock"),
                "{}",
                text(&o)
            );
        } else {
            // A raw file's reader shares writes, as QEMU's raw driver does.
            vdisk_ok(&["info", &img]);
        }
        drop(serve);
        vdisk_ok(&["io", &img, "-c", "write 0 512"]);
    }
}

#[test]
fn a_parent_under_an_open_child_refuses_writers() {
    let Some(qemu_io) = oracle("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = p(&dir, "base.vhdx");
    let top = p(&dir, "top.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &base, "4M"]);
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &top]);
    let serve = Serve::start(&dir, &top);
    for o in [
        vdisk(&["io", &base, "-c", "write 0 512"]),
        run(&qemu_io, &["-f", "vhdx", "-c", "write 0 512", &base]),
    ] {
        let t = text(&o);
        assert!(t.contains("lock") && !t.contains("bytes at offset"), "{t}");
    }
    drop(serve);
}
