//! [`Disk`]: an image with its parents as one [`BlockDevice`].
//!
//! Reads fall through the layers sector-exactly: for each run the top layer reports
//! ([`BlockDevice::block_status`]), `Data` is read from that layer, `Zero` is zeros, and
//! `Unallocated` is asked of the next layer down (a base layer's `Unallocated` reads as
//! zeros; so does anything past the end of a parent smaller than its child). Writes, zeroing,
//! discards and flushes go to the top layer only; parents are opened read-only and never
//! written.
//!
//! One adjustment for interoperability: when the top is a VHD differencing image, writes that
//! do not cover whole 4 KiB groups are widened to them with the surrounding bytes read through
//! the chain, so every sector-bitmap byte the chain writes is all-present or all-absent. The
//! data is the same either way; libvhdi (the independent reader of differencing VHDs) reads
//! the remaining sectors of a partly-set bitmap byte from the child instead of the parent,
//! and whole bytes keep it, and any other byte-granular reader, right. Widened writes hold the
//! 4 KiB groups they rewrite exclusively (aligned writes hold theirs shared), so concurrent
//! writes to neighbouring sectors cannot lose each other.

use std::collections::HashSet;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use block_io::{
    push_mapping, BlockDevice, BlockStatus, DiskInfo, LockMode, Mapping, RangeLock, Result,
    StatusRun,
};

use crate::cache::{ResolutionCache, ZEROS};
use crate::detect::Format;
use crate::error::ChainError;
use crate::layer::{open_layer_with, Layer, LayerOptions};
use crate::policy::PathPolicy;
use crate::remote::RemoteParents;

/// How to open a chain.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open the top read-only (parents are always read-only).
    pub read_only: bool,
    /// The top's format; `None` detects by content. Parents are always detected.
    pub format: Option<Format>,
    /// Where parents may live.
    pub policy: PathPolicy,
    /// Most layers in a chain, the top included (default 64).
    pub max_depth: usize,
    /// Open even if a parent's identity does not match what its child recorded.
    pub ignore_lineage: bool,
    /// Use `O_DIRECT` for every layer.
    pub direct: bool,
    /// No readahead on any layer: what a disk served to a guest through the page cache wants
    /// (see [`block_io::OpenOptions::random_access`]).
    pub random_access: bool,
    /// Image locks on every layer (default [`LockMode::Auto`]; [`LockMode::Off`] is
    /// `-U`/force share). See [`open_layer_with`] for what each layer takes.
    pub lock: LockMode,
    /// Whether parents named by URL are opened (default [`RemoteParents::Deny`]; see
    /// [`crate::remote`]).
    pub remote_parents: RemoteParents,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            format: None,
            policy: PathPolicy::default(),
            max_depth: 64,
            ignore_lineage: false,
            direct: false,
            random_access: false,
            lock: LockMode::Auto,
            remote_parents: RemoteParents::Deny,
        }
    }
}

impl OpenOptions {
    /// Writable top, default policy, depth 64, lineage enforced.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets [`read_only`](Self::read_only).
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }
    /// Sets [`format`](Self::format).
    pub fn format(mut self, f: Option<Format>) -> Self {
        self.format = f;
        self
    }
    /// Sets [`policy`](Self::policy).
    pub fn policy(mut self, p: PathPolicy) -> Self {
        self.policy = p;
        self
    }
    /// Sets [`max_depth`](Self::max_depth).
    pub fn max_depth(mut self, n: usize) -> Self {
        self.max_depth = n;
        self
    }
    /// Sets [`ignore_lineage`](Self::ignore_lineage).
    pub fn ignore_lineage(mut self, yes: bool) -> Self {
        self.ignore_lineage = yes;
        self
    }
    /// Sets [`lock`](Self::lock).
    pub fn lock(mut self, mode: LockMode) -> Self {
        self.lock = mode;
        self
    }
    /// Sets [`remote_parents`](Self::remote_parents).
    pub fn remote_parents(mut self, r: RemoteParents) -> Self {
        self.remote_parents = r;
        self
    }
}

/// How one link of a chain checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCheck {
    /// The parent is the one the child recorded.
    Verified,
    /// The parent's identity differs (opened anyway by override); the message names both ids.
    Mismatch(String),
}

/// An image with its parents.
#[derive(Debug)]
pub struct Disk {
    layers: Vec<Layer>,
    /// `links[i]` is how layer `i` links to layer `i + 1`.
    links: Vec<LinkCheck>,
    info: DiskInfo,
    /// Set when writes to the top are widened to 4 KiB groups (VHD differencing top).
    widen: Option<RangeLock>,
    /// Where 4 KiB groups of the layers below the top resolve (they never change).
    cache: ResolutionCache,
    /// Each layer's virtual size (fixed while open; read on every request).
    sizes: Vec<u64>,
    /// The first layer `cache` covers: 1, or 0 when the whole chain is read-only (then the
    /// top never changes either and reads skip its lookup on a cache hit).
    cache_from: usize,
}

/// The granularity writes to a VHD differencing top are widened to (and of the cache).
use crate::cache::GROUP;

/// The (device, inode) of an existing file, following symlinks: what tells two names of one
/// file apart from two files. `None` when there is no such file.
pub fn file_key(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Disk {
    /// Opens `path` and its parents.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Disk, ChainError> {
        let path = path.as_ref();
        let top_opts = LayerOptions {
            read_only: opts.read_only,
            direct: opts.direct,
            random_access: opts.random_access,
            lock: opts.lock,
            parent: false,
        };
        let top = match path.to_str().filter(|s| crate::remote::is_url(s)) {
            Some(url) => crate::remote::open_top(url, opts.format, opts.read_only)?,
            None => open_layer_with(path, opts.format, &top_opts)?,
        };
        let mut seen: HashSet<(u64, u64)> = file_key(path).into_iter().collect();
        let mut layers = vec![top];
        let mut links = Vec::new();
        loop {
            let child = &layers[layers.len() - 1];
            let Some(link) = child.parent.clone() else {
                break;
            };
            if layers.len() >= opts.max_depth.max(1) {
                return Err(ChainError::TooDeep {
                    top: path.to_path_buf(),
                    max: opts.max_depth,
                });
            }
            let child_path = child.path.clone();
            // A parent named by URL (see crate::remote); else, or when that is refused, a
            // local one.
            let remote = crate::remote::resolve_parent(
                &child_path,
                child.format,
                &link.candidates,
                opts.remote_parents,
            );
            let (parent_path, parent) = match remote {
                Ok(Some(parent)) => (parent.path.clone(), parent),
                remote => {
                    let parent_path: PathBuf = opts
                        .policy
                        .resolve(&child_path, &link.candidates)
                        .map_err(|tried| match remote {
                        Err(refused) => refused,
                        Ok(_) => ChainError::ParentNotFound {
                            child: child_path.clone(),
                            tried,
                        },
                    })?;
                    if let Some(key) = file_key(&parent_path) {
                        if !seen.insert(key) {
                            return Err(ChainError::Loop {
                                child: child_path,
                                parent: parent_path,
                            });
                        }
                    }
                    let parent_opts = LayerOptions {
                        parent: true,
                        ..top_opts
                    };
                    let parent = open_layer_with(&parent_path, None, &parent_opts)?;
                    (parent_path, parent)
                }
            };
            check_geometry(child, &parent)?;
            let check = if link.expected.matches(&parent.identity) {
                LinkCheck::Verified
            } else {
                let e = ChainError::LineageMismatch {
                    child: child_path,
                    parent: parent_path,
                    expected: link.expected.to_string(),
                    found: parent.identity.to_string(),
                };
                if !opts.ignore_lineage {
                    return Err(e);
                }
                LinkCheck::Mismatch(e.to_string())
            };
            links.push(check);
            layers.push(parent);
        }
        let mut info = layers[0].dev.info();
        info.read_only |= opts.read_only;
        let widen = (layers[0].format == Format::Vhd && layers.len() > 1 && !info.read_only)
            .then(|| RangeLock::new(GROUP));
        Ok(Disk {
            cache: ResolutionCache::new(if layers.len() > 1 { 16 } else { 0 }),
            sizes: layers.iter().map(|l| l.dev.info().virtual_size).collect(),
            cache_from: usize::from(!info.read_only),
            layers,
            links,
            info,
            widen,
        })
    }

    /// A chain of layers already open, top first: the top as it was opened (writable or
    /// not), each link checked for geometry and lineage as [`Disk::open`] checks it (a
    /// mismatch is [`ChainError::LineageMismatch`] unless `ignore_lineage`). Parents are not
    /// resolved: `layers` is the whole chain. For jobs that make a layer the new top (a merge
    /// pivots onto its base, reopened writable) and for chains over other storage (tests on
    /// the fault-injecting backend).
    pub fn from_layers(layers: Vec<Layer>, ignore_lineage: bool) -> Result<Disk, ChainError> {
        let Some(top) = layers.first() else {
            return Err(ChainError::Geometry {
                child: PathBuf::new(),
                parent: PathBuf::new(),
                why: "a chain needs at least one layer".into(),
            });
        };
        let mut links = Vec::new();
        for pair in layers.windows(2) {
            let (child, parent) = (&pair[0], &pair[1]);
            check_geometry(child, parent)?;
            let check = match &child.parent {
                Some(link) if link.expected.matches(&parent.identity) => LinkCheck::Verified,
                link => {
                    let e = ChainError::LineageMismatch {
                        child: child.path.clone(),
                        parent: parent.path.clone(),
                        expected: link
                            .as_ref()
                            .map_or("no parent".to_string(), |l| l.expected.to_string()),
                        found: parent.identity.to_string(),
                    };
                    if !ignore_lineage {
                        return Err(e);
                    }
                    LinkCheck::Mismatch(e.to_string())
                }
            };
            links.push(check);
        }
        let info = top.dev.info();
        let widen = (top.format == Format::Vhd && layers.len() > 1 && !info.read_only)
            .then(|| RangeLock::new(GROUP));
        Ok(Disk {
            cache: ResolutionCache::new(if layers.len() > 1 { 16 } else { 0 }),
            sizes: layers.iter().map(|l| l.dev.info().virtual_size).collect(),
            cache_from: usize::from(!info.read_only),
            layers,
            links,
            info,
            widen,
        })
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// How each layer links to the next (`links()[i]` is layer `i` to layer `i+1`).
    pub fn links(&self) -> &[LinkCheck] {
        &self.links
    }

    /// The top layer's device.
    pub fn top(&self) -> &dyn BlockDevice {
        &*self.layers[0].dev
    }

    /// Reads `buf` at `off` from layer `idx` down.
    fn read_from(&self, idx: usize, buf: &mut [u8], off: u64) -> Result<()> {
        let (Some(layer), Some(&size)) = (self.layers.get(idx), self.sizes.get(idx)) else {
            buf.fill(0);
            return Ok(());
        };
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = off + pos as u64;
            if o >= size {
                // Past the end of a parent smaller than its child.
                buf[pos..].fill(0);
                break;
            }
            let want = ((buf.len() - pos) as u64).min(size - o);
            let run = layer.dev.block_status(o, want)?;
            let n = run.len.clamp(1, want) as usize;
            let piece = &mut buf[pos..pos + n];
            match run.status {
                // A read-only layer cannot change between its status and the read.
                BlockStatus::Data if idx >= self.cache_from => layer.dev.read_data_at(piece, o)?,
                BlockStatus::Data => layer.dev.read_at(piece, o)?,
                BlockStatus::Zero => piece.fill(0),
                BlockStatus::Unallocated if idx == 0 && self.cache_from == 1 => {
                    self.read_lower(piece, o)?
                }
                BlockStatus::Unallocated => self.read_from(idx + 1, piece, o)?,
            }
            pos += n;
        }
        Ok(())
    }

    /// Where 4 KiB group `g` resolves from layer `cache_from` down (below the top, or from
    /// the top of a read-only chain): a layer depth holding all of it as data, [`ZEROS`], or
    /// `None` when the group is mixed (not cached).
    fn resolve_group(&self, g: u64) -> Result<Option<u8>> {
        if let Some(s) = self.cache.get(g) {
            return Ok(Some(s));
        }
        let off = g * GROUP;
        let len = GROUP.min(self.info.virtual_size - off);
        let mut depth = self.cache_from;
        let source = loop {
            let (Some(layer), Some(&size)) = (self.layers.get(depth), self.sizes.get(depth)) else {
                break Some(ZEROS);
            };
            if off >= size {
                break Some(ZEROS);
            }
            let want = len.min(size - off);
            let run = layer.dev.block_status(off, want)?;
            if run.len < want {
                break None;
            }
            match run.status {
                BlockStatus::Data if want == len => break u8::try_from(depth).ok(),
                BlockStatus::Data => break None,
                BlockStatus::Zero => break Some(ZEROS),
                BlockStatus::Unallocated => depth += 1,
            }
        };
        if let Some(s) = source {
            self.cache.put(g, s);
        }
        Ok(source)
    }

    /// Reads `buf` at `off` from layer `cache_from` down, group by group through the cache,
    /// merging neighbouring groups that resolve alike into one read.
    fn read_lower(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if off % GROUP != 0 || self.layers.len() > usize::from(ZEROS) {
            return self.read_from(self.cache_from, buf, off);
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = off + pos as u64;
            let first = self.resolve_group(o / GROUP)?;
            let mut n = (GROUP as usize).min(buf.len() - pos);
            if let Some(src) = first {
                while pos + n < buf.len()
                    && self.resolve_group((o + n as u64) / GROUP)? == Some(src)
                {
                    n += (GROUP as usize).min(buf.len() - pos - n);
                }
            }
            let piece = &mut buf[pos..pos + n];
            match first {
                Some(ZEROS) => piece.fill(0),
                // The cache vouches that the whole piece is data in that read-only layer.
                Some(depth) => self.layers[usize::from(depth)].dev.read_data_at(piece, o)?,
                None => self.read_from(self.cache_from, piece, o)?,
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes `data` (a byte range inside one or more 4 KiB groups) by rewriting the whole
    /// groups it touches, the rest read through the chain.
    fn write_widened(&self, lock: &RangeLock, data: &[u8], off: u64) -> Result<()> {
        let size = self.info.virtual_size;
        let start = off - off % GROUP;
        let end = (off + data.len() as u64).next_multiple_of(GROUP).min(size);
        if start == off && end == off + data.len() as u64 {
            let _g = lock.lock_shared(off, data.len() as u64);
            return self.top().write_at(data, off);
        }
        let _g = lock.lock_exclusive(start, end - start);
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_from(0, &mut tmp, start)?;
        let at = (off - start) as usize;
        tmp[at..at + data.len()].copy_from_slice(data);
        self.top().write_at(&tmp, start)
    }

    /// Whether the top layer alone holds `[off, off + len)` (a request already checked), so
    /// a read can go straight to it: always for a single layer, and never for an empty range.
    fn top_holds(&self, off: u64, len: u64) -> Result<bool> {
        if self.layers.len() == 1 {
            return Ok(true);
        }
        if len == 0 {
            return Ok(false);
        }
        let r = self.top().block_status(off, len)?;
        Ok(r.status == BlockStatus::Data && r.len >= len)
    }

    /// The status of the run at `off`, looking through the layers, and the depth (0 = top)
    /// of the layer that answered (`layers().len()` when no layer has it).
    pub fn block_status_depth(&self, off: u64, len: u64) -> Result<(StatusRun, usize)> {
        let mut len = len;
        for (depth, layer) in self.layers.iter().enumerate() {
            let size = layer.dev.info().virtual_size;
            if off >= size {
                return Ok((
                    StatusRun {
                        status: BlockStatus::Zero,
                        len,
                        file_offset: None,
                    },
                    depth,
                ));
            }
            let run = layer.dev.block_status(off, len.min(size - off))?;
            if run.status != BlockStatus::Unallocated {
                return Ok((run, depth));
            }
            len = run.len.min(len);
        }
        Ok((
            StatusRun {
                status: BlockStatus::Unallocated,
                len,
                file_offset: None,
            },
            self.layers.len(),
        ))
    }
}

fn check_geometry(child: &Layer, parent: &Layer) -> Result<(), ChainError> {
    let (c, p) = (child.dev.info(), parent.dev.info());
    let bad = |why: String| ChainError::Geometry {
        child: child.path.clone(),
        parent: parent.path.clone(),
        why,
    };
    if c.logical_sector_size != p.logical_sector_size {
        return Err(bad(format!(
            "the child has {}-byte sectors, the parent {}-byte",
            c.logical_sector_size, p.logical_sector_size
        )));
    }
    // A VHDX child may be larger than its parent (an expanded differencing disk reads zeros
    // past the parent's end); a VHD child may not.
    if p.virtual_size < c.virtual_size && child.format != Format::Vhdx {
        return Err(bad(format!(
            "the parent holds {} bytes, fewer than the child's {}",
            p.virtual_size, c.virtual_size
        )));
    }
    // An NBD export is a disk whatever image is served: its identity was checked instead
    // (crate::remote).
    let nbd = parent.path.to_str().is_some_and(crate::remote::is_nbd_url);
    if child.format == Format::Vhdx && parent.format != Format::Vhdx && !nbd {
        return Err(bad(format!(
            "a VHDX child needs a VHDX parent, not {}",
            parent.format
        )));
    }
    Ok(())
}

impl Disk {
    /// Maps `[off, off+len)` for reading from layer `idx` down: each layer's own mapping,
    /// its parent pieces resolved in the layer below, zeros below the last layer and past
    /// the end of a parent smaller than its child. `false` when some layer cannot map.
    fn map_from(&self, idx: usize, off: u64, len: u64, out: &mut Vec<Mapping>) -> Result<bool> {
        let (Some(layer), Some(&size)) = (self.layers.get(idx), self.sizes.get(idx)) else {
            push_mapping(out, Mapping::Zero { len });
            return Ok(true);
        };
        let inside = if off >= size { 0 } else { len.min(size - off) };
        if inside > 0 {
            let mut own = Vec::new();
            if !layer.dev.map(off, inside, false, &mut own)? {
                return Ok(false);
            }
            let mut pos = off;
            for m in own {
                match m {
                    Mapping::Parent { len: n } => {
                        if !self.map_from(idx + 1, pos, n, out)? {
                            return Ok(false);
                        }
                    }
                    other => push_mapping(out, other),
                }
                pos += m.len();
            }
        }
        if inside < len {
            push_mapping(out, Mapping::Zero { len: len - inside });
        }
        Ok(true)
    }
}

impl BlockDevice for Disk {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    /// Reads map through the layers (a piece the top lacks maps in its parent, and so on);
    /// writes map in the top when it can take them without metadata changes and without
    /// widening (a VHD differencing top rewrites whole 4 KiB groups under a range lock that
    /// mapped writes would bypass).
    fn map(&self, offset: u64, len: u64, write: bool, out: &mut Vec<Mapping>) -> Result<bool> {
        block_io::check_request(&self.info, offset, len, write)?;
        if write {
            if self.widen.is_some() {
                return Ok(false);
            }
            return self.top().map(offset, len, true, out);
        }
        self.map_from(0, offset, len, out)
    }

    fn mapped_write_failed(&self, err: &block_io::Error) {
        self.top().mapped_write_failed(err);
    }

    /// An allocating write maps in the top, as [`map`](BlockDevice::map)'s writes do.
    fn map_allocating(
        self: std::sync::Arc<Self>,
        offset: u64,
        len: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<Option<Box<dyn block_io::WriteGuard>>> {
        block_io::check_request(&self.info, offset, len, true)?;
        if self.widen.is_some() {
            return Ok(None);
        }
        std::sync::Arc::clone(&self.layers[0].dev).map_allocating(offset, len, out)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        block_io::check_request(&self.info, offset, buf.len() as u64, false)?;
        if self.layers.len() == 1 {
            return self.top().read_at(buf, offset);
        }
        if self.cache_from == 0 {
            return self.read_lower(buf, offset);
        }
        self.read_from(0, buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        block_io::check_request(&self.info, offset, len, false)?;
        if self.top_holds(offset, len)? {
            return self.top().read_vectored_at(bufs, offset);
        }
        block_io::bounce_read_vectored(self, bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        block_io::check_request(&self.info, offset, buf.len() as u64, true)?;
        match &self.widen {
            Some(lock) => self.write_widened(lock, buf, offset),
            None => self.top().write_at(buf, offset),
        }
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        if self.widen.is_some() {
            // Widened writes go through `write_at`.
            return block_io::bounce_write_vectored(self, bufs, offset);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        block_io::check_request(&self.info, offset, len, true)?;
        self.top().write_vectored_at(bufs, offset)
    }

    unsafe fn read_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> Result<()> {
        let len = block_io::raw_total(bufs)?;
        block_io::check_request(&self.info, offset, len, false)?;
        if self.top_holds(offset, len)? {
            // SAFETY: forwarded caller contract (buffers valid for writes).
            return unsafe { self.top().read_raw_at(bufs, offset) };
        }
        // SAFETY: forwarded caller contract; the bounce reads through `read_at`.
        unsafe { block_io::bounce_read_raw(self, bufs, offset) }
    }

    unsafe fn write_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> Result<()> {
        if self.widen.is_some() {
            // SAFETY: forwarded caller contract; widened writes go through `write_at`.
            return unsafe { block_io::bounce_write_raw(self, bufs, offset) };
        }
        let len = block_io::raw_total(bufs)?;
        block_io::check_request(&self.info, offset, len, true)?;
        // SAFETY: forwarded caller contract (buffers valid for reads).
        unsafe { self.top().write_raw_at(bufs, offset) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        block_io::check_request(&self.info, offset, len, true)?;
        let Some(lock) = &self.widen else {
            return self.top().write_zeroes(offset, len, unmap);
        };
        // Whole groups in the middle go down as they are; partial groups at the ends are
        // rewritten whole.
        let end = offset + len;
        let a = offset.next_multiple_of(GROUP).min(end);
        let b = (end - end % GROUP).max(a);
        if offset < a {
            self.write_widened(lock, &vec![0u8; (a - offset) as usize], offset)?;
        }
        if a < b {
            let _g = lock.lock_shared(a, b - a);
            self.top().write_zeroes(a, b - a, unmap)?;
        }
        if b < end {
            self.write_widened(lock, &vec![0u8; (end - b) as usize], b)?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        block_io::check_request(&self.info, offset, len, true)?;
        let Some(lock) = &self.widen else {
            return self.top().discard(offset, len);
        };
        // A hint: only whole groups are discarded (keeping bitmap bytes whole).
        let end = offset + len;
        let a = offset.next_multiple_of(GROUP);
        let b = end - end % GROUP;
        if a < b {
            let _g = lock.lock_exclusive(a, b - a);
            self.top().discard(a, b - a)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.top().flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        block_io::check_request(&self.info, offset, len, false)?;
        self.block_status_depth(offset, len).map(|(r, _)| r)
    }
}

#[cfg(test)]
mod raw_tests {
    //! `read_raw_at`/`write_raw_at` through a chain (straight to the top, or bounced) against
    //! a byte model.
    use super::*;
    use block_io::{FileStorage, OpenOptions as FileOptions, RawBuf};

    const SIZE: u64 = 4 << 20;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    /// `mem` cut into `piece`-byte [`RawBuf`]s.
    fn pieces(mem: &mut [u8], piece: usize) -> Vec<RawBuf> {
        let (base, len) = (mem.as_mut_ptr(), mem.len());
        (0..len)
            .step_by(piece)
            .map(|at| RawBuf {
                ptr: base.wrapping_add(at),
                len: piece.min(len - at),
            })
            .collect()
    }

    fn check(disk: &Disk, model: &mut [u8], seed: u8) {
        let cases: [(u64, usize, usize); 6] = [
            (0, SIZE as usize, 65536),
            (512, 4096, 100),
            (1 << 20, 1 << 20, 7000),
            ((1 << 20) - 1024, 3072, 512),
            (3 << 20, 12288, 4096),
            (SIZE - 512, 512, 1),
        ];
        for (i, &(off, len, piece)) in cases.iter().enumerate() {
            let o = off as usize;
            let mut got = vec![0u8; len];
            let bufs = pieces(&mut got, piece);
            // SAFETY: the pieces lie inside `got`, alive and untouched during the call.
            unsafe { disk.read_raw_at(&bufs, off) }.unwrap();
            assert!(got == model[o..o + len], "read {off}+{len}");
            let mut got = vec![0u8; len];
            let mut slices: Vec<IoSliceMut<'_>> =
                got.chunks_mut(piece).map(IoSliceMut::new).collect();
            disk.read_vectored_at(&mut slices, off).unwrap();
            assert!(got == model[o..o + len], "vectored read {off}+{len}");
            if disk.info().read_only {
                continue;
            }
            let mut data = pattern(len, seed.wrapping_add(i as u8));
            let bufs = pieces(&mut data, piece);
            // SAFETY: as above, inside `data`.
            unsafe { disk.write_raw_at(&bufs, off) }.unwrap();
            model[o..o + len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            disk.read_at(&mut back, off).unwrap();
            assert!(back == data, "raw write {off}+{len}");
            // A gather write, checked by the next case's reads and the final read.
            let data = pattern(len, seed.wrapping_add(100 + i as u8));
            let slices: Vec<IoSlice<'_>> = data.chunks(piece).map(IoSlice::new).collect();
            disk.write_vectored_at(&slices, off).unwrap();
            model[o..o + len].copy_from_slice(&data);
        }
        let mut all = vec![0u8; SIZE as usize];
        disk.read_at(&mut all, 0).unwrap();
        assert!(all == *model, "the chain differs from the model");
        let mut b = vec![0u8; 512];
        let bufs = pieces(&mut b, 512);
        // SAFETY: as above, inside `b`.
        let e = unsafe { disk.read_raw_at(&bufs, SIZE) }.unwrap_err();
        assert_eq!(e.kind(), block_io::ErrorKind::OutOfRange);
    }

    #[test]
    fn raw_io_through_raw_vhd_and_vhdx_chains() {
        let d = tempfile::tempdir().unwrap();
        // One raw layer: straight to the file.
        let raw = d.path().join("disk.raw");
        let mut model = pattern(SIZE as usize, 1);
        std::fs::write(&raw, &model).unwrap();
        let disk = Disk::open(&raw, &OpenOptions::new().format(Some(Format::Raw))).unwrap();
        check(&disk, &mut model, 10);

        // VHDX base with data in its first half, a child holding 1 MiB: reads of ranges the
        // child holds go to it, others bounce through the chain.
        let base = d.path().join("base.vhdx");
        let child = d.path().join("child.vhdx");
        let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
        o.block_size = Some(1 << 20);
        let b = vhdx_format::create(FileStorage::create(&base).unwrap(), &o).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        model[..2 << 20].copy_from_slice(&pattern(2 << 20, 2));
        b.write_at(&model[..2 << 20], 0).unwrap();
        b.flush().unwrap();
        let details = b.details();
        drop(b);
        let pref = vhdx_format::ParentRef {
            data_write_guid: details.data_write_guid,
            relative_path: "base.vhdx".to_string(),
            absolute_path: Some(base.display().to_string()),
        };
        let mut o = vhdx_format::CreateOptions::differencing(SIZE, pref);
        o.block_size = Some(1 << 20);
        let c = vhdx_format::create(FileStorage::create(&child).unwrap(), &o).unwrap();
        model[1 << 20..2 << 20].copy_from_slice(&pattern(1 << 20, 3));
        c.write_at(&model[1 << 20..2 << 20], 1 << 20).unwrap();
        c.flush().unwrap();
        drop(c);
        let ro = Disk::open(&child, &OpenOptions::new().read_only(true)).unwrap();
        check(&ro, &mut model.clone(), 0);
        drop(ro);
        let disk = Disk::open(&child, &OpenOptions::new()).unwrap();
        check(&disk, &mut model, 20);

        // VHD child: writes are widened to 4 KiB groups, so raw writes bounce.
        let base = d.path().join("base.vhd");
        let child = d.path().join("child.vhd");
        let o = vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
        let b = vhd_format::VhdFile::create(FileStorage::create(&base).unwrap(), &o).unwrap();
        let mut model = pattern(SIZE as usize, 4);
        b.write_at(&model, 0).unwrap();
        b.flush().unwrap();
        drop(b);
        let ps = FileStorage::open(&base, &FileOptions::new().read_only(true)).unwrap();
        let details =
            vhd_format::VhdFile::open(ps, &vhd_format::OpenOptions::new().read_only(true))
                .unwrap()
                .details();
        let o = vhd_format::DifferencingOptions::for_parent(
            &details,
            base.display().to_string(),
            Some(base.display().to_string()),
            Some("base.vhd".to_string()),
        );
        let c = vhd_format::VhdFile::create_differencing(FileStorage::create(&child).unwrap(), &o)
            .unwrap();
        drop(c);
        let disk = Disk::open(&child, &OpenOptions::new()).unwrap();
        assert!(disk.widen.is_some());
        check(&disk, &mut model, 30);
    }
}
