//! [`NbdClientOptions`]: timeouts, the reconnect policy ([`RetryPolicy`]) and TLS
//! ([`TlsOptions`], with [`TlsOptions::from_qemu_creds_dir`] for the directory layout of
//! qemu's `tls-creds-x509` object: `ca-cert.pem`, optional `client-cert.pem` +
//! `client-key.pem`).
//!
//! TLS follows proto.md "TLS support": the client sends `NBD_OPT_STARTTLS` before any other
//! option and runs the TLS handshake on the same socket; certificates are X.509 checked by
//! rustls against the caller's roots.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::ClientError;

/// How an [`NbdClient`](super::NbdClient) reconnects after its connection drops.
///
/// Requests in flight when the connection drops are re-issued whole on the new connection
/// (a read that had part of its data is read again from the start, so a caller never sees
/// bytes of two attempts). A reconnect round makes at most `max_attempts` connection
/// attempts within `max_elapsed`, sleeping `initial_backoff`, doubled each time up to
/// `max_backoff`, between them; when the round fails, every waiting request fails with
/// [`ClientError::GaveUp`]. The next request starts a new round, which makes at least one
/// attempt whatever the limits (so a client with [`RetryPolicy::never`] still reconnects
/// for new work).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Connection attempts per round (0: never reconnect; requests fail at the first drop).
    pub max_attempts: u32,
    /// Longest time a round may take.
    pub max_elapsed: Duration,
    /// Sleep before the second attempt.
    pub initial_backoff: Duration,
    /// Longest sleep between attempts.
    pub max_backoff: Duration,
    /// Most connections one request is sent on before it fails with
    /// [`ClientError::TooManyTries`] (guards against a server that drops the connection on
    /// one particular request every time).
    pub max_tries_per_request: u32,
}

impl Default for RetryPolicy {
    /// 10 attempts within 30 s, backoff from 100 ms to 5 s, 5 tries per request.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_tries_per_request: 5,
        }
    }
}

impl RetryPolicy {
    /// No reconnects: the first dropped connection fails the requests it carried (the next
    /// request still connects anew).
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 0,
            max_tries_per_request: 1,
            ..RetryPolicy::default()
        }
    }
}

/// TLS for an NBD connection: a rustls client configuration (roots, optional client
/// certificate) and the name the server's certificate must carry.
#[derive(Clone)]
pub struct TlsOptions {
    /// The rustls configuration. With `enable_secret_extraction` set, a TLS 1.3 connection
    /// goes on with the client's in-place record layer after the handshake (see the
    /// [`nbd`](crate::nbd) module docs).
    pub config: Arc<rustls::ClientConfig>,
    /// The name checked against the server certificate. `None`: the URL's host for TCP,
    /// `localhost` for a Unix socket (as qemu does).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// TLS with `config`, the server name taken from the URL.
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        TlsOptions {
            config,
            server_name: None,
        }
    }

    /// Checks the server certificate against `name` instead of the URL's host.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// TLS from a directory laid out as for qemu's `tls-creds-x509,endpoint=client`:
    /// `ca-cert.pem` (required: the roots the server certificate must chain to) and, when
    /// both exist, `client-cert.pem` and `client-key.pem` (a client certificate for servers
    /// that verify peers).
    pub fn from_qemu_creds_dir(dir: impl AsRef<Path>) -> Result<Self, ClientError> {
        client_config_from_qemu_creds_dir(dir).map(TlsOptions::new)
    }
}

/// Builds a rustls client configuration (ring provider, TLS 1.2 and 1.3) from a qemu
/// `tls-creds-x509` directory; see [`TlsOptions::from_qemu_creds_dir`].
pub fn client_config_from_qemu_creds_dir(
    dir: impl AsRef<Path>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let dir = dir.as_ref();
    let ca = dir.join("ca-cert.pem");
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(&ca)? {
        roots
            .add(cert)
            .map_err(|e| ClientError::TlsConfig(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots);
    let cert = dir.join("client-cert.pem");
    let key = dir.join("client-key.pem");
    let config = if cert.exists() && key.exists() {
        let chain = read_certs(&cert)?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| ClientError::TlsConfig(format!("{}: {e}", key.display())))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientError::TlsConfig(format!("client certificate: {e}")))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Every certificate of a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let bad =
        |e: &dyn std::fmt::Display| ClientError::TlsConfig(format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no certificate in the file"));
    }
    Ok(certs)
}

/// How an [`NbdClient`](super::NbdClient) connects and behaves.
#[derive(Debug, Clone)]
pub struct NbdClientOptions {
    /// Longest time for one connection attempt: connect, TLS and the whole handshake.
    pub connect_timeout: Duration,
    /// While requests are outstanding, the longest time without a byte from the server
    /// before the connection is declared dead (and reconnected). `None`: wait forever.
    pub request_timeout: Option<Duration>,
    /// Reconnect policy.
    pub retry: RetryPolicy,
    /// TLS. Required by `nbds://` URLs; when set, TLS is used for `nbd://` URLs too.
    pub tls: Option<TlsOptions>,
    /// Refuse writes locally even when the export takes them (a parent layer).
    pub read_only: bool,
    /// Make every write, write-zeroes and trim durable before it completes: sent with
    /// `NBD_CMD_FLAG_FUA` when the export takes it (`NBD_FLAG_SEND_FUA`), else followed by a
    /// flush (proto.md "Command flags"). Off: durability waits for [`flush`](crate::BlockDevice::flush).
    pub write_through: bool,
    /// Connections to open when the export advertises `NBD_FLAG_CAN_MULTI_CONN` (then a
    /// flush on one makes the writes completed on all durable, proto.md "Transmission
    /// flags"); requests are spread over them. One when the export does not advertise it;
    /// at most 16.
    pub connections: u32,
}

impl Default for NbdClientOptions {
    /// 10 s to connect, 30 s request timeout, the default [`RetryPolicy`], no TLS, writable,
    /// no write-through, one connection.
    fn default() -> Self {
        NbdClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(30)),
            retry: RetryPolicy::default(),
            tls: None,
            read_only: false,
            write_through: false,
            connections: 1,
        }
    }
}
