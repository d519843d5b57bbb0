//! [`JobError`]: why a job did not complete, and [`JobResult`], what waiting for one gives.

use crate::handle::JobReport;

/// What waiting for a job gives: its report, or why it stopped.
pub type JobResult = Result<JobReport, JobError>;

/// Why a job could not start or did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The job was cancelled; the guest's disk reads as before and guest I/O goes on there
    /// (a commit may have written its base where the layers above hide it).
    #[error("the job was cancelled")]
    Cancelled,
    /// Another job already runs on this disk.
    #[error("another job already runs on this disk")]
    Busy,
    /// The request does not fit the disks (sizes, alignment, range).
    #[error("invalid job: {0}")]
    Invalid(String),
    /// Reading the source failed.
    #[error("cannot read the source at offset {offset}")]
    Source {
        /// Where, in bytes of the source.
        offset: u64,
        /// What the device said.
        #[source]
        source: block_io::Error,
    },
    /// Writing or flushing the destination failed.
    #[error("cannot {op} the destination at offset {offset}")]
    Destination {
        /// `write`, `zero` or `flush`.
        op: &'static str,
        /// Where, in bytes of the destination.
        offset: u64,
        /// What the device said.
        #[source]
        source: block_io::Error,
    },
    /// A job could not prepare an image (a commit: open its base writable, record the base's
    /// new id in a child; a compaction: open the image writable): an image held by another
    /// writer gives a source of kind [`block_io::ErrorKind::Locked`].
    #[error("cannot prepare {path} for the job")]
    Prepare {
        /// The image.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: block_io::Error,
    },
    /// A commit could not delete or unlink a merged layer after its pivot (the guest is
    /// already on the base; the file is stale).
    #[error("cannot retire the merged layer {path}")]
    Retire {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The runtime the job ran on went away (shut down) before the job ended.
    #[error("the job's runtime stopped before the job ended")]
    Aborted,
    /// The job runner could not be set up.
    #[error("cannot start the job runtime")]
    Runtime(#[source] std::io::Error),
}

impl JobError {
    /// Whether this is [`JobError::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, JobError::Cancelled)
    }
}
