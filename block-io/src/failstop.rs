//! [`FailStop`]: latch the first failed write or sync and refuse further writes.
//!
//! After a write or `fsync` fails, the kernel may have dropped dirty pages: what the file holds
//! is unknown, and a later "successful" sync proves nothing. A device therefore stops accepting
//! writes at the first such failure, until it is reopened (which re-reads the on-disk state).
//! Reads keep working.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, ErrorKind, Result};

/// Latches the first write/sync error; later writes fail with [`ErrorKind::Failed`].
#[derive(Debug, Default)]
pub struct FailStop {
    failed: AtomicBool,
    first: Mutex<Option<String>>,
}

impl FailStop {
    /// A fresh, unlatched state.
    pub fn new() -> Self {
        Self::default()
    }

    /// `true` once an error has been latched.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Fails with [`ErrorKind::Failed`] (naming the first error) once latched.
    pub fn check(&self) -> Result<()> {
        if !self.is_failed() {
            return Ok(());
        }
        let first = self.first.lock().clone().unwrap_or_default();
        Err(Error::new(
            ErrorKind::Failed,
            format!("an earlier write or sync failed ({first}); reopen the image"),
        ))
    }

    /// Latches `err` if nothing is latched yet.
    pub fn latch(&self, err: &Error) {
        let mut first = self.first.lock();
        if first.is_none() {
            *first = Some(err.chain_string());
        }
        self.failed.store(true, Ordering::Release);
    }

    /// Passes `result` through, latching its error (if any).
    pub fn guard<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.latch(e);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latches_first_error_only() {
        let fs = FailStop::new();
        assert!(fs.check().is_ok());
        let r: Result<()> = fs.guard(Err(Error::new(ErrorKind::Io, "first")));
        assert!(r.is_err());
        fs.latch(&Error::new(ErrorKind::Io, "second"));
        let e = fs.check().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert!(e.to_string().contains("first"), "{e}");
        assert!(!e.to_string().contains("second"));
    }
}
