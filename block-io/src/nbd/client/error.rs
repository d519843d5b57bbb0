//! [`ClientError`]: why an NBD client operation failed, typed so that a caller (and the
//! retry logic) can tell a dropped connection from a server's error reply or a protocol
//! violation. At the [`BlockDevice`](crate::BlockDevice) boundary it becomes the source of a
//! [`crate::Error`] whose [`ErrorKind`] follows the server's errno (proto.md "Error values").

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::super::proto::{self, ProtoError};
use super::url::UrlError;
use crate::error::{Error, ErrorKind};

/// Why an NBD client operation failed.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL does not parse.
    #[error("bad NBD URL")]
    Url(#[from] UrlError),
    /// Connecting to the server failed.
    #[error("cannot connect to {target}")]
    Connect {
        /// The target, as `host:port` or `unix:PATH`.
        target: String,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Reading or writing the connection failed (reset, EOF, broken pipe).
    #[error("connection to the NBD server failed")]
    Transport(#[source] Arc<std::io::Error>),
    /// The server broke the protocol (bad magic, unknown cookie, a reply chunk outside its
    /// request, wrong lengths). The connection is dropped; nothing it carried is used.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// A message did not parse.
    #[error("malformed NBD message")]
    Malformed(#[from] ProtoError),
    /// The server is not a fixed-newstyle NBD server we can talk to.
    #[error("unsupported NBD server: {0}")]
    Unsupported(String),
    /// The server requires TLS and the client has none configured (use `nbds://`).
    #[error("the server requires TLS")]
    TlsRequired,
    /// TLS was required and the server refused `NBD_OPT_STARTTLS`.
    #[error("the server refused STARTTLS ({0})")]
    StartTlsRefused(String),
    /// The TLS handshake failed (wrong CA, wrong name, refused client certificate).
    #[error("TLS handshake failed")]
    Tls(#[source] Arc<std::io::Error>),
    /// The TLS configuration is unusable (no CA, unreadable or malformed PEM files).
    #[error("bad TLS configuration: {0}")]
    TlsConfig(String),
    /// The server has no such export.
    #[error("the server has no export '{name}'{}", message_suffix(.message))]
    UnknownExport {
        /// The export asked for.
        name: String,
        /// The server's message, if any.
        message: String,
    },
    /// The server refused a negotiation option it must accept.
    #[error("the server refused option {option} with reply {reply:#x}{}", message_suffix(.message))]
    OptionRefused {
        /// The `NBD_OPT_*` code.
        option: u32,
        /// The `NBD_REP_ERR_*` code.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("the server answered {}{}", errno_name(*.errno), message_suffix(.message))]
    Server {
        /// The `NBD_E*` value.
        errno: u32,
        /// The server's message (structured replies only).
        message: String,
    },
    /// Nothing came from the server for this long while requests were outstanding.
    #[error("no reply from the server for {0:?}")]
    Timeout(Duration),
    /// After a reconnect the export is not the one this client opened (its size, read-only
    /// flag or advertised identity changed); the client refuses to go on.
    #[error("the export changed across a reconnect: {0}")]
    ExportChanged(String),
    /// The connection dropped and every reconnect attempt failed.
    #[error("the connection dropped and {attempts} reconnect attempts over {elapsed:?} failed")]
    GaveUp {
        /// Reconnect attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last cause (why the last attempt or the connection failed).
        #[source]
        last: Box<ClientError>,
    },
    /// A request was re-issued on new connections this many times and failed each time.
    #[error("a request failed on {tries} connections")]
    TooManyTries {
        /// Connections it was sent on.
        tries: u32,
        /// The last cause.
        #[source]
        last: Box<ClientError>,
    },
    /// The client is shut down.
    #[error("the NBD client is closed")]
    Closed,
}

fn message_suffix(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

/// The name of an `NBD_E*` value.
fn errno_name(errno: u32) -> String {
    match errno {
        proto::EPERM => "EPERM".into(),
        proto::EIO => "EIO".into(),
        proto::ENOMEM => "ENOMEM".into(),
        proto::EINVAL => "EINVAL".into(),
        proto::ENOSPC => "ENOSPC".into(),
        proto::EOVERFLOW => "EOVERFLOW".into(),
        proto::ENOTSUP => "ENOTSUP".into(),
        proto::ESHUTDOWN => "ESHUTDOWN".into(),
        n => format!("error {n}"),
    }
}

impl ClientError {
    pub(crate) fn transport(e: std::io::Error) -> Self {
        ClientError::Transport(Arc::new(e))
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        ClientError::Protocol(msg.into())
    }

    /// Whether a new connection may cure this: the connection dropped, timed out, broke the
    /// protocol, or the server is shutting down (`NBD_ESHUTDOWN`).
    pub fn is_connection_loss(&self) -> bool {
        match self {
            ClientError::Transport(_)
            | ClientError::Protocol(_)
            | ClientError::Malformed(_)
            | ClientError::Timeout(_) => true,
            ClientError::Server { errno, .. } => *errno == proto::ESHUTDOWN,
            _ => false,
        }
    }

    /// The crate error kind this maps to (proto.md "Error values").
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Server { errno, .. } => match *errno {
                proto::ENOSPC => ErrorKind::NoSpace,
                proto::EPERM => ErrorKind::ReadOnly,
                proto::EINVAL | proto::EOVERFLOW => ErrorKind::InvalidInput,
                proto::ENOTSUP => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
            ClientError::TlsConfig(_) | ClientError::Url(_) => ErrorKind::InvalidInput,
            ClientError::Unsupported(_) => ErrorKind::Unsupported,
            // Another disk behind the same URL: as a replaced remote object, not a transient
            // failure.
            ClientError::ExportChanged(_) => ErrorKind::Corrupt,
            ClientError::GaveUp { last, .. } | ClientError::TooManyTries { last, .. } => {
                match last.kind() {
                    ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                    _ => ErrorKind::Io,
                }
            }
            _ => ErrorKind::Io,
        }
    }

    /// This error as a crate [`crate::Error`] with `context` ("NBD read at 4096+512").
    pub fn into_error(self, context: impl Into<std::borrow::Cow<'static, str>>) -> Error {
        Error::with_source(self.kind(), context, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_kind() {
        let s = |errno| ClientError::Server {
            errno,
            message: String::new(),
        };
        assert_eq!(s(proto::EIO).kind(), ErrorKind::Io);
        assert_eq!(s(proto::ENOSPC).kind(), ErrorKind::NoSpace);
        assert_eq!(s(proto::EPERM).kind(), ErrorKind::ReadOnly);
        assert_eq!(s(proto::EINVAL).kind(), ErrorKind::InvalidInput);
        assert_eq!(s(proto::ENOTSUP).kind(), ErrorKind::Unsupported);
        assert!(s(proto::ESHUTDOWN).is_connection_loss());
        assert!(!s(proto::EIO).is_connection_loss());
        let e = s(proto::ENOSPC).into_error("NBD write at 0+512");
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(
            e.chain_string(),
            "NBD write at 0+512: the server answered ENOSPC"
        );
    }
}
