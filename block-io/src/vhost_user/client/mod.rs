//! A vhost-user-blk frontend that needs no VM: it plays QEMU's part on the socket and the
//! guest driver's part in the rings, for tests, conformance checks against
//! qemu-storage-daemon, and benchmarks.
//!
//! Guest memory is one memfd mapped at guest address 0 and shared with the backend. Each queue
//! gets a 64 KiB ring area (split virtqueue, virtio 1.2 2.7: descriptor table, available ring,
//! used ring) followed by its own data area. Requests are built as real descriptor chains;
//! [`ClientQueue::send_raw`] writes arbitrary descriptors for malformed-request tests.
//!
//! When the backend offers `VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS` (with REPLY_ACK, as
//! libblkio requires), memory can also be added and removed while queues run, as a VMM does on
//! memory hot-plug and libblkio does for every buffer region: [`Client::add_mem_region`]
//! (ADD_MEM_REG) and [`Client::remove_mem_region`] (REM_MEM_REG), each waiting for the
//! backend's acknowledgement; [`ClientQueue::request_in`] places a request in such a region.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, ErrorKind, Result};

mod bench;

pub use bench::{BenchResult, BenchSpec};

use super::config::{
    BlkConfig, CONFIG_LEN, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::request::{
    HEADER_LEN, ID_LEN, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Bytes of ring area before each queue's data area.
const RING_AREA: u64 = 64 << 10;
/// Offset of the used ring inside the ring area.
const USED_OFFSET: u64 = 32 << 10;
/// The status byte is pre-set to this, so an unwritten status is visible.
pub const STATUS_UNSET: u8 = 0xff;

fn vu_err(ctx: &'static str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("{ctx}: {e}"))
}

fn mem_err(e: vm_memory::GuestMemoryError) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("guest memory: {e}"))
}

/// How to set up a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Queues to set up (the backend must offer at least this many).
    pub num_queues: u16,
    /// Size of each queue (a power of two).
    pub queue_size: u16,
    /// Bytes of data area per queue.
    pub data_per_queue: u64,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if the backend offers it.
    pub event_idx: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: 256,
            data_per_queue: 8 << 20,
            event_idx: true,
        }
    }
}

/// One descriptor, as a driver would write it into the descriptor table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has `VRING_DESC_F_NEXT`.
    pub next: u16,
}

/// One used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device reports having written.
    pub len: u32,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status byte ([`STATUS_UNSET`] if the device did not write it).
    pub status: u8,
    /// The used length the device reported.
    pub used_len: u32,
    /// The device-writable data bytes (without the status).
    pub data: Vec<u8>,
}

/// A well-framed request: header, data the device reads, data the device writes, status.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// Sector in the header.
    pub sector: u64,
    /// Device-readable bytes after the header (write data, discard segments).
    pub out: Vec<u8>,
    /// Device-writable bytes before the status (read buffer, GET_ID buffer).
    pub in_len: u32,
    /// Split each data buffer into descriptors of at most this many bytes (0 = one each).
    pub seg: u32,
}

/// A connected frontend: the vhost-user session, guest memory and queues.
pub struct Client {
    frontend: Frontend,
    queues: Vec<Option<ClientQueue>>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    config: BlkConfig,
    mem: GuestMemoryMmap,
    /// The backend request channel, once opened.
    watch: Option<(FrontendReqHandler<ConfigWatch>, std::sync::Arc<ConfigWatch>)>,
}

/// Counts the configuration-change notifications a backend sends (the frontend's side of
/// the backend request channel).
#[derive(Debug, Default)]
pub struct ConfigWatch {
    changes: std::sync::atomic::AtomicU64,
}

impl ConfigWatch {
    /// Notifications received so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }
}

impl VhostUserFrontendReqHandler for ConfigWatch {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        self.changes.fetch_add(1, Ordering::AcqRel);
        Ok(0)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("features", &self.features)
            .field("protocol", &self.protocol)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A guest memory region added to a running session by [`Client::add_mem_region`]: its own
/// memfd, mapped at its guest address. The client keeps the mapping after
/// [`Client::remove_mem_region`], so a test can still build requests that point into memory
/// the backend no longer has.
pub struct MemRegion {
    mem: GuestMemoryMmap,
    info: VhostUserMemoryRegionInfo,
}

impl std::fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemRegion")
            .field("start", &self.info.guest_phys_addr)
            .field("len", &self.info.memory_size)
            .finish_non_exhaustive()
    }
}

impl MemRegion {
    /// The region as guest memory (only this region), for reading and writing its bytes.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest address of the region's first byte.
    pub fn start(&self) -> u64 {
        self.info.guest_phys_addr
    }

    /// Bytes in the region.
    pub fn len(&self) -> u64 {
        self.info.memory_size
    }

    /// Whether the region has no bytes (never, for a region the backend accepted).
    pub fn is_empty(&self) -> bool {
        self.info.memory_size == 0
    }
}

fn memfd(len: u64) -> Result<File> {
    // SAFETY: the name is a NUL-terminated string that outlives the call; memfd_create does
    // not keep it.
    let fd = unsafe { libc::memfd_create(c"vdisk-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len)
        .map_err(|e| Error::io("sizing guest memory", e))?;
    Ok(file)
}

impl Client {
    /// Connects to the backend at `path` and sets up memory and queues as QEMU would.
    pub fn connect(path: impl AsRef<Path>, opts: &ClientOptions) -> Result<Self> {
        let nq = opts.num_queues.max(1);
        if !opts.queue_size.is_power_of_two() || opts.queue_size > 1024 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "queue size must be a power of two up to 1024",
            ));
        }
        let mut fe = Frontend::connect(path, u64::from(nq)).map_err(|e| vu_err("connect", e))?;
        let offered = fe.get_features().map_err(|e| vu_err("GET_FEATURES", e))?;
        let mut want = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_MQ
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | VIRTIO_BLK_F_RO
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES;
        if opts.event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & want;
        let proto = features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let mut config = BlkConfig::default();
        let mut protocol = VhostUserProtocolFeatures::empty();
        if proto {
            let pf = fe
                .get_protocol_features()
                .map_err(|e| vu_err("GET_PROTOCOL_FEATURES", e))?;
            // REPLY_ACK is only used (NEED_REPLY set) around memory slot changes and the
            // backend request channel; BACKEND_REQ only once that channel is opened
            // (Client::watch_config_changes).
            let pf = pf
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
            protocol = pf;
            fe.set_protocol_features(pf)
                .map_err(|e| vu_err("SET_PROTOCOL_FEATURES", e))?;
            if pf.contains(VhostUserProtocolFeatures::MQ) {
                let n = fe.get_queue_num().map_err(|e| vu_err("GET_QUEUE_NUM", e))?;
                if n < u64::from(nq) {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("the backend offers {n} queues, {nq} asked"),
                    ));
                }
            }
            if pf.contains(VhostUserProtocolFeatures::CONFIG) {
                let (_, bytes) = fe
                    .get_config(
                        0,
                        CONFIG_LEN as u32,
                        VhostUserConfigFlags::WRITABLE,
                        &[0u8; CONFIG_LEN],
                    )
                    .map_err(|e| vu_err("GET_CONFIG", e))?;
                config = BlkConfig::from_bytes(&bytes);
            }
        }
        fe.set_owner().map_err(|e| vu_err("SET_OWNER", e))?;
        fe.set_features(features)
            .map_err(|e| vu_err("SET_FEATURES", e))?;

        let per_queue = RING_AREA + opts.data_per_queue;
        let mem_len = per_queue * u64::from(nq);
        let file = memfd(mem_len)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            mem_len as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| vu_err("mapping guest memory", e))?;
        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| vu_err("memory region", e))
            })
            .collect::<Result<Vec<_>>>()?;
        fe.set_mem_table(&regions)
            .map_err(|e| vu_err("SET_MEM_TABLE", e))?;

        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for i in 0..nq {
            let base = per_queue * u64::from(i);
            let q = ClientQueue::new(
                &mem,
                usize::from(i),
                opts.queue_size,
                base,
                opts.data_per_queue,
                event_idx,
            )?;
            // A backend that goes away ends waits at once instead of at their timeout.
            q.epoll
                .ctl(
                    ControlOperation::Add,
                    fe.as_raw_fd(),
                    EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, 1),
                )
                .map_err(|e| Error::io("epoll", e))?;
            let hva = |gpa: u64| -> Result<u64> {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(mem_err)
            };
            let idx = usize::from(i);
            fe.set_vring_num(idx, opts.queue_size)
                .map_err(|e| vu_err("SET_VRING_NUM", e))?;
            fe.set_vring_base(idx, 0)
                .map_err(|e| vu_err("SET_VRING_BASE", e))?;
            let cfg = VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: hva(q.desc)?,
                used_ring_addr: hva(q.used)?,
                avail_ring_addr: hva(q.avail)?,
                log_addr: None,
            };
            fe.set_vring_addr(idx, &cfg)
                .map_err(|e| vu_err("SET_VRING_ADDR", e))?;
            fe.set_vring_kick(idx, &q.kick)
                .map_err(|e| vu_err("SET_VRING_KICK", e))?;
            fe.set_vring_call(idx, &q.call)
                .map_err(|e| vu_err("SET_VRING_CALL", e))?;
            if proto {
                fe.set_vring_enable(idx, true)
                    .map_err(|e| vu_err("SET_VRING_ENABLE", e))?;
            }
            queues.push(Some(q));
        }
        Ok(Client {
            frontend: fe,
            queues,
            features,
            protocol,
            config,
            mem,
            watch: None,
        })
    }

    /// Opens the backend request channel (SET_BACKEND_REQ_FD), on which the backend
    /// announces configuration changes (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), as QEMU does
    /// at start. Needs `BACKEND_REQ`.
    pub fn watch_config_changes(&mut self) -> Result<()> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the backend does not offer BACKEND_REQ",
            ));
        }
        let watch = std::sync::Arc::new(ConfigWatch::default());
        let mut h = FrontendReqHandler::new(watch.clone())
            .map_err(|e| vu_err("backend request channel", e))?;
        h.set_reply_ack_flag(self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        let fd = h.get_tx_raw_fd();
        self.acked(|fe| fe.set_backend_request_fd(&fd))
            .map_err(|e| vu_err("SET_BACKEND_REQ_FD", e))?;
        self.watch = Some((h, watch));
        Ok(())
    }

    /// Waits up to `timeout` for one message on the backend request channel and answers it;
    /// returns how many configuration changes have been announced so far.
    pub fn wait_config_change(&mut self, timeout: Duration) -> Result<u64> {
        let Some((h, watch)) = self.watch.as_mut() else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the backend request channel is not open",
            ));
        };
        let mut pfd = libc::pollfd {
            fd: h.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            h.handle_request()
                .map_err(|e| vu_err("backend request", e))?;
        }
        Ok(watch.changes())
    }

    /// GET_CONFIG again (after a configuration change): the new configuration space, which
    /// [`Client::config`] returns from then on.
    pub fn read_config(&mut self) -> Result<BlkConfig> {
        let (_, bytes) = self
            .frontend
            .get_config(
                0,
                CONFIG_LEN as u32,
                VhostUserConfigFlags::WRITABLE,
                &[0u8; CONFIG_LEN],
            )
            .map_err(|e| vu_err("GET_CONFIG", e))?;
        self.config = BlkConfig::from_bytes(&bytes);
        Ok(self.config)
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The negotiated vhost-user protocol features (empty without
    /// `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// GET_MAX_MEM_SLOTS: how many memory regions the backend accepts.
    pub fn max_mem_slots(&mut self) -> Result<u64> {
        self.frontend
            .get_max_mem_slots()
            .map_err(|e| vu_err("GET_MAX_MEM_SLOTS", e))
    }

    /// ADD_MEM_REG: adds `len` bytes of fresh (zeroed) guest memory at guest address `gpa`,
    /// while the queues run. Returns once the backend has acknowledged it, so requests may use
    /// the region at once; a region the backend refuses (an overlap, no free slot) is an error.
    /// Needs `CONFIGURE_MEM_SLOTS`.
    pub fn add_mem_region(&mut self, gpa: u64, len: u64) -> Result<MemRegion> {
        let size = usize::try_from(len)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "region too large"))?;
        let file = memfd(len)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(gpa),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| vu_err("mapping guest memory", e))?;
        let region = mem
            .iter()
            .next()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "empty memory region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| vu_err("memory region", e))?;
        self.acked(|fe| fe.add_mem_region(&info).map(|_| ()))
            .map_err(|e| vu_err("ADD_MEM_REG", e))?;
        Ok(MemRegion { mem, info })
    }

    /// REM_MEM_REG: removes a region added by [`Client::add_mem_region`] (or, to test a
    /// hostile frontend, any region, such as the one holding the rings: see
    /// [`Client::main_region`]); returns once the backend has acknowledged it.
    pub fn remove_mem_region(&mut self, region: &MemRegion) -> Result<()> {
        let info = region.info;
        self.acked(|fe| fe.remove_mem_region(&info))
            .map_err(|e| vu_err("REM_MEM_REG", e))
    }

    /// The memory set up at connect time (rings and data areas) as a [`MemRegion`], for
    /// tests that remove it (as a hostile frontend may) and add it back with
    /// [`Client::re_add_mem_region`].
    pub fn main_region(&self) -> Result<MemRegion> {
        let region = self
            .mem
            .iter()
            .next()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no guest memory"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| vu_err("memory region", e))?;
        Ok(MemRegion {
            mem: self.mem.clone(),
            info,
        })
    }

    /// ADD_MEM_REG of a region again (after [`Client::remove_mem_region`]), same memory, same
    /// guest address.
    pub fn re_add_mem_region(&mut self, region: &MemRegion) -> Result<()> {
        let info = region.info;
        self.acked(|fe| fe.add_mem_region(&info).map(|_| ()))
            .map_err(|e| vu_err("ADD_MEM_REG", e))
    }

    /// Runs a memory-table change so that it has taken effect in the backend when this
    /// returns: with REPLY_ACK the message asks for the acknowledgement; without it, a
    /// GET_MAX_MEM_SLOTS round trip after it does (the backend handles messages in order).
    fn acked(&mut self, op: impl FnOnce(&mut Frontend) -> vhost::Result<()>) -> vhost::Result<()> {
        let ack = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if ack {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let r = op(&mut self.frontend);
        if ack {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        r?;
        if !ack {
            self.frontend.get_max_mem_slots()?;
        }
        Ok(())
    }

    /// The configuration space read at connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// The guest memory (shared with the backend).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Queue `i`, unless it was taken.
    pub fn queue(&mut self, i: usize) -> Result<&mut ClientQueue> {
        self.queues
            .get_mut(i)
            .and_then(|q| q.as_mut())
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("no queue {i}")))
    }

    /// Takes queue `i` out to drive it from another thread; the client must outlive it (the
    /// connection closes when the client is dropped).
    pub fn take_queue(&mut self, i: usize) -> Result<ClientQueue> {
        self.queues
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("no queue {i}")))
    }

    /// Reads `len` bytes at `sector` on queue 0: (status, data).
    pub fn read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        self.queue(0)?.read(sector, len)
    }

    /// Writes `data` at `sector` on queue 0: the status.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8> {
        self.queue(0)?.write(sector, data)
    }

    /// Flushes on queue 0: the status.
    pub fn flush(&mut self) -> Result<u8> {
        self.queue(0)?.flush()
    }

    /// Sends any well-framed request on queue 0.
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        self.queue(0)?.request(req)
    }

    /// Stops queue `i` as a VMM does when the VM pauses (GET_VRING_BASE); returns the ring
    /// base the backend reports, i.e. how many chains it took from the available ring.
    pub fn stop_queue(&mut self, i: usize) -> Result<u32> {
        self.frontend
            .get_vring_base(i)
            .map_err(|e| vu_err("GET_VRING_BASE", e))
    }

    /// Closes the session (as a VMM exit would).
    pub fn close(self) {
        drop(self.frontend);
    }
}

/// What ended a [`ClientQueue`]'s sleep.
enum Woke {
    Deadline,
    /// The call eventfd (or a signal).
    Event,
    /// The backend closed the connection.
    HungUp,
}

fn hung_up() -> Error {
    Error::new(
        ErrorKind::Io,
        "the backend closed the vhost-user connection",
    )
}

/// One split virtqueue driven by the client.
#[derive(Debug)]
pub struct ClientQueue {
    index: usize,
    mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    data: u64,
    data_len: u64,
    kick: EventFd,
    call: EventFd,
    epoll: Epoll,
    event_idx: bool,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
}

impl ClientQueue {
    fn new(
        mem: &GuestMemoryMmap,
        index: usize,
        size: u16,
        base: u64,
        data_len: u64,
        event_idx: bool,
    ) -> Result<Self> {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let epoll = Epoll::new().map_err(|e| Error::io("epoll", e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(|e| Error::io("epoll", e))?;
        Ok(ClientQueue {
            index,
            mem: mem.clone(),
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + USED_OFFSET,
            data: base + RING_AREA,
            data_len,
            kick,
            call,
            epoll,
            event_idx,
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
        })
    }

    /// The queue's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest address and length of this queue's data area.
    pub fn data_area(&self) -> (u64, u64) {
        (self.data, self.data_len)
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `idx` of the table.
    pub fn write_desc(&self, idx: u16, d: RawDesc) -> Result<()> {
        let at = self.desc + 16 * u64::from(idx % self.size);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(at)).map_err(mem_err)
    }

    /// Puts chain `head` on the available ring (without kicking).
    pub fn publish(&mut self, head: u16) -> Result<()> {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .map_err(mem_err)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        self.mem
            .store(
                self.next_avail,
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .map_err(mem_err)
    }

    /// Stores `idx` as the available ring's index without adding entries: for tests of
    /// drivers that corrupt their ring.
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<()> {
        self.mem
            .store(idx, GuestAddress(self.avail + 2), Ordering::Release)
            .map_err(mem_err)
    }

    /// Notifies the device of new chains when it asked to be (every time without EVENT_IDX).
    pub fn kick(&mut self) -> Result<()> {
        let new = self.next_avail;
        let old = self.kicked_avail;
        if new == old {
            return Ok(());
        }
        let needed = if self.event_idx {
            fence(Ordering::SeqCst);
            let at = self.used + 4 + 8 * u64::from(self.size);
            let event: u16 = self
                .mem
                .load(GuestAddress(at), Ordering::Acquire)
                .map_err(mem_err)?;
            // virtio 1.2, 2.7.10: vring_need_event.
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            true
        };
        self.kicked_avail = new;
        if needed {
            self.kick.write(1).map_err(|e| Error::io("kick", e))?;
        }
        Ok(())
    }

    /// Notifies the device whether or not it asked to be (a spurious kick is harmless): for
    /// tests where the device could not read or update the ring's event index.
    pub fn force_kick(&mut self) -> Result<()> {
        self.kicked_avail = self.next_avail;
        self.kick.write(1).map_err(|e| Error::io("kick", e))
    }

    /// Builds a chain from `(guest address, length, device-writable)` buffers and publishes
    /// it; returns its head.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "not enough free descriptors in the queue",
            ));
        }
        let idx: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
            let next = if last {
                0
            } else {
                flags |= VRING_DESC_F_NEXT;
                idx[i + 1]
            };
            self.write_desc(
                idx[i],
                RawDesc {
                    addr,
                    len,
                    flags,
                    next,
                },
            )?;
        }
        let head = idx[0];
        self.chains[usize::from(head)] = idx;
        self.publish(head)?;
        Ok(head)
    }

    /// Collects what the device has completed since the last call.
    pub fn reap(&mut self) -> Result<Vec<Completion>> {
        let used_idx: u16 = self
            .mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .map_err(mem_err)?;
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).map_err(mem_err)?;
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).map_err(mem_err)?;
            if let Some(chain) = self.chains.get_mut(id as usize) {
                self.free.append(chain);
            }
            out.push(Completion { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// The used-ring index the device has published.
    pub fn used_idx(&self) -> Result<u16> {
        self.mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .map_err(mem_err)
    }

    /// Waits up to `timeout` for at least one completion.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.reap()?;
            if !c.is_empty() {
                return Ok(c);
            }
            if self.event_idx {
                // Ask to be interrupted at the next completion, then look once more.
                self.set_used_event(self.last_used)?;
                let used_idx: u16 = self
                    .mem
                    .load(GuestAddress(self.used + 2), Ordering::Acquire)
                    .map_err(mem_err)?;
                if used_idx != self.last_used {
                    continue;
                }
            }
            match self.sleep(deadline)? {
                Woke::Deadline => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("no completion on queue {} within {timeout:?}", self.index),
                    ))
                }
                Woke::HungUp => {
                    // One last look: completions may have landed before the hang-up.
                    let c = self.reap()?;
                    if !c.is_empty() {
                        return Ok(c);
                    }
                    return Err(hung_up());
                }
                Woke::Event => {}
            }
            let _ = self.call.read();
        }
    }

    /// Sleeps until the device notifies or hangs up, or until `deadline`.
    fn sleep(&self, deadline: Instant) -> Result<Woke> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Woke::Deadline);
        }
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut events = [EpollEvent::default(); 2];
        match self.epoll.wait(ms, &mut events) {
            Ok(n) if events[..n].iter().any(|e| e.data() == 1) => Ok(Woke::HungUp),
            Ok(_) => Ok(Woke::Event),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Woke::Event),
            Err(e) => Err(Error::io("epoll wait", e)),
        }
    }

    /// Asks the device to notify when it adds the used entry numbered `idx`
    /// (EVENT_IDX's used event), for tests of when a device notifies. [`wait`](Self::wait)
    /// overwrites it.
    pub fn set_used_event(&mut self, idx: u16) -> Result<()> {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem
            .store(idx, GuestAddress(at), Ordering::Release)
            .map_err(mem_err)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Waits up to `timeout` for the device to notify, without touching the used event or
    /// the used ring; returns how many notifications it counted (0: none in time).
    pub fn wait_signal(&mut self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.call.read() {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error::io("read the call eventfd", e)),
            }
            match self.sleep(deadline)? {
                Woke::Deadline => return Ok(0),
                Woke::HungUp => return Err(hung_up()),
                Woke::Event => {}
            }
        }
    }

    /// Waits for the chain with head `head` (other completions are dropped).
    pub fn wait_for(&mut self, head: u16, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            for c in self.wait(left)? {
                if c.id == u32::from(head) {
                    return Ok(c);
                }
            }
        }
    }

    /// Writes the descriptors `table` (index, descriptor), publishes `head`, kicks and waits
    /// for its completion. For malformed chains; nothing else may be in flight.
    pub fn send_raw(&mut self, table: &[(u16, RawDesc)], head: u16) -> Result<Completion> {
        for &(i, d) in table {
            self.write_desc(i, d)?;
        }
        self.publish(head)?;
        self.kick()?;
        self.wait_for(head, Duration::from_secs(10))
    }

    /// Sends a well-framed request and waits for its answer. Buffers are laid out in the
    /// queue's data area: header, device-readable data, device-writable data, status.
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        let (_, _, status_at) = layout(self.data, req);
        if status_at + 1 > self.data + self.data_len {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "request larger than the queue's data area",
            ));
        }
        let m = self.mem.clone();
        self.request_in(&m, self.data, req)
    }

    /// Like [`ClientQueue::request`], with the request's buffers laid out from guest address
    /// `at` in `mem` (the same layout, 4 KiB aligned pieces) rather than in the queue's data
    /// area: for regions added by [`Client::add_mem_region`], also after their removal.
    pub fn request_in(
        &mut self,
        mem: &GuestMemoryMmap,
        at: u64,
        req: &Request,
    ) -> Result<Response> {
        let hdr_at = at;
        let (out_at, in_at, status_at) = layout(at, req);
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..4].copy_from_slice(&req.kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&req.sector.to_le_bytes());
        let m = mem;
        m.write_slice(&hdr, GuestAddress(hdr_at)).map_err(mem_err)?;
        m.write_slice(&req.out, GuestAddress(out_at))
            .map_err(mem_err)?;
        m.write_slice(&vec![0u8; req.in_len as usize], GuestAddress(in_at))
            .map_err(mem_err)?;
        m.write_obj(STATUS_UNSET, GuestAddress(status_at))
            .map_err(mem_err)?;
        let mut bufs = vec![(hdr_at, HEADER_LEN as u32, false)];
        split(&mut bufs, out_at, req.out.len() as u64, req.seg, false);
        split(&mut bufs, in_at, u64::from(req.in_len), req.seg, true);
        bufs.push((status_at, 1, true));
        let head = self.submit(&bufs)?;
        self.kick()?;
        let c = self.wait_for(head, Duration::from_secs(30))?;
        let mut data = vec![0u8; req.in_len as usize];
        m.read_slice(&mut data, GuestAddress(in_at))
            .map_err(mem_err)?;
        let status: u8 = m.read_obj(GuestAddress(status_at)).map_err(mem_err)?;
        Ok(Response {
            status,
            used_len: c.len,
            data,
        })
    }

    /// Reads `len` bytes at `sector`: (status, data).
    pub fn read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        let r = self.request(&Request {
            kind: VIRTIO_BLK_T_IN,
            sector,
            in_len: len,
            ..Request::default()
        })?;
        Ok((r.status, r.data))
    }

    /// Writes `data` at `sector`: the status.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8> {
        let r = self.request(&Request {
            kind: VIRTIO_BLK_T_OUT,
            sector,
            out: data.to_vec(),
            ..Request::default()
        })?;
        Ok(r.status)
    }

    /// Flushes: the status.
    pub fn flush(&mut self) -> Result<u8> {
        let r = self.request(&Request {
            kind: VIRTIO_BLK_T_FLUSH,
            ..Request::default()
        })?;
        Ok(r.status)
    }

    /// GET_ID: (status, the 20 id bytes).
    pub fn get_id(&mut self) -> Result<(u8, Vec<u8>)> {
        let r = self.request(&Request {
            kind: VIRTIO_BLK_T_GET_ID,
            in_len: ID_LEN as u32,
            ..Request::default()
        })?;
        Ok((r.status, r.data))
    }

    /// DISCARD (`zeroes == false`) or WRITE_ZEROES of one segment: the status.
    pub fn discard_or_zero(
        &mut self,
        zeroes: bool,
        sector: u64,
        num: u32,
        flags: u32,
    ) -> Result<u8> {
        let r = self.request(&Request {
            kind: if zeroes {
                VIRTIO_BLK_T_WRITE_ZEROES
            } else {
                VIRTIO_BLK_T_DISCARD
            },
            out: segment(sector, num, flags).to_vec(),
            ..Request::default()
        })?;
        Ok(r.status)
    }
}

/// Where a request laid out from `at` puts its device-readable data, its device-writable
/// data and its status (the header is at `at`).
fn layout(at: u64, req: &Request) -> (u64, u64, u64) {
    let out_at = at + 4096;
    let in_at = (out_at + req.out.len() as u64).next_multiple_of(4096);
    (out_at, in_at, in_at + u64::from(req.in_len))
}

/// Appends `[at, at+len)` to `bufs` in pieces of at most `seg` bytes (0 = one piece).
fn split(bufs: &mut Vec<(u64, u32, bool)>, at: u64, len: u64, seg: u32, w: bool) {
    let seg = if seg == 0 {
        u64::from(u32::MAX)
    } else {
        u64::from(seg)
    };
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(seg);
        bufs.push((at + pos, n as u32, w));
        pos += n;
    }
}

/// The 16 bytes of one discard/write-zeroes segment.
pub fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}
