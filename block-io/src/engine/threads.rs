//! The thread-pool backend of [`Engine`](super::Engine): ops wait in a queue, worker threads
//! (started as the queue needs them, up to the engine's depth) run them with blocking
//! `preadv`/`pwritev`/`fdatasync`, and each completion is posted back with the eventfd
//! signalled. For kernels and sandboxes without io_uring.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::uring::Done;
use super::{advance, drain_event_fd, new_event_fd, op_error, signal_event_fd, Op, OpKind};
use crate::error::{Error, ErrorKind, Result};

/// What the pool's threads share with the engine.
struct Pool {
    state: Mutex<State>,
    /// Signalled when work arrives or the pool shuts down.
    work: Condvar,
    /// Signalled when a completion is posted.
    done: Condvar,
    efd: OwnedFd,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Op>,
    finished: Vec<Done>,
    idle: usize,
    threads: usize,
    shutdown: bool,
}

pub(super) struct ThreadEngine {
    pool: Arc<Pool>,
    max_threads: usize,
    /// Ops submitted and not committed yet.
    staged: Vec<Op>,
    in_flight: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl ThreadEngine {
    pub(super) fn new(depth: u32) -> Result<Self> {
        Ok(ThreadEngine {
            pool: Arc::new(Pool {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                done: Condvar::new(),
                efd: new_event_fd()?,
            }),
            max_threads: (depth as usize).clamp(1, 64),
            staged: Vec::new(),
            in_flight: 0,
            handles: Vec::new(),
        })
    }

    pub(super) fn event_fd(&self) -> RawFd {
        self.pool.efd.as_raw_fd()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn submit(&mut self, op: Op) -> Result<()> {
        self.staged.push(op);
        self.in_flight += 1;
        Ok(())
    }

    pub(super) fn commit(&mut self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let spawn = {
            let mut st = self.pool.state.lock();
            st.queue.extend(self.staged.drain(..));
            let want = st.queue.len().saturating_sub(st.idle);
            let room = self.max_threads.saturating_sub(st.threads);
            let n = want.min(room);
            st.threads += n;
            n
        };
        self.pool.work.notify_all();
        for _ in 0..spawn {
            let pool = self.pool.clone();
            match std::thread::Builder::new()
                .name("vdisk-aio".to_string())
                .spawn(move || worker(pool))
            {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    let mut st = self.pool.state.lock();
                    st.threads -= 1;
                    if st.threads == 0 {
                        return Err(Error::io("cannot start an I/O thread", e));
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn wait(&mut self) -> Result<()> {
        let mut st = self.pool.state.lock();
        while st.finished.is_empty() {
            self.pool.done.wait(&mut st);
        }
        Ok(())
    }

    pub(super) fn has_completions(&mut self) -> bool {
        !self.pool.state.lock().finished.is_empty()
    }

    pub(super) fn reap(&mut self, out: &mut Vec<Done>) -> Result<()> {
        drain_event_fd(self.pool.efd.as_raw_fd());
        let mut st = self.pool.state.lock();
        self.in_flight = self.in_flight.saturating_sub(st.finished.len());
        out.append(&mut st.finished);
        Ok(())
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        // Queued ops still run (their memory is promised valid until reaped, and a caller
        // dropping the engine early gives that up only once they are done).
        self.pool.state.lock().shutdown = true;
        self.pool.work.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(pool: Arc<Pool>) {
    loop {
        let op = {
            let mut st = pool.state.lock();
            loop {
                if let Some(op) = st.queue.pop_front() {
                    break op;
                }
                if st.shutdown {
                    st.threads -= 1;
                    return;
                }
                st.idle += 1;
                pool.work.wait(&mut st);
                st.idle -= 1;
            }
        };
        let (tag, kind, fd) = (op.tag, op.kind, op.fd);
        let result = execute(op);
        pool.state.lock().finished.push(Done {
            tag,
            kind,
            fd,
            result,
        });
        pool.done.notify_all();
        signal_event_fd(pool.efd.as_raw_fd());
    }
}

/// Runs `f` on the iovecs of an op's buffers: on the stack for up to [`INLINE_IOV`] of them
/// (a guest request's data is one or two buffers), else in a vector. Every inline read and
/// write goes through here: no allocation per request.
fn with_iovecs<R>(bufs: &[super::RawBuf], f: impl FnOnce(&[libc::iovec]) -> R) -> R {
    let iov = |b: &super::RawBuf| libc::iovec {
        iov_base: b.ptr.cast(),
        iov_len: b.len,
    };
    if bufs.len() <= INLINE_IOV {
        let mut a = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; INLINE_IOV];
        for (d, b) in a.iter_mut().zip(bufs) {
            *d = iov(b);
        }
        f(&a[..bufs.len()])
    } else {
        f(&bufs.iter().map(iov).collect::<Vec<_>>())
    }
}

/// Buffers whose iovecs [`with_iovecs`] keeps on the stack.
const INLINE_IOV: usize = 8;

/// How [`read_cached`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cached {
    /// The whole read came from the page cache.
    Read,
    /// Not all of it is cached (or the read failed): run it as usual.
    Miss,
    /// The file cannot be read without blocking (`RWF_NOWAIT` unsupported): stop trying.
    Unsupported,
}

/// Reads `op` (a read) on the caller's thread if every byte is in the page cache
/// (`preadv2(RWF_NOWAIT)`), without waiting for the disk. A partial or failed read leaves the
/// op to be run in full as usual (reading it again is harmless).
pub(super) fn read_cached(op: &Op) -> Cached {
    let Ok(off) = libc::off_t::try_from(op.offset) else {
        return Cached::Miss;
    };
    let r = with_iovecs(&op.bufs, |iov| {
        let Ok(cnt) = i32::try_from(iov.len()) else {
            return 0;
        };
        // SAFETY: the iovecs describe memory the submitter keeps valid for the op's life
        // (`Engine::submit`'s contract, which the caller holds to).
        unsafe { libc::preadv2(op.fd, iov.as_ptr(), cnt, off, libc::RWF_NOWAIT) }
    });
    if r < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Cached::Unsupported,
            _ => Cached::Miss,
        };
    }
    if r as u64 == op.len() {
        Cached::Read
    } else {
        Cached::Miss
    }
}

/// Runs one op to the end (continuing short transfers), on the caller's thread.
pub(super) fn execute(mut op: Op) -> Result<u64> {
    if op.kind == OpKind::Sync {
        // SAFETY: fdatasync takes no pointers.
        let r = unsafe { libc::fdatasync(op.fd) };
        if r != 0 {
            return Err(op_error(op.kind, 0, std::io::Error::last_os_error()));
        }
        return Ok(0);
    }
    let mut done = 0u64;
    while !op.bufs.is_empty() {
        let Ok(off) = libc::off_t::try_from(op.offset) else {
            return Err(Error::new(ErrorKind::OutOfRange, "offset beyond a file"));
        };
        // SAFETY: the iovecs describe memory the submitter keeps valid for the op's life
        // (`Engine::submit`); the count is bounded by MAX_IOV at submit.
        let r = with_iovecs(&op.bufs, |iov| unsafe {
            if op.kind == OpKind::Read {
                libc::preadv(op.fd, iov.as_ptr(), iov.len() as i32, off)
            } else {
                libc::pwritev(op.fd, iov.as_ptr(), iov.len() as i32, off)
            }
        });
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(op_error(op.kind, op.offset, e));
        }
        if r == 0 {
            let what = if op.kind == OpKind::Read {
                "read past the end of the file"
            } else {
                "the file took no bytes"
            };
            return Err(Error::new(
                ErrorKind::Io,
                format!("{what} at {}", op.offset),
            ));
        }
        let n = r as u64;
        done += n;
        op.offset += n;
        advance(&mut op.bufs, n as usize);
    }
    Ok(done)
}
