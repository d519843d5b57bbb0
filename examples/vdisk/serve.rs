//! `vdisk serve`: serves an image to a VM over vhost-user-blk until SIGINT or SIGTERM, then
//! flushes the disk and exits. Frontends (QEMU's `vhost-user-blk-pci`) may come and go: the
//! socket keeps listening, so a VM restart needs no restart of this daemon.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use signal_hook::consts::signal::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vdisk::block_io::vhost_user::{ServerOptions, VhostUserBlkServer};
use vdisk::block_io::BlockDevice;
use vdisk::meta_ops::LiveDisk;

use crate::control::Control;

use crate::{CliError, CliResult};

/// How `serve` opens and runs the disk.
#[derive(Debug)]
pub struct Mode {
    /// Worker threads for the queues (`None`: the server's default).
    pub workers: Option<u16>,
    pub read_only: bool,
    /// `none` or `writeback`.
    pub cache: String,
    /// `io_uring`, `threads` or `sync`.
    pub aio: String,
    /// A control socket for online operations (`crate::control`).
    pub control: Option<std::path::PathBuf>,
}

/// Serves `image` on the unix socket `socket` with `queues` request queues.
pub fn run(image: &Path, socket: &Path, queues: u16, mode: &Mode) -> CliResult {
    let direct = crate::bench::parse_cache(&mode.cache)?;
    let aio = match mode.aio.as_str() {
        "sync" => None,
        name => Some(crate::bench::parse_aio(name)?),
    };
    let read_only = mode.read_only;
    // With a control socket the guest's disk is a LiveDisk, which online jobs attach to.
    let (dev, format, controlled): (Arc<dyn BlockDevice>, _, _) = match &mode.control {
        Some(path) => {
            let opened = crate::control::open(image, read_only, direct)?;
            let format = opened.disk.layers()[0].format;
            let live = LiveDisk::new(opened.disk.clone());
            (live.clone(), format, Some((live, opened, path.as_path())))
        }
        None => {
            let img = crate::image::open_with(
                image,
                None,
                &crate::image::Access {
                    read_only,
                    direct,
                    // The guest reads ahead itself, and readahead's large folios would make
                    // each 4 KiB guest write dirty (and wait for) a whole folio.
                    random_access: !direct,
                    force_share: false,
                },
            )?;
            (img.dev, img.format, None)
        }
    };
    let info = dev.info();
    let serial = info
        .disk_id
        .map(|u| u.simple().to_string().chars().take(20).collect())
        .unwrap_or_else(|| "vdisk".to_string());
    let opts = ServerOptions {
        num_queues: queues,
        workers: mode.workers,
        serial,
        aio,
        ..ServerOptions::default()
    };
    let mut server = VhostUserBlkServer::bind(socket, dev.clone(), &opts)?;
    let control = match controlled {
        Some((live, opened, path)) => {
            let c = Control::new(live, opened, server.config_handle(), image)?;
            let listener = c.listen(path)?;
            eprintln!("vdisk: control socket on {}", path.display());
            Some((c, listener, path))
        }
        None => None,
    };
    let stop = server.stop_handle();
    eprintln!(
        "vdisk: serving {} ({}, {} bytes{}) on {} with {} queue(s) on {} worker(s), cache={}, aio={}",
        image.display(),
        format.name(),
        info.virtual_size,
        if info.read_only { ", read-only" } else { "" },
        socket.display(),
        queues,
        mode.workers
            .unwrap_or_else(|| vdisk::block_io::vhost_user::default_workers(queues))
            .clamp(1, queues),
        if direct { "none" } else { "writeback" },
        mode.aio
    );
    let served = until_signal(
        &*dev,
        move || stop.stop(),
        move || {
            let served = server.serve().map_err(CliError::from);
            // Dropping the server removes the socket.
            (served, server.connections())
        },
    );
    drop(dev);
    match control {
        Some((c, listener, path)) => {
            let finished = c.finish(path, listener);
            served.and(finished)
        }
        None => served,
    }
}

/// Runs `serve` (which returns its result and how many connections it had, its server
/// dropped) until it ends or SIGINT/SIGTERM calls `stop`; then flushes `dev` and says why it
/// ended. Serving daemons ignore SIGPIPE: a client that goes away while we write to its
/// socket gives EPIPE instead of killing us before the flush (`main` restores SIGPIPE's
/// default for the other verbs).
pub fn until_signal(
    dev: &dyn BlockDevice,
    stop: impl FnOnce() + Send + 'static,
    serve: impl FnOnce() -> (Result<(), CliError>, u64),
) -> CliResult {
    // SAFETY: sets a signal's disposition to ignore; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| CliError::new(format!("cannot install signal handlers: {e}")))?;
    let signal_handle = signals.handle();
    // The waiter hands `signals` back instead of dropping it: `close` below wakes it through
    // signal-hook's socket pair, which must still have its reader then.
    let waiter = thread::spawn(move || {
        let sig = signals.forever().next();
        if sig.is_some() {
            stop();
        }
        (sig, signals)
    });
    let (served, connections) = serve();
    signal_handle.close();
    let sig = waiter.join().ok().and_then(|(sig, _signals)| sig);
    let flushed = dev.flush();
    served?;
    flushed?;
    eprintln!(
        "vdisk: {} after {connections} connection(s); disk flushed",
        match sig {
            Some(SIGINT) => "interrupted",
            Some(SIGTERM) => "terminated",
            _ => "stopped",
        }
    );
    Ok(0)
}
