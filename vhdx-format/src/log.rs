//! Log entries (MS-VHDX 2.3): headers, zero and data descriptors, data sectors; parsing one
//! entry and building one.
//!
//! An entry is a run of 4 KiB sectors inside the circular log: a 64-byte header ("loge", CRC-32C
//! over EntryLength bytes with the checksum zeroed, EntryLength, Tail, SequenceNumber,
//! DescriptorCount, LogGuid, FlushedFileOffset, LastFileOffset), 32-byte descriptors ("zero" or
//! "desc") filling the header sectors, then one 4 KiB data sector per "desc" descriptor
//! ("data", SequenceHigh, 4084 bytes, SequenceLow). The first 8 and last 4 bytes of the target
//! sector live in the descriptor. Finding the sequence to replay is in [`crate::replay`].

use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::guid;

/// Log sector size.
pub const SECTOR: u64 = 4096;
const SECTOR_USIZE: usize = 4096;

/// On-disk log entry header (64 bytes).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLogEntryHeader {
    /// "loge".
    pub signature: [u8; 4],
    /// CRC-32C over the entry.
    pub checksum: U32,
    /// Entry length, a multiple of 4 KiB.
    pub entry_length: U32,
    /// Log offset of the oldest entry still needed.
    pub tail: U32,
    /// Sequence number.
    pub sequence_number: U64,
    /// Number of descriptors.
    pub descriptor_count: U32,
    /// Reserved.
    pub reserved: U32,
    /// Must equal the header's LogGuid.
    pub log_guid: [u8; 16],
    /// File size that was durable when the entry was written.
    pub flushed_file_offset: U64,
    /// File size the entry assumes.
    pub last_file_offset: U64,
}

/// On-disk descriptor (32 bytes); "zero": `a` reserved, `b` ZeroLength; "desc": `a`
/// TrailingBytes, `b` LeadingBytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDescriptor {
    /// "zero" or "desc".
    pub signature: [u8; 4],
    /// Reserved (zero) or the last 4 bytes of the sector (desc).
    pub a: [u8; 4],
    /// ZeroLength (zero) or the first 8 bytes of the sector (desc).
    pub b: [u8; 8],
    /// Target file offset, 4 KiB aligned.
    pub file_offset: U64,
    /// Must equal the entry's sequence number.
    pub sequence_number: U64,
}

/// One update carried by a log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Zero `length` bytes at `file_offset`.
    Zero {
        /// Target offset.
        file_offset: u64,
        /// Byte count (multiple of 4 KiB).
        length: u64,
    },
    /// Write one 4 KiB sector at `file_offset`.
    Data {
        /// Target offset.
        file_offset: u64,
        /// The full sector.
        sector: Box<[u8]>,
    },
}

impl LogOp {
    /// Target range `[start, end)`; `None` if it overflows.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            LogOp::Zero {
                file_offset,
                length,
            } => file_offset.checked_add(*length).map(|e| (*file_offset, e)),
            LogOp::Data { file_offset, .. } => {
                file_offset.checked_add(SECTOR).map(|e| (*file_offset, e))
            }
        }
    }
}

/// A validated log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Offset of the entry within the log.
    pub position: u64,
    /// Entry length in bytes.
    pub length: u64,
    /// Log offset of the tail entry.
    pub tail: u64,
    /// Sequence number.
    pub sequence_number: u64,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
    /// Updates in order.
    pub ops: Vec<LogOp>,
}

/// Reads log bytes at a log position.
pub type LogReader<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), block_io::Error> + 'a;

/// Why a candidate entry is not valid (only used to skip it).
pub type Invalid = &'static str;

/// Number of header sectors needed for `count` descriptors.
pub fn header_sectors(count: u64) -> u64 {
    (64 + 32 * count).div_ceil(SECTOR)
}

/// Parses the entry at `position` of a log of `log_len` bytes. `read(pos, buf)` reads log
/// bytes at a log position (no wrap needed: this function splits wrapping reads).
/// `max_len` bounds the entry length (the caller passes what it can afford to read).
pub fn parse_entry(
    position: u64,
    log_len: u64,
    log_guid: &Uuid,
    max_len: u64,
    read: &mut LogReader<'_>,
) -> Result<Result<LogEntry, Invalid>, block_io::Error> {
    let mut first = vec![0u8; SECTOR_USIZE];
    read_wrapped(position, log_len, &mut first, read)?;
    let Ok((hdr, _)) = RawLogEntryHeader::read_from_prefix(&first) else {
        return Ok(Err("short"));
    };
    if &hdr.signature != b"loge" {
        return Ok(Err("signature"));
    }
    let length = u64::from(hdr.entry_length.get());
    let tail = u64::from(hdr.tail.get());
    let count = u64::from(hdr.descriptor_count.get());
    // MS-VHDX 2.3.1.1: EntryLength and Tail are 4 KiB multiples inside the log.
    if length == 0 || length % SECTOR != 0 || length > log_len || length > max_len {
        return Ok(Err("entry length"));
    }
    if tail % SECTOR != 0 || tail >= log_len {
        return Ok(Err("tail"));
    }
    if guid::from_disk(hdr.log_guid) != *log_guid {
        return Ok(Err("log guid"));
    }
    let hsec = header_sectors(count);
    if hsec * SECTOR > length {
        return Ok(Err("descriptor count"));
    }
    let len_usize = usize::try_from(length)
        .map_err(|_| block_io::Error::new(block_io::ErrorKind::Corrupt, "log entry too large"))?;
    let mut entry = vec![0u8; len_usize];
    entry[..SECTOR_USIZE].copy_from_slice(&first);
    if length > SECTOR {
        read_wrapped(
            (position + SECTOR) % log_len,
            log_len,
            &mut entry[SECTOR_USIZE..],
            read,
        )?;
    }
    let stored = hdr.checksum.get();
    entry[4..8].fill(0);
    if crc32c::crc32c(&entry) != stored {
        return Ok(Err("checksum"));
    }
    let seq = hdr.sequence_number.get();
    let mut ops = Vec::new();
    let mut data_sector = hsec;
    for i in 0..count as usize {
        let at = 64 + 32 * i;
        let Ok((d, _)) = RawDescriptor::read_from_prefix(&entry[at..]) else {
            return Ok(Err("descriptor"));
        };
        if d.sequence_number.get() != seq {
            return Ok(Err("descriptor sequence"));
        }
        let file_offset = d.file_offset.get();
        if file_offset % SECTOR != 0 {
            return Ok(Err("descriptor offset"));
        }
        match &d.signature {
            b"zero" => {
                let length = u64::from_le_bytes(d.b);
                if length % SECTOR != 0 || file_offset.checked_add(length).is_none() {
                    return Ok(Err("zero length"));
                }
                ops.push(LogOp::Zero {
                    file_offset,
                    length,
                });
            }
            b"desc" => {
                if file_offset.checked_add(SECTOR).is_none() {
                    return Ok(Err("descriptor offset"));
                }
                let start = data_sector as usize * SECTOR_USIZE;
                let Some(ds) = entry.get(start..start + SECTOR_USIZE) else {
                    return Ok(Err("data sectors exceed entry"));
                };
                if &ds[..4] != b"data"
                    || ds[4..8] != ((seq >> 32) as u32).to_le_bytes()
                    || ds[4092..] != (seq as u32).to_le_bytes()
                {
                    return Ok(Err("data sector"));
                }
                let mut sector = vec![0u8; SECTOR_USIZE].into_boxed_slice();
                sector[..8].copy_from_slice(&d.b);
                sector[8..4092].copy_from_slice(&ds[8..4092]);
                sector[4092..].copy_from_slice(&d.a);
                ops.push(LogOp::Data {
                    file_offset,
                    sector,
                });
                data_sector += 1;
            }
            _ => return Ok(Err("descriptor signature")),
        }
    }
    Ok(Ok(LogEntry {
        position,
        length,
        tail,
        sequence_number: seq,
        flushed_file_offset: hdr.flushed_file_offset.get(),
        last_file_offset: hdr.last_file_offset.get(),
        ops,
    }))
}

fn read_wrapped(
    pos: u64,
    log_len: u64,
    buf: &mut [u8],
    read: &mut LogReader<'_>,
) -> Result<(), block_io::Error> {
    let first = usize::try_from((log_len - pos).min(buf.len() as u64)).unwrap_or(buf.len());
    let (a, b) = buf.split_at_mut(first);
    read(pos, a)?;
    if !b.is_empty() {
        read(0, b)?;
    }
    Ok(())
}

/// The number of 4 KiB data sectors an entry of `log_len` bytes can carry at most.
pub fn max_data_sectors(log_len: u64) -> u64 {
    // Find the largest n with header_sectors(n) + n sectors <= log_len.
    let total = log_len / SECTOR;
    let mut n = total.saturating_sub(1);
    while n > 0 && header_sectors(n) + n > total {
        n -= 1;
    }
    n
}

/// Parameters of an entry to build.
#[derive(Debug, Clone, Copy)]
pub struct EntryParams {
    /// Sequence number.
    pub sequence_number: u64,
    /// LogGuid.
    pub log_guid: Uuid,
    /// Log offset of the tail.
    pub tail: u64,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
}

/// Builds an entry carrying full-sector writes `(file_offset, 4 KiB sector)`.
pub fn build_entry(p: &EntryParams, sectors: &[(u64, &[u8])]) -> Vec<u8> {
    let count = sectors.len() as u64;
    let hsec = header_sectors(count);
    let length = (hsec + count) * SECTOR;
    let mut out = vec![0u8; length as usize];
    let hdr = RawLogEntryHeader {
        signature: *b"loge",
        checksum: U32::new(0),
        entry_length: U32::new(length as u32),
        tail: U32::new(p.tail as u32),
        sequence_number: U64::new(p.sequence_number),
        descriptor_count: U32::new(count as u32),
        reserved: U32::new(0),
        log_guid: guid::to_disk(&p.log_guid),
        flushed_file_offset: U64::new(p.flushed_file_offset),
        last_file_offset: U64::new(p.last_file_offset),
    };
    out[..64].copy_from_slice(hdr.as_bytes());
    let seq = p.sequence_number;
    for (i, (off, data)) in sectors.iter().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[..8]);
        let mut a = [0u8; 4];
        a.copy_from_slice(&data[4092..4096]);
        let d = RawDescriptor {
            signature: *b"desc",
            a,
            b,
            file_offset: U64::new(*off),
            sequence_number: U64::new(seq),
        };
        out[64 + 32 * i..96 + 32 * i].copy_from_slice(d.as_bytes());
        let ds = ((hsec + i as u64) * SECTOR) as usize;
        out[ds..ds + 4].copy_from_slice(b"data");
        out[ds + 4..ds + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        out[ds + 8..ds + 4092].copy_from_slice(&data[8..4092]);
        out[ds + 4092..ds + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seq: u64) -> EntryParams {
        EntryParams {
            sequence_number: seq,
            log_guid: Uuid::from_u128(3),
            tail: 0,
            flushed_file_offset: 4 << 20,
            last_file_offset: 5 << 20,
        }
    }

    fn parse(log: &[u8], pos: u64, g: u128) -> Result<LogEntry, Invalid> {
        parse_entry(
            pos,
            log.len() as u64,
            &Uuid::from_u128(g),
            1 << 30,
            &mut |p, b| {
                b.copy_from_slice(&log[p as usize..p as usize + b.len()]);
                Ok(())
            },
        )
        .unwrap()
    }

    #[test]
    fn build_parse_round_trip_and_wrap() {
        let s1: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        let s2 = vec![0xAB; 4096];
        let e = build_entry(&params(9), &[(3 << 20, &s1), (3 << 20 | 4096, &s2)]);
        assert_eq!(e.len(), 3 * 4096);
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let p = parse(&log, 0, 3).unwrap();
        assert_eq!(p.sequence_number, 9);
        assert_eq!(p.ops.len(), 2);
        assert_eq!(
            p.ops[0],
            LogOp::Data {
                file_offset: 3 << 20,
                sector: s1.clone().into_boxed_slice()
            }
        );
        // Wrong log guid, flipped byte.
        assert!(parse(&log, 0, 4).is_err());
        log[5000] ^= 1;
        assert!(parse(&log, 0, 3).is_err());
        // Wrapping: put the first sector at the last log sector.
        let mut log = vec![0u8; 1 << 20];
        let end = log.len() - 4096;
        log[end..].copy_from_slice(&e[..4096]);
        log[..8192].copy_from_slice(&e[4096..]);
        let p = parse(&log, end as u64, 3).unwrap();
        assert_eq!(p.ops.len(), 2);
    }

    #[test]
    fn capacity() {
        assert_eq!(max_data_sectors(1 << 20), 254);
        let n = max_data_sectors(1 << 20);
        assert!(header_sectors(n) + n <= 256);
    }
}
