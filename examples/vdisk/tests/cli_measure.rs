//! `vdisk measure`: its required size bounds the file a `vdisk convert` then makes (and not
//! by much), its fully allocated size the file once every block is written; raw as qemu-img
//! counts it; bad arguments refused with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

fn measured(args: &[&str]) -> (u64, u64) {
    let j = vdisk_json(&[&["measure", "--output", "json"], args].concat());
    (
        j["required"].as_u64().unwrap(),
        j["fully-allocated"].as_u64().unwrap(),
    )
}

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn measure_bounds_what_convert_and_a_full_write_make() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(&dir, "src.raw");
    // 64 MiB with data in three places, one of them across a 2 MiB boundary.
    raw_image_with(
        &src,
        "64M",
        &["write -P 1 0 4k", "write -P 2 3M 2M", "write -P 3 63M 1M"],
    );
    for (fmt, opts) in [
        ("vhd", ""),
        ("vhdx", ""),
        ("vhdx", "block_size=1M"),
        ("vhd", "subformat=fixed"),
        ("vhdx", "subformat=fixed"),
    ] {
        let mut args = vec!["-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let (required, full) = measured(&[&args[..], &[&src]].concat());
        let out = p(&dir, &format!("out-{fmt}-{opts}"));
        vdisk_ok(&[&["convert"], &args[..], &[&src, &out]].concat());
        let got = file_len(&out);
        assert!(
            got <= required,
            "{fmt} {opts}: convert made {got} > measured {required}"
        );
        // Our VHD bound allows 64 KiB of alignment per block; VHDX blocks are exact.
        assert!(
            required - got <= 4 * (64 << 10),
            "{fmt} {opts}: measured {required}, convert made {got}"
        );
        // Every block written: the file reaches (and does not pass) the fully allocated size.
        vdisk_ok(&["io", &out, "-c", "write -P 9 0 64M", "-c", "flush"]);
        let full_len = file_len(&out);
        assert!(
            full_len <= full,
            "{fmt} {opts}: full file {full_len} > {full}"
        );
        assert!(
            full - full_len <= 32 * (64 << 10),
            "{fmt} {opts}: fully allocated {full}, file {full_len}"
        );
        // An empty image of the same size needs what create makes.
        let (empty_required, _) = measured(&[&args[..], &["--size", "64M"]].concat());
        let empty = p(&dir, &format!("empty-{fmt}-{opts}"));
        let mut create = vec!["create", "-f", fmt];
        if !opts.is_empty() {
            create.extend(["-o", opts]);
        }
        vdisk_ok(&[&create[..], &[&empty, "64M"]].concat());
        assert_eq!(
            empty_required,
            file_len(&empty),
            "{fmt} {opts}: empty image"
        );
    }
    // Raw: the virtual size, for both (as qemu-img measure -O raw).
    assert_eq!(measured(&["-O", "raw", &src]), (64 << 20, 64 << 20));
    if let Some(q) = oracle("qemu-img") {
        let o = run(
            &q,
            &[
                "measure", "--output", "json", "-O", "raw", "-f", "raw", &src,
            ],
        );
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["required"].as_u64(), Some(64 << 20));
    }
}

#[test]
fn measure_refuses_bad_arguments_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(&dir, "src.raw");
    vdisk_ok(&["create", &src, "1M"]);
    for (args, why) in [
        (vec!["measure", "-O", "vhdx"], "--size"),
        (
            vec!["measure", "-O", "vhdx", "--size", "1M", &src],
            "either",
        ),
        (
            vec!["measure", "-O", "qcow9", "--size", "1M"],
            "unknown format",
        ),
        (
            vec!["measure", "-O", "vhdx", "-o", "bogus=1", "--size", "1M"],
            "bogus",
        ),
        (
            vec!["measure", "-O", "vhd", "--size", "12Q"],
            "invalid size",
        ),
        (
            vec!["measure", "-O", "vhd", &p(&dir, "missing.vhd")],
            "missing.vhd",
        ),
    ] {
        let o = vdisk(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

/// `vdisk convert -m N --rate B/S -p`: the same image whatever the requests in flight; a rate
/// limit holds the copy back (a lower bound only: 4 MiB at 4 MiB/s after the first burst);
/// bad values are refused with a reason.
#[test]
fn convert_takes_parallel_and_rate() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(&dir, "src.raw");
    raw_image_with(&src, "8M", &["write -P 7 0 4M", "write -P 8 6M 1M"]);
    for (m, fmt) in [("1", "vhdx"), ("16", "vhd"), ("4", "raw")] {
        let out = p(&dir, &format!("out-{m}.{fmt}"));
        vdisk_ok(&["convert", "-m", m, "-p", "-O", fmt, &src, &out]);
        vdisk_ok(&["compare", &src, &out]);
    }
    let out = p(&dir, "slow.vhdx");
    let t0 = std::time::Instant::now();
    vdisk_ok(&["convert", "--rate", "4M", "-O", "vhdx", &src, &out]);
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(400),
        "5 MiB at 4 MiB/s took {:?}",
        t0.elapsed()
    );
    vdisk_ok(&["compare", &src, &out]);
    for (args, why) in [
        (vec!["-m", "0"], "-m"),
        (vec!["--rate", "fast"], "invalid size"),
    ] {
        let o = vdisk(&[&["convert"], &args[..], &[&src, &p(&dir, "x.raw")]].concat());
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!dir.path().join("x.raw").exists(), "{args:?} left a file");
    }
}
