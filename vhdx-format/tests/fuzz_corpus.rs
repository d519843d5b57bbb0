//! Replays the fuzz corpus (`fuzz/corpus/vhdx_open/`) through the fuzz entry point, so every
//! seed and every crash found stays a regression test on stable Rust. The seeds are qemu-made
//! images in the sparse encoding; `regenerate_seeds` (ignored) rebuilds them with qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use block_io::BlockDevice;
use vhdx_format::fuzzing;
use vhdx_format::VhdxFile;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhdx_open")
}

#[test]
fn corpus_replays_without_panics() {
    let mut n = 0;
    let mut opened = 0;
    let mut dirty = 0;
    for e in std::fs::read_dir(corpus_dir()).unwrap() {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        fuzzing::run(&data);
        if let Some(m) = fuzzing::materialize(&data) {
            if let Ok(f) = VhdxFile::open(m, &vhdx_format::OpenOptions::new().read_only(true)) {
                opened += 1;
                dirty += usize::from(f.details().log_dirty);
            }
        }
        n += 1;
    }
    assert!(n >= 4, "corpus has {n} files");
    // The qemu seeds are valid images: they must open.
    assert!(opened >= 4, "only {opened} of {n} corpus files open");
    // One seed holds a log that needs replay (left by a killed qemu-io).
    assert!(dirty >= 1, "no corpus file has a dirty log");
}

#[test]
#[ignore = "rebuilds the corpus seeds with qemu-img; run by hand"]
fn regenerate_seeds() {
    if !common::oracle("qemu-img") || !common::oracle("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, opts, size, write) in [
        (
            "qemu_dynamic_1m",
            "block_size=1M",
            "8M",
            Some("write -P 0x11 0 4k"),
        ),
        (
            "qemu_dynamic_8m_zero_off",
            "block_size=8M,block_state_zero=off",
            "20M",
            Some("write -P 0x22 1M 8k"),
        ),
        (
            "qemu_fixed_1m",
            "subformat=fixed,block_size=1M",
            "4M",
            Some("write -P 0x33 512 4096"),
        ),
        ("qemu_dynamic_default", "", "1G", None),
        (
            "qemu_odd_size",
            "block_size=1M",
            "3145728",
            Some("write -P 0x44 3141632 4096"),
        ),
    ] {
        let img = dir.path().join("x.vhdx");
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([common::s(&img), size]);
        common::run("qemu-img", &args);
        if let Some(w) = write {
            common::run("qemu-io", &["-f", "vhdx", "-c", w, common::s(&img)]);
        }
        let bytes = std::fs::read(&img).unwrap();
        let enc = fuzzing::encode_sparse(&bytes);
        let m = fuzzing::materialize(&enc).unwrap();
        let f = VhdxFile::open(m, &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
        let _ = f.info();
        std::fs::write(corpus_dir().join(name), enc).unwrap();
    }
    // A dirty log left by a killed qemu-io (see tests/qemu_dirty_log.rs).
    if common::oracle("strace") {
        let base = dir.path().join("b.vhdx");
        common::run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                "block_size=1M",
                common::s(&base),
                "8M",
            ],
        );
        for n in 1..20 {
            let img = dir.path().join("d.vhdx");
            std::fs::copy(&base, &img).unwrap();
            let _ = std::process::Command::new("strace")
                .args([
                    "-f",
                    "-o",
                    "/dev/null",
                    "-e",
                    &format!("inject=pwrite64:signal=KILL:when={n}"),
                    "qemu-io",
                    "-f",
                    "vhdx",
                    "-c",
                    "write -P 0x66 2M 4k",
                    common::s(&img),
                ])
                .output()
                .unwrap();
            let bytes = std::fs::read(&img).unwrap();
            let m = fuzzing::materialize(&fuzzing::encode_sparse(&bytes)).unwrap();
            if VhdxFile::open(m, &vhdx_format::OpenOptions::new().read_only(true))
                .is_ok_and(|f| f.details().log_dirty)
            {
                std::fs::write(
                    corpus_dir().join("qemu_dirty_log"),
                    fuzzing::encode_sparse(&bytes),
                )
                .unwrap();
                break;
            }
        }
    }
    // A differencing layer of ours with a partially present block.
    let m = std::sync::Arc::new(block_io::MemStorage::new());
    let o = vhdx_format::CreateOptions {
        block_size: Some(1 << 20),
        ..vhdx_format::CreateOptions::differencing(
            4 << 20,
            vhdx_format::ParentRef {
                data_write_guid: uuid::Uuid::from_u128(3),
                relative_path: "p.vhdx".into(),
                absolute_path: Some("C:\\p.vhdx".into()),
            },
        )
    };
    let f = vhdx_format::create(m.clone(), &o).unwrap();
    f.write_at(&[0x77; 1024], 4096).unwrap();
    f.close().unwrap();
    drop(f);
    std::fs::write(
        corpus_dir().join("ours_differencing"),
        fuzzing::encode_sparse(&m.to_vec().unwrap()),
    )
    .unwrap();
}
