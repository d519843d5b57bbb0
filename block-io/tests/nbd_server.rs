//! The NBD server against real clients on loopback (qemu-io, qemu-img, nbdinfo, nbdcopy) and
//! against a small raw-protocol client of our own for what real clients never send: many
//! requests before any reply, malformed options and requests, writes to read-only exports.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;

use block_io::nbd::proto::{self, InfoRequest, MetaContextRequest, OptionHeader, Request};
use block_io::nbd::{Export, NbdServer, StopHandle};
use block_io::testing::oracle;
use block_io::{BlockDevice, BlockStatus, FileStorage, MemStorage, RawDisk, Storage};

/// Runs a command, panicking with its stderr on failure; returns stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server running on its own thread; stopped (and checked) on drop.
struct Running {
    stop: StopHandle,
    thread: Option<JoinHandle<block_io::Result<()>>>,
    addr: Option<SocketAddr>,
}

impl Running {
    fn start(server: NbdServer) -> Running {
        let stop = server.stop_handle();
        let addr = server.local_addr();
        let thread = std::thread::spawn(move || server.serve());
        Running {
            stop,
            thread: Some(thread),
            addr,
        }
    }

    fn tcp(exports: Vec<Export>) -> Running {
        Running::start(NbdServer::bind_tcp("127.0.0.1:0", exports).unwrap())
    }

    fn url(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.addr.unwrap())
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr.unwrap()).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s
    }

    fn finish(mut self) {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mem_disk(size: u64) -> Arc<RawDisk<MemStorage>> {
    let s = MemStorage::new();
    s.set_len(size).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}

/// A sparse raw file of `size` bytes with data in `runs` (offset, len, byte); the rest holes.
fn file_disk(path: &Path, size: u64, runs: &[(u64, usize, u8)]) -> Arc<RawDisk<FileStorage>> {
    let s = FileStorage::create(path).unwrap();
    s.set_len(size).unwrap();
    let d = RawDisk::new(s).unwrap();
    for &(off, len, byte) in runs {
        d.write_at(&vec![byte; len], off).unwrap();
    }
    d.flush().unwrap();
    Arc::new(d)
}

fn read_dev(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    read_dev(dev, 0, dev.info().virtual_size as usize)
}

/// The device's own map: (offset, len, reads-as-zero-known) runs, merged.
fn device_map(dev: &dyn BlockDevice) -> Vec<(u64, u64, bool)> {
    let size = dev.info().virtual_size;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let r = dev.block_status(pos, size - pos).unwrap();
        let zero = r.status != BlockStatus::Data;
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += r.len,
            _ => out.push((pos, r.len, zero)),
        }
        pos += r.len;
    }
    out
}

#[test]
fn qemu_io_writes_and_reads_back_over_tcp() {
    if !oracle("qemu-io") {
        return;
    }
    let dev = mem_disk(16 << 20);
    let srv = Running::tcp(vec![Export::new("disk", dev.clone())]);
    let url = srv.url("disk");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "aio_write -P 0x11 2M 256k",
            "-c",
            "aio_write -P 0x22 3M 256k",
            "-c",
            "aio_flush",
            "-c",
            "write -z 512k 64k",
            "-c",
            "discard 4M 1M",
            "-c",
            "read -P 0xab 0 512k",
            "-c",
            "read -P 0 512k 64k",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "aio_read -P 0x11 2M 256k",
            "-c",
            "aio_read -P 0x22 3M 256k",
            "-c",
            "aio_flush",
            "-c",
            "flush",
            &url,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    // The bytes are on the device, not only in the client's view.
    assert!(read_dev(&*dev, 0, 512 << 10).iter().all(|&b| b == 0xab));
    assert!(read_dev(&*dev, 512 << 10, 64 << 10).iter().all(|&b| b == 0));
    assert!(read_dev(&*dev, 1 << 20, 64 << 10)
        .iter()
        .all(|&b| b == 0xcd));
    assert!(read_dev(&*dev, 2 << 20, 256 << 10)
        .iter()
        .all(|&b| b == 0x11));
    assert!(read_dev(&*dev, 3 << 20, 256 << 10)
        .iter()
        .all(|&b| b == 0x22));
    srv.finish();
}

#[test]
fn qemu_io_over_a_unix_socket_and_read_only_exports_refuse_writes() {
    if !oracle("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let dev = mem_disk(4 << 20);
    dev.write_at(&vec![0x5a; 1 << 20], 1 << 20).unwrap();
    let server = NbdServer::bind_unix(
        &sock,
        vec![
            Export::new("rw", dev.clone()),
            Export::new("ro", dev.clone()).read_only(true),
        ],
    )
    .unwrap();
    let srv = Running::start(server);
    let url = |n: &str| format!("nbd+unix:///{n}?socket={}", sock.display());
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 64k",
            "-c",
            "read -P 0x5a 1M 1M",
            &url("rw"),
        ],
    );
    assert!(read_dev(&*dev, 0, 64 << 10).iter().all(|&b| b == 0x77));
    // Read-only: reads work, a write is refused (qemu opens it read-only and says so).
    run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0x77 0 64k", &url("ro")],
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 64k", &url("ro")])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("ermission") || text.contains("read-only"),
        "{text}"
    );
    assert!(read_dev(&*dev, 0, 64 << 10).iter().all(|&b| b == 0x77));
    srv.finish();
    assert!(!sock.exists(), "the socket file is removed");
}

/// A sparse file with data, zeros and holes, exported read-only.
fn sparse_export(dir: &Path) -> (Arc<RawDisk<FileStorage>>, PathBuf) {
    let path = dir.join("src.raw");
    let dev = file_disk(
        &path,
        32 << 20,
        &[
            (0, 1 << 20, 0x41),
            (5 << 20, 3 << 20, 0x42),
            (20 << 20, 64 << 10, 0x43),
            (31 << 20, 1 << 20, 0x44),
        ],
    );
    (dev, path)
}

#[test]
fn qemu_img_convert_copies_and_map_shows_the_holes() {
    if !oracle("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (dev, _) = sparse_export(dir.path());
    let srv = Running::tcp(vec![Export::new("src", dev.clone()).read_only(true)]);
    let url = srv.url("src");
    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), read_all(&*dev));
    // qemu-img map over NBD reports what base:allocation said.
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &url]);
    let entries: Vec<serde_like::Entry> = serde_like::parse_map(&map);
    let expect = device_map(&*dev);
    assert!(expect.iter().any(|r| r.2), "the test file has holes");
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for e in entries {
        match got.last_mut() {
            Some(last) if last.2 == e.zero => last.1 += e.length,
            _ => got.push((e.start, e.length, e.zero)),
        }
    }
    assert_eq!(got, expect, "qemu-img map: {map}");
    srv.finish();
}

/// Just enough JSON reading for `qemu-img map --output=json` (no serde in block-io).
mod serde_like {
    pub struct Entry {
        pub start: u64,
        pub length: u64,
        pub zero: bool,
    }

    fn field<'a>(obj: &'a str, key: &str) -> &'a str {
        let k = format!("\"{key}\":");
        let i = obj.find(&k).unwrap() + k.len();
        let rest = obj[i..].trim_start();
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end].trim()
    }

    pub fn parse_map(s: &str) -> Vec<Entry> {
        s.split('{')
            .skip(1)
            .map(|obj| Entry {
                start: field(obj, "start").parse().unwrap(),
                length: field(obj, "length").parse().unwrap(),
                zero: field(obj, "zero") == "true",
            })
            .collect()
    }
}

#[test]
fn nbdinfo_map_and_nbdcopy_see_the_allocation() {
    if !oracle("nbdinfo") || !oracle("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (dev, _) = sparse_export(dir.path());
    let srv = Running::tcp(vec![Export::new("src", dev.clone())]);
    let url = srv.url("src");
    // nbdinfo --map: "offset length type description" per line; type 3 = hole,zero.
    let map = run("nbdinfo", &["--map", &url]);
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        let zero = ty & proto::STATE_ZERO != 0;
        match got.last_mut() {
            Some(last) if last.2 == zero => last.1 += len,
            _ => got.push((off, len, zero)),
        }
    }
    assert_eq!(got, device_map(&*dev), "nbdinfo --map: {map}");
    let info = run("nbdinfo", &[&url]);
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("can_fast_zero: true"), "{info}");
    let out = dir.path().join("copy.raw");
    run("nbdcopy", &[&url, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), read_all(&*dev));
    // And back the other way into a second export, with multi-conn and holes.
    let dst = mem_disk(32 << 20);
    dst.write_at(&vec![0xee; 32 << 20], 0).unwrap();
    let srv2 = Running::tcp(vec![Export::new("", dst.clone())]);
    let dst_url = format!("nbd://{}", srv2.addr.unwrap());
    run("nbdcopy", &["--connections=4", &url, &dst_url]);
    assert_eq!(read_all(&*dst), read_all(&*dev));
    srv2.finish();
    srv.finish();
}

// ---- a raw-protocol client -------------------------------------------------------------

/// A connection past the greeting and client flags.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn open(srv: &Running) -> Raw {
        let mut s = srv.connect();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        s.write_all(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        Raw { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).unwrap();
        self.s.write_all(data).unwrap();
    }

    /// Reads option replies until a final one (ACK or error): (type, data) of each.
    fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; proto::OPTION_REPLY_LEN];
            self.s.read_exact(&mut h).unwrap();
            let h = proto::OptionReplyHeader::parse(&h).unwrap();
            assert_eq!(h.option, option);
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = h.reply == proto::REP_ACK || h.reply & (1 << 31) != 0;
            out.push((h.reply, d));
            if last {
                return out;
            }
        }
    }

    /// Negotiates structured replies and `base:allocation`, then GOes to `name`; returns
    /// the transmission flags.
    fn go(&mut self, name: &str, structured: bool) -> u16 {
        if structured {
            self.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(
                self.replies(proto::OPT_STRUCTURED_REPLY)[0].0,
                proto::REP_ACK
            );
            let m = MetaContextRequest {
                name: name.into(),
                queries: vec![proto::BASE_ALLOCATION.into()],
            };
            self.option(proto::OPT_SET_META_CONTEXT, &m.encode());
            let r = self.replies(proto::OPT_SET_META_CONTEXT);
            assert_eq!(r[0].0, proto::REP_META_CONTEXT);
            assert_eq!(r.last().unwrap().0, proto::REP_ACK);
        }
        let g = InfoRequest {
            name: name.into(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        };
        self.option(proto::OPT_GO, &g.encode());
        let r = self.replies(proto::OPT_GO);
        assert_eq!(r.last().unwrap().0, proto::REP_ACK, "{r:?}");
        let export = r
            .iter()
            .find(|(t, d)| *t == proto::REP_INFO && d[..2] == [0, 0])
            .unwrap();
        u16::from_be_bytes([export.1[10], export.1[11]])
    }

    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            command: proto::Command::from_code(cmd),
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    /// Reads one reply (all chunks of a structured one): (cookie, error, data).
    fn reply(&mut self, read_len: Option<usize>) -> (u64, u32, Vec<u8>) {
        let mut data = Vec::new();
        loop {
            let mut p = [0u8; 16];
            self.s.read_exact(&mut p).unwrap();
            match proto::ReplyHeader::parse_prefix(&p).unwrap() {
                (proto::ReplyHeader::Simple { error, cookie }, _) => {
                    if error == 0 {
                        if let Some(n) = read_len {
                            data = vec![0u8; n];
                            self.s.read_exact(&mut data).unwrap();
                        }
                    }
                    return (cookie, error, data);
                }
                (
                    proto::ReplyHeader::Structured {
                        flags,
                        kind,
                        cookie,
                        ..
                    },
                    extra,
                ) => {
                    let mut l = [0u8; 4];
                    assert_eq!(extra, 4);
                    self.s.read_exact(&mut l).unwrap();
                    let mut payload = vec![0u8; u32::from_be_bytes(l) as usize];
                    self.s.read_exact(&mut payload).unwrap();
                    let mut error = 0;
                    match kind {
                        proto::REPLY_TYPE_OFFSET_DATA => data.extend_from_slice(&payload[8..]),
                        proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_NONE => {
                            data.extend_from_slice(&payload)
                        }
                        proto::REPLY_TYPE_ERROR => {
                            error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        }
                        other => panic!("unexpected chunk type {other}"),
                    }
                    if error != 0 {
                        assert_ne!(flags & proto::REPLY_FLAG_DONE, 0);
                        return (cookie, error, data);
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        return (cookie, 0, data);
                    }
                }
            }
        }
    }

    /// Whether the server closed the connection (reads EOF or a reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn sixty_four_requests_in_flight_are_answered_by_cookie() {
    let dev = mem_disk(8 << 20);
    let srv = Running::tcp(vec![Export::new("d", dev.clone())]);
    for structured in [false, true] {
        let mut c = Raw::open(&srv);
        let flags = c.go("d", structured);
        assert_ne!(flags & proto::TF_CAN_MULTI_CONN, 0);
        assert_eq!(flags & proto::TF_READ_ONLY, 0);
        // 64 writes of 64 KiB, each its own pattern, all sent before any reply is read.
        for i in 0..64u64 {
            c.request(proto::CMD_WRITE, 0, 1000 + i, i * 65536, 65536);
            c.s.write_all(&vec![i as u8 + structured as u8; 65536])
                .unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let (cookie, err, _) = c.reply(None);
            assert_eq!(err, 0);
            assert!(seen.insert(cookie));
        }
        assert_eq!(seen.len(), 64);
        // 64 reads in flight, replies matched by cookie.
        for i in 0..64u64 {
            c.request(proto::CMD_READ, 0, 5000 + i, i * 65536, 65536);
        }
        for _ in 0..64 {
            let (cookie, err, data) = c.reply(Some(65536));
            assert_eq!(err, 0);
            let i = cookie - 5000;
            assert!(i < 64);
            assert!(data.iter().all(|&b| b == i as u8 + structured as u8));
        }
        c.request(proto::CMD_FLUSH, 0, 1, 0, 0);
        assert_eq!(c.reply(None).1, 0);
        c.request(proto::CMD_DISC, 0, 2, 0, 0);
        assert!(c.closed());
    }
    srv.finish();
}

#[test]
fn malformed_inputs_get_the_right_errors_and_the_server_keeps_serving() {
    let dev = mem_disk(1 << 20);
    let srv = Running::tcp(vec![
        Export::new("d", dev.clone()),
        Export::new("ro", dev.clone()).read_only(true),
    ]);

    // A bad option magic closes the connection.
    let mut c = Raw::open(&srv);
    c.s.write_all(&[0x55; 16]).unwrap();
    assert!(c.closed());

    // Unknown client flags close it too.
    let mut s = srv.connect();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(matches!(s.read(&mut g), Ok(0) | Err(_)));

    // Option errors: unknown option, bad GO data, unknown export, LIST with data,
    // SET_META_CONTEXT before structured replies, STARTTLS without TLS; then LIST works.
    let mut c = Raw::open(&srv);
    c.option(0x4242, b"junk");
    assert_eq!(c.replies(0x4242)[0].0, proto::REP_ERR_UNSUP);
    c.option(proto::OPT_GO, &[0, 0, 0, 200, b'x']);
    assert_eq!(c.replies(proto::OPT_GO)[0].0, proto::REP_ERR_INVALID);
    let g = InfoRequest {
        name: "nope".into(),
        requests: vec![],
    };
    c.option(proto::OPT_INFO, &g.encode());
    assert_eq!(c.replies(proto::OPT_INFO)[0].0, proto::REP_ERR_UNKNOWN);
    c.option(proto::OPT_LIST, b"x");
    assert_eq!(c.replies(proto::OPT_LIST)[0].0, proto::REP_ERR_INVALID);
    let m = MetaContextRequest {
        name: "d".into(),
        queries: vec![proto::BASE_ALLOCATION.into()],
    };
    c.option(proto::OPT_SET_META_CONTEXT, &m.encode());
    assert_eq!(
        c.replies(proto::OPT_SET_META_CONTEXT)[0].0,
        proto::REP_ERR_INVALID
    );
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ERR_UNSUP);
    c.option(proto::OPT_LIST, &[]);
    let r = c.replies(proto::OPT_LIST);
    let names: Vec<&[u8]> = r
        .iter()
        .filter(|(t, _)| *t == proto::REP_SERVER)
        .map(|(_, d)| &d[4..])
        .collect();
    assert_eq!(names, vec![&b"d"[..], &b"ro"[..]]);
    c.option(
        proto::OPT_LIST_META_CONTEXT,
        &MetaContextRequest {
            name: "d".into(),
            queries: vec![],
        }
        .encode(),
    );
    let r = c.replies(proto::OPT_LIST_META_CONTEXT);
    assert_eq!(r[0].0, proto::REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], proto::BASE_ALLOCATION.as_bytes());
    // A huge option is skipped and refused, and the handshake goes on.
    c.option(0x4343, &vec![0u8; 100_000]);
    assert_eq!(c.replies(0x4343)[0].0, proto::REP_ERR_TOO_BIG);
    c.option(proto::OPT_ABORT, &[]);
    assert_eq!(c.replies(proto::OPT_ABORT)[0].0, proto::REP_ACK);
    assert!(c.closed());

    // Transmission errors, simple replies then structured ones.
    for structured in [false, true] {
        let mut c = Raw::open(&srv);
        c.go("d", structured);
        // Out of range read: EINVAL; out of range write: ENOSPC (payload consumed).
        c.request(proto::CMD_READ, 0, 1, 1 << 20, 512);
        assert_eq!(c.reply(None), (1, proto::EINVAL, vec![]));
        c.request(proto::CMD_WRITE, 0, 2, (1 << 20) - 512, 1024);
        c.s.write_all(&[1u8; 1024]).unwrap();
        assert_eq!(c.reply(None).1, proto::ENOSPC);
        // Offset + length overflowing u64.
        c.request(proto::CMD_READ, 0, 3, u64::MAX - 511, 1024);
        assert_eq!(c.reply(None).1, proto::EINVAL);
        // Unaligned.
        c.request(proto::CMD_READ, 0, 4, 100, 512);
        assert_eq!(c.reply(None).1, proto::EINVAL);
        // Too large a read, too large a write (its 33 MiB payload is skipped).
        c.request(proto::CMD_READ, 0, 5, 0, proto::MAX_PAYLOAD + 512);
        assert_eq!(c.reply(None).1, proto::EINVAL);
        c.request(proto::CMD_WRITE, 0, 6, 0, proto::MAX_PAYLOAD + 512);
        c.s.write_all(&vec![7u8; (proto::MAX_PAYLOAD + 512) as usize])
            .unwrap();
        assert_eq!(c.reply(None).1, proto::EINVAL);
        // Unknown command, a flag not valid for the command.
        c.request(42, 0, 7, 0, 0);
        assert_eq!(c.reply(None).1, proto::EINVAL);
        c.request(proto::CMD_FLUSH, proto::CMD_FLAG_NO_HOLE, 8, 0, 0);
        assert_eq!(c.reply(None).1, proto::EINVAL);
        // Fast zero that must allocate: ENOTSUP, contents untouched.
        c.request(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE,
            9,
            0,
            4096,
        );
        assert_eq!(c.reply(None).1, proto::ENOTSUP);
        if !structured {
            // Block status needs a context (and structured replies).
            c.request(proto::CMD_BLOCK_STATUS, 0, 10, 0, 4096);
            assert_eq!(c.reply(None).1, proto::EINVAL);
        }
        // Nothing above wrote: the device still reads zeros.
        assert!(read_all(&*dev).iter().all(|&b| b == 0));
        // And the connection still works.
        c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 11, 4096, 512);
        c.s.write_all(&[9u8; 512]).unwrap();
        assert_eq!(c.reply(None), (11, 0, vec![]));
        c.request(proto::CMD_READ, 0, 12, 4096, 512);
        assert_eq!(c.reply(Some(512)), (12, 0, vec![9u8; 512]));
        c.request(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FAST_ZERO,
            13,
            4096,
            512,
        );
        assert_eq!(c.reply(None).1, 0);
        if structured {
            c.request(
                proto::CMD_BLOCK_STATUS,
                proto::CMD_FLAG_REQ_ONE,
                14,
                0,
                1 << 20,
            );
            let (cookie, err, data) = c.reply(None);
            assert_eq!((cookie, err, data.len()), (14, 0, 12));
        }
        // A truncated request, then the client goes: only this connection ends.
        c.s.write_all(
            &Request {
                flags: 0,
                command: proto::Command::Read,
                cookie: 99,
                offset: 0,
                length: 512,
            }
            .encode()[..10],
        )
        .unwrap();
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.closed());
    }

    // The read-only export: EPERM for writes, trims and write-zeroes; reads work.
    let mut c = Raw::open(&srv);
    let flags = c.go("ro", true);
    assert_ne!(flags & proto::TF_READ_ONLY, 0);
    assert_eq!(flags & proto::TF_SEND_TRIM, 0);
    c.request(proto::CMD_WRITE, 0, 1, 0, 512);
    c.s.write_all(&[1u8; 512]).unwrap();
    assert_eq!(c.reply(None).1, proto::EPERM);
    c.request(proto::CMD_TRIM, 0, 2, 0, 512);
    assert_eq!(c.reply(None).1, proto::EPERM);
    c.request(proto::CMD_WRITE_ZEROES, 0, 3, 0, 512);
    assert_eq!(c.reply(None).1, proto::EPERM);
    c.request(proto::CMD_READ, 0, 4, 0, 512);
    assert_eq!(c.reply(Some(512)).1, 0);
    // A bad request magic closes the connection.
    c.s.write_all(&[0xaa; proto::REQUEST_LEN]).unwrap();
    assert!(c.closed());

    // The server still serves new connections after all that.
    let mut c = Raw::open(&srv);
    c.go("d", false);
    c.request(proto::CMD_READ, 0, 1, 4096, 512);
    assert_eq!(c.reply(Some(512)).1, 0);
    // Old-style NBD_OPT_EXPORT_NAME works too, with no zero padding (NO_ZEROES).
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_EXPORT_NAME, b"d");
    let mut e = [0u8; 10];
    c.s.read_exact(&mut e).unwrap();
    assert_eq!(u64::from_be_bytes(e[..8].try_into().unwrap()), 1 << 20);
    c.request(proto::CMD_READ, 0, 1, 4096, 512);
    assert_eq!(c.reply(Some(512)).1, 0);
    // EXPORT_NAME of an unknown export: the spec's only answer is closing.
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    srv.finish();
}

#[test]
fn acknowledged_writes_survive_a_client_that_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    let dev = file_disk(&path, 4 << 20, &[]);
    let srv = Running::tcp(vec![Export::new("d", dev.clone())]);
    let mut c = Raw::open(&srv);
    c.go("d", true);
    for i in 0..16u64 {
        c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, i, i * 65536, 65536);
        c.s.write_all(&vec![0x30 + i as u8; 65536]).unwrap();
    }
    let mut acked = Vec::new();
    for _ in 0..16 {
        let (cookie, err, _) = c.reply(None);
        assert_eq!(err, 0);
        acked.push(cookie);
    }
    // More writes sent, then the client vanishes mid-request without reading replies.
    for i in 16..32u64 {
        c.request(proto::CMD_WRITE, 0, i, i * 65536, 65536);
        c.s.write_all(&vec![0x30 + i as u8; 65536]).unwrap();
    }
    c.request(proto::CMD_WRITE, 0, 99, 0, 65536);
    c.s.write_all(&[0u8; 100]).unwrap();
    drop(c);
    srv.finish();
    // Every acknowledged (FUA) write is in the file itself.
    let file = std::fs::read(&path).unwrap();
    for i in acked {
        let r = (i * 65536) as usize..((i + 1) * 65536) as usize;
        assert!(file[r].iter().all(|&b| b == 0x30 + i as u8), "write {i}");
    }
}

#[test]
fn stop_ends_serve_with_clients_still_connected() {
    let dev = mem_disk(1 << 20);
    let srv = Running::tcp(vec![Export::new("d", dev)]);
    let mut idle = Raw::open(&srv); // in the handshake
    let mut busy = Raw::open(&srv);
    busy.go("d", false);
    srv.finish();
    assert!(idle.closed());
    assert!(busy.closed());
}

#[test]
fn binding_refuses_bad_setups() {
    let dev = mem_disk(1 << 20);
    assert!(NbdServer::bind_tcp("127.0.0.1:0", vec![]).is_err());
    assert!(NbdServer::bind_tcp(
        "127.0.0.1:0",
        vec![Export::new("a", dev.clone()), Export::new("a", dev.clone())]
    )
    .is_err());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    assert!(NbdServer::bind_unix(&file, vec![Export::new("a", dev.clone())]).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // A live socket is not replaced; a stale one is.
    let sock = dir.path().join("s");
    let live = NbdServer::bind_unix(&sock, vec![Export::new("a", dev.clone())]).unwrap();
    assert!(NbdServer::bind_unix(&sock, vec![Export::new("a", dev.clone())]).is_err());
    std::mem::forget(live); // keeps the file, as a crashed server would; the fd stays open
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("t")).unwrap();
    drop(stale);
    assert!(NbdServer::bind_unix(dir.path().join("t"), vec![Export::new("a", dev)]).is_ok());
}

#[test]
fn stop_cuts_off_a_client_that_never_reads_its_replies() {
    let dev = mem_disk(64 << 20);
    let srv = Running::tcp(vec![Export::new("d", dev)]);
    let mut c = Raw::open(&srv);
    c.go("d", true);
    // 64 MiB of replies: far more than the socket buffers hold.
    for i in 0..64u64 {
        c.request(proto::CMD_READ, 0, i, i << 20, 1 << 20);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    srv.finish();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        t.elapsed()
    );
    drop(c);
}

/// A memory disk whose reads at offset 0 wait at a gate while it is closed.
struct GatedReads {
    inner: Arc<RawDisk<MemStorage>>,
    /// (open, a read is waiting)
    state: std::sync::Mutex<(bool, bool)>,
    cv: std::sync::Condvar,
}

impl GatedReads {
    fn wait(&self, offset: u64) {
        if offset != 0 {
            return;
        }
        let mut g = self.state.lock().unwrap();
        g.1 = true;
        self.cv.notify_all();
        while !g.0 {
            g = self.cv.wait(g).unwrap();
        }
    }

    fn wait_entered(&self) {
        let g = self.state.lock().unwrap();
        let (_g, t) = self
            .cv
            .wait_timeout_while(g, std::time::Duration::from_secs(10), |s| !s.1)
            .unwrap();
        assert!(!t.timed_out(), "the read never reached the device");
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
}

impl BlockDevice for GatedReads {
    fn info(&self) -> block_io::DiskInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.wait(offset);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    unsafe fn read_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> block_io::Result<()> {
        self.wait(offset);
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.read_raw_at(bufs, offset) }
    }
    unsafe fn write_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> block_io::Result<()> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.write_raw_at(bufs, offset) }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> block_io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<block_io::StatusRun> {
        self.inner.block_status(offset, len)
    }
}

/// Trims and write-zeroes wait only for the reads and writes they overlap: with a read
/// stuck in the device, a write-zeroes and a trim elsewhere complete, one over the read
/// waits until the read is done (and then zeroes what the read had returned).
#[test]
fn trims_and_zeroes_wait_only_for_requests_they_overlap() {
    let inner = mem_disk(4 << 20);
    inner.write_at(&[0x66; 65536], 0).unwrap();
    inner.write_at(&[0x67; 65536], 1 << 20).unwrap();
    let dev = Arc::new(GatedReads {
        inner: inner.clone(),
        state: std::sync::Mutex::new((false, false)),
        cv: std::sync::Condvar::new(),
    });
    let srv = Running::tcp(vec![Export::new("d", dev.clone())]);
    // Dropped before the server: a failed check must not leave the read stuck.
    struct Opener(Arc<GatedReads>);
    impl Drop for Opener {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let _opener = Opener(dev.clone());
    let mut c = Raw::open(&srv);
    c.go("d", true);
    c.request(proto::CMD_READ, 0, 1, 0, 65536);
    dev.wait_entered();
    // Not overlapping the stuck read: both answered while it is stuck.
    c.request(proto::CMD_WRITE_ZEROES, 0, 2, 1 << 20, 32768);
    c.request(proto::CMD_TRIM, 0, 3, (1 << 20) + 32768, 32768);
    c.s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let mut got = vec![c.reply(None), c.reply(None)];
    got.sort();
    assert_eq!(got, vec![(2, 0, vec![]), (3, 0, vec![])]);
    assert_eq!(read_dev(&*inner, 1 << 20, 32768), vec![0; 32768]);
    // Overlapping it: no answer while the read is stuck.
    c.request(proto::CMD_WRITE_ZEROES, 0, 4, 4096, 4096);
    c.s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let early = c.s.peek(&mut b);
    assert!(
        early.is_err(),
        "a write-zeroes over a read in flight was answered"
    );
    c.s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    assert_eq!(read_dev(&*inner, 4096, 4096), vec![0x66; 4096]);
    dev.open();
    let (cookie, err, data) = c.reply(Some(65536));
    assert_eq!((cookie, err), (1, 0));
    assert_eq!(
        data,
        vec![0x66; 65536],
        "the read saw the zeroes that came after it"
    );
    assert_eq!(c.reply(None), (4, 0, vec![]));
    assert_eq!(read_dev(&*inner, 4096, 4096), vec![0; 4096]);
    srv.finish();
}
