//! The finish: the complete replica becomes the child's local parent (see "Crash safety of
//! the finish" in the module docs of [`crate::cor`]).

use std::path::{Path, PathBuf};

use block_io::{BlockDevice, FileStorage, LockMode};

use super::sidecar::{sync_dir, Sidecar};
use super::{default_replica, io_err, sidecar_path, StreamError, StreamOptions};
use crate::detect::Format;
use crate::error::ChainError;
use crate::layer::{open_layer_with, Identity, LayerOptions};

/// What [`finish_streaming`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The child's local parent now.
    pub replica: PathBuf,
    /// The remote parent it replaced (empty when an earlier finish had already repointed the
    /// child and only the sidecar was left to delete).
    pub url: String,
    /// The identity the replica has (the one the child records).
    pub identity: Identity,
}

/// Makes the complete replica of `child` its local parent and drops the remote link (see
/// "Crash safety of the finish" in the module docs). The chain must be closed. Opens the
/// remote parent only to check the identity it advertises against what the child records;
/// reads no data from it.
pub fn finish_streaming(
    child: &Path,
    opts: &StreamOptions,
) -> std::result::Result<Finished, StreamError> {
    let (top, link) = super::open_child(child, true, opts.lock)?;
    let format = top.format;
    drop(top);
    let replica = opts
        .replica
        .clone()
        .unwrap_or_else(|| default_replica(child));
    let side = sidecar_path(&replica);
    let Some(url) = crate::remote::url_candidates(&link.candidates)
        .first()
        .map(|c| c.path.trim().to_string())
    else {
        // Already local: a crash after the repoint may have left the sidecar (step 4).
        return finished_already(child, &link, &replica, &side, opts);
    };
    let (sidecar, words) = Sidecar::load(&side)?;
    let granules = sidecar.size.div_ceil(sidecar.granule);
    let set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    if set < granules {
        return Err(StreamError::Incomplete {
            replica,
            missing: granules - set,
        });
    }
    let identity = sidecar.identity;
    if !link.expected.matches(&identity) {
        return Err(ChainError::LineageMismatch {
            child: child.to_path_buf(),
            parent: replica.clone(),
            expected: link.expected.to_string(),
            found: identity.to_string(),
        }
        .into());
    }
    // (1) The replica's identity, durable.
    let storage = FileStorage::open(
        &replica,
        &block_io::OpenOptions::new()
            .read_only(false)
            .lock(opts.lock),
    )
    .map_err(io_err("open", &replica))?;
    match identity {
        Identity::Vhdx {
            data_write_guid, ..
        } => {
            let f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", &replica))?;
            if f.details().data_write_guid != data_write_guid {
                f.begin_session_with(data_write_guid)
                    .map_err(io_err("set the DataWriteGuid of", &replica))?;
            }
            f.close().map_err(io_err("close", &replica))?;
        }
        _ => {
            let f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", &replica))?;
            f.flush().map_err(io_err("flush", &replica))?;
        }
    }
    // (2) It opens as the parent the child records.
    let check = open_layer_with(
        &replica,
        None,
        &LayerOptions {
            parent: true,
            lock: opts.lock,
            ..LayerOptions::default()
        },
    )?;
    if !link.expected.matches(&check.identity) || check.format != format {
        return Err(ChainError::LineageMismatch {
            child: child.to_path_buf(),
            parent: replica.clone(),
            expected: link.expected.to_string(),
            found: format!("{} ({})", check.identity, check.format),
        }
        .into());
    }
    drop(check);
    // (3) The child's locator.
    repoint(child, &replica, format, opts.lock)?;
    // (4) The sidecar.
    std::fs::remove_file(&side).map_err(|e| StreamError::Io {
        op: "delete",
        path: side.clone(),
        source: e.into(),
    })?;
    let _ = sync_dir(&side);
    Ok(Finished {
        replica,
        url,
        identity,
    })
}

/// The child's parent is local: when it is the replica (same file, the identity the child
/// records) and the sidecar is still there, the finish was cut after the repoint: the sidecar
/// is deleted and the finish reported. Otherwise [`StreamError::NotRemote`].
fn finished_already(
    child: &Path,
    link: &crate::layer::ParentLink,
    replica: &Path,
    side: &Path,
    opts: &StreamOptions,
) -> std::result::Result<Finished, StreamError> {
    let not_remote = || StreamError::NotRemote {
        child: child.to_path_buf(),
    };
    if !side.exists() {
        return Err(not_remote());
    }
    let parent = crate::policy::PathPolicy::default()
        .resolve(child, &link.candidates)
        .map_err(|_| not_remote())?;
    let same = match (
        std::fs::canonicalize(&parent),
        std::fs::canonicalize(replica),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return Err(not_remote());
    }
    let layer = open_layer_with(
        replica,
        None,
        &LayerOptions {
            parent: true,
            lock: opts.lock,
            ..LayerOptions::default()
        },
    )?;
    if !link.expected.matches(&layer.identity) {
        return Err(not_remote());
    }
    let identity = layer.identity;
    drop(layer);
    std::fs::remove_file(side).map_err(|e| StreamError::Io {
        op: "delete",
        path: side.to_path_buf(),
        source: e.into(),
    })?;
    let _ = sync_dir(side);
    Ok(Finished {
        replica: replica.to_path_buf(),
        url: String::new(),
        identity,
    })
}

/// The locator of a streamed VHDX child once its parent is local: every key of `old` kept
/// (`parent_linkage` too: the replica has the identity it names) except the remote URL
/// ([`crate::remote::URL_KEY`]) and `volume_path`, with `relative_path` and
/// `absolute_win32_path` naming the replica.
pub fn local_locator(
    old: &vhdx_format::locator::ParentLocator,
    relative: &str,
    absolute: &str,
) -> vhdx_format::locator::ParentLocator {
    let mut entries: Vec<(String, String)> = Vec::new();
    for (k, v) in &old.entries {
        match k.to_ascii_lowercase().as_str() {
            crate::remote::URL_KEY | "volume_path" | "relative_path" | "absolute_win32_path" => {}
            _ => entries.push((k.clone(), v.clone())),
        }
    }
    entries.push(("relative_path".into(), relative.to_string()));
    entries.push(("absolute_win32_path".into(), absolute.to_string()));
    vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries,
    }
}

/// Points `child` at `replica` in one crash-safe metadata change, keeping the recorded
/// parent identity.
fn repoint(
    child: &Path,
    replica: &Path,
    format: Format,
    lock: LockMode,
) -> std::result::Result<(), StreamError> {
    let (relative, abs) =
        crate::rebase::parent_paths(child, replica).map_err(|e| StreamError::Io {
            op: "resolve",
            path: replica.to_path_buf(),
            source: e.into(),
        })?;
    let abs = abs.display().to_string();
    let storage = FileStorage::open(
        child,
        &block_io::OpenOptions::new().read_only(false).lock(lock),
    )
    .map_err(io_err("open", child))?;
    match format {
        Format::Vhdx => {
            let mut f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", child))?;
            let old = f
                .parent_locator()
                .cloned()
                .ok_or_else(|| StreamError::NoParent {
                    child: child.to_path_buf(),
                })?;
            let new = local_locator(&old, &relative, &abs);
            f.set_parent_locator(&new)
                .map_err(io_err("repoint", child))?;
            f.close().map_err(io_err("close", child))?;
        }
        _ => {
            let mut f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(io_err("open", child))?;
            f.set_parent(&abs, Some(&abs), Some(&relative))
                .map_err(io_err("repoint", child))?;
            f.flush().map_err(io_err("flush", child))?;
        }
    }
    Ok(())
}
