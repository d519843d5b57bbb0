//! TLS 1.3 application data after a rustls handshake, opened where it lands and sealed where
//! it lies (RFC 8446 section 5.2, "Record Payload Protection"): [`RecordStream`], and its
//! halves [`RecordReader`] and [`RecordWriter`].
//!
//! rustls' buffered connection copies every received byte three times on the way to the
//! caller (socket read-ahead into its deframer, the decrypted record into a fresh vector,
//! that vector into the caller's buffer), and every sent byte once into a fresh vector per
//! record. For a connection whose configuration allows it (`enable_secret_extraction`, set
//! by the offload providers), the NBD client and server hand the finished connection over
//! to this stream once the option haggling is over: rustls' own hand-off for kernel TLS
//! (`dangerous_extract_secrets`) gives the traffic keys and sequence numbers.
//!
//! - Reading: the socket is read into one large buffer, each record is opened in place
//!   there by rustls' own record decrypter for the negotiated suite ([`Tls13AeadAlgorithm`]
//!   of the `ring` provider), and its plaintext copied once, into the caller's buffer.
//! - Writing: records are sealed with `ring`'s AEAD for the negotiated suite under rustls'
//!   nonce ([`Nonce::new`]: the IV xor the sequence number) and additional data
//!   ([`make_tls13_aad`]: the record header). A read's reply is sealed in the server's own
//!   payload buffer ([`RecordWriter::write_sealed`]): each 16 KiB fragment in place, the
//!   byte after it lent for the inner content type and given back, and the records go out
//!   with one `writev` of header, ciphertext and tag per record, never copied.
//!
//! What it does not do, as kernel TLS does not: key updates (a `KeyUpdate` from the peer
//! ends the connection with an error; it stops sending at the suite's confidentiality limit,
//! 2^24 records for AES-GCM, so the connection must be made again after 256 GiB) and
//! anything but application data, `close_notify` and session tickets (ignored) after the
//! hand-off. Every record is authenticated by the AEAD with its sequence number, so a lost,
//! reordered, replayed or altered record fails the read instead of giving wrong bytes.
//!
//! [`Tls13AeadAlgorithm`]: rustls::crypto::cipher::Tls13AeadAlgorithm

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ring::aead::{Aad, LessSafeKey, UnboundKey};
use rustls::crypto::cipher::{
    make_tls13_aad, InboundOpaqueMessage, Iv, MessageDecrypter, Nonce, NONCE_LEN,
};
use rustls::{
    ConnectionCommon, ConnectionTrafficSecrets, ContentType, ExtractedSecrets, ProtocolVersion,
    SupportedCipherSuite, Tls13CipherSuite,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Record header: type, legacy version, length (RFC 8446 section 5.1).
const HEADER: usize = 5;
/// Most plaintext in one record (2^14), and most ciphertext (2^14 + 256, section 5.2).
const MAX_FRAGMENT: usize = 1 << 14;
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// The AEAD tag of every TLS 1.3 suite.
const TAG: usize = 16;
/// Outer and inner content types (section 5.1).
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
/// Socket bytes read at once, at most.
const READ_AHEAD: usize = 256 * 1024;
/// Sealed bytes queued before a write waits for the socket.
const SEND_BUFFER: usize = 1 << 20;
/// Slices in one `writev` (under Linux' IOV_MAX of 1024).
const MAX_IOVECS: usize = 1020;
/// Payloads at least this long are worth sealing in place.
pub(crate) const IN_PLACE_MIN: usize = 4 * MAX_FRAGMENT;

fn broken(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("TLS record layer: {what}"),
    )
}

/// The TLS 1.3 suite of `conn` when it may be handed over to a [`RecordStream`] now: its
/// handshake is done, it holds no record to send and no plaintext to read (records already
/// read are processed first), and it speaks TLS 1.3. `None`: keep using rustls.
pub(crate) fn ready_for_hand_off<D>(
    conn: &mut ConnectionCommon<D>,
) -> Option<&'static Tls13CipherSuite> {
    if conn.is_handshaking() || conn.wants_write() {
        return None;
    }
    let state = conn.process_new_packets().ok()?;
    if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
        return None;
    }
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return None;
    }
    match conn.negotiated_cipher_suite()? {
        SupportedCipherSuite::Tls13(s) => Some(s),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The AEAD of `secrets` as `ring` names it, with the key and IV.
fn key_and_iv(
    secrets: ConnectionTrafficSecrets,
) -> io::Result<(
    &'static ring::aead::Algorithm,
    rustls::crypto::cipher::AeadKey,
    Iv,
)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => Ok((&ring::aead::AES_128_GCM, key, iv)),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => Ok((&ring::aead::AES_256_GCM, key, iv)),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            Ok((&ring::aead::CHACHA20_POLY1305, key, iv))
        }
        #[allow(unreachable_patterns)]
        _ => Err(broken("the negotiated cipher is not a TLS 1.3 AEAD")),
    }
}

/// A TLS 1.3 connection after its handshake (see the [module docs](self)): reading through
/// `R`, writing through `W` (the two halves of one socket, or of a split stream).
pub(crate) struct RecordStream<R, W> {
    reader: RecordReader<R>,
    writer: RecordWriter<W>,
}

impl<R, W> std::fmt::Debug for RecordStream<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("rx_seq", &self.reader.seq)
            .field("tx_seq", &self.writer.seq)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> RecordStream<R, W> {
    /// Takes over a connection read through `r` and written through `w` whose keys are
    /// `secrets` (extracted once [`ready_for_hand_off`] gave `suite`); `read_ahead` are bytes
    /// already read that rustls has not seen.
    pub(crate) fn hand_off(
        r: R,
        w: W,
        read_ahead: &[u8],
        secrets: Result<ExtractedSecrets, rustls::Error>,
        suite: &'static Tls13CipherSuite,
    ) -> io::Result<Self> {
        let secrets =
            secrets.map_err(|e| io::Error::other(format!("cannot take the TLS keys over: {e}")))?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (tx_alg, tx_key, tx_iv) = key_and_iv(tx)?;
        let (_, rx_key, rx_iv) = key_and_iv(rx)?;
        let key = UnboundKey::new(tx_alg, tx_key.as_ref())
            .map_err(|_| broken("the sending key does not fit the cipher"))?;
        if key.algorithm().tag_len() != TAG {
            return Err(broken("the cipher's tag is not 16 bytes"));
        }
        let cap = READ_AHEAD.max(read_ahead.len()) + HEADER + MAX_CIPHERTEXT;
        let mut inbuf = vec![0u8; cap];
        inbuf[..read_ahead.len()].copy_from_slice(read_ahead);
        Ok(RecordStream {
            reader: RecordReader {
                io: r,
                rx: suite.aead_alg.decrypter(rx_key, rx_iv),
                seq: rx_seq,
                inbuf,
                start: 0,
                end: read_ahead.len(),
                plain: 0..0,
                closed: false,
                failed: None,
            },
            writer: RecordWriter {
                io: w,
                key: LessSafeKey::new(key),
                iv: tx_iv,
                seq: tx_seq,
                limit: suite.common.confidentiality_limit,
                out: VecDeque::new(),
                sent: 0,
                queued: 0,
                close_queued: false,
            },
        })
    }

    /// The two halves, which share nothing.
    pub(crate) fn into_halves(self) -> (RecordReader<R>, RecordWriter<W>) {
        (self.reader, self.writer)
    }
}

/// The reading half of a [`RecordStream`].
pub(crate) struct RecordReader<R> {
    io: R,
    rx: Box<dyn MessageDecrypter>,
    seq: u64,
    /// Bytes from the socket: `[start, end)` not yet opened.
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Opened plaintext not yet handed out, inside `inbuf`.
    plain: std::ops::Range<usize>,
    /// The peer sent `close_notify`.
    closed: bool,
    /// Why the records cannot be read on: returned by every read after the bytes before it.
    failed: Option<(io::ErrorKind, String)>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// Opens the next whole record in `inbuf`, if there is one: `Ok(true)` when it did.
    fn open_next(&mut self) -> io::Result<bool> {
        let avail = &self.inbuf[self.start..self.end];
        if avail.len() < HEADER {
            return Ok(false);
        }
        // RFC 8446 5.1/5.2: after the handshake every record is application_data, legacy
        // version 0x0303, with at most 2^14 + 256 bytes of ciphertext.
        if avail[0] != APPLICATION_DATA || avail[1] != 3 || avail[2] != 3 {
            return Err(broken("a record that is not TLS 1.3 application data"));
        }
        let len = usize::from(u16::from_be_bytes([avail[3], avail[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(broken("an oversized record"));
        }
        if avail.len() < HEADER + len {
            return Ok(false);
        }
        let body = self.start + HEADER;
        self.start = body + len;
        let base = self.inbuf.as_ptr() as usize;
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut self.inbuf[body..body + len],
        );
        let plain = self
            .rx
            .decrypt(msg, self.seq)
            .map_err(|e| broken(&format!("a record failed to open ({e})")))?;
        self.seq += 1;
        let typ = plain.typ;
        let payload = plain.payload;
        // The plaintext stays where the ciphertext was (rustls opens in place).
        let at = payload.as_ptr() as usize - base;
        let n = payload.len();
        match typ {
            ContentType::ApplicationData => self.plain = at..at + n,
            ContentType::Alert => {
                // close_notify is (warning, 0); any other alert ends the connection.
                if payload.get(1) == Some(&0) {
                    self.closed = true;
                } else {
                    return Err(broken(&format!("the peer sent alert {payload:?}")));
                }
            }
            ContentType::Handshake => {
                // Session tickets are of no use here; anything else (KeyUpdate) is not
                // followed, so the connection cannot go on.
                let mut m = payload;
                while !m.is_empty() {
                    let [kind, a, b, c, rest @ ..] = m else {
                        return Err(broken("a truncated handshake message"));
                    };
                    let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
                    if *kind != 4 || rest.len() < len {
                        return Err(broken(&format!(
                            "handshake message {kind} after the hand-off (key updates are not followed)"
                        )));
                    }
                    m = &rest[len..];
                }
            }
            other => return Err(broken(&format!("unexpected record type {other:?}"))),
        }
        Ok(true)
    }

    /// Makes room for a whole record after the unopened bytes.
    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.inbuf.len() - self.end < HEADER + MAX_CIPHERTEXT {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for RecordReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((kind, why)) = &this.failed {
            return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
        }
        let mut copied = false;
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                let at = this.plain.start;
                buf.put_slice(&this.inbuf[at..at + n]);
                this.plain.start += n;
                copied = true;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            match this.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // The record is consumed (and the sequence number maybe not): the error
                    // stays, and the plaintext opened before it goes out first.
                    this.failed = Some((e.kind(), e.to_string()));
                    return Poll::Ready(if copied { Ok(()) } else { Err(e) });
                }
            }
            if copied {
                return Poll::Ready(Ok(()));
            }
            this.compact();
            let mut rb = ReadBuf::new(&mut this.inbuf[this.end..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // rustls' answer to a peer that leaves without close_notify, as here.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            this.end += n;
        }
    }
}

/// The writing half of a [`RecordStream`].
pub(crate) struct RecordWriter<W> {
    io: W,
    key: LessSafeKey,
    iv: Iv,
    seq: u64,
    /// Records sealed at most under one key.
    limit: u64,
    /// Sealed records waiting for the socket; `sent` bytes of the first are out.
    out: VecDeque<Vec<u8>>,
    sent: usize,
    queued: usize,
    close_queued: bool,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    /// Seals `in_out` (plaintext, then the inner content type) in place as the next record
    /// of `ciphertext_len` bytes; returns the tag.
    fn seal_in_place(&mut self, in_out: &mut [u8]) -> io::Result<ring::aead::Tag> {
        if self.seq >= self.limit {
            return Err(io::Error::other(
                "TLS record layer: the key's record limit is reached (reconnect)",
            ));
        }
        let nonce: [u8; NONCE_LEN] = Nonce::new(&self.iv, self.seq).0;
        let aad = make_tls13_aad(in_out.len() + TAG);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                in_out,
            )
            .map_err(|_| io::Error::other("TLS record layer: cannot seal"))?;
        self.seq += 1;
        Ok(tag)
    }

    /// Seals a copy of `data` (at most one record's worth) of inner type `typ` and queues it.
    fn seal(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        let ct = data.len() + 1 + TAG;
        let mut rec = Vec::with_capacity(HEADER + ct);
        // Section 5.2: the additional data is the record header.
        rec.extend_from_slice(&make_tls13_aad(ct));
        rec.extend_from_slice(data);
        rec.push(typ);
        let tag = self.seal_in_place(&mut rec[HEADER..])?;
        rec.extend_from_slice(tag.as_ref());
        self.queued += rec.len();
        self.out.push_back(rec);
        Ok(())
    }

    /// Writes queued records until none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); 64];
            let mut k = 0;
            for (i, r) in self.out.iter().take(iov.len()).enumerate() {
                iov[i] = IoSlice::new(if i == 0 { &r[self.sent..] } else { r });
                k = i + 1;
            }
            let mut n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= n;
            while n > 0 {
                let left = self.out[0].len() - self.sent;
                if n >= left {
                    n -= left;
                    self.sent = 0;
                    self.out.pop_front();
                } else {
                    self.sent += n;
                    n = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends `data` as application data after everything written before, sealing it where
    /// it lies: `data` holds ciphertext afterwards (its owner refills it whole before any
    /// other use). The last fragment, which has no byte after it to lend, is sealed in a
    /// copy.
    pub(crate) async fn write_sealed(&mut self, data: &mut [u8]) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        if data.is_empty() {
            return Ok(());
        }
        let records = data.len().div_ceil(MAX_FRAGMENT);
        // Per record but the last: header, then the sealed inner type and the tag.
        let mut frames: Vec<[u8; HEADER + 1 + TAG]> = Vec::with_capacity(records - 1);
        let last_start = (records - 1) * MAX_FRAGMENT;
        for i in 0..records - 1 {
            let (start, end) = (i * MAX_FRAGMENT, (i + 1) * MAX_FRAGMENT);
            // The inner content type goes where the next fragment starts, for the moment.
            let lent = data[end];
            data[end] = APPLICATION_DATA;
            let sealed = self.seal_in_place(&mut data[start..=end]);
            let ct_type = data[end];
            data[end] = lent;
            let tag = sealed?;
            let mut f = [0u8; HEADER + 1 + TAG];
            f[..HEADER].copy_from_slice(&make_tls13_aad(MAX_FRAGMENT + 1 + TAG));
            f[HEADER] = ct_type;
            f[HEADER + 1..].copy_from_slice(tag.as_ref());
            frames.push(f);
        }
        let last_len = data.len() - last_start;
        let mut last = Vec::with_capacity(HEADER + last_len + 1 + TAG);
        last.extend_from_slice(&make_tls13_aad(last_len + 1 + TAG));
        last.extend_from_slice(&data[last_start..]);
        last.push(APPLICATION_DATA);
        let tag = self.seal_in_place(&mut last[HEADER..])?;
        last.extend_from_slice(tag.as_ref());
        let data = &*data;
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(3 * records);
        for (i, f) in frames.iter().enumerate() {
            let start = i * MAX_FRAGMENT;
            slices.push(IoSlice::new(&f[..HEADER]));
            slices.push(IoSlice::new(&data[start..start + MAX_FRAGMENT]));
            slices.push(IoSlice::new(&f[HEADER..]));
        }
        slices.push(IoSlice::new(&last));
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let k = rest.len().min(MAX_IOVECS);
            let n = std::future::poll_fn(|cx| {
                Pin::new(&mut self.io).poll_write_vectored(cx, &rest[..k])
            })
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for RecordWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.queued >= SEND_BUFFER {
            ready!(this.poll_drain(cx))?;
        }
        let mut taken = 0;
        while taken < data.len() && this.queued < SEND_BUFFER {
            let n = (data.len() - taken).min(MAX_FRAGMENT);
            this.seal(APPLICATION_DATA, &data[taken..taken + n])?;
            taken += n;
        }
        // Start sending; what the socket does not take now goes with the next call or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            // close_notify: a warning-level alert of description 0 (RFC 8446 6.1).
            this.seal(ALERT, &[1, 0])?;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for RecordStream<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for RecordStream<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

    use super::*;

    type Server = tokio_rustls::server::TlsStream<DuplexStream>;
    type Client = tokio_rustls::client::TlsStream<DuplexStream>;

    fn configs(tickets: usize) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let p = Arc::new(rustls::crypto::ring::default_provider());
        let mut s = ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        s.enable_secret_extraction = true;
        s.send_tls13_tickets = tickets;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut c = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.enable_secret_extraction = true;
        (Arc::new(s), Arc::new(c))
    }

    /// A finished handshake over `(client, server)` pipes.
    async fn bare_handshake(
        tickets: usize,
        pipes: (DuplexStream, DuplexStream),
    ) -> (Client, Server) {
        let (s, c) = configs(tickets);
        let name = ServerName::try_from("localhost").unwrap();
        let connect = tokio_rustls::TlsConnector::from(c).connect(name, pipes.0);
        let accept = tokio_rustls::TlsAcceptor::from(s).accept(pipes.1);
        let (c, s) = tokio::join!(connect, accept);
        (c.unwrap(), s.unwrap())
    }

    /// A finished handshake and one round trip of application data through rustls (as the
    /// NBD option haggling is).
    async fn handshake(tickets: usize, pipes: (DuplexStream, DuplexStream)) -> (Client, Server) {
        let (mut c, mut s) = bare_handshake(tickets, pipes).await;
        c.write_all(b"hello").await.unwrap();
        c.flush().await.unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(b"olleh").await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        (c, s)
    }

    type Records = RecordStream<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

    fn server_records(mut s: Server) -> Records {
        let suite = ready_for_hand_off(&mut *s.get_mut().1).expect("ready");
        let (io, conn) = s.into_inner();
        let (r, w) = tokio::io::split(io);
        RecordStream::hand_off(r, w, &[], conn.dangerous_extract_secrets(), suite).unwrap()
    }

    fn client_records(mut c: Client) -> Records {
        let suite = ready_for_hand_off(&mut *c.get_mut().1).expect("ready");
        let (io, conn) = c.into_inner();
        let (r, w) = tokio::io::split(io);
        RecordStream::hand_off(r, w, &[], conn.dangerous_extract_secrets(), suite).unwrap()
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Sends `data` in writes of varying sizes, then shuts down.
    async fn send(mut w: impl AsyncWrite + Unpin, data: Vec<u8>) {
        let mut at = 0;
        for (i, n) in [1usize, 100, 16384, 16385, 70000, 1 << 20]
            .iter()
            .cycle()
            .enumerate()
        {
            if at == data.len() {
                break;
            }
            let n = (*n + i).min(data.len() - at);
            w.write_all(&data[at..at + n]).await.unwrap();
            at += n;
        }
        w.shutdown().await.unwrap();
    }

    /// Everything until a clean end.
    async fn receive(mut r: impl AsyncRead + Unpin) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).await?;
        Ok(v)
    }

    async fn both_ways(
        a: impl AsyncRead + AsyncWrite + Send + 'static,
        b: impl AsyncRead + AsyncWrite + Send + 'static,
    ) {
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (x, y) = (pattern(1, 3 << 20), pattern(2, (2 << 20) + 7));
        let t1 = tokio::spawn(send(aw, x.clone()));
        let t2 = tokio::spawn(send(bw, y.clone()));
        let (gx, gy) = tokio::join!(receive(br), receive(ar));
        t1.await.unwrap();
        t2.await.unwrap();
        assert!(gx.unwrap() == x, "a -> b");
        assert!(gy.unwrap() == y, "b -> a");
    }

    #[tokio::test]
    async fn records_go_both_ways_between_two_handed_off_ends() {
        let (c, s) = handshake(0, tokio::io::duplex(64 << 10)).await;
        both_ways(client_records(c), server_records(s)).await;
    }

    #[tokio::test]
    async fn a_handed_off_end_speaks_tls_with_rustls_in_either_role() {
        // Only the server hands off; the client stays rustls (close_notify included).
        let (c, s) = handshake(0, tokio::io::duplex(64 << 10)).await;
        both_ways(c, server_records(s)).await;
        // Only the client.
        let (c, s) = handshake(0, tokio::io::duplex(64 << 10)).await;
        both_ways(client_records(c), s).await;
    }

    /// Payloads sealed in place by a handed-off server, read by `client`.
    async fn sealed_in_place(client: impl AsyncRead + AsyncWrite + Send + 'static, s: Records) {
        let sizes = [
            1usize,
            MAX_FRAGMENT,
            MAX_FRAGMENT + 1,
            4 * MAX_FRAGMENT + 7,
            2 << 20,
        ];
        let (_sr, mut sw) = s.into_halves();
        let (mut cr, _cw) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for n in sizes {
                let mut h = [0u8; 4];
                cr.read_exact(&mut h).await.unwrap();
                assert_eq!(&h, b"head");
                let mut b = vec![0u8; n];
                cr.read_exact(&mut b).await.unwrap();
                got.push(b);
            }
            got
        });
        for (i, n) in sizes.iter().enumerate() {
            let mut d = pattern(i as u8, *n);
            // A copied record before each, as a reply's header is.
            sw.write_all(b"head").await.unwrap();
            sw.write_sealed(&mut d).await.unwrap();
            if *n > MAX_FRAGMENT {
                assert!(d != pattern(i as u8, *n), "sealed in place");
            }
        }
        sw.flush().await.unwrap();
        let got = reader.await.unwrap();
        for (i, n) in sizes.iter().enumerate() {
            assert!(got[i] == pattern(i as u8, *n), "payload {i} of {n} bytes");
        }
    }

    #[tokio::test]
    async fn payloads_sealed_in_place_open_in_rustls_and_in_the_record_layer() {
        let (c, s) = handshake(0, tokio::io::duplex(64 << 10)).await;
        sealed_in_place(c, server_records(s)).await;
        let (c, s) = handshake(0, tokio::io::duplex(64 << 10)).await;
        sealed_in_place(client_records(c), server_records(s)).await;
    }

    #[tokio::test]
    async fn session_tickets_after_the_hand_off_are_skipped() {
        // The client hands off as soon as its side of the handshake is done: the server's
        // two tickets, sent once it has the client's Finished, reach the record layer.
        let (c, s) = bare_handshake(2, tokio::io::duplex(64 << 10)).await;
        both_ways(client_records(c), s).await;
    }

    #[tokio::test]
    async fn a_key_update_ends_the_connection_with_an_error() {
        let (mut c, s) = handshake(0, tokio::io::duplex(64 << 10)).await;
        let mut s = server_records(s);
        c.get_mut().1.refresh_traffic_keys().unwrap();
        c.write_all(b"after the update").await.unwrap();
        c.flush().await.unwrap();
        let mut b = [0u8; 16];
        let e = s.read_exact(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("key updates"), "{e}");
    }

    #[tokio::test]
    async fn an_altered_record_fails_the_read_instead_of_giving_other_bytes() {
        // client <-> (c_out, m_in) -> forward -> (m_out, s_in) <-> server, and back untouched.
        let (c_io, m_c) = tokio::io::duplex(64 << 10);
        let (m_s, s_io) = tokio::io::duplex(64 << 10);
        let (m_c_r, m_c_w) = tokio::io::split(m_c);
        let (m_s_r, m_s_w) = tokio::io::split(m_s);
        let tamper = Arc::new(AtomicBool::new(false));
        let t = tamper.clone();
        tokio::spawn(async move {
            let mut r = m_c_r;
            let mut w = m_s_w;
            let mut b = vec![0u8; 64 << 10];
            let mut done = false;
            loop {
                let n = match r.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if !done && t.load(Ordering::SeqCst) && n > 20 {
                    b[20] ^= 1;
                    done = true;
                }
                if w.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let (mut r, mut w) = (m_s_r, m_c_w);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let (c, s) = handshake(0, (c_io, s_io)).await;
        let (mut c, mut s) = (client_records(c), server_records(s));
        tamper.store(true, Ordering::SeqCst);
        c.write_all(&pattern(3, 100_000)).await.unwrap();
        c.flush().await.unwrap();
        let mut b = vec![0u8; 100_000];
        let e = s.read_exact(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    /// An NBD server and client over TLS, with or without the hand-off on either side.
    fn nbd_round_trip(server_hands_off: bool, client_hands_off: bool) {
        use crate::nbd::{Export, NbdClient, NbdClientOptions, NbdServer, TlsOptions};
        use crate::{BlockDevice, MemStorage, RawDisk, Storage};

        let (sc, cc) = configs(0);
        let mut sc = (*sc).clone();
        sc.enable_secret_extraction = server_hands_off;
        let mut cc = (*cc).clone();
        cc.enable_secret_extraction = client_hands_off;
        let st = MemStorage::new();
        st.set_len(8 << 20).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(RawDisk::new(st).unwrap());
        let server = NbdServer::bind_tcp("127.0.0.1:0", vec![Export::new("d", dev.clone())])
            .unwrap()
            .require_tls(Arc::new(sc));
        let url = format!("nbds://{}/d", server.local_addr().unwrap());
        let stop = server.stop_handle();
        let t = std::thread::spawn(move || server.serve());
        let opts = NbdClientOptions {
            tls: Some(TlsOptions::new(Arc::new(cc)).with_server_name("localhost".to_string())),
            connections: 2,
            ..NbdClientOptions::default()
        };
        let client = NbdClient::open(&url, opts).unwrap();
        let data = pattern(9, 3 << 20);
        client.write_at(&data, 1 << 20).unwrap();
        client.flush().unwrap();
        let mut back = vec![0u8; 3 << 20];
        client.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == data);
        let mut direct = vec![0u8; 3 << 20];
        dev.read_at(&mut direct, 1 << 20).unwrap();
        assert!(direct == data);
        drop(client);
        stop.stop();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn nbd_over_tls_reads_and_writes_with_the_hand_off_on_either_side_or_both() {
        nbd_round_trip(true, true);
        nbd_round_trip(true, false);
        nbd_round_trip(false, true);
        nbd_round_trip(false, false);
    }
}
