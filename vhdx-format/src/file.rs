//! [`VhdxFile`]: one VHDX layer (fixed, dynamic or differencing) over a [`Storage`].
//!
//! Opening reads the file identifier, picks the current header (MS-VHDX 2.2.2), replays the
//! log (2.3.3: into the file when writable, into an in-memory overlay when read-only), then
//! reads a region table (2.2.3), the metadata (2.6) and the BAT (2.5) into memory as atomics,
//! so reads never take a lock. Sectors absent from a differencing layer read as zeros here and
//! are reported as [`BlockStatus::Unallocated`](block_io::BlockStatus::Unallocated); the
//! chain reads them from the parent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{BlockDevice, DiskInfo, FailStop, Result, StatusRun, Storage};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeSet, HashMap, HashSet};
use uuid::Uuid;

use crate::bat::{state, BatEntry, BlockState, Geometry};
use crate::error::{corrupt_io, FormatError};
use crate::file_id::FileIdentifier;
use crate::header::{select_current, Header, HEADER_OFFSETS, HEADER_SIZE, MIB};
use crate::locator::ParentLocator;
use crate::metadata::{Metadata, TABLE_SIZE};
use crate::region::{RegionTable, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};
use crate::replay::{self, Overlay};

/// Size of a sector bitmap block (MS-VHDX 2.5.1.2).
pub(crate) const BITMAP_BLOCK: u64 = MIB;

/// The kind of VHDX layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// Every block allocated at creation (LeaveBlocksAllocated set).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// A differencing layer over a parent.
    Differencing,
}

impl Subformat {
    /// Lower-case name ("fixed", "dynamic", "differencing").
    pub fn as_str(self) -> &'static str {
        match self {
            Subformat::Fixed => "fixed",
            Subformat::Dynamic => "dynamic",
            Subformat::Differencing => "differencing",
        }
    }
}

/// Format facts about an open image, for `info`-like tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxDetails {
    /// Fixed, dynamic or differencing.
    pub subformat: Subformat,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Virtual disk id.
    pub disk_id: Uuid,
    /// DataWriteGuid of the current header.
    pub data_write_guid: Uuid,
    /// FileWriteGuid of the current header.
    pub file_write_guid: Uuid,
    /// `true` if the log held entries when the image was opened (replayed since).
    pub log_dirty: bool,
    /// Log size in bytes.
    pub log_size: u32,
    /// Creator string of the file identifier.
    pub creator: String,
    /// Parent locator entries (differencing only), in on-disk order.
    pub parent_locator: Vec<(String, String)>,
    /// File size in bytes.
    pub file_size: u64,
}

/// Result of [`VhdxFile::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems found (empty = clean).
    pub errors: Vec<String>,
    /// `true` if the log needed replay when the image was opened.
    pub log_was_dirty: bool,
    /// `true` if the replay was written to the file.
    pub log_replayed: bool,
    /// Payload blocks stored in the file.
    pub allocated_blocks: u64,
    /// Total payload blocks.
    pub total_blocks: u64,
    /// File size in bytes.
    pub file_size: u64,
    /// File bytes no structure refers to (space leaked by an interrupted allocation, or
    /// padding another writer left). Informational, not an error.
    pub unreferenced_bytes: u64,
}

/// The current header and whether this session's header update is done, behind their own
/// mutex ([`VhdxFile::hdr`]). Only header updates hold it across syncs: session start, close
/// and reparent, which every writer of the session has to wait for anyway (MS-VHDX 2.2.2.1:
/// the new FileWriteGuid and DataWriteGuid reach the disk before the first change). Reads,
/// overwrites of allocated blocks and allocations never take it; a commit takes it briefly to
/// read the LogGuid.
#[derive(Debug)]
pub(crate) struct HeaderState {
    /// Current header.
    pub header: Header,
    /// Slot of the current header (0 or 1).
    pub slot: usize,
    /// The session started (FileWriteGuid, DataWriteGuid and LogGuid set).
    pub session: bool,
}

/// Allocation and pending-metadata state, behind [`VhdxFile::state`]. That mutex is only ever
/// held for in-memory work: never across payload I/O, `set_len`, a bitmap read or a sync.
#[derive(Debug)]
pub(crate) struct WriteState {
    /// Where the next block goes (1 MiB aligned): space is reserved by moving this.
    pub file_end: u64,
    /// BAT sectors (4 KiB, index from the BAT start) changed in memory but not on disk.
    pub dirty_bat: BTreeSet<u64>,
    /// Sector bitmap sectors (chunk, 4 KiB index) changed in memory but not on disk.
    pub dirty_bitmap: BTreeSet<(u64, u64)>,
    /// Freed file ranges to punch once the BAT change freeing them is durable.
    pub punch: Vec<(u64, u64)>,
    /// Payload blocks whose allocation is in progress (space reserved, payload being
    /// written): a second writer of such a block waits on [`VhdxFile::state_cv`].
    pub allocating: HashSet<u64>,
    /// Sector bitmap chunks being read from the file or given new space.
    pub loading: HashSet<u64>,
}

impl WriteState {
    /// Sectors a commit would write now.
    pub fn pending(&self) -> usize {
        self.dirty_bat.len() + self.dirty_bitmap.len()
    }
}

/// One VHDX layer.
pub struct VhdxFile<S: Storage> {
    pub(crate) storage: S,
    pub(crate) read_only: bool,
    pub(crate) overlay: Option<Overlay>,
    pub(crate) file_id: FileIdentifier,
    pub(crate) regions: RegionTable,
    pub(crate) meta: Metadata,
    pub(crate) geo: Geometry,
    pub(crate) bat: Vec<AtomicU64>,
    /// Header and session (see [`HeaderState`]).
    pub(crate) hdr: Mutex<HeaderState>,
    /// A copy of the current header for [`header`](Self::header), so that reading it never
    /// waits for a header update in progress.
    pub(crate) current_header: RwLock<Header>,
    /// Allocation and pending metadata (see [`WriteState`]).
    pub(crate) state: Mutex<WriteState>,
    /// Signalled when an allocation or a bitmap load finishes.
    pub(crate) state_cv: Condvar,
    /// Commit coordination (see `commit.rs`).
    pub(crate) commits: Mutex<crate::commit::CommitCtl>,
    /// Signalled when a commit finishes.
    pub(crate) commit_cv: Condvar,
    /// The file length this writer has set (the file only grows); held across `set_len`
    /// only, so that two growths never shrink each other.
    pub(crate) grown: Mutex<u64>,
    /// Mirrors `hdr.session`, read without a lock on the write path.
    pub(crate) session_started: AtomicBool,
    pub(crate) failstop: FailStop,
    pub(crate) bitmaps: RwLock<HashMap<u64, Box<[u8]>>>,
    /// 4 KiB pages of sector bitmaps read from the file, keyed by (chunk, page), for chunks
    /// not in `bitmaps` (bounded; see `read.rs`).
    pub(crate) bitmap_pages: RwLock<crate::read::PageMap>,
    /// The log held entries at open: replayed into the file when writable, into `overlay`
    /// when read-only.
    pub(crate) log_was_dirty: bool,
}

impl<S: Storage> std::fmt::Debug for VhdxFile<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxFile")
            .field("read_only", &self.read_only)
            .field("geometry", &self.geo)
            .field("log_was_dirty", &self.log_was_dirty)
            .finish_non_exhaustive()
    }
}

/// `true` if `storage` starts with the VHDX signature "vhdxfile" (MS-VHDX 2.2.1); read
/// errors count as "no".
pub fn probe<S: Storage + ?Sized>(storage: &S) -> bool {
    if storage.len().map_or(true, |l| l < 8) {
        return false;
    }
    let mut sig = [0u8; 8];
    storage.read_at(&mut sig, 0).is_ok() && &sig == crate::file_id::SIGNATURE
}

/// Reads file bytes, through the replay overlay when there is one.
fn read_view<S: Storage + ?Sized>(
    storage: &S,
    overlay: Option<&Overlay>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    match overlay {
        Some(o) => o.read(storage, buf, offset),
        None => storage.read_at(buf, offset),
    }
}

/// Length of the file as reads see it (through the replay overlay when there is one).
fn view_len<S: Storage + ?Sized>(storage: &S, overlay: Option<&Overlay>) -> Result<u64> {
    match overlay {
        Some(o) => Ok(o.file_len),
        None => storage.len(),
    }
}

/// Reads `len` bytes at `off` into a new vector, through `overlay` when there is one.
fn read_vec<S: Storage + ?Sized>(
    s: &S,
    overlay: Option<&Overlay>,
    off: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    read_view(s, overlay, &mut v, off)?;
    Ok(v)
}

/// File ranges in use whatever the BAT says: the header section, the log and every region.
fn structure_ranges(header: &Header, regions: &RegionTable) -> Vec<(u64, u64)> {
    let mut used = vec![(0, MIB), header.log_range()];
    used.extend(regions.all().map(|r| (r.file_offset, r.end())));
    used
}

/// Reads both headers and returns the current one with its slot.
pub(crate) fn read_headers<S: Storage + ?Sized>(storage: &S) -> Result<(Header, usize)> {
    let h = |i: usize| -> Result<std::result::Result<Header, FormatError>> {
        Ok(Header::parse(&read_vec(
            storage,
            None,
            HEADER_OFFSETS[i],
            HEADER_SIZE,
        )?))
    };
    Ok(select_current(h(0)?, h(1)?)?)
}

/// How an image is opened (shared with the other format crate: the same entry-point shape).
pub use block_io::ImageOpenOptions as OpenOptions;

impl<S: Storage> VhdxFile<S> {
    /// Opens an image. A writable open replays a dirty log into the file (changing the
    /// FileWriteGuid first); a read-only open replays it in memory and never writes.
    pub fn open(storage: S, opts: &OpenOptions) -> Result<Self> {
        let read_only = opts.is_read_only();
        let len = storage.len()?;
        if len < 320 * 1024 {
            return Err(corrupt_io("the file is too small to be a VHDX image"));
        }
        let file_id = FileIdentifier::parse(&read_vec(&storage, None, 0, 520)?)?;
        let (mut header, mut slot) = read_headers(&storage)?;
        // MS-VHDX 2.3.3: replay before reading anything but headers and log. Both kinds of open
        // read the layout through the replayed view; a writable open writes the replay into the
        // file only once the layout checked out and the replayed length is known.
        let mut overlay = match replay::find_active(&storage, &header)? {
            Some(plan) => Some(Overlay::build(&storage, &header, &plan, len)?),
            None => None,
        };
        let log_was_dirty = overlay.is_some();
        let view_len = view_len(&storage, overlay.as_ref())?;
        let read = |off: u64, n: usize| read_vec(&storage, overlay.as_ref(), off, n);
        // MS-VHDX 2.2.3: use the first valid region table; a writable open rewrites a damaged
        // copy from the good one.
        let raw = [
            read(REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE)?,
            read(REGION_TABLE_OFFSETS[1], REGION_TABLE_SIZE)?,
        ];
        let parsed = [RegionTable::parse(&raw[0]), RegionTable::parse(&raw[1])];
        let good = match &parsed {
            [Err(FormatError::Unsupported { structure, reason }), _] => {
                return Err(FormatError::unsupported(structure, reason.clone()).into())
            }
            [Ok(_), _] => 0,
            [Err(_), Ok(_)] => 1,
            [Err(e1), Err(e2)] => {
                return Err(crate::error::corrupt(
                    "region tables",
                    format!("neither is valid (1: {e1}; 2: {e2})"),
                )
                .into())
            }
        };
        let repair_copy = !read_only && parsed[1 - good].is_err();
        let [p0, p1] = parsed;
        let regions = if good == 0 { p0? } else { p1? };
        let log = header.log_range();
        for r in regions.all() {
            // MS-VHDX 2.2.3: regions must not overlap the log.
            if r.file_offset < log.1 && log.0 < r.end() {
                return Err(corrupt_io("a region overlaps the log"));
            }
            if r.end() > view_len && (r.guid == regions.bat.guid || r.guid == regions.metadata.guid)
            {
                return Err(corrupt_io("a region lies beyond the end of the file"));
            }
        }
        let md = regions.metadata;
        let table = read(md.file_offset, TABLE_SIZE.min(md.length as usize))?;
        let meta = Metadata::parse(&table, md.length, |o, l| {
            read(md.file_offset + u64::from(o), l as usize)
        })?;
        let geo = Geometry::new(
            meta.block_size,
            meta.logical_sector_size,
            meta.virtual_size,
            meta.has_parent,
        )?;
        // MS-VHDX 2.5: the BAT region holds every entry.
        if geo.total_entries * 8 > u64::from(regions.bat.length) {
            return Err(corrupt_io(format!(
                "the BAT region ({} bytes) is too small for {} entries",
                regions.bat.length, geo.total_entries
            )));
        }
        let bat_bytes = geo.total_entries * 8;
        let mut bat: Vec<AtomicU64> = Vec::new();
        let mut pos = 0u64;
        while pos < bat_bytes {
            let n = (bat_bytes - pos).min(MIB) as usize;
            let chunk = read(regions.bat.file_offset + pos, n)?;
            bat.extend(chunk.chunks_exact(8).map(|c| {
                AtomicU64::new(u64::from_le_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]))
            }));
            pos += n as u64;
        }
        let layout_end = validate_bat(&bat, &geo, &header, &regions, view_len)?;
        let file_len = match overlay.as_mut() {
            Some(o) => {
                let l = replay::replayed_len(len, o, layout_end)?;
                o.set_len(l);
                l
            }
            None => len,
        };
        if !read_only {
            if let Some(o) = overlay.take() {
                // The FileWriteGuid changes before the first write of a session.
                let mut h = header;
                h.file_write_guid = Uuid::new_v4();
                (header, slot) = crate::write::update_header(&storage, h, slot)?;
                replay::apply(&storage, &o, file_len)?;
            }
            if repair_copy {
                let [r0, r1] = &raw;
                let good_bytes = if good == 0 { r0 } else { r1 };
                storage.write_at(good_bytes, REGION_TABLE_OFFSETS[1 - good])?;
                storage.sync_data()?;
            }
            if !header.log_guid.is_nil() {
                let mut h = header;
                h.log_guid = Uuid::nil();
                (header, slot) = crate::write::update_header(&storage, h, slot)?;
            }
        }
        // New blocks go past everything in use and past the end of the file.
        let file_end = layout_end
            .max(file_len)
            .checked_next_multiple_of(MIB)
            .ok_or_else(|| corrupt_io(format!("the file length {file_len} is out of range")))?;
        let file = VhdxFile {
            storage,
            read_only,
            overlay,
            file_id,
            regions,
            meta,
            geo,
            bat,
            current_header: RwLock::new(header),
            hdr: Mutex::new(HeaderState {
                header,
                slot,
                session: false,
            }),
            state: Mutex::new(WriteState {
                file_end,
                dirty_bat: BTreeSet::new(),
                dirty_bitmap: BTreeSet::new(),
                punch: Vec::new(),
                allocating: HashSet::new(),
                loading: HashSet::new(),
            }),
            state_cv: Condvar::new(),
            commits: Mutex::new(crate::commit::CommitCtl::new()),
            commit_cv: Condvar::new(),
            grown: Mutex::new(file_len),
            session_started: AtomicBool::new(false),
            failstop: FailStop::new(),
            bitmaps: RwLock::new(HashMap::new()),
            bitmap_pages: RwLock::default(),
            log_was_dirty,
        };
        Ok(file)
    }

    /// Reads file bytes, through the replay overlay on a read-only open of a dirty image.
    pub(crate) fn read_file(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_view(&self.storage, self.overlay.as_ref(), buf, offset)
    }

    /// The BAT geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The parent locator of a differencing layer.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.meta.parent_locator.as_ref()
    }

    /// The current header.
    pub fn header(&self) -> Header {
        *self.current_header.read()
    }

    /// The region table in use.
    pub fn regions(&self) -> &RegionTable {
        &self.regions
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Which kind of layer this is.
    pub fn subformat(&self) -> Subformat {
        if self.meta.has_parent {
            Subformat::Differencing
        } else if self.meta.leave_blocks_allocated {
            Subformat::Fixed
        } else {
            Subformat::Dynamic
        }
    }

    /// Format facts for tools.
    pub fn details(&self) -> VhdxDetails {
        let h = self.header();
        VhdxDetails {
            subformat: self.subformat(),
            virtual_size: self.meta.virtual_size,
            block_size: self.meta.block_size,
            logical_sector_size: self.meta.logical_sector_size,
            physical_sector_size: self.meta.physical_sector_size,
            disk_id: self.meta.disk_id,
            data_write_guid: h.data_write_guid,
            file_write_guid: h.file_write_guid,
            log_dirty: self.log_was_dirty,
            log_size: h.log_length,
            creator: self.file_id.creator.clone(),
            parent_locator: self
                .meta
                .parent_locator
                .as_ref()
                .map(|l| l.entries.clone())
                .unwrap_or_default(),
            file_size: self.storage.len().unwrap_or(0),
        }
    }

    /// Checks the image. Opening already validated every structure (headers, region tables,
    /// metadata, every BAT entry against the file and each other) and replayed the log — into
    /// the file when writable, which is the repair. This adds the checks that need the sector
    /// bitmaps and reports whether a log still needs replay. See [`repair`](Self::repair).
    pub fn check(&self) -> Result<CheckReport> {
        self.check_with(false)
    }

    /// [`check`](Self::check), asking for a repair: a writable handle has already repaired
    /// what opening repairs (the log replayed, a damaged header or region table copy
    /// rewritten); a read-only one cannot write and reports that the image must be reopened
    /// writable (see [`repair_image`]).
    pub fn repair(&self) -> Result<CheckReport> {
        self.check_with(true)
    }

    fn check_with(&self, repair: bool) -> Result<CheckReport> {
        // A writable open replays a dirty log into the file; a read-only one cannot.
        let log_replayed = self.log_was_dirty && !self.read_only;
        let mut report = CheckReport {
            log_was_dirty: self.log_was_dirty,
            log_replayed,
            total_blocks: self.geo.data_blocks,
            ..CheckReport::default()
        };
        // A dirty log that replays cleanly (the plan was validated at open) is the normal
        // state after a crash, not corruption: `log_was_dirty` says so. Only a repair asked of
        // a read-only handle, which cannot write the replay, is an error.
        if self.log_was_dirty && !log_replayed && repair {
            report
                .errors
                .push("the log needs replay: reopen writable to repair".into());
        }
        for b in 0..self.geo.data_blocks {
            let e = self.entry(b);
            if matches!(e & 7, state::FULLY_PRESENT | state::PARTIALLY_PRESENT) {
                report.allocated_blocks += 1;
            }
            if e & 7 == state::PARTIALLY_PRESENT {
                let chunk = b / self.geo.chunk_ratio;
                if self.bitmap_entry(chunk) & 7 != state::FULLY_PRESENT {
                    report.errors.push(format!(
                        "block {b} is partially present but its sector bitmap is not"
                    ));
                }
            }
        }
        let file_size = view_len(&self.storage, self.overlay.as_ref())?;
        report.file_size = file_size;
        report.unreferenced_bytes = file_size.saturating_sub(self.referenced_bytes(file_size));
        Ok(report)
    }

    /// Bytes of `[0, file_size)` covered by the header section, the log, the regions and every
    /// present block.
    fn referenced_bytes(&self, file_size: u64) -> u64 {
        let bs = u64::from(self.geo.block_size);
        let mut used = structure_ranges(&self.header(), &self.regions);
        for (i, a) in self.bat.iter().enumerate() {
            let raw = a.load(Ordering::Acquire);
            let off = raw & crate::bat::OFFSET_MASK;
            let len = if self.geo.has_parent && self.geo.is_bitmap_index(i as u64) {
                BITMAP_BLOCK
            } else {
                bs
            };
            if matches!(raw & 7, state::FULLY_PRESENT | state::PARTIALLY_PRESENT) {
                used.push((off, off.saturating_add(len)));
            }
        }
        used.sort_unstable();
        let mut covered = 0;
        let mut cur = 0u64;
        for (s, e) in used {
            let (s, e) = (s.max(cur), e.min(file_size));
            if e > s {
                covered += e - s;
                cur = e;
            }
        }
        covered
    }

    /// Raw BAT entry of payload block `block`.
    pub(crate) fn entry(&self, block: u64) -> u64 {
        let i = self.geo.payload_index(block) as usize;
        self.bat.get(i).map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// Raw BAT entry of the sector bitmap of `chunk`.
    pub(crate) fn bitmap_entry(&self, chunk: u64) -> u64 {
        let i = self.geo.bitmap_index(chunk) as usize;
        self.bat.get(i).map_or(0, |a| a.load(Ordering::Acquire))
    }

    pub(crate) fn info_inner(&self) -> DiskInfo {
        DiskInfo {
            virtual_size: self.meta.virtual_size,
            logical_sector_size: self.meta.logical_sector_size,
            physical_sector_size: self.meta.physical_sector_size,
            read_only: self.read_only,
            disk_id: Some(self.meta.disk_id),
            format: "vhdx",
        }
    }
}

/// Opens `storage` read-only and checks it. Structural damage makes the open fail: that
/// error is the check's answer.
pub fn check_image<S: Storage>(storage: S) -> Result<CheckReport> {
    check_image_with(storage, false)
}

/// Opens `storage` writable, so a dirty log is replayed into the file and a damaged header
/// or region table copy rewritten, and checks it.
pub fn repair_image<S: Storage>(storage: S) -> Result<CheckReport> {
    check_image_with(storage, true)
}

fn check_image_with<S: Storage>(storage: S, repair: bool) -> Result<CheckReport> {
    let f = VhdxFile::open(storage, &crate::OpenOptions::new().read_only(!repair))?;
    let r = f.check_with(repair)?;
    f.close()?;
    Ok(r)
}

/// Opens the image at `path` on a [`block_io::FileStorage`], as `opts` say.
pub fn open_file(
    path: impl AsRef<std::path::Path>,
    opts: &crate::OpenOptions,
) -> Result<VhdxFile<block_io::FileStorage>> {
    let ro = opts.is_read_only();
    let st = block_io::FileStorage::open(path, &block_io::OpenOptions::new().read_only(ro))?;
    VhdxFile::open(st, opts)
}

/// Validates every BAT entry: states allowed for the layout, present blocks inside the file,
/// outside headers, log and regions, and not overlapping each other. Returns the end of the
/// last range in use (header section, log, regions, allocated blocks).
fn validate_bat(
    bat: &[AtomicU64],
    geo: &Geometry,
    header: &Header,
    regions: &RegionTable,
    file_len: u64,
) -> Result<u64> {
    let bs = u64::from(geo.block_size);
    let mut used = structure_ranges(header, regions);
    for (i, a) in bat.iter().enumerate() {
        let raw = a.load(Ordering::Relaxed);
        let e = BatEntry::try_from(raw)?;
        let i = i as u64;
        let is_bitmap = geo.has_parent && geo.is_bitmap_index(i);
        let len = if is_bitmap {
            // MS-VHDX 2.5.1.2: sector bitmap entries are NOT_PRESENT or PRESENT.
            match e.state {
                BlockState::NotPresent => continue,
                BlockState::FullyPresent => BITMAP_BLOCK,
                _ => {
                    return Err(corrupt_io(format!(
                        "sector bitmap entry {i} has state {}",
                        raw & 7
                    )))
                }
            }
        } else {
            match e.state {
                BlockState::FullyPresent => bs,
                // MS-VHDX 2.5.1.1: partially present only in differencing images.
                BlockState::PartiallyPresent if geo.has_parent => bs,
                BlockState::PartiallyPresent => {
                    return Err(corrupt_io(format!(
                        "block entry {i} is partially present in a non-differencing image"
                    )))
                }
                _ => continue,
            }
        };
        let end = e
            .file_offset
            .checked_add(len)
            .ok_or_else(|| corrupt_io("BAT entry overflows"))?;
        // The last block may extend past the end of the file beyond the virtual size (qemu
        // writes fixed images that way); what the disk can read must be inside the file.
        let used_len = if is_bitmap {
            len
        } else {
            let block = i - i / (geo.chunk_ratio + 1);
            len.min(geo.virtual_size.saturating_sub(block * bs))
        };
        if e.file_offset + used_len > file_len {
            return Err(corrupt_io(format!(
                "BAT entry {i} points beyond the end of the file ({} + {len} > {file_len})",
                e.file_offset
            )));
        }
        used.push((e.file_offset, end));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(corrupt_io(format!(
                "file ranges {}..{} and {}..{} overlap (BAT entries, regions or log)",
                w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
    }
    Ok(used.iter().map(|r| r.1).max().unwrap_or(MIB))
}

impl<S: Storage> BlockDevice for VhdxFile<S> {
    fn info(&self) -> DiskInfo {
        self.info_inner()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset)
    }

    unsafe fn read_raw_at(&self, bufs: &[block_io::RawBuf], offset: u64) -> Result<()> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.read_raw_inner(bufs, offset) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.zero_inner(
            offset,
            len,
            if unmap { state::UNMAPPED } else { state::ZERO },
        )
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_inner(offset, len, state::UNMAPPED)
    }

    fn flush(&self) -> Result<()> {
        self.flush_inner()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        self.block_status_inner(offset, len)
    }

    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_data_inner(buf, offset)
    }

    fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<block_io::Mapping>,
    ) -> Result<bool> {
        self.map_inner(offset, len, write, out)
    }

    fn mapped_write_failed(&self, err: &block_io::Error) {
        self.failstop.latch(err);
    }

    fn map_allocating(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        out: &mut Vec<block_io::Mapping>,
    ) -> Result<Option<Box<dyn block_io::WriteGuard>>> {
        Ok(self
            .map_allocating_shared(offset, len, out)?
            .map(|g| Box::new(g) as Box<dyn block_io::WriteGuard>))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{build_entry, EntryParams};
    use crate::{create, CreateOptions};
    use block_io::MemStorage;
    use std::sync::Arc;

    /// A clean dynamic image whose log holds one valid entry (rewriting the first BAT sector
    /// with its own bytes) claiming `last_file_offset`.
    fn dirty_with_last_file_offset(last_file_offset: u64) -> Arc<MemStorage> {
        let mem = Arc::new(MemStorage::new());
        let f = create(mem.clone(), &CreateOptions::dynamic(8 << 20)).unwrap();
        let bat = f.regions.bat.file_offset;
        f.close().unwrap();
        drop(f);
        let (mut h, slot) = read_headers(&*mem).unwrap();
        h.log_guid = Uuid::from_u128(7);
        crate::write::update_header(&*mem, h, slot).unwrap();
        let sector = read_vec(&*mem, None, bat, 4096).unwrap();
        let entry = build_entry(
            &EntryParams {
                sequence_number: 1,
                log_guid: h.log_guid,
                tail: 0,
                flushed_file_offset: 0,
                last_file_offset,
            },
            &[(bat, &sector)],
        );
        mem.write_at(&entry, h.log_offset).unwrap();
        mem
    }

    #[test]
    fn huge_last_file_offset_is_capped_not_a_panic() {
        let ok = dirty_with_last_file_offset(0);
        assert!(
            VhdxFile::open(ok, &crate::OpenOptions::new().read_only(true))
                .unwrap()
                .details()
                .log_dirty
        );
        // Was a panic (rounding overflow), then a refusal; now capped to what the layout needs.
        for lfo in [u64::MAX, 8 << 40] {
            let bad = dirty_with_last_file_offset(lfo);
            let len = bad.len().unwrap();
            let f =
                VhdxFile::open(bad.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
            assert!(f.details().log_dirty);
            assert_eq!(f.check().unwrap().file_size, len);
            drop(f);
            let f =
                VhdxFile::open(bad.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
            assert_eq!(f.state.lock().file_end, len);
            drop(f);
            assert_eq!(bad.len().unwrap(), len);
        }
    }
}
