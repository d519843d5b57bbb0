//! Errors of the VHDX parser and layer.
//!
//! Parsing code returns [`FormatError`] (what is wrong with the on-disk bytes, and where);
//! at the [`block_io::BlockDevice`] boundary it becomes a [`block_io::Error`] of kind
//! `Corrupt` (malformed image) or `Unsupported` (valid but not handled here).

use block_io::{Error, ErrorKind};

/// What is wrong with a VHDX image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// On-disk bytes violate MS-VHDX.
    #[error("{structure}: {reason}")]
    Corrupt {
        /// The structure concerned ("header 1", "region table", ...).
        structure: &'static str,
        /// A short sentence saying what is wrong.
        reason: String,
    },
    /// A valid image uses something this crate does not handle.
    #[error("{structure}: unsupported: {reason}")]
    Unsupported {
        /// The structure concerned.
        structure: &'static str,
        /// What is not supported.
        reason: String,
    },
}

impl FormatError {
    /// A `Corrupt` error about `structure`.
    pub fn corrupt(structure: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Corrupt {
            structure,
            reason: reason.into(),
        }
    }

    /// An `Unsupported` error about `structure`.
    pub fn unsupported(structure: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Unsupported {
            structure,
            reason: reason.into(),
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        let kind = match e {
            FormatError::Corrupt { .. } => ErrorKind::Corrupt,
            FormatError::Unsupported { .. } => ErrorKind::Unsupported,
        };
        Error::with_source(kind, "invalid VHDX image", e)
    }
}

/// Shorthand for a `Corrupt` [`FormatError`].
pub(crate) fn corrupt(structure: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::corrupt(structure, reason)
}

/// Shorthand for a `block_io::Error` of kind `Corrupt`.
pub(crate) fn corrupt_io(context: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, context.into())
}
