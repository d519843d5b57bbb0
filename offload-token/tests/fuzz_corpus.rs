//! Replays the fuzz corpus (`fuzz/corpus/offload_token/`) through the fuzz entry point, so
//! every seed and every crash found stays a regression test on stable Rust.
//! `regenerate_seeds` (ignored) rewrites the seeds: genuine, partial, zero-token, tampered,
//! wrong-principal, invalidated, revoked, expired, retired-key and misaligned redeems.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use offload_token::fuzzing::{self, input, world, TOKEN_LEN};
use offload_token::TOKEN_SIZE;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/offload_token")
}

/// The seeds: (name, input).
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let blank = [0u8; TOKEN_SIZE];
    let flip = |i: usize, m: u8| {
        let mut b = [0u8; TOKEN_SIZE];
        b[i] = m;
        b
    };
    let minted = *world().unwrap().minted.as_bytes();
    vec![
        ("genuine", input(1, &blank, 0, TOKEN_LEN, 0, 0, 0)),
        (
            "genuine_verbatim",
            input(0, &minted, 4096, 64 << 10, 8192, 1, 0),
        ),
        (
            "genuine_partial_by_bob",
            input(1, &blank, 512, 64 << 10, TOKEN_LEN - 8192, 1, 0),
        ),
        ("zero_token", input(2, &blank, 0, 32 << 10, 0, 2, 0)),
        (
            "zero_token_not_blank",
            input(2, &flip(300, 1), 0, 32 << 10, 0, 0, 0),
        ),
        ("tampered_type", input(1, &flip(1, 0x10), 0, 4096, 0, 0, 0)),
        ("tampered_reserved", input(1, &flip(5, 1), 0, 4096, 0, 0, 0)),
        (
            "tampered_id_length",
            input(1, &flip(7, 1), 0, 4096, 0, 0, 0),
        ),
        ("tampered_version", input(1, &flip(9, 2), 0, 4096, 0, 0, 0)),
        ("tampered_key_id", input(1, &flip(15, 3), 0, 4096, 0, 0, 0)),
        (
            "tampered_length",
            input(1, &flip(8 + 74, 0x40), 0, 4096, 0, 0, 0),
        ),
        ("tampered_mac", input(1, &flip(511, 0x80), 0, 4096, 0, 0, 0)),
        ("wrong_audience", input(1, &blank, 0, 4096, 0, 2, 0)),
        ("invalidated", input(1, &blank, 0, 4096, 0, 0, 1)),
        ("revoked", input(1, &blank, 0, 4096, 0, 0, 2)),
        ("expired", input(1, &blank, 0, 4096, 0, 0, 4)),
        ("key_retired", input(1, &blank, 0, 4096, 0, 0, 8)),
        ("misaligned", input(1, &blank, 100, 4096, 0, 0, 0)),
        (
            "token_offset_past_end",
            input(1, &blank, 0, 4096, TOKEN_LEN, 0, 0),
        ),
        (
            "offset_overflows",
            input(1, &blank, u64::MAX - 511, 4096, 0, 0, 0),
        ),
        ("short_garbage", b"\x00VDOT\x01\xf8".to_vec()),
    ]
}

#[test]
fn corpus_replays_without_violations() {
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir()).unwrap() {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        if let Err(v) = fuzzing::run(&data) {
            panic!("{}: {v}", p.display());
        }
        n += 1;
    }
    assert!(n >= 20, "corpus has {n} files");
}

#[test]
fn seeds_are_in_the_corpus_and_still_reach_their_paths() {
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(corpus_dir().join(name))
            .unwrap_or_else(|e| panic!("seed {name}: {e} (run regenerate_seeds)"));
        assert_eq!(
            on_disk, bytes,
            "seed {name} is stale (run regenerate_seeds)"
        );
        fuzzing::run(&bytes).unwrap();
    }
}

#[test]
#[ignore = "rewrites fuzz/corpus/offload_token; run by hand after a format change"]
fn regenerate_seeds() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}
