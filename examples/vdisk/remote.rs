//! Remote images in the CLI: sources and destinations given as URLs.
//!
//! - `http://`, `https://`, `s3://`: read-only images (any format) through
//!   `block_io::remote`, with parents of their own; `convert SRC s3://bucket/key` converts
//!   into a temporary file (in the system's temporary folder, removed afterwards) and uploads
//!   it with `block_io::remote::upload` (which takes a whole `Storage`, so no streaming).
//! - `nbd://`, `nbd+unix://`, `nbds://`: NBD exports through `block_io::nbd::NbdClient`, raw
//!   disks; `convert SRC nbd://...` writes into the export, as `qemu-img convert -n` does.
//!   `nbds://` takes its credentials from `--nbd-tls-creds DIR` (qemu's `tls-creds-x509`
//!   client layout: `ca-cert.pem`, optionally `client-cert.pem` and `client-key.pem`).
//!
//! Local children of remote parents are made by `create -b URL` (see [`vhdx_parent`] and
//! [`vhd_child`]) and opened with remote parents allowed (`chain::RemoteParents::Allow`).
//! An NBD parent must advertise its identity (`vdisk serve --nbd --read-only` of a VHD or
//! VHDX does); one that advertises none (qemu-nbd, nbdkit, a raw image) is accepted, checked
//! by content fingerprint only, with `--unverified-nbd-parents`
//! (`chain::RemoteParents::AllowUnverified`; see `chain::remote` for what a fingerprint
//! cannot detect).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use vdisk::block_io::nbd::{NbdClientOptions, TlsOptions};
use vdisk::block_io::{BlockDevice, BlockStatus, FileStorage, Storage};
use vdisk::chain::{self, remote, Disk, Format, Identity};
use vdisk::{vhd_format, vhdx_format};

use crate::image::{Access, Image};
use crate::{cause_chain, CliError};

/// `--nbd-tls-creds DIR`, set once by `main`.
static NBD_TLS_CREDS: OnceLock<PathBuf> = OnceLock::new();

/// `--unverified-nbd-parents`, set once by `main`.
static UNVERIFIED_NBD_PARENTS: OnceLock<bool> = OnceLock::new();

/// Allows NBD parents that advertise no identity (checked by content fingerprint only).
pub fn set_unverified_nbd_parents(yes: bool) {
    let _ = UNVERIFIED_NBD_PARENTS.set(yes);
}

/// Which remote parents chains open: all that can be checked, and with
/// `--unverified-nbd-parents` also NBD exports checked by fingerprint only.
pub fn remote_parents() -> chain::RemoteParents {
    if UNVERIFIED_NBD_PARENTS.get() == Some(&true) {
        chain::RemoteParents::AllowUnverified
    } else {
        chain::RemoteParents::Allow
    }
}

/// The NBD export at `url` as the parent of `child` (a `child_format` image being made or
/// looked at), read-only, with the identity a child records (see `chain::remote`).
pub fn nbd_parent_layer(
    child: &Path,
    url: &Path,
    child_format: Format,
) -> Result<chain::Layer, CliError> {
    let s = url_str(url)?;
    Ok(remote::open_nbd_parent_with(
        child,
        s,
        child_format,
        remote_parents(),
        nbd_options(s, true)?,
    )?)
}

/// The NBD export at `url` as a raw layer, read-only (`info` of an NBD layer).
pub fn nbd_layer(url: &Path) -> Result<chain::Layer, CliError> {
    let s = url_str(url)?;
    Ok(remote::open_nbd_layer(s, nbd_options(s, true)?)?)
}

/// Sets the TLS credentials folder NBD URLs connect with.
pub fn set_nbd_tls_creds(dir: Option<PathBuf>) {
    if let Some(d) = dir {
        let _ = NBD_TLS_CREDS.set(d);
    }
}

/// Whether `p` is a URL (object or NBD) rather than a local path.
pub fn is_url(p: &Path) -> bool {
    remote::is_url_path(p)
}

fn url_str(p: &Path) -> Result<&str, CliError> {
    p.to_str()
        .ok_or_else(|| CliError::new(format!("{} is not valid UTF-8", p.display())))
}

/// NBD client options: read-only or not, TLS from `--nbd-tls-creds` (an `nbds://` URL
/// without them is refused, naming the flag).
pub fn nbd_options(url: &str, read_only: bool) -> Result<NbdClientOptions, CliError> {
    let tls = match NBD_TLS_CREDS.get() {
        Some(dir) => Some(TlsOptions::from_qemu_creds_dir(dir).map_err(|e| {
            CliError::new(format!(
                "TLS credentials in {}: {}",
                dir.display(),
                cause_chain(&e)
            ))
        })?),
        None if url.to_ascii_lowercase().starts_with("nbds") => {
            return Err(CliError::new(format!(
                "{url} needs TLS: give --nbd-tls-creds DIR (ca-cert.pem, optionally client-cert.pem and client-key.pem)"
            )))
        }
        None => None,
    };
    Ok(NbdClientOptions {
        read_only,
        tls,
        ..NbdClientOptions::default()
    })
}

/// Opens the NBD export at `url` as a one-layer chain.
fn open_nbd(url: &str, read_only: bool) -> Result<Arc<Disk>, CliError> {
    let layer = remote::open_nbd_layer(url, nbd_options(url, read_only)?)?;
    Ok(Arc::new(Disk::from_layers(vec![layer], false)?))
}

/// Opens the image at `url` with its parents: an object read-only, an NBD export raw.
pub fn open(url: &Path, format: Option<&str>, access: &Access) -> Result<Image, CliError> {
    let s = url_str(url)?;
    let disk = if remote::is_nbd_url(s) {
        if format.is_some_and(|f| f != "raw") {
            return Err(CliError::new(format!(
                "{s} is an NBD export: it is a raw disk (-f raw or no -f)"
            )));
        }
        open_nbd(s, access.read_only)?
    } else {
        if !access.read_only {
            return Err(CliError::new(format!(
                "{s} can only be opened read-only (HTTP and S3 images are read-only; use -r)"
            )));
        }
        let opts = crate::image::chain_options(format, true)?;
        Arc::new(Disk::open(url, &opts)?)
    };
    let format = disk.layers()[0].format;
    Ok(Image {
        dev: disk.clone(),
        chain: Some(disk),
        format,
    })
}

/// `vdisk info` of a URL: the facts of the image (objects), or of the export (NBD, raw).
pub fn facts(url: &Path, format: Option<Format>) -> Result<Value, CliError> {
    let s = url_str(url)?;
    if remote::is_nbd_url(s) {
        let disk = open_nbd(s, true)?;
        let size = disk.info().virtual_size;
        return Ok(json!({
            "filename": s,
            "format": "raw",
            "file_size": size,
            "subformat": "raw",
            "virtual_size": size,
            "logical_sector_size": disk.info().logical_sector_size,
            "physical_sector_size": disk.info().physical_sector_size,
        }));
    }
    let (storage, id) = vdisk::block_io::remote::open_url(s).map_err(|e| open_failed(s, &e))?;
    let file_size = storage.len()?;
    let format = match format {
        Some(f) => f,
        None => chain::detect(&storage)?,
    };
    let mut v = json!({
        "filename": s,
        "format": format.name(),
        "file_size": file_size,
        "remote": {
            "etag": id.etag,
            "last_modified": id.last_modified,
        },
    });
    let extra = match format {
        Format::Raw => json!({
            "subformat": "raw",
            "virtual_size": file_size,
            "logical_sector_size": 512,
            "physical_sector_size": 512,
        }),
        Format::Vhd => crate::info::vhd_facts(&vhd_format::read_details(storage)?),
        Format::Vhdx => crate::info::vhdx_facts(
            &vhdx_format::VhdxFile::open(
                storage,
                &vhdx_format::OpenOptions::new().read_only(true),
            )?
            .details(),
        ),
    };
    crate::info::merge(&mut v, extra);
    Ok(v)
}

fn open_failed(url: &str, e: &vdisk::block_io::Error) -> CliError {
    CliError::new(format!("cannot open {url}: {}", e.chain_string()))
}

/// The parent of a VHDX child (at `child`) to be made with `create -b URL`: the parent's
/// DataWriteGuid (an NBD export's advertised one, or its fingerprint), size and sector size;
/// the child records the URL afterwards ([`record_vhdx_url`]).
pub fn vhdx_parent(
    child: &Path,
    url: &Path,
) -> Result<(vhdx_format::ParentRef, u64, u32), CliError> {
    let s = url_str(url)?;
    let l = remote_parent_layer(child, s, Format::Vhdx)?;
    let Identity::Vhdx {
        data_write_guid, ..
    } = l.identity
    else {
        return Err(CliError::new(format!(
            "a VHDX child needs a VHDX parent; {s} is {}",
            parent_kind(&l)
        )));
    };
    let info = l.dev.info();
    Ok((
        vhdx_format::ParentRef {
            data_write_guid,
            // What Windows tools look for beside the child: a downloaded copy of the parent.
            relative_path: remote::url_file_name(s).unwrap_or_else(|| "parent.vhdx".into()),
            absolute_path: None,
        },
        info.virtual_size,
        info.logical_sector_size,
    ))
}

/// What a parent layer is, for messages: its format, or for an NBD export the format its
/// identity names.
fn parent_kind(l: &chain::Layer) -> &'static str {
    match l.identity {
        Identity::Vhdx { .. } => "a VHDX",
        Identity::Vhd { .. } => "a VHD",
        Identity::Raw => "raw",
    }
}

/// Adds the `vdisk_url` entry (`chain::remote::URL_KEY`) to a new VHDX child's locator.
pub fn record_vhdx_url(
    f: &mut vhdx_format::VhdxFile<FileStorage>,
    url: &Path,
) -> Result<(), CliError> {
    let s = url_str(url)?;
    let Some(loc) = f.parent_locator() else {
        return Err(CliError::new("the new child has no parent locator"));
    };
    let mut entries: Vec<(String, String)> = loc
        .entries
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(remote::URL_KEY))
        .cloned()
        .collect();
    entries.push((remote::URL_KEY.to_string(), s.to_string()));
    f.set_parent_locator(&vhdx_format::locator::ParentLocator::new(entries))?;
    Ok(())
}

/// Options of a VHD child (at `child`) of the VHD at `url`: the URL is the parent's name,
/// no Windows path locators (see `chain::remote`). An NBD parent's unique id and timestamp
/// are its advertised ones, or its fingerprint and 0.
pub fn vhd_child(child: &Path, url: &Path) -> Result<vhd_format::DifferencingOptions, CliError> {
    let s = url_str(url)?;
    if remote::is_nbd_url(s) {
        let l = remote_parent_layer(child, s, Format::Vhd)?;
        let Identity::Vhd {
            unique_id,
            timestamp,
        } = l.identity
        else {
            return Err(CliError::new(format!(
                "a VHD child needs a VHD parent; {s} is {}",
                parent_kind(&l)
            )));
        };
        return Ok(vhd_format::DifferencingOptions {
            size: l.dev.info().virtual_size,
            block_size: 2 << 20,
            parent_unique_id: unique_id,
            parent_timestamp: timestamp,
            parent_name: s.to_string(),
            absolute_path: None,
            relative_path: None,
            unique_id: None,
            timestamp: None,
            creator: vhd_format::Creator::default(),
        });
    }
    let (storage, _) = vdisk::block_io::remote::open_url(s).map_err(|e| open_failed(s, &e))?;
    if chain::detect(&storage)? != Format::Vhd {
        return Err(CliError::new(format!(
            "a VHD child needs a VHD parent; {s} is not one"
        )));
    }
    let details = vhd_format::read_details(storage)?;
    Ok(vhd_format::DifferencingOptions::for_parent(
        &details,
        s.to_string(),
        None,
        None,
    ))
}

/// The parent layer at `s`: an object, or an NBD export opened as a parent of a
/// `child_format` child.
fn remote_parent_layer(
    child: &Path,
    s: &str,
    child_format: Format,
) -> Result<chain::Layer, CliError> {
    if remote::is_nbd_url(s) {
        return nbd_parent_layer(child, Path::new(s), child_format);
    }
    Ok(remote::open_object_layer(s, None)?)
}

/// `convert SRC URL`: into an NBD export (raw, written in place; zero runs written as zeros
/// unless the export already reads zero there) or, for `s3://`, through a temporary file
/// uploaded at the end.
pub fn convert_to(
    src: &dyn BlockDevice,
    out: Format,
    options: &[String],
    dst: &Path,
    mut on_progress: impl FnMut(u64),
) -> Result<(), CliError> {
    let s = url_str(dst)?;
    if remote::is_nbd_url(s) {
        if out != Format::Raw {
            return Err(CliError::new(format!(
                "{s} is an NBD export: it takes raw data (-O raw), not {}",
                out.name()
            )));
        }
        if !options.is_empty() {
            return Err(CliError::new("-o options do not apply to an NBD export"));
        }
        let d = open_nbd(s, false)?;
        let size = src.info().virtual_size;
        let dsize = d.info().virtual_size;
        if dsize < size {
            return Err(CliError::new(format!(
                "the export {s} ({dsize} bytes) is smaller than the source ({size} bytes)"
            )));
        }
        copy_over(src, &*d, &mut on_progress)?;
        d.flush()?;
        return Ok(());
    }
    if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("s3://")) {
        let dir = tempfile_dir()?;
        let tmp = dir.join("upload.img");
        let size = src.info().virtual_size;
        let result = (|| {
            let img = crate::image::create(out, &tmp, size, options, None)?;
            crate::cmds::copy(src, &*img.dev, &mut on_progress)?;
            img.dev.flush()?;
            drop(img);
            let f = FileStorage::open(&tmp, &crate::image::file_options(true))?;
            vdisk::block_io::remote::upload(
                &f,
                s,
                &vdisk::block_io::remote::RemoteOptions::default(),
            )?;
            Ok::<(), CliError>(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    Err(CliError::new(format!(
        "{s}: http(s):// images are read-only; a conversion can write to a file, nbd:// or s3://"
    )))
}

/// A private temporary folder.
fn tempfile_dir() -> Result<PathBuf, CliError> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("vdisk-upload-{}-{i}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(CliError::new(format!(
                    "cannot create a temporary folder in {}: {e}",
                    base.display()
                )))
            }
        }
    }
    Err(CliError::new("cannot create a temporary folder"))
}

/// Copies all of `src` over an existing `dst`: data runs as data, the rest as zeros (skipped
/// where `dst` already reads zero).
fn copy_over(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    on_progress: &mut impl FnMut(u64),
) -> Result<(), CliError> {
    const CHUNK: u64 = 2 << 20;
    let size = src.info().virtual_size;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let want = (size - pos).min(CHUNK);
        let run = src.block_status(pos, want)?;
        let n = run.len.clamp(1, want);
        let b = &mut buf[..n as usize];
        let data = run.status == BlockStatus::Data && {
            src.read_at(b, pos)?;
            b.iter().any(|&x| x != 0)
        };
        if data {
            dst.write_at(b, pos)?;
        } else {
            let there = dst.block_status(pos, n)?;
            if there.status != BlockStatus::Zero || there.len < n {
                dst.write_zeroes(pos, n, false)?;
            }
        }
        pos += n;
        on_progress(pos);
    }
    Ok(())
}
