//! The `tls_records` fuzz target's steps on stable Rust: the corpus
//! (`fuzz/corpus/tls_records/`) replays through `block_io::nbd::fuzzing::tls_records`, the
//! hand-made seeds still reach the paths they were made for, and pseudo-random and mutated
//! inputs never break the harness's rules. Crashes the fuzzer found are regression tests
//! here, byte for byte.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::ErrorKind;
use std::path::PathBuf;

use block_io::nbd::fuzzing::tls_records::{
    record, tls_records, Outcome, FLAG_AHEAD, FLAG_CLIENT, FLAG_SEALED, FLAG_WRITE, TICKETS_SHIFT,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tls_records")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

// ---- hand-made inputs ------------------------------------------------------------------

/// Sealed records under construction: the header, then the record specs.
struct Records {
    head: Vec<u8>,
    specs: Vec<u8>,
    count: u8,
    edits: Vec<(u32, u8)>,
    cut: u32,
}

impl Records {
    fn new(flags: u8, shape: u8) -> Records {
        Records {
            head: vec![flags | FLAG_SEALED, shape, 0],
            specs: Vec::new(),
            count: 0,
            edits: Vec::new(),
            cut: 0,
        }
    }
    fn writes(mut self, w: u8) -> Records {
        self.head[0] |= FLAG_WRITE;
        self.head[2] = w;
        self
    }
    fn spec(mut self, kind: u8, pad_units: u8, len: u16, bytes: &[u8]) -> Records {
        self.specs.push(kind | pad_units << 3);
        self.specs.extend_from_slice(&len.to_le_bytes());
        self.specs.extend_from_slice(bytes);
        self.count += 1;
        self
    }
    fn data(self, len: u16) -> Records {
        self.spec(record::DATA, 0, len, &[])
    }
    fn close(self) -> Records {
        self.spec(record::ALERT, 0, 2, &[1, 0])
    }
    fn edit(mut self, at: u32, x: u8) -> Records {
        self.edits.push((at, x));
        self
    }
    fn cut(mut self, n: u32) -> Records {
        self.cut = n;
        self
    }
    fn bytes(self) -> Vec<u8> {
        let mut b = self.head;
        b.push(self.count);
        b.push(self.edits.len() as u8);
        for (at, x) in self.edits {
            b.extend_from_slice(&at.to_le_bytes()[..3]);
            b.push(x);
        }
        b.extend_from_slice(&self.cut.to_le_bytes()[..3]);
        b.extend_from_slice(&self.specs);
        b
    }
}

const CLIENT_TICKETS: u8 = FLAG_CLIENT | 2 << TICKETS_SHIFT;

/// The hand-made seeds: (name, input).
fn hand_made() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "data_then_close_aes256",
            Records::new(0, 0)
                .data(5)
                .data(16384)
                .data(0)
                .close()
                .bytes(),
        ),
        (
            "data_padded_small_pieces_aes128",
            Records::new(1, 0x31)
                .spec(record::DATA, 31, 100, &[])
                .spec(record::DATA, 3, 16384, &[])
                .close()
                .bytes(),
        ),
        (
            "client_tickets_ahead_chacha_then_data",
            Records::new(2 | CLIENT_TICKETS | FLAG_AHEAD, 0x52)
                .spec(record::TICKET, 0, 150, &[])
                .data(700)
                .spec(record::HANDSHAKE, 0, 0, &[])
                .close()
                .bytes(),
        ),
        (
            "client_tickets_on_the_socket_eof",
            Records::new(CLIENT_TICKETS, 0x17).data(3000).bytes(),
        ),
        (
            "key_update_refused",
            Records::new(FLAG_CLIENT, 0)
                .data(10)
                .spec(record::KEY_UPDATE, 0, 0, &[1])
                .data(10)
                .close()
                .bytes(),
        ),
        (
            "fatal_alert_refused",
            Records::new(0, 0x2f)
                .data(64)
                .spec(record::ALERT, 0, 2, &[2, 40])
                .bytes(),
        ),
        (
            "oversized_inner_plaintext",
            Records::new(2, 0)
                .data(5)
                .spec(record::DATA, 1, 16384, &[])
                .bytes(),
        ),
        (
            "all_zero_inner_plaintext",
            Records::new(0, 0).spec(record::TYPED, 2, 0, &[0]).bytes(),
        ),
        (
            "change_cipher_spec_inside",
            Records::new(1, 0)
                .spec(record::TYPED, 0, 1, &[20, 1])
                .bytes(),
        ),
        (
            "flipped_tag_of_second_record",
            Records::new(0, 0x64)
                .data(100)
                .data(100)
                .close()
                .edit(2 * (5 + 101 + 16) - 1, 0x80)
                .bytes(),
        ),
        (
            "cut_in_the_middle",
            Records::new(FLAG_CLIENT, 0x09)
                .data(16384)
                .data(16384)
                .close()
                .cut(10000)
                .bytes(),
        ),
        (
            "writes_of_every_kind",
            Records::new(0, 0x3a).data(1).close().writes(0xf7).bytes(),
        ),
        (
            "raw_garbage_after_tickets",
            vec![CLIENT_TICKETS, 0x21, 0, 23, 3, 3, 0, 6, 1, 2, 3, 4, 5, 6],
        ),
        (
            "raw_oversized_header",
            vec![FLAG_WRITE, 0, 0x0d, 23, 3, 3, 0x41, 0x01, 0],
        ),
        ("raw_wrong_type", vec![0, 0, 0, 22, 3, 1, 0, 0]),
    ]
}

// ---- the tests -------------------------------------------------------------------------

#[test]
fn corpus_replays_without_breaking_a_rule() {
    let all = corpus();
    for (name, input) in &all {
        let o = std::panic::catch_unwind(|| tls_records(input));
        assert!(o.is_ok(), "seed {name} broke a rule");
    }
    assert!(
        all.len() >= hand_made().len(),
        "corpus has {} files",
        all.len()
    );
}

#[test]
fn hand_made_seeds_are_in_the_corpus() {
    for (name, bytes) in hand_made() {
        let seed = std::fs::read(corpus_dir().join(name)).unwrap_or_default();
        assert_eq!(
            seed, bytes,
            "{name} differs: run regenerate_hand_made_seeds"
        );
    }
}

fn kind(o: &Outcome) -> Option<ErrorKind> {
    o.end.as_ref().err().map(|e| e.kind())
}

fn run_seed(name: &str) -> Outcome {
    let (_, input) = hand_made().into_iter().find(|(n, _)| *n == name).unwrap();
    tls_records(&input)
}

#[test]
fn seeds_reach_their_paths() {
    let o = run_seed("data_then_close_aes256");
    assert!(o.modelled && o.end.is_ok(), "{o:?}");
    assert_eq!(o.read.len(), 5 + 16384);

    let o = run_seed("client_tickets_ahead_chacha_then_data");
    assert!(o.modelled && o.end.is_ok(), "{:?}", o.end);
    assert_eq!(o.read.len(), 700);

    let o = run_seed("client_tickets_on_the_socket_eof");
    assert_eq!(kind(&o), Some(ErrorKind::UnexpectedEof));
    assert_eq!(o.read.len(), 3000);

    let o = run_seed("key_update_refused");
    assert_eq!(o.read.len(), 10);
    let e = o.end.unwrap_err();
    assert!(e.to_string().contains("key updates"), "{e}");

    for name in [
        "fatal_alert_refused",
        "oversized_inner_plaintext",
        "all_zero_inner_plaintext",
        "change_cipher_spec_inside",
    ] {
        let o = run_seed(name);
        assert!(o.modelled, "{name}");
        assert_eq!(
            kind(&o),
            Some(ErrorKind::InvalidData),
            "{name}: {:?}",
            o.end
        );
    }

    let o = run_seed("flipped_tag_of_second_record");
    assert!(!o.modelled);
    assert_eq!(o.read.len(), 100);
    assert_eq!(kind(&o), Some(ErrorKind::InvalidData));

    let o = run_seed("cut_in_the_middle");
    assert_eq!(o.read.len(), 16384);
    assert_eq!(kind(&o), Some(ErrorKind::UnexpectedEof));

    for name in [
        "raw_garbage_after_tickets",
        "raw_oversized_header",
        "raw_wrong_type",
    ] {
        let o = run_seed(name);
        assert!(o.read.is_empty());
        assert_eq!(
            kind(&o),
            Some(ErrorKind::InvalidData),
            "{name}: {:?}",
            o.end
        );
    }
}

/// Found by the harness on its first runs: an error record after application data in the
/// same socket read dropped the data already copied into the caller's buffer, and a read
/// after the error went on with the records behind the bad one (past a KeyUpdate, to data
/// and a clean close). Flags: client side, sealed; ten bytes of data, a KeyUpdate, ten
/// bytes of data, close_notify.
#[test]
fn regression_data_before_a_refused_record_is_read_and_the_error_stays() {
    let input = [
        0x0c, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x07, 0x00, 0x00, 0x01,
        0x00, 0x0a, 0x00, 0x03, 0x02, 0x00, 0x01, 0x00,
    ];
    let o = tls_records(&input);
    assert_eq!(o.read.len(), 10);
    assert_eq!(kind(&o), Some(ErrorKind::InvalidData));
}

/// Inputs of a few hundred pseudo-random bytes, raw and sealed.
#[test]
fn pseudo_random_inputs_break_no_rule() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x7153_7265_636f_7264);
    let mut modelled = 0;
    for _ in 0..300 {
        let mut input = vec![0u8; rng.random_range(0..400)];
        rng.fill(&mut input[..]);
        if input.len() > 5 && rng.random_bool(0.7) {
            input[0] |= FLAG_SEALED;
            // Few edits and no cut, mostly: the model then checks the whole read.
            input[4] = if rng.random_bool(0.8) {
                0
            } else {
                rng.random()
            };
            let cut = 5 + usize::from(input[4] % 9) * 4;
            input.iter_mut().skip(cut).take(3).for_each(|b| *b = 0);
        }
        if tls_records(&input).modelled {
            modelled += 1;
        }
    }
    assert!(
        modelled > 50,
        "only {modelled} inputs were checked against the model"
    );
}

/// Hand-made seeds with bytes overwritten or cut short.
#[test]
fn mutated_seeds_break_no_rule() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let all = hand_made();
    for _ in 0..100 {
        let mut input = all[rng.random_range(0..all.len())].1.clone();
        for _ in 0..rng.random_range(0..4) {
            let at = rng.random_range(0..input.len());
            input[at] = rng.random();
        }
        input.truncate(rng.random_range(1..=input.len()));
        tls_records(&input);
    }
}

// ---- making the seeds and the certificate ----------------------------------------------

#[test]
#[ignore = "rewrites the hand-made seeds in fuzz/corpus/tls_records; run by hand"]
fn regenerate_hand_made_seeds() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in hand_made() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}

#[test]
#[ignore = "rewrites the harness's certificate and key; run by hand"]
fn regenerate_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/nbd/fuzzing");
    std::fs::write(dir.join("tls_records_cert.der"), ck.cert.der()).unwrap();
    std::fs::write(
        dir.join("tls_records_key.der"),
        ck.signing_key.serialize_der(),
    )
    .unwrap();
}
