//! `vdisk serve --control`: online operations through the control socket while a vhost-user
//! frontend (block-io's VM-less client, with its own guest memory and virtqueues) keeps
//! writing and reading the disk. Every read is checked against a model of what the guest
//! wrote, and the images the guest ends on are checked after the daemon exits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use block_io::vhost_user::client::{Client, ClientOptions};
use block_io::BlockDevice;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLK: usize = 4096;
const VIRTIO_BLK_S_OK: u8 = 0;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Stops the daemon (SIGTERM) and returns its stderr and whether it exited 0.
    fn stop(mut self) -> (bool, String) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let child = std::mem::replace(
            &mut self.0,
            Command::new("true").spawn().expect("spawn true"),
        );
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn serve(image: &str, vu: &str, ctl: &str) -> Daemon {
    serve_with(image, vu, ctl, &[])
}

/// `vdisk serve --socket VU --control CTL ARGS IMAGE`, once both sockets exist.
fn serve_with(image: &str, vu: &str, ctl: &str, args: &[&str]) -> Daemon {
    let d = Daemon(
        Command::new(vdisk_bin())
            .args(["serve", "--socket", vu, "--control", ctl])
            .args(args)
            .arg(image)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !(Path::new(vu).exists() && Path::new(ctl).exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "vdisk serve did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn ctl(path: &str, req: &str) -> Value {
    let mut c = UnixStream::connect(path).unwrap();
    writeln!(c, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{req}: not JSON ({e}): {line}"))
}

fn ok(path: &str, req: &str) -> Value {
    let v = ctl(path, req);
    assert_eq!(v["ok"], true, "{req}: {v}");
    v
}

/// What the guest wrote, a byte per 4 KiB block (0: the image's original content).
struct Model {
    blocks: Vec<u8>,
    original: Vec<u8>,
}

impl Model {
    fn expected(&self, b: usize) -> Vec<u8> {
        match self.blocks[b] {
            0 => self.original[b * BLK..(b + 1) * BLK].to_vec(),
            v => vec![v; BLK],
        }
    }
}

fn guest_writes(c: &mut Client, m: &mut Model, n: usize, seed: &mut u64) {
    let all = 0..m.blocks.len();
    guest_writes_in(c, m, n, seed, all);
}

/// `n` random 4 KiB writes to the blocks `blocks` only.
fn guest_writes_in(
    c: &mut Client,
    m: &mut Model,
    n: usize,
    seed: &mut u64,
    blocks: std::ops::Range<usize>,
) {
    for _ in 0..n {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = blocks.start + (*seed >> 33) as usize % blocks.len();
        let v = ((*seed >> 20) as u8).max(1);
        assert_eq!(
            c.write((b * BLK / 512) as u64, &vec![v; BLK]).unwrap(),
            VIRTIO_BLK_S_OK
        );
        m.blocks[b] = v;
    }
}

fn verify_guest(c: &mut Client, m: &Model, what: &str) {
    let per = (MIB as usize) / BLK;
    for chunk in 0..m.blocks.len().div_ceil(per) {
        let first = chunk * per;
        let n = per.min(m.blocks.len() - first);
        let (st, data) = c
            .read((first * BLK / 512) as u64, (n * BLK) as u32)
            .unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        for i in 0..n {
            assert!(
                data[i * BLK..(i + 1) * BLK] == m.expected(first + i)[..],
                "{what}: block {} differs",
                first + i
            );
        }
    }
}

fn verify_file(image: &str, m: &Model, what: &str) {
    let d = vdisk::chain::Disk::open(image, &vdisk::chain::OpenOptions::new().read_only(true))
        .unwrap_or_else(|e| panic!("{what}: {image} does not open: {e}"));
    assert_eq!(d.info().virtual_size, (m.blocks.len() * BLK) as u64);
    let mut buf = vec![0u8; BLK];
    for b in 0..m.blocks.len() {
        d.read_at(&mut buf, (b * BLK) as u64).unwrap();
        assert!(buf == m.expected(b), "{what}: block {b} of {image} differs");
    }
}

/// Runs the job `req` to its end while the guest keeps writing; returns the final `job` reply.
fn job_under_writes(c: &mut Client, m: &mut Model, sock: &str, req: &str, seed: &mut u64) -> Value {
    ok(sock, req);
    let t0 = Instant::now();
    loop {
        guest_writes(c, m, 16, seed);
        let v = ok(sock, "job");
        if v["state"] != "running" {
            assert_eq!(v["state"], "completed", "{req}: {v}");
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{req} never ended: {v}"
        );
    }
}

/// A VHDX chain: the base holds 8 MiB of 0x11, the top 0x22 over 4..12 MiB.
fn chain(dir: &Path, size: &str) -> (String, String, Vec<u8>) {
    let base = p(dir, "base.vhdx");
    let top = p(dir, "top.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", "-o", "block_size=1M", &base, size]);
    vdisk_ok(&["io", &base, "-c", "write -P 0x11 0 8M"]);
    vdisk_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        "-b",
        &base,
        &top,
    ]);
    vdisk_ok(&[
        "io",
        &top,
        "-c",
        "write -P 0x22 4M 8M",
        "-c",
        "write -z 5M 1M",
    ]);
    let d =
        vdisk::chain::Disk::open(&top, &vdisk::chain::OpenOptions::new().read_only(true)).unwrap();
    let mut original = vec![0u8; d.info().virtual_size as usize];
    d.read_at(&mut original, 0).unwrap();
    (base, top, original)
}

/// Compact under guest writes, then grow: the frontend is told the new capacity and the new
/// space is usable at once.
#[test]
fn compact_then_resize_under_a_writing_guest() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, original) = chain(dir.path(), "24M");
    let (vu, sock) = (p(dir.path(), "vu.sock"), p(dir.path(), "ctl.sock"));
    let d = serve(&top, &vu, &sock);
    let mut c = Client::connect(&vu, &ClientOptions::default()).unwrap();
    c.watch_config_changes().unwrap();
    let mut m = Model {
        blocks: vec![0; original.len() / BLK],
        original,
    };
    let mut seed = 7;
    guest_writes(&mut c, &mut m, 200, &mut seed);
    assert_eq!(ok(&sock, "info")["size"], 24 * MIB);

    let r = job_under_writes(&mut c, &mut m, &sock, "compact", &mut seed);
    assert_eq!(r["job"], "compact");
    verify_guest(&mut c, &m, "after compact");

    // Errors name their cause and change nothing.
    assert!(ctl(&sock, "resize 8M")["error"]
        .as_str()
        .unwrap()
        .contains("needs 'shrink'"));
    assert!(ctl(&sock, "resize +1X")["error"]
        .as_str()
        .unwrap()
        .contains("invalid size"));
    assert!(ctl(&sock, "frobnicate")["error"]
        .as_str()
        .unwrap()
        .contains("unknown request"));
    assert!(ctl(&sock, "job-pause")["error"]
        .as_str()
        .unwrap()
        .contains("no job is running"));

    // The backend waits for the frontend to acknowledge the config change (REPLY_ACK), so
    // the request goes from another thread while this one, the frontend, answers.
    let resizer = {
        let sock = sock.clone();
        std::thread::spawn(move || ok(&sock, "resize +8M"))
    };
    assert!(c.wait_config_change(Duration::from_secs(20)).unwrap() >= 1);
    let r = resizer.join().unwrap();
    assert_eq!(r["size"], 32 * MIB);
    assert_eq!(r["announced"], true);
    assert_eq!(c.read_config().unwrap().capacity, 32 * MIB / 512);
    m.blocks.resize((32 * MIB) as usize / BLK, 0);
    m.original.resize((32 * MIB) as usize, 0);
    let last = m.blocks.len() - 1;
    assert_eq!(
        c.write((last * BLK / 512) as u64, &vec![0x5a; BLK])
            .unwrap(),
        VIRTIO_BLK_S_OK
    );
    m.blocks[last] = 0x5a;
    guest_writes(&mut c, &mut m, 100, &mut seed);
    verify_guest(&mut c, &m, "after resize");
    // The top was reopened by the resize: its compaction target is gone, and the reply says so.
    assert!(ctl(&sock, "compact")["error"]
        .as_str()
        .unwrap()
        .contains("compaction needs"));

    c.close();
    let (exited, log) = d.stop();
    assert!(exited, "vdisk serve failed: {log}");
    verify_file(&top, &m, "the served chain afterwards");
    vdisk_ok(&["check", &top]);
}

/// Grows the served disk by 1 MiB through the control socket while `c`, the frontend, answers
/// the config change (the backend waits for its acknowledgement); the model grows with it.
fn grow_1m(c: &mut Client, m: &mut Model, sock: &str) {
    let resizer = {
        let sock = sock.to_string();
        std::thread::spawn(move || ok(&sock, "resize +1M"))
    };
    assert!(c.wait_config_change(Duration::from_secs(20)).unwrap() >= 1);
    let r = resizer.join().unwrap();
    let size = (m.blocks.len() * BLK) as u64 + MIB;
    assert_eq!(r["size"], size, "{r}");
    assert_eq!(c.read_config().unwrap().capacity, size / 512);
    m.blocks.resize(size as usize / BLK, 0);
    m.original.resize(size as usize, 0);
}

/// Commit the top into its parent, grow the disk the guest is then on, convert to a new VHD,
/// grow again: the guest moves twice and sees both sizes without a lost write; afterwards
/// the VHD holds everything and the committed top no longer opens over its base.
#[test]
fn commit_then_convert_under_a_writing_guest() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, original) = chain(dir.path(), "16M");
    let (vu, sock) = (p(dir.path(), "vu.sock"), p(dir.path(), "ctl.sock"));
    let vhd = p(dir.path(), "moved.vhd");
    let d = serve(&top, &vu, &sock);
    let mut c = Client::connect(&vu, &ClientOptions::default()).unwrap();
    c.watch_config_changes().unwrap();
    let mut m = Model {
        blocks: vec![0; original.len() / BLK],
        original,
    };
    let mut seed = 11;
    guest_writes(&mut c, &mut m, 100, &mut seed);

    let r = job_under_writes(&mut c, &mut m, &sock, "commit rate=64M", &mut seed);
    assert_eq!(r["guest_on"].as_str().unwrap(), base);
    verify_guest(&mut c, &m, "after commit");
    // The guest is on the base now, and a resize works on it.
    grow_1m(&mut c, &mut m, &sock);
    guest_writes(&mut c, &mut m, 50, &mut seed);
    verify_guest(&mut c, &m, "after the resize of the base");
    // A destination that exists is refused (here: the base itself).
    assert!(ctl(&sock, &format!("convert vhd {base}"))["error"]
        .as_str()
        .unwrap()
        .contains("must be a new file"));

    let r = job_under_writes(
        &mut c,
        &mut m,
        &sock,
        &format!("convert vhd {vhd}"),
        &mut seed,
    );
    assert_eq!(r["guest_on"].as_str().unwrap(), vhd);
    guest_writes(&mut c, &mut m, 100, &mut seed);
    verify_guest(&mut c, &m, "after convert");
    // And on the VHD the guest moved to; the last block of the new space is usable at once.
    grow_1m(&mut c, &mut m, &sock);
    let last = m.blocks.len() - 1;
    assert_eq!(
        c.write((last * BLK / 512) as u64, &vec![0x6b; BLK])
            .unwrap(),
        VIRTIO_BLK_S_OK
    );
    m.blocks[last] = 0x6b;
    guest_writes(&mut c, &mut m, 100, &mut seed);
    verify_guest(&mut c, &m, "after the resize of the VHD");
    // Two switches and two resizes (each reopens the top).
    assert!(ok(&sock, "info")["pivots"].as_u64().unwrap() >= 2);

    c.close();
    let (exited, log) = d.stop();
    assert!(exited, "vdisk serve failed: {log}");
    verify_file(&vhd, &m, "the converted VHD");
    vdisk_ok(&["check", &vhd]);
    // The stale top was unlinked from its base when serving ended.
    let o = vdisk(&["info", "--backing-chain", &top]);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || text.contains("verified: false"),
        "the committed top still opens over its base: {text}"
    );
}

/// With `--cache none` the image a convert makes is opened `O_DIRECT` for the guest, as the
/// served one was: the job's copy, the guest's I/O after the switch and a resize all work
/// through it.
#[test]
fn convert_of_a_disk_served_with_cache_none() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, original) = chain(dir.path(), "16M");
    let (vu, sock) = (p(dir.path(), "vu.sock"), p(dir.path(), "ctl.sock"));
    let moved = p(dir.path(), "moved.vhdx");
    let d = serve_with(&top, &vu, &sock, &["--cache", "none"]);
    let mut c = Client::connect(&vu, &ClientOptions::default()).unwrap();
    c.watch_config_changes().unwrap();
    let mut m = Model {
        blocks: vec![0; original.len() / BLK],
        original,
    };
    let mut seed = 23;
    guest_writes(&mut c, &mut m, 100, &mut seed);
    let r = job_under_writes(
        &mut c,
        &mut m,
        &sock,
        &format!("convert vhdx {moved}"),
        &mut seed,
    );
    assert_eq!(r["guest_on"].as_str().unwrap(), moved);
    verify_guest(&mut c, &m, "after convert");
    grow_1m(&mut c, &mut m, &sock);
    guest_writes(&mut c, &mut m, 100, &mut seed);
    verify_guest(&mut c, &m, "after the resize");
    c.close();
    let (exited, log) = d.stop();
    assert!(exited, "vdisk serve failed: {log}");
    verify_file(&moved, &m, "the converted VHDX");
    vdisk_ok(&["check", &moved]);
}

/// `convert vhd PATH layers` under a writing guest: the base is converted first, then the top's
/// job; the guest ends on a two-layer VHD chain whose top holds only what the old top held
/// and the guest wrote, while the base's own data comes from the new base, and the controls
/// work on it. The guest writes only where the top holds data (4-12 MiB): a write into a
/// block the top lacks makes the old top hold that whole block, and so the new one.
#[test]
fn convert_keeping_the_layers_under_a_writing_guest() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, original) = chain(dir.path(), "16M");
    let (vu, sock) = (p(dir.path(), "vu.sock"), p(dir.path(), "ctl.sock"));
    let moved = p(dir.path(), "moved.vhd");
    let moved_base = p(dir.path(), "moved-1.vhd");
    let d = serve(&top, &vu, &sock);
    let mut c = Client::connect(&vu, &ClientOptions::default()).unwrap();
    let mut m = Model {
        blocks: vec![0; original.len() / BLK],
        original,
    };
    let mut seed = 31;
    let held = (4 * MIB) as usize / BLK..(12 * MIB) as usize / BLK;
    // Refusals first: a raw target has no parent link; an unknown word is named.
    assert!(ctl(&sock, &format!("convert raw {moved} layers"))["error"]
        .as_str()
        .unwrap()
        .contains("raw"));
    assert!(ctl(&sock, &format!("convert vhd {moved} flat"))["error"]
        .as_str()
        .unwrap()
        .contains("layers"));
    assert!(!Path::new(&moved).exists() && !Path::new(&moved_base).exists());
    guest_writes_in(&mut c, &mut m, 20, &mut seed, held.clone());
    ok(&sock, &format!("convert vhd {moved} layers"));
    let t0 = Instant::now();
    let r = loop {
        guest_writes_in(&mut c, &mut m, 16, &mut seed, held.clone());
        let v = ok(&sock, "job");
        if v["state"] != "running" {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never ended: {v}");
    };
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["guest_on"].as_str().unwrap(), moved);
    verify_guest(&mut c, &m, "after the layered convert");
    // The controls work on the new chain: a VHD child cannot grow past its parent, and says so.
    assert!(ctl(&sock, "resize +1M")["error"]
        .as_str()
        .unwrap()
        .contains("past its parent"));
    guest_writes_in(&mut c, &mut m, 50, &mut seed, held);
    verify_guest(&mut c, &m, "at the end");
    c.close();
    let (exited, log) = d.stop();
    assert!(exited, "vdisk serve failed: {log}");
    verify_file(&moved, &m, "the converted chain");
    vdisk_ok(&["check", &moved]);
    // The layers are kept: the first 4 MiB (base data only) come from the new base, the rest
    // of what reads as data from the new top.
    let map = vdisk_ok(&["map", "--output", "json", &moved]);
    let runs: Vec<Value> = serde_json::from_str(&map).unwrap();
    for r in &runs {
        let (start, data) = (r["start"].as_u64().unwrap(), r["data"] == true);
        let file = r["filename"].as_str().unwrap_or("");
        if start < 4 * MIB {
            assert!(file.ends_with("moved-1.vhd"), "{r} (all: {runs:?})");
        } else if data {
            assert!(
                file.ends_with("moved.vhd") && r["depth"] == 0,
                "{r} (all: {runs:?})"
            );
        }
    }
}

/// A control path that is not a socket is refused before anything is served.
#[test]
fn a_control_path_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(dir.path(), "a.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &img, "8M"]);
    let file = p(dir.path(), "not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let o = vdisk(&[
        "serve",
        "--socket",
        &p(dir.path(), "vu.sock"),
        "--control",
        &file,
        &img,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

/// `vdisk serve --nbd` of `image` as export "b" (host B; `extra`: more options); its port.
fn nbd_serve(image: &str, extra: &[&str]) -> (Daemon, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon(
        Command::new(vdisk_bin())
            .args([
                "serve",
                "--nbd",
                &format!("127.0.0.1:{port}"),
                "--export",
                "b",
            ])
            .args(extra)
            .arg(image)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        block_io::testing::wait_for_port(port, Duration::from_secs(20)),
        "vdisk serve --nbd never listened"
    );
    (d, port)
}

/// Mirror the served disk to another host's NBD export (timing `after`: the guest moves at
/// once, reads of what B lacks come from A) while the guest writes; B's image holds everything
/// afterwards.
#[test]
fn mirror_to_an_nbd_export_under_a_writing_guest() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, original) = chain(dir.path(), "16M");
    let b = p(dir.path(), "b.raw");
    // Host B's disk holds junk: the mirror must overwrite or zero everything.
    std::fs::write(&b, vec![0xee; 16 << 20]).unwrap();
    let (nbd, port) = nbd_serve(&b, &[]);
    let (vu, sock) = (p(dir.path(), "vu.sock"), p(dir.path(), "ctl.sock"));
    let d = serve(&top, &vu, &sock);
    let mut c = Client::connect(&vu, &ClientOptions::default()).unwrap();
    let mut m = Model {
        blocks: vec![0; original.len() / BLK],
        original,
    };
    let mut seed = 5;
    guest_writes(&mut c, &mut m, 100, &mut seed);
    let url = format!("nbd://127.0.0.1:{port}/b");
    assert!(
        ctl(&sock, &format!("mirror {url} timing=sideways"))["error"]
            .as_str()
            .unwrap()
            .contains("sideways")
    );
    let r = job_under_writes(
        &mut c,
        &mut m,
        &sock,
        &format!("mirror {url} timing=after"),
        &mut seed,
    );
    assert_eq!(r["guest_on"].as_str().unwrap(), url);
    guest_writes(&mut c, &mut m, 100, &mut seed);
    verify_guest(&mut c, &m, "after the mirror");
    assert_eq!(c.flush().unwrap(), VIRTIO_BLK_S_OK);
    c.close();
    let (exited, log) = d.stop();
    assert!(exited, "vdisk serve failed: {log}");
    let (exited, log) = nbd.stop();
    assert!(exited, "vdisk serve --nbd failed: {log}");
    verify_file(&b, &m, "host B's image");
}

/// A child of a base served read-only over NBD (our server, which advertises the base's
/// identity): served with a control socket, the guest reads through copy-on-read and writes,
/// `stream` pulls the rest, and when serving ends the child's parent is the local replica:
/// the chain then opens and reads right with the NBD server gone.
#[test]
fn stream_a_remote_base_under_a_writing_guest() {
    let dir = tempfile::tempdir().unwrap();
    let base = p(dir.path(), "base.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", "-o", "block_size=1M", &base, "16M"]);
    vdisk_ok(&[
        "io",
        &base,
        "-c",
        "write -P 0x11 0 6M",
        "-c",
        "write -P 0x12 9M 3M",
    ]);
    let (nbd, port) = nbd_serve(&base, &["--read-only"]);
    let child = p(dir.path(), "child.vhdx");
    vdisk_ok(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        &format!("nbd://127.0.0.1:{port}/b"),
        &child,
    ]);
    let mut original = vec![0u8; 16 << 20];
    let d =
        vdisk::chain::Disk::open(&base, &vdisk::chain::OpenOptions::new().read_only(true)).unwrap();
    d.read_at(&mut original, 0).unwrap();
    drop(d);
    let (vu, sock) = (p(dir.path(), "vu.sock"), p(dir.path(), "ctl.sock"));
    let serving = serve(&child, &vu, &sock);
    let mut c = Client::connect(&vu, &ClientOptions::default()).unwrap();
    let mut m = Model {
        blocks: vec![0; original.len() / BLK],
        original,
    };
    let mut seed = 3;
    // Reads before the job fetch what they touch and keep it.
    verify_guest(&mut c, &m, "through copy-on-read");
    guest_writes(&mut c, &mut m, 100, &mut seed);
    assert!(ctl(&sock, "commit")["error"]
        .as_str()
        .unwrap()
        .contains("remote"));
    let r = job_under_writes(&mut c, &mut m, &sock, "stream rate=64M", &mut seed);
    assert_eq!(r["job"], "stream");
    verify_guest(&mut c, &m, "after the stream");
    c.close();
    let (exited, log) = serving.stop();
    assert!(exited, "vdisk serve failed: {log}");
    assert!(log.contains("its parent is now"), "{log}");
    let (exited, log) = nbd.stop();
    assert!(exited, "vdisk serve --nbd failed: {log}");
    // No server now: the chain is local.
    verify_file(&child, &m, "the streamed chain");
    let info = vdisk_ok(&["info", "--backing-chain", &child]);
    assert!(!info.contains("nbd://"), "{info}");
}
