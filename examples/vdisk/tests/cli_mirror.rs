//! `vdisk mirror` and `vdisk stress --job mirror`: a chain moved to `vdisk serve --nbd` on
//! loopback with each timing ends byte-exact (`vdisk compare`); refusals name their cause;
//! the stress run's guests end on host B with zero mismatches.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `vdisk serve --nbd` of `image` as export "b"; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(image: &str) -> (Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(vdisk_bin())
        .args([
            "serve",
            "--nbd",
            &format!("127.0.0.1:{port}"),
            "--export",
            "b",
            image,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    assert!(
        block_io::testing::wait_for_port(port, Duration::from_secs(20)),
        "vdisk serve never listened"
    );
    (s, port)
}

#[test]
fn a_chain_mirrored_with_each_timing_is_byte_exact() {
    for timing in ["before", "after", "split"] {
        let dir = tempfile::tempdir().unwrap();
        let (top, b) = mirror_fixture(&dir, "b.raw");
        let (server, port) = serve(&b);
        let url = format!("nbd://127.0.0.1:{port}/b");
        let v = vdisk_json(&[
            "mirror", "--to", &url, "--timing", timing, "--output", "json", &top,
        ]);
        assert_eq!(v["timing"], timing, "{v}");
        assert!(v["data_bytes"].as_u64().unwrap() >= 4 << 20, "{v}");
        drop(server);
        vdisk_ok(&["compare", &top, &b]);
    }
}

#[test]
fn refusals_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(&dir, "a.raw");
    vdisk_ok(&["create", "-f", "raw", &img, "8M"]);
    let small = p(&dir, "small.raw");
    vdisk_ok(&["create", "-f", "raw", &small, "4M"]);
    let (server, port) = serve(&small);
    let o = vdisk(&["mirror", "--to", &format!("nbd://127.0.0.1:{port}/b"), &img]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("must have the disk's size"), "{err}");
    drop(server);
    let o = vdisk(&["mirror", "--to", &format!("nbd://127.0.0.1:{port}/b"), &img]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = vdisk(&[
        "mirror",
        "--to",
        "nbd://127.0.0.1:1/b",
        "--timing",
        "never",
        &img,
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown timing"));
}

#[test]
fn stress_mirror_each_timing_finds_no_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(&dir, "s.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &img, "16M"]);
    for timing in ["before", "after", "split"] {
        let out = vdisk_ok(&[
            "stress",
            &img,
            "--job",
            "mirror",
            "--timing",
            timing,
            "--seconds",
            "2",
            "--threads",
            "2",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["mismatches"], 0, "{timing}: {v}");
        assert_eq!(v["errors"], 0, "{timing}: {v}");
        assert_eq!(v["job"], "completed", "{timing}: {v}");
        assert!(v["ios"].as_u64().unwrap() > 0, "{v}");
    }
    // Host B's temporary file is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}
