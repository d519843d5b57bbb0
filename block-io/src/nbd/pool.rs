//! [`BufferPool`]: the payload buffers (a read's data, a write's payload) an [`NbdServer`]
//! reuses across requests, across its connections and, when the caller shares one pool, across
//! servers.
//!
//! A fresh 2 MiB buffer costs 512 page faults, each clearing a page, before the first byte of
//! data lands in it, and the memory goes back to the kernel when it is freed. A connection
//! that ends takes nothing with it: its buffers stay here for the next connection. The
//! offload providers open one server per token and see four new connections per token; with
//! one pool per transfer their reads land in warm memory.
//!
//! A spare buffer is handed out only for a request of exactly its length and when its start
//! is aligned as the device asks; a read fills it whole or fails and a write's payload is
//! read into it whole, so nobody sees bytes an earlier request left in it.
//!
//! [`NbdServer`]: super::NbdServer

use crate::engine::AsyncDisk;
use crate::file::AlignedBuf;

/// Spare buffers a pool keeps at most by default, and their bytes at most.
const DEFAULT_BUFFERS: usize = 32;
const DEFAULT_BYTES: usize = 64 << 20;

/// Payload buffers an NBD server reuses, across requests and connections; share one between
/// servers with [`NbdServer::buffer_pool`](super::NbdServer::buffer_pool). A spare buffer
/// is handed out only for a request of exactly its length, aligned as the device asks, and
/// a read fills it whole or fails, so nobody sees bytes an earlier request left in it. A
/// fresh 2 MiB buffer costs 512 page faults before the first byte lands in it.
#[derive(Debug)]
pub struct BufferPool {
    spare: parking_lot::Mutex<Spare>,
    max_buffers: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Spare {
    buffers: Vec<AlignedBuf>,
    bytes: usize,
}

impl Default for BufferPool {
    /// A pool keeping at most 32 spare buffers and 64 MiB.
    fn default() -> Self {
        BufferPool::new(DEFAULT_BUFFERS, DEFAULT_BYTES)
    }
}

impl BufferPool {
    /// A pool keeping at most `max_buffers` spare buffers and `max_bytes` bytes in them;
    /// buffers given back beyond that are freed.
    pub fn new(max_buffers: usize, max_bytes: usize) -> Self {
        BufferPool {
            spare: parking_lot::Mutex::new(Spare::default()),
            max_buffers,
            max_bytes,
        }
    }

    /// Bytes in spare buffers now.
    pub fn spare_bytes(&self) -> usize {
        self.spare.lock().bytes
    }

    /// A buffer of `len` bytes for `disk`: a spare one of that length aligned as `disk`
    /// needs (its old bytes are the taker's to overwrite whole), or a new zeroed one.
    pub(crate) fn take(&self, disk: &AsyncDisk, len: usize) -> AlignedBuf {
        let align = alignment(disk);
        {
            let mut g = self.spare.lock();
            let fits = |b: &AlignedBuf| b.len() == len && (b.as_ptr() as usize) % align == 0;
            if let Some(i) = g.buffers.iter().rposition(fits) {
                let b = g.buffers.swap_remove(i);
                g.bytes -= len;
                return b;
            }
        }
        disk.alloc(len)
    }

    /// Keeps `buf` for reuse while the pool has room.
    pub(crate) fn give(&self, buf: AlignedBuf) {
        let mut g = self.spare.lock();
        let full = g.buffers.len() >= self.max_buffers || g.bytes + buf.len() > self.max_bytes;
        if buf.is_empty() || full {
            return;
        }
        g.bytes += buf.len();
        g.buffers.push(buf);
    }
}

/// The start alignment of the buffers [`AsyncDisk::alloc`] makes for `disk`.
fn alignment(disk: &AsyncDisk) -> usize {
    let info = disk.info();
    let sector = info.physical_sector_size.max(info.logical_sector_size);
    usize::try_from(sector)
        .unwrap_or(4096)
        .max(4096)
        .next_power_of_two()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{MemStorage, RawDisk, Storage};

    fn disk() -> AsyncDisk {
        let s = MemStorage::new();
        s.set_len(1 << 20).unwrap();
        AsyncDisk::new(Arc::new(RawDisk::new(s).unwrap())).unwrap()
    }

    #[test]
    fn a_buffer_given_back_is_taken_again_for_the_same_length_only() {
        let d = disk();
        let pool = BufferPool::default();
        let a = pool.take(&d, 8192);
        let at = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.spare_bytes(), 8192);
        let other = pool.take(&d, 4096);
        assert_ne!(other.as_ptr(), at);
        let again = pool.take(&d, 8192);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(again.as_ptr() as usize % alignment(&d), 0);
        assert_eq!(pool.spare_bytes(), 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_bounds() {
        let d = disk();
        let pool = BufferPool::new(2, 3 * 4096);
        for _ in 0..3 {
            pool.give(d.alloc(4096));
        }
        assert_eq!(pool.spare_bytes(), 2 * 4096);
        pool.give(d.alloc(8192));
        assert_eq!(pool.spare_bytes(), 2 * 4096);
        let small = BufferPool::new(8, 4096);
        small.give(d.alloc(8192));
        assert_eq!(small.spare_bytes(), 0);
    }

    #[test]
    fn buffers_outlive_the_connection_and_the_server_that_used_them() {
        use crate::nbd::{Export, NbdClient, NbdClientOptions, NbdServer};
        use crate::BlockDevice;

        let s = MemStorage::new();
        s.set_len(4 << 20).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(s).unwrap());
        dev.write_at(&[7u8; 1 << 20], 1 << 20).unwrap();
        let pool = Arc::new(BufferPool::default());
        for round in 0..2 {
            let server = NbdServer::bind_tcp("127.0.0.1:0", vec![Export::new("d", dev.clone())])
                .unwrap()
                .buffer_pool(pool.clone());
            let url = format!("nbd://{}/d", server.local_addr().unwrap());
            let stop = server.stop_handle();
            let t = std::thread::spawn(move || server.serve());
            let client = NbdClient::open(&url, NbdClientOptions::default()).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            client.read_at(&mut buf, 1 << 20).unwrap();
            assert!(buf.iter().all(|&b| b == 7), "round {round}");
            drop(client);
            stop.stop();
            t.join().unwrap().unwrap();
            // The read's buffer went back to the shared pool, not away with the connection.
            assert!(pool.spare_bytes() >= 1 << 20, "round {round}");
        }
    }
}
