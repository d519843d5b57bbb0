//! The Block Allocation Table (VHD spec 1.0, "Block Allocation Table and Data Blocks") and
//! the per-block sector bitmaps.
//!
//! The BAT is an array of big-endian u32 sector offsets, `0xFFFFFFFF` = not allocated. It
//! lives in memory as atomics so the I/O hot path reads it without a lock; only allocation
//! (serialised by the file's allocation lock) changes it. A block on disk is its sector bitmap
//! (padded to 512 bytes), then the data. Bitmap bit order is **MSB-first** (0x80 of byte 0 is
//! the block's first sector), the opposite of VHDX.

use std::sync::atomic::{AtomicU32, Ordering};

/// BAT value of an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;

/// BAT entries in one 512-byte sector.
pub const ENTRIES_PER_SECTOR: usize = 128;

/// The in-memory BAT.
#[derive(Debug)]
pub struct Bat {
    entries: Vec<AtomicU32>,
}

impl Bat {
    /// Parses `count` big-endian entries from `bytes` (which must hold at least `4 * count`).
    pub fn parse(bytes: &[u8], count: usize) -> Self {
        let entries = bytes
            .chunks_exact(4)
            .take(count)
            .map(|c| AtomicU32::new(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        Bat { entries }
    }

    /// A BAT of `count` unallocated entries.
    pub fn empty(count: usize) -> Self {
        Bat {
            entries: (0..count).map(|_| AtomicU32::new(UNALLOCATED)).collect(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sector offset of block `i`, if allocated.
    pub fn get(&self, i: usize) -> Option<u32> {
        match self.entries.get(i).map(|e| e.load(Ordering::Acquire)) {
            Some(UNALLOCATED) | None => None,
            Some(s) => Some(s),
        }
    }

    /// Sets block `i` to `sector`.
    pub fn set(&self, i: usize, sector: u32) {
        if let Some(e) = self.entries.get(i) {
            e.store(sector, Ordering::Release);
        }
    }

    /// Every allocated `(block, sector)` pair.
    pub fn allocated(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (0..self.entries.len()).filter_map(|i| self.get(i).map(|s| (i, s)))
    }

    /// BAT sector number `sector` (entries `sector * 128 ..`) as stored in the file, with the
    /// entries for which `hide` is true written as unallocated, and the sector's byte offset
    /// inside the table. Entries past the end are 0xFF padding.
    pub fn sector_bytes(&self, sector: usize, hide: impl Fn(usize) -> bool) -> (u64, [u8; 512]) {
        let first = sector * ENTRIES_PER_SECTOR;
        let mut out = [0xFFu8; 512];
        for (k, chunk) in out.chunks_exact_mut(4).enumerate() {
            let idx = first + k;
            let v = match self.entries.get(idx) {
                Some(_) if hide(idx) => UNALLOCATED,
                Some(e) => e.load(Ordering::Acquire),
                None => UNALLOCATED,
            };
            chunk.copy_from_slice(&v.to_be_bytes());
        }
        (first as u64 * 4, out)
    }
}

/// `true` if sector `i` is marked present in `bitmap` (MSB-first).
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap
        .get(i / 8)
        .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

/// Sets or clears sectors `[start, end)` in `bitmap`.
pub fn set_bits(bitmap: &mut [u8], start: usize, end: usize, value: bool) {
    for i in start..end {
        if let Some(b) = bitmap.get_mut(i / 8) {
            if value {
                *b |= 0x80 >> (i % 8);
            } else {
                *b &= !(0x80 >> (i % 8));
            }
        }
    }
}

/// Length of the run of equal bits starting at `start`, looking no further than `end`.
pub fn run_len(bitmap: &[u8], start: usize, end: usize) -> usize {
    if start >= end {
        return 0;
    }
    let v = bit(bitmap, start);
    let mut i = start;
    // A byte at a time (this runs on every differencing read).
    while i < end {
        let byte = bitmap.get(i / 8).copied().unwrap_or(0);
        // Bits that differ from `v`, sector `i` moved to the byte's top bit.
        let differ = (u32::from(if v { !byte } else { byte }) << (i % 8)) & 0xFF;
        if differ != 0 {
            return (i + differ.leading_zeros() as usize - 24).min(end) - start;
        }
        i += 8 - i % 8;
    }
    end - start
}

/// `true` if every sector of `[start, end)` is present.
pub fn all_set(bitmap: &[u8], start: usize, end: usize) -> bool {
    start >= end || (bit(bitmap, start) && run_len(bitmap, start, end) == end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first() {
        let mut bm = vec![0u8; 4];
        set_bits(&mut bm, 0, 1, true);
        assert_eq!(bm[0], 0x80);
        set_bits(&mut bm, 9, 12, true);
        assert_eq!(bm[1], 0x70);
        assert_eq!(run_len(&bm, 9, 32), 3);
        assert_eq!(run_len(&bm, 1, 32), 8);
        assert!(all_set(&bm, 9, 12));
        assert!(!all_set(&bm, 8, 12));
        set_bits(&mut bm, 10, 11, false);
        assert_eq!(bm[1], 0x50);
    }

    /// `run_len` against a bit-by-bit model on every start and end over mixed bytes.
    #[test]
    fn run_len_matches_bitwise_model() {
        let bm = [0x00, 0xFF, 0x0F, 0xF0, 0xAA, 0xFF, 0xFF, 0x01, 0x00, 0x80];
        for start in 0..bm.len() * 8 + 4 {
            for end in start..start + 40 {
                let v = bit(&bm, start);
                let n = (start..end).take_while(|&i| bit(&bm, i) == v).count();
                assert_eq!(run_len(&bm, start, end), n, "start {start} end {end}");
            }
        }
    }

    #[test]
    fn bat_sector() {
        let bat = Bat::empty(131);
        bat.set(128, 9);
        bat.set(129, 7);
        bat.set(130, 5);
        let (off, s) = bat.sector_bytes(1, |i| i == 130);
        assert_eq!(off, 512);
        assert_eq!(&s[0..8], &[0, 0, 0, 9, 0, 0, 0, 7]);
        // Hidden entries and padding read as unallocated.
        assert_eq!(&s[8..16], &[0xff; 8]);
        assert_eq!(
            bat.allocated().collect::<Vec<_>>(),
            vec![(128, 9), (129, 7), (130, 5)]
        );
    }
}
