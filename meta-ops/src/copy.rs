//! Moving one range of blocks from the source to the destination: the body of every chunk
//! a copy or convert job runs (and of the pivot's last pass).
//!
//! The source's [`block_status`](BlockDevice::block_status) splits the range into runs. Runs
//! that read as zeros are skipped when the destination is known to hold zeros there (a fresh
//! image that neither the job nor the guest has written at those blocks), else written with
//! `write_zeroes(unmap)`. Data runs go, when both disks map them to plain files
//! ([`BlockDevice::map`]), through `copy_file_range(2)` file to file (the kernel may share the
//! extents or copy inside the file system, never through our memory); otherwise, or when the
//! file system refuses, through a buffer: `read_at` then `write_at`. Parallelism comes from the
//! job running several chunks at once.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, BlockStatus, Mapping};

use crate::error::JobError;
use crate::handle::{JobReport, Shared};
use crate::job::JobOptions;
use crate::live::{LiveDisk, Pace, Tracker};

/// Largest buffer a buffered copy uses (longer runs go in pieces).
const MAX_BUF: u64 = 1 << 20;

/// Most bytes a chunk copies under one range lock.
const LOCK_PIECE: u64 = 256 << 10;

/// Most bytes a chunk's `copy_file_range` writes leave in the destination's page cache
/// before the chunk waits for the oldest of them to reach the disk ([`WriteBehind`]).
const WRITE_BEHIND: u64 = 4 << 20;

/// A destination file range a copy wrote: descriptor, offset, length.
type Written = (i32, u64, u64);

/// Write-behind of a chunk's `copy_file_range` output: each range is sent to the disk as
/// soon as it is written (`sync_file_range(2)` `SYNC_FILE_RANGE_WRITE`), and once more than
/// [`WRITE_BEHIND`] bytes are on their way the chunk waits for the oldest and drops their
/// pages from the page cache (`POSIX_FADV_DONTNEED`).
///
/// Three things come of it while a guest runs beside the job:
/// - the job's disk writes happen inside its paced steps ([`LiveDisk::paced_step`]), where
///   the guest-share feedback sees what they cost the guest, rather than later in the
///   kernel's write-back, where nothing paces them;
/// - the pivot's flush finds little left to write: with 1-2 GiB left dirty it held the
///   guests' flushes back, and their requests fell to a tenth for half a second;
/// - what the job wrote leaves the page cache. `copy_file_range` fills it with large folios,
///   and a 4 KiB guest write into one (a write-through to the destination, or the guest's
///   writes after a switching pivot) walks and dirties the whole folio (`perf`: most of the
///   guests' time in `ext4_block_write_begin`). Written anew, a block comes back as a
///   4 KiB page. The price: after a switching pivot the guest reads from the disk what the
///   job wrote, as after a copy with `O_DIRECT`; and a copy that only backs the disk up no
///   longer fills the page cache.
///
/// Measured with `vdisk stress --job convert` (1 GiB VHDX, 4 guests, two runs each), guest
/// requests during the job against idle: 0.75 and 0.77 with the guest-share feedback alone,
/// 0.84 and 0.86 with this too. Before the feedback, in the write-through phase: 27,000 ->
/// 37,000 guest requests a second.
///
/// Only hints and waits: a range whose descriptor the kernel refuses is skipped, and data is
/// made durable by the destination's flush as before, never by this.
#[derive(Default)]
struct WriteBehind {
    /// What the copies wrote since the last step (filled by [`Copier::range`]).
    written: Vec<Written>,
    pending: std::collections::VecDeque<Written>,
    bytes: u64,
}

impl WriteBehind {
    /// Starts the write-back of what the copies wrote since the last step, then waits for
    /// the oldest ranges while more than [`WRITE_BEHIND`] bytes are pending.
    fn step(&mut self) {
        for (fd, off, len) in std::mem::take(&mut self.written) {
            sync_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE);
            self.pending.push_back((fd, off, len));
            self.bytes += len;
        }
        while self.bytes > WRITE_BEHIND {
            self.settle_oldest();
        }
    }

    /// Waits for every pending range.
    fn finish(&mut self) {
        self.step();
        while !self.pending.is_empty() {
            self.settle_oldest();
        }
    }

    fn settle_oldest(&mut self) {
        let Some((fd, off, len)) = self.pending.pop_front() else {
            return;
        };
        self.bytes -= len;
        sync_range(
            fd,
            off,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
        if let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
            // SAFETY: an advice on a descriptor the destination device keeps open while the
            // job holds it (the copier does, for as long as this chunk runs); no memory.
            unsafe { libc::posix_fadvise(fd, o, l, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// `sync_file_range(2)` of `[off, off+len)` of `fd` with `flags`; errors ignored (a hint).
fn sync_range(fd: i32, off: u64, len: u64, flags: libc::c_uint) {
    if let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) {
        // SAFETY: as in `WriteBehind::settle_oldest`: a descriptor the destination device
        // keeps open while the job runs; no memory of ours is involved.
        unsafe { libc::sync_file_range(fd, o, l, flags) };
    }
}

/// Byte counters of how a job moved its data.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Bytes moved by `copy_file_range`.
    pub(crate) cfr: AtomicU64,
    /// Bytes moved through a buffer.
    pub(crate) buffered: AtomicU64,
    /// Bytes written as zeros.
    pub(crate) zeroed: AtomicU64,
    /// Zero bytes skipped (the destination already reads zeros there).
    pub(crate) skipped: AtomicU64,
    /// Times a chunk waited for guest requests first.
    pub(crate) yields: AtomicU64,
}

/// What moves blocks for one job.
pub(crate) struct Copier {
    pub(crate) src: Arc<dyn BlockDevice>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) live: Arc<LiveDisk>,
    /// The destination read zeros everywhere when the job started.
    pub(crate) dest_zeroed: bool,
    /// A merge: the source reports `Unallocated` where the destination (the base) already
    /// holds what the guest sees; those runs are left alone, zero runs are written.
    pub(crate) merge: bool,
    /// Try `copy_file_range` (cleared for the rest of the job when the kernel refuses).
    pub(crate) use_cfr: AtomicBool,
    pub(crate) counters: Counters,
    /// The longest a chunk waits for guest requests before it goes anyway.
    pub(crate) yield_cap: Duration,
    /// How chunk pieces give way to a busy guest ([`crate::JobOptions::busy_duty`],
    /// [`crate::JobOptions::guest_share`]).
    pub(crate) pace: Pace,
}

impl std::fmt::Debug for Copier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copier")
            .field("tracker", &self.tracker)
            .field("dest_zeroed", &self.dest_zeroed)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// How a `copy_file_range` loop ended.
enum Cfr {
    Done,
    /// The kernel cannot do it (or the source ended early) after `done` bytes.
    Unsupported(u64),
}

fn src_err(offset: u64) -> impl FnOnce(block_io::Error) -> JobError {
    move |source| JobError::Source { offset, source }
}

fn dst_err(op: &'static str, offset: u64) -> impl FnOnce(block_io::Error) -> JobError {
    move |source| JobError::Destination { op, offset, source }
}

impl Copier {
    /// A copier from `src` into `tracker`'s destination for a job on `live` with options `o`.
    pub(crate) fn new(
        src: Arc<dyn BlockDevice>,
        tracker: Arc<Tracker>,
        live: &Arc<LiveDisk>,
        dest_zeroed: bool,
        merge: bool,
        o: &JobOptions,
    ) -> Copier {
        Copier {
            src,
            tracker,
            live: live.clone(),
            dest_zeroed,
            merge,
            use_cfr: AtomicBool::new(o.copy_file_range),
            counters: Counters::default(),
            yield_cap: o.yield_cap,
            pace: Pace::of(o),
        }
    }

    /// The report of a copying job (copy, convert, commit, mirror) that started at `t0`,
    /// made `passes` passes and paused guest I/O `pause` in all.
    pub(crate) fn report(
        &self,
        shared: &Shared,
        t0: Instant,
        passes: u32,
        pause: Duration,
    ) -> JobReport {
        let c = &self.counters;
        let t = &self.tracker;
        JobReport {
            kind: shared.kind,
            bytes: shared.done.load(Ordering::Acquire),
            copy_file_range_bytes: c.cfr.load(Ordering::Relaxed),
            buffered_bytes: c.buffered.load(Ordering::Relaxed),
            zeroed_bytes: c.zeroed.load(Ordering::Relaxed),
            skipped_bytes: c.skipped.load(Ordering::Relaxed),
            blocks_dirtied: t.marked.load(Ordering::Relaxed),
            written_through: t.through_bytes.load(Ordering::Relaxed),
            passes,
            yields: c.yields.load(Ordering::Relaxed),
            duration: t0.elapsed(),
            pivot_pause: pause,
            max_guest_wait: self.live.guest_stats().max_wait.max(pause),
            generation: self.live.generation(),
        }
    }

    /// The priority rule ([`LiveDisk::yield_to_guests`]).
    pub(crate) fn yield_to_guests(&self) -> bool {
        self.live
            .yield_to_guests(self.yield_cap, &self.counters.yields)
    }

    /// A chunk: the dirty blocks `runs` (bit ranges the job claimed), copied in pieces of at
    /// most [`LOCK_PIECE`] bytes, each under an exclusive range lock so that no guest change
    /// overlaps it, and each after the guest requests already in flight (priority). Short
    /// pieces keep a guest that writes into a chunk from waiting for all of it. Returns the
    /// bytes handled.
    pub(crate) fn chunk(&self, runs: &[(u64, u64)]) -> Result<u64, JobError> {
        let mut behind = WriteBehind::default();
        let r = self.chunk_pieces(runs, &mut behind);
        // Also after an error: nothing is left to the kernel's own write-back.
        behind.finish();
        r
    }

    /// The body of [`chunk`](Self::chunk).
    fn chunk_pieces(&self, runs: &[(u64, u64)], behind: &mut WriteBehind) -> Result<u64, JobError> {
        let mut bytes = 0;
        for &(first, last) in runs {
            let (a, b) = self.tracker.span(first, last);
            let mut pos = a;
            while pos < b {
                let end = b.min(pos.saturating_add(LOCK_PIECE));
                self.yield_to_guests();
                // A busy guest gets most of the time (JobOptions::busy_duty and guest_share),
                // the piece's disk writes included (WriteBehind).
                self.live.paced_step(self.pace, || {
                    let r = {
                        let _g = self.live.range_lock().lock_exclusive(pos, end - pos);
                        self.range(pos, end, &mut behind.written)
                    };
                    behind.step();
                    r
                })?;
                pos = end;
            }
            bytes += b - a;
        }
        Ok(bytes)
    }

    /// Copies the bit ranges `runs` with no lock taken (the caller holds what it needs).
    pub(crate) fn runs(&self, runs: &[(u64, u64)]) -> Result<u64, JobError> {
        let mut bytes = 0;
        for &(first, last) in runs {
            let (a, b) = self.tracker.span(first, last);
            // The caller flushes the destination next: nothing to write behind.
            self.range(a, b, &mut Vec::new())?;
            bytes += b - a;
        }
        Ok(bytes)
    }

    /// Copies source bytes `[a, b)`, adding the destination file ranges `copy_file_range`
    /// wrote to `written`.
    fn range(&self, a: u64, b: u64, written: &mut Vec<Written>) -> Result<(), JobError> {
        let sector = u64::from(self.src.info().logical_sector_size.max(1));
        let mut pos = a;
        while pos < b {
            let run = self.src.block_status(pos, b - pos).map_err(src_err(pos))?;
            let n = run.len.max(sector).min(b - pos);
            match run.status {
                BlockStatus::Data => self.data(pos, n, written)?,
                BlockStatus::Unallocated if self.merge => self.below_merged(pos, n)?,
                BlockStatus::Zero | BlockStatus::Unallocated => self.zero(pos, n)?,
            }
            pos += n;
        }
        Ok(())
    }

    /// A merge's source bytes `[pos, pos+n)` that no merged layer holds: the base holds what
    /// the guest sees there and they are skipped, except in blocks a guest discard uncovered
    /// ([`Tracker::uncovered`]). There the base may hold what the job copied before the
    /// discard, while the guest's chain reads the base through its own read-only handle,
    /// whose block table and sector bitmaps date from before the job allocated or wrote
    /// them (it reads zeros, or the base's parent): what the guest sees is copied into the
    /// base, so that it reads the same after the pivot.
    fn below_merged(&self, pos: u64, n: u64) -> Result<(), JobError> {
        let t = &self.tracker;
        let uncovered = |bit: u64| !t.uncovered.all_clear(bit, bit + 1);
        let end = pos + n;
        let mut at = pos;
        while at < end {
            let Some((x, _)) = t.bits(at, end - at) else {
                self.counters.skipped.fetch_add(end - at, Ordering::Relaxed);
                break;
            };
            let copy = uncovered(x);
            let mut y = x + 1;
            while t.span(x, y).1 < end && uncovered(y) == copy {
                y += 1;
            }
            let stop = t.span(x, y).1.min(end);
            if copy {
                self.buffered(at, stop - at, false)?;
            } else {
                self.counters
                    .skipped
                    .fetch_add(stop - at, Ordering::Relaxed);
            }
            at = stop;
        }
        Ok(())
    }

    /// `true` when the destination still reads zeros at `[pos, pos+n)`: it did when the job
    /// started, and no chunk of the job has written there since.
    fn fresh(&self, pos: u64, n: u64) -> bool {
        self.dest_zeroed
            && self
                .tracker
                .bits(pos, n)
                .is_none_or(|(x, y)| self.tracker.touched.all_clear(x, y))
    }

    fn zero(&self, pos: u64, n: u64) -> Result<(), JobError> {
        self.zeros_in_data(pos, n, self.fresh(pos, n))
    }

    fn data(&self, pos: u64, n: u64, written: &mut Vec<Written>) -> Result<(), JobError> {
        // Zeros inside this run may be skipped only where the destination still reads zeros.
        let fresh = self.fresh(pos, n);
        if let Some((x, y)) = self.tracker.bits(pos, n) {
            self.tracker.touched.set(x, y);
        }
        let mut done = 0;
        if self.use_cfr.load(Ordering::Relaxed) {
            done = self.mapped(pos, n, fresh, written)?;
        }
        if done < n {
            self.buffered(pos + done, n - done, fresh)?;
        }
        Ok(())
    }

    /// Source bytes `[pos, pos+n)` read as zeros (a zero run, a hole of the file inside a data
    /// run, or a buffer of zeros): skipped when the destination is `fresh` there, else zeroed.
    fn zeros_in_data(&self, pos: u64, n: u64, fresh: bool) -> Result<(), JobError> {
        if fresh {
            self.counters.skipped.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let at = self.tracker.dest_pos(pos);
        self.tracker
            .dest
            .write_zeroes(at, n, true)
            .map_err(dst_err("zero", at))?;
        self.counters.zeroed.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Moves `[pos, pos+n)` with `copy_file_range` where both disks map it to files; returns
    /// how many leading bytes it moved (0 when it could not map) and adds the destination file
    /// ranges it wrote to `written`.
    fn mapped(
        &self,
        pos: u64,
        n: u64,
        fresh: bool,
        written: &mut Vec<Written>,
    ) -> Result<u64, JobError> {
        let dest = &self.tracker.dest;
        let at = self.tracker.dest_pos(pos);
        let mut sm = Vec::new();
        if !self.src.map(pos, n, false, &mut sm).map_err(src_err(pos))? {
            return Ok(0);
        }
        let mut dm = Vec::new();
        if !dest
            .map(at, n, true, &mut dm)
            .map_err(dst_err("write", at))?
        {
            return Ok(0);
        }
        // Only file-to-file pieces: anything else goes through the buffer.
        let files = |m: &[Mapping]| m.iter().all(|p| matches!(p, Mapping::File { .. }));
        if !files(&sm) || !files(&dm) {
            return Ok(0);
        }
        let (mut i, mut j, mut si, mut dj, mut done) = (0usize, 0usize, 0u64, 0u64, 0u64);
        while done < n {
            let (
                Some(&Mapping::File {
                    handle: sh,
                    file_offset: so,
                    len: sl,
                }),
                Some(&Mapping::File {
                    handle: dh,
                    file_offset: doff,
                    len: dl,
                }),
            ) = (sm.get(i), dm.get(j))
            else {
                break;
            };
            let seg = (sl - si).min(dl - dj).min(n - done);
            // A hole of the source file inside a data run reads as zeros: it is skipped (or
            // zeroed) as a zero run would be, rather than copied into allocated zeros.
            let (hole, seg) = file_run(sh.fd, so + si, seg);
            let r = if hole {
                self.zeros_in_data(pos + done, seg, fresh)?;
                Ok(Cfr::Done)
            } else {
                let r = copy_file_range(sh.fd, so + si, dh.fd, doff + dj, seg);
                if let Ok(Cfr::Done) = r {
                    written.push((dh.fd, doff + dj, seg));
                }
                r
            };
            match r {
                Ok(Cfr::Done) => {}
                Ok(Cfr::Unsupported(part)) => {
                    self.use_cfr.store(false, Ordering::Relaxed);
                    self.counters.cfr.fetch_add(done + part, Ordering::Relaxed);
                    return Ok(done + part);
                }
                Err(e) => {
                    let err = block_io::Error::new(
                        block_io::ErrorKind::Io,
                        format!("copy_file_range failed: {e}"),
                    );
                    dest.mapped_write_failed(&err);
                    return Err(JobError::Destination {
                        op: "write",
                        offset: at + done,
                        source: err,
                    });
                }
            }
            done += seg;
            si += seg;
            dj += seg;
            if si == sl {
                i += 1;
                si = 0;
            }
            if dj == dl {
                j += 1;
                dj = 0;
            }
        }
        self.counters.cfr.fetch_add(done, Ordering::Relaxed);
        Ok(done)
    }

    fn buffered(&self, pos: u64, n: u64, fresh: bool) -> Result<(), JobError> {
        thread_local! {
            static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let piece = n.min(MAX_BUF) as usize;
        let run = |buf: &mut [u8]| -> Result<(), JobError> {
            let mut off = pos;
            while off < pos + n {
                let k = (pos + n - off).min(buf.len() as u64) as usize;
                let b = &mut buf[..k];
                self.src.read_at(b, off).map_err(src_err(off))?;
                if b.iter().all(|&x| x == 0) {
                    // Data that reads as zeros: a zero run (skipped on a fresh destination, so
                    // it stays sparse, as qemu-img convert leaves it).
                    self.zeros_in_data(off, k as u64, fresh)?;
                    off += k as u64;
                    continue;
                }
                let at = self.tracker.dest_pos(off);
                self.tracker
                    .dest
                    .write_at(b, at)
                    .map_err(dst_err("write", at))?;
                off += k as u64;
            }
            self.counters.buffered.fetch_add(n, Ordering::Relaxed);
            Ok(())
        };
        let reused = BUF.try_with(|cell| {
            let mut v = cell.try_borrow_mut().ok()?;
            if v.len() < piece {
                v.resize(piece, 0);
            }
            Some(run(&mut v[..piece]))
        });
        match reused {
            Ok(Some(r)) => r,
            _ => run(&mut vec![0u8; piece]),
        }
    }
}

/// The run of file `fd` at `off` (at most `len` bytes): `(true, n)` for `n` bytes of hole,
/// `(false, n)` for data, by `lseek(2)` `SEEK_DATA`/`SEEK_HOLE`. A file system that cannot
/// tell reports data.
fn file_run(fd: i32, off: u64, len: u64) -> (bool, u64) {
    let Ok(at) = libc::off_t::try_from(off) else {
        return (false, len);
    };
    // SAFETY: lseek on a descriptor the device keeps open for the call; no memory involved.
    let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data from `off` to the end of the file; anything else: don't know.
        let hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        return (hole, len);
    }
    let data = data as u64;
    if data > off {
        return (true, (data - off).min(len));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, at, libc::SEEK_HOLE) };
    if hole <= at {
        return (false, len);
    }
    (false, (hole as u64 - off).min(len))
}

/// `copy_file_range(2)` of `len` bytes from `sfd` at `soff` to `dfd` at `doff`, continued
/// over short copies.
fn copy_file_range(sfd: i32, soff: u64, dfd: i32, doff: u64, len: u64) -> std::io::Result<Cfr> {
    let mut done = 0u64;
    while done < len {
        let (Ok(mut so), Ok(mut dof)) = (
            libc::loff_t::try_from(soff + done),
            libc::loff_t::try_from(doff + done),
        ) else {
            return Ok(Cfr::Unsupported(done));
        };
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: plain system call on two descriptors the devices keep open for the call (the
        // job holds both devices); the offset pointers are to our own locals, valid for the
        // call; no memory of ours is read or written besides them.
        let r = unsafe { libc::copy_file_range(sfd, &mut so, dfd, &mut dof, want, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::EXDEV
                    | libc::EINVAL
                    | libc::ENOSYS
                    | libc::EOPNOTSUPP
                    | libc::EBADF
                    | libc::EPERM
                    | libc::ETXTBSY,
                ) => return Ok(Cfr::Unsupported(done)),
                _ => return Err(e),
            }
        }
        if r == 0 {
            // The source file ends early: let the format's read path decide.
            return Ok(Cfr::Unsupported(done));
        }
        done += r as u64;
    }
    Ok(Cfr::Done)
}
