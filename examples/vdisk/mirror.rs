//! `vdisk mirror IMG --to nbd://HOST:PORT/NAME [--timing before|after|split] [--rate BYTES/S]
//! [-p]` (or `--to nbds://...` with `--nbd-tls-creds DIR`: over TLS): moves a disk (any chain) to an NBD export on another host with the mirror job of
//! `meta_ops` (issue 15 part 2). Here no guest runs, so the job has the disk to itself; the
//! export ends byte-exact with IMG, flushed. The export must have IMG's virtual size; holes
//! are skipped when it reads as zeros everywhere, else written as zeros. Prints the bytes
//! moved and the rate (one JSON line with `--output json`).
//!
//! Also the host B of `vdisk stress --job mirror` ([`stress_destination`]): our NBD server
//! in-process on a temporary raw file next to IMG, the guests ending on an NBD client of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vdisk::block_io::nbd::{Export, NbdClient, NbdClientOptions, NbdServer};
use vdisk::block_io::{BlockDevice, FileStorage, RawDisk, Storage};
use vdisk::meta_ops::{Job, JobRunner, LiveDisk, MirrorTiming};

use crate::cmds::{wait_job, BarEnd};
use crate::nbd_serve::ServedTemp;
use crate::{job_err, CliError, CliResult};

/// `vdisk mirror` arguments.
#[derive(Debug, clap::Args)]
pub struct MirrorArgs {
    /// The NBD export to move the disk to (nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?socket=PATH,
    /// or nbds://HOST[:PORT]/NAME with --nbd-tls-creds DIR: TLS, the bulk data encrypted).
    #[arg(long)]
    pub to: String,
    /// When a guest would move: before (disk first), after (guest first, reads of blocks not
    /// copied yet served from IMG), split (one pass first).
    #[arg(long, default_value = "before", value_parser = parse_timing)]
    pub timing: MirrorTiming,
    /// Rate limit in bytes per second (K/M/G suffixes; default: unlimited).
    #[arg(long)]
    pub rate: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Output format: human or json.
    #[arg(long, default_value = "human")]
    pub output: String,
    /// Format of IMG (detected if absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// The image (with its parents).
    pub image: PathBuf,
}

/// Parses `before`, `after` or `split`.
pub fn parse_timing(s: &str) -> Result<MirrorTiming, String> {
    s.parse()
}

/// Connects to the export at `url` as a mirror's destination for a disk of `size` bytes
/// (named `what` in errors): `nbd://`, `nbd+unix://`, or `nbds://` with the client
/// credentials of `--nbd-tls-creds` (qemu's layout: the CA that signed the server's
/// certificate, and a client certificate when the server verifies peers); the same size.
pub fn open_destination(
    url: &str,
    size: u64,
    what: &str,
) -> Result<Arc<dyn BlockDevice>, CliError> {
    // Several connections when the export allows it (multi-conn), as nbdcopy uses.
    let opts = NbdClientOptions {
        connections: 4,
        ..crate::remote::nbd_options(url, false)?
    };
    let dest = NbdClient::open(url, opts).map_err(|e| {
        CliError::new(format!(
            "cannot connect to {url}: {}",
            crate::cause_chain(&e)
        ))
    })?;
    let dest: Arc<dyn BlockDevice> = Arc::new(dest);
    if dest.info().virtual_size != size {
        return Err(CliError::new(format!(
            "{url} has {} bytes, {what} has {size}: the export must have the disk's size",
            dest.info().virtual_size,
        )));
    }
    Ok(dest)
}

/// Runs the verb; exit 0 when the export holds the disk.
pub fn run(a: MirrorArgs) -> CliResult {
    let rate = crate::size::parse_rate(a.rate.as_deref())?;
    let img = crate::image::open(&a.image, a.format.as_deref(), true)?;
    let size = img.dev.info().virtual_size;
    let dest = open_destination(&a.to, size, &a.image.display().to_string())?;
    let live = LiveDisk::new(img.dev.clone());
    let runner = JobRunner::new().map_err(job_err)?;
    let t0 = Instant::now();
    let h = runner
        .start(&live, Job::mirror(dest.clone()).timing(a.timing).rate(rate))
        .map_err(job_err)?;
    let r = wait_job(h, a.progress, BarEnd::Clear).map_err(job_err)?;
    live.flush().map_err(CliError::from)?;
    let secs = t0.elapsed().as_secs_f64();
    let moved = r.buffered_bytes + r.copy_file_range_bytes;
    let mib_s = moved as f64 / secs.max(1e-9) / (1 << 20) as f64;
    if a.output == "json" {
        let line = serde_json::json!({
            "to": a.to,
            "timing": a.timing.name(),
            "bytes": r.bytes,
            "data_bytes": moved,
            "zeroed_bytes": r.zeroed_bytes,
            "skipped_bytes": r.skipped_bytes,
            "seconds": (secs * 1e3).round() / 1e3,
            "mib_per_s": (mib_s * 10.0).round() / 10.0,
        });
        println!("{line}");
    } else {
        println!(
            "Mirrored {} to {} (timing {}): {moved} data bytes, {} zeroed, {} skipped in {secs:.2} s ({mib_s:.1} MiB/s).",
            a.image.display(),
            a.to,
            a.timing.name(),
            r.zeroed_bytes,
            r.skipped_bytes
        );
    }
    Ok(0)
}

/// Starts host B for `vdisk stress --job mirror` on IMG (`size` bytes): a raw file next to
/// IMG filled with junk (so that the job must write the holes too), served by our NBD server
/// on a loopback port, and an NBD client of it (the mirror's destination).
pub fn stress_destination(
    image: &Path,
    size: u64,
) -> Result<(Arc<dyn BlockDevice>, ServedTemp), CliError> {
    let mut name = image
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".mirror-{}.raw", std::process::id()));
    let path = image.with_file_name(name);
    let storage = FileStorage::create(&path)?;
    storage.set_len(size)?;
    let disk = Arc::new(RawDisk::new(storage)?);
    let junk = vec![0xA5u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(junk.len() as u64);
        disk.write_at(&junk[..n as usize], pos)?;
        pos += n;
    }
    let server = NbdServer::bind_tcp("127.0.0.1:0", vec![Export::new("b", disk)])?;
    let addr = server
        .local_addr()
        .ok_or_else(|| CliError::new("the NBD server has no address"))?;
    let host = ServedTemp::start(server, path);
    let client = NbdClient::open(&format!("nbd://{addr}/b"), NbdClientOptions::default())
        .map_err(|e| CliError::new(crate::cause_chain(&e)))?;
    Ok((Arc::new(client), host))
}
