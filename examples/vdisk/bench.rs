//! `vdisk bench`: qemu-img bench's workload on any image or chain, through the I/O engine
//! (`block_io::engine`) as `vdisk serve` runs guest requests: `-c` requests of `-s` bytes,
//! `-d` in flight, from offset `-o` in steps of `-S` (wrapping at the end of the disk), reads
//! or (`-w`) writes of the `--pattern` byte, with `-t none` (O_DIRECT) or `writeback`, on
//! `-i io_uring` or `threads`. The same flags as `qemu-img bench`, so the two compare
//! directly.

use std::path::PathBuf;
use std::time::Instant;

use vdisk::block_io::engine::{Aio, DeviceQueue, Engine, Started};
use vdisk::block_io::{AlignedBuf, RawBuf};

use crate::size::parse_size;
use crate::{CliError, CliResult};

/// `vdisk bench` arguments (qemu-img bench's names).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: u32,
    /// Bytes per request (K/M suffixes).
    #[arg(short = 's', default_value = "4K")]
    size: String,
    /// Bytes between the starts of consecutive requests (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Byte written by write requests.
    #[arg(long, default_value_t = 0xa5)]
    pattern: u8,
    /// Cache mode: none (O_DIRECT) or writeback.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// I/O engine: io_uring or threads.
    #[arg(short = 'i', default_value = "io_uring")]
    aio: String,
    /// Image format (detected by content if absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Image file.
    image: PathBuf,
}

/// Parses `-t`: `true` for O_DIRECT.
pub fn parse_cache(mode: &str) -> Result<bool, CliError> {
    match mode {
        "none" | "directsync" => Ok(true),
        "writeback" | "writethrough" => Ok(false),
        _ => Err(CliError::new(format!(
            "unknown cache mode '{mode}' (use none or writeback)"
        ))),
    }
}

/// Parses `-i`.
pub fn parse_aio(name: &str) -> Result<Aio, CliError> {
    Aio::from_name(name)
        .ok_or_else(|| CliError::new(format!("unknown aio '{name}' (use io_uring or threads)")))
}

pub fn run(a: BenchArgs) -> CliResult {
    let direct = parse_cache(&a.cache)?;
    let aio = parse_aio(&a.aio)?;
    let size = parse_size(&a.size)?;
    let step = a
        .step
        .as_deref()
        .map(parse_size)
        .transpose()?
        .unwrap_or(size);
    let start = parse_size(&a.offset)?;
    if a.depth == 0 || a.depth > 4096 {
        return Err(CliError::new("-d takes 1 to 4096 requests in flight"));
    }
    let img = crate::image::open_with(
        &a.image,
        a.format.as_deref(),
        &crate::image::Access {
            read_only: !a.write,
            direct,
            // As qemu-img bench: host readahead stays (its default pattern is sequential).
            random_access: false,
            force_share: false,
        },
    )?;
    let info = img.dev.info();
    let sector = u64::from(info.logical_sector_size);
    if size == 0 || size % sector != 0 || size > 64 << 20 {
        return Err(CliError::new(format!(
            "-s must be a multiple of {sector} bytes up to 64 MiB"
        )));
    }
    if step % sector != 0 || start % sector != 0 {
        return Err(CliError::new(format!(
            "-S and -o must be multiples of {sector} bytes"
        )));
    }
    if start
        .checked_add(size)
        .is_none_or(|e| e > info.virtual_size)
    {
        return Err(CliError::new(format!(
            "the first request ({start}+{size}) lies past the end of the disk ({} bytes)",
            info.virtual_size
        )));
    }
    let engine = Engine::new(aio, a.depth).map_err(|e| CliError::new(e.chain_string()))?;
    let mut q: DeviceQueue<usize> = DeviceQueue::new(img.dev.clone(), engine);
    let depth = (a.depth as u64).min(a.count.max(1)) as usize;
    let mut bufs: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::new(size as usize, 4096))
        .collect();
    if a.write {
        for b in &mut bufs {
            b.fill(a.pattern);
        }
    }
    println!(
        "Sending {} {} requests, {size} bytes each, {depth} in parallel (starting at offset \
         {start}, step size {step})",
        a.count,
        if a.write { "write" } else { "read" }
    );
    let mut next = start;
    let mut sent = 0u64;
    let mut done = 0u64;
    let mut errors = 0u64;
    let mut first_err = None;
    let mut free: Vec<usize> = (0..depth).collect();
    let mut reaped = Vec::new();
    let t0 = Instant::now();
    while done < a.count {
        while sent < a.count {
            let Some(slot) = free.pop() else { break };
            let b = &mut bufs[slot];
            let raw = [RawBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            }];
            // SAFETY: the buffer stays in `bufs`, untouched, until its request is reaped
            // (its slot returns to `free` only then); the queue waits for every request
            // before it drops.
            match unsafe { q.start(a.write, next, &raw, slot) } {
                Started::Queued => {}
                Started::Done(s, r) => reaped.push((s, r)),
            }
            sent += 1;
            next = next_offset(next, step, info.virtual_size, size);
            next -= next % sector;
        }
        q.commit().map_err(|e| CliError::new(e.chain_string()))?;
        if reaped.is_empty() {
            q.wait().map_err(|e| CliError::new(e.chain_string()))?;
            q.reap(&mut reaped)
                .map_err(|e| CliError::new(e.chain_string()))?;
        }
        for (slot, r) in reaped.drain(..) {
            done += 1;
            free.push(slot);
            if let Err(e) = r {
                errors += 1;
                first_err.get_or_insert(e);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if a.write {
        img.dev
            .flush()
            .map_err(|e| CliError::new(e.chain_string()))?;
    }
    println!("Run completed in {secs:.3} seconds.");
    let stats = q.stats();
    eprintln!(
        "vdisk: {:.0} IOPS, {}/s; {} requests through the {} engine ({} of them allocating), \
         {} through the format's own path",
        a.count as f64 / secs,
        crate::cmds::human((a.count as f64 * size as f64 / secs) as u64),
        stats.mapped,
        q_aio_name(aio),
        stats.allocating,
        stats.fallback
    );
    if let Some(e) = first_err {
        return Err(CliError::new(format!(
            "{errors} of {} requests failed; the first: {}",
            a.count,
            e.chain_string()
        )));
    }
    Ok(0)
}

fn q_aio_name(aio: Aio) -> &'static str {
    aio.name()
}

/// The offset after `offset` for a run of `size`-byte requests `step` apart on a disk of
/// `disk` bytes, as qemu-img bench computes it (qemu commit ff2ab634, in 10.1): modulo the
/// room for a request, `disk - size`, so that a large step walks the whole disk and a request
/// never runs past the end; 0 when the disk holds one request. Offsets stay multiples of
/// anything `step`, `disk` and `size` are multiples of: 4 KiB requests stay 4 KiB aligned,
/// as the file system under an `O_DIRECT` file wants them (an unaligned write there is
/// serialized with every other in flight).
fn next_offset(offset: u64, step: u64, disk: u64, size: u64) -> u64 {
    let room = disk.saturating_sub(size);
    if room == 0 {
        return 0;
    }
    let r = u128::from(room);
    // Below `room`, so it fits in a u64.
    ((u128::from(offset) % r + u128::from(step) % r) % r) as u64
}

#[cfg(test)]
mod tests {
    use super::next_offset;

    #[test]
    fn offsets_wrap_as_qemu_img_bench() {
        // qemu's own example: 64 KiB disk, 4 KiB requests 36 KiB apart: 0, 36K, 12K, 48K.
        let mut o = 0;
        let mut seen = vec![o];
        for _ in 0..3 {
            o = next_offset(o, 36 << 10, 64 << 10, 4 << 10);
            seen.push(o);
        }
        assert_eq!(seen, [0, 36 << 10, 12 << 10, 48 << 10]);
        // A 4 GiB disk and the bench's odd stride of pages: every offset stays 4 KiB aligned
        // and leaves room for the request.
        let (disk, size, step) = (4u64 << 30, 4096, 4096 * 262_147);
        let mut o = 0;
        for _ in 0..100_000 {
            o = next_offset(o, step, disk, size);
            assert_eq!(o % 4096, 0);
            assert!(o + size <= disk);
        }
        // Degenerate: one request fills the disk; a huge offset and step do not overflow.
        assert_eq!(next_offset(0, 4096, 4096, 4096), 0);
        assert!(next_offset(u64::MAX - 1, u64::MAX, u64::MAX, 512) < u64::MAX - 512);
    }
}
