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
//! here costs one remote round trip. [`CopyOnRead::fetch`] does the same without a caller's
//! buffer (the stream job), and [`CopyOnRead::mark_zero`] records granules the remote
//! reports as holes ([`BlockDevice::block_status`]) without fetching them.
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
//! replica complete, so streaming again only finishes); after it, with the local replica.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{
    BlockDevice, BlockStatus, DiskInfo, Error, ErrorKind, FileStorage, LockMode, RangeLock, Result,
    StatusRun,
};
use uuid::Uuid;

use crate::detect::Format;
use crate::disk::Disk;
use crate::error::ChainError;
use crate::layer::{open_layer_with, Identity, Layer, LayerOptions};
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

/// What the sidecar records.
#[derive(Debug, Clone)]
struct Sidecar {
    path: PathBuf,
    granule: u64,
    size: u64,
    identity: Identity,
}

impl Sidecar {
    fn encode(&self, bits: &[u64], granules: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + bits.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.granule.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        let (kind, id, ts) = identity_parts(&self.identity);
        out.push(kind);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&ts.to_le_bytes());
        out.extend_from_slice(&granules.to_le_bytes());
        for w in bits {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Reads the sidecar at `path`: (granule, size, identity, bit words).
    fn load(path: &Path) -> std::result::Result<(Sidecar, Vec<u64>), StreamError> {
        let bad = |why: &str| StreamError::Sidecar {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let data = std::fs::read(path).map_err(|e| StreamError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        if data.len() < HEAD || &data[..8] != MAGIC {
            return Err(bad("not a stream sidecar of version v1"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let granule = u64_at(8);
        let size = u64_at(16);
        let kind = data[24];
        let mut id = [0u8; 16];
        id.copy_from_slice(&data[25..41]);
        let mut ts = [0u8; 4];
        ts.copy_from_slice(&data[41..45]);
        let granules = u64_at(45);
        if granule < 4096 || !granule.is_power_of_two() {
            return Err(bad("bad granule size"));
        }
        if granules != size.div_ceil(granule) {
            return Err(bad("the bit count does not match the size"));
        }
        let words = usize::try_from(granules.div_ceil(64)).map_err(|_| bad("too many bits"))?;
        if data.len() != HEAD + words * 8 {
            return Err(bad("truncated or overlong"));
        }
        let identity = match kind {
            1 => Identity::Vhdx {
                data_write_guid: Uuid::from_bytes(id),
                disk_id: Uuid::nil(),
            },
            2 => Identity::Vhd {
                unique_id: Uuid::from_bytes(id),
                timestamp: u32::from_le_bytes(ts),
            },
            _ => return Err(bad("unknown identity kind")),
        };
        let bits = (0..words).map(|i| u64_at(HEAD + i * 8)).collect();
        Ok((
            Sidecar {
                path: path.to_path_buf(),
                granule,
                size,
                identity,
            },
            bits,
        ))
    }

    /// Writes the sidecar whole: a new file, synced, renamed over the old one, folder synced.
    fn store(&self, bits: &[u64], granules: u64) -> std::result::Result<(), StreamError> {
        let tmp = {
            let mut s = self.path.as_os_str().to_os_string();
            s.push(".tmp");
            PathBuf::from(s)
        };
        let io = |op: &'static str| {
            let path = self.path.clone();
            move |e: std::io::Error| StreamError::Io {
                op,
                path,
                source: e.into(),
            }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io("create"))?;
        f.write_all(&self.encode(bits, granules))
            .map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io("rename"))?;
        sync_dir(&self.path).map_err(io("sync the folder of"))
    }

    /// Whether this sidecar belongs to a base of `size` bytes and identity `id`.
    fn matches(&self, size: u64, id: &Identity) -> bool {
        self.size == size && identity_parts(&self.identity) == identity_parts(id)
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// (kind, id, timestamp) of an identity: what the sidecar keeps and compares (a VHDX disk id
/// is not part of it: the child records only the DataWriteGuid).
fn identity_parts(id: &Identity) -> (u8, Uuid, u32) {
    match *id {
        Identity::Vhdx {
            data_write_guid, ..
        } => (1, data_write_guid, 0),
        Identity::Vhd {
            unique_id,
            timestamp,
        } => (2, unique_id, timestamp),
        Identity::Raw => (0, Uuid::nil(), 0),
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
                let mut tmp = vec![0u8; (xb - xa) as usize];
                self.remote.read_at(&mut tmp, xa)?;
                self.remote_reads.fetch_add(1, Ordering::Relaxed);
                self.remote_bytes.fetch_add(xb - xa, Ordering::Relaxed);
                got += xb - xa;
                self.store_granules(&tmp, x, y)?;
                if let Some((buf, off)) = out.as_mut() {
                    let (o, l) = (*off, buf.len() as u64);
                    let (ca, cb) = (xa.max(o), xb.min(o + l));
                    if ca < cb {
                        buf[(ca - o) as usize..(cb - o) as usize]
                            .copy_from_slice(&tmp[(ca - xa) as usize..(cb - xa) as usize]);
                    }
                }
                Ok(())
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

/// A child opened for streaming: the chain (child over a [`CopyOnRead`] parent) and the
/// device, for the stream job.
#[derive(Debug)]
pub struct Streaming {
    /// The chain: the child on top, the copy-on-read parent below.
    pub disk: Disk,
    /// The copy-on-read parent.
    pub cor: Arc<CopyOnRead>,
    /// The child.
    pub child: PathBuf,
}

/// Opens the differencing image `child`, whose parent is remote, over a [`CopyOnRead`]
/// parent (see the module docs): the remote parent is opened and its lineage checked as
/// [`Disk::open`] does, the replica and its sidecar are created beside the child or reopened.
/// Fails with [`StreamError::NotRemote`] when the parent is local (streaming finished).
pub fn open_streaming(
    child: &Path,
    opts: &StreamOptions,
) -> std::result::Result<Streaming, StreamError> {
    let top = open_layer_with(
        child,
        None,
        &LayerOptions {
            read_only: opts.read_only,
            lock: opts.lock,
            ..LayerOptions::default()
        },
    )?;
    let Some(link) = top.parent.clone() else {
        return Err(StreamError::NoParent {
            child: child.to_path_buf(),
        });
    };
    let remote = open_remote(child, top.format, &link.candidates, opts)?.ok_or_else(|| {
        StreamError::NotRemote {
            child: child.to_path_buf(),
        }
    })?;
    if remote.parent.is_some() {
        return Err(StreamError::RemoteChain {
            url: remote.path.display().to_string(),
        });
    }
    if !link.expected.matches(&remote.identity) {
        return Err(ChainError::LineageMismatch {
            child: child.to_path_buf(),
            parent: remote.path.clone(),
            expected: link.expected.to_string(),
            found: remote.identity.to_string(),
        }
        .into());
    }
    let replica_path = opts
        .replica
        .clone()
        .unwrap_or_else(|| default_replica(child));
    let cor = CopyOnRead::open(remote.clone(), &replica_path, opts)?;
    let cor = Arc::new(cor);
    let layer = Layer {
        path: remote.path.clone(),
        format: remote.format,
        dev: cor.clone(),
        identity: remote.identity,
        parent: None,
    };
    let disk = Disk::from_layers(vec![top, layer], false)?;
    Ok(Streaming {
        disk,
        cor,
        child: child.to_path_buf(),
    })
}

/// The remote parent named by `candidates`, with [`StreamOptions::nbd`] for an NBD one.
fn open_remote(
    child: &Path,
    format: Format,
    candidates: &[crate::policy::Candidate],
    opts: &StreamOptions,
) -> std::result::Result<Option<Layer>, ChainError> {
    #[cfg(feature = "remote")]
    if let Some(nbd) = &opts.nbd {
        let url = crate::remote::url_candidates(candidates)
            .first()
            .map(|c| c.path.trim().to_string());
        if let Some(url) = url.filter(|u| crate::remote::is_nbd_url(u)) {
            return crate::remote::open_nbd_parent_with(
                child,
                &url,
                format,
                opts.remote_parents,
                nbd.clone(),
            )
            .map(Some);
        }
    }
    crate::remote::resolve_parent(child, format, candidates, opts.remote_parents)
}

impl CopyOnRead {
    /// A copy-on-read device over the remote layer `remote` with its replica at `replica`
    /// (created with its sidecar if neither exists; see the module docs).
    pub fn open(
        remote: Layer,
        replica: &Path,
        opts: &StreamOptions,
    ) -> std::result::Result<CopyOnRead, StreamError> {
        let info = remote.dev.info();
        let size = info.virtual_size;
        let identity = remote.identity;
        if identity == Identity::Raw {
            return Err(StreamError::Sidecar {
                path: sidecar_path(replica),
                why: "a parent without identity cannot get a local replica".into(),
            });
        }
        let side_path = sidecar_path(replica);
        let (sidecar, words) = if side_path.exists() {
            let (s, words) = Sidecar::load(&side_path)?;
            if !s.matches(size, &identity) {
                return Err(StreamError::Sidecar {
                    path: side_path,
                    why: format!(
                        "it records a base of {} bytes with {}, the remote is {size} bytes \
                         with {identity}",
                        s.size, s.identity
                    ),
                });
            }
            (s, Some(words))
        } else {
            if replica.exists() {
                return Err(StreamError::ReplicaExists {
                    path: replica.to_path_buf(),
                });
            }
            let g = opts.granule;
            if g < 4096 || !g.is_power_of_two() {
                return Err(StreamError::Sidecar {
                    path: side_path,
                    why: format!("granule {g} is not a power of two of at least 4096"),
                });
            }
            let s = Sidecar {
                path: side_path.clone(),
                granule: g,
                size,
                identity,
            };
            let granules = size.div_ceil(g);
            s.store(&vec![0u64; granules.div_ceil(64) as usize], granules)?;
            (s, None)
        };
        let granules = size.div_ceil(sidecar.granule);
        let words = words.unwrap_or_else(|| vec![0u64; granules.div_ceil(64) as usize]);
        let dev: Arc<dyn BlockDevice> = if replica.exists() {
            let storage = FileStorage::open(
                replica,
                &block_io::OpenOptions::new()
                    .read_only(false)
                    .lock(opts.lock),
            )
            .map_err(io_err("open", replica))?;
            match identity {
                Identity::Vhdx { .. } => Arc::new(
                    vhdx_format::VhdxFile::open(
                        storage,
                        &vhdx_format::OpenOptions::new().read_only(false),
                    )
                    .map_err(io_err("open", replica))?,
                ),
                _ => Arc::new(
                    vhd_format::VhdFile::open(
                        storage,
                        &vhd_format::OpenOptions::new().read_only(false),
                    )
                    .map_err(io_err("open", replica))?,
                ),
            }
        } else {
            create_replica(replica, &info, &identity)?
        };
        if dev.info().virtual_size < size {
            return Err(StreamError::Sidecar {
                path: sidecar.path.clone(),
                why: format!(
                    "the replica {} holds {} bytes, the base {size}",
                    replica.display(),
                    dev.info().virtual_size
                ),
            });
        }
        Ok(CopyOnRead {
            remote: remote.dev,
            replica: dev,
            info: DiskInfo {
                read_only: true,
                ..info
            },
            granule: sidecar.granule,
            granules,
            bits: words.into_iter().map(AtomicU64::new).collect(),
            lock: RangeLock::new(sidecar.granule),
            sidecar,
            replica_path: replica.to_path_buf(),
            url: remote.path,
            since_persist: AtomicU64::new(0),
            persist_every: opts.persist_every,
            persist_lock: parking_lot::Mutex::new(()),
            remote_reads: AtomicU64::new(0),
            remote_bytes: AtomicU64::new(0),
            replica_bytes: AtomicU64::new(0),
            local_bytes: AtomicU64::new(0),
            zero_granules: AtomicU64::new(0),
        })
    }
}

/// Creates the replica: the child's format, the base's size and sector size; a VHD with the
/// base's unique id and timestamp, a VHDX with its disk id (its DataWriteGuid is set at the
/// finish).
fn create_replica(
    path: &Path,
    info: &DiskInfo,
    identity: &Identity,
) -> std::result::Result<Arc<dyn BlockDevice>, StreamError> {
    let storage = FileStorage::create(path).map_err(io_err("create", path))?;
    let dev: Arc<dyn BlockDevice> = match *identity {
        Identity::Vhdx { disk_id, .. } => {
            let mut o = vhdx_format::CreateOptions::dynamic(info.virtual_size);
            o.logical_sector_size = info.logical_sector_size;
            o.disk_id = (!disk_id.is_nil()).then_some(disk_id);
            Arc::new(vhdx_format::create(storage, &o).map_err(io_err("create", path))?)
        }
        Identity::Vhd {
            unique_id,
            timestamp,
        } => {
            let mut o =
                vhd_format::CreateOptions::new(info.virtual_size, vhd_format::Subformat::Dynamic);
            o.unique_id = Some(unique_id);
            o.timestamp = Some(timestamp);
            Arc::new(vhd_format::VhdFile::create(storage, &o).map_err(io_err("create", path))?)
        }
        Identity::Raw => {
            return Err(StreamError::Sidecar {
                path: sidecar_path(path),
                why: "a parent without identity cannot get a local replica".into(),
            })
        }
    };
    dev.flush().map_err(io_err("flush", path))?;
    sync_dir(path).map_err(|e| StreamError::Io {
        op: "sync the folder of",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(dev)
}

/// What [`finish_streaming`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The child's local parent now.
    pub replica: PathBuf,
    /// The remote parent it replaced.
    pub url: String,
    /// The identity the replica has (the one the child records).
    pub identity: Identity,
}

/// Makes the complete replica of `child` its local parent and drops the remote link (see
/// "Crash safety of the finish" in the module docs). The chain must be closed. Opens the
/// remote parent only to check the identity it advertises against what the child records;
/// reads no data from it.
pub fn finish_streaming(
    child: &Path,
    opts: &StreamOptions,
) -> std::result::Result<Finished, StreamError> {
    let top = open_layer_with(
        child,
        None,
        &LayerOptions {
            read_only: true,
            lock: opts.lock,
            ..LayerOptions::default()
        },
    )?;
    let Some(link) = top.parent.clone() else {
        return Err(StreamError::NoParent {
            child: child.to_path_buf(),
        });
    };
    let format = top.format;
    let url = crate::remote::url_candidates(&link.candidates)
        .first()
        .map(|c| c.path.trim().to_string())
        .ok_or_else(|| StreamError::NotRemote {
            child: child.to_path_buf(),
        })?;
    drop(top);
    let replica = opts
        .replica
        .clone()
        .unwrap_or_else(|| default_replica(child));
    let side = sidecar_path(&replica);
    let (sidecar, words) = Sidecar::load(&side)?;
    let granules = sidecar.size.div_ceil(sidecar.granule);
    let set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    if set < granules {
        return Err(StreamError::Incomplete {
            replica,
            missing: granules - set,
        });
    }
    let identity = sidecar.identity;
    if !link.expected.matches(&identity) {
        return Err(ChainError::LineageMismatch {
            child: child.to_path_buf(),
            parent: replica.clone(),
            expected: link.expected.to_string(),
            found: identity.to_string(),
        }
        .into());
    }
    // (1) The replica's identity, durable.
    let storage = FileStorage::open(
        &replica,
        &block_io::OpenOptions::new()
            .read_only(false)
            .lock(opts.lock),
    )
    .map_err(io_err("open", &replica))?;
    match identity {
        Identity::Vhdx {
            data_write_guid, ..
        } => {
            let f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", &replica))?;
            if f.details().data_write_guid != data_write_guid {
                f.begin_session_with(data_write_guid)
                    .map_err(io_err("set the DataWriteGuid of", &replica))?;
            }
            f.close().map_err(io_err("close", &replica))?;
        }
        _ => {
            let f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", &replica))?;
            f.flush().map_err(io_err("flush", &replica))?;
        }
    }
    // (2) It opens as the parent the child records.
    let check = open_layer_with(
        &replica,
        None,
        &LayerOptions {
            parent: true,
            lock: opts.lock,
            ..LayerOptions::default()
        },
    )?;
    if !link.expected.matches(&check.identity) || check.format != format {
        return Err(ChainError::LineageMismatch {
            child: child.to_path_buf(),
            parent: replica.clone(),
            expected: link.expected.to_string(),
            found: format!("{} ({})", check.identity, check.format),
        }
        .into());
    }
    drop(check);
    // (3) The child's locator.
    repoint(child, &replica, format, opts.lock)?;
    // (4) The sidecar.
    std::fs::remove_file(&side).map_err(|e| StreamError::Io {
        op: "delete",
        path: side.clone(),
        source: e.into(),
    })?;
    let _ = sync_dir(&side);
    Ok(Finished {
        replica,
        url,
        identity,
    })
}

/// The locator of a streamed VHDX child once its parent is local: every key of `old` kept
/// (`parent_linkage` too: the replica has the identity it names) except the remote URL
/// ([`crate::remote::URL_KEY`]) and `volume_path`, with `relative_path` and
/// `absolute_win32_path` naming the replica.
pub fn local_locator(
    old: &vhdx_format::locator::ParentLocator,
    relative: &str,
    absolute: &str,
) -> vhdx_format::locator::ParentLocator {
    let mut entries: Vec<(String, String)> = Vec::new();
    for (k, v) in &old.entries {
        match k.to_ascii_lowercase().as_str() {
            crate::remote::URL_KEY | "volume_path" | "relative_path" | "absolute_win32_path" => {}
            _ => entries.push((k.clone(), v.clone())),
        }
    }
    entries.push(("relative_path".into(), relative.to_string()));
    entries.push(("absolute_win32_path".into(), absolute.to_string()));
    vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries,
    }
}

/// Points `child` at `replica` in one crash-safe metadata change, keeping the recorded
/// parent identity.
fn repoint(
    child: &Path,
    replica: &Path,
    format: Format,
    lock: LockMode,
) -> std::result::Result<(), StreamError> {
    let (relative, abs) =
        crate::rebase::parent_paths(child, replica).map_err(|e| StreamError::Io {
            op: "resolve",
            path: replica.to_path_buf(),
            source: e.into(),
        })?;
    let abs = abs.display().to_string();
    let storage = FileStorage::open(
        child,
        &block_io::OpenOptions::new().read_only(false).lock(lock),
    )
    .map_err(io_err("open", child))?;
    match format {
        Format::Vhdx => {
            let mut f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", child))?;
            let old = f
                .parent_locator()
                .cloned()
                .ok_or_else(|| StreamError::NoParent {
                    child: child.to_path_buf(),
                })?;
            let new = local_locator(&old, &relative, &abs);
            f.set_parent_locator(&new)
                .map_err(io_err("repoint", child))?;
            f.close().map_err(io_err("close", child))?;
        }
        _ => {
            let mut f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", child))?;
            f.set_parent(&abs, Some(&abs), Some(&relative))
                .map_err(io_err("repoint", child))?;
            f.flush().map_err(io_err("flush", child))?;
        }
    }
    Ok(())
}
