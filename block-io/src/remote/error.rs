//! [`RemoteError`]: what can go wrong talking to a web server or an object store, and which of
//! it is worth a retry.

use crate::error::{Error, ErrorKind};

/// A failure of a remote storage, carried as the source of the crate's [`Error`] (find it with
/// [`RemoteError::find`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The object is no longer the one that was opened (its ETag, Last-Modified or size
    /// changed, or the server refused `If-Match`). Every later read fails the same way.
    #[error("{url} changed since it was opened (was {expected}; now {found})")]
    Changed {
        /// The object's URL.
        url: String,
        /// The version captured at open.
        expected: String,
        /// What the server reported instead.
        found: String,
    },
    /// The server answered a range request with the whole object (200 instead of 206, or
    /// `Accept-Ranges: none`): it cannot back a random-access storage.
    #[error("{url}: the server ignores range requests (it answered {status} to a Range request)")]
    RangesIgnored {
        /// The object's URL.
        url: String,
        /// The status it answered with.
        status: u16,
    },
    /// The server answered with an unexpected HTTP status.
    #[error("{url}: HTTP status {status}")]
    Status {
        /// The object's URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The connection failed, timed out, or broke mid-response.
    #[error("{url}: {detail}")]
    Transport {
        /// The object's URL.
        url: String,
        /// The transport's description, with its causes.
        detail: String,
    },
    /// A response ended before the requested range did.
    #[error("{url}: response for {offset}+{want} ended after {got} bytes")]
    Truncated {
        /// The object's URL.
        url: String,
        /// Start of the requested range.
        offset: u64,
        /// Bytes asked for.
        want: u64,
        /// Bytes received.
        got: u64,
    },
    /// A response broke the protocol (a missing or wrong `Content-Range`, an oversized body).
    #[error("{url}: {detail}")]
    Protocol {
        /// The object's URL.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The object store refused or failed an operation (`object_store`'s own retries spent).
    #[error("{url}: {detail}")]
    Store {
        /// The object's URL.
        url: String,
        /// The store's description, with its causes.
        detail: String,
        /// Whether the object does not exist.
        not_found: bool,
    },
    /// The URL cannot be used.
    #[error("{url}: {detail}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why not.
        detail: String,
    },
    /// The options cannot be used (e.g. unreadable CA certificates).
    #[error("{detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
    /// The background runtime could not be started or dropped a request.
    #[error("the remote-storage runtime failed: {detail}")]
    Runtime {
        /// What failed.
        detail: String,
    },
}

impl RemoteError {
    /// The [`ErrorKind`] this failure maps to: [`ErrorKind::Corrupt`] for a changed object,
    /// [`ErrorKind::Unsupported`] for a server that ignores ranges, [`ErrorKind::InvalidInput`]
    /// for a bad URL or a missing object, [`ErrorKind::Io`] otherwise.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemoteError::Changed { .. } => ErrorKind::Corrupt,
            RemoteError::RangesIgnored { .. } => ErrorKind::Unsupported,
            RemoteError::BadUrl { .. } | RemoteError::Config { .. } => ErrorKind::InvalidInput,
            RemoteError::Status { status: 404, .. } => ErrorKind::InvalidInput,
            RemoteError::Store {
                not_found: true, ..
            } => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        }
    }

    /// Whether another try may succeed: connection failures, timeouts, truncated bodies, HTTP
    /// 5xx, 408 and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Transport { .. } | RemoteError::Truncated { .. } => true,
            RemoteError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }

    /// The `RemoteError` somewhere in `err`'s source chain, if any.
    pub fn find(err: &Error) -> Option<&RemoteError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<RemoteError>() {
                return Some(r);
            }
            cur = e.source();
        }
        None
    }

    /// This failure as the crate's error, with `context` (e.g. "reading 0+4096").
    pub(crate) fn into_error(self, context: impl Into<std::borrow::Cow<'static, str>>) -> Error {
        Error::with_source(self.kind(), context, self)
    }
}

/// A one-line description of `e` with its causes.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_kinds() {
        let st = |status| RemoteError::Status {
            url: "u".into(),
            status,
        };
        assert!(st(503).is_transient());
        assert!(st(429).is_transient());
        assert!(!st(404).is_transient());
        assert_eq!(st(404).kind(), ErrorKind::InvalidInput);
        let ch = RemoteError::Changed {
            url: "u".into(),
            expected: "a".into(),
            found: "b".into(),
        };
        assert!(!ch.is_transient());
        let e = ch
            .clone()
            .into_error("reading 0+1")
            .context_with("opening x");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(RemoteError::find(&e), Some(&ch));
    }
}
