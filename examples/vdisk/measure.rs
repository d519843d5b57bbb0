//! `vdisk measure`: the bytes a new image needs, as `qemu-img measure` prints them (which does
//! not measure VHD or VHDX at all: "does not support size measurement").
//!
//! - *required size*: the file a `vdisk convert` of SRC to this format and options makes,
//!   at most (or, with `--size` and no SRC, an empty image of that size);
//! - *fully allocated size*: the file once every block is allocated.
//!
//! The metadata an image starts with is found by creating an empty one in memory with the
//! same options (so it follows the format code, not a copy of its arithmetic); each block then
//! adds its payload: VHDX a block of `block_size` (blocks are 1 MiB multiples, laid out
//! end to end), VHD a block plus its sector bitmap and the alignment padding of our allocator
//! (data on 64 KiB boundaries), counted as `block_size + 64 KiB`, an upper bound. Raw, as qemu
//! counts it: the virtual size for both (a raw file has no metadata, and its holes are the
//! file system's business).

use std::path::Path;

use vdisk::block_io::{BlockDevice, BlockStatus, MemStorage, Storage};
use vdisk::chain::Format;
use vdisk::{vhd_format, vhdx_format};

use crate::image::{self, parse_format};
use crate::size::parse_options;
use crate::CliError;

/// What [`measure`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes a convert of the source needs.
    pub required: u64,
    /// Bytes with every block allocated.
    pub fully_allocated: u64,
}

/// Slack our VHD allocator may leave before a block's data (its data alignment).
const VHD_BLOCK_SLACK: u64 = 64 << 10;

/// Measures an image of `out_format` with `-o` options holding `src` (or, without it, an empty
/// one of `size` bytes).
pub fn measure(
    src: Option<(&Path, Option<&str>)>,
    size: Option<u64>,
    out_format: &str,
    options: &[String],
) -> Result<Measure, CliError> {
    let format = parse_format(out_format)?;
    let opts = parse_options(options)?;
    let src = match src {
        Some((path, fmt)) => Some(image::open(path, fmt, true)?),
        None => None,
    };
    let virtual_size = match (&src, size) {
        (Some(_), Some(_)) => return Err(CliError::new("give either a source image or --size")),
        (Some(img), None) => img.dev.info().virtual_size,
        (None, Some(s)) => s,
        (None, None) => return Err(CliError::new("give a source image or --size")),
    };
    // The empty image: its length is the metadata; its block size, the allocation unit.
    let (empty, block, fixed, per_block) = match format {
        Format::Raw => {
            if opts.iter().any(|(k, _)| k != "preallocation") {
                return Err(CliError::new(
                    "raw images take only the option 'preallocation'",
                ));
            }
            return Ok(Measure {
                required: virtual_size,
                fully_allocated: virtual_size,
            });
        }
        Format::Vhd => {
            let o = image::vhd_create_options(virtual_size, &opts)?;
            let f = vhd_format::VhdFile::create(MemStorage::new(), &o)?;
            let d = f.details();
            let len = f.storage().len()?;
            match d.block_size {
                Some(b) => (len, u64::from(b), false, u64::from(b) + VHD_BLOCK_SLACK),
                None => (len, 1, true, 0),
            }
        }
        Format::Vhdx => {
            let o = image::vhdx_create_options(virtual_size, &opts, None)?;
            let fixed = o.subformat == vhdx_format::Subformat::Fixed;
            let f = vhdx_format::create(MemStorage::new(), &o)?;
            let len = f.storage().len()?;
            let b = u64::from(f.details().block_size);
            (len, b, fixed, b)
        }
    };
    if fixed {
        // Every block is in the file from the start.
        return Ok(Measure {
            required: empty,
            fully_allocated: empty,
        });
    }
    let total_blocks = virtual_size.div_ceil(block);
    let used_blocks = match &src {
        Some(img) => blocks_with_data(&*img.dev, block)?,
        None => 0,
    };
    let grow = |n: u64| {
        n.checked_mul(per_block)
            .and_then(|b| b.checked_add(empty))
            .ok_or_else(|| CliError::new("the image would be larger than 2^64 bytes"))
    };
    Ok(Measure {
        required: grow(used_blocks)?,
        fully_allocated: grow(total_blocks)?,
    })
}

/// How many `block`-sized blocks of `dev` hold data (anything but zeros known as such and
/// unallocated ranges), walking `block_status` runs: memory does not grow with the disk.
fn blocks_with_data(dev: &dyn BlockDevice, block: u64) -> Result<u64, CliError> {
    let size = dev.info().virtual_size;
    let (mut off, mut count) = (0u64, 0u64);
    // The last block counted, so that runs inside one block count it once.
    let mut last: Option<u64> = None;
    while off < size {
        let run = dev.block_status(off, size - off)?;
        // A run never counts past what was asked (a device reporting more is clamped).
        let len = run.len.min(size - off);
        if len == 0 {
            return Err(CliError::new(format!(
                "the source reported an empty allocation run at offset {off}"
            )));
        }
        if run.status == BlockStatus::Data {
            let first = off / block;
            let end = (off + len - 1) / block;
            let from = match last {
                Some(l) if l >= first => l + 1,
                _ => first,
            };
            if end >= from {
                count += end - from + 1;
                last = Some(end);
            }
        }
        off += len;
    }
    Ok(count)
}

/// Prints a [`Measure`] as `qemu-img measure` does (human or JSON).
pub fn print(m: &Measure, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"required": m.required, "fully-allocated": m.fully_allocated})
        );
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
    }
}
