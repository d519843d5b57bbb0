//! The control channel between the initiator and a provider: framing, the authenticated
//! session, and the messages (see the [module docs](super) for the message table).
//!
//! Authentication: each provider has a 32-byte control key ([`ControlKey`]) that its
//! initiators share. A session starts with two unauthenticated hellos carrying each side's
//! supported versions and a fresh 32-byte nonce; both sides then derive the session key
//! `HMAC-SHA256(control key, "vdisk offload control\0" || version || client nonce || server
//! nonce)`. Every later frame is `seq (u64 BE) || JSON || tag`, tag = `HMAC-SHA256(session
//! key, direction || seq || JSON)` with direction `C` (initiator to provider) or `S`, and
//! seq counting from 0 in each direction. A frame whose tag does not verify (constant time)
//! or whose seq is not the next one ends the session before its JSON is parsed. Fresh
//! nonces make recorded frames useless in another session, the seq makes them useless out
//! of order, the direction byte stops reflection. The channel is not encrypted: it carries
//! no secret (providers generate their TLS keys and send only public keys; a token is bound
//! to its audience, the destination of this transfer, and useless to anyone else).

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use uuid::Uuid;

use super::ca::Role;
use super::TransferError;
use crate::hex;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The control protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest control frame (bytes after the length).
pub const MAX_FRAME: usize = 1 << 20;
/// Length of a control key.
pub const CONTROL_KEY_LEN: usize = 32;

const CLIENT_MAGIC: &[u8; 4] = b"VDXC";
const SERVER_MAGIC: &[u8; 4] = b"VDXS";
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
const HELLO_LEN: usize = 4 + 2 + 2 + NONCE_LEN;

/// A provider's control key, shared with the initiators it trusts.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlKey([u8; CONTROL_KEY_LEN]);

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlKey(..)")
    }
}

impl ControlKey {
    /// A random key.
    pub fn generate() -> Self {
        let mut k = [0u8; CONTROL_KEY_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
        ControlKey(k)
    }

    /// A key from its bytes.
    pub const fn from_bytes(bytes: [u8; CONTROL_KEY_LEN]) -> Self {
        ControlKey(bytes)
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// A key from 64 hex digits (whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let b = hex::decode(text)?;
        <[u8; CONTROL_KEY_LEN]>::try_from(b.as_slice())
            .ok()
            .map(ControlKey)
    }

    /// Reads a key file (64 hex digits).
    pub fn load(path: &Path) -> Result<Self, TransferError> {
        let text = std::fs::read_to_string(path)?;
        Self::from_hex(&text).ok_or_else(|| {
            TransferError::Invalid(format!(
                "{} does not hold a control key (64 hex digits)",
                path.display()
            ))
        })
    }

    /// Writes the key to a new file, mode 0600; fails (`AlreadyExists`) if the file exists.
    /// The file appears whole: written beside it, synced, then linked into place.
    pub fn save_new(&self, path: &Path) -> Result<(), TransferError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".tmp{}", std::process::id()));
        let tmp = std::path::PathBuf::from(name);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{}\n", self.to_hex()).as_bytes())?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        Ok(written?)
    }
}

/// Bytes read and written on a stream, counted as they cross it.
#[derive(Debug, Default)]
pub struct ByteCounter {
    read: AtomicU64,
    written: AtomicU64,
}

impl ByteCounter {
    /// Bytes read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Both directions.
    pub fn total(&self) -> u64 {
        self.read() + self.written()
    }

    /// Counts `n` bytes read (for streams not wrapped in [`Counted`]).
    pub fn add_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` bytes written.
    pub fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }
}

/// A stream whose every byte in and out is counted.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counter: Arc<ByteCounter>,
}

impl<S> Counted<S> {
    /// Counts `inner`'s bytes into `counter`.
    pub fn new(inner: S, counter: Arc<ByteCounter>) -> Self {
        Counted { inner, counter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.counter.add_read(n as u64);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counter.add_written(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An authenticated control session over a stream.
#[derive(Debug)]
pub struct Session<S> {
    stream: S,
    key: [u8; 32],
    send_seq: u64,
    recv_seq: u64,
    me: u8,
    peer: u8,
}

fn hello(magic: &[u8; 4], min: u16, max: u16, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(magic);
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b.extend_from_slice(nonce);
    b
}

/// (min, max, nonce) of a peer's hello.
fn parse_hello(magic: &[u8; 4], b: &[u8]) -> Result<(u16, u16, [u8; NONCE_LEN]), TransferError> {
    if b.len() != HELLO_LEN || &b[..4] != magic {
        return Err(TransferError::Protocol("not a vdisk control hello".into()));
    }
    let min = u16::from_be_bytes([b[4], b[5]]);
    let max = u16::from_be_bytes([b[6], b[7]]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[8..]);
    Ok((min, max, nonce))
}

fn mac(key: &[u8]) -> Result<HmacSha256, TransferError> {
    <HmacSha256 as KeyInit>::new_from_slice(key)
        .map_err(|_| TransferError::Protocol("bad HMAC key length".into()))
}

fn session_key(
    psk: &ControlKey,
    version: u16,
    cnonce: &[u8; NONCE_LEN],
    snonce: &[u8; NONCE_LEN],
) -> Result<[u8; 32], TransferError> {
    let mut m = mac(&psk.0)?;
    m.update(b"vdisk offload control\0");
    m.update(&version.to_be_bytes());
    m.update(cnonce);
    m.update(snonce);
    let mut k = [0u8; 32];
    k.copy_from_slice(&m.finalize().into_bytes());
    Ok(k)
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Vec<u8>>, TransferError> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(TransferError::Protocol(format!(
            "control frame of {n} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await?;
    Ok(Some(b))
}

async fn write_frame<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> Result<(), TransferError> {
    let n = u32::try_from(b.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| TransferError::Protocol("control frame too large".into()))?;
    let mut out = Vec::with_capacity(4 + b.len());
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut n);
    n
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The initiator's side: hellos, then the session key. The provider is authenticated
    /// by the tag of its first reply.
    pub async fn client(mut stream: S, psk: &ControlKey) -> Result<Self, TransferError> {
        let cnonce = nonce();
        write_frame(
            &mut stream,
            &hello(CLIENT_MAGIC, PROTOCOL_VERSION, PROTOCOL_VERSION, &cnonce),
        )
        .await?;
        let b = read_frame(&mut stream)
            .await?
            .ok_or_else(|| TransferError::Protocol("the provider closed the connection".into()))?;
        let (v, _, snonce) = parse_hello(SERVER_MAGIC, &b)?;
        if v != PROTOCOL_VERSION {
            return Err(TransferError::Version {
                ours: PROTOCOL_VERSION,
                theirs: v,
            });
        }
        Ok(Session {
            stream,
            key: session_key(psk, v, &cnonce, &snonce)?,
            send_seq: 0,
            recv_seq: 0,
            me: b'C',
            peer: b'S',
        })
    }

    /// The provider's side: answers the hello with the version chosen (0 when there is no
    /// common one, then fails).
    pub async fn server(mut stream: S, psk: &ControlKey) -> Result<Self, TransferError> {
        let b = read_frame(&mut stream)
            .await?
            .ok_or_else(|| TransferError::Protocol("the initiator closed the connection".into()))?;
        let (min, max, cnonce) = parse_hello(CLIENT_MAGIC, &b)?;
        let snonce = nonce();
        let common = (min..=max).contains(&PROTOCOL_VERSION);
        let v = if common { PROTOCOL_VERSION } else { 0 };
        write_frame(&mut stream, &hello(SERVER_MAGIC, v, v, &snonce)).await?;
        if !common {
            return Err(TransferError::Version {
                ours: PROTOCOL_VERSION,
                theirs: max,
            });
        }
        Ok(Session {
            stream,
            key: session_key(psk, v, &cnonce, &snonce)?,
            send_seq: 0,
            recv_seq: 0,
            me: b'S',
            peer: b'C',
        })
    }

    fn tag(&self, dir: u8, seq: u64, body: &[u8]) -> Result<HmacSha256, TransferError> {
        let mut m = mac(&self.key)?;
        m.update(&[dir]);
        m.update(&seq.to_be_bytes());
        m.update(body);
        Ok(m)
    }

    /// Sends one message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), TransferError> {
        let body = serde_json::to_vec(msg).map_err(|e| TransferError::Protocol(e.to_string()))?;
        self.send_raw(&body).await
    }

    /// Sends `body` as one authenticated frame, whatever it holds (the fuzzing entry sends
    /// bytes that need not be a message).
    pub(crate) async fn send_raw(&mut self, body: &[u8]) -> Result<(), TransferError> {
        let tag = self
            .tag(self.me, self.send_seq, body)?
            .finalize()
            .into_bytes();
        let mut frame = Vec::with_capacity(8 + body.len() + TAG_LEN);
        frame.extend_from_slice(&self.send_seq.to_be_bytes());
        frame.extend_from_slice(body);
        frame.extend_from_slice(&tag);
        self.send_seq += 1;
        write_frame(&mut self.stream, &frame).await
    }

    /// Receives one message; `None` when the peer closed the connection between messages.
    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, TransferError> {
        let Some(frame) = read_frame(&mut self.stream).await? else {
            return Ok(None);
        };
        if frame.len() < 8 + TAG_LEN {
            return Err(TransferError::Auth);
        }
        let (head, tag) = frame.split_at(frame.len() - TAG_LEN);
        let (seq, body) = head.split_at(8);
        let mut s = [0u8; 8];
        s.copy_from_slice(seq);
        let seq = u64::from_be_bytes(s);
        self.tag(self.peer, seq, body)?
            .verify_slice(tag)
            .map_err(|_| TransferError::Auth)?;
        if seq != self.recv_seq {
            return Err(TransferError::Auth);
        }
        self.recv_seq += 1;
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| TransferError::Protocol(format!("bad message: {e}")))
    }
}

/// Where D pulls a token's range from: S's NBD-over-TLS export.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceEndpoint {
    /// Host or IP address of S (as the initiator reached it).
    pub host: String,
    /// TCP port of the export.
    pub port: u16,
    /// Export name.
    pub export: String,
}

impl SourceEndpoint {
    /// The `nbds://` URL of the export (IPv6 hosts in brackets).
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("nbds://{}:{}/{}", host, self.port, self.export)
    }
}

/// A request from the initiator (version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Size and sector size of an image under the provider's root.
    Info {
        /// Path relative to the root.
        path: String,
    },
    /// Join a transfer in a role, trusting the transfer CA; the provider answers with a
    /// fresh public key.
    Trust {
        /// Transfer id.
        transfer: Uuid,
        /// This provider's role.
        role: Role,
        /// The transfer CA certificate, DER in hex.
        ca: String,
    },
    /// Install the certificate the initiator issued over that key.
    Certify {
        /// Transfer id.
        transfer: Uuid,
        /// Role it was issued for.
        role: Role,
        /// The certificate, DER in hex.
        cert: String,
    },
    /// Offload read at S.
    Mint {
        /// Transfer id.
        transfer: Uuid,
        /// Source image, relative to the root.
        path: String,
        /// Byte offset (whole sectors).
        offset: u64,
        /// Bytes asked (whole sectors).
        length: u64,
        /// Inactivity TTL in ms (0: the provider's default).
        ttl_ms: u64,
    },
    /// Offload write at D.
    Redeem {
        /// Transfer id.
        transfer: Uuid,
        /// Destination image, relative to the root.
        path: String,
        /// Destination byte offset (whole sectors).
        offset: u64,
        /// Bytes asked (whole sectors).
        length: u64,
        /// The 512-byte token, hex.
        token: String,
        /// Offset into the token's range.
        token_offset: u64,
        /// Where the token's data is served (absent for the zero-data token).
        source: Option<SourceEndpoint>,
    },
    /// A transfer's counters.
    Status {
        /// Transfer id.
        transfer: Uuid,
        /// Role.
        role: Role,
    },
    /// Stop a transfer now: revoke its tokens, stop its exports, fail its redeems.
    Cancel {
        /// Transfer id.
        transfer: Uuid,
        /// Role.
        role: Role,
    },
    /// End a transfer: flush its destinations, revoke its tokens, stop its exports.
    Close {
        /// Transfer id.
        transfer: Uuid,
        /// Role.
        role: Role,
    },
}

/// A transfer's counters, as `status` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    /// The role.
    pub role: Option<Role>,
    /// Whether a certificate is installed.
    pub certified: bool,
    /// Whether the transfer was cancelled.
    pub cancelled: bool,
    /// Tokens minted (S).
    pub tokens: u64,
    /// Bytes S's exports served.
    pub bytes_served: u64,
    /// Bytes D wrote from tokens (data and zeros).
    pub bytes_written: u64,
}

/// A provider's answer (version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase", deny_unknown_fields)]
pub enum Reply {
    /// To `info`.
    Info {
        /// Virtual size in bytes.
        virtual_size: u64,
        /// Logical sector size.
        sector_size: u32,
        /// Format name.
        format: String,
    },
    /// To `trust`: the provider's fresh Ed25519 public key, hex.
    Trusted {
        /// 32 bytes, hex.
        public_key: String,
    },
    /// To `certify`.
    Certified,
    /// To `mint`.
    Minted {
        /// The 512-byte token, hex.
        token: String,
        /// Bytes it covers from the asked offset.
        transfer_length: u64,
        /// MS-FSCC flags (1: the rest of the asked range reads as zeros).
        flags: u32,
        /// The export serving it (absent for the zero-data token).
        port: Option<u16>,
        /// Its name.
        export: Option<String>,
    },
    /// To `redeem`.
    Redeemed {
        /// Bytes written (may be fewer than asked).
        written: u64,
    },
    /// To `status`.
    Status(TransferStatus),
    /// To `cancel`.
    Cancelled {
        /// Tokens revoked.
        revoked: u64,
    },
    /// To `close`.
    Closed,
    /// Any request that failed.
    Error {
        /// A short stable code (see the module docs).
        code: String,
        /// What went wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn pair(
        ck: &ControlKey,
        sk: &ControlKey,
    ) -> (
        Result<Session<DuplexStream>, TransferError>,
        Result<Session<DuplexStream>, TransferError>,
    ) {
        let (a, b) = duplex(1 << 16);
        tokio::join!(Session::client(a, ck), Session::server(b, sk))
    }

    fn req() -> Request {
        Request::Info {
            path: "a.vhdx".into(),
        }
    }

    #[test]
    fn a_key_file_is_created_once_private_and_loads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.key");
        let k = ControlKey::generate();
        k.save_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        match ControlKey::generate().save_new(&path) {
            Err(TransferError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists)
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(ControlKey::load(&path).unwrap(), k);
        // Nothing but the key file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn messages_round_trip_in_both_directions() {
        rt().block_on(async {
            let k = ControlKey::generate();
            let (c, s) = pair(&k, &k).await;
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            for _ in 0..3 {
                c.send(&req()).await.unwrap();
                assert_eq!(s.recv::<Request>().await.unwrap(), Some(req()));
                s.send(&Reply::Certified).await.unwrap();
                assert_eq!(c.recv::<Reply>().await.unwrap(), Some(Reply::Certified));
            }
            drop(c);
            assert!(s.recv::<Request>().await.unwrap().is_none());
        });
    }

    #[test]
    fn a_wrong_key_fails_authentication() {
        rt().block_on(async {
            let (c, s) = pair(&ControlKey::generate(), &ControlKey::generate()).await;
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            c.send(&req()).await.unwrap();
            assert!(matches!(
                s.recv::<Request>().await,
                Err(TransferError::Auth)
            ));
        });
    }

    /// A session of `role` over a fresh pipe with `key` as its session key, and the pipe's
    /// other end.
    fn raw_session(key: [u8; 32], me: u8, peer: u8) -> (Session<DuplexStream>, DuplexStream) {
        let (a, b) = duplex(1 << 16);
        let s = Session {
            stream: a,
            key,
            send_seq: 0,
            recv_seq: 0,
            me,
            peer,
        };
        (s, b)
    }

    /// What a server session says to `frames` fed to it in order.
    async fn feed(key: [u8; 32], frames: &[Vec<u8>], me: u8, peer: u8) -> Vec<bool> {
        let (mut s, mut w) = raw_session(key, me, peer);
        let mut out = Vec::new();
        for f in frames {
            write_frame(&mut w, f).await.unwrap();
            let r = s.recv::<Request>().await;
            out.push(r.is_ok());
            if r.is_err() {
                break;
            }
        }
        out
    }

    #[test]
    fn tampered_replayed_reordered_and_reflected_frames_are_refused() {
        rt().block_on(async {
            let key = [7u8; 32];
            let (mut c, mut wire) = raw_session(key, b'C', b'S');
            c.send(&req()).await.unwrap();
            c.send(&req()).await.unwrap();
            let f0 = read_frame(&mut wire).await.unwrap().unwrap();
            let f1 = read_frame(&mut wire).await.unwrap().unwrap();
            assert_eq!(
                feed(key, &[f0.clone(), f1.clone()], b'S', b'C').await,
                [true, true]
            );
            for pos in 0..f0.len() {
                let mut t = f0.clone();
                t[pos] ^= 0x01;
                assert_eq!(feed(key, &[t], b'S', b'C').await, [false], "byte {pos}");
            }
            // Replayed, out of order, reflected back to the client, under another key.
            assert_eq!(
                feed(key, &[f0.clone(), f0.clone()], b'S', b'C').await,
                [true, false]
            );
            assert_eq!(
                feed(key, std::slice::from_ref(&f1), b'S', b'C').await,
                [false]
            );
            assert_eq!(
                feed(key, std::slice::from_ref(&f0), b'C', b'S').await,
                [false]
            );
            assert_eq!(feed([8u8; 32], &[f0], b'S', b'C').await, [false]);
        });
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        rt().block_on(async {
            let (mut s, mut w) = raw_session([7u8; 32], b'S', b'C');
            w.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
                .await
                .unwrap();
            assert!(matches!(
                s.recv::<Request>().await,
                Err(TransferError::Protocol(_))
            ));
        });
    }

    #[test]
    fn hellos_without_a_common_version_fail() {
        rt().block_on(async {
            let (mut a, b) = duplex(1 << 16);
            let k = ControlKey::generate();
            let server = tokio::spawn(async move { Session::server(b, &k).await.map(|_| ()) });
            write_frame(&mut a, &hello(CLIENT_MAGIC, 7, 9, &[0u8; NONCE_LEN]))
                .await
                .unwrap();
            let back = read_frame(&mut a).await.unwrap().unwrap();
            assert_eq!(&back[4..8], &[0, 0, 0, 0]);
            assert!(matches!(
                server.await.unwrap(),
                Err(TransferError::Version { .. })
            ));
        });
    }
}
