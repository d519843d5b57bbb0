//! The `nbd_server` fuzz target's steps on stable Rust: the corpus (`fuzz/corpus/nbd_server/`)
//! replays through `block_io::nbd::fuzzing::run`, the seeds still reach the paths they were
//! made for, and mutated seeds never break the harness's rules. Crashes the fuzzer found are
//! regression tests here, byte for byte.
//!
//! Most seeds are real client conversations (qemu-io, qemu-img, nbdinfo, nbdcopy) captured
//! by `capture_seeds` (ignored: it needs the clients, and rewrites the corpus) through a
//! recording proxy in front of our own server; the rest are made by hand.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use block_io::nbd::fuzzing::{run, FLAG_TLS, PATTERN, PATTERN_LEN};
use block_io::nbd::proto::{self, Command, InfoRequest, MetaContextRequest, OptionHeader, Request};
use proptest::prelude::*;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_server")
}

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(corpus_dir().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
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

// ---- hand-made conversations -----------------------------------------------------------

/// A conversation under construction: flags byte, client flags, then options and requests.
struct Talk(Vec<u8>);

impl Talk {
    fn new(flags: u8) -> Talk {
        let mut b = vec![flags];
        b.extend_from_slice(
            &(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes(),
        );
        Talk(b)
    }
    fn option(mut self, option: u32, data: &[u8]) -> Talk {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.0.extend_from_slice(&h.encode());
        self.0.extend_from_slice(data);
        self
    }
    fn go(self, name: &str) -> Talk {
        let g = InfoRequest {
            name: name.into(),
            requests: vec![proto::INFO_BLOCK_SIZE, proto::INFO_NAME],
        };
        self.option(proto::OPT_GO, &g.encode())
    }
    fn structured(self, name: &str) -> Talk {
        let m = MetaContextRequest {
            name: name.into(),
            queries: vec![proto::BASE_ALLOCATION.into()],
        };
        self.option(proto::OPT_STRUCTURED_REPLY, &[])
            .option(proto::OPT_SET_META_CONTEXT, &m.encode())
    }
    fn request(mut self, cmd: Command, flags: u16, offset: u64, length: u32) -> Talk {
        let r = Request {
            flags,
            command: cmd,
            cookie: self.0.len() as u64,
            offset,
            length,
        };
        self.0.extend_from_slice(&r.encode());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Talk {
        self.0.extend_from_slice(b);
        self
    }
}

/// The hand-made seeds: (name, input).
fn hand_made() -> Vec<(&'static str, Vec<u8>)> {
    let block = |n: u8| vec![n; 4096];
    vec![
        (
            "hand_structured_all_commands",
            Talk::new(0)
                .structured("")
                .go("")
                .request(Command::Write, proto::CMD_FLAG_FUA, 0, 4096)
                .bytes(&block(1))
                .request(Command::Read, proto::CMD_FLAG_DF, 0, 4096)
                .request(Command::BlockStatus, 0, 0, 1 << 20)
                .request(Command::BlockStatus, proto::CMD_FLAG_REQ_ONE, 0, 1 << 20)
                .request(Command::WriteZeroes, proto::CMD_FLAG_FAST_ZERO, 8192, 8192)
                .request(Command::WriteZeroes, proto::CMD_FLAG_NO_HOLE, 16384, 4096)
                .request(Command::Trim, 0, 65536, 65536)
                .request(Command::Cache, 0, 0, 4096)
                .request(Command::Flush, 0, 0, 0)
                .request(Command::Unknown(99), 0, 0, 0)
                .request(Command::Read, 0, (1 << 20) - 512, 1024)
                .request(Command::Read, 0, 1, 512)
                .request(Command::Disconnect, 0, 0, 0)
                .0,
        ),
        (
            "hand_export_name_simple_replies",
            Talk::new(0)
                .option(proto::OPT_LIST, &[])
                .option(proto::OPT_EXPORT_NAME, b"ro")
                .request(Command::Read, 0, 65536, 4096)
                .request(Command::Write, 0, 0, 512)
                .bytes(&[3; 512])
                .request(Command::Trim, 0, 0, 512)
                .0,
        ),
        (
            "hand_4k_sectors_unaligned",
            Talk::new(4)
                .go("")
                .request(Command::Write, 0, 512, 512)
                .bytes(&[9; 512])
                .request(Command::Read, 0, 4096, 4096)
                .0,
        ),
        (
            "hand_tls_required_options_then_starttls_garbage",
            Talk::new(FLAG_TLS)
                .option(proto::OPT_LIST, &[])
                .go("")
                .option(proto::OPT_STARTTLS, b"x")
                .option(proto::OPT_STARTTLS, &[])
                .bytes(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0])
                .0,
        ),
        (
            "hand_tls_required_export_name",
            Talk::new(FLAG_TLS)
                .option(proto::OPT_EXPORT_NAME, b"")
                .request(Command::Write, 0, 0, 512)
                .bytes(&[1; 512])
                .0,
        ),
        (
            "hand_bad_meta_contexts_and_info",
            Talk::new(0)
                .option(proto::OPT_SET_META_CONTEXT, &[0, 0, 0, 9])
                .option(proto::OPT_STRUCTURED_REPLY, b"junk")
                .option(proto::OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 1])
                .option(proto::OPT_INFO, &[0, 0, 0, 2, b'r', b'o', 0, 1, 0])
                .option(proto::OPT_GO, &[0, 0, 0, 7])
                .option(77, &[1, 2, 3])
                .option(proto::OPT_ABORT, &[])
                .0,
        ),
        (
            "hand_option_too_big",
            Talk::new(0)
                .bytes(&proto::IHAVEOPT.to_be_bytes())
                .bytes(&proto::OPT_INFO.to_be_bytes())
                .bytes(&(proto::MAX_OPTION_DATA + 1).to_be_bytes())
                .0,
        ),
        (
            "hand_bad_request_magic",
            Talk::new(0).go("").bytes(&[0x25, 0x60, 0x95, 0x14]).0,
        ),
        (
            "hand_write_payload_too_big_then_truncated",
            Talk::new(0)
                .go("")
                .request(Command::Write, 0, 0, proto::MAX_PAYLOAD + 512)
                .bytes(&[0; 100])
                .0,
        ),
        ("hand_unknown_client_flags", vec![0, 0, 0, 0, 0x80]),
    ]
}

// ---- the tests -------------------------------------------------------------------------

#[test]
fn corpus_replays_without_breaking_a_rule() {
    let all = corpus();
    for (name, input) in &all {
        let o = std::panic::catch_unwind(|| run(input));
        assert!(o.is_ok(), "seed {name} broke a rule");
    }
    assert!(all.len() >= 15, "corpus has {} files", all.len());
}

#[test]
fn hand_made_seeds_are_in_the_corpus() {
    for (name, bytes) in hand_made() {
        assert_eq!(
            seed(name),
            bytes,
            "{name} differs: run regenerate_hand_made_seeds"
        );
    }
}

#[test]
fn captured_seeds_still_reach_their_paths() {
    // qemu-io wrote the pattern, read it back, zeroed and discarded it. qemu-io waited for
    // each reply; the replay sends every request at once, and the server runs requests in
    // flight concurrently (as NBD allows), so the read may come before the write or after the
    // zeroing: its 64 KiB reply carries the written bytes or zeros.
    let o = run(&seed("qemu_io_write_read_zero_discard_0"));
    assert!(o.changed);
    let (written, zeros) = (vec![0x5a; 64 << 10], vec![0; 64 << 10]);
    assert!(
        o.output
            .windows(written.len())
            .any(|w| w == written || w == zeros),
        "no 64 KiB read reply"
    );
    // qemu-img convert read the pattern the export holds.
    let o = run(&seed("qemu_img_convert_0"));
    let pattern = vec![PATTERN; PATTERN_LEN];
    assert!(o.output.windows(pattern.len()).any(|w| w == pattern));
    assert!(!o.changed);
    // nbdinfo --list got both exports' names.
    let o = run(&seed("nbdinfo_list_0"));
    assert!(o.output.windows(2).any(|w| w == b"ro"));
    // A real TLS client's ClientHello hits a server without a certificate: nothing changes.
    let o = run(&seed("qemu_io_tls_0"));
    assert!(!o.changed);
    assert!(o.output.len() > 18);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Seeds with bytes overwritten, cut short or with the flags changed break no rule.
    #[test]
    fn mutated_seeds_break_no_rule(
        which in any::<prop::sample::Index>(),
        flags in any::<u8>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let all = corpus();
        let mut input = all[which.index(all.len())].1.clone();
        if input.is_empty() {
            input.push(0);
        }
        input[0] = flags;
        let n = input.len();
        for (at, b) in edits {
            input[at.index(n)] = b;
        }
        input.truncate(1 + cut.index(n));
        run(&input);
    }
}

// ---- making the seeds ------------------------------------------------------------------

#[test]
#[ignore = "rewrites the hand-made seeds in fuzz/corpus/nbd_server; run by hand"]
fn regenerate_hand_made_seeds() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in hand_made() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}

/// Captures real clients' conversations with our server (as the fuzz harness sets it up:
/// exports "" and "ro") through a recording proxy; each connection becomes a seed
/// `<name>_<n>` with `flags` in front.
#[test]
#[ignore = "needs qemu-io, qemu-img, nbdinfo, nbdcopy; rewrites fuzz/corpus/nbd_server"]
fn capture_seeds() {
    use capture::*;
    std::fs::create_dir_all(corpus_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let out = out.to_str().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x33u8; 64 << 10]).unwrap();
    let src = src.to_str().unwrap();

    capture("qemu_io_write_read_zero_discard", 0, None, |url| {
        let cmds = [
            "write -P 0x5a 0 64k",
            "read -P 0x5a 0 64k",
            "write -z 128k 64k",
            "discard 192k 64k",
            "aio_write -P 0x11 256k 4k",
            "aio_flush",
            "write -f -P 0x12 260k 4k",
        ];
        let mut a = vec!["-f", "raw"];
        for c in &cmds {
            a.extend(["-c", c]);
        }
        a.push(url);
        tool("qemu-io", &a);
    });
    capture("qemu_img_convert", 0, None, |url| {
        tool("qemu-img", &["convert", "-f", "raw", "-O", "raw", url, out]);
    });
    capture("qemu_img_map", 0, None, |url| {
        tool("qemu-img", &["map", "-f", "raw", "--output=json", url]);
    });
    capture("nbdinfo_list", 0, None, |url| {
        tool("nbdinfo", &["--list", url]);
    });
    capture("nbdinfo_map", 0, None, |url| {
        tool("nbdinfo", &["--map", url]);
    });
    capture("nbdcopy_to_export", 0, None, |url| {
        tool("nbdcopy", &[src, url]);
    });
    capture(
        "qemu_io_plain_to_tls_server",
        FLAG_TLS,
        Some(false),
        |url| {
            // Refused with NBD_REP_ERR_TLS_REQD.
            let _ = std::process::Command::new("qemu-io")
                .args(["-f", "raw", "-c", "read 0 4k", url])
                .output();
        },
    );
    capture("qemu_io_tls", FLAG_TLS, Some(true), |opts| {
        let (obj, opts) = opts.split_once(' ').unwrap();
        tool(
            "qemu-io",
            &["--object", obj, "--image-opts", opts, "-c", "read 0 4k"],
        );
    });
}

mod capture {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    use block_io::nbd::{tls::TlsCredentials, Export, NbdServer};
    use block_io::{MemStorage, RawDisk, Storage};

    use super::corpus_dir;
    use block_io::nbd::fuzzing::{DISK_SIZE, PATTERN, PATTERN_LEN, PATTERN_OFFSET};

    pub fn tool(cmd: &str, args: &[&str]) {
        let o = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn disk() -> Arc<RawDisk<MemStorage>> {
        let s = MemStorage::new();
        s.set_len(DISK_SIZE).unwrap();
        s.write_at(&vec![PATTERN; PATTERN_LEN], PATTERN_OFFSET)
            .unwrap();
        Arc::new(RawDisk::new(s).unwrap())
    }

    /// Runs `client` against a recording proxy in front of a server set up as the harness
    /// does (`tls`: None plain, Some(with a client-side TLS object or not)). The client gets
    /// `nbd://PROXY/` (or, for `Some(true)`, "OBJECT OPTS" for qemu's --object/--image-opts).
    pub fn capture(name: &str, flags: u8, tls: Option<bool>, client: impl FnOnce(&str)) {
        let dir = tempfile::tempdir().unwrap();
        let exports = vec![
            Export::new("", disk()),
            Export::new("ro", disk()).read_only(true),
        ];
        let mut server = NbdServer::bind_tcp("127.0.0.1:0", exports).unwrap();
        let mut client_dir = None;
        if tls.is_some() {
            let (sdir, cdir) = pki(dir.path());
            server = server.require_tls(TlsCredentials::from_dir(sdir).server_config().unwrap());
            client_dir = Some(cdir);
        }
        let addr = server.local_addr().unwrap();
        let stop = server.stop_handle();
        let th = std::thread::spawn(move || server.serve());

        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let paddr = proxy.local_addr().unwrap();
        let recorded: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let rec = recorded.clone();
        proxy.set_nonblocking(true).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done2 = done.clone();
        let acceptor = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !done2.load(std::sync::atomic::Ordering::Relaxed) {
                match proxy.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let s = TcpStream::connect(addr).unwrap();
                        let rec = rec.clone();
                        conns.push(std::thread::spawn(move || relay(c, s, rec)));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
            for c in conns {
                c.join().unwrap();
            }
        });
        let url = match (tls, &client_dir) {
            (Some(true), Some(cdir)) => format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={} \
                 driver=nbd,host=127.0.0.1,port={},export=,tls-creds=tls0",
                cdir.display(),
                paddr.port()
            ),
            _ => format!("nbd://{paddr}/"),
        };
        client(&url);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        acceptor.join().unwrap();
        stop.stop();
        th.join().unwrap().unwrap();
        for (i, conv) in recorded.lock().unwrap().iter().enumerate() {
            let mut seed = vec![flags];
            seed.extend_from_slice(conv);
            std::fs::write(corpus_dir().join(format!("{name}_{i}")), seed).unwrap();
        }
    }

    /// Relays both ways until both sides close; records what the client sent.
    fn relay(c: TcpStream, s: TcpStream, rec: Arc<Mutex<Vec<Vec<u8>>>>) {
        let (mut c_rd, mut s_wr) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut b = [0u8; 65536];
            loop {
                match c_rd.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen.extend_from_slice(&b[..n]);
                        if s_wr.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s_wr.shutdown(Shutdown::Write);
            seen
        });
        let (mut s_rd, mut c_wr) = (s, c);
        let mut b = [0u8; 65536];
        loop {
            match s_rd.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if c_wr.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = c_wr.shutdown(Shutdown::Write);
        let seen = up.join().unwrap();
        rec.lock().unwrap().push(seen);
    }

    /// A CA-signed server certificate for 127.0.0.1 and a client directory trusting the CA.
    fn pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa};
        use rcgen::{Issuer, KeyPair, KeyUsagePurpose};
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let ca_key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(p, ca_key);
        let mut l = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        l.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        l.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        l.not_before = rcgen::date_time_ymd(2020, 1, 1);
        l.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = l.signed_by(&key, &issuer).unwrap();
        let (s, c) = (dir.join("server"), dir.join("client"));
        std::fs::create_dir_all(&s).unwrap();
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(s.join("ca-cert.pem"), ca.pem()).unwrap();
        std::fs::write(s.join("server-cert.pem"), cert.pem()).unwrap();
        std::fs::write(s.join("server-key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(c.join("ca-cert.pem"), ca.pem()).unwrap();
        (s, c)
    }
}
