//! Rebasing a differencing child onto another parent (`vdisk rebase`, qemu-img rebase,
//! Hyper-V's `Set-VHD -ParentPath`), in two modes.
//!
//! **Copying (safe, the default)**: the new parent may be any image of the child's format
//! (VHDX under VHDX, VHD under VHD) that fits under it (same logical sector size; a VHD
//! parent at least as large as the child, a VHDX parent possibly smaller, read as zeros past
//! its end as the chain does), and must not be the child or have the child in its own chain.
//! What the child shows stays byte for byte the same, as for qemu-img's default rebase: for
//! every range the child does not hold (reads fall through to its parent), where the old
//! parent chain reads differently from the new one, the old chain's bytes are written into
//! the child. The child's block status says what it holds, sector by sector (a VHDX
//! PARTIALLY_PRESENT block is looked at through its sector bitmap), so only sectors it lacks
//! are written and its own data is never touched. Ranges both chains read as zeros, or from
//! the same layer, are skipped without reading; the rest is compared in 1 MiB pieces, and
//! only the sectors that differ are copied. Then the link changes to name the new parent's
//! identity (MS-VHDX 2.6.2.6.1 `parent_linkage` = its DataWriteGuid; VHD spec 1.0 dynamic
//! header: parent unique id and timestamp of its footer).
//!
//! Crash safety comes from the order: the copies go into the child first (they change
//! nothing it shows: they equal what it read through the old parent), the child is flushed,
//! and only then is the link changed, in one crash-safe metadata update. A crash at any point
//! leaves the child showing its old content, on the old parent before the link update is
//! durable and on the new one after. A VHDX child keeps its DataWriteGuid (the copies are no
//! user-visible change, MS-VHDX 2.2.2), so children of the child stay linked; a VHD's
//! identity is its footer, which data writes never change.
//!
//! **Unsafe (`unsafe_no_copy`, `vdisk rebase -u`)**: only the link changes, onto a moved or
//! copied parent that must be the same content as the one the child records: for VHDX its
//! DataWriteGuid must equal the child's `parent_linkage` or `parent_linkage2` (a copied or
//! moved file keeps its DataWriteGuid), for VHD its footer unique id and timestamp must equal
//! the child's parent unique id and timestamp. That is checked with [`Expected::matches`]
//! before anything is written, and again on the writable handle; a mismatch is
//! [`ChainError::RebaseMismatch`] naming both ids.
//!
//! Either way the link goes through the formats' crash-safe writers:
//! [`vhdx_format::VhdxFile::set_parent_locator`] (through the log; `parent_linkage`,
//! `relative_path`, `absolute_win32_path` rewritten, `volume_path` dropped, unknown keys kept)
//! and [`vhd_format::VhdFile::set_parent`] / [`vhd_format::VhdFile::set_parent_as`] (parent
//! name, W2ku, W2ru, and for a copying rebase the parent unique id and timestamp, in one
//! header write).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus, FileStorage, LockMode, Storage};
use uuid::Uuid;

use crate::detect::Format;
use crate::disk::{file_key, Disk, OpenOptions};
use crate::error::{braced, ChainError};
use crate::layer::{open_layer, Expected, Identity, Layer, ParentLink};
use crate::policy::PathPolicy;

/// How to rebase.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// Change only the child's parent link, copying no data (qemu-img's `-u`): the new
    /// parent must be the same content as the old one. Without it the rebase copies what the
    /// child needs to keep its content (see the module docs).
    pub unsafe_no_copy: bool,
    /// The child's format; `None` detects it by content.
    pub format: Option<Format>,
    /// Where the parents of the child's current chain and of the new parent's chain may live
    /// (a copying rebase opens both chains).
    pub policy: PathPolicy,
    /// Image locks on every image opened (default [`LockMode::Auto`]).
    pub lock: LockMode,
}

/// How far a copying rebase has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseProgress {
    /// Bytes of the child's virtual disk examined so far.
    pub done: u64,
    /// The child's virtual size.
    pub total: u64,
    /// Bytes written into the child so far (where the two parent chains differ).
    pub copied: u64,
}

/// Bytes compared at a time.
const CHUNK: u64 = 1 << 20;

/// The parent's path relative to the child's folder, Windows style (`.\p.vhdx`,
/// `..\dir\p.vhdx`), and its canonical absolute path — what a child's locator records.
pub fn parent_paths(child: &Path, parent: &Path) -> std::io::Result<(String, PathBuf)> {
    let abs = std::fs::canonicalize(parent).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot open parent {}: {e}", parent.display()),
        )
    })?;
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir = std::fs::canonicalize(child_dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot resolve {}: {e}", child_dir.display()),
        )
    })?;
    let a: Vec<Component> = child_dir.components().collect();
    let b: Vec<Component> = abs.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec![".".into()];
    if common < a.len() {
        parts = vec!["..".into(); a.len() - common];
    }
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    Ok((parts.join("\\"), abs))
}

/// Points the differencing image `child` at `new_parent`: copying what the child needs to
/// keep its content, or, with [`RebaseOptions::unsafe_no_copy`], changing only the link onto
/// a parent that must be the same content as the old one (see the module docs). Refusals
/// write nothing.
pub fn rebase(child: &Path, new_parent: &Path, opts: &RebaseOptions) -> Result<(), ChainError> {
    rebase_with_progress(child, new_parent, opts, &mut |_| {}).map(|_| ())
}

/// [`rebase`], calling `progress` after every piece a copying rebase examines; returns the
/// final figures (all zero for an unsafe rebase).
pub fn rebase_with_progress(
    child: &Path,
    new_parent: &Path,
    opts: &RebaseOptions,
    progress: &mut dyn FnMut(RebaseProgress),
) -> Result<RebaseProgress, ChainError> {
    if same_file(child, new_parent) {
        return Err(ChainError::RebaseRefused {
            child: child.to_path_buf(),
            reason: "an image cannot be its own parent".into(),
        });
    }
    if opts.unsafe_no_copy {
        rebase_unsafe(child, new_parent, opts)?;
        return Ok(RebaseProgress::default());
    }
    rebase_copying(child, new_parent, opts, progress)
}

fn rebase_unsafe(child: &Path, new_parent: &Path, opts: &RebaseOptions) -> Result<(), ChainError> {
    let refuse = |reason: String| ChainError::RebaseRefused {
        child: child.to_path_buf(),
        reason,
    };
    // Read-only first: verify before opening anything writable.
    let c = open_layer(child, opts.format, true, false)?;
    let Some(link) = c.parent.clone() else {
        return Err(refuse(format!(
            "{} is not a differencing image",
            c.format.name()
        )));
    };
    let format = c.format;
    drop(c);
    let p = open_layer(new_parent, None, true, false)?;
    if p.format != format {
        return Err(refuse(format!(
            "a {format} child needs a {format} parent; {} is {}",
            new_parent.display(),
            p.format
        )));
    }
    let identity = p.identity;
    drop(p);
    verify(child, new_parent, &link.expected, &identity)?;
    let relink = Relink::new(child, new_parent, identity)?;
    let failed = |source: block_io::Error| ChainError::RebaseFailed {
        child: child.to_path_buf(),
        source,
    };
    let storage = open_writable(child, opts.lock)?;
    match identity {
        Identity::Vhdx { .. } => {
            let mut f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(|source| ChainError::Open {
                path: child.to_path_buf(),
                source,
            })?;
            let old = f.parent_locator().cloned().ok_or_else(|| {
                refuse("the image changed: it has no parent locator any more".into())
            })?;
            // Again on the writable handle: the child may have changed since the check.
            let expected = Expected::Vhdx {
                linkage: old.parent_linkage(),
                linkage2: old.parent_linkage2(),
            };
            verify(child, new_parent, &expected, &identity)?;
            relink.vhdx(&mut f, &old, true).map_err(failed)?;
            f.close().map_err(failed)?;
        }
        Identity::Vhd { .. } => {
            let mut f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(|source| ChainError::Open {
                path: child.to_path_buf(),
                source,
            })?;
            let d = f.details();
            let expected = Expected::Vhd {
                unique_id: d.parent_unique_id.unwrap_or_else(Uuid::nil),
                timestamp: d.parent_timestamp.unwrap_or(0),
            };
            verify(child, new_parent, &expected, &identity)?;
            f.set_parent(
                &relink.absolute,
                Some(&relink.absolute),
                Some(&relink.relative),
            )
            .map_err(failed)?;
            f.flush().map_err(failed)?;
        }
        Identity::Raw => return Err(refuse("raw images have no parent".into())),
    }
    Ok(())
}

/// The copying rebase: checks, then [`CopyJob::run`] on the child opened writable.
fn rebase_copying(
    child: &Path,
    new_parent: &Path,
    opts: &RebaseOptions,
    progress: &mut dyn FnMut(RebaseProgress),
) -> Result<RebaseProgress, ChainError> {
    let refuse = |reason: String| ChainError::RebaseRefused {
        child: child.to_path_buf(),
        reason,
    };
    let ro = OpenOptions::new()
        .read_only(true)
        .format(opts.format)
        .policy(opts.policy.clone())
        .lock(opts.lock);
    // The child's current chain: what it shows is what the rebase keeps, so it must open.
    let old = Disk::open(child, &ro).map_err(|e| match e {
        ChainError::Open { ref path, .. } if path == child => e,
        e => ChainError::RebaseOldChain {
            child: child.to_path_buf(),
            source: Box::new(e),
        },
    })?;
    let top = &old.layers()[0];
    let Some(link) = top.parent.clone() else {
        return Err(refuse(format!(
            "{} is not a differencing image",
            top.format.name()
        )));
    };
    let (format, child_identity) = (top.format, top.identity);
    let new = Disk::open(new_parent, &ro.clone().format(None))?;
    let np = &new.layers()[0];
    if np.format != format {
        return Err(refuse(format!(
            "a {format} child needs a {format} parent; {} is {}",
            new_parent.display(),
            np.format
        )));
    }
    if new.layers().iter().any(|l| same_file(&l.path, child)) {
        return Err(refuse(format!(
            "it is in the chain of {}; an image cannot be its own parent",
            new_parent.display()
        )));
    }
    // Sector size and size, as the chain checks them when it opens the rebased child.
    Disk::from_layers(vec![top.clone(), np.clone()], true)?;
    let relink = Relink::new(child, new_parent, np.identity)?;
    let old_parents = old.layers()[1..].to_vec();
    // Every handle on the child goes before it opens writable (its own locks refuse writers).
    drop(old);
    let storage = open_writable(child, opts.lock)?;
    let job = CopyJob {
        child,
        format,
        identity: child_identity,
        link,
        old: old_parents,
        new: &new,
        relink: &relink,
    };
    job.run(storage, progress)
}

/// Opens the child's file for writing, with image locks as `lock` says.
fn open_writable(child: &Path, lock: LockMode) -> Result<FileStorage, ChainError> {
    FileStorage::open(
        child,
        &block_io::OpenOptions::new().read_only(false).lock(lock),
    )
    .map_err(|source| ChainError::Open {
        path: child.to_path_buf(),
        source,
    })
}

/// Whether `a` and `b` are the same file (device and inode; false when either is missing).
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((file_key(a), file_key(b)), (Some(x), Some(y)) if x == y)
}

/// The new link: the parent's identity and how the child's locator names it.
#[derive(Debug, Clone)]
struct Relink {
    identity: Identity,
    /// Relative to the child's folder, Windows style.
    relative: String,
    /// Canonical absolute path.
    absolute: String,
}

impl Relink {
    fn new(child: &Path, new_parent: &Path, identity: Identity) -> Result<Relink, ChainError> {
        let (relative, abs) = parent_paths(child, new_parent).map_err(|e| ChainError::Open {
            path: new_parent.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Relink {
            identity,
            relative,
            absolute: abs.display().to_string(),
        })
    }

    /// Rewrites a VHDX child's locator to name this parent; a `parent_linkage2` naming
    /// another id is kept when `keep_linkage2` (the same content: a merge in progress stays
    /// valid) and dropped otherwise.
    fn vhdx<S: Storage>(
        &self,
        f: &mut vhdx_format::VhdxFile<S>,
        old: &vhdx_format::locator::ParentLocator,
        keep_linkage2: bool,
    ) -> block_io::Result<()> {
        let Identity::Vhdx {
            data_write_guid, ..
        } = self.identity
        else {
            return Err(block_io::Error::new(
                block_io::ErrorKind::InvalidInput,
                "a VHDX child needs a VHDX parent",
            ));
        };
        let mut new = vhdx_locator(old, &data_write_guid, &self.relative, &self.absolute);
        if !keep_linkage2 {
            new.entries
                .retain(|(k, _)| !k.eq_ignore_ascii_case("parent_linkage2"));
        }
        f.set_parent_locator(&new)
    }
}

/// One copying rebase of a child already open for writing: its current parents (`old`,
/// verified as its chain), the new parent's chain, and the link to write at the end.
struct CopyJob<'a> {
    child: &'a Path,
    format: Format,
    identity: Identity,
    link: ParentLink,
    old: Vec<Layer>,
    new: &'a Disk,
    relink: &'a Relink,
}

impl CopyJob<'_> {
    /// Copies, flushes, then changes the link (see the module docs for the order).
    fn run<S: Storage + 'static>(
        &self,
        storage: S,
        progress: &mut dyn FnMut(RebaseProgress),
    ) -> Result<RebaseProgress, ChainError> {
        let child = self.child;
        let opened = |source| ChainError::Open {
            path: child.to_path_buf(),
            source,
        };
        let copy_failed = |source| ChainError::RebaseCopy {
            child: child.to_path_buf(),
            source,
        };
        let link_failed = |source| ChainError::RebaseFailed {
            child: child.to_path_buf(),
            source,
        };
        let changed = || ChainError::RebaseRefused {
            child: child.to_path_buf(),
            reason: "the image changed while the rebase was opening it".into(),
        };
        match self.format {
            Format::Vhdx => {
                let f = vhdx_format::VhdxFile::open(
                    storage,
                    &vhdx_format::OpenOptions::new().read_only(false),
                )
                .map_err(opened)?;
                let id = f.header().data_write_guid;
                if (Identity::Vhdx {
                    data_write_guid: id,
                    disk_id: f.details().disk_id,
                }) != self.identity
                {
                    return Err(changed());
                }
                // The copies change nothing the child shows: its DataWriteGuid stays, and
                // its own children stay linked.
                f.begin_session_with(id).map_err(copy_failed)?;
                let f = Arc::new(f);
                let report = self.copy(f.clone(), progress)?;
                let mut f = Arc::try_unwrap(f).map_err(|_| changed())?;
                let old = f.parent_locator().cloned().ok_or_else(changed)?;
                self.relink.vhdx(&mut f, &old, false).map_err(link_failed)?;
                f.close().map_err(link_failed)?;
                Ok(report)
            }
            Format::Vhd => {
                let f = vhd_format::VhdFile::open(
                    storage,
                    &vhd_format::OpenOptions::new().read_only(false),
                )
                .map_err(opened)?;
                let d = f.details();
                if (Identity::Vhd {
                    unique_id: d.unique_id,
                    timestamp: d.timestamp,
                }) != self.identity
                {
                    return Err(changed());
                }
                let f = Arc::new(f);
                let report = self.copy(f.clone(), progress)?;
                let mut f = Arc::try_unwrap(f).map_err(|_| changed())?;
                let Identity::Vhd {
                    unique_id,
                    timestamp,
                } = self.relink.identity
                else {
                    return Err(changed());
                };
                let (abs, rel) = (&self.relink.absolute, &self.relink.relative);
                f.set_parent_as(unique_id, timestamp, abs, Some(abs), Some(rel))
                    .map_err(link_failed)?;
                f.flush().map_err(link_failed)?;
                Ok(report)
            }
            Format::Raw => Err(ChainError::RebaseRefused {
                child: child.to_path_buf(),
                reason: "raw images have no parent".into(),
            }),
        }
    }

    /// Writes into `top` (the child, writable) the old chain's bytes wherever the child
    /// lacks sectors and the old and new chains differ, then flushes it.
    fn copy(
        &self,
        top: Arc<dyn BlockDevice>,
        progress: &mut dyn FnMut(RebaseProgress),
    ) -> Result<RebaseProgress, ChainError> {
        let child = self.child;
        let failed = |source| ChainError::RebaseCopy {
            child: child.to_path_buf(),
            source,
        };
        let layer = Layer {
            path: child.to_path_buf(),
            format: self.format,
            dev: top.clone(),
            identity: self.identity,
            parent: Some(self.link.clone()),
        };
        let old = Disk::from_layers(self.old.clone(), false)?;
        // Writes go through a chain over the old parents: a VHD child's partial 4 KiB groups
        // are widened with what it reads through them (see `Disk`), as every write to it is.
        let mut layers = vec![layer];
        layers.extend(self.old.iter().cloned());
        let writer = Disk::from_layers(layers, false)?;
        let info = top.info();
        let sector = u64::from(info.logical_sector_size).max(512);
        let mut p = RebaseProgress {
            total: info.virtual_size,
            ..RebaseProgress::default()
        };
        let sides = Sides {
            old: Side::new(&old),
            new: Side::new(self.new),
        };
        let mut bufs = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
        while p.done < p.total {
            let end = (p.done + CHUNK).min(p.total);
            // The runs the child lacks, before any write of this piece.
            let mut holes = Vec::new();
            let mut pos = p.done;
            while pos < end {
                let run = top.block_status(pos, end - pos).map_err(failed)?;
                let n = run.len.clamp(sector.min(end - pos), end - pos);
                if run.status == BlockStatus::Unallocated {
                    holes.push((pos, n));
                }
                pos += n;
            }
            for (at, len) in holes {
                p.copied += sides
                    .copy_range(&writer, at, len, sector, &mut bufs)
                    .map_err(failed)?;
            }
            p.done = end;
            progress(p);
        }
        writer.flush().map_err(failed)?;
        Ok(p)
    }
}

/// One parent chain as the copy sees it.
struct Side<'a> {
    disk: &'a Disk,
    size: u64,
    /// Device and inode of each layer (`None` for a layer that is no local file).
    keys: Vec<Option<(u64, u64)>>,
}

/// Where a range of one side reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Zeros,
    /// Data of the layer with this file key.
    Layer(Option<(u64, u64)>),
}

impl<'a> Side<'a> {
    fn new(disk: &'a Disk) -> Side<'a> {
        let keys = disk.layers().iter().map(|l| file_key(&l.path)).collect();
        Side {
            disk,
            size: disk.info().virtual_size,
            keys,
        }
    }

    /// Where `[at, at + len)` starts reading from, and for how long.
    fn source(&self, at: u64, len: u64) -> block_io::Result<(Source, u64)> {
        if at >= self.size {
            // Past the end of a smaller parent: zeros, as the chain reads them.
            return Ok((Source::Zeros, len));
        }
        let want = len.min(self.size - at);
        let (run, depth) = self.disk.block_status_depth(at, want)?;
        let n = run.len.clamp(1, want);
        Ok(match run.status {
            BlockStatus::Data => (Source::Layer(self.keys.get(depth).copied().flatten()), n),
            BlockStatus::Zero | BlockStatus::Unallocated => (Source::Zeros, n),
        })
    }

    /// Reads `buf` at `at`, zeros past the end.
    fn read(&self, buf: &mut [u8], at: u64) -> block_io::Result<()> {
        let inside = self.size.saturating_sub(at).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.disk.read_at(&mut buf[..inside], at)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }
}

/// The old and the new parent chains.
struct Sides<'a> {
    old: Side<'a>,
    new: Side<'a>,
}

impl Sides<'_> {
    /// Copies into `writer` the old chain's sectors of `[at, at + len)` (at most one
    /// [`CHUNK`], a range the child lacks) where they differ from the new chain's; returns
    /// the bytes written.
    fn copy_range(
        &self,
        writer: &Disk,
        at: u64,
        len: u64,
        sector: u64,
        bufs: &mut (Vec<u8>, Vec<u8>),
    ) -> block_io::Result<u64> {
        let mut copied = 0;
        let mut pos = at;
        let end = at + len;
        while pos < end {
            let (so, lo) = self.old.source(pos, end - pos)?;
            let (sn, ln) = self.new.source(pos, end - pos)?;
            // Whole sectors: runs of the layers are sector multiples; a ragged one is
            // compared by bytes below.
            let n = lo.min(ln).min(end - pos);
            let n = if n >= sector { n - n % sector } else { n };
            let same = match (so, sn) {
                (Source::Zeros, Source::Zeros) => true,
                (Source::Layer(Some(a)), Source::Layer(Some(b))) => a == b,
                _ => false,
            };
            if !same {
                copied += self.copy_differing(writer, pos, n, sector, bufs)?;
            }
            pos += n;
        }
        Ok(copied)
    }

    /// Reads `[at, at + len)` from both chains and writes the old chain's bytes of every run
    /// of differing sectors.
    fn copy_differing(
        &self,
        writer: &Disk,
        at: u64,
        len: u64,
        sector: u64,
        bufs: &mut (Vec<u8>, Vec<u8>),
    ) -> block_io::Result<u64> {
        let n = len as usize;
        let (a, b) = (&mut bufs.0[..n], &mut bufs.1[..n]);
        self.old.read(a, at)?;
        self.new.read(b, at)?;
        let s = sector as usize;
        let mut copied = 0;
        let mut i = 0;
        while i < n {
            let differs = |i: usize| a[i..(i + s).min(n)] != b[i..(i + s).min(n)];
            if !differs(i) {
                i += s;
                continue;
            }
            let mut j = i + s;
            while j < n && differs(j) {
                j += s;
            }
            let j = j.min(n);
            writer.write_at(&a[i..j], at + i as u64)?;
            copied += (j - i) as u64;
            i = j;
        }
        Ok(copied)
    }
}

fn verify(
    child: &Path,
    new_parent: &Path,
    expected: &Expected,
    found: &Identity,
) -> Result<(), ChainError> {
    if expected.matches(found) {
        return Ok(());
    }
    Err(ChainError::RebaseMismatch {
        child: child.to_path_buf(),
        new_parent: new_parent.to_path_buf(),
        expected: expected.to_string(),
        found: found.to_string(),
    })
}

/// The child's new VHDX locator: `parent_linkage` = the parent's DataWriteGuid (dropping a
/// `parent_linkage2` equal to it), new `relative_path` and `absolute_win32_path`, no
/// `volume_path` (it names the old place), every other key kept in order.
fn vhdx_locator(
    old: &vhdx_format::locator::ParentLocator,
    linkage: &Uuid,
    relative: &str,
    absolute: &str,
) -> vhdx_format::locator::ParentLocator {
    let mut entries: Vec<(String, String)> = Vec::new();
    let (mut has_rel, mut has_abs) = (false, false);
    for (k, v) in &old.entries {
        let value = match k.to_ascii_lowercase().as_str() {
            "parent_linkage" => braced(linkage),
            "parent_linkage2" => {
                if vhdx_format::guid::parse_braced(v) == Some(*linkage) {
                    continue;
                }
                v.clone()
            }
            "relative_path" => {
                has_rel = true;
                relative.to_string()
            }
            "absolute_win32_path" => {
                has_abs = true;
                absolute.to_string()
            }
            "volume_path" => continue,
            _ => v.clone(),
        };
        entries.push((k.clone(), value));
    }
    if !has_rel {
        entries.push(("relative_path".into(), relative.to_string()));
    }
    if !has_abs {
        entries.push(("absolute_win32_path".into(), absolute.to_string()));
    }
    vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_locator_keeps_unknown_keys_and_drops_volume_path() {
        let g = Uuid::from_u128(0xabc);
        let old = vhdx_format::locator::ParentLocator::new(vec![
            ("parent_linkage".into(), braced(&Uuid::from_u128(1))),
            ("parent_linkage2".into(), braced(&g).to_uppercase()),
            ("volume_path".into(), "\\\\?\\Volume{x}\\p.vhdx".into()),
            ("x_vendor".into(), "v".into()),
            ("relative_path".into(), ".\\p.vhdx".into()),
        ]);
        let n = vhdx_locator(&old, &g, ".\\sub\\p.vhdx", "/abs/sub/p.vhdx");
        assert_eq!(
            n.entries,
            vec![
                ("parent_linkage".to_string(), braced(&g)),
                ("x_vendor".into(), "v".into()),
                ("relative_path".into(), ".\\sub\\p.vhdx".into()),
                ("absolute_win32_path".into(), "/abs/sub/p.vhdx".into()),
            ]
        );
        // A parent_linkage2 naming another id (a merge in progress) is kept.
        let n = vhdx_locator(&old, &Uuid::from_u128(1), "r", "a");
        assert!(n.parent_linkage2() == Some(g));
    }

    /// Crash tests of the copying rebase: A and B (differing in [1M, 3M)), C over A holding
    /// part of a block there, on a [`block_io::FaultStorage`] cut at every write and sync.
    mod crash {
        use super::super::*;
        use block_io::{CutPoint, FaultStorage, MemStorage};

        const SIZE: u64 = 8 << 20;
        const MIB: usize = 1 << 20;

        fn base(fmt: Format, data: &[(usize, usize, u8)]) -> Arc<MemStorage> {
            let mem = Arc::new(MemStorage::new());
            let dev: Box<dyn BlockDevice> = match fmt {
                Format::Vhdx => {
                    let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
                    o.block_size = Some(1 << 20);
                    Box::new(vhdx_format::create(mem.clone(), &o).unwrap())
                }
                _ => {
                    let mut o =
                        vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
                    o.block_size = 512 * 1024;
                    Box::new(vhd_format::VhdFile::create(mem.clone(), &o).unwrap())
                }
            };
            for &(off, len, byte) in data {
                dev.write_at(&vec![byte; len], off as u64).unwrap();
            }
            dev.flush().unwrap();
            drop(dev);
            mem
        }

        fn layer(name: &str, mem: &MemStorage) -> Layer {
            crate::layer::open_layer_from_storage(Path::new(name), mem.clone(), None, true).unwrap()
        }

        /// The child of `a` with 4 KiB of its own at 1 MiB + 4 KiB.
        fn child(fmt: Format, a: &MemStorage) -> MemStorage {
            let mem = Arc::new(MemStorage::new());
            let parent = layer("a", a);
            let dev: Box<dyn BlockDevice> = match (fmt, parent.identity) {
                (
                    Format::Vhdx,
                    Identity::Vhdx {
                        data_write_guid, ..
                    },
                ) => {
                    let pref = vhdx_format::ParentRef {
                        data_write_guid,
                        relative_path: ".\\a".into(),
                        absolute_path: Some("/x/a".into()),
                    };
                    let mut o = vhdx_format::CreateOptions::differencing(SIZE, pref);
                    o.block_size = Some(1 << 20);
                    Box::new(vhdx_format::create(mem.clone(), &o).unwrap())
                }
                _ => {
                    let f = vhd_format::VhdFile::open(
                        a.clone(),
                        &vhd_format::OpenOptions::new().read_only(true),
                    )
                    .unwrap();
                    let mut o = vhd_format::DifferencingOptions::for_parent(
                        &f.details(),
                        "/x/a",
                        Some("/x/a".into()),
                        Some(".\\a".into()),
                    );
                    o.block_size = 512 * 1024;
                    Box::new(vhd_format::VhdFile::create_differencing(mem.clone(), &o).unwrap())
                }
            };
            dev.write_at(&[0xC0; 4096], (MIB + 4096) as u64).unwrap();
            dev.flush().unwrap();
            drop(dev);
            (*mem).clone()
        }

        fn read_all(d: &Disk) -> Vec<u8> {
            let mut v = vec![0u8; SIZE as usize];
            d.read_at(&mut v, 0).unwrap();
            v
        }

        fn sweep(fmt: Format) {
            let a = base(fmt, &[(0, 3 * MIB, 0xA1), (5 * MIB, MIB, 0xA5)]);
            let b = base(
                fmt,
                &[(0, MIB, 0xA1), (MIB, MIB, 0xB2), (5 * MIB, MIB, 0xA5)],
            );
            let c = child(fmt, &a);
            let (la, lb) = (layer("a", &a), layer("b", &b));
            let lc = layer("c", &c);
            let model = read_all(&Disk::from_layers(vec![lc.clone(), la.clone()], false).unwrap());
            let new = Disk::from_layers(vec![lb.clone()], false).unwrap();
            let relink = Relink {
                identity: lb.identity,
                relative: ".\\b".into(),
                absolute: "/x/b".into(),
            };
            let sector = if fmt == Format::Vhd { 4096 } else { 512 };
            let job = CopyJob {
                child: Path::new("c"),
                format: fmt,
                identity: lc.identity,
                link: lc.parent.clone().unwrap(),
                old: vec![la.clone()],
                new: &new,
                relink: &relink,
            };
            let run = |cut: Option<u64>| {
                let fault = Arc::new(FaultStorage::new(c.clone()).with_sector_size(sector));
                if let Some(n) = cut {
                    fault.set_cut(CutPoint::AfterOps(n));
                }
                let r = job.run(fault.clone(), &mut |_| {});
                (fault, r)
            };
            let (fault, r) = run(None);
            let p = r.unwrap();
            // [1M, 3M) differs, less C's own 4 KiB.
            assert_eq!(p.copied, 2 * MIB as u64 - 4096);
            let total = fault.ops();
            let (mut on_old, mut on_new) = (0, 0);
            for n in 0..=total {
                let (fault, r) = run(Some(n));
                if r.is_ok() {
                    // A rebase that returned is durable: the link names B.
                    let img = fault.durable_image();
                    let l = crate::layer::open_layer_from_storage(Path::new("c"), img, None, true)
                        .unwrap();
                    assert!(l.parent.unwrap().expected.matches(&lb.identity), "cut {n}");
                }
                for seed in 0..4 {
                    let img = fault.crash_image(seed);
                    let l = crate::layer::open_layer_from_storage(Path::new("c"), img, None, true)
                        .unwrap_or_else(|e| panic!("{fmt}: cut {n} seed {seed}: {e}"));
                    let expected = &l.parent.as_ref().unwrap().expected;
                    let parent = if expected.matches(&la.identity) {
                        on_old += 1;
                        la.clone()
                    } else if expected.matches(&lb.identity) {
                        on_new += 1;
                        lb.clone()
                    } else {
                        panic!("{fmt}: cut {n} seed {seed}: links neither A nor B");
                    };
                    let d = Disk::from_layers(vec![l, parent], false).unwrap();
                    assert!(read_all(&d) == model, "{fmt}: cut {n} seed {seed}: content");
                }
            }
            assert!(
                on_old > 0 && on_new > 0,
                "{fmt}: {on_old} old, {on_new} new"
            );

            // A write that fails mid-copy: a typed error, and the link is unchanged.
            let fault = Arc::new(FaultStorage::new(c.clone()));
            fault.inject(block_io::Injection::WriteError {
                nth: fault.writes() + 3,
            });
            let e = job.run(fault.clone(), &mut |_| {}).unwrap_err();
            assert!(matches!(e, ChainError::RebaseCopy { .. }), "{fmt}: {e:?}");
            let l = crate::layer::open_layer_from_storage(
                Path::new("c"),
                fault.live_image(),
                None,
                true,
            )
            .unwrap();
            assert!(l.parent.as_ref().unwrap().expected.matches(&la.identity));
            let d = Disk::from_layers(vec![l, la.clone()], false).unwrap();
            assert!(read_all(&d) == model, "{fmt}: after a failed copy");
        }

        #[test]
        fn vhdx_every_cut_reads_the_same_on_the_old_or_new_parent() {
            sweep(Format::Vhdx);
        }

        #[test]
        fn vhd_every_cut_reads_the_same_on_the_old_or_new_parent() {
            sweep(Format::Vhd);
        }
    }

    #[test]
    fn relative_paths_windows_style() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::create_dir_all(d.path().join("c")).unwrap();
        std::fs::write(d.path().join("a/b/p.vhdx"), b"x").unwrap();
        std::fs::write(d.path().join("c/q.vhdx"), b"x").unwrap();
        let child = d.path().join("a/child.vhdx");
        let (rel, abs) = parent_paths(&child, &d.path().join("a/b/p.vhdx")).unwrap();
        assert_eq!(rel, ".\\b\\p.vhdx");
        assert!(abs.is_absolute() && abs.ends_with("a/b/p.vhdx"));
        let (rel, _) = parent_paths(&child, &d.path().join("c/q.vhdx")).unwrap();
        assert_eq!(rel, "..\\c\\q.vhdx");
        assert!(parent_paths(&child, &d.path().join("nope")).is_err());
    }
}
