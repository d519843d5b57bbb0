//! The server side of the fixed newstyle handshake (proto.md "Fixed newstyle negotiation",
//! "Option types"): greeting, client flags, then options until one chooses an export
//! (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or the client leaves, with `NBD_OPT_STARTTLS` and
//! a new round of options on the TLS stream in between when the server requires TLS
//! ([`TlsPhase`]). Unknown options get `NBD_REP_ERR_UNSUP`; malformed option data gets
//! `NBD_REP_ERR_INVALID`; a bad option magic or unknown client flags close the connection, as
//! the spec requires.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::Served;
use super::proto::{self, InfoRequest, MetaContextRequest, OptionHeader, ProtoError};

/// Options accepted in one handshake before the server gives up on the client.
const MAX_OPTIONS: u32 = 4096;
/// Metadata context id of `base:allocation` (opaque to clients; any value works).
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on, for the transmission phase.
pub(crate) struct Session {
    pub export: Arc<Served>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub allocation_context: bool,
}

/// Where a connection stands with TLS (proto.md "TLS support").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsPhase {
    /// The server has no TLS: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP`.
    Off,
    /// TLS is required and not yet started ("FORCEDTLS mode"): only `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` are served, other options get `NBD_REP_ERR_TLS_REQD`, and
    /// `NBD_OPT_EXPORT_NAME` closes the connection.
    Required,
    /// The option haggling goes on over TLS.
    Active,
}

/// How one round of option haggling ended.
pub(crate) enum Negotiated {
    /// An export was chosen: transmission starts.
    Session(Session),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next, then the haggling
    /// starts again on the TLS stream (without a new greeting).
    StartTls,
    /// The client aborted, or named a missing export with `NBD_OPT_EXPORT_NAME` (or named any
    /// before TLS was started, when TLS is required): the connection closes.
    Quit,
}

/// An option handled; whether the handshake goes on.
enum Next {
    More,
    Done(Session),
    StartTls,
    Quit,
}

/// Sends the greeting and reads the client flags. Returns whether the client asked for no
/// zero padding (`NBD_FLAG_C_NO_ZEROES`).
pub(crate) async fn greet<S>(s: &mut S) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    // proto.md "Client flags": the server MUST drop the connection on an unknown flag.
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Err(invalid(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(client_flags & proto::CLIENT_NO_ZEROES != 0)
}

/// Runs option haggling on `s` in TLS phase `tls` until an export is chosen, TLS is to start
/// or the client leaves. Every round starts from a fresh state: once TLS is up, the client
/// negotiates everything again (proto.md "NBD_OPT_STARTTLS").
pub(crate) async fn haggle<S>(
    s: &mut S,
    exports: &[Arc<Served>],
    no_zeroes: bool,
    tls: TlsPhase,
) -> io::Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = State {
        no_zeroes,
        structured: false,
        meta: None,
        tls,
    };
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let h = OptionHeader::parse(&h).map_err(|e| invalid(e.to_string()))?;
        if h.len > proto::MAX_OPTION_DATA {
            if h.option == proto::OPT_EXPORT_NAME {
                return Err(invalid("export name too long".into()));
            }
            skip(s, u64::from(h.len)).await?;
            reply(s, h.option, proto::REP_ERR_TOO_BIG, b"option data too long").await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).await?;
        let next = if st.tls == TlsPhase::Required {
            before_tls(s, h.option, &data).await?
        } else {
            option(s, &mut st, exports, h.option, &data).await?
        };
        match next {
            Next::More => {}
            Next::Done(session) => return Ok(Negotiated::Session(session)),
            Next::StartTls => return Ok(Negotiated::StartTls),
            Next::Quit => return Ok(Negotiated::Quit),
        }
    }
    Err(invalid("too many options".into()))
}

/// An option while TLS is required and not started (proto.md "FORCEDTLS mode").
async fn before_tls<S>(s: &mut S, opt: u32, data: &[u8]) -> io::Result<Next>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match opt {
        proto::OPT_STARTTLS if !data.is_empty() => {
            let msg = b"NBD_OPT_STARTTLS takes no data";
            reply(s, opt, proto::REP_ERR_INVALID, msg).await?;
            Ok(Next::More)
        }
        proto::OPT_STARTTLS => {
            reply(s, opt, proto::REP_ACK, &[]).await?;
            Ok(Next::StartTls)
        }
        proto::OPT_ABORT => {
            // The client may already be gone; the ACK is a courtesy.
            let _ = reply(s, opt, proto::REP_ACK, &[]).await;
            Ok(Next::Quit)
        }
        // proto.md: the server cannot answer it with an error, so it MUST close.
        proto::OPT_EXPORT_NAME => Ok(Next::Quit),
        _ => {
            let msg = b"this server requires TLS: send NBD_OPT_STARTTLS first";
            reply(s, opt, proto::REP_ERR_TLS_REQD, msg).await?;
            Ok(Next::More)
        }
    }
}

/// Negotiation state.
struct State {
    no_zeroes: bool,
    structured: bool,
    /// The export `base:allocation` was selected for, by the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<String>,
    tls: TlsPhase,
}

async fn option<S>(
    s: &mut S,
    st: &mut State,
    exports: &[Arc<Served>],
    opt: u32,
    data: &[u8],
) -> io::Result<Next>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match opt {
        proto::OPT_EXPORT_NAME => {
            let Some(e) = std::str::from_utf8(data)
                .ok()
                .and_then(|n| find(exports, n))
            else {
                // proto.md: the server MUST terminate the session.
                return Ok(Next::Quit);
            };
            let mut b = Vec::with_capacity(134);
            b.extend_from_slice(&e.size.to_be_bytes());
            b.extend_from_slice(&e.flags(st.structured).to_be_bytes());
            if !st.no_zeroes {
                b.extend_from_slice(&[0u8; 124]);
            }
            s.write_all(&b).await?;
            s.flush().await?;
            Ok(Next::Done(session(st, e)))
        }
        proto::OPT_ABORT => {
            // The client may already be gone; the ACK is a courtesy.
            let _ = reply(s, opt, proto::REP_ACK, &[]).await;
            Ok(Next::Quit)
        }
        proto::OPT_LIST => {
            if !data.is_empty() {
                reply(
                    s,
                    opt,
                    proto::REP_ERR_INVALID,
                    b"NBD_OPT_LIST takes no data",
                )
                .await?;
                return Ok(Next::More);
            }
            for e in exports {
                reply(s, opt, proto::REP_SERVER, &proto::rep_server(&e.name)).await?;
            }
            reply(s, opt, proto::REP_ACK, &[]).await?;
            Ok(Next::More)
        }
        proto::OPT_INFO | proto::OPT_GO => {
            let r = match InfoRequest::parse(data) {
                Ok(r) => r,
                Err(e) => return refuse(s, opt, &e).await,
            };
            let Some(e) = find(exports, &r.name) else {
                let msg = format!("no export named '{}'", r.name);
                reply(s, opt, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                return Ok(Next::More);
            };
            let info = proto::info_export(e.size, e.flags(st.structured));
            reply(s, opt, proto::REP_INFO, &info).await?;
            // Sent whether asked or not (clients ignore what they did not ask for): a client
            // that honours it sends only whole sectors.
            let bs = proto::info_block_size(e.min_block, e.preferred, proto::MAX_PAYLOAD);
            reply(s, opt, proto::REP_INFO, &bs).await?;
            if r.requests.contains(&proto::INFO_NAME) {
                let name = proto::info_string(proto::INFO_NAME, &e.name);
                reply(s, opt, proto::REP_INFO, &name).await?;
            }
            if let (true, Some(d)) = (
                r.requests.contains(&proto::INFO_DESCRIPTION),
                e.description.as_deref(),
            ) {
                let d = proto::info_string(proto::INFO_DESCRIPTION, d);
                reply(s, opt, proto::REP_INFO, &d).await?;
            }
            reply(s, opt, proto::REP_ACK, &[]).await?;
            if opt == proto::OPT_GO {
                Ok(Next::Done(session(st, e)))
            } else {
                Ok(Next::More)
            }
        }
        proto::OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                let msg = b"NBD_OPT_STRUCTURED_REPLY takes no data";
                reply(s, opt, proto::REP_ERR_INVALID, msg).await?;
            } else {
                st.structured = true;
                reply(s, opt, proto::REP_ACK, &[]).await?;
            }
            Ok(Next::More)
        }
        proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
            let set = opt == proto::OPT_SET_META_CONTEXT;
            if set {
                // proto.md: a SET replaces the selection even when it fails.
                st.meta = None;
                if !st.structured {
                    let msg = b"negotiate structured replies first";
                    reply(s, opt, proto::REP_ERR_INVALID, msg).await?;
                    return Ok(Next::More);
                }
            }
            let r = match MetaContextRequest::parse(data) {
                Ok(r) => r,
                Err(e) => return refuse(s, opt, &e).await,
            };
            let Some(e) = find(exports, &r.name) else {
                let msg = format!("no export named '{}'", r.name);
                reply(s, opt, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                return Ok(Next::More);
            };
            if let Some(q) = r.queries.iter().find(|q| !q.contains(':')) {
                let msg = format!("query '{q}' has no namespace");
                reply(s, opt, proto::REP_ERR_INVALID, msg.as_bytes()).await?;
                return Ok(Next::More);
            }
            // proto.md "The base: metadata namespace": `base:` is a wildcard for LIST only;
            // no queries lists everything and selects nothing; unknown queries are ignored.
            let matched = if set {
                r.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
            } else {
                r.queries.is_empty()
                    || r.queries
                        .iter()
                        .any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
            };
            if matched {
                let m = proto::rep_meta_context(BASE_ALLOCATION_ID, proto::BASE_ALLOCATION);
                reply(s, opt, proto::REP_META_CONTEXT, &m).await?;
                if set {
                    st.meta = Some(e.name.clone());
                }
            }
            reply(s, opt, proto::REP_ACK, &[]).await?;
            Ok(Next::More)
        }
        proto::OPT_STARTTLS if st.tls == TlsPhase::Active => {
            // proto.md: a second STARTTLS SHOULD get ERR_INVALID.
            let msg = b"TLS is already negotiated";
            reply(s, opt, proto::REP_ERR_INVALID, msg).await?;
            Ok(Next::More)
        }
        proto::OPT_STARTTLS => {
            // proto.md "NOTLS mode": without TLS configured the answer is ERR_UNSUP.
            let msg = b"TLS is not configured on this server";
            reply(s, opt, proto::REP_ERR_UNSUP, msg).await?;
            Ok(Next::More)
        }
        _ => {
            let msg = format!("option {opt} is not supported");
            reply(s, opt, proto::REP_ERR_UNSUP, msg.as_bytes()).await?;
            Ok(Next::More)
        }
    }
}

fn session(st: &State, e: &Arc<Served>) -> Session {
    Session {
        export: e.clone(),
        structured: st.structured,
        allocation_context: st.structured && st.meta.as_deref() == Some(e.name.as_str()),
    }
}

fn find<'a>(exports: &'a [Arc<Served>], name: &str) -> Option<&'a Arc<Served>> {
    exports.iter().find(|e| e.name == name)
}

/// Answers malformed option data with `NBD_REP_ERR_INVALID` (or `TOO_BIG` for over-long
/// strings and counts) and goes on.
async fn refuse<S>(s: &mut S, opt: u32, e: &ProtoError) -> io::Result<Next>
where
    S: AsyncWrite + Unpin,
{
    let kind = match e {
        ProtoError::TooLong { .. } => proto::REP_ERR_TOO_BIG,
        _ => proto::REP_ERR_INVALID,
    };
    reply(s, opt, kind, e.to_string().as_bytes()).await?;
    Ok(Next::More)
}

async fn reply<S>(s: &mut S, opt: u32, kind: u32, data: &[u8]) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    s.write_all(&proto::option_reply(opt, kind, data)).await?;
    s.flush().await
}

/// Reads and drops `n` bytes.
pub(crate) async fn skip<S>(s: &mut S, n: u64) -> io::Result<()>
where
    S: AsyncRead + Unpin,
{
    let copied = tokio::io::copy(&mut (&mut *s).take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
