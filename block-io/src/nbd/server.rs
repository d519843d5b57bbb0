//! [`NbdServer`]: listens on TCP or a Unix socket and serves [`Export`]s until its
//! [`StopHandle`] fires. It owns a tokio runtime for [`NbdServer::serve`], so callers need
//! none; [`NbdServer::serve_async`] runs inside the caller's runtime instead.

use std::net::{SocketAddr, TcpListener as StdTcpListener, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsAcceptor;

use super::conn::{stopped, transmit, NbdStream};
use super::export::{Export, Served};
use super::handshake::{greet, haggle, Negotiated, Session, TlsPhase};
use super::pool::BufferPool;
use super::record::{ready_for_hand_off, RecordStream};
use crate::error::{Error, ErrorKind, Result};

/// Where an [`NbdServer`] listens.
#[derive(Debug)]
enum Listener {
    Tcp(StdTcpListener),
    Unix(StdUnixListener, PathBuf),
}

/// Stops a running [`NbdServer::serve`] from any thread: no new connections are accepted,
/// connections stop reading requests, finish the ones they read, and close.
#[derive(Debug, Clone)]
pub struct StopHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl StopHandle {
    /// Asks the server to stop (idempotent).
    pub fn stop(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        *self.tx.borrow()
    }
}

/// An NBD server (fixed newstyle, structured replies, `base:allocation`) for one or more
/// exports of any [`BlockDevice`](crate::BlockDevice).
///
/// Each export's device is served through the I/O engine's async API
/// ([`AsyncDisk`](crate::engine::AsyncDisk)) shared by all its connections; each connection
/// keeps many requests in flight and answers them as they complete.
///
/// ```no_run
/// # fn main() -> block_io::Result<()> {
/// use std::sync::Arc;
/// use block_io::nbd::{Export, NbdServer};
/// use block_io::{MemStorage, RawDisk, Storage};
///
/// let storage = MemStorage::new();
/// storage.set_len(64 << 20)?;
/// let disk = Arc::new(RawDisk::new(storage)?);
/// let server = NbdServer::bind_tcp("127.0.0.1:10809", vec![Export::new("disk", disk)])?;
/// let stop = server.stop_handle();
/// std::thread::spawn(move || { /* later */ stop.stop(); });
/// server.serve()?; // until stopped; `qemu-io -f raw nbd://127.0.0.1:10809/disk`
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NbdServer {
    listener: Listener,
    exports: Vec<Export>,
    stop: StopHandle,
    connections: Arc<AtomicU64>,
    tls: Option<Arc<ServerConfig>>,
    handshake_limit: Duration,
    pool: Arc<BufferPool>,
}

/// Bytes of TLS records a connection buffers before writing them to the socket.
const TLS_SEND_BUFFER: usize = 1 << 20;

/// How long a client may take over its handshake by default (TLS included), as qemu-nbd's
/// `--handshake-limit`.
pub const DEFAULT_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

impl NbdServer {
    /// Listens on a TCP address (port 0 picks a free port: see
    /// [`local_addr`](Self::local_addr)).
    pub fn bind_tcp(addr: impl ToSocketAddrs, exports: Vec<Export>) -> Result<Self> {
        check_exports(&exports)?;
        let l = StdTcpListener::bind(addr).map_err(|e| Error::io("cannot listen on TCP", e))?;
        Self::with(Listener::Tcp(l), exports)
    }

    /// Listens on a Unix socket at `path`. A socket file left behind by a server that is
    /// gone is replaced; a live one or any other file is an error. The file is removed when
    /// the server is dropped.
    pub fn bind_unix(path: impl AsRef<Path>, exports: Vec<Export>) -> Result<Self> {
        check_exports(&exports)?;
        let path = path.as_ref();
        if let Ok(m) = std::fs::symlink_metadata(path) {
            let stale = m.file_type().is_socket() && StdUnixStream::connect(path).is_err();
            if !stale {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{} exists and is not a stale socket", path.display()),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
        }
        let l = StdUnixListener::bind(path)
            .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
        Self::with(Listener::Unix(l, path.to_path_buf()), exports)
    }

    fn with(listener: Listener, exports: Vec<Export>) -> Result<Self> {
        let nonblocking = match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        };
        nonblocking.map_err(|e| Error::io("cannot make the listener non-blocking", e))?;
        let (tx, _) = watch::channel(false);
        Ok(NbdServer {
            listener,
            exports,
            stop: StopHandle { tx: Arc::new(tx) },
            connections: Arc::new(AtomicU64::new(0)),
            tls: None,
            handshake_limit: DEFAULT_HANDSHAKE_LIMIT,
            pool: Arc::new(BufferPool::default()),
        })
    }

    /// How long a client may take from connecting to choosing an export, TLS handshake
    /// included ([`DEFAULT_HANDSHAKE_LIMIT`] unless set); a client still negotiating then is
    /// disconnected, so that idle or stalled clients do not pile up.
    pub fn handshake_limit(mut self, limit: Duration) -> Self {
        self.handshake_limit = limit;
        self
    }

    /// Takes payload buffers from `pool` (shared with other servers) instead of a pool of
    /// this server's own. All connections of a server share its pool; servers that come and
    /// go for the same work (the offload providers' one per token) keep their buffers warm
    /// by sharing one.
    pub fn buffer_pool(mut self, pool: Arc<BufferPool>) -> Self {
        self.pool = pool;
        self
    }

    /// Requires TLS on every connection, as `qemu-nbd --tls-creds` does (proto.md "TLS
    /// support", FORCEDTLS mode): before `NBD_OPT_STARTTLS` a client gets
    /// `NBD_REP_ERR_TLS_REQD` for every option but `NBD_OPT_ABORT`, and
    /// `NBD_OPT_EXPORT_NAME` closes the connection; after it, the TLS handshake runs with
    /// `config` and the option haggling starts again over TLS. Client certificates are
    /// checked if `config` asks for them (see [`tls::TlsCredentials`](super::tls::TlsCredentials)
    /// and [`tls::server_config`](super::tls::server_config)). With
    /// `enable_secret_extraction` set in `config`, a TLS 1.3 connection goes on with the
    /// server's in-place record layer once the haggling is over (see the [`nbd`](crate::nbd)
    /// module docs).
    pub fn require_tls(mut self, config: Arc<ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Whether the server requires TLS.
    pub fn tls_required(&self) -> bool {
        self.tls.is_some()
    }

    /// The TCP address listened on (`None` for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// A handle that stops [`serve`](Self::serve).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Serves until the [`StopHandle`] fires, on a runtime of its own; then waits for the
    /// connections to finish the requests they read, and closes the exports' engines. Does
    /// not flush the devices (acknowledged FUA writes and flushes are durable already).
    pub fn serve(&self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("nbd-server")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the NBD server's runtime", e))?;
        rt.block_on(self.serve_async())
    }

    /// [`serve`](Self::serve) inside the caller's tokio runtime (multi-threaded, with I/O
    /// and time enabled).
    pub async fn serve_async(&self) -> Result<()> {
        let mut served = Vec::with_capacity(self.exports.len());
        for e in &self.exports {
            served
                .push(Served::new(e).map_err(|err| {
                    err.context_with(format!("cannot serve export '{}'", e.name))
                })?);
        }
        let exports: Arc<[Arc<Served>]> = served.into();
        let accepted = match &self.listener {
            Listener::Tcp(l) => {
                let l = l
                    .try_clone()
                    .and_then(TcpListener::from_std)
                    .map_err(|e| Error::io("cannot use the TCP listener", e))?;
                self.accept_loop(Accept::Tcp(l), &exports).await
            }
            Listener::Unix(l, _) => {
                let l = l
                    .try_clone()
                    .and_then(UnixListener::from_std)
                    .map_err(|e| Error::io("cannot use the Unix listener", e))?;
                self.accept_loop(Accept::Unix(l), &exports).await
            }
        };
        let mut closed = Ok(());
        for e in exports.iter() {
            if let Err(err) = e.disk.close().await {
                if closed.is_ok() {
                    closed = Err(err.context_with(format!("export '{}' failed", e.name)));
                }
            }
        }
        accepted.and(closed)
    }

    async fn accept_loop(&self, listener: Accept, exports: &Arc<[Arc<Served>]>) -> Result<()> {
        let mut stop = self.stop.tx.subscribe();
        let conn_stop = stop.clone();
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = listener.accept() => match r {
                    Ok(stream) => {
                        self.connections.fetch_add(1, Ordering::Relaxed);
                        let exports = exports.clone();
                        let stop = conn_stop.clone();
                        let tls = self.tls.clone();
                        let limit = self.handshake_limit;
                        let pool = self.pool.clone();
                        match stream {
                            Stream::Tcp(s) => {
                                // Replies are small and latency-bound: no Nagle delay.
                                let _ = s.set_nodelay(true);
                                conns.spawn(connection(s, exports, tls, limit, pool, stop));
                            }
                            Stream::Unix(s) => {
                                conns.spawn(connection(s, exports, tls, limit, pool, stop));
                            }
                        }
                    }
                    // Out of file descriptors or a connection reset before accept: wait a
                    // little and go on; the listener itself stays good.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
            }
        }
        while conns.join_next().await.is_some() {}
        Ok(())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn check_exports(exports: &[Export]) -> Result<()> {
    if exports.is_empty() {
        return Err(Error::new(ErrorKind::InvalidInput, "no export to serve"));
    }
    for (i, e) in exports.iter().enumerate() {
        if e.name.len() > super::proto::MAX_STRING {
            return Err(Error::new(ErrorKind::InvalidInput, "export name too long"));
        }
        if exports[..i].iter().any(|o| o.name == e.name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("export '{}' given twice", e.name),
            ));
        }
    }
    Ok(())
}

enum Accept {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Accept {
    async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Accept::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
            Accept::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// A connection after its handshake: the stream it goes on with and what was agreed.
enum Handshaken<S: NbdStream> {
    Plain(S, Session),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Session),
    /// TLS handed over to the record layer (see [`RecordStream`]).
    Records(Box<RecordStream<S::Read, S::Write>>, Session),
}

/// One connection: the handshake (abandoned if the server stops meanwhile or it takes longer
/// than `limit`), with TLS when `tls` is given, then requests with buffers from `pool`.
pub(crate) async fn connection<S>(
    s: S,
    exports: Arc<[Arc<Served>]>,
    tls: Option<Arc<ServerConfig>>,
    limit: Duration,
    pool: Arc<BufferPool>,
    mut stop: watch::Receiver<bool>,
) where
    S: NbdStream,
{
    let done = tokio::select! {
        r = tokio::time::timeout(limit, handshake(s, &exports, tls)) => match r {
            Ok(r) => r,
            Err(_) => return,
        },
        _ = stopped(&mut stop) => return,
    };
    match done {
        Ok(Some(Handshaken::Plain(s, session))) => transmit(s, session, pool, stop).await,
        Ok(Some(Handshaken::Tls(s, session))) => transmit(*s, session, pool, stop).await,
        Ok(Some(Handshaken::Records(s, session))) => transmit(*s, session, pool, stop).await,
        // The client left, broke the protocol or failed the TLS handshake: nothing to answer.
        Ok(None) | Err(_) => {}
    }
}

/// Greeting and option haggling; with `tls`, `NBD_OPT_STARTTLS`, the TLS handshake and the
/// haggling again over TLS. `Ok(None)`: the client quit during the handshake.
async fn handshake<S>(
    mut s: S,
    exports: &[Arc<Served>],
    tls: Option<Arc<ServerConfig>>,
) -> std::io::Result<Option<Handshaken<S>>>
where
    S: NbdStream,
{
    let no_zeroes = greet(&mut s).await?;
    let Some(config) = tls else {
        return Ok(
            match haggle(&mut s, exports, no_zeroes, TlsPhase::Off).await? {
                Negotiated::Session(session) => Some(Handshaken::Plain(s, session)),
                Negotiated::StartTls | Negotiated::Quit => None,
            },
        );
    };
    match haggle(&mut s, exports, no_zeroes, TlsPhase::Required).await? {
        Negotiated::StartTls => {}
        Negotiated::Session(_) | Negotiated::Quit => return Ok(None),
    }
    let extract = config.enable_secret_extraction;
    let mut t = TlsAcceptor::from(config).accept(s).await?;
    // Encrypted records waiting for the socket, at most (rustls' default is 64 KiB): a 2 MiB
    // read's reply goes out in a few large writes rather than one per 64 KiB.
    t.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    match haggle(&mut t, exports, no_zeroes, TlsPhase::Active).await? {
        Negotiated::Session(session) => {
            // With a configuration that allows it, the record layer takes over from rustls
            // once nothing is left in it: the client sends no request before our last reply.
            if extract {
                if let Some(suite) = ready_for_hand_off(&mut *t.get_mut().1) {
                    let (io, conn) = t.into_inner();
                    let (r, w) = io.into_halves();
                    let secrets = conn.dangerous_extract_secrets();
                    let r = RecordStream::hand_off(r, w, &[], secrets, suite)?;
                    return Ok(Some(Handshaken::Records(Box::new(r), session)));
                }
            }
            Ok(Some(Handshaken::Tls(Box::new(t), session)))
        }
        Negotiated::StartTls | Negotiated::Quit => {
            // A TLS close_notify, so that the client sees a clean end.
            let _ = t.shutdown().await;
            Ok(None)
        }
    }
}
