//! `vdisk split`: a raw image cut into a boot-ordered chain of VHD and VHDX layers; the top
//! compares equal to the source (`vdisk compare`, and `qemu-img compare` on the chain
//! flattened by `vdisk convert`), the hot-list blocks are in layer 0 (`vdisk map` of each
//! layer), and bad requests fail with their cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{p, vdisk};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
}

/// `true` if qemu-img runs; under CI=true its absence fails the test.
fn have_qemu_img() -> bool {
    block_io::testing::oracle("qemu-img")
}

/// A sparse raw image with data in blocks 0, 2, 5, 9, 10 and 15 (of 1 MiB).
fn source(dir: &Path) -> String {
    let path = p(dir, "src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, b) in [0u64, 2, 5, 9, 10, 15].into_iter().enumerate() {
        let d: Vec<u8> = (0..MIB).map(|x| (x as u8) ^ (i as u8 * 37 + 1)).collect();
        f.write_all_at(&d, b * MIB).unwrap();
    }
    path
}

/// The 1 MiB blocks `vdisk map` says `img` itself holds data in.
fn blocks_in(img: &str) -> Vec<u64> {
    let out = ok(&vdisk(&["map", "--output", "json", img]));
    let runs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut v = Vec::new();
    for r in runs.as_array().unwrap() {
        if r["data"] == true && r["depth"] == 0 {
            let (s, l) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
            v.extend(s / MIB..(s + l).div_ceil(MIB));
        }
    }
    v
}

#[test]
fn split_into_a_boot_ordered_chain() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let hot = p(dir.path(), "boot.txt");
    // Block 9, then 5 (as offset+length), then a hole (block 3) that stays one.
    std::fs::write(
        &hot,
        format!(
            "# boot\n{} 4096\n{}+512\n{} 512\n",
            9 * MIB,
            5 * MIB,
            3 * MIB
        ),
    )
    .unwrap();
    for fmt in ["vhdx", "vhd"] {
        let prefix = p(dir.path(), &format!("chain-{fmt}"));
        let out = ok(&vdisk(&[
            "split",
            &src,
            "--layers",
            "3",
            "--hot-list",
            &hot,
            "-O",
            fmt,
            "--prefix",
            &prefix,
            "--block-size",
            "1M",
            "--json",
        ]));
        let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["data_blocks"], 6, "{r}");
        assert_eq!(r["hot_blocks"], 2, "{r}");
        let layers: Vec<String> = r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(layers.len(), 3);
        assert_eq!(layers[0], format!("{prefix}-0.{fmt}"));
        // 6 equal blocks in 3 shares: the hot ones at the bottom, then ascending.
        assert_eq!(blocks_in(&layers[0]), [5, 9], "{fmt}");
        assert_eq!(blocks_in(&layers[1]), [0, 2], "{fmt}");
        assert_eq!(blocks_in(&layers[2]), [10, 15], "{fmt}");
        // The top reads as the source.
        ok(&vdisk(&["compare", &src, &layers[2]]));
        ok(&vdisk(&["check", &layers[2]]));
        if have_qemu_img() {
            let flat = p(dir.path(), &format!("flat-{fmt}.raw"));
            ok(&vdisk(&["convert", "-O", "raw", &layers[2], &flat]));
            let o = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", &src, &flat])
                .output()
                .unwrap();
            ok(&o);
            let f = if fmt == "vhd" { "vpc" } else { "vhdx" };
            let o = Command::new("qemu-img")
                .args(["check", "-f", f, &layers[0]])
                .output()
                .unwrap();
            // qemu-img check does not support vpc: it exits 63 ("not supported").
            assert!(
                o.status.success() || (fmt == "vhd" && o.status.code() == Some(63)),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn bad_requests_fail_with_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let prefix = p(dir.path(), "x");
    let base = [
        "split",
        src.as_str(),
        "--prefix",
        prefix.as_str(),
        "--block-size",
        "1M",
    ];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        vdisk(&a)
    };
    fails_with(&run(&["--layers", "0"]), "at least one layer");
    fails_with(&run(&["--layers", "7"]), "only 6 blocks");
    fails_with(&run(&["--layers", "2", "-O", "raw"]), "vhdx or vhd");
    let hot = p(dir.path(), "bad.txt");
    std::fs::write(&hot, "0 512\nzero 512\n").unwrap();
    fails_with(
        &run(&["--layers", "2", "--hot-list", &hot]),
        "hot list line 2",
    );
    std::fs::write(format!("{prefix}-1.vhdx"), b"mine").unwrap();
    fails_with(&run(&["--layers", "2"]), "exists");
    assert_eq!(std::fs::read(format!("{prefix}-1.vhdx")).unwrap(), b"mine");
    assert!(!Path::new(&format!("{prefix}-0.vhdx")).exists());
}
