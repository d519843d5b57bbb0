//! Rewriting the parent locator of a differencing layer (MS-VHDX 2.6.2.6): what Hyper-V's
//! `Set-VHD -ParentPath` does, and the format half of `vdisk rebase -u`.
//!
//! The Parent Locator is a metadata item, so the change goes through the log like every other
//! metadata write (MS-VHDX 2.3): log entry, flush, write in place, flush. The new item replaces
//! the old one where it lies when it fits; otherwise it goes to the first free space inside
//! the metadata region (past the 64 KiB table, clear of every other item) and the table entry
//! is updated in the same log entry, so a crash leaves the old locator or the new one, never a
//! mix. The bytes the old item no longer uses are zeroed in that entry too.
//!
//! A locator change is not a user-visible data change: the DataWriteGuid stays (children of
//! this layer stay linked). The FileWriteGuid changes at the start of the write session as
//! usual (MS-VHDX 2.2.2.1). When no session is open yet, this one opens a session of its own
//! (new FileWriteGuid and LogGuid, DataWriteGuid kept) and closes it again (LogGuid = 0), so a
//! later data write still changes the DataWriteGuid.

use block_io::{Error, ErrorKind, Result, Storage};
use std::collections::BTreeMap;
use uuid::Uuid;

use crate::error::corrupt_io;
use crate::file::VhdxFile;
use crate::guid;
use crate::locator::ParentLocator;
use crate::log::{max_data_sectors, SECTOR};
use crate::metadata::{MetadataEntry, IS_USER, MAX_ITEM_LEN, TABLE_SIZE};

/// Items placed by this module start on this boundary (Hyper-V keeps items 8-byte aligned).
const ITEM_ALIGN: u64 = 8;

/// First offset (relative to the region) at or past the table where `len` bytes fit without
/// touching any item of `entries` other than `skip`, below `region_len`.
fn find_free(entries: &[MetadataEntry], skip: usize, len: u64, region_len: u64) -> Option<u64> {
    let mut used: Vec<(u64, u64)> = entries
        .iter()
        .enumerate()
        .filter(|(i, e)| *i != skip && e.length != 0)
        .map(|(_, e)| {
            let start = u64::from(e.offset);
            (start, start + u64::from(e.length))
        })
        .collect();
    used.sort_unstable();
    let mut cand = TABLE_SIZE as u64;
    for (s, e) in used {
        if cand + len <= s {
            break;
        }
        cand = cand.max(e.next_multiple_of(ITEM_ALIGN));
    }
    (cand + len <= region_len).then_some(cand)
}

/// Copies `bytes` into the region-relative range starting at `at`, across the 4 KiB sectors
/// of `sectors` (which must already hold every sector the range touches).
fn patch(sectors: &mut BTreeMap<u64, Vec<u8>>, at: u64, bytes: &[u8]) -> Result<()> {
    let mut done = 0usize;
    while done < bytes.len() {
        let pos = at + done as u64;
        let (s, within) = (pos / SECTOR, (pos % SECTOR) as usize);
        let n = (SECTOR as usize - within).min(bytes.len() - done);
        let sec = sectors
            .get_mut(&s)
            .ok_or_else(|| corrupt_io("metadata sector not loaded"))?;
        sec[within..within + n].copy_from_slice(&bytes[done..done + n]);
        done += n;
    }
    Ok(())
}

/// Region-relative 4 KiB sector indexes touched by `[at, at + len)`.
fn sectors_of(at: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    at / SECTOR..=(at + len.max(1) - 1) / SECTOR
}

impl<S: Storage> VhdxFile<S> {
    /// Replaces the Parent Locator item of this differencing layer with `locator`, through the
    /// log (see the module docs). Validates `locator` first (it must parse back:
    /// `parent_linkage` present and a GUID, keys unique); checking that it names the right
    /// parent is the caller's business (the `chain` crate's `rebase`). The DataWriteGuid is
    /// kept; [`VhdxFile::parent_locator`] returns the new locator afterwards.
    ///
    /// Errors: `ReadOnly` on a read-only handle, `InvalidInput` for a non-differencing layer or
    /// an invalid locator, `NoSpace` when the metadata region has no room for the item, I/O
    /// errors (which latch the fail-stop state).
    pub fn set_parent_locator(&mut self, locator: &ParentLocator) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "cannot change the parent locator of a read-only image",
            ));
        }
        if !self.meta.has_parent {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "not a differencing image: it has no parent locator",
            ));
        }
        self.failstop.check()?;
        let item = locator.to_bytes().map_err(|e| {
            Error::with_source(ErrorKind::InvalidInput, "invalid parent locator", e)
        })?;
        let parsed = ParentLocator::parse(&item).map_err(|e| {
            Error::with_source(ErrorKind::InvalidInput, "invalid parent locator", e)
        })?;
        let item_len = u32::try_from(item.len())
            .ok()
            .filter(|&l| l <= MAX_ITEM_LEN)
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "parent locator too large"))?;
        // 1 MiB aligned (the region table was validated), so 4 KiB sectors of the region are
        // 4 KiB sectors of the file.
        let md = self.regions.metadata;
        let region_len = u64::from(md.length);
        let idx = self
            .meta
            .entries
            .iter()
            .position(|e| e.item_id == guid::PARENT_LOCATOR && e.flags & IS_USER == 0)
            .ok_or_else(|| corrupt_io("differencing image without a parent locator entry"))?;
        let old = self.meta.entries[idx];
        let (old_at, old_len) = (u64::from(old.offset), u64::from(old.length));
        let new_len = u64::from(item_len);
        let new_at = if new_len <= old_len {
            old_at
        } else {
            find_free(&self.meta.entries, idx, new_len, region_len).ok_or_else(|| {
                Error::new(
                    ErrorKind::NoSpace,
                    format!("no room for a {new_len}-byte parent locator in the metadata region"),
                )
            })?
        };
        let new_offset =
            u32::try_from(new_at).map_err(|_| corrupt_io("metadata item offset overflows"))?;

        // The sectors to change: the table entry, the old item (zeroed), the new item.
        let entry_at = 32 + 32 * idx as u64;
        let mut sectors: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let ranges = [(entry_at, 32), (old_at, old_len), (new_at, new_len)];
        for (at, len) in ranges {
            if len == 0 {
                continue;
            }
            for s in sectors_of(at, len) {
                if s * SECTOR >= region_len {
                    return Err(corrupt_io("metadata item lies outside the region"));
                }
                if let std::collections::btree_map::Entry::Vacant(v) = sectors.entry(s) {
                    let mut buf = vec![0u8; SECTOR as usize];
                    self.read_file(&mut buf, md.file_offset + s * SECTOR)?;
                    v.insert(buf);
                }
            }
        }
        if old_len != 0 {
            let zeros = vec![0u8; old.length as usize];
            patch(&mut sectors, old_at, &zeros)?;
        }
        patch(&mut sectors, new_at, &item)?;
        // MS-VHDX 2.6.1.2: entry = ItemId, Offset, Length, flags; only Offset and Length change.
        patch(&mut sectors, entry_at + 16, &new_offset.to_le_bytes())?;
        patch(&mut sectors, entry_at + 20, &item_len.to_le_bytes())?;

        let log_length = self.hdr.get_mut().header.log_length;
        if max_data_sectors(u64::from(log_length)) < sectors.len() as u64 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the log is too small for the parent locator change",
            ));
        }
        // `&mut self`: no other writer, commit or flush runs during this.
        let own_session = !self.hdr.get_mut().session;
        if own_session {
            // MS-VHDX 2.2.2.1: a new FileWriteGuid before the first write of a session; the
            // DataWriteGuid stays (no user-visible change).
            let h = self.hdr.get_mut();
            let mut next = h.header;
            next.file_write_guid = Uuid::new_v4();
            next.log_guid = Uuid::new_v4();
            let (header, slot) =
                self.failstop
                    .guard(crate::write::update_header(&self.storage, next, h.slot))?;
            h.header = header;
            h.slot = slot;
            *self.current_header.get_mut() = header;
            h.session = true;
        } else {
            // Pending BAT changes of this session go first, in their own entries.
            self.commit_coalesced(crate::commit::After::Nothing)?;
        }
        let header = self.hdr.get_mut().header;
        let log = crate::commit::LogTarget {
            guid: header.log_guid,
            offset: header.log_offset,
            length: header.log_length,
        };
        let refs: Vec<(u64, &[u8])> = sectors
            .iter()
            .map(|(s, d)| (md.file_offset + s * SECTOR, &d[..]))
            .collect();
        let mut seq = self.commits.get_mut().log_seq;
        let file_len = self.failstop.guard(self.storage.len())?;
        let r = self.log_and_apply(&log, &mut seq, file_len, &refs);
        self.commits.get_mut().log_seq = seq;
        r?;
        if own_session {
            let h = self.hdr.get_mut();
            let mut next = h.header;
            next.log_guid = Uuid::nil();
            let (header, slot) =
                self.failstop
                    .guard(crate::write::update_header(&self.storage, next, h.slot))?;
            h.header = header;
            h.slot = slot;
            *self.current_header.get_mut() = header;
            h.session = false;
        }
        self.meta.entries[idx].offset = new_offset;
        self.meta.entries[idx].length = item_len;
        self.meta.parent_locator = Some(parsed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage};

    use crate::{create, CreateOptions, ParentRef};

    const PARENT: Uuid = uuid::uuid!("0a0b0c0d-0102-0304-0506-070809101112");

    /// A differencing image with data in block 1, clean (closed).
    fn child() -> Arc<MemStorage> {
        let mem = Arc::new(MemStorage::new());
        let pref = ParentRef {
            data_write_guid: PARENT,
            relative_path: ".\\base.vhdx".into(),
            absolute_path: Some("C:\\old\\base.vhdx".into()),
        };
        let f = create(mem.clone(), &CreateOptions::differencing(8 << 20, pref)).unwrap();
        f.write_at(&[0x3C; 8192], 2 << 20).unwrap();
        f.close().unwrap();
        mem
    }

    fn new_locator(abs: &str) -> ParentLocator {
        ParentLocator::new(vec![
            ("parent_linkage".into(), guid::braced(&PARENT)),
            ("relative_path".into(), ".\\moved\\base.vhdx".into()),
            ("absolute_win32_path".into(), abs.into()),
            ("x_unknown".into(), "kept".into()),
        ])
    }

    fn read8k(f: &VhdxFile<impl Storage>) -> Vec<u8> {
        let mut buf = vec![0u8; 8192];
        f.read_at(&mut buf, 2 << 20).unwrap();
        buf
    }

    #[test]
    fn rewrite_in_place_and_moved_keeps_data_write_guid() {
        let mem = child();
        let mut f =
            VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let before = f.header();
        let old_entry = *f
            .meta
            .entries
            .iter()
            .find(|e| e.item_id == guid::PARENT_LOCATOR)
            .unwrap();
        // Shorter than the old item: stays where it was.
        let short = new_locator("C:\\b.vhdx");
        f.set_parent_locator(&short).unwrap();
        assert_eq!(f.parent_locator(), Some(&short));
        let e1 = *f
            .meta
            .entries
            .iter()
            .find(|e| e.item_id == guid::PARENT_LOCATOR)
            .unwrap();
        assert_eq!(e1.offset, old_entry.offset);
        // Much longer: needs free space in the region.
        let long = new_locator(&format!("D:\\{}\\base.vhdx", "y".repeat(2000)));
        f.set_parent_locator(&long).unwrap();
        let e2 = *f
            .meta
            .entries
            .iter()
            .find(|e| e.item_id == guid::PARENT_LOCATOR)
            .unwrap();
        // The locator is the last item: it grows into the free space after it.
        assert!(e2.length > old_entry.length);
        assert!(f
            .meta
            .entries
            .iter()
            .all(|e| e.item_id == guid::PARENT_LOCATOR
                || u64::from(e.offset) + u64::from(e.length) <= u64::from(e2.offset)
                || u64::from(e2.offset) + u64::from(e2.length) <= u64::from(e.offset)));
        let after = f.header();
        assert_eq!(after.data_write_guid, before.data_write_guid);
        assert_ne!(after.file_write_guid, before.file_write_guid);
        assert!(after.log_guid.is_nil(), "the locator session is closed");
        // A data write afterwards still changes the DataWriteGuid.
        f.write_at(&[1; 512], 0).unwrap();
        f.flush().unwrap();
        assert_ne!(f.header().data_write_guid, before.data_write_guid);
        f.close().unwrap();
        drop(f);
        let f = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(f.parent_locator(), Some(&long));
        assert!(f.check().unwrap().errors.is_empty());
        assert_eq!(read8k(&f), vec![0x3C; 8192]);
    }

    #[test]
    fn refusals_write_nothing() {
        let mem = child();
        let before = mem.to_vec().unwrap();
        let mut ro =
            VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        let l = new_locator("C:\\x.vhdx");
        assert_eq!(
            ro.set_parent_locator(&l).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        let mut f =
            VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let bad = ParentLocator::new(vec![("relative_path".into(), "x".into())]);
        assert_eq!(
            f.set_parent_locator(&bad).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        // Larger than the metadata region.
        let huge = new_locator(&"z".repeat(30000));
        let mut entries = huge.entries.clone();
        for i in 0..40 {
            entries.push((format!("k{i}"), "v".repeat(30000)));
        }
        let e = f
            .set_parent_locator(&ParentLocator::new(entries))
            .unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::NoSpace | ErrorKind::InvalidInput
        ));
        drop(f);
        assert_eq!(mem.to_vec().unwrap(), before);
        let base = Arc::new(MemStorage::new());
        create(base.clone(), &CreateOptions::dynamic(8 << 20))
            .unwrap()
            .close()
            .unwrap();
        let mut b = VhdxFile::open(base, &crate::OpenOptions::new().read_only(false)).unwrap();
        assert_eq!(
            b.set_parent_locator(&l).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    /// A power cut at every write-like op: every crash image opens (read-only, replaying in
    /// memory, and writable, replaying into the file) with the old or the new locator.
    /// `child()` with its locator item moved from right after the other items to 256 KiB into
    /// the metadata region (a valid layout other writers produce), so a larger locator goes
    /// to the free space below it: a real move with the table entry updated.
    fn child_with_locator_high() -> Arc<MemStorage> {
        let mem = child();
        let f = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        let md = f.regions.metadata;
        let (i, e) = f
            .meta
            .entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.item_id == guid::PARENT_LOCATOR)
            .map(|(i, e)| (i, *e))
            .unwrap();
        drop(f);
        let mut item = vec![0u8; e.length as usize];
        mem.read_at(&mut item, md.file_offset + u64::from(e.offset))
            .unwrap();
        let high: u32 = 256 << 10;
        mem.write_at(&item, md.file_offset + u64::from(high))
            .unwrap();
        mem.write_at(&vec![0u8; item.len()], md.file_offset + u64::from(e.offset))
            .unwrap();
        mem.write_at(
            &high.to_le_bytes(),
            md.file_offset + 32 + 32 * i as u64 + 16,
        )
        .unwrap();
        let f = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(f.meta.entries[i].offset, high, "the crafted layout opens");
        mem
    }

    fn locator_entry(f: &VhdxFile<impl Storage>) -> MetadataEntry {
        *f.meta
            .entries
            .iter()
            .find(|e| e.item_id == guid::PARENT_LOCATOR)
            .unwrap()
    }

    #[test]
    fn larger_locator_moves_to_free_space() {
        let mem = child_with_locator_high();
        let mut f =
            VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let old = locator_entry(&f);
        let new = new_locator(&format!("E:\\{}\\base.vhdx", "m".repeat(900)));
        f.set_parent_locator(&new).unwrap();
        let moved = locator_entry(&f);
        assert!(moved.offset < old.offset, "{moved:?} vs {old:?}");
        drop(f);
        let f = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(locator_entry(&f), moved);
        assert_eq!(f.parent_locator(), Some(&new));
        // The old item's bytes were zeroed.
        let md = f.regions.metadata;
        let mut old_bytes = vec![0u8; old.length as usize];
        mem.read_at(&mut old_bytes, md.file_offset + u64::from(old.offset))
            .unwrap();
        assert!(old_bytes.iter().all(|&b| b == 0));
        assert_eq!(read8k(&f), vec![0x3C; 8192]);
    }

    #[test]
    fn every_crash_point_leaves_old_or_new_locator() {
        crash_points(child());
    }

    #[test]
    fn every_crash_point_leaves_old_or_new_moved_locator() {
        crash_points(child_with_locator_high());
    }

    fn crash_points(mem: Arc<MemStorage>) {
        let old = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true))
            .unwrap()
            .parent_locator()
            .cloned()
            .unwrap();
        let data_guid = VhdxFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true))
            .unwrap()
            .header()
            .data_write_guid;
        let new = new_locator(&format!("E:\\{}\\base.vhdx", "q".repeat(600)));
        let (mut saw_old, mut saw_new, mut saw_replay) = (false, false, false);
        let mut n = 0;
        loop {
            let fault = Arc::new(FaultStorage::new((*mem).clone()));
            let mut f =
                VhdxFile::open(fault.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
            fault.set_cut(CutPoint::AfterOps(n));
            let done = f.set_parent_locator(&new).is_ok();
            drop(f);
            for seed in 0..8 {
                let img = fault.crash_image(seed);
                for ro in [true, false] {
                    let f = VhdxFile::open(img.clone(), &crate::OpenOptions::new().read_only(ro))
                        .unwrap_or_else(|e| panic!("cut {n} seed {seed}: {e:?}"));
                    let got = f.parent_locator().cloned().unwrap();
                    if got == new {
                        saw_new = true;
                    } else {
                        assert_eq!(got, old, "cut {n} seed {seed}: a mixed locator");
                        saw_old = true;
                    }
                    assert_eq!(f.header().data_write_guid, data_guid);
                    saw_replay |= f.details().log_dirty && got == new;
                    assert_eq!(read8k(&f), vec![0x3C; 8192], "cut {n} seed {seed}");
                    assert!(f.check().unwrap().errors.is_empty() || ro);
                }
            }
            if done {
                let f = VhdxFile::open(
                    fault.durable_image(),
                    &crate::OpenOptions::new().read_only(true),
                )
                .unwrap();
                assert_eq!(f.parent_locator(), Some(&new));
                break;
            }
            n += 1;
            assert!(n < 100, "set_parent_locator never completed");
        }
        assert!(saw_old && saw_new && saw_replay);
    }

    fn e(offset: u32, length: u32) -> MetadataEntry {
        MetadataEntry {
            item_id: Uuid::from_u128(u128::from(offset)),
            offset,
            length,
            flags: 0,
        }
    }

    #[test]
    fn free_space_search() {
        let t = TABLE_SIZE as u32;
        let entries = [e(t, 8), e(t + 8, 8), e(t + 100, 50), e(0, 0)];
        // Skipping the first item frees its 8 bytes: a small item fits there.
        assert_eq!(find_free(&entries, 0, 8, 1 << 20), Some(u64::from(t)));
        // 80 bytes fit in the gap between the second and third items (84 bytes); 90 do not.
        assert_eq!(find_free(&entries, 3, 80, 1 << 20), Some(u64::from(t) + 16));
        assert_eq!(
            find_free(&entries, 3, 90, 1 << 20),
            Some(u64::from(t) + 152)
        );
        // The region end bounds everything.
        assert_eq!(find_free(&entries, 3, 1 << 20, 1 << 20), None);
    }

    #[test]
    fn patch_crosses_sectors() {
        let mut m = BTreeMap::new();
        m.insert(0, vec![0u8; 4096]);
        m.insert(1, vec![0u8; 4096]);
        patch(&mut m, 4090, &[7u8; 10]).unwrap();
        assert_eq!(&m[&0][4090..], &[7u8; 6]);
        assert_eq!(&m[&1][..4], &[7u8; 4]);
        assert_eq!(m[&1][4], 0);
        assert!(patch(&mut m, 8190, &[1u8; 4]).is_err());
        assert_eq!(
            sectors_of(4095, 2).collect::<Vec<_>>(),
            vec![0, 1],
            "two sectors"
        );
    }
}
