//! `vdisk bench` with qemu-img bench's flags: it runs on raw, VHD and VHDX, writes what
//! `--pattern` says where `-o`/`-S` say, and refuses bad flags with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

#[test]
fn bench_writes_the_pattern_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["raw", "vhd", "vhdx"] {
        let img = p(&dir, &format!("b.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &img, "16M"]);
        for t in ["writeback", "none"] {
            for i in ["io_uring", "threads"] {
                let out = vdisk_ok(&[
                    "bench",
                    "-w",
                    "--pattern",
                    "90",
                    "-c",
                    "64",
                    "-d",
                    "8",
                    "-s",
                    "4K",
                    "-S",
                    "4K",
                    "-o",
                    "1M",
                    "-t",
                    t,
                    "-i",
                    i,
                    &img,
                ]);
                assert!(out.contains("Run completed"), "{out}");
            }
        }
        // 64 requests of 4 KiB from 1 MiB: 256 KiB of 0x5a, zeros around it.
        vdisk_ok(&[
            "io",
            "-r",
            &img,
            "-c",
            "read -P 0x5a 1M 256k",
            "-c",
            "read -P 0 0 1M",
        ]);
        // Reads with a stride that wraps many times over the disk.
        let out = vdisk_ok(&["bench", "-c", "1000", "-d", "16", "-S", "7M", &img]);
        assert!(out.contains("Run completed"), "{out}");
    }
    let img = p(&dir, "b.raw");
    for (args, why) in [
        (vec!["-t", "bogus"], "cache mode"),
        (vec!["-i", "bogus"], "aio"),
        (vec!["-s", "1000"], "multiple"),
        (vec!["-o", "16M"], "past the end"),
    ] {
        let mut a = vec!["bench"];
        a.extend(args);
        a.push(&img);
        let o = vdisk(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{a:?}: {err}");
    }
}
