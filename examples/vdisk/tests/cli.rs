//! The `vdisk` CLI on raw images, with qemu-img as the oracle where it has an answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

#[test]
fn io_round_trips_patterns_on_raw() {
    let d = tempfile::tempdir().unwrap();
    let img = p(&d, "a.raw");
    vdisk_ok(&["create", "-f", "raw", &img, "16M"]);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
    vdisk_ok(&[
        "io",
        &img,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0x12 1000 3000",
        "-c",
        "write -P 7 15M 1M",
        "-c",
        "write -z 8M 4k",
        "-c",
        "flush",
    ]);
    let out = vdisk_ok(&[
        "io",
        "-r",
        &img,
        "-c",
        "read -P 0xab 0 1000",
        "-c",
        "read -P 0x12 1000 3000",
        "-c",
        "read -P 0xab 4000 60k",
        "-c",
        "read -P 7 15M 1M",
        "-c",
        "read -P 0 8M 4k",
    ]);
    assert!(out.contains("read 3000/3000 bytes at offset 1000"), "{out}");
    // The bytes on disk are exactly what was written.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[..1000].iter().all(|&b| b == 0xab));
    assert!(bytes[1000..4000].iter().all(|&b| b == 0x12));
    assert!(bytes[15 << 20..].iter().all(|&b| b == 7));
    // A failed pattern check exits non-zero and says where.
    let o = vdisk(&["io", "-r", &img, "-c", "read -P 0xab 0 8k"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed at offset 1000")
    );
    // Writes to a read-only open fail with one sentence on stderr.
    let o = vdisk(&["io", "-r", &img, "-c", "write 0 512"]);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("vdisk: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    // Discard punches a hole: it reads as zeros.
    vdisk_ok(&["io", &img, "-c", "discard 15M 1M", "-c", "read -P 0 15M 1M"]);
}

#[test]
fn io_checks_its_arguments() {
    let d = tempfile::tempdir().unwrap();
    let img = p(&d, "a.raw");
    vdisk_ok(&["create", &img, "1M"]);
    for bad in ["read 1M 512", "write -P 999 0 1", "nonsense", "read 0"] {
        let o = vdisk(&["io", &img, "-c", bad]);
        assert_ne!(o.status.code(), Some(0), "{bad}");
        assert!(
            String::from_utf8_lossy(&o.stderr).starts_with("vdisk: "),
            "{bad}"
        );
    }
    let o = vdisk(&["info", &p(&d, "missing.raw")]);
    assert_ne!(o.status.code(), Some(0));
    let o = vdisk(&["create", &p(&d, "b.raw"), "12Q"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid size"));
}

#[test]
fn info_and_map_json() {
    let d = tempfile::tempdir().unwrap();
    let img = p(&d, "a.raw");
    vdisk_ok(&["create", "-f", "raw", &img, "4M"]);
    vdisk_ok(&["io", &img, "-c", "write -P 1 1M 1M"]);
    let v = vdisk_json(&["info", "--output", "json", &img]);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual_size"], 4 << 20);
    let m = vdisk_json(&["map", "--output", "json", &img]);
    let runs = m.as_array().unwrap();
    let total: u64 = runs.iter().map(|r| r["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 4 << 20);
    // The written MiB is data; the first MiB (never written) is a hole reading as zeros.
    let at = |off: u64| {
        runs.iter()
            .find(|r| {
                let s = r["start"].as_u64().unwrap();
                s <= off && off < s + r["length"].as_u64().unwrap()
            })
            .unwrap()
    };
    assert_eq!(at(1 << 20)["data"], true);
    assert_eq!(at((2 << 20) - 1)["data"], true);
    assert_eq!(at(0)["data"], false);
    assert_eq!(at(0)["zero"], true);
    assert_eq!(at(3 << 20)["data"], false);
    // check on raw: nothing to find, exit 0.
    vdisk_ok(&["check", &img]);
}

/// The human `map` names the file of the layer each data run is in, as qemu-img map does
/// (it named the top for every run).
#[test]
fn map_names_each_run_s_layer() {
    let d = tempfile::tempdir().unwrap();
    let (base, top) = (p(&d, "base.vhdx"), p(&d, "top.vhdx"));
    vdisk_ok(&["create", "-f", "vhdx", &base, "4M"]);
    vdisk_ok(&["io", &base, "-c", "write -P 1 0 1M"]);
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &top]);
    vdisk_ok(&["io", &top, "-c", "write -P 2 2M 1M"]);
    let out = vdisk_ok(&["map", &top]);
    let file_of = |start: &str| {
        out.lines()
            .find(|l| l.starts_with(start))
            .and_then(|l| l.split_whitespace().nth(3))
            .unwrap_or_else(|| panic!("no run at {start}: {out}"))
            .to_string()
    };
    assert!(file_of("0x0 ").ends_with("base.vhdx"), "{out}");
    assert_eq!(file_of("0x200000 "), top, "{out}");
}

/// `vdisk compare` and `qemu-img compare` give the same exit code (and offset) on raw pairs.
#[test]
fn compare_agrees_with_qemu_img() {
    let Some(qemu) = oracle("qemu-img") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let base = p(&d, "base.raw");
    raw_image_with(&base, "8M", &["write -P 3 1M 2M", "write -P 9 7M 4k"]);
    // (name, size, commands applied to a copy of base)
    let cases: &[(&str, &str, &[&str])] = &[
        ("same", "8M", &[]),
        ("one-byte", "8M", &["write -P 4 2000000 1"]),
        ("late", "8M", &["write -P 0 7M 512"]),
        ("zero-tail", "12M", &[]),
        ("data-tail", "12M", &["write -P 1 11M 512"]),
        ("shorter", "4M", &[]),
        ("shorter-tail-data", "6M", &[]),
    ];
    for (name, size, cmds) in cases {
        let other = p(&d, &format!("{name}.raw"));
        std::fs::copy(&base, &other).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&other)
            .unwrap();
        f.set_len(vdisk_size(size)).unwrap();
        drop(f);
        for c in *cmds {
            vdisk_ok(&["io", &other, "-c", c]);
        }
        for strict in [false, true] {
            let mut ours = vec!["compare"];
            let mut theirs = vec!["compare", "-f", "raw", "-F", "raw"];
            if strict {
                ours.push("-s");
                theirs.push("-s");
            }
            ours.extend([base.as_str(), other.as_str()]);
            theirs.extend([base.as_str(), other.as_str()]);
            let o = vdisk(&ours);
            let q = run(&qemu, &theirs);
            assert_eq!(
                o.status.code(),
                q.status.code(),
                "{name} strict={strict}: ours {:?} qemu {:?}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&q.stdout)
            );
            let qs = String::from_utf8_lossy(&q.stdout);
            if let Some(line) = qs.lines().find(|l| l.starts_with("Content mismatch")) {
                assert!(
                    String::from_utf8_lossy(&o.stdout).contains(line),
                    "{name}: qemu says {line}"
                );
            }
        }
    }
}

fn vdisk_size(s: &str) -> u64 {
    let n: u64 = s.trim_end_matches('M').parse().unwrap();
    n << 20
}

/// Convert raw to raw keeps content (qemu-img compare) and holes.
#[test]
fn convert_raw_keeps_content_and_holes() {
    let Some(qemu) = oracle("qemu-img") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (p(&d, "a.raw"), p(&d, "b.raw"));
    raw_image_with(
        &a,
        "32M",
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 31M 512",
            "write -z 4M 1M",
        ],
    );
    vdisk_ok(&["convert", "-O", "raw", "-p", &a, &b]);
    let q = run(&qemu, &["compare", "-f", "raw", "-F", "raw", &a, &b]);
    assert_eq!(
        q.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&q.stdout)
    );
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&b).unwrap().blocks() * 512;
    assert!(used < 4 << 20, "the copy is sparse: {used} bytes allocated");
}

#[test]
fn demo_runs() {
    let out = vdisk_ok(&["demo"]);
    assert!(out.contains("Summary"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert!(out.contains("[ok] online convert, guest writing"), "{out}");
}
