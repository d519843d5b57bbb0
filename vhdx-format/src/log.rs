//! Log entries (MS-VHDX 2.3): headers, zero and data descriptors, data sectors; parsing one
//! entry in bounded pieces and building one.
//!
//! An entry is a run of 4 KiB sectors inside the circular log: a 64-byte header ("loge", CRC-32C
//! over EntryLength bytes with the checksum zeroed, EntryLength, Tail, SequenceNumber,
//! DescriptorCount, LogGuid, FlushedFileOffset, LastFileOffset), 32-byte descriptors ("zero" or
//! "desc", 126 in the first sector, 128 in each further one), then one 4 KiB data sector per
//! "desc" descriptor ("data", SequenceHigh, 4084 bytes, SequenceLow). The first 8 and last 4
//! bytes of the target sector live in the descriptor. Finding the sequence to replay is in
//! [`crate::replay`].
//!
//! Everything read from disk is bounded before it sizes a read: the header sector alone decides
//! whether EntryLength can match its DescriptorCount; the descriptor sectors are then read and
//! checked (which fixes the exact EntryLength), then the data sectors, in pieces of at most
//! [`MAX_READ`] that start at one sector and double, the CRC accumulated with
//! `crc32c_append`. Parsing stops at the first sector that cannot belong to the entry, so a
//! bogus header costs a few sectors however long it claims to be. No sector after the first of
//! a valid entry starts with "loge" (descriptor sectors start with a descriptor, data sectors
//! with "data"), which is what lets [`crate::replay`] scan a log in linear time.

use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::corrupt_io;
use crate::guid;

/// Log sector size.
pub const SECTOR: u64 = 4096;
const SECTOR_USIZE: usize = 4096;
/// Largest single read the log code issues, in bytes.
pub const MAX_READ: usize = 1 << 20;
/// Descriptors in the first header sector (after the 64-byte header).
const FIRST_SECTOR_DESCRIPTORS: u64 = 126;
/// Descriptors in each further header sector.
const SECTOR_DESCRIPTORS: u64 = 128;

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

/// One update carried by a log entry. Data updates name where their payload lies in the log
/// instead of holding it, so a replay plan costs memory per update, not per byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Zero `length` bytes at `file_offset`.
    Zero {
        /// Target offset.
        file_offset: u64,
        /// Byte count (multiple of 4 KiB).
        length: u64,
    },
    /// Write one 4 KiB sector at `file_offset`: `leading`, bytes 8..4092 of the data sector at
    /// log position `data_position`, then `trailing`.
    Data {
        /// Target offset.
        file_offset: u64,
        /// Log position of the data sector.
        data_position: u64,
        /// The first 8 bytes of the sector (from the descriptor).
        leading: [u8; 8],
        /// The last 4 bytes of the sector (from the descriptor).
        trailing: [u8; 4],
    },
}

impl LogOp {
    /// Target range `[start, end)`; `None` if it overflows.
    pub fn range(&self) -> Option<(u64, u64)> {
        let (start, len) = match self {
            LogOp::Zero {
                file_offset,
                length,
            } => (*file_offset, *length),
            LogOp::Data { file_offset, .. } => (*file_offset, SECTOR),
        };
        start.checked_add(len).map(|e| (start, e))
    }
}

/// Builds the target sector of a data update from its data sector and descriptor bytes.
pub fn assemble_sector(data_sector: &[u8], leading: &[u8; 8], trailing: &[u8; 4]) -> Vec<u8> {
    let mut sector = vec![0u8; SECTOR_USIZE];
    sector[..8].copy_from_slice(leading);
    if let (Some(dst), Some(src)) = (sector.get_mut(8..4092), data_sector.get(8..4092)) {
        dst.copy_from_slice(src);
    }
    sector[4092..].copy_from_slice(trailing);
    sector
}

/// A validated log entry header; its updates are read with [`entry_ops`].
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
    /// Number of descriptors.
    pub descriptor_count: u64,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
}

/// Reads log bytes at a log position.
pub type LogReader<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), block_io::Error> + 'a;

/// Why a candidate entry is not valid (only used to skip it).
pub type Invalid = &'static str;

/// Number of header sectors needed for `count` descriptors (`count` is a u32 on disk, so this
/// cannot overflow).
pub fn header_sectors(count: u64) -> u64 {
    (64 + 32 * count).div_ceil(SECTOR)
}

/// Why walking an entry stopped early.
enum Stop {
    /// The bytes are not a valid entry.
    Invalid(Invalid),
    /// Reading failed, or the visitor refused an update.
    Io(block_io::Error),
}

impl From<block_io::Error> for Stop {
    fn from(e: block_io::Error) -> Self {
        Stop::Io(e)
    }
}

/// A descriptor decoded and checked against its entry.
enum Descriptor {
    Zero {
        file_offset: u64,
        length: u64,
    },
    Data {
        file_offset: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

/// Checks the 64-byte header in `first` (the entry's first sector) using nothing else:
/// signature, LogGuid, Tail, and that EntryLength can hold the descriptor sectors and at most
/// one data sector per descriptor.
fn check_header(first: &[u8], log_len: u64, log_guid: &Uuid) -> Result<LogEntry, Invalid> {
    let Ok((hdr, _)) = RawLogEntryHeader::read_from_prefix(first) else {
        return Err("short");
    };
    if &hdr.signature != b"loge" {
        return Err("signature");
    }
    if guid::from_disk(hdr.log_guid) != *log_guid {
        return Err("log guid");
    }
    let length = u64::from(hdr.entry_length.get());
    let tail = u64::from(hdr.tail.get());
    let count = u64::from(hdr.descriptor_count.get());
    // MS-VHDX 2.3.1.1: EntryLength and Tail are 4 KiB multiples inside the log.
    if length == 0 || length % SECTOR != 0 || length > log_len {
        return Err("entry length");
    }
    if tail % SECTOR != 0 || tail >= log_len {
        return Err("tail");
    }
    // MS-VHDX 2.3.1: an entry is its descriptor sectors plus one data sector per data
    // descriptor, so EntryLength lies between those two bounds (u32 inputs: no overflow).
    let hsec = header_sectors(count);
    if hsec * SECTOR > length {
        return Err("descriptor count");
    }
    if length > (hsec + count) * SECTOR {
        return Err("entry length exceeds its descriptors");
    }
    Ok(LogEntry {
        position: 0,
        length,
        tail,
        sequence_number: hdr.sequence_number.get(),
        descriptor_count: count,
        flushed_file_offset: hdr.flushed_file_offset.get(),
        last_file_offset: hdr.last_file_offset.get(),
    })
}

/// Decodes and checks one 32-byte descriptor of the entry with sequence number `seq`.
fn decode_descriptor(bytes: &[u8], seq: u64) -> Result<Descriptor, Invalid> {
    let Ok((d, _)) = RawDescriptor::read_from_prefix(bytes) else {
        return Err("descriptor");
    };
    if d.sequence_number.get() != seq {
        return Err("descriptor sequence");
    }
    let file_offset = d.file_offset.get();
    // MS-VHDX 2.3.1.2, 2.3.1.3: FileOffset is 4 KiB aligned; ZeroLength a 4 KiB multiple.
    if file_offset % SECTOR != 0 {
        return Err("descriptor offset");
    }
    match &d.signature {
        b"zero" => {
            let length = u64::from_le_bytes(d.b);
            if length % SECTOR != 0 || file_offset.checked_add(length).is_none() {
                return Err("zero length");
            }
            Ok(Descriptor::Zero {
                file_offset,
                length,
            })
        }
        b"desc" => {
            if file_offset.checked_add(SECTOR).is_none() {
                return Err("descriptor offset");
            }
            Ok(Descriptor::Data {
                file_offset,
                leading: d.b,
                trailing: d.a,
            })
        }
        _ => Err("descriptor signature"),
    }
}

/// Reads `count` consecutive log sectors from log position `pos`, in pieces that start at one
/// sector and double up to [`MAX_READ`], calling `f` on each sector in order. `f` stops the
/// walk by returning an error; at most twice the sectors walked are read.
fn for_each_sector(
    pos: u64,
    count: u64,
    log_len: u64,
    read: &mut LogReader<'_>,
    mut f: impl FnMut(&[u8]) -> Result<(), Stop>,
) -> Result<(), Stop> {
    const MAX_SECTORS: u64 = (MAX_READ / SECTOR_USIZE) as u64;
    let mut buf = Vec::new();
    let mut batch = 1;
    let mut done = 0;
    let mut at = pos % log_len;
    while done < count {
        let n = batch.min(count - done);
        // n <= MAX_SECTORS: the buffer is at most MAX_READ bytes.
        buf.resize(n as usize * SECTOR_USIZE, 0);
        read_wrapped(at, log_len, &mut buf, read)?;
        for sector in buf.chunks_exact(SECTOR_USIZE) {
            f(sector)?;
        }
        done += n;
        // at < log_len <= u32::MAX and n * SECTOR <= MAX_READ: no overflow.
        at = (at + n * SECTOR) % log_len;
        batch = (batch * 2).min(MAX_SECTORS);
    }
    Ok(())
}

/// Walks the descriptors of `entry` whose first sector is `first`: checks each one, feeds the
/// header sectors after the first to `crc`, and calls `visit(index among data descriptors, descriptor)`.
/// Returns the number of data descriptors.
fn walk_descriptors(
    entry: &LogEntry,
    first: &[u8],
    log_len: u64,
    read: &mut LogReader<'_>,
    crc: &mut u32,
    visit: &mut dyn FnMut(u64, Descriptor) -> Result<(), Stop>,
) -> Result<u64, Stop> {
    let seq = entry.sequence_number;
    let count = entry.descriptor_count;
    let mut data = 0u64;
    let mut index = 0u64;
    let mut take = |sector: &[u8], skip: usize, n: u64| -> Result<(), Stop> {
        for i in 0..n {
            let at = skip + 32 * i as usize;
            let d =
                decode_descriptor(sector.get(at..).unwrap_or(&[]), seq).map_err(Stop::Invalid)?;
            let is_data = matches!(d, Descriptor::Data { .. });
            visit(data, d)?;
            if is_data {
                data += 1;
            }
        }
        Ok(())
    };
    let in_first = count.min(FIRST_SECTOR_DESCRIPTORS);
    take(first, 64, in_first)?;
    index += in_first;
    let hsec = header_sectors(count);
    for_each_sector(entry.position + SECTOR, hsec - 1, log_len, read, |sector| {
        *crc = crc32c::crc32c_append(*crc, sector);
        // Every header sector after the first starts with a descriptor (hsec is the
        // smallest count holding them all), so none of them can start with "loge".
        let n = (count - index).min(SECTOR_DESCRIPTORS);
        take(sector, 0, n)?;
        index += n;
        Ok(())
    })?;
    Ok(data)
}

/// Parses the entry at `position` of a log of `log_len` bytes. `read(pos, buf)` reads log
/// bytes at a log position (no wrap needed: this function splits wrapping reads, and no single
/// read exceeds [`MAX_READ`]). Returns `Ok(Err(reason))` for bytes that are not a valid entry.
pub fn parse_entry(
    position: u64,
    log_len: u64,
    log_guid: &Uuid,
    read: &mut LogReader<'_>,
) -> Result<Result<LogEntry, Invalid>, block_io::Error> {
    if !is_sector_in_log(position, log_len) {
        return Ok(Err("position"));
    }
    let mut first = vec![0u8; SECTOR_USIZE];
    read_wrapped(position, log_len, &mut first, read)?;
    let mut entry = match check_header(&first, log_len, log_guid) {
        Ok(e) => e,
        Err(why) => return Ok(Err(why)),
    };
    entry.position = position;
    match check_body(&entry, &first, log_len, read) {
        Ok(()) => Ok(Ok(entry)),
        Err(Stop::Invalid(why)) => Ok(Err(why)),
        Err(Stop::Io(e)) => Err(e),
    }
}

/// Checks everything after the header: descriptors, the exact EntryLength, data sectors and
/// the CRC.
fn check_body(
    entry: &LogEntry,
    first: &[u8],
    log_len: u64,
    read: &mut LogReader<'_>,
) -> Result<(), Stop> {
    let seq = entry.sequence_number;
    // MS-VHDX 2.3.1.1: the checksum covers the whole entry with the checksum field zeroed.
    let mut crc = crc32c::crc32c_append(0, &first[..4]);
    crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc = crc32c::crc32c_append(crc, &first[8..]);
    let stored = u32::from_le_bytes([first[4], first[5], first[6], first[7]]);
    let data = walk_descriptors(entry, first, log_len, read, &mut crc, &mut |_, _| Ok(()))?;
    // MS-VHDX 2.3.1: EntryLength is exactly the header sectors plus one data sector per data
    // descriptor (data <= count < 2^32: no overflow).
    let hsec = header_sectors(entry.descriptor_count);
    if entry.length != (hsec + data) * SECTOR {
        return Err(Stop::Invalid("entry length"));
    }
    let high = ((seq >> 32) as u32).to_le_bytes();
    let low = (seq as u32).to_le_bytes();
    for_each_sector(entry.position + hsec * SECTOR, data, log_len, read, |ds| {
        // MS-VHDX 2.3.1.4: "data", SequenceHigh, 4084 bytes, SequenceLow.
        if &ds[..4] != b"data" || ds[4..8] != high || ds[4092..] != low {
            return Err(Stop::Invalid("data sector"));
        }
        crc = crc32c::crc32c_append(crc, ds);
        Ok(())
    })?;
    if crc != stored {
        return Err(Stop::Invalid("checksum"));
    }
    Ok(())
}

/// Calls `visit` with every update of the entry at `position` in order. The entry was found
/// valid by [`parse_entry`]; its header and descriptor sectors are read again (in pieces of at
/// most [`MAX_READ`]), data sectors are not: data updates name their log position. Bytes that
/// no longer form an entry are a `Corrupt` error.
pub fn entry_ops(
    position: u64,
    log_len: u64,
    log_guid: &Uuid,
    read: &mut LogReader<'_>,
    visit: &mut dyn FnMut(LogOp) -> Result<(), block_io::Error>,
) -> Result<LogEntry, block_io::Error> {
    let changed = |why: Invalid| corrupt_io(format!("log entry at {position} changed: {why}"));
    if !is_sector_in_log(position, log_len) {
        return Err(changed("position"));
    }
    let mut first = vec![0u8; SECTOR_USIZE];
    read_wrapped(position, log_len, &mut first, read)?;
    let mut entry = check_header(&first, log_len, log_guid).map_err(changed)?;
    entry.position = position;
    let hsec = header_sectors(entry.descriptor_count);
    let mut crc = 0;
    let mut each = |k: u64, d: Descriptor| -> Result<(), Stop> {
        let op = match d {
            Descriptor::Zero {
                file_offset,
                length,
            } => LogOp::Zero {
                file_offset,
                length,
            },
            Descriptor::Data {
                file_offset,
                leading,
                trailing,
            } => LogOp::Data {
                file_offset,
                // position < log_len <= u32::MAX and the entry fits the log: no overflow.
                data_position: (position + (hsec + k) * SECTOR) % log_len,
                leading,
                trailing,
            },
        };
        visit(op).map_err(Stop::Io)
    };
    match walk_descriptors(&entry, &first, log_len, read, &mut crc, &mut each) {
        Ok(_) => Ok(entry),
        Err(Stop::Invalid(why)) => Err(changed(why)),
        Err(Stop::Io(e)) => Err(e),
    }
}

/// `true` if `position` is a sector of a (non-empty, whole-sector) log of `log_len` bytes.
fn is_sector_in_log(position: u64, log_len: u64) -> bool {
    log_len % SECTOR == 0 && position < log_len && position % SECTOR == 0
}

/// Reads `buf` at log position `pos`, wrapping at the end of the log.
fn read_wrapped(
    pos: u64,
    log_len: u64,
    buf: &mut [u8],
    read: &mut LogReader<'_>,
) -> Result<(), block_io::Error> {
    if log_len == 0 {
        return Err(corrupt_io("the log is empty"));
    }
    let mut at = pos;
    let mut rest = buf;
    while !rest.is_empty() {
        if at >= log_len {
            at = 0;
        }
        let room = log_len - at;
        let n = usize::try_from(room).map_or(rest.len(), |r| r.min(rest.len()));
        let (a, b) = rest.split_at_mut(n);
        read(at, a)?;
        at += n as u64;
        rest = b;
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

    fn reader(log: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), block_io::Error> + '_ {
        |p, b| {
            b.copy_from_slice(&log[p as usize..p as usize + b.len()]);
            Ok(())
        }
    }

    fn parse(log: &[u8], pos: u64, g: u128) -> Result<LogEntry, Invalid> {
        parse_entry(pos, log.len() as u64, &Uuid::from_u128(g), &mut reader(log)).unwrap()
    }

    fn ops(log: &[u8], pos: u64) -> Vec<LogOp> {
        let mut out = Vec::new();
        entry_ops(
            pos,
            log.len() as u64,
            &Uuid::from_u128(3),
            &mut reader(log),
            &mut |op| {
                out.push(op);
                Ok(())
            },
        )
        .unwrap();
        out
    }

    /// Raw header bytes with the given fields and a checksum over the header sector alone.
    fn raw_header(length: u32, count: u32, seq: u64) -> Vec<u8> {
        let hdr = RawLogEntryHeader {
            signature: *b"loge",
            checksum: U32::new(0),
            entry_length: U32::new(length),
            tail: U32::new(0),
            sequence_number: U64::new(seq),
            descriptor_count: U32::new(count),
            reserved: U32::new(0),
            log_guid: guid::to_disk(&Uuid::from_u128(3)),
            flushed_file_offset: U64::new(0),
            last_file_offset: U64::new(0),
        };
        let mut s = vec![0u8; 4096];
        s[..64].copy_from_slice(hdr.as_bytes());
        // Valid-looking "zero" descriptors in the rest of the sector.
        for i in 0..(count as usize).min(126) {
            let d = RawDescriptor {
                signature: *b"zero",
                a: [0; 4],
                b: 4096u64.to_le_bytes(),
                file_offset: U64::new(4 << 20),
                sequence_number: U64::new(seq),
            };
            s[64 + 32 * i..96 + 32 * i].copy_from_slice(d.as_bytes());
        }
        let crc = crc32c::crc32c(&s);
        s[4..8].copy_from_slice(&crc.to_le_bytes());
        s
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
        assert_eq!(p.descriptor_count, 2);
        let o = ops(&log, 0);
        assert_eq!(o.len(), 2);
        let LogOp::Data {
            file_offset,
            data_position,
            leading,
            trailing,
        } = &o[0]
        else {
            panic!("not a data update")
        };
        assert_eq!((*file_offset, *data_position), (3 << 20, 4096));
        let dp = *data_position as usize;
        assert_eq!(assemble_sector(&log[dp..dp + 4096], leading, trailing), s1);
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
        assert_eq!(p.descriptor_count, 2);
        let o = ops(&log, end as u64);
        assert!(matches!(
            o[1],
            LogOp::Data {
                data_position: 4096,
                ..
            }
        ));
    }

    #[test]
    fn entry_length_must_match_descriptors_exactly() {
        let s = vec![7u8; 4096];
        // Two data descriptors (3 sectors); turn the second into a zero descriptor, which has
        // no data sector: 3 sectors is now one too many, even with a correct CRC.
        let mut e = build_entry(&params(2), &[(3 << 20, &s), (4 << 20, &s)]);
        e[96..100].copy_from_slice(b"zero");
        e[104..112].fill(0);
        e[4..8].fill(0);
        let crc = crc32c::crc32c(&e);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        assert_eq!(parse(&log, 0, 3), Err("entry length"));
        // Claiming more sectors than descriptors is refused from the header alone.
        let mut log = vec![0u8; 1 << 20];
        log[..4096].copy_from_slice(&raw_header(3 * 4096, 1, 2));
        assert_eq!(
            parse(&log, 0, 3),
            Err("entry length exceeds its descriptors")
        );
    }

    #[test]
    fn bogus_headers_are_refused_from_the_header_sector() {
        // EntryLength beyond what one descriptor allows: refused before any further read.
        let mut log = vec![0u8; 4 << 20];
        log[..4096].copy_from_slice(&raw_header(2 << 20, 1, 1));
        let mut reads = Vec::new();
        let r = parse_entry(0, log.len() as u64, &Uuid::from_u128(3), &mut |p, b| {
            reads.push((p, b.len()));
            b.copy_from_slice(&log[p as usize..p as usize + b.len()]);
            Ok(())
        })
        .unwrap();
        assert!(r.is_err());
        assert_eq!(reads, vec![(0, 4096)]);
        // Many descriptors claimed, consistent length, but the second header sector is another
        // header: refused after reading that one sector.
        let count = 1000u32;
        let len = (header_sectors(1000) + 1000) * SECTOR;
        let h = raw_header(len as u32, count, 1);
        for s in 0..4 {
            log[s * 4096..(s + 1) * 4096].copy_from_slice(&h);
        }
        let mut reads = Vec::new();
        let r = parse_entry(0, log.len() as u64, &Uuid::from_u128(3), &mut |p, b| {
            reads.push((p, b.len()));
            b.copy_from_slice(&log[p as usize..p as usize + b.len()]);
            Ok(())
        })
        .unwrap();
        assert!(r.is_err());
        assert_eq!(reads, vec![(0, 4096), (4096, 4096)]);
    }

    #[test]
    fn positions_outside_the_log_are_refused_not_a_hang() {
        let log = vec![0u8; 1 << 20];
        assert_eq!(parse(&log, 4097, 3), Err("position"));
        assert_eq!(parse(&log, 1 << 20, 3), Err("position"));
        let r = parse_entry(0, 0, &Uuid::from_u128(3), &mut |_, _| Ok(())).unwrap();
        assert_eq!(r, Err("position"));
        let e = entry_ops(0, 0, &Uuid::from_u128(3), &mut |_, _| Ok(()), &mut |_| {
            Ok(())
        });
        assert_eq!(e.unwrap_err().kind(), block_io::ErrorKind::Corrupt);
    }

    #[test]
    fn capacity() {
        assert_eq!(max_data_sectors(1 << 20), 254);
        let n = max_data_sectors(1 << 20);
        assert!(header_sectors(n) + n <= 256);
    }
}
