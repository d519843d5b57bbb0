//! [`BlockDevice`]: what a guest sees — a virtual disk of fixed size made of logical sectors.
//!
//! Every method takes `&self`; implementations are `Send + Sync` and lock inside so that many
//! queues can do I/O at once. Offsets and lengths must be multiples of the logical sector size
//! (use [`check_request`] at the top of each method); the byte-granular helpers
//! [`read_bytes`] and [`write_bytes`] do read-modify-write for callers such as a CLI.
//!
//! [`BlockDevice::block_status`] reports what lies at an offset — data, zeros, or nothing
//! (fall through to a parent) — so that copy, convert, merge and mirror can skip holes and a
//! differencing chain can find the sectors a layer lacks.

use std::io::{IoSlice, IoSliceMut};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{bounce_in, bounce_out, raw_total, IoHandle, RawBuf, RAW_BOUNCE};

/// Static facts about a [`BlockDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size of the virtual disk in bytes (a multiple of `logical_sector_size`).
    pub virtual_size: u64,
    /// Logical sector size in bytes (512 or 4096): the unit of addressing.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes: the unit below which writes are read-modify-write.
    pub physical_sector_size: u32,
    /// `true` if writes are refused.
    pub read_only: bool,
    /// A stable identity of the disk when the format has one (VHDX disk id, VHD unique id).
    pub disk_id: Option<uuid::Uuid>,
    /// Short name of the format ("raw", "vhd", "vhdx", ...).
    pub format: &'static str,
}

impl DiskInfo {
    /// Info for a writable disk of `virtual_size` bytes with 512-byte sectors.
    pub fn new(format: &'static str, virtual_size: u64) -> Self {
        DiskInfo {
            virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            read_only: false,
            disk_id: None,
            format,
        }
    }
}

/// How an image format opens an image (`vhd_format::VhdFile::open`,
/// `vhdx_format::VhdxFile::open`, both re-exported there as `OpenOptions`): writable unless
/// [`read_only`](Self::read_only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageOpenOptions {
    read_only: bool,
}

impl ImageOpenOptions {
    /// A writable open (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens read-only when `yes`: nothing is ever written to the storage (a VHDX's dirty
    /// log is replayed in memory only).
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Whether the open is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// What a run of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockStatus {
    /// Data stored in this layer (may happen to be zeros).
    Data,
    /// Reads as zeros, known without reading (a hole, a ZERO block, an unmapped block).
    Zero,
    /// Not present in this layer: a differencing layer's parent supplies it; a base layer
    /// reads it as zeros.
    Unallocated,
}

/// One run of [`BlockStatus`] as reported by [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRun {
    /// What the run holds.
    pub status: BlockStatus,
    /// Length of the run in bytes, at least one sector and at most the length asked.
    pub len: u64,
    /// Where the run's data lies in the container file, when it is `Data` stored contiguously.
    pub file_offset: Option<u64>,
}

/// Where a piece of a request lives, as a device's in-memory tables say (see
/// [`BlockDevice::map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// `len` bytes at `file_offset` of the file `handle`.
    File {
        /// The file.
        handle: IoHandle,
        /// Where the bytes start in it.
        file_offset: u64,
        /// How many.
        len: u64,
    },
    /// `len` bytes that read as zeros (never in a write's mapping).
    Zero {
        /// How many.
        len: u64,
    },
    /// `len` bytes this layer does not hold: a differencing layer's parent supplies them.
    /// Only a layer of a chain maps to this; a chain resolves it through its parents.
    Parent {
        /// How many.
        len: u64,
    },
}

impl Mapping {
    /// The bytes the piece covers.
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::File { len, .. } | Mapping::Zero { len } | Mapping::Parent { len } => len,
        }
    }

    /// Whether the piece covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `m` to `out`, merging it into the last piece when it continues it.
pub fn push_mapping(out: &mut Vec<Mapping>, m: Mapping) {
    if m.is_empty() {
        return;
    }
    match (out.last_mut(), m) {
        (
            Some(Mapping::File {
                handle: h0,
                file_offset: o0,
                len: l0,
            }),
            Mapping::File {
                handle,
                file_offset,
                len,
            },
        ) if *h0 == handle && o0.checked_add(*l0) == Some(file_offset) => *l0 += len,
        (Some(Mapping::Zero { len: l0 }), Mapping::Zero { len }) => *l0 += len,
        (Some(Mapping::Parent { len: l0 }), Mapping::Parent { len }) => *l0 += len,
        _ => out.push(m),
    }
}

/// A virtual disk.
pub trait BlockDevice: Send + Sync {
    /// Static facts: size, sector sizes, read-only, identity.
    fn info(&self) -> DiskInfo;

    /// Reads `buf.len()` bytes at `offset` (both sector-aligned).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset` (both sector-aligned).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Scatter read: fills `bufs` in order from `offset`. The total length must be
    /// sector-aligned; single buffers need not be.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        bounce_read_vectored(self, bufs, offset)
    }

    /// Gather write: writes `bufs` in order from `offset`. The total length must be
    /// sector-aligned; single buffers need not be.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        bounce_write_vectored(self, bufs, offset)
    }

    /// Scatter read into raw memory (for callers such as a vhost-user backend whose buffers
    /// are guest memory, which must never become Rust references): fills the concatenation of
    /// `bufs` from `offset`. The total length must be sector-aligned; single buffers need not
    /// be. The default checks the request, then reads pieces of at most 256 KiB into a bounce
    /// buffer with [`read_at`](Self::read_at) and copies them out; [`RawDisk`](crate::RawDisk)
    /// reads straight into the buffers.
    ///
    /// # Safety
    /// Every [`RawBuf`] must be valid for writes of `len` bytes until the call returns (it may
    /// alias other buffers and be changed concurrently; see [`RawBuf`]).
    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { bounce_read_raw(self, bufs, offset) }
    }

    /// Gather write from raw memory: writes the concatenation of `bufs` at `offset`. The total
    /// length must be sector-aligned. The default checks the request, then copies pieces of at
    /// most 256 KiB into a bounce buffer and writes them with [`write_at`](Self::write_at);
    /// [`RawDisk`](crate::RawDisk) writes straight from the buffers.
    ///
    /// # Safety
    /// Every [`RawBuf`] must be valid for reads of `len` bytes until the call returns (it may
    /// alias other buffers and be changed concurrently; see [`RawBuf`]).
    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { bounce_write_raw(self, bufs, offset) }
    }

    /// Makes `[offset, offset+len)` read as zeros. With `unmap` the device may release the
    /// space (as a discard that guarantees zeros); without it the space stays allocated.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;

    /// Hints that `[offset, offset+len)` is no longer needed. Afterwards the range reads as
    /// zeros or as its old contents (formats here always give zeros or the parent's data).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Reports the run starting at `offset` (sector-aligned), looking at most `len` bytes.
    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun>;

    /// Reads `buf.len()` bytes at `offset` that the caller already knows to be
    /// [`BlockStatus::Data`]: [`block_status`](Self::block_status) said so for the whole range
    /// and nothing has written or discarded it since (a read-only layer of a chain, whose
    /// resolution the chain caches). The device may then skip its per-sector allocation checks
    /// (a differencing layer's sector bitmap) and read its allocated block directly.
    ///
    /// The request is checked as for [`read_at`](Self::read_at). On a range that is not all
    /// data the bytes returned are unspecified but come from this device (an unallocated block
    /// still reads as zeros); it is never undefined behaviour, a panic or another file's data.
    /// The default is [`read_at`](Self::read_at).
    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at(buf, offset)
    }

    /// Maps the request `[offset, offset+len)` to where its bytes live, from the device's
    /// in-memory tables and without moving payload, appending the pieces to `out` in order,
    /// so that an I/O engine ([`crate::engine`]) can move the bytes itself with many requests
    /// in flight. Returns `Ok(true)` when `out` then covers the whole request and moving the
    /// bytes is all the request needs; `Ok(false)` (the default) when it cannot be mapped so
    /// (memory storage, data held in memory, and for a `write` anything that needs metadata:
    /// an allocation, a bitmap update, the first write of a session): the caller uses
    /// [`read_raw_at`](Self::read_raw_at)/[`write_raw_at`](Self::write_raw_at) instead.
    /// `out` may hold a partial mapping after `Ok(false)`; the caller discards it.
    ///
    /// The request is checked as for [`read_at`](Self::read_at)/[`write_at`](Self::write_at).
    /// A write mapping never holds [`Mapping::Zero`] or [`Mapping::Parent`]. The mapping stays
    /// valid until the range is discarded or written with zeroes (which may release blocks):
    /// callers must not overlap those with mapped I/O in flight, as a guest must not overlap
    /// its own requests. A failed mapped write must be reported with
    /// [`mapped_write_failed`](Self::mapped_write_failed).
    fn map(&self, offset: u64, len: u64, write: bool, out: &mut Vec<Mapping>) -> Result<bool> {
        let _ = (offset, len, write, out);
        Ok(false)
    }

    /// Tells the device that a write it mapped failed, so that it refuses further writes as
    /// it would after a failure of its own (fail-stop). The default does nothing.
    fn mapped_write_failed(&self, err: &Error) {
        let _ = err;
    }

    /// Maps a write that [`map`](Self::map) refused because it needs new space (an
    /// allocation, or sector bitmap bits of a differencing block), so that an I/O engine can
    /// write its payload itself: reserves the space from in-memory tables, appends the
    /// [`Mapping::File`] pieces the bytes go to (in order, covering the request) to `out`,
    /// and returns the [`WriteGuard`] that publishes the new metadata once the payload is
    /// written. Until then reads of the range see the old contents; the metadata becomes
    /// durable at a later [`flush`](Self::flush), which syncs the payload before it (the
    /// format's order). Never does I/O and never waits for another request.
    ///
    /// `Ok(None)` (the default) when the device cannot take the write this way now (another
    /// request is allocating the same block, metadata that is not in memory yet, a layer
    /// that must see every write, many changes waiting for a commit): the caller then uses
    /// [`write_raw_at`](Self::write_raw_at), which waits, commits and allocates itself. `out`
    /// may hold a partial mapping after `Ok(None)`; the caller discards it. Checked as
    /// [`write_at`](Self::write_at) is.
    fn map_allocating(
        self: std::sync::Arc<Self>,
        offset: u64,
        len: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<Option<Box<dyn WriteGuard>>> {
        let _ = (offset, len, out);
        Ok(None)
    }
}

/// The new space an allocating write reserved (see [`BlockDevice::map_allocating`]). Complete
/// it with the result of writing every piece of the mapping; dropping it uncompleted gives the
/// space up as if the write had failed (the range keeps its old contents).
pub trait WriteGuard: Send {
    /// Publishes the write's new metadata in memory (the blocks become visible to reads and
    /// to the next flush) after `Ok(())`; after an error, gives the space up, latches the
    /// device's fail-stop state and returns the error. Does no I/O, so an engine may call it
    /// on its completion thread.
    fn complete(self: Box<Self>, result: Result<()>) -> Result<()>;
}

/// Checks that `[offset, offset+len)` is sector-aligned for `info` and inside the disk, and, for
/// writes, that the disk is writable.
pub fn check_request(info: &DiskInfo, offset: u64, len: u64, write: bool) -> Result<()> {
    if write && info.read_only {
        return Err(Error::new(ErrorKind::ReadOnly, "the disk is read-only"));
    }
    let sector = u64::from(info.logical_sector_size.max(1));
    if offset % sector != 0 || len % sector != 0 {
        return Err(Error::new(
            ErrorKind::Unaligned,
            format!("request {offset}+{len} is not aligned to {sector}-byte sectors"),
        ));
    }
    crate::storage::check_bounds(offset, len, info.virtual_size).map(|_| ())
}

/// The default [`BlockDevice::read_vectored_at`]: one [`read_at`](BlockDevice::read_at) into a
/// buffer, then copied out. For implementations that go direct only sometimes.
pub fn bounce_read_vectored<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut tmp = vec![0u8; total];
    dev.read_at(&mut tmp, offset)?;
    let mut pos = 0;
    for b in bufs.iter_mut() {
        let n = b.len();
        b.copy_from_slice(&tmp[pos..pos + n]);
        pos += n;
    }
    Ok(())
}

/// The default [`BlockDevice::write_vectored_at`]: the buffers gathered into one, then one
/// [`write_at`](BlockDevice::write_at).
pub fn bounce_write_vectored<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> Result<()> {
    let tmp: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
    dev.write_at(&tmp, offset)
}

/// Bounce piece for `dev`: [`RAW_BOUNCE`] rounded down to whole sectors.
fn bounce_piece(info: &DiskInfo) -> u64 {
    let sector = u64::from(info.logical_sector_size.max(1));
    ((RAW_BOUNCE as u64) / sector).max(1) * sector
}

/// The default [`BlockDevice::read_raw_at`]: checks the whole request, then reads pieces into
/// a bounce buffer with `read_at` and copies them out. Usable by implementations that override
/// `read_raw_at` but sometimes cannot go direct.
///
/// # Safety
/// As [`BlockDevice::read_raw_at`].
pub unsafe fn bounce_read_raw<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[RawBuf],
    offset: u64,
) -> Result<()> {
    let info = dev.info();
    let total = raw_total(bufs)?;
    check_request(&info, offset, total, false)?;
    // SAFETY: forwarded caller contract.
    unsafe {
        bounce_in(bufs, total, bounce_piece(&info), |b, pos| {
            dev.read_at(b, offset + pos)
        })
    }
}

/// The default [`BlockDevice::write_raw_at`]: checks the whole request, then copies pieces
/// into a bounce buffer and writes them with `write_at`.
///
/// # Safety
/// As [`BlockDevice::write_raw_at`].
pub unsafe fn bounce_write_raw<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[RawBuf],
    offset: u64,
) -> Result<()> {
    let info = dev.info();
    let total = raw_total(bufs)?;
    check_request(&info, offset, total, true)?;
    // SAFETY: forwarded caller contract.
    unsafe {
        bounce_out(bufs, total, bounce_piece(&info), |b, pos| {
            dev.write_at(b, offset + pos)
        })
    }
}

/// The aligned span `[start, end)` covering `[offset, offset+len)` for `sector`.
fn aligned_span(offset: u64, len: u64, sector: u64) -> Result<(u64, u64)> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "offset overflows u64"))?;
    let start = offset - offset % sector;
    let rem = end % sector;
    let end = if rem == 0 {
        end
    } else {
        end.checked_add(sector - rem)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "offset overflows u64"))?
    };
    Ok((start, end))
}

/// Reads any byte range of `dev`, widening to sector boundaries internally.
pub fn read_bytes(dev: &dyn BlockDevice, buf: &mut [u8], offset: u64) -> Result<()> {
    let sector = u64::from(dev.info().logical_sector_size.max(1));
    let (start, end) = aligned_span(offset, buf.len() as u64, sector)?;
    if start == offset && end == offset + buf.len() as u64 {
        return dev.read_at(buf, offset);
    }
    let mut tmp = vec![0u8; usize::try_from(end - start).map_err(too_big)?];
    dev.read_at(&mut tmp, start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
    Ok(())
}

/// Writes any byte range of `dev`, doing read-modify-write of partial sectors.
pub fn write_bytes(dev: &dyn BlockDevice, buf: &[u8], offset: u64) -> Result<()> {
    let sector = u64::from(dev.info().logical_sector_size.max(1));
    let (start, end) = aligned_span(offset, buf.len() as u64, sector)?;
    if start == offset && end == offset + buf.len() as u64 {
        return dev.write_at(buf, offset);
    }
    let mut tmp = vec![0u8; usize::try_from(end - start).map_err(too_big)?];
    dev.read_at(&mut tmp, start)?;
    let skip = (offset - start) as usize;
    tmp[skip..skip + buf.len()].copy_from_slice(buf);
    dev.write_at(&tmp, start)
}

fn too_big(_: std::num::TryFromIntError) -> Error {
    Error::new(ErrorKind::InvalidInput, "request too large for memory")
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn info(&self) -> DiskInfo {
        (**self).info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { (**self).read_raw_at(bufs, offset) }
    }
    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { (**self).write_raw_at(bufs, offset) }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        (**self).write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        (**self).block_status(offset, len)
    }
    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_data_at(buf, offset)
    }
    fn map(&self, offset: u64, len: u64, write: bool, out: &mut Vec<Mapping>) -> Result<bool> {
        (**self).map(offset, len, write, out)
    }
    fn mapped_write_failed(&self, err: &Error) {
        (**self).mapped_write_failed(err)
    }
    fn map_allocating(
        self: std::sync::Arc<Self>,
        offset: u64,
        len: u64,
        out: &mut Vec<Mapping>,
    ) -> Result<Option<Box<dyn WriteGuard>>> {
        T::map_allocating(std::sync::Arc::clone(&*self), offset, len, out)
    }
}
