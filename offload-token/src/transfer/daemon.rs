//! [`ProviderDaemon`]: a provider serving the control protocol for the images under one
//! root folder: it mints tokens over them as S (each served on an NBD-over-TLS export of
//! its own), and redeems tokens into them as D (pulling from S's export).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block_io::nbd::{
    BufferPool, Export, NbdClient, NbdClientOptions, NbdServer, RetryPolicy, StopHandle, TlsOptions,
};
use block_io::BlockDevice;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

use super::ca::{peer_name, ProviderKeyPair, Role};
use super::control::{ControlKey, Reply, Request, Session, SourceEndpoint, TransferStatus};
use super::window::TokenExport;
use super::{chain, destination_principal, tls, TransferError};
use crate::acl::{AllowAll, Principal};
use crate::body::{Audience, TokenId};
use crate::envelope::Token;
use crate::key::{KeyRing, Opened, ProviderKey};
use crate::provider::{Provider, ReadRequest};
use crate::tracked::TrackedDisk;

/// Opens the images a daemon serves.
pub trait ImageOpener: Send + Sync + std::fmt::Debug {
    /// Opens the image at `path` (already confined to the root), writable when `writable`.
    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn BlockDevice>, TransferError>;
}

/// How a [`ProviderDaemon`] behaves.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The folder whose images are served.
    pub root: PathBuf,
    /// The control key initiators must hold.
    pub key: ControlKey,
    /// Most bytes one redeem writes (default 256 MiB, a whole token: each redeem drains D's
    /// pipeline of pulls, so longer ones go faster).
    pub max_redeem_len: u64,
    /// Time after which a redeem starts no new pull and returns what it wrote (default 1 s:
    /// MS-FSCC asks each call to stay well under 4 s; a slow source gets short writes).
    pub redeem_time: Duration,
    /// Bytes D reads from S per request while redeeming (default 2 MiB).
    pub pull_chunk: u64,
    /// Requests D keeps in flight to S while redeeming (default 4).
    pub pull_workers: usize,
    /// NBD connections D opens to S's export (default 2: with TLS records opened in place,
    /// 4 connections and 8 requests only cost more CPU, 1 GiB on tmpfs going no faster).
    pub pull_connections: u32,
    /// How long a dead S is retried before a redeem fails (default 2 s).
    pub pull_retry: Duration,
    /// Rate limit of each export in bytes/s (`None`: unlimited; tests slow S down with it).
    pub export_rate: Option<u64>,
}

impl DaemonConfig {
    /// Defaults for serving `root` to holders of `key`.
    pub fn new(root: impl Into<PathBuf>, key: ControlKey) -> Self {
        DaemonConfig {
            root: root.into(),
            key,
            max_redeem_len: 256 << 20,
            redeem_time: Duration::from_secs(1),
            pull_chunk: 2 << 20,
            pull_workers: 4,
            pull_connections: 2,
            pull_retry: Duration::from_secs(2),
            export_rate: None,
        }
    }
}

/// `rel` inside `root` (canonical): refuses empty, absolute and `..` paths, and paths that
/// resolve (through symlinks) outside the root. The result is canonical.
pub fn resolve_under(root: &Path, rel: &str) -> Result<PathBuf, TransferError> {
    let p = Path::new(rel);
    let plain = p
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if rel.is_empty() || !plain {
        return Err(TransferError::OutsideRoot(rel.to_string()));
    }
    // The error names the path asked for (the root stays the provider's business).
    let full = root
        .join(p)
        .canonicalize()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open {rel}: {e}")))?;
    if !full.starts_with(root) {
        return Err(TransferError::OutsideRoot(rel.to_string()));
    }
    Ok(full)
}

/// Stops a [`ProviderDaemon`] from any thread.
#[derive(Debug, Clone)]
pub struct DaemonStop(Arc<watch::Sender<bool>>);

impl DaemonStop {
    /// Stops accepting and ends every connection (their transfers end as by `close`).
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// One transfer as one provider sees it.
struct Transfer {
    id: Uuid,
    role: Role,
    owner: u64,
    ca: Vec<u8>,
    key: ProviderKeyPair,
    cert: Mutex<Option<Vec<u8>>>,
    cancelled: AtomicBool,
    tokens: Mutex<Vec<TokenId>>,
    exports: Mutex<Vec<StopHandle>>,
    disks: Mutex<HashMap<PathBuf, Arc<TrackedDisk>>>,
    pulls: Mutex<HashMap<SourceEndpoint, Arc<NbdClient>>>,
    /// Pull buffers kept between redeems (fresh ones would be page-faulted in every time).
    buffers: Mutex<Vec<Vec<u8>>>,
    /// The payload buffers of every export S serves for the transfer (one server per token,
    /// new connections per token: a pool of their own would start cold every time).
    pool: Arc<BufferPool>,
    minted: AtomicU64,
    served: Arc<AtomicU64>,
    written: AtomicU64,
}

impl Transfer {
    fn status(&self) -> TransferStatus {
        TransferStatus {
            role: Some(self.role),
            certified: self.cert.lock().is_some(),
            cancelled: self.cancelled.load(Ordering::SeqCst),
            tokens: self.minted.load(Ordering::Relaxed),
            bytes_served: self.served.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
        }
    }

    fn check_live(&self) -> Result<(), TransferError> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(TransferError::Cancelled(self.id));
        }
        Ok(())
    }

    fn cert(&self) -> Result<Vec<u8>, TransferError> {
        self.cert.lock().clone().ok_or(TransferError::Refused {
            code: "not-certified",
            message: format!("transfer {} has no certificate yet", self.id),
        })
    }

    /// Revokes the tokens and stops the exports; returns how many tokens were live.
    fn stop(&self, provider: &Provider) -> u64 {
        self.cancelled.store(true, Ordering::SeqCst);
        let mut revoked = 0;
        for id in self.tokens.lock().drain(..) {
            if provider.revoke(id) {
                revoked += 1;
            }
        }
        for s in self.exports.lock().drain(..) {
            s.stop();
        }
        self.pulls.lock().clear();
        self.buffers.lock().clear();
        revoked
    }

    /// Flushes and drops the open images.
    fn release(&self) -> Result<(), TransferError> {
        let disks: Vec<_> = self.disks.lock().drain().map(|(_, d)| d).collect();
        let mut r = Ok(());
        for d in disks {
            if self.role == Role::Destination {
                if let Err(e) = d.flush() {
                    r = r.and(Err(e.into()));
                }
            }
        }
        r
    }
}

pub(super) struct Inner {
    root: PathBuf,
    config: DaemonConfig,
    provider: Arc<Provider>,
    opener: Arc<dyn ImageOpener>,
    transfers: Mutex<HashMap<(Uuid, Role), Arc<Transfer>>>,
    principal: Principal,
}

impl Inner {
    /// The state of a daemon serving `root` (canonical): a provider with a random token key
    /// (its tokens live in memory), no transfers.
    pub(super) fn new(
        root: PathBuf,
        config: DaemonConfig,
        opener: Arc<dyn ImageOpener>,
    ) -> Arc<Self> {
        let provider = Provider::new(
            Uuid::new_v4(),
            KeyRing::new(ProviderKey::generate(1)),
            Arc::new(AllowAll),
        );
        Arc::new(Inner {
            root,
            config,
            provider: Arc::new(provider),
            opener,
            transfers: Mutex::new(HashMap::new()),
            principal: Principal::new("control"),
        })
    }
}

/// A provider daemon: the control protocol on a TCP listener, for the images under a root.
pub struct ProviderDaemon {
    inner: Arc<Inner>,
    listener: StdTcpListener,
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for ProviderDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderDaemon")
            .field("root", &self.inner.root)
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

fn refused(code: &'static str, message: impl Into<String>) -> TransferError {
    TransferError::Refused {
        code,
        message: message.into(),
    }
}

/// Runs `f` on a thread of its own (the NBD client and the images block; NbdClient also
/// refuses to start inside a tokio runtime's threads).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("offload-io".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| TransferError::Protocol("a worker thread died".into()))?
}

impl ProviderDaemon {
    /// Listens on `addr` for initiators, serving the images under `config.root` opened by
    /// `opener`. The provider's token key is random per daemon (its tokens live in memory).
    pub fn bind(
        addr: impl ToSocketAddrs,
        config: DaemonConfig,
        opener: Arc<dyn ImageOpener>,
    ) -> Result<Self, TransferError> {
        let root = config.root.canonicalize()?;
        if !root.is_dir() {
            return Err(TransferError::Invalid(format!(
                "{} is not a folder",
                root.display()
            )));
        }
        let listener = StdTcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let (tx, _) = watch::channel(false);
        Ok(ProviderDaemon {
            inner: Inner::new(root, config, opener),
            listener,
            stop: Arc::new(tx),
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr, TransferError> {
        Ok(self.listener.local_addr()?)
    }

    /// A handle that stops [`serve`](Self::serve).
    pub fn stop_handle(&self) -> DaemonStop {
        DaemonStop(self.stop.clone())
    }

    /// Serves on a runtime of its own until stopped.
    pub fn serve_blocking(self) -> Result<(), TransferError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("offload-provider")
            .enable_all()
            .build()?;
        rt.block_on(self.serve())
    }

    /// Serves inside the caller's runtime (multi-threaded, I/O and time enabled) until
    /// stopped.
    pub async fn serve(self) -> Result<(), TransferError> {
        let listener = TcpListener::from_std(self.listener.try_clone()?)?;
        let mut stop = self.stop.subscribe();
        let mut next_conn = 0u64;
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        next_conn += 1;
                        let _ = s.set_nodelay(true);
                        let inner = self.inner.clone();
                        let stop = self.stop.subscribe();
                        conns.spawn(connection(inner, s, next_conn, stop));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
            }
        }
        while conns.join_next().await.is_some() {}
        Ok(())
    }
}

/// How long an initiator may take over its hello.
const HELLO_LIMIT: Duration = Duration::from_secs(10);

async fn connection(inner: Arc<Inner>, s: TcpStream, conn: u64, stop: watch::Receiver<bool>) {
    let local_ip = s.local_addr().map(|a| a.ip()).ok();
    serve_connection(inner, s, local_ip, conn, stop).await
}

/// One initiator's connection on any stream: the hellos, then requests answered in order
/// until the initiator leaves, a frame fails, or the daemon stops; the transfers the
/// connection owned end with it. `local_ip` is where S's exports listen.
pub(super) async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    s: S,
    local_ip: Option<IpAddr>,
    conn: u64,
    mut stop: watch::Receiver<bool>,
) {
    let session =
        match tokio::time::timeout(HELLO_LIMIT, Session::server(s, &inner.config.key)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
    let mut session = session;
    loop {
        let req: Request = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = session.recv() => match r {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            },
        };
        let reply = match handle(&inner, conn, local_ip, req).await {
            Ok(r) => r,
            Err(e) => Reply::Error {
                code: e.code().to_string(),
                message: chain(&e),
            },
        };
        if session.send(&reply).await.is_err() {
            break;
        }
    }
    // The transfers this connection owned end with it.
    let owned: Vec<Arc<Transfer>> = {
        let mut t = inner.transfers.lock();
        let keys: Vec<_> = t
            .iter()
            .filter(|(_, x)| x.owner == conn)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter().filter_map(|k| t.remove(&k)).collect()
    };
    for t in owned {
        t.stop(&inner.provider);
        let _ = blocking(move || t.release()).await;
    }
}

fn hex_field(what: &str, text: &str) -> Result<Vec<u8>, TransferError> {
    crate::hex::decode(text).ok_or_else(|| TransferError::Invalid(format!("{what} is not hex")))
}

fn lookup(
    inner: &Inner,
    transfer: Uuid,
    role: Role,
    owner: Option<u64>,
) -> Result<Arc<Transfer>, TransferError> {
    let t = inner
        .transfers
        .lock()
        .get(&(transfer, role))
        .cloned()
        .ok_or_else(|| {
            refused(
                "no-transfer",
                format!("no transfer {transfer} as {role} here"),
            )
        })?;
    if let Some(conn) = owner {
        if t.owner != conn {
            return Err(refused(
                "no-transfer",
                format!("transfer {transfer} belongs to another connection"),
            ));
        }
    }
    Ok(t)
}

/// The transfer's open image at `path`, opened on first use.
fn disk(
    inner: &Inner,
    t: &Transfer,
    path: &Path,
    writable: bool,
) -> Result<Arc<TrackedDisk>, TransferError> {
    if let Some(d) = t.disks.lock().get(path) {
        return Ok(d.clone());
    }
    let dev = inner.opener.open(path, writable)?;
    let d = Arc::new(TrackedDisk::new(dev));
    Ok(t.disks
        .lock()
        .entry(path.to_path_buf())
        .or_insert(d)
        .clone())
}

async fn handle(
    inner: &Arc<Inner>,
    conn: u64,
    local_ip: Option<IpAddr>,
    req: Request,
) -> Result<Reply, TransferError> {
    match req {
        Request::Info { path } => {
            let path = resolve_under(&inner.root, &path)?;
            let opener = inner.opener.clone();
            let info = blocking(move || Ok(opener.open(&path, false)?.info())).await?;
            Ok(Reply::Info {
                virtual_size: info.virtual_size,
                sector_size: info.logical_sector_size,
                format: info.format.to_string(),
            })
        }
        Request::Trust { transfer, role, ca } => {
            let ca = hex_field("ca", &ca)?;
            let key = ProviderKeyPair::generate()?;
            let public = key.public()?;
            let t = Arc::new(Transfer {
                id: transfer,
                role,
                owner: conn,
                ca,
                key,
                cert: Mutex::new(None),
                cancelled: AtomicBool::new(false),
                tokens: Mutex::new(Vec::new()),
                exports: Mutex::new(Vec::new()),
                disks: Mutex::new(HashMap::new()),
                pulls: Mutex::new(HashMap::new()),
                buffers: Mutex::new(Vec::new()),
                pool: Arc::new(BufferPool::default()),
                minted: AtomicU64::new(0),
                served: Arc::new(AtomicU64::new(0)),
                written: AtomicU64::new(0),
            });
            let mut all = inner.transfers.lock();
            if all.contains_key(&(transfer, role)) {
                return Err(refused(
                    "exists",
                    format!("transfer {transfer} as {role} exists"),
                ));
            }
            all.insert((transfer, role), t);
            Ok(Reply::Trusted {
                public_key: crate::hex::encode(public.as_bytes()),
            })
        }
        Request::Certify {
            transfer,
            role,
            cert,
        } => {
            let t = lookup(inner, transfer, role, Some(conn))?;
            let cert = hex_field("cert", &cert)?;
            // Building the configuration checks the certificate matches the key.
            match role {
                Role::Source => {
                    tls::source_config(transfer, &t.ca, &cert, t.key.private_der())?;
                }
                Role::Destination => {
                    tls::destination_config(&t.ca, &cert, t.key.private_der())?;
                }
            }
            *t.cert.lock() = Some(cert);
            Ok(Reply::Certified)
        }
        Request::Mint {
            transfer,
            path,
            offset,
            length,
            ttl_ms,
        } => {
            let t = lookup(inner, transfer, Role::Source, Some(conn))?;
            t.check_live()?;
            let cert = t.cert()?;
            let path = resolve_under(&inner.root, &path)?;
            let ip = local_ip.ok_or_else(|| TransferError::Invalid("no local address".into()))?;
            mint(inner.clone(), t, path, offset, length, ttl_ms, cert, ip).await
        }
        Request::Redeem {
            transfer,
            path,
            offset,
            length,
            token,
            token_offset,
            source,
        } => {
            let t = lookup(inner, transfer, Role::Destination, Some(conn))?;
            t.check_live()?;
            let cert = t.cert()?;
            let path = resolve_under(&inner.root, &path)?;
            let token =
                Token::from_slice(&hex_field("token", &token)?).map_err(crate::Error::from)?;
            let inner = inner.clone();
            let written = blocking(move || {
                redeem(
                    &inner,
                    &t,
                    &path,
                    offset,
                    length,
                    &token,
                    token_offset,
                    source,
                    &cert,
                )
            })
            .await?;
            Ok(Reply::Redeemed { written })
        }
        Request::Status { transfer, role } => {
            let t = lookup(inner, transfer, role, None)?;
            Ok(Reply::Status(t.status()))
        }
        Request::Cancel { transfer, role } => {
            let t = lookup(inner, transfer, role, None)?;
            let revoked = t.stop(&inner.provider);
            Ok(Reply::Cancelled { revoked })
        }
        Request::Close { transfer, role } => {
            let t = lookup(inner, transfer, role, Some(conn))?;
            inner.transfers.lock().remove(&(transfer, role));
            t.stop(&inner.provider);
            blocking(move || t.release()).await?;
            Ok(Reply::Closed)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn mint(
    inner: Arc<Inner>,
    t: Arc<Transfer>,
    path: PathBuf,
    offset: u64,
    length: u64,
    ttl_ms: u64,
    cert: Vec<u8>,
    ip: IpAddr,
) -> Result<Reply, TransferError> {
    let (inner2, t2) = (inner.clone(), t.clone());
    let (out, source) = blocking(move || {
        let source = disk(&inner2, &t2, &path, false)?;
        let req = ReadRequest {
            offset,
            len: length,
            ttl: (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms)),
            audience: Some(Audience::single(destination_principal(t2.id).id())),
            ..ReadRequest::default()
        };
        let out = inner2
            .provider
            .offload_read_with(&inner2.principal, &source, &req)?;
        Ok((out, source))
    })
    .await?;
    t.minted.fetch_add(1, Ordering::Relaxed);
    let token_hex = crate::hex::encode(out.token.as_bytes());
    let id = match inner
        .provider
        .open(&out.token)
        .map_err(crate::Error::from)?
    {
        Opened::Zero => {
            return Ok(Reply::Minted {
                token: token_hex,
                transfer_length: out.transfer_length,
                flags: out.flags,
                port: None,
                export: None,
            })
        }
        Opened::Sealed(b) => b,
    };
    t.tokens.lock().push(id.id);
    let dev = TokenExport::new(
        inner.provider.clone(),
        id.id,
        source,
        id.offset,
        id.length,
        t.served.clone(),
    );
    let dev: Arc<dyn BlockDevice> = match inner.config.export_rate {
        Some(rate) => Arc::new(dev.with_rate(rate)),
        None => Arc::new(dev),
    };
    let name = crate::hex::encode(&id.id.0);
    let config = tls::source_config(t.id, &t.ca, &cert, t.key.private_der())?;
    let server = NbdServer::bind_tcp(
        (ip, 0),
        vec![Export::new(name.clone(), dev).read_only(true)],
    )?
    .require_tls(config)
    .buffer_pool(t.pool.clone());
    let port = server
        .local_addr()
        .map(|a| a.port())
        .ok_or_else(|| TransferError::Invalid("the export has no TCP address".into()))?;
    t.exports.lock().push(server.stop_handle());
    // A transfer stopped meanwhile must not leave this export running.
    if t.cancelled.load(Ordering::SeqCst) {
        server.stop_handle().stop();
        return Err(TransferError::Cancelled(t.id));
    }
    tokio::spawn(async move {
        let _ = server.serve_async().await;
    });
    Ok(Reply::Minted {
        token: token_hex,
        transfer_length: out.transfer_length,
        flags: out.flags,
        port: Some(port),
        export: Some(name),
    })
}

fn check_aligned(what: &'static str, value: u64, sector: u64) -> Result<(), TransferError> {
    if value % sector != 0 {
        return Err(crate::Error::Unaligned {
            what,
            value,
            sector,
        }
        .into());
    }
    Ok(())
}

/// The NBD client of S's export `ep`, connected on first use.
fn pull_client(
    inner: &Inner,
    t: &Transfer,
    ep: &SourceEndpoint,
    cert: &[u8],
) -> Result<Arc<NbdClient>, TransferError> {
    if let Some(c) = t.pulls.lock().get(ep) {
        return Ok(c.clone());
    }
    let config = tls::destination_config(&t.ca, cert, t.key.private_der())?;
    let url = ep.url();
    let opts = NbdClientOptions {
        connect_timeout: Duration::from_secs(10),
        request_timeout: Some(Duration::from_secs(30)),
        retry: RetryPolicy {
            max_attempts: 2,
            max_elapsed: inner.config.pull_retry,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            max_tries_per_request: 2,
        },
        tls: Some(TlsOptions::new(config).with_server_name(peer_name(t.id, Role::Source))),
        read_only: true,
        write_through: false,
        connections: inner.config.pull_connections,
    };
    let c = Arc::new(NbdClient::open(&url, opts)?);
    t.pulls.lock().insert(ep.clone(), c.clone());
    Ok(c)
}

/// Offload write at D: writes at most `max_redeem_len` bytes of the token's range from
/// `token_offset` into `path` at `offset`, pulling them from S's export.
#[allow(clippy::too_many_arguments)]
fn redeem(
    inner: &Inner,
    t: &Transfer,
    path: &Path,
    offset: u64,
    length: u64,
    token: &Token,
    token_offset: u64,
    source: Option<SourceEndpoint>,
    cert: &[u8],
) -> Result<u64, TransferError> {
    let dst = disk(inner, t, path, true)?;
    if token.is_zero() {
        let n = inner.provider.offload_write(
            &destination_principal(t.id),
            &dst,
            offset,
            length,
            token,
            token_offset,
        )?;
        t.written.fetch_add(n, Ordering::Relaxed);
        return Ok(n);
    }
    token.envelope().map_err(crate::Error::from)?;
    let ep = source
        .ok_or_else(|| TransferError::Invalid("a data token needs the source's endpoint".into()))?;
    let info = dst.info();
    let dsector = u64::from(info.logical_sector_size.max(1));
    check_aligned("offset", offset, dsector)?;
    check_aligned("length", length, dsector)?;
    let end = offset
        .checked_add(length)
        .filter(|&e| e <= info.virtual_size)
        .ok_or(crate::Error::OutOfRange {
            what: "range end",
            offset: offset.saturating_add(length),
            size: info.virtual_size,
            within: "disk",
        })?;
    let _ = end;
    if length == 0 {
        return Ok(0);
    }
    let src = pull_client(inner, t, &ep, cert)?;
    let sinfo = src.info();
    let ssector = u64::from(sinfo.logical_sector_size.max(1));
    check_aligned("token offset", token_offset, ssector)?;
    if token_offset >= sinfo.virtual_size {
        return Err(crate::Error::OutOfRange {
            what: "token offset",
            offset: token_offset,
            size: sinfo.virtual_size,
            within: "token range",
        }
        .into());
    }
    let unit = dsector.max(ssector);
    let cap = inner.config.max_redeem_len.max(unit);
    let want = length.min(sinfo.virtual_size - token_offset).min(cap);
    let n = want - want % unit;
    if n == 0 {
        return Err(crate::Error::InvalidRequest("remaining token length below one sector").into());
    }
    let n = pull(inner, t, &src, &dst, token_offset, offset, n, unit)?;
    t.written.fetch_add(n, Ordering::Relaxed);
    Ok(n)
}

/// Copies up to `n` bytes from `src` at `from` to `dst` at `to` with several requests in
/// flight, in chunks handed out in order; after [`DaemonConfig::redeem_time`] no new chunk
/// starts, so it returns the bytes of the chunks started (a prefix, whole sectors), at least
/// one chunk's worth.
#[allow(clippy::too_many_arguments)]
fn pull(
    inner: &Inner,
    t: &Transfer,
    src: &NbdClient,
    dst: &TrackedDisk,
    from: u64,
    to: u64,
    n: u64,
    unit: u64,
) -> Result<u64, TransferError> {
    let chunk = inner.config.pull_chunk.max(unit);
    let chunk = chunk - chunk % unit;
    let chunks = n.div_ceil(chunk);
    let deadline = std::time::Instant::now() + inner.config.redeem_time;
    // Chunks handed out so far, and whether to hand out more.
    let issued: Mutex<(u64, bool)> = Mutex::new((0, true));
    let failed: Mutex<Option<TransferError>> = Mutex::new(None);
    // One write at a time into D's image: buffered writes to one file serialize on its inode
    // lock anyway (tmpfs, ext4, xfs), where the kernel lets waiters spin as long as the
    // writer runs (a 2 MiB copy), burning the CPU the pulls and the TLS need; parking here
    // costs nothing. The reads from S stay in flight meanwhile.
    let writing = Mutex::new(());
    let workers = inner
        .config
        .pull_workers
        .clamp(1, 64)
        .min(usize::try_from(chunks).unwrap_or(64));
    let size = usize::try_from(chunk)
        .map_err(|_| TransferError::Invalid("pull chunk too large".into()))?;
    let next = || {
        let mut g = issued.lock();
        let late = g.0 > 0 && std::time::Instant::now() >= deadline;
        if !g.1 || g.0 >= chunks || late {
            g.1 = false;
            return None;
        }
        g.0 += 1;
        Some(g.0 - 1)
    };
    let fail = |e: TransferError| {
        failed.lock().get_or_insert(e);
        issued.lock().1 = false;
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = t
                    .buffers
                    .lock()
                    .pop()
                    .filter(|b| b.capacity() >= size)
                    .unwrap_or_else(|| Vec::with_capacity(size));
                while let Some(i) = next() {
                    if t.cancelled.load(Ordering::SeqCst) {
                        fail(TransferError::Cancelled(t.id));
                        break;
                    }
                    let off = i * chunk;
                    let len = (n - off).min(chunk) as usize;
                    // Read straight into the worker's buffer (no copy out of the reply).
                    let r = src
                        .read_into(std::mem::take(&mut buf), from + off, len as u64)
                        .and_then(|b| {
                            buf = b;
                            let _w = writing.lock();
                            dst.write_at(&buf[..len], to + off)
                        });
                    if let Err(e) = r {
                        fail(TransferError::Block(e));
                        break;
                    }
                }
                if !t.cancelled.load(Ordering::SeqCst) {
                    t.buffers.lock().push(buf);
                }
            });
        }
    });
    match failed.into_inner() {
        Some(e) => Err(e),
        // Every chunk handed out completed: the written bytes are a prefix.
        None => Ok((issued.into_inner().0 * chunk).min(n)),
    }
}
