//! The I/O engine: executes positional reads, writes and data syncs on files with many
//! requests in flight, straight into the caller's memory (guest memory included), on
//! io_uring ([`Aio::IoUring`]) or on a pool of threads doing `preadv`/`pwritev`
//! ([`Aio::Threads`], for kernels or sandboxes without io_uring).
//!
//! An [`Engine`] belongs to one thread at a time (one per vhost-user queue, say). Its owner
//! [`submit`](Engine::submit)s [`Op`]s, each naming a file descriptor, an offset and
//! [`RawBuf`]s, then [`commit`](Engine::commit)s them to the kernel (or the pool) in one
//! batch; completions are [`reap`](Engine::reap)ed without blocking whenever the engine's
//! [`event_fd`](Engine::event_fd) turns readable (register it with epoll) or waited for with
//! [`wait`](Engine::wait). Short transfers are continued inside the engine, so a completion
//! reports either the whole length or an error.
//!
//! The engine does not know about image formats: a format layer first *maps* a request to
//! file extents from its in-memory tables ([`BlockDevice::map`](crate::BlockDevice::map)),
//! the engine then moves the bytes. Data syncs coalesce: a sync submitted while another is in
//! flight on the same file with no write completed in between shares that sync's result.

#[cfg(feature = "async")]
mod asyncio;
mod queue;
mod threads;
mod uring;

#[cfg(feature = "async")]
pub use asyncio::{AsyncDisk, AsyncOptions, IoBuf};
pub use queue::{Control, DeviceQueue, QueueStats, Started};

use std::os::unix::io::RawFd;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::RawBuf;

/// Which mechanism executes the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aio {
    /// Linux io_uring: one submission for a batch, completions in a shared ring.
    IoUring,
    /// A pool of threads doing blocking `preadv`/`pwritev`/`fdatasync`.
    Threads,
}

impl Aio {
    /// Parses `io_uring` or `threads` (qemu-storage-daemon's names).
    pub fn from_name(name: &str) -> Option<Aio> {
        match name {
            "io_uring" | "io-uring" | "uring" => Some(Aio::IoUring),
            "threads" => Some(Aio::Threads),
            _ => None,
        }
    }

    /// The name [`from_name`](Aio::from_name) takes.
    pub fn name(self) -> &'static str {
        match self {
            Aio::IoUring => "io_uring",
            Aio::Threads => "threads",
        }
    }
}

/// What an [`Op`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read the file into the buffers.
    Read,
    /// Write the buffers to the file.
    Write,
    /// `fdatasync` the file (the buffers are ignored).
    Sync,
}

/// One request for the engine: `kind` on file `fd` at `offset`, the concatenation of `bufs`
/// being the memory. `tag` comes back in its [`Completion`].
#[derive(Debug, Clone)]
pub struct Op {
    /// What to do.
    pub kind: OpKind,
    /// The open file (it must stay open until the op completes).
    pub fd: RawFd,
    /// Byte offset in the file.
    pub offset: u64,
    /// The memory, in order (each valid as [`Engine::submit`] requires).
    pub bufs: Vec<RawBuf>,
    /// The caller's name for this op.
    pub tag: u64,
}

impl Op {
    /// Total bytes of the op's buffers.
    pub fn len(&self) -> u64 {
        self.bufs.iter().map(|b| b.len as u64).sum()
    }

    /// Whether the op moves no bytes (a sync, or empty buffers).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: an Op is a description of memory the submitter promises stays valid until the op
// completes (the contract of `Engine::submit`); the engine only hands the pointers to the
// kernel or to `ptr` copies, whichever thread runs it.
unsafe impl Send for Op {}

/// A finished [`Op`].
#[derive(Debug)]
pub struct Completion {
    /// The op's tag.
    pub tag: u64,
    /// Bytes moved (the op's whole length), or why it failed.
    pub result: Result<u64>,
}

/// The backend behind an [`Engine`].
enum Inner {
    Uring(Box<uring::UringEngine>),
    Threads(threads::ThreadEngine),
}

/// A set of in-flight file operations owned by one thread (see the module docs).
pub struct Engine {
    inner: Inner,
    /// Syncs in flight, each with the syncs that joined it.
    syncs: Vec<SyncGroup>,
    /// Scratch for the backend's finished ops.
    done: Vec<uring::Done>,
}

/// A sync in flight on `fd` (its tag is `leader`) and the later syncs that share its result.
struct SyncGroup {
    fd: RawFd,
    leader: u64,
    followers: Vec<u64>,
    /// A write on `fd` completed since the leader was submitted: a later sync may need to
    /// cover it, so it cannot join this one.
    stale: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("aio", &self.aio())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Engine {
    /// An engine of kind `aio` keeping up to `depth` ops in flight (more are queued inside
    /// and submitted as earlier ones complete). [`Aio::IoUring`] fails with
    /// [`ErrorKind::Unsupported`] where the kernel or a sandbox refuses io_uring; use
    /// [`Engine::new_or_fallback`] to fall back to threads.
    pub fn new(aio: Aio, depth: u32) -> Result<Engine> {
        let depth = depth.clamp(1, 4096);
        let inner = match aio {
            Aio::IoUring => Inner::Uring(Box::new(uring::UringEngine::new(depth)?)),
            Aio::Threads => Inner::Threads(threads::ThreadEngine::new(depth)?),
        };
        Ok(Engine {
            inner,
            syncs: Vec::new(),
            done: Vec::new(),
        })
    }

    /// [`Engine::new`], falling back to [`Aio::Threads`] if io_uring is not available.
    pub fn new_or_fallback(aio: Aio, depth: u32) -> Result<Engine> {
        match Engine::new(aio, depth) {
            Err(e) if aio == Aio::IoUring && e.kind() == ErrorKind::Unsupported => {
                Engine::new(Aio::Threads, depth)
            }
            r => r,
        }
    }

    /// The mechanism in use.
    pub fn aio(&self) -> Aio {
        match self.inner {
            Inner::Uring(_) => Aio::IoUring,
            Inner::Threads(_) => Aio::Threads,
        }
    }

    /// Queues `op`. Nothing reaches the kernel before [`commit`](Engine::commit) (or the
    /// internal queue filling up).
    ///
    /// # Safety
    /// Every buffer of `op` must stay valid (mapped, and for a read writable) for its length
    /// until the op's completion has been reaped, and `op.fd` must stay open until then. The
    /// memory may be shared and change meanwhile (see [`RawBuf`]): it is only touched by the
    /// kernel or through `ptr` copies.
    pub unsafe fn submit(&mut self, op: Op) -> Result<()> {
        if op.kind == OpKind::Sync {
            // Coalesce: a sync joins one in flight on the same file if no write there has
            // completed since that one was submitted (it then covers everything this one must).
            if let Some(g) = self.syncs.iter_mut().find(|g| g.fd == op.fd && !g.stale) {
                g.followers.push(op.tag);
                return Ok(());
            }
            self.syncs.push(SyncGroup {
                fd: op.fd,
                leader: op.tag,
                followers: Vec::new(),
                stale: false,
            });
        } else {
            check_op(&op)?;
        }
        let (sync, tag, fd) = (op.kind == OpKind::Sync, op.tag, op.fd);
        let r = match &mut self.inner {
            Inner::Uring(u) => u.submit(op),
            Inner::Threads(t) => t.submit(op),
        };
        if r.is_err() && sync {
            self.syncs.retain(|g| !(g.fd == fd && g.leader == tag));
        }
        r
    }

    /// Hands every queued op to the kernel (io_uring: one system call) or the pool.
    pub fn commit(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Uring(u) => u.commit(),
            Inner::Threads(t) => t.commit(),
        }
    }

    /// Moves every finished op's [`Completion`] into `out` without blocking (continuing short
    /// transfers inside), and clears the event fd.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let mut done = std::mem::take(&mut self.done);
        let r = match &mut self.inner {
            Inner::Uring(u) => u.reap(&mut done),
            Inner::Threads(t) => t.reap(&mut done),
        };
        for d in done.drain(..) {
            match d.kind {
                OpKind::Write => {
                    for g in self.syncs.iter_mut().filter(|g| g.fd == d.fd) {
                        g.stale = true;
                    }
                }
                OpKind::Sync => {
                    if let Some(i) = self
                        .syncs
                        .iter()
                        .position(|g| g.fd == d.fd && g.leader == d.tag)
                    {
                        let g = self.syncs.swap_remove(i);
                        for tag in g.followers {
                            let result = match &d.result {
                                Ok(n) => Ok(*n),
                                Err(e) => Err(Error::new(e.kind(), e.chain_string())),
                            };
                            out.push(Completion { tag, result });
                        }
                    }
                }
                OpKind::Read => {}
            }
            out.push(Completion {
                tag: d.tag,
                result: d.result,
            });
        }
        self.done = done;
        r
    }

    /// Commits, then blocks until at least one op has finished (returns at once when nothing
    /// is in flight). Reap afterwards.
    pub fn wait(&mut self) -> Result<()> {
        self.commit()?;
        if self.in_flight() == 0 {
            return Ok(());
        }
        match &mut self.inner {
            Inner::Uring(u) => u.wait(),
            Inner::Threads(t) => t.wait(),
        }
    }

    /// Whether a finished op waits to be [`reap`](Engine::reap)ed, without a system call
    /// (io_uring: the completion ring is shared memory). Lets an owner skip a reap, and its
    /// read of the event fd, when nothing finished.
    pub fn has_completions(&mut self) -> bool {
        match &mut self.inner {
            Inner::Uring(u) => u.has_completions(),
            Inner::Threads(t) => t.has_completions(),
        }
    }

    /// Ops submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        let joined: usize = self.syncs.iter().map(|g| g.followers.len()).sum();
        joined
            + match &self.inner {
                Inner::Uring(u) => u.in_flight(),
                Inner::Threads(t) => t.in_flight(),
            }
    }

    /// An eventfd that becomes readable when completions are ready to reap (edge: reap
    /// clears it). Register it with epoll to wait for the engine and other events at once.
    pub fn event_fd(&self) -> RawFd {
        match &self.inner {
            Inner::Uring(u) => u.event_fd(),
            Inner::Threads(t) => t.event_fd(),
        }
    }

    /// Submits `ops`, waits for all of them, and returns the first error (every op has
    /// finished when it returns, error or not).
    ///
    /// # Safety
    /// As [`submit`](Engine::submit), for the duration of the call.
    pub unsafe fn run(&mut self, ops: Vec<Op>) -> Result<()> {
        let mut left = ops.len();
        let mut first_err = None;
        let mut done = Vec::new();
        for op in ops {
            // SAFETY: forwarded caller contract.
            if let Err(e) = unsafe { self.submit(op) } {
                left -= 1;
                first_err.get_or_insert(e);
            }
        }
        while left > 0 {
            self.wait()?;
            done.clear();
            self.reap(&mut done)?;
            for c in done.drain(..) {
                left = left.saturating_sub(1);
                if let Err(e) = c.result {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Most buffers in one op (the kernel's UIO_MAXIOV for `preadv`/`pwritev` and io_uring).
const MAX_IOV: usize = 1024;

/// Checks an op's shape before it reaches the kernel: a buffer count and a length the kernel
/// can take.
fn check_op(op: &Op) -> Result<()> {
    if op.bufs.len() > MAX_IOV {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("an op of {} buffers exceeds {MAX_IOV}", op.bufs.len()),
        ));
    }
    let total = crate::storage::raw_total(&op.bufs)?;
    op.offset.checked_add(total).ok_or_else(|| {
        Error::new(
            ErrorKind::OutOfRange,
            format!("op at {} of {total} bytes overflows", op.offset),
        )
    })?;
    if i64::try_from(op.offset.saturating_add(total)).is_err() {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!("op at {} is beyond what a file can hold", op.offset),
        ));
    }
    Ok(())
}

/// A new non-blocking eventfd.
fn new_event_fd() -> Result<std::os::fd::OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io(
            "cannot create an eventfd",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Clears an eventfd (reads its counter; nothing to read is fine).
fn drain_event_fd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64; the fd is non-blocking.
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Signals an eventfd.
fn signal_event_fd(fd: RawFd) {
    let v = 1u64;
    // SAFETY: writes 8 bytes from a local u64.
    let _ = unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
}

/// An error for a failed op: what it was and where.
fn op_error(kind: OpKind, offset: u64, err: std::io::Error) -> Error {
    let what = match kind {
        OpKind::Read => format!("read at {offset} failed"),
        OpKind::Write => format!("write at {offset} failed"),
        OpKind::Sync => "fdatasync failed".to_string(),
    };
    Error::io(what, err)
}

/// Advances `bufs` by `n` bytes (dropping buffers fully done): what remains of an op after a
/// short transfer.
fn advance(bufs: &mut Vec<RawBuf>, mut n: usize) {
    let mut drop_front = 0;
    for b in bufs.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= b.len {
            n -= b.len;
            drop_front += 1;
        } else {
            b.ptr = b.ptr.wrapping_add(n);
            b.len -= n;
            n = 0;
        }
    }
    bufs.drain(..drop_front);
}

#[cfg(test)]
mod tests;
