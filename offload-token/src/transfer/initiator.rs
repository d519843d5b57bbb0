//! The initiator: [`ControlClient`] (one authenticated control connection to a provider)
//! and [`copy`], which sets up a transfer's trust, mints at S, redeems at D, loops over
//! short results and closes the transfer on both sides. With [`CopyRequest::relay`] the
//! bytes go through the initiator instead (a baseline for the benchmark): it pulls each
//! token's range from S itself and serves it to D on an export of its own.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::nbd::{
    BufferPool, Export, NbdClient, NbdClientOptions, NbdServer, RetryPolicy, TlsOptions,
};
use block_io::{BlockDevice, DiskInfo, RawBuf, StatusRun};
use tokio::net::TcpStream;
use uuid::Uuid;

use super::ca::{peer_name, ProviderKeyPair, PublicKey, Role, TransferCa};
use super::control::{ByteCounter, ControlKey, Counted, Reply, Request, Session, SourceEndpoint};
use super::{tls, TransferError};
use crate::envelope::Token;
use crate::provider::ALL_ZERO_BEYOND_CURRENT_RANGE;

/// Longest time one control request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(120);

/// An authenticated control connection to one provider.
#[derive(Debug)]
pub struct ControlClient {
    session: Session<Counted<TcpStream>>,
    addr: String,
    host: String,
    local_ip: IpAddr,
}

impl ControlClient {
    /// Connects to the provider at `addr` (`HOST:PORT`) with its control key, counting the
    /// connection's bytes into `counter`.
    pub async fn connect(
        addr: &str,
        key: &ControlKey,
        counter: Arc<ByteCounter>,
    ) -> Result<Self, TransferError> {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| TransferError::Timeout("connecting to a provider"))??;
        let _ = s.set_nodelay(true);
        let local_ip = s.local_addr()?.ip();
        let host = s.peer_addr()?.ip().to_string();
        let session = tokio::time::timeout(
            Duration::from_secs(10),
            Session::client(Counted::new(s, counter), key),
        )
        .await
        .map_err(|_| TransferError::Timeout("greeting a provider"))??;
        Ok(ControlClient {
            session,
            addr: addr.to_string(),
            host,
            local_ip,
        })
    }

    /// The provider's IP address as this connection reached it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Sends a request and waits for its reply; an `error` reply is
    /// [`TransferError::Remote`].
    pub async fn call(&mut self, req: &Request) -> Result<Reply, TransferError> {
        let r = tokio::time::timeout(REQUEST_LIMIT, async {
            self.session.send(req).await?;
            self.session.recv::<Reply>().await
        })
        .await
        .map_err(|_| TransferError::Timeout("waiting for a provider's reply"))??;
        match r {
            None => Err(TransferError::Protocol(format!(
                "provider {} closed the connection (a wrong control key, or it stopped)",
                self.addr
            ))),
            Some(Reply::Error { code, message }) => Err(TransferError::Remote {
                provider: self.addr.clone(),
                code,
                message,
            }),
            Some(r) => Ok(r),
        }
    }

    fn unexpected(&self, r: &Reply) -> TransferError {
        TransferError::Protocol(format!("unexpected reply from {}: {r:?}", self.addr))
    }

    /// `info`: (virtual size, sector size) of an image.
    pub async fn info(&mut self, path: &str) -> Result<(u64, u32), TransferError> {
        match self.call(&Request::Info { path: path.into() }).await? {
            Reply::Info {
                virtual_size,
                sector_size,
                ..
            } => Ok((virtual_size, sector_size)),
            r => Err(self.unexpected(&r)),
        }
    }

    /// `trust` then `certify`: joins the provider to the transfer of `ca` in `role`.
    pub async fn join(&mut self, ca: &TransferCa, role: Role) -> Result<(), TransferError> {
        let transfer = ca.transfer();
        let key = self.trust(transfer, role, ca.cert_der()).await?;
        let cert = ca.issue(role, &key)?;
        self.certify(transfer, role, &cert).await
    }

    /// `trust`: the provider's fresh public key for the transfer.
    pub async fn trust(
        &mut self,
        transfer: Uuid,
        role: Role,
        ca: &[u8],
    ) -> Result<PublicKey, TransferError> {
        let req = Request::Trust {
            transfer,
            role,
            ca: crate::hex::encode(ca),
        };
        match self.call(&req).await? {
            Reply::Trusted { public_key } => crate::hex::decode(&public_key)
                .and_then(|b| PublicKey::from_raw(&b))
                .ok_or_else(|| TransferError::Protocol("bad public key".into())),
            r => Err(self.unexpected(&r)),
        }
    }

    /// `certify`: installs a certificate.
    pub async fn certify(
        &mut self,
        transfer: Uuid,
        role: Role,
        cert: &[u8],
    ) -> Result<(), TransferError> {
        let req = Request::Certify {
            transfer,
            role,
            cert: crate::hex::encode(cert),
        };
        match self.call(&req).await? {
            Reply::Certified => Ok(()),
            r => Err(self.unexpected(&r)),
        }
    }

    /// `mint`: offload read at S.
    pub async fn mint(
        &mut self,
        transfer: Uuid,
        path: &str,
        offset: u64,
        length: u64,
        ttl: Option<Duration>,
    ) -> Result<Minted, TransferError> {
        let req = Request::Mint {
            transfer,
            path: path.into(),
            offset,
            length,
            ttl_ms: ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        match self.call(&req).await? {
            Reply::Minted {
                token,
                transfer_length,
                flags,
                port,
                export,
            } => {
                let token = crate::hex::decode(&token)
                    .and_then(|b| Token::from_slice(&b).ok())
                    .ok_or_else(|| TransferError::Protocol("bad token".into()))?;
                if transfer_length == 0 || transfer_length > length {
                    return Err(TransferError::Protocol(format!(
                        "transfer length {transfer_length} for {length} bytes asked"
                    )));
                }
                let source = match (port, export) {
                    (Some(port), Some(export)) => Some(SourceEndpoint {
                        host: self.host.clone(),
                        port,
                        export,
                    }),
                    _ => None,
                };
                Ok(Minted {
                    token,
                    transfer_length,
                    flags,
                    source,
                })
            }
            r => Err(self.unexpected(&r)),
        }
    }

    /// `redeem`: offload write at D; the bytes written.
    #[allow(clippy::too_many_arguments)]
    pub async fn redeem(
        &mut self,
        transfer: Uuid,
        path: &str,
        offset: u64,
        length: u64,
        token: &Token,
        token_offset: u64,
        source: Option<SourceEndpoint>,
    ) -> Result<u64, TransferError> {
        let req = Request::Redeem {
            transfer,
            path: path.into(),
            offset,
            length,
            token: crate::hex::encode(token.as_bytes()),
            token_offset,
            source,
        };
        match self.call(&req).await? {
            Reply::Redeemed { written } if written <= length => Ok(written),
            r => Err(self.unexpected(&r)),
        }
    }

    /// `close`: ends the transfer at this provider (D flushes its images).
    pub async fn close(&mut self, transfer: Uuid, role: Role) -> Result<(), TransferError> {
        match self.call(&Request::Close { transfer, role }).await? {
            Reply::Closed => Ok(()),
            r => Err(self.unexpected(&r)),
        }
    }
}

/// A `minted` reply.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The token.
    pub token: Token,
    /// Bytes it covers.
    pub transfer_length: u64,
    /// MS-FSCC flags.
    pub flags: u32,
    /// Its export (none for the zero-data token).
    pub source: Option<SourceEndpoint>,
}

/// One side of a copy: a provider and an image under its root.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `HOST:PORT` of the provider's control listener.
    pub addr: String,
    /// Its control key.
    pub key: ControlKey,
    /// The image, relative to the provider's root.
    pub path: String,
    /// Byte offset in the image.
    pub offset: u64,
}

/// What [`copy`] copies.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    /// S and the source image.
    pub from: Endpoint,
    /// Bytes to copy (`None`: to the end of the source).
    pub length: Option<u64>,
    /// D and the destination image.
    pub to: Endpoint,
    /// Move the bytes through the initiator (the benchmark's baseline).
    pub relay: bool,
    /// Lifetime of the transfer's certificates (default 15 min).
    pub cert_lifetime: Duration,
    /// Inactivity TTL asked for each token (`None`: S's default).
    pub ttl: Option<Duration>,
}

impl CopyRequest {
    /// A direct copy of `length` bytes (`None`: to the source's end) with defaults.
    pub fn new(from: Endpoint, to: Endpoint, length: Option<u64>) -> Self {
        CopyRequest {
            from,
            length,
            to,
            relay: false,
            cert_lifetime: Duration::from_secs(15 * 60),
            ttl: None,
        }
    }
}

/// What [`copy`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CopyReport {
    /// Bytes now at D (data and zeros).
    pub bytes_copied: u64,
    /// Bytes that crossed the initiator's sockets: every control byte, both ways, and, when
    /// relaying, the payload in and out (counted at the relay, NBD and TLS framing aside).
    pub bytes_through_initiator: u64,
    /// Tokens minted (zero-data tokens included).
    pub tokens: u64,
    /// Redeems made.
    pub redeems: u64,
    /// Bytes written from zero-data tokens.
    pub zero_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Copies on a runtime of its own (for callers without one).
pub fn copy_blocking(req: &CopyRequest) -> Result<CopyReport, TransferError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("offload-initiator")
        .enable_all()
        .build()?;
    rt.block_on(copy(req))
}

/// Copies `req.length` bytes from S to D by offload read and offload write, D pulling the
/// data from S (see the [module docs](super)). Each provider's transfer ends when this
/// returns (closed on success; on failure the control connections close, which ends it).
pub async fn copy(req: &CopyRequest) -> Result<CopyReport, TransferError> {
    let started = Instant::now();
    let counter = Arc::new(ByteCounter::default());
    let mut s = ControlClient::connect(&req.from.addr, &req.from.key, counter.clone()).await?;
    let mut d = ControlClient::connect(&req.to.addr, &req.to.key, counter.clone()).await?;
    let (ssize, ssector) = s.info(&req.from.path).await?;
    let (dsize, _) = d.info(&req.to.path).await?;
    let len = match req.length {
        Some(l) => l,
        None => ssize
            .checked_sub(req.from.offset)
            .ok_or_else(|| TransferError::Invalid("the source offset is past its end".into()))?,
    };
    if req.from.offset.checked_add(len).is_none_or(|e| e > ssize) {
        return Err(TransferError::Invalid(format!(
            "the source range ends past its size ({ssize} bytes)"
        )));
    }
    if req.to.offset.checked_add(len).is_none_or(|e| e > dsize) {
        return Err(TransferError::Invalid(format!(
            "the destination range ends past its size ({dsize} bytes)"
        )));
    }
    let _ = ssector;
    let ca = TransferCa::new(Uuid::new_v4(), req.cert_lifetime)?;
    let transfer = ca.transfer();
    s.join(&ca, Role::Source).await?;
    d.join(&ca, Role::Destination).await?;
    let relay = if req.relay {
        Some(Relay::new(&ca, d.local_ip)?)
    } else {
        None
    };
    let mut report = CopyReport::default();
    let mut done = 0u64;
    while done < len {
        let m = s
            .mint(
                transfer,
                &req.from.path,
                req.from.offset + done,
                len - done,
                req.ttl,
            )
            .await?;
        report.tokens += 1;
        let zero = m.token.is_zero();
        let (source, relayed) = match (&relay, m.source.clone()) {
            (Some(r), Some(ep)) => {
                let (ep, stop) = r.serve(ep).await?;
                (Some(ep), Some(stop))
            }
            (_, ep) => (ep, None),
        };
        let mut t = 0;
        while t < m.transfer_length {
            let n = d
                .redeem(
                    transfer,
                    &req.to.path,
                    req.to.offset + done + t,
                    m.transfer_length - t,
                    &m.token,
                    t,
                    source.clone(),
                )
                .await?;
            if n == 0 {
                return Err(TransferError::Protocol("a redeem made no progress".into()));
            }
            report.redeems += 1;
            t += n;
        }
        if let Some(stop) = relayed {
            stop.stop();
        }
        if zero {
            report.zero_bytes += t;
        }
        done += m.transfer_length;
        if m.flags & ALL_ZERO_BEYOND_CURRENT_RANGE != 0 {
            let z = Token::zero();
            while done < len {
                let n = d
                    .redeem(
                        transfer,
                        &req.to.path,
                        req.to.offset + done,
                        len - done,
                        &z,
                        0,
                        None,
                    )
                    .await?;
                if n == 0 {
                    return Err(TransferError::Protocol("a redeem made no progress".into()));
                }
                report.redeems += 1;
                report.zero_bytes += n;
                done += n;
            }
        }
    }
    d.close(transfer, Role::Destination).await?;
    s.close(transfer, Role::Source).await?;
    report.bytes_copied = done;
    let relayed = relay
        .as_ref()
        .map_or(0, |r| r.bytes.load(Ordering::Relaxed));
    report.bytes_through_initiator = counter.total() + 2 * relayed;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The relay: the initiator as D towards S and as S towards D.
struct Relay {
    transfer: Uuid,
    ca: Vec<u8>,
    client_key: ProviderKeyPair,
    client_cert: Vec<u8>,
    server_key: ProviderKeyPair,
    server_cert: Vec<u8>,
    ip: IpAddr,
    bytes: Arc<AtomicU64>,
    /// The payload buffers of the relay's servers (one per token), as S shares one.
    pool: Arc<BufferPool>,
}

impl Relay {
    fn new(ca: &TransferCa, ip: IpAddr) -> Result<Self, TransferError> {
        let client_key = ProviderKeyPair::generate()?;
        let client_cert = ca.issue(Role::Destination, &client_key.public()?)?;
        let server_key = ProviderKeyPair::generate()?;
        let server_cert = ca.issue(Role::Source, &server_key.public()?)?;
        Ok(Relay {
            transfer: ca.transfer(),
            ca: ca.cert_der().to_vec(),
            client_key,
            client_cert,
            server_key,
            server_cert,
            ip,
            bytes: Arc::new(AtomicU64::new(0)),
            pool: Arc::new(BufferPool::default()),
        })
    }

    /// Serves S's export `ep` to D through this process; returns the relay's endpoint.
    async fn serve(
        &self,
        ep: SourceEndpoint,
    ) -> Result<(SourceEndpoint, block_io::nbd::StopHandle), TransferError> {
        let config =
            tls::destination_config(&self.ca, &self.client_cert, self.client_key.private_der())?;
        let name = peer_name(self.transfer, Role::Source);
        let url = ep.url();
        let client = tokio::task::spawn_blocking(move || {
            let opts = NbdClientOptions {
                retry: RetryPolicy::never(),
                tls: Some(TlsOptions::new(config).with_server_name(name)),
                read_only: true,
                // 4 (what D opened to S by default until D went to 2): with 2 the relayed
                // copy was no cheaper and its wall time within the noise (5 runs, 1 GiB).
                connections: 4,
                ..NbdClientOptions::default()
            };
            // NbdClient runs its own runtime; open it off this one.
            std::thread::spawn(move || NbdClient::open(&url, opts))
                .join()
                .map_err(|_| TransferError::Protocol("a worker thread died".into()))?
                .map_err(TransferError::Nbd)
        })
        .await
        .map_err(|_| TransferError::Protocol("a worker thread died".into()))??;
        let dev = Arc::new(Counting {
            inner: Arc::new(client),
            bytes: self.bytes.clone(),
        });
        let sconfig = tls::source_config(
            self.transfer,
            &self.ca,
            &self.server_cert,
            self.server_key.private_der(),
        )?;
        let server = NbdServer::bind_tcp(
            (self.ip, 0),
            vec![Export::new(ep.export.clone(), dev).read_only(true)],
        )?
        .require_tls(sconfig)
        .buffer_pool(self.pool.clone());
        let port = server
            .local_addr()
            .map(|a| a.port())
            .ok_or_else(|| TransferError::Invalid("the relay has no TCP address".into()))?;
        let stop = server.stop_handle();
        tokio::spawn(async move {
            let _ = server.serve_async().await;
        });
        Ok((
            SourceEndpoint {
                host: self.ip.to_string(),
                port,
                export: ep.export,
            },
            stop,
        ))
    }
}

/// A device counting the bytes read through it (the relay's payload).
struct Counting {
    inner: Arc<dyn BlockDevice>,
    bytes: Arc<AtomicU64>,
}

fn read_only() -> block_io::Error {
    block_io::Error::new(block_io::ErrorKind::ReadOnly, "the relay is read-only")
}

impl BlockDevice for Counting {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        self.inner.read_at(buf, offset)?;
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    unsafe fn read_raw_at(&self, bufs: &[RawBuf], offset: u64) -> block_io::Result<()> {
        // SAFETY: forwarded caller contract (buffers valid for writes).
        unsafe { self.inner.read_raw_at(bufs, offset)? };
        self.bytes
            .fetch_add(block_io::raw_total(bufs)?, Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> block_io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> block_io::Result<()> {
        Err(read_only())
    }

    fn discard(&self, _: u64, _: u64) -> block_io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> block_io::Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<StatusRun> {
        self.inner.block_status(offset, len)
    }
}
