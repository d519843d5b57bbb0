//! The fuzzing entry point of the providers' control protocol (feature `testing`), shared by
//! `fuzz/fuzz_targets/offload_control.rs` and the corpus replay test
//! (`tests/control_fuzz_corpus.rs`): arbitrary bytes against a provider daemon's connection
//! handling ([`super::control`]'s hellos, frames and sessions, then the daemon's request
//! dispatch), on an in-memory pipe instead of TCP.
//!
//! An input is `[mode u8][rest]`. Mode bit 0 clear: `rest` is the initiator's side of the
//! wire verbatim (hello, frames, tags and all), so the hello and frame parsers and the tag
//! check see arbitrary bytes. Mode bit 0 set: the harness is an honest initiator holding the
//! control key, and `rest` is a list of message bodies, each `[len u16 LE][len bytes]` (a
//! short last one takes what is left), each sent as one authenticated frame: the JSON parser
//! and every request handler (`info`, `trust`, `certify`, `mint`, `redeem`, `status`,
//! `cancel`, `close`) see arbitrary bodies. Mode bit 1 (with bit 0): before the bodies the
//! harness joins transfer [`CERTIFIED_TRANSFER`] in both roles with a genuine per-transfer
//! CA (`trust`, then `certify` with a certificate it issues over the provider's key), so
//! bodies naming that transfer reach `mint` (an NBD-over-TLS export on loopback) and
//! `redeem` (pulling from such an export). A `redeem` whose source is not a loopback address
//! is not sent (the daemon would connect to it).
//!
//! [`ControlWorld::run`] checks that the daemon answers every body that parses as a
//! [`Request`] with a [`Reply`] (and an `info` naming an absolute or `..` path with the
//! `outside-root` error), drops the connection on any other body, and never hangs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block_io::{BlockDevice, FileStorage, RawDisk, RawOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::ca::{PublicKey, Role, TransferCa};
use super::control::{ControlKey, Reply, Request, Session};
use super::daemon::{serve_connection, DaemonConfig, ImageOpener, Inner};
use super::TransferError;

/// The control key of the fuzzed provider.
pub const KEY: [u8; 32] = [0x42; 32];
/// The image under the root (64 KiB raw).
pub const IMAGE: &str = "disk.raw";
/// The transfer the harness certifies in both roles when mode bit 1 is set.
pub const CERTIFIED_TRANSFER: uuid::Uuid = uuid::Uuid::from_u128(0x7431);
/// How long one input may take.
const LIMIT: Duration = Duration::from_secs(20);

/// An invariant the daemon broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fuzz invariant violated: {0}")]
pub struct Violation(pub String);

/// Opens the root's files as raw images (redeems write the fuzz world's scratch image).
#[derive(Debug)]
struct RawOpener;

impl ImageOpener for RawOpener {
    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn BlockDevice>, TransferError> {
        let s = FileStorage::open(
            path,
            &block_io::OpenOptions::new()
                .read_only(!writable)
                .lock(block_io::LockMode::Off),
        )?;
        Ok(Arc::new(RawDisk::open(
            s,
            &RawOptions::new().read_only(!writable),
        )?))
    }
}

/// A provider daemon's state over a root folder, and a runtime to serve inputs on.
#[derive(Debug)]
pub struct ControlWorld {
    inner: Arc<Inner>,
    rt: tokio::runtime::Runtime,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inner(..)")
    }
}

impl ControlWorld {
    /// A daemon over `root` (created, with [`IMAGE`] in it, if missing).
    pub fn new(root: &Path) -> Result<Self, TransferError> {
        std::fs::create_dir_all(root)?;
        let img = root.join(IMAGE);
        if !img.exists() {
            std::fs::write(&img, vec![0x5a; 64 << 10])?;
        }
        let root = root.canonicalize()?;
        let mut config = DaemonConfig::new(root.clone(), ControlKey::from_bytes(KEY));
        config.pull_retry = Duration::from_millis(50);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(ControlWorld {
            inner: Inner::new(root, config, Arc::new(RawOpener)),
            rt,
            next_conn: AtomicU64::new(1),
        })
    }

    /// Runs one input (see the module docs).
    pub fn run(&self, data: &[u8]) -> Result<(), Violation> {
        let Some((&mode, rest)) = data.split_first() else {
            return Ok(());
        };
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        self.rt.block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (_stop_tx, stop) = watch::channel(false);
            let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let served = serve_connection(inner, server, local, conn, stop);
            let work = async {
                let r = if mode & 1 == 0 {
                    raw_wire(client, rest).await;
                    Ok(())
                } else {
                    authenticated(client, rest, mode & 2 != 0).await
                };
                r
            };
            match tokio::time::timeout(LIMIT, async { tokio::join!(served, work).1 }).await {
                Ok(r) => r,
                Err(_) => Err(Violation(format!("the daemon hung for {LIMIT:?}"))),
            }
        })
    }
}

/// Writes `bytes` as the initiator's side, then closes it; reads whatever comes back.
async fn raw_wire(client: tokio::io::DuplexStream, bytes: &[u8]) {
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async {
        let _ = wr.write_all(bytes).await;
        let _ = wr.shutdown().await;
    };
    let read = async {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
    };
    tokio::join!(write, read);
}

/// The bodies of an authenticated input.
fn bodies(mut rest: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let n = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (body, next) = tail.split_at(n);
        out.push(body);
        rest = next;
    }
    out
}

/// Whether the daemon must refuse `path` as outside its root without looking at the disk.
fn plainly_outside(path: &str) -> bool {
    let p = Path::new(path);
    path.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Joins [`CERTIFIED_TRANSFER`] as `role` the way an initiator does.
async fn certify<S>(s: &mut Session<S>, ca: &TransferCa, role: Role) -> Result<(), Violation>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let v = |what: &str, e: String| Violation(format!("an honest {what} failed: {e}"));
    s.send(&Request::Trust {
        transfer: CERTIFIED_TRANSFER,
        role,
        ca: crate::hex::encode(ca.cert_der()),
    })
    .await
    .map_err(|e| v("trust", e.to_string()))?;
    let key = match s.recv::<Reply>().await {
        Ok(Some(Reply::Trusted { public_key })) => crate::hex::decode(&public_key)
            .and_then(|b| PublicKey::from_raw(&b))
            .ok_or_else(|| v("trust", format!("public key {public_key:?}")))?,
        other => return Err(v("trust", format!("{other:?}"))),
    };
    let cert = ca
        .issue(role, &key)
        .map_err(|e| v("issue", e.to_string()))?;
    s.send(&Request::Certify {
        transfer: CERTIFIED_TRANSFER,
        role,
        cert: crate::hex::encode(&cert),
    })
    .await
    .map_err(|e| v("certify", e.to_string()))?;
    match s.recv::<Reply>().await {
        Ok(Some(Reply::Certified)) => Ok(()),
        other => Err(v("certify", format!("{other:?}"))),
    }
}

/// Whether a redeem's source is one the harness lets the daemon connect to.
fn loopback_source(req: &Request) -> bool {
    match req {
        Request::Redeem {
            source: Some(ep), ..
        } => matches!(
            ep.host.as_str(),
            "127.0.0.1" | "::1" | "[::1]" | "localhost"
        ),
        _ => true,
    }
}

async fn authenticated(
    client: tokio::io::DuplexStream,
    rest: &[u8],
    certified: bool,
) -> Result<(), Violation> {
    let mut s = Session::client(client, &ControlKey::from_bytes(KEY))
        .await
        .map_err(|e| Violation(format!("an honest hello failed: {e}")))?;
    if certified {
        let ca = TransferCa::new(CERTIFIED_TRANSFER, Duration::from_secs(600))
            .map_err(|e| Violation(format!("cannot make the transfer CA: {e}")))?;
        certify(&mut s, &ca, Role::Source).await?;
        certify(&mut s, &ca, Role::Destination).await?;
    }
    for body in bodies(rest) {
        let parsed = serde_json::from_slice::<Request>(body);
        if parsed.as_ref().is_ok_and(|r| !loopback_source(r)) {
            continue;
        }
        if s.send_raw(body).await.is_err() {
            return match parsed {
                Ok(r) => Err(Violation(format!("the daemon left before {r:?}"))),
                Err(_) => Ok(()),
            };
        }
        let reply = s.recv::<Reply>().await;
        match (parsed, reply) {
            (Ok(req), Ok(Some(rep))) => {
                if let Request::Info { path } = &req {
                    let refused =
                        matches!(&rep, Reply::Error { code, .. } if code == "outside-root");
                    if plainly_outside(path) && !refused {
                        return Err(Violation(format!("info {path:?} answered {rep:?}")));
                    }
                }
            }
            (Ok(req), other) => {
                return Err(Violation(format!("{req:?} answered {other:?}")));
            }
            (Err(_), Ok(Some(rep))) => {
                return Err(Violation(format!(
                    "a body that is no request answered {rep:?}"
                )));
            }
            // The connection ends on a body that is no request.
            (Err(_), _) => return Ok(()),
        }
    }
    Ok(())
}

/// Encodes an authenticated input of `bodies` (the inverse of what [`ControlWorld::run`]
/// reads).
pub fn authenticated_input(bodies: &[&[u8]]) -> Vec<u8> {
    bodies_input(1, bodies)
}

/// Encodes an authenticated input whose bodies follow the genuine certification of
/// [`CERTIFIED_TRANSFER`] in both roles.
pub fn certified_input(bodies: &[&[u8]]) -> Vec<u8> {
    bodies_input(3, bodies)
}

fn bodies_input(mode: u8, bodies: &[&[u8]]) -> Vec<u8> {
    let mut v = vec![mode];
    for b in bodies {
        let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&b[..usize::from(n)]);
    }
    v
}

/// Encodes a raw-wire input: the initiator's bytes verbatim.
pub fn raw_input(wire: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(wire);
    v
}

/// A well-formed initiator hello frame (length, `VDXC`, versions `min..=max`, a nonce).
pub fn hello_frame(min: u16, max: u16, nonce: [u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(44);
    v.extend_from_slice(&40u32.to_be_bytes());
    v.extend_from_slice(b"VDXC");
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v.extend_from_slice(&nonce);
    v
}

/// The default root of a fuzzing process: a folder of its own under the temporary folder.
pub fn default_root() -> PathBuf {
    std::env::temp_dir().join(format!("vdisk-control-fuzz-{}", std::process::id()))
}
