//! Changing the virtual size of a VHDX (what Hyper-V's `Resize-VHD` does):
//! [`VhdxFile::resize`].
//!
//! The Virtual Disk Size is a metadata item (MS-VHDX 2.6.2.2), so the change goes through the
//! log like every metadata write (2.3): log entry, flush, write in place, flush. What changes
//! with it goes into the same log entry when the log holds it all (one atomic change), else
//! into entries ordered so that every prefix of them is an image of the old size or the new:
//!
//! - **Grow.** The BAT entries the new size adds (2.5: `total_entries` grows with the block
//!   count) are written first: NOT_PRESENT for a dynamic or differencing image, FULLY_PRESENT
//!   at new space past the end of the file for a fixed one (the space is allocated and synced
//!   before the log entry). Entries past the old `total_entries` are invisible to the old
//!   size. Then the size item, last. The part of an allocated last block past the old end is
//!   zeroed (and the file extended over it) before anything is logged, so the new space reads
//!   as zeros; it lay outside the old disk.
//! - **Shrink.** Refused with [`ResizeError::DataBeyondEnd`] when a payload block wholly past
//!   the new end holds data (FULLY_ or PARTIALLY_PRESENT), or when the part past the new end
//!   of the block that straddles it reads as anything but zeros, unless `force`: then those
//!   blocks are dropped. The size item goes first (the commit point), then the entries of
//!   the dropped blocks (and of sector bitmaps of chunks wholly past the new end) become
//!   NOT_PRESENT; their file ranges are punched once that is durable. A crash between leaves
//!   the new size with stale entries past it, which no reader of the new size looks at and
//!   which a later grow overwrites.
//! - **The BAT region** (2.2.3) grows when the new entries do not fit it: a region of the
//!   size needed is written past everything in the file (the current entries, then the new
//!   ones) and synced while nothing refers to it; then one log entry switches both region
//!   table copies (MS-VHDX 2.2.3: the BAT region's offset and length) together with the size
//!   item, so a crash leaves the old table and size or the new ones. No payload block moves;
//!   the old region's space is left unused (punched). The log must hold the two 64 KiB
//!   tables and the size sector in one entry ([`ResizeError::BatRegionFull`] otherwise).
//!
//! A resize is a user-visible change: it runs in a write session, which starts (if none has)
//! with a new DataWriteGuid (2.2.2.1), so children recorded against the old id no longer
//! match. The session stays open, as after any write; [`VhdxFile::close`] ends it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use block_io::{BlockDevice, Error, ErrorKind, Result, Storage};

use crate::bat::{state, BatEntry, Geometry};
use crate::error::corrupt_io;
use crate::file::{VhdxFile, BITMAP_BLOCK};
use crate::guid;
use crate::header::MIB;
use crate::log::{max_data_sectors, SECTOR};
use crate::metadata::{IS_USER, MAX_VIRTUAL_SIZE};
use crate::region::{REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};

/// Why a resize was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// The size asked is not a positive multiple of the logical sector within 64 TiB.
    #[error("a VHDX with {sector}-byte sectors cannot be {size} bytes")]
    BadSize {
        /// The size asked.
        size: u64,
        /// The logical sector size.
        sector: u32,
    },
    /// Shrinking would cut data (see the module docs); `force` drops it.
    #[error("allocated data at offset {offset} lies beyond the new end ({new_size} bytes)")]
    DataBeyondEnd {
        /// Virtual offset of the first data found past the new end.
        offset: u64,
        /// The size asked.
        new_size: u64,
    },
    /// The BAT region cannot hold the entries of the new size.
    #[error("the BAT region ({region} bytes) cannot hold the {entries} entries of the new size")]
    BatRegionFull {
        /// Bytes of the BAT region.
        region: u32,
        /// Entries needed.
        entries: u64,
    },
    /// The image is opened read-only.
    #[error("the image is read-only")]
    ReadOnly,
    /// Reading or writing the image failed (or it is malformed).
    #[error("cannot resize the image")]
    Io(#[from] Error),
}

impl ResizeError {
    /// The [`ErrorKind`] this maps to at the [`block_io`] boundary.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ResizeError::BadSize { .. } | ResizeError::DataBeyondEnd { .. } => {
                ErrorKind::InvalidInput
            }
            ResizeError::BatRegionFull { .. } => ErrorKind::Unsupported,
            ResizeError::ReadOnly => ErrorKind::ReadOnly,
            ResizeError::Io(e) => e.kind(),
        }
    }
}

impl From<ResizeError> for Error {
    fn from(e: ResizeError) -> Self {
        Error::with_source(e.kind(), "VHDX resize", e)
    }
}

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeReport {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now.
    pub new_size: u64,
    /// Payload blocks dropped by a forced shrink.
    pub blocks_dropped: u64,
    /// Payload blocks allocated for a fixed image's new space.
    pub blocks_added: u64,
    /// Log entries written.
    pub log_entries: u64,
}

/// Offset of the first non-zero byte of `buf`, if any.
fn nonzero(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b != 0)
}

impl<S: Storage> VhdxFile<S> {
    /// Resizes this image to `new_size` bytes (see the [module docs](crate::resize)). A
    /// shrink that would cut data is refused unless `force`. Everything written before is
    /// committed first. Asking for the current size changes nothing.
    pub fn resize(&mut self, new_size: u64, force: bool) -> Result<ResizeReport, ResizeError> {
        if self.read_only {
            return Err(ResizeError::ReadOnly);
        }
        self.failstop.check()?;
        let sector = self.meta.logical_sector_size;
        if new_size == 0 || new_size % u64::from(sector) != 0 || new_size > MAX_VIRTUAL_SIZE {
            return Err(ResizeError::BadSize {
                size: new_size,
                sector,
            });
        }
        let old = self.geo;
        let mut report = ResizeReport {
            old_size: old.virtual_size,
            new_size,
            blocks_dropped: 0,
            blocks_added: 0,
            log_entries: 0,
        };
        if new_size == old.virtual_size {
            return Ok(report);
        }
        // Pending BAT and bitmap changes of this session go first, in their own entries.
        self.commit_coalesced(crate::commit::After::Nothing)?;
        let new = Geometry::new(
            old.block_size,
            old.logical_sector_size,
            new_size,
            old.has_parent,
        )
        .map_err(Error::from)?;
        let region = self.regions.bat.length;
        let full = || ResizeError::BatRegionFull {
            region,
            entries: new.total_entries,
        };
        // The BAT region moves to the end of the file when the new entries do not fit it.
        let relocate = new.total_entries * 8 > u64::from(region);
        let header_log = self.hdr.get_mut().header.log_length;
        let table_sectors = 2 * (REGION_TABLE_SIZE as u64 / SECTOR) + 1;
        if relocate && max_data_sectors(u64::from(header_log)) < table_sectors {
            return Err(full());
        }
        let new_region_len = u32::try_from(new.bat_bytes()).map_err(|_| full())?;
        let new_region_at = if relocate {
            let st = self.state.get_mut();
            let at = st.file_end;
            st.file_end = at + u64::from(new_region_len);
            Some(at)
        } else {
            None
        };
        let bs = u64::from(old.block_size);
        let grow = new_size > old.virtual_size;
        // (index, new value) of every BAT entry that changes.
        let mut changes: BTreeMap<u64, u64> = BTreeMap::new();
        let mut punch: Vec<(u64, u64)> = Vec::new();
        if grow {
            self.prepare_tail(old.virtual_size)?;
            let fixed = self.meta.leave_blocks_allocated && !self.meta.has_parent;
            let mut next = self.state.get_mut().file_end;
            let first_new = next;
            for b in old.data_blocks..new.data_blocks {
                let value = if fixed {
                    let at = next;
                    next += bs;
                    report.blocks_added += 1;
                    BatEntry::encode(state::FULLY_PRESENT, at)
                } else {
                    BatEntry::encode(state::NOT_PRESENT, 0)
                };
                changes.insert(new.payload_index(b), value);
            }
            // Entries the new size adds that are not new payload blocks: sector bitmap
            // entries (and, in a differencing image, payload slots of the last chunk).
            for i in old.total_entries..new.total_entries {
                changes.entry(i).or_insert(0);
            }
            if next > first_new {
                // MS-VHDX 2.5: the space is allocated, and durable, before the entries
                // pointing at it are logged.
                let grown = self.grown.get_mut();
                if next > *grown {
                    self.failstop.guard(self.storage.set_len(next))?;
                    *grown = next;
                }
                self.failstop.guard(self.storage.sync_data())?;
                self.state.get_mut().file_end = next;
            }
        } else {
            let cut = |offset| ResizeError::DataBeyondEnd { offset, new_size };
            // Blocks wholly past the new end.
            for b in new.data_blocks..old.data_blocks {
                let raw = self.entry(b);
                let e = BatEntry::try_from(raw).map_err(Error::from)?;
                if raw != 0 {
                    if e.state.has_data() {
                        if !force {
                            return Err(cut(b * bs));
                        }
                        report.blocks_dropped += 1;
                        punch.push((e.file_offset, bs));
                    }
                    changes.insert(old.payload_index(b), 0);
                }
            }
            // The block straddling the new end: its part past it must read as zeros.
            if new_size % bs != 0 && !force {
                let b = new_size / bs;
                let e = BatEntry::try_from(self.entry(b)).map_err(Error::from)?;
                if e.state.has_data() {
                    let end = ((b + 1) * bs).min(old.virtual_size);
                    let mut at = new_size;
                    let mut buf = vec![0u8; MIB.min(end - at) as usize];
                    while at < end {
                        let n = MIB.min(end - at) as usize;
                        self.read_at(&mut buf[..n], at)?;
                        if let Some(i) = nonzero(&buf[..n]) {
                            return Err(cut(at + i as u64));
                        }
                        at += n as u64;
                    }
                }
            }
            if old.has_parent {
                // Sector bitmaps of chunks wholly past the new end.
                let first_chunk = new.data_blocks.div_ceil(old.chunk_ratio);
                let chunks = old.data_blocks.div_ceil(old.chunk_ratio);
                for c in first_chunk..chunks {
                    let raw = self.bitmap_entry(c);
                    if raw != 0 {
                        let e = BatEntry::try_from(raw).map_err(Error::from)?;
                        if e.state.has_data() {
                            punch.push((e.file_offset, BITMAP_BLOCK));
                        }
                        changes.insert(old.bitmap_index(c), 0);
                    }
                }
            }
        }
        let mut regions = self.regions.clone();
        if let Some(at) = new_region_at {
            // The whole new region, written while nothing refers to it, durable before the
            // log entry that switches to it.
            // A MiB at a time (a region may hold hundreds of MiB of entries).
            let total = new.total_entries;
            let mut chunk = vec![0u8; MIB as usize];
            for k in 0..u64::from(new_region_len) / MIB {
                chunk.fill(0);
                for (j, slot) in chunk.chunks_exact_mut(8).enumerate() {
                    let i = k * (MIB / 8) + j as u64;
                    if i >= total {
                        break;
                    }
                    let v = changes.get(&i).copied().unwrap_or_else(|| {
                        self.bat
                            .get(i as usize)
                            .map_or(0, |a| a.load(Ordering::Acquire))
                    });
                    slot.copy_from_slice(&v.to_le_bytes());
                }
                self.failstop
                    .guard(self.storage.write_at(&chunk, at + k * MIB))?;
            }
            let end = at + u64::from(new_region_len);
            let grown = self.grown.get_mut();
            if end > *grown {
                *grown = end;
            }
            self.failstop.guard(self.storage.sync_data())?;
            regions.bat.file_offset = at;
            regions.bat.length = new_region_len;
        }
        // The 4 KiB BAT sectors holding the changes, as they will be (in the region in use:
        // a relocated region holds them already).
        let bat_sector = |i: u64| i * 8 / SECTOR;
        let mut bat_sectors: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for &i in changes.keys().filter(|_| !relocate) {
            let s = bat_sector(i);
            if let std::collections::btree_map::Entry::Vacant(v) = bat_sectors.entry(s) {
                let mut buf = vec![0u8; SECTOR as usize];
                self.read_file(&mut buf, self.regions.bat.file_offset + s * SECTOR)?;
                v.insert(buf);
            }
        }
        for (&i, &value) in &changes {
            if let Some(buf) = bat_sectors.get_mut(&bat_sector(i)) {
                let at = (i * 8 % SECTOR) as usize;
                buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        // The Virtual Disk Size item (MS-VHDX 2.6.2.2), in its 4 KiB sector of the region.
        let md = self.regions.metadata;
        let item = self
            .meta
            .entries
            .iter()
            .find(|e| e.item_id == guid::VIRTUAL_DISK_SIZE && e.flags & IS_USER == 0)
            .ok_or_else(|| corrupt_io("no Virtual Disk Size metadata item"))?;
        let item_at = u64::from(item.offset);
        if item.length < 8 || item_at + 8 > u64::from(md.length) || item_at % SECTOR > SECTOR - 8 {
            return Err(corrupt_io("the Virtual Disk Size item is malformed").into());
        }
        let size_sector_at = md.file_offset + item_at / SECTOR * SECTOR;
        let mut size_sector = vec![0u8; SECTOR as usize];
        self.read_file(&mut size_sector, size_sector_at)?;
        let within = (item_at % SECTOR) as usize;
        size_sector[within..within + 8].copy_from_slice(&new_size.to_le_bytes());

        let bat_off = self.regions.bat.file_offset;
        let mut sectors: Vec<(u64, &[u8])> = bat_sectors
            .iter()
            .map(|(s, d)| (bat_off + s * SECTOR, &d[..]))
            .collect();
        // MS-VHDX 2.2.3: both copies of the region table, in the same entry as the size.
        let table = regions.to_bytes();
        if relocate {
            for off in REGION_TABLE_OFFSETS {
                for (k, sector) in table.chunks(SECTOR as usize).enumerate() {
                    sectors.push((off + k as u64 * SECTOR, sector));
                }
            }
        }
        // Grow: entries first, the size last. Shrink: the size first.
        if grow {
            sectors.push((size_sector_at, &size_sector));
        } else {
            sectors.insert(0, (size_sector_at, &size_sector));
        }
        {
            let mut h = self.hdr.lock();
            self.start_session(&mut h)?;
        }
        let header = self.hdr.get_mut().header;
        let log = crate::commit::LogTarget {
            guid: header.log_guid,
            offset: header.log_offset,
            length: header.log_length,
        };
        let per_entry = if relocate {
            // Tables and size in one entry (checked above that the log holds them).
            sectors.len()
        } else {
            max_data_sectors(u64::from(log.length)).max(1) as usize
        };
        let file_len = self.failstop.guard(self.storage.len())?;
        let mut seq = self.commits.get_mut().log_seq;
        let mut r = Ok(());
        // With the size sector in the first (shrink) or last (grow) entry.
        let groups: Vec<&[(u64, &[u8])]> = if grow {
            let mut g: Vec<_> = sectors.rchunks(per_entry).collect();
            g.reverse();
            g
        } else {
            sectors.chunks(per_entry).collect()
        };
        for group in groups {
            r = self.log_and_apply(&log, &mut seq, file_len, group);
            if r.is_err() {
                break;
            }
            report.log_entries += 1;
        }
        self.commits.get_mut().log_seq = seq;
        r?;
        if relocate {
            // The old region is unused now.
            punch.push((
                self.regions.bat.file_offset,
                u64::from(self.regions.bat.length),
            ));
            self.regions = regions;
        }
        for (o, l) in punch {
            match self.storage.punch_hole(o, l) {
                Err(e) if e.kind() == ErrorKind::Unsupported => {}
                r => self.failstop.guard(r)?,
            }
        }
        // The in-memory view of the new size.
        let total = new.total_entries as usize;
        self.bat.truncate(total);
        while self.bat.len() < total {
            self.bat.push(AtomicU64::new(0));
        }
        for (&i, &value) in &changes {
            if let Some(a) = self.bat.get(i as usize) {
                a.store(value, Ordering::Release);
            }
        }
        self.meta.virtual_size = new_size;
        self.geo = new;
        if !grow && old.has_parent {
            // Bitmaps of dropped chunks are gone; the cached pages of every chunk are clean
            // (everything was committed) and reload on demand.
            let first_chunk = new.data_blocks.div_ceil(old.chunk_ratio);
            self.bitmaps.get_mut().retain(|&c, _| c < first_chunk);
            self.bitmap_pages.get_mut().clear();
        }
        Ok(report)
    }

    /// Before a grow from `old_size`: the part of the last block past `old_size`, if the
    /// block holds data, reads as zeros and lies inside the file.
    fn prepare_tail(&mut self, old_size: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        if old_size % bs == 0 {
            return Ok(());
        }
        let b = old_size / bs;
        let e = BatEntry::try_from(self.entry(b))?;
        if !e.state.has_data() {
            return Ok(());
        }
        let from = e.file_offset + old_size % bs;
        let end = e.file_offset + bs;
        let len = self.failstop.guard(self.storage.len())?;
        let mut at = from;
        let mut dirty = false;
        let zeros = vec![0u8; MIB as usize];
        let mut buf = vec![0u8; MIB as usize];
        while at < end.min(len) {
            let n = MIB.min(end.min(len) - at) as usize;
            self.read_file(&mut buf[..n], at)?;
            if nonzero(&buf[..n]).is_some() {
                self.failstop
                    .guard(self.storage.write_at(&zeros[..n], at))?;
                dirty = true;
            }
            at += n as u64;
        }
        let grown = self.grown.get_mut();
        if end > len && end > *grown {
            self.failstop.guard(self.storage.set_len(end))?;
            *grown = end;
            dirty = true;
        }
        if dirty {
            self.failstop.guard(self.storage.sync_data())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage};

    use super::*;
    use crate::{create, CreateOptions};

    const M: u64 = 1 << 20;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect()
    }

    fn read(f: &impl BlockDevice, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        f.read_at(&mut b, off).unwrap();
        b
    }

    fn dynamic(size: u64, block: u32) -> Arc<MemStorage> {
        let st = Arc::new(MemStorage::new());
        let mut o = CreateOptions::dynamic(size);
        o.block_size = Some(block);
        create(st.clone(), &o).unwrap().close().unwrap();
        st
    }

    #[test]
    fn dynamic_grows_and_keeps_data() {
        let st = dynamic(10 * M, M as u32);
        let mut f =
            VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let old_guid = f.header().data_write_guid;
        // A resize alone is a user-visible change: a new DataWriteGuid.
        f.resize(12 * M, false).unwrap();
        assert_ne!(f.header().data_write_guid, old_guid);
        f.write_at(&pattern(1, 4096), 9 * M).unwrap();
        let r = f.resize(64 * M, false).unwrap();
        assert_eq!((r.old_size, r.new_size, r.log_entries), (12 * M, 64 * M, 1));
        assert_eq!(f.info().virtual_size, 64 * M);
        f.write_at(&pattern(2, 4096), 63 * M).unwrap();
        assert_eq!(read(&f, 9 * M, 4096), pattern(1, 4096));
        f.close().unwrap();
        drop(f);
        let f = VhdxFile::open(st, &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(f.info().virtual_size, 64 * M);
        assert_eq!(read(&f, 63 * M, 4096), pattern(2, 4096));
        assert!(read(&f, 10 * M, 53 * M as usize).iter().all(|&b| b == 0));
        assert!(f.check().unwrap().errors.is_empty());
    }

    #[test]
    fn fixed_grows_with_allocated_blocks() {
        let st = Arc::new(MemStorage::new());
        let mut o = CreateOptions::fixed(8 * M);
        o.block_size = Some(M as u32);
        let mut f = create(st.clone(), &o).unwrap();
        f.write_at(&pattern(3, 512), 8 * M - 512).unwrap();
        let r = f.resize(12 * M, false).unwrap();
        assert_eq!(r.blocks_added, 4);
        for b in 8..12 {
            assert!(BatEntry::try_from(f.entry(b)).unwrap().state.has_data());
        }
        f.write_at(&pattern(4, 512), 12 * M - 512).unwrap();
        f.close().unwrap();
        drop(f);
        let f = VhdxFile::open(st, &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(f.subformat(), crate::Subformat::Fixed);
        assert_eq!(read(&f, 8 * M - 512, 512), pattern(3, 512));
        assert_eq!(read(&f, 12 * M - 512, 512), pattern(4, 512));
        assert!(f.check().unwrap().errors.is_empty());
    }

    #[test]
    fn shrink_refuses_to_cut_data_unless_forced() {
        let st = dynamic(16 * M, M as u32);
        let mut f =
            VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        f.write_at(&pattern(5, 4096), 2 * M).unwrap();
        f.write_at(&pattern(6, 4096), 12 * M).unwrap();
        f.write_at(&[0; 4096], 5 * M).unwrap();
        let err = f.resize(8 * M, false).unwrap_err();
        assert!(
            matches!(err, ResizeError::DataBeyondEnd { offset, .. } if offset == 12 * M),
            "{err:?}"
        );
        assert_eq!(f.info().virtual_size, 16 * M);
        let r = f.resize(8 * M, true).unwrap();
        assert_eq!(r.blocks_dropped, 1);
        assert_eq!(read(&f, 2 * M, 4096), pattern(5, 4096));
        // A straddling block with data past the new end is refused.
        f.write_at(&pattern(7, 512), 6 * M + 512).unwrap();
        assert!(matches!(
            f.resize(6 * M + 512, false).unwrap_err(),
            ResizeError::DataBeyondEnd { offset, .. } if offset == 6 * M + 512
        ));
        // Block 6 kept, its zero tail cut.
        f.resize(6 * M + 1024, false).unwrap();
        // Growing again shows zeros where the dropped data was.
        f.resize(16 * M, false).unwrap();
        assert_eq!(read(&f, 6 * M + 512, 512), pattern(7, 512));
        assert!(read(&f, 6 * M + 1024, 10 * M as usize - 1024)
            .iter()
            .all(|&b| b == 0));
        f.close().unwrap();
        drop(f);
        let f = VhdxFile::open(st, &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(read(&f, 2 * M, 4096), pattern(5, 4096));
        assert!(read(&f, 12 * M, 4096).iter().all(|&b| b == 0));
        assert!(f.check().unwrap().errors.is_empty());
    }

    #[test]
    fn a_full_bat_region_moves_to_the_end() {
        let st = dynamic(8 * M, M as u32);
        let mut f =
            VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        f.write_at(&pattern(1, 4096), 7 * M).unwrap();
        let before = f.regions().bat;
        // 1 MiB blocks, 512-byte sectors: a 1 MiB region maps about 128 GiB.
        let r = f.resize(200 << 30, false).unwrap();
        assert_eq!(r.log_entries, 1);
        let after = f.regions().bat;
        assert!(after.file_offset > before.file_offset);
        assert_eq!(u64::from(after.length), 2 * M);
        f.write_at(&pattern(2, 4096), 150 << 30).unwrap();
        f.close().unwrap();
        drop(f);
        let f = VhdxFile::open(st, &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(f.info().virtual_size, 200 << 30);
        assert_eq!(f.regions().bat, after);
        assert_eq!(read(&f, 7 * M, 4096), pattern(1, 4096));
        assert_eq!(read(&f, 150 << 30, 4096), pattern(2, 4096));
        assert!(f.check().unwrap().errors.is_empty());
        let mut g = VhdxFile::open(
            dynamic(8 * M, M as u32),
            &crate::OpenOptions::new().read_only(false),
        )
        .unwrap();
        assert!(matches!(
            g.resize(1000, false).unwrap_err(),
            ResizeError::BadSize { .. }
        ));
    }

    /// A power cut at every write and sync leaves the old size or the new one, with every
    /// flushed byte.
    fn crash_sweep(
        image: Arc<MemStorage>,
        new_size: u64,
        force: bool,
        data: &[(u64, Vec<u8>)],
        seeds: u64,
    ) {
        let old_size = VhdxFile::open(image.clone(), &crate::OpenOptions::new().read_only(true))
            .unwrap()
            .info()
            .virtual_size;
        let (mut saw_old, mut saw_new) = (false, false);
        let mut n = 0;
        loop {
            let fault = Arc::new(FaultStorage::new((*image).clone()));
            let mut f =
                VhdxFile::open(fault.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
            fault.set_cut(CutPoint::AfterOps(n));
            let done = f.resize(new_size, force).is_ok() && f.close().is_ok();
            drop(f);
            for seed in 0..seeds {
                let img = fault.crash_image(seed);
                for ro in [true, false] {
                    let f = VhdxFile::open(img.clone(), &crate::OpenOptions::new().read_only(ro))
                        .unwrap_or_else(|e| panic!("cut {n} seed {seed}: {e:?}"));
                    let size = f.info().virtual_size;
                    if size == new_size {
                        saw_new = true;
                    } else {
                        assert_eq!(size, old_size, "cut {n} seed {seed}");
                        saw_old = true;
                    }
                    for (off, bytes) in data {
                        if off + bytes.len() as u64 <= size {
                            assert_eq!(&read(&f, *off, bytes.len()), bytes, "cut {n} seed {seed}");
                        }
                    }
                    if size > old_size {
                        let n = (size - old_size).min(2 * M) as usize;
                        assert!(read(&f, old_size, n).iter().all(|&b| b == 0));
                    }
                    if !ro {
                        let c = f.check().unwrap();
                        assert!(c.errors.is_empty(), "cut {n} seed {seed}: {:?}", c.errors);
                    }
                }
            }
            if done {
                break;
            }
            n += 1;
            assert!(n < 100, "the resize never completed");
        }
        assert!(saw_old && saw_new);
    }

    #[test]
    fn crash_sweep_grow() {
        let st = dynamic(3 * M + 512 * 3, M as u32);
        let f = VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        f.write_at(&pattern(1, 1536), 3 * M).unwrap();
        f.write_at(&pattern(2, 4096), 0).unwrap();
        f.close().unwrap();
        drop(f);
        crash_sweep(
            st,
            8 * M,
            false,
            &[(3 * M, pattern(1, 1536)), (0, pattern(2, 4096))],
            6,
        );
    }

    #[test]
    fn crash_sweep_forced_shrink() {
        let st = dynamic(8 * M, M as u32);
        let f = VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        f.write_at(&pattern(1, 4096), 6 * M).unwrap();
        f.write_at(&pattern(2, 4096), M).unwrap();
        f.close().unwrap();
        drop(f);
        crash_sweep(st, 4 * M, true, &[(M, pattern(2, 4096))], 6);
    }

    #[test]
    fn crash_sweep_bat_region_moves() {
        let st = dynamic(8 * M, M as u32);
        let f = VhdxFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        f.write_at(&pattern(3, 4096), 5 * M).unwrap();
        f.close().unwrap();
        drop(f);
        // Few seeds: every crash image is a copy of an 11 MiB file.
        crash_sweep(st, 200 << 30, false, &[(5 * M, pattern(3, 4096))], 3);
    }
}
