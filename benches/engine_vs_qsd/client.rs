//! The one client both backends are measured with: libblkio's `virtio-blk-vhost-user` driver
//! (the `blkio` crate, which QEMU's `blkio` block driver is built on), one thread per queue,
//! each keeping `depth` 4 KiB requests in flight at random 4 KiB-aligned offsets.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const DRIVER: &str = "virtio-blk-vhost-user";
/// Bytes per request.
pub const BLOCK: usize = 4096;
/// Bytes per request while warming the page cache through the backend.
const WARM_CHUNK: usize = 256 << 10;
/// Warm-up requests in flight per queue.
const WARM_DEPTH: usize = 4;

/// What one client run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Requests completed before the deadline (all queues).
    pub ops: u64,
    /// Seconds from the first submission to the last counted completion (longest queue).
    pub secs: f64,
    /// Requests that completed with an error.
    pub errors: u64,
    /// The first error's (negative errno) return value.
    pub first_error: i32,
    /// Reads that completed successfully with bytes the image does not hold there.
    pub bad_data: u64,
    /// The first such read: (offset, byte read, byte expected).
    pub first_bad: (u64, u8, u8),
    /// CPU seconds the server process used during the timed part (`Load::server`), if known.
    pub server_cpu: Option<f64>,
}

impl Run {
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// The workload of one run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub queues: usize,
    pub depth: usize,
    pub write: bool,
    pub duration: Duration,
    /// Seeds the offsets: the same seed gives every backend the same offset sequence.
    pub seed: u64,
    /// What a read must find: the byte the image holds at an offset, or else `written` (what
    /// this client's write runs leave behind). Checked on the first and last byte of every
    /// read, which are cleared before it is sent.
    pub expect: Option<fn(u64) -> u8>,
    /// Before the timed part, read the whole disk once through the backend (each queue its
    /// share, in 256 KiB requests): the page cache then holds what a guest's earlier reads
    /// through this backend put there.
    pub warm: bool,
    /// The server's process id: its CPU time over the timed part goes into `Run::server_cpu`.
    pub server: Option<u32>,
}

/// CPU seconds (user and system, all threads) process `pid` has used, from `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// The byte write runs write.
pub const WRITTEN: u8 = 0x5a;

/// xorshift64*: cheap, deterministic, good enough to scatter offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Connects to the backend at `sock` (retrying while it starts listening), then runs `load`.
pub fn drive(sock: &Path, load: &Load, connect_timeout: Duration) -> Result<Run, String> {
    let path = sock
        .to_str()
        .ok_or_else(|| format!("socket path {} is not UTF-8", sock.display()))?;
    let t0 = Instant::now();
    let mut b = loop {
        let mut b = Blkio::new(DRIVER).map_err(|e| format!("blkio: {e}"))?;
        b.set_str("path", path)
            .map_err(|e| format!("blkio path: {e}"))?;
        match b.connect() {
            Ok(()) => break b,
            Err(e) if t0.elapsed() < connect_timeout => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot connect to {path}: {e}")),
        }
    };
    let queues = i32::try_from(load.queues).map_err(|_| "too many queues".to_string())?;
    b.set_i32("num-queues", queues)
        .map_err(|e| format!("num-queues: {e}"))?;
    // Room for `depth` requests of three descriptors each, with or without indirect ones.
    let qsize = (load.depth * 4).next_power_of_two().max(64);
    b.set_i32("queue-size", i32::try_from(qsize).unwrap_or(256))
        .map_err(|e| format!("queue-size: {e}"))?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| format!("capacity: {e}"))?;
    let started = b.start().map_err(|e| format!("start: {e}"))?;
    let per_queue = if load.warm {
        (load.depth * BLOCK).max(WARM_DEPTH * WARM_CHUNK)
    } else {
        load.depth * BLOCK
    };
    let region = b
        .alloc_mem_region(per_queue * load.queues)
        .map_err(|e| format!("alloc_mem_region: {e}"))?;
    b.map_mem_region(&region)
        .map_err(|e| format!("map_mem_region: {e}"))?;
    let base = region.addr;
    // SAFETY: the region is a fresh private-to-us shared mapping of `len` bytes that no
    // request uses yet; filling it gives writes non-zero data.
    unsafe { std::ptr::write_bytes(base as *mut u8, WRITTEN, region.len) };

    let pages = capacity / BLOCK as u64;
    if pages == 0 {
        return Err(format!("the disk has {capacity} bytes"));
    }
    // Every queue finishes its warm-up before any starts the timed part.
    let start = Arc::new(Barrier::new(started.queues.len()));
    let cpu_at_start = Arc::new(Mutex::new(None));
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let load = *load;
            let buf = base + i * per_queue;
            let start = start.clone();
            let cpu = cpu_at_start.clone();
            std::thread::spawn(move || run_queue(q, buf, pages, &load, i as u64, &start, &cpu))
        })
        .collect();
    let mut total = Run::default();
    let mut failure = None;
    for th in threads {
        match th.join() {
            Ok(Ok(r)) => {
                total.ops += r.ops;
                total.secs = total.secs.max(r.secs);
                if r.errors > 0 && total.errors == 0 {
                    total.first_error = r.first_error;
                }
                total.errors += r.errors;
                if r.bad_data > 0 && total.bad_data == 0 {
                    total.first_bad = r.first_bad;
                }
                total.bad_data += r.bad_data;
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a client thread panicked".to_string()),
        }
    }
    let before = *cpu_at_start.lock().unwrap();
    total.server_cpu = match (before, load.server.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    // The queues are gone (dropped by their threads); the instance and region go last.
    drop(b);
    match failure {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Reads queue `qi`'s share of the disk (`pages` pages) sequentially, `WARM_DEPTH` requests
/// of `WARM_CHUNK` bytes in flight, into the buffer at `buf`.
fn warm_queue(q: &mut Blkioq, buf: usize, pages: u64, load: &Load, qi: u64) -> Result<(), String> {
    let n = load.queues.max(1) as u64;
    let bytes = pages * BLOCK as u64;
    let share = (pages / n) * BLOCK as u64;
    let start = qi * share;
    let end = if qi + 1 == n { bytes } else { start + share };
    let mut next = start;
    let mut in_flight = 0usize;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..WARM_DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut free: Vec<usize> = (0..WARM_DEPTH).collect();
    loop {
        while next < end {
            let Some(slot) = free.pop() else { break };
            let len = (end - next).min(WARM_CHUNK as u64) as usize;
            q.read(
                next,
                (buf + slot * WARM_CHUNK) as *mut u8,
                len,
                slot,
                ReqFlags::empty(),
            );
            next += len as u64;
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(());
        }
        let mut timeout = Duration::from_secs(60);
        let got = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| format!("warm-up do_io: {e}"))?;
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` slots.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("a warm-up read failed: {}", c.ret));
            }
            in_flight -= 1;
            free.push(c.user_data);
        }
    }
}

/// One queue's loop: `depth` requests in flight until the deadline, then drain.
fn run_queue(
    mut q: Blkioq,
    buf: usize,
    pages: u64,
    load: &Load,
    qi: u64,
    start: &Barrier,
    cpu_at_start: &Mutex<Option<f64>>,
) -> Result<Run, String> {
    let warmed = if load.warm {
        let r = warm_queue(&mut q, buf, pages, load, qi);
        // Writes send these buffers: make them `WRITTEN` again, not what the warm-up read.
        // SAFETY: the queue's buffer is ours alone and no request is in flight.
        unsafe { std::ptr::write_bytes(buf as *mut u8, WRITTEN, load.depth * BLOCK) };
        r
    } else {
        Ok(())
    };
    // Wait even after a failed warm-up: the other queues would wait for this one forever.
    if start.wait().is_leader() {
        *cpu_at_start.lock().unwrap() = load.server.and_then(cpu_seconds);
    }
    warmed?;
    let mut rng = Rng::new(load.seed.wrapping_add(qi.wrapping_mul(0x1000_0001)));
    let mut offsets = vec![0u64; load.depth];
    let submit = |q: &mut Blkioq, rng: &mut Rng, offsets: &mut [u64], slot: usize| {
        let off = (rng.next() % pages) * BLOCK as u64;
        offsets[slot] = off;
        let ptr = (buf + slot * BLOCK) as *mut u8;
        if load.write {
            q.write(off, ptr, BLOCK, slot, ReqFlags::empty());
        } else {
            if load.expect.is_some() {
                // SAFETY: the slot's 4 KiB are ours: its previous request has completed.
                unsafe {
                    ptr.write_volatile(0);
                    ptr.add(BLOCK - 1).write_volatile(0);
                }
            }
            q.read(off, ptr, BLOCK, slot, ReqFlags::empty());
        }
    };
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..load.depth).map(|_| MaybeUninit::uninit()).collect();
    let t0 = Instant::now();
    let deadline = t0 + load.duration;
    for slot in 0..load.depth {
        submit(&mut q, &mut rng, &mut offsets, slot);
    }
    let mut in_flight = load.depth;
    let mut run = Run::default();
    let mut counting = true;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(60);
        let got = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| format!("do_io: {e} (no completion within 60 s?)"))?;
        let now = Instant::now();
        if counting && now >= deadline {
            counting = false;
        }
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` slots.
            let c = unsafe { c.assume_init_read() };
            in_flight -= 1;
            if c.ret != 0 {
                if run.errors == 0 {
                    run.first_error = c.ret;
                }
                run.errors += 1;
            } else if let (false, Some(expect)) = (load.write, load.expect) {
                let off = offsets[c.user_data];
                let ptr = (buf + c.user_data * BLOCK) as *const u8;
                for (i, pos) in [(0, off), (BLOCK - 1, off + BLOCK as u64 - 1)] {
                    // SAFETY: the request completed: the backend wrote these bytes before it
                    // put the request in the used ring (release), and do_io read it (acquire).
                    let got = unsafe { ptr.add(i).read_volatile() };
                    let want = expect(pos);
                    if got != want && got != WRITTEN {
                        if run.bad_data == 0 {
                            run.first_bad = (pos, got, want);
                        }
                        run.bad_data += 1;
                        break;
                    }
                }
            }
            if counting {
                run.ops += 1;
                submit(&mut q, &mut rng, &mut offsets, c.user_data);
                in_flight += 1;
            }
        }
        if counting {
            run.secs = (now - t0).as_secs_f64();
        }
    }
    Ok(run)
}
