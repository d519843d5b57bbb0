//! Making one layer of a new chain, for [`crate::split`] and [`crate::convert_layers`]: a
//! dynamic base, or a differencing child that records its parent's identity and paths
//! (VHDX `parent_linkage` = the parent's DataWriteGuid; VHD parent unique id and timestamp).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use block_io::{BlockDevice, FileStorage};
use chain::Identity;

/// Canonical form of a path that may not exist yet (its folder canonicalized): how a new
/// layer's name is compared with the source's files.
pub(crate) fn canonical_target(p: &Path) -> PathBuf {
    if let Ok(c) = fs::canonicalize(p) {
        return c;
    }
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (fs::canonicalize(dir), p.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => p.to_path_buf(),
    }
}

/// The VHD block size when none is asked for (the format's usual 2 MiB).
pub(crate) const VHD_BLOCK_SIZE: u32 = 2 << 20;

/// What a child records of its parent: the parent's identity, its path relative to the
/// child's folder (Windows style, `.\NAME`) and its absolute path.
pub(crate) type ParentLink = (Identity, String, String);

/// The format and geometry of a new layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// VHDX (else VHD).
    pub vhdx: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// Block size; `None`: VHDX's default, or [`VHD_BLOCK_SIZE`].
    pub block_size: Option<u32>,
    /// VHDX logical sector size (VHD's is 512).
    pub sector: u32,
    /// The physical sector size of the chain's base: a VHDX layer gets 4096 when it is 4096,
    /// else its logical size.
    pub physical: u32,
}

/// Why [`create`] made no layer.
#[derive(Debug)]
pub(crate) enum NewLayerError {
    /// The format layer refused or failed.
    Create(block_io::Error),
    /// The parent is another format (the child's format name, and the parent's identity).
    ParentFormat(&'static str, Identity),
}

impl NewLayerError {
    /// As one `block_io::Error` (kind `InvalidInput` for a parent of another format).
    pub(crate) fn into_block_error(self) -> block_io::Error {
        match self {
            NewLayerError::Create(e) => e,
            NewLayerError::ParentFormat(want, got) => block_io::Error::new(
                block_io::ErrorKind::InvalidInput,
                format!("its parent is not a {want} ({got})"),
            ),
        }
    }
}

/// A new layer, open for writing.
pub(crate) enum NewLayer {
    Vhdx(vhdx_format::VhdxFile<FileStorage>),
    Vhd(vhd_format::VhdFile<FileStorage>),
}

impl NewLayer {
    /// The layer as a device to write through.
    pub(crate) fn into_device(self) -> Arc<dyn BlockDevice> {
        match self {
            NewLayer::Vhdx(f) => Arc::new(f),
            NewLayer::Vhd(f) => Arc::new(f),
        }
    }

    /// Flushes and closes the layer, reporting what fails.
    pub(crate) fn close(self) -> block_io::Result<()> {
        match self {
            NewLayer::Vhdx(f) => f.close(),
            NewLayer::Vhd(f) => {
                f.flush()?;
                f.close()
            }
        }
    }
}

/// Creates a layer of geometry `g` in `storage` (an empty file): a dynamic base without
/// `link`, else a differencing child recording it.
pub(crate) fn create(
    storage: FileStorage,
    g: &Geometry,
    link: Option<ParentLink>,
) -> Result<NewLayer, NewLayerError> {
    if g.vhdx {
        let mut o = match link {
            None => vhdx_format::CreateOptions::dynamic(g.size),
            Some((
                Identity::Vhdx {
                    data_write_guid, ..
                },
                rel,
                abs,
            )) => vhdx_format::CreateOptions::differencing(
                g.size,
                vhdx_format::ParentRef {
                    data_write_guid,
                    relative_path: rel,
                    absolute_path: Some(abs),
                },
            ),
            Some((other, ..)) => return Err(NewLayerError::ParentFormat("VHDX", other)),
        };
        o.block_size = g.block_size;
        o.logical_sector_size = g.sector;
        o.physical_sector_size = Some(if g.physical == 4096 { 4096 } else { g.sector });
        return vhdx_format::create(storage, &o)
            .map(NewLayer::Vhdx)
            .map_err(NewLayerError::Create);
    }
    let block_size = g.block_size.unwrap_or(VHD_BLOCK_SIZE);
    let f = match link {
        None => {
            let mut o = vhd_format::CreateOptions::new(g.size, vhd_format::Subformat::Dynamic);
            o.block_size = block_size;
            vhd_format::VhdFile::create(storage, &o)
        }
        Some((
            Identity::Vhd {
                unique_id,
                timestamp,
            },
            rel,
            abs,
        )) => {
            let o = vhd_format::DifferencingOptions {
                size: g.size,
                block_size,
                parent_unique_id: unique_id,
                parent_timestamp: timestamp,
                parent_name: abs.clone(),
                absolute_path: Some(abs),
                relative_path: Some(rel),
                unique_id: None,
                timestamp: None,
                creator: vhd_format::Creator::default(),
            };
            vhd_format::VhdFile::create_differencing(storage, &o)
        }
        Some((other, ..)) => return Err(NewLayerError::ParentFormat("VHD", other)),
    };
    f.map(NewLayer::Vhd).map_err(NewLayerError::Create)
}
