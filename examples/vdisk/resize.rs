//! `vdisk resize [--shrink] [--force] [-f FMT] IMG [+|-]SIZE`: change an image's virtual size,
//! as `qemu-img resize` does (`meta_ops::resize_image`: crash-safe at every write and sync).
//!
//! SIZE is absolute, or relative with `+`/`-`. Shrinking needs `--shrink` (as with qemu-img);
//! a VHD or VHDX shrink that would cut data is still refused, `--force` drops that data
//! (VHDX and raw; a VHD is only ever shrunk when nothing is cut). A raw image shrinks with
//! `--shrink`. Only IMG changes: a differencing image's parents are not opened (a VHD child
//! cannot grow past its parent; a VHDX child may, and reads zeros past the parent's end).

use std::path::PathBuf;

use vdisk::block_io::BlockDevice;
use vdisk::chain::Format;
use vdisk::meta_ops::{self, ResizeError};

use crate::{CliError, CliResult};

/// `vdisk resize` arguments.
#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Allow the size to decrease (refused otherwise).
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink: drop data that lies past the new end instead of refusing.
    #[arg(long, requires = "shrink")]
    pub force: bool,
    /// Format of the image (detected if absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// The image.
    pub image: PathBuf,
    /// The new size, or +SIZE / -SIZE relative to the current one (K/M/G/T suffixes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

fn err(e: ResizeError) -> CliError {
    let hint = if e.would_cut_data() {
        " (--shrink --force drops it)"
    } else {
        ""
    };
    CliError::new(format!("{}{hint}", crate::cause_chain(&e)))
}

/// The size `spec` asks for: absolute, or `+SIZE` / `-SIZE` relative to `current`.
pub fn new_size(current: u64, spec: &str) -> Result<u64, CliError> {
    let s = spec.trim();
    if let Some(d) = s.strip_prefix('+') {
        current
            .checked_add(crate::size::parse_size(d)?)
            .ok_or_else(|| CliError::new("the new size overflows"))
    } else if let Some(d) = s.strip_prefix('-') {
        current
            .checked_sub(crate::size::parse_size(d)?)
            .filter(|&n| n > 0)
            .ok_or_else(|| CliError::new("the new size is not positive"))
    } else {
        crate::size::parse_size(s)
    }
}

/// Runs the verb.
pub fn run(a: ResizeArgs) -> CliResult {
    let (current, format) = {
        let img = crate::image::open(&a.image, a.format.as_deref(), true)?;
        (img.dev.info().virtual_size, img.format)
    };
    let new_size = new_size(current, &a.size)?;
    if new_size < current && !a.shrink {
        return Err(CliError::new(format!(
            "shrinking {} from {current} to {new_size} bytes needs --shrink",
            a.image.display()
        )));
    }
    let force = a.force || (format == Format::Raw && a.shrink);
    meta_ops::resize_image(
        &a.image,
        Some(format),
        new_size,
        force,
        crate::image::lock_mode(),
    )
    .map_err(err)?;
    println!("Image resized.");
    Ok(0)
}
