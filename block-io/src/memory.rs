//! [`MemStorage`]: a sparse in-memory [`Storage`].
//!
//! Bytes live in 64 KiB chunks allocated on first write, so a memory "file" can have a length
//! of terabytes while holding only what was written — which is what a fuzz target or a crash
//! test of a sparse image needs. An optional capacity makes growth past it fail with
//! [`ErrorKind::NoSpace`], like a full disk.

use std::collections::BTreeMap;

use parking_lot::RwLock;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{check_bounds, Extent, Storage};

/// Size of one allocation chunk.
pub const CHUNK: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Inner {
    len: u64,
    chunks: BTreeMap<u64, Box<[u8]>>,
}

/// A sparse, growable byte container in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    inner: RwLock<Inner>,
    capacity: Option<u64>,
}

impl Clone for MemStorage {
    fn clone(&self) -> Self {
        MemStorage {
            inner: RwLock::new(self.inner.read().clone()),
            capacity: self.capacity,
        }
    }
}

impl PartialEq for MemStorage {
    /// Equal when lengths and contents are equal (allocation does not matter).
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.inner.read(), other.inner.read());
        if a.len != b.len {
            return false;
        }
        let keys: std::collections::BTreeSet<u64> =
            a.chunks.keys().chain(b.chunks.keys()).copied().collect();
        keys.into_iter().all(|k| {
            let zero = [0u8; CHUNK as usize];
            let ca = a.chunks.get(&k).map_or(&zero[..], |c| &c[..]);
            let cb = b.chunks.get(&k).map_or(&zero[..], |c| &c[..]);
            ca == cb
        })
    }
}

impl MemStorage {
    /// An empty storage with no capacity limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty storage that refuses to grow past `capacity` bytes.
    pub fn with_capacity_limit(capacity: u64) -> Self {
        MemStorage {
            inner: RwLock::default(),
            capacity: Some(capacity),
        }
    }

    /// A storage holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let s = Self::new();
        let mut inner = s.inner.write();
        inner.write(bytes, 0);
        drop(inner);
        s
    }

    /// Sets or clears the capacity limit.
    pub fn set_capacity_limit(&mut self, capacity: Option<u64>) {
        self.capacity = capacity;
    }

    /// All bytes as one vector. Fails with [`ErrorKind::InvalidInput`] if the length does not
    /// fit in memory.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let inner = self.inner.read();
        let len = usize::try_from(inner.len)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "storage too large for a vector"))?;
        let mut v = vec![0u8; len];
        inner.read(&mut v, 0);
        Ok(v)
    }

    /// Bytes actually held in memory (allocated chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.inner.read().chunks.len() as u64 * CHUNK
    }

    fn check_growth(&self, end: u64) -> Result<()> {
        match self.capacity {
            Some(cap) if end > cap => Err(Error::new(
                ErrorKind::NoSpace,
                format!("memory storage capacity {cap} exceeded (end {end})"),
            )),
            _ => Ok(()),
        }
    }
}

impl Inner {
    /// Copies `[off, off+buf.len())` out; the caller has checked bounds.
    fn read(&self, buf: &mut [u8], off: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (idx, within) = (pos / CHUNK, (pos % CHUNK) as usize);
            let n = (CHUNK as usize - within).min(buf.len() - done);
            match self.chunks.get(&idx) {
                Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    /// Copies `buf` in at `off`, growing the length.
    fn write(&mut self, buf: &[u8], off: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (idx, within) = (pos / CHUNK, (pos % CHUNK) as usize);
            let n = (CHUNK as usize - within).min(buf.len() - done);
            let src = &buf[done..done + n];
            if let Some(c) = self.chunks.get_mut(&idx) {
                c[within..within + n].copy_from_slice(src);
            } else if src.iter().any(|&b| b != 0) {
                let mut c = vec![0u8; CHUNK as usize].into_boxed_slice();
                c[within..within + n].copy_from_slice(src);
                self.chunks.insert(idx, c);
            }
            done += n;
        }
        self.len = self.len.max(off + buf.len() as u64);
    }

    /// Zeros `[off, end)`, dropping whole chunks.
    fn zero(&mut self, off: u64, end: u64) {
        let mut pos = off;
        while pos < end {
            let (idx, within) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - within).min(end - pos);
            if within == 0 && n == CHUNK {
                self.chunks.remove(&idx);
            } else if let Some(c) = self.chunks.get_mut(&idx) {
                c[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Zero the tail of the last kept chunk and drop the chunks past it.
            let end = self.len;
            self.zero(len, end.min(len.div_ceil(CHUNK) * CHUNK));
            let first_dropped = len.div_ceil(CHUNK);
            self.chunks.retain(|&k, _| k < first_dropped);
        }
        self.len = len;
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = self.inner.read();
        check_bounds(offset, buf.len() as u64, inner.len)?;
        inner.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "offset overflows u64"))?;
        self.check_growth(end)?;
        self.inner.write().write(buf, offset);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.inner.read().len)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.check_growth(len)?;
        self.inner.write().set_len(len);
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut inner = self.inner.write();
        let end = offset.saturating_add(len).min(inner.len);
        if offset < end {
            inner.zero(offset, end);
        }
        Ok(())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let inner = self.inner.read();
        let end = offset.saturating_add(len).min(inner.len);
        if offset >= end {
            return Ok(Extent {
                allocated: false,
                len: 0,
            });
        }
        let first = inner.chunks.contains_key(&(offset / CHUNK));
        let mut pos = offset;
        while pos < end && inner.chunks.contains_key(&(pos / CHUNK)) == first {
            pos = (pos / CHUNK + 1) * CHUNK;
        }
        Ok(Extent {
            allocated: first,
            len: pos.min(end) - offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_huge_length_holds_little() {
        let m = MemStorage::new();
        m.set_len(1 << 40).unwrap();
        m.write_at(b"hello", (1 << 40) - 5).unwrap();
        let mut b = [0u8; 5];
        m.read_at(&mut b, (1 << 40) - 5).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(m.allocated_bytes(), CHUNK);
        assert!(m.read_at(&mut b, 1 << 40).is_err());
    }

    #[test]
    fn truncate_then_extend_reads_zeros() {
        let m = MemStorage::from_bytes(&[0xAB; 200_000]);
        m.set_len(70_000).unwrap();
        m.set_len(200_000).unwrap();
        let v = m.to_vec().unwrap();
        assert!(v[..70_000].iter().all(|&b| b == 0xAB));
        assert!(v[70_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn capacity_limit_is_enospc() {
        let m = MemStorage::with_capacity_limit(4096);
        assert_eq!(
            m.write_at(&[1; 10], 4090).unwrap_err().kind(),
            ErrorKind::NoSpace
        );
        m.write_at(&[1; 6], 4090).unwrap();
    }

    #[test]
    fn extent_reports_holes() {
        let m = MemStorage::new();
        m.set_len(4 * CHUNK).unwrap();
        m.write_at(&[1], CHUNK + 3).unwrap();
        let e = m.extent(0, 4 * CHUNK).unwrap();
        assert_eq!((e.allocated, e.len), (false, CHUNK));
        let e = m.extent(CHUNK, 4 * CHUNK).unwrap();
        assert_eq!((e.allocated, e.len), (true, CHUNK));
        m.punch_hole(CHUNK, CHUNK).unwrap();
        assert_eq!(m.allocated_bytes(), 0);
    }
}
