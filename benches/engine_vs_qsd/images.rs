//! The images both backends serve, made once and kept between runs (in the bench's work
//! folder): a 2 GiB raw file of non-zero data, dynamic VHDX and VHD copies of it (every block
//! allocated), and two 4-deep chains holding the same data: VHDX (ours) and qcow2 (the peer's,
//! since qemu-storage-daemon cannot open differencing VHDX). Each chain is the raw data as
//! its base, then three differencing layers that each overwrite some 64 MiB stripes with
//! their own byte: reads reach every layer, writes go to the top.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The virtual size of every image.
pub const SIZE: u64 = 2 << 30;
const STRIPE: u64 = 64 << 20;
const STAMP: &str = "engine_vs_qsd images v1, 2 GiB, stripes 64 MiB\n";

/// Whether a layer holds stripe `i`.
type Holds = fn(u64) -> bool;

/// Differencing layers above the base: (name, byte written, which stripes it holds).
const LAYERS: [(&str, u8, Holds); 3] = [
    ("mid1", 0x11, |i| i % 4 == 1),
    ("mid2", 0x22, |i| i % 4 == 2),
    ("top", 0x33, |i| i % 16 == 3),
];

/// The byte at `pos` of the raw image (never zero).
pub fn raw_byte(pos: u64) -> u8 {
    (((pos & 0xf_ffff) * 31 + (pos >> 20) * 17) % 251 + 1) as u8
}

/// The byte at `pos` of either chain as made (never zero).
pub fn chain_byte(pos: u64) -> u8 {
    let stripe = pos / STRIPE;
    match LAYERS.iter().rev().find(|l| (l.2)(stripe)) {
        Some(l) => l.1,
        None => raw_byte(pos),
    }
}

/// Where the images are.
#[derive(Debug, Clone)]
pub struct Images {
    pub raw: PathBuf,
    pub vhdx: PathBuf,
    pub vhd: PathBuf,
    /// base, mid1, mid2, top.
    pub vhdx_chain: Vec<PathBuf>,
    pub qcow2_chain: Vec<PathBuf>,
}

impl Images {
    fn at(dir: &Path) -> Images {
        let chain = |ext: &str| {
            std::iter::once("base")
                .chain(LAYERS.iter().map(|l| l.0))
                .map(|n| dir.join("chain").join(format!("{n}.{ext}")))
                .collect()
        };
        Images {
            raw: dir.join("disk.raw"),
            vhdx: dir.join("disk.vhdx"),
            vhd: dir.join("disk.vhd"),
            vhdx_chain: chain("vhdx"),
            qcow2_chain: chain("qcow2"),
        }
    }

    /// The untouched copy of a chain's top, restored after writes.
    pub fn pristine(top: &Path) -> PathBuf {
        let mut s = top.as_os_str().to_owned();
        s.push(".pristine");
        PathBuf::from(s)
    }

    /// Puts a chain's top layer back as it was made (undoes a write run's allocations).
    pub fn restore_top(chain: &[PathBuf]) -> Result<(), String> {
        let top = chain.last().ok_or("empty chain")?;
        std::fs::copy(Self::pristine(top), top)
            .map(|_| ())
            .map_err(|e| format!("restoring {}: {e}", top.display()))
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The images in `dir`, made now unless a previous run left them (and `fresh` is false).
pub fn prepare(dir: &Path, vdisk: &Path, fresh: bool) -> Result<Images, String> {
    let im = Images::at(dir);
    let stamp = dir.join("images.ok");
    if !fresh && std::fs::read_to_string(&stamp).is_ok_and(|s| s == STAMP) {
        println!(
            "reusing the images in {} (ENGINE_BENCH_FRESH=1 remakes them)",
            dir.display()
        );
        return Ok(im);
    }
    let _ = std::fs::remove_file(&stamp);
    let chain_dir = dir.join("chain");
    std::fs::create_dir_all(&chain_dir).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    println!("making the images in {} (about 13 GiB)...", dir.display());

    // Raw: non-zero bytes that differ from MiB to MiB, so that no converter skips a block.
    {
        let mut f = File::create(&im.raw).map_err(|e| e.to_string())?;
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..SIZE >> 20 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = raw_byte((i << 20) + j as u64);
            }
            f.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        f.sync_all().map_err(|e| e.to_string())?;
    }
    for (dst, fmt) in [(&im.vhdx, "vhdx"), (&im.vhd, "vhd")] {
        let _ = std::fs::remove_file(dst);
        run(Command::new(vdisk)
            .args(["convert", "-O", fmt, "-o", "subformat=dynamic"])
            .arg(&im.raw)
            .arg(dst))?;
    }

    // The chains: base = the raw data; each layer above overwrites its stripes.
    for p in im.vhdx_chain.iter().chain(&im.qcow2_chain) {
        let _ = std::fs::remove_file(p);
    }
    run(Command::new(vdisk)
        .args(["convert", "-O", "vhdx", "-o", "subformat=dynamic"])
        .arg(&im.raw)
        .arg(&im.vhdx_chain[0]))?;
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&im.raw)
        .arg(&im.qcow2_chain[0]))?;
    for (k, (name, byte, holds)) in LAYERS.iter().enumerate() {
        let parent = |ext: &str| match k {
            0 => format!("base.{ext}"),
            _ => format!("{}.{ext}", LAYERS[k - 1].0),
        };
        // Relative parent paths, as a user would make a chain in one folder.
        run(Command::new(vdisk).current_dir(&chain_dir).args([
            "create",
            "-f",
            "vhdx",
            "-b",
            &parent("vhdx"),
            &format!("{name}.vhdx"),
        ]))?;
        run(Command::new("qemu-img").current_dir(&chain_dir).args([
            "create",
            "-f",
            "qcow2",
            "-b",
            &parent("qcow2"),
            "-F",
            "qcow2",
            &format!("{name}.qcow2"),
        ]))?;
        let writes: Vec<String> = (0..SIZE / STRIPE)
            .filter(|&i| holds(i))
            .map(|i| format!("write -P {byte} {} {STRIPE}", i * STRIPE))
            .collect();
        let mut ours = Command::new(vdisk);
        ours.current_dir(&chain_dir).arg("io");
        let mut theirs = Command::new("qemu-io");
        theirs.current_dir(&chain_dir).args(["-f", "qcow2"]);
        for w in &writes {
            ours.arg("-c").arg(w);
            theirs.arg("-c").arg(w);
        }
        run(ours.arg(format!("{name}.vhdx")))?;
        run(theirs.arg(format!("{name}.qcow2")))?;
    }
    verify_same(&im, &chain_dir, vdisk)?;
    for chain in [&im.vhdx_chain, &im.qcow2_chain] {
        let top = chain.last().ok_or("empty chain")?;
        std::fs::copy(top, Images::pristine(top)).map_err(|e| e.to_string())?;
    }
    nix_sync();
    std::fs::write(&stamp, STAMP).map_err(|e| e.to_string())?;
    println!("images made in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(im)
}

/// Spot-checks that both chains read the same: the first 4 KiB of every stripe, each with the
/// byte its layer wrote (read with a pattern check by each format's own tool).
fn verify_same(im: &Images, chain_dir: &Path, vdisk: &Path) -> Result<(), String> {
    let top = |p: &Path| p.file_name().map(PathBuf::from).unwrap_or_default();
    for i in 0..SIZE / STRIPE {
        let owner = LAYERS.iter().rev().find(|l| (l.2)(i));
        let Some((_, byte, _)) = owner else { continue };
        let check = format!("read -P {byte} {} 4096", i * STRIPE);
        run(Command::new(vdisk)
            .current_dir(chain_dir)
            .args(["io", "-c", &check])
            .arg(top(&im.vhdx_chain[3])))?;
        run(Command::new("qemu-io")
            .current_dir(chain_dir)
            .args(["-f", "qcow2", "-r", "-c", &check])
            .arg(top(&im.qcow2_chain[3])))?;
    }
    Ok(())
}

/// sync(2): every dirty page to its file.
pub fn nix_sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Drops the page cache (after a sync); `Err` when not permitted (needs root).
pub fn drop_caches() -> Result<(), String> {
    nix_sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1\n")
        .map_err(|e| format!("cannot drop the page cache (needs root): {e}"))
}

/// Reads every file once, so that its pages are in the page cache.
pub fn warm(files: &[&Path]) -> Result<(), String> {
    let mut buf = vec![0u8; 4 << 20];
    for p in files {
        let mut f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        while f.read(&mut buf).map_err(|e| e.to_string())? > 0 {}
    }
    Ok(())
}
