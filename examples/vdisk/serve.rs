//! `vdisk serve`: serves an image to a VM over vhost-user-blk until SIGINT or SIGTERM, then
//! flushes the disk and exits. Frontends (QEMU's `vhost-user-blk-pci`) may come and go: the
//! socket keeps listening, so a VM restart needs no restart of this daemon.

use std::path::Path;
use std::thread;

use signal_hook::consts::signal::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vdisk::block_io::vhost_user::{ServerOptions, VhostUserBlkServer};

use crate::{CliError, CliResult};

/// Serves `image` on the unix socket `socket` with `queues` request queues.
pub fn run(image: &Path, socket: &Path, queues: u16, read_only: bool) -> CliResult {
    let img = crate::image::open(image, None, read_only)?;
    let dev = img.dev.clone();
    let info = dev.info();
    let serial = info
        .disk_id
        .map(|u| u.simple().to_string().chars().take(20).collect())
        .unwrap_or_else(|| "vdisk".to_string());
    let opts = ServerOptions {
        num_queues: queues,
        serial,
        ..ServerOptions::default()
    };
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| CliError::new(format!("cannot install signal handlers: {e}")))?;
    let mut server = VhostUserBlkServer::bind(socket, dev.clone(), &opts)?;
    let stop = server.stop_handle();
    let signal_handle = signals.handle();
    let waiter = thread::spawn(move || {
        let sig = signals.forever().next();
        if sig.is_some() {
            stop.stop();
        }
        sig
    });
    eprintln!(
        "vdisk: serving {} ({}, {} bytes{}) on {} with {} queue(s)",
        image.display(),
        img.format.name(),
        info.virtual_size,
        if info.read_only { ", read-only" } else { "" },
        socket.display(),
        queues
    );
    let served = server.serve();
    signal_handle.close();
    let sig = waiter.join().ok().flatten();
    let connections = server.connections();
    // Dropping the server removes the socket.
    drop(server);
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
