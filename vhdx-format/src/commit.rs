//! Committing a [`VhdxFile`]'s pending metadata: BAT and sector-bitmap sectors changed in
//! memory go to disk through the log (MS-VHDX 2.3), batched, with no metadata lock held
//! across any of the I/O.
//!
//! A commit:
//! 1. takes a snapshot of the pending set under the state lock (copies of the dirty BAT and
//!    bitmap sectors and the freed ranges to punch) and empties it; changes made after this
//!    go to the next commit;
//! 2. syncs the file: every payload write that a snapshotted BAT entry or bitmap bit points
//!    at completed before that entry was published in memory, so after this sync no entry
//!    in the batch can reach the log ahead of its data (MS-VHDX 2.3: "data before metadata";
//!    2.5: a BAT entry must never point at unwritten data);
//! 3. per log entry (as many sectors as the log holds): writes the entry, syncs, writes the
//!    sectors in place, syncs (MS-VHDX 2.3: "log entry, flush, write in place, flush");
//!    every entry is written at the start of the log with its own tail, as the previous
//!    entry is fully applied by then;
//! 4. punches the freed ranges, now that the BAT changes freeing them are durable.
//!
//! Commits run one at a time (the log has one writer). A flush asks for "a commit that
//! started after my call": if one is running that started before, it waits for it and then
//! for the next; if one started after its call (by another flush), it waits for that one's
//! result instead of starting its own. The counter: commits started, commits done, one
//! running at most; `done >= started_at_call + 1` answers a flush.

use std::sync::atomic::Ordering;

use block_io::{Result, Storage};
use uuid::Uuid;

use crate::bat::BatEntry;
use crate::error::corrupt_io;
use crate::file::VhdxFile;
use crate::log::{build_entry, max_data_sectors, EntryParams, SECTOR};

/// Commit bookkeeping behind [`VhdxFile::commits`].
#[derive(Debug)]
pub(crate) struct CommitCtl {
    /// Commits started (the generation of the last one started).
    started: u64,
    /// Generation of the last commit finished (commits finish in order).
    done: u64,
    /// A commit is running.
    running: bool,
    /// Next log sequence number (MS-VHDX 2.3.1.1: consecutive within a session's log).
    pub(crate) log_seq: u64,
}

impl CommitCtl {
    pub(crate) fn new() -> Self {
        CommitCtl {
            started: 0,
            done: 0,
            running: false,
            log_seq: 1,
        }
    }
}

/// Where log entries go: from the current header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogTarget {
    pub guid: Uuid,
    pub offset: u64,
    pub length: u32,
}

/// Pending changes taken out of the state for one commit.
struct Batch {
    /// (file offset, 4 KiB sector contents).
    sectors: Vec<(u64, Vec<u8>)>,
    punch: Vec<(u64, u64)>,
}

/// What a commit does once the batch is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// Nothing more.
    Nothing,
    /// Mark the log empty (LogGuid = 0) and end the session.
    Close,
}

/// Clears `running` if the commit unwinds, so waiters are never stranded.
struct Running<'a, S: Storage> {
    file: &'a VhdxFile<S>,
    gen: u64,
    seq: u64,
}

impl<S: Storage> Drop for Running<'_, S> {
    fn drop(&mut self) {
        let mut c = self.file.commits.lock();
        c.running = false;
        c.done = self.gen;
        c.log_seq = self.seq;
        self.file.commit_cv.notify_all();
    }
}

impl<S: Storage> VhdxFile<S> {
    /// [`BlockDevice::flush`](block_io::BlockDevice::flush): every write acknowledged before
    /// the call, and the metadata allocating it, durable; coalesced with concurrent flushes.
    pub(crate) fn flush_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.failstop.check()?;
        self.commit_coalesced(After::Nothing)
    }

    /// Runs a commit that starts after this call, or waits for one that another caller
    /// started after this call. `After::Close` always runs its own (the header update must
    /// follow its commit with no other commit in between).
    pub(crate) fn commit_coalesced(&self, after: After) -> Result<()> {
        let mut c = self.commits.lock();
        // Any commit with a generation >= target snapshots the pending set after this point.
        let target = c.started + 1;
        loop {
            if after == After::Nothing && c.done >= target {
                drop(c);
                // Every commit error latches the fail-stop state: a failed commit at or after
                // `target` shows here.
                return self.failstop.check();
            }
            if !c.running {
                c.running = true;
                c.started += 1;
                let mut run = Running {
                    file: self,
                    gen: c.started,
                    seq: c.log_seq,
                };
                drop(c);
                let r = self.commit_once(&mut run.seq);
                let r = r.and_then(|()| match after {
                    After::Nothing => Ok(()),
                    After::Close => self.end_session(),
                });
                return self.failstop.guard(r);
            }
            self.commit_cv.wait(&mut c);
        }
    }

    /// Commits what is pending, then runs `f` before any other commit can start (the log
    /// has no other writer meanwhile): compaction's truncation, which empties the log,
    /// cuts the file and starts a new log.
    pub(crate) fn exclusive_commit<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut c = self.commits.lock();
        while c.running {
            self.commit_cv.wait(&mut c);
        }
        c.running = true;
        c.started += 1;
        let mut run = Running {
            file: self,
            gen: c.started,
            seq: c.log_seq,
        };
        drop(c);
        let r = self.commit_once(&mut run.seq).and_then(|()| f());
        self.failstop.guard(r)
    }

    /// `true` while a commit runs.
    pub(crate) fn commit_running(&self) -> bool {
        self.commits.lock().running
    }

    /// Takes the pending set out of the state: copies of the dirty sectors as they are now.
    fn take_batch(&self) -> Result<Batch> {
        let mut st = self.state.lock();
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::with_capacity(st.pending());
        for &s in &st.dirty_bat {
            let mut data = vec![0u8; SECTOR as usize];
            for (k, slot) in data.chunks_exact_mut(8).enumerate() {
                let i = s * (SECTOR / 8) + k as u64;
                if let Some(a) = self.bat.get(i as usize) {
                    slot.copy_from_slice(&a.load(Ordering::Acquire).to_le_bytes());
                }
            }
            sectors.push((self.regions.bat.file_offset + s * SECTOR, data));
        }
        {
            let maps = self.bitmaps.read();
            for &(chunk, s) in &st.dirty_bitmap {
                let e = BatEntry::try_from(self.bitmap_entry(chunk))?;
                let bm = maps
                    .get(&chunk)
                    .ok_or_else(|| corrupt_io("dirty sector bitmap not in memory"))?;
                let from = (s * SECTOR) as usize;
                let data = bm
                    .get(from..from + SECTOR as usize)
                    .ok_or_else(|| corrupt_io("dirty sector bitmap sector out of range"))?;
                sectors.push((e.file_offset + s * SECTOR, data.to_vec()));
            }
        }
        st.dirty_bat.clear();
        st.dirty_bitmap.clear();
        Ok(Batch {
            sectors,
            punch: std::mem::take(&mut st.punch),
        })
    }

    /// The log of the current session, starting one if the batch found none (a write that
    /// raced a `close`).
    fn log_target(&self) -> Result<LogTarget> {
        let mut h = self.hdr.lock();
        if !h.session {
            self.start_session(&mut h)?;
        }
        Ok(LogTarget {
            guid: h.header.log_guid,
            offset: h.header.log_offset,
            length: h.header.log_length,
        })
    }

    /// One commit (see the module docs). Runs with no lock held but during the snapshot;
    /// the caller guarantees it is the only commit running.
    fn commit_once(&self, seq: &mut u64) -> Result<()> {
        let fs = &self.failstop;
        let batch = fs.guard(self.take_batch())?;
        // The length read before the sync is durable after it (the file only grows), so it
        // is a truthful FlushedFileOffset (MS-VHDX 2.3.1.1: a file shorter than that at
        // replay is corrupt); every block in the batch lies below it (each was grown into
        // before its entry was published).
        let file_len = fs.guard(self.storage.len())?;
        // MS-VHDX 2.3 / 2.5: the payload of every block in the batch is durable before the
        // entries pointing at it reach the log. Also what makes a bare flush durable.
        fs.guard(self.storage.sync_data())?;
        if batch.sectors.is_empty() {
            return self.punch(&batch.punch);
        }
        let log = fs.guard(self.log_target())?;
        let per_entry = max_data_sectors(u64::from(log.length)).max(1) as usize;
        for group in batch.sectors.chunks(per_entry) {
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, d)| (*o, &d[..])).collect();
            self.log_and_apply(&log, seq, file_len, &refs)?;
        }
        self.punch(&batch.punch)
    }

    /// Punches freed ranges (their BAT changes are durable).
    fn punch(&self, ranges: &[(u64, u64)]) -> Result<()> {
        for &(o, l) in ranges {
            self.failstop.guard(self.storage.punch_hole(o, l))?;
        }
        Ok(())
    }

    /// Writes one log entry holding `refs` (file offset, 4 KiB sector each), then the
    /// sectors in place: MS-VHDX 2.3's order, log entry, flush, write in place, flush. The
    /// caller is the only log writer (a commit, or a reparent holding `&mut`).
    pub(crate) fn log_and_apply(
        &self,
        log: &LogTarget,
        seq: &mut u64,
        file_len: u64,
        refs: &[(u64, &[u8])],
    ) -> Result<()> {
        let fs = &self.failstop;
        let entry = build_entry(
            &EntryParams {
                sequence_number: *seq,
                log_guid: log.guid,
                tail: 0,
                flushed_file_offset: file_len,
                last_file_offset: file_len,
            },
            refs,
        );
        fs.guard(self.storage.write_at(&entry, log.offset))?;
        // MS-VHDX 2.3: the entry is durable before any sector it describes is written in
        // place, so a torn in-place write is always repaired by replay.
        fs.guard(self.storage.sync_data())?;
        for (off, data) in refs {
            fs.guard(self.storage.write_at(data, *off))?;
        }
        // The in-place writes are durable before the next entry overwrites this one at the
        // start of the log.
        fs.guard(self.storage.sync_data())?;
        *seq += 1;
        Ok(())
    }
}
