//! [`receive`]: a stream into a new image (written beside, renamed into place at the end) or,
//! for an incremental stream, into its base snapshot (checked, spooled and verified first,
//! then applied from its journal); [`resume`]: an interrupted apply finished from its
//! journal.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, FileStorage, LockMode, RawDisk, RawOptions, Storage};
use chain::Format;

use super::journal::{self, ResumeReport};
use super::temp::{self, TempFile};
use super::wire::{self, Record, StreamHeader, StreamIdentity, StreamReader};
use super::SendError;

/// How to receive.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// The format of a new image; `None` picks it by the destination's extension (`.vhd`,
    /// `.vhdx`, anything else raw). Ignored for an incremental stream.
    pub format: Option<Format>,
    /// Image locks on the destination.
    pub lock: LockMode,
    /// Progress counters the caller can watch from another thread.
    pub progress: Option<Arc<ReceiveProgress>>,
}

/// Progress of a running [`receive`].
#[derive(Debug, Default)]
pub struct ReceiveProgress {
    stream: AtomicU64,
    applied: AtomicU64,
    total: AtomicU64,
    /// Bytes applied from a finished journal, plus one (0: none finished).
    resumed: AtomicU64,
}

impl ReceiveProgress {
    /// Stream bytes read so far (for an incremental stream: read and verified).
    pub fn stream_bytes(&self) -> u64 {
        self.stream.load(Ordering::Relaxed)
    }

    /// Bytes of the disk written so far (data and zero ranges).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// The destination's virtual size, known once the header is read.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Once an interrupted receive into the destination was finished from its journal
    /// (before the stream was read): the bytes applied again (data and zero ranges). Set
    /// even if the stream then fails.
    pub fn resumed(&self) -> Option<u64> {
        self.resumed.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Records that a journal was finished, `bytes` applied from it.
    pub(super) fn set_resumed(&self, bytes: u64) {
        self.resumed
            .store(bytes.saturating_add(1), Ordering::Relaxed);
    }

    /// Sets the total (a journal's virtual size) and restarts the bytes applied.
    pub(super) fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.applied.store(0, Ordering::Relaxed);
    }
}

/// What a [`receive`] did.
#[derive(Debug, Clone)]
pub struct ReceiveReport {
    /// The stream's header.
    pub header: StreamHeader,
    /// The destination's format.
    pub format: Format,
    /// Whether the stream was incremental (applied to an existing image).
    pub incremental: bool,
    /// DATA and ZERO records.
    pub records: u64,
    /// Bytes written from DATA records.
    pub data_bytes: u64,
    /// Bytes of ZERO records.
    pub zero_bytes: u64,
    /// Bytes of the stream.
    pub stream_bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// An interrupted receive into the destination, finished from its journal before this
    /// stream was read.
    pub resumed: Option<ResumeReport>,
    /// The stream is the one whose journal was just finished: it was read and verified,
    /// and nothing was written for it (the totals are the stream's).
    pub already_applied: bool,
    /// Temporary files beside the destination that a receive into it which died had left
    /// (its process gone), removed before this one began (by [`receive`] only).
    pub removed_stale: Vec<PathBuf>,
}

pub(super) fn dest_err(op: &str, path: &Path) -> impl FnOnce(block_io::Error) -> SendError {
    let (op, path) = (op.to_string(), path.to_path_buf());
    move |source| SendError::Destination { op, path, source }
}

/// The format of a new image named `dest`.
fn format_for(dest: &Path, asked: Option<Format>) -> Format {
    asked.unwrap_or_else(|| {
        match dest
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("vhd") | Some("vpc") => Format::Vhd,
            Some("vhdx") => Format::Vhdx,
            _ => Format::Raw,
        }
    })
}

/// Makes an empty image of `format` for `h` in the (empty) file `path`.
fn create_image(
    path: &Path,
    format: Format,
    h: &StreamHeader,
    lock: LockMode,
) -> Result<Box<dyn BlockDevice>, SendError> {
    let storage = FileStorage::open(path, &block_io::OpenOptions::new().lock(lock))
        .map_err(dest_err("open", path))?;
    create_on(storage, path, format, h)
}

/// Makes an empty image of `format` for `h` in the empty `storage` (`path` names it in
/// errors).
fn create_on<S: Storage + 'static>(
    storage: S,
    path: &Path,
    format: Format,
    h: &StreamHeader,
) -> Result<Box<dyn BlockDevice>, SendError> {
    let size = h.virtual_size;
    let dev: Box<dyn BlockDevice> = match format {
        Format::Raw => {
            storage.set_len(size).map_err(dest_err("size", path))?;
            Box::new(
                RawDisk::open(
                    storage,
                    &RawOptions::new().sector_size(h.logical_sector_size),
                )
                .map_err(dest_err("open", path))?,
            )
        }
        Format::Vhd => {
            if h.logical_sector_size != 512 {
                return Err(SendError::Geometry {
                    dest: path.to_path_buf(),
                    why: format!(
                        "a VHD has 512-byte sectors, the stream {}-byte ones",
                        h.logical_sector_size
                    ),
                });
            }
            let o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
            Box::new(vhd_format::VhdFile::create(storage, &o).map_err(dest_err("create", path))?)
        }
        Format::Vhdx => {
            let o = vhdx_format::CreateOptions {
                logical_sector_size: h.logical_sector_size,
                physical_sector_size: Some(
                    h.physical_sector_size.clamp(h.logical_sector_size, 4096),
                ),
                ..vhdx_format::CreateOptions::dynamic(size)
            };
            Box::new(vhdx_format::VhdxFile::create(storage, &o).map_err(dest_err("create", path))?)
        }
    };
    if dev.info().virtual_size != size {
        return Err(SendError::Geometry {
            dest: path.to_path_buf(),
            why: format!(
                "the new {format} image has {} bytes, the stream {size}",
                dev.info().virtual_size
            ),
        });
    }
    Ok(dev)
}

/// Totals of the records applied.
#[derive(Default)]
pub(super) struct Totals {
    pub(super) records: u64,
    pub(super) data: u64,
    pub(super) zero: u64,
}

impl Totals {
    /// The report of a stream with header `h` received into an image of `format`.
    fn report(
        self,
        h: StreamHeader,
        format: Format,
        stream_bytes: u64,
        start: Instant,
    ) -> ReceiveReport {
        ReceiveReport {
            incremental: h.base.is_some(),
            header: h,
            format,
            records: self.records,
            data_bytes: self.data,
            zero_bytes: self.zero,
            stream_bytes,
            elapsed: start.elapsed(),
            resumed: None,
            already_applied: false,
            removed_stale: Vec::new(),
        }
    }
}

/// A stream being received: its reader (able to spool what it reads), header, progress
/// counters (the total set from the header) and start time.
struct Incoming<'a> {
    r: StreamReader<TeeRead<BufReader<&'a mut dyn Read>>>,
    h: StreamHeader,
    progress: Arc<ReceiveProgress>,
    start: Instant,
}

impl<'a> Incoming<'a> {
    /// Reads the header from `input`.
    fn open(input: &'a mut dyn Read, opts: &ReceiveOptions) -> Result<Incoming<'a>, SendError> {
        let start = Instant::now();
        let progress = opts.progress.clone().unwrap_or_default();
        let mut r = StreamReader::new(TeeRead {
            inner: BufReader::with_capacity(1 << 20, input),
            spool: None,
            spool_err: None,
        });
        let h = r.read_header()?;
        progress.total.store(h.virtual_size, Ordering::Relaxed);
        Ok(Incoming {
            r,
            h,
            progress,
            start,
        })
    }

    /// The report once the stream went into an image of `format`.
    fn report(self, format: Format, t: Totals) -> ReceiveReport {
        let stream_bytes = self.progress.stream_bytes();
        t.report(self.h, format, stream_bytes, self.start)
    }
}

/// Reads records from `r` to END, writing each to `dev` (when given; ZERO records only when
/// `zeroes`), and returns the totals. Without `dev` it only verifies (decompressing too).
pub(super) fn apply<R: Read>(
    r: &mut StreamReader<R>,
    dev: Option<(&dyn BlockDevice, &Path)>,
    zeroes: bool,
    progress: &ReceiveProgress,
    count_stream: bool,
) -> Result<Totals, SendError> {
    let mut dec = zstd::bulk::Decompressor::new()
        .map_err(|e| SendError::Invalid(format!("zstd decompressor: {e}")))?;
    let mut buf = Vec::new();
    let mut t = Totals::default();
    loop {
        let at = r.position();
        let rec = r.next_record()?;
        if count_stream {
            progress.stream.store(r.position(), Ordering::Relaxed);
        }
        match rec {
            Record::Data { offset, len, codec } => {
                wire::decode_payload(
                    codec,
                    r.payload(),
                    len,
                    &mut buf,
                    t.records + 1,
                    at,
                    &mut dec,
                )?;
                if let Some((dev, path)) = dev {
                    dev.write_at(&buf, offset)
                        .map_err(dest_err(&format!("write offset {offset} of"), path))?;
                }
                t.data += u64::from(len);
                progress
                    .applied
                    .fetch_add(u64::from(len), Ordering::Relaxed);
            }
            Record::Zero { offset, len } => {
                if let (Some((dev, path)), true) = (dev, zeroes) {
                    let mut o = offset;
                    while o < offset + len {
                        let n = (offset + len - o).min(1 << 30);
                        dev.write_zeroes(o, n, true)
                            .map_err(dest_err(&format!("zero offset {o} of"), path))?;
                        o += n;
                    }
                }
                t.zero += len;
                progress.applied.fetch_add(len, Ordering::Relaxed);
            }
            Record::End { .. } => return Ok(t),
        }
        t.records += 1;
    }
}

/// Reads and checks a whole stream without writing anything (every checksum, bound, the
/// zstd payloads and the END record): what [`receive`] verifies before it applies an
/// incremental stream. Returns the header and the totals as a report.
pub fn verify(input: &mut dyn Read) -> Result<ReceiveReport, SendError> {
    let start = Instant::now();
    let progress = ReceiveProgress::default();
    let mut r = StreamReader::new(BufReader::with_capacity(1 << 20, input));
    let h = r.read_header()?;
    let t = apply(&mut r, None, false, &progress, true)?;
    let format = h.format;
    Ok(t.report(h, format, r.position(), start))
}

/// Opens the existing `dest` read-write as a chain.
fn open_dest(dest: &Path, opts: &ReceiveOptions) -> Result<chain::Disk, SendError> {
    Ok(chain::Disk::open(
        dest,
        &chain::OpenOptions::new().read_only(false).lock(opts.lock),
    )?)
}

/// Reads a stream from `input` into `dest`: a new image for a full stream (refused if
/// `dest` exists), the existing base snapshot for an incremental one. An interrupted
/// receive into `dest` (its journal, [`journal_path`](super::journal_path)) is finished
/// first, before the stream is read; a journal beside a `dest` that does not exist is
/// refused. Before that, temporary files that a receive into `dest` which died left beside
/// it are removed ([`ReceiveReport::removed_stale`]). See the module docs for what is checked and what a failure leaves behind.
pub fn receive(
    input: &mut dyn Read,
    dest: &Path,
    opts: &ReceiveOptions,
) -> Result<ReceiveReport, SendError> {
    let removed_stale = temp::remove_stale(dest);
    let journal = journal::journal_path(dest);
    let exists = std::fs::symlink_metadata(dest).is_ok();
    let mut opened = None;
    let mut resumed = None;
    if journal::exists(&journal)? {
        if !exists {
            return Err(SendError::JournalOrphan {
                journal,
                dest: dest.to_path_buf(),
            });
        }
        let progress = opts.progress.clone().unwrap_or_default();
        let verified = journal::verify(&journal, &progress)?;
        let disk = open_dest(dest, opts)?;
        resumed = Some(journal::finish(&disk, dest, verified, &progress)?);
        opened = Some(disk);
    }
    let mut inc = Incoming::open(input, opts)?;
    let (format, t, already) = match &inc.h.base {
        None => {
            if exists {
                return Err(SendError::DestExists(dest.to_path_buf()));
            }
            let format = format_for(dest, opts.format);
            let mut tmp = TempFile::beside(dest, "recv")?;
            let dev = create_image(&tmp.path, format, &inc.h, opts.lock)?;
            let t = apply(&mut inc.r, Some((&*dev, dest)), false, &inc.progress, true)?;
            dev.flush().map_err(dest_err("flush", dest))?;
            drop(dev);
            File::open(&tmp.path)
                .and_then(|f| f.sync_all())
                .map_err(|source| SendError::File {
                    op: "sync",
                    path: tmp.path.clone(),
                    source,
                })?;
            if std::fs::symlink_metadata(dest).is_ok() {
                return Err(SendError::DestExists(dest.to_path_buf()));
            }
            std::fs::rename(&tmp.path, dest).map_err(|source| SendError::File {
                op: "rename the received image to",
                path: dest.to_path_buf(),
                source,
            })?;
            tmp.keep = true;
            journal::sync_folder_of(dest)?;
            (format, t, false)
        }
        Some(_) => {
            if !exists {
                return Err(SendError::DestMissing(dest.to_path_buf()));
            }
            let disk = match opened {
                Some(d) => d,
                None => open_dest(dest, opts)?,
            };
            into_existing(&mut inc, &disk, dest, dest, resumed.as_ref())?
        }
    };
    let mut report = inc.report(format, t);
    report.resumed = resumed;
    report.already_applied = already;
    report.removed_stale = removed_stale;
    Ok(report)
}

/// Finishes the interrupted incremental receive into `dest` from its journal
/// ([`journal_path`](super::journal_path)): the journal is verified whole (refused with
/// [`SendError::Journal`], `dest` untouched, if it does not verify), `dest` checked to be
/// the image it was written for (its geometry and the part of its identity a write keeps,
/// not its lineage), every record applied again, `dest` flushed and the journal removed.
/// Fails with [`SendError::NoJournal`] when there is none.
pub fn resume(dest: &Path, opts: &ReceiveOptions) -> Result<ResumeReport, SendError> {
    let journal = journal::journal_path(dest);
    if !journal::exists(&journal)? {
        return Err(SendError::NoJournal {
            dest: dest.to_path_buf(),
            journal,
        });
    }
    if std::fs::symlink_metadata(dest).is_err() {
        return Err(SendError::JournalOrphan {
            journal,
            dest: dest.to_path_buf(),
        });
    }
    let progress = opts.progress.clone().unwrap_or_default();
    let verified = journal::verify(&journal, &progress)?;
    let disk = open_dest(dest, opts)?;
    journal::finish(&disk, dest, verified, &progress)
}

/// [`resume`] on a chain the caller opened, whose journal is in `spool_dir` (as
/// [`receive_into`] leaves it): `None` when there is no journal.
pub fn resume_into(
    disk: &chain::Disk,
    spool_dir: &Path,
    opts: &ReceiveOptions,
) -> Result<Option<ResumeReport>, SendError> {
    let (dest, beside) = spool_names(disk, spool_dir);
    let journal = journal::journal_path(&beside);
    if !journal::exists(&journal)? {
        return Ok(None);
    }
    let progress = opts.progress.clone().unwrap_or_default();
    let verified = journal::verify(&journal, &progress)?;
    journal::finish(disk, &dest, verified, &progress).map(Some)
}

/// The path of `disk`'s top image, and the same name in `spool_dir`.
fn spool_names(disk: &chain::Disk, spool_dir: &Path) -> (PathBuf, PathBuf) {
    let dest = disk.layers()[0].path.clone();
    let name = dest.file_name().unwrap_or(std::ffi::OsStr::new("image"));
    let beside = spool_dir.join(name);
    (dest, beside)
}

/// A full stream from `input` written into a new image of `format` made in `storage`,
/// which must be empty (`name` names it in errors): what [`receive`] does in its temporary
/// file before it syncs the file and renames it into place. Returns once the END record
/// checked out and the image was flushed (its storage synced). An incremental stream is
/// refused with [`SendError::Invalid`] before anything is written. For callers that keep
/// images on storage of their own, and for crash tests on the fault backend.
pub fn receive_new<S: Storage + 'static>(
    input: &mut dyn Read,
    storage: S,
    format: Format,
    name: &Path,
    opts: &ReceiveOptions,
) -> Result<ReceiveReport, SendError> {
    let mut inc = Incoming::open(input, opts)?;
    if inc.h.base.is_some() {
        return Err(SendError::Invalid(
            "an incremental stream goes into its base snapshot (receive_into)".into(),
        ));
    }
    let dev = create_on(storage, name, format, &inc.h)?;
    let t = apply(&mut inc.r, Some((&*dev, name)), false, &inc.progress, true)?;
    dev.flush().map_err(dest_err("flush", name))?;
    Ok(inc.report(format, t))
}

/// An incremental stream from `input` applied to `disk`, an open chain whose top image is
/// the stream's base snapshot: what [`receive`] does once it has opened its destination,
/// with the spool and the journal in `spool_dir` (named after the top image's file) instead
/// of beside it. An interrupted receive whose journal is there is finished first, as
/// [`resume_into`] does. A full stream is refused with [`SendError::Invalid`]. For callers
/// that keep images on storage of their own, and for crash tests on the fault backend.
pub fn receive_into(
    input: &mut dyn Read,
    disk: &chain::Disk,
    spool_dir: &Path,
    opts: &ReceiveOptions,
) -> Result<ReceiveReport, SendError> {
    let resumed = resume_into(disk, spool_dir, opts)?;
    let mut inc = Incoming::open(input, opts)?;
    if inc.h.base.is_none() {
        return Err(SendError::Invalid(
            "a full stream makes a new image (receive or receive_new)".into(),
        ));
    }
    let (dest, beside) = spool_names(disk, spool_dir);
    let (format, t, already) = into_existing(&mut inc, disk, &dest, &beside, resumed.as_ref())?;
    let mut report = inc.report(format, t);
    report.resumed = resumed;
    report.already_applied = already;
    Ok(report)
}

/// The incremental stream `inc` into `disk` (named `dest` in errors), its spool and journal
/// beside `spool_beside`. When it is the stream of the journal just finished (`resumed`,
/// same header), it is only read and verified, and the flag returned is set.
fn into_existing(
    inc: &mut Incoming<'_>,
    disk: &chain::Disk,
    dest: &Path,
    spool_beside: &Path,
    resumed: Option<&ResumeReport>,
) -> Result<(Format, Totals, bool), SendError> {
    if resumed.is_some_and(|r| r.header == inc.h) {
        let t = apply(&mut inc.r, None, false, &inc.progress, true)?;
        return Ok((disk.layers()[0].format, t, true));
    }
    let (format, t) = incremental(&mut inc.r, &inc.h, disk, dest, spool_beside, &inc.progress)?;
    Ok((format, t, false))
}

/// Refuses `disk` (named `dest`) if its size or sector size is not the stream's.
pub(super) fn check_geometry(
    disk: &chain::Disk,
    h: &StreamHeader,
    dest: &Path,
) -> Result<(), SendError> {
    let info = disk.info();
    if info.virtual_size != h.virtual_size || info.logical_sector_size != h.logical_sector_size {
        return Err(SendError::Geometry {
            dest: dest.to_path_buf(),
            why: format!(
                "it has {} bytes in {}-byte sectors, the stream {} in {}-byte ones",
                info.virtual_size, info.logical_sector_size, h.virtual_size, h.logical_sector_size
            ),
        });
    }
    Ok(())
}

/// An incremental stream whose header `h` was read from `r` applied to `disk` (named `dest`
/// in errors): geometry and lineage checked, the rest of the stream spooled into a
/// temporary file beside `spool_beside` and verified, the spool synced and renamed to the
/// journal (`spool_beside` + `.vdisk-receive`) and the folder synced; then the journal
/// applied, the disk flushed, the journal removed and the folder synced. A failure after
/// the rename keeps the journal ([`SendError::Interrupted`]).
fn incremental<R: Read>(
    r: &mut StreamReader<TeeRead<R>>,
    h: &StreamHeader,
    disk: &chain::Disk,
    dest: &Path,
    spool_beside: &Path,
    progress: &ReceiveProgress,
) -> Result<(Format, Totals), SendError> {
    check_geometry(disk, h, dest)?;
    let top = &disk.layers()[0];
    let found = StreamIdentity::of_layer(top).map_err(dest_err("read", dest))?;
    if Some(&found) != h.base.as_ref() {
        return Err(SendError::Lineage {
            dest: dest.to_path_buf(),
            expected: h
                .base
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
            found: found.to_string(),
        });
    }
    let format = top.format;
    // Verify the whole stream into a spool file before touching the destination.
    let mut spool = TempFile::beside(spool_beside, "spool")?;
    let spool_err = |source| SendError::File {
        op: "write the spool file",
        path: spool.path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&spool.path)
        .map_err(spool_err)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    // The journal's head, and the stream's header read before the spool was opened.
    out.write_all(&journal::encode_head(&found))
        .and_then(|()| out.write_all(&h.encode()))
        .map_err(spool_err)?;
    let tee = r.inner_mut();
    tee.spool = Some(out);
    let verified = apply(r, None, false, progress, true);
    let tee = r.inner_mut();
    if let Some(e) = tee.spool_err.take() {
        return Err(spool_err(e));
    }
    verified?;
    if let Some(out) = tee.spool.take() {
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(spool_err)?;
    }
    // The verified spool becomes the journal: durable before the destination is written.
    let journal = journal::journal_path(spool_beside);
    std::fs::rename(&spool.path, &journal).map_err(|source| SendError::File {
        op: "rename the spool file to",
        path: journal.clone(),
        source,
    })?;
    spool.keep = true;
    if let Err(e) = journal::sync_folder_of(&journal) {
        // The destination is untouched: drop the journal rather than leave it half-made.
        let _ = std::fs::remove_file(&journal);
        return Err(e);
    }
    let interrupted = |e: SendError| SendError::Interrupted {
        dest: dest.to_path_buf(),
        journal: journal.clone(),
        source: Box::new(e),
    };
    let mut j = journal::open(&journal).map_err(interrupted)?;
    progress.applied.store(0, Ordering::Relaxed);
    let t = apply(&mut j.r, Some((disk, dest)), true, progress, false).map_err(interrupted)?;
    disk.flush()
        .map_err(dest_err("flush", dest))
        .map_err(interrupted)?;
    journal::remove(&journal)?;
    Ok((format, t))
}

/// The stream's input, copied into a spool file once one is set.
struct TeeRead<R> {
    inner: R,
    spool: Option<std::io::BufWriter<File>>,
    /// The first failed spool write (reported as such, not as a stream read error).
    spool_err: Option<std::io::Error>,
}

impl<R: Read> Read for TeeRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(s) = &mut self.spool {
            if let Err(e) = s.write_all(&buf[..n]) {
                let msg = e.to_string();
                self.spool_err = Some(e);
                return Err(std::io::Error::other(msg));
            }
        }
        Ok(n)
    }
}
