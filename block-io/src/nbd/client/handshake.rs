//! The client side of the handshake (proto.md "Newstyle negotiation", "Option types"):
//! connect over TCP or a Unix socket, optionally `NBD_OPT_STARTTLS` and a rustls handshake,
//! then `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT base:allocation` and
//! `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE` and `NBD_INFO_DESCRIPTION` (which carries
//! the identity our server advertises, see [`ExportInfo::identity`](super::ExportInfo::identity)),
//! falling back to `NBD_OPT_EXPORT_NAME` for servers without `NBD_OPT_GO`. The result is the
//! [`Negotiated`] facts of the export.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

use super::super::proto::{
    self, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader, MAX_OPTION_DATA,
    OPTION_REPLY_LEN,
};
use super::super::record::{ready_for_hand_off, RecordStream};
use super::error::ClientError;
use super::options::{NbdClientOptions, TlsOptions};
use super::url::{NbdTarget, NbdUrl};

/// A byte stream a connection runs on (TCP, Unix, either under TLS).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed [`Io`].
pub(crate) type BoxIo = Box<dyn Io>;

/// Bytes read from the socket at once under TLS.
const TLS_READ_AHEAD: usize = 256 * 1024;

/// The magic an oldstyle server sends after `NBDMAGIC` (proto.md "Oldstyle negotiation").
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Block size constraints (proto.md "Block size constraints").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// proto.md: without `NBD_INFO_BLOCK_SIZE`, 1-byte minimum, 4 KiB preferred, and a
    /// client should not send payloads over 32 MiB.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: proto::MAX_PAYLOAD,
        }
    }
}

/// What a handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`; 0 when the server did not set `HAS_FLAGS`).
    pub flags: u16,
    /// Structured replies are on.
    pub structured: bool,
    /// The id of the `base:allocation` context, if the server agreed to it.
    pub context: Option<u32>,
    /// Block size constraints.
    pub block: BlockSizes,
    /// The export's description (`NBD_INFO_DESCRIPTION`), if the server sent one.
    pub description: Option<String>,
}

impl Negotiated {
    /// Whether transmission flag `f` is set.
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

/// Connects to `url` and negotiates, all within `opts.connect_timeout`.
pub(crate) async fn connect(
    url: &NbdUrl,
    opts: &NbdClientOptions,
) -> Result<(BoxIo, Negotiated), ClientError> {
    let limit = opts.connect_timeout;
    match tokio::time::timeout(limit, connect_inner(url, opts)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout(limit)),
    }
}

async fn connect_inner(
    url: &NbdUrl,
    opts: &NbdClientOptions,
) -> Result<(BoxIo, Negotiated), ClientError> {
    let connect_err = |e: std::io::Error| ClientError::Connect {
        target: url.target.to_string(),
        source: std::sync::Arc::new(e),
    };
    let io: BoxIo = match &url.target {
        NbdTarget::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect_err)?;
            // Requests are small and latency-bound: no Nagle delay.
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
        NbdTarget::Unix { path } => Box::new(UnixStream::connect(path).await.map_err(connect_err)?),
    };
    negotiate(io, url, opts).await
}

/// The handshake on a connected stream.
async fn negotiate(
    mut io: BoxIo,
    url: &NbdUrl,
    opts: &NbdClientOptions,
) -> Result<(BoxIo, Negotiated), ClientError> {
    let magic = read_u64(&mut io).await?;
    if magic != proto::NBDMAGIC {
        return Err(ClientError::Unsupported(format!(
            "not an NBD server (magic {magic:#x})"
        )));
    }
    let magic = read_u64(&mut io).await?;
    if magic == OLDSTYLE_MAGIC {
        return Err(ClientError::Unsupported("oldstyle negotiation".into()));
    }
    if magic != proto::IHAVEOPT {
        return Err(ClientError::Unsupported(format!(
            "unknown negotiation magic {magic:#x}"
        )));
    }
    let server_flags = read_u16(&mut io).await?;
    let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = 0u32;
    if fixed {
        client_flags |= proto::CLIENT_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= proto::CLIENT_NO_ZEROES;
    }
    write_flush(&mut io, &client_flags.to_be_bytes()).await?;

    let tls = if url.tls || opts.tls.is_some() {
        Some(
            opts.tls
                .as_ref()
                .ok_or_else(|| ClientError::TlsConfig("an nbds:// URL needs TLS options".into()))?,
        )
    } else {
        None
    };
    if !fixed {
        // Plain newstyle knows only NBD_OPT_EXPORT_NAME: no TLS, no structured replies.
        if tls.is_some() {
            return Err(ClientError::StartTlsRefused(
                "the server is not fixed newstyle".into(),
            ));
        }
        let (size, flags) = export_name(&mut io, &url.export, no_zeroes).await?;
        return Ok((io, negotiated(size, flags, false, None, None, None)?));
    }
    if let Some(tls) = tls {
        send_option(&mut io, proto::OPT_STARTTLS, &[]).await?;
        let (h, data) = read_reply(&mut io, proto::OPT_STARTTLS).await?;
        if h.reply != proto::REP_ACK {
            return Err(ClientError::StartTlsRefused(reply_text(h.reply, &data)));
        }
        let name = match (&tls.server_name, &url.target) {
            (Some(n), _) => n.clone(),
            (None, NbdTarget::Tcp { host, .. }) => host.clone(),
            (None, NbdTarget::Unix { .. }) => "localhost".to_string(),
        };
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| ClientError::TlsConfig(format!("bad TLS server name: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        // rustls reads the socket 4 KiB at a time (several reads per 16 KiB record): a
        // buffer under it turns that into one read per socket wakeup. Nothing is buffered
        // before the handshake starts: the STARTTLS reply was read exactly.
        let s = connector
            .connect(
                name,
                tokio::io::BufReader::with_capacity(TLS_READ_AHEAD, io),
            )
            .await
            .map_err(|e| ClientError::Tls(std::sync::Arc::new(e)))?;
        let mut s = s;
        let n = options(&mut s, url, no_zeroes).await?;
        return Ok((hand_off(s, tls)?, n));
    }
    let n = options(&mut io, url, no_zeroes).await?;
    Ok((io, n))
}

/// The stream a TLS connection goes on with once negotiated: the [`RecordStream`] when the
/// configuration allows handing the keys over (`enable_secret_extraction`) and rustls holds
/// nothing unread or unsent, else rustls' own stream.
fn hand_off(
    s: TlsStream<tokio::io::BufReader<BoxIo>>,
    tls: &TlsOptions,
) -> Result<BoxIo, ClientError> {
    let mut s = s;
    if !tls.config.enable_secret_extraction {
        return Ok(Box::new(s));
    }
    let Some(suite) = ready_for_hand_off(&mut *s.get_mut().1) else {
        return Ok(Box::new(s));
    };
    let (reader, conn) = s.into_inner();
    let ahead = reader.buffer().to_vec();
    let (r, w) = tokio::io::split(reader.into_inner());
    let r = RecordStream::hand_off(r, w, &ahead, conn.dangerous_extract_secrets(), suite)
        .map_err(ClientError::transport)?;
    Ok(Box::new(r))
}

/// The option haggling after the greeting (and TLS): structured replies, the
/// `base:allocation` context, and `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`).
async fn options(
    io: &mut dyn Io,
    url: &NbdUrl,
    no_zeroes: bool,
) -> Result<Negotiated, ClientError> {
    // Structured replies: needed for block status and sparse reads.
    send_option(io, proto::OPT_STRUCTURED_REPLY, &[]).await?;
    let (h, data) = read_reply(io, proto::OPT_STRUCTURED_REPLY).await?;
    let structured = match h.reply {
        proto::REP_ACK => true,
        proto::REP_ERR_TLS_REQD => return Err(ClientError::TlsRequired),
        r if r & (1 << 31) != 0 => false,
        r => return Err(unexpected(proto::OPT_STRUCTURED_REPLY, r, &data)),
    };

    let mut context = None;
    if structured {
        let req = MetaContextRequest {
            name: url.export.clone(),
            queries: vec![proto::BASE_ALLOCATION.to_string()],
        };
        send_option(io, proto::OPT_SET_META_CONTEXT, &req.encode()).await?;
        loop {
            let (h, data) = read_reply(io, proto::OPT_SET_META_CONTEXT).await?;
            match h.reply {
                proto::REP_META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(ClientError::protocol("short NBD_REP_META_CONTEXT"));
                    }
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    if &data[4..] == proto::BASE_ALLOCATION.as_bytes() {
                        context = Some(id);
                    }
                }
                proto::REP_ACK => break,
                proto::REP_ERR_TLS_REQD => return Err(ClientError::TlsRequired),
                r if r & (1 << 31) != 0 => {
                    context = None;
                    break;
                }
                r => return Err(unexpected(proto::OPT_SET_META_CONTEXT, r, &data)),
            }
        }
    }

    let req = InfoRequest {
        name: url.export.clone(),
        requests: vec![proto::INFO_BLOCK_SIZE, proto::INFO_DESCRIPTION],
    };
    send_option(io, proto::OPT_GO, &req.encode()).await?;
    let mut export = None;
    let mut block = None;
    let mut description = None;
    loop {
        let (h, data) = read_reply(io, proto::OPT_GO).await?;
        match h.reply {
            proto::REP_INFO => {
                if data.len() < 2 {
                    return Err(ClientError::protocol("short NBD_REP_INFO"));
                }
                let b = &data[2..];
                match u16::from_be_bytes([data[0], data[1]]) {
                    proto::INFO_EXPORT => {
                        if b.len() != 10 {
                            return Err(ClientError::protocol("NBD_INFO_EXPORT of wrong length"));
                        }
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&b[..8]);
                        export = Some((u64::from_be_bytes(s), u16::from_be_bytes([b[8], b[9]])));
                    }
                    proto::INFO_BLOCK_SIZE => {
                        if b.len() != 12 {
                            return Err(ClientError::protocol(
                                "NBD_INFO_BLOCK_SIZE of wrong length",
                            ));
                        }
                        let u = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                        block = Some(BlockSizes {
                            minimum: u(0),
                            preferred: u(4),
                            maximum: u(8),
                        });
                    }
                    proto::INFO_DESCRIPTION => {
                        // proto.md "NBD_INFO_DESCRIPTION": UTF-8 text (bounded by
                        // MAX_OPTION_DATA like every reply); not UTF-8 is a protocol error.
                        let text = std::str::from_utf8(b).map_err(|_| {
                            ClientError::protocol("NBD_INFO_DESCRIPTION is not UTF-8")
                        })?;
                        description = Some(text.to_string());
                    }
                    // NAME and future items: not needed.
                    _ => {}
                }
            }
            proto::REP_ACK => break,
            proto::REP_ERR_UNSUP => {
                // proto.md: a server without NBD_OPT_GO; NBD_OPT_EXPORT_NAME ends the
                // negotiation instead.
                let (size, flags) = export_name(io, &url.export, no_zeroes).await?;
                return negotiated(size, flags, structured, context, None, None);
            }
            proto::REP_ERR_UNKNOWN => {
                return Err(ClientError::UnknownExport {
                    name: url.export.clone(),
                    message: String::from_utf8_lossy(&data).into_owned(),
                })
            }
            proto::REP_ERR_TLS_REQD => return Err(ClientError::TlsRequired),
            r => return Err(unexpected(proto::OPT_GO, r, &data)),
        }
    }
    let (size, flags) = export
        .ok_or_else(|| ClientError::protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
    negotiated(size, flags, structured, context, block, description)
}

/// Validates and assembles the handshake's result.
fn negotiated(
    size: u64,
    flags: u16,
    structured: bool,
    context: Option<u32>,
    block: Option<BlockSizes>,
    description: Option<String>,
) -> Result<Negotiated, ClientError> {
    // proto.md "Transmission flags": without HAS_FLAGS no other bit means anything.
    let flags = if flags & proto::TF_HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    let block = match block {
        None => BlockSizes::default(),
        Some(b) => {
            // proto.md "Block size constraints": minimum a power of two up to 64 KiB,
            // preferred a power of two at least the minimum, maximum a multiple of the
            // minimum (or 0xffffffff) and at least the preferred size.
            let ok = b.minimum.is_power_of_two()
                && b.minimum <= 64 * 1024
                && b.preferred.is_power_of_two()
                && b.preferred >= b.minimum
                && b.maximum >= b.minimum
                && (b.maximum == u32::MAX || b.maximum % b.minimum == 0);
            if !ok {
                return Err(ClientError::protocol(format!(
                    "invalid block size constraints {}/{}/{}",
                    b.minimum, b.preferred, b.maximum
                )));
            }
            b
        }
    };
    Ok(Negotiated {
        size,
        flags,
        structured,
        context: context.filter(|_| structured),
        block,
        description,
    })
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags (and 124 zero bytes unless
/// `NO_ZEROES`), or closes the connection if it has no such export.
async fn export_name(
    io: &mut dyn Io,
    name: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), ClientError> {
    send_option(io, proto::OPT_EXPORT_NAME, name.as_bytes()).await?;
    let size = read_u64(io).await.map_err(|e| match e {
        ClientError::Transport(_) => ClientError::UnknownExport {
            name: name.to_string(),
            message: "the server closed the connection after NBD_OPT_EXPORT_NAME".into(),
        },
        e => e,
    })?;
    let flags = read_u16(io).await?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        io.read_exact(&mut z)
            .await
            .map_err(ClientError::transport)?;
    }
    Ok((size, flags))
}

async fn send_option(io: &mut dyn Io, option: u32, data: &[u8]) -> Result<(), ClientError> {
    let len = u32::try_from(data.len()).map_err(|_| ClientError::protocol("option too long"))?;
    let mut b = OptionHeader { option, len }.encode().to_vec();
    b.extend_from_slice(data);
    write_flush(io, &b).await
}

/// Reads one option reply to `option`, its data bounded by [`MAX_OPTION_DATA`].
async fn read_reply(
    io: &mut dyn Io,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut hb = [0u8; OPTION_REPLY_LEN];
    io.read_exact(&mut hb)
        .await
        .map_err(ClientError::transport)?;
    let h = OptionReplyHeader::parse(&hb)?;
    if h.option != option {
        return Err(ClientError::protocol(format!(
            "reply to option {} while waiting for {option}",
            h.option
        )));
    }
    if h.len > MAX_OPTION_DATA {
        return Err(ClientError::protocol(format!(
            "option reply of {} bytes",
            h.len
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    io.read_exact(&mut data)
        .await
        .map_err(ClientError::transport)?;
    Ok((h, data))
}

fn reply_text(reply: u32, data: &[u8]) -> String {
    let msg = String::from_utf8_lossy(data);
    if msg.is_empty() {
        format!("reply {reply:#x}")
    } else {
        format!("reply {reply:#x}: {msg}")
    }
}

fn unexpected(option: u32, reply: u32, data: &[u8]) -> ClientError {
    ClientError::OptionRefused {
        option,
        reply,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

async fn write_flush(io: &mut dyn Io, b: &[u8]) -> Result<(), ClientError> {
    io.write_all(b).await.map_err(ClientError::transport)?;
    io.flush().await.map_err(ClientError::transport)
}

async fn read_u64(io: &mut dyn Io) -> Result<u64, ClientError> {
    let mut b = [0u8; 8];
    io.read_exact(&mut b)
        .await
        .map_err(ClientError::transport)?;
    Ok(u64::from_be_bytes(b))
}

async fn read_u16(io: &mut dyn Io) -> Result<u16, ClientError> {
    let mut b = [0u8; 2];
    io.read_exact(&mut b)
        .await
        .map_err(ClientError::transport)?;
    Ok(u16::from_be_bytes(b))
}
