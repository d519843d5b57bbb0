//! The I/O engine's performance target (issue 11): `vdisk serve` against qemu-storage-daemon
//! serving the same image in the same run, both driven by the same client (libblkio's
//! `virtio-blk-vhost-user` driver, one thread per queue, 32 requests of 4 KiB in flight each,
//! random 4 KiB-aligned offsets over the whole 2 GiB disk).
//!
//! Cases: random read and random write, 1 and 2 queues, on raw, dynamic VHDX (every block
//! allocated), dynamic VHD (every block allocated) and a 4-deep VHDX chain. qsd cannot open
//! differencing VHDX, so our chain is compared with qsd on a 4-deep qcow2 chain holding the
//! same data (see `images.rs`); a chain's top is put back as made before every write run.
//!
//! Regimes:
//! - cold: `--cache none` (ours) and `cache.direct=on,aio=io_uring` (qsd), page cache dropped
//!   before every run; target at least 1.0x qsd;
//! - hot: buffered: ours `--cache writeback --aio io_uring`, qsd `cache.direct=off` with
//!   `aio=io_uring` (the target: at least 1.2x) and with `aio=threads` (for reference). Before
//!   every run the page cache is dropped and the client reads the whole disk through the
//!   backend under test (256 KiB requests), as a guest's earlier reads would have; the timed
//!   part starts when every queue has read its share. `ENGINE_BENCH_WARM=files` instead reads
//!   the image files once before each case (the backend then finds the page cache as the
//!   bench's own sequential reads left it). The two differ for writes: Linux's readahead fills
//!   the page cache with large folios, and a 4 KiB write into one dirties the whole folio, so
//!   random writes into a file read sequentially are throttled at the disk's write-back rate
//!   (both servers near 20-35k IOPS here). `vdisk serve --cache writeback` turns readahead off
//!   (`POSIX_FADV_RANDOM`; the guest reads ahead itself), so reads through it leave small pages.
//!
//! Each case runs every backend `ENGINE_BENCH_REPS` times (default 3), alternating which goes
//! first, and reports the median IOPS (the disk of a shared machine is noisy). One line per
//! case as it finishes (with every run's figure, each backend's median CPU time per request
//! over the timed part, from `/proc/PID/stat`, and the load average), a table at the end,
//! and `target/engine_vs_qsd.json`. Every read's first and last byte are checked against what
//! the image holds there: a backend that returns wrong data fails the run.
//!
//! `cargo bench --bench engine_vs_qsd` (as root for the page-cache drops; needs
//! qemu-storage-daemon, qemu-img and qemu-io; about 10 minutes, plus 1 to 5 the first time,
//! which makes ~13 GiB of images under `target/engine_vs_qsd/` that later runs reuse).
//! Environment:
//! - `ENGINE_BENCH_SECS` seconds per run (default 2), `ENGINE_BENCH_REPS` runs per backend
//!   and case (default 3);
//! - `ENGINE_BENCH_REGIMES` (`cold,hot`), `ENGINE_BENCH_FORMATS` (`raw,vhdx,vhd,chain`),
//!   `ENGINE_BENCH_OPS` (`read,write`), `ENGINE_BENCH_QUEUES` (`1,2`): subsets;
//! - `ENGINE_BENCH_OURS_AIO=threads` runs ours with `--aio threads` instead of `io_uring`;
//! - `ENGINE_BENCH_OURS_WORKERS=N` runs ours with `--workers N` (default: the server's own);
//! - `ENGINE_BENCH_DIR` where the images go, `ENGINE_BENCH_FRESH=1` remakes them,
//!   `ENGINE_BENCH_PREPARE_ONLY=1` only makes them (`.ci/bench-engine` uses them too);
//! - `VDISK_BIN` the vdisk binary (default `target/release/examples/vdisk`, built first with
//!   `cargo build --release --example vdisk`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

#[path = "engine_vs_qsd/client.rs"]
mod client;
#[path = "engine_vs_qsd/images.rs"]
mod images;
#[path = "engine_vs_qsd/servers.rs"]
mod servers;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use client::Load;
use images::Images;
use servers::{Backend, Server, Target};

const DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Regime {
    Cold,
    Hot,
}

impl Regime {
    fn name(self) -> &'static str {
        match self {
            Regime::Cold => "cold",
            Regime::Hot => "hot",
        }
    }

    /// `ours_uring`: `vdisk serve --aio io_uring` (else threads).
    fn backends(self, ours_uring: bool) -> Vec<Backend> {
        match self {
            Regime::Cold => vec![
                Backend::Ours {
                    direct: true,
                    uring: ours_uring,
                },
                Backend::Qsd {
                    direct: true,
                    uring: true,
                },
            ],
            Regime::Hot => vec![
                Backend::Ours {
                    direct: false,
                    uring: ours_uring,
                },
                Backend::Qsd {
                    direct: false,
                    uring: true,
                },
                Backend::Qsd {
                    direct: false,
                    uring: false,
                },
            ],
        }
    }

    /// The least ours/qsd(io_uring) ratio issue 11 asks for.
    fn target(self) -> f64 {
        match self {
            Regime::Cold => 1.0,
            Regime::Hot => 1.2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fmt {
    Raw,
    Vhdx,
    Vhd,
    Chain,
}

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::Vhdx => "vhdx",
            Fmt::Vhd => "vhd",
            Fmt::Chain => "chain4",
        }
    }

    /// What the peer serves in this case.
    fn peer_image(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::Vhdx => "vhdx",
            Fmt::Vhd => "vpc",
            Fmt::Chain => "qcow2 chain4",
        }
    }

    fn target(self, im: &Images, b: Backend) -> Target {
        let one = |p: &PathBuf, d: &str| Target::Image {
            path: p.clone(),
            qemu_driver: d.to_string(),
        };
        match (self, b) {
            (Fmt::Raw, _) => one(&im.raw, "raw"),
            (Fmt::Vhdx, _) => one(&im.vhdx, "vhdx"),
            (Fmt::Vhd, _) => one(&im.vhd, "vpc"),
            (Fmt::Chain, Backend::Ours { .. }) => one(&im.vhdx_chain[3], "vhdx"),
            (Fmt::Chain, Backend::Qsd { .. }) => Target::Qcow2Chain(im.qcow2_chain.clone()),
        }
    }

    /// Every file `b` reads in this case.
    fn files(self, im: &Images, b: Backend) -> Vec<PathBuf> {
        match (self, b) {
            (Fmt::Raw, _) => vec![im.raw.clone()],
            (Fmt::Vhdx, _) => vec![im.vhdx.clone()],
            (Fmt::Vhd, _) => vec![im.vhd.clone()],
            (Fmt::Chain, Backend::Ours { .. }) => im.vhdx_chain.clone(),
            (Fmt::Chain, Backend::Qsd { .. }) => im.qcow2_chain.clone(),
        }
    }
}

struct Cfg {
    secs: f64,
    reps: usize,
    regimes: Vec<Regime>,
    formats: Vec<Fmt>,
    writes: Vec<bool>,
    queues: Vec<usize>,
    dir: PathBuf,
    target_dir: PathBuf,
    fresh: bool,
    /// `vdisk serve --aio io_uring` (the default) or `threads`.
    ours_uring: bool,
    /// Hot regime: warm the page cache through the backend under test (the default) rather
    /// than by reading the image files.
    warm_server: bool,
}

fn env_list<T: Copy>(name: &str, all: &[(&str, T)]) -> Vec<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|w| {
                let w = w.trim();
                all.iter()
                    .find(|(n, _)| *n == w)
                    .map(|&(_, t)| t)
                    .unwrap_or_else(|| {
                        let names: Vec<&str> = all.iter().map(|a| a.0).collect();
                        panic!("{name}: unknown '{w}' (use {})", names.join(","))
                    })
            })
            .collect(),
        _ => all.iter().map(|a| a.1).collect(),
    }
}

fn config() -> Cfg {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let num = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("{name}: not a number"))
            })
            .unwrap_or(default)
    };
    Cfg {
        secs: num("ENGINE_BENCH_SECS", 2.0),
        reps: num("ENGINE_BENCH_REPS", 3.0).max(1.0) as usize,
        regimes: env_list(
            "ENGINE_BENCH_REGIMES",
            &[("cold", Regime::Cold), ("hot", Regime::Hot)],
        ),
        formats: env_list(
            "ENGINE_BENCH_FORMATS",
            &[
                ("raw", Fmt::Raw),
                ("vhdx", Fmt::Vhdx),
                ("vhd", Fmt::Vhd),
                ("chain", Fmt::Chain),
            ],
        ),
        writes: env_list("ENGINE_BENCH_OPS", &[("read", false), ("write", true)]),
        queues: env_list("ENGINE_BENCH_QUEUES", &[("1", 1), ("2", 2)]),
        dir: std::env::var_os("ENGINE_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir.join("engine_vs_qsd")),
        target_dir,
        fresh: std::env::var("ENGINE_BENCH_FRESH").is_ok_and(|v| v == "1"),
        ours_uring: env_list(
            "ENGINE_BENCH_OURS_AIO",
            &[("io_uring", true), ("threads", false)],
        )
        .first()
        .copied()
        .unwrap_or(true),
        warm_server: env_list("ENGINE_BENCH_WARM", &[("server", true), ("files", false)])
            .first()
            .copied()
            .unwrap_or(true),
    }
}

/// The release `vdisk` binary: `VDISK_BIN`, else built (or found up to date) by cargo.
fn vdisk_binary(cfg: &Cfg) -> PathBuf {
    if let Some(p) = std::env::var_os("VDISK_BIN") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "--example", "vdisk"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cannot run cargo");
    assert!(st.success(), "cargo build --release --example vdisk failed");
    cfg.target_dir.join("release/examples/vdisk")
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One backend's runs of one case.
#[derive(Default, Clone)]
struct Series {
    iops: Vec<f64>,
    /// The server's CPU microseconds per request of each run (when `/proc` told).
    cpu_us: Vec<f64>,
    errors: Vec<String>,
}

struct CaseResult {
    /// The 1-minute load average when the case ended (the machine is shared).
    load: f64,
    /// Wall time of the case, its preparations included.
    wall: f64,
    regime: Regime,
    fmt: Fmt,
    write: bool,
    queues: usize,
    series: Vec<(Backend, Series)>,
}

impl CaseResult {
    fn median_of(&self, key: &str) -> f64 {
        self.series
            .iter()
            .find(|(b, _)| b.key() == key)
            .map_or(f64::NAN, |(_, s)| median(&s.iops))
    }

    fn op(&self) -> &'static str {
        if self.write {
            "randwrite"
        } else {
            "randread"
        }
    }
}

/// Work between runs that keeps the state each run starts from the same.
struct Bench {
    cfg: Cfg,
    vdisk: PathBuf,
    im: Images,
    /// Whether a write run left data in a chain's top (ours, theirs).
    dirty_tops: [bool; 2],
    can_drop: bool,
    run_no: u64,
    /// Unclean backend exits after a good measurement.
    notes: Vec<String>,
}

impl Bench {
    /// Whether the hot regime warms the page cache through the backend: asked for, and the
    /// page cache can be dropped first (else the files are read instead).
    fn warm_through_server(&self) -> bool {
        self.cfg.warm_server && self.can_drop
    }

    /// Restores a chain's top after writes, then drops the page cache (cold) or syncs (hot).
    fn prepare_run(&mut self, regime: Regime, fmt: Fmt, b: Backend) -> Result<(), String> {
        if fmt == Fmt::Chain {
            let (k, chain) = match b {
                Backend::Ours { .. } => (0, &self.im.vhdx_chain),
                Backend::Qsd { .. } => (1, &self.im.qcow2_chain),
            };
            // The copy leaves the new top in the page cache (hot stays hot), and the sync or
            // drop below writes it out before the run.
            if self.dirty_tops[k] {
                Images::restore_top(chain)?;
                self.dirty_tops[k] = false;
            }
        }
        match regime {
            Regime::Cold if self.can_drop => images::drop_caches(),
            // The client reads the disk through the backend first (see `Load::warm`).
            Regime::Hot if self.warm_through_server() => images::drop_caches(),
            // Dirty pages of the last run go out now, not during this one.
            _ => {
                images::nix_sync();
                Ok(())
            }
        }
    }

    fn one_run(
        &mut self,
        regime: Regime,
        fmt: Fmt,
        write: bool,
        queues: usize,
        b: Backend,
    ) -> Result<(f64, Option<f64>), String> {
        self.prepare_run(regime, fmt, b)?;
        self.run_no += 1;
        let sock = self.cfg.dir.join(format!("{}.sock", b.key()));
        let log = self.cfg.dir.join(format!("{}.log", b.key()));
        let server = Server::start(
            &self.vdisk,
            b,
            &fmt.target(&self.im, b),
            queues,
            &sock,
            &log,
        )?;
        if write && fmt == Fmt::Chain {
            let k = usize::from(matches!(b, Backend::Qsd { .. }));
            self.dirty_tops[k] = true;
        }
        let load = Load {
            queues,
            depth: DEPTH,
            write,
            duration: Duration::from_secs_f64(self.cfg.secs),
            seed: self.run_no,
            expect: Some(match fmt {
                Fmt::Chain => images::chain_byte,
                _ => images::raw_byte,
            }),
            warm: regime == Regime::Hot && self.warm_through_server(),
            server: Some(server.pid()),
        };
        let r = client::drive(&sock, &load, Duration::from_secs(10));
        let tail = server.log_tail();
        let stopped = server.stop();
        let r = r.map_err(|e| format!("{e} [backend: {tail}]"))?;
        if let Some(note) = stopped? {
            self.notes
                .push(format!("{} ({}): {note}", b.describe(), fmt.name()));
        }
        if r.errors > 0 {
            return Err(format!(
                "{} of {} requests failed (first: {}) [backend: {tail}]",
                r.errors, r.ops, r.first_error
            ));
        }
        if r.bad_data > 0 {
            let (pos, got, want) = r.first_bad;
            return Err(format!(
                "{} of {} reads returned wrong data (first at {pos}: {got:#04x}, expected \
                 {want:#04x})",
                r.bad_data, r.ops
            ));
        }
        let cpu_us = r
            .server_cpu
            .filter(|_| r.ops > 0)
            .map(|c| c * 1e6 / r.ops as f64);
        Ok((r.iops(), cpu_us))
    }

    fn case(&mut self, regime: Regime, fmt: Fmt, write: bool, queues: usize) -> CaseResult {
        let t0 = Instant::now();
        let backends = regime.backends(self.cfg.ours_uring);
        if regime == Regime::Hot && !self.warm_through_server() {
            let mut files: Vec<PathBuf> = Vec::new();
            for &b in &backends {
                for f in fmt.files(&self.im, b) {
                    if !files.contains(&f) {
                        files.push(f);
                    }
                }
            }
            if let Err(e) = images::warm(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>()) {
                println!("WARNING: warming the page cache: {e}");
            }
        }
        let mut series: Vec<(Backend, Series)> =
            backends.iter().map(|&b| (b, Series::default())).collect();
        for rep in 0..self.cfg.reps {
            let mut order: Vec<usize> = (0..backends.len()).collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let b = backends[i];
                match self.one_run(regime, fmt, write, queues, b) {
                    Ok((iops, cpu_us)) => {
                        series[i].1.iops.push(iops);
                        series[i].1.cpu_us.extend(cpu_us);
                    }
                    Err(e) => {
                        println!("  {} run {}: FAILED: {e}", b.describe(), rep + 1);
                        series[i].1.errors.push(e);
                    }
                }
            }
        }
        CaseResult {
            load: load_average(),
            wall: t0.elapsed().as_secs_f64(),
            regime,
            fmt,
            write,
            queues,
            series,
        }
    }
}

/// The 1-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn fmt_iops(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "FAILED".to_string()
    }
}

fn fmt_ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".to_string()
    }
}

fn case_line(c: &CaseResult) -> String {
    let ours = c.median_of("ours");
    let uring = c.median_of("qsd_io_uring");
    let mut s = format!(
        "{:<4} {:<6} {:<9} q{}  ours {:>7}  qsd(io_uring{}) {:>7}  ratio {:>5}",
        c.regime.name(),
        c.fmt.name(),
        c.op(),
        c.queues,
        fmt_iops(ours),
        if c.fmt == Fmt::Chain { ", qcow2" } else { "" },
        fmt_iops(uring),
        fmt_ratio(ours / uring),
    );
    if c.regime == Regime::Hot {
        let threads = c.median_of("qsd_threads");
        s += &format!(
            "  qsd(threads) {:>7}  ratio {:>5}",
            fmt_iops(threads),
            fmt_ratio(ours / threads)
        );
    }
    let runs: Vec<String> = c
        .series
        .iter()
        .map(|(b, s)| {
            let v: Vec<String> = s
                .iops
                .iter()
                .map(|x| format!("{:.0}", x / 1000.0))
                .collect();
            let cpu = median(&s.cpu_us);
            if cpu.is_finite() {
                format!("{} {} ({cpu:.1} us cpu/req)", b.key(), v.join("/"))
            } else {
                format!("{} {}", b.key(), v.join("/"))
            }
        })
        .collect();
    s + &format!(
        "   [kIOPS per run: {}; load {:.1}; {:.0} s]",
        runs.join(", "),
        c.load,
        c.wall
    )
}

fn print_table(results: &[CaseResult]) {
    println!();
    println!(
        "{:<5} {:<7} {:<13} {:<10} {:>2}  {:>9}  {:>13}  {:>6}  {:>12}  {:>6}  target",
        "cache",
        "ours",
        "qsd",
        "op",
        "q",
        "ours IOPS",
        "qsd io_uring",
        "ratio",
        "qsd threads",
        "ratio",
    );
    for c in results {
        let ours = c.median_of("ours");
        let uring = c.median_of("qsd_io_uring");
        let threads = c.median_of("qsd_threads");
        let ratio = ours / uring;
        let verdict = if !ratio.is_finite() {
            "n/a".to_string()
        } else if ratio >= c.regime.target() {
            format!(">= {:.1}x ok", c.regime.target())
        } else {
            format!(">= {:.1}x BELOW", c.regime.target())
        };
        println!(
            "{:<5} {:<7} {:<13} {:<10} {:>2}  {:>9}  {:>13}  {:>6}  {:>12}  {:>6}  {}",
            c.regime.name(),
            c.fmt.name(),
            c.fmt.peer_image(),
            c.op(),
            c.queues,
            fmt_iops(ours),
            fmt_iops(uring),
            fmt_ratio(ratio),
            if c.regime == Regime::Hot {
                fmt_iops(threads)
            } else {
                "-".to_string()
            },
            fmt_ratio(ours / threads),
            verdict
        );
    }
}

fn to_json(
    cfg: &Cfg,
    results: &[CaseResult],
    notes: &[String],
    total_secs: f64,
    hot_warm_up: &str,
) -> serde_json::Value {
    let num = |x: f64| {
        if x.is_finite() {
            serde_json::json!(x)
        } else {
            serde_json::Value::Null
        }
    };
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|c| {
            let mut backends = serde_json::Map::new();
            for (b, s) in &c.series {
                backends.insert(
                    b.key().to_string(),
                    serde_json::json!({
                        "backend": b.describe(),
                        "median_iops": num(median(&s.iops)),
                        "runs_iops": s.iops,
                        "errors": s.errors,
                    }),
                );
            }
            let ours = c.median_of("ours");
            serde_json::json!({
                "regime": c.regime.name(),
                "image": c.fmt.name(),
                "peer_image": c.fmt.peer_image(),
                "op": c.op(),
                "queues": c.queues,
                "load_average_1min": num(c.load),
                "depth_per_queue": DEPTH,
                "block_bytes": client::BLOCK,
                "backends": backends,
                "ratio_vs_qsd_io_uring": num(ours / c.median_of("qsd_io_uring")),
                "ratio_vs_qsd_threads": num(ours / c.median_of("qsd_threads")),
                "target_vs_qsd_io_uring": c.regime.target(),
            })
        })
        .collect();
    serde_json::json!({
        "bench": "engine_vs_qsd",
        "image_bytes": images::SIZE,
        "secs_per_run": cfg.secs,
        "hot_warm_up": hot_warm_up,
        "runs_per_backend": cfg.reps,
        "statistic": "median",
        "client": "libblkio virtio-blk-vhost-user (blkio crate 0.5), one thread per queue",
        "chain_note": "qemu-storage-daemon cannot open differencing VHDX: our 4-deep VHDX chain \
                       is compared with qsd on a 4-deep qcow2 chain holding the same data",
        "total_secs": total_secs,
        "unclean_exits": notes,
        "cases": cases,
    })
}

fn main() {
    // `cargo test --benches` runs this too: that is no place for a 10-minute root-only run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("engine_vs_qsd: skipped (run it with `cargo bench --bench engine_vs_qsd`)");
        return;
    }
    let cfg = config();
    for tool in ["qemu-storage-daemon", "qemu-img", "qemu-io"] {
        assert!(
            have(tool),
            "{tool} is not installed: nothing to compare with"
        );
    }
    std::fs::create_dir_all(&cfg.dir).unwrap();
    let vdisk = vdisk_binary(&cfg);
    assert!(vdisk.exists(), "no vdisk binary at {}", vdisk.display());
    let t0 = Instant::now();
    let im = images::prepare(&cfg.dir, &vdisk, cfg.fresh).unwrap_or_else(|e| panic!("{e}"));
    if std::env::var("ENGINE_BENCH_PREPARE_ONLY").is_ok_and(|v| v == "1") {
        println!("images ready in {}", cfg.dir.display());
        return;
    }
    let can_drop = images::drop_caches().is_ok();
    if !can_drop {
        println!(
            "WARNING: cannot drop the page cache (run as root): the cold rows are not cold, and \
             the hot rows are warmed by reading the files, not through each backend"
        );
    }
    let mut bench = Bench {
        vdisk,
        im,
        dirty_tops: [true, true],
        can_drop,
        run_no: 0,
        notes: Vec::new(),
        cfg,
    };
    let cfg = &bench.cfg;
    let cases = cfg.regimes.len() * cfg.formats.len() * cfg.writes.len() * cfg.queues.len();
    println!(
        "engine_vs_qsd: 4 KiB random I/O, QD{DEPTH} per queue, {} GiB images, {} s per run, \
         {} runs per backend and case (median), {cases} cases",
        images::SIZE >> 30,
        cfg.secs,
        cfg.reps
    );
    println!("client: libblkio virtio-blk-vhost-user, one thread per queue");
    for r in &cfg.regimes {
        let names: Vec<String> = r
            .backends(cfg.ours_uring)
            .iter()
            .map(|b| b.describe())
            .collect();
        println!("{}: {}", r.name(), names.join(" | "));
    }
    println!(
        "chain4: qemu-storage-daemon cannot open differencing VHDX; our 4-deep VHDX chain is \
         compared with qsd on a 4-deep qcow2 chain holding the same data"
    );
    println!("ratio = ours / qsd (above 1: ours is faster)");
    let (regimes, formats, writes, queues) = (
        cfg.regimes.clone(),
        cfg.formats.clone(),
        cfg.writes.clone(),
        cfg.queues.clone(),
    );
    let mut results = Vec::new();
    for &regime in &regimes {
        for &fmt in &formats {
            for &write in &writes {
                for &q in &queues {
                    let c = bench.case(regime, fmt, write, q);
                    println!("{}", case_line(&c));
                    results.push(c);
                }
            }
        }
    }
    let total = t0.elapsed().as_secs_f64();
    print_table(&results);
    if !bench.notes.is_empty() {
        println!(
            "NOTE: {} run(s) measured fine but the backend did not exit cleanly; the first: {}",
            bench.notes.len(),
            bench.notes[0]
        );
    }
    println!("total {total:.0} s");
    let hot_warm_up = if bench.warm_through_server() {
        "the client read the whole disk through each backend before each run"
    } else {
        "the image files were read once before each case"
    };
    let json = to_json(&bench.cfg, &results, &bench.notes, total, hot_warm_up);
    let out = bench.cfg.target_dir.join("engine_vs_qsd.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("results written to {}", out.display());
}
