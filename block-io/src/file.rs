//! [`FileStorage`]: a [`Storage`] on a host file with pread/pwrite.
//!
//! - Positional I/O only (`pread`/`pwrite`/`preadv`/`pwritev`), so any number of threads share
//!   one descriptor without a seek lock.
//! - Optional `O_DIRECT`: requests that are already aligned (buffer address, offset and length
//!   multiples of the alignment, 512 bytes by default) go straight to the device; others bounce
//!   through an [`AlignedBuf`] (unaligned writes do read-modify-write under a mutex so that two
//!   of them sharing a sector cannot lose each other's bytes).
//! - Holes: [`punch_hole`](Storage::punch_hole) uses `fallocate(PUNCH_HOLE | KEEP_SIZE)` and falls
//!   back to writing zeros where the file system cannot; [`extent`](Storage::extent) uses
//!   `SEEK_DATA`/`SEEK_HOLE`.
//! - [`sync_data`](Storage::sync_data) is `fdatasync`, never `File::flush` (which does nothing).
//! - Image locks shared with QEMU (see [`LockMode`] and the `lock` module): a read-write open
//!   holds the writer's OFD locks, a read-only open the reader's, so vdisk and QEMU exclude
//!   each other the way two QEMU processes do. A truncating open takes the locks before it
//!   empties the file, so creating over an image in use fails instead of destroying it.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::lock::{self, Perms};
use crate::storage::{bounce_read_raw, bounce_write_raw, raw_total, Extent, RawBuf, Storage};

/// Most iovecs handed to one `preadv`/`pwritev` (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A heap buffer whose start is aligned (for `O_DIRECT`), built in safe code by over-allocating.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose first byte is aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1).next_power_of_two();
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            raw,
            start,
            len,
            align,
        }
    }
}

impl Clone for AlignedBuf {
    /// A copy in a new allocation, aligned as the original (a derived clone would copy the
    /// start offset of the old allocation into a new one, misaligning it).
    fn clone(&self) -> Self {
        let mut b = AlignedBuf::new(self.len, self.align);
        b.copy_from_slice(self);
        b
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Whether a [`FileStorage`] takes image locks (QEMU's `file.locking` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Take and test QEMU's lock bytes (OFD locks), if the kernel has OFD locks. A read-write
    /// open holds bytes 100, 101, 103 (consistent read, write, resize) and refuses to share
    /// 201, 203 (write, resize), as QEMU does for a VHD/VHDX it opens read-write. A read-only
    /// open holds 100 and refuses 201, 203 (QEMU's backing files, `qemu-img info` and
    /// `qemu-io -r` on VHD/VHDX), or holds 100 alone with
    /// [`share_writes`](OpenOptions::share_writes) (QEMU's read-only raw images and `-U`).
    #[default]
    Auto,
    /// Neither take nor test any lock (QEMU's `file.locking=off`; what `vdisk -U`/
    /// `--force-share` means). Nothing stops another process writing the image meanwhile.
    Off,
}

/// How to open a [`FileStorage`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    read_only: bool,
    create: bool,
    truncate: bool,
    direct: bool,
    alignment: Option<usize>,
    lock: LockMode,
    share_writes: bool,
    random_access: bool,
}

impl OpenOptions {
    /// Read-write, existing file, buffered I/O.
    pub fn new() -> Self {
        Self::default()
    }
    /// Open read-only (writes fail with [`ErrorKind::ReadOnly`]).
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }
    /// Create the file if it does not exist.
    pub fn create(mut self, yes: bool) -> Self {
        self.create = yes;
        self
    }
    /// Truncate the file to zero length on open.
    pub fn truncate(mut self, yes: bool) -> Self {
        self.truncate = yes;
        self
    }
    /// Bypass the page cache with `O_DIRECT`.
    pub fn direct(mut self, yes: bool) -> Self {
        self.direct = yes;
        self
    }
    /// Alignment required by `O_DIRECT` (default 512).
    pub fn alignment(mut self, bytes: usize) -> Self {
        self.alignment = Some(bytes.max(1).next_power_of_two());
        self
    }
    /// Image locks: [`LockMode::Auto`] (default) or [`LockMode::Off`].
    pub fn lock(mut self, mode: LockMode) -> Self {
        self.lock = mode;
        self
    }
    /// Tell the kernel the file is read at random (`POSIX_FADV_RANDOM`): no readahead.
    ///
    /// For a disk served to a guest through the page cache, which reads ahead itself. Besides
    /// sparing the host's readahead, this keeps the page cache in small pages: readahead fills
    /// it with large folios, and a later 4 KiB write into one dirties, and is throttled for,
    /// the whole folio (Linux 6.18 on ext4: 4 KiB random writes into a file read sequentially
    /// run 8-10x slower than into one read with this hint, bound by dirty-page throttling at
    /// the disk's write-back rate). Means nothing with [`direct`](Self::direct). The hint is
    /// set on the open file description, so [`FileStorage::from_file`] sets it for every
    /// duplicate of the caller's descriptor too.
    ///
    /// A writable open also drops the file's clean pages from the page cache
    /// (`POSIX_FADV_DONTNEED`; dirty pages stay): whatever wrote or read the file before
    /// (`qemu-img convert`, `cp`, a sequential read) left them in large folios, and the
    /// guest's 4 KiB writes would pay for whole folios until those leave the cache. Measured
    /// with `vdisk stress` on a 1 GiB VHDX that `qemu-io` had just written: 45,000 guest
    /// requests a second with the folios kept, 125,000 after the drop. The price is a cold
    /// start: the guest reads its working set from the disk again, 4 KiB at a time.
    pub fn random_access(mut self, yes: bool) -> Self {
        self.random_access = yes;
        self
    }
    /// Read-only opens only: let other processes write and resize the file while it is open
    /// (hold only the consistent-read byte, as QEMU does for a read-only raw image). The
    /// default refuses writers (as QEMU does for a backing file or a read-only VHD/VHDX) and
    /// fails if one has the file open. A read-write open always refuses other writers.
    pub fn share_writes(mut self, yes: bool) -> Self {
        self.share_writes = yes;
        self
    }
}

/// A [`Storage`] on a host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// `Some(alignment)` when opened with `O_DIRECT`.
    direct: Option<usize>,
    rmw: Mutex<()>,
    /// The image locks this open file description holds ([`Perms::NONE`] when unlocked).
    locks: Perms,
    /// Whether image locks are in use (lock mode `Auto` and the kernel has OFD locks).
    locking: bool,
}

impl FileStorage {
    /// Opens `path` as `options` say, taking its image locks (see [`LockMode`]). A lock
    /// conflict is an [`ErrorKind::Locked`] error naming the permission, as QEMU words it:
    /// `failed to get "write" lock: is another process using the image PATH?`.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut o = std::fs::OpenOptions::new();
        // Never O_TRUNC: the file is emptied only once its locks are ours (QEMU's
        // raw_co_create: "Step one: Take locks", "Step two: Check", then truncate).
        o.read(true)
            .write(!options.read_only)
            .create(options.create && !options.read_only)
            .truncate(false);
        if options.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| {
            let what = if options.direct && e.raw_os_error() == Some(libc::EINVAL) {
                "the file system does not support O_DIRECT for"
            } else {
                "cannot open"
            };
            Error::io(format!("{what} {}", path.display()), e)
        })?;
        Self::adopt(file, path, options)
    }

    /// Wraps a file the caller already opened (a descriptor handed over by a parent process or
    /// a VMM, say: `File::from(OwnedFd)`), as [`open`](Self::open) would: its image locks are
    /// taken as `options` say and `options.truncate` empties it once they are held. `name`
    /// names the file in errors and in [`path`](Self::path). The descriptor's access mode must
    /// allow what `options` ask: a writable storage over a descriptor opened read-only is an
    /// [`ErrorKind::InvalidInput`] error. `options.direct` sets `O_DIRECT` on the open file
    /// description (an error where the file system does not support it); `options.create`
    /// means nothing here.
    pub fn from_file(file: File, name: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = name.as_ref();
        let fd = file.as_raw_fd();
        // SAFETY: F_GETFL on a descriptor this function owns; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(Error::io(
                format!("cannot read the flags of {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let mode = flags & libc::O_ACCMODE;
        if mode != libc::O_RDWR && (!options.read_only || mode != libc::O_RDONLY) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: the descriptor is open {}, not for {}",
                    path.display(),
                    if mode == libc::O_RDONLY {
                        "read-only"
                    } else {
                        "write-only"
                    },
                    if options.read_only {
                        "reading"
                    } else {
                        "reading and writing"
                    }
                ),
            ));
        }
        if options.direct && flags & libc::O_DIRECT == 0 {
            // SAFETY: F_SETFL on a descriptor this function owns, with an int argument.
            if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
                return Err(Error::io(
                    format!(
                        "the file system does not support O_DIRECT for {}",
                        path.display()
                    ),
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Self::adopt(file, path, options)
    }

    /// Takes the image locks of an open file and builds the storage (`open`, `from_file`).
    fn adopt(file: File, path: &Path, options: &OpenOptions) -> Result<Self> {
        if options.random_access {
            // SAFETY: posix_fadvise on a descriptor this function owns; no memory is passed.
            let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
            if r != 0 {
                return Err(Error::io(
                    format!("cannot turn readahead off for {}", path.display()),
                    std::io::Error::from_raw_os_error(r),
                ));
            }
            if !options.read_only {
                // Only advice: a file system that keeps its pages anyway costs speed, never
                // data (dirty pages are never dropped).
                // SAFETY: as above.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
        let locking = options.lock == LockMode::Auto && lock::ofd_supported(file.as_raw_fd());
        let locks = match (locking, options.read_only, options.share_writes) {
            (false, _, _) => Perms::NONE,
            (true, false, _) => Perms::WRITER,
            (true, true, false) => Perms::READER,
            (true, true, true) => Perms::SHARING_READER,
        };
        // A conflict leaves nothing locked (`change` undoes what it took).
        lock::change(file.as_raw_fd(), path, Perms::NONE, locks)?;
        let storage = FileStorage {
            file,
            path: path.to_path_buf(),
            read_only: options.read_only,
            direct: options.direct.then(|| options.alignment.unwrap_or(512)),
            rmw: Mutex::new(()),
            locks,
            locking,
        };
        if options.truncate && !options.read_only {
            storage
                .file
                .set_len(0)
                .map_err(|e| storage.err("cannot truncate", 0, e))?;
        }
        Ok(storage)
    }

    /// Creates (or truncates) `path` for reading and writing, with the writer's image locks
    /// taken before an existing file is emptied.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(path, &OpenOptions::new().create(true).truncate(true))
    }

    /// Read-only opens: switches between sharing writes and refusing writers (see
    /// [`OpenOptions::share_writes`]) while open, as QEMU changes a node's permissions. Used
    /// once the format is known: a read-only VHD/VHDX refuses writers, a raw image need not.
    /// Refusing can fail with [`ErrorKind::Locked`] if a writer has the file open; the locks
    /// are then as before. Does nothing for read-write opens or with [`LockMode::Off`].
    pub fn set_share_writes(&mut self, yes: bool) -> Result<()> {
        if !self.read_only || !self.locking {
            return Ok(());
        }
        let new = if yes {
            Perms::SHARING_READER
        } else {
            Perms::READER
        };
        lock::change(self.file.as_raw_fd(), &self.path, self.locks, new)?;
        self.locks = new;
        Ok(())
    }

    /// `true` if this open holds image locks (lock mode [`LockMode::Auto`] on a kernel with
    /// OFD locks).
    pub fn is_locked(&self) -> bool {
        self.locking
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `true` if opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The underlying file. Its image locks belong to its open file description (closing
    /// another descriptor of the same file does not drop them) and are released when this
    /// storage is dropped, even if a `try_clone` of the file lives on.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn err(&self, what: &str, offset: u64, e: std::io::Error) -> Error {
        Error::io(format!("{what} {} at {offset}", self.path.display()), e)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    /// `true` if a request can go to the file as is.
    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        match self.direct {
            None => true,
            Some(a) => ptr.align_offset(a) == 0 && len % a == 0 && offset % a as u64 == 0,
        }
    }

    fn span(&self, offset: u64, len: usize) -> Result<(u64, usize)> {
        let a = self.direct.unwrap_or(1) as u64;
        let start = offset - offset % a;
        let end = offset
            .checked_add(len as u64)
            .and_then(|e| e.checked_next_multiple_of(a))
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "offset overflows u64"))?;
        let n = usize::try_from(end - start)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "request too large"))?;
        Ok((start, n))
    }

    /// `true` if every buffer and `offset` suit the file as they are (always without
    /// `O_DIRECT`).
    fn raw_aligned(&self, bufs: &[RawBuf], offset: u64) -> bool {
        match self.direct {
            None => true,
            Some(a) => {
                offset % a as u64 == 0 && bufs.iter().all(|b| self.aligned(b.ptr, b.len, offset))
            }
        }
    }

    /// `preadv`/`pwritev` of `bufs` at `offset`, looping on short transfers. A read that
    /// meets the end of the file is an [`ErrorKind::OutOfRange`] error. With `O_DIRECT`, a
    /// short transfer that leaves the rest unaligned finishes through the bounce path.
    ///
    /// # Safety
    /// Every buffer must be valid for writes (`write == false`) or reads (`write == true`) of
    /// its length until the call returns.
    unsafe fn raw_io(&self, bufs: &[RawBuf], offset: u64, write: bool) -> Result<()> {
        let total = raw_total(bufs)?;
        // Every file position handed to the kernel must fit an off_t.
        match offset.checked_add(total) {
            Some(end) if end <= i64::MAX as u64 => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!("range {offset}+{total} beyond the largest file offset"),
                ))
            }
        }
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| b.len > 0)
            .map(|b| libc::iovec {
                iov_base: b.ptr.cast(),
                iov_len: b.len,
            })
            .collect();
        let mut first = 0usize;
        let mut done = 0u64;
        while first < iov.len() {
            let pos = offset + done;
            let cnt = (iov.len() - first).min(IOV_MAX) as libc::c_int;
            let fd = self.file.as_raw_fd();
            let ptr = iov[first..].as_ptr();
            let n = if write {
                // SAFETY: `ptr` points at `cnt` initialised iovecs that we own; each names a
                // piece of a caller buffer valid for reads (this fn's contract). The kernel
                // only reads that memory; no Rust reference to it exists.
                unsafe { libc::pwritev(fd, ptr, cnt, pos as libc::off_t) }
            } else {
                // SAFETY: as above, the buffers being valid for writes; the kernel writes
                // into them, which aliasing or concurrent access cannot make unsound since
                // we never read them through references.
                unsafe { libc::preadv(fd, ptr, cnt, pos as libc::off_t) }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                let what = if write { "cannot write" } else { "cannot read" };
                return Err(self.err(what, pos, e));
            }
            if n == 0 {
                return Err(if write {
                    Error::new(ErrorKind::Io, "pwritev wrote nothing")
                } else {
                    Error::new(
                        ErrorKind::OutOfRange,
                        format!(
                            "read of {} at {offset}+{total} beyond end of file",
                            self.path.display()
                        ),
                    )
                });
            }
            // Skip what was transferred: whole iovecs, then part of one.
            let mut n = n as usize;
            done += n as u64;
            while first < iov.len() && n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            }
            if n > 0 {
                if let Some(v) = iov.get_mut(first) {
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                    v.iov_len -= n;
                }
            }
            if self.direct.is_some() && first < iov.len() {
                let rest: Vec<RawBuf> = iov[first..]
                    .iter()
                    .map(|v| RawBuf {
                        ptr: v.iov_base.cast(),
                        len: v.iov_len,
                    })
                    .collect();
                if !self.raw_aligned(&rest, offset + done) {
                    // SAFETY: `rest` are tails of the caller's buffers (same contract).
                    return unsafe {
                        if write {
                            bounce_write_raw(self, &rest, offset + done)
                        } else {
                            bounce_read_raw(self, &rest, offset + done)
                        }
                    };
                }
            }
        }
        Ok(())
    }

    /// Reads `[start, start+n)` into an aligned buffer; bytes past EOF read as zeros.
    fn read_span(&self, start: u64, n: usize) -> Result<AlignedBuf> {
        let mut b = AlignedBuf::new(n, self.direct.unwrap_or(1));
        let mut done = 0;
        while done < n {
            match self.file.read_at(&mut b[done..], start + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("cannot read", start, e)),
            }
        }
        Ok(b)
    }
}

impl Drop for FileStorage {
    /// Unlocks before the descriptor closes, as QEMU drops a node's permissions before
    /// closing it: the locks belong to the open file description, which a child process
    /// forked by another thread may still share until it execs, and the image must be free
    /// once this storage is gone.
    fn drop(&mut self) {
        if self.locking {
            // Only unlocks; should one fail, closing the descriptor still releases it.
            let _ = lock::change(self.file.as_raw_fd(), &self.path, self.locks, Perms::NONE);
        }
    }
}

impl Storage for FileStorage {
    fn io_handle(&self) -> Option<crate::storage::IoHandle> {
        Some(crate::storage::IoHandle {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.file),
            align: self.direct.unwrap_or(1),
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.err("cannot read", offset, e));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "offset overflows u64"))?;
        let size = self.len()?;
        crate::storage::check_bounds(offset, buf.len() as u64, size)?;
        let (start, n) = self.span(offset, buf.len())?;
        let b = self.read_span(start, n)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&b[skip..skip + (end - offset) as usize]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(|e| self.err("cannot write", offset, e));
        }
        let (start, n) = self.span(offset, buf.len())?;
        let skip = (offset - start) as usize;
        let _g = self.rmw.lock();
        let old_len = self.len()?;
        let mut b = if offset % self.direct.unwrap_or(1) as u64 == 0
            && buf.len() % self.direct.unwrap_or(1) == 0
        {
            AlignedBuf::new(n, self.direct.unwrap_or(1))
        } else {
            self.read_span(start, n)?
        };
        b[skip..skip + buf.len()].copy_from_slice(buf);
        self.file
            .write_all_at(&b, start)
            .map_err(|e| self.err("cannot write", offset, e))?;
        // The aligned write may have extended the file past the caller's end.
        let want = offset + buf.len() as u64;
        if start + n as u64 > old_len.max(want) {
            self.file
                .set_len(old_len.max(want))
                .map_err(|e| self.err("cannot truncate", want, e))?;
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.err("cannot stat", 0, e))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.writable()?;
        self.file
            .set_len(len)
            .map_err(|e| self.err("cannot resize", len, e))
    }

    fn sync_data(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.err("cannot sync", 0, e))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let size = self.len()?;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(end - offset)) else {
            return Err(Error::new(ErrorKind::OutOfRange, "hole beyond i64 range"));
        };
        // SAFETY: fallocate on a valid, owned descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                // No hole support here: zeros are what the caller is promised.
                let a = self.direct.unwrap_or(4096).max(4096);
                let zeros = AlignedBuf::new(1 << 20, a);
                let mut pos = offset;
                while pos < end {
                    let k = (end - pos).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..k], pos)?;
                    pos += k as u64;
                }
                Ok(())
            }
            _ => Err(self.err("cannot punch a hole in", offset, e)),
        }
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.len()?;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Extent {
                allocated: false,
                len: 0,
            });
        }
        let fd = self.file.as_raw_fd();
        let Ok(off) = i64::try_from(offset) else {
            return Err(Error::new(ErrorKind::OutOfRange, "offset beyond i64 range"));
        };
        // SAFETY: lseek on a valid descriptor; the shared file position is never used for I/O
        // here (all reads and writes are positional), so moving it is harmless.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data at or after offset: a hole up to EOF.
                Some(libc::ENXIO) => Ok(Extent {
                    allocated: false,
                    len: end - offset,
                }),
                // No SEEK_DATA support: everything is data.
                _ => Ok(Extent {
                    allocated: true,
                    len: end - offset,
                }),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok(Extent {
                allocated: false,
                len: data.min(end) - offset,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        Ok(Extent {
            allocated: true,
            len: hole.max(offset + 1).min(end) - offset,
        })
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        if self.direct.is_some() || bufs.is_empty() {
            let mut off = offset;
            for b in bufs.iter_mut() {
                self.read_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut bufs = bufs;
        let mut done = 0usize;
        while done < total {
            let iovcnt = bufs.len().min(1024) as libc::c_int;
            // SAFETY: IoSliceMut is ABI-compatible with iovec on unix (std guarantees it); the
            // slices are valid for writes for their lengths and outlive the call.
            let n = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    bufs.as_ptr() as *const libc::iovec,
                    iovcnt,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err("cannot read", offset + done as u64, e));
            }
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "read of {} at {offset} beyond end of file",
                        self.path.display()
                    ),
                ));
            }
            done += n as usize;
            IoSliceMut::advance_slices(&mut bufs, n as usize);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.writable()?;
        if self.direct.is_some() || bufs.is_empty() {
            let mut off = offset;
            for b in bufs {
                self.write_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut owned: Vec<IoSlice<'_>> = bufs.to_vec();
        let mut bufs = &mut owned[..];
        let mut done = 0usize;
        while done < total {
            let iovcnt = bufs.len().min(1024) as libc::c_int;
            // SAFETY: IoSlice is ABI-compatible with iovec on unix; the slices are valid for
            // reads for their lengths and outlive the call.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr() as *const libc::iovec,
                    iovcnt,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err("cannot write", offset + done as u64, e));
            }
            if n == 0 {
                return Err(Error::new(ErrorKind::Io, "pwritev wrote nothing"));
            }
            done += n as usize;
            IoSlice::advance_slices(&mut bufs, n as usize);
        }
        Ok(())
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        if !self.raw_aligned(bufs, offset) {
            // SAFETY: forwarded caller contract.
            return unsafe { bounce_read_raw(self, bufs, offset) };
        }
        // SAFETY: forwarded caller contract (buffers valid for writes).
        unsafe { self.raw_io(bufs, offset, false) }
    }

    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        self.writable()?;
        if !self.raw_aligned(bufs, offset) {
            // SAFETY: forwarded caller contract.
            return unsafe { bounce_write_raw(self, bufs, offset) };
        }
        // SAFETY: forwarded caller contract (buffers valid for reads).
        unsafe { self.raw_io(bufs, offset, true) }
    }
}

/// Whether `f` lives on tmpfs, whose pages cannot be dropped from the page cache (tests of
/// page-cache behaviour skip there).
#[cfg(test)]
pub(crate) fn on_tmpfs(f: &File) -> bool {
    // SAFETY: fstatfs fills the zeroed struct it is given; no other memory is touched.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is open.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), &mut s) };
    r == 0 && s.f_type == libc::TMPFS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;
    use crate::{ErrorKind, FileStorage, OpenOptions, Storage};

    /// How many of `file`'s first `pages` 4 KiB pages are in the page cache (`mincore`).
    fn cached_pages(file: &std::fs::File, pages: usize) -> usize {
        use std::os::fd::AsRawFd;
        let len = pages * 4096;
        // SAFETY: a fresh read-only shared mapping of the file's first `len` bytes (the file
        // is longer), unmapped below; mincore writes one byte per page into `vec`.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; pages];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    /// A 4 MiB file of sevens in `dir`, open for reading, unless `dir` is on tmpfs (which
    /// keeps every page: the page cache cannot be observed there).
    fn cache_probe_file(dir: &tempfile::TempDir) -> Option<(std::path::PathBuf, std::fs::File)> {
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        if super::on_tmpfs(&file) {
            eprintln!("!!! tmpfs keeps every page: the page cache cannot be observed here !!!");
            return None;
        }
        Some((path, file))
    }

    #[test]
    fn random_access_turns_readahead_off() {
        let dir = tempfile::tempdir().unwrap();
        let Some((path, file)) = cache_probe_file(&dir) else {
            return;
        };
        let evict = || {
            file.sync_all().unwrap();
            // SAFETY: fadvise on an open descriptor; no memory is passed.
            let r = unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            assert_eq!(r, 0);
        };
        let mut b = vec![0u8; 64 << 10];
        for (random, want_more) in [(false, true), (true, false)] {
            evict();
            let s = FileStorage::open(
                &path,
                &OpenOptions::new().read_only(true).random_access(random),
            )
            .unwrap();
            s.read_at(&mut b, 0).unwrap();
            assert_eq!(b[0], 7);
            let n = cached_pages(&file, 256);
            // A read of the first 16 pages reads ahead (an initial window of about four times
            // the request); with the hint it brings those 16 pages alone.
            if want_more {
                assert!(n > 16, "no readahead without the hint: {n} pages cached");
            } else {
                assert!(n <= 16, "readahead with the hint: {n} pages cached");
            }
        }
    }

    #[test]
    fn a_writable_random_access_open_drops_the_clean_cached_pages() {
        let dir = tempfile::tempdir().unwrap();
        let Some((path, file)) = cache_probe_file(&dir) else {
            return;
        };
        file.sync_all().unwrap();
        let warm = || {
            std::fs::read(&path).unwrap();
            cached_pages(&file, 1024)
        };
        // Read-only, or without the hint, the pages stay; a writable open with it drops them.
        for (read_only, random, kept) in [
            (true, true, true),
            (false, false, true),
            (false, true, false),
        ] {
            assert_eq!(warm(), 1024);
            let opts = OpenOptions::new()
                .read_only(read_only)
                .random_access(random);
            let s = FileStorage::open(&path, &opts).unwrap();
            let n = cached_pages(&file, 1024);
            drop(s);
            if kept {
                assert_eq!(n, 1024, "read_only {read_only}, random {random}");
            } else {
                assert_eq!(n, 0, "the clean pages stayed");
            }
        }
    }

    #[test]
    fn an_open_file_is_adopted_with_its_locks_and_access_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let rw = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        // A descriptor opened read-only cannot back a writable storage, but a read-only one.
        let ro_fd = std::fs::File::open(&path).unwrap();
        let e = FileStorage::from_file(ro_fd, "fd", &OpenOptions::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        let ro_fd = std::fs::File::open(&path).unwrap();
        let ro = FileStorage::from_file(ro_fd, "fd", &OpenOptions::new().read_only(true)).unwrap();
        let mut b = [0u8; 512];
        ro.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7u8; 512]);
        assert_eq!(ro.write_at(&b, 0).unwrap_err().kind(), ErrorKind::ReadOnly);
        drop(ro);
        // A writable adoption takes the writer's locks: a second writer is refused.
        let st = FileStorage::from_file(rw(), "fd", &OpenOptions::new()).unwrap();
        st.write_at(&[1u8; 512], 0).unwrap();
        if st.is_locked() {
            let e = FileStorage::from_file(rw(), "again", &OpenOptions::new()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
            let e = FileStorage::open(&path, &OpenOptions::new()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
        }
        assert_eq!(st.path(), std::path::Path::new("fd"));
        drop(st);
        assert_eq!(std::fs::read(&path).unwrap()[..512], [1u8; 512]);
        // truncate empties the file once the locks are held.
        let st = FileStorage::from_file(rw(), "fd", &OpenOptions::new().truncate(true)).unwrap();
        assert_eq!(st.len().unwrap(), 0);
    }

    #[test]
    fn a_cloned_aligned_buffer_is_aligned_and_equal() {
        for align in [512, 4096, 65536] {
            let mut a = AlignedBuf::new(3 * align, align);
            a[7] = 9;
            // Several clones: one would land aligned by chance, not all.
            for _ in 0..8 {
                let b = a.clone();
                assert_eq!(b.as_ptr() as usize % align, 0);
                assert_eq!(&b[..], &a[..]);
            }
        }
    }
}
