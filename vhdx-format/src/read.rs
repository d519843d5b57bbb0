//! The read side of [`VhdxFile`]: mapping a request through the in-memory BAT (MS-VHDX 2.5)
//! and, for PARTIALLY_PRESENT blocks, the sector bitmap (2.5.1.2, bit 0 of byte 0 = first
//! sector), then reading outside any lock; and `block_status`.

use block_io::{check_request, BlockStatus, Error, ErrorKind, Result, StatusRun, Storage};

use crate::bat::{BatEntry, BlockState};
use crate::error::corrupt_io;
use crate::file::VhdxFile;

impl<S: Storage> VhdxFile<S> {
    /// Presence bits of `count` sectors starting at sector `first` of `block` (which is
    /// PARTIALLY_PRESENT), LSB-first.
    pub(crate) fn sector_bits(&self, block: u64, first: u64, count: u64) -> Result<Vec<bool>> {
        let chunk = block / self.geo.chunk_ratio;
        let sectors_per_block =
            u64::from(self.geo.block_size) / u64::from(self.geo.logical_sector_size);
        let bit0 = (block % self.geo.chunk_ratio) * sectors_per_block + first;
        if let Some(bm) = self.bitmaps.read().get(&chunk) {
            return Ok((bit0..bit0 + count)
                .map(|i| bm[(i / 8) as usize] & (1 << (i % 8)) != 0)
                .collect());
        }
        let e = BatEntry::try_from(self.bitmap_entry(chunk))?;
        if e.state != BlockState::FullyPresent {
            return Err(corrupt_io(format!(
                "block {block} is partially present but its sector bitmap is not"
            )));
        }
        let byte0 = bit0 / 8;
        let byte1 = (bit0 + count).div_ceil(8);
        let mut bytes = vec![0u8; (byte1 - byte0) as usize];
        self.read_file(&mut bytes, e.file_offset + byte0)?;
        Ok((bit0..bit0 + count)
            .map(|i| bytes[(i / 8 - byte0) as usize] & (1 << (i % 8)) != 0)
            .collect())
    }

    pub(crate) fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(&self.info_inner(), offset, buf.len() as u64, false)?;
        let bs = u64::from(self.geo.block_size);
        let sector = u64::from(self.geo.logical_sector_size);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let block = off / bs;
            let in_block = off % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let e = BatEntry::try_from(self.entry(block))?;
            match e.state {
                BlockState::FullyPresent => self.read_file(piece, e.file_offset + in_block)?,
                BlockState::PartiallyPresent => {
                    let bits = self.sector_bits(block, in_block / sector, n as u64 / sector)?;
                    let mut i = 0;
                    while i < bits.len() {
                        let mut j = i;
                        while j < bits.len() && bits[j] == bits[i] {
                            j += 1;
                        }
                        let (s, t) = (i * sector as usize, j * sector as usize);
                        if bits[i] {
                            self.read_file(&mut piece[s..t], e.file_offset + in_block + s as u64)?;
                        } else {
                            piece[s..t].fill(0);
                        }
                        i = j;
                    }
                }
                _ => piece.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn status_of(&self, e: &BatEntry) -> BlockStatus {
        match e.state {
            BlockState::NotPresent => BlockStatus::Unallocated,
            BlockState::FullyPresent => BlockStatus::Data,
            BlockState::PartiallyPresent => BlockStatus::Data,
            _ => BlockStatus::Zero,
        }
    }

    pub(crate) fn block_status_inner(&self, offset: u64, len: u64) -> Result<StatusRun> {
        let info = self.info_inner();
        check_request(&info, offset, len, false)?;
        if len == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "empty status query"));
        }
        let bs = u64::from(self.geo.block_size);
        let sector = u64::from(self.geo.logical_sector_size);
        let end = offset + len;
        let block = offset / bs;
        let in_block = offset % bs;
        let e = BatEntry::try_from(self.entry(block))?;
        if e.state == BlockState::PartiallyPresent {
            let n = (bs - in_block).min(len);
            let bits = self.sector_bits(block, in_block / sector, n / sector)?;
            let run = bits.iter().take_while(|&&b| b == bits[0]).count() as u64 * sector;
            return Ok(if bits[0] {
                StatusRun {
                    status: BlockStatus::Data,
                    len: run,
                    file_offset: Some(e.file_offset + in_block),
                }
            } else {
                StatusRun {
                    status: BlockStatus::Unallocated,
                    len: run,
                    file_offset: None,
                }
            });
        }
        let status = self.status_of(&e);
        let mut run_end = ((block + 1) * bs).min(end);
        let mut b = block + 1;
        while run_end < end {
            let n = BatEntry::try_from(self.entry(b))?;
            if n.state == BlockState::PartiallyPresent || self.status_of(&n) != status {
                break;
            }
            if status == BlockStatus::Data && n.file_offset != e.file_offset + (b - block) * bs {
                break;
            }
            run_end = ((b + 1) * bs).min(end);
            b += 1;
        }
        Ok(StatusRun {
            status,
            len: run_end - offset,
            file_offset: (status == BlockStatus::Data).then_some(e.file_offset + in_block),
        })
    }
}
