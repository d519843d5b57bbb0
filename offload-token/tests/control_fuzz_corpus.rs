//! Replays the control-protocol fuzz corpus (`fuzz/corpus/offload_control/`) through the
//! fuzz entry point (`offload_token::transfer::fuzzing`), so every seed and every crash found
//! stays a regression test on stable Rust. `regenerate_seeds` (ignored) rewrites the seeds:
//! every request kind, valid and refused, bodies that are no request, and raw wire bytes
//! (hellos good and bad, an oversized frame, an unauthenticated frame).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use offload_token::transfer::fuzzing::{
    authenticated_input, certified_input, hello_frame, raw_input, ControlWorld, CERTIFIED_TRANSFER,
    IMAGE,
};
use offload_token::transfer::{Request, Role, SourceEndpoint};
use uuid::Uuid;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/offload_control")
}

fn json(r: &Request) -> Vec<u8> {
    serde_json::to_vec(r).unwrap()
}

/// The seeds: (name, input).
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let t = Uuid::from_u128(0x7431);
    let info = |p: &str| json(&Request::Info { path: p.into() });
    let trust = |role| {
        json(&Request::Trust {
            transfer: t,
            role,
            ca: "3082".into(),
        })
    };
    let status = json(&Request::Status {
        transfer: t,
        role: Role::Source,
    });
    let certify = json(&Request::Certify {
        transfer: t,
        role: Role::Source,
        cert: "30820102".into(),
    });
    let mint = json(&Request::Mint {
        transfer: t,
        path: IMAGE.into(),
        offset: 0,
        length: 4096,
        ttl_ms: 1000,
    });
    let redeem = json(&Request::Redeem {
        transfer: t,
        path: IMAGE.into(),
        offset: 0,
        length: 4096,
        token: "00".repeat(512),
        token_offset: 0,
        source: Some(SourceEndpoint {
            host: "127.0.0.1".into(),
            port: 9,
            export: "x".into(),
        }),
    });
    let cancel = json(&Request::Cancel {
        transfer: t,
        role: Role::Destination,
    });
    let close = json(&Request::Close {
        transfer: t,
        role: Role::Source,
    });
    let c = CERTIFIED_TRANSFER;
    let cmint = json(&Request::Mint {
        transfer: c,
        path: IMAGE.into(),
        offset: 4096,
        length: 32768,
        ttl_ms: 0,
    });
    let credeem = |host: &str, token: String, source: bool| {
        json(&Request::Redeem {
            transfer: c,
            path: IMAGE.into(),
            offset: 0,
            length: 8192,
            token,
            token_offset: 0,
            source: source.then(|| SourceEndpoint {
                host: host.into(),
                port: 9,
                export: "x".into(),
            }),
        })
    };
    let zero = offload_token::hex::encode(offload_token::Token::zero().as_bytes());
    let cstatus = json(&Request::Status {
        transfer: c,
        role: Role::Destination,
    });
    let mut hello_junk = hello_frame(1, 1, [7; 32]);
    hello_junk.extend_from_slice(&[0, 0, 0, 48]);
    hello_junk.extend_from_slice(&[0x11; 48]);
    let mut oversized = hello_frame(1, 1, [7; 32]);
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    vec![
        ("info", authenticated_input(&[&info(IMAGE)])),
        ("info_missing", authenticated_input(&[&info("nope.raw")])),
        (
            "info_outside",
            authenticated_input(&[&info("../x"), &info("/etc/passwd"), &info("")]),
        ),
        (
            "trust_status_cancel_close",
            authenticated_input(&[
                &trust(Role::Source),
                &status,
                &trust(Role::Source),
                &certify,
                &mint,
                &close,
            ]),
        ),
        (
            "trust_destination_redeem",
            authenticated_input(&[&trust(Role::Destination), &redeem, &cancel, &redeem]),
        ),
        (
            "unknown_transfer",
            authenticated_input(&[&status, &close, &mint]),
        ),
        (
            "not_a_request",
            authenticated_input(&[b"{\"op\":\"info\",\"path\":\"a\",\"x\":1}", &info(IMAGE)]),
        ),
        (
            "certified_mint_status_close",
            certified_input(&[&cmint, &cstatus, &cmint, &close]),
        ),
        (
            "certified_redeem_zero_token",
            certified_input(&[&credeem("", zero.clone(), false), &cstatus]),
        ),
        (
            "certified_redeem_unreachable_source",
            certified_input(&[
                &credeem("127.0.0.1", "11".repeat(512), true),
                &credeem("example.com", zero, true),
            ]),
        ),
        ("garbage_body", authenticated_input(&[b"\xff\x00{"])),
        ("raw_hello_then_forged_frame", raw_input(&hello_junk)),
        (
            "raw_hello_no_common_version",
            raw_input(&hello_frame(7, 9, [0; 32])),
        ),
        ("raw_oversized_frame", raw_input(&oversized)),
        ("raw_short", raw_input(b"\x00\x00\x00\x04VDX")),
    ]
}

fn world() -> (tempfile::TempDir, ControlWorld) {
    let dir = tempfile::tempdir().unwrap();
    let w = ControlWorld::new(dir.path()).unwrap();
    (dir, w)
}

#[test]
fn corpus_replays_without_violations() {
    let (_dir, w) = world();
    let mut n = 0;
    for e in std::fs::read_dir(corpus_dir()).unwrap() {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        if let Err(v) = w.run(&data) {
            panic!("{}: {v}", p.display());
        }
        n += 1;
    }
    assert!(n >= seeds().len(), "corpus has {n} files");
}

#[test]
fn seeds_are_in_the_corpus_and_pass() {
    let (_dir, w) = world();
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(corpus_dir().join(name))
            .unwrap_or_else(|e| panic!("seed {name}: {e} (run regenerate_seeds)"));
        assert_eq!(
            on_disk, bytes,
            "seed {name} is stale (run regenerate_seeds)"
        );
        w.run(&bytes).unwrap();
    }
}

/// Requests on one connection are answered in order, one reply each; a body that is no
/// request ends the connection (the bodies after it are not sent, no violation).
#[test]
fn requests_are_answered_in_order() {
    let (_dir, w) = world();
    let info = serde_json::to_vec(&Request::Info { path: IMAGE.into() }).unwrap();
    w.run(&authenticated_input(&[&info, &info, &info])).unwrap();
    w.run(&authenticated_input(&[b"[]", &info])).unwrap();
    // An empty input and a bare mode byte are fine.
    w.run(&[]).unwrap();
    w.run(&[1]).unwrap();
}

#[test]
#[ignore = "rewrites fuzz/corpus/offload_control; run by hand after a protocol change"]
fn regenerate_seeds() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}
