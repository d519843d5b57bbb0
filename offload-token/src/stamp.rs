//! Source stamps: a SHA-256 over what identifies a source's files and their write state, so
//! that a token minted by one process can be refused by another if the source changed
//! between them (see [`Provider::admit`](crate::Provider::admit)). Within one process the
//! [`TrackedDisk`](crate::TrackedDisk) sees every write and needs no stamp.
//!
//! A [`FileState`] is a file's device, inode, size, modification and status-change times
//! (ns). Any write through the file system updates the status-change time (ctime), which an
//! unprivileged user cannot set back, and replacing the file changes its inode. Limits:
//! - ctime has the resolution of the kernel's coarse clock (a few ms): a write in the same
//!   tick as the previous one may leave it unchanged. [`settle`] waits until the newest
//!   ctime is older than a margin before stamping, so every later write shows.
//! - Writes through a shared mapping update ctime only when written back; a system clock
//!   set backwards can repeat a ctime; a block device's contents have no ctime at all.
//! - The stamp binds files, not bytes: a write that restores the same bytes still changes
//!   it (a needless refusal, never a wrong copy).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The state of one file, as a stamp records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileState {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Status-change time, ns since the epoch.
    pub ctime_ns: i128,
}

impl FileState {
    /// Reads the state of the file at `path` (following symlinks).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileState {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }

    /// Whether two states are of the same file (device and inode), whatever its contents.
    pub fn same_file(&self, other: &FileState) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// Builds a stamp from labelled parts.
#[derive(Debug, Clone, Default)]
pub struct StampBuilder(Sha256);

impl StampBuilder {
    /// An empty stamp.
    pub fn new() -> Self {
        let mut h = Sha256::new();
        h.update(b"vdisk source stamp v1\0");
        StampBuilder(h)
    }

    /// Adds a file's state.
    pub fn file(mut self, st: &FileState) -> Self {
        self.0.update(b"file");
        self.0.update(st.dev.to_be_bytes());
        self.0.update(st.ino.to_be_bytes());
        self.0.update(st.size.to_be_bytes());
        self.0.update(st.mtime_ns.to_be_bytes());
        self.0.update(st.ctime_ns.to_be_bytes());
        self
    }

    /// Adds any bytes (a format's own identity, such as a VHDX DataWriteGuid), length-prefixed.
    pub fn bytes(mut self, label: &str, bytes: &[u8]) -> Self {
        self.0.update((label.len() as u64).to_be_bytes());
        self.0.update(label.as_bytes());
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    /// The stamp.
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.0.finalize());
        out
    }
}

/// Waits until the newest ctime among `paths` is at least `margin` in the past (at most
/// `margin` plus a little per try, a few tries), so that any write after this returns gets
/// a later ctime than the one a stamp is about to record. Fails if the files keep changing.
pub fn settle(paths: &[&Path], margin: Duration) -> std::io::Result<()> {
    let margin_ns = i128::try_from(margin.as_nanos()).unwrap_or(i128::MAX);
    for _ in 0..8 {
        let mut newest = i128::MIN;
        for p in paths {
            newest = newest.max(FileState::of(p)?.ctime_ns);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        let age = now.saturating_sub(newest);
        if age >= margin_ns {
            return Ok(());
        }
        let wait = u64::try_from(margin_ns - age).unwrap_or(u64::MAX);
        std::thread::sleep(Duration::from_nanos(wait).min(margin));
    }
    Err(std::io::Error::other(
        "the source keeps changing while a token is minted over it",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_after_settling_changes_the_stamp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        settle(&[&p], Duration::from_millis(50)).unwrap();
        let stamp = |p: &Path| {
            StampBuilder::new()
                .file(&FileState::of(p).unwrap())
                .finish()
        };
        let before = stamp(&p);
        assert_eq!(before, stamp(&p));
        // Same length, same bytes: still a write, still a new stamp.
        std::fs::write(&p, b"abc").unwrap();
        assert_ne!(before, stamp(&p));
    }
}
