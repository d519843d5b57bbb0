//! Remote layers and remote parents: images on web servers and object stores (`http://`,
//! `https://`, `s3://`, read through `block_io::remote`) and NBD exports (`nbd://`,
//! `nbd+unix://`, `nbds://`, through `block_io::nbd::NbdClient`), as the top of a chain or
//! as the parent of a local differencing child. Opening them needs the crate feature
//! `remote`; without it the same calls fail with `ErrorKind::Unsupported`.
//!
//! # Where a child records a remote parent
//!
//! - VHDX: the parent locator (MS-VHDX 2.2.4: a list of key-value entries of which only
//!   `parent_linkage` is required; the spec names the keys of its locator type and does not
//!   forbid others; libvhdi opens such a child, see `tests/remote_parent.rs`; Hyper-V was not
//!   tried) keeps the URL under the extra key [`URL_KEY`] (`vdisk_url`), next to
//!   `parent_linkage` (the parent's DataWriteGuid, checked as for a local parent; for an NBD
//!   parent, see below) and a `relative_path` holding the URL's last segment, so that
//!   Windows finds a downloaded copy placed next to the child.
//! - VHD: the URL is the parent's name (the header's Parent Unicode Name, which QEMU also
//!   reads as the parent's path); no W2ku/W2ru locator is written, since Windows cannot read
//!   a URL. The parent's unique id and timestamp are recorded and checked as for a local one.
//!
//! # When a remote parent is opened
//!
//! Only when [`OpenOptions::remote_parents`](crate::OpenOptions::remote_parents) is
//! [`RemoteParents::Allow`] or [`RemoteParents::AllowUnverified`]: a local image must not
//! make a library user's process fetch URLs it names unless the user asked for that. With
//! [`RemoteParents::Deny`] (the default) the URL is passed over and the child's local
//! locators are tried; if none resolves, opening fails with [`ChainError::PolicyRefused`]
//! naming the URL. An allowed remote VHD or VHDX parent is opened read-only through
//! `block_io::remote::open_url` and gets the same lineage checks as a local one; if the
//! object is replaced on the server later, its reads fail with
//! `block_io::remote::RemoteError::Changed` (kind `Corrupt`).
//!
//! # NBD exports as parents
//!
//! An NBD export is a disk, not an image file: the protocol carries no identity a child
//! could record. Two ways give it one ([`open_nbd_parent`]); either way the export is
//! opened read-only (the client refuses writes) and is a raw layer ([`Format::Raw`]) whose
//! [`Layer::identity`] is what was checked:
//!
//! - **Advertised identity** (with [`RemoteParents::Allow`]): our own server, exporting a
//!   VHD or VHDX read-only (`vdisk serve --nbd --read-only`), puts a line
//!   `vdisk-identity: v1 size=N format=vhdx data-write-guid=G disk-id=D` (VHD: `format=vhd
//!   unique-id=U timestamp=T`) into the export's `NBD_INFO_DESCRIPTION`, a text standard
//!   clients only show to people (`AdvertisedIdentity`; `block_io::nbd::ExportInfo::identity`
//!   finds the line). A child records it as it records a local parent of that format
//!   (VHDX: `parent_linkage` = the DataWriteGuid; VHD: the parent unique id and timestamp),
//!   and opening the chain checks the export's advertised identity and size against it: a
//!   mismatch is [`ChainError::LineageMismatch`]. The NBD client compares the identity line
//!   again on every reconnect: a server restarted with another image behind the URL makes
//!   every later request fail with `block_io::nbd::ClientError::ExportChanged` (kind
//!   `Corrupt`), never a read of the other image. Writable exports advertise nothing (their
//!   content changes under a child), nor do raw images (they have no identity). The
//!   identity is the server's claim: it guards against a wrong or replaced parent, not
//!   against a server that lies.
//! - **Content fingerprint** (only with [`RemoteParents::AllowUnverified`]): for exports that
//!   advertise nothing (qemu-nbd, nbdkit, a raw image), the child records a fingerprint
//!   of the export (size and SHA-256 of 16 samples of 64 KiB spread over the disk, the first
//!   and last included) where it records a parent identity (VHDX: as `parent_linkage`; VHD:
//!   as the parent unique id, timestamp 0). Opening the chain computes the fingerprint again
//!   (a mismatch is [`ChainError::LineageMismatch`]), and after every reconnect of the
//!   client the next request waits for it to be computed once more (a change fails that
//!   request and every later one with `FingerprintChanged`, kind `Corrupt`). A fingerprint
//!   detects a different size and any change inside the sampled 1 MiB; it cannot detect a
//!   change elsewhere (a file system that rewrote a few blocks in the middle of the disk
//!   keeps its fingerprint). Hence the explicit opt-in.
//!
//! NBD parents connect with default client options (reconnecting, no TLS): an `nbds://`
//! parent cannot be opened by [`crate::Disk::open`] yet.
//!
#![cfg_attr(
    feature = "remote",
    doc = "The identity and fingerprint items: [`AdvertisedIdentity`], [`fingerprint`], \
           [`fingerprint_identity`], [`FingerprintChanged`]."
)]
#![cfg_attr(
    not(feature = "remote"),
    doc = "The identity and fingerprint items (`AdvertisedIdentity`, `fingerprint`, \
           `fingerprint_identity`, `FingerprintChanged`) need the crate feature `remote`; \
           these docs were built without it."
)]

use std::path::{Path, PathBuf};

use crate::error::ChainError;
use crate::layer::Layer;
use crate::policy::Candidate;
use crate::Format;

#[cfg(feature = "remote")]
pub use crate::nbd_parent::{
    fingerprint, fingerprint_identity, fingerprint_samples, AdvertisedIdentity, BadIdentity,
    FingerprintChanged, FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_LEN,
};

/// The VHDX parent locator key holding a remote parent's URL.
pub const URL_KEY: &str = "vdisk_url";

/// Whether a chain may open parents that its children name by URL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RemoteParents {
    /// Never fetch a parent from a URL (the library's default).
    #[default]
    Deny,
    /// Open `http://`, `https://` and `s3://` parents, and NBD exports that advertise an
    /// identity, read-only (the CLI's choice).
    Allow,
    /// As [`Allow`](Self::Allow), and NBD exports that advertise no identity too, checked
    /// only by their content fingerprint
    #[cfg_attr(
        feature = "remote",
        doc = "([`fingerprint`]; see the module docs for what it"
    )]
    #[cfg_attr(not(feature = "remote"), doc = "(see the module docs for what it")]
    /// cannot detect).
    AllowUnverified,
}

/// Whether `s` is a URL this module opens: `http://`, `https://`, `s3://` (objects) or
/// `nbd://`, `nbd+unix://`, `nbds://`, ... (NBD exports).
pub fn is_url(s: &str) -> bool {
    is_object_url(s) || is_nbd_url(s)
}

/// Whether `path` is one of the URLs of [`is_url`] (as a [`Layer::path`] of a remote layer is).
pub fn is_url_path(path: &Path) -> bool {
    path.to_str().is_some_and(is_url)
}

/// `http://`, `https://` or `s3://`.
pub fn is_object_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("s3://")
}

/// An NBD URL scheme (`nbd`, `nbds`, `nbd+unix`, `nbds+unix`, ...).
pub fn is_nbd_url(s: &str) -> bool {
    let lower = s.get(..12).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("nbd") && s.contains("://")
}

/// The last segment of a URL's path (without query), for a `relative_path` locator entry
/// next to the URL: what Windows tools look for beside the child.
pub fn url_file_name(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (_, path) = rest.split_once('/')?;
    let name = path.rsplit('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The URL candidates of a child's locators, in order.
pub(crate) fn url_candidates(candidates: &[Candidate]) -> Vec<&Candidate> {
    candidates
        .iter()
        .filter(|c| is_url(c.path.trim()))
        .collect()
}

/// A relative locator path of a remote child, joined to the child's URL (`.\base.vhdx` next to
/// `https://h/d/child.vhdx` is `https://h/d/base.vhdx`). `None` for absolute paths.
fn join_relative(child_url: &str, rel: &str) -> Option<String> {
    let rel = rel.trim_end_matches('\0').replace('\\', "/");
    let rel = rel.strip_prefix("./").unwrap_or(&rel);
    if rel.is_empty() || rel.starts_with('/') || rel.contains(':') || rel.starts_with("../") {
        return None;
    }
    let query_at = child_url.find(['?', '#']).unwrap_or(child_url.len());
    let base = &child_url[..query_at];
    let dir_end = base.rfind('/')? + 1;
    // Not past the scheme's "//".
    if base.get(..dir_end)?.ends_with("://") {
        return None;
    }
    Some(format!("{}{}", &base[..dir_end], rel))
}

/// Resolves the parent of `child` (a layer of `child_format`) when a URL is involved: the
/// child names its parent by URL, or the child itself is remote (its relative locators are
/// then relative to its URL). Returns `Ok(None)` when no URL is involved (the caller
/// resolves local paths), the parent layer when it was opened, or the refusal.
pub(crate) fn resolve_parent(
    child: &Path,
    child_format: Format,
    candidates: &[Candidate],
    allow: RemoteParents,
) -> Result<Option<Layer>, ChainError> {
    let mut urls: Vec<String> = url_candidates(candidates)
        .iter()
        .map(|c| c.path.trim().to_string())
        .collect();
    if let Some(child_url) = child.to_str().filter(|s| is_url(s)) {
        urls.extend(
            candidates
                .iter()
                .filter(|c| c.source == "relative_path" || c.source == "W2ru")
                .filter_map(|c| join_relative(child_url, &c.path)),
        );
    }
    let Some(url) = urls.first().cloned() else {
        return Ok(None);
    };
    if allow == RemoteParents::Deny {
        return Err(refused(
            child,
            &url,
            "remote parents are not allowed (OpenOptions::remote_parents is Deny)",
        ));
    }
    if is_nbd_url(&url) {
        return open_nbd_parent(child, &url, child_format, allow).map(Some);
    }
    open_object_layer(&url, None).map(Some)
}

fn refused(child: &Path, url: &str, rule: &str) -> ChainError {
    ChainError::PolicyRefused {
        child: child.to_path_buf(),
        path: PathBuf::from(url),
        rule: rule.to_string(),
    }
}

/// Opens the NBD export at `url` read-only as the parent of `child` (a layer of
/// `child_format`, or one about to be made), with default client options. The layer's
/// identity is the one the export advertises, or, when it advertises none and `allow` is
/// [`RemoteParents::AllowUnverified`], its content fingerprint in the form a child of
/// `child_format` records
#[cfg_attr(
    feature = "remote",
    doc = "([`fingerprint`], [`fingerprint_identity`]);"
)]
/// see the module docs. A child records this layer's identity; the caller checks it against
/// what a child recorded.
pub fn open_nbd_parent(
    child: &Path,
    url: &str,
    child_format: Format,
    allow: RemoteParents,
) -> Result<Layer, ChainError> {
    #[cfg(feature = "remote")]
    return open_nbd_parent_with(child, url, child_format, allow, Default::default());
    #[cfg(not(feature = "remote"))]
    {
        let _ = (child, child_format, allow);
        Err(not_built(url))
    }
}

/// [`open_nbd_parent`] with client options (TLS, timeouts); `read_only` is forced.
#[cfg(feature = "remote")]
pub fn open_nbd_parent_with(
    child: &Path,
    url: &str,
    child_format: Format,
    allow: RemoteParents,
    opts: block_io::nbd::NbdClientOptions,
) -> Result<Layer, ChainError> {
    use std::sync::Arc;

    use block_io::{BlockDevice, Error, ErrorKind};

    use crate::nbd_parent::{check_size, Fingerprinted};

    if allow == RemoteParents::Deny {
        return Err(refused(
            child,
            url,
            "remote parents are not allowed (OpenOptions::remote_parents is Deny)",
        ));
    }
    let path = PathBuf::from(url);
    let open_err = |source| ChainError::Open {
        path: path.clone(),
        source,
    };
    let opts = block_io::nbd::NbdClientOptions {
        read_only: true,
        ..opts
    };
    let client =
        block_io::nbd::NbdClient::open(url, opts).map_err(|e| open_err(e.into_error("NBD")))?;
    let export = client.export_info();
    if let Some(line) = export.identity() {
        let adv = AdvertisedIdentity::parse(line).map_err(|e| {
            open_err(Error::with_source(
                ErrorKind::Corrupt,
                "the export's advertised identity",
                e,
            ))
        })?;
        if let Some(why) = check_size(&adv, &client.info()) {
            return Err(open_err(Error::new(ErrorKind::Corrupt, why)));
        }
        return Ok(Layer {
            path,
            format: Format::Raw,
            dev: Arc::new(client),
            identity: adv.identity,
            parent: None,
        });
    }
    if allow != RemoteParents::AllowUnverified {
        return Err(refused(
            child,
            url,
            "the NBD export advertises no identity (only `vdisk serve --nbd --read-only` of a \
             VHD or VHDX does); a parent checked by content fingerprint alone needs \
             RemoteParents::AllowUnverified",
        ));
    }
    let dev =
        Fingerprinted::new(url, client, block_io::nbd::NbdClient::reconnects).map_err(open_err)?;
    let identity = fingerprint_identity(dev.fingerprint(), child_format);
    Ok(Layer {
        path,
        format: Format::Raw,
        dev: Arc::new(dev),
        identity,
        parent: None,
    })
}

/// Opens the object at `url` (`http://`, `https://`, `s3://`) read-only as one layer (never
/// its parents), by content or as `format`. Its [`Layer::path`] is the URL.
#[cfg(feature = "remote")]
pub fn open_object_layer(url: &str, format: Option<Format>) -> Result<Layer, ChainError> {
    let path = PathBuf::from(url);
    let (storage, _identity) =
        block_io::remote::open_url(url).map_err(|source| ChainError::Open {
            path: path.clone(),
            source,
        })?;
    crate::layer::open_layer_from_storage(&path, storage, format, true)
}

/// Without the `remote` feature: an error saying so.
#[cfg(not(feature = "remote"))]
pub fn open_object_layer(url: &str, _format: Option<Format>) -> Result<Layer, ChainError> {
    Err(not_built(url))
}

/// Opens the NBD export at `url` as one raw layer (an NBD export is a disk, not an image
/// file). Its [`Layer::path`] is the URL.
#[cfg(feature = "remote")]
pub fn open_nbd_layer(
    url: &str,
    opts: block_io::nbd::NbdClientOptions,
) -> Result<Layer, ChainError> {
    use std::sync::Arc;
    let path = PathBuf::from(url);
    let client = block_io::nbd::NbdClient::open(url, opts).map_err(|e| ChainError::Open {
        path: path.clone(),
        source: e.into_error("NBD"),
    })?;
    Ok(Layer {
        path,
        format: Format::Raw,
        dev: Arc::new(client),
        identity: crate::Identity::Raw,
        parent: None,
    })
}

/// Opens `url` as the top layer of a chain: an object read-only ([`open_object_layer`]), an
/// NBD export with default client options, read-only if `read_only`.
pub(crate) fn open_top(
    url: &str,
    format: Option<Format>,
    read_only: bool,
) -> Result<Layer, ChainError> {
    if is_object_url(url) {
        if !read_only {
            return Err(ChainError::Open {
                path: PathBuf::from(url),
                source: block_io::Error::new(
                    block_io::ErrorKind::ReadOnly,
                    "HTTP and S3 images open read-only",
                ),
            });
        }
        return open_object_layer(url, format);
    }
    open_nbd_top(url, format, read_only)
}

#[cfg(feature = "remote")]
fn open_nbd_top(url: &str, format: Option<Format>, read_only: bool) -> Result<Layer, ChainError> {
    if format.is_some_and(|f| f != Format::Raw) {
        return Err(ChainError::Open {
            path: PathBuf::from(url),
            source: block_io::Error::new(
                block_io::ErrorKind::Unsupported,
                "an NBD export is a disk: it opens as raw",
            ),
        });
    }
    let opts = block_io::nbd::NbdClientOptions {
        read_only,
        ..Default::default()
    };
    open_nbd_layer(url, opts)
}

#[cfg(not(feature = "remote"))]
fn open_nbd_top(url: &str, _format: Option<Format>, _read_only: bool) -> Result<Layer, ChainError> {
    Err(not_built(url))
}

#[cfg(not(feature = "remote"))]
fn not_built(url: &str) -> ChainError {
    ChainError::Open {
        path: PathBuf::from(url),
        source: block_io::Error::new(
            block_io::ErrorKind::Unsupported,
            "remote images need the chain crate's `remote` feature",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("https://h/a.vhdx"));
        assert!(is_url("s3://b/k"));
        assert!(is_url("nbd://127.0.0.1:10809/x"));
        assert!(is_url("nbd+unix:///x?socket=/tmp/s"));
        assert!(is_url("nbds://h/x"));
        assert!(!is_url("/srv/a.vhdx"));
        assert!(!is_url("nbd.vhdx"));
        assert!(!is_url("base.vhdx"));
    }

    #[test]
    fn file_names_of_urls() {
        assert_eq!(
            url_file_name("https://h/d/base.vhdx?x=1").as_deref(),
            Some("base.vhdx")
        );
        assert_eq!(
            url_file_name("s3://bucket/k/base.vhd").as_deref(),
            Some("base.vhd")
        );
        assert_eq!(url_file_name("https://h/"), None);
        assert_eq!(url_file_name("https://h"), None);
    }

    #[test]
    fn relative_paths_join_a_child_url() {
        assert_eq!(
            join_relative("https://h/d/child.vhdx", ".\\base.vhdx").as_deref(),
            Some("https://h/d/base.vhdx")
        );
        assert_eq!(join_relative("https://h/d/child.vhdx", "C:\\x.vhdx"), None);
        assert_eq!(join_relative("https://h/d/child.vhdx", "../x.vhdx"), None);
        assert_eq!(join_relative("https://h", "x.vhdx"), None);
    }

    #[test]
    fn denied_by_default() {
        let c = vec![Candidate {
            source: URL_KEY.into(),
            path: "https://127.0.0.1:1/base.vhdx".into(),
        }];
        let child = Path::new("child.vhdx");
        let e = resolve_parent(child, Format::Vhdx, &c, RemoteParents::default());
        assert!(matches!(e, Err(ChainError::PolicyRefused { .. })));
        let local = vec![Candidate {
            source: "relative_path".into(),
            path: "base.vhdx".into(),
        }];
        assert!(matches!(
            resolve_parent(child, Format::Vhdx, &local, RemoteParents::Allow),
            Ok(None)
        ));
    }

    #[test]
    fn layers_open_from_any_storage() {
        use std::sync::Arc;
        let mem = Arc::new(block_io::MemStorage::new());
        let f = vhdx_format::create(mem.clone(), &vhdx_format::CreateOptions::dynamic(8 << 20))
            .unwrap();
        drop(f);
        let name = Path::new("https://h/m.vhdx");
        let l = crate::open_layer_from_storage(name, mem.clone(), None, true).unwrap();
        assert_eq!(l.format, Format::Vhdx);
        assert_eq!(l.path, name);
        assert!(matches!(l.identity, crate::Identity::Vhdx { .. }));
        assert_eq!(l.dev.info().virtual_size, 8 << 20);
        assert!(l.dev.info().read_only);
        // Forced raw: the container bytes as a disk.
        let raw = crate::open_layer_from_storage(name, mem, Some(Format::Raw), true).unwrap();
        assert_eq!(raw.identity, crate::Identity::Raw);
    }

    #[test]
    fn nbd_parents_are_opened_only_when_allowed() {
        let c = vec![Candidate {
            source: URL_KEY.into(),
            path: "nbd://127.0.0.1:1/x".into(),
        }];
        let child = Path::new("child.vhdx");
        let e = resolve_parent(child, Format::Vhdx, &c, RemoteParents::Deny);
        assert!(matches!(e, Err(ChainError::PolicyRefused { .. })));
        // Allowed: tried (nothing listens on port 1).
        let e = resolve_parent(child, Format::Vhdx, &c, RemoteParents::Allow);
        assert!(matches!(e, Err(ChainError::Open { .. })), "{e:?}");
    }
}
