//! [`NbdUrl`]: the NBD URI forms qemu-img and libnbd accept (the NBD URI specification,
//! NetworkBlockDevice/nbd `doc/uri.md`), parsed into a typed target.
//!
//! - `nbd://HOST[:PORT]/NAME` (also `nbd+tcp://`): TCP, port 10809 by default;
//! - `nbd+unix:///NAME?socket=PATH`: a Unix socket (no host, `socket` required);
//! - `nbds://...` and `nbds+unix://...`: the same with TLS required (`NBD_OPT_STARTTLS`).
//!
//! The export name is the path without its leading `/`, percent-decoded; an empty name asks
//! for the server's default export. An IPv6 host is written in brackets (`nbd://[::1]/x`).
//! Anything else — user info, a fragment, unknown query keys, a query on a TCP URL — is
//! refused with a typed [`UrlError`] rather than ignored.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// The IANA-assigned NBD port (proto.md "Newstyle negotiation").
pub const DEFAULT_PORT: u16 = 10809;

/// Why a string is not an NBD URL.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UrlError {
    /// No `scheme://` prefix.
    #[error("not a URL (no scheme://)")]
    NoScheme,
    /// A scheme other than nbd, nbd+tcp, nbd+unix, nbds, nbds+tcp, nbds+unix.
    #[error("unknown scheme '{0}' (expected nbd, nbd+unix, nbds or nbds+unix)")]
    UnknownScheme(String),
    /// A TCP URL without a host.
    #[error("missing host")]
    MissingHost,
    /// A port that is not a number in 1..=65535.
    #[error("bad port '{0}'")]
    BadPort(String),
    /// An IPv6 literal without its closing bracket, or other garbage around the host.
    #[error("bad host '{0}'")]
    BadHost(String),
    /// A Unix-socket URL that names a host.
    #[error("a Unix-socket URL must not name a host ('{0}')")]
    UnexpectedHost(String),
    /// A Unix-socket URL without `?socket=PATH`.
    #[error("missing ?socket=PATH")]
    MissingSocket,
    /// A query key other than `socket`, a repeated key, or a query on a TCP URL.
    #[error("unsupported query parameter '{0}'")]
    UnsupportedQuery(String),
    /// `user@host` or `user:password@host`.
    #[error("user information is not supported")]
    UserInfo,
    /// A `#fragment`.
    #[error("fragments are not supported")]
    Fragment,
    /// A `%` not followed by two hex digits, or a decoded string that is not UTF-8.
    #[error("bad percent-encoding in {0}")]
    BadEncoding(&'static str),
    /// An export name longer than 4096 bytes (proto.md "Conventions").
    #[error("export name too long ({0} bytes)")]
    NameTooLong(usize),
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdTarget {
    /// A TCP host (name or address, IPv6 without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix {
        /// Path of the socket.
        path: PathBuf,
    },
}

impl fmt::Display for NbdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdTarget::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdTarget::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdTarget::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URL: where the server is, which export, and whether TLS is required.
///
/// ```
/// use block_io::nbd::{NbdTarget, NbdUrl};
/// let u: NbdUrl = "nbd+unix:///disk?socket=/run/nbd.sock".parse().unwrap();
/// assert_eq!(u.export, "disk");
/// assert!(matches!(u.target, NbdTarget::Unix { .. }));
/// assert!(!u.tls);
/// let t: NbdUrl = "nbds://[::1]:10810/".parse().unwrap();
/// assert_eq!(t.target, NbdTarget::Tcp { host: "::1".into(), port: 10810 });
/// assert_eq!(t.export, "");
/// assert!(t.tls);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUrl {
    /// Where the server listens.
    pub target: NbdTarget,
    /// The export name ("" is the server's default export).
    pub export: String,
    /// `true` for `nbds`/`nbds+unix`: the connection must be upgraded with
    /// `NBD_OPT_STARTTLS` before anything else is said.
    pub tls: bool,
}

impl NbdUrl {
    /// A TCP URL.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Self {
        NbdUrl {
            target: NbdTarget::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: false,
        }
    }

    /// A Unix-socket URL.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> Self {
        NbdUrl {
            target: NbdTarget::Unix { path: path.into() },
            export: export.into(),
            tls: false,
        }
    }

    /// Whether `s` starts with one of the NBD schemes (so a CLI can tell an NBD URL from a
    /// path or another URL before parsing it; the parse may still fail).
    pub fn has_nbd_scheme(s: &str) -> bool {
        s.split_once("://").is_some_and(|(scheme, _)| {
            matches!(
                scheme.to_ascii_lowercase().as_str(),
                "nbd" | "nbd+tcp" | "nbd+unix" | "nbds" | "nbds+tcp" | "nbds+unix"
            )
        })
    }

    /// The same URL with TLS required or not.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }
}

impl FromStr for NbdUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let (scheme, rest) = s.split_once("://").ok_or(UrlError::NoScheme)?;
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" | "nbd+tcp" => (false, false),
            "nbds" | "nbds+tcp" => (false, true),
            "nbd+unix" => (true, false),
            "nbds+unix" => (true, true),
            _ => return Err(UrlError::UnknownScheme(scheme.to_string())),
        };
        if rest.contains('#') {
            return Err(UrlError::Fragment);
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let export = percent_decode(path, "the export name")?;
        if export.len() > super::super::proto::MAX_STRING {
            return Err(UrlError::NameTooLong(export.len()));
        }
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !unix || k != "socket" || socket.is_some() {
                return Err(UrlError::UnsupportedQuery(k.to_string()));
            }
            socket = Some(percent_decode(v, "the socket path")?);
        }
        let target = if unix {
            if !authority.is_empty() {
                return Err(UrlError::UnexpectedHost(authority.to_string()));
            }
            match socket {
                Some(p) if !p.is_empty() => NbdTarget::Unix {
                    path: PathBuf::from(p),
                },
                _ => return Err(UrlError::MissingSocket),
            }
        } else {
            let (host, port) = split_host_port(authority)?;
            NbdTarget::Tcp { host, port }
        };
        Ok(NbdUrl {
            target,
            export,
            tls,
        })
    }
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        match &self.target {
            NbdTarget::Tcp { .. } => write!(
                f,
                "{s}://{}/{}",
                self.target,
                percent_encode(&self.export, false)
            ),
            NbdTarget::Unix { path } => write!(
                f,
                "{s}+unix:///{}?socket={}",
                percent_encode(&self.export, false),
                percent_encode(&path.to_string_lossy(), true)
            ),
        }
    }
}

/// `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Result<(String, u16), UrlError> {
    if authority.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| UrlError::BadHost(authority.to_string()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| UrlError::BadHost(authority.to_string()))?,
            ),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(UrlError::BadHost(authority.to_string()))
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(UrlError::BadPort(p.to_string())),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str, what: &'static str) -> Result<String, UrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(UrlError::BadEncoding(what))?;
            let hex = std::str::from_utf8(hex).map_err(|_| UrlError::BadEncoding(what))?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| UrlError::BadEncoding(what))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::BadEncoding(what))
}

fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (keep_slash && c == b'/') {
            out.push(char::from(c));
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<NbdUrl, UrlError> {
        s.parse()
    }

    #[test]
    fn forms_qemu_spells_parse() {
        assert_eq!(
            p("nbd://127.0.0.1:10810/disk"),
            Ok(NbdUrl::tcp("127.0.0.1", 10810, "disk"))
        );
        assert_eq!(p("nbd://host/"), Ok(NbdUrl::tcp("host", DEFAULT_PORT, "")));
        assert_eq!(p("nbd://host"), Ok(NbdUrl::tcp("host", DEFAULT_PORT, "")));
        assert_eq!(p("nbd+tcp://h:1/a/b"), Ok(NbdUrl::tcp("h", 1, "a/b")));
        assert_eq!(
            p("nbd+unix:///x?socket=/tmp/s.sock"),
            Ok(NbdUrl::unix("/tmp/s.sock", "x"))
        );
        assert_eq!(
            p("nbds+unix:///?socket=/tmp/a%20b"),
            Ok(NbdUrl::unix("/tmp/a b", "").with_tls(true))
        );
        assert_eq!(
            p("nbds://[::1]/e%2Fx"),
            Ok(NbdUrl::tcp("::1", DEFAULT_PORT, "e/x").with_tls(true))
        );
    }

    #[test]
    fn nbd_schemes_are_recognised() {
        assert!(NbdUrl::has_nbd_scheme("nbd://h/x"));
        assert!(NbdUrl::has_nbd_scheme("NBDS+UNIX:///x?socket=/s"));
        assert!(!NbdUrl::has_nbd_scheme("https://h/x"));
        assert!(!NbdUrl::has_nbd_scheme("/images/nbd://x"));
        assert!(!NbdUrl::has_nbd_scheme("disk.vhdx"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://127.0.0.1:10810/disk",
            "nbds://[::1]:5/a%20b",
            "nbd+unix:///x?socket=/tmp/s.sock",
            "nbds+unix:///?socket=/tmp/a%20b",
        ] {
            let u = p(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(p(&u.to_string()), Ok(u));
        }
    }

    #[test]
    fn malformed_urls_are_typed_errors() {
        assert_eq!(p("127.0.0.1:10809"), Err(UrlError::NoScheme));
        assert!(matches!(p("http://h/x"), Err(UrlError::UnknownScheme(_))));
        assert_eq!(p("nbd:///x"), Err(UrlError::MissingHost));
        assert_eq!(p("nbd://:10809/x"), Err(UrlError::MissingHost));
        assert!(matches!(p("nbd://h:99999/x"), Err(UrlError::BadPort(_))));
        assert!(matches!(p("nbd://h:0/x"), Err(UrlError::BadPort(_))));
        assert!(matches!(p("nbd://h:+1/x"), Err(UrlError::BadPort(_))));
        assert!(matches!(p("nbd://h:abc/x"), Err(UrlError::BadPort(_))));
        assert!(matches!(p("nbd://[::1/x"), Err(UrlError::BadHost(_))));
        assert!(matches!(p("nbd://::1/x"), Err(UrlError::BadHost(_))));
        assert!(matches!(
            p("nbd+unix://h/x?socket=/s"),
            Err(UrlError::UnexpectedHost(_))
        ));
        assert_eq!(p("nbd+unix:///x"), Err(UrlError::MissingSocket));
        assert_eq!(p("nbd+unix:///x?socket="), Err(UrlError::MissingSocket));
        assert!(matches!(
            p("nbd://h/x?socket=/s"),
            Err(UrlError::UnsupportedQuery(_))
        ));
        assert!(matches!(
            p("nbd+unix:///x?socket=/s&socket=/t"),
            Err(UrlError::UnsupportedQuery(_))
        ));
        assert!(matches!(
            p("nbd+unix:///x?sock=/s"),
            Err(UrlError::UnsupportedQuery(_))
        ));
        assert_eq!(p("nbd://u@h/x"), Err(UrlError::UserInfo));
        assert_eq!(p("nbd://h/x#frag"), Err(UrlError::Fragment));
        assert!(matches!(p("nbd://h/%zz"), Err(UrlError::BadEncoding(_))));
        assert!(matches!(p("nbd://h/%ff"), Err(UrlError::BadEncoding(_))));
        assert!(matches!(p("nbd://h/%4"), Err(UrlError::BadEncoding(_))));
        let long = format!("nbd://h/{}", "a".repeat(5000));
        assert_eq!(p(&long), Err(UrlError::NameTooLong(5000)));
    }
}
