//! The stream's bytes: header and record encoding, and [`StreamReader`], the checked parser
//! (see the wire format in the module docs of `send`).

use std::io::Read;

use uuid::Uuid;

use super::SendError;

/// The stream's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"VDSKSEND";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// The largest DATA record (uncompressed), and so the largest buffer a stream can ask for.
pub const MAX_RECORD: u32 = 16 << 20;
/// Samples of a raw image's content fingerprint.
pub const FINGERPRINT_SAMPLES: u64 = 32;
/// Bytes of one fingerprint sample.
const SAMPLE: u64 = 64 << 10;

pub(crate) const HEADER_LEN: usize = 103;
pub(crate) const IDENT_LEN: usize = 33;
const FLAG_INCREMENTAL: u16 = 1;

pub(crate) const TAG_DATA: u8 = b'D';
pub(crate) const TAG_ZERO: u8 = b'Z';
pub(crate) const TAG_END: u8 = b'E';
/// DATA record bytes before the payload: tag, offset, length, codec, level, stored length.
pub(crate) const DATA_HEAD: usize = 1 + 8 + 4 + 1 + 1 + 4;

/// How a DATA payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The bytes themselves.
    None,
    /// One zstd frame.
    Zstd,
}

/// Who an image is, as a stream names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamIdentity {
    /// No identity (the source of a full stream that is raw; the base of a full stream).
    None,
    /// A raw image's content fingerprint.
    RawFingerprint([u8; 16]),
    /// A VHD's footer unique id and timestamp.
    Vhd {
        /// Footer unique id.
        unique_id: Uuid,
        /// Footer timestamp.
        timestamp: u32,
    },
    /// A VHDX's DataWriteGuid and virtual disk id.
    Vhdx {
        /// DataWriteGuid.
        data_write_guid: Uuid,
        /// Virtual disk id.
        disk_id: Uuid,
    },
}

impl std::fmt::Display for StreamIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamIdentity::None => f.write_str("no identity"),
            StreamIdentity::RawFingerprint(fp) => {
                f.write_str("raw image with content fingerprint ")?;
                fp.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            StreamIdentity::Vhd {
                unique_id,
                timestamp,
            } => write!(f, "VHD unique id {{{unique_id}}} timestamp {timestamp}"),
            StreamIdentity::Vhdx {
                data_write_guid, ..
            } => write!(f, "VHDX DataWriteGuid {{{data_write_guid}}}"),
        }
    }
}

impl StreamIdentity {
    pub(crate) fn encode(&self) -> [u8; IDENT_LEN] {
        let mut b = [0u8; IDENT_LEN];
        match self {
            StreamIdentity::None => {}
            StreamIdentity::RawFingerprint(fp) => {
                b[0] = 1;
                b[1..17].copy_from_slice(fp);
            }
            StreamIdentity::Vhd {
                unique_id,
                timestamp,
            } => {
                b[0] = 2;
                b[1..17].copy_from_slice(unique_id.as_bytes());
                b[17..21].copy_from_slice(&timestamp.to_le_bytes());
            }
            StreamIdentity::Vhdx {
                data_write_guid,
                disk_id,
            } => {
                b[0] = 3;
                b[1..17].copy_from_slice(data_write_guid.as_bytes());
                b[17..33].copy_from_slice(disk_id.as_bytes());
            }
        }
        b
    }

    pub(crate) fn decode(b: &[u8; IDENT_LEN], what: &str) -> Result<Self, SendError> {
        let u = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[r]);
            Uuid::from_bytes(a)
        };
        let zero_from = |i: usize| b[i..].iter().all(|&x| x == 0);
        let id = match b[0] {
            0 if zero_from(1) => StreamIdentity::None,
            1 if zero_from(17) => {
                let mut fp = [0u8; 16];
                fp.copy_from_slice(&b[1..17]);
                StreamIdentity::RawFingerprint(fp)
            }
            2 if zero_from(21) => StreamIdentity::Vhd {
                unique_id: u(1..17),
                timestamp: u32::from_le_bytes([b[17], b[18], b[19], b[20]]),
            },
            3 => StreamIdentity::Vhdx {
                data_write_guid: u(1..17),
                disk_id: u(17..33),
            },
            k => {
                return Err(SendError::BadHeader(format!(
                    "{what} identity kind {k} or its padding is invalid"
                )))
            }
        };
        Ok(id)
    }

    /// The identity of an opened layer (a raw layer's is computed from its content).
    pub(crate) fn of_layer(layer: &chain::Layer) -> Result<Self, block_io::Error> {
        Ok(match layer.identity {
            chain::Identity::Raw => StreamIdentity::RawFingerprint(fingerprint(&*layer.dev)?),
            chain::Identity::Vhd {
                unique_id,
                timestamp,
            } => StreamIdentity::Vhd {
                unique_id,
                timestamp,
            },
            chain::Identity::Vhdx {
                data_write_guid,
                disk_id,
            } => StreamIdentity::Vhdx {
                data_write_guid,
                disk_id,
            },
        })
    }
}

/// A raw image's content fingerprint: four crc32c over its size and [`FINGERPRINT_SAMPLES`]
/// samples (sample `i` feeds crc `i % 4`), each sample with its offset.
pub(crate) fn fingerprint(dev: &dyn block_io::BlockDevice) -> Result<[u8; 16], block_io::Error> {
    let info = dev.info();
    let size = info.virtual_size;
    let sector = u64::from(info.logical_sector_size.max(512));
    let mut crcs = [0u32; 4];
    for c in crcs.iter_mut() {
        *c = crc32c::crc32c(&size.to_le_bytes());
    }
    let sample = SAMPLE.min(size);
    let mut buf = vec![0u8; usize::try_from(sample).unwrap_or(0)];
    if sample > 0 {
        let span = size - sample;
        for i in 0..FINGERPRINT_SAMPLES {
            let off = span / (FINGERPRINT_SAMPLES - 1).max(1) * i / sector * sector;
            dev.read_at(&mut buf, off)?;
            let k = (i % 4) as usize;
            crcs[k] = crc32c::crc32c_append(crcs[k], &off.to_le_bytes());
            crcs[k] = crc32c::crc32c_append(crcs[k], &buf);
        }
    }
    let mut out = [0u8; 16];
    for (i, c) in crcs.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&c.to_le_bytes());
    }
    Ok(out)
}

/// What a stream's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The source's virtual size in bytes.
    pub virtual_size: u64,
    /// Its logical sector size.
    pub logical_sector_size: u32,
    /// Its physical sector size.
    pub physical_sector_size: u32,
    /// The largest DATA record length in the stream.
    pub max_record: u32,
    /// The source's format.
    pub format: chain::Format,
    /// The source top image's identity.
    pub source: StreamIdentity,
    /// For an incremental stream, the snapshot it was sent since; `None` for a full stream.
    pub base: Option<StreamIdentity>,
}

impl StreamHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.base.is_some() {
            FLAG_INCREMENTAL
        } else {
            0
        };
        b[10..12].copy_from_slice(&flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.logical_sector_size.to_le_bytes());
        b[24..28].copy_from_slice(&self.physical_sector_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.max_record.to_le_bytes());
        b[32] = match self.format {
            chain::Format::Raw => 0,
            chain::Format::Vhd => 1,
            chain::Format::Vhdx => 2,
        };
        b[33..66].copy_from_slice(&self.source.encode());
        b[66..99].copy_from_slice(&self.base.unwrap_or(StreamIdentity::None).encode());
        let crc = crc32c::crc32c(&b[..99]);
        b[99..103].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, SendError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return Err(SendError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(SendError::Version { found: version });
        }
        let stored = le32(&b[99..103]);
        let computed = crc32c::crc32c(&b[..99]);
        if stored != computed {
            return Err(SendError::HeaderChecksum { stored, computed });
        }
        let bad = |s: String| Err(SendError::BadHeader(s));
        let flags = u16::from_le_bytes([b[10], b[11]]);
        if flags & !FLAG_INCREMENTAL != 0 {
            return bad(format!("unknown flags {flags:#06x}"));
        }
        let virtual_size = le64(&b[12..20]);
        let logical = le32(&b[20..24]);
        let physical = le32(&b[24..28]);
        let max_record = le32(&b[28..32]);
        if logical != 512 && logical != 4096 {
            return bad(format!(
                "logical sector size {logical} is neither 512 nor 4096"
            ));
        }
        if !physical.is_power_of_two() || physical < logical || physical > 65536 {
            return bad(format!(
                "physical sector size {physical} is not a power of two from {logical} to 65536"
            ));
        }
        if virtual_size % u64::from(logical) != 0 {
            return bad(format!(
                "virtual size {virtual_size} is not a multiple of the sector size {logical}"
            ));
        }
        if max_record == 0 || max_record > MAX_RECORD || max_record % logical != 0 {
            return bad(format!(
                "largest record {max_record} is not a sector multiple from {logical} to {MAX_RECORD}"
            ));
        }
        let format = match b[32] {
            0 => chain::Format::Raw,
            1 => chain::Format::Vhd,
            2 => chain::Format::Vhdx,
            f => return bad(format!("unknown source format {f}")),
        };
        let ident = |r: std::ops::Range<usize>, what| {
            let mut a = [0u8; IDENT_LEN];
            a.copy_from_slice(&b[r]);
            StreamIdentity::decode(&a, what)
        };
        let source = ident(33..66, "source")?;
        let base = ident(66..99, "base")?;
        let base = match (flags & FLAG_INCREMENTAL != 0, base) {
            (false, StreamIdentity::None) => None,
            (false, _) => return bad("a full stream names a base".into()),
            (true, StreamIdentity::None) => {
                return bad("an incremental stream names no base".into())
            }
            (true, id) => Some(id),
        };
        Ok(StreamHeader {
            virtual_size,
            logical_sector_size: logical,
            physical_sector_size: physical,
            max_record,
            format,
            source,
            base,
        })
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Appends a DATA record with `payload` (stored as `codec`) for `len` bytes at `offset`.
pub(crate) fn encode_data(
    out: &mut Vec<u8>,
    offset: u64,
    len: u32,
    codec: Codec,
    level: i8,
    payload: &[u8],
) {
    let start = out.len();
    out.push(TAG_DATA);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(match codec {
        Codec::None => 0,
        Codec::Zstd => 1,
    });
    out.push(level.to_le_bytes()[0]);
    // Payloads are at most MAX_RECORD (+ zstd's small bound), far below u32::MAX.
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// A ZERO record.
pub(crate) fn encode_zero(offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(21);
    out.push(TAG_ZERO);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The END record.
pub(crate) fn encode_end(records: u64, data: u64, zero: u64, digest: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.push(TAG_END);
    out.extend_from_slice(&records.to_le_bytes());
    out.extend_from_slice(&data.to_le_bytes());
    out.extend_from_slice(&zero.to_le_bytes());
    out.extend_from_slice(&digest.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// One parsed record. A DATA record's payload is in the reader's buffer
/// ([`StreamReader::payload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// `len` bytes at `offset`, stored as `codec`.
    Data { offset: u64, len: u32, codec: Codec },
    /// `len` bytes of zeros at `offset`.
    Zero { offset: u64, len: u64 },
    /// The END record checked out: the stream is complete.
    End {
        records: u64,
        data_bytes: u64,
        zero_bytes: u64,
    },
}

/// Reads and checks a stream: the header, then records one by one, each checked (checksum,
/// bounds, order) before it is returned; END is returned only when the totals and the
/// digest match and nothing follows it.
pub(crate) struct StreamReader<R> {
    inner: R,
    /// Bytes consumed.
    pos: u64,
    /// crc32c of the bytes consumed (the END digest).
    digest: u32,
    header: Option<StreamHeader>,
    /// Where the next record may start in the disk.
    next_offset: u64,
    records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    payload: Vec<u8>,
    done: bool,
}

impl<R: Read> StreamReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        StreamReader {
            inner,
            pos: 0,
            digest: 0,
            header: None,
            next_offset: 0,
            records: 0,
            data_bytes: 0,
            zero_bytes: 0,
            payload: Vec::new(),
            done: false,
        }
    }

    /// The source the stream is read from.
    pub(crate) fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes of the stream consumed so far.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    /// Fills `buf` exactly, or fails with `Truncated` (at the byte where the stream ended).
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), SendError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(SendError::Truncated {
                        after: self.pos + got as u64,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(SendError::Stream { op: "read", source }),
            }
        }
        self.digest = crc32c::crc32c_append(self.digest, buf);
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads and checks the header.
    pub(crate) fn read_header(&mut self) -> Result<StreamHeader, SendError> {
        let mut b = [0u8; HEADER_LEN];
        // The magic alone first: a short non-stream input says "bad magic", not "truncated".
        self.fill(&mut b[..8])?;
        if b[..8] != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&b[..8]);
            return Err(SendError::BadMagic { found });
        }
        let (_, rest) = b.split_at_mut(8);
        self.fill(rest)?;
        let h = StreamHeader::decode(&b)?;
        self.payload.reserve(h.max_record as usize);
        self.header = Some(h.clone());
        Ok(h)
    }

    /// The payload of the last DATA record returned.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Reads the next record. After END, fails with `Trailing` if any byte follows.
    pub(crate) fn next_record(&mut self) -> Result<Record, SendError> {
        let Some(h) = self.header.clone() else {
            return Err(SendError::Invalid("the header was not read".into()));
        };
        if self.done {
            return Err(SendError::Invalid("the stream already ended".into()));
        }
        let at = self.pos;
        let record = self.records + 1;
        let digest_before = self.digest;
        let bad = |why: String| SendError::BadRecord { record, at, why };
        let mut tag = [0u8; 1];
        self.fill(&mut tag)?;
        let sector = u64::from(h.logical_sector_size);
        let check_range = |offset: u64, len: u64, next: u64| -> Result<(), SendError> {
            if len == 0 || offset % sector != 0 || len % sector != 0 {
                return Err(bad(format!(
                    "range {offset}+{len} is empty or not aligned to {sector}-byte sectors"
                )));
            }
            if offset < next {
                return Err(bad(format!(
                    "offset {offset} is before the previous record's end {next}"
                )));
            }
            match offset.checked_add(len) {
                Some(end) if end <= h.virtual_size => Ok(()),
                _ => Err(bad(format!(
                    "range {offset}+{len} is beyond the virtual size {}",
                    h.virtual_size
                ))),
            }
        };
        match tag[0] {
            TAG_DATA => {
                let mut head = [0u8; DATA_HEAD];
                head[0] = TAG_DATA;
                self.fill(&mut head[1..])?;
                let offset = le64(&head[1..9]);
                let len = le32(&head[9..13]);
                let codec = head[13];
                let stored = le32(&head[15..19]);
                // Bounds before the payload is read or a buffer sized.
                if len > h.max_record {
                    return Err(bad(format!(
                        "length {len} exceeds the header's largest record {}",
                        h.max_record
                    )));
                }
                let codec = match codec {
                    0 if stored == len => Codec::None,
                    0 => {
                        return Err(bad(format!(
                            "stored length {stored} differs from length {len} with no codec"
                        )))
                    }
                    1 if (stored as usize) <= zstd::zstd_safe::compress_bound(len as usize) => {
                        Codec::Zstd
                    }
                    1 => {
                        return Err(bad(format!(
                            "stored length {stored} exceeds zstd's bound for {len} bytes"
                        )))
                    }
                    c => return Err(bad(format!("unknown codec {c}"))),
                };
                self.payload.clear();
                self.payload.resize(stored as usize, 0);
                let mut payload = std::mem::take(&mut self.payload);
                let r = self.fill(&mut payload);
                self.payload = payload;
                r?;
                let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &self.payload);
                self.check_crc(crc, record, at)?;
                check_range(offset, u64::from(len), self.next_offset)?;
                self.next_offset = offset + u64::from(len);
                self.records += 1;
                self.data_bytes += u64::from(len);
                Ok(Record::Data { offset, len, codec })
            }
            TAG_ZERO => {
                let mut b = [0u8; 17];
                b[0] = TAG_ZERO;
                self.fill(&mut b[1..])?;
                self.check_crc(crc32c::crc32c(&b), record, at)?;
                let offset = le64(&b[1..9]);
                let len = le64(&b[9..17]);
                check_range(offset, len, self.next_offset)?;
                self.next_offset = offset + len;
                self.records += 1;
                self.zero_bytes += len;
                Ok(Record::Zero { offset, len })
            }
            TAG_END => {
                let mut b = [0u8; 29];
                b[0] = TAG_END;
                self.fill(&mut b[1..])?;
                self.check_crc(crc32c::crc32c(&b), record, at)?;
                let (records, data_bytes, zero_bytes) =
                    (le64(&b[1..9]), le64(&b[9..17]), le64(&b[17..25]));
                let digest = le32(&b[25..29]);
                if (records, data_bytes, zero_bytes)
                    != (self.records, self.data_bytes, self.zero_bytes)
                {
                    return Err(SendError::Digest(format!(
                        "it counts {records} records, {data_bytes} data and {zero_bytes} zero \
                         bytes; the stream held {}, {} and {}",
                        self.records, self.data_bytes, self.zero_bytes
                    )));
                }
                if digest != digest_before {
                    return Err(SendError::Digest(format!(
                        "digest {digest:#010x}, the stream's {digest_before:#010x}"
                    )));
                }
                let mut one = [0u8; 1];
                loop {
                    match self.inner.read(&mut one) {
                        Ok(0) => break,
                        Ok(_) => return Err(SendError::Trailing { at: self.pos }),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(source) => return Err(SendError::Stream { op: "read", source }),
                    }
                }
                self.done = true;
                Ok(Record::End {
                    records,
                    data_bytes,
                    zero_bytes,
                })
            }
            t => Err(bad(format!("unknown record tag {t:#04x}"))),
        }
    }

    fn check_crc(&mut self, computed: u32, record: u64, at: u64) -> Result<(), SendError> {
        let mut c = [0u8; 4];
        // The stored crc is part of the stream digest too.
        self.fill(&mut c)?;
        if u32::from_le_bytes(c) != computed {
            return Err(SendError::RecordChecksum { record, at });
        }
        Ok(())
    }
}

/// Decodes a DATA payload into `out` (resized to `len`).
pub(crate) fn decode_payload(
    codec: Codec,
    payload: &[u8],
    len: u32,
    out: &mut Vec<u8>,
    record: u64,
    at: u64,
    dec: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), SendError> {
    let bad = |why: String| SendError::BadRecord { record, at, why };
    match codec {
        Codec::None => {
            out.clear();
            out.extend_from_slice(payload);
        }
        Codec::Zstd => {
            out.clear();
            out.reserve(len as usize);
            let n = dec
                .decompress_to_buffer(payload, out)
                .map_err(|e| bad(format!("zstd payload: {e}")))?;
            if n != len as usize {
                return Err(bad(format!(
                    "zstd payload decompresses to {n} bytes, not {len}"
                )));
            }
        }
    }
    Ok(())
}
