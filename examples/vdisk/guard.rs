//! Refusing a destination that is a file the operation reads: `convert s.raw s.raw`, a hard
//! link or symlink to the source, a parent in the source's chain, or `create -b p p`.
//! Files are compared by device and inode, so every name of a file counts.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::CliError;

/// The (device, inode) of an existing file, following symlinks; `None` when there is none.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Refuses `dst` when it is the same file as any of `sources`, saying why with `why` (the
/// text after "... is the same file as SOURCE"). Call it before anything opens `dst` for
/// writing: creating an image truncates its file.
pub fn refuse_same_file<'a>(
    dst: &Path,
    sources: impl IntoIterator<Item = &'a Path>,
    why: &str,
) -> Result<(), CliError> {
    let Some(d) = file_id(dst) else {
        return Ok(());
    };
    for s in sources {
        if file_id(s) == Some(d) {
            return Err(CliError::new(format!(
                "{} is the same file as {}, {why}; refusing to overwrite it",
                dst.display(),
                s.display()
            )));
        }
    }
    Ok(())
}
