//! Log replay (MS-VHDX 2.3.3): find the active sequence and apply it, either to the file
//! (writable open) or into an in-memory [`Overlay`] (read-only open).
//!
//! Every 4 KiB-aligned log position is tried as an entry; an entry is valid when its CRC,
//! LogGuid, descriptors and data sectors check out. A sequence is a run of valid entries, each
//! starting where the previous ends (circularly), with consecutive sequence numbers; it is
//! usable when the tail named by its last entry (the head) is one of its entries. The active
//! sequence is the usable one whose head has the highest sequence number; its entries from the
//! tail to the head are applied in order. A file shorter than the head's FlushedFileOffset was
//! truncated and is refused; afterwards the file is extended to LastFileOffset.

use std::collections::{HashMap, HashSet};

use block_io::{check_bounds, Result, Storage};

use crate::error::corrupt_io;
use crate::header::Header;
use crate::log::{parse_entry, LogEntry, LogOp, SECTOR};
use crate::write::in_zero_chunks;

/// The entries to apply, tail first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPlan {
    /// Entries from tail to head.
    pub entries: Vec<LogEntry>,
}

impl ReplayPlan {
    /// The head (last) entry.
    pub fn head(&self) -> Option<&LogEntry> {
        self.entries.last()
    }

    /// Updates in application order.
    pub fn ops(&self) -> impl Iterator<Item = &LogOp> {
        self.entries.iter().flat_map(|e| e.ops.iter())
    }
}

/// Finds the active sequence of the log described by `header`. Returns `None` when the log
/// holds no usable sequence. Refuses logs outside the file.
pub fn find_active<S: Storage + ?Sized>(
    storage: &S,
    header: &Header,
) -> Result<Option<ReplayPlan>> {
    if header.log_guid.is_nil() {
        return Ok(None);
    }
    let file_len = storage.len()?;
    let (log_off, log_end) = header.log_range();
    let log_len = u64::from(header.log_length);
    if log_end > file_len {
        return Err(corrupt_io("the log lies beyond the end of the file"));
    }
    let mut read = |pos: u64, buf: &mut [u8]| storage.read_at(buf, log_off + pos);
    let mut entries: HashMap<u64, LogEntry> = HashMap::new();
    let mut pos = 0;
    while pos < log_len {
        if let Ok(e) = parse_entry(pos, log_len, &header.log_guid, file_len, &mut read)? {
            entries.insert(pos, e);
        }
        pos += SECTOR;
    }
    Ok(best_sequence(&entries, log_len))
}

/// Picks the active sequence among parsed valid entries (keyed by log position).
pub fn best_sequence(entries: &HashMap<u64, LogEntry>, log_len: u64) -> Option<ReplayPlan> {
    let next_of = |e: &LogEntry| -> Option<u64> {
        let n = (e.position + e.length) % log_len;
        let succ = entries.get(&n)?;
        (Some(succ.sequence_number) == e.sequence_number.checked_add(1)).then_some(n)
    };
    let has_pred: HashSet<u64> = entries.values().filter_map(next_of).collect();
    let mut best: Option<(u64, Vec<u64>)> = None;
    let mut starts: Vec<u64> = entries
        .keys()
        .copied()
        .filter(|p| !has_pred.contains(p))
        .collect();
    starts.sort_unstable();
    for start in starts {
        let mut run = vec![start];
        let mut cur = &entries[&start];
        // Sequence numbers strictly increase, so the walk ends; bound it anyway.
        while run.len() <= entries.len() {
            match next_of(cur) {
                Some(n) => {
                    run.push(n);
                    cur = &entries[&n];
                }
                None => break,
            }
        }
        let head = cur;
        let Some(tail_idx) = run.iter().position(|&p| p == head.tail) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(seq, _)| head.sequence_number > *seq)
        {
            best = Some((head.sequence_number, run[tail_idx..].to_vec()));
        }
    }
    best.map(|(_, run)| ReplayPlan {
        entries: run.iter().map(|p| entries[p].clone()).collect(),
    })
}

/// Checks a plan against the file: not truncated, and no update aimed at the file identifier,
/// the headers or the log itself.
pub fn validate_plan(plan: &ReplayPlan, header: &Header, file_len: u64) -> Result<()> {
    let Some(head) = plan.head() else {
        return Ok(());
    };
    // MS-VHDX 2.3.3: a file shorter than FlushedFileOffset has lost data.
    if file_len < head.flushed_file_offset {
        return Err(corrupt_io(format!(
            "the file is truncated: {file_len} bytes, the log says at least {}",
            head.flushed_file_offset
        )));
    }
    let log = header.log_range();
    // Every update lies inside the file as the writer knew it (LastFileOffset is the file size
    // when the entry was written).
    let limit = file_len.max(head.last_file_offset);
    for op in plan.ops() {
        let (s, e) = op
            .range()
            .ok_or_else(|| corrupt_io("log update overflows"))?;
        if e > limit {
            return Err(corrupt_io(format!(
                "log update at {s} lies beyond the file ({limit} bytes)"
            )));
        }
        if s < 192 * 1024 || (s < log.1 && log.0 < e) {
            return Err(corrupt_io(format!(
                "log update at {s} targets the headers or the log"
            )));
        }
    }
    Ok(())
}

/// Applies a validated plan to the file and syncs it.
pub fn apply<S: Storage + ?Sized>(storage: &S, plan: &ReplayPlan) -> Result<()> {
    for op in plan.ops() {
        match op {
            LogOp::Data {
                file_offset,
                sector,
            } => storage.write_at(sector, *file_offset)?,
            LogOp::Zero {
                file_offset,
                length,
            } => {
                let end = file_offset + length;
                // Inside the file write zeros; past its end, growing the file is enough.
                let inside = end.min(storage.len()?).saturating_sub(*file_offset);
                in_zero_chunks(*file_offset, inside, |zeros, at| {
                    storage.write_at(zeros, at)
                })?;
                if end > storage.len()? {
                    storage.set_len(end)?;
                }
            }
        }
    }
    if let Some(head) = plan.head() {
        if storage.len()? < head.last_file_offset {
            storage.set_len(head.last_file_offset)?;
        }
    }
    storage.sync_data()
}

/// Replayed updates kept in memory for a read-only open: reads of the file go through
/// [`Overlay::read`], which patches the file's bytes with the updates in order.
#[derive(Debug, Clone)]
pub struct Overlay {
    ops: Vec<LogOp>,
    /// Length of the file as replay would leave it.
    pub file_len: u64,
}

impl Overlay {
    /// Builds the overlay of `plan` for a file of `file_len` bytes.
    pub fn new(plan: &ReplayPlan, file_len: u64) -> Self {
        let mut len = file_len;
        for op in plan.ops() {
            if let Some((_, e)) = op.range() {
                len = len.max(e);
            }
        }
        if let Some(h) = plan.head() {
            len = len.max(h.last_file_offset);
        }
        Overlay {
            ops: plan.ops().cloned().collect(),
            file_len: len,
        }
    }

    /// Reads `buf` at `offset` of the replayed file view.
    pub fn read<S: Storage + ?Sized>(
        &self,
        storage: &S,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let end = check_bounds(offset, buf.len() as u64, self.file_len)?;
        let real = storage.len()?;
        if offset < real {
            let n = (real - offset).min(buf.len() as u64) as usize;
            storage.read_at(&mut buf[..n], offset)?;
            buf[n..].fill(0);
        } else {
            buf.fill(0);
        }
        for op in &self.ops {
            let Some((s, e)) = op.range() else { continue };
            if e <= offset || s >= end {
                continue;
            }
            let from = s.max(offset);
            let to = e.min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match op {
                LogOp::Zero { .. } => dst.fill(0),
                LogOp::Data { sector, .. } => {
                    dst.copy_from_slice(&sector[(from - s) as usize..(to - s) as usize])
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{build_entry, EntryParams};
    use uuid::Uuid;

    fn entry_at(log: &mut [u8], pos: usize, seq: u64, tail: u64, target: u64, fill: u8) {
        let s = vec![fill; 4096];
        let e = build_entry(
            &EntryParams {
                sequence_number: seq,
                log_guid: Uuid::from_u128(1),
                tail,
                flushed_file_offset: 0,
                last_file_offset: 0,
            },
            &[(target, &s)],
        );
        log[pos..pos + e.len()].copy_from_slice(&e);
    }

    fn plan(log: &[u8]) -> Option<ReplayPlan> {
        let mut map = HashMap::new();
        let mut pos = 0;
        while pos < log.len() as u64 {
            let r = parse_entry(
                pos,
                log.len() as u64,
                &Uuid::from_u128(1),
                1 << 30,
                &mut |p, b| {
                    b.copy_from_slice(&log[p as usize..p as usize + b.len()]);
                    Ok(())
                },
            )
            .unwrap();
            if let Ok(e) = r {
                map.insert(pos, e);
            }
            pos += 4096;
        }
        best_sequence(&map, log.len() as u64)
    }

    #[test]
    fn picks_highest_usable_sequence() {
        let mut log = vec![0u8; 64 * 4096];
        // Sequence 10 (tail itself), 11 (tail 0), 12 (tail 8192).
        entry_at(&mut log, 0, 10, 0, 1 << 20, 1);
        entry_at(&mut log, 8192, 11, 0, 1 << 20, 2);
        entry_at(&mut log, 16384, 12, 8192, 1 << 20, 3);
        let p = plan(&log).unwrap();
        let seqs: Vec<u64> = p.entries.iter().map(|e| e.sequence_number).collect();
        assert_eq!(seqs, vec![11, 12]);
        // A stale, higher-numbered entry whose tail is outside its run is not usable.
        entry_at(&mut log, 40960, 50, 0, 1 << 20, 9);
        let p = plan(&log).unwrap();
        assert_eq!(p.head().unwrap().sequence_number, 12);
        // Tear the head: the run ends at 11.
        log[16384 + 100] ^= 0xFF;
        let p = plan(&log).unwrap();
        assert_eq!(p.head().unwrap().sequence_number, 11);
        // A gap in numbers breaks the run: 11 follows 10 only if consecutive.
        let mut log = vec![0u8; 64 * 4096];
        entry_at(&mut log, 0, 10, 0, 1 << 20, 1);
        entry_at(&mut log, 8192, 12, 0, 1 << 20, 2);
        let p = plan(&log).unwrap();
        assert_eq!(p.head().unwrap().sequence_number, 10);
    }

    #[test]
    fn empty_log_has_no_plan() {
        assert!(plan(&vec![0u8; 16 * 4096]).is_none());
    }

    #[test]
    fn overlay_patches_reads() {
        let storage = block_io::MemStorage::from_bytes(&vec![7u8; 3 << 20]);
        let mut log = vec![0u8; 16 * 4096];
        entry_at(&mut log, 0, 1, 0, 2 << 20, 0xEE);
        let p = plan(&log).unwrap();
        let o = Overlay::new(&p, 3 << 20);
        let mut buf = vec![0u8; 8192];
        o.read(&storage, &mut buf, (2 << 20) - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 0xEE));
    }
}
