//! `vdisk serve --nbd ADDR[:PORT] | --nbd-socket PATH [--export NAME] [--read-only]
//! [--tls-creds DIR [--tls-verify-peer]] IMG`: serves an image (any format, with its chain)
//! over NBD until SIGINT or SIGTERM, then flushes the disk and exits. Clients: `qemu-img`/
//! `qemu-io` (`nbd://HOST:PORT/NAME`, `nbd+unix:///NAME?socket=PATH`), `nbdcopy`, `nbdinfo`,
//! the kernel's `nbd-client`.
//!
//! With `--tls-creds DIR` every client must start TLS (`NBD_OPT_STARTTLS`), as with
//! `qemu-nbd --tls-creds`: DIR holds `ca-cert.pem`, `server-cert.pem` and `server-key.pem`
//! in the layout of QEMU's `tls-creds-x509` object; `--tls-verify-peer` also requires a
//! client certificate signed by `ca-cert.pem` (qemu's `verify-peer=on`). Clients:
//! `qemu-io --object tls-creds-x509,id=tls0,endpoint=client,dir=D --image-opts
//! driver=nbd,host=H,port=P,export=NAME,tls-creds=tls0`, `nbdinfo
//! 'nbds://H:P/NAME?tls-certificates=D'`.

use std::path::{Path, PathBuf};

use vdisk::block_io::nbd::tls::TlsCredentials;
use vdisk::block_io::nbd::{Export, NbdServer};

use crate::{CliError, CliResult};

/// The IANA port of NBD, used when `--nbd` names no port.
pub const NBD_PORT: u16 = 10809;

/// Where `serve --nbd` listens.
#[derive(Debug, Clone)]
pub enum NbdListen {
    /// A TCP address: `HOST`, `HOST:PORT`, `[V6]:PORT` (port 10809 when absent).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// `addr` with the default NBD port added when it names none.
fn with_port(addr: &str) -> String {
    let has_port = if let Some(rest) = addr.strip_prefix('[') {
        rest.contains("]:")
    } else {
        // A bare IPv6 address has several colons and no port.
        addr.matches(':').count() == 1
    };
    if has_port {
        addr.to_string()
    } else if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{NBD_PORT}")
    } else {
        format!("{addr}:{NBD_PORT}")
    }
}

/// TLS for `serve --nbd`.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// A `tls-creds-x509` directory: TLS is required when given.
    pub creds: Option<PathBuf>,
    /// Clients must present a certificate signed by the directory's `ca-cert.pem`.
    pub verify_peer: bool,
}

/// Serves `image` as the NBD export `export` on `listen` until SIGINT/SIGTERM.
pub fn run(image: &Path, listen: NbdListen, export: &str, read_only: bool, tls: &Tls) -> CliResult {
    // Credentials first: a bad directory fails before the image is opened and locked.
    let tls_config = match &tls.creds {
        Some(dir) => Some(
            TlsCredentials::from_dir(dir)
                .verify_peer(tls.verify_peer)
                .server_config()
                .map_err(|e| {
                    CliError::new(format!(
                        "--tls-creds {}: {}",
                        dir.display(),
                        e.chain_string()
                    ))
                })?,
        ),
        None if tls.verify_peer => {
            return Err(CliError::new("--tls-verify-peer needs --tls-creds"));
        }
        None => None,
    };
    let scheme = if tls_config.is_some() { "nbds" } else { "nbd" };
    let img = crate::image::open(image, None, read_only)?;
    let dev = img.dev.clone();
    let info = dev.info();
    // A read-only VHD/VHDX advertises its identity, so that it can be a parent of local
    // differencing children (chain::remote).
    let mut description = format!("{} ({})", image.display(), img.format.name());
    if let Some(id) = img
        .chain
        .as_deref()
        .and_then(vdisk::chain::remote::AdvertisedIdentity::of)
    {
        description = format!("{description}\n{}", id.to_line());
    }
    let exports = vec![Export::new(export, dev.clone())
        .read_only(read_only)
        .description(description)];
    let (server, where_) = match &listen {
        NbdListen::Tcp(addr) => {
            let addr = with_port(addr);
            let server = NbdServer::bind_tcp(addr.as_str(), exports).map_err(|e| {
                CliError::new(format!("cannot listen on {addr}: {}", e.chain_string()))
            })?;
            let shown = server
                .local_addr()
                .map(|a| format!("{scheme}://{a}/{export}"))
                .unwrap_or(addr);
            (server, shown)
        }
        NbdListen::Unix(path) => {
            let server = NbdServer::bind_unix(path, exports).map_err(|e| {
                CliError::new(format!(
                    "cannot listen on {}: {}",
                    path.display(),
                    e.chain_string()
                ))
            })?;
            (
                server,
                format!("{scheme}+unix:///{export}?socket={}", path.display()),
            )
        }
    };
    let server = match tls_config {
        Some(config) => server.require_tls(config),
        None => server,
    };
    let stop = server.stop_handle();
    eprintln!(
        "vdisk: serving {} ({}, {} bytes{}{}) at {where_}",
        image.display(),
        img.format.name(),
        info.virtual_size,
        if read_only || info.read_only {
            ", read-only"
        } else {
            ""
        },
        match (&tls.creds, tls.verify_peer) {
            (None, _) => "",
            (Some(_), false) => ", TLS required",
            (Some(_), true) => ", TLS with client certificates required",
        },
    );
    crate::serve::until_signal(
        &*dev,
        move || stop.stop(),
        move || {
            let served = server.serve().map_err(|e| CliError::new(e.chain_string()));
            // Dropping the server removes a Unix socket file.
            (served, server.connections())
        },
    )
}

/// Our NBD server serving on a thread of this process over temporary files (the hosts of
/// `vdisk stress --job mirror|stream`): on drop it is stopped and joined, then `temp` (a
/// file or a folder) is removed.
pub struct ServedTemp {
    stop: vdisk::block_io::nbd::StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    temp: PathBuf,
}

impl ServedTemp {
    /// Starts serving `server` on its own thread.
    pub fn start(server: NbdServer, temp: PathBuf) -> ServedTemp {
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            let _ = server.serve();
        });
        ServedTemp {
            stop,
            thread: Some(thread),
            temp,
        }
    }
}

impl Drop for ServedTemp {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = if self.temp.is_dir() {
            std::fs::remove_dir_all(&self.temp)
        } else {
            std::fs::remove_file(&self.temp)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_is_added_only_when_missing() {
        assert_eq!(with_port("127.0.0.1"), "127.0.0.1:10809");
        assert_eq!(with_port("127.0.0.1:7000"), "127.0.0.1:7000");
        assert_eq!(with_port("localhost"), "localhost:10809");
        assert_eq!(with_port("::1"), "[::1]:10809");
        assert_eq!(with_port("[::1]"), "[::1]:10809");
        assert_eq!(with_port("[::1]:7000"), "[::1]:7000");
    }
}
