//! The `send_stream` fuzz target's corpus (`fuzz/corpus/send_stream/`) replayed through
//! `meta_ops::send::verify` on stable Rust: every input is refused with a typed error or
//! verified, none panics; the seeds named `valid-*` verify. `regenerate_seeds` (ignored)
//! writes the seeds: a 1 MiB raw disk with data, zeros and holes sent with levels none, 1 and
//! auto and with 64 KiB and 1 MiB records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use meta_ops::send::{send, verify, Level, SendOptions};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/send_stream")
}

#[test]
fn replay_corpus() {
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = verify(&mut &data[..]);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("valid-") {
            assert!(r.is_ok(), "{name}: {:?}", r.err());
        }
        n += 1;
    }
    assert!(n >= 4, "the corpus has {n} inputs");
}

#[test]
#[ignore = "rewrites the seeds of fuzz/corpus/send_stream"]
fn regenerate_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    let mut bytes = vec![0u8; 1 << 20];
    for (i, b) in bytes[..256 << 10].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    bytes[512 << 10..576 << 10].fill(0x5a);
    std::fs::write(&img, &bytes).unwrap();
    let disk = chain::Disk::open(&img, &chain::OpenOptions::new().read_only(true)).unwrap();
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, level, chunk) in [
        ("valid-none-64k", Level::Fixed(0), 64 << 10),
        ("valid-zstd1-64k", Level::Fixed(1), 64 << 10),
        ("valid-auto-1m", Level::Auto, 1 << 20),
    ] {
        let opts = SendOptions {
            level,
            chunk,
            threads: 2,
            ..SendOptions::default()
        };
        let mut out = Vec::new();
        send(&disk, &opts, &mut out).unwrap();
        std::fs::write(corpus_dir().join(name), &out).unwrap();
        if name == "valid-zstd1-64k" {
            std::fs::write(corpus_dir().join("truncated"), &out[..out.len() / 2]).unwrap();
            let mut flipped = out.clone();
            let mid = flipped.len() / 3;
            flipped[mid] ^= 0x40;
            std::fs::write(corpus_dir().join("flipped"), &flipped).unwrap();
        }
    }
}
