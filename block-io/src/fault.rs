//! [`FaultStorage`]: a [`Storage`] that crashes and fails on purpose, for tests.
//!
//! It keeps two images apart:
//! - the **live** image, what reads see (the page cache of a running machine);
//! - the **durable** image, what survives a power cut (the platter).
//!
//! Every write-like operation (`write_at`, `set_len`, `punch_hole`) changes the live image at
//! once and is queued as *pending*. `sync_data` applies the pending queue to the durable image
//! and empties it. Nothing else ever reaches the durable image.
//!
//! ## Power cuts
//! [`set_cut`](FaultStorage::set_cut) arms a cut at a [`CutPoint`]: after the first `n`
//! write-like operations, writes, or syncs, the next one of that kind fails with
//! [`ErrorKind::PowerCut`] and is not carried out, and from then on every operation — reads
//! included — fails the same way. Counting is from the moment the storage was made, so a test
//! runs its workload once without a cut, reads [`ops`](FaultStorage::ops), and then replays the
//! workload with a cut at every index below that.
//!
//! After a cut (or at any time), [`crash_image`](FaultStorage::crash_image) builds what a
//! reboot would find: the durable image, plus each pending operation with a fate of its own —
//! [`WriteFate::Lost`], [`WriteFate::Whole`], or [`WriteFate::Torn`] (only some of its sectors
//! persisted) — applied in some order. Fates and order are drawn from a seed (ChaCha8, so a
//! failing seed replays exactly on every platform); every subset, every tear and every order
//! has a non-zero chance, which is what exposes a missing flush between dependent writes.
//! [`crash_image_with`](FaultStorage::crash_image_with) takes fates and order explicitly, for
//! exhaustive enumeration. A pending `set_len` is either lost or kept whole.
//!
//! Tearing is at [`sector_size`](FaultStorage::with_sector_size) granularity (512 bytes by
//! default) on absolute sector boundaries: a sector is never half-written, as on real disks with
//! power-loss protection at the sector level.
//!
//! ## Errors
//! [`inject`](FaultStorage::inject) arms one-shot errors: EIO on the n-th read, write or sync
//! and ENOSPC on the n-th write (counting from 0 over operations of that type). A failed write
//! is not carried out. A failed sync models Linux's behaviour after an `fsync` error: the
//! pending writes stay visible in the live image but are **dropped from the queue** and never
//! become durable, even if a later sync succeeds — so code that "retries the fsync" loses data
//! here just as it would on a real kernel, and fail-stop latching is what protects it.

use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, ErrorKind, Result};
use crate::memory::MemStorage;
use crate::storage::{Extent, Storage};

/// Where an armed power cut strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutPoint {
    /// After the first `n` write-like operations and syncs together.
    AfterOps(u64),
    /// After the first `n` write-like operations (syncs not counted).
    AfterWrites(u64),
    /// After the first `n` syncs (writes not counted).
    AfterSyncs(u64),
}

/// A one-shot injected error; `nth` counts operations of that type from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// The n-th read fails with EIO.
    ReadError {
        /// Index of the read to fail.
        nth: u64,
    },
    /// The n-th write-like operation fails with EIO and is not carried out.
    WriteError {
        /// Index of the write to fail.
        nth: u64,
    },
    /// The n-th write-like operation fails with ENOSPC and is not carried out.
    NoSpace {
        /// Index of the write to fail.
        nth: u64,
    },
    /// The n-th sync fails with EIO; the pending writes never become durable.
    SyncError {
        /// Index of the sync to fail.
        nth: u64,
    },
}

/// What became of one pending operation at a power cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFate {
    /// Nothing of it persisted.
    Lost,
    /// All of it persisted.
    Whole,
    /// Only the sectors whose flag is `true` persisted; one flag per sector the operation
    /// touches (see [`FaultStorage::pending_sectors`]).
    Torn(Vec<bool>),
}

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpType {
    Read,
    Write,
    Sync,
}

#[derive(Debug, Default)]
struct State {
    live: MemStorage,
    durable: MemStorage,
    pending: Vec<Pending>,
    cut: Option<CutPoint>,
    is_cut: bool,
    reads: u64,
    writes: u64,
    syncs: u64,
    injections: Vec<Injection>,
}

/// A storage that keeps live and durable bytes apart and fails on command. See the module docs.
#[derive(Debug)]
pub struct FaultStorage {
    state: Mutex<State>,
    sector: u64,
}

fn cut_error() -> Error {
    Error::new(ErrorKind::PowerCut, "the power was cut")
}

impl State {
    /// Counts an operation of `ty`, applying an armed cut or injected error. `Ok(())` means the
    /// operation may proceed.
    fn admit(&mut self, ty: OpType) -> Result<()> {
        if self.is_cut {
            return Err(cut_error());
        }
        let index = match ty {
            OpType::Read => self.reads,
            OpType::Write => self.writes,
            OpType::Sync => self.syncs,
        };
        let strikes = match (self.cut, ty) {
            (_, OpType::Read) | (None, _) => false,
            (Some(CutPoint::AfterOps(n)), _) => self.writes + self.syncs >= n,
            (Some(CutPoint::AfterWrites(n)), OpType::Write) => self.writes >= n,
            (Some(CutPoint::AfterSyncs(n)), OpType::Sync) => self.syncs >= n,
            _ => false,
        };
        if strikes {
            self.is_cut = true;
            return Err(cut_error());
        }
        match ty {
            OpType::Read => self.reads += 1,
            OpType::Write => self.writes += 1,
            OpType::Sync => self.syncs += 1,
        }
        let hit = self.injections.iter().position(|inj| match (*inj, ty) {
            (Injection::ReadError { nth }, OpType::Read) => nth == index,
            (Injection::WriteError { nth }, OpType::Write) => nth == index,
            (Injection::NoSpace { nth }, OpType::Write) => nth == index,
            (Injection::SyncError { nth }, OpType::Sync) => nth == index,
            _ => false,
        });
        let Some(pos) = hit else { return Ok(()) };
        let errno = match self.injections.remove(pos) {
            Injection::NoSpace { .. } => libc::ENOSPC,
            _ => libc::EIO,
        };
        if ty == OpType::Sync {
            // fsyncgate: the kernel marks the failed pages clean; they never reach the disk.
            self.pending.clear();
        }
        Err(Error::io(
            "injected fault",
            std::io::Error::from_raw_os_error(errno),
        ))
    }
}

impl FaultStorage {
    /// A storage whose live and durable images both start as `base`.
    pub fn new(base: MemStorage) -> Self {
        FaultStorage {
            state: Mutex::new(State {
                durable: base.clone(),
                live: base,
                ..State::default()
            }),
            sector: 512,
        }
    }

    /// An empty storage.
    pub fn empty() -> Self {
        Self::new(MemStorage::new())
    }

    /// Sets the tearing granularity (a power of two, at least 1; default 512).
    pub fn with_sector_size(mut self, sector: u64) -> Self {
        self.sector = sector.max(1);
        self
    }

    /// The tearing granularity in bytes.
    pub fn sector_size(&self) -> u64 {
        self.sector
    }

    /// Arms a power cut (replacing any armed one).
    pub fn set_cut(&self, cut: CutPoint) {
        self.state.lock().cut = Some(cut);
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        self.state.lock().is_cut = true;
    }

    /// `true` once the power is cut.
    pub fn is_cut(&self) -> bool {
        self.state.lock().is_cut
    }

    /// Arms a one-shot error.
    pub fn inject(&self, injection: Injection) {
        self.state.lock().injections.push(injection);
    }

    /// Write-like operations plus syncs carried out so far (the index space of
    /// [`CutPoint::AfterOps`]).
    pub fn ops(&self) -> u64 {
        let s = self.state.lock();
        s.writes + s.syncs
    }

    /// Write-like operations carried out so far.
    pub fn writes(&self) -> u64 {
        self.state.lock().writes
    }

    /// Syncs carried out so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Reads carried out so far.
    pub fn reads(&self) -> u64 {
        self.state.lock().reads
    }

    /// Number of write-like operations not yet made durable.
    pub fn pending_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// How many sectors pending operation `index` touches (the length of its
    /// [`WriteFate::Torn`] mask); `None` if there is no such operation.
    pub fn pending_sectors(&self, index: usize) -> Option<usize> {
        let s = self.state.lock();
        s.pending.get(index).map(|p| self.sectors_of(p).len())
    }

    /// A copy of what reads see now.
    pub fn live_image(&self) -> MemStorage {
        self.state.lock().live.clone()
    }

    /// A copy of the durable image: what survives a cut if every pending operation is lost.
    pub fn durable_image(&self) -> MemStorage {
        self.state.lock().durable.clone()
    }

    /// A crash sweep of `op` over an image holding `bytes`: runs it once on a fresh
    /// `FaultStorage` without a cut to count the writes and syncs it makes (those of `open`,
    /// which prepares its input, are not cut), then once per cut point — power lost after each
    /// of those operations, and before the first — and calls `check(cut, seed, image)` with
    /// the [`crash_image`](Self::crash_image) of every seed in `0..seeds`. `op` takes what
    /// `open` made by value and drops it, so nothing reaches the storage after a cut. Returns
    /// the number of operations of the uncut run.
    pub fn sweep_cuts<T>(
        bytes: &[u8],
        open: impl Fn(std::sync::Arc<FaultStorage>) -> T,
        op: impl Fn(T),
        seeds: u64,
        mut check: impl FnMut(u64, u64, MemStorage),
    ) -> u64 {
        let run = |cut: Option<u64>| {
            let fs = std::sync::Arc::new(FaultStorage::new(MemStorage::from_bytes(bytes)));
            let input = open(fs.clone());
            let ops0 = fs.ops();
            if let Some(n) = cut {
                fs.set_cut(CutPoint::AfterOps(ops0 + n));
            }
            op(input);
            let ops = fs.ops() - ops0;
            (fs, ops)
        };
        let (_, total) = run(None);
        for n in 0..=total {
            let (fs, _) = run(Some(n));
            for seed in 0..seeds {
                check(n, seed, fs.crash_image(seed));
            }
        }
        total
    }

    /// What a reboot finds, with fates and order of the pending operations drawn from `seed`.
    pub fn crash_image(&self, seed: u64) -> MemStorage {
        let s = self.state.lock();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut plan: Vec<(usize, WriteFate)> = s
            .pending
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let sectors = self.sectors_of(p).len();
                let fate = match rng.random_range(0..3u8) {
                    0 => WriteFate::Lost,
                    1 => WriteFate::Whole,
                    _ if sectors < 2 || matches!(p, Pending::SetLen(_)) => {
                        if rng.random_bool(0.5) {
                            WriteFate::Whole
                        } else {
                            WriteFate::Lost
                        }
                    }
                    _ => WriteFate::Torn((0..sectors).map(|_| rng.random_bool(0.5)).collect()),
                };
                (i, fate)
            })
            .collect();
        plan.shuffle(&mut rng);
        let mut image = s.durable.clone();
        for (i, fate) in &plan {
            self.apply(&mut image, &s.pending[*i], fate);
        }
        image
    }

    /// What a reboot finds when the pending operations named in `plan` persist with the given
    /// fates, applied in the order listed; pending operations not named are lost.
    ///
    /// Fails with [`ErrorKind::InvalidInput`] for an index out of range, an index named twice,
    /// a torn mask of the wrong length, or a torn `set_len`.
    pub fn crash_image_with(&self, plan: &[(usize, WriteFate)]) -> Result<MemStorage> {
        let s = self.state.lock();
        let mut seen = vec![false; s.pending.len()];
        for (i, fate) in plan {
            let Some(p) = s.pending.get(*i) else {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("no pending operation {i}"),
                ));
            };
            if std::mem::replace(&mut seen[*i], true) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("pending operation {i} named twice"),
                ));
            }
            if let WriteFate::Torn(mask) = fate {
                if matches!(p, Pending::SetLen(_)) || mask.len() != self.sectors_of(p).len() {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("torn mask does not fit pending operation {i}"),
                    ));
                }
            }
        }
        let mut image = s.durable.clone();
        for (i, fate) in plan {
            self.apply(&mut image, &s.pending[*i], fate);
        }
        Ok(image)
    }

    /// The sector-aligned pieces `(offset, len)` a pending operation touches.
    fn sectors_of(&self, p: &Pending) -> Vec<(u64, u64)> {
        let (offset, len) = match p {
            Pending::Write { offset, data } => (*offset, data.len() as u64),
            Pending::Punch { offset, len } => (*offset, *len),
            Pending::SetLen(_) => return vec![(0, 0)],
        };
        let end = offset.saturating_add(len);
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = (pos / self.sector + 1).saturating_mul(self.sector).min(end);
            pieces.push((pos, next - pos));
            pos = next;
        }
        pieces
    }

    /// Applies one pending operation to `image` with `fate`. Infallible: `image` is memory
    /// without a capacity limit and offsets were valid when the operation was accepted.
    fn apply(&self, image: &mut MemStorage, p: &Pending, fate: &WriteFate) {
        let keep = |k: usize| match fate {
            WriteFate::Lost => false,
            WriteFate::Whole => true,
            WriteFate::Torn(mask) => mask.get(k).copied().unwrap_or(false),
        };
        match p {
            Pending::SetLen(len) => {
                if keep(0) {
                    let _ = image.set_len(*len);
                }
            }
            Pending::Write { offset, data } => {
                for (k, (off, len)) in self.sectors_of(p).into_iter().enumerate() {
                    if keep(k) {
                        let start = (off - offset) as usize;
                        let _ = image.write_at(&data[start..start + len as usize], off);
                    }
                }
            }
            Pending::Punch { .. } => {
                for (k, (off, len)) in self.sectors_of(p).into_iter().enumerate() {
                    if keep(k) {
                        let _ = image.punch_hole(off, len);
                    }
                }
            }
        }
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut s = self.state.lock();
        s.admit(OpType::Read)?;
        s.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.state.lock();
        s.admit(OpType::Write)?;
        s.live.write_at(buf, offset)?;
        s.pending.push(Pending::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        let s = self.state.lock();
        if s.is_cut {
            return Err(cut_error());
        }
        s.live.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut s = self.state.lock();
        s.admit(OpType::Write)?;
        s.live.set_len(len)?;
        s.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        s.admit(OpType::Sync)?;
        let pending = std::mem::take(&mut s.pending);
        for p in &pending {
            self.apply(&mut s.durable, p, &WriteFate::Whole);
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.state.lock();
        s.admit(OpType::Write)?;
        let end = offset.saturating_add(len).min(s.live.len()?);
        s.live.punch_hole(offset, len)?;
        if end > offset {
            s.pending.push(Pending::Punch {
                offset,
                len: end - offset,
            });
        }
        Ok(())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let s = self.state.lock();
        if s.is_cut {
            return Err(cut_error());
        }
        s.live.extent(offset, len)
    }
}
