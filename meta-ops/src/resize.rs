//! Resizing a disk: the top image of a chain changes its virtual size, offline
//! ([`resize_image`]) or under a running guest ([`resize_live`]).
//!
//! The formats do the work ([`vhd_format::resize`], [`vhdx_format::resize`]; a raw image is
//! `set_len`), each crash-safe at every write and sync: after a power cut the image opens with
//! its old size or its new one, with every byte flushed before.
//!
//! ## Online
//!
//! [`resize_live`] runs with every guest request paused ([`LiveDisk`]'s exclusive section:
//! new writes wait at the gate, new reads and flushes at the device lock, those in flight
//! finish first). Inside it:
//! 1. the guest's chain is flushed: everything acknowledged is durable;
//! 2. the guest's handle of the top is retired: its fail-stop state is latched (through
//!    [`BlockDevice::mapped_write_failed`]), so that it never writes the file again, not
//!    even when it is dropped (a VHDX handle would otherwise end its write session over the
//!    resized file's headers);
//! 3. the top is resized through a second handle (without image locks: the guest's chain
//!    keeps holding them, excluding every other writer, as long as the [`LiveDisk`] lives);
//!    a VHD's enlarged BAT moves to the end of the file rather than pushing blocks out, so a
//!    read mapped to the file before the pause never finds other bytes there;
//! 4. the top is opened again on a third handle and a new chain is built over the same
//!    parents; the guest continues on it from its next request. Requests beyond the old size
//!    were refused before this point and are served after it.
//!
//! If the resize fails, the guest continues on a fresh handle of the top at whatever size the
//! file has (the old one unless the failure came after the commit point); if even that cannot
//! be opened the guest stays on the retired handle, whose writes fail ([`ResizeError::Reopen`]).
//! The pause is reported ([`Resized::pause`]): a flush, a few syncs and two opens.
//!
//! A VHD differencing top cannot grow past its parent (the `chain` crate refuses such a chain);
//! a VHDX one can, and reads zeros past its parent's end.
//!
//! Frontends that show the size to a guest learn it from the [`LiveDisk`] afterwards: the
//! vhost-user backend's `ConfigHandle::refresh` updates the virtio-blk capacity and sends the
//! configuration-change notification.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use block_io::{BlockDevice, ErrorKind, FileStorage, LockMode};
use chain::{Disk, Format, LinkCheck};

use crate::live::LiveDisk;

/// Why a resize was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// The VHD refused or failed (see its variants).
    #[error("cannot resize the VHD")]
    Vhd(#[from] vhd_format::ResizeError),
    /// The VHDX refused or failed (see its variants).
    #[error("cannot resize the VHDX")]
    Vhdx(#[from] vhdx_format::ResizeError),
    /// A raw image shrinks only when forced (nothing tells data from zeros).
    #[error("shrinking a raw image to {new_size} bytes cuts whatever lies past it: force it")]
    RawShrink {
        /// The size asked.
        new_size: u64,
    },
    /// The size is not a multiple of 512 (raw) or is zero.
    #[error("{0} bytes is not a valid disk size")]
    BadSize(u64),
    /// A VHD differencing image cannot outgrow its parent.
    #[error("a VHD differencing image cannot grow past its parent ({parent} bytes)")]
    ParentSmaller {
        /// The parent's size.
        parent: u64,
    },
    /// The image cannot be resized here (a remote image, a read-only chain).
    #[error("{0}")]
    Unsupported(String),
    /// The image could not be opened or read.
    #[error("cannot open {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// What failed.
        #[source]
        source: block_io::Error,
    },
    /// Flushing the guest's disk before the resize failed (nothing was changed).
    #[error("cannot flush the disk before resizing it")]
    Flush(#[source] block_io::Error),
    /// The guest's disk is not the chain given.
    #[error("the guest is not on the disk given")]
    NotLive,
    /// A job runs on this disk.
    #[error("a job runs on this disk")]
    Busy,
    /// The resized top could not be opened again: the guest's writes fail from now on.
    #[error("cannot open the resized image {path} again")]
    Reopen {
        /// The image.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<chain::ChainError>,
    },
}

impl ResizeError {
    /// The coarse [`ErrorKind`] (what a CLI maps to its exit status).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ResizeError::Vhd(e) => e.kind(),
            ResizeError::Vhdx(e) => e.kind(),
            ResizeError::RawShrink { .. } | ResizeError::BadSize(_) => ErrorKind::InvalidInput,
            ResizeError::ParentSmaller { .. } | ResizeError::Unsupported(_) => {
                ErrorKind::Unsupported
            }
            ResizeError::Open { source, .. } | ResizeError::Flush(source) => source.kind(),
            ResizeError::NotLive | ResizeError::Busy => ErrorKind::InvalidInput,
            ResizeError::Reopen { source, .. } => source.kind(),
        }
    }

    /// Whether the refusal is about data the shrink would cut (forcing it drops the data).
    pub fn would_cut_data(&self) -> bool {
        matches!(
            self,
            ResizeError::Vhd(vhd_format::ResizeError::DataBeyondEnd { .. })
                | ResizeError::Vhdx(vhdx_format::ResizeError::DataBeyondEnd { .. })
                | ResizeError::RawShrink { .. }
        )
    }
}

/// What a resize did.
#[derive(Debug, Clone)]
pub struct Resized {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now (a CHS-sized VHD may get a little more than asked).
    pub new_size: u64,
    /// How long guest I/O was paused ([`resize_live`]; zero offline).
    pub pause: Duration,
    /// The chain the guest is on now ([`resize_live`]).
    pub disk: Option<Arc<Disk>>,
}

/// Resizes the image in `storage` (of `format`) to `new_size` bytes; returns the old and new
/// sizes. `online`: a VHD's BAT moves instead of pushing blocks out (see the module docs).
fn resize_storage(
    path: &Path,
    storage: Arc<FileStorage>,
    format: Format,
    new_size: u64,
    force: bool,
    online: bool,
) -> Result<(u64, u64), ResizeError> {
    let open = |source| ResizeError::Open {
        path: path.to_path_buf(),
        source,
    };
    match format {
        Format::Raw => {
            let old = block_io::Storage::len(&*storage).map_err(open)?;
            if new_size == 0 || new_size % 512 != 0 {
                return Err(ResizeError::BadSize(new_size));
            }
            if new_size < old && !force {
                return Err(ResizeError::RawShrink { new_size });
            }
            block_io::Storage::set_len(&*storage, new_size).map_err(open)?;
            block_io::Storage::sync_data(&*storage).map_err(open)?;
            Ok((old, new_size))
        }
        Format::Vhd => {
            let r = vhd_format::resize_storage_with(&*storage, new_size, !online)?;
            Ok((r.old_size, r.new_size))
        }
        Format::Vhdx => {
            let mut f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(open)?;
            let r = f.resize(new_size, force)?;
            f.close().map_err(vhdx_format::ResizeError::Io)?;
            Ok((r.old_size, r.new_size))
        }
    }
}

fn open_rw(path: &Path, lock: LockMode) -> Result<Arc<FileStorage>, ResizeError> {
    FileStorage::open(
        path,
        &block_io::OpenOptions::new().read_only(false).lock(lock),
    )
    .map(Arc::new)
    .map_err(|source| ResizeError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Resizes the image at `path` (one file: a differencing image's parents are not opened) to
/// `new_size` bytes, with image locks as `lock` says. `format` `None` detects it. A shrink
/// that would cut data is refused unless `force` (a VHD is never shrunk then: see
/// [`vhd_format::resize`]). A VHD differencing image is not grown (its chain would no longer
/// open).
pub fn resize_image(
    path: &Path,
    format: Option<Format>,
    new_size: u64,
    force: bool,
    lock: LockMode,
) -> Result<Resized, ResizeError> {
    let storage = open_rw(path, lock)?;
    let format = match format {
        Some(f) => f,
        None => chain::detect(&*storage).map_err(|source| ResizeError::Open {
            path: path.to_path_buf(),
            source,
        })?,
    };
    if format == Format::Vhd {
        let f = vhd_format::VhdFile::open(
            storage.clone(),
            &vhd_format::OpenOptions::new().read_only(true),
        )
        .map_err(|source| ResizeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let size = f.info().virtual_size;
        if f.disk_type() == vhd_format::DiskType::Differencing && new_size > size {
            return Err(ResizeError::ParentSmaller { parent: size });
        }
    }
    let (old_size, new_size) = resize_storage(path, storage, format, new_size, force, false)?;
    Ok(Resized {
        old_size,
        new_size,
        pause: Duration::ZERO,
        disk: None,
    })
}

/// Resizes the top image of `disk`, the chain the guest of `live` is on, while the guest runs
/// (see the module docs). Returns the new chain (the guest is on it already) and the pause.
pub fn resize_live(
    live: &Arc<LiveDisk>,
    disk: &Arc<Disk>,
    new_size: u64,
    force: bool,
) -> Result<Resized, ResizeError> {
    let as_dev: Arc<dyn BlockDevice> = disk.clone();
    let top = disk
        .layers()
        .first()
        .cloned()
        .ok_or_else(|| ResizeError::Unsupported("an empty chain".into()))?;
    if chain::remote::is_url_path(&top.path) {
        return Err(ResizeError::Unsupported(
            "a remote image cannot be resized".into(),
        ));
    }
    if disk.info().read_only {
        return Err(ResizeError::Unsupported(
            "the disk is open read-only".into(),
        ));
    }
    if let (Format::Vhd, Some(parent)) = (top.format, disk.layers().get(1)) {
        let p = parent.dev.info().virtual_size;
        if new_size > p {
            return Err(ResizeError::ParentSmaller { parent: p });
        }
    }
    let ignore_lineage = disk
        .links()
        .iter()
        .any(|l| matches!(l, LinkCheck::Mismatch(_)));
    let (pause, r) = live
        .exclusive(|cur| {
            if !std::ptr::addr_eq(Arc::as_ptr(cur), Arc::as_ptr(&as_dev)) {
                return (None, Err(ResizeError::NotLive));
            }
            if let Err(e) = disk.flush() {
                return (None, Err(ResizeError::Flush(e)));
            }
            let storage = match open_rw(&top.path, LockMode::Off) {
                Ok(s) => s,
                Err(e) => return (None, Err(e)),
            };
            // From here the guest's handle never writes the file again.
            top.dev.mapped_write_failed(&block_io::Error::new(
                ErrorKind::Failed,
                "the image was resized through another handle",
            ));
            let resized = resize_storage(&top.path, storage, top.format, new_size, force, true);
            let reopened = open_rw(&top.path, LockMode::Off)
                .map_err(|e| match e {
                    ResizeError::Open { source, .. } => source,
                    other => block_io::Error::with_source(ErrorKind::Io, "reopen", other),
                })
                .map_err(|source| chain::ChainError::Open {
                    path: top.path.clone(),
                    source,
                })
                .and_then(|st| {
                    chain::open_layer_from_storage(&top.path, st, Some(top.format), false)
                })
                .and_then(|layer| {
                    let layers = std::iter::once(layer)
                        .chain(disk.layers().iter().skip(1).cloned())
                        .collect();
                    Disk::from_layers(layers, ignore_lineage)
                });
            match reopened {
                Ok(d) => {
                    let d = Arc::new(d);
                    let next: Arc<dyn BlockDevice> = d.clone();
                    (Some(next), resized.map(|sizes| (sizes, d)))
                }
                Err(source) => (
                    None,
                    Err(resized.err().unwrap_or(ResizeError::Reopen {
                        path: top.path.clone(),
                        source: Box::new(source),
                    })),
                ),
            }
        })
        .map_err(|_| ResizeError::Busy)?;
    let ((old, new), d) = r?;
    Ok(Resized {
        old_size: old,
        new_size: new,
        pause,
        disk: Some(d),
    })
}
