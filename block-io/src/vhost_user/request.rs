//! One virtio-blk request: parse a descriptor chain, run it against the [`BlockDevice`], write
//! the status byte (virtio 1.2, 5.2.6 "Device Operation").
//!
//! The chain is read as a stream of device-readable bytes followed by a stream of
//! device-writable bytes (any layout, 2.7.4 "Message Framing"): the first 16 readable bytes are
//! the header `{type u32, ioprio u32, sector u64}`, the last writable byte is the status. The
//! rules a request must pass, and the status it gets when it does not, follow
//! qemu-storage-daemon's `virtio_blk_process_req`, so that both answer the same requests the
//! same way; on top of that a chain the device cannot trust (a readable descriptor after a
//! writable one, data flowing the wrong way, a descriptor outside guest memory, a short header)
//! completes with IOERR instead of being dropped. A chain with no writable byte for the status
//! completes with a used length of 0. Nothing here panics on guest input.
//!
//! Data moves zero-copy: the data descriptors become [`RawBuf`]s (host pointers into guest
//! memory, obtained through vm-memory's bounds-checked `get_slices`) handed to
//! [`BlockDevice::read_raw_at`]/[`BlockDevice::write_raw_at`]; see the module docs of
//! [`crate::vhost_user`] for why that is sound.

use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use crate::device::BlockDevice;
use crate::engine::Control;
use crate::error::ErrorKind;
use crate::storage::RawBuf;

/// Request types (virtio 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush the volatile write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device identifier, 20 bytes.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Legacy barrier flag, masked off the type like QEMU does.
const VIRTIO_BLK_T_BARRIER: u32 = 0x8000_0000;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the request header.
pub const HEADER_LEN: usize = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Flag of a discard/write-zeroes segment: the device may unmap.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Largest discard, in 512-byte sectors (QEMU's VIRTIO_BLK_MAX_DISCARD_SECTORS).
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Largest write-zeroes, in 512-byte sectors (QEMU's VIRTIO_BLK_MAX_WRITE_ZEROES_SECTORS).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// Largest read or write in bytes (QEMU's BDRV_REQUEST_MAX_SECTORS * 512).
const MAX_RW_BYTES: u64 = ((i32::MAX as u64) >> 9) << 9;
/// Bytes in a virtio-blk sector: `sector` fields and capacity count these.
const SECTOR: u64 = 512;

/// What the device serving the requests is: the parts of it a request needs.
pub(crate) struct Target<'a> {
    pub dev: &'a dyn BlockDevice,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    pub read_only: bool,
    pub id: &'a [u8; ID_LEN],
}

/// One descriptor of a chain, as the guest wrote it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A scatter-gather list over guest memory, every piece checked to lie in guest memory.
struct SgList<'m> {
    slices: Vec<VolatileSlice<'m, ()>>,
    len: u64,
}

impl<'m> SgList<'m> {
    /// Resolves `descs` to slices of `mem`; `None` if any byte lies outside guest memory.
    fn new(mem: &'m GuestMemoryMmap, descs: &[Desc], access: Permissions) -> Option<Self> {
        let mut slices = Vec::with_capacity(descs.len());
        let mut len = 0u64;
        for d in descs {
            if d.len == 0 {
                continue;
            }
            let it = mem.get_slices(d.addr, d.len as usize, access).ok()?;
            for s in it {
                slices.push(s.ok()?);
            }
            len += u64::from(d.len);
        }
        Some(SgList { slices, len })
    }

    /// Visits the pieces covering `[pos, pos + n)`, handing each slice and the matching range
    /// of a buffer of length `n`.
    fn for_range(
        &self,
        pos: u64,
        n: usize,
        mut f: impl FnMut(&VolatileSlice<'m, ()>, usize, usize),
    ) {
        let mut skip = pos;
        let mut done = 0usize;
        for s in &self.slices {
            if done == n {
                break;
            }
            let sl = s.len() as u64;
            if skip >= sl {
                skip -= sl;
                continue;
            }
            let take = ((sl - skip) as usize).min(n - done);
            if let Ok(sub) = s.subslice(skip as usize, take) {
                f(&sub, done, take);
            }
            done += take;
            skip = 0;
        }
    }

    /// Host pointers to guest bytes `[pos, pos + n)` for the device to write into (an IN
    /// request), with the guards that keep them mapped. `self` was built with
    /// [`Permissions::Write`].
    fn raw_mut(&self, pos: u64, n: usize) -> RawList {
        let mut l = RawList::default();
        self.for_range(pos, n, |s, _, take| {
            let g = s.ptr_guard_mut();
            l.bufs.push(RawBuf {
                ptr: g.as_ptr(),
                len: take.min(g.len()),
            });
            l.guards_mut.push(g);
        });
        l
    }

    /// Host pointers to guest bytes `[pos, pos + n)` for the device to read from (an OUT
    /// request), with the guards that keep them mapped.
    fn raw(&self, pos: u64, n: usize) -> RawList {
        let mut l = RawList::default();
        self.for_range(pos, n, |s, _, take| {
            let g = s.ptr_guard();
            l.bufs.push(RawBuf {
                // Only ever read through: `write_raw_at` reads its buffers.
                ptr: g.as_ptr().cast_mut(),
                len: take.min(g.len()),
            });
            l.guards.push(g);
        });
        l
    }

    /// Copies guest bytes `[pos, pos + buf.len())` into `buf`.
    fn read(&self, pos: u64, buf: &mut [u8]) {
        let n = buf.len();
        self.for_range(pos, n, |s, at, take| {
            s.copy_to(&mut buf[at..at + take]);
        });
    }

    /// Copies `buf` into guest bytes `[pos, pos + buf.len())`.
    fn write(&self, pos: u64, buf: &[u8]) {
        self.for_range(pos, buf.len(), |s, at, take| {
            s.copy_from(&buf[at..at + take]);
        });
    }
}

/// [`RawBuf`]s over guest memory and the vm-memory guards that keep them mapped (a no-op for
/// plain mmap-ed memory; with Xen grants the guard owns the mapping) until dropped.
#[derive(Default)]
struct RawList {
    bufs: Vec<RawBuf>,
    guards: Vec<PtrGuard>,
    guards_mut: Vec<PtrGuardMut>,
}

impl RawList {
    fn len(&self) -> u64 {
        self.bufs.iter().map(|b| b.len as u64).sum()
    }
}

/// Runs the request made of `descs` and returns the used length to report (0 when the chain
/// has no place for a status byte).
pub(crate) fn process(mem: &GuestMemoryMmap, descs: &[Desc], target: &Target<'_>) -> u32 {
    match prepare(mem, descs, target) {
        Prepared::Done(used) => used,
        Prepared::Io(io) => {
            let r = io.run_sync(target.dev);
            io.finish(mem, r)
        }
    }
}

/// A request parsed and checked: either finished, or a read or write whose data phase is
/// still to run (by the caller: synchronously, or on an I/O engine).
pub(crate) enum Prepared {
    /// Finished, status written: the used length to report.
    Done(u32),
    /// A read or write to run, then [`IoRequest::finish`].
    Io(IoRequest),
}

/// The data phase of an IN or OUT request (host pointers into guest memory, with the guards
/// that keep them mapped), or a FLUSH, DISCARD or WRITE_ZEROES, and where its status goes.
pub(crate) struct IoRequest {
    /// A request without data (`write`, `offset` and the buffers mean nothing).
    pub control: Option<Control>,
    /// OUT (the device reads guest memory) rather than IN.
    pub write: bool,
    /// Byte offset on the disk.
    pub offset: u64,
    list: RawList,
    status_addr: GuestAddress,
    used: u32,
}

impl IoRequest {
    /// The guest buffers of the data phase.
    pub(crate) fn bufs(&self) -> &[RawBuf] {
        &self.list.bufs
    }

    /// Runs the data phase with the device's synchronous raw methods.
    pub(crate) fn run_sync(&self, dev: &dyn BlockDevice) -> crate::Result<()> {
        if let Some(c) = self.control {
            return match c {
                Control::Flush => dev.flush(),
                Control::WriteZeroes { offset, len, unmap } => dev.write_zeroes(offset, len, unmap),
                Control::Discard { offset, len } => dev.discard(offset, len),
            };
        }
        // SAFETY: every RawBuf lies inside a VolatileSlice that `get_slices` checked to be in
        // guest memory with the permission the direction needs; the memory snapshot the
        // caller holds keeps the mappings alive, and so do the guards in `list`. Guest memory
        // is shared with the guest and the buffers may alias each other: that is exactly what
        // `RawBuf` allows, as its implementations never make Rust references to it (the
        // kernel reads or writes it, or `ptr::copy` does). `write_raw_at` only reads its
        // buffers, so a guest changing them meanwhile only changes what gets written, as on
        // real hardware.
        unsafe {
            if self.write {
                dev.write_raw_at(&self.list.bufs, self.offset)
            } else {
                dev.read_raw_at(&self.list.bufs, self.offset)
            }
        }
    }

    /// Writes the status for `result` and returns the used length to report. `mem` is the
    /// snapshot the request was prepared with.
    pub(crate) fn finish(self, mem: &GuestMemoryMmap, result: crate::Result<()>) -> u32 {
        let status = match (&self.control, result) {
            // QEMU answers a discard or write-zeroes the device cannot do with UNSUPP.
            (Some(Control::WriteZeroes { .. } | Control::Discard { .. }), Err(e))
                if e.kind() == ErrorKind::Unsupported =>
            {
                VIRTIO_BLK_S_UNSUPP
            }
            (_, r) => status_of(r),
        };
        // Checked when prepared; an error now means the memory went away, nothing to report.
        let _ = mem.write_obj(status, self.status_addr);
        drop(self.list);
        self.used
    }
}

/// What [`run`] decided.
enum Outcome {
    /// The status to write.
    Status(u8),
    /// A data phase to run: (OUT, byte offset, buffers).
    Io(bool, u64, RawList),
    /// A request without data to run (flush, discard, write-zeroes).
    Control(Control),
}

/// Parses and checks the request made of `descs`; runs it unless it is a read or write.
pub(crate) fn prepare(mem: &GuestMemoryMmap, descs: &[Desc], target: &Target<'_>) -> Prepared {
    // 2.7.4.2: device-writable descriptors come after every device-readable one.
    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    let misordered = writable.iter().any(|d| !d.writable);
    let total_w: u64 = writable
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    // The status is the last byte of the last writable descriptor.
    let Some(last) = writable
        .iter()
        .rev()
        .find(|d| d.writable)
        .filter(|d| d.len > 0)
    else {
        return Prepared::Done(0);
    };
    let Some(status_addr) = last.addr.0.checked_add(u64::from(last.len) - 1) else {
        return Prepared::Done(0);
    };
    let status_addr = GuestAddress(status_addr);
    let status_ok = mem
        .get_slices(status_addr, 1, Permissions::Write)
        .is_ok_and(|mut it| it.all(|s| s.is_ok()));
    if !status_ok {
        return Prepared::Done(0);
    }
    let used = u32::try_from(total_w).unwrap_or(u32::MAX);
    // The header and data are read before anything is written to the guest, as QEMU does:
    // a chain whose status byte overlaps its own header means what QEMU says it means.
    let status = if misordered {
        VIRTIO_BLK_S_IOERR
    } else {
        match run(mem, readable, writable, target) {
            Some(Outcome::Status(s)) => s,
            Some(Outcome::Io(write, offset, list)) => {
                return Prepared::Io(IoRequest {
                    control: None,
                    write,
                    offset,
                    list,
                    status_addr,
                    used,
                })
            }
            Some(Outcome::Control(c)) => {
                return Prepared::Io(IoRequest {
                    control: Some(c),
                    write: false,
                    offset: 0,
                    list: RawList::default(),
                    status_addr,
                    used,
                })
            }
            None => VIRTIO_BLK_S_IOERR,
        }
    };
    // The address was checked above; an error now means the memory went away, nothing to
    // report to.
    let _ = mem.write_obj(status, status_addr);
    Prepared::Done(used)
}

/// Parses a well-framed request and runs it unless it is a read or write; `None` means IOERR.
fn run(
    mem: &GuestMemoryMmap,
    readable: &[Desc],
    writable: &[Desc],
    t: &Target<'_>,
) -> Option<Outcome> {
    let rd = SgList::new(mem, readable, Permissions::Read)?;
    let wr = SgList::new(mem, writable, Permissions::Write)?;
    if rd.len < HEADER_LEN as u64 {
        return None;
    }
    let mut hdr = [0u8; HEADER_LEN];
    rd.read(0, &mut hdr);
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) & !VIRTIO_BLK_T_BARRIER;
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let out_len = rd.len - HEADER_LEN as u64;
    // The status byte is not data.
    let in_len = wr.len - 1;
    Some(Outcome::Status(match kind {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                // Data the guest wants read must be device-writable.
                return None;
            }
            return Some(transfer(t, &wr, 0, in_len, sector, true));
        }
        VIRTIO_BLK_T_OUT => {
            if t.read_only {
                return None;
            }
            if in_len != 0 {
                // Data the guest wants written must be device-readable.
                return None;
            }
            return Some(transfer(t, &rd, HEADER_LEN as u64, out_len, sector, false));
        }
        // Run by the caller (off the queue's thread when it has an engine).
        VIRTIO_BLK_T_FLUSH => return Some(Outcome::Control(Control::Flush)),
        VIRTIO_BLK_T_GET_ID => {
            let n = (in_len as usize).min(ID_LEN);
            wr.write(0, &t.id[..n]);
            VIRTIO_BLK_S_OK
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if t.read_only {
                return None;
            }
            return Some(discard_write_zeroes(t, &rd, out_len, kind));
        }
        _ => VIRTIO_BLK_S_UNSUPP,
    }))
}

/// QEMU's `virtio_blk_sect_range_ok`: whole 512-byte sectors, not too big, aligned to the
/// logical block, inside the disk.
fn range_ok(t: &Target<'_>, sector: u64, bytes: u64) -> bool {
    if bytes % SECTOR != 0 || bytes > MAX_RW_BYTES {
        return false;
    }
    if sector.wrapping_mul(SECTOR) % t.block_size.max(1) != 0 {
        return false;
    }
    let n = bytes / SECTOR;
    sector <= t.sectors && n <= t.sectors - sector
}

/// The data phase of an IN request (`inbound`: the device writes `len` bytes of guest memory
/// from `pos` of `sg`) or an OUT request (it reads them), at `sector`: checked, and turned
/// into host pointers for the caller to run.
fn transfer(
    t: &Target<'_>,
    sg: &SgList<'_>,
    pos: u64,
    len: u64,
    sector: u64,
    inbound: bool,
) -> Outcome {
    if !range_ok(t, sector, len) {
        return Outcome::Status(VIRTIO_BLK_S_IOERR);
    }
    if len == 0 {
        return Outcome::Status(VIRTIO_BLK_S_OK);
    }
    // range_ok bounds `len` by MAX_RW_BYTES, so it fits a usize.
    let Ok(n) = usize::try_from(len) else {
        return Outcome::Status(VIRTIO_BLK_S_IOERR);
    };
    let l = if inbound {
        sg.raw_mut(pos, n)
    } else {
        sg.raw(pos, n)
    };
    if l.len() != len {
        return Outcome::Status(VIRTIO_BLK_S_IOERR);
    }
    Outcome::Io(!inbound, sector * SECTOR, l)
}

/// OK for success, IOERR for any error.
fn status_of(r: crate::Result<()>) -> u8 {
    match r {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(_) => VIRTIO_BLK_S_IOERR,
    }
}

/// One `{sector u64, num_sectors u32, flags u32}` segment (QEMU supports exactly one, and so do
/// we: `max_discard_seg` and `max_write_zeroes_seg` are 1).
fn discard_write_zeroes(t: &Target<'_>, rd: &SgList<'_>, len: u64, kind: u32) -> Outcome {
    if len > 16 {
        return Outcome::Status(VIRTIO_BLK_S_UNSUPP);
    }
    if len < 16 {
        return Outcome::Status(VIRTIO_BLK_S_IOERR);
    }
    let mut seg = [0u8; 16];
    rd.read(HEADER_LEN as u64, &mut seg);
    let sector = u64::from_le_bytes([
        seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
    ]);
    let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let max = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
        MAX_WRITE_ZEROES_SECTORS
    } else {
        MAX_DISCARD_SECTORS
    };
    if num > max {
        return Outcome::Status(VIRTIO_BLK_S_IOERR);
    }
    let bytes = u64::from(num) * SECTOR;
    if !range_ok(t, sector, bytes) {
        return Outcome::Status(VIRTIO_BLK_S_IOERR);
    }
    // 5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
    if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Outcome::Status(VIRTIO_BLK_S_UNSUPP);
    }
    let offset = sector * SECTOR;
    if bytes == 0 {
        // QEMU completes an empty range without touching the disk.
        return Outcome::Status(VIRTIO_BLK_S_OK);
    }
    // Run by the caller (off the queue's thread when it has an engine).
    Outcome::Control(if kind == VIRTIO_BLK_T_WRITE_ZEROES {
        Control::WriteZeroes {
            offset,
            len: bytes,
            unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    } else {
        if flags & WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Outcome::Status(VIRTIO_BLK_S_UNSUPP);
        }
        Control::Discard { offset, len: bytes }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemStorage;
    use crate::raw::RawDisk;
    use crate::storage::Storage;

    fn target<'a>(dev: &'a dyn BlockDevice, id: &'a [u8; ID_LEN]) -> Target<'a> {
        let info = dev.info();
        Target {
            dev,
            sectors: info.virtual_size / 512,
            block_size: u64::from(info.logical_sector_size),
            read_only: info.read_only,
            id,
        }
    }

    #[test]
    fn range_checks_match_qemu() {
        let m = MemStorage::new();
        m.set_len(1 << 20).unwrap();
        let d = RawDisk::new(m).unwrap();
        let id = [0u8; ID_LEN];
        let t = target(&d, &id);
        assert!(range_ok(&t, 0, 1 << 20));
        assert!(range_ok(&t, 2048, 0));
        assert!(!range_ok(&t, 2049, 0));
        assert!(!range_ok(&t, 2047, 1024));
        assert!(!range_ok(&t, 0, 511));
        assert!(!range_ok(&t, u64::MAX, 512));
        assert!(!range_ok(&t, 0, MAX_RW_BYTES + 512));
    }

    #[test]
    fn status_goes_in_the_last_writable_byte() {
        let m = MemStorage::from_bytes(&[7u8; 4096]);
        let d = RawDisk::new(m).unwrap();
        let id = *b"abcdefghijklmnopqrst";
        let t = target(&d, &id);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0)).unwrap();
        let descs = [
            Desc {
                addr: GuestAddress(0),
                len: 16,
                writable: false,
            },
            // Data and status in one descriptor.
            Desc {
                addr: GuestAddress(0x1000),
                len: 513,
                writable: true,
            },
        ];
        assert_eq!(process(&mem, &descs, &t), 513);
        let mut out = [0u8; 513];
        mem.read_slice(&mut out, GuestAddress(0x1000)).unwrap();
        assert!(out[..512].iter().all(|&b| b == 7));
        assert_eq!(out[512], VIRTIO_BLK_S_OK);
        // No writable byte at all: nothing to report, nothing written.
        assert_eq!(process(&mem, &descs[..1], &t), 0);
    }
}
