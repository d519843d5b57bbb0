//! NBD exports as parents of local differencing children: the identity an export advertises
//! ([`AdvertisedIdentity`]), the content fingerprint of an export that advertises none
//! ([`fingerprint`]), and the parent layer over an [`NbdClient`](block_io::nbd::NbdClient)
//! that checks either (see [`crate::remote`] for when each is used and what it can detect).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use block_io::nbd::ExportInfo;
use block_io::{BlockDevice, DiskInfo, Error, ErrorKind, Result, StatusRun};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::disk::Disk;
use crate::layer::Identity;
use crate::Format;

/// The version of the identity line and of the fingerprint written by this crate.
const VERSION: &str = "v1";

/// Samples a [`fingerprint`] reads.
pub const FINGERPRINT_SAMPLES: u64 = 16;

/// Bytes of each sample of a [`fingerprint`] (less for a smaller disk).
pub const FINGERPRINT_SAMPLE_LEN: u64 = 64 * 1024;

/// The identity of an image as an NBD export of it advertises it: one line of the export's
/// `NBD_INFO_DESCRIPTION`, starting with [`ExportInfo::IDENTITY_PREFIX`]:
///
/// ```text
/// vdisk-identity: v1 format=vhdx size=50331648 data-write-guid=<uuid> disk-id=<uuid>
/// vdisk-identity: v1 format=vhd size=50331648 unique-id=<uuid> timestamp=<u32>
/// ```
///
/// The size is the export's in bytes. Our server advertises it only for a read-only export
/// of a VHD or VHDX ([`AdvertisedIdentity::of`]): a writable export changes under its
/// children, and a raw image has no identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvertisedIdentity {
    /// The image's identity (never [`Identity::Raw`]).
    pub identity: Identity,
    /// The export's size in bytes.
    pub virtual_size: u64,
}

/// An identity line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed vdisk-identity line '{line}': {why}")]
pub struct BadIdentity {
    /// The line (after the prefix).
    pub line: String,
    /// What is wrong with it.
    pub why: String,
}

impl AdvertisedIdentity {
    /// What an export of `disk` advertises: `None` unless the disk is read-only and its top
    /// is a VHD or VHDX.
    pub fn of(disk: &Disk) -> Option<AdvertisedIdentity> {
        let info = disk.info();
        let top = disk.layers().first()?;
        if !info.read_only || top.identity == Identity::Raw {
            return None;
        }
        Some(AdvertisedIdentity {
            identity: top.identity,
            virtual_size: info.virtual_size,
        })
    }

    /// The description line, prefix included.
    pub fn to_line(&self) -> String {
        let head = format!(
            "{} {VERSION} size={}",
            ExportInfo::IDENTITY_PREFIX,
            self.virtual_size
        );
        match self.identity {
            Identity::Vhdx {
                data_write_guid,
                disk_id,
            } => format!(
                "{head} format=vhdx data-write-guid={} disk-id={}",
                data_write_guid.hyphenated(),
                disk_id.hyphenated()
            ),
            Identity::Vhd {
                unique_id,
                timestamp,
            } => format!(
                "{head} format=vhd unique-id={} timestamp={timestamp}",
                unique_id.hyphenated()
            ),
            Identity::Raw => format!("{head} format=raw"),
        }
    }

    /// Parses the text after the prefix ([`ExportInfo::identity`]).
    pub fn parse(line: &str) -> std::result::Result<AdvertisedIdentity, BadIdentity> {
        let bad = |why: &str| BadIdentity {
            line: line.to_string(),
            why: why.to_string(),
        };
        let mut words = line.split_whitespace();
        if words.next() != Some(VERSION) {
            return Err(bad("not version v1"));
        }
        let mut fields: Vec<(&str, &str)> = Vec::new();
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(|| bad("a word without '='"))?;
            if fields.iter().any(|(key, _)| *key == k) {
                return Err(bad("a key given twice"));
            }
            fields.push((k, v));
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| *v)
                .ok_or_else(|| bad(&format!("no {k}")))
        };
        let uuid = |k: &str| Uuid::parse_str(get(k)?).map_err(|_| bad(&format!("bad {k}")));
        let virtual_size = get("size")?.parse::<u64>().map_err(|_| bad("bad size"))?;
        let identity = match get("format")? {
            "vhdx" => Identity::Vhdx {
                data_write_guid: uuid("data-write-guid")?,
                disk_id: uuid("disk-id")?,
            },
            "vhd" => Identity::Vhd {
                unique_id: uuid("unique-id")?,
                timestamp: get("timestamp")?
                    .parse::<u32>()
                    .map_err(|_| bad("bad timestamp"))?,
            },
            _ => return Err(bad("unknown format")),
        };
        Ok(AdvertisedIdentity {
            identity,
            virtual_size,
        })
    }

    /// The format of the image behind the export.
    pub fn format(&self) -> Format {
        match self.identity {
            Identity::Vhdx { .. } => Format::Vhdx,
            Identity::Vhd { .. } => Format::Vhd,
            Identity::Raw => Format::Raw,
        }
    }
}

/// The offsets and lengths a [`fingerprint`] of a disk of `size` bytes with `sector`-byte
/// sectors reads: [`FINGERPRINT_SAMPLES`] pieces of [`FINGERPRINT_SAMPLE_LEN`] spread evenly
/// from the first to the last byte (fewer when they coincide on a small disk).
pub fn fingerprint_samples(size: u64, sector: u32) -> Vec<(u64, u64)> {
    let sector = u64::from(sector.max(1));
    let len = FINGERPRINT_SAMPLE_LEN.min(size - size % sector);
    if len == 0 {
        return Vec::new();
    }
    let span = u128::from(size - len);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in 0..FINGERPRINT_SAMPLES {
        // i / (n - 1) of the way; `span * i / (n - 1)` <= span fits in u64.
        let off = (span * u128::from(i) / u128::from(FINGERPRINT_SAMPLES - 1)) as u64;
        let off = off - off % sector;
        if out.last().is_none_or(|&(o, _)| o != off) {
            out.push((off, len));
        }
    }
    out
}

/// The content fingerprint of `dev`: SHA-256 over a version tag, the size and the
/// [`fingerprint_samples`] (each with its offset and length), its first 16 bytes as a UUID.
///
/// It detects a different size and any change inside the sampled bytes (16 x 64 KiB, the
/// first and last 64 KiB included); it cannot detect a change anywhere else. It is a check
/// against a replaced disk, not against an adversary (who can serve the sampled bytes and
/// change the rest).
pub fn fingerprint(dev: &dyn BlockDevice) -> Result<Uuid> {
    let info = dev.info();
    let mut h = Sha256::new();
    h.update(b"vdisk-fingerprint v1\0");
    h.update(info.virtual_size.to_le_bytes());
    let mut buf = Vec::new();
    for (off, len) in fingerprint_samples(info.virtual_size, info.logical_sector_size) {
        buf.resize(len as usize, 0);
        dev.read_at(&mut buf, off)?;
        h.update(off.to_le_bytes());
        h.update(len.to_le_bytes());
        h.update(&buf);
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    Ok(Uuid::from_bytes(b))
}

/// The identity a child of `child_format` records for a parent whose fingerprint is `fp`:
/// the fingerprint as the VHDX `parent_linkage` (DataWriteGuid), or as the VHD parent unique
/// id with timestamp 0.
pub fn fingerprint_identity(fp: Uuid, child_format: Format) -> Identity {
    match child_format {
        Format::Vhdx => Identity::Vhdx {
            data_write_guid: fp,
            disk_id: Uuid::nil(),
        },
        Format::Vhd => Identity::Vhd {
            unique_id: fp,
            timestamp: 0,
        },
        Format::Raw => Identity::Raw,
    }
}

/// A read of an unverified NBD parent found it changed: after a reconnect the export's
/// fingerprint is not the one it had when the chain was opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the NBD export {url} changed across a reconnect: its content fingerprint is {found}, \
     it was {expected}"
)]
pub struct FingerprintChanged {
    /// The export.
    pub url: String,
    /// The fingerprint when the chain was opened.
    pub expected: Uuid,
    /// The fingerprint after the reconnect.
    pub found: Uuid,
}

/// An NBD parent checked by fingerprint: after every reconnect of its client, the next
/// request's result is held back until the export's fingerprint is computed again; if it
/// changed, that request and every later one fail with [`FingerprintChanged`] (kind
/// `Corrupt`). A request served by a new connection completes after the reconnect was
/// counted, so no byte read from a changed export is returned: a failed read leaves zeros
/// in the caller's buffer.
pub(crate) struct Fingerprinted<D> {
    url: String,
    dev: D,
    reconnects: fn(&D) -> u64,
    fp: Uuid,
    /// The reconnect count the fingerprint was last confirmed at.
    confirmed: AtomicU64,
    failed: AtomicBool,
    found: parking_lot::Mutex<Uuid>,
}

impl<D: BlockDevice> Fingerprinted<D> {
    /// Wraps `dev` and computes its fingerprint.
    pub fn new(url: &str, dev: D, reconnects: fn(&D) -> u64) -> Result<Self> {
        let seen = reconnects(&dev);
        let fp = fingerprint(&dev)?;
        Ok(Fingerprinted {
            url: url.to_string(),
            dev,
            reconnects,
            fp,
            confirmed: AtomicU64::new(seen),
            failed: AtomicBool::new(false),
            found: parking_lot::Mutex::new(fp),
        })
    }

    /// The fingerprint when opened.
    pub fn fingerprint(&self) -> Uuid {
        self.fp
    }

    fn changed(&self) -> Error {
        Error::with_source(
            ErrorKind::Corrupt,
            format!("reading the NBD parent {}", self.url),
            FingerprintChanged {
                url: self.url.clone(),
                expected: self.fp,
                found: *self.found.lock(),
            },
        )
    }

    /// After a request: confirms the fingerprint if the client reconnected since it was
    /// last confirmed.
    fn check(&self) -> Result<()> {
        loop {
            if self.failed.load(Ordering::Acquire) {
                return Err(self.changed());
            }
            let seen = (self.reconnects)(&self.dev);
            if seen == self.confirmed.load(Ordering::Acquire) {
                return Ok(());
            }
            let mut found = self.found.lock();
            if self.failed.load(Ordering::Acquire)
                || (self.reconnects)(&self.dev) != seen
                || self.confirmed.load(Ordering::Acquire) == seen
            {
                // Someone else confirmed or failed meanwhile, or yet another reconnect came.
                continue;
            }
            let fp = fingerprint(&self.dev)?;
            *found = fp;
            if fp != self.fp {
                self.failed.store(true, Ordering::Release);
                continue;
            }
            // Confirmed at `seen`; a reconnect during the samples is checked on the next turn.
            self.confirmed.store(seen, Ordering::Release);
        }
    }

    fn then<T>(&self, r: Result<T>) -> Result<T> {
        let v = r?;
        self.check()?;
        Ok(v)
    }
}

impl<D: BlockDevice> BlockDevice for Fingerprinted<D> {
    fn info(&self) -> DiskInfo {
        self.dev.info()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.check().and_then(|()| self.dev.read_at(buf, offset));
        self.then(r).inspect_err(|_| buf.fill(0))
    }

    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self
            .check()
            .and_then(|()| self.dev.read_data_at(buf, offset));
        self.then(r).inspect_err(|_| buf.fill(0))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.dev.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.dev.write_zeroes(offset, len, unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        self.check()?;
        let r = self.dev.block_status(offset, len);
        self.then(r)
    }
}

/// Checks an NBD parent's `info` against its advertised identity's size.
pub(crate) fn check_size(adv: &AdvertisedIdentity, info: &DiskInfo) -> Option<String> {
    (adv.virtual_size != info.virtual_size).then(|| {
        format!(
            "the export advertises an image of {} bytes but holds {}",
            adv.virtual_size, info.virtual_size
        )
    })
}

impl<D> std::fmt::Debug for Fingerprinted<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fingerprinted")
            .field("url", &self.url)
            .field("fp", &self.fp)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_io::{MemStorage, RawDisk, Storage};

    #[test]
    fn identity_lines_round_trip() {
        let ids = [
            AdvertisedIdentity {
                identity: Identity::Vhdx {
                    data_write_guid: Uuid::from_u128(0x1234),
                    disk_id: Uuid::from_u128(0x5678),
                },
                virtual_size: 48 << 20,
            },
            AdvertisedIdentity {
                identity: Identity::Vhd {
                    unique_id: Uuid::from_u128(0xabcd),
                    timestamp: 77,
                },
                virtual_size: 1 << 30,
            },
        ];
        for id in ids {
            let line = id.to_line();
            let rest = line.strip_prefix(ExportInfo::IDENTITY_PREFIX).unwrap();
            assert_eq!(AdvertisedIdentity::parse(rest).unwrap(), id, "{line}");
        }
        for bad in [
            "",
            "v2 size=1 format=vhd unique-id=00000000-0000-0000-0000-000000000001 timestamp=1",
            "v1 size=1 format=vhd unique-id=00000000-0000-0000-0000-000000000001",
            "v1 size=x format=vhd unique-id=00000000-0000-0000-0000-000000000001 timestamp=1",
            "v1 size=1 format=raw",
            "v1 size=1 size=2 format=vhdx data-write-guid=0 disk-id=0",
            "v1 size=1 format=vhdx data-write-guid=nope disk-id=nope",
            "v1 size=1 format vhdx",
        ] {
            assert!(AdvertisedIdentity::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn samples_cover_first_and_last_bytes() {
        let s = fingerprint_samples(48 << 20, 512);
        assert_eq!(s.len(), FINGERPRINT_SAMPLES as usize);
        assert_eq!(s[0], (0, FINGERPRINT_SAMPLE_LEN));
        assert_eq!(
            s.last().copied(),
            Some(((48 << 20) - FINGERPRINT_SAMPLE_LEN, FINGERPRINT_SAMPLE_LEN))
        );
        assert!(s.iter().all(|&(o, _)| o % 512 == 0));
        // Small disks: one whole-disk sample; none for an empty one.
        assert_eq!(fingerprint_samples(4096, 512), vec![(0, 4096)]);
        assert_eq!(fingerprint_samples(0, 512), vec![]);
        // Odd sizes stay inside the disk.
        for (o, l) in fingerprint_samples((1 << 20) + 512, 4096) {
            assert!(o + l <= (1 << 20) + 512);
        }
    }

    fn disk(bytes: &[u8]) -> RawDisk<MemStorage> {
        RawDisk::new(MemStorage::from_bytes(bytes)).unwrap()
    }

    #[test]
    fn fingerprints_see_size_and_sampled_bytes_only() {
        let base = vec![7u8; 4 << 20];
        let fp = fingerprint(&disk(&base)).unwrap();
        assert_eq!(fingerprint(&disk(&base)).unwrap(), fp);
        let mut first = base.clone();
        first[0] = 8;
        assert_ne!(fingerprint(&disk(&first)).unwrap(), fp);
        let mut last = base.clone();
        *last.last_mut().unwrap() = 8;
        assert_ne!(fingerprint(&disk(&last)).unwrap(), fp);
        assert_ne!(fingerprint(&disk(&base[..2 << 20])).unwrap(), fp);
        // What it cannot see: a byte between samples.
        let mut between = base.clone();
        between[FINGERPRINT_SAMPLE_LEN as usize + 1] = 8;
        assert_eq!(fingerprint(&disk(&between)).unwrap(), fp);
    }

    /// A device whose bytes and reconnect count the test changes.
    struct Swappable {
        mem: MemStorage,
        reconnects: AtomicU64,
    }

    impl BlockDevice for Swappable {
        fn info(&self) -> DiskInfo {
            DiskInfo::new("test", self.mem.len().unwrap())
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Err(Error::new(ErrorKind::ReadOnly, "read-only"))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
            Err(Error::new(ErrorKind::ReadOnly, "read-only"))
        }
        fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64) -> Result<StatusRun> {
            Ok(StatusRun {
                status: block_io::BlockStatus::Data,
                len,
                file_offset: None,
            })
        }
    }

    #[test]
    fn a_reconnect_to_changed_content_fails_reads() {
        let dev = Swappable {
            mem: MemStorage::from_bytes(&vec![1u8; 1 << 20]),
            reconnects: AtomicU64::new(0),
        };
        let f =
            Fingerprinted::new("nbd://t/x", dev, |d| d.reconnects.load(Ordering::SeqCst)).unwrap();
        let mut b = vec![0u8; 4096];
        f.read_at(&mut b, 0).unwrap();
        // A reconnect to the same content: confirmed, reads go on.
        f.dev.reconnects.store(1, Ordering::SeqCst);
        f.read_at(&mut b, 4096).unwrap();
        assert_eq!(f.confirmed.load(Ordering::SeqCst), 1);
        // Changed content without a reconnect is not looked at (no reconnect, same server).
        f.dev.mem.write_at(&[9u8; 512], 0).unwrap();
        f.read_at(&mut b, 0).unwrap();
        // After a reconnect it is, and the failure latches.
        f.dev.reconnects.store(2, Ordering::SeqCst);
        b.fill(0xee);
        let e = f.read_at(&mut b, 0).unwrap_err();
        assert!(
            b.iter().all(|&x| x == 0),
            "bytes of the changed disk came through"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let src = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<FingerprintChanged>())
            .unwrap();
        assert_eq!(src.expected, f.fingerprint());
        assert_ne!(src.found, f.fingerprint());
        f.dev.mem.write_at(&[1u8; 512], 0).unwrap();
        assert!(f.block_status(0, 4096).is_err());
    }
}
