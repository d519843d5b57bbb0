//! The NBD client against a scripted fake server that breaks the protocol on purpose, or
//! speaks the parts real servers here never do: `NBD_OPT_EXPORT_NAME` without GO, simple
//! replies only, tight block size constraints, missing transmission flags, an export that
//! changes across a reconnect. Every protocol violation must end the connection and never
//! hand a caller bytes from it; with reconnects allowed, the re-issued request (whole) gets
//! the right data from the next connection.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod nbd_client_util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block_io::nbd::proto::{self, Extent, OptionHeader, Request};
use block_io::nbd::{ClientError, NbdClient, NbdClientOptions, RetryPolicy};
use block_io::{BlockDevice, BlockStatus, ErrorKind};
use nbd_client_util::{pattern, quick_opts};

const SIZE: u64 = 8 << 20;
const TAG: u8 = 0x5a;
const CTX: u32 = 7;

/// What the fake says during the handshake.
#[derive(Clone)]
struct Cfg {
    structured: bool,
    go: bool,
    oldstyle: bool,
    flags: u16,
    block: Option<(u32, u32, u32)>,
    /// The size reported by connections after the first.
    later_size: u64,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            structured: true,
            go: true,
            oldstyle: false,
            flags: proto::TF_HAS_FLAGS
                | proto::TF_SEND_FLUSH
                | proto::TF_SEND_TRIM
                | proto::TF_SEND_WRITE_ZEROES,
            block: None,
            later_size: SIZE,
        }
    }
}

/// What the behaviour wants after a request.
enum Act {
    Go,
    Close,
}

type Behaviour = dyn Fn(usize, &Request, &mut TcpStream) -> Act + Send + Sync;

/// A fake server: one connection at a time; requests are recorded with their connection
/// number; `behave` answers them.
struct Fake {
    port: u16,
    log: Arc<Mutex<Vec<(usize, Request)>>>,
}

impl Fake {
    fn start(cfg: Cfg, behave: Box<Behaviour>) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for (conn, s) in l.incoming().enumerate() {
                let Ok(mut s) = s else { return };
                // A client that hangs up makes the scripted writes fail (and panic): that
                // ends this connection, not the server.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve(conn, &cfg, &*behave, &log2, &mut s)
                }));
            }
        });
        Fake { port, log }
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/x", self.port)
    }

    fn requests(&self) -> Vec<(usize, Request)> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(
    conn: usize,
    cfg: &Cfg,
    behave: &Behaviour,
    log: &Mutex<Vec<(usize, Request)>>,
    s: &mut TcpStream,
) -> std::io::Result<()> {
    s.write_all(&proto::NBDMAGIC.to_be_bytes())?;
    if cfg.oldstyle {
        s.write_all(&0x0000_4202_8186_1253u64.to_be_bytes())?;
        s.write_all(&SIZE.to_be_bytes())?;
        s.write_all(&[0u8; 128])?;
        std::thread::sleep(Duration::from_millis(200));
        return Ok(());
    }
    s.write_all(&proto::IHAVEOPT.to_be_bytes())?;
    s.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let size = if conn == 0 { SIZE } else { cfg.later_size };
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let h = OptionHeader::parse(&h).unwrap();
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data)?;
        let reply = |r: u32, d: &[u8]| proto::option_reply(h.option, r, d);
        match h.option {
            proto::OPT_STRUCTURED_REPLY if cfg.structured => {
                s.write_all(&reply(proto::REP_ACK, &[]))?
            }
            proto::OPT_SET_META_CONTEXT if cfg.structured => {
                let m = proto::rep_meta_context(CTX, proto::BASE_ALLOCATION);
                s.write_all(&reply(proto::REP_META_CONTEXT, &m))?;
                s.write_all(&reply(proto::REP_ACK, &[]))?;
            }
            proto::OPT_GO if cfg.go => {
                s.write_all(&reply(
                    proto::REP_INFO,
                    &proto::info_export(size, cfg.flags),
                ))?;
                if let Some((a, b, c)) = cfg.block {
                    s.write_all(&reply(proto::REP_INFO, &proto::info_block_size(a, b, c)))?;
                }
                s.write_all(&reply(proto::REP_ACK, &[]))?;
                break;
            }
            proto::OPT_EXPORT_NAME => {
                s.write_all(&size.to_be_bytes())?;
                s.write_all(&cfg.flags.to_be_bytes())?;
                break;
            }
            _ => s.write_all(&reply(proto::REP_ERR_UNSUP, &[]))?,
        }
    }
    loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut h)?;
        let req = Request::parse(&h).unwrap();
        if req.command == proto::Command::Disconnect {
            return Ok(());
        }
        log.lock().unwrap().push((conn, req));
        if req.command == proto::Command::Write {
            let mut p = vec![0u8; req.length as usize];
            s.read_exact(&mut p)?;
            // Writes of zeros only are accepted by this fake (see the flags test).
            if p.iter().any(|&b| b != 0) {
                s.write_all(&proto::simple_reply(proto::EINVAL, req.cookie))?;
                continue;
            }
        }
        match behave(conn, &req, s) {
            Act::Go => {}
            Act::Close => return Ok(()),
        }
    }
}

/// The right answer to `req` on a disk holding `pattern(.., TAG)`.
fn good(req: &Request, s: &mut TcpStream, structured: bool) {
    match req.command {
        proto::Command::Read => {
            let d = pattern(req.offset, req.length as usize, TAG);
            if structured {
                data_chunk(s, req.cookie, proto::REPLY_FLAG_DONE, req.offset, &d);
            } else {
                s.write_all(&proto::simple_reply(0, req.cookie)).unwrap();
                s.write_all(&d).unwrap();
            }
        }
        proto::Command::BlockStatus => {
            let e = [Extent {
                length: req.length,
                flags: 0,
            }];
            s.write_all(&proto::block_status_chunk(
                req.cookie,
                proto::REPLY_FLAG_DONE,
                CTX,
                &e,
            ))
            .unwrap();
        }
        _ => s.write_all(&proto::simple_reply(0, req.cookie)).unwrap(),
    }
}

fn data_chunk(s: &mut TcpStream, cookie: u64, flags: u16, offset: u64, d: &[u8]) {
    let h = proto::structured_header(
        flags,
        proto::REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + d.len() as u32,
    );
    s.write_all(&h).unwrap();
    s.write_all(&offset.to_be_bytes()).unwrap();
    s.write_all(d).unwrap();
}

fn hole_chunk(s: &mut TcpStream, cookie: u64, flags: u16, offset: u64, len: u32) {
    let h = proto::structured_header(flags, proto::REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    s.write_all(&h).unwrap();
    s.write_all(&offset.to_be_bytes()).unwrap();
    s.write_all(&len.to_be_bytes()).unwrap();
}

fn never() -> NbdClientOptions {
    NbdClientOptions {
        retry: RetryPolicy::never(),
        ..quick_opts()
    }
}

fn client_error(e: &block_io::Error) -> &ClientError {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<ClientError>())
        .unwrap_or_else(|| panic!("no ClientError under {e:?}"))
}

/// A misbehaviour on connection 0 (good answers after): with no retries the read fails
/// with a protocol error and leaves the buffer alone; with retries it gets the right data
/// from connection 1.
fn check_violation(name: &str, bad: fn(&Request, &mut TcpStream)) {
    let behave = move |conn: usize, req: &Request, s: &mut TcpStream| {
        if conn == 0 && req.command == proto::Command::Read {
            bad(req, s);
            Act::Go
        } else {
            good(req, s, true);
            Act::Go
        }
    };
    let fake = Fake::start(Cfg::default(), Box::new(behave));
    let c = NbdClient::open(&fake.url(), never()).unwrap();
    let mut b = vec![0u8; 8192];
    let e = c.read_at(&mut b, 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{name}");
    match client_error(&e) {
        ClientError::TooManyTries { last, .. } => assert!(
            matches!(**last, ClientError::Protocol(_) | ClientError::Malformed(_)),
            "{name}: {last:?}"
        ),
        other => panic!("{name}: {other:?}"),
    }
    assert!(
        b.iter().all(|&x| x == 0),
        "{name}: bytes of a bad reply reached the caller"
    );
    // Even without retries, the next request connects anew (and gets good answers).
    c.read_at(&mut b, 4096).unwrap();
    assert!(
        b == pattern(4096, 8192, TAG),
        "{name}: wrong data on the new connection"
    );
    drop(c);

    let fake = Fake::start(Cfg::default(), Box::new(behave));
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    c.read_at(&mut b, 4096).unwrap();
    assert!(
        b == pattern(4096, 8192, TAG),
        "{name}: wrong data after the reconnect"
    );
    assert_eq!(c.reconnects(), 1, "{name}");
}

#[test]
fn protocol_violations_reset_the_connection_and_never_yield_data() {
    check_violation("unknown cookie", |r, s| {
        data_chunk(
            s,
            r.cookie ^ 1,
            proto::REPLY_FLAG_DONE,
            r.offset,
            &vec![0xee; r.length as usize],
        )
    });
    check_violation("chunk outside the request", |r, s| {
        data_chunk(
            s,
            r.cookie,
            proto::REPLY_FLAG_DONE,
            r.offset + 512,
            &vec![0xee; r.length as usize],
        )
    });
    check_violation("chunk before the request", |r, s| {
        data_chunk(
            s,
            r.cookie,
            proto::REPLY_FLAG_DONE,
            r.offset - 512,
            &vec![0xee; 512],
        )
    });
    check_violation("read not covered", |r, s| {
        data_chunk(
            s,
            r.cookie,
            proto::REPLY_FLAG_DONE,
            r.offset,
            &vec![0xee; r.length as usize / 2],
        )
    });
    check_violation("overlapping chunks", |r, s| {
        data_chunk(s, r.cookie, 0, r.offset, &vec![0xee; 4096]);
        data_chunk(
            s,
            r.cookie,
            proto::REPLY_FLAG_DONE,
            r.offset + 2048,
            &vec![0xee; r.length as usize - 2048],
        );
    });
    check_violation("simple reply to a read under structured replies", |r, s| {
        s.write_all(&proto::simple_reply(0, r.cookie)).unwrap();
        s.write_all(&vec![0xee; r.length as usize]).unwrap();
    });
    check_violation("empty hole", |r, s| {
        hole_chunk(s, r.cookie, proto::REPLY_FLAG_DONE, r.offset, 0)
    });
    check_violation("bad reply magic", |r, s| {
        let mut h = proto::simple_reply(0, r.cookie);
        h[0] ^= 0xff;
        s.write_all(&h).unwrap();
    });
    check_violation("error chunk with error 0", |r, s| {
        s.write_all(&proto::error_chunk(r.cookie, 0, "no error"))
            .unwrap()
    });
    check_violation("block status chunk to a read", |r, s| {
        let e = [Extent {
            length: r.length,
            flags: 0,
        }];
        s.write_all(&proto::block_status_chunk(
            r.cookie,
            proto::REPLY_FLAG_DONE,
            CTX,
            &e,
        ))
        .unwrap();
    });
    check_violation("unknown reply type", |r, s| {
        s.write_all(&proto::structured_header(
            proto::REPLY_FLAG_DONE,
            77,
            r.cookie,
            0,
        ))
        .unwrap();
    });
    check_violation("NONE without DONE", |r, s| {
        s.write_all(&proto::structured_header(
            0,
            proto::REPLY_TYPE_NONE,
            r.cookie,
            0,
        ))
        .unwrap();
    });
}

#[test]
fn a_read_cut_off_mid_reply_is_reissued_whole() {
    // Connection 0 sends the first half of the read as poison data, then drops. Connection
    // 1 answers the first half as a hole and the second half as data: the caller must see
    // zeros then data, none of the poison.
    let behave = |conn: usize, req: &Request, s: &mut TcpStream| {
        if req.command != proto::Command::Read {
            good(req, s, true);
            return Act::Go;
        }
        let half = req.length / 2;
        if conn == 0 {
            data_chunk(s, req.cookie, 0, req.offset, &vec![0xee; half as usize]);
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            return Act::Close;
        }
        hole_chunk(s, req.cookie, 0, req.offset, half);
        let d = pattern(req.offset + u64::from(half), half as usize, TAG);
        data_chunk(
            s,
            req.cookie,
            proto::REPLY_FLAG_DONE,
            req.offset + u64::from(half),
            &d,
        );
        Act::Go
    };
    let fake = Fake::start(Cfg::default(), Box::new(behave));
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    let mut b = vec![0x11u8; 65_536];
    c.read_at(&mut b, 0).unwrap();
    assert!(
        b[..32_768].iter().all(|&x| x == 0),
        "poison or stale bytes in the first half"
    );
    assert!(b[32_768..] == pattern(32_768, 32_768, TAG)[..]);
    assert_eq!(c.reconnects(), 1);
    assert_eq!(c.reissued_requests(), 1);
}

#[test]
fn server_errors_carry_their_message_and_eshutdown_retries_elsewhere() {
    let behave = |conn: usize, req: &Request, s: &mut TcpStream| {
        match (conn, req.offset) {
            // An error with a message, structured.
            (_, 0) => s
                .write_all(&proto::error_chunk(req.cookie, proto::EIO, "disk on fire"))
                .unwrap(),
            // The server is shutting down: try another connection.
            (0, 4096) => {
                s.write_all(&proto::error_chunk(req.cookie, proto::ESHUTDOWN, "bye"))
                    .unwrap();
                return Act::Close;
            }
            _ => good(req, s, true),
        }
        Act::Go
    };
    let fake = Fake::start(Cfg::default(), Box::new(behave));
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    let mut b = vec![0u8; 4096];
    let e = c.read_at(&mut b, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(
        matches!(client_error(&e), ClientError::Server { errno: 5, message } if message == "disk on fire")
    );
    assert!(
        e.chain_string().contains("EIO: disk on fire"),
        "{}",
        e.chain_string()
    );
    assert_eq!(c.reconnects(), 0);
    c.read_at(&mut b, 4096).unwrap();
    assert!(b == pattern(4096, 4096, TAG));
    assert_eq!(c.reconnects(), 1);
}

#[test]
fn export_name_fallback_with_simple_replies_only() {
    let cfg = Cfg {
        structured: false,
        go: false,
        ..Cfg::default()
    };
    let fake = Fake::start(
        cfg,
        Box::new(|_, r: &Request, s: &mut TcpStream| {
            good(r, s, false);
            Act::Go
        }),
    );
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    let info = c.export_info();
    assert!(!info.structured_replies && !info.base_allocation);
    assert_eq!(c.info().virtual_size, SIZE);
    let mut b = vec![0u8; 3 * 65_536];
    c.read_at(&mut b, 65_536).unwrap();
    assert!(b == pattern(65_536, b.len(), TAG));
    let r = c.block_status(0, SIZE).unwrap();
    assert_eq!((r.status, r.len), (BlockStatus::Data, SIZE));
    // A structured chunk when none was negotiated is a protocol violation.
    let fake = Fake::start(
        Cfg {
            structured: false,
            go: false,
            ..Cfg::default()
        },
        Box::new(|_, r: &Request, s: &mut TcpStream| {
            good(r, s, true);
            Act::Go
        }),
    );
    let c = NbdClient::open(&fake.url(), never()).unwrap();
    assert!(c.read_at(&mut b, 0).is_err());
    assert!(b == pattern(65_536, b.len(), TAG), "the buffer was touched");
}

#[test]
fn oldstyle_servers_are_refused() {
    let cfg = Cfg {
        oldstyle: true,
        ..Cfg::default()
    };
    let fake = Fake::start(
        cfg,
        Box::new(|_, _: &Request, _: &mut TcpStream| Act::Close),
    );
    let e = NbdClient::open(&fake.url(), quick_opts()).unwrap_err();
    assert!(matches!(e, ClientError::Unsupported(_)), "{e:?}");
}

#[test]
fn block_size_constraints_are_honoured() {
    // 4 KiB minimum, 64 KiB maximum payload: every request must be a multiple of 4 KiB and
    // no read or write above 64 KiB.
    let cfg = Cfg {
        block: Some((4096, 4096, 65_536)),
        ..Cfg::default()
    };
    let fake = Fake::start(
        cfg,
        Box::new(|_, r: &Request, s: &mut TcpStream| {
            good(r, s, true);
            Act::Go
        }),
    );
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    assert_eq!(c.info().logical_sector_size, 4096);
    assert_eq!(c.max_payload(), 65_536);
    let mut b = vec![0u8; 512 * 1024];
    c.read_at(&mut b, 8192).unwrap();
    assert!(b == pattern(8192, b.len(), TAG));
    c.write_at(&vec![0u8; 200 * 1024], 4096).unwrap();
    // 512-byte requests are unaligned for this export.
    let mut small = vec![0u8; 512];
    assert_eq!(
        c.read_at(&mut small, 0).unwrap_err().kind(),
        ErrorKind::Unaligned
    );
    let log = fake.requests();
    assert_eq!(
        log.iter()
            .filter(|(_, r)| r.command == proto::Command::Read)
            .count(),
        8
    );
    assert_eq!(
        log.iter()
            .filter(|(_, r)| r.command == proto::Command::Write)
            .count(),
        4
    );
    for (_, r) in &log {
        assert!(
            r.length <= 65_536 && r.length % 4096 == 0 && r.offset % 4096 == 0,
            "{r:?}"
        );
    }
    // Invalid constraints are refused at the handshake.
    let cfg = Cfg {
        block: Some((3000, 4096, 65_536)),
        ..Cfg::default()
    };
    let fake = Fake::start(cfg, Box::new(|_, _: &Request, _: &mut TcpStream| Act::Go));
    let e = NbdClient::open(&fake.url(), quick_opts()).unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
}

#[test]
fn transmission_flags_decide_what_is_sent() {
    // No FLUSH, TRIM or WRITE_ZEROES: flush and discard send nothing, write_zeroes writes
    // zeros (this fake refuses non-zero writes).
    let cfg = Cfg {
        flags: proto::TF_HAS_FLAGS,
        ..Cfg::default()
    };
    let fake = Fake::start(
        cfg,
        Box::new(|_, r: &Request, s: &mut TcpStream| {
            good(r, s, true);
            Act::Go
        }),
    );
    // Multi-conn is asked for but not advertised: one connection.
    let o = NbdClientOptions {
        connections: 4,
        ..quick_opts()
    };
    let c = NbdClient::open(&fake.url(), o).unwrap();
    assert_eq!(c.connections(), 1);
    c.flush().unwrap();
    c.discard(0, 65_536).unwrap();
    c.write_zeroes(65_536, 3 << 20 >> 2, false).unwrap();
    let log = fake.requests();
    assert!(
        log.iter().all(|(_, r)| r.command == proto::Command::Write),
        "{log:?}"
    );
    let total: u64 = log.iter().map(|(_, r)| u64::from(r.length)).sum();
    assert_eq!(total, 3 << 20 >> 2);

    // With them: WRITE_ZEROES carries NO_HOLE exactly when not unmapping.
    let fake = Fake::start(
        Cfg::default(),
        Box::new(|_, r: &Request, s: &mut TcpStream| {
            good(r, s, true);
            Act::Go
        }),
    );
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    c.write_zeroes(0, 4096, false).unwrap();
    c.write_zeroes(4096, 4096, true).unwrap();
    c.discard(8192, 4096).unwrap();
    c.flush().unwrap();
    let log: Vec<_> = fake
        .requests()
        .into_iter()
        .map(|(_, r)| (r.command, r.flags))
        .collect();
    assert_eq!(
        log,
        vec![
            (proto::Command::WriteZeroes, proto::CMD_FLAG_NO_HOLE),
            (proto::Command::WriteZeroes, 0),
            (proto::Command::Trim, 0),
            (proto::Command::Flush, 0),
        ]
    );

    // A read-only export: writes refused locally, nothing sent.
    let fake = Fake::start(
        Cfg {
            flags: proto::TF_HAS_FLAGS | proto::TF_READ_ONLY,
            ..Cfg::default()
        },
        Box::new(|_, r: &Request, s: &mut TcpStream| {
            good(r, s, true);
            Act::Go
        }),
    );
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    assert!(c.info().read_only);
    assert_eq!(
        c.write_at(&[0; 512], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        c.write_zeroes(0, 512, true).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert!(fake.requests().is_empty());
}

#[test]
fn block_status_maps_hole_and_zero_flags() {
    let behave = |_, r: &Request, s: &mut TcpStream| {
        if r.command != proto::Command::BlockStatus {
            good(r, s, true);
            return Act::Go;
        }
        assert_eq!(r.flags, proto::CMD_FLAG_REQ_ONE);
        // 0..64K hole+zero, 64K..128K zero (allocated), 128K..192K hole only, then data
        // whose extent is 100 bytes (not a sector), the rest data.
        let (len, flags) = match r.offset {
            0 => (65_536, proto::STATE_HOLE | proto::STATE_ZERO),
            65_536 => (65_536, proto::STATE_ZERO),
            131_072 => (65_536, proto::STATE_HOLE),
            196_608 => (100, 0),
            _ => (r.length, 0),
        };
        let e = [Extent {
            length: len.min(r.length),
            flags,
        }];
        s.write_all(&proto::block_status_chunk(
            r.cookie,
            proto::REPLY_FLAG_DONE,
            CTX,
            &e,
        ))
        .unwrap();
        Act::Go
    };
    let fake = Fake::start(Cfg::default(), Box::new(behave));
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    let st = |off| {
        let r = c.block_status(off, SIZE - off).unwrap();
        (r.status, r.len)
    };
    assert_eq!(st(0), (BlockStatus::Zero, 65_536));
    assert_eq!(st(65_536), (BlockStatus::Zero, 65_536));
    // A hole without ZERO need not read as zeros: data.
    assert_eq!(st(131_072), (BlockStatus::Data, 65_536));
    // A run shorter than a sector is widened to one data sector.
    assert_eq!(st(196_608), (BlockStatus::Data, 512));
    assert_eq!(st(262_144), (BlockStatus::Data, SIZE - 262_144));
    // A wrong context id or an extent longer than asked is a protocol error.
    for bad in [0u8, 1] {
        let fake = Fake::start(
            Cfg::default(),
            Box::new(move |_, r: &Request, s: &mut TcpStream| {
                let (id, len) = if bad == 0 {
                    (CTX + 1, r.length)
                } else {
                    (CTX, r.length + 512)
                };
                let e = [Extent {
                    length: len,
                    flags: 0,
                }];
                s.write_all(&proto::block_status_chunk(
                    r.cookie,
                    proto::REPLY_FLAG_DONE,
                    id,
                    &e,
                ))
                .unwrap();
                Act::Go
            }),
        );
        let c = NbdClient::open(&fake.url(), never()).unwrap();
        let e = c.block_status(0, 4096).unwrap_err();
        assert!(
            matches!(client_error(&e), ClientError::TooManyTries { last, .. } if matches!(**last, ClientError::Protocol(_))),
            "{e:?}"
        );
    }
}

#[test]
fn an_export_that_changes_size_across_a_reconnect_is_refused() {
    let cfg = Cfg {
        later_size: 2 * SIZE,
        ..Cfg::default()
    };
    let behave = |conn: usize, r: &Request, s: &mut TcpStream| {
        if conn == 0 {
            return Act::Close;
        }
        good(r, s, true);
        Act::Go
    };
    let fake = Fake::start(cfg, Box::new(behave));
    let c = NbdClient::open(&fake.url(), quick_opts()).unwrap();
    let mut b = vec![0u8; 4096];
    let e = c.read_at(&mut b, 0).unwrap_err();
    assert!(
        matches!(client_error(&e), ClientError::ExportChanged(_)),
        "{e:?}"
    );
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn write_through_uses_fua_or_a_flush() {
    for fua in [true, false] {
        let mut flags = Cfg::default().flags;
        if fua {
            flags |= proto::TF_SEND_FUA;
        }
        let fake = Fake::start(
            Cfg {
                flags,
                ..Cfg::default()
            },
            Box::new(|_, r: &Request, s: &mut TcpStream| {
                good(r, s, true);
                Act::Go
            }),
        );
        let o = NbdClientOptions {
            write_through: true,
            ..quick_opts()
        };
        let c = NbdClient::open(&fake.url(), o).unwrap();
        c.write_at(&[0u8; 4096], 0).unwrap();
        c.write_zeroes(4096, 4096, true).unwrap();
        c.discard(8192, 4096).unwrap();
        let log: Vec<_> = fake
            .requests()
            .into_iter()
            .map(|(_, r)| (r.command, r.flags))
            .collect();
        let expect = if fua {
            vec![
                (proto::Command::Write, proto::CMD_FLAG_FUA),
                (proto::Command::WriteZeroes, proto::CMD_FLAG_FUA),
                (proto::Command::Trim, proto::CMD_FLAG_FUA),
            ]
        } else {
            vec![
                (proto::Command::Write, 0),
                (proto::Command::Flush, 0),
                (proto::Command::WriteZeroes, 0),
                (proto::Command::Flush, 0),
                (proto::Command::Trim, 0),
                (proto::Command::Flush, 0),
            ]
        };
        assert_eq!(log, expect, "fua {fua}");
    }
}

#[test]
fn a_slow_transfer_is_not_taken_for_a_silent_server() {
    // A 4 MiB read trickles in over about 1.6 s, longer than the request timeout: the bytes
    // arriving keep the connection alive.
    let behave = |_, r: &Request, s: &mut TcpStream| {
        if r.command != proto::Command::Read {
            good(r, s, true);
            return Act::Go;
        }
        let d = pattern(r.offset, r.length as usize, TAG);
        let h = proto::structured_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            r.cookie,
            8 + r.length,
        );
        s.write_all(&h).unwrap();
        s.write_all(&r.offset.to_be_bytes()).unwrap();
        for piece in d.chunks(64 * 1024) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
        Act::Go
    };
    let fake = Fake::start(Cfg::default(), Box::new(behave));
    let o = NbdClientOptions {
        request_timeout: Some(Duration::from_millis(1000)),
        ..never()
    };
    let c = NbdClient::open(&fake.url(), o).unwrap();
    let t0 = std::time::Instant::now();
    let mut b = vec![0u8; 4 << 20];
    c.read_at(&mut b, 0).unwrap();
    assert!(
        t0.elapsed() > Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    assert!(b == pattern(0, 4 << 20, TAG));
    assert_eq!(c.reconnects(), 0);
}
