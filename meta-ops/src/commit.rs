//! The commit (merge) job: fold the top layers of a live [`chain::Disk`] into an ancestor,
//! BASE, then move the guest onto BASE (Hyper-V's `Merge-VHD`, `qemu-img commit [-b BASE]`,
//! QEMU's active block-commit).
//!
//! ## What it does
//!
//! [`Job::commit`] prepares the job, [`crate::JobRunner::start`] runs it on the engine of
//! copy and convert:
//! - **Source.** A read-only view of the chain ([`MergeSource`]) whose `block_status` says
//!   `Data` or `Zero` where some layer *above* BASE holds the range and `Unallocated` where
//!   all of them fall through to BASE. Its reads go through the whole chain, so a block that
//!   a differencing layer holds only partly (VHD/VHDX sector bitmaps) is merged with the
//!   sectors it lacks read from below: the bytes the guest sees, which is what BASE must hold.
//!   `Unallocated` runs are skipped (BASE already holds them; where a guest discard of the
//!   top uncovered them, what the guest sees is copied, see 1), `Zero` runs are zeroed in BASE.
//! - **Destination.** A new [`chain::Disk`] whose top is BASE opened read-write (its own
//!   handle; the guest's chain keeps its read-only one) over BASE's own parents.
//! - **Guest I/O.** The guest keeps writing the top of the old chain; its writes mark blocks
//!   dirty and the job copies them again, then writes go through to BASE as well; at the
//!   pivot the last dirty blocks are copied with guest writes paused, BASE is flushed, and the
//!   guest continues on the new disk ([`crate::Pivot::Switch`]).
//! - **Retire.** The merged layers are then kept (stale, see below) or deleted
//!   ([`Retire`]).
//!
//! A **middle range** ([`CommitOptions::top`] > 0: layers with a child K above them that
//! stays) is merged the same way, except that the guest keeps writing its own top, so what is
//! merged never changes (guest writes are not tracked), and at the pivot, after BASE is
//! flushed, K is repointed to BASE (its `parent_linkage` = BASE's new id, paths to BASE) and
//! the guest moves to its chain without the merged layers. VHDX only (a VHD child records its
//! parent's unique id and timestamp, which `vhd-format` cannot rewrite yet), and K must not be
//! the live top (its locator cannot be rewritten under the guest's writable handle): the
//! merged range starts at depth 2 or below.
//!
//! ## Why a crash never loses the chain (the ordering)
//!
//! 1. **BASE changes only where the layers above it hide it.** The job writes BASE only at
//!    ranges [`MergeSource`] reports as held above BASE, under the engine's exclusive range
//!    lock (no guest change overlaps), and write-through repeats a guest change only where
//!    the guest just wrote the top. So at every instant the old chain reads exactly what it
//!    read before: each sector comes from the same layer as before, and BASE's sectors that
//!    the old chain can reach are untouched. (Sectors of a whole block that fall through are
//!    rewritten into BASE with the bytes BASE's own chain already shows there.) Only a guest
//!    `discard` of the top can uncover a range of BASE the job wrote. The guest's chain then
//!    reads BASE through its read-only handle, whose block table and sector bitmaps were
//!    loaded before the job allocated blocks or set bits through its own handle: it shows
//!    zeros or BASE's parent there, not what the job wrote. The discard marks the range
//!    dirty and *uncovered*, and the job copies the guest's view of it (through the old
//!    chain) into BASE although no merged layer holds it, so the guest reads the same
//!    before and after the pivot. (A discard is undefined data: after a crash before that
//!    copy, the old chain may show there what the guest wrote before the discard.)
//! 2. **BASE's identity.** VHD writers change neither the footer unique id nor the timestamp
//!    a child checks, so every VHD link stays valid throughout. A VHDX writer must give BASE
//!    a new DataWriteGuid before its first change (MS-VHDX 2.2.2.1), which breaks the link of
//!    BASE's child C (the lowest merged layer) unless C already accepts the new id. So, in
//!    this order (FORMATS.md: "write the new id into the child's parent_linkage2 first, then
//!    change the parent"):
//!    a. C's parent locator becomes {parent_linkage = BASE's current id, parent_linkage2 =
//!    a fresh id G}, one metadata change through C's log (old locator or new, never a
//!    mix); either matches BASE now;
//!    b. BASE's write session starts with DataWriteGuid = G
//!    ([`vhdx_format::VhdxFile::begin_session_with`], headers durable before the first
//!    data write); C's `parent_linkage2` matches from then on;
//!    c. the merge writes BASE.
//!    A crash before (a) is durable leaves the old chain as it was; between (a) and (b), C
//!    matches by `parent_linkage`; after (b), by `parent_linkage2`. With (1), the old chain
//!    opens with lineage checks on and reads what it read, including every guest write that
//!    was flushed to the top, until the pivot.
//!    C is a read-only layer of the guest's chain when BASE is two or more layers down: the
//!    job rewrites C's locator itself through a second handle (its metadata only; the guest's
//!    read-only handle never rereads it). When C is the live top (a one-layer commit), its
//!    locator cannot be rewritten under the guest's writable handle: call [`prepare_top`]
//!    before opening the disk (the CLI does); [`Job::commit`] refuses an unprepared VHDX top.
//! 3. **The pivot.** Guest writes are paused, the last dirty blocks copied, BASE flushed
//!    (durable), and only then does the guest's next write go to BASE. A crash before the
//!    flush completes leaves the old chain valid (1, 2); after it, BASE alone holds every
//!    write acknowledged so far, and every later guest write goes to BASE (the new chain).
//!    Which one to open after a crash is the caller's record of whether the pivot happened
//!    (the job's result); both open with lineage checks on.
//! 4. **Middle range: repointing K.** Guest writes go to the live top, above K, so the old
//!    chain reads the same at every instant (1, 2). After BASE is durable, K's locator
//!    becomes {parent_linkage = G, paths to BASE} in one logged metadata change (old locator
//!    or new, never a mix). Before it is durable, the old chain opens (K over the merged
//!    layers); after, the new one (K over BASE, which holds everything the merged layers
//!    held). Only then is a merged layer deleted or unlinked (5).
//! 5. **Retire.** Deleting the merged layers happens after the pivot. With [`Retire::Keep`]
//!    the merged layers stay on disk *stale*: BASE has moved on, and opening them over it
//!    would show data older than BASE's. A VHDX C is then unlinked ([`unlink_stale`]: its
//!    `parent_linkage2` = G removed, one logged metadata change), so it no longer opens over
//!    BASE with lineage checks on — by the job when C is not the live top, else by the
//!    caller once the old chain is closed (the CLI does). A crash before that leaves C
//!    linked and stale. VHD layers keep matching BASE (its ids never change): as with
//!    `qemu-img commit -d`, do not open them again.
//!
//! ## BASE opened for writing
//!
//! The guest's chain holds BASE read-only with QEMU's backing-file locks (bytes 100, 201,
//! 203: no other writer). The job's writable handle takes no lock of its own (two open file
//! descriptions of one process conflict like two processes), but first tests BASE for
//! another writer (byte 101 or 103 held by anyone): that is [`JobError::Prepare`] with an
//! error of kind [`block_io::ErrorKind::Locked`]. Other writers stay excluded while the job
//! runs by the guest chain's read-only locks. Another *reader* of BASE (a sibling chain
//! using it as a backing file) cannot be told from the guest's own handle and is not
//! detected; its view changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block_io::{BlockDevice, DiskInfo, FileStorage, LockMode, Mapping, StatusRun};
use chain::{Disk, Expected, Format, Identity, Layer, PathPolicy};
use uuid::Uuid;

use crate::error::JobError;
use crate::job::{Job, JobKind};

/// What happens to the merged layers once the guest is on BASE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Retire {
    /// They stay on disk, stale (see the module docs).
    #[default]
    Keep,
    /// Their files are deleted.
    Delete,
}

/// How to commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Depth of BASE in the chain (1 = the top's parent, the default).
    pub base: Option<usize>,
    /// Depth of the top merged layer (default 0: the live top, an active commit). Above 0,
    /// the layers `[top, base)` are merged while the guest keeps writing its top, and the
    /// layer at `top - 1` is repointed to BASE (VHDX only, `top` at least 2).
    pub top: Option<usize>,
    /// What happens to the merged layers.
    pub retire: Retire,
    /// BASE already opened read-write by the caller (chains over other storage, tests). For
    /// a VHDX BASE its write session must have been started with the id its child's
    /// `parent_linkage2` names ([`vhdx_format::VhdxFile::begin_session_with`]); the job
    /// then neither opens, locks nor (with [`Retire::Keep`]) unlinks anything.
    pub base_layer: Option<Layer>,
}

impl CommitOptions {
    /// Defaults: BASE is the top's parent; the merged layer is kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// BASE at depth `depth` (1 = the top's parent).
    pub fn base(mut self, depth: usize) -> Self {
        self.base = Some(depth);
        self
    }

    /// Merge from the layer at depth `depth` down (see [`CommitOptions::top`]).
    pub fn top(mut self, depth: usize) -> Self {
        self.top = Some(depth);
        self
    }

    /// What happens to the merged layers.
    pub fn retire(mut self, retire: Retire) -> Self {
        self.retire = retire;
        self
    }
}

fn prep(path: &Path) -> impl FnOnce(block_io::Error) -> JobError + '_ {
    move |source| JobError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

fn chain_err(path: &Path) -> impl FnOnce(chain::ChainError) -> JobError + '_ {
    move |e| JobError::Prepare {
        path: path.to_path_buf(),
        source: block_io::Error::with_source(e.kind(), "cannot open the chain", e),
    }
}

impl Job {
    /// Prepares a commit of layers of `disk` (the disk the guest's [`crate::LiveDisk`] is
    /// on) into the layer at depth `opts.base` (see the module docs): opens BASE read-write,
    /// records BASE's next VHDX id in its child, and builds the disk the guest moves to.
    /// Start it with [`crate::JobRunner::start`]; it ends with the guest on BASE (an active
    /// commit) or on its chain with the merged layers taken out (`opts.top` > 0).
    ///
    /// Errors: [`JobError::Invalid`] for a disk that cannot be committed (one layer, a
    /// read-only top, BASE or the top merged layer out of range, BASE of another size, an
    /// unprepared VHDX top, see [`prepare_top`]; a middle range that is not VHDX or whose
    /// upper neighbour is the live top); [`JobError::Prepare`] when an image cannot be
    /// opened or changed (kind `Locked` when BASE has another writer).
    pub fn commit(disk: Arc<Disk>, opts: CommitOptions) -> Result<Job, JobError> {
        let bad = |s: String| Err(JobError::Invalid(s));
        let layers = disk.layers();
        let depth = opts.base.unwrap_or(1);
        let top = opts.top.unwrap_or(0);
        if layers.len() < 2 {
            return bad("the disk has no parent to commit into".into());
        }
        if depth == 0 || depth >= layers.len() {
            return bad(format!(
                "the base must be at depth 1 to {} of the chain, not {depth}",
                layers.len() - 1
            ));
        }
        if top >= depth {
            return bad(format!(
                "the top merged layer (depth {top}) must be above the base (depth {depth})"
            ));
        }
        if top == 1 {
            return bad(
                "the layer above the merged ones is the live top: repointing it while \
                 the guest writes it is not supported"
                    .into(),
            );
        }
        if top > 0
            && layers[top - 1..=depth]
                .iter()
                .any(|l| l.format != Format::Vhdx)
        {
            return bad(
                "a commit below the top needs VHDX layers (a VHD child's parent ids \
                 cannot be repointed)"
                    .into(),
            );
        }
        if disk.info().read_only {
            return bad("the disk is read-only".into());
        }
        let base = &layers[depth];
        let size = disk.info().virtual_size;
        if base.dev.info().virtual_size != size {
            return bad(format!(
                "the base holds {} bytes, the disk {size}: resizing the base is not supported",
                base.dev.info().virtual_size
            ));
        }
        let own_files = opts.base_layer.is_none();
        let base_layer = match opts.base_layer {
            Some(l) => l,
            None => open_base(&disk, depth)?,
        };
        let mut lower = vec![base_layer.clone()];
        lower.extend(layers[depth + 1..].iter().cloned());
        let new_disk = Disk::from_layers(lower, false).map_err(chain_err(&base.path))?;
        let retire = match opts.retire {
            Retire::Delete => layers[top..depth]
                .iter()
                .map(|l| Post::Delete(l.path.clone()))
                .collect(),
            // BASE's child, when the guest's chain holds it read-only (not the live top).
            Retire::Keep if own_files && depth >= 2 && layers[depth - 1].format == Format::Vhdx => {
                vec![Post::Unlink(layers[depth - 1].path.clone())]
            }
            Retire::Keep => Vec::new(),
        };
        let (source, rel) = if top == 0 {
            (disk.clone(), depth)
        } else {
            let sub = Disk::from_layers(layers[top..].to_vec(), false)
                .map_err(chain_err(&layers[top].path))?;
            (Arc::new(sub), depth - top)
        };
        let merge: Arc<dyn BlockDevice> = Arc::new(MergeSource {
            chain: source,
            depth: rel,
        });
        let new_disk = Arc::new(new_disk);
        let mut job = Job::with_kind(JobKind::Commit, new_disk.clone());
        job.guest_chain = Some(new_disk);
        if top > 0 {
            // The guest stays on its top; the layer above the merged ones (K) is repointed
            // to BASE inside the pivot, once BASE is durable.
            let Identity::Vhdx {
                data_write_guid: g, ..
            } = base_layer.identity
            else {
                return bad("the base is not a VHDX image".into());
            };
            let k = &layers[top - 1];
            let mut k_new = k.clone();
            k_new.parent = Some(chain::ParentLink {
                candidates: vec![chain::Candidate {
                    source: "relative_path".into(),
                    path: base.path.display().to_string(),
                }],
                expected: Expected::Vhdx {
                    linkage: Some(g),
                    linkage2: None,
                },
                name: None,
            });
            let mut guest_layers: Vec<Layer> = layers[..top - 1].to_vec();
            guest_layers.push(k_new);
            guest_layers.push(base_layer);
            guest_layers.extend(layers[depth + 1..].iter().cloned());
            let after =
                Arc::new(Disk::from_layers(guest_layers, false).map_err(chain_err(&k.path))?);
            let (k_path, base_path) = (k.path.clone(), base.path.clone());
            job.static_source = true;
            job.switch_to = Some(after.clone());
            job.guest_chain = Some(after);
            job.before_switch = Some(Arc::new(move || repoint(&k_path, &base_path, g)));
        }
        job.merge = Some(merge);
        job.guest = Some(disk);
        job.retire = retire;
        Ok(job)
    }

    /// Converts the top layer of `disk` (the disk the guest's [`crate::LiveDisk`] is on) into
    /// the top of `dest`, keeping the layers: `dest` is a new differencing image (any format)
    /// over a chain that reads exactly as `disk`'s parents do (their conversion, or copies of
    /// their files), which nothing else uses. The job copies only what the old top holds
    /// (`Data`, and `Zero` runs written as zeros) through the same source view as a commit of
    /// one layer, so ranges the top leaves to its parents stay holes in the new top too, and
    /// guest changes while it runs are copied again or written through; at the pivot the
    /// guest moves onto `dest` ([`crate::Pivot::Switch`]). The old chain is only read.
    ///
    /// `dest`'s parents are the caller's to make equal to `disk`'s: the job cannot tell. A
    /// destination that reads anything else shows the guest other data after the pivot.
    ///
    /// Errors: [`JobError::Invalid`] when `disk` has no parent, `dest` has none or another
    /// virtual size, or `dest` is read-only.
    pub fn convert_top(disk: Arc<Disk>, dest: Arc<Disk>) -> Result<Job, JobError> {
        let bad = |s: String| Err(JobError::Invalid(s));
        if disk.layers().len() < 2 {
            return bad("the disk has no parent: convert it whole (Job::convert)".into());
        }
        if dest.layers().len() < 2 {
            return bad(
                "the destination has no parent: the top of a chain converts into a                  differencing image over the converted parents"
                    .into(),
            );
        }
        let (size, dsize) = (disk.info().virtual_size, dest.info().virtual_size);
        if size != dsize {
            return bad(format!(
                "the destination holds {dsize} bytes, the disk {size}"
            ));
        }
        if dest.info().read_only {
            return bad("the destination is read-only".into());
        }
        let merge: Arc<dyn BlockDevice> = Arc::new(MergeSource {
            chain: disk.clone(),
            depth: 1,
        });
        let mut job = Job::with_kind(JobKind::Convert, dest.clone());
        job.merge = Some(merge);
        job.guest = Some(disk);
        job.guest_chain = Some(dest);
        Ok(job)
    }

    /// For a commit or [`Job::convert_top`]: the chain the guest is on once the job has
    /// completed (a commit's BASE and what is below it, or the guest's chain without the
    /// merged layers; the new top's chain), for a caller that goes on working on the guest's
    /// disk (a later resize or commit through [`crate::resize_live`] or [`Job::commit`]).
    /// `None` for other jobs, whose caller knows the destination it made.
    pub fn guest_chain(&self) -> Option<Arc<Disk>> {
        self.guest_chain.clone()
    }
}

/// A step a commit runs inside its pivot.
pub(crate) type Hook = Arc<dyn Fn() -> Result<(), JobError> + Send + Sync>;

/// Points the differencing VHDX `child` at `base` (MS-VHDX 2.6.2.6): `parent_linkage` =
/// `g` (BASE's DataWriteGuid after the merge), `relative_path` and `absolute_win32_path` to
/// BASE, `parent_linkage2` and `volume_path` dropped, other keys kept: one logged metadata
/// change, so a crash leaves the old link or the new one. Without image locks: the guest's
/// chain holds the file read-only.
fn repoint(child: &Path, base: &Path, g: Uuid) -> Result<(), JobError> {
    let (relative, abs) = chain::parent_paths(child, base).map_err(|e| JobError::Prepare {
        path: base.to_path_buf(),
        source: e.into(),
    })?;
    let abs = abs.display().to_string();
    let storage = FileStorage::open(
        child,
        &block_io::OpenOptions::new()
            .read_only(false)
            .lock(LockMode::Off),
    )
    .map_err(prep(child))?;
    let mut f =
        vhdx_format::VhdxFile::open(storage, &vhdx_format::OpenOptions::new().read_only(false))
            .map_err(prep(child))?;
    let old = f
        .parent_locator()
        .cloned()
        .ok_or_else(|| JobError::Invalid(format!("{} has no parent locator", child.display())))?;
    let mut entries: Vec<(String, String)> = vec![("parent_linkage".into(), chain::braced(&g))];
    for (k, v) in &old.entries {
        match k.to_ascii_lowercase().as_str() {
            "parent_linkage"
            | "parent_linkage2"
            | "volume_path"
            | "relative_path"
            | "absolute_win32_path" => {}
            _ => entries.push((k.clone(), v.clone())),
        }
    }
    entries.push(("relative_path".into(), relative));
    entries.push(("absolute_win32_path".into(), abs));
    let new = vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries,
    };
    f.set_parent_locator(&new).map_err(prep(child))?;
    f.close().map_err(prep(child))
}

/// What a commit does to a merged layer after the pivot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Post {
    /// Delete the file.
    Delete(PathBuf),
    /// Keep it, refusing BASE as its parent from now on ([`unlink_stale`]).
    Unlink(PathBuf),
}

impl Post {
    /// Does it (blocking).
    pub(crate) fn run(self) -> Result<(), JobError> {
        match self {
            Post::Delete(path) => {
                std::fs::remove_file(&path).map_err(|source| JobError::Retire { path, source })
            }
            Post::Unlink(path) => {
                unlink_stale(&path, LockMode::Off)
                    .map(drop)
                    .map_err(|e| JobError::Retire {
                        path,
                        source: std::io::Error::other(e),
                    })
            }
        }
    }
}

/// Makes a merged VHDX layer kept on disk ([`Retire::Keep`]) refuse the base it was merged
/// into: removes the `parent_linkage2` that names the base's new DataWriteGuid, so that its
/// `parent_linkage` (the base's id before the merge) no longer matches and the stale layer
/// cannot be opened over the base with lineage checks on. Returns whether it changed the
/// file (VHD layers cannot be told apart this way: their parent's ids never change).
///
/// The job does this itself after the pivot when the layer is not the guest's live top;
/// for a live top, call it once the old chain is closed (the CLI does). `lock`: the image
/// locks to take ([`LockMode::Off`] when the caller's own chain still holds the file).
pub fn unlink_stale(layer: &Path, lock: LockMode) -> Result<bool, JobError> {
    let storage = FileStorage::open(
        layer,
        &block_io::OpenOptions::new().read_only(false).lock(lock),
    )
    .map_err(prep(layer))?;
    if !vhdx_format::probe(&storage) {
        return Ok(false);
    }
    let mut f =
        vhdx_format::VhdxFile::open(storage, &vhdx_format::OpenOptions::new().read_only(false))
            .map_err(prep(layer))?;
    let Some(old) = f.parent_locator().cloned() else {
        return Ok(false);
    };
    if old.parent_linkage2().is_none() {
        return Ok(false);
    }
    let new = vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries: old
            .entries
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("parent_linkage2"))
            .cloned()
            .collect(),
    };
    f.set_parent_locator(&new).map_err(prep(layer))?;
    f.close().map_err(prep(layer))?;
    Ok(true)
}

/// Opens BASE (layer `depth` of `disk`) read-write for the job, after checking it has no
/// other writer; for VHDX, records its next DataWriteGuid in its child and starts its
/// session with it (module docs, step 2).
fn open_base(disk: &Disk, depth: usize) -> Result<Layer, JobError> {
    let layers = disk.layers();
    let base = &layers[depth];
    let path = &base.path;
    foreign_writer(path)?;
    let storage = FileStorage::open(
        path,
        &block_io::OpenOptions::new()
            .read_only(false)
            .lock(LockMode::Off),
    )
    .map_err(prep(path))?;
    let (dev, identity): (Arc<dyn BlockDevice>, Identity) = match base.format {
        Format::Raw => (
            Arc::new(
                block_io::RawDisk::open(storage, &block_io::RawOptions::new())
                    .map_err(prep(path))?,
            ),
            Identity::Raw,
        ),
        Format::Vhd => {
            let f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(prep(path))?;
            (Arc::new(f), base.identity)
        }
        Format::Vhdx => {
            let Identity::Vhdx {
                data_write_guid: now,
                disk_id,
            } = base.identity
            else {
                return Err(JobError::Invalid("the base changed format".into()));
            };
            let child = &layers[depth - 1];
            let next = match &child.parent {
                Some(chain::ParentLink {
                    expected:
                        Expected::Vhdx {
                            linkage2: Some(g), ..
                        },
                    ..
                }) if *g != now => *g,
                _ if depth >= 2 => {
                    let g = Uuid::new_v4();
                    set_linkage(&child.path, now, g)?;
                    g
                }
                _ => {
                    return Err(JobError::Invalid(format!(
                        "{} does not record its parent's next id yet: prepare it \
                         (meta_ops::prepare_top) before opening the disk",
                        child.path.display()
                    )))
                }
            };
            let f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(prep(path))?;
            if f.header().data_write_guid != now {
                return Err(JobError::Invalid(format!(
                    "{} changed since the chain was opened",
                    path.display()
                )));
            }
            f.begin_session_with(next).map_err(prep(path))?;
            (
                Arc::new(f),
                Identity::Vhdx {
                    data_write_guid: next,
                    disk_id,
                },
            )
        }
    };
    Ok(Layer {
        path: path.clone(),
        format: base.format,
        dev,
        identity,
        parent: base.parent.clone(),
    })
}

/// Rewrites the parent locator of the VHDX layer at `path` to {`parent_linkage` = `now`,
/// `parent_linkage2` = `next`}, keeping every other key (one logged metadata change). Opens
/// it without image locks: it is a read-only layer of the guest's chain, whose locks keep
/// other writers out.
fn set_linkage(path: &Path, now: Uuid, next: Uuid) -> Result<(), JobError> {
    let storage = FileStorage::open(
        path,
        &block_io::OpenOptions::new()
            .read_only(false)
            .lock(LockMode::Off),
    )
    .map_err(prep(path))?;
    write_linkage(storage, path, now, next)
}

fn write_linkage(storage: FileStorage, path: &Path, now: Uuid, next: Uuid) -> Result<(), JobError> {
    let mut f =
        vhdx_format::VhdxFile::open(storage, &vhdx_format::OpenOptions::new().read_only(false))
            .map_err(prep(path))?;
    set_vhdx_linkage(&mut f, now, next).map_err(prep(path))?;
    f.close().map_err(prep(path))
}

/// Sets the parent locator of the differencing VHDX `child` to {`parent_linkage` = `now`
/// (its parent's DataWriteGuid today), `parent_linkage2` = `next` (the id the parent will
/// take when a merge starts writing it)}, every other key kept: step (a) of the module docs,
/// for callers that hold the layer themselves (tests on other storage).
pub fn set_vhdx_linkage<S: block_io::Storage>(
    child: &mut vhdx_format::VhdxFile<S>,
    now: Uuid,
    next: Uuid,
) -> block_io::Result<()> {
    let old = child.parent_locator().cloned().ok_or_else(|| {
        block_io::Error::new(
            block_io::ErrorKind::InvalidInput,
            "not a differencing image: it has no parent locator",
        )
    })?;
    let mut entries: Vec<(String, String)> = Vec::new();
    let (mut l1, mut l2) = (false, false);
    for (k, v) in &old.entries {
        let value = match k.to_ascii_lowercase().as_str() {
            "parent_linkage" => {
                l1 = true;
                chain::braced(&now)
            }
            "parent_linkage2" => {
                l2 = true;
                chain::braced(&next)
            }
            _ => v.clone(),
        };
        entries.push((k.clone(), value));
    }
    if !l1 {
        entries.push(("parent_linkage".into(), chain::braced(&now)));
    }
    if !l2 {
        entries.push(("parent_linkage2".into(), chain::braced(&next)));
    }
    let new = vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries,
    };
    child.set_parent_locator(&new)
}

/// Prepares the top image `top` of a chain, before anyone opens it, for a commit into its
/// parent (module docs, step 2a): for a differencing VHDX, records a fresh id as the one its
/// parent takes when the commit starts writing it; returns it. VHD and other images need
/// nothing (`None`). The parent must match the top's recorded `parent_linkage` (or
/// `parent_linkage2`). Opens the top with image locks (a running writer gives kind
/// `Locked`).
pub fn prepare_top(top: &Path, policy: &PathPolicy) -> Result<Option<Uuid>, JobError> {
    let layer = chain::open_layer(top, None, true, false).map_err(chain_err(top))?;
    let (Some(link), Format::Vhdx) = (layer.parent.clone(), layer.format) else {
        return Ok(None);
    };
    drop(layer);
    let parent_path = policy
        .resolve(top, &link.candidates)
        .map_err(|_| JobError::Invalid(format!("the parent of {} is not found", top.display())))?;
    let parent = chain::open_layer_with(
        &parent_path,
        None,
        &chain::LayerOptions {
            parent: true,
            ..Default::default()
        },
    )
    .map_err(chain_err(&parent_path))?;
    if !link.expected.matches(&parent.identity) {
        return Err(JobError::Invalid(format!(
            "{} is not the parent {} records",
            parent_path.display(),
            top.display()
        )));
    }
    let Identity::Vhdx {
        data_write_guid: now,
        ..
    } = parent.identity
    else {
        return Ok(None);
    };
    drop(parent);
    finish_prepare(top, now)
}

fn finish_prepare(top: &Path, now: Uuid) -> Result<Option<Uuid>, JobError> {
    let storage = FileStorage::open(top, &block_io::OpenOptions::new().read_only(false))
        .map_err(prep(top))?;
    let next = Uuid::new_v4();
    write_linkage(storage, top, now, next)?;
    Ok(Some(next))
}

/// Fails with kind `Locked` when some open file description holds QEMU's WRITE or RESIZE
/// permission byte (101, 103) of `path`: another writer.
fn foreign_writer(path: &Path) -> Result<(), JobError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| JobError::Prepare {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    for byte in [101i64, 103] {
        // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: F_OFD_GETLK on a descriptor we own, with a pointer to our own `flock`,
        // valid for the call; the kernel only writes into it.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if r < 0 {
            // No OFD locks here (an old kernel, some network file systems): nothing to test.
            return Ok(());
        }
        if fl.l_type != libc::F_UNLCK as libc::c_short {
            return Err(JobError::Prepare {
                path: path.to_path_buf(),
                source: block_io::Error::new(
                    block_io::ErrorKind::Locked,
                    format!(
                        "{} is open for writing elsewhere (lock byte {byte})",
                        path.display()
                    ),
                ),
            });
        }
    }
    Ok(())
}

/// What a commit reads: the guest's chain, with `block_status` telling apart what the layers
/// above BASE hold (`Data`, `Zero`) from what falls through to BASE (`Unallocated`).
/// Read-only.
pub(crate) struct MergeSource {
    chain: Arc<Disk>,
    /// Layers `[0, depth)` are merged.
    depth: usize,
}

impl std::fmt::Debug for MergeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeSource")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

fn read_only_err() -> block_io::Error {
    block_io::Error::new(block_io::ErrorKind::ReadOnly, "a merge source is read-only")
}

impl BlockDevice for MergeSource {
    fn info(&self) -> DiskInfo {
        let mut i = self.chain.info();
        i.read_only = true;
        i
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.chain.read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> block_io::Result<()> {
        Err(read_only_err())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> block_io::Result<()> {
        Err(read_only_err())
    }

    fn discard(&self, _offset: u64, _len: u64) -> block_io::Result<()> {
        Err(read_only_err())
    }

    fn flush(&self) -> block_io::Result<()> {
        Ok(())
    }

    /// The run at `offset` in the first merged layer that holds it (`Data` or `Zero`), cut
    /// where a layer above it would take over; `Unallocated` where none does.
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<StatusRun> {
        block_io::check_request(&self.info(), offset, len, false)?;
        let mut len = len;
        for layer in &self.chain.layers()[..self.depth] {
            let run = layer.dev.block_status(offset, len)?;
            let n = run.len.clamp(1, len);
            if run.status != block_io::BlockStatus::Unallocated {
                return Ok(StatusRun {
                    status: run.status,
                    len: n,
                    file_offset: None,
                });
            }
            len = n;
        }
        Ok(StatusRun {
            status: block_io::BlockStatus::Unallocated,
            len,
            file_offset: None,
        })
    }

    fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Mapping>,
    ) -> block_io::Result<bool> {
        if write {
            return Err(read_only_err());
        }
        self.chain.map(offset, len, false, out)
    }
}
