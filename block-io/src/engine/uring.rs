//! The io_uring backend of [`Engine`](super::Engine): one ring per engine, an eventfd
//! registered with it, and a slot per in-flight op holding its iovecs (the kernel reads them
//! when it starts the op, which may be after submission returns).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::{advance, drain_event_fd, new_event_fd, op_error, Op, OpKind};
use crate::error::{Error, ErrorKind, Result};

/// An op in flight, with the iovecs the kernel reads.
struct Slot {
    op: Op,
    iov: Vec<libc::iovec>,
    /// Bytes moved by earlier short transfers of this op.
    done: u64,
}

// SAFETY: the iovecs point at memory the submitter keeps valid until completion (the
// `Engine::submit` contract); moving them between threads changes nothing about that.
unsafe impl Send for Slot {}

/// A finished op, before the engine turns it into a completion.
pub(super) struct Done {
    pub tag: u64,
    pub kind: OpKind,
    pub fd: RawFd,
    pub result: Result<u64>,
}

pub(super) struct UringEngine {
    ring: IoUring,
    efd: OwnedFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots whose SQE did not fit in the submission queue yet.
    pending: VecDeque<usize>,
    /// SQEs pushed and not yet submitted with `io_uring_enter`.
    unsubmitted: usize,
    in_flight: usize,
}

impl UringEngine {
    pub(super) fn new(depth: u32) -> Result<Self> {
        let ring = IoUring::new(depth.next_power_of_two()).map_err(|e| {
            let kind = match e.raw_os_error() {
                // Not built in, forbidden by seccomp or sysctl, or out of locked memory.
                Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::ENOMEM) => {
                    ErrorKind::Unsupported
                }
                _ => ErrorKind::Io,
            };
            Error::new(kind, format!("io_uring is not available: {e}"))
        })?;
        let efd = new_event_fd()?;
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(|e| Error::io("cannot register an eventfd with io_uring", e))?;
        Ok(UringEngine {
            ring,
            efd,
            slots: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            unsubmitted: 0,
            in_flight: 0,
        })
    }

    pub(super) fn event_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn submit(&mut self, op: Op) -> Result<()> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Some(Slot {
            op,
            iov: Vec::new(),
            done: 0,
        });
        self.in_flight += 1;
        self.pending.push_back(idx);
        self.push_pending();
        Ok(())
    }

    /// Moves pending slots into the submission queue while it has room.
    fn push_pending(&mut self) {
        while let Some(&idx) = self.pending.front() {
            let Some(entry) = self.entry(idx) else {
                self.pending.pop_front();
                continue;
            };
            // SAFETY: the entry's pointers (iovecs in the slot, the op's buffers) stay valid
            // until its completion is reaped: the slot is not freed or changed before then,
            // and the buffers are the submitter's promise (`Engine::submit`).
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break; // full: the rest waits for the next commit
            }
            self.pending.pop_front();
            self.unsubmitted += 1;
        }
    }

    /// The SQE for slot `idx` (rebuilding its iovecs from the op's remaining buffers).
    fn entry(&mut self, idx: usize) -> Option<squeue::Entry> {
        let slot = self.slots.get_mut(idx)?.as_mut()?;
        let fd = types::Fd(slot.op.fd);
        let user = idx as u64;
        let e = match slot.op.kind {
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            kind => {
                slot.iov.clear();
                slot.iov.extend(slot.op.bufs.iter().map(|b| libc::iovec {
                    iov_base: b.ptr.cast(),
                    iov_len: b.len,
                }));
                // Bounded by MAX_IOV at submit.
                let n = slot.iov.len() as u32;
                let iov = slot.iov.as_ptr();
                if kind == OpKind::Read {
                    opcode::Readv::new(fd, iov, n)
                        .offset(slot.op.offset)
                        .build()
                } else {
                    opcode::Writev::new(fd, iov.cast(), n)
                        .offset(slot.op.offset)
                        .build()
                }
            }
        };
        Some(e.user_data(user))
    }

    pub(super) fn commit(&mut self) -> Result<()> {
        self.push_pending();
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(n.max(1));
                    if n == 0 {
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: reaping makes room; the SQEs stay queued.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(e) => return Err(Error::io("io_uring submission failed", e)),
            }
        }
        Ok(())
    }

    pub(super) fn wait(&mut self) -> Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(n) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(n);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(Error::io("waiting on io_uring failed", e)),
            }
        }
    }

    pub(super) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    pub(super) fn reap(&mut self, out: &mut Vec<Done>) -> Result<()> {
        drain_event_fd(self.efd.as_raw_fd());
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut resubmit = false;
        for (user, res) in cqes {
            let idx = user as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
                continue; // not ours; cannot happen
            };
            let kind = slot.op.kind;
            let result = if res < 0 {
                let errno = -res;
                if errno == libc::EINTR || errno == libc::EAGAIN {
                    // Try the same transfer again.
                    self.pending.push_back(idx);
                    resubmit = true;
                    continue;
                }
                Err(op_error(
                    kind,
                    slot.op.offset,
                    std::io::Error::from_raw_os_error(errno),
                ))
            } else {
                let n = res as u64;
                let left = slot.op.len();
                if kind != OpKind::Sync && n < left {
                    if n == 0 {
                        let what = if kind == OpKind::Read {
                            "read past the end of the file"
                        } else {
                            "the file took no bytes"
                        };
                        Err(Error::new(
                            ErrorKind::Io,
                            format!("{what} at {}", slot.op.offset),
                        ))
                    } else {
                        // A short transfer: continue with the rest.
                        advance(&mut slot.op.bufs, n as usize);
                        slot.op.offset += n;
                        slot.done += n;
                        self.pending.push_back(idx);
                        resubmit = true;
                        continue;
                    }
                } else {
                    Ok(slot.done + n)
                }
            };
            let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.take()) else {
                continue;
            };
            self.free.push(idx);
            self.in_flight -= 1;
            out.push(Done {
                tag: slot.op.tag,
                kind,
                fd: slot.op.fd,
                result,
            });
        }
        if resubmit {
            self.commit()?;
        }
        Ok(())
    }
}
