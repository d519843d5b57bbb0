//! Reading an image's metadata and checking its layout (VHD spec 1.0, "Dynamic Disk Header
//! Format" and "Block Allocation Table and Data Blocks"): which footer to trust, where the
//! header, BAT and locator data lie, and that no block overlaps metadata, another block, the
//! footer or the end of the file.
//!
//! Footer choice: the footer at the end of the file if its cookie and checksum are valid;
//! otherwise (dynamic and differencing disks only) the copy at offset 0. A crash during
//! allocation leaves exactly that state (the block's data replaced the old footer, the new
//! footer was not written yet), so the copy is what makes allocation crash-safe.

use block_io::{check_bounds, Error, ErrorKind, Result, Storage};

use crate::bat::Bat;
use crate::error::{corrupt, FormatError};
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE};
use crate::locator::MAX_LOCATOR_DATA;

/// Which footer an image was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterSource {
    /// The footer at the end of the file.
    End,
    /// The copy at offset 0 (the footer at the end was missing or invalid).
    CopyAtStart,
}

/// The dynamic part of a loaded image.
#[derive(Debug)]
pub(crate) struct DynamicLayout {
    pub header: DynamicHeader,
    pub bat: Bat,
    /// Bytes of a block's bitmap (padded to 512).
    pub bitmap_size: u64,
}

/// Everything `open` learns from the metadata.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub footer: Footer,
    pub footer_bytes: [u8; FOOTER_SIZE],
    pub source: FooterSource,
    /// Why the end footer was not used, when it was not.
    pub end_footer_error: Option<String>,
    pub dynamic: Option<DynamicLayout>,
    /// Where the footer lies (dynamic: where the next block goes).
    pub footer_offset: u64,
}

/// `(offset, length)` of a metadata area: footer copy, dynamic header, BAT, locator data.
pub(crate) type Area = (u64, u64);

/// `true` if `[off, off+len)` overlaps one of `areas`.
pub(crate) fn overlaps(areas: &[Area], off: u64, len: u64) -> bool {
    areas
        .iter()
        .any(|&(o, l)| off < o.saturating_add(l) && o < off.saturating_add(len))
}

/// The first sector boundary past every area and past the last block (`last_block`, its start,
/// `block_total` bytes long): where the footer goes. `None` past `u64`.
pub(crate) fn first_free(areas: &[Area], last_block: Option<u64>, block_total: u64) -> Option<u64> {
    let meta_end = areas.iter().map(|&(o, l)| o.saturating_add(l)).max();
    let blocks_end = last_block.map(|o| o.saturating_add(block_total));
    meta_end
        .max(blocks_end)
        .unwrap_or(0)
        .checked_next_multiple_of(512)
}

pub(crate) fn read_exact<S: Storage + ?Sized>(
    s: &S,
    len: usize,
    offset: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    s.read_at(&mut buf, offset)
        .map_err(|e| e.context_with(format!("reading the {what} at {offset}")))?;
    Ok(buf)
}

/// A strictly parsed footer and its bytes, or why it is invalid.
pub(crate) type Parsed = Result<(Footer, Vec<u8>), FormatError>;

/// Reads the footer at the end and the copy at 0, each strictly parsed.
pub(crate) fn read_footers<S: Storage + ?Sized>(s: &S, file_len: u64) -> Result<(Parsed, Parsed)> {
    if file_len < FOOTER_SIZE as u64 {
        return Err(corrupt(format!(
            "file of {file_len} bytes is too short for a VHD footer"
        )));
    }
    let end = read_exact(s, FOOTER_SIZE, file_len - FOOTER_SIZE as u64, "footer")?;
    let start = read_exact(s, FOOTER_SIZE, 0, "footer copy")?;
    let parse = |b: Vec<u8>| Footer::parse(&b, true).map(|f| (f, b));
    Ok((parse(end), parse(start)))
}

/// Loads and validates the metadata of an image.
pub(crate) fn load<S: Storage + ?Sized>(s: &S) -> Result<Loaded> {
    let file_len = s.len()?;
    let (end, copy) = read_footers(s, file_len)?;
    let (footer, bytes, source, end_err) = match (end, copy) {
        (Ok((f, b)), _) => (f, b, FooterSource::End, None),
        (Err(e_end), Ok((f, b))) if f.disk_type != DiskType::Fixed => {
            (f, b, FooterSource::CopyAtStart, Some(e_end.to_string()))
        }
        (Err(e_end), _) => {
            return Err(Error::with_source(
                e_end.kind(),
                "no valid VHD footer at the end of the file or at offset 0",
                e_end,
            ))
        }
    };
    let mut footer_bytes = [0u8; FOOTER_SIZE];
    footer_bytes.copy_from_slice(&bytes);
    let footer_pos = file_len - FOOTER_SIZE as u64;

    if footer.disk_type == DiskType::Fixed {
        // VHD 1.0: a fixed disk is the data followed by the footer.
        if footer.current_size > footer_pos {
            return Err(corrupt(format!(
                "fixed disk of {} bytes needs a file of {} bytes, found {file_len}",
                footer.current_size,
                footer.current_size.saturating_add(512)
            )));
        }
        return Ok(Loaded {
            footer,
            footer_bytes,
            source,
            end_footer_error: end_err,
            dynamic: None,
            footer_offset: footer_pos,
        });
    }

    let header_off = footer.data_offset.unwrap_or(0);
    check_bounds(header_off, HEADER_SIZE as u64, file_len).map_err(|_| {
        corrupt(format!(
            "dynamic header offset {header_off} lies beyond the end of the file"
        ))
    })?;
    let hb = read_exact(s, HEADER_SIZE, header_off, "dynamic header")?;
    let header = DynamicHeader::parse(&hb, true)?;
    let block_size = u64::from(header.block_size);
    let blocks = footer.current_size.div_ceil(block_size);
    if blocks > u64::from(header.max_table_entries) {
        return Err(corrupt(format!(
            "BAT of {} entries cannot map {} bytes in {} byte blocks",
            header.max_table_entries, footer.current_size, block_size
        )));
    }
    let bat_bytes = u64::from(header.max_table_entries) * 4;
    let bat_end = check_bounds(header.table_offset, bat_bytes.div_ceil(512) * 512, file_len)
        .map_err(|_| corrupt("the BAT lies beyond the end of the file"))?;
    // Bounded: at most MAX_TABLE_ENTRIES * 4 bytes and inside the file.
    let raw_bat = read_exact(s, bat_bytes as usize, header.table_offset, "BAT")?;
    let bat = Bat::parse(&raw_bat, header.max_table_entries as usize);

    let mut meta: Vec<Area> = vec![
        (0, FOOTER_SIZE as u64),
        (header_off, HEADER_SIZE as u64),
        (header.table_offset, bat_end - header.table_offset),
    ];
    if footer.disk_type == DiskType::Differencing {
        for l in &header.locators {
            if l.data_length > MAX_LOCATOR_DATA {
                return Err(corrupt(format!(
                    "parent locator of {} bytes is too large",
                    l.data_length
                )));
            }
            check_bounds(l.data_offset, u64::from(l.data_length), file_len).map_err(|_| {
                corrupt(format!(
                    "parent locator data at {} lies beyond the end of the file",
                    l.data_offset
                ))
            })?;
            // Only the data length is certain; the reserved space may be in bytes or sectors.
            let len = u64::from(l.data_length).div_ceil(512) * 512;
            meta.push((l.data_offset, len));
        }
    }
    let bitmap_size = header.bitmap_size();
    let block_total = bitmap_size + block_size;

    let mut starts: Vec<(u64, usize)> = Vec::new();
    for (i, sector) in bat.allocated() {
        let off = u64::from(sector) * 512;
        // A block must not overlap the metadata (VHD 1.0: blocks follow the BAT).
        if overlaps(&meta, off, block_total) {
            return Err(corrupt(format!(
                "block {i} at {off} overlaps the image metadata"
            )));
        }
        // With the end footer, every block lies before it; with the copy (after a crash
        // during allocation) the last block may be only partly written.
        let limit_ok = match source {
            FooterSource::End => off + block_total <= footer_pos,
            FooterSource::CopyAtStart => off + bitmap_size <= file_len,
        };
        if !limit_ok {
            return Err(corrupt(format!(
                "BAT entry {i} points at {off}, beyond the end of the image data"
            )));
        }
        starts.push((off, i));
    }
    starts.sort_unstable();
    for w in starts.windows(2) {
        if w[0].0 + block_total > w[1].0 {
            return Err(corrupt(format!(
                "blocks {} and {} overlap in the file",
                w[0].1, w[1].1
            )));
        }
    }
    let next_free = first_free(&meta, starts.last().map(|&(o, _)| o), block_total);
    let footer_offset = match (source, next_free) {
        (FooterSource::End, Some(n)) if n <= footer_pos => footer_pos,
        (FooterSource::End, _) => return Err(corrupt("the footer overlaps the image metadata")),
        // Past u64: refused just below, as past the 32-bit sector offsets.
        (FooterSource::CopyAtStart, n) => n.unwrap_or(u64::MAX),
    };
    if footer_offset / 512 > u64::from(u32::MAX) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "image larger than 32-bit BAT offsets allow",
        ));
    }
    Ok(Loaded {
        footer,
        footer_bytes,
        source,
        end_footer_error: end_err,
        dynamic: Some(DynamicLayout {
            header,
            bat,
            bitmap_size,
        }),
        footer_offset,
    })
}
