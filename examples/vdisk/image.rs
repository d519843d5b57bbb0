//! Opening and creating images of any format: the one place the CLI dispatches on format.

use std::path::Path;
use std::sync::Arc;

use vdisk::block_io::{self, BlockDevice, FileStorage, OpenOptions, RawDisk, Storage};
use vdisk::chain::{self, Format};

use crate::size::{parse_bool, parse_options};
use crate::CliError;

/// An open image.
pub struct Image {
    /// The virtual disk.
    pub dev: Arc<dyn BlockDevice>,
    /// Its format.
    pub format: Format,
    /// Size of the container file in bytes.
    pub file_size: u64,
}

/// Parses a `-f` name.
pub fn parse_format(name: &str) -> Result<Format, CliError> {
    Format::from_name(name)
        .ok_or_else(|| CliError::new(format!("unknown format '{name}' (use raw, vhd or vhdx)")))
}

fn open_storage(path: &Path, read_only: bool) -> Result<FileStorage, CliError> {
    FileStorage::open(path, &OpenOptions::new().read_only(read_only)).map_err(CliError::from)
}

/// Opens `path`, detecting the format by content unless `format` names it.
pub fn open(path: &Path, format: Option<&str>, read_only: bool) -> Result<Image, CliError> {
    let storage = open_storage(path, read_only)?;
    let file_size = storage.len()?;
    let format = match format {
        Some(f) => parse_format(f)?,
        None => chain::detect(&storage)?,
    };
    let dev: Arc<dyn BlockDevice> = match format {
        Format::Raw => Arc::new(RawDisk::with_options(storage, 512, read_only)?),
        Format::Vhd | Format::Vhdx => {
            return Err(CliError::new(format!(
                "{} is a {} image, which this build cannot open yet",
                path.display(),
                format.name().to_uppercase()
            )))
        }
    };
    Ok(Image {
        dev,
        format,
        file_size,
    })
}

/// Creates an image of `format` and `size` at `path` with `-o` options, returning it open.
pub fn create(
    format: Format,
    path: &Path,
    size: u64,
    options: &[String],
    backing: Option<&Path>,
) -> Result<Image, CliError> {
    let opts = parse_options(options)?;
    match format {
        Format::Raw => {
            if backing.is_some() {
                return Err(CliError::new("raw images cannot have a backing file"));
            }
            let mut preallocate = false;
            for (k, v) in &opts {
                match k.as_str() {
                    "preallocation" => preallocate = v != "off",
                    "sparse" => preallocate = !parse_bool(k, v)?,
                    _ => return Err(CliError::new(format!("raw images take no option '{k}'"))),
                }
            }
            if size % 512 != 0 {
                return Err(CliError::new(format!(
                    "size {size} is not a multiple of 512 bytes"
                )));
            }
            let s = FileStorage::create(path)?;
            s.set_len(size)?;
            if preallocate {
                fill_zeros(&s, size)?;
            }
            s.sync_data()?;
            Ok(Image {
                dev: Arc::new(RawDisk::new(s)?),
                format,
                file_size: size,
            })
        }
        Format::Vhd | Format::Vhdx => Err(CliError::new(format!(
            "creating {} images is not supported by this build yet",
            format.name().to_uppercase()
        ))),
    }
}

fn fill_zeros(s: &FileStorage, size: u64) -> block_io::Result<()> {
    let z = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(z.len() as u64) as usize;
        s.write_at(&z[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
