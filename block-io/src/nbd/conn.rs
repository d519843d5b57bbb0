//! The transmission phase of one connection (proto.md "Transmission", "Request types"): a
//! reader loop parses requests and checks them, each request then runs as its own task on
//! the export's [`AsyncDisk`](crate::engine::AsyncDisk), and one writer task sends replies in
//! whatever order they complete, matched to requests by cookie.
//!
//! A reply to a write (or write-zeroes, trim) is sent only after the device completed it,
//! and after a flush when the request had `NBD_CMD_FLAG_FUA`; a client that disconnects
//! mid-request therefore never loses anything it was told had been written. On disconnect,
//! `NBD_CMD_DISC`, a stop of the server or a malformed header (bad magic, truncated), the
//! reader stops, every request already read still completes, then the connection closes.
//!
//! Payload buffers (a read's data, a write's payload) come from the server's
//! [`BufferPool`] and go back to it once the reply is out or the write done: a read fills
//! its whole buffer or fails (the engine continues short transfers and fills zero extents
//! itself), so a reused buffer never shows a client earlier bytes, and a 2 MiB read costs no
//! fresh zeroed allocation (page faults and a memset as large as the payload).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::export::Served;
use super::handshake::{skip, Session, BASE_ALLOCATION_ID};
use super::pool::BufferPool;
use super::proto::{self, Command, Extent, Request};
use super::record::{RecordReader, RecordStream, RecordWriter, IN_PLACE_MIN};
use crate::error::{Error, ErrorKind};
use crate::file::AlignedBuf;
use crate::BlockStatus;

/// Requests in flight per connection at most; the reader waits for a slot beyond that.
const MAX_IN_FLIGHT: usize = 256;
/// Payload bytes (reads and writes) in flight per connection at most, in KiB.
const MAX_IN_FLIGHT_KIB: u32 = 256 * 1024;
/// How long replies may still take to go out once the server stops.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Extents in one block-status reply at most (proto.md allows a short reply; clients ask
/// again from where it ended).
const MAX_EXTENTS: usize = 16 * 1024;
/// A reply ready to send: header bytes, then a read's data.
struct Reply {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
    /// Held until the reply is written, so that the memory in flight stays bounded.
    _permits: Permits,
}

/// The slots a request holds from when it is read until its reply is written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What a connection shares with its request tasks.
struct Ctx {
    export: Arc<Served>,
    structured: bool,
    /// `base:allocation` was selected: block status may be asked.
    allocation: bool,
    replies: mpsc::UnboundedSender<Reply>,
    /// Spare payload buffers.
    pool: Arc<BufferPool>,
}

/// A connection's byte stream, split into a reading and a writing half for the reader loop
/// and the reply writer. Sockets split without a lock between the halves (the plain path
/// costs what it did before TLS); a TLS stream, whose halves share one session state, splits
/// with [`tokio::io::split`].
pub(crate) trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The reading half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// The writing half.
    type Write: ReplyWrite;
    /// Splits the stream.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl NbdStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl NbdStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl NbdStream for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl<S: NbdStream> NbdStream for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl<R, W> NbdStream for RecordStream<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Read = RecordReader<R>;
    type Write = RecordWriter<W>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        RecordStream::into_halves(self)
    }
}

/// A connection's writing half as the reply writer sees it: bytes, and a read's data, which
/// the TLS record layer seals where it lies.
pub(crate) trait ReplyWrite: AsyncWrite + Unpin + Send + 'static {
    /// Whether [`write_payload`](Self::write_payload) seals the data in place.
    fn seals_in_place(&self) -> bool {
        false
    }

    /// Sends `data` after everything flushed before. `data` may hold other bytes afterwards
    /// (a pool buffer: whoever takes it next overwrites it whole).
    fn write_payload<'a>(
        &'a mut self,
        data: &'a mut [u8],
    ) -> impl std::future::Future<Output = io::Result<()>> + Send + 'a {
        self.write_all(data)
    }
}

impl ReplyWrite for tokio::net::tcp::OwnedWriteHalf {}
impl ReplyWrite for tokio::net::unix::OwnedWriteHalf {}
impl ReplyWrite for tokio::io::WriteHalf<tokio::io::DuplexStream> {}
impl<S: NbdStream> ReplyWrite for tokio::io::WriteHalf<tokio_rustls::server::TlsStream<S>> {}

impl<W: AsyncWrite + Unpin + Send + 'static> ReplyWrite for RecordWriter<W> {
    fn seals_in_place(&self) -> bool {
        true
    }

    fn write_payload<'a>(
        &'a mut self,
        data: &'a mut [u8],
    ) -> impl std::future::Future<Output = io::Result<()>> + Send + 'a {
        self.write_sealed(data)
    }
}

/// Serves requests on `stream` until the client leaves or `stop` turns true, with payload
/// buffers from `pool`.
pub(crate) async fn transmit<S>(
    stream: S,
    session: Session,
    pool: Arc<BufferPool>,
    mut stop: watch::Receiver<bool>,
) where
    S: NbdStream,
{
    let (mut rd, wr) = stream.into_halves();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(wr, rx, pool.clone()));
    let ctx = Arc::new(Ctx {
        export: session.export,
        structured: session.structured,
        allocation: session.allocation_context,
        replies: tx,
        pool,
    });
    let count = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_KIB as usize));
    let mut tasks = JoinSet::new();
    loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut h) => r,
            _ = stopped(&mut stop) => break,
        };
        if read.is_err() {
            // The client left, or sent a truncated request: nothing more to answer.
            break;
        }
        let Ok(req) = Request::parse(&h) else {
            // proto.md gives no way to answer a request whose framing is unknown: close.
            break;
        };
        if req.command == Command::Disconnect {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let Ok(count) = count.clone().acquire_owned().await else {
            break;
        };
        let kib = if matches!(req.command, Command::Read | Command::Write) {
            req.length.min(proto::MAX_PAYLOAD).div_ceil(1024)
        } else {
            0
        };
        let bytes = if kib > 0 {
            match bytes.clone().acquire_many_owned(kib).await {
                Ok(p) => Some(p),
                Err(_) => break,
            }
        } else {
            None
        };
        let permits = Permits {
            _count: count,
            _bytes: bytes,
        };
        let payload = if req.command == Command::Write {
            match read_payload(&mut rd, &ctx, &req).await {
                Ok(p) => p,
                Err(_) => break,
            }
        } else {
            None
        };
        match check(&ctx, &req, payload.is_some()) {
            Err((errno, why)) => ctx.send_error(&req, errno, why, permits),
            Ok(()) => {
                let ctx = ctx.clone();
                tasks.spawn(async move { ctx.run(req, payload, permits).await });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(ctx);
    // The writer ends once every reply is out. A client that stopped reading can keep it
    // waiting forever; when the server stops, it gets a grace period, then is cut off.
    let mut writer = writer;
    let stopping = tokio::select! {
        _ = &mut writer => false,
        _ = stopped(&mut stop) => true,
    };
    if stopping && tokio::time::timeout(STOP_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Resolves once the server is asked to stop.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: a stop as well.
    let _ = stop.wait_for(|s| *s).await;
}

/// Reads a write's payload. `Ok(None)`: the payload was too large and was skipped (the
/// request then fails with `NBD_EINVAL`).
async fn read_payload<R>(rd: &mut R, ctx: &Ctx, req: &Request) -> io::Result<Option<AlignedBuf>>
where
    R: AsyncRead + Unpin,
{
    if req.length > proto::MAX_PAYLOAD {
        skip(rd, u64::from(req.length)).await?;
        return Ok(None);
    }
    let mut buf = ctx.pool.take(&ctx.export.disk, req.length as usize);
    rd.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Checks a request against the export and the negotiation (proto.md "Error values"):
/// returns the `NBD_E*` to answer with, and why, when it must not run.
fn check(ctx: &Ctx, req: &Request, have_payload: bool) -> Result<(), (u32, &'static str)> {
    let e = &ctx.export;
    let cmd = req.command;
    if let Command::Unknown(_) = cmd {
        return Err((proto::EINVAL, "unknown command"));
    }
    if req.flags & !cmd.allowed_flags() != 0 {
        return Err((proto::EINVAL, "command flag not valid for this command"));
    }
    if req.flags & proto::CMD_FLAG_DF != 0 && !ctx.structured {
        return Err((proto::EINVAL, "NBD_CMD_FLAG_DF needs structured replies"));
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && e.read_only {
        return Err((proto::EPERM, "the export is read-only"));
    }
    if cmd == Command::Write && !have_payload {
        return Err((
            proto::EINVAL,
            "write larger than the maximum payload (32 MiB)",
        ));
    }
    if cmd == Command::Read && req.length > proto::MAX_PAYLOAD {
        return Err((
            proto::EINVAL,
            "read larger than the maximum payload (32 MiB)",
        ));
    }
    if cmd == Command::BlockStatus && !ctx.allocation {
        return Err((proto::EINVAL, "no metadata context was selected"));
    }
    if cmd == Command::Flush {
        return Ok(());
    }
    let end = req.offset.checked_add(u64::from(req.length));
    if end.is_none_or(|end| end > e.size) {
        // proto.md: ENOSPC for writes beyond the end, EINVAL for the rest.
        let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
            proto::ENOSPC
        } else {
            proto::EINVAL
        };
        return Err((errno, "request beyond the end of the export"));
    }
    let b = u64::from(e.min_block);
    if req.offset % b != 0 || u64::from(req.length) % b != 0 {
        return Err((
            proto::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    if cmd == Command::BlockStatus && req.length == 0 {
        return Err((proto::EINVAL, "block status of nothing"));
    }
    if cmd == Command::WriteZeroes
        && req.flags & proto::CMD_FLAG_FAST_ZERO != 0
        && req.flags & proto::CMD_FLAG_NO_HOLE != 0
    {
        // Fast only when the device may unmap; allocated zeros may cost a full write.
        return Err((proto::ENOTSUP, "zeroes without holes are not fast"));
    }
    Ok(())
}

impl Ctx {
    /// Runs a checked request and queues its reply.
    async fn run(&self, req: Request, payload: Option<AlignedBuf>, permits: Permits) {
        let disk = &self.export.disk;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let off = req.offset;
        let len = u64::from(req.length);
        let r = match req.command {
            Command::Read => {
                let buf = self.pool.take(disk, req.length as usize);
                let read = if len == 0 {
                    Ok(buf)
                } else {
                    let _g = self.export.ranges.lock(off, len, false).await;
                    disk.read_at(buf, off).await
                };
                match read {
                    Ok(buf) => return self.send_data(&req, buf, permits),
                    Err(e) => Err(e),
                }
            }
            Command::Write => match payload {
                Some(buf) => {
                    let w = {
                        let _g = self.export.ranges.lock(off, len, false).await;
                        disk.write_at(buf, off).await.map(|b| self.pool.give(b))
                    };
                    self.then_flush(w, fua).await
                }
                None => Err(Error::new(ErrorKind::InvalidInput, "write without payload")),
            },
            Command::Flush => disk.flush().await,
            Command::Trim => {
                let d = if len == 0 {
                    Ok(())
                } else {
                    let _g = self.export.ranges.lock(off, len, true).await;
                    match disk.discard(off, len).await {
                        // A trim is a hint: a device that cannot discard ignores it.
                        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
                        r => r,
                    }
                };
                self.then_flush(d, fua).await
            }
            Command::WriteZeroes => {
                let unmap = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
                let z = if len == 0 {
                    Ok(())
                } else {
                    let _g = self.export.ranges.lock(off, len, true).await;
                    disk.write_zeroes(off, len, unmap).await
                };
                self.then_flush(z, fua).await
            }
            Command::Cache => Ok(()),
            Command::BlockStatus => {
                let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
                match self.block_status(off, len, one).await {
                    Ok(extents) => {
                        let chunk = proto::block_status_chunk(
                            req.cookie,
                            proto::REPLY_FLAG_DONE,
                            BASE_ALLOCATION_ID,
                            &extents,
                        );
                        return self.send(chunk, None, permits);
                    }
                    Err(e) => Err(e),
                }
            }
            Command::Disconnect | Command::Unknown(_) => {
                Err(Error::new(ErrorKind::InvalidInput, "unexpected command"))
            }
        };
        match r {
            Ok(()) => self.send(proto::simple_reply(0, req.cookie).to_vec(), None, permits),
            Err(e) => {
                let errno = errno(&e, req.command);
                self.send_error(&req, errno, &e.chain_string(), permits)
            }
        }
    }

    async fn then_flush(&self, r: crate::Result<()>, fua: bool) -> crate::Result<()> {
        r?;
        if fua {
            self.export.disk.flush().await?;
        }
        Ok(())
    }

    /// The `base:allocation` extents from `off`: at most `len` bytes with `one`, else
    /// covering `len` bytes or [`MAX_EXTENTS`] extents.
    async fn block_status(&self, off: u64, len: u64, one: bool) -> crate::Result<Vec<Extent>> {
        let dev = self.export.disk.device().clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = off;
            let end = off + len;
            while pos < end {
                let run = dev.block_status(pos, end - pos)?;
                if run.len == 0 || run.len > end - pos {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("block status at {pos} returned a run of {} bytes", run.len),
                    ));
                }
                // A top-level device's Unallocated reads as zeros: nothing below supplies it.
                let flags = match run.status {
                    BlockStatus::Data => 0,
                    BlockStatus::Zero | BlockStatus::Unallocated => {
                        proto::STATE_HOLE | proto::STATE_ZERO
                    }
                };
                // run.len <= end - pos <= u32::MAX: the request's length is a u32.
                let rl = u32::try_from(run.len).unwrap_or(u32::MAX);
                match out.last_mut() {
                    Some(last) if last.flags == flags && last.length.checked_add(rl).is_some() => {
                        last.length += rl;
                    }
                    _ => {
                        if one && !out.is_empty() {
                            break;
                        }
                        if out.len() == MAX_EXTENTS {
                            break;
                        }
                        out.push(Extent { length: rl, flags });
                    }
                }
                pos += u64::from(rl);
            }
            Ok(out)
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(Error::new(
                ErrorKind::Io,
                format!("block status task failed: {e}"),
            )),
        }
    }

    /// Queues a read's data: one `OFFSET_DATA` chunk ending the reply, or a simple reply.
    fn send_data(&self, req: &Request, buf: AlignedBuf, permits: Permits) {
        if self.structured {
            let mut head = Vec::with_capacity(proto::STRUCTURED_REPLY_LEN + 8);
            head.extend_from_slice(&proto::structured_header(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                req.length + 8,
            ));
            head.extend_from_slice(&req.offset.to_be_bytes());
            self.send(head, Some(buf), permits);
        } else {
            let head = proto::simple_reply(0, req.cookie).to_vec();
            self.send(head, Some(buf), permits);
        }
    }

    /// Queues an error reply: an error chunk with `message` under structured replies (a read
    /// must get one), else a simple reply.
    fn send_error(&self, req: &Request, errno: u32, message: &str, permits: Permits) {
        let head = if self.structured {
            proto::error_chunk(req.cookie, errno, message)
        } else {
            proto::simple_reply(errno, req.cookie).to_vec()
        };
        self.send(head, None, permits);
    }

    fn send(&self, head: Vec<u8>, data: Option<AlignedBuf>, permits: Permits) {
        // The writer is gone only when the connection is: the reply has nowhere to go.
        let _ = self.replies.send(Reply {
            head,
            data,
            _permits: permits,
        });
    }
}

/// Sends replies as they come; flushes when none is waiting.
async fn write_replies<W>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    pool: Arc<BufferPool>,
) -> io::Result<()>
where
    W: ReplyWrite,
{
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(mut r) = rx.recv().await {
        w.write_all(&r.head).await?;
        if let Some(d) = &mut r.data {
            if d.len() >= IN_PLACE_MIN && w.get_ref().seals_in_place() {
                // Sealed where it lies, after the header's record.
                w.flush().await?;
                w.get_mut().write_payload(d).await?;
            } else {
                w.write_all(d).await?;
            }
        }
        if let Some(d) = r.data {
            pool.give(d);
        }
        drop(r._permits);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

/// The `NBD_E*` for a device error (proto.md "Error values").
fn errno(e: &Error, cmd: Command) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace => proto::ENOSPC,
        ErrorKind::ReadOnly => proto::EPERM,
        ErrorKind::OutOfRange if matches!(cmd, Command::Write | Command::WriteZeroes) => {
            proto::ENOSPC
        }
        ErrorKind::OutOfRange
        | ErrorKind::Unaligned
        | ErrorKind::InvalidInput
        | ErrorKind::Unsupported => proto::EINVAL,
        _ => proto::EIO,
    }
}
