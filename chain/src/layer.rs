//! One image of a chain, opened by its format, with its identity and its link to a parent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block_io::{BlockDevice, FileStorage, LockMode, RawDisk, RawOptions, Storage};
use uuid::Uuid;

use crate::detect::{detect, Format};
use crate::error::{braced, ChainError};
use crate::policy::Candidate;

/// Who an image is: the identifiers its children record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Raw images have no identity.
    Raw,
    /// A VHD: footer unique id and timestamp.
    Vhd {
        /// Footer unique id.
        unique_id: Uuid,
        /// Footer timestamp (seconds since 2000-01-01 UTC).
        timestamp: u32,
    },
    /// A VHDX: the DataWriteGuid of the current header (changes with every user-visible
    /// change) and the virtual disk id.
    Vhdx {
        /// DataWriteGuid.
        data_write_guid: Uuid,
        /// Virtual disk id.
        disk_id: Uuid,
    },
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Raw => f.write_str("raw (no identity)"),
            Identity::Vhd {
                unique_id,
                timestamp,
            } => write!(f, "unique id {} timestamp {timestamp}", braced(unique_id)),
            Identity::Vhdx {
                data_write_guid, ..
            } => write!(f, "DataWriteGuid {}", braced(data_write_guid)),
        }
    }
}

/// What a differencing child records about its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// VHD: the parent's footer unique id and timestamp.
    Vhd {
        /// Parent unique id.
        unique_id: Uuid,
        /// Parent timestamp.
        timestamp: u32,
    },
    /// VHDX: the parent's DataWriteGuid, as `parent_linkage` (and `parent_linkage2` during a
    /// merge); either may match.
    Vhdx {
        /// `parent_linkage`.
        linkage: Option<Uuid>,
        /// `parent_linkage2`.
        linkage2: Option<Uuid>,
    },
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Vhd {
                unique_id,
                timestamp,
            } => write!(f, "unique id {} timestamp {timestamp}", braced(unique_id)),
            Expected::Vhdx { linkage, linkage2 } => {
                let s = |u: &Option<Uuid>| u.map_or("none".to_string(), |u| braced(&u));
                write!(f, "DataWriteGuid {}", s(linkage))?;
                if linkage2.is_some() {
                    write!(f, " or {}", s(linkage2))?;
                }
                Ok(())
            }
        }
    }
}

impl Expected {
    /// Whether `id` is the parent this child recorded.
    pub fn matches(&self, id: &Identity) -> bool {
        match (self, id) {
            (
                Expected::Vhd {
                    unique_id,
                    timestamp,
                },
                Identity::Vhd {
                    unique_id: u,
                    timestamp: t,
                },
            ) => unique_id == u && timestamp == t,
            (
                Expected::Vhdx { linkage, linkage2 },
                Identity::Vhdx {
                    data_write_guid, ..
                },
            ) => {
                linkage.as_ref() == Some(data_write_guid)
                    || linkage2.as_ref() == Some(data_write_guid)
            }
            _ => false,
        }
    }
}

/// A child's link to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// Parent paths, in the order to try them.
    pub candidates: Vec<Candidate>,
    /// The identity the child recorded.
    pub expected: Expected,
    /// The parent's name as recorded (VHD parent name), for messages.
    pub name: Option<String>,
}

/// One opened image of a chain.
#[derive(Clone)]
pub struct Layer {
    /// Where it was opened from.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// The image as a device (a layer: sectors it lacks report `Unallocated`).
    pub dev: Arc<dyn BlockDevice>,
    /// Who it is.
    pub identity: Identity,
    /// Its parent, if it is a differencing image.
    pub parent: Option<ParentLink>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("identity", &self.identity)
            .field("parent", &self.parent)
            .finish()
    }
}

/// How to open one layer: see [`open_layer_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Use `O_DIRECT`.
    pub direct: bool,
    /// No readahead: see [`block_io::OpenOptions::random_access`].
    pub random_access: bool,
    /// Image locks ([`LockMode::Off`] is `-U`/force share: no locks taken or tested).
    pub lock: LockMode,
    /// The layer is a parent (backing file) of another: opened read-only, and refusing
    /// writers whatever its format, for its children's data depends on it.
    pub parent: bool,
}

/// Opens one image (never its parents) by content, or as `format` if given, with image locks
/// on ([`LockMode::Auto`]) and as a top layer (see [`open_layer_with`]).
pub fn open_layer(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    direct: bool,
) -> Result<Layer, ChainError> {
    let opts = LayerOptions {
        read_only,
        direct,
        ..LayerOptions::default()
    };
    open_layer_with(path, format, &opts)
}

/// Opens one image (never its parents) by content, or as `format` if given.
///
/// Image locks are QEMU's (see [`block_io::LockMode`]): a read-write layer holds the writer's
/// locks; a read-only layer refuses writers if it is a parent (QEMU's backing files) or a
/// VHD/VHDX (whose metadata must not change under a reader, as for `qemu-img info` and
/// `qemu-io -r`), and shares writes if it is a raw top (as `qemu-io -r -f raw` does). A
/// conflict is an [`ChainError::Open`] of kind [`block_io::ErrorKind::Locked`].
pub fn open_layer_with(
    path: &Path,
    format: Option<Format>,
    opts: &LayerOptions,
) -> Result<Layer, ChainError> {
    let err = |source| ChainError::Open {
        path: path.to_path_buf(),
        source,
    };
    let read_only = opts.read_only || opts.parent;
    // A read-only top shares writes until its format is known (QEMU likewise opens the file
    // node before the format node asks for its permissions).
    let mut storage = FileStorage::open(
        path,
        &block_io::OpenOptions::new()
            .read_only(read_only)
            .direct(opts.direct)
            .random_access(opts.random_access)
            .lock(opts.lock)
            .share_writes(read_only && !opts.parent),
    )
    .map_err(err)?;
    let format = match format {
        Some(f) => f,
        None => detect(&storage).map_err(err)?,
    };
    if read_only && !opts.parent && format != Format::Raw {
        // bdrv_default_perms_for_storage: a format node never shares WRITE or RESIZE of the
        // file holding its metadata.
        storage.set_share_writes(false).map_err(err)?;
    }
    layer_from_storage(path, storage, format, read_only)
}

/// Opens one layer (never its parents) from any [`Storage`]: a file, memory, or a remote
/// object ([`crate::remote`]). `path` names it in the [`Layer`] and in errors (a URL for a
/// remote one); relative parent paths of a differencing layer resolve against it. Takes no
/// locks: locking is the business of whoever opened `storage`.
pub fn open_layer_from_storage<S: Storage + 'static>(
    path: &Path,
    storage: S,
    format: Option<Format>,
    read_only: bool,
) -> Result<Layer, ChainError> {
    let format = match format {
        Some(f) => f,
        None => detect(&storage).map_err(|source| ChainError::Open {
            path: path.to_path_buf(),
            source,
        })?,
    };
    layer_from_storage(path, storage, format, read_only)
}

/// The format half of [`open_layer_with`] and [`open_layer_from_storage`].
fn layer_from_storage<S: Storage + 'static>(
    path: &Path,
    storage: S,
    format: Format,
    read_only: bool,
) -> Result<Layer, ChainError> {
    let err = |source| ChainError::Open {
        path: path.to_path_buf(),
        source,
    };
    let (dev, identity, parent): (Arc<dyn BlockDevice>, _, _) = match format {
        Format::Raw => (
            Arc::new(RawDisk::open(storage, &RawOptions::new().read_only(read_only)).map_err(err)?),
            Identity::Raw,
            None,
        ),
        Format::Vhd => {
            let f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(read_only),
            )
            .map_err(err)?;
            let d = f.details();
            let parent = match (d.disk_type, d.parent_unique_id) {
                (vhd_format::DiskType::Differencing, Some(unique_id)) => Some(ParentLink {
                    candidates: vhd_candidates(&d),
                    expected: Expected::Vhd {
                        unique_id,
                        timestamp: d.parent_timestamp.unwrap_or(0),
                    },
                    name: d.parent_name.clone(),
                }),
                _ => None,
            };
            let identity = Identity::Vhd {
                unique_id: d.unique_id,
                timestamp: d.timestamp,
            };
            (Arc::new(f), identity, parent)
        }
        Format::Vhdx => {
            let f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(read_only),
            )
            .map_err(err)?;
            let d = f.details();
            let parent = (d.subformat == vhdx_format::Subformat::Differencing).then(|| {
                let loc = f.parent_locator();
                let get = |k: &str| {
                    d.parent_locator
                        .iter()
                        .find(|(key, _)| key.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone())
                };
                ParentLink {
                    candidates: [
                        crate::remote::URL_KEY,
                        "relative_path",
                        "volume_path",
                        "absolute_win32_path",
                    ]
                    .iter()
                    .filter_map(|k| {
                        get(k).map(|p| Candidate {
                            source: (*k).to_string(),
                            path: p,
                        })
                    })
                    .collect(),
                    expected: Expected::Vhdx {
                        linkage: loc.and_then(|l| l.parent_linkage()),
                        linkage2: loc.and_then(|l| l.parent_linkage2()),
                    },
                    name: None,
                }
            });
            let identity = Identity::Vhdx {
                data_write_guid: d.data_write_guid,
                disk_id: d.disk_id,
            };
            (Arc::new(f), identity, parent)
        }
    };
    Ok(Layer {
        path: path.to_path_buf(),
        format,
        dev,
        identity,
        parent,
    })
}

/// VHD parent candidates: W2ru, W2ku, then the deprecated Wi2r, Wi2k, MacX, then the parent
/// name itself (qemu writes only the name).
fn vhd_candidates(d: &vhd_format::VhdDetails) -> Vec<Candidate> {
    let mut out = Vec::new();
    for code in ["W2ru", "W2ku", "Wi2r", "Wi2k", "MacX"] {
        for l in d.locators.iter().filter(|l| l.platform_code == code) {
            if let Some(p) = &l.path {
                out.push(Candidate {
                    source: code.to_string(),
                    path: p.clone(),
                });
            }
        }
    }
    if let Some(name) = &d.parent_name {
        if !out.iter().any(|c| &c.path == name) {
            out.push(Candidate {
                source: "parent_name".into(),
                path: name.clone(),
            });
        }
    }
    out
}
