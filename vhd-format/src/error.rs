//! Format errors: what a malformed VHD structure looks like, converted to the family's
//! [`block_io::Error`] (kind [`ErrorKind::Corrupt`] or [`ErrorKind::Unsupported`]) at the
//! crate boundary.

use block_io::{Error, ErrorKind};

/// A malformed or unsupported on-disk structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// A structure's cookie is wrong.
    #[error("{what} has a bad cookie")]
    BadCookie {
        /// Which structure.
        what: &'static str,
    },
    /// A structure's checksum does not match its bytes.
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Which structure.
        what: &'static str,
        /// The stored checksum.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// A structure is shorter than its fixed size.
    #[error("{what} is truncated")]
    Truncated {
        /// Which structure.
        what: &'static str,
    },
    /// A field violates the spec or is inconsistent with the file.
    #[error("{0}")]
    Invalid(String),
    /// A valid but unsupported feature.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl FormatError {
    /// The [`ErrorKind`] this maps to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Unsupported(_) => ErrorKind::Unsupported,
            _ => ErrorKind::Corrupt,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        Error::with_source(e.kind(), "invalid VHD image", e)
    }
}

/// A `Corrupt` error with `msg`.
pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    FormatError::Invalid(msg.into()).into()
}

/// An `InvalidInput` error with `msg`.
pub(crate) fn invalid_input(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, msg.into())
}
