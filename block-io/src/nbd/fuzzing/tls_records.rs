//! The steps the `tls_records` fuzz target runs on arbitrary bytes, shared with the stable
//! test that replays its corpus (`tests/tls_records_fuzz_corpus.rs`): the TLS 1.3 record
//! layer (`nbd::record`, RFC 8446 section 5) after a real in-memory rustls handshake, taken
//! over the way the NBD client and server take it (`ready_for_hand_off`, then rustls'
//! `dangerous_extract_secrets`), reading what the input makes arrive from the socket.
//!
//! Input layout: three header bytes, then the body.
//! - byte 0, flags: bits 0-1 the suite (0 and 3 AES-256-GCM, 1 AES-128-GCM, 2
//!   ChaCha20-Poly1305); [`FLAG_CLIENT`] the record layer is the client's (else the
//!   server's; the other end is the peer); bits 4-5 the session tickets the server sends
//!   ([`TICKETS_SHIFT`]; with [`FLAG_CLIENT`] and at least one, the handshake is bare and
//!   the tickets, sealed by rustls, reach the record layer); [`FLAG_AHEAD`] those tickets
//!   were read ahead (handed over with the keys) instead of arriving first on the socket;
//!   [`FLAG_SEALED`] the body describes records; [`FLAG_WRITE`] the record layer also
//!   writes (byte 2), and the peer opens what it sent;
//! - byte 1, the I/O shape: the low four bits choose the sizes the socket delivers at once
//!   (each delivery after a `Pending`), the high four the sizes of the caller's reads;
//! - byte 2, the writes: 1 + (bits 0-1) writes, sizes from bits 2-3, written in place
//!   (`write_sealed`) where bit 4 + i is set, then a shutdown;
//! - without [`FLAG_SEALED`], the body is the socket's bytes as they are;
//! - with it, the peer seals records with its real keys: a count byte (up to
//!   [`MAX_RECORDS`]), an edit count byte (up to [`MAX_EDITS`]), the edits (3 bytes of
//!   position, 1 byte xor-ed there), 3 bytes of how many bytes are cut off the end, then per
//!   record a spec byte (kind in bits 0-2, see [`record`]; padding of 8 zeros per unit of
//!   bits 3-7), two bytes of length (little endian, modulo 2^14 + 2) and the bytes some
//!   kinds take. The edits and the cut apply to the sealed records.
//!
//! [`tls_records`] checks, besides that nothing panics or hangs: every outcome is bytes read
//! and then a clean end or an `io::Error`; raw bytes never read back as data; bytes read are
//! always a prefix of the application data the peer sealed; unaltered records give exactly
//! what a model of RFC 8446 5.2-5.4 and the record layer's rules expects (data up to
//! `close_notify`; padding stripped; tickets skipped; `KeyUpdate`, other alerts, other
//! types, oversized and empty inner plaintexts refused); and everything written opens in
//! the peer as the same bytes, then `close_notify`. A broken rule panics.

// A harness: a broken rule must panic, as that is what the fuzzer reports. Nothing on the
// serving path calls into this module.
#![allow(clippy::panic, clippy::expect_used)]

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use ring::aead::{Aad, LessSafeKey, UnboundKey};
use rustls::crypto::cipher::{make_tls13_aad, Iv, Nonce};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, ConnectionTrafficSecrets, RootCertStore,
    ServerConfig, ServerConnection,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::nbd::record::{ready_for_hand_off, RecordStream};

/// Flag bit: the record layer is the client's.
pub const FLAG_CLIENT: u8 = 4;
/// Flag bit: the body describes records the peer seals.
pub const FLAG_SEALED: u8 = 8;
/// Shift of the two bits of session tickets the server sends.
pub const TICKETS_SHIFT: u8 = 4;
/// Flag bit: the peer's records sent before the hand-off are read ahead.
pub const FLAG_AHEAD: u8 = 0x40;
/// Flag bit: the record layer writes too.
pub const FLAG_WRITE: u8 = 0x80;
/// Most records one input seals.
pub const MAX_RECORDS: usize = 32;
/// Most edits of the sealed records.
pub const MAX_EDITS: usize = 8;

/// The self-signed certificate (for `localhost`) and its PKCS#8 key, made by the ignored
/// test `regenerate_certificate` in `tests/tls_records_fuzz_corpus.rs`.
pub const CERT_DER: &[u8] = include_bytes!("tls_records_cert.der");
/// See [`CERT_DER`].
pub const KEY_DER: &[u8] = include_bytes!("tls_records_key.der");

/// Record kinds (bits 0-2 of a spec byte): what the peer seals.
pub mod record {
    /// Application data, bytes made from the spec byte and the length.
    pub const DATA: u8 = 0;
    /// An alert of `length % 4` bytes taken from the input (`[1, 0]` is `close_notify`).
    pub const ALERT: u8 = 3;
    /// A handshake record of `length % 64` bytes taken from the input.
    pub const HANDSHAKE: u8 = 4;
    /// Inner content type from the next input byte, then `length % 64` bytes of it.
    pub const TYPED: u8 = 5;
    /// A well-formed NewSessionTicket of `length % 200` bytes.
    pub const TICKET: u8 = 6;
    /// A KeyUpdate (its request byte from the input).
    pub const KEY_UPDATE: u8 = 7;
}

/// Plaintext in one record at most (RFC 8446 5.1: 2^14).
const MAX_FRAGMENT: usize = 1 << 14;
/// Ciphertext in one record at most (5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
const TAG: usize = 16;
/// Sizes the socket delivers at once (`usize::MAX`: all that is left).
const DELIVERIES: [usize; 16] = [
    usize::MAX,
    1,
    2,
    5,
    7,
    16,
    100,
    300,
    4096,
    16384,
    16389,
    16650,
    65536,
    3,
    21,
    usize::MAX,
];
/// Sizes of the caller's reads.
const READS: [usize; 16] = [
    65536, 1, 2, 3, 16, 100, 4096, 16383, 16384, 16385, 32768, 200_000, 7, 1000, 5, 65536,
];
/// Sizes of the record layer's writes.
const WRITES: [usize; 4] = [1, 16385, 100_000, 0];
/// Polls of one operation before it counts as hung (each poll of the in-memory ends makes
/// progress or wakes at once).
const MAX_POLLS: usize = 1 << 24;

/// How a read ended.
#[derive(Debug)]
pub struct Outcome {
    /// Every byte read, in order.
    pub read: Vec<u8>,
    /// A clean end (`close_notify`), or the error the read ended with.
    pub end: io::Result<()>,
    /// The records were sealed unaltered, and the model's expectation was checked.
    pub modelled: bool,
}

/// Bytes of the input, zeros once it is used up.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> usize {
        usize::from(self.byte()) | usize::from(self.byte()) << 8
    }
    fn u24(&mut self) -> usize {
        self.u16() | usize::from(self.byte()) << 16
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

/// Runs one input (see the module docs for the layout and the checks).
pub fn tls_records(data: &[u8]) -> Outcome {
    let mut c = Cursor(data);
    let (flags, shape, writes) = (c.byte(), c.byte(), c.byte());
    let client_side = flags & FLAG_CLIENT != 0;
    let tickets = usize::from((flags >> TICKETS_SHIFT) & 3);
    let mut pair = Pair::handshake(flags & 3, tickets, client_side);

    let peer_tx = pair.peer.tx.take().expect("the peer's sending keys");
    let mut sealer = Sealer::new(peer_tx);
    let (socket, model) = if flags & FLAG_SEALED != 0 {
        let (sealed, model) = sealed_records(&mut c, &mut sealer);
        (sealed, Some(model))
    } else {
        (c.0.to_vec(), None)
    };
    let (ahead, socket) = if flags & FLAG_AHEAD != 0 {
        (pair.pending.clone(), socket)
    } else {
        let mut s = pair.pending.clone();
        s.extend_from_slice(&socket);
        (Vec::new(), s)
    };
    let deliveries = cycle(&DELIVERIES, shape & 15);
    let reader = Socket {
        data: socket,
        at: 0,
        pace: Pace::new(deliveries.clone()),
    };
    let sent = Rc::new(RefCell::new(Vec::new()));
    let writer = Sink {
        out: sent.clone(),
        pace: Pace::new(deliveries),
    };
    let stream = RecordStream::hand_off(reader, writer, &ahead, pair.secrets, pair.suite)
        .expect("the keys of a finished TLS 1.3 handshake are taken over");
    let (mut r, mut w) = stream.into_halves();

    let outcome = read_all(&mut r, &cycle(&READS, shape >> 4));
    let modelled = match model {
        None => {
            if !outcome.0.is_empty() {
                panic!("raw bytes read back as data");
            }
            false
        }
        Some(m) => m.check(&outcome.0, &outcome.1),
    };
    if flags & FLAG_WRITE != 0 {
        let rx = pair.peer.rx.take().expect("the peer's receiving keys");
        write_and_open(&mut w, writes, rx, &sent);
    }
    Outcome {
        read: outcome.0,
        end: outcome.1,
        modelled,
    }
}

fn cycle(sizes: &[usize; 16], from: u8) -> Vec<usize> {
    (0..sizes.len())
        .map(|i| sizes[(usize::from(from) + i) % sizes.len()])
        .collect()
}

/// Polls `f` to its end; the in-memory ends wake at once, so it is never left waiting.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("no progress after {MAX_POLLS} polls");
}

/// Reads until a clean end or an error, in reads of `sizes` (cycled).
fn read_all(r: &mut (impl AsyncRead + Unpin), sizes: &[usize]) -> (Vec<u8>, io::Result<()>) {
    let mut read = Vec::new();
    let mut buf = vec![0u8; READS.iter().copied().max().unwrap_or(1)];
    for n in sizes.iter().cycle() {
        let mut rb = ReadBuf::new(&mut buf[..*n]);
        let got = block_on(std::future::poll_fn(|cx| {
            Pin::new(&mut *r).poll_read(cx, &mut rb)
        }));
        match got {
            Err(e) => {
                // An error stays: the next read ends the same way, with no bytes.
                let mut rb = ReadBuf::new(&mut buf);
                let again = block_on(std::future::poll_fn(|cx| {
                    Pin::new(&mut *r).poll_read(cx, &mut rb)
                }));
                match again {
                    Err(a) if a.kind() == e.kind() && rb.filled().is_empty() => {}
                    other => panic!("read {other:?} after the error {e}"),
                }
                return (read, Err(e));
            }
            Ok(()) if rb.filled().is_empty() => return (read, Ok(())),
            Ok(()) => read.extend_from_slice(rb.filled()),
        }
    }
    unreachable!("a cycle of sizes never ends")
}

// ---- the handshake ---------------------------------------------------------------------

/// One end's keys, once extracted.
struct Keys {
    tx: Option<(u64, ConnectionTrafficSecrets)>,
    rx: Option<(u64, ConnectionTrafficSecrets)>,
}

/// The two ends after the handshake: the record layer's side ready to be taken over, the
/// peer's keys, and what the peer sent that the record layer's side has not read.
struct Pair {
    secrets: Result<rustls::ExtractedSecrets, rustls::Error>,
    suite: &'static rustls::Tls13CipherSuite,
    peer: Keys,
    pending: Vec<u8>,
}

fn configs() -> &'static (ServerConfig, [Arc<ClientConfig>; 3]) {
    static CONFIGS: OnceLock<(ServerConfig, [Arc<ClientConfig>; 3])> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let cert = CertificateDer::from(CERT_DER.to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KEY_DER.to_vec()));
        let ring = rustls::crypto::ring::default_provider();
        let mut s = ServerConfig::builder_with_provider(Arc::new(ring.clone()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring speaks TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("the fixed certificate and key match");
        s.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("the fixed certificate parses");
        let client = |suite: rustls::SupportedCipherSuite| {
            let p = rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..ring.clone()
            };
            let mut c = ClientConfig::builder_with_provider(Arc::new(p))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("ring speaks TLS 1.3")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.enable_secret_extraction = true;
            Arc::new(c)
        };
        use rustls::crypto::ring::cipher_suite as cs;
        let clients = [
            client(cs::TLS13_AES_256_GCM_SHA384),
            client(cs::TLS13_AES_128_GCM_SHA256),
            client(cs::TLS13_CHACHA20_POLY1305_SHA256),
        ];
        (s, clients)
    })
}

/// Moves what `from` has to send into `to`; returns the bytes.
fn transfer<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) -> Vec<u8> {
    let bytes = flush(from);
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("reads from memory");
        to.process_new_packets()
            .expect("the handshake goes through");
    }
    bytes
}

fn flush<A>(from: &mut ConnectionCommon<A>) -> Vec<u8> {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).expect("writes to memory");
    }
    bytes
}

impl Pair {
    fn handshake(suite: u8, tickets: usize, client_side: bool) -> Pair {
        let (server, clients) = configs();
        let mut sc = server.clone();
        sc.send_tls13_tickets = tickets;
        let cc = clients[usize::from(suite) % clients.len()].clone();
        let name = ServerName::try_from("localhost").expect("a valid name");
        let mut c = ClientConnection::new(cc, name).expect("a client");
        let mut s = ServerConnection::new(Arc::new(sc)).expect("a server");
        // ClientHello; ServerHello to Finished; the client's Finished.
        transfer(&mut c, &mut s);
        transfer(&mut s, &mut c);
        transfer(&mut c, &mut s);
        let mut pending = Vec::new();
        if client_side && tickets > 0 {
            // The client hands off right after its Finished: the tickets are the peer's.
            pending = flush(&mut s);
        } else {
            transfer(&mut s, &mut c);
            // One round trip of application data through rustls, as the option haggling.
            std::io::Write::write_all(&mut c.writer(), b"hello").expect("buffers");
            transfer(&mut c, &mut s);
            std::io::Write::write_all(&mut s.writer(), b"olleh").expect("buffers");
            transfer(&mut s, &mut c);
            let mut b = [0u8; 10];
            let n = std::io::Read::read(&mut c.reader(), &mut b).expect("the reply");
            assert_eq!(&b[..n], b"olleh", "the round trip");
            let n = std::io::Read::read(&mut s.reader(), &mut b).expect("the request");
            assert_eq!(&b[..n], b"hello", "the round trip");
        }
        let (secrets, suite, peer) = if client_side {
            let suite = ready_for_hand_off(&mut c).expect("the client is ready");
            let peer = s.dangerous_extract_secrets().expect("the server's keys");
            (c.dangerous_extract_secrets(), suite, peer)
        } else {
            let suite = ready_for_hand_off(&mut s).expect("the server is ready");
            let peer = c.dangerous_extract_secrets().expect("the client's keys");
            (s.dangerous_extract_secrets(), suite, peer)
        };
        Pair {
            secrets,
            suite,
            peer: Keys {
                tx: Some(peer.tx),
                rx: Some(peer.rx),
            },
            pending,
        }
    }
}

// ---- the peer's records ----------------------------------------------------------------

/// The peer's AEAD in one direction, with its sequence number (RFC 8446 5.3).
struct Sealer {
    key: LessSafeKey,
    iv: Iv,
    seq: u64,
}

impl Sealer {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Sealer {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&ring::aead::CHACHA20_POLY1305, key, iv)
            }
            _ => panic!("a TLS 1.3 suite of the ring provider"),
        };
        let key = UnboundKey::new(alg, key.as_ref()).expect("the key fits its cipher");
        Sealer {
            key: LessSafeKey::new(key),
            iv,
            seq,
        }
    }

    fn nonce(&mut self) -> ring::aead::Nonce {
        let n = ring::aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, self.seq).0);
        self.seq += 1;
        n
    }

    /// A whole record: header, then `inner` (TLSInnerPlaintext) sealed, then the tag.
    fn seal(&mut self, inner: &[u8]) -> Vec<u8> {
        let ct = inner.len() + TAG;
        // The length field is 16 bits: the specs never ask for more.
        let aad = make_tls13_aad(ct);
        let mut rec = aad.to_vec();
        rec.extend_from_slice(inner);
        let nonce = self.nonce();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut rec[aad.len()..])
            .expect("seals");
        rec.extend_from_slice(tag.as_ref());
        rec
    }

    /// Opens the record at the start of `stream`: (inner content type, content, length).
    fn open(&mut self, stream: &mut [u8]) -> (u8, Vec<u8>, usize) {
        assert!(stream.len() >= 5, "a record header");
        assert_eq!(&stream[..3], &[23, 3, 3], "an application_data record");
        let len = usize::from(u16::from_be_bytes([stream[3], stream[4]]));
        assert!(
            len <= MAX_CIPHERTEXT,
            "a record of at most 2^14 + 256 bytes"
        );
        assert!(stream.len() >= 5 + len, "a whole record");
        let nonce = self.nonce();
        let inner = self
            .key
            .open_in_place(
                nonce,
                Aad::from(make_tls13_aad(len)),
                &mut stream[5..5 + len],
            )
            .expect("a record the peer can open");
        let end = inner.iter().rposition(|b| *b != 0).expect("a content type");
        (inner[end], inner[..end].to_vec(), 5 + len)
    }
}

/// What the unaltered records must read as.
struct Model {
    data: Vec<u8>,
    end: End,
    altered: bool,
}

/// How the model ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Eof,
    Refused,
}

impl Model {
    /// Checks a read against the model; true when the records were unaltered.
    fn check(&self, read: &[u8], end: &io::Result<()>) -> bool {
        if !self.data.starts_with(read) {
            panic!("read bytes the peer did not seal in that order");
        }
        if !self.altered {
            if read != self.data {
                panic!(
                    "read {} bytes of the {} sealed (ended {end:?}, expected {:?})",
                    read.len(),
                    self.data.len(),
                    self.end
                );
            }
            let kind = end.as_ref().map_err(io::Error::kind);
            let ok = match self.end {
                End::Closed => kind.is_ok(),
                End::Eof => kind == Err(io::ErrorKind::UnexpectedEof),
                End::Refused => kind == Err(io::ErrorKind::InvalidData),
            };
            if !ok {
                panic!("ended {end:?}, expected {:?}", self.end);
            }
        } else if end.is_ok() && (self.end != End::Closed || read != self.data) {
            panic!("altered records ended cleanly");
        }
        !self.altered
    }

    /// What the record layer does with one unaltered record (RFC 8446 5.2-5.4): `None` to
    /// go on.
    fn record(&mut self, inner: &[u8]) -> Option<End> {
        // 5.4: the inner plaintext is at most 2^14 + 1 bytes; 5.2: the ciphertext at most
        // 2^14 + 256.
        if inner.len() > MAX_FRAGMENT + 1 || inner.len() + TAG > MAX_CIPHERTEXT {
            return Some(End::Refused);
        }
        // 5.4: the content type is the last non-zero byte.
        let Some(at) = inner.iter().rposition(|b| *b != 0) else {
            return Some(End::Refused);
        };
        let content = &inner[..at];
        match inner[at] {
            23 => {
                self.data.extend_from_slice(content);
                None
            }
            // close_notify is (level, 0); other alerts end the connection.
            21 if content.get(1) == Some(&0) => Some(End::Closed),
            22 => {
                // NewSessionTicket messages are skipped; anything else is refused.
                let mut m = content;
                while !m.is_empty() {
                    if m.len() < 4 || m[0] != 4 {
                        return Some(End::Refused);
                    }
                    let len = usize::from(m[1]) << 16 | usize::from(m[2]) << 8 | usize::from(m[3]);
                    if m.len() - 4 < len {
                        return Some(End::Refused);
                    }
                    m = &m[4 + len..];
                }
                None
            }
            _ => Some(End::Refused),
        }
    }
}

/// The records the body describes, sealed, edited and cut, and the model of their reading.
fn sealed_records(c: &mut Cursor<'_>, sealer: &mut Sealer) -> (Vec<u8>, Model) {
    let records = usize::from(c.byte()) % (MAX_RECORDS + 1);
    let edits: Vec<(usize, u8)> = (0..usize::from(c.byte()) % (MAX_EDITS + 1))
        .map(|_| (c.u24(), c.byte()))
        .collect();
    let cut = c.u24();
    let mut model = Model {
        data: Vec::new(),
        end: End::Eof,
        altered: false,
    };
    let mut ended = false;
    let mut stream = Vec::new();
    for i in 0..records {
        let spec = c.byte();
        let len = c.u16() % (MAX_FRAGMENT + 2);
        let pad = usize::from(spec >> 3) * 8;
        let mut inner = match spec & 7 {
            record::ALERT => {
                let mut a = c.take(len % 4);
                a.push(21);
                a
            }
            record::HANDSHAKE => {
                let mut h = c.take(len % 64);
                h.push(22);
                h
            }
            record::TYPED => {
                let typ = c.byte();
                let mut t = c.take(len % 64);
                t.push(typ);
                t
            }
            record::TICKET => {
                let n = len % 200;
                let mut t = vec![4, 0, (n >> 8) as u8, n as u8];
                t.extend((0..n).map(|j| (j as u8) ^ spec));
                t.push(22);
                t
            }
            record::KEY_UPDATE => vec![24, 0, 0, 1, c.byte() & 1, 22],
            _ => {
                let mut d: Vec<u8> = (0..len)
                    .map(|j| (j as u8).wrapping_mul(31) ^ spec ^ i as u8)
                    .collect();
                d.push(23);
                d
            }
        };
        inner.resize(inner.len() + pad, 0);
        if !ended {
            if let Some(end) = model.record(&inner) {
                model.end = end;
                ended = true;
            }
        }
        stream.extend_from_slice(&sealer.seal(&inner));
    }
    let original = stream.clone();
    if !stream.is_empty() {
        let n = stream.len();
        for (at, x) in edits {
            stream[at % n] ^= x;
        }
        stream.truncate(n - cut.min(n));
    }
    model.altered = stream != original;
    (stream, model)
}

// ---- the record layer's writes ---------------------------------------------------------

/// Writes as byte 2 says, shuts down, and opens what went out with the peer's keys.
fn write_and_open(
    w: &mut crate::nbd::record::RecordWriter<Sink>,
    shape: u8,
    rx: (u64, ConnectionTrafficSecrets),
    out: &RefCell<Vec<u8>>,
) {
    use tokio::io::AsyncWriteExt;
    let mut sent = Vec::new();
    for i in 0..1 + usize::from(shape & 3) {
        let n = WRITES[(usize::from(shape >> 2) + i) % WRITES.len()];
        let mut d: Vec<u8> = (0..n)
            .map(|j| (j as u8).wrapping_mul(7) ^ i as u8)
            .collect();
        sent.extend_from_slice(&d);
        if shape & (0x10 << i) != 0 {
            block_on(w.write_sealed(&mut d)).expect("memory takes a sealed write");
        } else {
            block_on(w.write_all(&d)).expect("memory takes a write");
        }
    }
    block_on(w.shutdown()).expect("memory takes the close");
    let mut peer = Sealer::new(rx);
    let mut out = out.take();
    let mut at = 0;
    let mut got = Vec::new();
    loop {
        let (typ, content, len) = peer.open(&mut out[at..]);
        at += len;
        match typ {
            23 => {
                assert!(content.len() <= MAX_FRAGMENT, "a record of at most 2^14");
                got.extend_from_slice(&content);
            }
            21 => {
                assert_eq!(content, [1, 0], "close_notify");
                break;
            }
            t => panic!("the record layer sent content type {t}"),
        }
    }
    assert_eq!(at, out.len(), "nothing after close_notify");
    assert!(got == sent, "the peer read what was written");
}

// ---- the in-memory socket --------------------------------------------------------------

/// How a fake socket moves bytes: in `sizes` (cycled), each turn after a `Pending`.
#[derive(Debug)]
struct Pace {
    sizes: Vec<usize>,
    turn: usize,
    ready: bool,
}

impl Pace {
    fn new(sizes: Vec<usize>) -> Pace {
        Pace {
            sizes,
            turn: 0,
            ready: false,
        }
    }

    /// `None` (after waking the task) on every other call; else the most bytes this turn
    /// may move.
    fn next(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return None;
        }
        self.ready = false;
        let size = self
            .sizes
            .get(self.turn % self.sizes.len().max(1))
            .copied()
            .unwrap_or(usize::MAX);
        self.turn += 1;
        Some(size)
    }
}

/// The socket's incoming bytes, delivered as `pace` says.
#[derive(Debug)]
struct Socket {
    data: Vec<u8>,
    at: usize,
    pace: Pace,
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(size) = this.pace.next(cx) else {
            return Poll::Pending;
        };
        let n = size.min(buf.remaining()).min(this.data.len() - this.at);
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// The socket's outgoing bytes, taken as `pace` says.
#[derive(Debug)]
struct Sink {
    out: Rc<RefCell<Vec<u8>>>,
    pace: Pace,
}

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(size) = this.pace.next(cx) else {
            return Poll::Pending;
        };
        let n = size.min(data.len());
        this.out.borrow_mut().extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
