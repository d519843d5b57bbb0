//! [`VhostUserBlkServer`]: listens on a unix socket and serves one frontend at a time, for as
//! long as it is asked to. When a frontend goes away (VMM exit, crash, restart) the server
//! drops that connection's state, joins its queue workers and waits for the next frontend on
//! the same socket; a [`StopHandle`] ends the loop from another thread or a signal handler
//! thread.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};

use super::backend::{engine_event, BlkBackend, Shared};
use crate::engine::Aio;

/// Options of a [`VhostUserBlkServer`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Number of request queues, 1 to 64.
    pub num_queues: u16,
    /// Worker threads the queues are spread over (queue `q` on worker `q % workers`), each
    /// with its own I/O engine; `None` (the default): [`default_workers`]. Clamped to
    /// 1..=`num_queues`.
    pub workers: Option<u16>,
    /// Largest queue size a frontend may set (a power of two, at most 32768).
    pub queue_size: u16,
    /// The GET_ID answer (at most 20 bytes are used).
    pub serial: String,
    /// The I/O engine running each queue's reads and writes with many in flight
    /// (`Some(Aio::IoUring)` by default, falling back to threads where io_uring is refused);
    /// `None` runs them one at a time on the queue's worker thread.
    pub aio: Option<Aio>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            num_queues: 1,
            workers: None,
            queue_size: 1024,
            serial: "vdisk".to_string(),
            aio: Some(Aio::IoUring),
        }
    }
}

/// Worker threads for `num_queues` queues when [`ServerOptions::workers`] is not set: one per
/// queue, but at most half the host's cores (at least one). The frontend (a VMM's vCPU and
/// virtqueue threads, or a client polling its completions) runs on the same host: on a
/// small host, queue workers that outnumber the cores left to them only add context
/// switches (qemu-storage-daemon likewise serves every queue of an export from one thread
/// unless told otherwise).
pub fn default_workers(num_queues: u16) -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let half = u16::try_from(cores / 2).unwrap_or(u16::MAX).max(1);
    num_queues.clamp(1, half)
}

/// Stops a running [`VhostUserBlkServer::serve`] from another thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    inner: Arc<StopState>,
}

struct StopState {
    stopping: AtomicBool,
    wake: EventFd,
    current: Mutex<Option<ShutdownHandle>>,
    path: PathBuf,
}

impl std::fmt::Debug for StopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopState")
            .field("stopping", &self.stopping)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StopHandle {
    /// Asks the server to close the current connection and return from `serve`.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        if let Some(h) = self.inner.current.lock().as_ref() {
            h.shutdown();
        }
        // Wakes a server blocked in accept() (a frontend that connected and vanished).
        let _ = UnixStream::connect(&self.inner.path);
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }
}

/// Announces a change of the disk's size to the frontend (from
/// [`VhostUserBlkServer::config_handle`]).
#[derive(Clone)]
pub struct ConfigHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigHandle")
            .field("capacity", &self.shared.capacity.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How long [`ConfigHandle::refresh`] waits for a frontend's acknowledgement of a
/// configuration change (with REPLY_ACK): QEMU answers at once; one that never does must not
/// hold up the caller (a resize request, say) for ever.
pub const CONFIG_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl ConfigHandle {
    /// Takes the disk's size again (after an online resize): when it changed, the virtio-blk
    /// `capacity` in the config space changes, requests are checked against it, and the
    /// connected frontend is sent VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request
    /// channel, if it opened one (QEMU does; the guest driver then reads the capacity again).
    /// Returns whether the size changed. With REPLY_ACK negotiated it waits for the
    /// frontend's acknowledgement, for [`CONFIG_ACK_TIMEOUT`] at most (then an error of kind
    /// `Failed`; the new capacity stays in the config space for the driver's next read).
    pub fn refresh(&self) -> Result<bool> {
        self.shared.refresh(CONFIG_ACK_TIMEOUT)
    }

    /// [`ConfigHandle::refresh`], waiting at most `ack_timeout` for the acknowledgement.
    pub fn refresh_within(&self, ack_timeout: std::time::Duration) -> Result<bool> {
        self.shared.refresh(ack_timeout)
    }

    /// The capacity the frontend is shown, in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity.load(Ordering::Acquire)
    }
}

/// A vhost-user-blk server for one [`BlockDevice`] on one unix socket.
pub struct VhostUserBlkServer {
    shared: Arc<Shared>,
    listener: Listener,
    stop: StopHandle,
    connections: Arc<AtomicU64>,
}

impl std::fmt::Debug for VhostUserBlkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlkServer")
            .field("path", &self.stop.inner.path)
            .field("num_queues", &self.shared.num_queues)
            .finish_non_exhaustive()
    }
}

fn io_err(ctx: &'static str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("{ctx}: {e}"))
}

impl VhostUserBlkServer {
    /// Creates the socket at `path` (replacing a stale one) for serving `dev`.
    pub fn bind(
        path: impl AsRef<Path>,
        dev: Arc<dyn BlockDevice>,
        opts: &ServerOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} queues asked, 1 to 64 are possible", opts.num_queues),
            ));
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "queue size {} is not a power of two up to 32768",
                    opts.queue_size
                ),
            ));
        }
        let listener = Listener::new(path, true)
            .map_err(|e| io_err("cannot listen on the vhost-user socket", e))?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        Ok(VhostUserBlkServer {
            shared: Arc::new(Shared::new(
                dev,
                opts.num_queues,
                opts.workers
                    .unwrap_or_else(|| default_workers(opts.num_queues)),
                opts.queue_size,
                &opts.serial,
                opts.aio,
            )),
            listener,
            stop: StopHandle {
                inner: Arc::new(StopState {
                    stopping: AtomicBool::new(false),
                    wake,
                    current: Mutex::new(None),
                    path: path.to_path_buf(),
                }),
            },
            connections: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A handle that stops [`VhostUserBlkServer::serve`].
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// A handle that announces a change of the disk's size ([`ConfigHandle::refresh`]).
    pub fn config_handle(&self) -> ConfigHandle {
        ConfigHandle {
            shared: self.shared.clone(),
        }
    }

    /// Number of frontend connections served to their end so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Serves frontends one after another until stopped. A frontend that disconnects or breaks
    /// the protocol ends only its own connection. Returns after the last connection's queue
    /// workers have finished; the caller flushes the device.
    pub fn serve(&mut self) -> Result<()> {
        let epoll = Epoll::new().map_err(|e| Error::io("epoll", e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(|e| Error::io("epoll", e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.stop.inner.wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 1),
            )
            .map_err(|e| Error::io("epoll", e))?;
        let mut events = [EpollEvent::default(); 2];
        while !self.stop.is_stopping() {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("epoll wait", e)),
            };
            if events[..n].iter().any(|e| e.data() == 1) || self.stop.is_stopping() {
                break;
            }
            self.serve_one()?;
        }
        Ok(())
    }

    /// Accepts one frontend and serves it until it leaves or the server is stopped.
    fn serve_one(&mut self) -> Result<()> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(self.shared.clone(), mem.clone());
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".to_string(), backend.clone(), mem)
            .map_err(|e| io_err("cannot start the queue workers", e))?;
        // Each queue's worker also waits for its engine's completions.
        for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.engine_fd(i) {
                let ev = u64::from(engine_event(self.shared.num_queues));
                h.register_listener(fd, EventSet::IN, ev)
                    .map_err(|e| io_err("cannot watch the I/O engine", e))?;
            }
        }
        daemon
            .start(&mut self.listener)
            .map_err(|e| io_err("cannot accept a frontend", e))?;
        *self.stop.inner.current.lock() = daemon.shutdown_handle();
        if self.stop.is_stopping() {
            daemon.request_shutdown();
        }
        // A frontend that breaks the protocol or vanishes ends its connection, not the server.
        let _ = daemon.wait();
        *self.stop.inner.current.lock() = None;
        // That frontend's request channel is gone with it.
        *self.shared.frontend.lock() = None;
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // Dropping the daemon joins the queue workers, and `shutdown` the offload threads: no
        // request of this frontend is still running when the next one connects or when
        // serve() returns.
        drop(daemon);
        backend.shutdown();
        self.connections.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
