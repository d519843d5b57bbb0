//! [`Straddle`]: the guest's disk while a mirror is between hosts (timings `after` and
//! `split`, from the switch to the end of the background copy): host B's device holds
//! every granule whose dirty bit is clear, host A's device (left as it was at the switch)
//! the others.
//!
//! - **Reads** take their granules shared in the straddle's own range lock and read each
//!   run from the side that holds it (A for granules not copied yet, B for the rest).
//! - **Writes and write-zeroes** go to B only. Granules they cover wholly are then marked
//!   copied; a granule they cover in part that B does not hold yet is first brought over
//!   from A (copy-before-write), all with those granules held exclusively, so the guest's
//!   bytes and the granule's other bytes end up together on B.
//! - **Discards** are written as zeros with unmap on B (a discard may read back as zeros;
//!   B's own discard could show an old disk's bytes where B lacks the granule).
//! - **Flushes** go to B and to A: A is not written after the switch, but guest writes it
//!   acknowledged before may not be durable yet, and a flush after the switch covers them.
//! - The **background copy** ([`Straddle::copy_granules`]) takes granules exclusively,
//!   copies those still missing from A and marks them copied; it never overwrites a granule
//!   the guest wrote on B, because the guest marks a granule copied before releasing it.
//!
//! A request that needs B fails when B fails (after the NBD client's reconnect policy gave
//! up): the guest gets the error, typed by the device's [`block_io::ErrorKind`], with the
//! operation and offset in its context. A is never written after the switch, so it still
//! holds the disk as it was then.

use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus, DiskInfo, RangeLock, StatusRun};

use crate::copy::Copier;
use crate::error::JobError;
use crate::live::Tracker;

/// The guest's disk between the switch and the end of an `after` or `split` mirror.
pub(crate) struct Straddle {
    /// Host A's device (the source), never written.
    src: Arc<dyn BlockDevice>,
    /// Its tracker: `dirty` is the set of granules B does not hold yet; `dest` is B.
    tracker: Arc<Tracker>,
    /// What moves granules from A to B (the job's).
    copier: Arc<Copier>,
    /// Granule locks between guest requests and the background copy.
    locks: RangeLock,
    info: DiskInfo,
}

impl std::fmt::Debug for Straddle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Straddle")
            .field("info", &self.info)
            .field("missing", &self.tracker.dirty.count())
            .finish_non_exhaustive()
    }
}

fn b_err(op: &'static str, offset: u64) -> impl FnOnce(block_io::Error) -> block_io::Error {
    move |e| {
        e.context_with(format!(
            "the mirror destination (host B) failed: {op} at {offset}"
        ))
    }
}

fn a_err(op: &'static str, offset: u64) -> impl FnOnce(block_io::Error) -> block_io::Error {
    move |e| {
        e.context_with(format!(
            "the mirror source (host A) failed: {op} at {offset}"
        ))
    }
}

/// How a guest change lands on B.
#[derive(Clone, Copy)]
enum Put<'a> {
    Bytes(&'a [u8]),
    Zeroes(bool),
}

impl Straddle {
    /// The straddle of the job whose copier is `copier` (source A, tracker with B).
    pub(crate) fn new(copier: Arc<Copier>) -> Self {
        let (src, tracker) = (copier.src.clone(), copier.tracker.clone());
        let a = src.info();
        let b = tracker.dest.info();
        let info = DiskInfo {
            virtual_size: a.virtual_size,
            logical_sector_size: a.logical_sector_size.max(b.logical_sector_size),
            physical_sector_size: b.physical_sector_size.max(a.physical_sector_size),
            read_only: false,
            disk_id: b.disk_id,
            format: b.format,
        };
        Straddle {
            locks: RangeLock::new(tracker.gran),
            src,
            tracker,
            copier,
            info,
        }
    }

    fn dest(&self) -> &dyn BlockDevice {
        &*self.tracker.dest
    }

    /// Whether B lacks granule bit `g`.
    fn missing(&self, g: u64) -> bool {
        !self.tracker.dirty.all_clear(g, g + 1)
    }

    /// Calls `f(start, end, missing)` for the runs of `[off, off+len)` that B holds or lacks.
    fn runs(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, bool) -> block_io::Result<()>,
    ) -> block_io::Result<()> {
        let t = &self.tracker;
        let end = off.saturating_add(len);
        let mut pos = off;
        while pos < end {
            let Some((g, _)) = t.bits(pos, 1) else {
                break;
            };
            let miss = self.missing(g);
            let mut g2 = g + 1;
            while g2 < t.dirty.len() && t.span(g2, g2).0 < end && self.missing(g2) == miss {
                g2 += 1;
            }
            let stop = t.span(g, g2).1.min(end);
            f(pos, stop, miss)?;
            pos = stop;
        }
        Ok(())
    }

    /// Copies granule bits `[g0, g1)` that B still lacks from A (the caller holds them
    /// exclusively) and marks them copied. Returns the bytes copied.
    fn bring(&self, g0: u64, g1: u64) -> Result<u64, JobError> {
        let mut n = 0;
        let mut g = g0;
        while g < g1 {
            if !self.missing(g) {
                g += 1;
                continue;
            }
            let mut e = g + 1;
            while e < g1 && self.missing(e) {
                e += 1;
            }
            n += self.copier.runs(&[(g, e)])?;
            self.tracker.dirty.take(g, e);
            g = e;
        }
        Ok(n)
    }

    /// The background copy of source bytes `[a, b)` (granule-aligned): the granules B still
    /// lacks are copied from A and marked copied, with the range held exclusively. Returns
    /// the bytes copied.
    pub(crate) fn copy_granules(&self, a: u64, b: u64) -> Result<u64, JobError> {
        let Some((g0, g1)) = self.tracker.bits(a, b - a) else {
            return Ok(0);
        };
        let _g = self.locks.lock_exclusive(a, b - a);
        self.bring(g0, g1)
    }

    /// A guest change of `[off, off+len)`: to B, after copy-before-write of the partly
    /// covered granules B lacks.
    fn put(&self, off: u64, len: u64, what: Put<'_>) -> block_io::Result<()> {
        block_io::check_request(&self.info, off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let t = &self.tracker;
        let Some((g0, g1)) = t.bits(off, len) else {
            return Ok(());
        };
        let write = |d: &dyn BlockDevice| match what {
            Put::Bytes(b) => d.write_at(b, off).map_err(b_err("write", off)),
            Put::Zeroes(unmap) => d
                .write_zeroes(off, len, unmap)
                .map_err(b_err("write zeroes", off)),
        };
        {
            // The common case once the copy has passed: B holds every granule.
            let _s = self.locks.lock_shared(off, len);
            if t.dirty.all_clear(g0, g1) {
                return write(self.dest());
            }
        }
        let _x = self.locks.lock_exclusive(off, len);
        // Copy-before-write of the first and last granule where the change covers them in
        // part; granules it covers wholly need nothing from A.
        let end = off + len;
        let (ga, gb) = t.span(g0, g0 + 1);
        let (la, lb) = t.span(g1 - 1, g1);
        let partial_first = off > ga || end < gb;
        let partial_last = g1 - 1 != g0 && (off > la || end < lb);
        let to_block = |e: JobError| match e {
            JobError::Source { offset, source } => a_err("copy-before-write", offset)(source),
            JobError::Destination { offset, source, .. } => {
                b_err("copy-before-write", offset)(source)
            }
            other => block_io::Error::new(block_io::ErrorKind::Io, other.to_string()),
        };
        if partial_first && self.missing(g0) {
            self.bring(g0, g0 + 1).map_err(to_block)?;
        }
        if partial_last && self.missing(g1 - 1) {
            self.bring(g1 - 1, g1).map_err(to_block)?;
        }
        write(self.dest())?;
        t.touched.set(g0, g1);
        t.dirty.take(g0, g1);
        Ok(())
    }
}

impl BlockDevice for Straddle {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        let len = buf.len() as u64;
        block_io::check_request(&self.info, offset, len, false)?;
        let _s = self.locks.lock_shared(offset, len);
        self.runs(offset, len, |a, b, miss| {
            let piece = &mut buf[(a - offset) as usize..(b - offset) as usize];
            if miss {
                self.src.read_at(piece, a).map_err(a_err("read", a))
            } else {
                self.dest().read_at(piece, a).map_err(b_err("read", a))
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.put(offset, buf.len() as u64, Put::Bytes(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.put(offset, len, Put::Zeroes(unmap))
    }

    /// A discard becomes a write of zeros with unmap on B (one of the results a discard
    /// may have): B may hold an old disk, so merely discarding there could show its bytes.
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.put(offset, len, Put::Zeroes(true))
    }

    /// Flushes B, and A too: guest writes acknowledged on A before the switch may not be
    /// durable there yet, and a flush the guest sends after the switch covers them. A has
    /// nothing new to write after the first such flush, so later ones cost little.
    fn flush(&self) -> block_io::Result<()> {
        self.src.flush().map_err(a_err("flush", 0))?;
        self.dest().flush().map_err(b_err("flush", 0))
    }

    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<StatusRun> {
        block_io::check_request(&self.info, offset, len, false)?;
        let _s = self.locks.lock_shared(offset, len);
        let mut out = None;
        self.runs(offset, len, |a, b, miss| {
            if out.is_none() {
                let r = if miss {
                    self.src
                        .block_status(a, b - a)
                        .map_err(a_err("block status", a))?
                } else {
                    self.dest()
                        .block_status(a, b - a)
                        .map_err(b_err("block status", a))?
                };
                // An export is a whole disk: what A leaves to a parent is A's business, but
                // the guest sees one disk, so "unallocated" reads as A reads it (data).
                let status = match r.status {
                    BlockStatus::Unallocated => BlockStatus::Data,
                    s => s,
                };
                out = Some(StatusRun {
                    status,
                    len: r.len.clamp(1, b - a),
                    file_offset: None,
                });
            }
            Ok(())
        })?;
        out.ok_or_else(|| {
            block_io::Error::new(block_io::ErrorKind::InvalidInput, "block status of 0 bytes")
        })
    }
}
