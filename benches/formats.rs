//! Format layers against their peers, in one run, printing a table of ratios.
//!
//! - `vhdx` / `vhd`: an allocated dynamic image vs `RawDisk` on files in the same directory:
//!   4 KiB random reads and writes from 2 threads, 1 MiB sequential reads and writes.
//!   Ratio = raw time / our time (>= 0.9 is the target).
//! - `fill`: open an empty dynamic image, write it whole in 1 MiB writes, flush and close,
//!   vs `qemu-io -f vhdx|vpc -c "write 0 SIZE"` (one request; its close flushes) on an empty
//!   image qemu-img created. Ratio = qemu-io wall time / ours (>= 1.0 is the target).
//! - `chain`: 4 KiB random reads through an 8-deep differencing chain vs one flattened image
//!   (>= 0.8 is the target), VHDX and VHD, opened read-only, in steady state: both images
//!   are written, synced and dropped from the page cache (`POSIX_FADV_DONTNEED`), then warmed
//!   by the same pass of 4 KiB reads over the whole disk in one shuffled order, so that both
//!   sit in the page cache the way random reads put them there. Without the drop, the page
//!   cache keeps the folios the writes made: 1 MiB ones for the flat image (written in 1 MiB
//!   pieces) against 64 KiB ones for the layers, and the kernel's lookup and copy alone then
//!   cost the layer files 8-16% more than the flat file (bare preads of the layers, same
//!   offsets: 0.84-0.92x), whatever the chain reader does; `BENCH_CHAIN_AS_WRITTEN=1` measures
//!   that way. An informational "floor" row times the same reads as bare `pread`s of the
//!   layer file and offset holding each 4 KiB: what no chain reader can beat.
//!
//! Every case runs `BENCH_ROUNDS` rounds (default 7), ours and the peer alternating inside a
//! round so background load hits both alike; the table shows the median ratio and the range
//! of the per-round ratios. Arguments (after `--`) select groups: `vhdx vhd fill chain`.
//! `.ci/bench-formats` runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use vdisk::block_io::{BlockDevice, FileStorage, OpenOptions as IoOpen, RawDisk, Storage};
use vdisk::chain::{Disk, OpenOptions};

const SIZE: u64 = 256 << 20;
const MIB: u64 = 1 << 20;

/// One figure: what was measured, per-round (ours, peer) times, the goal ratio.
struct Row {
    target: &'static str,
    case: String,
    rounds: Vec<(Duration, Duration)>,
    goal: f64,
    unit: Unit,
}

#[derive(Clone, Copy)]
enum Unit {
    /// Throughput in MiB/s for this many bytes per round.
    Bytes(u64),
    /// Wall time in ms.
    Wall,
}

impl Row {
    fn ratios(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self
            .rounds
            .iter()
            .map(|(ours, peer)| peer.as_secs_f64() / ours.as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        r
    }
    fn fmt(&self, d: Duration) -> String {
        match self.unit {
            Unit::Bytes(b) => format!("{:.0} MiB/s", b as f64 / MIB as f64 / d.as_secs_f64()),
            Unit::Wall => format!("{:.0} ms", d.as_secs_f64() * 1e3),
        }
    }
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    fn print(&self) {
        let r = self.ratios();
        let med = r[r.len() / 2];
        let ours = Self::median(self.rounds.iter().map(|x| x.0).collect());
        let peer = Self::median(self.rounds.iter().map(|x| x.1).collect());
        println!(
            "| {:<6} | {:<34} | {:>11} | {:>11} | {:>5.2} | {:.2}-{:.2} | >= {:.1} | {} |",
            self.target,
            self.case,
            self.fmt(ours),
            self.fmt(peer),
            med,
            r[0],
            r[r.len() - 1],
            self.goal,
            if self.goal == 0.0 {
                "info"
            } else if med >= self.goal {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

/// Times `ours` and `peer` once each, alternating which goes first by round.
fn pair(
    round: u64,
    mut ours: impl FnMut() -> Duration,
    mut peer: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    if round % 2 == 0 {
        let o = ours();
        (o, peer())
    } else {
        let p = peer();
        (ours(), p)
    }
}

fn fill(dev: &dyn BlockDevice) {
    let chunk = vec![0x5Au8; MIB as usize];
    for i in 0..SIZE / MIB {
        dev.write_at(&chunk, i * MIB).unwrap();
    }
    dev.flush().unwrap();
}

fn raw_disk(dir: &Path) -> RawDisk<FileStorage> {
    let s = FileStorage::create(dir.join("bench.raw")).unwrap();
    s.set_len(SIZE).unwrap();
    let d = RawDisk::new(s).unwrap();
    fill(&d);
    d
}

/// `ops` 4 KiB random reads or writes split over 2 threads.
fn random_4k(disk: &dyn BlockDevice, write: bool, ops: u64, seed: u64) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..2 {
            s.spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed * 2 + th);
                let mut buf = vec![0x3Cu8; 4096];
                for _ in 0..ops / 2 {
                    let off = rng.random_range(0..SIZE / 4096) * 4096;
                    if write {
                        disk.write_at(&buf, off).unwrap();
                    } else {
                        disk.read_at(&mut buf, off).unwrap();
                    }
                }
            });
        }
    });
    t.elapsed()
}

/// One sequential pass over the disk in 1 MiB requests.
fn seq_1m(disk: &dyn BlockDevice, write: bool) -> Duration {
    let mut buf = vec![0x6Bu8; MIB as usize];
    let t = Instant::now();
    for i in 0..SIZE / MIB {
        if write {
            disk.write_at(&buf, i * MIB).unwrap();
        } else {
            disk.read_at(&mut buf, i * MIB).unwrap();
        }
    }
    t.elapsed()
}

/// The four steady-state cases of `ours` against `raw`.
fn steady(target: &'static str, ours: &dyn BlockDevice, raw: &dyn BlockDevice) -> Vec<Row> {
    const OPS: u64 = 200_000;
    // Before each timed segment (untimed): write back both files, so neither side pays for
    // the other's dirty pages.
    let clean = || {
        ours.flush().unwrap();
        raw.flush().unwrap();
    };
    let mut out = Vec::new();
    for (case, write) in [
        ("4k random read, 2 threads", false),
        ("4k random write, 2 threads", true),
    ] {
        let rounds = (0..rounds() as u64)
            .map(|i| {
                pair(
                    i,
                    || {
                        clean();
                        random_4k(ours, write, OPS, i)
                    },
                    || {
                        clean();
                        random_4k(raw, write, OPS, i)
                    },
                )
            })
            .collect();
        out.push(Row {
            target,
            case: case.into(),
            rounds,
            goal: 0.9,
            unit: Unit::Bytes(OPS * 4096),
        });
    }
    for (case, write) in [("1m sequential read", false), ("1m sequential write", true)] {
        let rounds = (0..rounds() as u64)
            .map(|i| {
                pair(
                    i,
                    || {
                        clean();
                        seq_1m(ours, write)
                    },
                    || {
                        clean();
                        seq_1m(raw, write)
                    },
                )
            })
            .collect();
        out.push(Row {
            target,
            case: case.into(),
            rounds,
            goal: 0.9,
            unit: Unit::Bytes(SIZE),
        });
    }
    out
}

fn vhdx_image(path: &Path) -> vdisk::vhdx_format::VhdxFile<FileStorage> {
    let s = FileStorage::open(path, &IoOpen::new().create(true)).unwrap();
    vdisk::vhdx_format::create(s, &vdisk::vhdx_format::CreateOptions::dynamic(SIZE)).unwrap()
}

fn vhd_image(path: &Path) -> vdisk::vhd_format::VhdFile<FileStorage> {
    let s = FileStorage::create(path).unwrap();
    let o = vdisk::vhd_format::CreateOptions::new(SIZE, vdisk::vhd_format::Subformat::Dynamic);
    vdisk::vhd_format::VhdFile::create(s, &o).unwrap()
}

fn qemu_io_available() -> bool {
    let ok = Command::new("qemu-io").arg("--version").output().is_ok()
        && Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        println!("WARNING: qemu-io/qemu-img not found; fill comparisons skipped");
    }
    ok
}

/// Wall time of `qemu-io -f fmt -c "write 0 SIZE"` on a fresh empty image.
fn qemu_fill(dir: &Path, fmt: &str, opts: &str) -> Duration {
    let path = dir.join(format!("qemu-fill.{fmt}"));
    let _ = std::fs::remove_file(&path);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt, "-o", opts])
        .arg(&path)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create failed");
    let t = Instant::now();
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", &format!("write 0 {SIZE}")])
        .arg(&path)
        .output()
        .unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&path);
    d
}

/// Wall time of opening a fresh empty image, writing it whole in 1 MiB writes, flush, close.
fn our_fill(dir: &Path, vhdx: bool) -> Duration {
    let path = dir.join(if vhdx {
        "our-fill.vhdx"
    } else {
        "our-fill.vhd"
    });
    let _ = std::fs::remove_file(&path);
    if vhdx {
        let f = vhdx_image(&path);
        f.close().unwrap();
    } else {
        drop(vhd_image(&path));
    }
    let t = Instant::now();
    if vhdx {
        let f =
            vdisk::vhdx_format::open_file(&path, &vhdx_format::OpenOptions::new().read_only(false))
                .unwrap();
        fill(&f);
        f.close().unwrap();
    } else {
        let s = FileStorage::open(&path, &IoOpen::new()).unwrap();
        let f =
            vdisk::vhd_format::VhdFile::open(s, &vhd_format::OpenOptions::new().read_only(false))
                .unwrap();
        fill(&f);
    }
    let d = t.elapsed();
    let _ = std::fs::remove_file(&path);
    d
}

fn fill_rows(dir: &Path) -> Vec<Row> {
    if !qemu_io_available() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (target, vhdx, fmt, opts) in [
        ("VHDX", true, "vhdx", "subformat=dynamic"),
        ("VHD", false, "vpc", "subformat=dynamic,force_size=on"),
    ] {
        let rounds = (0..rounds() as u64)
            .map(|i| pair(i, || our_fill(dir, vhdx), || qemu_fill(dir, fmt, opts)))
            .collect();
        out.push(Row {
            target,
            case: format!("fill empty {} MiB (vs qemu-io)", SIZE / MIB),
            rounds,
            goal: 1.0,
            unit: Unit::Wall,
        });
    }
    out
}

fn chain_create(vhdx: bool, path: &Path, parent: Option<&Path>) {
    let s = FileStorage::create(path).unwrap();
    match (vhdx, parent) {
        (true, None) => drop(
            vdisk::vhdx_format::create(s, &vdisk::vhdx_format::CreateOptions::dynamic(SIZE))
                .unwrap(),
        ),
        (true, Some(p)) => {
            let ps = FileStorage::open(p, &IoOpen::new().read_only(true)).unwrap();
            let dwg = vdisk::vhdx_format::VhdxFile::open(
                ps,
                &vhdx_format::OpenOptions::new().read_only(true),
            )
            .unwrap()
            .details()
            .data_write_guid;
            let pref = vdisk::vhdx_format::ParentRef {
                data_write_guid: dwg,
                relative_path: p.file_name().unwrap().to_string_lossy().into_owned(),
                absolute_path: None,
            };
            let o = vdisk::vhdx_format::CreateOptions::differencing(SIZE, pref);
            drop(vdisk::vhdx_format::create(s, &o).unwrap());
        }
        (false, None) => {
            let o =
                vdisk::vhd_format::CreateOptions::new(SIZE, vdisk::vhd_format::Subformat::Dynamic);
            drop(vdisk::vhd_format::VhdFile::create(s, &o).unwrap());
        }
        (false, Some(p)) => {
            let ps = FileStorage::open(p, &IoOpen::new().read_only(true)).unwrap();
            let d = vdisk::vhd_format::VhdFile::open(
                ps,
                &vhd_format::OpenOptions::new().read_only(true),
            )
            .unwrap()
            .details();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let o = vdisk::vhd_format::DifferencingOptions::for_parent(
                &d,
                name.clone(),
                None,
                Some(name),
            );
            drop(vdisk::vhd_format::VhdFile::create_differencing(s, &o).unwrap());
        }
    }
}

/// The chain of `benches/chain.rs`: 8 layers, each owning random 64 KiB pieces (so blocks
/// are partly present in several layers), and a flattened copy with every block allocated.
fn chain_build(dir: &Path, vhdx: bool) -> (PathBuf, PathBuf) {
    const DEPTH: usize = 8;
    let ext = if vhdx { "vhdx" } else { "vhd" };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut prev: Option<PathBuf> = None;
    for level in 0..DEPTH {
        let p = dir.join(format!("l{level}.{ext}"));
        chain_create(vhdx, &p, prev.as_deref());
        let disk = Disk::open(&p, &OpenOptions::new()).unwrap();
        let piece = vec![level as u8 + 1; 64 << 10];
        for _ in 0..(SIZE / (64 << 10)) / DEPTH as u64 {
            let off = rng.random_range(0..SIZE / (64 << 10)) * (64 << 10);
            disk.write_at(&piece, off).unwrap();
        }
        disk.flush().unwrap();
        prev = Some(p);
    }
    let top = prev.unwrap();
    let flat = dir.join(format!("flat.{ext}"));
    chain_create(vhdx, &flat, None);
    let src = Disk::open(&top, &OpenOptions::new().read_only(true)).unwrap();
    let dst = Disk::open(&flat, &OpenOptions::new()).unwrap();
    let piece: u64 = std::env::var("BENCH_FLAT_PIECE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MIB);
    let mut buf = vec![0u8; piece as usize];
    for i in 0..SIZE / piece {
        src.read_at(&mut buf, i * piece).unwrap();
        buf[0] |= 0x80;
        dst.write_at(&buf, i * piece).unwrap();
    }
    dst.flush().unwrap();
    (top, flat)
}

/// `ops` 4 KiB random reads, one thread.
fn random_read_1t(disk: &dyn BlockDevice, ops: u64, seed: u64) -> Duration {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..ops {
        let off = rng.random_range(0..SIZE / 4096) * 4096;
        disk.read_at(&mut buf, off).unwrap();
    }
    t.elapsed()
}

/// The floor of any chain reader: the same reads as [`random_read_1t`] on `chain`, done as
/// bare `pread`s of the layer file and offset holding each 4 KiB (zeros need no I/O).
fn floor_plan(chain: &Disk, ops: u64, seed: u64) -> Vec<Option<(usize, u64)>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..ops)
        .map(|_| {
            let off = rng.random_range(0..SIZE / 4096) * 4096;
            let (run, depth) = chain.block_status_depth(off, 4096).unwrap();
            match run.status {
                vdisk::block_io::BlockStatus::Data => Some((depth, run.file_offset.unwrap())),
                _ => None,
            }
        })
        .collect()
}

fn floor_reads(files: &[std::fs::File], plan: &[Option<(usize, u64)>]) -> Duration {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for p in plan {
        match p {
            Some((d, at)) => files[*d].read_exact_at(&mut buf, *at).unwrap(),
            None => buf.fill(0),
        }
    }
    t.elapsed()
}

/// Writes back and drops `path`'s pages from the page cache.
fn drop_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) on {}", path.display());
}

fn chain_rows(dir: &Path) -> Vec<Row> {
    const OPS: u64 = 100_000;
    let mut out = Vec::new();
    for (target, vhdx) in [("Chain", true), ("Chain", false)] {
        let only = std::env::var("BENCH_CHAIN").unwrap_or_default();
        if !only.is_empty() && only != if vhdx { "vhdx" } else { "vhd" } {
            continue;
        }
        let t0 = Instant::now();
        let sub = dir.join(if vhdx { "chain-vhdx" } else { "chain-vhd" });
        std::fs::create_dir_all(&sub).unwrap();
        let (top, flat) = chain_build(&sub, vhdx);
        let as_written = std::env::var_os("BENCH_CHAIN_AS_WRITTEN").is_some();
        if !as_written {
            let layers = Disk::open(&top, &OpenOptions::new().read_only(true)).unwrap();
            for l in layers.layers() {
                drop_cache(&l.path);
            }
            drop_cache(&flat);
        }
        let chain = Disk::open(&top, &OpenOptions::new().read_only(true)).unwrap();
        let flat = Disk::open(&flat, &OpenOptions::new().read_only(true)).unwrap();
        eprintln!("chain built in {:?}", t0.elapsed());
        // Steady state: one pass over the whole disk in 4 KiB reads, in a shuffled order unless
        // measuring as written, warms the page cache and the chain's resolution cache.
        let mut order: Vec<u64> = (0..SIZE / 4096).collect();
        if !as_written {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        }
        let mut buf = vec![0u8; 4096];
        for i in order {
            chain.read_at(&mut buf, i * 4096).unwrap();
            flat.read_at(&mut buf, i * 4096).unwrap();
        }
        let rounds = (0..rounds() as u64)
            .map(|i| {
                pair(
                    i,
                    || random_read_1t(&chain, OPS, i),
                    || random_read_1t(&flat, OPS, i),
                )
            })
            .collect();
        out.push(Row {
            target,
            case: format!(
                "{} 8-deep 4k random read vs flat",
                if vhdx { "vhdx" } else { "vhd" }
            ),
            rounds,
            goal: 0.8,
            unit: Unit::Bytes(OPS * 4096),
        });
        if std::env::var_os("BENCH_NO_FLOOR").is_some() {
            continue;
        }
        let files: Vec<std::fs::File> = chain
            .layers()
            .iter()
            .map(|l| std::fs::File::open(&l.path).unwrap())
            .collect();
        let floor = (0..crate::rounds() as u64)
            .map(|i| {
                let plan = floor_plan(&chain, OPS, i);
                pair(
                    i,
                    || floor_reads(&files, &plan),
                    || random_read_1t(&flat, OPS, i),
                )
            })
            .collect();
        out.push(Row {
            target,
            case: "  floor: bare preads of the chain".into(),
            rounds: floor,
            goal: 0.0,
            unit: Unit::Bytes(OPS * 4096),
        });
    }
    out
}

fn main() {
    let groups: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |g: &str| groups.is_empty() || groups.iter().any(|a| a == g);
    let base = std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = tempfile::tempdir_in(base).unwrap();
    let mut rows = Vec::new();
    if want("vhdx") || want("vhd") {
        let raw = raw_disk(dir.path());
        if want("vhdx") {
            let f = vhdx_image(&dir.path().join("bench.vhdx"));
            fill(&f);
            rows.extend(steady("VHDX", &f, &raw));
        }
        if want("vhd") {
            let f = vhd_image(&dir.path().join("bench.vhd"));
            fill(&f);
            rows.extend(steady("VHD", &f, &raw));
        }
    }
    if want("fill") {
        rows.extend(fill_rows(dir.path()));
    }
    if want("chain") {
        rows.extend(chain_rows(dir.path()));
    }
    println!(
        "\n{} rounds per case; ratio = peer time / our time (higher is better for us); \
         range = min-max of the per-round ratios",
        rounds()
    );
    println!(
        "| target | case                               |        ours |        peer | ratio | range     | goal   | |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        r.print();
    }
}
