//! `vdisk rebase -b NEWPARENT IMG`: point a differencing image at another parent.
//!
//! Without `-u` (qemu-img's default, safe rebase) the image keeps its content: where the old
//! parent chain and the new one read differently, in ranges the image does not hold itself,
//! the old chain's bytes are copied into it first, then its parent link names the new parent
//! (`-p` shows progress). The old parent chain must open. With `-u` (unsafe) only the link
//! changes, onto a moved or copied parent that must be the same content as the one the child
//! records (VHDX DataWriteGuid, VHD unique id and timestamp); otherwise nothing is written.
//! See `chain::rebase`.

use std::path::Path;

use vdisk::chain::{self, Disk, RebaseOptions};

use crate::image::{chain_options, parse_format};
use crate::{CliError, CliResult};

/// Runs the verb; exit 0 when the child was rebased.
pub fn run(
    image: &Path,
    backing: &Path,
    format: Option<&str>,
    unsafe_: bool,
    progress: bool,
) -> CliResult {
    // Parent roots (VDISK_PARENT_ROOTS) and locks (-U) as every verb opens chains.
    let check = chain_options(format, true)?;
    let opts = RebaseOptions {
        unsafe_no_copy: unsafe_,
        format: format.map(parse_format).transpose()?,
        policy: check.policy.clone(),
        lock: check.lock,
    };
    let bar = (progress && !unsafe_).then(|| crate::cmds::progress_bar(0));
    let result = chain::rebase_with_progress(image, backing, &opts, &mut |p| {
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    });
    if let Some(b) = &bar {
        b.finish();
    }
    // With its sources: why the child or a parent could not be opened, read or rewritten.
    result.map_err(CliError::from)?;
    // The link is written; say so if the parent path policy will not follow it.
    if let Err(e) = Disk::open(image, &check) {
        let e = crate::cause_chain(&e);
        eprintln!(
            "vdisk: warning: {} was rebased, but opening it now fails: {e} \
             (set VDISK_PARENT_ROOTS to allow the parent's folder)",
            image.display()
        );
    }
    Ok(0)
}
