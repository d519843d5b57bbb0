//! Converting a differencing chain layer by layer ([`convert_layers`]; `vdisk convert
//! --keep-layers`, issue 12): a chain `TOP -> P1 -> ... -> BASE` of VHD or VHDX layers (any
//! mix the chain crate opens) becomes a new chain of the same depth in VHD or VHDX, as
//! Hyper-V's Convert-VHD of a differencing disk keeps it differencing.
//!
//! ## What each new layer holds
//!
//! Exactly what the old layer holds, read through the old layer's own
//! [`BlockDevice::block_status`] (never parsing the formats again):
//! - `Data` runs — VHDX FULLY_PRESENT blocks and the present sectors of PARTIALLY_PRESENT
//!   ones (their sector bitmap), a VHD differencing block's sectors whose bitmap bit is set,
//!   every allocated sector of a base — are copied.
//! - `Zero` runs of a differencing layer — VHDX ZERO, and UNMAPPED and UNDEFINED, whose
//!   contents MS-VHDX leaves undefined and our reader returns as zeros (what the chain read
//!   before is kept) — hide the parent, so they are written as zeros: a VHDX child gets ZERO
//!   blocks where they cover whole blocks, a VHD child (which has no zero state) stores
//!   zeros.
//! - `Unallocated` runs of a differencing layer stay transparent in the new child.
//! - The base is converted as a plain dynamic image: holes, zero runs and data that reads as
//!   zeros are skipped.
//!
//! So opening the new chain at any depth reads byte for byte as the old chain at that depth,
//! and each new layer allocates about what the old one does. Two adjustments keep other
//! readers right: writes into a VHD child go through [`chain::Disk`], which widens them to
//! whole 4 KiB groups with the bytes the chain below already shows (libvhdi misreads a
//! sector-bitmap byte that is only partly set), and a VHD child may not be larger than its
//! parent (a VHDX chain whose child grew past its parent is refused as VHD).
//!
//! ## Links, sizes, names
//!
//! Every new child records its new parent's identity (VHDX `parent_linkage` = the parent's
//! DataWriteGuid; VHD parent unique id and timestamp) and locators naming the parent's
//! *final* file: relative (`.\NAME`, the layers sit in one folder) and absolute. Each layer
//! keeps its old virtual size. VHD layers have 512-byte sectors (a 4096-byte VHDX chain
//! converts fine: 512 divides 4096); VHDX layers get the source chain's logical sector size
//! (512 for a VHD source), as a VHDX child must have its parent's. Block sizes are each
//! format's defaults (VHD 2 MiB; VHDX 2 MiB for children, by size for the base), or
//! [`LayersOptions::block_size`] for every layer.
//!
//! The new top is `dst`; its parents go next to it as `<dst stem>-<n>.<vhd|vhdx>`, `n = 1`
//! for the top's parent, 2 for the next, down to the base ([`layer_paths`]). A name that
//! exists, or is a file of the source chain, is refused before anything is written.
//!
//! ## Failures
//!
//! Each new layer is built under a hidden temporary name in `dst`'s folder and flushed; only
//! when all are done are they renamed to their final names, base first, never replacing a
//! file that appeared meanwhile. The chain does not open until the renames are done. On any
//! error (or [`LayersOptions::cancel`]) the temporary files, and the layers already renamed,
//! are removed: nothing is left behind, and the error names the cause. A crash may leave
//! hidden `.NAME.XXXXXXXX.tmp` files in the folder.
//!
//! The source is read through the [`chain::Disk`] the caller opened (read-only, with its
//! image locks): a convert works on images nobody else writes meanwhile, which the locks
//! enforce against QEMU and `vdisk serve`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus, FileStorage, LockMode};
use chain::{file_key, Disk, Format, Layer, LayerOptions};

use crate::new_layer;

/// Bytes read and written at a time.
const CHUNK: u64 = 1 << 20;

/// The longest status run asked for at a time.
const MAX_RUN: u64 = 1 << 30;

/// Where [`convert_layers`] is in its work, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayersProgress {
    /// The layer being written, counted from the top (0 = the top, `layers - 1` = the base);
    /// the base is written first.
    pub layer: usize,
    /// How many layers there are.
    pub layers: usize,
    /// Bytes handled so far (data copied and zero runs written), over all layers.
    pub done_bytes: u64,
    /// Bytes to handle in all.
    pub total_bytes: u64,
}

/// A progress callback: called after every MiB of data copied and every zero run written.
pub type LayersProgressFn = Arc<dyn Fn(&LayersProgress) + Send + Sync>;

/// What [`convert_layers`] does.
#[derive(Clone)]
pub struct LayersOptions {
    /// The new layers' format: [`Format::Vhd`] or [`Format::Vhdx`] ([`Format::Raw`] has no
    /// parent link and is refused).
    pub format: Format,
    /// Block size of every new layer (`None`: each format's defaults, see the module docs).
    pub block_size: Option<u32>,
    /// Image locks on the new layers.
    pub lock: LockMode,
    /// Called after every piece.
    pub progress: Option<LayersProgressFn>,
    /// Set to stop: the convert fails with [`LayersError::Cancelled`], leaving nothing.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for LayersOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayersOptions")
            .field("format", &self.format)
            .field("block_size", &self.block_size)
            .field("lock", &self.lock)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel.is_some())
            .finish()
    }
}

impl LayersOptions {
    /// Layers of `format` with default block sizes, image locks on.
    pub fn new(format: Format) -> Self {
        LayersOptions {
            format,
            block_size: None,
            lock: LockMode::Auto,
            progress: None,
            cancel: None,
        }
    }
}

/// One layer [`convert_layers`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedLayer {
    /// Its file.
    pub path: PathBuf,
    /// The source layer it holds the content of.
    pub source: PathBuf,
    /// Whether it is a differencing child (all but the base).
    pub differencing: bool,
    /// Data bytes copied into it.
    pub data_bytes: u64,
    /// Bytes written as zeros over its parent (differencing layers only).
    pub zero_bytes: u64,
}

/// What [`convert_layers`] did: the layers, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayersReport {
    /// The new layers, top (`dst`) first, the base last.
    pub layers: Vec<ConvertedLayer>,
}

/// Why [`convert_layers`] refused or failed. Nothing is left behind in either case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayersError {
    /// The target format is raw, which cannot record a parent.
    #[error("raw images cannot keep layers: a raw image has no parent link (convert without keeping the layers to flatten the chain)")]
    RawTarget,
    /// A new layer would overwrite a file that exists.
    #[error("{0} exists")]
    DestinationExists(PathBuf),
    /// A new layer would overwrite a layer of the source chain.
    #[error("{0} is a layer of the source chain")]
    DestinationIsSource(PathBuf),
    /// A VHD child would be larger than its parent (only VHDX allows that).
    #[error("{child} is larger than its parent {parent}, which a VHD chain cannot hold")]
    ChildLarger {
        /// The source child.
        child: PathBuf,
        /// Its parent.
        parent: PathBuf,
    },
    /// The destination's folder could not be resolved.
    #[error("cannot resolve the folder of {path}")]
    Folder {
        /// The destination.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Reading a source layer failed.
    #[error("cannot read {layer} at offset {offset}")]
    Read {
        /// The source layer.
        layer: PathBuf,
        /// Where.
        offset: u64,
        /// What the device said.
        #[source]
        source: block_io::Error,
    },
    /// A source layer reported an empty status run (a malformed image).
    #[error("{layer} reports an empty run at offset {offset}")]
    EmptyRun {
        /// The source layer.
        layer: PathBuf,
        /// Where.
        offset: u64,
    },
    /// Creating, writing or flushing a new layer failed.
    #[error("cannot {op} {path} (the new layer for {final_path})")]
    Layer {
        /// `create`, `write`, `zero` or `flush`.
        op: &'static str,
        /// The layer's temporary file.
        path: PathBuf,
        /// The name it was to get.
        final_path: PathBuf,
        /// What failed.
        #[source]
        source: block_io::Error,
    },
    /// A new layer could not be opened again, or did not link to its new parent.
    #[error("cannot reopen the new layer {path}")]
    Reopen {
        /// The layer's temporary file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<chain::ChainError>,
    },
    /// Renaming a finished layer to its final name failed.
    #[error("cannot rename {from} to {to}")]
    Rename {
        /// The temporary file.
        from: PathBuf,
        /// The final name.
        to: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// [`LayersOptions::cancel`] was set.
    #[error("the conversion was cancelled")]
    Cancelled,
    /// [`convert_layers_to`] was given names that do not fit the source.
    #[error("the new layers' names: {0}")]
    Names(String),
}

/// The files of the new chain for a `layers`-deep source, top first: `dst`, then
/// `<dst stem>-1.<ext>` (the top's parent), `<dst stem>-2.<ext>`, ... down to the base, in
/// `dst`'s folder, `ext` being `vhd` or `vhdx` as `format` says.
pub fn layer_paths(dst: &Path, layers: usize, format: Format) -> Vec<PathBuf> {
    let stem = dst.file_stem().unwrap_or(dst.as_os_str()).to_owned();
    let dir = dst.parent().unwrap_or(Path::new(""));
    let mut out = vec![dst.to_path_buf()];
    for n in 1..layers {
        let mut name = stem.clone();
        name.push(format!("-{n}.{}", format.name()));
        out.push(dir.join(name));
    }
    out
}

/// Converts the chain `source` (opened read-only, top first) into a new chain of the same
/// depth in [`LayersOptions::format`], whose top is `dst`: see the module docs. Returns the
/// new layers, top first.
pub fn convert_layers(
    source: &Disk,
    dst: &Path,
    opts: &LayersOptions,
) -> Result<LayersReport, LayersError> {
    convert_layers_to(
        source,
        &layer_paths(dst, source.layers().len(), opts.format),
        opts,
    )
}

/// [`convert_layers`] into the files `finals`, top first: one per layer of `source`, all in
/// one folder (an online convert names the parents of a new top this way, see
/// [`crate::Job::convert_top`]).
pub fn convert_layers_to(
    source: &Disk,
    finals: &[PathBuf],
    opts: &LayersOptions,
) -> Result<LayersReport, LayersError> {
    if opts.format == Format::Raw {
        return Err(LayersError::RawTarget);
    }
    let old = source.layers();
    let folder = |p: &PathBuf| p.parent().map(Path::to_path_buf);
    let Some(dst) = finals.first() else {
        return Err(LayersError::Names("no names given".into()));
    };
    if finals.len() != old.len() {
        return Err(LayersError::Names(format!(
            "{} names for {} layers",
            finals.len(),
            old.len()
        )));
    }
    if finals.iter().any(|p| folder(p) != folder(dst)) {
        return Err(LayersError::Names(
            "the new layers must be in one folder".into(),
        ));
    }
    // Refusals first: nothing is created before every name checked out.
    let keys: Vec<(u64, u64)> = old.iter().filter_map(|l| file_key(&l.path)).collect();
    let canon: Vec<PathBuf> = old
        .iter()
        .map(|l| crate::new_layer::canonical_target(&l.path))
        .collect();
    for p in finals {
        if file_key(p).is_some_and(|k| keys.contains(&k))
            || canon.contains(&crate::new_layer::canonical_target(p))
        {
            return Err(LayersError::DestinationIsSource(p.clone()));
        }
        if fs::symlink_metadata(p).is_ok() {
            return Err(LayersError::DestinationExists(p.clone()));
        }
    }
    if opts.format == Format::Vhd {
        for pair in old.windows(2) {
            if pair[0].dev.info().virtual_size > pair[1].dev.info().virtual_size {
                return Err(LayersError::ChildLarger {
                    child: pair[0].path.clone(),
                    parent: pair[1].path.clone(),
                });
            }
        }
    }
    let dir_of = dst
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = fs::canonicalize(dir_of).map_err(|source| LayersError::Folder {
        path: dst.to_path_buf(),
        source,
    })?;
    let mut b = Builder {
        old,
        finals,
        dir,
        opts,
        sector: source.info().logical_sector_size,
        physical: old
            .last()
            .map_or(512, |l| l.dev.info().physical_sector_size),
        temps: Vec::new(),
        done: 0,
        total: 0,
    };
    let built = b.build();
    let layers = match built {
        Ok(l) => l,
        Err(e) => {
            for t in &b.temps {
                let _ = fs::remove_file(t);
            }
            return Err(e);
        }
    };
    b.rename_all()?;
    Ok(LayersReport { layers })
}

/// The state of one [`convert_layers`].
struct Builder<'a> {
    /// The source layers, top first.
    old: &'a [Layer],
    /// The final names, top first.
    finals: &'a [PathBuf],
    /// `dst`'s folder, canonical.
    dir: PathBuf,
    opts: &'a LayersOptions,
    /// Logical sector size of new VHDX layers.
    sector: u32,
    /// Physical sector size of the source base.
    physical: u32,
    /// Temporary files created, base first (`temps[k]` is layer `old.len() - 1 - k`).
    temps: Vec<PathBuf>,
    done: u64,
    total: u64,
}

impl Builder<'_> {
    /// Whether layer `i` (from the top) is the base.
    fn is_base(&self, i: usize) -> bool {
        i + 1 == self.old.len()
    }

    fn check_cancel(&self) -> Result<(), LayersError> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(LayersError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Calls `f(offset, run)` for every status run of source layer `i`.
    fn runs(
        &self,
        i: usize,
        mut f: impl FnMut(u64, u64, BlockStatus) -> Result<(), LayersError>,
    ) -> Result<(), LayersError> {
        let layer = &self.old[i];
        let size = layer.dev.info().virtual_size;
        let mut pos = 0;
        while pos < size {
            // Whole runs: a zero run of whole blocks must reach the new layer whole to
            // become ZERO blocks there.
            let want = (size - pos).min(MAX_RUN);
            let run = layer
                .dev
                .block_status(pos, want)
                .map_err(|source| LayersError::Read {
                    layer: layer.path.clone(),
                    offset: pos,
                    source,
                })?;
            if run.len == 0 {
                return Err(LayersError::EmptyRun {
                    layer: layer.path.clone(),
                    offset: pos,
                });
            }
            let n = run.len.min(want);
            f(pos, n, run.status)?;
            pos += n;
        }
        Ok(())
    }

    /// Builds every layer under a temporary name, base first; returns them top first.
    fn build(&mut self) -> Result<Vec<ConvertedLayer>, LayersError> {
        let mut total = 0;
        for i in 0..self.old.len() {
            let base = self.is_base(i);
            self.runs(i, |_, n, s| {
                if s == BlockStatus::Data || (s == BlockStatus::Zero && !base) {
                    total += n;
                }
                Ok(())
            })?;
        }
        self.total = total;
        // The new layers below the one being built, read-only, top first.
        let mut parents: Vec<Layer> = Vec::new();
        let mut out = Vec::with_capacity(self.old.len());
        for i in (0..self.old.len()).rev() {
            self.check_cancel()?;
            let temp = self.claim_temp(i)?;
            self.create(i, &temp, parents.first())?;
            let report = self.fill(i, &temp, &parents)?;
            // Reopened as a parent: read-only, refusing writers, its identity as written.
            let layer = chain::open_layer_with(
                &temp,
                Some(self.opts.format),
                &LayerOptions {
                    read_only: true,
                    parent: true,
                    lock: self.opts.lock,
                    ..LayerOptions::default()
                },
            )
            .map_err(|e| self.reopen_err(&temp, e))?;
            parents.insert(0, layer);
            out.push(report);
        }
        out.reverse();
        Ok(out)
    }

    fn reopen_err(&self, temp: &Path, e: chain::ChainError) -> LayersError {
        LayersError::Reopen {
            path: temp.to_path_buf(),
            source: Box::new(e),
        }
    }

    fn layer_err(
        &self,
        op: &'static str,
        temp: &Path,
        i: usize,
        e: block_io::Error,
    ) -> LayersError {
        LayersError::Layer {
            op,
            path: temp.to_path_buf(),
            final_path: self.finals[i].clone(),
            source: e,
        }
    }

    /// Creates a hidden temporary file for layer `i` in the destination's folder, never
    /// reusing an existing one.
    fn claim_temp(&mut self, i: usize) -> Result<PathBuf, LayersError> {
        let name = self.finals[i]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        loop {
            let tag = uuid::Uuid::new_v4().simple().to_string();
            let temp = self.dir.join(format!(".{name}.{}.tmp", &tag[..8]));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
            {
                Ok(_) => {
                    self.temps.push(temp.clone());
                    return Ok(temp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.layer_err("create", &temp, i, e.into())),
            }
        }
    }

    /// Creates the new layer `i` in `temp`: a dynamic base, or a differencing child of
    /// `parent` (the new layer below, already finished) whose locators name the parent's
    /// final file.
    fn create(&self, i: usize, temp: &Path, parent: Option<&Layer>) -> Result<(), LayersError> {
        let err = |e| self.layer_err("create", temp, i, e);
        let size = self.old[i].dev.info().virtual_size;
        let link = match parent {
            None => None,
            Some(p) => {
                let name = self.finals[i + 1]
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let abs = self.dir.join(&name).display().to_string();
                Some((p.identity, format!(".\\{name}"), abs))
            }
        };
        let storage = FileStorage::open(
            temp,
            &block_io::OpenOptions::new()
                .truncate(true)
                .lock(self.opts.lock),
        )
        .map_err(err)?;
        let vhdx = match self.opts.format {
            Format::Vhdx => true,
            Format::Vhd => false,
            Format::Raw => return Err(LayersError::RawTarget),
        };
        let g = new_layer::Geometry {
            vhdx,
            size,
            block_size: self.opts.block_size,
            sector: self.sector,
            physical: self.physical,
        };
        new_layer::create(storage, &g, link)
            .map_err(|e| err(e.into_block_error()))?
            .close()
            .map_err(err)
    }

    /// Copies what source layer `i` holds into the new layer in `temp`, written through a
    /// chain over the new layers below (`parents`, top first), and flushes it.
    fn fill(
        &mut self,
        i: usize,
        temp: &Path,
        parents: &[Layer],
    ) -> Result<ConvertedLayer, LayersError> {
        let top = chain::open_layer_with(
            temp,
            Some(self.opts.format),
            &LayerOptions {
                lock: self.opts.lock,
                ..LayerOptions::default()
            },
        )
        .map_err(|e| self.reopen_err(temp, e))?;
        let mut layers = vec![top];
        layers.extend(parents.iter().cloned());
        // Checks the new link: the child names its parent's identity.
        let disk = Disk::from_layers(layers, false).map_err(|e| self.reopen_err(temp, e))?;
        let base = self.is_base(i);
        let src = &self.old[i];
        let mut report = ConvertedLayer {
            path: self.finals[i].clone(),
            source: src.path.clone(),
            differencing: !base,
            data_bytes: 0,
            zero_bytes: 0,
        };
        let mut buf = vec![0u8; CHUNK as usize];
        let (mut done, total) = (self.done, self.total);
        let layers = self.old.len();
        self.runs(i, |pos, n, status| {
            self.check_cancel()?;
            let progress = |done: u64| {
                if let Some(cb) = &self.opts.progress {
                    cb(&LayersProgress {
                        layer: i,
                        layers,
                        done_bytes: done,
                        total_bytes: total,
                    });
                }
            };
            match status {
                BlockStatus::Data => {
                    let end = pos + n;
                    let mut at = pos;
                    while at < end {
                        self.check_cancel()?;
                        let piece = &mut buf[..(end - at).min(CHUNK) as usize];
                        let len = piece.len() as u64;
                        src.dev
                            .read_at(piece, at)
                            .map_err(|source| LayersError::Read {
                                layer: src.path.clone(),
                                offset: at,
                                source,
                            })?;
                        // A base's zeros are a hole in the new base; a child's hide its
                        // parent.
                        if !base || piece.iter().any(|&x| x != 0) {
                            disk.write_at(piece, at)
                                .map_err(|e| self.layer_err("write", temp, i, e))?;
                            report.data_bytes += len;
                        }
                        at += len;
                        done += len;
                        progress(done);
                    }
                }
                BlockStatus::Zero if !base => {
                    disk.write_zeroes(pos, n, false)
                        .map_err(|e| self.layer_err("zero", temp, i, e))?;
                    report.zero_bytes += n;
                    done += n;
                    progress(done);
                }
                BlockStatus::Zero | BlockStatus::Unallocated => {}
            }
            Ok(())
        })?;
        self.done = done;
        disk.flush()
            .map_err(|e| self.layer_err("flush", temp, i, e))?;
        Ok(report)
    }

    /// Renames every temporary file to its final name, base first, never replacing a file;
    /// on failure removes what was renamed and what was not.
    fn rename_all(&self) -> Result<(), LayersError> {
        let n = self.old.len();
        let mut renamed: Vec<&Path> = Vec::new();
        for (k, temp) in self.temps.iter().enumerate() {
            let to = &self.finals[n - 1 - k];
            if let Err(source) = rename_no_replace(temp, to) {
                for p in renamed {
                    let _ = fs::remove_file(p);
                }
                for t in &self.temps[k..] {
                    let _ = fs::remove_file(t);
                }
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    return Err(LayersError::DestinationExists(to.clone()));
                }
                return Err(LayersError::Rename {
                    from: temp.clone(),
                    to: to.clone(),
                    source,
                });
            }
            renamed.push(to);
        }
        // The new names are durable once the folder is.
        if let Err(source) = fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
            for p in renamed {
                let _ = fs::remove_file(p);
            }
            return Err(LayersError::Folder {
                path: self.finals[0].clone(),
                source,
            });
        }
        Ok(())
    }
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`): a hard link, which
/// never replaces, then the old name removed; where the file system has no hard links, a
/// check then a rename.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => fs::remove_file(from).inspect_err(|_| {
            // Undone: the caller removes the temporary file, and `to` must not stay.
            let _ = fs::remove_file(to);
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_destination() {
        let p = layer_paths(Path::new("/x/new.vhd"), 3, Format::Vhd);
        assert_eq!(
            p,
            vec![
                PathBuf::from("/x/new.vhd"),
                PathBuf::from("/x/new-1.vhd"),
                PathBuf::from("/x/new-2.vhd"),
            ]
        );
        let p = layer_paths(Path::new("top"), 2, Format::Vhdx);
        assert_eq!(p, vec![PathBuf::from("top"), PathBuf::from("top-1.vhdx")]);
    }
}
