//! `send` / `receive`: a disk's allocated data as one checksummed, compressed byte stream
//! that any pipe can carry (`vdisk send IMG | ssh host vdisk receive DEST`), and the image
//! rebuilt from it at the other end (issue 15, item 3).
//!
//! - [`send`] walks a [`chain::Disk`] with `block_status` (through every layer: a chain is
//!   sent flattened), skips what reads as nothing, sends ranges that read as zeros as ZERO
//!   records and the rest as DATA records of at most [`SendOptions::chunk`] bytes,
//!   compressed with zstd by [`SendOptions::threads`] threads and written in order. With
//!   [`SendOptions::since`] it sends only what the layers above a parent image (the
//!   *snapshot*) hold, and names the snapshot in the header.
//! - [`receive`] reads a stream into a destination image: a new raw, VHD or VHDX image for a
//!   full stream, or the existing snapshot for an incremental one, after checking that the
//!   destination *is* that snapshot, through a journal that makes the apply recoverable.
//!   [`resume`] finishes an apply that was cut short.
//!
//! # Adaptive compression
//!
//! The compressing threads hand finished records to the writer through a bounded queue
//! (`2 × threads + 2` records). The writer looks at the queue's depth after every record
//! and every [`ADAPT_EVERY`] records moves the level one step along a ladder
//! (`none, zstd -5, -1, 1, 3, 6, 9`): up when the queue was mostly full (the output is the
//! bottleneck, so bytes saved are time saved), down when it was mostly empty (the
//! compressors are the bottleneck), down to storing records raw, so compression never
//! slows a fast link. A chunk that zstd shrinks by less than 1/32 is stored raw whatever
//! the level. [`SendReport::levels`] says how many records went at each level.
//! `--level N` fixes the level (0: no compression).
//!
//! # Wire format, version 1
//!
//! All integers little-endian. The stream is a header, records, and an END record, and
//! nothing after it.
//!
//! Header (103 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VDSKSEND` |
//! | 8 | 2 | version, 1 |
//! | 10 | 2 | flags: bit 0 = incremental (the base identity names the snapshot); others 0 |
//! | 12 | 8 | virtual size in bytes (a multiple of the logical sector size) |
//! | 20 | 4 | logical sector size (512 or 4096) |
//! | 24 | 4 | physical sector size (512..=65536, a power of two, at least the logical) |
//! | 28 | 4 | largest DATA length in this stream (at most [`MAX_RECORD`], sector multiple) |
//! | 32 | 1 | source format: 0 raw, 1 VHD, 2 VHDX |
//! | 33 | 33 | source identity (below): the top image sent |
//! | 66 | 33 | base identity: the snapshot of an incremental stream, kind 0 otherwise |
//! | 99 | 4 | crc32c of bytes 0..99 |
//!
//! An identity is a kind byte and 32 bytes: 0 none (32 zero bytes); 1 raw content
//! fingerprint (16 bytes, then 16 zero); 2 VHD (footer unique id 16 bytes, footer timestamp
//! u32, 12 zero); 3 VHDX (DataWriteGuid 16 bytes, virtual disk id 16 bytes). UUIDs are
//! stored in RFC 4122 byte order. A raw image has no identity of its own: its fingerprint
//! is crc32c over its size and [`FINGERPRINT_SAMPLES`] samples of 64 KiB spread over it,
//! which catches a wrong file but not a change between the samples.
//!
//! Records, each starting with a tag byte, at increasing, non-overlapping, sector-aligned
//! offsets inside the virtual size:
//!
//! - DATA `b'D'`: offset u64, length u32 (1..= the header's largest DATA length), codec u8
//!   (0 none, 1 zstd frame), level i8 (the zstd level used, informative), stored length
//!   u32 (the payload's; equal to the length for codec none, at most zstd's compress bound
//!   otherwise), payload, then crc32c of the record from its tag to the payload's end. A
//!   zstd payload must decompress to exactly `length` bytes.
//! - ZERO `b'Z'`: offset u64, length u64 (a sector multiple); crc32c of tag..length. The
//!   range reads as zeros.
//! - END `b'E'`: records u64 (DATA and ZERO records before it), data bytes u64 (the sum of
//!   DATA lengths), zero bytes u64 (the sum of ZERO lengths), digest u32 (crc32c of every
//!   stream byte before the END record, header included: records lost, repeated or
//!   reordered change it), then crc32c of tag..digest.
//!
//! Every length read from the stream is bounded before it sizes a buffer (a DATA payload
//! by the header's largest DATA length, itself at most [`MAX_RECORD`]), so a hostile stream
//! costs at most a few times 16 MiB of memory.
//!
//! # What receive guarantees
//!
//! A stream that is corrupt (bad magic, unknown version, a checksum mismatch, a record out
//! of order or out of bounds, a bad zstd frame) or truncated is refused with a
//! [`SendError`] naming the cause, the record number and the stream byte, and the
//! destination is left as it was:
//!
//! - **A full stream** makes a new image: [`receive`] refuses a destination that exists,
//!   writes the image into a temporary file beside it (`.NAME.vdisk-recv-PID-N`), and
//!   only after the END record has checked out, the image has been flushed and the file
//!   synced, renames it into place (then syncs the folder). Any error removes the
//!   temporary file.
//! - **An incremental stream** goes into the existing snapshot. [`receive`] opens the
//!   destination, checks its identity against the stream's base identity and its size
//!   against the header (refusing with [`SendError::Lineage`] or [`SendError::Geometry`]
//!   before anything is written), then *spools* the whole stream into a temporary file
//!   beside it (`.NAME.vdisk-spool-PID-N`), verifying every record and the END digest (and
//!   decompressing every DATA record) as it goes. Only a stream that verified completely
//!   is applied, through its journal (below). The journal costs disk space equal to the
//!   stream.
//!
//! # Interrupted receives
//!
//! The records of an incremental stream go into the snapshot in place, so an apply cut
//! short leaves each sector as before or as after, **not** the old or the new disk as a
//! whole. Since the records are absolute DATA and ZERO ranges, applying a verified stream
//! again is idempotent, and an interrupted apply is finished by rolling forward:
//!
//! 1. The verified spool, which holds a small head (magic `VDSKRJNL`, the destination's
//!    identity as checked, a crc32c) and the stream as received, header to END, is synced
//!    and renamed to the destination's **journal**, `NAME.vdisk-receive` beside it
//!    ([`journal_path`], [`JOURNAL_SUFFIX`]), and the folder is synced. Nothing was written
//!    to the destination before this.
//! 2. The journal's records are applied, the destination flushed (a VHDX gets its new
//!    DataWriteGuid with its first write, as any write gives it), the journal removed and
//!    the folder synced. A failure in between (a full disk, an I/O error) is
//!    [`SendError::Interrupted`] and keeps the journal.
//! 3. [`receive`] looks for the destination's journal before it reads its stream, and
//!    [`resume`] does only that: the journal is verified whole (one that does not, torn,
//!    truncated, of bad magic or checksum, is refused with [`SendError::Journal`] naming it
//!    and the destination is not opened), the destination checked to be the image it was
//!    written for (its geometry, and what a write keeps of its identity: a VHD's unique id
//!    and timestamp, a VHDX's virtual disk id; [`SendError::JournalMismatch`]) but **not**
//!    its lineage, which cannot hold once some records landed; then every record is
//!    applied again, the destination flushed and the journal removed
//!    ([`ReceiveReport::resumed`], [`ReceiveProgress::resumed`]). A journal beside a
//!    destination that does not exist is refused ([`SendError::JournalOrphan`]). [`receive`]
//!    then goes on with its stream: the very stream of the journal just finished (same
//!    header) is read, verified and reported as [`ReceiveReport::already_applied`] with
//!    nothing written; any other is checked by its lineage as usual.
//!
//! **Until its journal is finished the destination must not be used**: nothing but
//! [`receive`] and [`resume`] looks for the journal, so opening, serving, sending or
//! copying the image meanwhile sees the half-applied disk as if it were whole (and a
//! write to it would be overwritten by the roll-forward).
//!
//! After a power cut (`tests/crash_jobs.rs`, every write and sync of the fault backend cut,
//! unsynced writes lost or torn): a full stream's DEST does not exist until the image was
//! synced and renamed, and then reads exactly the disk sent (a temporary file
//! `.NAME.vdisk-recv-PID-N` may be left beside it). An incremental stream's DEST always
//! opens and checks clean, and once [`receive`] returned it reads the disk sent; a cut
//! before the journal's rename is durable leaves it as it was (a spool file
//! `.NAME.vdisk-spool-PID-N` may be left, which nothing takes for a journal); a cut after
//! leaves the journal, and finishing it makes DEST read exactly the disk sent. The next
//! [`receive`] into the same DEST removes such temporary files of a process that is gone
//! (no `/proc/PID`, and not its own PID; [`ReceiveReport::removed_stale`]): a receive in
//! another PID namespace or on another host sharing the folder could lose its temporary
//! file that way, and then fails at its rename, before its DEST is made or written. [`receive_new`] and [`receive_into`] are the two halves of [`receive`] on
//! storage or a chain the caller opened ([`resume_into`] the resume).
//!
//! The lineage check compares identities, so its strength is the format's: a VHDX gets a
//! new DataWriteGuid with its first write after open, so a stream applied once (or a
//! snapshot written since) is refused; a VHD's unique id and timestamp do not change when
//! it is written, and a raw image is known by its sampled fingerprint only, so for these a
//! modified copy of the snapshot may pass.

mod journal;
mod receiver;
mod sender;
mod temp;
mod wire;

use std::path::PathBuf;

pub use journal::{journal_path, ResumeReport, JOURNAL_MAGIC, JOURNAL_SUFFIX};
pub use receiver::{
    receive, receive_into, receive_new, resume, resume_into, verify, ReceiveOptions,
    ReceiveProgress, ReceiveReport,
};
pub use sender::{send, Level, LevelUse, SendOptions, SendProgress, SendReport};
pub use wire::{
    Codec, StreamHeader, StreamIdentity, FINGERPRINT_SAMPLES, MAGIC, MAX_RECORD, VERSION,
};

/// Records between two level adjustments of the adaptive compression.
pub const ADAPT_EVERY: u64 = 4;

/// Why a send or a receive failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The stream does not start with the magic bytes.
    #[error("not a vdisk send stream (bad magic {found:02x?})")]
    BadMagic {
        /// The first bytes read.
        found: [u8; 8],
    },
    /// The stream's format version is not one this build reads.
    #[error("stream format version {found} is not supported (this build reads version {VERSION})")]
    Version {
        /// The version in the stream.
        found: u16,
    },
    /// The header's checksum does not match its bytes.
    #[error("stream header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        /// The stored crc32c.
        stored: u32,
        /// The crc32c of the bytes read.
        computed: u32,
    },
    /// A header field is out of range.
    #[error("bad stream header: {0}")]
    BadHeader(String),
    /// A record's checksum does not match its bytes.
    #[error("checksum mismatch at record {record} (stream byte {at})")]
    RecordChecksum {
        /// The record's number, from 1.
        record: u64,
        /// Where the record starts in the stream.
        at: u64,
    },
    /// A record is malformed (unknown tag, out of bounds or order, bad payload).
    #[error("bad record {record} (stream byte {at}): {why}")]
    BadRecord {
        /// The record's number, from 1.
        record: u64,
        /// Where the record starts in the stream.
        at: u64,
        /// What is wrong.
        why: String,
    },
    /// The END record's digest or totals do not match the stream.
    #[error("the stream does not match its END record: {0}")]
    Digest(String),
    /// The stream ended early.
    #[error("the stream is truncated after byte {after}")]
    Truncated {
        /// Bytes read before it ended.
        after: u64,
    },
    /// Bytes follow the END record.
    #[error("bytes follow the END record (at stream byte {at})")]
    Trailing {
        /// Where they start.
        at: u64,
    },
    /// The destination is not the snapshot an incremental stream was sent since.
    #[error(
        "{dest} is not the stream's base snapshot: it is {found}, the stream needs {expected}"
    )]
    Lineage {
        /// The destination.
        dest: PathBuf,
        /// The identity the stream names.
        expected: String,
        /// The destination's.
        found: String,
    },
    /// The destination's geometry does not fit the stream.
    #[error("{dest} does not fit the stream: {why}")]
    Geometry {
        /// The destination.
        dest: PathBuf,
        /// What differs.
        why: String,
    },
    /// A full stream would overwrite an existing image.
    #[error("{0} exists (a full stream makes a new image; remove it first)")]
    DestExists(PathBuf),
    /// An incremental stream needs the snapshot it was sent since.
    #[error(
        "{0} does not exist (an incremental stream is applied to a copy of its base snapshot)"
    )]
    DestMissing(PathBuf),
    /// `--since` names no parent image of the disk sent.
    #[error("{snapshot} is not an image of the chain of {top}")]
    NotInChain {
        /// The snapshot asked for.
        snapshot: PathBuf,
        /// The image sent.
        top: PathBuf,
    },
    /// Invalid options.
    #[error("invalid options: {0}")]
    Invalid(String),
    /// Reading or writing the stream failed.
    #[error("cannot {op} the stream")]
    Stream {
        /// `read` or `write`.
        op: &'static str,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Reading the source disk failed.
    #[error("cannot read the source at offset {offset}")]
    Source {
        /// Where.
        offset: u64,
        /// What the device said.
        #[source]
        source: block_io::Error,
    },
    /// Creating, writing or flushing the destination failed.
    #[error("cannot {op} {path}")]
    Destination {
        /// What was being done.
        op: String,
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: block_io::Error,
    },
    /// A file operation on the temporary file or the destination failed.
    #[error("cannot {op} {path}")]
    File {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The journal of an interrupted receive does not verify (torn, truncated, bad magic
    /// or checksum); the destination was not written.
    #[error("cannot use the receive journal {path}")]
    Journal {
        /// The journal.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<SendError>,
    },
    /// The journal was written for another image than the destination.
    #[error("the receive journal {journal} was written for {recorded}, but {dest} is {found}")]
    JournalMismatch {
        /// The journal.
        journal: PathBuf,
        /// The destination.
        dest: PathBuf,
        /// The identity the journal recorded.
        recorded: String,
        /// The destination's.
        found: String,
    },
    /// `resume` found no journal beside the destination.
    #[error("{dest} has no interrupted receive to finish ({journal} does not exist)")]
    NoJournal {
        /// The destination.
        dest: PathBuf,
        /// Where its journal would be.
        journal: PathBuf,
    },
    /// A journal is left beside a destination that does not exist.
    #[error(
        "{journal} is the journal of an interrupted receive into {dest}, which does not exist \
         (restore {dest} or remove the journal)"
    )]
    JournalOrphan {
        /// The journal.
        journal: PathBuf,
        /// The destination it is for.
        dest: PathBuf,
    },
    /// Applying a verified stream failed part-way: the destination is partly updated and
    /// its journal is kept to finish it.
    #[error(
        "{dest} is partly updated and must not be used until its journal {journal} is \
         finished (vdisk receive --resume)"
    )]
    Interrupted {
        /// The destination.
        dest: PathBuf,
        /// Its journal.
        journal: PathBuf,
        /// What failed.
        #[source]
        source: Box<SendError>,
    },
    /// Opening an image of the chain failed.
    #[error(transparent)]
    Chain(#[from] chain::ChainError),
}
