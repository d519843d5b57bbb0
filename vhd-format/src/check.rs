//! Consistency check and safe repair (VHD spec 1.0: footer and header checksums, footer
//! copy, BAT entries inside the file, blocks disjoint from each other and the metadata).
//!
//! The check reads leniently (a bad checksum is reported, then the structure is still used
//! to look further). Repair does only what is safe: rewrite a missing or damaged footer at
//! the end from a valid copy at offset 0 (trimming an unreferenced tail), or the copy at 0
//! from a valid footer at the end. Checksum errors with no valid twin are left alone.

use block_io::{check_bounds, Result, Storage};

use crate::bat::Bat;
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::header::{DynamicHeader, HEADER_SIZE, MAX_TABLE_ENTRIES};
use crate::layout::{first_free, overlaps, read_exact, Area};

/// One problem found by [`check_storage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// What is wrong.
    pub message: String,
    /// `true` when repair fixed it.
    pub repaired: bool,
}

/// The result of [`check_storage`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The footer at the end is valid (cookie and checksum).
    pub footer_ok: bool,
    /// The copy at offset 0 is valid (`None` for fixed disks).
    pub footer_copy_ok: Option<bool>,
    /// The dynamic header is valid (`None` for fixed disks).
    pub header_ok: Option<bool>,
    /// BAT indexes whose block lies (partly) beyond the footer or the end of the file.
    pub bat_entries_past_eof: Vec<u32>,
    /// Pairs of BAT indexes whose blocks overlap.
    pub overlapping_blocks: Vec<(u32, u32)>,
    /// BAT indexes whose block overlaps the footer copy, header, BAT or locator data.
    pub blocks_overlapping_metadata: Vec<u32>,
    /// Allocated blocks.
    pub allocated_blocks: u64,
    /// Every problem, in the order found.
    pub issues: Vec<Issue>,
}

impl CheckReport {
    /// `true` when nothing is wrong (or everything wrong was repaired).
    pub fn is_clean(&self) -> bool {
        self.issues.iter().all(|i| i.repaired)
    }

    fn issue(&mut self, message: impl Into<String>) {
        self.issues.push(Issue {
            message: message.into(),
            repaired: false,
        });
    }
}

/// Checks the image in `storage` without writing. Only I/O failures are errors; everything
/// malformed is reported.
pub fn check_storage<S: Storage + ?Sized>(s: &S) -> Result<CheckReport> {
    check_with(s, false)
}

/// Checks the image in `storage` and fixes what is safe (see the module docs).
pub fn repair_storage<S: Storage + ?Sized>(s: &S) -> Result<CheckReport> {
    check_with(s, true)
}

fn check_with<S: Storage + ?Sized>(s: &S, repair: bool) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let len = s.len()?;
    if len < FOOTER_SIZE as u64 {
        r.issue(format!("file of {len} bytes is too short for a footer"));
        return Ok(r);
    }
    let footer_pos = len - FOOTER_SIZE as u64;
    let end_bytes = read_exact(s, FOOTER_SIZE, footer_pos, "footer")?;
    let copy_bytes = read_exact(s, FOOTER_SIZE, 0, "footer copy")?;
    let end = Footer::parse(&end_bytes, true);
    let copy = Footer::parse(&copy_bytes, true);
    r.footer_ok = end.is_ok();
    if let Err(e) = &end {
        r.issue(format!("footer at the end: {e}"));
    }
    let footer = match (&end, &copy) {
        (Ok(f), _) => f.clone(),
        (Err(_), Ok(f)) if f.disk_type != DiskType::Fixed => f.clone(),
        _ => {
            match Footer::parse(&end_bytes, false).or_else(|_| Footer::parse(&copy_bytes, false)) {
                Ok(f) => f,
                Err(e) => {
                    r.issue(format!("no usable footer: {e}"));
                    return Ok(r);
                }
            }
        }
    };
    if footer.disk_type == DiskType::Fixed {
        if footer.current_size > footer_pos {
            r.issue(format!(
                "fixed disk of {} bytes is longer than the file",
                footer.current_size
            ));
        }
        return Ok(r);
    }
    r.footer_copy_ok = Some(copy.is_ok());
    if let Err(e) = &copy {
        r.issue(format!("footer copy at 0: {e}"));
    } else if end.is_ok() && end_bytes != copy_bytes {
        r.issue("the footer copy at 0 differs from the footer at the end");
    }

    let header_off = footer.data_offset.unwrap_or(0);
    if check_bounds(header_off, HEADER_SIZE as u64, len).is_err() {
        r.header_ok = Some(false);
        r.issue("dynamic header lies beyond the end of the file");
        return Ok(r);
    }
    let hb = read_exact(s, HEADER_SIZE, header_off, "dynamic header")?;
    let header = match DynamicHeader::parse(&hb, true) {
        Ok(h) => {
            r.header_ok = Some(true);
            h
        }
        Err(e) => {
            r.header_ok = Some(false);
            r.issue(format!("dynamic header: {e}"));
            match DynamicHeader::parse(&hb, false) {
                Ok(h) => h,
                Err(_) => return Ok(r),
            }
        }
    };
    let entries = header.max_table_entries.min(MAX_TABLE_ENTRIES);
    let bat_len = u64::from(entries) * 4;
    let Ok(bat_end) = check_bounds(header.table_offset, bat_len.div_ceil(512) * 512, len) else {
        r.issue("the BAT lies beyond the end of the file");
        return Ok(r);
    };
    if footer.current_size.div_ceil(u64::from(header.block_size)) > u64::from(entries) {
        r.issue("the BAT is too small for the virtual size");
    }
    let raw = read_exact(s, bat_len as usize, header.table_offset, "BAT")?;
    let bat = Bat::parse(&raw, entries as usize);
    let bitmap = header.bitmap_size();
    let total = bitmap + u64::from(header.block_size);
    let data_end = if r.footer_ok { footer_pos } else { len };
    let mut meta: Vec<Area> = vec![
        (0, FOOTER_SIZE as u64),
        (header_off, HEADER_SIZE as u64),
        (header.table_offset, bat_end - header.table_offset),
    ];
    if footer.disk_type == DiskType::Differencing {
        for l in &header.locators {
            if check_bounds(l.data_offset, u64::from(l.data_length), len).is_err() {
                r.issue(format!(
                    "parent locator {} at {} lies beyond the end of the file",
                    l.platform.as_string(),
                    l.data_offset
                ));
            } else {
                meta.push((l.data_offset, u64::from(l.data_length).div_ceil(512) * 512));
            }
        }
    }
    let mut starts = Vec::new();
    for (i, sector) in bat.allocated() {
        let off = u64::from(sector) * 512;
        r.allocated_blocks += 1;
        if off.saturating_add(total) > data_end {
            r.bat_entries_past_eof.push(i as u32);
            r.issue(format!(
                "BAT entry {i} points at {off}, beyond the image data"
            ));
        }
        if overlaps(&meta, off, total) {
            r.blocks_overlapping_metadata.push(i as u32);
            r.issue(format!("block {i} at {off} overlaps the metadata"));
        }
        starts.push((off, i as u32));
    }
    starts.sort_unstable();
    for w in starts.windows(2) {
        if w[0].0 + total > w[1].0 {
            r.overlapping_blocks.push((w[0].1, w[1].1));
            r.issue(format!("blocks {} and {} overlap", w[0].1, w[1].1));
        }
    }
    // As open: the footer at the end must lie past the metadata and the blocks.
    if r.footer_ok
        && first_free(&meta, starts.last().map(|&(o, _)| o), total).is_none_or(|n| n > footer_pos)
    {
        r.issue("the footer overlaps the image metadata");
    }
    if repair {
        repair_footers(s, &mut r, &end_bytes, &copy_bytes, &meta, &starts, total)?;
    }
    Ok(r)
}

fn repair_footers<S: Storage + ?Sized>(
    s: &S,
    r: &mut CheckReport,
    end_bytes: &[u8],
    copy_bytes: &[u8],
    meta: &[Area],
    starts: &[(u64, u32)],
    total: u64,
) -> Result<()> {
    let layout_ok = r.bat_entries_past_eof.is_empty()
        && r.overlapping_blocks.is_empty()
        && r.blocks_overlapping_metadata.is_empty()
        && r.header_ok == Some(true);
    if !r.footer_ok && r.footer_copy_ok == Some(true) && layout_ok {
        // `None` (past u64) only for a storage no file system holds: left alone.
        let Some(pos) = first_free(meta, starts.last().map(|&(o, _)| o), total) else {
            return Ok(());
        };
        s.set_len(pos)?;
        s.write_at(copy_bytes, pos)?;
        s.sync_data()?;
        r.footer_ok = true;
        mark(
            r,
            "footer at the end",
            &format!("rewrote the footer at {pos} from the copy at 0"),
        );
    } else if r.footer_ok && r.footer_copy_ok == Some(false) {
        s.write_at(end_bytes, 0)?;
        s.sync_data()?;
        r.footer_copy_ok = Some(true);
        mark(
            r,
            "footer copy at 0",
            "rewrote the copy at 0 from the footer at the end",
        );
    } else if r.footer_ok && r.footer_copy_ok == Some(true) && end_bytes != copy_bytes {
        s.write_at(end_bytes, 0)?;
        s.sync_data()?;
        mark(
            r,
            "the footer copy at 0 differs",
            "rewrote the copy at 0 from the footer at the end",
        );
    }
    Ok(())
}

fn mark(r: &mut CheckReport, prefix: &str, action: &str) {
    for i in r
        .issues
        .iter_mut()
        .filter(|i| i.message.starts_with(prefix))
    {
        i.repaired = true;
        i.message.push_str(&format!(" (repaired: {action})"));
    }
}
