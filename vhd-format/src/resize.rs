//! Changing the virtual size of a VHD (what Hyper-V's `Resize-VHD` does): [`resize_storage`]
//! on an image nobody has open, [`VhdFile::resize`] on an open one.
//!
//! The VHD spec 1.0 has no resize operation; this is how this crate does it, every step
//! ordered so that a power cut at any write or sync leaves an image that opens with the old
//! size or the new one and every byte of data it held ("Hard Disk Footer Format", "Dynamic
//! Disk Header Format", "Block Allocation Table and Data Blocks"):
//!
//! - **Size and geometry.** The footer's current size is the size asked (a multiple of 512),
//!   its CHS geometry computed from it by the spec's algorithm, as [`crate::VhdFile::create`]
//!   does. The original size is set to it as well: the spec calls that field informational
//!   (the size at creation), but libvhdi reports it as the disk's size. Exception: an image whose creator application is one that readers size by CHS
//!   (`vpc `, `qemu`: qemu's vpc driver takes the size from the geometry for those) is grown
//!   to the size its new geometry covers, rounded up as qemu-img and Virtual PC create them, so
//!   every reader agrees on the new size; [`ResizeReport::new_size`] says what it became.
//! - **Fixed, grow.** The new footer is written at the new end (the file grows), synced;
//!   then the old footer's sector, now inside the disk, is zeroed and synced. A cut between
//!   the two leaves the new size with that one sector of the new space holding the old
//!   footer's bytes instead of zeros (no data the disk held is touched).
//! - **Dynamic and differencing, grow.** While the BAT has entries for the new blocks
//!   (`MaxTableEntries`), only the footers change: the end footer first, synced, then the copy
//!   at offset 0, synced (the loader prefers the end footer). Entries past the old last block
//!   that point anywhere (never written by this crate) are cleared first, and the part of an
//!   allocated last block past the old end is zeroed, so the new space reads as zeros.
//! - **Enlarging the BAT.** Otherwise `MaxTableEntries` grows to the new block count rounded
//!   up to a whole BAT sector (128 entries). The BAT grows in place when only data blocks
//!   (or nothing) lie after it: each block in the way is copied to the end of the file (the
//!   data on a 64 KiB boundary, as new blocks are), synced, and only then its BAT entry is
//!   rewritten and synced, so the old copy is unreferenced before anything overwrites it; the
//!   space the BAT grows into is then filled with unallocated entries and synced, and finally
//!   the first sector of the dynamic header (table offset, MaxTableEntries and the checksum
//!   all live there, so the change is one atomic sector) is written and synced. When parent
//!   locator data lies in the way (a differencing image made by this crate or Hyper-V keeps it
//!   right after the BAT), the BAT moves instead: the enlarged table is written past the last
//!   block, synced, and the header sector is switched to it. During the moves the end footer
//!   is not at the end of the file; the loader then uses the copy at offset 0, as after a
//!   crash during allocation.
//! - **Shrink.** A fixed image is never shrunk ([`ResizeError::FixedShrink`]). A dynamic or
//!   differencing image is shrunk only when that is clearly safe: no allocated block lies
//!   wholly past the new end, and the part past the new end of a block that straddles it is
//!   all zeros in the file ([`ResizeError::DataBeyondEnd`] otherwise). Only the footers
//!   change; the BAT keeps its entries.

use block_io::{BlockDevice, Error, ErrorKind, Storage};

use crate::bat::{Bat, ENTRIES_PER_SECTOR, UNALLOCATED};
use crate::create::size_and_geometry;
use crate::file::VhdFile;
use crate::footer::{checksum, DiskType, Footer, Geometry, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE, MAX_TABLE_ENTRIES};
use crate::layout::{self, FooterSource, Loaded};

/// New blocks' data starts on this boundary (as `alloc.rs` places them).
const DATA_ALIGN: u64 = 65536;
/// Bytes copied at a time when a block moves.
const COPY_CHUNK: u64 = 1 << 20;

/// Why a resize was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// The size asked is not a positive multiple of 512 within 2040 GiB.
    #[error("a VHD cannot be {0} bytes (a positive multiple of 512 up to 2040 GiB)")]
    BadSize(u64),
    /// Fixed images are never shrunk (their data would be cut).
    #[error("a fixed VHD cannot shrink")]
    FixedShrink,
    /// Shrinking would cut data: an allocated block lies past the new end, or the part past
    /// it of the block that straddles it is not all zeros.
    #[error("allocated data at offset {offset} lies beyond the new end ({new_size} bytes)")]
    DataBeyondEnd {
        /// Virtual offset of the first data found past the new end.
        offset: u64,
        /// The size asked.
        new_size: u64,
    },
    /// The new size needs more BAT entries than this crate accepts.
    #[error("{blocks} blocks of {block_size} bytes need a larger BAT than a VHD may have")]
    TooManyBlocks {
        /// Blocks the new size needs.
        blocks: u64,
        /// The image's block size.
        block_size: u32,
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
            ResizeError::BadSize(_) => ErrorKind::InvalidInput,
            ResizeError::FixedShrink => ErrorKind::Unsupported,
            ResizeError::DataBeyondEnd { .. } => ErrorKind::InvalidInput,
            ResizeError::TooManyBlocks { .. } => ErrorKind::Unsupported,
            ResizeError::ReadOnly => ErrorKind::ReadOnly,
            ResizeError::Io(e) => e.kind(),
        }
    }
}

impl From<ResizeError> for Error {
    fn from(e: ResizeError) -> Self {
        Error::with_source(e.kind(), "VHD resize", e)
    }
}

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeReport {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now (the size asked, or for a CHS-sized image the size its geometry
    /// covers).
    pub new_size: u64,
    /// BAT entries before and after, when the BAT was enlarged.
    pub bat_entries: Option<(u32, u32)>,
    /// Data blocks copied out of the BAT's way.
    pub blocks_moved: u64,
    /// The BAT moved to the end of the file (parent locators lay in its way).
    pub bat_relocated: bool,
}

/// Whether readers (qemu's vpc driver, Virtual PC) take this image's size from its CHS
/// geometry.
fn sized_by_chs(f: &Footer) -> bool {
    matches!(&f.creator_app, b"vpc " | b"qemu")
}

/// The size and geometry an image with `footer` gets for `size`.
fn target(footer: &Footer, size: u64) -> Result<(u64, Geometry), ResizeError> {
    if size == 0 || size % 512 != 0 {
        return Err(ResizeError::BadSize(size));
    }
    size_and_geometry(size, sized_by_chs(footer)).map_err(|_| ResizeError::BadSize(size))
}

fn sync<S: Storage + ?Sized>(st: &S) -> Result<(), ResizeError> {
    Ok(st.sync_data()?)
}

/// Resizes the VHD in `st` to `new_size` bytes (see the module docs). Nothing else may have
/// the image open for writing. Asking for the current size changes nothing.
pub fn resize_storage<S: Storage + ?Sized>(
    st: &S,
    new_size: u64,
) -> Result<ResizeReport, ResizeError> {
    resize_storage_with(st, new_size, true)
}

/// [`resize_storage`], choosing how an enlarged BAT makes room: with `move_blocks` false it
/// always moves to the end of the file, so no byte of a data block is rewritten anywhere
/// (for an online resize, where a read mapped to the file before the resize may still be
/// in flight).
pub fn resize_storage_with<S: Storage + ?Sized>(
    st: &S,
    new_size: u64,
    move_blocks: bool,
) -> Result<ResizeReport, ResizeError> {
    let mut l = layout::load(st)?;
    if l.source == FooterSource::CopyAtStart {
        // As a writable open does: drop the unreferenced tail and restore the end footer.
        st.set_len(l.footer_offset)?;
        st.write_at(&l.footer_bytes, l.footer_offset)?;
        sync(st)?;
        l.source = FooterSource::End;
    }
    let old_size = l.footer.current_size;
    let (size, geometry) = target(&l.footer, new_size)?;
    let mut report = ResizeReport {
        old_size,
        new_size: size,
        bat_entries: None,
        blocks_moved: 0,
        bat_relocated: false,
    };
    if size == old_size {
        return Ok(report);
    }
    // The original size follows too: the spec calls it informational, but libvhdi takes
    // the disk's size from it.
    let footer = Footer {
        current_size: size,
        original_size: size,
        geometry,
        ..l.footer.clone()
    };
    if l.footer.disk_type == DiskType::Fixed {
        if size < old_size {
            return Err(ResizeError::FixedShrink);
        }
        st.write_at(&footer.to_bytes(), size)?;
        sync(st)?;
        st.write_at(&[0u8; FOOTER_SIZE], old_size)?;
        sync(st)?;
        return Ok(report);
    }
    let mut end = l.footer_offset;
    if size < old_size {
        check_shrink(st, &l, size)?;
    } else {
        prepare_grow(st, &mut l, &mut end, size, move_blocks, &mut report)?;
    }
    let fb = footer.to_bytes();
    st.write_at(&fb, end)?;
    sync(st)?;
    st.write_at(&fb, 0)?;
    sync(st)?;
    Ok(report)
}

/// Refuses a shrink of a dynamic image that would cut data.
fn check_shrink<S: Storage + ?Sized>(st: &S, l: &Loaded, size: u64) -> Result<(), ResizeError> {
    let Some(d) = &l.dynamic else {
        return Err(ResizeError::FixedShrink);
    };
    let bs = u64::from(d.header.block_size);
    let cut = |offset| ResizeError::DataBeyondEnd {
        offset,
        new_size: size,
    };
    let first_whole = size.div_ceil(bs);
    for (b, _) in d.bat.allocated() {
        if b as u64 >= first_whole {
            return Err(cut(b as u64 * bs));
        }
    }
    if size % bs != 0 {
        let b = (size / bs) as usize;
        if let Some(sector) = d.bat.get(b) {
            let data = u64::from(sector) * 512 + d.bitmap_size;
            let from = size % bs;
            let to = (l.footer.current_size - size / bs * bs).min(bs);
            if let Some(at) = first_nonzero(st, data + from, to - from)? {
                return Err(cut(size + at));
            }
        }
    }
    Ok(())
}

/// Offset (from `off`) of the first non-zero byte of `[off, off+len)` of the file, if any.
fn first_nonzero<S: Storage + ?Sized>(st: &S, off: u64, len: u64) -> Result<Option<u64>, Error> {
    let mut buf = vec![0u8; COPY_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = COPY_CHUNK.min(len - done) as usize;
        st.read_at(&mut buf[..n], off + done)?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(done + i as u64));
        }
        done += n as u64;
    }
    Ok(None)
}

/// Before the footers of a dynamic image grow: BAT entries for every new block (enlarging
/// the BAT if need be), entries of the new blocks unallocated, the old last block's tail
/// zeroed. `end` is where the footer goes (moves as blocks move).
fn prepare_grow<S: Storage + ?Sized>(
    st: &S,
    l: &mut Loaded,
    end: &mut u64,
    size: u64,
    move_blocks: bool,
    report: &mut ResizeReport,
) -> Result<(), ResizeError> {
    let old_size = l.footer.current_size;
    let Some(d) = l.dynamic.as_mut() else {
        return Ok(());
    };
    let bs = u64::from(d.header.block_size);
    let blocks = size.div_ceil(bs);
    let old_blocks = old_size.div_ceil(bs);
    // The old last block's bytes past the old end become visible: zeros.
    if old_size % bs != 0 {
        if let Some(sector) = d.bat.get((old_size / bs) as usize) {
            let data = u64::from(sector) * 512 + d.bitmap_size;
            let from = old_size % bs;
            if first_nonzero(st, data + from, bs - from)?.is_some() {
                zero(st, data + from, bs - from)?;
                sync(st)?;
            }
        }
    }
    // Entries of blocks the image did not have must not point anywhere.
    let stale: Vec<usize> = d
        .bat
        .allocated()
        .map(|(b, _)| b)
        .filter(|&b| b as u64 >= old_blocks && (b as u64) < blocks)
        .collect();
    if !stale.is_empty() {
        for &b in &stale {
            d.bat.set(b, UNALLOCATED);
        }
        write_bat_sectors(st, &d.header, &d.bat, stale.iter().copied())?;
        sync(st)?;
    }
    if blocks <= u64::from(d.header.max_table_entries) {
        return Ok(());
    }
    let too_many = || ResizeError::TooManyBlocks {
        blocks,
        block_size: d.header.block_size,
    };
    let entries = blocks.next_multiple_of(ENTRIES_PER_SECTOR as u64);
    let entries = u32::try_from(entries)
        .ok()
        .filter(|&e| e <= MAX_TABLE_ENTRIES)
        .ok_or_else(too_many)?;
    let old_entries = d.header.max_table_entries;
    report.bat_entries = Some((old_entries, entries));
    let old_len = (u64::from(old_entries) * 4).div_ceil(512) * 512;
    let new_len = u64::from(entries) * 4;
    let table = d.header.table_offset;
    let (grow_from, grow_to) = (table + old_len, table + new_len);
    let in_way = |off: u64, len: u64| off < grow_to && grow_from < off + len;
    let locators_in_way = l.footer.disk_type == DiskType::Differencing
        && d.header.locators.iter().any(|loc| {
            in_way(
                loc.data_offset,
                (u64::from(loc.data_length).div_ceil(512) * 512).max(512),
            )
        });
    // Entries that fit the BAT's last sector need no room at all.
    let relocate = grow_to > grow_from && (locators_in_way || !move_blocks);
    let block_total = d.bitmap_size + bs;
    let mut header = d.header.clone();
    header.max_table_entries = entries;
    if relocate {
        // (Or blocks may not move.) The BAT moves past the last block: copy it there (the new entries unallocated),
        // sync, then switch the header to it.
        let at = *end;
        let mut bytes = vec![0xFFu8; new_len as usize];
        let mut old = vec![0u8; old_len as usize];
        st.read_at(&mut old, table)?;
        let keep = (u64::from(old_entries) * 4) as usize;
        bytes[..keep].copy_from_slice(&old[..keep]);
        st.write_at(&bytes, at)?;
        *end = at + new_len;
        sync(st)?;
        header.table_offset = at;
        report.bat_relocated = true;
    } else {
        // Blocks in the way move to the end of the file, lowest first.
        let mut moving: Vec<(u32, usize)> = d
            .bat
            .allocated()
            .filter(|&(_, s)| in_way(u64::from(s) * 512, block_total))
            .map(|(b, s)| (s, b))
            .collect();
        moving.sort_unstable();
        for (sector, b) in moving {
            let from = u64::from(sector) * 512;
            // As `alloc.rs` reserves: past the footer slot, data on a 64 KiB boundary.
            let start = (*end + FOOTER_SIZE as u64 + d.bitmap_size).next_multiple_of(DATA_ALIGN)
                - d.bitmap_size;
            let new_sector = u32::try_from(start / 512)
                .ok()
                .filter(|&s| s != UNALLOCATED && (start + block_total) / 512 < u64::from(u32::MAX))
                .ok_or_else(|| Error::new(ErrorKind::NoSpace, "VHD BAT offsets exhausted"))?;
            copy(st, from, start, block_total)?;
            // The copy is durable before the entry points at it.
            sync(st)?;
            d.bat.set(b, new_sector);
            write_bat_sectors(st, &d.header, &d.bat, [b])?;
            // The entry is durable before anything overwrites the old copy.
            sync(st)?;
            *end = start + block_total;
            report.blocks_moved += 1;
        }
        let fill = vec![0xFFu8; (grow_to - grow_from) as usize];
        st.write_at(&fill, grow_from)?;
        sync(st)?;
    }
    *end = (*end).max(grow_to);
    // One sector: table offset, MaxTableEntries and the checksum are in its first 40 bytes.
    // The header's bytes are patched as stored, so the checksum covers exactly what is on
    // disk (a re-encoded header could differ in reserved bytes of its second sector).
    let header_off = l.footer.data_offset.unwrap_or(FOOTER_SIZE as u64);
    let mut hb = vec![0u8; HEADER_SIZE];
    st.read_at(&mut hb, header_off)?;
    hb[16..24].copy_from_slice(&header.table_offset.to_be_bytes());
    hb[28..32].copy_from_slice(&entries.to_be_bytes());
    let sum = checksum(&hb, 36..40);
    hb[36..40].copy_from_slice(&sum.to_be_bytes());
    st.write_at(&hb[..512], header_off)?;
    sync(st)?;
    let mut bat_bytes = vec![0u8; new_len as usize];
    st.read_at(&mut bat_bytes, header.table_offset)?;
    d.bat = Bat::parse(&bat_bytes, entries as usize);
    d.header = header;
    Ok(())
}

/// Writes the BAT sectors holding `blocks`' entries from `bat`.
fn write_bat_sectors<S: Storage + ?Sized>(
    st: &S,
    header: &DynamicHeader,
    bat: &Bat,
    blocks: impl IntoIterator<Item = usize>,
) -> Result<(), Error> {
    let mut sectors: Vec<usize> = blocks.into_iter().map(|b| b / ENTRIES_PER_SECTOR).collect();
    sectors.dedup();
    for s in sectors {
        let (rel, bytes) = bat.sector_bytes(s, |_| false);
        st.write_at(&bytes, header.table_offset + rel)?;
    }
    Ok(())
}

fn zero<S: Storage + ?Sized>(st: &S, off: u64, len: u64) -> Result<(), Error> {
    let zeros = vec![0u8; COPY_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = COPY_CHUNK.min(len - done);
        st.write_at(&zeros[..n as usize], off + done)?;
        done += n;
    }
    Ok(())
}

/// Copies `len` bytes of the file from `from` to `to` (the ranges do not overlap).
fn copy<S: Storage + ?Sized>(st: &S, from: u64, to: u64, len: u64) -> Result<(), Error> {
    let mut buf = vec![0u8; COPY_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = COPY_CHUNK.min(len - done) as usize;
        st.read_at(&mut buf[..n], from + done)?;
        st.write_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

impl<S: Storage> VhdFile<S> {
    /// Resizes this image to `new_size` bytes (see the [module docs](crate::resize)): makes
    /// everything written so far durable, resizes the file, and opens it again. On an error
    /// the storage is dropped; open it again to see which size it has.
    pub fn resize(self, new_size: u64) -> Result<(VhdFile<S>, ResizeReport), ResizeError> {
        if self.info().read_only {
            return Err(ResizeError::ReadOnly);
        }
        self.flush()?;
        let st = self.into_storage();
        let report = resize_storage(&st, new_size)?;
        Ok((
            VhdFile::open(st, &crate::OpenOptions::new().read_only(false))?,
            report,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use block_io::{BlockDevice, CutPoint, FaultStorage, MemStorage};

    use super::*;
    use crate::{CreateOptions, Creator, DifferencingOptions, Subformat};

    const MIB: u64 = 1 << 20;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    fn read(f: &impl BlockDevice, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        f.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn fixed_grows_and_refuses_to_shrink() {
        let st = Arc::new(MemStorage::new());
        let f =
            VhdFile::create(st.clone(), &CreateOptions::new(4 * MIB, Subformat::Fixed)).unwrap();
        f.write_at(&pattern(1, 4096), 4 * MIB - 4096).unwrap();
        let (f, r) = f.resize(6 * MIB).unwrap();
        assert_eq!((r.old_size, r.new_size), (4 * MIB, 6 * MIB));
        assert_eq!(f.info().virtual_size, 6 * MIB);
        assert_eq!(st.len().unwrap(), 6 * MIB + 512);
        assert_eq!(read(&f, 4 * MIB - 4096, 4096), pattern(1, 4096));
        assert!(read(&f, 4 * MIB, 2 * MIB as usize).iter().all(|&b| b == 0));
        assert_eq!(f.footer().geometry, Geometry::for_sectors(6 * MIB / 512));
        assert!(matches!(
            f.resize(2 * MIB).unwrap_err(),
            ResizeError::FixedShrink
        ));
    }

    #[test]
    fn dynamic_grows_within_and_beyond_the_bat() {
        let st = Arc::new(MemStorage::new());
        // 5 blocks: the BAT sector holds 128 entries; the first block lies at 64 KiB.
        let f = VhdFile::create(
            st.clone(),
            &CreateOptions::new(10 * MIB, Subformat::Dynamic),
        )
        .unwrap();
        f.write_at(&pattern(2, 8192), 0).unwrap();
        f.write_at(&pattern(3, 8192), 9 * MIB).unwrap();
        let (f, r) = f.resize(200 * MIB).unwrap();
        // Room for 128 entries before the first block: the BAT grows where it is.
        assert_eq!((r.bat_entries, r.blocks_moved), (Some((5, 128)), 0));
        let (f, r) = f.resize(256 * MIB).unwrap();
        assert_eq!(r.bat_entries, None);
        let (f, r) = f.resize(1024 * MIB).unwrap();
        assert_eq!(r.bat_entries, Some((128, 512)));
        assert_eq!(r.blocks_moved, 0);
        assert_eq!(read(&f, 0, 8192), pattern(2, 8192));
        assert_eq!(read(&f, 9 * MIB, 8192), pattern(3, 8192));
        f.write_at(&pattern(4, 4096), 1000 * MIB).unwrap();
        f.flush().unwrap();
        drop(f);
        let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(f.info().virtual_size, 1024 * MIB);
        assert_eq!(read(&f, 1000 * MIB, 4096), pattern(4, 4096));
        assert!(f.check().unwrap().issues.is_empty());
    }

    /// A qemu-style layout (blocks right after the BAT) of 4 KiB blocks, `blocks` written
    /// in that order, each with its own pattern.
    fn packed(size: u64, blocks: &[u64]) -> Arc<MemStorage> {
        let st = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new(size, Subformat::Dynamic);
        o.block_size = 4096;
        o.creator.app = *b"qem2";
        VhdFile::create(st.clone(), &o).unwrap().close().unwrap();
        let mut l = layout::load(&*st).unwrap();
        let d = l.dynamic.as_mut().unwrap();
        let bm = d.bitmap_size;
        let bat_len = (u64::from(d.header.max_table_entries) * 4).div_ceil(512) * 512;
        let mut at = d.header.table_offset + bat_len;
        for &b in blocks {
            st.write_at(&vec![0xFFu8; bm as usize], at).unwrap();
            st.write_at(&pattern(b as u8, 4096), at + bm).unwrap();
            d.bat.set(b as usize, (at / 512) as u32);
            at += bm + 4096;
        }
        let mut sorted: Vec<usize> = blocks.iter().map(|&b| b as usize).collect();
        sorted.sort_unstable();
        write_bat_sectors(&*st, &d.header, &d.bat, sorted).unwrap();
        st.set_len(at).unwrap();
        st.write_at(&l.footer_bytes, at).unwrap();
        st.sync_data().unwrap();
        st
    }

    #[test]
    fn bat_growth_moves_blocks_in_its_way() {
        // 2048 entries (16 BAT sectors); 16 MiB needs 32 sectors: 8 KiB of growth, where the
        // first two blocks (4608 bytes each) lie.
        let st = packed(8 * MIB, &[3, 0, 2]);
        let r = resize_storage(&*st, 16 * MIB).unwrap();
        assert_eq!(r.bat_entries, Some((2048, 4096)));
        assert_eq!(r.blocks_moved, 2);
        let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        for b in [3u64, 0, 2] {
            assert_eq!(read(&f, b * 4096, 4096), pattern(b as u8, 4096));
        }
        assert!(read(&f, 4096, 4096).iter().all(|&x| x == 0));
        assert!(read(&f, 8 * MIB, 8 * MIB as usize).iter().all(|&x| x == 0));
        f.write_at(&pattern(9, 512), 15 * MIB).unwrap();
        f.close().unwrap();
        assert!(crate::check_storage(&*st).unwrap().issues.is_empty());
        let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(read(&f, 15 * MIB, 512), pattern(9, 512));
    }

    #[test]
    fn differencing_bat_moves_past_the_locators() {
        let st = Arc::new(MemStorage::new());
        let mut o = DifferencingOptions {
            size: 4 * MIB,
            block_size: 2 * MIB as u32,
            parent_unique_id: uuid::Uuid::from_bytes([4; 16]),
            parent_timestamp: 7,
            parent_name: "C:\\p.vhd".into(),
            absolute_path: Some("C:\\p.vhd".into()),
            relative_path: Some(".\\p.vhd".into()),
            unique_id: None,
            timestamp: None,
            creator: Creator::default(),
        };
        o.size = 4 * MIB;
        let f = VhdFile::create_differencing(st.clone(), &o).unwrap();
        f.write_at(&pattern(5, 4096), MIB).unwrap();
        let (f, r) = f.resize(1024 * MIB).unwrap();
        assert!(r.bat_relocated);
        assert_eq!(read(&f, MIB, 4096), pattern(5, 4096));
        let d = f.details();
        assert_eq!(d.locators.len(), 2);
        assert_eq!(d.parent_timestamp, Some(7));
        f.write_at(&pattern(6, 4096), 1000 * MIB).unwrap();
        f.close().unwrap();
        let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(read(&f, 1000 * MIB, 4096), pattern(6, 4096));
        assert!(f.check().unwrap().issues.is_empty());
    }

    #[test]
    fn shrink_only_when_nothing_is_cut() {
        let st = Arc::new(MemStorage::new());
        let f = VhdFile::create(
            st.clone(),
            &CreateOptions::new(10 * MIB, Subformat::Dynamic),
        )
        .unwrap();
        f.write_at(&pattern(1, 512), 5 * MIB).unwrap();
        f.write_at(&[0; 512], 5 * MIB + 4096).unwrap();
        let f = match f.resize(4 * MIB) {
            Err(ResizeError::DataBeyondEnd { offset, .. }) => {
                assert_eq!(offset, 4 * MIB);
                VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap()
            }
            other => panic!("{other:?}"),
        };
        // Straddling block 2 (4..6 MiB): data at 5 MiB is past 5 MiB - 512? No: past 5 MiB+512.
        assert!(matches!(
            f.resize(5 * MIB).unwrap_err(),
            ResizeError::DataBeyondEnd { offset, .. } if offset == 5 * MIB
        ));
        let f = VhdFile::open(st.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let (f, _) = f.resize(5 * MIB + 512).unwrap();
        assert_eq!(f.info().virtual_size, 5 * MIB + 512);
        assert_eq!(read(&f, 5 * MIB, 512), pattern(1, 512));
        // Growing again shows zeros past the old end.
        let (f, _) = f.resize(8 * MIB).unwrap();
        assert!(read(&f, 5 * MIB + 512, 3 * MIB as usize - 512)
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn chs_sized_images_grow_to_their_geometry() {
        let st = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new(64 * MIB, Subformat::Dynamic);
        o.chs_size = true;
        o.creator.app = *b"qemu";
        let f = VhdFile::create(st, &o).unwrap();
        let (f, r) = f.resize(1 << 30).unwrap();
        assert_eq!(r.new_size, 1_073_995_776);
        assert_eq!(f.footer().geometry.size(), r.new_size);
    }

    /// A power cut at every write and sync of a resize leaves the old size or the new one,
    /// and every byte flushed before.
    fn crash_sweep(image: Arc<MemStorage>, new_size: u64, data: &[(u64, Vec<u8>)]) {
        let old_size = VhdFile::open(image.clone(), &crate::OpenOptions::new().read_only(true))
            .unwrap()
            .info()
            .virtual_size;
        let mut n = 0;
        let (mut saw_old, mut saw_new) = (false, false);
        loop {
            let fault = FaultStorage::new((*image).clone());
            fault.set_cut(CutPoint::AfterOps(n));
            let done = resize_storage(&fault, new_size).is_ok();
            for seed in 0..6 {
                let img = fault.crash_image(seed);
                for ro in [true, false] {
                    let f = VhdFile::open(img.clone(), &crate::OpenOptions::new().read_only(ro))
                        .unwrap_or_else(|e| panic!("cut {n} seed {seed} ro {ro}: {e:?}"));
                    let size = f.info().virtual_size;
                    if size == new_size {
                        saw_new = true;
                    } else {
                        assert_eq!(size, old_size, "cut {n} seed {seed}");
                        saw_old = true;
                    }
                    for (off, bytes) in data {
                        assert_eq!(&read(&f, *off, bytes.len()), bytes, "cut {n} seed {seed}");
                    }
                    if !ro {
                        // A cut between the two footer writes leaves the copy at 0 behind the
                        // end footer (the one the loader takes); a repair rewrites it.
                        let c = f.repair().unwrap();
                        assert!(c.is_clean(), "cut {n} seed {seed}: {:?}", c.issues);
                        assert!(c
                            .issues
                            .iter()
                            .all(|i| i.message.contains("copy at 0 differs") && size == new_size));
                    }
                }
            }
            if done {
                break;
            }
            n += 1;
            assert!(n < 200, "the resize never completed");
        }
        assert!(saw_old && saw_new, "cuts {n}");
    }

    #[test]
    fn crash_sweep_dynamic_grow_moving_blocks() {
        let st = packed(8 * MIB, &[1, 0, 5]);
        let data: Vec<(u64, Vec<u8>)> = [1u64, 0, 5]
            .iter()
            .map(|&b| (b * 4096, pattern(b as u8, 4096)))
            .collect();
        crash_sweep(st, 16 * MIB, &data);
    }

    #[test]
    fn crash_sweep_differencing_relocates_bat() {
        let st = Arc::new(MemStorage::new());
        let o = DifferencingOptions {
            size: 4 * MIB,
            block_size: 2 * MIB as u32,
            parent_unique_id: uuid::Uuid::from_bytes([4; 16]),
            parent_timestamp: 7,
            parent_name: "p.vhd".into(),
            absolute_path: None,
            relative_path: Some(".\\p.vhd".into()),
            unique_id: None,
            timestamp: None,
            creator: Creator::default(),
        };
        let f = VhdFile::create_differencing(st.clone(), &o).unwrap();
        f.write_at(&pattern(8, 4096), 3 * MIB).unwrap();
        f.close().unwrap();
        crash_sweep(st, 1024 * MIB, &[(3 * MIB, pattern(8, 4096))]);
    }

    #[test]
    fn crash_sweep_fixed_grow() {
        let st = Arc::new(MemStorage::new());
        let f =
            VhdFile::create(st.clone(), &CreateOptions::new(2 * MIB, Subformat::Fixed)).unwrap();
        f.write_at(&pattern(3, 4096), 0).unwrap();
        f.close().unwrap();
        crash_sweep(st, 3 * MIB, &[(0, pattern(3, 4096))]);
    }
}
