//! `vdisk provider serve` and `vdisk offload copy`: offload copies between two independent
//! providers (the `offload-token` crate's `transfer` module).
//!
//! ```text
//! vdisk provider serve --listen ADDR --root DIR [--control-key FILE]
//! vdisk offload copy --from ADDR:PATH[@OFF+LEN] --to ADDR:PATH[@OFF] [--relay]
//!                    [--control-key FILE] [--from-key FILE] [--to-key FILE]
//! ```
//!
//! `provider serve` serves the images under DIR (VHD, VHDX, raw; parents must live under DIR
//! too) to initiators holding its control key, printing `listening on ADDR` once ready, until
//! killed. PATHs are relative to DIR; absolute paths, `..` and symlinks leading outside DIR
//! are refused. The control key file (64 hex digits; `--control-key`, else
//! `$VDISK_CONTROL_KEY`, else `~/.config/vdisk/control.key`) is created, mode 0600, when
//! missing; an initiator needs the same file (`--from-key`/`--to-key` when S and D have
//! different keys).
//!
//! `offload copy` is the initiator: it creates the transfer's CA, gives S and D their
//! certificates, mints tokens at S, redeems them at D (which pulls the data from S over
//! mutual TLS 1.3), loops over short results, and prints one JSON line
//! `{"bytes_copied":..,"bytes_through_initiator":..,"tokens":..,"seconds":..}`. Without LEN
//! it copies to the end of the source. The destination image must exist and be large
//! enough. `--relay` moves the bytes through the initiator instead (a benchmark baseline).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vdisk::block_io::BlockDevice;
use vdisk::chain::{Disk, Format, OpenOptions};
use vdisk::offload_token::transfer::{
    copy_blocking, ControlKey, CopyRequest, DaemonConfig, Endpoint, ImageOpener, ProviderDaemon,
    TransferError,
};

use crate::size::parse_size;
use crate::{CliError, CliResult};

/// `vdisk provider`: an offload provider daemon.
#[derive(Debug, clap::Args)]
pub struct ProviderArgs {
    #[command(subcommand)]
    cmd: ProviderCmd,
}

#[derive(Debug, clap::Subcommand)]
enum ProviderCmd {
    /// Serve the images under a folder to offload initiators, until killed.
    Serve {
        /// Control address, HOST:PORT (port 0 picks one; the line `listening on ADDR` says
        /// which).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// The folder whose images are served.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// Control key file (default: $VDISK_CONTROL_KEY, else ~/.config/vdisk/control.key;
        /// created, mode 0600, if missing).
        #[arg(long, value_name = "FILE")]
        control_key: Option<PathBuf>,
        /// Limit each token's export to this many bytes/s (K/M/G suffixes; tests use it).
        #[arg(long, value_name = "B/S", hide = true)]
        export_rate: Option<String>,
        /// Requests D keeps in flight to S while redeeming (tuning).
        #[arg(long, value_name = "N", hide = true)]
        pull_workers: Option<usize>,
        /// NBD connections D opens to S (tuning).
        #[arg(long, value_name = "N", hide = true)]
        pull_connections: Option<u32>,
        /// Bytes per pull request (tuning).
        #[arg(long, value_name = "SIZE", hide = true)]
        pull_chunk: Option<String>,
        /// Most bytes one redeem writes (tuning).
        #[arg(long, value_name = "SIZE", hide = true)]
        max_redeem: Option<String>,
    },
}

/// `vdisk offload`: the initiator of provider-to-provider copies.
#[derive(Debug, clap::Args)]
pub struct OffloadArgs {
    #[command(subcommand)]
    cmd: OffloadCmd,
}

#[derive(Debug, clap::Subcommand)]
enum OffloadCmd {
    /// Copy a range from an image at provider S into an image at provider D.
    Copy {
        /// Source: HOST:PORT:PATH[@OFF+LEN] (OFF, LEN with K/M/G/T suffixes).
        #[arg(long, value_name = "ADDR:PATH[@OFF+LEN]")]
        from: String,
        /// Destination: HOST:PORT:PATH[@OFF].
        #[arg(long, value_name = "ADDR:PATH[@OFF]")]
        to: String,
        /// Control key file for both providers (default as for `provider serve`).
        #[arg(long, value_name = "FILE")]
        control_key: Option<PathBuf>,
        /// S's control key file, if not the same.
        #[arg(long, value_name = "FILE")]
        from_key: Option<PathBuf>,
        /// D's control key file, if not the same.
        #[arg(long, value_name = "FILE")]
        to_key: Option<PathBuf>,
        /// Move the bytes through this process instead (the benchmark's baseline).
        #[arg(long)]
        relay: bool,
    },
}

fn err(e: &(dyn std::error::Error + 'static)) -> CliError {
    CliError::new(crate::cause_chain(e))
}

/// The default control key file.
fn default_key_path() -> Result<PathBuf, CliError> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("VDISK_CONTROL_KEY") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = var("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(p).join("vdisk/control.key"));
    }
    var("HOME")
        .map(|h| PathBuf::from(h).join(".config/vdisk/control.key"))
        .ok_or_else(|| CliError::new("no control key file: give --control-key"))
}

fn load_key(path: &Path) -> Result<ControlKey, CliError> {
    ControlKey::load(path).map_err(|e| {
        CliError::new(format!(
            "cannot read the control key {}: {}",
            path.display(),
            crate::cause_chain(&e)
        ))
    })
}

/// Opens images as chains whose parents must live under the root.
#[derive(Debug)]
pub struct ChainOpener {
    root: PathBuf,
}

impl ChainOpener {
    /// Opens images under `root` (canonical).
    pub fn new(root: PathBuf) -> Self {
        ChainOpener { root }
    }
}

impl ImageOpener for ChainOpener {
    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn BlockDevice>, TransferError> {
        let mut o = OpenOptions::new()
            .read_only(!writable)
            .lock(crate::image::lock_mode());
        o.policy.roots = vec![self.root.clone()];
        let disk =
            Disk::open(path, &o).map_err(|e| TransferError::Invalid(crate::cause_chain(&e)))?;
        Ok(Arc::new(disk))
    }
}

/// Sockets whose peer left give EPIPE instead of killing the process (`main` restores
/// SIGPIPE's default for the other verbs): a provider outlives its initiators and its peers.
fn ignore_sigpipe() {
    // SAFETY: sets a signal's disposition to ignore; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Runs `vdisk provider`.
pub fn run_provider(args: ProviderArgs) -> CliResult {
    ignore_sigpipe();
    match args.cmd {
        ProviderCmd::Serve {
            listen,
            root,
            control_key,
            export_rate,
            pull_workers,
            pull_connections,
            pull_chunk,
            max_redeem,
        } => {
            let path = match control_key {
                Some(p) => p,
                None => default_key_path()?,
            };
            let key = if path.exists() {
                load_key(&path)?
            } else {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        CliError::new(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                let k = ControlKey::generate();
                match k.save_new(&path) {
                    Ok(()) => {
                        eprintln!("created the control key {}", path.display());
                        k
                    }
                    // Another provider created it meanwhile: use theirs.
                    Err(TransferError::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        load_key(&path)?
                    }
                    Err(e) => return Err(err(&e)),
                }
            };
            let canonical = root
                .canonicalize()
                .map_err(|e| CliError::new(format!("cannot use {}: {e}", root.display())))?;
            let mut config = DaemonConfig::new(&canonical, key);
            config.export_rate = export_rate.as_deref().map(parse_size).transpose()?;
            if let Some(n) = pull_workers {
                config.pull_workers = n;
            }
            if let Some(n) = pull_connections {
                config.pull_connections = n;
            }
            if let Some(s) = pull_chunk {
                config.pull_chunk = parse_size(&s)?;
            }
            if let Some(s) = max_redeem {
                config.max_redeem_len = parse_size(&s)?;
            }
            let daemon = ProviderDaemon::bind(
                listen.as_str(),
                config,
                Arc::new(ChainOpener::new(canonical)),
            )
            .map_err(|e| err(&e))?;
            let addr = daemon.local_addr().map_err(|e| err(&e))?;
            // SIGINT/SIGTERM stop it cleanly: connections end, their transfers close (D
            // flushes its images).
            let stop = daemon.stop_handle();
            let mut signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
            ])
            .map_err(|e| CliError::new(format!("cannot install signal handlers: {e}")))?;
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    stop.stop();
                }
            });
            println!("listening on {addr}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            daemon.serve_blocking().map_err(|e| err(&e))?;
            Ok(0)
        }
    }
}

/// `HOST:PORT:PATH[@SUFFIX]` split into (`HOST:PORT`, PATH, SUFFIX).
fn split_target(s: &str) -> Result<(String, String, Option<String>), CliError> {
    let bad = || CliError::new(format!("'{s}' is not HOST:PORT:PATH"));
    let (host, rest) = if let Some(r) = s.strip_prefix('[') {
        let (h, rest) = r.split_once(']').ok_or_else(bad)?;
        (format!("[{h}]"), rest.strip_prefix(':').ok_or_else(bad)?)
    } else {
        let (h, rest) = s.split_once(':').ok_or_else(bad)?;
        (h.to_string(), rest)
    };
    let (port, path) = rest.split_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() || path.is_empty() {
        return Err(bad());
    }
    let (path, suffix) = match path.rsplit_once('@') {
        Some((p, s)) if !p.is_empty() => (p.to_string(), Some(s.to_string())),
        _ => (path.to_string(), None),
    };
    Ok((format!("{host}:{port}"), path, suffix))
}

/// Runs `vdisk offload`.
pub fn run_offload(args: OffloadArgs) -> CliResult {
    ignore_sigpipe();
    match args.cmd {
        OffloadCmd::Copy {
            from,
            to,
            control_key,
            from_key,
            to_key,
            relay,
        } => {
            let (saddr, spath, ssuffix) = split_target(&from)?;
            let (daddr, dpath, dsuffix) = split_target(&to)?;
            let (soff, len) = match ssuffix {
                None => (0, None),
                Some(s) => match s.split_once('+') {
                    Some((o, l)) => (parse_size(o)?, Some(parse_size(l)?)),
                    None => (parse_size(&s)?, None),
                },
            };
            let doff = dsuffix.as_deref().map(parse_size).transpose()?.unwrap_or(0);
            let common = match control_key {
                Some(p) => p,
                None => default_key_path()?,
            };
            let skey = load_key(from_key.as_deref().unwrap_or(&common))?;
            let dkey = load_key(to_key.as_deref().unwrap_or(&common))?;
            let from = Endpoint {
                addr: saddr,
                key: skey,
                path: spath,
                offset: soff,
            };
            let to = Endpoint {
                addr: daddr,
                key: dkey,
                path: dpath,
                offset: doff,
            };
            let mut req = CopyRequest::new(from, to, len);
            req.relay = relay;
            let r = copy_blocking(&req).map_err(|e| err(&e))?;
            println!(
                "{}",
                serde_json::json!({
                    "bytes_copied": r.bytes_copied,
                    "bytes_through_initiator": r.bytes_through_initiator,
                    "tokens": r.tokens,
                    "seconds": r.seconds,
                })
            );
            Ok(0)
        }
    }
}

/// The demo's step: two providers in this process on loopback, with different roots; a
/// VHDX's data copied into a VHD; the bytes compared.
pub fn demo_step(dir: &Path) -> Result<String, CliError> {
    ignore_sigpipe();
    let (sroot, droot) = (dir.join("provider-s"), dir.join("provider-d"));
    for r in [&sroot, &droot] {
        std::fs::create_dir_all(r)
            .map_err(|e| CliError::new(format!("cannot create {}: {e}", r.display())))?;
    }
    let size: u64 = 64 << 20;
    {
        let src = crate::image::create(Format::Vhdx, &sroot.join("data.vhdx"), size, &[], None)?;
        for i in 0..24u64 {
            // 24 scattered 1 MiB pieces with holes between them.
            let buf: Vec<u8> = (0..1u32 << 20)
                .map(|j| (j as u8).wrapping_mul(7) ^ (i as u8))
                .collect();
            src.dev.write_at(&buf, i * (5 << 20) / 2)?;
        }
        src.dev.flush()?;
    }
    let len = {
        let dst = crate::image::create(Format::Vhd, &droot.join("copy.vhd"), size, &[], None)?;
        dst.dev.info().virtual_size.min(size)
    };
    let key = ControlKey::generate();
    let mut stops = Vec::new();
    let mut threads = Vec::new();
    let mut addrs = Vec::new();
    for root in [&sroot, &droot] {
        let root = root
            .canonicalize()
            .map_err(|e| CliError::new(format!("cannot use {}: {e}", root.display())))?;
        let config = DaemonConfig::new(&root, key.clone());
        let d = ProviderDaemon::bind("127.0.0.1:0", config, Arc::new(ChainOpener::new(root)))
            .map_err(|e| err(&e))?;
        addrs.push(d.local_addr().map_err(|e| err(&e))?.to_string());
        stops.push(d.stop_handle());
        threads.push(std::thread::spawn(move || d.serve_blocking()));
    }
    let ep = |addr: &String, path: &str| Endpoint {
        addr: addr.clone(),
        key: key.clone(),
        path: path.into(),
        offset: 0,
    };
    let started = Instant::now();
    let r = copy_blocking(&CopyRequest::new(
        ep(&addrs[0], "data.vhdx"),
        ep(&addrs[1], "copy.vhd"),
        Some(len),
    ));
    let elapsed = started.elapsed();
    for s in &stops {
        s.stop();
    }
    for t in threads {
        let _ = t.join();
    }
    let r = r.map_err(|e| err(&e))?;
    let a = crate::image::open(&sroot.join("data.vhdx"), None, true)?;
    let b = crate::image::open(&droot.join("copy.vhd"), None, true)?;
    let same = crate::cmds::first_difference(a.dev.as_ref(), b.dev.as_ref(), false)?.is_none();
    if !same || r.bytes_copied != len {
        return Err(CliError::new(
            "demo verification failed: the copy at D differs from the VHDX at S",
        ));
    }
    if r.bytes_through_initiator >= 64 * 1024 {
        return Err(CliError::new(
            "demo verification failed: data crossed the initiator",
        ));
    }
    Ok(format!(
        "{} MiB VHDX at S -> VHD at D in {} ms over mutual TLS 1.3, tokens: {}, bytes through the initiator: {}",
        r.bytes_copied >> 20,
        elapsed.as_millis(),
        r.tokens,
        r.bytes_through_initiator
    ))
}
