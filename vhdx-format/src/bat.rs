//! The Block Allocation Table (MS-VHDX 2.5): entries, states and the geometry that places
//! payload and sector-bitmap entries.
//!
//! An entry is a u64: bits 0-2 the state, bits 20-63 the file offset in MiB. Payload blocks
//! and, for differencing disks, sector bitmap blocks interleave: after every `chunk_ratio`
//! payload entries comes one sector bitmap entry (2.5.1), where
//! `chunk_ratio = 2^23 * logical_sector_size / block_size`.

use crate::error::{corrupt, FormatError};
use crate::header::MIB;

/// Payload block states (MS-VHDX 2.5.1.1) and sector bitmap states (2.5.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// 0: not present (a differencing disk's parent supplies it; else zeros).
    NotPresent,
    /// 1: contents undefined (read as zeros).
    Undefined,
    /// 2: reads as zeros.
    Zero,
    /// 3: unmapped (read as zeros).
    Unmapped,
    /// 6: fully present at the entry's offset (sector bitmap: present).
    FullyPresent,
    /// 7: partially present; the sector bitmap says which sectors (differencing only).
    PartiallyPresent,
}

impl BlockState {
    /// `true` for the states whose entry points at a block in the file (FULLY_ and
    /// PARTIALLY_PRESENT).
    pub fn has_data(self) -> bool {
        matches!(
            self,
            BlockState::FullyPresent | BlockState::PartiallyPresent
        )
    }
}

/// State values as stored.
pub mod state {
    /// PAYLOAD_BLOCK_NOT_PRESENT / SB_BLOCK_NOT_PRESENT.
    pub const NOT_PRESENT: u64 = 0;
    /// PAYLOAD_BLOCK_UNDEFINED.
    pub const UNDEFINED: u64 = 1;
    /// PAYLOAD_BLOCK_ZERO.
    pub const ZERO: u64 = 2;
    /// PAYLOAD_BLOCK_UNMAPPED.
    pub const UNMAPPED: u64 = 3;
    /// PAYLOAD_BLOCK_FULLY_PRESENT / SB_BLOCK_PRESENT.
    pub const FULLY_PRESENT: u64 = 6;
    /// PAYLOAD_BLOCK_PARTIALLY_PRESENT.
    pub const PARTIALLY_PRESENT: u64 = 7;
}

/// Mask of the file-offset bits (bits 20-63).
pub const OFFSET_MASK: u64 = !0xF_FFFF;

/// A validated BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatEntry {
    /// State.
    pub state: BlockState,
    /// File offset in bytes (1 MiB aligned; 0 for states without data).
    pub file_offset: u64,
}

impl TryFrom<u64> for BatEntry {
    type Error = FormatError;
    fn try_from(raw: u64) -> Result<Self, FormatError> {
        let st = match raw & 7 {
            state::NOT_PRESENT => BlockState::NotPresent,
            state::UNDEFINED => BlockState::Undefined,
            state::ZERO => BlockState::Zero,
            // 5 was PAYLOAD_BLOCK_UNMAPPED in draft 0.95 of the spec; qemu reads it as zeros.
            state::UNMAPPED | 5 => BlockState::Unmapped,
            state::FULLY_PRESENT => BlockState::FullyPresent,
            state::PARTIALLY_PRESENT => BlockState::PartiallyPresent,
            s => return Err(corrupt("BAT", format!("entry state {s}"))),
        };
        let file_offset = raw & OFFSET_MASK;
        // MS-VHDX 2.5.1: present blocks lie beyond the header section (offset >= 1 MiB).
        if st.has_data() && file_offset < MIB {
            return Err(corrupt(
                "BAT",
                format!("present block at offset {file_offset}"),
            ));
        }
        Ok(BatEntry {
            state: st,
            file_offset,
        })
    }
}

impl BatEntry {
    /// Encodes an entry.
    pub fn encode(state: u64, file_offset: u64) -> u64 {
        (file_offset & OFFSET_MASK) | (state & 7)
    }
}

/// One block's share of a request split at block boundaries (see [`Geometry::pieces`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Start of the piece, counted from the start of the request.
    pub at: u64,
    /// The payload block.
    pub block: u64,
    /// Offset of the piece inside the block.
    pub in_block: u64,
    /// Length in bytes (never 0; never past the block's end).
    pub len: u64,
}

impl Piece {
    /// The piece's bytes within the request buffer.
    pub(crate) fn range(&self) -> std::ops::Range<usize> {
        // `at + len` is at most the request length, which came from a buffer.
        self.at as usize..(self.at + self.len) as usize
    }
}

/// Where things sit in the BAT for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Block size in bytes.
    pub block_size: u32,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Number of payload blocks.
    pub data_blocks: u64,
    /// Number of BAT entries the image needs.
    pub total_entries: u64,
    /// Differencing layout (sector bitmap entries present).
    pub has_parent: bool,
}

impl Geometry {
    /// Computes the geometry from validated metadata values (MS-VHDX 2.5).
    pub fn new(
        block_size: u32,
        logical_sector_size: u32,
        virtual_size: u64,
        has_parent: bool,
    ) -> Result<Self, FormatError> {
        if block_size == 0 || logical_sector_size == 0 {
            return Err(corrupt("BAT", "zero block or sector size"));
        }
        let chunk_ratio = ((1u64 << 23) * u64::from(logical_sector_size)) / u64::from(block_size);
        if chunk_ratio == 0 {
            return Err(corrupt("BAT", "chunk ratio is zero"));
        }
        let data_blocks = virtual_size.div_ceil(u64::from(block_size));
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let total_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Ok(Geometry {
            block_size,
            logical_sector_size,
            virtual_size,
            chunk_ratio,
            data_blocks,
            total_entries,
            has_parent,
        })
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        (chunk + 1) * self.chunk_ratio + chunk
    }

    /// Bytes of BAT the image needs, rounded up to 1 MiB.
    pub fn bat_bytes(&self) -> u64 {
        (self.total_entries * 8).div_ceil(MIB) * MIB
    }

    /// Splits the virtual range `[offset, offset + len)` (checked by the caller) at block
    /// boundaries, in order.
    pub(crate) fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
        let bs = u64::from(self.block_size);
        let mut at = 0;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let off = offset + at;
            let (block, in_block) = (off / bs, off % bs);
            let piece = Piece {
                at,
                block,
                in_block,
                len: (bs - in_block).min(len - at),
            };
            at += piece.len;
            Some(piece)
        })
    }

    /// `true` if BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        (i + 1) % (self.chunk_ratio + 1) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_decoding() {
        let e = BatEntry::try_from(BatEntry::encode(state::FULLY_PRESENT, 5 * MIB)).unwrap();
        assert_eq!(e.state, BlockState::FullyPresent);
        assert_eq!(e.file_offset, 5 * MIB);
        assert!(BatEntry::try_from(4).is_err());
        assert_eq!(BatEntry::try_from(5).unwrap().state, BlockState::Unmapped);
        assert!(BatEntry::try_from(state::FULLY_PRESENT).is_err());
        assert_eq!(
            BatEntry::try_from(state::ZERO).unwrap().state,
            BlockState::Zero
        );
    }

    #[test]
    fn geometry_matches_spec_examples() {
        // 512-byte sectors, 32 MiB blocks: chunk ratio 2^32/2^25 = 128.
        let g = Geometry::new(32 << 20, 512, 10 << 30, false).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 320);
        assert_eq!(g.total_entries, 320 + 319 / 128);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert!(g.is_bitmap_index(128));
        assert!(!g.is_bitmap_index(129));
        let d = Geometry::new(32 << 20, 512, 10 << 30, true).unwrap();
        assert_eq!(d.total_entries, 3 * 129);
        // 4 KiB sectors, 1 MiB blocks: chunk ratio 32768.
        let g = Geometry::new(1 << 20, 4096, 1 << 30, false).unwrap();
        assert_eq!(g.chunk_ratio, 32768);
    }

    #[test]
    fn pieces_split_at_block_boundaries() {
        let g = Geometry::new(1 << 20, 512, 8 << 20, false).unwrap();
        let p: Vec<(u64, u64, u64, u64)> = g
            .pieces((1 << 20) - 512, (2 << 20) + 1024)
            .map(|p| (p.at, p.block, p.in_block, p.len))
            .collect();
        assert_eq!(
            p,
            vec![
                (0, 0, (1 << 20) - 512, 512),
                (512, 1, 0, 1 << 20),
                ((1 << 20) + 512, 2, 0, 1 << 20),
                ((2 << 20) + 512, 3, 0, 512),
            ]
        );
        assert_eq!(g.pieces(4096, 0).count(), 0);
    }
}
