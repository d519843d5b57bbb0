//! Rebasing a differencing child onto a moved or copied parent without copying data
//! (`vdisk rebase -u`, qemu-img's unsafe rebase, Hyper-V's `Set-VHD -ParentPath`).
//!
//! The new parent must be the same content as the parent the child records: for VHDX its
//! DataWriteGuid must equal the child's `parent_linkage` or `parent_linkage2` (MS-VHDX
//! 2.6.2.6.1; a copied or moved file keeps its DataWriteGuid), for VHD its footer unique id
//! and timestamp must equal the child's parent unique id and timestamp (VHD spec 1.0, dynamic
//! header). That is checked with [`Expected::matches`] before anything is written, and again
//! on the writable handle; a mismatch is [`ChainError::RebaseMismatch`] naming both ids.
//!
//! Only the child's locator changes, through the formats' crash-safe writers:
//! [`vhdx_format::VhdxFile::set_parent_locator`] (through the log; `parent_linkage`,
//! `relative_path`, `absolute_win32_path` rewritten, `volume_path` dropped, unknown keys kept)
//! and [`vhd_format::VhdFile::set_parent`] (parent name, W2ku, W2ru). A rebase that copies
//! data (onto a different parent) is not implemented.

use std::path::{Component, Path, PathBuf};

use block_io::FileStorage;
use uuid::Uuid;

use crate::detect::Format;
use crate::error::{braced, ChainError};
use crate::layer::{open_layer, Expected, Identity};

/// How to rebase.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// Change only the child's parent link, copying no data (qemu-img's `-u`). Required: a
    /// copying rebase is not implemented.
    pub unsafe_no_copy: bool,
    /// The child's format; `None` detects it by content.
    pub format: Option<Format>,
}

/// The parent's path relative to the child's folder, Windows style (`.\p.vhdx`,
/// `..\dir\p.vhdx`), and its canonical absolute path — what a child's locator records.
pub fn parent_paths(child: &Path, parent: &Path) -> std::io::Result<(String, PathBuf)> {
    let abs = std::fs::canonicalize(parent).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot open parent {}: {e}", parent.display()),
        )
    })?;
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir = std::fs::canonicalize(child_dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot resolve {}: {e}", child_dir.display()),
        )
    })?;
    let a: Vec<Component> = child_dir.components().collect();
    let b: Vec<Component> = abs.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec![".".into()];
    if common < a.len() {
        parts = vec!["..".into(); a.len() - common];
    }
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    Ok((parts.join("\\"), abs))
}

/// Points the differencing image `child` at `new_parent`, which must be the same content as
/// the parent the child records (see the module docs). Writes nothing unless the identity
/// matches; changes only the child's parent locator.
pub fn rebase(child: &Path, new_parent: &Path, opts: &RebaseOptions) -> Result<(), ChainError> {
    let refuse = |reason: String| ChainError::RebaseRefused {
        child: child.to_path_buf(),
        reason,
    };
    if !opts.unsafe_no_copy {
        return Err(refuse(
            "a rebase that copies data is not implemented; use -u to change only the parent \
             link (the new parent must be the same content as the old one)"
                .into(),
        ));
    }
    // Read-only first: verify before opening anything writable.
    let c = open_layer(child, opts.format, true, false)?;
    let Some(link) = c.parent.clone() else {
        return Err(refuse(format!(
            "{} is not a differencing image",
            c.format.name()
        )));
    };
    let format = c.format;
    drop(c);
    let p = open_layer(new_parent, None, true, false)?;
    if p.format != format {
        return Err(refuse(format!(
            "a {format} child needs a {format} parent; {} is {}",
            new_parent.display(),
            p.format
        )));
    }
    let identity = p.identity;
    drop(p);
    verify(child, new_parent, &link.expected, &identity)?;
    let (relative, abs) = parent_paths(child, new_parent).map_err(|e| ChainError::Open {
        path: new_parent.to_path_buf(),
        source: e.into(),
    })?;
    let abs = abs.display().to_string();
    let failed = |source: block_io::Error| ChainError::RebaseFailed {
        child: child.to_path_buf(),
        source,
    };
    let storage = FileStorage::open(child, &block_io::OpenOptions::new().read_only(false))
        .map_err(|source| ChainError::Open {
            path: child.to_path_buf(),
            source,
        })?;
    match identity {
        Identity::Vhdx {
            data_write_guid, ..
        } => {
            let mut f = vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(false),
            )
            .map_err(|source| ChainError::Open {
                path: child.to_path_buf(),
                source,
            })?;
            let old = f.parent_locator().cloned().ok_or_else(|| {
                refuse("the image changed: it has no parent locator any more".into())
            })?;
            // Again on the writable handle: the child may have changed since the check.
            let expected = Expected::Vhdx {
                linkage: old.parent_linkage(),
                linkage2: old.parent_linkage2(),
            };
            verify(child, new_parent, &expected, &identity)?;
            let new = vhdx_locator(&old, &data_write_guid, &relative, &abs);
            f.set_parent_locator(&new).map_err(failed)?;
            f.close().map_err(failed)?;
        }
        Identity::Vhd { .. } => {
            let mut f = vhd_format::VhdFile::open(
                storage,
                &vhd_format::OpenOptions::new().read_only(false),
            )
            .map_err(|source| ChainError::Open {
                path: child.to_path_buf(),
                source,
            })?;
            let d = f.details();
            let expected = Expected::Vhd {
                unique_id: d.parent_unique_id.unwrap_or_else(Uuid::nil),
                timestamp: d.parent_timestamp.unwrap_or(0),
            };
            verify(child, new_parent, &expected, &identity)?;
            f.set_parent(&abs, Some(&abs), Some(&relative))
                .map_err(failed)?;
            block_io::BlockDevice::flush(&f).map_err(failed)?;
        }
        Identity::Raw => return Err(refuse("raw images have no parent".into())),
    }
    Ok(())
}

fn verify(
    child: &Path,
    new_parent: &Path,
    expected: &Expected,
    found: &Identity,
) -> Result<(), ChainError> {
    if expected.matches(found) {
        return Ok(());
    }
    Err(ChainError::RebaseMismatch {
        child: child.to_path_buf(),
        new_parent: new_parent.to_path_buf(),
        expected: expected.to_string(),
        found: found.to_string(),
    })
}

/// The child's new VHDX locator: `parent_linkage` = the parent's DataWriteGuid (dropping a
/// `parent_linkage2` equal to it), new `relative_path` and `absolute_win32_path`, no
/// `volume_path` (it names the old place), every other key kept in order.
fn vhdx_locator(
    old: &vhdx_format::locator::ParentLocator,
    linkage: &Uuid,
    relative: &str,
    absolute: &str,
) -> vhdx_format::locator::ParentLocator {
    let mut entries: Vec<(String, String)> = Vec::new();
    let (mut has_rel, mut has_abs) = (false, false);
    for (k, v) in &old.entries {
        let value = match k.to_ascii_lowercase().as_str() {
            "parent_linkage" => braced(linkage),
            "parent_linkage2" => {
                if vhdx_format::guid::parse_braced(v) == Some(*linkage) {
                    continue;
                }
                v.clone()
            }
            "relative_path" => {
                has_rel = true;
                relative.to_string()
            }
            "absolute_win32_path" => {
                has_abs = true;
                absolute.to_string()
            }
            "volume_path" => continue,
            _ => v.clone(),
        };
        entries.push((k.clone(), value));
    }
    if !has_rel {
        entries.push(("relative_path".into(), relative.to_string()));
    }
    if !has_abs {
        entries.push(("absolute_win32_path".into(), absolute.to_string()));
    }
    vhdx_format::locator::ParentLocator {
        locator_type: old.locator_type,
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_locator_keeps_unknown_keys_and_drops_volume_path() {
        let g = Uuid::from_u128(0xabc);
        let old = vhdx_format::locator::ParentLocator::new(vec![
            ("parent_linkage".into(), braced(&Uuid::from_u128(1))),
            ("parent_linkage2".into(), braced(&g).to_uppercase()),
            ("volume_path".into(), "\\\\?\\Volume{x}\\p.vhdx".into()),
            ("x_vendor".into(), "v".into()),
            ("relative_path".into(), ".\\p.vhdx".into()),
        ]);
        let n = vhdx_locator(&old, &g, ".\\sub\\p.vhdx", "/abs/sub/p.vhdx");
        assert_eq!(
            n.entries,
            vec![
                ("parent_linkage".to_string(), braced(&g)),
                ("x_vendor".into(), "v".into()),
                ("relative_path".into(), ".\\sub\\p.vhdx".into()),
                ("absolute_win32_path".into(), "/abs/sub/p.vhdx".into()),
            ]
        );
        // A parent_linkage2 naming another id (a merge in progress) is kept.
        let n = vhdx_locator(&old, &Uuid::from_u128(1), "r", "a");
        assert!(n.parent_linkage2() == Some(g));
    }

    #[test]
    fn relative_paths_windows_style() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::create_dir_all(d.path().join("c")).unwrap();
        std::fs::write(d.path().join("a/b/p.vhdx"), b"x").unwrap();
        std::fs::write(d.path().join("c/q.vhdx"), b"x").unwrap();
        let child = d.path().join("a/child.vhdx");
        let (rel, abs) = parent_paths(&child, &d.path().join("a/b/p.vhdx")).unwrap();
        assert_eq!(rel, ".\\b\\p.vhdx");
        assert!(abs.is_absolute() && abs.ends_with("a/b/p.vhdx"));
        let (rel, _) = parent_paths(&child, &d.path().join("c/q.vhdx")).unwrap();
        assert_eq!(rel, "..\\c\\q.vhdx");
        assert!(parent_paths(&child, &d.path().join("nope")).is_err());
    }
}
