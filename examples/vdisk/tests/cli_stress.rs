//! `vdisk stress`: an online copy and convert under model-checked guest I/O end with zero
//! mismatches and one JSON line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

#[test]
fn stress_copy_and_convert_find_no_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    for (fmt, job) in [("raw", "copy"), ("vhdx", "convert"), ("vhd", "copy")] {
        let img = p(&dir, &format!("s.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &img, "32M"]);
        let out = vdisk_ok(&[
            "stress",
            &img,
            "--job",
            job,
            "--seconds",
            "2",
            "--threads",
            "2",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["mismatches"], 0, "{fmt} {job}: {v}");
        assert_eq!(v["job"], "completed", "{fmt} {job}: {v}");
        assert!(v["ios"].as_u64().unwrap() > 0, "{v}");
        // Its temporary destination is gone.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left.len(),
            1 + ["raw", "vhdx", "vhd"]
                .iter()
                .position(|f| *f == fmt)
                .unwrap(),
            "{left:?}"
        );
    }
}

/// `vdisk stress --job resize` on a VHD and a VHDX: the image doubles under the guests with
/// zero mismatches (past-the-end requests refused before the switch, served after it), and
/// the image keeps its new size.
#[test]
fn stress_resize_finds_no_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["vhd", "vhdx"] {
        let img = p(&dir, &format!("g.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &img, "16M"]);
        let out = vdisk_ok(&[
            "stress",
            &img,
            "--job",
            "resize",
            "--seconds",
            "2",
            "--threads",
            "2",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["mismatches"], 0, "{fmt}: {v}");
        assert_eq!(v["errors"], 0, "{fmt}: {v}");
        assert_eq!(v["job"], "completed", "{fmt}: {v}");
        let info = vdisk_json(&["info", "--output", "json", &img]);
        assert_eq!(info["virtual_size"], 32 << 20, "{fmt}: {info}");
        vdisk_ok(&["check", &img]);
    }
}
