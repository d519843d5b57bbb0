//! Splitting a base image into a chain of differencing layers ordered by when a boot reads
//! them ([`split`]; `vdisk split`): a host that fetches the layers bottom first can start the
//! VM as soon as the bottom layer has arrived (issue 15, "stream").
//!
//! The source (raw, VHD, VHDX, or the top of a chain, read flattened) is cut into blocks of
//! [`SplitOptions::block_size`]. A block holding data goes into exactly one layer; a hole
//! (a run the source reports as zero or unallocated, or data that reads as zeros) goes into
//! none and stays a hole. Layer 0, the bottom, is a dynamic image; layer `k` is a
//! differencing child of layer `k - 1`. A chain reads a block from the topmost layer holding
//! it, and as no block is in two layers, the chain opened from the top reads exactly as the
//! source, with each layer only carrying its share. The source's data is read twice: once
//! to tell data from zeros (sources with large blocks report zeros as data), once to copy it.
//!
//! ## Block order
//!
//! Blocks named by the hot list ([`HotRange`], [`parse_hot_list`]) come first, in list order
//! (a block counted once, at its first mention); then every other block holding data, in
//! ascending order. Without a hot list the order is ascending: the first blocks go to the
//! bottom. Within a layer blocks are written in this order, so a layer file's early bytes are
//! the ones read first.
//!
//! ## Layer sizes
//!
//! Each layer gets an equal share of the data bytes (a block counts its data bytes, not its
//! holes), or, with [`SplitOptions::first_layer`], the bottom layer gets that many bytes and
//! the others equal shares of the rest. A layer takes whole blocks until it reaches its share
//! and always at least one, so `layers` can be at most the number of blocks holding data.
//!
//! ## Hot-list format
//!
//! Text, one access per line, in bytes of the virtual disk: `OFFSET LENGTH` (separated by
//! spaces or tabs) or `OFFSET+LENGTH`; decimal, or hexadecimal with `0x`. Blank lines and
//! lines starting with `#` are skipped. The JSON that `vdisk map --output json` prints is
//! accepted too, one object per line (`{"start": .., "length": .., "data": .., "depth": ..}`,
//! the `[`, `]` and `,` around them ignored): runs holding data in the top layer (`"data":
//! true` at depth 0, or without a depth) are accesses — the map of a copy-on-read child after
//! a boot names what the boot read. A line that is neither, or an access reaching past the
//! end of the disk, is refused naming its line number ([`SplitError::HotList`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus, FileStorage, LockMode};
use chain::{Disk, Format};

/// The default block size: 2 MiB, the differencing block size of Hyper-V and qemu-img.
pub const DEFAULT_SPLIT_BLOCK_SIZE: u32 = 2 << 20;

/// The format of the layers [`split`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitFormat {
    /// VHDX (`.vhdx`): a dynamic bottom, differencing layers above.
    Vhdx,
    /// VHD (`.vhd`): a dynamic bottom, differencing layers above.
    Vhd,
}

impl SplitFormat {
    /// The file extension of its layers.
    pub fn extension(self) -> &'static str {
        match self {
            SplitFormat::Vhdx => "vhdx",
            SplitFormat::Vhd => "vhd",
        }
    }
}

/// One recorded access of a hot list: `len` bytes at `offset` of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotRange {
    /// Where the access starts, in bytes.
    pub offset: u64,
    /// How many bytes it read.
    pub len: u64,
    /// Its line in the hot-list file (1-based), for messages.
    pub line: usize,
}

/// Where [`split`] is in its work, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitProgress {
    /// The layer being written (0 = bottom).
    pub layer: usize,
    /// How many layers there are.
    pub layers: usize,
    /// Data bytes copied so far, over all layers.
    pub done_bytes: u64,
    /// Data bytes to copy in all.
    pub total_bytes: u64,
}

/// A progress callback: called after every block.
pub type SplitProgressFn = Arc<dyn Fn(&SplitProgress) + Send + Sync>;

/// What [`split`] does.
#[derive(Clone)]
pub struct SplitOptions {
    /// How many layers to write (at least 1).
    pub layers: usize,
    /// Their format.
    pub format: SplitFormat,
    /// Layer `k` is written to `{prefix}-{k}.{vhdx|vhd}` (`k` zero-padded to the width of the
    /// top layer's number).
    pub prefix: PathBuf,
    /// Recorded accesses whose blocks go first (see the module docs).
    pub hot: Vec<HotRange>,
    /// Bytes for the bottom layer (`None`: equal shares).
    pub first_layer: Option<u64>,
    /// The unit of the split and the block size of every layer (a power of two, 1 MiB to
    /// 256 MiB; default 2 MiB).
    pub block_size: u32,
    /// Image locks on the source and the layers.
    pub lock: LockMode,
    /// Called after every block.
    pub progress: Option<SplitProgressFn>,
}

impl std::fmt::Debug for SplitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitOptions")
            .field("layers", &self.layers)
            .field("format", &self.format)
            .field("prefix", &self.prefix)
            .field("hot", &self.hot.len())
            .field("first_layer", &self.first_layer)
            .field("block_size", &self.block_size)
            .field("lock", &self.lock)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl SplitOptions {
    /// `layers` VHDX layers named after `prefix`, ascending order, equal shares, 2 MiB blocks.
    pub fn new(layers: usize, prefix: impl Into<PathBuf>) -> Self {
        SplitOptions {
            layers,
            format: SplitFormat::Vhdx,
            prefix: prefix.into(),
            hot: Vec::new(),
            first_layer: None,
            block_size: DEFAULT_SPLIT_BLOCK_SIZE,
            lock: LockMode::Auto,
            progress: None,
        }
    }

    /// The paths of the layers, bottom first.
    pub fn layer_paths(&self) -> Vec<PathBuf> {
        let width = self.layers.saturating_sub(1).to_string().len();
        let ext = self.format.extension();
        (0..self.layers)
            .map(|k| {
                let mut name = self.prefix.as_os_str().to_owned();
                name.push(format!("-{k:0width$}.{ext}"));
                PathBuf::from(name)
            })
            .collect()
    }
}

/// One layer [`split`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitLayer {
    /// Its file.
    pub path: PathBuf,
    /// Blocks it holds.
    pub blocks: u64,
    /// Data bytes it holds (its blocks' data, holes not counted).
    pub data_bytes: u64,
    /// Of its blocks, those from the hot list.
    pub hot_blocks: u64,
}

/// What [`split`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitReport {
    /// The layers, bottom first.
    pub layers: Vec<SplitLayer>,
    /// The source's virtual size.
    pub virtual_size: u64,
    /// The block size of the split.
    pub block_size: u32,
    /// Blocks of the source holding data.
    pub data_blocks: u64,
    /// Of those, the ones the hot list named.
    pub hot_blocks: u64,
    /// Data bytes of the source.
    pub data_bytes: u64,
}

/// Why [`split`] refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A hot-list line is malformed or reaches past the disk's end.
    #[error("hot list line {line}: {reason}")]
    HotList {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The hot-list file could not be read.
    #[error("cannot read the hot list {path}")]
    HotListRead {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// `layers` is 0.
    #[error("a split needs at least one layer")]
    NoLayers,
    /// More layers than blocks holding data: a layer would be empty.
    #[error("{layers} layers asked, but the source has only {blocks} blocks of data")]
    TooManyLayers {
        /// Layers asked.
        layers: usize,
        /// Blocks of the source holding data.
        blocks: u64,
    },
    /// The block size is not a power of two from 1 MiB to 256 MiB.
    #[error("block size {0} is not a power of two from 1 MiB to 256 MiB")]
    BlockSize(u32),
    /// The source's size is not a whole number of the layers' sectors.
    #[error("the source's size {size} is not a multiple of {sector} bytes")]
    Unaligned {
        /// The source's virtual size.
        size: u64,
        /// The sector size the layers need.
        sector: u32,
    },
    /// A layer would overwrite a file that exists.
    #[error("{0} exists")]
    DestinationExists(PathBuf),
    /// A layer would overwrite the source or one of its parents.
    #[error("{0} is the source (or one of its layers)")]
    DestinationIsSource(PathBuf),
    /// The source could not be opened.
    #[error("cannot open the source")]
    Source(#[source] Box<chain::ChainError>),
    /// Reading the source failed.
    #[error("cannot read the source at offset {offset}")]
    Read {
        /// Where.
        offset: u64,
        /// What the device said.
        #[source]
        source: block_io::Error,
    },
    /// The source reported an empty status run (a malformed image).
    #[error("the source reports an empty run at offset {0}")]
    EmptyRun(u64),
    /// Creating, writing or reopening a layer failed.
    #[error("cannot {op} {path}")]
    Layer {
        /// `create`, `write` or `flush`.
        op: &'static str,
        /// The layer.
        path: PathBuf,
        /// What failed.
        #[source]
        source: block_io::Error,
    },
    /// A layer just written could not be opened again to read its identity.
    #[error("cannot reopen {path}")]
    Reopen {
        /// The layer.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<chain::ChainError>,
    },
    /// A layer's parent paths could not be resolved.
    #[error("cannot resolve the parent path of {path}")]
    ParentPath {
        /// The child.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Parses a hot list (format in the module docs); every range is returned as written,
/// checked against the disk only by [`split`].
pub fn parse_hot_list(text: &str) -> Result<Vec<HotRange>, SplitError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let bad = |reason: String| SplitError::HotList { line, reason };
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        let json = s.trim_start_matches(['[', ',']).trim_start();
        if json.len() != s.len() || json.starts_with('{') || json.starts_with(']') {
            if let Some(r) = parse_map_line(json).map_err(bad)? {
                out.push(HotRange {
                    offset: r.0,
                    len: r.1,
                    line,
                });
            }
            continue;
        }
        let (a, b) = match s.split_once('+') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => {
                let mut it = s.split_whitespace();
                match (it.next(), it.next(), it.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => {
                        return Err(bad(format!(
                            "expected 'OFFSET LENGTH' or 'OFFSET+LENGTH', found '{s}'"
                        )))
                    }
                }
            }
        };
        let offset = parse_number(a).map_err(|e| bad(format!("offset: {e}")))?;
        let len = parse_number(b).map_err(|e| bad(format!("length: {e}")))?;
        if offset.checked_add(len).is_none() {
            return Err(bad(format!("{offset}+{len} overflows")));
        }
        out.push(HotRange { offset, len, line });
    }
    Ok(out)
}

/// Reads and parses a hot-list file.
pub fn read_hot_list(path: &Path) -> Result<Vec<HotRange>, SplitError> {
    let text = fs::read_to_string(path).map_err(|source| SplitError::HotListRead {
        path: path.to_path_buf(),
        source,
    })?;
    parse_hot_list(&text)
}

fn parse_number(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse::<u64>(),
    };
    r.map_err(|e| format!("'{s}' is not a byte count ({e})"))
}

/// One line of `vdisk map --output json`: `Some((start, length))` for a data run of the top
/// layer, `None` for other runs and for a lone `]`.
fn parse_map_line(s: &str) -> Result<Option<(u64, u64)>, String> {
    let s = s.trim_end_matches([']', ',']).trim_end();
    if s.is_empty() || s == "]" {
        return Ok(None);
    }
    let body = s
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| format!("not a JSON object: '{s}'"))?;
    let field = |name: &str| -> Option<&str> {
        body.split(',').find_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            (k.trim().trim_matches('"') == name).then(|| v.trim().trim_matches('"'))
        })
    };
    if field("data") != Some("true") {
        return Ok(None);
    }
    if let Some(d) = field("depth") {
        if d != "0" {
            return Ok(None);
        }
    }
    let start = field("start").ok_or("a map run without \"start\"")?;
    let length = field("length").ok_or("a map run without \"length\"")?;
    let start = parse_number(start).map_err(|e| format!("start: {e}"))?;
    let length = parse_number(length).map_err(|e| format!("length: {e}"))?;
    if start.checked_add(length).is_none() {
        return Err(format!("{start}+{length} overflows"));
    }
    Ok(Some((start, length)))
}

/// Which blocks go to which layer.
#[derive(Debug)]
struct Plan {
    /// Data bytes of every block of the disk (0: a hole).
    data: Vec<u32>,
    /// Blocks holding data, in split order.
    order: Vec<u64>,
    /// How many of `order`'s first blocks came from the hot list.
    hot: usize,
    /// Where each layer's blocks end in `order` (exclusive), bottom first.
    ends: Vec<usize>,
}

/// Data bytes of every block: the bytes of the runs the source reports as data, counted
/// only where they do not read as zeros (a fully allocated image, or a format with large
/// blocks, reports zeros as data), so such blocks stay holes.
fn scan(dev: &dyn BlockDevice, size: u64, bs: u64) -> Result<Vec<u32>, SplitError> {
    let nblocks = usize::try_from(size.div_ceil(bs))
        .map_err(|_| SplitError::Unaligned { size, sector: 512 })?;
    let mut data = vec![0u32; nblocks];
    let mut buf = vec![0u8; bs as usize];
    let mut pos = 0;
    while pos < size {
        let run = dev
            .block_status(pos, size - pos)
            .map_err(|source| SplitError::Read {
                offset: pos,
                source,
            })?;
        if run.len == 0 {
            return Err(SplitError::EmptyRun(pos));
        }
        let end = pos.saturating_add(run.len).min(size);
        if run.status == BlockStatus::Data {
            let mut p = pos;
            while p < end {
                let b = p / bs;
                // At most one block: fits the buffer and a u32.
                let n = ((b + 1) * bs).min(end) - p;
                let piece = &mut buf[..n as usize];
                dev.read_at(piece, p)
                    .map_err(|source| SplitError::Read { offset: p, source })?;
                if piece.iter().any(|&x| x != 0) {
                    if let Some(d) = usize::try_from(b).ok().and_then(|b| data.get_mut(b)) {
                        *d = d.saturating_add(n as u32);
                    }
                }
                p += n;
            }
        }
        pos = end;
    }
    Ok(data)
}

fn plan(
    data: Vec<u32>,
    hot: &[HotRange],
    size: u64,
    bs: u64,
    opts: &SplitOptions,
) -> Result<Plan, SplitError> {
    let mut taken = vec![false; data.len()];
    let mut order = Vec::new();
    for h in hot {
        let end = h.offset.saturating_add(h.len);
        if end > size {
            return Err(SplitError::HotList {
                line: h.line,
                reason: format!(
                    "{}+{} reaches past the disk's end ({size} bytes)",
                    h.offset, h.len
                ),
            });
        }
        if h.len == 0 {
            continue;
        }
        for b in h.offset / bs..=(end - 1) / bs {
            let i = b as usize; // < data.len(): end <= size
            if data.get(i).is_some_and(|&d| d > 0) && !taken[i] {
                taken[i] = true;
                order.push(b);
            }
        }
    }
    let hot_count = order.len();
    for (i, &d) in data.iter().enumerate() {
        if d > 0 && !taken[i] {
            order.push(i as u64);
        }
    }
    let n = opts.layers;
    if n == 0 {
        return Err(SplitError::NoLayers);
    }
    if n > order.len() {
        return Err(SplitError::TooManyLayers {
            layers: n,
            blocks: order.len() as u64,
        });
    }
    let bytes = |b: u64| u64::from(data[b as usize]);
    let mut remaining: u64 = order.iter().map(|&b| bytes(b)).sum();
    let mut ends = Vec::with_capacity(n);
    let mut i = 0;
    for k in 0..n {
        let left = n - k;
        if left == 1 {
            ends.push(order.len());
            break;
        }
        let target = match (k, opts.first_layer) {
            (0, Some(f)) => f,
            _ => remaining.div_ceil(left as u64),
        };
        // Leave at least one block for each layer above.
        let limit = order.len() - (left - 1);
        let mut acc = 0u64;
        let start = i;
        while i < limit && (i == start || acc < target) {
            acc += bytes(order[i]);
            i += 1;
        }
        remaining -= acc;
        ends.push(i);
    }
    Ok(Plan {
        data,
        order,
        hot: hot_count,
        ends,
    })
}

/// Splits `source` (any image or chain top, read flattened) into the chain
/// [`SplitOptions::layer_paths`] names: see the module docs. The layers are created new: a
/// path that exists, or names the source or one of its parents, is refused before anything
/// is written. On failure the layers created so far are removed.
pub fn split(source: &Path, opts: &SplitOptions) -> Result<SplitReport, SplitError> {
    let bs32 = opts.block_size;
    if !bs32.is_power_of_two() || !(1 << 20..=256 << 20).contains(&bs32) {
        return Err(SplitError::BlockSize(bs32));
    }
    if opts.layers == 0 {
        return Err(SplitError::NoLayers);
    }
    let bs = u64::from(bs32);
    let disk = Disk::open(
        source,
        &chain::OpenOptions::new().read_only(true).lock(opts.lock),
    )
    .map_err(|e| SplitError::Source(Box::new(e)))?;
    let info = disk.info();
    let size = info.virtual_size;
    let sector = match opts.format {
        SplitFormat::Vhd => 512,
        SplitFormat::Vhdx if info.logical_sector_size == 4096 => 4096,
        SplitFormat::Vhdx => 512,
    };
    if size % u64::from(sector) != 0 {
        return Err(SplitError::Unaligned { size, sector });
    }
    let paths = opts.layer_paths();
    let sources: Vec<PathBuf> = disk
        .layers()
        .iter()
        .map(|l| crate::new_layer::canonical_target(&l.path))
        .collect();
    for p in &paths {
        if sources.contains(&crate::new_layer::canonical_target(p)) {
            return Err(SplitError::DestinationIsSource(p.clone()));
        }
        if fs::symlink_metadata(p).is_ok() {
            return Err(SplitError::DestinationExists(p.clone()));
        }
    }
    let data = scan(&disk, size, bs)?;
    let plan = plan(data, &opts.hot, size, bs, opts)?;
    let mut created = Vec::new();
    let r = write_layers(
        &disk,
        &plan,
        &paths,
        sector,
        info.physical_sector_size,
        opts,
        &mut created,
    );
    if r.is_err() {
        for p in &created {
            let _ = fs::remove_file(p);
        }
    }
    let layers = r?;
    Ok(SplitReport {
        layers,
        virtual_size: size,
        block_size: bs32,
        data_blocks: plan.order.len() as u64,
        hot_blocks: plan.hot as u64,
        data_bytes: plan
            .order
            .iter()
            .map(|&b| u64::from(plan.data[b as usize]))
            .sum(),
    })
}

fn layer_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(block_io::Error) -> SplitError + 'a {
    move |source| SplitError::Layer {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates layer `k` at `path` (the child of `parent` above the bottom) and opens it writable.
fn create_layer(
    path: &Path,
    parent: Option<&Path>,
    size: u64,
    sector: u32,
    physical: u32,
    opts: &SplitOptions,
) -> Result<Arc<dyn BlockDevice>, SplitError> {
    // Claim the name: a file that appeared since the check is not overwritten.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SplitError::DestinationExists(path.to_path_buf()),
            _ => layer_err("create", path)(e.into()),
        })?;
    let parent_id = match parent {
        None => None,
        Some(pp) => {
            let l = chain::open_layer_with(
                pp,
                Some(match opts.format {
                    SplitFormat::Vhdx => Format::Vhdx,
                    SplitFormat::Vhd => Format::Vhd,
                }),
                &chain::LayerOptions {
                    read_only: true,
                    parent: true,
                    lock: opts.lock,
                    ..Default::default()
                },
            )
            .map_err(|source| SplitError::Reopen {
                path: pp.to_path_buf(),
                source: Box::new(source),
            })?;
            let (rel, abs) =
                chain::parent_paths(path, pp).map_err(|source| SplitError::ParentPath {
                    path: path.to_path_buf(),
                    source,
                })?;
            Some((l.identity, rel, abs.display().to_string()))
        }
    };
    let storage = FileStorage::open(
        path,
        &block_io::OpenOptions::new().truncate(true).lock(opts.lock),
    )
    .map_err(layer_err("create", path))?;
    let g = crate::new_layer::Geometry {
        vhdx: opts.format == SplitFormat::Vhdx,
        size,
        block_size: Some(opts.block_size),
        sector,
        physical,
    };
    let made = crate::new_layer::create(storage, &g, parent_id)
        .map_err(|e| layer_err("create", path)(e.into_block_error()))?;
    Ok(made.into_device())
}

#[allow(clippy::too_many_arguments)]
fn write_layers(
    disk: &Disk,
    plan: &Plan,
    paths: &[PathBuf],
    sector: u32,
    physical: u32,
    opts: &SplitOptions,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<SplitLayer>, SplitError> {
    let size = disk.info().virtual_size;
    let bs = u64::from(opts.block_size);
    let total: u64 = plan
        .order
        .iter()
        .map(|&b| u64::from(plan.data[b as usize]))
        .sum();
    let mut done = 0u64;
    let mut buf = vec![0u8; opts.block_size as usize];
    let mut out = Vec::with_capacity(paths.len());
    let mut start = 0;
    for (k, (path, &end)) in paths.iter().zip(&plan.ends).enumerate() {
        let parent = k.checked_sub(1).and_then(|p| paths.get(p));
        let dev = create_layer(
            path,
            parent.map(PathBuf::as_path),
            size,
            sector,
            physical,
            opts,
        )
        .inspect_err(|e| {
            if !matches!(e, SplitError::DestinationExists(_)) {
                created.push(path.clone());
            }
        })?;
        created.push(path.clone());
        let mut layer = SplitLayer {
            path: path.clone(),
            blocks: 0,
            data_bytes: 0,
            hot_blocks: 0,
        };
        for (i, &b) in plan.order.iter().enumerate().take(end).skip(start) {
            let bstart = b * bs;
            let bend = (bstart + bs).min(size);
            let mut pos = bstart;
            while pos < bend {
                let run =
                    disk.block_status(pos, bend - pos)
                        .map_err(|source| SplitError::Read {
                            offset: pos,
                            source,
                        })?;
                if run.len == 0 {
                    return Err(SplitError::EmptyRun(pos));
                }
                let n = run.len.min(bend - pos);
                if run.status == BlockStatus::Data {
                    let piece = &mut buf[..n as usize];
                    disk.read_at(piece, pos)
                        .map_err(|source| SplitError::Read {
                            offset: pos,
                            source,
                        })?;
                    if piece.iter().any(|&x| x != 0) {
                        dev.write_at(piece, pos).map_err(layer_err("write", path))?;
                    }
                }
                pos += n;
            }
            let d = u64::from(plan.data[b as usize]);
            layer.blocks += 1;
            layer.data_bytes += d;
            if i < plan.hot {
                layer.hot_blocks += 1;
            }
            done += d;
            if let Some(cb) = &opts.progress {
                cb(&SplitProgress {
                    layer: k,
                    layers: paths.len(),
                    done_bytes: done,
                    total_bytes: total,
                });
            }
        }
        dev.flush().map_err(layer_err("flush", path))?;
        drop(dev);
        start = end;
        out.push(layer);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_list_forms() {
        let t = "# boot\n0 4096\n\n0x10000+512\n 1048576\t65536 \n";
        let r = parse_hot_list(t).unwrap();
        assert_eq!(
            r,
            vec![
                HotRange {
                    offset: 0,
                    len: 4096,
                    line: 2
                },
                HotRange {
                    offset: 0x10000,
                    len: 512,
                    line: 4
                },
                HotRange {
                    offset: 1 << 20,
                    len: 65536,
                    line: 5
                },
            ]
        );
    }

    #[test]
    fn hot_list_map_json() {
        let t = "[\n{\"start\":0,\"length\":65536,\"depth\":0,\"present\":true,\"zero\":false,\"data\":true,\"compressed\":false,\"offset\":1234},\n{\"start\":65536,\"length\":512,\"depth\":0,\"present\":true,\"zero\":true,\"data\":false,\"compressed\":false},\n{\"start\":66048,\"length\":512,\"depth\":1,\"present\":true,\"zero\":false,\"data\":true,\"compressed\":false}]\n";
        let r = parse_hot_list(t).unwrap();
        assert_eq!(
            r,
            vec![HotRange {
                offset: 0,
                len: 65536,
                line: 2
            }]
        );
    }

    #[test]
    fn hot_list_bad_lines_named() {
        for (t, line) in [
            ("0 1\nabc 5\n", 2),
            ("0 1 2\n", 1),
            ("\n\n18446744073709551615+1\n", 3),
            ("5\n", 1),
            ("0x+1\n", 1),
            ("{\"start\":1,\"data\":true}\n", 1),
        ] {
            match parse_hot_list(t) {
                Err(SplitError::HotList { line: l, .. }) => assert_eq!(l, line, "{t:?}"),
                other => panic!("{t:?}: {other:?}"),
            }
        }
    }

    fn opts(n: usize) -> SplitOptions {
        SplitOptions::new(n, "x")
    }

    #[test]
    fn plan_orders_hot_first_then_ascending() {
        let mb = 1u64 << 20;
        let data = vec![100, 0, 200, 300, 0, 400];
        let hot = [
            HotRange {
                offset: 5 * mb,
                len: 10,
                line: 1,
            },
            HotRange {
                offset: mb,
                len: 2 * mb + 1,
                line: 2,
            }, // blocks 1 (hole), 2, 3
            HotRange {
                offset: 5 * mb,
                len: 1,
                line: 3,
            }, // again: counted once
        ];
        let p = plan(data, &hot, 6 * mb, mb, &opts(2)).unwrap();
        assert_eq!(p.order, vec![5, 2, 3, 0]);
        assert_eq!(p.hot, 3);
        // 1000 bytes, shares of 500: 400 + 200 reaches it.
        assert_eq!(p.ends, vec![2, 4]);
    }

    #[test]
    fn plan_first_layer_and_limits() {
        let data = vec![10; 8];
        let mut o = opts(3);
        o.first_layer = Some(15);
        let p = plan(data.clone(), &[], 8 << 20, 1 << 20, &o).unwrap();
        assert_eq!(p.ends, vec![2, 5, 8]);
        // A huge first layer still leaves a block for each layer above.
        o.first_layer = Some(1 << 40);
        let p = plan(data.clone(), &[], 8 << 20, 1 << 20, &o).unwrap();
        assert_eq!(p.ends, vec![6, 7, 8]);
        assert!(matches!(
            plan(data.clone(), &[], 8 << 20, 1 << 20, &opts(9)),
            Err(SplitError::TooManyLayers {
                layers: 9,
                blocks: 8
            })
        ));
        assert!(matches!(
            plan(data.clone(), &[], 8 << 20, 1 << 20, &opts(0)),
            Err(SplitError::NoLayers)
        ));
        let past = [HotRange {
            offset: 8 << 20,
            len: 1,
            line: 7,
        }];
        assert!(matches!(
            plan(data, &past, 8 << 20, 1 << 20, &opts(1)),
            Err(SplitError::HotList { line: 7, .. })
        ));
    }

    #[test]
    fn layer_names() {
        let mut o = SplitOptions::new(12, "/tmp/base");
        o.format = SplitFormat::Vhd;
        let p = o.layer_paths();
        assert_eq!(p[0], PathBuf::from("/tmp/base-00.vhd"));
        assert_eq!(p[11], PathBuf::from("/tmp/base-11.vhd"));
    }
}
