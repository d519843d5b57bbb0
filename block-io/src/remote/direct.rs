//! Direct streams: a sequential reader's bytes read from the socket straight into its own
//! memory, as `curl` reads them, past the block cache.
//!
//! Once a run of reads is sequential (see [`super::cache`]) and its reads are large, each read
//! that continues it is served from one long ranged `GET` (RFC 9110 §14.2) on a blocking
//! HTTP/1.1 connection (RFC 9112) that the run owns: the body is read with `read(2)` into the
//! caller's buffers on the caller's thread, so the kernel's copy is the only one, and TCP flow
//! control is the read-ahead (the kernel's socket buffers bound the memory it holds). A run's
//! ranges start at [`FIRST_SPAN`] and double up to [`MAX_SPAN`]; a run that stops leaves at
//! most the rest of its range unread, dropped with the connection. A finished range leaves the
//! connection open for the run's next one.
//!
//! Only plain `http://` URLs without credentials and without a proxy in the environment take
//! this path (`https://` and S3 go through the cache). Responses are checked as the cached path
//! checks them (206, the exact `Content-Range`, ETag, Last-Modified and size, see
//! [`super::http`]); anything this small client does not expect (no `Content-Length`, chunked
//! bodies, redirects, a 200) turns direct streams off for the storage, and any failure hands
//! the rest of the read to the cache, whose retries then apply.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;

use super::error::RemoteError;
use super::RemoteIdentity;

/// The first range of a run, in bytes.
pub(crate) const FIRST_SPAN: u64 = 4 << 20;

/// The largest range of a run, in bytes.
pub(crate) const MAX_SPAN: u64 = 256 << 20;

/// Most bytes of a response head (status line and headers).
const MAX_HEAD: usize = 16 << 10;

/// Why a direct stream could not serve (all of) a read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DirectError {
    /// The object is no longer the one opened: latched like any other change.
    #[error(transparent)]
    Changed(RemoteError),
    /// The server or URL does not suit this client: the cache serves the storage from now on.
    #[error("direct streams do not suit this server: {0}")]
    Unsuitable(String),
    /// This try failed (connection, timeout, server error): the cache serves the rest.
    #[error("direct stream failed: {0}")]
    Failed(String),
}

/// Where and how to ask for ranges of one object.
#[derive(Debug)]
pub(crate) struct Target {
    url: Url,
    /// The request line's target: path and query.
    path: String,
    /// The `Host` header's value.
    host: String,
    /// `If-Match` or `If-Unmodified-Since` with its value, as the cached path sends it.
    precondition: Option<(&'static str, String)>,
    timeout: Duration,
}

/// Whether the environment names a proxy that reqwest would use for plain HTTP.
fn proxy_configured() -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

impl Target {
    /// The target of `url` if direct streams suit it: plain `http://`, no credentials, no
    /// proxy configured.
    pub(crate) fn new(url: &Url, id: &RemoteIdentity, timeout: Duration) -> Option<Target> {
        if url.scheme() != "http"
            || !url.username().is_empty()
            || url.password().is_some()
            || proxy_configured()
        {
            return None;
        }
        let host_name = url.host_str()?;
        let host = match url.port() {
            Some(p) => format!("{host_name}:{p}"),
            None => host_name.to_owned(),
        };
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        // Header values must be printable: a control character would end the head early.
        if path
            .bytes()
            .chain(host.bytes())
            .any(|b| b < 0x21 || b == 0x7f)
        {
            return None;
        }
        let precondition = match (&id.etag, &id.last_modified) {
            (Some(etag), _) if !etag.starts_with("W/") => Some(("If-Match", etag.clone())),
            (_, Some(lm)) => Some(("If-Unmodified-Since", lm.clone())),
            _ => None,
        };
        if precondition
            .as_ref()
            .is_some_and(|(_, v)| v.bytes().any(|b| b < 0x20 || b == 0x7f))
        {
            return None;
        }
        Some(Target {
            url: url.clone(),
            path,
            host,
            precondition,
            timeout,
        })
    }

    fn connect(&self) -> Result<TcpStream, DirectError> {
        let addrs: Vec<SocketAddr> = self
            .url
            .socket_addrs(|| Some(80))
            .map_err(|e| DirectError::Failed(format!("resolving: {e}")))?;
        let mut last = DirectError::Failed("no address".into());
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => {
                    let setup = s
                        .set_nodelay(true)
                        .and_then(|()| s.set_read_timeout(Some(self.timeout)))
                        .and_then(|()| s.set_write_timeout(Some(self.timeout)));
                    return match setup {
                        Ok(()) => Ok(s),
                        Err(e) => Err(DirectError::Failed(format!("socket options: {e}"))),
                    };
                }
                Err(e) => last = DirectError::Failed(format!("connecting to {a}: {e}")),
            }
        }
        Err(last)
    }

    /// Asks for `[offset, offset + len)` on `conn` if it can take another request, else on a
    /// new connection, and reads the response head; `check(status, headers)` judges it (the
    /// source's version and range checks). Returns the connection positioned at the body.
    pub(crate) fn request(
        &self,
        conn: Option<Conn>,
        offset: u64,
        len: u64,
        check: &dyn Fn(u16, &HeaderMap) -> Result<(), DirectError>,
    ) -> Result<Conn, DirectError> {
        if len == 0 {
            return Err(DirectError::Failed("an empty range".into()));
        }
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| DirectError::Failed("range overflows".into()))?;
        let mut head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nRange: bytes={offset}-{last}\r\nAccept: */*\r\n\
             Accept-Encoding: identity\r\n",
            self.path, self.host
        );
        if let Some((name, value)) = &self.precondition {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        // A kept-alive connection may have been closed by the server meanwhile: one more try
        // on a fresh one.
        if let Some(c) = conn.filter(Conn::reusable) {
            match c.exchange(head.as_bytes(), len, check) {
                Err(DirectError::Failed(_)) => {}
                r => return r,
            }
        }
        Conn::new(self.connect()?).exchange(head.as_bytes(), len, check)
    }
}

/// A blocking HTTP/1.1 connection and the body it is in.
pub(crate) struct Conn {
    sock: TcpStream,
    /// Bytes read past the head: the start of the body, `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Body bytes not read yet.
    left: u64,
    /// Whether the server keeps the connection open after the body.
    keep_alive: bool,
}

impl std::fmt::Debug for Conn {
    // Not derived: the head buffer holds 16 KiB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.sock.peer_addr().ok())
            .field("left", &self.left)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses a response head: status, headers, and whether it is HTTP/1.1.
fn parse_head(head: &[u8]) -> Result<(u16, HeaderMap, bool), DirectError> {
    let bad = |what: &str| DirectError::Unsuitable(format!("response head: {what}"));
    let text = std::str::from_utf8(head).map_err(|_| bad("not text"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad("not HTTP/1.x")),
    };
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| bad("no status"))?;
    let mut h = HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        // RFC 9112 §5.2: obsolete line folding is refused here, not unfolded.
        if line.starts_with([' ', '\t']) {
            return Err(bad("folded header line"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("header without ':'"))?;
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("header name"))?;
        let value =
            HeaderValue::from_bytes(value.trim().as_bytes()).map_err(|_| bad("header value"))?;
        h.append(name, value);
    }
    Ok((status, h, http11))
}

impl Conn {
    fn new(sock: TcpStream) -> Conn {
        Conn {
            sock,
            buf: vec![0u8; MAX_HEAD].into_boxed_slice(),
            start: 0,
            end: 0,
            left: 0,
            keep_alive: false,
        }
    }

    /// Whether it has finished its body and may carry another request.
    fn reusable(&self) -> bool {
        self.left == 0 && self.keep_alive && self.start == self.end
    }

    /// Body bytes not read yet.
    pub(crate) fn left(&self) -> u64 {
        self.left
    }

    /// Sends `request` and reads the head of its answer, which must carry a body of `len`.
    fn exchange(
        mut self,
        request: &[u8],
        len: u64,
        check: &dyn Fn(u16, &HeaderMap) -> Result<(), DirectError>,
    ) -> Result<Conn, DirectError> {
        let failed = |what: &str, e: std::io::Error| DirectError::Failed(format!("{what}: {e}"));
        self.sock
            .write_all(request)
            .map_err(|e| failed("sending the request", e))?;
        self.start = 0;
        self.end = 0;
        let head_len = loop {
            if let Some(n) = find_head_end(&self.buf[..self.end]) {
                break n;
            }
            if self.end == self.buf.len() {
                return Err(DirectError::Unsuitable("response head too large".into()));
            }
            let n = loop {
                match self.sock.read(&mut self.buf[self.end..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r.map_err(|e| failed("reading the response", e))?,
                }
            };
            if n == 0 {
                return Err(DirectError::Failed(
                    "connection closed before the response".into(),
                ));
            }
            self.end += n;
        };
        let (status, h, http11) = parse_head(&self.buf[..head_len])?;
        check(status, &h)?;
        if h.contains_key(reqwest::header::TRANSFER_ENCODING) {
            return Err(DirectError::Unsuitable("a transfer-coded body".into()));
        }
        let length = h
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length != Some(len) {
            return Err(DirectError::Unsuitable(format!(
                "Content-Length {length:?} for a range of {len}"
            )));
        }
        let close = h.get_all(reqwest::header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("close"))
        });
        self.keep_alive = http11 && !close;
        self.start = head_len;
        // A server that sent more than the body before we asked again is broken.
        if (self.end - self.start) as u64 > len {
            return Err(DirectError::Unsuitable("more bytes than the body".into()));
        }
        self.left = len;
        Ok(self)
    }

    /// Reads up to `n` (at most [`Conn::left`]) body bytes into `ptr`; returns how many (at
    /// least one unless `n` is 0).
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `n` bytes for the duration of the call.
    pub(crate) unsafe fn read_body(
        &mut self,
        ptr: *mut u8,
        n: usize,
    ) -> Result<usize, DirectError> {
        let n = n.min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        if self.start < self.end {
            let take = n.min(self.end - self.start);
            // SAFETY: `ptr` is valid for `n >= take` bytes (caller's contract); the source is
            // our own buffer, in bounds, and cannot overlap the caller's memory.
            unsafe { std::ptr::copy_nonoverlapping(self.buf[self.start..].as_ptr(), ptr, take) };
            self.start += take;
            self.left -= take as u64;
            return Ok(take);
        }
        loop {
            // SAFETY: `ptr` is valid for writes of `n` bytes (caller's contract) and the
            // descriptor is our open socket; read(2) writes at most `n` bytes. No reference to
            // the caller's memory is formed.
            let r = unsafe { libc::read(self.sock.as_raw_fd(), ptr.cast(), n) };
            if r > 0 {
                let got = r as usize;
                self.left -= got as u64;
                return Ok(got);
            }
            if r == 0 {
                return Err(DirectError::Failed(format!(
                    "connection closed with {} body bytes to come",
                    self.left
                )));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(DirectError::Failed(format!("reading the body: {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_odd_ones_are_refused() {
        let (s, h, v11) =
            parse_head(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nETag: \"x\"\r\n\r\n")
                .unwrap();
        assert_eq!((s, v11), (206, true));
        assert_eq!(h.get("content-length").unwrap(), "5");
        assert_eq!(h.get("etag").unwrap(), "\"x\"");
        let (s, _, v11) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert_eq!((s, v11), (200, false));
        for bad in [
            &b"HTTP/2 206 x\r\n\r\n"[..],
            b"HTTP/1.1 abc x\r\n\r\n",
            b"HTTP/1.1 206 x\r\nA: b\r\n folded\r\n\r\n",
            b"HTTP/1.1 206 x\r\nno colon\r\n\r\n",
            b"HTTP/1.1 206 x\r\nA: \xff\r\n\r\n",
        ] {
            assert!(matches!(parse_head(bad), Err(DirectError::Unsuitable(_))));
        }
        assert_eq!(find_head_end(b"a\r\n\r\nbody"), Some(5));
        assert_eq!(find_head_end(b"a\r\n\r"), None);
    }

    #[test]
    fn only_plain_http_without_credentials_is_direct() {
        let id = RemoteIdentity {
            url: String::new(),
            size: 1,
            etag: Some("\"e\"".into()),
            last_modified: None,
        };
        let t = Duration::from_secs(1);
        let ok = |u: &str| Target::new(&Url::parse(u).unwrap(), &id, t);
        if proxy_configured() {
            assert!(ok("http://h/a").is_none());
            return;
        }
        let d = ok("http://h:8080/a/b?x=1&y=2#frag").unwrap();
        assert_eq!(
            (d.host.as_str(), d.path.as_str()),
            ("h:8080", "/a/b?x=1&y=2")
        );
        assert_eq!(d.precondition, Some(("If-Match", "\"e\"".into())));
        assert_eq!(ok("http://h/a").unwrap().host, "h");
        assert!(ok("https://h/a").is_none());
        assert!(ok("http://u:p@h/a").is_none());
    }
}
