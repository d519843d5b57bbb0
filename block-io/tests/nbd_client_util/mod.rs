//! Shared pieces of the NBD client tests: oracle checks, real servers (qemu-nbd, nbdkit, our
//! own) started on loopback and killable, and a model-checked random workload.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block_io::nbd::{Export, NbdClientOptions, NbdServer, RetryPolicy, StopHandle};
use block_io::{BlockDevice, MemStorage, RawDisk, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The oracle rule (`true` if `tool` runs; else a panic under CI=true, a loud skip
/// elsewhere).
#[allow(unused_imports)] // not every test that includes this module has an oracle
pub use block_io::testing::oracle;

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Options for tests: short timeouts, a quick retry policy.
pub fn quick_opts() -> NbdClientOptions {
    NbdClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(20)),
        retry: RetryPolicy {
            max_attempts: 60,
            max_elapsed: Duration::from_secs(20),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            max_tries_per_request: 20,
        },
        ..NbdClientOptions::default()
    }
}

/// Where a server process listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    pub fn url(&self, export: &str) -> String {
        match self {
            Listen::Tcp(p) => format!("nbd://127.0.0.1:{p}/{export}"),
            Listen::Unix(s) => format!("nbd+unix:///{export}?socket={}", s.display()),
        }
    }

    fn ready(&self) -> bool {
        match self {
            Listen::Tcp(p) => TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], *p))).is_ok(),
            Listen::Unix(s) => std::os::unix::net::UnixStream::connect(s).is_ok(),
        }
    }
}

/// A server process (qemu-nbd or nbdkit) that can be killed with SIGKILL and restarted with
/// the same command line; killed on drop.
pub struct Proc {
    cmd: String,
    args: Vec<String>,
    pub listen: Listen,
    child: Option<Child>,
}

impl Proc {
    pub fn start(cmd: &str, args: Vec<String>, listen: Listen) -> Proc {
        let mut p = Proc {
            cmd: cmd.to_string(),
            args,
            listen,
            child: None,
        };
        p.restart();
        p
    }

    /// qemu-nbd serving `file` (format `fmt`) on `listen`, export name "disk".
    pub fn qemu_nbd(file: &Path, fmt: &str, listen: Listen, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = ["-f", fmt, "--persistent", "-x", "disk", "-e", "8"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match &listen {
            Listen::Tcp(p) => {
                args.extend(["-b".into(), "127.0.0.1".into(), "-p".into(), p.to_string()])
            }
            Listen::Unix(s) => args.extend(["-k".into(), s.display().to_string()]),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(file.display().to_string());
        Proc::start("qemu-nbd", args, listen)
    }

    /// nbdkit's file plugin serving `file` on `listen` with `filters` (each
    /// `--filter=NAME`) and `params` (`key=value`, after the file).
    pub fn nbdkit(file: &Path, listen: Listen, filters: &[&str], params: &[&str]) -> Proc {
        let mut args: Vec<String> = vec!["-f".into(), "--exit-with-parent".into()];
        match &listen {
            Listen::Tcp(p) => {
                args.extend(["-i".into(), "127.0.0.1".into(), "-p".into(), p.to_string()])
            }
            Listen::Unix(s) => args.extend(["-U".into(), s.display().to_string()]),
        }
        args.extend(filters.iter().map(|f| format!("--filter={f}")));
        args.push("file".into());
        args.push(file.display().to_string());
        args.extend(params.iter().map(|s| s.to_string()));
        Proc::start("nbdkit", args, listen)
    }

    /// Starts the process (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        if let Listen::Unix(s) = &self.listen {
            let _ = std::fs::remove_file(s);
        }
        let child = Command::new(&self.cmd)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while !self.listen.ready() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} {:?} exited: {status}", self.cmd, self.args);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} did not start listening",
                self.cmd
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process, rewrites its arguments with `f` and starts it again.
    pub fn restart_with(&mut self, f: impl FnOnce(&mut Vec<String>)) {
        self.kill();
        f(&mut self.args);
        self.restart();
    }

    pub fn url(&self) -> String {
        self.listen.url("disk")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Our own server on its own thread (TCP, export "disk"); stopped on drop.
pub struct Ours {
    stop: StopHandle,
    thread: Option<JoinHandle<block_io::Result<()>>>,
    pub addr: SocketAddr,
}

impl Ours {
    pub fn start(dev: Arc<dyn BlockDevice>) -> Ours {
        let server = NbdServer::bind_tcp("127.0.0.1:0", vec![Export::new("disk", dev)]).unwrap();
        let stop = server.stop_handle();
        let addr = server.local_addr().unwrap();
        let thread = std::thread::spawn(move || server.serve());
        Ours {
            stop,
            thread: Some(thread),
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("nbd://{}/disk", self.addr)
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn mem_disk(size: u64) -> Arc<RawDisk<MemStorage>> {
    let s = MemStorage::new();
    s.set_len(size).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}

/// A sparse raw file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Bytes of a recognisable pattern: each 8-byte word names its offset and `tag`.
pub fn pattern(offset: u64, len: usize, tag: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut o = offset;
    while v.len() < len {
        let w = (o / 8) ^ (u64::from(tag) << 56);
        for b in w.to_le_bytes() {
            if v.len() < len {
                v.push(b);
            }
        }
        o += 8;
    }
    v
}

const SECTOR: usize = 512;

/// The expected contents of a region: bytes, plus sectors that may read as their bytes or as
/// zeros (after a discard, which a server may ignore).
struct Model {
    data: Vec<u8>,
    maybe_zero: Vec<bool>,
}

impl Model {
    fn check(&mut self, got: &[u8], at: usize, what: &str) {
        for (i, (g, m)) in got
            .chunks(SECTOR)
            .zip(self.data[at..at + got.len()].chunks(SECTOR))
            .enumerate()
        {
            let s = at / SECTOR + i;
            let ok = g == m || (self.maybe_zero[s] && g.iter().all(|&b| b == 0));
            assert!(
                ok,
                "{what}: sector {s} of the region differs from the model"
            );
        }
        // What a read saw is now known.
        self.data[at..at + got.len()].copy_from_slice(got);
        for s in at / SECTOR..(at + got.len()) / SECTOR {
            self.maybe_zero[s] = false;
        }
    }
}

/// Random reads, writes, write-zeroes (both modes), discards and flushes from `threads`
/// threads, each in its own region of `dev`, checked against a model after every read and
/// at the end. Returns the number of ops.
pub fn model_workload(
    dev: &dyn BlockDevice,
    threads: usize,
    ops: usize,
    max_io: usize,
    seed: u64,
) -> usize {
    let size = dev.info().virtual_size as usize;
    let region = size / threads / SECTOR * SECTOR;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let base = (t * region) as u64;
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (t as u64 * 0x9e37_79b9));
                let mut initial = vec![0u8; region];
                dev.read_at(&mut initial, base).unwrap();
                let mut m = Model {
                    data: initial,
                    maybe_zero: vec![false; region / SECTOR],
                };
                for i in 0..ops {
                    let sectors = rng.random_range(1..=max_io / SECTOR).min(region / SECTOR);
                    let len = sectors * SECTOR;
                    let at = rng.random_range(0..=(region - len) / SECTOR) * SECTOR;
                    let off = base + at as u64;
                    match rng.random_range(0..100) {
                        0..=39 => {
                            let mut b = vec![0u8; len];
                            dev.read_at(&mut b, off).unwrap();
                            m.check(&b, at, &format!("thread {t} op {i} read {off}+{len}"));
                        }
                        40..=79 => {
                            let b = pattern(off, len, rng.random());
                            dev.write_at(&b, off).unwrap();
                            m.data[at..at + len].copy_from_slice(&b);
                            m.maybe_zero[at / SECTOR..(at + len) / SECTOR].fill(false);
                        }
                        80..=89 => {
                            dev.write_zeroes(off, len as u64, rng.random()).unwrap();
                            m.data[at..at + len].fill(0);
                            m.maybe_zero[at / SECTOR..(at + len) / SECTOR].fill(false);
                        }
                        90..=95 => {
                            dev.discard(off, len as u64).unwrap();
                            m.maybe_zero[at / SECTOR..(at + len) / SECTOR].fill(true);
                        }
                        _ => dev.flush().unwrap(),
                    }
                }
                let mut b = vec![0u8; region];
                dev.read_at(&mut b, base).unwrap();
                m.check(&b, 0, &format!("thread {t} final read"));
            });
        }
    });
    threads * ops
}
