//! `vdisk stream`: a VHDX and a VHD child of a base served read-only by `vdisk serve --nbd`
//! (our server, started here on loopback) streamed to a local parent; with the server gone,
//! the chain opens and compares equal to the base plus the child's write. Refusals name the
//! cause; `vdisk stress --job stream` reports no mismatch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{p, vdisk, vdisk_bin, vdisk_json, vdisk_ok};

const MIB: u64 = 1 << 20;

/// `vdisk serve --nbd` of `image` read-only as export `base`; killed on drop.
struct Server(Child);

impl Server {
    fn start(image: &str, port: u16) -> Server {
        let child = Command::new(vdisk_bin())
            .args(["serve", "--read-only", "--export", "base", "--nbd"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            block_io::testing::wait_for_port(port, Duration::from_secs(20)),
            "vdisk serve did not start"
        );
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 24 MiB raw image with data in 1 MiB blocks 0, 3, 4 and 20.
fn source(dir: &Path) -> String {
    let path = p(dir, "src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(24 * MIB).unwrap();
    for (i, b) in [0u64, 3, 4, 20].into_iter().enumerate() {
        let d: Vec<u8> = (0..MIB).map(|x| (x as u8) ^ (i as u8 * 41 + 3)).collect();
        f.write_all_at(&d, b * MIB).unwrap();
    }
    path
}

fn stream_one(fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let base = p(dir.path(), &format!("base.{fmt}"));
    vdisk_ok(&["convert", "-O", fmt, &src, &base]);
    let port = free_port();
    let srv = Server::start(&base, port);
    let url = format!("nbd://127.0.0.1:{port}/base");
    let child = p(dir.path(), &format!("child.{fmt}"));
    vdisk_ok(&["create", "-f", fmt, "-b", &url, &child]);
    vdisk_ok(&["io", &child, "-c", "write -P 7 3M 64k"]);
    // The expected content: the base plus the child's write.
    let want = p(dir.path(), "want.raw");
    std::fs::copy(&src, &want).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&want)
        .unwrap()
        .write_all_at(&[7u8; 64 * 1024], 3 * MIB)
        .unwrap();
    let out = vdisk_ok(&["stream", "--rate", "64M", &child]);
    assert!(out.contains("is now"), "{out}");
    drop(srv);
    // No server: the chain is local.
    vdisk_ok(&["compare", &child, &want]);
    let info = vdisk_json(&["info", "--output", "json", "--backing-chain", &child]);
    let text = info.to_string();
    assert!(!text.contains("nbd://"), "{text}");
    assert!(text.contains(&format!("child.{fmt}.base")), "{text}");
    assert!(!Path::new(&format!("{child}.base.fetched")).exists());
    // Streaming again: the parent is local, nothing to do.
    let o = vdisk(&["stream", &child]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not remote"), "{err}");
}

#[test]
fn vhdx_child_streams_from_vdisk_serve() {
    stream_one("vhdx");
}

#[test]
fn vhd_child_streams_from_vdisk_serve() {
    stream_one("vhd");
}

#[test]
fn refusals_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "plain.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &img, "8M"]);
    let o = vdisk(&["stream", &img]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a differencing image"), "{err}");
    // A remote parent that is down: the open fails naming the URL.
    let src = source(dir.path());
    let base = p(dir.path(), "base.vhdx");
    vdisk_ok(&["convert", "-O", "vhdx", &src, &base]);
    let port = free_port();
    let srv = Server::start(&base, port);
    let child = p(dir.path(), "child.vhdx");
    vdisk_ok(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        &format!("nbd://127.0.0.1:{port}/base"),
        &child,
    ]);
    drop(srv);
    let o = Command::new(vdisk_bin())
        .args(["stream", &child])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn stress_stream_has_no_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let base = p(dir.path(), "base.vhdx");
    vdisk_ok(&["convert", "-O", "vhdx", &src, &base]);
    let v = vdisk_json(&[
        "stress",
        "--job",
        "stream",
        "--seconds",
        "3",
        "--threads",
        "2",
        "--rate",
        "16M",
        &base,
    ]);
    assert_eq!(v["mismatches"], 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["job"], "completed", "{v}");
}
