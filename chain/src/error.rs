//! The chain's errors: every refusal names the path and the rule.

use std::path::PathBuf;

use block_io::{Error as IoError, ErrorKind};
use uuid::Uuid;

/// Why a parent candidate was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tried {
    /// Which locator entry it came from ("relative_path", "W2ru", ...).
    pub source: String,
    /// The path as written in the child.
    pub raw: String,
    /// Where it resolved to, if it got that far.
    pub resolved: Option<PathBuf>,
    /// Why it was passed over.
    pub reason: String,
}

impl std::fmt::Display for Tried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} '{}'", self.source, self.raw)?;
        if let Some(r) = &self.resolved {
            write!(f, " -> {}", r.display())?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// An error opening or using a chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// An image could not be opened or parsed.
    #[error("cannot open {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// What failed.
        #[source]
        source: IoError,
    },
    /// No locator of a child led to a usable parent.
    #[error("the parent of {child} was not found (tried: {})", list(.tried))]
    ParentNotFound {
        /// The child.
        child: PathBuf,
        /// Every candidate and why it failed.
        tried: Vec<Tried>,
    },
    /// A parent path was refused by the path policy.
    #[error("the parent path {path} of {child} is refused: {rule}")]
    PolicyRefused {
        /// The child.
        child: PathBuf,
        /// The refused path.
        path: PathBuf,
        /// The rule that refused it.
        rule: String,
    },
    /// The chain comes back to an image already in it.
    #[error("the chain loops: {child} names {parent}, which is already in the chain")]
    Loop {
        /// The child naming the parent.
        child: PathBuf,
        /// The parent already open.
        parent: PathBuf,
    },
    /// The chain is deeper than allowed.
    #[error("the chain under {top} is deeper than {max} layers")]
    TooDeep {
        /// The top image.
        top: PathBuf,
        /// The cap.
        max: usize,
    },
    /// The parent's identity is not the one the child recorded: it was modified or replaced
    /// after the child was made, and the child's data may no longer make sense on top of it.
    #[error(
        "possible corruption: {child} expects parent {expected} but {parent} has {found}; \
         the parent was modified or replaced after the child was made"
    )]
    LineageMismatch {
        /// The child.
        child: PathBuf,
        /// The parent.
        parent: PathBuf,
        /// What the child recorded (e.g. "DataWriteGuid {..}").
        expected: String,
        /// What the parent has.
        found: String,
    },
    /// Parent and child disagree on geometry.
    #[error("{parent} cannot be the parent of {child}: {why}")]
    Geometry {
        /// The child.
        child: PathBuf,
        /// The parent.
        parent: PathBuf,
        /// What does not fit.
        why: String,
    },
    /// A rebase target is not the content the child records as its parent (nothing was
    /// written).
    #[error(
        "refusing to rebase {child} onto {new_parent}: the child records its parent as \
         {expected} but {new_parent} has {found}; it is not the same content"
    )]
    RebaseMismatch {
        /// The child.
        child: PathBuf,
        /// The proposed parent.
        new_parent: PathBuf,
        /// What the child recorded.
        expected: String,
        /// What the proposed parent has.
        found: String,
    },
    /// A rebase that cannot be done (nothing was written).
    #[error("cannot rebase {child}: {reason}")]
    RebaseRefused {
        /// The child.
        child: PathBuf,
        /// Why.
        reason: String,
    },
    /// A copying rebase reads the child's current parent chain, which does not open (nothing
    /// was written).
    #[error("cannot rebase {child}: its current parent chain does not open (a copying rebase reads it; -u changes only the link)")]
    RebaseOldChain {
        /// The child.
        child: PathBuf,
        /// Why the chain does not open.
        #[source]
        source: Box<ChainError>,
    },
    /// Copying data into a child for a rebase failed (the child still shows its content on
    /// its old parent: its link was not changed).
    #[error("copying data into {child} for the rebase failed; its parent link is unchanged")]
    RebaseCopy {
        /// The child.
        child: PathBuf,
        /// What failed.
        #[source]
        source: IoError,
    },
    /// Rewriting a child's parent locator failed.
    #[error("rewriting the parent locator of {child} failed")]
    RebaseFailed {
        /// The child.
        child: PathBuf,
        /// What failed.
        #[source]
        source: IoError,
    },
}

fn list(t: &[Tried]) -> String {
    if t.is_empty() {
        return "no locator".into();
    }
    t.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl ChainError {
    /// The block-io kind this error maps to at the `BlockDevice` boundary.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChainError::Open { source, .. } => source.kind(),
            ChainError::ParentNotFound { .. } => ErrorKind::InvalidInput,
            ChainError::PolicyRefused { .. } => ErrorKind::InvalidInput,
            ChainError::Loop { .. } | ChainError::TooDeep { .. } => ErrorKind::Corrupt,
            ChainError::LineageMismatch { .. } => ErrorKind::Corrupt,
            ChainError::Geometry { .. } => ErrorKind::Corrupt,
            ChainError::RebaseMismatch { .. } => ErrorKind::InvalidInput,
            ChainError::RebaseRefused { .. } => ErrorKind::Unsupported,
            ChainError::RebaseOldChain { source, .. } => source.kind(),
            ChainError::RebaseCopy { source, .. } => source.kind(),
            ChainError::RebaseFailed { source, .. } => source.kind(),
        }
    }
}

impl From<ChainError> for IoError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Open { path, source } => {
                source.context_with(format!("cannot open {}", path.display()))
            }
            ChainError::RebaseFailed { child, source } => source.context_with(format!(
                "rewriting the parent locator of {} failed",
                child.display()
            )),
            ChainError::RebaseCopy { child, source } => source.context_with(format!(
                "copying data into {} for the rebase failed; its parent link is unchanged",
                child.display()
            )),
            ChainError::RebaseOldChain { child, source } => {
                let kind = source.kind();
                IoError::with_source(
                    kind,
                    format!(
                        "cannot rebase {}: its current parent chain does not open (a copying \
                         rebase reads it; -u changes only the link)",
                        child.display()
                    ),
                    *source,
                )
            }
            other => IoError::new(other.kind(), other.to_string()),
        }
    }
}

/// A GUID as Windows prints it: "{xxxxxxxx-...}".
pub fn braced(u: &Uuid) -> String {
    format!("{{{}}}", u.hyphenated())
}
