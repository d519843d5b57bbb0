//! A vhost-user-blk backend serving any [`BlockDevice`](crate::BlockDevice) to a VM (feature
//! `vhost-user`), and a VM-less frontend to drive it in tests and benchmarks.
//!
//! Specs: virtio 1.2 section 5.2 (block device: features, config layout, requests) and 2.7
//! (split virtqueues, `VIRTIO_RING_F_EVENT_IDX`); the vhost-user protocol as documented by
//! QEMU (`docs/interop/vhost-user.rst`). Built on rust-vmm: `vhost` (protocol),
//! `vhost-user-backend` (connection handling, one epoll worker thread per queue),
//! `virtio-queue` (descriptor chains, used ring, event index) and `vm-memory` (guest memory).
//!
//! - [`VhostUserBlkServer`] listens on a socket and serves one frontend at a time; when the
//!   frontend disconnects it waits for the next one, so a VMM restart needs no backend
//!   restart. [`StopHandle`] ends it.
//! - Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else is UNSUPP. Every
//!   malformed chain completes with IOERR (or, when it has no byte to hold a status, with a
//!   used length of 0) and the queue keeps going; see [`request`] for the exact rules, which
//!   match qemu-storage-daemon's for well-framed requests.
//! - Each queue has a worker thread, plus an offload thread for big requests when the host has
//!   more cores than queues.
//! - A disk whose size changes (an online resize) is announced with
//!   [`ConfigHandle::refresh`]: new `capacity` in the config space and
//!   VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel (BACKEND_REQ).
//! - Protocol features: MQ, CONFIG, REPLY_ACK and CONFIGURE_MEM_SLOTS (libblkio's
//!   `virtio-blk-vhost-user` driver, and QEMU's `blkio` driver through it, require the last
//!   three), and BACKEND_REQ (resize announcements). With CONFIGURE_MEM_SLOTS the frontend
//!   adds and removes guest memory regions (ADD_MEM_REG, REM_MEM_REG) while the queues run;
//!   each batch of requests is resolved against the memory as it is when the batch is taken.
//! - [`client`] is a frontend with its own guest memory (a memfd) and split virtqueues.
//!
//! ## Zero-copy, soundly
//! Guest memory cannot soundly be viewed as `&mut [u8]`/`&[u8]` (so not as `IoSliceMut`/
//! `IoSlice` either): the guest runs concurrently and may write any page at any time
//! (including a buffer it handed us), and a hostile driver can point two descriptors of one
//! request, or two requests on two queues handled by two worker threads, at the same bytes,
//! which would make two live `&mut [u8]` alias. That is why vm-memory only hands out
//! `VolatileSlice`s. So IN and OUT requests go through
//! [`BlockDevice::read_raw_at`](crate::BlockDevice::read_raw_at)/
//! [`write_raw_at`](crate::BlockDevice::write_raw_at), which take [`RawBuf`](crate::RawBuf)s:
//! addresses and lengths whose implementations promise never to form Rust references, only
//! to pass them to the kernel (`preadv`/`pwritev` on a raw file: data moves between the page
//! cache or the disk and guest memory with no copy in this process) or to copy with
//! `std::ptr` through a private bounce buffer (every other device: the trait's default).
//! The pointers come from vm-memory's bounds-checked `get_slices` (so a descriptor outside
//! guest memory still completes with IOERR) and stay valid because the worker holds the
//! guest memory mapping for the whole request.

mod backend;
pub mod client;
pub mod config;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod request;
mod server;

pub use config::BlkConfig;
pub use server::{
    default_workers, ConfigHandle, ServerOptions, StopHandle, VhostUserBlkServer,
    CONFIG_ACK_TIMEOUT,
};
