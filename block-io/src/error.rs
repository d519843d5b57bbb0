//! The crate's one public error: a small [`ErrorKind`] plus context and an optional source.
//!
//! Every layer above (format crates, the chain, the CLI) converts into this type at the
//! `BlockDevice` boundary, so the kind is what a protocol boundary maps to a status (virtio
//! IOERR/UNSUPP, a CLI exit code) and the message chain is what a person reads.

use std::borrow::Cow;
use std::fmt;

/// What went wrong, coarsely: the part a caller branches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The underlying storage failed (EIO and friends).
    Io,
    /// The underlying storage is out of space (ENOSPC).
    NoSpace,
    /// An offset or length lies beyond the end of the device or file.
    OutOfRange,
    /// An offset or length is not a multiple of the required alignment.
    Unaligned,
    /// A write was attempted on a read-only device.
    ReadOnly,
    /// The operation or feature is not supported by this device or format.
    Unsupported,
    /// An argument given by the caller is invalid.
    InvalidInput,
    /// On-disk data is malformed or inconsistent.
    Corrupt,
    /// An earlier write or sync failed; the device refuses writes until it is reopened.
    Failed,
    /// The fault-injecting backend cut power; nothing more reaches its durable image.
    PowerCut,
    /// Another user holds an image lock that conflicts with this open (QEMU's "Failed to get
    /// \"write\" lock"); opening with the lock off (`-U`, force share) skips the locks.
    Locked,
}

impl ErrorKind {
    /// A short lower-case phrase for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::Unaligned => "unaligned request",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Failed => "device failed earlier",
            ErrorKind::PowerCut => "power cut",
            ErrorKind::Locked => "image locked by another user",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of `block-io` and of every [`BlockDevice`](crate::BlockDevice).
pub struct Error {
    kind: ErrorKind,
    context: Cow<'static, str>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` described by `context` (a short sentence fragment, e.g.
    /// "read at 4096 beyond end of file").
    pub fn new(kind: ErrorKind, context: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An I/O error from the OS, classified by errno (ENOSPC becomes [`ErrorKind::NoSpace`]).
    pub fn io(context: impl Into<Cow<'static, str>>, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => match err.kind() {
                std::io::ErrorKind::UnexpectedEof => ErrorKind::OutOfRange,
                std::io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                std::io::ErrorKind::Unsupported => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
        };
        Error::with_source(kind, context, err)
    }

    /// The coarse kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context sentence of this error (without its sources).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Wraps this error in more context, keeping its kind.
    pub fn context_with(self, context: impl Into<Cow<'static, str>>) -> Self {
        let kind = self.kind;
        Error::with_source(kind, context, self)
    }

    /// The whole chain as one line: "context: source: source ...".
    pub fn chain_string(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?}, {:?}", self.kind, self.chain_string())?;
        f.write_str(")")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(self.kind.as_str())
        } else {
            f.write_str(&self.context)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|b| &**b as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::io("I/O failed", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space() {
        let e = Error::io("write", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e = Error::io("write", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn chain_string_includes_sources() {
        let inner = Error::new(ErrorKind::Corrupt, "bad checksum");
        let outer = inner.context_with("opening a.vhd");
        assert_eq!(outer.kind(), ErrorKind::Corrupt);
        assert_eq!(outer.chain_string(), "opening a.vhd: bad checksum");
    }
}
