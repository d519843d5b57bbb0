//! Differencing chains of VHD or VHDX files for the commit tests: a base and children, each
//! layer holding random sparse data (whole blocks, single sectors, zeroed runs), with a byte
//! model of what the top reads.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use block_io::{BlockDevice, FileStorage, OpenOptions as FileOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vhd,
    Vhdx,
}

impl Kind {
    pub fn ext(self) -> &'static str {
        match self {
            Kind::Vhd => "vhd",
            Kind::Vhdx => "vhdx",
        }
    }
}

/// Block size of every layer (VHDX minimum; VHD likewise).
pub const BLOCK: u32 = 1 << 20;

/// Layer `i` of a chain in `dir` (0 = base).
pub fn layer_path(dir: &Path, kind: Kind, i: usize) -> PathBuf {
    dir.join(format!("l{i}.{}", kind.ext()))
}

/// Random changes of a layer: data at sector granularity, and zeroed ranges.
fn scribble(dev: &dyn BlockDevice, model: &mut [u8], rng: &mut ChaCha8Rng, base: bool) {
    let size = model.len() as u64;
    let n = rng.random_range(8..32);
    for _ in 0..n {
        let sectors = match rng.random_range(0..4) {
            0 => rng.random_range(1..8),
            1 => rng.random_range(8..64),
            2 => 128,
            _ => rng.random_range(64..600),
        };
        let len = (sectors * 512).min(size);
        let off = rng.random_range(0..(size - len) / 512 + 1) * 512;
        let (o, l) = (off as usize, len as usize);
        if !base && rng.random_range(0..6) == 0 {
            dev.write_zeroes(off, len, rng.random_bool(0.5)).unwrap();
            model[o..o + l].fill(0);
        } else {
            let k: u8 = rng.random_range(1..=255);
            let data: Vec<u8> = (0..l)
                .map(|i| k ^ (i / 512) as u8 ^ (i as u8).wrapping_mul(7))
                .collect();
            dev.write_at(&data, off).unwrap();
            model[o..o + l].copy_from_slice(&data);
        }
    }
    dev.flush().unwrap();
}

/// Creates a dynamic base image of `kind` at `path` (block size [`BLOCK`]), lets `fill` write
/// into it, flushes and closes it.
pub fn create_base(path: &Path, kind: Kind, size: u64, fill: impl FnOnce(&dyn BlockDevice)) {
    let _ = std::fs::remove_file(path);
    let storage = FileStorage::create(path).unwrap();
    match kind {
        Kind::Vhdx => {
            let mut o = vhdx_format::CreateOptions::dynamic(size);
            o.block_size = Some(BLOCK);
            let f = vhdx_format::create(storage, &o).unwrap();
            fill(&f);
            f.flush().unwrap();
            f.close().unwrap();
        }
        Kind::Vhd => {
            let mut o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
            o.block_size = BLOCK;
            let f = vhd_format::VhdFile::create(storage, &o).unwrap();
            fill(&f);
            f.flush().unwrap();
            f.close().unwrap();
        }
    }
}

/// Creates a differencing image of `kind` at `path` over `parent` (same kind, named by its
/// file name relative to the child and by its path), lets `fill` write into it (a VHD child
/// written directly, not through a chain, takes whole-sector data writes only), flushes and
/// closes it.
pub fn create_child(
    path: &Path,
    kind: Kind,
    parent: &Path,
    size: u64,
    fill: impl FnOnce(&dyn BlockDevice),
) {
    let _ = std::fs::remove_file(path);
    let storage = FileStorage::create(path).unwrap();
    let ps = FileStorage::open(parent, &FileOptions::new().read_only(true)).unwrap();
    let name = parent.file_name().unwrap().to_string_lossy().into_owned();
    match kind {
        Kind::Vhdx => {
            let d =
                vhdx_format::VhdxFile::open(ps, &vhdx_format::OpenOptions::new().read_only(true))
                    .unwrap()
                    .details();
            let pref = vhdx_format::ParentRef {
                data_write_guid: d.data_write_guid,
                relative_path: format!(".\\{name}"),
                absolute_path: Some(parent.display().to_string()),
            };
            let mut o = vhdx_format::CreateOptions::differencing(size, pref);
            o.block_size = Some(BLOCK);
            let f = vhdx_format::create(storage, &o).unwrap();
            fill(&f);
            f.flush().unwrap();
            f.close().unwrap();
        }
        Kind::Vhd => {
            let d = vhd_format::VhdFile::open(ps, &vhd_format::OpenOptions::new().read_only(true))
                .unwrap()
                .details();
            let mut o = vhd_format::DifferencingOptions::for_parent(
                &d,
                parent.display().to_string(),
                Some(parent.display().to_string()),
                Some(format!(".\\{name}")),
            );
            o.block_size = BLOCK;
            let f = vhd_format::VhdFile::create_differencing(storage, &o).unwrap();
            fill(&f);
            f.flush().unwrap();
            f.close().unwrap();
        }
    }
}

/// Creates a chain of `depth` layers (base first) in `dir` of `size` bytes; returns the top's
/// path and the model of what it reads.
pub fn build(dir: &Path, kind: Kind, depth: usize, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0ffee);
    let mut model = vec![0u8; size as usize];
    for i in 0..depth {
        let path = layer_path(dir, kind, i);
        // A VHD child written directly gets whole-sector data writes only: zeroing needs
        // the parent, so it is scribbled on as a base is.
        let as_base = i == 0 || kind == Kind::Vhd;
        let fill = |f: &dyn BlockDevice| scribble(f, &mut model, &mut rng, as_base);
        if i == 0 {
            create_base(&path, kind, size, fill);
        } else {
            create_child(&path, kind, &layer_path(dir, kind, i - 1), size, fill);
        }
    }
    (layer_path(dir, kind, depth - 1), model)
}

/// Every byte of `dev`.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.info().virtual_size as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// 4 KiB blocks that differ.
pub fn diff_blocks(a: &[u8], b: &[u8]) -> usize {
    a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count()
}
