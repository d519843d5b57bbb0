//! The transmission phase (proto.md "Transmission", "Structured reply chunk message"): one
//! connection at a time, driven by a task on the client's own runtime thread.
//!
//! Callers hand [`Op`]s over a channel and wait on their own reply channel. A writer sends
//! each op with a fresh cookie and records it in the in-flight table; a reader parses every
//! reply strictly against the table (a known cookie, a reply type valid for the command,
//! chunks inside the request and not overlapping, a read fully covered before its final
//! chunk, one block-status descriptor). Any violation, a transport error, `NBD_ESHUTDOWN` or
//! silence past the request timeout ends the connection: every op not yet fully answered is
//! re-issued whole on the next connection (see [`drive`]), so a caller never gets bytes from
//! two connections or from a connection that broke the protocol.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver};

use super::super::proto::{self, Command, ReplyHeader, Request};
use super::error::ClientError;
use super::handshake::{connect, BoxIo, Negotiated};
use super::options::NbdClientOptions;
use super::url::NbdUrl;

/// Payloads are moved in pieces of this size, each one a sign of life for the watchdog.
const PROGRESS_PIECE: usize = 1 << 20;

/// What a successful op yields.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A command without data completed.
    Done,
    /// A read's bytes (exactly the length asked).
    Data(Vec<u8>),
    /// The first `base:allocation` extent: length and `NBD_STATE_*` flags.
    Extent { length: u32, flags: u32 },
}

/// Where an op's result goes.
pub(crate) type Done = std::sync::mpsc::Sender<Result<Reply, ClientError>>;

/// One NBD command a caller asked for, already within the export's limits.
#[derive(Debug)]
pub(crate) struct Op {
    pub command: Command,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    /// A write's data.
    pub payload: Option<Arc<Vec<u8>>>,
    /// A read's buffer to fill (its capacity is reused, its bytes never shown: every byte
    /// of a read's reply is overwritten from the wire or zeroed for a hole first).
    pub recycle: Option<Vec<u8>>,
    pub done: Done,
}

/// Counters a client exposes.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Ops sent again on a new connection.
    pub reissued: AtomicU64,
}

/// An op and what its reply has delivered so far on the current connection.
#[derive(Debug)]
struct Entry {
    op: Op,
    /// Connections it has been sent on.
    tries: u32,
    /// A read's buffer (allocated at the first data).
    buf: Vec<u8>,
    /// A read's chunks so far, start -> end relative to the request, not overlapping.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    extent: Option<(u32, u32)>,
    error: Option<ClientError>,
}

impl Entry {
    fn new(op: Op) -> Self {
        Entry {
            op,
            tries: 0,
            buf: Vec::new(),
            covered: BTreeMap::new(),
            covered_bytes: 0,
            extent: None,
            error: None,
        }
    }

    /// Forgets everything a connection delivered (the op is re-issued whole).
    fn reset(&mut self) {
        self.buf = Vec::new();
        self.covered.clear();
        self.covered_bytes = 0;
        self.extent = None;
        self.error = None;
    }

    fn complete(self, r: Result<Reply, ClientError>) {
        // The caller may be gone (it never is while a `&NbdClient` call waits).
        let _ = self.op.done.send(r);
    }

    /// Records a read chunk `[rel, rel+n)`; chunks must not overlap (proto.md
    /// "NBD_REPLY_TYPE_OFFSET_DATA").
    fn cover(&mut self, rel: u64, n: u64) -> Result<(), ClientError> {
        let end = rel + n;
        let before = self.covered.range(..end).next_back();
        if let Some((_, &e)) = before {
            if e > rel {
                return Err(ClientError::protocol("overlapping read chunks"));
            }
        }
        self.covered.insert(rel, end);
        self.covered_bytes += n;
        Ok(())
    }

    /// The read's buffer, zeroed at first use (holes and chunks still to come).
    fn buffer(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            let mut b = self.op.recycle.take().unwrap_or_default();
            b.clear();
            b.resize(self.op.length as usize, 0);
            b
        } else {
            std::mem::take(&mut self.buf)
        }
    }

    /// An empty buffer for a read's whole data, with the recycled capacity if any.
    fn empty_buffer(&mut self) -> Vec<u8> {
        let mut b = self.op.recycle.take().unwrap_or_default();
        b.clear();
        b
    }
}

/// The ops on the wire of one connection, by cookie.
#[derive(Debug)]
struct Table {
    entries: BTreeMap<u64, Entry>,
    /// The last byte from the server, or when the table last became non-empty.
    last_activity: Instant,
}

impl Table {
    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    fn get(&mut self, cookie: u64) -> Result<&mut Entry, ClientError> {
        self.entries
            .get_mut(&cookie)
            .ok_or_else(|| ClientError::protocol(format!("reply with unknown cookie {cookie:#x}")))
    }
}

/// Why a connection ended.
enum End {
    /// The client was dropped; the connection was closed with `NBD_CMD_DISC`.
    Closed,
    /// The connection is unusable.
    Lost(ClientError),
}

/// Runs the client until it is dropped: serves ops over `first`, and after a drop
/// reconnects per the retry policy, re-issuing the ops that were not fully answered.
pub(crate) async fn drive(
    first: (BoxIo, Negotiated),
    url: NbdUrl,
    opts: NbdClientOptions,
    mut rx: UnboundedReceiver<Op>,
    stats: Arc<Stats>,
) {
    let original = first.1.clone();
    let mut conn = Some(first);
    let mut requeue: VecDeque<Entry> = VecDeque::new();
    let mut cause = None;
    loop {
        let (io, neg) = match conn.take() {
            Some(c) => c,
            None => {
                // A round for new work after an earlier one gave up (or after an idle drop)
                // always tries at least once.
                let fresh = requeue.is_empty();
                if fresh {
                    // Reconnect lazily: only once there is work.
                    match rx.recv().await {
                        Some(op) => requeue.push_back(Entry::new(op)),
                        None => return,
                    }
                }
                let last = cause.take().unwrap_or(ClientError::Closed);
                match reconnect(&url, &opts, &original, last, fresh).await {
                    Ok(c) => {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        stats
                            .reissued
                            .fetch_add(requeue.len() as u64, Ordering::Relaxed);
                        c
                    }
                    Err(e) => {
                        for entry in requeue.drain(..) {
                            entry.complete(Err(e.clone()));
                        }
                        while let Ok(op) = rx.try_recv() {
                            Entry::new(op).complete(Err(e.clone()));
                        }
                        continue;
                    }
                }
            }
        };
        let (end, left) =
            run_connection(io, &neg, &mut rx, &mut requeue, opts.request_timeout).await;
        match end {
            End::Closed => return,
            End::Lost(e) => {
                for mut entry in left {
                    entry.reset();
                    if entry.tries >= opts.retry.max_tries_per_request.max(1) {
                        let tries = entry.tries;
                        entry.complete(Err(ClientError::TooManyTries {
                            tries,
                            last: Box::new(e.clone()),
                        }));
                    } else {
                        requeue.push_back(entry);
                    }
                }
                cause = Some(e);
            }
        }
    }
}

/// One reconnect round (see [`RetryPolicy`](super::RetryPolicy)).
async fn reconnect(
    url: &NbdUrl,
    opts: &NbdClientOptions,
    original: &Negotiated,
    cause: ClientError,
    at_least_once: bool,
) -> Result<(BoxIo, Negotiated), ClientError> {
    let policy = &opts.retry;
    let start = Instant::now();
    let mut backoff = policy.initial_backoff;
    let mut attempts = 0;
    let mut last = cause;
    loop {
        let elapsed = start.elapsed();
        let first_of_fresh = at_least_once && attempts == 0;
        if !first_of_fresh && (attempts >= policy.max_attempts || elapsed >= policy.max_elapsed) {
            break;
        }
        if attempts > 0 {
            tokio::time::sleep(backoff.min(policy.max_elapsed.saturating_sub(elapsed))).await;
            backoff = backoff.saturating_mul(2).min(policy.max_backoff);
        }
        attempts += 1;
        // No attempt outlives the round (the first of a fresh round has the connect timeout).
        let left = policy.max_elapsed.saturating_sub(start.elapsed());
        let attempt = if first_of_fresh {
            connect(url, opts).await
        } else {
            match tokio::time::timeout(left, connect(url, opts)).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Timeout(left)),
            }
        };
        match attempt {
            Ok((io, neg)) => {
                // The same export or nothing: a different size or writability would turn
                // re-issued requests into wrong data.
                if neg.size != original.size
                    || neg.has(proto::TF_READ_ONLY) != original.has(proto::TF_READ_ONLY)
                {
                    return Err(ClientError::ExportChanged(format!(
                        "size {} -> {}, flags {:#x} -> {:#x}",
                        original.size, neg.size, original.flags, neg.flags
                    )));
                }
                // An export that advertised an identity must advertise the same one: a
                // server restarted with another image behind the name is another disk.
                if let Some(why) = identity_changed(original, &neg) {
                    return Err(ClientError::ExportChanged(why));
                }
                return Ok((io, neg));
            }
            Err(e) => last = e,
        }
    }
    Err(ClientError::GaveUp {
        attempts,
        elapsed: start.elapsed(),
        last: Box::new(last),
    })
}

/// Why `now` is not the export `first` was, by the identity lines of their descriptions
/// ([`ExportInfo::identity`](super::ExportInfo::identity)); `None` when they agree (both
/// absent included).
pub(crate) fn identity_changed(first: &Negotiated, now: &Negotiated) -> Option<String> {
    let a = super::identity_line(first.description.as_deref());
    let b = super::identity_line(now.description.as_deref());
    (a != b).then(|| {
        format!(
            "the advertised identity changed from '{}' to '{}'",
            a.unwrap_or("none"),
            b.unwrap_or("none")
        )
    })
}

/// Serves ops over one connection until it ends; returns why, with the ops it still held.
async fn run_connection(
    io: BoxIo,
    neg: &Negotiated,
    rx: &mut UnboundedReceiver<Op>,
    requeue: &mut VecDeque<Entry>,
    timeout: Option<Duration>,
) -> (End, Vec<Entry>) {
    let (r, w) = tokio::io::split(io);
    let table = RefCell::new(Table {
        entries: BTreeMap::new(),
        last_activity: Instant::now(),
    });
    let end = tokio::select! {
        e = writer(w, neg, rx, requeue, &table) => e,
        e = reader(r, neg, &table) => End::Lost(e),
        e = watchdog(&table, timeout) => End::Lost(e),
    };
    let left = table.into_inner().entries.into_values().collect();
    (end, left)
}

/// Why this connection cannot carry `op`: a capability the export lost across a reconnect.
fn refused_here(op: &Op, neg: &Negotiated) -> Option<ClientError> {
    let need = match op.command {
        Command::Flush => proto::TF_SEND_FLUSH,
        Command::Trim => proto::TF_SEND_TRIM,
        Command::WriteZeroes => proto::TF_SEND_WRITE_ZEROES,
        _ => 0,
    };
    let lost = (need != 0 && !neg.has(need))
        || (op.command == Command::BlockStatus && neg.context.is_none())
        || (matches!(op.command, Command::Read | Command::Write)
            && op.length > neg.block.maximum.min(proto::MAX_PAYLOAD))
        || u64::from(op.length) % u64::from(neg.block.minimum) != 0
        || op.offset % u64::from(neg.block.minimum) != 0;
    lost.then(|| {
        ClientError::ExportChanged(format!(
            "the server no longer accepts this request (flags {:#x})",
            neg.flags
        ))
    })
}

async fn writer(
    w: WriteHalf<BoxIo>,
    neg: &Negotiated,
    rx: &mut UnboundedReceiver<Op>,
    requeue: &mut VecDeque<Entry>,
    table: &RefCell<Table>,
) -> End {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let mut cookie = 0u64;
    loop {
        // No await between taking an op and recording it in the table: a connection that
        // ends meanwhile must find every op in the table or in the queues.
        let mut entry = match requeue.pop_front() {
            Some(e) => e,
            None => match rx.try_recv() {
                Ok(op) => Entry::new(op),
                Err(TryRecvError::Disconnected) => return close(w, cookie + 1).await,
                Err(TryRecvError::Empty) => {
                    if let Err(e) = w.flush().await {
                        return End::Lost(ClientError::transport(e));
                    }
                    match rx.recv().await {
                        Some(op) => Entry::new(op),
                        None => return close(w, cookie + 1).await,
                    }
                }
            },
        };
        if let Some(e) = refused_here(&entry.op, neg) {
            entry.complete(Err(e));
            continue;
        }
        cookie += 1;
        entry.tries += 1;
        let header = Request {
            flags: entry.op.flags,
            command: entry.op.command,
            cookie,
            offset: entry.op.offset,
            length: entry.op.length,
        }
        .encode();
        let payload = entry.op.payload.clone();
        {
            let mut t = table.borrow_mut();
            if t.entries.is_empty() {
                t.touch();
            }
            t.entries.insert(cookie, entry);
        }
        if let Err(e) = w.write_all(&header).await {
            return End::Lost(ClientError::transport(e));
        }
        // A large payload on a slow link: the server taking bytes is a sign of life.
        for piece in payload.iter().flat_map(|p| p.chunks(PROGRESS_PIECE)) {
            if let Err(e) = w.write_all(piece).await {
                return End::Lost(ClientError::transport(e));
            }
            table.borrow_mut().touch();
        }
    }
}

/// `NBD_CMD_DISC` and a clean shutdown (proto.md "Terminating the transmission phase").
async fn close(mut w: BufWriter<WriteHalf<BoxIo>>, cookie: u64) -> End {
    let disc = Request {
        flags: 0,
        command: Command::Disconnect,
        cookie,
        offset: 0,
        length: 0,
    }
    .encode();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        w.write_all(&disc).await?;
        w.flush().await?;
        w.shutdown().await
    })
    .await;
    End::Closed
}

/// Declares the connection dead when requests wait and nothing came for `timeout`.
async fn watchdog(table: &RefCell<Table>, timeout: Option<Duration>) -> ClientError {
    let Some(limit) = timeout else {
        return std::future::pending().await;
    };
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let t = table.borrow();
        if !t.entries.is_empty() && t.last_activity.elapsed() > limit {
            return ClientError::Timeout(limit);
        }
    }
}

type Rd = BufReader<ReadHalf<BoxIo>>;

async fn reader(r: ReadHalf<BoxIo>, neg: &Negotiated, table: &RefCell<Table>) -> ClientError {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    loop {
        if let Err(e) = one_reply(&mut r, neg, table).await {
            return e;
        }
    }
}

/// Reads a payload in pieces, noting progress after each so that a long transfer on a slow
/// link is not taken for a silent server.
async fn read_payload(r: &mut Rd, b: &mut [u8], table: &RefCell<Table>) -> Result<(), ClientError> {
    for piece in b.chunks_mut(PROGRESS_PIECE) {
        read_exact(r, piece).await?;
        table.borrow_mut().touch();
    }
    Ok(())
}

/// `n` payload bytes read into `v` (emptied first, its capacity reused) in pieces (as
/// [`read_payload`]) without zeroing it: `read_buf` fills the spare capacity and never past
/// `n` (a `take` bounds it), so every byte of the result came from the wire.
async fn read_new(
    r: &mut Rd,
    n: usize,
    mut v: Vec<u8>,
    table: &RefCell<Table>,
) -> Result<Vec<u8>, ClientError> {
    v.clear();
    v.reserve_exact(n);
    while v.len() < n {
        let want = (n - v.len()).min(PROGRESS_PIECE);
        let before = v.len();
        while v.len() - before < want {
            let left = (want - (v.len() - before)) as u64;
            let got = (&mut *r)
                .take(left)
                .read_buf(&mut v)
                .await
                .map_err(ClientError::transport)?;
            if got == 0 {
                return Err(ClientError::transport(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
        table.borrow_mut().touch();
    }
    Ok(v)
}

async fn read_exact(r: &mut Rd, b: &mut [u8]) -> Result<(), ClientError> {
    r.read_exact(b)
        .await
        .map(|_| ())
        .map_err(ClientError::transport)
}

async fn one_reply(
    r: &mut Rd,
    neg: &Negotiated,
    table: &RefCell<Table>,
) -> Result<(), ClientError> {
    let mut p = [0u8; 16];
    read_exact(r, &mut p).await?;
    table.borrow_mut().touch();
    match ReplyHeader::parse_prefix(&p)? {
        (ReplyHeader::Simple { error, cookie }, _) => simple(r, neg, table, error, cookie).await,
        (
            ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                ..
            },
            _,
        ) => {
            let mut l = [0u8; 4];
            read_exact(r, &mut l).await?;
            chunk(r, neg, table, flags, kind, cookie, u32::from_be_bytes(l)).await
        }
    }
}

/// A simple reply (proto.md "Simple reply message").
async fn simple(
    r: &mut Rd,
    neg: &Negotiated,
    table: &RefCell<Table>,
    error: u32,
    cookie: u64,
) -> Result<(), ClientError> {
    let (command, length) = {
        let mut t = table.borrow_mut();
        let e = t.get(cookie)?;
        (e.op.command, e.op.length)
    };
    if error == proto::ESHUTDOWN {
        // The server is going away: the op stays in the table and goes to the next one.
        return Err(server_error(error, String::new()));
    }
    if error != 0 {
        finish(table, cookie, Err(server_error(error, String::new())));
        return Ok(());
    }
    match command {
        Command::Read => {
            if neg.structured {
                // proto.md: with structured replies a read MUST NOT get a simple reply.
                return Err(ClientError::protocol("simple reply to a read"));
            }
            let v = table.borrow_mut().get(cookie)?.empty_buffer();
            let buf = read_new(r, length as usize, v, table).await?;
            finish(table, cookie, Ok(Reply::Data(buf)));
        }
        Command::BlockStatus => {
            return Err(ClientError::protocol(
                "simple reply to a block status request",
            ))
        }
        _ => finish(table, cookie, Ok(Reply::Done)),
    }
    Ok(())
}

fn server_error(errno: u32, message: String) -> ClientError {
    ClientError::Server { errno, message }
}

fn finish(table: &RefCell<Table>, cookie: u64, r: Result<Reply, ClientError>) {
    if let Some(e) = table.borrow_mut().entries.remove(&cookie) {
        e.complete(r);
    }
}

/// `[off, off+n)` relative to the request `[req_off, req_off+req_len)`, which must hold it.
fn inside(off: u64, n: u64, req_off: u64, req_len: u32) -> Result<u64, ClientError> {
    let end = off.checked_add(n);
    let req_end = req_off + u64::from(req_len);
    match end {
        Some(end) if off >= req_off && end <= req_end && n > 0 => Ok(off - req_off),
        _ => Err(ClientError::protocol(format!(
            "chunk {off}+{n} outside the request {req_off}+{req_len}"
        ))),
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A structured reply chunk (proto.md "Structured reply types").
async fn chunk(
    r: &mut Rd,
    neg: &Negotiated,
    table: &RefCell<Table>,
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> Result<(), ClientError> {
    if !neg.structured {
        return Err(ClientError::protocol("structured reply not negotiated"));
    }
    let (command, req_off, req_len) = {
        let mut t = table.borrow_mut();
        let e = t.get(cookie)?;
        (e.op.command, e.op.offset, e.op.length)
    };
    let done = flags & proto::REPLY_FLAG_DONE != 0;
    let wrong = |what: &str| {
        ClientError::protocol(format!(
            "{what} (reply type {kind}, {length} bytes) to {command:?}"
        ))
    };
    match kind {
        proto::REPLY_TYPE_NONE => {
            if length != 0 || !done {
                return Err(wrong("bad NBD_REPLY_TYPE_NONE"));
            }
        }
        proto::REPLY_TYPE_OFFSET_DATA => {
            if command != Command::Read || length < 9 || length - 8 > req_len {
                return Err(wrong("bad data chunk"));
            }
            let mut o = [0u8; 8];
            read_exact(r, &mut o).await?;
            let n = u64::from(length - 8);
            let rel = inside(u64::from_be_bytes(o), n, req_off, req_len)?;
            let whole = {
                let mut t = table.borrow_mut();
                let e = t.get(cookie)?;
                e.cover(rel, n)?;
                // The usual answer: one chunk with all the data (no zeroed buffer needed).
                e.buf.is_empty() && rel == 0 && n == u64::from(req_len)
            };
            let buf = if whole {
                let v = table.borrow_mut().get(cookie)?.empty_buffer();
                read_new(r, n as usize, v, table).await?
            } else {
                let mut buf = table.borrow_mut().get(cookie)?.buffer();
                read_payload(r, &mut buf[rel as usize..(rel + n) as usize], table).await?;
                buf
            };
            table.borrow_mut().get(cookie)?.buf = buf;
        }
        proto::REPLY_TYPE_OFFSET_HOLE => {
            if command != Command::Read || length != 12 {
                return Err(wrong("bad hole chunk"));
            }
            let mut b = [0u8; 12];
            read_exact(r, &mut b).await?;
            let rel = inside(be64(&b), u64::from(be32(&b[8..])), req_off, req_len)?;
            let mut t = table.borrow_mut();
            let e = t.get(cookie)?;
            e.cover(rel, u64::from(be32(&b[8..])))?;
            // The buffer starts zeroed and chunks never overlap: the hole reads as zeros.
            let buf = e.buffer();
            e.buf = buf;
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            // We always send REQ_ONE: exactly one descriptor (proto.md).
            if command != Command::BlockStatus || length != 12 {
                return Err(wrong("bad block status chunk"));
            }
            let mut b = [0u8; 12];
            read_exact(r, &mut b).await?;
            let (id, len, state) = (be32(&b), be32(&b[4..]), be32(&b[8..]));
            if Some(id) != neg.context {
                return Err(wrong("block status for a context not negotiated"));
            }
            if len == 0 || len > req_len {
                return Err(wrong("block status extent of bad length"));
            }
            let mut t = table.borrow_mut();
            let e = t.get(cookie)?;
            if e.extent.is_some() {
                return Err(wrong("two block status chunks for one context"));
            }
            e.extent = Some((len, state));
        }
        k if k & (1 << 15) != 0 => {
            // Every error type starts with error and message length (proto.md).
            if !(6..=6 + proto::MAX_STRING as u32 + 8).contains(&length) {
                return Err(wrong("bad error chunk"));
            }
            let mut b = vec![0u8; length as usize];
            read_exact(r, &mut b).await?;
            let errno = be32(&b);
            let msg_len = u32::from(u16::from_be_bytes([b[4], b[5]]));
            let ok = match k {
                proto::REPLY_TYPE_ERROR => 6 + msg_len == length,
                proto::REPLY_TYPE_ERROR_OFFSET => {
                    6 + msg_len + 8 == length
                        && inside(be64(&b[6 + msg_len as usize..]), 1, req_off, req_len).is_ok()
                }
                _ => 6 + msg_len <= length,
            };
            if !ok || errno == 0 {
                return Err(wrong("bad error chunk"));
            }
            let message = String::from_utf8_lossy(&b[6..6 + msg_len as usize]).into_owned();
            if errno == proto::ESHUTDOWN {
                return Err(server_error(errno, message));
            }
            let mut t = table.borrow_mut();
            let e = t.get(cookie)?;
            if e.error.is_none() {
                e.error = Some(server_error(errno, message));
            }
        }
        _ => return Err(wrong("unknown reply type")),
    }
    if done {
        let result = {
            let mut t = table.borrow_mut();
            let e = t.get(cookie)?;
            match e.error.take() {
                Some(err) => Err(err),
                None => match command {
                    Command::Read => {
                        // proto.md: a successful read's chunks cover the whole request.
                        if e.covered_bytes != u64::from(req_len) {
                            return Err(wrong("read reply does not cover the request"));
                        }
                        Ok(Reply::Data(std::mem::take(&mut e.buf)))
                    }
                    Command::BlockStatus => match e.extent {
                        Some((length, flags)) => Ok(Reply::Extent { length, flags }),
                        None => return Err(wrong("block status reply without an extent")),
                    },
                    _ => Ok(Reply::Done),
                },
            }
        };
        finish(table, cookie, result);
    }
    Ok(())
}
