//! Copy-on-read from a remote parent: a local differencing child whose parent is a remote
//! base (an HTTP/S3 object or an NBD export, [`crate::remote`]) reads through a
//! [`CopyOnRead`] device that keeps every byte it fetches in a local *replica* of the base,
//! so the next read of it is local; a stream job (`meta_ops`) pulls the rest, and
//! [`finish_streaming`] then makes the replica the child's local parent.
//!
//! # Files
//!
//! Beside the child `C` ([`StreamOptions::replica`] overrides the name):
//! - `C.base` — the **replica**: an image of the child's format (a VHDX child gets a VHDX
//!   replica, a VHD child a VHD one) and the remote base's size and sector size, written only
//!   with bytes read from the remote, granule by granule. A VHD replica is created with the
//!   unique id and timestamp the child records for its parent; a VHDX replica gets the
//!   DataWriteGuid the child's `parent_linkage` names only when it is complete
//!   ([`finish_streaming`]; our VHDX writer gives an image a new DataWriteGuid in every write
//!   session, so it is set back at the end), so an incomplete VHDX replica never passes a
//!   lineage check.
//! - `C.base.fetched` — the **sidecar**: which granules the replica holds (one bit per
//!   granule, [`StreamOptions::granule`], 1 MiB by default), with the granule size, the base's
//!   size and identity. It is rewritten whole (a new file, synced, renamed over the old one,
//!   the folder synced) by [`CopyOnRead::persist`], *after* flushing the replica, and only
//!   with bits set before that flush: after a crash it never claims a granule whose bytes are
//!   not durable in the replica (a granule fetched but not yet recorded is fetched again).
//!   The sidecar is created before the replica and deleted last, so a replica without a
//!   sidecar is either finished or not ours (then it is refused, never overwritten).
//!
//! # Reads
//!
//! A read of granules already fetched reads the replica. A read of granules not fetched
//! takes them exclusively (concurrent readers of a granule wait and then read the replica:
//! it is fetched once), reads each run of missing granules from the remote in **one** request
//! (at most [`MAX_FETCH`] bytes), writes the granules that are not all zeros to the replica
//! (an all-zero granule needs no space: the replica reads zeros where it was never written),
//! marks them fetched and serves the read from the bytes it got: a guest read of data not yet
//! here costs one remote round trip (a guest read that the child's own data splits into
//! several pieces asks the parent for each piece in turn: one round trip per missing piece).
//! [`CopyOnRead::fetch`] does the same without a caller's buffer (the stream job), and
//! [`CopyOnRead::mark_zero`] records granules the remote reports as holes
//! ([`BlockDevice::block_status`]) without fetching them.
//!
//! `block_status` of the device says `Data` for granules not fetched (reading them is what
//! fetches them), and what the replica says for fetched ones; it never asks the remote.
//!
//! # Crash safety of the finish
//!
//! [`finish_streaming`] needs every granule fetched and the chain closed (the child's
//! locator cannot be rewritten under a writable handle), then: (1) the replica flushed and,
//! for VHDX, its DataWriteGuid set to the one the child records (one header update, durable);
//! (2) the replica checked to open with the child's recorded identity; (3) the child's parent
//! locator repointed at the replica in one crash-safe metadata change (VHDX: through the log,
//! `parent_linkage` kept, the `vdisk_url` key and `volume_path` dropped, `relative_path` and
//! `absolute_win32_path` to the replica; VHD: parent name and W2ku/W2ru locators); (4) the
//! sidecar deleted. A crash before (3) is durable leaves the child with its remote parent (the
//! replica complete, so streaming again only finishes); after it, with the local replica (a
//! sidecar left by a crash before (4) is deleted by the next [`finish_streaming`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{
    BlockDevice, BlockStatus, DiskInfo, Error, ErrorKind, LockMode, RangeLock, Result, StatusRun,
};

use crate::error::ChainError;
use crate::remote::RemoteParents;

/// The most bytes one remote request of a [`CopyOnRead`] asks for.
pub const MAX_FETCH: u64 = 16 << 20;

/// Default granule: 1 MiB.
pub const DEFAULT_GRANULE: u64 = 1 << 20;

/// The sidecar's magic and version.
const MAGIC: &[u8; 8] = b"VDCOR\0v1";
/// Bytes before the bitmap: magic, granule, size, kind, id, timestamp, bit count.
const HEAD: usize = 8 + 8 + 8 + 1 + 16 + 4 + 8;

/// Why streaming could not be set up or finished.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Opening the child, its remote parent or the replica failed, or lineage did not match.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The child's parent is not remote: there is nothing to stream.
    #[error("the parent of {child} is not remote: nothing to stream")]
    NotRemote {
        /// The child.
        child: PathBuf,
    },
    /// The image has no parent.
    #[error("{child} is not a differencing image")]
    NoParent {
        /// The image.
        child: PathBuf,
    },
    /// The remote base has a parent of its own (only one remote layer is streamed).
    #[error(
        "the remote parent {url} has a parent of its own: only a single remote base is streamed"
    )]
    RemoteChain {
        /// The remote base.
        url: String,
    },
    /// The sidecar is missing, malformed or describes another base.
    #[error("the stream sidecar {path} cannot be used: {why}")]
    Sidecar {
        /// The sidecar.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A replica file exists without a sidecar: not a replica this module made, or a
    /// finished one; it is never overwritten.
    #[error("{path} exists but has no stream sidecar: move it away or pass another replica path")]
    ReplicaExists {
        /// The file.
        path: PathBuf,
    },
    /// Creating, writing, flushing or renaming a file failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Error,
    },
    /// [`finish_streaming`] found granules not yet fetched.
    #[error("the replica {replica} lacks {missing} granules of the remote base: stream first")]
    Incomplete {
        /// The replica.
        replica: PathBuf,
        /// Granules still missing.
        missing: u64,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Error) -> StreamError + 'a {
    move |source| StreamError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How to open a child for streaming ([`open_streaming`]).
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Open the child read-only (default false).
    pub read_only: bool,
    /// Image locks on the child and replica (default [`LockMode::Auto`]).
    pub lock: LockMode,
    /// Which remote parents may be opened (default [`RemoteParents::Allow`]).
    pub remote_parents: RemoteParents,
    /// Bytes per sidecar bit (default [`DEFAULT_GRANULE`]): a power of two, at least 4 KiB.
    /// An existing sidecar's granule wins.
    pub granule: u64,
    /// The replica's path (default: the child's path with `.base` appended).
    pub replica: Option<PathBuf>,
    /// Granules fetched between automatic [`CopyOnRead::persist`] calls (default 256; 0:
    /// only when asked and on drop).
    pub persist_every: u64,
    /// Client options for an NBD parent (default: the client's defaults; `read_only` is
    /// forced), e.g. a shorter [`block_io::nbd::RetryPolicy`].
    #[cfg(feature = "remote")]
    pub nbd: Option<block_io::nbd::NbdClientOptions>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            read_only: false,
            lock: LockMode::Auto,
            remote_parents: RemoteParents::Allow,
            granule: DEFAULT_GRANULE,
            replica: None,
            persist_every: 256,
            #[cfg(feature = "remote")]
            nbd: None,
        }
    }
}

/// Opens the differencing image `child` (read-only if asked, with `lock`) and its parent
/// link; a child without a parent is [`StreamError::NoParent`].
fn open_child(
    child: &Path,
    read_only: bool,
    lock: LockMode,
) -> std::result::Result<(crate::layer::Layer, crate::layer::ParentLink), StreamError> {
    let top = crate::layer::open_layer_with(
        child,
        None,
        &crate::layer::LayerOptions {
            read_only,
            lock,
            ..crate::layer::LayerOptions::default()
        },
    )?;
    let Some(link) = top.parent.clone() else {
        return Err(StreamError::NoParent {
            child: child.to_path_buf(),
        });
    };
    Ok((top, link))
}

/// The replica of `child` by default: `child` with `.base` appended.
pub fn default_replica(child: &Path) -> PathBuf {
    let mut s = child.as_os_str().to_os_string();
    s.push(".base");
    PathBuf::from(s)
}

/// The sidecar of `replica`: `.fetched` appended.
pub fn sidecar_path(replica: &Path) -> PathBuf {
    let mut s = replica.as_os_str().to_os_string();
    s.push(".fetched");
    PathBuf::from(s)
}

/// Counters of a [`CopyOnRead`] device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CorStats {
    /// Remote read requests made.
    pub remote_reads: u64,
    /// Bytes read from the remote.
    pub remote_bytes: u64,
    /// Bytes written to the replica.
    pub replica_bytes: u64,
    /// Bytes of reads served from the replica without a fetch.
    pub local_bytes: u64,
    /// Granules recorded as holes without a fetch ([`CopyOnRead::mark_zero`]).
    pub zero_granules: u64,
}

/// A base kept on a remote server, read through a local replica (see the module docs).
pub struct CopyOnRead {
    remote: Arc<dyn BlockDevice>,
    replica: Arc<dyn BlockDevice>,
    info: DiskInfo,
    granule: u64,
    granules: u64,
    bits: Vec<AtomicU64>,
    lock: RangeLock,
    sidecar: Sidecar,
    replica_path: PathBuf,
    url: PathBuf,
    since_persist: AtomicU64,
    persist_every: u64,
    persist_lock: parking_lot::Mutex<()>,
    remote_reads: AtomicU64,
    remote_bytes: AtomicU64,
    replica_bytes: AtomicU64,
    local_bytes: AtomicU64,
    zero_granules: AtomicU64,
}

impl std::fmt::Debug for CopyOnRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOnRead")
            .field("url", &self.url)
            .field("replica", &self.replica_path)
            .field("granule", &self.granule)
            .field("missing", &self.missing())
            .finish_non_exhaustive()
    }
}

impl CopyOnRead {
    /// The granule size.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Granules of the base.
    pub fn granules(&self) -> u64 {
        self.granules
    }

    /// The remote base (for its `block_status`; reading it directly fetches nothing).
    pub fn remote(&self) -> &Arc<dyn BlockDevice> {
        &self.remote
    }

    /// The remote base's URL.
    pub fn url(&self) -> &Path {
        &self.url
    }

    /// The replica's path.
    pub fn replica_path(&self) -> &Path {
        &self.replica_path
    }

    /// The sidecar's path.
    pub fn sidecar_path(&self) -> &Path {
        &self.sidecar.path
    }

    /// Counters so far.
    pub fn stats(&self) -> CorStats {
        CorStats {
            remote_reads: self.remote_reads.load(Ordering::Acquire),
            remote_bytes: self.remote_bytes.load(Ordering::Acquire),
            replica_bytes: self.replica_bytes.load(Ordering::Acquire),
            local_bytes: self.local_bytes.load(Ordering::Acquire),
            zero_granules: self.zero_granules.load(Ordering::Acquire),
        }
    }

    /// Whether granule `g` is local.
    pub fn is_fetched(&self, g: u64) -> bool {
        let (w, b) = ((g / 64) as usize, g % 64);
        self.bits
            .get(w)
            .is_some_and(|x| x.load(Ordering::Acquire) & (1 << b) != 0)
    }

    fn set_fetched(&self, g: u64) {
        let (w, b) = ((g / 64) as usize, g % 64);
        if let Some(x) = self.bits.get(w) {
            x.fetch_or(1 << b, Ordering::AcqRel);
        }
    }

    /// Granules not fetched yet.
    pub fn missing(&self) -> u64 {
        let set: u64 = self
            .bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        self.granules - set.min(self.granules)
    }

    /// The first granule at or after `from` not fetched yet.
    pub fn next_missing(&self, from: u64) -> Option<u64> {
        (from..self.granules).find(|&g| !self.is_fetched(g))
    }

    /// Byte range of granules `[a, b)`, clipped to the disk.
    fn span(&self, a: u64, b: u64) -> (u64, u64) {
        let start = (a * self.granule).min(self.info.virtual_size);
        let end = (b * self.granule).min(self.info.virtual_size);
        (start, end)
    }

    /// Makes `[offset, offset+len)` local (fetching the granules not fetched, a run at a
    /// time); returns the bytes read from the remote.
    pub fn fetch(&self, offset: u64, len: u64) -> Result<u64> {
        let end = offset.saturating_add(len).min(self.info.virtual_size);
        if offset >= end {
            return Ok(0);
        }
        let (g0, g1) = (offset / self.granule, end.div_ceil(self.granule));
        let mut got = 0;
        self.runs(g0, g1, |fetched, a, b| {
            if !fetched {
                got += self.fetch_run(a, b, None)?;
            }
            Ok(())
        })?;
        Ok(got)
    }

    /// Records the whole granules inside `[offset, offset+len)` as fetched without reading
    /// them: the remote reported the range as zeros or unallocated (a base's unallocated
    /// blocks read as zeros), and the replica reads zeros where it was never written.
    /// Returns how many granules were newly recorded.
    pub fn mark_zero(&self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len).min(self.info.virtual_size);
        let g0 = offset.div_ceil(self.granule);
        // A last partial granule at the end of the disk counts as whole.
        let g1 = if end == self.info.virtual_size {
            end.div_ceil(self.granule)
        } else {
            end / self.granule
        };
        let mut n = 0;
        for g in g0..g1 {
            if self.is_fetched(g) {
                continue;
            }
            let (a, b) = self.span(g, g + 1);
            let _g = self.lock.lock_exclusive(a, b - a);
            if !self.is_fetched(g) {
                self.set_fetched(g);
                n += 1;
            }
        }
        self.zero_granules.fetch_add(n, Ordering::AcqRel);
        n
    }

    /// Calls `f(fetched, a, b)` for each maximal run `[a, b)` of granules in `[g0, g1)` that
    /// are all fetched or all not.
    fn runs(
        &self,
        g0: u64,
        g1: u64,
        mut f: impl FnMut(bool, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut g = g0;
        while g < g1 {
            let fetched = self.is_fetched(g);
            let mut e = g + 1;
            while e < g1 && self.is_fetched(e) == fetched {
                e += 1;
            }
            f(fetched, g, e)?;
            g = e;
        }
        Ok(())
    }

    /// Fetches the missing granules of `[a, b)` (held exclusively meanwhile) and, with
    /// `out = Some((buf, off))`, copies the bytes of `buf`'s range `[off, off+len)` that fall
    /// in `[a, b)` into it (reading the replica for granules fetched by someone else meanwhile).
    /// Returns the bytes read from the remote.
    fn fetch_run(&self, a: u64, b: u64, mut out: Option<(&mut [u8], u64)>) -> Result<u64> {
        let mut got = 0;
        let per = (MAX_FETCH / self.granule).max(1);
        let mut s = a;
        while s < b {
            let e = (s + per).min(b);
            let (lo, hi) = self.span(s, e);
            let _g = self.lock.lock_exclusive(lo, hi - lo);
            // Again under the lock: another reader may have fetched some meanwhile.
            self.runs(s, e, |fetched, x, y| {
                let (xa, xb) = self.span(x, y);
                if fetched {
                    if let Some((buf, off)) = out.as_mut() {
                        if let Some((piece, at)) = overlap(buf, *off, xa, xb) {
                            self.replica.read_at(piece, at)?;
                            self.local_bytes
                                .fetch_add(piece.len() as u64, Ordering::Relaxed);
                        }
                    }
                    return Ok(());
                }
                let mut scratch = take_scratch((xb - xa) as usize);
                let r = (|| {
                    let tmp = &mut scratch[..(xb - xa) as usize];
                    self.remote.read_at(tmp, xa)?;
                    self.remote_reads.fetch_add(1, Ordering::Relaxed);
                    self.remote_bytes.fetch_add(xb - xa, Ordering::Relaxed);
                    got += xb - xa;
                    self.store_granules(tmp, x, y)?;
                    if let Some((buf, off)) = out.as_mut() {
                        let (o, l) = (*off, buf.len() as u64);
                        let (ca, cb) = (xa.max(o), xb.min(o + l));
                        if ca < cb {
                            buf[(ca - o) as usize..(cb - o) as usize]
                                .copy_from_slice(&tmp[(ca - xa) as usize..(cb - xa) as usize]);
                        }
                    }
                    Ok(())
                })();
                put_scratch(scratch);
                r
            })?;
            s = e;
        }
        Ok(got)
    }

    /// Writes the non-zero granules of `data` (granules `[x, y)`) to the replica, runs of them
    /// at a time, then marks all of them fetched.
    fn store_granules(&self, data: &[u8], x: u64, y: u64) -> Result<()> {
        let gl = self.granule as usize;
        let zero = |g: u64| {
            let i = ((g - x) as usize) * gl;
            data[i..(i + gl).min(data.len())].iter().all(|&b| b == 0)
        };
        let mut g = x;
        while g < y {
            if zero(g) {
                g += 1;
                continue;
            }
            let mut e = g + 1;
            while e < y && !zero(e) {
                e += 1;
            }
            let (i, j) = (
                ((g - x) as usize) * gl,
                (((e - x) as usize) * gl).min(data.len()),
            );
            let (at, _) = self.span(g, e);
            self.replica.write_at(&data[i..j], at)?;
            self.replica_bytes
                .fetch_add((j - i) as u64, Ordering::Relaxed);
            g = e;
        }
        for g in x..y {
            self.set_fetched(g);
        }
        let n = self.since_persist.fetch_add(y - x, Ordering::AcqRel) + (y - x);
        if self.persist_every > 0 && n >= self.persist_every {
            self.persist()?;
        }
        Ok(())
    }

    /// Records the granules fetched so far in the sidecar: takes the bits, flushes the
    /// replica (so their bytes are durable), then rewrites the sidecar.
    pub fn persist(&self) -> Result<()> {
        let _p = self.persist_lock.lock();
        self.since_persist.store(0, Ordering::Release);
        let snapshot: Vec<u64> = self
            .bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        self.replica.flush()?;
        self.sidecar
            .store(&snapshot, self.granules)
            .map_err(|e| Error::with_source(ErrorKind::Io, "recording the fetched granules", e))
    }
}

/// Most bytes of fetch buffer a thread keeps between fetches.
const SCRATCH_KEEP: usize = 8 << 20;

thread_local! {
    /// This thread's fetch buffer: reused, so a fetch neither faults in nor zeroes fresh
    /// pages (a remote read overwrites the whole slice it is given).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's fetch buffer, at least `len` bytes long.
fn take_scratch(len: usize) -> Vec<u8> {
    let mut v = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if v.len() < len {
        v.resize(len, 0);
    }
    v
}

/// Gives the buffer back to the thread (dropped if larger than [`SCRATCH_KEEP`]).
fn put_scratch(v: Vec<u8>) {
    if v.len() <= SCRATCH_KEEP {
        SCRATCH.with(|s| *s.borrow_mut() = v);
    }
}

/// The part of `buf` (covering `[off, off+len)`) inside `[a, b)`, and its disk offset.
fn overlap(buf: &mut [u8], off: u64, a: u64, b: u64) -> Option<(&mut [u8], u64)> {
    let (ca, cb) = (a.max(off), b.min(off + buf.len() as u64));
    (ca < cb).then(|| (&mut buf[(ca - off) as usize..(cb - off) as usize], ca))
}

impl Drop for CopyOnRead {
    fn drop(&mut self) {
        // Best effort: bits not recorded are fetched again next time.
        let _ = self.persist();
    }
}

fn read_only() -> Error {
    Error::new(ErrorKind::ReadOnly, "a copy-on-read parent is read-only")
}

impl BlockDevice for CopyOnRead {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        block_io::check_request(&self.info, offset, buf.len() as u64, false)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let (g0, g1) = (offset / self.granule, end.div_ceil(self.granule));
        self.runs(g0, g1, |fetched, a, b| {
            let (xa, xb) = self.span(a, b);
            if fetched {
                if let Some((piece, at)) = overlap(buf, offset, xa, xb) {
                    self.replica.read_at(piece, at)?;
                    self.local_bytes
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            } else {
                self.fetch_run(a, b, Some((&mut *buf, offset))).map(drop)
            }
        })
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    /// Records the fetched granules ([`CopyOnRead::persist`]).
    fn flush(&self) -> Result<()> {
        self.persist()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        block_io::check_request(&self.info, offset, len, false)?;
        let end = offset + len;
        let g = offset / self.granule;
        let fetched = self.is_fetched(g);
        let mut e = g + 1;
        while e * self.granule < end && self.is_fetched(e) == fetched {
            e += 1;
        }
        let run_len = (e * self.granule).min(end) - offset;
        if !fetched {
            return Ok(StatusRun {
                status: BlockStatus::Data,
                len: run_len,
                file_offset: None,
            });
        }
        let r = self.replica.block_status(offset, run_len)?;
        Ok(StatusRun {
            // A base: what it lacks reads as zeros.
            status: match r.status {
                BlockStatus::Data => BlockStatus::Data,
                _ => BlockStatus::Zero,
            },
            len: r.len.clamp(1, run_len),
            file_offset: None,
        })
    }
}

mod finish;
mod open;
mod sidecar;

use sidecar::Sidecar;

pub use finish::{finish_streaming, local_locator, Finished};
pub use open::{open_streaming, Streaming};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Layer;
    use block_io::MemStorage;

    const MIB: u64 = 1 << 20;

    /// A remote base in memory: a VHDX of 16 MiB with data in MiB 2..4 and 9; its content.
    fn base() -> (Layer, Vec<u8>) {
        let mem = Arc::new(MemStorage::new());
        let f = vhdx_format::create(mem.clone(), &vhdx_format::CreateOptions::dynamic(16 * MIB))
            .unwrap();
        let mut model = vec![0u8; 16 << 20];
        for (off, len) in [(2 * MIB, 2 * MIB), (9 * MIB + 4096, 8192)] {
            let b: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0x5a | 1).collect();
            f.write_at(&b, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&b);
        }
        f.close().unwrap();
        drop(f);
        let l = crate::open_layer_from_storage(Path::new("mem://base"), mem, None, true).unwrap();
        (l, model)
    }

    #[test]
    fn reads_fetch_once_holes_need_no_fetch_and_bits_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let replica = d.path().join("r.vhdx");
        let (remote, model) = base();
        let cor = CopyOnRead::open(remote.clone(), &replica, &StreamOptions::default()).unwrap();
        assert_eq!(cor.missing(), 16);
        // Holes recorded without a fetch read as zeros from the replica.
        assert_eq!(cor.mark_zero(10 * MIB, 6 * MIB), 6);
        let st = cor.block_status(12 * MIB, MIB).unwrap();
        assert_eq!(st.status, BlockStatus::Zero);
        assert_eq!(
            cor.block_status(2 * MIB, MIB).unwrap().status,
            BlockStatus::Data
        );
        // An unaligned read over data and holes: one request for the missing run.
        let mut b = vec![0u8; (3 * MIB) as usize];
        cor.read_at(&mut b, MIB + 512).unwrap();
        assert!(b == model[(MIB + 512) as usize..][..(3 * MIB) as usize]);
        assert_eq!(cor.stats().remote_reads, 1);
        let mut all = vec![0u8; (16 * MIB) as usize];
        cor.read_at(&mut all, 0).unwrap();
        assert!(all == model);
        let reads = cor.stats().remote_reads;
        cor.read_at(&mut all, 0).unwrap();
        assert!(all == model);
        assert_eq!(
            cor.stats().remote_reads,
            reads,
            "a second read went to the remote"
        );
        assert_eq!(cor.missing(), 0);
        // Writes are refused.
        assert_eq!(
            cor.write_at(&[0; 512], 0).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        drop(cor);
        // Reopened: everything local.
        let cor = CopyOnRead::open(remote, &replica, &StreamOptions::default()).unwrap();
        assert_eq!(cor.missing(), 0);
        cor.read_at(&mut all, 0).unwrap();
        assert!(all == model);
        assert_eq!(cor.stats().remote_reads, 0);
    }

    #[test]
    fn a_replica_without_sidecar_is_never_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let replica = d.path().join("r.vhdx");
        std::fs::write(&replica, b"somebody's file").unwrap();
        let (remote, _) = base();
        let e = CopyOnRead::open(remote, &replica, &StreamOptions::default()).unwrap_err();
        assert!(matches!(e, StreamError::ReplicaExists { .. }), "{e}");
        assert_eq!(std::fs::read(&replica).unwrap(), b"somebody's file");
    }
}
