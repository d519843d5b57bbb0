//! `vdisk send IMG [--since SNAPSHOT] [-o FILE] [--level auto|N] [--threads N] [--rate B/S]
//! [-p]` writes IMG's allocated data (a chain flattened, or only the changes above SNAPSHOT)
//! as a `meta_ops::send` stream to stdout or FILE; `vdisk receive DEST [-O raw|vhd|vhdx]
//! [-i FILE] [-p]` makes DEST from a stream on stdin or FILE (a new image, or for an
//! incremental stream the existing snapshot, checked first, applied through a journal
//! `DEST.vdisk-receive` that a later receive or `vdisk receive --resume DEST` finishes if
//! the apply was cut short). The stream format and what a corrupt stream leaves behind are
//! in the `meta_ops::send` docs. The summary goes to stderr for send (stdout carries the
//! stream) and to stdout for receive; a journal finished goes to stderr.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vdisk::meta_ops::send::{
    self, Level, ReceiveOptions, ReceiveProgress, SendError, SendOptions, SendProgress,
};

use crate::{CliError, CliResult};

/// `vdisk send` arguments.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Send only what the layers above this parent image of IMG's chain hold (receive it
    /// into a copy of SNAPSHOT).
    #[arg(long, value_name = "SNAPSHOT")]
    pub since: Option<PathBuf>,
    /// Write the stream to FILE instead of stdout.
    #[arg(short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// zstd level: `auto` (chosen from how fast the output drains), or N (-7..19; 0 = none).
    #[arg(long, default_value = "auto")]
    pub level: String,
    /// Compressing threads (default: the CPUs, at most 4).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stream bytes per second at most (K/M/G suffixes; default unlimited).
    #[arg(long)]
    pub rate: Option<String>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    pub progress: bool,
    /// The image (with its parents).
    pub image: PathBuf,
}

/// `vdisk receive` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = RECEIVE_HELP)]
pub struct ReceiveArgs {
    /// Format of a new image: raw, vhd, vhdx (default: by DEST's extension, else raw).
    #[arg(short = 'O')]
    pub out_format: Option<String>,
    /// Read the stream from FILE instead of stdin.
    #[arg(short = 'i', value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Only finish an interrupted incremental receive into DEST from its journal
    /// (DEST.vdisk-receive); no stream is read. Fails if there is none.
    #[arg(long, conflicts_with_all = ["input", "out_format"])]
    pub resume: bool,
    /// The image to make (full stream) or to update (incremental stream).
    pub dest: PathBuf,
}

/// What `vdisk receive --help` says about interrupted receives.
const RECEIVE_HELP: &str = "\
An incremental stream is verified whole first, then kept as a journal beside DEST \
(DEST.vdisk-receive, synced) while its records are written into DEST. If that is cut short \
(a crash, a kill, a failed write), DEST holds a mix of old and new data and must not be used \
(opened, served, sent or copied) until the journal is finished: `vdisk receive --resume DEST` \
does that, and so does the next `vdisk receive` into DEST before it reads its stream (a \
stream that is the journal's own is then reported as already applied); `vdisk check DEST` \
mentions it, nothing else looks for it. A journal that does not verify is refused and DEST left as it is.";

fn send_err(e: SendError) -> CliError {
    CliError::new(crate::cause_chain(&e))
}

fn parse_level(s: &str) -> Result<Level, CliError> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Level::Auto);
    }
    s.parse::<i32>()
        .ok()
        .filter(|l| (-7..=19).contains(l))
        .map(Level::Fixed)
        .ok_or_else(|| CliError::new(format!("--level {s}: give auto or a number from -7 to 19")))
}

/// Runs `f` on another thread while a progress bar (if asked) follows `pos`/`len`.
fn with_bar<T: Send>(
    show: bool,
    pos_len: impl Fn() -> (u64, u64),
    f: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(f);
        let bar = show.then(|| crate::cmds::progress_bar(1));
        while !h.is_finished() {
            if let Some(b) = &bar {
                let (pos, len) = pos_len();
                b.set_length(len.max(1));
                b.set_position(pos.min(len));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        match h.join() {
            Ok(t) => t,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// A `File` on a duplicate of a standard stream's descriptor.
fn dup_file(fd: &impl std::os::fd::AsFd) -> std::io::Result<std::fs::File> {
    Ok(std::fs::File::from(fd.as_fd().try_clone_to_owned()?))
}

/// Runs `vdisk send`.
pub fn run_send(a: SendArgs) -> CliResult {
    let level = parse_level(&a.level)?;
    let rate = crate::size::parse_rate(a.rate.as_deref())?;
    let mut out: Box<dyn Write + Send> = match &a.output {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| CliError::new(format!("cannot create {}: {e}", p.display())))?,
        ),
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                return Err(CliError::new(
                    "refusing to write a send stream to a terminal (redirect it or give -o FILE)",
                ));
            }
            // A file on a duplicate of fd 1: unbuffered (records are large) and Send.
            Box::new(
                dup_file(&stdout).map_err(|e| CliError::new(format!("cannot use stdout: {e}")))?,
            )
        }
    };
    let disk = chain::Disk::open(&a.image, &crate::image::chain_options(None, true)?)?;
    let progress = Arc::new(SendProgress::default());
    let mut opts = SendOptions {
        since: a.since.clone(),
        level,
        rate,
        progress: Some(progress.clone()),
        ..SendOptions::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let r = with_bar(
        a.progress,
        || (progress.done(), progress.total()),
        || send::send(&disk, &opts, &mut out),
    )
    .map_err(send_err)?;
    let levels: Vec<String> = r
        .levels
        .iter()
        .map(|l| {
            let name = if l.level == 0 {
                "none".to_string()
            } else {
                format!("zstd {}", l.level)
            };
            format!(
                "{name}: {} records ({} stored raw)",
                l.records, l.incompressible
            )
        })
        .collect();
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "Sent {} records: {} data bytes, {} zero bytes as {} stream bytes in {:.2} s ({:.1} MB/s of data); levels: {}.",
        r.records,
        r.data_bytes,
        r.zero_bytes,
        r.stream_bytes,
        secs,
        r.data_bytes as f64 / secs / 1e6,
        if levels.is_empty() {
            "none used".to_string()
        } else {
            levels.join(", ")
        }
    );
    Ok(0)
}

/// Says on stderr that an interrupted receive into `dest` was finished, `bytes` applied.
fn say_resumed(dest: &std::path::Path, bytes: u64) {
    eprintln!(
        "vdisk: finished an interrupted receive into {} ({bytes} bytes) from its journal",
        dest.display()
    );
}

/// Runs `vdisk receive --resume`.
fn run_resume(a: &ReceiveArgs) -> CliResult {
    let progress = Arc::new(ReceiveProgress::default());
    let opts = ReceiveOptions {
        lock: crate::image::lock_mode(),
        progress: Some(progress.clone()),
        ..ReceiveOptions::default()
    };
    let r = with_bar(
        a.progress,
        || (progress.applied(), progress.total()),
        || send::resume(&a.dest, &opts),
    )
    .map_err(send_err)?;
    say_resumed(&a.dest, r.data_bytes + r.zero_bytes);
    Ok(0)
}

/// Runs `vdisk receive`.
pub fn run_receive(a: ReceiveArgs) -> CliResult {
    if a.resume {
        return run_resume(&a);
    }
    let format = a
        .out_format
        .as_deref()
        .map(crate::image::parse_format)
        .transpose()?;
    let mut input: Box<dyn Read + Send> = match &a.input {
        Some(p) => Box::new(
            std::fs::File::open(p)
                .map_err(|e| CliError::new(format!("cannot open {}: {e}", p.display())))?,
        ),
        None => Box::new(
            dup_file(&std::io::stdin())
                .map_err(|e| CliError::new(format!("cannot use stdin: {e}")))?,
        ),
    };
    let progress = Arc::new(ReceiveProgress::default());
    let opts = ReceiveOptions {
        format,
        lock: crate::image::lock_mode(),
        progress: Some(progress.clone()),
    };
    let r = with_bar(
        a.progress,
        || (progress.applied(), progress.total()),
        || send::receive(&mut input, &a.dest, &opts),
    );
    // A journal finished before the stream was read, whether the stream then went in.
    if let Some(bytes) = progress.resumed() {
        say_resumed(&a.dest, bytes);
    }
    let r = r.map_err(send_err)?;
    for f in &r.removed_stale {
        eprintln!(
            "vdisk: removed {}, left by a receive into {} that died",
            f.display(),
            a.dest.display()
        );
    }
    if r.already_applied {
        println!(
            "The stream ({} records, {} stream bytes) is the one just finished from the \
             journal: already applied to {}, nothing written.",
            r.records,
            r.stream_bytes,
            a.dest.display()
        );
        return Ok(0);
    }
    println!(
        "Received {} records into {} ({}{}): {} data bytes, {} zero bytes from {} stream bytes in {:.2} s.",
        r.records,
        a.dest.display(),
        r.format,
        if r.incremental { ", incremental" } else { "" },
        r.data_bytes,
        r.zero_bytes,
        r.stream_bytes,
        r.elapsed.as_secs_f64()
    );
    Ok(0)
}
