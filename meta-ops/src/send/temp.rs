//! Temporary files beside a destination: the image a full receive writes before renaming
//! it into place (`.NAME.vdisk-recv-PID-N`) and the spool of an incremental one
//! (`.NAME.vdisk-spool-PID-N`, renamed to the journal once verified), and the removal of
//! those a crashed receive left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::journal::folder_of;
use super::SendError;

/// What the temporary files are called after the destination's name and before the PID.
const KINDS: [&str; 2] = ["recv", "spool"];

/// A temporary file removed on drop unless kept.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
}

impl TempFile {
    /// Creates a new empty file beside `dest` with a name nobody else uses.
    pub(crate) fn beside(dest: &Path, what: &str) -> Result<TempFile, SendError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = folder_of(dest);
        let name = dest
            .file_name()
            .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.vdisk-{what}-{}-{n}", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(TempFile { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(SendError::File {
                        op: "create a temporary file",
                        path,
                        source,
                    })
                }
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes the temporary files that a receive into `dest` which died left beside it
/// (`.NAME.vdisk-recv-PID-N`, `.NAME.vdisk-spool-PID-N`): those of a PID other than this
/// process's with no `/proc/PID`, so never a live receive's on this host (nothing is
/// removed where there is no `/proc`). A receive on another host, or in another PID
/// namespace, sharing the folder could lose its temporary file: it then fails at its rename,
/// before its destination is made or written. Best effort; returns the files removed.
pub(crate) fn remove_stale(dest: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if !Path::new("/proc/self").exists() {
        return removed;
    }
    let Some(name) = dest.file_name().and_then(|n| n.to_str()) else {
        return removed;
    };
    let Ok(entries) = std::fs::read_dir(folder_of(dest)) else {
        return removed;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(file) = file.to_str() else { continue };
        let Some(pid) = KINDS.iter().find_map(|k| {
            let rest = file.strip_prefix(&format!(".{name}.vdisk-{k}-"))?;
            let (pid, n) = rest.split_once('-')?;
            n.parse::<u64>().ok()?;
            pid.parse::<u32>().ok()
        }) else {
            continue;
        };
        let dead = pid != me && !Path::new(&format!("/proc/{pid}")).exists();
        if dead
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_a_dead_receives_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d.vhdx");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let names = [
            format!(".d.vhdx.vdisk-recv-{dead}-0"),
            format!(".d.vhdx.vdisk-spool-{dead}-3"),
            format!(".d.vhdx.vdisk-recv-{me}-0"),
            format!(".d.vhdx.vdisk-recv-{dead}-x"),
            format!(".e.vhdx.vdisk-recv-{dead}-0"),
            "d.vhdx.vdisk-receive".to_string(),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let mut removed = remove_stale(&dest);
        removed.sort();
        assert_eq!(
            removed,
            vec![dir.path().join(&names[0]), dir.path().join(&names[1])]
        );
        for n in &names[2..] {
            assert!(dir.path().join(n).exists(), "{n}");
        }
    }
}
