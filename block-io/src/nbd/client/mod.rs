//! [`NbdClient`]: a [`BlockDevice`] over an NBD export of any server (qemu-nbd, nbdkit,
//! nbd-server, our own [`NbdServer`](super::NbdServer)), following NetworkBlockDevice/nbd
//! `doc/proto.md`.
//!
//! - [`NbdUrl`]: the URLs qemu-img spells, `nbd://HOST[:PORT]/NAME`,
//!   `nbd+unix:///NAME?socket=PATH`, and `nbds://`/`nbds+unix://` requiring TLS;
//! - handshake (proto.md "Fixed newstyle negotiation"): `NBD_OPT_STARTTLS` when TLS is
//!   configured, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT base:allocation`,
//!   `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, `NBD_OPT_EXPORT_NAME` for servers without GO;
//! - transmission (proto.md "Transmission"): many requests in flight from many caller
//!   threads on one connection, driven by a task on a thread and runtime of the client's
//!   own (one per connection: with [`NbdClientOptions::connections`] and an export that
//!   advertises `NBD_FLAG_CAN_MULTI_CONN`, requests are spread over several); replies
//!   matched by cookie and parsed strictly; reads and writes split at the server's maximum
//!   payload (at most 32 MiB, proto.md "Block size constraints");
//! - the [`BlockDevice`] methods map to commands as proto.md "Request types" defines them:
//!   `write_zeroes` is `NBD_CMD_WRITE_ZEROES` (with `NBD_CMD_FLAG_NO_HOLE` unless unmapping;
//!   zero-filled writes when the export lacks it), `discard` is `NBD_CMD_TRIM` (nothing when
//!   the export lacks it: a hint), `flush` is `NBD_CMD_FLUSH`, and `block_status` asks
//!   `base:allocation` for one extent (`NBD_CMD_FLAG_REQ_ONE`): `NBD_STATE_ZERO` is
//!   [`BlockStatus::Zero`], anything else [`BlockStatus::Data`] (a hole without ZERO need not
//!   read as zeros; an export is a whole disk, so never [`BlockStatus::Unallocated`]). Without
//!   the context every run is data. [`NbdClientOptions::write_through`] adds FUA;
//! - reconnect ([`RetryPolicy`]): a dropped, silent or misbehaving connection is replaced and
//!   every request not fully answered is re-issued whole; after the policy's limit the
//!   requests fail with [`ClientError::GaveUp`] naming the last cause. The new connection
//!   must show the same export: the same size and writability, and the same identity line
//!   in its description if the first one advertised one ([`ExportInfo::identity`]), else
//!   the requests fail with [`ClientError::ExportChanged`] (a server restarted with another
//!   image behind the URL is never read).
//!
//! Caveat of any network disk: a write the server acknowledged but had not made durable
//! (no FUA, no flush yet) is lost if the *server's host* crashes; a flush re-issued after a
//! reconnect cannot cover it. Killing only the server process keeps such writes in the
//! host's page cache for qemu-nbd and nbdkit's file plugin.

mod conn;
mod error;
mod handshake;
mod lane;
mod options;
mod url;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use self::conn::{Op, Reply, Stats};
use self::handshake::Negotiated;
use self::lane::Lane;
use super::proto::{self, Command};
use crate::device::{check_request, BlockDevice, BlockStatus, DiskInfo, StatusRun};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{raw_gather, raw_scatter, raw_total, RawBuf};

pub use self::error::ClientError;
pub use self::options::{
    client_config_from_qemu_creds_dir, NbdClientOptions, RetryPolicy, TlsOptions,
};
pub use self::url::{NbdTarget, NbdUrl, UrlError, DEFAULT_PORT};

/// Longest trim, write-zeroes or block-status request sent at once (the length field is 32
/// bits; 2 GiB is a multiple of every block size).
const MAX_RANGE: u64 = 1 << 31;

/// Largest piece of a raw (scatter/gather) read bounced through one buffer.
const RAW_BATCH: u64 = 8 << 20;

/// Most connections one client opens (multi-conn).
const MAX_CONNECTIONS: u32 = 16;

/// A range request before it is split.
#[derive(Debug, Clone, Copy)]
struct Req {
    what: &'static str,
    command: Command,
    flags: u16,
    offset: u64,
    len: u64,
}

fn req(what: &'static str, command: Command, flags: u16, offset: u64, len: u64) -> Req {
    Req {
        what,
        command,
        flags,
        offset,
        len,
    }
}

/// What the server said about the export during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes as the server reported it.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*` of [`proto`]).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// The `base:allocation` metadata context was negotiated (block status works).
    pub base_allocation: bool,
    /// Minimum block size (1 when the server sent none).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload (32 MiB when the server sent none).
    pub max_payload: u32,
    /// The export's description (`NBD_INFO_DESCRIPTION`), if the server sent one.
    pub description: Option<String>,
}

impl ExportInfo {
    /// How a line of an export's description that advertises the identity of the image
    /// behind it starts. Our server ([`NbdServer`](super::NbdServer), as `vdisk serve --nbd
    /// --read-only` configures it) puts such a line into `NBD_INFO_DESCRIPTION`, a text that
    /// clients show to people and otherwise ignore (proto.md "NBD_INFO_DESCRIPTION"); the
    /// rest of the line is the business of whoever reads it (the `chain` crate's
    /// `remote` module documents its form). The client only compares it across reconnects.
    pub const IDENTITY_PREFIX: &'static str = "vdisk-identity:";

    /// The identity the server advertised: the rest of the description's first line that
    /// starts with [`IDENTITY_PREFIX`](Self::IDENTITY_PREFIX), trimmed; `None` when none does.
    pub fn identity(&self) -> Option<&str> {
        identity_line(self.description.as_deref())
    }
}

/// See [`ExportInfo::identity`].
pub(crate) fn identity_line(description: Option<&str>) -> Option<&str> {
    description?
        .lines()
        .find_map(|l| l.trim().strip_prefix(ExportInfo::IDENTITY_PREFIX))
        .map(str::trim)
}

/// A [`BlockDevice`] over an NBD export.
///
/// Every method may be called from many threads at once; each blocks its caller until the
/// server answered (requests of different callers are in flight together). Reads and writes
/// above the server's maximum payload are split and sent together.
///
/// ```no_run
/// # fn main() -> block_io::Result<()> {
/// use block_io::BlockDevice;
/// use block_io::nbd::{NbdClient, NbdClientOptions};
///
/// let disk = NbdClient::open("nbd://127.0.0.1:10809/disk", NbdClientOptions::default())?;
/// let mut sector = vec![0u8; 512];
/// disk.read_at(&mut sector, 0)?;
/// # Ok(())
/// # }
/// ```
pub struct NbdClient {
    url: NbdUrl,
    neg: Negotiated,
    info: DiskInfo,
    /// Largest read or write payload sent.
    max_io: u64,
    read_only: bool,
    write_through: bool,
    /// One per connection (several with multi-conn); requests go round-robin.
    lanes: Vec<Lane>,
    next: AtomicUsize,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("url", &self.url.to_string())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Parses `url` ([`NbdUrl`]) and [`connect`](Self::connect)s.
    pub fn open(url: &str, opts: NbdClientOptions) -> Result<Self, ClientError> {
        let url: NbdUrl = url.parse()?;
        Self::connect(&url, opts)
    }

    /// Connects to `url` and negotiates (one attempt within `opts.connect_timeout`; the
    /// retry policy applies to later drops). Starts one thread per connection, each with a
    /// single-threaded tokio runtime of its own, so callers need no runtime.
    pub fn connect(url: &NbdUrl, opts: NbdClientOptions) -> Result<Self, ClientError> {
        if url.tls && opts.tls.is_none() {
            return Err(ClientError::TlsConfig(
                "an nbds:// URL needs TLS options".into(),
            ));
        }
        let stats = Arc::new(Stats::default());
        let (first, neg) = Lane::spawn(url, &opts, stats.clone(), 0)?;
        let mut lanes = vec![first];
        if opts.connections > 1 && neg.has(proto::TF_CAN_MULTI_CONN) {
            for i in 1..opts.connections.min(MAX_CONNECTIONS) {
                let (lane, other) = Lane::spawn(url, &opts, stats.clone(), i as usize)?;
                if other.size != neg.size || other.flags != neg.flags {
                    return Err(ClientError::ExportChanged(format!(
                        "connection {i} sees size {} flags {:#x}, the first {} {:#x}",
                        other.size, other.flags, neg.size, neg.flags
                    )));
                }
                if let Some(why) = conn::identity_changed(&neg, &other) {
                    return Err(ClientError::ExportChanged(format!("connection {i}: {why}")));
                }
                lanes.push(lane);
            }
        }
        let read_only_opt = opts.read_only;
        let write_through = opts.write_through;
        // The addressing unit: the server's minimum block, at least 512 bytes.
        let sector = neg.block.minimum.max(512);
        let preferred = neg.block.preferred.clamp(sector, 64 * 1024);
        let max_io = u64::from(neg.block.maximum.min(proto::MAX_PAYLOAD));
        let max_io = (max_io - max_io % u64::from(sector)).max(u64::from(sector));
        let read_only = read_only_opt || neg.has(proto::TF_READ_ONLY);
        let info = DiskInfo {
            // A trailing partial sector cannot be addressed and is left out.
            virtual_size: neg.size - neg.size % u64::from(sector),
            logical_sector_size: sector,
            physical_sector_size: preferred,
            read_only,
            disk_id: None,
            format: "nbd",
        };
        Ok(NbdClient {
            url: url.clone(),
            neg,
            info,
            max_io,
            read_only,
            write_through,
            lanes,
            next: AtomicUsize::new(0),
            stats,
        })
    }

    /// The URL connected to.
    pub fn url(&self) -> &NbdUrl {
        &self.url
    }

    /// What the server said about the export at the first handshake.
    pub fn export_info(&self) -> ExportInfo {
        ExportInfo {
            size: self.neg.size,
            flags: self.neg.flags,
            structured_replies: self.neg.structured,
            base_allocation: self.neg.context.is_some(),
            min_block: self.neg.block.minimum,
            preferred_block: self.neg.block.preferred,
            max_payload: self.neg.block.maximum,
            description: self.neg.description.clone(),
        }
    }

    /// Connections in use (more than one with multi-conn).
    pub fn connections(&self) -> usize {
        self.lanes.len()
    }

    /// How many times the client reconnected after a dropped connection.
    pub fn reconnects(&self) -> u64 {
        self.stats.reconnects.load(Ordering::Relaxed)
    }

    /// How many requests were re-issued on a new connection.
    pub fn reissued_requests(&self) -> u64 {
        self.stats.reissued.load(Ordering::Relaxed)
    }

    /// Largest read or write payload sent in one request.
    pub fn max_payload(&self) -> u64 {
        self.max_io
    }

    fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Arc<Vec<u8>>>,
        recycle: Option<Vec<u8>>,
    ) -> Result<std::sync::mpsc::Receiver<Result<Reply, ClientError>>, ClientError> {
        let length = u32::try_from(length)
            .map_err(|_| ClientError::protocol("request longer than 4 GiB"))?;
        let (done, rx) = std::sync::mpsc::channel();
        let op = Op {
            command,
            flags,
            offset,
            length,
            payload,
            recycle,
            done,
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len().max(1);
        self.lanes.get(i).ok_or(ClientError::Closed)?.send(op)?;
        Ok(rx)
    }

    /// Sends one request per piece of `[offset, offset+len)` (pieces of at most `piece`
    /// bytes), all before waiting, and waits for every one. Returns the replies in order or
    /// the first error. A read's first piece fills `recycle` when given.
    fn pieces(
        &self,
        req: Req,
        piece: u64,
        mut payload: impl FnMut(u64, u64) -> Option<Arc<Vec<u8>>>,
        mut recycle: Option<Vec<u8>>,
    ) -> Result<Vec<Reply>> {
        let Req {
            what,
            command,
            flags,
            offset,
            len,
        } = req;
        let mut waits = Vec::new();
        let mut pos = 0;
        while pos < len {
            let n = piece.min(len - pos);
            let rx = self
                .submit(
                    command,
                    flags,
                    offset + pos,
                    n,
                    payload(pos, n),
                    recycle.take(),
                )
                .map_err(|e| self.err(what, offset, len, e))?;
            waits.push(rx);
            pos += n;
        }
        let mut out = Vec::with_capacity(waits.len());
        let mut first_err = None;
        for rx in waits {
            match rx.recv().unwrap_or(Err(ClientError::Closed)) {
                Ok(r) => out.push(r),
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(self.err(what, offset, len, e)),
            None => Ok(out),
        }
    }

    /// Reads `[offset, offset+len)` with every piece in flight at once: the pieces' data in
    /// order, each as long as asked, together exactly `len` bytes. The first piece fills
    /// `recycle` when given.
    fn read_pieces(&self, offset: u64, len: u64, recycle: Option<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        check_request(&self.info, offset, len, false)?;
        let replies = self.pieces(
            req("read", Command::Read, 0, offset, len),
            self.max_io,
            |_, _| None,
            recycle,
        )?;
        let mut out = Vec::with_capacity(replies.len());
        let mut pos = 0u64;
        for r in replies {
            match r {
                // The connection checked the reply covers its piece: exactly as long.
                Reply::Data(d) if pos + d.len() as u64 <= len => {
                    pos += d.len() as u64;
                    out.push(d);
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "NBD read: reply of the wrong shape",
                    ))
                }
            }
        }
        if pos != len {
            return Err(Error::new(ErrorKind::Io, "NBD read: short reply"));
        }
        Ok(out)
    }

    /// Reads `len` bytes at `offset` into an owned buffer, as [`BlockDevice::read_at`] but
    /// without its final copy: a read of at most [`max_payload`](Self::max_payload) bytes
    /// is one request whose reply is read from the connection straight into `buf`'s memory
    /// (its old bytes are all overwritten, its capacity is reused), and that buffer comes
    /// back holding exactly the `len` bytes. Longer reads go in pieces, as `read_at`.
    ///
    /// ```no_run
    /// # fn main() -> block_io::Result<()> {
    /// use block_io::nbd::{NbdClient, NbdClientOptions};
    /// let c = NbdClient::open("nbd://127.0.0.1:10809/disk", NbdClientOptions::default())?;
    /// let mut buf = Vec::new();
    /// for i in 0..4u64 {
    ///     buf = c.read_into(buf, i << 21, 2 << 20)?; // the same memory each time
    ///     assert_eq!(buf.len(), 2 << 20);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn read_into(&self, buf: Vec<u8>, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut pieces = self.read_pieces(offset, len, Some(buf))?;
        if pieces.len() == 1 {
            return Ok(pieces.swap_remove(0));
        }
        Ok(pieces.concat())
    }

    fn err(&self, what: &str, offset: u64, len: u64, e: ClientError) -> Error {
        e.into_error(format!("NBD {what} at {offset}+{len} on {}", self.url))
    }

    /// Writes `[offset, offset+len)` (checked by the caller) in pieces whose bytes `fill`
    /// puts into the buffers sent: it gets each piece's position in the request. The data
    /// must outlive this call on the runtime thread (and a re-issue), hence owned buffers.
    fn write_from(
        &self,
        offset: u64,
        len: u64,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> Result<()> {
        let r = self.pieces(
            req("write", Command::Write, self.fua(), offset, len),
            self.max_io,
            |pos, n| {
                let mut b = vec![0u8; n as usize];
                fill(pos, &mut b);
                Some(Arc::new(b))
            },
            None,
        );
        self.written(r)
    }

    /// `NBD_CMD_FLAG_FUA` when writing through to an export that takes it.
    fn fua(&self) -> u16 {
        if self.write_through && self.neg.has(proto::TF_SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        }
    }

    /// After a modifying request: a flush when writing through without FUA.
    fn written(&self, r: Result<Vec<Reply>>) -> Result<()> {
        r?;
        if self.write_through && !self.neg.has(proto::TF_SEND_FUA) {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes zeros the slow way (a server without `NBD_CMD_WRITE_ZEROES`).
    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let piece = self.max_io.min(1 << 20);
        let zeros = Arc::new(vec![0u8; piece.min(len) as usize]);
        let r = self.pieces(
            req("write", Command::Write, self.fua(), offset, len),
            piece,
            |_, n| {
                if n as usize == zeros.len() {
                    Some(zeros.clone())
                } else {
                    Some(Arc::new(vec![0u8; n as usize]))
                }
            },
            None,
        );
        self.written(r)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // Closing the channels makes the drivers send NBD_CMD_DISC and end: all at once,
        // then wait for each.
        for lane in &mut self.lanes {
            lane.shut();
        }
        for lane in &mut self.lanes {
            lane.close();
        }
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        e.into_error("NBD client")
    }
}

impl BlockDevice for NbdClient {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pos = 0usize;
        for d in self.read_pieces(offset, buf.len() as u64, None)? {
            buf[pos..pos + d.len()].copy_from_slice(&d);
            pos += d.len();
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_request(&self.info, offset, len, true)?;
        self.write_from(offset, len, |pos, out| {
            out.copy_from_slice(&buf[pos as usize..pos as usize + out.len()])
        })
    }

    /// One buffer for the whole request (up to 8 MiB at a time), read with every piece in
    /// flight at once, instead of the default's 256 KiB pieces one after another.
    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        let total = raw_total(bufs)?;
        check_request(&self.info, offset, total, false)?;
        let mut pos = 0;
        while pos < total {
            let n = (total - pos).min(RAW_BATCH);
            for d in self.read_pieces(offset + pos, n, None)? {
                // SAFETY: the caller guarantees every buffer valid for writes of its length
                // until we return; `d` is ours, so they do not overlap.
                unsafe { raw_scatter(bufs, pos, &d) };
                pos += d.len() as u64;
            }
        }
        Ok(())
    }

    /// Gathers each piece straight into the buffer sent (one copy), all pieces in flight.
    unsafe fn write_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        let total = raw_total(bufs)?;
        check_request(&self.info, offset, total, true)?;
        self.write_from(offset, total, |pos, out| {
            // SAFETY: the caller guarantees every buffer valid for reads of its length until
            // we return (`write_from` gathers before it returns); `out` is ours.
            unsafe { raw_gather(bufs, pos, out) }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_request(&self.info, offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if !self.neg.has(proto::TF_SEND_WRITE_ZEROES) {
            return self.write_zero_buffers(offset, len);
        }
        // proto.md "NBD_CMD_WRITE_ZEROES": without NO_HOLE the server may punch a hole.
        let flags = (if unmap { 0 } else { proto::CMD_FLAG_NO_HOLE }) | self.fua();
        let r = self.pieces(
            req("write zeroes", Command::WriteZeroes, flags, offset, len),
            MAX_RANGE,
            |_, _| None,
            None,
        );
        self.written(r)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(&self.info, offset, len, true)?;
        if len == 0 || !self.neg.has(proto::TF_SEND_TRIM) {
            // A discard is a hint; a server without TRIM keeps the data.
            return Ok(());
        }
        let r = self.pieces(
            req("trim", Command::Trim, self.fua(), offset, len),
            MAX_RANGE,
            |_, _| None,
            None,
        );
        self.written(r)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || !self.neg.has(proto::TF_SEND_FLUSH) {
            // proto.md: without SEND_FLUSH the server has no volatile cache to flush.
            return Ok(());
        }
        let rx = self
            .submit(Command::Flush, 0, 0, 0, None, None)
            .map_err(|e| self.err("flush", 0, 0, e))?;
        rx.recv()
            .unwrap_or(Err(ClientError::Closed))
            .map(|_| ())
            .map_err(|e| self.err("flush", 0, 0, e))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        check_request(&self.info, offset, len, false)?;
        if len == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "block status of 0 bytes",
            ));
        }
        let sector = u64::from(self.info.logical_sector_size);
        if self.neg.context.is_none() {
            // Without base:allocation everything is data (proto.md: a client must assume so).
            return Ok(StatusRun {
                status: BlockStatus::Data,
                len,
                file_offset: None,
            });
        }
        let ask = len.min(MAX_RANGE);
        let rx = self
            .submit(
                Command::BlockStatus,
                proto::CMD_FLAG_REQ_ONE,
                offset,
                ask,
                None,
                None,
            )
            .map_err(|e| self.err("block status", offset, ask, e))?;
        let reply = rx
            .recv()
            .unwrap_or(Err(ClientError::Closed))
            .map_err(|e| self.err("block status", offset, ask, e))?;
        let Reply::Extent { length, flags } = reply else {
            return Err(Error::new(
                ErrorKind::Io,
                "NBD block status: reply of the wrong shape",
            ));
        };
        let run = u64::from(length).min(ask);
        // NBD_STATE_ZERO: reads as zeros, whether or not it is a hole. A hole without ZERO
        // reads as whatever the server says (not necessarily zeros): data.
        let zero = flags & proto::STATE_ZERO != 0;
        Ok(if zero && run >= sector {
            StatusRun {
                status: BlockStatus::Zero,
                len: run - run % sector,
                file_offset: None,
            }
        } else {
            // A data run is rounded up to whole sectors (a partly data sector is data).
            StatusRun {
                status: BlockStatus::Data,
                len: run.div_ceil(sector).saturating_mul(sector).min(ask),
                file_offset: None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_lines_are_found_in_descriptions() {
        assert_eq!(identity_line(None), None);
        assert_eq!(identity_line(Some("base.vhdx (vhdx)")), None);
        assert_eq!(
            identity_line(Some(
                "base.vhdx (vhdx)\n  vdisk-identity:  v1 vhd x=1 \nmore"
            )),
            Some("v1 vhd x=1")
        );
        // Only at the start of a line.
        assert_eq!(identity_line(Some("see vdisk-identity: v1")), None);
        let a = Negotiated {
            size: 1 << 20,
            flags: 0,
            structured: true,
            context: None,
            block: handshake::BlockSizes::default(),
            description: Some("vdisk-identity: v1 a".into()),
        };
        let same = Negotiated {
            description: Some("other text\nvdisk-identity: v1 a".into()),
            ..a.clone()
        };
        assert_eq!(conn::identity_changed(&a, &same), None);
        let other = Negotiated {
            description: Some("vdisk-identity: v1 b".into()),
            ..a.clone()
        };
        assert!(conn::identity_changed(&a, &other).is_some());
        let none = Negotiated {
            description: None,
            ..a.clone()
        };
        assert!(conn::identity_changed(&a, &none).is_some());
        assert_eq!(conn::identity_changed(&none, &none), None);
        assert_eq!(
            ClientError::ExportChanged(String::new()).kind(),
            ErrorKind::Corrupt
        );
    }
}
