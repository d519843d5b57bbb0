//! The journal of an incremental receive: the verified stream kept beside the destination
//! while it is applied, so that an apply cut short (a crash, a kill, a failed write) is
//! finished by applying the stream again (roll-forward; see "Interrupted receives" in the
//! module docs of `send`).
//!
//! The journal of `DIR/NAME` is `DIR/NAME.vdisk-receive` ([`journal_path`]). All integers
//! little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VDSKRJNL` |
//! | 8 | 2 | version, 1 |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 33 | the destination's identity as checked before the apply (wire format) |
//! | 45 | 4 | crc32c of bytes 0..45 |
//! | 49 | … | the stream, header to END, as received and verified |
//!
//! The stream carries its own checksums (header, every record, the END digest over all of
//! it), so a torn or truncated journal fails verification as a stream would; nothing may
//! follow the END record.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use block_io::BlockDevice;

use super::receiver::{apply, check_geometry, dest_err};
use super::wire::{StreamHeader, StreamIdentity, StreamReader, IDENT_LEN};
use super::{ReceiveProgress, SendError};

/// The journal's first 8 bytes.
pub const JOURNAL_MAGIC: [u8; 8] = *b"VDSKRJNL";
/// What [`journal_path`] appends to the destination's file name.
pub const JOURNAL_SUFFIX: &str = ".vdisk-receive";
const JOURNAL_VERSION: u16 = 1;
/// Bytes before the stream.
pub(crate) const HEAD_LEN: usize = 12 + IDENT_LEN + 4;

/// The journal of an incremental receive into `dest`: `dest` with [`JOURNAL_SUFFIX`]
/// appended to its file name, in the same folder.
pub fn journal_path(dest: &Path) -> PathBuf {
    match dest.file_name() {
        Some(n) => {
            let mut name: OsString = n.to_owned();
            name.push(JOURNAL_SUFFIX);
            dest.with_file_name(name)
        }
        None => folder_of(dest).join(format!("image{JOURNAL_SUFFIX}")),
    }
}

/// The folder `path` is in (`.` for a bare name).
pub(crate) fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Syncs the folder `path` is in, so that a rename or removal in it is durable.
pub(crate) fn sync_folder_of(path: &Path) -> Result<(), SendError> {
    let dir = folder_of(path);
    File::open(&dir)
        .and_then(|f| f.sync_all())
        .map_err(|source| SendError::File {
            op: "sync the folder",
            path: dir,
            source,
        })
}

/// Whether `journal` exists (an error other than "not found" is one).
pub(crate) fn exists(journal: &Path) -> Result<bool, SendError> {
    match std::fs::symlink_metadata(journal) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(SendError::File {
            op: "look for the receive journal",
            path: journal.to_path_buf(),
            source,
        }),
    }
}

/// The journal's head for a destination that was `dest_before` when checked.
pub(crate) fn encode_head(dest_before: &StreamIdentity) -> [u8; HEAD_LEN] {
    let mut b = [0u8; HEAD_LEN];
    b[0..8].copy_from_slice(&JOURNAL_MAGIC);
    b[8..10].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    b[12..12 + IDENT_LEN].copy_from_slice(&dest_before.encode());
    let crc = crc32c::crc32c(&b[..12 + IDENT_LEN]);
    b[12 + IDENT_LEN..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Checks a journal's head; returns the destination's identity it records.
fn decode_head(b: &[u8; HEAD_LEN]) -> Result<StreamIdentity, SendError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[0..8]);
    if magic != JOURNAL_MAGIC {
        return Err(SendError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != JOURNAL_VERSION || b[10..12] != [0, 0] {
        return Err(SendError::BadHeader(format!(
            "journal version {version} or its reserved bytes are not this build's"
        )));
    }
    let stored = u32::from_le_bytes([
        b[12 + IDENT_LEN],
        b[13 + IDENT_LEN],
        b[14 + IDENT_LEN],
        b[15 + IDENT_LEN],
    ]);
    let computed = crc32c::crc32c(&b[..12 + IDENT_LEN]);
    if stored != computed {
        return Err(SendError::HeaderChecksum { stored, computed });
    }
    let mut id = [0u8; IDENT_LEN];
    id.copy_from_slice(&b[12..12 + IDENT_LEN]);
    StreamIdentity::decode(&id, "journal destination")
}

/// An opened journal, positioned at its first record.
pub(crate) struct JournalReader {
    pub(crate) r: StreamReader<BufReader<File>>,
    pub(crate) dest_before: StreamIdentity,
    pub(crate) header: StreamHeader,
}

/// Opens `journal` and reads its head and the stream's header. Errors other than opening
/// the file are the journal's content (the caller names the file).
pub(crate) fn open(journal: &Path) -> Result<JournalReader, SendError> {
    let file = File::open(journal).map_err(|source| SendError::File {
        op: "open the receive journal",
        path: journal.to_path_buf(),
        source,
    })?;
    let mut br = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; HEAD_LEN];
    br.read_exact(&mut head).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SendError::Truncated { after: 0 }
        } else {
            SendError::Stream {
                op: "read",
                source: e,
            }
        }
    })?;
    let dest_before = decode_head(&head)?;
    let mut r = StreamReader::new(br);
    let header = r.read_header()?;
    if header.base.is_none() {
        return Err(SendError::BadHeader(
            "a journal holds an incremental stream, this one is full".into(),
        ));
    }
    Ok(JournalReader {
        r,
        dest_before,
        header,
    })
}

/// Removes the finished `journal` and syncs its folder.
pub(crate) fn remove(journal: &Path) -> Result<(), SendError> {
    std::fs::remove_file(journal).map_err(|source| SendError::File {
        op: "remove the finished receive journal",
        path: journal.to_path_buf(),
        source,
    })?;
    sync_folder_of(journal)
}

/// What finishing an interrupted receive from its journal did.
#[derive(Debug, Clone)]
pub struct ResumeReport {
    /// The journal (removed once finished).
    pub journal: PathBuf,
    /// The header of the stream it held.
    pub header: StreamHeader,
    /// The destination's identity as checked before the interrupted apply began.
    pub dest_before: StreamIdentity,
    /// DATA and ZERO records applied again.
    pub records: u64,
    /// Bytes written from DATA records.
    pub data_bytes: u64,
    /// Bytes of ZERO records.
    pub zero_bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Whether `found` can be the image a journal recorded as `before`, some records of the
/// stream applied since: a VHD keeps its unique id and timestamp when written, a VHDX its
/// virtual disk id (its DataWriteGuid changes); a raw image's fingerprint follows its
/// content, so only its kind is compared.
fn same_image(before: &StreamIdentity, found: &StreamIdentity) -> bool {
    match (before, found) {
        (StreamIdentity::Vhd { .. }, StreamIdentity::Vhd { .. }) => before == found,
        (StreamIdentity::Vhdx { disk_id: a, .. }, StreamIdentity::Vhdx { disk_id: b, .. }) => {
            a == b
        }
        (StreamIdentity::RawFingerprint(_), StreamIdentity::RawFingerprint(_)) => true,
        _ => false,
    }
}

/// A journal that verified whole: its path, and what its head and stream header say.
pub(crate) struct Verified {
    path: PathBuf,
    dest_before: StreamIdentity,
    header: StreamHeader,
}

/// The journal error of `journal` for `source`, what is wrong with its content.
fn bad(journal: &Path, source: SendError) -> SendError {
    SendError::Journal {
        path: journal.to_path_buf(),
        source: Box::new(source),
    }
}

/// Reads `journal` whole and checks it as a stream (head, header, every record, the END
/// digest, nothing after): a journal that does not verify is refused with
/// [`SendError::Journal`]. Done before the destination is opened for writing.
pub(crate) fn verify(journal: &Path, progress: &ReceiveProgress) -> Result<Verified, SendError> {
    let mut j = open(journal).map_err(|e| bad(journal, e))?;
    apply(&mut j.r, None, false, progress, false).map_err(|e| bad(journal, e))?;
    Ok(Verified {
        path: journal.to_path_buf(),
        dest_before: j.dest_before,
        header: j.header,
    })
}

/// Finishes the interrupted receive whose journal `v` verified into `disk` (named `dest` in
/// errors): checks the geometry and that `disk` is the image the journal was written for
/// (not its lineage: some records may have landed), applies every record again, flushes
/// `disk`, and removes the journal.
pub(crate) fn finish(
    disk: &chain::Disk,
    dest: &Path,
    v: Verified,
    progress: &ReceiveProgress,
) -> Result<ResumeReport, SendError> {
    let start = Instant::now();
    let journal = v.path.as_path();
    check_geometry(disk, &v.header, dest)?;
    let top = &disk.layers()[0];
    let found = StreamIdentity::of_layer(top).map_err(dest_err("read", dest))?;
    if !same_image(&v.dest_before, &found) {
        return Err(SendError::JournalMismatch {
            journal: journal.to_path_buf(),
            dest: dest.to_path_buf(),
            recorded: v.dest_before.to_string(),
            found: found.to_string(),
        });
    }
    let mut again = open(journal).map_err(|e| bad(journal, e))?;
    progress.set_total(again.header.virtual_size);
    let t =
        apply(&mut again.r, Some((disk, dest)), true, progress, false).map_err(|e| match e {
            SendError::Destination { .. } | SendError::File { .. } => e,
            e => bad(journal, e),
        })?;
    disk.flush().map_err(dest_err("flush", dest))?;
    remove(journal)?;
    progress.set_resumed(t.data + t.zero);
    Ok(ResumeReport {
        journal: journal.to_path_buf(),
        header: again.header,
        dest_before: v.dest_before,
        records: t.records,
        data_bytes: t.data,
        zero_bytes: t.zero,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_head_round_trips_and_refuses_damage() {
        let id = StreamIdentity::Vhd {
            unique_id: uuid::Uuid::from_u128(7),
            timestamp: 9,
        };
        let h = encode_head(&id);
        assert_eq!(decode_head(&h).unwrap(), id);
        for at in [0, 9, 11, 20, HEAD_LEN - 1] {
            let mut b = h;
            b[at] ^= 1;
            assert!(decode_head(&b).is_err(), "byte {at}");
        }
    }

    #[test]
    fn the_journal_sits_beside_the_destination() {
        assert_eq!(
            journal_path(Path::new("/a/b/disk.vhdx")),
            Path::new("/a/b/disk.vhdx.vdisk-receive")
        );
        assert_eq!(
            journal_path(Path::new("disk.vhd")),
            Path::new("disk.vhd.vdisk-receive")
        );
    }
}
