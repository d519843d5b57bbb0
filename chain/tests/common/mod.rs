//! Building chains of real files for the chain tests, with a byte model per level.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use block_io::{BlockDevice, FileStorage, OpenOptions, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const SIZE: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fmt {
    Vhd,
    Vhdx,
}

impl Fmt {
    pub fn ext(self) -> &'static str {
        match self {
            Fmt::Vhd => "vhd",
            Fmt::Vhdx => "vhdx",
        }
    }
}

/// Creates a base image of `size` at `path`.
pub fn create_base(fmt: Fmt, path: &Path, size: u64) -> Box<dyn BlockDevice> {
    let s = FileStorage::create(path).unwrap();
    match fmt {
        Fmt::Vhd => {
            let mut o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
            o.block_size = 512 * 1024;
            Box::new(vhd_format::VhdFile::create(s, &o).unwrap())
        }
        Fmt::Vhdx => {
            let mut o = vhdx_format::CreateOptions::dynamic(size);
            o.block_size = Some(1 << 20);
            Box::new(vhdx_format::create(s, &o).unwrap())
        }
    }
}

/// Creates a differencing child of `parent` at `path`, naming the parent by `relative` (a
/// path relative to the child's folder, as written into the locator).
pub fn create_child(fmt: Fmt, path: &Path, parent: &Path, relative: &str) -> Box<dyn BlockDevice> {
    let ps = FileStorage::open(parent, &OpenOptions::new().read_only(true)).unwrap();
    let s = FileStorage::create(path).unwrap();
    match fmt {
        Fmt::Vhd => {
            let d = vhd_format::VhdFile::open(ps, &vhd_format::OpenOptions::new().read_only(true))
                .unwrap()
                .details();
            let mut o = vhd_format::DifferencingOptions::for_parent(
                &d,
                parent.display().to_string(),
                Some(parent.display().to_string()),
                Some(relative.to_string()),
            );
            o.block_size = 512 * 1024;
            Box::new(vhd_format::VhdFile::create_differencing(s, &o).unwrap())
        }
        Fmt::Vhdx => {
            let d =
                vhdx_format::VhdxFile::open(ps, &vhdx_format::OpenOptions::new().read_only(true))
                    .unwrap()
                    .details();
            let pref = vhdx_format::ParentRef {
                data_write_guid: d.data_write_guid,
                relative_path: relative.to_string(),
                absolute_path: Some(parent.display().to_string()),
            };
            let mut o = vhdx_format::CreateOptions::differencing(d.virtual_size, pref);
            o.block_size = Some(1 << 20);
            o.logical_sector_size = d.logical_sector_size;
            Box::new(vhdx_format::create(s, &o).unwrap())
        }
    }
}

/// Random writes: whole blocks, partial blocks, single sectors, odd ranges.
pub fn random_writes(dev: &dyn BlockDevice, model: &mut [u8], rng: &mut ChaCha8Rng, n: usize) {
    let sectors = SIZE / 512;
    for _ in 0..n {
        let count = match rng.random_range(0..4) {
            0 => 1,
            1 => rng.random_range(1..16),
            2 => rng.random_range(16..600),
            _ => 2048,
        };
        let start = rng.random_range(0..sectors - count);
        let byte: u8 = rng.random_range(1..=255);
        let data: Vec<u8> = (0..count * 512)
            .map(|i| byte.wrapping_add((i / 512) as u8))
            .collect();
        dev.write_at(&data, start * 512).unwrap();
        model[(start * 512) as usize..((start + count) * 512) as usize].copy_from_slice(&data);
    }
    dev.flush().unwrap();
}

/// A chain of `depth` images in `dir` (`l0` the base ... `l{depth-1}` the top), each written
/// at random; returns the paths and the model of the disk as seen from each level.
pub fn build_chain(fmt: Fmt, dir: &Path, depth: usize, seed: u64) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut models = Vec::new();
    let mut model = vec![0u8; SIZE as usize];
    for level in 0..depth {
        let path = dir.join(format!("l{level}.{}", fmt.ext()));
        let dev = if level == 0 {
            create_base(fmt, &path, SIZE)
        } else {
            let parent = &paths[level - 1];
            let rel = format!(
                ".\\{}",
                Path::new(parent).file_name().unwrap().to_string_lossy()
            );
            create_child(fmt, &path, parent, &rel)
        };
        drop(dev);
        // Write through the chain, as a user of the library would.
        let disk = chain::Disk::open(&path, &chain::OpenOptions::new()).unwrap();
        random_writes(&disk, &mut model, &mut rng, 12);
        drop(disk);
        paths.push(path);
        models.push(model.clone());
    }
    (paths, models)
}

/// Reads the whole disk of `dev`.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = dev.info().virtual_size;
    let mut v = vec![0u8; size as usize];
    for (i, chunk) in v.chunks_mut(1 << 20).enumerate() {
        dev.read_at(chunk, i as u64 * (1 << 20)).unwrap();
    }
    v
}

/// Index of the first differing byte.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Reads a chain through libvhdi (python3-libvhdi, `set_parent`): `paths` top first. `None`
/// (with a loud warning) when libvhdi is missing, a failure under CI.
///
/// Reads go in 64 KiB pieces: libvhdi 20210425 misreads the last sector of a VHD block when
/// one read crosses into the next block (seen with 1 MiB reads over 512 KiB blocks).
pub fn libvhdi_read(paths: &[PathBuf], size: u64) -> Option<Vec<u8>> {
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import pyvhdi"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("python3-libvhdi is not installed; CI must install it");
        }
        eprintln!("!!! WARNING: python3-libvhdi not found; the libvhdi oracle is SKIPPED !!!");
        return None;
    }
    let script = r#"
import sys, pyvhdi
paths = sys.argv[2:]
files = []
for p in paths:
    f = pyvhdi.file(); f.open(p); files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
size = int(sys.argv[1]); top = files[0]; out = sys.stdout.buffer; off = 0
while off < size:
    n = min(1 << 16, size - off)
    out.write(top.read_buffer_at_offset(n, off)); off += n
"#;
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", script, &size.to_string()]);
    for p in paths {
        cmd.arg(p);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "libvhdi failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(o.stdout)
}

/// Length of a file.
pub fn file_len(p: &Path) -> u64 {
    FileStorage::open(p, &OpenOptions::new().read_only(true))
        .unwrap()
        .len()
        .unwrap()
}
