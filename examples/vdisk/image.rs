//! Opening and creating images of any format: the one place the CLI dispatches on format.
//! Opening goes through `chain::Disk`, so differencing images come with their parents.

use std::path::Path;
use std::sync::Arc;

use vdisk::block_io::{self, BlockDevice, FileStorage, RawDisk, Storage};
use vdisk::chain::{self, Disk, Format, OpenOptions};
use vdisk::{vhd_format, vhdx_format};

use crate::size::{parse_bool, parse_options, parse_size};
use crate::CliError;

/// An open image (with its chain).
pub struct Image {
    /// The virtual disk.
    pub dev: Arc<dyn BlockDevice>,
    /// The same disk as a chain, when it was opened as one.
    pub chain: Option<Arc<Disk>>,
    /// The top image's format.
    pub format: Format,
}

/// Parses a `-f` name.
pub fn parse_format(name: &str) -> Result<Format, CliError> {
    Format::from_name(name)
        .ok_or_else(|| CliError::new(format!("unknown format '{name}' (use raw, vhd or vhdx)")))
}

/// Whether `-U`/`--force-share` was given: no image locks taken or tested, anywhere.
static FORCE_SHARE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets `-U` for the whole command (called once, from `main`).
pub fn set_force_share(yes: bool) {
    FORCE_SHARE.store(yes, std::sync::atomic::Ordering::Relaxed);
}

/// The lock mode every open of this command uses: [`block_io::LockMode::Off`] under `-U`.
pub fn lock_mode() -> block_io::LockMode {
    if FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed) {
        block_io::LockMode::Off
    } else {
        block_io::LockMode::Auto
    }
}

/// Options for opening one image file directly (read-only ones share writes until the
/// caller knows the format, as QEMU's raw driver does; see [`refuse_writers_if_format`]).
pub fn file_options(read_only: bool) -> block_io::OpenOptions {
    block_io::OpenOptions::new()
        .read_only(read_only)
        .lock(lock_mode())
        .share_writes(read_only)
}

/// A read-only VHD/VHDX opened with [`file_options`] then refuses writers, as QEMU's format
/// drivers do (their metadata must not change under them); a raw one keeps sharing.
pub fn refuse_writers_if_format(s: &mut FileStorage, format: Format) -> Result<(), CliError> {
    if format != Format::Raw && s.is_read_only() {
        s.set_share_writes(false)?;
    }
    Ok(())
}

/// Chain options from the environment: `VDISK_PARENT_ROOTS` (colon-separated folders where
/// parents may live besides the child's own tree), and `-U`.
pub fn chain_options(format: Option<&str>, read_only: bool) -> Result<OpenOptions, CliError> {
    let mut o = OpenOptions::new()
        .read_only(read_only)
        .format(format.map(parse_format).transpose()?)
        .lock(lock_mode())
        .remote_parents(crate::remote::remote_parents());
    if let Some(roots) = std::env::var_os("VDISK_PARENT_ROOTS") {
        o.policy.roots = std::env::split_paths(&roots).collect();
    }
    Ok(o)
}

/// How a verb opens an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct Access {
    /// Open the top read-only (parents always are).
    pub read_only: bool,
    /// `O_DIRECT` on every layer (`-t none`, `--cache none`).
    pub direct: bool,
    /// No host readahead on any layer (`vdisk serve --cache writeback`: the guest reads ahead
    /// itself; see `block_io::OpenOptions::random_access`).
    pub random_access: bool,
    /// No image locks (qemu-img's `-U`/`--force-share`).
    pub force_share: bool,
}

/// Opens `path` with its parents, detecting the format by content unless `format` names it.
pub fn open(path: &Path, format: Option<&str>, read_only: bool) -> Result<Image, CliError> {
    open_with(
        path,
        format,
        &Access {
            read_only,
            ..Access::default()
        },
    )
}

/// [`open`] with the cache mode and locking asked.
pub fn open_with(path: &Path, format: Option<&str>, access: &Access) -> Result<Image, CliError> {
    if crate::remote::is_url(path) {
        return crate::remote::open(path, format, access);
    }
    let mut opts = chain_options(format, access.read_only)?;
    opts.direct = access.direct;
    opts.random_access = access.random_access;
    if access.force_share {
        opts.lock = block_io::LockMode::Off;
    }
    let disk = Disk::open(path, &opts)?;
    let format = disk.layers()[0].format;
    let disk = Arc::new(disk);
    Ok(Image {
        dev: disk.clone(),
        chain: Some(disk),
        format,
    })
}

/// Creates an image of `format` and `size` at `path` with `-o` options, returning it open.
/// With `backing`, creates a differencing child of that parent (same size and sector size
/// unless a larger size is given, which only VHDX allows).
pub fn create(
    format: Format,
    path: &Path,
    size: u64,
    options: &[String],
    backing: Option<&Path>,
) -> Result<Image, CliError> {
    let opts = parse_options(options)?;
    let dev: Arc<dyn BlockDevice> = match (format, backing) {
        (Format::Raw, Some(_)) => {
            return Err(CliError::new("raw images cannot have a backing file"))
        }
        (Format::Raw, None) => Arc::new(create_raw(path, size, &opts)?),
        (Format::Vhd, None) => Arc::new(create_vhd(path, size, &opts)?),
        (Format::Vhdx, None) => Arc::new(create_vhdx(path, size, &opts, None)?),
        (Format::Vhd, Some(parent)) => Arc::new(create_vhd_child(path, size, &opts, parent)?),
        (Format::Vhdx, Some(parent)) => {
            let (pref, psize, sector) = vhdx_parent(path, parent)?;
            let size = if size == 0 { psize } else { size };
            let mut o = opts.clone();
            if !o.iter().any(|(k, _)| k == "logical_sector_size") {
                o.push(("logical_sector_size".into(), sector.to_string()));
            }
            let mut f = create_vhdx(path, size, &o, Some(pref))?;
            if crate::remote::is_url(parent) {
                crate::remote::record_vhdx_url(&mut f, parent)?;
            }
            Arc::new(f)
        }
    };
    Ok(Image {
        dev,
        chain: None,
        format,
    })
}

fn unknown(format: &str, k: &str) -> CliError {
    CliError::new(format!("{format} images take no option '{k}'"))
}

fn create_raw(
    path: &Path,
    size: u64,
    opts: &[(String, String)],
) -> Result<RawDisk<FileStorage>, CliError> {
    let mut preallocate = false;
    for (k, v) in opts {
        match k.as_str() {
            "preallocation" => preallocate = v != "off",
            _ => return Err(unknown("raw", k)),
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
        let z = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(z.len() as u64) as usize;
            s.write_at(&z[..n], pos)?;
            pos += n as u64;
        }
    }
    s.sync_data()?;
    Ok(RawDisk::new(s)?)
}

fn subformat_fixed(k: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "fixed" => Ok(true),
        "dynamic" => Ok(false),
        _ => Err(CliError::new(format!(
            "option {k} takes fixed or dynamic, not '{v}'"
        ))),
    }
}

fn u32_size(k: &str, v: &str) -> Result<u32, CliError> {
    u32::try_from(parse_size(v)?).map_err(|_| CliError::new(format!("option {k}={v} is too large")))
}

fn create_vhd(
    path: &Path,
    size: u64,
    opts: &[(String, String)],
) -> Result<vhd_format::VhdFile<FileStorage>, CliError> {
    let o = vhd_create_options(size, opts)?;
    let s = FileStorage::create(path)?;
    Ok(vhd_format::VhdFile::create(s, &o)?)
}

/// The VHD creation options `-o` asks for.
pub fn vhd_create_options(
    size: u64,
    opts: &[(String, String)],
) -> Result<vhd_format::CreateOptions, CliError> {
    let mut o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
    for (k, v) in opts {
        match k.as_str() {
            "subformat" => {
                o.subformat = if subformat_fixed(k, v)? {
                    vhd_format::Subformat::Fixed
                } else {
                    vhd_format::Subformat::Dynamic
                }
            }
            "block_size" => o.block_size = u32_size(k, v)?,
            "chs_size" => o.chs_size = parse_bool(k, v)?,
            // qemu-img's name: force_size=on is our default (exact size); off sizes by CHS.
            "force_size" => o.chs_size = !parse_bool(k, v)?,
            _ => return Err(unknown("VHD", k)),
        }
    }
    Ok(o)
}

fn create_vhdx(
    path: &Path,
    size: u64,
    opts: &[(String, String)],
    parent: Option<vhdx_format::ParentRef>,
) -> Result<vhdx_format::VhdxFile<FileStorage>, CliError> {
    let o = vhdx_create_options(size, opts, parent)?;
    let s = FileStorage::create(path)?;
    Ok(vhdx_format::create(s, &o)?)
}

/// The VHDX creation options `-o` asks for (a differencing image's with `parent`).
pub fn vhdx_create_options(
    size: u64,
    opts: &[(String, String)],
    parent: Option<vhdx_format::ParentRef>,
) -> Result<vhdx_format::CreateOptions, CliError> {
    let mut o = match parent {
        Some(p) => vhdx_format::CreateOptions::differencing(size, p),
        None => vhdx_format::CreateOptions::dynamic(size),
    };
    for (k, v) in opts {
        match k.as_str() {
            "subformat" if o.parent.is_none() => {
                o.subformat = if subformat_fixed(k, v)? {
                    vhdx_format::Subformat::Fixed
                } else {
                    vhdx_format::Subformat::Dynamic
                }
            }
            "block_size" => o.block_size = Some(u32_size(k, v)?),
            "log_size" => o.log_size = u32_size(k, v)?,
            "block_state_zero" => o.block_state_zero = parse_bool(k, v)?,
            "logical_sector_size" => o.logical_sector_size = u32_size(k, v)?,
            "physical_sector_size" => o.physical_sector_size = Some(u32_size(k, v)?),
            _ => return Err(unknown("VHDX", k)),
        }
    }
    Ok(o)
}

fn vhdx_parent(
    child: &Path,
    parent: &Path,
) -> Result<(vhdx_format::ParentRef, u64, u32), CliError> {
    if crate::remote::is_url(parent) {
        return crate::remote::vhdx_parent(child, parent);
    }
    let l = chain::open_layer_with(
        parent,
        None,
        &chain::LayerOptions {
            read_only: true,
            lock: lock_mode(),
            parent: true,
            ..Default::default()
        },
    )?;
    let chain::Identity::Vhdx {
        data_write_guid, ..
    } = l.identity
    else {
        return Err(CliError::new(format!(
            "a VHDX child needs a VHDX parent; {} is {}",
            parent.display(),
            l.format
        )));
    };
    let (relative, abs) =
        chain::parent_paths(child, parent).map_err(|e| CliError::new(e.to_string()))?;
    let info = l.dev.info();
    Ok((
        vhdx_format::ParentRef {
            data_write_guid,
            relative_path: relative,
            absolute_path: Some(abs.display().to_string()),
        },
        info.virtual_size,
        info.logical_sector_size,
    ))
}

fn create_vhd_child(
    path: &Path,
    size: u64,
    opts: &[(String, String)],
    parent: &Path,
) -> Result<vhd_format::VhdFile<FileStorage>, CliError> {
    let mut o = if crate::remote::is_url(parent) {
        crate::remote::vhd_child(path, parent)?
    } else {
        local_vhd_child(path, parent)?
    };
    let details_size = o.size;
    if size != 0 && size != details_size {
        return Err(CliError::new(format!(
            "a VHD child must have its parent's size ({details_size} bytes)"
        )));
    }
    for (k, v) in opts {
        match k.as_str() {
            "block_size" => o.block_size = u32_size(k, v)?,
            _ => return Err(unknown("VHD", k)),
        }
    }
    let s = FileStorage::create(path)?;
    Ok(vhd_format::VhdFile::create_differencing(s, &o)?)
}

/// Differencing options of a VHD child of the local VHD `parent`.
fn local_vhd_child(
    path: &Path,
    parent: &Path,
) -> Result<vhd_format::DifferencingOptions, CliError> {
    let ps = FileStorage::open(parent, &file_options(true).share_writes(false))?;
    if chain::detect(&ps)? != Format::Vhd {
        return Err(CliError::new(format!(
            "a VHD child needs a VHD parent; {} is not one",
            parent.display()
        )));
    }
    let details = vhd_format::read_details(ps)?;
    let (relative, abs) =
        chain::parent_paths(path, parent).map_err(|e| CliError::new(e.to_string()))?;
    let abs_s = abs.display().to_string();
    Ok(vhd_format::DifferencingOptions::for_parent(
        &details,
        abs_s.clone(),
        Some(abs_s),
        Some(relative),
    ))
}
