//! Log replay (MS-VHDX 2.3.3): find the active sequence, check it, and apply it, either to
//! the file (writable open) or through an in-memory [`Overlay`] (read-only open).
//!
//! Finding entries is one pass over the log, linear in its size: the log is read in pieces of
//! at most [`MAX_READ`], skipping holes of a sparse file; a sector that starts with "loge" is parsed as an entry
//! ([`parse_entry`] reads it in bounded pieces and gives up at the first sector that cannot
//! belong to it); after a valid entry the scan continues where that entry ends, after an
//! invalid one at the next sector. This finds every valid entry, because no sector after the
//! first of a valid entry starts with "loge", so valid entries never overlap. Only a compact
//! record of each valid entry is kept (about 24 bytes per entry, at most one per 4 KiB of log).
//!
//! A sequence is a run of valid entries, each starting where the previous ends (circularly),
//! with consecutive sequence numbers; it is usable when the tail named by its last entry (the
//! head) is one of its entries. The active sequence is the usable one whose head has the
//! highest sequence number; its entries from the tail to the head are applied in order.
//!
//! Applying goes through an [`Overlay`]: the updates folded, in order, into a map of file
//! ranges to their final content (zeros, or a data sector of the log, referred to by position),
//! so memory grows with the number of distinct ranges updated, not with the bytes of the log,
//! and each range is written once. A file shorter than the head's FlushedFileOffset was
//! truncated and is refused. The file is then extended towards the head's LastFileOffset, but
//! no further than the layout needs (see [`replayed_len`]).

use std::collections::BTreeMap;

use block_io::{check_bounds, Result, Storage};

use crate::error::corrupt_io;
use crate::header::{Header, MIB};
use crate::log::{assemble_sector, entry_ops, parse_entry, LogEntry, LogOp, MAX_READ, SECTOR};
use crate::write::in_zero_chunks;

/// Most distinct file ranges an [`Overlay`] holds (about 80 bytes each with the map's
/// overhead, so at most about 40 MiB). Writers replay every entry before the next session, so
/// a real log updates far fewer ranges than this.
pub const MAX_OVERLAY_RANGES: usize = 1 << 19;

/// A valid entry found by the scan: what linking entries into sequences needs. Log positions
/// and lengths fit in u32 because LogLength is a u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    position: u32,
    length: u32,
    tail: u32,
    sequence_number: u64,
}

/// The active sequence: where its entries are, tail first, and its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPlan {
    /// Log positions of the entries from tail to head.
    pub positions: Vec<u64>,
    /// The head (last) entry.
    pub head: LogEntry,
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
    let read_log = |pos: u64, buf: &mut [u8]| storage.read_at(buf, log_off + pos);
    // Holes read as zeros and hold no entry: the scan skips them.
    let hole = |pos: u64, len: u64| -> Result<u64> {
        let e = storage.extent(log_off + pos, len)?;
        Ok(if e.allocated { 0 } else { e.len.min(len) })
    };
    let found = scan(log_len, header, &read_log, &hole)?;
    let Some((run, head)) = best_sequence(&found, log_len) else {
        return Ok(None);
    };
    // Read the head's header again for the fields the scan does not keep.
    let head = match parse_entry(head, log_len, &header.log_guid, &mut |p, b| read_log(p, b))? {
        Ok(e) => e,
        Err(why) => {
            return Err(corrupt_io(format!(
                "log entry at {head} changed while replaying: {why}"
            )))
        }
    };
    Ok(Some(ReplayPlan {
        positions: run,
        head,
    }))
}

/// The scan: every valid entry, in log order. `hole(pos, len)` is the length of the hole
/// starting at log position `pos` (0 if none), looking at most `len` bytes.
fn scan(
    log_len: u64,
    header: &Header,
    read_log: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    hole: &dyn Fn(u64, u64) -> Result<u64>,
) -> Result<Vec<Found>> {
    // At most one entry per sector; reserving the bound avoids copies while growing (untouched
    // capacity costs no memory).
    let mut found = Vec::with_capacity(usize::try_from(log_len / SECTOR).unwrap_or(0));
    let mut chunk: Vec<u8> = Vec::new();
    let mut chunk_pos = 0u64;
    let mut pos = 0u64;
    while pos < log_len {
        let in_chunk = pos >= chunk_pos && pos - chunk_pos < chunk.len() as u64;
        if !in_chunk {
            let n = (log_len - pos).min(MAX_READ as u64);
            let skip = hole(pos, n)? / SECTOR * SECTOR;
            if skip > 0 {
                pos += skip;
                continue;
            }
            let n = n as usize;
            chunk.resize(n, 0);
            read_log(pos, &mut chunk)?;
            chunk_pos = pos;
        }
        let at = (pos - chunk_pos) as usize;
        if chunk.get(at..at + 4) != Some(&b"loge"[..]) {
            pos += SECTOR;
            continue;
        }
        // Serve the entry's reads from the chunk when it holds them.
        let mut read = |p: u64, buf: &mut [u8]| -> Result<()> {
            let rel = p.checked_sub(chunk_pos).map(|r| r as usize);
            match rel.and_then(|r| chunk.get(r..r.checked_add(buf.len())?)) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => read_log(p, buf),
            }
        };
        match parse_entry(pos, log_len, &header.log_guid, &mut read)? {
            Ok(e) => {
                found.push(Found {
                    position: pos as u32,
                    length: e.length as u32,
                    tail: e.tail as u32,
                    sequence_number: e.sequence_number,
                });
                // No valid entry starts inside this one (see the module docs). An entry that
                // wraps ends the scan: its end lies in the part already scanned.
                pos += e.length;
            }
            Err(_) => pos += SECTOR,
        }
    }
    Ok(found)
}

/// Picks the active sequence among the valid entries (in log order, not overlapping). Returns
/// the positions from tail to head and the head's position.
fn best_sequence(found: &[Found], log_len: u64) -> Option<(Vec<u64>, u64)> {
    let n = found.len();
    // links[i]: entry i + 1 (circularly) continues entry i. Entries do not overlap, so the only
    // entry that can start where entry i ends is the next one in log order.
    let links: Vec<bool> = (0..n)
        .map(|i| {
            let (a, b) = (&found[i], &found[(i + 1) % n]);
            let end = (u64::from(a.position) + u64::from(a.length)) % log_len;
            n > 1
                && end == u64::from(b.position)
                && a.sequence_number.checked_add(1) == Some(b.sequence_number)
        })
        .collect();
    // Sequence numbers strictly increase along links, so some entry has no predecessor; start
    // there so every run is seen whole.
    let first = (0..n).find(|&i| !links[(i + n - 1) % n])?;
    let mut best: Option<(u64, u64, Vec<u64>)> = None; // (head seq, start position, run)
    let mut i = first;
    let mut seen = 0;
    while seen < n {
        let start = i;
        let mut len = 1;
        while links[(start + len - 1) % n] && len < n {
            len += 1;
        }
        seen += len;
        i = (start + len) % n;
        let run: Vec<usize> = (0..len).map(|k| (start + k) % n).collect();
        let head = &found[run[len - 1]];
        let Some(t) = run.iter().position(|&k| found[k].position == head.tail) else {
            continue;
        };
        let start_pos = u64::from(found[start].position);
        let better = best.as_ref().is_none_or(|(seq, pos, _)| {
            head.sequence_number > *seq || (head.sequence_number == *seq && start_pos < *pos)
        });
        if better {
            let positions = run[t..]
                .iter()
                .map(|&k| u64::from(found[k].position))
                .collect();
            best = Some((head.sequence_number, start_pos, positions));
        }
    }
    best.map(|(_, _, run)| {
        let head = run.last().copied().unwrap_or(0);
        (run, head)
    })
}

/// What a range of the replayed file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Zeros.
    Zero,
    /// One sector: `leading`, bytes 8..4092 of the data sector at file offset `at`, `trailing`.
    Data {
        at: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    end: u64,
    source: Source,
}

/// The replayed file view: the active sequence folded into final contents per file range.
/// A read-only open reads through [`Overlay::read`]; a writable open writes it with
/// [`apply`].
#[derive(Debug, Clone)]
pub struct Overlay {
    /// Start offset -> range, not overlapping.
    ranges: BTreeMap<u64, Range>,
    /// Length of the file as reads see it.
    pub file_len: u64,
    /// The highest end of any update (0 without updates).
    pub ops_end: u64,
    /// The head's LastFileOffset.
    pub last_file_offset: u64,
}

impl Overlay {
    /// Reads the updates of `plan` from the log and folds them, checking each against the file
    /// of `file_len` bytes: not truncated (2.3.3: a file shorter than FlushedFileOffset has
    /// lost data), and no update aimed at the file identifier, the headers, the log itself or
    /// beyond both the file and LastFileOffset. Reads are at most [`MAX_READ`] bytes. The
    /// view's length is `max(file_len, end of the updates, LastFileOffset)` until
    /// [`Overlay::set_len`] caps it.
    pub fn build<S: Storage + ?Sized>(
        storage: &S,
        header: &Header,
        plan: &ReplayPlan,
        file_len: u64,
    ) -> Result<Self> {
        let head = &plan.head;
        if file_len < head.flushed_file_offset {
            return Err(corrupt_io(format!(
                "the file is truncated: {file_len} bytes, the log says at least {}",
                head.flushed_file_offset
            )));
        }
        let log = header.log_range();
        let log_len = u64::from(header.log_length);
        // Every update lies inside the file as the writer knew it (LastFileOffset is the file
        // size when the entry was written).
        let limit = file_len.max(head.last_file_offset);
        let mut o = Overlay {
            ranges: BTreeMap::new(),
            file_len,
            ops_end: 0,
            last_file_offset: head.last_file_offset,
        };
        let mut read = |p: u64, b: &mut [u8]| storage.read_at(b, log.0 + p);
        for &pos in &plan.positions {
            entry_ops(pos, log_len, &header.log_guid, &mut read, &mut |op| {
                let (s, e) = op
                    .range()
                    .ok_or_else(|| corrupt_io("log update overflows"))?;
                if e > limit {
                    return Err(corrupt_io(format!(
                        "log update at {s} lies beyond the file ({limit} bytes)"
                    )));
                }
                // MS-VHDX 2.3.3: the log never updates the header section or itself.
                if s < 192 * 1024 || (s < log.1 && log.0 < e) {
                    return Err(corrupt_io(format!(
                        "log update at {s} targets the headers or the log"
                    )));
                }
                o.ops_end = o.ops_end.max(e);
                let source = match op {
                    LogOp::Zero { .. } => Source::Zero,
                    LogOp::Data {
                        data_position,
                        leading,
                        trailing,
                        ..
                    } => Source::Data {
                        // data_position < LogLength: inside the log, no overflow.
                        at: log.0 + data_position,
                        leading,
                        trailing,
                    },
                };
                o.insert(s, e, source)
            })?;
        }
        o.file_len = file_len.max(o.ops_end).max(head.last_file_offset);
        Ok(o)
    }

    /// Sets the length reads see (after [`replayed_len`] capped it).
    pub fn set_len(&mut self, len: u64) {
        self.file_len = len;
    }

    /// Number of distinct ranges held.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Records that `[start, end)` now holds `source`, replacing what earlier updates put
    /// there. Zero ranges merge with zero neighbours.
    fn insert(&mut self, start: u64, end: u64, source: Source) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        // Zeros inside a zero range change nothing (one lookup, the common case of a log that
        // zeroes the same ranges again and again).
        if source == Source::Zero {
            if let Some((_, r)) = self.ranges.range(..=start).next_back() {
                if r.source == Source::Zero && r.end >= end {
                    return Ok(());
                }
            }
        }
        // The range starting before `start` keeps its part before `start` and after `end`.
        if let Some((&s, r)) = self.ranges.range(..start).next_back() {
            let r = *r;
            if r.end > start {
                self.cut(s, r, start, end)?;
            }
        }
        // Ranges starting inside [start, end) go, keeping any part after `end`.
        while let Some((&s, r)) = self.ranges.range(start..end).next() {
            let r = *r;
            self.cut(s, r, start, end)?;
        }
        let (mut start, mut end) = (start, end);
        if source == Source::Zero {
            if let Some((&s, r)) = self.ranges.range(..start).next_back() {
                if r.end == start && r.source == Source::Zero {
                    self.ranges.remove(&s);
                    start = s;
                }
            }
            if let Some(r) = self.ranges.get(&end).copied() {
                if r.source == Source::Zero {
                    self.ranges.remove(&end);
                    end = r.end;
                }
            }
        }
        self.ranges.insert(start, Range { end, source });
        if self.ranges.len() > MAX_OVERLAY_RANGES {
            return Err(block_io::Error::new(
                block_io::ErrorKind::Unsupported,
                format!(
                    "replaying this log updates more than {MAX_OVERLAY_RANGES} separate file ranges"
                ),
            ));
        }
        Ok(())
    }

    /// Removes range `(s, r)` that overlaps `[start, end)` and puts back its parts outside.
    fn cut(&mut self, s: u64, r: Range, start: u64, end: u64) -> Result<()> {
        self.ranges.remove(&s);
        let keeps_part = s < start || r.end > end;
        if keeps_part && r.source != Source::Zero {
            // Updates are whole 4 KiB sectors at 4 KiB offsets, so a data sector is either
            // replaced whole or not at all.
            return Err(corrupt_io("log updates overlap a data sector in part"));
        }
        if s < start {
            self.ranges.insert(
                s,
                Range {
                    end: start,
                    source: r.source,
                },
            );
        }
        if r.end > end {
            self.ranges.insert(
                end,
                Range {
                    end: r.end,
                    source: r.source,
                },
            );
        }
        Ok(())
    }

    /// The ranges overlapping `[offset, end)`, in order.
    fn overlapping(&self, offset: u64, end: u64) -> impl Iterator<Item = (u64, &Range)> {
        let from = match self.ranges.range(..=offset).next_back() {
            Some((&s, r)) if r.end > offset => s,
            _ => offset,
        };
        self.ranges.range(from..end).map(|(&s, r)| (s, r))
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
        let mut ds = Vec::new();
        for (s, r) in self.overlapping(offset, end) {
            let from = s.max(offset);
            let to = r.end.min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match r.source {
                Source::Zero => dst.fill(0),
                Source::Data {
                    at,
                    leading,
                    trailing,
                } => {
                    ds.resize(SECTOR as usize, 0);
                    storage.read_at(&mut ds, at)?;
                    let sector = assemble_sector(&ds, &leading, &trailing);
                    dst.copy_from_slice(&sector[(from - s) as usize..(to - s) as usize]);
                }
            }
        }
        Ok(())
    }
}

/// The length a replay leaves the file at. MS-VHDX 2.3.3 extends the file to the head's
/// LastFileOffset; a LastFileOffset is only trusted as far as something needs it: the result
/// is at least `file_len` and `ops_end` (the updates were written), and at most LastFileOffset
/// or the first 1 MiB boundary past everything in use after replay (`layout_end`: header
/// section, log, regions, every allocated block), whichever is smaller. So a lost extension of
/// the file is restored while a LastFileOffset of 8 TiB in a 9 MiB image grows nothing. (qemu
/// extends to LastFileOffset rounded up to 1 MiB, and only when it is not 1 MiB aligned.)
pub fn replayed_len(file_len: u64, overlay: &Overlay, layout_end: u64) -> Result<u64> {
    let written = file_len.max(overlay.ops_end);
    let need = written
        .max(layout_end)
        .checked_next_multiple_of(MIB)
        .ok_or_else(|| corrupt_io("the replayed file length overflows"))?;
    Ok(written.max(overlay.last_file_offset.min(need)))
}

/// Writes the replayed view into the file, extends it to `len` and syncs it.
pub fn apply<S: Storage + ?Sized>(storage: &S, overlay: &Overlay, len: u64) -> Result<()> {
    let mut ds = vec![0u8; SECTOR as usize];
    for (&s, r) in &overlay.ranges {
        match r.source {
            Source::Data {
                at,
                leading,
                trailing,
            } => {
                storage.read_at(&mut ds, at)?;
                storage.write_at(&assemble_sector(&ds, &leading, &trailing), s)?;
            }
            Source::Zero => {
                // Inside the file write zeros; past its end, growing the file is enough.
                let inside = r.end.min(storage.len()?).saturating_sub(s);
                in_zero_chunks(s, inside, |zeros, at| storage.write_at(zeros, at))?;
                if r.end > storage.len()? {
                    storage.set_len(r.end)?;
                }
            }
        }
    }
    if storage.len()? < len {
        storage.set_len(len)?;
    }
    storage.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{build_entry, EntryParams};
    use block_io::MemStorage;
    use uuid::Uuid;

    const LOG: u64 = 1 << 20;

    fn header() -> Header {
        Header {
            sequence_number: 1,
            file_write_guid: Uuid::from_u128(8),
            data_write_guid: Uuid::from_u128(9),
            log_guid: Uuid::from_u128(1),
            log_length: LOG as u32,
            log_offset: LOG,
        }
    }

    /// An entry writing `fill` sectors at `targets`.
    fn entry(seq: u64, tail: u64, targets: &[u64], fill: u8) -> Vec<u8> {
        let s = vec![fill; 4096];
        let refs: Vec<(u64, &[u8])> = targets.iter().map(|&t| (t, &s[..])).collect();
        build_entry(
            &EntryParams {
                sequence_number: seq,
                log_guid: Uuid::from_u128(1),
                tail,
                flushed_file_offset: 0,
                last_file_offset: 0,
            },
            &refs,
        )
    }

    /// An 8 MiB file whose log (at 1 MiB) holds `entries` at their positions, wrapping.
    fn storage(entries: &[(u64, Vec<u8>)]) -> MemStorage {
        let m = MemStorage::from_bytes(&vec![7u8; 8 << 20]);
        for (pos, e) in entries {
            let first = (LOG - pos).min(e.len() as u64) as usize;
            m.write_at(&e[..first], LOG + pos).unwrap();
            m.write_at(&e[first..], LOG).unwrap();
        }
        m
    }

    fn seqs(m: &MemStorage) -> Option<Vec<u64>> {
        let h = header();
        let plan = find_active(m, &h).unwrap()?;
        let log_len = LOG;
        let mut out = Vec::new();
        for &p in &plan.positions {
            let e = parse_entry(p, log_len, &h.log_guid, &mut |q, b| m.read_at(b, LOG + q))
                .unwrap()
                .unwrap();
            out.push(e.sequence_number);
        }
        assert_eq!(out.last(), Some(&plan.head.sequence_number));
        Some(out)
    }

    #[test]
    fn picks_highest_usable_sequence() {
        let t = 3 << 20;
        // Sequence 10 (tail itself), 11 (tail 0), 12 (tail 8192).
        let mut es = vec![
            (0, entry(10, 0, &[t], 1)),
            (8192, entry(11, 0, &[t], 2)),
            (16384, entry(12, 8192, &[t], 3)),
        ];
        assert_eq!(seqs(&storage(&es)), Some(vec![11, 12]));
        // A stale, higher-numbered entry whose tail is outside its run is not usable.
        es.push((40960, entry(50, 0, &[t], 9)));
        assert_eq!(seqs(&storage(&es)), Some(vec![11, 12]));
        // Tear the head: the run ends at 11.
        es[2].1[100] ^= 0xFF;
        assert_eq!(seqs(&storage(&es)), Some(vec![10, 11]));
        // A gap in numbers breaks the run: 12 does not follow 10.
        let es = vec![(0, entry(10, 0, &[t], 1)), (8192, entry(12, 0, &[t], 2))];
        assert_eq!(seqs(&storage(&es)), Some(vec![10]));
    }

    #[test]
    fn sequence_across_the_end_of_the_log() {
        let t = 3 << 20;
        // 3-sector entries at the last 4 sectors, wrapping, then at the start.
        let a = LOG - 4 * 4096;
        let b = LOG - 4096; // wraps: 1 sector at the end, 2 at the start
        let es = vec![
            (a, entry(5, a, &[t, t + 4096], 1)),
            (b, entry(6, a, &[t, t + 4096], 2)),
            (8192, entry(7, a, &[t, t + 4096], 3)),
        ];
        assert_eq!(seqs(&storage(&es)), Some(vec![5, 6, 7]));
        let m = storage(&es);
        let h = header();
        let plan = find_active(&m, &h).unwrap().unwrap();
        let o = Overlay::build(&m, &h, &plan, 8 << 20).unwrap();
        let mut buf = vec![0u8; 8192];
        o.read(&m, &mut buf, t).unwrap();
        assert!(buf.iter().all(|&x| x == 3));
    }

    #[test]
    fn empty_log_has_no_plan() {
        assert!(seqs(&storage(&[])).is_none());
    }

    #[test]
    fn overlay_patches_reads_and_folds_updates() {
        let m = storage(&[(0, entry(1, 0, &[2 << 20], 0xEE))]);
        let h = header();
        let plan = find_active(&m, &h).unwrap().unwrap();
        let mut o = Overlay::build(&m, &h, &plan, 8 << 20).unwrap();
        let mut buf = vec![0u8; 8192];
        o.read(&m, &mut buf, (2 << 20) - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 0xEE));
        // Later updates replace earlier ones; zero ranges merge and split.
        let d = |at: u64| Source::Data {
            at,
            leading: [1; 8],
            trailing: [2; 4],
        };
        o.insert(3 << 20, (3 << 20) + 3 * 4096, Source::Zero)
            .unwrap();
        o.insert((3 << 20) + 3 * 4096, (3 << 20) + 4 * 4096, Source::Zero)
            .unwrap();
        assert_eq!(o.ranges(), 2);
        o.insert((3 << 20) + 4096, (3 << 20) + 8192, d(LOG))
            .unwrap();
        assert_eq!(o.ranges(), 4);
        o.insert(3 << 20, 4 << 20, Source::Zero).unwrap();
        assert_eq!(o.ranges(), 2);
        let mut buf = vec![9u8; 16384];
        o.read(&m, &mut buf, 3 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Applying writes the folded view and extends the file.
        let before = m.len().unwrap();
        apply(&m, &o, before + (1 << 20)).unwrap();
        assert_eq!(m.len().unwrap(), before + (1 << 20));
        let mut buf = vec![0u8; 4096];
        m.read_at(&mut buf, 2 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn replayed_len_is_capped_by_the_layout() {
        let m = storage(&[(0, entry(1, 0, &[2 << 20], 0xEE))]);
        let h = header();
        let plan = find_active(&m, &h).unwrap().unwrap();
        let mut o = Overlay::build(&m, &h, &plan, 8 << 20).unwrap();
        o.last_file_offset = 8 << 40;
        assert_eq!(replayed_len(8 << 20, &o, 5 << 20).unwrap(), 8 << 20);
        // Something in use past the end of the file: extended to cover it (1 MiB rounded).
        assert_eq!(
            replayed_len(8 << 20, &o, (9 << 20) + 4096).unwrap(),
            10 << 20
        );
        // Never beyond LastFileOffset.
        o.last_file_offset = (8 << 20) + 4096;
        assert_eq!(
            replayed_len(8 << 20, &o, 12 << 20).unwrap(),
            (8 << 20) + 4096
        );
        o.last_file_offset = u64::MAX;
        assert_eq!(
            replayed_len(8 << 20, &o, u64::MAX - 5).unwrap_err().kind(),
            block_io::ErrorKind::Corrupt
        );
    }
}
