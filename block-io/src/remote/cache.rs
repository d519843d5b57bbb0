//! [`RemoteStorage`]: the block cache with sequential read-ahead in front of a remote object.
//!
//! The object is cut into fixed blocks ([`RemoteOptions::block_size`]); a block is either
//! cached (its bytes, with the tick of its last use), in flight (waiters sleep on its
//! [`Flight`]), or absent. A read claims every block it covers, starts the absent ones at once
//! on the shared runtime, and copies out of them in order. A read that starts where an earlier
//! one ended extends that sequential run (eight runs are followed at once, so interleaved
//! readers and a reader with many requests in flight are still seen as sequential); once a run
//! of two or more reads spans a block, the blocks after it are fetched ahead so that a
//! streaming reader finds them cached. Completed blocks beyond the
//! memory budget are evicted least recently used first; blocks in flight are never evicted and
//! readers keep the bytes they copy from alive on their own.
//!
//! Large reads that continue a sequential run skip all this when the source has direct
//! streams (plain `http://`, see [`super::direct`]): the run keeps a connection of its own and
//! its reads come straight from the socket; a stream that fails hands the rest of its read to
//! the cache.
//!
//! A changed object ([`RemoteError::Changed`]) is latched: every later read fails with it, even
//! a read the cache could answer, so old and new bytes never mix in one image.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::direct::{Conn, DirectError, FIRST_SPAN, MAX_SPAN};
use super::error::RemoteError;
use super::{runtime, RemoteIdentity, RemoteOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{check_bounds, raw_scatter, raw_slice, raw_total, Extent, RawBuf, Storage};

/// Where a fetch hands the bytes of its range, in order, as they arrive.
pub(crate) type Deliver = Box<dyn FnMut(Bytes) + Send>;

/// The future of one ranged fetch: `Ok` once the whole range was delivered.
pub(crate) type FetchFuture = Pin<Box<dyn Future<Output = Result<(), RemoteError>> + Send>>;

/// Bytes as the network delivered them: the response's buffers in order, never copied into
/// one (the copy into the reader's memory is the only one).
#[derive(Debug, Clone, Default)]
pub(crate) struct Segs {
    parts: Arc<[Bytes]>,
    len: usize,
}

impl From<Vec<Bytes>> for Segs {
    fn from(parts: Vec<Bytes>) -> Self {
        let len = parts.iter().map(Bytes::len).sum();
        Segs {
            parts: parts.into(),
            len,
        }
    }
}

impl Segs {
    /// Total length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Hands bytes `[at, at + n)` (clamped to the end) to `f(pos, piece)` in order, `pos`
    /// counting from `at`.
    fn each(&self, at: usize, n: usize, f: &mut dyn FnMut(usize, &[u8])) {
        let (mut skip, mut done) = (at, 0usize);
        for p in self.parts.iter() {
            if done == n {
                break;
            }
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            let take = (p.len() - skip).min(n - done);
            f(done, &p[skip..skip + take]);
            done += take;
            skip = 0;
        }
    }
}

/// A remote object that can be read by ranges: what the cache sits on.
pub(crate) trait Source: Send + Sync + std::fmt::Debug + 'static {
    /// Fetches `[offset, offset + len)` of the object as it was at open, handing its bytes to
    /// `deliver` in order as they arrive, never more than `len` (a retry of a transient failure
    /// resumes after the bytes already delivered). Fails with [`RemoteError::Changed`] if the
    /// object is no longer the one opened; on any failure a prefix may have been delivered.
    fn fetch(self: Arc<Self>, offset: u64, len: u64, deliver: Deliver) -> FetchFuture;

    /// Whether [`Source::open_range`] serves direct streams (see [`super::direct`]).
    fn direct(&self) -> bool {
        false
    }

    /// Asks for `[offset, offset + len)` as one direct stream, on `conn` if it can take
    /// another request, else on a new connection; blocks the calling thread.
    fn open_range(&self, conn: Option<Conn>, offset: u64, len: u64) -> Result<Conn, DirectError> {
        let _ = (conn, offset, len);
        Err(DirectError::Unsuitable("no direct streams here".into()))
    }
}

/// Cuts a run's bytes, as they arrive, into its blocks and completes each block as soon as
/// it is whole, so readers start copying before the rest of the run is in.
struct Assembler {
    shared: Arc<Shared>,
    run: Vec<(u64, Arc<Flight>)>,
    /// The run's block being filled.
    next: usize,
    parts: Vec<Bytes>,
    filled: usize,
}

impl Assembler {
    fn push(&mut self, mut chunk: Bytes) {
        while !chunk.is_empty() && self.next < self.run.len() {
            let (idx, _) = self.run[self.next];
            let want = self.shared.block_range(idx).1 as usize;
            let take = (want - self.filled).min(chunk.len());
            self.parts.push(chunk.split_to(take));
            self.filled += take;
            if self.filled == want {
                let segs = Segs::from(std::mem::take(&mut self.parts));
                let (idx, f) = &self.run[self.next];
                self.shared.complete(*idx, f, Ok(segs));
                self.next += 1;
                self.filled = 0;
            }
        }
    }

    /// Fails the blocks not completed yet.
    fn fail(&mut self, e: RemoteError) {
        for (idx, f) in self.run.get(self.next..).unwrap_or(&[]) {
            self.shared.complete(*idx, f, Err(e.clone()));
        }
        self.next = self.run.len();
        self.parts.clear();
    }
}

/// Counters of a [`RemoteStorage`], for tests, benchmarks and curious operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Blocks fetched from the server.
    pub fetches: u64,
    /// Ranged requests that fetched them (a request covers up to
    /// [`RemoteOptions::request_blocks`] consecutive blocks; retries not counted).
    pub requests: u64,
    /// Of those, blocks fetched ahead of a sequential reader.
    pub readahead: u64,
    /// Bytes fetched.
    pub bytes: u64,
    /// Block lookups answered from the cache (or from a fetch already in flight).
    pub hits: u64,
    /// Block lookups that had to start a fetch.
    pub misses: u64,
    /// Range requests of direct streams, which large sequential reads read straight into the
    /// caller's buffers past the cache ([`RemoteOptions::stream_reads`]).
    pub stream_requests: u64,
    /// Bytes read by direct streams.
    pub stream_bytes: u64,
}

/// One block being fetched: readers of the block wait here.
#[derive(Debug, Default)]
struct Flight {
    done: Mutex<Option<Result<Segs, RemoteError>>>,
    cv: Condvar,
}

impl Flight {
    fn finish(&self, r: Result<Segs, RemoteError>) {
        *self.done.lock() = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self) -> Result<Segs, RemoteError> {
        let mut g = self.done.lock();
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            self.cv.wait(&mut g);
        }
    }
}

#[derive(Debug)]
enum Slot {
    Ready { data: Segs, used: u64 },
    Pending(Arc<Flight>),
}

/// Sequential runs followed at once.
const STREAMS: usize = 8;

/// One sequential run: reads that each start where an earlier one ended.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Where its last read ended: a read starting here continues it.
    next: u64,
    /// Where it started.
    start: u64,
    /// Reads after its first.
    reads: u32,
    /// Tick of its last read (the least recent run makes way for a new one).
    used: u64,
}

impl Default for Stream {
    fn default() -> Self {
        Stream {
            next: u64::MAX,
            start: 0,
            reads: 0,
            used: 0,
        }
    }
}

impl State {
    /// Whether a direct stream, idle or in use, will deliver byte `at` later: a read there
    /// comes from several in flight at once (a reader with a queue), and a stream of its own
    /// would fetch the same bytes again.
    fn streaming(&self, at: u64) -> bool {
        self.busy.iter().any(|&(_, a, b)| a <= at && at < b)
            || self.direct.iter().any(|r| {
                let left = r.conn.as_ref().map_or(0, Conn::left);
                r.pos < at && at < r.pos.saturating_add(left)
            })
    }

    /// Files a read of `[offset, end)`: continues the run it follows or starts a new one.
    /// Returns whether the run is sequential enough for read-ahead: two or more reads spanning
    /// at least `block` bytes (so small reads near each other, a format's headers, are not).
    fn follow(&mut self, offset: u64, end: u64, block: u64) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(s) = self.streams.iter_mut().find(|s| s.next == offset) {
            s.next = end;
            s.reads = s.reads.saturating_add(1);
            s.used = tick;
            return end - s.start >= block;
        }
        if let Some(s) = self.streams.iter_mut().min_by_key(|s| s.used) {
            *s = Stream {
                next: end,
                start: offset,
                reads: 0,
                used: tick,
            };
        }
        false
    }
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<u64, Slot>,
    ready: usize,
    tick: u64,
    /// The sequential runs being followed (several readers, or one with many requests in
    /// flight, interleave theirs).
    streams: [Stream; STREAMS],
    /// The latched "object changed" failure.
    changed: Option<RemoteError>,
    /// Direct streams not in use, each waiting for the read that continues its run.
    direct: Vec<DirectRun>,
    /// Direct streams in use: (tick they were taken at, first byte, end of their range).
    busy: Vec<(u64, u64, u64)>,
}

/// Most direct streams kept between reads (each holds a connection and, while its range is
/// not read to the end, up to the kernel's socket buffers of it).
const DIRECT_RUNS: usize = 4;

/// Reads in a row that must start alone (no other read in progress) before direct streams
/// may start or ask for new ranges again: readers with several reads in flight share the
/// cache instead, where streams of their own would fetch the same bytes twice.
const CALM: u64 = 32;

/// The smallest read that takes a direct stream: smaller ones would cost a system call each;
/// the cache's read-ahead serves them in bulk.
const DIRECT_MIN: usize = 64 << 10;

/// A sequential run served by a direct stream.
#[derive(Debug)]
struct DirectRun {
    /// Where the run's next read starts (and its connection's body continues, if any).
    pos: u64,
    /// The next range's length.
    span: u64,
    /// The connection, in the middle of a body or between requests.
    conn: Option<Conn>,
    /// Tick of its last read.
    used: u64,
}

#[derive(Debug, Default)]
struct Counters {
    fetches: AtomicU64,
    requests: AtomicU64,
    readahead: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    stream_requests: AtomicU64,
    stream_bytes: AtomicU64,
}

struct Shared {
    src: Arc<dyn Source>,
    id: RemoteIdentity,
    block: u64,
    blocks: u64,
    cap: usize,
    readahead: u64,
    /// Most blocks one request fetches.
    batch: usize,
    /// Whether large sequential reads take direct streams.
    direct: AtomicBool,
    /// Reads in progress.
    reading: AtomicUsize,
    /// Reads started since one started while another was in progress (saturating).
    calm: AtomicU64,
    state: Mutex<State>,
    counters: Counters,
}

/// A read-only [`Storage`] over a remote object (HTTP(S) range requests or S3), cached in blocks
/// with sequential read-ahead. Made by [`RemoteStorage::open`] or
/// [`open_url`](super::open_url); see the [module docs](super).
pub struct RemoteStorage {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RemoteStorage {
    // Not derived: the cache holds megabytes of image bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStorage")
            .field("identity", &self.shared.id)
            .field("block", &self.shared.block)
            .field("stats", &self.stats())
            .finish()
    }
}

enum Piece {
    Data(Segs),
    Wait(Arc<Flight>),
}

impl RemoteStorage {
    /// Opens the object at `url` (`http://`, `https://` or `s3://bucket/key`): captures its
    /// size and identity and checks that it can be read by ranges.
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<RemoteStorage> {
        let u = url.to_owned();
        let scheme = reqwest::Url::parse(url).map(|p| p.scheme().to_owned());
        let opened = match scheme.as_deref() {
            Ok("s3") => {
                let o = opts.clone();
                runtime::run(async move { super::s3::S3Source::open(&u, &o).await })
            }
            Ok("http" | "https") => {
                let o = opts.clone();
                runtime::run(async move { super::http::HttpSource::open(&u, &o).await })
            }
            Ok(_) => Ok(Err(RemoteError::BadUrl {
                url: url.to_owned(),
                detail: "not an http://, https:// or s3:// URL".into(),
            })),
            Err(e) => Ok(Err(RemoteError::BadUrl {
                url: url.to_owned(),
                detail: e.to_string(),
            })),
        };
        let (src, id) = opened
            .and_then(|r| r)
            .map_err(|e| e.into_error("opening a remote image"))?;
        Ok(RemoteStorage::new(src, id, opts))
    }

    pub(crate) fn new(src: Arc<dyn Source>, id: RemoteIdentity, opts: &RemoteOptions) -> Self {
        let block = opts.block_size.max(4096) as u64;
        let blocks = id.size.div_ceil(block);
        let readahead = opts.readahead as u64;
        let direct = AtomicBool::new(opts.stream_reads && src.direct());
        let cap = (opts.cache_bytes as u64 / block).max(2 * readahead).max(2) as usize;
        RemoteStorage {
            shared: Arc::new(Shared {
                src,
                id,
                block,
                blocks,
                cap,
                readahead,
                batch: opts.request_blocks.max(1),
                direct,
                reading: AtomicUsize::new(0),
                calm: AtomicU64::new(CALM),
                state: Mutex::new(State::default()),
                counters: Counters::default(),
            }),
        }
    }

    /// The object's identity, as captured at open.
    pub fn identity(&self) -> &RemoteIdentity {
        &self.shared.id
    }

    /// The counters so far.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.shared.counters;
        RemoteStats {
            fetches: c.fetches.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            readahead: c.readahead.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            stream_requests: c.stream_requests.load(Ordering::Relaxed),
            stream_bytes: c.stream_bytes.load(Ordering::Relaxed),
        }
    }

    fn read_only(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::ReadOnly,
            format!(
                "{what} on {}: remote images are read-only",
                self.shared.id.url
            ),
        )
    }
}

impl Shared {
    /// Bytes of block `idx`: `[idx * block, min(size, (idx + 1) * block))`.
    fn block_range(&self, idx: u64) -> (u64, u64) {
        let start = idx * self.block;
        (start, (self.id.size - start).min(self.block))
    }

    /// Claims block `idx` for fetching: inserts its flight and returns it (the caller starts
    /// it once the state lock is released).
    fn claim(&self, st: &mut State, idx: u64) -> Arc<Flight> {
        let f = Arc::new(Flight::default());
        st.slots.insert(idx, Slot::Pending(f.clone()));
        f
    }

    /// Starts fetching `run` (consecutive claimed blocks, in order) with one ranged request on
    /// the runtime; each block's flight completes with its slice of the answer.
    fn start(self: &Arc<Self>, run: Vec<(u64, Arc<Flight>)>, ahead: bool) {
        let Some(&(first, _)) = run.first() else {
            return;
        };
        let (off, _) = self.block_range(first);
        let len: u64 = run.iter().map(|(idx, _)| self.block_range(*idx).1).sum();
        self.counters
            .fetches
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if ahead {
            self.counters
                .readahead
                .fetch_add(run.len() as u64, Ordering::Relaxed);
        }
        let me = self.clone();
        let rt = match runtime::runtime() {
            Ok(rt) => rt,
            Err(e) => {
                for (idx, f) in &run {
                    me.complete(*idx, f, Err(e.clone()));
                }
                return;
            }
        };
        let asm = Arc::new(Mutex::new(Assembler {
            shared: me.clone(),
            run,
            next: 0,
            parts: Vec::new(),
            filled: 0,
        }));
        let sink = asm.clone();
        let fut = self
            .src
            .clone()
            .fetch(off, len, Box::new(move |chunk| sink.lock().push(chunk)));
        rt.spawn(async move {
            let r = fut.await;
            let mut a = asm.lock();
            match r {
                Ok(()) if a.next == a.run.len() => {}
                Ok(()) => {
                    let got = a
                        .run
                        .get(..a.next)
                        .unwrap_or(&[])
                        .iter()
                        .map(|(idx, _)| me.block_range(*idx).1)
                        .sum::<u64>()
                        + a.filled as u64;
                    a.fail(RemoteError::Truncated {
                        url: me.id.url.clone(),
                        offset: off,
                        want: len,
                        got,
                    });
                }
                Err(e) => a.fail(e),
            }
        });
    }

    /// Starts the claimed blocks `claimed` (ascending) as runs of consecutive blocks, at most
    /// `batch` blocks a request.
    fn start_runs(self: &Arc<Self>, claimed: Vec<(u64, Arc<Flight>)>, ahead: bool) {
        let mut run: Vec<(u64, Arc<Flight>)> = Vec::new();
        for (idx, f) in claimed {
            let contiguous = run.last().is_some_and(|(last, _)| *last + 1 == idx);
            if !run.is_empty() && (!contiguous || run.len() >= self.batch) {
                self.start(std::mem::take(&mut run), ahead);
            }
            run.push((idx, f));
        }
        if !run.is_empty() {
            self.start(run, ahead);
        }
    }

    /// Files the outcome of block `idx`'s fetch and wakes its readers.
    fn complete(&self, idx: u64, flight: &Arc<Flight>, r: Result<Segs, RemoteError>) {
        {
            let mut st = self.state.lock();
            let ours =
                matches!(st.slots.get(&idx), Some(Slot::Pending(f)) if Arc::ptr_eq(f, flight));
            if ours {
                st.slots.remove(&idx);
            }
            match &r {
                Ok(data) => {
                    self.counters
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if ours && st.changed.is_none() {
                        st.tick += 1;
                        let used = st.tick;
                        st.slots.insert(
                            idx,
                            Slot::Ready {
                                data: data.clone(),
                                used,
                            },
                        );
                        st.ready += 1;
                        self.evict(&mut st);
                    }
                }
                Err(e @ RemoteError::Changed { .. }) => {
                    if st.changed.is_none() {
                        st.changed = Some(e.clone());
                    }
                }
                Err(_) => {}
            }
        }
        flight.finish(r);
    }

    /// Drops least recently used cached blocks until the budget holds.
    fn evict(&self, st: &mut State) {
        while st.ready > self.cap {
            let victim = st
                .slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready { used, .. } => Some((*used, *k)),
                    Slot::Pending(_) => None,
                })
                .min();
            match victim {
                Some((_, k)) => {
                    st.slots.remove(&k);
                    st.ready -= 1;
                }
                None => break,
            }
        }
    }
}

/// Counts a read in progress until dropped.
struct Reading<'a>(&'a AtomicUsize);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The piece of `bufs` at byte `at` of their concatenation: its start and how many bytes
/// follow it in the same buffer (`None` past the end). Pure pointer arithmetic.
fn dest_at(bufs: &[RawBuf], at: usize) -> Option<(*mut u8, usize)> {
    let mut skip = at;
    for b in bufs {
        if skip < b.len {
            return Some((b.ptr.wrapping_add(skip), b.len - skip));
        }
        skip -= b.len;
    }
    None
}

impl RemoteStorage {
    /// Reads `[offset, offset + total(bufs))` into `bufs`: through a direct stream if the read
    /// is large and continues a sequential run (and the source has them), else through the
    /// cache. The one read path behind `read_at` and `read_raw_at`.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    unsafe fn read_into(&self, offset: u64, bufs: &[RawBuf]) -> Result<()> {
        let total = raw_total(bufs)?;
        let len = usize::try_from(total)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "request too large"))?;
        let sh = &self.shared;
        let end = check_bounds(offset, total, sh.id.size)?;
        if len == 0 {
            return Ok(());
        }
        let others = sh.reading.fetch_add(1, Ordering::Relaxed);
        let _reading = Reading(&sh.reading);
        let alone = if others > 0 {
            sh.calm.store(0, Ordering::Relaxed);
            false
        } else {
            sh.calm.fetch_add(1, Ordering::Relaxed) >= CALM
        };
        let mut sequential = None;
        let mut run = None;
        if len >= DIRECT_MIN && sh.direct.load(Ordering::Relaxed) {
            let mut st = sh.state.lock();
            if let Some(e) = &st.changed {
                return Err(e.clone().into_error(format!("reading {offset}+{len}")));
            }
            let seq = st.follow(offset, end, sh.block);
            let tick = st.tick;
            if let Some(i) = st.direct.iter().position(|r| r.pos == offset) {
                run = Some(st.direct.swap_remove(i));
            } else if seq && alone && !st.streaming(offset) {
                // Only a reader with one read at a time gets a new stream: reads in flight
                // at once would each start one over the same bytes; the cache shares them.
                // A connection between requests, left by an idle run, saves a connect.
                let conn = st
                    .direct
                    .iter_mut()
                    .find(|r| r.conn.as_ref().is_some_and(|c| c.left() == 0))
                    .and_then(|r| r.conn.take());
                run = Some(DirectRun {
                    pos: offset,
                    span: FIRST_SPAN,
                    conn,
                    used: tick,
                });
            }
            if let Some(r) = &mut run {
                // Unique per read (`follow` ticks): the key of its `busy` entry.
                r.used = tick;
                // What this run's stream will cover: the rest of its range, or the range it
                // is about to ask for.
                let reach = match r.conn.as_ref().map_or(0, Conn::left) {
                    0 => offset.saturating_add(r.span.max(len as u64)),
                    left => offset.saturating_add(left),
                };
                st.busy.push((tick, offset, reach.min(sh.id.size)));
            }
            sequential = Some(seq);
        }
        let mut done = 0usize;
        if let Some(mut run) = run {
            // SAFETY: passed on from our caller.
            let r = unsafe { self.read_direct(&mut run, offset, bufs, len, alone, &mut done) };
            {
                let mut st = sh.state.lock();
                if let Some(i) = st.busy.iter().position(|b| b.0 == run.used) {
                    st.busy.swap_remove(i);
                }
            }
            match r {
                Ok(()) => {
                    let mut st = sh.state.lock();
                    run.used = st.tick;
                    if st.direct.len() >= DIRECT_RUNS {
                        if let Some(i) = (0..st.direct.len()).min_by_key(|&i| st.direct[i].used) {
                            st.direct.swap_remove(i);
                        }
                    }
                    st.direct.push(run);
                    if let Some(e) = &st.changed {
                        return Err(e.clone().into_error(format!("reading {offset}+{len}")));
                    }
                    return Ok(());
                }
                Err(DirectError::Changed(e)) => {
                    let mut st = sh.state.lock();
                    if st.changed.is_none() {
                        st.changed = Some(e.clone());
                    }
                    return Err(e.into_error(format!("reading {offset}+{len}")));
                }
                Err(DirectError::Unsuitable(_)) => {
                    // The cache serves this storage from now on; drop the idle streams.
                    sh.direct.store(false, Ordering::Relaxed);
                    sh.state.lock().direct.clear();
                }
                // The cache, with its retries, serves the rest of this read.
                Err(DirectError::Failed(_)) => {}
            }
            sequential = Some(false);
        }
        let rest = raw_slice(bufs, done as u64, len - done);
        self.read_cached(
            offset + done as u64,
            len - done,
            sequential,
            &mut |pos, bytes| {
                // SAFETY: `rest` lies within `bufs`, valid for writes (our caller's contract);
                // `bytes` is our own memory, so the two cannot overlap.
                unsafe { raw_scatter(&rest, pos as u64, bytes) }
            },
        )
    }

    /// Reads `[offset, offset + len)` from `run`'s stream into `bufs`, asking for a new range
    /// when the current one is read if `may_ask` (reads have come one at a time lately), else
    /// failing there (`done` counts the bytes read, also on failure).
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    unsafe fn read_direct(
        &self,
        run: &mut DirectRun,
        offset: u64,
        bufs: &[RawBuf],
        len: usize,
        may_ask: bool,
        done: &mut usize,
    ) -> std::result::Result<(), DirectError> {
        let sh = &self.shared;
        while *done < len {
            let pos = offset + *done as u64;
            let mut conn = match run.conn.take() {
                Some(c) if c.left() > 0 => c,
                _ if !may_ask => {
                    return Err(DirectError::Failed(
                        "other reads in flight: the cache serves them together".into(),
                    ))
                }
                idle => {
                    // At least the rest of this read; never past the end.
                    let want = (len - *done) as u64;
                    let span = run.span.max(want).min(sh.id.size - pos);
                    run.span = run.span.saturating_mul(2).min(MAX_SPAN);
                    sh.counters.stream_requests.fetch_add(1, Ordering::Relaxed);
                    sh.src.open_range(idle, pos, span)?
                }
            };
            let Some((ptr, room)) = dest_at(bufs, *done) else {
                break;
            };
            // SAFETY: `ptr` has `room` writable bytes after it (our caller's contract).
            let n = unsafe { conn.read_body(ptr, room.min(len - *done))? };
            *done += n;
            run.pos = pos + n as u64;
            run.conn = Some(conn);
            sh.counters
                .stream_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `[offset, offset + len)` through the cache, handing the bytes to `sink(pos,
    /// bytes)` in order (`pos` counts from `offset`). `sequential` is the run detector's
    /// verdict if the caller has already filed this read with it.
    fn read_cached(
        &self,
        offset: u64,
        len: usize,
        sequential: Option<bool>,
        sink: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<()> {
        let sh = &self.shared;
        let end = check_bounds(offset, len as u64, sh.id.size)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / sh.block;
        let last = (end - 1) / sh.block;
        let mut pieces = Vec::with_capacity((last - first + 1) as usize);
        let mut demand = Vec::new();
        let mut ahead = Vec::new();
        {
            let mut st = sh.state.lock();
            if let Some(e) = &st.changed {
                return Err(e.clone().into_error(format!("reading {offset}+{}", len)));
            }
            let sequential = match sequential {
                Some(s) => s,
                None => st.follow(offset, end, sh.block),
            };
            for idx in first..=last {
                st.tick += 1;
                let tick = st.tick;
                match st.slots.get_mut(&idx) {
                    Some(Slot::Ready { data, used }) => {
                        *used = tick;
                        pieces.push(Piece::Data(data.clone()));
                        sh.counters.hits.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Slot::Pending(f)) => {
                        pieces.push(Piece::Wait(f.clone()));
                        sh.counters.hits.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        let f = sh.claim(&mut st, idx);
                        pieces.push(Piece::Wait(f.clone()));
                        demand.push((idx, f));
                        sh.counters.misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Sequential (reads continuing each other over at least a block): keep the next
            // `readahead` blocks cached or in flight, topped up `batch` blocks a request (or
            // at once when the very next block is missing). Small reads near each other (a
            // format's headers) do not qualify.
            if sequential && sh.readahead > 0 {
                let stop = last
                    .saturating_add(sh.readahead)
                    .min(sh.blocks.saturating_sub(1));
                let absent: Vec<u64> = (last + 1..=stop)
                    .filter(|idx| !st.slots.contains_key(idx))
                    .collect();
                let next_missing = absent.first() == Some(&(last + 1));
                if absent.len() >= sh.batch || next_missing || stop + 1 == sh.blocks {
                    for idx in absent {
                        let f = sh.claim(&mut st, idx);
                        ahead.push((idx, f));
                    }
                }
            }
        }
        sh.start_runs(demand, false);
        sh.start_runs(ahead, true);
        let mut pos = offset;
        let mut done = 0usize;
        for (i, piece) in pieces.into_iter().enumerate() {
            let data = match piece {
                Piece::Data(d) => d,
                Piece::Wait(f) => f
                    .wait()
                    .map_err(|e| e.into_error(format!("reading {offset}+{}", len)))?,
            };
            let block_start = (first + i as u64) * sh.block;
            let at = (pos - block_start) as usize;
            let n = (len - done).min(data.len().saturating_sub(at));
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "reading {offset}+{}: block {} came back short",
                        len,
                        first + i as u64
                    ),
                ));
            }
            data.each(at, n, &mut |pos, piece| sink(done + pos, piece));
            done += n;
            pos += n as u64;
        }
        // A change noticed by a concurrent fetch (read-ahead included) fails this read too:
        // its bytes may be of the old version while others are already of the new one.
        if let Some(e) = &sh.state.lock().changed {
            return Err(e.clone().into_error(format!("reading {offset}+{}", len)));
        }
        Ok(())
    }
}

impl Storage for RemoteStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bufs = [RawBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        // SAFETY: `buf` is borrowed mutably for the whole call.
        unsafe { self.read_into(offset, &bufs) }
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> Result<()> {
        // Straight from the socket or the cached blocks into the caller's memory: no bounce
        // buffer.
        // SAFETY: passed on from our caller.
        unsafe { self.read_into(offset, bufs) }
    }

    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<()> {
        Err(self.read_only(&format!("writing at {offset}")))
    }

    fn len(&self) -> Result<u64> {
        Ok(self.shared.id.size)
    }

    fn set_len(&self, _len: u64) -> Result<()> {
        Err(self.read_only("resizing"))
    }

    fn sync_data(&self) -> Result<()> {
        // Nothing is ever written, so everything is as durable as it will get.
        Ok(())
    }

    fn punch_hole(&self, offset: u64, _len: u64) -> Result<()> {
        Err(self.read_only(&format!("punching a hole at {offset}")))
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            allocated: true,
            len: len.min(self.shared.id.size.saturating_sub(offset)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// An in-memory source that records which blocks were asked for.
    #[derive(Debug)]
    struct MemSource {
        data: Vec<u8>,
        /// (offset, length) of every request.
        asked: Mutex<Vec<(u64, u64)>>,
        changed: AtomicBool,
    }

    impl Source for MemSource {
        fn fetch(self: Arc<Self>, offset: u64, len: u64, mut deliver: Deliver) -> FetchFuture {
            Box::pin(async move {
                self.asked.lock().push((offset, len));
                if self.changed.load(Ordering::Relaxed) {
                    return Err(RemoteError::Changed {
                        url: "mem".into(),
                        expected: "a".into(),
                        found: "b".into(),
                    });
                }
                let s = offset as usize;
                // In uneven pieces, as a network would deliver them.
                let v = &self.data[s..s + len as usize];
                for piece in v.chunks(1000) {
                    deliver(Bytes::copy_from_slice(piece));
                }
                Ok(())
            })
        }
    }

    fn setup(size: usize, opts: &RemoteOptions) -> (Arc<MemSource>, RemoteStorage) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let src = Arc::new(MemSource {
            data,
            asked: Mutex::new(Vec::new()),
            changed: AtomicBool::new(false),
        });
        let id = RemoteIdentity {
            url: "mem".into(),
            size: size as u64,
            etag: None,
            last_modified: None,
        };
        let s = RemoteStorage::new(src.clone(), id, opts);
        (src, s)
    }

    fn opts(readahead: usize, cache_blocks: usize) -> RemoteOptions {
        RemoteOptions {
            block_size: 4096,
            cache_bytes: cache_blocks * 4096,
            readahead,
            ..RemoteOptions::default()
        }
    }

    #[test]
    fn reads_across_blocks_are_exact_and_bounds_are_checked() {
        let (src, s) = setup(3 * 4096 + 100, &opts(0, 16));
        for (off, len) in [(0u64, 1usize), (4095, 2), (100, 3 * 4096), (3 * 4096, 100)] {
            let mut b = vec![0u8; len];
            s.read_at(&mut b, off).unwrap();
            assert_eq!(b, src.data[off as usize..off as usize + len]);
        }
        let mut b = [0u8; 2];
        assert_eq!(
            s.read_at(&mut b, 3 * 4096 + 99).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        // Every block fetched once: the rest came from the cache.
        assert_eq!(s.stats().fetches, 4);
        assert_eq!(s.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(s.set_len(1).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn segments_walk_exactly() {
        let segs = Segs::from(vec![
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defgh"),
            Bytes::from_static(b"ij"),
        ]);
        assert_eq!(segs.len(), 10);
        let flat = |s: &Segs| {
            let mut v = Vec::new();
            s.each(0, usize::MAX, &mut |pos, p| {
                assert_eq!(pos, v.len());
                v.extend_from_slice(p)
            });
            v
        };
        assert_eq!(flat(&segs), b"abcdefghij");
        let mut got = Vec::new();
        segs.each(2, 5, &mut |_, p| got.extend_from_slice(p));
        assert_eq!(got, b"cdefg");
    }

    #[test]
    fn raw_reads_scatter_straight_from_the_cache() {
        let (src, s) = setup(5 * 4096 + 7, &opts(0, 16));
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 9000];
        let bufs = [
            RawBuf {
                ptr: a.as_mut_ptr(),
                len: a.len(),
            },
            RawBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        // SAFETY: both buffers are ours and live across the call.
        unsafe { s.read_raw_at(&bufs, 3000).unwrap() };
        assert_eq!(a, src.data[3000..8000]);
        assert_eq!(b, src.data[8000..17000]);
        let past = [RawBuf {
            ptr: a.as_mut_ptr(),
            len: 5000,
        }];
        // SAFETY: as above.
        let e = unsafe { s.read_raw_at(&past, 5 * 4096) }.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn memory_is_bounded_and_lru() {
        let (src, s) = setup(64 * 4096, &opts(0, 4));
        let mut b = [0u8; 16];
        for idx in [0u64, 1, 2, 3, 0, 4, 0, 1] {
            s.read_at(&mut b, idx * 4096 + 8).unwrap();
        }
        // 0 stayed hot, so 4 evicted 1 (the least recent), which was fetched again.
        assert_eq!(
            src.asked
                .lock()
                .iter()
                .map(|o| o.0 / 4096)
                .collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 1]
        );
        assert!(s.shared.state.lock().ready <= 4);
    }

    #[test]
    fn sequential_reads_fetch_ahead_and_random_ones_do_not() {
        let (src, s) = setup(64 * 4096, &opts(4, 16));
        let mut b = vec![0u8; 1024];
        for i in 0..4u64 {
            s.read_at(&mut b, i * 1024).unwrap();
        }
        // Wait for the read-ahead to land.
        for _ in 0..200 {
            if s.stats().fetches == s.stats().bytes / 4096 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut asked = src.asked.lock().clone();
        asked.sort();
        // Block 0 on demand, blocks 1-4 ahead in one request.
        assert_eq!(asked, [(0, 4096), (4096, 4 * 4096)]);
        assert_eq!(s.stats().readahead, 4);
        assert_eq!(s.stats().requests, 2);
        // Reading on through them costs no demand fetch.
        let misses = s.stats().misses;
        for i in 4..16u64 {
            s.read_at(&mut b, i * 1024).unwrap();
            assert_eq!(b, src.data[i as usize * 1024..][..1024]);
        }
        assert_eq!(s.stats().misses, misses);

        let (src, s) = setup(64 * 4096, &opts(4, 16));
        for idx in [9u64, 3, 40, 17] {
            s.read_at(&mut b, idx * 4096).unwrap();
        }
        assert_eq!(src.asked.lock().len(), 4);
        assert_eq!(s.stats().readahead, 0);
    }

    #[test]
    fn the_read_ahead_window_stays_within_its_bound() {
        // Cache of 8 blocks, 3 ahead, requests of 2 blocks; 1 KiB and 6 KiB reads to the end.
        let mut o = opts(3, 8);
        o.request_blocks = 2;
        let (src, s) = setup(64 * 4096, &o);
        let mut off = 0u64;
        let mut i = 0usize;
        while off < 64 * 4096 {
            let len = if i % 3 == 0 { 6144 } else { 1024 }.min(64 * 4096 - off as usize);
            let mut b = vec![0u8; len];
            s.read_at(&mut b, off).unwrap();
            assert_eq!(b, src.data[off as usize..][..len]);
            let st = s.shared.state.lock();
            let pending = st
                .slots
                .values()
                .filter(|v| matches!(v, Slot::Pending(_)))
                .count();
            // Cached blocks within the budget; in flight at most the window past the read.
            assert!(st.ready <= 8, "{} cached", st.ready);
            assert!(pending <= 3, "{pending} in flight at {off}");
            drop(st);
            off += len as u64;
            i += 1;
        }
        // Every block fetched once.
        assert_eq!(s.stats().fetches, 64);
    }

    #[test]
    fn interleaved_sequential_readers_both_read_ahead() {
        let (src, s) = setup(64 * 4096, &opts(4, 32));
        let mut b = vec![0u8; 2048];
        // Reader A from block 0, reader B from block 32, alternating, 2 KiB at a time.
        for i in 0..4u64 {
            for base in [0u64, 32 * 4096] {
                s.read_at(&mut b, base + i * 2048).unwrap();
                assert_eq!(b, src.data[(base + i * 2048) as usize..][..2048]);
            }
        }
        for _ in 0..200 {
            if s.stats().bytes >= s.stats().fetches * 4096 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut asked = src.asked.lock().clone();
        asked.sort();
        // Each reader: its first block on demand, the next four ahead in one request.
        assert_eq!(
            asked,
            [
                (0, 4096),
                (4096, 4 * 4096),
                (32 * 4096, 4096),
                (33 * 4096, 4 * 4096)
            ]
        );
    }

    #[test]
    fn a_changed_object_is_latched() {
        let (src, s) = setup(8 * 4096, &opts(0, 16));
        let mut b = [0u8; 8];
        s.read_at(&mut b, 0).unwrap();
        src.changed.store(true, Ordering::Relaxed);
        let e = s.read_at(&mut b, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(matches!(
            RemoteError::find(&e),
            Some(RemoteError::Changed { .. })
        ));
        // Block 0 is cached, yet it fails too.
        assert_eq!(s.read_at(&mut b, 0).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn debug_output_stays_small() {
        let (_, s) = setup(64 * 4096, &opts(0, 16));
        let mut b = vec![0u8; 64 * 4096];
        s.read_at(&mut b, 0).unwrap();
        let d = format!("{s:?}");
        assert!(d.len() < 1000 && d.contains("RemoteStorage"), "{d}");
    }
}
