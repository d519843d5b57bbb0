//! Opening a child for streaming: the remote parent, the replica and its sidecar, the chain
//! over the copy-on-read device.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use block_io::{BlockDevice, DiskInfo, FileStorage, RangeLock};

use super::sidecar::{sync_dir, Sidecar};
use super::{default_replica, io_err, sidecar_path, CopyOnRead, StreamError, StreamOptions};
use crate::detect::Format;
use crate::disk::Disk;
use crate::error::ChainError;
use crate::layer::{Identity, Layer};

/// A child opened for streaming: the chain (child over a [`CopyOnRead`] parent) and the
/// device, for the stream job.
#[derive(Debug)]
pub struct Streaming {
    /// The chain: the child on top, the copy-on-read parent below.
    pub disk: Disk,
    /// The copy-on-read parent.
    pub cor: Arc<CopyOnRead>,
    /// The child.
    pub child: PathBuf,
}

/// Opens the differencing image `child`, whose parent is remote, over a [`CopyOnRead`]
/// parent (see the module docs): the remote parent is opened and its lineage checked as
/// [`Disk::open`] does, the replica and its sidecar are created beside the child or reopened.
/// Fails with [`StreamError::NotRemote`] when the parent is local (streaming finished).
pub fn open_streaming(
    child: &Path,
    opts: &StreamOptions,
) -> std::result::Result<Streaming, StreamError> {
    let (top, link) = super::open_child(child, opts.read_only, opts.lock)?;
    let remote = open_remote(child, top.format, &link.candidates, opts)?.ok_or_else(|| {
        StreamError::NotRemote {
            child: child.to_path_buf(),
        }
    })?;
    if remote.parent.is_some() {
        return Err(StreamError::RemoteChain {
            url: remote.path.display().to_string(),
        });
    }
    if !link.expected.matches(&remote.identity) {
        return Err(ChainError::LineageMismatch {
            child: child.to_path_buf(),
            parent: remote.path.clone(),
            expected: link.expected.to_string(),
            found: remote.identity.to_string(),
        }
        .into());
    }
    let replica_path = opts
        .replica
        .clone()
        .unwrap_or_else(|| default_replica(child));
    let cor = CopyOnRead::open(remote.clone(), &replica_path, opts)?;
    let cor = Arc::new(cor);
    let layer = Layer {
        path: remote.path.clone(),
        format: remote.format,
        dev: cor.clone(),
        identity: remote.identity,
        parent: None,
    };
    let disk = Disk::from_layers(vec![top, layer], false)?;
    Ok(Streaming {
        disk,
        cor,
        child: child.to_path_buf(),
    })
}

/// The remote parent named by `candidates`, with the client options of `opts.nbd` for an
/// NBD one (feature `remote`).
fn open_remote(
    child: &Path,
    format: Format,
    candidates: &[crate::policy::Candidate],
    opts: &StreamOptions,
) -> std::result::Result<Option<Layer>, ChainError> {
    #[cfg(feature = "remote")]
    if let Some(nbd) = &opts.nbd {
        let url = crate::remote::url_candidates(candidates)
            .first()
            .map(|c| c.path.trim().to_string());
        if let Some(url) = url.filter(|u| crate::remote::is_nbd_url(u)) {
            return crate::remote::open_nbd_parent_with(
                child,
                &url,
                format,
                opts.remote_parents,
                nbd.clone(),
            )
            .map(Some);
        }
    }
    crate::remote::resolve_parent(child, format, candidates, opts.remote_parents)
}

impl CopyOnRead {
    /// A copy-on-read device over the remote layer `remote` with its replica at `replica`
    /// (created with its sidecar if neither exists; see the module docs).
    pub fn open(
        remote: Layer,
        replica: &Path,
        opts: &StreamOptions,
    ) -> std::result::Result<CopyOnRead, StreamError> {
        let info = remote.dev.info();
        let size = info.virtual_size;
        let identity = remote.identity;
        if identity == Identity::Raw {
            return Err(StreamError::Sidecar {
                path: sidecar_path(replica),
                why: "a parent without identity cannot get a local replica".into(),
            });
        }
        let side_path = sidecar_path(replica);
        let (sidecar, words) = if side_path.exists() {
            let (s, words) = Sidecar::load(&side_path)?;
            if !s.matches(size, &identity) {
                return Err(StreamError::Sidecar {
                    path: side_path,
                    why: format!(
                        "it records a base of {} bytes with {}, the remote is {size} bytes \
                         with {identity}",
                        s.size, s.identity
                    ),
                });
            }
            (s, Some(words))
        } else {
            if replica.exists() {
                return Err(StreamError::ReplicaExists {
                    path: replica.to_path_buf(),
                });
            }
            let g = opts.granule;
            if g < 4096 || !g.is_power_of_two() {
                return Err(StreamError::Sidecar {
                    path: side_path,
                    why: format!("granule {g} is not a power of two of at least 4096"),
                });
            }
            let s = Sidecar {
                path: side_path.clone(),
                granule: g,
                size,
                identity,
            };
            let granules = size.div_ceil(g);
            s.store(&vec![0u64; granules.div_ceil(64) as usize], granules)?;
            (s, None)
        };
        let granules = size.div_ceil(sidecar.granule);
        let words = words.unwrap_or_else(|| vec![0u64; granules.div_ceil(64) as usize]);
        let dev: Arc<dyn BlockDevice> = if replica.exists() {
            let storage = FileStorage::open(
                replica,
                &block_io::OpenOptions::new()
                    .read_only(false)
                    .lock(opts.lock),
            )
            .map_err(io_err("open", replica))?;
            match identity {
                Identity::Vhdx { .. } => Arc::new(
                    vhdx_format::VhdxFile::open(
                        storage,
                        &vhdx_format::OpenOptions::new().read_only(false),
                    )
                    .map_err(io_err("open", replica))?,
                ),
                _ => Arc::new(
                    vhd_format::VhdFile::open(
                        storage,
                        &vhd_format::OpenOptions::new().read_only(false),
                    )
                    .map_err(io_err("open", replica))?,
                ),
            }
        } else {
            create_replica(replica, &info, &identity)?
        };
        if dev.info().virtual_size < size {
            return Err(StreamError::Sidecar {
                path: sidecar.path.clone(),
                why: format!(
                    "the replica {} holds {} bytes, the base {size}",
                    replica.display(),
                    dev.info().virtual_size
                ),
            });
        }
        Ok(CopyOnRead {
            remote: remote.dev,
            replica: dev,
            info: DiskInfo {
                read_only: true,
                ..info
            },
            granule: sidecar.granule,
            granules,
            bits: words.into_iter().map(AtomicU64::new).collect(),
            lock: RangeLock::new(sidecar.granule),
            sidecar,
            replica_path: replica.to_path_buf(),
            url: remote.path,
            since_persist: AtomicU64::new(0),
            persist_every: opts.persist_every,
            persist_lock: parking_lot::Mutex::new(()),
            remote_reads: AtomicU64::new(0),
            remote_bytes: AtomicU64::new(0),
            replica_bytes: AtomicU64::new(0),
            local_bytes: AtomicU64::new(0),
            zero_granules: AtomicU64::new(0),
        })
    }
}

/// Creates the replica: the child's format, the base's size and sector size; a VHD with the
/// base's unique id and timestamp, a VHDX with its disk id (its DataWriteGuid is set at the
/// finish).
fn create_replica(
    path: &Path,
    info: &DiskInfo,
    identity: &Identity,
) -> std::result::Result<Arc<dyn BlockDevice>, StreamError> {
    let storage = FileStorage::create(path).map_err(io_err("create", path))?;
    let dev: Arc<dyn BlockDevice> = match *identity {
        Identity::Vhdx { disk_id, .. } => {
            let mut o = vhdx_format::CreateOptions::dynamic(info.virtual_size);
            o.logical_sector_size = info.logical_sector_size;
            o.disk_id = (!disk_id.is_nil()).then_some(disk_id);
            Arc::new(vhdx_format::create(storage, &o).map_err(io_err("create", path))?)
        }
        Identity::Vhd {
            unique_id,
            timestamp,
        } => {
            let mut o =
                vhd_format::CreateOptions::new(info.virtual_size, vhd_format::Subformat::Dynamic);
            o.unique_id = Some(unique_id);
            o.timestamp = Some(timestamp);
            Arc::new(vhd_format::VhdFile::create(storage, &o).map_err(io_err("create", path))?)
        }
        Identity::Raw => {
            return Err(StreamError::Sidecar {
                path: sidecar_path(path),
                why: "a parent without identity cannot get a local replica".into(),
            })
        }
    };
    dev.flush().map_err(io_err("flush", path))?;
    sync_dir(path).map_err(|e| StreamError::Io {
        op: "sync the folder of",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(dev)
}
