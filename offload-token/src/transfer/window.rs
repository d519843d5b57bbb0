//! [`TokenExport`]: the read-only [`BlockDevice`] S serves for one token over NBD: exactly
//! the token's range of its source, checked against the token on every read.
//!
//! Each read first checks the token is live in S's registry (not expired, revoked or
//! invalidated; a read refreshes its inactivity TTL), reads the source, and checks again
//! that no write overlapping the token's range started meanwhile (writes through the
//! [`TrackedDisk`] invalidate before changing the data), so D receives the token's data or
//! an error, never other bytes.

use std::io::IoSliceMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{BlockDevice, DiskInfo, ErrorKind, RawBuf, Result, StatusRun};

use crate::body::TokenId;
use crate::provider::Provider;
use crate::tracked::TrackedDisk;

/// The token's range of its source, read-only.
pub struct TokenExport {
    provider: Arc<Provider>,
    token: TokenId,
    source: Arc<TrackedDisk>,
    offset: u64,
    len: u64,
    served: Arc<AtomicU64>,
    limiter: Option<block_io::RateLimiter>,
}

impl std::fmt::Debug for TokenExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenExport")
            .field("token", &self.token)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn refused(e: crate::Error) -> block_io::Error {
    block_io::Error::new(ErrorKind::Io, format!("the token refuses the read: {e}"))
}

impl TokenExport {
    /// The range `[offset, offset+len)` of `source` that the live token `token` of
    /// `provider` stands for; every byte read is added to `served`.
    pub(crate) fn new(
        provider: Arc<Provider>,
        token: TokenId,
        source: Arc<TrackedDisk>,
        offset: u64,
        len: u64,
        served: Arc<AtomicU64>,
    ) -> Self {
        TokenExport {
            provider,
            token,
            source,
            offset,
            len,
            served,
            limiter: None,
        }
    }

    /// The same export limited to `rate` bytes/s (0: unlimited), with bursts of 1 MiB.
    pub(crate) fn with_rate(mut self, rate: u64) -> Self {
        self.limiter = Some(block_io::RateLimiter::new(rate, 1 << 20));
        self
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(block_io::Error::new(
                ErrorKind::OutOfRange,
                "read past the token's range",
            ));
        }
        let sector = u64::from(self.info().logical_sector_size.max(1));
        if offset % sector != 0 || len % sector != 0 {
            return Err(block_io::Error::new(ErrorKind::Unaligned, "unaligned read"));
        }
        Ok(self.offset + offset)
    }

    /// Reads with the token checked before and after.
    fn guarded(&self, len: u64, read: impl FnOnce() -> Result<()>) -> Result<()> {
        if let Some(l) = &self.limiter {
            l.acquire(len);
        }
        let state = self.provider.live_state(self.token).map_err(refused)?;
        read()?;
        if state.is_invalidated() {
            self.provider.mark_invalidated(self.token);
            return Err(refused(crate::Error::Invalidated(self.token)));
        }
        self.provider.touch(self.token);
        self.served.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

fn read_only() -> block_io::Error {
    block_io::Error::new(ErrorKind::ReadOnly, "a token's export is read-only")
}

impl BlockDevice for TokenExport {
    fn info(&self) -> DiskInfo {
        let mut info = self.source.info();
        info.virtual_size = self.len;
        info.read_only = true;
        info.disk_id = None;
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.check(offset, buf.len() as u64)?;
        let n = buf.len() as u64;
        self.guarded(n, || self.source.read_at(buf, at))
    }

    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(read_only())
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let n = bufs.iter().map(|b| b.len() as u64).sum();
        let at = self.check(offset, n)?;
        self.guarded(n, || self.source.read_vectored_at(bufs, at))
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        let n = block_io::raw_total(bufs)?;
        let at = self.check(offset, n)?;
        // SAFETY: forwarded caller contract (buffers valid for writes).
        self.guarded(n, || unsafe { self.source.read_raw_at(bufs, at) })
    }

    unsafe fn write_raw_at(&self, _: &[RawBuf], _: u64) -> Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(read_only())
    }

    fn discard(&self, _: u64, _: u64) -> Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        let len = len.min(self.len.saturating_sub(offset));
        let at = self.check(offset, len)?;
        let mut run = self.source.block_status(at, len)?;
        run.len = run.len.min(len);
        Ok(run)
    }
}
