//! `vdisk rebase -u -b NEWPARENT IMG`: point a differencing image at a moved or copied parent
//! without copying data (qemu-img's unsafe rebase, Hyper-V's `Set-VHD -ParentPath`). The new
//! parent must be the same content as the one the child records (VHDX DataWriteGuid, VHD
//! unique id and timestamp); otherwise nothing is written. See `chain::rebase`.

use std::path::Path;

use vdisk::block_io;
use vdisk::chain::{self, Disk, RebaseOptions};

use crate::image::{chain_options, parse_format};
use crate::{CliError, CliResult};

/// Runs the verb; exit 0 when the child was rebased.
pub fn run(image: &Path, backing: &Path, format: Option<&str>, unsafe_: bool) -> CliResult {
    let opts = RebaseOptions {
        unsafe_no_copy: unsafe_,
        format: format.map(parse_format).transpose()?,
    };
    // With its sources: why the child or the new parent could not be opened or rewritten.
    chain::rebase(image, backing, &opts).map_err(|e| CliError::from(block_io::Error::from(e)))?;
    // The link is written; say so if the parent path policy will not follow it.
    let check = chain_options(format, true)?;
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
