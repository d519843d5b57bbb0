//! [`send`]: plan the ranges to send from the chain's block status, compress chunks on a
//! small pool of threads at a level the output queue's depth picks, write them in order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use block_io::{BlockDevice, BlockStatus, RateLimiter};
use parking_lot::{Condvar, Mutex};

use super::wire::{self, Codec, StreamHeader, StreamIdentity};
use super::{SendError, ADAPT_EVERY};

/// The adaptive ladder: 0 stores records raw, other steps are zstd levels.
const LADDER: [i32; 7] = [0, -5, -1, 1, 3, 6, 9];
/// Where the adaptive level starts (zstd 1).
const LADDER_START: usize = 3;

/// How hard to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// Chosen from the output queue's depth, from none up to zstd 9 (see the module docs).
    #[default]
    Auto,
    /// This zstd level throughout (-7..=19); 0 stores every record raw.
    Fixed(i32),
}

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Send only what the layers above this parent image of the chain hold (an
    /// incremental stream, applied to a copy of that image).
    pub since: Option<PathBuf>,
    /// Compression level.
    pub level: Level,
    /// Compressing threads (at least 1).
    pub threads: usize,
    /// Largest DATA record in bytes (a sector multiple, at most [`super::MAX_RECORD`]).
    pub chunk: u32,
    /// Stream bytes per second at most (0: unlimited).
    pub rate: u64,
    /// Progress counters the caller can watch from another thread.
    pub progress: Option<Arc<SendProgress>>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            since: None,
            level: Level::Auto,
            threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 4),
            chunk: 1 << 20,
            rate: 0,
            progress: None,
        }
    }
}

/// Progress of a running [`send`].
#[derive(Debug, Default)]
pub struct SendProgress {
    total: AtomicU64,
    done: AtomicU64,
    stream: AtomicU64,
    level: AtomicI32,
}

impl SendProgress {
    /// Bytes of the disk to send (data and zero ranges), known once planned.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes of the disk sent so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stream bytes written so far.
    pub fn stream_bytes(&self) -> u64 {
        self.stream.load(Ordering::Relaxed)
    }

    /// The compression level now (0: none).
    pub fn level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }
}

/// How many records went at one level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelUse {
    /// The zstd level; 0 for records stored raw because the level was 0.
    pub level: i32,
    /// DATA records compressed (or stored) at it.
    pub records: u64,
    /// Of these, stored raw because zstd did not shrink them enough.
    pub incompressible: u64,
    /// Their bytes on the disk.
    pub bytes_in: u64,
    /// Their bytes in the stream (payloads).
    pub bytes_out: u64,
}

/// What a [`send`] did.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// The header sent.
    pub header: StreamHeader,
    /// DATA and ZERO records.
    pub records: u64,
    /// Bytes of the disk sent as DATA.
    pub data_bytes: u64,
    /// Bytes of the disk sent as ZERO.
    pub zero_bytes: u64,
    /// Bytes of the stream.
    pub stream_bytes: u64,
    /// DATA records by level, lowest level first.
    pub levels: Vec<LevelUse>,
    /// How long it took.
    pub elapsed: Duration,
}

/// One piece of work: a chunk to read and compress, or a zero range.
#[derive(Debug, Clone, Copy)]
struct Task {
    offset: u64,
    len: u64,
    zero: bool,
}

/// A finished record.
struct Done {
    seq: usize,
    bytes: Vec<u8>,
    task: Task,
    /// For DATA: how it was stored.
    data: Option<Stored>,
}

/// How a DATA record was stored.
#[derive(Debug, Clone, Copy)]
struct Stored {
    /// The level it was made at.
    level: i32,
    /// Stored raw because zstd did not shrink it enough.
    incompressible: bool,
    /// Payload bytes.
    bytes: u64,
}

/// Records that may be finished but not yet written: the output queue. Workers take a
/// credit before a task; the writer returns it once the record is written.
struct Credits {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Credits {
    fn take(&self, stop: &AtomicBool) -> bool {
        let mut f = self.free.lock();
        while *f == 0 {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            self.cv.wait_for(&mut f, Duration::from_millis(50));
        }
        *f -= 1;
        true
    }

    fn give(&self) {
        *self.free.lock() += 1;
        self.cv.notify_one();
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

/// The ranges to send, in order: runs that layers above `limit` (a depth; the chain's
/// length for a full send) hold, data runs cut into `chunk`-byte tasks, zero runs whole.
fn plan(disk: &chain::Disk, limit: usize, chunk: u64) -> Result<Vec<Task>, SendError> {
    let size = disk.info().virtual_size;
    let mut runs: Vec<Task> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let (run, depth) =
            disk.block_status_depth(off, size - off)
                .map_err(|source| SendError::Source {
                    offset: off,
                    source,
                })?;
        // A device must report at least a sector; guard against a zero-length answer.
        let len = run.len.clamp(1, size - off);
        let keep = depth < limit && run.status != BlockStatus::Unallocated;
        if keep {
            let zero = run.status == BlockStatus::Zero;
            match runs.last_mut() {
                Some(last) if last.zero == zero && last.offset + last.len == off => last.len += len,
                _ => runs.push(Task {
                    offset: off,
                    len,
                    zero,
                }),
            }
        }
        off += len;
    }
    let mut tasks = Vec::with_capacity(runs.len());
    for r in runs {
        if r.zero {
            tasks.push(r);
            continue;
        }
        let mut o = r.offset;
        while o < r.offset + r.len {
            let len = chunk.min(r.offset + r.len - o);
            tasks.push(Task {
                offset: o,
                len,
                zero: false,
            });
            o += len;
        }
    }
    Ok(tasks)
}

/// Reads, checks for zeros and compresses one task into its record.
fn make_record(
    disk: &chain::Disk,
    task: Task,
    level: i32,
    buf: &mut Vec<u8>,
    cbuf: &mut Vec<u8>,
    comp: &mut Option<(zstd::bulk::Compressor<'static>, i32)>,
) -> Result<(Vec<u8>, Option<Stored>), SendError> {
    // Zero ranges go as no bytes: the writer merges neighbours into one ZERO record.
    if task.zero {
        return Ok((Vec::new(), None));
    }
    // Tasks of data are at most `chunk` (<= MAX_RECORD) bytes.
    let len = task.len as usize;
    buf.resize(len, 0);
    disk.read_at(buf, task.offset)
        .map_err(|source| SendError::Source {
            offset: task.offset,
            source,
        })?;
    if buf.iter().all(|&b| b == 0) {
        return Ok((Vec::new(), None));
    }
    let len32 = task.len as u32;
    let mut out = Vec::with_capacity(wire::DATA_HEAD + len + 4);
    if level == 0 {
        wire::encode_data(&mut out, task.offset, len32, Codec::None, 0, buf);
        return Ok((
            out,
            Some(Stored {
                level: 0,
                incompressible: false,
                bytes: task.len,
            }),
        ));
    }
    let c = match comp {
        Some((c, l)) => {
            if *l != level {
                c.set_compression_level(level)
                    .map_err(|e| SendError::Invalid(format!("zstd level {level}: {e}")))?;
                *l = level;
            }
            c
        }
        None => {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| SendError::Invalid(format!("zstd level {level}: {e}")))?;
            &mut comp.insert((c, level)).0
        }
    };
    cbuf.clear();
    cbuf.reserve(zstd::zstd_safe::compress_bound(len));
    let packed = c.compress_to_buffer(buf.as_slice(), cbuf).is_ok() && cbuf.len() + len / 32 < len;
    let lvl = level.clamp(-128, 127) as i8;
    if packed {
        wire::encode_data(&mut out, task.offset, len32, Codec::Zstd, lvl, cbuf);
        Ok((
            out,
            Some(Stored {
                level,
                incompressible: false,
                bytes: cbuf.len() as u64,
            }),
        ))
    } else {
        wire::encode_data(&mut out, task.offset, len32, Codec::None, lvl, buf);
        Ok((
            out,
            Some(Stored {
                level,
                incompressible: true,
                bytes: task.len,
            }),
        ))
    }
}

/// Writes the stream of `disk` (flattened; with [`SendOptions::since`], the changes above
/// that snapshot) to `out`. See the module docs for the format and the adaptive level.
pub fn send(
    disk: &chain::Disk,
    opts: &SendOptions,
    out: &mut dyn Write,
) -> Result<SendReport, SendError> {
    let start = Instant::now();
    let info = disk.info();
    let sector = info.logical_sector_size;
    if opts.threads == 0 || opts.threads > 256 {
        return Err(SendError::Invalid(format!(
            "{} compressing threads (1 to 256)",
            opts.threads
        )));
    }
    if opts.chunk < sector || opts.chunk > super::MAX_RECORD || opts.chunk % sector != 0 {
        return Err(SendError::Invalid(format!(
            "chunk {} is not a multiple of {sector} from {sector} to {}",
            opts.chunk,
            super::MAX_RECORD
        )));
    }
    if let Level::Fixed(l) = opts.level {
        if !(-7..=19).contains(&l) {
            return Err(SendError::Invalid(format!("zstd level {l} (-7 to 19)")));
        }
    }
    let layers = disk.layers();
    let top = &layers[0];
    let (limit, base) = match &opts.since {
        None => (layers.len(), None),
        Some(snap) => {
            let Some(k) = layers.iter().position(|l| same_file(&l.path, snap)) else {
                return Err(SendError::NotInChain {
                    snapshot: snap.clone(),
                    top: top.path.clone(),
                });
            };
            let id = StreamIdentity::of_layer(&layers[k])
                .map_err(|source| SendError::Source { offset: 0, source })?;
            (k, Some(id))
        }
    };
    let source = match top.identity {
        chain::Identity::Raw => StreamIdentity::None,
        _ => StreamIdentity::of_layer(top)
            .map_err(|source| SendError::Source { offset: 0, source })?,
    };
    let header = StreamHeader {
        virtual_size: info.virtual_size,
        logical_sector_size: sector,
        physical_sector_size: info.physical_sector_size.max(sector),
        max_record: opts.chunk,
        format: top.format,
        source,
        base,
    };
    let tasks = plan(disk, limit, u64::from(opts.chunk))?;
    let progress = opts.progress.clone().unwrap_or_default();
    progress
        .total
        .store(tasks.iter().map(|t| t.len).sum(), Ordering::Relaxed);

    let mut w = Writer {
        out,
        digest: 0,
        bytes: 0,
        limiter: (opts.rate > 0)
            .then(|| RateLimiter::new(opts.rate, (opts.rate / 10).max(1 << 20))),
    };
    w.put(&header.encode())?;

    let queue = 2 * opts.threads + 2;
    let credits = Credits {
        free: Mutex::new(queue),
        cv: Condvar::new(),
    };
    let stop = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let mut rung = LADDER_START;
    let level = AtomicI32::new(match opts.level {
        Level::Auto => LADDER[rung],
        Level::Fixed(l) => l,
    });
    progress
        .level
        .store(level.load(Ordering::Relaxed), Ordering::Relaxed);
    let mut uses: BTreeMap<i32, LevelUse> = BTreeMap::new();
    let (mut records, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);

    let result = std::thread::scope(|s| -> Result<(), SendError> {
        let (tx, rx) = mpsc::channel::<Result<Done, SendError>>();
        for _ in 0..opts.threads {
            let tx = tx.clone();
            let (credits, stop, next, level, tasks) = (&credits, &stop, &next, &level, &tasks);
            s.spawn(move || {
                let (mut buf, mut cbuf, mut comp) = (Vec::new(), Vec::new(), None);
                loop {
                    if !credits.take(stop) {
                        return;
                    }
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&task) = tasks.get(seq) else {
                        return;
                    };
                    let lvl = level.load(Ordering::Relaxed);
                    let r = make_record(disk, task, lvl, &mut buf, &mut cbuf, &mut comp).map(
                        |(bytes, data)| Done {
                            seq,
                            bytes,
                            task,
                            data,
                        },
                    );
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let stop_all = || {
            stop.store(true, Ordering::Relaxed);
            credits.cv.notify_all();
        };
        let mut pending: BTreeMap<usize, Done> = BTreeMap::new();
        let mut want = 0usize;
        let (mut full, mut starved, mut since_adapt) = (0u64, 0u64, 0u64);
        // A ZERO range not yet written: following zero ranges extend it.
        let mut zero_run: Option<(u64, u64)> = None;
        while want < tasks.len() {
            let d = match pending.remove(&want) {
                Some(d) => d,
                None => {
                    if pending.is_empty() {
                        starved += 1;
                    }
                    match rx.recv() {
                        Ok(Ok(d)) => {
                            pending.insert(d.seq, d);
                            continue;
                        }
                        Ok(Err(e)) => {
                            stop_all();
                            return Err(e);
                        }
                        Err(_) => {
                            stop_all();
                            return Err(SendError::Invalid(
                                "the compressing threads stopped early".into(),
                            ));
                        }
                    }
                }
            };
            // Records finished and waiting, counting those still in the channel.
            let waiting = queue - *credits.free.lock();
            if waiting + 1 >= queue {
                full += 1;
            }
            let put = match (d.data.is_none(), &mut zero_run) {
                (true, Some((o, l))) if *o + *l == d.task.offset => {
                    *l += d.task.len;
                    Ok(())
                }
                (true, run) => match run.replace((d.task.offset, d.task.len)) {
                    Some((o, l)) => w.put_record(&wire::encode_zero(o, l), &mut records),
                    None => Ok(()),
                },
                (false, run) => match run.take() {
                    Some((o, l)) => w.put_record(&wire::encode_zero(o, l), &mut records),
                    None => Ok(()),
                }
                .and_then(|()| w.put_record(&d.bytes, &mut records)),
            };
            if let Err(e) = put {
                stop_all();
                return Err(e);
            }
            credits.give();
            want += 1;
            match d.data {
                Some(Stored {
                    level: lvl,
                    incompressible: raw,
                    bytes: stored,
                }) => {
                    data_bytes += d.task.len;
                    let u = uses.entry(lvl).or_insert(LevelUse {
                        level: lvl,
                        records: 0,
                        incompressible: 0,
                        bytes_in: 0,
                        bytes_out: 0,
                    });
                    u.records += 1;
                    u.incompressible += u64::from(raw);
                    u.bytes_in += d.task.len;
                    u.bytes_out += stored;
                }
                None => zero_bytes += d.task.len,
            }
            progress.done.fetch_add(d.task.len, Ordering::Relaxed);
            progress.stream.store(w.bytes, Ordering::Relaxed);
            since_adapt += 1;
            if opts.level == Level::Auto && since_adapt >= ADAPT_EVERY {
                // Output slow (the queue stayed full): compress harder. Compressors slow
                // (the writer waited on an empty queue): compress less, down to none.
                if full * 2 > since_adapt && rung + 1 < LADDER.len() {
                    rung += 1;
                } else if starved * 2 > since_adapt && rung > 0 {
                    rung -= 1;
                }
                level.store(LADDER[rung], Ordering::Relaxed);
                progress.level.store(LADDER[rung], Ordering::Relaxed);
                (full, starved, since_adapt) = (0, 0, 0);
            }
        }
        stop_all();
        if let Some((o, l)) = zero_run {
            w.put_record(&wire::encode_zero(o, l), &mut records)?;
        }
        Ok(())
    });
    result?;
    let digest = w.digest;
    w.put(&wire::encode_end(records, data_bytes, zero_bytes, digest))?;
    w.out.flush().map_err(|source| SendError::Stream {
        op: "write",
        source,
    })?;
    progress.stream.store(w.bytes, Ordering::Relaxed);
    Ok(SendReport {
        header,
        records,
        data_bytes,
        zero_bytes,
        stream_bytes: w.bytes,
        levels: uses.into_values().collect(),
        elapsed: start.elapsed(),
    })
}

/// The stream's output: rate-limited, counted, digested.
struct Writer<'a> {
    out: &'a mut dyn Write,
    digest: u32,
    bytes: u64,
    limiter: Option<RateLimiter>,
}

impl Writer<'_> {
    /// Writes one record and counts it.
    fn put_record(&mut self, b: &[u8], records: &mut u64) -> Result<(), SendError> {
        *records += 1;
        self.put(b)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), SendError> {
        if let Some(l) = &self.limiter {
            l.acquire(b.len() as u64);
        }
        self.out.write_all(b).map_err(|source| SendError::Stream {
            op: "write",
            source,
        })?;
        self.digest = crc32c::crc32c_append(self.digest, b);
        self.bytes += b.len() as u64;
        Ok(())
    }
}
